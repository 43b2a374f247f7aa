"""videoanchor: fast, faithful VideoAnchor for video VLMs.

Layers (dependencies run one way):
    videoanchor.kernels       fused anchored attention (Triton, exact torch path, float64 reference)
    videoanchor.anchor        sparse subspace clustering and anchor scores
    videoanchor.integrations  one subpackage per engine (transformers shims, per-family registry)
    videoanchor.pipeline      load a VLM, build inputs, generate
    videoanchor.cli, videoanchor.lmms_eval   applications of the pipeline
"""

from videoanchor._version import __version__
from videoanchor.anchor import AnchorResult, compute_anchor_scores, sparse_subspace_clustering
from videoanchor.integrations.transformers import configure
from videoanchor.integrations.transformers import register as _register_transformers
from videoanchor.kernels import anchor_gates, anchored_attention, anchored_attention_varlen

try:
    _register_transformers()
except ImportError as _err:
    # transformers cannot be imported here (e.g. a torchvision that does not load with this
    # torch): the kernels and the anchor scores do not need it, so only its integration is off
    import warnings as _warnings

    _warnings.warn(
        f"{_err}. The kernels and the anchor scores work; the transformers integration "
        "(attn_implementation='videoanchor_triton', videoanchor.configure) is off",
        RuntimeWarning,
        stacklevel=2,
    )
    del _warnings, _err

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
