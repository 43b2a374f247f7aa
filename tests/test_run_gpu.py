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
#: CPU studies: their results are *_cpu.json, run_gpu.sh does not run them.
# bench_workset: the working-set solver is float64 on the CPU (issue 52's one-thread CPU target)
CPU_ONLY = {"bench_contention", "bench_first_call", "bench_host_overhead", "bench_label_draws",
            "bench_lmms_batch", "bench_optimum", "bench_schedule", "bench_share_cost",
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
