"""Scores per request, gates per step: the logic shared by both of vLLM's model runners, and
the hook into model runner V1.

Both runners (V1 here; V2 in :mod:`.runner_v2`) describe each step as a list of
:class:`Scheduled` requests in the batch order of the attention metadata (the order of the
step's flat tokens, i.e. of ``slot_mapping``), and give a function that returns the encoder
outputs (projector outputs) of some of a request's multimodal items. :func:`fill_step` then,
for each request (its ``SamplingParams.extra_args`` read the first time it is seen):

- the first time its scheduled tokens reach one of its visual items, takes its scores from
  :mod:`.ahead` or the score cache, or runs one joint SSC over the projector outputs of ALL
  its scored items (:func:`.scoring.run_ssc`; an item the scheduler has not encoded yet is
  encoded by the runner's function and not kept) with the options of ``configure()``; the
  scores (0 at text) become gates with :func:`videoanchor.kernels.anchor_gates`, and go to
  the score observers (:func:`.state.add_score_observer`), if any;
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
from collections.abc import Container, Iterable
from dataclasses import dataclass
from types import SimpleNamespace

import torch

from videoanchor.integrations.options import AnchorConfig
from videoanchor.integrations.score_cache import ScoreCache
from videoanchor.integrations.vllm import metrics, state
from videoanchor.integrations.vllm.ahead import AHEAD
from videoanchor.integrations.vllm.config import request_config
from videoanchor.integrations.vllm.patching import wrap_once
from videoanchor.integrations.vllm.scoring import (
    EncoderOutputs,
    Failure,
    ScoringError,
    engine_cfg_of,
    plan,
    projector_only,
    report,
    run_ssc,
    score_cache,
    scored_items,
)

logger = logging.getLogger("videoanchor.vllm")


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
    failed: str | None = None  # why its scores could not be computed (it fails alone)


def _touches(features, start: int, end: int) -> bool:
    return any(
        f.mm_position.offset < end and start < f.mm_position.offset + f.mm_position.length
        for f in features
    )


def _score(req: Scheduled, entry: _Req, encoder_outputs: EncoderOutputs,
           cache: ScoreCache | None = None, ahead=None):  # fmt: skip
    """One joint SSC over the request's scored items: gates of shape (prompt_len,), or
    None (fewer than 3 visual tokens: unanchored). Scores computed ahead of the step
    (``ahead``: the engine's :class:`.ahead.Ahead`) are taken from there; with a ``cache``,
    scores of the same items under the same SSC options are reused: no encoder, no SSC."""
    from videoanchor.kernels import anchor_gates

    cfg = entry.cfg
    p = plan(req.mm_features, cfg, req.req_id)
    if p is None:
        return None
    visual = ahead.take(req.req_id, p.key) if ahead is not None else None
    if isinstance(visual, Failure):
        raise ScoringError(visual.message)
    from_cache = False
    if visual is None and cache is not None:
        visual = cache.get(p.key)
        from_cache = visual is not None
    if visual is None:
        visual = run_ssc(req, cfg, p.items, p.cols, p.n, p.k, encoder_outputs, cache, p.key)
    report(req.req_id, p, from_cache, cache)  # its log line and cache counts
    scores = torch.zeros(entry.prompt_len, dtype=torch.float32)
    scores[torch.cat(p.cols)] = visual
    entry.scores = scores
    return anchor_gates(scores, cfg.alpha_k, cfg.alpha_v)


def _failed(req_id: str, err: Exception) -> str:
    """Records that ``req_id``'s scores could not be computed in its step (:data:`.state.
    FAILED`: the scheduler finishes it with an error) and returns why."""
    why = str(err) if isinstance(err, ScoringError) else (
        f"anchor scores failed: {type(err).__name__}: {err}")  # fmt: skip
    if not isinstance(err, ScoringError):  # a failure ahead was logged where it happened
        if metrics.tp_rank() == 0:  # every rank fails alike: one count per failed request
            metrics.count("videoanchor_failures", where="step")
        logger.error("videoanchor: request %s: scoring it in its step failed (%s: %s); the "
                     "request fails alone, the engine goes on", req_id, type(err).__name__,
                     err)  # fmt: skip
    state.FAILED[req_id] = why
    return why


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
            items = scored_items(req.mm_features, cfg)
            if _touches([req.mm_features[i] for i in items], nc, nc + ns):
                entry.scored = True
                try:
                    entry.gates = _score(req, entry, encoder_outputs, cache, ahead)
                except Exception as err:  # this request fails alone, not the step
                    entry.failed = _failed(req.req_id, err)
                else:
                    state.notify_scores(req.req_id, entry.scores)
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
    state.set_step(owner, torch.cat(kbs) if kbs else None, torch.cat(vss) if vss else None,
                   gated)  # fmt: skip
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
        id(runner), engine_cfg_of(runner), store, batch, runner.requests,
        projector_only(_v1_encoder_outputs(runner), runner.model_config.hf_config),
        cache=score_cache(id(runner), runner.vllm_config.additional_config),
    )  # fmt: skip


def install() -> None:
    """Wraps ``GPUModelRunner._gather_mm_embeddings`` of model runner V1 (once per
    process)."""
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    def make(orig):
        def _gather_mm_embeddings(self, scheduler_output, shift_computed_tokens=0):
            out = orig(self, scheduler_output, shift_computed_tokens)
            if shift_computed_tokens == 0:
                if engine_cfg_of(self) is None:
                    clear_step()
                else:
                    prepare_step(self, scheduler_output)
            return out

        return _gather_mm_embeddings

    wrap_once(GPUModelRunner, "_gather_mm_embeddings", make)

    def make_batch(orig):
        def _batch_mm_inputs_from_scheduler(self, scheduler_output):
            hashes, kwargs, refs = orig(self, scheduler_output)

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

    wrap_once(GPUModelRunner, "_batch_mm_inputs_from_scheduler", make_batch)
    state.RUNNER_HOOKS.add("v1")
    install_failure_handoff()


def _with_failures(out):
    """``out`` (a worker's step output) carrying the step's scoring failures
    (:data:`.state.FAILED`) as its attribute :data:`.state.FAILED_ATTR`: pickled with it to
    the engine core in any process layout, where :func:`.holds.update_failing` finishes those
    requests with an error. An output that carries none is returned untouched."""
    from vllm.v1.outputs import AsyncModelRunnerOutput, ModelRunnerOutput

    if not state.FAILED or out is None:
        return out
    if isinstance(out, ModelRunnerOutput):
        setattr(out, state.FAILED_ATTR, state.take_failed())
    elif isinstance(out, AsyncModelRunnerOutput):
        failed, get = state.take_failed(), out.get_output

        def get_output():
            result = get()
            setattr(result, state.FAILED_ATTR, failed)
            return result

        out.get_output = get_output
    return out


def install_failure_handoff() -> None:
    """Wraps the worker's ``execute_model`` and ``sample_tokens`` (both model runners, any
    executor) so that a step's scoring failures travel with its output (:func:`_with_failures`)."""
    from vllm.v1.worker.gpu_worker import Worker

    def make(orig):
        def wrapped(self, *args, **kwargs):
            return _with_failures(orig(self, *args, **kwargs))

        return wrapped

    wrap_once(Worker, "execute_model", make)
    wrap_once(Worker, "sample_tokens", make)
