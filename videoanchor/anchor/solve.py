"""Stage 3 of an SSC call: the solve. Each solver takes the plan
(:class:`~videoanchor.anchor.plan.Plan`) and the checked features and returns a result
whose ``coef`` is ``C`` (dense, or sparse COO in blocked mode); :data:`SOLVERS` says which
one runs for a plan."""

from __future__ import annotations

from videoanchor.anchor.blocked import run_blocked
from videoanchor.anchor.cupy_backend import run_admm_cupy
from videoanchor.anchor.plan import Plan
from videoanchor.anchor.ssc import run_admm
from videoanchor.anchor.ssc_equality import run_equality
from videoanchor.anchor.workset import run_workset

__all__ = ["SOLVERS", "solve"]


def _dense(x, plan: Plan, opts, *, affine: bool, outliers: bool, **program):
    if plan.solver == "workset":
        return run_workset(x, plan, affine=affine, outliers=outliers, **program)
    run = run_admm_cupy if plan.backend == "cupy" else run_admm
    return run(x, plan, affine=affine, outliers=outliers, **program)


def _blocked(x, plan: Plan, opts, *, affine: bool, outliers: bool, **program):
    return run_blocked(x, plan, affine=affine, outliers=outliers, block_eps=opts.block_eps,
                       **program)  # fmt: skip


def _constrained(x, plan: Plan, opts, *, affine: bool, outliers: bool, **program):
    return run_equality(x, plan, affine=affine, **program)


#: ``{(program, mode): solver}``: the solver that runs a plan (the dense one runs the fast
#: schedule, the authors' iteration or the working sets, as ``plan.solver`` says)
SOLVERS = {
    ("squared", "exact"): _dense,
    ("squared", "blocked"): _blocked,
    ("exact", "exact"): _constrained,
}


def solve(x, plan: Plan, opts, *, affine: bool = True, outliers: bool = True):
    """``C`` of the features ``x`` (checked, PCA-reduced) as ``plan`` says, with the
    program's parameters from ``opts`` (:class:`~videoanchor.anchor.options.SSCOptions`,
    checked): the result of the solver :data:`SOLVERS` names for the plan."""
    program = {k: v for k, v in opts.program().items() if k != "dtype"}  # (in the plan)
    return SOLVERS[plan.program, plan.mode](x, plan, opts, affine=affine, outliers=outliers,
                                            **program)  # fmt: skip
