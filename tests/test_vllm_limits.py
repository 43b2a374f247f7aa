"""What a client of the vLLM plugin may send and what the operator reads about it (issue 70),
without an engine (main CI): every refusal names the ``extra_args`` key and the expected
values, and is counted under that key; the ``tokens`` list is bounded by the operator before
any other work; every warning about a request names it; a request whose SSC stopped at its
iteration limit is warned as such, not as a static video. The same on the real OpenAI
server: tests/test_vllm_server.py."""

from __future__ import annotations

import logging
import time
import warnings
from types import SimpleNamespace

import pytest
import torch

from videoanchor.integrations.options import AnchorConfig
from videoanchor.integrations.vllm import metrics, scoring
from videoanchor.integrations.vllm.config import check_request, engine_policy, request_overrides

POLICY = engine_policy({"videoanchor": {"request_options": "all"}})


@pytest.mark.parametrize(
    "xargs,expected",
    [({"videoanchor_ssc_backend": "bogus"}, "expected one of ('auto', 'torch', 'cupy')"),
     ({"videoanchor_ssc_solver": "bogus", "videoanchor_alpha_k": 2.0}, "'workset'"),
     ({"videoanchor_ssc_precision": "x"}, "'fp16x3'"),
     ({"videoanchor_n_clusters": True}, "expected an int >= 1, got True"),
     ({"videoanchor_alpha_k": 1.0, "videoanchor_rho": False}, "expected a finite number")],
)  # fmt: skip
def test_a_bad_value_names_its_key_and_is_counted_under_it(xargs, expected):
    key = next(k for k in xargs if k != "videoanchor_alpha_k")
    with pytest.raises(ValueError) as err:
        request_overrides(xargs)
    text = str(err.value)
    assert text.startswith(f"extra_args[{key!r}]: ") and expected in text, text
    before = metrics.snapshot().get("videoanchor_requests_refused", [])
    metrics.refused(text)
    after = dict((tuple(k), v) for k, v in metrics.snapshot()["videoanchor_requests_refused"])
    assert after[(key,)] == dict((tuple(k), v) for k, v in before).get((key,), 0.0) + 1


def test_a_long_tokens_list_is_refused_before_any_other_work():
    """A 10**6-entry ``tokens`` list (the issue's: accepted after 10.5 s) is refused by the
    operator's limit (default 2 entries) at once; the limit is the operator's to raise."""
    huge = {"videoanchor_tokens": ["video"] * 10**6}
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match=r"extra_args\['videoanchor_tokens'\]: expected at "
                       r"most 2 entries .* got a list of 1000000 .*request_limits'\]\['tokens'\]"):  # fmt: skip
        check_request(POLICY, huge)
    assert time.perf_counter() - t0 < 0.05
    check_request(POLICY, {"videoanchor_tokens": ["video", "image"]})
    wide = engine_policy({"videoanchor": {"request_options": "all",
                                          "request_limits": {"tokens": 3}}})  # fmt: skip
    check_request(wide, {"videoanchor_tokens": ["video", "image", "video"]})
    for bad in (0, True, 2.0):
        with pytest.raises(ValueError, match=r"request_limits'\]\['tokens'\]: expected .* got"):
            engine_policy({"videoanchor": {"request_limits": {"tokens": bad}}})


def _features(*lengths):
    return [SimpleNamespace(modality="video", identifier=f"v{i}",
                            mm_position=SimpleNamespace(offset=10 * i, length=n, is_embed=None))
            for i, n in enumerate(lengths)]  # fmt: skip


def test_the_plans_warnings_name_the_request(caplog):
    caplog.set_level(logging.DEBUG, logger="videoanchor.vllm")
    cfg = AnchorConfig(n_clusters=24)
    assert scoring.plan(_features(2), cfg, "req-tiny") is None
    assert scoring.plan(_features(6), cfg, "req-few").k == 6
    assert scoring.plan(_features(6), cfg) is not None  # (ahead: the step warns)
    text = caplog.text
    assert "request req-tiny has only 2 visual tokens" in text, text
    assert "request req-few has 6 visual tokens, fewer than n_clusters=24" in text, text
    assert text.count("videoanchor: request") == 2, text


def test_a_request_stopped_at_its_iteration_limit_is_warned_as_such(caplog):
    """The authors' solver at rho 1e-6 stops at max_iter with flat row sums (all scores 0):
    the warning names the request, the limit and the iterations, and the scores' guess at a
    static or blank video is not logged for it."""
    metrics.route_warnings()
    caplog.set_level(logging.INFO, logger="videoanchor.vllm")
    x = torch.randn(96, 32, generator=torch.Generator().manual_seed(0))
    cfg = AnchorConfig(n_clusters=4, ssc_solver="faithful", rho=1e-6, eps=0.0, max_iter=100)
    req = SimpleNamespace(req_id="req-long", mm_features=_features(96))
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        scores = scoring.run_ssc(req, cfg, [0], [torch.arange(96)], 96, 4,
                                 lambda rid, idx: [x], None, "key-long")  # fmt: skip
    assert not scores.any()
    text = caplog.text
    assert (
        "request req-long: SSC over 96 visual tokens (faithful solver, rho 1e-06) reached "
        "its iteration limit, max_iter=100, after 100 iterations"
    ) in text, text
    assert "every score is 0" in text and "static or blank" not in text, text
