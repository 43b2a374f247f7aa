"""The memory rule of the SSC (docs/long-videos.md), with mocked readings of the memory."""

import math

import pytest
import torch

from videoanchor.anchor import compute_anchor_scores, plan
from videoanchor.anchor.plan import (
    MEMORY_FRACTION,
    MemoryReading,
    SSCMemoryError,
    admm_bytes,
    choose_strategy,
)


def _tokens(n=24, d=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g)


def test_meminfo_is_read_as_memavailable_in_kib(tmp_path):
    f = tmp_path / "meminfo"
    f.write_text("MemTotal:       1000 kB\nMemFree:         100 kB\nMemAvailable:    700 kB\n")
    assert plan.meminfo_available(str(f)) == 700 * 1024
    f.write_text("MemTotal: 1000 kB\n")
    assert plan.meminfo_available(str(f)) is None
    assert plan.meminfo_available(str(tmp_path / "missing")) is None


def test_cgroup_limit_counts_inactive_file_cache_as_free(tmp_path):
    (tmp_path / "memory.max").write_text("1000000\n")
    (tmp_path / "memory.current").write_text("600000\n")
    (tmp_path / "memory.stat").write_text("anon 1\ninactive_file 100000\nactive_file 5\n")
    assert plan.cgroup_available(str(tmp_path)) == 1000000 - 600000 + 100000
    (tmp_path / "memory.max").write_text("max\n")
    assert plan.cgroup_available(str(tmp_path)) is None


def test_cpu_reading_is_the_smaller_of_meminfo_and_the_cgroup(monkeypatch):
    monkeypatch.setattr(plan, "meminfo_available", lambda: 8 * 2**30)
    monkeypatch.setattr(plan, "cgroup_available", lambda: None)
    r = plan.read_available_memory(torch.device("cpu"))
    assert r.available == 8 * 2**30 and "MemAvailable" in r.source
    assert plan.free_memory_bytes(torch.device("cpu")) == int(8 * 2**30 * MEMORY_FRACTION)
    monkeypatch.setattr(plan, "cgroup_available", lambda: 2 * 2**30)
    r = plan.read_available_memory(torch.device("cpu"))
    assert r.available == 2 * 2**30 and "cgroup" in r.source
    monkeypatch.setattr(plan, "meminfo_available", lambda: None)
    assert plan.read_available_memory(torch.device("cpu")) is None  # no check


def _dense_need(x):
    n, d = x.shape
    return admm_bytes(n, d, 4, choose_strategy(n, d, True, "cpu"))


def test_auto_mode_switches_exactly_where_the_budget_meets_the_dense_need(monkeypatch):
    x = _tokens()
    need = _dense_need(x)
    kw = dict(n_clusters=3, max_iter=5, progress=False, block_columns=8)
    # the smallest reading whose budget holds the need, and the one just below
    fits = math.ceil(need / MEMORY_FRACTION)
    while int(fits * MEMORY_FRACTION) < need:
        fits += 1
    reading = {"v": fits}
    monkeypatch.setattr(
        plan, "read_available_memory", lambda device: MemoryReading(reading["v"], "mock")
    )
    assert compute_anchor_scores(x, **kw).mode == "exact"
    reading["v"] = fits - 1
    assert int(reading["v"] * MEMORY_FRACTION) < need
    assert compute_anchor_scores(x, **kw).mode == "blocked"


def test_forced_exact_refusal_names_the_reading_and_fits_the_device(monkeypatch):
    x = _tokens()
    need = _dense_need(x)
    avail = need  # available equals the need, but only 90% of it may be used
    monkeypatch.setattr(
        plan, "read_available_memory", lambda device: MemoryReading(avail, "MemAvailable")
    )
    with pytest.raises(SSCMemoryError) as err:
        compute_anchor_scores(x, n_clusters=3, mode="exact", max_iter=5, progress=False)
    msg = str(err.value)
    assert f"N = {x.shape[0]} tokens" in msg
    assert plan.format_bytes(need) in msg  # the need
    assert f"{plan.format_bytes(avail)} is available (MemAvailable)" in msg  # the reading
    assert f"{MEMORY_FRACTION:.0%}" in msg and plan.format_bytes(int(avail * 0.9)) in msg
    assert "features.cpu()" not in msg  # already on the CPU
    assert "mode='blocked'" in msg
    # features on a GPU get the hint to move them to the CPU (reading mocked: no GPU needed)
    with pytest.raises(SSCMemoryError, match=r"features\.cpu\(\)"):
        plan.check_memory(need, torch.device("cuda", 0), n=24, d=6, what="Dense SSC")
    # with room to spare the check passes
    plan.check_memory(int(avail * 0.9), torch.device("cpu"), n=24, d=6, what="Dense SSC")
