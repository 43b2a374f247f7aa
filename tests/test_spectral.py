"""Spectral clustering in torch: embedding, discretisation, k-means, determinism."""

import numpy as np
import pytest
import torch
from sklearn.cluster import SpectralClustering
from sklearn.cluster._spectral import discretize as sk_discretize
from sklearn.metrics import adjusted_rand_score

from videoanchor.anchor.spectral import (
    discretize,
    kmeans,
    spectral_clustering,
    spectral_embedding,
    ssc_affinity,
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


def test_subspace_iteration_matches_eigh():
    w, _ = block_affinity([40, 50, 35, 45, 60, 30], p_out=0.05, seed=2)
    dense = spectral_embedding(w, 6, eigen_solver="eigh")
    it = spectral_embedding(w, 6, eigen_solver="subspace", seed=3)
    # same invariant subspace: the projections onto the two column spaces agree
    qd, _ = torch.linalg.qr(dense)
    qi, _ = torch.linalg.qr(it)
    assert torch.allclose(qd @ qd.T, qi @ qi.T, atol=1e-6)


@pytest.mark.parametrize("assign_labels", ["discretize", "kmeans"])
@pytest.mark.parametrize("eigen_solver", ["eigh", "subspace"])
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
def test_cuda_labels_equal_cpu_labels():
    w, _ = block_affinity([60, 70, 50, 80], p_out=0.05, seed=10)
    cpu = spectral_clustering(w, 4, seed=0, eigen_solver="subspace")
    gpu = spectral_clustering(w.cuda(), 4, seed=0, eigen_solver="subspace")
    assert torch.equal(gpu.cpu(), cpu)
