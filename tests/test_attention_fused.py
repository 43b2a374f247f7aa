"""The torch path's fused CPU forward (PyTorch's fused attention kernel with a broadcast
key bias and a pre-scaled V) against the float64 reference: every mask shape it takes
(causal square, decode, a query chunk after a cache, per-sample cache lengths, padding on
either side, rows with no visible key), grouped heads, NaN in hidden keys, bf16."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_attention import check_close, make_inputs, native_error

from videoanchor.kernels.reference import anchored_attention_reference
from videoanchor.kernels.torch_attention import anchored_attention_torch

pytestmark = pytest.mark.skipif(
    not hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu"),
    reason="this torch has no fused CPU attention kernel",
)


def _both(q, k, v, kb, vs, mask, causal, cache=None):
    """(fused out, lse) on the inputs as given, (reference out, lse) with NaN in hidden keys
    replaced by 0 (the reference's own arithmetic would spread it)."""
    kw = dict(causal=causal, sm_scale=1 / math.sqrt(q.shape[-1]), key_padding_mask=mask,
              cache_seqlens=cache)  # fmt: skip
    fused = anchored_attention_torch(q, k, v, kb, vs, fused=True, **kw)
    k0, v0 = k.nan_to_num(0.0), v.nan_to_num(0.0)
    ref = anchored_attention_reference(q, k0, v0, kb, vs, return_lse=True, **kw)
    return fused, ref


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "shape",  # B, Hq, Hkv, Sq, Skv, D
    [(2, 4, 2, 37, 37, 64), (1, 2, 2, 1, 53, 32), (2, 6, 2, 7, 90, 64), (1, 3, 1, 130, 130, 16),
     (2, 2, 1, 40, 25, 32)],
)  # fmt: skip
@pytest.mark.parametrize("pad", [None, "left", "right", "random"])
@pytest.mark.parametrize("causal", [True, False])
def test_fused_forward_matches_reference(shape, dtype, pad, causal):
    if pad is not None:
        torch.manual_seed(0)
    q, k, v, kb, vs, mask = make_inputs(*shape, dtype, pad=pad)
    (out, lse), (ref, ref_lse) = _both(q, k, v, kb, vs, mask, causal)
    assert out.dtype == dtype and lse.dtype == torch.float32
    check_close(out, ref, native_error(q, k, v, kb, vs, mask, causal, ref), dtype)
    seen = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), seen), "rows with no visible key: lse must be -inf"
    assert (lse[seen].double() - ref_lse[seen]).abs().max() < 1e-4 * (1 + ref_lse.abs().max())


@pytest.mark.parametrize("Sq", [1, 6])
def test_fused_forward_cache_seqlens(Sq):
    q, k, v, kb, vs, _ = make_inputs(3, 4, 2, Sq, 48, 32, torch.float32)
    cache = torch.tensor([48, 20, Sq])
    k[1, :, 20:] = float("nan")  # slots past a sample's cache length must not be read
    v[1, :, 20:] = float("nan")
    (out, lse), (ref, ref_lse) = _both(q, k, v, kb, vs, None, True, cache)
    check_close(out, ref, 1e-6, torch.float32)
    assert torch.allclose(lse.double(), ref_lse, atol=1e-4)


def test_fused_forward_hidden_keys_and_empty_rows():
    # NaN in padded keys and values must not leak; a fully padded sample gives zeros, -inf
    q, k, v, kb, vs, _ = make_inputs(2, 2, 1, 16, 16, 32, torch.float32)
    mask = torch.ones(2, 16, dtype=torch.bool)
    mask[0, :5] = False
    mask[1] = False
    k[:, :, :5] = float("nan")
    v[:, :, :5] = float("nan")
    (out, lse), (ref, _) = _both(q, k, v, kb, vs, mask, True)
    check_close(out, ref, 1e-6, torch.float32)
    assert (out[1] == 0).all() and torch.isneginf(lse[1]).all()
    assert torch.isneginf(lse[0, :, :5]).all() and torch.isfinite(lse[0, :, 5:]).all()


def test_default_forward_is_fused_and_equals_the_chunked_form():
    q, k, v, kb, vs, mask = make_inputs(2, 4, 2, 64, 64, 32, torch.float32, pad="left")
    kw = dict(causal=True, sm_scale=0.2, key_padding_mask=mask)
    default = anchored_attention_torch(q, k, v, kb, vs, **kw)
    fused = anchored_attention_torch(q, k, v, kb, vs, fused=True, **kw)
    chunked = anchored_attention_torch(q, k, v, kb, vs, fused=False, **kw)
    assert torch.equal(default[0], fused[0])
    assert (fused[0] - chunked[0]).abs().max() < 1e-5


@settings(max_examples=25, deadline=None)
@given(
    B=st.integers(1, 3), Hkv=st.integers(1, 2), group=st.integers(1, 3),
    Sq=st.integers(1, 40), extra=st.integers(0, 40), D=st.sampled_from([8, 16, 48]),
    causal=st.booleans(), pad=st.sampled_from([None, "left", "right", "random"]),
)  # fmt: skip
def test_fused_forward_any_shape(B, Hkv, group, Sq, extra, D, causal, pad):
    q, k, v, kb, vs, mask = make_inputs(B, Hkv * group, Hkv, Sq, Sq + extra, D, torch.float32,
                                        pad=pad, seed=Sq * 7 + extra)  # fmt: skip
    (out, _), (ref, _) = _both(q, k, v, kb, vs, mask, causal)
    check_close(out, ref, native_error(q, k, v, kb, vs, mask, causal, ref), torch.float32)
