"""Spectral clustering in torch: embedding, discretisation, k-means, determinism."""

import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.cluster import SpectralClustering
from sklearn.cluster._spectral import discretize as sk_discretize
from sklearn.metrics import adjusted_rand_score

import videoanchor.anchor.eigensolvers as eigensolvers
from benchmarks.bench_spectral import group_affinity
from videoanchor.anchor.clustering import (
    discretize,
    kmeans,
    label_random_state,
    labels_from_embedding,
    spectral_clustering,
    spectral_labels,
    ssc_affinity,
)
from videoanchor.anchor.eigensolvers import (
    EigenChoice,
    block_krylov_eigvecs,
    chebyshev_eigvecs,
    spectral_embedding,
)


def block_affinity(sizes, *, p_in=0.6, p_out=0.02, seed=0):
    """A noisy block-diagonal non-negative symmetric affinity with zero diagonal."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.cat([torch.full((s,), i) for i, s in enumerate(sizes)])
    n = labels.numel()
    same = labels[:, None] == labels[None, :]
    p = torch.where(same, p_in, p_out)
    w = torch.rand(n, n, generator=g, dtype=torch.float64) * (
        torch.rand(n, n, generator=g, dtype=torch.float64) < p
    )
    w = (w + w.T) / 2
    w.fill_diagonal_(0)
    return w, labels


def sparse_group_affinity(n, groups, *, nnz=10, p_out=0.3, seed=0, dtype=torch.float32):
    """``bench_spectral.group_affinity`` drawn in float64: with ``p_out = 0.3`` the
    normalised spectrum has ``groups`` leading values, then decays smoothly (no gap at a
    larger ``k``), as on real video tokens."""
    return group_affinity(n, groups, nnz, p_out, seed=seed, dtype=torch.float64).to(dtype)


def _normalized(w):
    s, _ = eigensolvers._normalized_affinity(w)
    return s


def test_ssc_affinity():
    c = torch.tensor([[0.0, -2.0, 0.5], [1.0, 0.0, 0.0], [0.0, 4.0, 0.0]])
    w = ssc_affinity(c)
    assert torch.equal(w, c.abs() + c.abs().T)
    wn = ssc_affinity(c, normalize="column_max")
    a = c.abs() / (c.abs().amax(dim=0, keepdim=True) + torch.finfo(c.dtype).eps)
    assert torch.allclose(wn, a + a.T)
    with pytest.raises(ValueError, match="square"):
        ssc_affinity(torch.zeros(2, 3))


def test_discretize_is_scikit_learns_algorithm():
    w, _ = block_affinity([17, 23, 11, 29], p_out=0.15, seed=1)
    emb = spectral_embedding(w, 4, eigen_solver="eigh").numpy()
    for seed in range(5):
        ours = discretize(torch.from_numpy(emb), seed=seed).numpy()
        theirs = sk_discretize(emb.copy(), random_state=seed)
        # same partition; our ids are renumbered by first appearance
        assert adjusted_rand_score(ours, theirs) == 1.0
        _, ours_first = np.unique(ours, return_index=True)
        assert sorted(ours[np.sort(ours_first)].tolist()) == list(range(len(ours_first)))


@pytest.mark.parametrize("eigen_solver", ["krylov", "chebyshev"])
def test_subspace_iteration_matches_eigh(eigen_solver):
    w, _ = block_affinity([40, 50, 35, 45, 60, 30], p_out=0.05, seed=2)
    dense = spectral_embedding(w, 6, eigen_solver="eigh")
    it = spectral_embedding(w, 6, eigen_solver=eigen_solver, seed=3)
    # same invariant subspace: the projections onto the two column spaces agree
    qd, _ = torch.linalg.qr(dense)
    qi, _ = torch.linalg.qr(it)
    assert torch.allclose(qd @ qd.T, qi @ qi.T, atol=1e-6)


@pytest.mark.parametrize("assign_labels", ["discretize", "kmeans"])
@pytest.mark.parametrize("eigen_solver", ["eigh", "krylov", "chebyshev"])
def test_recovers_blocks_like_scikit_learn(assign_labels, eigen_solver):
    w, labels = block_affinity([31, 45, 27, 52, 38], p_out=0.04, seed=4)
    ours = spectral_clustering(w, 5, seed=0, assign_labels=assign_labels, eigen_solver=eigen_solver)
    assert ours.dtype == torch.int64 and ours.shape == labels.shape
    assert adjusted_rand_score(labels.numpy(), ours.numpy()) == 1.0
    sk = SpectralClustering(
        5, affinity="precomputed", assign_labels="discretize", random_state=0
    ).fit_predict(w.numpy())
    assert adjusted_rand_score(sk, ours.numpy()) == 1.0


def test_same_seed_same_labels_and_ids_canonical():
    w, _ = block_affinity([20, 20, 20, 20], p_in=0.3, p_out=0.2, seed=5)  # ambiguous
    a = spectral_clustering(w, 4, seed=7)
    b = spectral_clustering(w.clone(), 4, seed=7)
    assert torch.equal(a, b)
    assert int(a[0]) == 0
    first = [int(torch.nonzero(a == c)[0]) for c in torch.unique(a)]
    assert first == sorted(first)


def test_isolated_nodes_do_not_produce_nan():
    w, _ = block_affinity([10, 12, 9], seed=6)
    w[3, :] = 0
    w[:, 3] = 0
    labels = spectral_clustering(w, 3, seed=0)
    assert labels.shape == (31,) and bool((labels >= 0).all())


def test_kmeans_separated_blobs():
    g = torch.Generator().manual_seed(8)
    centers = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]], dtype=torch.float64)
    truth = torch.arange(3).repeat_interleave(25)
    pts = centers[truth] + 0.5 * torch.randn(75, 2, generator=g, dtype=torch.float64)
    labels = kmeans(pts, 3, seed=0)
    assert adjusted_rand_score(truth.numpy(), labels.numpy()) == 1.0


def test_krylov_float32_no_gap_converges_on_the_block():
    """The issue's stall: float32, k = 24, the leading eigenvalue 1 and then a smooth decay
    from 0.24 (no gap at k), where the former Chebyshev subspace iteration ran all its 100
    rounds without converging. The block residual is met in a bounded number of steps and
    the Ritz values are the leading eigenvalues (float64 eigh)."""
    w = sparse_group_affinity(401, 16, nnz=60, p_out=0.8, seed=11)
    s = _normalized(w)
    ev, evec = torch.linalg.eigh(s.double())
    ev, evec = ev.flip(0), evec.flip(1)
    assert float(ev[0] - ev[1]) > 0.5 and float(ev[23] - ev[24]) < 0.01  # no gap at 24
    n = s.shape[0]
    theta, q, info = block_krylov_eigvecs(
        lambda x: s @ x, n, 24, dtype=s.dtype, device=s.device, seed=0, tol=1e-4,
        matmul_flops=2 * n * n,
    )  # fmt: skip
    assert info["converged"] and info["steps"] <= 40, info
    assert q.dtype == torch.float32 and q.shape == (n, 24)
    assert float((s.double() @ q.double() - q.double() * theta.double()).norm()) <= 1.5e-4
    torch.testing.assert_close(theta.double(), ev[:24], atol=1e-4, rtol=0)
    assert float((q.double().T @ evec[:, 0]).norm()) > 1 - 1e-6  # the isolated vector


def test_krylov_budget_falls_back_to_eigh_with_a_warning():
    w = sparse_group_affinity(300, 6, seed=12, dtype=torch.float64)
    choice = EigenChoice(crossover_cpu=100, crossover_cuda=100, eigh_cost=100.0)  # ample here
    dense = spectral_embedding(w, 6, eigen_solver="eigh")
    krylov = spectral_embedding(w, 6, eigen_solver="auto", seed=1, choice=choice)
    assert torch.equal(krylov, spectral_embedding(w, 6, eigen_solver="krylov", seed=1))
    qd, _ = torch.linalg.qr(dense)
    qk, _ = torch.linalg.qr(krylov)
    assert torch.allclose(qd @ qd.T, qk @ qk.T, atol=1e-6)
    assert not torch.equal(dense, krylov)  # auto above the crossover is not eigh
    with pytest.warns(RuntimeWarning, match="budget"):
        starved = spectral_embedding(w, 6, eigen_solver="auto", seed=1, max_iter=1, choice=choice)
    torch.testing.assert_close(starved, dense)
    # the default choice runs eigh at this N
    assert torch.equal(spectral_embedding(w, 6, eigen_solver="auto", seed=1), dense)
    with pytest.warns(RuntimeWarning, match="Krylov solver stopped at its budget.*last Ritz"):
        spectral_embedding(w, 6, eigen_solver="krylov", seed=1, max_iter=1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_chebyshev_no_gap_converges_on_the_block(dtype):
    """Where a former Chebyshev iteration stalled (float32, k = 24, no gap at k: the test
    above): the block residual is met, the Ritz values are the leading eigenvalues and the
    block holds the isolated leading vector; float64 to its own tolerance."""
    w = sparse_group_affinity(401, 16, nnz=60, p_out=0.8, seed=11, dtype=dtype)
    s = _normalized(w)
    ev, evec = torch.linalg.eigh(s.double())
    ev, evec = ev.flip(0), evec.flip(1)
    assert float(ev[23] - ev[24]) < 0.01  # no gap at 24
    tol = 1e-4 if dtype == torch.float32 else 1e-7
    theta, q, info = chebyshev_eigvecs(
        lambda x: s @ x, s.shape[0], 24, dtype=dtype, device="cpu", seed=0, tol=tol
    )
    assert info["converged"] and info["steps"] <= 30 and info["residual"] <= tol, info
    assert q.dtype == dtype and q.shape == (401, 24) and theta.dtype == torch.float64
    assert float((s.double() @ q.double() - q.double() * theta).norm()) <= 1.5 * tol
    assert (
        float((q.double().T @ q.double() - torch.eye(24, dtype=torch.float64)).abs().max()) < 1e-5
    )
    torch.testing.assert_close(theta, ev[:24], atol=10 * tol, rtol=0)
    assert float((q.double().T @ evec[:, 0]).norm()) > 1 - 1e-6


def test_chebyshev_is_what_auto_runs_off_the_cpu_and_its_budget_falls_back():
    """Above the crossover "auto" runs the solver the choice names for the device (here
    the GPU's, Chebyshev, on the CPU, with its default steps); out of steps it warns and
    finishes with eigh, and named explicitly it warns and keeps its Ritz vectors."""
    w = sparse_group_affinity(300, 6, seed=12, dtype=torch.float64)
    choice = EigenChoice(crossover_cpu=100, above_cpu="chebyshev")
    dense = spectral_embedding(w, 6, eigen_solver="eigh")
    cheb = spectral_embedding(w, 6, eigen_solver="auto", seed=1, choice=choice)
    steps = eigensolvers.CHEBYSHEV_STEPS
    assert torch.equal(cheb, spectral_embedding(w, 6, eigen_solver="chebyshev", seed=1,
                                                max_iter=steps))  # fmt: skip
    qd, _ = torch.linalg.qr(dense)
    qc, _ = torch.linalg.qr(cheb)
    assert torch.allclose(qd @ qd.T, qc @ qc.T, atol=1e-6)
    assert not torch.equal(dense, cheb)
    with pytest.warns(RuntimeWarning, match="Chebyshev solver stopped at its budget after 1 steps"):
        starved = spectral_embedding(w, 6, eigen_solver="auto", seed=1, max_iter=1, choice=choice)
    torch.testing.assert_close(starved, dense)
    with pytest.warns(
        RuntimeWarning, match="Chebyshev solver stopped at its budget after 1 steps.*last Ritz"
    ):
        kept = spectral_embedding(w, 6, eigen_solver="chebyshev", seed=1, max_iter=1)
    assert not torch.allclose(kept, dense, atol=1e-6)


def test_chebyshev_finds_the_leading_subspace_and_eigh_labels_with_a_gap():
    """With a gap after the k-th value: the leading invariant subspace and eigenvalues to
    float64 precision, and dense eigh's labels, in a few steps."""
    k = 8
    w = group_affinity(300, k, 10, 0.02, seed=3).double()
    s = _normalized(w)
    ev, vec = torch.linalg.eigh(s)
    assert ev[-k] - ev[-k - 1] > 0.2
    theta, q, info = chebyshev_eigvecs(lambda x: s @ x, 300, k, dtype=s.dtype, device="cpu",
                                       tol=1e-10)  # fmt: skip
    assert info["converged"] and info["steps"] <= 5, info
    top = vec[:, -k:]
    assert (q @ q.T - top @ top.T).abs().max().item() < 1e-9
    torch.testing.assert_close(theta, ev[-k:].flip(0), rtol=0, atol=1e-10)
    labels = spectral_clustering(w, k, seed=0, eigen_solver="chebyshev")
    ref = spectral_clustering(w, k, seed=0, eigen_solver="eigh")
    assert adjusted_rand_score(labels.numpy(), ref.numpy()) == 1.0


@settings(max_examples=25, deadline=None)
@given(
    sizes=st.lists(st.integers(8, 40), min_size=2, max_size=7),
    p_out=st.floats(0.0, 0.08),
    seed=st.integers(0, 2**16),
)
def test_chebyshev_finds_eighs_subspace_wherever_there_is_a_gap(sizes, p_out, seed):
    """Random block affinities of odd sizes: where the spectrum has a gap after the k-th
    value, the converged block spans eigh's leading subspace (Davis-Kahan: residual / gap)."""
    w, _ = block_affinity(sizes, p_out=p_out, seed=seed)
    k, n = len(sizes), sum(sizes)
    s = _normalized(w)
    ev, vec = torch.linalg.eigh(s)
    gap = float(ev[-k] - ev[-k - 1])
    theta, q, info = chebyshev_eigvecs(lambda x: s @ x, n, k, dtype=s.dtype, device="cpu",
                                       seed=seed, tol=1e-9, max_steps=200)  # fmt: skip
    assert q.shape == (n, k) and torch.isfinite(q).all()
    torch.testing.assert_close(q.T @ q, torch.eye(k, dtype=q.dtype), rtol=0, atol=1e-10)
    if gap > 0.05:
        assert info["converged"], (info, gap)
        top = vec[:, -k:]
        assert float((q @ q.T - top @ top.T).abs().max()) < 1e-6
        torch.testing.assert_close(theta, ev[-k:].flip(0), rtol=0, atol=1e-8)


def test_chebyshev_window_converges_the_soft_shares_pairs():
    """``window=(k - 1, width)`` (the steady share's call): the pairs down to ``theta_k -
    width`` and the next come back converged to ``tol`` (k = 24 asked, 25 converged, no gap:
    31 pairs, the last below the window), and the soft share from them is float64 eigh's
    to 2e-5 (float32; 6.8e-6 measured)."""
    from videoanchor.anchor.clustering import _soft_from_pairs, soft_cluster_shares

    w = sparse_group_affinity(401, 16, nnz=60, p_out=0.8, seed=11)
    s, dd = eigensolvers._normalized_affinity(w)
    theta, q, info = chebyshev_eigvecs(lambda x: s @ x, 401, 25, dtype=s.dtype, device="cpu",
                                       window=(23, 1e-2))  # fmt: skip
    assert info["converged"] and q.shape[1] == len(theta) > 25, (info, len(theta))
    assert float(theta[-1]) < float(theta[23]) - 1e-2 <= float(theta[-2])
    res = s.double() @ q.double() - q.double() * theta
    assert float(res.norm()) <= 1.5e-4
    soft = _soft_from_pairs(theta, q, dd, 24)
    ref = soft_cluster_shares(w.double(), 24)
    assert float((soft - ref).abs().max()) < 2e-5


def test_chebyshev_stops_where_rounded_products_stall_it():
    """Products rounded as TF32 rounds (a relative 2^-11 per entry) floor the residual
    near 1e-3: the solver stops a few steps after it stalls, not at its budget, and says
    so; exact products on the same operator converge."""
    w = sparse_group_affinity(401, 16, nnz=60, p_out=0.8, seed=11)
    s = _normalized(w)
    g = torch.Generator().manual_seed(0)

    def rounded(x):
        y = s @ x
        return y * (1 + 2.0**-11 * (2 * torch.rand(y.shape, generator=g) - 1))

    _, _, info = chebyshev_eigvecs(rounded, 401, 24, dtype=s.dtype, device="cpu", tol=1e-4)
    assert info["stalled"] and not info["converged"] and info["steps"] < 20, info
    assert info["residual"] > 1e-4
    _, _, exact = chebyshev_eigvecs(lambda x: s @ x, 401, 24, dtype=s.dtype, device="cpu")
    assert exact["converged"] and not exact["stalled"]


def test_chebyshev_arguments_checked():
    s = _normalized(block_affinity([20, 20], seed=9)[0])
    for kw, match in (({"degree": 0}, "degree"), ({"max_steps": 0}, "max_steps")):
        with pytest.raises(ValueError, match=match):
            chebyshev_eigvecs(lambda x: s @ x, 40, 2, dtype=s.dtype, device="cpu", **kw)
    with pytest.raises(ValueError, match="k: expected 1 <= k <= N = 40, got 41"):
        chebyshev_eigvecs(lambda x: s @ x, 40, 41, dtype=s.dtype, device="cpu")


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support:UserWarning")
def test_sparse_operator_and_its_budget_warning():
    """The blocked mode's entry point: a sparse CSR operator; out of budget it warns."""
    w = sparse_group_affinity(240, 5, nnz=6, p_out=0.05, seed=14, dtype=torch.float64)
    s = _normalized(w)
    s_csr = s.to_sparse_csr()
    kw = dict(seed=0, tol=1e-8, max_steps=200)
    theta, q, info = eigensolvers._block_eigvecs(s_csr, 5, "krylov", **kw)
    assert info["converged"]
    torch.testing.assert_close(theta, torch.linalg.eigvalsh(s).flip(0)[:5], atol=1e-8, rtol=0)
    with pytest.warns(RuntimeWarning, match="Krylov solver stopped at its budget after 1 steps"):
        eigensolvers._block_eigvecs(s_csr, 5, "krylov", **{**kw, "tol": 1e-14, "max_steps": 1})


@pytest.mark.parametrize("n", [29, 41], ids=lambda n: f"n{n}")
def test_krylov_when_the_basis_can_span_everything(n):
    """A block of 18 on N = 29 or 41 (under 3 blocks): the basis is capped at N columns."""
    w, _ = block_affinity([n // 3, n // 3, n - 2 * (n // 3)], p_out=0.3, seed=15)
    s = _normalized(w)
    theta, q, info = block_krylov_eigvecs(
        lambda x: s @ x, n, 10, dtype=s.dtype, device=s.device, tol=1e-9, matmul_flops=2 * n * n
    )
    assert info["converged"]
    torch.testing.assert_close(theta, torch.linalg.eigvalsh(s).flip(0)[:10], atol=1e-9, rtol=0)
    torch.testing.assert_close(q.T @ q, torch.eye(10, dtype=q.dtype), atol=1e-9, rtol=0)


def test_dense_partial_eigh_equals_full_eigh():
    w, _ = block_affinity([13, 21, 17, 30], p_out=0.2, seed=13)
    s = _normalized(w)
    part = eigensolvers._dense_top_eigvecs(s, 4)
    full = torch.linalg.eigh(s)[1][:, -4:].flip(1)
    assert torch.allclose(part.abs(), full.abs(), atol=1e-10)


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4, 5])
def test_seed_reproduces_scikit_learn_and_the_authors_global_seed(seed):
    """Eight blocks, strong cross-talk: the spectral embedding is well defined (gap at k)
    but discretize's random start row decides the partition. ``seed=s`` gives scikit-
    learn's ``random_state=s`` labels, and the authors' unseeded call after
    ``np.random.seed(s)``."""
    sizes = [31, 45, 27, 52, 38, 40, 33, 29]
    w, _ = block_affinity(sizes, p_in=0.5, p_out=0.3, seed=4)
    k = len(sizes)
    ours = spectral_clustering(w, k, seed=seed).numpy()
    sk = SpectralClustering(
        k, affinity="precomputed", assign_labels="discretize", random_state=seed
    ).fit_predict(w.numpy())
    assert adjusted_rand_score(sk, ours) == 1.0
    np.random.seed(seed)
    authors = SpectralClustering(k, affinity="precomputed", assign_labels="discretize").fit_predict(
        w.numpy()
    )
    assert adjusted_rand_score(authors, ours) == 1.0
    # the fresh-RandomState draw (the former default) gives a different partition here
    fresh = discretize(spectral_embedding(w, k), seed=seed).numpy()
    assert adjusted_rand_score(sk, fresh) < 0.9


def test_label_draws_continue_one_random_stream():
    sizes = [31, 45, 27, 52, 38, 40, 33, 29]
    w, _ = block_affinity(sizes, p_in=0.5, p_out=0.3, seed=4)
    n, k = w.shape[0], len(sizes)
    draws = spectral_labels(w, k, seed=3, draws=4)
    assert draws.shape == (4, n) and draws.dtype == torch.int64
    assert torch.equal(draws[0], spectral_clustering(w, k, seed=3))
    emb = spectral_embedding(w, k)
    rng = label_random_state(3, n)
    for r in range(4):
        assert torch.equal(draws[r], discretize(emb, random_state=rng))
    assert len({tuple(d.tolist()) for d in draws}) > 1  # the draws differ on this input
    km = labels_from_embedding(emb, k, seed=3, assign_labels="kmeans", draws=3)
    assert torch.equal(km[0], spectral_clustering(w, k, seed=3, assign_labels="kmeans"))
    with pytest.raises(ValueError, match="label_draws"):
        labels_from_embedding(emb, k, draws=0)
    with pytest.raises(TypeError, match="label_draws"):
        labels_from_embedding(emb, k, draws=2.0)


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"n_clusters": 0}, "n_clusters"),
        ({"n_clusters": 99}, "n_clusters"),
        ({"assign_labels": "qr"}, "assign_labels"),
        ({"eigen_solver": "arpack"}, "eigen_solver"),
    ],
    ids=["zero", "too-many", "assign", "solver"],
)
def test_bad_arguments(kw, match):
    w, _ = block_affinity([20, 20], seed=9)
    args = {"n_clusters": 2, **kw}
    with pytest.raises(ValueError, match=match):
        spectral_clustering(w, args.pop("n_clusters"), **args)


@pytest.mark.gpu
@pytest.mark.parametrize("eigen_solver", ["krylov", "chebyshev"])
def test_cuda_labels_equal_cpu_labels(eigen_solver):
    w, _ = block_affinity([60, 70, 50, 80], p_out=0.05, seed=10)
    cpu = spectral_clustering(w, 4, seed=0, eigen_solver=eigen_solver)
    gpu = spectral_clustering(w.cuda(), 4, seed=0, eigen_solver=eigen_solver)
    assert torch.equal(gpu.cpu(), cpu)


def test_chebyshev_host_reads_do_not_grow_with_its_steps():
    """The filter steps read nothing back: runs of 3, 7 and 25 steps (tol 0: every step
    runs, in the first round's 2, which reads nothing, and one round) read values the same
    number of times, counted as bench_host_overhead counts them (the profiler's scalar
    reads, each ``item`` counted with its ``_local_scalar_dense``, plus ``tolist``). On the
    CPU that count includes reads of host tensors (the host eigh's error check, the Ritz
    values and residuals): 20 per call, of which two rounds x (the projection's ``tolist``,
    the residuals') read device data on a GPU (bench_host_reads.device_reads: 4)."""
    from benchmarks.bench_host_overhead import host_counts
    from benchmarks.bench_host_reads import device_reads

    w = sparse_group_affinity(203, 7, nnz=9, p_out=0.1, seed=16, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # sparse CSR is "beta"
        s = _normalized(w).to_sparse_csr()
        counts, reads = {}, {}
        for max_steps in (3, 7, 25):
            info = {}

            def call(max_steps=max_steps, info=info):
                info.update(chebyshev_eigvecs(lambda x: s @ x, 203, 7, dtype=s.dtype,
                                              device="cpu", tol=0.0, max_steps=max_steps)[2])  # fmt: skip

            counts[max_steps] = host_counts(call, n=2)["syncs_per_call"]
            reads[max_steps] = len(device_reads(call))
            assert info["steps"] == max_steps and not info["converged"]
    assert counts == {3: 20, 7: 20, 25: 20}, counts
    assert reads == {3: 4, 7: 4, 25: 4}, reads


@pytest.mark.parametrize("n,k", [(157, 5), (311, 9)], ids=["n157-k5", "n311-k9"])
def test_chebyshev_with_a_gap_converges_in_one_round_to_eighs_labels(n, k):
    """Odd shapes with a gap at k: the first round's step count suffices (host reads: 4),
    and the labels are dense eigh's (float64)."""
    w = group_affinity(n, k, 10, 0.02, seed=n).double()
    s = _normalized(w)
    ev = torch.linalg.eigvalsh(s)
    assert ev[-k] - ev[-k - 1] > 0.1
    _, _, info = chebyshev_eigvecs(lambda x: s @ x, n, k, dtype=s.dtype, device="cpu", tol=1e-7)
    assert info["converged"] and info["steps"] <= 4, info
    for seed in (0, 3):
        labels = spectral_clustering(w, k, seed=seed, eigen_solver="chebyshev")
        assert torch.equal(labels, spectral_clustering(w, k, seed=seed, eigen_solver="eigh"))


def test_chebyshev_filter_step_is_the_polynomial():
    """The step the CUDA graph captures, run eagerly on the CPU with tensor ``centre`` and
    ``half`` (as the graph holds them): its span is ``T_d((S - c) / h) X``'s, computed in
    float64 from the eigendecomposition."""
    w, _ = block_affinity([23, 31, 19], p_out=0.1, seed=17)
    s = _normalized(w)
    x = torch.linalg.qr(torch.randn(73, 5, generator=torch.Generator().manual_seed(1),
                                    dtype=torch.float64))[0]  # fmt: skip
    c, h = torch.tensor(-0.4, dtype=torch.float64), torch.tensor(0.6, dtype=torch.float64)
    out = eigensolvers._filter(lambda v: s @ v, x, c, h, 6)
    ev, vec = torch.linalg.eigh(s)
    t = torch.cos(6 * torch.acos(((ev - c) / h).clamp(-1, 1)))
    big = (ev - c) / h > 1
    t[big] = torch.cosh(6 * torch.acosh((ev[big] - c) / h))
    ref = torch.linalg.qr(vec @ (t[:, None] * (vec.T @ x)))[0]
    torch.testing.assert_close(out @ out.T, ref @ ref.T, rtol=0, atol=1e-10)
    with eigensolvers._filter_step(lambda v: s @ v, s, x, 6) as step:  # no CUDA here: eager
        assert not isinstance(step, eigensolvers._Static)
        torch.testing.assert_close(step(x, -0.4, 0.6), out, rtol=0, atol=1e-12)


def test_a_failed_lapack_subset_driver_gives_the_full_eighs_pairs(monkeypatch):
    """LAPACK's MRRR (``evr``) can fail with "Internal Error" on the repeated eigenvalues of
    identical tokens (scipy-openblas 0.3.30 on an AMD EPYC: test_bad_input's identical
    tokens, issue 97); the subset falls back to the full ``eigh``, sliced: the same pairs."""
    import scipy.linalg

    g = torch.Generator().manual_seed(3)
    a = torch.randn(37, 37, generator=g, dtype=torch.float64)
    a = (a + a.T).numpy()
    want_w, want_v = eigensolvers._subset_eigh(a, 30, 36, "evr")
    real = scipy.linalg.eigh

    def failing(m, **kw):
        if "subset_by_index" in kw:
            raise np.linalg.LinAlgError("Internal Error.")
        return real(m, **kw)

    monkeypatch.setattr(scipy.linalg, "eigh", failing)
    for driver in ("evr", "evx"):
        w, v = eigensolvers._subset_eigh(a, 30, 36, driver)
        assert w.shape == (7,) and v.shape == (37, 7)
        np.testing.assert_allclose(w, want_w, rtol=0, atol=1e-12)
        np.testing.assert_allclose(np.abs(v.T @ want_v), np.eye(7), rtol=0, atol=1e-10)
