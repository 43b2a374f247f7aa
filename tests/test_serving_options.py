"""The vLLM plugin's option handling (videoanchor/integrations/vllm/config.py), which needs
no vLLM: engine options from additional_config, per-request extra_args, the prefix-cache
salt, the supported-version check. The plugin on a real engine: tests/test_vllm.py."""

from dataclasses import replace

import pytest
import torch

from videoanchor.integrations.options import AnchorConfig
from videoanchor.integrations.vllm import check_vllm_version
from videoanchor.integrations.vllm.config import (
    ENGINE_KEYS,
    engine_config,
    request_config,
    request_overrides,
    salt_for,
)


def test_no_videoanchor_key_means_not_configured():
    assert engine_config(None) is None
    assert engine_config({}) is None
    assert engine_config({"other_plugin": {"x": 1}}) is None


def test_engine_options_are_configures_with_its_defaults():
    cfg = engine_config({"videoanchor": {"alpha_k": 5, "n_clusters": 8, "tokens": ["video"]}})
    assert cfg == AnchorConfig(alpha_k=5.0, n_clusters=8, tokens=("video",))
    assert engine_config({"videoanchor": {}}) == AnchorConfig()
    assert "attention_backend" not in ENGINE_KEYS and "process_group" not in ENGINE_KEYS


@pytest.mark.parametrize(
    "given,key",
    [({"alpha_kk": 1.0}, "alpha_kk"), ({"alpha_k": -2.0}, "alpha_k"), ({"n_clusters": 0}, "n_clusters"),
     ({"decode": "never"}, "decode"), ({"attention_backend": "torch"}, "attention_backend"),
     ({"alpha_v": float("nan")}, "alpha_v")],
)  # fmt: skip
def test_bad_engine_options_name_the_key(given, key):
    with pytest.raises(ValueError, match=rf"additional_config\['videoanchor'\]: .*{key}"):
        engine_config({"videoanchor": given})


def test_ssc_mode_is_an_operator_option_like_ssc_solver():
    """ssc_mode is an engine option (checked at start-up, named in the error), part of the
    prefix-cache salt and of the score key; a request sets it only where request_options
    opens it; blocked mode's jobs are counted at the authors' iteration's max_iter."""
    from types import SimpleNamespace

    from videoanchor.integrations.score_cache import score_key
    from videoanchor.integrations.vllm.config import check_request, engine_policy
    from videoanchor.integrations.vllm.worker_queue import counted_work

    assert "ssc_mode" in ENGINE_KEYS
    eng = engine_config({"videoanchor": {"ssc_mode": "blocked", "max_iter": 500}})
    assert eng == AnchorConfig(ssc_mode="blocked", max_iter=500)
    with pytest.raises(ValueError, match=r"additional_config\['videoanchor'\]: ssc_mode: "
                                         r"expected one of \('auto', 'exact', 'blocked'\), "
                                         r"got 'dense'"):  # fmt: skip
        engine_config({"videoanchor": {"ssc_mode": "dense"}})
    with pytest.raises(ValueError, match=r"additional_config\['videoanchor'\]: mode='blocked' "
                                         r"runs the authors. iteration or the working sets by blocks"):  # fmt: skip
        engine_config({"videoanchor": {"ssc_mode": "blocked", "ssc_solver": "fast"}})
    auto = AnchorConfig()
    assert salt_for(eng, ["v1"], None) != salt_for(replace(eng, ssc_mode="auto"), ["v1"], None)
    assert score_key(["v1"], 4, replace(auto, ssc_mode="blocked")) != score_key(["v1"], 4, auto)
    policy = engine_policy({"videoanchor": {"ssc_mode": "exact"}})
    with pytest.raises(ValueError, match="does not let requests set 'ssc_mode'"):
        check_request(policy, {"videoanchor_ssc_mode": "blocked"})
    with pytest.raises(ValueError, match=r"extra_args\['videoanchor_ssc_mode'\]: ssc_mode: "
                                         r"expected one of"):  # fmt: skip
        request_overrides({"videoanchor_ssc_mode": "dense"})
    opened = request_config(auto, {"videoanchor_ssc_mode": "blocked"})
    assert opened.ssc_mode == "blocked"
    work = {m: counted_work(100, 8, SimpleNamespace(ssc_solver="auto", ssc_mode=m, max_iter=500))
            for m in ("auto", "exact", "blocked")}  # fmt: skip
    assert work["auto"] == work["exact"] == work["blocked"] * 60 // 500


def test_engine_options_must_be_a_dict():
    with pytest.raises(TypeError, match="expected a dict of configure"):
        engine_config({"videoanchor": [1, 2]})


def test_request_overrides_and_off():
    eng = AnchorConfig(alpha_k=9.5)
    assert request_config(eng, None) is eng
    assert request_config(eng, {"unrelated": 1}) is eng
    assert request_config(eng, {"videoanchor": "off"}) is None
    assert request_config(None, {"videoanchor_alpha_k": 1.0}) is None  # engine not anchored
    cfg = request_config(eng, {"videoanchor_alpha_k": 3, "videoanchor_seed": 7})
    assert (cfg.alpha_k, cfg.seed, cfg.alpha_v) == (3.0, 7, eng.alpha_v)
    off = AnchorConfig(enabled=False)
    assert request_config(off, None) is None
    assert request_config(off, {"videoanchor": "on"}).enabled


@pytest.mark.parametrize(
    "extra,key",
    [({"videoanchor_alpha_k": -3.0}, "videoanchor_alpha_k"),
     ({"videoanchor_n_clusters": 0}, "videoanchor_n_clusters"),
     ({"videoanchor_alpah_k": 1.0}, "videoanchor_alpah_k"),
     ({"videoanchor": "maybe"}, "videoanchor"),
     ({"videoanchor_enabled": 0}, "videoanchor_enabled")],
)  # fmt: skip
def test_bad_request_values_name_the_key(extra, key):
    with pytest.raises(ValueError, match=rf"extra_args\['{key}'\]"):
        request_overrides(extra)


def test_salt_separates_options_and_items_and_keeps_a_user_salt():
    a, b = AnchorConfig(alpha_k=1.0), AnchorConfig(alpha_k=2.0)
    s = salt_for(a, ["v1"], None)
    assert s == salt_for(AnchorConfig(alpha_k=1.0), ["v1"], None)
    assert s != salt_for(b, ["v1"], None)
    assert s != salt_for(a, ["v1", "v2"], None)  # joint SSC: all items count
    assert salt_for(a, ["v1"], "user").startswith("user|videoanchor:")


def test_supported_vllm_versions():
    check_vllm_version("0.32.0")
    check_vllm_version("0.32.3+cpu")
    for bad in ("0.31.9", "0.33.0", "1.0.0"):
        with pytest.raises(RuntimeError, match=f"found vllm {bad}"):
            check_vllm_version(bad)


def test_operator_policy_defaults_to_the_engines_own_values():
    from videoanchor.integrations.vllm.config import REQUEST_KEYS, engine_policy

    assert engine_policy({}) is None
    p = engine_policy({"videoanchor": {"n_clusters": 8, "max_iter": 300}})
    # by default a request sets what changes the method's output at a bounded cost: the
    # alphas, n_clusters (under its limit), the seed and on/off; never the solver's work
    assert p.allowed == frozenset(
        ("enabled", "alpha_q", "alpha_k", "alpha_v", "n_clusters", "seed", "decode", "tokens")
    )
    for costly in ("ssc_solver", "ssc_backend", "ssc_precision", "ssc_mode", "rho", "eps",
                   "max_iter"):  # fmt: skip
        assert costly not in p.allowed
    every = engine_policy({"videoanchor": {"request_options": "all"}})
    assert every.allowed == frozenset(REQUEST_KEYS + ("enabled",))
    assert (p.max_iter, p.n_clusters, p.label_draws, p.eps) == (300, 8, 1, 2e-4)
    # the policy keys are not configure() options: the engine options ignore them
    eng = engine_config({"videoanchor": {"n_clusters": 8, "request_options": "none"}})
    assert eng == AnchorConfig(n_clusters=8)


@pytest.mark.parametrize(
    "extra,phrase",
    [({"videoanchor_max_iter": 10**7}, "expected at most 300"),
     ({"videoanchor_label_draws": 2}, "expected at most 1"),
     ({"videoanchor_n_clusters": 100000}, "expected at most 8"),
     ({"videoanchor_eps": 0.0}, "expected at least 0.0002")],
)  # fmt: skip
def test_requests_over_the_limits_are_refused_naming_key_and_limit(extra, phrase):
    from videoanchor.integrations.vllm.config import check_request, engine_policy

    p = engine_policy({"videoanchor": {"n_clusters": 8, "max_iter": 300,
                                       "request_options": "all"}})  # fmt: skip
    key = next(iter(extra))
    with pytest.raises(ValueError, match=rf"extra_args\['{key}'\]: {phrase}.*request_limits"):
        check_request(p, extra)
    check_request(p, {"videoanchor_max_iter": 300, "videoanchor_n_clusters": 3})  # within


def test_operator_limits_and_allowed_options():
    from videoanchor.integrations.vllm.config import check_request, engine_policy

    p = engine_policy({"videoanchor": {"request_limits": {"eps": 0.0, "max_iter": 10**6},
                                       "request_options": ["alpha_k", "enabled"]}})  # fmt: skip
    check_request(p, {"videoanchor_alpha_k": 2.0, "videoanchor": "off"})
    with pytest.raises(ValueError, match=r"videoanchor_eps.*does not let requests set 'eps'"):
        check_request(p, {"videoanchor_eps": 0.0})
    none = engine_policy({"videoanchor": {"request_options": "none"}})
    with pytest.raises(ValueError, match=r"extra_args\['videoanchor'\].*allows: none"):
        check_request(none, {"videoanchor": "off"})
    check_request(none, {"unrelated": 1})  # other plugins' extra_args are not ours
    check_request(None, {"videoanchor_eps": 0.0})  # an unanchored engine checks nothing


@pytest.mark.parametrize(
    "given,phrase",
    [({"request_options": "some"}, r"\['request_options'\]: expected 'all', 'none'"),
     ({"request_options": ["alpha_kk"]}, r"\['request_options'\]: unknown option 'alpha_kk'"),
     ({"request_options": ["ssc_time_budget"]}, r".*unknown option 'ssc_time_budget'"),
     ({"scores_ahead_workers": 0}, r"\['scores_ahead_workers'\]: expected an int"),
     ({"request_limits": [1]}, r"\['request_limits'\]: expected a dict"),
     ({"request_limits": {"max_iters": 1}}, r"\['request_limits'\]: unknown limit 'max_iters'"),
     ({"request_limits": {"max_iter": 0}}, r"\['request_limits'\]: max_iter"),
     ({"request_limits": {"eps": -1.0}}, r"\['request_limits'\]: eps")],
)  # fmt: skip
def test_bad_operator_policy_fails_naming_the_key(given, phrase):
    from videoanchor.integrations.vllm.config import engine_policy

    with pytest.raises(
        (TypeError, ValueError), match=r"additional_config\['videoanchor'\]" + phrase
    ):
        engine_policy({"videoanchor": given})


def test_no_wall_clock_budget_in_vllm_answers_must_not_depend_on_load():
    """A time budget stops the SSC at an iterate that depends on the machine's load; the
    plugin refuses it at start-up, saying what bounds the work instead."""
    with pytest.raises(ValueError, match=r"'ssc_time_budget' is not accepted.*max_iter"):
        engine_config({"videoanchor": {"ssc_time_budget": 2.5}})
    with pytest.raises(ValueError, match=r"extra_args\['videoanchor_ssc_time_budget'\]"):
        request_overrides({"videoanchor_ssc_time_budget": 100.0})


def test_a_backend_this_server_cannot_run_is_named():
    from videoanchor.integrations.vllm.config import runnable_problem

    cupy = engine_config({"videoanchor": {"ssc_backend": "cupy"}})
    assert "CUDA engine only" in runnable_problem(cupy, cuda=False)
    import importlib.util

    if importlib.util.find_spec("cupy") is None:
        assert "not installed" in runnable_problem(cupy, cuda=True)
    assert runnable_problem(engine_config({"videoanchor": {}}), cuda=False) is None


def test_score_cache_is_an_lru_keyed_by_items_and_scoring_options():
    import torch

    from videoanchor.integrations.score_cache import ScoreCache, score_key

    a = AnchorConfig()
    key = score_key(["v1", "v2"], 4, a)
    assert key == score_key(["v1", "v2"], 4, AnchorConfig(alpha_k=1.0, alpha_v=0.5))  # alphas
    for other in (score_key(["v2", "v1"], 4, a), score_key(["v1"], 4, a),
                  score_key(["v1", "v2"], 3, a), score_key(["v1", "v2"], 4, AnchorConfig(seed=1)),
                  score_key(["v1", "v2"], 4, AnchorConfig(eps=1e-3))):  # fmt: skip
        assert other != key
    cache = ScoreCache(3 * 40)  # three entries of 10 float32
    s = [torch.rand(10) for _ in range(4)]
    assert cache.get("a") is None
    cache.put("a", s[0])
    cache.put("b", s[1])
    cache.put("c", s[2])
    assert torch.equal(cache.get("a"), s[0])  # "a" is now the most recently used
    cache.put("d", s[3])  # evicts "b"
    assert cache.get("b") is None and cache.get("c") is not None and len(cache) == 3
    assert (cache.stats["scores_hits"], cache.stats["scores_misses"]) == (2, 2)
    assert cache.stats["evictions"] == 1 and cache.bytes == 120
    cache.put("big", torch.rand(100))  # larger than the cache: not stored
    assert cache.get("big") is None and cache.bytes == 120
    assert cache.summary().startswith("score cache: 2 hits, 3 misses, 1 evictions, 3 entries")
    s[3].fill_(0)  # a copy is stored
    assert cache.get("d").abs().sum() > 0


def test_score_cache_size_option():
    from videoanchor.integrations.vllm.config import SCORE_CACHE_MB, score_cache_bytes

    assert score_cache_bytes({"videoanchor": {}}) == SCORE_CACHE_MB << 20
    assert score_cache_bytes({"videoanchor": {"score_cache_mb": 0}}) == 0
    with pytest.raises(ValueError, match=r"\['score_cache_mb'\]: expected MiB"):
        score_cache_bytes({"videoanchor": {"score_cache_mb": -1}})
    assert engine_config({"videoanchor": {"score_cache_mb": 8}}) == AnchorConfig()


def test_scores_ahead_options():
    from videoanchor.integrations.vllm.config import ahead_nice, engine_policy, scores_ahead

    assert scores_ahead({"videoanchor": {}}) is True
    assert scores_ahead({"videoanchor": {"scores_ahead": False}}) is False
    assert ahead_nice({"videoanchor": {}}) == 19
    from videoanchor.integrations.vllm.config import ahead_workers

    assert ahead_workers({"videoanchor": {}}) == 2
    assert ahead_workers({"videoanchor": {"scores_ahead_workers": 4}}) == 4
    for bad in (0, True, 1.5, 65):
        with pytest.raises(ValueError, match=r"\['scores_ahead_workers'\]: expected an int"):
            ahead_workers({"videoanchor": {"scores_ahead_workers": bad}})
    assert ahead_nice({"videoanchor": {"scores_ahead_nice": 0}}) == 0
    with pytest.raises(TypeError, match=r"\['scores_ahead'\]: expected true .* got 'no'"):
        scores_ahead({"videoanchor": {"scores_ahead": "no"}})
    for bad in (20, -1, True, 2.5):
        with pytest.raises(ValueError, match=r"\['scores_ahead_nice'\]: expected a niceness"):
            ahead_nice({"videoanchor": {"scores_ahead_nice": bad}})
    # checked with the engine's other keys at start-up
    with pytest.raises(ValueError, match="scores_ahead_nice"):
        engine_policy({"videoanchor": {"scores_ahead_nice": 99}})
    assert engine_config({"videoanchor": {"scores_ahead": False}}) == AnchorConfig()


def test_scores_ahead_split_option():
    from videoanchor.integrations.vllm.config import ahead_split, engine_policy

    assert ahead_split({"videoanchor": {}}) is False
    assert ahead_split(None) is False
    assert ahead_split({"videoanchor": {"scores_ahead_split": True}}) is True
    for bad in ("yes", 1, None):
        with pytest.raises(TypeError, match=r"\['scores_ahead_split'\]: expected true .* got"):
            ahead_split({"videoanchor": {"scores_ahead_split": bad}})
    with pytest.raises(TypeError, match="scores_ahead_split"):
        engine_policy({"videoanchor": {"scores_ahead_split": "on"}})
    assert engine_config({"videoanchor": {"scores_ahead_split": True}}) == AnchorConfig()


def test_score_cache_is_safe_to_fill_from_another_thread():
    """The side worker puts scores while the step reads them: no entry, byte count or
    counter is lost."""
    import sys
    import threading

    from videoanchor.integrations.score_cache import ScoreCache

    cache = ScoreCache(10**9)

    def fill(start):
        for i in range(start, start + 2000):
            cache.put(str(i), torch.full((3,), float(i)))
            cache.get(str(i - 1))

    threads = [threading.Thread(target=fill, args=(k * 2000,)) for k in range(4)]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible: races show
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(interval)
    assert len(cache) == 8000 and cache.bytes == 8000 * 12
    assert cache.stats["scores_hits"] + cache.stats["scores_misses"] == 8000
    assert all(float(cache.get(str(i))[0]) == i for i in range(0, 8000, 997))


# ---- refusals that repeat little of what a client sent (issue 78, item 6) ------------------


@pytest.mark.parametrize(
    "value,phrase",
    [([0.5] * 10**6, "got a list of 1000000 entries (0.5, 0.5, 0.5, ...)"),
     ("x" * 10**6, "... (1000002 characters)"),
     ({"a": 1}, "got {'a': 1}")],
    ids=["list", "long-string", "dict"],
)  # fmt: skip
def test_a_long_value_for_a_scalar_option_is_refused_in_a_short_message(value, phrase):
    with pytest.raises(ValueError) as err:
        request_overrides({"videoanchor_alpha_k": value})
    text = str(err.value)
    assert text.startswith("extra_args['videoanchor_alpha_k']: expected one value"), text
    assert phrase in text and len(text) < 300, text


def test_a_long_unknown_key_and_a_long_tokens_list_are_cut():
    with pytest.raises(ValueError, match="unknown videoanchor option") as err:
        request_overrides({"videoanchor_" + "z" * 10**5: 1.0})
    assert len(str(err.value)) < 800 and "(100014 characters)" in str(err.value)
    with pytest.raises(ValueError, match="tokens: expected a non-empty subset") as err:
        request_overrides({"videoanchor_tokens": ["clip"] * 10**5})  # no policy bounds it here
    assert len(str(err.value)) < 600 and "characters)" in str(err.value)


def test_videoanchor_on_off_is_refused_as_what_it_is():
    for value, shown in ((True, "got True"), (1, "got 1"), ("yes", "got 'yes'")):
        with pytest.raises(ValueError, match=f"expected 'on' or 'off', {shown}$"):
            request_overrides({"videoanchor": value})


class _Raw:
    """A front end's raw request: its JSON body."""

    def __init__(self, body):
        self.body = body

    async def json(self):
        return self.body


def test_the_front_end_reports_a_json_true_as_a_boolean_not_as_1():
    """vLLM reads ``{"vllm_xargs": {"videoanchor": true}}`` as 1; the front end's refusal
    says the client sent the JSON boolean (it said "got 1" when the option checks ran
    first)."""
    import asyncio
    from types import SimpleNamespace

    from videoanchor.integrations.vllm.hooks import front_end_refusal

    engine = SimpleNamespace(additional_config={"videoanchor": {}})
    for key in ("videoanchor", "videoanchor_alpha_k"):
        raw = _Raw({"vllm_xargs": {key: True}})
        why = asyncio.run(front_end_refusal(engine, {key: 1}, raw))
        assert why == (f"extra_args[{key!r}]: expected a number (or 'on' / 'off' for "
                       "'videoanchor'), got the JSON boolean true"), why  # fmt: skip
    why = asyncio.run(front_end_refusal(engine, {"videoanchor": 1}, _Raw({"vllm_xargs": {
        "videoanchor": 1}})))  # fmt: skip
    assert why == "extra_args['videoanchor']: expected 'on' or 'off', got 1", why
    plain = SimpleNamespace(additional_config={})  # an unanchored engine refuses nothing
    assert asyncio.run(front_end_refusal(plain, {"videoanchor": 1}, _Raw({}))) is None


def test_a_video_too_short_for_the_loader_is_counted(monkeypatch, tmp_path):
    """The 1-frame video's HTTP 400 is counted in videoanchor_requests_refused{option="video"}
    (vLLM's VideoMediaIO stood in for: its loader divides by zero)."""
    import sys
    import types

    from videoanchor.integrations.vllm import hooks, metrics, startup

    class VideoMediaIO:
        video_loader = "qwen2_vl_loader"

        def load_bytes(self, data):
            return len(data) // (len(data) - len(data))  # what the loader does on 1 frame

    module = types.ModuleType("vllm.multimodal.media.video")
    module.VideoMediaIO = VideoMediaIO
    for name in ("vllm", "vllm.multimodal", "vllm.multimodal.media"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "vllm.multimodal.media.video", module)
    monkeypatch.setenv(metrics.ENV, str(tmp_path))
    metrics.reset_counts()
    monkeypatch.setattr(startup, "ANCHORED_FRONT_END", [True])
    hooks.refuse_short_videos()
    with pytest.raises(ValueError, match="send at least 2 frames"):
        VideoMediaIO().load_bytes(b"one frame")
    assert metrics.snapshot()["videoanchor_requests_refused"] == [[["video"], 1.0]]
    monkeypatch.setattr(startup, "ANCHORED_FRONT_END", [False])  # unanchored: vLLM's own error
    with pytest.raises(ZeroDivisionError):
        VideoMediaIO().load_bytes(b"one frame")
    assert metrics.snapshot()["videoanchor_requests_refused"] == [[["video"], 1.0]]
    metrics.reset_counts()
