"""The side worker's queue (:class:`WorkerQueue`): the requests submitted for scoring ahead of
their steps, their jobs (one per score key, however many requests share it), and the side
threads that run them: least counted work first (:func:`counted_work`), taking turns
(:class:`Turns`), at the operator's niceness. What a job computes is the side worker's
(:class:`.ahead.Ahead`); this module only queues, runs, hands out and forgets jobs.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from videoanchor.anchor.progress import SSCProgress
from videoanchor.integrations.vllm.scoring import Failure

logger = logging.getLogger("videoanchor.vllm")

__all__ = ["KEEP_UNTAKEN", "Turns", "WorkerQueue", "counted_work"]

#: Results kept for requests that were scored ahead but never took them (served from the
#: prefix cache past their visual tokens, or finished early), oldest dropped first.
KEEP_UNTAKEN = 256


def counted_work(n: int, d: int, cfg) -> int:
    """A request's SSC work in counted units, known before it runs: ``n^2 (n + d)`` per
    iteration (the dense products over ``n`` tokens of width ``d``) times the iterations its
    solver may run (the fast solver's fixed 60; otherwise, ``ssc_mode="blocked"`` included,
    ``max_iter``). What orders the side threads' jobs (:class:`Turns`); deterministic, never
    a timing. Under ``"auto"`` on the CPU the working sets run, whose cost is not this count,
    but it grows with ``n`` and ``d`` as theirs does, and only the order of the counts is
    used."""
    fast = cfg.ssc_solver in ("auto", "fast") and getattr(cfg, "ssc_mode", "auto") != "blocked"
    iters = 60 if fast else cfg.max_iter
    return n * n * (n + d) * iters


class Turns:
    """Fair interleaving of the side threads' SSC jobs: of the jobs that have started, the
    one with the least counted work (:func:`counted_work`; ties: the earlier) computes, and
    the others wait at their next iteration (:class:`_Yielding`). A new video's SSC thus
    never waits for a longer job to end, and the jobs never share the cores, so none of
    them runs slower than alone beyond the waiting. The iterates do not depend on the
    waiting: the scores are the same as without it."""

    def __init__(self):
        self._cond = threading.Condition()
        self._active: dict[int, tuple[int, int]] = {}
        self._seq = itertools.count()

    def enter(self, work: int) -> int:
        """A job of ``work`` counted units starts; returns its token."""
        token = next(self._seq)
        with self._cond:
            self._active[token] = (work, token)
        return token

    def leave(self, token: int) -> None:
        """The job of ``token`` ended: the next one with the least work computes."""
        with self._cond:
            self._active.pop(token, None)
            self._cond.notify_all()

    def wait_turn(self, token: int) -> None:
        """Block until ``token``'s job has the least work of those started."""
        with self._cond:
            while self._active.get(token, (0, 0)) != min(self._active.values(), default=(0, 0)):
                self._cond.wait(0.5)


class _Yielding(SSCProgress):
    """A silent progress reporter that makes its job wait for its turn (:class:`Turns`)
    before each iteration; a solver without iterations (the working sets) waits before
    each of its solves (``schedules_only``: it neither reports nor stops, so
    ``solver="auto"`` need not keep an iteration for it)."""

    schedules_only = True

    def __init__(self, turns: Turns, token: int):
        super().__init__(enabled=False)
        self._turns, self._token = turns, token

    def wait(self) -> None:
        self._turns.wait_turn(self._token)

    def update(self, iteration, residual) -> bool:
        self._turns.wait_turn(self._token)
        return super().update(iteration, residual)


class WorkerQueue:
    """One side worker's jobs and threads. ``nice``: the side threads' niceness on Linux
    (0-19; their OpenMP threads inherit it); ``workers``: side threads, whose jobs start
    least counted work first and take turns (:class:`Turns`); ``stream``: the CUDA stream
    the side threads run on (None: the CPU, or the current stream); ``forgotten``: called
    with a request's id when its entry is dropped (:meth:`forget`, or beyond
    :data:`KEEP_UNTAKEN`), under :attr:`lock`.

    :attr:`jobs` maps a score key to its job, a future whose result is the scores, a
    :class:`.scoring.Failure` or None (the step scores the request); :attr:`by_req` maps a
    request to its key (None: no job), oldest first; :attr:`relayed` holds the keys whose
    job runs on another rank (:meth:`expect`, :meth:`arrived`). Split jobs
    (:meth:`start_split`) run on one thread of their own, in submission order, and are
    never cancelled: every rank runs them together."""

    def __init__(self, nice: int, workers: int, stream=None,
                 forgotten: Callable[[str], None] | None = None):  # fmt: skip
        self.nice = int(nice)
        self.stream = stream
        self._forgotten = forgotten
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="videoanchor-ssc",
                                        initializer=self._init_thread)  # fmt: skip
        # split jobs run collectives: one thread, in submission order on every rank
        self._split_pool = ThreadPoolExecutor(1, thread_name_prefix="videoanchor-ssc-split",
                                              initializer=self._init_thread)  # fmt: skip
        self._queue: list = []  # heap of (work, seq, future, function, its arguments)
        self._seq = itertools.count()
        self.turns = Turns()
        self.lock = threading.RLock()
        self._done = threading.Condition(self.lock)
        self.jobs: dict[str, Future] = {}  # score key -> its job (result: scores or None)
        self.by_req: OrderedDict[str, str | None] = OrderedDict()  # req_id -> key (None: no job)
        self.relayed: set[str] = set()  # keys whose job runs on another rank
        self._split_jobs: set[Future] = set()  # jobs every rank runs together (never cancelled)

    def _init_thread(self) -> None:
        # Not torch.set_num_threads: it also sets MKL's process-wide count, and a side thread
        # with fewer threads slowed the steps' GEMMs more than one with the default count.
        # Niceness is per thread on Linux; measured on 2 cores, a main loop of 800 x 800
        # GEMMs ran 1.1x slower beside a side thread at nice 19 (2.2x at nice 0).
        if self.nice and hasattr(os, "setpriority"):
            try:
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), self.nice)
            except OSError as err:
                logger.debug("videoanchor: side thread niceness not set: %s", err)
        if self.stream is not None:
            torch.cuda.set_stream(self.stream)
        # the engine's main thread may trace (torch.compile) while this thread scores: its
        # TF32 setting is part of the global state Dynamo checks, so it is left alone here
        from videoanchor.anchor.products import keep_cuda_setting_in_this_thread

        keep_cuda_setting_in_this_thread()

    # --- submitting ---------------------------------------------------------------------

    def note(self, req_id: str, key: str | None) -> bool:
        """Request ``req_id`` was submitted with score key ``key`` (None: it is not scored
        ahead); returns whether ``key`` still needs a job (none runs or ran for it)."""
        with self.lock:
            self.by_req[req_id] = key
            self._trim()
            return key is not None and key not in self.jobs

    def start(self, key: str, work: int, fn, args: tuple) -> Future:
        """``fn(*args, progress=...)`` as ``key``'s job on the side threads; queued jobs start
        least ``work`` first, and a started job takes turns with the others through its
        ``progress`` (:class:`Turns`)."""
        job = Future()
        with self.lock:
            heapq.heappush(self._queue, (work, next(self._seq), job, fn, args))
            self.jobs[key] = job
        self._pool.submit(self._run_next)
        return job

    def _run_next(self) -> None:
        with self.lock:
            if not self._queue:
                return
            work, _, job, fn, args = heapq.heappop(self._queue)
        if not job.set_running_or_notify_cancel():
            return
        token = self.turns.enter(work)
        try:
            job.set_result(fn(*args, progress=_Yielding(self.turns, token)))
        except BaseException as err:  # the job reports its own errors; this is a last resort
            job.set_exception(err)
        finally:
            self.turns.leave(token)

    def start_split(self, key: str, fn, *args) -> Future:
        """``fn(*args)`` as ``key``'s job on the split thread (in submission order, never
        cancelled: every rank runs it)."""
        with self.lock:
            self.jobs[key] = job = self._split_pool.submit(fn, *args)
            self._split_jobs.add(job)
            job.add_done_callback(self._split_jobs.discard)
        return job

    def finished(self, key: str, result) -> None:
        """``key``'s job, done already with ``result`` (scores found in the cache)."""
        with self.lock:
            self.jobs[key] = done = Future()
            done.set_result(result)

    def expect(self, key: str, failed: bool = False) -> None:
        """``key``'s job runs on another rank: its result comes with :meth:`arrived`. With
        ``failed`` (this rank could not encode the items) it is done already with None: the
        step scores the request."""
        with self.lock:
            self.jobs[key] = job = Future()
            self.relayed.add(key)
            if failed:
                job.set_result(None)

    def arrived(self, results: dict) -> int:
        """Results of jobs that ran on other ranks (``{key: scores or None}``): each ends
        its job here if it is still waiting. Returns how many were expected here."""
        n = 0
        with self._done:
            for key, visual in results.items():
                if key in self.relayed:
                    self.relayed.discard(key)
                    n += 1
                    job = self.jobs.get(key)
                    if job is not None and not job.done():
                        job.set_result(visual)
            self._done.notify_all()
        return n

    def has_job(self, key: str) -> bool:
        """Whether a request still wants ``key``'s job."""
        with self.lock:
            return self.jobs.get(key) is not None

    def notify(self) -> None:
        """A job ended: wake :meth:`wait`."""
        with self._done:
            self._done.notify_all()

    # --- handing out ----------------------------------------------------------------------

    def failures(self, req_ids) -> dict[str, str]:
        """``{req_id: why}`` for those of ``req_ids`` whose job failed."""
        with self.lock:
            out = {}
            for r in req_ids:
                job = self.jobs.get(self.by_req.get(r)) if self.by_req.get(r) else None
                if job is not None and job.done() and not job.cancelled():
                    result = job.result()
                    if isinstance(result, Failure):
                        out[r] = result.message
            return out

    def ready(self, req_ids) -> list[str]:
        """Those of ``req_ids`` whose scores need no more work ahead of their step."""
        with self.lock:
            return [r for r in req_ids if self._ready(r)]

    def _ready(self, req_id: str) -> bool:
        key = self.by_req.get(req_id)
        job = self.jobs.get(key) if key is not None else None
        return job is None or job.done()

    def wait(self, req_ids, timeout: float) -> None:
        """Block until one of ``req_ids`` is ready, or ``timeout`` seconds."""
        with self._done:
            if not any(self._ready(r) for r in req_ids):
                self._done.wait(timeout)

    def take(self, req_id: str, key: str):
        """The result of ``req_id``'s job under ``key`` (waiting for it if it is still
        running), or None (no job, another key, or another rank's result that has not
        arrived); the request's entry is dropped."""
        with self.lock:
            if req_id not in self.by_req:
                return None
            if self.by_req[req_id] != key:
                self._release(req_id)
                return None
            job = self.jobs.get(key)
            if key in self.relayed and job is not None and not job.done():
                # another rank's scores have not arrived (the request was not held): the
                # step scores it here rather than wait
                self._release(req_id)
                return None
        visual = job.result() if job is not None else None
        with self.lock:
            self._release(req_id)
        return visual

    # --- forgetting -----------------------------------------------------------------------

    def forget(self, req_ids) -> None:
        """Drop the entries of requests that finished (aborted while held, or done)."""
        with self.lock:
            for r in req_ids:
                self._release(r)
                if self._forgotten is not None:
                    self._forgotten(r)

    def _trim(self) -> None:
        while len(self.by_req) > KEEP_UNTAKEN:
            rid = next(iter(self.by_req))  # the oldest; _release drops it and its job
            self._release(rid)
            if self._forgotten is not None:
                self._forgotten(rid)

    def _release(self, req_id: str) -> None:
        key = self.by_req.pop(req_id, None)
        if key is not None and key not in self.by_req.values():
            job = self.jobs.pop(key, None)
            self.relayed.discard(key)
            if job is not None and job not in self._split_jobs:
                job.cancel()  # a split job runs anyway: every rank runs it (the split vote)

    def close(self) -> None:
        """Stop the side threads (jobs not started are cancelled, unless split jobs are
        queued: the other ranks run those, and wait for this one in them)."""
        with self.lock:
            queued, self._queue = self._queue, []
        for _, _, job, _, _ in queued:
            job.cancel()
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._split_pool.shutdown(wait=False, cancel_futures=not self._split_jobs)
