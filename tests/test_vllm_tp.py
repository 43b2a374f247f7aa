"""Scores ahead of the step with tensor parallel 2 on vLLM's CPU backend (gloo): each
request's SSC runs on one rank (chosen by its score key) and the engine core relays its
scores to the other, instead of every rank repeating it; with ``scores_ahead_split`` it runs
on both ranks together, its columns split over them. The answers equal the same engine with
one worker. Skipped where vllm is not importable (see tests/test_vllm.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import vllm_support as vs

_PROBLEM = vs.vllm_problem()

pytestmark = pytest.mark.skipif(_PROBLEM is not None, reason=_PROBLEM or "")

HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("vllm_tp")
    ckpt = tmp / "ckpt"
    vs.save_checkpoint(ckpt)
    out = {}
    runs = (
        (1, ["1"]),
        (2, ["2"]),
        ("split", ["2", "split"]),
        ("split, vLLM's defaults", ["2", "split", "defaults"]),
    )
    for name, args in runs:
        path = tmp / f"tp{str(name).replace(' ', '_').replace(',', '')}.json"
        # the last: the engine core in its own process and prefix caching on (vLLM's defaults)
        env = vs.worker_env(extra=vs.ENGINE_CORE_PROCESS if "defaults" in args else None)
        proc = subprocess.run(
            [sys.executable, str(HERE / "vllm_tp_worker.py"), str(ckpt), args[0], str(path),
             *args[1:]],
            env=env, capture_output=True, text=True, timeout=900,
        )  # fmt: skip
        assert proc.returncode == 0 and path.exists(), proc.stderr[-4000:]
        out[name] = json.loads(path.read_text())
    return out


def test_tensor_parallel_2_answers_as_one_worker(runs):
    one, two = runs[1]["results"], runs[2]["results"]
    assert len(one) == len(two) == 5
    for a, b in zip(one, two, strict=True):
        assert a["tokens"] == b["tokens"], (a, b)
        assert max(abs(x - y) for x, y in zip(a["logprobs"], b["logprobs"], strict=True)) <= 1e-4
    assert one[0]["tokens"] == one[4]["tokens"]  # the repeat


def test_tensor_parallel_2_scores_each_video_once_across_ranks(runs):
    """Four different videos: each scored on exactly one rank and relayed to the other. The
    repeat runs no SSC on either rank: the rank that owns its key finds it in its score
    cache and relays it to the other (a rank never skips on its own cache alone: the items'
    encoder runs collectives, so both ranks must decide alike)."""
    stats = sorted(runs[2]["stats"], key=lambda s: s["rank"])
    assert [s["rank"] for s in stats] == [0, 1] and all(s["world"] == 2 for s in stats)
    assert sum(s["computed"] for s in stats) == 4, stats
    assert sum(s["relayed"] for s in stats) == 4 + 1, stats
    assert sorted(s["computed"] + s["relayed"] for s in stats) == [4, 5], stats
    (single,) = runs[1]["stats"]
    # each of the four videos' prefill took the encoder output made ahead, on every rank
    assert single == {
        "rank": 0,
        "world": 1,
        "computed": 4,
        "relayed": 0,
        "encoded_reused": 4,
        "split": 0,
    }
    assert [s["encoded_reused"] for s in stats] == [4, 4], stats


def test_split_over_the_ranks_answers_as_one_worker(runs):
    """``scores_ahead_split``: every video's SSC runs on both ranks together, its columns
    split over a gloo group of the workers. The scores equal one worker's (within 1e-4 of the
    largest), both ranks hold the same ones bit for bit, and the answers are one worker's."""
    one, split = runs[1], runs["split"]
    assert len(split["results"]) == 5
    for a, b in zip(one["results"], split["results"], strict=True):
        assert a["tokens"] == b["tokens"], (a, b)
        assert max(abs(x - y) for x, y in zip(a["logprobs"], b["logprobs"], strict=True)) <= 1e-4
    (single,) = one["scores"]
    assert len(single) == 4
    for ranked in split["scores"]:
        assert sorted(ranked) == sorted(single)
        for key, ref in single.items():
            got = ranked[key]
            scale = max(abs(v) for v in ref)
            assert max(abs(x - y) for x, y in zip(got, ref, strict=True)) <= 1e-4 * scale, key
    first, second = split["scores"]
    assert first == second  # the same scores on every rank, bit for bit


def test_split_over_the_ranks_runs_each_video_once_on_every_rank(runs):
    """Four videos, each split once over both ranks; the repeat is in both ranks' score
    caches, so no SSC runs for it; nothing is relayed."""
    stats = sorted(runs["split"]["stats"], key=lambda s: s["rank"])
    assert [s["rank"] for s in stats] == [0, 1] and all(s["world"] == 2 for s in stats)
    assert [s["split"] for s in stats] == [4, 4], stats
    assert [s["computed"] for s in stats] == [0, 0], stats
    assert [s["relayed"] for s in stats] == [0, 0], stats
    assert [s["encoded_reused"] for s in stats] == [4, 4], stats
    # without the option, no job is split
    assert all(s["split"] == 0 for s in runs[2]["stats"])


def test_split_with_vllms_default_process_layout_and_prefix_caching(runs):
    """The split with the engine core in its own process and prefix caching on: the same
    answers and scores as one worker; each video split once, the repeat (a prefix-cache hit
    too) from the score caches."""
    one, split = runs[1], runs["split, vLLM's defaults"]
    for a, b in zip(one["results"], split["results"], strict=True):
        assert a["tokens"] == b["tokens"], (a, b)
        assert max(abs(x - y) for x, y in zip(a["logprobs"], b["logprobs"], strict=True)) <= 1e-4
    first, second = split["scores"]
    assert first == second and sorted(first) == sorted(one["scores"][0])
    stats = sorted(split["stats"], key=lambda s: s["rank"])
    assert [s["split"] for s in stats] == [4, 4], stats
    assert [s["relayed"] for s in stats] == [0, 0], stats
