"""benchmarks/bench_spectral.py's Chebyshev prototype: with a gap at k it finds the leading
invariant subspace and eigh's labels; without one it still returns an orthonormal block."""

from __future__ import annotations

import torch

from benchmarks import bench_spectral as bs
from videoanchor.anchor.spectral import _normalized_affinity, spectral_clustering


def test_chebyshev_finds_the_leading_subspace_and_eigh_labels_with_a_gap():
    k = 8
    w = bs.group_affinity(300, k, 10, 0.02, seed=3).double()  # a gap after the 8th value
    s, _ = _normalized_affinity(w)
    q, theta = bs.chebyshev_eigvecs(s, k)
    ev, vec = torch.linalg.eigh(s)
    assert ev[-k] - ev[-k - 1] > 0.2  # the gap the filter relies on
    # the same invariant subspace: equal orthogonal projectors, eigenvalues descending
    top = vec[:, -k:]
    assert (q @ q.T - top @ top.T).abs().max().item() < 1e-6
    torch.testing.assert_close(theta, ev[-k:].flip(0), rtol=0, atol=1e-8)
    assert ((s @ q - q * theta).norm() < 1e-6).item()
    labels = bs.chebyshev_labels(w, k)
    ref = spectral_clustering(w, k, seed=0, eigen_solver="eigh")
    assert bs._ari(labels, ref) == 1.0


def test_chebyshev_without_a_gap_returns_an_orthonormal_block_of_fixed_work(monkeypatch):
    k = 8
    w = bs.group_affinity(200, 4, 40, 0.8, seed=1)
    s, _ = _normalized_affinity(w)
    calls = []
    real = torch.linalg.qr
    monkeypatch.setattr(torch.linalg, "qr", lambda x, *a, **kw: calls.append(1) or real(x))
    q, theta = bs.chebyshev_eigvecs(s, k, outer=3)
    assert len(calls) == 1 + 3  # the start and one per outer step: no convergence loop
    assert q.shape == (200, k) and torch.isfinite(q).all()
    torch.testing.assert_close(q.T @ q, torch.eye(k), rtol=0, atol=1e-5)
    assert torch.all(theta[:-1] >= theta[1:])
