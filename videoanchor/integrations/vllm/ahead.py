"""Scores ahead of the step: a request's SSC runs beside the engine's steps, not inside one.

An anchored request's visual tokens cannot be prefilled before its scores exist, and its SSC
(with the encoder run it needs) takes far longer than one decode step. Run inside the step
(``scores_ahead: false``), it stalls every other request of the batch for that long. With
``scores_ahead`` (the default) instead:

1. **Engine core, admission** (``EngineCore.preprocess_add_request``, any process layout): an
   anchored request with scored multimodal items is noted (:meth:`.holds.Holds.note`).
2. **Engine core, each** ``Scheduler.schedule`` **call**: noted requests are sent to every
   worker (``collective_rpc`` :func:`submit`). A worker encodes their items there, in its
   main thread between steps, with the model's own ``embed_multimodal`` (under tensor
   parallelism the encoder's collectives then come in the same order on every rank), and
   runs their joint SSC on a side thread (niced on Linux; a side CUDA stream on a GPU), on
   one rank only under tensor parallelism: the engine core relays its scores to the other
   ranks with its next poll (:func:`poll`). The scores go into the engine's score cache.
   While a request's scores are not ready on every worker it is taken out of the waiting
   queue for that ``schedule`` call and put back at its front after it, so the scheduler
   schedules everyone else as if it were not there (:meth:`.holds.Holds.hidden`). When all that is
   left is held requests, the engine core waits on the workers for up to :data:`.holds.IDLE_WAIT`
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

The engine core's side (the holds, the scheduler's wrapping) is :mod:`.holds`; here, the
workers' side. A worker's side worker (:class:`Ahead`) is put together from :mod:`.worker_queue` (its jobs
and side threads), :mod:`.encoder_outputs` (the encoder outputs made ahead, kept for the
prefill), :mod:`.split_vote` (the tensor-parallel ranks' share of the work) and
:mod:`.reports` (the results relayed to the other ranks, its counts).
"""

from __future__ import annotations

import logging
import weakref
from types import SimpleNamespace

import torch

from videoanchor.integrations.vllm import metrics, state
from videoanchor.integrations.vllm.encoder_outputs import EncodedOutputs, model_encoder
from videoanchor.integrations.vllm.reports import Reports
from videoanchor.integrations.vllm.scoring import (
    Failure,
    engine_cfg_of,
    plan,
    run_ssc,
    score_cache,
)
from videoanchor.integrations.vllm.split_vote import SplitVote, communication_failed, tp_rank_world
from videoanchor.integrations.vllm.worker_queue import WorkerQueue, counted_work

logger = logging.getLogger("videoanchor.vllm")

__all__ = [
    "AHEAD",
    "Ahead",
    "close_side_worker",
    "poll",
    "set_side_worker",
    "side_worker",
    "submit",
]

#: owner (the model runner's id) -> its engine's :class:`Ahead` (worker side), made at the
#: first call for that runner; one made by hand and set beforehand (:func:`set_side_worker`:
#: other constructor arguments, as tests without vLLM pass) is used as it is. Read it with
#: :func:`side_worker`.
AHEAD: dict[int, Ahead] = {}


# --- worker side ----------------------------------------------------------------------------


class Ahead:
    """One engine's side worker in one worker process: :meth:`submit` encodes a held
    request's items (in the worker's main thread) and a side thread runs its SSC;
    :meth:`take` hands the scores to the step. Made of four parts: its queue of jobs and
    side threads (:class:`.worker_queue.WorkerQueue`), the encoder outputs made ahead and
    kept for the prefill (:class:`.encoder_outputs.EncodedOutputs`), its place among the
    tensor-parallel ranks (:class:`.split_vote.SplitVote`) and its reports
    (:class:`.reports.Reports`); what it adds is the decision, per request, of what runs
    where, and the job itself (:meth:`_job`).

    ``runner``: the model runner (its ``model``, ``device``, ``vllm_config``); ``nice``: the
    side threads' niceness on Linux (0-19; their OpenMP threads inherit it), so that on the
    CPU the running requests' steps come first and the SSC takes the cores' idle time;
    ``workers``: side threads; their jobs start least counted work first and take turns
    (:class:`.worker_queue.Turns`), so a new video is not queued behind a long job.

    Injected parts (defaults: the engine's own): ``encoder``, a function ``(runner,
    features) -> EncoderOutputs`` (:data:`.scoring.EncoderOutputs`; default the model's own
    encoder through vLLM's batching, :meth:`model_encoder`); ``rank_world``, this worker's
    tensor-parallel (rank, size) (default vLLM's group, (0, 1) outside one);
    ``split_group``, the process group that split jobs run over (default a gloo group of
    vLLM's tensor-parallel ranks, made at the first split job:
    :meth:`.split_vote.SplitVote.group`). Attribute ``keep_encoded_bytes``: the bytes of
    encoder outputs kept for the requests' own prefill steps (default
    :data:`.encoder_outputs.KEEP_ENCODED_BYTES`; beyond it a step encodes its items again).
    One made by hand is used once set as its runner's side worker (:func:`set_side_worker`).
    """

    model_encoder = staticmethod(model_encoder)

    def __init__(self, runner, nice: int, split: bool = False, workers: int = 2, *,
                 encoder=None, rank_world: tuple[int, int] | None = None,
                 split_group=None):  # fmt: skip
        self.owner = id(runner)
        self._runner = weakref.ref(runner)
        self._encoder = self.model_encoder if encoder is None else encoder
        rank, world = tp_rank_world() if rank_world is None else rank_world
        # scores_ahead_split: the fast solver's columns over a gloo group of the
        # tensor-parallel ranks (made in the main thread at the first split job)
        self.split_vote = SplitVote(rank, world, split, split_group)
        self.rank, self.world = rank, world
        device = getattr(runner, "device", None)
        self.stream = None
        if device is not None and torch.device(device).type == "cuda":
            # SSC is GEMM-bound, decode memory-bound: a stream of its own lets them overlap.
            self.stream = torch.cuda.Stream(device=device)
        self.encoded = EncodedOutputs()
        self.queue = WorkerQueue(nice, workers, self.stream, forgotten=self.encoded.drop)
        self.rank_reports = Reports()

    @property
    def jobs(self) -> dict:
        """Score key -> its job (:attr:`.worker_queue.WorkerQueue.jobs`)."""
        return self.queue.jobs

    @property
    def by_req(self) -> dict:
        """Request id -> its score key (:attr:`.worker_queue.WorkerQueue.by_req`)."""
        return self.queue.by_req

    @property
    def stats(self) -> dict:
        """This worker's counts (:attr:`.reports.Reports.stats`)."""
        return self.rank_reports.stats

    @property
    def split_broken(self) -> bool:
        """Whether split jobs stopped running collectives (:attr:`.split_vote.SplitVote.broken`)."""
        return self.split_vote.broken

    @property
    def keep_encoded_bytes(self) -> int:
        """Bytes of encoder outputs kept for the prefill steps."""
        return self.encoded.keep_bytes

    @keep_encoded_bytes.setter
    def keep_encoded_bytes(self, value: int) -> None:
        self.encoded.keep_bytes = value

    def submit(self, payloads) -> None:
        """Encode the items of ``payloads`` (``(req_id, mm_features, extra_args)`` each) and
        start their SSC on the side thread.

        Called in the worker's main thread, between steps, in the same order on every rank:
        the encoder runs here, not on the side thread, because under tensor parallelism it
        runs collectives on the ranks' group, which must come in the same order on every rank
        and never interleave with the steps'. So every decision to encode depends only on
        what every rank sees alike (the payloads and the jobs in flight), never on a rank's
        own score cache. The SSC runs on one rank (:meth:`owner_of`), or with
        ``scores_ahead_split`` on every rank together (:meth:`.split_vote.SplitVote.vote`)."""
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
            if not self.queue.note(req_id, key):
                continue
            group = self.split_vote.group() if fast_splits(cfg) else None  # every rank alike
            mine = self.owner_of(key) == self.rank
            cached = cache.get(key) if cache is not None and mine and not group else None
            if self.world == 1 and cached is not None:
                continue  # take() finds it in the cache: no encoder, no SSC
            outs = self.encoded.encode(self._encoder, runner, features, p.items, req_id,
                                       self.stream)  # every rank alike  # fmt: skip
            if group is not None:
                self.queue.start_split(key, self._job, req_id, features, cfg, p, cache, outs,
                                       group)  # fmt: skip
                continue
            if cached is not None:  # the other ranks take it from here
                self.rank_reports.add(key, cached, True)
                self.queue.finished(key, cached)
                continue
            if not mine or outs is None:  # another rank scores it; poll() relays it here
                # (our encoder failed: the step scores it instead)
                self.queue.expect(key, failed=outs is None)
                continue
            width = outs[0].shape[-1] if outs else 0
            job = self.queue.start(key, counted_work(p.n, width, cfg),
                                   self._job, (req_id, features, cfg, p, cache, outs))  # fmt: skip
            if self.world > 1:
                self.rank_reports.add_when_done(key, job, cache)

    def _job(self, req_id, features, cfg, p, cache, outs, group=None, progress=None):
        """The request's scores on a side thread: scores, a :class:`.scoring.Failure` (the
        request fails alone) or None (its step scores it: a split job whose ranks' group
        failed). With ``group`` (``scores_ahead_split``) every rank of it runs this job
        together, the SSC's columns split over them, after the split vote
        (:meth:`.split_vote.SplitVote.vote`); every rank gets the same scores and nothing is
        relayed. Without, it takes turns with the other side threads' jobs through
        ``progress`` (:class:`.worker_queue.Turns`)."""
        req = SimpleNamespace(req_id=req_id, mm_features=features)
        try:
            if group is not None:
                if self.split_vote.broken:  # no collective that could pair with another job's
                    return None
                wanted = self.queue.has_job(p.key)
                run, result = self.split_vote.vote(req, p, cache, outs, group, wanted)
                if not run:
                    return result
            with torch.inference_mode():
                visual = run_ssc(req, cfg, p.items, p.cols, p.n, p.k, lambda _rid, _idx: outs,
                                 cache, p.key, group=group, progress=progress,
                                 where="ahead")  # fmt: skip
                if self.stream is not None:
                    self.stream.synchronize()
            self.rank_reports.count("computed" if group is None else "split")
            return visual
        except Exception as err:
            # Split over a group, the solver's own errors reach every rank together; a
            # failure of the group's communication may leave the ranks out of step: the
            # steps score those requests instead. Any other error fails the request alone.
            if group is not None and communication_failed(err):
                self.split_vote.stop(f"{type(err).__name__}: {err}")
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
            self.queue.notify()

    def owner_of(self, key: str) -> int:
        """The tensor-parallel rank that scores ``key`` (the others take its scores)."""
        return self.split_vote.owner_of(key)

    def encoded_output(self, identifier: str):
        """The encoder output of the item ``identifier`` if it was encoded ahead (and not
        taken yet), else None. Called where the step would encode the item: it is not
        encoded a second time. The output is the model's own ``embed_multimodal`` output for
        that item, computed on the same inputs (batched per request, where the step batches
        the step's items together)."""
        out = self.encoded.take(identifier)
        if out is not None:
            self.rank_reports.count("encoded_reused")
        return out

    def relay(self, results: dict) -> None:
        """Scores of other ranks' jobs: ``{key: (scores or None, cacheable)}``."""
        runner = self._runner()
        cache = score_cache(self.owner, runner.vllm_config.additional_config)
        for key, (visual, cacheable) in results.items():
            if visual is not None and cacheable and cache is not None:
                cache.put(key, visual)
        arrived = self.queue.arrived({key: visual for key, (visual, _) in results.items()})
        if arrived:
            self.rank_reports.count("relayed", arrived)

    def reports(self) -> dict:
        """This rank's results since the last call, for the engine core to relay."""
        return self.rank_reports.take()

    def failures(self, req_ids) -> dict[str, str]:
        """``{req_id: why}`` for those of ``req_ids`` whose scoring ahead failed."""
        return self.queue.failures(req_ids)

    def ready(self, req_ids) -> list[str]:
        """Those of ``req_ids`` whose scores need no more work ahead of their step."""
        return self.queue.ready(req_ids)

    def wait(self, req_ids, timeout: float) -> None:
        """Block until one of ``req_ids`` is ready, or ``timeout`` seconds."""
        self.queue.wait(req_ids, timeout)

    def forget(self, req_ids) -> None:
        """Drop the state of requests that finished (aborted while held, or done)."""
        self.queue.forget(req_ids)

    def take(self, req_id: str, key: str):
        """The scores computed ahead for ``req_id`` under ``key`` (waiting for its job if it
        is still running), or None (not scored ahead, its job failed, or it ran under other
        options): the step computes them then."""
        return self.queue.take(req_id, key)

    def close(self) -> None:
        """Stop the side threads (jobs not started are cancelled, unless split jobs are
        queued: the other ranks run those, and wait for this one in them)."""
        self.queue.close()


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
