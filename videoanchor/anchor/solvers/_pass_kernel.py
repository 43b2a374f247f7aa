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


@triton.jit(do_not_specialize=["D", "M", "ME"])
def _residual_kernel(X, cols, ids, z, eids, ze, active, count, R, D, M, ME,
                     BD: tl.constexpr, BS: tl.constexpr):  # fmt: skip
    pos = tl.program_id(0)
    dd = tl.program_id(1) * BD + tl.arange(0, BD)
    dm = dd < D
    out = R + pos.to(tl.int64) * D + dd
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
        for m0 in range(0, ME, BS):  # the outlier entries on the support, in this block
            sl = m0 + tl.arange(0, BS)
            sm = sl < ME
            o = tl.load(eids + k * ME + sl, mask=sm, other=-1)
            v = tl.load(ze + k * ME + sl, mask=sm, other=0.0)
            acc -= tl.sum(tl.where(o[:, None] == dd[None, :], v[:, None], 0.0), axis=0)
        tl.store(out, acc.to(R.dtype.element_ty), mask=dm)
    else:
        tl.store(out, tl.zeros([BD], dtype=R.dtype.element_ty), mask=dm)


def residuals(X: torch.Tensor, cols, ids, z, eids, ze, active: torch.Tensor,
              count: torch.Tensor, R: torch.Tensor) -> None:  # fmt: skip
    """Into ``R`` (``cap x D``, its dtype): row ``p < count`` the residual of the column at
    row ``active[p]`` of the slot arrays (``cols``, ``ids``/``z``, ``eids``/``ze``), in
    float64 before the cast; rows past ``count`` zero. ``count`` is read on the device."""
    cap, d = R.shape
    if cap == 0:
        return
    _residual_kernel[(cap, triton.cdiv(d, BD))](
        X, cols, ids, z, eids, ze, active, count, R, d, ids.shape[1], eids.shape[1], BD=BD, BS=BS
    )
