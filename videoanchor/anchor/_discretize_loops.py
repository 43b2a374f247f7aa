"""The discretisation's two loops (:mod:`videoanchor.anchor.labels`), compiled by Numba
for their one signature each and kept in its on-disk cache (issue 101: apart from the
discretisation, so that the background compile, :mod:`videoanchor.anchor.solvers.precompile`,
loads this file alone, without torch, and compiles them beside the SSC kernel). A process
makes them ready with :func:`ready` (loaded from Numba's cache, or compiled into it holding a
lock beside it: :class:`~videoanchor.anchor._jit_cache.Functions`) before their first call;
another specialisation (arrays of another layout) still compiles where a call needs it.
Plain loops, no ``fastmath``: the same answer whatever Numba and LLVM make of them.
"""

from __future__ import annotations

import logging

import numpy as np
from numba import types

from videoanchor.anchor._jit_cache import Functions, jit_cached

__all__ = ["held", "ready"]

_F1, _F2 = types.float64[::1], types.float64[:, ::1]
#: Their signatures: the C-contiguous arrays :class:`~videoanchor.anchor.labels.Paths`
#: hands them.
PICK = types.int64(_F1, _F1, _F1)
DECIDE = types.float64(_F2, _F2, types.boolean[::1], types.int64[::1], _F2)


def _pick(c, d, record):  # pragma: no cover - compiled
    """``c += |d|``; the first argmin of ``c`` (returned); ``record`` (``c``'s size, or
    empty) a copy of ``c``."""
    p, best = 0, np.inf
    for i in range(c.shape[0]):
        c[i] += abs(d[i])
        if i == 0 or c[i] < best:
            p, best = i, c[i]
    for i in range(record.shape[0]):
        record[i] = c[i]
    return p


def _decide(s, v, skip, labels, t):  # pragma: no cover - compiled
    """One iteration's decisions from ``s = v R``: ``labels[i]`` the first argmax of row
    ``i``, ``t[l]`` the sum of label ``l``'s rows of ``v`` (in row order) and the smallest
    top-1 minus top-2 margin over the rows, the columns ``skip`` left out of it (returned).
    Plain loops: they compile in a fraction of a second."""
    n, k = s.shape
    for i in range(n):
        arg, one = 0, s[i, 0]
        for j in range(1, k):
            if s[i, j] > one:
                arg, one = j, s[i, j]
        labels[i] = arg
    skipping = False
    for j in range(k):
        skipping |= skip[j]
    margin = np.inf
    for i in range(n):
        one, two = s[i, labels[i]], -np.inf
        if skipping:  # (the labels' own column may be left out)
            one = -np.inf
            for j in range(k):
                if not skip[j]:
                    if s[i, j] > one:
                        one, two = s[i, j], one
                    elif s[i, j] > two:
                        two = s[i, j]
        else:
            for j in range(k):
                if j != labels[i] and s[i, j] > two:
                    two = s[i, j]
        margin = min(margin, one - two)
    for a in range(k):
        for b in range(k):
            t[a, b] = 0.0
    for i in range(n):
        for j in range(k):
            t[labels[i], j] += v[i, j]
    return margin


_UNCACHED: list[str] = []
_log = logging.getLogger("videoanchor.kernel")


def _warn(err) -> None:
    _log.warning("videoanchor: Numba cannot cache the discretisation's loops (%s); each "
                 "process compiles them: set NUMBA_CACHE_DIR to a folder it can write to", err)  # fmt: skip


_pick = jit_cached(_pick, {"nogil": True}, _UNCACHED, _warn)
_decide = jit_cached(_decide, {"nogil": True}, _UNCACHED, _warn)
_FUNCTIONS = Functions("discretisation's loops", {"loops": [(_pick, PICK), (_decide, DECIDE)]},
                       _log, only=False)  # fmt: skip
#: What this process did for the loops (:class:`~videoanchor.anchor._jit_cache.Functions`).
EVENTS = _FUNCTIONS.events


def ready(*, compile: bool = True) -> bool:
    """The loops for their signatures in this process: held, loaded from Numba's cache, or
    (``compile``) compiled and saved there, holding the lock beside it (a process that finds
    another compiling them waits for it). False where ``compile`` is False and neither this
    process nor the cache holds them."""
    return _FUNCTIONS.ready("loops", compile=compile)


def held() -> bool:
    """Whether this process holds the loops (loaded or compiled)."""
    return _FUNCTIONS.held("loops")
