"""The prefill kernel's Hopper loop (``TMA``: K, V and the bf16 gate rows by tensor
descriptors; selected on compute capability 9.x by ``hopper_loop``) under the CPU
interpreter, forced by launching for sm_90 at tiny tiles: the same tile arithmetic as the
pointer loop, against the float64 reference with the 2x-PyTorch-error rule. The interpreter
runs a descriptor load as a masked load (zeros past the tensor's bounds), so what it does
not cover is the hardware's: the TMA copies, their barriers and the pipelining."""

import math

import pytest
import torch
from bf16_interpreter import bf16_interpreter, unavailable_reason
from test_attention import check_close, make_inputs, native_error
from triton.tools.tensor_descriptor import TensorDescriptor

import videoanchor
from videoanchor.kernels import launch
from videoanchor.kernels.reference import anchored_attention_reference
from videoanchor.kernels.triton_prefill import launch_prefill

#: make_inputs' value scales (1 + 2.5 s): within HALF_ROWS_RANGE, so fp16's fast form
#: sums its rows on the tensor cores (FOLD 2) as bf16's does.
RANGE = (1.0, 3.5)


def _run(q, k, v, kb, vs, mask, causal, fast, capability, lse=False):
    B, Hq, Sq, D = q.shape
    # The public layout, (B, S, H, D) storage seen as (B, H, S, D), poisoned.
    out = torch.full((B, Sq, Hq, D), float("nan"), dtype=q.dtype).transpose(1, 2)
    lse_t = torch.full((B, Hq, Sq), float("nan")) if lse else None
    kw = dict(causal=causal, sm_scale=1 / math.sqrt(D), interpret=True, capability=capability,
              value_scale_range=RANGE if fast else None)  # fmt: skip
    with launch.capture_launches() as recs:
        launch_prefill(q, k, v, kb, vs, mask, out, lse_t, fast=fast, **kw)
    launch_prefill(q, k, v, kb, vs, mask, out, lse_t, fast=fast, **kw)
    return out, lse_t, recs[0]


def _bshd(t):
    """The same values stored (B, S, H, D), seen as (B, H, S, D) (the cache layout)."""
    return t.transpose(1, 2).contiguous().transpose(1, 2)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("form", ["plain", "fast", "general", "fast_lse"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_hopper_loop_matches_reference(dtype, form, causal):
    """GQA, odd lengths (a partial last key tile past Skv: the descriptor's zeros), Sq < Skv
    (bottom-right causal alignment), K and V in the cache's (B, S, H, D) layout."""
    # fp16's fast form (FOLD 2) adds the bias by a bf16 MMA too: the shim for both.
    if unavailable_reason() is not None:
        pytest.skip(unavailable_reason())
    with bf16_interpreter():
        gates = form != "plain"
        q, k, v, kb, vs, _ = make_inputs(
            2, 4, 2, 21, 45, 32, dtype, bias=gates, scale=gates, seed=11
        )
        k, v = _bshd(k), _bshd(v)
        lse = form == "fast_lse"
        out, got_lse, rec = _run(q, k, v, kb, vs, None, causal, form != "general", (9, 0), lse)
        assert rec.kwargs["TMA"] is True
        assert isinstance(rec.args[1], TensorDescriptor) and isinstance(
            rec.args[2], TensorDescriptor
        )
        if form == "fast":
            assert rec.kwargs["FOLD"] == 2
        ref = anchored_attention_reference(q, k, v, kb, vs, causal=causal, return_lse=lse)
        if lse:
            ref, ref_lse = ref
            assert (got_lse.double() - ref_lse).abs().max().item() < 1e-2
        check_close(out, ref, native_error(q, k, v, kb, vs, None, causal, ref), dtype)
        # The pointer loop (sm_80) on the same inputs: the same arithmetic, up to the order
        # of NumPy's float32 sums for a transposed K tile (an output ulp, rarely).
        out80, _, rec80 = _run(q, k, v, kb, vs, None, causal, form != "general", (8, 0), lse)
        assert rec80.kwargs["TMA"] is False
        ulp = torch.finfo(dtype).eps
        torch.testing.assert_close(out, out80, atol=ulp, rtol=ulp)


def test_hopper_loop_selection():
    """sm_90 only, 16-bit, dense keys every slot of which may be read, TMA's alignment."""
    q, k, v, kb, vs, mask = make_inputs(1, 2, 1, 9, 19, 32, torch.float16, pad="random")

    def tma(**over):
        args = dict(q=q, k=k, v=v, mask=None, capability=(9, 0)) | over
        _, _, rec = _run(args["q"], args["k"], args["v"], kb, vs, args["mask"], True, True,
                         args["capability"])  # fmt: skip
        return rec.kwargs["TMA"]

    assert tma()
    assert not tma(capability=(8, 0)) and not tma(capability=(10, 0))
    assert not tma(mask=mask)
    assert not tma(q=q.float(), k=k.float(), v=v.float())
    # D of 24 (not a power of two: BLOCK_D 32); key rows 72 bytes apart (TMA: 16-byte).
    q24, k24, v24 = (t[..., :24].contiguous() for t in (q, k, v))
    assert not tma(q=q24, k=k24, v=v24)
    k36 = torch.zeros(1, 1, 19, 36, dtype=k.dtype)
    k36[..., :32] = k
    assert not tma(k=k36[..., :32])


def test_hopper_loop_tiles_at_d128():
    """sm_90, D 128 (captured, not run): 128 x 128 tiles in two stages for plain and the
    16-bit fast form (fp16: with a range within HALF_ROWS_RANGE); 128 x 64 in three for the
    float32 row sum (fp16 without such a range, or the lse) and the general form, which
    spilled at 128 x 128 (ptxas, tests/test_compile_targets.py)."""

    def tiles(dtype, gates=True, fast=True, lse=False, rng=None):
        q, k, v, kb, vs, _ = make_inputs(1, 2, 1, 8, 8, 128, dtype, bias=gates, scale=gates)
        out = torch.empty_like(q)
        lse_t = torch.empty(1, 2, 8) if lse else None
        with launch.capture_launches() as recs:
            launch_prefill(q, k, v, kb, vs, None, out, lse_t, causal=True, sm_scale=0.1,
                           interpret=False, capability=(9, 0), fast=fast,
                           value_scale_range=rng)  # fmt: skip
        kw = recs[0].kwargs
        assert kw["TMA"] is True
        return kw["BLOCK_M"], kw["BLOCK_N"], kw["num_stages"]

    assert tiles(torch.bfloat16, gates=False) == (128, 128, 2)
    assert tiles(torch.bfloat16) == (128, 128, 2)
    assert tiles(torch.float16) == (128, 64, 3)
    assert tiles(torch.float16, rng=RANGE) == (128, 128, 2)
    assert tiles(torch.float16, rng=RANGE, lse=True) == (128, 64, 3)
    assert tiles(torch.bfloat16, lse=True) == (128, 64, 3)
    assert tiles(torch.bfloat16, fast=False) == (128, 64, 3)


def test_wide_heads_on_sm8x_sum_rows_in_float32():
    """bf16 at D 256 on sm_8x takes the float32 row sum (FOLD 1): the tensor-core row sum
    and bias (FOLD 2) spilled there (ptxas, compile_sm80.json); sm_90 keeps FOLD 2."""
    q, k, v, kb, vs, _ = make_inputs(1, 2, 1, 8, 8, 256, torch.bfloat16)
    folds = {}
    for cc in ((8, 0), (8, 6), (9, 0)):
        with launch.capture_launches() as recs:
            launch_prefill(q, k, v, kb, vs, None, torch.empty_like(q), None, causal=True,
                           sm_scale=0.1, interpret=False, capability=cc, fast=True)  # fmt: skip
        folds[cc] = recs[0].kwargs["FOLD"]
    assert folds == {(8, 0): 1, (8, 6): 1, (9, 0): 2}


# ---- GPU only ----------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("form", ["plain", "fast", "general", "fast_lse"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("shape", [(1, 28, 4, 1000, 2049, 128), (2, 8, 2, 333, 333, 64)], ids=str)
def test_gpu_hopper_loop_matches_reference(dtype, form, causal, shape):
    """On the hardware (sm_9x): the Hopper loop, which the prefill takes by default there for
    dense 16-bit keys, against the float64 reference (the 2x-PyTorch-error rule), NaN-poisoned
    outputs, odd lengths (a partial last key tile), Sq < Skv, K and V in the cache's layout;
    and the public call without a mask, which selects it."""
    cap = torch.cuda.get_device_capability()
    if cap[0] != 9:
        pytest.skip(f"the Hopper loop runs on compute capability 9.x only, got {cap}")
    B, Hq, Hkv, Sq, Skv, D = shape
    gates = form != "plain"
    q, k, v, kb, vs, _ = make_inputs(B, Hq, Hkv, Sq, Skv, D, dtype, bias=gates, scale=gates,
                                     seed=5)  # fmt: skip
    k, v = _bshd(k), _bshd(v)
    lse = form == "fast_lse"
    out = torch.full((B, Sq, Hq, D), float("nan"), dtype=dtype, device="cuda").transpose(1, 2)
    lse_t = torch.full((B, Hq, Sq), float("nan"), device="cuda") if lse else None
    kw = dict(
        causal=causal,
        sm_scale=1 / math.sqrt(D),
        interpret=False,
        capability=cap,
        fast=form != "general",
        value_scale_range=RANGE if form != "general" else None,
    )
    with launch.capture_launches() as recs:
        launch_prefill(q, k, v, kb, vs, None, out, lse_t, **kw)
    assert recs[0].kwargs["TMA"] is True
    assert recs[0].kwargs["FOLD"] == {"fast": 2, "fast_lse": 1}.get(form, 0)  # fp16 too
    launch_prefill(q, k, v, kb, vs, None, out, lse_t, **kw)
    ref = anchored_attention_reference(q, k, v, kb, vs, causal=causal, return_lse=lse)
    if lse:
        ref, ref_lse = ref
        assert (lse_t.double() - ref_lse).abs().max().item() < 1e-2
    base = native_error(q, k, v, kb, vs, None, causal, ref)
    check_close(out, ref, base, dtype)
    if form in ("plain", "fast"):  # the public call (its default form) takes the same loop
        with launch.capture_launches() as recs:
            videoanchor.anchored_attention(q, k, v, kb, vs, causal=causal)
        assert any(r.kwargs.get("TMA") is True for r in recs)
        got = videoanchor.anchored_attention(q, k, v, kb, vs, causal=causal)
        check_close(got, ref, base, dtype)
