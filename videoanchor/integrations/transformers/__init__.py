"""transformers integration: ``attn_implementation="videoanchor_triton"`` and :func:`configure`.

The only subpackage that knows model families (see :mod:`videoanchor.integrations.transformers.registry`).
:func:`register` runs on ``import videoanchor``: it registers the attention and mask
functions with transformers and makes every base VLM model loaded with that name install its
VideoAnchor hooks at construction time (a wrapper around ``PreTrainedModel.post_init``), so
that ``from_pretrained(..., attn_implementation="videoanchor_triton")`` is the only change a
user needs.
"""

from __future__ import annotations

from videoanchor.integrations.transformers.anchoring import (
    AnchorConfig,
    AnchorHandle,
    configure,
    find_handle,
)
from videoanchor.integrations.transformers.attention import (
    ATTN_IMPLEMENTATION,
    videoanchor_attention_forward,
    videoanchor_mask,
)
from videoanchor.integrations.transformers.registry import (
    FAMILIES,
    FamilySpec,
    VisualSegment,
    get_family,
    supported_families,
)

__all__ = [
    "ATTN_IMPLEMENTATION",
    "AnchorConfig",
    "AnchorHandle",
    "FAMILIES",
    "FamilySpec",
    "VisualSegment",
    "configure",
    "find_handle",
    "get_family",
    "register",
    "supported_families",
    "videoanchor_attention_forward",
    "videoanchor_mask",
]

_registered = False


def register() -> None:
    """Register ``"videoanchor_triton"`` with transformers (idempotent)."""
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface, PreTrainedModel
    from transformers.masking_utils import AttentionMaskInterface

    from videoanchor.integrations.transformers.anchoring import maybe_install

    AttentionInterface.register(ATTN_IMPLEMENTATION, videoanchor_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, videoanchor_mask)

    original = PreTrainedModel.post_init
    if not getattr(original, "_videoanchor_wrapped", False):

        def post_init(self, *args, **kwargs):
            out = original(self, *args, **kwargs)
            maybe_install(self)
            return out

        post_init._videoanchor_wrapped = True
        post_init.__wrapped__ = original
        post_init.__doc__ = original.__doc__
        PreTrainedModel.post_init = post_init
    _registered = True
