"""Spectral clustering of an SSC affinity, in torch, on any device, and the cluster shares.

Normalised spectral clustering (Shi & Malik; Ng, Jordan & Weiss): the spectral embedding of a
symmetric non-negative affinity ``W`` (the ``k`` leading eigenvectors of ``S = D^{-1/2} W
D^{-1/2}``, :mod:`videoanchor.anchor.eigensolvers`; a sparse ``W`` is never densified), then
labels by the Yu & Shi discretisation of scikit-learn's
``SpectralClustering(assign_labels="discretize")`` or by seeded k-means; each token's cluster
share (the paper's, ``"soft"``, the default ``"steady"``: below, "The steady share", or
``"expected"``: below, "The expected share"); and
:func:`cluster`, the stage of an SSC call that picks the labels and the share.

Seeds follow scikit-learn: ``seed=s`` draws ARPACK's start vector (``N`` uniform numbers)
before ``discretize`` draws its start row, so it gives the authors' labels after
``np.random.seed(s)`` wherever the clustering is well-posed. The block solvers start from a
CPU generator seeded with ``seed``: the same labels on every device (up to ties).
"""

from __future__ import annotations

import math
import warnings

import torch

from videoanchor.anchor.collective import broadcast_from_first, raise_together
from videoanchor.anchor.eigensolvers import (
    _block_eigvecs,
    _filtered_eigenpairs,
    _normalized_affinity,
    _top_eigvecs_arpack,
    sparse_normalized_affinity,
    spectral_embedding,
    spectral_pairs,
)
from videoanchor.anchor.labels import (
    EXPECTED_DRAWS,
    EXPECTED_WIDTH,
    _check_draws,
    _unit_rows,
    discretize,
    expected_shares_from_embedding,
    kmeans,
    label_random_state,
    labels_from_embedding,
    soft_draw_shares,
    stable_draws,
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
    "STEADY_RAMP",
    "steady_stability",
    "steady_weight",
    "steady_shares",
    "sparse_steady_shares",
    "EXPECTED_DRAWS",
    "EXPECTED_WIDTH",
    "soft_draw_shares",
    "expected_shares_from_embedding",
    "cluster",
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


def _check_sparse_solver(eigen_solver: str) -> None:
    """A ``ValueError`` unless ``eigen_solver`` names a sparse affinity's eigensolver."""
    if eigen_solver not in ("auto", "arpack", "subspace", "chebyshev"):
        raise ValueError(
            f"eigen_solver: expected 'auto', 'arpack', 'subspace' or 'chebyshev' for a sparse "
            f"affinity, got {eigen_solver!r}"
        )


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
    _check_sparse_solver(eigen_solver)
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
    # (counts by a scatter into N bins, not bincount: its size is read from the device)
    counts = torch.zeros(lab.shape, dtype=torch.float64, device=lab.device)
    counts.scatter_add_(1, lab, torch.ones_like(counts))
    return counts.gather(1, lab).mean(0) / lab.shape[1]


# The steady share (issue 91), the default.
#
# The default cluster share, ``cluster_share="steady"`` (issue 91): the paper's share where
# its labels hold still, the soft share where they do not, blended between by a weight that
# is a continuous function of the path Yu & Shi's ``discretize`` takes; and :func:`cluster`,
# the stage of an SSC call that draws the labels and picks the share.
#
# The paper's share ``pi_j = |c_j| / N`` reads the labels of :func:`~videoanchor.anchor.
# clustering.discretize`, which are a finite sequence of decisions on the unit rows ``v_i`` of
# the spectral embedding: the initial rotation's row picks (an argmin of the sums ``c``), then
# at every iteration each row's argmax of ``v_i R``. The labels change only where one of these
# decisions does. :func:`steady_stability` measures how far the path is from a change:
#
# - ``m_path``: the smallest decision margin of the iterations, over every row and iteration
#   (top-1 minus top-2 of ``v R``; at the first iteration a repeated pick is the same column,
#   so it is left out, as argmax leaves it). It is continuous in the rows and 0 where a row's
#   decision flips. A change of the labels between iterations makes ``ncut`` change (labels
#   equal between iterations make it bitwise equal), so ``discretize``'s stop test and its
#   20-iteration cap follow the argmax decisions; a stop with changed labels (an ``ncut``
#   repeated bit for bit by other labels) sets the measure to 0.
# - the picks: their own margins are no guide (the runner-up of an argmin is usually a row of
#   another cluster within 1e-5 of the pick, and switching to it usually ends at the same
#   partition). For each pick ``j`` the path is run again with its runner-up ``i`` picked
#   instead (the later picks follow), and the term ``max(a_j, m_j)`` enters the minimum, with
#   ``a_j = (c_i - c_p) / j`` the runner-up's distance and ``m_j`` that path's smallest
#   margin; where that path ends at another partition the term is ``a_j``. At a switch of the
#   pick (``a_j = 0``) both sides see both paths, so the measure does not jump there.
#
# The stability is ``z = gap * min(m_path, terms)``, ``gap = theta_k - theta_{k+1}`` the
# eigengap of the normalised affinity at ``k`` (the embedding's rows move by about ``||dS|| /
# gap``). The weight is ``w = smoothstep((z - lo) / (hi - lo))`` (:data:`STEADY_RAMP`), and the
# share ``w * paper + (1 - w) * soft``: exactly the paper's where ``w = 1`` (the soft share is
# not computed there), :func:`soft_cluster_shares`' quantity where ``w = 0``.
#
# What is not continuous (measured, ``benchmarks/bench_share_gate.py``): one level of pick
# alternatives is run, so a switch inside an alternative's own picks, or of which row is the
# runner-up, can move ``z``; the measured moves are in ``share_gate_cpu.json``.

#: ``(lo, hi)``: the stability ``z`` (decision margin times the eigengap at ``k``) below
#: which the steady share is the soft one and above which it is the paper's. Calibrated on
#: the family of ``benchmarks/bench_share_gate.py`` (``share_gate_cpu.json``): every set whose
#: paper labels flipped under a 1e-6 or 1e-7 change of the features had ``z <= 6e-7`` at the
#: set and at each change (16x below ``lo``); the ramp's width keeps the weight's move under
#: a 1e-6 change within what the bar of 1e-3 on the scores allows on the family.
STEADY_RAMP = (1e-5, 2e-5)
#: the eigenpairs asked of the spectral step beyond ``k`` (the eigengap's and the soft
#: share's filter window; more where the window is crowded)
EXTRA_PAIRS = 12


def steady_weight(z: float, ramp: tuple[float, float] = STEADY_RAMP) -> float:
    """The paper's share's weight at stability ``z``: 0 up to ``lo``, 1 from ``hi``, a
    smoothstep between (continuous, with a continuous slope)."""
    lo, hi = ramp
    x = min(max((z - lo) / (hi - lo), 0.0), 1.0)
    return x * x * (3.0 - 2.0 * x)


def steady_stability(embedding: torch.Tensor, gap: float, *, seed: int = 0, draws: int = 1,
                     ramp: tuple[float, float] = STEADY_RAMP) -> tuple[torch.Tensor, float]:  # fmt: skip
    """``(labels, z)``: the paper's ``(draws, N)`` labels of ``embedding`` (canonical ids, as
    :func:`~videoanchor.anchor.clustering.labels_from_embedding` draws them from one
    :func:`label_random_state` stream) and their stability ``z = gap * m``, ``m`` the smallest
    decision margin over every draw's path and pick alternatives (module docstring). Exact
    where ``z`` is below ``ramp``'s top; above it ``z`` may be an underestimate that still
    reaches it (the weight is 1 either way)."""
    floor, bound = (ramp[0] / gap, ramp[1] / gap) if gap > 0 else (math.inf, 0.0)
    out, m = stable_draws(embedding, seed, draws, floor, bound)
    return torch.from_numpy(out).to(embedding.device), max(gap, 0.0) * m


def _soft_from_pairs(theta: torch.Tensor, vec: torch.Tensor, dd: torch.Tensor, k: int,
                     width: float = SOFT_SHARE_WIDTH) -> torch.Tensor:  # fmt: skip
    """:func:`~videoanchor.anchor.clustering.soft_cluster_shares` from eigenpairs given
    (``theta`` descending on the host, reaching below ``theta_k - width``)."""
    f = ((theta - float(theta[k - 1]) + width) / width).clamp(0, 1)
    # (theta descends, so the kept pairs lead: sliced by a count from the host, not a mask
    # of the device's, whose indexing would read the mask's count back)
    keep = int((f > 0).sum())
    u = _unit_rows(vec[:, :keep].to(torch.float64) * f[:keep].sqrt().to(vec.device)
                   / dd.to(torch.float64)[:, None])  # fmt: skip
    return ((u @ (u.T @ u)) * u).sum(dim=1) / vec.shape[0]


def _one_or_each(n: int, k: int, draws: int, device) -> tuple[torch.Tensor, None, dict]:
    """The steady share's answer with one cluster (``k == 1``) or a cluster per token."""
    labels = torch.zeros(draws, n, dtype=torch.long, device=device)
    if k > 1:  # every token its own cluster
        labels[:] = torch.arange(n, device=device)
    return labels, None, dict(cluster_share="steady", share_weight=1.0, stability=math.inf)


def steady_shares(affinity: torch.Tensor, n_clusters: int, *, seed: int = 0, draws: int = 1,
                  eigen_solver: str = "auto", ramp: tuple[float, float] = STEADY_RAMP,
                  ) -> tuple[torch.Tensor, torch.Tensor | None, dict]:  # fmt: skip
    """The labels and shares of ``cluster_share="steady"`` on a dense affinity:
    ``(labels (draws, N), shares, record)``. ``shares`` is None where the weight is 1 (the
    paper's share, read from the labels), else ``w * paper + (1 - w) * soft`` (``(N,)``
    float64). ``record``: ``cluster_share`` ("steady"), ``share_weight`` ``w`` and
    ``stability`` ``z``. One eigensolver call gives the embedding, the eigengap and, where
    the window is covered (a dense solver, or the Chebyshev solver's block converged down
    through it: ``spectral_pairs(window=SOFT_SHARE_WIDTH)``, no second eigensolve and no
    host read of its own on a GPU), the soft share's eigenpairs."""
    n = affinity.shape[0]
    k = n_clusters
    if k == 1 or k >= n:
        return _one_or_each(n, k, draws, affinity.device)
    theta, vecs, dd, dense = spectral_pairs(affinity, k, extra=EXTRA_PAIRS, seed=seed,
                                            eigen_solver=eigen_solver, window=SOFT_SHARE_WIDTH)  # fmt: skip
    labels, w, record = _steady_labels(theta, vecs, dd, k, seed=seed, draws=draws, ramp=ramp)
    if w == 1.0:
        return labels, None, record
    if dense and (len(theta) == n or float(theta[-1]) < float(theta[k - 1]) - SOFT_SHARE_WIDTH):
        soft = _soft_from_pairs(theta, vecs, dd, k)
    else:  # Krylov's pairs, or a window crowded past the block: the filter's own call
        s, dd64 = _normalized_affinity(affinity.to(torch.float64))
        th, vec = _filtered_eigenpairs(s, k, SOFT_SHARE_WIDTH)
        soft = _soft_from_pairs(th.cpu(), vec, dd64, k)
    return _blend(labels, soft, w, record)


def _steady_labels(theta, vecs, dd, k: int, *, seed: int, draws: int, ramp):
    """``(labels, w, record)`` of the steady share from the leading eigenpairs (``theta``
    descending, at least ``k + 1``; the embedding ``vecs[:, :k] / dd``)."""
    gap = float(theta[k - 1] - theta[k])
    labels, z = steady_stability(vecs[:, :k] / dd[:, None], gap, seed=seed, draws=draws,
                                 ramp=ramp)  # fmt: skip
    w = steady_weight(z, ramp)
    return labels, w, dict(cluster_share="steady", share_weight=w, stability=z)


def _blend(labels, soft, w: float, record: dict):
    """The steady share's ``(labels, shares, record)`` at weight ``w`` below 1."""
    soft = soft.to(labels.device)
    if w == 0.0:
        return labels, soft, record
    return labels, w * label_shares(labels) + (1.0 - w) * soft, record


def _sparse_pairs(s: torch.Tensor, m: int, seed: int,
                  eigen_solver: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """The ``m`` leading eigenpairs (``theta`` float64 on the host, descending; vectors) of the
    sparse normalised affinity ``s`` (CSR): dense ``eigh`` where it is small, else as
    ``eigen_solver`` says (:func:`sparse_spectral_labels`' names): ARPACK per component
    (``"arpack"``, and ``"auto"`` on the CPU), where it gives up (more components than ``m``,
    or no convergence) or elsewhere block Krylov (``"subspace"``, ``"auto"`` off the CPU) or
    the Chebyshev filter (``"chebyshev"``), to 1e-7."""
    n = s.shape[0]
    if n < 4 * (m + 8):
        theta, vecs = torch.linalg.eigh(s.to_dense())
        return theta.flip(0)[:m].to(torch.float64).cpu(), vecs.flip(1)[:, :m]
    arpack = eigen_solver == "arpack" or (eigen_solver == "auto" and s.device.type == "cpu")
    found = _top_eigvecs_arpack(s, m, seed, values=True) if arpack else None
    if found is not None:
        return found
    start = int(torch.randint(2**31 - 1, (1,), generator=torch.Generator().manual_seed(seed)))
    how = "chebyshev" if eigen_solver == "chebyshev" else "krylov"
    theta, vecs, _ = _block_eigvecs(s, m, how, seed=start, tol=1e-7, max_steps=None)
    return theta.to(torch.float64).cpu(), vecs


def sparse_steady_shares(affinity: torch.Tensor, n_clusters: int, *, seed: int = 0,
                         draws: int = 1, ramp: tuple[float, float] = STEADY_RAMP,
                         eigen_solver: str = "auto",
                         ) -> tuple[torch.Tensor, torch.Tensor | None, dict]:  # fmt: skip
    """:func:`steady_shares` on a sparse symmetric affinity (COO; the working sets by blocks,
    issue 99), never densified: the ``n_clusters + 1`` leading eigenpairs of the normalised
    affinity give the embedding and the eigengap, and where the paper's share's weight is
    below 1, the pairs down to ``theta_k -`` :data:`SOFT_SHARE_WIDTH` (sought in doubling
    counts) give the soft share. The same rule and record as the dense one. ``eigen_solver``:
    :func:`sparse_spectral_labels`' names (:func:`_sparse_pairs`)."""
    _check_sparse_solver(eigen_solver)
    n, k = affinity.shape[0], n_clusters
    if k == 1 or k >= n:
        return _one_or_each(n, k, draws, affinity.device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # sparse CSR is "beta"
        s, dd = sparse_normalized_affinity(affinity)
        theta, vecs = _sparse_pairs(s, k + 1, seed, eigen_solver)
        labels, w, record = _steady_labels(theta, vecs, dd, k, seed=seed, draws=draws,
                                           ramp=ramp)  # fmt: skip
        if w == 1.0:
            return labels, None, record
        m = min(n, k + max(8, k // 2))
        while True:
            theta, vecs = _sparse_pairs(s, m, seed, eigen_solver)
            if m == n or float(theta[-1]) < float(theta[k - 1]) - SOFT_SHARE_WIDTH:
                break
            m = min(n, 2 * m)
    return _blend(labels, _soft_from_pairs(theta, vecs, dd, k), w, record)


def cluster(coef: torch.Tensor, opts, *, group=None, rank: int = 0, affinity: str = "symmetric",
            assign_labels: str = "discretize", sparse_steady: bool = False,
            ) -> tuple[torch.Tensor, torch.Tensor | None, dict]:  # fmt: skip
    """Stage 4 of an SSC call: ``(draws, shares, record)``, the ``(label_draws, N)`` labels of
    ``C`` (dense, or sparse COO kept sparse) into ``opts.n_clusters`` clusters, seeded by
    ``opts.seed`` (:class:`~videoanchor.anchor.options.SSCOptions`, checked), each token's
    cluster share under ``opts.cluster_share`` (``(N,)`` float64, or None where it is the
    paper's, read from the labels) and the record of what ran: ``cluster_share`` (the share
    that ran: ``"expected"``, ``"paper"``, ``"soft"`` or ``"steady"``), ``share_weight`` (the
    paper's share's weight: 1.0 (``"expected"``: the paper's share in expectation), 0.0 or the
    steady share's) and, for ``"steady"``, its ``stability``
    (:func:`~videoanchor.anchor.clustering.steady_shares`). ``"expected"`` and ``"steady"`` on
    a sparse ``C`` (blocked mode) run the paper's share and say so, but ``"steady"`` where
    ``sparse_steady`` (the working sets by blocks: :func:`sparse_steady_shares`, the same
    share as exact mode's default). ``affinity``: ``"symmetric"`` (``W =
    |C| + |C|^T``) or ``"column_max"`` (dense ``C`` only). Under a process ``group`` (every
    rank holds the same ``C``) rank 0 computes them and broadcasts them; if that fails, every
    rank raises."""
    n, share = coef.shape[0], getattr(opts, "cluster_share", "paper")
    draws = torch.empty(opts.label_draws, n, dtype=torch.long, device=coef.device)
    # the shares travel with their weight (the record's): [w, z, pi_1 .. pi_N]
    packed = torch.empty(n + 2, dtype=torch.float64, device=coef.device)
    record, error, shares = {}, None, None
    if rank == 0:
        try:
            if coef.is_sparse and share == "soft":
                raise ValueError(
                    f"cluster_share={share!r} reads a dense affinity's spectrum; expected a "
                    f"dense C (mode='exact'), got a sparse one (blocked mode, N = {n})"
                )
            if coef.is_sparse and sparse_steady and share == "steady":
                draws, shares, record = sparse_steady_shares(
                    sparse_ssc_affinity(coef), opts.n_clusters, seed=opts.seed,
                    draws=opts.label_draws, eigen_solver=opts.eigen_solver)  # fmt: skip
            elif coef.is_sparse:
                draws = sparse_spectral_labels(
                    sparse_ssc_affinity(coef), opts.n_clusters, seed=opts.seed,
                    draws=opts.label_draws, eigen_solver=opts.eigen_solver,
                )  # fmt: skip
                shares, record = None, dict(cluster_share="paper", share_weight=1.0)
            else:
                normalize = "column_max" if affinity == "column_max" else "none"
                w = ssc_affinity(coef, normalize=normalize)
                draws, shares, record = _labels_and_shares(w, opts, share, assign_labels)
            packed[0] = record["share_weight"]
            packed[1] = record.get("stability", math.nan)
            packed[2:] = math.nan if shares is None else shares.to(packed.device)
        except Exception as exc:  # re-raised on every rank
            error = exc
    raise_together(group, error, coef.device)
    draws = draws.to(coef.device)
    if group is not None:
        draws, packed = broadcast_from_first(draws, group), broadcast_from_first(packed, group)
        if rank != 0:
            sparse_paper = coef.is_sparse and not (sparse_steady and share == "steady")
            record = dict(cluster_share=share if share not in ("steady", "expected")
                          or not sparse_paper else "paper", share_weight=float(packed[0]))  # fmt: skip
            if not math.isnan(float(packed[1])):
                record["stability"] = float(packed[1])
    # (rank 0 knows whether its shares are the paper's; another rank reads the flag)
    keep = shares is not None if rank == 0 else not bool(packed[2:].isnan().any())
    return draws, packed[2:].clone() if keep else None, record


@bounded()
@exact_float32
def _labels_and_shares(w: torch.Tensor, opts, share: str, assign_labels: str):
    """:func:`cluster`'s dense part: ``(draws, shares, record)`` of the affinity ``w``; under
    ``"steady"`` one eigensolver call feeds the labels, the eigengap and the soft share;
    under ``"expected"`` one embedding feeds every draw."""
    k, kw = opts.n_clusters, dict(seed=opts.seed, eigen_solver=opts.eigen_solver)
    if share == "steady" and assign_labels == "discretize":
        return steady_shares(w, k, draws=opts.label_draws, **kw)
    if share != "expected" or assign_labels != "discretize" or not 1 < k < w.shape[0]:
        # (k-means labels have no discretize path to gate or soften: "steady" and "expected"
        # run the paper's share there, as with one cluster)
        draws = spectral_labels(w, k, assign_labels=assign_labels, draws=opts.label_draws, **kw)
        if share == "soft":
            return draws, soft_cluster_shares(w, k), dict(cluster_share="soft", share_weight=0.0)
        return draws, None, dict(cluster_share="paper", share_weight=1.0)
    emb = spectral_embedding(w, k, **kw)
    labels, shares = expected_shares_from_embedding(
        emb, seed=opts.seed, draws=max(EXPECTED_DRAWS, opts.label_draws), keep=opts.label_draws
    )
    return labels, shares, dict(cluster_share="expected", share_weight=1.0)
