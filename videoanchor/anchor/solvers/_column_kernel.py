"""The column kernel (issue 90 step 3): one program of 64-128 threads per active column
solves the column's program restricted to its working set by the primal active-set method,
with the outlier entries eliminated through the Schur complement (the CPU kernel's design,
:mod:`videoanchor.anchor.solvers._workset_kernel`). The contract with the pass loop is
/work/notes/issue90-kernel-interface.md; :func:`launch` is its entry point.

Column ``i`` on its support (coefficients ``F``, outlier entries ``O``, signs ``s``):
an outlier entry's stationarity ``lambda_z r_o = lambda_e s_o`` gives
``e_o = y_io - (Y c)_o - (lambda_e / lambda_z) s_o``, and the coefficients solve

    S c = q + t 1,   1^T c = 1,   S = lambda_z (G_FF - Y_OF^T Y_OF) + gamma 1 1^T,
    q = lambda_z (G_Fi - Y_OF^T y_iO) + lambda_e Y_OF^T s_O - s_F,   mu = gamma - t.

The kernel carries ``S^-1`` (an inverse, not a Cholesky factor: a solve is then two
symmetric products, whose rows the program's threads share, where a factor's triangular
solves take ``|F|`` dependent steps each): a coefficient joins by bordering (its Schur
pivot floored at ``ridge`` times its diagonal) and leaves by a Schur downdate; an outlier
entry joining is ``S - lambda_z y y^T``, leaving ``S + lambda_z y y^T``
(``y = Y[o, F]``): Sherman-Morrison rank-one updates. Each target is refined once against
the unfactored system (products with ``G`` and ``X`` gathered at the slots).

Memory (issue 98 item 4): the support and the candidates are held apart. The support sits
in ``MS`` positions (``state["support"]``, at most the slots ``M``; a power of two): the
registers hold vectors over them, and the inverse lives over them alone in a per-row scratch
in global memory that the kernel owns (``state["Sinv"]``, ``(nc, MS, MS)``), read in row
tiles of about :data:`TILE` elements. The candidates (the slots off the support) stay in
global memory and are priced :data:`CANDIDATES` at a time (their rows of ``G`` at the
support's ids), so a level's slots may be many times ``MS``; a column whose support would
pass ``MS`` stops with status 2 (the pass loop sets it aside). The outlier slots are swept
in chunks of rows of ``Y`` (their values, signs and targets in global memory, ``ze`` in
place), so nothing of size ``ME`` is held in registers and ``ME`` is a run-time stride. The
inverse is carried from run to run with its positions (``state["Spos"]``: each one's slot
and id, -1 free; ``state["Skey"]`` the held outlier entries' ids + 1; ``state["Sok"]`` 1
where valid): a run whose column's support differs, or whose ``Sok`` is 0, rebuilds it
from zero, the support in slot order. The pass loop resets a row ``k`` by
``state["Sok"][k] = 0``.

Imported on the first :func:`launch`, never by ``import videoanchor``: it imports Triton.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

#: Elements of one row tile (``BR x M``) of the inverse, ``G`` or ``Y`` gathered at the slots:
#: one row from ``M = 64`` up (at 128, Triton 3.6 spilled at ``M = 64``, its tile of 2 rows).
TILE = 64
#: Candidate slots read at a time (a row of ``G`` at their ids per support position).
CANDIDATES = 128
#: Threads per program: 4 warps.
NUM_WARPS = 4
#: Compile options: ptxas holds the kernel to 128 registers (4 blocks of 128 threads an SM).
OPTIONS = dict(maxnreg=128)
#: Refinements of each target against the unfactored system.
REFINE = 2


@triton.jit
def _stage(vs, x, y, offs, M: tl.constexpr):
    """``x`` and ``y`` (register vectors over the slots) into the row's vector scratch
    ``vs`` (``2 M``), so that a row tile can load its rows' entries."""
    tl.debug_barrier()  # (every thread has read the scratch's last vectors)
    tl.store(vs + offs, x)
    tl.store(vs + M + offs, y)
    tl.debug_barrier()


@triton.jit
def _mv2(A, vs, x, y, used, offs, BR: tl.constexpr, M: tl.constexpr):
    """``A x`` and ``A y`` for the symmetric ``M x M`` ``A`` (zero past ``used``): each row
    tile's rows weighted by the staged vectors' entries there."""
    _stage(vs, x, y, offs, M)
    ax = tl.zeros([M], dtype=tl.float64)
    ay = tl.zeros([M], dtype=tl.float64)
    for r0 in range(0, used, BR):
        rows = r0 + tl.arange(0, BR)
        rm = rows < used
        t = tl.load(A + rows[:, None] * M + offs[None, :],
                    mask=rm[:, None] & (offs[None, :] < used), other=0.0)  # fmt: skip
        ax += tl.sum(t * tl.load(vs + rows, mask=rm, other=0.0)[:, None], axis=0)
        ay += tl.sum(t * tl.load(vs + M + rows, mask=rm, other=0.0)[:, None], axis=0)
    return ax, ay


@triton.jit
def _gstaged(G, N, idrow, cols64, cmask, vs, used, BR: tl.constexpr, W: tl.constexpr):
    """``G[ids, cols64] x`` (``W`` columns, those of ``cmask``): the rows' ids at ``idrow``
    (-1 empty) below ``used``, ``x`` staged at ``vs`` (:func:`_stage`)."""
    acc = tl.zeros([W], dtype=tl.float64)
    for r0 in range(0, used, BR):
        rows = r0 + tl.arange(0, BR)
        rm = rows < used
        rid = tl.load(idrow + rows, mask=rm, other=-1)
        rv = rm & (rid >= 0)
        t = tl.load(G + tl.where(rv, rid, 0).to(tl.int64)[:, None] * N + cols64[None, :],
                    mask=rv[:, None] & cmask[None, :], other=0.0)  # fmt: skip
        acc += tl.sum(t * tl.load(vs + rows, mask=rm, other=0.0)[:, None], axis=0)
    return acc


@triton.jit
def _gmv(G, N, idrow, cols64, cmask, x, vs, used, offs, BR: tl.constexpr, M: tl.constexpr):
    """``G[ids, ids] x`` over the slots of ``cmask`` (gathered from ``G``, symmetric;
    ``x`` zero off the support)."""
    _stage(vs, x, x, offs, M)
    return _gstaged(G, N, idrow, cols64, cmask, vs, used, BR, M)


@triton.jit
def _xtile(X, D, Ee, e0, cols64, cmask, BE: tl.constexpr):
    """The chunk ``Y[eids[e0:e0 + BE], ids]`` (``BE x M``: ``X[ids, eids]^T``) and its
    rows' slot numbers and ids (-1 empty)."""
    er = e0 + tl.arange(0, BE)
    eid = tl.load(Ee + er)
    ev = eid >= 0
    t = tl.load(X + cols64[None, :] * D + tl.where(ev, eid, 0).to(tl.int64)[:, None],
                mask=ev[:, None] & cmask[None, :], other=0.0)  # fmt: skip
    return t, er, eid


@triton.jit
def _q_out(X, D, Ee, SE, i, lam_z, lam_e, cols64, cmask, used_e, M: tl.constexpr,
           BE: tl.constexpr):  # fmt: skip
    """``Y_OF^T (lambda_e s_O - lambda_z y_iO)``: the outlier entries' part of ``q``."""
    acc = tl.zeros([M], dtype=tl.float64)
    for e0 in range(0, used_e, BE):
        t, er, eid = _xtile(X, D, Ee, e0, cols64, cmask, BE)
        se = tl.load(SE + er)
        held = se != 0.0
        yi = tl.load(X + i * D + tl.where(held, eid, 0).to(tl.int64), mask=held, other=0.0)
        acc += tl.sum(t * tl.where(held, lam_e * se - lam_z * yi, 0.0)[:, None], axis=0)
    return acc


@triton.jit
def _yy_mv(X, D, Ee, SE, x, cols64, cmask, used_e, M: tl.constexpr, BE: tl.constexpr):
    """``Y_OF^T Y_OF x`` over the held outlier entries."""
    acc = tl.zeros([M], dtype=tl.float64)
    for e0 in range(0, used_e, BE):
        t, er, eid = _xtile(X, D, Ee, e0, cols64, cmask, BE)
        held = tl.load(SE + er) != 0.0
        v = tl.where(held, tl.sum(t * x[None, :], axis=1), 0.0)
        acc += tl.sum(t * v[:, None], axis=0)
    return acc


@triton.jit
def _border(Sinv, h, eta, q, used, offs, ridge, vs, BR: tl.constexpr, M: tl.constexpr):
    """Slot ``q`` joins the support of the inverse ``Sinv`` (zero off it): ``h`` is ``S``'s
    column ``q`` on the support (without ``q``), ``eta`` its diagonal. Returns 1 where the
    Schur pivot fell to ``ridge * eta`` (raised to it)."""
    u, _ = _mv2(Sinv, vs, h, h, used, offs, BR, M)
    schur = eta - tl.sum(h * u)
    delta = tl.maximum(schur, ridge * eta)
    eq = offs == q
    _stage(vs, u, u, offs, M)
    for r0 in range(0, used, BR):
        rows = r0 + tl.arange(0, BR)
        m = (rows[:, None] < used) & (offs[None, :] < used)
        t = tl.load(Sinv + rows[:, None] * M + offs[None, :], mask=m, other=0.0)
        ur = tl.load(vs + rows, mask=rows < used, other=0.0)
        t += ur[:, None] * u[None, :] / delta
        t = tl.where(eq[None, :], -ur[:, None] / delta, t)
        t = tl.where((rows == q)[:, None], -u[None, :] / delta, t)
        t = tl.where((rows == q)[:, None] & eq[None, :], 1.0 / delta, t)
        tl.store(Sinv + rows[:, None] * M + offs[None, :], t, mask=m)
    tl.debug_barrier()
    return tl.where(schur < ridge * eta, 1, 0)


@triton.jit
def _leave(Sinv, p, used, offs, vs, BR: tl.constexpr, M: tl.constexpr):
    """Slot ``p`` leaves the support: a Schur downdate of ``Sinv``, in place."""
    cp = tl.load(Sinv + p * M + offs, mask=offs < used, other=0.0)
    d = tl.load(Sinv + p * M + p)  # (a load, not a reduction: see _slot)
    ep = offs == p
    cp = tl.where(ep, 0.0, cp)
    _stage(vs, cp, cp, offs, M)  # (its barriers: row p is read before any thread writes it)
    for r0 in range(0, used, BR):
        rows = r0 + tl.arange(0, BR)
        m = (rows[:, None] < used) & (offs[None, :] < used)
        t = tl.load(Sinv + rows[:, None] * M + offs[None, :], mask=m, other=0.0)
        t -= tl.load(vs + rows, mask=rows < used, other=0.0)[:, None] * cp[None, :] / d
        t = tl.where((rows == p)[:, None] | ep[None, :], 0.0, t)
        tl.store(Sinv + rows[:, None] * M + offs[None, :], t, mask=m)
    tl.debug_barrier()


@triton.jit
def _rank1(Sinv, y, sigma, ridge, used, offs, vs, BR: tl.constexpr, M: tl.constexpr):
    """``S + sigma y y^T`` into the inverse (Sherman-Morrison), ``y`` zero off the support.
    Returns 1 where the update's denominator fell below ``ridge`` (raised to it: the
    support's system near singular)."""
    w, _ = _mv2(Sinv, vs, y, y, used, offs, BR, M)
    den = 1.0 + sigma * tl.sum(y * w)
    low = den < ridge
    den = tl.maximum(den, ridge)
    _stage(vs, w, w, offs, M)
    for r0 in range(0, used, BR):
        rows = r0 + tl.arange(0, BR)
        m = (rows[:, None] < used) & (offs[None, :] < used)
        t = tl.load(Sinv + rows[:, None] * M + offs[None, :], mask=m, other=0.0)
        t -= (sigma / den) * tl.load(vs + rows, mask=rows < used, other=0.0)[:, None] * w[None, :]
        tl.store(Sinv + rows[:, None] * M + offs[None, :], t, mask=m)
    tl.debug_barrier()
    return tl.where(low, 1, 0)


@triton.jit
def _scol(G, X, N, D, Ee, SE, idq, cols64, valid, lam_z, gamma, used_e,
          MS: tl.constexpr, BE: tl.constexpr):  # fmt: skip
    """``S``'s column at the coefficient ``idq`` over the positions of ``valid`` (ids
    ``cols64``), with the held outlier entries."""
    g = tl.load(G + idq * N + cols64, mask=valid, other=0.0)
    acc = tl.zeros([MS], dtype=tl.float64)
    for e0 in range(0, used_e, BE):
        t, er, eid = _xtile(X, D, Ee, e0, cols64, valid, BE)
        held = tl.load(SE + er) != 0.0
        xq = tl.load(X + idq * D + tl.where(held, eid, 0).to(tl.int64), mask=held, other=0.0)
        acc += tl.sum(t * xq[:, None], axis=0)
    return lam_z * (g - acc) + tl.where(valid, gamma, 0.0)


@triton.jit
def _p(G, N, i, cols64, valid, lam_z):
    """``lambda_z G_ui`` over the positions (read again where used: not held across the
    loop)."""
    return lam_z * tl.load(G + cols64 * N + i, mask=valid, other=0.0)


@triton.jit
def _candidates(G, X, N, D, ids, z, CT, Ee, SE, Ze, pid, vs, i, z_sup, used, used_e, lam_z,
                mu, moves, M: tl.constexpr, MS: tl.constexpr, BC: tl.constexpr,
                BRC: tl.constexpr, BE: tl.constexpr):  # fmt: skip
    """The candidates (the column's slots off the support, in global memory, read ``BC`` at a
    time): their multipliers ``m_u = lambda_z (G_ui - G_uF c - Y_Ou^T e_O) - mu`` at the
    iterate (``z_sup`` over the support's positions, whose ids are ``pid``; the held outlier
    entries' values in ``Ze``), the largest violation ``|m_u| - 1`` of all (``top``) and of
    those not kept out (``CT`` the move count + 1: kept out until the iterate moves), its
    slot and its multiplier."""
    _stage(vs, z_sup, z_sup, tl.arange(0, MS), MS)
    top = tl.zeros([], dtype=tl.float64)
    worst = tl.zeros([], dtype=tl.float64)
    at = tl.full([], -1, tl.int32)
    m_at = tl.zeros([], dtype=tl.float64)
    for c0 in range(0, M, BC):
        cs = c0 + tl.arange(0, BC)
        cid = tl.load(ids + cs)
        cand = (cid >= 0) & (cid != i) & (tl.load(z + cs) == 0.0)
        if tl.max(cand.to(tl.int32)) > 0:
            cc64 = tl.where(cand, cid, 0).to(tl.int64)
            gz = _gstaged(G, N, pid, cc64, cand, vs, used, BRC, BC)
            for e0 in range(0, used_e, BE):
                t, er, eid = _xtile(X, D, Ee, e0, cc64, cand, BE)
                held = tl.load(SE + er) != 0.0
                gz += tl.sum(t * tl.where(held, tl.load(Ze + er), 0.0)[:, None], axis=0)
            m = lam_z * (tl.load(G + cc64 * N + i, mask=cand, other=0.0) - gz) - mu
            v = tl.where(cand, tl.abs(m) - 1.0, 0.0)
            top = tl.maximum(top, tl.max(v))
            v = tl.where(tl.load(CT + cs) == moves + 1.0, 0.0, v)
            mc, a = tl.max(v, axis=0, return_indices=True)
            if mc > worst:
                worst = mc
                at = c0 + a
                m_at = tl.sum(tl.where(cs == at, m, 0.0))
    return top, worst, at, m_at


# the sizes are not specialised (one binary per level of slots)
@triton.jit(do_not_specialize=["N", "D", "ME", "max_inner"])
def _column_kernel(G, X, scalars, cols_ptr, ids_ptr, z_ptr, eids_ptr, ze_ptr, mu_ptr,
                   status_ptr, steps_ptr, Sinv_ptr, pos_ptr, key_ptr, ok_ptr, V_ptr, EV_ptr,
                   CT_ptr, active, count, N, D, ME, max_inner,
                   M: tl.constexpr, MS: tl.constexpr, BR: tl.constexpr, BE: tl.constexpr,
                   BC: tl.constexpr, BRC: tl.constexpr, REFINE: tl.constexpr):  # fmt: skip
    pos = tl.program_id(0)
    if pos < tl.load(count):
        # (float64 from memory: a Python float would be float32). lambda_e (1), tol (3) and,
        # in the pass loop, gamma (2) and ridge (4) are read where used, not held in registers
        lam_z = tl.load(scalars)
        ridge = tl.load(scalars + 4)
        k = tl.load(active + pos).to(tl.int64)
        po = tl.arange(0, MS)  # the support's positions
        Sinv = Sinv_ptr + k * MS * MS
        vs = V_ptr + k * 2 * MS
        Ee = eids_ptr + k * ME
        Ze = ze_ptr + k * ME
        SE = EV_ptr + k * 3 * ME  # the held entries' signs (0: not held)
        ET = SE + ME  # their targets
        TB = SE + 2 * ME  # kept out until the iterate moves: the move count + 1
        PS = pos_ptr + k * 2 * MS  # each position's slot (-1: free)
        PI = PS + MS  # and its id
        key = key_ptr + k * ME
        ids = ids_ptr + k * M
        zs = z_ptr + k * M
        CT = CT_ptr + k * M  # the candidates kept out, as TB
        i = tl.load(cols_ptr + k)
        # the support in the slots (its count) and the candidates' marks cleared
        nsup = tl.zeros([], dtype=tl.int32)
        for c0 in range(0, M, BC):
            cs = c0 + tl.arange(0, BC)
            cid = tl.load(ids + cs)
            nsup += tl.sum(((cid >= 0) & (cid != i) & (tl.load(zs + cs) != 0.0)).to(tl.int32))
            tl.store(CT + cs, tl.zeros([BC], dtype=tl.float64))
        # the carried positions: each one's slot still holds its id, on the support
        pslot = tl.load(PS + po)
        inuse = pslot >= 0
        at64 = tl.where(inuse, pslot, 0).to(tl.int64)
        idc = tl.load(ids + at64, mask=inuse, other=-1)
        differ = tl.sum((inuse & ((idc != tl.load(PI + po)) | (tl.load(zs + at64, mask=inuse,
                                                                          other=0.0) == 0.0)))
                        .to(tl.int32))  # fmt: skip
        differ += tl.where(tl.sum(inuse.to(tl.int32)) != nsup, 1, 0)
        # the outlier slots: signs from the values, the slots in use, the carried key
        used_e = tl.zeros([], dtype=tl.int32)
        for e0 in range(0, ME, BE):
            er = e0 + tl.arange(0, BE)
            eid = tl.load(Ee + er)
            zev = tl.load(Ze + er)
            held = (eid >= 0) & (zev != 0.0)
            tl.store(SE + er, tl.where(held, tl.where(zev > 0.0, 1.0, -1.0), 0.0))
            tl.store(TB + er, tl.zeros([BE], dtype=tl.float64))
            used_e = tl.maximum(used_e, tl.max(tl.where(eid >= 0, er + 1, 0)))
            ke = tl.load(key + er)
            differ += tl.sum(tl.where(ke != tl.where(held, eid + 1, 0), 1, 0))
        tl.debug_barrier()
        clamped = tl.zeros([], dtype=tl.int32)
        steps = tl.zeros([], dtype=tl.int32)
        status = tl.full([], 1, tl.int32)
        done = tl.zeros([], dtype=tl.int32)
        rebuild = (tl.load(ok_ptr + k) == 0) | (differ > 0)
        if rebuild & (nsup > MS):  # the support does not fit the level's positions
            status = tl.full([], 2, tl.int32)
            done = tl.full([], 1, tl.int32)
            inuse = po < 0
        elif rebuild:  # the support into positions in slot order, the inverse from zero
            tl.store(PS + po, tl.full([MS], -1, tl.int32))
            tl.store(PI + po, tl.full([MS], -1, tl.int32))
            tl.debug_barrier()
            base = tl.zeros([], dtype=tl.int32)
            for c0 in range(0, M, BC):
                cs = c0 + tl.arange(0, BC)
                cid = tl.load(ids + cs)
                sup = (cid >= 0) & (cid != i) & (tl.load(zs + cs) != 0.0)
                rank = base + tl.cumsum(sup.to(tl.int32), axis=0) - 1
                tl.store(PS + rank, cs, mask=sup)
                tl.store(PI + rank, cid, mask=sup)
                base += tl.sum(sup.to(tl.int32))
            tl.debug_barrier()
            pslot = tl.load(PS + po)
            inuse = pslot >= 0
            for r0 in range(0, nsup, BR):
                rows = r0 + tl.arange(0, BR)
                tl.store(Sinv + rows[:, None] * MS + po[None, :],
                         tl.zeros([BR, MS], dtype=tl.float64),
                         mask=(rows[:, None] < nsup) & (po[None, :] < nsup))  # fmt: skip
            tl.debug_barrier()
        F = inuse
        cols64 = tl.where(F, tl.load(PI + po), 0).to(tl.int64)
        z = tl.load(zs + tl.where(F, pslot, 0).to(tl.int64), mask=F, other=0.0)
        s = tl.where(z > 0.0, 1.0, tl.where(z < 0.0, -1.0, 0.0)).to(tl.float32)  # (exact)
        used = tl.max(tl.where(F, po + 1, 0))
        if rebuild & (done == 0):
            for q in range(0, used):  # bordered position by position
                col = _scol(G, X, N, D, Ee, SE, tl.load(PI + q).to(tl.int64), cols64, F,
                            lam_z, tl.load(scalars + 2), used_e, MS, BE)  # fmt: skip
                eta = tl.sum(tl.where(po == q, col, 0.0))
                h = tl.where(F & (po < q), col, 0.0)
                clamped = tl.maximum(clamped, _border(Sinv, h, eta, q, used, po, ridge,
                                                      vs, BR, MS))  # fmt: skip
        moves = tl.zeros(
            [], dtype=tl.float64
        )  # (the variables kept out hold the move count + 1 in TB and CT)
        mu = tl.zeros([], dtype=tl.float64)
        while (done == 0) & (steps < max_inner):
            # the target on the support: S c = q + t 1, 1^T c = 1, refined once
            af = tl.where(F, 1.0, 0.0).to(tl.float64)
            qo = _q_out(X, D, Ee, SE, i, lam_z, tl.load(scalars + 1), cols64, F, used_e, MS, BE)
            q = tl.where(F, _p(G, N, i, cols64, F, lam_z) + qo - s.to(tl.float64), 0.0)
            x1, x2 = _mv2(Sinv, vs, q, af, used, po, BR, MS)
            den = tl.sum(af * x2)
            t = (1.0 - tl.sum(af * x1)) / den
            zt = x1 + t * x2
            for _ in range(REFINE):  # against the unfactored system (a loop: one copy of its code)
                sz = lam_z * (_gmv(G, N, PI, cols64, F, zt, vs, used, po, BR, MS)
                              - _yy_mv(X, D, Ee, SE, zt, cols64, F, used_e, MS, BE))  # fmt: skip
                sz += tl.load(scalars + 2) * af * tl.sum(zt)
                res = tl.where(F, q + t * af - sz, 0.0)
                dz, _ = _mv2(Sinv, vs, res, res, used, po, BR, MS)
                dt = (1.0 - tl.sum(af * (zt + dz))) / den
                zt = tl.where(F, zt + dz + dt * x2, 0.0)
                t += dt
            mu = tl.load(scalars + 2) - t
            # the first sign change on the line from the iterate to the target
            bad = F & (s.to(tl.float64) * zt <= 0.0)
            gone = z - zt
            ratio = tl.where(bad, z / tl.where(gone != 0.0, gone, 1.0), 2.0)
            alpha, out = tl.min(ratio, axis=0, return_indices=True)
            alpha_e = tl.full([], 2.0, tl.float64)
            out_e = tl.full([], -1, tl.int32)
            moved = tl.max(tl.where(F & (tl.abs(zt - z) > 0.0), 1, 0)) > 0  # (int: 1 register)
            for e0 in range(0, used_e, BE):
                tt, er, eid = _xtile(X, D, Ee, e0, cols64, F, BE)
                se = tl.load(SE + er)
                held = se != 0.0
                yi = tl.load(X + i * D + tl.where(held, eid, 0).to(tl.int64), mask=held,
                             other=0.0)  # fmt: skip
                et = tl.where(
                    held,
                    yi - tl.sum(tt * zt[None, :], axis=1) - (tl.load(scalars + 1) / lam_z) * se,
                    0.0,
                )
                tl.store(ET + er, et)
                zev = tl.load(Ze + er)
                ge = zev - et
                rc = tl.where(held & (se * et <= 0.0), zev / tl.where(ge != 0.0, ge, 1.0), 2.0)
                mc = tl.min(rc)
                if mc < alpha_e:
                    alpha_e = mc
                    out_e = e0 + tl.argmin(rc, axis=0)
                moved = moved | (tl.max(tl.where(held, tl.abs(ge), 0.0)) > 0.0)
            tl.debug_barrier()
            r1 = tl.full([], -1, tl.int32)  # the outlier slot of a rank-one update, its sign
            sigma = tl.zeros([], dtype=tl.float64)
            if (alpha < 2.0) | (alpha_e < 2.0):
                # step to the first support variable that reaches zero; it leaves
                step = tl.minimum(alpha, alpha_e)
                oe = tl.where(alpha_e < alpha, out_e, -1)  # (an outlier entry leaves)
                z = tl.where(F, z + step * (zt - z), 0.0)
                for e0 in range(0, used_e, BE):
                    er = e0 + tl.arange(0, BE)
                    held = tl.load(SE + er) != 0.0
                    zev = tl.load(Ze + er)
                    zev = tl.where(held, zev + step * (tl.load(ET + er) - zev), zev)
                    tl.store(Ze + er, tl.where(er == oe, 0.0, zev), mask=held)
                if step > 0.0:
                    moves += 1.0
                if alpha <= alpha_e:
                    # its slot back among the candidates (kept out where the step was 0)
                    so = tl.load(PS + out)
                    tl.store(zs + so, 0.0)
                    if step == 0.0:
                        tl.store(CT + so, moves + 1.0)
                    z = tl.where(po == out, 0.0, z)
                    F = F & (po != out)
                    s = tl.where(po == out, 0.0, s).to(tl.float32)
                    tl.store(PS + out, -1)
                    tl.store(PI + out, -1)
                    _leave(Sinv, out, used, po, vs, BR, MS)
                else:
                    tl.store(SE + out_e, 0.0)
                    if step == 0.0:
                        tl.store(TB + out_e, moves + 1.0)
                    r1, sigma = out_e, lam_z
            else:
                if moved:
                    moves += 1.0
                z = zt
                # the multipliers at the new iterate: outlier entries m_o = lambda_z (y_io -
                # (Y c)_o), the held ones taking their targets; then the candidates'
                worst_e = tl.zeros([], dtype=tl.float64)
                top_e = tl.zeros([], dtype=tl.float64)
                at_e = tl.full([], -1, tl.int32)
                sign_e = tl.zeros([], dtype=tl.float64)
                for e0 in range(0, used_e, BE):
                    tt, er, eid = _xtile(X, D, Ee, e0, cols64, F, BE)
                    se = tl.load(SE + er)
                    held = se != 0.0
                    tl.store(Ze + er, tl.load(ET + er), mask=held)
                    ev = eid >= 0
                    yi = tl.load(X + i * D + tl.where(ev, eid, 0).to(tl.int64), mask=ev,
                                 other=0.0)  # fmt: skip
                    mo = lam_z * (yi - tl.sum(tt * z[None, :], axis=1))
                    vo = tl.where(
                        ev & ~held, (tl.abs(mo) - tl.load(scalars + 1)) / tl.load(scalars + 1), 0.0
                    )
                    top_e = tl.maximum(top_e, tl.max(vo))
                    vo = tl.where(tl.load(TB + er) == moves + 1.0, 0.0, vo)
                    mc = tl.max(vo)
                    if mc > worst_e:
                        worst_e = mc
                        at_e = e0 + tl.argmax(vo, axis=0)
                        sign_e = tl.sum(
                            tl.where(er == at_e, tl.where(mo > 0.0, 1.0, -1.0), 0.0)
                        ).to(tl.float64)
                tl.debug_barrier()
                top, worst, qn, mq = _candidates(G, X, N, D, ids, zs, CT, Ee, SE, Ze, PI, vs,
                                                 i, z, used, used_e, lam_z, mu, moves, M, MS,
                                                 BC, BRC, BE)  # fmt: skip
                if tl.maximum(worst, worst_e) > tl.load(scalars + 3):
                    if worst >= worst_e:
                        # into the first free position (none: the level's positions are full)
                        newp = tl.min(tl.where(F, MS, po))
                        if newp < MS:
                            idq = tl.load(ids + qn)
                            cols64 = tl.where(po == newp, idq, cols64).to(tl.int64)
                            col = _scol(G, X, N, D, Ee, SE, idq.to(tl.int64), cols64,
                                        F | (po == newp), lam_z, tl.load(scalars + 2), used_e,
                                        MS, BE)  # fmt: skip
                            eta = tl.sum(tl.where(po == newp, col, 0.0))
                            used = tl.maximum(used, newp + 1)
                            clamped = tl.maximum(clamped, _border(Sinv, tl.where(F, col, 0.0),
                                                                  eta, newp, used, po,
                                                                  tl.load(scalars + 4), vs,
                                                                  BR, MS))  # fmt: skip
                            F = F | (po == newp)
                            tl.store(PS + newp, qn)
                            tl.store(PI + newp, idq)
                            tl.store(zs + qn, float("nan"))  # (off the candidates until the end)
                            s = tl.where(po == newp, tl.where(mq > 0.0, 1.0, -1.0),
                                         s).to(tl.float32)  # fmt: skip
                        else:
                            status = tl.full([], 2, tl.int32)
                            done = tl.full([], 1, tl.int32)
                    else:
                        tl.store(SE + at_e, sign_e)
                        r1, sigma = at_e, -lam_z
                else:  # solved, unless a variable kept out still violates (the next pass)
                    tol = tl.load(scalars + 3)
                    status = tl.where((top > tol) | (top_e > tol), 1, 0)
                    done = 1
            if r1 >= 0:  # an outlier entry left or joined: S -/+ lambda_z y y^T (one call site)
                y = tl.load(X + cols64 * D + tl.load(Ee + r1), mask=F, other=0.0)
                tl.debug_barrier()
                clamped = tl.maximum(clamped, _rank1(Sinv, y, sigma, tl.load(scalars + 4), used,
                                                     po, vs, BR, MS))  # fmt: skip
            steps += 1
        # the support into its slots, the outlier key, and whether the inverse is carried
        keep = F & (z != 0.0)
        tl.debug_barrier()  # (the positions' slots as the run left them)
        tl.store(zs + tl.where(F, tl.load(PS + po), 0).to(tl.int64), tl.where(keep, z, 0.0),
                 mask=F)  # fmt: skip
        lost = tl.sum(tl.where(F & (z == 0.0), 1, 0))
        for e0 in range(0, ME, BE):
            er = e0 + tl.arange(0, BE)
            eid = tl.load(Ee + er)
            held = tl.load(SE + er) != 0.0
            zev = tl.load(Ze + er)
            tl.store(key + er, tl.where(held & (zev != 0.0), eid + 1, 0))
            lost += tl.sum(tl.where(held & (zev == 0.0), 1, 0))
        carry = (status == 0) & (clamped == 0) & (lost == 0)
        tl.store(ok_ptr + k, tl.where(carry, 1, 0))
        tl.store(mu_ptr + k, mu)
        tl.store(status_ptr + k, status)
        tl.store(steps_ptr + k, steps)


def support(state: dict) -> int:
    """The support's positions ``MS`` at ``state``'s level: ``state["support"]`` where it
    names them (the level's bound on a column's support), else every slot ``M``."""
    return int(state.get("support", state["ids"].shape[1]))


def tiles(MS: int, M: int | None = None, tile: int = TILE) -> tuple[int, int, int, int]:
    """The rows of a tile of the inverse (``BR``), of a chunk of outlier slots (``BE``), the
    candidates read at a time (``BC``: at most :data:`CANDIDATES`) and the support's rows a
    step of their products (``BRC``)."""
    rows = max(1, min(MS, tile // MS))
    bc = min(M if M is not None else MS, CANDIDATES)
    return rows, rows, bc, max(1, min(MS, tile // bc))


def scratch(state: dict) -> None:
    """The kernel's scratch into ``state`` (where not there), at ``MS`` = :func:`support`
    positions: ``Sinv`` ``(nc, MS, MS)`` the carried inverses, ``Spos`` ``(nc, 2, MS)`` each
    position's slot and id (-1 free), ``Skey`` ``(nc, ME)`` the outlier entries held,
    ``Sok`` ``(nc,)`` (0: rebuild), ``Svec`` ``(nc, 2, MS)`` staged vectors, ``Sout``
    ``(nc, 3, ME)`` the outlier slots' signs, targets and marks, ``Scand`` ``(nc, M)`` the
    candidates' marks."""
    if "Sinv" in state:
        return
    nc, M = state["ids"].shape
    MS = support(state)
    ME = state["eids"].shape[1]
    dev = state["ids"].device
    f64 = dict(dtype=torch.float64, device=dev)
    state["Sinv"] = torch.zeros(nc, MS, MS, **f64)
    state["Spos"] = torch.full((nc, 2, MS), -1, dtype=torch.int32, device=dev)
    state["Skey"] = torch.zeros(nc, max(ME, 1), dtype=torch.int32, device=dev)
    state["Sok"] = torch.zeros(nc, dtype=torch.int32, device=dev)
    state["Svec"] = torch.zeros(nc, 2, MS, **f64)
    state["Sout"] = torch.zeros(nc, 3, max(ME, 1), **f64)
    state["Scand"] = torch.zeros(nc, M, **f64)


def _check(state: dict, active: torch.Tensor, count: torch.Tensor) -> None:
    ids, eids = state["ids"], state["eids"]
    M, ME = ids.shape[1], eids.shape[1]
    MS = support(state)
    for name, v in (("M", M), ("ME", ME), ("support", MS)):
        if v < 1 or v & (v - 1):
            raise ValueError(f"{name}: expected a power of two, got {v}")
    if MS > M:
        raise ValueError(f"support: expected at most the slots ({M}), got {MS}")
    for name, t, dt in (("ids", ids, torch.int32), ("eids", eids, torch.int32),
                        ("active", active, torch.int32), ("count", count, torch.int32),
                        ("z", state["z"], torch.float64), ("ze", state["ze"], torch.float64),
                        ("mu", state["mu"], torch.float64),
                        ("status", state["status"], torch.int32),
                        ("steps_pass", state["steps_pass"], torch.int32)):  # fmt: skip
        if t.dtype != dt:
            raise TypeError(f"{name}: expected {dt}, got {t.dtype}")
        if not t.is_contiguous():
            raise ValueError(f"{name}: expected a contiguous tensor")
    nc = ids.shape[0]
    if tuple(state["z"].shape) != (nc, M) or tuple(state["ze"].shape) != (nc, ME):
        raise ValueError(
            f"z, ze: expected shapes {(nc, M)} and {(nc, ME)} (as ids, eids), got "
            f"{tuple(state['z'].shape)} and {tuple(state['ze'].shape)}"
        )
    if active.dim() != 1 or active.shape[0] > nc or tuple(count.shape) != (1,):
        raise ValueError(
            f"active: expected (cap,) with cap <= {nc} and count (1,), got "
            f"{tuple(active.shape)} and {tuple(count.shape)}"
        )


def launch(state: dict, active: torch.Tensor, count: torch.Tensor) -> None:
    """Solve, in place, each column ``k`` of ``active[:count]`` restricted to its slots
    (the contract, module docstring): ``z``, ``ze``, ``mu``, ``status``, ``steps_pass`` at
    those rows; ``count`` is read on the device (the grid is ``active``'s length)."""
    _check(state, active, count)
    scratch(state)
    p = state["program"]
    M, ME = state["ids"].shape[1], state["eids"].shape[1]
    MS = support(state)
    BR, BE, BC, BRC = tiles(MS, M, TILE)
    BE = min(BE, ME)
    cap = active.shape[0]
    if cap == 0:
        return
    _column_kernel[(cap,)](
        p["G"], p["X"], p["scalars"], state["cols"], state["ids"], state["z"], state["eids"],
        state["ze"], state["mu"], state["status"], state["steps_pass"], state["Sinv"],
        state["Spos"], state["Skey"], state["Sok"], state["Svec"], state["Sout"],
        state["Scand"], active, count, p["n"], p["d"], ME, p["max_inner"], M=M, MS=MS, BR=BR,
        BE=BE, BC=BC, BRC=BRC, REFINE=REFINE, num_warps=NUM_WARPS, **OPTIONS,
    )  # fmt: skip
