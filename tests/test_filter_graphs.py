"""The Chebyshev filter step's graph, cached per shape (issue 90 step 1): on CUDA the step is
captured once per operator layout, shapes, dtype, device and nnz bucket and replayed with the
operator copied into static buffers. Without a GPU the CUDA branch's bookkeeping runs with a
stand-in capture (``capture=``): a "graph" whose replay runs the captured function again on
the same static buffers, as a replay reads them. Counted: the captures; checked: the answer
is the eager one from a fresh or a cached entry, dense or sparse CSR (to 1e-12: the static
buffers' alignment alone moves a CPU BLAS product's last bit)."""

from __future__ import annotations

import warnings

import pytest
import torch

from videoanchor.anchor import eigensolvers as es


def _same(a, b):
    (theta, q, info), (ref_theta, ref_q, ref_info) = a, b
    torch.testing.assert_close(theta, ref_theta, rtol=1e-12, atol=0)
    torch.testing.assert_close(q, ref_q, rtol=0, atol=1e-10)
    assert info["steps"] == ref_info["steps"] > 0 and info["converged"] == ref_info["converged"]


class FakeGraph:
    """A stand-in for a captured CUDA graph: ``replay`` runs ``run`` again into ``out``."""

    def __init__(self, run):
        self.run, self.out = run, run()

    def replay(self):
        self.out.copy_(self.run())


def fake_capture(run):
    g = FakeGraph(run)
    return g, g.out


@pytest.fixture(autouse=True)
def _fresh_cache():
    es._GRAPHS.clear()
    es.GRAPH_COUNTS.update(captures=0, replays=0)
    yield
    es._GRAPHS.clear()


def _affinity(n, per, seed, dtype=torch.float64):
    """A sparse symmetric non-negative affinity (``per`` neighbours a row, some blocks) and
    its normalised S as sparse CSR."""
    g = torch.Generator().manual_seed(seed)
    rows = torch.arange(n).repeat_interleave(per)
    block = n // 5
    cols = (rows // block) * block + torch.randint(0, block, (n * per,), generator=g)
    cols = cols.clamp_max(n - 1)
    vals = torch.rand(n * per, generator=g, dtype=dtype)
    w = torch.sparse_coo_tensor(torch.stack([rows, cols]), vals, (n, n), check_invariants=True)
    w = (w + w.t()).coalesce()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return es.sparse_normalized_affinity(w)[0]


def _run(s, k=5, seed=0, capture=fake_capture, operator=True):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return es.chebyshev_eigvecs(lambda x: s @ x, s.shape[0], k, dtype=s.dtype, device="cpu",
                                    seed=seed, tol=1e-9, operator=s if operator else None,
                                    capture=capture)  # fmt: skip


@pytest.mark.parametrize("dense", [False, True])
def test_one_capture_per_shape_and_the_eager_answer(dense):
    s1 = _affinity(203, 6, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        s2 = torch.sparse_csr_tensor(s1.crow_indices(), s1.col_indices(),
                                     s1.values() * 0.9, s1.shape)  # fmt: skip
    if dense:
        s1, s2 = s1.to_dense(), s2.to_dense()
    for s in (s1, s2, s1):
        out = _run(s)
        _same(out, _run(s, capture=None))  # eager on the CPU
        info = out[2]
    assert es.GRAPH_COUNTS["captures"] == 1  # the first call's; the others replayed
    assert es.GRAPH_COUNTS["replays"] > 3 * info["steps"] - 1


def test_nnz_buckets():
    """Sparse operators of one N: one capture per nnz bucket (under 1/8 padding each)."""
    for nnz in (1, 7, 8, 9, 100, 1000, 12345, 191_000):
        bucket, phantom = es._nnz_bucket(nnz, 2048)
        assert nnz <= bucket < nnz * 1.125 + 1 and phantom * 2048 >= bucket - nnz
    first = _affinity(150, 4, 0)
    same = next(s for s in (_affinity(150, 4, seed) for seed in range(1, 40))
                if s._nnz() != first._nnz()
                and es._nnz_bucket(s._nnz(), 150) == es._nnz_bucket(first._nnz(), 150))  # fmt: skip
    ops = [first, same, _affinity(150, 9, 2)]
    buckets = [es._nnz_bucket(s._nnz(), 150)[0] for s in ops]
    assert buckets[0] == buckets[1] != buckets[2], (buckets, [s._nnz() for s in ops])
    for s in ops:
        _same(_run(s), _run(s, capture=None))
    assert es.GRAPH_COUNTS["captures"] == 2


def test_the_cache_is_bounded_and_keyed_by_shape():
    ops = [_affinity(n, 5, n) for n in (101, 111, 121, 131, 141, 151)]
    for s in ops:
        _run(s)
    assert es.GRAPH_COUNTS["captures"] == len(ops)
    assert len(es._GRAPHS) == es.GRAPH_CACHE
    _run(ops[-1])  # kept
    _run(ops[0], k=5)  # dropped: captured again
    assert es.GRAPH_COUNTS["captures"] == len(ops) + 1
    _run(ops[-1], k=6)  # another block shape: another graph
    _run(ops[-1].to_dense())  # another layout
    _run(ops[-1].to(torch.float32))  # another dtype
    assert es.GRAPH_COUNTS["captures"] == len(ops) + 4


def test_no_capture_on_the_cpu_or_without_the_operator():
    s = _affinity(120, 5, 3)
    _run(s, capture=None)
    _run(s, operator=False)
    assert es.GRAPH_COUNTS["captures"] == 0 and not es._GRAPHS


def test_a_failed_capture_runs_eagerly_and_is_not_kept():
    s = _affinity(120, 5, 4)

    def refuse(run):
        raise RuntimeError("operation not permitted when stream is capturing")

    with pytest.warns(RuntimeWarning, match="no CUDA graph"):
        out = es.chebyshev_eigvecs(lambda x: s @ x, 120, 4, dtype=s.dtype, device="cpu",
                                   seed=0, tol=1e-9, operator=s, capture=refuse)  # fmt: skip
    assert torch.equal(out[1], _run(s, k=4, capture=None)[1]) and not es._GRAPHS


def test_an_entry_in_use_is_not_shared():
    """A call while another of the same shape holds the cached entry captures its own."""
    s = _affinity(130, 5, 5)
    x = es._start_block(130, 10, 0, "cpu", s.dtype)
    with es._filter_step(lambda v: s @ v, s, x, 8, fake_capture) as first:
        with es._filter_step(lambda v: s @ v, s, x, 8, fake_capture) as second:
            assert first is not second
    assert es.GRAPH_COUNTS["captures"] == 2 and len(es._GRAPHS) == 1
    with es._filter_step(lambda v: s @ v, s, x, 8, fake_capture) as third:
        assert third is first
