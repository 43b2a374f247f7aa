"""Anchor scores shared by the ranks of a process group (tensor-parallel inference).

Under transformers' tensor parallelism (``tp_plan="auto"`` under ``torchrun``) every rank
runs the same request, and each rank's attention sees only its own query/KV heads. The
gates are per key, so every rank must apply the same ones. With the fast solver (the
default) the ranks share one request's SSC: ``compute_anchor_scores(process_group=...)``
splits the columns of ``C`` over them (each rank iterates its share against the whole
factor, ``C`` is all-gathered), clusters on rank 0 and broadcasts the labels and scores.
Where one process would take the column-blocked exact solver (long videos: the dense one
does not fit), the blocks are divided among the ranks the same way. With another solver
(faithful in exact mode, or the CuPy backend) the SSC runs on rank 0 of the
group alone and its scores are sent to the others, which never run SSC. Every rank ends
with the same scores, equal to the single-process ones (to the rounding of the split's
cross-rank sums for the fast solver). Before any scoring the ranks compare a fingerprint of the request (shapes, visual
token counts, sums of the visual features), so that a data-parallel run (different requests
per rank) configured with a group fails loudly instead of mixing requests.

Collectives per prefill with visual tokens: one ``all_gather_object`` (the fingerprints)
plus one ``broadcast_object_list`` per distinct scored sample (and the solvers' own
collectives when the SSC is spread). Decode steps communicate nothing. When rank 0 alone
runs the SSC the payload is the scores and labels (N floats and ints per sample), never the
N x N coefficient matrix: ``coef`` is None in the results received from rank 0.
"""

from __future__ import annotations

import dataclasses

import torch

__all__ = ["check_same_request", "resolve_group", "shared_scores", "tensor_parallel_group"]

_AUTO = "auto"


def tensor_parallel_group(module: torch.nn.Module):
    """The process group of the "tp" dimension of the device mesh that shards ``module``'s
    DTensor parameters (an unnamed 1-D mesh counts as tensor parallel, as transformers'
    legacy TP builds it), or None: no DTensor parameter, or a mesh without a "tp"
    dimension (data parallel or FSDP ranks run different requests)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed support
        return None
    for p in module.parameters():
        if isinstance(p, DTensor):
            mesh = p.device_mesh
            names = mesh.mesh_dim_names
            if names and "tp" in names:
                return mesh["tp"].get_group() if mesh.ndim > 1 else mesh.get_group()
            if not names and mesh.ndim == 1:
                return mesh.get_group()
            return None
    return None


def validate_group_option(value):
    """``"auto"``, None or a ``torch.distributed.ProcessGroup``; raises TypeError otherwise."""
    if value is None or (isinstance(value, str) and value == _AUTO):
        return value
    import torch.distributed as dist

    if dist.is_available() and isinstance(value, dist.ProcessGroup):
        return value
    got = repr(value) if isinstance(value, str) else type(value).__name__
    raise TypeError(
        "process_group: expected 'auto' (the tensor-parallel group of a tp_plan model, else none), "
        f"None (each process scores its own requests) or a torch.distributed.ProcessGroup, got {got}"
    )


def resolve_group(option, language_model: torch.nn.Module):
    """The group the scores are shared over (None: no communication)."""
    if option is None:
        return None
    group = tensor_parallel_group(language_model) if option == _AUTO else option
    if group is None:
        return None
    import torch.distributed as dist

    if not dist.is_initialized():
        raise RuntimeError(
            "videoanchor: a process group was given (or found on the model's DTensor parameters) "
            "but torch.distributed is not initialized"
        )
    if dist.get_world_size(group) == 1:
        return None
    return group


def _source(group) -> int:
    import torch.distributed as dist

    return dist.get_global_rank(group, 0)


def check_same_request(
    group, embeds: torch.Tensor, visual: torch.Tensor, options: dict | None = None
) -> None:
    """All ranks of ``group`` must hold the same request: same (batch, length), same visual
    token positions and (to 1e-4 of their magnitude) the same visual features. Raises the same
    RuntimeError on every rank otherwise. ``options`` (name -> value, compared as text): the
    anchoring options, which must agree too, else the same ValueError on every rank (rank 0
    scores for all, so another rank's options would be silently ignored)."""

    feats = embeds[visual].detach().to(torch.float64)
    mine = (
        tuple(embeds.shape),
        tuple(int(c) for c in visual.sum(dim=1).tolist()),
        int(torch.nonzero(visual).sum()),
        float(feats.sum()),
        float(feats.abs().sum()),
        {k: repr(v) for k, v in (options or {}).items()},
    )
    from videoanchor.anchor.collective import gather_from_every_rank

    seen = gather_from_every_rank(group, mine, what="the anchoring's same-request check")
    ref = seen[0]
    for rank, fp in enumerate(seen):
        for key, value in ref[5].items():
            if fp[5].get(key) != value:
                raise ValueError(
                    f"videoanchor: expected the same {key} on every rank of the anchoring "
                    f"process group, got {key}={value} on rank 0 and {key}={fp[5].get(key)} "
                    f"on rank {rank}; try the same configure(...) call on every rank"
                )
    for rank, fp in enumerate(seen):
        tol = 1e-4 * max(ref[4], 1e-30)
        same = fp[:3] == ref[:3] and abs(fp[3] - ref[3]) <= tol and abs(fp[4] - ref[4]) <= tol
        if not same:
            raise RuntimeError(
                "videoanchor: the ranks of the anchoring process group hold different requests "
                f"(rank 0: shape {ref[0]}, visual tokens per sample {ref[1]}; group rank {rank}: "
                f"shape {fp[0]}, visual tokens per sample {fp[1]}, feature sums {ref[3]:.6g} vs "
                f"{fp[3]:.6g}). Sharing scores needs every rank to run the same request (tensor "
                "parallelism); for data-parallel runs call configure(model, process_group=None)"
            )


def shared_scores(group, compute, device: torch.device, spread=None):
    """The AnchorResult of one sample, the same on every rank of ``group``.

    ``compute(**kw)`` runs ``compute_anchor_scores``; ``spread()`` (asked on rank 0 only)
    says whether the ranks share the work (the fast solver split by columns, or the
    column-blocked exact solver where the dense one does not fit). Then every rank calls
    ``compute(process_group=group)`` and every rank gets the same result. Otherwise rank 0 alone
    runs ``compute()`` and hands its scores, labels and statistics to the other ranks
    (``coef`` None there). If rank 0 fails, every rank raises (rank 0 its own error)
    instead of waiting forever.
    """
    import torch.distributed as dist

    is_source = dist.get_rank(group) == 0
    payload = [None]
    result = error = None
    if is_source:
        try:
            if spread is not None and spread():
                payload[0] = ("spread", None)
            else:
                result = compute()
                payload[0] = (
                    "ok",
                    dataclasses.replace(
                        result, scores=result.scores.cpu(), labels=result.labels.cpu(), coef=None
                    ),
                )
        except Exception as exc:  # sent to the other ranks, then re-raised below
            error = exc
            payload[0] = ("error", f"{type(exc).__name__}: {exc}")
    dist.broadcast_object_list(payload, src=_source(group), group=group)
    status, body = payload[0]
    if error is not None:
        raise error
    if status == "spread":
        return compute(process_group=group)
    if status != "ok":
        raise RuntimeError(f"videoanchor: rank 0 of the anchoring process group failed: {body}")
    if is_source:
        return result
    return dataclasses.replace(body, scores=body.scores.to(device), labels=body.labels.to(device))
