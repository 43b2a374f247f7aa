"""videoanchor: fast, faithful VideoAnchor for video VLMs.

Layers (dependencies run one way):
    videoanchor.kernels       fused anchored attention (Triton, exact torch path, float64 reference)
    videoanchor.anchor        sparse subspace clustering and anchor scores
    videoanchor.integrations  transformers shims and the per-family registry
"""

from videoanchor.anchor import AnchorResult, compute_anchor_scores, sparse_subspace_clustering
from videoanchor.integrations import configure
from videoanchor.integrations import register as _register_transformers
from videoanchor.kernels import anchor_gates, anchored_attention, anchored_attention_varlen

_register_transformers()

__version__ = "0.1.0"

__all__ = [
    "anchored_attention",
    "anchored_attention_varlen",
    "anchor_gates",
    "configure",
    "compute_anchor_scores",
    "sparse_subspace_clustering",
    "AnchorResult",
    "__version__",
]
