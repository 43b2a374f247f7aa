"""Bounded thread pools for the anchor layer's CPU work (issue 53).

``torch.set_num_threads`` sets only torch's pool; NumPy's and SciPy's OpenBLAS and
scikit-learn's OpenMP start at one thread per core. So the spectral step's
``scipy.linalg.eigh`` ran a thread per core: beside one busy process on 2 cores, 2.6x slower
(up to 70x beside other numerical jobs; 0.9x with that pool at one thread;
``benchmarks/results/contention_cpu.json``).

:func:`bounded` runs a block with torch's intra-op pool at ``threads`` (default: torch's
count in this thread), never above :func:`free_cores`, the other OpenMP pools at the same
count, and the BLAS libraries outside torch at one thread (their only work here, LAPACK on
matrices of a few thousand rows, runs as fast on one thread idle and far faster busy; as
scikit-learn does inside its parallel regions). The counts are restored afterwards; OpenMP's
and torch's are per thread (the vLLM plugin's SSC thread leaves the model's alone),
OpenBLAS's is process-wide (only this layer's work uses it).
``compute_anchor_scores``, ``sparse_subspace_clustering`` and ``spectral_clustering`` run
inside it; a nested :func:`bounded` keeps the outer counts; ``VIDEOANCHOR_THREAD_LIMITS=0``
turns it off.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import threading
import time

import torch

__all__ = ["bounded", "enabled", "free_cores", "running_elsewhere", "usable_cores"]

_local = threading.local()


def _cgroup_quota_cores(root: str = "/sys/fs/cgroup") -> int | None:
    """The cgroup v2 CPU quota of this process in whole cores (rounded up), or None."""
    try:
        with open(os.path.join(root, "cpu.max")) as f:
            quota, period = f.read().split()[:2]
    except (OSError, ValueError):
        return None
    if quota == "max":
        return None
    try:
        return max(1, -(-int(quota) // int(period)))
    except (ValueError, ZeroDivisionError):
        return None


def usable_cores() -> int:
    """The CPUs this process may run on (``os.sched_getaffinity``), capped by its cgroup's
    CPU quota where one is set; at least 1."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cores = os.cpu_count() or 1
    quota = _cgroup_quota_cores()
    return max(1, min(cores, quota) if quota else cores)


def _running_here(task_dir: str = "/proc/self/task") -> int:
    """This process's threads the kernel counts as running (state R), the caller included.
    A parallel region's OpenMP threads spin for some milliseconds after it ends: they are
    this process's own, not work beside it."""
    count = 0
    try:
        tasks = os.listdir(task_dir)
    except OSError:
        return 1
    for task in tasks:
        try:
            with open(os.path.join(task_dir, task, "stat")) as f:
                count += f.read().rsplit(")", 1)[1].split()[0] == "R"
        except (OSError, IndexError):
            continue  # the thread ended meanwhile
    return max(1, count)


def running_elsewhere(
    path: str = "/proc/loadavg", samples: int = 3, here=_running_here
) -> int | None:
    """How many threads of other processes are running on the machine now: the kernel's
    count of runnable tasks (the fourth field of ``/proc/loadavg``) less this process's own
    (:func:`_running_here`), the median of ``samples`` reads 0.5 ms apart; None where the
    file is missing (not Linux)."""
    counts = []
    for i in range(samples):
        try:
            with open(path) as f:
                running = int(f.read().split()[3].split("/")[0])
        except (OSError, ValueError, IndexError):
            return None
        counts.append(max(0, running - here()))
        if i + 1 < samples:
            time.sleep(5e-4)
    return sorted(counts)[len(counts) // 2]


def free_cores() -> int:
    """The cores not taken by other processes' running work now (the machine's CPUs less
    :func:`running_elsewhere`), at most :func:`usable_cores`, at least 1: a parallel region
    whose threads share a core with a busy process runs at the pace of the slowest (on two
    cores beside a spin loop the scores took 3.9x their idle time at two threads, 1.5x at
    one; ``benchmarks/results/contention_cpu.json``)."""
    usable = usable_cores()
    others = running_elsewhere()
    if others is None:
        return usable
    return max(1, min(usable, (os.cpu_count() or usable) - others))


def enabled() -> bool:
    """False when ``VIDEOANCHOR_THREAD_LIMITS`` is ``0`` (or ``false``/``off``/``no``)."""
    return os.environ.get("VIDEOANCHOR_THREAD_LIMITS", "1").strip().lower() not in (
        "0", "false", "off", "no",
    )  # fmt: skip


def _controller():
    """threadpoolctl's view of the loaded thread pools (about 4 ms to build), rebuilt once a
    module has been imported since (a new one may bring a pool of its own)."""
    import scipy.linalg  # noqa: F401  (loaded first, so that its OpenBLAS is found)

    return _controller_for(len(sys.modules))


@functools.lru_cache(maxsize=1)
def _controller_for(modules: int):
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController()


@contextlib.contextmanager
def bounded(threads: int | None = None):
    """Run the block with torch's intra-op pool at ``min(threads, free_cores())``
    (``threads`` default: ``torch.get_num_threads()`` in this thread), the other OpenMP
    pools at that count and the BLAS libraries outside torch at one thread; restored
    afterwards. Nested inside another :func:`bounded` of the same thread it changes nothing.
    Also a decorator (``@bounded()``)."""
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int)):
        raise TypeError(f"threads: expected an int or None, got {type(threads).__name__}")
    if threads is not None and threads < 1:
        raise ValueError(f"threads: expected at least 1, got {threads}")
    depth = getattr(_local, "depth", 0)
    if depth or not enabled():
        _local.depth = depth + 1
        try:
            yield
        finally:
            _local.depth = depth
        return
    before = torch.get_num_threads()
    n = max(1, min(before if threads is None else threads, free_cores()))
    controller = _controller()
    _local.depth = 1
    try:
        if n != before:
            torch.set_num_threads(n)
        with (
            controller.limit(limits=n, user_api="openmp"),
            controller.limit(limits=1, user_api="blas"),
        ):
            yield
    finally:
        _local.depth = 0
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)
