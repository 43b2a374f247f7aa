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


def test_a_failing_provider_keeps_the_others_rows_written_after_each_round(tmp_path, monkeypatch):
    """Issue 98 item 3: the anchored provider's requests raise; plain's rows are complete,
    anchored's carry the error, and the file was rewritten after the warm-up and after the
    first of two rounds (what a time limit would leave)."""
    import copy

    from benchmarks import common

    real_use, seen = bench_request.use, []

    def use(model, provider, n_clusters, given=None):
        if provider == "anchored":
            raise RuntimeError("boom")
        return real_use(model, provider, n_clusters, given)

    def write(name, meta, rows, out_dir=None):
        seen.append(copy.deepcopy(rows))
        return common.write_result(name, meta, rows, out_dir)

    monkeypatch.setattr(bench_request, "use", use)
    monkeypatch.setattr(bench_request, "write_result", write)
    path = bench_request.main(
        ["--tiny", "--device", "cpu", "--frames", "4", "--tokens", "2", "--reps", "2",
         "--providers", "plain,anchored", "--out-dir", str(tmp_path)]
    )  # fmt: skip
    got = json.loads(path.read_text())
    assert got["meta"]["providers"] == ["plain", "anchored"]
    plain, anchored = got["rows"]
    assert plain["provider"] == "plain" and "error" not in plain
    assert plain["rounds"] == 2 and len(plain["totals_ms"]) == 2 and plain["vs_plain"] == 1.0
    assert anchored["provider"] == "anchored" and anchored["error"] == "RuntimeError: boom"
    assert anchored["rounds"] == 0 and "total_ms" not in anchored
    # written after the warm-up (no round), after round 1, then at the frame count's end
    assert [[r["rounds"] for r in rows] for rows in seen] == [[0, 0], [1, 0], [2, 0]]


def test_providers_are_checked():
    with pytest.raises(SystemExit):
        bench_request.main(["--tiny", "--providers", "plain,anchored_given"])
    with pytest.raises(SystemExit):
        bench_request.main(["--tiny", "--providers", "plain,fast"])


def test_a_model_that_cannot_be_built_leaves_a_file_that_says_so(tmp_path, monkeypatch):
    def build(*a, **k):
        raise MemoryError("no room")

    monkeypatch.setattr(bench_request, "build_model", build)
    path = bench_request.main(["--tiny", "--device", "cpu", "--frames", "4,8",
                               "--out-dir", str(tmp_path)])  # fmt: skip
    got = json.loads(path.read_text())
    assert got["meta"]["error"] == "building the model: MemoryError: no room"
    assert [(r["frames"], r["error"]) for r in got["rows"]] == [
        (4, got["meta"]["error"]),
        (8, got["meta"]["error"]),
    ]
