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
from videoanchor.integrations.transformers import configure, register_when_imported
from videoanchor.kernels import anchor_gates, anchored_attention, anchored_attention_varlen

# attn_implementation="videoanchor_triton" is registered with transformers now if it is
# imported, else once it is: importing it here took 2-3 s that the kernels and the scores
# do not need (issue 68)
register_when_imported()
del register_when_imported

# the SSC kernel compiled in a background process where Numba's cache is empty (issue 93; a
# few stat calls here, VIDEOANCHOR_PRECOMPILE=0 to start none)
from videoanchor.anchor.solvers import precompile as _precompile  # noqa: E402

_precompile.start("import")
del _precompile

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
