"""videoanchor.anchor.workset_cuda: the GPU working sets, checked without a GPU (issue 66,
items 1 and 3): in Triton's interpreter (conftest sets TRITON_INTERPRET=1 without CUDA)
against the Numba working sets' certified minimiser, compiled ahead of time for sm_90 and
sm_80 (static registers and spills), and their host reads counted per pass."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks.bench_host_overhead import host_counts
from benchmarks.common import video_tokens
from videoanchor.anchor import workset_cuda as wc
from videoanchor.anchor.program import duality_gaps
from videoanchor.anchor.workset import solve_ssc_workset

ROOT = Path(__file__).resolve().parents[1]


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
    overflow, not converged."""
    x = video_tokens(2, 8, 12, k=2, seed=1)
    out = wc.solve_workset_cuda(x, slots=(4, 32), grow=4, max_inner=300)
    assert out["wide_columns"] > 0 and out["overflow"] == 0
    _check(x, 800.0, out)
    small = wc.solve_workset_cuda(x, slots=(4,), grow=4, max_inner=300)
    assert small["overflow"] > 0 and not small["converged"]


def test_host_reads_are_one_per_pass_and_none_inside():
    """One pass (the kernel, the KKT violations, the growth) reads nothing back to the
    host; the whole solve reads once per pass, plus the lambdas' three and one per level."""
    x = video_tokens(2, 8, 12, k=2, seed=1)
    out = wc.solve_workset_cuda(x, slots=(32,), grow=8, max_inner=300)
    assert len(out["reads"]) == out["passes"] + 3 + 1
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


def test_bad_input_is_refused_saying_what_was_expected():
    with pytest.raises(ValueError, match="slots: expected increasing powers of two"):
        wc.solve_workset_cuda(torch.randn(6, 4), slots=(24,))
    with pytest.raises(ValueError, match="at least 2 points"):
        wc.solve_workset_cuda(torch.randn(1, 4))
    with pytest.raises(ValueError, match="precision"):
        wc.solve_workset_cuda(torch.randn(6, 4), precision="bf16")
    bad = torch.randn(6, 4)
    bad[2, 1] = float("nan")
    with pytest.raises(ValueError, match="(?i)finite|nan"):
        wc.solve_workset_cuda(bad)


@pytest.mark.parametrize("cc", [90, 80])
def test_compiles_without_spills_at_the_slot_counts_used(cc):
    """Compiled for sm_90 and sm_80 with Triton's bundled ptxas (no GPU) at both levels of
    :data:`SLOTS`: no spill, registers reported (STATIC)."""
    from videoanchor.kernels import aot

    reason = aot.unavailable_reason()
    if reason:
        pytest.skip(reason)
    env = dict(os.environ, TRITON_INTERPRET="0", PYTHONPATH=str(ROOT))
    for slots in wc.SLOTS:
        proc = subprocess.run(
            [sys.executable, str(ROOT / "benchmarks" / "bench_workset_cuda.py"), "--static",
             str(cc), "--slots", str(slots)],
            capture_output=True, text=True, env=env, cwd=str(ROOT), timeout=600,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        assert row["cc"] == cc and row["constexprs"]["M"] == slots
        assert row["spill_stores"] == 0 and row["spill_loads"] == 0, row
        assert 0 < row["registers"] <= 255 and row["shared_bytes"] <= row["shared_limit"]


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
    """bench_workset_cuda --smoke: each solver's row (the default's whole call too, whose
    synchronisations are counted on CUDA only), the yardstick against the minimiser."""
    from benchmarks import bench_workset_cuda

    bench_workset_cuda.main(["--smoke", "--out-dir", str(tmp_path)])
    rows = json.loads(next(tmp_path.glob("workset_cuda_*.json")).read_text())["rows"]
    assert [r["solver"] for r in rows] == ["workset_cuda", "fast", "default"]
    assert rows[2]["answered"] == "workset" and rows[2]["syncs"] is None  # (the CPU's route)
    ours = rows[0]
    assert ours["converged"] and abs(ours["objective_gap"]) < 1e-10 and ours["affine"] < 1e-10
    assert ours["objective_gap"] <= rows[1]["objective_gap"] and ours["seconds"] > 0


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
    assert SOLVERS[got.route].__name__ == "_workset_cuda"
    assert plan.make_plan((512, 256), cpu, SSCOptions().checked()).route == "workset_then_fast"
    fast = plan.make_plan((512, 256), cuda, SSCOptions(max_iter=30).checked())
    assert (fast.solver, fast.route) == ("fast", "admm")
