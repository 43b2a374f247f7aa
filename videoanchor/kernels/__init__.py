"""Anchored attention kernels. This subpackage never imports transformers."""

from videoanchor.kernels.anchored_attention import anchor_gates, anchored_attention

__all__ = ["anchored_attention", "anchor_gates"]
