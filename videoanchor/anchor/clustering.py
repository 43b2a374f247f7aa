"""Spectral clustering of an SSC affinity, in torch, on any device, and the cluster shares.

Normalised spectral clustering (Shi & Malik; Ng, Jordan & Weiss): the spectral embedding of a
symmetric non-negative affinity ``W`` (the ``k`` leading eigenvectors of ``S = D^{-1/2} W
D^{-1/2}``, :mod:`videoanchor.anchor.eigensolvers`; a sparse ``W`` is never densified), then
labels by the Yu & Shi discretisation of scikit-learn's
``SpectralClustering(assign_labels="discretize")`` or by seeded k-means; each token's cluster
share (the paper's or ``"soft"``; the default ``"steady"`` and the stage of an SSC call that
picks the share, ``cluster()``, are in :mod:`videoanchor.anchor.steady`).

Seeds follow scikit-learn: ``seed=s`` draws ARPACK's start vector (``N`` uniform numbers)
before ``discretize`` draws its start row, so it gives the authors' labels after
``np.random.seed(s)`` wherever the clustering is well-posed. The block solvers start from a
CPU generator seeded with ``seed``: the same labels on every device (up to ties).
"""

from __future__ import annotations

import math
import numbers
import warnings

import numpy as np
import torch

from videoanchor.anchor.eigensolvers import (
    _block_eigvecs,
    _filtered_eigenpairs,
    _normalized_affinity,
    _top_eigvecs_arpack,
    sparse_normalized_affinity,
    spectral_embedding,
)
from videoanchor.anchor.products import exact_float32
from videoanchor.anchor.threads import bounded

__all__ = [
    "ssc_affinity",
    "discretize",
    "kmeans",
    "label_random_state",
    "labels_from_embedding",
    "spectral_labels",
    "spectral_clustering",
    "sparse_spectral_clustering",
    "sparse_spectral_labels",
    "sparse_ssc_affinity",
    "soft_cluster_shares",
    "label_shares",
]


def ssc_affinity(coef: torch.Tensor, *, normalize: str = "none") -> torch.Tensor:
    """``W = |C| + |C|^T`` (docs/method.md). ``normalize="column_max"`` first divides each
    column of ``|C|`` by its largest entry (Elhamifar & Vidal's ``BuildAdjacency``)."""
    if coef.dim() != 2 or coef.shape[0] != coef.shape[1]:
        raise ValueError(f"coef: expected a square (N, N) matrix, got shape {tuple(coef.shape)}")
    a = coef.abs()
    if normalize == "column_max":
        a = a / (a.amax(dim=0, keepdim=True) + torch.finfo(a.dtype).eps)
    elif normalize != "none":
        raise ValueError(f"normalize: expected 'none' or 'column_max', got {normalize!r}")
    return a + a.T


def sparse_ssc_affinity(coef: torch.Tensor) -> torch.Tensor:
    """``W = |C| + |C|^T`` of a sparse COO ``C``: coalesced sparse COO, float64."""
    c, n = coef.coalesce(), coef.shape[0]
    v = c.values().abs().to(torch.float64)
    ind, v = c.indices()[:, v > 0], v[v > 0]
    both, vv = torch.cat([ind, ind.flip(0)], dim=1), torch.cat([v, v])
    return torch.sparse_coo_tensor(both, vv, (n, n), check_invariants=False).coalesce()


def _relabel_by_first_appearance(labels: torch.Tensor) -> torch.Tensor:
    """Renumber clusters 0, 1, 2, ... in order of their first token (canonical ids)."""
    uniq, inverse = torch.unique(labels, return_inverse=True)
    at = torch.arange(labels.numel(), device=labels.device)
    first = at.new_full((uniq.numel(),), labels.numel()).scatter_reduce_(0, inverse, at, "amin")
    return torch.argsort(torch.argsort(first))[inverse]  # the first appearances are distinct


def _unit_rows(v: torch.Tensor) -> torch.Tensor:
    rn = v.norm(dim=1, keepdim=True)
    return torch.where(rn > 0, v / rn.clamp_min(torch.finfo(v.dtype).tiny), v)


def _discretize_rows(vectors: torch.Tensor) -> torch.Tensor:
    """:func:`discretize`'s input rows: the columns scaled to norm ``sqrt(N)``, signed so the
    first row is non-positive, the rows unit (float64, host)."""
    v = vectors.detach().to("cpu", torch.float64).clone()
    v = v / v.norm(dim=0, keepdim=True).clamp_min(torch.finfo(v.dtype).tiny) * math.sqrt(len(v))
    first = torch.sign(v[0])
    return _unit_rows(v * torch.where(first != 0, -first, torch.ones_like(first)))


def discretize(vectors: torch.Tensor, *, seed: int = 0,
               random_state: np.random.RandomState | None = None, n_iter_max: int = 20,
               max_svd_restarts: int = 30) -> torch.Tensor:  # fmt: skip
    """Yu & Shi's discretisation of a spectral embedding (``N x k``) into int64 labels,
    scikit-learn's algorithm: its one random draw, the initial rotation's first row, is
    ``random_state.randint(N)`` (advanced; default ``RandomState(seed)``), as in
    ``sklearn.cluster.discretize(..., random_state=seed)``: the same partition. Runs on the
    host (on a GPU each start row and SVD step would read a value back); labels on
    ``vectors``' device."""
    rng = np.random.RandomState(int(seed)) if random_state is None else random_state
    device = vectors.device
    v = _discretize_rows(vectors)
    n, k = v.shape
    eps = torch.finfo(torch.float64).eps
    for _ in range(max_svd_restarts):
        rot = torch.zeros(k, k, dtype=v.dtype, device=v.device)
        rot[:, 0] = v[int(rng.randint(n))]
        c = torch.zeros(n, dtype=v.dtype, device=v.device)
        for j in range(1, k):
            c += (v @ rot[:, j - 1]).abs()
            rot[:, j] = v[int(torch.argmin(c))]
        last, n_iter = 0.0, 0
        while True:
            n_iter += 1
            labels = (v @ rot).argmax(dim=1)
            t_svd = torch.zeros(k, k, dtype=v.dtype, device=v.device).index_add_(0, labels, v)
            try:
                u, sv, vh = torch.linalg.svd(t_svd)
            except RuntimeError:  # pragma: no cover - LAPACK failure, as sklearn: restart
                break
            ncut = 2.0 * (n - float(sv.sum()))
            if abs(ncut - last) < eps or n_iter > n_iter_max:
                return _relabel_by_first_appearance(labels).to(device)
            last = ncut
            rot = vh.T @ u.T
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
                nxt = min(int(torch.searchsorted(cum, cum.new_tensor([r]))), n - 1)
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


def label_random_state(seed: int, n: int) -> np.random.RandomState:
    """``RandomState(seed)`` advanced as scikit-learn's ``SpectralClustering`` advances it
    before ``discretize``: by ARPACK's start vector, ``uniform(-1, 1, N)``."""
    rng = np.random.RandomState(int(seed))
    rng.uniform(-1, 1, n)
    return rng


def _check_draws(draws) -> int:
    if isinstance(draws, bool) or not isinstance(draws, numbers.Integral):
        raise TypeError(f"label_draws: expected an int, got {type(draws).__name__}")
    if draws < 1:
        raise ValueError(f"label_draws: expected at least 1, got {draws}")
    return int(draws)


def labels_from_embedding(embedding: torch.Tensor, n_clusters: int, *, seed: int = 0,
                          assign_labels: str = "discretize", draws: int = 1) -> torch.Tensor:  # fmt: skip
    """``(draws, N)`` int64 labels from one spectral embedding (``N x n_clusters``).
    ``"discretize"``: successive draws of one :func:`label_random_state` stream (draw 0:
    scikit-learn's ``SpectralClustering(random_state=seed)`` labels). ``"kmeans"``: seeded
    k-means on the row-normalised embedding, draw ``r > 0`` seeded by the ``r``-th number
    of ``RandomState(seed)``, draw 0 by ``seed``."""
    draws = _check_draws(draws)
    n = embedding.shape[0]
    out = torch.empty(draws, n, dtype=torch.long, device=embedding.device)
    if assign_labels == "discretize":
        rng = label_random_state(seed, n)
        for r in range(draws):
            out[r] = discretize(embedding, random_state=rng)
        return out
    emb = _unit_rows(embedding)
    more = np.random.RandomState(int(seed)).randint(2**31 - 1, size=draws - 1).tolist()
    for r, s in enumerate([int(seed), *more]):
        out[r] = kmeans(emb, n_clusters, seed=s, n_init=20)
    return out


@bounded()
@exact_float32
def spectral_labels(affinity: torch.Tensor, n_clusters: int, *, seed: int = 0,
                    assign_labels: str = "discretize", eigen_solver: str = "auto",
                    draws: int = 1) -> torch.Tensor:  # fmt: skip
    """``(draws, N)`` labels of a precomputed affinity: one spectral embedding, ``draws``
    label assignments from it (:func:`labels_from_embedding`). Row 0 is
    :func:`spectral_clustering`'s answer."""
    if affinity.dim() != 2 or affinity.shape[0] != affinity.shape[1]:
        raise ValueError(
            f"affinity: expected a square (N, N) matrix, got shape {tuple(affinity.shape)}"
        )
    n = affinity.shape[0]
    if not 1 <= n_clusters <= n:
        raise ValueError(f"n_clusters: expected 1 <= n_clusters <= N = {n}, got {n_clusters}")
    if assign_labels not in ("discretize", "kmeans"):
        raise ValueError(f"assign_labels: expected 'discretize' or 'kmeans', got {assign_labels!r}")
    draws = _check_draws(draws)
    if n_clusters == 1:
        return torch.zeros(draws, n, dtype=torch.long, device=affinity.device)
    emb = spectral_embedding(affinity, n_clusters, seed=seed, eigen_solver=eigen_solver)
    return labels_from_embedding(
        emb, n_clusters, seed=seed, assign_labels=assign_labels, draws=draws
    )


@bounded()
@exact_float32
def spectral_clustering(affinity: torch.Tensor, n_clusters: int, *, seed: int = 0,
                        assign_labels: str = "discretize", eigen_solver: str = "auto",
                        ) -> torch.Tensor:  # fmt: skip
    """Labels (``N``, int64, canonical ids by first appearance) of a precomputed affinity.

    ``assign_labels="discretize"`` follows scikit-learn's
    ``SpectralClustering(affinity="precomputed", assign_labels="discretize",
    random_state=seed)``, random draws included; ``"kmeans"`` runs seeded k-means on the
    row-normalised eigenvectors (Ng-Jordan-Weiss, as in Elhamifar & Vidal's code).
    ``eigen_solver``: see :func:`spectral_embedding`."""
    return spectral_labels(
        affinity, n_clusters, seed=seed, assign_labels=assign_labels, eigen_solver=eigen_solver
    )[0]


@bounded()
@exact_float32
def sparse_spectral_labels(w: torch.Tensor, n_clusters: int, *, seed: int = 0,
                           assign_labels: str = "discretize", draws: int = 1,
                           eigen_solver: str = "auto", max_steps: int = 200,
                           ) -> torch.Tensor:  # fmt: skip
    """``(draws, N)`` labels of a sparse symmetric affinity (COO), never densified: one
    embedding, ``draws`` label assignments (:func:`labels_from_embedding`). ``eigen_solver``:
    ``"arpack"`` (scipy's ``eigsh`` per connected component, to ``ARPACK_TOL``; CPU),
    ``"subspace"`` (:func:`block_krylov_eigvecs`) or ``"chebyshev"``
    (:func:`chebyshev_eigvecs`), both on the device to a block residual 1e-7 in at most
    ``max_steps`` steps (warned), or ``"auto"``: ARPACK on the CPU (6-14x faster than block
    Krylov, ``sparse_spectral_cpu.json``), Chebyshev elsewhere. Where ARPACK gives up (more
    components than ``n_clusters``, or no convergence: warned) block Krylov finishes."""
    if eigen_solver not in ("auto", "arpack", "subspace", "chebyshev"):
        raise ValueError(
            f"eigen_solver: expected 'auto', 'arpack', 'subspace' or 'chebyshev' for a sparse "
            f"affinity, got {eigen_solver!r}"
        )
    n = w.shape[0]
    if n_clusters == 1:
        return torch.zeros(draws, n, dtype=torch.long, device=w.device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # sparse CSR is "beta"
        s, dd = sparse_normalized_affinity(w)
        cpu = s.device.type == "cpu"
        if n < 4 * (n_clusters + 8):
            vecs = torch.linalg.eigh(s.to_dense())[1][:, -n_clusters:].flip(1)
        else:
            arpack = eigen_solver == "arpack" or (eigen_solver == "auto" and cpu)
            vecs = _top_eigvecs_arpack(s, n_clusters, seed) if arpack else None
        if vecs is None:
            cheb = eigen_solver == "chebyshev" or (eigen_solver == "auto" and not cpu)
            gen = torch.Generator().manual_seed(int(seed))
            start = int(torch.randint(2**31 - 1, (1,), generator=gen))  # the block's seed
            _, vecs, _ = _block_eigvecs(s, n_clusters, "chebyshev" if cheb else "krylov",
                                        seed=start, tol=1e-7, max_steps=max_steps)  # fmt: skip
    emb = vecs / dd[:, None]
    return labels_from_embedding(
        emb, n_clusters, seed=seed, assign_labels=assign_labels, draws=draws
    )


@exact_float32
def sparse_spectral_clustering(
    w: torch.Tensor, n_clusters: int, *, seed: int = 0, assign_labels: str = "discretize"
) -> torch.Tensor:
    """Spectral clustering of a sparse symmetric affinity (COO), without densifying it."""
    return sparse_spectral_labels(w, n_clusters, seed=seed, assign_labels=assign_labels)[0]


#: :func:`soft_cluster_shares`' spectral filter: its width on the normalised affinity's
#: eigenvalues, below the ``k``-th.
SOFT_SHARE_WIDTH = 1e-2


@bounded()
def soft_cluster_shares(
    affinity: torch.Tensor, n_clusters: int, *, width: float = SOFT_SHARE_WIDTH
) -> torch.Tensor:
    """Each token's soft cluster share (``(N,)`` float64 in ``(0, 1]``), a continuous
    function of a dense symmetric affinity ``W`` (``cluster_share="soft"``, beyond the
    paper).

    The spectral embedding's rows ``u_i`` (``D^{-1/2} V``, as the paper's labels use) are
    taken through a spectral filter instead of a hard cut at ``k``: eigenvalue ``theta``
    weighs ``clamp((theta - theta_k + width) / width, 0, 1)``, so a near-tie at ``k`` (no
    eigengap) moves the embedding continuously. Two tokens belong together by the degree
    ``cos^2(u_i, u_j)``, and ``pi_j = (1/N) sum_i cos^2(u_i, u_j)`` (``O(N m^2)``, ``m`` the
    filter's eigenvectors). Where the affinity has ``k`` components and the eigengap
    exceeds ``width``, the rows of one component are parallel and those of two orthogonal,
    and ``pi_j`` is the hard share ``|c_j| / N`` exactly. Elsewhere it is NOT the paper's
    share, even where the paper's labels are stable: measured in
    ``benchmarks/bench_label_draws.py --flips`` (docs/guides/anchor-scores.md)."""
    if affinity.dim() != 2 or affinity.shape[0] != affinity.shape[1] or affinity.is_sparse:
        raise ValueError(
            f"affinity: expected a dense square (N, N) matrix, got shape {tuple(affinity.shape)}"
            + (" (sparse)" if affinity.is_sparse else "")
        )
    n = affinity.shape[0]
    if not 1 <= n_clusters <= n:
        raise ValueError(f"n_clusters: expected 1 <= n_clusters <= N = {n}, got {n_clusters}")
    if not width > 0:
        raise ValueError(f"width: expected a positive number, got {width!r}")
    s, dd = _normalized_affinity(affinity.to(torch.float64))
    theta, vec = _filtered_eigenpairs(s, n_clusters, width)
    f = ((theta - float(theta[n_clusters - 1]) + width) / width).clamp(0, 1)
    keep = f > 0
    u = _unit_rows(vec[:, keep] * f[keep].sqrt() / dd[:, None])
    return ((u @ (u.T @ u)) * u).sum(dim=1) / n


def label_shares(labels: torch.Tensor) -> torch.Tensor:
    """The paper's cluster share ``pi_j`` (``(N,)`` float64): token ``j``'s cluster's share
    of the tokens under ``labels`` (``(N,)``, or ``(draws, N)``: averaged over the draws)."""
    lab = labels.reshape(-1, labels.shape[-1])
    return (
        torch.stack([torch.bincount(row)[row] for row in lab]).to(torch.float64).mean(0)
        / lab.shape[1]
    )
