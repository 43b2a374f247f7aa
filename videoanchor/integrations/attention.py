"""The ``"videoanchor_triton"`` attention and mask functions, registered with transformers.

The mask function hands the attention function the 2D padding mask (B, L) itself, never an
(Sq, Skv) mask: the kernel takes the padding as ``key_padding_mask`` and the causal structure
as its bottom-right ``causal`` flag. ``L`` is the number of valid cache slots: for a
StaticCache it is shorter than the cache, and the attention function slices K/V to it (a
view). A returned None means "no padding, every cache slot valid".
"""

from __future__ import annotations

import torch

from videoanchor.kernels import anchored_attention

ATTN_IMPLEMENTATION = "videoanchor_triton"

__all__ = ["ATTN_IMPLEMENTATION", "videoanchor_attention_forward", "videoanchor_mask"]

_UNSUPPORTED_KWARGS = ("softcap", "sliding_window", "s_aux", "sinks", "position_bias")


def videoanchor_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset=0,
    kv_offset=0,
    mask_function=None,
    attention_mask: torch.Tensor | None = None,
    device=None,
    **kwargs,
) -> torch.Tensor | None:
    """transformers mask-interface function: returns the (B, L) bool padding mask or None."""
    from transformers import masking_utils

    plain = tuple(
        f
        for f in (
            getattr(masking_utils, "causal_mask_function", None),
            getattr(masking_utils, "bidirectional_mask_function", None),
        )
        if f is not None
    )
    if mask_function is not None and mask_function not in plain:
        name = getattr(mask_function, "__qualname__", repr(mask_function))
        raise NotImplementedError(
            f"attn_implementation={ATTN_IMPLEMENTATION!r} supports plain causal (and bidirectional) "
            f"attention with a 2D padding mask; got the mask pattern {name} (sliding window, chunked, "
            "packed sequences or a model-specific overlay). Use attn_implementation='sdpa' for this model "
            "or these inputs."
        )
    if not isinstance(kv_offset, int) or kv_offset != 0:
        raise NotImplementedError(
            f"attn_implementation={ATTN_IMPLEMENTATION!r}: caches with a key offset (sliding-window "
            f"caches) are not supported, got kv_offset={kv_offset}"
        )
    if attention_mask is None:
        # Only a StaticCache can have fewer filled slots than kv_length here.
        if isinstance(q_offset, torch.Tensor):
            q_offset = int(q_offset)
        valid = q_offset + q_length
        if valid >= kv_length:
            return None
        return torch.ones(batch_size, valid, dtype=torch.bool, device=device)
    if attention_mask.dim() != 2:
        raise ValueError(
            f"attn_implementation={ATTN_IMPLEMENTATION!r}: expected a 2D (batch, keys) padding mask, "
            f"got shape {tuple(attention_mask.shape)}"
        )
    mask = attention_mask.to(dtype=torch.bool)
    if mask.shape[-1] > kv_length:
        mask = mask[:, -kv_length:]
    if mask.shape[-1] == kv_length and bool(mask.all()):
        return None
    return mask


def videoanchor_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention-interface function.

    query: (B, Hq, Sq, D); key, value: (B, Hkv, Skv, D), straight from the cache (unscaled).
    attention_mask: what :func:`videoanchor_mask` returned. Returns ((B, Sq, Hq, D), None).
    Decoder self-attention layers of a configured model get their per-key gates from the
    handle bound to the module; every other module gets plain (exact) attention.
    """
    if dropout:
        raise NotImplementedError(
            f"attn_implementation={ATTN_IMPLEMENTATION!r} has no attention dropout; got dropout={dropout} "
            "(call model.eval(), or set attention_dropout=0)"
        )
    for name in _UNSUPPORTED_KWARGS:
        if kwargs.get(name) is not None:
            raise NotImplementedError(
                f"attn_implementation={ATTN_IMPLEMENTATION!r} does not support `{name}` "
                f"(got {kwargs[name]!r}); use attn_implementation='sdpa' for this model"
            )
    if kwargs.get("output_attentions"):
        raise NotImplementedError(
            f"attn_implementation={ATTN_IMPLEMENTATION!r} never materialises attention weights; "
            "output_attentions=True needs attn_implementation='eager'"
        )
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    handle = getattr(module, "_videoanchor_handle", None)
    if handle is None and causal:
        from videoanchor.integrations.registry import supported_families

        raise RuntimeError(
            f"attn_implementation={ATTN_IMPLEMENTATION!r} reached the causal attention module "
            f"{type(module).__name__} (config model_type {getattr(getattr(module, 'config', None), 'model_type', '?')!r}) "
            "that is not part of a configured VideoAnchor model. Load one of the supported families "
            f"({', '.join(supported_families())}) with from_pretrained(..., attn_implementation="
            f"{ATTN_IMPLEMENTATION!r}), or call videoanchor.configure(model) after "
            "model.set_attn_implementation(...)."
        )

    key_padding_mask = None
    if attention_mask is not None:
        if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2:
            shape = (
                tuple(attention_mask.shape)
                if hasattr(attention_mask, "shape")
                else type(attention_mask)
            )
            raise ValueError(
                f"attn_implementation={ATTN_IMPLEMENTATION!r}: expected a 2D (batch, keys) padding mask "
                f"(what videoanchor's mask function makes), got {shape}; custom 4D masks are not "
                "supported (no (Sq, Skv) masks here), pass a 2D attention_mask instead"
            )
        skv = key.shape[2]
        valid = attention_mask.shape[-1]
        if valid > skv:
            attention_mask = attention_mask[:, -skv:]
        elif valid < skv:
            # StaticCache: only the first `valid` slots are filled; the queries are its last ones.
            key = key[:, :, :valid]
            value = value[:, :, :valid]
        if valid < query.shape[2]:
            raise ValueError(
                f"attention mask covers {valid} keys but there are {query.shape[2]} queries; "
                "expected a mask over past + current tokens"
            )
        key_padding_mask = attention_mask
        if key_padding_mask.dtype != torch.bool:
            key_padding_mask = key_padding_mask.to(torch.bool)

    key_bias = value_scale = None
    backend = "auto"
    if handle is not None:
        key_bias, value_scale = handle._gates_for(query, key)
        backend = handle.config.attention_backend
    out = anchored_attention(
        query,
        key,
        value,
        key_bias,
        value_scale,
        causal=bool(causal),
        sm_scale=scaling,
        key_padding_mask=key_padding_mask,
        backend=backend,
    )
    return out.transpose(1, 2).contiguous(), None
