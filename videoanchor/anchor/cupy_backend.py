"""The SSC-ADMM of :mod:`videoanchor.anchor.ssc` on CuPy arrays (``backend="cupy"``).

The features come in through DLPack (no copy, no host round trip) and ``C`` goes back
the same way as a torch tensor on the same GPU. The code is written against an array
module ``xp``; with ``xp=numpy`` it runs on the CPU, which is how the CPU test suite
checks it against the torch solver. On CuPy the soft-threshold / dual update is one
fused element-wise kernel.
"""

from __future__ import annotations

import math
import time

import torch

from videoanchor.anchor._inputs import as_feature_tensor, check_memory, resolve_dtype
from videoanchor.anchor.ssc import _ADAPT, ADMMResult, admm_bytes, choose_strategy

__all__ = ["solve_ssc_admm_cupy"]

_FUSED = None


def _fused_kernel(cp):
    """T -> (Lam_new = clip(T, +-1/rho) off the diagonal, T on it; C = T - Lam_new;
    |Lam_old - Lam_new|) in one pass."""
    global _FUSED
    if _FUSED is None:
        _FUSED = cp.ElementwiseKernel(
            "T t, T lam_old, T inv_rho, int64 n",
            "T lam_new, T c, T absdiff",
            """
            const long long row = i / n;
            const long long col = i % n;
            T l = t;
            if (row != col) { l = t > inv_rho ? inv_rho : (t < -inv_rho ? -inv_rho : t); }
            lam_new = l;
            c = t - l;
            absdiff = fabs(lam_old - l);
            """,
            "videoanchor_ssc_dual_update",
        )
    return _FUSED


def _lambdas(xp, x, alpha_e, alpha_z, block=4096):
    n = x.shape[0]
    norms = xp.abs(x).sum(axis=1, dtype=xp.float64)
    mu_e = float(xp.sort(norms)[-2])
    row_max = xp.empty(n, dtype=xp.float64)
    for a in range(0, n, block):
        b = min(n, a + block)
        g = xp.abs(x[a:b] @ x.T)
        g[xp.arange(b - a), xp.arange(a, b)] = 0
        row_max[a:b] = g.max(axis=1)
    mu_z = float(row_max.min())
    if not (mu_e > 0):
        raise ValueError("SSC: at most one point is non-zero (mu_e = 0); lambda_e is undefined")
    if not (mu_z > 0):
        raise ValueError(
            "SSC: some point is orthogonal to every other point (mu_z = 0); lambda_z is undefined"
        )
    return alpha_e / mu_e, alpha_z / mu_z


class _XpSolver:
    """The A-step of :class:`videoanchor.anchor.ssc._Solver` for an array module."""

    def __init__(self, xp, x64, xw, lam_z, rho, affine, outliers, strategy):
        self.xp, self.x64, self.xw, self.yw = xp, x64, xw, xw.T
        self.lam_z, self.affine, self.outliers, self.strategy = lam_z, affine, outliers, strategy
        self.n, self.d = x64.shape
        if strategy == "dense":
            self.gram = x64 @ x64.T
        else:
            self.gram_d = x64.T @ x64
            self.s = x64.sum(axis=0)
        self.refactor(rho)

    def _spd_inverse(self, m):
        xp = self.xp
        try:
            xp.linalg.cholesky(m)
        except Exception as exc:  # numpy LinAlgError / cupy's
            raise FloatingPointError("SSC: the A-step system is not positive definite") from exc
        inv = xp.linalg.inv(m)
        return (inv + inv.T) / 2

    def refactor(self, rho):
        xp, n, lz, work = self.xp, self.n, self.lam_z, self.xw.dtype
        self.rho = rho
        if self.strategy == "dense":
            m = self.gram * lz + rho * xp.eye(n)
            if self.affine:
                m += rho
            minv = self._spd_inverse(m) * rho
            self.rminv = minv.astype(work)
            if self.affine:
                self.ru = minv.sum(axis=1).astype(work)
            self.b0 = (xp.eye(n) - minv).astype(work)
        else:
            d = self.d
            k = d + 1 if self.affine else d
            kmat = xp.zeros((k, k), dtype=xp.float64)
            kmat[:d, :d] = self.gram_d * lz
            if self.affine:
                kmat[:d, d] = self.s * math.sqrt(lz * rho)
                kmat[d, :d] = kmat[:d, d]
                kmat[d, d] = rho * n
            kmat += rho * xp.eye(k)
            self.kinv = self._spd_inverse(kmat)  # float64, as in the torch solver

    def step_a(self, C, lam, d1s, E, e_nonzero):
        lz, rho, x, y = self.lam_z, self.rho, self.xw, self.yw
        t1 = C - lam
        if self.strategy == "dense":
            if e_nonzero:
                t1 -= (lz / rho) * (x @ E)
            a = self.b0 + self.rminv @ t1
            if self.affine:
                a -= self.ru[:, None] * d1s[None, :]
            return a, (y @ a if self.outliers else None)
        # Woodbury in float64 (see videoanchor.anchor.ssc._Solver.step_a)
        d, work = self.d, self.xw.dtype
        x, y = self.x64, self.x64.T
        t1 = t1.astype(self.xp.float64)
        if self.affine:
            d1s = d1s.astype(self.xp.float64)
        if e_nonzero:
            E = E.astype(self.xp.float64)
        yt1 = y @ t1
        yv = y - yt1
        if self.affine:
            yv += self.s[:, None] * d1s[None, :]
        if e_nonzero:
            yv += (lz / rho) * (self.gram_d @ E)
        yv *= math.sqrt(lz)
        if self.affine:
            ov = 1.0 - t1.sum(axis=0) + d1s * self.n
            if e_nonzero:
                ov += (lz / rho) * (self.s @ E)
            utv = self.xp.concatenate([yv, (ov * math.sqrt(rho))[None, :]], axis=0)
        else:
            utv = yv
        zr = self.kinv @ utv
        q = zr[:d] * math.sqrt(lz)
        if e_nonzero:
            q -= (lz / rho) * E
        a = t1 + x @ q
        col = None
        if self.affine:
            col = zr[d] * math.sqrt(rho) - d1s
            a += col[None, :]
        ya = None
        if self.outliers:
            ya = yt1 + self.gram_d @ q
            if self.affine:
                ya += self.s[:, None] * col[None, :]
            ya = ya.astype(work)
        a = a.astype(work)
        return a, ya


def solve_ssc_admm_cupy(
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
    progress: bool = False,
    xp=None,
) -> ADMMResult:
    """Same contract as :func:`videoanchor.anchor.ssc.solve_ssc_admm`, computed with CuPy.

    ``features`` must be a CUDA tensor (or a CuPy array) unless ``xp`` is given; ``coef``
    comes back as a torch tensor on the same device.
    """
    from videoanchor.anchor.ssc import _Progress, _sync

    t0 = time.perf_counter()
    x_t = as_feature_tensor(features)
    if xp is None:
        try:
            import cupy as xp
        except ImportError as exc:
            raise ImportError(
                "backend='cupy' needs CuPy (pip install cupy-cuda12x or cupy-cuda13x); "
                "backend='torch' computes the same result"
            ) from exc
        if x_t.device.type != "cuda":
            raise ValueError(
                f"backend='cupy' expected features on a CUDA device, got {x_t.device}; "
                "use backend='torch' on the CPU"
            )
    work_t = resolve_dtype(dtype, x_t.device)
    n, d = x_t.shape
    if strategy == "auto":
        strategy = choose_strategy(n, d, outliers, "cuda" if xp.__name__ == "cupy" else "cpu")
    itemsize = torch.finfo(work_t).bits // 8
    check_memory(admm_bytes(n, d, itemsize, strategy), x_t.device, n=n, d=d, what="Dense SSC")
    is_cupy = xp.__name__ == "cupy"
    if is_cupy:
        dev = xp.cuda.Device(x_t.device.index if x_t.device.index is not None else 0)
        dev.use()
    x_xp = xp.from_dlpack(x_t.contiguous())
    work = xp.float32 if work_t == torch.float32 else xp.float64
    x64 = x_xp.astype(xp.float64)
    xw = x_xp.astype(work)
    lam_e, lam_z = _lambdas(xp, xw if work == xp.float64 else x64, alpha_e, alpha_z)
    thr_e = lam_e / lam_z
    _sync(x_t.device)
    t1 = time.perf_counter()
    solver = _XpSolver(xp, x64, xw, lam_z, rho, affine, outliers, strategy)
    _sync(x_t.device)
    t2 = time.perf_counter()

    C = xp.zeros((n, n), dtype=work)
    lam = xp.zeros((n, n), dtype=work)
    d1s = xp.zeros(n, dtype=work) if affine else None
    E = xp.zeros((d, n), dtype=work) if outliers else None
    e_nonzero = False
    diag = xp.arange(n)
    rho_k = float(rho)
    accelerate = relax != 1.0 or adaptive_rho
    bar = _Progress(progress, int(max_iter), eps, n)
    residual, converged, it = math.inf, False, 0
    last_change, n_changes = 0, 0
    try:
        for it in range(1, int(max_iter) + 1):
            A, YA = solver.step_a(C, lam, d1s, E, e_nonzero)
            if outliers:
                r = solver.yw - YA
                E = xp.sign(r) * xp.maximum(xp.abs(r) - thr_e, 0)
                e_nonzero = bool(E.any())
            if affine:
                d1s = d1s + (A.sum(axis=0) - 1.0)
            c_old = C
            if relax != 1.0:
                A = relax * A + (1.0 - relax) * C
            t = A + lam
            if is_cupy:
                lam_new, C, absdiff = _fused_kernel(xp)(t, lam, work(1.0 / rho_k), n)
            else:
                lam_new = xp.clip(t, -1.0 / rho_k, 1.0 / rho_k)
                lam_new[diag, diag] = t[diag, diag]
                C = t - lam_new
                absdiff = xp.abs(lam - lam_new)
            primal = float(absdiff.sum(axis=1).max())
            fro_primal = float(xp.linalg.norm(absdiff)) if adaptive_rho else 0.0
            lam = lam_new
            if accelerate:
                dc = xp.abs(c_old - C)
                dual = float(dc.sum(axis=1).max())
                fro_dual = float(xp.linalg.norm(dc)) if adaptive_rho else 0.0
                residual = max(primal, dual)
            else:
                residual = primal
            if not math.isfinite(residual):
                raise FloatingPointError(
                    f"SSC-ADMM diverged at iteration {it} (residual {residual}); "
                    "try dtype=torch.float64 or a larger rho"
                )
            stop = bar.update(it, residual)  # True when a time budget ran out
            if residual < eps:
                converged = True
                break
            if stop:
                break
            if (
                adaptive_rho
                and it - last_change >= _ADAPT["every"]
                and n_changes < _ADAPT["max_changes"]
            ):
                r_rel = fro_primal / max(float(xp.linalg.norm(C)), 1e-30)
                s_rel = fro_dual / max(float(xp.linalg.norm(lam)), 1e-30)
                q = r_rel / max(s_rel, 1e-30)
                factor = 1.0
                if q > _ADAPT["mu"]:
                    factor = min(math.sqrt(q / _ADAPT["xi"]), _ADAPT["tau"])
                elif q < 1.0 / _ADAPT["mu"]:
                    factor = 1.0 / min(math.sqrt(_ADAPT["xi"] / q), _ADAPT["tau"])
                if factor != 1.0:
                    lam = lam / factor
                    if affine:
                        d1s = d1s / factor
                    rho_k *= factor
                    solver.refactor(rho_k)
                    last_change = it
                    n_changes += 1
    finally:
        bar.close(converged, it, residual)
    _sync(x_t.device)
    t3 = time.perf_counter()
    coef = torch.from_dlpack(C)
    e_t = torch.from_dlpack(E) if outliers else None
    return ADMMResult(
        coef=coef,
        iterations=it,
        converged=converged,
        residual=residual,
        lambda_e=lam_e,
        lambda_z=lam_z,
        rho=rho_k,
        strategy=strategy,
        outliers=e_t,
        timings={"lambdas": t1 - t0, "factor": t2 - t1, "admm": t3 - t2},
    )
