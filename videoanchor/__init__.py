"""videoanchor: fast, faithful VideoAnchor for video VLMs.

Layers (dependencies run one way):
    videoanchor.kernels       fused anchored attention (Triton, exact torch path, float64 reference)
    videoanchor.anchor        sparse subspace clustering and anchor scores
    videoanchor.integrations  transformers shims and the per-family registry
"""

from videoanchor.kernels import anchor_gates, anchored_attention

__version__ = "0.1.0"

__all__ = ["anchored_attention", "anchor_gates", "__version__"]
