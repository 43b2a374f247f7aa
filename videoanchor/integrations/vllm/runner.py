"""Scores per request, gates per step: the logic shared by both of vLLM's model runners, and
the hook into model runner V1.

Both runners (V1 here; V2 in :mod:`.runner_v2`) describe each step as a list of
:class:`Scheduled` requests in the batch order of the attention metadata (the order of the
step's flat tokens, i.e. of ``slot_mapping``), and give a function that returns the encoder
outputs (projector outputs) of some of a request's multimodal items. :func:`fill_step` then,
for each request (its ``SamplingParams.extra_args`` read the first time it is seen):

- the first time its scheduled tokens reach one of its visual items, runs one joint SSC over
  the projector outputs of ALL its scored items (an item the scheduler has not encoded yet is
  encoded by the runner's function and not kept), with
  :func:`videoanchor.anchor.compute_anchor_scores` and the options of ``configure()``; the
  scores (0 at text) become gates with :func:`videoanchor.kernels.anchor_gates`;
- puts the gates of its scheduled positions into :data:`.state.STEP` (generated tokens get
  neutral gates), and which of its queries read gates ("prefill": its prompt queries, as
  the paper; "all": every query).

V1: ``GPUModelRunner._gather_mm_embeddings`` (``vllm/v1/worker/gpu_model_runner.py``; the CPU
runner inherits it) runs once per step, after the step's encoder outputs are in the runner's
encoder cache; the wrapper reads ``runner.input_batch.req_ids`` (batch order),
``runner.requests`` (num_computed_tokens, prompt, mm_features, sampling params) and the
scheduler output's ``num_scheduled_tokens``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Container, Iterable
from dataclasses import dataclass
from types import SimpleNamespace

import torch

from videoanchor.integrations.options import AnchorConfig, clusters_for, ssc_kwargs
from videoanchor.integrations.score_cache import ScoreCache, score_key
from videoanchor.integrations.vllm import state
from videoanchor.integrations.vllm.config import engine_config, request_config, score_cache_bytes

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
    from videoanchor.integrations.vllm.families import projector_columns

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


@dataclass
class Scheduled:
    """One request of a step, as a runner sees it (a list of these is in batch order).

    ``num_computed``: its tokens already in the KV cache; ``num_scheduled``: its tokens in
    this step (its share of the flat token order); ``prompt_len``: its prompt's length;
    ``mm_features``: its ``MultiModalFeatureSpec`` list (``modality``, ``identifier``,
    ``mm_position`` with ``offset``, ``length``, ``is_embed``); ``extra_args``: its
    ``SamplingParams.extra_args`` (read only the first time the request is seen)."""

    req_id: str
    num_computed: int
    num_scheduled: int
    prompt_len: int
    mm_features: list
    extra_args: dict | None


@dataclass
class _Req:
    cfg: AnchorConfig | None
    prompt_len: int
    gates: tuple[torch.Tensor, torch.Tensor] | None = None  # (prompt_len,) each
    scored: bool = False
    scores: torch.Tensor | None = None


def _scored_items(mm_features, cfg: AnchorConfig) -> list[int]:
    """Indices into ``mm_features`` of the items SSC scores, in prompt order."""
    idx = [i for i, f in enumerate(mm_features) if f.modality in cfg.tokens]
    return sorted(idx, key=lambda i: mm_features[i].mm_position.offset)


def _touches(features, start: int, end: int) -> bool:
    return any(
        f.mm_position.offset < end and start < f.mm_position.offset + f.mm_position.length
        for f in features
    )


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
    items = _scored_items(mm_features, cfg)
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


def _score(req: Scheduled, entry: _Req, encoder_outputs: EncoderOutputs,
           cache: ScoreCache | None = None, ahead=None):  # fmt: skip
    """One joint SSC over the request's scored items: gates of shape (prompt_len,), or
    None (fewer than 3 visual tokens: unanchored). Scores computed ahead of the step
    (``ahead``: the engine's :class:`.ahead.Ahead`) are taken from there; with a ``cache``,
    scores of the same items under the same SSC options are reused: no encoder, no SSC."""
    from videoanchor.kernels import anchor_gates

    cfg = entry.cfg
    p = plan(req.mm_features, cfg)
    if p is None:
        return None
    visual = ahead.take(req.req_id, p.key) if ahead is not None else None
    if visual is None and cache is not None:
        visual = cache.get(p.key)
        lookups = cache.stats["scores_hits"] + cache.stats["scores_misses"]
        if lookups % 100 == 0:
            logger.info("videoanchor: %s", cache.summary())
    if visual is None:
        visual = _run_ssc(req, cfg, p.items, p.cols, p.n, p.k, encoder_outputs, cache, p.key)
    scores = torch.zeros(entry.prompt_len, dtype=torch.float32)
    scores[torch.cat(p.cols)] = visual
    entry.scores = scores
    return anchor_gates(scores, cfg.alpha_k, cfg.alpha_v)


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


def _run_ssc(req, cfg, items, cols, n, k, encoder_outputs, cache, key,
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


def request_gates(req: Scheduled, entry: _Req, encoder_outputs: EncoderOutputs,
                  cache: ScoreCache | None = None, ahead=None):  # fmt: skip
    """The request's gates for its scheduled tokens, and how many of its queries read them.

    Returns ``(key_bias, value_scale, gated)``: two (num_scheduled,) float32 tensors
    (neutral 0 / 1 past the prompt and for unanchored requests) and the number of its first
    scheduled queries that read gates: its prompt queries ("prefill", as the paper; a
    preempted request's recompute also holds generated tokens, whose queries do not), all
    ("all"), or none (unanchored). Scores the request the first time its scheduled tokens
    reach one of its scored items."""
    nc, ns = req.num_computed, req.num_scheduled
    kb = torch.zeros(ns, dtype=torch.float32)
    vs = torch.ones(ns, dtype=torch.float32)
    cfg = entry.cfg
    if cfg is not None:
        if not entry.scored:
            items = _scored_items(req.mm_features, cfg)
            if _touches([req.mm_features[i] for i in items], nc, nc + ns):
                entry.gates = _score(req, entry, encoder_outputs, cache, ahead)
                entry.scored = True
        hi = min(nc + ns, entry.prompt_len)
        if entry.gates is not None and hi > nc:
            kb[: hi - nc] = entry.gates[0][nc:hi]
            vs[: hi - nc] = entry.gates[1][nc:hi]
    # A request whose blocks came from the prefix cache reads the gates stored with them.
    if cfg is None:
        gated = 0
    elif cfg.decode == "all":
        gated = ns
    else:
        gated = max(0, min(ns, entry.prompt_len - nc))
    return kb, vs, gated


def fill_step(
    owner: int,
    eng: AnchorConfig,
    store: dict,
    batch: Iterable[Scheduled],
    live: Container[str] | None,
    encoder_outputs: EncoderOutputs,
    num_tokens: int = 0,
    num_seqs: int = 0,
    cache: ScoreCache | None = None,
) -> None:
    """Fills :data:`.state.STEP` for one step of an anchored engine (both runners).

    ``owner``: the engine's key (the runner's id); ``eng``: its engine options; ``store``:
    the runner's per-request entries (kept between steps; entries whose id is not in
    ``live`` are dropped, unless ``live`` is None: the caller drops them); ``batch``: the step's requests in batch order; ``num_tokens`` /
    ``num_seqs``: the step's padded token / sequence counts where the runner pads (the
    padding gets neutral gates and unanchored flags); ``cache``: the engine's
    :class:`~videoanchor.integrations.score_cache.ScoreCache` (:func:`score_cache`)."""
    from videoanchor.integrations.vllm.ahead import AHEAD

    ahead = AHEAD.get(owner)
    if live is not None:
        done = [r for r in store if r not in live]
        for rid in done:
            del store[rid]
        if ahead is not None and done:
            ahead.forget(done)
    kbs, vss, gated = [], [], []
    for req in batch:
        entry = store.get(req.req_id)
        if entry is None:
            cfg = request_config(eng, req.extra_args)
            entry = store[req.req_id] = _Req(cfg=cfg, prompt_len=req.prompt_len)
        kb, vs, n = request_gates(req, entry, encoder_outputs, cache, ahead)
        kbs.append(kb)
        vss.append(vs)
        gated.append(n)
    pad = num_tokens - sum(k.numel() for k in kbs)
    if pad > 0:
        kbs.append(torch.zeros(pad, dtype=torch.float32))
        vss.append(torch.ones(pad, dtype=torch.float32))
    gated += [0] * max(0, num_seqs - len(gated))
    st = state.STEP
    st.owner = owner
    st.step += 1
    st.key_bias = torch.cat(kbs) if kbs else None
    st.value_scale = torch.cat(vss) if vss else None
    st.seq_anchored = [n > 0 for n in gated]
    st.seq_gated_queries = gated
    # CUDA backend: into its persistent device buffers (a no-op where it made none).
    state.publish()


def clear_step() -> None:
    st = state.STEP
    st.owner = None
    st.key_bias = st.value_scale = None
    st.seq_anchored = []
    st.seq_gated_queries = []
    st.step += 1


# --- model runner V1 -------------------------------------------------------------------


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


def _engine_cfg(runner):
    cached = runner.__dict__.get("_videoanchor_cfg", False)
    if cached is False:
        cached = engine_config(runner.vllm_config.additional_config)
        runner.__dict__["_videoanchor_cfg"] = cached
    return cached


def _v1_encoder_outputs(runner) -> EncoderOutputs:
    def encoder_outputs(req_id: str, indices: list[int]) -> list:
        features = runner.requests[req_id].mm_features
        missing = [
            i for i in indices if runner._get_encoder_output_from_cache(features[i].identifier)
            is None
        ]  # fmt: skip
        added = []
        if missing:
            before = set(runner.encoder_cache)
            runner._execute_mm_encoder(
                SimpleNamespace(
                    scheduled_encoder_inputs={req_id: missing},
                    ec_manager_metadata=None,
                    free_encoder_mm_hashes=[],
                )
            )
            added = [h for h in runner.encoder_cache if h not in before]
        outs = [runner._get_encoder_output_from_cache(features[i].identifier) for i in indices]
        for h in added:  # not the scheduler's: dropped again
            runner.encoder_cache.pop(h, None)
        for i, enc in zip(indices, outs, strict=True):
            if enc is None:
                raise RuntimeError(
                    f"videoanchor: no encoder output for the {features[i].modality} item "
                    f"{features[i].identifier!r} of request {req_id!r}"
                )
        return outs

    return encoder_outputs


def prepare_step(runner, scheduler_output) -> None:
    """Fills :data:`.state.STEP` for this step of a V1 ``runner`` (an anchored engine)."""
    batch = []
    for req_id in runner.input_batch.req_ids:
        rs = runner.requests[req_id]
        params = rs.sampling_params
        batch.append(
            Scheduled(
                req_id=req_id,
                num_computed=rs.num_computed_tokens,
                num_scheduled=scheduler_output.num_scheduled_tokens[req_id],
                prompt_len=len(rs.prompt_token_ids or []),
                mm_features=rs.mm_features,
                extra_args=params.extra_args if params is not None else None,
            )
        )
    store = runner.__dict__.setdefault("_videoanchor_requests", {})
    fill_step(
        id(runner), _engine_cfg(runner), store, batch, runner.requests,
        projector_only(_v1_encoder_outputs(runner), runner.model_config.hf_config),
        cache=score_cache(id(runner), runner.vllm_config.additional_config),
    )  # fmt: skip


def install() -> None:
    """Wraps ``GPUModelRunner._gather_mm_embeddings`` of model runner V1 (once per
    process)."""
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    from videoanchor.integrations.vllm.hooks import _once

    def make(orig):
        def _gather_mm_embeddings(self, scheduler_output, shift_computed_tokens=0):
            out = orig(self, scheduler_output, shift_computed_tokens)
            if shift_computed_tokens == 0:
                if _engine_cfg(self) is None:
                    clear_step()
                else:
                    prepare_step(self, scheduler_output)
            return out

        return _gather_mm_embeddings

    _once(GPUModelRunner, "_gather_mm_embeddings", make)

    def make_batch(orig):
        def _batch_mm_inputs_from_scheduler(self, scheduler_output):
            hashes, kwargs, refs = orig(self, scheduler_output)
            from videoanchor.integrations.vllm.ahead import AHEAD

            # (not under LoRA: the step may run a tower adapter the encoding ahead did not)
            ahead = AHEAD.get(id(self)) if hashes and not self.lora_config else None
            if ahead is None:
                return hashes, kwargs, refs
            # items encoded ahead (for their SSC) go into the encoder cache as they are
            keep = []
            for i, mm_hash in enumerate(hashes):
                out = ahead.encoded_output(mm_hash)
                if out is None:
                    keep.append(i)
                else:
                    self._cache_encoder_output(mm_hash, out, scheduler_output.ec_manager_metadata,
                                               scheduler_output.free_encoder_mm_hashes)  # fmt: skip
            return [hashes[i] for i in keep], [kwargs[i] for i in keep], [refs[i] for i in keep]

        return _batch_mm_inputs_from_scheduler

    _once(GPUModelRunner, "_batch_mm_inputs_from_scheduler", make_batch)
    state.RUNNER_HOOKS.add("v1")
