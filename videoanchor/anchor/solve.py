"""Stage 3 of an SSC call: the solve. Each route of a plan
(:class:`~videoanchor.anchor.plan.Plan`, :data:`~videoanchor.anchor.plan.ROUTES`) has its
module in :mod:`videoanchor.anchor.solvers`, whose ``run`` takes the plan and the checked
features and returns a result whose ``coef`` is ``C`` (dense, or sparse COO in blocked
mode); :data:`SOLVERS` says which one runs for a plan."""

from __future__ import annotations

from videoanchor.anchor.plan import ROUTES, Plan
from videoanchor.anchor.solvers import (
    admm,
    admm_cupy,
    blocked,
    equality,
    workset,
    workset_blocks,
    workset_cuda,
)

__all__ = ["SOLVERS", "solve"]

#: ``{route: run}``: the function that runs a plan, by the ``route`` that
#: :func:`~videoanchor.anchor.plan.make_plan` chose (:data:`~videoanchor.anchor.plan.ROUTES`):
#: the ``run(x, plan, opts, *, affine, outliers)`` of the route's solver module
SOLVERS = {
    "workset_then_fast": workset.run,
    "workset_cuda": workset_cuda.run,
    "admm": admm.run,
    "admm_cupy": admm_cupy.run,
    "blocked": blocked.run,
    "equality": equality.run,
    "workset_blocks": workset_blocks.run,
}
if set(SOLVERS) != set(ROUTES):  # pragma: no cover - caught by any test
    raise ImportError("videoanchor.anchor.solve: SOLVERS and plan.ROUTES name different routes")


def solve(x, plan: Plan, opts, *, affine: bool = True, outliers: bool = True):
    """``C`` of the features ``x`` (checked, PCA-reduced) as ``plan`` says, with the
    program's parameters from ``opts`` (:class:`~videoanchor.anchor.options.SSCOptions`,
    checked): the result of the solver :data:`SOLVERS` names for the plan's route."""
    return SOLVERS[plan.route](x, plan, opts, affine=affine, outliers=outliers)
