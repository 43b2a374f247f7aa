"""The graph-captured decode path for transformers (issue 77, item 4): ``generate`` with a
static cache and ``torch.compile`` in transformers' ``CompileConfig`` (fullgraph, inductor,
``mode="reduce-overhead"``, i.e. CUDA graph trees), anchoring on (``decode="all"``: every
decode step is a gated kernel call), on the Triton backend (the custom op a GPU runs; on the
CPU it runs in Triton's interpreter).

There is no CUDA graph to record on the CPU. What CUDA graph trees need of the compiled
decode step is checked instead on the graph AOTAutograd hands to inductor, with inductor's
own tests where it has them:

- one graph, no break (``fullgraph=True``), and no new one for a second request with
  another prompt length (a recompilation is also a new recording);
- no operator inductor refuses to record (``get_first_incompatible_cudagraph_node``: ops
  tagged unsafe, data-dependent shapes, i.e. host reads of device values);
- every mutated input is a static input (the static cache), as ``check_for_mutation``
  requires;
- every static input (weights, the static cache, the anchoring gates) has the same address
  at every step of both requests: CUDA graph trees record the graph again when one moves;
- the greedy tokens and logits equal eager's, and differ from unanchored decoding.

The slow test runs the recipe itself (inductor, "reduce-overhead") on the CPU, where inductor
compiles C++ (the machine has gcc): the only reason it gives for not recording a graph is
the CPU device. The GPU capture itself is tested in ``tests/test_host_overhead.py``
(``-m gpu``: the gated decode kernel in a CUDA graph) and not here.
"""

from __future__ import annotations

import pytest
import torch

import videoanchor
from videoanchor.integrations.transformers.testing import clone_inputs, tiny_inputs, tiny_model

SSC = {"n_clusters": 3, "max_iter": 300}
#: 300 slots: the decode steps take the split-KV kernel (>= 256 keys), as on the GPU; a
#: fixed size serves every prompt (transformers sizes a static cache per prompt otherwise).
GEN = {
    "max_new_tokens": 4,
    "min_new_tokens": 4,
    "do_sample": False,
    "cache_implementation": "static",
    "max_cache_len": 300,
    "return_dict_in_generate": True,
    "output_logits": True,
}
TOL = 2e-5  # fp32 logits: summation order only


@pytest.fixture(scope="module")
def anchored():
    """A tiny Qwen2.5-VL (head dim 16, the Triton kernel's smallest), anchored at every
    decode step, two left-padded requests of different prompt lengths, and their eager runs
    (anchored and not)."""
    model = tiny_model("qwen2_5_vl", seed=3, hidden=64, layers=1,
                       attn_implementation="videoanchor_triton")  # fmt: skip
    handle = videoanchor.configure(model, decode="all", attention_backend="triton", **SSC)
    requests = [
        tiny_inputs(model.config, [[4], [2]], text=[3, 6], seed=7),
        tiny_inputs(model.config, [[2], [2]], text=[5, 2], seed=11),
    ]
    assert requests[0]["input_ids"].shape[1] != requests[1]["input_ids"].shape[1]
    with torch.no_grad():
        eager = [model.generate(**clone_inputs(r), **GEN) for r in requests]
        videoanchor.configure(model, enabled=False)
        plain = [model.generate(**clone_inputs(r), **GEN) for r in requests]
        videoanchor.configure(model, enabled=True)
    return model, handle, requests, eager, plain


def _compiled_generate(model, requests, compile_config, reuse_cache=False):
    """Each request through ``generate`` with the decode step compiled; the number of
    graphs dynamo made. ``reuse_cache``: one ``StaticCache`` for every request, reset in
    between (else ``cache_implementation="static"``: a new cache per call)."""
    from torch._dynamo.utils import counters
    from transformers import StaticCache

    gen = dict(GEN)
    if reuse_cache:
        cache = StaticCache(config=model.config, max_cache_len=gen.pop("max_cache_len"))
        del gen["cache_implementation"]

    compile_config._compile_all_devices = True  # transformers compiles on CPU only then
    previous = model.generation_config.compile_config
    model.generation_config.compile_config = compile_config
    torch._dynamo.reset()
    counters.clear()
    try:
        out = []
        for r in requests:
            if reuse_cache:
                cache.reset()
                gen["cache"] = cache
            with torch.no_grad():
                out.append(model.generate(**clone_inputs(r), **gen))
        graphs = counters["stats"]["unique_graphs"]
    finally:
        model.generation_config.compile_config = previous
        torch._dynamo.reset()
    return out, graphs


def _assert_as_eager(compiled, eager, plain):
    for c, e, p in zip(compiled, eager, plain, strict=True):
        assert torch.equal(c.sequences, e.sequences)
        diff = max((a - b).abs().max().item() for a, b in zip(c.logits, e.logits, strict=True))
        assert diff <= TOL, diff
        # the gates act in the compiled steps: unanchored decoding is far from them
        gap = max(
            (a - b).abs().max().item() for a, b in zip(c.logits[1:], p.logits[1:], strict=True)
        )
        assert gap > 100 * TOL, gap


def _cuda_graph_tree_checks():
    """(backend, record): a torch.compile backend that runs AOTAutograd as inductor does
    (input mutations kept in the graph) and then, instead of inductor, records what CUDA
    graph trees check of the graph (``record["graphs"]``: static and mutated input indices,
    the first unsafe node) and of every call (``record["static_ptrs"]``: the addresses of
    the static inputs), and runs the graph as it is. A function, not an object: transformers
    deep-copies its generation config, and a copied backend is another backend."""
    from torch._dynamo.backends.common import aot_autograd
    from torch._inductor.utils import get_first_incompatible_cudagraph_node

    record = {"graphs": [], "static_ptrs": []}

    def compile_graph(gm, example_inputs):
        meta = torch._guards.TracingContext.get().fw_metadata
        static = list(meta.static_input_indices)
        record["graphs"].append({
            "static": static,
            "mutated": [i for i, x in enumerate(meta.input_info) if x.mutates_data],
            "unsafe": get_first_incompatible_cudagraph_node(gm),
            "nodes": [str(n.target) for n in gm.graph.nodes if n.op == "call_function"],
        })  # fmt: skip

        def run(*args):
            record["static_ptrs"].append([args[i].data_ptr() for i in static])
            return gm(*args)

        return run

    aot = aot_autograd(fw_compiler=compile_graph, keep_inference_input_mutations=True)

    def backend(gm, example_inputs):
        return aot(gm, example_inputs)

    return backend, record


def test_compiled_anchored_decode_is_capturable_and_equals_eager(anchored):
    """Fullgraph decode steps of two requests on a static cache: one graph, what CUDA graph
    trees need of it (see the module docstring), and eager's tokens and logits."""
    from transformers import CompileConfig

    model, handle, requests, eager, plain = anchored
    backend, checks = _cuda_graph_tree_checks()
    compiled, graphs = _compiled_generate(
        model, requests, CompileConfig(fullgraph=True, backend=backend, mode=None), reuse_cache=True
    )
    _assert_as_eager(compiled, eager, plain)
    assert graphs == 1 and len(checks["graphs"]) == 1, (graphs, len(checks["graphs"]))
    g = checks["graphs"][0]
    assert "videoanchor.anchored_attention_fwd.default" in g["nodes"]  # the kernel's op
    assert g["unsafe"] is None, g["unsafe"]
    assert g["mutated"] and set(g["mutated"]) <= set(g["static"]), g
    # (GEN's new tokens - 1) compiled steps per request, every static input at one address
    assert len(checks["static_ptrs"]) == 2 * (GEN["max_new_tokens"] - 1)
    columns = zip(*checks["static_ptrs"], strict=True)
    moved = [g["static"][j] for j, ptrs in enumerate(columns) if len(set(ptrs)) > 1]
    assert moved == [], moved
    # the gates are among them: the handle's buffers, rewritten in place per request
    kb, vs = handle._gate_pool[torch.device("cpu")]
    assert {kb.data_ptr(), vs.data_ptr()} <= set(checks["static_ptrs"][0])


def test_gate_buffers_are_per_request_with_gradients(anchored):
    """With gradients on, a request keeps gate buffers of its own: a layer recomputed by
    gradient checkpointing reads its request's gates after the next request started."""
    model, handle, requests, _, _ = anchored
    model(**clone_inputs(requests[0]))
    first = handle._request.buffers[torch.device("cpu")].value_scale
    kept = first.clone()
    assert (kept > 1).any()  # anchored
    model(**clone_inputs(requests[1]))
    second = handle._request.buffers[torch.device("cpu")].value_scale
    assert second.data_ptr() != first.data_ptr() and torch.equal(first, kept)


@pytest.mark.parametrize(
    "alphas_v, scales, expected",
    [
        ([2.5], [1.0, 1.3, 3.2], (1.0, 3.5)),  # the configuration's, not the data's 3.2
        ([2.5, 4.0], [1.0, 2.0], (1.0, 5.0)),  # per-row strengths: all of them
        ([-0.5], [0.6, 1.0], (0.5, 1.0)),  # a weakening alpha_v
        ([2.5], [1.0, 4.25], (1.0, 4.25)),  # scales past the bound widen it (a promise)
        ([-2.0], [0.25, 1.0], (0.25, 1.0)),  # 1 + alpha_v <= 0: only the data bounds it
    ],
)
def test_value_scale_range_is_the_configuration_s(alphas_v, scales, expected):
    from videoanchor.integrations.transformers.gates import value_scale_range_for

    assert value_scale_range_for(alphas_v, torch.tensor([scales])) == expected


@pytest.mark.slow
def test_reduce_overhead_recipe_on_the_cpu(anchored, monkeypatch):
    """The documented recipe itself: ``CompileConfig(fullgraph=True)`` (inductor,
    "reduce-overhead": transformers' defaults), ``cache_implementation="static"``. Inductor compiles the decode step (C++ on the CPU); it
    records no CUDA graph here, and the only reason it gives is that no device is CUDA (it
    would name an unsafe operator or a data-dependent shape first, outside graph partitions). About 1-2 min on 2
    cores with an empty inductor cache."""
    from torch._inductor import output_code
    from transformers import CompileConfig

    model, _, requests, eager, plain = anchored
    reasons = []
    post_compile = output_code.CompiledFxGraph.post_compile

    def recording(self, *args, **kwargs):  # runs on an inductor cache hit too
        reasons.append(self.disabled_cudagraphs_reason)
        return post_compile(self, *args, **kwargs)

    monkeypatch.setattr(output_code.CompiledFxGraph, "post_compile", recording)
    config = CompileConfig(fullgraph=True)  # inductor, "reduce-overhead": the defaults
    assert (config.backend, config.mode) == ("inductor", "reduce-overhead")
    compiled, graphs = _compiled_generate(model, requests, config)
    _assert_as_eager(compiled, eager, plain)
    assert graphs == 1
    # "cpu device (...)"; with inductor's graph partitions (torch >= 2.9's default) the CPU
    # nodes leave the device map first and the message lists no device at all
    no_cuda = (
        "skipping cudagraphs due to cpu device",
        "skipping cudagraphs due to multiple devices:",
    )
    assert reasons and all(
        r is not None and (r.startswith(no_cuda[0]) or r.strip() == no_cuda[1]) for r in reasons
    ), reasons
