"""videoanchor.anchor.solvers.workset_cuda: the GPU working sets' pass loop (issue 90 steps 2
and 4), checked without a GPU: in Triton's interpreter (conftest sets TRITON_INTERPRET=1
without CUDA) against the Numba working sets' certified minimiser, with the column kernel
(tests/test_column_kernel.py checks it alone) or its float64 torch stand-in
(tests/workset_reference.py), and their host reads and operators counted per pass and per
call."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import interpreter_calls
import pytest
import torch
import workset_reference

from benchmarks.common import video_tokens
from videoanchor.anchor import plan
from videoanchor.anchor.program import duality_gaps
from videoanchor.anchor.solvers import workset_cuda as wc
from videoanchor.anchor.solvers.workset import solve_ssc_workset

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True, scope="module")
def quick_calls():
    """Triton's interpreter without its repeated patching at each device call
    (tests/interpreter_calls.py; the kernel calls its helpers thousands of times a launch):
    the interpreted tests here take less than half the time, and compute the same
    (test_the_interpreter_shim_computes_the_same). Yields a context manager under which the
    interpreter runs as it came; None where it does not interpret or the shim cannot apply."""
    if os.environ.get("TRITON_INTERPRET") != "1" or interpreter_calls.unavailable_reason():
        yield None
        return
    with interpreter_calls.quick_device_calls() as as_it_came:
        yield as_it_came


def _check(x, alpha_e, out, gap=1e-6, close=1e-7):
    ref = solve_ssc_workset(x.double(), alpha_e=alpha_e)
    g = duality_gaps(x.double(), out["coef"], out["lambda_e"], out["lambda_z"])
    assert out["converged"] and g.max_gap < gap and g.affine < 1e-10
    assert float(out["coef"].diagonal().abs().max()) == 0.0
    assert float((out["coef"] - ref.coef).abs().max()) < close
    return ref


@pytest.fixture
def reference_kernel(monkeypatch):
    """The column kernel replaced by the tests' float64 torch stand-in
    (tests/workset_reference.py: the same contract, fast at these sizes, where the
    interpreted kernel takes minutes a solve): what these tests check is the pass loop."""
    monkeypatch.setattr(wc, "launch", workset_reference.launch)


def test_the_kernel_and_the_passes_reach_the_certified_minimiser():
    """The column kernel itself (interpreted) under the pass loop: N = 16, D = 12, float32
    passes, then float64; the Numba working sets' certified minimiser; the passes' host
    reads: one a round of passes, none inside one."""
    x = video_tokens(2, 8, 12, k=2, seed=1)
    out = wc.solve_workset_cuda(x, slots=(16,), outlier_slots=(8,), max_inner=300)
    _check(x, 800.0, out)
    assert out["reads"].count("round") <= -(-out["replayed"] // wc.ROUNDS[-1])
    assert 0 < out["passes"] <= out["replayed"] and out["active"] <= out["passes"] * 16


def test_video_like_tokens_reach_the_certified_minimiser(reference_kernel):
    """N = 40 (odd sets of slots in use), D = 16: float32 passes, then float64; the active
    columns shrink pass by pass (their sum below passes x N)."""
    x = video_tokens(4, 10, 16, k=4, seed=0)
    out = wc.solve_workset_cuda(x, slots=(32,), outlier_slots=(16,), max_inner=300)
    _check(x, 800.0, out, close=1e-9)
    assert out["active"] < out["passes"] * x.shape[0]


def test_outlier_entries_join_at_once_and_are_solved(reference_kernel, monkeypatch):
    """A small alpha_e: the minimiser holds several outlier entries per column; every
    violating entry joins in the pass that sees it (outside ``grow``): after the first pass
    with joiners some column holds more outlier slots than the rule's ``grow_max``. Its objective, C
    and E to the certified minimiser's."""
    from benchmarks.common import objective

    x = video_tokens(3, 8, 24, k=3, seed=2)
    monkeypatch.setattr(plan, "PASS_RULE", plan.PassRule(2, 4))  # (the CPU's reference too)
    held = []
    saved = wc._pass

    def recorded(state, cap, **kw):
        saved(state, cap, **kw)
        held.append(int((state["eids"] >= 0).sum(dim=1).max()))

    monkeypatch.setattr(wc, "_pass", recorded)
    out = wc.solve_workset_cuda(x, alpha_e=10.0, slots=(32,), outlier_slots=(64,),
                                max_inner=300)  # fmt: skip
    ref = solve_ssc_workset(x.double(), alpha_e=10.0)
    assert int((ref.outliers != 0).sum(dim=0).min()) >= 5  # the case holds outlier entries
    assert held[0] > plan.PASS_RULE.grow_max
    assert out["converged"]
    want = objective(x, ref.coef, ref.lambda_e, ref.lambda_z)
    got = objective(x, out["coef"], out["lambda_e"], out["lambda_z"])
    assert abs(got - want) <= 1e-12 * abs(want)
    assert float((out["coef"] - ref.coef).abs().max()) < 1e-7
    assert float((out["outliers"] - ref.outliers).abs().max()) < 1e-7


def test_the_passes_screen_in_float64_where_the_device_multiplies_it_fast(
        reference_kernel, monkeypatch):  # fmt: skip
    """Issue 98 item 4: ``precision="auto"`` (the default) screens in float64 on the CUDA
    devices with fast float64 products (sm_80, sm_90, sm_100) and in float32 elsewhere
    (other CUDA devices, ROCm's, the CPU); in float64 every pass is a float64 one (none over every
    column to certify), in float32 the passes start in float32 and end in float64; both
    reach the certified minimiser."""
    assert wc.screening("cpu") == "float32"
    cc = {"name": "NVIDIA H100 80GB HBM3"}
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: cc["now"])
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: cc["name"])
    for cc["now"], want in (((8, 0), "float64"), ((9, 0), "float64"), ((10, 0), "float64"),
                            ((8, 6), "float32"), ((8, 9), "float32"), ((10, 3), "float32"),
                            ((12, 0), "float32"), ((7, 0), "float32")):  # fmt: skip
        assert wc.screening(torch.device("cuda", 0)) == want, cc["now"]
    # (sm_90's export parts, float64 cut to about 1 TFLOPS; the H200 is not the H20)
    cc["now"] = (9, 0)
    for cc["name"], want in (("NVIDIA H800", "float32"), ("NVIDIA H20", "float32"),
                             ("NVIDIA H20-3e", "float32"), ("NVIDIA H200", "float64"),
                             ("NVIDIA H800 PCIe", "float32"), ("NVIDIA GH200 480GB", "float64")):  # fmt: skip
        assert wc.screening(torch.device("cuda", 0)) == want, cc["name"]
    # (ROCm: the device type is "cuda" and an MI200, like a Vega 10, reports (9, 0))
    cc["name"] = "AMD Instinct MI250X"
    monkeypatch.setattr(torch.version, "hip", "6.2.41133")
    assert wc.screening(torch.device("cuda", 0)) == "float32"
    monkeypatch.setattr(torch.version, "hip", None)
    assert wc.screening(torch.device("cuda", 0)) == "float64"  # (the same numbers, NVIDIA's)
    x = video_tokens(4, 10, 16, k=4, seed=0)
    passes, run = [], wc._pass

    def recorded(state, cap, *, exact, last):
        passes.append(exact)
        return run(state, cap, exact=exact, last=last)

    monkeypatch.setattr(wc, "_pass", recorded)
    kw = dict(slots=(32,), outlier_slots=(16,), max_inner=300)
    for device_says in ("float32", "float64"):
        monkeypatch.setattr(wc, "screening", lambda device, says=device_says: says)
        passes.clear()
        out = wc.solve_workset_cuda(x, **kw)
        _check(x, 800.0, out, close=1e-9)
        if device_says == "float64":
            assert all(passes), passes
        else:
            assert not passes[0] and passes[-1], passes
        passes.clear()  # (the stand-in's lstsq (MKL) moves in the 12th digit run to run)
        _same_answer(x, wc.solve_workset_cuda(x, precision=device_says, **kw), out)
        assert passes[0] == (device_says == "float64")


def test_both_routes_read_the_one_pass_rule(reference_kernel, monkeypatch):
    """Issue 101: the CPU's kernel and the GPU's passes take who joins a pass from one object,
    ``plan.PASS_RULE``, read when they run: a changed rule changes what both do (the GPU's
    joins get its numbers; the CPU's kernel its ``cpu_grow0`` and ``cpu_grow_max``,
    with more passes at 1 a pass than at the default's 16), and each reaches the same
    minimiser."""
    from videoanchor.anchor.solvers import _pass_kernel
    from videoanchor.anchor.solvers import workset as ws

    x = video_tokens(3, 8, 24, k=3, seed=2)
    default = solve_ssc_workset(x.double(), alpha_e=10.0)
    rule = plan.PASS_RULE
    assert ws._grows(None) == (rule.cpu_grow0, rule.cpu_grow_max) == (16, 16)
    assert [rule.grow(p) for p in (1, 2, 3, 4, 40)] == [256, 512, 1024, 1024, 1024]
    assert [rule.grow(p, cpu=True) for p in (1, 2, 40)] == [16, 16, 16]
    monkeypatch.setattr(plan, "PASS_RULE", plan.PassRule(1, 2, 1, 1))
    assert ws._grows(None) == (1, 1)
    seen, joins = set(), _pass_kernel.joins

    def recorded(*args, **kw):
        seen.add((kw["grow0"], kw["grow_max"]))
        return joins(*args, **kw)

    monkeypatch.setattr(_pass_kernel, "joins", recorded)
    out = wc.solve_workset_cuda(x, alpha_e=10.0, slots=(32,), outlier_slots=(64,),
                                max_inner=300)  # fmt: skip
    assert seen == {(1, 2)} and out["converged"]
    cpu = solve_ssc_workset(x.double(), alpha_e=10.0)
    assert cpu.converged and cpu.iterations > default.iterations
    assert float((cpu.coef - default.coef).abs().max()) < 1e-8
    assert float((out["coef"] - default.coef).abs().max()) < 1e-7
    with pytest.raises(ValueError, match="grow_max >= grow0"):
        plan.PassRule(16, 8)
    with pytest.raises(ValueError, match="cpu_grow_max >= cpu_grow0"):
        plan.PassRule(cpu_grow0=32)


def test_slot_overflow_takes_the_second_level_and_then_the_fallback(reference_kernel):
    """With 4 coefficient slots a column's support fills them: it is set aside and continues
    with 16 (the same minimiser, ``wide_columns`` counts it); with 4 alone it is reported as
    overflow, not converged. Where more than ``wide_share`` of the columns fill the first
    level, ``C`` is dense: the level stops in the round that saw it, the wide one never
    runs."""
    x = video_tokens(2, 8, 12, k=2, seed=1)
    out = wc.solve_workset_cuda(x, slots=(4, 16), outlier_slots=(8, 8), max_inner=300,
                                wide_share=1.0)  # fmt: skip
    assert out["wide_columns"] > 0 and out["overflow"] == 0 and out["dense"] is None
    _check(x, 800.0, out, close=1e-9)
    share = out["wide_columns"] / x.shape[0] / 2
    dense = wc.solve_workset_cuda(x, slots=(4, 32), outlier_slots=(8, 8), max_inner=300,
                                  wide_share=share)  # fmt: skip
    assert "columns filled the first level's slots" in dense["dense"] and not dense["converged"]
    assert dense["overflow"] > share * x.shape[0] and dense["passes"] < out["passes"]
    small = wc.solve_workset_cuda(x, slots=(4,), outlier_slots=(8,), max_inner=300)
    assert small["overflow"] > 0 and not small["converged"]


def test_a_support_past_the_levels_positions_takes_the_next_level(reference_kernel, monkeypatch):
    """Slots wider than the kernel's support positions (``SUPPORT`` 2 at the first level): a
    column whose support would pass them stops (``FULL``), is set aside by the joins and is
    finished at the next level, to the same minimiser; with that level alone it is reported
    as overflow, not converged."""
    monkeypatch.setattr(wc, "SUPPORT", (2, 16))
    x = video_tokens(2, 8, 12, k=2, seed=1)
    out = wc.solve_workset_cuda(x, slots=(16, 32), outlier_slots=(8, 8), max_inner=300,
                                wide_share=1.0)  # fmt: skip
    assert out["wide_columns"] > 0 and out["overflow"] == 0 and out["dense"] is None
    _check(x, 800.0, out, close=1e-9)
    small = wc.solve_workset_cuda(x, slots=(16,), outlier_slots=(8,), max_inner=300)
    assert small["overflow"] > 0 and not small["converged"]


def test_a_pass_reads_nothing_and_a_call_reads_four_times(reference_kernel, monkeypatch):
    """A pass (the kernel, the residuals, the GEMM, the violations, topk, the joins, the
    next active list) makes no host read and runs the same 15 or fewer kernels (torch
    operators that launch work and Triton launches) whatever its active columns; a call
    reads the lambdas, the dense screen, and once a round of passes (two rounds here: float32,
    then float64). Counted on CPU tensors (benchmarks/bench_workset_cuda.py: Counter), the
    kernel stand-in's own reads aside."""
    from benchmarks.bench_workset_cuda import Counter, counting

    x = video_tokens(2, 8, 12, k=2, seed=1)
    with Counter() as call:
        counting(monkeypatch.setattr, call)
        out = wc.solve_workset_cuda(x, slots=(16,), outlier_slots=(8,), max_inner=300)
    assert out["reads"] == ["lambdas", "dense", "round", "round"]
    # (ssc_lambdas' one copy, the screen's bool, two rounds, and the features' finiteness
    # test, which the entry point's checked features skip: run_workset_cuda's call)
    assert len(call.reads) == 5, call.reads
    with Counter() as checked:
        counting(monkeypatch.setattr, checked)
        wc.solve_workset_cuda(x, slots=(16,), outlier_slots=(8,), max_inner=300, checked=True)
    assert len(checked.reads) == 4, checked.reads
    X = x.double()
    n, d = X.shape
    program = wc._program(X, X @ X.T, out["lambda_e"], out["lambda_z"], tol=1e-9, max_inner=300)
    kernels = []
    for count in (n, 3, 0):
        state = wc._state(program, torch.arange(n), torch.full((n, 16), -1, dtype=torch.int32),
                          torch.zeros(n, 16, dtype=torch.float64),
                          torch.full((n, 8), -1, dtype=torch.int32),
                          torch.zeros(n, 8, dtype=torch.float64))  # fmt: skip
        state["ids"][:, 0] = (torch.arange(n, dtype=torch.int32) + 1) % n
        state["z"][:, 0] = 1.0
        state["count"].fill_(count)
        state["kcount"].fill_(count)
        before = {k: v.clone() for k, v in state.items() if isinstance(v, torch.Tensor)}
        with Counter() as one:
            counting(monkeypatch.setattr, one)
            wc._pass(state, n, exact=count == 3, last=False)
        assert one.reads == [], one.reads
        kernels.append(one.summary()["kernels"])
        if count == 0:  # a pass with no active column changes nothing but its counters
            for k, v in before.items():
                assert torch.equal(state[k], v), k
    assert kernels[0] == kernels[1] == kernels[2] <= 15, kernels


def test_the_fused_pass_is_the_torch_passs(reference_kernel):
    """The pass's Triton kernels (violations, joins: ``workset_cuda._pass``) against the
    same pass in torch operators (tests/workset_reference.py: torch_pass): the same slots,
    columns set aside, steps, counters and next active list, pass after pass (float32, then
    float64), with outlier entries joining."""
    x = video_tokens(3, 8, 24, k=3, seed=2)
    X = x.double()
    n = X.shape[0]
    G = X @ X.T
    lam_e, lam_z, _, _ = wc.ssc_lambdas(X, 10.0, 800.0)
    program = wc._program(X, G, lam_e, lam_z, tol=1e-9, max_inner=300)
    ids = torch.full((n, 16), -1, dtype=torch.int32)
    z = torch.zeros(n, 16, dtype=torch.float64)
    ids[:, 0], z[:, 0] = wc.nearest_points(G).to(torch.int32), 1.0
    # (8 support positions: some columns end FULL and are set aside by both)
    state = wc._state(program, torch.arange(n), ids, z, torch.full((n, 32), -1, dtype=torch.int32),
                      torch.zeros(n, 32, dtype=torch.float64), 8)  # fmt: skip
    joined = 0
    for exact in (False, False, True):
        fused = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in state.items()}
        plain = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in state.items()}
        wc._pass(fused, n, exact=exact, last=False)
        workset_reference.torch_pass(plain, n, exact=exact, last=False)
        keys = "ids eids aside joined steps count kcount passes active_sum".split()
        for key in keys:
            assert torch.equal(fused[key], plain[key]), (key, exact)
        count = int(fused["count"][0])
        assert torch.equal(fused["active"][:count], plain["active"][:count])
        # (the kernel stand-in's float64 runs: rounding apart, 1.3e-12 in the float64 pass
        # on this AMD CPU, where the slots, steps and counters above are equal)
        assert float((fused["z"] - plain["z"]).abs().max()) < 1e-10
        joined = max(joined, int((fused["eids"] >= 0).sum(dim=1).max()))
        state = fused
    assert joined > 1 and int(state["passes"]) == 3
    assert int(state["aside"].sum()) > 0 and bool((state["status"] == wc.FULL).any())


def test_the_residuals_are_each_columns_from_its_slots():
    """The pass's gather (``_pass_kernel``, interpreted): row p of R is
    ``y_i - Y c_i - e_i`` of the column at ``active[p]``, from its slots (holes anywhere,
    zeros in the working set), float64 and float32; rows past ``count`` zero; R poisoned
    with NaN before."""
    from videoanchor.anchor.solvers import _pass_kernel

    g = torch.Generator().manual_seed(3)
    n, d, M, ME = 9, 300, 8, 5  # (D over two blocks)
    X = torch.randn(n, d, generator=g, dtype=torch.float64)
    ids = torch.randint(-1, n, (n, M), generator=g, dtype=torch.int32)
    z = torch.randn(n, M, generator=g, dtype=torch.float64) * (torch.rand(n, M, generator=g) > 0.3)
    eids = torch.randint(-1, d, (n, ME), generator=g, dtype=torch.int32)
    ze = torch.randn(n, ME, generator=g, dtype=torch.float64)
    ze[eids < 0] = 0.0
    z[ids < 0] = 0.0
    cols = torch.randperm(n, generator=g)
    active = torch.randperm(n, generator=g).to(torch.int32)
    count = torch.tensor([6], dtype=torch.int32)
    for dt, close in ((torch.float64, 1e-12), (torch.float32, 1e-5)):
        R = torch.full((7, d), float("nan"), dtype=dt)
        VE = torch.full((7, d), float("nan"), dtype=dt)
        scalars = torch.tensor([1.0, 1.0, 0.0, 1e-9, 1e-10, 1e-5, 2.5], dtype=torch.float64)
        _pass_kernel.residuals(X, cols, ids, z, eids, ze, active[:7], count, R, VE, scalars)
        assert torch.isneginf(VE[6:]).all()
        for p in range(7):
            k = int(active[p])
            want = torch.zeros(d, dtype=torch.float64)
            if p < 6:
                want = X[cols[k]].clone()
                for j, c in zip(ids[k].tolist(), z[k].tolist(), strict=True):
                    want -= c * X[j] if j >= 0 else 0.0
                for o, v in zip(eids[k].tolist(), ze[k].tolist(), strict=True):
                    if o >= 0:
                        want[o] -= v
            assert float((R[p].double() - want).abs().max()) < close * float(want.abs().max() + 1)
            if p < 6:  # the outlier entries' violations, the support's at -inf
                on = [o for o, v in zip(eids[k].tolist(), ze[k].tolist(), strict=True) if v != 0]
                ve = R[p].double().abs() * 2.5 - 1.0
                ve[on] = -float("inf")
                assert torch.equal(VE[p].double(), ve.to(dt).double()), p


def test_dense_sets_are_told_apart_before_any_pass():
    """The dense screen at the real shapes (its inputs only: the lambdas and the nearest
    points, no pass): bench_request_cost's synthetic cost set (N = 2048, D = 3584) is dense,
    video-like tokens of 16 frames at Qwen2.5-VL-7B's shapes are not; nor a tiny video-like
    set, while a tiny synthetic one is."""
    from benchmarks.common import synthetic_tokens
    from videoanchor.anchor.program import gram_row_max, nearest_points, ssc_lambdas

    def dense(x, slots=wc.DENSE_ENTRIES):
        X = x.double()
        G = X @ X.T
        lam_e, lam_z, _, _ = ssc_lambdas(X, 800.0, 800.0, row_max=gram_row_max(X, gram=G))
        return bool(wc.dense_at_start(X, nearest_points(G), lam_e, lam_z, slots))

    assert dense(synthetic_tokens(2048, 3584, seed=16))
    assert not dense(video_tokens(16, 128, 3584, k=8, seed=0))
    assert dense(synthetic_tokens(128, 256, seed=4))
    assert not dense(video_tokens(4, 32, 256, k=2, seed=0), slots=4)


def test_dense_c_takes_the_fast_answer_at_once(monkeypatch):
    """Where the screen finds ``C`` dense, the route runs no pass: the fast solver's answer,
    ``solver="fast"``, one warning saying so with its gap, in about the fast solver's time."""
    import time
    import warnings

    from benchmarks.common import synthetic_tokens
    from videoanchor.anchor.plan import Plan

    def no_kernel(*a, **k):
        raise AssertionError("the kernel ran on a dense set")

    monkeypatch.setattr(wc, "launch", no_kernel)
    x = synthetic_tokens(128, 256, seed=4)
    fast_plan = Plan(mode="exact", solver="fast", backend="torch", device=x.device,
                     work=torch.float32, route="admm", strategy="dense")  # fmt: skip
    plan = Plan(mode="exact", solver="workset", backend="torch", device=x.device,
                work=torch.float32, fallback=fast_plan)  # fmt: skip
    kw = dict(alpha_e=800.0, alpha_z=800.0, rho=0.1, eps=1e-4, max_iter=60, progress=False)
    # (CPU seconds of this process, not the clock's: this module compiles in a child process
    # on the other core while it runs, and the machine may be shared)
    t = time.process_time()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = wc.run_workset_cuda(x, plan, **kw)
    took = time.process_time() - t
    msgs = [str(w.message) for w in caught]
    assert len(msgs) == 1 and "C is dense here" in msgs[0] and "duality gap" in msgs[0]
    assert res.solver == "fast" and res.gap > wc.CERTIFIED and res.coef.shape == (128, 128)
    assert res.history["workset_cuda"]["passes"] == 0
    assert res.history["workset_cuda"]["host_reads"] == 2  # (the lambdas' copy, the screen)
    t = time.process_time()
    wc.run_admm(x, fast_plan, **kw)
    assert took < 2.0 * (time.process_time() - t) + 0.5  # (the screen is a few vector ops)


def test_warm_up_launches_every_level_over_no_columns(monkeypatch):
    """warm_up runs a pass per level and precision over one column with none active: the
    kernel and the residuals launched (in the interpreter here: nothing to compile; on CUDA
    the launch compiles them into Triton's cache), nothing solved."""
    launched = []
    saved = wc.launch
    monkeypatch.setattr(wc, "launch", lambda s, a, c: launched.append(s["ids"].shape[1])
                        or saved(s, a, c))  # fmt: skip
    took = wc.warm_up("cpu", slots=(4, 32), outlier_slots=(8, 16))
    assert list(took) == [4, 32] and all(t >= 0 for t in took.values())
    assert launched == [4, 4, 32, 32]
    with pytest.raises(ValueError, match="slots: expected non-decreasing slot counts from"):
        wc.warm_up("cpu", slots=(32, 4))


def _variants(monkeypatch, run_column_kernel: bool) -> list:
    """The Triton launches of the working sets recorded with their compiled variants
    (tests/triton_variants.py); the column kernel's recorded and, unless
    ``run_column_kernel``, not run (the tests' stand-in solves the columns instead)."""
    import triton_variants

    from videoanchor.anchor.solvers import _column_kernel, _pass_kernel

    seen = triton_variants.record(monkeypatch, _pass_kernel,
                                  ("_residual_kernel", "_violations_kernel", "_joins_kernel"))  # fmt: skip
    triton_variants.record(monkeypatch, _column_kernel, ("_column_kernel",),
                           run=run_column_kernel, seen=seen)  # fmt: skip
    if not run_column_kernel:
        monkeypatch.setattr(wc, "launch", lambda s, a, c: _column_kernel.launch(s, a, c)
                            or workset_reference.launch(s, a, c))  # fmt: skip
    return seen


def test_warm_up_compiles_the_variants_a_solve_launches(monkeypatch):
    """Issue 98 defect 1: the compiled variants (Triton's cache keys for sm_90: each
    argument's type and attributes, the constexprs, the options) that a solve reaching both
    levels of slots launches are those warm_up launches, every kernel. Before the fix the
    joins kernel's ``KP`` was 1 in the warm-up (its one column), 4 and 16 in the solve."""
    x = video_tokens(2, 8, 12, k=2, seed=1)
    kw = dict(slots=(4, 16), outlier_slots=(8, 8))
    warm = _variants(monkeypatch, run_column_kernel=True)
    wc.warm_up("cpu", **kw)
    monkeypatch.undo()
    solve = _variants(monkeypatch, run_column_kernel=False)
    out = wc.solve_workset_cuda(x, max_inner=300, wide_share=1.0, **kw)
    assert out["wide_columns"] > 0, out["wide_columns"]  # (both levels ran)
    names = {name for name, _ in solve}
    assert names == {"_residual_kernel", "_violations_kernel", "_joins_kernel",
                     "_column_kernel"}, names  # fmt: skip
    missing = set(solve) - set(warm)
    sizes = ("M", "MEP", "KP", "BR", "BE", "exact", "last")
    assert not missing, sorted({(n, tuple((a, s[1]) for a, s in k if a in sizes))
                                for n, k in missing})  # fmt: skip


def test_the_kernels_scalars_are_float64_when_compiled(monkeypatch):
    """Issue 98 defect 4: no float argument of a launched kernel is typed float32 as compiled
    Triton types it (a Python float is; the interpreter keeps float64, so no CPU value can
    show it): the floats come from the program's float64 ``scalars`` on the device."""
    import triton_variants

    seen = _variants(monkeypatch, run_column_kernel=False)
    wc.solve_workset_cuda(video_tokens(2, 8, 12, k=2, seed=1), slots=(16,), outlier_slots=(8,),
                          max_inner=300)  # fmt: skip
    types = triton_variants.scalar_types(seen)
    assert {name for name, _ in seen} >= {"_residual_kernel", "_violations_kernel",
                                          "_joins_kernel", "_column_kernel"}  # fmt: skip
    floats = {t for t in types if t[2].startswith(("fp", "bf"))}
    assert all(t[2] == "fp64" for t in floats), sorted(floats)


def test_the_warmup_command_compiles_the_cuda_kernel_where_cuda_is(monkeypatch, capsys):
    """``videoanchor warmup`` on a machine with CUDA warms the GPU working sets' kernel up
    too, at every level of slots (the device stood in for: no GPU here)."""
    from types import SimpleNamespace

    from videoanchor import cli

    calls = []
    monkeypatch.setattr(wc, "warm_up", lambda device: calls.append(device) or {128: 1.0, 512: 2.0})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cli.cmd_warmup(SimpleNamespace()) == 0
    assert calls == [] and "CUDA" not in capsys.readouterr().out
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert cli.cmd_warmup(SimpleNamespace()) == 0
    assert calls == [torch.device("cuda")]
    assert "CUDA working-set kernel (slots 128, 512)" in capsys.readouterr().out


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_warm_up_compiles_what_a_solve_runs(tmp_path):
    """After warm_up in an empty Triton cache, a solve that reaches both levels of slots
    compiles nothing more (the cache's files are the same)."""
    code = (
        "import os, sys, torch\n"
        "from benchmarks.common import video_tokens\n"
        "from videoanchor.anchor.solvers import workset_cuda as wc\n"
        "wc.warm_up(torch.device('cuda'), slots=(4, 16), outlier_slots=(8, 8))\n"
        "files = lambda: sorted(os.path.relpath(os.path.join(r, f), sys.argv[1])\n"
        "                       for r, _, fs in os.walk(sys.argv[1]) for f in fs)\n"
        "before = files()\n"
        "x = video_tokens(2, 8, 12, k=2, seed=1).cuda()\n"
        "out = wc.solve_workset_cuda(x, slots=(4, 16), outlier_slots=(8, 8), max_inner=300,\n"
        "                            wide_share=1.0)\n"
        "assert out['wide_columns'] > 0, out['wide_columns']\n"
        "assert files() == before, set(files()) - set(before)\n"
    )
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, TRITON_CACHE_DIR=str(tmp_path), PYTHONPATH=path)
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True,
                          text=True, env=env, cwd=str(ROOT), timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_bad_input_is_refused_saying_what_was_expected():
    with pytest.raises(ValueError, match="slots: expected non-decreasing slot counts from"):
        wc.solve_workset_cuda(torch.randn(6, 4), slots=(24,))
    with pytest.raises(ValueError, match="outlier_slots: expected one count per level"):
        wc.solve_workset_cuda(torch.randn(6, 4), slots=(4, 8), outlier_slots=(8,))
    with pytest.raises(ValueError, match="at least 2 points"):
        wc.solve_workset_cuda(torch.randn(1, 4))
    with pytest.raises(ValueError, match="precision"):
        wc.solve_workset_cuda(torch.randn(6, 4), precision="bf16")
    with pytest.raises(ValueError, match=r"wide_share: expected a share in \(0, 1\]"):
        wc.solve_workset_cuda(torch.randn(6, 4), wide_share=0.0)
    bad = torch.randn(6, 4)
    bad[2, 1] = float("nan")
    with pytest.raises(ValueError, match="(?i)finite|nan"):
        wc.solve_workset_cuda(bad)


def test_the_route_returns_a_certified_result_or_the_fast_fallback(reference_kernel):
    """``run_workset_cuda`` (the solvers' calling convention): the certified minimiser in
    the plan's dtype, ``strategy`` saying so; where a column outgrows the last level of
    slots, the fast solver's answer with ``solver="fast"`` and a warning."""
    from videoanchor.anchor.plan import Plan

    x = video_tokens(2, 8, 12, k=2, seed=1)
    fast_plan = Plan(mode="exact", solver="fast", backend="torch", device=x.device,
                     work=torch.float32, route="admm")  # fmt: skip
    plan = Plan(mode="exact", solver="workset", backend="torch", device=x.device,
                work=torch.float32, fallback=fast_plan)  # fmt: skip
    kw = dict(alpha_e=800.0, alpha_z=800.0, rho=0.1, eps=1e-4, max_iter=60, progress=False)
    res = wc.run_workset_cuda(x, plan, slots=(32,), outlier_slots=(8,), **kw)
    assert res.strategy == "workset_cuda" and res.converged and res.residual < wc.CERTIFIED
    assert res.coef.dtype == torch.float32 and res.history["overflow"] == 0
    with pytest.warns(UserWarning, match="outgrew 4 slots"):
        fast = wc.run_workset_cuda(x, plan, slots=(4,), outlier_slots=(8,), **kw)
    assert fast.solver == "fast" and fast.history["workset_cuda"]["overflow"] > 0


def test_supports_at_the_rank_reach_the_certified_minimiser():
    """More points than dimensions (N = 24, D = 12, two-dimensional subspaces): supports
    reach the rank and a variable can join and leave at once (kept out until the iterate
    moves, else it would repeat forever). The column kernel itself: the stand-in cycles
    here (300 steps a run, pass after pass)."""
    from benchmarks.common import synthetic_tokens

    x = synthetic_tokens(24, 12, k=3, sub_dim=2, corrupt=0.1, seed=1)
    out = wc.solve_workset_cuda(x, slots=(32,), outlier_slots=(8,), max_inner=300)
    _check(x, 800.0, out, close=1e-9)


def test_the_gpu_benchmark_runs_tiny_on_the_cpu(tmp_path, reference_kernel):
    """bench_workset_cuda --smoke: the default's whole call and the fast solver's on a tiny
    video-like set (the working sets' own record and the yardstick against the minimiser
    there), on the dense synthetic set and on Yale B's faces (the dense-C rule's ratio); the
    synchronisations are counted on CUDA only, the prefill for the models' shapes only."""
    from benchmarks import bench_workset_cuda

    bench_workset_cuda.main(["--smoke", "--out-dir", str(tmp_path)])
    got = json.loads(next(tmp_path.glob("workset_cuda_*.json")).read_text())
    video, dense, yale = got["rows"]
    assert set(got["meta"]["seconds_warm_up"]) == {str(s) for s in wc.SLOTS}
    assert got["meta"]["levels"] == [list(v) for v in zip(wc.SLOTS, wc.OUTLIER_SLOTS, strict=True)]
    assert (video["tokens"], dense["tokens"]) == ("video-like", "synthetic (dense)")
    assert "error" not in video and "error" not in dense, (video, dense)
    assert video["answered"] == "workset" and video["syncs_default"] is None  # (CPU route)
    assert video["passes_workset_cuda"] > 0 and video["steps_max"] > 0
    # issue 98 item 4: each screening's warm call (the CPU's pick: float32)
    assert video["screening"] == "float32"
    assert video["passes_float32"] == video["passes_workset_cuda"]
    assert video["seconds_workset_cuda_float64"] > 0 and video["active_sum_over_n_float64"] > 0
    # (the default's C in float32, the plan's working dtype: the yardstick's tolerances)
    assert abs(video["objective_gap"]) < 1e-6 and video["affine"] < 1e-5
    assert video["objective_gap"] <= video["fast_objective_gap"]
    assert video["seconds_default"] > 0 and video["default_over_fast"] > 0
    # issues 78, 91 and 100: the shares' cost after the solve, on the default's C
    for share in ("paper", "soft", "steady", "expected"):
        assert video[f"seconds_after_solve_{share}"] > 0
    assert video["steady_vs_paper_max"] >= 0 and video["soft_vs_paper_max"] >= 0
    assert video["expected_over_paper_after_solve"] > 0 and video["expected_vs_paper_max"] >= 0
    assert 0.0 <= video["steady_weight"] <= 1.0
    assert dense["dense_rule"] == bench_workset_cuda.DENSE_RULE[dense["answered"]]
    assert len(dense["samples_default"]) == len(dense["samples_fast"]) == 3  # (medians)
    assert dense["seconds_default"] == sorted(dense["samples_default"])[1]
    assert dense["meets_dense_rule"] == (dense["default_over_fast"] <= dense["dense_rule"])
    # issue 76 item 3: the same rule on Yale B's faces, where the file is (else said so)
    assert (yale["tokens"], yale["subjects"]) == ("Yale B faces", 2)
    if bench_workset_cuda.bench_request_cost.YALE.exists():
        assert "error" not in yale and "skipped" not in yale, yale
        assert (yale["n"], yale["d"]) == (2 * bench_workset_cuda.YALE_PER_SUBJECT, 2016)
        assert yale["dense_rule"] == bench_workset_cuda.DENSE_RULE[yale["answered"]]
        assert yale["meets_dense_rule"] == (yale["default_over_fast"] <= yale["dense_rule"])
    else:
        assert yale["skipped"].startswith("Yale B not found"), yale


def test_the_working_sets_are_the_cuda_default(monkeypatch):
    """solver="auto" on a CUDA device plans the GPU working sets (their route and its
    runner), as on the CPU the Numba ones; an iteration option keeps the fast solver. The
    device's memory and tensor cores are stood in for (no GPU here)."""
    from videoanchor.anchor import plan, products
    from videoanchor.anchor.options import SSCOptions
    from videoanchor.anchor.solve import SOLVERS

    monkeypatch.setattr(plan, "free_memory_bytes", lambda device: None)
    monkeypatch.setattr(products, "native_fp16x3", lambda device: True)
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    got = plan.make_plan((512, 256), cuda, SSCOptions().checked())
    assert (got.solver, got.route, got.strategy) == ("workset", "workset_cuda", "workset_cuda")
    assert SOLVERS[got.route] is wc.run
    assert plan.make_plan((512, 256), cpu, SSCOptions().checked()).route == "workset_then_fast"
    fast = plan.make_plan((512, 256), cuda, SSCOptions(max_iter=30).checked())
    assert (fast.solver, fast.route) == ("fast", "admm")


def test_the_ssc_call_of_run_gpu_fits_eight_minutes_and_names_its_steps():
    """run_gpu.sh's CALL=ssc (issue 76): the gpu tests, the default at 16/32/64 frames
    beside the prefill and on the dense set, the cost rows, one ncu of the kernel selected
    by name and launch order; its caps under eight minutes, each step run by a ``want``."""
    script = (ROOT / "benchmarks" / "run_gpu.sh").read_text()
    line = next(x for x in script.splitlines() if x.startswith('SSC="'))
    caps = {s.split(":")[0]: int(s.split(":")[1]) for s in line.split('"')[1].split()}
    assert set(caps) == {"tests", "workset_cuda", "request_cost", "workset_ncu"}
    assert sum(caps.values()) < 480, caps
    for name in caps:
        assert f"want {name}" in script, name
    assert "_column_kernel" in script and "--launch-skip" in script
    # CALL=ssc's frames: 16, 32 and 64 (CALL=first's 16 and 64: tests/test_run_gpu.py)
    assert '--frames "${WORKSET_CUDA_FRAMES:-$WS_FRAMES}"' in script
    assert "WS_FRAMES=16,32,64 " in script


def _counted_solve(x, device, **kw):
    """The call whose host syncs the GPU test counts: the features moved to ``device`` and
    checked before it (their transfer and finiteness read are the entry point's, not the
    solver's: issue 98 defect 2), so that it syncs at its host reads (``out["reads"]``)
    and at the solve's one stream synchronize at the end."""
    xd = x.to(device)
    return lambda: wc.solve_workset_cuda(xd, checked=True, **kw)


def test_the_counted_call_reads_the_host_at_its_reads_alone(reference_kernel, monkeypatch):
    """The sync arithmetic of test_gpu_passes_replay_their_graphs_and_read_once_a_round, on
    CPU tensors: the counted call reads the host exactly ``len(out["reads"])`` times (the
    lambdas, the screen, one a round), nothing for the features' transfer or finiteness;
    on CUDA the solve adds one stream synchronize, hence ``+ 1`` there."""
    from benchmarks.bench_workset_cuda import Counter, counting

    kw = dict(slots=(32,), outlier_slots=(16,), max_inner=300)
    call = _counted_solve(video_tokens(4, 10, 16, k=4, seed=0), torch.device("cpu"), **kw)
    with Counter() as counted:
        counting(monkeypatch.setattr, counted)
        out = call()
    assert len(out["reads"]) >= 3 and len(counted.reads) == len(out["reads"]), (
        counted.reads, out["reads"])  # fmt: skip


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_passes_replay_their_graphs_and_read_once_a_round():
    """On CUDA each pass shape is captured once and replayed, and kept for the next call:
    the same minimiser, and a call whose graphs are kept synchronises at its host reads
    (lambdas, the screen, one a round) and at the end, no more
    (``torch.cuda.set_sync_debug_mode``, bench_workset_cuda._syncs)."""
    from benchmarks.bench_workset_cuda import _syncs

    x = video_tokens(4, 10, 16, k=4, seed=0)
    kw = dict(slots=(32,), outlier_slots=(16,), max_inner=300)
    call = _counted_solve(x, torch.device("cuda"), **kw)
    out = call()  # (captures the pass graphs)
    _check(x, 800.0, {**out, "coef": out["coef"].cpu()})
    captured = wc.GRAPH_COUNTS["captures"]
    syncs = _syncs(call, torch.device("cuda"))
    assert wc.GRAPH_COUNTS["captures"] == captured  # (kept: the second call replays)
    assert syncs <= len(out["reads"]) + 1, (syncs, out["reads"])


class _FakeGraph:
    """A stand-in for a captured pass (tests/test_filter_graphs.py's pattern): ``replay``
    runs the pass again on the same static state, as a replay reads it."""

    def __init__(self, run):
        self.replay = run


def _fake_capture(run, state):
    return _FakeGraph(run)


@pytest.fixture
def fresh_graphs():
    wc.clear_graphs()
    wc.GRAPH_COUNTS.update(captures=0, replays=0)
    yield
    wc.clear_graphs()


def _same_answer(x, a, b):
    """The same passes, the same support, and each column's ``c`` and ``e`` as far apart as
    float64 rounding lets two solves of its restricted system lie
    (:func:`workset_reference.support_spread`; the multipliers are sums of at most
    ``2 (N + D)`` products): the graphs, their replays and the eager passes run the same
    arithmetic, but not always in the same order (a reused workspace, the BLAS's blocking:
    1e-14 to 1e-12 apart on two x86 CPUs at these sizes, issue 97's lesson)."""
    assert a["passes"] == b["passes"] and a["replayed"] == b["replayed"]
    assert torch.equal(a["support"], b["support"])
    X = x.double()
    n, d = X.shape
    lam_z, lam_e = float(a["lambda_z"]), float(a["lambda_e"])
    for i in range(n):
        c, e = a["coef"][:, i], a["outliers"][:, i]
        slack = workset_reference.kkt_rounding(X, i, c, e, lam_z, lam_e, 2 * (n + d))
        dc, de = workset_reference.support_spread(X, c, e, lam_z, slack)
        assert float((c - b["coef"][:, i]).abs().max()) <= dc, (i, dc)
        assert float((e - b["outliers"][:, i]).abs().max()) <= de, (i, de)


def test_pass_graphs_are_captured_once_a_shape_and_kept_across_calls(reference_kernel,
                                                                      fresh_graphs):  # fmt: skip
    """Issue 98 defect 3: the pass graphs (a stand-in capture on the CPU) are captured in the
    first call and replayed by the later calls of the same shape, whose inputs differ: each
    answer is the eager one; a call of another shape has its own workspace; the workspaces
    a device keeps are bounded (least recently used dropped)."""
    kw = dict(slots=(4, 16), outlier_slots=(8, 8), max_inner=300, wide_share=1.0)
    xs = [video_tokens(2, 8, 12, k=2, seed=s) for s in (1, 2, 1)]
    assert len({x.shape for x in xs}) == 1
    captures = []
    for x in xs:
        out = wc.solve_workset_cuda(x, capture=_fake_capture, **kw)
        _same_answer(x, out, wc.solve_workset_cuda(x, **kw))
        captures.append(wc.GRAPH_COUNTS["captures"])
    assert captures[0] > 1 and captures[1] == captures[2], captures  # (the first call's)
    assert wc.GRAPH_COUNTS["replays"] > captures[0]
    assert len(wc._WORKSPACES) == 1
    for extra in range(wc.WORKSPACES + 1):  # other shapes: the oldest is dropped
        wc.solve_workset_cuda(video_tokens(2, 8, 12 + 2 * (extra + 1), k=2, seed=1),
                              capture=_fake_capture, **kw)  # fmt: skip
    assert len(wc._WORKSPACES) == wc.WORKSPACES
    before = wc.GRAPH_COUNTS["captures"]
    wc.solve_workset_cuda(xs[0], capture=_fake_capture, **kw)  # dropped: captured again
    assert wc.GRAPH_COUNTS["captures"] > before


def test_a_failed_capture_or_replay_runs_the_passes_eagerly(reference_kernel, fresh_graphs):
    """A capture that fails (another thread's work, an unsupported operator) or a replay
    that fails: one warning a call, the passes eager, the same answer, nothing kept."""
    x = video_tokens(2, 8, 12, k=2, seed=1)
    kw = dict(slots=(16,), outlier_slots=(8,), max_inner=300)
    eager = wc.solve_workset_cuda(x, **kw)

    def refuse(run, state):
        raise RuntimeError("operation not permitted when stream is capturing")

    with pytest.warns(RuntimeWarning, match="no CUDA graph of the pass") as seen:
        out = wc.solve_workset_cuda(x, capture=refuse, **kw)
    assert len([w for w in seen if "workset_cuda" in str(w.message)]) == 1
    _same_answer(x, out, eager)
    assert not any(st["graphs"] for ws in wc._WORKSPACES.values() for st in ws.levels.values())

    class Broken:
        def replay(self):
            raise RuntimeError("CUDA error: an illegal memory access was encountered")

    with pytest.warns(RuntimeWarning, match="a replay of the pass's CUDA graph failed") as seen:
        out = wc.solve_workset_cuda(x, capture=lambda run, st: Broken(), **kw)
    assert len([w for w in seen if "workset_cuda" in str(w.message)]) == 1
    assert out["converged"]
    _same_answer(x, out, eager)
    assert not any(st["graphs"] for ws in wc._WORKSPACES.values() for st in ws.levels.values())


def test_the_cuda_capture_is_thread_local_in_a_private_pool_without_gc(monkeypatch):
    """The CUDA captures (stood in for: no GPU; the passes' and the Chebyshev filter's, both
    through anchor.graphs.capture) begin in the thread-local mode (other
    threads' syncs and allocations, vLLM's scoring thread, cannot break it) into the
    workspace's own pool (the filter's: a private one), and neither synchronises the device, empties the allocator's
    cache nor collects garbage (``torch.cuda.graph``'s ``__enter__`` does); a failing
    pass ends the capture and raises its own error."""
    import contextlib
    import gc

    calls = []

    class Graph:
        def capture_begin(self, pool=None, capture_error_mode="global"):
            calls.append(("begin", pool, capture_error_mode))

        def capture_end(self):
            calls.append(("end",))

    class Stream:
        def wait_stream(self, other):
            pass

    def forbidden(name):
        def f(*a, **k):
            raise AssertionError(f"{name} called in a capture")

        return f

    monkeypatch.setattr(torch.cuda, "CUDAGraph", Graph)
    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda *a: Stream())
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: "pool-1")
    monkeypatch.setattr(torch.cuda, "graph", forbidden("torch.cuda.graph"))
    for name in ("empty_cache", "synchronize"):
        monkeypatch.setattr(torch.cuda, name, forbidden(f"torch.cuda.{name}"))
    monkeypatch.setattr(gc, "collect", forbidden("gc.collect"))
    ws = wc._Workspace()
    state = {"workspace": ws}
    ran = []
    wc._cuda_capture(lambda: ran.append(1), state)
    wc._cuda_capture(lambda: ran.append(2), state)
    assert ran == [1, 2]
    assert calls == [("begin", "pool-1", "thread_local"), ("end",)] * 2, calls

    def fail():
        raise RuntimeError("boom")

    calls.clear()
    with pytest.raises(RuntimeError, match="boom"):
        wc._cuda_capture(fail, state)
    assert calls == [("begin", "pool-1", "thread_local"), ("end",)]
    # the Chebyshev filter's graphs capture the same way (anchor.graphs.capture), after one
    # warm-up run, into a private pool of their own
    from videoanchor.anchor import eigensolvers

    calls.clear()
    ran.clear()
    _, out = eigensolvers._cuda_capture(lambda: ran.append(3) or len(ran))
    assert ran == [3, 3] and out == 2
    assert calls == [("begin", None, "thread_local"), ("end",)], calls


def test_the_certificates_sparse_products_hold_no_heap_of_padding(reference_kernel,
                                                                    monkeypatch):  # fmt: skip
    """Issue 98 defect 5: the solve's support has no padding (its size read with the
    rounds' flags): each position a held slot, no column more than its slots; the
    certificate from G builds ``C^T`` with no zero entry, and ``E``'s CSR with its padding
    (zero values) spread, at most ``ceil(padding / N)`` a row (before: all of it in row 0 of
    ``C^T`` and in one row of ``E``), and certifies the same answer."""
    from videoanchor.anchor.plan import Plan

    x = video_tokens(2, 8, 12, k=2, seed=1)
    n = x.shape[0]
    out = wc.solve_workset_cuda(x, slots=(4, 16), outlier_slots=(8, 8), max_inner=300,
                                wide_share=1.0)  # fmt: skip
    sup = out["support"]
    assert out["wide_columns"] > 0 and bool((sup >= 0).all())
    assert int(torch.bincount(sup[1], minlength=n).max()) <= 16
    assert len({tuple(p) for p in sup.T.tolist()}) == sup.shape[1]  # (no position twice)
    nz = torch.nonzero(out["coef"]).T
    held = {tuple(p) for p in sup.T.tolist()}
    assert {tuple(p) for p in nz.T.tolist()} <= held
    built = []
    saved = torch.sparse_csr_tensor

    def spy(crow, col, val, shape, **kw):
        built.append((crow.clone(), val.clone(), shape))
        return saved(crow, col, val, shape, **kw)

    monkeypatch.setattr(torch, "sparse_csr_tensor", spy)
    fast_plan = Plan(mode="exact", solver="fast", backend="torch", device=x.device,
                     work=torch.float32, route="admm")  # fmt: skip
    plan = Plan(mode="exact", solver="workset", backend="torch", device=x.device,
                work=torch.float32, fallback=fast_plan)  # fmt: skip
    res = wc.run_workset_cuda(x, plan, slots=(32,), outlier_slots=(8,), alpha_e=800.0,
                              alpha_z=800.0, rho=0.1, eps=1e-4, max_iter=60)  # fmt: skip
    assert res.strategy.startswith("workset_cuda") and res.residual < wc.CERTIFIED
    assert len(built) >= 2
    (crow, val, _), rest = built[0], built[1:]  # C^T, then E (then again where E overflowed)
    assert int((val == 0).sum()) == 0, int((val == 0).sum())
    for crow, val, shape in rest:
        rows = torch.repeat_interleave(torch.arange(shape[0]), crow.diff())
        pad = torch.bincount(rows[val == 0], minlength=shape[0])
        most = -(-int((val == 0).sum()) // shape[0])
        assert int(pad.max()) <= most, (int(pad.max()), most)


@pytest.mark.parametrize("error", [
    RuntimeError("CUDA error: an illegal memory access was encountered"),
    torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.50 GiB"),
    Exception("triton.compiler.errors.CompilationError: at 12:4: stand-in"),
])  # fmt: skip
def test_a_failing_route_gives_the_fast_answer_with_one_warning(monkeypatch, error):
    """Issue 98 defect 7: a launch, out-of-memory or compile failure inside the working
    sets (injected into the column kernel's launch) reaches no caller: the route answers
    with the fast solver on the same device, exactly its answer, and one warning naming
    the cause; where the fast solver runs out of memory too, an SSCMemoryError."""
    import warnings

    from videoanchor.anchor.plan import Plan, SSCMemoryError

    x = video_tokens(2, 8, 12, k=2, seed=1)
    fast_plan = Plan(mode="exact", solver="fast", backend="torch", device=x.device,
                     work=torch.float32, route="admm")  # fmt: skip
    plan = Plan(mode="exact", solver="workset", backend="torch", device=x.device,
                work=torch.float32, fallback=fast_plan)  # fmt: skip
    kw = dict(alpha_e=800.0, alpha_z=800.0, rho=0.1, eps=1e-4, max_iter=60)

    def fail(state, active, count):
        raise error

    monkeypatch.setattr(wc, "launch", fail)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        res = wc.run_workset_cuda(x, plan, slots=(16,), outlier_slots=(8,), **kw)
    ours = [str(w.message) for w in seen if "working sets" in str(w.message)]
    assert len(ours) == 1 and type(error).__name__ in ours[0] and str(error) in ours[0], ours
    want = wc.run_admm(x, fast_plan, warn_dark=False, progress=None, **kw)
    assert res.solver == "fast" and torch.equal(res.coef, want.coef)
    assert res.history["workset_cuda"]["failure"].startswith(type(error).__name__)

    def no_room(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB")

    monkeypatch.setattr(wc, "run_admm", no_room)
    with pytest.raises(SSCMemoryError, match="neither the working sets"):
        wc.run_workset_cuda(x, plan, slots=(16,), outlier_slots=(8,), **kw)


def test_a_bad_argument_is_still_refused_by_the_route():
    from videoanchor.anchor.plan import Plan

    x = video_tokens(2, 8, 12, k=2, seed=1)
    plan = Plan(mode="exact", solver="workset", backend="torch", device=x.device,
                work=torch.float32)  # fmt: skip
    with pytest.raises(ValueError, match="slots: expected non-decreasing"):
        wc.run_workset_cuda(x, plan, slots=(24,), alpha_e=800.0, alpha_z=800.0, rho=0.1,
                            eps=1e-4, max_iter=60)  # fmt: skip
