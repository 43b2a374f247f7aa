"""Differentiable torch path and the general attn_mask: gradcheck in float64, gradients
against autograd of the float64 reference (2x-PyTorch-error rule in fp32/fp16), and
SDPA-style bool/additive masks with the gates still applied."""

import contextlib
import math
import warnings

import pytest
import torch
from torch.utils.checkpoint import checkpoint

import videoanchor
from videoanchor.kernels import reset_warnings
from videoanchor.kernels.reference import anchored_attention_reference
from videoanchor.kernels.torch_attention import anchored_attention_torch

GRAD_FLOOR = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def make(B, Hq, Hkv, Sq, Skv, D, dtype, *, seed=0, grad=True):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, Sq, D, generator=g).to(dtype)
    k = torch.randn(B, Hkv, Skv, D, generator=g).to(dtype)
    v = torch.randn(B, Hkv, Skv, D, generator=g).to(dtype)
    s = torch.rand(B, Skv, generator=g)
    kb = torch.log1p(9.5 * s).to(dtype if dtype == torch.float64 else torch.float32)
    vs = (1 + 2.5 * s).to(kb.dtype)
    return [t.requires_grad_(grad) for t in (q, k, v, kb, vs)]


# (B, Hq, Hkv, Sq, Skv, D), keyword arguments; no case has a row without keys so that
# lse (an output too) stays finite for gradcheck's finite differences.
GRADCHECK_CASES = {
    "gqa-causal-Sq5-Skv7": ((2, 4, 2, 5, 7, 3), dict(causal=True)),
    "mha-full-Sq6-Skv3": ((1, 2, 2, 6, 3, 5), dict(causal=False)),
    "mqa-causal-square": ((1, 3, 1, 4, 4, 2), dict(causal=True)),
    "padding-full": ((2, 2, 1, 3, 5, 3), dict(causal=False, pad=True)),
    "cache-seqlens": ((2, 2, 1, 3, 6, 3), dict(causal=True, cache_seqlens=[6, 4])),
    "float-mask": ((2, 4, 2, 3, 5, 3), dict(causal=True, attn_mask="float")),
    "bool-mask": ((2, 2, 1, 4, 5, 3), dict(causal=False, attn_mask="bool")),
}


def case_kwargs(shape, opts, dtype=torch.float64, seed=1):
    B, Hq, Hkv, Sq, Skv, D = shape
    g = torch.Generator().manual_seed(seed)
    kw = dict(causal=opts["causal"], key_padding_mask=None)
    if opts.get("pad"):
        pad = torch.rand(B, Skv, generator=g) > 0.4
        pad[:, 0] = True  # every row keeps a key
        kw["key_padding_mask"] = pad
    if "cache_seqlens" in opts:
        kw["cache_seqlens"] = torch.tensor(opts["cache_seqlens"], dtype=torch.int32)
    if opts.get("attn_mask") == "float":
        # (B, 1, Sq, Skv): broadcast over heads; a gradient flows into it.
        kw["attn_mask"] = torch.randn(B, 1, Sq, Skv, generator=g, dtype=dtype).requires_grad_()
    elif opts.get("attn_mask") == "bool":
        m = torch.rand(Hq, Sq, Skv, generator=g) > 0.4
        m[..., 0] = True
        kw["attn_mask"] = m
    return kw


@pytest.mark.parametrize("case", list(GRADCHECK_CASES))
def test_torch_path_gradcheck(case):
    shape, opts = GRADCHECK_CASES[case]
    inputs = make(*shape, torch.float64)
    kw = case_kwargs(shape, opts)
    mask = kw.pop("attn_mask", None)
    extra = (mask,) if mask is not None and mask.requires_grad else ()

    def fn(q, k, v, kb, vs, *m):
        return anchored_attention_torch(
            q, k, v, kb, vs, sm_scale=0.4, chunk_budget_bytes=1,
            attn_mask=m[0] if m else mask, **kw,
        )  # fmt: skip

    # fast_mode compares u^T J v for random u, v: any wrong Jacobian entry shows.
    assert torch.autograd.gradcheck(fn, (*inputs, *extra), fast_mode=True)


def reference_grads(inputs, go, kw, dtype=torch.float64):
    """Gradients of sum(out * go) through autograd of the float64 reference."""
    leaves = [t.detach().double().requires_grad_() for t in inputs]
    out = anchored_attention_reference(*leaves, **kw)
    return torch.autograd.grad(out, leaves, go.double())


def native_grads(inputs, go, kw, dtype):
    """Gradients of eager PyTorch attention computed in the input dtype (the baseline)."""
    q, k, v, kb, vs = [t.detach().to(dtype).requires_grad_() for t in inputs]
    B, Hq, Sq, D = q.shape
    Hkv, Skv = k.shape[1], k.shape[2]
    kk = k.repeat_interleave(Hq // Hkv, 1)
    vv = v.repeat_interleave(Hq // Hkv, 1) * vs[:, None, :, None]
    logits = (q @ kk.transpose(-1, -2)) / math.sqrt(D) + kb[:, None, None, :]
    hidden = torch.zeros(B, 1, Sq, Skv, dtype=torch.bool)
    if kw.get("causal"):
        hidden |= torch.ones(Sq, Skv, dtype=torch.bool).triu(Skv - Sq + 1)
    if kw.get("key_padding_mask") is not None:
        hidden |= ~kw["key_padding_mask"][:, None, None, :]
    p = torch.softmax(logits.masked_fill(hidden, float("-inf")), dim=-1)
    out = p @ vv
    return torch.autograd.grad(out, (q, k, v, kb, vs), go.to(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_torch_path_grads_within_twice_pytorch_error(dtype, causal):
    """B2 Hq6 Hkv2 Sq13 Skv17 D24, padding, strong gates: each gradient's max error vs
    the float64 reference is at most 2x that of eager PyTorch attention in the same dtype."""
    inputs = make(2, 6, 2, 13, 17, 24, dtype)
    pad = torch.ones(2, 17, dtype=torch.bool)
    pad[1, :4] = False
    kw = dict(causal=causal, key_padding_mask=pad)
    go = torch.randn(2, 6, 13, 24, generator=torch.Generator().manual_seed(3))
    ref = reference_grads(inputs, go, kw)
    base = native_grads(inputs, go, kw, dtype)
    out = videoanchor.anchored_attention(*inputs, backend="torch", **kw)
    got = torch.autograd.grad(out, inputs, go.to(dtype))
    names = ("q", "k", "v", "key_bias", "value_scale")
    for name, inp, g, r, b in zip(names, inputs, got, ref, base, strict=True):
        assert g.dtype == inp.dtype, name
        assert torch.isfinite(g).all(), name
        err = (g.double() - r).abs().max().item()
        base_err = (b.double() - r).abs().max().item()
        tol = max(2 * base_err, GRAD_FLOOR[dtype] * max(1.0, r.abs().max().item()))
        assert err <= tol, f"d{name}: error {err:.3g} > tol {tol:.3g} (eager {base_err:.3g})"


def test_grads_with_empty_rows_are_finite_and_exact():
    """Causal Sq > Skv and a fully padded sample: rows with no key return 0 and pass no
    gradient; everything matches the float64 reference's autograd, with no NaN."""
    inputs = make(2, 2, 1, 7, 4, 8, torch.float64)
    pad = torch.ones(2, 4, dtype=torch.bool)
    pad[1] = False
    kw = dict(causal=True, key_padding_mask=pad)
    go = torch.randn(2, 2, 7, 8, dtype=torch.float64)
    out, lse = videoanchor.anchored_attention(*[t.float() for t in inputs], backend="torch",
                                               return_lse=True, **kw)  # fmt: skip
    assert torch.isneginf(lse[1]).all() and torch.isneginf(lse[0, :, :3]).all()
    out = anchored_attention_torch(*inputs, sm_scale=1 / math.sqrt(8), chunk_budget_bytes=1,
                                   **kw)[0]  # fmt: skip
    got = torch.autograd.grad(out, inputs, go)
    for g, r in zip(got, reference_grads(inputs, go, kw), strict=True):
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g, r, atol=1e-12, rtol=1e-10)
    assert torch.equal(got[0][1], torch.zeros_like(got[0][1]))


@pytest.mark.parametrize("use_reentrant", [False, True], ids=["nonreentrant", "reentrant"])
def test_backward_under_checkpoint_matches_plain(use_reentrant):
    """The bug of issue 13: in-place logits gave 'modified by an inplace operation' or,
    under checkpointing, NaN gradients. Both must give the same finite gradients."""
    inputs = make(1, 4, 2, 9, 9, 16, torch.float32)
    proj = torch.nn.Linear(16, 16)

    def layer(q, k, v, kb, vs):
        out = videoanchor.anchored_attention(proj(q), k, v, kb, vs, backend="torch")
        return out.square().sum()

    leaves = [*inputs, proj.weight]

    def grads(loss):
        for t in leaves:
            t.grad = None
        loss.backward()  # reentrant checkpointing does not support autograd.grad
        return [t.grad.clone() for t in leaves]

    plain = grads(layer(*inputs))
    ckpt = grads(checkpoint(layer, *inputs, use_reentrant=use_reentrant))
    for a, b in zip(plain, ckpt, strict=True):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


def test_no_grad_path_unchanged():
    """Without grad the fast path runs (the fused CPU kernel) and agrees with the autograd
    path (the query chunks) to float32 rounding, in the same memory layout."""
    inputs = make(2, 4, 2, 11, 13, 16, torch.float32)
    with_grad = videoanchor.anchored_attention(*inputs, backend="torch")
    assert with_grad.grad_fn is not None
    with torch.no_grad():
        without = videoanchor.anchored_attention(*inputs, backend="torch")
    assert without.grad_fn is None
    torch.testing.assert_close(with_grad.detach(), without, atol=2e-6, rtol=1e-5)
    assert with_grad.transpose(1, 2).is_contiguous() and without.transpose(1, 2).is_contiguous()


# ---- attn_mask ----------------------------------------------------------------------


MASK_SHAPES = {
    "B1SqSkv": lambda B, H, Sq, Skv: (B, 1, Sq, Skv),
    "BHSqSkv": lambda B, H, Sq, Skv: (B, H, Sq, Skv),
    "SqSkv": lambda B, H, Sq, Skv: (Sq, Skv),
    "B11Skv": lambda B, H, Sq, Skv: (B, 1, 1, Skv),
    "HSq1": lambda B, H, Sq, Skv: (H, Sq, 1),
}


@pytest.mark.parametrize("kind", ["bool", "float", "float-inf"])
@pytest.mark.parametrize("mshape", list(MASK_SHAPES))
def test_attn_mask_matches_reference(mshape, kind):
    B, Hq, Hkv, Sq, Skv, D = 2, 4, 2, 7, 11, 16
    q, k, v, kb, vs = make(B, Hq, Hkv, Sq, Skv, D, torch.float32, grad=False)
    g = torch.Generator().manual_seed(5)
    shape = MASK_SHAPES[mshape](B, Hq, Sq, Skv)
    keep = torch.rand(shape, generator=g) > 0.35
    if kind == "bool":
        mask = keep
    elif kind == "float":
        mask = torch.randn(shape, generator=g)
    else:
        mask = torch.where(keep, torch.randn(shape, generator=g), float("-inf"))
    kw = dict(causal=True, attn_mask=mask)
    ref = anchored_attention_reference(q, k, v, kb, vs, **kw)
    out = videoanchor.anchored_attention(q, k, v, kb, vs, backend="torch", **kw)
    assert not out.isnan().any()
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=0)
    # The mask matters (removing it changes the answer) and the gates still apply.
    plain = videoanchor.anchored_attention(q, k, v, kb, vs, backend="torch", causal=True)
    ungated = videoanchor.anchored_attention(q, k, v, backend="torch", **kw)
    if mshape != "HSq1" or kind != "float":  # a per-row constant shift cancels in softmax
        assert (out - plain).abs().max() > 1e-2
    assert (out - ungated).abs().max() > 1e-2


def test_transformers_style_4d_mask_equals_causal_and_padding():
    """A (B, 1, Sq, Skv) additive mask with finfo.min (transformers' format) gives the same
    result as causal + key_padding_mask; its bool twin too; a fully masked (-inf) row is 0."""
    B, Hq, Hkv, S, D = 2, 4, 2, 9, 16
    q, k, v, kb, vs = make(B, Hq, Hkv, S, S, D, torch.float32, grad=False)
    pad = torch.ones(B, S, dtype=torch.bool)
    pad[1, :3] = False  # left padding
    allowed = torch.ones(S, S, dtype=torch.bool).tril()[None, None] & pad[:, None, None, :]
    additive = torch.zeros(B, 1, S, S).masked_fill(~allowed, torch.finfo(torch.float32).min)
    direct = videoanchor.anchored_attention(q, k, v, kb, vs, key_padding_mask=pad, backend="torch")
    for m in (allowed, additive):
        out = videoanchor.anchored_attention(
            q, k, v, kb, vs, causal=False, attn_mask=m, backend="torch"
        )
        # Rows 0-2 of sample 1 see no key: bool gives 0, finfo.min a uniform average (as SDPA).
        # A few float32 ulps apart (1.9e-6 at an output of 4.6 with AVX2 arithmetic: issue 80)
        torch.testing.assert_close(out[0], direct[0], atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(out[1, :, 3:], direct[1, :, 3:], atol=1e-6, rtol=1e-6)
    inf_mask = additive.masked_fill(~allowed, float("-inf"))
    out, lse = videoanchor.anchored_attention(
        q, k, v, kb, vs, causal=False, attn_mask=inf_mask, backend="torch", return_lse=True
    )
    assert torch.equal(out[1, :, :3], torch.zeros_like(out[1, :, :3]))
    assert torch.isneginf(lse[1, :, :3]).all() and not out.isnan().any()


def test_attn_mask_with_triton_backend_warns_once_and_is_exact():
    reset_warnings()  # once per process: this test sees the first
    q, k, v, kb, vs = make(1, 2, 1, 5, 6, 16, torch.float32, grad=False)
    mask = torch.rand(1, 1, 5, 6) > 0.3
    with pytest.warns(UserWarning, match="not the fused Triton kernel"):
        out = videoanchor.anchored_attention(q, k, v, kb, vs, attn_mask=mask, backend="triton")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = videoanchor.anchored_attention(q, k, v, kb, vs, attn_mask=mask, backend="triton")
    ref = anchored_attention_reference(q, k, v, kb, vs, attn_mask=mask)
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=0)
    assert torch.equal(out, again)


def test_attn_mask_errors():
    q, k, v, kb, vs = make(2, 4, 2, 5, 6, 16, torch.float32, grad=False)
    attn = videoanchor.anchored_attention
    with pytest.raises(ValueError, match=r"broadcastable to \(B, Hq, Sq, Skv\) = \(2, 4, 5, 6\), "
                       r"got \(2, 1, 5, 7\)"):  # fmt: skip
        attn(q, k, v, attn_mask=torch.zeros(2, 1, 5, 7))
    with pytest.raises(ValueError, match="broadcastable"):
        attn(q, k, v, attn_mask=torch.zeros(1, 2, 4, 5, 6))
    with pytest.raises(ValueError, match="broadcastable"):
        attn(q, k, v, attn_mask=torch.zeros(3, 5, 6))
    with pytest.raises(TypeError, match="attn_mask: expected dtype torch.bool .* got torch.int64"):
        attn(q, k, v, attn_mask=torch.zeros(5, 6, dtype=torch.int64))
    with pytest.raises(TypeError, match="attn_mask: expected a torch.Tensor"):
        attn(q, k, v, attn_mask=[[True]])
    with pytest.raises(ValueError, match="one device"):
        attn(q, k, v, attn_mask=torch.zeros(5, 6, device="meta"))


# ---- Triton backward kernel (interpreter on CPU) ------------------------------------


def visible_mask(B, Sq, Skv, causal, pad, cache_seqlens):
    """(B, 1, Sq, Skv) bool: which keys each query sees."""
    i = torch.arange(Sq)[:, None]
    j = torch.arange(Skv)[None, :]
    n = torch.full((B,), Skv) if cache_seqlens is None else cache_seqlens.long()
    n = n.view(B, 1, 1, 1)
    vis = (j < n) & ((j <= i + n - Sq) if causal else True)
    if pad is not None:
        vis = vis & pad[:, None, None, :]
    return vis


def eager_attention(q, k, v, kb, vs, vis, sm_scale):
    """Plain PyTorch attention in the inputs' dtype: (out, lse)."""
    Hq, Hkv = q.shape[1], k.shape[1]
    kk = k.repeat_interleave(Hq // Hkv, 1)
    vv = v.repeat_interleave(Hq // Hkv, 1) * vs[:, None, :, None]
    logits = (q @ kk.transpose(-1, -2)) * sm_scale + kb[:, None, None, :]
    logits = logits.masked_fill(~vis, float("-inf"))
    p = torch.softmax(logits, dim=-1)
    p = torch.where(vis.any(-1, keepdim=True), p, 0)  # rows without keys: 0, not NaN
    return p @ vv, torch.logsumexp(logits, dim=-1)


def attention_loss(out, lse, go, gl):
    """sum(out * go) + sum(lse * gl) over rows with a finite lse."""
    finite = torch.isfinite(lse)
    return (out * go).sum() + (torch.where(finite, lse, 0) * torch.where(finite, gl, 0)).sum()


TRITON_CASES = {
    "gqa-causal-Sq13-Skv21": ((2, 4, 2, 13, 21, 16), dict(causal=True)),
    "gqa-full-pad": ((2, 4, 2, 13, 21, 16), dict(causal=False, pad="random")),
    "mha-causal-leftpad-D40": ((2, 3, 3, 17, 17, 40), dict(causal=True, pad="left")),
    "causal-Sq21-Skv9-empty-rows": ((1, 2, 1, 21, 9, 24), dict(causal=True)),
    "cache-seqlens": ((2, 2, 1, 5, 20, 16), dict(causal=True, cache_seqlens=[20, 11])),
}


def check_triton_grads(shape, opts, dtype, device):
    """dq, dk, dv, d key_bias, d value_scale from the Triton backward against autograd of
    the float64 reference, through both out and lse; each error at most 2x that of eager
    PyTorch attention's autograd in the same dtype."""
    B, Hq, Hkv, Sq, Skv, D = shape
    inputs = [t.detach().to(device).requires_grad_() for t in make(*shape, dtype)]
    g = torch.Generator().manual_seed(7)
    pad = None
    if opts.get("pad") == "random":
        pad = torch.rand(B, Skv, generator=g) > 0.3
    elif opts.get("pad") == "left":
        pad = torch.arange(Skv)[None, :] >= torch.tensor([0, 6])[:, None]
    cs = opts.get("cache_seqlens")
    cs = None if cs is None else torch.tensor(cs, dtype=torch.int32)
    vis = visible_mask(B, Sq, Skv, opts["causal"], pad, cs).to(device)
    pad, cs = (None if t is None else t.to(device) for t in (pad, cs))
    kw = dict(causal=opts["causal"], key_padding_mask=pad, cache_seqlens=cs)
    go = torch.randn(B, Hq, Sq, D, generator=g).to(device)
    gl = torch.randn(B, Hq, Sq, generator=g).to(device)

    out, lse = videoanchor.anchored_attention(*inputs, backend="triton", return_lse=True, **kw)
    got = torch.autograd.grad(attention_loss(out, lse, go.to(dtype), gl), inputs)
    leaves = [t.detach().double().requires_grad_() for t in inputs]
    ro, rl = anchored_attention_reference(*leaves, return_lse=True, **kw)
    ref = torch.autograd.grad(attention_loss(ro, rl, go.double(), gl.double()), leaves)
    eager_in = [t.detach().to(dtype).requires_grad_() for t in inputs]
    eo, el = eager_attention(*eager_in, vis, 1 / math.sqrt(D))
    base = torch.autograd.grad(attention_loss(eo, el.float(), go.to(dtype), gl), eager_in)
    names = ("q", "k", "v", "key_bias", "value_scale")
    for name, inp, gt, r, b in zip(names, inputs, got, ref, base, strict=True):
        assert gt.dtype == inp.dtype and gt.shape == inp.shape, name
        assert not gt.isnan().any(), f"d{name} has NaN (unwritten or 0/0)"
        err = (gt.double() - r).abs().max().item()
        base_err = (b.double() - r).abs().max().item()
        tol = max(2 * base_err, GRAD_FLOOR[dtype] * max(1.0, r.abs().max().item()))
        assert err <= tol, f"d{name}: error {err:.3g} > tol {tol:.3g} (eager {base_err:.3g})"


@contextlib.contextmanager
def new_buffers_poisoned():
    """Inside, every new uninitialised tensor (``torch.empty``, ``empty_like``, ...) is full
    of NaN (integers: their maximum): PyTorch's ``fill_uninitialized_memory`` under
    ``use_deterministic_algorithms``. An element a kernel leaves unwritten shows as NaN."""
    assert torch.utils.deterministic.fill_uninitialized_memory  # PyTorch's default
    was = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        assert torch.empty(2).isnan().all()
        yield
    finally:
        torch.use_deterministic_algorithms(was, warn_only=warn_only)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", list(TRITON_CASES))
def test_triton_backward_within_twice_pytorch_error(case, dtype):
    """The interpreter on CPU, buffers poisoned with NaN before the kernels write them."""
    shape, opts = TRITON_CASES[case]
    with new_buffers_poisoned():
        check_triton_grads(shape, opts, dtype, "cpu")


@pytest.mark.gpu
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32],
                         ids=["fp16", "bf16", "fp32"])  # fmt: skip
def test_gpu_triton_backward(dtype, D):
    """Real tile sizes on the GPU (bf16 included, which the interpreter cannot run)."""
    check_triton_grads((2, 8, 2, 300, 333, D), dict(causal=True, pad="left"), dtype, "cuda")


def test_triton_backward_without_return_lse_and_partial_grads():
    """Gradients without return_lse (the wrapper saves the lse anyway), the raw op called
    with return_lse=False (backward recomputes it), and only some inputs requiring grad."""
    q, k, v, kb, vs = make(1, 4, 2, 11, 14, 16, torch.float32)
    go = torch.randn(1, 4, 11, 16)
    out = videoanchor.anchored_attention(q, k, v, kb, vs, backend="triton")
    full = torch.autograd.grad(out, (q, k, v, kb, vs), go)
    raw, lse = torch.ops.videoanchor.anchored_attention_fwd(
        q, k, v, kb, vs, None, None, True, 0.25, False
    )
    assert lse.numel() == 0
    again = torch.autograd.grad(raw, (q, k, v, kb, vs), go)
    for a, b in zip(full, again, strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    kb2, vs2 = kb.detach(), vs.detach()
    out = videoanchor.anchored_attention(q, k.detach(), v.detach(), kb2, vs2, backend="triton")
    (dq,) = torch.autograd.grad(out, (q,), go)
    torch.testing.assert_close(dq, full[0], atol=0, rtol=0)


def test_triton_backward_opcheck_and_compiled_training():
    """The forward op's autograd registration and the backward op's fake pass opcheck;
    a compiled (aot_eager) forward + backward gives the eager gradients."""
    q, k, v, kb, vs = make(1, 2, 1, 9, 9, 16, torch.float32)
    # q stored as (B, S, H, D), as transformers hands it over: gradients keep its strides.
    q = q.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()
    pad = torch.ones(1, 9, dtype=torch.bool)
    pad[0, :2] = False
    torch.library.opcheck(
        torch.ops.videoanchor.anchored_attention_fwd.default,
        (q, k, v, kb, vs, pad, None, True, 0.25, True),
        test_utils=("test_schema", "test_autograd_registration", "test_faketensor"),
    )
    out, lse = torch.ops.videoanchor.anchored_attention_fwd(
        q, k, v, kb, vs, pad, None, True, 0.25, True
    )
    torch.library.opcheck(
        torch.ops.videoanchor.anchored_attention_bwd.default,
        (torch.randn_like(out), q.detach(), k.detach(), v.detach(), kb.detach(), vs.detach(),
         pad, None, out.detach(), lse.detach(), None, True, 0.25, True, True),
        test_utils=("test_schema", "test_faketensor"),
    )  # fmt: skip

    # The varlen pair: q (total_q, Hq, D) as two sequences of 4 and 5 queries.
    cu = torch.tensor([0, 4, 9], dtype=torch.int32)
    vq, vk, vv = (t.detach()[0].transpose(0, 1).requires_grad_() for t in (q, k, v))
    vkb, vvs = kb.detach()[0].requires_grad_(), vs.detach()[0].requires_grad_()
    varlen_args = (vq, vk, vv, cu, cu, 5, 5, vkb, vvs, True, 0.25, True)
    torch.library.opcheck(
        torch.ops.videoanchor.anchored_attention_varlen_fwd.default, varlen_args,
        test_utils=("test_schema", "test_autograd_registration", "test_faketensor"),
    )  # fmt: skip
    vout, vlse = torch.ops.videoanchor.anchored_attention_varlen_fwd(*varlen_args)
    torch.library.opcheck(
        torch.ops.videoanchor.anchored_attention_varlen_bwd.default,
        (torch.randn_like(vout), vq.detach(), vk.detach(), vv.detach(), cu, cu, 5, 5,
         vkb.detach(), vvs.detach(), vout.detach(), vlse.detach(), None, True, 0.25, True,
         True),
        test_utils=("test_schema", "test_faketensor"),
    )  # fmt: skip

    def loss(q, k, v, kb, vs):
        o = videoanchor.anchored_attention(q, k, v, kb, vs, key_padding_mask=pad, backend="triton")
        return o.square().sum()

    eager = torch.autograd.grad(loss(q, k, v, kb, vs), (q, k, v, kb, vs))
    dense = [t.detach().contiguous().requires_grad_() for t in (q, k, v, kb, vs)]
    for a, b in zip(eager, torch.autograd.grad(loss(*dense), dense), strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)
    got = torch.autograd.grad(compiled(q, k, v, kb, vs), (q, k, v, kb, vs))
    for a, b in zip(eager, got, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_varlen_backward_within_twice_pytorch_error(dtype, backend):
    """Packed sequences (query lengths 5, 0, 9 against 7, 3, 9 keys), GQA, causal: gradients of anchored_attention_varlen on either
    backend against the float64 reference run sequence by sequence, 2x-PyTorch-error rule;
    every packed token belongs to a sequence (cu_seqlens[-1] is the packed length)."""
    lq, lk = [5, 0, 9], [7, 3, 9]
    Hq, Hkv, D = 4, 2, 16
    cu_q = torch.tensor([0, 5, 5, 14], dtype=torch.int32)
    cu_k = torch.tensor([0, 7, 10, 19], dtype=torch.int32)
    g = torch.Generator().manual_seed(11)
    q = torch.randn(14, Hq, D, generator=g).to(dtype).requires_grad_()
    k = torch.randn(19, Hkv, D, generator=g).to(dtype).requires_grad_()
    v = torch.randn(19, Hkv, D, generator=g).to(dtype).requires_grad_()
    s = torch.rand(19, generator=g)
    kb = torch.log1p(9.5 * s).requires_grad_()
    vs = (1 + 2.5 * s).requires_grad_()
    inputs = (q, k, v, kb, vs)
    go = torch.randn(14, Hq, D, generator=g)
    gl = torch.randn(Hq, 14, generator=g)

    out, lse = videoanchor.anchored_attention_varlen(
        q, k, v, cu_q, cu_k, 9, None, kb, vs, backend=backend, return_lse=True
    )
    got = torch.autograd.grad(attention_loss(out[:14], lse[:, :14], go[:14].to(dtype),
                                             gl[:, :14]), inputs)  # fmt: skip

    def per_sequence(q, k, v, kb, vs, attend):
        loss = 0
        for b in range(3):
            q0, k0 = int(cu_q[b]), int(cu_k[b])
            sl_q, sl_k = slice(q0, q0 + lq[b]), slice(k0, k0 + lk[b])
            o, l = attend(q[sl_q].transpose(0, 1)[None], k[sl_k].transpose(0, 1)[None],
                          v[sl_k].transpose(0, 1)[None], kb[None, sl_k], vs[None, sl_k])  # fmt: skip
            gq = go[sl_q].transpose(0, 1)[None].to(o.dtype)
            loss = loss + attention_loss(o, l, gq, gl[None, :, sl_q].to(l.dtype))
        return loss

    def reference(*a):
        return anchored_attention_reference(*a, causal=True, return_lse=True)

    def eager(q, k, v, kb, vs):
        vis = visible_mask(1, q.shape[2], k.shape[2], True, None, None)
        o, l = eager_attention(q, k, v, kb, vs, vis, 1 / math.sqrt(D))
        return o, l.float()

    leaves = [t.detach().double().requires_grad_() for t in inputs]
    ref = torch.autograd.grad(per_sequence(*leaves, reference), leaves)
    eager_in = [t.detach().to(dtype).requires_grad_() for t in inputs]
    base = torch.autograd.grad(per_sequence(*eager_in, eager), eager_in)
    names = ("q", "k", "v", "key_bias", "value_scale")
    for name, gt, r, b in zip(names, got, ref, base, strict=True):
        assert not gt.isnan().any(), name
        err = (gt.double() - r).abs().max().item()
        base_err = (b.double() - r).abs().max().item()
        tol = max(2 * base_err, GRAD_FLOOR[dtype] * max(1.0, r.abs().max().item()))
        assert err <= tol, f"d{name}: error {err:.3g} > tol {tol:.3g} (eager {base_err:.3g})"


def test_triton_backward_after_split_kv_forward():
    """Sq = 3 against 260 keys takes the split-KV (decode) forward; its lse feeds the
    backward kernel: gradients match autograd of the float64 reference."""
    from videoanchor.kernels.interface import DECODE_MAX_SQ, DECODE_MIN_SKV

    Sq, Skv = 3, 260
    assert Sq <= DECODE_MAX_SQ and Skv >= DECODE_MIN_SKV
    inputs = make(1, 4, 2, Sq, Skv, 16, torch.float32)
    go = torch.randn(1, 4, Sq, 16)
    out = videoanchor.anchored_attention(*inputs, backend="triton")
    got = torch.autograd.grad(out, inputs, go)
    leaves = [t.detach().double().requires_grad_() for t in inputs]
    ref = torch.autograd.grad(anchored_attention_reference(*leaves), leaves, go.double())
    for gt, r in zip(got, ref, strict=True):
        torch.testing.assert_close(gt.double(), r, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("sq, skv", [(0, 7), (7, 0)])
def test_backward_of_empty_sequences(backend, sq, skv):
    """No query or no key: the output is empty or zero and every gradient is zero."""
    inputs = make(1, 2, 1, sq, skv, 16, torch.float32)
    out = videoanchor.anchored_attention(*inputs, backend=backend)
    grads = torch.autograd.grad(out.sum(), inputs)
    for t, g in zip(inputs, grads, strict=True):
        assert g.shape == t.shape and torch.equal(g, torch.zeros_like(g))


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("hide", ["padding", "cache_seqlens"])
def test_hidden_keys_never_reach_gradients(backend, hide):
    """NaN in the K/V/gates of padded keys (or cache slots past a sample's length) must
    reach no gradient: every gradient is finite and equals the one from clean inputs."""
    B, Hq, Hkv, Sq, Skv, D = 2, 4, 2, 6, 13, 16
    clean = make(B, Hq, Hkv, Sq, Skv, D, torch.float32, grad=False)
    lens = torch.tensor([13, 8])
    kw = dict(causal=False)
    if hide == "padding":
        kw["key_padding_mask"] = torch.arange(Skv)[None, :] >= (Skv - lens)[:, None]
        hidden = ~kw["key_padding_mask"]
    else:
        kw["cache_seqlens"] = lens.to(torch.int32)
        hidden = torch.arange(Skv)[None, :] >= lens[:, None]
    dirty = [t.clone() for t in clean]
    dirty[1][:, 0][hidden], dirty[2][:, 1][hidden] = float("nan"), float("nan")
    dirty[3][hidden], dirty[4][hidden] = float("nan"), float("nan")
    go = torch.randn(B, Hq, Sq, D)
    grads = []
    for inputs in (clean, dirty):
        inputs = [t.requires_grad_() for t in inputs]
        out = videoanchor.anchored_attention(*inputs, backend=backend, **kw)
        grads.append(torch.autograd.grad(out, inputs, go))
    for g_clean, g_dirty in zip(*grads, strict=True):
        assert torch.isfinite(g_dirty).all()
        torch.testing.assert_close(g_dirty, g_clean, atol=1e-6, rtol=1e-6)
