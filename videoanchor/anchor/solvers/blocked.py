"""Exact SSC, column-blocked: the authors' ADMM on ``b`` columns of ``C`` at a time.

The SSC program of docs/method.md section 2 separates over the columns of ``C`` (column
``i``: ``min ||c||_1 + lambda_e ||e||_1 + (lambda_z / 2) ||y_i - Y c - e||^2`` s.t.
``1^T c = 1``, ``c_i = 0``), coupled only through the global ``lambda_e`` and ``lambda_z``,
and every step of the authors' iteration is column-wise: the A-step applies the fixed
inverse through its Woodbury form (``N x (D + 1)`` factors, built once, float64), the C-
and E-steps and the dual updates act per column. So a block runs against the full ``Y`` in
``O(N D b)`` per iteration and ``O(N b + N D)`` memory, and at a fixed iteration count its
columns equal the dense solver's (up to the products' summation order). The dual is dense,
so blocks run one after another, each to its own end; the finished columns of ``C`` are
kept sparse (no ``N x N`` buffer).

Stopping rule: a block stops when its own part of the authors' norm holds,
``max_i sum_{j in block} |A - C|_ij < eps`` (``block_eps="own"``, the default): it never
runs longer than the dense solver would, and the union of the blocks can be up to
``n_blocks * eps`` away in the authors' norm. ``block_eps="share"`` gives each block
``eps * b / N``, so the assembled ``C`` meets the authors' criterion (at the cost of more
iterations per block). ``block_columns = N`` is exactly the authors' rule with either.

Across processes the blocks are dealt round-robin to the ranks of a ``torch.distributed``
process group and the sparse columns are all-gathered; the partition depends only on
``N``, ``D``, the dtype and the device type, so every rank count gives the same ``C``.
"""

from __future__ import annotations

import time

import torch

from videoanchor.anchor._inputs import prepare_features
from videoanchor.anchor.collective import _all_gather_rows, comm_device, raise_together
from videoanchor.anchor.options import DEFAULTS, SSCOptions, takes_options
from videoanchor.anchor.plan import _BLOCK_BUDGET, Plan, make_plan
from videoanchor.anchor.products import exact_float32
from videoanchor.anchor.program import SSCSolution, ssc_lambdas
from videoanchor.anchor.solvers import admm_steps, program_kwargs
from videoanchor.anchor.solvers.admm import TorchKernels

__all__ = ["run", "run_blocked", "solve_ssc_blocked"]


def _solve_block(dic, factor, a, b, *, thr_e, eps, max_iter, hook):
    """Run the authors' iteration (:class:`~videoanchor.anchor.solvers.admm_steps.SquaredStep`) on
    columns ``a:b``; return the block's sparse columns ``(rows, cols, values)`` and the
    loop's :class:`~videoanchor.anchor.solvers.admm_steps.Outcome`."""
    step = admm_steps.SquaredStep(dic, factor, a, b, thr_e=thr_e, eps=eps)
    out = admm_steps.run(step, max_iter, hook, what=f"blocked SSC-ADMM on columns {a}:{b}")
    rows, cols = step.C.nonzero(as_tuple=True)
    return rows, cols + a, step.C[rows, cols], out


@exact_float32
@takes_options("alpha_e", "alpha_z", "rho", "eps", "max_iter", "dtype", "block_columns",
               "block_eps")  # fmt: skip
def solve_ssc_blocked(features, *, affine: bool = True, outliers: bool = True,
                      process_group=None, keep_history: bool = False,
                      check_memory_first: bool = True, progress=DEFAULTS.progress,
                      **options) -> SSCSolution:  # fmt: skip
    """Solve the SSC program for ``features`` (``N x D``) column block by column block.

    The authors' iteration (docs/method.md section 2; the faithful solver of
    :func:`~videoanchor.anchor.solvers.admm.solve_ssc_admm`) on ``block_columns`` columns at a
    time (default :func:`default_block_columns`), each block stopped by its own part of
    the authors' criterion (``block_eps``, module docstring). ``C`` comes back sparse.
    ``alpha_e``, ``alpha_z``, ``rho``, ``eps``, ``max_iter``, ``dtype``, ``block_columns``
    and ``block_eps`` are :class:`~videoanchor.anchor.SSCOptions`'s (meaning and defaults).

    ``process_group``: a ``torch.distributed`` process group (any backend); the blocks
    are divided among its ranks, rank 0's features are used on every rank, and every rank
    returns the same ``C``. Every rank of the group must call this function.

    ``progress``: as for :func:`~videoanchor.anchor.solvers.admm.solve_ssc_admm` (each rank reports
    its own blocks); a time budget gives block ``k`` of ``B`` until ``(k + 1) / B`` of it. A
    plain callable ``progress(iteration, residual)`` is called in every block
    (``iteration`` counts within the block), and a true return ends that block.
    """
    t0 = time.perf_counter()
    given = SSCOptions.of(options, mode="blocked", solver="faithful", progress=None)
    opts, _, x = prepare_features(features, given, min_tokens=2, process_group=process_group)
    plan = make_plan(x.shape, x.device, opts, process_group=process_group, outliers=outliers,
                     check_memory_first=check_memory_first)  # fmt: skip
    return run_blocked(
        x, plan, alpha_e=opts.alpha_e, alpha_z=opts.alpha_z, rho=opts.rho, eps=opts.eps,
        max_iter=opts.max_iter, affine=affine, outliers=outliers, block_eps=opts.block_eps,
        keep_history=keep_history, progress=progress, t0=t0,
    )  # fmt: skip


def run(x: torch.Tensor, plan: Plan, opts: SSCOptions, *, affine: bool,
        outliers: bool) -> SSCSolution:  # fmt: skip
    """Route ``"blocked"``: :func:`run_blocked` on checked features ``x`` as ``plan`` says,
    with the program's parameters and ``block_eps`` from the checked options ``opts``."""
    return run_blocked(x, plan, affine=affine, outliers=outliers, block_eps=opts.block_eps,
                       **program_kwargs(opts))  # fmt: skip


def run_blocked(x: torch.Tensor, plan: Plan, *, alpha_e: float, alpha_z: float, rho: float,
                eps: float, max_iter: int, affine: bool = True, outliers: bool = True,
                block_eps: str = "own", keep_history: bool = False, progress=None,
                t0: float | None = None) -> SSCSolution:  # fmt: skip
    """:func:`solve_ssc_blocked` on checked features ``x`` (every rank's copy of rank 0's
    under a process group) as ``plan`` says (:class:`~videoanchor.anchor.plan.Plan`: its
    device, working dtype, ``block_columns`` and process group). Nothing is checked here."""
    t0 = time.perf_counter() if t0 is None else t0
    group, rank, world = plan.group, plan.rank, plan.world
    device, work, block = plan.device, plan.work, plan.block_columns
    n = x.shape[0]
    x64 = x.to(torch.float64)
    # the lambdas' Gram pass in row blocks of at most the block budget
    lam_rows = max(1, min(4096, _BLOCK_BUDGET.get(device.type, _BLOCK_BUDGET["cpu"]) // (8 * n)))
    lam_e, lam_z, _, _ = ssc_lambdas(x64, alpha_e, alpha_z, block=lam_rows, dark=plan.dark)
    kernels = TorchKernels(device)
    kernels.sync()
    t1 = time.perf_counter()
    dic = admm_steps.Dictionary(x, work, lam_z=lam_z, affine=affine, outliers=outliers,
                                kernels=kernels)  # fmt: skip
    factor = admm_steps.Woodbury(dic, rho)
    kernels.sync()
    t2 = time.perf_counter()

    starts = list(range(0, n, block))
    mine = [k for k in range(len(starts)) if k % world == rank]
    rows, cols, vals, stats = [], [], [], []
    history: dict[int, list[float]] = {}
    error = None
    report = admm_steps.Reporting(progress, max_iter=max_iter, eps=eps, tokens=n, blocks=len(mine))
    try:
        for k in mine:
            a = starts[k]
            b = min(n, a + block)
            eps_k = eps if block_eps == "own" else eps * (b - a) / n
            hist: list[float] = []
            record = (lambda it, r, h=hist: h.append(r)) if keep_history else None
            r, c, v, out = _solve_block(dic, factor, a, b, thr_e=lam_e / lam_z, eps=eps_k,
                                        max_iter=max_iter,
                                        hook=admm_steps.chain(record, report.hook))  # fmt: skip
            report.next_block()
            rows.append(r)
            cols.append(c)
            vals.append(v)
            stats.append(
                [float(k), float(out.iterations), out.residual, out.converged, out.stopped]
            )
            if keep_history:
                history[k] = hist
    except (FloatingPointError, RuntimeError, MemoryError) as exc:
        error = exc
    finally:
        report.close(
            all(s[3] > 0 for s in stats), max((int(s[1]) for s in stats), default=0),
            max((s[2] for s in stats), default=0.0), error,
        )  # fmt: skip
    raise_together(group, error, device)
    if rows:
        idx, vals_t = torch.stack([torch.cat(rows), torch.cat(cols)]), torch.cat(vals)
    else:
        idx = torch.empty(2, 0, dtype=torch.long, device=device)
        vals_t = torch.empty(0, dtype=work, device=device)
    del rows, cols, vals
    stats_t = torch.tensor(stats, dtype=torch.float64).reshape(-1, 5)
    kernels.sync()
    t3 = time.perf_counter()

    if group is not None:
        dev = comm_device(group, device)
        idx = torch.cat(_all_gather_rows(idx.T.contiguous(), group, dev)).T
        vals_t = torch.cat(_all_gather_rows(vals_t, group, dev))
        stats_t = torch.cat(_all_gather_rows(stats_t, group, dev))
        if keep_history:
            import torch.distributed as dist

            every: list[dict] = [{} for _ in range(world)]
            dist.all_gather_object(every, history, group=group)
            history = {k: h for part in every for k, h in part.items()}
    order = torch.argsort(stats_t[:, 0])
    stats_t = stats_t[order]
    coef = torch.sparse_coo_tensor(idx, vals_t, (n, n), check_invariants=False).coalesce()
    del idx, vals_t
    kernels.sync()
    t4 = time.perf_counter()
    block_its = [int(v) for v in stats_t[:, 1].tolist()]
    block_res = [float(v) for v in stats_t[:, 2].tolist()]
    return SSCSolution(
        coef=coef, iterations=max(block_its), converged=bool((stats_t[:, 3] > 0).all()),
        stopped=bool((stats_t[:, 4] > 0).any()), residual=max(block_res), lambda_e=lam_e,
        lambda_z=lam_z, rho=float(rho), solver=plan.solver, block_columns=block, block_iterations=block_its,
        block_residuals=block_res, history=history, world_size=world,
        timings={"lambdas": t1 - t0, "factor": t2 - t1, "admm": t3 - t2, "gather": t4 - t3},
    )  # fmt: skip
