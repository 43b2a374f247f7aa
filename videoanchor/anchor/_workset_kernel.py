"""The working-set kernel of :func:`videoanchor.anchor.workset.solve_ssc_workset`: one column
of the SSC program solved exactly by a primal active-set method, compiled by Numba.

Column ``i``'s program is a weighted lasso in ``z = [c; e]`` over the dictionary
``P = [Y, I]`` (l1 weights 1 on ``c``, ``lambda_e`` on ``e``) with one equality constraint
``a^T z = 1`` (``a``: 1 on ``c``, 0 on ``e``) and ``c_i = 0``. Its Gram matrix
``K = P^T P`` is ``[[G, Y^T], [Y, I]]`` and ``P^T y_i`` is ``[G[:, i]; y_i]``: both are read
from ``G = Y^T Y`` and ``Y^T``, never formed. A variable's multiplier at ``z`` is
``m = lambda_z (P^T y_i - K z) + nu a``; ``z`` is the column's minimiser when
``m_j = w_j sign(z_j)`` on its support ``F`` and ``|m_j| <= w_j`` off it.

The method (:func:`_column`), from a start on the constraint (each point's nearest other
point, ``c = e_j``, or an approximate answer with its signs: the start's support is factored
and settled by the inner loop's steps before the first pass):

- an outer pass computes every variable's multiplier (``|F| (N + D)`` products) and puts the
  ``grow`` worst violators beside ``F`` into the working set ``W``; none above ``tol``
  (relative to the variable's weight): the column is solved;
- an inner loop solves the program restricted to ``W`` by the primal active-set method:
  the worst violator in ``W`` joins ``F`` with its multiplier's sign; the
  equality-constrained quadratic program on ``F`` with those signs is solved from a
  Cholesky factor of ``H = lambda_z K_FF + gamma a_F a_F^T`` (the border's augmented
  Lagrangian term, zero on the constraint: ``H`` is positive definite wherever the bordered
  system is regular, also where ``F`` holds ``D + 1`` points), two triangular solve pairs,
  the constraint's Schur complement and a refinement step against ``H`` itself (kept beside
  its factor); where a variable of ``F`` would change sign, the
  step stops where the first does and that variable leaves. The objective falls at every
  step (the segment stays on the constraint, and the signs hold on it), so no set repeats.

The factor is updated, not refactored: a new variable appends a row (``O(|F|^2)``), a
leaving one is deleted by Givens rotations (``O(|F|^2)``). A floor on the pivots
(:data:`RIDGE`) keeps a set of dependent points factorable (more than ``D + 1`` of them,
repeated points). Columns are independent: a range of them runs per thread, without the
GIL (:func:`solve_columns`).
"""

from __future__ import annotations

import math

import numba
import numpy as np

#: A column's end: solved; its working set outgrew ``cap``; the inner loop took more than
#: ``max_inner`` steps; ``max_passes`` passes did not solve it; a factor update failed.
SOLVED, TOO_LARGE, STALLED, MAX_PASSES, SINGULAR = 0, 1, 2, 3, 4
#: Refinement steps of each restricted solve against the unfactored system (the factor
#: carries the constraint's border as ``gamma a a^T``: ill-conditioned where the support
#: reaches the rank).
REFINE = 1
#: The smallest pivot of the factor, relative to its variable's diagonal entry.
RIDGE = 1e-10

# reassociation lets the compiler vectorise the dot products; NaN and inf keep their meaning
_FASTMATH = {"reassoc", "contract"}
_jit = numba.njit(cache=True, nogil=True, fastmath=_FASTMATH)


@numba.njit(cache=True, nogil=True, fastmath=_FASTMATH, inline="always")
def _k(u, v, n, G, YT):
    """``K[u, v]`` of ``[[G, Y^T], [Y, I]]``."""
    if u < n:
        if v < n:
            return G[u, v]
        return YT[u, v - n]
    if v < n:
        return YT[v, u - n]
    return 1.0 if u == v else 0.0


@_jit
def _chol_append(L, f, col, diag):
    """Append a row to the factor ``L[:f, :f]``: the new variable's entries ``col[:f]`` and
    diagonal ``diag``. A pivot below ``RIDGE * diag`` (a point dependent on ``F``'s: ``F``
    would hold more than ``D + 1`` of them, or a repeated point) is raised to it: a ridge on
    that variable alone. False where the pivot is not finite."""
    rest = diag
    for r in range(f):
        v = col[r]
        for c in range(r):
            v -= L[r, c] * L[f, c]
        v /= L[r, r]
        L[f, r] = v
        rest -= v * v
    if not math.isfinite(rest):
        return False
    L[f, f] = math.sqrt(max(rest, RIDGE * diag))
    return True


@_jit
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


@_jit
def _drop(H, f, p):
    """Delete row and column ``p`` of ``H[:f, :f]``."""
    for r in range(f):
        for c in range(p, f - 1):
            H[r, c] = H[r, c + 1]
    for r in range(p, f - 1):
        for c in range(f - 1):
            H[r, c] = H[r + 1, c]


@_jit
def _chol_solve(L, f, b, out):
    """``out[:f] = (L L^T)^-1 b[:f]``."""
    for r in range(f):
        v = b[r]
        for c in range(r):
            v -= L[r, c] * out[c]
        out[r] = v / L[r, r]
    for r in range(f - 1, -1, -1):  # by rows of L: contiguous
        v = out[r] / L[r, r]
        out[r] = v
        for c in range(r):
            out[c] -= L[r, c] * v


@_jit
def _add(L, H, F, s, z, f, u, sign, i, G, YT, lam_z, gamma, col):
    """``u`` joins ``F`` (at position ``f``) with ``sign`` and value 0."""
    n = G.shape[0]
    au = gamma if u < n else 0.0
    for r in range(f):
        col[r] = lam_z * _k(F[r], u, n, G, YT) + (au if F[r] < n else 0.0)
    diag = lam_z * _k(u, u, n, G, YT) + au
    if not _chol_append(L, f, col, diag):
        return False
    for r in range(f):
        H[f, r] = H[r, f] = col[r]
    H[f, f] = diag
    F[f], s[f], z[f] = u, sign, 0.0
    return True


@_jit
def _restricted(L, H, F, s, f, i, G, YT, lam_z, lam_e, gamma, q, av, x1, x2, zh, col):
    """The minimiser ``zh[:f]`` of the program on ``F`` with signs ``s`` (every other
    variable at zero) and its constraint multiplier ``nu``."""
    n = G.shape[0]
    for r in range(f):
        u = F[r]
        if u < n:
            q[r] = lam_z * G[u, i] - s[r] + gamma
            av[r] = 1.0
        else:
            q[r] = lam_z * YT[i, u - n] - lam_e * s[r]
            av[r] = 0.0
    _chol_solve(L, f, q, x1)
    _chol_solve(L, f, av, x2)
    ax1 = ax2 = 0.0
    for r in range(f):
        ax1 += av[r] * x1[r]
        ax2 += av[r] * x2[r]
    nu = (1.0 - ax1) / ax2
    for r in range(f):
        zh[r] = x1[r] + nu * x2[r]
    for _ in range(REFINE):  # against the unfactored system: its residual, solved again
        slack = 1.0
        for r in range(f):
            v = q[r] + nu * av[r]
            for c in range(f):
                v -= H[r, c] * zh[c]
            col[r] = v
            slack -= av[r] * zh[r]
        _chol_solve(L, f, col, x1)
        ax1 = 0.0
        for r in range(f):
            ax1 += av[r] * x1[r]
        step = (slack - ax1) / ax2
        for r in range(f):
            zh[r] += x1[r] + step * x2[r]
        nu += step
    return nu


@_jit
def _settle(L, H, F, s, z, f, i, G, YT, lam_z, lam_e, gamma, q, av, x1, x2, zh, col, held,
            entrant, steps, max_inner):  # fmt: skip
    """From ``z`` (on the constraint, signs ``s`` on ``F``) to the minimiser on ``F``: solve
    on ``F``, step back to the first sign change, drop that variable, again. Returns
    ``(f, nu, steps, stalled, stuck)``: ``stuck`` where ``entrant`` could not move."""
    stuck = False
    while True:
        steps += 1
        if steps > max_inner:
            return f, 0.0, steps, True, stuck
        nu_h = _restricted(L, H, F, s, f, i, G, YT, lam_z, lam_e, gamma, q, av, x1, x2, zh, col)
        t, p = 1.0, -1
        for r in range(f):
            if zh[r] * s[r] <= 0.0:
                gap = z[r] - zh[r]
                tr = z[r] / gap if gap != 0.0 else 0.0
                if tr < t:
                    t, p = tr, r
        if p < 0:
            for r in range(f):
                z[r] = zh[r]
            return f, nu_h, steps, False, stuck
        for r in range(f):
            z[r] += t * (zh[r] - z[r])
        z[p] = 0.0
        if t == 0.0 and F[p] == entrant:  # the entrant cannot move (rounding): not again
            stuck = True
        for r in range(f - 1, -1, -1):
            if z[r] == 0.0:
                held[F[r]] = False
                _chol_delete(L, f, r)
                _drop(H, f, r)
                for r2 in range(r, f - 1):
                    F[r2], s[r2], z[r2] = F[r2 + 1], s[r2 + 1], z[r2 + 1]
                f -= 1


@_jit
def _column(i, seed_var, seed_val, G, YT, Y, lam_z, lam_e, gamma, tol, grow, cap, max_passes,
            max_inner, L, H, F, s, z, zh, q, av, x1, x2, col, W, full, held):  # fmt: skip
    """Column ``i`` from the start ``z`` = ``seed_val`` on the variables ``seed_var`` (on
    the constraint, none zero); returns ``(status, f, passes, steps)`` with the support in
    ``F[:f]`` and its values in ``z[:f]`` (module docstring)."""
    n, d = G.shape[0], YT.shape[1]
    f = 0
    if seed_var.shape[0] > cap:
        return TOO_LARGE, 0, 0, 0
    for r in range(seed_var.shape[0]):
        u, v = seed_var[r], seed_val[r]
        if not _add(L, H, F, s, z, f, u, 1.0 if v > 0 else -1.0, i, G, YT, lam_z, gamma, col):
            return SINGULAR, f, 0, 0
        z[f] = v
        held[u] = True
        f += 1
    f, nu, steps, stalled, _ = _settle(L, H, F, s, z, f, i, G, YT, lam_z, lam_e, gamma, q, av,
                                       x1, x2, zh, col, held, -1, 0, max_inner)  # fmt: skip
    if stalled:
        return STALLED, f, 0, steps
    passes = 0
    while True:
        if passes == max_passes:
            return MAX_PASSES, f, passes, steps
        passes += 1
        # every multiplier: lam_z (P^T y_i - K z) + nu a, from f rows of [[G, Y^T], [Y, I]]
        for u in range(n):
            full[u] = G[i, u]
        for u in range(d):
            full[n + u] = YT[i, u]
        for r in range(f):
            k, zk = F[r], z[r]
            if k < n:
                gk, yk = G[k], YT[k]
                for u in range(n):
                    full[u] -= gk[u] * zk
                for u in range(d):
                    full[n + u] -= yk[u] * zk
            else:
                yk = Y[k - n]
                for u in range(n):
                    full[u] -= yk[u] * zk
                full[k] -= zk
        for r in range(f):
            full[F[r]] = math.nan
        full[i] = math.nan
        for u in range(n):
            full[u] = abs(lam_z * full[u] + nu) - 1.0
        for u in range(n, n + d):
            full[u] = abs(lam_z * full[u]) / lam_e - 1.0
        # W: F and the `grow` worst violators
        w = 0
        for r in range(f):
            W[w] = F[r]
            w += 1
        for _ in range(grow):
            worst, at = tol, -1
            for u in range(n + d):
                if full[u] > worst:  # NaN (F, i) compares false
                    worst, at = full[u], u
            if at < 0:
                break
            W[w] = at
            w += 1
            full[at] = math.nan
        if w == f:
            return SOLVED, f, passes, steps
        if w > cap:
            return TOO_LARGE, f, passes, steps
        # the primal active-set method on W (a tenth of tol: the outer pass's violators are
        # violators here too, whatever the rounding of either sum)
        banned = -1
        while True:
            worst, at, mult = tol * 0.1, -1, 0.0
            for v in range(w):
                u = W[v]
                if u == banned:
                    continue
                if held[u]:
                    continue
                m = G[u, i] if u < n else YT[i, u - n]
                for r in range(f):
                    m -= _k(u, F[r], n, G, YT) * z[r]
                m *= lam_z
                if u < n:
                    m += nu
                    viol = abs(m) - 1.0
                else:
                    viol = abs(m) / lam_e - 1.0
                if viol > worst:
                    worst, at, mult = viol, u, m
            if at < 0:
                break
            if f == cap:
                return TOO_LARGE, f, passes, steps
            if not _add(
                L, H, F, s, z, f, at, 1.0 if mult > 0 else -1.0, i, G, YT, lam_z, gamma, col
            ):
                return SINGULAR, f, passes, steps
            f += 1
            held[at] = True
            f, nu_h, steps, stalled, stuck = _settle(L, H, F, s, z, f, i, G, YT, lam_z, lam_e,
                                                     gamma, q, av, x1, x2, zh, col, held, at,
                                                     steps, max_inner)  # fmt: skip
            if stalled:
                return STALLED, f, passes, steps
            if stuck:
                banned = at
            nu = nu_h


@_jit
def solve_columns(first, step, G, YT, Y, seed_ptr, seed_var, seed_val, lam_z, lam_e, tol, grow,
                  cap, max_passes, max_inner, C, E, status, passes, steps, dense):  # fmt: skip
    """Columns ``first, first + step, ...`` into ``C`` (``N x N``) and ``E`` (``D x N``),
    zero on entry, with each column's status, passes and inner steps (``status`` -1 on
    entry: a column left so was not run). Column ``i`` starts from its variables
    ``seed_var[seed_ptr[i]:seed_ptr[i + 1]]`` (coefficients ``0..N-1``, outliers ``N..``)
    at the values ``seed_val[...]``: a point of the constraint, none zero, not ``i``. A
    column whose set outgrows ``cap`` sets ``dense[0]``, and every call sharing ``dense``
    stops at its next column."""
    n, d = G.shape[0], YT.shape[1]
    width = cap + 1
    L = np.zeros((width, width))  # the Cholesky factor of H, the support's system
    H = np.zeros((width, width))
    F = np.zeros(width, np.int64)
    W = np.zeros(width + grow, np.int64)
    s, z, zh, q = np.zeros(width), np.zeros(width), np.zeros(width), np.zeros(width)
    av, x1, x2, col = np.zeros(width), np.zeros(width), np.zeros(width), np.zeros(width)
    full = np.zeros(n + d)
    held = np.zeros(n + d, np.bool_)  # in F
    gamma = 0.0
    for u in range(n):
        gamma = max(gamma, lam_z * G[u, u])
    for i in range(first, n, step):
        if dense[0]:
            return
        a, b = seed_ptr[i], seed_ptr[i + 1]
        st, f, ps, stp = _column(i, seed_var[a:b], seed_val[a:b], G, YT, Y, lam_z, lam_e, gamma,
                                 tol, grow, cap, max_passes, max_inner, L, H, F, s, z, zh, q, av,
                                 x1, x2, col, W, full, held)  # fmt: skip
        status[i], passes[i], steps[i] = st, ps, stp
        if st == TOO_LARGE:
            dense[0] = True
        for r in range(f):
            held[F[r]] = False
            if F[r] < n:
                C[F[r], i] = z[r]
            else:
                E[F[r] - n, i] = z[r]
