"""The working sets by column blocks: the program's certified minimiser past the dense
working sets' ``N`` (issue 99), without an ``N x N`` buffer.

Column ``i``'s program uses the dictionary of all other tokens, but its minimiser's support
is small (video tokens: 40-150 coefficients) and lies among the tokens most correlated with
token ``i``. So the columns run in blocks ``B`` of consecutive tokens, each against a local
dictionary ``T_B``: the block's tokens and each column's
:data:`~videoanchor.anchor.plan.NEIGHBOURS` largest
``|x_i^T x_u|`` (one product ``X X_B^T``, ``N x |B|``). The kernel of
:mod:`videoanchor.anchor.solvers.workset` (:func:`~.workset._columns`) solves the program
restricted to ``c`` supported on ``T_B`` (the outlier part ``e`` over all ``D`` features) on
the local Gram matrix ``X_T X_T^T``. Each column is then checked against the FULL
dictionary: with ``u_i = lambda_z clip(x_i - X^T c_i, t)`` (the certificate's dual point)
one product ``X U_B`` (``N x |B|``) gives every token's multiplier ``x_u^T u_i + nu_i``
(``nu_i`` read off the support, where it is ``sign(c_k) - x_k^T u_i``); a token outside
``T_B`` whose multiplier's magnitude passes ``1 + tol`` (the kernel's test) joins ``T_B``
and the columns that had one run again from their answer. ``T_B`` only grows, so this ends;
where nothing violates, the column's answer is the full program's minimiser, and the same
product gives its duality gap (:func:`~videoanchor.anchor.program.block_gaps`).

Memory: ``X`` and ``E`` (``O(N D)``), ``C`` sparse, and per block ``N x |B|`` products and the
local ``|T_B| x |T_B|`` Gram matrix and answer: :func:`~videoanchor.anchor.plan.
workset_blocks_bytes` sizes ``|B|`` by the memory rule.
"""

from __future__ import annotations

import time
import warnings

import numpy as np
import torch

from videoanchor.anchor.plan import NEIGHBOURS, Plan
from videoanchor.anchor.program import SSCSolution, block_gaps, ssc_lambdas
from videoanchor.anchor.solvers import program_kwargs
from videoanchor.anchor.solvers.workset import GROW, LIMITS, TOL, Limits, _columns, _kernel

__all__ = ["run", "run_workset_blocks"]
#: The most tokens one certificate round adds to a column's block (its worst violators).
JOIN = 64


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


def _blocks(nbr: torch.Tensor, size: int) -> list[torch.Tensor]:
    """The columns in blocks of at most ``size`` whose neighbours overlap: from the first
    token not yet placed, its own neighbours not yet placed, then theirs (``nbr``:
    :func:`_neighbours`), in order; the blocks this leaves short are merged in turn."""
    n = nbr.shape[0]
    nb = nbr.numpy()
    placed = np.zeros(n, dtype=bool)
    blocks, short = [], []
    for i in range(n):
        if placed[i]:
            continue
        members, at = [i], 0
        placed[i] = True
        while len(members) < size and at < len(members):
            for u in nb[members[at]]:
                if not placed[u]:
                    placed[u] = True
                    members.append(int(u))
                    if len(members) == size:
                        break
            at += 1
        if len(members) == size:
            blocks.append(members)
        else:  # (merged with the next short ones)
            short.extend(members)
            if len(short) >= size:
                blocks.append(short[:size])
                short = short[size:]
    if short:
        blocks.append(short)
    return [torch.tensor(sorted(b), dtype=torch.int64) for b in blocks]


def run_workset_blocks(x: torch.Tensor, plan: Plan, *, alpha_e: float, alpha_z: float,
                       neighbours: int | None = None, limits: Limits = LIMITS,
                       threads: int | None = None) -> SSCSolution:  # fmt: skip
    """The program's minimiser for checked features ``x`` (``N x D``) by column blocks of
    ``plan.block_columns`` (module docstring), float64 on the CPU; ``coef`` sparse COO in
    ``plan.work`` on ``x``'s device, ``outliers`` (``E``, ``D x N``) dense.

    ``neighbours``: each column's starting candidates (None:
    :data:`~videoanchor.anchor.plan.NEIGHBOURS`, read at the call). ``limits``: the
    kernel's ``max_passes`` and ``downdate_floor`` (:class:`~.workset.Limits`). ``residual``
    is the largest relative duality gap over the columns of the float64 answer against the
    full dictionary, ``gap`` that of ``coef`` as returned (its dtype's rounding added),
    ``converged`` whether every column ended solved with no violator left, ``iterations`` the
    most certificate rounds a block took. ``timings``: ``neighbours`` (with the lambdas),
    ``workset`` (the kernel on the local dictionaries), ``certificate`` (the full products).
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
    kernel = _kernel()
    x64 = x.detach().to("cpu", torch.float64).contiguous()
    # the neighbours and the lambdas' row maxima from one pass, N x rows at a time (<= 64 MiB)
    nbr, row_max = _neighbours(x64, min(int(neighbours), n - 1),
                               max(1, min(1024, (64 * 2**20) // (8 * n))))  # fmt: skip
    lam_e, lam_z, _, _ = ssc_lambdas(x64, alpha_e, alpha_z, dark=plan.dark, row_max=row_max)
    blocks = _blocks(nbr, block)
    timings = dict.fromkeys(("workset", "certificate"), 0.0)
    timings["neighbours"] = time.perf_counter() - t0
    E = torch.zeros(d, n, dtype=torch.float64)
    rows, cols, vals, gaps, out_gaps = [], [], [], [], []
    solved, rounds, joined, widest = True, 0, 0, 0
    for cb in blocks:
        m = len(cb)
        # the local dictionary: the block's tokens first, then their neighbours
        more = torch.unique(nbr[cb].flatten())
        cand = torch.cat([cb, more[~torch.isin(more, cb)]])
        xt = x64[cand]
        gt = xt @ xt.T  # (grown by the rows of the tokens that join)
        c_blk = torch.zeros(n, m, dtype=torch.float64)  # the block's columns of C
        gap = torch.zeros(m, dtype=torch.float64)
        todo = torch.arange(m)  # the block's columns to run (again)
        for r in range(1, limits.max_passes + 1):
            s = time.perf_counter()
            start = None
            if r > 1:  # warm: each column's answer on the grown dictionary
                start = torch.zeros(len(cand), len(cand), dtype=torch.float64)
                start[:, :m] = c_blk[cand]
            C, Et, status, _, _ = _columns(
                xt, lam_e, lam_z, gt, tol=TOL, grow=GROW, cap=len(cand) + d,
                max_passes=limits.max_passes, threads=min(threads, len(todo)), start=start,
                cols=todo.numpy(), floor=limits.downdate_floor)  # fmt: skip
            if bool((status[todo] != kernel.SOLVED).any()):
                solved = False
            c_blk[:, todo] = 0.0
            c_blk[cand[:, None], todo[None, :]] = C[:, todo]
            E[:, cb[todo]] = Et[:, todo]
            del C, Et, start
            timings["workset"] += time.perf_counter() - s
            s = time.perf_counter()
            # the columns run: every token's multiplier, and their gaps
            g, gaps_r = block_gaps(x64.T, cb[todo], c_blk[:, todo], lam_e, lam_z)
            gap[todo] = gaps_r.gap
            # each column's constraint multiplier from its support: x_k^T u + nu = sign(c_k)
            sup = c_blk[:, todo] != 0
            nu = torch.where(sup, torch.sign(c_blk[:, todo]) - g, 0.0).sum(dim=0) / sup.sum(dim=0)
            viol = g.add_(nu).abs_().sub_(1.0)
            viol[cand] = -1.0  # the local dictionary: the kernel's own test
            bad = (viol > TOL).any(dim=0)
            timings["certificate"] += time.perf_counter() - s
            if not bool(bad.any()):
                break
            top = viol[:, bad].topk(min(JOIN, n), dim=0)
            new = torch.unique(top.indices[top.values > TOL])
            del g, viol, top
            joined += int(new.numel())
            x_new = x64[new]
            cross = x_new @ xt.T
            gt = torch.cat([torch.cat([gt, cross.T], dim=1),
                            torch.cat([cross, x_new @ x_new.T], dim=1)])  # fmt: skip
            cand, xt = torch.cat([cand, new]), torch.cat([xt, x_new])
            todo = todo[bad]
        else:
            solved = False
        rounds, widest = max(rounds, r), max(widest, len(cand))
        gaps.append(float(gap.max()))
        if plan.work != torch.float64:  # the certificate of what is returned
            s = time.perf_counter()
            out = block_gaps(x64.T, cb, c_blk.to(plan.work).to(torch.float64), lam_e, lam_z)[1]
            out_gaps.append(out.max_gap)
            timings["certificate"] += time.perf_counter() - s
        else:
            out_gaps.append(gaps[-1])
        nz = torch.nonzero(c_blk, as_tuple=True)
        rows.append(nz[0])
        cols.append(cb[nz[1]])
        vals.append(c_blk[nz])
        del c_blk, gt, xt
    idx = torch.stack([torch.cat(rows), torch.cat(cols)])
    coef = torch.sparse_coo_tensor(idx, torch.cat(vals).to(plan.work), (n, n),
                                   check_invariants=False).coalesce()  # fmt: skip
    residual, out_gap = max(gaps), max(out_gaps)
    if not solved:
        warnings.warn(f"SSC working sets by blocks: some columns did not end solved (their "
                      f"largest relative duality gap {residual:.3g}); converged=False",
                      UserWarning, stacklevel=2)  # fmt: skip
    timings["total"] = time.perf_counter() - t0
    return SSCSolution(coef=coef.to(x.device), outliers=E.to(x.device, plan.work),
                       iterations=rounds, converged=solved, residual=residual, gap=out_gap,
                       lambda_e=lam_e, lambda_z=lam_z, rho=0.0, solver=plan.solver,
                       strategy="workset_blocks", block_columns=block, timings=timings,
                       history={"joined": joined, "widest": widest})  # fmt: skip
