"""Scores ahead of the step (videoanchor/integrations/vllm/ahead.py and holds.py, and the parts of its side
worker: worker_queue.py, encoder_outputs.py, split_vote.py, reports.py) without vLLM: the engine
core's hold around ``Scheduler.schedule`` and the workers' side jobs, with a scheduler, an
executor and model runners made of plain objects that behave as vLLM's do (a waiting queue
with ``remove_requests`` / ``prepend_requests``, ``collective_rpc`` calling a function on
every worker in order). The scores are checked against a plain reference (one joint SSC over
the request's items, then ``anchor_gates``). The real engine: tests/test_vllm.py (in-process
and spawned engine cores), tests/test_vllm_server.py (the OpenAI server) and
tests/test_vllm_tp.py (tensor parallel 2). Cost: a few seconds.
"""

from __future__ import annotations

import time
from collections import deque
from concurrent.futures import Future
from types import SimpleNamespace

import pytest
import torch

from videoanchor.anchor import compute_anchor_scores
from videoanchor.integrations.options import clusters_for, ssc_kwargs
from videoanchor.integrations.vllm import ahead, state
from videoanchor.integrations.vllm import holds as engine_holds
from videoanchor.integrations.vllm.config import (
    ahead_nice,
    ahead_split,
    ahead_workers,
    engine_config,
)
from videoanchor.integrations.vllm.runner import Scheduled, fill_step
from videoanchor.integrations.vllm.scoring import forget_score_cache, score_cache
from videoanchor.kernels import anchor_gates

PROMPT = 20
OPTIONS = {"n_clusters": 3, "max_iter": 100}


def _features(tag: str):
    """A video at 3..10 and an image at 12..16 (items out of prompt order on purpose)."""
    return [
        SimpleNamespace(modality="image", identifier=f"{tag}-i", data=object(),
                        mm_position=SimpleNamespace(offset=12, length=5, is_embed=None)),
        SimpleNamespace(modality="video", identifier=f"{tag}-v", data=object(),
                        mm_position=SimpleNamespace(offset=3, length=8, is_embed=None)),
    ]  # fmt: skip


def _outputs(tag: str) -> dict:
    g = torch.Generator().manual_seed(sum(map(ord, tag)))
    return {
        f"{tag}-v": torch.randn(8, 16, generator=g),
        f"{tag}-i": torch.randn(5, 16, generator=g),
    }


def _reference(tag: str):
    eng = engine_config({"videoanchor": OPTIONS})
    outs = _outputs(tag)
    feats = torch.cat([outs[f"{tag}-v"], outs[f"{tag}-i"]])  # prompt order
    res = compute_anchor_scores(feats, clusters_for(feats.shape[0], eng), **ssc_kwargs(eng))
    scores = torch.zeros(PROMPT)
    scores[torch.tensor([*range(3, 11), *range(12, 17)])] = res.scores.float()
    return anchor_gates(scores, eng.alpha_k, eng.alpha_v)


class Runner(SimpleNamespace):
    """A model runner (weak-referenceable, as vLLM's are)."""


class Queue(deque):
    """vLLM's FCFS request queue, the two methods the hold uses."""

    def remove_requests(self, requests):
        gone = set(map(id, requests))
        kept = [r for r in self if id(r) not in gone]
        self.clear()
        self.extend(kept)

    def prepend_requests(self, requests):
        self.extendleft(reversed(list(requests)))


class Scheduler:
    def __init__(self):
        self.requests, self.waiting, self.running, self.seen = {}, Queue(), [], []

    def add(self, req):
        self.requests[req.request_id] = req
        self.waiting.append(req)

    def schedule(self):  # what vLLM's schedule() sees of the waiting queue
        self.seen.append([r.request_id for r in self.waiting])


class Executor:
    """``collective_rpc``: the function on every worker, in rank order."""

    def __init__(self, workers):
        self.workers = workers

    def collective_rpc(self, fn, args=(), non_block=False):
        out = [fn(w, *args) for w in self.workers]
        if not non_block:
            return out
        done = Future()
        done.set_result(out)
        return done


_ARRIVALS = iter(range(10**6))


def _request(rid, tag=None):
    finished = []
    return SimpleNamespace(request_id=rid, mm_features=_features(tag) if tag else [],
                           arrival_time=float(next(_ARRIVALS)),
                           sampling_params=SimpleNamespace(extra_args=None),
                           num_computed_tokens=0, is_finished=lambda: bool(finished),
                           finish=lambda: finished.append(1))  # fmt: skip


@pytest.fixture
def engine():
    """An engine core with ``world`` workers: ``make(world)`` -> (core, runners, encodes)."""
    made = []
    encodes = []

    def encoder(runner, features):
        def outputs(req_id, indices):
            encodes.append((runner.rank, req_id))
            return [_outputs(features[i].identifier[:-2])[features[i].identifier]
                    for i in indices]  # fmt: skip

        return outputs

    def make(world: int):
        runners = [
            Runner(rank=r, device=torch.device("cpu"),
                            vllm_config=SimpleNamespace(additional_config={"videoanchor": OPTIONS}),
                            model_config=SimpleNamespace(hf_config=SimpleNamespace(
                                model_type="qwen2_5_vl")))
            for r in range(world)
        ]  # fmt: skip
        for r in runners:
            # each worker's side worker, made with its rank and this encoder (the engine's
            # options as the plugin reads them); the worker calls use it once set
            extra = r.vllm_config.additional_config
            ahead.set_side_worker(ahead.Ahead(
                r, ahead_nice(extra), ahead_split(extra), ahead_workers(extra),
                encoder=encoder, rank_world=(r.rank, world),
            ))  # fmt: skip
        made.extend(runners)
        workers = [SimpleNamespace(model_runner=r) for r in runners]
        sched = Scheduler()
        core = Runner(model_executor=Executor(workers), scheduler=sched)  # an EngineCore
        return core, runners, encodes

    with state.isolated():  # the steps' STEP, gate caches and failures: this test's own
        try:
            yield make
        finally:
            for r in made:
                forget_score_cache(id(r))
                ahead.close_side_worker(r)


def _schedule_until(sched, wanted, timeout=60.0):
    """Calls the held schedule() until the scheduler sees ``wanted`` (request ids)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        engine_holds.schedule_holding(sched, Scheduler.schedule)
        if set(wanted) <= set(sched.seen[-1]):
            return sched.seen[-1]
        time.sleep(0.01)
    raise AssertionError(f"never scheduled {wanted}: {sched.seen[-3:]}")


def _step_gates(runner, rid, tag):
    """The gates the step of ``runner`` gives request ``rid`` (its whole prompt); the step's
    own encoder must not be called: the scores were computed ahead."""

    def no_encoder(req_id, indices):
        raise AssertionError("the step ran the encoder for SSC: not scored ahead")

    eng = engine_config({"videoanchor": OPTIONS})
    req = Scheduled(rid, 0, PROMPT, PROMPT, _features(tag), None)
    cache = score_cache(id(runner), runner.vllm_config.additional_config)  # as the runner's
    fill_step(id(runner), eng, {}, [req], None, no_encoder, PROMPT, 1, cache=cache)
    return state.STEP.key_bias.clone(), state.STEP.value_scale.clone()


def _arrive(sched, holds, *requests) -> None:
    """Requests arriving at the engine core: queued, and noted for scoring ahead."""
    for r in requests:
        sched.add(r)
        holds.note(r)


def test_a_held_request_is_hidden_from_schedule_until_its_scores_are_ready(engine, one_thread):
    core, (runner,), encodes = engine(1)
    sched = core.scheduler
    holds = engine_holds.attach(core)
    a, text, b = _request("a", "A"), _request("text"), _request("b", "B")  # arrival order
    for r in (a, text, b):
        sched.add(r)
    holds.note(a)
    holds.note(b)
    engine_holds.schedule_holding(sched, Scheduler.schedule)
    assert sched.seen[-1] == ["text"]  # a and b held: their SSC runs on the side thread
    assert [r.request_id for r in sched.waiting] == ["a", "text", "b"]  # back in their places
    assert sorted(encodes) == [(0, "a"), (0, "b")]
    _schedule_until(sched, ["a", "b"])
    assert sched.seen[-1] == ["a", "text", "b"]
    for rid, tag in (("a", "A"), ("b", "B")):
        kb, vs = _step_gates(runner, rid, tag)
        kb_ref, vs_ref = _reference(tag)
        assert kb[3:11].abs().sum() > 0  # anchored
        torch.testing.assert_close(kb, kb_ref, rtol=0, atol=1e-6)
        torch.testing.assert_close(vs, vs_ref, rtol=0, atol=1e-6)
    assert ahead.side_worker(runner).stats == {
        "computed": 2,
        "relayed": 0,
        "encoded_reused": 0,
        "split": 0,
    }


def test_tensor_parallel_each_request_scored_on_one_rank_and_relayed(engine, one_thread):
    core, runners, encodes = engine(2)
    sched = core.scheduler
    holds = engine_holds.attach(core)
    reqs = [_request(f"r{i}", f"T{i}") for i in range(4)]
    _arrive(sched, holds, *reqs)
    _schedule_until(sched, [r.request_id for r in reqs])
    # every rank encodes every request (collectives in rank order); one rank runs each SSC
    assert sorted(encodes) == sorted((k, r.request_id) for k in (0, 1) for r in reqs)
    stats = [ahead.side_worker(r).stats for r in runners]
    assert sum(s["computed"] for s in stats) == 4 and sum(s["relayed"] for s in stats) == 4
    first = ahead.side_worker(runners[0])
    owners = {first.owner_of(k) for k in first.jobs}
    assert owners == {0, 1}, owners  # these keys spread over both ranks
    for i in range(4):
        gates = [_step_gates(r, f"r{i}", f"T{i}") for r in runners]
        torch.testing.assert_close(gates[0], gates[1], rtol=0, atol=0)  # the same scores
        torch.testing.assert_close(gates[0], _reference(f"T{i}"), rtol=0, atol=1e-6)


def test_a_request_finished_while_held_is_forgotten_everywhere(engine, one_thread):
    core, runners, _ = engine(2)
    sched = core.scheduler
    holds = engine_holds.attach(core)
    a, b = _request("a", "A"), _request("b", "B")
    _arrive(sched, holds, a, b)
    engine_holds.schedule_holding(sched, Scheduler.schedule)
    a.finish()  # aborted: vLLM drops it from its queues
    del sched.requests["a"]
    sched.waiting.remove_requests([a])
    _schedule_until(sched, ["b"])
    assert "a" not in holds.held
    for r in runners:
        assert "a" not in ahead.side_worker(r).by_req


def test_a_repeated_video_is_a_cache_hit_with_no_encoder_and_no_ssc(engine, one_thread):
    core, (runner,), encodes = engine(1)
    sched = core.scheduler
    holds = engine_holds.attach(core)
    first = _request("first", "A")
    _arrive(sched, holds, first)
    _schedule_until(sched, ["first"])
    _step_gates(runner, "first", "A")
    again = _request("again", "A")
    _arrive(sched, holds, again)
    engine_holds.schedule_holding(sched, Scheduler.schedule)
    assert "again" in sched.seen[-1]  # never held: its scores are in the score cache
    assert encodes == [(0, "first")]
    torch.testing.assert_close(_step_gates(runner, "again", "A"), _reference("A"), rtol=0,
                               atol=1e-6)  # fmt: skip
    assert ahead.side_worker(runner).stats["computed"] == 1


def test_items_encoded_ahead_are_handed_to_the_prefill_step_once(engine, one_thread):
    """The outputs the side worker's encoding made for the SSC are kept for the request's
    own step (the runner hooks put them into vLLM's encoder cache instead of encoding the
    item again): each handed out once, dropped when the request is forgotten, and none kept
    beyond the byte budget."""
    core, (runner,), encodes = engine(1)
    sched = core.scheduler
    holds = engine_holds.attach(core)
    a, b = _request("a", "A"), _request("b", "B")
    _arrive(sched, holds, a, b)
    engine_holds.schedule_holding(sched, Scheduler.schedule)
    assert sorted(encodes) == [(0, "a"), (0, "b")]
    worker = ahead.side_worker(runner)
    want = _outputs("A")
    for ident in ("A-v", "A-i"):
        got = worker.encoded_output(ident)
        assert got is not None and torch.equal(got, want[ident]), ident
        assert worker.encoded_output(ident) is None  # handed out once
    assert worker.stats["encoded_reused"] == 2
    worker.forget(["b"])  # finished before its step: its outputs are dropped
    assert worker.encoded_output("B-v") is None and worker.encoded_output("B-i") is None
    _schedule_until(sched, ["a", "b"])
    # over the budget: nothing is kept, the step encodes as before
    worker.keep_encoded_bytes = 100
    c = _request("c", "C")
    _arrive(sched, holds, c)
    engine_holds.schedule_holding(sched, Scheduler.schedule)
    assert (0, "c") in encodes
    assert worker.encoded_output("C-v") is None and worker.encoded_output("C-i") is None


def test_side_threads_take_turns_least_counted_work_first():
    """Turns (scores ahead, several side threads): once a job with less counted work has
    started, a longer job computes at most the iteration it was in, then waits for it."""
    import threading
    import time

    from videoanchor.integrations.vllm.worker_queue import Turns, counted_work

    assert counted_work(100, 64, SimpleNamespace(ssc_solver="auto", max_iter=10**4)) < (
        counted_work(100, 64, SimpleNamespace(ssc_solver="faithful", max_iter=1000))
    )
    turns, log = Turns(), []
    long_token = turns.enter(1000)
    started = threading.Event()

    def long_job():
        for _ in range(60):
            turns.wait_turn(long_token)
            log.append("L")
            started.set()
            time.sleep(0.002)
        turns.leave(long_token)

    thread = threading.Thread(target=long_job)
    thread.start()
    assert started.wait(10)
    short = turns.enter(10)
    for _ in range(10):
        turns.wait_turn(short)
        log.append("S")
        time.sleep(0.002)
    turns.leave(short)
    thread.join(30)
    first, last = log.index("S"), len(log) - 1 - log[::-1].index("S")
    assert log[first : last + 1].count("L") <= 1, log
    assert log.count("L") == 60 and log.count("S") == 10


def test_taking_turns_does_not_change_the_scores(one_thread):
    from videoanchor.anchor import compute_anchor_scores
    from videoanchor.integrations.vllm.worker_queue import Turns, _Yielding

    x = torch.randn(40, 12, generator=torch.Generator().manual_seed(3))
    turns = Turns()
    token = turns.enter(1)
    waited = compute_anchor_scores(x, 3, progress=_Yielding(turns, token))
    turns.leave(token)
    plain = compute_anchor_scores(x, 3, progress=False)
    assert torch.equal(waited.scores, plain.scores) and torch.equal(waited.coef, plain.coef)


@pytest.mark.parametrize(
    ("options", "device", "solver"),
    [({"n_clusters": 3}, "cpu", "workset"),  # the plugin's defaults on the CPU
     (OPTIONS, "cpu", "fast"),  # max_iter set: "auto" keeps the fast solver
     (None, "cpu", None),  # not anchored: nothing runs
     ({"n_clusters": 3}, "meta", None)],  # a failing warm-up: logged, not raised
)  # fmt: skip
def test_warm_up_runs_the_engines_own_solver_once(options, device, solver, caplog):
    """scoring.warm_up (each worker, at an anchored engine's start): one SSC with the
    engine's options on the runner's device; the solver that ran is kept on the runner."""
    from videoanchor.integrations.vllm import scoring

    extra = {} if options is None else {"videoanchor": options}
    runner = SimpleNamespace(vllm_config=SimpleNamespace(additional_config=extra),
                             device=torch.device(device))  # fmt: skip
    with caplog.at_level("INFO", logger="videoanchor.vllm"):
        assert scoring.warm_up(SimpleNamespace(model_runner=runner)) == solver
    assert runner.__dict__.get("_videoanchor_warmed") == solver
    logged = [r.getMessage() for r in caplog.records]
    if solver is not None:
        assert any(f"SSC warmed up before the first request ({solver} solver" in m for m in logged)
    elif options is not None:
        assert any("the SSC warm-up at start-up failed" in m for m in logged), logged
    else:
        assert not logged


def test_a_long_video_takes_the_blocks_with_the_engines_defaults(monkeypatch):
    """Past the exact limit (lowered here below the request's 13 visual tokens) the plugin's
    default options (only n_clusters set) run the working sets by blocks (issue 99) in the
    request's step, as compute_anchor_scores does with them: certified, blocked mode, the
    same gates; the run's record says so."""
    from videoanchor.anchor import plan as plan_mod
    from videoanchor.integrations.vllm import scoring

    monkeypatch.setattr(plan_mod, "EXACT_MAX_TOKENS", 8)
    given = {"videoanchor": {"n_clusters": 3}}
    eng = engine_config(given)
    outs = _outputs("long")
    feats = torch.cat([outs["long-v"], outs["long-i"]])  # prompt order
    want = compute_anchor_scores(feats, clusters_for(feats.shape[0], eng), **ssc_kwargs(eng))
    assert (want.mode, want.solver) == ("blocked", "workset") and want.coef.is_sparse
    scores = torch.zeros(PROMPT)
    scores[torch.tensor([*range(3, 11), *range(12, 17)])] = want.scores.float()
    bias, scale = anchor_gates(scores, eng.alpha_k, eng.alpha_v)

    def encoder(req_id, indices):
        items = _features("long")
        return [outs[items[i].identifier] for i in indices]

    scoring.reset_runs()
    with state.isolated():
        req = Scheduled("r-long", 0, PROMPT, PROMPT, _features("long"), None)
        fill_step(1, eng, {}, [req], None, encoder, PROMPT, 1, cache=None)
        torch.testing.assert_close(state.STEP.key_bias[:PROMPT], bias, rtol=0, atol=1e-6)
        torch.testing.assert_close(state.STEP.value_scale[:PROMPT], scale, rtol=0, atol=1e-6)
    (run,) = scoring.runs().values()
    scoring.reset_runs()
    assert (run.req_id, run.solver, run.mode, run.converged) == ("r-long", "workset",
                                                                  "blocked", True)  # fmt: skip
    assert run.cluster_share == "steady"
