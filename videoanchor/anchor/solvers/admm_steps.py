"""The SSC-ADMM iteration, written once for every array namespace (docs/ssc.md).

Every SSC solver of the package runs :func:`run` on a step object of this module:
:class:`SquaredStep`, VideoAnchor's program (docs/method.md section 2) on all the columns
of ``C`` or on one column block (:class:`ScheduledStep`: the fast solver), or
:class:`EqualityStep`, Elhamifar & Vidal's constrained program. They are written against
the array-API standard (``array_api_compat``), so the same lines run on torch, NumPy and
CuPy arrays; what differs between backends is a :class:`Kernels` object (the C-step's
element-wise pass, fused on CuPy, and the product with the sparse outliers ``E``).

Notation (scaled duals): ``Lam = Delta2 / rho``, ``d1s = Delta1 / rho``; ``T = A + Lam``;
``soft(v, t) = v - clip(v, -t, t)``, which is ``sign(v) max(|v| - t, 0)`` to the bit.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from dataclasses import dataclass, replace

import array_api_compat

from videoanchor.anchor.products import Products

__all__ = [
    "DenseInverse",
    "Dictionary",
    "EigenInverse",
    "SCHEDULE",
    "Schedule",
    "EqualityStep",
    "Kernels",
    "Reporting",
    "SquaredStep",
    "Woodbury",
    "chain",
    "run",
    "spd_inverse",
]

# A per-iteration hook: ``hook(iteration, residual)``; a true return stops the loop.
Hook = Callable[[int, float], "bool | None"]


class Outcome:
    """What :func:`run` reports: ``iterations`` run, last ``residual``, ``converged``
    (the step's stopping rule held) and ``stopped`` (the hook asked to stop first)."""

    __slots__ = ("iterations", "residual", "converged", "stopped")

    def __init__(self, iterations: int, residual: float, converged: bool, stopped: bool):
        self.iterations, self.residual = iterations, residual
        self.converged, self.stopped = converged, stopped


#: how often :func:`run` reads a lazy step's residual on the host (a synchronisation)
LAZY_CHECK_EVERY = 10


def run(step, max_iter: int, hook: Hook | None = None, *, what: str = "SSC-ADMM") -> Outcome:
    """The ADMM loop of every solver: ``step(it) -> (residual, done)`` until ``done``.

    ``hook(it, residual)`` is called after every iteration (progress bars, histories,
    iterate inspection, time budgets); a true return ends the loop there. A non-finite
    residual raises ``FloatingPointError``. A step whose ``lazy_residual`` is true (the fast
    solver's schedule, whose residual decides nothing) returns a 0-d array on its device,
    checked every :data:`LAZY_CHECK_EVERY` iterations and on the last (so that a GPU queues
    the iterations without waiting; a divergence is reported that much late) and passed to
    ``hook`` as it is (:class:`Reporting` gives user callables a float).
    """
    lazy = bool(getattr(step, "lazy_residual", False))
    residual, it = math.inf, 0
    for it in range(1, int(max_iter) + 1):
        residual, done = step(it)
        if not lazy or done or it % LAZY_CHECK_EVERY == 0 or it == int(max_iter):
            value = float(residual)
            if not math.isfinite(value):
                raise FloatingPointError(
                    f"{what} diverged at iteration {it} (residual {value}); "
                    "try dtype=torch.float64 or a larger rho"
                )
        stop = hook is not None and bool(hook(it, residual))
        if done or stop:
            return Outcome(it, float(residual), bool(done), stop and not done)
    return Outcome(it, float(residual), False, False)


def chain(*hooks: Hook | None) -> Hook | None:
    """One hook calling each of ``hooks`` (``None`` entries skipped); stop if any says so."""
    live = [h for h in hooks if h is not None]
    if not live:
        return None
    if len(live) == 1:
        return live[0]

    def hook(it: int, residual: float) -> bool:
        return any([bool(h(it, residual)) for h in live])

    return hook


def _propagating_through(frame) -> BaseException | None:
    """The exception now unwinding through ``frame`` (called from that frame's ``finally``),
    or None: one that a caller is merely handling (the solver ran inside an ``except``
    block) has no traceback entry for ``frame``."""
    exc = sys.exc_info()[1]
    tb = None if exc is None else exc.__traceback__
    while tb is not None:
        if tb.tb_frame is frame:
            return exc
        tb = tb.tb_next
    return None


class Reporting:
    """A solver's ``progress`` option as the loop's hook: its reporter (bar or log lines, ETA,
    time budget: :func:`~videoanchor.anchor.progress.as_reporter`), or a callable other than
    an ``SSCProgress`` itself, given ``(iteration, float(residual))``."""

    def __init__(self, progress, *, max_iter: int, eps: float, tokens: int, blocks: int = 1,
                 schedule: bool = False):  # fmt: skip
        from videoanchor.anchor.progress import SSCProgress, as_reporter

        self.reporter = None
        if callable(progress) and not isinstance(progress, SSCProgress):
            self.hook = lambda it, residual: progress(it, float(residual))
        else:
            self.reporter = as_reporter(progress, max_iter=max_iter, eps=eps, tokens=tokens,
                                        blocks=blocks, schedule=schedule)  # fmt: skip
            self.hook = self.reporter.update

    def next_block(self) -> None:
        """Tell the reporter a new column block starts (blocked mode)."""
        if self.reporter is not None:
            self.reporter.next_block()

    def close(
        self, converged: bool, iterations: int | None, residual: float | None, error=None
    ) -> None:
        """End the run: how it stopped goes to the reporter (if any). Called from a
        ``finally``: a run ended by an exception (Ctrl-C; a solver error, ``iterations`` False
        or None) is reported as such, not as one that reached its iteration limit."""
        if self.reporter is None:
            return
        if error is None:
            current = _propagating_through(sys._getframe(1))
            if isinstance(current, KeyboardInterrupt) or (
                current is not None and (iterations is None or iterations is False)
            ):
                error = current
        if error is not None:
            self.reporter.close(error=error)
        else:
            self.reporter.close(converged, iterations, residual)


#: what a failed factorisation of the A-step system says about the options behind it
SPD_HINT = (
    " (built from the features, lambda_z = alpha_z / mu_z and rho in the working dtype: "
    "alpha_z too large, rho too small, or one token's features dwarfing the others' for its "
    "precision; the authors use alpha_z=800, rho=300; or try dtype=torch.float64)"
)


def spd_inverse(xp, m, what: str = "the A-step system"):
    """Inverse of the symmetric positive definite ``m``; ``FloatingPointError`` if it is
    not positive definite (checked by a Cholesky factorisation)."""
    try:
        chol = xp.linalg.cholesky(m)
    except Exception as exc:  # torch / NumPy / CuPy LinAlgError
        raise FloatingPointError(f"SSC: {what} is not positive definite{SPD_HINT}") from exc
    if not bool(xp.all(xp.isfinite(chol[-1:, -1:]))):  # CuPy may return NaN instead
        raise FloatingPointError(f"SSC: {what} is not positive definite{SPD_HINT}")
    del chol
    return xp.linalg.inv(m)


def _clip(xp, v, lo, hi):
    """``xp.clip(v, lo, hi)`` for Python-number bounds (``None``: none); on torch
    ``torch.clamp``, which reads nothing back: array_api_compat 1.12's torch ``clip`` uploads
    its bounds and goes through boolean masks, six host synchronisations a call on CUDA (the
    fast solver's E-step: 360 of the 403 its 60 iterations made on an H100, 2026-11-27)."""
    if array_api_compat.is_torch_array(v):
        return v.clamp(lo, hi)
    return xp.clip(v, lo, hi)


class Kernels:
    """The backend-specific parts of the iteration (the C-step with the dual update, the
    product with ``E``): these array-API forms, or a backend's faster ones, same arithmetic."""

    def shrink(self, xp, t, lam, thr: float, diag):
        """``(C, Lam_new, |Lam - Lam_new|)`` from ``T``: ``Lam_new = clip(T, +-thr)`` (``T``
        on the diagonal ``diag``), ``C = T - Lam_new = soft(T, thr)``; overwrites ``t``, ``lam``."""
        lam_new = _clip(xp, t, -thr, thr)
        if diag is not None:
            lam_new[diag.rows, diag.cols] = t[diag.rows, diag.cols]
        t -= lam_new
        lam -= lam_new
        return t, lam_new, xp.abs(lam)

    def spd_inverse(self, xp, m, what: str = "the A-step system"):
        """:func:`spd_inverse` (the factorisations; also after every change of ``rho``)."""
        return spd_inverse(xp, m, what)

    def times_e(self, m, e):
        """``m @ e`` (``e`` is the outlier matrix ``E`` or a block of it, often sparse)."""
        return m @ e

    def sync(self) -> None:
        """Wait for the device (for timings)."""


class Diagonal:
    """Where the zero diagonal of ``C`` lies in the column block ``start:stop``: element
    ``(start + j, j)``; ``offset`` for fused kernels, ``rows``/``cols`` for indexing."""

    def __init__(self, xp, device, start: int, stop: int):
        self.offset = start
        self.rows = xp.arange(start, stop, device=device)
        self.cols = xp.arange(stop - start, device=device)


class Dictionary:
    """The points ``Y`` (``x`` is ``N x D``, one row per point) as the iteration uses them:
    ``x64`` in float64 for the factorisations, ``xw`` in the working dtype ``work``;
    ``products``: the precision of the fast solver's dense products (:mod:`products`)."""

    def __init__(self, x, work, *, lam_z: float, affine: bool, outliers: bool, kernels,
                 products: Products | None = None, x64=None):  # fmt: skip
        xp = array_api_compat.array_namespace(x)
        self.xp, self.device = xp, array_api_compat.device(x)
        self.x64 = xp.astype(x, xp.float64, copy=False) if x64 is None else x64
        self.xw = xp.astype(x, work, copy=False)
        self.yw = self.xw.T  # D x N
        self.work = work
        self.n, self.d = x.shape
        self.lam_z, self.affine, self.outliers = lam_z, affine, outliers
        self.kernels = kernels
        self.products = products or Products("full")

    def zeros(self, *shape, dtype=None):
        """A zero array of ``shape`` in the working dtype (or ``dtype``) on this device."""
        return self.xp.zeros(shape, dtype=dtype or self.work, device=self.device)


class DenseInverse:
    """The A-step through the explicit inverse ``R = rho M^{-1}``, ``O(N^3)``: with
    ``T = C - Lam - 1 d1s^T - (lambda_z / rho) Y^T E``, ``A = I + R (T - I)``.

    ``M = lambda_z Y^T Y + rho I (+ rho 1 1^T)`` is the authors' system; writing the
    right-hand side as ``M + rho (T - I)`` keeps the float32 entries O(1). With outliers
    ``Y R`` is stacked under ``R``: one ``(N + D) x N x N`` product gives ``A`` and
    ``Y A = Y + Y R (T - I)``. ``gram``: ``Y^T Y`` in float64 where the caller has it."""

    def __init__(self, dic: Dictionary, rho: float, gram=None):
        self.dic = dic
        self.gram = dic.x64 @ dic.x64.T if gram is None else gram  # float64, N x N
        self.refactor(rho)

    def refactor(self, rho: float) -> None:
        """Factor the system matrix for the penalty ``rho``."""
        dic, xp = self.dic, self.dic.xp
        self.rho = rho
        m = self.gram * dic.lam_z
        eye = xp.arange(dic.n, device=dic.device)
        m[eye, eye] += rho
        if dic.affine:
            m += rho
        r = dic.kernels.spd_inverse(xp, m)
        del m
        r *= rho
        rows = dic.n + dic.d if dic.outliers else dic.n
        self.r = xp.empty((rows, dic.n), dtype=dic.work, device=dic.device)  # [R; Y R]
        self.r[: dic.n, :] = xp.astype(r, dic.work, copy=False)
        if dic.outliers:
            self.r[dic.n :, :] = xp.astype(dic.x64.T @ r, dic.work, copy=False)
        self.r_left = dic.products.left(self.r)  # the product's left operand (its split)

    def step_a(self, t, d1s, e, cols: slice, want_ya: bool, diag):
        """``(A, Y A)`` for the columns ``cols`` (diagonal ``diag``) from ``t = C - Lam``
        (overwritten); ``e`` is ``E`` (``None`` when zero); ``Y A`` only with outliers and
        ``want_ya``."""
        dic = self.dic
        t = self.t_minus_i(t, d1s, e, diag)
        rows = self.r.shape[0] if want_ya else dic.n
        a = dic.products.mm(self.r_left[:rows, :], t)
        a[diag.rows, diag.cols] += 1.0
        ya = None
        if dic.outliers and want_ya:
            ya = a[dic.n :, :]
            ya += dic.yw[:, cols]
        return a[: dic.n, :], ya

    def t_minus_i(self, t, d1s, e, diag):
        """``T - I`` with ``T = C - Lam - 1 d1s^T - (lambda_z / rho) Y^T E`` from ``t = C - Lam``
        (overwritten); ``e`` is ``E`` (``None`` when zero)."""
        dic = self.dic
        if dic.affine:
            t -= d1s
        if e is not None:
            t -= dic.kernels.times_e(dic.xw, e * (dic.lam_z / self.rho))
        t[diag.rows, diag.cols] -= 1.0
        return t


class EigenInverse(DenseInverse):
    """:class:`DenseInverse` whose system is factored once by an eigendecomposition of
    ``lambda_z Y^T Y = V diag(w) V^T``, so that a new ``rho`` costs two products instead of
    a new inverse: ``rho (lambda_z Y^T Y + rho I)^{-1} = V diag(rho / (w + rho)) V^T = B``
    and the affine ``rho 1 1^T`` term by Sherman-Morrison, ``R = B - b b^T / (1 + 1^T b)``
    with ``b = B 1``. The fast solver changes ``rho`` on a schedule (residual balancing).

    ``thin`` (default: ``N > schedule.thin_above * D``): ``V`` holds only the eigenvectors
    of the non-zero eigenvalues, ``N x D``, from the eigendecomposition of ``lambda_z Y Y^T
    = U diag(w) U^T`` (``V = sqrt(lambda_z) Y^T U diag(w)^(-1/2)``, ``Y V = U diag(w /
    lambda_z)^(1/2)``), and ``B = I - V diag(w / (w + rho)) V^T``. Eigenvalues under
    ``N * eps`` (float64) of the largest count as zero (they move ``B`` by under ``w / rho``).

    ``share(compute, shapes)``: the eigendecomposition every process uses, from
    ``compute()`` (computed on rank 0 and broadcast where the columns are split over
    processes). ``columns=(start, stop, gather)``: this process refactors the columns
    ``start:stop`` of ``[B; Y B]`` and ``gather(block)`` returns every process's side by
    side. ``gram``: ``Y^T Y`` in float64 where the caller has it (not used when thin).

    ``low_rank`` (default: ``N > schedule.low_rank_above * D``; thin only): ``[R; Y R]`` is
    never formed. With ``V_x = [V, b]`` (``N x (k + 1)``), ``R = I + L_A V_x^T`` and
    ``Y R = L_Y V_x^T``, where ``L_A = [V diag(-w / (w + rho)), -b / (1 + 1^T b)]`` and
    ``L_Y = [Y V diag(rho / (w + rho)), -Y b / (1 + 1^T b)]`` (``Y = Y V V^T``: ``V`` spans
    ``Y``'s rows). :meth:`low_rank_right` gives ``W = V_x^T (T - I)``; then
    ``A - I = (T - I) + L_A W`` and ``Y R (T - I) = L_Y W``: products with inner dimension
    ``k + 1`` instead of ``N``, and a refactor only rescales ``L_A`` and ``L_Y``."""

    def __init__(self, dic: Dictionary, rho: float, share=None, columns=None, gram=None,
                 thin: bool | None = None, low_rank: bool | None = None,
                 continuation: float = 1.0, schedule: Schedule | None = None):  # fmt: skip
        xp, n, d = dic.xp, dic.n, dic.d
        self.dic = dic
        self.columns = columns
        schedule = SCHEDULE if schedule is None else schedule
        self.thin = n > schedule.thin_above * d if thin is None else bool(thin)
        self.low_rank = self.thin and (
            n > schedule.low_rank_above * d if low_rank is None else bool(low_rank)
        )

        def compute():  # (w, V) of lambda_z Y^T Y, or the thin (w, V, Y V)
            if self.thin:
                return self._thin_eigh()
            w, v = xp.linalg.eigh((dic.x64 @ dic.x64.T if gram is None else gram) * dic.lam_z)
            return w, v

        shapes = [(d,), (n, d), (d, d)] if self.thin else [(n,), (n, n)]
        got = compute() if share is None else share(compute, shapes)
        w, v = got[0], got[1]
        # the eigenvalues of lambda_z Y^T Y (w_full), and those the factor uses: times the
        # continuation's weight on lambda_z (reweight; V does not depend on lambda_z)
        self.w_full = _clip(xp, w, 0.0, None)
        self.weight = 1.0
        self.w = self.w_full
        self.reweight(continuation_weight(continuation, 1, schedule))  # (its first weight)
        self.v64 = v
        self.vt1 = xp.sum(v, axis=0)  # V^T 1
        # the products of every refactor run in the working dtype (R is stored in it)
        self.v = xp.astype(v, dic.work, copy=False)
        self.yv = None
        if dic.outliers:
            yv = got[2] if self.thin else dic.x64.T @ v
            self.yv = xp.astype(yv, dic.work, copy=False)
        if not self.low_rank:  # (low rank: V_x^T at each refactor, b depends on rho)
            self.vt = dic.products.right(self.v.T)  # the refactors' right operand (its split)
        self.refactor(rho)

    def _thin_eigh(self):
        """``(w, V, Y V)`` (float64) from the eigendecomposition of ``lambda_z Y Y^T``:
        ``D`` eigenpairs, those of the eigenvalues counted as zero with ``w = 0`` and zero
        columns in ``V`` and ``Y V``."""
        dic, xp = self.dic, self.dic.xp
        x64 = dic.x64
        w, u = xp.linalg.eigh((x64.T @ x64) * dic.lam_z)  # Y Y^T is D x D
        w = _clip(xp, w, 0.0, None)
        tol = float(xp.max(w)) * dic.n * xp.finfo(xp.float64).eps
        keep = w > tol
        w = xp.where(keep, w, xp.zeros_like(w))
        safe = xp.where(keep, w, xp.ones_like(w))
        inv = xp.where(keep, xp.sqrt(dic.lam_z / safe), xp.zeros_like(w))
        v = (x64 @ u) * inv[None, :]  # sqrt(lambda_z) Y^T U / sqrt(w)
        yv = u * xp.sqrt(w / dic.lam_z)[None, :]  # Y V, from lambda_z Y Y^T U = U w
        return w, v, yv

    def reweight(self, weight: float) -> None:
        """Factor ``weight * lambda_z Y^T Y`` from the next :meth:`refactor` on (the
        eigenvalues scale, the eigenvectors stay)."""
        self.weight = float(weight)
        self.w = self.w_full if self.weight == 1.0 else self.w_full * self.weight

    def refactor(self, rho: float) -> None:
        """``[R; Y R]`` (or, ``low_rank``, ``L_A``, ``L_Y`` and ``V_x^T``) for the penalty
        ``rho`` from the stored eigendecomposition."""
        dic, xp = self.dic, self.dic.xp
        self.rho = rho
        scale64 = rho / (self.w + rho)
        # B = V diag(coef) V^T, plus I when thin (coef = -w / (w + rho): no cancellation)
        coef64 = -self.w / (self.w + rho) if self.thin else scale64
        scale = xp.astype(scale64, dic.work, copy=False)
        coef = xp.astype(coef64, dic.work, copy=False)
        if self.low_rank:
            self._refactor_low_rank(coef64, scale, coef)
            return
        rows = dic.n + dic.d if dic.outliers else dic.n
        mm = dic.products.mm
        vt, start, width = self.vt, 0, dic.n
        if self.columns is not None:  # this process's columns, gathered below
            start, stop, _ = self.columns
            vt, width = self.vt[:, start:stop], stop - start
        self.r = xp.empty((rows, width), dtype=dic.work, device=dic.device)
        self.r[: dic.n, :] = mm(self.v * coef[None, :], vt)  # B (less I when thin)
        if self.thin:
            self.r[xp.arange(start, start + width, device=dic.device),
                   xp.arange(width, device=dic.device)] += 1.0  # fmt: skip
        if dic.outliers:
            self.r[dic.n :, :] = mm(self.yv * scale[None, :], vt)  # Y B
        if self.columns is not None:
            self.r = self.columns[2](self.r)
        if dic.affine:  # Sherman-Morrison for rho 1 1^T, its vectors in float64
            b = self.v64 @ (coef64 * self.vt1)  # B 1
            if self.thin:
                b += 1.0
            denom = 1.0 + float(xp.sum(b))
            bw = xp.astype(b / denom, dic.work, copy=False)
            self.r[: dic.n, :] -= xp.astype(b, dic.work, copy=False)[:, None] * bw[None, :]
            if dic.outliers:
                yb = xp.astype(dic.x64.T @ b, dic.work, copy=False)  # Y B 1
                self.r[dic.n :, :] -= yb[:, None] * bw[None, :]
        self.r_left = dic.products.left(self.r)

    def _refactor_low_rank(self, coef64, scale, coef) -> None:
        """``L_A``, ``L_Y`` and ``V_x^T`` (class docstring) for the current ``rho``."""
        dic, xp = self.dic, self.dic.xp
        work, n = dic.work, dic.n
        cols = [self.v * coef[None, :]]
        ycols = [self.yv * scale[None, :]] if dic.outliers else []
        if dic.affine:  # Sherman-Morrison: b = B 1, R = B - b b^T / (1 + 1^T b)
            b = self.v64 @ (coef64 * self.vt1) + 1.0
            denom = 1.0 + float(xp.sum(b))
            bw = xp.astype(b, work, copy=False)
            cols.append(xp.reshape(bw * (-1.0 / denom), (n, 1)))
            if dic.outliers:
                yb = xp.astype(dic.x64.T @ b, work, copy=False)  # Y B 1
                ycols.append(xp.reshape(yb * (-1.0 / denom), (dic.d, 1)))
            vx = xp.concat([self.v, xp.reshape(bw, (n, 1))], axis=1)
        else:
            vx = self.v
        self.vxt_left = dic.products.left(xp.asarray(vx.T, copy=True))
        self.la = xp.concat(cols, axis=1) if len(cols) > 1 else cols[0]
        self.la_left = dic.products.left(self.la)
        self.ly = self.ly_left = None
        if dic.outliers:
            self.ly = xp.concat(ycols, axis=1) if len(ycols) > 1 else ycols[0]
            self.ly_left = dic.products.left(self.ly)

    def low_rank_right(self, t):
        """``W = V_x^T (T - I)`` for ``t = T - I`` (``low_rank``)."""
        return self.dic.products.mm(self.vxt_left, t)

    def step_a(self, t, d1s, e, cols: slice, want_ya: bool, diag):
        """Same contract as :meth:`DenseInverse.step_a` (through ``L_A`` and ``L_Y`` when
        ``low_rank``)."""
        if not self.low_rank:
            return super().step_a(t, d1s, e, cols, want_ya, diag)
        dic = self.dic
        t = self.t_minus_i(t, d1s, e, diag)
        w = self.low_rank_right(t)
        a = dic.products.mm(self.la_left, w)
        a += t
        a[diag.rows, diag.cols] += 1.0
        ya = None
        if dic.outliers and want_ya:
            ya = dic.products.mm(self.ly_left, w)
            ya += dic.yw[:, cols]
        return a, ya


class Woodbury:
    """The A-step through Woodbury's identity, ``O(N^2 D)``: ``M = rho I + U U^T`` with
    ``U = [sqrt(lambda_z) Y^T, sqrt(rho) 1]``, so ``rho M^{-1} = I - U K^{-1} U^T`` with
    the ``(D + 1) x (D + 1)`` matrix ``K = rho I + U^T U``.

    Runs in float64: ``Y (C - Lam)`` nearly cancels ``Y`` and float32 left the residual at
    ~1e-2. The ``E`` terms enter through ``Y Y^T E`` (``D x D x N``), never ``Y^T E``.
    """

    def __init__(self, dic: Dictionary, rho: float):
        xp = dic.xp
        self.dic = dic
        self.gram_d = dic.x64.T @ dic.x64  # float64, D x D
        self.s = xp.sum(dic.x64, axis=0)  # Y 1
        self.refactor(rho)

    def refactor(self, rho: float) -> None:
        """Factor the small Woodbury core for the penalty ``rho``."""
        dic, xp = self.dic, self.dic.xp
        self.rho = rho
        d, lz = dic.d, dic.lam_z
        k = d + 1 if dic.affine else d
        kmat = xp.zeros((k, k), dtype=xp.float64, device=dic.device)
        kmat[:d, :d] = self.gram_d * lz
        if dic.affine:
            kmat[:d, d] = self.s * math.sqrt(lz * rho)
            kmat[d, :d] = kmat[:d, d]
            kmat[d, d] = rho * dic.n
        diag = xp.arange(k, device=dic.device)
        kmat[diag, diag] += rho
        self.kinv = dic.kernels.spd_inverse(xp, kmat)

    def step_a(self, t, d1s, e, cols: slice, want_ya: bool, diag):
        """Same contract as :meth:`DenseInverse.step_a`."""
        dic, xp = self.dic, self.dic.xp
        lz, rho, d, f64 = dic.lam_z, self.rho, dic.d, xp.float64
        x, y = dic.x64, dic.x64.T
        t = xp.astype(t, f64, copy=False)
        if dic.affine:
            d1s = xp.astype(d1s, f64, copy=False)
        if e is not None:
            e = xp.astype(e, f64, copy=False)
        yt = y @ t  # Y (C - Lam), D x b
        yv = y[:, cols] - yt  # Y V / rho: the identity's columns are Y's
        if dic.affine:
            yv += self.s[:, None] * d1s[None, :]
        if e is not None:
            yv += dic.kernels.times_e(self.gram_d, e * (lz / rho))
        yv *= math.sqrt(lz)
        if dic.affine:
            ov = 1.0 - xp.sum(t, axis=0) + d1s * dic.n  # 1^T V / rho
            if e is not None:
                ov += (lz / rho) * (self.s @ e)
            utv = xp.concat([yv, (ov * math.sqrt(rho))[None, :]], axis=0)
        else:
            utv = yv
        zr = self.kinv @ utv  # K^{-1} U^T V / rho
        q = zr[:d, :] * math.sqrt(lz)
        if e is not None:
            q -= (lz / rho) * e
        a = x @ q
        a += t
        if dic.affine:
            col = zr[d, :] * math.sqrt(rho) - d1s
            a += col
        ya = None
        if dic.outliers and want_ya:
            ya = self.gram_d @ q
            ya += yt
            if dic.affine:
                ya += self.s[:, None] * col[None, :]
            ya = xp.astype(ya, dic.work, copy=False)
        return xp.astype(a, dic.work, copy=False), ya


class SquaredStep:
    """One iteration of VideoAnchor's program on the columns ``start:stop`` of ``C``.

    ``min ||C||_1 + lambda_e ||E||_1 + lambda_z / 2 ||Y - Y C - E||_F^2`` s.t.
    ``1^T C = 1^T`` (``affine``), ``diag(C) = 0``, by the authors' ADMM:

    1. A-step: ``A`` from the factored system (``factor``: :class:`DenseInverse`,
       :class:`Woodbury`, :class:`EigenInverse`);
    2. E-step: ``E = soft(Y - Y A, lambda_e / lambda_z)``;
    3. ``d1s += 1^T A - 1`` (affine);
    4. C-step and dual: ``T = A + Lam``, ``C = soft(T, 1 / rho)`` with a zero diagonal,
       ``Lam += A - C`` (``Kernels.shrink``);
    5. stop when ``max_i sum_j |A - C|_ij < eps`` (over these columns: a block of columns
       is an independent problem against the whole dictionary).
    """

    #: whether the residual is a device scalar (:func:`run`; then E is passed on unread)
    lazy_residual = False

    def __init__(self, dic: Dictionary, factor, start: int, stop: int, *, thr_e: float,
                 eps: float):  # fmt: skip
        nb = stop - start
        self.dic, self.factor, self.cols = dic, factor, slice(start, stop)
        self.thr_e, self.eps = thr_e, eps
        self.C = dic.zeros(dic.n, nb)
        self.lam = dic.zeros(dic.n, nb)
        self.d1s = dic.zeros(nb) if dic.affine else None
        self.E = dic.zeros(dic.d, nb) if dic.outliers else None
        self.e_nonzero = False
        self.diag = Diagonal(dic.xp, dic.device, start, stop)
        self.rho = factor.rho
        self.rho_changes = 0

    def __call__(self, it: int) -> tuple[float, bool]:
        dic, xp = self.dic, self.dic.xp
        e = self.E if self.e_nonzero else None
        a, ya = self.factor.step_a(self.C - self.lam, self.d1s, e, self.cols, True, self.diag)
        if dic.outliers:
            ya *= -1.0
            ya += dic.yw[:, self.cols]  # Y - Y A
            ya -= _clip(xp, ya, -self.thr_e, self.thr_e)  # soft, in place
            self.E = ya
            self.e_nonzero = self.lazy_residual or bool(xp.any(ya != 0))
        return self._c_step(it, a)

    def _shrink(self, a):
        """After the A- and E-steps (``a`` is ``A``, overwritten): the affine dual, the
        C-step and its dual; returns ``|A - C|``."""
        dic, xp = self.dic, self.dic.xp
        if dic.affine:
            self.d1s += xp.sum(a, axis=0) - 1.0
        a += self.lam  # T
        self.C, self.lam, absd = dic.kernels.shrink(xp, a, self.lam, 1.0 / self.rho, self.diag)
        return absd

    def _c_step(self, it: int, a) -> tuple[float, bool]:
        """:meth:`_shrink`, then the residual and the stopping rule."""
        residual = float(self.dic.xp.max(self.dic.xp.sum(self._shrink(a), axis=1)))
        return residual, residual < self.eps


@dataclass(frozen=True)
class Schedule:
    """The fast solver's fixed schedule (immutable: a variant is a new object, passed to the
    solver; :meth:`cut` makes a shorter one).

    Residual balancing at every ``every``-th iteration up to ``balance_until`` by the factor
    ``clip(sqrt(r_rel / s_rel), 1 / tau, tau)``, a continuous function of the iterate, then
    ``iterations`` in all: no residual test decides anything, so the answer is a continuous
    function of the features (docs/ssc.md)."""

    iterations: int = 60
    every: int = 5
    balance_until: int = 30
    tau: float = 10.0
    continuation: int = 30
    """A warm start by continuation in ``lambda_z`` over the first ``continuation``
    iterations (0: none), for data whose ``lambda_z`` is set by one badly placed token, a
    near-black face (:func:`continuation_start`, ``continuation_floor``); its weight changes
    only where the balancing refactors anyway (a multiple of ``every``, at most
    ``balance_until``)."""
    continuation_floor: float = 0.3
    thin_above: float = 1.0
    """The factor (:class:`EigenInverse`) is *thin* where ``N > thin_above * D``: ``Y^T Y``
    has rank at most ``D``, so the eigendecomposition of ``lambda_z Y Y^T`` (``D x D``) gives
    all of its non-zero eigenpairs and a refactor is an ``(N + D) x D x N`` product instead
    of ``(N + D) x N x N`` (the same ``[R; Y R]`` to rounding)."""
    low_rank_above: float = 1.75
    """Above ``low_rank_above * D`` ``[R; Y R]`` is applied through the thin factor without
    being formed: ``(2 D + D^2 / N) N`` multiply-adds per column against ``(N + D) N``."""
    full_first: int = 2
    full_every: int = 10
    dense_yte: float = 0.08
    dense_resid: float = 0.25
    """The CPU's active-set step (:class:`~videoanchor.anchor.solvers.fast.ActiveSetStep`): exact
    E-steps in the first ``full_first`` iterations, every ``full_every``-th and the last;
    the products over the active set run dense above these shares of ``D x N`` (the same
    values to rounding): ``dense_yte`` for ``Y^T E`` (E's non-zeros), ``dense_resid`` for the
    sampled residual (the active entries). Break-even on a 2-core AVX2 CPU (torch 2.13,
    D x N = 3584 x 1024, 1024 x 512, 2016 x 256): 0.05-0.1 and 0.2-0.3; on Yale B faces
    73-84% of the entries are active, on video-like tokens 3-4%."""

    def __post_init__(self):
        if self.continuation > self.balance_until or self.continuation % self.every:
            raise ValueError(
                "schedule: expected a continuation that is a multiple of every and at most "
                f"balance_until, got continuation={self.continuation}, every={self.every}, "
                f"balance_until={self.balance_until}"
            )

    def cut(self, iterations: int) -> Schedule:
        """This schedule run for ``iterations`` in all, its balancing (and continuation)
        ending by half of them (a multiple of ``every`` for the continuation)."""
        until = min(self.balance_until, iterations // 2)
        cont = min(self.continuation, self.every * (until // self.every))
        return replace(self, iterations=int(iterations), balance_until=until,
                       continuation=cont)  # fmt: skip


SCHEDULE = Schedule()


def continuation_start(row_max, schedule: Schedule = SCHEDULE) -> float:
    """The weight on ``lambda_z`` the fast solver starts from (1: no continuation):
    ``min(1, (mu_z / m) / floor)`` with ``row_max`` the ``max_(j != i) |y_i^T y_j|`` of every
    token (:func:`~videoanchor.anchor.program.gram_row_max`), ``mu_z`` their minimum (which sets
    ``lambda_z = alpha_z / mu_z``) and ``m`` their lower median.

    ``mu_z / m`` is how far the worst-placed token sits below a typical one: 0.4-0.96 on
    video-like tokens, 0.001-0.06 on Yale B faces, where one near-black face scales
    ``lambda_z`` up 13-83x (docs/ssc.md). Below ``floor`` the schedule starts from the weight
    of a set placed ``floor`` times worse than typical and reaches the authors' weight by
    iteration ``continuation``: a continuous function of the features."""
    if not schedule.continuation:
        return 1.0
    xp = array_api_compat.array_namespace(row_max)
    r = xp.sort(xp.reshape(xp.astype(row_max, xp.float64), (-1,)))
    median = float(r[(r.shape[0] - 1) // 2])
    if not median > 0:
        return 1.0
    return min(1.0, float(r[0]) / median / float(schedule.continuation_floor))


def continuation_weight(start: float, it: int, schedule: Schedule = SCHEDULE) -> float:
    """The weight on ``lambda_z`` at iteration ``it`` (1-based) of a schedule that starts
    from ``start`` (:func:`continuation_start`): ``start ** max(0, 1 - b / K)``, ``K`` the
    schedule's ``continuation`` and ``b = every * floor((it - 1) / every)`` (the weight holds
    for blocks of ``every`` iterations, changing where the balancing refactors), 1 from
    iteration ``K + 1`` on."""
    k = float(schedule.continuation)
    if start >= 1.0 or not k:
        return 1.0
    every = int(schedule.every)
    b = every * ((it - 1) // every)
    return float(start) ** max(0.0, 1.0 - b / k)


class ScheduledStep(SquaredStep):
    """:class:`SquaredStep` run on a :class:`Schedule` (default :data:`SCHEDULE`): the
    authors' steps every iteration, ``rho`` rebalanced at fixed iterations (``factor`` must
    refactor cheaply: :class:`EigenInverse`), done after a fixed number of iterations; its
    residual, the authors' ``max_i sum_j |A - C|_ij``, is for information only.

    ``start:stop``: the columns of ``C`` this step owns (default all). Every step but the
    rebalancing and the residual is column-wise, so the columns can be split over
    processes; ``reduce(array)`` then sums ``array`` over all of them
    (:func:`~videoanchor.anchor.collective.all_sum`) for the residual's row sums and the
    rebalancing's four norms."""

    def __init__(self, dic: Dictionary, factor, *, thr_e: float, schedule: Schedule = SCHEDULE,
                 start: int = 0, stop: int | None = None, reduce=None,
                 continuation: float = 1.0):  # fmt: skip
        super().__init__(dic, factor, start, dic.n if stop is None else stop, thr_e=thr_e,
                         eps=0.0)  # fmt: skip
        self.schedule = schedule
        # continuation (1: none): iteration it runs continuation_weight(start, it) times the
        # authors' lambda_z (thr_e over it) and the factor's eigenvalues (reweight); a factor
        # built with the first weight (EigenInverse(continuation=...)) needs no refactor here
        self.lam_z_full, self.thr_full, self.weight = dic.lam_z, thr_e, 1.0
        self.continuation = float(continuation)
        if self.continuation < 1.0:
            if not hasattr(factor, "reweight"):
                raise TypeError(
                    "continuation: expected a factor that rescales its eigenvalues "
                    f"(EigenInverse), got {type(factor).__name__}"
                )
            first = continuation_weight(self.continuation, 1, schedule)
            stale = factor.weight != first
            self._reweight(first)
            if stale:
                factor.refactor(factor.rho)
        self.iterations = int(schedule.iterations)
        self.reduce = reduce
        # torch: the residual stays on the device and E is passed on even where it is zero
        # (a zero product changes nothing): only a rebalancing iteration waits for the device
        self.lazy_residual = array_api_compat.is_torch_namespace(dic.xp)

    def _c_step(self, it: int, a) -> tuple[float, bool]:
        """:meth:`SquaredStep._shrink`, the residual, and the scheduled rho rebalancing."""
        dic, xp = self.dic, self.dic.xp
        c_old = self.C
        absd = self._shrink(a)
        rows = xp.sum(absd, axis=1)
        if self.reduce is not None:
            rows = self.reduce(rows)
        residual = xp.max(rows) if self.lazy_residual else float(xp.max(rows))
        sch = self.schedule
        if it % sch.every == 0 and it <= sch.balance_until and it < self.iterations:
            c_old -= self.C
            norms = self._norms(absd, self.C, c_old, self.lam)
            r_rel = norms[0] / max(norms[1], 1e-30)
            s_rel = norms[2] / max(norms[3], 1e-30)
            q = r_rel / max(s_rel, 1e-30)
            factor = min(max(math.sqrt(q), 1.0 / sch.tau), sch.tau)
            self.lam *= 1.0 / factor
            if dic.affine:
                self.d1s *= 1.0 / factor
            self.rho *= factor
            if self.continuation < 1.0:  # the next block's weight, in the same refactor
                self._reweight(continuation_weight(self.continuation, it + 1, self.schedule))
            self.factor.refactor(self.rho)
            self.rho_changes += 1
        return residual, it >= self.iterations

    def _reweight(self, weight: float) -> None:
        """Run the next iterations with ``weight * lambda_z`` (and the E threshold
        ``lambda_e / (weight * lambda_z)``); the caller refactors."""
        if weight == self.weight:
            return
        self.weight = weight
        self.dic.lam_z = self.lam_z_full * weight
        self.thr_e = self.thr_full / weight
        self.factor.reweight(weight)

    def _norms(self, *arrays) -> list[float]:
        """The Frobenius norms of ``arrays`` over all columns (every rank's, with ``reduce``)."""
        xp = self.dic.xp
        norm = xp.linalg.vector_norm
        if self.reduce is None:
            return [float(norm(a)) for a in arrays]
        squares = xp.stack([xp.astype(norm(a), xp.float64) ** 2 for a in arrays])
        return [math.sqrt(float(v)) for v in self.reduce(squares)]


class EqualityStep:
    """One iteration of Elhamifar & Vidal's constrained program, as written out in
    :mod:`videoanchor.anchor.solvers.equality`: the same C-step and dual update as
    :class:`SquaredStep` (``Kernels.shrink``, on ``Z = [C; gamma E]``, ``Lam = L2 / mu2``),
    its own Z-step, applied by Woodbury through a ``D x D`` (``"d-space"``) or ``N x N``
    (``"n-space"``) matrix."""

    def __init__(self, dic: Dictionary, *, gamma: float, mu1: float, mu2: float, eps: float):
        xp, n, d = dic.xp, dic.n, dic.d
        self.dic, self.eps = dic, eps
        self.inv_g, self.mu1, self.mu2 = 1.0 / gamma, mu1, mu2
        self.c = mu2 / mu1 + 1.0 / gamma**2  # K = c I + Y Y^T
        x64 = dic.x64
        self.n_space = d > n
        if self.n_space:
            g0 = x64 @ x64.T  # Y^T Y
            h = xp.asarray(g0, copy=True)
            eye = xp.arange(n, device=dic.device)
            h[eye, eye] += self.c
            h = dic.kernels.spd_inverse(xp, h, "the Z-step system")  # (c I + Y^T Y)^{-1}
            # Y^T K^{-1} = (I - Y^T Y H) Y^T / c: applied to Y^T (P R) it saves a D x N x N
            m = -(g0 @ h)
            m[eye, eye] += 1.0
            m /= self.c
            self.h_w = xp.astype(h, dic.work)
            self.m_w = xp.astype(m, dic.work)
        else:
            k = x64.T @ x64
            eye = xp.arange(d, device=dic.device)
            k[eye, eye] += self.c
            self.kinv_w = xp.astype(dic.kernels.spd_inverse(xp, k, "the Z-step system"), dic.work)
        self.cc, self.ce = dic.zeros(n, n), dic.zeros(d, n)  # C and gamma E
        self.lc, self.le = dic.zeros(n, n), dic.zeros(d, n)  # L2 / mu2, by block
        self.l1 = dic.zeros(d, n)
        self.diag = Diagonal(xp, dic.device, 0, n)
        if dic.affine:
            # the affine system adds mu2 delta delta^T (delta = [1_N; 0_D]): Sherman-Morrison
            # with u = A0 delta, so its inverse is A0 - s u u^T
            uc, ue = self._apply_a0(dic.zeros(n, 1) + 1.0, dic.zeros(d, 1))
            self.uc, self.ue = uc[:, 0], ue[:, 0]
            self.s_aff = mu2 / (1.0 + mu2 * float(xp.sum(self.uc)))
            self.lam3 = dic.zeros(n)

    @property
    def outliers(self):
        """``E`` (``D x N``)."""
        return self.ce * self.inv_g

    def _apply_a0(self, rc, re):
        """``(mu1 P^T P + mu2 I)^{-1} [rc; re]`` (overwrites ``rc`` and ``re``)."""
        y, inv_g, inv_mu2 = self.dic.yw, self.inv_g, 1.0 / self.mu2
        pr = y @ rc
        pr += re * inv_g  # P R = Y R_C + R_E / g
        if self.n_space:
            ytpr = y.T @ pr
            w = pr - y @ (self.h_w @ ytpr)
            w /= self.c  # K^{-1} P R
            rc -= self.m_w @ ytpr
        else:
            w = self.kinv_w @ pr
            rc -= y.T @ w
        rc *= inv_mu2  # (R_C - Y^T W) / mu2
        re -= w * inv_g
        re *= inv_mu2  # (R_E - W / g) / mu2
        return rc, re

    def __call__(self, it: int) -> tuple[float, bool]:
        dic, xp = self.dic, self.dic.xp
        y, mu1, mu2, inv_g = dic.yw, self.mu1, self.mu2, self.inv_g
        b = y * mu1
        b += self.l1  # mu1 Y + L1
        rc = y.T @ b
        rc += mu2 * (self.cc - self.lc)  # Y^T B + mu2 (C - Lam)
        re = b * inv_g
        re += mu2 * (self.ce - self.le)  # B / g + mu2 (C - Lam)
        if dic.affine:
            rc += mu2 - self.lam3  # + mu2 delta (1 - lambda3 / mu2)^T
            utr = self.uc @ rc + self.ue @ re  # u^T R
        zc, ze = self._apply_a0(rc, re)
        if dic.affine:
            zc -= self.s_aff * (self.uc[:, None] * utr[None, :])
            ze -= self.s_aff * (self.ue[:, None] * utr[None, :])
        zc[self.diag.rows, self.diag.cols] = 0.0
        # r = Y - P Z = (Y - E) - Y Z_C; err2 normalises each column by ||y_i - e_i||
        y0 = y - ze * inv_g
        r = y0 - y @ zc
        self.l1 += mu1 * r
        err1 = 0.0
        if dic.affine:
            colsum = xp.sum(zc, axis=0) - 1.0  # delta^T Z - 1
            self.lam3 += mu2 * colsum
            err1 = float(xp.max(xp.abs(colsum)))  # their loop tests err3 against thr1 too
        shrink = dic.kernels.shrink
        zc += self.lc
        self.cc, self.lc, dc = shrink(xp, zc, self.lc, 1.0 / mu2, self.diag)
        ze += self.le
        self.ce, self.le, de = shrink(xp, ze, self.le, 1.0 / mu2, None)
        err1 = max(err1, float(xp.max(dc)), float(xp.max(de)))  # max |Z - C|
        norm = xp.linalg.vector_norm
        tiny = xp.finfo(dic.work).tiny
        err2 = float(xp.max(norm(r, axis=0) / _clip(xp, norm(y0, axis=0), tiny, None)))
        return max(err1, err2), err1 <= self.eps and err2 <= self.eps
