"""Anchored attention kernels. This subpackage never imports transformers."""

from videoanchor.kernels.interface import (
    PreparedGates,
    anchor_gates,
    anchored_attention,
    anchored_attention_varlen,
    prepare_gates,
    reset_warnings,
    value_scale_range_of,
)

__all__ = [
    "anchored_attention",
    "anchored_attention_varlen",
    "anchor_gates",
    "prepare_gates",
    "PreparedGates",
    "reset_warnings",
    "value_scale_range_of",
]
