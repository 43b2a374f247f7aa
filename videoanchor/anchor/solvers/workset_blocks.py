"""The working sets by column blocks: the program's certified minimiser past the dense
working sets' ``N`` (issue 99), without an ``N x N`` buffer.

Column ``i``'s program uses the dictionary of all other tokens, but its minimiser's support
is small (video tokens: 40-150 coefficients). So each column runs against a local
dictionary ``T_i``: its token and its :data:`~videoanchor.anchor.plan.NEIGHBOURS` others of
largest ``|x_i^T x_u|`` (found with the lambdas' row maxima in one streamed pass over
``X X^T``). The kernel of :mod:`videoanchor.anchor.solvers.workset` (:func:`~.workset._columns`)
solves the program restricted to ``c`` supported on ``T_i`` (the outlier part ``e`` over
all ``D`` features) on the local Gram matrix ``X_T X_T^T``. The columns are then checked in
batches (``plan.block_columns`` consecutive columns) against the FULL dictionary: with
``u_i = lambda_z clip(x_i - X^T c_i, t)`` (the certificate's dual point) one product
``X U_B`` (``N x |B|``) gives every token's multiplier ``x_u^T u_i + nu_i`` (``nu_i`` read off
the support, where it is ``sign(c_k) - x_k^T u_i``); the :data:`JOIN` worst tokens outside
``T_i`` whose multiplier's magnitude passes ``1 + tol`` (the kernel's test) join it (its
Gram matrix grows by their rows) and the column runs again from its answer. ``T_i`` only
grows, so this ends; where nothing violates, the column's answer is the full program's
minimiser, and the same product gives its duality gap
(:func:`~videoanchor.anchor.program.block_gaps`).

Memory: ``X`` and ``E`` (``O(N D)``), ``C`` sparse, per batch ``N x |B|`` products and its
columns' local dictionaries: :func:`~videoanchor.anchor.plan.workset_blocks_bytes`.
Cost (measured on video-like tokens, issue 99): a column touches ~500 tokens before it is
certified (~10 rounds), so the local solves cost more per column than the dense working
sets' at N = 2048-4096; what they save is the ``N x N`` Gram matrix.

Across processes (a ``torch.distributed`` process group in the plan) the batches are dealt
round-robin to the ranks (rank ``r`` solves batches ``r, r + world, ...``; a column's answer
depends only on ``X`` and its batch, so every rank count gives the same ``C`` to the bit),
and the answer is gathered once: each rank's sparse columns all-gathered, ``E`` summed.
"""

from __future__ import annotations

import time
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from videoanchor.anchor.collective import _all_gather_rows, all_sum, comm_device, raise_together
from videoanchor.anchor.plan import NEIGHBOURS, Plan
from videoanchor.anchor.program import SSCSolution, block_gaps, ssc_lambdas
from videoanchor.anchor.solvers import program_kwargs
from videoanchor.anchor.solvers.workset import LIMITS, TOL, Limits, _columns, _kernel

__all__ = ["run", "run_workset_blocks"]

#: The most tokens one certificate round adds to a column's dictionary (its worst violators).
JOIN = 128


def run(x: torch.Tensor, plan: Plan, opts, *, affine: bool, outliers: bool) -> SSCSolution:
    """Route ``"workset_blocks"``: :func:`run_workset_blocks` on checked features ``x`` as
    ``plan`` says, with the program's parameters from the checked options ``opts``."""
    if not (affine and outliers):
        raise ValueError(
            "the working sets by blocks solve the method's program (affine=True, "
            f"outliers=True), got affine={affine}, outliers={outliers}; use solver='faithful'"
        )
    kw = program_kwargs(opts)
    return run_workset_blocks(x, plan, alpha_e=kw["alpha_e"], alpha_z=kw["alpha_z"])


def _neighbours(x64: torch.Tensor, k: int, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each token's ``k`` others of largest ``|x_i^T x_u|`` (``N x k``, long) and the largest,
    ``max_{u != i} |x_i^T x_u|`` (:func:`~videoanchor.anchor.program.gram_row_max`'s, for the
    lambdas), ``rows`` tokens at a time (an ``N x rows`` product)."""
    n = x64.shape[0]
    out, row_max = torch.empty(n, k, dtype=torch.int64), torch.empty(n, dtype=torch.float64)
    for a in range(0, n, rows):
        b = min(n, a + rows)
        near = (x64 @ x64[a:b].T).abs_()
        near[torch.arange(a, b), torch.arange(b - a)] = -1.0  # (never the token itself)
        top = near.topk(k, dim=0)
        out[a:b], row_max[a:b] = top.indices.T, top.values[0].clamp_min(0.0)
    return out, row_max


class _Column:
    """One column's local dictionary (its token first, at 0), its Gram matrix, its answer
    on it (``c`` over the dictionary, ``e`` over the features) and its status."""

    def __init__(self, x64: torch.Tensor, i: int, near: torch.Tensor):
        self.cand = torch.cat([torch.tensor([i]), near])
        self.xt = x64[self.cand]
        self.gt = self.xt @ self.xt.T
        self.c = self.e = None
        self.status = -1

    def release(self) -> int:
        """Its dictionary's size; the dictionary and Gram matrix freed (the column is done)."""
        self.xt = self.gt = None
        return len(self.cand)

    def grow(self, x64: torch.Tensor, new: torch.Tensor) -> None:
        """``new`` tokens (not in the dictionary) join it: the Gram matrix's new rows only."""
        if not len(new):
            return
        x_new = x64[new]
        cross = x_new @ self.xt.T
        self.gt = torch.cat([torch.cat([self.gt, cross.T], dim=1),
                             torch.cat([cross, x_new @ x_new.T], dim=1)])  # fmt: skip
        self.cand, self.xt = torch.cat([self.cand, new]), torch.cat([self.xt, x_new])
        self.c = torch.cat([self.c, torch.zeros(len(new), dtype=self.c.dtype)])

    def solve(self, x64: torch.Tensor, new: torch.Tensor, lam_e: float, lam_z: float,
              limits: Limits) -> None:  # fmt: skip
        """The program restricted to the dictionary with ``new`` tokens joined
        (:meth:`grow`), by the kernel, from the last answer (or the nearest point)."""
        self.grow(x64, new)
        k, d = len(self.cand), self.xt.shape[1]
        start = None
        if self.c is not None:
            start = torch.zeros(k, k, dtype=torch.float64)
            start[:, 0] = self.c
        C, E, status, _, _ = _columns(self.xt, lam_e, lam_z, self.gt, tol=TOL,
                                      cap=k + d, max_passes=limits.max_passes, threads=1,
                                      start=start, cols=np.zeros(1, dtype=np.int64),
                                      floor=limits.downdate_floor)  # fmt: skip
        self.c, self.e, self.status = C[:, 0].clone(), E[:, 0].clone(), int(status[0])


def _block(x64, cb, nbr, E, lam_e: float, lam_z: float, limits: Limits, pool):
    """The columns ``cb`` (consecutive), each on its own dictionary grown until no token
    outside it violates (module docstring): ``(rounds, C_B, gaps, record)``, ``C_B`` the
    columns (``N x |B|``, dense float64), their relative duality gaps, ``record`` (whether
    all ended solved, the tokens joined, the widest dictionary, seconds of ``"workset"`` and
    ``"certificate"``). ``E``'s columns are written in place."""
    n, m = x64.shape[0], len(cb)
    kernel = _kernel()
    cols = [_Column(x64, int(i), nbr[i]) for i in cb]
    c_blk = torch.zeros(n, m, dtype=torch.float64)
    gap = torch.zeros(m, dtype=torch.float64)
    rec = dict(solved=True, joined=0, widest=0, workset=0.0, certificate=0.0)
    todo = torch.arange(m)
    joins = [torch.empty(0, dtype=torch.int64)] * m
    for r in range(1, limits.max_passes + 1):  # noqa: B007 - the rounds, returned
        s = time.perf_counter()
        run = [cols[j] for j in todo.tolist()]

        def solve(j: int, new) -> None:
            cols[j].solve(x64, new, lam_e, lam_z, limits)

        if pool is None:
            for j, new in zip(todo.tolist(), joins, strict=True):
                solve(j, new)
        else:
            list(pool.map(solve, todo.tolist(), joins))
        for j, col in zip(todo.tolist(), run, strict=True):
            rec["solved"] &= col.status == kernel.SOLVED
            c_blk[:, j] = 0.0
            c_blk[col.cand, j] = col.c
            E[:, int(cb[j])] = col.e
        rec["workset"] += time.perf_counter() - s
        s = time.perf_counter()
        # the columns run: every token's multiplier, and their gaps
        g, gaps_r = block_gaps(x64.T, cb[todo], c_blk[:, todo], lam_e, lam_z)
        gap[todo] = gaps_r.gap
        # each column's constraint multiplier from its support: x_k^T u + nu = sign(c_k)
        sup = c_blk[:, todo] != 0
        nu = torch.where(sup, torch.sign(c_blk[:, todo]) - g, 0.0).sum(dim=0) / sup.sum(dim=0)
        viol = g.add_(nu).abs_().sub_(1.0)
        for j, col in enumerate(run):
            viol[col.cand, j] = -1.0  # its dictionary: the kernel's own test
        top = viol.topk(min(JOIN, n), dim=0)
        del g, viol
        bad = top.values[0] > TOL
        rec["certificate"] += time.perf_counter() - s
        if not bool(bad.any()):
            break
        joins = [top.indices[:, j][top.values[:, j] > TOL]
                 for j in torch.nonzero(bad).flatten().tolist()]  # fmt: skip
        rec["joined"] += sum(len(new) for new in joins)
        for j in todo[~bad].tolist():  # certified: its dictionary goes
            rec["widest"] = max(rec["widest"], cols[j].release())
        todo = todo[bad]
    else:
        rec["solved"] = False
    rec["widest"] = max(rec["widest"], *(cols[j].release() for j in todo.tolist()))
    return r, c_blk, gap, rec


def run_workset_blocks(x: torch.Tensor, plan: Plan, *, alpha_e: float, alpha_z: float,
                       neighbours: int | None = None, limits: Limits = LIMITS,
                       threads: int | None = None) -> SSCSolution:  # fmt: skip
    """The program's minimiser for checked features ``x`` (``N x D``; under a process group
    every rank's copy of rank 0's) by column blocks of ``plan.block_columns`` (module
    docstring), float64 on the CPU; ``coef`` sparse COO in ``plan.work`` on ``x``'s device,
    ``outliers`` (``E``, ``D x N``) dense.

    ``neighbours``: each column's starting candidates (None:
    :data:`~videoanchor.anchor.plan.NEIGHBOURS`, read at the call). ``limits``: the
    kernel's ``max_passes`` and ``downdate_floor`` (:class:`~.workset.Limits`). ``residual``
    is the largest relative duality gap over the columns of the float64 answer against the
    full dictionary, ``gap`` that of ``coef`` as returned (its dtype's rounding added),
    ``converged`` whether every column ended solved with no violator left, ``iterations`` the
    most certificate rounds a block took. ``timings`` (this rank's): ``neighbours`` (with the
    lambdas), ``workset`` (the kernel on the local dictionaries), ``certificate`` (the full
    products), ``gather`` (the ranks' answers collected). ``history``: ``joined`` (tokens
    added by the certificate, all ranks), ``widest`` (the widest local dictionary, all ranks),
    ``columns`` (the columns this rank solved: ``N`` alone).

    Under ``plan.group`` every rank of the group must call this; rank ``plan.rank`` solves the
    batches ``plan.rank, plan.rank + plan.world, ...`` and every rank returns the same answer
    (a rank that fails raises its error, the others ``OTHER_RANK_FAILED``).
    """
    t0 = time.perf_counter()
    n, d = x.shape
    if n < 2:
        raise ValueError(f"SSC needs at least 2 points, got N = {n}")
    neighbours = NEIGHBOURS if neighbours is None else neighbours
    if isinstance(neighbours, bool) or int(neighbours) < 1:
        raise ValueError(f"neighbours: expected a positive integer, got {neighbours}")
    block = max(1, min(int(plan.block_columns or n), n))
    threads = torch.get_num_threads() if threads is None else int(threads)
    group, rank, world = plan.group, plan.rank, plan.world
    cpu = torch.device("cpu")
    x64 = x.detach().to(cpu, torch.float64).contiguous()
    # the neighbours and the lambdas' row maxima from one pass, N x 256 at a time (<= 64 MiB)
    nbr, row_max = _neighbours(x64, min(int(neighbours), n - 1),
                               max(1, min(256, (64 * 2**20) // (8 * n))))  # fmt: skip
    lam_e, lam_z, _, _ = ssc_lambdas(x64, alpha_e, alpha_z, dark=plan.dark, row_max=row_max)
    timings = dict.fromkeys(("workset", "certificate"), 0.0)
    timings["neighbours"] = time.perf_counter() - t0
    E = torch.zeros(d, n, dtype=torch.float64)
    rows, cols, vals, gaps, out_gaps = [], [], [], [], []
    solved, rounds, joined, widest, mine = True, 0, 0, 0, 0
    error = None
    pool = ThreadPoolExecutor(threads) if threads > 1 else None
    try:
        for a in range(rank * block, n, world * block):  # this rank's batches
            cb = torch.arange(a, min(n, a + block))
            r, c_blk, gap, more = _block(x64, cb, nbr, E, lam_e, lam_z, limits, pool)
            solved &= more["solved"]
            rounds, joined = max(rounds, r), joined + more["joined"]
            widest, mine = max(widest, more["widest"]), mine + len(cb)
            for k in ("workset", "certificate"):
                timings[k] += more[k]
            gaps.append(float(gap.max()))
            if plan.work != torch.float64:  # the certificate of what is returned
                s = time.perf_counter()
                out = block_gaps(x64.T, cb, c_blk.to(plan.work).to(torch.float64), lam_e,
                                 lam_z)[1]  # fmt: skip
                out_gaps.append(out.max_gap)
                timings["certificate"] += time.perf_counter() - s
            else:
                out_gaps.append(gaps[-1])
            nz = torch.nonzero(c_blk, as_tuple=True)
            rows.append(nz[0])
            cols.append(cb[nz[1]])
            vals.append(c_blk[nz])
            del c_blk
    except Exception as exc:  # raised on every rank below, so that none is left waiting
        error = exc
    finally:
        if pool is not None:
            pool.shutdown()
    raise_together(group, error, cpu)
    s = time.perf_counter()
    if rows:
        idx, vals_t = torch.stack([torch.cat(rows), torch.cat(cols)]), torch.cat(vals).to(plan.work)
    else:  # (more ranks than batches)
        idx, vals_t = torch.empty(2, 0, dtype=torch.int64), torch.empty(0, dtype=plan.work)
    del rows, cols, vals
    # one row per rank: what the answer's record takes the max, sum or all of
    stats = torch.tensor([[max(gaps, default=0.0), max(out_gaps, default=0.0), rounds,
                           widest, joined, float(solved)]], dtype=torch.float64)  # fmt: skip
    if group is not None:  # every column is one rank's alone: E's sum is exact
        dev = comm_device(group, cpu)
        idx = torch.cat(_all_gather_rows(idx.T.contiguous(), group, dev)).T
        vals_t = torch.cat(_all_gather_rows(vals_t, group, dev))
        stats = torch.cat(_all_gather_rows(stats, group, dev))
        E = all_sum(E, group)
    coef = torch.sparse_coo_tensor(idx, vals_t, (n, n), check_invariants=False).coalesce()
    del idx, vals_t
    top = stats.max(dim=0).values
    residual, out_gap, rounds, widest = float(top[0]), float(top[1]), int(top[2]), int(top[3])
    joined, solved = int(stats[:, 4].sum()), bool((stats[:, 5] > 0).all())
    timings["gather"] = time.perf_counter() - s
    if not solved:
        warnings.warn(f"SSC working sets by blocks: some columns did not end solved (their "
                      f"largest relative duality gap {residual:.3g}); converged=False",
                      UserWarning, stacklevel=2)  # fmt: skip
    timings["total"] = time.perf_counter() - t0
    return SSCSolution(coef=coef.to(x.device), outliers=E.to(x.device, plan.work),
                       iterations=rounds, converged=solved, residual=residual, gap=out_gap,
                       lambda_e=lam_e, lambda_z=lam_z, rho=0.0, solver=plan.solver,
                       strategy="workset_blocks", block_columns=block, timings=timings,
                       history={"joined": joined, "widest": widest, "columns": mine},
                       world_size=world)  # fmt: skip
