"""benchmarks/bench_decode.py without a GPU: the plan of ``--graph`` (issue 92's CUDA-graph
rows: batch 1-64, 8k-128k cached tokens) and every provider's call run once on the CPU with
the timers replaced (the shapes and arguments a GPU run passes; the capture itself needs
CUDA)."""

from __future__ import annotations

import pytest
import torch

from benchmarks import bench_decode as bd


def test_graph_plan_covers_batch_1_to_64_and_8k_to_128k():
    rows = bd.main(["--graph", "--dry-run"])
    assert {(r["B"], r["S"]) for r in rows} == {
        (B, S) for B in (1, 8, 64) for S in (8192, 32768, 131072)
    }
    for r in rows:
        assert r["providers"] == r["graph_timed"] == list(bd.GRAPH_TIMED)
        assert "flex" not in r["providers"]
    # The largest cache (batch 64 at 128k) is one copy of 16 GiB: it fits an 80 GB H100
    # beside the pre-scaled V that the SDPA-with-a-mask baseline makes (8 GiB).
    big = max(rows, key=lambda r: r["kv_bytes"])
    assert big["caches"] == 1 and big["cache_gib"] == 16.0
    plain = bd.main(["--dry-run"])
    assert {r["B"] for r in plain} == {1, 8} and "flex" in plain[0]["providers"]


def test_every_graph_provider_runs_with_its_arguments(monkeypatch):
    monkeypatch.setattr(bd, "bench", lambda fn: (fn(), 1.0, 1.0, 1.0)[1:])
    graphed = []

    def fake_graph(fn):
        graphed.append(fn().shape)
        return 0.5

    monkeypatch.setattr(bd, "bench_graph", fake_graph)
    monkeypatch.setattr(bd, "peak_mib", lambda fn: 0.0)
    torch.manual_seed(0)
    rows = bd.decode_shape(2, 96, None, 1.0, bd.GRAPH_TIMED, device="cpu")
    assert [r["provider"] for r in rows] == list(bd.GRAPH_TIMED)
    for r in rows:
        assert "error" not in r and "graph_error" not in r, r
        assert r["ms_graph"] == 0.5 and r["kv_gbs_graph"] == pytest.approx(2 * r["kv_gbs"])
    assert graphed == [torch.Size([2, bd.HQ, 1, bd.D])] * len(bd.GRAPH_TIMED)
    # The anchored providers (gates given, prepared, as an SDPA mask) agree.
    for r in rows:
        if "max_diff_vs_anchored" in r:
            assert r["max_diff_vs_anchored"] < 2e-2, r
