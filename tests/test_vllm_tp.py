"""Scores ahead of the step with tensor parallel 2 on vLLM's CPU backend (gloo): each
request's SSC runs on one rank (chosen by its score key) and the engine core relays its
scores to the other, instead of every rank repeating it. The answers equal the same engine
with one worker. Skipped where vllm is not importable (see tests/test_vllm.py)."""

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
    for tp in (1, 2):
        path = tmp / f"tp{tp}.json"
        proc = subprocess.run(
            [sys.executable, str(HERE / "vllm_tp_worker.py"), str(ckpt), str(tp), str(path)],
            env=vs.worker_env(), capture_output=True, text=True, timeout=900,
        )  # fmt: skip
        assert proc.returncode == 0 and path.exists(), proc.stderr[-4000:]
        out[tp] = json.loads(path.read_text())
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
    assert single == {"rank": 0, "world": 1, "computed": 4, "relayed": 0, "encoded_reused": 4}
    assert [s["encoded_reused"] for s in stats] == [4, 4], stats
