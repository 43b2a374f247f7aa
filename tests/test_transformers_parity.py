"""Our stand-ins for the transformers model tests that SDPA passes (issue 13).

transformers' model test files are not in its wheel, so each test here is named after the
one it stands for and checks the same behaviour on tiny random-weight models, with
``attn_implementation="videoanchor_triton"`` where the original runs a model on SDPA.
"""

import warnings

import pytest
import torch

import videoanchor
from videoanchor.integrations import attention as va_attention
from videoanchor.integrations.testing import clone_inputs, tiny_inputs, tiny_model, tiny_sample

SSC = {"n_clusters": 3, "max_iter": 300}


def _load(path, attn="videoanchor_triton", **kw):
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(path, attn_implementation=attn, **kw).eval()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    paths = {}
    for name in ("qwen2_5_vl", "llava_onevision"):
        paths[name] = tmp_path_factory.mktemp(name)
        tiny_model(name, seed=3).save_pretrained(paths[name])
    return paths


@pytest.fixture
def fresh_warnings(monkeypatch):
    """The attention function warns once per process; each test sees its own first time."""
    monkeypatch.setattr(va_attention, "_warned", set())


# ---- compiled static-cache generation --------------------------------------------------


def test_mask_keeps_one_shape_over_a_static_cache():
    # A static cache's query offset is a tensor; the mask covers the whole cache at every
    # step, whatever the number of filled slots, and is never None.
    mask = va_attention.videoanchor_mask
    shapes = set()
    for filled in (5, 6, 7, 16):
        m = mask(2, 1, 16, q_offset=torch.tensor(filled - 1), attention_mask=None)
        shapes.add((tuple(m.shape), m.dtype))
        assert m.tolist() == [[2] * filled + [0] * (16 - filled)] * 2
    assert shapes == {((2, 16), torch.int8)}
    # Left padding: padding slots are 1, visible 2, unfilled 0.
    am = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    m = mask(2, 1, 8, q_offset=torch.tensor(3), attention_mask=am)
    assert m.tolist() == [[1, 2, 2, 2, 0, 0, 0, 0], [2, 2, 2, 2, 0, 0, 0, 0]]
    # Dynamic cache: the bool mask is returned even when all True (no data-dependent None).
    m = mask(2, 1, 4, q_offset=3, attention_mask=torch.ones(2, 4, dtype=torch.long))
    assert m.dtype == torch.bool and m.shape == (2, 4) and bool(m.all())
    assert mask(2, 4, 4, q_offset=0, attention_mask=None) is None


@pytest.mark.parametrize("decode", ["all"])
def test_generate_compile_model_forward_fullgraph(saved, decode):
    from torch._dynamo.utils import counters
    from transformers import CompileConfig

    model = _load(saved["qwen2_5_vl"])
    videoanchor.configure(model, decode=decode, **SSC)
    inputs = tiny_inputs(model.config, [[4], [2]], text=[3, 6], seed=7)  # left-padded batch
    gen = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False, cache_implementation="static")
    with torch.no_grad():
        eager = model.generate(**clone_inputs(inputs), **gen)
    config = CompileConfig(fullgraph=True, backend="eager", mode=None)
    config._compile_all_devices = True  # transformers compiles decode steps on CPU only then
    model.generation_config.compile_config = config
    torch._dynamo.reset()
    counters.clear()
    try:
        with torch.no_grad():
            compiled = model.generate(**clone_inputs(inputs), **gen)
        graphs = counters["stats"]["unique_graphs"]
    finally:
        torch._dynamo.reset()
    assert torch.equal(compiled, eager)
    # One graph, traced at the first decode step; the 3 later steps reuse it.
    assert graphs == 1


# ---- output_attentions=True ---------------------------------------------------------------


@torch.no_grad()
def test_model_outputs_equivalence_with_output_attentions(saved, fresh_warnings):
    sdpa = _load(saved["llava_onevision"], attn="sdpa")
    model = _load(saved["llava_onevision"])
    videoanchor.configure(model, **SSC)
    inputs = tiny_sample(model.config, [2], text=4, seed=1)
    plain = model(**clone_inputs(inputs))
    with pytest.warns(UserWarning, match="output_attentions=True returns no weights"):
        out = model(**clone_inputs(inputs), output_attentions=True)
    ref = sdpa(**clone_inputs(inputs), output_attentions=True)
    assert torch.equal(out.logits, plain.logits)
    # As with SDPA: no weights are captured for these layers.
    assert out.attentions == ref.attentions
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(**clone_inputs(inputs), output_attentions=True)  # warns once only


# ---- padding-free (packed) batches --------------------------------------------------------


def _packed(model, samples):
    """The samples concatenated into one row, with position_ids that restart per sample (and,
    for the Qwen families, the 3D rope positions of each sample under the text positions)."""
    ids = torch.cat([s["input_ids"] for s in samples], dim=1)
    text_pos = torch.cat([torch.arange(s["input_ids"].shape[1]) for s in samples])[None]
    out = {"input_ids": ids}
    if model.config.model_type.startswith("qwen"):
        rope = [
            model.model.get_rope_index(
                s["input_ids"],
                mm_token_type_ids=s["mm_token_type_ids"],
                video_grid_thw=s["video_grid_thw"],
            )[0]
            for s in samples
        ]
        out["position_ids"] = torch.cat([text_pos[None], torch.cat(rope, dim=2)], dim=0)
        out["mm_token_type_ids"] = torch.cat([s["mm_token_type_ids"] for s in samples], dim=1)
        out["video_grid_thw"] = torch.cat([s["video_grid_thw"] for s in samples])
    else:
        out["position_ids"] = text_pos
    out["pixel_values_videos"] = torch.cat([s["pixel_values_videos"] for s in samples])
    return out


@torch.no_grad()
@pytest.mark.parametrize("family", ["qwen2_5_vl", "llava_onevision"])
def test_sdpa_padding_matches_padding_free_with_position_ids(saved, family):
    from videoanchor.integrations.testing import collate

    model = _load(saved[family])
    handle = videoanchor.configure(model, **SSC)
    vids = ([4], [2], [2]) if family == "qwen2_5_vl" else ([2], [2, 2], [2])
    samples = [
        tiny_sample(model.config, v, text=3 + 2 * i, seed=30 + i) for i, v in enumerate(vids)
    ]
    padded = collate(samples, padding_side="right")
    ref = model(**padded, use_cache=False).logits
    ref_scores = handle.last_scores.clone()
    assert handle.last_anchored
    out = model(**_packed(model, samples), use_cache=False).logits
    assert len(handle.last_result) == len(samples)  # one SSC problem per packed sequence
    start = 0
    for b, s in enumerate(samples):
        n = s["input_ids"].shape[1]
        torch.testing.assert_close(out[0, start : start + n], ref[b, :n], atol=2e-5, rtol=1e-4)
        assert torch.equal(handle.last_scores[0, start : start + n], ref_scores[b, :n])
        start += n
    # With a cache, transformers does not treat the row as packed (nor do we: one SSC problem).
    model(**_packed(model, samples), use_cache=True)
    assert len(handle.last_result) == 1
