"""Scalable anchor scores for long videos: SSC restricted to each token's K best candidates.

The SSC program of docs/method.md section 2 separates over the columns of ``C``: column ``i``
is the solution of

    min ||c||_1 + lambda_e ||e||_1 + (lambda_z / 2) ||y_i - Y c - e||^2
    s.t.  1^T c = 1,  c_i = 0

coupled to the other columns only through the global ``lambda_e`` and ``lambda_z``. The
scalable mode keeps the same program and the same global lambdas, but gives column ``i``
only its ``K`` most correlated tokens (largest ``|y_i^T y_j|``, the atoms a lasso picks
first) as dictionary. When the exact column's support lies among them, the restricted
solution *is* the exact column. Each column is then a ``K``-variable problem: all of them
are solved together by a batched ADMM (one ``K x K`` factorisation per column, over-
relaxation, per-column residual balancing). After each solve, the optimality (KKT)
condition of the full problem is checked for every token outside the candidates
(``|lambda_z y_j^T r_i - Delta1_i| <= 1``, one blocked pass over all pairs); violators
replace unused candidates and the columns are re-solved from the previous solution
(``refine`` rounds, ``round_iter`` ADMM iterations each).

Limitation (measured, benchmarks/results/scalable_*.json): with the authors' alpha = 800
the exact columns have hundreds of non-zeros, far more than ``K``, so on our synthetic
tokens the scores agree with the exact mode only loosely. This mode bounds memory and
time; it is not a substitute for the exact mode where that fits.

Nothing here allocates ``O(N^2)``: the candidates come from a blocked pass over the Gram
matrix (``block x N`` at a time), ``C`` is stored as ``N x K`` (indices, values), the row
sums of the score are a scatter-add, and spectral clustering runs on the sparse affinity
``|C| + |C|^T`` (``<= 2 N K`` non-zeros) with the block subspace iteration.
"""

from __future__ import annotations

import math
import time
import warnings

import torch

from videoanchor.anchor._inputs import as_feature_tensor, resolve_dtype
from videoanchor.anchor.spectral import _top_eigvecs_subspace, labels_from_embedding

__all__ = ["knn_candidates", "solve_ssc_restricted", "sparse_spectral_clustering"]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def knn_candidates(x: torch.Tensor, k: int, *, block: int = 2048):
    """The ``k`` tokens with the largest ``|y_i^T y_j|`` (``j != i``) for every token ``i``.

    Returns ``(idx, inner, mu_z)``: ``idx`` (N, k) int64, ``inner`` (N, k) the signed
    ``y_i^T y_{idx}`` in float64 (recomputed exactly for the chosen pairs), and
    ``mu_z = min_i max_{j != i} |y_i^T y_j|``. Memory: ``block x N`` at a time. On CUDA
    the selection pass may use TF32 (it only ranks); the returned values do not.
    """
    n = x.shape[0]
    idx = torch.empty(n, k, dtype=torch.long, device=x.device)
    ar = torch.arange(n, device=x.device)
    prev = torch.backends.cuda.matmul.allow_tf32
    try:
        if x.is_cuda and x.dtype == torch.float32:
            torch.backends.cuda.matmul.allow_tf32 = True
        for a in range(0, n, block):
            b = min(n, a + block)
            g = (x[a:b] @ x.T).abs_()
            g[ar[: b - a], ar[a:b]] = -1.0  # never its own candidate
            idx[a:b] = torch.topk(g, k, dim=1, sorted=True).indices
            del g
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev
    inner = _inner(x, idx, block)
    mu_z = float(inner.abs().amax(dim=1).min())
    return idx, inner, mu_z


def solve_ssc_restricted(
    x: torch.Tensor,
    idx: torch.Tensor,
    inner: torch.Tensor,
    lam_e: float,
    lam_z: float,
    *,
    rho: float = 300.0,
    eps: float = 2e-4,
    max_iter: int = 10000,
    affine: bool = True,
    outliers: bool = True,
    relax: float = 1.8,
    adaptive_rho: bool = True,
    batch: int = 8192,
    work: torch.dtype = torch.float32,
    warm: dict | None = None,
    want_residual: bool = False,
):
    """Solve every column's SSC problem over its candidates ``idx`` (batched ADMM).

    Returns ``(values, iterations, converged, extra)`` with ``values`` (N, K) float64:
    column ``i`` of ``C`` has ``values[i, k]`` in row ``idx[i, k]``. ``extra`` holds the
    affine multipliers ``delta1`` (N,), the outliers ``e`` (N, D) and, with
    ``want_residual``, the residuals ``y_i - Y c_i - e_i`` as rows (N, D). ``warm``
    (``c``, ``lam`` aligned with ``idx``, ``d1``, ``e``, ``rho``) starts from a previous
    solution. The K-space work (systems, duals) is float64; D-space products ``work``.
    """
    n, k = idx.shape
    values = torch.empty(n, k, dtype=torch.float64, device=x.device)
    d1_all = torch.empty(n, dtype=torch.float64, device=x.device)
    rho_all = torch.empty(n, dtype=torch.float64, device=x.device)
    lam_all = torch.empty(n, k, dtype=torch.float64, device=x.device)
    e_all = torch.zeros(n, x.shape[1], dtype=work, device=x.device) if outliers else None
    res_all = torch.empty(n, x.shape[1], dtype=work, device=x.device) if want_residual else None
    max_it, all_ok = 0, True
    for a in range(0, n, batch):
        b = min(n, a + batch)
        w = None if warm is None else {key: v[a:b] for key, v in warm.items() if v is not None}
        out = _solve_batch(
            x, a, b, idx[a:b], inner[a:b], lam_e, lam_z, rho, eps, max_iter, affine,
            outliers, relax, adaptive_rho, work, w,
        )  # fmt: skip
        values[a:b], d1_all[a:b], rho_all[a:b], lam_all[a:b] = (
            out["c"],
            out["d1"],
            out["rho"],
            out["lam"],
        )
        if outliers:
            e_all[a:b] = out["e"]
        if want_residual:
            res_all[a:b] = out["residual"]
        max_it, all_ok = max(max_it, out["iterations"]), all_ok and out["converged"]
    extra = {"d1": d1_all, "e": e_all, "residual": res_all, "rho": rho_all, "lam": lam_all}
    return values, max_it, all_ok, extra


def _factor(gk: torch.Tensor, lam_z: float, rho: torch.Tensor, affine: bool) -> torch.Tensor:
    """``(lambda_z G + rho I + rho 1 1^T)^{-1}`` for a batch (``B x K x K``, float64)."""
    m = gk * lam_z
    m.diagonal(dim1=1, dim2=2).add_(rho[:, None])
    if affine:
        m.add_(rho[:, None, None])
    chol, info = torch.linalg.cholesky_ex(m)
    if bool((info != 0).any()):
        raise FloatingPointError("scalable SSC: a column system is not positive definite")
    return torch.cholesky_inverse(chol)


def _solve_batch(
    x, a, b, idx, inner, lam_e, lam_z, rho0, eps, max_iter, affine, outliers, relax,
    adaptive, work, warm,
):  # fmt: skip
    nb, k = idx.shape
    dev = x.device
    f64 = torch.float64
    yk = x[idx].to(work)  # (B, K, D): the candidates of each column, as rows
    y = x[a:b].to(work)  # (B, D)
    gk = torch.bmm(yk, yk.transpose(1, 2)).to(f64)  # (B, K, K)
    if warm is not None:
        rho = warm["rho"].clone()
        c = warm["c"].clone()
        lam = warm["lam"].clone()
        d1 = warm["d1"].clone()
        e = warm["e"].to(work).clone() if outliers else torch.zeros_like(y)
    else:
        rho = torch.full((nb,), float(rho0), dtype=f64, device=dev)
        c = torch.zeros(nb, k, dtype=f64, device=dev)
        lam = torch.zeros(nb, k, dtype=f64, device=dev)  # Delta2 / rho
        d1 = torch.zeros(nb, dtype=f64, device=dev)  # Delta1 / rho
        e = torch.zeros_like(y)
    minv = _factor(gk, lam_z, rho, affine)
    thr = lam_e / lam_z
    yte = torch.bmm(yk, e.unsqueeze(2)).squeeze(2).to(f64)  # Y_K^T e
    it, converged, last_change = 0, False, 0
    for it in range(1, max_iter + 1):
        rhs = (inner - yte) * (lam_z / rho[:, None]) + (c - lam)
        if affine:
            rhs += (1.0 - d1)[:, None]
        a_k = torch.bmm(minv, rhs.unsqueeze(2)).squeeze(2) * rho[:, None]
        if outliers:
            r = y - torch.bmm(a_k.to(work).unsqueeze(1), yk).squeeze(1)
            e = torch.sign(r) * (r.abs() - thr).clamp_min(0)
            yte = torch.bmm(yk, e.unsqueeze(2)).squeeze(2).to(f64)
        if affine:
            d1 += a_k.sum(dim=1) - 1.0
        c_old = c
        a_hat = relax * a_k + (1.0 - relax) * c_old
        t = a_hat + lam
        inv_rho = (1.0 / rho)[:, None]
        lam_new = torch.maximum(torch.minimum(t, inv_rho), -inv_rho)
        c = t - lam_new
        primal = (a_k - c).abs().sum(dim=1)
        dual = (c - c_old).abs().sum(dim=1)
        lam = lam_new
        worst = float(torch.maximum(primal, dual).max())
        if not math.isfinite(worst):
            raise FloatingPointError(f"scalable SSC diverged at iteration {it}")
        if worst < eps:
            converged = True
            break
        if adaptive and it - last_change >= 10 and it <= 400:
            # per-column residual balancing on relative residuals
            r_rel = (a_k - c).norm(dim=1) / c.norm(dim=1).clamp_min(1e-30)
            s_rel = (c - c_old).norm(dim=1) / lam.norm(dim=1).clamp_min(1e-30)
            q = r_rel / s_rel.clamp_min(1e-30)
            factor = torch.ones_like(q)
            up, down = q > 3.0, q < 1.0 / 3.0
            factor[up] = q[up].sqrt().clamp(max=10.0)
            factor[down] = 1.0 / (1.0 / q[down]).sqrt().clamp(max=10.0)
            if bool((factor != 1.0).any()):
                lam /= factor[:, None]
                d1 /= factor
                rho *= factor
                minv = _factor(gk, lam_z, rho, affine)
                last_change = it
    out = {"c": c, "lam": lam, "d1": d1, "rho": rho, "e": e, "iterations": it}
    out["converged"] = converged
    residual = y - torch.bmm(c.to(work).unsqueeze(1), yk).squeeze(1)
    if outliers:
        residual = residual - e
    out["residual"] = residual
    return out


def kkt_violators(x, residual, d1s, rho, idx, lam_z, n_new, *, block=2048):
    """Atoms outside each column's candidates that violate the full problem's optimality.

    For column ``i`` with residual ``r_i`` and affine multiplier ``Delta1_i``, atom ``j``
    with ``c_ij = 0`` is optimal iff ``|lambda_z y_j^T r_i - Delta1_i| <= 1``. Returns
    ``(viol_idx, viol_val)``: the ``n_new`` largest violations per column (N, n_new)
    (``viol_val <= 0`` where there is none) and the worst violation overall.
    """
    n = x.shape[0]
    ar = torch.arange(n, device=x.device)
    out_idx = torch.empty(n, n_new, dtype=torch.long, device=x.device)
    out_val = torch.empty(n, n_new, dtype=torch.float64, device=x.device)
    delta1 = (d1s * rho).to(residual.dtype)
    for a in range(0, n, block):
        b = min(n, a + block)
        v = (residual[a:b] @ x.T.to(residual.dtype)).mul_(lam_z).sub_(delta1[a:b, None])
        v = v.abs_().sub_(1.0)
        v[ar[: b - a], ar[a:b]] = -1.0  # not its own atom
        v.scatter_(1, idx[a:b], -1.0)  # already candidates
        top = torch.topk(v, n_new, dim=1)
        out_idx[a:b], out_val[a:b] = top.indices, top.values.to(torch.float64)
    return out_idx, out_val


def _inner(x: torch.Tensor, idx: torch.Tensor, block: int = 2048) -> torch.Tensor:
    """``y_i^T y_{idx[i, k]}`` in float64."""
    n = x.shape[0]
    x64 = x.to(torch.float64)
    inner = torch.empty(idx.shape, dtype=torch.float64, device=x.device)
    for a in range(0, n, block):
        b = min(n, a + block)
        inner[a:b] = torch.einsum("bd,bkd->bk", x64[a:b], x64[idx[a:b]])
    return inner


def _refresh_candidates(idx, values, extra, vidx, vval, tol):
    """Keep each column's support, add its KKT violators, fill with the old candidates.

    Returns the new ``(idx, values, warm)`` with the warm start aligned to it.
    """
    n, k = idx.shape
    pos = torch.arange(k, device=idx.device, dtype=torch.float64)
    key_old = torch.where(values != 0, 3.0 + values.abs(), 1.0 - pos / k)
    key_new = torch.where(vval > tol, 2.0 + torch.tanh(vval), torch.full_like(vval, -1.0))
    keys = torch.cat([key_old, key_new], dim=1)
    pool = torch.cat([idx, vidx], dim=1)
    sel = torch.topk(keys, k, dim=1).indices
    new_idx = torch.gather(pool, 1, sel)
    pad = torch.zeros(n, vidx.shape[1], dtype=torch.float64, device=idx.device)
    new_values = torch.gather(torch.cat([values, pad], dim=1), 1, sel)
    new_lam = torch.gather(torch.cat([extra["lam"], pad], dim=1), 1, sel)
    warm = {
        "c": new_values,
        "lam": new_lam,
        "d1": extra["d1"],
        "rho": extra["rho"],
        "e": extra["e"],
    }
    return new_idx, new_values, warm


def _sparse_affinity(idx: torch.Tensor, values: torch.Tensor, n: int) -> torch.Tensor:
    """``W = |C| + |C|^T`` as a coalesced sparse COO tensor (float64)."""
    rows = idx.reshape(-1)
    cols = torch.arange(n, device=idx.device).repeat_interleave(idx.shape[1])
    v = values.reshape(-1).abs()
    keep = v > 0
    rows, cols, v = rows[keep], cols[keep], v[keep]
    ii = torch.cat([rows, cols])
    jj = torch.cat([cols, rows])
    return torch.sparse_coo_tensor(
        torch.stack([ii, jj]), torch.cat([v, v]), (n, n), check_invariants=False
    ).coalesce()


def sparse_spectral_labels(
    w: torch.Tensor,
    n_clusters: int,
    *,
    seed: int = 0,
    assign_labels: str = "discretize",
    draws: int = 1,
) -> torch.Tensor:
    """``(draws, N)`` labels of a sparse symmetric affinity (COO), without densifying it:
    one embedding, ``draws`` label assignments (``spectral.labels_from_embedding``)."""
    n = w.shape[0]
    if n_clusters == 1:
        return torch.zeros(draws, n, dtype=torch.long, device=w.device)
    ind, val = w.indices(), w.values()
    deg = torch.zeros(n, dtype=val.dtype, device=w.device).index_add_(0, ind[0], val)
    dd = torch.where(deg > 0, deg.sqrt(), torch.ones_like(deg))
    s_val = val / dd[ind[0]] / dd[ind[1]]
    offdiag = ind[0] != ind[1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # sparse CSR is "beta"
        s = torch.sparse_coo_tensor(
            ind[:, offdiag], s_val[offdiag], (n, n), check_invariants=False
        ).to_sparse_csr()
        if n < 4 * (n_clusters + 8):
            _, v = torch.linalg.eigh(s.to_dense())
            vecs = v[:, -n_clusters:].flip(1)
        else:
            gen = torch.Generator().manual_seed(int(seed))
            _, vecs, _, _ = _top_eigvecs_subspace(s, n_clusters, gen, 1e-7, 200)
    emb = vecs / dd[:, None]
    return labels_from_embedding(
        emb, n_clusters, seed=seed, assign_labels=assign_labels, draws=draws
    )


def sparse_spectral_clustering(
    w: torch.Tensor, n_clusters: int, *, seed: int = 0, assign_labels: str = "discretize"
) -> torch.Tensor:
    """Spectral clustering of a sparse symmetric affinity (COO), without densifying it."""
    return sparse_spectral_labels(w, n_clusters, seed=seed, assign_labels=assign_labels)[0]


# Row sums of C that agree to this relative tolerance are "flat": within what the ADMM's
# stopping rule (eps = 2e-4 per column) leaves, measured at 1e-6 for identical tokens and
# 1e-3 for tokens that differ by 1e-3 of their norm (docs/validation.md).
FLAT_ROW_SUM_RTOL = 1e-3


def scores_from_row_sums(r: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """docs/method.md section 3 from the row sums ``r`` of ``C`` and the labels (float32).

    Degenerate case: when the row sums agree within ``FLAT_ROW_SUM_RTOL`` of their size
    (identical or near-identical tokens), every score is 0 and a warning says so, instead
    of min-max normalisation stretching the solver's noise over [0, 1).

    ``labels`` (N,) or (draws, N): with several draws, ``pi_j`` is token ``j``'s cluster
    share averaged over them."""
    n = r.numel()
    lab = labels.reshape(-1, n)
    r64 = r.to(torch.float64)
    if n > 1 and float(r64.max() - r64.min()) <= FLAT_ROW_SUM_RTOL * float(r64.abs().max()):
        # Identical (or near-identical) tokens: the row sums agree within the solver's
        # tolerance, so min-max normalisation would stretch solver noise over [0, 1).
        warnings.warn(
            f"videoanchor: the {n} tokens' SSC row sums agree to within "
            f"{FLAT_ROW_SUM_RTOL:g} of their size (identical or near-identical tokens, e.g. "
            "a static or blank video); no token stands out, so every anchor score is 0 "
            "(unanchored)",
            stacklevel=3,
        )
        return torch.zeros(n, dtype=torch.float32, device=r.device)
    pi = torch.stack([torch.bincount(row)[row] for row in lab]).to(torch.float64).mean(0) / n
    s_hat = pi * r64
    lo, hi = s_hat.min(), s_hat.max()
    s = ((s_hat - lo) / (hi - lo + 1e-5)).to(torch.float32)
    below_one = torch.nextafter(torch.tensor(1.0), torch.tensor(0.0)).item()
    return s.clamp_(0.0, below_one)


def scalable_anchor_scores(
    features,
    n_clusters: int,
    *,
    alpha_e: float,
    alpha_z: float,
    rho: float,
    eps: float,
    max_iter: int,
    seed: int,
    dtype,
    candidates: int = 32,
    label_draws: int = 1,
    affine: bool = True,
    outliers: bool = True,
    refine: int = 3,
    kkt_tol: float = 1e-3,
    round_iter: int = 500,
) -> dict:
    """The scalable pipeline; returns the fields of an ``AnchorResult`` as a dict."""
    t0 = time.perf_counter()
    x = as_feature_tensor(features)
    work = resolve_dtype(dtype, x.device)
    n = x.shape[0]
    k = min(int(candidates), n - 1)
    if k < 1:
        raise ValueError(f"candidates: expected at least 1, got {candidates}")
    xw = x.to(work)
    norms = x.abs().sum(dim=1, dtype=torch.float64)
    mu_e = float(torch.topk(norms, 2).values[1])
    idx, inner, mu_z = knn_candidates(xw, k)
    if not (mu_e > 0 and mu_z > 0):
        raise ValueError("SSC: lambdas undefined (all-zero or mutually orthogonal tokens)")
    lam_e, lam_z = alpha_e / mu_e, alpha_z / mu_z
    _sync(x.device)
    t1 = time.perf_counter()
    warm, rounds, worst, iterations, converged = None, 0, float("nan"), 0, True
    n_new = max(1, k // 4)
    for rounds in range(refine + 1):
        values, its, ok, extra = solve_ssc_restricted(
            xw, idx, inner, lam_e, lam_z, rho=rho, eps=eps, max_iter=min(max_iter, round_iter),
            affine=affine,
            outliers=outliers, work=work, warm=warm, want_residual=rounds < refine,
        )  # fmt: skip
        iterations += its
        converged = ok
        if rounds == refine:
            break
        vidx, vval = kkt_violators(
            xw, extra["residual"], extra["d1"], extra["rho"], idx, lam_z, n_new
        )
        worst = float(vval.max())
        if worst <= kkt_tol:
            break
        idx, values, warm = _refresh_candidates(idx, values, extra, vidx, vval, kkt_tol)
        inner = _inner(xw, idx)
    _sync(x.device)
    t2 = time.perf_counter()
    w = _sparse_affinity(idx, values, n)
    draws = sparse_spectral_labels(w, n_clusters, seed=seed, draws=label_draws)
    labels = draws[0]
    _sync(x.device)
    t3 = time.perf_counter()
    r = torch.zeros(n, dtype=torch.float64, device=x.device).index_add_(
        0, idx.reshape(-1), values.reshape(-1)
    )
    scores = scores_from_row_sums(r, draws)
    cols = torch.arange(n, device=x.device).repeat_interleave(k)
    coef = torch.sparse_coo_tensor(
        torch.stack([idx.reshape(-1), cols]),
        values.reshape(-1).to(work),
        (n, n),
        check_invariants=False,
    ).coalesce()
    _sync(x.device)
    t4 = time.perf_counter()
    return {
        "scores": scores,
        "labels": labels,
        "coef": coef,
        "iterations": iterations,
        "converged": converged,
        "residual": worst,
        "lambda_e": lam_e,
        "lambda_z": lam_z,
        "timings": {
            "lambdas": t1 - t0,
            "factor": 0.0,
            "admm": t2 - t1,
            "spectral": t3 - t2,
            "scores": t4 - t3,
            "total": t4 - t0,
        },
    }
