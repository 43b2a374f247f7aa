"""The vLLM plugin's option handling (videoanchor/integrations/vllm/config.py), which needs
no vLLM: engine options from additional_config, per-request extra_args, the prefix-cache
salt, the supported-version check. The plugin on a real engine: tests/test_vllm.py."""

import pytest

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
