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
