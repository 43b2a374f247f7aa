"""The pass loop's gather (issue 90 step 2): each active column's residual
``r_i = y_i - Y c_i - e_i`` from its slots alone (a column's few coefficients and outlier
entries: a gather of rows of ``X``, not a dense ``Y C``), for the one GEMM ``Y^T R`` of a pass
(:func:`videoanchor.anchor.solvers.workset_cuda._pass`).

Like the column kernel it reads the active list's length on the device (a program past it
writes zeros), so that a pass is capturable in a CUDA graph. Imported on the first pass,
never by ``import videoanchor``: importing it imports Triton.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

#: Entries of ``D`` per program, and slots per chunk (a chunk's tile: ``BS x BD``).
BD, BS = 128, 16


#: The program's float64 scalars, as the pass's kernels read them from ``scalars`` (a
#: float64 device tensor, ``workset_cuda._program``): a Python float argument would be
#: typed float32 by compiled Triton (the interpreter keeps float64), and a captured CUDA
#: graph would keep the first call's values.
LAM_Z, LAM_E, TOL, SCREEN, SCALE = 0, 1, 3, 5, 6


@triton.jit(do_not_specialize=["D", "M", "ME"])
def _residual_kernel(X, cols, ids, z, eids, ze, active, count, R, VE, D, M, ME, scalars,
                     BD: tl.constexpr, BS: tl.constexpr):  # fmt: skip
    pos = tl.program_id(0)
    dd = tl.program_id(1) * BD + tl.arange(0, BD)
    dm = dd < D
    out = R + pos.to(tl.int64) * D + dd
    vout = VE + pos.to(tl.int64) * D + dd
    if pos < tl.load(count):
        k = tl.load(active + pos).to(tl.int64)
        i = tl.load(cols + k)
        acc = tl.load(X + i * D + dd, mask=dm, other=0.0).to(tl.float64)
        for m0 in range(0, M, BS):  # the coefficients on the support, a chunk of slots
            sl = m0 + tl.arange(0, BS)
            sm = sl < M
            j = tl.load(ids + k * M + sl, mask=sm, other=-1)
            c = tl.load(z + k * M + sl, mask=sm, other=0.0)
            on = (j >= 0) & (c != 0.0)
            rows = tl.load(X + tl.where(on, j, 0).to(tl.int64)[:, None] * D + dd[None, :],
                           mask=on[:, None] & dm[None, :], other=0.0)  # fmt: skip
            acc -= tl.sum(rows * c[:, None], axis=0)
        held = dd < 0
        for m0 in range(0, ME, BS):  # the outlier entries on the support, in this block
            sl = m0 + tl.arange(0, BS)
            sm = sl < ME
            o = tl.load(eids + k * ME + sl, mask=sm, other=-1)
            v = tl.load(ze + k * ME + sl, mask=sm, other=0.0)
            hit = (o[:, None] == dd[None, :]) & (v != 0.0)[:, None]
            acc -= tl.sum(tl.where(hit, v[:, None], 0.0), axis=0)
            held = held | (tl.max(hit.to(tl.int32), axis=0) > 0)
        r = acc.to(R.dtype.element_ty)
        tl.store(out, r, mask=dm)
        # the outlier entries' violations (|lambda_z r_o| - lambda_e) / lambda_e from the
        # stored (rounded) residual, as the GEMM sees it; the support's at -inf
        ve = tl.abs(r.to(tl.float64)) * tl.load(scalars + 6) - 1.0  # (SCALE)
        tl.store(vout, tl.where(held, -float("inf"), ve).to(VE.dtype.element_ty), mask=dm)
    else:
        tl.store(out, tl.zeros([BD], dtype=R.dtype.element_ty), mask=dm)
        tl.store(vout, tl.full([BD], -float("inf"), VE.dtype.element_ty), mask=dm)


def residuals(X: torch.Tensor, cols, ids, z, eids, ze, active: torch.Tensor,
              count: torch.Tensor, R: torch.Tensor, VE: torch.Tensor | None,
              scalars: torch.Tensor) -> None:  # fmt: skip
    """Into ``R`` (``cap x D``, its dtype): row ``p < count`` the residual of the column at
    row ``active[p]`` of the slot arrays (``cols``, ``ids``/``z``, ``eids``/``ze``), in
    float64 before the cast; rows past ``count`` zero. ``count`` is read on the device.
    Into ``VE`` (as ``R``; None: a scratch) the outlier entries' relative violations
    ``|r| scale - 1`` (``scale = lambda_z / lambda_e``: ``scalars[SCALE]``, a float64
    device tensor), -inf on the support and past ``count``."""
    cap, d = R.shape
    if cap == 0:
        return
    if VE is None:
        VE = torch.empty_like(R)
    _residual_kernel[(cap, triton.cdiv(d, BD))](
        X, cols, ids, z, eids, ze, active, count, R, VE, d, ids.shape[1], eids.shape[1],
        _checked_scalars(scalars), BD=BD, BS=BS,
    )  # fmt: skip


@triton.jit(do_not_specialize=["N", "M"])
def _violations_kernel(m, V, cols, ids, z, mu, active, count, passes, active_sum, N, M,
                       scalars, BN: tl.constexpr, BS: tl.constexpr):  # fmt: skip
    pos = tl.program_id(0)
    blk = tl.program_id(1)
    nn = blk * BN + tl.arange(0, BN)
    nm = nn < N
    out = V + pos.to(tl.int64) * N + nn
    cnt = tl.load(count)
    if (pos == 0) & (blk == 0):  # the pass's counters (the joins read passes less this)
        tl.store(passes, tl.load(passes) + tl.where(cnt > 0, 1, 0).to(tl.int64))
        tl.store(active_sum, tl.load(active_sum) + cnt.to(tl.int64))
    if pos < cnt:
        lam_z = tl.load(scalars)  # (LAM_Z)
        k = tl.load(active + pos).to(tl.int64)
        i = tl.load(cols + k)
        mk = tl.load(mu + k)
        mv = tl.load(m + pos.to(tl.int64) * N + nn, mask=nm, other=0.0).to(tl.float64)
        v = tl.abs(lam_z * mv - mk) - 1.0
        off = nn == i
        for s0 in range(0, M, BS):  # the support is no candidate
            sl = s0 + tl.arange(0, BS)
            sm = sl < M
            j = tl.load(ids + k * M + sl, mask=sm, other=-1)
            c = tl.load(z + k * M + sl, mask=sm, other=0.0)
            hit = (j[:, None] == nn[None, :]) & ((j >= 0) & (c != 0.0))[:, None]
            off = off | (tl.max(hit.to(tl.int32), axis=0) > 0)
        v = tl.where(off, -float("inf"), v)
        tl.store(out, v.to(V.dtype.element_ty), mask=nm)
    else:
        tl.store(out, tl.full([BN], -float("inf"), V.dtype.element_ty), mask=nm)


@triton.jit(do_not_specialize=["N", "D", "ME", "K"])
def _joins_kernel(top, new, m, R, VE, JL, cols, ids, z, eids, ze, mu, status, steps_pass,
                  steps, aside, ok_ptr, joined, again, active, count, kcount, passes, N, D, ME,
                  K,
                  scalars, grow0, grow_max, exact: tl.constexpr,
                  last: tl.constexpr, has_ok: tl.constexpr, M: tl.constexpr,
                  MEP: tl.constexpr, KP: tl.constexpr, BD: tl.constexpr):  # fmt: skip
    pos = tl.program_id(0)
    cnt = tl.load(count)
    flag = tl.zeros([], dtype=tl.int32)
    if pos < cnt:
        lam_z = tl.load(scalars)  # (LAM_Z; SCALE; the threshold: TOL exact, else SCREEN)
        if exact:
            thr = tl.load(scalars + 3)
        else:
            thr = tl.load(scalars + 5)
        p64 = pos.to(tl.int64)
        k = tl.load(active + pos).to(tl.int64)
        ran = tl.load(kcount) > 0
        npass = tl.load(passes) - 1  # (the violations' kernel counted this pass)
        grow = tl.minimum(grow0 << tl.minimum(npass, 8), grow_max)
        # the coefficients: the grow worst violators into the free slots, lowest first
        offs = tl.arange(0, M)
        idr = tl.load(ids + k * M + offs)
        zr = tl.load(z + k * M + offs)
        sup = (idr >= 0) & (zr != 0.0)
        keep = tl.sum(sup.to(tl.int32))
        r = tl.arange(0, KP)
        tv = tl.load(top + p64 * K + r, mask=r < K, other=-float("inf")).to(tl.float64)
        fresh = tl.max(tv) > thr
        nj = tl.sum(((tv > thr) & (r < grow) & (r < M - keep)).to(tl.int32))
        # the outlier entries: every violator, ranked in order, into the free slots
        eo = tl.arange(0, MEP)
        eid = tl.load(eids + k * ME + eo, mask=eo < ME, other=-1)
        zev = tl.load(ze + k * ME + eo, mask=eo < ME, other=0.0)
        held = (eid >= 0) & (zev != 0.0)
        free_e = ME - tl.sum(held.to(tl.int32))
        nvio = tl.zeros([], dtype=tl.int32)
        for d0 in range(0, D, BD):
            dd = d0 + tl.arange(0, BD)
            vio = (tl.load(VE + p64 * D + dd, mask=dd < D, other=-float("inf")).to(tl.float64)
                   > thr)  # fmt: skip
            rank = nvio + tl.cumsum(vio.to(tl.int32), axis=0) - 1
            tl.store(JL + p64 * ME + rank, dd, mask=vio & (rank < free_e))
            nvio += tl.sum(vio.to(tl.int32))
        st = tl.load(status + k)
        # (a kernel run whose support would pass the level's positions: FULL)
        full_c = (fresh & (keep == M)) | (ran & (st == 2))
        if last:
            full_e = (nvio > 0) & (free_e == 0)
        else:
            full_e = nvio > free_e
        side = full_c | full_e
        ne = tl.minimum(nvio, free_e)
        tl.debug_barrier()  # (the joiners' list is written)
        if side == 0:
            q = tl.cumsum((~sup).to(tl.int32), axis=0) - 1  # each free slot's rank
            take = ~sup & (q < nj)
            got = tl.load(new + p64 * K + tl.where(take, q, 0), mask=take, other=-1)
            tl.store(ids + k * M + offs, tl.where(sup, idr, tl.where(take, got, -1).to(tl.int32)))
            qe = tl.cumsum((~held).to(tl.int32), axis=0) - 1
            take_e = ~held & (qe < ne) & (eo < ME)
            got_e = tl.load(JL + p64 * ME + tl.where(take_e, qe, 0), mask=take_e, other=-1)
            tl.store(eids + k * ME + eo, tl.where(held, eid, tl.where(take_e, got_e, -1)),
                     mask=eo < ME)  # fmt: skip
            flag = tl.where((nj > 0) | (ne > 0) | (st != 0), 1, 0)
            if exact:  # the support's own stationarity: where it fails, the kernel rebuilds
                mk = tl.load(mu + k)
                mv = tl.load(m + p64 * N + tl.where(sup, idr, 0), mask=sup, other=0.0)
                sz = tl.where(zr > 0.0, 1.0, -1.0)
                err = tl.where(sup, tl.abs(lam_z * mv.to(tl.float64) - mk - sz), 0.0)
                rv = tl.load(R + p64 * D + tl.where(held, eid, 0), mask=held, other=0.0)
                se = tl.where(zev > 0.0, 1.0, -1.0)
                err_e = tl.where(held, tl.abs(rv.to(tl.float64) * tl.load(scalars + 6) - se), 0.0)
                off = tl.maximum(tl.max(err), tl.max(err_e)) > thr
                if off:
                    flag = 1
                    if has_ok:
                        tl.store(ok_ptr + k, 0)
            # a run of one step after the last pass's joiners: they did not join (rounding).
            # Only then: a run after a rebuild or a stall may move in one step
            stuck = ran & (npass > 0) & (tl.load(steps_pass + k) <= 1) & (st == 0)
            stuck = stuck & (tl.load(joined + k) != 0)
            if stuck:
                flag = 0
            tl.store(joined + k, tl.where((nj > 0) | (ne > 0), 1, 0))
        else:
            tl.store(aside + k, tl.load(aside + k) + 1)
            tl.store(joined + k, 0)
        if ran:
            tl.store(steps + k, tl.load(steps + k) + tl.load(steps_pass + k).to(tl.int64))
    tl.store(again + pos, flag)


def violations(m, V, cols, ids, z, mu, active, count, passes, active_sum,
               scalars: torch.Tensor) -> None:  # fmt: skip
    """Into ``V`` (``cap x N``, as ``m``): the coefficients' violations
    ``|lambda_z m - mu| - 1`` of the active columns, -inf at ``i``, on the support and past
    ``count``; the pass's counters (``passes``, ``active_sum``) advanced (``lambda_z``:
    ``scalars[LAM_Z]``)."""
    cap, n = V.shape
    _violations_kernel[(cap, triton.cdiv(n, 128))](
        m, V, cols, ids, z, mu, active, count, passes, active_sum, n, ids.shape[1],
        _checked_scalars(scalars), BN=128, BS=16,
    )  # fmt: skip


def joins(top, new, m, R, VE, JL, state: dict, active, again, *, scalars: torch.Tensor,
          grow0: int, grow_max: int, exact: bool, last: bool) -> None:  # fmt: skip
    """The joins of a pass (``workset_cuda._pass``), a program a position of ``active``:
    the ``top``/``new`` coefficient violators (``grow`` of them, into the free slots), every
    outlier entry violating in ``VE`` (into the free outlier slots; ``JL`` a ``cap x ME``
    scratch), the columns set aside (``state["aside"]`` + 1), the support's stationarity
    (``exact``: ``state["Sok"]`` 0 where it fails), the steps; ``again`` (int32, ``cap``)
    1 where the column runs in the next pass. ``scalars``: the program's float64 scalars
    (:data:`LAM_Z`, :data:`LAM_E`, and the threshold: :data:`TOL` where ``exact``, else
    :data:`SCREEN`). Its constexprs follow the level alone (:func:`joins_constexprs`)."""
    cap, kk = top.shape
    n, d = m.shape[1], R.shape[1]
    M, ME = state["ids"].shape[1], state["eids"].shape[1]
    ok = state.get("Sok")
    _joins_kernel[(cap,)](
        top, new, m, R, VE, JL, state["cols"], state["ids"], state["z"], state["eids"],
        state["ze"], state["mu"], state["status"], state["steps_pass"], state["steps"],
        state["aside"], ok if ok is not None else again, state["joined"], again, active,
        state["count"],
        state["kcount"], state["passes"], n, d, ME, kk, _checked_scalars(scalars), int(grow0),
        int(grow_max), exact=bool(exact), last=bool(last), has_ok=ok is not None,
        **joins_constexprs(M, ME, grow_max),
    )  # fmt: skip


def joins_constexprs(M: int, ME: int, grow_max: int) -> dict:
    """The joins kernel's size constexprs at a level of slots ``(M, ME)``: the violators'
    block ``KP`` covers ``min(grow_max, M)`` whatever ``N`` (the count ``K = min(grow_max,
    N, M)`` is a run-time bound), so that a warm-up over one column compiles what a solve
    of any ``N`` runs (issue 98: ``KP`` was ``K``'s, 1 in the warm-up, 4-64 in a solve)."""
    return dict(
        M=M,
        MEP=triton.next_power_of_2(ME),
        KP=triton.next_power_of_2(max(min(grow_max, M), 1)),
        BD=128,
    )


def _checked_scalars(scalars: torch.Tensor) -> torch.Tensor:
    if scalars.dtype != torch.float64 or scalars.dim() != 1 or scalars.shape[0] <= SCALE:
        raise TypeError(f"scalars: expected a float64 vector of at least {SCALE + 1} entries, "
                        f"got {scalars.dtype} {tuple(scalars.shape)}")  # fmt: skip
    return scalars
