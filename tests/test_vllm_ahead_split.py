"""``scores_ahead_split``: the vote every rank takes before a split job
(``SplitVote.vote``, videoanchor/integrations/vllm/split_vote.py), on 2 CPU processes (gloo)
without vLLM. A job runs on every rank when any rank still wants it (a request forgotten on
one rank only), on none when no rank does; a rank whose encoder failed sends every rank's
request to its step, without any rank left waiting in the SSC's collectives; scores every
rank holds are taken from the caches; ranks whose jobs are out of step (voting on different
jobs) stop splitting on both, with no collective left to pair with another job's. The real
engine: tests/test_vllm_tp.py."""

import os
from concurrent.futures import Future

import torch
import torch.multiprocessing as mp
import torchvision_shim
from gloo_support import join_gloo, leave

# A spawned rank imports this module but not conftest.py: apply the test-only shim here too.
torchvision_shim.apply()

from test_vllm_ahead import OPTIONS, Runner, _features, _outputs  # noqa: E402

from videoanchor.anchor import compute_anchor_scores  # noqa: E402
from videoanchor.integrations.options import ssc_kwargs  # noqa: E402
from videoanchor.integrations.vllm import ahead  # noqa: E402
from videoanchor.integrations.vllm.config import engine_config  # noqa: E402
from videoanchor.integrations.vllm.scoring import SCORE_CACHES, plan, score_cache  # noqa: E402
from videoanchor.integrations.vllm.split_vote import communication_failed  # noqa: E402


def _split_jobs(rank):
    """Rank ``rank``'s side worker with split jobs over the default group, and ``job(tag)``:
    one split job of a tiny request (``wanted``: its key still recorded, as submit() does;
    ``encoded``: its encoder outputs, else None as after a failed encode)."""
    import torch.distributed as dist

    group = dist.group.WORLD
    runner = Runner(rank=rank, device=torch.device("cpu"),
                    vllm_config=SimpleConfig(), model_config=None)  # fmt: skip
    job_runner = ahead.Ahead(runner, 0, split=True, rank_world=(rank, 2), split_group=group)
    eng = engine_config({"videoanchor": OPTIONS})
    cache = score_cache(id(runner), runner.vllm_config.additional_config)

    def job(tag, *, wanted=True, encoded=True):
        features = _features(tag)
        p = plan(features, eng)
        outs = [_outputs(tag)[features[i].identifier] for i in p.items] if encoded else None
        if wanted:  # what submit() records; a forgotten request's key is gone
            job_runner.jobs[p.key] = Future()
        else:
            job_runner.jobs.pop(p.key, None)
        return job_runner._job(f"req-{tag}", features, eng, p, cache, outs, group)

    return runner, job_runner, job


def _vote_worker(rank, store, out):
    import torch.distributed as dist

    join_gloo(rank, 2, store)
    got = {}
    try:
        runner, job_runner, job = _split_jobs(rank)
        got["both"] = job("A")
        got["one_forgot"] = job("B", wanted=rank == 0)
        got["none_wants"] = job("C", wanted=False)
        got["one_failed"] = job("D", encoded=rank == 0)
        got["cached"] = job("A")
        # Out of step: rank 1 never runs job E (as if it had left it without voting). Rank 0's
        # vote on E meets rank 1's on F: both see that the ranks voted on different jobs, and
        # no later split job runs a collective (which could pair with another job's)
        got["desync"] = job("E") if rank == 0 else job("F")
        got["broken"] = job_runner.split_broken
        got["after"] = job("G")
        got["stats"] = dict(job_runner.stats)
        got["in_cache"] = sorted(k for k in SCORE_CACHES[id(runner)]._entries)
        job_runner.close()
    finally:
        torch.save(got, os.path.join(out, f"rank{rank}.pt"))
        dist.destroy_process_group()
    leave()


class SimpleConfig:
    additional_config = {"videoanchor": OPTIONS}


def _one_process(tag):
    eng = engine_config({"videoanchor": OPTIONS})
    features = _features(tag)
    p = plan(features, eng)
    feats = torch.cat([_outputs(tag)[features[i].identifier] for i in p.items])
    return compute_anchor_scores(feats, p.k, **ssc_kwargs(eng)).scores.float(), p.key


def test_split_jobs_agree_on_every_rank(tmp_path):
    mp.spawn(_vote_worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=2)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    for tag, name in (("A", "both"), ("B", "one_forgot")):
        ref, _ = _one_process(tag)
        assert r0[name] is not None and torch.equal(r0[name], r1[name]), name
        scale = float(ref.abs().max())
        assert float((r0[name] - ref).abs().max()) <= 1e-5 * scale, name
    for name in ("none_wants", "one_failed"):  # no SSC, no rank left waiting
        assert r0[name] is None and r1[name] is None, name
    assert torch.equal(r0["cached"], r0["both"]) and torch.equal(r1["cached"], r1["both"])
    assert r0["desync"] is None and r1["desync"] is None  # their steps score them
    assert r0["broken"] and r1["broken"]
    assert r0["after"] is None and r1["after"] is None  # no collective, nobody waiting
    # two SSCs ran, each on both ranks; the repeat came from the caches
    assert r0["stats"]["split"] == r1["stats"]["split"] == 2
    keys = sorted(_one_process(t)[1] for t in "AB")
    assert r0["in_cache"] == r1["in_cache"] == keys


def _gone_worker(rank, store, out):
    """Rank 1 leaves (its process ends) before voting; rank 0's vote fails on the group."""
    join_gloo(rank, 2, store, seconds=20)
    if rank == 1:
        leave()  # as if its worker died: no vote, no goodbye
    got = {}
    try:
        _, job_runner, job = _split_jobs(0)
        got["first"] = job("H")
        got["broken"] = job_runner.split_broken
        got["second"] = job("I")  # no collective: it returns at once
        got["stats"] = dict(job_runner.stats)
        job_runner.close()
    finally:
        torch.save(got, os.path.join(out, "rank0.pt"))
    leave()


def test_a_failed_group_stops_split_jobs(tmp_path):
    """A failure of the split group itself (here: the other rank's process is gone, which
    gloo reports as a plain RuntimeError) marks the split broken: the job goes to its step,
    and later split jobs run no collective."""
    mp.spawn(_gone_worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=2)
    r0 = torch.load(tmp_path / "rank0.pt")
    assert r0["first"] is None and r0["broken"]
    assert r0["second"] is None
    assert r0["stats"]["split"] == 0


def test_only_communication_failures_stop_splitting():
    """The solver's own errors reach every rank together (the ranks stay in step); a failed
    collective may not, and stops splitting."""
    import torch.distributed as dist

    gone = RuntimeError("[/x/third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection "
                        "closed by peer [127.0.0.1]:46978")  # fmt: skip
    assert communication_failed(gone)
    assert communication_failed(dist.DistNetworkError("timed out"))
    peer = RuntimeError(
        "videoanchor: another rank of the process group failed (see its error); every rank stops"
    )  # what raise_together raises on the others
    for err in (peer, ValueError("bad features"), MemoryError(), FloatingPointError("nan"),
                torch.linalg.LinAlgError("not positive definite")):  # fmt: skip
        assert not communication_failed(err), err
