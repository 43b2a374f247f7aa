"""Sparse subspace clustering by ADMM (METHOD.md section 2), in torch, on any device.

With ``Y = X^T`` (``D x N``, one column per point) the solver minimises

    ||C||_1 + lambda_e ||E||_1 + (lambda_z / 2) ||Y - Y C - E||_F^2
    s.t.  1^T C = 1^T (affine),  diag(C) = 0

with ``lambda_e = alpha_e / mu_e`` and ``lambda_z = alpha_z / mu_z`` (Elhamifar & Vidal,
TPAMI 2013), by the authors' ADMM: the ``A``-step solves the fixed system
``(lambda_z Y^T Y + rho I + rho 1 1^T) A = ...``, which is factored once here (their
code re-solves it densely every iteration). Two equivalent ways of applying its inverse
are used, whichever costs fewer flops:

* ``"dense"``: the explicit ``N x N`` inverse, ``O(N^3)`` per iteration;
* ``"woodbury"``: the system is ``rho I`` plus a rank-``(D + 1)`` term, so its inverse
  is applied through a ``(D + 1) x (D + 1)`` matrix, ``O(N^2 D)`` per iteration.

The factorisation is done in float64 and the iterations in the working dtype
(float32 by default). ``relax`` (over-relaxation) and ``adaptive_rho`` (residual
balancing) are optional accelerations that converge to the same minimiser; with both
off the iterates are the authors' iterates.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field

import torch

from videoanchor.anchor._inputs import (
    SSCMemoryError,
    as_feature_tensor,
    check_memory,
    resolve_dtype,
)
from videoanchor.anchor.progress import as_reporter

__all__ = ["ssc_lambdas", "gram_row_max", "solve_ssc_admm", "ADMMResult", "SSCMemoryError"]


def ssc_lambdas(
    x: torch.Tensor, alpha_e: float, alpha_z: float, *, block: int = 4096
) -> tuple[float, float, float, float]:
    """``(lambda_e, lambda_z, mu_e, mu_z)`` for points ``x`` (``N x D``, one row per point).

    ``mu_e = min_i max_{j != i} ||y_j||_1`` and ``mu_z = min_i max_{j != i} |y_i^T y_j|``,
    computed without the authors' ``O(N^2)`` Python loop: ``mu_e`` is the second largest
    point L1 norm, ``mu_z`` a blocked pass over the Gram matrix (no ``N x N`` allocation).
    """
    n = x.shape[0]
    if n < 2:
        raise ValueError(f"SSC needs at least 2 points, got {n}")
    norms = x.abs().sum(dim=1, dtype=torch.float64)
    mu_e = float(torch.topk(norms, 2).values[1])
    mu_z = float(gram_row_max(x, block=block).min())
    if not (mu_e > 0):
        raise ValueError("SSC: at most one point is non-zero (mu_e = 0); lambda_e is undefined")
    if not (mu_z > 0):
        raise ValueError(
            "SSC: some point is orthogonal to every other point (mu_z = 0); lambda_z is undefined"
        )
    return alpha_e / mu_e, alpha_z / mu_z, mu_e, mu_z


def gram_row_max(x: torch.Tensor, *, block: int = 4096) -> torch.Tensor:
    """``max_{j != i} |y_i^T y_j|`` for every point ``i`` (float64), ``block`` rows at a time."""
    n = x.shape[0]
    row_max = torch.empty(n, dtype=torch.float64, device=x.device)
    for a in range(0, n, block):
        b = min(n, a + block)
        g = (x[a:b] @ x.T).abs_()
        g[torch.arange(b - a, device=x.device), torch.arange(a, b, device=x.device)] = 0
        row_max[a:b] = g.amax(dim=1)
    return row_max


@dataclass
class ADMMResult:
    """Output of :func:`solve_ssc_admm`.

    ``coef`` is ``C`` (``N x N``, column ``i`` reconstructs point ``i``, zero diagonal);
    ``residual`` the last ``max_i sum_j |A - C|_ij``; ``timings`` seconds per stage.
    """

    coef: torch.Tensor
    iterations: int
    converged: bool
    residual: float
    lambda_e: float
    lambda_z: float
    rho: float
    strategy: str
    rho_changes: int = 0
    outliers: torch.Tensor | None = None
    history: list[float] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)


# Residual balancing on relative residuals (Wohlberg 2017): every `every` iterations, if
# the primal/dual ratio leaves [1/mu, mu], scale rho by sqrt(ratio / xi), at most tau.
# At most `max_changes` changes, so the penalty is eventually fixed and ADMM's convergence
# theory applies; each change refactors the A-step system.
# Below this fraction of non-zeros, Y^T E is a sparse product: cuSPARSE on CUDA; on the
# CPU, with at most one non-zero per column on average, a gather of the columns of X that
# E touches, scattered by index_add_ (deterministic; CSR products measured no faster than
# the dense one there).
_SPARSE_E_DENSITY = 0.02
_SPARSE_E_ON_CPU = True

_ADAPT = {"every": 5, "max_changes": 20, "mu": 3.0, "tau": 10.0, "xi": 1.0}


def check_admm_parameters(n: int, rho: float, eps: float, max_iter: int) -> None:
    """The checks every ADMM entry point makes on its size and iteration parameters."""
    if n < 2:
        raise ValueError(f"SSC needs at least 2 points, got N = {n}")
    if not (rho > 0 and math.isfinite(rho)):
        raise ValueError(f"rho: expected a positive finite number, got {rho}")
    if not (eps >= 0):
        raise ValueError(f"eps: expected a non-negative number (0: run max_iter), got {eps}")
    if int(max_iter) < 1:
        raise ValueError(f"max_iter: expected a positive integer, got {max_iter}")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _flops(n: int, d: int, outliers: bool) -> dict[str, float]:
    """Multiply-adds per iteration (E = 0), counting the products that dominate."""
    dense = n**3 + (d * n * n if outliers else 0.0)
    woodbury = 2.0 * d * n * n + 2.0 * d * d * n
    return {"dense": dense, "woodbury": woodbury}


def choose_strategy(n: int, d: int, outliers: bool = True, device_type: str = "cpu") -> str:
    """The cheaper way to apply the system inverse: ``"dense"`` or ``"woodbury"``.

    Woodbury runs in float64 (its float32 form loses the last digits to cancellation):
    on the CPU a float64 multiply-add costs about two float32 ones, on data-centre GPUs
    (H100/H200 float64 tensor cores) about the same as a float32 SIMT one. Ties go to
    ``"dense"``.
    """
    f = _flops(n, d, outliers)
    f64_cost = 1.2 if device_type == "cuda" else 2.0
    return "woodbury" if f64_cost * f["woodbury"] < 0.8 * f["dense"] else "dense"


def admm_bytes(n: int, d: int, itemsize: int, strategy: str) -> int:
    """Peak bytes of :func:`solve_ssc_admm` (working buffers plus the float64 factorisation)."""
    nn = n * n
    if strategy == "dense":
        # float64 factorisation (M and its inverse), then A, C, Lam, Minv, R in work dtype;
        # with outliers Minv, B0 and A carry D extra rows (Y Minv, Y B0, Y A)
        return max(2 * nn * 8, nn * 8 + nn * itemsize) + 5 * nn * itemsize + 9 * n * d * itemsize
    return 4 * nn * itemsize + 3 * nn * 8 + 8 * n * d * 8 + 3 * (d + 1) ** 2 * 8


def _Progress(progress, total: int, eps: float = 0.0, n: int | None = None):
    """The run's :class:`~videoanchor.anchor.progress.SSCProgress` (``progress=`` option)."""
    return as_reporter(progress, max_iter=total, eps=eps, tokens=n)


def solve_ssc_admm(
    features,
    *,
    alpha_e: float = 800.0,
    alpha_z: float = 800.0,
    rho: float = 300.0,
    eps: float = 2e-4,
    max_iter: int = 10000,
    affine: bool = True,
    outliers: bool = True,
    dtype=None,
    strategy: str = "auto",
    relax: float = 1.0,
    adaptive_rho: bool = False,
    progress=None,
    keep_history: bool = False,
    check_memory_first: bool = True,
    callback=None,
    e_every: int = 1,
) -> ADMMResult:
    """Solve the SSC program for ``features`` (``N x D``, one row per point) on their device.

    With ``relax=1`` and ``adaptive_rho=False`` this runs the authors' iteration
    (METHOD.md section 2) and stops when ``max_i sum_j |A - C|_ij < eps``. With
    acceleration it stops when both that primal residual and the change of ``C`` between
    iterations (the dual residual, same norm) are below ``eps``.

    ``progress``: False, True, None (default: a bar or log lines once a run lasts a few
    seconds) or an :class:`~videoanchor.anchor.progress.SSCProgress`, whose time budget
    stops the iterations early (``converged=False``).
    """
    t0 = time.perf_counter()
    x = as_feature_tensor(features)
    device = x.device
    work = resolve_dtype(dtype, device)
    n, d = x.shape
    check_admm_parameters(n, rho, eps, max_iter)
    if not (1.0 <= relax < 2.0):
        raise ValueError(f"relax: expected a value in [1, 2), got {relax}")
    if strategy == "auto":
        strategy = choose_strategy(n, d, outliers, device.type)
    if strategy not in ("dense", "woodbury"):
        raise ValueError(f"strategy: expected 'auto', 'dense' or 'woodbury', got {strategy!r}")
    itemsize = torch.finfo(work).bits // 8
    if check_memory_first:
        check_memory(admm_bytes(n, d, itemsize, strategy), device, n=n, d=d, what="Dense SSC")

    x64 = x.to(torch.float64)
    xw = x.to(work)
    lam_e, lam_z, _, _ = ssc_lambdas(xw if work == torch.float64 else x64, alpha_e, alpha_z)
    thr_e = lam_e / lam_z
    _sync(device)
    t1 = time.perf_counter()

    solver = _Solver(x64, xw, lam_z, rho, affine, outliers, strategy)
    _sync(device)
    t2 = time.perf_counter()

    C = torch.zeros(n, n, dtype=work, device=device)
    lam = torch.zeros(n, n, dtype=work, device=device)  # scaled dual Delta2 / rho
    d1s = torch.zeros(n, dtype=work, device=device) if affine else None  # Delta1 / rho
    E = torch.zeros(d, n, dtype=work, device=device) if outliers else None
    e_nonzero = False
    eye_idx = torch.arange(n, device=device)
    history: list[float] = []
    bar = _Progress(progress, int(max_iter), eps, n)
    residual = math.inf
    converged = False
    it = 0
    accelerate = relax != 1.0 or adaptive_rho
    rho_k = float(rho)
    c_old = torch.empty_like(C) if accelerate else None
    last_rho_change = 0
    n_changes = 0
    # With acceleration and the dense strategy, Y A (a D x N x N product) only feeds the
    # E-step; refreshing E every few iterations is an inexact block update with the same
    # fixed points, and convergence is only declared right after an exact E-step.
    e_every = max(1, int(e_every)) if accelerate and strategy == "dense" else 1
    try:
        for it in range(1, int(max_iter) + 1):
            e_step = outliers and (it % e_every == 0 or it <= e_every)
            A, YA = solver.step_a(C, lam, d1s, E, e_nonzero, e_step)
            if e_step:
                # E = soft(Y - Y A, lambda_e / lambda_z), written into YA's buffer
                YA.neg_().add_(solver.yw)
                E = YA.sign() * (YA.abs_().sub_(thr_e).clamp_(min=0))
                e_nonzero = bool(E.any())
            if affine:
                d1s.add_(A.sum(dim=0).sub_(1.0))
            if accelerate:
                c_old.copy_(C)
            if relax != 1.0:
                A.mul_(relax).add_(C, alpha=1.0 - relax)
            A.add_(lam)  # T = A + Delta2 / rho
            lam_new = A.clamp(-1.0 / rho_k, 1.0 / rho_k)
            lam_new[eye_idx, eye_idx] = A[eye_idx, eye_idx]
            torch.sub(A, lam_new, out=C)  # soft(T, 1/rho) with a zero diagonal
            lam.sub_(lam_new).abs_()  # |A - C| = |Lam_new - Lam_old|
            primal = float(lam.sum(dim=1).max())
            if adaptive_rho:
                fro_primal = float(torch.linalg.vector_norm(lam))
            lam = lam_new
            if accelerate:
                c_old.sub_(C).abs_()
                dual = float(c_old.sum(dim=1).max())
                if adaptive_rho:
                    fro_dual = float(torch.linalg.vector_norm(c_old))
                residual = max(primal, dual)
            else:
                residual = primal
            if not math.isfinite(residual):
                raise FloatingPointError(
                    f"SSC-ADMM diverged at iteration {it} (residual {residual}); "
                    "try dtype=torch.float64 or a larger rho"
                )
            if keep_history:
                history.append(residual)
            if callback is not None:
                callback(it, C, residual)
            stop = bar.update(it, residual)  # progress; True when a time budget ran out
            if residual < eps and (e_step or not outliers):
                converged = True
                break
            if stop:
                break
            if (
                adaptive_rho
                and it - last_rho_change >= _ADAPT["every"]
                and n_changes < _ADAPT["max_changes"]
            ):
                # residual balancing on relative residuals (Wohlberg 2017)
                r_rel = fro_primal / max(float(torch.linalg.vector_norm(C)), 1e-30)
                s_rel = fro_dual / max(float(torch.linalg.vector_norm(lam)), 1e-30)
                q = r_rel / max(s_rel, 1e-30)
                factor = 1.0
                if q > _ADAPT["mu"]:
                    factor = min(math.sqrt(q / _ADAPT["xi"]), _ADAPT["tau"])
                elif q < 1.0 / _ADAPT["mu"]:
                    factor = 1.0 / min(math.sqrt(_ADAPT["xi"] / q), _ADAPT["tau"])
                if factor != 1.0:
                    lam.mul_(1.0 / factor)  # keep Delta2 = rho * Lam fixed
                    if affine:
                        d1s.mul_(1.0 / factor)  # and Delta1
                    rho_k *= factor
                    solver.refactor(rho_k)
                    last_rho_change = it
                    n_changes += 1
    finally:
        bar.close(converged, it, residual)
    _sync(device)
    t3 = time.perf_counter()
    return ADMMResult(
        coef=C,
        iterations=it,
        converged=converged,
        residual=residual,
        lambda_e=lam_e,
        lambda_z=lam_z,
        rho=rho_k,
        rho_changes=n_changes,
        strategy=strategy,
        outliers=E,
        history=history,
        timings={"lambdas": t1 - t0, "factor": t2 - t1, "admm": t3 - t2},
    )


class _Solver:
    """Applies the A-step for one strategy.

    The A-step is written as ``A = I - M^{-1} V`` with
    ``V = rho (I - C + Lam) + 1 D1^T + lambda_z Y^T E`` (``Lam = Delta2 / rho``), which
    is the authors' right-hand side minus ``M`` itself: the entries stay O(1) instead of
    O(lambda_z Y^T Y), so the float32 iterations do not lose their last digits to
    cancellation.
    """

    def __init__(self, x64, xw, lam_z, rho, affine, outliers, strategy):
        self.x64, self.xw = x64, xw
        self.yw = xw.T  # Y, D x N view
        self.lam_z, self.affine, self.outliers, self.strategy = lam_z, affine, outliers, strategy
        self.n, self.d = x64.shape
        self.work = xw.dtype
        self._mt: dict[int, torch.Tensor] = {}
        if strategy == "dense":
            self.gram = x64 @ x64.T  # float64, N x N
        else:
            self.gram_d = x64.T @ x64  # float64, D x D
            self.s = x64.sum(dim=0)  # Y 1
        self.refactor(rho)

    def refactor(self, rho: float) -> None:
        self.rho = rho
        n, lz = self.n, self.lam_z
        if self.strategy == "dense":
            m = self.gram * lz
            m.diagonal().add_(rho)
            if self.affine:
                m.add_(rho)
            chol, info = torch.linalg.cholesky_ex(m)
            if int(info) != 0:
                raise FloatingPointError("SSC: the A-step system is not positive definite")
            del m
            minv = torch.cholesky_inverse(chol).mul_(rho)  # rho M^{-1}
            del chol
            # With outliers, Y A is needed too: stacking [I; Y] on the left of every
            # operator gives (A, Y A) from one (N + D) x N x N product instead of two.
            self.rminv = self._stack_y(minv)
            if self.affine:
                self.ru = self._stack_y(minv.sum(dim=1, keepdim=True)).squeeze(1)
            minv.neg_().diagonal().add_(1.0)  # B0 = I - rho M^{-1}
            self.b0 = self._stack_y(minv)
            del minv
        else:
            d = self.d
            k = d + 1 if self.affine else d
            kmat = torch.empty(k, k, dtype=torch.float64, device=self.x64.device)
            kmat[:d, :d] = self.gram_d * lz
            if self.affine:
                kmat[:d, d] = self.s * math.sqrt(lz * rho)
                kmat[d, :d] = kmat[:d, d]
                kmat[d, d] = rho * n
            kmat.diagonal().add_(rho)
            chol, info = torch.linalg.cholesky_ex(kmat)
            if int(info) != 0:
                raise FloatingPointError("SSC: the A-step system is not positive definite")
            self.kinv = torch.cholesky_inverse(chol)  # float64: see step_a

    def _stack_y(self, t: torch.Tensor) -> torch.Tensor:
        """``[t; Y t]`` in the working dtype when outliers are modelled, else ``t``."""
        if not self.outliers:
            return t.to(self.work, copy=True)  # never an alias: B0 is built from t in place
        out = torch.empty(self.n + self.d, t.shape[1], dtype=self.work, device=t.device)
        out[: self.n] = t
        out[self.n :] = self.x64.T @ t
        return out

    def _left_times_e(self, m: torch.Tensor, E: torch.Tensor) -> torch.Tensor:
        """``m @ E`` (``m`` is ``X`` or ``Y Y^T``); a sparse product when ``E`` is sparse."""
        if not (E.is_cuda or _SPARSE_E_ON_CPU):
            return torch.mm(m, E)
        nnz = int(torch.count_nonzero(E))
        if nnz >= _SPARSE_E_DENSITY * E.numel():
            return torch.mm(m, E)
        if not E.is_cuda:
            if nnz > E.shape[1]:
                # the gather below holds m.shape[0] x nnz values: keep it within the output
                return torch.mm(m, E)
            # column i of m @ E is sum_d m[:, d] E[d, i] over E's few non-zeros
            rows, cols = E.nonzero(as_tuple=True)
            out = torch.zeros(m.shape[0], E.shape[1], dtype=E.dtype, device=E.device)
            return out.index_add_(1, cols, m[:, rows] * E[rows, cols])
        key = id(m)
        if key not in self._mt:
            self._mt[key] = m.T.contiguous()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "sparse CSR is in beta"
            e_t = E.T.to_sparse_csr()  # N x D
            return torch.sparse.mm(e_t, self._mt[key]).T

    def step_a(self, C, lam, d1s, E, e_nonzero: bool, want_ya: bool = True):
        """Return ``(A, Y A)``; ``Y A`` only when outliers are modelled and ``want_ya``.

        ``d1s = Delta1 / rho``; ``E`` is skipped when ``e_nonzero`` is False.
        """
        lz, rho = self.lam_z, self.rho
        x, y = self.xw, self.yw
        t1 = torch.sub(C, lam)  # C - Lam
        if self.strategy == "dense":
            if e_nonzero:
                t1.sub_(self._left_times_e(x, E), alpha=lz / rho)
            n = self.n
            rows = self.rminv.shape[0] if want_ya else n  # with Y A, or A alone
            a = torch.addmm(self.b0[:rows], self.rminv[:rows], t1)
            del t1
            if self.affine:
                a.addr_(self.ru[:rows], d1s, alpha=-1.0)
            ya = a[n:] if self.outliers and want_ya else None
            return a[:n], ya
        # Woodbury: M^{-1} = (I - U K^{-1} U^T) / rho with U = [sqrt(lz) X, sqrt(rho) 1].
        # In float64: Y (C - Lam) nearly cancels Y, and float32 left the residual at ~1e-2.
        f64 = torch.float64
        d = self.d
        x, y = self.x64, self.x64.T
        t1 = t1.to(f64)
        d1s = d1s.to(f64) if self.affine else None
        E = E.to(f64) if e_nonzero else None
        yt1 = torch.mm(y, t1)  # Y (C - Lam), D x N
        yv = torch.sub(y, yt1)  # Y V / rho
        if self.affine:
            yv.addr_(self.s, d1s)
        if e_nonzero:
            yv.add_(self._left_times_e(self.gram_d, E), alpha=lz / rho)
        yv.mul_(math.sqrt(lz))
        if self.affine:
            ov = 1.0 - t1.sum(dim=0) + d1s * self.n  # 1^T V / rho
            if e_nonzero:
                ov.add_(self.s @ E, alpha=lz / rho)
            utv = torch.cat([yv, (ov * math.sqrt(rho)).unsqueeze(0)], dim=0)
        else:
            utv = yv
        zr = torch.mm(self.kinv, utv)  # K^{-1} U^T V / rho
        q = zr[:d].mul_(math.sqrt(lz))
        if e_nonzero:
            q.add_(E, alpha=-lz / rho)
        a = torch.addmm(t1, x, q)
        if self.affine:
            col = zr[d] * math.sqrt(rho) - d1s
            a.add_(col)
        ya = None
        if self.outliers and want_ya:
            ya = torch.addmm(yt1, self.gram_d, q)
            if self.affine:
                ya.addr_(self.s, col)
            ya = ya.to(self.work)
        a = a.to(self.work)
        return a, ya
