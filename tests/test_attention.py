"""Anchored attention: Triton kernel (interpreter on CPU) and torch path vs the float64
reference. Tolerance rule (FlagAttention): the error against float64 is at most twice the
error of plain PyTorch attention computed in the input dtype, with a small floor."""

import math

import pytest
import torch

import videoanchor
from videoanchor.kernels import triton_prefill
from videoanchor.kernels.reference import anchored_attention_reference
from videoanchor.kernels.torch_attention import anchored_attention_torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FLOOR = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def make_inputs(B, Hq, Hkv, Sq, Skv, D, dtype, *, bias=True, scale=True, pad=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, Sq, D, generator=g).to(DEVICE, dtype)
    k = torch.randn(B, Hkv, Skv, D, generator=g).to(DEVICE, dtype)
    v = torch.randn(B, Hkv, Skv, D, generator=g).to(DEVICE, dtype)
    # Strong gates (alpha_k = 9.5, alpha_v = 2.5 on scores in [0, 1)) so that ignoring one
    # changes the output far beyond the tolerance.
    s = torch.rand(B, Skv, generator=g).to(DEVICE)
    key_bias = torch.log1p(9.5 * s) if bias else None
    value_scale = 1 + 2.5 * s if scale else None
    mask = None
    if pad == "left":
        lens = torch.randint(1, Skv + 1, (B,), generator=g)
        mask = torch.arange(Skv)[None, :] >= (Skv - lens)[:, None]
    elif pad == "right":
        lens = torch.randint(1, Skv + 1, (B,), generator=g)
        mask = torch.arange(Skv)[None, :] < lens[:, None]
    elif pad == "random":
        mask = torch.rand(B, Skv, generator=g) > 0.3
    if mask is not None:
        mask = mask.to(DEVICE)
    return q, k, v, key_bias, value_scale, mask


def native_error(q, k, v, key_bias, value_scale, mask, causal, ref):
    """Max error of eager PyTorch attention computed in the input dtype."""
    B, Hq, Sq, D = q.shape
    Hkv, Skv = k.shape[1], k.shape[2]
    kk = k.repeat_interleave(Hq // Hkv, 1)
    vv = v.repeat_interleave(Hq // Hkv, 1)
    if value_scale is not None:
        vv = vv * value_scale[:, None, :, None].to(v.dtype)
    logits = (q @ kk.transpose(-1, -2)) * (1 / math.sqrt(D))
    if key_bias is not None:
        logits = logits + key_bias[:, None, None, :].to(q.dtype)
    hidden = torch.zeros(B, 1, Sq, Skv, dtype=torch.bool, device=q.device)
    if causal:
        hidden |= torch.ones(Sq, Skv, dtype=torch.bool, device=q.device).triu(Skv - Sq + 1)
    if mask is not None:
        hidden |= ~mask[:, None, None, :]
    p = torch.softmax(logits.masked_fill(hidden, float("-inf")), dim=-1).nan_to_num(0.0)
    return ((p @ vv).double() - ref).abs().max().item()


def check_close(out, ref, base_err, dtype):
    assert not out.isnan().any(), "output has NaN (unwritten or 0/0)"
    err = (out.double() - ref).abs().max().item()
    tol = max(2 * base_err, FLOOR[dtype])
    assert err <= tol, f"max error {err:.3g} > tol {tol:.3g} (eager {dtype}: {base_err:.3g})"


def run_kernel_poisoned(q, k, v, key_bias, value_scale, mask, causal, sm_scale=None):
    """Call the Triton launcher directly on NaN-poisoned output buffers."""
    B, Hq, Sq, D = q.shape
    out = torch.full((B, Hq, Sq, D), float("nan"), dtype=q.dtype, device=q.device)
    lse = torch.full((B, Hq, Sq), float("nan"), dtype=torch.float32, device=q.device)
    scale = 1 / math.sqrt(D) if sm_scale is None else sm_scale
    triton_prefill.launch_prefill(
        q, k, v, key_bias, value_scale, mask, out, lse,
        causal=causal, sm_scale=scale, interpret=not q.is_cuda,
    )  # fmt: skip
    return out, lse


SHAPES = [
    pytest.param((2, 4, 2, 37, 37), id="B2-Hq4-Hkv2-S37"),
    pytest.param((1, 4, 1, 5, 45), id="B1-Hq4-Hkv1-Sq5-Skv45"),
    pytest.param((2, 2, 2, 23, 19), id="B2-Hq2-Hkv2-Sq23-Skv19"),
    pytest.param((1, 4, 4, 33, 50), id="B1-Hq4-Hkv4-Sq33-Skv50"),
]
DIM_DTYPES = [
    pytest.param((64, torch.float16), id="d64-fp16"),
    pytest.param((80, torch.float32), id="d80-fp32"),
    pytest.param((80, torch.float16), id="d80-fp16"),
    pytest.param((64, torch.float32), id="d64-fp32"),
]


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("dim_dtype", DIM_DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_kernel_matches_reference_all_gates(shape, dim_dtype, causal):
    D, dtype = dim_dtype
    q, k, v, kb, vs, mask = make_inputs(*shape, D, dtype, pad="random")
    ref, ref_lse = anchored_attention_reference(
        q, k, v, kb, vs, causal=causal, key_padding_mask=mask, return_lse=True
    )
    out, lse = run_kernel_poisoned(q, k, v, kb, vs, mask, causal)
    check_close(out, ref, native_error(q, k, v, kb, vs, mask, causal, ref), dtype)
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite)
    torch.testing.assert_close(lse[finite].double(), ref_lse[finite], atol=1e-3, rtol=1e-4)


FEATURES = {
    "none": dict(bias=False, scale=False, pad=None),
    "bias": dict(bias=True, scale=False, pad=None),
    "scale": dict(bias=False, scale=True, pad=None),
    "pad-left": dict(bias=False, scale=False, pad="left"),
    "pad-right": dict(bias=True, scale=True, pad="right"),
}


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("feature", list(FEATURES))
def test_each_gate_alone(feature, causal, backend):
    dtype = torch.float32
    q, k, v, kb, vs, mask = make_inputs(2, 4, 2, 21, 29, 64, dtype, **FEATURES[feature])
    ref = anchored_attention_reference(q, k, v, kb, vs, causal=causal, key_padding_mask=mask)
    out = videoanchor.anchored_attention(
        q, k, v, kb, vs, causal=causal, key_padding_mask=mask, backend=backend
    )
    assert out.dtype == dtype and out.shape == q.shape
    check_close(out, ref, native_error(q, k, v, kb, vs, mask, causal, ref), dtype)


@pytest.mark.parametrize("dim_dtype", DIM_DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_torch_backend_matches_reference(shape, dim_dtype):
    D, dtype = dim_dtype
    q, k, v, kb, vs, mask = make_inputs(*shape, D, dtype, pad="left")
    ref = anchored_attention_reference(q, k, v, kb, vs, causal=True, key_padding_mask=mask)
    # A tiny budget forces many query chunks.
    out, _ = anchored_attention_torch(
        q, k, v, kb, vs, causal=True, sm_scale=1 / math.sqrt(D), key_padding_mask=mask,
        chunk_budget_bytes=1, fused=False,
    )  # fmt: skip
    check_close(out, ref, native_error(q, k, v, kb, vs, mask, True, ref), dtype)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_bias_and_scale_are_applied(backend):
    """Fails if either gate were ignored: each changes the output by far more than the
    tolerance, and the gated output matches the gated reference."""
    q, k, v, kb, vs, _ = make_inputs(1, 2, 1, 19, 19, 64, torch.float32)
    plain = videoanchor.anchored_attention(q, k, v, backend=backend)
    only_bias = videoanchor.anchored_attention(q, k, v, kb, None, backend=backend)
    only_scale = videoanchor.anchored_attention(q, k, v, None, vs, backend=backend)
    assert (only_bias - plain).abs().max() > 0.05
    assert (only_scale - plain).abs().max() > 0.05
    for out, b, s in ((only_bias, kb, None), (only_scale, None, vs)):
        ref = anchored_attention_reference(q, k, v, b, s, causal=True)
        torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=0)


def test_value_scale_does_not_enter_normaliser():
    """A uniform value scale c multiplies the output by exactly c (the normaliser uses
    unscaled probabilities); a constant key bias changes nothing."""
    q, k, v, _, _, _ = make_inputs(1, 2, 2, 17, 17, 64, torch.float32)
    plain = videoanchor.anchored_attention(q, k, v, backend="triton")
    c = torch.full((1, 17), 3.0, device=DEVICE)
    scaled = videoanchor.anchored_attention(q, k, v, None, c, backend="triton")
    shifted = videoanchor.anchored_attention(q, k, v, c, None, backend="triton")
    torch.testing.assert_close(scaled, 3 * plain, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(shifted, plain, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_any_strides(backend):
    """(B, S, H, D) tensors transposed to (B, H, S, D), and strided gate vectors."""
    B, S, Hq, Hkv, D = 2, 27, 4, 2, 64
    q_bshd = torch.randn(B, S, Hq, D, device=DEVICE)
    kv_bshd = torch.randn(B, S, 2, Hkv, D, device=DEVICE)
    q = q_bshd.transpose(1, 2)
    k = kv_bshd[:, :, 0].transpose(1, 2)
    v = kv_bshd[:, :, 1].transpose(1, 2)
    gates = torch.rand(B, S, 3, device=DEVICE)
    kb, vs = torch.log1p(5 * gates)[..., 0], (1 + gates)[..., 1]
    mask = (torch.rand(B, 2 * S, device=DEVICE) > 0.2)[:, ::2]
    assert not q.is_contiguous() and not kb.is_contiguous() and not mask.is_contiguous()
    out = videoanchor.anchored_attention(q, k, v, kb, vs, key_padding_mask=mask, backend=backend)
    dense = videoanchor.anchored_attention(
        q.contiguous(), k.contiguous(), v.contiguous(), kb.contiguous(), vs.contiguous(),
        key_padding_mask=mask.contiguous(), backend=backend,
    )  # fmt: skip
    torch.testing.assert_close(out, dense, atol=0, rtol=0)
    # Stored as (B, S, H, D): handing it back to a (B, S, H * D) projection costs no copy.
    assert out.transpose(1, 2).is_contiguous()


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_fully_masked_rows_are_zero(backend):
    q, k, v, kb, vs, _ = make_inputs(2, 2, 1, 9, 13, 64, torch.float32)
    mask = torch.ones(2, 13, dtype=torch.bool, device=DEVICE)
    mask[1] = False  # sample 1 sees nothing at all
    mask[0, :5] = False  # sample 0: causal, query 0 sees keys 0..4 -> none; query 1 sees key 5
    out, lse = videoanchor.anchored_attention(
        q, k, v, kb, vs, key_padding_mask=mask, backend=backend, return_lse=True
    )
    assert not out.isnan().any() and not lse.isnan().any()
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    assert torch.isneginf(lse[1]).all()
    assert torch.equal(out[0, :, 0], torch.zeros_like(out[0, :, 0]))
    assert (out[0, :, 1:].abs().sum(-1) > 0).all()


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_padded_keys_are_never_read(backend):
    """NaN in the K/V/gates of padded keys must not reach the output."""
    q, k, v, kb, vs, mask = make_inputs(2, 4, 2, 11, 29, 64, torch.float32, pad="left")
    ref = anchored_attention_reference(q, k, v, kb, vs, key_padding_mask=mask)
    hidden = ~mask
    k[:, 0][hidden], v[:, 1][hidden], kb[hidden], vs[hidden] = (float("nan"),) * 4
    out = videoanchor.anchored_attention(q, k, v, kb, vs, key_padding_mask=mask, backend=backend)
    assert not out.isnan().any()
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=0)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_causal_sq_longer_than_skv(backend):
    """Bottom-right alignment: with Sq=5, Skv=2 the first 3 queries see no key."""
    q, k, v, _, _, _ = make_inputs(1, 1, 1, 5, 2, 64, torch.float32)
    out = videoanchor.anchored_attention(q, k, v, backend=backend)
    assert torch.equal(out[0, 0, :3], torch.zeros_like(out[0, 0, :3]))
    torch.testing.assert_close(out[0, 0, 3], v[0, 0, 0], atol=1e-6, rtol=0)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("sq, skv", [(0, 7), (7, 0)])
def test_empty_sequences(backend, sq, skv):
    q, k, v, kb, vs, _ = make_inputs(1, 2, 1, sq, skv, 64, torch.float32)
    out, lse = videoanchor.anchored_attention(q, k, v, kb, vs, backend=backend, return_lse=True)
    assert out.shape == (1, 2, sq, 64) and lse.shape == (1, 2, sq)
    assert torch.equal(out, torch.zeros_like(out))
    assert torch.isneginf(lse).all()


def test_sm_scale_is_used():
    q, k, v, kb, vs, _ = make_inputs(1, 2, 2, 15, 15, 64, torch.float32)
    for backend in ("triton", "torch"):
        out = videoanchor.anchored_attention(q, k, v, kb, vs, sm_scale=0.3, backend=backend)
        ref = anchored_attention_reference(q, k, v, kb, vs, sm_scale=0.3)
        torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=0)


def test_deterministic():
    q, k, v, kb, vs, mask = make_inputs(2, 4, 2, 31, 31, 64, torch.float16, pad="random")
    first = videoanchor.anchored_attention(q, k, v, kb, vs, key_padding_mask=mask, backend="triton")
    for _ in range(3):
        again = videoanchor.anchored_attention(
            q, k, v, kb, vs, key_padding_mask=mask, backend="triton"
        )
        assert torch.equal(first, again)


def test_custom_op_opcheck_and_compile():
    """The op has a correct fake implementation and traces under torch.compile."""
    q, k, v, kb, vs, mask = make_inputs(1, 2, 1, 17, 17, 64, torch.float32, pad="left")
    torch.library.opcheck(
        torch.ops.videoanchor.anchored_attention_fwd.default,
        (q, k, v, kb, vs, mask, None, True, 0.125, True),
        test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"),
    )

    def fn(q, k, v, kb, vs, mask):
        return (
            videoanchor.anchored_attention(q, k, v, kb, vs, key_padding_mask=mask, backend="triton")
            * 2
        )

    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(q, k, v, kb, vs, mask), fn(q, k, v, kb, vs, mask))


def test_anchor_gates():
    s = torch.tensor([[0.0, 0.25, 0.999]])
    kb, vs = videoanchor.anchor_gates(s, alpha_k=9.5, alpha_v=2.5)
    torch.testing.assert_close(kb, torch.log1p(9.5 * s))
    torch.testing.assert_close(vs, 1 + 2.5 * s)
    assert kb.dtype == torch.float32 and vs.dtype == torch.float32
    with pytest.raises(ValueError, match="NaN"):
        videoanchor.anchor_gates(torch.tensor([0.1, float("nan")]), 1.0, 1.0)
    with pytest.raises(ValueError, match="alpha_k=-2.0 makes the gate"):
        videoanchor.anchor_gates(torch.tensor([0.1, 0.9]), -2.0, 1.0)
    with pytest.raises(ValueError, match="alpha_v=-1.5 makes the gate"):
        videoanchor.anchor_gates(torch.tensor([0.1, 0.9]), 1.0, -1.5)
    with pytest.raises(TypeError, match="floating-point"):
        videoanchor.anchor_gates(torch.tensor([0, 1]), 1.0, 1.0)


def test_input_errors():
    q, k, v, kb, vs, _ = make_inputs(2, 4, 2, 8, 8, 64, torch.float32)
    attn = videoanchor.anchored_attention
    with pytest.raises(ValueError, match="expected batch 2"):
        attn(q, k[:1], v[:1])
    with pytest.raises(ValueError, match="multiple of the KV heads"):
        attn(q[:, :3], k, v)
    with pytest.raises(ValueError, match="same shape"):
        attn(q, k, v[:, :, :5])
    with pytest.raises(ValueError, match="head dim 64"):
        attn(q, k[..., :32], v[..., :32])
    with pytest.raises(TypeError, match="float16, bfloat16 or float32, got torch.float64"):
        attn(q.double(), k.double(), v.double())
    with pytest.raises(TypeError, match="one dtype"):
        attn(q, k.half(), v.half())
    with pytest.raises(ValueError, match=r"key_bias: expected shape \(B, Skv\) = \(2, 8\)"):
        attn(q, k, v, kb[:, :7])
    with pytest.raises(TypeError, match="torch.bool"):
        attn(q, k, v, key_padding_mask=torch.ones(2, 8, dtype=torch.int64, device=DEVICE))
    with pytest.raises(ValueError, match="one device"):
        attn(q, k, v, kb.to("meta"))
    with pytest.raises(ValueError, match="backend"):
        attn(q, k, v, backend="flash")
    with pytest.raises(ValueError, match=r"head dim in \[16, 256\], got 8"):
        attn(q[..., :8], k[..., :8], v[..., :8], backend="triton")
    with pytest.raises(TypeError, match="torch.Tensor"):
        attn(q.numpy(force=True), k, v)


# ---- GPU only ----------------------------------------------------------------------------

GPU_DTYPES = [torch.float16, torch.bfloat16, torch.float32]


@pytest.mark.gpu
@pytest.mark.parametrize("D", [64, 80, 96, 128, 256])
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=["fp16", "bf16", "fp32"])
@pytest.mark.parametrize("shape", [(2, 8, 2, 1000, 1000), (1, 28, 4, 333, 2049)], ids=str)
def test_gpu_all_head_dims(shape, D, dtype):
    q, k, v, kb, vs, mask = make_inputs(*shape, D, dtype, pad="left")
    ref = anchored_attention_reference(q, k, v, kb, vs, causal=True, key_padding_mask=mask)
    out, _ = run_kernel_poisoned(q, k, v, kb, vs, mask, True)
    check_close(out, ref, native_error(q, k, v, kb, vs, mask, True, ref), dtype)


@pytest.mark.gpu
def test_gpu_long_sequence_memory():
    """Extra memory stays O(B * H * S): no (Sq, Skv) buffer at S = 32k."""
    B, Hq, Hkv, S, D = 1, 28, 4, 32768, 128
    q, k, v, kb, vs, _ = make_inputs(B, Hq, Hkv, S, S, D, torch.bfloat16, seed=1)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = videoanchor.anchored_attention(q, k, v, kb, vs)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    assert extra <= out.numel() * out.element_size() * 1.05 + (1 << 20)
    assert not out.isnan().any()


@pytest.mark.gpu
def test_gpu_cuda_graph_and_inductor():
    q, k, v, kb, vs, mask = make_inputs(2, 8, 2, 300, 300, 128, torch.bfloat16, pad="left")
    eager = videoanchor.anchored_attention(q, k, v, kb, vs, key_padding_mask=mask)
    compiled = torch.compile(videoanchor.anchored_attention, fullgraph=True)
    torch.testing.assert_close(compiled(q, k, v, kb, vs, key_padding_mask=mask), eager)
    static = [t.clone() for t in (q, k, v, kb, vs)]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        videoanchor.anchored_attention(*static, key_padding_mask=mask)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graphed = videoanchor.anchored_attention(*static, key_padding_mask=mask)
    graph.replay()
    torch.testing.assert_close(graphed, eager, atol=0, rtol=0)
