"""Progress, ETA and an optional time budget for the SSC iterations (docs/long-videos.md).

The solvers report to an :class:`SSCProgress`: ``begin(...)`` once, ``update(iteration,
residual)`` every iteration (its return value: stop now), ``next_block()`` between column
blocks and ``close(...)`` at the end. ``progress=`` of the SSC entry points takes ``False``,
``True``, ``None``/``"auto"`` (report once a run lasts ``delay`` seconds; the default) or an
:class:`SSCProgress` (reused across runs; it keeps each run's summary in ``runs``).
"""

from __future__ import annotations

import logging
import math
import numbers
import sys
import time
from dataclasses import dataclass

import torch

__all__ = [
    "SSCConvergenceWarning",
    "SSCProgress",
    "SSCRunSummary",
    "as_reporter",
    "format_seconds",
]

logger = logging.getLogger("videoanchor.progress")


def _log(level: int, msg: str, *args) -> None:
    """``logger.log``; while no handler would show the line, it goes to stderr as
    ``videoanchor: ...`` (INFO and above, or the logger's own level where one is set)."""
    if logger.hasHandlers():
        logger.log(level, msg, *args)
    elif (
        level >= (logger.level or logging.INFO)
        and not logger.disabled
        and (logging.root.manager.disable < level)
    ):
        print(f"videoanchor: {msg % args if args else msg}", file=sys.stderr, flush=True)


_AUTO_DELAY = 5.0  # seconds before an automatic report appears
_FIT_MIN_POINTS = 10  # the projection needs 20 iterations (fit over the last half)


class SSCConvergenceWarning(UserWarning):
    """An SSC run stopped before its residual reached ``eps`` (iteration limit or time
    budget): its scores come from an unconverged iterate."""


def format_seconds(s: float | None) -> str:
    """``'12.5 ms'``, ``'42 s'``, ``'3 min 05 s'``, ``'2 h 07 min'`` (``'?'`` for None/inf)."""
    if s is None or not math.isfinite(s):
        return "?"
    s = max(0.0, float(s))
    if s < 1:
        return f"{s * 1000:.3g} ms"
    if s < 60:
        return f"{s:.1f} s" if s < 10 else f"{s:.0f} s"
    if s < 3600:
        m, sec = divmod(int(round(s)), 60)
        return f"{m} min {sec:02d} s"
    h, rem = divmod(int(round(s)), 3600)
    return f"{h} h {rem // 60:02d} min"


@dataclass
class SSCRunSummary:
    """How one SSC run ended (:meth:`message` says it in one line)."""

    converged: bool
    iterations: int
    """The largest of any block."""
    residual: float
    """The final residual (the largest of any block)."""
    best_residual: float
    """The smallest residual seen."""
    eps: float
    max_iter: int
    seconds: float
    """Seconds spent iterating."""
    stopped_by_budget: bool
    """Whether the time budget stopped it."""
    tokens: int | None = None
    stopped_by: str | None = None
    """None, or why the run ended before its own stopping test: ``"interrupted"`` (Ctrl-C)
    or the error that ended it (``"FloatingPointError: ..."``)."""
    fixed_schedule: bool = False
    """A fixed number of iterations with no stopping test (``solver="fast"``): ``eps`` and
    the residual do not decide when it ends."""

    def message(self) -> str:
        """One line: converged or not, residual vs eps, why it stopped."""
        what = f"SSC{'' if self.tokens is None else f' ({self.tokens} tokens)'}"
        res = f"residual {self.residual:.3g} vs eps {self.eps:.3g}"
        took = format_seconds(self.seconds)
        if self.stopped_by is not None:  # neither converged nor at a limit: say what ended it
            it = self.iterations
            at = f"at iteration {it}" if it else "before its first iteration"
            last = f" at {res}" if math.isfinite(self.residual) else ""
            if self.stopped_by == "interrupted":
                return f"{what} interrupted {at} ({took}){last}: NOT converged"
            return f"{what} stopped by an error {at} ({took}){last}: {self.stopped_by}"
        if self.fixed_schedule and self.converged:
            return (
                f"{what} ran its fixed schedule of {self.iterations} iterations ({took}; no "
                f"stopping test: the last residual, {self.residual:.3g}, is not compared "
                "with eps)"
            )
        if self.converged:
            return f"{what} converged in {self.iterations} iterations ({res}, {took})"
        if self.residual < self.eps:  # not a contradiction: say why it still did not stop
            res += (
                " (below eps only at the last iteration, before the solver's stopping test, "
                "which also needs an outlier-term update, could confirm it)"
            )
        if self.stopped_by_budget:
            return (
                f"{what} stopped by the time budget after {self.iterations} iterations "
                f"({took}) at {res}: NOT converged; the scores come from the iterate "
                "reached, not from the paper's converged solution"
            )
        return (
            f"{what} stopped at its iteration limit max_iter={self.max_iter} ({took}) at "
            f"{res}: NOT converged; raise max_iter (--ssc-max-iter) for the paper's answer"
        )


class SSCProgress:
    """Progress of SSC runs: on a terminal (``stream.isatty()``, default ``sys.stderr``) a
    tqdm bar with the iteration, the residual against ``eps`` and an ETA; otherwise a line on
    the ``videoanchor.progress`` logger (INFO) every ``log_every`` seconds, written to stderr
    as ``videoanchor: ...`` while no handler would show it (a handler of your own takes over;
    ``logging.NullHandler()`` silences it).

    After ``estimate_after`` iterations it reports the cost once (seconds per iteration, the
    time the iteration limit would take); from the 20th iteration on, the iterations
    projected to reach ``eps`` (``log(residual)`` extrapolated linearly over the last half of
    them: a rough guide, as ADMM's first iterations fall much faster than its late ones).

    ``enabled``: True, False (silent; the budget still applies) or ``"auto"`` (report once a
    run lasts ``delay`` seconds). ``time_budget`` (seconds): :meth:`update` returns True once
    a run has used it, and the solver stops at the iterate reached, reported as unconverged
    (:attr:`stopped_by_budget`; not the paper's answer); over ``B`` column blocks, block
    ``k`` must finish by ``(k + 1) / B`` of it. ``desc``: the bar's label.
    """

    def __init__(
        self,
        *,
        enabled: bool | str = True,
        time_budget: float | None = None,
        stream=None,
        log_every: float = 30.0,
        delay: float | None = None,
        estimate_after: int = 10,
        desc: str = "SSC",
    ):
        if enabled not in (True, False, "auto"):
            raise ValueError(f"enabled: expected True, False or 'auto', got {enabled!r}")
        real = isinstance(time_budget, numbers.Real) and not isinstance(time_budget, bool)
        if time_budget is not None and not (real and 0 < time_budget < math.inf):
            raise ValueError(
                f"time_budget: expected a positive number of seconds or None, got {time_budget!r}"
            )
        if not (log_every > 0):
            raise ValueError(f"log_every: expected a positive number of seconds, got {log_every}")
        self.enabled = enabled
        self.time_budget = None if time_budget is None else float(time_budget)
        self.stream = stream
        self.log_every = float(log_every)
        self.delay = (_AUTO_DELAY if enabled == "auto" else 0.0) if delay is None else delay
        self.estimate_after = max(1, int(estimate_after))
        self.desc = desc
        self.runs: list[SSCRunSummary] = []
        self.schedule = False
        self._bar = None
        self._open = False

    def __repr__(self) -> str:
        # stable (no id): callers key caches on the options of an SSC call
        return (
            f"SSCProgress(enabled={self.enabled!r}, time_budget={self.time_budget!r}, "
            f"desc={self.desc!r})"
        )

    # ---- what the solvers call -----------------------------------------------------------
    def begin(self, *, max_iter: int, eps: float, tokens: int | None = None, blocks: int = 1,
              schedule: bool = False):  # fmt: skip
        """Start one run (resets the clock and the per-run state). ``schedule``: the run
        has a fixed number of iterations (``max_iter``) and no stopping test."""
        self.max_iter, self.eps, self.tokens = int(max_iter), float(eps), tokens
        self.schedule = bool(schedule)
        self.blocks, self.block = max(1, int(blocks)), 0
        self.t0 = time.perf_counter()
        self._t_block = self.t0
        self._block_seconds: list[float] = []
        self._it = 0  # iteration within the block
        self._done = 0  # iterations over all blocks
        self._log_r: list[float] = []
        self._residual = self._best_residual = math.inf
        self._pending: list = []  # residuals still on the device (a lazy step's), in order
        self.stopped_by_budget = False
        self.estimate: str | None = None
        self._t_first: float | None = None  # the first iteration's time, and the estimate's
        self._t_est: float | None = None
        self._last_log = self.t0
        self._last_post = 0.0
        self._shown = False
        self._bar = None
        self._open = True
        return self

    def update(self, iteration: int, residual: float) -> bool:
        """Record iteration ``iteration`` (1-based within the block) and its residual;
        returns True when the time budget says stop."""
        if not self._open:  # a solver that did not call begin(): start with what we know
            self.begin(max_iter=max(iteration, 1), eps=0.0)
        now = time.perf_counter()
        if iteration < self._it:  # a solver that does not call next_block()
            self._settle()
            self._log_r = []
        self._done += max(0, iteration - self._it)
        self._it = iteration
        # a device scalar (a lazy step's residual) is read only when something shows or
        # needs it, so that the solver's iterations do not wait for the device here
        self._pending.append(residual)
        if isinstance(residual, numbers.Real):
            self._settle()
        if self._t_first is None:
            self._t_first = now
        elif self._t_est is None and self._done >= self.estimate_after:
            self._t_est = now
            self.estimate = self._estimate_text(now)
        if self.enabled is not False:
            self._report(now)
        if self.time_budget is not None:
            allowed = self.time_budget * (self.block + 1) / self.blocks
            if now - self.t0 >= allowed:
                self.stopped_by_budget = True
                return True
        return False

    __call__ = update  # the ``callback(iteration, residual) -> stop`` form

    def _settle(self) -> None:
        """Read the residuals still on the device (one synchronisation for all of them)."""
        pending = self._pending
        if len(pending) > 1 and all(isinstance(r, torch.Tensor) for r in pending):
            pending = torch.stack([r.reshape(()) for r in pending]).tolist()  # one read
        for residual in pending:
            r = float(residual)
            self._residual = r
            self._best_residual = min(self._best_residual, r)
            self._log_r.append(math.log(r) if r > 0 else -math.inf)
        self._pending = []

    @property
    def residual(self) -> float:
        """The last residual."""
        self._settle()
        return self._residual

    @property
    def best_residual(self) -> float:
        """The smallest residual of the run so far."""
        self._settle()
        return self._best_residual

    def next_block(self) -> None:
        """The current column block finished; the next one starts at iteration 1."""
        self._settle()
        now = time.perf_counter()
        self._block_seconds.append(now - self._t_block)
        self._t_block = now
        self.block += 1
        self._it = 0
        self._log_r = []

    def close(self, converged: bool | None = None, iterations: int | None = None,
              residual: float | None = None, *,
              error: BaseException | None = None) -> SSCRunSummary | None:  # fmt: skip
        """End the run: close the bar, log the outcome, keep its summary in ``runs``.
        ``error``: the exception that ended it (KeyboardInterrupt included), which the
        summary names with the iteration and residual reached."""
        if not self._open:
            return None
        self._open = False
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        stopped_by = None
        if error is not None:
            converged, iterations, residual = False, None, None
            self.stopped_by_budget = False
            stopped_by = (
                "interrupted" if isinstance(error, KeyboardInterrupt)
                else f"{type(error).__name__}: {(str(error).splitlines() or [''])[0]}"
            )  # fmt: skip
        if converged is None:
            converged = self.residual < self.eps
        # a run that met eps on the iteration its budget ran out converged all the same
        self.stopped_by_budget = self.stopped_by_budget and not converged
        summary = SSCRunSummary(
            converged=bool(converged),
            iterations=int(self._it if iterations is None else iterations),
            residual=float(self.residual if residual is None else residual),
            best_residual=float(self.best_residual),
            eps=self.eps,
            max_iter=self.max_iter,
            seconds=time.perf_counter() - self.t0,
            stopped_by_budget=self.stopped_by_budget,
            tokens=self.tokens,
            stopped_by=stopped_by,
            fixed_schedule=self.schedule,
        )
        self.runs.append(summary)
        if self._shown:  # the user saw the bar or the log lines: say how it ended
            level = logging.INFO if summary.converged else logging.WARNING
            self._emit(summary.message(), level=level)
        return summary

    # ---- estimates -----------------------------------------------------------------------
    def seconds_per_iteration(self, now: float | None = None) -> float | None:
        """Mean seconds per iteration since the first one (None before the second)."""
        if self._t_first is None or self._done < 2:
            return None
        now = time.perf_counter() if now is None else now
        return (now - self._t_first) / (self._done - 1)

    def projected_iterations(self) -> int | None:
        """Iterations of the current block projected to reach ``eps`` (capped at
        ``max_iter``), from a line fitted to ``log(residual)`` over the last half of the
        iterations; None while the residual does not fall. A fixed schedule runs to
        ``max_iter``."""
        if self.schedule:
            return self.max_iter
        if self.residual < self.eps:
            return self._it
        pts = [v for v in self._log_r[len(self._log_r) // 2 :] if math.isfinite(v)]
        if len(self._log_r) < 2 * _FIT_MIN_POINTS or len(pts) < _FIT_MIN_POINTS or self.eps <= 0:
            return None
        m = len(pts)
        xm = (m - 1) / 2.0
        ym = sum(pts) / m
        sxx = sum((i - xm) ** 2 for i in range(m))
        slope = sum((i - xm) * (v - ym) for i, v in enumerate(pts)) / sxx
        if not slope < 0:
            return None
        left = (math.log(self.eps) - pts[-1]) / slope
        return int(min(self.max_iter, self._it + max(0.0, math.ceil(left))))

    def eta_seconds(self, now: float | None = None) -> tuple[float | None, float | None]:
        """``(projected, at_limit)``: seconds left to the projected convergence and to the
        iteration limit (of every block left), None when unknown."""
        spi = self.seconds_per_iteration(now)
        if spi is None:
            return None, None
        blocks_left = self.blocks - self.block - 1
        proj = self.projected_iterations()
        at_limit = (self.max_iter - self._it + blocks_left * self.max_iter) * spi
        if proj is None:
            return None, at_limit
        if blocks_left and self._block_seconds:
            per_block = sum(self._block_seconds) / len(self._block_seconds)
        else:
            per_block = proj * spi
        return (proj - self._it) * spi + blocks_left * per_block, at_limit

    def _estimate_text(self, now: float) -> str:
        spi = self.seconds_per_iteration(now)
        n = "" if self.tokens is None else f"{self.tokens} tokens, "
        blocks = f" in each of {self.blocks} column blocks" if self.blocks > 1 else ""
        text = (
            f"SSC cost estimate: {n}{format_seconds(spi)}/iteration measured over the first "
            f"{self._done} iterations; "
        )
        total = format_seconds(spi * self.max_iter * self.blocks)
        if self.schedule:
            text += f"its fixed schedule of {self.max_iter} iterations takes about {total}"
        else:  # no projection yet: the first iterations fall much faster than the later ones
            text += (
                f"the iteration limit ({self.max_iter}{blocks}) would take at most {total}; "
                "the ETA from the residual's trend follows in the progress"
            )
        if self.time_budget is not None:
            text += f"; time budget {format_seconds(self.time_budget)}"
        return text

    # ---- output --------------------------------------------------------------------------
    def _out(self):
        return self.stream if self.stream is not None else sys.stderr

    def _terminal(self) -> bool:
        try:
            return bool(self._out().isatty())
        except (AttributeError, ValueError):
            return False

    def _emit(self, text: str, level: int = logging.INFO) -> None:
        if self._terminal():
            from tqdm.auto import tqdm

            tqdm.write(text, file=self._out())
        else:
            _log(level, text)

    def _status(self, now: float) -> str:
        proj, at_limit = self.eta_seconds(now)
        it = f"{self._it}/{self.max_iter}"
        if self.blocks > 1:
            it = f"block {self.block + 1}/{self.blocks} it {it}"
        if self._done < 2:
            eta = "measuring"
        elif proj is None:
            eta = f"ETA at most {format_seconds(at_limit)} (residual not falling yet)"
        elif self.projected_iterations() >= self.max_iter and self.residual >= self.eps:
            eta = f"iteration limit in ~{format_seconds(proj)}, before reaching eps"
        else:
            eta = f"ETA ~{format_seconds(proj)}"
        if self.time_budget is not None:
            eta += f", budget {format_seconds(max(0.0, self.time_budget - (now - self.t0)))} left"
        return f"{it}, residual {self.residual:.2e} (eps {self.eps:.1e}), {eta}"

    def _report(self, now: float) -> None:
        if now - self.t0 < self.delay:
            return
        first, self._shown = not self._shown, True  # the estimate: on first show, or when made
        if self.estimate is not None and (first or self._t_est == now):
            self._emit(self.estimate)
        if self._terminal():
            if self._bar is None:
                from tqdm.auto import tqdm

                self._bar = tqdm(
                    total=self.max_iter * self.blocks, desc=self.desc, unit="it", leave=False,
                    file=self._out(),
                    bar_format="{desc} |{bar:16}| {elapsed}",
                )  # fmt: skip
            if now - self._last_post >= 0.2 or self._it == 1:  # and when a block starts
                self._last_post = now
                self._bar.n = self.block * self.max_iter + self._it
                self._bar.set_description_str(f"{self.desc} {self._status(now)}", refresh=False)
                self._bar.refresh()
        elif now - self._last_log >= self.log_every or self._last_log == self.t0:
            self._last_log = now
            _log(logging.INFO, "%s: %s", self.desc, self._status(now))


def as_reporter(progress, *, max_iter: int, eps: float, tokens: int | None = None,
                blocks: int = 1, schedule: bool = False) -> SSCProgress:  # fmt: skip
    """The reporter of one run for the ``progress=`` option of the SSC entry points
    (False, True, None/"auto" or an :class:`SSCProgress`), begun."""
    if isinstance(progress, SSCProgress):
        reporter = progress
    elif progress is None or progress == "auto":
        reporter = SSCProgress(enabled="auto")
    elif progress is True or progress is False:
        reporter = SSCProgress(enabled=progress)
    else:
        raise ValueError(
            f"progress: expected True, False, None, 'auto' or an SSCProgress, got {progress!r}"
        )
    return reporter.begin(
        max_iter=max_iter, eps=eps, tokens=tokens, blocks=blocks, schedule=schedule
    )
