"""The spectral step on a sparse affinity (blocked mode's path, issue 52 item 3): ARPACK on
the CPU, the Chebyshev solver on a GPU, block Krylov as the fallback, dense eigh's labels."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import scipy.sparse
import scipy.sparse.linalg
import torch
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

from benchmarks.bench_spectral import group_affinity
from videoanchor.anchor import compute_anchor_scores, eigensolvers
from videoanchor.anchor.clustering import sparse_spectral_labels, spectral_labels


def _sparse(n, groups=6, nnz=8, p_out=0.02, seed=0):
    return group_affinity(n, groups, nnz, p_out, seed=seed).double().to_sparse()


def _eigengap(w, k):
    """The normalised affinity's k-th eigenvalue less its (k+1)-th (dense eigvalsh)."""
    s, _ = eigensolvers.sparse_normalized_affinity(w)
    ev = torch.linalg.eigvalsh(s.to_dense()).flip(0)
    return float(ev[k - 1] - ev[k])


@pytest.mark.parametrize("n", [97, 160])
def test_arpack_krylov_and_dense_eigh_give_the_same_labels_where_there_is_a_gap(n):
    w = _sparse(n)
    # a gap (0.49 and 0.48) far above the solvers' tolerances: the labels are the problem's,
    # not the arithmetic's, so they agree on any CPU (issue 80)
    assert _eigengap(w, 6) > 0.1
    dense = spectral_labels(w.to_dense(), 6, seed=3, eigen_solver="eigh", draws=2)
    for solver in ("auto", "arpack", "subspace", "chebyshev"):
        got = sparse_spectral_labels(w, 6, seed=3, eigen_solver=solver, draws=2)
        assert got.dtype == torch.long and got.shape == (2, n)
        assert torch.equal(got, dense), solver


def test_arpack_vectors_are_the_leading_ones_to_its_tolerance():
    w = _sparse(150, groups=10, nnz=12, p_out=0.3, seed=1)
    s, _ = eigensolvers.sparse_normalized_affinity(w)
    q = eigensolvers._top_eigvecs_arpack(s, 10, seed=0)
    assert q.shape == (150, 10) and q.dtype == torch.float64
    ev = torch.linalg.eigvalsh(s.to_dense()).flip(0)
    theta = ((s @ q) * q).sum(0)
    torch.testing.assert_close(theta, ev[:10], rtol=0, atol=1e-10)  # descending, the top 10
    assert float((s @ q - q * theta).norm()) < 1e-7
    torch.testing.assert_close(q.T @ q, torch.eye(10, dtype=q.dtype), rtol=0, atol=1e-10)


def test_repeated_eigenvalue_one_is_found_per_component():
    """Three disconnected groups: eigenvalue 1 three times. ARPACK on the whole matrix
    (one start vector) returns 0.60 in place of the third copy; per component it cannot."""
    w = group_affinity(44, 3, 6, 0.0, seed=0).double()
    s, _ = eigensolvers.sparse_normalized_affinity(w.to_sparse())
    whole = scipy.sparse.linalg.eigsh(
        scipy.sparse.csr_matrix(s.to_dense().numpy()), k=3, which="LA",
        v0=np.random.RandomState(0).uniform(-1, 1, 44), tol=eigensolvers.ARPACK_TOL,
    )[0]  # fmt: skip
    assert np.sort(whole)[0] < 0.9  # the failure this guards against (scipy's ARPACK)
    q = eigensolvers._top_eigvecs_arpack(s, 3, seed=0)
    torch.testing.assert_close(((s @ q) * q).sum(0), torch.ones(3, dtype=q.dtype), rtol=0,
                               atol=1e-12)  # fmt: skip
    dense = spectral_labels(w, 3, seed=0, eigen_solver="eigh")
    assert torch.equal(sparse_spectral_labels(w.to_sparse(), 3, seed=0), dense)


def test_more_components_than_clusters_go_to_the_block_solver():
    w = group_affinity(120, 8, 6, 0.0, seed=4).double().to_sparse()  # 8 components, k = 4
    assert eigensolvers._top_eigvecs_arpack(
        w.to_sparse_csr(), 4, seed=0
    ) is None  # fmt: skip
    got = sparse_spectral_labels(w, 4, seed=0, eigen_solver="arpack")
    assert torch.equal(got, sparse_spectral_labels(w, 4, seed=0, eigen_solver="subspace"))
    # Chebyshev on the same (a GPU's "auto"): a block method too, the eigenvalue 1 of all 8
    # components in its block; which 4 of the 8 span the embedding is any solver's choice
    s, _ = eigensolvers.sparse_normalized_affinity(w)
    theta, q, info = eigensolvers.chebyshev_eigvecs(lambda x: s @ x, 120, 4, dtype=s.dtype,
                                                device="cpu", tol=1e-7, max_steps=200)  # fmt: skip
    assert info["converged"] and q.shape == (120, 4)
    torch.testing.assert_close(theta, torch.ones(4, dtype=torch.float64), rtol=0, atol=1e-9)
    assert float((s @ q - q * theta).norm()) < 1e-7


def test_sparse_chebyshev_runs_its_solver_and_warns_at_its_budget():
    """``eigen_solver="chebyshev"`` (what "auto" runs off the CPU: tested on a GPU below)
    runs the Chebyshev solver and gives ARPACK's labels where there is a gap; out of steps
    it says so (naming the solver) and keeps its vectors."""
    w = _sparse(160)
    got = sparse_spectral_labels(w, 6, seed=3, eigen_solver="chebyshev")
    assert torch.equal(got, sparse_spectral_labels(w, 6, seed=3, eigen_solver="arpack"))
    with pytest.warns(RuntimeWarning, match="Chebyshev solver stopped at its budget after 1 steps"):
        sparse_spectral_labels(w, 6, seed=3, eigen_solver="chebyshev", max_steps=1)


def test_arpack_that_does_not_converge_says_so_and_krylov_finishes(monkeypatch):
    w = _sparse(120)

    def fail(*a, **k):
        raise scipy.sparse.linalg.ArpackNoConvergence("no convergence (mocked)", None, None)

    monkeypatch.setattr(scipy.sparse.linalg, "eigsh", fail)
    with pytest.warns(RuntimeWarning, match="ARPACK did not converge.*block Krylov"):
        got = sparse_spectral_labels(w, 6, seed=0, eigen_solver="arpack")
    assert torch.equal(got, sparse_spectral_labels(w, 6, seed=0, eigen_solver="subspace"))


def test_bad_eigen_solver_for_a_sparse_affinity_is_refused():
    with pytest.raises(
        ValueError, match="expected 'auto', 'arpack', 'subspace' or 'chebyshev'.*'eigh'"
    ):
        sparse_spectral_labels(_sparse(60), 6, eigen_solver="eigh")
    x = torch.randn(40, 8, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="mode='exact': expected eigen_solver"):
        compute_anchor_scores(x, 3, mode="exact", eigen_solver="arpack")


def test_blocked_mode_runs_arpack_by_default_on_the_cpu():
    g = torch.Generator().manual_seed(2)
    x = torch.cat([torch.randn(40, 3, generator=g) @ torch.randn(3, 12, generator=g)
                   for _ in range(3)])  # fmt: skip
    kw = dict(mode="blocked", max_iter=300, block_columns=32, progress=False)
    auto = compute_anchor_scores(x, 3, **kw)
    for solver in ("arpack", "subspace"):
        other = compute_anchor_scores(x, 3, eigen_solver=solver, **kw)
        assert torch.equal(auto.labels, other.labels)
        torch.testing.assert_close(auto.scores, other.scores, rtol=0, atol=0)
    # what "auto" runs on the CPU is ARPACK, no block solver: a block solver held to one
    # step would warn (as "subspace" does)
    w = _sparse(160)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        sparse_spectral_labels(w, 6, seed=3, max_steps=1)
    with pytest.warns(RuntimeWarning, match="Krylov solver stopped at its budget after 1 steps"):
        sparse_spectral_labels(w, 6, seed=3, eigen_solver="subspace", max_steps=1)


@settings(max_examples=12, deadline=None)
@given(n=st.integers(40, 140), groups=st.integers(2, 8), seed=st.integers(0, 2**16))
@example(n=44, groups=3, seed=0)  # ARPACK on the whole matrix missed a copy of eigenvalue 1
def test_arpack_matches_dense_eigh_on_affinities_with_a_gap(n, groups, seed):
    w = _sparse(n, groups=groups, nnz=6, p_out=0.0, seed=seed)  # disconnected groups
    deg = w.to_dense().sum(1).sqrt()
    ev = torch.linalg.eigvalsh(w.to_dense() / deg[:, None] / deg[None, :]).flip(0)
    assume(float(ev[groups - 1] - ev[groups]) > 1e-3)  # each group connected: a gap at k
    dense = spectral_labels(w.to_dense(), groups, seed=seed, eigen_solver="eigh")
    got = sparse_spectral_labels(w, groups, seed=seed, eigen_solver="arpack")
    from sklearn.metrics import adjusted_rand_score

    assert adjusted_rand_score(dense[0].numpy(), got[0].numpy()) == 1.0


def test_bench_sparse_spectral_quick_rows(tmp_path):
    from benchmarks import bench_sparse_spectral as bench

    path = bench.main(["--quick", "--device", "cpu", "--out-dir", str(tmp_path)])
    data = json.loads(path.read_text())
    rows = data["rows"]
    assert {r["provider"] for r in rows} == {
        "sparse_auto", "sparse_arpack", "sparse_krylov", "sparse_chebyshev", "dense_eigh"
    }  # fmt: skip
    assert {r["affinity"] for r in rows} == {"gap", "no_gap"}
    for r in rows:
        assert r["n"] == 512 and r["median_s"] > 0
        if r["provider"] == "dense_eigh":
            continue
        # what the affinity defines, on any CPU: the span of the top 24 eigenvectors, to
        # within the solver's residual over the eigengap (Davis-Kahan, a factor 2 of slack)
        assert r["block_residual"] < 1e-7
        assert r["subspace_sin"] <= 2 * r["block_residual"] / r["eigengap"] + 1e-12, r
        if r["affinity"] == "gap":  # a clear gap at 24 (0.50): the labels are defined, agree
            assert r["eigengap"] > 0.1 and r["ari_vs_dense_eigh"] == 1.0, r
        else:  # 1.1e-3: which labels come out depends on the arithmetic (issue 80: ARI 0.93
            # on an AVX-512 Xeon for spans 1.5e-6 apart, 1.0 elsewhere): only reported
            assert r["eigengap"] < 0.1 and 0.0 <= r["ari_vs_dense_eigh"] <= 1.0, r


@pytest.mark.gpu
def test_sparse_auto_on_cuda_is_chebyshev_with_the_cpu_labels():
    w = _sparse(160)
    got = sparse_spectral_labels(w.cuda(), 6, seed=3)
    assert torch.equal(got.cpu(), sparse_spectral_labels(w, 6, seed=3))
    with pytest.warns(RuntimeWarning, match="Chebyshev solver stopped at its budget after 1 steps"):
        sparse_spectral_labels(w.cuda(), 6, seed=3, max_steps=1)
