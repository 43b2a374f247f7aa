"""Anchor scores kept across requests, in memory, least recently used first out.

A request's scores depend on its visual items and on the options that change SSC's answer
(:data:`SCORE_OPTIONS` and the cluster count), not on the question or the alphas. Serving
and evaluation ask many questions about one video (VSI-Bench: about 17 per video), so an
engine that keys the scores by its items' content hashes runs SSC once per video and option
set. The vLLM plugin keys them by vLLM's multimodal item hashes (``mm_features[i].identifier``,
a hash of the processed inputs), so a hit needs neither the encoder nor SSC. The transformers
path keeps SSC's coefficients and labels on disk instead (:mod:`.transformers.cache`, keyed by
the features' content), and shares :class:`CacheStats` and :data:`SCORE_OPTIONS` with this.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from videoanchor.anchor.options import names_affecting
from videoanchor.integrations.options import SSC_CONFIG_NAMES

__all__ = ["SCORE_OPTIONS", "SSC_OPTIONS", "CacheStats", "ScoreCache", "score_key"]

#: The options of :class:`~videoanchor.integrations.options.AnchorConfig` that change SSC's
#: coefficient matrix C (:func:`~videoanchor.anchor.options.names_affecting`).
SSC_OPTIONS = tuple(
    name for name, opt in SSC_CONFIG_NAMES.items() if opt in names_affecting("coef")
)
_LABEL_OPTIONS = tuple(  # (the cluster count is part of the key on its own)
    name
    for name, opt in SSC_CONFIG_NAMES.items()
    if opt in names_affecting("labels") and opt != "n_clusters"
)
#: Those that change the scores given the features: C's, the labels' (the cluster count is
#: part of the key on its own: it may be lowered per request) and ``ssc_mode`` (the same
#: program either way, but blocked mode runs the authors' iteration where
#: ``ssc_solver="auto"`` in exact mode runs another solver).
SCORE_OPTIONS = (*SSC_OPTIONS, *_LABEL_OPTIONS, "ssc_mode")


@dataclass
class CacheStats:
    """Hits and misses per kind of entry since the cache was made (and ``evictions``)."""

    counts: dict = field(default_factory=dict)

    def add(self, kind: str, hit: bool) -> None:
        """Count one lookup of ``kind`` (``vision``, ``ssc``, ``labels``, ``scores``)."""
        key = f"{kind}_{'hits' if hit else 'misses'}"
        self.counts[key] = self.counts.get(key, 0) + 1

    def __getitem__(self, key: str) -> int:
        return self.counts.get(key, 0)


def score_key(identifiers, n_clusters: int, config) -> str:
    """The key of one request's scores: its scored items' identifiers in prompt order (the
    SSC is joint over all of them), the cluster count it ran with and ``config``'s
    :data:`SCORE_OPTIONS`."""
    opts = {k: str(getattr(config, k)) for k in SCORE_OPTIONS}
    blob = json.dumps([list(map(str, identifiers)), int(n_clusters), opts], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


class ScoreCache:
    """Scores of recent requests, at most ``max_bytes`` of them, the least recently used
    evicted first. ``get`` / ``put`` take a :func:`score_key`; ``stats`` counts hits,
    misses (kind ``scores``) and evictions. Thread-safe: the vLLM plugin fills it from its
    side worker (scores computed ahead of a request's prefill) while the engine steps."""

    def __init__(self, max_bytes: int):
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 0:
            raise ValueError(f"max_bytes: expected a non-negative int, got {max_bytes!r}")
        self.max_bytes = max_bytes
        self._entries: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.bytes = 0
        self.stats = CacheStats()
        self._lock = threading.Lock()

    def __contains__(self, key: str) -> bool:
        """Whether ``key`` is stored (no hit or miss counted, no recency change)."""
        with self._lock:
            return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str) -> torch.Tensor | None:
        """The scores stored under ``key`` (now the most recently used), or None."""
        with self._lock:
            scores = self._entries.get(key)
            self.stats.add("scores", scores is not None)
            if scores is not None:
                self._entries.move_to_end(key)
            return scores

    def put(self, key: str, scores: torch.Tensor) -> None:
        """Store a copy of ``scores`` (on the CPU); an entry larger than the whole cache is
        not stored."""
        scores = scores.detach().to("cpu").clone()
        size = scores.numel() * scores.element_size()
        with self._lock:
            self._put(key, scores, size)

    def _put(self, key: str, scores: torch.Tensor, size: int) -> None:
        old = self._entries.pop(key, None)
        if old is not None:
            self.bytes -= old.numel() * old.element_size()
        if size > self.max_bytes:
            return
        self._entries[key] = scores
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, evicted = self._entries.popitem(last=False)
            self.bytes -= evicted.numel() * evicted.element_size()
            self.stats.counts["evictions"] = self.stats["evictions"] + 1

    def summary(self) -> str:
        """One line of counters for the logs."""
        s = self.stats
        return (
            f"score cache: {s['scores_hits']} hits, {s['scores_misses']} misses, "
            f"{s['evictions']} evictions, {len(self)} entries, {self.bytes / 2**20:.2f} of "
            f"{self.max_bytes / 2**20:.0f} MiB"
        )
