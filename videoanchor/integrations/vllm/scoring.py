"""One request's anchor scores: what its SSC runs over, the SSC itself and the engine's score
cache. Both of vLLM's model runners (:mod:`.runner`, :mod:`.runner_v2`) score a request in
the step that first reaches its visual tokens, and :mod:`.ahead` scores it beside the steps;
all three run the same :func:`plan` and :func:`run_ssc`, so the scores are the same
wherever they were computed."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from videoanchor.integrations.options import AnchorConfig, clusters_for, ssc_kwargs
from videoanchor.integrations.score_cache import ScoreCache, score_key
from videoanchor.integrations.vllm.config import engine_config, score_cache_bytes
from videoanchor.integrations.vllm.families import projector_columns

logger = logging.getLogger("videoanchor.vllm")
_warned: set[str] = set()

#: ``encoder_outputs(req_id, indices)``: the encoder outputs of the request's items
#: ``mm_features[i]`` for i in ``indices`` (one tensor per item, rows = its embedding
#: positions), encoding the ones not in the runner's encoder cache without keeping them.
EncoderOutputs = Callable[[str, list[int]], list]


def projector_only(encoder_outputs: EncoderOutputs, hf_config) -> EncoderOutputs:
    """``encoder_outputs`` keeping only the projector output columns of each item, for a
    family whose vLLM encoder output also carries other features (Qwen3-VL's deepstack,
    :func:`.families.projector_columns`); ``encoder_outputs`` itself for the others.
    ``hf_config``: the engine's ``model_config.hf_config``."""
    cols = projector_columns(hf_config)
    if cols is None:
        return encoder_outputs
    levels = len(getattr(hf_config.vision_config, "deepstack_visual_indexes", None) or [])
    width = cols * (1 + levels)

    def sliced(req_id: str, indices: list[int]) -> list:
        outs = encoder_outputs(req_id, indices)
        for enc in outs:
            if not torch.is_tensor(enc) or enc.ndim != 2 or enc.shape[-1] != width:
                raise RuntimeError(
                    f"videoanchor: expected {hf_config.model_type} encoder outputs of "
                    f"{width} columns ({cols} projector + {levels} deepstack x {cols}), got "
                    f"shape {tuple(getattr(enc, 'shape', ()))}; this model's multimodal "
                    "outputs are not supported (multimodal pruning on?)"
                )
        return [enc[:, :cols] for enc in outs]

    return sliced


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        logger.warning(message)


def scored_items(mm_features, cfg: AnchorConfig) -> list[int]:
    """Indices into ``mm_features`` of the items SSC scores, in prompt order."""
    idx = [i for i, f in enumerate(mm_features) if f.modality in cfg.tokens]
    return sorted(idx, key=lambda i: mm_features[i].mm_position.offset)


def _positions(feature) -> torch.Tensor:
    """The prompt positions of one item's embeddings."""
    pos = feature.mm_position
    idx = pos.offset + torch.arange(pos.length)
    return idx if pos.is_embed is None else idx[pos.is_embed.cpu()]


@dataclass
class Plan:
    """What one request's joint SSC runs over: its scored ``items`` (indices into
    ``mm_features``, prompt order), their embedding positions ``cols``, ``n`` visual tokens,
    the cluster count ``k`` and the score cache ``key``."""

    items: list[int]
    cols: list[torch.Tensor]
    n: int
    k: int
    key: str


def plan(mm_features, cfg: AnchorConfig) -> Plan | None:
    """The :class:`Plan` of a request with items ``mm_features`` under ``cfg``, or None
    (fewer than 3 visual tokens: unanchored, with a warning once)."""
    items = scored_items(mm_features, cfg)
    cols = [_positions(mm_features[i]) for i in items]
    n = sum(c.numel() for c in cols)
    if n < 3:
        _warn_once(
            "tiny",
            f"videoanchor: a request has only {n} visual tokens; SSC needs at least 3, so its "
            "scores are 0 (unanchored)",
        )
        return None
    k = clusters_for(n, cfg)
    if k < cfg.n_clusters:
        _warn_once(
            "clusters",
            f"videoanchor: a request has {n} visual tokens, fewer than n_clusters="
            f"{cfg.n_clusters}; using n_clusters={k} for it",
        )
    key = score_key([mm_features[i].identifier for i in items], k, cfg)
    return Plan(items, cols, n, k, key)


def check_outputs(req, items, cols, outs) -> None:
    """Raises RuntimeError unless ``outs`` holds one encoder output per scored item, with
    as many rows as the item has embedding positions (``cols``)."""
    for i, enc, idx in zip(items, outs, cols, strict=True):
        if not torch.is_tensor(enc) or enc.shape[0] != idx.numel():
            raise RuntimeError(
                f"videoanchor: the {req.mm_features[i].modality} item of request "
                f"{req.req_id!r} has {idx.numel()} embedding positions but its encoder output "
                f"has shape {tuple(getattr(enc, 'shape', ()))}; this model's multimodal "
                "outputs are not supported"
            )


def run_ssc(req, cfg, items, cols, n, k, encoder_outputs, cache, key,
             group=None) -> torch.Tensor:  # fmt: skip
    """SSC over the encoder outputs of the request's scored ``items``: (n,) float32 scores
    on the CPU, stored in ``cache`` unless the time budget stopped it (its C depends on the
    timing then). ``group``: a process group whose ranks all call this at once with the same
    features; the SSC's columns are split over them (every rank gets the same scores)."""
    from videoanchor.anchor import compute_anchor_scores
    from videoanchor.anchor.progress import SSCProgress

    outs = encoder_outputs(req.req_id, items)
    check_outputs(req, items, cols, outs)
    feats = torch.cat(outs)
    # The engine's ssc_time_budget bounds the time one request's SSC holds the step. No
    # progress lines (their advice names the CLI's flags): the outcome is logged below.
    reporter = SSCProgress(enabled=False, time_budget=cfg.ssc_time_budget)
    res = compute_anchor_scores(feats, k, **ssc_kwargs(cfg), progress=reporter,
                                process_group=group)  # fmt: skip
    budget = bool(reporter.runs and reporter.runs[-1].stopped_by_budget) and not res.converged
    if group is not None:  # one rank's budget stopped every rank: none of them caches it
        from videoanchor.anchor.collective import all_agree

        budget = all_agree(budget, group, feats.device, every=False)
    if not res.converged:
        # The time budget is the operator's alarm: every time. A max_iter the operator set
        # low on purpose would say the same for every request: once, then at DEBUG.
        level = logging.WARNING if budget or "max_iter" not in _warned else logging.DEBUG
        _warned.add("max_iter")
        logger.log(
            level,
            "videoanchor: request %s: SSC over %d visual tokens stopped %s after %d "
            "iterations at residual %.3g (eps %.3g): NOT converged, its scores come from the "
            "iterate reached; %s",
            req.req_id, n,
            f"by ssc_time_budget={cfg.ssc_time_budget} s" if budget else
            f"at max_iter={cfg.max_iter}",
            res.iterations, res.residual, cfg.eps,
            "raise additional_config['videoanchor']['ssc_time_budget']" if budget else
            "raise additional_config['videoanchor']['max_iter'] (and request_limits) or the "
            "request's videoanchor_max_iter",
        )  # fmt: skip
    visual = res.scores.detach().to("cpu", torch.float32)
    if cache is not None and not budget:
        cache.put(key, visual)
    return visual


#: owner (the runner's id) -> its engine's ScoreCache.
SCORE_CACHES: dict[int, ScoreCache] = {}


def score_cache(owner: int, additional_config) -> ScoreCache | None:
    """The :class:`ScoreCache` of the engine whose runner is ``owner`` (made on first use,
    ``score_cache_mb`` of its ``additional_config["videoanchor"]``), or None when it is 0."""
    cache = SCORE_CACHES.get(owner)
    if cache is None:
        size = score_cache_bytes(additional_config)
        if not size:
            return None
        cache = SCORE_CACHES[owner] = ScoreCache(size)
    return cache


def engine_cfg_of(runner):
    """The engine options of ``runner``'s engine (None: not anchored), read once per runner."""
    cached = runner.__dict__.get("_videoanchor_cfg", False)
    if cached is False:
        cached = engine_config(runner.vllm_config.additional_config)
        runner.__dict__["_videoanchor_cfg"] = cached
    return cached
