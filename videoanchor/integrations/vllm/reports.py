"""What one side worker reports (:class:`Reports`): the scores its rank computed ahead, for the
engine core to relay to the other tensor-parallel ranks with its next poll, and its counts
(the ``stats`` ``collective_rpc`` target's).
"""

from __future__ import annotations

import threading
from concurrent.futures import Future

__all__ = ["Reports"]


class Reports:
    """One side worker's reports. :attr:`stats`: requests it scored ahead (``computed``),
    took from another rank (``relayed``) or scored with the other ranks (``split``), and
    encoder outputs made ahead that a step took (``encoded_reused``). Thread-safe."""

    def __init__(self):
        self._lock = threading.Lock()
        self._results: dict[str, tuple] = {}  # this rank's results not yet reported
        self.stats = {"computed": 0, "relayed": 0, "encoded_reused": 0, "split": 0}

    def count(self, name: str, n: int = 1) -> None:
        """Add ``n`` to the count ``name``."""
        with self._lock:
            self.stats[name] += n

    def add(self, key: str, visual, cacheable: bool) -> None:
        """This rank's result for ``key`` (scores or None; ``cacheable``: whether the other
        ranks put it in their score caches)."""
        with self._lock:
            self._results[key] = (visual, cacheable)

    def add_when_done(self, key: str, job: Future, cache) -> None:
        """:meth:`add` ``job``'s result once it ends (not if it is cancelled): cacheable if
        it went into ``cache``."""

        def report(job: Future) -> None:
            if job.cancelled():
                return
            visual = job.result()
            self.add(key, visual, cache is not None and key in cache)

        job.add_done_callback(report)

    def take(self) -> dict:
        """The results since the last call: ``{key: (scores or None, cacheable)}``."""
        with self._lock:
            out, self._results = self._results, {}
            return out
