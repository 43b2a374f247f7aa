"""The vLLM plugin's operator metrics and warning routing (videoanchor/integrations/vllm/
metrics.py), without an engine: counts written by several processes and summed at a scrape
in Prometheus' text format, and ``warnings.warn`` of the scores sent to the plugin's logger
naming the request, from two threads at once. tests/test_vllm_server.py scrapes the real
server's ``/metrics``. The collector's parts need prometheus_client (vLLM's venv)."""

from __future__ import annotations

import logging
import subprocess
import sys
import threading
import warnings

import pytest
import torch

from videoanchor.integrations.vllm import metrics

# Another process counting (the engine core, a worker); metrics.py loaded alone (it imports
# nothing of videoanchor), so the child starts in a fraction of a second.
CHILD = """
import importlib.util, sys
spec = importlib.util.spec_from_file_location("metrics", sys.argv[1])
metrics = importlib.util.module_from_spec(spec)
spec.loader.exec_module(metrics)
metrics.count("videoanchor_ssc_runs", where="ahead")
metrics.observe("videoanchor_ssc_seconds", 0.3, where="ahead")
metrics.observe("videoanchor_ssc_visual_tokens", 300, where="ahead")
metrics.count("videoanchor_score_cache_misses")
metrics.refused("extra_args['videoanchor_max_iter']: expected at most 200 on this server")
"""


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """This process's counts emptied, written to ``tmp_path``."""
    monkeypatch.setenv(metrics.ENV, str(tmp_path))
    metrics.reset_counts()
    return tmp_path


def _child(path):
    env = {metrics.ENV: str(path), "PATH": "/usr/bin:/bin"}
    subprocess.run([sys.executable, "-c", CHILD, metrics.__file__], env=env, check=True,
                   timeout=120)  # fmt: skip


def test_counts_of_several_processes_are_summed(fresh):
    _child(fresh)
    _child(fresh)
    metrics.count("videoanchor_ssc_runs", where="step")
    metrics.count("videoanchor_score_cache_hits", 2)
    metrics.observe("videoanchor_ssc_seconds", 7.0, where="ahead")  # bucket le=10
    metrics.observe("videoanchor_ssc_seconds", 1000.0, where="ahead")  # past the last bound
    total = metrics.read(fresh)
    assert total["videoanchor_ssc_runs"] == {("ahead",): 2.0, ("step",): 1.0}
    assert total["videoanchor_score_cache_misses"] == {(): 2.0}
    assert total["videoanchor_score_cache_hits"] == {(): 2.0}
    assert total["videoanchor_requests_refused"] == {("videoanchor_max_iter",): 2.0}
    seconds = total["videoanchor_ssc_seconds"][("ahead",)]
    bounds = metrics.SERIES["videoanchor_ssc_seconds"][3]
    assert seconds[bounds.index(0.5)] == 2  # 0.3 s twice, in the bucket le=0.5
    assert seconds[bounds.index(10.0)] == 1 and seconds[-2] == 1  # 7 s; 1000 s in +Inf
    assert sum(seconds[:-1]) == 4 and seconds[-1] == pytest.approx(0.6 + 1007.0)
    assert total["videoanchor_ssc_visual_tokens"][("ahead",)][-1] == 600
    assert len(list(fresh.glob("*.json"))) == 3  # one file per process


def test_bad_series_or_labels_are_value_errors(fresh):
    with pytest.raises(ValueError, match="unknown series"):
        metrics.count("videoanchor_nope")
    with pytest.raises(ValueError, match=r"takes labels \('where',\), got \(\)"):
        metrics.count("videoanchor_ssc_runs")
    with pytest.raises(ValueError, match="not a counter"):
        metrics.count("videoanchor_ssc_seconds", where="step")
    with pytest.raises(ValueError, match="not a histogram"):
        metrics.observe("videoanchor_ssc_runs", 1.0, where="step")


def test_prometheus_text_of_the_summed_counts(fresh):
    prom = pytest.importorskip("prometheus_client")
    _child(fresh)
    metrics.count("videoanchor_ssc_runs", where="ahead")
    registry = prom.CollectorRegistry()
    registry.register(metrics._Collector(str(fresh)))
    text = prom.generate_latest(registry).decode()
    lines = set(text.splitlines())
    assert 'videoanchor_ssc_runs_total{where="ahead"} 2.0' in lines, text
    assert 'videoanchor_ssc_runs_total{where="step"} 0.0' in lines, text  # shown from the start
    assert "videoanchor_score_cache_misses_total 1.0" in lines, text
    assert "videoanchor_score_cache_hits_total 0.0" in lines, text
    assert "videoanchor_requests_held_total 0.0" in lines, text
    assert 'videoanchor_requests_refused_total{option="videoanchor_max_iter"} 1.0' in lines
    assert 'videoanchor_failures_total{where="step"} 0.0' in lines, text
    assert 'videoanchor_ssc_seconds_bucket{le="0.25",where="ahead"} 0.0' in lines, text
    assert 'videoanchor_ssc_seconds_bucket{le="0.5",where="ahead"} 1.0' in lines, text
    assert 'videoanchor_ssc_seconds_bucket{le="+Inf",where="ahead"} 1.0' in lines, text
    assert 'videoanchor_ssc_seconds_count{where="ahead"} 1.0' in lines, text
    assert 'videoanchor_ssc_visual_tokens_sum{where="ahead"} 300.0' in lines, text
    assert not [ln for ln in lines if ln and not ln.startswith(("#", "videoanchor_"))], text


def test_warnings_of_the_scores_go_to_the_plugin_logger_naming_the_request(monkeypatch):
    """The SSC input check's warning (``warnings.warn`` in videoanchor/anchor/_inputs.py: one
    token's norm dominates), raised on two threads at once, each scoring its own request:
    each record names its own request; a warning outside any request and outside
    videoanchor's code goes where it went before."""
    from videoanchor.anchor import compute_anchor_scores

    shown = []
    metrics.route_warnings(False)  # as a process starts (an earlier test may have routed)
    monkeypatch.setattr(warnings, "showwarning", lambda *a, **k: shown.append(a[0]))
    metrics.route_warnings()
    metrics.route_warnings()  # once
    records, errors = [], []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record)

    log = logging.getLogger("videoanchor.vllm")
    handler = Keep(level=logging.WARNING)
    log.addHandler(handler)
    barrier = threading.Barrier(2)

    def score(req_id, n):
        feats = torch.randn(n, 8, generator=torch.Generator().manual_seed(n))
        feats[0] *= 1e6  # a dominant token
        barrier.wait()
        try:
            with metrics.scoring(req_id):
                compute_anchor_scores(feats, 2, max_iter=3)
        except Exception as err:  # failed on its thread: reported below
            errors.append(err)

    try:
        threads = [threading.Thread(target=score, args=(f"req-{n}", n)) for n in (21, 33)]
        with warnings.catch_warnings():  # (keeps showwarning: the routing is installed)
            warnings.simplefilter("always")
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            warnings.warn("someone else's warning", UserWarning, stacklevel=1)
    finally:
        log.removeHandler(handler)
        metrics.route_warnings(False)
    assert not errors, errors
    lines = [r.getMessage() for r in records if "feature norm" in r.getMessage()]
    assert len(lines) == 2, [r.getMessage() for r in records]
    assert any(m.startswith("videoanchor: request req-21: features: token 0") for m in lines)
    assert any(m.startswith("videoanchor: request req-33: features: token 0") for m in lines)
    assert all("(UserWarning at " in m for m in lines), lines
    assert [str(w) for w in shown] == ["someone else's warning"], shown
    # route_warnings(False) (in the finally above): videoanchor's warnings go where they
    # went before again, not to the plugin's logger
    feats = torch.randn(21, 8, generator=torch.Generator().manual_seed(21))
    feats[0] *= 1e6
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        compute_anchor_scores(feats, 2, max_iter=3)
    assert any("feature norm" in str(w) for w in shown[1:]), shown


def test_the_log_line_and_cache_counts_of_a_scored_request(fresh, caplog):
    """scoring.report: one INFO line per request, whatever its scores' source (computed
    here, for another request with the same items, on another rank, or from the cache, with
    the score cache on or off), and the cache hit or miss counted. The runs it names are
    recorded with scoring.record_run, as run_ssc records them."""
    from videoanchor.integrations.score_cache import ScoreCache
    from videoanchor.integrations.vllm import scoring

    p = scoring.Plan(items=[0], cols=[torch.arange(5)], n=286, k=4, key="k-report-test")
    cache = ScoreCache(1 << 20)
    cache.put(p.key, torch.zeros(286))
    scoring.reset_runs()  # no run of this key in this process: it ran on another rank
    try:
        with caplog.at_level(logging.INFO, logger="videoanchor.vllm"):
            scoring.report("r-other-rank", p, False, cache)
            scoring.record_run(p.key, scoring.SSCRun("r-first", "ahead", 0.25, "fast", 60, True))
            scoring.report("r-first", p, False, cache)
            run = scoring.SSCRun("r-first", "ahead", 0.25, "faithful", 200, False)
            scoring.record_run(p.key, run)  # the key's latest run replaces the one before
            assert scoring.runs() == {p.key: run}
            scoring.report("r-same-items", p, False, cache)
            scoring.report("r-hit", p, True, cache)
            scoring.report("r-no-cache", p, False, None)
            scoring.record_run(p.key, scoring.SSCRun("r-gap", "step", 0.5, "workset", 3, True,
                                                     1.2e-4))  # fmt: skip
            scoring.report("r-gap", p, False, cache)
            scoring.record_run(p.key, scoring.SSCRun("r-share", "step", 0.5, "workset", 3, True,
                                                     None, "steady", 0.25))  # fmt: skip
            scoring.report("r-share", p, False, cache)
            scoring.record_run(p.key, scoring.SSCRun("r-long", "step", 9.5, "workset", 40, True,
                                                     None, "steady", 1.0, "blocked"))  # fmt: skip
            scoring.report("r-long", p, False, cache)
    finally:
        scoring.reset_runs()
    assert scoring.runs() == {}
    lines = {r.getMessage().split(":")[1].split()[1]: r.getMessage() for r in caplog.records}
    assert len(caplog.records) == 8 and all(r.levelno == logging.INFO for r in caplog.records)
    # the working sets by blocks (issue 99): blocked mode's workset solver
    assert (
        "SSC 9.50 s, workset solver by column blocks, 40 iterations, steady" in (lines["r-long"])
    ), lines["r-long"]
    assert "column blocks" not in lines["r-share"]
    # the cluster share that ran and the paper's share's weight in it (issue 91)
    assert (
        "workset solver, 3 iterations, steady cluster share (weight 0.25), in its step;"
        in (lines["r-share"])
    ), lines["r-share"]
    # the relative duality gap of the C returned (issue 79), where the solver computed one
    assert (
        "SSC 0.50 s, workset solver, 3 iterations, duality gap 0.00012, in its step;"
        in (lines["r-gap"])
    ), lines["r-gap"]
    assert "duality gap" not in lines["r-first"]
    assert lines["r-other-rank"].startswith(
        "videoanchor: request r-other-rank: 286 visual tokens, 4 clusters: SSC run on another "
        "tensor-parallel rank; score cache miss"
    ), lines["r-other-rank"]
    assert (
        "SSC 0.25 s, fast solver, 60 iterations, ahead of its step; score cache miss (engine: "
        "0 hits, 2 misses, 1 entries, 0.00 of 1 MiB, 0 evictions)"
    ) in lines["r-first"], lines["r-first"]
    assert (
        "SSC 0.25 s, faithful solver, 200 iterations (NOT converged), ahead of its step (for "
        "request r-first, same items and options)"
    ) in lines["r-same-items"], lines["r-same-items"]
    assert (
        "scores from the score cache (no SSC); score cache hit (engine: 1 hits, 3 misses"
        in (lines["r-hit"])
    )
    assert lines["r-no-cache"].endswith("; no score cache"), lines["r-no-cache"]
    total = metrics.read(fresh)
    assert total["videoanchor_score_cache_hits"] == {(): 1.0}
    assert total["videoanchor_score_cache_misses"] == {(): 6.0}  # none counted without a cache
