"""The SSC program solved exactly by working sets (docs/ssc.md), and the CPU's default route.

The program separates over the columns (:mod:`videoanchor.anchor.program`): column ``i`` is
a weighted lasso in ``z = [c; e]`` over ``P = [Y, I]`` with ``1^T c = 1`` and ``c_i = 0``.
:func:`solve_ssc_workset` solves it column by column, exactly, in a kernel compiled by Numba
(:mod:`videoanchor.anchor.solvers._workset_kernel`): outer passes put each column's worst KKT
violators into its working set, a primal active-set method solves the program on that set.
The answer is the minimiser up to rounding, certified per column by
:func:`~videoanchor.anchor.program.column_gaps`; its cost follows the support, not ``N``.
:func:`run_workset`, the CPU's default, bounds each column's coefficients and work, solves
the hard columns alone, and where ``C`` is dense starts again from the fast solver's answer.
"""

from __future__ import annotations

import math
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields, replace

import numpy as np
import torch

from videoanchor.anchor import plan as _plan
from videoanchor.anchor._inputs import as_feature_tensor
from videoanchor.anchor.collective import all_sum
from videoanchor.anchor.options import SSCOptions
from videoanchor.anchor.plan import WARM_SET, Plan, make_plan
from videoanchor.anchor.program import (
    SSCSolution,
    gram_row_max,
    nearest_points,
    ssc_lambdas,
)
from videoanchor.anchor.solvers import program_kwargs
from videoanchor.anchor.solvers.admm import run_admm

__all__ = [
    "LIMITS",
    "Limits",
    "SetsTooLarge",
    "reference_minimiser",
    "run",
    "run_workset",
    "solve_ssc_workset",
]


class SetsTooLarge(RuntimeError):
    """A column's working set outgrew ``max_set``: ``C`` is dense here (docs/ssc.md)."""


@dataclass(frozen=True)
class Limits:
    """The bounds the working sets run under (:data:`LIMITS`; a variant is passed to
    :func:`run_workset`, :func:`solve_ssc_workset` or :func:`reference_minimiser` as
    ``limits=``, never patched in). Work is the sum over a column's inner steps of its
    support's size.

    :func:`run_workset` from the nearest points (issue 66): ``dense_set`` coefficients and
    ``cold_work`` work per column (the outlier entries, which the kernel eliminates, are not
    counted). A column's work grows as its coefficients squared (video-like tokens: 3.0-5.2
    times at N = 8192, where they hold 100-160 coefficients and spend up to ~71 000), so
    ``cold_work`` is what a column of ``dense_set`` coefficients may need, ``6 dense_set^2``:
    until issue 99 it was 50 000 (measured at N = 384-1536, ~18 000 at most), and at 64 frames
    of 128 tokens 224 ordinary columns passed it, more than ``hard_share``: the default gave
    the fast solver's answer, uncertified, in 148 s, where the working sets certify in 53 s
    (``long_video_cpu.json``).
    A token with ~160 outlier entries, a caption over it, spends ~170 000.
    A column past either is hard: it stops and the others go on, until more than
    ``hard_share`` of the columns (and more than one) are hard: ``C`` is dense (Extended
    Yale B faces, ~190 coefficients and 800-1800 outlier entries per column). The hard
    columns alone then run again with ``warm_set`` coefficients and ``hard_work`` work.
    From the fast answer: ``warm_set`` coefficients (:data:`~videoanchor.anchor.plan.WARM_SET`,
    which sizes the kernel's buffers; a column of the fast answer with more starts from its
    ``warm_set`` largest: what decides is whether the minimiser's set outgrows it, not the
    fast answer's count, issue 79) and ``warm_work`` work per column (Yale B subjects
    17-30, the dense synthetic and corrupted sets fit in 50000; subjects 1-16 and the
    darkened sets, 1000-1800 outlier entries per column, do not: there the first column
    past it stops them all and the fast answer stands, the working sets costing 3-25x the
    fast solver), and ``warm_share`` times the fast solver's cost in all, less what the
    attempts before it cost, both counted, not timed (:data:`KERNEL_NS`, :data:`FAST_NS`:
    the same input gets the same route on any machine and at any load): the starts' factors
    alone past that, no column is started; else the columns run in spans (the first 1/64
    of them, at least 16: giving up costs little), each span with at most
    :data:`SPAN_SLACK` times its columns' share of the budget (its columns' work bounded to
    fit, the first column past it stopping them all), and where the cost per column so far
    puts the whole past the budget, the rest are not started; the fast answer stands.
    ``max_passes``: outer
    passes per column. ``gap``: the largest relative duality gap
    (:func:`~videoanchor.anchor.program.column_gaps`) of the float64 answer (``residual``)
    that :func:`run_workset` calls certified (the working sets' own reach 1e-12 to 1e-10).
    ``downdate_floor``: the smallest pivot of the kernel's factor, relative to its diagonal,
    that an outlier entry joining may leave; below it the factor is refactored, once per
    variable and column, and a variable that fails again ends its column unsolved (issue
    80). Tests raise it to force that path on any CPU."""

    dense_set: int = 192
    cold_work: float = 6 * 192**2
    hard_share: float = 1 / 128
    hard_work: float = 500_000
    warm_set: int = WARM_SET
    warm_work: float = 50_000
    warm_share: float = 0.5
    max_passes: int = 500
    gap: float = 1e-8
    downdate_floor: float = 1e-10

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not value > 0:
                raise ValueError(f"Limits.{f.name}: expected a positive number, got {value!r}")


#: The default :class:`Limits`.
LIMITS = Limits()
#: :func:`solve_ssc_workset`'s default, which :func:`run_workset` runs with: the KKT
#: violation below which a variable stays out (who joins at a pass: the pass rule,
#: :data:`videoanchor.anchor.plan.PASS_RULE`).
TOL = 1e-9
#: Inner steps (a variable joining or leaving the support) per column before it is given up.
MAX_STEPS = 100_000
#: Tasks (strides of the columns) per thread: threads take them as they come free, so a core
#: shared with another process does less of the work.
TASKS_PER_THREAD = 16
#: The share of the columns a sweep with a budget runs first (at least 16): what a sweep that
#: does not fit costs before it is given up (:func:`_columns`).
FIRST_SPAN = 1 / 64
#: A span of the warm sweep may spend this many times its columns' share of the budget (a
#: column may cost that many times the average that fits before it stops the sweep).
SPAN_SLACK = 4.0
#: The cost model that the warm sweep's budget is counted in (issue 79): nanoseconds of one
#: thread of the CPU it was calibrated on (an Intel Xeon with AVX-512; ``bench_workset.py
#: --calibrate``, ``workset_calibration_cpu.json``, the fit of every constant here), a fixed
#: weight per count, so the same input gets the same route on every machine and under any
#: load. A column of the kernel (:func:`_kernel_counts`): its work times its coefficients
#: (the inner steps' triangular solves), the factor of its start (``fc0^2 (fc0 / 3 + fe0)``
#: for ``fc0`` coefficients and ``fe0`` outlier entries), its outer passes (each a product
#: of its support with ``[G, Y^T]``) and ``N + D`` for the column itself.
KERNEL_NS = (1.10, 0.458, 0.457, 136.0)
#: The fast solver (:func:`_fast_counts`): per iteration, applying its factor (``N^2 (N +
#: D)``, or ``N (2 D N + D^2)`` where it is low-rank), its E-step's product (``D N^2``, or
#: ``D^2 N`` low-rank), that product times the share of ``E`` that is not zero (its sparse
#: products' share, which its active set follows), and ``N D``.
FAST_NS = (0.0175, 0.0, 0.0412, 14.0)
#: The Gram matrix ``Y^T Y`` and the lambdas: per multiply-add of ``N^2 D``.
GRAM_NS = 0.0414


def _kernel_counts(n: int, d: int, fc0, fe0, fc, fe, work, passes) -> np.ndarray:
    """The counts :data:`KERNEL_NS` weighs, one row per column (arrays of the columns' start
    coefficients and outlier entries, final ones, work and passes)."""
    fc0, fe0, fc, fe, work, passes = (np.asarray(a, dtype=np.float64) for a in
                                      (fc0, fe0, fc, fe, work, passes))  # fmt: skip
    big = np.maximum(fc0, fc)
    return np.stack([work * big, fc0 * fc0 * (fc0 / 3 + fe0), passes * (big * (n + d) + fe * n),
                     np.full_like(work, n + d)], axis=-1)  # fmt: skip


def _fast_counts(n: int, d: int, strategy: str, iterations: int, e_share: float) -> np.ndarray:
    """The counts :data:`FAST_NS` weighs for the fast solver's run (its factor's
    ``strategy``: ``"low_rank"``, ``"thin"`` or ``"dense"``; ``e_share``: its ``E``'s
    non-zeros over ``D N``)."""
    low = strategy == "low_rank"
    apply = n * (2 * d * n + d * d) if low else n * n * (n + d)
    e_step = d * n * (d if low else n)
    return float(iterations) * np.array([apply, e_step, e_step * e_share, n * d], np.float64)


def _e_share(answer: SSCSolution) -> float:
    """The share of the fast answer's ``E`` (``D x N``) that is not zero (0 without one)."""
    e = answer.outliers
    return 0.0 if e is None else float((e != 0).sum()) / max(1, e.numel())


def _start_sizes(n: int, ptr, var) -> tuple[np.ndarray, np.ndarray]:
    """Each column's coefficients and outlier entries in a start (:func:`_seeds`)."""
    coefs = np.concatenate([[0], np.cumsum(np.asarray(var) < n)])
    fc0 = coefs[ptr[1:]] - coefs[ptr[:-1]]
    return fc0, np.diff(ptr) - fc0


def _floor_cost(n: int, d: int, coef, cols, most: int) -> float:
    """The least cost (:data:`KERNEL_NS`) of the columns ``cols`` from ``coef`` (``N x N``,
    the fast answer): each column's start factor over its coefficients (at most ``most``;
    its outlier entries, its steps and passes left out), before any start is made."""
    cols = torch.as_tensor(np.asarray(cols), dtype=torch.int64)
    c = coef.detach()[:, cols].to("cpu")
    nnz = (c != 0).sum(dim=0) - (c[cols, torch.arange(len(cols))] != 0).to(torch.int64)
    fc0 = nnz.clamp(max=most).numpy()
    return _starts_cost(n, d, fc0, np.zeros(len(fc0)))


def _starts_cost(n: int, d: int, fc0, fe0) -> float:
    """The cost (:data:`KERNEL_NS`) of columns' starts alone: the factors of ``fc0``
    coefficients and ``fe0`` outlier entries each, no steps and no passes."""
    none = np.zeros(len(fc0))
    return float((_kernel_counts(n, d, fc0, fe0, fc0, fe0, none, none) @ np.asarray(KERNEL_NS))
                 .sum())  # fmt: skip


def _sweep_cost(n: int, d: int, start, C, E, work, passes, cols) -> float:
    """The cost (:data:`KERNEL_NS`) of the columns ``cols`` of a sweep that ran from
    ``start`` (:func:`_seeds`' ``(ptr, var)``, None: the nearest points), its answer
    ``C``, ``E`` (NumPy) and each column's work and passes."""
    cols = np.asarray(cols, dtype=np.int64)
    if start is None:
        fc0, fe0 = np.ones(len(cols)), np.zeros(len(cols))
    else:
        fc0, fe0 = _start_sizes(n, *start)
        fc0, fe0 = fc0[cols], fe0[cols]
    counts = _kernel_counts(n, d, fc0, fe0, (C[:, cols] != 0).sum(axis=0),
                            (E[:, cols] != 0).sum(axis=0), work[cols], passes[cols])  # fmt: skip
    return float((counts @ np.asarray(KERNEL_NS)).sum())


def _grows(grow: int | None) -> tuple[int, int]:
    """The kernel's ``grow`` and ``grow_max``: the pass rule's on the CPU
    (:data:`videoanchor.anchor.plan.PASS_RULE`, read now: ``cpu_grow0`` and
    ``cpu_grow_max``), ``grow`` (None: ``cpu_grow0``) the first pass's coefficients, doubling
    up to ``cpu_grow_max`` or ``grow``."""
    rule = _plan.PASS_RULE
    grow = rule.cpu_grow0 if grow is None else int(grow)
    return grow, max(grow, rule.cpu_grow_max)


def _kernel():
    from videoanchor.anchor.solvers import _workset_kernel

    return _workset_kernel


def _seeds(x64: torch.Tensor, gram: torch.Tensor, lam_e: float, lam_z: float, coef=None,
           most: int | None = None, cols=None):  # fmt: skip
    """Each column's start for the kernel, ``(ptr, var, val)`` (its ``run_columns``): the
    nearest other point (``c = e_j``), or where ``coef`` (``N x N``, an approximation of
    ``C``: the fast solver's) is given, its column (its ``most`` largest coefficients where
    it holds more) divided by its sum (onto the constraint, signs kept) with the outliers
    that minimise the column's objective for it (the residual soft-thresholded at
    ``lambda_e / lambda_z``); a column whose sum is not positive starts from its nearest
    point. ``cols``: the columns (ascending) whose starts are made; the others have none
    (``O(N D |cols|)`` work: a sweep given up after its first span pays for that span)."""
    n, d = x64.shape
    if coef is None:
        return (np.arange(n + 1, dtype=np.int64), nearest_points(gram).numpy().astype(np.int64),
                np.ones(n))  # fmt: skip
    cols = torch.arange(n) if cols is None else torch.as_tensor(cols, dtype=torch.int64)
    k = len(cols)
    c = coef.detach()[:, cols].to("cpu", torch.float64).clone()  # column j: column cols[j]
    c[cols, torch.arange(k)] = 0.0
    if most is not None:  # the fast answer's smallest entries go (the sets add what is missing)
        for j in torch.nonzero((c != 0).sum(dim=0) > most).flatten().tolist():
            col = c[:, j]
            keep = col.abs().topk(most).indices
            c[:, j] = torch.zeros_like(col).index_copy_(0, keep, col[keep])
    total = c.sum(dim=0)
    warm = torch.isfinite(total) & (total > 0)
    c = c / torch.where(warm, total, 1.0)
    c[:, ~warm] = 0.0
    if not bool(warm.all()):  # (the nearest points of the columns that need them only)
        c[nearest_points(gram, cols[~warm]), torch.nonzero(~warm).flatten()] = 1.0
    r = x64.T[:, cols] - x64.T @ c
    e = torch.sign(r) * (r.abs() - lam_e / lam_z).clamp(min=0.0)
    del r
    # a column keeps at most D - |c's support| - 1 outlier entries, its largest: a minimiser's
    # support holds at most D + 1 variables, and with fewer inlier rows than coefficients the
    # factor's pivots sit on its floor, whose rounding grows into non-finite entries (seen
    # from the fast solver's answer on Yale B subjects 31-38: 1946 of 2016 rows beside 155
    # coefficients; 17 columns ended SINGULAR)
    room = (d - 1 - (c != 0).sum(dim=0)).clamp(min=0)
    for j in torch.nonzero((e != 0).sum(dim=0) > room).flatten().tolist():  # O(D) memory
        col = e[:, j]
        keep = col.abs().topk(int(room[j])).indices
        e[:, j] = torch.zeros_like(col).index_copy_(0, keep, col[keep])
    z = torch.cat([c, e]).T  # column cols[j]'s variables in row j (nonzero() is row-major)
    del c, e
    held = z != 0
    counts = torch.zeros(n, dtype=torch.int64)
    counts[cols] = held.sum(dim=1)
    ptr = torch.zeros(n + 1, dtype=torch.int64)
    ptr[1:] = counts.cumsum(0)
    return ptr.numpy(), torch.nonzero(held)[:, 1].numpy(), z[held].numpy()


def _columns(x64: torch.Tensor, lam_e: float, lam_z: float, gram: torch.Tensor, *, tol: float,
             cap: int, max_passes: int, threads: int, grow: int | None = None,
             cap_c: int | None = None, max_work: float = math.inf, rank: int = 0, world: int = 1,
             start=None, cols=None, stop_after: int | None = None,
             floor: float = LIMITS.downdate_floor, budget: float = math.inf):  # fmt: skip
    """``C``, ``E`` and each column's status, passes and work, by the compiled kernel over
    ``threads`` threads (strides of the columns, each thread taking the next as it comes
    free; without the GIL), from ``start`` (:func:`_seeds`), who joins at a pass by the pass
    rule (:func:`_grows`); the columns ``cols`` only
    (default all; the others stay zero, status -1). A hard column (its set past ``cap`` or
    ``cap_c``, its work past ``max_work``) keeps its iterate and the others go on, until
    ``stop_after`` of them are hard (default never): then the columns not yet started stay
    so (status -1). Rank ``rank`` of ``world`` solves its stride of the columns alone (the
    others stay zero, status -1): :func:`run_workset` sums the ranks' answers. ``floor``:
    :attr:`Limits.downdate_floor`. ``budget``: the cost (:data:`KERNEL_NS`, counted, not
    timed) the sweep may take, from ``start`` only: none is started where the starts'
    factors alone (:func:`_floor_cost`) cost more; else the columns run in spans (the first
    :data:`FIRST_SPAN` of them, at least 16, a stride; then eighths of the rest), a span is
    not started where the cost per column so far puts the whole past ``budget`` or its
    starts' factors cost more than its share (the rest of the budget, at most
    :data:`SPAN_SLACK` times its columns' share), and its columns' work is bounded to fit
    that share (``max_work`` at most; a column past it is hard). Their columns stay -1."""
    kernel = _kernel()
    n, d = x64.shape
    cap_c = cap if cap_c is None else cap_c
    grow, grow_max = _grows(grow)
    G = gram.numpy()
    YT = x64.numpy()
    Y = np.ascontiguousarray(YT.T)
    C, E = np.zeros((n, n)), np.zeros((d, n))
    status = np.full(n, -1, dtype=np.int64)
    passes, work = np.zeros(n, dtype=np.int64), np.zeros(n)
    hard = np.array([0, n + 1 if stop_after is None else stop_after], dtype=np.int64)
    # rank r's columns are cols[r], cols[r + world], ... (whatever thread count another rank
    # has), in TASKS_PER_THREAD strided tasks per thread, taken in turn by whichever thread
    # is free: a core that another process slows takes fewer
    mine = np.ascontiguousarray(np.arange(n) if cols is None else cols, dtype=np.int64)
    mine = np.ascontiguousarray(mine[rank::world])
    spans = [mine]
    if math.isfinite(budget):
        if start is not None and _floor_cost(n, d, start, mine, cap_c) > budget:
            spans = []  # the starts' factors alone do not fit: none is started
        else:  # a first span of at least 16 columns (its overheads amortised)
            first = max(16, math.ceil(len(mine) * FIRST_SPAN))
            # a stride through the columns, not its first ones: the projection samples the
            # whole (Yale B's columns come subject by subject, a video's frame by frame)
            pick = np.zeros(len(mine), dtype=bool)
            at = np.linspace(0, len(mine) - 1, min(first, len(mine))).round().astype(np.int64)
            pick[at] = True
            rest = mine[~pick]
            spans = [mine[pick]] + [a for a in np.array_split(rest, 8) if len(a)]
    pool = ThreadPoolExecutor(threads) if threads > 1 else None
    spent, done = 0.0, 0
    try:
        for span in spans:
            if done and spent / done * len(mine) > budget:
                break  # (the rest stay unstarted: status -1)
            span = np.ascontiguousarray(span)
            tasks = max(1, min(len(span), threads * TASKS_PER_THREAD)) if pool else 1
            # the starts of this span's columns (from the fast answer: O(N D) each)
            ptr, var, val = _seeds(x64, gram, lam_e, lam_z, start,
                                   None if start is None else cap_c,
                                   None if start is None else np.sort(span))  # fmt: skip
            work_cap = max_work
            if math.isfinite(budget):  # this span's share, SPAN_SLACK times its columns'
                share = min(budget - spent, SPAN_SLACK * budget * len(span) / len(mine))
                fc0, fe0 = _start_sizes(n, ptr, var)
                fc0, fe0 = fc0[span], fe0[span]
                fixed = _starts_cost(n, d, fc0, fe0)
                if fixed >= share:
                    break
                # each column's work: the rest of the share, over its columns' steps
                work_cap = min(max_work, (share - fixed) / len(span) /
                               (KERNEL_NS[0] * max(1, int(fc0.max()))))  # fmt: skip

            def run(t: int, span=span, tasks=tasks, ptr=ptr, var=var, val=val,
                    work_cap=work_cap) -> None:  # fmt: skip
                kernel.run_columns(span, t, tasks, G, YT, Y, ptr, var, val, lam_z, lam_e, tol,
                                   grow, grow_max, cap, cap_c, max_passes, MAX_STEPS, work_cap,
                                   C, E, status, passes, work, hard, floor)  # fmt: skip

            if tasks <= 1:
                run(0)
            else:
                list(pool.map(run, range(tasks)))
            if math.isfinite(budget):
                spent += _sweep_cost(n, d, (ptr, var), C, E, work, passes, span)
            done += len(span)
            if hard[0] >= hard[1]:
                break
    finally:
        if pool is not None:
            pool.shutdown()
    return tuple(torch.from_numpy(a) for a in (C, E, status, passes, work))


def solve_ssc_workset(
    features,
    *,
    alpha_e: float = 800.0,
    alpha_z: float = 800.0,
    tol: float = TOL,
    grow: int | None = None,
    max_set: int | None = None,
    max_passes: int | None = None,
    threads: int | None = None,
    coef_init=None,
    limits: Limits = LIMITS,
) -> SSCSolution:
    """The SSC program's minimiser for ``features`` (``N x D``) by working sets and a primal
    active-set method per column (module docstring), float64 on the CPU; ``coef`` is
    returned in ``features``' floating dtype on its device.

    ``tol``: the KKT violation (relative to each variable's l1 weight) below which a
    variable stays out of its set. ``grow``: the coefficients that may join a column's
    working set at its first pass, doubling each pass up to the pass rule's ``cpu_grow_max``
    (:data:`videoanchor.anchor.plan.PASS_RULE`; None: its ``cpu_grow0``); every violating outlier
    entry joins at once. ``max_set``: the most variables (coefficients and
    outliers) one column's working set may hold (None: no limit); a set that outgrows it
    raises :class:`SetsTooLarge`, where ``C`` is dense and the working sets stop paying.
    ``max_passes``: outer passes per column (None: ``limits.max_passes``). ``threads``: columns
    run on this many threads (None: torch's intra-op count).
    ``coef_init``: an approximation of ``C`` (``N x N``, e.g. an ADMM's answer) to start
    from, each column divided by its sum onto the constraint (a column whose sum is not
    positive starts from its nearest point, as every column does by default): near the
    minimiser, few steps remain; the answer is the same.
    ``residual`` of the result is the largest relative duality gap over the columns
    (:func:`duality_gaps`) of the float64 answer, ``gap`` that of ``coef`` as returned (in
    its dtype), ``iterations`` the most passes a column took, ``converged``
    whether every column's set is optimal (no violation above ``tol``); a column that is not
    (its steps or passes ran out) keeps its last iterate, which meets the constraint.
    ``timings``: ``lambdas`` (the Gram matrix and the lambdas), ``workset``, ``certificate``.
    """
    t0 = time.perf_counter()
    x = as_feature_tensor(features)
    max_passes = limits.max_passes if max_passes is None else max_passes
    n, d = x.shape
    if n < 2:
        raise ValueError(f"SSC needs at least 2 points, got N = {n}")
    for name, value in (("grow", 1 if grow is None else grow), ("max_passes", max_passes)):
        if int(value) < 1:
            raise ValueError(f"{name}: expected a positive integer, got {value}")
    if max_set is not None and int(max_set) < 1:
        raise ValueError(f"max_set: expected a positive integer or None, got {max_set}")
    if not (tol >= 0):
        raise ValueError(f"tol: expected a non-negative number, got {tol}")
    if threads is None:
        threads = torch.get_num_threads()
    if int(threads) < 1:
        raise ValueError(f"threads: expected a positive integer or None, got {threads}")
    if coef_init is not None:
        coef_init = torch.as_tensor(coef_init)
        if tuple(coef_init.shape) != (n, n) or not bool(torch.isfinite(coef_init).all()):
            raise ValueError(
                f"coef_init: expected a finite ({n}, {n}) matrix (C of these {n} points), got "
                f"shape {tuple(coef_init.shape)}"
                + ("" if tuple(coef_init.shape) != (n, n) else " with non-finite entries")
            )
    cap = n + d if max_set is None else min(int(max_set), n + d)
    x64, G, lam_e, lam_z = _prepare(x, alpha_e, alpha_z)
    t1 = time.perf_counter()
    C, E, status, passes, _ = _columns(x64, lam_e, lam_z, G, tol=tol, grow=grow, cap=cap,
                                       max_passes=int(max_passes), threads=min(int(threads), n),
                                       start=coef_init, floor=limits.downdate_floor)  # fmt: skip
    note = _singular(status)
    if note:
        warnings.warn(f"SSC working sets: {note}; they keep their last iterate, which meets the "
                      "constraint (converged=False)", UserWarning, stacklevel=2)  # fmt: skip
    if bool((status == _kernel().TOO_LARGE).any()):
        raise SetsTooLarge(
            f"a column's working set needs more than max_set = {cap} variables (C or E is "
            f"dense on these {n} points)"
        )
    return SSCSolution.certified(
        x64.T, C, E, lam_e, lam_z, like=x,
        dtype=x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32,
        timings={"lambdas": t1 - t0, "workset": time.perf_counter() - t1},
        iterations=int(passes.max()), converged=bool((status == _kernel().SOLVED).all()),
        solver="workset", strategy="workset")  # fmt: skip


def _singular(status: torch.Tensor) -> str:
    """What the columns that ended :data:`~videoanchor.anchor.solvers._workset_kernel.SINGULAR` met
    ("" if none did): a factor update that failed again after its refactor, or a refactor
    that failed (issue 80)."""
    cols = torch.nonzero(status == _kernel().SINGULAR).flatten().tolist()
    if not cols:
        return ""
    named = ", ".join(map(str, cols[:8])) + (f" and {len(cols) - 8} more" if len(cols) > 8 else "")
    return (f"{len(cols)} column(s) ({named}) met a factor update that a refactor did not cure "
            "(a singular program on their working set)")  # fmt: skip


def _prepare(x, alpha_e: float, alpha_z: float, dark: str = "authors") -> tuple:
    """``(x64, G, lambda_e, lambda_z)`` of checked features ``x``: what every working-set
    solve of them starts from (float64 on the CPU); ``dark``: ``mu_z``'s rule for dark
    tokens (:func:`~videoanchor.anchor.program.ssc_lambdas`), which are named here."""
    x64 = x.detach().to("cpu", torch.float64).contiguous()
    G = x64 @ x64.T
    lam_e, lam_z, _, _ = ssc_lambdas(x64, alpha_e, alpha_z, row_max=gram_row_max(x64, gram=G),
                                     dark=dark)  # fmt: skip
    return x64, G, lam_e, lam_z


def run(x: torch.Tensor, plan: Plan, opts: SSCOptions, *, affine: bool,
        outliers: bool) -> SSCSolution:  # fmt: skip
    """Route ``"workset_then_fast"``: :func:`run_workset` on checked features ``x`` as
    ``plan`` says, with the program's parameters from the checked options ``opts``."""
    return run_workset(x, plan, affine=affine, outliers=outliers, **program_kwargs(opts))


def run_workset(x: torch.Tensor, plan: Plan, *, alpha_e: float, alpha_z: float, rho: float,
                eps: float, max_iter: int, affine: bool = True, outliers: bool = True,
                progress=None, limits: Limits = LIMITS) -> SSCSolution:  # fmt: skip
    """``solver="workset"`` on checked features ``x`` as ``plan`` says, by the first of
    these routes whose answer is certified (every column's relative duality gap below
    ``limits.gap``); ``strategy`` names it:

    - ``"workset"``: the working sets from each point's nearest point, each column with at
      most ``limits.dense_set`` coefficients (the outlier entries, which the kernel
      eliminates, unbounded) and ``limits.cold_work`` work. A column past either is hard:
      it stops, the others go on;
    - ``"workset_hard"``: the hard columns alone, again from their nearest points, with at
      most ``limits.warm_set`` coefficients and ``limits.hard_work`` work each;
    - ``"workset_warm"``: where ``C`` is dense (more than ``limits.hard_share`` of the
      columns hard: the cold attempt stops there) or a hard column stays unsolved, the fast
      solver (``plan.fallback``, with ``rho``, ``eps``, ``max_iter``, ``progress``), then
      the working sets from its answer (:func:`_seeds`) with at most ``limits.warm_set``
      coefficients and ``limits.warm_work`` work per column (the first column past them
      stops them all): near the minimiser, few steps remain;
    - else the fast solver's answer, with ``solver="fast"`` and one warning that gives its
      gap (``gap``).

    ``coef`` comes in the plan's working dtype (``dtype=``), as every solver's does.
    ``timings``: ``lambdas``, each attempt that ran (``"workset"``: the first, ``"workset_hard"``,
    the fast solver's stages as ``"fast_*"``, ``"workset_warm"``) and ``"certificate"``.
    Solves the method's program only (``affine`` and ``outliers``). A ``progress`` whose
    ``schedules_only`` is true (the vLLM plugin's turn-taking) is waited on before each
    working-set solve (``progress.wait()``); no other progress is reported here."""
    if not (affine and outliers):
        raise ValueError(
            "solver='workset' solves the method's program (affine=True, outliers=True), got "
            f"affine={affine}, outliers={outliers}; use solver 'fast' or 'faithful'"
        )
    answers, fast, prepared, timings, singular = _routes(x, plan, limits, alpha_e=alpha_e,
                                                         alpha_z=alpha_z, rho=rho, eps=eps,
                                                         max_iter=max_iter, progress=progress)  # fmt: skip
    if _certified(answers[-1], limits):
        return answers[-1]
    t = time.perf_counter()
    # (solver='workset' is this route: the working sets without bounds are blocked mode's)
    why = (f"in the working sets, {singular}" if singular else "C is dense here; a certified "
           f"minimiser's gap is below {limits.gap:g}; mode='blocked' with solver='workset' "
           "runs the working sets by blocks without bounds, at whatever cost")  # fmt: skip
    fast.uncertified(prepared[0].T, f"the working sets did not certify these {x.shape[0]} "
                     f"tokens within their bounds ({why})")  # fmt: skip
    fast.timings = {**timings, "certificate": time.perf_counter() - t}
    return fast


def _certified(answer: SSCSolution | None, limits: Limits) -> bool:
    # the float64 answer's gap (``residual``): the returned C's (``gap``) adds its dtype's
    # rounding, which no route can take away
    return answer is not None and answer.converged and answer.residual < limits.gap


def _routes(x, plan: Plan, limits: Limits, *, alpha_e, alpha_z, rho, eps, max_iter, progress):
    """:func:`run_workset`'s routes on ``x`` as far as the first certified answer:
    ``(answers, fast, prepared, timings, singular)``, ``answers`` the routes' answers in order
    (None where a column stayed hard or unstarted; the last certified where one is), ``fast``
    the fast solver's answer where it ran, ``prepared`` :func:`_prepare`'s, ``singular``
    :func:`_singular`'s note on the last route's columns."""
    kernel = _kernel()
    n, d = x.shape
    timings, prepared = {}, []  # the Gram matrix and the lambdas, computed once
    spent = [0.0]  # the cost (KERNEL_NS) of the attempts so far, this rank's share
    singular = [""]

    def sweep(name: str, cap_c: float, max_work: float, **kw):
        if getattr(progress, "schedules_only", False):  # a scheduler's hook: its turn
            progress.wait()
        t = time.perf_counter()
        if not prepared:
            prepared.extend(_prepare(x, alpha_e, alpha_z, plan.dark))
            timings["lambdas"] = time.perf_counter() - t
            spent[0] += GRAM_NS * n * n * d / plan.world
        x64, G, lam_e, lam_z = prepared
        t = time.perf_counter()
        C, E, status, passes, work = _columns(
            x64, lam_e, lam_z, G, tol=TOL, cap=n + d, cap_c=int(min(cap_c, n + d)),
            max_work=max_work, max_passes=limits.max_passes,
            threads=min(torch.get_num_threads(), n), rank=plan.rank, world=plan.world,
            floor=limits.downdate_floor, **kw)  # fmt: skip
        if plan.group is not None:  # every column is one rank's alone: the sums are exact
            C, E, status, passes, work = (all_sum(a, plan.group) for a in
                                          (C, E, status + 1, passes, work))  # fmt: skip
            status -= 1
        timings[name] = time.perf_counter() - t
        singular[0] = _singular(status)
        if "start" not in kw:  # (the warm sweep's own cost is its budget's, counted there)
            ran = np.nonzero(status.numpy() >= 0)[0]
            spent[0] += _sweep_cost(n, d, None, C.numpy(), E.numpy(), work.numpy(),
                                    passes.numpy(), ran) / plan.world  # fmt: skip
        return C, E, status, passes

    def answer(strategy: str, C, E, status, passes):  # None unless every column ran its course
        if bool(((status == -1) | (status == kernel.TOO_LARGE) |
                 (status == kernel.OVER_BUDGET)).any()):  # fmt: skip
            return None
        x64, _, lam_e, lam_z = prepared
        return SSCSolution.certified(x64.T, C, E, lam_e, lam_z, like=x, dtype=plan.work,
                                     timings=timings, iterations=int(passes.max()),
                                     converged=bool((status == kernel.SOLVED).all()),
                                     solver=plan.solver, strategy=strategy)  # fmt: skip

    C, E, status, passes = sweep("workset", limits.dense_set, limits.cold_work,
                                 stop_after=max(1, int(limits.hard_share * n)) + 1)  # fmt: skip
    hard = torch.nonzero(status != kernel.SOLVED).flatten()
    route = "workset"
    if len(hard) and not bool((status == -1).any()):  # a few hard columns, none left unrun
        again = sweep("workset_hard", limits.warm_set, limits.hard_work, cols=hard.numpy())
        for a, b in zip((C, E, status, passes), again, strict=True):
            a[..., hard] = b[..., hard]
        route = "workset_hard"
    answers = [answer(route, C, E, status, passes)]
    if _certified(answers[-1], limits):
        return answers, None, prepared, timings, ""
    gram = prepared[1] if prepared and plan.fallback.device.type == "cpu" else None
    fast = run_admm(x, plan.fallback, alpha_e=alpha_e, alpha_z=alpha_z, rho=rho, eps=eps,
                    max_iter=max_iter, progress=progress, warn_dark=False, gram=gram)  # fmt: skip
    timings.update({f"fast_{k}": v for k, v in fast.timings.items()})
    # what the working sets may add to the fast solver's cost: warm_share of it, less what
    # the attempts before it cost (the lambdas, the first sweeps), all counted (KERNEL_NS,
    # FAST_NS), not timed: the same route on any machine and at any load
    fast_cost = float(_fast_counts(n, d, fast.strategy, fast.iterations, _e_share(fast))
                      @ np.asarray(FAST_NS))  # fmt: skip
    budget = limits.warm_share * fast_cost / plan.world - spent[0]
    warm = sweep("workset_warm", limits.warm_set, limits.warm_work, start=fast.coef,
                 stop_after=1, budget=budget)  # fmt: skip
    answers.append(answer("workset_warm", *warm))
    return answers, fast, prepared, timings, singular[0]


def reference_minimiser(features, *, alpha_e: float = 800.0, alpha_z: float = 800.0,
                        gap: float = 1e-9, max_passes: int | None = None,
                        max_set: int | None = None, limits: Limits = LIMITS) -> SSCSolution:  # fmt: skip
    """The program's minimiser for ``features`` in float64, certified: every column's
    relative duality gap below ``gap`` (:func:`duality_gaps`), else ``converged=False``.

    :func:`run_workset`'s routes under ``limits``, with at most ``max_passes`` passes per
    column (None: ``limits.max_passes``), certified at ``gap``, and from the fast solver's
    answer (float64, its schedule) without a bound on work or on the coefficients per
    column where ``max_set`` is None (the outlier entries are never bounded: the kernel
    eliminates them). ``max_set`` bounds every route's coefficients per column. The first
    certified answer is returned, else the one with the smallest gap with
    ``converged=False``; :class:`SetsTooLarge` where every route had a column outgrow its
    bound. (Until issue 67 a third route ran an over-relaxed, residual-balanced ADMM to
    1e-7 and the working sets from its answer: docs/ssc.md.)
    """
    x = as_feature_tensor(features).detach().to("cpu", torch.float64)
    for name, value in (("max_passes", max_passes), ("max_set", max_set)):
        if value is not None and int(value) < 1:
            raise ValueError(f"{name}: expected a positive integer, got {value}")
    bound = math.inf if max_set is None else int(max_set)
    limits = replace(limits, gap=gap, warm_set=bound, warm_work=math.inf, warm_share=math.inf,
                     dense_set=min(limits.dense_set, bound), hard_work=math.inf,
                     max_passes=limits.max_passes if max_passes is None else int(max_passes))  # fmt: skip
    plan = make_plan(x.shape, _CPU, _REFERENCE)
    answers, *_ = _routes(x, plan, limits, alpha_e=alpha_e, alpha_z=alpha_z, rho=_REFERENCE.rho,
                          eps=0.0, max_iter=_REFERENCE.max_iter, progress=False)  # fmt: skip
    answers = [a for a in answers if a is not None]
    if not answers:
        raise SetsTooLarge(
            f"reference_minimiser: a column's working set outgrew max_set={max_set} "
            "coefficients from the nearest points and from the fast solver's answer; "
            "expected a larger max_set (or None: no bound from the fast answer)"
        )
    best = min(answers, key=lambda a: a.residual if math.isfinite(a.residual) else math.inf)
    best.converged = bool(best.residual < gap)
    return best


_CPU = torch.device("cpu")
#: :func:`reference_minimiser`'s options: the working sets in float64 (their fallback, the
#: fast solver's answer, is the start of the last route)
_REFERENCE = SSCOptions(solver="workset", mode="exact", dtype=torch.float64).checked()
