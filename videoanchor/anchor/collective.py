"""Collectives over a ``torch.distributed`` process group, for the solvers that spread one
request's SSC over ranks (:mod:`videoanchor.anchor.solvers.blocked`, the fast solver split by
columns), the ranks' agreement on one call's input (:func:`agree_across_ranks`) and the
integrations that spread a request over ranks (the public face: nothing outside ``anchor``
imports its private modules). Every function here is collective: every rank must call it,
in the same order.
"""

from __future__ import annotations

import threading
import warnings

import numpy as np
import torch

__all__ = [
    "AGREE_WARN_AFTER",
    "agree_across_ranks",
    "all_agree",
    "all_gather_columns",
    "all_sum",
    "any_rank",
    "broadcast_from_first",
    "OTHER_RANK_FAILED",
    "column_range",
    "comm_device",
    "gather_from_every_rank",
    "computed_on_first",
    "raise_together",
    "share_features",
]


def _group(process_group):
    """``(group, rank, world_size)``; ``(None, 0, 1)`` without a process group."""
    if process_group is None:
        return None, 0, 1
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError(
            "process_group: torch.distributed is not initialised; call "
            "torch.distributed.init_process_group(...) first (or pass process_group=None)"
        )
    if not isinstance(process_group, dist.ProcessGroup):
        raise TypeError(
            f"process_group: expected a torch.distributed.ProcessGroup (e.g. "
            f"torch.distributed.group.WORLD), got {type(process_group).__name__}"
        )
    return process_group, dist.get_rank(process_group), dist.get_world_size(process_group)


def comm_device(group, device: torch.device) -> torch.device:
    """The device collectives of ``group`` run on: CUDA for NCCL, the CPU otherwise."""
    import torch.distributed as dist

    if "nccl" in str(dist.get_backend(group)).lower():
        if device.type == "cuda":
            return device
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


#: what a rank raises when another rank of its group failed (:func:`raise_together`)
OTHER_RANK_FAILED = (
    "videoanchor: another rank of the process group failed (see its error); every rank stops"
)


def any_rank(flags, group, device: torch.device) -> list[bool]:
    """Collective, one all-reduce: each of ``flags`` true on any rank of ``group``."""
    import torch.distributed as dist

    t = torch.tensor([1 if f else 0 for f in flags], device=comm_device(group, device))
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return [bool(v) for v in t.tolist()]


def raise_together(group, error: BaseException | None, device: torch.device) -> None:
    """Collective: raise on every rank of ``group`` when any rank hit ``error`` (the failing
    rank its own error, the others a ``RuntimeError``), so that no rank is left waiting in a
    later collective. ``group=None``: raise ``error``."""
    if group is None:
        if error is not None:
            raise error
        return
    import torch.distributed as dist

    flag = torch.tensor([0 if error is None else 1], device=comm_device(group, device))
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
    if error is not None:
        raise error
    if int(flag) != 0:
        raise RuntimeError(OTHER_RANK_FAILED)


def share_features(x: torch.Tensor, group) -> torch.Tensor:
    """Rank 0's ``x`` on every rank of ``group``; every rank must pass a matrix of the same
    shape and dtype (else a ``ValueError`` on every rank: the check is collective)."""
    import torch.distributed as dist

    dev = comm_device(group, x.device)
    codes = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2, torch.float64: 3}
    mine = torch.tensor([x.shape[0], x.shape[1], codes.get(x.dtype, 9)], device=dev)
    world = dist.get_world_size(group)
    every = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(every, mine, group=group)
    shapes = [tuple(int(v) for v in t.tolist()) for t in every]
    if any(s != shapes[0] for s in shapes):
        raise ValueError(
            "process_group: every rank must pass the same features; got (N, D, dtype code) "
            f"= {shapes} per rank"
        )
    buf = x.to(dev).contiguous()
    dist.broadcast(buf, src=dist.get_global_rank(group, 0), group=group)
    return buf.to(x.device)


def _all_gather_rows(t: torch.Tensor, group, dev: torch.device) -> list[torch.Tensor]:
    """All-gather tensors whose first dimension differs between ranks."""
    import torch.distributed as dist

    world = dist.get_world_size(group)
    size = torch.tensor([t.shape[0]], device=dev)
    sizes = [torch.empty_like(size) for _ in range(world)]
    dist.all_gather(sizes, size, group=group)
    sizes = [int(s) for s in sizes]
    top = max(sizes)
    pad = torch.zeros((top,) + tuple(t.shape[1:]), dtype=t.dtype, device=dev)
    pad[: t.shape[0]] = t.to(dev)
    out = [torch.empty_like(pad) for _ in range(world)]
    dist.all_gather(out, pad, group=group)
    return [o[:s].to(t.device) for o, s in zip(out, sizes, strict=True)]


def all_gather_columns(t: torch.Tensor, group) -> torch.Tensor:
    """Every rank's columns of ``t`` side by side, in rank order (contiguous; the number of
    columns may differ between ranks)."""
    dev = comm_device(group, t.device)
    return torch.cat(_all_gather_rows(t.T.contiguous(), group, dev)).T.contiguous()


def column_range(n: int, rank: int, world: int) -> tuple[int, int]:
    """Rank ``rank``'s contiguous share ``start:stop`` of ``n`` columns split over ``world``
    ranks (sizes differ by at most one; a rank may get none when ``world > n``)."""
    return n * rank // world, n * (rank + 1) // world


def all_sum(t: torch.Tensor, group) -> torch.Tensor:
    """The sum of ``t`` over the ranks of ``group`` (a new tensor on ``t``'s device)."""
    import torch.distributed as dist

    buf = t.to(comm_device(group, t.device), copy=True)
    dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=group)
    return buf.to(t.device)


def all_agree(flag: bool, group, device: torch.device, *, every: bool = True) -> bool:
    """``flag`` on every rank (``every=True``) or on any rank (``every=False``): the same
    answer on every rank of ``group``."""
    import torch.distributed as dist

    t = torch.tensor([1 if flag else 0], device=comm_device(group, device))
    dist.all_reduce(t, op=dist.ReduceOp.MIN if every else dist.ReduceOp.MAX, group=group)
    return bool(int(t) != 0)


def broadcast_from_first(t: torch.Tensor, group) -> torch.Tensor:
    """Rank 0's ``t`` on every rank (every rank passes a tensor of the same shape and dtype)."""
    import torch.distributed as dist

    buf = t.to(comm_device(group, t.device)).contiguous()
    dist.broadcast(buf, src=dist.get_global_rank(group, 0), group=group)
    return buf.to(t.device)


def computed_on_first(compute, shapes, dtype: torch.dtype, device: torch.device, group):
    """``compute()`` (a tuple of tensors of ``shapes`` and ``dtype``) run on rank 0 only,
    its result broadcast to every rank. If it fails on rank 0, every rank raises
    (:func:`raise_together`) instead of waiting for the broadcast."""
    import torch.distributed as dist

    got, error = None, None
    if dist.get_rank(group) == 0:
        try:
            got = tuple(compute())
        except Exception as exc:  # re-raised on every rank below
            error = exc
    raise_together(group, error, device)
    if got is None:
        got = tuple(torch.empty(s, dtype=dtype, device=device) for s in shapes)
    return tuple(broadcast_from_first(t, group) for t in got)


# ---- ranks of a process group: one collective, the same outcome everywhere ----------------


def _canonical(value) -> str:
    """A text form of an option that is equal on two ranks exactly when the option is."""
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return repr(int(value))
    if isinstance(value, (float, np.floating)):
        return repr(float(value))
    return repr(value)


#: seconds a rank waits in an agreement check before it warns that a rank may be missing
AGREE_WARN_AFTER = 60.0


def gather_from_every_rank(group, obj, *, what: str) -> list:
    """``all_gather_object`` of ``obj`` over ``group`` that explains a missing rank (one that
    passes ``process_group=None`` or skips the call, leaving the others waiting until the
    backend's timeout or its "Connection closed by peer"): a warning after
    ``AGREE_WARN_AFTER`` seconds of waiting, and a failed collective is a RuntimeError saying
    what every rank was expected to do."""
    import torch.distributed as dist

    me = dist.get_rank(group)
    hint = (
        "expected every rank of the process group to make the same call with this "
        "process_group; a rank that passes process_group=None (or does not make the call) "
        "runs alone and leaves the others waiting here"
    )
    timer = threading.Timer(
        AGREE_WARN_AFTER,
        lambda: warnings.warn(
            f"process_group: rank {me} has waited {AGREE_WARN_AFTER:g} s for the other ranks "
            f"to reach {what}; {hint}",
            RuntimeWarning,
            stacklevel=1,
        ),
    )
    timer.daemon = True
    timer.start()
    seen: list = [None] * dist.get_world_size(group)
    try:
        dist.all_gather_object(seen, obj, group=group)
    except RuntimeError as exc:  # DistBackendError too: a peer gone, or the backend timeout
        raise RuntimeError(
            f"process_group: {what} across the ranks failed on rank {me} "
            f"({type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0]}); {hint}"
        ) from exc
    finally:
        timer.cancel()
    return seen


def agree_across_ranks(group, options: dict, error: BaseException | None) -> None:
    """One collective over ``group``, reached by every rank before any may raise, so that
    every rank raises the same error or none does: the lowest rank's own rejected input or
    options (``error``; the others raise its type and message, naming the rank), else a
    ValueError naming the first of ``options`` (compared as text) that differs between ranks.
    """
    import torch.distributed as dist

    mine = (
        {k: _canonical(v) for k, v in options.items()},
        None if error is None else (type(error).__name__, str(error)),
    )
    seen = gather_from_every_rank(group, mine, what="the SSC's agreement check")
    for rank, (_, err) in enumerate(seen):
        if err is None:
            continue
        if error is not None and rank == dist.get_rank(group):
            raise error
        kind = {"TypeError": TypeError, "ValueError": ValueError}.get(err[0], RuntimeError)
        raise kind(f"{err[1]} (raised on rank {rank} of the process group; every rank stops)")
    ref = seen[0][0]
    for rank, (opts, _) in enumerate(seen[1:], start=1):
        for key in ref:
            if opts.get(key) != ref[key]:
                raise ValueError(
                    f"process_group: expected the same {key} on every rank, got {key}="
                    f"{ref[key]} on rank 0 and {key}={opts.get(key)} on rank {rank}; try "
                    "passing identical arguments on every rank"
                )
