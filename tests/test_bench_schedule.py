"""benchmarks/bench_schedule.py: the fast schedule's ablation runs on its parameters
(immutable schedules passed to the solver, nothing patched) and measures what it says."""

from __future__ import annotations

from benchmarks import bench_schedule as bs
from benchmarks.bench_request_cost import darkened
from benchmarks.common import video_tokens
from videoanchor.anchor.solvers import admm_steps


def test_rows_hold_each_schedule_against_the_certified_minimiser():
    x = video_tokens(2, 20, 48, k=4, seed=1)
    rows = bs.set_rows("tiny", x)
    assert [r["schedule"] for r in rows] == list(bs.SCHEDULES)
    by = {r["schedule"]: r for r in rows}
    assert all(r["minimiser_certified"] and r["minimiser_gap"] < 1e-9 for r in rows)
    assert all(r["objective_gap"] > -1e-9 for r in rows)  # nothing beats the minimiser
    # no dark token: the continuation starts at weight 1, the same iterate bit for bit
    assert by["default"]["objective_gap"] == by["no_continuation"]["objective_gap"]
    assert by["default"]["objective_gap"] != by["no_balancing"]["objective_gap"]
    # a darkened token turns the continuation on: its answer differs
    dark = {r["schedule"]: r for r in bs.set_rows("dark", darkened(x, 3, 0.004))}
    assert dark["default"]["objective_gap"] != dark["no_continuation"]["objective_gap"]
    assert admm_steps.SCHEDULE == admm_steps.Schedule()  # the package's schedule untouched
