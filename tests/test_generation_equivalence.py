"""Generation with ``attn_implementation="videoanchor_triton"`` gives what SDPA gives (issue 18).

The breadth of transformers' ``GenerationTesterMixin`` on our tiny models: for the six VLM
families and a text-only Llama, anchoring off and on, prompts left-padded or not:

- static cache against dynamic cache (and, anchoring off, both against SDPA);
- compiled static cache (``fullgraph``) against eager (three cases, see below);
- continuing generation from returned ``past_key_values`` (dynamic and static);
- a left-padded batch against its rows run alone;
- beam search against SDPA's / the dynamic cache's, and against greedy where they must agree;
- assisted decoding and prompt-lookup decoding against greedy.

Anchoring off, SDPA is the oracle. Anchoring on (``decode="all"``: the gates act at every
step), SDPA cannot express the gates: the prefill logits are checked against the float64
eager reference with the same gates (``EagerAnchorReference``), the rest against our own
dynamic-cache greedy run. Tolerance ``TOL``: fp32 summation order, the bound SDPA's own
static and dynamic runs are checked to meet here too.

Cost: about 3 min of CPU on 2 cores (the three compiled cases about 30 s). Runs are
memoised per (model, inputs, options) so that tests share their baselines, and SSC results
per set of visual tokens.
"""

import pytest
import torch

import videoanchor
from videoanchor.integrations.transformers import attention as va_attention
from videoanchor.integrations.transformers import find_handle
from videoanchor.integrations.transformers.testing import (
    TINY_FAMILIES,
    TOKENS,
    EagerAnchorReference,
    clone_inputs,
    collate,
    tiny_model,
    tiny_sample,
)

FAMILIES = (*TINY_FAMILIES, "llama")
SSC = {"n_clusters": 3, "max_iter": 300}
SPECIAL = [TOKENS[k] for k in ("image", "video", "vision_start", "vision_end", "eos", "pad")]
NEW = 3
GEN = {
    "max_new_tokens": NEW,
    "min_new_tokens": NEW,
    "do_sample": False,
    "suppress_tokens": SPECIAL,
    "return_dict_in_generate": True,
    "output_logits": True,
}
# fp32 models; exact torch attention path or SDPA: summation order only. Issue 18 was 4e-2
# to 2 on these models.
TOL = 2e-5
ANCHORING = ["off", "on"]
PADDING = [False, True]
REFERENCE = EagerAnchorReference(name="videoanchor_generation_reference").register()


def _cases(anchoring=ANCHORING, padding=PADDING):
    """(family, anchoring, padded); the text-only Llama has no anchoring."""
    return [
        pytest.param(f, a, p, id=f"{f}-{a}-{'padded' if p else 'unpadded'}")
        for f in FAMILIES
        for a in anchoring
        for p in padding
        if not (f == "llama" and a != "off")
    ]


pytestmark = pytest.mark.usefixtures("memoised_ssc")  # tests/conftest.py


# ---- models and prompts ----------------------------------------------------------------


def _tiny_llama(attn_implementation, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        pad_token_id=TOKENS["pad"],
        bos_token_id=TOKENS["bos"],
        eos_token_id=TOKENS["eos"],
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM._from_config(config, attn_implementation=attn_implementation)
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(0.3 * torch.randn_like(p))
    return model.eval()


def _build(family, attn_implementation, seed=1):
    if family == "llama":
        return _tiny_llama(attn_implementation, seed)
    model = tiny_model(family, seed=seed, attn_implementation=attn_implementation)
    vc = getattr(model.config, "vision_config", None)
    if vc is not None:
        vc._attn_implementation_internal = "sdpa"
    return model


class Models:
    """SDPA, ours, the float64 eager reference and an assistant of one family (same weights
    for the first three), built on first use."""

    def __init__(self, family):
        self.family = family
        self.sdpa = _build(family, "sdpa")
        self.ours = _build(family, "videoanchor_triton")
        self.ours.load_state_dict(self.sdpa.state_dict())
        self._ref = self._assistant = None

    @property
    def ref(self):
        if self._ref is None:
            self._ref = _build(self.family, REFERENCE.name)
            self._ref.load_state_dict(self.sdpa.state_dict())
        return self._ref

    @property
    def assistant(self):
        if self._assistant is None:
            self._assistant = _build(self.family, "videoanchor_triton", seed=5)
            if self.family != "llama":
                videoanchor.configure(self._assistant, enabled=False)
        return self._assistant

    def anchoring(self, anchoring):
        """Configure ours; returns its handle (None for the text-only model)."""
        if self.family == "llama":
            return None
        if anchoring == "off":
            return videoanchor.configure(self.ours, enabled=False)
        return videoanchor.configure(self.ours, enabled=True, decode="all", **SSC)


@pytest.fixture(scope="module")
def bank():
    built = {}

    def get(family):
        if family not in built:
            built[family] = Models(family)
        return built[family]

    return get


def _samples(family, padded):
    """Two prompts: of the same length (padded=False) or not (left-padded in a batch)."""
    texts = (3, 8) if padded else (5, 5)
    if family == "llama":
        gen = torch.Generator().manual_seed(4)
        out = []
        for t in texts:
            text = torch.randint(3, 110, (1, t + 4), generator=gen)
            ids = torch.cat([torch.tensor([[TOKENS["bos"]]]), text], dim=1)
            out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
        return out
    from videoanchor.integrations.transformers.testing import tiny_config

    config = tiny_config(family)
    return [tiny_sample(config, [2], text=t, seed=30 + i) for i, t in enumerate(texts)]


def _batch(family, padded):
    samples = _samples(family, padded)
    batch = collate(samples, padding_side="left")
    assert bool((batch["attention_mask"] == 0).any()) == padded
    return batch


def _left_pad(inputs, n):
    """A batch-1 prompt with ``n`` more padding tokens on the left."""
    out = dict(inputs)
    for key in ("input_ids", "attention_mask", "mm_token_type_ids"):
        if key in inputs:
            out[key] = torch.nn.functional.pad(inputs[key], (n, 0), value=0)
    return out


# ---- running and comparing ---------------------------------------------------------------

_runs = {}


def _key(model, inputs, kw):
    parts = [id(model), repr(sorted((k, repr(v)) for k, v in kw.items()))]
    handle = find_handle(model)
    parts.append(repr(handle.config) if handle is not None else "")
    for k in sorted(inputs):
        v = inputs[k]
        parts.append((k, v.numpy().tobytes() if torch.is_tensor(v) else repr(v)))
    return repr(parts)


@torch.no_grad()
def _generate(model, inputs, memo=True, **kw):
    """(sequences, logits (steps, rows, vocab)) of a generate call; memoised by content."""
    key = _key(model, inputs, kw) if memo else None
    if key is not None and key in _runs:
        return _runs[key]
    out = model.generate(**clone_inputs(inputs), **{**GEN, **kw})
    result = (out.sequences, torch.stack(out.logits), out)
    if key is not None:
        _runs[key] = result
    return result


def _assert_same(a, b, what, tol=TOL):
    seq_a, logits_a = a[0], a[1]
    seq_b, logits_b = b[0], b[1]
    assert torch.isfinite(logits_a).all(), what
    diff = (logits_a.double() - logits_b.double()).abs().max().item()
    assert diff <= tol, f"{what}: logits differ by {diff:.3g} (tolerance {tol})"
    assert torch.equal(seq_a, seq_b), f"{what}: other tokens\n{seq_a}\n{seq_b}"


# ---- the slot mask itself -------------------------------------------------------------------


def _rebuild(mask, **kw):
    """What a model does with the 2D mask generate made: create_causal_mask casts it to bool
    and calls the mask function again (Llama, Qwen3-VL)."""
    return va_attention.videoanchor_mask(attention_mask=mask.to(torch.bool), **kw)


@pytest.mark.parametrize("q_offset", ["int", "tensor"])
@pytest.mark.parametrize("q_length", [1, 5])
def test_slot_mask_is_a_fixed_point_of_a_rebuild(q_offset, q_length):
    user = torch.tensor([[0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1]])
    past = 0 if q_length == 5 else 6
    user = user[:, : past + q_length]
    offset = torch.tensor(past) if q_offset == "tensor" else past
    kw = dict(batch_size=2, q_length=q_length, kv_length=12, q_offset=offset)
    first = va_attention.videoanchor_mask(attention_mask=user, **kw)
    filled = past + q_length
    expected = torch.full((2, 12), -1, dtype=torch.int8)
    expected[:, :filled] = user[:, :filled].to(torch.int8)
    assert torch.equal(first, expected)
    assert torch.equal(_rebuild(first, **kw), first)
    assert torch.equal(_rebuild(_rebuild(first, **kw), **kw), first)
    # no user mask: every filled slot visible
    bare = va_attention.videoanchor_mask(attention_mask=None, **kw)
    assert bare.tolist() == [[1] * filled + [-1] * (12 - filled)] * 2
    assert torch.equal(_rebuild(bare, **kw), bare)


def test_slot_mask_current_tokens():
    slots = torch.tensor([[0, 0, 1, 1, 1, -1, -1], [1, 1, 1, 1, 1, -1, -1]], dtype=torch.int8)
    got = va_attention.current_tokens_of_slot_mask(slots, 4)
    assert got.tolist() == [[False, True, True, True], [True, True, True, True]]


def test_slot_mask_with_symbolic_offsets_under_compile():
    # Under dynamic-shape compilation a dynamic cache's offsets are SymInts: the mask
    # function traces in one graph and returns what it returns eagerly.
    def mask_for(user, q, spare):
        return va_attention.videoanchor_mask(
            batch_size=2,
            q_length=q.shape[-1],
            kv_length=user.shape[-1] + spare.shape[-1],
            q_offset=user.shape[-1] - q.shape[-1],
            attention_mask=user,
        )

    compiled = torch.compile(mask_for, fullgraph=True, dynamic=True, backend="eager")
    for n, spare in ((6, 0), (8, 0), (6, 3), (9, 3)):
        user = torch.ones(2, n, dtype=torch.long)
        user[0, :2] = 0
        args = (user, torch.zeros(1, 2), torch.zeros(spare))
        eager, traced = mask_for(*args), compiled(*args)
        assert eager.dtype == (torch.bool if spare == 0 else torch.int8)
        assert traced.dtype == eager.dtype and torch.equal(traced, eager)


@torch.no_grad()
@pytest.mark.filterwarnings("ignore:.*not part of a configured VideoAnchor model")
@pytest.mark.parametrize("q_length", [3, 1])
def test_attention_reads_the_rebuilt_mask_as_sdpa_does(q_length):
    # One layer's attention over a 10-slot static cache with 6 filled, row 0 left-padded by 2:
    # the mask as generate makes it, then rebuilt by the model, against SDPA's 4D mask.
    from transformers.masking_utils import sdpa_mask

    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, q_length, 8, generator=gen)
    k = torch.randn(2, 2, 10, 8, generator=gen)
    v = torch.randn(2, 2, 10, 8, generator=gen)
    user = torch.ones(2, 6, dtype=torch.long)
    user[0, :2] = 0
    kw = dict(batch_size=2, q_length=q_length, kv_length=10, q_offset=6 - q_length)
    rebuilt = _rebuild(va_attention.videoanchor_mask(attention_mask=user, **kw), **kw)

    class Module(torch.nn.Module):
        is_causal = True

    out, _ = va_attention.videoanchor_attention_forward(Module(), q, k, v, rebuilt, scaling=0.3)
    full = sdpa_mask(
        batch_size=2,
        kv_length=10,
        q_length=q_length,
        q_offset=6 - q_length,
        attention_mask=user.bool(),
        allow_is_causal_skip=False,
        device=q.device,
    )
    ref = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), attn_mask=full, scale=0.3
    ).transpose(1, 2)
    valid = torch.ones(2, q_length, dtype=torch.bool)
    valid[0, : max(0, 2 - (6 - q_length))] = False  # padding queries: no visible key
    assert (out - ref)[valid].abs().max().item() < 1e-5


# ---- static cache against dynamic cache ----------------------------------------------------


@pytest.mark.parametrize("family, anchoring, padded", _cases())
def test_static_cache_equals_dynamic(bank, family, anchoring, padded):
    m = bank(family)
    handle = m.anchoring(anchoring)
    batch = _batch(family, padded)
    dynamic = _generate(m.ours, batch)
    static = _generate(m.ours, batch, cache_implementation="static")
    _assert_same(static, dynamic, "ours: static vs dynamic cache")
    sdpa = _generate(m.sdpa, batch)
    if anchoring == "off":
        # The oracle meets the same tolerance between its own static and dynamic runs.
        _assert_same(_generate(m.sdpa, batch, cache_implementation="static"), sdpa, "sdpa")
        _assert_same(dynamic, sdpa, "ours vs sdpa")
        return
    assert handle.last_anchored
    gap = (dynamic[1] - sdpa[1]).abs().max().item()
    assert gap > 1e-2, f"the gates changed the logits by {gap} only: nothing is tested"
    # Prefill (the step issue 18 got wrong): the float64 eager reference with the same gates.
    scores = handle.last_scores  # of the static run, the last one
    REFERENCE.scores = scores
    REFERENCE.alphas = (handle.config.alpha_q, handle.config.alpha_k, handle.config.alpha_v)
    try:
        with torch.no_grad():
            ref = m.ref(**clone_inputs(batch), use_cache=False).logits[:, -1]
    finally:
        REFERENCE.scores = None
    diff = (static[1][0].double() - ref.double()).abs().max().item()
    assert diff < 1e-4, f"static-cache prefill vs float64 reference: {diff:.3g}"


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_static_cache_equals_dynamic_decode_prefill(bank, family):
    # decode="prefill" (the paper): gates at the prefill only, plain attention afterwards.
    m = bank(family)
    videoanchor.configure(m.ours, enabled=True, decode="prefill", **SSC)
    batch = _batch(family, True)
    dynamic = _generate(m.ours, batch)
    _assert_same(_generate(m.ours, batch, cache_implementation="static"), dynamic, "static")


# ---- compiled static cache ---------------------------------------------------------------


# Compilation is the expensive part (about 8 s of CPU per case): three cases, the families
# whose language model rebuilds the mask generate made (issue 18), left-padded.
@pytest.mark.parametrize(
    "family, anchoring",
    [("llama", "off"), ("qwen3_vl", "on"), ("llava_next_video", "on")],
)
def test_compiled_static_cache_equals_eager(bank, family, anchoring):
    from torch._dynamo.utils import counters
    from transformers import CompileConfig

    m = bank(family)
    m.anchoring(anchoring)
    batch = _batch(family, True)
    truth = _generate(m.sdpa if anchoring == "off" else m.ours, batch)
    config = CompileConfig(fullgraph=True, backend="eager", mode=None)
    config._compile_all_devices = True  # transformers compiles decode steps on CPU only then
    previous = m.ours.generation_config.compile_config
    m.ours.generation_config.compile_config = config
    torch._dynamo.reset()
    counters.clear()
    try:
        compiled = _generate(m.ours, batch, memo=False, cache_implementation="static")
        graphs = counters["stats"]["unique_graphs"]
    finally:
        m.ours.generation_config.compile_config = previous
        torch._dynamo.reset()
    _assert_same(compiled, truth, "compiled static cache vs eager")
    # One graph, traced at the first decode step and reused by the later ones.
    assert graphs == 1


# ---- continuing from returned past_key_values --------------------------------------------

_VISUAL_KEYS = ("pixel_values", "pixel_values_videos", "video_grid_thw", "image_grid_thw")


def _continue(model, batch, cache):
    """NEW tokens in two generate calls, the second one on the first one's cache."""
    from transformers import StaticCache

    kw = {}
    if cache == "static":
        n = batch["input_ids"].shape[1] + NEW
        kw["past_key_values"] = StaticCache(config=model.config, max_cache_len=n)
    first = _generate(model, batch, memo=False, max_new_tokens=2, min_new_tokens=2, **kw)
    seq = first[0]
    more = {k: v for k, v in batch.items() if k not in _VISUAL_KEYS}  # the cache holds them
    grow = seq.shape[1] - batch["input_ids"].shape[1]
    more["input_ids"] = seq
    more["attention_mask"] = torch.nn.functional.pad(batch["attention_mask"], (0, grow), value=1)
    if "mm_token_type_ids" in more:
        more["mm_token_type_ids"] = torch.nn.functional.pad(more["mm_token_type_ids"], (0, grow))
    second = _generate(
        model,
        more,
        memo=False,
        max_new_tokens=NEW - 2,
        min_new_tokens=NEW - 2,
        past_key_values=first[2].past_key_values,
    )
    return second[0], torch.cat([first[1], second[1]])


@pytest.mark.parametrize("family, anchoring, padded", _cases())
def test_continue_from_past_key_values(bank, family, anchoring, padded):
    m = bank(family)
    m.anchoring(anchoring)
    batch = _batch(family, padded)
    truth = _generate(m.sdpa if anchoring == "off" else m.ours, batch)
    for cache in ("dynamic", "static"):
        _assert_same(_continue(m.ours, batch, cache), truth, f"continued, {cache} cache")


# ---- left padding ------------------------------------------------------------------------


@pytest.mark.parametrize("family, anchoring, padded", _cases(padding=[True]))
def test_left_padded_batch_equals_rows_alone(bank, family, anchoring, padded):
    m = bank(family)
    m.anchoring(anchoring)
    samples = _samples(family, padded)
    batch = collate(samples, padding_side="left")
    width = batch["input_ids"].shape[1]
    runs = {c: _generate(m.ours, batch, **k) for c, k in
            (("dynamic", {}), ("static", {"cache_implementation": "static"}))}  # fmt: skip
    for b, sample in enumerate(samples):
        alone = _generate(m.ours, sample)
        n = sample["input_ids"].shape[1]
        for cache, (seq, logits, _) in runs.items():
            _assert_same(
                (seq[b : b + 1, width:], logits[:, b : b + 1]),
                (alone[0][:, n:], alone[1]),
                f"row {b} of a left-padded batch, {cache} cache",
            )


# ---- beam search -------------------------------------------------------------------------

BEAMS = {"num_beams": 2, "num_return_sequences": 2, "output_scores": True}


@pytest.mark.parametrize("family, anchoring, padded", _cases())
def test_beam_search(bank, family, anchoring, padded):
    m = bank(family)
    m.anchoring(anchoring)
    batch = _batch(family, padded)
    runs = {
        "dynamic": _generate(m.ours, batch, **BEAMS)[2],
        "static": _generate(m.ours, batch, cache_implementation="static", **BEAMS)[2],
    }
    if anchoring == "off":
        runs["sdpa"] = _generate(m.sdpa, batch, **BEAMS)[2]
    ref = runs["dynamic"]
    for name, out in runs.items():
        assert torch.equal(out.sequences, ref.sequences), name
        diff = (out.sequences_scores - ref.sequences_scores).abs().max().item()
        assert diff <= TOL, f"{name}: beam scores differ by {diff:.3g}"
    if padded:
        # One new token: the best beam is the greedy token.
        one = {"max_new_tokens": 1, "min_new_tokens": 1}
        beam = _generate(m.ours, batch, **BEAMS, **one)[2]
        greedy = _generate(m.ours, batch)
        assert torch.equal(beam.sequences[::2], greedy[0][:, : beam.sequences.shape[1]])


# ---- assisted and prompt-lookup decoding --------------------------------------------------


@pytest.mark.parametrize("family, anchoring, padded", _cases())
def test_assisted_and_prompt_lookup_decoding_equal_greedy(bank, family, anchoring, padded):
    # Both need a batch of one; padded: that row with left padding. Unpadded, the prompt and
    # its greedy run are those of test_left_padded_batch_equals_rows_alone (memoised).
    m = bank(family)
    handle = m.anchoring(anchoring)
    prompt = _samples(family, True)[0]
    if padded:
        prompt = _left_pad(prompt, 3)
    greedy = _generate(m.ours, prompt)
    if anchoring == "off":
        _assert_same(greedy, _generate(m.sdpa, prompt), "greedy vs sdpa")
    for name, kw in (
        ("assisted", {"assistant_model": m.assistant}),
        ("prompt lookup", {"prompt_lookup_num_tokens": 2}),
    ):
        out = _generate(m.ours, prompt, memo=False, **kw)
        _assert_same(out, greedy, name)
        if handle is not None and anchoring == "on":
            assert handle.last_anchored
