"""The engine core's side of the scores computed ahead (:mod:`.ahead`): the requests it holds
out of the batch while their scores are computed (:class:`Holds`, kept on its scheduler),
the scheduler's ``schedule`` and ``update_from_output`` wrapped to hide them and to finish
those whose scoring failed, and the executor's warm-up (:func:`install`).

The workers' side, their side worker (:class:`.ahead.Ahead`) and the ``collective_rpc``
targets this side calls (:func:`.ahead.submit`, :func:`.ahead.poll`), is in :mod:`.ahead`,
with the whole mechanism described.
"""

from __future__ import annotations

import logging
import time
import weakref
from collections import deque
from concurrent.futures import Future

from videoanchor.integrations.vllm import metrics, state
from videoanchor.integrations.vllm.ahead import poll, submit
from videoanchor.integrations.vllm.config import engine_config
from videoanchor.integrations.vllm.patching import wrap_once
from videoanchor.integrations.vllm.scoring import warm_up

logger = logging.getLogger("videoanchor.vllm")

__all__ = [
    "IDLE_WAIT",
    "Holds",
    "attach",
    "holds_of",
    "install",
    "schedule_holding",
    "update_failing",
]

#: Seconds the engine core waits for a score when every request it could schedule is held.
IDLE_WAIT = 0.02


class Holds:
    """The requests one engine core holds out of the batch while their scores are computed
    ahead (kept on its scheduler). ``core``: the ``EngineCore`` (its ``model_executor``).

    The calls to the workers do not wait for them: a multiprocess executor answers calls in
    order, so waiting on one would also wait for the step in flight (asynchronous
    scheduling). A poll's answer is read at a later ``schedule()`` call, once the engine
    core has read the step results queued before it. Only when every request it could
    schedule is held does the engine core wait, for up to :data:`IDLE_WAIT` seconds."""

    def __init__(self, core):
        self._core = weakref.ref(core)
        self.new: deque = deque()  # noted at admission (the input thread), not yet submitted
        self.held: dict[str, object] = {}  # req_id -> Request
        self._gone: list[str] = []  # requests finished while held, not yet told to workers
        self._calls: list[Future] = []  # submissions in flight (their errors are raised)
        self._poll: Future | None = None
        self._polled: list[str] = []
        self._relay: dict = {}  # scores a rank computed, for the others (tensor parallel)
        self.waited = 0.0  # seconds the engine core spent waiting with only held requests
        self.failed: dict[str, str] = {}  # req_id -> why its scoring failed (to finish)

    def note(self, request) -> None:
        """An admitted anchored request with multimodal items (any thread)."""
        self.new.append(request)

    def hidden(self, sched) -> list:
        """Called at the start of ``sched.schedule()``: submits new requests, reads the
        workers' answers, and returns the waiting requests to hide from this call."""
        core = self._core()
        if core is None:
            return []
        executor = core.model_executor
        fresh, later = [], []
        while self.new:
            req = self.new.popleft()
            if sched.requests.get(req.request_id) is not req:
                if not req.is_finished():
                    later.append(req)  # admitted by the input thread, not added yet
                continue
            if req.num_computed_tokens == 0 and not req.is_finished():
                fresh.append(req)
        self.new.extendleft(reversed(later))
        for call in [c for c in self._calls if c.done()]:
            self._calls.remove(call)
            call.result()  # a worker's error surfaces here
        if fresh:
            payloads = [(r.request_id, r.mm_features, r.sampling_params.extra_args)
                        for r in fresh]  # fmt: skip
            self._calls.append(executor.collective_rpc(submit, args=(payloads,), non_block=True))
            metrics.count("videoanchor_requests_held", len(fresh))
            for r in fresh:
                self.held[r.request_id] = r
        for rid, r in list(self.held.items()):
            if sched.requests.get(rid) is not r or r.is_finished():
                del self.held[rid]
                self._gone.append(rid)
        if self._poll is not None and self._poll.done():
            self._answer(self._poll.result())
        if not self.held:  # (a failed request stays hidden until update_failing ends it)
            return [r for r in sched.waiting if r.request_id in self.failed]
        if self._poll is None:
            ids, gone, relay = list(self.held), self._gone, self._relay
            self._gone, self._polled, self._relay = [], ids, {}
            idle = not sched.running and all(r.request_id in self.held for r in sched.waiting)
            if idle:
                t0 = time.perf_counter()
                self._answer(executor.collective_rpc(poll, args=(ids, gone, IDLE_WAIT, relay)))
                self.waited += time.perf_counter() - t0
            else:
                self._poll = executor.collective_rpc(poll, args=(ids, gone, 0.0, relay),
                                                     non_block=True)  # fmt: skip
                if self._poll.done():  # an in-process executor answers at once
                    self._answer(self._poll.result())
        return [
            r for r in sched.waiting if r.request_id in self.held or r.request_id in self.failed
        ]

    def _answer(self, replies) -> None:
        """Release the held requests every worker says are ready."""
        self._poll = None
        ready = set(self._polled)
        failed: dict[str, str] = {}
        for ids, results, failures in replies:
            ready &= set(ids)
            self._relay.update(results)
            failed.update(failures)
        for rid in ready:
            self.held.pop(rid, None)
        for rid, why in failed.items():  # finished with an error (update_failing)
            self.held.pop(rid, None)
            self.failed[rid] = why


def holds_of(sched) -> Holds | None:
    """The :class:`Holds` of a scheduler (None where scores are not computed ahead)."""
    return sched.__dict__.get("_videoanchor_holds")


def attach(core) -> Holds:
    """The :class:`Holds` of an ``EngineCore``, made on first use."""
    holds = holds_of(core.scheduler)
    if holds is None:
        holds = core.scheduler.__dict__["_videoanchor_holds"] = Holds(core)
    return holds


def schedule_holding(sched, orig, *args, **kwargs):
    """``orig(sched, ...)`` (vLLM's ``Scheduler.schedule``) with the held requests out of
    ``sched.waiting`` for the call, then back where they were: arrival order among the
    waiting requests that arrived before the last of them (a request released earlier but
    not scheduled yet keeps its place ahead of a later one still held)."""
    holds = holds_of(sched)
    hide = holds.hidden(sched) if holds is not None else []
    if not hide:
        return orig(sched, *args, **kwargs)
    sched.waiting.remove_requests(hide)
    try:
        return orig(sched, *args, **kwargs)
    finally:
        latest = max(r.arrival_time for r in hide)
        ahead_of = [r for r in sched.waiting if r.arrival_time <= latest]
        if ahead_of:
            sched.waiting.remove_requests(ahead_of)
        block = sorted([*hide, *ahead_of], key=lambda r: r.arrival_time)
        sched.waiting.prepend_requests(block)


def update_failing(sched, orig, scheduler_output, model_runner_output):
    """``orig(sched, ...)`` (vLLM's ``Scheduler.update_from_output``) after finishing the
    requests whose scoring failed with vLLM's ``FINISHED_ERROR`` (so the step's token for
    such a request is dropped), then their error outputs added to the step's: each fails
    alone (the OpenAI server answers it with an error), the engine and the other requests go
    on. The failures come from the workers' polls (:class:`Holds`) and from the steps:
    the worker puts its step's failures (:data:`.state.FAILED`) on the step's output
    (:func:`.runner.install`), which reaches the scheduler in any process layout."""
    holds = holds_of(sched)
    failed = dict(holds.failed) if holds is not None else {}
    if holds is not None:
        holds.failed.clear()
    from_step = model_runner_output.__dict__.pop(state.FAILED_ATTR, None)  # (a copy per step)
    failed.update({r: why for r, why in (from_step or {}).items() if r in sched.requests})
    if not failed:
        return orig(sched, scheduler_output, model_runner_output)
    from vllm.v1.engine import EngineCoreOutput, EngineCoreOutputs
    from vllm.v1.request import RequestStatus

    done = sched.finish_requests(list(failed), RequestStatus.FINISHED_ERROR)
    outputs = orig(sched, scheduler_output, model_runner_output)
    for req in done:
        logger.error("videoanchor: request %s finished with an error: %s", req.request_id,
                     failed[req.request_id])  # fmt: skip
        out = EngineCoreOutput(request_id=req.request_id, new_token_ids=[],
                               finish_reason=req.get_finished_reason(),
                               events=req.take_events(), trace_headers=req.trace_headers)  # fmt: skip
        eco = outputs.get(req.client_index)
        if eco is None:
            eco = outputs[req.client_index] = EngineCoreOutputs()
        eco.outputs.append(out)
    return outputs


def install() -> None:
    """Wraps ``Scheduler.schedule`` and ``Scheduler.update_from_output`` (once per process;
    no-ops for a scheduler without :class:`Holds` and without failed requests), and
    ``Executor.compile_or_warm_up_model`` (an anchored engine's workers then run
    :func:`.scoring.warm_up`)."""
    from vllm.v1.core.sched.scheduler import Scheduler

    def make(orig):
        def schedule(self, *args, **kwargs):
            return schedule_holding(self, orig, *args, **kwargs)

        return schedule

    wrap_once(Scheduler, "schedule", make)

    def make_update(orig):
        def update_from_output(self, scheduler_output, model_runner_output):
            return update_failing(self, orig, scheduler_output, model_runner_output)

        return update_from_output

    wrap_once(Scheduler, "update_from_output", make_update)

    # an anchored engine's workers warm the SSC up at start-up (scoring.warm_up), after vLLM's
    # own warm-up: the one executor method every layout's start runs, in the engine core
    from vllm.v1.executor.abstract import Executor

    def make_warm(orig):
        def compile_or_warm_up_model(self, *args, **kwargs):
            out = orig(self, *args, **kwargs)
            if engine_config(self.vllm_config.additional_config) is not None:
                self.collective_rpc(warm_up)
            return out

        return compile_or_warm_up_model

    wrap_once(Executor, "compile_or_warm_up_model", make_warm)
