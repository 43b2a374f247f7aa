"""Host reads of the stages after the solve, counted on CPU tensors (issue 90 step 1: "a call
makes at most 5 host reads outside the solve"). ``benchmarks/bench_host_reads.py:
DeviceReads`` tells the tensors a GPU would hold from the host's and counts what reads a
device tensor's values: the Chebyshev step's rounds, the scores' checks, the certificate.
The route is CUDA's where the code branches on a choice (``eigen_solver="chebyshev"``)."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

from benchmarks.bench_host_reads import device_reads
from benchmarks.common import module_at
from videoanchor.anchor import clustering, eigensolvers, solve_ssc_workset
from videoanchor.anchor import scores as sc
from videoanchor.anchor.options import SSCOptions
from videoanchor.anchor.program import SSCSolution

ROOT = Path(__file__).resolve().parent.parent


def test_the_counter_tells_device_tensors_from_host_ones():
    dev = torch.arange(6.0)  # (made outside: a device tensor)

    def call():
        a = dev * 2
        float(a[0])  # read 1
        host = a.cpu()  # read 2
        float(host.sum()), host.tolist()  # host data: no read
        back = host.to(dev.device)  # to the device again
        bool(back.any())  # read 3
        b = torch.zeros(3)  # made on the host (no device=)
        int(b.argmax()), float(torch.tensor([1.0, 2.0]).sum())
        c = torch.zeros(3, device=dev.device)  # made on the device
        torch.nonzero(c), c.numpy()  # reads 4, 5
        c[c > 0], c[:, None][:, [0]]  # read 6: a boolean mask's count (not an index list)
        c[c > 0] = 1.0  # (setting through a mask: no read)

    assert device_reads(call) == ["aten::_local_scalar_dense", "cpu", "aten::_local_scalar_dense",
                                  "aten::nonzero", "numpy", "aten::index[bool]"]  # fmt: skip
    assert torch.equal(dev, torch.arange(6.0))


def _video(frames=8, patches=48, d=97, seed=0):
    from benchmarks.common import video_tokens

    return video_tokens(frames, patches, d, k=6, seed=seed)


@pytest.fixture(scope="module")
def solved():
    x = _video()
    return x, solve_ssc_workset(x.double())


def _ritz_calls(monkeypatch):
    """The products of the Rayleigh-Ritz rounds (the operator given to ``_chebyshev``)."""
    calls = []
    chebyshev = eigensolvers._chebyshev

    def counted(matmul, *a, **k):
        def matmul_counted(v):
            calls.append(v.shape[1])
            return matmul(v)

        return chebyshev(matmul_counted, *a, **k)

    monkeypatch.setattr(eigensolvers, "_chebyshev", counted)
    return calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_chebyshev_reads_once_a_round_in_float32(solved, dtype, monkeypatch):
    """A Rayleigh-Ritz round reads once in float32 (the projection and the residual's
    Grams together), twice in float64 (the residual from the vectors); the filter steps
    never."""
    _, res = solved
    w = clustering.ssc_affinity(res.coef.to(dtype))
    s, _ = eigensolvers._normalized_affinity(w)
    calls = _ritz_calls(monkeypatch)
    info = {}

    def call():
        info.update(eigensolvers.chebyshev_eigvecs(lambda v: s @ v, s.shape[0], 24, dtype=dtype,
                                                   device="cpu", seed=1)[2])  # fmt: skip

    reads = device_reads(call, where=True)
    rounds = len(calls)  # (the rounds' products: the filter steps hold their own)
    assert rounds >= 2 and info["steps"] > 0 and info["converged"]
    assert all("ritz" in r for r in reads)
    assert len(reads) == rounds * (1 if dtype == torch.float32 else 2), reads


def _old_scores():
    """``videoanchor/anchor/scores.py`` before the one-read scores (issue 90), imported."""
    return module_at("5da2264", "videoanchor/anchor/scores.py", "scores_before")


def _cases():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(37, 11, generator=g)
    c = torch.randn(37, 37, generator=g).abs() * (torch.rand(37, 37, generator=g) < 0.2)
    labels = torch.randint(0, 5, (2, 37), generator=g)
    shares = torch.rand(37, generator=g, dtype=torch.float64) * 0.9 + 0.05
    twins = x.clone()
    twins[[4, 9, 30]] = twins[2].clone()  # bitwise twins: one score
    flat = torch.ones(37, 37) / 37  # equal row sums: every score 0, warned
    same = x[:1].expand(37, 11) + 1e-6 * torch.randn(37, 11, generator=g)  # one point
    return {
        "plain": (x, c, labels, None), "shares": (x, c, labels[0], shares),
        "twins": (twins, c, labels, None), "flat rows": (x, flat, labels, None),
        "flat features": (same, c, labels, shares),
    }  # fmt: skip


@pytest.mark.parametrize("case", list(_cases()))
def test_scores_as_before_with_one_read(case):
    """``_scores_tied`` (compute_anchor_scores' scores) equals the former
    ``tie_duplicate_scores(x, anchor_scores(...))`` bit for bit, with its warnings; it reads
    once where no token has a twin."""
    old = _old_scores()
    x, c, labels, shares = _cases()[case]
    with warnings.catch_warnings(record=True) as w_old:
        warnings.simplefilter("always")
        ref = old.tie_duplicate_scores(x, old.anchor_scores(c, labels, shares=shares))
    with warnings.catch_warnings(record=True) as w_new:
        warnings.simplefilter("always")
        got = sc._scores_tied(x, c, labels, shares)
    assert torch.equal(got, ref)
    assert [str(m.message) for m in w_new] == [str(m.message) for m in w_old]
    assert torch.equal(sc.tie_duplicate_scores(x, sc.anchor_scores(c, labels, shares=shares)), ref)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reads = device_reads(lambda: sc._scores_tied(x, c, labels, shares))
    if case == "twins":
        assert len(reads) > 1
    else:  # (label_shares counts by a scatter: no read)
        assert reads == ["tolist"], reads


def test_bad_labels_and_shares_still_raise():
    x, c, labels, shares = _cases()["shares"]
    with pytest.raises(ValueError, match="non-negative"):
        sc._scores_tied(x, c, labels - 1, shares)
    with pytest.raises(ValueError, match="shares"):
        sc._scores_tied(x, c, labels, shares * 3)
    with pytest.raises(ValueError, match="non-negative"):
        sc.anchor_scores(c, labels - 1)


def _after_solve(x, res, share: str):
    """The stages after the solve of the default call on CUDA: the certificate (from G with
    the solver's support, as the GPU working sets call it), the clustering (Chebyshev, as on
    CUDA above 1024 tokens) and the scores."""
    coef = res.coef.float()
    y = x.double().T
    gram = y.T @ y
    support = torch.stack(torch.nonzero(res.coef, as_tuple=True))
    opts = SSCOptions(n_clusters=24, eigen_solver="chebyshev", cluster_share=share,
                      mode="exact").checked()  # fmt: skip

    def call():
        SSCSolution.certified(y, res.coef, torch.zeros_like(y), res.lambda_e, res.lambda_z,
                              like=x, dtype=torch.float32, timings={}, gram=gram,
                              support=support, iterations=1, converged=True)  # fmt: skip
        draws, shares, _ = clustering.cluster(coef, opts)
        sc._scores_tied(x, coef, draws, shares)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return device_reads(call, host=[(clustering, "discretize")], where=True)


@pytest.mark.parametrize("share", ["steady", "paper"])
def test_the_reads_after_the_solve_by_place(solved, share, monkeypatch):
    """Where the reads are: the certificate 1, the Chebyshev rounds 1 each (2 here: the
    random start block's Ritz values are not read), discretize's copy 1 and the scores 1
    (cluster() no longer reads its shares back, label_shares counts by a scatter). The
    steady share blends here (w < 1) and takes the soft share's eigenpairs from the same
    Chebyshev call (its window converged in the block): no second eigensolve, no read of
    its own."""
    x, res = solved
    seen = {}
    steady = clustering.steady_shares

    def recorded(*a, **k):
        out = steady(*a, **k)
        seen.update(out[2])
        return out

    monkeypatch.setattr(clustering, "steady_shares", recorded)
    reads = _after_solve(x, res, share)
    places = [r.split(" at ")[1].split(":")[0] + ":" + r.split("(")[-1].rstrip(")") for r in reads]
    assert places.count("eigensolvers.py:ritz") == 2, reads
    assert places.count("program.py:certified") == 1
    assert places.count("scores.py:_scores_tied") == 1
    assert places.count("labels.py:discretize_rows") == 1
    assert len(places) == 5, reads
    assert not any("_filtered_eigenpairs" in p for p in places)
    if share == "steady":
        assert 0.0 <= seen["share_weight"] < 1.0, seen  # the soft share is blended in


def test_at_most_five_reads_after_the_solve(solved):
    x, res = solved
    assert len(_after_solve(x, res, "steady")) <= 5
