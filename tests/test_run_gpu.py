"""benchmarks/run_gpu.sh's step selection (a lease's command is limited to ten minutes, so
its steps are split across calls): the steps not named do not run, and a run of no step
fails nothing."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _run(tmp_path, steps):
    env = {**os.environ, "OUT": str(tmp_path), "STEPS": steps, "STEP_TIMEOUT": "5"}
    return subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "run_gpu.sh")], env=env, capture_output=True,
        text=True, timeout=120,
    )  # fmt: skip


def test_no_step_runs_nothing_and_succeeds(tmp_path):
    out = _run(tmp_path, "none")
    assert out.returncode == 0, out.stderr
    assert "==" not in out.stdout and list(tmp_path.iterdir()) == []


def test_named_steps_only(tmp_path):
    out = _run(tmp_path, "vllm")  # without a CUDA vLLM here it says why and runs nothing
    assert "== bench_vllm skipped" in out.stdout and "bench_tune" not in out.stdout
    assert not (tmp_path / "gpu_tests.log").exists()


SCRIPT = (ROOT / "benchmarks" / "run_gpu.sh").read_text()
#: CPU studies: their results are *_cpu.json (or *_static.json: compiled without a GPU),
#: run_gpu.sh does not run them.
# bench_workset: the working-set solver is float64 on the CPU (issue 52's one-thread CPU target)
# bench_column_kernel: static compiles; bench_host_reads, bench_pass_counts: counted on the CPU;
# bench_discretize: the discretisation's host work, one thread
CPU_ONLY = {"bench_column_kernel", "bench_contention", "bench_discretize", "bench_first_call",
            "bench_host_overhead", "bench_host_reads", "bench_label_draws", "bench_lmms_batch",
            "bench_optimum", "bench_pass_counts", "bench_schedule", "bench_share_cost",
            "bench_share_gate", "bench_workset", "bench_yaleb"}  # fmt: skip


def _plan(name: str) -> dict[str, int]:
    line = next(x for x in SCRIPT.splitlines() if x.startswith(f'{name}="'))
    return {s.split(":")[0]: int(s.split(":")[1]) for s in line.split('"')[1].split()}


def test_two_calls_of_under_ten_minutes_run_the_profile_and_every_benchmark():
    budget = int(SCRIPT.split("CALL_BUDGET:-")[1].split("}")[0])
    assert budget < 600
    call1, call2 = _plan("CALL1"), _plan("CALL2")
    for plan in (call1, call2):  # the caps fit the budget: no step is squeezed out by design
        assert sum(plan.values()) <= budget, plan
    steps = set(call1) | set(call2)
    steps |= set(_plan("REQUEST"))  # bench_request runs in issue 92's call of its own
    steps |= set(_plan("WORKSET"))  # bench_scores_beside in issue 90's
    steps |= {"split"} if "tp" in steps else set()  # the tp step runs bench_tp and bench_split
    assert {"profile", "nsys", "ncu"} <= set(call1)
    for name in steps:
        assert f"want {name}" in SCRIPT or 'want "${script#bench_}"' in SCRIPT, name
    named = {p.stem for p in (ROOT / "benchmarks").glob("bench_*.py")} - CPU_ONLY
    missing = [b for b in sorted(named) if b.removeprefix("bench_") not in steps]
    assert not missing, (
        f"benchmarks no call of run_gpu.sh runs (or list them in CPU_ONLY): {missing}"
    )


def test_a_step_past_the_budget_is_skipped_and_named(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "STEPS": "profile", "CALL": "1",
           "CALL_BUDGET": "10"}  # fmt: skip
    out = subprocess.run(["bash", str(ROOT / "benchmarks" / "run_gpu.sh")], env=env,
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "== profile skipped: " in out.stdout and "left of the call's 10s" in out.stdout


def test_hopper_call_fits_eight_minutes_and_times_the_hopper_loop():
    """Issue 77's GPU command (CALL=hopper): bench_attention --hopper, then the ncu step,
    caps within 8 minutes."""
    plan = _plan("HOPPER")
    assert set(plan) == {"hopper", "ncu"} and sum(plan.values()) <= 480, plan
    assert 'hopper) PLAN="$HOPPER"' in SCRIPT
    assert "bench_attention.py --hopper" in SCRIPT and "want hopper" in SCRIPT


def test_request_call_fits_eight_minutes_with_decode_graphs_and_paged():
    """Issue 92's GPU command (CALL=request): the whole request, decode's CUDA-graph rows
    (bench_decode --graph) and the paged benchmark, caps within 8 minutes."""
    plan = _plan("REQUEST")
    assert set(plan) == {"request", "decode", "paged"} and sum(plan.values()) <= 480, plan
    assert 'request) PLAN="$REQUEST"' in SCRIPT and "want request" in SCRIPT
    assert "benchmarks/bench_request.py" in SCRIPT
    assert '[ "${CALL:-}" = request ] && EXTRA=(--graph)' in SCRIPT


def test_workset_call_fits_eight_minutes_with_the_scores_tests_loss_and_ncu(tmp_path):
    """Issue 90's GPU command (CALL=workset): the scores' gpu tests, bench_workset_cuda at
    16/32/64 frames of both shapes (the dense set and Yale B in it), the throughput loss
    (bench_scores_beside) and one ncu of the column kernel, caps within 8 minutes; the
    kernel's name and launches are variables, the tests step takes the scores' files that
    exist."""
    plan = _plan("WORKSET")
    assert set(plan) == {"tests", "workset_cuda", "scores_beside", "workset_ncu"}, plan
    assert sum(plan.values()) <= 480 and all(v > 0 for v in plan.values()), plan
    assert 'workset) PLAN="$WORKSET"' in SCRIPT and "want scores_beside" in SCRIPT
    assert "benchmarks/bench_scores_beside.py" in SCRIPT
    assert '--kernel-name "regex:${WORKSET_NCU_KERNEL:-_column_kernel}"' in SCRIPT
    assert '--launch-count "${WORKSET_NCU_COUNT:-2}"' in SCRIPT
    files = SCRIPT.split('SCORES_TESTS="')[1].split('"')[0].split()
    assert {"workset_cuda", "column_kernel"} <= set(files)
    assert (ROOT / "tests" / "test_workset_cuda.py").exists()
    # the call as a user runs it, every step stopped at once: each step's command as the
    # call gives it (the tests step names only the scores' files present)
    env = {**os.environ, "OUT": str(tmp_path), "CALL": "workset",
           "STEPS": "tests workset_cuda scores_beside workset_ncu", "STEP_TIMEOUT": "1",
           "WORKSET_NCU_SKIP": "7", "PATH": f"{tmp_path}:{os.environ['PATH']}"}  # fmt: skip
    for tool in ("python", "ncu"):  # each records its arguments; the import checks pass
        fake = tmp_path / tool
        fake.write_text(f'#!/bin/sh\necho "{tool} $@" >> "$(dirname "$0")/calls.txt"\n')
        fake.chmod(0o755)
    out = subprocess.run(["bash", str(ROOT / "benchmarks" / "run_gpu.sh")], env=env,
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    for name in ("tests", "workset_cuda", "scores_beside", "workset_ncu"):
        assert f"== {name} (at most 1s)" in out.stdout, out.stdout
    calls = [c.removeprefix("python ") for c in (tmp_path / "calls.txt").read_text().splitlines()]
    (ncu,) = [c for c in calls if c.startswith("ncu ")]
    assert "--kernel-name regex:_column_kernel --launch-skip 7 --launch-count 2" in ncu
    assert ncu.endswith("python benchmarks/bench_workset_cuda.py --ncu")
    (tests,) = [c for c in calls if c.startswith("-m pytest")]
    named = [a for a in tests.split() if a.startswith("tests/")]
    want = [f"tests/test_{f}.py" for f in files if (ROOT / "tests" / f"test_{f}.py").exists()]
    assert named == want and "-m gpu" in tests
    (bench,) = [c for c in calls if "bench_scores_beside.py" in c]
    assert (
        f"--budget {plan['scores_beside'] * 4 // 5}" in bench and f"--out-dir {tmp_path}" in bench
    )
    # bench_workset_cuda's existing CLI: frames, budget, both shapes; --sweep only when asked
    (ws,) = [c for c in calls if c.startswith("benchmarks/bench_workset_cuda.py --frames")]
    assert f"--budget {plan['workset_cuda'] * 2 // 3}" in ws and "--sweep" not in ws
    assert "--frames 16,32,64" in ws and "--models Qwen2.5-VL-7B,InternVL2-8B" in ws
