"""Anchored attention kernels. This subpackage never imports transformers."""

from videoanchor.kernels.interface import (
    anchor_gates,
    anchored_attention,
    anchored_attention_varlen,
    value_scale_range_of,
)

__all__ = [
    "anchored_attention",
    "anchored_attention_varlen",
    "anchor_gates",
    "value_scale_range_of",
]
