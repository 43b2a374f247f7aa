"""The working-set kernel compiled ahead of the first request, in a background process (issue
93). Numba compiles :mod:`._workset_kernel` in the first process that needs it (3-5 s of CPU,
docs/ssc.md) and loads it from its on-disk cache afterwards. :func:`start` starts a process
that fills that cache, without holding up the caller, when:

- ``import videoanchor`` finds the cache empty (:func:`cache_is_cold`: a few ``stat`` calls,
  no Numba import);
- the transformers integration installs on a model (``from_pretrained(...,
  attn_implementation="videoanchor_triton")`` or :func:`videoanchor.configure`);
- the command line runs a command that scores, or lmms-eval builds its model.

Each of those starts it at most once per process, and only where the cache looks empty. The
process (``python -c``, the kernel's file loaded alone: no torch) loads or compiles the lean
kernel, then the full one (:func:`._workset_kernel.precompile`), each holding its lock
beside Numba's cache index, so that two processes never compile one at once; a call that
needs a kernel while it compiles waits for it, says so in one line (the
``videoanchor.kernel`` logger), and loads what it saved. It runs at a lower priority
(``nice`` 10) and in its own session, so it outlives a caller that exits first.

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

__all__ = ["ENV", "cache_is_cold", "enabled", "index_paths", "start", "started", "wait"]

#: The opt-out: ``0`` (or ``false``, ``no``, ``off``) starts no background compile.
ENV = "VIDEOANCHOR_PRECOMPILE"
KERNEL_FILE = Path(os.path.abspath(__file__)).with_name("_workset_kernel.py")  # (as Numba: abspath)
#: The kernel's functions whose cache index :func:`cache_is_cold` looks for.
FUNCTIONS = ("solve_columns_lean", "solve_columns")
NICE = 10

# The background process: the kernel's file loaded under its own module name (Numba's cache
# rebuilds a function's environment from that module), without the package (no torch).
_CHILD = (
    "import importlib.util, os, sys\n"
    "try:\n"
    f"    os.nice({NICE})\n"
    "except OSError:\n"
    "    pass\n"
    "name = 'videoanchor.anchor.solvers._workset_kernel'\n"
    "spec = importlib.util.spec_from_file_location(name, sys.argv[1])\n"
    "module = importlib.util.module_from_spec(spec)\n"
    "sys.modules[name] = module\n"
    "spec.loader.exec_module(module)\n"
    "module.precompile()\n"
)

_lock = threading.Lock()
_process: subprocess.Popen | None = None
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


def _cache_dir() -> Path | None:
    """The folder Numba caches the kernel in, as its locators choose it (numba.core.caching:
    ``$NUMBA_CACHE_DIR``, else ``__pycache__`` beside the file, else the user's cache folder;
    the first that can be written), without importing Numba; None where none can be or that
    is not known here."""
    here = KERNEL_FILE.parent
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


def index_paths() -> list[Path] | None:
    """The cache indexes Numba keeps for :data:`FUNCTIONS` (``<file>.<function>-<line>.py<ver>
    .nbi``), or None where their folder is not known here or Numba can write to none."""
    folder = _cache_dir()
    if folder is None:
        return None
    text = KERNEL_FILE.read_text()
    ver = f"py{sys.version_info[0]}{sys.version_info[1]}{getattr(sys, 'abiflags', '')}"
    m = re.search(r"^def solve_columns\(", text, re.M)
    line = text.count("\n", 0, m.start()) + 1  # (both kernels: one code object, one line)
    return [folder / f"{KERNEL_FILE.stem}.{f}-{line}.{ver}.nbi" for f in FUNCTIONS]


def cache_is_cold() -> bool:
    """Whether Numba's cache lacks a kernel: an index of :func:`index_paths` missing or older
    than the kernel's file (which Numba would then recompile). Cheap (``stat`` calls), and
    short of Numba's own answer: an index made on another CPU alone counts as warm here
    (Numba keys its entries by the CPU; the first call then compiles, holding the lock). False
    where Numba can cache nowhere (a background compile would leave nothing behind)."""
    paths = index_paths()
    if paths is None:
        return False
    source = KERNEL_FILE.stat().st_mtime
    for path in paths:
        try:
            if path.stat().st_mtime < source:
                return True
        except OSError:
            return True
    return False


def start(reason: str) -> subprocess.Popen | None:
    """Start the background compile (module docstring) where :func:`enabled`, none was started
    in this process, this process does not hold both kernels and the cache is cold
    (:func:`cache_is_cold`). ``reason``: what started it (``"import"``, ``"transformers"``,
    ``"cli"``, ``"lmms_eval"``), kept with it (:func:`started`). Returns the process, or None
    where none was started. Never raises: a compile that cannot start here happens in the
    first call, as without it."""
    global _process, _reason
    if not enabled():
        return None
    with _lock:
        if _process is not None:
            return None
        kernel = sys.modules.get("videoanchor.anchor.solvers._workset_kernel")
        if kernel is not None and kernel.held("lean") and kernel.held("full"):
            return None
        try:
            if not cache_is_cold():
                return None
            proc = subprocess.Popen(
                [sys.executable, "-c", _CHILD, str(KERNEL_FILE)],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                start_new_session=True, close_fds=True,
            )  # fmt: skip
        except (OSError, ValueError, subprocess.SubprocessError):
            return None
        _process, _reason = proc, reason
    # reaped when it ends, so that it leaves no zombie behind a long-lived caller
    threading.Thread(target=proc.wait, name="videoanchor-precompile", daemon=True).start()
    return proc


def started() -> str | None:
    """What started this process's background compile (:func:`start`'s ``reason``), or None."""
    return _reason


def wait(timeout: float | None = None) -> int | None:
    """Wait for this process's background compile: its exit code, or None where none was
    started (or it still runs after ``timeout`` seconds)."""
    proc = _process
    if proc is None:
        return None
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        return None
