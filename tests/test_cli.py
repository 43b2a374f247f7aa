"""The `videoanchor` command end to end on CPU: tiny random checkpoints saved to a temporary
directory (model, tokenizer, remote-code processor) and a video of moving shapes the test
encodes itself."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision_shim
from test_cli_support import direct_inputs, greedy_answer, moving_shapes, save_tiny_checkpoint

from videoanchor.cli import DEFAULT_FRAMES, build_parser, main
from videoanchor.video import write_video
from videoanchor.visualize import anchor_figure_layout

FRAMES = 8
REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    path = tmp_path_factory.mktemp("video") / "shapes.mp4"
    write_video(path, moving_shapes(20, 64, 96), fps=10)
    return path


_CHECKPOINTS = {}


def checkpoint(family, tmp_path_factory):
    if family not in _CHECKPOINTS:
        path = tmp_path_factory.mktemp(f"tiny_{family}")
        save_tiny_checkpoint(family, path)
        _CHECKPOINTS[family] = path
    return _CHECKPOINTS[family]


def _common(model, video, *extra):
    return ["--model", str(model), "--trust-remote-code", "--video", str(video),
            "--frames", str(FRAMES), "--n-clusters", "4", "--quiet", *extra]  # fmt: skip


def _direct(model_dir, video_path, question, **opts):
    return direct_inputs(model_dir, video_path, question, FRAMES, n_clusters=4, **opts)


@pytest.mark.parametrize("command", [None, "run", "anchors", "bench"])
def test_help_on_every_subcommand(command, capsys):
    argv = ["--help"] if command is None else [command, "--help"]
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "usage: videoanchor" in out
    if command in ("run", "anchors"):
        for flag in ("--model", "--video", "--images", "--frames", "--alpha-k", "--alpha-v"):
            assert flag in out
        assert "qwen2_5_vl" in out  # the supported families are listed
    if command == "run":
        assert "--compare" in out and "--question" in out
    if command == "bench":
        assert "--quick" in out


def test_parser_defaults_to_a_real_supported_model():
    args = build_parser().parse_args(["run", "--video", "x.mp4", "--question", "q"])
    assert args.model == "Qwen/Qwen2.5-VL-7B-Instruct"
    assert args.frames is None and DEFAULT_FRAMES == 16  # None: 16 for a video, --images refuse it
    assert args.alpha_k is None and args.alpha_v is None  # registry defaults
    assert args.label_draws == 1  # the paper's single label draw
    with pytest.raises(SystemExit):
        build_parser().parse_args(["run", "--video", "x.mp4", "--question", "q", "--frames", "0"])


def test_label_draws_flag_reaches_configure(monkeypatch):
    import videoanchor
    from videoanchor import cli

    args = build_parser().parse_args(
        ["run", "--video", "x", "--question", "q", "--label-draws", "4"]
    )
    seen = {}
    monkeypatch.setattr(videoanchor, "configure", lambda model, **kw: seen.update(kw))
    cli._configure(type("H", (), {"model": None})(), args, True)
    assert seen["label_draws"] == 4
    with pytest.raises(SystemExit):
        build_parser().parse_args(["run", "--video", "x", "--question", "q", "--label-draws", "0"])


def test_run_prints_the_anchored_answer(tmp_path_factory, video, capsys):
    model_dir = checkpoint("qwen2_5_vl", tmp_path_factory)
    argv = ["run", *_common(model_dir, video, "--alpha-k", "40", "--alpha-v", "6"),
            "--question", "what is the box doing?", "--max-new-tokens", "6"]  # fmt: skip
    assert main(argv) == 0
    answer = capsys.readouterr().out.rstrip("\n")

    model, processor, handle, inputs = _direct(
        model_dir, video, "what is the box doing?", alpha_k=40.0, alpha_v=6.0
    )
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    assert handle.last_anchored
    expected = processor.batch_decode(
        out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True
    )
    assert answer == expected[0].strip()
    assert answer  # something was generated


def test_run_compare_prints_both_answers_and_timings(tmp_path_factory, video, capsys):
    model_dir = checkpoint("qwen2_5_vl", tmp_path_factory)
    argv = ["run", *_common(model_dir, video, "--alpha-k", "40", "--alpha-v", "6"),
            "--question", "what is the box doing?", "--max-new-tokens", "6", "--compare"]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "anchored (alpha_k=40, alpha_v=6, n_clusters=4):" in out
    assert "baseline (plain attention):" in out
    table = out[out.index("prefill") :].splitlines()
    assert "of which SSC" in table[0] and "decode" in table[0]
    anchored = next(line for line in table if line.startswith("anchored"))
    baseline = next(line for line in table if line.startswith("baseline"))
    assert anchored.count(" s") == 3  # prefill, SSC, decode all measured
    assert baseline.split()[3] == "-"  # no SSC without anchoring

    # The baseline answer is the model's plain-attention answer.
    model, processor, handle, inputs = _direct(
        model_dir, video, "what is the box doing?", enabled=False
    )
    plain = greedy_answer(model, processor, inputs, 6)
    assert not handle.last_anchored
    lines = out.splitlines()
    got = lines[lines.index("baseline (plain attention):") + 1].strip()
    assert got == plain.splitlines()[0].strip()


@pytest.mark.parametrize(
    "family",
    ["qwen2_5_vl", "qwen2_vl", "qwen3_vl", "internvl", "llava_onevision", "llava_next_video"],
)
def test_anchors_writes_png_and_scores(family, tmp_path_factory, tmp_path, video, capsys):
    model_dir = checkpoint(family, tmp_path_factory)
    png = tmp_path / "out" / "anchors.png"
    assert (
        main(["anchors", *_common(model_dir, video), "--out", str(png), "--tile-width", "120"]) == 0
    )
    assert f"wrote {png}" in capsys.readouterr().out

    from PIL import Image

    with Image.open(png) as img:
        assert img.format == "PNG"
        size = img.size
    layout = anchor_figure_layout(FRAMES, 64, 96, tile_width=120, with_labels=True)
    assert size == layout.size

    data = np.load(png.with_suffix(".npz"))
    model, _, handle, inputs = _direct(model_dir, video, "Describe the video.")
    with torch.inference_mode():
        model(**inputs, use_cache=False)
    expected = handle.last_scores.float().numpy()
    assert data["scores"].shape == expected.shape
    np.testing.assert_allclose(data["scores"], expected, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(data["input_ids"], inputs["input_ids"].numpy())
    # The grid maps are the same scores, laid out on the model's token grid.
    tt, gh, gw = data["grid"]
    assert data["grid_scores"].shape == (tt, gh, gw) and tt <= FRAMES
    np.testing.assert_array_equal(
        data["grid_scores"].ravel(), data["scores"][0, data["grid_columns"]]
    )
    assert set(data["grid_columns"]) <= set(data["visual_positions"])
    assert data["scores"][0, data["visual_positions"]].max() > 0.5  # normalised: max near 1
    text = np.ones(data["scores"].shape[1], bool)
    text[data["visual_positions"]] = False
    assert (data["scores"][0, text] == 0).all()
    np.testing.assert_array_equal(data["frame_indices"], [0, 3, 5, 8, 11, 14, 16, 19])


def test_missing_video_is_one_line_and_nonzero(tmp_path, capsys):
    rc = main(["run", "--video", str(tmp_path / "nope.mp4"), "--question", "q", "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1
    assert "video file not found" in err[0] and "nope.mp4" in err[0]


def test_unreadable_video_is_one_line_and_nonzero(tmp_path_factory, tmp_path, capsys):
    junk = tmp_path / "broken.mp4"
    junk.write_bytes(b"\x00\x01not a video" * 100)
    model_dir = checkpoint("qwen2_5_vl", tmp_path_factory)
    rc = main(["anchors", *_common(model_dir, junk), "--out", str(tmp_path / "a.png")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1
    assert err[0].startswith("videoanchor anchors: error: cannot read video")


def test_unsupported_model_is_one_line_and_nonzero(tmp_path, video, capsys):
    from transformers import LlamaConfig

    LlamaConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                intermediate_size=32).save_pretrained(tmp_path)  # fmt: skip
    rc = main(["run", "--model", str(tmp_path), "--video", str(video), "--question", "q", "-q"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1
    assert "'llama' is not supported" in err[0] and "qwen2_5_vl" in err[0]


def test_unknown_model_path_is_one_line_and_nonzero(tmp_path, video, capsys):
    rc = main(["run", "--model", str(tmp_path / "missing"), "--video", str(video), "-q",
               "--question", "q"])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1 and "cannot load model" in err[0]


def test_console_script_exit_status(tmp_path):
    # The real process: `python -m videoanchor.cli` is what the console script calls.
    proc = subprocess.run(  # torchvision_shim: see tests/conftest.py
        torchvision_shim.python_m("videoanchor.cli", "run", "--video", str(tmp_path / "x.mp4"),
                                  "--question", "q"),
        capture_output=True, text=True, cwd=REPO, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        f"videoanchor run: error: video file not found: '{tmp_path / 'x.mp4'}'"
    ]
    assert proc.stdout == ""


def test_console_script_is_declared():
    text = (REPO / "pyproject.toml").read_text()
    assert 'videoanchor = "videoanchor.cli:main"' in text


_FAKE_BENCH = (
    "import argparse, json, pathlib\n"
    "ap = argparse.ArgumentParser(); ap.add_argument('--quick', action='store_true')\n"
    "ap.add_argument('--out-dir')\n"
    "a = ap.parse_args()\n"
    "pathlib.Path('written_here').write_text('relative')\n"  # where a relative path lands
    "rows = [{'provider': 'anchored', 'ms': 1.5 if a.quick else 9.0}]\n"
    "meta = {'device': 'cpu (test)', 'torch': 'x', 'git_sha': 'abc'}\n"
    "pathlib.Path(a.out_dir, 'fake_cpu.json').write_text(json.dumps({'meta': meta, 'rows': rows}))\n"
)


def _bench_folder(tmp_path, **scripts):
    bench = tmp_path / "benchmarks"
    bench.mkdir()
    for name, text in scripts.items():
        (bench / f"{name}.py").write_text(text)
    return bench


def test_bench_runs_the_user_set_in_quick_mode(tmp_path, capsys, monkeypatch):
    # A stand-in benchmarks/ folder: the command runs the user's set only (the research
    # studies by name), passes --quick and --out-dir only to scripts that accept them, runs
    # them in the results folder and summarises the JSON they write.
    bench = _bench_folder(
        tmp_path,
        bench_attention=_FAKE_BENCH,
        bench_scores="import sys; sys.exit(0)\n",
        bench_yaleb="raise SystemExit('a research study ran without --only')\n",
        bench_decode="raise SystemExit('a GPU benchmark ran without CUDA')\n",
        common="raise SystemExit('not a benchmark')\n",
    )
    monkeypatch.setattr("videoanchor.cli.bench_dir", lambda: bench)
    out_dir = tmp_path / "results"
    assert main(["bench", "--quick", "--out", str(out_dir)]) == 0
    out = capsys.readouterr().out
    assert (
        "bench_attention.py (--quick --out-dir" in out
        and "bench_scores.py (default settings)" in out
    )
    assert "bench_yaleb" not in out.split("== time per script")[1]
    if not torch.cuda.is_available():
        assert "No CUDA device" in out and "bench_decode.py: skipped: needs a CUDA device" in out
    assert json.loads((out_dir / "fake_cpu.json").read_text())["rows"][0]["ms"] == 1.5
    assert (out_dir / "written_here").exists() and not (bench / "written_here").exists()
    summary = out[out.index("== results in") :]
    assert "fake_cpu.json: cpu (test)" in summary and "anchored" in summary and "1.5" in summary
    # a research study by name
    assert main(["bench", "--only", "yaleb", "--out", str(out_dir)]) == 1
    assert "bench_yaleb.py (exit 1)" in capsys.readouterr().err


def test_bench_without_out_writes_to_a_printed_temporary_folder(tmp_path, capsys, monkeypatch):
    import tempfile

    bench = _bench_folder(tmp_path, bench_attention=_FAKE_BENCH)
    monkeypatch.setattr("videoanchor.cli.bench_dir", lambda: bench)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    monkeypatch.chdir(tmp_path)
    assert main(["bench", "--quick"]) == 0
    out = capsys.readouterr().out
    where = Path(re.search(r"^results go to (.+)$", out, re.M).group(1))
    assert where.parent == tmp_path / "tmp" and where.name.startswith("videoanchor-bench-")
    assert (where / "fake_cpu.json").exists() and out.rstrip().endswith(f"results in {where}")
    assert not (tmp_path / "videoanchor-bench").exists()


def test_bench_a_missing_extra_is_a_skip_line_not_a_traceback(tmp_path, capsys, monkeypatch):
    # as after a plain `pip install -e .`: a benchmark's import of PyAV fails in the child
    bench = _bench_folder(
        tmp_path,
        bench_attention="raise ModuleNotFoundError(\"No module named 'av'\", name='av')\n",
        bench_scores="print('ran')\n",
    )
    monkeypatch.setattr("videoanchor.cli.bench_dir", lambda: bench)
    assert main(["bench", "--quick", "--out", str(tmp_path / "r")]) == 0
    captured = capsys.readouterr()
    assert "Traceback" not in captured.out + captured.err
    line = 'bench_attention.py: skipped: needs the [video] extra (pip install -e ".[video]"'
    assert line in captured.out and "ran" in captured.out
    assert line in captured.out[captured.out.index("== skipped here") :]
    # a script failing for another reason still shows its traceback and fails the command
    (bench / "bench_scores.py").write_text("raise RuntimeError('broken')\n")
    assert main(["bench", "--quick", "--out", str(tmp_path / "r")]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "RuntimeError: broken" in err


def test_bench_reports_a_failing_script(tmp_path, capsys, monkeypatch):
    bench = _bench_folder(tmp_path, bench_attention="raise SystemExit(3)\n")
    monkeypatch.setattr("videoanchor.cli.bench_dir", lambda: bench)
    assert main(["bench", "--out", str(tmp_path / "r")]) == 1
    assert "bench_attention.py (exit 3)" in capsys.readouterr().err


def test_bench_only_without_a_match_lists_the_names(tmp_path, capsys, monkeypatch):
    bench = _bench_folder(tmp_path, bench_ssc="raise SystemExit(0)\n",
                          bench_attention="raise SystemExit(0)\n")  # fmt: skip
    monkeypatch.setattr("videoanchor.cli.bench_dir", lambda: bench)
    assert main(["bench", "--only", "nomatch", "--out", str(tmp_path / "r")]) == 1
    err = capsys.readouterr().err
    assert "--only nomatch" in err and "available: attention, ssc" in err


def test_bench_collects_what_the_scripts_skipped(tmp_path, capsys, monkeypatch):
    bench = _bench_folder(
        tmp_path,
        bench_attention="print('bench_attention: skipped: no CUDA device here. Nothing run.')\n",
        bench_scores="print('a result line')\n",
    )
    monkeypatch.setattr("videoanchor.cli.bench_dir", lambda: bench)
    assert main(["bench", "--quick", "--out", str(tmp_path / "r")]) == 0
    out = capsys.readouterr().out
    tail = out[out.index("== skipped here") :]
    assert "bench_attention.py: bench_attention: skipped: no CUDA device here" in tail
    assert "bench_scores.py: has no --quick; ran its default settings" in tail
    assert "a result line" not in tail and "== time per script" in out


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without CUDA")
@pytest.mark.parametrize("script", ["bench_paged.py", "bench_decode.py"])
def test_gpu_only_benchmarks_skip_cleanly_without_cuda(script):
    # the real scripts: exit 0 with a 'skipped:' line (issue 31: bench_paged exited 1)

    root = Path(__file__).resolve().parents[1]
    shim = (
        "import sys; sys.path.insert(0, 'tests'); import torchvision_shim; torchvision_shim.apply()"
    )
    code = f"{shim}; import runpy; sys.argv = ['{script}', '--quick']; runpy.run_path('benchmarks/{script}', run_name='__main__')"
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True,
                         timeout=300, env={**os.environ, "PYTHONPATH": str(root)})  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert f"{script[:-3]}: skipped: no CUDA device" in out.stdout


def test_median_spread_stays_within_the_samples():

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks.common import median_spread

    # three samples: the default "exclusive" quantiles gave p20 below the smallest sample
    times = [100.0, 1000.0, 120.0]
    med, p20, p80 = median_spread(times)
    assert med == 120.0 and min(times) <= p20 <= med <= p80 <= max(times)
    assert median_spread([5.0]) == (5.0, 5.0, 5.0)
    with pytest.raises(ValueError, match="at least one timing"):
        median_spread([])
