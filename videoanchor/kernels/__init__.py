"""Anchored attention kernels. This subpackage never imports transformers."""

from videoanchor.kernels.gates import (
    PreparedGates,
    anchor_gates,
    prepare_gates,
    value_scale_range_of,
)
from videoanchor.kernels.interface import (
    anchored_attention,
    anchored_attention_varlen,
    reset_warnings,
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
