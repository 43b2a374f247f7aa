"""Sparse subspace clustering by ADMM (docs/method.md section 2), in torch, on any device.

With ``Y = X^T`` (``D x N``, one column per point) the solver minimises

    ||C||_1 + lambda_e ||E||_1 + (lambda_z / 2) ||Y - Y C - E||_F^2
    s.t.  1^T C = 1^T (affine),  diag(C) = 0

with ``lambda_e = alpha_e / mu_e`` and ``lambda_z = alpha_z / mu_z`` (Elhamifar & Vidal,
TPAMI 2013), by the authors' ADMM. The ``A``-step system, ``lambda_z Y^T Y + rho I +
rho 1 1^T``, is factored once here, in float64 (their code re-solves it every iteration),
and applied whichever way costs fewer flops: ``"dense"``, the explicit ``N x N`` inverse,
``O(N^3)`` per iteration, or ``"woodbury"``, through a ``(D + 1) x (D + 1)`` matrix (the
system is ``rho I`` plus a rank-``(D + 1)`` term), ``O(N^2 D)``. The iterations run in the
working dtype (float32 by default) and are the authors' iterates. The iteration itself is
:mod:`videoanchor.anchor.solvers.admm_steps`; this module holds the torch entry point and its
kernels (the route ``"admm"``).
"""

from __future__ import annotations

import time
import warnings

import array_api_compat
import torch

from videoanchor.anchor._inputs import prepare_features
from videoanchor.anchor.collective import (
    all_agree,
    all_gather_columns,
    all_sum,
    broadcast_from_first,
    column_range,
    computed_on_first,
)
from videoanchor.anchor.options import SSCOptions, takes_options
from videoanchor.anchor.plan import Plan, SSCMemoryError, make_plan
from videoanchor.anchor.products import Products, exact_float32
from videoanchor.anchor.program import SSCSolution, gram_row_max, ssc_lambdas
from videoanchor.anchor.solvers import admm_steps, fast, program_kwargs

__all__ = ["run", "run_admm", "solve_ssc_admm", "SSCMemoryError"]


_DENSITY_RECHECK = 10  # (CUDA) how often E's density is counted: _sparse_by_density


class TorchKernels(admm_steps.Kernels):
    """The torch forms of :class:`videoanchor.anchor.solvers.admm_steps.Kernels`: the C-step in
    place, the inverse from the Cholesky factor and the product with a sparse ``E``: below the share
    ``sparse_e_density`` of non-zeros (0: always dense, no host read) cuSPARSE on CUDA, on
    the CPU (at most one non-zero per column on average) a gather of the columns ``E``
    touches, scattered by ``index_add_`` (deterministic; CSR was no faster than dense)."""

    def __init__(self, device: torch.device, products: Products | None = None, *,
                 sparse_e_density: float = 0.02):  # fmt: skip
        self.device = device
        self.products = products or Products("full")
        self.sparse_e_density = float(sparse_e_density)
        self._mt: dict[int, torch.Tensor] = {}
        self._left: dict[int, torch.Tensor] = {}
        self._e_sparse: bool | None = None  # (CUDA) the last density decision, and
        self._e_calls = 0  # the products with E since the first

    def dense(self, m, e):
        """``m @ e`` dense, at the solver's precision (``m``'s split is made once)."""
        if not self.products.split:
            return torch.mm(m, e)
        key = id(m)
        if key not in self._left:
            self._left[key] = self.products.left(m)
        return self.products.mm(self._left[key], e)

    def shrink(self, xp, t, lam, thr, diag):
        lam_new = t.clamp(-thr, thr)
        if diag is not None:
            lam_new[diag.rows, diag.cols] = t[diag.rows, diag.cols]
        t.sub_(lam_new)
        return t, lam_new, lam.sub_(lam_new).abs_()

    def spd_inverse(self, xp, m, what: str = "the A-step system"):
        chol, info = torch.linalg.cholesky_ex(m)
        if int(info) != 0:
            raise FloatingPointError(f"SSC: {what} is not positive definite{admm_steps.SPD_HINT}")
        return torch.cholesky_inverse(chol)  # half the flops of an LU inverse

    def _sparse_by_density(self, e) -> bool:
        """Whether ``E`` is sparse enough for the sparse product, on a device that pays for
        reading its count of non-zeros (a host synchronisation): counted on the first call
        and every ``_DENSITY_RECHECK``-th after, the answer kept in between (``E``'s density
        moves slowly along the iteration; the two products differ by rounding only)."""
        self._e_calls += 1
        if self._e_sparse is None or self._e_calls % _DENSITY_RECHECK == 0:
            nnz = int(torch.count_nonzero(e))
            self._e_sparse = nnz < self.sparse_e_density * e.numel()
        return self._e_sparse

    def times_e(self, m, e):
        if self.sparse_e_density <= 0:
            return self.dense(m, e)
        if e.is_cuda:
            if not self._sparse_by_density(e):
                return self.dense(m, e)
        else:
            nnz = int(torch.count_nonzero(e))
            # (the gather below holds m.shape[0] x nnz values: kept within the output's size)
            if nnz >= self.sparse_e_density * e.numel() or nnz > e.shape[1]:
                return self.dense(m, e)
            # column i of m @ E is sum_d m[:, d] E[d, i] over E's few non-zeros
            rows, cols = e.nonzero(as_tuple=True)
            out = torch.zeros(m.shape[0], e.shape[1], dtype=e.dtype, device=e.device)
            return out.index_add_(1, cols, m[:, rows] * e[rows, cols])
        key = id(m)
        if key not in self._mt:
            self._mt[key] = m.T.contiguous()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "sparse CSR is in beta"
            return torch.sparse.mm(e.T.to_sparse_csr(), self._mt[key]).T

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()


@exact_float32
@takes_options("alpha_e", "alpha_z", "rho", "eps", "max_iter", "dtype", "precision")
def solve_ssc_admm(features, *, affine: bool = True, outliers: bool = True, strategy: str = "auto",
                   progress=None, keep_history: bool = False, check_memory_first: bool = True,
                   callback=None, xp=None, kernels: admm_steps.Kernels | None = None,
                   scheduled: bool = False, schedule: admm_steps.Schedule = admm_steps.SCHEDULE,
                   process_group=None, **options) -> SSCSolution:  # fmt: skip
    """Solve the SSC program for ``features`` (``N x D``, one row per point) on their device.

    This runs the authors' iteration (docs/method.md section 2) and stops when
    ``max_i sum_j |A - C|_ij < eps``. ``alpha_e``, ``alpha_z``, ``rho``, ``eps``,
    ``max_iter``, ``dtype`` and ``precision`` are the options of
    :class:`~videoanchor.anchor.SSCOptions` (same meaning and defaults).

    ``progress``: False, True, None (default: a bar or log lines once a run lasts a few
    seconds) or an :class:`~videoanchor.anchor.progress.SSCProgress`, whose time budget
    stops the iterations early (``converged=False``, ``stopped=True``); any other callable
    ``progress(iteration, residual)`` is called after every iteration instead, and a true
    return stops the run. ``callback(iteration, C, residual)`` sees every iterate.

    ``xp``: an array module (``numpy``, ``cupy``) to run the same iteration with instead
    of torch, the features going in and ``C`` coming out through DLPack. ``kernels``: the
    :class:`~videoanchor.anchor.solvers.admm_steps.Kernels` the iteration runs (default: the
    array-API forms with ``xp``, :class:`TorchKernels` at the call's precision on torch). See
    :func:`videoanchor.anchor.solvers.admm_cupy.solve_ssc_admm_cupy`.

    ``scheduled=True`` is the fast solver (``solver="fast"``): the authors' steps on the
    fixed ``schedule`` (:class:`~videoanchor.anchor.solvers.admm_steps.Schedule`; default:
    60 iterations, ``rho`` rescaled by a continuous residual-balancing factor, the system
    factored once by :class:`~videoanchor.anchor.solvers.admm_steps.EigenInverse`) and no
    residual test, so its answer is a continuous function of the features; a smaller
    ``max_iter`` cuts it short (``converged=False``). ``eps`` does not apply to it (one
    other than the default is refused); its ``strategy`` is ``"auto"`` (on a CPU ``E`` on an
    active set, elsewhere dense) or ``"dense"``
    (:func:`~videoanchor.anchor.plan.fast_step`).

    ``process_group`` (fast solver, torch): a ``torch.distributed`` process group (any
    backend) over which the columns of ``C`` are split: each rank runs the column-wise steps
    on its share against the whole factor (computed on rank 0 and broadcast) and the
    residual's row sums and the rebalancing's norms are summed over the ranks, so every rank
    follows the single-process iterate (to the rounding of those sums) and returns the same
    all-gathered ``C`` and ``E``. Every rank must call it; rank 0's features are used; an
    error or a stop asked on one rank reaches all of them. ``callback`` does not apply.
    """
    t0 = time.perf_counter()
    if process_group is not None and (not scheduled or xp is not None or callback is not None):
        raise ValueError(
            "process_group: only the fast solver (scheduled=True) on torch splits its "
            "columns over processes, without a callback (a rank holds only its columns); "
            "for the authors' iteration over processes use solve_ssc_blocked"
        )
    if strategy not in ("auto", "dense", "woodbury"):
        raise ValueError(f"strategy: expected 'auto', 'dense' or 'woodbury', got {strategy!r}")
    given = SSCOptions.of(options, mode="exact", solver="fast" if scheduled else "faithful",
                          backend="torch", progress=None)  # fmt: skip
    opts, _, x_t = prepare_features(features, given, min_tokens=2, process_group=process_group)
    plan = make_plan(x_t.shape, x_t.device, opts, process_group=process_group,
                     outliers=outliers, check_memory_first=check_memory_first,
                     strategy=strategy, backend=None if xp is None else xp.__name__)  # fmt: skip
    return run_admm(
        x_t, plan, alpha_e=options["alpha_e"], alpha_z=options["alpha_z"], rho=options["rho"],
        eps=options["eps"], max_iter=options["max_iter"], affine=affine, outliers=outliers,
        progress=progress, keep_history=keep_history, callback=callback, xp=xp, kernels=kernels,
        t0=t0, schedule=schedule,
    )  # fmt: skip


def run(x: torch.Tensor, plan: Plan, opts: SSCOptions, *, affine: bool,
        outliers: bool) -> SSCSolution:  # fmt: skip
    """Route ``"admm"``: :func:`run_admm` on checked features ``x`` as ``plan`` says, with the
    program's parameters from the checked options ``opts``."""
    return run_admm(x, plan, affine=affine, outliers=outliers, **program_kwargs(opts))


def run_admm(x_t: torch.Tensor, plan: Plan, *, alpha_e: float, alpha_z: float, rho: float,
             eps: float, max_iter: int, affine: bool = True, outliers: bool = True,
             progress=None, keep_history: bool = False, callback=None, xp=None,
             kernels: admm_steps.Kernels | None = None, t0: float | None = None,
             schedule: admm_steps.Schedule = admm_steps.SCHEDULE, warn_dark: bool = True,
             gram: torch.Tensor | None = None) -> SSCSolution:  # fmt: skip
    """:func:`solve_ssc_admm` on checked features ``x_t`` (every rank's copy of rank 0's
    under a process group) as ``plan`` says (:class:`~videoanchor.anchor.plan.Plan`:
    ``solver="fast"`` runs ``schedule``; its device, working dtype, precision, A-step
    strategy and process group, ``mu_z``'s rule for dark tokens). Nothing is checked here.
    ``warn_dark``: False where the caller has named the dark tokens already (the working
    sets, whose fallback this is: one warning per call). ``gram``: ``x x^T`` in float64 on
    ``x``'s device where the caller has it already (the working sets), used where the
    factor takes the dense Gram matrix, else computed here."""
    t0 = time.perf_counter() if t0 is None else t0
    group, rank, world = plan.group, plan.rank, plan.world
    device, work_t, precision, strategy = plan.device, plan.work, plan.precision, plan.strategy
    scheduled = plan.solver == "fast"
    n, d = x_t.shape
    products = Products(precision)
    if xp is None:
        x, work = x_t, work_t
        kernels = kernels or TorchKernels(device, products)
    else:
        x = xp.from_dlpack(x_t.contiguous())
        work = xp.float32 if work_t == torch.float32 else xp.float64
        kernels = kernels or admm_steps.Kernels()
    xp = array_api_compat.array_namespace(x)
    length = min(max_iter, schedule.iterations) if scheduled else max_iter
    report = admm_steps.Reporting(progress, max_iter=length, eps=eps, tokens=n, schedule=scheduled)
    out = None
    try:
        x64 = xp.astype(x, xp.float64, copy=False)
        # the Gram matrix (N x N, float64), where one process holds it and the factor uses it
        # (not a thin one: D x D): computed once, here, for the lambdas too
        thin = scheduled and n > schedule.thin_above * d
        dense_gram = (scheduled and not thin) or (not scheduled and strategy == "dense")
        if not (group is None and dense_gram):
            gram = None
        elif gram is None:
            gram = x64 @ x64.T
        row_max = gram_row_max(x64, gram=gram)
        lam_e, lam_z, _, _ = ssc_lambdas(x64, alpha_e, alpha_z, row_max=row_max,
                                         dark=plan.dark, warn=warn_dark)  # fmt: skip
        # the fast schedule's continuation in lambda_z (1: none; admm_steps.continuation_start)
        weight = admm_steps.continuation_start(row_max, schedule) if scheduled else 1.0
        del row_max
        start, stop, share, reduce, columns = 0, n, None, None, None
        if group is not None:  # rank 0's lambdas, weight and factor; this rank's columns
            lam = torch.tensor([lam_e, lam_z, weight], dtype=torch.float64, device=device)
            lam_e, lam_z, weight = (float(v) for v in broadcast_from_first(lam, group))
            start, stop = column_range(n, rank, world)

            def share(compute, shapes):
                return computed_on_first(compute, shapes, torch.float64, device, group)

            def reduce(a):
                return all_sum(a, group)

            # every rank's columns of the refactored [B; Y B]
            columns = (start, stop, lambda block: all_gather_columns(block, group))

        kernels.sync()
        t1 = time.perf_counter()
        dic = admm_steps.Dictionary(x, work, lam_z=lam_z, affine=affine, outliers=outliers,
                                    kernels=kernels, products=products, x64=x64)  # fmt: skip
        if scheduled:
            factor = admm_steps.EigenInverse(dic, rho, share=share, columns=columns, gram=gram,
                                             thin=thin, schedule=schedule,
                                             continuation=weight)  # fmt: skip
        elif strategy == "dense":
            factor = admm_steps.DenseInverse(dic, rho, gram=gram)
        else:
            factor = admm_steps.Woodbury(dic, rho)
        del gram, x64  # the factor holds what it needs
        kernels.sync()
        t2 = time.perf_counter()
        if scheduled:
            # a max_iter below the schedule cuts it short: not converged (reported as such)
            make = fast.ActiveSetStep if strategy == "active_set" else admm_steps.ScheduledStep
            step = make(dic, factor, thr_e=lam_e / lam_z, schedule=schedule, start=start,
                        stop=stop, reduce=reduce, continuation=weight)  # fmt: skip
        else:
            step = admm_steps.SquaredStep(dic, factor, 0, n, thr_e=lam_e / lam_z, eps=eps)
        history: list[float] = []
        hook = admm_steps.chain(
            (lambda it, r: history.append(r)) if keep_history else None,  # floats below
            (lambda it, r: callback(it, step.C, float(r))) if callback is not None else None,
            report.hook,
        )  # fmt: skip
        if group is not None:  # a stop asked on one rank stops every rank at that iteration
            own = hook

            def hook(it, r):
                asked = own is not None and bool(own(it, r))
                return all_agree(asked, group, device, every=False)

        out = admm_steps.run(step, max_iter, hook)
        history = [float(r) for r in history]  # (device scalars from a lazy step: read once)
    finally:
        report.close(*((out.converged, out.iterations, out.residual) if out else (False,) * 3))
    kernels.sync()
    t3 = time.perf_counter()
    coef, e = _as_torch(step.C), None if step.E is None else _as_torch(step.E)
    timings = {"lambdas": t1 - t0, "factor": t2 - t1, "admm": t3 - t2}
    if group is not None:  # every rank's columns, in order, on every rank
        coef = all_gather_columns(coef, group)
        e = all_gather_columns(e, group) if all_agree(e is not None, group, device) else None
        kernels.sync()
        timings["gather"] = time.perf_counter() - t3
    if scheduled:
        strategy = "low_rank" if factor.low_rank else "thin" if factor.thin else "dense"
    return SSCSolution.from_run(out, coef=coef, lambda_e=lam_e, lambda_z=lam_z, solver=plan.solver,
                                rho=step.rho,
                                rho_changes=step.rho_changes, strategy=strategy, outliers=e,
                                history=history, timings=timings)  # fmt: skip


def _as_torch(a) -> torch.Tensor:
    """``a`` as a torch tensor (through DLPack, no copy, when it is another namespace's)."""
    return a if isinstance(a, torch.Tensor) else torch.from_dlpack(a)
