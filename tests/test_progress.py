"""SSC progress: the terminal bar, log lines otherwise, the ETA projection, the time budget."""

import io
import logging
import math

import pytest
import torch

from videoanchor.anchor import compute_anchor_scores
from videoanchor.anchor.progress import SSCProgress, as_reporter, format_seconds
from videoanchor.anchor.solvers.admm import solve_ssc_admm
from videoanchor.anchor.solvers.blocked import solve_ssc_blocked


class _Terminal(io.StringIO):
    def isatty(self):
        return True


class _Pipe(io.StringIO):
    def isatty(self):
        return False


def _tokens(n=30, d=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64)


def test_terminal_shows_a_bar_with_iteration_residual_eps_and_the_outcome():
    out = _Terminal()
    p = SSCProgress(enabled=True, stream=out)
    res = solve_ssc_admm(_tokens(), max_iter=12, eps=1e-9, progress=p, dtype=torch.float64)
    text = out.getvalue()
    assert not res.converged and res.iterations == 12
    assert "\r" in text  # tqdm redraws the line
    assert "/12, residual" in text and "(eps 1.0e-09)" in text
    assert "SSC cost estimate: 30 tokens" in text  # after the first 10 iterations
    last = text.strip().splitlines()[-1]
    assert "stopped at its iteration limit max_iter=12" in last and "NOT converged" in last
    assert f"{res.residual:.3g}" in last
    assert p.runs[-1].iterations == 12 and p.runs[-1].residual == res.residual


def test_without_a_terminal_it_logs_lines(caplog):
    out = _Pipe()
    p = SSCProgress(enabled=True, stream=out, log_every=1e-9)
    with caplog.at_level(logging.INFO, logger="videoanchor.progress"):
        res = solve_ssc_admm(_tokens(), max_iter=12, eps=1e-9, progress=p, dtype=torch.float64)
    assert out.getvalue() == ""  # nothing drawn on a pipe
    lines = [r.getMessage() for r in caplog.records if r.name == "videoanchor.progress"]
    assert any(line.startswith("SSC: 12/12, residual") for line in lines)
    assert any("cost estimate" in line for line in lines)
    ends = [r for r in caplog.records if "NOT converged" in r.getMessage()]
    assert len(ends) == 1 and ends[0].levelno == logging.WARNING
    assert f"{res.residual:.3g}" in ends[0].getMessage()


def test_converged_run_says_so_and_auto_stays_silent_for_short_runs(caplog):
    x = _tokens()
    with caplog.at_level(logging.INFO, logger="videoanchor.progress"):
        p = SSCProgress(enabled=True, stream=_Pipe(), log_every=1e-9)
        res = solve_ssc_admm(x, eps=1e-2, progress=p, dtype=torch.float64)
        assert res.converged
        assert p.runs[-1].converged and "converged in" in caplog.records[-1].getMessage()
        caplog.clear()
        quiet = _Terminal()
        solve_ssc_admm(x, eps=1e-2, progress=SSCProgress(enabled="auto", stream=quiet))
        solve_ssc_admm(x, eps=1e-2)  # progress=None: auto
    assert quiet.getvalue() == "" and not caplog.records


def test_blocked_mode_reports_every_block():
    out = _Terminal()
    p = SSCProgress(enabled=True, stream=out)
    res = solve_ssc_blocked(_tokens(), block_columns=10, max_iter=6, eps=1e-9, progress=p)
    text = out.getvalue()
    assert "block 1/3 it" in text and "block 3/3 it" in text
    assert res.block_iterations == [6, 6, 6] and p.runs[-1].iterations == 6
    assert not p.runs[-1].converged


def test_time_budget_stops_at_the_iterate_reached_and_is_reported():
    x = _tokens()
    p = SSCProgress(enabled=False, time_budget=1e-9)
    res = solve_ssc_admm(x, max_iter=50, eps=1e-9, progress=p, dtype=torch.float64)
    assert res.iterations == 1 and not res.converged
    assert p.runs[-1].stopped_by_budget and "time budget" in p.runs[-1].message()
    one = solve_ssc_admm(x, max_iter=1, eps=1e-9, progress=False, dtype=torch.float64)
    assert torch.equal(res.coef, one.coef)  # the iterate reached, nothing else
    # blocked: every block stops at its share of the budget
    b = solve_ssc_blocked(x, block_columns=10, max_iter=50, eps=1e-9, progress=p)
    assert b.block_iterations == [1, 1, 1] and not b.converged
    # through the public entry point
    r = compute_anchor_scores(
        x, n_clusters=3, max_iter=50, eps=1e-9, progress=p, solver="faithful"
    )  # (eps: the authors' stopping test)
    assert r.iterations == 1 and not r.converged and p.runs[-1].stopped_by_budget


def test_meeting_eps_as_the_budget_runs_out_is_converged():
    p = SSCProgress(enabled=False, time_budget=1e-9).begin(max_iter=10, eps=1e-3)
    assert p.update(1, 1e-4)  # the budget says stop, but this iterate met eps
    run = p.close(converged=True, iterations=1, residual=1e-4)
    assert run.converged and not run.stopped_by_budget and "converged in 1" in run.message()


def test_projection_extrapolates_the_log_residual():
    p = SSCProgress(enabled=False).begin(max_iter=100, eps=1e-9)
    for it in range(1, 21):
        assert not p.update(it, 0.5**it)
        assert (p.projected_iterations() is None) == (it < 20)  # needs 20 iterations
    # log2(1 / 1e-9) = 29.9: a halving residual reaches 1e-9 at iteration 30
    assert p.projected_iterations() == 30
    p = SSCProgress(enabled=False).begin(max_iter=100, eps=1e-3)
    for it in range(1, 21):
        p.update(it, 0.9**it)  # 0.9^66 = 9.6e-4: iteration 66
    assert p.projected_iterations() == math.ceil(math.log(1e-3) / math.log(0.9))
    p = SSCProgress(enabled=False).begin(max_iter=30, eps=1e-3)
    for it in range(1, 21):
        p.update(it, 0.9**it)
    assert p.projected_iterations() == 30  # capped at the limit
    p = SSCProgress(enabled=False).begin(max_iter=100, eps=1e-3)
    for it in range(1, 21):
        p.update(it, 1.0 + 0.01 * it)  # rising: no projection
    assert p.projected_iterations() is None


def test_bad_options():
    with pytest.raises(ValueError, match="enabled"):
        SSCProgress(enabled="yes")
    for bad in (0, -1.0, float("inf"), True, "10"):
        with pytest.raises(ValueError, match="time_budget"):
            SSCProgress(time_budget=bad)
    with pytest.raises(ValueError, match="progress"):
        as_reporter("verbose", max_iter=10, eps=1e-3)
    assert format_seconds(5) == "5.0 s" and format_seconds(125) == "2 min 05 s"
    assert format_seconds(7322) == "2 h 02 min" and format_seconds(None) == "?"
    assert format_seconds(0.0125) == "12.5 ms"


def test_library_use_without_logging_configured_still_prints_the_lines(monkeypatch, capsys):
    # A script that never configured logging (no handler anywhere; pytest's own handlers on
    # the root logger removed here) gets the lines on stderr from the default handler.
    progress_log = logging.getLogger("videoanchor.progress")
    monkeypatch.setattr(logging.root, "handlers", [])
    monkeypatch.setattr(progress_log, "handlers", [])
    monkeypatch.setattr(progress_log, "level", logging.NOTSET)
    p = SSCProgress(enabled=True, stream=_Pipe(), log_every=1e-9)
    solve_ssc_admm(_tokens(), max_iter=12, eps=1e-9, progress=p, dtype=torch.float64)
    err = capsys.readouterr().err
    assert "videoanchor: SSC: 12/12, residual" in err and "NOT converged" in err
    # a handler of the user's own takes over: here one that discards the lines
    progress_log.addHandler(logging.NullHandler())
    solve_ssc_admm(_tokens(), max_iter=12, eps=1e-9, progress=p, dtype=torch.float64)
    assert capsys.readouterr().err == ""
    assert [type(h) for h in progress_log.handlers] == [logging.NullHandler]


def test_fixed_schedule_says_it_ran_its_schedule_not_that_it_converged(caplog):
    """The fast solver has no stopping test: its end line and cost estimate name its fixed
    schedule, not eps or the 10000-iteration limit (seen on an H100: "converged in 60
    iterations (residual 0.15 vs eps 0.0002)", "the iteration limit (10000) would take 1 h")."""
    from videoanchor.anchor.solvers import admm_steps

    n_sched = admm_steps.SCHEDULE.iterations
    with caplog.at_level(logging.INFO, logger="videoanchor.progress"):
        p = SSCProgress(enabled=True, stream=_Pipe(), log_every=1e-9)
        res = solve_ssc_admm(_tokens(), scheduled=True, progress=p)
    lines = [r.getMessage() for r in caplog.records if r.name == "videoanchor.progress"]
    assert res.iterations == n_sched and p.runs[-1].fixed_schedule
    assert f"ran its fixed schedule of {n_sched} iterations" in lines[-1]
    assert not any("converged in" in line or "10000" in line for line in lines), lines
    assert any(f"fixed schedule of {n_sched} iterations takes about" in line for line in lines)
    assert any(line.startswith(f"SSC: {n_sched}/{n_sched}") for line in lines)
    # a max_iter under the schedule cuts it short, and says so
    with caplog.at_level(logging.INFO, logger="videoanchor.progress"):
        p = SSCProgress(enabled=True, stream=_Pipe(), log_every=1e-9)
        res = solve_ssc_admm(_tokens(), scheduled=True, max_iter=5, progress=p)
    assert res.iterations == 5 and not res.converged
    assert "NOT converged" in p.runs[-1].message()
