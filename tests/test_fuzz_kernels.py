"""Property-based tests: the Triton kernels (CPU interpreter) against the float64 reference
on inputs drawn by hypothesis, forward and backward.

Drawn: batch, query/KV heads (MHA, GQA, MQA), query and key lengths (1, primes, Sq > Skv,
long enough for the split-KV path now and then), head dims, dtype (bf16 through the test
shim), layouts (contiguous, (B, S, H, D) transposed, strided slices), causal or not,
padding masks (with all-masked rows), cache_seqlens, packed varlen batches, key biases
and value scales absent or of any magnitude and sign, the fast form's value-scale range,
return_lse, and gradients.

The check: every output element within ``TOL[dtype]`` of the reference, relative to the
largest ``|value_scale_j * v_j|`` of its sample (the output is a convex combination of
those), lse within float32 precision, gradients relative to the largest reference
gradient. Hand-written tests elsewhere hold the tighter 2x-PyTorch-error rule; this one
hunts masking, indexing, stride and overflow bugs, which give O(1) errors.

Profiles (tests/conftest.py): "ci" (default: derandomised, a fixed set of examples, well
under 3 minutes on 2 cores) and "long" (``pytest --hypothesis-profile=long``).
"""

import contextlib

import pytest
import torch
from bf16_interpreter import bf16_interpreter, unavailable_reason
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import videoanchor
from videoanchor.kernels.interface import triton_interpret_enabled
from videoanchor.kernels.reference import anchored_attention_reference

pytestmark = pytest.mark.skipif(
    not triton_interpret_enabled(), reason="fuzzes the kernels in Triton's CPU interpreter"
)

TOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}
GRAD_TOL = {torch.float32: 2e-4, torch.float16: 3e-2, torch.bfloat16: 1.5e-1}
LENGTHS = [1, 2, 3, 5, 7, 11, 13, 16, 17, 23, 31]
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if unavailable_reason() is None else [])


def _layout(t: torch.Tensor, kind: str) -> torch.Tensor:
    """The same values as ``t`` (B, H, S, D) in another memory layout."""
    if kind == "bshd":
        return t.transpose(1, 2).contiguous().transpose(1, 2)
    if kind == "strided":  # every other element of a wider buffer along D and S
        B, H, S, D = t.shape
        wide = torch.zeros(B, H, 2 * S, 2 * D, dtype=t.dtype)
        wide[:, :, ::2, ::2] = t
        return wide[:, :, ::2, ::2]
    return t.contiguous()


@st.composite
def gates(draw, n, batch_shape):
    """(key_bias, value_scale, value_scale_range) of shape batch_shape + (n,)."""
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    shape = (*batch_shape, n)
    bias_kind = draw(st.sampled_from(["none", "anchor", "uniform", "mask-1e4", "plus-200"]))
    s = torch.rand(shape, generator=g)
    if bias_kind == "none":
        kb = None
    elif bias_kind == "anchor":
        kb = torch.log1p(draw(st.sampled_from([0.5, 9.5, 100.0])) * s)
    elif bias_kind == "uniform":
        kb = (2 * s - 1) * draw(st.sampled_from([1e-3, 1.0, 30.0, 1e3]))
    elif bias_kind == "mask-1e4":
        kb = torch.where(torch.rand(shape, generator=g) < 0.4, -1e4, s)
    else:
        kb = 200.0 + s
    scale_kind = draw(st.sampled_from(["none", "anchor", "magnitude", "signed"]))
    rng = None
    if scale_kind == "none":
        vs = None
    elif scale_kind == "anchor":
        vs = 1 + draw(st.sampled_from([0.5, 2.5, 20.0])) * s
    elif scale_kind == "magnitude":
        decades = draw(st.sampled_from([1.0, 3.0]))
        vs = torch.pow(10.0, (2 * torch.rand(shape, generator=g) - 1) * decades)
    else:
        vs = torch.randn(shape, generator=g)
    if vs is not None and bool((vs > 0).all()) and draw(st.booleans()):
        rng = (float(vs.min()), float(vs.max()))  # the fast form (positive scales)
    return kb, vs, rng


def _dtype_ctx(dtype):
    return bf16_interpreter() if dtype == torch.bfloat16 else contextlib.nullcontext()


def _check_out(out, ref, v, vs, dtype, per_sample):
    """|out - ref| <= TOL * max_j |vs_j v_j| per sample (dense: dim 0)."""
    assert not torch.isnan(out).any(), "NaN in the output"
    if v.shape[-2] == 0 or out.numel() == 0:  # no keys: every row is 0
        assert (out == 0).all()
        return
    mag = v.double().abs().amax(dim=(-1, -3) if per_sample else (-1, -2), keepdim=False)
    if vs is not None:
        mag = mag * vs.double().abs()
    scale = mag.amax(-1) if per_sample else mag.amax()
    err = (out.double() - ref).abs()
    err = err.flatten(1).amax(1) if per_sample else err.amax()
    tol = TOL[dtype] * scale + 1e-30
    assert (err <= tol).all(), f"error {err.max().item():.3g} > tol {tol.min().item():.3g}"


def _check_lse(lse, ref_lse):
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite), "lse -inf pattern differs"
    diff = (lse.double() - ref_lse)[finite].abs()
    bound = 1e-3 + 2e-6 * ref_lse[finite].abs()
    assert (diff <= bound).all(), f"lse error {diff.max().item():.3g}"


def _check_grads(got, want, dtype):
    """Each gradient within GRAD_TOL of the reference, relative to the largest reference
    gradient of q, k, v and itself (a gradient that is exactly 0 in float64, e.g. dq of a
    row with one visible key, is the difference of two rounded terms in the kernels)."""
    common = max((w.abs().max().item() for w in want[:3] if w is not None and w.numel()),
                 default=0.0)  # fmt: skip
    for name, g, w in zip(("dq", "dk", "dv", "dbias", "dscale"), got, want, strict=True):
        if w is None or w.numel() == 0:
            continue
        assert g is not None and not torch.isnan(g).any(), f"{name}: missing or NaN"
        scale = max(w.abs().max().item(), common)
        err = (g.double() - w).abs().max().item()
        assert err <= GRAD_TOL[dtype] * scale + 1e-6, f"{name}: error {err:.3g}, scale {scale:.3g}"


@st.composite
def dense_case(draw):
    dtype = draw(st.sampled_from(DTYPES))
    B = draw(st.integers(1, 2))
    Hkv = draw(st.sampled_from([1, 2]))
    group = draw(st.sampled_from([1, 2, 3]))
    D = draw(st.sampled_from([16, 24, 32] if dtype != torch.float32 else [16, 24, 32, 64]))
    Sq = draw(st.sampled_from(LENGTHS))
    Skv = draw(st.sampled_from(LENGTHS + [260]))  # 260: the split-KV path when Sq <= 64
    causal = draw(st.booleans())
    pad = draw(st.sampled_from(["none", "random", "all-masked-row"]))
    cache = draw(st.booleans())
    kb, vs, rng = draw(gates(Skv, (B,)))
    return dict(
        dtype=dtype, B=B, Hkv=Hkv, Hq=Hkv * group, D=D, Sq=Sq, Skv=Skv, causal=causal,
        pad=pad, cache=cache, kb=kb, vs=vs, rng=rng,
        layouts=[draw(st.sampled_from(["bhsd", "bshd", "strided"])) for _ in range(3)],
        lse=draw(st.booleans()), grad=draw(st.booleans()) and Skv < 64,
        seed=draw(st.integers(0, 2**16)),
    )  # fmt: skip


def run_dense(c):
    g = torch.Generator().manual_seed(c["seed"])
    dtype, B, Hq, Hkv, Sq, Skv, D = (c[k] for k in ("dtype", "B", "Hq", "Hkv", "Sq", "Skv", "D"))
    q = _layout(torch.randn(B, Hq, Sq, D, generator=g).to(dtype), c["layouts"][0])
    k = _layout(torch.randn(B, Hkv, Skv, D, generator=g).to(dtype), c["layouts"][1])
    v = _layout(torch.randn(B, Hkv, Skv, D, generator=g).to(dtype), c["layouts"][2])
    mask = None
    if c["pad"] == "random":
        mask = torch.rand(B, Skv, generator=g) > 0.3
    elif c["pad"] == "all-masked-row":
        mask = torch.rand(B, Skv, generator=g) > 0.3
        mask[0] = False
    cache_seqlens = (
        torch.randint(0, Skv + 1, (B,), generator=g).to(torch.int32) if c["cache"] else None
    )
    kb, vs = c["kb"], c["vs"]
    if c["grad"]:
        q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
        kb = None if kb is None else kb.clone().requires_grad_()
        vs = None if vs is None else vs.clone().requires_grad_()
    with _dtype_ctx(dtype):
        res = videoanchor.anchored_attention(
            q, k, v, kb, vs, causal=c["causal"], key_padding_mask=mask,
            cache_seqlens=cache_seqlens, backend="triton", return_lse=True,
            value_scale_range=c["rng"],
        )  # fmt: skip
        out, lse = res
        inputs = [t for t in (q, k, v, kb, vs) if t is not None and t.requires_grad]
        go = torch.randn(out.shape, generator=g).to(dtype)
        got = torch.autograd.grad(out, inputs, go) if c["grad"] else None
    ref, ref_lse = anchored_attention_reference(
        q, k, v, kb, vs, causal=c["causal"], key_padding_mask=mask, cache_seqlens=cache_seqlens,
        return_lse=True,
    )  # fmt: skip
    _check_out(out, ref.detach(), v.detach(), None if vs is None else vs.detach(), dtype, True)
    if c["lse"]:
        _check_lse(lse, ref_lse.detach())
    if c["grad"]:
        want = torch.autograd.grad(ref, inputs, go.double())
        it_got, it_want = iter(got), iter(want)
        full_got, full_want = [], []
        for t in (q, k, v, kb, vs):
            present = t is not None and t.requires_grad
            full_got.append(next(it_got) if present else None)
            full_want.append(next(it_want) if present else None)
        _check_grads(full_got, full_want, dtype)


@st.composite
def varlen_case(draw):
    dtype = draw(st.sampled_from(DTYPES))
    n = draw(st.integers(1, 3))
    lq = [draw(st.sampled_from([0] + LENGTHS)) for _ in range(n)]
    lk = [draw(st.sampled_from([0] + LENGTHS)) for _ in range(n)]
    total_k = sum(lk)
    kb, vs, rng = draw(gates(total_k, ()))
    Hkv = draw(st.sampled_from([1, 2]))
    return dict(
        dtype=dtype, lq=lq, lk=lk, Hkv=Hkv, Hq=Hkv * draw(st.sampled_from([1, 2, 4])),
        D=draw(st.sampled_from([16, 32])), causal=draw(st.booleans()), kb=kb, vs=vs, rng=rng,
        grad=draw(st.booleans()), seed=draw(st.integers(0, 2**16)),
    )  # fmt: skip


def run_varlen(c):
    g = torch.Generator().manual_seed(c["seed"])
    dtype, lq, lk, Hq, Hkv, D = (c[k] for k in ("dtype", "lq", "lk", "Hq", "Hkv", "D"))
    cu_q = torch.tensor([0, *torch.tensor(lq).cumsum(0).tolist()], dtype=torch.int32)
    cu_k = torch.tensor([0, *torch.tensor(lk).cumsum(0).tolist()], dtype=torch.int32)
    q = torch.randn(sum(lq), Hq, D, generator=g).to(dtype)
    k = torch.randn(sum(lk), Hkv, D, generator=g).to(dtype)
    v = torch.randn(sum(lk), Hkv, D, generator=g).to(dtype)
    kb, vs = c["kb"], c["vs"]
    if c["grad"]:
        q, k, v = (t.requires_grad_() for t in (q, k, v))
    with _dtype_ctx(dtype):
        out, lse = videoanchor.anchored_attention_varlen(
            q, k, v, cu_q, cu_k, max(lq), max(lk), kb, vs, causal=c["causal"], backend="triton",
            return_lse=True, value_scale_range=c["rng"],
        )  # fmt: skip
        go = torch.randn(out.shape, generator=g).to(dtype)
        got = torch.autograd.grad(out, (q, k, v), go, allow_unused=True) if c["grad"] else None
    want_grads = [torch.zeros(t.shape, dtype=torch.float64) for t in (q, k, v)]
    for b in range(len(lq)):
        q0, q1, k0, k1 = cu_q[b], cu_q[b + 1], cu_k[b], cu_k[b + 1]
        qb = q[q0:q1].transpose(0, 1)[None]
        kb_, vb = (t[k0:k1].transpose(0, 1)[None] for t in (k, v))
        gates_b = [None if t is None else t[None, k0:k1] for t in (kb, vs)]
        ref, ref_lse = anchored_attention_reference(
            qb, kb_, vb, *gates_b, causal=c["causal"], return_lse=True
        )
        got_b = out[q0:q1].transpose(0, 1)[None]
        _check_out(got_b.detach(), ref.detach(), vb.detach(), gates_b[1], dtype, True)
        _check_lse(lse[:, q0:q1][None], ref_lse.detach())
        if c["grad"] and q1 > q0 and ref.requires_grad:  # (no keys: zeros, no graph)
            gb = torch.autograd.grad(
                ref, (q, k, v), go[q0:q1].transpose(0, 1)[None].double(), allow_unused=True
            )
            for acc, part in zip(want_grads, gb, strict=True):
                if part is not None:
                    acc += part
    if c["grad"]:
        full_got = [
            torch.zeros_like(t) if gt is None else gt for gt, t in zip(got, (q, k, v), strict=True)
        ]
        _check_grads([*full_got, None, None], [*want_grads, None, None], dtype)


SETTINGS = dict(suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@settings(**SETTINGS)
@given(dense_case())
def test_fuzz_dense(case):
    assume(not (case["dtype"] == torch.float16 and case["vs"] is not None
                and case["vs"].abs().max() > 100))  # fmt: skip
    run_dense(case)


@settings(**SETTINGS)
@given(varlen_case())
def test_fuzz_varlen(case):
    assume(sum(case["lq"]) > 0)
    run_varlen(case)
