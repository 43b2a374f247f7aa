"""bfloat16, the production dtype, checked on the CPU: prefill, split-KV decode, packed
varlen and the backward kernels in bf16 against float64, with the 2x-PyTorch-error rule, through Triton's
interpreter with the test-only bf16 shim (tests/bf16_interpreter.py). This includes the
rounding of the value-scaled probabilities to bf16 before P @ V."""

import math

import pytest
import torch
from bf16_interpreter import bf16_interpreter, f32_to_bf16_bits, unavailable_reason
from test_attention import check_close, make_inputs, native_error

from videoanchor.kernels import triton_decode, triton_prefill
from videoanchor.kernels.interface import triton_interpret_enabled
from videoanchor.kernels.reference import anchored_attention_reference

pytestmark = [
    pytest.mark.skipif(not triton_interpret_enabled(), reason="runs Triton's CPU interpreter"),
    pytest.mark.skipif(unavailable_reason() is not None, reason=str(unavailable_reason())),
]
BF16 = torch.bfloat16


@pytest.fixture
def shim():
    with bf16_interpreter():
        yield


def test_rounding_matches_torch():
    """The shim's float32 -> bf16 rounding is torch's (nearest even), ties and NaN included."""
    g = torch.Generator().manual_seed(0)
    x = torch.cat([
        torch.randn(4096, generator=g) * 10.0 ** torch.randint(-30, 30, (4096,), generator=g),
        torch.tensor([1 + 2**-8, 1 + 3 * 2**-8, -(1 + 2**-8), 3.4e38, -0.0, float("inf"),
                      float("-inf"), 1e-40]),
    ])  # fmt: skip
    ours = torch.from_numpy(f32_to_bf16_bits(x.numpy()).view("int16")).view(BF16)
    assert torch.equal(ours.float(), x.to(BF16).float())
    nan = torch.from_numpy(f32_to_bf16_bits(torch.tensor([float("nan")]).numpy()).view("int16"))
    assert nan.view(BF16).isnan().all()


def _prefill(q, k, v, kb, vs, mask, causal, **extra):
    out = torch.full_like(q, float("nan"))
    triton_prefill.launch_prefill(
        q, k, v, kb, vs, mask, out, None, causal=causal, sm_scale=1 / math.sqrt(q.shape[-1]),
        interpret=True, **extra,
    )  # fmt: skip
    return out


def test_without_shim_bf16_is_garbage():
    """Why the shim exists: the bare interpreter multiplies bf16 bit patterns."""
    q, k, v, kb, vs, _ = make_inputs(1, 2, 1, 17, 17, 16, BF16)
    ref = anchored_attention_reference(q, k, v, kb, vs, causal=True)
    out = _prefill(q, k, v, kb, vs, None, True)
    assert not ((out.double() - ref).abs().max() < 0.1)


@pytest.mark.parametrize(
    "shape, D, pad",
    [
        pytest.param((2, 4, 2, 37, 37), 64, "random", id="B2-Hq4-Hkv2-S37-d64-pad"),
        pytest.param((1, 4, 1, 5, 45), 80, None, id="B1-Hq4-Hkv1-Sq5-Skv45-d80"),
    ],
)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_prefill_bf16(shim, shape, D, pad, causal):
    q, k, v, kb, vs, mask = make_inputs(*shape, D, BF16, pad=pad)
    ref = anchored_attention_reference(q, k, v, kb, vs, causal=causal, key_padding_mask=mask)
    out = _prefill(q, k, v, kb, vs, mask, causal)
    assert out.dtype == BF16
    check_close(out, ref, native_error(q, k, v, kb, vs, mask, causal, ref), BF16)


@pytest.mark.parametrize("n_split", [1, 3])
def test_decode_bf16(shim, n_split):
    q, k, v, kb, vs, mask = make_inputs(2, 8, 2, 1, 77, 64, BF16, pad="right")
    ref = anchored_attention_reference(q, k, v, kb, vs, causal=True, key_padding_mask=mask)
    out = torch.full_like(q, float("nan"))
    triton_decode.launch_decode(
        q, k, v, kb, vs, mask, out, None, causal=True, sm_scale=1 / math.sqrt(64),
        interpret=True, n_split=n_split,
    )  # fmt: skip
    check_close(out, ref, native_error(q, k, v, kb, vs, mask, True, ref), BF16)


def test_varlen_bf16(shim):
    """Packed sequences of 7, 0 and 20 queries against 9, 3 and 20 keys, each against its
    own float64 reference."""
    g = torch.Generator().manual_seed(3)
    Hq, Hkv, D = 4, 2, 64
    lq, lk = [7, 0, 20], [9, 3, 20]
    cu_q = torch.tensor([0, 7, 7, 27], dtype=torch.int32)
    cu_k = torch.tensor([0, 9, 12, 32], dtype=torch.int32)
    q = torch.randn(27, Hq, D, generator=g).to(BF16)
    k = torch.randn(32, Hkv, D, generator=g).to(BF16)
    v = torch.randn(32, Hkv, D, generator=g).to(BF16)
    s = torch.rand(32, generator=g)
    kb, vs = torch.log1p(9.5 * s), 1 + 2.5 * s
    out = torch.full_like(q, float("nan"))
    triton_prefill.launch_prefill(
        q, k, v, kb, vs, None, out, None, causal=True, sm_scale=1 / math.sqrt(D),
        interpret=True, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=max(lq),
    )  # fmt: skip
    for b in range(3):
        if lq[b] == 0:
            continue
        q0, k0 = int(cu_q[b]), int(cu_k[b])
        qb = q[q0 : q0 + lq[b]].transpose(0, 1)[None]
        kb_, vb = (t[k0 : k0 + lk[b]].transpose(0, 1)[None] for t in (k, v))
        gates = kb[None, k0 : k0 + lk[b]], vs[None, k0 : k0 + lk[b]]
        ref = anchored_attention_reference(qb, kb_, vb, *gates, causal=True)
        got = out[q0 : q0 + lq[b]].transpose(0, 1)[None]
        check_close(got, ref, native_error(qb, kb_, vb, *gates, None, True, ref), BF16)


@pytest.mark.parametrize(
    "case",
    ["gqa-full-pad", "mha-causal-leftpad-D40", "cache-seqlens", "causal-Sq21-Skv9-empty-rows"],
)
def test_backward_bf16(shim, case):
    """The backward kernels (dK/dV and dQ) in bf16: dq, dk, dv, d key_bias and d value_scale
    against autograd of the float64 reference, each within 2x the error of eager bf16
    PyTorch attention's autograd; output buffers poisoned with NaN before the kernels
    write them."""
    from test_attention_grad import TRITON_CASES, check_triton_grads, new_buffers_poisoned

    shape, opts = TRITON_CASES[case]
    with new_buffers_poisoned():
        check_triton_grads(shape, opts, BF16, "cpu")


def test_varlen_backward_bf16(shim):
    """Packed sequences (lengths 5, 0, 9 against 7, 3, 9 keys),
    GQA, causal, in bf16: the fp32/fp16 varlen backward test's check and 2x rule."""
    from test_attention_grad import test_varlen_backward_within_twice_pytorch_error as check

    check(BF16, "triton")
