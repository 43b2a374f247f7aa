"""Stage 3 of an SSC call: the solve. Each solver takes the plan
(:class:`~videoanchor.anchor.plan.Plan`) and the checked features and returns a result
whose ``coef`` is ``C`` (dense, or sparse COO in blocked mode); :data:`SOLVERS` says which
one runs for a plan."""

from __future__ import annotations

from videoanchor.anchor.blocked import run_blocked
from videoanchor.anchor.cupy_backend import run_admm_cupy
from videoanchor.anchor.plan import ROUTES, Plan
from videoanchor.anchor.ssc import run_admm
from videoanchor.anchor.ssc_equality import run_equality
from videoanchor.anchor.workset import run_workset
from videoanchor.anchor.workset_cuda import run_workset_cuda

__all__ = ["SOLVERS", "solve"]


def _admm(x, plan: Plan, opts, *, affine: bool, outliers: bool, **program):
    return run_admm(x, plan, affine=affine, outliers=outliers, **program)


def _admm_cupy(x, plan: Plan, opts, *, affine: bool, outliers: bool, **program):
    return run_admm_cupy(x, plan, affine=affine, outliers=outliers, **program)


def _workset(x, plan: Plan, opts, *, affine: bool, outliers: bool, **program):
    return run_workset(x, plan, affine=affine, outliers=outliers, **program)


def _workset_cuda(x, plan: Plan, opts, *, affine: bool, outliers: bool, **program):
    return run_workset_cuda(x, plan, affine=affine, outliers=outliers, **program)


def _blocked(x, plan: Plan, opts, *, affine: bool, outliers: bool, **program):
    return run_blocked(x, plan, affine=affine, outliers=outliers, block_eps=opts.block_eps,
                       **program)  # fmt: skip


def _constrained(x, plan: Plan, opts, *, affine: bool, outliers: bool, **program):
    return run_equality(x, plan, affine=affine, **program)


#: ``{route: solver}``: the function that runs a plan, by the ``route`` that
#: :func:`~videoanchor.anchor.plan.make_plan` chose (:data:`~videoanchor.anchor.plan.ROUTES`)
SOLVERS = {
    "workset_then_fast": _workset,
    "workset_cuda": _workset_cuda,
    "admm": _admm,
    "admm_cupy": _admm_cupy,
    "blocked": _blocked,
    "equality": _constrained,
}
if set(SOLVERS) != set(ROUTES):  # pragma: no cover - caught by any test
    raise ImportError("videoanchor.anchor.solve: SOLVERS and plan.ROUTES name different routes")


def solve(x, plan: Plan, opts, *, affine: bool = True, outliers: bool = True):
    """``C`` of the features ``x`` (checked, PCA-reduced) as ``plan`` says, with the
    program's parameters from ``opts`` (:class:`~videoanchor.anchor.options.SSCOptions`,
    checked): the result of the solver :data:`SOLVERS` names for the plan's route."""
    program = {k: v for k, v in opts.program().items() if k != "dtype"}  # (in the plan)
    return SOLVERS[plan.route](x, plan, opts, affine=affine, outliers=outliers, **program)
