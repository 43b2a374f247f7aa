"""The working-set kernel's compile kept off the first request (issue 93): the lean kernel beside
the full one (the same C bit for bit), the cache's lock, the background compile, a cache made
for another CPU, the opt-out, and a model loaded first that finds the kernel compiled."""

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
from numba_support import COMPILE_REPORT

from videoanchor.anchor.solvers import _workset_kernel as kernel
from videoanchor.anchor.solvers import precompile
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
    if kernel.config.DISABLE_JIT:
        pytest.skip("NUMBA_DISABLE_JIT: one Python function")
    kernel.precompile()
    ready, used = kernel.ready, []

    def lean_first(which="full", *, compile=True):
        used.append(which if compile else "-")
        return None if which == "full" and not compile else ready(which, compile=compile)

    handed = 0
    for x64, G, lam_e, lam_z, kw in _sets():
        kw = {"tol": ws.TOL, "cap": x64.shape[0] + x64.shape[1],
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


def test_the_cheap_check_finds_numbas_cache(tmp_path):
    """:func:`precompile.index_paths`, without Numba, names the index files Numba keeps for
    both kernels and the discretisation's loops, with ``NUMBA_CACHE_DIR`` set and in the package's ``__pycache__``; and
    :func:`precompile.cache_is_cold` follows them."""
    code = (
        "import json\n"
        "from videoanchor.anchor.solvers import _workset_kernel as k, precompile as p\n"
        "from videoanchor.anchor import _discretize_loops as d\n"
        "print(json.dumps([[str(x) for x in p.index_paths()],\n"
        "                  [f._cache._cache_file._index_path for f in (*k.KERNELS.values(),\n"
        "                                                              d._pick, d._decide)],\n"
        "                  p.cache_is_cold()]))\n"
    )
    env = _env(tmp_path)
    ours, numbas, cold = _child(code, env)
    assert ours == numbas and cold, (ours, numbas)
    env.pop("NUMBA_CACHE_DIR")
    ours, numbas, _ = _child(code, env)
    assert ours == numbas and "__pycache__" in ours[0], (ours, numbas)


def test_the_opt_out_and_a_warm_cache_start_nothing(monkeypatch):
    """``VIDEOANCHOR_PRECOMPILE=0`` starts no process, nor does a warm cache; a cold one starts
    them (the kernels' and the loops' files run alone, below normal priority), once per
    process: on two CPUs the lean kernel and the loops in one and the full kernel in another,
    only the jobs whose cache is cold."""
    started = []

    class FakeProcess:
        def __init__(self, args, **kw):
            started.append((args, kw))

        def wait(self, timeout=None):
            return 0

    monkeypatch.setattr(precompile.subprocess, "Popen", FakeProcess)
    monkeypatch.setattr(precompile, "_processes", [])
    monkeypatch.setattr(precompile, "_reason", None)
    monkeypatch.setattr(precompile, "_cpus", lambda: 2)
    monkeypatch.setattr(precompile, "cold_jobs", lambda: ["lean", "full", "loops"])
    monkeypatch.setattr(kernel, "held", lambda which: False)
    from videoanchor.anchor import _discretize_loops

    monkeypatch.setattr(_discretize_loops, "held", lambda: False)  # (whatever ran before)
    for off in ("0", "false", "off"):
        monkeypatch.setenv(precompile.ENV, off)
        assert precompile.start("test") is None
    monkeypatch.setenv(precompile.ENV, "1")
    monkeypatch.setenv("NUMBA_DISABLE_JIT", "1")
    assert precompile.start("test") is None
    monkeypatch.delenv("NUMBA_DISABLE_JIT")
    monkeypatch.setattr(precompile, "cold_jobs", lambda: [])
    assert precompile.start("test") is None and not started
    monkeypatch.setattr(precompile, "cold_jobs", lambda: ["lean", "full", "loops"])
    assert len(precompile.start("test")) == 2 and precompile.started() == "test"
    assert precompile.start("again") is None and len(started) == 2
    assert [args[3] for args, _ in started] == ["lean,loops", "full"]
    for args, kw in started:
        assert f"videoanchor.anchor.solvers._workset_kernel={precompile.KERNEL_FILE}" in args
        assert f"videoanchor.anchor._discretize_loops={precompile.LOOPS_FILE}" in args
        assert "os.nice(10)" in args[2]
        assert kw["start_new_session"] and kw["stdin"] == subprocess.DEVNULL
    started.clear()
    monkeypatch.setattr(precompile, "_processes", [])
    monkeypatch.setattr(precompile, "cold_jobs", lambda: ["full"])
    assert len(precompile.start("test")) == 1 and [a[3] for a, _ in started] == ["full"]


def test_the_plan_compiles_at_once_where_two_cpus_allow():
    """Two CPUs or more: the lean kernel then the loops in one process, the full kernel in
    another; one CPU: one process, the lean kernel first; only the jobs given."""
    jobs = ["full", "loops", "lean"]
    assert precompile.plan(jobs, cpus=2) == [["lean", "loops"], ["full"]]
    assert precompile.plan(jobs, cpus=16) == [["lean", "loops"], ["full"]]
    assert precompile.plan(jobs, cpus=1) == [["lean", "loops", "full"]]
    assert precompile.plan(["full"], cpus=2) == [["full"]]
    assert precompile.plan(["loops", "lean"], cpus=2) == [["lean", "loops"]]
    assert precompile.plan([], cpus=2) == [] and precompile.plan([], cpus=1) == []


def test_installing_on_a_model_starts_the_background_compile(monkeypatch):
    """The transformers integration starts it when it installs on a model (what
    ``from_pretrained(..., attn_implementation="videoanchor_triton")`` does)."""
    from videoanchor.integrations.transformers.testing import tiny_model

    reasons = []
    monkeypatch.setattr(precompile, "start", reasons.append)
    tiny_model("qwen2_5_vl", attn_implementation="videoanchor_triton")
    assert reasons == ["transformers"]


def test_import_starts_the_background_compile_where_the_cache_is_empty(tmp_path):
    """``import videoanchor`` with an empty cache starts the background processes, which fill
    the cache with both kernels and the discretisation's loops; a later process's anchor
    scores on a set whose columns need outlier entries (the full kernel), with the lean
    kernel and the loops made ready as well, compile nothing (Numba's compile events: not
    one function) and its import starts none (issue 101)."""
    env = _env(tmp_path, **{precompile.ENV: "1"})
    code = ("import json, time, videoanchor\n"
            "from videoanchor.anchor.solvers import precompile as p\n"
            "t = time.perf_counter()\n"
            "print(json.dumps([p.started(), len(p._processes), p.wait(600), p.cache_is_cold()]))\n")  # fmt: skip
    started, procs, code_, cold = _child(code, env)
    assert [started, code_, cold] == ["import", 0, False]
    assert procs == (2 if len(os.sched_getaffinity(0)) >= 2 else 1)
    names = sorted(p.name.split("-")[0] for p in (tmp_path / "numba").rglob("*.nbi"))
    assert names == ["_discretize_loops._decide", "_discretize_loops._pick",
                     "_workset_kernel.solve_columns", "_workset_kernel.solve_columns_lean"]  # fmt: skip
    got = _child(COMPILE_REPORT + (
        "import torch, videoanchor\n"
        "from videoanchor.anchor.solvers import precompile as p\n"
        "from videoanchor.anchor import _discretize_loops as d\n"
        "from benchmarks.bench_workset import overlaid\n"
        "res = videoanchor.compute_anchor_scores(overlaid(4, 24, 128, tokens=2, entries=60),\n"
        "                                        n_clusters=4)\n"
        "k.ready('lean')\n"
        "report(started=p.started(), solver=res.solver, loops=d.EVENTS)\n"), env)  # fmt: skip
    assert got["compiled"] == [] and got["started"] is None, got
    assert got["solver"] == "workset", got
    assert [(e["kernel"], e["how"]) for e in got["events"]] == [("full", "loaded"),
                                                                ("lean", "loaded")], got  # fmt: skip
    assert [(e["kernel"], e["how"]) for e in got["loops"]] == [("loops", "loaded")], got


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
    code = COMPILE_REPORT + "k.ready('lean')\nreport()\n"
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
    got = _child(COMPILE_REPORT + "k.ready('lean')\nreport()\n", env)
    assert [e["how"] for e in got["events"]] == ["compiled"], got
    env = _env(tmp_path)
    env.pop("NUMBA_CPU_NAME", None)
    env.pop("NUMBA_CPU_FEATURES", None)
    got = _child(COMPILE_REPORT + (
        "found = k.ready('lean', compile=False)\n"
        "k.ready('lean')\n"
        "report(found=found is not None, hits=sum(k.solve_columns_lean.stats.cache_hits.values()),\n"
        "       cpu=k.solve_columns_lean.targetctx.codegen().magic_tuple()[1])\n"), env)  # fmt: skip
    assert not got["found"] and got["hits"] == 0 and got["cpu"] != "generic", got
    assert [e["how"] for e in got["events"]] == ["compiled"], got
    assert "solve_columns_lean" in got["compiled"], got


def test_a_model_loaded_first_finds_the_kernel_compiled(tmp_path):
    """Issue 93's user: imports videoanchor and loads the tiny Qwen2.5-VL through
    ``from_pretrained(..., attn_implementation="videoanchor_triton")`` with an empty Numba
    cache, then generates on a video. The background compile that the import started ends
    before the request (``precompile.wait()`` stands in for a real model's load, which takes
    longer than the compile): the request compiles nothing and loads the kernel it needs,
    without waiting for another process."""
    from videoanchor.integrations.transformers.testing import tiny_model

    path = tmp_path / "model"
    tiny_model("qwen2_5_vl", seed=1).save_pretrained(path)
    env = _env(tmp_path, **{precompile.ENV: "1"})
    head = COMPILE_REPORT.replace(
        "from videoanchor.anchor.solvers import _workset_kernel as k\n", ""
    )
    code = head + (
        "import sys, torch, videoanchor\n"
        "sys.path.insert(0, 'tests')\n"
        "import torchvision_shim; torchvision_shim.apply()\n"
        "from videoanchor.anchor.solvers import precompile as p\n"
        "from videoanchor.integrations.transformers.testing import load_saved, tiny_inputs\n"
        f"model = load_saved({str(path)!r})\n"
        "code = p.wait(600)\n"
        "Compiles.names.clear()\n"
        "inputs = tiny_inputs(model.config, [[4]])\n"
        "with torch.no_grad():\n"
        "    model.generate(**inputs, max_new_tokens=2, do_sample=False)\n"
        "from videoanchor.anchor.solvers import _workset_kernel as k\n"
        "handle = videoanchor.integrations.transformers.find_handle(model)\n"
        "report(started=p.started(), code=code, solver=handle.last_result[0].solver)\n"
    )
    got = _child(code, env)
    assert got["started"] == "import" and got["code"] == 0, got
    assert got["solver"] == "workset", got
    assert got["compiled"] == [], got
    assert got["events"] and all(e["how"] == "loaded" and e["waited"] == 0.0
                                 for e in got["events"]), got  # fmt: skip


def test_the_readme_and_docs_name_the_opt_out():
    for page in ("docs/serving.md", "docs/ssc.md"):
        assert precompile.ENV + "=0" in (ROOT / page).read_text(), page


def test_no_folder_numba_can_write_to_compiles_in_each_process(tmp_path):
    """A package whose folder cannot be written (its ``__pycache__`` a file, which stops root
    too) and no user cache folder that can be made (``$XDG_CACHE_HOME`` under a file),
    ``NUMBA_CACHE_DIR`` unset: Numba caches nowhere. The kernel still compiles and solves,
    saying once why it will compile again in the next process, and no background compile is
    started (it would leave nothing behind)."""
    import shutil

    copy = tmp_path / "site"
    shutil.copytree(ROOT / "videoanchor", copy / "videoanchor",
                    ignore=shutil.ignore_patterns("__pycache__", "*.so"))  # fmt: skip
    (copy / "videoanchor" / "anchor" / "solvers" / "__pycache__").write_text("not a folder\n")
    (tmp_path / "file").write_text("not a folder\n")
    env = _env(tmp_path, PYTHONPATH=str(copy), XDG_CACHE_HOME=str(tmp_path / "file" / "cache"),
               HOME=str(tmp_path / "file"), PYTHONDONTWRITEBYTECODE="1",
               **{precompile.ENV: "1"})  # fmt: skip
    env.pop("NUMBA_CACHE_DIR")
    out = subprocess.run([sys.executable, "-c", COMPILE_REPORT + (
        "import torch\n"
        "from videoanchor.anchor.solvers import precompile as p\n"
        "from videoanchor.anchor.solvers.workset import solve_ssc_workset\n"
        "res = solve_ssc_workset(torch.randn(12, 6, generator=torch.Generator().manual_seed(0)))\n"
        "report(converged=bool(res.converged), cold=p.cache_is_cold(), paths=p.index_paths(),\n"
        "       started=p.started(), lock=k.lock_path('lean'))\n")],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["converged"] and [e["how"] for e in got["events"]] == ["compiled"], got
    assert got["cold"] is False and got["paths"] is None and got["started"] is None, got
    assert got["lock"] is None, got
    assert out.stderr.count("Numba cannot cache the SSC kernel") == 1, out.stderr
