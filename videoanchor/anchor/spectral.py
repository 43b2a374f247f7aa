"""Spectral clustering of an SSC affinity, in torch, on any device.

Normalised spectral clustering (Shi & Malik / Ng, Jordan & Weiss):

1. affinity ``W`` (symmetric, non-negative), degrees ``d = W 1``;
2. the ``k`` leading eigenvectors of ``S = D^{-1/2} W D^{-1/2}`` (the ``k`` smallest of the
   normalised Laplacian ``I - S``), by dense ``eigh`` for small ``N`` or by
   Chebyshev-filtered block subspace iteration with Rayleigh-Ritz (``O(N^2 k)`` per
   iteration, no ``O(N^3)`` step) for large ``N``;
3. labels by the Yu & Shi discretisation that scikit-learn's
   ``SpectralClustering(assign_labels="discretize")`` uses (a port of its algorithm), or
   by seeded k-means++ / Lloyd on the row-normalised embedding.

All randomness comes from a CPU ``torch.Generator`` seeded with ``seed``, so the same
input and seed give the same labels on every device (up to floating-point ties).
"""

from __future__ import annotations

import math

import numpy as np
import torch

__all__ = ["ssc_affinity", "spectral_embedding", "discretize", "kmeans", "spectral_clustering"]


def ssc_affinity(coef: torch.Tensor, *, normalize: str = "none") -> torch.Tensor:
    """``W = |C| + |C|^T`` (METHOD.md). ``normalize="column_max"`` first divides each
    column of ``|C|`` by its largest entry (Elhamifar & Vidal's ``BuildAdjacency``)."""
    if coef.dim() != 2 or coef.shape[0] != coef.shape[1]:
        raise ValueError(f"coef: expected a square (N, N) matrix, got shape {tuple(coef.shape)}")
    a = coef.abs()
    if normalize == "column_max":
        a = a / (a.amax(dim=0, keepdim=True) + torch.finfo(a.dtype).eps)
    elif normalize != "none":
        raise ValueError(f"normalize: expected 'none' or 'column_max', got {normalize!r}")
    return a + a.T


def _normalized_affinity(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    deg = w.sum(dim=1)
    dd = torch.where(deg > 0, deg.sqrt(), torch.ones_like(deg))
    s = w / dd[:, None] / dd[None, :]
    s.diagonal().zero_()  # the Laplacian's diagonal is 1, as in scikit-learn
    return s, dd


def _rayleigh_ritz(s: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    h = (x.T @ (s @ x)).double().cpu()
    h = (h + h.T) / 2
    theta, v = torch.linalg.eigh(h)
    theta, v = theta.flip(0), v.flip(1)
    return theta.to(x.device, x.dtype), x @ v.to(x.device, x.dtype)


def _chebyshev_filter(s, x, degree: int, lo: float, hi: float) -> torch.Tensor:
    """``T_degree`` of ``S`` mapped so that ``[lo, hi]`` is damped, applied to ``x``."""
    e = (hi - lo) / 2.0
    c = (hi + lo) / 2.0
    y = (s @ x - c * x) / e
    prev = x
    for _ in range(2, degree + 1):
        y_new = (s @ y - c * y) * (2.0 / e) - prev
        prev, y = y, y_new
    return y


def _top_eigvecs_subspace(s, k: int, gen: torch.Generator, tol: float, max_iter: int):
    n = s.shape[0]
    m = min(n, k + max(8, k // 2))
    x0 = torch.randn(n, m, generator=gen, dtype=torch.float64).to(s.device, s.dtype)
    x, _ = torch.linalg.qr(x0)
    theta, x = _rayleigh_ritz(s, x)
    degree = 8
    for it in range(1, max_iter + 1):
        cut = float(theta[-1])
        hi = min(cut, float(theta[k - 1]) - 1e-3) if k < m else cut
        x = _chebyshev_filter(s, x, degree, -1.0, max(hi, -0.999))
        x, _ = torch.linalg.qr(x)
        theta, x = _rayleigh_ritz(s, x)
        res = (s @ x[:, :k] - x[:, :k] * theta[:k]).norm(dim=0)
        if float(res.max()) < tol:
            return theta[:k], x[:, :k], it, True
        degree = min(2 * degree, 32)
    return theta[:k], x[:, :k], max_iter, False


def spectral_embedding(
    affinity: torch.Tensor,
    n_components: int,
    *,
    seed: int = 0,
    eigen_solver: str = "auto",
    tol: float | None = None,
    max_iter: int = 100,
) -> torch.Tensor:
    """The ``(N, n_components)`` spectral embedding ``D^{-1/2} V`` of ``affinity``.

    ``V`` holds the leading eigenvectors of the normalised affinity, in descending
    eigenvalue order. ``eigen_solver``: ``"eigh"`` (dense, ``O(N^3)``), ``"subspace"``
    (Chebyshev-filtered subspace iteration) or ``"auto"`` (``eigh`` up to ``N = 1024``
    on the CPU and ``N = 2048`` on a GPU, subspace iteration above; it falls back to
    ``eigh`` if it has not converged after ``max_iter`` filter rounds).
    """
    n = affinity.shape[0]
    if not 1 <= n_components <= n:
        raise ValueError(f"n_components: expected 1 <= n_components <= N = {n}, got {n_components}")
    if eigen_solver not in ("auto", "eigh", "subspace"):
        raise ValueError(
            f"eigen_solver: expected 'auto', 'eigh' or 'subspace', got {eigen_solver!r}"
        )
    s, dd = _normalized_affinity(affinity)
    if tol is None:
        tol = 1e-4 if s.dtype == torch.float32 else 1e-7
    limit = 256
    use_eigh = eigen_solver == "eigh" or (eigen_solver == "auto" and n <= limit)
    if n < 4 * (n_components + 8):
        use_eigh = True
    vecs = None
    if not use_eigh:
        gen = torch.Generator().manual_seed(int(seed))
        _, vecs, _, ok = _top_eigvecs_subspace(s, n_components, gen, tol, max_iter)
        if not ok and eigen_solver == "auto":
            vecs = None
    if vecs is None:
        _, v = torch.linalg.eigh(s)
        vecs = v[:, -n_components:].flip(1)
    return vecs / dd[:, None]


def _relabel_by_first_appearance(labels: torch.Tensor) -> torch.Tensor:
    """Renumber clusters 0, 1, 2, ... in order of their first token (canonical ids)."""
    uniq, inverse = torch.unique(labels, return_inverse=True)
    first = torch.full((uniq.numel(),), labels.numel(), dtype=torch.long, device=labels.device)
    first.scatter_reduce_(
        0, inverse, torch.arange(labels.numel(), device=labels.device), reduce="amin"
    )
    order = torch.argsort(first)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel(), device=labels.device)
    return rank[inverse]


def discretize(
    vectors: torch.Tensor, *, seed: int = 0, n_iter_max: int = 20, max_svd_restarts: int = 30
) -> torch.Tensor:
    """Yu & Shi's discretisation of a spectral embedding (``N x k``), as in scikit-learn.

    Returns int64 labels. The one random draw (the first row of the initial rotation) is
    ``numpy.random.RandomState(seed).randint(N)``, as in ``sklearn.cluster.discretize(...,
    random_state=seed)``, so both give the same partition for the same embedding.
    """
    rng = np.random.RandomState(int(seed))
    v = vectors.to(torch.float64).clone()
    n, k = v.shape
    v = v / v.norm(dim=0, keepdim=True).clamp_min(torch.finfo(v.dtype).tiny) * math.sqrt(n)
    first = torch.sign(v[0])
    v = v * torch.where(first != 0, -first, torch.ones_like(first))
    rn = v.norm(dim=1, keepdim=True)
    v = torch.where(rn > 0, v / rn.clamp_min(torch.finfo(v.dtype).tiny), v)
    eps = torch.finfo(torch.float64).eps
    for _ in range(max_svd_restarts):
        rot = torch.zeros(k, k, dtype=v.dtype, device=v.device)
        start = int(rng.randint(n))
        rot[:, 0] = v[start]
        c = torch.zeros(n, dtype=v.dtype, device=v.device)
        for j in range(1, k):
            c += (v @ rot[:, j - 1]).abs()
            rot[:, j] = v[int(torch.argmin(c))]
        last = 0.0
        n_iter = 0
        while True:
            n_iter += 1
            labels = (v @ rot).argmax(dim=1)
            t_svd = torch.zeros(k, k, dtype=v.dtype, device=v.device).index_add_(0, labels, v)
            try:
                u, sv, vh = torch.linalg.svd(t_svd.cpu())
            except RuntimeError:  # pragma: no cover - LAPACK failure, as sklearn: restart
                break
            ncut = 2.0 * (n - float(sv.sum()))
            if abs(ncut - last) < eps or n_iter > n_iter_max:
                return _relabel_by_first_appearance(labels)
            last = ncut
            rot = (vh.T @ u.T).to(v.device)
    raise RuntimeError("discretize: SVD did not converge")  # pragma: no cover


def kmeans(
    points: torch.Tensor, k: int, *, seed: int = 0, n_init: int = 10, max_iter: int = 300
) -> torch.Tensor:
    """Seeded k-means (k-means++ initialisation, Lloyd iterations, best of ``n_init``)."""
    gen = torch.Generator().manual_seed(int(seed))
    x = points.to(torch.float64)
    n = x.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"k: expected 1 <= k <= N = {n}, got {k}")
    sq = (x * x).sum(dim=1)
    best, best_inertia = None, math.inf
    for _ in range(n_init):
        idx = [int(torch.randint(n, (1,), generator=gen))]
        d2 = (sq - 2 * x @ x[idx[0]] + sq[idx[0]]).clamp_min(0)
        for _ in range(1, k):
            total = float(d2.sum())
            if total <= 0:
                nxt = int(torch.randint(n, (1,), generator=gen))
            else:
                r = float(torch.rand(1, generator=gen, dtype=torch.float64)) * total
                cum = torch.cumsum(d2, 0)
                nxt = min(
                    int(
                        torch.searchsorted(
                            cum, torch.tensor([r], dtype=cum.dtype, device=cum.device)
                        )
                    ),
                    n - 1,
                )
            idx.append(nxt)
            d2 = torch.minimum(d2, (sq - 2 * x @ x[nxt] + sq[nxt]).clamp_min(0))
        centers = x[idx].clone()
        labels = None
        for _ in range(max_iter):
            dist = sq[:, None] - 2 * x @ centers.T + (centers * centers).sum(dim=1)[None, :]
            new = dist.argmin(dim=1)
            if labels is not None and torch.equal(new, labels):
                break
            labels = new
            counts = torch.bincount(labels, minlength=k).to(x.dtype)
            sums = torch.zeros_like(centers).index_add_(0, labels, x)
            empty = counts == 0
            centers = torch.where(empty[:, None], centers, sums / counts.clamp_min(1)[:, None])
        dist = sq[:, None] - 2 * x @ centers.T + (centers * centers).sum(dim=1)[None, :]
        inertia = float(dist.gather(1, labels[:, None]).clamp_min(0).sum())
        if best is None or inertia < best_inertia * (1 - 1e-12):
            best, best_inertia = labels, inertia
    return _relabel_by_first_appearance(best)


def spectral_clustering(
    affinity: torch.Tensor,
    n_clusters: int,
    *,
    seed: int = 0,
    assign_labels: str = "discretize",
    eigen_solver: str = "auto",
) -> torch.Tensor:
    """Labels (``N``, int64, canonical ids by first appearance) of a precomputed affinity.

    ``assign_labels="discretize"`` follows scikit-learn's
    ``SpectralClustering(affinity="precomputed", assign_labels="discretize")``, seeded;
    ``"kmeans"`` runs seeded k-means on the row-normalised eigenvectors (Ng-Jordan-Weiss,
    as in Elhamifar & Vidal's code).
    """
    if affinity.dim() != 2 or affinity.shape[0] != affinity.shape[1]:
        raise ValueError(
            f"affinity: expected a square (N, N) matrix, got shape {tuple(affinity.shape)}"
        )
    n = affinity.shape[0]
    if not 1 <= n_clusters <= n:
        raise ValueError(f"n_clusters: expected 1 <= n_clusters <= N = {n}, got {n_clusters}")
    if assign_labels not in ("discretize", "kmeans"):
        raise ValueError(f"assign_labels: expected 'discretize' or 'kmeans', got {assign_labels!r}")
    if n_clusters == 1:
        return torch.zeros(n, dtype=torch.long, device=affinity.device)
    emb = spectral_embedding(affinity, n_clusters, seed=seed, eigen_solver=eigen_solver)
    if assign_labels == "discretize":
        return discretize(emb, seed=seed)
    rn = emb.norm(dim=1, keepdim=True)
    emb = torch.where(rn > 0, emb / rn.clamp_min(torch.finfo(emb.dtype).tiny), emb)
    return kmeans(emb, n_clusters, seed=seed, n_init=20)
