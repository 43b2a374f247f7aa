"""The hooks a configured model runs, and how a request flows through them (no change to the
user's code):

1. A forward pre-hook on the base VLM model (the module owning ``language_model``) records
   ``input_ids``, the 2D attention mask, the cache object and whether visual inputs
   (``pixel_values``, ``pixel_values_videos``, ...) came with this call.
2. A forward pre-hook on the language model receives ``inputs_embeds`` after transformers
   scattered the projector output into the placeholder positions. On a call with visual
   inputs (a prefill) it runs SSC once per sample on the embeddings at the visual positions,
   builds the (batch, prompt) scores (0 elsewhere) and the gates
   ``key_bias = log(1 + alpha_k s)``, ``value_scale = 1 + alpha_v s`` (:mod:`.scoring`).
3. Every decoder self-attention module carries a reference to the handle. The request of
   the forward rides along as a forward kwarg down to the attention function, which asks the
   handle for its gates on its own device (:meth:`.handle.AnchorHandle.gates_for`: one copy
   per device per request, views afterwards: no host sync per layer). A layer recomputed
   under gradient checkpointing replays its kwargs, so it sees the gates of its own forward.
4. Decode steps (later calls with the same cache object) are unanchored with
   ``decode="prefill"`` (the authors' code) or keep the prompt's gates, padded with
   neutral gates for generated tokens, with ``decode="all"``.

The KV cache only ever holds the unscaled K and V: the gates enter inside the kernel.
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping

import torch

from videoanchor.anchor.solvers import precompile
from videoanchor.integrations.transformers.attention import ATTN_IMPLEMENTATION, REQUEST_KWARG
from videoanchor.integrations.transformers.gates import RequestGates
from videoanchor.integrations.transformers.scoring import ForwardInputs, score_prefill

__all__ = ["ModelHooks", "install", "keep_vision_on_sdpa"]

# What the base model's forward passes on that places the visual tokens in the prompt.
_LAYOUT_KWARGS = ("video_grid_thw", "image_grid_thw", "pixel_values_videos", "mm_encoder_outputs")


def install(handle, base: torch.nn.Module) -> None:
    """Installs ``handle``'s hooks on the base VLM ``base`` and its language model, and marks
    the language model's decoder self-attention modules as anchored by ``handle``."""
    lm = getattr(base, handle.family.language_model_attr)
    hooks = ModelHooks(handle)
    handle._hooks = [
        base.register_forward_pre_hook(hooks.on_base_forward, with_kwargs=True),
        lm.register_forward_pre_hook(hooks.on_lm_forward, with_kwargs=True),
        lm.register_forward_hook(hooks.on_lm_output, with_kwargs=True),
    ]
    n = 0
    for m in lm.modules():
        if _is_decoder_self_attention(m):
            m._videoanchor_handle = handle
            n += 1
    if n == 0:
        raise RuntimeError(
            f"videoanchor: found no decoder self-attention modules in {type(lm).__name__}"
        )
    keep_vision_on_sdpa(handle)
    # the SSC kernel compiled in the background while the model loads, where Numba's cache is
    # empty (issue 93; once per process, none with VIDEOANCHOR_PRECOMPILE=0)
    precompile.start("transformers")


def keep_vision_on_sdpa(handle) -> None:
    """The vision tower of ``handle``'s model attends with SDPA where it was set to ours
    (it has no causal, anchored attention)."""
    vc = getattr(handle.model.config, handle.family.vision_config_attr, None)
    if vc is not None and getattr(vc, "_attn_implementation", None) == ATTN_IMPLEMENTATION:
        vc._attn_implementation_internal = "sdpa"


class ModelHooks:
    """The three forward hooks of one configured model (see the module docstring). They set
    the handle's request of the running forward (``_current``) and of the last anchored
    prefill (``_request``)."""

    def __init__(self, handle):
        self.handle = handle
        self.inputs: ForwardInputs | None = None  # the base pre-hook's, for the LM pre-hook

    def on_base_forward(self, module, args, kwargs):
        """Base model pre-hook: records what the language model's pre-hook needs."""
        handle = self.handle
        self.inputs = None
        handle._current = None
        if not handle._active():
            return None
        input_ids = kwargs.get("input_ids")
        if (
            input_ids is None
            and args
            and torch.is_tensor(args[0])
            and not args[0].is_floating_point()
        ):
            input_ids = args[0]
        has_visual = any(_given(kwargs.get(n)) for n in handle.family.visual_input_kwargs)
        from_embeds = None
        if input_ids is None and has_visual and kwargs.get("inputs_embeds") is not None:
            from_embeds = self._placeholder_mask_from_embeds(module, kwargs["inputs_embeds"])
        mask = kwargs.get("attention_mask")
        self.inputs = ForwardInputs(
            input_ids=input_ids,
            attention_mask=mask if torch.is_tensor(mask) and mask.dim() == 2 else None,
            visual_mask_from_embeds=from_embeds,
            has_visual_inputs=has_visual,
            cache=_cache_of(kwargs),
            layout_kwargs={k: kwargs.get(k) for k in _LAYOUT_KWARGS},
        )
        return None

    def on_lm_forward(self, module, args, kwargs):
        """Language model pre-hook: the request of this forward (scored on a prefill), handed
        to the attention calls as a forward kwarg."""
        handle = self.handle
        handle._current = None  # (stays None should the scoring raise)
        handle._current = self._request_of(module, kwargs)
        if handle._text_config()._attn_implementation != ATTN_IMPLEMENTATION:
            return None  # another attention implementation gets no extra kwarg
        # The request rides along as a forward kwarg down to the attention calls: a layer
        # recomputed under gradient checkpointing replays its kwargs, so it gets the gates of
        # its own forward even after this forward ended (or another one started).
        return args, {**kwargs, REQUEST_KWARG: handle._current}

    def on_lm_output(self, module, args, kwargs, output):
        """Language model hook: the cache a prefill made names its decode steps."""
        request = self.handle._request
        if request is not None and request.cache_ref is None:
            cache = _cache_of(output) if isinstance(output, Mapping) else None
            if cache is None:
                cache = _cache_of(kwargs)
            if cache is not None:
                request.cache_ref = weakref.ref(cache)
        self.handle._current = None
        return None

    def _request_of(self, module, kwargs) -> RequestGates | None:
        """The gates of this language-model forward: the last request's on its decode steps
        (``decode="all"``; None with ``"prefill"``), a new request's on a prefill with visual
        inputs, None on one without (the handle's ``last_*`` then describe it)."""
        inputs, self.inputs = self.inputs, None
        if inputs is None:
            return None
        handle = self.handle
        if self._continues_request(inputs):
            return handle._request if handle.config.decode == "all" else None
        handle._request = None
        embeds = kwargs.get("inputs_embeds")
        if not inputs.has_visual_inputs or embeds is None:
            handle.last_anchored = False
            handle._remember_unscored(embeds if embeds is not None else inputs.input_ids)
            handle._warn_once(
                "no-visual",
                "videoanchor: this request has no visual inputs; it runs unanchored (plain attention)",
            )
            return None
        with torch.no_grad():
            packed = _sequence_ids_from_positions(module, kwargs, embeds.shape[0])
            request = score_prefill(handle, inputs, embeds, packed)
        handle._request = request
        handle.last_anchored = request is not None
        return request

    def _continues_request(self, inputs: ForwardInputs) -> bool:
        """Whether this forward is a decode step of the last anchored request: the same
        cache object, and no new visual placeholders among its tokens."""
        handle = self.handle
        request = handle._request
        cache = inputs.cache
        continuation = (
            request is not None
            and cache is not None
            and request.cache_ref is not None
            and request.cache_ref() is cache
        )
        if continuation and inputs.has_visual_inputs and inputs.input_ids is not None:
            # Visual inputs re-sent with a decode step: a new prefill only if the new tokens
            # hold placeholders (a multi-turn continuation), else still a decode step.
            ids = handle.family.token_ids(handle.model.config, handle.config.tokens)
            ref = torch.tensor(list(ids.values()), device=inputs.input_ids.device)
            inputs.has_visual_inputs = bool(torch.isin(inputs.input_ids, ref).any())
        return continuation and not inputs.has_visual_inputs

    def _placeholder_mask_from_embeds(self, module, embeds):
        handle = self.handle
        ids = handle.family.token_ids(handle.model.config, handle.config.tokens)
        emb = module.get_input_embeddings()
        out = {}
        for kind, tid in ids.items():
            ref = emb(torch.tensor(tid, device=embeds.device))
            out[kind] = (embeds == ref).all(-1)
        return out


def _given(value) -> bool:
    """A visual input counts when it is not None and not an empty container."""
    if value is None:
        return False
    if isinstance(value, (dict, list, tuple)):
        return len(value) > 0
    return True


def _cache_of(kwargs: Mapping) -> object | None:
    """The KV cache a forward was given (or a model output holds): transformers 5.24 renamed
    ``past_key_values`` to ``cache`` (the old name still works there, with a deprecation
    warning); earlier 5.x releases know only ``past_key_values``."""
    cache = kwargs.get("cache")
    if cache is None and "past_key_values" in kwargs.keys():
        cache = kwargs.get("past_key_values")
    return cache


def _sequence_ids_from_positions(
    lm: torch.nn.Module, lm_kwargs: dict, batch: int
) -> torch.Tensor | None:
    """(B, S) ids of the sequences packed in each row (padding-free batches), decided from the
    language model's forward kwargs as transformers' mask builder will: position_ids that
    restart, no 2D mask and no cache (the language model makes one when use_cache resolves to
    True); None for any other batch. Qwen-VL models carry the text positions as row 0 of a
    (4, B, S) position_ids. The attention function checks that its mask agrees
    (:meth:`.gates.RequestGates.check_packed`)."""
    from transformers.masking_utils import find_packed_sequence_indices

    use_cache = lm_kwargs.get("use_cache")
    if use_cache is None:
        use_cache = getattr(lm.config, "use_cache", False)
    if getattr(lm, "gradient_checkpointing", False) and lm.training:
        use_cache = False
    if use_cache or _cache_of(lm_kwargs) is not None:
        return None
    if lm_kwargs.get("attention_mask") is not None:
        return None
    pos = lm_kwargs.get("position_ids")
    if torch.is_tensor(pos) and pos.dim() == 3 and pos.shape[0] == 4:
        pos = pos[0]
    if not torch.is_tensor(pos) or pos.dim() != 2:
        return None
    return find_packed_sequence_indices(pos.expand(batch, -1))


def _is_decoder_self_attention(m: torch.nn.Module) -> bool:
    return (
        type(m).__name__.endswith("Attention")
        and hasattr(m, "layer_idx")
        and getattr(m, "is_causal", False)
        and hasattr(m, "config")
    )
