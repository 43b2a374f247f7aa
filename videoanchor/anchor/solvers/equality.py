"""SSC with sparse outliers and an exact data constraint (Elhamifar & Vidal, TPAMI 2013).

The program of their face experiments (``admmOutlier_mat_func`` in the SSC-ADMM code),
with ``Y = X^T`` (``D x N``):

    min ||C||_1 + gamma ||E||_1    s.t.  Y = Y C + E,  diag(C) = 0  (and 1^T C = 1^T if affine)

VideoAnchor (docs/method.md section 2) replaces the constraint by a squared penalty; this
module is the constrained form, for users of SSC as a clustering method (it is what
reproduces the published Extended Yale B errors, ``benchmarks/bench_yaleb.py``).

Their ADMM, reproduced iterate for iterate
(:class:`videoanchor.anchor.solvers.admm_steps.EqualityStep`: the shared C-step with this data
term), with ``P = [Y, I / gamma]`` and ``Z = [C; gamma E]``
(``(N + D) x N``):

    Z  = (mu1 P^T P + mu2 I)^{-1} (P^T (mu1 Y + L1) + mu2 C - L2),  diag(Z_C) = 0
    C  = soft(Z + L2 / mu2, 1 / mu2),                                diag(C_C) = 0
    L1 += mu1 (Y - P Z),   L2 += mu2 (Z - C)
    stop when max |Z - C| <= eps and max_i ||y_i - e_i - Y z_i|| / ||y_i - e_i|| <= eps

with ``gamma = alpha_e / max_j ||y_j||_1``, ``mu1 = alpha_z / min_i max(max_{j != i}
|y_j^T y_i|, max_d |Y_di| / gamma)`` and ``mu2 = rho`` (their code: ``mu2 = alpha``). The
affine constraint adds ``mu2 delta delta^T`` to the system and ``mu2 delta (1 - lambda3 /
mu2)^T`` to the right-hand side (``delta = [1_N; 0_D]``), ``lambda3 += mu2 (1^T Z_C - 1)``
and ``max |1^T Z_C - 1| <= eps`` to the stop.

Their code inverts the ``(N + D) x (N + D)`` matrix. Here it is never formed: by
Woodbury, ``(mu1 P^T P + mu2 I)^{-1} = (I - P^T K^{-1} P) / mu2`` with the ``D x D``
matrix ``K = c I + Y Y^T``, ``c = mu2 / mu1 + 1 / gamma^2``; when ``D > N`` (faces:
``D = 2016``) ``K^{-1}`` is applied through the ``N x N`` matrix ``(c I + Y^T Y)^{-1}``.
One iteration costs ``5 D N^2 + 2 N^3`` multiply-adds (theirs: ``(N + D)^2 N``), in the
working dtype; the factorisation is float64. The affine term is a rank-one correction
(Sherman-Morrison) on top.
"""

from __future__ import annotations

import time

import torch

from videoanchor.anchor._inputs import prepare_features
from videoanchor.anchor.options import SSCOptions, takes_options
from videoanchor.anchor.plan import Plan, make_plan
from videoanchor.anchor.program import SSCSolution, gram_row_max
from videoanchor.anchor.solvers import admm_steps, program_kwargs
from videoanchor.anchor.solvers.admm import TorchKernels

__all__ = ["equality_parameters", "run", "run_equality", "solve_ssc_equality"]


def equality_parameters(x: torch.Tensor, alpha_e: float, alpha_z: float) -> tuple[float, float]:
    """``(gamma, mu1)`` of the constrained program (module docstring) for points ``x``
    (``N x D``, rows); E&V's ``lambda`` is over the columns of ``P^T Y``."""
    if x.shape[0] < 2:
        raise ValueError(f"SSC needs at least 2 points, got {x.shape[0]}")
    top = float(x.abs().sum(dim=1, dtype=torch.float64).max())
    if not top > 0:
        raise ValueError("SSC: every point is zero; gamma is undefined")
    gamma = alpha_e / top
    col = torch.maximum(gram_row_max(x), x.abs().amax(dim=1).to(torch.float64) / gamma)
    lam = float(col.min())
    if not lam > 0:
        raise ValueError("SSC: some point is zero and orthogonal to all others; mu1 undefined")
    return gamma, alpha_z / lam


@takes_options("alpha_e", "alpha_z", "rho", "eps", "max_iter", "dtype", alpha_e=20.0,
               alpha_z=20.0, rho=20.0)  # fmt: skip
def solve_ssc_equality(features, *, affine: bool = False, progress=False,
                       check_memory_first: bool = True, callback=None,
                       **options) -> SSCSolution:  # fmt: skip
    """Solve ``min ||C||_1 + gamma ||E||_1 s.t. Y = Y C + E, diag(C) = 0`` (module docstring).

    ``affine=True`` adds ``1^T C = 1^T`` (their ``affine`` argument).

    ``features`` is ``N x D`` (one row per point); work happens on its device. ``alpha_e``,
    ``alpha_z`` (both 20, E&V's ``alpha``), ``rho`` (the ADMM penalty ``mu2``; E&V: equal to
    ``alpha``), ``eps``, ``max_iter`` (their code runs at most 149 iterations) and ``dtype``
    are :class:`~videoanchor.anchor.SSCOptions`'s. Returns an
    :class:`~videoanchor.anchor.program.SSCSolution` whose ``coef`` is ``C``, ``outliers``
    is ``E`` (``D x N``), ``residual`` is the largest of the stopping rule's
    errors (``err1``, ``err2`` and, when affine, ``err3``), ``lambda_e = gamma`` and
    ``lambda_z = mu1``. ``callback(it, C, E)`` sees every iterate; ``progress`` as in
    :func:`~videoanchor.anchor.solvers.admm.solve_ssc_admm`.
    """
    t0 = time.perf_counter()
    given = SSCOptions.of(options, mode="exact", solver="faithful", progress=None)
    opts, _, x = prepare_features(features, given, min_tokens=2)
    plan = make_plan(x.shape, x.device, opts, program="exact",
                     check_memory_first=check_memory_first)  # fmt: skip
    return run_equality(x, plan, alpha_e=opts.alpha_e, alpha_z=opts.alpha_z, rho=opts.rho,
                        eps=opts.eps, max_iter=opts.max_iter, affine=affine, progress=progress,
                        callback=callback, t0=t0)  # fmt: skip


def run(x: torch.Tensor, plan: Plan, opts: SSCOptions, *, affine: bool,
        outliers: bool) -> SSCSolution:  # fmt: skip
    """Route ``"equality"``: :func:`run_equality` on checked features ``x`` as ``plan``
    says, with the program's parameters from the checked options ``opts`` (the constrained
    program always has the outlier term: ``outliers`` does not apply)."""
    return run_equality(x, plan, affine=affine, **program_kwargs(opts))


def run_equality(x: torch.Tensor, plan: Plan, *, alpha_e: float, alpha_z: float, rho: float,
                 eps: float, max_iter: int, affine: bool = False, progress=False, callback=None,
                 t0: float | None = None) -> SSCSolution:  # fmt: skip
    """:func:`solve_ssc_equality` on checked features ``x`` in ``plan``'s working dtype
    (:class:`~videoanchor.anchor.plan.Plan`); nothing is checked here."""
    t0 = time.perf_counter() if t0 is None else t0
    device, work = plan.device, plan.work
    n = x.shape[0]
    x64 = x.to(torch.float64)
    gamma, mu1 = equality_parameters(x64, alpha_e, alpha_z)
    kernels = TorchKernels(device)
    kernels.sync()
    t1 = time.perf_counter()
    report = admm_steps.Reporting(progress, max_iter=max_iter, eps=eps, tokens=n)
    out = None
    try:
        dic = admm_steps.Dictionary(
            x, work, lam_z=mu1, affine=affine, outliers=True, kernels=kernels
        )
        step = admm_steps.EqualityStep(dic, gamma=gamma, mu1=mu1, mu2=float(rho), eps=eps)
        kernels.sync()
        t2 = time.perf_counter()
        inspect = None if callback is None else lambda it, r: callback(it, step.cc, step.outliers)
        out = admm_steps.run(
            step, max_iter, admm_steps.chain(inspect, report.hook), what="constrained SSC"
        )
    finally:
        report.close(*((out.converged, out.iterations, out.residual) if out else (False,) * 3))
    kernels.sync()
    t3 = time.perf_counter()
    return SSCSolution.from_run(
        out,
        coef=step.cc,
        lambda_e=gamma,
        lambda_z=mu1,
        rho=float(rho),
        solver=plan.solver,
        strategy="n-space" if step.n_space else "d-space",
        outliers=step.outliers,
        timings={"lambdas": t1 - t0, "factor": t2 - t1, "admm": t3 - t2},
    )
