"""The prefill kernel's fast form (log2(value_scale) folded into the logits with the key
bias, one gate pair per key, one launch) and the general form on extreme key biases, against the float64 reference with the
2x-PyTorch-error rule (tests/test_attention.py). Interpreter on CPU; bf16 through the
test-only shim (tests/bf16_interpreter.py)."""

import pytest
import torch
from bf16_interpreter import bf16_interpreter, unavailable_reason
from test_attention import DEVICE, check_close, make_inputs, native_error

import videoanchor
from videoanchor.kernels import launch, prepare_gates
from videoanchor.kernels.gates import fast_form, value_scale_range_of
from videoanchor.kernels.reference import anchored_attention_reference
from videoanchor.kernels.triton_prefill import fold_gates

RANGE = (1.0, 3.5)  # make_inputs' gates: value_scale = 1 + 2.5 s, s in [0, 1)


def _capture(fn):
    with launch.capture_launches() as launches:
        fn()
    return launches


@pytest.mark.parametrize(
    "dtype", [torch.float16, torch.float32, torch.bfloat16], ids=["fp16", "fp32", "bf16"]
)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_fast_form_matches_reference(dtype, causal):
    """GQA, odd lengths, a random padding mask: the fast form within 2x eager PyTorch's error."""
    # fp16 takes FOLD 2 too (RANGE is within HALF_ROWS_RANGE): its bias MMA is bf16.
    if dtype != torch.float32 and unavailable_reason() is not None:
        pytest.skip(unavailable_reason())
    ctx = bf16_interpreter() if dtype != torch.float32 else _null()
    with ctx:
        q, k, v, kb, vs, mask = make_inputs(2, 4, 2, 29, 37, 64, dtype, pad="random", seed=4)
        v_before = v.clone()
        ref = anchored_attention_reference(q, k, v, kb, vs, causal=causal, key_padding_mask=mask)
        out = videoanchor.anchored_attention(
            q, k, v, kb, vs, causal=causal, key_padding_mask=mask, backend="triton",
            value_scale_range=RANGE,
        )  # fmt: skip
        check_close(out, ref, native_error(q, k, v, kb, vs, mask, causal, ref), dtype)
        assert torch.equal(v, v_before), "the fast form wrote into V (the KV cache)"


def test_fast_form_bf16_infinite_bias():
    """bf16 (the bias through the tensor cores, FOLD 2): keys with a -inf bias take no
    weight and a row whose only visible key has one gives 0, as in the reference; no NaN."""
    if unavailable_reason() is not None:
        pytest.skip(unavailable_reason())
    with bf16_interpreter():
        q, k, v, kb, vs, _ = make_inputs(1, 2, 1, 21, 21, 32, torch.bfloat16, seed=7)
        kb[:, 0] = kb[:, 5] = kb[:, 17] = float("-inf")
        ref = anchored_attention_reference(q, k, v, kb, vs, causal=True)
        recs = _capture(lambda: videoanchor.anchored_attention(
            q, k, v, kb, vs, causal=True, backend="triton", value_scale_range=RANGE))  # fmt: skip
        assert recs[0].kwargs["FOLD"] == 2
        out = videoanchor.anchored_attention(
            q, k, v, kb, vs, causal=True, backend="triton", value_scale_range=RANGE
        )
        assert not out.isnan().any()
        assert not out[:, :, 0].any() and not ref[:, :, 0].any()  # row 0 sees key 0 only
        check_close(out, ref, native_error(q, k, v, kb, vs, None, True, ref), torch.bfloat16)


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _names(recs):
    return [r.kernel.__name__ if hasattr(r.kernel, "__name__") else str(r.kernel) for r in recs]


@pytest.mark.parametrize("prepared", [False, True], ids=["given", "prepared"])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "scale-only"])
def test_fast_form_is_one_launch(prepared, with_bias):
    """With a range the prefill kernel runs alone, its gates folded (the bias + log2(scale)
    through the bias pointer, the rows holding 1 / scale through the scale pointer, views
    of one buffer: fold_gates); without it, the general
    form (the scale multiplied into the probabilities in the loop). Both match the float64
    reference; without a key bias the lse adds a zero shift."""
    q, k, v, kb, vs, _ = make_inputs(1, 2, 1, 17, 19, 32, torch.float32)
    kb = kb if with_bias else None
    if prepared:
        gates = prepare_gates(kb, vs, value_scale_range=RANGE)
        shapes = [t.shape for t in gates.fold]
        assert shapes == [(1, 19, 16), (1, 19), (1, 19, 2)]
        call = lambda: videoanchor.anchored_attention(  # noqa: E731
            q, k, v, gates=gates, backend="triton", return_lse=True)  # fmt: skip
    else:
        call = lambda: videoanchor.anchored_attention(  # noqa: E731
            q, k, v, kb, vs, backend="triton", value_scale_range=RANGE, return_lse=True)  # fmt: skip
    fast = _capture(call)
    assert _names(fast) == ["_anchored_prefill_kernel"]
    assert fast[0].kwargs["FOLD"] == 1 and fast[0].kwargs["HAS_BIAS"] is True  # float32
    pairs = fast[0].args[3]  # float32 inputs: the row sums in float32 (FOLD 1)
    assert pairs.dtype == torch.float32 and pairs.shape == (1, 19, 2)
    bias, rcp = pairs.unbind(-1)
    assert torch.equal(rcp, vs.float().reciprocal())
    log_vs = torch.log2(vs.float())
    shifted = None if kb is None else (kb.float() - kb.float().amax(-1, keepdim=True))
    want = log_vs if kb is None else shifted * launch.LOG2E + log_vs
    assert torch.allclose(bias, want, rtol=0, atol=1e-5)
    ref, ref_lse = anchored_attention_reference(q, k, v, kb, vs, causal=True, return_lse=True)
    out, lse = call()
    check_close(out, ref, native_error(q, k, v, kb, vs, None, True, ref), torch.float32)
    assert (lse.double() - ref_lse).abs().max().item() < 1e-4
    general = _capture(lambda: videoanchor.anchored_attention(q, k, v, kb, vs, backend="triton"))
    assert _names(general) == ["_anchored_prefill_kernel"]
    assert general[0].kwargs["FOLD"] == 0 and general[0].kwargs["HAS_SCALE"] is True


def test_fold_rows_are_exact():
    """The bf16 rows of the fast form's gates (the row-sum MMA's operand): 1 / scale
    exactly as the sum of three bf16 columns over the whole fast-form range, zeros after;
    a bf16 call reads them (FOLD 2), views of the one buffer."""
    g = torch.Generator().manual_seed(3)
    vs = torch.exp2(torch.empty(3, 257).uniform_(-60, 60, generator=g))
    vs[0, :4] = torch.tensor([2.0**-60, 2.0**60, 1.0, 3.0])
    rows, bias, pairs = fold_gates(None, vs)
    assert rows.dtype == torch.bfloat16 and rows.shape == (3, 257, 16)
    assert torch.equal(rows[..., :3].double().sum(-1), vs.reciprocal().double())
    assert torch.equal(bias, torch.log2(vs)) and torch.equal(pairs[..., 0], bias)
    assert torch.equal(pairs[..., 1], vs.reciprocal())
    # Columns 3-5: the bias (here log2(scale)) exactly, as three terms; columns 6-8 fp16
    # terms (test_fold_rows_fp16); zeros after.
    assert torch.equal(rows[..., 3:6].double().sum(-1), bias.double())
    assert not rows[..., 9:].any()
    # An infinite or NaN bias: that value in the first term, zeros in the others (no NaN
    # from inf - inf reaches the logits through a zero operand).
    kb = torch.tensor([[float("-inf"), float("inf"), float("nan"), 1.0 / 3.0]])
    rows = fold_gates(kb, torch.ones(1, 4))[0].float()
    assert rows[0, :3, 3].isinf().tolist() == [True, True, False] and rows[0, 2, 3].isnan()
    assert not rows[0, :3, 4:6].any()
    assert rows[0, 3, 3:6].double().sum().item() == float(torch.tensor(1.0 / 3.0))
    q, k, v, kb, vs, _ = make_inputs(1, 2, 1, 17, 19, 32, torch.bfloat16)
    recs = _capture(lambda: videoanchor.anchored_attention(
        q, k, v, kb, vs, backend="triton", value_scale_range=RANGE))  # fmt: skip
    assert recs[0].kwargs["FOLD"] == 2
    bias, rows = recs[0].args[3:5]
    assert rows.dtype == torch.bfloat16 and rows.shape == (1, 19, 16)
    assert bias.dtype == torch.float32 and bias.shape == (1, 19)
    assert rows.untyped_storage().data_ptr() == bias.untyped_storage().data_ptr()
    # With the lse the row sums stay in float32 (the MMA's sum of bf16 p is not the lse's).
    recs = _capture(lambda: videoanchor.anchored_attention(
        q, k, v, kb, vs, backend="triton", value_scale_range=RANGE, return_lse=True))  # fmt: skip
    assert recs[0].kwargs["FOLD"] == 1 and recs[0].args[3].shape == (1, 19, 2)


def test_fold_rows_fp16():
    """Columns 6-8 of the rows, read as fp16 (fp16's row-sum MMA): 2^14 / scale exactly as
    the sum of three fp16 terms over HALF_ROWS_RANGE and down to a scale of 0.2502 (the
    first term's largest finite value); past 2^15 within 2^-25 absolute; never infinite."""
    from videoanchor.kernels.triton_prefill import HALF_ROWS_RANGE, HALF_ROWS_SCALE, half_rows

    g = torch.Generator().manual_seed(6)
    vs = torch.exp2(torch.empty(2, 301).uniform_(-1, 15, generator=g))
    vs[0, :5] = torch.tensor([0.5, 2.0**15, 1.0, 3.0, 0.2502])
    vs[1, :3] = torch.tensor([2.0**20, 2.0**40, 0.1])
    rows = fold_gates(None, vs)[0]
    halves = rows.view(torch.float16)[..., 6:9].double()
    want = (HALF_ROWS_SCALE * vs.reciprocal()).double()
    exact = (vs >= 0.2502) & (vs <= 2.0**15)
    assert torch.equal(halves.sum(-1)[exact], want[exact])
    assert (halves.sum(-1) - want)[1, :2].abs().max().item() <= 2.0**-25
    assert halves.isfinite().all() and halves[1, 2].sum().item() == 65504.0  # clamped
    assert half_rows(RANGE) and half_rows(HALF_ROWS_RANGE) and not half_rows(None)
    assert not half_rows((0.4, 2.0)) and not half_rows((1.0, 2.0**16))


@pytest.mark.parametrize("prepared", [False, True], ids=["given", "prepared"])
def test_fast_form_fp16_sums_rows_on_tensor_cores(prepared):
    """fp16 with a range within HALF_ROWS_RANGE and no lse: the row sums on the tensor cores
    (FOLD 2, the rows' fp16 columns), -inf biases taking no weight, within 2x eager
    PyTorch's error; a wider range or the lse keep the float32 row sum (FOLD 1)."""
    if unavailable_reason() is not None:
        pytest.skip(unavailable_reason())
    with bf16_interpreter():  # the bias MMA is bf16 whatever the inputs
        q, k, v, kb, vs, mask = make_inputs(2, 4, 2, 23, 31, 32, torch.float16, pad="random",
                                            seed=11)  # fmt: skip
        kb[0, 3] = kb[1, 0] = float("-inf")

        def call(rng=RANGE, **kw):
            if prepared:
                gates = prepare_gates(kb, vs, value_scale_range=rng)
                return lambda: videoanchor.anchored_attention(
                    q, k, v, gates=gates, key_padding_mask=mask, backend="triton", **kw
                )
            return lambda: videoanchor.anchored_attention(
                q, k, v, kb, vs, key_padding_mask=mask, backend="triton",
                value_scale_range=rng, **kw)  # fmt: skip

        assert _capture(call())[0].kwargs["FOLD"] == 2
        assert _capture(call((0.25, 3.5)))[0].kwargs["FOLD"] == 1
        assert _capture(call(return_lse=True))[0].kwargs["FOLD"] == 1
        ref = anchored_attention_reference(q, k, v, kb, vs, causal=True, key_padding_mask=mask)
        out = call()()
        assert not out.isnan().any()
        check_close(out, ref, native_error(q, k, v, kb, vs, mask, True, ref), torch.float16)
        wide = call((0.25, 3.5))()
        check_close(wide, ref, native_error(q, k, v, kb, vs, mask, True, ref), torch.float16)


def test_fast_form_rules():
    assert fast_form(None) is False
    assert fast_form((1.0, 3.5)) is True
    assert fast_form((0.25, 0.3)) is True
    assert fast_form((1.0, 1e3)) is True
    assert fast_form((2.0**-60, 2.0**60)) is True
    # Outside the bounds the unscaled probabilities or the row sums could leave float32.
    assert fast_form((2.0**-61, 1.0)) is False and fast_form((1.0, 2.0**61)) is False
    for bad in [(0.0, 1.0), (2.0, 1.0), (1.0, float("inf")), (1.0,), "x", (-1.0, 2.0)]:
        with pytest.raises(ValueError, match="value_scale_range"):
            fast_form(bad)
    vs = torch.tensor([[1.5, 2.0], [3.0, 1.25]])
    assert value_scale_range_of(vs) == (1.0, 3.0)
    assert value_scale_range_of(torch.tensor([[0.5, 0.75]])) == (0.5, 1.0)


def test_fast_form_range_promise_broken_is_still_exact():
    """The range only picks the form: positive value scales past it (here 40x past) are
    still exact (the bounds only keep the row sums inside float32)."""
    q, k, v, kb, _, _ = make_inputs(1, 2, 2, 13, 21, 16, torch.float32, seed=2)
    vs = torch.linspace(0.5, 140.0, 21)[None].to(DEVICE)
    ref = anchored_attention_reference(q, k, v, kb, vs, causal=True)
    out = videoanchor.anchored_attention(q, k, v, kb, vs, backend="triton",
                                         value_scale_range=(1.0, 3.5))  # fmt: skip
    check_close(out, ref, native_error(q, k, v, kb, vs, None, True, ref), torch.float32)


def test_fast_form_varlen_and_gradients_match_general():
    """Packed sequences take the fast form too; gradients (the backward kernels read the
    original V and value scale) equal those of the general form."""
    g = torch.Generator().manual_seed(5)
    Hq, Hkv, D = 4, 2, 32
    cu_q = torch.tensor([0, 7, 7, 20], dtype=torch.int32)
    cu_k = torch.tensor([0, 9, 12, 25], dtype=torch.int32)
    q = torch.randn(20, Hq, D, generator=g, requires_grad=True)
    k = torch.randn(25, Hkv, D, generator=g, requires_grad=True)
    v = torch.randn(25, Hkv, D, generator=g, requires_grad=True)
    s = torch.rand(25, generator=g)
    kb, vs = torch.log1p(9.5 * s), (1 + 2.5 * s).requires_grad_()
    outs, grads = [], []
    for rng in (None, RANGE):
        out = videoanchor.anchored_attention_varlen(
            q, k, v, cu_q, cu_k, 13, 13, kb, vs, backend="triton", value_scale_range=rng
        )
        outs.append(out.detach())
        grads.append(torch.autograd.grad(out.square().sum(), (q, k, v, vs)))
    torch.testing.assert_close(outs[1], outs[0], atol=2e-5, rtol=1e-5)
    for a, b in zip(grads[0], grads[1], strict=True):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)


def test_decode_path_ignores_range():
    """The split-KV path (Sq <= 64 against >= 256 keys) keeps the in-loop scale."""
    q, k, v, kb, vs, _ = make_inputs(1, 4, 2, 1, 300, 16, torch.float32, seed=3)
    recs = _capture(lambda: videoanchor.anchored_attention(
        q, k, v, kb, vs, backend="triton", value_scale_range=RANGE))  # fmt: skip
    assert [r.kernel.__name__ for r in recs] == [
        "_anchored_decode_split_kernel", "_anchored_decode_merge_kernel"]  # fmt: skip
    assert recs[0].kwargs["HAS_SCALE"] is True
    ref = anchored_attention_reference(q, k, v, kb, vs, causal=True)
    out = videoanchor.anchored_attention(q, k, v, kb, vs, backend="triton",
                                         value_scale_range=RANGE)  # fmt: skip
    check_close(out, ref, native_error(q, k, v, kb, vs, None, True, ref), torch.float32)


# ---- extreme key biases: the general API stays exact ------------------------------------

EXTREME = {
    # a mask written as a bias: -1e4 on some keys (row maxima come from the others)
    "minus-1e4-mask": lambda s: torch.where(s > 0.6, -1e4, torch.log1p(9.5 * s)),
    # every key of the rows hidden by -1e4: the softmax over them is exact (the bias cancels)
    "minus-1e4-all": lambda s: torch.full_like(s, -1e4),
    "plus-200": lambda s: torch.where(s > 0.5, 200.0, 0.0),
    "plus-200-all": lambda s: torch.full_like(s, 200.0) + s,
    "wide-mixed": lambda s: (s - 0.5) * 2e3,
    "tiny": lambda s: s * 1e-30,
}


@pytest.mark.parametrize("fast", [False, True], ids=["general", "fast"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
@pytest.mark.parametrize("bias", list(EXTREME))
def test_extreme_key_bias_is_exact(bias, dtype, fast):
    """Key biases far outside VideoAnchor's [0, log(1 + alpha_K)]: no overflow, no NaN, and
    within 2x eager PyTorch's error of the float64 reference (the bias enters before the
    running max in both forms, so its magnitude needs no bound)."""
    q, k, v, _, vs, _ = make_inputs(2, 2, 1, 19, 23, 32, dtype, seed=7)
    s = torch.rand(2, 23, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    kb = EXTREME[bias](s).float()
    ref, ref_lse = anchored_attention_reference(q, k, v, kb, vs, causal=True, return_lse=True)
    out, lse = videoanchor.anchored_attention(
        q, k, v, kb, vs, backend="triton", return_lse=True,
        value_scale_range=RANGE if fast else None,
    )  # fmt: skip
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    check_close(out, ref, native_error(q, k, v, kb, vs, None, True, ref), dtype)
    # lse carries the bias: relative precision of float32 at its magnitude.
    tol = 1e-6 * ref_lse.abs().max().item() + 1e-4
    assert (lse.double() - ref_lse).abs().max().item() <= tol
    torch_out = videoanchor.anchored_attention(q, k, v, kb, vs, backend="torch")
    assert torch.isfinite(torch_out).all()


def test_extreme_value_scale_general_form():
    """Value scales of any magnitude (1e-30 .. 1e30) without a range: the general form keeps
    them in float32 on the probabilities; no overflow in fp32."""
    q, k, v, kb, _, _ = make_inputs(1, 2, 1, 11, 17, 16, torch.float32, seed=9)
    vs = torch.logspace(-30, 30, 17, dtype=torch.float32)[None].to(DEVICE)
    ref = anchored_attention_reference(q, k, v, kb, vs, causal=True)
    out = videoanchor.anchored_attention(q, k, v, kb, vs, backend="triton")
    assert torch.isfinite(out).all()
    # Each row is dominated by its largest visible scale: float32's relative error per row.
    row_err = (out.double() - ref).abs().amax(-1) / ref.abs().amax(-1)
    assert row_err.max().item() < 1e-5
    assert fast_form((1e-30, 1e30)) is False


@torch.no_grad()
def test_vlm_path_takes_the_fast_form(tmp_path, monkeypatch):
    """The transformers integration hands the request's value-scale range to the kernel:
    every anchored prefill layer runs the fast form from the prepared gate pairs (one
    launch each), and the logits equal the exact torch path's."""
    from videoanchor.integrations.transformers.testing import load_saved, tiny_model, tiny_sample
    from videoanchor.kernels import triton_prefill

    calls = []
    real = triton_prefill.launch_prefill

    def counting(*args, **kw):
        if args[4] is not None:  # anchored (a value scale)
            calls.append(kw.get("prepared_fold") is not None or kw.get("fast", False))
        return real(*args, **kw)

    monkeypatch.setattr(triton_prefill, "launch_prefill", counting)
    tiny_model("qwen2_5_vl", seed=4, hidden=64, layers=2).save_pretrained(tmp_path)
    model = load_saved(tmp_path)
    inputs = tiny_sample(model.config, [2], text=3, seed=5)
    ssc = {"n_clusters": 3, "max_iter": 300}
    videoanchor.configure(model, enabled=True, attention_backend="torch", **ssc)
    ref = model(**inputs).logits
    assert not calls
    videoanchor.configure(model, attention_backend="triton")
    out = model(**inputs).logits
    assert calls == [True, True]  # one per decoder layer, each in the fast form
    assert (out - ref).abs().max().item() < 1e-4


@pytest.mark.parametrize("varlen", [False, True], ids=["dense", "varlen"])
def test_backward_fast_form_with_fixed_gates(varlen):
    """Gates without gradients (the VLM case) in the fast form: the backward kernels (one
    form: the dK/dV kernel scales its fixed V tile once in registers) give gradients of q,
    k, v and key_bias equal to the general form's and the float64 reference's."""
    g = torch.Generator().manual_seed(8)
    if varlen:
        cu = torch.tensor([0, 6, 17], dtype=torch.int32)
        q, k, v = (torch.randn(17, h, 16, generator=g, requires_grad=True) for h in (4, 2, 2))
        s = torch.rand(17, generator=g)
    else:
        q = torch.randn(2, 4, 9, 16, generator=g, requires_grad=True)
        k, v = (torch.randn(2, 2, 11, 16, generator=g, requires_grad=True) for _ in range(2))
        s = torch.rand(2, 11, generator=g)
    kb = torch.log1p(9.5 * s).requires_grad_()
    vs = 1 + 2.5 * s  # no gradient: the fast backward applies
    inputs = (q, k, v, kb)
    grads = []
    for rng in (None, RANGE):
        if varlen:
            out = videoanchor.anchored_attention_varlen(
                q, k, v, cu, cu, 11, 11, kb, vs, backend="triton", value_scale_range=rng
            )
        else:
            out = videoanchor.anchored_attention(q, k, v, kb, vs, backend="triton",
                                                 value_scale_range=rng)  # fmt: skip
        grads.append(torch.autograd.grad(out.sin().sum(), inputs))
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(b, a, atol=2e-5, rtol=1e-5)
    if not varlen:
        ref = anchored_attention_reference(*(t.double() for t in inputs), vs.double())
        gref = torch.autograd.grad(ref.sin().sum(), inputs)
        for a, b in zip(gref, grads[1], strict=True):
            torch.testing.assert_close(b.double(), a.double(), atol=1e-4, rtol=1e-4)


def test_fast_form_wide_positive_scales():
    """The fast form over value scales spanning 2^-50 .. 2^50 (inside FAST_FORM_BOUNDS):
    the running maximum is the scaled logits', so nothing overflows; float32's relative
    error per row."""
    q, k, v, kb, _, _ = make_inputs(1, 2, 1, 11, 17, 16, torch.float32, seed=9)
    vs = torch.logspace(-50, 50, 17, base=2.0, dtype=torch.float32)[None].to(DEVICE)
    ref = anchored_attention_reference(q, k, v, kb, vs, causal=True)
    recs = _capture(lambda: videoanchor.anchored_attention(
        q, k, v, kb, vs, backend="triton", value_scale_range=(2.0**-50, 2.0**50)))  # fmt: skip
    assert recs[0].kwargs["FOLD"] == 1
    out = videoanchor.anchored_attention(q, k, v, kb, vs, backend="triton",
                                         value_scale_range=(2.0**-50, 2.0**50))  # fmt: skip
    assert torch.isfinite(out).all()
    row_err = (out.double() - ref).abs().amax(-1) / ref.abs().amax(-1)
    assert row_err.max().item() < 1e-5
