"""The working-set kernel's compile kept off the first request (issue 93): the lean kernel beside
the full one (the same C bit for bit), the cache's lock, a cache made for another CPU."""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from videoanchor.anchor.solvers import _workset_kernel as kernel
from videoanchor.anchor.solvers import workset as ws

ROOT = Path(__file__).resolve().parents[1]


def _env(tmp_path, **extra) -> dict:
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / "numba"), **extra}
    env.pop("NUMBA_DISABLE_JIT", None)
    return env


def _child(code: str, env: dict, timeout: float = 600) -> dict:
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True,
                         text=True, timeout=timeout)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


# what a child process reports: the functions Numba compiled in it, and what it did for each
# kernel (kernel.EVENTS)
_REPORT = (
    "import json\n"
    "from numba.core import event\n"
    "class Compiles(event.Listener):\n"
    "    names = []\n"
    "    def on_start(self, ev):\n"
    "        self.names.append(ev.data['dispatcher'].py_func.__name__)\n"
    "    def on_end(self, ev):\n"
    "        pass\n"
    "event.register('numba:compile', Compiles())\n"
    "from videoanchor.anchor.solvers import _workset_kernel as k\n"
    "def report(**extra):\n"
    "    print(json.dumps({'compiled': sorted(set(Compiles.names)), 'events': k.EVENTS, **extra}))\n"
)


def _sets():
    """Inputs of :func:`ws._columns` that take each path of the kernels: video-like tokens
    (lean alone), one token overlaid (a column with outlier entries: handed to the full
    kernel), a start from the fast answer with outlier entries (the warm route's), Gaussian
    points above the rank (hard columns), and two threads."""
    from benchmarks.bench_workset import overlaid
    from benchmarks.common import video_tokens

    g = torch.Generator().manual_seed(3)
    out = []
    for x, kw in (
        (video_tokens(4, 24, 128), {}),
        (overlaid(4, 24, 128, tokens=2, entries=60), {}),
        (torch.randn(64, 16, generator=g, dtype=torch.float64), {"max_work": 300.0}),
        (video_tokens(4, 24, 128, seed=1), {"threads": 2}),
    ):
        x64, G, lam_e, lam_z = ws._prepare(ws.as_feature_tensor(x), 800.0, 800.0)
        out.append((x64, G, lam_e, lam_z, kw))
    x64, G, lam_e, lam_z, _ = out[1]
    fast = ws.run_admm(x64, ws.make_plan(x64.shape, ws._CPU, ws._REFERENCE).fallback,
                       alpha_e=800.0, alpha_z=800.0, rho=1.0, eps=1e-4, max_iter=300,
                       progress=False, warn_dark=False)  # fmt: skip
    out.append((x64, G, lam_e, lam_z, {"start": fast.coef}))
    return out


def test_the_lean_kernel_gives_the_full_kernels_answer_bit_for_bit(monkeypatch):
    """Every column the lean kernel solves (none with an outlier entry) and every one it hands
    to the full kernel (with those after it) ends as the full kernel alone ends it: C, E,
    status, passes and work equal bit for bit, on sets that take each path."""
    if kernel.numba.config.DISABLE_JIT:
        pytest.skip("NUMBA_DISABLE_JIT: one Python function")
    kernel.precompile()
    ready, used = kernel.ready, []

    def lean_first(which="full", *, compile=True):
        used.append(which if compile else "-")
        return None if which == "full" and not compile else ready(which, compile=compile)

    handed = 0
    for x64, G, lam_e, lam_z, kw in _sets():
        kw = {"tol": ws.TOL, "grow": ws.GROW, "cap": x64.shape[0] + x64.shape[1],
              "max_passes": 500, "threads": 1, **kw}  # fmt: skip
        full = ws._columns(x64, lam_e, lam_z, G, **kw)
        used.clear()
        monkeypatch.setattr(kernel, "ready", lean_first)
        lean = ws._columns(x64, lam_e, lam_z, G, **kw)
        monkeypatch.setattr(kernel, "ready", ready)
        assert "lean" in used
        handed += "full" in used
        for a, b in zip(full, lean, strict=True):
            assert torch.equal(a, b)
        assert bool((full[2] != kernel.NEEDS_OUTLIERS).all())
    assert handed >= 2, "no set handed a column to the full kernel"


def _held_elsewhere(folder: Path, kernel_name: str) -> bool:
    """Whether another process holds the lock of ``kernel_name``'s cache under ``folder``."""
    name = {"lean": "solve_columns_lean", "full": "solve_columns"}[kernel_name]
    for path in folder.rglob(f"_workset_kernel.{name}-*.lock"):
        fd = os.open(path, os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
    return False


def test_two_processes_compile_the_kernel_once(tmp_path):
    """Two processes that need the lean kernel with an empty cache: the first compiles it
    holding the cache's lock, the second waits for it (one line on stderr), then loads it and
    compiles nothing."""
    env = _env(tmp_path)
    code = _REPORT + "k.ready('lean')\nreport()\n"
    first = subprocess.Popen([sys.executable, "-c", code], env=env, cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    deadline = time.monotonic() + 300
    while not _held_elsewhere(tmp_path, "lean"):  # (from the start of its compile)
        assert first.poll() is None and time.monotonic() < deadline, first.communicate()
        time.sleep(0.05)
    second = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT,
                            capture_output=True, text=True, timeout=600)  # fmt: skip
    out, err = first.communicate(timeout=600)
    assert first.returncode == 0 and second.returncode == 0, (err, second.stderr)
    one = json.loads(out.strip().splitlines()[-1])
    two = json.loads(second.stdout.strip().splitlines()[-1])
    assert [e["how"] for e in one["events"]] == ["compiled"], one
    assert [e["how"] for e in two["events"]] == ["loaded"] and two["compiled"] == [], two
    assert two["events"][0]["waited"] > 0, two
    waiting = [ln for ln in second.stderr.splitlines() if "waiting for another process" in ln]
    assert len(waiting) == 1 and "(lean)" in waiting[0], second.stderr


def test_a_cache_made_for_another_cpu_is_not_loaded(tmp_path):
    """Numba keys its cache by the CPU: the lean kernel compiled for ``NUMBA_CPU_NAME=generic``
    is not loaded by a process for this CPU, which compiles its own beside it."""
    env = _env(tmp_path, NUMBA_CPU_NAME="generic", NUMBA_CPU_FEATURES="")
    got = _child(_REPORT + "k.ready('lean')\nreport()\n", env)
    assert [e["how"] for e in got["events"]] == ["compiled"], got
    env = _env(tmp_path)
    env.pop("NUMBA_CPU_NAME", None)
    env.pop("NUMBA_CPU_FEATURES", None)
    got = _child(_REPORT + (
        "found = k.ready('lean', compile=False)\n"
        "k.ready('lean')\n"
        "report(found=found is not None, hits=sum(k.solve_columns_lean.stats.cache_hits.values()),\n"
        "       cpu=k.solve_columns_lean.targetctx.codegen().magic_tuple()[1])\n"), env)  # fmt: skip
    assert not got["found"] and got["hits"] == 0 and got["cpu"] != "generic", got
    assert [e["how"] for e in got["events"]] == ["compiled"], got
    assert "solve_columns_lean" in got["compiled"], got
