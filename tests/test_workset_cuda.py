"""videoanchor.anchor.solvers.workset_cuda: the GPU working sets, checked without a GPU (issue 66,
items 1 and 3): in Triton's interpreter (conftest sets TRITON_INTERPRET=1 without CUDA)
against the Numba working sets' certified minimiser, compiled ahead of time for sm_90 and
sm_80 (static registers and spills), and their host reads counted per pass."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import interpreter_calls
import pytest
import torch

from benchmarks.bench_host_overhead import host_counts
from benchmarks.common import video_tokens
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


@pytest.fixture(autouse=True, scope="module")
def slot_compiles(request):
    """test_every_slot_count_accepted_compiles' compiles (sm_90, then sm_80: one process at a
    time, a few minutes of CPU) started as the module starts, so that they run on the second
    core beside the interpreted tests (one core: the interpreter is one Python thread).
    ``{cc: CompletedProcess or the exception}`` once ``done`` is set; None without an AOT
    compiler (the test skips with the reason) or where that test is not selected (only the
    selected ``cc`` are compiled)."""
    from videoanchor.kernels import aot

    wanted = [i.callspec.params["cc"] for i in request.session.items
              if getattr(i, "originalname", None) == "test_every_slot_count_accepted_compiles"]  # fmt: skip
    if not wanted or aot.unavailable_reason():
        yield None
        return
    got, done = {}, threading.Event()
    env = dict(os.environ, TRITON_INTERPRET="0", PYTHONPATH=str(ROOT))

    def compile_all():
        for cc in wanted:  # (the selected ones: sm_90 first)
            try:
                got[cc] = subprocess.run(
                    [sys.executable, str(ROOT / "benchmarks" / "bench_workset_cuda.py"),
                     "--static", str(cc), "--slots", ",".join(map(str, wc.SLOT_COUNTS))],
                    capture_output=True, text=True, env=env, cwd=str(ROOT), timeout=1800,
                )  # fmt: skip
            except Exception as exc:  # (raised again by the test)
                got[cc] = exc
        done.set()

    thread = threading.Thread(target=compile_all, daemon=True)
    thread.start()
    yield dict(got=got, done=done)
    thread.join()


def _check(x, alpha_e, out, gap=1e-6, close=1e-7):
    ref = solve_ssc_workset(x.double(), alpha_e=alpha_e)
    g = duality_gaps(x.double(), out["coef"], out["lambda_e"], out["lambda_z"])
    assert out["converged"] and g.max_gap < gap and g.affine < 1e-10
    assert float(out["coef"].diagonal().abs().max()) == 0.0
    assert float((out["coef"] - ref.coef).abs().max()) < close
    return ref


def test_video_like_tokens_reach_the_certified_minimiser():
    """N = 40 (odd sets of slots in use), D = 16, row tiles of 8 over 32 slots (several
    tiles per sweep), 8 programs striding over the 40 columns: float32 passes, then float64."""
    x = video_tokens(4, 10, 16, k=4, seed=0)
    out = wc.solve_workset_cuda(x, slots=(32,), grow=8, max_inner=300)
    _check(x, 800.0, out)
    assert out["reads"].count("pass") == out["passes"]


def test_slot_overflow_takes_the_second_level_and_then_the_fallback():
    """With 4 slots a column's support fills them: it is set aside and continues with 32
    (the same minimiser, ``wide_columns`` counts it); with 4 alone it is reported as
    overflow, not converged. Where more than ``wide_share`` of the columns fill the first
    level, ``C`` is dense: the level stops in the pass that saw it, the wide one never runs."""
    x = video_tokens(2, 8, 12, k=2, seed=1)
    out = wc.solve_workset_cuda(x, slots=(4, 16), grow=4, max_inner=300, wide_share=1.0)
    assert out["wide_columns"] > 0 and out["overflow"] == 0 and out["dense"] is None
    _check(x, 800.0, out)
    share = out["wide_columns"] / x.shape[0] / 2
    dense = wc.solve_workset_cuda(x, slots=(4, 32), grow=4, max_inner=300, wide_share=share)
    assert "columns filled 4 slots" in dense["dense"] and not dense["converged"]
    assert dense["overflow"] > share * x.shape[0] and dense["passes"] < out["passes"]
    assert dense["reads"].count("pass") == dense["passes"]
    small = wc.solve_workset_cuda(x, slots=(4,), grow=4, max_inner=300)
    assert small["overflow"] > 0 and not small["converged"]


def test_host_reads_are_one_per_pass_and_none_inside():
    """One pass (the kernel, the KKT violations, the growth) reads nothing back to the
    host; the whole solve reads once per pass, plus the lambdas' three and one per level."""
    x = video_tokens(2, 8, 12, k=2, seed=1)
    out = wc.solve_workset_cuda(x, slots=(32,), grow=8, max_inner=300)
    assert len(out["reads"]) == out["passes"] + 3 + 1 + 1  # (+ the dense screen, the level)
    # a pass on its own, from the solved state (the kernel's launch is a CPU call here)
    X = x.double()
    n, d = X.shape
    state = wc._state(
        dict(G=X @ X.T, X=X, X32=X.float(), n=n, d=d, lam_z=out["lambda_z"], tol=1e-9,
             max_inner=300,
             scalars=torch.tensor([out["lambda_z"], out["lambda_e"], 1.0, 1e-9, wc.RIDGE],
                                  dtype=torch.float64),
             weights=torch.cat([torch.ones(n, dtype=torch.float64),
                                torch.full((d,), out["lambda_e"], dtype=torch.float64)])),
        torch.arange(n), torch.full((n, 8), -1), torch.zeros(n, 8, dtype=torch.float64),
    )  # fmt: skip
    state["ids"][:, 0] = (torch.arange(n) + 1) % n
    state["z"][:, 0] = 1.0
    counts = host_counts(lambda: wc._pass(state, exact=True, grow=4, programs=3), n=1)
    assert counts["syncs_per_call"] == 0, counts["sync_ops"]


def test_the_kernel_carries_each_columns_inverse_over_the_passes():
    """The kernel keeps each column's inverse over its support from pass to pass (a pass
    keeps the support in its slots): after every pass, the inverse held for a solved column
    is that of its support's system ``H = lambda_z P^T P + gamma a a^T``, to rounding, and
    zero off the support (an unsolved column's, or one that joined at the ridge, is zero:
    the next run rebuilds it); the first pass built it, the later ones only updated it."""
    x = video_tokens(2, 8, 12, k=2, seed=1)
    X = x.double()
    n, d = X.shape
    lam_z, lam_e, gamma = 5.0, 0.5, 1.0
    state = wc._state(
        dict(G=X @ X.T, X=X, X32=X.float(), n=n, d=d, lam_z=lam_z, tol=1e-9, max_inner=300,
             scalars=torch.tensor([lam_z, lam_e, gamma, 1e-9, wc.RIDGE], dtype=torch.float64),
             weights=torch.cat([torch.ones(n, dtype=torch.float64),
                                torch.full((d,), lam_e, dtype=torch.float64)])),
        torch.arange(n), torch.full((n, 16), -1), torch.zeros(n, 16, dtype=torch.float64),
    )  # fmt: skip
    state["ids"][:, 0] = (torch.arange(n) + 1) % n
    state["z"][:, 0] = 1.0
    P = torch.cat([X.T, torch.eye(d, dtype=torch.float64)], dim=1)  # (D, N + D): variables
    checked = 0
    for _ in range(4):
        wc._pass(state, exact=True, grow=4, programs=3)
        assert not state["first"]
        for k in range(n):
            ids, z = state["ids"][k], state["z"][k]
            F = (ids >= 0) & (z != 0)
            Hinv = state["Hinv"][k]
            if int(state["status"][k]) != wc.SOLVED:  # rebuilt from zero by the next run
                assert float(Hinv.abs().sum()) == 0.0
                continue
            if float(Hinv.abs().sum()) == 0.0:  # a join at the ridge: rebuilt, likewise
                continue
            assert float(Hinv[~F].abs().sum()) == 0.0
            assert float(Hinv[:, ~F].abs().sum()) == 0.0
            v = ids[F]
            a = (v < n).double()
            H = lam_z * P[:, v].T @ P[:, v] + gamma * torch.outer(a, a)
            eye = torch.eye(len(v), dtype=torch.float64)
            assert float((Hinv[F][:, F] @ H - eye).abs().max()) < 1e-8, (k, len(v))
            checked += int(F.sum()) > 1
    assert checked > n  # (supports of more than one variable, over the passes)


def test_the_interpreter_shim_computes_the_same(quick_calls):
    """Two passes over a small set (joins, leaves, three programs striding over the columns)
    with the interpreter as it came and with the shim the module runs under (fixture
    quick_calls): the same ids, z, mu, status, steps and inverses, bitwise."""
    if quick_calls is None:
        pytest.skip("no interpreter shim here (not interpreting, or its Triton differs)")
    x = video_tokens(2, 8, 12, k=2, seed=1)

    def two_passes():
        X = x.double()
        n, d = X.shape
        state = wc._state(
            dict(G=X @ X.T, X=X, X32=X.float(), n=n, d=d, lam_z=5.0, tol=1e-9, max_inner=300,
                 scalars=torch.tensor([5.0, 0.5, 1.0, 1e-9, wc.RIDGE], dtype=torch.float64),
                 weights=torch.cat([torch.ones(n, dtype=torch.float64),
                                    torch.full((d,), 0.5, dtype=torch.float64)])),
            torch.arange(n), torch.full((n, 16), -1), torch.zeros(n, 16, dtype=torch.float64),
        )  # fmt: skip
        state["ids"][:, 0] = (torch.arange(n) + 1) % n
        state["z"][:, 0] = 1.0
        for _ in range(2):
            wc._pass(state, exact=True, grow=4, programs=3)
        return state

    quick = two_passes()
    with quick_calls():
        plain = two_passes()
    assert int(plain["steps"].sum()) > 2 * x.shape[0]  # (more than a step a run: joins ran)
    for key in ("ids", "z", "mu", "status", "steps", "Hinv"):
        assert torch.equal(quick[key], plain[key]), key


def test_dense_sets_are_told_apart_before_any_pass():
    """The dense screen at the real shapes (its inputs only: the lambdas and the nearest
    points, no pass): bench_request_cost's synthetic cost set (N = 2048, D = 3584) is dense,
    video-like tokens of 16 frames at Qwen2.5-VL-7B's shapes are not; nor a tiny video-like
    set, while a tiny synthetic one is."""
    from benchmarks.common import synthetic_tokens
    from videoanchor.anchor.program import gram_row_max, nearest_points, ssc_lambdas

    def dense(x, slots=wc.SLOTS[0]):
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
    assert res.history["workset_cuda"]["host_reads"] == 4  # (the lambdas' three, the screen)
    t = time.process_time()
    wc.run_admm(x, fast_plan, **kw)
    assert took < 2.0 * (time.process_time() - t) + 0.5  # (the screen is a few vector ops)


def test_warm_up_launches_every_level_over_no_columns():
    """warm_up runs the kernel once per level of slots over no columns (in the interpreter
    here: nothing to compile; on CUDA the launch compiles it into Triton's cache)."""
    took = wc.warm_up("cpu", slots=(4, 32))
    assert list(took) == [4, 32] and all(t >= 0 for t in took.values())
    with pytest.raises(ValueError, match="slots: expected increasing slot counts from"):
        wc.warm_up("cpu", slots=(32, 4))


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
        "wc.warm_up(torch.device('cuda'), slots=(4, 16))\n"
        "files = lambda: sorted(os.path.relpath(os.path.join(r, f), sys.argv[1])\n"
        "                       for r, _, fs in os.walk(sys.argv[1]) for f in fs)\n"
        "before = files()\n"
        "x = video_tokens(2, 8, 12, k=2, seed=1).cuda()\n"
        "out = wc.solve_workset_cuda(x, slots=(4, 16), grow=4, max_inner=300, wide_share=1.0)\n"
        "assert out['wide_columns'] > 0, out['wide_columns']\n"
        "assert files() == before, set(files()) - set(before)\n"
    )
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, TRITON_CACHE_DIR=str(tmp_path), PYTHONPATH=path)
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True,
                          text=True, env=env, cwd=str(ROOT), timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_bad_input_is_refused_saying_what_was_expected():
    with pytest.raises(ValueError, match="slots: expected increasing slot counts from"):
        wc.solve_workset_cuda(torch.randn(6, 4), slots=(24,))
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


def test_slot_counts_old_triton_cannot_compile_are_refused_up_front(monkeypatch):
    """With a Triton before 3.9 on CUDA, 32 and 64 slots are refused before any work
    (Triton 3.6 fails to compile them: slots=(64, 512) on the H100 of 2026-11-27); on the
    CPU (the interpreter) and with Triton 3.9 they run."""
    import triton

    cuda = torch.device("cuda")
    monkeypatch.setattr(triton, "__version__", "3.6.0")
    with pytest.raises(ValueError, match=r"slots: \[64\] do not compile with triton 3.6.0"):
        wc._checked_slots((64, 512), cuda)
    assert wc._checked_slots((16, 128), cuda) == (16, 128)
    assert wc._checked_slots((32, 64), torch.device("cpu")) == (32, 64)
    monkeypatch.setattr(triton, "__version__", "3.9.0")
    assert wc._checked_slots((64, 512), cuda) == (64, 512)


def test_the_route_returns_a_certified_result_or_the_fast_fallback():
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
    res = wc.run_workset_cuda(x, plan, slots=(32,), **kw)
    assert res.strategy == "workset_cuda" and res.converged and res.residual < wc.CERTIFIED
    assert res.coef.dtype == torch.float32 and res.history["overflow"] == 0
    with pytest.warns(UserWarning, match="outgrew 4 slots"):
        fast = wc.run_workset_cuda(x, plan, slots=(4,), **kw)
    assert fast.solver == "fast" and fast.history["workset_cuda"]["overflow"] > 0


def test_supports_at_the_rank_reach_the_certified_minimiser():
    """More points than dimensions (N = 24, D = 12, two-dimensional subspaces): supports
    reach the rank and a variable can join and leave at once (kept out until the iterate
    moves, else it would repeat forever)."""
    from benchmarks.common import synthetic_tokens

    x = synthetic_tokens(24, 12, k=3, sub_dim=2, corrupt=0.1, seed=1)
    out = wc.solve_workset_cuda(x, slots=(32,), grow=8, max_inner=300)
    _check(x, 800.0, out, close=1e-9)


def test_outlier_entries_are_solved_too():
    """A small alpha_e: the minimiser holds several outlier entries per column (K's Y, Y^T
    and I blocks in the slots): its objective, C and E to the certified minimiser's."""
    from benchmarks.common import objective

    x = video_tokens(3, 8, 24, k=3, seed=2)
    out = wc.solve_workset_cuda(x, alpha_e=10.0, slots=(32,), grow=8, max_inner=300)
    ref = solve_ssc_workset(x.double(), alpha_e=10.0)
    assert int((ref.outliers != 0).sum(dim=0).min()) >= 5  # the case holds outlier entries
    assert out["converged"]
    want = objective(x, ref.coef, ref.lambda_e, ref.lambda_z)
    got = objective(x, out["coef"], out["lambda_e"], out["lambda_z"])
    assert abs(got - want) <= 1e-12 * abs(want)
    assert float((out["coef"] - ref.coef).abs().max()) < 1e-7
    assert float((out["outliers"] - ref.outliers).abs().max()) < 1e-7


def test_the_gpu_benchmark_runs_tiny_on_the_cpu(tmp_path):
    """bench_workset_cuda --smoke: the default's whole call and the fast solver's on a tiny
    video-like set (the working sets' own record and the yardstick against the minimiser
    there), on the dense synthetic set and on Yale B's faces (the dense-C rule's ratio); the
    synchronisations are counted on CUDA only, the prefill for the models' shapes only."""
    from benchmarks import bench_workset_cuda

    bench_workset_cuda.main(["--smoke", "--out-dir", str(tmp_path)])
    got = json.loads(next(tmp_path.glob("workset_cuda_*.json")).read_text())
    video, dense, yale = got["rows"]
    assert set(got["meta"]["seconds_warm_up"]) == {str(s) for s in wc.SLOTS}
    assert (video["tokens"], dense["tokens"]) == ("video-like", "synthetic (dense)")
    assert "error" not in video and "error" not in dense, (video, dense)
    assert video["answered"] == "workset" and video["syncs_default"] is None  # (CPU route)
    assert video["passes_workset_cuda"] > 0 and video["steps_max"] > 0
    # (the default's C in float32, the plan's working dtype: the yardstick's tolerances)
    assert abs(video["objective_gap"]) < 1e-6 and video["affine"] < 1e-5
    assert video["objective_gap"] <= video["fast_objective_gap"]
    assert video["seconds_default"] > 0 and video["default_over_fast"] > 0
    # issues 78 and 91: the shares' cost after the solve, on the default's C
    for share in ("paper", "soft", "steady"):
        assert video[f"seconds_after_solve_{share}"] > 0
    assert video["steady_vs_paper_max"] >= 0 and video["soft_vs_paper_max"] >= 0
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
    assert "--kernel-name regex:_columns_kernel" in script and "--launch-skip" in script
    assert '--frames "${WORKSET_CUDA_FRAMES:-16,32,64}"' in script


@pytest.mark.parametrize("cc", [90, 80])
def test_every_slot_count_accepted_compiles(slot_compiles, cc):
    """(Last in the module: its compiles run in the background from the module's start.)
    Every slot count the solver accepts (SLOT_COUNTS) compiled for sm_90 and sm_80 with
    Triton's bundled ptxas (no GPU): registers within 255, no spill at the levels of SLOTS
    (STATIC). Counts outside are refused up front (1024 spills 428 bytes on sm_90); 32 and
    64 with a Triton before 3.9 on CUDA, which fails to compile them (the H100's 3.6)."""
    from videoanchor.kernels import aot

    reason = aot.unavailable_reason()
    if reason:
        pytest.skip(reason)
    assert slot_compiles["done"].wait(timeout=3600), "the slot counts' compiles did not end"
    proc = slot_compiles["got"][cc]  # (compiled in the background from the module's start)
    if isinstance(proc, Exception):
        raise proc
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in proc.stdout.strip().splitlines()]
    assert [r["constexprs"]["M"] for r in rows] == list(wc.SLOT_COUNTS)
    for row in rows:
        assert row["cc"] == cc and row["num_warps"] == 4
        assert 0 < row["registers"] <= 255 and row["shared_bytes"] <= row["shared_limit"], row
        if row["constexprs"]["M"] in wc.SLOTS:
            assert row["spill_stores"] == 0 and row["spill_loads"] == 0, row
    with pytest.raises(ValueError, match=r"slots: expected increasing slot counts from"):
        wc.solve_workset_cuda(torch.randn(6, 4), slots=(128, 1024))
