"""The working-set kernel of :func:`videoanchor.anchor.solvers.workset.solve_ssc_workset`: one
column of the SSC program solved exactly by a primal active-set method, compiled by Numba
(docs/ssc.md, "Fidelity against the program", has the derivation).

Column ``i``'s program is a weighted lasso in ``z = [c; e]`` over ``P = [Y, I]`` (l1 weights
1 on ``c``, ``lambda_e`` on ``e``) with ``a^T z = 1`` (``a``: 1 on ``c``) and ``c_i = 0``; its
Gram matrix ``[[G, Y^T], [Y, I]]`` is read from ``G = Y^T Y`` and ``Y^T``, never formed.
:func:`solve_columns`, from a start on the constraint: an outer pass computes every
variable's multiplier and puts violators into the working set by the working sets' pass
rule (:class:`videoanchor.anchor.plan.PassRule`: every violating outlier entry, and the
``grow`` worst coefficients, ``grow`` doubling each pass up to ``grow_max``; none above
``tol``: solved); an inner loop solves the program restricted to the set, one variable
joining or leaving its support per step, the objective falling at every step. The outlier
entries are eliminated: only the coefficients' Schur complement is factored (Cholesky,
rows appended, Givens deletions, rank-one updates for outlier entries), so the factor stays
the size of ``C``'s support however dense ``E`` is. A floor on the pivots (:data:`RIDGE`)
keeps dependent points factorable. Columns run per thread, without the GIL.

Two kernels compile from :func:`solve_columns`' source (issue 93): the full one and a lean
one without the outlier entries' code (:data:`OUTLIERS`), which compiles in about three
quarters of the time. :func:`run_columns` runs the full one where this process or Numba's
cache holds it, else the lean one, which hands a column that needs an outlier entry, with
those after it, to the full one: ``C`` is the same bit for bit either way. Each is compiled
or loaded from Numba's cache when first needed (:func:`ready`), holding a file lock beside
the cache so that two processes never compile it at once; :mod:`.precompile` fills the cache
in background processes before the first call. How Numba builds them (its pipeline, the
build options, the helpers linked into the kernel, the variants) is :mod:`._workset_build`'s;
the cache and its lock :mod:`videoanchor.anchor._jit_cache`'s (issue 101).
"""

from __future__ import annotations

import logging
import math

import numpy as np
from numba import types
from numba.core import config

from videoanchor.anchor._jit_cache import Functions
from videoanchor.anchor.solvers._workset_build import cached, helper, variant

#: A column's end: solved; its working set outgrew ``cap``; the inner loop took more than
#: ``max_inner`` steps; ``max_passes`` passes did not solve it; a factor update failed; its
#: inner steps' work (the sum of the support's size over them) passed ``max_work``.
#: :data:`SINGULAR` is also where a variable's rank-one update fails a second time in one
#: column: the refactor that followed its first failure did not cure it (issue 80: a column
#: looped 503 times through the same failed downdate until its work bound ran out).
SOLVED, TOO_LARGE, STALLED, MAX_PASSES, SINGULAR, OVER_BUDGET = 0, 1, 2, 3, 4, 5
#: The lean kernel's end of a column that needs an outlier entry (its start holds one, or
#: one would join its set): it stops there, leaving that column and those after it to the
#: full kernel (:func:`run_columns`; no status a caller sees).
NEEDS_OUTLIERS = 6
#: Refinement steps of each restricted solve against the unfactored system (the factor
#: carries the constraint's border as ``gamma a a^T``: ill-conditioned where the support
#: reaches the rank).
REFINE = 1
#: The smallest pivot of the factor, relative to its coefficient's diagonal entry of ``A``.
RIDGE = 1e-10
#: :func:`_chol_append`'s answers.
NOT_FINITE, APPENDED, FLOORED = 0, 1, 2

# One explicit signature per function (:data:`SIGNATURE`; the helpers, :func:`._workset_build.helper`,
# compiled with the kernel that calls them), compiled or loaded from Numba's cache when
# first needed (:func:`ready`), then no other: a call never compiles another specialisation
# (a literal argument, an int where a float was, a strided seed array each compiled the
# callers again: 19.5 s from an empty cache, benchmarks/results/first_call_cpu.json's
# history).
F, I, B = types.float64, types.int64, types.boolean
F1, F2, I1, B1 = F[::1], F[:, ::1], I[::1], B[::1]
SCRATCH = types.UniTuple(F1, 12)  # solve_columns' scratch vectors


#: :func:`solve_columns`' counters and flags that start from a literal (``fc = 0``,
#: ``st = TOO_LARGE``): typed up front, so that type inference settles in one pass over
#: its constraints and a check, not one more for each literal that a loop widens.
_SOLVE_LOCALS = {**dict.fromkeys(("fc", "fe", "coefs", "top", "w_", "steps", "ps", "entrant",
                                  "banned", "p", "kept", "f", "st", "at"), I),
                 **dict.fromkeys(("settle", "stuck"), B)}  # fmt: skip


#: Whether this copy of :func:`solve_columns` holds the outlier entries' code (issue 93): the
#: full kernel, :data:`solve_columns`, does; the lean one, :data:`solve_columns_lean`, the
#: same source compiled with this False (the branches on it pruned before typing), ends a
#: column that needs an outlier entry :data:`NEEDS_OUTLIERS` and stops. It leaves out the
#: outlier entries' joins, leaves and refactors (and the helpers only they call,
#: :func:`_add_outlier`, :func:`_chol_rank1`, :func:`_refactor`): a quarter of the compile,
#: for the columns of video tokens, which mostly hold none (docs/ssc.md).
OUTLIERS = True
#: Issue 90 step 2's bound on an outer pass's joiners that the pass rule
#: (:class:`videoanchor.anchor.plan.PassRule`: ``grow`` and ``grow_max`` are arguments) leaves
#: out, counted on the CPU by ``benchmarks/bench_pass_counts.py`` (:func:`variant_kernel`;
#: the kernels :func:`run_columns` runs have these 0, their branches pruned before typing, as
#: :data:`OUTLIERS`' are in the lean kernel): the coefficients joining at a pass fit the
#: slots of the GPU kernel's level, ``SLOT_BOUND`` coefficients, or ``SLOT_WIDE`` for a
#: column whose support holds more than half those (at least one joins; 0: no bound).
SLOT_BOUND = SLOT_WIDE = 0
#: Each outer pass ``p`` records, in ``work[4 p - 2:4 p + 2]`` (``work`` then holds
#: ``2 + 4 max_passes`` entries, :func:`scratch`; over the columns of the calls that share
#: it): the sums of the column's support sizes, coefficients and outlier entries (what the
#: pass's gather ``Y C_a`` reads), and the most coefficients and outlier entries a column's
#: working set then holds, the joiners included (the slots a level needs).
PASS_SUPPORTS = False


@helper(I(F2, I, F1, F, F))
def _chol_append(L, f, col, diag, floor):
    """Append a row to the factor ``L[:f, :f]``: the new variable's entries ``col[:f]`` and
    diagonal ``diag``. A pivot below ``floor`` (a point dependent on ``Fc``'s on the inlier
    rows, or a repeated point) is raised to it: a ridge on that variable alone. Returns
    :data:`APPENDED`, :data:`FLOORED` (the pivot was raised) or :data:`NOT_FINITE`."""
    rest = diag
    for r in range(f):
        v = col[r]
        for c in range(r):
            v -= L[r, c] * L[f, c]
        v /= L[r, r]
        L[f, r] = v
        rest -= v * v
    if not math.isfinite(rest):
        return NOT_FINITE
    L[f, f] = math.sqrt(rest if rest >= floor else floor)  # (max() compiles an overload)
    return APPENDED if rest >= floor else FLOORED


@helper(types.none(F2, I, I))
def _chol_delete(L, f, p):
    """Delete variable ``p`` from the factor ``L[:f, :f]``: its row goes, the rows below move
    up, and Givens rotations on columns ``(k, k + 1)`` restore the lower triangle."""
    for r in range(p, f - 1):
        for c in range(r + 2):
            L[r, c] = L[r + 1, c]
    for k in range(p, f - 1):
        a, b = L[k, k], L[k, k + 1]
        h = math.hypot(a, b)
        cs, sn = a / h, b / h
        for r in range(k, f - 1):
            x, y = L[r, k], L[r, k + 1]
            L[r, k] = cs * x + sn * y
            L[r, k + 1] = -sn * x + cs * y
        L[k, k + 1] = 0.0
    for r in range(f):
        L[r, f - 1] = 0.0
        L[f - 1, r] = 0.0


@helper(B(F2, I, F1, F, F2, F))
def _chol_rank1(L, f, x, sigma, A, floor):
    """``L L^T + sigma x x^T`` into ``L[:f, :f]`` (``x`` overwritten). False where a pivot
    would fall to ``floor`` times its ``A`` diagonal or below (a downdate, ``sigma < 0``), or
    turn non-finite (``L`` is then partly updated: refactor it)."""
    for k in range(f):
        lkk, xk = L[k, k], x[k]
        r2 = lkk * lkk + sigma * xk * xk
        if not (r2 > floor * A[k, k]) or not math.isfinite(r2):
            return False
        r = math.sqrt(r2)
        cs, sn = r / lkk, xk / lkk
        L[k, k] = r
        for j in range(k + 1, f):
            L[j, k] = (L[j, k] + sigma * sn * x[j]) / cs
            x[j] = cs * x[j] - sn * L[j, k]
    return True


@helper(F(F1, F1, I))
def _dot(a, b, m):
    v = 0.0
    for k in range(m):
        v += a[k] * b[k]
    return v


@helper(B(F2, F2, F2, I, I, F, F1))
def _refactor(L, A, Yg, fc, fe, lam_z, col):
    """``L`` from scratch: the Cholesky factor of ``S`` (``O(|Fc|^2 (|Fc| + |Fe|))``)."""
    for r in range(fc):
        for c in range(r):
            col[c] = A[r, c] - lam_z * _dot(Yg[r], Yg[c], fe)
        diag = A[r, r] - lam_z * _dot(Yg[r], Yg[r], fe)
        if _chol_append(L, r, col, diag, RIDGE * A[r, r]) == NOT_FINITE:
            return False
    return True


@helper(I(F2, F2, F2, I1, F1, F1, I, I1, I, I, F, F2, F2, F, F, F1))
def _add_coef(L, A, Yg, Fc, sc, zc, fc, Fe, fe, u, sign, G, YT, lam_z, gamma, col):
    """Coefficient ``u`` joins ``Fc`` (at position ``fc``) with ``sign`` and value 0; returns
    :func:`_chol_append`'s code."""
    yu, yg = YT[u], Yg[fc]
    for k in range(fe):
        yg[k] = yu[Fe[k]]
    for r in range(fc):
        a = lam_z * G[Fc[r], u] + gamma
        A[fc, r] = A[r, fc] = a
        col[r] = a - lam_z * _dot(Yg[r], yg, fe)
    a = lam_z * G[u, u] + gamma
    A[fc, fc] = a
    Fc[fc], sc[fc], zc[fc] = u, sign, 0.0
    return _chol_append(L, fc, col, a - lam_z * _dot(yg, yg, fe), RIDGE * a)


@helper(B(F2, F2, F2, I1, I, I1, F1, F1, I, I, F, F2, F, F1, F, I1, I, I))
def _add_outlier(L, A, Yg, Fc, fc, Fe, se, ze, fe, k, sign, YT, lam_z, col, floor, failed, n,
                 stamp):  # fmt: skip
    """Outlier entry ``k`` (a row of ``Y``) joins ``Fe`` (at position ``fe``) with ``sign``
    and value 0: ``S`` loses ``lambda_z y y^T`` (``y = Y[k, Fc]``), a downdate with pivots
    above ``floor`` (:func:`_chol_rank1`). Where it fails, ``S`` is refactored, once per
    variable and column: ``failed[n + k]`` is set to the column's ``stamp``. False where the
    refactor failed or the variable had failed before in this column: the column ends
    :data:`SINGULAR`."""
    Fe[fe], se[fe], ze[fe] = k, sign, 0.0
    root = math.sqrt(lam_z)
    for r in range(fc):
        Yg[r, fe] = YT[Fc[r], k]
        col[r] = root * Yg[r, fe]
    if _chol_rank1(L, fc, col, -1.0, A, floor):
        return True
    if failed[n + k] == stamp:
        return False
    failed[n + k] = stamp
    return _refactor(L, A, Yg, fc, fe + 1, lam_z, col)


@helper(types.none(F2, F2, I, I, F, F1, F1, F1, F1, F1))
def _hsolve(L, Yg, fc, fe, lam_z, vc, ve, outc, oute, tmp):
    """``[outc; oute] = H^-1 [vc; ve]`` through the Schur complement (module docstring)."""
    for r in range(fc):  # outc = S^-1 (vc - Y_ec^T ve), S = L L^T
        v = vc[r] - _dot(Yg[r], ve, fe)
        for c in range(r):
            v -= L[r, c] * outc[c]
        outc[r] = v / L[r, r]
    for r in range(fc - 1, -1, -1):  # by rows of L: contiguous
        v = outc[r] / L[r, r]
        outc[r] = v
        for c in range(r):
            outc[c] -= L[r, c] * v
    for k in range(fe):
        oute[k] = ve[k] / lam_z
    for r in range(fc):
        yr, o = Yg[r], outc[r]
        for k in range(fe):
            oute[k] -= yr[k] * o


def run_columns(cols, first, step, G, YT, Y, seed_ptr, seed_var, seed_val, lam_z, lam_e, tol,
                grow, grow_max, cap, cap_c, max_passes, max_inner, max_work, C, E, status,
                passes, work, hard, floor=RIDGE):  # fmt: skip
    """Columns ``cols[first]``, ``cols[first + step]``, ... into ``C`` (``N x N``) and ``E``
    (``D x N``), zero on entry, with each column's status, passes and work (the sum of its
    support's size over its inner steps; ``status`` -1 on entry: a column left so was not
    run). Column ``i`` starts from its variables ``seed_var[seed_ptr[i]:seed_ptr[i + 1]]``
    (coefficients ``0..N-1``, outliers ``N..``) at the values ``seed_val[...]``: a point of
    the constraint, none zero, not ``i``. Its outer pass ``p`` adds at most
    ``min(grow 2^(p - 1), grow_max)`` coefficients (the pass rule,
    :class:`videoanchor.anchor.plan.PassRule`). A column whose set outgrows ``cap`` variables or
    ``cap_c`` coefficients, or whose work passes ``max_work`` (:data:`OVER_BUDGET`), is
    hard: it keeps its iterate and the others go on; ``hard[0]`` counts the hard columns of
    every call sharing ``hard``, and each stops at its next column once ``hard[0]`` reaches
    ``hard[1]`` (``C`` is dense: most columns would be). ``floor``: the smallest pivot, relative
    to its ``A`` diagonal, that an outlier entry's rank-one downdate may leave; one that would
    go lower refactors the factor, once per variable and column (a second failure ends the
    column :data:`SINGULAR`; tests raise ``floor`` to force the path). The scratch is allocated
    here, in Python, for :func:`solve_columns` (NumPy's allocations compiled by Numba cost
    1 s)."""
    n, d = G.shape[0], YT.shape[1]
    cap_c = min(cap_c, cap, n - 1)
    gamma = max(0.0, lam_z * float(np.diagonal(G).max()))
    rest = (G, YT, Y, seed_ptr, seed_var, seed_val, lam_z, lam_e, tol, grow, grow_max, cap, cap_c,
            max_passes, max_inner, float(max_work), C, E, status, passes, work, hard, gamma,
            float(floor), *scratch(n, d, cap, cap_c, grow))  # fmt: skip
    kernel = ready("full", compile=False)  # where this process or Numba's cache holds it
    if kernel is not None:
        kernel(cols, first, step, *rest)
        return
    ready("lean")(cols, first, step, *rest)
    stopped = np.flatnonzero(status[cols[first::step]] == NEEDS_OUTLIERS)
    if len(stopped):  # that column and those after it: the full kernel (compiled if need be)
        at = first + int(stopped[0]) * step
        status[cols[at]] = -1
        ready("full")(cols, at, step, *rest)


def scratch(n: int, d: int, cap: int, cap_c: int, grow: int, passes: int = 0) -> tuple:
    """:func:`solve_columns`' scratch for ``N = n``, ``D = d`` and its ``cap``, ``cap_c``
    (at most ``min(cap, n - 1)``) and ``grow``; ``work`` with room for ``passes`` passes'
    counts (:data:`PASS_SUPPORTS`)."""
    wc, we = cap_c + 1, min(cap, d) + 1
    width = max(wc, we)  # the scratch vectors serve either block
    return (
        np.zeros((wc, wc)),  # L: the Cholesky factor of S, the Schur complement on Fc
        np.zeros((wc, wc)),  # A: lambda_z G_cc + gamma 1 1^T
        np.zeros((wc, we)),  # Yg: Y[Fe, Fc]^T, gathered
        np.zeros(wc, np.int64), np.zeros(wc), np.zeros(wc),  # Fc, sc, zc
        np.zeros(we, np.int64), np.zeros(we), np.zeros(we),  # Fe, se, ze
        np.zeros(cap + grow + 1, np.int64),  # W
        # qc, qe, x1c, x1e, x2c, x2e, zhc, zhe, rc (also col), re, tmp, ac
        tuple(np.zeros(width) for _ in range(12)),
        np.zeros(n + d),  # full
        np.zeros(n + d, np.bool_),  # held: in F
        np.zeros(n + d, np.int64),  # failed: the column (+1) where its rank-one update failed
        np.zeros(2 + 4 * passes),  # the column's work: spent, bound (then the passes' counts)
    )  # fmt: skip


#: :func:`solve_columns`' one signature.
SIGNATURE = types.none(I1, I, I, F2, F2, F2, I[:], I[:], F[:], F, F, F, I, I, I, I, I, I, F, F2, F2, I1, I1, F1, I1, F, F, F2, F2, F2, I1, F1, F1, I1, F1, F1, I1, SCRATCH, F1, B1, I1, F1)  # fmt: skip


def solve_columns(cols, first, step, G, YT, Y, seed_ptr, seed_var, seed_val, lam_z, lam_e, tol,
                  grow, grow_max, cap, cap_c, max_passes, max_inner, max_work, C, E, status, passes,
                  spent, hard, gamma, floor, L, A, Yg, Fc, sc, zc, Fe, se, ze, W, w, full, held,
                  failed, work):  # fmt: skip
    """:func:`run_columns` with its scratch (``cap_c`` at most ``min(cap, N - 1)``, ``gamma``
    the largest ``lambda_z G_uu``, ``floor`` the downdates' pivot floor). Column ``i`` (module docstring): from the start ``z`` =
    ``seed_val`` on the variables ``seed_var`` (``seed_ptr[i]:seed_ptr[i + 1]``), its
    status, its support in ``Fc[:fc]``, ``Fe[:fe]`` and values in ``zc``, ``ze``; one loop
    settles (from ``z`` to the minimiser on ``F``), adds the worst violator in ``W`` or
    (none left) runs an outer pass. All of it is one function: Numba optimises a function
    with every function it calls, so each level of calls compiled the code below it again
    (issue 68)."""
    n, d = len(G), len(Y)  # (a shape's [k] compiles an overload per k without the rewrites)
    qc, qe, x1c, x1e, x2c, x2e, zhc, zhe, rc, re, tmp, ac = w
    col, root = rc, math.sqrt(lam_z)
    for j in range(first, len(cols), step):
        if hard[0] >= hard[1]:
            return
        i = cols[j]
        s0, s1 = seed_ptr[i], seed_ptr[i + 1]
        work[0], work[1] = 0.0, max_work
        fc = fe = coefs = 0
        stamp = i + 1  # failed[u] == stamp: u's update failed in this column (no reset)
        for r in range(s0, s1):
            if seed_var[r] < n:
                coefs += 1
        st = TOO_LARGE if s1 - s0 > cap or coefs > cap_c else -1  # (status; -1: running)
        for r in range(s0, s1 if st < 0 else s0):  # the outliers first: no factor to update
            # (so no downdate to fail)
            u, v = seed_var[r], seed_val[r]
            if u >= n:
                if not OUTLIERS:  # (the lean kernel: left to the full one)
                    st = NEEDS_OUTLIERS
                    break
                _add_outlier(L, A, Yg, Fc, fc, Fe, se, ze, fe, u - n, 1.0 if v > 0 else -1.0, YT,
                             lam_z, col, floor, failed, n, stamp)  # fmt: skip
                ze[fe] = v
                held[u] = True
                fe += 1
        # the coefficients: one dependent on those before it on the inlier rows (its pivot on
        # the floor) is left out of the start, which is put back on the constraint; a start
        # with many such pivots (more coefficients than inlier rows) grows the factor's
        # rounding into non-finite entries (the fast solver's answer on Yale B subjects 31-38:
        # 155 coefficients beside 70 inlier rows)
        total = 0.0
        for r in range(s0, s1 if st < 0 else s0):
            u, v = seed_var[r], seed_val[r]
            if u < n:
                code = _add_coef(L, A, Yg, Fc, sc, zc, fc, Fe, fe, u, 1.0 if v > 0 else -1.0, G,
                                 YT, lam_z, gamma, col)  # fmt: skip
                if code == NOT_FINITE:
                    st = SINGULAR
                    break
                if code == FLOORED and fc > 0:
                    continue
                zc[fc] = v
                total += v
                held[u] = True
                fc += 1
        if st < 0 and not total > 0.0:  # none of the sum left: the largest coefficient alone
            top = 0
            for r in range(fc):
                if abs(zc[r]) > abs(zc[top]):
                    top = r
            for r in range(fc):
                zc[r] = 0.0
            zc[top], sc[top], total = 1.0, 1.0, 1.0
        for r in range(fc if st < 0 else 0):
            zc[r] /= total
        yi = YT[i]
        entrant, banned, ps, steps, w_, nu = -1, -1, 0, 0, 0, 0.0
        settle = True
        while st < 0:
            stuck = False
            while settle:  # solve on F, step back to the first sign change, drop it, again
                steps += 1
                work[0] += fc + fe
                if steps > max_inner or work[0] > work[1]:
                    st = STALLED if steps > max_inner else OVER_BUDGET
                    break
                # the minimiser [zhc; zhe] on F with signs sc, se and its multiplier nu_h
                for r in range(fc):
                    qc[r] = lam_z * G[Fc[r], i] - sc[r] + gamma
                    ac[r] = 1.0
                if OUTLIERS:
                    for k in range(fe):
                        qe[k] = lam_z * yi[Fe[k]] - lam_e * se[k]
                        re[k] = 0.0
                _hsolve(L, Yg, fc, fe, lam_z, qc, qe, x1c, x1e, tmp)
                _hsolve(L, Yg, fc, fe, lam_z, ac, re, x2c, x2e, tmp)
                ax1 = ax2 = 0.0
                for r in range(fc):
                    ax1 += x1c[r]
                    ax2 += x2c[r]
                nu_h = (1.0 - ax1) / ax2
                for r in range(fc):
                    zhc[r] = x1c[r] + nu_h * x2c[r]
                if OUTLIERS:
                    for k in range(fe):
                        zhe[k] = x1e[k] + nu_h * x2e[k]
                for _ in range(REFINE):  # against the unfactored system: its residual, again
                    slack = 1.0
                    if OUTLIERS:
                        for k in range(fe):  # (H z)_e = lambda_z (Y_ec z_c + z_e)
                            re[k] = zhe[k]
                    for r in range(fc):
                        yr, z = Yg[r], zhc[r]
                        v = qc[r] + nu_h
                        for c in range(fc):
                            v -= A[r, c] * zhc[c]
                        t = 0.0
                        if OUTLIERS:
                            for k in range(fe):
                                t += yr[k] * zhe[k]
                                re[k] += yr[k] * z
                        rc[r] = v - lam_z * t
                        slack -= z
                    if OUTLIERS:
                        for k in range(fe):
                            re[k] = qe[k] - lam_z * re[k]
                    _hsolve(L, Yg, fc, fe, lam_z, rc, re, x1c, x1e, tmp)
                    ax1 = 0.0
                    for r in range(fc):
                        ax1 += x1c[r]
                    dnu = (slack - ax1) / ax2
                    for r in range(fc):
                        zhc[r] += x1c[r] + dnu * x2c[r]
                    if OUTLIERS:
                        for k in range(fe):
                            zhe[k] += x1e[k] + dnu * x2e[k]
                    nu_h += dnu
                t, p = 1.0, -1
                for r in range(fc):
                    if zhc[r] * sc[r] <= 0.0:
                        gap = zc[r] - zhc[r]
                        tr = zc[r] / gap if gap != 0.0 else 0.0
                        if tr < t:
                            t, p = tr, r
                if OUTLIERS:
                    for k in range(fe):
                        if zhe[k] * se[k] <= 0.0:
                            gap = ze[k] - zhe[k]
                            tk = ze[k] / gap if gap != 0.0 else 0.0
                            if tk < t:
                                t, p = tk, fc + k
                if p < 0:  # settled
                    for r in range(fc):
                        zc[r] = zhc[r]
                    if OUTLIERS:
                        for k in range(fe):
                            ze[k] = zhe[k]
                    settle, nu = False, nu_h
                    break
                for r in range(fc):
                    zc[r] += t * (zhc[r] - zc[r])
                if OUTLIERS:
                    for k in range(fe):
                        ze[k] += t * (zhe[k] - ze[k])
                if p < fc:
                    zc[p] = 0.0
                    stuck = stuck or (t == 0.0 and Fc[p] == entrant)  # the entrant cannot move
                else:
                    ze[p - fc] = 0.0
                    stuck = stuck or (t == 0.0 and n + Fe[p - fc] == entrant)
                if OUTLIERS:  # (the lean kernel holds none)
                    for k in range(fe - 1, -1, -1):  # outliers leave: S gains lambda_z y y^T
                        if ze[k] == 0.0:
                            left = n + Fe[k]
                            held[left] = False
                            for r in range(fc):
                                yr = Yg[r]
                                col[r] = root * yr[k]
                                for k2 in range(k, fe - 1):
                                    yr[k2] = yr[k2 + 1]
                            for k2 in range(k, fe - 1):
                                Fe[k2], se[k2], ze[k2] = Fe[k2 + 1], se[k2 + 1], ze[k2 + 1]
                            fe -= 1
                            if not _chol_rank1(L, fc, col, 1.0, A, RIDGE):  # (its pivots grow)
                                if failed[left] == stamp or not _refactor(L, A, Yg, fc, fe,
                                                                          lam_z, col):  # fmt: skip
                                    st = SINGULAR
                                    break
                                failed[left] = stamp
                if st >= 0:
                    break
                for r in range(fc - 1, -1, -1):
                    if zc[r] == 0.0:
                        held[Fc[r]] = False
                        _chol_delete(L, fc, r)
                        for r2 in range(fc):  # A loses row and column r
                            for c in range(r, fc - 1):
                                A[r2, c] = A[r2, c + 1]
                        for r2 in range(r, fc - 1):
                            for c in range(fc - 1):
                                A[r2, c] = A[r2 + 1, c]
                        for r2 in range(r, fc - 1):
                            Fc[r2], sc[r2], zc[r2] = Fc[r2 + 1], sc[r2 + 1], zc[r2 + 1]
                            if OUTLIERS:  # (a slice assignment compiles its error message)
                                for c in range(fe):
                                    Yg[r2, c] = Yg[r2 + 1, c]
                        fc -= 1
            if st >= 0:
                break
            if stuck:  # not again in this pass
                banned = entrant
            # the primal active-set method on W: its worst violator joins F (a tenth of tol: the
            # outer pass's violators are violators here too, whatever the rounding of either sum)
            worst, at, mult = tol * 0.1, -1, 0.0
            for q in range(w_):
                u = W[q]
                if u == banned or held[u]:
                    continue
                # its multiplier lam_z (P^T y_i - K z)_u + nu a_u
                if u < n:
                    gu, yu = G[u], YT[u]
                    m = gu[i]
                    for r in range(fc):
                        m -= gu[Fc[r]] * zc[r]
                    if OUTLIERS:
                        for k in range(fe):
                            m -= yu[Fe[k]] * ze[k]
                    m = lam_z * m + nu
                    viol = abs(m) - 1.0
                else:
                    m = yi[u - n]
                    for r in range(fc):
                        m -= YT[Fc[r], u - n] * zc[r]
                    m *= lam_z
                    viol = abs(m) / lam_e - 1.0
                if viol > worst:
                    worst, at, mult = viol, u, m
            if at >= 0:
                if fc + fe == cap or (at < n and fc == cap_c):
                    st = TOO_LARGE
                    break
                sign = 1.0 if mult > 0 else -1.0
                if at < n:
                    if _add_coef(L, A, Yg, Fc, sc, zc, fc, Fe, fe, at, sign, G, YT, lam_z, gamma,
                                 col) == NOT_FINITE:  # fmt: skip
                        st = SINGULAR
                        break
                    fc += 1
                else:
                    if not OUTLIERS:
                        st = NEEDS_OUTLIERS
                        break
                    if not _add_outlier(L, A, Yg, Fc, fc, Fe, se, ze, fe, at - n, sign, YT, lam_z,
                                        col, floor, failed, n, stamp):  # fmt: skip
                        st = SINGULAR
                        break
                    fe += 1
                held[at] = True
                entrant, settle = at, True
                continue
            # an outer pass: every multiplier lam_z (P^T y_i - K z) + nu a, from the rows of
            # [[G, Y^T], [Y, I]], and W: F and the violators that the pass rule takes
            if ps == max_passes:
                st = MAX_PASSES
                break
            ps += 1
            for u in range(n):
                full[u] = G[i, u]
            for u in range(d):
                full[n + u] = yi[u]
            for r in range(fc):
                k, zk = Fc[r], zc[r]
                gk, yk = G[k], YT[k]
                for u in range(n):
                    full[u] -= gk[u] * zk
                for u in range(d):
                    full[n + u] -= yk[u] * zk
            if OUTLIERS:
                for r in range(fe):
                    k, zk = Fe[r], ze[r]
                    yk = Y[k]
                    for u in range(n):
                        full[u] -= yk[u] * zk
                    full[n + k] -= zk
            for r in range(fc):
                full[Fc[r]] = math.nan
            if OUTLIERS:
                for r in range(fe):
                    full[n + Fe[r]] = math.nan
            full[i] = math.nan
            for u in range(n):
                full[u] = abs(lam_z * full[u] + nu) - 1.0
            for u in range(n, n + d):
                full[u] = abs(lam_z * full[u]) / lam_e - 1.0
            w_ = 0
            for r in range(fc):
                W[w_] = Fc[r]
                w_ += 1
            if OUTLIERS:
                for r in range(fe):
                    W[w_] = n + Fe[r]
                    w_ += 1
            # the pass rule (videoanchor.anchor.plan.PassRule): every violating outlier entry
            # joins W (W[f:w_]), outside `grow` (also in the lean kernel, which then hands the
            # column on where one joins its support: the full kernel's path, step for step)
            f, kept = w_, 0
            for u in range(n, n + d):
                if full[u] > tol:  # (NaN: false)
                    if w_ <= cap:
                        W[w_] = u
                    w_ += 1
            if w_ > cap:
                st = TOO_LARGE
                break
            # and the coefficients: pass p adds up to grow 2^(p - 1) (at most 8 doublings), at
            # most grow_max; past what W holds (more than cap): TOO_LARGE, as with more
            g = grow << (ps - 1 if ps < 9 else 8)
            if g > grow_max:
                g = grow_max
            if SLOT_BOUND:  # (a support past half the level's slots: the wide level)
                room = (SLOT_BOUND if 2 * fc <= SLOT_BOUND else SLOT_WIDE) - fc
                if g > room:
                    g = room if room > 0 else 1
            if g > cap + 1 - w_:
                g = cap + 1 - w_
            # the `g` worst coefficients above tol in one scan, worst first (ties: the lower index);
            # W[w_:w_ + kept] holds them in that order, compared through `full`
            for u in range(n):
                v = full[u]
                if v > tol and (kept < g or v > full[W[w_ + kept - 1]]):  # NaN: false
                    p = kept if kept < g else g - 1
                    while p > 0 and full[W[w_ + p - 1]] < v:
                        W[w_ + p] = W[w_ + p - 1]
                        p -= 1
                    W[w_ + p] = u
                    if kept < g:
                        kept += 1
            w_ += kept
            if PASS_SUPPORTS and w_ <= cap:  # (the counts' kernel, :data:`PASS_SUPPORTS`)
                wc_ = fc
                for r in range(f, w_):
                    if W[r] < n:
                        wc_ += 1
                work[4 * ps - 2] += fc
                work[4 * ps - 1] += fe
                if wc_ > work[4 * ps]:
                    work[4 * ps] = wc_
                if w_ - wc_ > work[4 * ps + 1]:
                    work[4 * ps + 1] = w_ - wc_
            if w_ == f or w_ > cap:
                st = SOLVED if w_ == f else TOO_LARGE
                break
            banned = -1
        if not OUTLIERS:
            if st == NEEDS_OUTLIERS:  # this column and those after it: the full kernel's
                for r in range(fc):
                    held[Fc[r]] = False
                status[i] = st
                return
        status[i], passes[i], spent[i] = st, ps, work[0]
        if st == TOO_LARGE or st == OVER_BUDGET:  # (threads may lose a count: a later stop)
            hard[0] += 1
        for r in range(fc):
            held[Fc[r]] = False
            C[Fc[r], i] = zc[r]
        if OUTLIERS:
            for r in range(fe):
                held[n + Fe[r]] = False
                E[Fe[r], i] = ze[r]


#: The lean kernel (:data:`OUTLIERS` False) and the full one, compiled for :data:`SIGNATURE`
#: when first needed (:func:`ready`), not when this module is imported.
solve_columns_lean = cached(
    variant(solve_columns, "solve_columns_lean", OUTLIERS=False), _SOLVE_LOCALS
)
solve_columns = cached(solve_columns, _SOLVE_LOCALS)
KERNELS = {"lean": solve_columns_lean, "full": solve_columns}

#: The module constants a :func:`variant_kernel` may set, and today's values.
RULES = {"PASS_SUPPORTS": False, "SLOT_BOUND": 0, "SLOT_WIDE": 0}


def variant_kernel(**constants):
    """:func:`solve_columns` with other :data:`RULES` (issue 90 step 2's counts,
    ``benchmarks/bench_pass_counts.py``), compiled for :data:`SIGNATURE` or loaded from Numba's
    cache (a name of its own per set of constants: ``solve_columns_rule_...``); called with
    :func:`solve_columns`' arguments (:func:`scratch`). Not a kernel :func:`run_columns` runs;
    with today's values it computes what the full kernel does."""
    for key, value in constants.items():
        if key not in RULES or type(value) is not type(RULES[key]) or value < 0:
            raise ValueError(f"variant_kernel: expected {RULES} (booleans, counts), got "
                             f"{key}={value!r}")  # fmt: skip
    rule = {**RULES, **constants}
    name = "solve_columns_rule_" + "_".join(str(int(rule[k])) for k in sorted(RULES))
    if name not in _VARIANTS:
        disp = cached(
            variant(getattr(solve_columns, "py_func", solve_columns), name, **rule), _SOLVE_LOCALS
        )
        if not config.DISABLE_JIT:
            disp.compile(SIGNATURE)
            disp.disable_compile()
        _VARIANTS[name] = disp
    return _VARIANTS[name]


_VARIANTS: dict = {}

#: The kernels' groups (one function each), made ready by :func:`ready`: loaded from
#: Numba's cache or compiled into it under a lock
#: (:class:`~videoanchor.anchor._jit_cache.Functions`).
_FUNCTIONS = Functions("SSC kernel", {k: [(d, SIGNATURE)] for k, d in KERNELS.items()},
                       logging.getLogger("videoanchor.kernel"), only=True)  # fmt: skip
#: What this process did for each kernel it holds: ``{"kernel", "how", "seconds", "waited"}``
#: with ``how`` "loaded" (from Numba's cache) or "compiled" (and saved there), ``seconds``
#: (the load or compile) and ``waited`` (seconds spent waiting for another process's compile
#: of it).
EVENTS: list[dict] = _FUNCTIONS.events
#: Whether this process holds ``kernel`` ("lean" or "full") loaded or compiled.
held = _FUNCTIONS.held
#: The file whose lock a process holds while it loads or compiles ``kernel`` into Numba's
#: cache (beside the kernel's cache index); None where Numba keeps no cache of it.
lock_path = _FUNCTIONS.lock_path


def ready(kernel: str = "full", *, compile: bool = True):
    """``kernel`` ("lean" or "full", :data:`KERNELS`) with :data:`SIGNATURE` in this process:
    held already, loaded from Numba's cache, or (``compile``) compiled and saved there. A
    process loads or compiles it holding :func:`lock_path`'s lock, so that two processes never
    compile it at once: one that finds another compiling it waits for that (saying so in one
    line on the ``videoanchor.kernel`` logger) and loads what it saved. With ``compile``
    False: None where neither this process nor the cache holds it, or another process holds
    its lock. Numba keys its cache by the CPU (name and features): a cache made for another
    CPU is not loaded but compiled for this one beside it."""
    return KERNELS[kernel] if _FUNCTIONS.ready(kernel, compile=compile) else None


def precompile(kernels=("lean", "full"), *, loops: bool = True) -> list[dict]:
    """``kernels`` ready (:func:`ready`), in that order: by default the lean one first (a first
    call that finds only it need not wait for the full one); then, with ``loops``, the
    discretisation's loops (:mod:`videoanchor.anchor._discretize_loops`), which every anchor
    score's call runs after the kernel: a warm-up (``videoanchor warmup``, the vLLM plugin's
    start-up) leaves nothing for a first call to compile. Returns :data:`EVENTS` (the
    kernels')."""
    for kernel in kernels:
        ready(kernel)
    if loops:
        from videoanchor.anchor import _discretize_loops

        _discretize_loops.ready()
    return EVENTS
