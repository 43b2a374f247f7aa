"""Anchored attention kernels. This subpackage never imports transformers."""

from videoanchor.kernels.interface import (
    anchor_gates,
    anchored_attention,
    anchored_attention_varlen,
)

__all__ = ["anchored_attention", "anchored_attention_varlen", "anchor_gates"]
