"""Split-KV decode path, chunked prefill, log-sum-exp merging and packed varlen batches,
all against the float64 reference."""

import math

import pytest
import torch
from test_attention import DEVICE, check_close, make_inputs, native_error

import videoanchor
from videoanchor.kernels import interface as api
from videoanchor.kernels import triton_decode
from videoanchor.kernels.launch import capture_launches
from videoanchor.kernels.reference import anchored_attention_reference

SPLIT_KV, PREFILL = "_anchored_decode_split_kernel", "_anchored_prefill_kernel"


def first_kernel(call) -> str:
    """The first Triton kernel ``call`` launches (recorded, not run): which path it took."""
    with capture_launches() as launches:
        call()
    return launches[0].kernel.__name__


def run_decode_poisoned(q, k, v, kb, vs, mask, causal, n_split):
    B, Hq, Sq, D = q.shape
    out = torch.full((B, Hq, Sq, D), float("nan"), dtype=q.dtype, device=q.device)
    lse = torch.full((B, Hq, Sq), float("nan"), dtype=torch.float32, device=q.device)
    triton_decode.launch_decode(
        q, k, v, kb, vs, mask, out, lse, causal=causal, sm_scale=1 / math.sqrt(D),
        interpret=not q.is_cuda, n_split=n_split,
    )  # fmt: skip
    return out, lse


@pytest.mark.parametrize("n_split", [1, 3])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize(
    "dim_dtype",
    [
        pytest.param((64, torch.float16), id="d64-fp16"),
        pytest.param((80, torch.float32), id="d80-fp32"),
    ],
)
@pytest.mark.parametrize(
    "shape",
    [
        pytest.param((2, 4, 1, 1, 77), id="mqa-Sq1-Skv77"),
        pytest.param((1, 8, 2, 3, 61), id="gqa4-Sq3-Skv61"),
        pytest.param((2, 4, 2, 5, 45), id="gqa2-Sq5-Skv45"),
        pytest.param((1, 2, 2, 19, 40), id="mha-Sq19-Skv40"),
    ],
)
def test_split_kv_matches_reference(shape, dim_dtype, causal, n_split):
    D, dtype = dim_dtype
    q, k, v, kb, vs, mask = make_inputs(*shape, D, dtype, pad="left")
    ref, ref_lse = anchored_attention_reference(
        q, k, v, kb, vs, causal=causal, key_padding_mask=mask, return_lse=True
    )
    out, lse = run_decode_poisoned(q, k, v, kb, vs, mask, causal, n_split)
    check_close(out, ref, native_error(q, k, v, kb, vs, mask, causal, ref), dtype)
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite)
    torch.testing.assert_close(lse[finite].double(), ref_lse[finite], atol=1e-3, rtol=1e-4)


def test_split_kv_empty_splits_and_rows():
    """Splits whose keys are all padded, and a sample with no visible key, give 0, not NaN."""
    q, k, v, kb, vs, _ = make_inputs(2, 4, 2, 2, 64, 64, torch.float32)
    mask = torch.zeros(2, 64, dtype=torch.bool, device=DEVICE)
    mask[0, 40:50] = True  # only one of 4 splits has visible keys
    out, lse = run_decode_poisoned(q, k, v, kb, vs, mask, True, 4)
    ref = anchored_attention_reference(q, k, v, kb, vs, key_padding_mask=mask)
    assert not out.isnan().any() and not lse.isnan().any()
    assert torch.equal(out[1], torch.zeros_like(out[1])) and torch.isneginf(lse[1]).all()
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=0)


def test_public_api_picks_split_kv_for_decode():
    q, k, v, kb, vs, mask = make_inputs(
        1, 4, 2, 1, api.DECODE_MIN_SKV + 7, 64, torch.float32, pad="left"
    )

    def call(sq=1, skv=k.shape[2]):
        return videoanchor.anchored_attention(
            q[:, :, :sq].expand(-1, -1, sq, -1), k[:, :, :skv], v[:, :, :skv], kb[:, :skv],
            vs[:, :skv], key_padding_mask=mask[:, :skv], backend="triton",
        )  # fmt: skip

    # a single query against a long cache: split-KV; a short cache or many queries: prefill
    assert first_kernel(call) == SPLIT_KV
    assert first_kernel(lambda: call(skv=api.DECODE_MIN_SKV)) == SPLIT_KV
    assert first_kernel(lambda: call(skv=api.DECODE_MIN_SKV - 1)) == PREFILL
    assert first_kernel(lambda: call(sq=api.DECODE_MAX_SQ)) == SPLIT_KV
    assert first_kernel(lambda: call(sq=api.DECODE_MAX_SQ + 1)) == PREFILL
    out = call()
    ref = anchored_attention_reference(q, k, v, kb, vs, key_padding_mask=mask)
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=0)


@pytest.mark.parametrize("path", ["split-kv", "prefill-kernel"])
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_chunked_prefill_equals_one_prefill(backend, path):
    """Processing a prompt in chunks against a growing cache gives the one-shot result
    (bottom-right causal alignment), with the gates of the visible keys. Chunks of 16
    queries take the split-KV path once the cache holds ``DECODE_MIN_SKV`` keys (a prompt
    whose first 256 tokens come in one chunk), the prefill kernel before (a short prompt)."""
    start = api.DECODE_MIN_SKV if path == "split-kv" else 0
    n = start + 45
    q, k, v, kb, vs, _ = make_inputs(1, 2, 1, n, n, 64, torch.float32)
    full = videoanchor.anchored_attention(q, k, v, kb, vs, backend=backend)
    bounds = [0, *([start] if start else []), *range(start + 16, n, 16), n]
    parts = []
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):

        def chunk(a=a, b=b):
            return videoanchor.anchored_attention(
                q[:, :, a:b], k[:, :, :b], v[:, :, :b], kb[:, :b], vs[:, :b], backend=backend
            )

        if backend == "triton" and a >= start and b - a == 16:
            assert first_kernel(chunk) == (SPLIT_KV if start else PREFILL), (a, b)
        parts.append(chunk())
    torch.testing.assert_close(torch.cat(parts, dim=2), full, atol=2e-6, rtol=1e-5)
    ref = anchored_attention_reference(q, k, v, kb, vs)
    torch.testing.assert_close(full.double(), ref, atol=2e-5, rtol=0)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_lse_merges_partial_attentions(backend):
    """Attention over two halves of the keys, merged by their log-sum-exp, equals attention
    over all keys: what return_lse is for."""
    q, k, v, kb, vs, _ = make_inputs(2, 4, 2, 13, 40, 64, torch.float32)
    kw = dict(causal=False, backend=backend, return_lse=True)
    o1, l1 = videoanchor.anchored_attention(
        q, k[:, :, :17], v[:, :, :17], kb[:, :17], vs[:, :17], **kw
    )
    o2, l2 = videoanchor.anchored_attention(
        q, k[:, :, 17:], v[:, :, 17:], kb[:, 17:], vs[:, 17:], **kw
    )
    o, l = videoanchor.anchored_attention(q, k, v, kb, vs, **kw)
    lse = torch.logaddexp(l1, l2)
    merged = o1 * torch.exp(l1 - lse)[..., None] + o2 * torch.exp(l2 - lse)[..., None]
    torch.testing.assert_close(lse, l, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(merged, o, atol=1e-5, rtol=1e-5)


def pack(seq_q, seq_k, Hq, Hkv, D, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    tq, tk = sum(seq_q), sum(seq_k)
    q = torch.randn(tq, Hq, D, generator=g).to(DEVICE, dtype)
    k = torch.randn(tk, Hkv, D, generator=g).to(DEVICE, dtype)
    v = torch.randn(tk, Hkv, D, generator=g).to(DEVICE, dtype)
    s = torch.rand(tk, generator=g).to(DEVICE)
    cu_q = torch.tensor(
        [0, *torch.tensor(seq_q).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE
    )
    cu_k = torch.tensor(
        [0, *torch.tensor(seq_k).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE
    )
    return q, k, v, torch.log1p(9.5 * s), 1 + 2.5 * s, cu_q, cu_k


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_varlen_matches_per_sequence_reference(dtype, backend, causal):
    seq_q, seq_k = [7, 0, 33, 18], [7, 5, 40, 18]
    q, k, v, kb, vs, cu_q, cu_k = pack(seq_q, seq_k, 4, 2, 64, dtype)
    if backend == "triton":
        out = torch.full_like(q, float("nan"))
        lse = torch.full((4, q.shape[0]), float("nan"), device=DEVICE)
        from videoanchor.kernels import triton_prefill

        triton_prefill.launch_prefill(
            q, k, v, kb, vs, None, out, lse, causal=causal, sm_scale=1 / 8,
            interpret=not q.is_cuda, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=max(seq_q),
        )  # fmt: skip
    else:
        out, lse = videoanchor.anchored_attention_varlen(
            q, k, v, cu_q, cu_k, max(seq_q), None, kb, vs,
            causal=causal, backend=backend, return_lse=True,
        )  # fmt: skip
    check_varlen(out, lse, q, k, v, kb, vs, cu_q, cu_k, causal, dtype)


def check_varlen(out, lse, q, k, v, kb, vs, cu_q, cu_k, causal, dtype):
    """Each packed sequence against the float64 reference run on it alone."""
    assert not out.isnan().any() and not lse.isnan().any(), "unwritten rows"
    for b in range(cu_q.numel() - 1):
        q0, q1, k0, k1 = cu_q[b].item(), cu_q[b + 1].item(), cu_k[b].item(), cu_k[b + 1].item()
        if q1 == q0:  # an empty query sequence has nothing to check
            continue
        args = (
            q[None, q0:q1].transpose(1, 2),
            k[None, k0:k1].transpose(1, 2),
            v[None, k0:k1].transpose(1, 2),
        )
        ref, ref_lse = anchored_attention_reference(
            *args, kb[None, k0:k1], vs[None, k0:k1], causal=causal, return_lse=True
        )
        base = native_error(*args, kb[None, k0:k1], vs[None, k0:k1], None, causal, ref)
        check_close(out[None, q0:q1].transpose(1, 2), ref, base, dtype)
        finite = torch.isfinite(ref_lse[0])
        assert torch.equal(torch.isfinite(lse[:, q0:q1]), finite)
        torch.testing.assert_close(
            lse[:, q0:q1][finite].double(), ref_lse[0][finite], atol=1e-3, rtol=1e-4
        )


@pytest.mark.parametrize("n_split", [1, 3, 7])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_varlen_split_kv_matches_per_sequence_reference(dtype, causal, n_split):
    """Packed decode / short chunks against packed caches through the split-KV kernel:
    1 to 5 queries per sequence, an empty query sequence, a sequence with no keys, one
    with fewer keys than queries, caches shorter than a split and longer than several."""
    seq_q, seq_k = [1, 5, 0, 2, 3, 1], [70, 41, 9, 0, 2, 130]
    q, k, v, kb, vs, cu_q, cu_k = pack(seq_q, seq_k, 8, 2, 80, dtype, seed=3)
    out = torch.full_like(q, float("nan"))
    lse = torch.full((8, q.shape[0]), float("nan"), device=DEVICE)
    triton_decode.launch_decode(
        q, k, v, kb, vs, None, out, lse, causal=causal, sm_scale=1 / math.sqrt(80),
        interpret=not q.is_cuda, n_split=n_split, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
        max_seqlen_q=max(seq_q), max_seqlen_k=max(seq_k),
    )  # fmt: skip
    check_varlen(out, lse, q, k, v, kb, vs, cu_q, cu_k, causal, dtype)


@pytest.mark.parametrize(
    "hint, path",
    [(None, SPLIT_KV), (1, PREFILL), (10**6, SPLIT_KV)],
    ids=["no-hint", "too-small", "too-large"],
)
def test_varlen_public_api_split_kv_any_hint(hint, path):
    """The public varlen call takes the split-KV path for short query blocks against long
    keys, and the max_seqlen_k hint changes only the path (a hint under
    ``DECODE_MIN_SKV``: the prefill kernel; none: the mean key length decides) or the
    number of splits, never the result."""
    seq_q, seq_k = [1, 1, 4], [300, 270, 262]
    q, k, v, kb, vs, cu_q, cu_k = pack(seq_q, seq_k, 4, 4, 64, torch.float32, seed=1)

    def call():
        return videoanchor.anchored_attention_varlen(
            q, k, v, cu_q, cu_k, 4, hint, kb, vs, backend="triton", return_lse=True
        )

    assert first_kernel(call) == path
    out, lse = call()
    check_varlen(out, lse, q, k, v, kb, vs, cu_q, cu_k, True, torch.float32)


def test_varlen_public_triton_and_errors():
    q, k, v, kb, vs, cu_q, cu_k = pack([5, 9], [5, 9], 2, 1, 64, torch.float32)
    out = videoanchor.anchored_attention_varlen(q, k, v, cu_q, cu_k, 9, 9, kb, vs, backend="triton")
    ref = videoanchor.anchored_attention_varlen(q, k, v, cu_q, cu_k, 9, 9, kb, vs, backend="torch")
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=0)
    with pytest.raises(ValueError, match="same number of sequences"):
        videoanchor.anchored_attention_varlen(q, k, v, cu_q, cu_k[:2], 9)
    with pytest.raises(TypeError, match="int32"):
        videoanchor.anchored_attention_varlen(q, k, v, cu_q.float(), cu_k, 9)
    with pytest.raises(ValueError, match=r"key_bias: expected shape \(total_k,\)"):
        videoanchor.anchored_attention_varlen(q, k, v, cu_q, cu_k, 9, 9, kb[:3])
    with pytest.raises(ValueError, match="max_seqlen_q"):
        videoanchor.anchored_attention_varlen(q, k, v, cu_q, cu_k, -1)
    with pytest.raises(ValueError, match="max_seqlen_k"):
        videoanchor.anchored_attention_varlen(q, k, v, cu_q, cu_k, 9, -3)
    with pytest.raises(ValueError, match="sequence 1 has 9 queries"):
        videoanchor.anchored_attention_varlen(q, k, v, cu_q, cu_k, 5, backend="torch")


# ---- GPU only ----------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("Sq", [1, 4, 64])
@pytest.mark.parametrize("Skv", [1000, 8192])
def test_gpu_decode(dtype, Sq, Skv):
    q, k, v, kb, vs, mask = make_inputs(2, 28, 4, Sq, Skv, 128, dtype, pad="left")
    ref = anchored_attention_reference(q, k, v, kb, vs, key_padding_mask=mask)
    out = videoanchor.anchored_attention(q, k, v, kb, vs, key_padding_mask=mask)
    check_close(out, ref, native_error(q, k, v, kb, vs, mask, True, ref), dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_gpu_varlen_decode(dtype):
    seq_q, seq_k = [1, 1, 4, 1, 16], [8192, 300, 5000, 0, 2049]
    q, k, v, kb, vs, cu_q, cu_k = pack(seq_q, seq_k, 28, 4, 128, dtype)
    out, lse = videoanchor.anchored_attention_varlen(
        q, k, v, cu_q, cu_k, max(seq_q), max(seq_k), kb, vs, return_lse=True
    )
    check_varlen(out, lse, q, k, v, kb, vs, cu_q, cu_k, True, dtype)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize(
    "Sq, slots, path",
    [(1, 260, SPLIT_KV), (3, 260, SPLIT_KV), (9, 50, PREFILL)],
    ids=["decode", "split-kv-Sq3", "prefill-kernel"],
)
def test_cache_seqlens_static_cache(Sq, slots, path, backend, causal):
    """A preallocated cache (260 slots: the split-KV path; 50: the prefill kernel) where
    sample b holds cache_seqlens[b] valid keys: equal to attending over the valid prefix
    only, and garbage past it is never read."""
    q, k, v, kb, vs, _ = make_inputs(3, 4, 2, Sq, slots, 64, torch.float32)
    lens = torch.tensor([slots, 23, 9], dtype=torch.int32, device=DEVICE)
    for b, n in enumerate(lens.tolist()):  # poison the unused slots
        k[b, :, n:], v[b, :, n:], kb[b, n:] = float("nan"), float("nan"), float("nan")

    def call():
        return videoanchor.anchored_attention(
            q, k, v, kb, vs, causal=causal, backend=backend, cache_seqlens=lens, return_lse=True
        )

    if backend == "triton":
        assert first_kernel(call) == path
    out, lse = call()
    assert not out.isnan().any()
    for b, n in enumerate(lens.tolist()):
        sl = slice(b, b + 1)
        ref, ref_lse = anchored_attention_reference(
            q[sl],
            k[sl, :, :n],
            v[sl, :, :n],
            kb[sl, :n],
            vs[sl, :n],
            causal=causal,
            return_lse=True,
        )
        torch.testing.assert_close(out[sl].double(), ref, atol=2e-5, rtol=0)
        finite = torch.isfinite(ref_lse)
        torch.testing.assert_close(lse[sl][finite].double(), ref_lse[finite], atol=1e-4, rtol=1e-5)
