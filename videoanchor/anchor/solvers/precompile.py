"""The working-set kernels and the discretisation's loops compiled ahead of the first request,
in background processes (issues 93, 101). Numba compiles :mod:`._workset_kernel` (its lean
and full kernels) and :mod:`videoanchor.anchor._discretize_loops` in the first process that
needs them (3-5 s of CPU for a kernel, docs/ssc.md) and loads them from its on-disk cache
afterwards. :func:`start` starts the processes that fill that cache, without holding up the
caller, when:

- ``import videoanchor`` finds the cache empty (:func:`cache_is_cold`: a few ``stat`` calls,
  no Numba import);
- the transformers integration installs on a model (``from_pretrained(...,
  attn_implementation="videoanchor_triton")`` or :func:`videoanchor.configure`);
- the command line runs a command that scores, or lmms-eval builds its model.

Each of those starts them at most once per process, and only where the cache looks empty;
only the groups whose cache is missing are compiled (:data:`JOBS`). Where this process may
run on two CPUs or more the groups compile at once, in two processes (:func:`plan`): the
lean kernel then the discretisation's loops in one, the full kernel in the other, so that a
call that needs every one waits for the longest, not for their sum (issue 101: a video whose
columns need outlier entries waited for the lean kernel, then the full one); on one CPU, one
process compiles them in turn. Each process (``python -c``: the kernels' and the loops'
files loaded alone, no torch) loads or compiles a group holding its lock beside Numba's
cache index (:class:`videoanchor.anchor._jit_cache.Functions`), so that two processes never
compile one at once; a call that needs a group while it compiles waits for it, says so in
one line (the ``videoanchor.kernel`` logger), and loads what it saved. They run at a lower
priority (``nice`` 10) and in their own session, so they outlive a caller that exits first.

Set ``VIDEOANCHOR_PRECOMPILE=0`` to start none (the first call compiles what it needs, as
before); ``videoanchor warmup`` compiles both kernels in the foreground (a container image's
build step). The vLLM plugin compiles at its start-up in any case (its ``warm_up``).
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

__all__ = ["ENV", "JOBS", "cache_is_cold", "cold_jobs", "enabled", "index_paths", "plan",
           "start", "started", "wait"]  # fmt: skip

#: The opt-out: ``0`` (or ``false``, ``no``, ``off``) starts no background compile.
ENV = "VIDEOANCHOR_PRECOMPILE"
_HERE = Path(os.path.abspath(__file__)).parent  # (as Numba: abspath)
KERNEL_FILE = _HERE / "_workset_kernel.py"
LOOPS_FILE = _HERE.parent / "_discretize_loops.py"
#: The files a background process loads, in order, each under its module name (Numba's
#: cache rebuilds a function's environment from that module), without the package (no torch).
MODULES = (
    ("videoanchor.anchor._jit_cache", _HERE.parent / "_jit_cache.py"),
    ("videoanchor.anchor.solvers._workset_build", _HERE / "_workset_build.py"),
    ("videoanchor.anchor.solvers._workset_kernel", KERNEL_FILE),
    ("videoanchor.anchor._discretize_loops", LOOPS_FILE),
)
#: What a background process can make ready, with the file and the functions whose cache
#: index :func:`cache_is_cold` looks for (``(function, the def its code starts at)``).
JOBS = {
    "lean": (KERNEL_FILE, (("solve_columns_lean", "solve_columns"),)),
    "full": (KERNEL_FILE, (("solve_columns", "solve_columns"),)),
    "loops": (LOOPS_FILE, (("_pick", "_pick"), ("_decide", "_decide"))),
}
#: The kernel's functions whose cache index :func:`cache_is_cold` looks for (the first two
#: of :func:`index_paths`).
FUNCTIONS = ("solve_columns_lean", "solve_columns")
NICE = 10

# A background process: the files of :data:`MODULES` loaded alone, then its jobs in order
# (argv: the jobs, comma-separated, then the files).
_CHILD = (
    "import importlib.util, os, sys\n"
    "try:\n"
    f"    os.nice({NICE})\n"
    "except OSError:\n"
    "    pass\n"
    "mods = {}\n"
    "for arg in sys.argv[2:]:\n"
    "    name, path = arg.split('=', 1)\n"
    "    spec = importlib.util.spec_from_file_location(name, path)\n"
    "    module = importlib.util.module_from_spec(spec)\n"
    "    sys.modules[name] = module\n"
    "    spec.loader.exec_module(module)\n"
    "    mods[name.rsplit('.', 1)[1]] = module\n"
    "for job in sys.argv[1].split(','):\n"
    "    if job == 'loops':\n"
    "        mods['_discretize_loops'].ready()\n"
    "    else:\n"
    "        mods['_workset_kernel'].ready(job)\n"
)

_lock = threading.Lock()
_processes: list[subprocess.Popen] = []
_reason: str | None = None


def enabled() -> bool:
    """Whether :data:`ENV` allows a background compile (it is on unless set to ``0``, ``false``,
    ``no`` or ``off``), and Numba compiles at all (``NUMBA_DISABLE_JIT`` unset)."""
    off = os.environ.get(ENV, "1").strip().lower() in ("0", "false", "no", "off")
    return not off and os.environ.get("NUMBA_DISABLE_JIT", "0").strip() in ("", "0")


def _usable(folder: Path) -> bool:
    """Whether ``folder`` is, or could be made, a folder this process writes to (as Numba's
    locators try it: created, then written)."""
    path = folder
    while not path.exists():
        if path.parent == path:
            return False
        path = path.parent
    return path.is_dir() and os.access(path, os.W_OK | os.X_OK)


def _cache_dir(file: Path = KERNEL_FILE) -> Path | None:
    """The folder Numba caches ``file``'s functions in, as its locators choose it
    (numba.core.caching: ``$NUMBA_CACHE_DIR``, else ``__pycache__`` beside the file, else the
    user's cache folder; the first that can be written), without importing Numba; None where
    none can be or that is not known here."""
    here = file.parent
    sub = f"{here.name}_{hashlib.sha1(str(here).encode()).hexdigest()}"
    candidates = [here / "__pycache__"]
    if os.environ.get("NUMBA_CACHE_DIR"):
        candidates.insert(0, Path(os.environ["NUMBA_CACHE_DIR"]) / sub)
    if sys.platform.startswith("linux"):
        base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
        candidates.append(Path(base) / "numba" / sub)
    elif sys.platform == "darwin":
        candidates.append(Path(os.path.expanduser("~/Library/Caches")) / "numba" / sub)
    else:
        return None
    return next((c for c in candidates if _usable(c)), None)


def _job_paths(job: str) -> list[Path] | None:
    """The cache indexes Numba keeps for ``job``'s functions (``<file>.<function>-<line>
    .py<ver>.nbi``), or None where their folder is not known here or Numba can write to
    none."""
    file, functions = JOBS[job]
    folder = _cache_dir(file)
    if folder is None:
        return None
    text = file.read_text()
    ver = f"py{sys.version_info[0]}{sys.version_info[1]}{getattr(sys, 'abiflags', '')}"
    out = []
    for name, source in functions:
        m = re.search(rf"^def {source}\(", text, re.M)  # (a variant: its source's code, line)
        line = text.count("\n", 0, m.start()) + 1
        out.append(folder / f"{file.stem}.{name}-{line}.{ver}.nbi")
    return out


def index_paths() -> list[Path] | None:
    """The cache indexes Numba keeps for the lean and the full kernel, then the
    discretisation's loops (:data:`JOBS`), or None where a folder is not known here or
    Numba can write to none."""
    paths = [_job_paths(job) for job in JOBS]
    return None if any(p is None for p in paths) else [x for p in paths for x in p]


def cold_jobs() -> list[str]:
    """The jobs of :data:`JOBS` whose cache lacks a function: an index of :func:`_job_paths`
    missing or older than its file (which Numba would then recompile). Cheap (``stat``
    calls), and short of Numba's own answer: an index made on another CPU alone counts as
    warm here (Numba keys its entries by the CPU; the first call then compiles, holding the
    lock). Empty where Numba can cache nowhere (a background compile would leave nothing
    behind)."""
    out = []
    for job, (file, _) in JOBS.items():
        paths = _job_paths(job)
        if paths is None:
            return []
        source = file.stat().st_mtime
        for path in paths:
            try:
                if path.stat().st_mtime < source:
                    out.append(job)
                    break
            except OSError:
                out.append(job)
                break
    return out


def cache_is_cold() -> bool:
    """Whether Numba's cache lacks a kernel or the loops (:func:`cold_jobs`)."""
    return bool(cold_jobs())


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def plan(jobs: list[str], cpus: int | None = None) -> list[list[str]]:
    """The background processes for ``jobs`` (:func:`cold_jobs`), each its jobs in order: on
    two CPUs or more, the lean kernel and the loops in one, the full kernel in another (about
    the same compile each); on one, all in one process, the lean kernel first."""
    order = [j for j in ("lean", "loops", "full") if j in jobs]
    if (cpus or _cpus()) < 2:
        return [order] if order else []
    return [p for p in ([j for j in order if j != "full"], [j for j in order if j == "full"]) if p]


def start(reason: str) -> list[subprocess.Popen] | None:
    """Start the background compile (module docstring) where :func:`enabled`, none was started
    in this process, and the cache lacks something this process does not hold
    (:func:`cold_jobs`). ``reason``: what started it (``"import"``, ``"transformers"``,
    ``"cli"``, ``"lmms_eval"``), kept with it (:func:`started`). Returns the processes (one
    per :func:`plan` entry), or None where none was started. Never raises: a compile that
    cannot start here happens in the first call, as without it."""
    global _reason
    if not enabled():
        return None
    with _lock:
        if _processes:
            return None
        kernel = sys.modules.get("videoanchor.anchor.solvers._workset_kernel")
        loops = sys.modules.get("videoanchor.anchor._discretize_loops")
        held = {"lean": kernel is not None and kernel.held("lean"),
                "full": kernel is not None and kernel.held("full"),
                "loops": loops is not None and loops.held()}  # fmt: skip
        try:
            jobs = [j for j in cold_jobs() if not held[j]]
            files = [f"{name}={path}" for name, path in MODULES]
            for group in plan(jobs):
                _processes.append(subprocess.Popen(
                    [sys.executable, "-c", _CHILD, ",".join(group), *files],
                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL, start_new_session=True, close_fds=True,
                ))  # fmt: skip
        except (OSError, ValueError, subprocess.SubprocessError):
            pass
        if not _processes:
            return None
        _reason = reason
        procs = list(_processes)
    # reaped when they end, so that they leave no zombie behind a long-lived caller
    for proc in procs:
        threading.Thread(target=proc.wait, name="videoanchor-precompile", daemon=True).start()
    return procs


def started() -> str | None:
    """What started this process's background compile (:func:`start`'s ``reason``), or None."""
    return _reason


def wait(timeout: float | None = None) -> int | None:
    """Wait for this process's background compile: the largest exit code of its processes
    (0: all ended well), or None where none was started (or one still runs after ``timeout``
    seconds)."""
    import time

    procs = list(_processes)
    if not procs:
        return None
    end = None if timeout is None else time.monotonic() + timeout
    codes = []
    for proc in procs:
        try:
            codes.append(proc.wait(None if end is None else max(0.0, end - time.monotonic())))
        except subprocess.TimeoutExpired:
            return None
    return max(codes)
