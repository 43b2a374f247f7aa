"""Elhamifar & Vidal's constrained outlier SSC (data_term="exact") against a plain transcription."""

import numpy as np
import pytest
import torch
from sklearn.metrics import adjusted_rand_score

from videoanchor.anchor import sparse_subspace_clustering
from videoanchor.anchor.reference import elhamifar_vidal_outlier_admm
from videoanchor.anchor.solvers.equality import equality_parameters, solve_ssc_equality


def _points(n, d, *, seed, corrupt=3):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)) + 0.3
    for _ in range(corrupt):  # a few gross pixel errors, so E is exercised
        x[rng.integers(n), rng.integers(d)] += 10.0
    return x


def _reference_iterates(x, max_iter, eps=1e-12, affine=False):
    seen = {}
    coef, it, ok = elhamifar_vidal_outlier_admm(
        x.T, max_iter=max_iter + 1, eps=eps, affine=affine,
        callback=lambda i, c, e: seen.__setitem__(i, (c.copy(), e.copy())),
    )  # fmt: skip
    return seen, coef, it, ok


@pytest.mark.parametrize("affine", [False, True], ids=["linear", "affine"])
@pytest.mark.parametrize("n,d", [(29, 47), (37, 11)], ids=["D>N (N-space)", "D<N (D-space)"])
def test_iterates_match_the_transcription_of_their_code(n, d, affine):
    x = _points(n, d, seed=n)
    ref, _, _, _ = _reference_iterates(x, 25, affine=affine)
    ours = {}
    res = solve_ssc_equality(
        torch.from_numpy(x), max_iter=25, eps=1e-12, dtype=torch.float64, affine=affine,
        callback=lambda i, c, e: ours.__setitem__(i, (c.clone(), e.clone())),
    )  # fmt: skip
    assert res.strategy == ("n-space" if d > n else "d-space")
    assert sorted(ours) == sorted(ref) == list(range(1, 26))
    for i in ours:
        np.testing.assert_allclose(ours[i][0].numpy(), ref[i][0], rtol=0, atol=1e-10)
        np.testing.assert_allclose(ours[i][1].numpy(), ref[i][1], rtol=0, atol=1e-9)
    assert bool((ours[25][1] != 0).any()), "the outlier term never became active"
    assert torch.all(res.coef.diagonal() == 0)


def test_parameters_match_their_formulas():
    x = _points(13, 9, seed=1)
    gamma, mu1 = equality_parameters(torch.from_numpy(x), 20.0, 30.0)
    y = x.T
    assert gamma == pytest.approx(20.0 / np.abs(y).sum(axis=0).max(), rel=1e-12)
    p = np.hstack([y, np.eye(9) / gamma])
    t = np.abs(p.T @ y)
    t[:13] -= np.diag(np.diag(t[:13]))
    assert mu1 == pytest.approx(30.0 / t.max(axis=0).min(), rel=1e-12)


@pytest.mark.parametrize("affine", [False, True], ids=["linear", "affine"])
def test_stops_where_their_code_stops(affine):
    x = _points(21, 30, seed=3, corrupt=0)
    _, coef, it, ok = _reference_iterates(x, 2000, eps=1e-3, affine=affine)
    assert ok and it < 2000
    res = solve_ssc_equality(
        torch.from_numpy(x), eps=1e-3, max_iter=2000, dtype=torch.float64, affine=affine
    )
    assert res.converged and res.iterations == it
    assert res.residual <= 1e-3
    np.testing.assert_allclose(res.coef.numpy(), coef, atol=1e-10)
    if affine:  # the constraint 1^T C = 1^T holds to the tolerance (C is Z soft-thresholded)
        np.testing.assert_allclose(coef.sum(axis=0), 1.0, atol=0.05)
        np.testing.assert_allclose(res.coef.sum(dim=0).numpy(), coef.sum(axis=0), atol=1e-10)


def test_float32_close_to_float64():
    x = _points(40, 64, seed=4)
    r64 = solve_ssc_equality(torch.from_numpy(x), max_iter=149)  # float64 in, float64 C
    r32 = solve_ssc_equality(torch.from_numpy(x), max_iter=149, dtype=torch.float32)
    assert r64.coef.dtype == torch.float64 and r32.coef.dtype == torch.float32
    rel = float((r32.coef.double() - r64.coef).norm() / r64.coef.norm())
    assert rel < 1e-4


def test_recovers_independent_subspaces_with_gross_errors():
    g = torch.Generator().manual_seed(5)
    d, dim, n_per, k = 60, 3, 12, 4
    xs = [
        (torch.randn(d, dim, generator=g, dtype=torch.float64)
         @ torch.randn(dim, n_per, generator=g, dtype=torch.float64)).T
        for _ in range(k)
    ]  # fmt: skip
    x = torch.cat(xs)
    truth = torch.arange(k).repeat_interleave(n_per)
    bad = [(2, 7), (17, 40), (30, 3)]
    for i, j in bad:
        x[i, j] += 25.0
    res = sparse_subspace_clustering(
        x, k, data_term="exact", affine=False, alpha_e=20.0, alpha_z=20.0, rho=20.0,
        max_iter=400, affinity="column_max", assign_labels="kmeans", dtype=torch.float64,
    )  # fmt: skip
    assert adjusted_rand_score(truth.numpy(), res.labels.numpy()) == 1.0
    same = truth[:, None] == truth[None, :]
    c = res.coef.abs()
    assert float(c[~same].sum()) < 1e-3 * float(c.sum())
    e = solve_ssc_equality(x, max_iter=400, dtype=torch.float64).outliers  # D x N
    for i, j in bad:  # each gross error is the largest outlier of its point
        assert int(e[:, i].abs().argmax()) == j


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(affine=False, outliers=False), "outliers=False"),
        (dict(affine=False, backend="cupy"), "backend='cupy'"),
        (dict(affine=False, solver="fast"), "solver='fast'"),
        (dict(affine=False, solver="workset"), "solver='workset'"),  # (ran E&V's, said workset)
        (dict(affine=False, data_term="l1"), "data_term: expected one of"),
    ],
)
def test_unsupported_combinations_raise(kw, match):
    x = torch.from_numpy(_points(12, 8, seed=6))
    with pytest.raises(ValueError, match=match):
        sparse_subspace_clustering(x, 2, **{"data_term": "exact", **kw})


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(rho=0.0), "rho"),
        (dict(eps=-1.0), "eps"),
        (dict(max_iter=0), "max_iter"),
        (dict(alpha_e=0.0), "alpha_e"),
    ],
)
def test_bad_parameters_raise(kw, match):
    with pytest.raises(ValueError, match=match):
        solve_ssc_equality(torch.from_numpy(_points(12, 8, seed=7)), **kw)


def test_zero_points_raise_clearly():
    with pytest.raises(ValueError, match="every point is zero"):
        solve_ssc_equality(torch.zeros(5, 4))


@pytest.mark.parametrize("affine", [False, True], ids=["linear", "affine"])
def test_sparse_subspace_clustering_passes_the_program_through(affine):
    x = _points(24, 16, seed=8)
    _, coef, it, _ = _reference_iterates(x, 30, affine=affine)
    res = sparse_subspace_clustering(
        torch.from_numpy(x), 3, data_term="exact", affine=affine, alpha_e=20.0, alpha_z=20.0,
        rho=20.0, eps=1e-12, max_iter=30, dtype=torch.float64,
    )  # fmt: skip
    assert res.iterations == it == 30
    np.testing.assert_allclose(res.coef.numpy(), coef, atol=1e-10)
    assert res.labels.shape == (24,)
