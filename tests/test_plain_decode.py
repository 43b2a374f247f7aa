"""Ungated one-token steps at batch 1 run on PyTorch's SDPA (transformers integration).

A decode step with ``decode="prefill"`` (the paper's default) or an unconfigured module has
no gates: it is plain attention, and at batch 1 SDPA has a lower per-call cost than our
kernel (measured on an H100: 0.04 ms against 0.31 ms per call at 8192 cached tokens). The
route must give SDPA's answer, never take a gated call, and leave generation unchanged.
"""

from __future__ import annotations

import pytest
import torch
from test_generation_equivalence import GEN, _build, _samples
from torch.overrides import TorchFunctionMode

import videoanchor
from videoanchor.integrations.transformers import attention as va_attention
from videoanchor.kernels import anchored_attention, prepare_gates
from videoanchor.kernels.reference import anchored_attention_reference as reference_attention


class _Causal(torch.nn.Module):
    is_causal = True


class _SdpaDecodeCalls(TorchFunctionMode):
    """Records the calls of PyTorch's SDPA with one query token per row (the route's; the
    exact torch path of our kernels never calls it, a vision tower's calls have more)."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.nn.functional.scaled_dot_product_attention and args[0].shape[-2] == 1:
            self.calls.append(tuple(args[0].shape))
        return func(*args, **(kwargs or {}))


def _qkv(b, hq, hkv, s, d=16, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, 1, d, generator=g, dtype=dtype)
    k = torch.randn(b, hkv, s, d, generator=g, dtype=dtype)
    v = torch.randn(b, hkv, s, d, generator=g, dtype=dtype)
    return q, k, v


@pytest.mark.filterwarnings("ignore:.*not part of a configured VideoAnchor model")
@pytest.mark.parametrize("hq,hkv,s", [(4, 2, 37), (3, 3, 1), (8, 1, 300)])
@pytest.mark.parametrize("padded", [False, True])
def test_batch1_plain_decode_is_sdpa_and_matches_the_reference(hq, hkv, s, padded):
    q, k, v = _qkv(1, hq, hkv, s, seed=s)
    mask = torch.ones(1, s, dtype=torch.bool)
    if padded and s > 3:
        mask[0, :3] = False  # left padding
    with _SdpaDecodeCalls() as sdpa:
        out, weights = va_attention.videoanchor_attention_forward(
            _Causal(), q, k, v, mask if padded else None, scaling=0.25
        )
    assert sdpa.calls == [(1, hq, 1, 16)] and weights is None
    assert out.shape == (1, 1, hq, 16) and out.is_contiguous()
    ref = reference_attention(q.double(), k.double(), v.double(), None, None, causal=True,
                              sm_scale=0.25, key_padding_mask=mask)  # fmt: skip
    torch.testing.assert_close(out.double(), ref.transpose(1, 2), rtol=0, atol=2e-6)
    ours = anchored_attention(q, k, v, causal=True, sm_scale=0.25, key_padding_mask=mask,
                              backend="torch")  # fmt: skip
    torch.testing.assert_close(out, ours.transpose(1, 2), rtol=0, atol=2e-6)


@pytest.mark.filterwarnings("ignore:.*not part of a configured VideoAnchor model")
def test_bf16_decode_through_sdpa():
    q, k, v = _qkv(1, 4, 2, 50, dtype=torch.bfloat16)
    out, _ = va_attention.videoanchor_attention_forward(_Causal(), q, k, v, None, scaling=0.25)
    assert out.dtype == torch.bfloat16
    ref = reference_attention(q.double(), k.double(), v.double(), None, None, causal=True,
                              sm_scale=0.25)  # fmt: skip
    torch.testing.assert_close(out.double(), ref.transpose(1, 2), rtol=0, atol=2e-2)


def test_which_calls_take_the_route():
    q1 = torch.zeros(1, 2, 1, 8)
    gates = prepare_gates(torch.zeros(1, 5), None)
    applies = va_attention._plain_decode_applies
    assert applies(q1, None, "auto", None, None)
    assert applies(q1, None, "auto", torch.ones(1, 5, dtype=torch.bool), None)
    assert not applies(q1, gates, "auto", None, None)  # gated: our kernel
    assert not applies(q1, prepare_gates(None, torch.ones(1, 5)), "auto", None, None)
    assert not applies(q1, None, "triton", None, None)  # an explicit backend is kept
    assert not applies(q1, None, "torch", None, None)
    assert not applies(torch.zeros(1, 2, 2, 8), None, "auto", None, None)  # prefill
    assert not applies(torch.zeros(2, 2, 1, 8), None, "auto", None, None)  # batch 2
    slots = torch.ones(1, 5, dtype=torch.int32)
    assert not applies(q1, None, "auto", None, slots)  # a static cache's slot mask
    assert not applies(q1, None, "auto", torch.zeros(1, 1, 1, 5), None)  # a user 4D mask


@torch.no_grad()
@pytest.mark.parametrize("family", ["qwen2_5_vl", "llava_onevision"])
def test_generate_with_decode_prefill_is_unchanged_by_the_route(family):
    """A configured tiny VLM, batch 1, decode="prefill": the decode steps take the route, and
    greedy tokens and logits equal those of a run without it (``attention_backend="torch"``:
    the route serves "auto" only; on the CPU "auto" runs that exact torch path too)."""
    model = _build(family, "videoanchor_triton")
    videoanchor.configure(model, decode="prefill", max_iter=200)
    inputs = _samples(family, padded=False)[0]
    kw = {**GEN, "max_new_tokens": 4}
    with _SdpaDecodeCalls() as sdpa:
        routed = model.generate(**{k: v.clone() for k, v in inputs.items()}, **kw)
    layers = model.config.get_text_config().num_hidden_layers
    # every layer of every decode step
    assert len(sdpa.calls) == layers * (kw["max_new_tokens"] - 1), sdpa.calls
    videoanchor.configure(model, attention_backend="torch")  # the route off
    with _SdpaDecodeCalls() as sdpa:
        kernel = model.generate(**{k: v.clone() for k, v in inputs.items()}, **kw)
    assert sdpa.calls == []
    assert torch.equal(routed.sequences, kernel.sequences)
    diff = (torch.stack(routed.logits) - torch.stack(kernel.logits)).abs().max().item()
    assert diff < 2e-5, diff


@torch.no_grad()
def test_decode_all_keeps_the_gated_kernel():
    """decode="all": the decode steps carry the prompt's gates, so they never take the route."""
    model = _build("qwen2_5_vl", "videoanchor_triton")
    videoanchor.configure(model, decode="all", max_iter=200)
    inputs = _samples("qwen2_5_vl", padded=False)[0]
    with _SdpaDecodeCalls() as sdpa:
        model.generate(**{k: v.clone() for k, v in inputs.items()}, **{**GEN, "max_new_tokens": 3})
    assert sdpa.calls == []
