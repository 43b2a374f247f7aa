"""The hook into vLLM's model runner V2 (``vllm/v1/worker/gpu/``; CUDA's default in 0.32.0,
``VLLM_USE_V2_MODEL_RUNNER=1`` elsewhere; the CPU runner V2 subclasses it).

V2 keeps no per-request ``SamplingParams`` in the worker and gathers multimodal embeddings in
its model state, so the hook sits there. After ``GPUModelRunner.load_model`` of an anchored
engine, the runner's ``model_state`` (whatever its class) gets two instance wrappers:

- ``add_request(req_index, new_req_data)``: records the request's
  ``SamplingParams.extra_args`` (``new_req_data.sampling_params``);
- ``prepare_inputs_embeds(scheduled_encoder_inputs, input_batch, req_states)``: runs once per
  step of the first pipeline rank, after the step's encoder outputs are in
  ``model_state.encoder_cache.encoder_outputs`` (by ``mm_hash``) and the step's
  :class:`~vllm.v1.worker.gpu.input_batch.InputBatch` is built. ``input_batch.req_ids`` is the
  batch order of the attention metadata, ``input_batch.query_start_loc_np`` the step's flat
  token order (``slot_mapping``'s), ``input_batch.num_computed_tokens_np`` each request's
  computed tokens, ``req_states.prompt_len`` its prompt length and
  ``encoder_cache.mm_features[req_id]`` its items. The wrapper hands these to the logic both
  runners share, :func:`.runner.fill_step`.

An item the scheduler has not encoded yet (a later item of a chunked prompt) is encoded with
the model state's ``encoder_runner`` and not put into the encoder cache. On an engine without
``additional_config["videoanchor"]`` nothing is wrapped.
"""

from __future__ import annotations

import numpy as np

from videoanchor.integrations.vllm import state
from videoanchor.integrations.vllm.ahead import AHEAD
from videoanchor.integrations.vllm.config import engine_config
from videoanchor.integrations.vllm.patching import wrap_once
from videoanchor.integrations.vllm.runner import Scheduled, fill_step
from videoanchor.integrations.vllm.scoring import projector_only, score_cache


class _Hook:
    """One anchored V2 engine's per-request data (on its model state)."""

    def __init__(self, runner, eng):
        self.owner = id(runner)
        self.eng = eng
        self.extra_args: dict[str, dict | None] = {}
        self.store: dict = {}
        self.hf_config = runner.vllm_config.model_config.hf_config
        self.additional_config = runner.vllm_config.additional_config


def batch_of(input_batch, req_states, mm_features, extra_args) -> list[Scheduled]:
    """The step's requests in batch order, from V2's ``InputBatch`` / ``RequestState``.

    ``mm_features``: req_id -> its ``MultiModalFeatureSpec`` list (the encoder cache's);
    ``extra_args``: req_id -> its ``SamplingParams.extra_args``."""
    n = input_batch.num_reqs
    counts = np.diff(np.asarray(input_batch.query_start_loc_np[: n + 1]))
    out = []
    for i, req_id in enumerate(input_batch.req_ids[:n]):
        idx = req_states.req_id_to_index[req_id]
        out.append(
            Scheduled(
                req_id=req_id,
                num_computed=int(input_batch.num_computed_tokens_np[i]),
                num_scheduled=int(counts[i]),
                prompt_len=int(req_states.prompt_len.np[idx]),
                mm_features=mm_features.get(req_id, []),
                extra_args=extra_args.get(req_id),
            )
        )
    return out


def encoder_outputs_of(model_state):
    """:data:`.scoring.EncoderOutputs` for a V2 model state: cached outputs by ``mm_hash``;
    missing items encoded with its ``encoder_runner`` (not cached)."""
    cache = model_state.encoder_cache
    encoder = model_state.encoder_runner

    def encoder_outputs(req_id: str, indices: list[int]) -> list:
        features = cache.mm_features[req_id]
        outs = {i: cache.encoder_outputs.get(features[i].identifier) for i in indices}
        missing = [i for i, o in outs.items() if o is None]
        if missing:
            hashes, kwargs = encoder.prepare_mm_inputs({req_id: missing})
            new = dict(zip(hashes, encoder.execute_mm_encoder(kwargs), strict=True))
            for i in missing:
                outs[i] = new.get(features[i].identifier)
        for i in indices:
            if outs[i] is None:
                raise RuntimeError(
                    f"videoanchor: no encoder output for the {features[i].modality} item "
                    f"{features[i].identifier!r} of request {req_id!r}"
                )
        return [outs[i] for i in indices]

    return encoder_outputs


def prepare_step(model_state, hook: _Hook, input_batch, req_states) -> None:
    """Fills :data:`.state.STEP` for this step of an anchored V2 engine."""
    batch = batch_of(input_batch, req_states, model_state.encoder_cache.mm_features,
                     hook.extra_args)  # fmt: skip
    fill_step(
        hook.owner, hook.eng, hook.store, batch, None,
        projector_only(encoder_outputs_of(model_state), hook.hf_config),
        num_tokens=input_batch.num_tokens_after_padding,
        num_seqs=input_batch.num_reqs_after_padding,
        cache=score_cache(hook.owner, hook.additional_config),
    )  # fmt: skip


def reuse_encoded(runner, cache, scheduled_encoder_inputs) -> None:
    """Items the step would encode that were encoded ahead (for their SSC): their outputs go
    into the encoder cache first, so the model state's encoder skips them
    (``EncoderRunner.prepare_mm_inputs`` leaves out what the cache holds)."""
    ahead = AHEAD.get(id(runner))
    if ahead is None or not scheduled_encoder_inputs or getattr(runner, "lora_config", None):
        return  # (under LoRA the step may run a tower adapter the encoding ahead did not)
    for req_id, indices in scheduled_encoder_inputs.items():
        features = cache.mm_features.get(req_id) or []
        for i in indices:
            if i >= len(features) or features[i].data is None:
                continue
            ident = features[i].identifier
            if ident not in cache.encoder_outputs:
                out = ahead.encoded_output(ident)
                if out is not None:
                    cache.encoder_outputs[ident] = out


def attach(runner) -> None:
    """Wraps ``runner.model_state``'s ``add_request`` and ``prepare_inputs_embeds`` and
    ``runner.finish_requests`` (an anchored engine with multimodal inputs; otherwise
    nothing).

    V2 forgets a preempted request and gets it again as a new one when it resumes; its
    scores are kept until it finishes (as V1, which keeps preempted requests' states), so a
    resumed request is not scored again."""
    eng = engine_config(runner.vllm_config.additional_config)
    ms = getattr(runner, "model_state", None)
    if eng is None or ms is None or getattr(ms, "encoder_runner", None) is None:
        return
    if getattr(ms, "mm_pruner", None) is not None:
        raise NotImplementedError(
            "additional_config['videoanchor']: expected a model without multimodal pruning "
            "(EVS), got one with it enabled; start the engine without "
            "additional_config['videoanchor'] or without video_pruning_rate"
        )
    if "_videoanchor" in ms.__dict__:
        return
    hook = ms.__dict__["_videoanchor"] = _Hook(runner, eng)
    add_request, prepare_embeds = ms.add_request, ms.prepare_inputs_embeds
    finish_requests = type(runner).finish_requests.__get__(runner)  # not a previous wrapper

    def add_request_hooked(req_index, new_req_data):
        add_request(req_index, new_req_data)
        rid, params = new_req_data.req_id, new_req_data.sampling_params
        hook.extra_args[rid] = params.extra_args if params is not None else None
        entry = hook.store.get(rid)
        if entry is not None and entry.prompt_len != new_req_data.prompt_len:
            del hook.store[rid]  # a streaming-input update: a new prompt

    def finish_requests_hooked(scheduler_output):
        finish_requests(scheduler_output)
        for rid in scheduler_output.finished_req_ids:
            hook.store.pop(rid, None)
            hook.extra_args.pop(rid, None)

    def prepare_inputs_embeds_hooked(scheduled_encoder_inputs, input_batch, req_states):
        reuse_encoded(runner, ms.encoder_cache, scheduled_encoder_inputs)
        out = prepare_embeds(scheduled_encoder_inputs, input_batch, req_states)
        prepare_step(ms, hook, input_batch, req_states)
        return out

    ms.add_request = add_request_hooked
    ms.prepare_inputs_embeds = prepare_inputs_embeds_hooked
    runner.finish_requests = finish_requests_hooked


def install() -> None:
    """Wraps model runner V2's ``GPUModelRunner.load_model`` (once per process)."""
    from vllm.v1.worker.gpu.model_runner import GPUModelRunner

    def make(orig):
        def load_model(self, *args, **kwargs):
            out = orig(self, *args, **kwargs)
            attach(self)
            return out

        return load_model

    wrap_once(GPUModelRunner, "load_model", make)
    state.RUNNER_HOOKS.add("v2")
