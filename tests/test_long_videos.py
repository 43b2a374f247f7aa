"""Long runs as a user lives them: SSC non-convergence and the time budget reported by the
integration (inside generate / forward), on a tiny random-weight model."""

import warnings

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
    handle, seen = _prefill(model, max_iter=3, eps=1e-12, ssc_progress=False)
    res, run = handle.last_result[0], handle.last_ssc_runs[0]
    assert not res.converged and res.iterations == 3
    assert len(seen) == 1
    msg = str(seen[0].message)
    assert "max_iter=3" in msg and f"residual {res.residual:.3g} vs eps 1e-12" in msg
    assert "NOT converged" in msg
    assert not run.converged and run.iterations == 3 and not run.stopped_by_budget


def test_time_budget_is_reported_as_not_the_paper_answer(model):
    handle, seen = _prefill(model, max_iter=500, eps=1e-12, ssc_time_budget=1e-9,
                            ssc_progress=False)  # fmt: skip
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


@pytest.fixture(scope="module")
def cli_files(tmp_path_factory):
    from test_cli_support import moving_shapes, save_tiny_checkpoint

    from videoanchor.video import write_video

    root = tmp_path_factory.mktemp("long_cli")
    save_tiny_checkpoint("qwen2_5_vl", root / "model")
    write_video(root / "v.mp4", moving_shapes(12, 64, 96), fps=10)
    return root


@pytest.fixture
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls on a loaded 2-core machine (see test_cli.py)
    yield
    torch.set_num_threads(n)


def _cli(root, *extra):
    return ["--model", str(root / "model"), "--trust-remote-code", "--video",
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
    assert "SSC plan: " in err and "dense exact" in err and "iteration limit 12" in err
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
        pretrained=str(cli_files / "model"), trust_remote_code=True, device="cpu",
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
        VideoAnchorLMMCore(pretrained=str(cli_files / "model"), trust_remote_code=True,
                           device="cpu", ssc_time_budget=-1)  # fmt: skip
