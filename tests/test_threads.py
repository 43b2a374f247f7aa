"""Bounded thread pools in the anchor layer (issue 53): videoanchor/anchor/threads.py."""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from threadpoolctl import threadpool_info

from videoanchor.anchor import threads
from videoanchor.anchor.clustering import spectral_clustering

ROOT = Path(__file__).resolve().parents[1]


def _pools(api: str) -> dict[str, int]:
    return {p["filepath"]: p["num_threads"] for p in threadpool_info() if p["user_api"] == api}


def _inside(fn, *args, **kw):
    """What the pools are set to while ``fn`` runs (seen from one of its callees)."""
    seen = {}
    original = torch.linalg.svd

    def spy(*a, **k):
        seen.setdefault("torch", torch.get_num_threads())
        seen.setdefault("blas", _pools("blas"))
        seen.setdefault("openmp", _pools("openmp"))
        return original(*a, **k)

    torch.linalg.svd = spy
    try:
        fn(*args, **kw)
    finally:
        torch.linalg.svd = original
    return seen


def _affinity(n=96, k=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    lab = torch.arange(n) % k
    w = torch.rand(n, n, generator=g, dtype=torch.float64) * 0.05
    w += (lab[:, None] == lab[None, :]) * torch.rand(n, n, generator=g, dtype=torch.float64)
    w = (w + w.T) / 2
    w.fill_diagonal_(0)
    return w, lab


def test_usable_cores_is_the_affinity_at_most():
    cores = threads.usable_cores()
    assert 1 <= cores <= len(os.sched_getaffinity(0))


def test_cgroup_quota_in_whole_cores(tmp_path):
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert threads._cgroup_quota_cores(str(tmp_path)) == 2
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert threads._cgroup_quota_cores(str(tmp_path)) is None
    assert threads._cgroup_quota_cores(str(tmp_path / "absent")) is None


@pytest.fixture
def idle(monkeypatch):
    """No other work running (the counts below do not depend on this machine's load)."""
    monkeypatch.setattr(threads, "running_elsewhere", lambda: 0)


_original_running = threads.running_elsewhere


def test_free_cores_are_the_cores_less_the_running_work(monkeypatch, tmp_path):
    load = tmp_path / "loadavg"
    monkeypatch.setattr(threads, "usable_cores", lambda: 4)
    monkeypatch.setattr(threads.os, "cpu_count", lambda: 4)
    monkeypatch.setattr(
        threads, "running_elsewhere", lambda: _original_running(str(load), here=lambda: 1)
    )
    for running, free in ((1, 4), (2, 3), (4, 1), (9, 1)):  # the caller is one of them
        load.write_text(f"0.50 0.40 0.30 {running}/300 1234\n")
        assert threads.free_cores() == free, running
    monkeypatch.setattr(threads, "running_elsewhere", lambda: None)  # no /proc/loadavg
    assert threads.free_cores() == 4


def test_running_elsewhere_reads_the_kernel_s_count(tmp_path):
    load = tmp_path / "loadavg"
    load.write_text("0.50 0.40 0.30 5/300 1234\n")
    assert _original_running(str(load), here=lambda: 1) == 4
    # this process's own running threads (a parallel region's spinning OpenMP threads) are
    # not work beside it
    assert _original_running(str(load), here=lambda: 3) == 2
    assert _original_running(str(load), here=lambda: 9) == 0
    assert _original_running(str(tmp_path / "absent")) is None
    load.write_text("garbage\n")
    assert _original_running(str(load)) is None


def test_running_here_counts_this_process_s_running_threads(tmp_path):
    assert threads._running_here() >= 1  # the caller runs
    for tid, state in ((1, "R"), (2, "S"), (3, "R")):
        (tmp_path / str(tid)).mkdir()
        (tmp_path / str(tid) / "stat").write_text(f"{tid} (py (worker) 1) {state} 1 2 3\n")
    assert threads._running_here(str(tmp_path)) == 2
    assert threads._running_here(str(tmp_path / "absent")) == 1


def test_bounded_takes_fewer_threads_beside_running_work(monkeypatch):
    n = torch.get_num_threads()
    torch.set_num_threads(2)
    monkeypatch.setattr(threads, "usable_cores", lambda: 2)
    monkeypatch.setattr(threads.os, "cpu_count", lambda: 2)
    try:
        monkeypatch.setattr(threads, "running_elsewhere", lambda: 1)  # one core taken
        with threads.bounded():
            assert torch.get_num_threads() == 1
        monkeypatch.setattr(threads, "running_elsewhere", lambda: 0)
        with threads.bounded():
            assert torch.get_num_threads() == 2
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(n)


def test_the_spectral_step_runs_with_bounded_pools_and_restores_them(idle):
    import scipy.linalg  # noqa: F401  (its OpenBLAS loaded, as in any run of the step)

    w, lab = _affinity()
    torch_before, blas_before = torch.get_num_threads(), _pools("blas")
    seen = _inside(spectral_clustering, w, 4, seed=0)
    assert seen["torch"] == min(torch_before, threads.usable_cores())
    assert seen["blas"] and set(seen["blas"].values()) == {1}, seen  # SciPy's, NumPy's OpenBLAS
    assert all(v <= seen["torch"] for v in seen["openmp"].values()), seen
    assert torch.get_num_threads() == torch_before and _pools("blas") == blas_before


def test_the_caller_s_count_is_kept_and_never_raised(monkeypatch, idle):
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with threads.bounded():
            assert torch.get_num_threads() == 1
        with threads.bounded(64):  # more than the cores: the cores
            assert torch.get_num_threads() == threads.usable_cores()
            with threads.bounded(1):  # nested: the outer one's counts stay
                assert torch.get_num_threads() == threads.usable_cores()
        assert torch.get_num_threads() == 1
        monkeypatch.setenv("VIDEOANCHOR_THREAD_LIMITS", "0")
        blas = _pools("blas")
        with threads.bounded(64):  # turned off: nothing changes
            assert torch.get_num_threads() == 1 and _pools("blas") == blas
    finally:
        torch.set_num_threads(n)


def test_a_side_thread_bounds_only_itself():
    # OpenMP's and torch's counts are per thread: the vLLM plugin's SSC thread bounding its
    # own work leaves the model's thread as it was
    main = torch.get_num_threads()
    seen = {}

    def side():
        with threads.bounded(1):
            seen["side"] = torch.get_num_threads()
            time.sleep(0.05)

    t = threading.Thread(target=side)
    t.start()
    time.sleep(0.02)
    seen["main"] = torch.get_num_threads()
    t.join()
    assert seen == {"side": 1, "main": main}


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2"])
def test_bad_thread_counts(bad):
    with pytest.raises(ValueError if isinstance(bad, int) and not isinstance(bad, bool)
                       else TypeError, match="threads: expected"):  # fmt: skip
        with threads.bounded(bad):
            pass


def test_labels_do_not_depend_on_the_bounds(monkeypatch):
    w, lab = _affinity(n=200, k=5, seed=3)
    on = spectral_clustering(w, 5, seed=1)
    monkeypatch.setenv("VIDEOANCHOR_THREAD_LIMITS", "0")
    off = spectral_clustering(w, 5, seed=1)
    assert torch.equal(on, off)


def _least_alone_and_beside(fn, runs: int) -> tuple[float, float]:
    """The least seconds of ``fn`` alone and beside a spinning process (bench_contention's
    neighbour): after a warm-up, three rounds alternating the two, ``runs`` calls each."""
    sys.path.insert(0, str(ROOT))
    from benchmarks.bench_contention import busy

    fn()  # warm-up
    alone, beside = [], []
    for _ in range(3):
        for kind, out in ((None, alone), ("spin", beside)):
            with busy(kind):
                for _ in range(runs):
                    t0 = time.perf_counter()
                    fn()
                    out.append(time.perf_counter() - t0)
    return min(alone), min(beside)


def test_the_spectral_step_beside_a_busy_process():
    """Issue 53: beside one process spinning on a core, the spectral step (N = 1024, k = 24,
    torch at one thread) took 2.6x its time alone, up to 70x beside numerical jobs, because
    SciPy's OpenBLAS ran a thread per core. Bounded, it should barely notice (target 1.5x;
    held here at 3x for a shared machine, the least of several runs each way, alternated)."""
    sys.path.insert(0, str(ROOT))
    from benchmarks.bench_contention import spectral_affinity

    w = spectral_affinity()
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        alone, beside = _least_alone_and_beside(lambda: spectral_clustering(w, 24, seed=0), 3)
    finally:
        torch.set_num_threads(n)
    assert beside <= 3 * alone, (
        f"the spectral step took {beside:.3f} s beside a spinning process against "
        f"{alone:.3f} s alone (load average {os.getloadavg()})"
    )


def test_the_default_scores_beside_a_busy_process():
    """Issue 53: beside one process spinning on one of two cores, the default scores (torch
    at two threads) took 2.8-4.2x their time alone: a parallel region runs at the pace of
    its thread that shares a core. Bounded to the free cores, 1.6x (target 2.5x; held here
    at 3x for a shared machine, the least of several runs each way, alternated)."""
    sys.path.insert(0, str(ROOT))
    from benchmarks.common import synthetic_tokens
    from videoanchor.anchor import compute_anchor_scores

    if threads.usable_cores() < 2:
        pytest.skip("one core: the spin loop would take all of it")
    x = synthetic_tokens(384, 256, seed=0)
    alone, beside = _least_alone_and_beside(lambda: compute_anchor_scores(x, 8, progress=False), 2)
    assert beside <= 3 * alone, (
        f"the default scores took {beside:.3f} s beside a spinning process against "
        f"{alone:.3f} s alone (load average {os.getloadavg()})"
    )
