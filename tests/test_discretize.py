"""The discretisation with its decisions compiled (videoanchor/anchor/labels.py, issue 90)
against the torch loop it replaced (tests/discretize_reference.py, the package at 63b1203):
the same labels, and the same margins and stability bit for bit, on the test sets and on
random embeddings, singular ``T`` included; the shortcuts it takes (the last SVD skipped,
labellings and products remembered, pick alternatives cut short) change nothing; one host
copy in, its operators and host reads counted."""

import numpy as np
import pytest
import torch
from discretize_reference import (
    discretize_reference,
    path_margin_reference,
    steady_stability_reference,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from benchmarks.bench_host_overhead import host_counts
from benchmarks.bench_spectral import group_affinity
from videoanchor.anchor import labels as labels_module
from videoanchor.anchor.clustering import (
    discretize,
    label_random_state,
    labels_from_embedding,
    steady_stability,
)
from videoanchor.anchor.eigensolvers import spectral_pairs
from videoanchor.anchor.labels import path_margin, paths_of


def clustered(seed, n, k, groups, noise, duplicates):
    """An ``n x k`` embedding: rows near ``groups`` random centres (``noise``), a share
    ``duplicates`` of them copies of other rows (repeated picks, empty labels: singular T)."""
    rs = np.random.RandomState(seed)
    e = rs.randn(groups, k)[rs.randint(groups, size=n)] + noise * rs.randn(n, k)
    d = int(duplicates * n)
    if d:
        e[rs.randint(n, size=d)] = e[rs.randint(n, size=d)]
    return torch.from_numpy(e)


def spectral(w, k):
    """``(embedding, eigengap)`` of an affinity, as the steady share reads them."""
    theta, vecs, dd, _ = spectral_pairs(w, k, extra=12)
    return vecs[:, :k] / dd[:, None], float(theta[k - 1] - theta[k])


def assert_same(e, gap, seed, draws):
    n, k = e.shape
    rng = label_random_state(seed, n)
    want = torch.stack([discretize_reference(e, random_state=rng) for _ in range(draws)])
    assert torch.equal(labels_from_embedding(e, k, seed=seed, draws=draws), want)
    assert torch.equal(discretize(e, seed=seed), discretize_reference(e, seed=seed))
    labels, z = steady_stability(e, gap, seed=seed, draws=draws)
    want_labels, want_z = steady_stability_reference(e, gap, seed=seed, draws=draws)
    assert torch.equal(labels, want_labels) and torch.equal(labels, want)
    assert z == want_z, (z, want_z)
    assert path_margin(e, seed=seed) == path_margin_reference(e, seed=seed)


@pytest.mark.parametrize("structure", ["gap", "no_gap"])
def test_the_same_bit_for_bit_on_the_spectral_benchmarks_affinities(structure):
    """bench_spectral's affinities at N = 600, k = 24: 24 separated groups, and 16 groups with
    no gap at 24 (repeated picks, empty labels); three seeds, two draws each, the eigengap's
    own stability and one that puts the margins inside the ramp (pick alternatives run)."""
    groups, nnz, p_out = {"gap": (24, 10, 0.02), "no_gap": (16, 60, 0.8)}[structure]
    e, gap = spectral(group_affinity(600, groups, nnz, p_out, seed=3, dtype=torch.float64), 24)
    for seed in range(3):
        assert_same(e, gap, seed, 2)
        assert_same(e, 1.5e-5 / path_margin_reference(e, seed=seed), seed, 1)


def ramp_gap(e, seed, scale):
    """An eigengap that puts the path's margin ``10**scale`` times the middle of the ramp
    (from below the floor, where the alternatives are not run, to past its top)."""
    m = path_margin_reference(e, seed=seed)
    return 1.5e-5 / m * 10.0**scale if 0 < m < float("inf") else 1.0


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    n=st.integers(8, 160),
    k=st.integers(2, 9),
    groups=st.integers(1, 12),
    noise=st.sampled_from([0.0, 1e-9, 1e-3, 0.05, 0.3, 1.0]),
    duplicates=st.sampled_from([0.0, 0.1, 0.5]),
    scale=st.floats(-1, 1),
    draws=st.integers(1, 3),
)
def test_the_same_bit_for_bit_on_random_embeddings(seed, n, k, groups, noise, duplicates,
                                                   scale, draws):  # fmt: skip
    e = clustered(seed, n, max(2, min(k, n - 1)), groups, noise, duplicates)
    assert_same(e, ramp_gap(e, seed % 1000, scale), seed % 1000, draws)


def test_an_alternative_cut_short_is_its_distance(monkeypatch):
    """A pick alternative whose margin falls to its distance ``a`` gives the term ``a``
    whatever partition it would end at: it stops there, and ``z`` is the reference's."""
    e = clustered(1354754446, 107, 7, 10, 1e-3, 0.0)
    gap = ramp_gap(e, 0, 0.0)
    cut = []
    iterate = labels_module.Paths.iterate

    def spy(self, *a, **kw):
        out = iterate(self, *a, **kw)
        cut.append(out[2])
        return out

    monkeypatch.setattr(labels_module.Paths, "iterate", spy)
    labels, z = steady_stability(e, gap)
    assert any(cut)
    assert (torch.equal(labels, steady_stability_reference(e, gap)[0])
            and z == steady_stability_reference(e, gap)[1])  # fmt: skip


def test_a_singular_t_takes_torchs_svd(monkeypatch):
    """Where a label is empty, T is singular and R = V U^T is LAPACK's choice of null vectors:
    the labels follow torch's SVD. With NumPy's (OpenBLAS) SVD in its place the same draw
    ends elsewhere on this set: the equality above is not the algorithm's alone."""
    e, _ = spectral(group_affinity(600, 16, 60, 0.8, seed=3, dtype=torch.float64), 24)
    want = discretize_reference(e, seed=1)
    assert torch.equal(discretize(e, seed=1), want)
    paths = paths_of(e)
    picks = paths.rotation(int(np.random.RandomState(1).randint(paths.n)))[1]
    assert paths.repeats(picks).any()  # repeated picks: their columns never win, T singular

    def numpy_svd(a, *, out):
        for o, x in zip(out, np.linalg.svd(a.numpy()), strict=True):
            o.copy_(torch.from_numpy(x))

    monkeypatch.setattr(torch.linalg, "svd", numpy_svd)
    assert not torch.equal(discretize(e, seed=1), want)


def test_one_copy_in_and_the_svds_reads_alone():
    """On the CPU's counter: the reference reads a value back at each pick and each SVD step
    (54 reads, 675 operators on this set); the compiled form reads the rows once
    (``numpy``) and otherwise only inside torch's SVD (its LAPACK status, at most twice a
    call here: a host tensor on any device)."""
    e, gap = spectral(group_affinity(600, 24, 10, 0.02, seed=3, dtype=torch.float64), 24)
    svds = []
    real = torch.linalg.svd

    def counted(*a, **kw):
        svds.append(1)
        return real(*a, **kw)

    discretize(e)  # compiled, warm
    torch.linalg.svd = counted
    try:
        new = host_counts(lambda: discretize(e), n=1)
    finally:
        torch.linalg.svd = real
    old = host_counts(lambda: discretize_reference(e), n=1)
    calls = len(svds) // 2  # (host_counts runs the call twice: a warm-up, then counted)
    assert 1 <= new["syncs_per_call"] <= 1 + 2 * calls, (new, calls)
    assert "numpy" in new["sync_ops"], new
    assert set(new["sync_ops"]) <= {"numpy", "aten::item", "aten::_local_scalar_dense"}, new
    assert new["syncs_per_call"] * 5 <= old["syncs_per_call"], (new, old)
    assert new["aten_ops_per_call"] * 2 <= old["aten_ops_per_call"], (new, old)


def test_bad_embeddings_are_refused():
    e = clustered(0, 30, 4, 3, 0.1, 0.0)
    e[3, 1] = float("nan")
    with pytest.raises(ValueError, match="finite"):
        discretize(e)
    with pytest.raises(ValueError, match="finite"):
        steady_stability(e, 0.1)
