"""benchmarks/bench_workset_cuda.py on the CPU (issue 98 items 3 and 9): the video-like rows
ask for the paper's 24 clusters, a failing ``warm_up`` or row is written down and the other
rows run, and each row is rewritten as its stages end (what a time limit leaves). The
scores are the real ones with the fast solver (the default's interpreted column kernel takes
minutes here: tests/test_workset_cuda.py's smoke run covers it)."""

from __future__ import annotations

import copy
import json

import pytest

from benchmarks import bench_workset_cuda as bwc
from benchmarks import common


@pytest.fixture
def fast_scores(monkeypatch):
    """compute_anchor_scores with the fast solver and at most 2 clusters (tiny sets); the
    clusters each call asked for, and the calls on 24 tokens, raise."""
    import videoanchor.anchor as anchor

    real, asked = anchor.compute_anchor_scores, []

    def scores(x, k, **kw):
        asked.append(k)
        if x.shape[0] == 24:
            raise RuntimeError("boom")
        return real(x, min(k, 2), **{**kw, "solver": "fast"})

    monkeypatch.setattr(anchor, "compute_anchor_scores", scores)
    return asked


def test_the_clusters_default_to_the_papers_24(monkeypatch):
    """Issue 98 item 9: the video-like rows' n_clusters is 24 (not frames / 2) in both GPU
    benchmarks' command lines and functions."""
    import argparse
    import inspect

    from benchmarks import bench_scores_beside as bsb

    real, parsed = argparse.ArgumentParser.parse_args, []

    def parse(self, args=None, namespace=None):  # the defaults, then stop
        parsed.append(real(self, []))
        raise SystemExit(0)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse)
    for module in (bwc, bsb):
        assert module.CLUSTERS == 24
        assert inspect.signature(module.run).parameters["clusters"].default == 24
        with pytest.raises(SystemExit):
            module.main([])
        assert parsed.pop().clusters == 24, module


def test_a_failing_row_and_warm_up_are_written_and_the_others_run(tmp_path, monkeypatch,
                                                                   fast_scores):  # fmt: skip
    def warm_up(device):
        raise RuntimeError("no compile")

    seen = []

    def write(name, meta, rows, out_dir=None):
        seen.append(copy.deepcopy(rows))
        return common.write_result(name, meta, rows, out_dir)

    monkeypatch.setattr(bwc.wc, "warm_up", warm_up)
    monkeypatch.setattr(bwc, "write_result", write)
    # 3 frames of 8 tokens (24: raises), then 2 frames (16 tokens)
    path = bwc.run({"tiny": (8, 12)}, [3, 2], tmp_path, smoke=True, dense=False,
                   yardstick=False, share_cost=False)  # fmt: skip
    got = json.loads(path.read_text())
    assert got["meta"]["warm_up_error"] == "RuntimeError: no compile"
    assert got["meta"]["clusters"] == 24 and "seconds_warm_up" not in got["meta"]
    failed, ran = got["rows"]
    assert failed["error"] == "RuntimeError: boom" and failed["error_in"] == "seconds_default_first"
    assert "in_progress" not in failed and failed["clusters"] == 24 and failed["scenes"] == 2
    assert "error" not in ran and "in_progress" not in ran, ran
    assert ran["answered"] == "fast" and ran["seconds_default"] > 0 and ran["seconds_fast"] > 0
    assert ran["seconds_default_first"] > 0 and ran["clusters"] == 24
    assert set(fast_scores) == {24}  # every call asked for the paper's clusters
    # the file before any row, then each stage of a row as it starts
    assert seen[0] == []
    stages = [rows[-1].get("in_progress") for rows in seen[1:] if rows[-1]["frames"] == 2]
    assert stages[:4] == ["tokens", "seconds_default_first", "seconds_default", "seconds_fast"]
    assert stages[-1] is None  # the row's end
    # a stage's figures are in the file written when the next stage starts
    at_fast = next(rows[-1] for rows in seen[1:] if rows[-1].get("in_progress") == "seconds_fast")
    # (the first sample: a row under 2 s is then timed twice more, its medians kept)
    assert at_fast["seconds_default"] == ran["samples_default"][0] and "seconds_fast" not in at_fast


def test_a_row_past_the_budget_is_written_as_not_run(tmp_path, fast_scores):
    path = bwc.run({"tiny": (8, 12)}, [2, 2], tmp_path, smoke=True, dense=False,
                   yardstick=False, share_cost=False, budget=0.0)  # fmt: skip
    rows = json.loads(path.read_text())["rows"]
    assert [r["skipped"] for r in rows] == ["past the run's budget of 0 s"] * 2
