"""Scores ahead of the step: a request's SSC runs beside the engine's steps, not inside one.

An anchored request's visual tokens cannot be prefilled before its scores exist, and its SSC
(with the encoder run it needs) takes far longer than one decode step. Run inside the step
(``scores_ahead: false``), it stalls every other request of the batch for that long. With
``scores_ahead`` (the default) instead:

1. **Engine core, admission** (``EngineCore.preprocess_add_request``, any process layout): an
   anchored request with scored multimodal items is noted (:meth:`Holds.note`).
2. **Engine core, each** ``Scheduler.schedule`` **call**: noted requests are sent to every
   worker (``collective_rpc`` :func:`submit`). A worker encodes their items there, in its
   main thread between steps, with the model's own ``embed_multimodal`` (under tensor
   parallelism the encoder's collectives then come in the same order on every rank), and
   runs their joint SSC on a side thread (niced on Linux; a side CUDA stream on a GPU), on
   one rank only under tensor parallelism: the engine core relays its scores to the other
   ranks with its next poll (:func:`poll`). The scores go into the engine's score cache.
   While a request's scores are not ready on every worker it is taken out of the waiting
   queue for that ``schedule`` call and put back at its front after it, so the scheduler
   schedules everyone else as if it were not there (:meth:`Holds.hidden`). When all that is
   left is held requests, the engine core waits on the workers for up to :data:`IDLE_WAIT`
   seconds instead of spinning.
3. **Worker, the step that first reaches its visual tokens**: :func:`.runner._score` takes
   the scores computed ahead (:meth:`Ahead.take`): no SSC, and no encoder run for it, in
   the step. A request
   that reaches its step before its job ended (it was not held: preempted, or another
   scheduler) waits for the job there: the result is the same either way.

The scores are those the step would have computed: the same features (the same encoder on
the same inputs), the same :func:`.scoring.run_ssc`, the same options. A job that fails
leaves the request to the step, which computes its scores there and fails the same way.

Only public parts of vLLM's scheduler are used for the hold (``schedule()`` and the waiting
queue's ``remove_requests`` / ``prepend_requests``); docs/serving.md says why this mechanism
was chosen over the KV-connector and encoder-cache-connector paths.
"""

from __future__ import annotations

import hashlib
import heapq
import itertools
import logging
import os
import threading
import time
import weakref
from collections import OrderedDict, deque
from concurrent.futures import Future, ThreadPoolExecutor
from types import SimpleNamespace

import torch

from videoanchor.anchor.progress import SSCProgress
from videoanchor.integrations.vllm import metrics, state
from videoanchor.integrations.vllm.config import engine_config
from videoanchor.integrations.vllm.patching import wrap_once
from videoanchor.integrations.vllm.scoring import (
    Failure,
    check_outputs,
    engine_cfg_of,
    plan,
    projector_only,
    run_ssc,
    score_cache,
    warm_up,
)

logger = logging.getLogger("videoanchor.vllm")

__all__ = [
    "AHEAD",
    "IDLE_WAIT",
    "Ahead",
    "Holds",
    "Turns",
    "close_side_worker",
    "poll",
    "set_side_worker",
    "side_worker",
    "submit",
]

#: Seconds the engine core waits for a score when every request it could schedule is held.
IDLE_WAIT = 0.02
#: Results kept for requests that were scored ahead but never took them (served from the
#: prefix cache past their visual tokens, or finished early), oldest dropped first.
KEEP_UNTAKEN = 256

#: Bytes of encoder outputs kept from the encoding ahead for the request's own prefill step
#: (per worker process); beyond it the step encodes its items again.
KEEP_ENCODED_BYTES = 1 << 30

#: owner (the model runner's id) -> its engine's :class:`Ahead` (worker side), made at the
#: first call for that runner; one made by hand and set beforehand (:func:`set_side_worker`:
#: other constructor arguments, as tests without vLLM pass) is used as it is. Read it with
#: :func:`side_worker`.
AHEAD: dict[int, Ahead] = {}


# --- worker side ----------------------------------------------------------------------------


def communication_failed(err: BaseException) -> bool:
    """Whether ``err`` is a failure of a collective itself (a peer gone, a timeout), after
    which the ranks' collectives may be out of step: torch's ``DistError``, or gloo's own
    errors, which reach Python as a plain ``RuntimeError`` ("[.../gloo/transport/tcp/
    pair.cc] Connection closed by peer"). The solver's own errors (bad input, memory, a
    non-finite residual, a failed factorisation) reach every rank together and are not."""
    import torch.distributed as dist

    return isinstance(err, dist.DistError) or (
        isinstance(err, RuntimeError) and "gloo" in str(err).lower()
    )


def job_tag(key) -> int:
    """A 20-bit tag of a score key, the same in every process (not ``hash()``, which Python
    salts per process): what the split vote compares across ranks."""
    digest = hashlib.blake2b(repr(key).encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little") & 0xFFFFF


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


class Ahead:
    """One engine's side worker in one worker process: :meth:`submit` encodes a held
    request's items (in the worker's main thread) and a single side thread runs its SSC;
    :meth:`take` hands the scores to the step.

    ``runner``: the model runner (its ``model``, ``device``, ``vllm_config``); ``nice``: the
    side threads' niceness on Linux (0-19; their OpenMP threads inherit it), so that on the
    CPU the running requests' steps come first and the SSC takes the cores' idle time;
    ``workers``: side threads; their jobs start least counted work first and take turns
    (:class:`Turns`), so a new video is not queued behind a long job.

    Injected parts (defaults: the engine's own): ``encoder``, a function ``(runner,
    features) -> EncoderOutputs`` (:data:`.scoring.EncoderOutputs`; default the model's own
    encoder through vLLM's batching, :meth:`model_encoder`); ``rank_world``, this worker's
    tensor-parallel (rank, size) (default vLLM's group, (0, 1) outside one);
    ``split_group``, the process group that split jobs run over (default a gloo group of
    vLLM's tensor-parallel ranks, made at the first split job: :meth:`_split_group`). Attribute
    ``keep_encoded_bytes``: the bytes of encoder outputs kept for the requests' own prefill
    steps (default :data:`KEEP_ENCODED_BYTES`; beyond it a step encodes its items again).
    One made by hand is used once set as its runner's side worker (:func:`set_side_worker`).
    """

    def __init__(self, runner, nice: int, split: bool = False, workers: int = 2, *,
                 encoder=None, rank_world: tuple[int, int] | None = None,
                 split_group=None):  # fmt: skip
        self.owner = id(runner)
        self._runner = weakref.ref(runner)
        self.nice = int(nice)
        self._encoder = self.model_encoder if encoder is None else encoder
        self.keep_encoded_bytes = KEEP_ENCODED_BYTES
        self.rank, self.world = _tp_rank_world() if rank_world is None else rank_world
        # scores_ahead_split: the fast solver's columns over a gloo group of the
        # tensor-parallel ranks (made in the main thread at the first split job: _split_group)
        self.split = bool(split) and self.world > 1
        self._group = split_group  # None: not made yet; False: cannot be made here
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="videoanchor-ssc",
                                        initializer=self._init_thread)  # fmt: skip
        # split jobs run collectives: one thread, in submission order on every rank
        self._split_pool = ThreadPoolExecutor(1, thread_name_prefix="videoanchor-ssc-split",
                                              initializer=self._init_thread)  # fmt: skip
        self._queue: list = []  # heap of (work, seq, future, job arguments)
        self._seq = itertools.count()
        self.turns = Turns()
        self._lock = threading.RLock()
        self._done = threading.Condition(self._lock)
        self.jobs: dict[str, Future] = {}  # score key -> its job (result: scores or None)
        self.by_req: OrderedDict[str, str | None] = OrderedDict()  # req_id -> key (None: no job)
        self._relayed: set[str] = set()  # keys whose job runs on another rank
        self._split_jobs: set[Future] = set()  # jobs every rank runs together (never cancelled)
        # set when the ranks' split jobs were found out of step (or the group failed): no
        # split job runs any collective after it; their requests are scored in their steps
        self.split_broken = False
        self._results: dict[str, tuple] = {}  # this rank's results not yet reported
        self.stats = {"computed": 0, "relayed": 0, "encoded_reused": 0, "split": 0}
        # the encoder outputs of the items encoded ahead (by item identifier, as the model
        # returned them), until the step that encodes the item takes them (encoded_output)
        self._encoded: dict[str, torch.Tensor] = {}
        self._encoded_by_req: dict[str, list[str]] = {}
        device = getattr(runner, "device", None)
        self.stream = None
        if device is not None and torch.device(device).type == "cuda":
            # SSC is GEMM-bound, decode memory-bound: a stream of its own lets them overlap.
            self.stream = torch.cuda.Stream(device=device)

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

    def submit(self, payloads) -> None:
        """Encode the items of ``payloads`` (``(req_id, mm_features, extra_args)`` each) and
        start their SSC on the side thread.

        Called in the worker's main thread, between steps, in the same order on every rank:
        the encoder runs here, not on the side thread, because under tensor parallelism it
        runs collectives on the ranks' group, which must come in the same order on every rank
        and never interleave with the steps'. So every decision to encode depends only on
        what every rank sees alike (the payloads and the jobs in flight), never on a rank's
        own score cache. The SSC runs on one rank (:meth:`owner_of`), or with
        ``scores_ahead_split`` on every rank together (:meth:`_split_vote`)."""
        from videoanchor.integrations.options import fast_splits
        from videoanchor.integrations.vllm.config import request_config

        runner = self._runner()
        eng = engine_cfg_of(runner)
        cache = score_cache(self.owner, runner.vllm_config.additional_config)
        for req_id, features, extra in payloads:
            key = None
            try:
                cfg = request_config(eng, extra)
                p = plan(features, cfg) if cfg is not None else None
                if p is not None and all(features[i].data is not None for i in p.items):
                    key = p.key
            except Exception:  # the step checks the request again and says what is wrong
                logger.debug("videoanchor: request %s not scored ahead", req_id, exc_info=True)
            with self._lock:
                self.by_req[req_id] = key
                self._trim()
                if key is None or key in self.jobs:
                    continue
            group = self._split_group() if fast_splits(cfg) else None  # every rank alike
            with self._lock:
                mine = self.owner_of(key) == self.rank
                cached = cache.get(key) if cache is not None and mine and not group else None
            if self.world == 1 and cached is not None:
                continue  # take() finds it in the cache: no encoder, no SSC
            outs = self._encode(runner, features, p.items, req_id)  # every rank alike
            if group is not None:
                with self._lock:
                    self.jobs[key] = job = self._split_pool.submit(
                        self._job, req_id, features, cfg, p, cache, outs, group
                    )  # fmt: skip
                    self._split_jobs.add(job)
                    job.add_done_callback(self._split_jobs.discard)
                continue
            with self._lock:
                if cached is not None:  # the other ranks take it from here
                    self._results[key] = (cached, True)
                    self.jobs[key] = done = Future()
                    done.set_result(cached)
                    continue
                if not mine or outs is None:  # another rank scores it; poll() relays it here
                    self.jobs[key] = Future()
                    self._relayed.add(key)
                    if outs is None:  # our encoder failed: the step scores it instead
                        self.jobs[key].set_result(None)
                    continue
                width = outs[0].shape[-1] if outs else 0
                job = self._enqueue(counted_work(p.n, width, cfg),
                                    (req_id, features, cfg, p, cache, outs))  # fmt: skip
                self.jobs[key] = job
                if self.world > 1:
                    job.add_done_callback(lambda f, key=key: self._report(key, f, cache))

    def _enqueue(self, work: int, args: tuple) -> Future:
        """A job on the side threads; queued jobs start least ``work`` first."""
        job = Future()
        with self._lock:
            heapq.heappush(self._queue, (work, next(self._seq), job, args))
        self._pool.submit(self._run_next)
        return job

    def _run_next(self) -> None:
        with self._lock:
            if not self._queue:
                return
            work, _, job, args = heapq.heappop(self._queue)
        if not job.set_running_or_notify_cancel():
            return
        try:
            job.set_result(self._job(*args, work=work))
        except BaseException as err:  # _job reports its own errors; this is a last resort
            job.set_exception(err)

    def _split_group(self):
        """The gloo group of the tensor-parallel ranks that split SSC jobs (None: no split).
        Made at the first split job, in the main thread: ``new_group`` is collective, and
        every rank reaches it at the same submission. Its own group, so that the side
        thread's collectives never interleave with the steps' on vLLM's groups; gloo, so
        that on GPUs it never runs a second NCCL communicator beside the steps' all-reduces
        (its tensors pass through host memory)."""
        if not self.split:
            return None
        if self._group is None:
            import torch.distributed as dist

            self._group = False
            try:
                from vllm.distributed import get_tp_group

                ranks = list(get_tp_group().ranks)
                # new_group needs every process of the default group; vLLM's other
                # parallel groups (pipeline, data, expert) would have to join it too
                if dist.is_initialized() and dist.get_world_size() == len(ranks):
                    self._group = dist.new_group(ranks=ranks, backend="gloo")
            except Exception as err:
                logger.warning("videoanchor: scores_ahead_split: no process group (%s: %s)",
                               type(err).__name__, err)  # fmt: skip
            if self._group is False:
                logger.warning(
                    "videoanchor: scores_ahead_split is set but this engine's workers are not "
                    "one tensor-parallel group alone; each request is scored on one rank"
                )  # fmt: skip
        return self._group or None

    def _encode(self, runner, features, items, req_id):
        """The projector outputs of ``items`` (the model's own encoder, as the step runs it;
        outside the runner's encoder cache), ready for the side thread; None if it failed."""
        raw, kept = self._encoder(runner, features), {}

        def recording(rid, indices):  # the model's outputs, kept for the prefill step
            outs = raw(rid, indices)
            kept.update((features[i].identifier, o) for i, o in zip(indices, outs, strict=True))
            return outs

        try:
            with torch.inference_mode():
                enc = projector_only(recording, runner.model_config.hf_config)
                outs = enc(req_id, items)
            self._keep_encoded(req_id, kept)
            if self.stream is not None:  # the side stream reads what the step's stream wrote
                event = torch.cuda.Event()
                event.record()
                self.stream.wait_event(event)
                for t in outs:
                    t.record_stream(self.stream)
            return outs
        except Exception as err:
            logger.warning(
                "videoanchor: request %s: encoding its items ahead of its step failed (%s: "
                "%s); its step scores it instead", req_id, type(err).__name__, err,
            )  # fmt: skip
            return None

    def _keep_encoded(self, req_id: str, outs: dict) -> None:
        """Keep ``outs`` (item identifier -> encoder output) for ``req_id``'s prefill step,
        within :attr:`keep_encoded_bytes`."""
        with self._lock:
            used = sum(t.numel() * t.element_size() for t in self._encoded.values())
            for ident, out in outs.items():
                size = out.numel() * out.element_size()
                if ident in self._encoded or used + size > self.keep_encoded_bytes:
                    continue
                self._encoded[ident] = out
                used += size
                self._encoded_by_req.setdefault(req_id, []).append(ident)

    def encoded_output(self, identifier: str):
        """The encoder output of the item ``identifier`` if it was encoded ahead (and not
        taken yet), else None. Called where the step would encode the item: it is not
        encoded a second time. The output is the model's own ``embed_multimodal`` output for
        that item, computed on the same inputs (batched per request, where the step batches
        the step's items together)."""
        with self._lock:
            out = self._encoded.pop(identifier, None)
            if out is not None:
                self.stats["encoded_reused"] += 1
            return out

    def _drop_encoded(self, req_id: str) -> None:
        idents = self._encoded_by_req.pop(req_id, ())
        still = {i for other in self._encoded_by_req.values() for i in other}
        for ident in idents:
            if ident not in still:
                self._encoded.pop(ident, None)

    def owner_of(self, key: str) -> int:
        """The tensor-parallel rank that scores ``key`` (the others take its scores)."""
        return int(key[:8], 16) % self.world

    def _report(self, key: str, job: Future, cache) -> None:
        if job.cancelled():
            return
        visual = job.result()
        with self._lock:
            self._results[key] = (visual, cache is not None and key in cache)

    def relay(self, results: dict) -> None:
        """Scores of other ranks' jobs: ``{key: (scores or None, cacheable)}``."""
        runner = self._runner()
        cache = score_cache(self.owner, runner.vllm_config.additional_config)
        with self._done:
            for key, (visual, cacheable) in results.items():
                if visual is not None and cacheable and cache is not None:
                    cache.put(key, visual)
                if key in self._relayed:
                    self._relayed.discard(key)
                    self.stats["relayed"] += 1
                    job = self.jobs.get(key)
                    if job is not None and not job.done():
                        job.set_result(visual)
            self._done.notify_all()

    def reports(self) -> dict:
        """This rank's results since the last call, for the engine core to relay."""
        with self._lock:
            out, self._results = self._results, {}
            return out

    def _job(self, req_id, features, cfg, p, cache, outs, group=None, work=0):
        """The request's scores on a side thread: scores, a :class:`.scoring.Failure` (the
        request fails alone) or None (its step scores it: a split job whose ranks' group
        failed). With ``group`` (``scores_ahead_split``) every rank of it runs this job
        together, the SSC's columns split over them, after :meth:`_split_vote`; every rank
        gets the same scores and nothing is relayed. Without, it takes turns with the other
        side threads' jobs (:class:`Turns`, ``work``: its counted work)."""
        req = SimpleNamespace(req_id=req_id, mm_features=features)
        token = self.turns.enter(work) if group is None else None
        try:
            if group is not None:
                if self.split_broken:  # no collective that could pair with another job's
                    return None
                run, result = self._split_vote(req, p, cache, outs, group)
                if not run:
                    return result
            progress = None if token is None else _Yielding(self.turns, token)
            with torch.inference_mode():
                visual = run_ssc(req, cfg, p.items, p.cols, p.n, p.k, lambda _rid, _idx: outs,
                                 cache, p.key, group=group, progress=progress,
                                 where="ahead")  # fmt: skip
                if self.stream is not None:
                    self.stream.synchronize()
            self.stats["computed" if group is None else "split"] += 1
            return visual
        except Exception as err:
            # Split over a group, the solver's own errors reach every rank together; a
            # failure of the group's communication may leave the ranks out of step: the
            # steps score those requests instead. Any other error fails the request alone.
            if group is not None and communication_failed(err):
                self._break_split(f"{type(err).__name__}: {err}")
                logger.warning(
                    "videoanchor: request %s: scoring over the tensor-parallel ranks failed "
                    "(%s: %s); its step scores it instead", req_id, type(err).__name__, err,
                )  # fmt: skip
                return None
            if group is None or self.rank == 0:  # one count per failed request
                metrics.count("videoanchor_failures", where="ahead")
            logger.error(
                "videoanchor: request %s: scoring its %d visual tokens failed (%s: %s); the "
                "request fails alone, the engine goes on", req_id, p.n, type(err).__name__,
                err, exc_info=logger.isEnabledFor(logging.DEBUG),
            )  # fmt: skip
            return Failure(f"anchor scores failed: {type(err).__name__}: {err}")
        finally:
            if token is not None:
                self.turns.leave(token)
            with self._done:
                self._done.notify_all()

    def _split_vote(self, req, p, cache, outs, group) -> tuple[bool, object]:
        """Whether every rank of ``group`` runs the split job of ``p.key`` (``(True,
        None)``), or its result without an SSC (``(False, scores or None)``): one small
        collective, the same answer on every rank.

        Every rank runs every split job, in submission order (one side thread per rank, the
        same submissions on every rank), and no rank skips a job another runs. The job runs
        if any rank still wants its scores (a request forgotten on one rank may still be
        wanted on another, whose main thread has not seen it go yet), returns the cached
        scores where every rank holds them, and leaves the request to its step where any
        rank's encoder failed or gave outputs of the wrong shape (checked before the vote:
        no rank fails alone inside the SSC)."""
        from videoanchor.anchor.collective import all_sum

        # nothing before the vote may raise: a rank that left here without voting would
        # leave the others' vote to pair with its next job's
        with self._lock:
            wanted = self.jobs.get(p.key) is not None
        try:
            cached = cache.get(p.key) if cache is not None else None
        except Exception as err:
            cached = None
            logger.warning("videoanchor: score cache lookup failed (%s: %s)",
                           type(err).__name__, err)  # fmt: skip
        encoded = outs is not None
        if encoded:
            try:
                check_outputs(req, p.items, p.cols, outs)
            except Exception as err:
                encoded = False
                logger.warning("%s; its step scores it instead", err)
        # the job's tag and its square: every rank votes on the same job iff
        # world * sum(tag^2) == sum(tag)^2 (exact in int64 for tags under 2^20)
        tag = job_tag(p.key)
        votes = [int(wanted), int(encoded), int(cached is not None), tag, tag * tag]
        wanted_any, all_encoded, all_cached, tags, squares = (
            int(v) for v in all_sum(torch.tensor(votes, dtype=torch.int64), group)
        )  # fmt: skip
        if self.world * squares != tags * tags:
            self._break_split(f"the ranks voted on different jobs (this rank: {req.req_id})")
            return False, None
        if not wanted_any:
            return False, None
        if all_cached == self.world:
            return False, cached
        if all_encoded < self.world:
            return False, None
        return True, None

    def _break_split(self, why: str) -> None:
        """Stop running collectives in split jobs for good: the ranks' jobs (or their group)
        are out of step, and a collective could pair with another request's. Every later
        split job leaves its request to its step (which scores it correctly on every rank)."""
        if not self.split_broken:
            self.split_broken = True
            logger.error(
                "videoanchor: scores_ahead_split: %s; split jobs stop here and their requests "
                "are scored in their steps", why,
            )  # fmt: skip

    @staticmethod
    def model_encoder(runner, features):
        """:data:`.scoring.EncoderOutputs` over ``features`` with the model's own encoder
        (vLLM's grouping into batches by modality), outside the runner's encoder cache: the
        default ``encoder``."""
        from vllm.multimodal.utils import group_and_batch_mm_kwargs

        def encoder_outputs(req_id: str, indices: list[int]) -> list:
            kwargs = [(features[i].modality, features[i].data) for i in indices]
            outs: list = []
            for _, _, batch in group_and_batch_mm_kwargs(kwargs, device=runner.device,
                                                         pin_memory=False):  # fmt: skip
                outs.extend(runner.model.embed_multimodal(**batch))
            return outs

        return encoder_outputs

    def _trim(self) -> None:
        while len(self.by_req) > KEEP_UNTAKEN:
            rid, _ = self.by_req.popitem(last=False)
            self._release(rid)
            self._drop_encoded(rid)

    def _release(self, req_id: str) -> None:
        key = self.by_req.pop(req_id, None)
        if key is not None and key not in self.by_req.values():
            job = self.jobs.pop(key, None)
            self._relayed.discard(key)
            if job is not None and job not in self._split_jobs:
                job.cancel()  # a split job runs anyway: every rank runs it (_split_vote)

    def failures(self, req_ids) -> dict[str, str]:
        """``{req_id: why}`` for those of ``req_ids`` whose scoring ahead failed."""
        with self._lock:
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
        with self._lock:
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

    def forget(self, req_ids) -> None:
        """Drop the state of requests that finished (aborted while held, or done)."""
        with self._lock:
            for r in req_ids:
                self._release(r)
                self._drop_encoded(r)

    def take(self, req_id: str, key: str):
        """The scores computed ahead for ``req_id`` under ``key`` (waiting for its job if it
        is still running), or None (not scored ahead, its job failed, or it ran under other
        options): the step computes them then."""
        with self._lock:
            if req_id not in self.by_req:
                return None
            if self.by_req[req_id] != key:
                self._release(req_id)
                return None
            job = self.jobs.get(key)
            if key in self._relayed and job is not None and not job.done():
                # another rank's scores have not arrived (the request was not held): the
                # step scores it here rather than wait
                self._release(req_id)
                return None
        visual = job.result() if job is not None else None
        with self._lock:
            self._release(req_id)
        return visual

    def close(self) -> None:
        """Stop the side thread (jobs not started are cancelled, unless split jobs are
        queued: the other ranks run those, and wait for this one in them)."""
        with self._lock:
            queued, self._queue = self._queue, []
        for _, _, job, _ in queued:
            job.cancel()
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._split_pool.shutdown(wait=False, cancel_futures=not self._split_jobs)


def set_side_worker(ahead: Ahead) -> Ahead:
    """Makes ``ahead`` the side worker of its model runner (the one it was made with) in this
    process: the one :func:`submit`, :func:`poll`, :func:`stats` and the runner's steps use,
    instead of the one they make at the first call for that runner from its engine's
    options. For a side worker made with injected parts (:class:`Ahead`'s ``encoder``,
    ``rank_world``, ``split_group``), e.g. an engine driven without vLLM; set it before the
    runner's first step. Returns ``ahead``; ValueError if the runner has a side worker
    already (:func:`close_side_worker` it first)."""
    if not isinstance(ahead, Ahead):
        raise TypeError(f"set_side_worker: expected an Ahead, got {type(ahead).__name__}")
    if ahead._runner() is None:
        raise ValueError("set_side_worker: the side worker's model runner is gone")
    if AHEAD.setdefault(ahead.owner, ahead) is not ahead:
        raise ValueError(
            "set_side_worker: this model runner has a side worker already; "
            "close_side_worker(runner) first"
        )
    return ahead


def side_worker(runner) -> Ahead | None:
    """The side worker of model runner ``runner`` in this process (None: none made or set
    yet)."""
    return AHEAD.get(id(runner))


def close_side_worker(runner) -> None:
    """Closes the side worker of model runner ``runner`` in this process (:meth:`Ahead.close`)
    and forgets it; a later call for the runner makes a new one. Nothing where it has none.
    For a runner taken out of service (tests, tools); an engine's own runners keep theirs
    while the process lives."""
    ahead = AHEAD.pop(id(runner), None)
    if ahead is not None:
        ahead.close()


def _ahead_of(worker) -> Ahead | None:
    from videoanchor.integrations.vllm.config import ahead_nice, ahead_split, ahead_workers

    runner = worker.model_runner
    ahead = AHEAD.get(id(runner))
    if ahead is None:
        if engine_cfg_of(runner) is None:
            return None
        extra = runner.vllm_config.additional_config
        ahead = AHEAD[id(runner)] = Ahead(runner, ahead_nice(extra), ahead_split(extra),
                                          ahead_workers(extra))  # fmt: skip
    return ahead


def _tp_rank_world() -> tuple[int, int]:
    """This worker's tensor-parallel rank and the group's size ((0, 1) outside one)."""
    try:
        from vllm.distributed import (
            get_tensor_model_parallel_rank,
            get_tensor_model_parallel_world_size,
        )

        return get_tensor_model_parallel_rank(), get_tensor_model_parallel_world_size()
    except Exception:  # no model-parallel group (tests building a runner by hand)
        return 0, 1


def submit(worker, payloads) -> None:
    """``collective_rpc`` target: start the jobs of ``payloads`` on this worker."""
    ahead = _ahead_of(worker)
    if ahead is not None:
        ahead.submit(payloads)


def poll(worker, held: list[str], gone: list[str], wait: float = 0.0,
         relay: dict | None = None) -> tuple[list[str], dict, dict]:  # fmt: skip
    """``collective_rpc`` target: take the scores other ranks computed (``relay``), forget
    ``gone``; returns the ids of ``held`` that are ready on this worker (after waiting up to
    ``wait`` seconds for one of them), the scores this rank computed since the last poll
    (for the engine core to relay to the other ranks) and ``{req_id: why}`` for the
    requests whose scoring failed (held ones, and any whose step failed to score it in
    this process)."""
    ahead = _ahead_of(worker)
    if ahead is None:
        return list(held), {}, {}
    if relay:
        ahead.relay(relay)
    if gone:
        ahead.forget(gone)
    if wait > 0 and held:
        ahead.wait(held, wait)
    # steps that failed to score a request in this worker's process (where it is not the
    # engine core's, this poll is how the scheduler learns of them)
    failed = state.take_failed()
    return ahead.ready(held), ahead.reports(), {**failed, **ahead.failures(held)}


def stats(worker) -> dict:
    """``collective_rpc`` target: this worker's rank and counts of requests it scored ahead
    (``computed``) and took from another rank (``relayed``)."""
    ahead = _ahead_of(worker)
    if ahead is None:
        return {}
    return {"rank": ahead.rank, "world": ahead.world, **ahead.stats}


# --- engine-core side -----------------------------------------------------------------------


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
