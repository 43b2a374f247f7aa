"""A pytest plugin: the tests' outcomes as a result JSON (issue 98, item 5), rewritten after
each test's report, so a run stopped by a time limit still leaves the counts it reached.

    python -m pytest -p benchmarks.pytest_counts --counts-json OUT_DIR -m gpu tests/...

writes ``OUT_DIR/gpu_tests_<device>.json`` (``--counts-name`` for another name than
``gpu_tests``): ``meta`` as every benchmark's (device, versions, git SHA), with the counts
(``passed``, ``failed``, ``errors``, ``skipped``, ``xfailed``, ``xpassed``), ``finished``
(False until the session ends: a file with False was stopped), pytest's ``exitstatus`` and
the arguments; ``rows``, one per test: its node id, outcome, seconds, and for a failure or a
skip the first 2,000 characters of its report. Under pytest-xdist only the controller writes
(the workers' reports reach it)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

OUTCOMES = ("passed", "failed", "errors", "skipped", "xfailed", "xpassed")


def pytest_addoption(parser):
    group = parser.getgroup("counts", "the tests' outcomes as a result JSON")
    group.addoption("--counts-json", default=None, metavar="DIR",
                    help="write DIR/<name>_<device>.json, rewritten after each test")  # fmt: skip
    group.addoption("--counts-name", default="gpu_tests", help="the file's name before _<device>")


def _outcome(report) -> str | None:
    """The outcome this report settles (None: none yet, e.g. a passing setup)."""
    xfail = hasattr(report, "wasxfail")
    if report.when == "call":
        if report.passed:
            return "xpassed" if xfail else "passed"
        if report.skipped:
            return "xfailed" if xfail else "skipped"
        return "failed"
    if report.failed:  # setup or teardown
        return "errors"
    if report.skipped:
        return "xfailed" if xfail else "skipped"
    return None


class Counts:
    def __init__(self, config):
        if str(ROOT) not in sys.path:
            sys.path.insert(0, str(ROOT))
        from benchmarks.common import environment

        self.out_dir = config.getoption("counts_json")
        self.name = config.getoption("counts_name")
        self.started = time.perf_counter()
        self.rows: dict[str, dict] = {}
        self.meta = environment()
        self.meta.update(args=list(config.invocation_params.args), finished=False,
                         exitstatus=None)  # fmt: skip
        self.path = None
        self.write()

    def report(self, report) -> None:
        outcome = _outcome(report)
        if outcome is None:
            return
        row = self.rows.setdefault(report.nodeid, dict(test=report.nodeid, seconds=0.0))
        row["seconds"] += float(getattr(report, "duration", 0.0))
        if row.get("outcome") in ("failed", "errors") and outcome != "errors":
            return  # a failed call stays failed whatever its teardown did
        row["outcome"] = outcome
        if outcome in ("failed", "errors", "skipped", "xfailed"):
            text = str(report.longrepr) if report.longrepr is not None else ""
            row["report"] = text[-2000:] if outcome in ("failed", "errors") else text[:2000]
        self.write()

    def write(self) -> Path:
        from benchmarks.common import write_result

        counts = {k: 0 for k in OUTCOMES}
        for row in self.rows.values():
            counts[row["outcome"]] += 1
        self.meta.update(counts, tests=len(self.rows),
                         seconds=time.perf_counter() - self.started)  # fmt: skip
        self.path = write_result(self.name, self.meta, list(self.rows.values()), self.out_dir)
        return self.path


def pytest_configure(config):
    if config.getoption("counts_json") and not hasattr(config, "workerinput"):
        config.pluginmanager.register(_Plugin(config), "videoanchor_counts")


class _Plugin:
    def __init__(self, config):
        self.counts = Counts(config)

    def pytest_runtest_logreport(self, report):
        self.counts.report(report)

    def pytest_sessionfinish(self, session, exitstatus):
        self.counts.meta.update(finished=True, exitstatus=int(exitstatus))
        path = self.counts.write()
        m = self.counts.meta
        print(f"\ncounts: {m['passed']} passed, {m['failed']} failed, {m['errors']} errors, "
              f"{m['skipped']} skipped -> {path}")  # fmt: skip
