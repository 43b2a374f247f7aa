"""What an operator sees of an anchored engine: Prometheus series in vLLM's own ``/metrics``,
and the plugin's warnings through vLLM's log handlers.

**Series.** The SSC runs in the engine core (or its workers), the refusals happen in the
front end, and vLLM's OpenAI server serves ``/metrics`` from the front end's default
``prometheus_client`` registry: in vLLM's default process layout (one API server, the engine
core in a process of its own) a counter incremented in the engine core never reaches it, and
vLLM's multiprocess mode (``PROMETHEUS_MULTIPROC_DIR``) is on only with several API servers.
So each process counts in memory (:func:`count`, :func:`observe`) and, after each change,
writes its counts to ``<dir>/<pid>.json`` (a few hundred bytes, replaced atomically); the
front end of an anchored engine (:func:`export`, called where it validates the engine's
config, before any engine process starts) makes that directory, hands it to the engine
processes in the environment (:data:`ENV`) and registers a collector on the default registry
that sums the files at each scrape. An unanchored engine never calls :func:`export`: its
``/metrics`` is unchanged.

**Warnings.** :func:`route_warnings` (installed in every vLLM process by the plugin's
``register``) sends the ``warnings.warn`` of videoanchor's code, and any warning raised
while a request is scored (:func:`scoring`), to the ``videoanchor.vllm`` logger, naming the
request; vLLM's handlers format it (``_ThroughVllm`` in the package's ``__init__``). It
replaces ``warnings.showwarning`` once, keeping the original for every other warning:
unlike ``warnings.catch_warnings`` it is safe with the side threads that score requests.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import re
import shutil
import tempfile
import threading
import warnings
from bisect import bisect_left
from contextlib import contextmanager
from pathlib import Path

__all__ = [
    "ENV",
    "SERIES",
    "count",
    "export",
    "observe",
    "read",
    "refused",
    "reset_counts",
    "route_warnings",
    "scoring",
    "snapshot",
    "tp_rank",
]

logger = logging.getLogger("videoanchor.vllm")

#: The environment variable naming the directory the processes of an anchored engine write
#: their counts to (set by :func:`export` in the front end; inherited by the engine core
#: and its workers).
ENV = "VIDEOANCHOR_METRICS_DIR"

_SECONDS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
_TOKENS = (64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)

#: name -> (kind, help, label names, histogram bucket bounds, label values always shown).
SERIES: dict[str, tuple] = {
    "videoanchor_ssc_runs": (
        "counter", "SSC runs (one per distinct request scores computed), by where they ran: "
        "ahead of the request's step or inside it", ("where",), None, ("ahead", "step"),
    ),
    "videoanchor_ssc_seconds": (
        "histogram", "Seconds of one SSC run (the solver only, not the encoder)", ("where",),
        _SECONDS, ("ahead", "step"),
    ),
    "videoanchor_ssc_visual_tokens": (
        "histogram", "Visual tokens of one SSC run (_sum: all tokens scored)", ("where",),
        _TOKENS, ("ahead", "step"),
    ),
    "videoanchor_score_cache_hits": (
        "counter", "Scored requests whose scores came from the score cache (no SSC)", (),
        None, (),
    ),
    "videoanchor_score_cache_misses": (
        "counter", "Scored requests whose scores were not in the score cache", (), None, (),
    ),
    "videoanchor_requests_held": (
        "counter", "Requests held out of the batch while their scores are computed ahead "
        "(also those whose prompt the prefix cache then serves whole: no step reaches their "
        "visual tokens, so they are neither score-cache hits nor misses)", (), None, (),
    ),
    "videoanchor_requests_refused": (
        "counter", "Requests refused (HTTP 400) for a videoanchor entry of their extra_args, "
        "by its key: a bad value or type, an option or limit of the operator's "
        "request_options or request_limits, a backend the server cannot run; "
        'option="video": a video too short for the model',
        ("option",), None, (),
    ),
    "videoanchor_failures": (
        "counter", "Requests whose scoring failed, by where: ahead of the step, in the step",
        ("where",), None, ("ahead", "step"),
    ),
}  # fmt: skip

_lock = threading.Lock()
# name -> {label values (tuple): value}; a histogram's value: [bucket counts..., +Inf, sum]
_counts: dict[str, dict[tuple, object]] = {}


def _reset_in_child() -> None:  # a forked process starts from zero: its parent's are its own
    global _lock
    _lock = threading.Lock()
    _counts.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_in_child)


def reset_counts() -> None:
    """Forget this process's counts, as a forked process starts (its file under
    :data:`ENV` is rewritten at the next change). For tests and tools that count from
    zero."""
    with _lock:
        _counts.clear()


def _labels(name: str, kind: str, labels: dict) -> tuple:
    """The label values of one ``kind`` series ``name``, in its label names' order."""
    if name not in SERIES:
        raise ValueError(
            f"videoanchor metrics: unknown series {name!r}; expected one of {', '.join(SERIES)}"
        )
    if SERIES[name][0] != kind:
        raise ValueError(f"videoanchor metrics: {name!r} is not a {kind}")
    names = SERIES[name][2]
    if set(labels) != set(names):
        raise ValueError(f"videoanchor metrics: {name} takes labels {names}, got {tuple(labels)}")
    return tuple(str(labels[n]) for n in names)


def count(name: str, amount: float = 1.0, **labels) -> None:
    """Adds ``amount`` to the counter ``name`` (a key of :data:`SERIES`) in this process."""
    key = _labels(name, "counter", labels)
    with _lock:
        series = _counts.setdefault(name, {})
        series[key] = series.get(key, 0.0) + float(amount)
        _write()


def observe(name: str, value: float, **labels) -> None:
    """Adds one observation ``value`` to the histogram ``name`` in this process."""
    key = _labels(name, "histogram", labels)
    bounds = SERIES[name][3]
    with _lock:
        series = _counts.setdefault(name, {})
        hist = series.setdefault(key, [0.0] * (len(bounds) + 2))
        hist[bisect_left(bounds, value)] += 1  # the bucket whose bound is the first >= value
        hist[-1] += float(value)
        _write()


_OPTION = re.compile(r"extra_args\['([^']+)'\]")


def refused(message: str) -> None:
    """Counts one refused request; ``message``: its error, which names the ``extra_args``
    key (the series' ``option`` label)."""
    found = _OPTION.search(message)
    count("videoanchor_requests_refused", option=found.group(1) if found else "unknown")


def snapshot() -> dict:
    """This process's counts: ``{name: [[label values, value], ...]}`` (JSON-ready)."""
    with _lock:
        return {name: [[list(k), v] for k, v in s.items()] for name, s in _counts.items()}


def _write() -> None:  # under _lock
    path = os.environ.get(ENV)
    if not path:
        return
    data = json.dumps({name: [[list(k), v] for k, v in s.items()] for name, s in _counts.items()})
    final = os.path.join(path, f"{os.getpid()}.json")
    tmp = final + ".tmp"
    try:
        with open(tmp, "w") as f:
            f.write(data)
        os.replace(tmp, final)
    except OSError as err:  # the directory went with the front end (shutting down)
        logger.debug("videoanchor: metrics not written to %s: %s", path, err)


def read(path) -> dict:
    """The counts of every process that wrote to ``path``, summed: ``{name: {label values
    (tuple): value}}`` (a histogram's value: its bucket counts, the +Inf count and the sum)."""
    total: dict[str, dict[tuple, object]] = {}
    for file in sorted(Path(path).glob("*.json")):
        try:
            data = json.loads(file.read_text())
        except (OSError, ValueError):  # replaced or removed meanwhile: its next scrape
            continue
        for name, rows in data.items():
            if name not in SERIES:
                continue
            series = total.setdefault(name, {})
            for key, value in rows:
                key = tuple(key)
                old = series.get(key)
                if isinstance(value, list):
                    series[key] = (
                        value if old is None else [a + b for a, b in zip(old, value, strict=True)]
                    )
                else:
                    series[key] = value + (old or 0.0)
    return total


class _Collector:
    """The series of :data:`SERIES` summed over the files in ``path`` at each scrape."""

    def __init__(self, path: str):
        self.path = path

    def describe(self):
        return list(self._families({}))

    def collect(self):
        return list(self._families(read(self.path)))

    @staticmethod
    def _families(totals: dict):
        from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily

        for name, (kind, help_text, label_names, bounds, always) in SERIES.items():
            values = dict(totals.get(name, {}))
            for v in always:  # shown at 0 from the start, so rate() has a start
                values.setdefault((v,), None)
            if not label_names:
                values.setdefault((), None)
            if kind == "counter":
                fam = CounterMetricFamily(name, help_text, labels=label_names)
                for key, value in sorted(values.items()):
                    fam.add_metric(list(key), value or 0.0)
            else:
                fam = HistogramMetricFamily(name, help_text, labels=label_names)
                for key, value in sorted(values.items()):
                    hist = value or [0.0] * (len(bounds) + 2)
                    cumulative, buckets = 0.0, []
                    for bound, n in zip(
                        (*map(str, map(float, bounds)), "+Inf"), hist[:-1], strict=True
                    ):
                        cumulative += n
                        buckets.append((bound, cumulative))
                    fam.add_metric(list(key), buckets, sum_value=hist[-1])
            yield fam


_exported: set[str] = set()


def export() -> str | None:
    """In the front end of an anchored engine, before its engine processes start: makes the
    directory the processes write their counts to (:data:`ENV`, unless it is set already)
    and registers the collector of the videoanchor series on ``prometheus_client``'s default
    registry, the one vLLM's ``/metrics`` serves. Returns the directory (None without
    ``prometheus_client``). Idempotent."""
    try:
        from prometheus_client import REGISTRY
    except ImportError:
        return None
    path = os.environ.get(ENV)
    if not path:
        path = tempfile.mkdtemp(prefix="videoanchor-metrics-")
        atexit.register(shutil.rmtree, path, True)
        os.environ[ENV] = path
    os.makedirs(path, exist_ok=True)
    if path not in _exported:
        REGISTRY.register(_Collector(path))
        _exported.add(path)
        with _lock:
            _write()
    return path


def tp_rank() -> int:
    """This worker's tensor-parallel rank (0 outside a tensor-parallel group): per-request
    counts and lines come from rank 0 only."""
    try:
        from vllm.distributed import get_tensor_model_parallel_rank

        return get_tensor_model_parallel_rank()
    except Exception:  # no model-parallel group (an engine-less test, or not set up)
        return 0


# --- warnings -------------------------------------------------------------------------------

_scoring = threading.local()
_PACKAGE = str(Path(__file__).resolve().parents[2])  # the videoanchor package's directory
_original_showwarning = None


@contextmanager
def scoring(req_id: str):
    """Marks this thread as scoring ``req_id``: a warning raised inside goes to the
    plugin's logger naming the request (:func:`route_warnings`), when the block ends. Yields
    the list of those held so far (``(message, category, filename, lineno)``), which the
    block may edit: the scores' warnings that only the solver's outcome explains."""
    before = getattr(_scoring, "req_id", None), getattr(_scoring, "held", None)
    _scoring.req_id, _scoring.held = req_id, []
    held = _scoring.held
    try:
        yield held
    finally:
        _scoring.req_id, _scoring.held = before
        for w in held:
            _log_warning(req_id, *w)


def _log_warning(req_id, message, category, filename, lineno) -> None:
    ours = str(filename).startswith(_PACKAGE)
    logger.warning(
        "videoanchor: %s%s (%s at %s:%s)",
        f"request {req_id}: " if req_id is not None else "", message, category.__name__,
        os.path.relpath(filename, os.path.dirname(_PACKAGE)) if ours else filename, lineno,
    )  # fmt: skip


def _showwarning(message, category, filename, lineno, file=None, line=None):
    held = getattr(_scoring, "held", None)
    if held is not None:
        held.append((message, category, filename, lineno))
    elif str(filename).startswith(_PACKAGE):
        _log_warning(None, message, category, filename, lineno)
    else:
        return _original_showwarning(message, category, filename, lineno, file, line)


def route_warnings(route: bool = True) -> None:
    """Sends warnings of videoanchor's code, and those raised while a request is scored, to
    the ``videoanchor.vllm`` logger (once per process; other warnings go where they went).
    ``route=False`` undoes it: ``warnings.showwarning`` is again the one it replaced (as
    ``logging.captureWarnings(False)``)."""
    global _original_showwarning
    if not route:
        if warnings.showwarning is _showwarning:
            warnings.showwarning = _original_showwarning
            _original_showwarning = None
        return
    if warnings.showwarning is _showwarning:
        return
    _original_showwarning = warnings.showwarning
    warnings.showwarning = _showwarning
