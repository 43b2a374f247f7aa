"""Scores per request, gates per step: a wrapper around vLLM's model runner.

``GPUModelRunner._gather_mm_embeddings`` (the CPU runner inherits it) runs once per step,
after the step's encoder outputs are in the runner's encoder cache and in the batch order
of the attention metadata. After it, for each running request (its
``SamplingParams.extra_args`` are visible here, in ``runner.requests``):

- the first time its scheduled tokens reach one of its visual items, one joint SSC runs over
  the projector outputs of ALL its scored items (an item not encoded yet is encoded here),
  with :func:`videoanchor.anchor.compute_anchor_scores` and the options of ``configure()``;
  the scores (0 at text) become gates with :func:`videoanchor.kernels.anchor_gates`;
- the gates of its scheduled positions go into :data:`.state.STEP` (generated tokens get
  neutral gates), and whether its queries read gates ("prefill": prompt tokens only, as
  the paper; "all": every step).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from types import SimpleNamespace

import torch

from videoanchor.integrations.options import AnchorConfig, clusters_for, ssc_kwargs
from videoanchor.integrations.vllm import state
from videoanchor.integrations.vllm.config import engine_config, request_config

logger = logging.getLogger("videoanchor.vllm")
_warned: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        logger.warning(message)


@dataclass
class _Req:
    cfg: AnchorConfig | None
    prompt_len: int
    gates: tuple[torch.Tensor, torch.Tensor] | None = None  # (prompt_len,) each
    scored: bool = False
    scores: torch.Tensor | None = None


def _engine_cfg(runner):
    cached = runner.__dict__.get("_videoanchor_cfg", False)
    if cached is False:
        cached = engine_config(runner.vllm_config.additional_config)
        runner.__dict__["_videoanchor_cfg"] = cached
    return cached


def _scored_features(req_state, cfg: AnchorConfig):
    feats = [f for f in req_state.mm_features if f.modality in cfg.tokens]
    return sorted(feats, key=lambda f: f.mm_position.offset)


def _touches(features, start: int, end: int) -> bool:
    return any(
        f.mm_position.offset < end and start < f.mm_position.offset + f.mm_position.length
        for f in features
    )


def _encoder_outputs(runner, req_id, req_state, features):
    """Projector outputs of ``features``, encoding the ones the scheduler has not run yet
    (a later item of a chunked prompt); what is encoded here is dropped again after."""
    missing = [
        req_state.mm_features.index(f)
        for f in features
        if runner._get_encoder_output_from_cache(f.identifier) is None
    ]
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
    outs = []
    for f in features:
        enc = runner._get_encoder_output_from_cache(f.identifier)
        if enc is None:
            raise RuntimeError(
                f"videoanchor: no encoder output for the {f.modality} item {f.identifier!r} "
                f"of request {req_id!r}"
            )
        outs.append(enc)
    return outs, added


def _score(runner, req_id, req_state, entry: _Req):
    from videoanchor.anchor import compute_anchor_scores
    from videoanchor.kernels import anchor_gates

    cfg = entry.cfg
    features = _scored_features(req_state, cfg)
    outs, added = _encoder_outputs(runner, req_id, req_state, features)
    feats, cols = [], []
    for f, enc in zip(features, outs, strict=True):
        pos = f.mm_position
        idx = pos.offset + torch.arange(pos.length)
        if pos.is_embed is not None:
            idx = idx[pos.is_embed.cpu()]
        if not torch.is_tensor(enc) or enc.shape[0] != idx.numel():
            raise RuntimeError(
                f"videoanchor: the {f.modality} item of request {req_id!r} has "
                f"{idx.numel()} embedding positions but its encoder output has shape "
                f"{tuple(getattr(enc, 'shape', ()))}; this model's multimodal outputs are not "
                "supported"
            )
        feats.append(enc)
        cols.append(idx)
    for h in added:
        runner.encoder_cache.pop(h, None)
    n = sum(c.numel() for c in cols)
    if n < 3:
        _warn_once(
            "tiny",
            f"videoanchor: a request has only {n} visual tokens; SSC needs at least 3, so its "
            "scores are 0 (unanchored)",
        )
        return None
    feats = torch.cat(feats)
    cols = torch.cat(cols)
    k = clusters_for(n, cfg)
    if k < cfg.n_clusters:
        _warn_once(
            "clusters",
            f"videoanchor: a request has {n} visual tokens, fewer than n_clusters="
            f"{cfg.n_clusters}; using n_clusters={k} for it",
        )
    res = compute_anchor_scores(feats, k, **ssc_kwargs(cfg))
    scores = torch.zeros(entry.prompt_len, dtype=torch.float32)
    scores[cols] = res.scores.detach().to("cpu", torch.float32)
    entry.scores = scores
    return anchor_gates(scores, cfg.alpha_k, cfg.alpha_v)


def prepare_step(runner, scheduler_output) -> None:
    """Fills :data:`.state.STEP` for this step of ``runner`` (an anchored engine)."""
    eng = _engine_cfg(runner)
    store = runner.__dict__.setdefault("_videoanchor_requests", {})
    for rid in [r for r in store if r not in runner.requests]:
        del store[rid]
    kbs, vss, flags = [], [], []
    for req_id in runner.input_batch.req_ids:
        ns = scheduler_output.num_scheduled_tokens[req_id]
        rs = runner.requests[req_id]
        nc = rs.num_computed_tokens
        entry = store.get(req_id)
        if entry is None:
            params = rs.sampling_params
            cfg = request_config(eng, params.extra_args if params is not None else None)
            entry = store[req_id] = _Req(cfg=cfg, prompt_len=len(rs.prompt_token_ids or []))
        kb = torch.zeros(ns, dtype=torch.float32)
        vs = torch.ones(ns, dtype=torch.float32)
        cfg = entry.cfg
        if cfg is not None:
            if not entry.scored and _touches(_scored_features(rs, cfg), nc, nc + ns):
                entry.gates = _score(runner, req_id, rs, entry)
                entry.scored = True
            hi = min(nc + ns, entry.prompt_len)
            if entry.gates is not None and hi > nc:
                kb[: hi - nc] = entry.gates[0][nc:hi]
                vs[: hi - nc] = entry.gates[1][nc:hi]
        # Gates are read by prompt queries ("prefill"), or always ("all"). A request whose
        # blocks came from the prefix cache reads the gates stored with them.
        flags.append(cfg is not None and (cfg.decode == "all" or nc < entry.prompt_len))
        kbs.append(kb)
        vss.append(vs)
    st = state.STEP
    st.owner = id(runner)
    st.step += 1
    st.key_bias = torch.cat(kbs) if kbs else None
    st.value_scale = torch.cat(vss) if vss else None
    st.seq_anchored = flags
    # CUDA backend: into its persistent device buffers (a no-op where it made none).
    state.publish()


def clear_step() -> None:
    st = state.STEP
    st.owner = None
    st.key_bias = st.value_scale = None
    st.seq_anchored = []
    st.step += 1


def install() -> None:
    """Wraps ``GPUModelRunner._gather_mm_embeddings`` (once per process)."""
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    orig = GPUModelRunner._gather_mm_embeddings
    if getattr(orig, "_videoanchor", False):
        return

    def _gather_mm_embeddings(self, scheduler_output, shift_computed_tokens=0):
        out = orig(self, scheduler_output, shift_computed_tokens)
        if shift_computed_tokens == 0:
            if _engine_cfg(self) is None:
                clear_step()
            else:
                prepare_step(self, scheduler_output)
        return out

    _gather_mm_embeddings._videoanchor = True
    GPUModelRunner._gather_mm_embeddings = _gather_mm_embeddings
    state.RUNNER_HOOKS.add("v1")
