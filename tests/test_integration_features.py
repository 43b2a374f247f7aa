"""videoanchor_triton beyond the per-family core: caches, decoding strategies, dtypes,
errors, the Triton kernel path and the per-device gate cache."""

import warnings

import pytest
import torch

import videoanchor
from videoanchor.integrations.transformers.gates import RequestGates
from videoanchor.integrations.transformers.testing import (
    TOKENS,
    collate,
    load_saved,
    tiny_config,
    tiny_model,
    tiny_sample,
)
from videoanchor.kernels.launch import LOG2E

SSC = {"n_clusters": 3, "max_iter": 300}
SPECIAL = [TOKENS[k] for k in ("image", "video", "vision_start", "vision_end", "eos", "pad")]
GEN = {"max_new_tokens": 3, "min_new_tokens": 3, "suppress_tokens": SPECIAL}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    paths = {}
    for name in ("qwen2_5_vl", "llava_onevision"):
        paths[name] = tmp_path_factory.mktemp(name)
        tiny_model(name, seed=2).save_pretrained(paths[name])
    return paths


@pytest.fixture(scope="module", params=["qwen2_5_vl", "llava_onevision"])
def model(request, saved):
    return load_saved(saved[request.param])


def _batch(model):
    cfg = model.config
    if cfg.model_type.startswith("qwen"):
        vids = ([4], [2])
    else:
        vids = ([2], [2, 2])
    samples = [
        tiny_sample(cfg, v, text=t, seed=20 + i)
        for i, (v, t) in enumerate(zip(vids, (4, 8), strict=True))
    ]
    return samples, collate(samples)


@torch.no_grad()
@pytest.mark.parametrize("decode", ["prefill", "all"])
def test_static_cache_generate_equals_dynamic(model, decode):
    videoanchor.configure(model, enabled=True, decode=decode, **SSC)
    _, batch = _batch(model)
    dynamic = model.generate(**batch, **GEN, do_sample=False)
    static = model.generate(**batch, **GEN, do_sample=False, cache_implementation="static")
    assert torch.equal(dynamic, static)


@torch.no_grad()
def test_static_cache_step_logits_equal_dynamic(model):
    handle = videoanchor.configure(model, enabled=True, decode="all", **SSC)
    _, batch = _batch(model)
    kw = {**GEN, "do_sample": False, "return_dict_in_generate": True, "output_logits": True}
    dynamic = model.generate(**batch, **kw)
    scores_dynamic = handle.last_scores.clone()
    static = model.generate(**batch, **kw, cache_implementation="static")
    assert torch.equal(handle.last_scores, scores_dynamic)
    for a, b in zip(dynamic.logits, static.logits, strict=True):
        assert (a - b).abs().max().item() < 1e-4


@torch.no_grad()
def test_beam_search_batch_equals_separate(model):
    videoanchor.configure(model, enabled=True, decode="all", **SSC)
    samples, batch = _batch(model)
    kw = {**GEN, "do_sample": False, "num_beams": 2}
    together = model.generate(**batch, **kw)
    width = batch["input_ids"].shape[1]
    for b, sample in enumerate(samples):
        alone = model.generate(**sample, **kw)
        n = sample["input_ids"].shape[1]
        assert torch.equal(together[b, width:], alone[0, n:])


@torch.no_grad()
def test_sampling_with_top_k_1_equals_greedy(model):
    handle = videoanchor.configure(model, enabled=True, decode="all", **SSC)
    _, batch = _batch(model)
    greedy = model.generate(**batch, **GEN, do_sample=False)
    scores = handle.last_scores.clone()
    torch.manual_seed(3)
    sampled = model.generate(**batch, **GEN, do_sample=True, top_k=1, temperature=0.7)
    assert torch.equal(greedy, sampled)
    assert torch.equal(handle.last_scores, scores)


@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_precision_close_to_fp32(saved, dtype):
    path = saved["qwen2_5_vl"]
    full = load_saved(path)
    half = load_saved(path, dtype=dtype)
    samples, _ = _batch(full)
    inputs = samples[0]
    h32 = videoanchor.configure(full, enabled=True, **SSC)
    ref = full(**inputs).logits
    h16 = videoanchor.configure(half, enabled=True, **SSC)
    half_inputs = {k: v.to(dtype) if v.is_floating_point() else v for k, v in inputs.items()}
    out = half(**half_inputs).logits
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert h16.last_scores.dtype == torch.float32
    # Scores come from SSC on half-precision features: compare the logits loosely.
    assert (out.float() - ref).abs().max().item() < 0.15 * ref.abs().max().item()
    assert torch.equal(h16.last_visual_positions[0], h32.last_visual_positions[0])


@torch.no_grad()
def test_text_only_prompt_runs_unanchored_and_warns_once(saved):
    ours, plain = load_saved(saved["llava_onevision"]), load_saved(saved["llava_onevision"], "sdpa")
    handle = videoanchor.configure(ours, enabled=True, **SSC)
    ids = torch.randint(3, 100, (1, 9))
    with pytest.warns(UserWarning, match="no visual inputs"):
        out = ours(input_ids=ids).logits
    assert handle.last_anchored is False
    assert (out - plain(input_ids=ids).logits).abs().max().item() < 2e-5
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ours(input_ids=ids)


@torch.no_grad()
def test_token_kinds_are_configurable(saved):
    model = load_saved(saved["qwen2_5_vl"])
    samples, _ = _batch(model)
    handle = videoanchor.configure(model, enabled=True, tokens=("image",), **SSC)
    with pytest.warns(UserWarning, match="unanchored"):
        model(**samples[0])
    assert handle.last_anchored is False and (handle.last_scores == 0).all()
    videoanchor.configure(model, tokens=("video",))
    model(**samples[0])
    assert handle.last_anchored and (handle.last_scores > 0).any()


def test_unsupported_family_names_the_supported_ones(tmp_path):
    from transformers import AutoConfig, LlavaForConditionalGeneration

    cfg = AutoConfig.for_model(
        "llava",
        text_config=tiny_config("llava_onevision").text_config.to_dict(),
        vision_config={
            "model_type": "clip_vision_model",
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "image_size": 16,
            "patch_size": 4,
        },
    )
    LlavaForConditionalGeneration(cfg).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="'llava' is not supported.*qwen2_5_vl"):
        load_saved(tmp_path)


def test_configure_errors(saved):
    model = load_saved(saved["qwen2_5_vl"])
    with pytest.raises(ValueError, match="alpha_k=-2.0 makes the gate"):
        videoanchor.configure(model, alpha_k=-2.0)
    with pytest.raises(ValueError, match="decode"):
        videoanchor.configure(model, decode="sometimes")
    with pytest.raises(ValueError, match="tokens"):
        videoanchor.configure(model, tokens=("audio",))
    with pytest.raises(ValueError, match="n_clusters"):
        videoanchor.configure(model, n_clusters=0)
    with pytest.raises(TypeError, match="model"):
        videoanchor.configure("not a model")
    # A rejected call leaves the previous options in force.
    assert videoanchor.configure(model).config.alpha_k == 9.5


@torch.no_grad()
def test_long_videos_take_the_blocks_without_an_option(saved, monkeypatch):
    """Past the exact limit (lowered here below this request's visual tokens) the default
    options run the working sets by blocks (issue 99), certified, with the default share
    on their sparse C, uncached; ``ssc_solver="faithful"`` runs the authors' iteration."""
    from videoanchor.anchor import plan as plan_mod
    from videoanchor.integrations.transformers.cache import AnchorCache

    model = load_saved(saved["qwen2_5_vl"])
    samples, _ = _batch(model)
    handle = videoanchor.configure(model, n_clusters=SSC["n_clusters"])  # (max_iter: default)
    handle.cache = cache = AnchorCache(None)
    monkeypatch.setattr(plan_mod, "EXACT_MAX_TOKENS", 8)
    model(**samples[0])
    res = handle.last_result[0]
    assert (res.mode, res.solver) == ("blocked", "workset") and res.coef.is_sparse
    assert res.converged and res.residual <= 1e-8  # (float64; res.gap: of the float32 C)
    assert res.cluster_share == "steady"
    assert cache.stats["ssc_misses"] == 0  # (blocked: uncached)
    videoanchor.configure(model, ssc_solver="faithful")
    with warnings.catch_warnings():  # (the authors' iteration may stop at max_iter)
        warnings.simplefilter("ignore")
        model(**samples[0])
    assert (handle.last_result[0].mode, handle.last_result[0].solver) == ("blocked", "faithful")


@torch.no_grad()
def test_ssc_mode_reaches_the_ssc_and_blocked_mode_bypasses_the_cache(saved):
    """configure(ssc_mode=...) is the mode of the request's SSC: "auto" runs exact mode on
    these few tokens, "exact" too (and finds the entry the "auto" run kept in the anchor
    cache: the same plan, the same C), "blocked" the column-blocked authors' iteration,
    uncached (the cache keeps exact mode's dense C). A bad value names ssc_mode."""
    from videoanchor.integrations.transformers.cache import AnchorCache

    model = load_saved(saved["qwen2_5_vl"])
    samples, _ = _batch(model)
    handle = videoanchor.configure(model, **SSC)
    handle.cache = cache = AnchorCache(None)
    ran = {}
    for mode in ("auto", "exact", "blocked"):
        assert videoanchor.configure(model, ssc_mode=mode).config.ssc_mode == mode
        with warnings.catch_warnings():  # (max_iter=300: the blocked iteration may not converge)
            warnings.simplefilter("ignore")
            model(**samples[0])
        ran[mode] = handle.last_result[0]
    assert {m: r.mode for m, r in ran.items()} == {"auto": "exact", "exact": "exact",
                                                   "blocked": "blocked"}  # fmt: skip
    assert ran["blocked"].solver == "faithful" and ran["blocked"].coef.is_sparse
    assert torch.equal(ran["exact"].scores, ran["auto"].scores)
    assert (cache.stats["ssc_misses"], cache.stats["ssc_hits"]) == (1, 1)  # none for blocked
    with pytest.raises(ValueError, match=r"ssc_mode: expected one of \('auto', 'exact', "
                                         r"'blocked'\), got 'dense'"):  # fmt: skip
        videoanchor.configure(model, ssc_mode="dense")
    assert handle.config.ssc_mode == "blocked"  # the rejected call changed nothing


@torch.no_grad()
def test_sdpa_model_needs_the_attention_name_then_switches(saved):
    model = load_saved(saved["qwen2_5_vl"], "sdpa")
    samples, _ = _batch(model)
    plain = model(**samples[0]).logits
    with pytest.raises(ValueError, match="attn_implementation='sdpa'"):
        videoanchor.configure(model)
    model.set_attn_implementation("videoanchor_triton")
    handle = videoanchor.configure(model, enabled=True, **SSC)
    assert model.config.vision_config._attn_implementation == "sdpa"
    out = model(**samples[0]).logits
    assert handle.last_anchored
    assert (out - plain).abs().max().item() > 0.05


@torch.no_grad()
def test_triton_kernel_path_matches_torch_path(tmp_path):
    # head_dim 16: the smallest head dim the Triton kernel takes (runs in the interpreter on CPU).
    tiny_model("qwen2_5_vl", seed=4, hidden=64, layers=1).save_pretrained(tmp_path)
    model = load_saved(tmp_path)
    inputs = tiny_sample(model.config, [2], text=3, seed=5)
    videoanchor.configure(model, enabled=True, attention_backend="torch", **SSC)
    ref = model(**inputs).logits
    videoanchor.configure(model, attention_backend="triton")
    out = model(**inputs).logits
    assert (out - ref).abs().max().item() < 1e-4


def test_request_gates_cached_per_device_and_padded_for_decode():
    scores = torch.tensor([[0.0, 0.5, 0.9, 0.0], [0.0, 0.0, 0.2, 0.0]])
    kb, vs = torch.log1p(2.0 * scores), 1 + 3.0 * scores
    req = RequestGates(key_bias=kb, value_scale=vs, value_scale_range=(1.0, 3.7))
    cpu = torch.device("cpu")
    a = req.prepared(cpu, batch=2, skv=4)  # prefill: offset 0
    a_kb, a_vs = a.natural(4)
    assert torch.equal(a_kb, kb) and torch.equal(a_vs, vs)
    assert a.value_scale_range == (1.0, 3.7)
    # the kernels' form, computed here once: (key_bias - row max) * log2(e)
    shift = kb.amax(-1)
    assert torch.equal(a.shift, shift)
    torch.testing.assert_close(a.bias_log2, (kb - shift[:, None]) * LOG2E, rtol=0, atol=0)
    assert req.prepared(cpu, batch=2, skv=4) is a  # every layer: the same object, no new work
    d = req.prepared(cpu, batch=2, skv=7)  # decode: generated tokens get neutral gates
    d_kb, d_vs = d.natural(7)
    assert torch.equal(d_kb[:, :4], kb) and (d_kb[:, 4:] == 0).all() and (d_vs[:, 4:] == 1).all()
    assert d.length == 4 + 256  # room to grow past the prompt: the next steps reuse it
    assert req.prepared(cpu, batch=2, skv=8) is d
    m = req.prepared(torch.device("meta"), batch=2, skv=5)
    assert m.bias_log2.device.type == "meta" and m.natural(5)[0].shape == (2, 5)
    with pytest.raises(RuntimeError, match="batch"):
        req.prepared(cpu, batch=3, skv=8)
