"""Bad input at every public entry point (issue 23): each case asserts the exact error type
and a phrase of its message, or the correct result. No case may hang (the distributed
cases run under a 20 s collective timeout) or crash the process.

Cost here (2 CPU cores): about a minute, most of it the tiny-model and 2-process cases.
"""

from __future__ import annotations

import math
import os
import warnings

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
import torchvision_shim
from gloo_support import join_gloo, leave

torchvision_shim.apply()  # a spawned rank imports this module but not conftest.py

import videoanchor  # noqa: E402
import videoanchor.cli  # noqa: E402
from videoanchor.anchor import compute_anchor_scores, sparse_subspace_clustering  # noqa: E402
from videoanchor.kernels import anchor_gates, anchored_attention  # noqa: E402
from videoanchor.kernels.interface import anchored_attention_varlen  # noqa: E402

BACKENDS = ["torch", "triton"]  # triton runs under TRITON_INTERPRET=1 on the CPU


def _qkv(B=1, H=2, S=5, D=16, Skv=None, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    Skv = S if Skv is None else Skv
    q = torch.randn(B, H, S, D, generator=g, dtype=dtype)
    k = torch.randn(B, H, Skv, D, generator=g, dtype=dtype)
    v = torch.randn(B, H, Skv, D, generator=g, dtype=dtype)
    return q, k, v


# ---- anchored_attention: both backends reject the same inputs ----------------------------

_DENSE_BAD = {
    "causal-str": (dict(causal="no"), TypeError, "causal: expected True or False"),
    "causal-int": (dict(causal=1), TypeError, "causal: expected True or False"),
    "causal-none": (dict(causal=None), TypeError, "causal: expected True or False"),
    "return_lse-str": (dict(return_lse="yes"), TypeError, "return_lse: expected True or False"),
    "sm_scale-nan": (dict(sm_scale=float("nan")), ValueError, "sm_scale: expected None or a finite"),
    "sm_scale-inf": (dict(sm_scale=math.inf), ValueError, "sm_scale: expected None or a finite"),
    "sm_scale-str": (dict(sm_scale="0.1"), TypeError, "sm_scale: expected None or a finite"),
    "backend": (dict(backend="cuda"), ValueError, "backend: expected one of"),
    "cache-too-long": (
        dict(cache_seqlens=torch.tensor([6], dtype=torch.int32)), ValueError, "cache_seqlens: expected values in [0, Skv]"
    ),
    "cache-2pow40": (
        dict(cache_seqlens=torch.tensor([2**40])), ValueError, "cache_seqlens: expected values in [0, Skv]"
    ),
    "cache-negative": (
        dict(cache_seqlens=torch.tensor([-1], dtype=torch.int32)), ValueError, "cache_seqlens: expected values"
    ),
    "cache-float": (dict(cache_seqlens=torch.tensor([3.0])), TypeError, "cache_seqlens: expected dtype int32"),
    "cache-shape": (
        dict(cache_seqlens=torch.tensor([3, 3], dtype=torch.int32)), ValueError, "cache_seqlens: expected shape (B,)"
    ),
    "key_bias-shape": (dict(key_bias=torch.zeros(1, 4)), ValueError, "key_bias: expected shape (B, Skv)"),
    "key_bias-int": (dict(key_bias=torch.zeros(1, 5, dtype=torch.long)), TypeError, "key_bias: expected a floating"),
    "value_scale-3d": (dict(value_scale=torch.ones(1, 5, 1)), ValueError, "value_scale: expected 2 dims"),
    "mask-float": (dict(key_padding_mask=torch.ones(1, 5)), TypeError, "key_padding_mask: expected dtype torch.bool"),
    "attn_mask-shape": (dict(attn_mask=torch.ones(2, 2, 5, 5, dtype=torch.bool)), ValueError, "attn_mask: expected a shape"),
    "attn_mask-int": (dict(attn_mask=torch.ones(5, 5, dtype=torch.int32)), TypeError, "attn_mask: expected dtype"),
}  # fmt: skip


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(_DENSE_BAD), ids=list(_DENSE_BAD))
def test_dense_bad_option(backend, case):
    kw, exc, phrase = _DENSE_BAD[case]
    kw = {"backend": backend, **kw}
    q, k, v = _qkv()
    with pytest.raises(exc, match=_re(phrase)):
        anchored_attention(q, k, v, **kw)


def _re(phrase: str) -> str:
    import re

    return re.escape(phrase)


_DENSE_BAD_TENSORS = {
    "D=0": (lambda: _qkv(D=0), ValueError, "head dim D >= 1"),
    "q-3d": (lambda: (torch.randn(2, 5, 16),) + _qkv()[1:], ValueError, "q: expected 4 dims"),
    "q-list": (lambda: ([[1.0]],) + _qkv()[1:], TypeError, "q: expected a torch.Tensor"),
    "int-dtype": (lambda: tuple(t.long() for t in _qkv()), TypeError, "expected dtype float16"),
    "mixed-dtype": (lambda: (_qkv()[0].half(),) + _qkv()[1:], TypeError, "expected one dtype"),
    "float64": (lambda: _qkv(dtype=torch.float64), TypeError, "expected dtype float16, bfloat16 or float32"),
    "kv-shape": (lambda: _qkv()[:2] + (torch.randn(1, 2, 4, 16),), ValueError, "k, v: expected the same shape"),
    "gqa": (lambda: (torch.randn(1, 3, 5, 16),) + _qkv()[1:], ValueError, "multiple of the KV heads"),
    "head-dim": (lambda: (_qkv()[0], torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)), ValueError, "k: expected head dim"),
    "batch": (lambda: (_qkv(B=2)[0],) + _qkv()[1:], ValueError, "k: expected batch 2"),
}  # fmt: skip


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(_DENSE_BAD_TENSORS), ids=list(_DENSE_BAD_TENSORS))
def test_dense_bad_tensors(backend, case):
    make, exc, phrase = _DENSE_BAD_TENSORS[case]
    with pytest.raises(exc, match=_re(phrase)):
        anchored_attention(*make(), backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n_valid", [0, 3, 9], ids=["empty", "partial", "full"])
def test_cache_seqlens_in_range_agrees_across_backends(backend, n_valid):
    q, k, v = _qkv(S=2, Skv=9)
    cs = torch.tensor([n_valid], dtype=torch.int32)
    out = anchored_attention(q, k, v, cache_seqlens=cs, backend=backend)
    # reference: the first n_valid keys only, causal diagonal aligned to n_valid
    ref = anchored_attention(q, k[:, :, :n_valid], v[:, :, :n_valid], backend="torch")
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=0)
    assert bool(torch.isfinite(out).all())


# ---- anchored_attention_varlen ----------------------------------------------------------


def _packed(lens=(3, 4), H=2, D=16):
    total = sum(lens)
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(total, H, D, generator=g) for _ in range(3))
    cu = torch.tensor([0, *np.cumsum(lens).tolist()], dtype=torch.int32)
    return q, k, v, cu


_VARLEN_BAD = {
    "non-monotonic": ([0, 5, 3, 7], 7, ValueError, "cu_seqlens_q: expected non-decreasing offsets"),
    "negative": ([0, -2, 7], 7, ValueError, "expected non-decreasing offsets"),
    "start-not-0": ([1, 3, 7], 7, ValueError, "expected the first offset to be 0"),
    "past-total": ([0, 3, 9], 7, ValueError, "expected the last offset to equal the packed length 7"),
    "short-of-total": ([0, 3, 5], 7, ValueError, "expected the last offset to equal the packed length 7"),
    "max_seqlen_q-0": ([0, 3, 7], 0, ValueError, "max_seqlen_q: expected at least the longest sequence"),
    "max_seqlen_q-short": ([0, 3, 7], 3, ValueError, "sequence 1 has 4 queries"),
    "huge-int64": ([0, 3, 2**40], 7, ValueError, "expected the last offset to equal the packed length"),
}  # fmt: skip


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(_VARLEN_BAD), ids=list(_VARLEN_BAD))
def test_varlen_bad_offsets(backend, case):
    offsets, max_q, exc, phrase = _VARLEN_BAD[case]
    q, k, v, _ = _packed()
    cu = torch.tensor(offsets, dtype=torch.int64)
    with pytest.raises(exc, match=_re(phrase)):
        anchored_attention_varlen(q, k, v, cu, cu, max_q, backend=backend)


_VARLEN_BAD_OPTS = {
    "causal-str": (dict(causal="no"), TypeError, "causal: expected True or False"),
    "max_seqlen_q-bool": (dict(max_seqlen_q=True), ValueError, "max_seqlen_q: expected a non-negative int"),
    "max_seqlen_q-float": (dict(max_seqlen_q=4.0), ValueError, "max_seqlen_q: expected a non-negative int"),
    "max_seqlen_k-neg": (dict(max_seqlen_k=-1), ValueError, "max_seqlen_k: expected None or a non-negative int"),
    "cu-empty": (dict(cu=torch.zeros(0, dtype=torch.int32)), ValueError, "expected batch + 1 >= 1 offsets"),
    "cu-float": (dict(cu=torch.tensor([0.0, 7.0])), TypeError, "expected dtype int32"),
}  # fmt: skip


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(_VARLEN_BAD_OPTS), ids=list(_VARLEN_BAD_OPTS))
def test_varlen_bad_options(backend, case):
    kw, exc, phrase = _VARLEN_BAD_OPTS[case]
    q, k, v, cu = _packed()
    kw = dict(kw)
    cu = kw.pop("cu", cu)
    max_q = kw.pop("max_seqlen_q", 4)
    with pytest.raises(exc, match=_re(phrase)):
        anchored_attention_varlen(q, k, v, cu, cu, max_q, backend=backend, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
def test_varlen_empty_batch_and_empty_sequence(backend):
    q, k, v, _ = _packed(lens=(0,))
    out = anchored_attention_varlen(q, k, v, torch.tensor([0], dtype=torch.int32),
                                    torch.tensor([0], dtype=torch.int32), 0, backend=backend)  # fmt: skip
    assert out.shape == (0, 2, 16)
    q, k, v, cu = _packed(lens=(3, 0, 4))
    out = anchored_attention_varlen(q, k, v, cu, cu, 4, backend=backend)
    ref = anchored_attention_varlen(q, k, v, cu, cu, 4, backend="torch")
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=0)


# ---- anchor_gates -----------------------------------------------------------------------

_GATES_BAD = {
    "nan-score": (torch.tensor([0.1, float("nan")]), 1.0, 1.0, ValueError, "scores: expected finite values"),
    "alpha-inf": (torch.tensor([0.1]), math.inf, 1.0, ValueError, "alpha_k: expected a finite number"),
    "alpha-nan": (torch.tensor([0.1]), 1.0, float("nan"), ValueError, "alpha_v: expected a finite number"),
    "alpha-str": (torch.tensor([0.1]), "1", 1.0, TypeError, "alpha_k: expected a finite number"),
    "alpha-bool": (torch.tensor([0.1]), True, 1.0, TypeError, "alpha_k: expected a finite number"),
    "int-scores": (torch.tensor([1, 0]), 1.0, 1.0, TypeError, "scores: expected a floating-point tensor"),
    "list-scores": ([0.1], 1.0, 1.0, TypeError, "scores: expected a torch.Tensor"),
    "gate<=0": (torch.tensor([0.0, 0.9]), -2.0, 1.0, ValueError, "makes the gate 1 + alpha_k * s non-positive"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(_GATES_BAD), ids=list(_GATES_BAD))
def test_anchor_gates_bad(case):
    s, ak, av, exc, phrase = _GATES_BAD[case]
    with pytest.raises(exc, match=_re(phrase)):
        anchor_gates(s, ak, av)


def test_anchor_gates_values():
    s = torch.tensor([0.0, 0.5])
    kb, vs = anchor_gates(s, 2.0, 3.0)
    torch.testing.assert_close(kb, torch.log1p(2.0 * s))
    torch.testing.assert_close(vs, 1 + 3.0 * s)


# ---- compute_anchor_scores / sparse_subspace_clustering in every mode ---------------------

MODES = ["exact", "blocked", "auto"]
X = torch.randn(18, 6, generator=torch.Generator().manual_seed(3))

_SSC_BAD = {
    "max_iter-0": (dict(max_iter=0), ValueError, "max_iter: expected an int >= 1"),
    "max_iter-inf": (dict(max_iter=math.inf), TypeError, "max_iter: expected an int >= 1"),
    "max_iter-float": (dict(max_iter=10.0), TypeError, "max_iter: expected an int >= 1"),
    "eps-neg": (dict(eps=-1e-3), ValueError, "eps: expected a finite number >= 0"),
    "eps-nan": (dict(eps=float("nan")), ValueError, "eps: expected a finite number >= 0"),
    "rho-0": (dict(rho=0.0), ValueError, "rho: expected a positive finite number"),
    "alpha_z-inf": (dict(alpha_z=math.inf), ValueError, "alpha_z: expected a positive finite number"),
    "alpha_e-str": (dict(alpha_e="800"), TypeError, "alpha_e: expected a finite number"),
    "seed-str": (dict(seed="0"), TypeError, "seed: expected an int or None"),
    "seed-neg": (dict(seed=-1), ValueError, "seed: expected an int in [0, 2**32 - 1]"),
    "pca_rank-float": (dict(pca_rank=2.5), TypeError, "pca_rank: expected an int >= 0"),
    "label_draws-0": (dict(label_draws=0), ValueError, "label_draws: expected an int >= 1"),
    "backend-jax": (dict(backend="jax"), ValueError, "backend: expected one of"),
    "dtype-half": (dict(dtype=torch.float16), ValueError, "dtype: expected torch.float32 or torch.float64"),
    "dtype-int": (dict(dtype=3), TypeError, "dtype: expected None, torch.float32"),
    "progress-str": (dict(progress="no"), TypeError, "progress: expected True, False"),
    "n_clusters-float": (dict(n_clusters=3.0), TypeError, "n_clusters: expected an int >= 1"),
    "eigen-bogus": (dict(eigen_solver="lanczos"), ValueError, "eigen_solver: expected one of"),
}  # fmt: skip


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", list(_SSC_BAD), ids=list(_SSC_BAD))
def test_scores_bad_option_every_mode(mode, case):
    kw, exc, phrase = _SSC_BAD[case]
    kw = {"n_clusters": 3, "max_iter": 50, **kw}
    with pytest.raises(exc, match=_re(phrase)):
        compute_anchor_scores(X, mode=mode, **kw)


_MODE_SPECIFIC = {
    "scalable-removed": (dict(mode="scalable"), "mode: expected one of ('auto', 'exact', 'blocked'), got 'scalable': the scalable approximation was removed"),
    "candidates-removed": (dict(candidates=32), "candidates: the scalable approximation was removed"),
    "blocked-eigh": (dict(mode="blocked", eigen_solver="eigh"), "mode='blocked': expected eigen_solver"),
    "blocked-fast": (dict(mode="blocked", solver="fast"), "expected solver 'auto', 'workset' or 'faithful'"),
    "accelerated-removed": (dict(solver="accelerated"), "got 'accelerated': solver='accelerated' was removed (issue 52): the program's minimiser it ran towards is videoanchor.anchor.reference_minimiser"),
    "exact-subspace": (dict(mode="exact", eigen_solver="subspace"), "mode='exact': expected eigen_solver"),
    "exact-block_columns": (dict(mode="exact", block_columns=4), "block_columns: applies to mode='blocked'"),
    "exact-block_eps": (dict(mode="exact", block_eps="share"), "block_eps: applies to mode='blocked'"),
    "mode-bogus": (dict(mode="fast"), "mode: expected one of"),
    "pg-uninit": (dict(mode="exact", process_group=object()), "torch.distributed is not initialised"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(_MODE_SPECIFIC), ids=list(_MODE_SPECIFIC))
def test_scores_option_ignored_by_mode_is_an_error(case):
    kw, phrase = _MODE_SPECIFIC[case]
    with pytest.raises(ValueError, match=_re(phrase)):
        compute_anchor_scores(X, n_clusters=3, max_iter=50, **kw)


_FEATURES_BAD = {
    "D=0": (torch.zeros(5, 0), ValueError, "expected at least one token and one feature"),
    "N=0": (torch.zeros(0, 4), ValueError, "expected at least one token and one feature"),
    "nan": (torch.tensor([[1.0, float("nan")]] * 4), ValueError, "expected finite values"),
    "1d": (torch.zeros(5), ValueError, "expected a 2-D (N, D) matrix"),
    "strings": (np.array([["a"]] * 4), TypeError, "expected a numeric array"),
    "too-few": (torch.randn(2, 4), ValueError, "expected at least n_clusters = 3 tokens"),
}  # fmt: skip


@pytest.mark.parametrize("mode", ["exact", "blocked"])
@pytest.mark.parametrize("case", list(_FEATURES_BAD), ids=list(_FEATURES_BAD))
def test_scores_bad_features(mode, case):
    x, exc, phrase = _FEATURES_BAD[case]
    with pytest.raises(exc, match=_re(phrase)):
        compute_anchor_scores(x, n_clusters=3, mode=mode, max_iter=50)


_SSC_FN_BAD = {
    "affine-str": (dict(affine="no"), TypeError, "affine: expected True or False"),
    "outliers-int": (dict(outliers=0), TypeError, "outliers: expected True or False"),
    "assign": (dict(assign_labels="gmm"), ValueError, "assign_labels: expected 'discretize' or 'kmeans'"),
    "affinity": (dict(affinity="knn"), ValueError, "affinity: expected 'symmetric' or 'column_max'"),
    "data_term": (dict(data_term="l2"), ValueError, "data_term: expected one of"),
    "max_iter-0": (dict(max_iter=0), ValueError, "max_iter: expected an int >= 1"),
    "eigen-subspace": (dict(eigen_solver="subspace"), ValueError, "mode='exact': expected eigen_solver"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(_SSC_FN_BAD), ids=list(_SSC_FN_BAD))
def test_sparse_subspace_clustering_bad(case):
    kw, exc, phrase = _SSC_FN_BAD[case]
    with pytest.raises(exc, match=_re(phrase)):
        sparse_subspace_clustering(X, 3, **{"max_iter": 50, **kw})


@pytest.mark.parametrize("mode", ["exact", "blocked"])
@pytest.mark.parametrize("noise", [0.0, 1e-6], ids=["identical", "near-identical"])
def test_identical_tokens_score_zero(mode, noise):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(1, 8, generator=g).repeat(24, 1) + noise * torch.randn(24, 8, generator=g)
    with pytest.warns(UserWarning, match="every anchor score is 0"):
        res = compute_anchor_scores(x, 3, mode=mode, max_iter=300)
    assert torch.equal(res.scores, torch.zeros(24))


@pytest.mark.parametrize("mode", ["exact", "blocked"])
def test_duplicate_tokens_get_one_score(mode):
    g = torch.Generator().manual_seed(5)
    x = torch.cat([torch.randn(1, 8, generator=g).repeat(6, 1), torch.randn(12, 8, generator=g)])
    res = compute_anchor_scores(x, 3, mode=mode, max_iter=40)
    assert float(res.scores[:6].max() - res.scores[:6].min()) == 0.0
    assert float(res.scores.max() - res.scores.min()) > 0.1  # the other tokens still differ


def test_seed_none_works_like_scikit_learn():
    np.random.seed(7)
    a = compute_anchor_scores(X, 3, seed=None, max_iter=100)
    np.random.seed(7)
    b = compute_anchor_scores(X, 3, seed=None, max_iter=100)
    assert torch.equal(a.labels, b.labels) and torch.equal(a.scores, b.scores)
    assert bool(((a.scores >= 0) & (a.scores < 1)).all())


# ---- process_group: 2 gloo processes, short collective timeout ---------------------------

_DIST_CASES = {
    # name: (kwargs on rank 0, kwargs on rank 1, expected type, phrase)
    "max_iter-differs": (dict(max_iter=20), dict(max_iter=21), ValueError, "expected the same max_iter on every rank"),
    "seed-differs": (dict(seed=0), dict(seed=1), ValueError, "expected the same seed on every rank"),
    "eps-differs": (dict(eps=1e-3), dict(eps=2e-3), ValueError, "expected the same eps on every rank"),
    "mode-bad-on-1": (dict(), dict(mode="windowed"), ValueError, "mode: expected one of"),
    "pca-bad-on-1": (dict(), dict(pca_rank=-1), ValueError, "pca_rank: expected an int >= 0"),
    "eigen-bad-on-1": (dict(), dict(eigen_solver="eigh"), ValueError, "expected eigen_solver"),
    "draws-bad-on-1": (dict(), dict(label_draws=0), ValueError, "label_draws: expected an int >= 1"),
    "draws-type-on-0": (dict(label_draws=1.5), dict(), TypeError, "label_draws: expected an int >= 1"),
    "nan-on-1": (dict(), dict(nan=True), ValueError, "expected finite values"),
    "shape-differs": (dict(), dict(rows=17), ValueError, "expected the same features on every rank"),
    "accelerated-removed": (dict(solver="accelerated"), dict(solver="accelerated"), ValueError, "solver='accelerated' was removed"),
    "exact-faithful": (dict(mode="exact", solver="faithful"), dict(mode="exact", solver="faithful"), ValueError, "process_group: mode='exact' splits the fast solver's columns over the ranks"),
    "cupy-backend": (dict(backend="cupy"), dict(backend="cupy"), ValueError, "expected backend 'auto' or 'torch', got 'cupy'"),
    "blocked-fast": (dict(mode="blocked", solver="fast"), dict(mode="blocked", solver="fast"), ValueError, "mode='blocked' runs the authors' iteration or the working sets by blocks"),
    "same": (dict(), dict(), None, None),
}  # fmt: skip


def _dist_worker(rank, store, out):
    import torch.distributed as dist

    join_gloo(rank, 2, store, seconds=20)
    results = {}
    try:
        for name, (kw0, kw1) in ((n, c[:2]) for n, c in _DIST_CASES.items()):
            kw = dict(kw0 if rank == 0 else kw1)
            x = X.clone()
            if kw.pop("nan", False):
                x[1, 1] = float("nan")
            x = x[: kw.pop("rows", x.shape[0])]
            kw = {"n_clusters": 3, "max_iter": 20, **kw}
            try:
                res = compute_anchor_scores(x, process_group=dist.group.WORLD, **kw)
                results[name] = ("ok", res.scores)
            except Exception as exc:  # recorded for the assertions in the parent
                results[name] = (type(exc).__name__, str(exc))
        # Last (it leaves the group out of step): rank 1 passes process_group=None, runs
        # alone and leaves; rank 0 must not be left with gloo's bare "Connection closed".
        try:
            group = None if rank == 1 else dist.group.WORLD
            res = compute_anchor_scores(X, 3, max_iter=20, process_group=group)
            results["none-on-1"] = ("ok", res.scores)
        except Exception as exc:
            results["none-on-1"] = (type(exc).__name__, str(exc))
    finally:
        torch.save(results, os.path.join(out, f"rank{rank}.pt"))
        if rank == 0 or "none-on-1" not in results:
            dist.destroy_process_group()
    leave()


@pytest.fixture(scope="module")
def dist_results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist")
    mp.spawn(_dist_worker, args=(str(tmp / "store"), str(tmp)), nprocs=2, join=True)
    return [torch.load(tmp / f"rank{r}.pt") for r in range(2)]


@pytest.mark.distributed
@pytest.mark.parametrize("case", list(_DIST_CASES), ids=list(_DIST_CASES))
def test_process_group_ranks_fail_together(dist_results, case):
    *_, exc, phrase = _DIST_CASES[case]
    got = [r[case] for r in dist_results]
    if exc is None:
        assert got[0][0] == got[1][0] == "ok"
        assert torch.equal(got[0][1], got[1][1])
        # the default over a group: the fast solver, its columns split over the ranks
        single = compute_anchor_scores(X, 3, max_iter=20)
        torch.testing.assert_close(got[0][1], single.scores, atol=1e-5, rtol=0)
        return
    for kind, message in got:
        assert kind == exc.__name__, got
        assert phrase in message, got


@pytest.mark.distributed
def test_process_group_none_on_one_rank_is_explained(dist_results):
    alone, waiting = dist_results[1]["none-on-1"], dist_results[0]["none-on-1"]
    assert alone[0] == "ok"  # process_group=None: that rank's own single-process SSC
    assert waiting[0] == "RuntimeError", waiting
    assert "the SSC's agreement check across the ranks failed on rank 0" in waiting[1]
    assert "a rank that passes process_group=None" in waiting[1], waiting


# ---- configure() ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from videoanchor.integrations.transformers.testing import load_saved, tiny_model

    path = tmp_path_factory.mktemp("qwen")
    tiny_model("qwen2_5_vl", seed=2).save_pretrained(path)
    return load_saved(path)


_CONFIGURE_BAD = {
    "ssc_dtype-half": (dict(ssc_dtype=torch.float16), ValueError, "dtype: expected torch.float32 or torch.float64"),
    "ssc_backend-jax": (dict(ssc_backend="jax"), ValueError, "backend: expected one of"),
    "max_iter-inf": (dict(max_iter=math.inf), TypeError, "max_iter: expected an int >= 1"),
    "eps-nan": (dict(eps=float("nan")), ValueError, "eps: expected a finite number >= 0"),
    "alpha_z-inf": (dict(alpha_z=math.inf), ValueError, "alpha_z: expected a positive finite number"),
    "seed-str": (dict(seed="1"), TypeError, "seed: expected an int or None"),
    "enabled-str": (dict(enabled="no"), TypeError, "enabled: expected a bool"),
    "alpha_k-inf": (dict(alpha_k=math.inf), ValueError, "alpha_k: expected a finite number"),
    "alpha_v<-1": (dict(alpha_v=-2.0), ValueError, "expected alpha_v >= -1"),
    "decode": (dict(decode="some"), ValueError, "decode: expected one of"),
    "tokens": (dict(tokens=("audio",)), ValueError, "tokens: expected a non-empty subset"),
    "attention_backend": (dict(attention_backend="flash"), ValueError, "attention_backend: expected one of"),
    "process_group": (dict(process_group="tp"), TypeError, "process_group: expected 'auto'"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(_CONFIGURE_BAD), ids=list(_CONFIGURE_BAD))
def test_configure_bad_option(tiny, case):
    kw, exc, phrase = _CONFIGURE_BAD[case]
    before = videoanchor.configure(tiny).config
    with pytest.raises(exc, match=_re(phrase)):
        videoanchor.configure(tiny, **kw)
    assert videoanchor.configure(tiny).config == before  # nothing half-applied


def test_configure_rejects_non_model():
    with pytest.raises(TypeError, match="expected a transformers model"):
        videoanchor.configure("Qwen/Qwen2.5-VL-7B-Instruct")


@torch.no_grad()
def test_configure_during_generate_keeps_anchoring(tiny):
    from transformers import LogitsProcessor, LogitsProcessorList

    from videoanchor.integrations.transformers.testing import TOKENS, tiny_sample

    special = [TOKENS[k] for k in ("image", "video", "vision_start", "vision_end", "eos", "pad")]
    gen = dict(max_new_tokens=4, min_new_tokens=4, suppress_tokens=special, do_sample=False,
               output_scores=True, return_dict_in_generate=True)  # fmt: skip
    sample = tiny_sample(tiny.config, [4], text=4, seed=20)

    class Reconfigure(LogitsProcessor):
        def __call__(self, input_ids, scores):
            videoanchor.configure(tiny, alpha_v=handle.config.alpha_v)  # a no-op
            return scores

    handle = videoanchor.configure(tiny, enabled=True, decode="all", n_clusters=3, max_iter=300)
    plain = tiny.generate(**sample, **gen)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "no visual inputs" warning mid-generate
        poked = tiny.generate(
            **sample, **gen, logits_processor=LogitsProcessorList([Reconfigure()])
        )
    assert torch.equal(plain.sequences, poked.sequences)
    for a, b in zip(plain.scores, poked.scores, strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    handle = videoanchor.configure(tiny, decode="prefill")


@torch.no_grad()
def test_configure_during_generate_updates_the_value_scale_range(tiny):
    """New alphas mid-generate (decode="all") rebuild the gates and the range the kernel's
    fast form divides V by, so the promise "every value scale lies in the range" holds. The
    range is the configuration's, [1, 1 + alpha_v], not the data's (a compiled decode step
    keeps one graph for every request)."""
    from transformers import LogitsProcessor, LogitsProcessorList

    from videoanchor.integrations.transformers.testing import tiny_sample
    from videoanchor.kernels import value_scale_range_of

    sample = tiny_sample(tiny.config, [4], text=4, seed=21)
    seen = []

    class Stronger(LogitsProcessor):
        def __call__(self, input_ids, scores):
            videoanchor.configure(tiny, alpha_v=handle.config.alpha_v + 4.0)
            req = handle._request
            seen.append((req.value_scale_range, value_scale_range_of(req.value_scale),
                         handle.config.alpha_v))  # fmt: skip
            return scores

    handle = videoanchor.configure(tiny, enabled=True, decode="all", n_clusters=3, max_iter=300,
                                   alpha_v=2.5)  # fmt: skip
    try:
        tiny.generate(**sample, max_new_tokens=3, do_sample=False,
                      logits_processor=LogitsProcessorList([Stronger()]))  # fmt: skip
    finally:
        videoanchor.configure(tiny, decode="prefill", alpha_v=2.5)
    assert len(seen) >= 2 and seen[-1][1][1] > seen[0][1][1] - 1e-6
    for stored, actual, alpha_v in seen:
        assert stored == (1.0, 1.0 + alpha_v)
        assert stored[0] <= actual[0] and actual[1] <= stored[1]


# ---- the video reader and the CLI -------------------------------------------------------


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    from videoanchor.video import write_video

    tmp = tmp_path_factory.mktemp("clips")
    g = np.random.default_rng(0)
    paths = {}
    for n in (1, 5):
        paths[n] = tmp / f"c{n}.mp4"
        write_video(paths[n], g.integers(0, 255, (n, 32, 32, 3), dtype=np.uint8), fps=5)
    return paths


@pytest.mark.parametrize(
    "n,asked", [(1, 16), (5, 16), (5, 100000)], ids=["1-frame", "5of16", "cap"]
)
def test_video_never_repeats_frames_silently(clips, n, asked):
    from videoanchor.video import read_video_frames

    with pytest.warns(UserWarning, match=f"has {n} frames, fewer than the {asked} asked for"):
        video = read_video_frames(clips[n], asked, progress=False)
    assert video.num_frames == n and len(np.unique(video.indices)) == n


def test_video_bad_repeat_flag(clips):
    from videoanchor.video import read_video_frames

    with pytest.raises(TypeError, match="repeat: expected True or False"):
        read_video_frames(clips[5], 3, repeat="yes")


def _cli(argv, capsys):
    from videoanchor.cli import main

    code = main(argv)
    return code, capsys.readouterr().err


_CLI_BAD = {
    "seed-neg": (["--seed", "-1"], "seed: expected an int in [0, 2**32 - 1]"),
    "alpha_k-inf": (["--alpha-k", "inf"], "alpha_k: expected a finite number"),
    "alpha_v-nan": (["--alpha-v", "nan"], "alpha_v: expected a finite number"),
    "alpha_v<-1": (["--alpha-v", "-3"], "expected alpha_v >= -1"),
    "device": (["--device", "gpu0"], "device: expected 'auto', 'cpu', 'cuda' or 'cuda:N'"),
    "out-dir": (["--out", "."], "--out must be a .png file"),
    "out-not-png": (["--out", "a.jpg"], "--out must be a .png file"),
    "npz-suffix": (["--npz", "scores.txt"], "--npz must be a .npz file"),
    "out-under-file": (["--out", "FILE/x.png"], "is a file, not a folder"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(_CLI_BAD), ids=list(_CLI_BAD))
def test_cli_anchors_checks_flags_before_the_model(clips, tmp_path, capsys, case, monkeypatch):
    extra, phrase = _CLI_BAD[case]
    (tmp_path / "FILE").write_text("x")
    extra = [str(tmp_path / e) if e.startswith("FILE/") else e for e in extra]
    monkeypatch.chdir(tmp_path)  # (restored after the test)
    argv = ["anchors", "--video", str(clips[5]), "--model", str(tmp_path / "no-such-model"), "-q"]
    code, err = _cli(argv + extra, capsys)
    assert code == 1
    assert phrase in err and "no-such-model" not in err, err


@pytest.mark.parametrize(
    "extra,phrase",
    [(["--seed", "-5"], "seed: expected an int"), (["--dtype", "float64"], "invalid choice")],
    ids=["seed", "dtype"],
)
def test_cli_run_checks_flags_before_the_model(clips, tmp_path, capsys, extra, phrase):
    argv = ["run", "--video", str(clips[5]), "--question", "q", "--model", str(tmp_path / "nope")]
    try:
        code, err = _cli(argv + extra, capsys)
    except SystemExit as exc:  # argparse rejects a bad choice itself
        code, err = exc.code, capsys.readouterr().err
    assert code in (1, 2) and phrase in err, err


# ---- the lmms-eval wrapper --------------------------------------------------------------

_LMMS_BAD = {
    "dtype-float64": (dict(dtype="float64"), "dtype: expected one of auto, bfloat16, float16, float32"),
    "alpha_k-inf": (dict(alpha_k="inf"), "alpha_k: expected a finite number"),
    "n_clusters-0": (dict(n_clusters=0), "n_clusters: expected an integer >= 1"),
    "decode": (dict(decode="both"), "decode: expected one of"),
    "anchor": (dict(anchor="maybe"), "anchor: expected True or False"),
    "max_num_frames": (dict(max_num_frames="x"), "max_num_frames: expected an integer >= 1"),
    "device": (dict(device="gpu"), "device: expected 'auto', 'cpu', 'cuda' or 'cuda:N'"),
    "ssc_max_iter": (dict(ssc_max_iter=0), "ssc_max_iter: expected an integer >= 1"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(_LMMS_BAD), ids=list(_LMMS_BAD))
def test_lmms_eval_checks_options_before_loading(case, tmp_path):
    from videoanchor.lmms_eval import VideoAnchorLMMCore

    kw, phrase = _LMMS_BAD[case]
    with pytest.raises(ValueError, match=_re(phrase)):
        VideoAnchorLMMCore(pretrained=str(tmp_path / "no-such-model"), **kw)


# ---- the device-side (no sync) checks, run on the CPU: torch._assert_async raises there --


@pytest.fixture
def as_if_on_gpu():
    from videoanchor.kernels import checks

    with checks.device_branch():  # CPU metadata checked as CUDA metadata is
        yield checks


@pytest.mark.parametrize(
    "offsets,total,longest",
    [([0, 5, 3, 7], 7, 9), ([0, 3, 9], 7, 9), ([1, 3, 7], 7, 9), ([0, 3, 7], 7, 3),
     ([0, -1, 7], 7, 9)],
    ids=["non-monotonic", "past-total", "start", "max_seqlen", "negative"],
)  # fmt: skip
def test_device_cu_seqlens_assert(as_if_on_gpu, offsets, total, longest):
    with pytest.raises(RuntimeError, match="cu_seqlens_q must start at 0"):
        as_if_on_gpu.check_cu_seqlens("cu_seqlens_q", torch.tensor(offsets), total, longest)


def test_device_checks_run_once_per_tensor_version(as_if_on_gpu):
    cs = torch.tensor([3, 9])
    as_if_on_gpu.check_cache_seqlens(cs, 9)
    as_if_on_gpu.check_cache_seqlens(cs, 9)  # same tensor, same version: skipped
    cs[0] = 10  # an in-place change is seen: checked again
    with pytest.raises(RuntimeError, match=r"cache_seqlens outside \[0, Skv=9\]"):
        as_if_on_gpu.check_cache_seqlens(cs, 9)
    with pytest.raises(RuntimeError, match="cache_seqlens outside"):
        as_if_on_gpu.check_cache_seqlens(torch.tensor([2**40]), 9)
    as_if_on_gpu.check_cu_seqlens("cu_seqlens_q", torch.tensor([0, 3, 7]), 7, 4)  # fine


def test_device_checks_can_be_switched_off(as_if_on_gpu, monkeypatch):
    monkeypatch.setenv("VIDEOANCHOR_DEVICE_CHECKS", "0")
    as_if_on_gpu.check_cache_seqlens(torch.tensor([99]), 9)  # the caller vouches for it


@pytest.mark.parametrize("backend", BACKENDS)
def test_numpy_scalars_are_numbers(backend):
    q, k, v = _qkv()
    a = anchored_attention(
        q, k, v, sm_scale=np.float32(0.25), causal=np.bool_(True), backend=backend
    )
    b = anchored_attention(q, k, v, sm_scale=0.25, causal=True, backend=backend)
    torch.testing.assert_close(a, b, atol=0, rtol=0)


@torch.no_grad()
def test_blank_video_through_the_model_scores_zero(tiny):
    from videoanchor.integrations.transformers.testing import tiny_sample

    handle = videoanchor.configure(tiny, enabled=True, n_clusters=3, max_iter=300)
    sample = tiny_sample(tiny.config, [4], text=4, seed=20)
    sample["pixel_values_videos"] = torch.zeros_like(sample["pixel_values_videos"])
    with pytest.warns(UserWarning, match="every anchor score is 0") as caught:
        tiny(**sample)
    assert sum("anchor score is 0" in str(w.message) for w in caught) == 1  # said once
    visual = handle.last_visual_positions[0]
    assert visual.numel() > 0 and bool((handle.last_scores[0, visual] == 0).all())


# ---- the CLI end to end on a tiny checkpoint: short clips, interrupted output -----------


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    from test_cli_support import save_tiny_checkpoint

    path = tmp_path_factory.mktemp("tiny_ckpt")
    save_tiny_checkpoint("qwen2_5_vl", path)
    return path


def _anchors_argv(ckpt, video, out):
    return ["anchors", "--model", str(ckpt), "--trust-remote-code", "--video", str(video),
            "--n-clusters", "2", "--ssc-max-iter", "200", "-q", "--out", str(out)]  # fmt: skip


def test_cli_one_frame_clip_is_one_frame(tiny_checkpoint, clips, tmp_path, capsys, one_thread):
    out = tmp_path / "a.png"
    assert videoanchor.cli.main(_anchors_argv(tiny_checkpoint, clips[1], out)) == 0
    err = capsys.readouterr().err
    assert "has 1 frames, fewer than the 16 asked for" in err
    data = np.load(out.with_suffix(".npz"))
    np.testing.assert_array_equal(data["frame_indices"], [0])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.npz", "a.png"]  # no temp files


def test_cli_interrupted_output_leaves_no_partial_file(
    tiny_checkpoint, clips, tmp_path, capsys, monkeypatch, one_thread
):
    import videoanchor.visualize as vis

    real = vis.save_anchor_pages

    def interrupted(path, *args, **kwargs):
        real(path, *args, **kwargs)
        with open(path, "r+b") as f:  # half-written, then the user presses Ctrl-C
            f.truncate(10)
        raise KeyboardInterrupt

    monkeypatch.setattr(vis, "save_anchor_pages", interrupted)
    out = tmp_path / "b.png"
    assert videoanchor.cli.main(_anchors_argv(tiny_checkpoint, clips[5], out)) == 130
    assert list(tmp_path.iterdir()) == []  # neither file, no temporary left behind


# ---- issue 30: the last silent results and unclear errors -------------------------------


@pytest.mark.parametrize(
    "scores,ak,av,name",
    [([0.0, 0.5], 1e308, 1.0, "alpha_k"), ([0.0, 0.5], 1.0, -1e39, "alpha_v"),
     ([0.0, 2.0], 3e38, 1.0, "alpha_k"), ([0.0, 1e10], 1.0, 1e30, "alpha_v")],
    ids=["1e308", "alpha_v-beyond-float32", "near-max", "times-big-score"],
)  # fmt: skip
def test_anchor_gates_overflowing_float32_is_an_error(scores, ak, av, name):
    # finite in float64, so the finite check passes; the float32 gate is inf (and 0 * inf
    # NaN at text positions): every attention output would be NaN
    with pytest.raises(ValueError, match=_re(f"{name}=") + ".*overflows its dtype float32"):
        anchor_gates(torch.tensor(scores), ak, av)


def test_anchor_gates_largest_safe_alpha_is_finite():
    kb, vs = anchor_gates(torch.tensor([0.0, 0.5]), 1e38, 1e38)
    assert bool(torch.isfinite(kb).all() and torch.isfinite(vs).all())


@pytest.mark.parametrize("name", ["alpha_k", "alpha_v", "alpha_q"])
def test_configure_alpha_overflowing_float32_is_an_error(tiny, name):
    before = videoanchor.configure(tiny).config
    with pytest.raises(ValueError, match=_re(f"{name}=1e+308: the gate") + ".*overflows"):
        videoanchor.configure(tiny, **{name: 1e308})
    assert videoanchor.configure(tiny).config == before


def test_cli_run_alpha_overflowing_float32_fails_before_the_model(clips, tmp_path, capsys):
    argv = ["run", "--video", str(clips[5]), "--question", "q", "--model", str(tmp_path / "nope"),
            "--alpha-k", "1e308", "--alpha-v", "1e308", "-q"]  # fmt: skip
    code, err = _cli(argv, capsys)
    assert code == 1 and "overflows its dtype float32" in err and "nope" not in err, err


_NUMPY_CONFIGURE = {
    "alpha_k": (np.float32(2.0), 2.0),
    "alpha_v": (np.float64(1.5), 1.5),
    "n_clusters": (np.int64(4), 4),
    "pca_rank": (np.int64(5), 5),
    "max_iter": (np.int32(50), 50),
    "seed": (np.int64(3), 3),
    "label_draws": (np.int64(2), 2),
    "eps": (np.float32(0.5), 0.5),
    "alpha_z": (np.float32(10.0), 10.0),
    "ssc_time_budget": (np.float64(2.0), 2.0),
}  # fmt: skip


@pytest.mark.parametrize("name", list(_NUMPY_CONFIGURE))
def test_configure_accepts_numpy_scalars(tiny, name):
    value, plain = _NUMPY_CONFIGURE[name]
    before = videoanchor.configure(tiny).config
    try:
        cfg = videoanchor.configure(tiny, **{name: value}).config
        got = getattr(cfg, name)
        assert got == plain and type(got) is type(plain)  # stored as the Python number
    finally:
        videoanchor.configure(tiny, **{f: getattr(before, f) for f in _NUMPY_CONFIGURE})


@pytest.mark.parametrize(
    "name,exc", [("n_clusters", TypeError), ("label_draws", TypeError), ("alpha_k", ValueError)]
)  # the SSC options: the check of compute_anchor_scores (a wrong type is a TypeError)
def test_configure_refuses_numpy_bools(tiny, name, exc):
    with pytest.raises(exc, match=_re(f"{name}: expected")):
        videoanchor.configure(tiny, **{name: np.bool_(True)})


@pytest.mark.parametrize("mode", ["exact", "blocked"])
def test_scores_accept_numpy_ints(mode):
    kw = dict(mode=mode, max_iter=40)
    a = compute_anchor_scores(X, 3, pca_rank=4, label_draws=2, **kw)
    b = compute_anchor_scores(X, np.int64(3), pca_rank=np.int64(4), label_draws=np.int32(2), **kw)
    assert torch.equal(a.scores, b.scores)
    with pytest.raises(TypeError, match=_re("label_draws: expected an int")):
        compute_anchor_scores(X, 3, label_draws=np.bool_(True), **kw)


@pytest.mark.parametrize("backend", BACKENDS)
def test_varlen_accepts_numpy_ints(backend):
    q, k, v, cu = _packed()
    a = anchored_attention_varlen(q, k, v, cu, cu, 4, max_seqlen_k=4, backend=backend)
    b = anchored_attention_varlen(q, k, v, cu, cu, np.int64(4), max_seqlen_k=np.int32(4),
                                  backend=backend)  # fmt: skip
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    with pytest.raises(ValueError, match=_re("max_seqlen_q: expected a non-negative int")):
        anchored_attention_varlen(q, k, v, cu, cu, np.float64(4.0), backend=backend)


def test_configure_time_budget_error_names_the_option(tiny):
    with pytest.raises(ValueError, match=r"^ssc_time_budget: expected a positive number"):
        videoanchor.configure(tiny, ssc_time_budget=-1)


@pytest.mark.parametrize("mode", ["exact", "blocked"])
@pytest.mark.parametrize(
    "kw,name", [(dict(alpha_z=1e300), "alpha_z"), (dict(rho=1e-300), "rho"),
                (dict(alpha_e=1e30), "alpha_e"), (dict(alpha_z=1e300, dtype=torch.float64), "alpha_z")],
    ids=["alpha_z", "rho", "alpha_e", "alpha_z-float64"],
)  # fmt: skip
def test_scores_option_beyond_the_working_dtype_names_the_option(mode, kw, name):
    with pytest.raises(ValueError, match=rf"^{name}: expected a value in \["):
        compute_anchor_scores(X, 3, mode=mode, max_iter=20, **kw)


def test_a_step_failure_names_the_options():
    # inside the up-front range, but rho is lost next to lambda_z Y^T Y in float32: the
    # faithful solver's float32 factorisation fails (the fast default factors the same system
    # by a float64 eigendecomposition, which stays positive definite)
    with pytest.raises(FloatingPointError, match=r"not positive definite \(.*alpha_z.*rho"):
        compute_anchor_scores(X, 3, mode="exact", solver="faithful", alpha_z=1e12, rho=1e-5,
                              max_iter=20)  # fmt: skip


@pytest.mark.parametrize("mode", ["exact", "blocked"])
def test_label_draws_upper_bound_is_checked_before_the_ssc(mode):
    from videoanchor.anchor.options import MAX_LABEL_DRAWS

    calls = []
    with pytest.raises(
        ValueError, match=_re(f"label_draws: expected an int in [1, {MAX_LABEL_DRAWS}]")
    ):
        compute_anchor_scores(X, 3, mode=mode, max_iter=20, label_draws=10**9,
                              progress=_reporter(calls.append, enabled=False))  # fmt: skip
    assert calls == []  # no SSC iteration ran
    res = compute_anchor_scores(X, 3, mode=mode, max_iter=20, label_draws=10)  # within the bound
    assert bool(torch.isfinite(res.scores).all())


def test_configure_label_draws_upper_bound(tiny):
    with pytest.raises(ValueError, match=_re("label_draws: expected an int in [1,")):
        videoanchor.configure(tiny, label_draws=10**9)


@pytest.mark.parametrize("mode", ["exact", "blocked"])
def test_dominant_token_is_warned_about_up_front(mode):
    x = X.clone()
    x[7] *= 1e19  # finite in float32; its Gram entries dwarf every other token's
    warned_at_first_iteration = []
    with pytest.warns(UserWarning, match=r"token 7's feature norm .* times the median") as got:

        def on_update(iteration):
            if iteration == 1:
                warned_at_first_iteration.append(any("token 7" in str(w.message) for w in got))

        try:
            compute_anchor_scores(x, 3, mode=mode, max_iter=5,
                                  progress=_reporter(on_update, enabled=False))  # fmt: skip
        except FloatingPointError as err:  # blocked: its A-step cannot be factorised
            assert "dwarfing the others'" in str(err)
    assert warned_at_first_iteration in ([], [True])  # up front: before any iteration
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an ordinary spread of norms does not warn
        y = X.clone()
        y[7] *= 100
        compute_anchor_scores(y, 3, mode=mode, max_iter=5)


@pytest.mark.parametrize("mode", ["exact", "blocked"])
def test_meta_device_features_are_refused_clearly(mode):
    with pytest.raises(
        ValueError,
        match=_re("features: expected a tensor holding values, got one on the 'meta' device"),
    ):
        compute_anchor_scores(torch.empty(18, 6, device="meta"), 3, mode=mode, max_iter=20)


def _reporter(on_update, **kw):
    """An SSC progress reporter that calls ``on_update(iteration)`` on every iteration."""
    from videoanchor.anchor.progress import SSCProgress

    class Reporter(SSCProgress):
        def update(self, iteration, residual):
            stop = super().update(iteration, residual)
            on_update(iteration)
            return stop

        __call__ = update

    return Reporter(**kw)


def _ctrl_c_at(at):
    def on_update(iteration):
        if iteration == at:
            raise KeyboardInterrupt

    return _reporter(on_update, enabled=True, log_every=1e9)


@pytest.mark.parametrize("mode", ["exact", "blocked"])
def test_interrupted_ssc_says_interrupted_at_its_iteration(mode, caplog):
    import logging

    reporter = _ctrl_c_at(7)
    with caplog.at_level(logging.INFO, logger="videoanchor.progress"):
        with pytest.raises(KeyboardInterrupt):
            # (an iteration's: the working sets, the CPU's default, report no iterations)
            compute_anchor_scores(X, 3, mode=mode, max_iter=10000, progress=reporter,
                                  solver="fast" if mode == "exact" else "auto")  # fmt: skip
    run = reporter.runs[-1]
    assert not run.converged and run.stopped_by == "interrupted" and run.iterations == 7
    text = caplog.text
    assert "interrupted at iteration 7" in text and "NOT converged" in text, text
    assert "iteration limit" not in text and "raise max_iter" not in text, text


def test_ssc_ended_by_an_error_says_so():
    from videoanchor.anchor.progress import SSCProgress

    reporter = SSCProgress(enabled=False)
    with pytest.raises(FloatingPointError):
        compute_anchor_scores(X, 3, mode="exact", solver="faithful", alpha_z=1e12, rho=1e-5,
                              max_iter=20, progress=reporter)  # fmt: skip
    if reporter.runs:  # the A-step fails before or at the first iteration
        message = reporter.runs[-1].message()
        assert "stopped by an error" in message and "iteration limit" not in message, message


@torch.no_grad()
def test_last_scores_describe_a_text_only_request(tiny):
    from videoanchor.integrations.transformers.testing import tiny_sample

    handle = videoanchor.configure(tiny, enabled=True, n_clusters=3, max_iter=300)
    video = tiny_sample(tiny.config, [4], text=4, seed=22)
    tiny(**video)
    assert handle.last_scores.shape == video["input_ids"].shape
    assert bool((handle.last_scores > 0).any()) and handle.last_result[0] is not None
    text = tiny_sample(tiny.config, [], text=2, seed=23)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "this request has no visual inputs"
        tiny(**text)
    assert handle.last_scores.shape == text["input_ids"].shape  # not the video request's
    assert bool((handle.last_scores == 0).all())
    assert handle.last_result == [None] and handle.last_ssc_runs == [None]
    assert handle.last_visual_positions[0].numel() == 0 and handle.last_segments == [[]]
    assert not handle.last_anchored


def test_cli_anchors_page_height_below_one_row_fails_before_the_model(
    tiny_checkpoint, clips, tmp_path, capsys, monkeypatch
):
    def no_model(*a, **k):
        raise AssertionError("the model must not load")

    monkeypatch.setattr(videoanchor.cli, "load_vlm", no_model)
    argv = _anchors_argv(tiny_checkpoint, clips[5], tmp_path / "a.png") + ["--page-height", "1"]
    code, err = _cli(argv, capsys)
    assert code == 1 and "--page-height 1: expected at least" in err, err
    assert "the smallest page these frames fit on" in err and list(tmp_path.iterdir()) == []


def test_page_layout_refuses_a_height_below_one_row():
    from videoanchor.visualize import PAD, anchor_figure_layout

    with pytest.raises(ValueError, match=r"max_height=1: expected at least \d+ px"):
        anchor_figure_layout(5, 32, 32, max_height=1)
    whole = anchor_figure_layout(9, 32, 32, columns=4)  # 3 rows on one page
    limit = whole.page_size(0)[1] - 2 * (whole.cell_h + PAD)  # the page of one row
    lay = anchor_figure_layout(9, 32, 32, columns=4, max_height=limit)
    assert lay.pages == 3 and all(lay.page_size(p)[1] <= limit for p in range(lay.pages))
    with pytest.raises(ValueError, match=f"expected at least {limit} px"):
        anchor_figure_layout(9, 32, 32, columns=4, max_height=limit - 1)


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux /proc")
def test_cli_anchors_out_probed_with_a_file_before_the_model(clips, tmp_path, capsys):
    argv = ["anchors", "--video", str(clips[5]), "--model", str(tmp_path / "no-such-model"), "-q",
            "--out", "/proc/x.png"]  # fmt: skip
    code, err = _cli(argv, capsys)
    assert code == 1 and "--out: cannot write '/proc/x.png': creating a file in '/proc'" in err, err
    assert "no-such-model" not in err and not any(tmp_path.iterdir())


@pytest.mark.parametrize("command", ["run", "anchors"])
def test_cli_cache_dir_that_is_a_file_fails_before_the_model(command, clips, tmp_path, capsys):
    (tmp_path / "FILE").write_text("x")
    argv = [command, "--video", str(clips[5]), "--model", str(tmp_path / "no-such-model"), "-q",
            "--cache-dir", str(tmp_path / "FILE"), "--out" if command == "anchors" else "--question",
            str(tmp_path / "a.png") if command == "anchors" else "q"]  # fmt: skip
    code, err = _cli(argv, capsys)
    assert (
        code == 1 and f"--cache-dir: expected a folder, got the file '{tmp_path / 'FILE'}'" in err
    )
    assert "no-such-model" not in err and "NotADirectoryError" not in err, err


@pytest.fixture
def dev_set(clips, tmp_path):
    import json

    data = tmp_path / "dev.jsonl"
    data.write_text(json.dumps({"video": str(clips[5]), "question": "q", "answer": "a"}) + "\n")
    return data


def test_cli_tune_out_that_is_a_file_fails_before_the_model(dev_set, tmp_path, capsys):
    (tmp_path / "FILE").write_text("x")
    argv = ["tune", "--model", str(tmp_path / "no-such-model"), "--data", str(dev_set), "-q",
            "--out", str(tmp_path / "FILE")]  # fmt: skip
    code, err = _cli(argv, capsys)
    assert code == 1 and f"--out: expected a folder, got the file '{tmp_path / 'FILE'}'" in err
    assert "FileExistsError" not in err and "no-such-model" not in err, err


@pytest.mark.parametrize(
    "first_line", ["{not json", "[1, 2]", ""], ids=["not-json", "no-signature", "empty-line"]
)
def test_cli_tune_resume_on_a_corrupt_answers_file_names_it(
    tiny_checkpoint, dev_set, tmp_path, capsys, monkeypatch, first_line
):
    def no_model(*a, **k):
        raise AssertionError("the model must not load")

    import videoanchor.pipeline

    monkeypatch.setattr(videoanchor.pipeline, "load_vlm", no_model)
    out = tmp_path / "out"
    out.mkdir()
    (out / "answers.jsonl").write_text(first_line + "\n" + '{"item": "x"}\n')
    (out / "results.json").write_text("{corrupt")
    argv = ["tune", "--model", str(tiny_checkpoint), "--trust-remote-code", "--data",
            str(dev_set), "-q", "--out", str(out), "--resume"]  # fmt: skip
    code, err = _cli(argv, capsys)
    assert code == 1 and f"--resume: '{out / 'answers.jsonl'}' is not an answers file" in err, err
    assert "JSONDecodeError" not in err


def _bare_lmms_core(**attrs):
    """The lmms-eval wrapper's core without a model (only its request checks are used)."""
    from videoanchor.lmms_eval import VideoAnchorLMMCore

    core = VideoAnchorLMMCore.__new__(VideoAnchorLMMCore)
    core.max_new_tokens, core._warned = None, set()
    for k, v in attrs.items():
        setattr(core, k, v)
    return core


@pytest.mark.parametrize(
    "gen_kwargs,phrase",
    [({"temperature": "hot"}, "gen_kwargs['temperature']: expected a number, got 'hot'"),
     ({"temperature": -1}, "gen_kwargs['temperature']: expected a finite number >= 0"),
     ({"max_new_tokens": "many"}, "gen_kwargs['max_new_tokens']: expected an integer >= 1"),
     ({"num_beams": 0}, "gen_kwargs['num_beams']: expected an integer >= 1"),
     ({"do_sample": "maybe"}, "gen_kwargs['do_sample']: expected True or False")],
    ids=["temperature-str", "temperature-neg", "max_new_tokens", "num_beams", "do_sample"],
)  # fmt: skip
def test_lmms_eval_gen_kwargs_checked_before_the_video_is_read(gen_kwargs, phrase):
    from types import SimpleNamespace

    def doc_to_visual(doc):
        raise AssertionError("the video must not be read")

    core = _bare_lmms_core(task_dict={"t": {"test": [{}]}})
    request = SimpleNamespace(args=("q", gen_kwargs, doc_to_visual, 0, "t", "test"))
    with pytest.raises(ValueError, match=_re(phrase)):
        core.generate_until([request])


def test_lmms_eval_gen_kwargs_numbers_as_strings():
    core = _bare_lmms_core()
    with pytest.warns(UserWarning, match="the task asks for sampling; decoding greedily"):
        assert core._max_new_tokens({"temperature": "0.7", "max_new_tokens": "16"}) == 16
    assert core._max_new_tokens({"temperature": 0, "num_beams": "1"}) == 128


def test_import_with_a_torchvision_that_cannot_load_keeps_the_core(tmp_path):
    """`import videoanchor` beside a torchvision whose compiled ops do not load with this torch
    (the CUDA torchvision wheel with torch+cpu, what `pip install "torch==2.13.0" -e ".[video]"`
    installed before issue 53): the kernels and the scores still work without a warning (they
    do not import transformers, issue 68); importing transformers warns once what to install
    and that the transformers integration is off; using the integration then raises that
    same one line. Simulated in a child process with a stand-in torchvision
    (with its metadata) that fails on import as that wheel does."""
    import subprocess
    import sys

    pkg = tmp_path / "torchvision"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(
        'raise RuntimeError("operator torchvision::nms does not exist")\n'
    )
    meta = tmp_path / "torchvision-0.99.0.dist-info"
    meta.mkdir()
    (meta / "METADATA").write_text("Metadata-Version: 2.1\nName: torchvision\nVersion: 0.99.0\n")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), repo])}
    code = (
        "import warnings; warnings.simplefilter('always')\n"
        "import torch, videoanchor\n"
        "import videoanchor.anchor, videoanchor.kernels\n"
        "x = torch.randn(48, 12, generator=torch.Generator().manual_seed(0))\n"
        "r = videoanchor.compute_anchor_scores(x, 3, progress=False)\n"
        "assert r.scores.shape == (48,) and bool(torch.isfinite(r.scores).all())\n"
        "q = torch.randn(1, 2, 8, 16)\n"
        "g = torch.zeros(1, 8)\n"
        "out = videoanchor.anchored_attention(q, q, q, g, g, causal=True)\n"
        "assert bool(torch.isfinite(out).all())\n"
        "import sys; print('core ok'); print('transformers next', file=sys.stderr, flush=True)\n"
        "import transformers\n"
        "from videoanchor.integrations.transformers import register\n"
        "register()\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert "core ok" in proc.stdout, proc.stderr
    assert "RuntimeWarning" not in proc.stderr.split("transformers next")[0], proc.stderr
    warned = [line for line in proc.stderr.splitlines() if "RuntimeWarning" in line]
    assert len(warned) == 1, proc.stderr
    assert "transformers cannot be imported because the installed torchvision 0.99.0 does not " \
           "load with torch" in warned[0] and "install the torchvision" in warned[0]  # fmt: skip
    assert "the kernels and the anchor scores work" in warned[0].lower()
    assert "integration" in warned[0] and "is off" in warned[0]
    assert proc.returncode == 1  # using the integration raises the one line
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: videoanchor: transformers cannot be imported because "
                           "the installed torchvision 0.99.0 does not load with torch"), proc.stderr  # fmt: skip
    assert "operator torchvision::nms does not exist" in last
    assert "AttentionInterface" not in proc.stderr, proc.stderr


@pytest.mark.parametrize("budget", [False, True], ids=["iteration-limit", "time-budget"])
def test_unconverged_message_never_contradicts_itself(budget):
    from videoanchor.anchor.progress import SSCRunSummary

    run = SSCRunSummary(converged=False, iterations=10000, residual=0.0, best_residual=0.0,
                        eps=2e-4, max_iter=10000, seconds=1.0, stopped_by_budget=budget)  # fmt: skip
    message = run.message()
    assert "NOT converged" in message and "below eps only at the last iteration" in message


def test_cli_tune_alpha_overflowing_float32_fails_before_the_model(dev_set, tmp_path, capsys):
    argv = ["tune", "--model", str(tmp_path / "no-such-model"), "--data", str(dev_set), "-q",
            "--out", str(tmp_path / "out"), "--alpha-k", "0,1e308"]  # fmt: skip
    code, err = _cli(argv, capsys)
    assert code == 1 and "--alpha-k: alpha_k=1e+308: the gate" in err and "overflows" in err, err
    assert "no-such-model" not in err and not (tmp_path / "out").exists()


def test_ssc_run_inside_an_except_block_reports_its_own_outcome():
    from videoanchor.anchor.progress import SSCProgress

    reporter = SSCProgress(enabled=False)
    try:
        raise KeyboardInterrupt  # handled by the caller: not the SSC's
    except KeyboardInterrupt:
        compute_anchor_scores(X, 3, mode="exact", max_iter=5, progress=reporter)
    run = reporter.runs[-1]
    assert run.stopped_by is None and run.iterations == 5 and "iteration limit" in run.message()
