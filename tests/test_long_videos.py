"""Long runs as a user lives them: SSC non-convergence and the time budget reported by the
integration (inside generate / forward), on a tiny random-weight model."""

import re
import warnings
from pathlib import Path

import pytest
import torch

import videoanchor
from videoanchor.anchor.progress import SSCConvergenceWarning
from videoanchor.integrations.transformers.testing import tiny_inputs, tiny_model


@pytest.fixture(scope="module")
def model():
    return tiny_model("qwen2_5_vl", seed=3, attn_implementation="videoanchor_triton")


def _prefill(model, **opts):
    handle = videoanchor.configure(model, n_clusters=3, attention_backend="torch", **opts)
    inputs = tiny_inputs(model.config, videos=[[4]])
    with warnings.catch_warnings(record=True) as seen, torch.inference_mode():
        warnings.simplefilter("always")
        model(**inputs)
    return handle, [w for w in seen if issubclass(w.category, SSCConvergenceWarning)]


def test_iteration_limit_is_reported_with_the_residual(model):
    handle, seen = _prefill(
        model, max_iter=3, eps=1e-12, ssc_progress=False, ssc_solver="faithful"
    )  # (eps: the authors' stopping test)
    res, run = handle.last_result[0], handle.last_ssc_runs[0]
    assert not res.converged and res.iterations == 3
    assert len(seen) == 1
    msg = str(seen[0].message)
    assert "max_iter=3" in msg and f"residual {res.residual:.3g} vs eps 1e-12" in msg
    assert "NOT converged" in msg
    assert not run.converged and run.iterations == 3 and not run.stopped_by_budget


def test_time_budget_is_reported_as_not_the_paper_answer(model):
    handle, seen = _prefill(model, max_iter=500, eps=1e-12, ssc_time_budget=1e-9,
                            ssc_progress=False, ssc_solver="faithful")  # fmt: skip
    run = handle.last_ssc_runs[0]
    assert run.stopped_by_budget and run.iterations == 1
    assert len(seen) == 1 and "time budget" in str(seen[0].message)
    assert "not from the paper's converged solution" in str(seen[0].message)


def test_a_converged_run_warns_nothing(model):
    handle, seen = _prefill(model, max_iter=10000, eps=2e-4, ssc_time_budget=None)
    assert handle.last_result[0].converged and handle.last_ssc_runs[0].converged
    assert not seen


def test_bad_options(model):
    with pytest.raises(ValueError, match="ssc_progress"):
        videoanchor.configure(model, ssc_progress="loud")
    with pytest.raises(ValueError, match="time_budget"):
        videoanchor.configure(model, ssc_time_budget=-5)
    videoanchor.configure(model, ssc_progress="auto", ssc_time_budget=None)


# ---- the command line --------------------------------------------------------------------


MODEL = "tiny-qwen2_5_vl-random-weights"


@pytest.fixture(scope="module")
def cli_files(tmp_path_factory):
    from test_cli_support import moving_shapes, save_tiny_checkpoint

    from videoanchor.video import write_video

    root = tmp_path_factory.mktemp("long_cli")
    save_tiny_checkpoint("qwen2_5_vl", root / MODEL)
    write_video(root / "v.mp4", moving_shapes(12, 64, 96), fps=10)
    return root


def _cli(root, *extra):
    return ["--model", str(root / MODEL), "--trust-remote-code", "--video",
            str(root / "v.mp4"), "--frames", "4", "--n-clusters", "3", *extra]  # fmt: skip


def test_cli_anchors_reports_the_plan_progress_and_non_convergence(
    cli_files, tmp_path, capsys, one_thread
):
    import numpy as np

    from videoanchor.cli import main

    png = tmp_path / "a.png"
    assert main(["anchors", *_cli(cli_files, "--ssc-max-iter", "12"), "--out", str(png)]) == 0
    err = capsys.readouterr().err
    # stderr is not a terminal here: log lines, then the outcome
    assert "SSC plan: " in err and "the fast solver" in err and "iteration limit 12" in err
    assert "SSC solver: fast" in err  # what answered
    assert "SSC cost estimate: " in err and "/iteration measured over the first 10" in err
    assert "SSC: 1/12, residual" in err  # the first line; then one every 30 s
    assert "stopped at its iteration limit max_iter=12" in err and "NOT converged" in err
    data = np.load(png.with_suffix(".npz"))
    assert not bool(data["ssc_converged"]) and float(data["ssc_residual"]) > 2e-4
    assert float(data["ssc_eps"]) == 2e-4 and not bool(data["ssc_stopped_by_budget"])
    # --quiet: no progress, but the non-convergence is still said
    assert main(["anchors", *_cli(cli_files, "--ssc-max-iter", "3", "-q"), "--out", str(png)]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("videoanchor: warning: SSC (")
    assert "max_iter=3" in err[0]


def test_cli_time_budget_stops_and_says_it_is_not_the_paper_answer(
    cli_files, tmp_path, capsys, one_thread
):
    from videoanchor.cli import main

    argv = ["run", *_cli(cli_files, "--ssc-time-budget", "1e-9", "-q"), "--question", "q",
            "--max-new-tokens", "2"]  # fmt: skip
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "stopped by the time budget after 1 iterations" in err
    assert "not from the paper's converged solution" in err
    with pytest.raises(SystemExit):
        main(["run", *_cli(cli_files, "--ssc-time-budget", "0"), "--question", "q"])
    assert "expected a positive finite number" in capsys.readouterr().err


def test_lmms_eval_wrapper_reports_unconverged_requests(cli_files, one_thread):
    from types import SimpleNamespace

    from videoanchor.lmms_eval import VideoAnchorLMMCore

    lm = VideoAnchorLMMCore(
        pretrained=str(cli_files / MODEL), trust_remote_code=True, device="cpu",
        n_clusters=3, max_num_frames=4, ssc_max_iter=3, ssc_progress=False,
    )  # fmt: skip
    assert lm.handle.config.max_iter == 3 and lm.handle.config.ssc_progress is False
    lm.task_dict = {"toy": {"test": [{"v": str(cli_files / "v.mp4")}] * 2}}
    reqs = [
        SimpleNamespace(args=("q", {"max_new_tokens": 2}, lambda d: [d["v"]], i, "toy", "test"))
        for i in range(2)
    ]
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert len(lm.generate_until(reqs)) == 2
    texts = [str(w.message) for w in seen]
    assert not [w for w in seen if issubclass(w.category, SSCConvergenceWarning)]  # gathered
    assert sum("max_iter=3" in t and "further requests" in t for t in texts) == 1
    summary = [t for t in texts if "SSC stopped before eps on 2 of 2 requests" in t]
    assert len(summary) == 1 and "0 by the time budget, 2 at the iteration limit" in summary[0]
    assert lm.ssc_unconverged == 2
    with pytest.raises(ValueError, match="time_budget"):
        VideoAnchorLMMCore(pretrained=str(cli_files / MODEL), trust_remote_code=True,
                           device="cpu", ssc_time_budget=-1)  # fmt: skip


FIGURE = Path(__file__).resolve().parents[1] / "docs" / "figures" / "anchors-long-video.png"


def test_cli_long_video_picture_pages_and_the_readme_example(
    tmp_path, cli_files, capsys, one_thread, monkeypatch
):
    """32 frames of the tiny Qwen2.5-VL: the long layout (8 columns, summary strip, patches
    marked). With VIDEOANCHOR_UPDATE_FIGURES=1 the picture replaces docs/figures' example."""
    import os
    import shutil

    from PIL import Image
    from test_cli_support import moving_shapes

    from videoanchor.cli import main
    from videoanchor.video import write_video
    from videoanchor.visualize import MAX_HEIGHT

    video = tmp_path / "long.mp4"
    write_video(video, moving_shapes(48, 64, 96, seed=2), fps=8)
    monkeypatch.chdir(cli_files)  # the model's name in the picture's title: no temporary path
    common = ["--model", MODEL, "--trust-remote-code", "--video", str(video),
              "--frames", "32", "--n-clusters", "4", "--tile-width", "160", "-q"]  # fmt: skip
    png = tmp_path / "anchors.png"
    assert main(["anchors", *common, "--out", str(png)]) == 0
    out = capsys.readouterr().out
    assert f"wrote {png}" in out and "pages" not in out  # one page under 2400 px
    with Image.open(png) as img:
        width, height = img.size
    assert width == 12 + 8 * (160 + 12) and height <= MAX_HEIGHT
    if os.environ.get("VIDEOANCHOR_UPDATE_FIGURES") == "1":
        FIGURE.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(png, FIGURE)
    # a lower page height splits it into files, each with the full width
    assert main(["anchors", *common, "--out", str(png), "--page-height", "500"]) == 0
    out = capsys.readouterr().out
    names = sorted(p.name for p in tmp_path.glob("anchors*.png"))
    assert len(names) >= 3 and f"{len(names)} pages, also" in out
    for name in names:
        with Image.open(tmp_path / name) as img:
            assert img.size[0] == width and img.size[1] <= 500


# ---- issue 71: the entry points run the library's default solver -------------------------


def test_configure_with_its_defaults_runs_the_default_solver(monkeypatch, one_thread):
    """configure() with no SSC option set (a fresh model: configure keeps a previous call's
    values) runs what compute_anchor_scores runs with its defaults: the working sets on the
    CPU, the same scores; the handle reports the solver (last_result)."""
    from test_cli_support import assert_default_solver, record_ssc

    fresh = tiny_model("qwen2_5_vl", seed=3, attn_implementation="videoanchor_triton")
    handle = videoanchor.configure(fresh, n_clusters=3, attention_backend="torch")
    seen = record_ssc(monkeypatch)
    with torch.inference_mode():
        fresh(**tiny_inputs(fresh.config, videos=[[4]]))
    assert_default_solver(seen, handle.last_result, 3)


def test_cli_with_its_defaults_runs_the_default_solver(cli_files, tmp_path, capsys, monkeypatch,
                                                       one_thread):  # fmt: skip
    """The command line's defaults run the library's default solver; its plan line says so
    before the SSC runs, and the solver that answered is printed and saved."""
    from types import SimpleNamespace

    import numpy as np
    from test_cli_support import assert_default_solver, record_ssc

    from videoanchor.cli import main

    seen = record_ssc(monkeypatch)
    png = tmp_path / "a.png"
    args = ["anchors", *_cli(cli_files), "--cache-dir", str(tmp_path / "cache"), "--out", str(png)]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "SSC plan: " in err and "the working sets" in err and "iteration limit" not in err
    # the relative duality gap of the C the answer returned (float32: its rounding; issue 79)
    assert re.search(r"SSC solver: workset \(duality gap [0-9.e-]+\)", err), err
    data = np.load(png.with_suffix(".npz"))
    ran = SimpleNamespace(solver=str(data["ssc_solver"]),
                          scores=data["scores"][0][data["visual_positions"]])  # fmt: skip
    assert_default_solver(seen, [ran], 3)
