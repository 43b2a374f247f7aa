"""benchmarks/bench_request_cost.py's bookkeeping (no timing): the rows it counts and
estimates, the order it measures in, and its command-line checks."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks import bench_request_cost as brc


def test_counted_flops_follow_the_code_paths():
    n, d = 2048, 3584
    fl = brc.ssc_flops(n, d)
    assert fl["per_iter"] == 2.0 * (n + d) * n * n
    # CUDA runs the dense schedule: [R; Y R](T - I) and a dense Y^T E every iteration
    assert fl["per_iter_fast_cuda"] == 2.0 * (n + d) * n * n + 2.0 * n * d * n
    assert fl["per_iter_fast"] < fl["per_iter_fast_cuda"]  # the CPU's active set does less
    assert fl["factor"] == "dense"


def test_counted_flops_with_a_thin_factor():
    d = 3584
    thin, low = brc.ssc_flops(4096, d), brc.ssc_flops(8192, d)
    assert (thin["factor"], low["factor"]) == ("thin", "low_rank")
    # thin: the iteration as dense, the refactors' inner dimension D instead of N
    dense_refactor = 7 * 2.0 * (4096 + d) * 4096 * 4096
    assert thin["refactors_fast"] == pytest.approx(dense_refactor * d / 4096)
    assert thin["per_iter_fast_cuda"] == 2.0 * (4096 + d) * 4096**2 + 2.0 * 4096 * d * 4096
    # low rank: every product with [R; Y R] has the inner dimension D + 1
    n, k = 8192, d + 1
    assert low["per_iter_fast_cuda"] == 4.0 * k * n * n + 2.0 * d * k * n + 2.0 * n * d * n
    assert low["per_iter_fast_cuda"] < 2.0 * (n + d) * n * n + 2.0 * n * d * n
    assert low["refactors_fast"] < 1e-4 * low["per_iter_fast_cuda"] * 60
    rows = {r["frames"]: r for r in brc.cost_rows(torch.device("cpu"), True, 0.0, measure=[])
            if r["model"] == "Qwen2.5-VL-7B"}  # fmt: skip
    assert rows[16]["fast_factor"] == "dense" and rows[64]["fast_factor"] == "low_rank"
    # the 64-frame factor: the D x D eigendecomposition, not the N x N one of the lease
    assert rows[64]["h100_seconds_factor_fast"] < brc.h100_stage_seconds("factor_fast", 8192) / 3


def test_estimated_rows_without_measuring():
    calls = []
    rows = brc.cost_rows(torch.device("cpu"), True, 0.0, measure=[], on_row=calls.append)
    assert len(rows) == len(brc.SHAPES) * len(brc.FRAMES) == len(calls)
    assert [(r["model"], r["frames"]) for r in rows] == [
        (s, f) for s in brc.SHAPES for f in brc.FRAMES
    ]
    for r in rows:
        assert "seconds_ssc_fast" not in r and r["iterations_figures"] == "not measured"
        assert r["h100_ssc_over_prefill_fast_fp32"] > r["h100_ssc_over_prefill_fast_tf32"] > 0
        assert "h100_ssc_over_prefill_faithful_fp32" not in r  # no iteration count to use
        assert "dense schedule" in r["h100_figures"]


def test_measure_option_is_checked():
    assert brc.parse_measure("Qwen2.5-VL-7B:16,64;InternVL2-8B:8") == [
        ("Qwen2.5-VL-7B", 16), ("Qwen2.5-VL-7B", 64), ("InternVL2-8B", 8),
    ]  # fmt: skip
    assert brc.parse_measure(None) is None
    for bad in ("Qwen9:16", "Qwen2.5-VL-7B", "InternVL2-8B:"):
        with pytest.raises(SystemExit, match="--measure: expected SHAPE"):
            brc.parse_measure(bad)
    with pytest.raises(SystemExit, match="--parts: expected a subset"):
        brc.main(["--parts", "cost,speed"])


def test_h100_estimate_prices_the_calibrated_stages():
    """The H100 estimate adds the fast solver's factor and the spectral step (calibrated on
    the lease's profiles, a power law through both points) to its counted iterations."""
    for stage, (a, b) in brc.H100_STAGES.items():
        assert brc.h100_stage_seconds(stage, 2048) == pytest.approx(a)
        assert brc.h100_stage_seconds(stage, 8192) == pytest.approx(b)
        assert a < brc.h100_stage_seconds(stage, 4096) < b
    rows = brc.cost_rows(torch.device("cpu"), True, 0.0, measure=[])
    row = next(r for r in rows if r["model"] == "Qwen2.5-VL-7B" and r["frames"] == 16)
    pre_s = row["prefill_flops"] / (brc.EFFICIENCY * brc.H100["bf16"])
    stages = row["h100_seconds_factor_fast"] + row["h100_seconds_spectral"]
    for prec in ("fp32", "fp16x3"):
        total = row[f"h100_ssc_over_prefill_fast_{prec}"]
        iters = row[f"h100_ssc_over_prefill_fast_{prec}_iterations"]
        assert total == pytest.approx(iters + stages / pre_s)


def test_faithful_seconds_stops_the_faithful_solve_and_marks_the_row(monkeypatch):
    """--faithful-seconds: a faithful solve stopped by its time budget leaves a row whose
    time and iterations say they are lower bounds, and no iteration count for estimates."""
    real = brc.synthetic_tokens
    monkeypatch.setattr(brc, "synthetic_tokens", lambda n, h, seed: real(n, 48, seed=seed))
    monkeypatch.setattr(brc, "prefill_seconds", lambda *a, **k: 1.0)
    m = [("Qwen2.5-VL-7B", 2)]
    (row, *rest) = brc.cost_rows(torch.device("cpu"), True, 60.0, measure=m, faithful_seconds=1e-3)
    assert row["faithful_stopped_by_budget"] == 1e-3
    assert row["iterations_figures"].startswith("at least")
    assert row["iterations_faithful"] < 100  # stopped long before its 145-odd iterations
    assert all(r["iterations_figures"] == "not measured" for r in rest)  # not an estimate
    (full, *_) = brc.cost_rows(torch.device("cpu"), True, 60.0, measure=m)
    assert "faithful_stopped_by_budget" not in full and full["iterations_figures"] == "measured"
    assert full["iterations_faithful"] > row["iterations_faithful"]
    # the default beside them: the working sets on this CPU, timed against the faithful solve
    assert full["solver_default"] == "workset"
    assert full["speedup_default"] == pytest.approx(
        full["seconds_ssc_faithful"] / full["seconds_ssc_default"]
    )
    assert full["ssc_over_prefill_default"] == pytest.approx(full["seconds_ssc_default"])
    assert "workset" in full["stages_default"]
    with pytest.raises(SystemExit, match="--faithful-seconds: expected a positive number"):
        brc.main(["--faithful-seconds", "0", "--parts", "cost"])


def test_iteration_floor_is_below_the_estimate_and_judges_each_target(tmp_path):
    """The STATIC floor (the schedule's products without Y^T E, at 100% of the fp16 peak)
    lies under the 60%-of-peak estimate of the same row, ``fp16x3_iterations_within_target``
    of them cost the target exactly, and the split over tp ranks divides it."""
    est = {(r["model"], r["frames"]): r
           for r in brc.cost_rows(torch.device("cpu"), True, 0.0, measure=[])}  # fmt: skip
    rows = brc.floor_rows()
    assert [(r["model"], r["frames"]) for r in rows] == [
        (s, f) for s in brc.SHAPES for f in sorted(brc.TARGETS)
    ]
    for r in rows:
        floor = r["floor_fp16x3_over_prefill"]
        assert 0 < floor < est[(r["model"], r["frames"])]["h100_ssc_over_prefill_fast_fp16x3"]
        assert r["floor_bf16_over_prefill"] == pytest.approx(floor / 3)
        per_iteration = floor / brc.admm_steps.SCHEDULE.iterations
        best = floor / r["tp"]
        assert r["fp16x3_iterations_within_target"] * per_iteration / r["tp"] == pytest.approx(
            r["target"]
        )
        assert r["floor_meets_target"] == (best <= r["target"])
        assert (r["floor_fp16x3_over_prefill_split"] is None) == (r["tp"] == 1)
        # the spectral step alone, at its calibrated seconds, against the same prefill
        pre_s = brc.prefill_flops(brc.SHAPES[r["model"]], r["n"]) / (0.6 * 989e12)
        spectral = brc.h100_stage_seconds("spectral", r["n"]) / pre_s
        assert r["spectral_over_prefill"] == pytest.approx(spectral)
        assert r["spectral_meets_target"] == (spectral <= r["target"])
    # hand count at one shape: 16 frames of Qwen2.5-VL-7B, N = 2048 < D (dense factor)
    n, d = 2048, 3584
    per_iter = 2.0 * (n + d) * n * n  # [R; Y R](T - I), without the Y^T E product
    pre = brc.prefill_flops(brc.SHAPES["Qwen2.5-VL-7B"], n) / (0.6 * 989e12)
    want = 3 * 60 * per_iter / 989e12 / pre
    assert rows[0]["floor_fp16x3_over_prefill"] == pytest.approx(want)
    # at N = 2048 the spectral step is H100_STAGES' first calibration point itself
    assert rows[0]["spectral_over_prefill"] == pytest.approx(brc.H100_STAGES["spectral"][0] / pre)
    assert brc.main(["--floor", "--out-dir", str(tmp_path)]) is None
    assert (tmp_path / "request_cost_floor_static.json").exists()


def test_cost_part_loads_the_working_set_kernel_before_any_row_is_timed(monkeypatch, tmp_path):
    """The kernel's first call in a process (Numba compiles it or loads its cache) is timed
    apart, in the meta, before the cost rows, so that no row's default pays it."""
    order = []
    real = brc.first_call_seconds
    monkeypatch.setattr(brc, "first_call_seconds", lambda: order.append("kernel") or real())
    monkeypatch.setattr(brc, "cost_rows", lambda *a, **k: order.append("rows") or [])
    path = brc.run(torch.device("cpu"), True, tmp_path, parts=("cost",))
    assert order == ["kernel", "rows"]
    meta = json.loads(path.read_text())["meta"]
    assert meta["workset_first_call_seconds"] > 0
