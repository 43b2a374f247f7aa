"""benchmarks/bench_request.py on the tiny model (CPU, a few seconds): every provider's
request runs, its parts add up to its total, the anchored requests are anchored (the given
one without an SSC of its own), and the file says what ran where."""

from __future__ import annotations

import json
import math

import pytest

from benchmarks import bench_request


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp("request")
    path = bench_request.main(
        ["--tiny", "--device", "cpu", "--frames", "4", "--tokens", "2,3", "--reps", "1",
         "--out-dir", str(out)]
    )  # fmt: skip
    return json.loads(path.read_text())


def test_rows_cover_every_provider_and_token_count(result):
    rows = result["rows"]
    assert {(r["new_tokens"], r["provider"]) for r in rows} == {
        (n, p) for n in (2, 3) for p in bench_request.PROVIDERS
    }
    for r in rows:
        parts = sum(r[k] for k in bench_request.PARTS)
        assert math.isclose(parts, r["total_ms"], rel_tol=1e-9, abs_tol=1e-6), r
        assert all(r[k] >= 0 for k in ("vision_ms", "scores_ms", "decode_ms")), r
        assert r["vision_ms"] > 0 and r["prefill_ms"] > 0, r
        assert len(r["totals_ms"]) == 1 and r["visual_tokens"] == 8
        plain = next(p for p in rows if p["provider"] == "plain"
                     and p["new_tokens"] == r["new_tokens"])  # fmt: skip
        assert math.isclose(r["vs_plain"], r["total_ms"] / plain["total_ms"])
    # The same request timed at its 2nd and 3rd token: one prompt, a longer decode.
    for p in bench_request.PROVIDERS:
        two, three = (next(r for r in rows if r["provider"] == p and r["new_tokens"] == n)
                      for n in (2, 3))  # fmt: skip
        assert two["prompt_ms"] == three["prompt_ms"] and three["decode_ms"] > two["decode_ms"]


def test_anchored_rows_say_how_they_were_scored(result):
    rows = {(r["provider"], r["new_tokens"]): r for r in result["rows"]}
    assert "anchored" not in rows["plain", 2]
    assert rows["anchored", 2]["anchored"] is True
    assert rows["anchored", 2]["ssc_iterations"] > 0
    given = rows["anchored_given", 2]
    assert given["anchored"] is True and given["given_scores_used"] is True


def test_meta_names_the_run(result):
    meta = result["meta"]
    for key in ("device", "torch", "transformers", "git_sha", "date", "model"):
        assert meta.get(key), key
    assert meta["model"] == "qwen2.5-vl-tiny" and meta["synchronised"] is False
