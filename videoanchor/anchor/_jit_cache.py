"""Numba functions compiled for declared signatures and kept in Numba's on-disk cache, made
ready by group under a file lock (issue 93; issue 101 moved it here from the working-set
kernel so that the discretisation's loops share it).

A :class:`Group` is a set of Numba dispatchers, each with its one declared signature, that
one process loads from Numba's cache or compiles (and saves there) together
(:meth:`Functions.ready`), holding a lock file beside the first one's cache index so that
two processes never compile a group at once: a process that finds another compiling it
waits for that and loads what it saved. The background compile
(:mod:`videoanchor.anchor.solvers.precompile`) runs these groups in processes of its own,
loading this file, the kernels' files and nothing else (no torch): this module imports
Numba and the standard library alone.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time

import numba
from numba.core import config
from numba.core.compiler_lock import global_compiler_lock

try:
    import fcntl
except ImportError:  # (not POSIX: the cache is written without a lock)
    fcntl = None

__all__ = ["Functions", "jit_cached"]


def jit_cached(py_func, options: dict, uncached: list, warn):
    """``py_func`` compiled by Numba (``options``) with its on-disk cache, or without one
    where Numba finds no folder it can write to (``$NUMBA_CACHE_DIR``, the package's
    ``__pycache__``, the user's cache folder: it raises at decoration), which a process then
    compiles each time: its name appended to ``uncached``, and ``warn(err)`` called for the
    first such function."""
    try:
        return numba.njit(cache=True, **options)(py_func)
    except RuntimeError as err:  # (numba.core.caching: "cannot cache function ...")
        if not uncached:
            warn(err)
        uncached.append(py_func.__name__)
        return numba.njit(**options)(py_func)


class Functions:
    """Groups of Numba dispatchers (``groups``: name -> ``[(dispatcher, signature), ...]``),
    each made ready in this process by :meth:`ready`. ``what``: the functions' name in the
    line a waiting process writes (the ``log`` logger). ``only``: once ready, a dispatcher
    compiles no other specialisation (a call with other types raises: a bug). :attr:`events`
    records what this process did for each group: ``{"kernel", "how", "seconds",
    "waited"}``, ``how`` "loaded" (from Numba's cache) or "compiled" (and saved there),
    ``waited`` the seconds spent waiting for another process's compile of it."""

    def __init__(self, what: str, groups: dict, log: logging.Logger, *, only: bool):
        self.what, self.groups, self.log, self.only = what, groups, log, only
        self.events: list[dict] = []
        self._held: set[str] = set()
        self._lock = threading.Lock()
        self._missed: dict[str, tuple] = {}  # group: its cache index's stamp when not found

    def held(self, group: str) -> bool:
        """Whether this process holds ``group`` loaded or compiled."""
        return group in self._held or config.DISABLE_JIT

    def _first(self, group: str):
        return self.groups[group][0][0]

    def _index_stamp(self, group: str) -> tuple | None:
        try:
            st = os.stat(self._first(group)._cache._cache_file._index_path)
        except (OSError, AttributeError):  # (none, or no cache at all)
            return None
        return st.st_mtime_ns, st.st_size

    def lock_path(self, group: str) -> str | None:
        """The file whose lock a process holds while it loads or compiles ``group`` into
        Numba's cache: beside its first function's cache index (the folder Numba caches it
        in); None where Numba keeps no cache of it (:func:`jit_cached`)."""
        cache = self._first(group)._cache
        impl = getattr(cache, "_impl", None)
        return (
            None if impl is None else os.path.join(cache.cache_path, impl.filename_base + ".lock")
        )

    @contextlib.contextmanager
    def _file_lock(self, group: str, wait: bool):
        """Holds ``group``'s :meth:`lock_path` (``flock``, on a file opened for reading where
        it is another user's; released when the process ends, however it ends): yields the
        seconds waited for it, or None where ``wait`` is False and another process holds it.
        Where the lock cannot be made (no ``fcntl``, a cache folder that cannot be written),
        yields 0.0 without one (Numba writes each cache file whole, by a rename)."""
        fd, path = None, self.lock_path(group)
        if fcntl is not None and path is not None:
            with contextlib.suppress(OSError):
                self._first(group)._cache._impl.locator.ensure_cache_path()
            for flags in (os.O_RDWR | os.O_CREAT, os.O_RDONLY):  # (another user's: read)
                try:
                    fd = os.open(path, flags, 0o666)
                    break
                except OSError:
                    fd = None
        if fd is None:
            yield 0.0
            return
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                waited = 0.0
            except BlockingIOError:
                if not wait:
                    yield None
                    return
                self.log.warning("videoanchor: waiting for another process compiling the %s "
                                 "(%s) into Numba's cache (%s)", self.what, group, path)  # fmt: skip
                t0 = time.perf_counter()
                fcntl.flock(fd, fcntl.LOCK_EX)
                waited = time.perf_counter() - t0
            yield waited
        finally:
            os.close(fd)

    @staticmethod
    def _load(disp, sig) -> bool:
        """``disp``'s ``sig`` from Numba's cache into ``disp`` (as ``compile`` loads it before
        compiling), without compiling: whether the cache held it for this CPU."""
        if getattr(disp, "_cache", None) is None:
            return False
        with global_compiler_lock:
            cres = disp._cache.load_overload(sig, disp.targetctx)
            if cres is None:
                return False
            disp._cache_hits[sig] += 1
            disp.targetctx.insert_user_function(cres.entry_point, cres.fndesc, [cres.library])
            disp.add_overload(cres)
        return True

    def ready(self, group: str, *, compile: bool = True) -> bool:
        """``group``'s functions with their signatures in this process: held already, loaded
        from Numba's cache, or (``compile``) compiled and saved there, holding
        :meth:`lock_path`'s lock (module docstring). With ``compile`` False: False where
        neither this process nor the cache holds the group, or another process holds its
        lock. Numba keys its cache by the CPU (name and features): a cache made for another
        CPU is not loaded but compiled for this one beside it."""
        if config.DISABLE_JIT or group in self._held:
            return True
        with self._lock:
            if group in self._held:
                return True
            if not compile and self._missed.get(group, False) == self._index_stamp(group):
                return False  # (not found, and the index has not changed since)
            with self._file_lock(group, wait=compile) as waited:
                if waited is None:
                    return False
                t0 = time.perf_counter()
                members = self.groups[group]
                loaded = [self._load(d, s) for d, s in members]
                if all(loaded):
                    how = "loaded"
                elif not compile:
                    self._missed[group] = self._index_stamp(group)
                    return False
                else:
                    for (disp, sig), done in zip(members, loaded, strict=True):
                        if not done:
                            disp.compile(sig)
                    how = "compiled"
                if self.only:
                    for disp, _ in members:
                        disp.disable_compile()  # (one specialisation: another would be a bug)
                self.events.append({"kernel": group, "how": how,
                                    "seconds": time.perf_counter() - t0, "waited": waited})  # fmt: skip
                self._held.add(group)
        return True
