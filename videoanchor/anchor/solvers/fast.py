"""The fast solver's iteration on torch, with the outlier matrix ``E`` kept on an active set.

The fast solver (:class:`~videoanchor.anchor.solvers.admm_steps.ScheduledStep`,
``solver="fast"``) runs the authors' A-, E- and C-steps on a fixed schedule; written for
every array namespace, each iteration costs ``[R; Y R] (T - I)`` (``(N + D) x N x N``, for
``A`` and ``Y A``) and ``Y^T E`` (``N x D x N``). ``E = soft(Y - Y A, lambda_e / lambda_z)``
is sparse (under 1% of its entries on video-like tokens) and its support hardly moves after
the first iterations, so :class:`ActiveSetStep` runs the same steps with
``A = I + R (T - I)`` alone, ``Y^T E`` as a sparse product over ``E``'s non-zeros, and the
E-step exactly (``Y - Y A = -(Y R) (T - I)`` in full) only at the schedule's *full*
iterations (``full_first``, ``full_every``, the last), which also set the active set: the
entries whose residual exceeds ``MARGIN`` times the threshold. In between the residual is
computed on the active set only (a sampled product) and ``E`` is zero elsewhere. Where the
active set is dense (Yale B faces: 73-84% of the entries) those products run dense
(:class:`~videoanchor.anchor.solvers.admm_steps.Schedule`'s ``dense_yte``, ``dense_resid``):
the same values to rounding.

Nothing depends on a residual crossing a threshold, and the final ``C`` and ``E`` come from
an exact E-step. An entry outside the active set that would cross the E threshold between
two full iterations enters ``E`` at the next full one: it had to more than double its
residual and it enters at about zero, so the iterate stays a continuous function of the
features in practice (tests/test_fast_solver.py measures it).
"""

from __future__ import annotations

import warnings

import torch

from videoanchor.anchor.solvers import admm_steps

__all__ = ["MARGIN", "ActiveSetStep"]

#: The active set: entries whose residual exceeds ``MARGIN`` times the E threshold.
MARGIN = 0.5


def _csr_pattern(rows: torch.Tensor, cols: torch.Tensor, shape, dtype) -> torch.Tensor:
    """The CSR matrix of ones at ``(rows, cols)``, given in row-major order (as
    ``nonzero`` returns them), built from its row counts: no COO tensor to coalesce (a sort
    of every entry, which took more time than the sampled products it serves at N = 256)."""
    crow = rows.new_zeros(shape[0] + 1)
    torch.cumsum(torch.bincount(rows, minlength=shape[0]), 0, out=crow[1:])
    ones = torch.ones(cols.numel(), dtype=dtype, device=cols.device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # sparse CSR is in beta
        return torch.sparse_csr_tensor(crow, cols, ones, shape, check_invariants=False)


class ActiveSetStep(admm_steps.ScheduledStep):
    """:class:`~videoanchor.anchor.solvers.admm_steps.ScheduledStep` with ``E`` on an active
    set (module docstring): the same schedule, rho balancing and C-step; ``factor``: an
    :class:`~videoanchor.anchor.solvers.admm_steps.EigenInverse` (its ``[R; Y R]``)."""

    def __init__(self, dic: admm_steps.Dictionary, factor: admm_steps.EigenInverse, *, thr_e: float,
                 schedule: admm_steps.Schedule = admm_steps.SCHEDULE, start: int = 0,
                 stop: int | None = None, reduce=None, continuation: float = 1.0):  # fmt: skip
        super().__init__(dic, factor, thr_e=thr_e, schedule=schedule, start=start, stop=stop,
                         reduce=reduce, continuation=continuation)  # fmt: skip
        self.nb = self.C.shape[1]  # the columns this step owns
        self.y = dic.yw.contiguous()  # D x N
        self.full_count = 0
        self._active = None  # (rows, cols, CSR pattern) of the active entries
        self._e_vals = None  # E on the active entries
        self.share = 0.0  # the active entries' share of D x N

    def is_full(self, it: int) -> bool:
        """Whether iteration ``it`` runs the exact E-step (and resets the active set)."""
        sc = self.schedule
        return it <= sc.full_first or it % sc.full_every == 0 or it >= self.iterations

    def _yte(self, scale: float):
        """``scale * Y^T E`` (``N x N``) over E's non-zero entries only, a third to a fifth of
        the active ones on video-like tokens (None when E is zero)."""
        if self._active is None or self._e_vals is None:
            return None
        rows, cols, _ = self._active
        vals = self._e_vals
        nb, d = self.nb, self.dic.d
        nonzero = (vals != 0).nonzero().squeeze(1)
        if nonzero.numel() == 0:
            return None
        if nonzero.numel() / max(d * nb, 1) > self.schedule.dense_yte:  # the same product, dense
            e = self.y.new_zeros(d, nb)
            e[rows, cols] = vals * scale
            return self.dic.kernels.dense(self.dic.xw, e)
        if nonzero.numel() < vals.numel():
            rows, cols, vals = rows[nonzero], cols[nonzero], vals[nonzero]
        # (Y^T E)^T = E^T Y: a sparse (b x D) times dense (D x N) product
        et = torch.sparse_coo_tensor(torch.stack([cols, rows]), vals * scale, (nb, d),
                                     check_invariants=False)  # fmt: skip
        return torch.sparse.mm(et, self.y).T

    def __call__(self, it: int) -> tuple[float, bool]:
        dic, factor = self.dic, self.factor
        t = self.C - self.lam
        if dic.affine:
            t -= self.d1s
        yte = self._yte(dic.lam_z / factor.rho)
        if yte is not None:
            t -= yte
        diag = self.diag
        t[diag.rows, diag.cols] -= 1.0  # T - I
        n = dic.n
        if factor.low_rank:  # R = I + L_A V_x^T, Y R = L_Y V_x^T (admm_steps.EigenInverse)
            right = factor.low_rank_right(t)  # V_x^T (T - I)
            a = self.dic.products.mm(factor.la_left, right)
            a += t
            yr, yr_left = factor.ly, factor.ly_left
        else:
            right, yr, yr_left = t, factor.r[n:], factor.r_left[n:]
            a = self.dic.products.mm(factor.r_left[:n], t)
        a[diag.rows, diag.cols] += 1.0
        if dic.outliers:
            self._e_step(it, right, yr, yr_left)
        return self._c_step(it, a)

    def _e_step(self, it: int, t: torch.Tensor, yr, yr_left) -> None:
        """``E = soft(Y - Y A, thr)`` with ``Y - Y A = -(Y R)(T - I) = -yr t`` (``t``: ``T - I``,
        ``yr``: the factor's ``Y R`` rows; low rank: ``V_x^T (T - I)`` and ``L_Y``; ``yr_left``:
        ``yr`` prepared), not a difference of two near-equal products."""
        thr = self.thr_e
        if self.is_full(it):
            self.full_count += 1
            resid = self.dic.products.mm(yr_left, t)
            resid.neg_()  # Y - Y A, exactly
            rows, cols = (resid.abs() > MARGIN * thr).nonzero(as_tuple=True)
            self.share = rows.numel() / max(resid.numel(), 1)
            vals = resid[rows, cols]
            resid -= resid.clamp(-thr, thr)  # soft, in place: the exact E
            self.E = resid
            if rows.numel() == 0:
                self._active = self._e_vals = None
                self.e_nonzero = False
                return
            pattern = None  # the sampled product's CSR pattern, where it runs sparse
            if self.share <= self.schedule.dense_resid:
                pattern = _csr_pattern(rows, cols, (self.dic.d, self.nb), vals.dtype)
            self._active = (rows, cols, pattern)
        else:
            if self._active is None:
                return
            rows, cols, pattern = self._active
            if self.share > self.schedule.dense_resid:  # the same entries, from the dense product
                vals = -self.dic.products.mm(yr_left, t)[rows, cols]
            else:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", UserWarning)  # sparse CSR is in beta
                    vals = -torch.sparse.sampled_addmm(pattern, yr, t, beta=0.0).values()
            self.E = None  # only the active entries are kept between full iterations
        vals = vals - vals.clamp(-thr, thr)
        self._e_vals = vals
        self.e_nonzero = bool((vals != 0).any())
