"""The working sets by column blocks: the program's certified minimiser past the dense
working sets' ``N`` (issue 99), without an ``N x N`` buffer.

Column ``i``'s program uses the dictionary of all other tokens, but its minimiser's support
is small (video tokens: 40-150 coefficients). So each column runs against a local
dictionary ``T_i``: its token and its :data:`~videoanchor.anchor.plan.NEIGHBOURS` others of
largest ``|x_i^T x_u|`` (found with the lambdas' row maxima in one streamed pass over
``X X^T``), and the supports of the nearest columns already solved, with their tokens
(:class:`_Seeds`: a video token's near copies in the neighbouring frames). The kernel of
:mod:`videoanchor.anchor.solvers.workset` (:func:`~.workset._columns`) solves the program
restricted to ``c`` supported on ``T_i`` (the outlier part ``e`` over all ``D`` features) on
the local Gram matrix ``X_T X_T^T``. The columns are then checked ``plan.block_columns`` at
a time (:func:`_stream`: a column that ends makes room for the next, in token order)
against the FULL dictionary: with
``u_i = lambda_z clip(x_i - X^T c_i, t)`` (the certificate's dual point) one product
``X U_B`` (``N x |B|``) gives every token's multiplier ``x_u^T u_i + nu_i`` (``nu_i`` read off
the support, where it is ``sign(c_k) - x_k^T u_i``); the :data:`JOIN` worst tokens outside
``T_i`` whose multiplier's magnitude passes ``1 + tol`` (the kernel's test) join it, the
tokens the answer left at zero leave it (``T_i`` becomes the token, its support and the
joiners: the Gram matrix keeps the support's rows and computes the joiners' only), and the
column runs again from its answer. Each round's restricted minimum is below the last (the
last answer is a point of the new restricted program, and a violator joining lowers its
minimum), so no dictionary comes back and this ends; where nothing violates, the column's
answer is the full program's minimiser, and the same product gives its duality gap
(:func:`~videoanchor.anchor.program.block_gaps`).

Memory: ``X`` and ``E`` (``O(N D)``), ``C`` sparse, per batch ``N x |B|`` products and its
columns' local dictionaries: :func:`~videoanchor.anchor.plan.workset_blocks_bytes`.
Cost (``benchmarks/results/long_video_cpu.json``: video-like tokens, 8 x 16 patches a frame,
D = 512, 2 threads, issue 99): a column's support is spread over the whole video (at
N = 8192 the 1024 tokens nearest a token hold a quarter of its support), so before the seeds
a batch took 19, 30, 39 and 59 rounds at N = 2048, 4096, 8192 and 20480, each a kernel call
per column on ~100-250 tokens, ``JOIN x k x D`` of Gram rows and one ``N x D x |B|``
product, screened in float32 (``long_video_screen_cpu.json``: 106.9 s at N = 8192 and
572 s at 20480; 12.1 s and 41.8 s at 2048 and 4096), 1.2-3.6x the dense working sets where
they run. Seeded and streamed (``long_video_seeds_cpu.json``): 546.6 s at N = 20480, 6.4x
and 7.1x the dense working sets at N = 8192 in the same run. What it saves is the ``N x N``
Gram matrix (peak growth 835 MiB at N = 20480; the dense working sets' 2.4 GiB at 8192).

Across processes (a ``torch.distributed`` process group in the plan) the batches are dealt
round-robin to the ranks (rank ``r`` solves batches ``r, r + world, ...``; its columns are
seeded by the columns it solved, and run beside its other columns), and the answer is
gathered once: each rank's sparse columns all-gathered, ``E`` summed. Every rank count gives
the same certified minimiser; its rounding follows the path to it (the seeds, the products'
widths), and so the rank count.
"""

from __future__ import annotations

import math
import time
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from videoanchor.anchor.collective import _all_gather_rows, all_sum, comm_device, raise_together
from videoanchor.anchor.plan import (
    JOIN,
    NEIGHBOURS,
    SEED_NEAR,
    SEED_TOKENS,
    SEEDS,
    Plan,
    neighbour_rows,
)
from videoanchor.anchor.program import (
    SSCSolution,
    block_gaps,
    nearest_points,
    screen_error,
    ssc_lambdas,
)
from videoanchor.anchor.solvers import admm_steps, program_kwargs
from videoanchor.anchor.solvers.workset import LIMITS, MAX_STEPS, TOL, Limits, _grows, _kernel

__all__ = ["run", "run_workset_blocks"]


def run(x: torch.Tensor, plan: Plan, opts, *, affine: bool, outliers: bool) -> SSCSolution:
    """Route ``"workset_blocks"``: :func:`run_workset_blocks` on checked features ``x`` as
    ``plan`` says, with the program's parameters from the checked options ``opts``."""
    if not (affine and outliers):
        raise ValueError(
            "the working sets by blocks solve the method's program (affine=True, "
            f"outliers=True), got affine={affine}, outliers={outliers}; use solver='faithful'"
        )
    kw = program_kwargs(opts)
    return run_workset_blocks(x, plan, alpha_e=kw["alpha_e"], alpha_z=kw["alpha_z"],
                              progress=kw.get("progress"))  # fmt: skip


def _neighbours(x64: torch.Tensor, k: int, rows: int,
                close: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """Each token's ``k`` others of largest ``|x_i^T x_u|`` (``N x k``, long), the largest,
    ``max_{u != i} |x_i^T x_u|`` (:func:`~videoanchor.anchor.program.gram_row_max`'s, for the
    lambdas), and its ``close`` nearest others by distance (``N x close``, long, nearest
    first: the columns whose answers seed its dictionary), ``rows`` tokens at a time (an
    ``N x rows`` product)."""
    n = x64.shape[0]
    out, row_max = torch.empty(n, k, dtype=torch.int64), torch.empty(n, dtype=torch.float64)
    nearest = torch.empty(n, close, dtype=torch.int64)
    sq = (x64 * x64).sum(dim=1) if close else None
    for a in range(0, n, rows):
        b = min(n, a + rows)
        near = x64 @ x64[a:b].T
        own = (torch.arange(a, b), torch.arange(b - a))
        if close:  # ||x_u - x_i||^2 up to ||x_i||^2, the token itself left out
            dist = near.mul(-2.0).add_(sq[:, None])
            dist[own] = math.inf
            nearest[a:b] = dist.topk(close, dim=0, largest=False).indices.T
            del dist
        near.abs_()[own] = -1.0  # (never the token itself)
        top = near.topk(k, dim=0)
        out[a:b], row_max[a:b] = top.indices.T, top.values[0].clamp_min(0.0)
    return out, row_max, nearest


class _Seeds:
    """The answers this rank has found so far, as seeds of the next columns' dictionaries.

    A video's token has near copies (its patch in the neighbouring frames), and the
    program's minimiser moves continuously with the token; so a column's first dictionary
    takes, besides its :data:`~videoanchor.anchor.plan.NEIGHBOURS`, the supports of up to
    :data:`~videoanchor.anchor.plan.SEEDS` of its :data:`~videoanchor.anchor.plan.SEED_NEAR`
    nearest tokens (by distance) whose columns this rank has solved, and those tokens, the
    nearest first, at most :data:`~videoanchor.anchor.plan.SEED_TOKENS` of them. At
    N = 20480 (160 video-like frames, D = 512) they cut a batch's column-rounds from about
    2,000 to 950-1,250 (one-off; ``docs/long-videos.md``). The answer is the certified
    minimiser whatever the seeds; only the path to it, and so its rounding, depends
    on which columns were solved first (on the rank count)."""

    def __init__(self, n: int, nearest: torch.Tensor):
        self.nearest = nearest.numpy()
        self.support: list[np.ndarray | None] = [None] * n

    def first(self, i: int, near: np.ndarray) -> np.ndarray:
        """Column ``i``'s first dictionary past its token: ``near`` and the seeds, each token
        once (``near``'s order first), never ``i``."""
        parts = [near]
        for u in self.nearest[i]:
            s = self.support[u]
            if s is not None:
                parts += [s, np.array([u])]
                if len(parts) > 2 * SEEDS:
                    break
        cand = np.concatenate(parts)
        _, first_at = np.unique(cand, return_index=True)
        cand = cand[np.sort(first_at)]
        return cand[cand != i][: len(near) + SEED_TOKENS]


class _Column:
    """One column's local dictionary ``cand`` (its token first, at 0; then its support and
    the tokens that joined last), their features ``xt`` and Gram matrix ``gt``, its answer
    on it (``c`` over ``cand``, ``e`` over the features) and the kernel's status; NumPy
    throughout (its products release the GIL in the worker threads and leave torch's
    thread settings, which a model running beside may use, alone)."""

    def __init__(self, x64: np.ndarray, i: int, near: np.ndarray):
        self.i, self.rounds = i, 0
        self.cand = np.concatenate([[i], near])
        self.xt = x64[self.cand]
        self.gt = None  # (its first solve's, in a worker thread)
        self.c = self.e = self.res = self.new = None
        self.status = -1

    def release(self, work: torch.dtype = torch.float64) -> int:
        """Its dictionary's size; the dictionary and Gram matrix freed (the column is done),
        its answer rounded to ``work`` kept with that answer's residual (``c_out``,
        ``res_out``: the certificate of what is returned) where ``work`` is not float64."""
        if work != torch.float64 and self.xt is not None:
            self.c_out = torch.from_numpy(self.c).to(work).double().numpy()
            self.res_out = self.xt[0] - self.c_out @ self.xt
        self.xt = self.gt = None
        return len(self.cand)

    def regrow(self, x64: np.ndarray, new: np.ndarray) -> None:
        """The dictionary becomes the token, its support and ``new`` (tokens outside it):
        the tokens of the last dictionary that the answer left out go (a violator among
        them joins again by the certificate; keeping those near the bound, tried, took more
        time for fewer rounds), the Gram matrix keeps the rows of those that stay and
        computes the new ones' only (``|new| x k x D``)."""
        keep = np.concatenate([[0], np.flatnonzero(self.c)])
        xk, x_new = self.xt[keep], x64[new]
        cross = x_new @ xk.T
        self.gt = np.block([[self.gt[np.ix_(keep, keep)], cross.T], [cross, x_new @ x_new.T]])
        self.cand, self.xt = np.concatenate([self.cand[keep], new]), np.concatenate([xk, x_new])
        self.c = np.concatenate([self.c[keep], np.zeros(len(new))])

    def solve(self, x64: np.ndarray, lam_e: float, lam_z: float, limits: Limits) -> None:
        """The program restricted to the dictionary by the kernel (one column, called
        directly: a ``k x 1`` output), from the last answer (or the nearest point). Where
        the kernel does not solve it from the last answer (a support of ``D + 1`` tokens
        can stall its inner steps), once more from the dictionary's nearest point."""
        if self.gt is None:
            self.gt = self.xt @ self.xt.T
        if self.new is not None:  # (the last round's joiners, here in a worker thread)
            self.regrow(x64, self.new)
            self.new = None
        k = self.xt.shape[0]
        if self.c is not None:
            nz, fe = np.flatnonzero(self.c), np.flatnonzero(self.e)
            self._run(np.concatenate([nz, k + fe]), np.concatenate([self.c[nz], self.e[fe]]),
                      lam_e, lam_z, limits)  # fmt: skip
            if self.status == _kernel().SOLVED:
                return
        near = nearest_points(torch.from_numpy(self.gt), torch.zeros(1, dtype=torch.int64))
        self._run(near.numpy(), np.ones(1), lam_e, lam_z, limits)

    def _run(self, var: np.ndarray, val: np.ndarray, lam_e: float, lam_z: float,
             limits: Limits) -> None:  # fmt: skip
        kernel = _kernel()
        k, d = self.xt.shape
        xt = self.xt
        C, E = np.zeros((k, 1)), np.zeros((d, 1))  # (the kernel writes column 0 alone)
        status = np.full(k, -1, dtype=np.int64)
        passes, work = np.zeros(k, dtype=np.int64), np.zeros(k)
        grow, grow_max = _grows(None)
        kernel.run_columns(_FIRST, 0, 1, self.gt, xt, _transposed(xt),
                           np.array([0, len(var)], dtype=np.int64), var, val, lam_z, lam_e, TOL,
                           grow, grow_max, k + d, k - 1, limits.max_passes, MAX_STEPS, np.inf,
                           C, E, status, passes, work, np.array([0, 2], dtype=np.int64),
                           limits.downdate_floor)  # fmt: skip
        self.c, self.e, self.status = C[:, 0].copy(), E[:, 0].copy(), int(status[0])
        self.res = xt[0] - self.c @ xt  # (the certificate's residual, without e)


def _transposed(a: np.ndarray) -> np.ndarray:
    """``a.T`` contiguous (torch's copy: a quarter of NumPy's time at 250 x 512)."""
    return torch.from_numpy(a).T.contiguous().numpy()


#: The one column :meth:`_Column.solve` asks of the kernel: the first of its dictionary.
_FIRST = np.zeros(1, dtype=np.int64)


def _stream(x64, order, nbr, E, lam_e: float, lam_z: float, limits: Limits, pool,
            width: int, work: torch.dtype = torch.float64, report=None, screen=None,
            x_norm: float = 0.0, seeds: _Seeds | None = None):  # fmt: skip
    """The columns ``order`` (long), each on its own dictionary until no token outside it
    violates (module docstring), ``width`` of them at a time: a column that ends makes room
    for the next of ``order`` in the next round, so every round's products and solves run
    at the full width until the last columns. Returns ``(rounds, (rows, cols, vals), gap,
    out_gap, record)``: the most certificate rounds a column took, the columns' non-zeros,
    the largest relative duality gap of the float64 answers and of the answers rounded to
    ``work`` (the float64 one where ``work`` is float64), and ``record`` (whether all ended
    solved, the tokens joined, the widest dictionary, seconds of ``"workset"`` and
    ``"certificate"``, the column-rounds ``"screened"`` and ``"exact"``). ``E``'s columns are
    written in place. ``report`` (:class:`~.admm_steps.Reporting`): each round reported with
    the largest gap of the columns that ran it; a block is ``width`` columns ended (and the
    last ones). A column the kernel does not solve, or still violated after
    ``limits.max_passes`` rounds, leaves (``record["solved"]`` false). No ``N x width``
    copy of the columns is made: a round's certificate reads each column's residual, sums
    and support from its own dictionary. ``seeds``: the ended columns' supports kept, the new ones' dictionaries
    seeded.

    ``screen`` (``X`` in float32, or None; ``x_norm`` its largest row norm): each round's
    product in float32 first; a solved column whose worst multiplier there passes the
    kernel's test by more than the float32 error
    (:func:`~videoanchor.anchor.program.screen_error`) takes its joiners from it, the others
    (the columns that may be done, and those the kernel left unsolved: their gaps are
    reported) the float64 product, which alone certifies. Joiners read from float32 may
    include a token at the bound (it joins, is left at zero and goes), never a column's last
    round."""
    n = x64.shape[0]
    kernel = _kernel()
    x64n = x64.numpy()
    order = order.tolist()
    rec = dict(solved=True, joined=0, widest=0, workset=0.0, certificate=0.0, screened=0, exact=0)
    active: list[_Column] = []
    rows, cols, vals = [], [], []  # (the ended columns' non-zeros)
    pending: list[_Column] = []  # (ended, their rounded answers not yet certified)
    gap, out_gap, rounds, at, in_block = 0.0, 0.0, 0, 0, 0

    def solve(col: _Column) -> None:
        col.solve(x64n, lam_e, lam_z, limits)

    def rounded(cols: list) -> float:
        idx = torch.tensor([col.i for col in cols])
        return block_gaps(x64.T, idx, *_stats(cols, rounded=True), lam_e, lam_z)[1].max_gap

    while at < len(order) or active:
        while len(active) < width and at < len(order):
            i = order[at]
            near = nbr[i].numpy()
            active.append(_Column(x64n, i, near if seeds is None else seeds.first(i, near)))
            at += 1
        s = time.perf_counter()
        if pool is None:
            for col in active:
                solve(col)
        else:
            list(pool.map(solve, active))
        rec["workset"] += time.perf_counter() - s
        s = time.perf_counter()
        # the columns run: every token's multiplier, and their gaps
        idx = torch.tensor([col.i for col in active])
        stats = _stats(active)
        u_norm = stats[0].clamp(-lam_e / lam_z, lam_e / lam_z).norm(dim=0) * lam_z
        g, gaps_r = block_gaps(x64.T, idx, *stats, lam_e, lam_z, screen=screen)
        top = _joiners(g, active, n)
        del g, stats
        solved = torch.tensor([col.status == kernel.SOLVED for col in active])
        if screen is not None:  # the columns that may be done: the float64 product
            sure = (top.values[0] - screen_error(x64.shape[1], x_norm, u_norm) > TOL) & solved
            again = torch.nonzero(~sure).flatten()
            rec["screened"] += len(active) - len(again)
            if len(again):
                sub = [active[j] for j in again.tolist()]
                g, gaps_a = block_gaps(x64.T, idx[again], *_stats(sub), lam_e, lam_z)
                exact = _joiners(g, sub, n)
                del g
                top.values[:, again], top.indices[:, again] = exact.values, exact.indices
                gaps_r.gap[again] = gaps_a.gap
        rec["exact"] += len(active) if screen is None else len(again)
        in_block += 1
        if report is not None:
            report.hook(in_block, float(gaps_r.gap.max()))
        rec["solved"] &= bool(solved.all())
        bad = (top.values[0] > TOL) & solved
        stay = []
        for j, col in enumerate(active):
            col.rounds += 1
            if bad[j] and col.rounds < limits.max_passes:
                new = top.indices[:, j][top.values[:, j] > TOL]
                col.new = new.numpy()
                rec["joined"] += len(new)
                stay.append(col)
                continue
            # certified (or unsolved, or out of rounds): its dictionary goes
            rec["solved"] &= not bool(bad[j])
            gap = max(gap, float(gaps_r.gap[j]))
            rounds = max(rounds, col.rounds)
            rec["widest"] = max(rec["widest"], col.release(work))
            E[:, col.i] = torch.from_numpy(col.e)
            nz = np.flatnonzero(col.c)
            rows.append(col.cand[nz])
            cols.append(np.full(len(nz), col.i))
            vals.append(col.c[nz])
            col.e = col.res = None  # (only its rounded answer's certificate is to come)
            if work != torch.float64:
                pending.append(col)
            if seeds is not None:
                seeds.support[col.i] = rows[-1]
            if report is not None and (len(rows) % width == 0 or len(rows) == len(order)):
                report.next_block()
                in_block = 0
        active = stay
        if work != torch.float64 and (len(pending) >= width or not active and pending):
            out_gap = max(out_gap, rounded(pending))  # (the certificate of what is returned)
            pending = []
        rec["certificate"] += time.perf_counter() - s
    if work == torch.float64:
        out_gap = gap
    entries = tuple(torch.from_numpy(np.concatenate(a)) for a in (rows, cols, vals))
    return rounds, entries, gap, out_gap, rec


def _joiners(g: torch.Tensor, run: list, n: int):
    """The :data:`JOIN` worst multipliers' excess over 1 of each column of ``run`` and their
    tokens (``topk``: values float64, ``JOIN x len(run)``) from ``g[j, i] = x_j^T u_i``
    (overwritten), each column's own dictionary left out (at -1): the kernel's own test."""
    # each column's constraint multiplier from its support: x_k^T u + nu = sign(c_k)
    rows, where, vals = _supports(run)
    count = torch.bincount(where, minlength=len(run)).clamp_min(1)
    nu = torch.zeros(len(run), dtype=torch.float64).index_add_(
        0, where, torch.sign(vals) - g[rows, where].double()
    )
    viol = g.add_(nu.div_(count).to(g.dtype)).abs_().sub_(1.0)
    owner = torch.from_numpy(np.concatenate([np.full(len(c.cand), j) for j, c in enumerate(run)]))
    viol[torch.from_numpy(np.concatenate([col.cand for col in run])), owner] = -1.0
    top = viol.topk(min(JOIN, n), dim=0)
    return torch.return_types.topk((top.values.double(), top.indices))


def _supports(cols: list) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The columns' non-zeros: ``(rows, where, vals)``, their tokens, their columns' places
    in ``cols`` and their values."""
    at = [np.flatnonzero(col.c) for col in cols]
    return (torch.from_numpy(np.concatenate([col.cand[a] for col, a in zip(cols, at, strict=True)])),
            torch.from_numpy(np.concatenate([np.full(len(a), j) for j, a in enumerate(at)])),
            torch.from_numpy(np.concatenate([col.c[a] for col, a in zip(cols, at, strict=True)])))  # fmt: skip


def _stats(cols: list, rounded: bool = False) -> tuple:
    """:func:`~videoanchor.anchor.program.block_gaps`' view of the columns ``cols``: their
    residuals (``D x m``), l1 norms, sums and entries at their own tokens; ``rounded``: of
    their answers rounded to the returned dtype (:meth:`_Column.release`'s)."""
    cs = [col.c_out if rounded else col.c for col in cols]
    res = np.stack([col.res_out if rounded else col.res for col in cols], axis=1)
    return (torch.from_numpy(res), torch.tensor([np.abs(c).sum() for c in cs]),
            torch.tensor([c.sum() for c in cs]), torch.tensor([c[0] for c in cs]))  # fmt: skip


def run_workset_blocks(x: torch.Tensor, plan: Plan, *, alpha_e: float, alpha_z: float,
                       neighbours: int | None = None, limits: Limits = LIMITS,
                       threads: int | None = None, progress=None,
                       seed: bool = True) -> SSCSolution:  # fmt: skip
    """The program's minimiser for checked features ``x`` (``N x D``; under a process group
    every rank's copy of rank 0's) by column blocks of ``plan.block_columns`` (module
    docstring), float64 on the CPU; ``coef`` sparse COO in ``plan.work`` on ``x``'s device,
    ``outliers`` (``E``, ``D x N``) dense.

    ``neighbours``: each column's starting candidates (None:
    :data:`~videoanchor.anchor.plan.NEIGHBOURS`, read at the call); ``seed``: the supports
    of the nearest columns solved before join them (:class:`_Seeds`). ``limits``: the
    kernel's ``max_passes`` and ``downdate_floor`` (:class:`~.workset.Limits`). ``residual``
    is the largest relative duality gap over the columns of the float64 answer against the
    full dictionary, ``gap`` that of ``coef`` as returned (its dtype's rounding added),
    ``converged`` whether every column ended solved with no violator left, ``iterations`` the
    most certificate rounds a column took. ``timings`` (this rank's): ``neighbours`` (with the
    lambdas), ``workset`` (the kernel on the local dictionaries), ``certificate`` (the full
    products), ``gather`` (the ranks' answers collected). ``history``: ``joined`` (tokens
    added by the certificate, all ranks), ``widest`` (the widest local dictionary, all ranks),
    ``columns`` (the columns this rank solved: ``N`` alone), ``screened`` and ``exact`` (a
    column's certificate rounds, all ranks: decided by the float32 product alone, or by the
    float64 one). ``progress``: as for
    :func:`~videoanchor.anchor.solvers.admm.solve_ssc_admm` (a bar or log lines, each
    batch's worth of columns ended a block, each certificate round an iteration whose
    residual is the largest gap of the columns that ran it, against the kernel's
    tolerance); a time budget is reported but does not stop the blocks (a column's answer
    is its certified minimiser or none; ``solver="auto"`` sends a budget to the authors'
    iteration). A scheduler's hook
    (``schedules_only``, the vLLM plugin's turns) is waited on each round.

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
    nbr, row_max, nearest = _neighbours(x64, min(int(neighbours), n - 1), neighbour_rows(n),
                                        min(SEED_NEAR, n - 1) if seed else 0)  # fmt: skip
    seeds = _Seeds(n, nearest) if seed else None
    lam_e, lam_z, _, _ = ssc_lambdas(x64, alpha_e, alpha_z, dark=plan.dark, row_max=row_max)
    # the certificate rounds screen in float32 where float32 products are IEEE's (not the
    # reduced precision that torch.set_float32_matmul_precision may allow)
    screen = (x64.to(torch.float32) if torch.get_float32_matmul_precision() == "highest"
              else None)  # fmt: skip
    x_norm = float(x64.norm(dim=1).max()) if screen is not None else 0.0
    timings = dict.fromkeys(("workset", "certificate"), 0.0)
    timings["neighbours"] = time.perf_counter() - t0
    E = torch.zeros(d, n, dtype=torch.float64)
    entries, gap, out_gap, solved, rounds = None, 0.0, 0.0, True, 0
    more = dict(joined=0, widest=0, screened=0, exact=0)
    error = None
    pool = ThreadPoolExecutor(threads) if threads > 1 else None
    starts = range(rank * block, n, world * block)  # this rank's batches
    mine = torch.cat([torch.arange(a, min(n, a + block)) for a in starts]) if len(starts) else []
    report = admm_steps.Reporting(progress, max_iter=limits.max_passes, eps=TOL, tokens=n,
                                  blocks=len(starts))  # fmt: skip
    try:
        if len(mine):
            rounds, entries, gap, out_gap, more = _stream(x64, mine, nbr, E, lam_e, lam_z, limits,
                                                          pool, block, plan.work, report, screen,
                                                          x_norm, seeds)  # fmt: skip
            solved = more["solved"]
            for k in ("workset", "certificate"):
                timings[k] += more[k]
    except Exception as exc:  # raised on every rank below, so that none is left waiting
        error = exc
    finally:
        if pool is not None:
            pool.shutdown()
        if report.reporter is not None:  # (a budget is reported, never obeyed here)
            report.reporter.stopped_by_budget = False
        report.close(solved and error is None, rounds, gap, error)
    raise_together(group, error, cpu)
    s = time.perf_counter()
    if entries is not None:
        idx, vals_t = torch.stack(entries[:2]), entries[2].to(plan.work)
    else:  # (more ranks than batches)
        idx, vals_t = torch.empty(2, 0, dtype=torch.int64), torch.empty(0, dtype=plan.work)
    del entries
    # one row per rank: what the answer's record takes the max, sum or all of
    stats = torch.tensor([[gap, out_gap, rounds, more["widest"], more["joined"], float(solved),
                           more["screened"], more["exact"]]], dtype=torch.float64)  # fmt: skip
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
    screened, exact = int(stats[:, 6].sum()), int(stats[:, 7].sum())
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
                       history={"joined": joined, "widest": widest, "columns": len(mine),
                                "screened": screened, "exact": exact},
                       world_size=world)  # fmt: skip
