"""Our stand-ins for the transformers model tests that SDPA passes (issue 13).

transformers' model test files are not in its wheel, so each test here is named after the
one it stands for and checks the same behaviour on tiny random-weight models, with
``attn_implementation="videoanchor_triton"`` where the original runs a model on SDPA.
"""

import warnings

import pytest
import torch

import videoanchor
from videoanchor.integrations.transformers import attention as va_attention
from videoanchor.integrations.transformers.testing import (
    EagerAnchorReference,
    clone_inputs,
    load_saved,
    tiny_inputs,
    tiny_model,
    tiny_sample,
)

SSC = {"n_clusters": 3, "max_iter": 300}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    paths = {}
    for name in ("qwen2_5_vl", "llava_onevision"):
        paths[name] = tmp_path_factory.mktemp(name)
        tiny_model(name, seed=3).save_pretrained(paths[name])
    return paths


@pytest.fixture
def fresh_warnings():
    """The attention function warns once per process; each test sees its own first time."""
    va_attention.reset_warnings()


# ---- compiled static-cache generation --------------------------------------------------


def test_mask_keeps_one_shape_over_a_static_cache():
    # A static cache's query offset is a tensor; the mask covers the whole cache at every
    # step, whatever the number of filled slots, and is never None.
    mask = va_attention.videoanchor_mask
    shapes = set()
    for filled in (5, 6, 7, 16):
        m = mask(2, 1, 16, q_offset=torch.tensor(filled - 1), attention_mask=None)
        shapes.add((tuple(m.shape), m.dtype))
        assert m.tolist() == [[1] * filled + [-1] * (16 - filled)] * 2
    assert shapes == {((2, 16), torch.int8)}
    # Left padding: padding slots are 0, visible 1, unfilled -1.
    am = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    m = mask(2, 1, 8, q_offset=torch.tensor(3), attention_mask=am)
    assert m.tolist() == [[0, 1, 1, 1, -1, -1, -1, -1], [1, 1, 1, 1, -1, -1, -1, -1]]
    # Dynamic cache: the bool mask is returned even when all True (no data-dependent None).
    m = mask(2, 1, 4, q_offset=3, attention_mask=torch.ones(2, 4, dtype=torch.long))
    assert m.dtype == torch.bool and m.shape == (2, 4) and bool(m.all())
    assert mask(2, 4, 4, q_offset=0, attention_mask=None) is None


@pytest.mark.parametrize("decode", ["all"])
def test_generate_compile_model_forward_fullgraph(saved, decode):
    from torch._dynamo.utils import counters
    from transformers import CompileConfig

    model = load_saved(saved["qwen2_5_vl"])
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
    sdpa = load_saved(saved["llava_onevision"], "sdpa")
    model = load_saved(saved["llava_onevision"])
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
    from videoanchor.integrations.transformers.testing import collate

    model = load_saved(saved[family])
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


# ---- training, gradient checkpointing ------------------------------------------------------

REFERENCE = EagerAnchorReference(name="videoanchor_parity_reference").register()
TRAIN_SAMPLES = {"qwen2_5_vl": ([4], [2]), "llava_onevision": ([2], [2, 2])}


def _enable_checkpointing(model, reentrant):
    kwargs = {"use_reentrant": reentrant}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.23
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def _step(model, inputs):
    model.zero_grad(set_to_none=True)
    out = model(**clone_inputs(inputs), labels=inputs["input_ids"], use_cache=False)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.loss.detach(), grads


def _assert_grads_close(grads, ref, tol=1e-4):
    assert grads.keys() == ref.keys() and grads
    for name, g in grads.items():
        assert torch.isfinite(g).all(), name
        err = (g - ref[name]).norm().item()
        assert err <= tol * ref[name].norm().item() + 1e-7, (name, err, ref[name].norm().item())


def _train_and_compare(
    saved,
    family,
    *,
    anchored,
    reentrant=None,
    steps=3,
    trainable=None,
    input_grads=False,
    backend="auto",
):
    """A few SGD steps of our model and of the eager float64 reference with the same gates
    (docs/method.md section 4, written out with no code shared with our kernels or hooks), from
    the same weights: the losses and every gradient must agree at every step."""
    ours = load_saved(saved[family]).train()
    handle = videoanchor.configure(ours, enabled=anchored, attention_backend=backend, **SSC)
    ref = REFERENCE.load(saved[family]).train()
    for model in (ours, ref):
        if trainable is not None:
            for name, p in model.named_parameters():
                p.requires_grad_(trainable in name)
    if input_grads:
        ours.enable_input_require_grads()
    if reentrant is not None:
        _enable_checkpointing(ours, reentrant)
    inputs = tiny_inputs(ours.config, TRAIN_SAMPLES[family], text=[3, 6], seed=11)
    opt = [
        torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.05)
        for m in (ours, ref)
    ]
    c = handle.config
    REFERENCE.alphas = (c.alpha_q, c.alpha_k, c.alpha_v)
    losses = []
    try:
        for _ in range(steps):
            loss, grads = _step(ours, inputs)
            assert handle.last_anchored == anchored
            REFERENCE.scores = handle.last_scores if anchored else None
            ref_loss, ref_grads = _step(ref, inputs)
            torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5)
            _assert_grads_close(grads, ref_grads)
            losses.append(loss.item())
            for o in opt:
                o.step()
        if anchored:  # the gates change the gradients by far more than the tolerance
            REFERENCE.scores = None
            _, plain = _step(ref, inputs)
            with pytest.raises(AssertionError):
                _assert_grads_close(grads, plain, tol=1e-2)
    finally:
        REFERENCE.scores = None
    assert steps == 1 or losses[-1] < losses[0]
    return grads


@pytest.mark.parametrize("anchored", [True, False], ids=["anchored", "plain"])
@pytest.mark.parametrize("family", ["qwen2_5_vl", "llava_onevision"])
def test_training(saved, family, anchored):
    _train_and_compare(saved, family, anchored=anchored)


@pytest.mark.parametrize(
    ("family", "reentrant"),
    [
        ("qwen2_5_vl", False),
        ("qwen2_5_vl", True),
        ("llava_onevision", False),
        ("llava_onevision", True),
    ],
    ids=[
        "qwen2_5_vl-use_reentrant_false",
        "qwen2_5_vl-use_reentrant_true",
        "llava_onevision-use_reentrant_false",
        "llava_onevision-use_reentrant_true",
    ],
)
def test_training_gradient_checkpointing(saved, family, reentrant):
    # The recomputed forward of each checkpointed layer must see the same gates as the first.
    _train_and_compare(saved, family, anchored=True, reentrant=reentrant, steps=2)


def test_training_gradient_checkpointing_triton_backward(tmp_path):
    # head_dim 16 (the interpreter runs the Triton forward and backward kernels on CPU).
    tiny_model("llava_onevision", seed=4, hidden=64, layers=1).save_pretrained(tmp_path)
    saved = {"llava_onevision": tmp_path}
    _train_and_compare(
        saved, "llava_onevision", anchored=True, reentrant=False, steps=1, backend="triton"
    )


def test_enable_input_require_grads_with_gradient_checkpointing(saved):
    # Frozen model, only one query projection of the language model trains (as with
    # adapters): under reentrant checkpointing its gradient arrives only because the input
    # embeddings require grad.
    grads = _train_and_compare(
        saved,
        "qwen2_5_vl",
        anchored=True,
        reentrant=True,
        steps=2,
        trainable="language_model.layers.0.self_attn.q_proj",
        input_grads=True,
    )
    assert len(grads) == 2 and all(g.abs().sum() > 0 for g in grads.values())


# ---- custom 4D masks -----------------------------------------------------------------------


@torch.no_grad()
@pytest.mark.parametrize("kind", ["bool", "additive"])
def test_custom_4d_attention_mask(saved, kind, fresh_warnings):
    # Two continuations share one prompt (text + video) in a single row: a 4D mask keeps each
    # continuation from seeing the other, position_ids restart after the prompt. Each must
    # match the same continuation run as its own sequence, anchored by the same gates.
    from videoanchor.integrations.transformers.testing import collate

    model = load_saved(saved["llava_onevision"])
    handle = videoanchor.configure(model, **SSC)
    prompt = tiny_sample(model.config, [2], text=3, seed=40)
    conts = [torch.tensor([[5, 17, 33, 41]]), torch.tensor([[66, 8]])]
    P, (a, b) = prompt["input_ids"].shape[1], (c.shape[1] for c in conts)
    separate = [
        {
            "input_ids": torch.cat([prompt["input_ids"], c], dim=1),
            "attention_mask": torch.ones(1, P + c.shape[1], dtype=torch.long),
            "pixel_values_videos": prompt["pixel_values_videos"],
        }
        for c in conts
    ]
    ref = model(**collate(separate, padding_side="right")).logits
    ref_scores = handle.last_scores[0, :P].clone()

    L = P + a + b
    seq = torch.tensor([0] * P + [1] * a + [2] * b)
    pos = torch.cat([torch.arange(P), P + torch.arange(a), P + torch.arange(b)])
    visible = (pos[:, None] >= pos[None, :]) & (
        (seq[:, None] == seq[None, :]) | (seq[None, :] == 0)
    )
    mask = visible[None, None]
    if kind == "additive":
        mask = torch.where(mask, 0.0, torch.finfo(torch.float32).min)
    packed = {
        "input_ids": torch.cat([prompt["input_ids"], *conts], dim=1),
        "attention_mask": mask,
        "position_ids": pos[None],
        "pixel_values_videos": prompt["pixel_values_videos"],
    }
    with pytest.warns(UserWarning, match="custom 4D attention mask runs on the exact PyTorch path"):
        out = model(**packed).logits
    assert out.shape[1] == L and handle.last_anchored
    assert torch.equal(handle.last_scores[0, :P], ref_scores)
    tol = {"atol": 2e-5, "rtol": 1e-4}
    torch.testing.assert_close(out[0, : P + a], ref[0, : P + a], **tol)
    torch.testing.assert_close(out[0, P + a :], ref[1, P : P + b], **tol)
    # The gates apply on this path too: unanchored logits differ.
    videoanchor.configure(model, enabled=False)
    plain = model(**packed).logits
    assert (plain - out).abs().max().item() > 1e-2


def test_training_padding_free_matches_padded(saved):
    # Padding-free fine-tuning (packed rows, as with flash-attention's data collators): the
    # gradients equal those of the padded batch.
    from videoanchor.integrations.transformers.testing import collate

    model = load_saved(saved["llava_onevision"]).train()
    handle = videoanchor.configure(model, **SSC)
    samples = [
        tiny_sample(model.config, v, text=3 + 2 * i, seed=50 + i)
        for i, v in enumerate(([2], [2, 2]))
    ]
    lengths = [s["input_ids"].shape[1] for s in samples]
    weights = [torch.randn(n, model.config.text_config.vocab_size) for n in lengths]

    def grads_of(logits_rows):
        model.zero_grad(set_to_none=True)
        sum(((rows * w).sum() for rows, w in zip(logits_rows, weights, strict=True))).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    padded = model(**collate(samples, padding_side="right"), use_cache=False).logits
    ref = grads_of([padded[b, :n] for b, n in enumerate(lengths)])
    packed = model(**_packed(model, samples), use_cache=False).logits[0]
    assert len(handle.last_result) == len(samples)
    out = grads_of(list(packed.split(lengths)))
    _assert_grads_close(out, ref)


@torch.no_grad()
def test_triton_kernel_serves_packed_and_static_cache_masks(tmp_path):
    # head_dim 16: the smallest the Triton kernel takes (the interpreter runs it on CPU). The
    # varlen route and the static-cache slot mask (cache_seqlens + key padding; 260 slots,
    # so that the split-KV path serves the decode steps) must give the torch path's results.
    from transformers import StaticCache

    tiny_model("llava_onevision", seed=4, hidden=64, layers=1).save_pretrained(tmp_path)
    model = load_saved(tmp_path)
    videoanchor.configure(model, decode="all", **SSC)
    samples = [
        tiny_sample(model.config, v, text=3 + 2 * i, seed=30 + i)
        for i, v in enumerate(([2], [2, 2]))
    ]
    inputs = tiny_inputs(model.config, [[2], [2, 2]], text=[3, 6])
    gen = dict(max_new_tokens=2, min_new_tokens=2, do_sample=False)
    gen.update(output_logits=True, return_dict_in_generate=True)
    results = {}
    for backend in ("torch", "triton"):
        videoanchor.configure(model, attention_backend=backend)
        packed = model(**_packed(model, samples), use_cache=False).logits
        cache = StaticCache(config=model.config.text_config, max_cache_len=260)
        steps = model.generate(**clone_inputs(inputs), past_key_values=cache, **gen).logits
        results[backend] = (packed, torch.stack(steps))
    for got, want in zip(results["triton"], results["torch"], strict=True):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    "reentrant", [False, True], ids=["use_reentrant_false", "use_reentrant_true"]
)
def test_gradient_checkpointing_two_forwards_before_backward(saved, reentrant):
    # As in preference training: two anchored forwards (different videos, so different gates),
    # one backward. Each recomputed layer must replay the gates of its own forward, not the
    # handle's latest request.
    ours = load_saved(saved["llava_onevision"]).train()
    handle = videoanchor.configure(ours, **SSC)
    _enable_checkpointing(ours, reentrant)
    ref = REFERENCE.load(saved["llava_onevision"]).train()
    c = handle.config
    REFERENCE.alphas = (c.alpha_q, c.alpha_k, c.alpha_v)
    batches = [tiny_inputs(ours.config, [[2], [2, 2]], text=[3, 6], seed=s) for s in (60, 61)]

    def loss(model, inputs):
        return model(**clone_inputs(inputs), labels=inputs["input_ids"], use_cache=False).loss

    total, scores = 0, []
    for inputs in batches:
        total = total + loss(ours, inputs)
        scores.append(handle.last_scores)
    total.backward()
    ref_total = 0
    try:
        for inputs, s in zip(batches, scores, strict=True):
            REFERENCE.scores = s
            ref_total = ref_total + loss(ref, inputs)
    finally:
        REFERENCE.scores = None
    ref_total.backward()
    assert not torch.equal(scores[0], scores[1])
    torch.testing.assert_close(total.detach(), ref_total.detach(), atol=1e-5, rtol=1e-5)
    grads = {n: p.grad for n, p in ours.named_parameters() if p.grad is not None}
    _assert_grads_close(grads, {n: p.grad for n, p in ref.named_parameters() if p.grad is not None})


@torch.no_grad()
def test_unconfigured_text_model_runs_as_sdpa():
    """A causal model that is not a configured VLM (a text-only LM, or a VLM's text model on
    its own, as transformers' Qwen3-VL position-id tests build) attends as SDPA would,
    unanchored, with a one-time warning saying so."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    va_attention.reset_warnings()  # once per process: this test sees the first
    cfg = Qwen2Config(
        vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2,
    )  # fmt: skip
    ref = Qwen2ForCausalLM._from_config(cfg, attn_implementation="sdpa").eval()
    ours = Qwen2ForCausalLM._from_config(cfg, attn_implementation="videoanchor_triton").eval()
    ours.load_state_dict(ref.state_dict())
    ids = torch.randint(0, 97, (2, 11))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding
    with pytest.warns(UserWarning, match="not part of a configured VideoAnchor model"):
        out = ours(input_ids=ids, attention_mask=mask).logits
    expected = ref(input_ids=ids, attention_mask=mask).logits
    valid = mask.bool()
    assert torch.allclose(out[valid], expected[valid], rtol=0, atol=1e-5)
    gen = dict(attention_mask=mask, max_new_tokens=4, do_sample=False)
    assert torch.equal(ours.generate(ids, **gen), ref.generate(ids, **gen))
