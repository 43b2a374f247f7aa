"""The working sets' Triton kernel (:func:`_columns_kernel`) and its device functions: one
program per column at a time solves the program restricted to the column's working set by
the primal active-set method (:mod:`videoanchor.anchor.solvers.workset_cuda` runs the
passes and launches it; docs/ssc-gpu.md has the design and its static checks).

Imported on the kernel's first launch (:func:`videoanchor.anchor.solvers.workset_cuda.launch`),
never by ``import videoanchor``: importing it imports Triton.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _row(A, r0, used, offs, BR: tl.constexpr, M: tl.constexpr):
    """The row tile ``A[r0:r0 + BR, :]`` over the slots in use (0 elsewhere) and its
    row numbers."""
    rows = r0 + tl.arange(0, BR)
    m = (rows[:, None] < used) & (offs[None, :] < used)
    return tl.load(A + rows[:, None] * M + offs[None, :], mask=m, other=0.0), rows


@triton.jit
def _stage(vs, x, y, offs, M: tl.constexpr):
    """``x`` and ``y`` (register vectors over the slots) into the program's vector scratch
    ``vs`` (``2 M``), so that a row tile can load its rows' entries (a register vector
    cannot be indexed)."""
    tl.debug_barrier()  # (every thread has read the scratch's last vectors)
    tl.store(vs + offs, x)
    tl.store(vs + M + offs, y)
    tl.debug_barrier()


@triton.jit
def _rows_of(vs, rows, used):
    """The staged vector's entries at ``rows`` (0 past ``used``)."""
    return tl.load(vs + rows, mask=rows < used, other=0.0)


@triton.jit
def _matvec2(A, x, y, vs, used, offs, BR: tl.constexpr, M: tl.constexpr):
    """``A x`` and ``A y`` for a symmetric ``A`` in one sweep over its row tiles: each
    tile's rows weighted by ``x``'s and ``y``'s entries there, summed over the rows once
    after the sweep (no reduction inside the loop, whose iterations are then
    independent loads and FMAs)."""
    _stage(vs, x, y, offs, M)
    ax = tl.zeros([BR, M], dtype=tl.float64)
    ay = tl.zeros([BR, M], dtype=tl.float64)
    for r0 in range(0, used, BR):
        t, rows = _row(A, r0, used, offs, BR, M)
        ax += t * _rows_of(vs, rows, used)[:, None]
        ay += t * _rows_of(vs + M, rows, used)[:, None]
    return tl.sum(ax, axis=0), tl.sum(ay, axis=0)


@triton.jit
def _matvec(A, x, vs, used, offs, BR: tl.constexpr, M: tl.constexpr):
    """``A x`` for a symmetric ``A``, as :func:`_matvec2`."""
    _stage(vs, x, x, offs, M)
    ax = tl.zeros([BR, M], dtype=tl.float64)
    for r0 in range(0, used, BR):
        t, rows = _row(A, r0, used, offs, BR, M)
        ax += t * _rows_of(vs, rows, used)[:, None]
    return tl.sum(ax, axis=0)


@triton.jit
def _join(Hinv, H, F, q, used, offs, ridge, vs, BR: tl.constexpr, M: tl.constexpr):
    """Slot ``q`` joins the support ``F`` (without ``q``) of the inverse ``Hinv`` (zero
    off ``F``): a bordering update, in place. Returns 1 where the Schur pivot fell to
    the ridge (the support's system near singular: the inverse is then not carried)."""
    hq = tl.load(H + q * M + offs, mask=offs < used, other=0.0)  # (H is symmetric)
    eta = tl.sum(tl.where(offs == q, hq, 0.0))
    h = tl.where(F, hq, 0.0)
    u = _matvec(Hinv, h, vs, used, offs, BR, M)
    schur = eta - tl.sum(h * u)
    delta = tl.maximum(schur, ridge * eta)
    eq = offs == q
    _stage(vs, u, u, offs, M)
    for r0 in range(0, used, BR):
        t, rows = _row(Hinv, r0, used, offs, BR, M)
        ur = _rows_of(vs, rows, used)
        t += ur[:, None] * u[None, :] / delta
        t = tl.where(eq[None, :], -ur[:, None] / delta, t)
        t = tl.where((rows == q)[:, None], -u[None, :] / delta, t)
        t = tl.where((rows == q)[:, None] & eq[None, :], 1.0 / delta, t)
        m = (rows[:, None] < used) & (offs[None, :] < used)
        tl.store(Hinv + rows[:, None] * M + offs[None, :], t, mask=m)
    tl.debug_barrier()
    return tl.where(schur < ridge * eta, 1, 0)


@triton.jit
def _leave(Hinv, p, used, offs, vs, BR: tl.constexpr, M: tl.constexpr):
    """Slot ``p`` leaves the support: a Schur downdate of ``Hinv``, in place."""
    cp = tl.load(Hinv + p * M + offs, mask=offs < used, other=0.0)
    d = tl.sum(tl.where(offs == p, cp, 0.0))
    ep = offs == p
    cp = tl.where(ep, 0.0, cp)
    _stage(vs, cp, cp, offs, M)  # (its barriers: row p is read by every thread before any
    # writes it)
    for r0 in range(0, used, BR):
        t, rows = _row(Hinv, r0, used, offs, BR, M)
        t -= _rows_of(vs, rows, used)[:, None] * cp[None, :] / d
        t = tl.where((rows == p)[:, None] | ep[None, :], 0.0, t)
        m = (rows[:, None] < used) & (offs[None, :] < used)
        tl.store(Hinv + rows[:, None] * M + offs[None, :], t, mask=m)
    tl.debug_barrier()


@triton.jit
def _target(Hinv, H, F, r, a, used, offs, vs, BR: tl.constexpr, M: tl.constexpr):
    """The support's equality-constrained minimiser (zero off ``F``) and the border's
    multiplier ``t``: ``H z = r + t a``, ``a^T z = 1``, refined once against ``H``."""
    af = tl.where(F, a, 0.0)
    x1, x2 = _matvec2(Hinv, r, af, vs, used, offs, BR, M)
    den = tl.sum(af * x2)
    t = (1.0 - tl.sum(af * x1)) / den
    z = x1 + t * x2
    res = tl.where(F, r + t * af - _matvec(H, z, vs, used, offs, BR, M), 0.0)
    dz = _matvec(Hinv, res, vs, used, offs, BR, M)
    dt = (1.0 - tl.sum(af * (z + dz))) / den
    return z + dz + dt * x2, t + dt


# the sizes are not specialised (no variant per N % 16 == 0 or N == 1): one binary per
# level of slots, so that warm_up's launch compiles what every later call runs
@triton.jit(do_not_specialize=["n_work", "N", "D", "max_inner", "first"])
def _columns_kernel(G, X, cols_ptr, ids_ptr, z_ptr, mu_ptr, status_ptr, steps_ptr,
                    H_ptr, Hinv_ptr, V_ptr, scalars, work_ptr, n_work, N, D, max_inner,
                    first,
                    M: tl.constexpr, BR: tl.constexpr):  # fmt: skip
    # float64 scalars from memory (a Python float argument would be float32)
    lam_z = tl.load(scalars)
    lam_e = tl.load(scalars + 1)
    gamma = tl.load(scalars + 2)
    tol = tl.load(scalars + 3)
    ridge = tl.load(scalars + 4)
    pid = tl.program_id(0)
    offs = tl.arange(0, M)
    H = H_ptr + pid.to(tl.int64) * M * M  # this program's scratch
    vs = V_ptr + pid.to(tl.int64) * 2 * M  # and its vector scratch (_stage)
    for wi in range(pid, n_work, tl.num_programs(0)):
        tl.debug_barrier()  # (the last column's sweeps are done before this one writes)
        k = tl.load(work_ptr + wi)  # the columns the pass runs (the others are solved)
        # the column's inverse over its support, kept from its last run (zero off it)
        Hinv = Hinv_ptr + k.to(tl.int64) * M * M
        i = tl.load(cols_ptr + k)
        ids = tl.load(ids_ptr + k * M + offs)
        valid = ids >= 0
        used = tl.max(tl.where(valid, offs + 1, 0))
        coef = valid & (ids < N)
        outl = valid & (ids >= N)
        a = tl.where(coef, 1.0, 0.0).to(tl.float64)
        w = tl.where(outl, lam_e, 1.0).to(tl.float64)
        cid = tl.where(coef, ids, 0).to(tl.int64)
        oid = tl.where(outl, ids - N, 0).to(tl.int64)
        # P^T y_i over the slots: G[:, i] on coefficients, y_i = X[i, :] on outlier entries
        p = tl.load(G + cid * N + i, mask=coef, other=0.0)
        p += tl.load(X + i.to(tl.int64) * D + oid, mask=outl, other=0.0)
        # H = lambda_z P^T P + gamma a a^T over the slots (K's G, Y^T, Y and I blocks by
        # the slots' kinds), row tile by row tile into the scratch
        for r0 in range(0, used, BR):
            rows = r0 + tl.arange(0, BR)
            rid = tl.load(ids_ptr + k * M + rows, mask=rows < used, other=-1)
            rc = (rid >= 0) & (rid < N)
            ro = rid >= N
            rcid = tl.where(rc, rid, 0).to(tl.int64)
            roid = tl.where(ro, rid - N, 0).to(tl.int64)
            K = tl.load(G + rcid[:, None] * N + cid[None, :], mask=rc[:, None] & coef[None, :],
                        other=0.0)  # fmt: skip
            K += tl.load(X + rcid[:, None] * D + oid[None, :],
                         mask=rc[:, None] & outl[None, :], other=0.0)  # fmt: skip
            K += tl.load(X + cid[None, :] * D + roid[:, None],
                         mask=ro[:, None] & coef[None, :], other=0.0)  # fmt: skip
            K += tl.where(ro[:, None] & outl[None, :] & (rid[:, None] == ids[None, :]), 1.0, 0.0)
            ra = tl.where(rc, 1.0, 0.0)
            m = (rows[:, None] < used) & (offs[None, :] < used)
            tl.store(H + rows[:, None] * M + offs[None, :],
                     lam_z * K + gamma * ra[:, None] * a[None, :], mask=m)  # fmt: skip
        tl.debug_barrier()
        z = tl.load(z_ptr + k * M + offs)
        F = (z != 0.0) & valid
        s = tl.where(z > 0.0, 1.0, tl.where(z < 0.0, -1.0, 0.0)).to(tl.float64)
        # The inverse is carried over the passes: it holds the support F that its last
        # run stored (every variable in it non-zero), which a pass keeps in place
        # (``_pass``), and is zero off it. It is rebuilt, from zero, on the level's first
        # pass (``first``) and where it was zeroed: by its last run (below: it did not
        # solve the column, or joined at the ridge; near-singular joins' rounding, as at
        # supports at the rank, is not carried from pass to pass) or by the pass, which
        # found the support off its own stationarity (``_pass``). The
        # support joins, slot by slot (a border may take all of F).
        diag = tl.load(Hinv + offs * (M + 1), mask=F, other=1.0)
        rebuild = tl.where(tl.sum(tl.where(F & (diag == 0.0), 1, 0)) > 0, 1, first)
        clamped = tl.zeros([], dtype=tl.int32)
        if rebuild != 0:
            for q in range(0, used):
                if tl.sum(tl.where((offs == q) & F, 1, 0)) > 0:
                    clamped = tl.maximum(clamped, _join(Hinv, H, F, q, used, offs, ridge, vs,
                                                        BR, M))  # fmt: skip
        steps = 0
        status = 1
        mu = tl.zeros([], dtype=tl.float64)
        # slots that left at once after joining (a step of length 0): kept out until the
        # iterate moves, else the same violator would join and leave forever
        tabu = offs < 0
        done = 0
        while (done == 0) & (steps < max_inner):
            zt, t = _target(Hinv, H, F, tl.where(F, lam_z * p - s * w, 0.0), a, used, offs,
                            vs, BR, M)  # fmt: skip
            mu = gamma - t
            bad = F & (s * zt <= 0.0)
            if tl.sum(tl.where(bad, 1, 0)) > 0:
                # step to the first support variable that reaches zero; it leaves
                gone = z - zt
                ratio = tl.where(bad, z / tl.where(gone != 0.0, gone, 1.0), 2.0)
                alpha = tl.min(ratio)
                out = tl.argmin(ratio, axis=0)
                tabu = tl.where(alpha > 0.0, offs < 0, tabu | (offs == out))
                z = tl.where(F, z + alpha * (zt - z), 0.0)
                z = tl.where(offs == out, 0.0, z)
                F = F & (offs != out)
                s = tl.where(offs == out, 0.0, s)
                _leave(Hinv, out, used, offs, vs, BR, M)
            else:
                moved = tl.max(tl.where(F, tl.abs(zt - z), 0.0)) > 0.0
                tabu = tl.where(moved, offs < 0, tabu)
                z = tl.where(F, zt, 0.0)
                # lambda_z K z = H z - gamma a (a^T z)
                hz = _matvec(H, z, vs, used, offs, BR, M)
                m = lam_z * p - (hz - gamma * a * tl.sum(a * z)) - mu * a
                viol = tl.where(valid & ~F & (ids != i), (tl.abs(m) - w) / w, 0.0)
                worst = tl.max(tl.where(tabu, 0.0, viol))
                if worst > tol:
                    q = tl.argmax(tl.where(tabu, 0.0, viol), axis=0)
                    mq = tl.sum(tl.where(offs == q, m, 0.0))
                    clamped = tl.maximum(clamped, _join(Hinv, H, F, q, used, offs, ridge, vs,
                                                        BR, M))  # fmt: skip
                    F = F | (offs == q)
                    s = tl.where(offs == q, tl.where(mq > 0.0, 1.0, -1.0), s)
                else:  # solved, unless a slot kept out still violates (the next pass)
                    status = tl.where(tl.max(viol) > tol, 1, 0)
                    done = 1
            steps += 1
        # a support variable at exactly 0 leaves: the inverse holds what the pass keeps
        for q in range(0, used):
            if tl.sum(tl.where((offs == q) & F & (z == 0.0), 1, 0)) > 0:
                _leave(Hinv, q, used, offs, vs, BR, M)
        tl.store(z_ptr + k * M + offs, tl.where(F & (z != 0.0), z, 0.0))
        # the next run rebuilds it where this one joined at the ridge or did not solve it
        if tl.maximum(clamped, status) != 0:
            for r0 in range(0, used, BR):
                rows = r0 + tl.arange(0, BR)
                m = (rows[:, None] < used) & (offs[None, :] < used)
                tl.store(Hinv + rows[:, None] * M + offs[None, :],
                         tl.zeros([BR, M], dtype=tl.float64), mask=m)  # fmt: skip
        tl.store(mu_ptr + k, mu)
        tl.store(status_ptr + k, status)
        tl.store(steps_ptr + k, steps)
