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
