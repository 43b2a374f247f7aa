"""Sparse subspace clustering and VideoAnchor scores (docs/method.md sections 1-3).

Never imports ``videoanchor.kernels`` or ``transformers``.
"""

from videoanchor.anchor.clustering import spectral_clustering, ssc_affinity
from videoanchor.anchor.options import SSCOptions
from videoanchor.anchor.plan import SSCMemoryError
from videoanchor.anchor.program import ColumnGaps, SSCSolution, duality_gaps, ssc_lambdas
from videoanchor.anchor.scores import (
    AnchorResult,
    SSCCoefficients,
    SSCResult,
    anchor_result_from_coefficients,
    anchor_scores,
    compute_anchor_scores,
    pca_reduce,
    sparse_subspace_clustering,
    ssc_coefficients,
)
from videoanchor.anchor.solvers.admm import solve_ssc_admm
from videoanchor.anchor.solvers.blocked import solve_ssc_blocked
from videoanchor.anchor.solvers.workset import SetsTooLarge, reference_minimiser, solve_ssc_workset
from videoanchor.anchor.warmup import WarmUp, warm_up

__all__ = [
    "AnchorResult",
    "ColumnGaps",
    "SSCCoefficients",
    "SSCResult",
    "SSCMemoryError",
    "SSCSolution",
    "SSCOptions",
    "SetsTooLarge",
    "WarmUp",
    "anchor_result_from_coefficients",
    "anchor_scores",
    "compute_anchor_scores",
    "duality_gaps",
    "pca_reduce",
    "reference_minimiser",
    "solve_ssc_admm",
    "solve_ssc_blocked",
    "solve_ssc_workset",
    "sparse_subspace_clustering",
    "spectral_clustering",
    "ssc_affinity",
    "ssc_coefficients",
    "ssc_lambdas",
    "warm_up",
]
