"""The engine-neutral step that scores one request (videoanchor/integrations/request_scores.py):
the SSC call both engines make and the one text said when it stops before eps. Engine-free
and cheap; the engines' own paths are in test_long_videos.py (transformers) and
test_vllm_limits.py (vLLM)."""

from __future__ import annotations

import logging
import warnings
from types import SimpleNamespace

import pytest
import torch

from videoanchor.anchor import compute_anchor_scores
from videoanchor.anchor.progress import SSCConvergenceWarning, SSCProgress
from videoanchor.integrations.options import AnchorConfig, ssc_kwargs
from videoanchor.integrations.request_scores import score_request, unconverged_message

X = torch.randn(24, 8, generator=torch.Generator().manual_seed(0))
LIMITED = AnchorConfig(n_clusters=3, ssc_solver="faithful", eps=1e-12, max_iter=5)


def _warned(**kw):
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        res, run = score_request(X, 3, **kw)
    return res, run, [str(w.message) for w in seen if w.category is SSCConvergenceWarning]


def test_the_call_is_compute_anchor_scores_with_the_config_s_options():
    res, _, said = _warned(options=AnchorConfig(n_clusters=3))
    ref = compute_anchor_scores(X, 3, **ssc_kwargs(AnchorConfig(n_clusters=3)), progress=False)
    assert torch.equal(res.scores, ref.scores) and torch.equal(res.labels, ref.labels)
    assert res.converged and not said


def test_an_unconverged_run_is_said_once_in_one_text():
    res, run, said = _warned(options=LIMITED, subject="request r-1")
    assert not res.converged and run.iterations == 5 and len(said) == 1
    assert said[0] == unconverged_message(res, LIMITED, run, subject="request r-1")
    assert said[0].startswith(
        "videoanchor: request r-1: SSC over 24 visual tokens (faithful solver, rho 300) reached "
        "its iteration limit, max_iter=5, after 5 iterations at residual "
    ), said[0]
    assert f"residual {res.residual:.3g} vs eps 1e-12: NOT converged" in said[0]
    assert said[0].endswith("; raise max_iter for the paper's answer"), said[0]


def test_a_time_budget_is_named_and_the_engine_chooses_where_the_text_goes():
    got = []
    budget = SSCProgress(enabled=False, time_budget=1e-9)
    res, run = score_request(X, 3, LIMITED, progress=budget, warn=got.append,
                             max_iter_setting="unused")  # fmt: skip
    assert run.stopped_by_budget and len(got) == 1
    assert f"was stopped by its time budget after {res.iterations} iterations" in got[0]
    assert "not from the paper's converged solution" in got[0]
    assert "raise ssc_time_budget (None: no budget)" in got[0] and "unused" not in got[0]


@pytest.mark.parametrize("engine", ["transformers", "vllm"])
def test_both_engines_say_the_same_words(engine, caplog):
    """transformers warns, vLLM logs naming the request: the same text but the subject and
    where max_iter is raised."""
    if engine == "transformers":
        from videoanchor.integrations.transformers.scoring import MAX_ITER_SETTING

        _, _, said = _warned(options=LIMITED, subject="sample 1", max_iter_setting=MAX_ITER_SETTING)
        (text,) = said
        subject = "sample 1"
    else:
        from videoanchor.integrations.vllm import scoring

        caplog.set_level(logging.WARNING, logger="videoanchor.vllm")
        req = SimpleNamespace(req_id="r-2", mm_features=[SimpleNamespace(modality="video")])
        scoring.run_ssc(req, LIMITED, [0], [torch.arange(24)], 24, 3,
                        lambda rid, idx: [X], None, "key-r-2")  # fmt: skip
        (text,) = [r.getMessage() for r in caplog.records if "NOT converged" in r.getMessage()]
        subject, MAX_ITER_SETTING = "request r-2", scoring.MAX_ITER_SETTING
    res = compute_anchor_scores(X, 3, **ssc_kwargs(LIMITED), progress=False)
    assert text == unconverged_message(res, LIMITED, subject=subject,
                                       max_iter_setting=MAX_ITER_SETTING)  # fmt: skip
