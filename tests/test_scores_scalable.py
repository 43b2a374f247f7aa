"""Scalable scoring mode: candidates, restricted SSC, sparse spectral clustering, auto mode."""

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr
from sklearn.metrics import adjusted_rand_score

from videoanchor.anchor import _inputs, compute_anchor_scores, scores, solve_ssc_admm, ssc_lambdas
from videoanchor.anchor.scalable import (
    _sparse_affinity,
    knn_candidates,
    solve_ssc_restricted,
    sparse_spectral_clustering,
)
from videoanchor.anchor.spectral import spectral_clustering


def tokens(n_per, k, d, *, noise=0.05, seed=0):
    g = torch.Generator().manual_seed(seed)
    mean = torch.randn(d, generator=g, dtype=torch.float64)
    xs = []
    for _ in range(k):
        basis = torch.randn(d, 4, generator=g, dtype=torch.float64) / 2
        xs.append((basis @ torch.randn(4, n_per, generator=g, dtype=torch.float64)).T)
    x = torch.cat(xs) + 0.5 * mean
    return x + noise * torch.randn(x.shape, generator=g, dtype=torch.float64)


def test_candidates_are_the_top_correlations():
    x = tokens(7, 5, 19, seed=1)
    n = x.shape[0]
    idx, inner, mu_z = knn_candidates(x, 6, block=8)  # several blocks
    g = x @ x.T
    absg = g.abs()
    absg.fill_diagonal_(-1)
    want = torch.topk(absg, 6, dim=1).indices
    assert torch.equal(torch.sort(idx, dim=1).values, torch.sort(want, dim=1).values)
    assert not bool((idx == torch.arange(n)[:, None]).any())
    assert torch.allclose(inner, torch.gather(g, 1, idx), atol=1e-12)
    assert mu_z == pytest.approx(ssc_lambdas(x, 1.0, 1.0)[3], rel=1e-12)


@pytest.mark.parametrize(
    "affine,outliers", [(True, True), (False, False)], ids=["authors", "lasso"]
)
def test_restricted_equals_exact_when_every_token_is_a_candidate(affine, outliers):
    x = tokens(5, 3, 11, seed=2)
    n = x.shape[0]
    lam_e, lam_z, _, _ = ssc_lambdas(x, 800.0, 800.0)
    idx, inner, _ = knn_candidates(x, n - 1)
    values, _, ok, _ = solve_ssc_restricted(
        x, idx, inner, lam_e, lam_z, eps=1e-9, max_iter=5000, affine=affine,
        outliers=outliers, work=torch.float64, batch=7,
    )  # fmt: skip
    assert ok
    dense = torch.zeros(n, n, dtype=torch.float64)
    dense[idx, torch.arange(n)[:, None].expand_as(idx)] = values
    exact = solve_ssc_admm(
        x, dtype=torch.float64, eps=1e-10, max_iter=50000, relax=1.8, adaptive_rho=True,
        affine=affine, outliers=outliers,
    )  # fmt: skip
    assert float((dense - exact.coef).norm() / exact.coef.norm()) < 1e-4


def test_sparse_spectral_matches_dense():
    x = tokens(15, 4, 25, seed=3)
    exact = solve_ssc_admm(x, dtype=torch.float64, relax=1.8, adaptive_rho=True)
    n = x.shape[0]
    c = exact.coef
    k = n - 1
    order = torch.argsort(c.abs().T, dim=1, descending=True)[:, :k]  # row i: column i's atoms
    vals = torch.gather(c.T, 1, order)
    w = _sparse_affinity(order, vals, n)
    assert torch.allclose(w.to_dense(), c.abs() + c.abs().T)
    sparse_labels = sparse_spectral_clustering(w, 4, seed=0)
    dense_labels = spectral_clustering(c.abs() + c.abs().T, 4, seed=0, eigen_solver="subspace")
    assert adjusted_rand_score(dense_labels.numpy(), sparse_labels.numpy()) == 1.0


def test_scalable_mode_outputs():
    x = tokens(12, 4, 20, seed=4).float()
    n = x.shape[0]
    fast = compute_anchor_scores(x, n_clusters=4, mode="scalable", candidates=8)
    assert fast.mode == "scalable"
    assert fast.scores.shape == (n,) and fast.scores.dtype == torch.float32
    assert fast.labels.shape == (n,) and fast.labels.dtype == torch.int64
    assert fast.coef.is_sparse and fast.coef.shape == (n, n)
    assert fast.coef._nnz() <= n * 8
    assert 0.0 <= float(fast.scores.min()) and float(fast.scores.max()) < 1.0
    for stage in ("lambdas", "admm", "spectral", "scores", "total"):
        assert fast.timings[stage] >= 0.0


def test_scalable_with_every_candidate_agrees_with_exact():
    x = tokens(9, 3, 14, seed=7)
    n = x.shape[0]
    exact = compute_anchor_scores(
        x, n_clusters=3, mode="exact", solver="accelerated", dtype=torch.float64, eps=1e-7
    )
    fast = compute_anchor_scores(
        x, n_clusters=3, mode="scalable", candidates=n - 1, dtype=torch.float64, eps=1e-7
    )
    r_exact = exact.coef.sum(dim=1)
    r_fast = torch.sparse.sum(fast.coef, dim=1).to_dense()
    assert float((r_fast - r_exact).norm() / r_exact.norm()) < 1e-3
    assert adjusted_rand_score(exact.labels.numpy(), fast.labels.numpy()) == 1.0
    assert spearmanr(exact.scores.numpy(), fast.scores.numpy())[0] > 0.999


def test_auto_mode_threshold_and_memory(monkeypatch):
    x = tokens(6, 3, 12, seed=5)
    assert compute_anchor_scores(x, n_clusters=3).mode == "exact"
    # beyond the dense limit, auto takes the blocked exact solver, never the approximation
    monkeypatch.setattr(scores, "SCALABLE_THRESHOLD", 10)
    assert compute_anchor_scores(x, n_clusters=3).mode == "blocked"
    monkeypatch.setattr(scores, "SCALABLE_THRESHOLD", 10**9)
    monkeypatch.setattr(_inputs, "free_memory_bytes", lambda device: 1024)
    with pytest.raises(MemoryError, match="Blocked SSC.*mode='scalable'"):
        compute_anchor_scores(x, n_clusters=3)
    with pytest.raises(MemoryError, match="mode='scalable'"):
        compute_anchor_scores(x, n_clusters=3, mode="exact")


def test_bad_mode():
    with pytest.raises(ValueError, match="mode"):
        compute_anchor_scores(torch.randn(10, 4), n_clusters=2, mode="windowed")
    with pytest.raises(ValueError, match="at least n_clusters"):
        compute_anchor_scores(torch.randn(10, 4), n_clusters=12, mode="scalable")


def test_scalable_is_deterministic():
    x = tokens(8, 3, 16, seed=6).float()
    a = compute_anchor_scores(x, n_clusters=3, mode="scalable", candidates=6)
    b = compute_anchor_scores(x.clone(), n_clusters=3, mode="scalable", candidates=6)
    assert torch.equal(a.labels, b.labels)
    assert np.array_equal(a.scores.numpy(), b.scores.numpy())
