"""The fast solver's products at ``precision="fp16x3"`` (videoanchor/anchor/products.py)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import spearmanr
from test_fast_solver import tokens

from videoanchor.anchor import compute_anchor_scores
from videoanchor.anchor.products import Products
from videoanchor.anchor.solvers.admm import solve_ssc_admm


def _rel(a, b) -> float:
    return float((a.double() - b).norm() / b.norm())


def _tf32(t):
    bits = t.contiguous().view(torch.int32)
    return ((bits + 0x1000) & ~0x1FFF).view(torch.float32)


def _bf16x3(a, b):
    """The same split in bfloat16 (8-bit significands): what fp16x3 replaced."""
    ah = a.bfloat16().float()
    al = (a - ah).bfloat16().float()
    bh = b.bfloat16().float()
    bl = (b - bh).bfloat16().float()
    return ah @ bh + (ah @ bl + al @ bh)


@pytest.mark.parametrize("m,k,n", [(1, 1, 1), (7, 33, 5), (130, 67, 91)])
def test_fp16x3_is_near_float32_and_far_better_than_one_rounding(m, k, n):
    g = torch.Generator().manual_seed(m * 1000 + k)
    a = torch.randn(m, k, generator=g) * torch.logspace(-3, 3, k)  # mixed magnitudes
    b = torch.randn(k, n, generator=g)
    exact = a.double() @ b.double()
    p = Products("fp16x3")
    got = p.mm(a, b)
    assert got.dtype == torch.float32 and got.shape == (m, n)
    err = _rel(got, exact)
    err_f32 = _rel(a @ b, exact)
    err_bf16 = _rel(a.bfloat16().float() @ b.bfloat16().float(), exact)
    err_tf32 = _rel(_tf32(a) @ _tf32(b), exact)
    err_bf16x3 = _rel(_bf16x3(a, b), exact)
    assert err < 1e-6, err  # about 2^-22 per entry, float32 sums
    assert err < err_bf16 / 1000 and err < err_tf32 / 100 and err < err_bf16x3 / 4, (
        err,
        err_bf16,
        err_tf32,
        err_bf16x3,
    )
    assert err < 30 * max(err_f32, 1e-8), (err, err_f32)
    # prepared operands (the split made once) give the same product, bit for bit
    torch.testing.assert_close(p.mm(p.left(a), p.right(b)), got, rtol=0, atol=0)
    assert p.left(a).t.shape == (m, 3 * k) and p.right(b).t.shape == (3 * k, n)
    assert p.left(a).t.dtype == torch.float16
    assert p.left(p.left(a)).t.shape == (m, 3 * k)  # a prepared operand is not split again
    assert p.left(a)[: max(1, m // 2)].t.shape == (max(1, m // 2), 3 * k)  # row slices


@settings(max_examples=25, deadline=None)
@given(
    m=st.integers(1, 40),
    k=st.integers(1, 40),
    n=st.integers(1, 40),
    seed=st.integers(0, 99),
    log_scale=st.integers(-30, 30),
)
def test_fp16x3_products_of_any_shape_and_magnitude(m, k, n, seed, log_scale):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(m, k, generator=g) * 10.0**log_scale  # far outside float16's range
    b = torch.randn(k, n, generator=g) * 10.0 ** (-log_scale // 2)
    exact = a.double() @ b.double()
    got = Products("fp16x3").mm(a, b)
    assert torch.isfinite(got).all()
    # entrywise against |a| |b|: the parts' rounding (about 2^-22) and float32 sums
    bound = 2e-6 * (a.double().abs() @ b.double().abs())
    assert bool(((got.double() - exact).abs() <= bound).all())


@pytest.mark.parametrize("magnitude", [1e-36, 1e-20, 1e20, 1e36])
def test_fp16x3_at_the_ends_of_float32s_range(magnitude):
    """Operands far outside float16's range (and past 2^126 from it) stay accurate: the
    scales are clamped to finite powers of two and undone one at a time."""
    g = torch.Generator().manual_seed(1)
    a = torch.randn(9, 13, generator=g) * magnitude
    b = torch.randn(13, 6, generator=g) / max(magnitude, 1.0)
    exact = a.double() @ b.double()
    got = Products("fp16x3").mm(a, b)
    assert torch.isfinite(got).all()
    assert _rel(got, exact) < 1e-6


def test_fp16x3_of_zeros_and_of_a_single_large_entry():
    p = Products("fp16x3")
    z = torch.zeros(4, 3)
    assert bool((p.mm(z, torch.randn(3, 2)) == 0).all())
    a = torch.zeros(3, 3)
    a[1, 2] = 3.0e38  # near float32's largest: scaled into float16 without overflow
    b = torch.eye(3) * 0.5
    torch.testing.assert_close(p.mm(a, b), a @ b, rtol=1e-6, atol=0)


def test_full_precision_is_the_plain_product():
    a, b = torch.randn(9, 5, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64)
    p = Products("full")
    assert p.left(a) is a and p.right(b) is b
    torch.testing.assert_close(p.mm(a, b), a @ b, rtol=0, atol=0)
    with pytest.raises(ValueError, match="precision: expected 'full' or 'fp16x3', got 'bf16x3'"):
        Products("bf16x3")


@pytest.mark.parametrize("path", ["active set (CPU)", "dense schedule (CUDA's)"])
def test_fast_solver_in_fp16x3_stays_with_the_float32_iterate(monkeypatch, path):
    step = dict(strategy="dense" if path.startswith("dense") else "auto")
    x = tokens(97, 61, k=4, seed=5)
    ref = solve_ssc_admm(x, scheduled=True, progress=False, **step)
    calls = []
    real = Products.mm
    monkeypatch.setattr(
        Products, "mm", lambda self, a, b: calls.append(self.split) or real(self, a, b)
    )
    got = solve_ssc_admm(x, scheduled=True, progress=False, precision="fp16x3", **step)
    assert calls and all(calls)  # every dense product of the run went through the split
    assert got.iterations == ref.iterations == 60
    assert torch.isfinite(got.coef).all()
    rel = _rel(got.coef, ref.coef.double())
    assert 0 < rel < 1e-4, rel  # not the float32 iterate bit for bit, but close to it
    rows = got.coef.sum(dim=1), ref.coef.sum(dim=1)  # the row sums the scores use
    assert spearmanr(*rows)[0] > 0.9999


def test_fp16x3_scores_match_the_float32_default():
    x = tokens(120, 48, k=4, seed=8)
    ref = compute_anchor_scores(x, 4, progress=False, solver="fast")
    got = compute_anchor_scores(x, 4, progress=False, precision="fp16x3")
    assert bool((got.labels == ref.labels).all())
    assert float((got.scores - ref.scores).abs().max()) < 1e-4
    auto = compute_anchor_scores(x, 4, progress=False, precision="auto", solver="fast")
    torch.testing.assert_close(auto.scores, ref.scores, rtol=0, atol=0)  # full on a CPU


def test_auto_is_fp16x3_only_where_it_runs_natively_and_the_solver_allows_it(monkeypatch):
    """ "auto" picks fp16x3 on a CUDA device with float16 tensor cores (H100, 2026-11-24: as
    faithful and as stable as float32, 1.1-1.4x faster) and full everywhere else: on a CPU,
    and wherever fp16x3 could not run (then it never raises, unlike an explicit fp16x3)."""
    from videoanchor.anchor import plan, products
    from videoanchor.anchor.options import SSCOptions

    assert products._has_out_dtype()  # this PyTorch (>= 2.8) has torch.mm(out_dtype=...)
    assert not products.native_fp16x3("cpu") and not products.native_fp16x3(None)
    assert products.native_fp16x3("meta") is False
    assert products.resolve_precision("auto", "cpu") == "full"
    assert products.resolve_precision("full", "cuda") == "full"
    ok = dict(fast=True, work=torch.float32, device="cpu")
    assert plan.check_precision("auto", **ok) == "full"
    # the memory rule counts what runs: the plan resolves "auto" first (fp16x3's parts only
    # where it is native), and the memory model refuses an unresolved "auto"
    full = plan.exact_bytes(512, 256, 4, "cuda", "full")
    with pytest.raises(ValueError, match="precision: expected the precision that runs"):
        plan.exact_bytes(512, 256, 4, "cuda", "auto")
    x = torch.randn(40, 12, generator=torch.Generator().manual_seed(0))
    opts = SSCOptions(n_clusters=3).checked()
    assert plan.make_plan(x.shape, x.device, opts).precision == "full"
    monkeypatch.setattr(products, "native_fp16x3", lambda device: device is not None)
    assert products.resolve_precision("auto", "cuda") == "fp16x3"
    # ... and with it "native", the fast solver's plan runs fp16x3, its parts counted
    assert plan.make_plan(x.shape, x.device, opts).precision == "fp16x3"
    assert plan.exact_bytes(512, 256, 4, "cuda", "fp16x3") > full
    for other in (dict(dtype=torch.float64), dict(solver="faithful")):
        assert (
            plan.make_plan(x.shape, x.device, SSCOptions(n_clusters=3, **other).checked()).precision
            == "full"
        )
    assert plan.check_precision("auto", **ok) == "fp16x3"
    assert plan.check_precision("auto", **{**ok, "device": None}) == "full"
    for kw in (dict(fast=False), dict(work=torch.float64), dict(blocked=True),
               dict(backend="cupy")):  # fmt: skip
        assert plan.check_precision("auto", **{**ok, **kw}) == "full"
        with pytest.raises(ValueError, match="precision='fp16x3'"):
            plan.check_precision("fp16x3", **{**ok, **kw})
    # the options keep "auto" (resolved where the device is known), so cache keys say so
    assert SSCOptions(precision="auto").precision == "auto"


def test_auto_runs_fp16x3_where_native(monkeypatch):
    """With "native" faked on this CPU, "auto" runs the split products (the emulation
    here) and gives fp16x3's scores, not float32's."""
    from videoanchor.anchor import products

    x = tokens(120, 48, k=4, seed=8)
    split = compute_anchor_scores(x, 4, progress=False, precision="fp16x3")
    full = compute_anchor_scores(x, 4, progress=False, solver="fast")
    assert not torch.equal(full.scores, split.scores)  # the two precisions differ here
    monkeypatch.setattr(products, "native_fp16x3", lambda device: True)
    auto = compute_anchor_scores(x, 4, progress=False, solver="fast")
    torch.testing.assert_close(auto.scores, split.scores, rtol=0, atol=0)


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(solver="faithful"), "solver 'fast' or 'auto' \\(got 'faithful'\\)"),
        (dict(dtype=torch.float64), "dtype float32 \\(got torch.float64\\)"),
        (dict(backend="cupy"), "backend 'torch' or 'auto'"),
        (dict(mode="blocked"), "mode 'exact' or 'auto'"),
    ],
)
def test_fp16x3_where_it_cannot_run_is_refused_up_front(kw, match):
    x = tokens(40, 16, seed=2)
    with pytest.raises(ValueError, match="precision='fp16x3' .*" + match):
        compute_anchor_scores(x, 4, progress=False, precision="fp16x3", **kw)


def test_bad_precision_values():
    x = tokens(40, 16, seed=2)
    with pytest.raises(ValueError, match="precision: expected one of .*got 'tf32'"):
        compute_anchor_scores(x, 4, progress=False, precision="tf32")
    with pytest.raises(ValueError, match="precision='fp16x3' .*the fast solver"):
        solve_ssc_admm(x, precision="fp16x3", progress=False)  # the faithful iteration
    with pytest.raises(ValueError, match="precision: expected one of"):
        solve_ssc_admm(x, precision=None, progress=False)


def test_auto_mode_that_needs_blocked_refuses_fp16x3(monkeypatch):
    from videoanchor.anchor import plan

    monkeypatch.setattr(plan, "exact_fits", lambda *a, **k: False)
    x = tokens(40, 16, seed=2)
    with pytest.raises(ValueError, match="these 40 tokens need blocked mode"):
        compute_anchor_scores(x, 4, progress=False, precision="fp16x3")


def test_configure_and_the_command_line_take_the_precision():
    from videoanchor.cli import build_parser
    from videoanchor.integrations.options import AnchorConfig, ssc_kwargs, validate_ssc_options

    cfg = AnchorConfig(ssc_precision="fp16x3")
    validate_ssc_options(cfg)
    assert ssc_kwargs(cfg)["precision"] == "fp16x3"
    with pytest.raises(ValueError, match="precision='fp16x3'"):
        validate_ssc_options(AnchorConfig(ssc_precision="fp16x3", ssc_solver="faithful"))
    run = build_parser()._subparsers._group_actions[0].choices["run"]
    args = run.parse_args(["--video", "v.mp4", "--question", "q", "--ssc-precision", "fp16x3"])
    assert args.ssc_precision == "fp16x3"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_auto_precision_is_fp16x3():
    """On CUDA the fast solver's precision "auto" is fp16x3, to the bit; the default solver
    ("auto") runs the working sets there, in float64 (precision does not apply to them)."""
    from videoanchor.anchor import products

    x = tokens(120, 48, k=4, seed=8).cuda()
    assert products.native_fp16x3(x.device)
    auto = compute_anchor_scores(x, 4, progress=False, solver="fast")
    split = compute_anchor_scores(x, 4, progress=False, solver="fast", precision="fp16x3")
    assert auto.solver == split.solver == "fast"
    torch.testing.assert_close(auto.scores, split.scores, rtol=0, atol=0)
    default = compute_anchor_scores(x, 4, progress=False)
    assert default.solver == "workset" and default.strategy.startswith("workset_cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_fp16x3_runs_on_tensor_cores_and_matches_the_cpu_emulation():
    """On CUDA the split product is torch.mm(..., out_dtype=float32) on float16 parts; the CPU
    emulation computes the same exact partial products (only the float32 summation order
    differs)."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(300, 257, generator=g), torch.randn(257, 190, generator=g)
    p = Products("fp16x3")
    cpu = p.mm(a, b)
    gpu = p.mm(a.cuda(), b.cuda())
    assert gpu.dtype == torch.float32 and gpu.is_cuda
    assert _rel(gpu.cpu(), cpu.double()) < 1e-6
    x = tokens(256, 96, k=4, seed=3)
    ref = compute_anchor_scores(x.cuda(), 4, progress=False, solver="fast", precision="full")
    got = compute_anchor_scores(x.cuda(), 4, progress=False, solver="fast", precision="fp16x3")
    assert bool((got.labels == ref.labels).all())
    assert float((got.scores - ref.scores).abs().max()) < 1e-3


def test_fp16x3_memory_is_counted_before_the_solve(monkeypatch):
    """The float16 parts are in the dense solver's memory need: a budget that fits the
    float32 solver but not the split refuses fp16x3 with SSCMemoryError before any work."""
    from videoanchor.anchor import plan
    from videoanchor.anchor.plan import admm_bytes, split_bytes

    n, d = 97, 61
    full = admm_bytes(n, d, 4, "dense")
    assert admm_bytes(n, d, 4, "dense", "fp16x3", cuda=True) == full + split_bytes(n, d, cuda=True)
    assert split_bytes(n, d, cuda=False) > split_bytes(n, d, cuda=True) > 0
    assert admm_bytes(n, d, 4, "dense", "auto") == full
    budget = full + split_bytes(n, d, cuda=False) // 2
    monkeypatch.setattr(plan, "free_memory_bytes", lambda device: budget)
    x = tokens(n, d, k=4, seed=5)
    solve_ssc_admm(x, scheduled=True, progress=False)  # float32 fits
    with pytest.raises(plan.SSCMemoryError, match="N = 97 tokens"):
        solve_ssc_admm(x, scheduled=True, progress=False, precision="fp16x3")
