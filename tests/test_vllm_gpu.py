"""The vLLM plugin on CUDA: a real vLLM engine on a GPU, and the CUDA backend's impl under
CUDA-graph capture and the sync checker. Marked ``gpu``; skipped, saying why, without a
CUDA device or without a CUDA build of vLLM 0.32 (benchmarks/run_gpu.sh runs ``-m gpu``).

NOT RUN YET: written without a GPU; the tolerances below are what the CPU engine meets
(tests/test_vllm.py) widened for TF32-free fp32 GPU matmuls in a different order.

- the tiny Qwen2.5-VL of tests/vllm_support.py, anchored, with CUDA graphs on (vLLM's
  default FULL_AND_PIECEWISE: decode batches replay full graphs through our backend), equals
  the transformers ``videoanchor_triton`` path (same checkpoint, image / 4-frame video,
  seed), equals the same engine eager and on model runner V1 (V2 is CUDA's default), and
  chunked prefill equals the whole prefill;
- the plugin installed, engine not configured: bitwise vLLM without the plugin;
- VideoAnchorCUDAImpl alone on CUDA tensors: do_kv_cache_update + forward under
  ``torch.cuda.set_sync_debug_mode("error")`` (no host synchronisation), and a captured CUDA
  graph replayed after the per-step buffers changed equals eager on the new values.
"""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import vllm_support as vs

try:
    import vllm
    from vllm.platforms import current_platform

    _PROBLEM = None
    if not current_platform.is_cuda():
        _PROBLEM = f"vllm {vllm.__version__} here is not a CUDA build ({type(current_platform).__name__})"  # fmt: skip
except Exception as err:  # ImportError, or a broken install
    _PROBLEM = f"vllm is not importable here ({type(err).__name__}: {err}); the GPU machine needs a CUDA build of vllm 0.32"  # fmt: skip

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(_PROBLEM is not None, reason=_PROBLEM or "")]
HERE = Path(__file__).resolve().parent
SSC = {
    "n_clusters": 4,
    "max_iter": 200,
    "cluster_share": "paper",
}  # vllm_support.SSC: the paper's share
IMG = {"media": "image:0"}
VID = {"media": "video:4:0"}
GPU_ENGINE = {"gpu_memory_utilization": 0.3, "kv_cache_memory_bytes": 1 << 30}
TOL = 2e-3  # logprobs, GPU fp32 vs the CPU transformers reference


def _run(tmp, name, spec, plugins=None, env_extra=None):
    return vs.run_worker(tmp, name, spec, plugins, cpu=False, env_extra=env_extra,
                         fail_on_startup_error=True)  # fmt: skip


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    import vllm_support as vs

    path = tmp_path_factory.mktemp("vllm_gpu_qwen2_5_vl")
    vs.save_checkpoint(path)
    return str(path)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("vllm_gpu_runs")


def _engine(**kw):
    return {"enable_prefix_caching": False, "enforce_eager": False, **GPU_ENGINE, **kw}


@pytest.fixture(scope="module")
def runs(checkpoint, work):
    anchored = {"videoanchor": SSC}
    specs = {
        "plain": ({"engine": _engine(), "batches": [[IMG, VID]]}, ""),
        "installed": ({"engine": _engine(), "batches": [[IMG, VID]]}, None),
        "graphs": ({"engine": _engine(additional_config=anchored),
                    "batches": [[IMG], [VID], [IMG, VID]]}, None),
        # CUDA's default runner is V2; the same engine on model runner V1.
        "graphs_v1": ({"engine": _engine(additional_config=anchored),
                       "batches": [[IMG], [VID]]}, None, {"VLLM_USE_V2_MODEL_RUNNER": "0"}),
        "eager": ({"engine": _engine(enforce_eager=True, additional_config=anchored),
                   "batches": [[IMG], [VID]]}, None),
        "chunked": ({"engine": _engine(enable_chunked_prefill=True, max_num_batched_tokens=64,
                                       additional_config=anchored),
                     "batches": [[VID]]}, None),
        "transformers": ({"mode": "transformers", "batches": [[IMG], [VID]]}, None),
    }  # fmt: skip
    out = {}
    for name, (spec, plugins, *env) in specs.items():
        out[name] = _run(work, name, {"checkpoint": checkpoint, **spec}, plugins, *env)
    return out


def _res(out, b, i=0):
    r = out["batches"][b]["results"][i]
    assert r is not None and "error" not in r, r
    return r


def _close(a, b, tol):
    assert a["tokens"] == b["tokens"], (a, b)
    diff = max((abs(x - y) for x, y in zip(a["logprobs"], b["logprobs"], strict=True)), default=0)
    assert diff <= tol, (diff, a, b)


def test_installed_but_not_configured_is_bitwise_vllm_on_cuda(runs):
    for i in range(2):
        a, b = _res(runs["plain"], 0, i), _res(runs["installed"], 0, i)
        assert a["tokens"] == b["tokens"]
        assert a["logprobs"] == b["logprobs"]


def test_anchored_cuda_engine_equals_the_transformers_path(runs):
    _close(_res(runs["graphs"], 0), _res(runs["transformers"], 0), TOL)
    _close(_res(runs["graphs"], 1), _res(runs["transformers"], 1), TOL)
    a, p = _res(runs["graphs"], 1), _res(runs["plain"], 0, 1)
    assert (
        a["tokens"] != p["tokens"]
        or max(abs(x - y) for x, y in zip(a["logprobs"], p["logprobs"], strict=False)) > 1e-3
    )  # anchoring has an effect


def test_cuda_graphs_equal_eager_and_batching_equals_single_runs(runs):
    for b in range(2):
        _close(_res(runs["graphs"], b), _res(runs["eager"], b), 1e-4)
        _close(_res(runs["graphs"], b), _res(runs["graphs_v1"], b), 1e-4)
        _close(_res(runs["graphs"], 2, b), _res(runs["graphs"], b), 1e-4)


def test_chunked_prefill_on_cuda_gives_the_whole_prefill_result(runs):
    _close(_res(runs["chunked"], 0), _res(runs["graphs"], 1), 1e-4)


# --- the impl alone on CUDA tensors ---------------------------------------------------------

HQ, HKV, D, BS, NB = 8, 2, 128, 16, 64


def _impl_setup(dtype):
    from videoanchor.integrations.vllm import backend_cuda, state

    dev = torch.device("cuda")
    state.device_step(dev, 256, 16)
    impl = backend_cuda.VideoAnchorCUDAImpl(HQ, D, 1 / math.sqrt(D), HKV, None, None, "auto")
    kv = torch.randn(NB, BS, HKV, 2 * D, device=dev, dtype=dtype).permute(0, 2, 1, 3)
    one = torch.ones((), device=dev)
    layer = SimpleNamespace(_k_scale=one, _v_scale=one, _q_scale=one)
    return impl, kv, layer, state


def _decode_meta(seq_lens, table, dev):
    from vllm.v1.attention.backends.triton_attn import TritonAttentionMetadata

    b = seq_lens.shape[0]
    return TritonAttentionMetadata(
        num_actual_tokens=b, max_query_len=1,
        query_start_loc=torch.arange(b + 1, dtype=torch.int32, device=dev),
        max_seq_len=NB * BS, seq_lens=seq_lens,  # a bound: read by nothing here
        block_table=table,
        slot_mapping=None, seq_threshold_3D=None, num_par_softmax_segments=16,
        softmax_segm_output=None, softmax_segm_max=None, softmax_segm_expsum=None,
        causal=True,
    )  # fmt: skip


def _fill_step(state, b, seed):
    g = torch.Generator().manual_seed(seed)
    s = torch.rand(b, generator=g)
    anchored = (torch.rand(b, generator=g) < 0.5).tolist()
    # one query per anchored sequence
    state.set_step(1, torch.log1p(3 * s), 1 + 2 * s, [int(a) for a in anchored])
    state.publish()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_impl_on_cuda_has_no_host_sync_and_replays_a_captured_graph(dtype):
    from videoanchor.kernels.paged import anchored_attention_paged

    impl, kv, layer, state = _impl_setup(dtype)
    dev = kv.device
    b = 6
    table = torch.randperm(NB, device=dev, dtype=torch.int32)[: b * 4].view(b, 4)
    seq_lens = torch.tensor([1, 17, 33, 64, 5, 40], dtype=torch.int32, device=dev)
    slot_mapping = torch.empty(b, dtype=torch.int64, device=dev)
    q = torch.randn(b, HQ, D, device=dev, dtype=dtype)
    k = torch.randn(b, HKV, D, device=dev, dtype=dtype)
    v = torch.randn(b, HKV, D, device=dev, dtype=dtype)
    out = torch.empty(b, HQ, D, device=dev, dtype=dtype)

    def set_positions(lens):
        seq_lens.copy_(lens)
        pos = (seq_lens - 1).long()
        slot_mapping.copy_(table.gather(1, (pos // BS)[:, None]).squeeze(1).long() * BS + pos % BS)

    def step():
        impl.do_kv_cache_update(layer, k, v, kv, slot_mapping)
        impl.forward(layer, q, k, v, kv, _decode_meta(seq_lens, table, dev), out)

    def expected():
        kc, vc = kv.transpose(1, 2).split(D, -1)
        ((kb, vs),) = [c for key, c in state.DEVICE_GATE_CACHES.items() if key[0] == str(dev)]
        return anchored_attention_paged(
            q, kc, vc, table, seq_lens, cu_seqlens_q=torch.arange(b + 1, dtype=torch.int32,
            device=dev), max_seqlen_q=1, key_bias_cache=kb[:-1].view(NB, BS),
            value_scale_cache=vs[:-1].view(NB, BS), seq_gated=state.DEVICE_STEPS[str(dev)]
            .seq_gated[:b], softmax_scale=1 / math.sqrt(D), backend="torch",
        )  # fmt: skip

    set_positions(seq_lens.clone())
    _fill_step(state, b, 0)
    step()  # eager warm-up: allocates the gate caches, compiles the kernels
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.testing.assert_close(out, expected(), atol=2e-2, rtol=2e-2)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    # A later step: new lengths, positions, gates, flags and inputs, in the same buffers.
    set_positions(torch.tensor([2, 18, 34, 60, 9, 41], dtype=torch.int32, device=dev))
    _fill_step(state, b, 1)
    for t in (q, k, v):
        t.normal_()
    out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out, expected(), atol=2e-2, rtol=2e-2)
