"""SSC with sparse outliers and an exact data constraint (Elhamifar & Vidal, TPAMI 2013).

The program of their face experiments (``admmOutlier_mat_func`` in the SSC-ADMM code),
with ``Y = X^T`` (``D x N``):

    min ||C||_1 + gamma ||E||_1    s.t.  Y = Y C + E,  diag(C) = 0  (and 1^T C = 1^T if affine)

VideoAnchor (METHOD.md section 2) replaces the constraint by a squared penalty; this
module is the constrained form, for users of SSC as a clustering method (it is what
reproduces the published Extended Yale B errors, ``benchmarks/bench_yaleb.py``).

Their ADMM, reproduced iterate for iterate: with ``P = [Y, I / gamma]`` and
``Z = [C; gamma E]`` (``(N + D) x N``),

    Z  = (mu1 P^T P + mu2 I)^{-1} (P^T (mu1 Y + L1) + mu2 C - L2),  diag(Z_C) = 0
    C  = soft(Z + L2 / mu2, 1 / mu2),                                diag(C_C) = 0
    L1 += mu1 (Y - P Z),   L2 += mu2 (Z - C)
    stop when max |Z - C| <= eps and max_i ||y_i - e_i - Y z_i|| / ||y_i - e_i|| <= eps

and, with the affine constraint, ``mu2 delta delta^T`` added to the system and
``mu2 delta (1 - lambda3 / mu2)^T`` to the right-hand side (``delta = [1_N; 0_D]``),
``lambda3 += mu2 (1^T Z_C - 1)``, and ``max |1^T Z_C - 1| <= eps`` added to the stop.

with ``gamma = alpha_e / max_j ||y_j||_1``, ``mu1 = alpha_z / min_i max(max_{j != i}
|y_j^T y_i|, max_d |Y_di| / gamma)`` and ``mu2 = rho`` (their code: ``mu2 = alpha``).

Their code inverts the ``(N + D) x (N + D)`` matrix. Here it is never formed: by
Woodbury, ``(mu1 P^T P + mu2 I)^{-1} = (I - P^T K^{-1} P) / mu2`` with the ``D x D``
matrix ``K = c I + Y Y^T``, ``c = mu2 / mu1 + 1 / gamma^2``; when ``D > N`` (faces:
``D = 2016``) ``K^{-1}`` is applied through the ``N x N`` matrix ``(c I + Y^T Y)^{-1}``.
One iteration costs ``5 D N^2 + 2 N^3`` multiply-adds (theirs: ``(N + D)^2 N``), in the
working dtype; the factorisation is float64. The affine term is a rank-one correction
(Sherman-Morrison) on top.
"""

from __future__ import annotations

import math
import time

import torch

from videoanchor.anchor._inputs import as_feature_tensor, check_memory, resolve_dtype
from videoanchor.anchor.ssc import (
    ADMMResult,
    _Progress,
    _sync,
    check_admm_parameters,
    gram_row_max,
)

__all__ = ["equality_parameters", "solve_ssc_equality"]


def equality_parameters(x: torch.Tensor, alpha_e: float, alpha_z: float) -> tuple[float, float]:
    """``(gamma, mu1)`` of the constrained program for points ``x`` (``N x D``, rows).

    ``gamma = alpha_e / max_j ||y_j||_1`` and ``mu1 = alpha_z / lambda`` with E&V's
    ``lambda = min_i max(max_{j != i} |y_j^T y_i|, max_d |Y_di| / gamma)`` (the columns
    of ``P^T Y``, ``P = [Y, I / gamma]``).
    """
    if x.shape[0] < 2:
        raise ValueError(f"SSC needs at least 2 points, got {x.shape[0]}")
    top = float(x.abs().sum(dim=1, dtype=torch.float64).max())
    if not top > 0:
        raise ValueError("SSC: every point is zero; gamma is undefined")
    gamma = alpha_e / top
    col = torch.maximum(gram_row_max(x), x.abs().amax(dim=1).to(torch.float64) / gamma)
    lam = float(col.min())
    if not lam > 0:
        raise ValueError("SSC: some point is zero and orthogonal to all others; mu1 undefined")
    return gamma, alpha_z / lam


def equality_bytes(n: int, d: int, itemsize: int) -> int:
    """Peak bytes of :func:`solve_ssc_equality` (working buffers plus the factorisation)."""
    small = min(n, d)
    return (5 * n * n + 9 * d * n) * itemsize + 3 * small * small * 8 + 2 * n * d * 8


def solve_ssc_equality(
    features,
    *,
    alpha_e: float = 20.0,
    alpha_z: float = 20.0,
    rho: float = 20.0,
    eps: float = 2e-4,
    max_iter: int = 10000,
    affine: bool = False,
    dtype=None,
    progress: bool = False,
    check_memory_first: bool = True,
    callback=None,
) -> ADMMResult:
    """Solve ``min ||C||_1 + gamma ||E||_1 s.t. Y = Y C + E, diag(C) = 0`` (module docstring).

    ``affine=True`` adds ``1^T C = 1^T`` (their ``affine`` argument).

    ``features`` is ``N x D`` (one row per point); work happens on its device. ``rho`` is
    the ADMM penalty ``mu2`` (E&V: equal to ``alpha``); their code runs at most 149
    iterations (``maxIter = 150``). Returns an :class:`ADMMResult` whose ``coef`` is ``C``,
    ``outliers`` is ``E`` (``D x N``), ``residual`` is the largest of the stopping rule's
    errors (``err1``, ``err2`` and, when affine, ``err3``), ``lambda_e = gamma`` and
    ``lambda_z = mu1``. ``callback(it, C, E)`` sees every iterate.
    """
    t0 = time.perf_counter()
    x = as_feature_tensor(features)
    device = x.device
    work = resolve_dtype(dtype, device)
    n, d = x.shape
    check_admm_parameters(n, rho, eps, max_iter)
    for name, v in (("alpha_e", alpha_e), ("alpha_z", alpha_z)):
        if not v > 0:
            raise ValueError(f"{name}: expected a positive number, got {v}")
    itemsize = torch.finfo(work).bits // 8
    if check_memory_first:
        check_memory(equality_bytes(n, d, itemsize), device, n=n, d=d, what="Constrained SSC")

    x64 = x.to(torch.float64)
    gamma, mu1 = equality_parameters(x64, alpha_e, alpha_z)
    mu2 = float(rho)
    _sync(device)
    t1 = time.perf_counter()

    # K = c I + Y Y^T (D x D); K^{-1} applied directly (D <= N) or through N-space.
    c = mu2 / mu1 + 1.0 / gamma**2
    n_space = d > n
    if n_space:
        g0 = x64 @ x64.T  # Y^T Y
        h = g0.clone()
        h.diagonal().add_(c)
        h = torch.cholesky_inverse(_cholesky(h))  # (c I + Y^T Y)^{-1}
        # Y^T K^{-1} = (I - Y^T Y H) Y^T / c: applied to Y^T (P R) it saves a D x N x N product.
        m = torch.eye(n, dtype=torch.float64, device=device).sub_(g0 @ h).div_(c)
        h_w, m_w = h.to(work), m.to(work)
        del g0, h, m
    else:
        k = x64.T @ x64
        k.diagonal().add_(c)
        kinv_w = torch.cholesky_inverse(_cholesky(k)).to(work)
        del k
    _sync(device)
    t2 = time.perf_counter()

    y = x.to(work).T  # D x N view
    yt = y.T
    zero = torch.zeros
    cc = zero(n, n, dtype=work, device=device)  # C block of C
    ce = zero(d, n, dtype=work, device=device)  # gamma E block
    l2c = zero(n, n, dtype=work, device=device)
    l2e = zero(d, n, dtype=work, device=device)
    l1 = zero(d, n, dtype=work, device=device)
    eye = torch.arange(n, device=device)
    bar = _Progress(progress, int(max_iter), eps, n)
    it, converged, residual = 0, False, math.inf
    inv_g, inv_mu2 = 1.0 / gamma, 1.0 / mu2

    def apply_a0(rc, re):
        """``(mu1 P^T P + mu2 I)^{-1} [rc; re]`` (overwrites ``rc`` and ``re``)."""
        pr = torch.addmm(re, y, rc, beta=inv_g)  # P R = Y R_C + R_E / g
        if n_space:
            ytpr = yt @ pr
            w = torch.addmm(pr, y, h_w @ ytpr, alpha=-1.0).div_(c)  # K^{-1} P R
            zc = rc.sub_(m_w @ ytpr).mul_(inv_mu2)  # (R_C - Y^T W) / mu2
        else:
            w = kinv_w @ pr
            zc = torch.addmm(rc, yt, w, alpha=-1.0).mul_(inv_mu2)
        return zc, re.sub_(w, alpha=inv_g).mul_(inv_mu2)  # (R_E - W / g) / mu2

    if affine:
        # The affine system adds mu2 delta delta^T (delta = [1_N; 0_D]): Sherman-Morrison
        # with u = A0 delta, so its inverse is A0 - s u u^T.
        uc, ue = apply_a0(
            torch.ones(n, 1, dtype=work, device=device), zero(d, 1, dtype=work, device=device)
        )
        uc, ue = uc.squeeze(1), ue.squeeze(1)
        s_aff = mu2 / (1.0 + mu2 * float(uc.sum()))
        lam3 = zero(n, dtype=work, device=device)
    try:
        for it in range(1, int(max_iter) + 1):
            b = torch.add(l1, y, alpha=mu1)  # mu1 Y + L1
            rc = torch.addmm(l2c, yt, b, beta=-1.0).add_(cc, alpha=mu2)  # Y^T B + mu2 C - L2
            re = torch.add(ce, b, alpha=inv_g / mu2).mul_(mu2).sub_(l2e)  # B/g + mu2 C - L2
            if affine:
                rc.add_(lam3.neg().add_(mu2))  # + mu2 delta (1 - lambda3 / mu2)^T
                utr = torch.addmv(uc @ rc, re.T, ue)  # u^T R
            zc, ze = apply_a0(rc, re)
            if affine:
                zc.addr_(uc, utr, alpha=-s_aff)
                ze.addr_(ue, utr, alpha=-s_aff)
            zc[eye, eye] = 0
            cc_new = _soft(zc + l2c * inv_mu2, inv_mu2)
            cc_new[eye, eye] = 0
            ce_new = _soft(ze + l2e * inv_mu2, inv_mu2)
            # r = Y - P Z = (Y - E) - Y Z_C; err2 normalises each column by ||y_i - e_i||
            y0 = torch.sub(y, ze, alpha=inv_g)
            r = torch.addmm(y0, y, zc, alpha=-1.0)
            l1.add_(r, alpha=mu1)
            if affine:
                colsum = zc.sum(dim=0).sub_(1.0)  # delta^T Z - 1
                lam3.add_(colsum, alpha=mu2)
                err3 = float(colsum.abs().max())
            dc, de = zc.sub_(cc_new), ze.sub_(ce_new)  # Z - C
            l2c.add_(dc, alpha=mu2)
            l2e.add_(de, alpha=mu2)
            err1 = max(float(dc.abs().max()), float(de.abs().max()))
            err2 = float((r.norm(dim=0) / y0.norm(dim=0).clamp_min(torch.finfo(work).tiny)).max())
            cc, ce = cc_new, ce_new
            if affine:
                err1 = max(err1, err3)  # their loop tests err3 against thr1 too
            residual = max(err1, err2)
            if not math.isfinite(residual):
                raise FloatingPointError(
                    f"constrained SSC diverged at iteration {it} (residual {residual}); "
                    "try dtype=torch.float64"
                )
            if callback is not None:
                callback(it, cc, ce * inv_g)
            stop = bar.update(it, residual)  # True when a time budget ran out
            if err1 <= eps and err2 <= eps:
                converged = True
                break
            if stop:
                break
    finally:
        bar.close(converged, it, residual)
    _sync(device)
    t3 = time.perf_counter()
    return ADMMResult(
        coef=cc,
        iterations=it,
        converged=converged,
        residual=residual,
        lambda_e=gamma,
        lambda_z=mu1,
        rho=mu2,
        strategy="n-space" if n_space else "d-space",
        outliers=ce * inv_g,
        timings={"lambdas": t1 - t0, "factor": t2 - t1, "admm": t3 - t2},
    )


def _cholesky(m: torch.Tensor) -> torch.Tensor:
    chol, info = torch.linalg.cholesky_ex(m)
    if int(info) != 0:
        raise FloatingPointError("constrained SSC: the Z-step system is not positive definite")
    return chol


def _soft(v: torch.Tensor, t: float) -> torch.Tensor:
    return v.sign().mul_(v.abs().sub_(t).clamp_(min=0))
