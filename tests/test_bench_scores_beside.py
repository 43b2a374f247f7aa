"""benchmarks/bench_scores_beside.py (issue 90 step 6) on the CPU: ``--quick`` runs the
GPU's code path with threads and ``perf_counter`` (its figures say nothing of a GPU); the
losses are the pairs' own ratios, the order alternates, the plain work runs only while the
scores' thread is calling, at most ``depth`` steps are queued, and a failing call of the
scores is reported in its row."""

from __future__ import annotations

import json
import statistics
import threading
import time

import pytest
import torch

from benchmarks import bench_scores_beside as bsb


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    path = bsb.main(["--quick", "--window", "0.1", "--out-dir", str(tmp_path_factory.mktemp("b"))])
    assert path.name == "scores_beside_cpu.json"
    return json.loads(path.read_text())


def test_quick_rows_hold_each_pairs_loss_and_the_scores_latency(result):
    meta, rows = result["meta"], result["rows"]
    cuda = torch.cuda.is_available()  # (on a GPU machine --quick runs on its streams)
    assert meta["quick"] and meta["streams"] == cuda and meta["git_sha"] and meta["torch"]
    assert meta["timer"] == ("cuda events" if cuda else "perf_counter (CPU)")
    assert meta["device"].startswith("cpu") != cuda
    plain = meta["plain"]
    assert plain["items_per_step"] == bsb.QUICK_PLAIN["step_items"]
    assert plain["cuda_graph"] == cuda
    assert plain["item_us"] == pytest.approx(1e3 * plain["step_ms"] / plain["items_per_step"])
    assert [(r["frames"], r["n"]) for r in rows] == [(f, f * p) for f, p, _ in bsb.QUICK_SCORES]
    for r in rows:
        assert "error" not in r and "skipped" not in r, r
        pairs = r["pair_rows"]
        assert r["pairs"] == len(pairs) == 3 and r["losses"] == [p["loss"] for p in pairs]
        assert [p["order"] for p in pairs] == ["alone first", "beside first", "alone first"]
        for p in pairs:
            assert p["loss"] == pytest.approx(1 - p["items_per_s_beside"] / p["items_per_s_alone"])
            per_busy = [p[f"items_per_s_{k}"] / p[f"busy_share_{k}"] for k in ("alone", "beside")]
            assert p["loss_gpu"] == pytest.approx(1 - per_busy[1] / per_busy[0])
            assert 0 < p["busy_share_alone"] <= 1 + 1e-9 and 0 < p["busy_share_beside"] <= 1 + 1e-9
            assert p["scores_calls_beside"] >= 1 and p["window_s"] > 0
            assert all(0 < s <= p["window_s"] for s in p["scores_beside_s"])
        assert r["loss"] == statistics.median(r["losses"])
        assert r["items_per_s_alone"] == statistics.median(p["items_per_s_alone"] for p in pairs)
        alone = r["scores_ms_alone_samples"]
        assert len(alone) == 4 and r["scores_ms_alone"] == statistics.median(alone[1:])
        beside = r["scores_ms_beside_samples"]
        assert beside == [1e3 * s for p in pairs for s in p["scores_beside_s"]]
        if beside:
            assert r["scores_beside_over_alone"] == pytest.approx(
                statistics.median(beside) / r["scores_ms_alone"]
            )


def _tiny_work():
    return bsb.PlainWork(torch.device("cpu"), batch=2, hidden=8, n_out=16, items=2)


def _scores_thread_alive() -> bool:
    return any(isinstance(t, bsb.ScoresBeside) and t.is_alive() for t in threading.enumerate())


def test_the_plain_work_runs_beside_a_calling_thread_in_alternating_order(monkeypatch):
    seen, real = [], bsb.plain_window
    calls = []

    def window(*args):
        seen.append(_scores_thread_alive())
        return real(*args)

    monkeypatch.setattr(bsb, "plain_window", window)
    call = lambda: (calls.append(threading.current_thread().name), time.sleep(0.002))  # noqa: E731
    out = bsb.measure(_tiny_work(), call, torch.device("cpu"), pairs=3, depth=2, window=0.02,
                      step_s=1e-3)  # fmt: skip
    assert seen == [False, True, True, False, False, True]
    assert out["pairs"] == 3 and out["steps"] >= 20
    assert calls[:2] == ["MainThread"] * 2  # the warm-up and the first alone call
    assert sum(p["scores_calls_beside"] for p in out["pair_rows"]) == sum(
        name != "MainThread" for name in calls
    )


def test_at_most_depth_steps_are_queued():
    """On CUDA a mark is an event and ``wait`` its synchronisation: before step ``i`` is
    issued, step ``i - depth - 1`` has ended."""
    log = []

    class Clock:
        cuda = True
        marks = 0

        def mark(self):
            self.marks += 1
            return self.marks

        def wait(self, mark):
            log.append(("wait", mark))

        def seconds(self, a, b):
            return 1e-3 * (b - a)

    class Work:
        items = 3

        def step(self):
            log.append(("step", None))

    out = bsb.plain_window(Work(), 6, 2, Clock(), None)
    steps = [i for i, (kind, _) in enumerate(log) if kind == "step"]
    waited = [m for kind, m in log if kind == "wait"]
    # step i's end is mark 2i + 2: the waits follow the steps 0..3, then the last one's
    assert waited == [2, 4, 6, 8, 12]
    for i, at in enumerate(steps):  # before step i: the ends of steps up to i - 3 waited for
        ended = {m for kind, m in log[:at] if kind == "wait"}
        assert all(2 * j + 2 in ended for j in range(i - 2)), i
    assert out["items_per_s"] == pytest.approx(6 * 3 / (1e-3 * 11))


def test_a_failing_call_beside_the_plain_work_is_reported(tmp_path, monkeypatch):
    def call():
        if threading.current_thread().name != "MainThread":
            raise ValueError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        bsb.measure(_tiny_work(), call, torch.device("cpu"), pairs=1, depth=1, window=0.01,
                    step_s=1e-3)  # fmt: skip
    # in a run the row names it (the run goes on)
    monkeypatch.setattr(bsb, "QUICK_SCORES", ((2, 4, 6),))
    import videoanchor.anchor as anchor

    monkeypatch.setattr(anchor, "compute_anchor_scores", lambda *a, **k: call())
    rows = json.loads(bsb.run(quick=True, window=0.01, out_dir=tmp_path).read_text())["rows"]
    assert rows[0]["error"].startswith("RuntimeError") and "boom" in rows[0]["error"]


def test_bad_arguments_are_refused(capsys):
    with pytest.raises(SystemExit):
        bsb.main(["--quick", "--depth", "0"])
    assert "--depth: expected at least 1, got 0" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU's sizes run there")
def test_without_cuda_the_gpu_sizes_say_they_skip(capsys):
    # a skip line, as `videoanchor bench` collects them
    assert bsb.main([]) is None
    assert "bench_scores_beside: skipped: needs a CUDA device" in capsys.readouterr().out


def test_a_failing_plain_work_is_written_into_every_row(tmp_path, monkeypatch):
    """Issue 98 item 3: the plain work's setup raising (on a GPU: its CUDA graph's capture)
    still gives the file, each row naming the error."""

    def broken(*a, **k):
        raise RuntimeError("capture failed")

    monkeypatch.setattr(bsb, "PlainWork", broken)
    got = json.loads(bsb.run(quick=True, window=0.01, out_dir=tmp_path).read_text())
    assert [r["frames"] for r in got["rows"]] == [f for f, _, _ in bsb.QUICK_SCORES]
    assert {r["error"] for r in got["rows"]} == {"the plain work: RuntimeError: capture failed"}


def test_the_row_is_written_after_each_pair(tmp_path, monkeypatch):
    """What a time limit leaves: the file rewritten after each pair with the row's figures
    over the pairs so far (``in_progress`` until the row ends); the clusters asked for are
    the row's (the paper's 24, at most frames / 2 on --quick's tiny sets)."""
    import copy

    import videoanchor.anchor as anchor
    from benchmarks import common

    asked, seen = [], []
    monkeypatch.setattr(bsb, "QUICK_SCORES", ((6, 4, 6),))
    monkeypatch.setattr(anchor, "compute_anchor_scores",
                        lambda x, k, **kw: (asked.append(k), time.sleep(0.002)))  # fmt: skip

    def write(name, meta, rows, out_dir=None):
        seen.append(copy.deepcopy(rows))
        return common.write_result(name, meta, rows, out_dir)

    monkeypatch.setattr(bsb, "write_result", write)
    got = json.loads(bsb.run(quick=True, window=0.01, out_dir=tmp_path).read_text())
    (row,) = got["rows"]
    assert row["pairs"] == 3 and "in_progress" not in row and "error" not in row
    assert (row["clusters"], row["scenes"]) == (3, 3) and set(asked) == {3}
    assert got["meta"]["clusters"] == bsb.CLUSTERS == 24
    # before the pairs, after the 1st and the 2nd (the 3rd: the row's end, by finish)
    assert [r[0].get("pairs") for r in seen] == [None, 1, 2]
    assert all(r[0]["in_progress"] == "pairs" for r in seen)
    assert seen[1][0]["losses"] == row["losses"][:1] and seen[2][0]["losses"] == row["losses"][:2]
