"""`videoanchor tune` and the cache under it, on CPU: a tiny random Qwen2.5-VL checkpoint, videos
the test encodes itself and a local JSONL dev set."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision_shim  # noqa: F401  (conftest applies it; imported for the saved processor)
from test_cli_support import direct_inputs, moving_shapes, save_tiny_checkpoint

import videoanchor
import videoanchor.anchor.scores as scores_mod
import videoanchor.tune as tune_mod
from videoanchor.anchor import (
    anchor_result_from_coefficients,
    compute_anchor_scores,
    ssc_coefficients,
)
from videoanchor.cli import main
from videoanchor.integrations.transformers.cache import AnchorCache, repeat_prompt
from videoanchor.tune import (
    TuneError,
    bootstrap_delta,
    load_items,
    mean_relative_accuracy,
    multiple_choice_correct,
    parse_grid,
)
from videoanchor.video import write_video

FAMILY = "qwen2_5_vl"
ITEMS = 3
GRID = ["--alpha-k", "0,9.5", "--alpha-v", "0,2.5", "--n-clusters", "3,4"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("tune")
    model = root / "model"
    save_tiny_checkpoint(FAMILY, model)
    data = root / "data"
    data.mkdir()
    with open(data / "dev.jsonl", "w") as f:
        for i in range(ITEMS):
            write_video(data / f"v{i}.mp4", moving_shapes(10, 64, 96, seed=i), fps=10)
            # options are characters the tiny model writes, so that some answers score
            item = {"video": f"v{i}.mp4", "question": "Which?", "answer": "abc"[i],
                    "options": ["s", "q", "x"], "id": f"item{i}"}  # fmt: skip
            f.write(json.dumps(item) + "\n")
    return {"root": root, "model": model, "data": data / "dev.jsonl"}


def _tune(setup, out, *extra):
    argv = ["tune", "--model", str(setup["model"]), "--trust-remote-code", "--data",
            str(setup["data"]), "--frames", "4", "--max-new-tokens", "3", "--bootstrap", "200",
            "--out", str(out), "--quiet", *GRID, *extra]  # fmt: skip
    return main(argv)


def _Counter(fn):
    """``fn`` wrapped in a function (so it binds as a method) that counts its calls."""

    def counted(*a, **k):
        counted.calls += 1
        return fn(*a, **k)

    counted.calls = 0
    return counted


def _count(monkeypatch):
    from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as q

    counters = {
        "vision": _Counter(q.Qwen2_5_VisionTransformerPretrainedModel.forward),
        "ssc": _Counter(scores_mod.solve),
        "labels": _Counter(scores_mod.cluster),
    }
    monkeypatch.setattr(q.Qwen2_5_VisionTransformerPretrainedModel, "forward", counters["vision"])
    monkeypatch.setattr(scores_mod, "solve", counters["ssc"])
    monkeypatch.setattr(scores_mod, "cluster", counters["labels"])
    return counters


def _answers(out):
    lines = (Path(out) / "answers.jsonl").read_text().splitlines()[1:]
    return {(r["item"], r["setting"]): r["answer"] for r in map(json.loads, lines)}


def test_vision_and_ssc_run_once_per_item_and_cache_gives_same_answers(
    setup, tmp_path, monkeypatch
):
    counters = _count(monkeypatch)
    assert _tune(setup, tmp_path / "nocache", "--no-cache") == 0
    # 8 settings + the baseline per item, yet one vision pass and one SSC per item, and the
    # labels once per item and cluster count
    assert counters["vision"].calls == ITEMS
    assert counters["ssc"].calls == ITEMS
    assert counters["labels"].calls == ITEMS * 2
    rows = json.loads((tmp_path / "nocache" / "results.json").read_text())
    assert len(rows) == 8
    assert {(r["alpha_k"], r["alpha_v"], r["n_clusters"]) for r in rows} == {
        (a, b, k) for a in (0.0, 9.5) for b in (0.0, 2.5) for k in (3, 4)
    }
    for r in rows:
        assert r["ci_low"] <= r["delta"] <= r["ci_high"]
        assert 0.0 <= r["accuracy"] <= 1.0
    assert (tmp_path / "nocache" / "heatmap_k3.png").exists()
    assert (tmp_path / "nocache" / "heatmap_k4.png").exists()

    cache = tmp_path / "cache"
    for c in counters.values():
        c.calls = 0
    assert _tune(setup, tmp_path / "cold", "--cache-dir", str(cache)) == 0
    assert (counters["vision"].calls, counters["ssc"].calls) == (ITEMS, ITEMS)
    for c in counters.values():
        c.calls = 0
    assert _tune(setup, tmp_path / "warm", "--cache-dir", str(cache)) == 0
    # nothing recomputed on a re-run: the vision tower, SSC and the labels come from disk
    assert [c.calls for c in counters.values()] == [0, 0, 0]
    ref = _answers(tmp_path / "nocache")
    assert _answers(tmp_path / "cold") == ref
    assert _answers(tmp_path / "warm") == ref
    assert json.loads((tmp_path / "warm" / "results.json").read_text()) == rows
    summary = json.loads((tmp_path / "warm" / "summary.json").read_text())
    assert summary["cache"]["vision_hits"] == ITEMS and "vision_misses" not in summary["cache"]


def test_interrupt_then_resume_gives_the_uninterrupted_results(setup, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    assert _tune(setup, tmp_path / "full", "--cache-dir", str(cache)) == 0
    # Ctrl-C once the part run has written 4 of its 27 answers: the KeyboardInterrupt that
    # SIGINT's default handler raises in the main thread, raised here by the 4th answer's
    # write (a thread polling the file raced the run: the cached answers can all be written
    # before it looks; _thread.interrupt_main does nothing where SIGINT is ignored, as in
    # pytest-xdist's workers)
    part = tmp_path / "part"
    add = tune_mod._Answers.add

    def add_then_ctrl_c(self, *args, **kwargs):
        add(self, *args, **kwargs)
        if self.path.parent == part and len(self.done) == 4:
            raise KeyboardInterrupt

    monkeypatch.setattr(tune_mod._Answers, "add", add_then_ctrl_c)
    code = _tune(setup, part, "--cache-dir", str(cache), "--batch-size", "2")
    monkeypatch.setattr(tune_mod._Answers, "add", add)
    assert code == 130
    partial = json.loads((tmp_path / "part" / "results.json").read_text())
    assert len(partial) < 8
    kept = _answers(tmp_path / "part")
    assert 4 <= len(kept) < 27  # the finished answers are on disk, not all of them
    # without --resume the earlier answers are not overwritten
    assert _tune(setup, tmp_path / "part", "--cache-dir", str(cache)) == 1
    assert _answers(tmp_path / "part") == kept
    assert _tune(setup, tmp_path / "part", "--cache-dir", str(cache), "--resume") == 0
    full = json.loads((tmp_path / "full" / "results.json").read_text())
    assert json.loads((tmp_path / "part" / "results.json").read_text()) == full


def test_holdout_reports_the_chosen_settings_gain(setup, tmp_path):
    assert _tune(setup, tmp_path / "h", "--holdout", "0.34", "--no-cache") == 0
    summary = json.loads((tmp_path / "h" / "summary.json").read_text())
    assert summary["items"] == ITEMS - 1
    h = summary["holdout"]
    best = summary["best"]
    assert h["n_items"] == 1
    assert (h["alpha_k"], h["alpha_v"], h["n_clusters"]) == (
        best["alpha_k"], best["alpha_v"], best["n_clusters"])  # fmt: skip
    assert "videoanchor.configure(model" in summary["usage"][1]


def test_batched_settings_equal_separate_runs_and_cached_features_equal_pixels(setup):
    video = setup["data"].parent / "v0.mp4"
    model, processor, handle, inputs = direct_inputs(setup["model"], video, "Which?", 4,
                                                     n_clusters=4)  # fmt: skip
    with torch.inference_mode():
        ref = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    ref_scores = handle.last_scores.clone()
    cache = AnchorCache(None)
    handle.cache = cache
    enc = cache.encode(model, inputs)
    assert "mm_encoder_outputs" in enc and "pixel_values_videos" not in enc
    with torch.inference_mode():
        out = model.generate(**enc, max_new_tokens=4, do_sample=False)
    assert torch.equal(out, ref)
    assert torch.equal(handle.last_scores, ref_scores)
    rows = [(9.5, 2.5, 4), (0.0, 0.0, 4), (2.0, 1.0, 3)]
    with handle.per_row(rows), torch.inference_mode():
        logits = model(**repeat_prompt(enc, 3)).logits[:, -1]
    for b, (ak, av, k) in enumerate(rows):
        videoanchor.configure(model, alpha_k=ak, alpha_v=av, n_clusters=k)
        with torch.inference_mode():
            one = model(**enc).logits[0, -1]
        torch.testing.assert_close(logits[b], one, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="expected alpha_k >= -1"):
        handle.per_row([(-2.0, 0.0, 4)])


def test_cache_ssc_mode_exact_shares_autos_entries_and_blocked_has_none(tmp_path):
    """The cache keeps exact mode's dense C: ssc_mode "exact" runs what "auto" does on few
    tokens, under the same key; "blocked" (the authors' iteration by column blocks, another
    answer) is refused rather than answered from, or stored as, an exact entry."""
    AnchorConfig = videoanchor.integrations.transformers.AnchorConfig  # noqa: N806
    feats = torch.randn(24, 6, generator=torch.Generator().manual_seed(2))
    cache = AnchorCache(tmp_path / "c")
    auto, exact = AnchorConfig(), AnchorConfig(ssc_mode="exact")
    assert cache.ssc_key(feats, exact) == cache.ssc_key(feats, auto)
    first = cache.anchor_result(feats, 3, exact)
    assert torch.equal(first.scores, compute_anchor_scores(feats, 3, mode="exact").scores)
    again = cache.anchor_result(feats, 3, auto)
    assert cache.stats["ssc_hits"] == 1 and torch.equal(again.scores, first.scores)
    blocked = AnchorConfig(ssc_mode="blocked")
    for ask in (lambda: cache.ssc_key(feats, blocked),
                lambda: cache.anchor_result(feats, 3, blocked)):  # fmt: skip
        with pytest.raises(ValueError, match="expected ssc_mode 'auto' or 'exact', got 'blocked'"):
            ask()
    assert cache.stats["ssc_misses"] == 1 and cache.stats["ssc_hits"] == 1


def test_ssc_split_equals_compute_anchor_scores():
    x = torch.randn(37, 6, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    c = ssc_coefficients(x)
    for k, draws in ((3, 1), (5, 3)):
        ref = compute_anchor_scores(x, k, mode="exact", seed=2, label_draws=draws)
        got = anchor_result_from_coefficients(c, k, seed=2, label_draws=draws)
        assert torch.equal(got.scores, ref.scores)
        assert torch.equal(got.labels, ref.labels)


def test_bootstrap_interval_is_paired_and_covers_a_known_difference():
    # Items differ a lot in difficulty (shared by both arms); the treatment adds 0.1.
    covered, widths_paired, widths_unpaired = 0, [], []
    for seed in range(40):
        rng = np.random.default_rng(seed)
        difficulty = rng.uniform(0, 1, 300)
        base = difficulty + rng.normal(0, 0.05, 300)
        treated = difficulty + 0.1 + rng.normal(0, 0.05, 300)
        delta, lo, hi = bootstrap_delta(treated, base, n_boot=500, seed=seed)
        assert lo <= delta <= hi
        covered += lo <= 0.1 <= hi
        widths_paired.append(hi - lo)
        # the same data with the pairs broken: a much wider interval
        _, lo2, hi2 = bootstrap_delta(treated, rng.permutation(base), n_boot=500, seed=seed)
        widths_unpaired.append(hi2 - lo2)
    assert covered >= 34  # nominal 95 % of 40
    assert np.mean(widths_paired) < 0.3 * np.mean(widths_unpaired)


def test_metrics():
    assert multiple_choice_correct("B. the red one", "B", ["a", "b", "c"]) == 1.0
    assert multiple_choice_correct("The answer is (C)", "B", ["a", "b", "c"]) == 0.0
    assert multiple_choice_correct("blue", "blue", ["red", "blue"]) == 1.0
    assert multiple_choice_correct("nothing", "A", ["red", "blue"]) == 0.0
    assert mean_relative_accuracy("10", 10.0) == 1.0
    assert mean_relative_accuracy("about 12 m", 10.0) == pytest.approx(
        0.6
    )  # rel 0.2 < 1-t for t<0.8
    assert mean_relative_accuracy("none", 10.0) == 0.0
    assert mean_relative_accuracy("30", 10.0) == 0.0


@pytest.mark.parametrize(
    "line, message",
    [
        ("{not json", "invalid JSON"),
        ('{"video": "v0.mp4", "answer": "a"}', "missing 'question'"),
        ('{"video": "nope.mp4", "question": "q", "answer": "a"}', "video file not found"),
        ('{"question": "q", "answer": "a"}', "exactly one of 'video'"),
        ("[1, 2]", "expected a JSON object"),
    ],
)
def test_malformed_lines_name_the_line(setup, tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    good = (setup["data"]).read_text().splitlines()[0].replace('"v0.mp4"', json.dumps(
        str(setup["data"].parent / "v0.mp4")))  # fmt: skip
    path.write_text(good + "\n" + line + "\n")
    with pytest.raises(TuneError, match=message) as err:
        load_items(path)
    assert f"{path}:2" in str(err.value)


def _cache_files(cache):
    return sorted(p.relative_to(cache) for p in Path(cache).rglob("*") if p.is_file())


def test_bad_input_is_one_line_and_leaves_the_cache(setup, tmp_path, capsys):
    cache = tmp_path / "cache"
    assert _tune(setup, tmp_path / "ok", "--cache-dir", str(cache)) == 0
    before = _cache_files(cache)
    assert before
    capsys.readouterr()
    bad_model = tmp_path / "gpt2"
    bad_model.mkdir()
    (bad_model / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    cases = [
        (["--data", str(tmp_path / "missing.jsonl")], "file not found"),
        (["--data", "no_such_task_xyz"], "lmms-eval"),
        (["--alpha-k", ""], "empty grid"),
        (["--alpha-v", "1,,2"], "empty entry"),
        (["--n-clusters", "0"], "positive cluster counts"),
        (["--alpha-k", "-3"], ">= -1"),
        (["--model", str(bad_model)], "not supported"),
        (["--holdout", "1.5"], "fraction in [0, 1)"),
    ]
    for extra, message in cases:
        assert _tune(setup, tmp_path / "bad", "--cache-dir", str(cache), *extra) == 1, extra
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, (extra, err)
        assert _cache_files(cache) == before
    assert not (tmp_path / "bad").exists()


def test_parse_grid():
    assert parse_grid("0, 2,4.5,2", "--alpha-k") == [0.0, 2.0, 4.5]
    assert parse_grid("16,24", "--n-clusters", int) == [16, 24]
    with pytest.raises(TuneError, match="expected int values"):
        parse_grid("16,2.5", "--n-clusters", int)


def test_second_run_and_anchors_skip_vision_and_ssc(setup, tmp_path, monkeypatch, capsys):
    counters = _count(monkeypatch)
    video = setup["data"].parent / "v1.mp4"
    common = ["--model", str(setup["model"]), "--trust-remote-code", "--video", str(video),
              "--frames", "4", "--n-clusters", "3", "--quiet", "--cache-dir", str(tmp_path / "c")]  # fmt: skip
    run = ["run", *common, "--question", "What?", "--max-new-tokens", "3"]
    assert main(run) == 0
    first = capsys.readouterr().out
    assert (counters["vision"].calls, counters["ssc"].calls) == (1, 1)
    assert main(run + ["--alpha-k", "2"]) == 0  # other alphas: still no vision pass nor SSC
    assert main(run) == 0
    assert capsys.readouterr().out.splitlines()[-1] == first.strip()
    assert (counters["vision"].calls, counters["ssc"].calls) == (1, 1)
    assert main(["anchors", *common, "--out", str(tmp_path / "a.png")]) == 0
    assert (counters["vision"].calls, counters["ssc"].calls) == (1, 1)
    assert main(["anchors", *[a for a in common if a != "--quiet"], "--quiet", "--no-cache",
                 "--out", str(tmp_path / "b.png")]) == 0  # fmt: skip
    assert (counters["vision"].calls, counters["ssc"].calls) == (2, 2)
    a, b = np.load(tmp_path / "a.npz"), np.load(tmp_path / "b.npz")
    np.testing.assert_array_equal(a["scores"], b["scores"])
    np.testing.assert_array_equal(a["grid_labels"], b["grid_labels"])


def test_lmms_scorer_reads_a_number_or_the_field_a_vsibench_style_task_adds():
    import types

    from videoanchor.tune import _LmmsScorer

    def vsi_like(doc, results):  # fills the document in, as VSI-Bench's process_results does
        doc["prediction"] = results[0]
        doc["MRA:.5:.95:.05"] = mean_relative_accuracy(results[0], float(doc["ground_truth"]))
        return {"vsibench_overall": doc}

    task = types.SimpleNamespace(config=types.SimpleNamespace(process_results=vsi_like))
    doc = {"question": "how many?", "ground_truth": "10"}
    score = _LmmsScorer(task, doc, "vsibench_overall", ["\n"], "t", 0)
    assert score("12\nmore") == pytest.approx(0.6)
    assert "prediction" not in doc  # the dataset's document is left as it was
    task.config.process_results = lambda doc, results: {"acc": "yes"}
    with pytest.raises(TuneError, match="expected a number per document"):
        _LmmsScorer(task, doc, "acc", [], "t", 0)("x")


def test_cache_memory_budget_evicts_to_disk_and_results_stay_equal(tmp_path, monkeypatch):
    counters = _count(monkeypatch)
    cfg = videoanchor.integrations.transformers.AnchorConfig()
    gen = torch.Generator().manual_seed(0)
    feats = [torch.randn(20, 5, generator=gen) for _ in range(3)]
    small = AnchorCache(tmp_path / "c", memory_bytes=1)  # keeps one entry in memory
    first = [small.anchor_result(f, 3, cfg) for f in feats]
    again = [small.anchor_result(f, 3, cfg) for f in feats]  # evicted: read back from disk
    assert counters["ssc"].calls == 3
    assert small.stats["ssc_hits"] == 3 and small.stats["labels_hits"] == 3
    for a, b, f in zip(first, again, feats, strict=True):
        assert torch.equal(a.scores, b.scores) and torch.equal(a.labels, b.labels)
        ref = compute_anchor_scores(f, 3, mode="exact")
        assert torch.equal(a.scores, ref.scores)


def test_cache_keys_the_ssc_by_the_fast_schedule(tmp_path, monkeypatch):
    """An entry stored under another schedule of the fast solver (before the continuation in
    lambda_z, say) is not hit: the schedule is in the SSC key, and the entry is stored and
    found under the key of the package's own schedule."""
    from videoanchor.anchor.solvers import admm_steps

    counters = _count(monkeypatch)
    cfg = videoanchor.integrations.transformers.AnchorConfig(ssc_solver="fast")
    feats = torch.randn(24, 6, generator=torch.Generator().manual_seed(1))
    feats[3] *= 1e-3  # a near-black token: the continuation is on
    cache = AnchorCache(tmp_path / "c")
    now = cache.anchor_result(feats, 3, cfg)
    assert counters["ssc"].calls == 1
    older = admm_steps.Schedule(continuation=0)  # the package at another schedule (a version)
    assert older != admm_steps.SCHEDULE
    key = cache.ssc_key(feats, cfg)
    assert key == cache.ssc_key(feats, cfg, schedule=admm_steps.SCHEDULE)
    assert cache.ssc_key(feats, cfg, schedule=older) != key
    stored = [p.stem for p in (tmp_path / "c").rglob("*.pt") if p.parent.parent.name == "ssc"]
    assert stored == [key]  # what anchor_result stored: under its schedule's key only
    assert torch.equal(
        now.scores, compute_anchor_scores(feats, 3, mode="exact", solver="fast").scores
    )
    calls = counters["ssc"].calls
    again = AnchorCache(tmp_path / "c").anchor_result(feats, 3, cfg)  # the disk entry
    assert counters["ssc"].calls == calls and torch.equal(again.coef, now.coef)
