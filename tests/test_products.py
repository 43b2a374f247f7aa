"""The fast solver's products at ``precision="bf16x3"`` (videoanchor/anchor/products.py)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import spearmanr
from test_fast_solver import tokens

from videoanchor.anchor import compute_anchor_scores, fast
from videoanchor.anchor.products import Products
from videoanchor.anchor.ssc import solve_ssc_admm


def _rel(a, b) -> float:
    return float((a.double() - b).norm() / b.norm())


def _tf32(t):
    bits = t.contiguous().view(torch.int32)
    return ((bits + 0x1000) & ~0x1FFF).view(torch.float32)


@pytest.mark.parametrize("m,k,n", [(1, 1, 1), (7, 33, 5), (130, 67, 91)])
def test_bf16x3_is_near_float32_and_far_better_than_one_rounding(m, k, n):
    g = torch.Generator().manual_seed(m * 1000 + k)
    a = torch.randn(m, k, generator=g) * torch.logspace(-3, 3, k)  # mixed magnitudes
    b = torch.randn(k, n, generator=g)
    exact = a.double() @ b.double()
    p = Products("bf16x3")
    got = p.mm(a, b)
    assert got.dtype == torch.float32 and got.shape == (m, n)
    err = _rel(got, exact)
    err_f32 = _rel(a @ b, exact)
    err_bf16 = _rel(a.bfloat16().float() @ b.bfloat16().float(), exact)
    err_tf32 = _rel(_tf32(a) @ _tf32(b), exact)
    assert err < 2e-5, err  # about 2^-16 per product, float32 sums
    assert err < err_bf16 / 30 and err < err_tf32 / 4, (err, err_bf16, err_tf32)
    assert err < 300 * max(err_f32, 1e-9)
    # prepared operands (the split made once) give the same product, bit for bit
    torch.testing.assert_close(p.mm(p.left(a), p.right(b)), got, rtol=0, atol=0)
    assert p.left(a).shape == (m, 3 * k) and p.right(b).shape == (3 * k, n)
    assert p.left(p.left(a)).shape == (m, 3 * k)  # a prepared operand is not split again


@settings(max_examples=25, deadline=None)
@given(m=st.integers(1, 40), k=st.integers(1, 40), n=st.integers(1, 40), seed=st.integers(0, 99))
def test_bf16x3_products_of_any_shape(m, k, n, seed):
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randn(m, k, generator=g), torch.randn(k, n, generator=g)
    exact = a.double() @ b.double()
    got = Products("bf16x3").mm(a, b)
    assert torch.isfinite(got).all()
    # entrywise against |a| |b|: the parts' rounding (about 2^-16) and float32 sums
    bound = 3e-5 * (a.double().abs() @ b.double().abs())
    assert bool(((got.double() - exact).abs() <= bound + 1e-30).all())


def test_full_precision_is_the_plain_product():
    a, b = torch.randn(9, 5, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64)
    p = Products("full")
    assert p.left(a) is a and p.right(b) is b
    torch.testing.assert_close(p.mm(a, b), a @ b, rtol=0, atol=0)
    with pytest.raises(ValueError, match="precision: expected 'full' or 'bf16x3', got 'tf32'"):
        Products("tf32")


@pytest.mark.parametrize("path", ["active set (CPU)", "dense schedule (CUDA's)"])
def test_fast_solver_in_bf16x3_stays_with_the_float32_iterate(monkeypatch, path):
    if path.startswith("dense"):
        monkeypatch.setattr(fast, "applies", lambda x: False)
    x = tokens(97, 61, k=4, seed=5)
    ref = solve_ssc_admm(x, scheduled=True, progress=False)
    calls = []
    real = Products.mm
    monkeypatch.setattr(
        Products, "mm", lambda self, a, b: calls.append(self.split) or real(self, a, b)
    )
    got = solve_ssc_admm(x, scheduled=True, progress=False, precision="bf16x3")
    assert calls and all(calls)  # every dense product of the run went through the split
    assert got.iterations == ref.iterations == 60
    assert torch.isfinite(got.coef).all()
    rel = _rel(got.coef, ref.coef.double())
    assert 0 < rel < 2e-3, rel  # not the float32 iterate bit for bit, but close to it
    rows = got.coef.sum(dim=1), ref.coef.sum(dim=1)  # the row sums the scores use
    assert spearmanr(*rows)[0] > 0.9999


def test_bf16x3_scores_match_the_float32_default():
    x = tokens(120, 48, k=4, seed=8)
    ref = compute_anchor_scores(x, 4, progress=False)
    got = compute_anchor_scores(x, 4, progress=False, precision="bf16x3")
    assert bool((got.labels == ref.labels).all())
    assert float((got.scores - ref.scores).abs().max()) < 5e-3
    auto = compute_anchor_scores(x, 4, progress=False, precision="auto")
    torch.testing.assert_close(auto.scores, ref.scores, rtol=0, atol=0)  # auto is full


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(solver="faithful"), "solver 'fast' or 'auto' \\(got 'faithful'\\)"),
        (dict(solver="accelerated"), "solver 'fast' or 'auto'"),
        (dict(dtype=torch.float64), "dtype float32 \\(got torch.float64\\)"),
        (dict(backend="cupy"), "backend 'torch' or 'auto'"),
        (dict(mode="blocked"), "mode 'exact' or 'auto'"),
    ],
)
def test_bf16x3_where_it_cannot_run_is_refused_up_front(kw, match):
    x = tokens(40, 16, seed=2)
    with pytest.raises(ValueError, match="precision='bf16x3' .*" + match):
        compute_anchor_scores(x, 4, progress=False, precision="bf16x3", **kw)


def test_bad_precision_values():
    x = tokens(40, 16, seed=2)
    with pytest.raises(ValueError, match="precision: expected one of .*got 'tf32'"):
        compute_anchor_scores(x, 4, progress=False, precision="tf32")
    with pytest.raises(ValueError, match="precision='bf16x3' .*the fast solver"):
        solve_ssc_admm(x, precision="bf16x3", progress=False)  # the faithful iteration
    with pytest.raises(ValueError, match="precision: expected one of"):
        solve_ssc_admm(x, precision=None, progress=False)


def test_auto_mode_that_needs_blocked_refuses_bf16x3(monkeypatch):
    from videoanchor.anchor import scores

    monkeypatch.setattr(scores, "_exact_fits", lambda *a, **k: False)
    x = tokens(40, 16, seed=2)
    with pytest.raises(ValueError, match="these 40 tokens need blocked mode"):
        compute_anchor_scores(x, 4, progress=False, precision="bf16x3")


def test_configure_and_the_command_line_take_the_precision():
    from videoanchor.cli import build_parser
    from videoanchor.integrations.options import AnchorConfig, ssc_kwargs, validate_ssc_options

    cfg = AnchorConfig(ssc_precision="bf16x3")
    validate_ssc_options(cfg)
    assert ssc_kwargs(cfg)["precision"] == "bf16x3"
    with pytest.raises(ValueError, match="precision='bf16x3'"):
        validate_ssc_options(AnchorConfig(ssc_precision="bf16x3", ssc_solver="faithful"))
    run = build_parser()._subparsers._group_actions[0].choices["run"]
    args = run.parse_args(["--video", "v.mp4", "--question", "q", "--ssc-precision", "bf16x3"])
    assert args.ssc_precision == "bf16x3"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_bf16x3_runs_on_tensor_cores_and_matches_the_cpu_emulation():
    """On CUDA the split product is torch.mm(..., out_dtype=float32) on bf16 parts; the CPU
    emulation computes the same exact partial products (only the float32 summation order
    differs)."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(300, 257, generator=g), torch.randn(257, 190, generator=g)
    p = Products("bf16x3")
    cpu = p.mm(a, b)
    gpu = p.mm(a.cuda(), b.cuda())
    assert gpu.dtype == torch.float32 and gpu.is_cuda
    assert _rel(gpu.cpu(), cpu.double()) < 1e-6
    x = tokens(256, 96, k=4, seed=3)
    ref = compute_anchor_scores(x.cuda(), 4, progress=False)
    got = compute_anchor_scores(x.cuda(), 4, progress=False, precision="bf16x3")
    assert bool((got.labels == ref.labels).all())
    assert float((got.scores - ref.scores).abs().max()) < 5e-3
