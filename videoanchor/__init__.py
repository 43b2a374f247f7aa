"""videoanchor: fast, faithful VideoAnchor for video VLMs.

Layers (dependencies run one way):
    videoanchor.kernels       fused anchored attention (Triton, exact torch path, float64 reference)
    videoanchor.anchor        sparse subspace clustering and anchor scores
    videoanchor.integrations  one subpackage per engine (transformers shims, per-family registry)
    videoanchor.pipeline      load a VLM, build inputs, generate
    videoanchor.cli, videoanchor.lmms_eval   applications of the pipeline
"""

import importlib.util as _util
import os as _os
import sys as _sys

from videoanchor._version import __version__

# The SSC kernels and the discretisation's loops compiled in background processes where
# Numba's cache is empty (issues 93, 101; a few stat calls here, VIDEOANCHOR_PRECOMPILE=0 to
# start none), started before the import below loads torch (about a second), so that they
# have that second on the first call: the module is loaded from its file alone (its
# package's __init__ imports torch), under its own name, as the package's import would.
_name = "videoanchor.anchor.solvers.precompile"
_precompile = _sys.modules.get(_name)
if _precompile is None:
    _spec = _util.spec_from_file_location(
        _name, _os.path.join(_os.path.dirname(__file__), "anchor", "solvers", "precompile.py")
    )
    _precompile = _util.module_from_spec(_spec)
    _sys.modules[_name] = _precompile
    _spec.loader.exec_module(_precompile)
    del _spec
_precompile.start("import")

from videoanchor.anchor import (  # noqa: E402
    AnchorResult,
    compute_anchor_scores,
    sparse_subspace_clustering,
)
from videoanchor.integrations.transformers import configure, register_when_imported  # noqa: E402
from videoanchor.kernels import anchor_gates, anchored_attention, anchored_attention_varlen  # noqa: E402

# attn_implementation="videoanchor_triton" is registered with transformers now if it is
# imported, else once it is: importing it here took 2-3 s that the kernels and the scores
# do not need (issue 68)
register_when_imported()
del register_when_imported

# (the package's attribute, as an import of the module would have set it)
import videoanchor.anchor.solvers as _solvers  # noqa: E402

_solvers.precompile = _precompile
del _solvers, _precompile, _name, _util, _os, _sys

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
