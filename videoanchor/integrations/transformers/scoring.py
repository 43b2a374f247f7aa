"""The anchor scores of one prefill, and the gates they make.

Called by the language model's pre-hook (:mod:`.hooks`) on a forward with visual inputs:
:func:`score_prefill` finds the scored visual positions of each row (:func:`visual_masks`),
runs one SSC per sample (per row, or per sequence of a padding-free row) through the
engine-neutral step (:func:`videoanchor.integrations.request_scores.score_request`), from the
handle's anchor cache or shared over a tensor-parallel group where there is one, keeps what
it computed on the handle (``last_*``) and returns the request's gates
(:func:`.gates.gates_from_scores`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import partial

import torch

from videoanchor.integrations.options import AnchorConfig, fast_splits, ssc_plan
from videoanchor.integrations.request_scores import score_request, stored_run
from videoanchor.integrations.transformers.attention import current_tokens_of_slot_mask
from videoanchor.integrations.transformers.distributed import (
    check_same_request,
    resolve_group,
    shared_scores,
)
from videoanchor.integrations.transformers.gates import RequestGates, gates_from_scores
from videoanchor.integrations.transformers.registry import segments_for_batch

__all__ = ["ForwardInputs", "score_prefill", "visual_masks"]

#: Where a user of this integration raises ``max_iter`` (the not-converged warning says it).
MAX_ITER_SETTING = "configure's max_iter"


@dataclass
class ForwardInputs:
    """What the base-model pre-hook saw, consumed by the language-model pre-hook."""

    input_ids: torch.Tensor | None
    attention_mask: torch.Tensor | None
    visual_mask_from_embeds: dict[str, torch.Tensor] | None
    has_visual_inputs: bool
    cache: object
    layout_kwargs: dict


def score_prefill(
    handle, inputs: ForwardInputs, embeds: torch.Tensor, packed: torch.Tensor | None = None
) -> RequestGates | None:
    """Scores the prefill whose language model receives ``embeds`` (B, S, hidden) under the
    handle's options (and ``handle.row_settings``), keeps the outcome on the handle
    (``last_scores``, ``last_result``, ``last_ssc_runs``, ``last_visual_positions``,
    ``last_segments``) and returns the request's gates, or None when no sample had enough
    visual tokens (unanchored). ``packed``: the (B, S) ids of the sequences packed in each
    row of a padding-free batch (each is scored on its own), or None."""
    cfg = handle.config
    B, S = embeds.shape[:2]
    masks = visual_masks(handle, inputs, embeds)
    any_mask = torch.zeros(B, S, dtype=torch.bool, device=embeds.device)
    for m in masks.values():
        any_mask |= m
    group = _checked_group(handle, embeds, any_mask)
    rows = handle.row_settings
    if rows is not None and len(rows) != B:
        raise ValueError(
            f"videoanchor: per_row got {len(rows)} settings but the batch has {B} rows; "
            "expected one setting per row"
        )
    samples = _samples(any_mask, packed)
    scores = torch.zeros(B, S, dtype=torch.float32, device=embeds.device)
    results: list = []
    runs: list = []
    positions: list[torch.Tensor] = []
    seen: list[tuple[int, torch.Tensor, object, object]] = []  # identical samples: one SSC
    for b, cols in samples:
        positions.append(cols.cpu())
        res = run = None
        if _enough_tokens(handle, cols.numel()):
            want = cfg.n_clusters if rows is None else rows[b].n_clusters
            label = f"sample {b}" if len(samples) > 1 else None
            res, run = _score_sample(handle, cfg, embeds[b, cols], want, group, seen, label)
            scores[b, cols] = res.scores.to(device=scores.device, dtype=torch.float32)
        results.append(res)
        runs.append(run)
    if inputs.input_ids is not None:
        segments = segments_for_batch(
            handle.family, handle.model.config, inputs.layout_kwargs, inputs.input_ids, masks
        )
    else:
        segments = [[] for _ in range(B)]
    handle._remember(scores, results, runs, positions, segments)
    if all(r is None for r in results):
        handle._warn_once(
            "no-visual-tokens",
            f"videoanchor: no {'/'.join(cfg.tokens)} placeholder tokens with enough tokens in this "
            "prompt; it runs unanchored (plain attention)",
        )
        return None
    return gates_from_scores(
        scores,
        cfg,
        rows,
        packed=packed is not None,
        cache=inputs.cache,
        # (a model in training mode keeps its own buffers per request: reentrant gradient
        # checkpointing runs the first forward without gradients, then replays it)
        pool=None if handle.model.training else handle._gate_pool,
    )


def visual_masks(handle, inputs: ForwardInputs, embeds: torch.Tensor) -> dict[str, torch.Tensor]:
    """``{kind: (B, S) bool}``: the positions of the scored placeholder tokens of each kind
    (``config.tokens``) in the prompt, padding excluded."""
    B, S = embeds.shape[:2]
    if inputs.visual_mask_from_embeds is not None:
        masks = dict(inputs.visual_mask_from_embeds)
    else:
        ids = inputs.input_ids
        if ids is None or tuple(ids.shape) != (B, S):
            raise RuntimeError(
                f"videoanchor: expected input_ids of shape {(B, S)} with the visual inputs, got "
                f"{None if ids is None else tuple(ids.shape)}"
            )
        token_ids = handle.family.token_ids(handle.model.config, handle.config.tokens)
        masks = {kind: ids.to(embeds.device) == tid for kind, tid in token_ids.items()}
    am = inputs.attention_mask
    if am is not None and am.dtype == torch.int8:
        am = current_tokens_of_slot_mask(am, S)  # generate's mask over a static cache
    if am is not None and am.shape[0] == B and am.shape[-1] >= S:
        valid = am[:, -S:].to(device=embeds.device, dtype=torch.bool)
        masks = {k: m & valid for k, m in masks.items()}
    return masks


def _checked_group(handle, embeds: torch.Tensor, any_mask: torch.Tensor):
    """The process group whose ranks share this request's scores (None: this process
    scores alone), after checking that every rank holds the same request and options."""
    cfg = handle.config
    group = resolve_group(
        cfg.process_group, getattr(handle.model, handle.family.language_model_attr)
    )
    if group is not None:
        options = {
            f.name: getattr(cfg, f.name)
            for f in dataclasses.fields(cfg)
            if f.name not in ("process_group", "attention_backend")
        }
        check_same_request(group, embeds, any_mask, options=options)
    return group


def _samples(any_mask: torch.Tensor, packed: torch.Tensor | None) -> list:
    """``[(row, prompt columns of its scored tokens)]``, one per sample: SSC runs per row, or
    per sequence of a padding-free (packed) row."""
    units = [(b, any_mask[b]) for b in range(any_mask.shape[0])]
    if packed is not None:
        packed = packed.to(any_mask.device)
        units = [
            (b, any_mask[b] & (packed[b] == g))
            for b in range(any_mask.shape[0])
            for g in torch.unique(packed[b]).tolist()
        ]
    return [(b, torch.nonzero(unit).flatten()) for b, unit in units]


def _enough_tokens(handle, n: int) -> bool:
    """Whether a sample with ``n`` scored visual tokens gets an SSC (at least 3; a sample
    with 1 or 2 is warned about, once)."""
    if n == 0:
        return False
    if n < 3:
        handle._warn_once(
            "tiny",
            f"videoanchor: a sample has only {n} visual tokens; SSC needs at least 3, so its "
            "scores are 0 (unanchored)",
        )
        return False
    return True


def _score_sample(handle, cfg: AnchorConfig, feats, want: int, group, seen: list, label):
    """``(AnchorResult, SSCRunSummary or None)`` of one sample's visual features ``feats``
    (n, hidden) with ``want`` clusters (lowered to n, with a warning): those of an identical
    sample of this prefill in ``seen``, else from :func:`score_request`, added to ``seen``.
    ``label``: how the progress and the not-converged warning name the sample."""
    from videoanchor.anchor.progress import SSCProgress

    n = feats.shape[0]
    k = min(want, n)
    for kk, f, res, run in seen:
        if kk == k and f.shape == feats.shape and torch.equal(f, feats):
            return res, run
    reporter = SSCProgress(
        enabled=cfg.ssc_progress, time_budget=cfg.ssc_time_budget,
        desc="SSC" if label is None else f"SSC {label}",
    )  # fmt: skip
    if k < want:
        handle._warn_once(
            "clusters",
            f"videoanchor: a sample has {n} visual tokens, fewer than n_clusters="
            f"{want}; using n_clusters={k} for it",
        )
    res, run = score_request(
        feats, k, cfg, progress=reporter, subject=label, max_iter_setting=MAX_ITER_SETTING,
        solve=partial(_solve, handle.cache, cfg, group, feats, k, reporter),
    )  # fmt: skip
    if run is None and group is None:
        # Taken from the anchor cache: no SSC ran now; the stored result says how that run
        # ended, so an unconverged C is still reported as such.
        run = stored_run(res, cfg, n)
    seen.append((k, feats, res, run))
    return res, run


def _solve(cache, cfg: AnchorConfig, group, feats, k: int, reporter, compute):
    """One sample's AnchorResult: ``compute()`` (the SSC call, ``compute(process_group=...)``
    to share it), through the ranks of ``group`` (they all get the same result,
    :func:`.distributed.shared_scores`), else from the handle's anchor ``cache`` where the
    dense exact solver runs and no time budget is set (a budget-stopped C depends on
    timing: never cached)."""
    if group is not None:
        spread = partial(_spread_over_ranks, cfg, feats, reporter)
        return shared_scores(group, compute, feats.device, spread=spread)
    if (
        cache is not None
        and cfg.ssc_time_budget is None
        and not _runs_blocked(cfg, feats, reporter)
    ):
        return cache.anchor_result(feats, k, cfg, progress=reporter)
    return compute()


def _spread_over_ranks(cfg: AnchorConfig, feats, reporter) -> bool:
    """Whether the ranks share one sample's SSC: the fast solver split by columns, or the
    blocked mode."""
    return fast_splits(cfg) or _runs_blocked(cfg, feats, reporter)


def _runs_blocked(cfg: AnchorConfig, feats, reporter) -> bool:
    """Whether the SSC of ``feats`` runs in blocked mode (``ssc_mode``'s; "auto": the plan's)."""
    from videoanchor.anchor.plan import SSCMemoryError

    try:
        plan = ssc_plan(cfg, *feats.shape, feats.device, reporter)
    except SSCMemoryError:  # (the SSC call raises it with the full message)
        return False
    return plan.mode == "blocked"
