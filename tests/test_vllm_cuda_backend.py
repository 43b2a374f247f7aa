"""The plugin's CUDA attention backend without a GPU (vLLM venv of .ci/run).

- tests/vllm_cuda_backend_check.py (own process, TRITON_INTERPRET=1) runs the real
  VideoAnchorCUDAImpl and vLLM's TritonAttentionImpl on CPU tensors: do_kv_cache_update +
  forward over three engine-like steps (chunked prefill continued, prefills, decodes,
  padding tokens, scattered blocks, GQA, gated and ungated sequences), fp32 and fp16,
  against a float64 reference and vLLM's own Triton attention (ungated rows);
- in this process: how an engine config picks the backend (anchored CUDA -> CUSTOM = ours,
  unanchored -> untouched), the start-up refusals, and that the CUDA forward/update path
  calls nothing that reads a device value on the host.

Cost here: ~40 s (the interpreter subprocess; vLLM's import is ~15 s of it).
"""

from __future__ import annotations

import ast
import inspect
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import vllm_support as vs

_PROBLEM = vs.vllm_problem()
pytestmark = pytest.mark.skipif(_PROBLEM is not None, reason=_PROBLEM or "")
HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def interp(tmp_path_factory):
    out = tmp_path_factory.mktemp("vllm_cuda_backend") / "out.json"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(HERE.parent), str(HERE / "vllm_site"), str(HERE)])
    env["TRITON_INTERPRET"] = "1"
    env.setdefault("OMP_NUM_THREADS", "1")
    proc = subprocess.run(
        [sys.executable, str(HERE / "vllm_cuda_backend_check.py"), str(out)],
        env=env, cwd=str(HERE), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    if proc.returncode != 0 or not out.exists():
        pytest.fail(f"check script failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(out.read_text())


# Outputs are O(1) to O(4) (value scales up to 2.5): fp16 rounding is ~1e-3 of that.
DTYPES = {"float32": 2e-5, "float16": 5e-3}


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_cuda_impl_matches_the_float64_reference(interp, dtype):
    assert interp["kernel_backend"] == "triton"
    res = interp[dtype]
    assert len(res["steps"]) == 3
    # Step 1 has a query longer than 16: the paged prefill kernel; steps 2 (chunks of up to
    # 15 queries) and 3 (decodes): the split-KV decode kernel.
    prefill, decode = (
        ["_anchored_prefill_kernel"],
        sorted(["_anchored_decode_split_kernel", "_anchored_decode_merge_kernel"]),
    )
    assert [st["kernels"] for st in res["steps"]] == [prefill, decode, decode]
    for st in res["steps"]:
        assert st["ours_finite"], st
        assert st["ours_vs_ref"] <= DTYPES[dtype], st
        # The same function's exact torch path (the CPU engine's) on the same caches.
        assert st["torch_path_vs_ref"] <= DTYPES[dtype], st
        assert st["ours_vs_torch_path"] <= DTYPES[dtype], st
        # Padding tokens (beyond num_actual_tokens) are not written, as in vLLM.
        assert st["padding_rows_untouched"], st
        # The gates have an effect on the gated rows.
        assert st["gated_vs_plain"] is not None and st["gated_vs_plain"] > 0.1, st


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_ungated_rows_equal_vllms_own_triton_attention(interp, dtype):
    res = interp[dtype]
    for st in res["steps"]:
        assert st["vllm_vs_ref_plain"] <= DTYPES[dtype], st  # the comparison is meaningful
        assert st["ours_vs_vllm_ungated"] is not None
        assert st["ours_vs_vllm_ungated"] <= DTYPES[dtype], st
        assert st["kv_equal_vllm"], st  # K/V written by vLLM's own kernel, same layout


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_gates_land_in_their_slots_and_padding_in_the_dummy_slot(interp, dtype):
    res = interp[dtype]
    assert res["gate_cache_exact"]
    assert res["gate_cache_shape"] == [9 * 16 + 1]


# --- engine-config selection and start-up checks (in this process) -------------------------


@pytest.fixture
def registry():
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    custom = AttentionBackendEnum.CUSTOM
    saved = custom.get_path() if custom.is_overridden() else None
    custom.clear_override()
    yield AttentionBackendEnum
    custom.clear_override()
    if saved is not None:
        from vllm.v1.attention.backends.registry import register_backend

        register_backend(custom, saved)


def _cfg(videoanchor=None, backend=None, cache_dtype="auto", per_kind=None):
    from vllm.config import AttentionConfig

    att = AttentionConfig(backend=backend)
    if per_kind:
        att.backend_per_kind = per_kind
    return SimpleNamespace(
        additional_config={"videoanchor": videoanchor} if videoanchor is not None else {},
        attention_config=att,
        cache_config=SimpleNamespace(cache_dtype=cache_dtype),
        model_config=SimpleNamespace(hf_config=SimpleNamespace(model_type="qwen2_5_vl")),
    )


def test_unanchored_config_keeps_vllms_backend(registry):
    from videoanchor.integrations.vllm import select_cuda_backend

    for backend in (None, "FLASH_ATTN", "TRITON_ATTN"):
        cfg = _cfg(backend=backend)
        before = cfg.attention_config.backend
        select_cuda_backend(cfg)
        assert cfg.attention_config.backend == before
    assert not registry.CUSTOM.is_overridden()
    assert registry.TRITON_ATTN.get_path() == registry.TRITON_ATTN.value


def test_anchored_cuda_config_selects_the_videoanchor_backend(registry):
    from videoanchor.integrations.vllm import CUDA_BACKEND, select_cuda_backend
    from videoanchor.integrations.vllm.backend_cuda import VideoAnchorCUDABackend

    for backend in (None, "TRITON_ATTN"):
        cfg = _cfg({"alpha_k": 2.0}, backend=backend)
        select_cuda_backend(cfg)
        assert cfg.attention_config.backend == registry.CUSTOM
    assert registry.CUSTOM.get_path() == CUDA_BACKEND
    assert registry.CUSTOM.get_class() is VideoAnchorCUDABackend
    # vLLM's own TRITON_ATTN is not overridden: other engines in the process keep it.
    assert not registry.TRITON_ATTN.is_overridden()
    # The choice survives the trip to the engine-core / worker processes (enum by value).
    import pickle

    assert pickle.loads(pickle.dumps(cfg.attention_config.backend)) == registry.CUSTOM


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        ({"backend": "FLASH_ATTN"}, "FLASH_ATTN"),
        ({"cache_dtype": "fp8"}, "kv_cache_dtype"),
        ({"per_kind": {"full_attention": "FLASH_ATTN"}}, "backend_per_kind"),
    ],
)
def test_anchored_cuda_config_refuses_what_it_cannot_honour(registry, kwargs, needle):
    from videoanchor.integrations.vllm import select_cuda_backend

    with pytest.raises(ValueError, match=needle) as err:
        select_cuda_backend(_cfg({"alpha_k": 2.0}, **kwargs))
    assert "videoanchor" in str(err.value)


def test_custom_owned_by_another_plugin_is_a_clear_error(registry):
    from vllm.v1.attention.backends.registry import register_backend

    from videoanchor.integrations.vllm import select_cuda_backend

    register_backend(registry.CUSTOM, "someone.else.Backend")
    with pytest.raises(ValueError, match="someone.else.Backend"):
        select_cuda_backend(_cfg({"alpha_k": 2.0}))


def test_startup_check_per_platform(registry, monkeypatch):
    from vllm.platforms import current_platform

    from videoanchor.integrations.vllm.startup import validate_at_startup

    monkeypatch.setattr(current_platform, "is_cuda", lambda: True)
    monkeypatch.setattr(current_platform, "is_cpu", lambda: False)
    cfg = _cfg({"alpha_k": 2.0})
    validate_at_startup(cfg)  # CUDA: accepted, and our backend selected
    assert cfg.attention_config.backend == registry.CUSTOM
    plain = _cfg()
    validate_at_startup(plain)
    assert plain.attention_config.backend is None
    # Neither CPU nor CUDA (ROCm, XPU, TPU...): refused, naming the platform.
    monkeypatch.setattr(current_platform, "is_cuda", lambda: False)
    with pytest.raises(NotImplementedError, match="CPU and CUDA"):
        validate_at_startup(_cfg({"alpha_k": 2.0}))
    validate_at_startup(_cfg())  # unanchored: no opinion
    # Features whose steps the runner hook does not see, on any platform.
    for attr, value, needle in (("parallel_config", SimpleNamespace(pipeline_parallel_size=2),
                                 "pipeline_parallel_size"),
                                ("speculative_config", object(), "speculative")):  # fmt: skip
        cfg = _cfg({"alpha_k": 2.0})
        setattr(cfg, attr, value)
        with pytest.raises(ValueError, match=needle):
            validate_at_startup(cfg)


def test_backend_refuses_unsupported_features_with_a_named_reason():
    import torch
    from vllm.platforms.interface import DeviceCapability

    from videoanchor.integrations.vllm.backend_cuda import (
        VideoAnchorCUDABackend,
        VideoAnchorCUDAImpl,
    )

    base = dict(head_size=64, dtype=torch.bfloat16, kv_cache_dtype="auto", block_size=16,
                use_mla=False, has_sink=False, use_sparse=False, use_mm_prefix=False,
                use_per_head_quant_scales=False, device_capability=DeviceCapability(9, 0),
                attn_type="decoder")  # fmt: skip
    assert VideoAnchorCUDABackend.validate_configuration(**base) == []
    for change in ({"kv_cache_dtype": "fp8"}, {"has_sliding_window": True},
                   {"has_sink": True}, {"use_mm_prefix": True}, {"use_non_causal": True},
                   {"use_batch_invariant": True}):  # fmt: skip
        reasons = VideoAnchorCUDABackend.validate_configuration(**{**base, **change})
        assert reasons and all("videoanchor" in r for r in reasons), (change, reasons)
    for kw, needle in (({"sliding_window": 128}, "sliding_window"),
                       ({"logits_soft_cap": 30.0}, "logits_soft_cap"),
                       ({"alibi_slopes": [0.5, 0.25]}, "alibi_slopes")):  # fmt: skip
        args = dict(num_heads=2, head_size=64, scale=0.125, num_kv_heads=1, alibi_slopes=None,
                    sliding_window=None, kv_cache_dtype="auto")  # fmt: skip
        with pytest.raises(NotImplementedError, match=needle):
            VideoAnchorCUDAImpl(**{**args, **kw})
    # Non-decoder layers (encoder attention) are vLLM's own path: accepted.
    VideoAnchorCUDAImpl(2, 64, 0.125, 1, None, 128, "auto", attn_type="encoder_only")


def test_builder_keeps_full_cudagraph_support():
    from vllm.v1.attention.backend import AttentionCGSupport

    from videoanchor.integrations.vllm.backend_cuda import VideoAnchorCUDABackend

    assert VideoAnchorCUDABackend.get_builder_cls()._cudagraph_support == AttentionCGSupport.ALWAYS


_SYNCING_METHODS = {"item", "tolist", "cpu", "numpy", "nonzero", "any", "all", "unique"}
_SYNCING_BUILTINS = {"bool", "int", "float", "len"}


def test_cuda_forward_and_update_read_no_device_value_on_the_host():
    """A static check (the GPU test runs them under torch.cuda.set_sync_debug_mode("error")):
    the CUDA impl's per-step methods call nothing that copies a device value to the host."""
    from videoanchor.integrations.vllm import backend_cuda

    for name in ("forward", "do_kv_cache_update", "_gate_caches", "_step"):
        src = textwrap.dedent(inspect.getsource(getattr(backend_cuda.VideoAnchorCUDAImpl, name)))
        for node in ast.walk(ast.parse(src)):
            if not isinstance(node, ast.Call):
                continue
            f = node.func
            if isinstance(f, ast.Attribute):
                assert f.attr not in _SYNCING_METHODS, (name, ast.unparse(node))
            if isinstance(f, ast.Name):
                assert f.id not in _SYNCING_BUILTINS, (name, ast.unparse(node))
        if name == "forward":
            assert "validate=False" in src and "num_splits=DECODE_SPLITS" in src


def test_publish_copies_the_step_and_pads_the_flags():
    import torch

    from videoanchor.integrations.vllm import state

    before = {k: id(v) for k, v in state.DEVICE_STEPS.items()}
    step_before = (state.STEP.owner, state.STEP.step)
    with state.isolated():
        ds = state.device_step("cpu", 8, 4)
        ds.seq_gated.fill_(1)  # a previous, larger batch
        # per sequence: how many of its first queries read the gates
        state.set_step(1, torch.tensor([0.5, 0.0, 1.5]), torch.tensor([2.0, 1.0, 3.0]), [2, 0])
        st = state.STEP
        assert st.owner == 1 and st.step == 1 and st.seq_anchored == [True, False]
        state.publish()
        assert ds.published == st.step
        assert ds.key_bias[:3].tolist() == [0.5, 0.0, 1.5]
        assert ds.value_scale[:3].tolist() == [2.0, 1.0, 3.0]
        assert ds.seq_gated.tolist() == [2, 0, 0, 0]  # padded sequences: not gated
        state.set_step(1, torch.zeros(9), torch.ones(9), [2, 0])
        with pytest.raises(RuntimeError, match="exceeds the gate buffers"):
            state.publish()
        # Growing keeps the larger sizes (the builder of each KV-cache group asks).
        assert state.device_step("cpu", 16, 2).seq_gated.numel() == 4
    # the process's own buffers and step are back
    assert {k: id(v) for k, v in state.DEVICE_STEPS.items()} == before
    assert (state.STEP.owner, state.STEP.step) == step_before


@pytest.mark.parametrize("q_lens", [[1, 1, 1], [1, 20, 3]], ids=["decode", "mixed"])
def test_cuda_impl_step_reads_nothing_back_to_the_host(monkeypatch, q_lens):
    """A whole KV/gate update + forward of the CUDA impl under FakeTensorMode (tensors have
    no data, so any ``.item()`` / ``.tolist()`` / ``bool(t)`` raises), the paged kernels'
    launches recorded instead of run."""
    import torch
    from torch._subclasses.fake_tensor import DataDependentOutputException, FakeTensorMode
    from vllm.v1.attention.backends import triton_attn

    from videoanchor.integrations.vllm import backend_cuda, state
    from videoanchor.kernels import launch

    # vLLM's own K/V write launches its Triton kernel directly (not through our launcher).
    monkeypatch.setattr(triton_attn, "triton_reshape_and_cache_flash", lambda *a, **k: None)
    # fresh per-step buffers (fake tensors, made below), none of another test's
    with state.isolated():
        impl = backend_cuda.VideoAnchorCUDAImpl(4, 32, 0.17, 2, None, None, "auto")
        impl.kernel_backend = "triton"  # what "auto" picks on CUDA tensors
        b, n = len(q_lens), sum(q_lens)
        mode = FakeTensorMode()
        with mode:
            ds = state.device_step("cpu", 32, 4)
            with pytest.raises(DataDependentOutputException):  # the mode does catch host reads
                ds.seq_gated.tolist()
            kv = torch.empty(8, 16, 2, 64, dtype=torch.float16).permute(0, 2, 1, 3)
            q = torch.empty(n + 2, 4, 32, dtype=torch.float16)
            out = torch.empty(n + 2, 4, 32, dtype=torch.float16)
            k = v = torch.empty(n + 2, 2, 32, dtype=torch.float16)
            one = torch.ones(())
            layer = SimpleNamespace(_k_scale=one, _v_scale=one, _q_scale=one)
            meta = triton_attn.TritonAttentionMetadata(
                num_actual_tokens=n, max_query_len=max(q_lens),
                query_start_loc=torch.empty(b + 1, dtype=torch.int32), max_seq_len=64,
                seq_lens=torch.empty(b, dtype=torch.int32),
                block_table=torch.empty(b, 4, dtype=torch.int32),
                slot_mapping=torch.empty(n + 2, dtype=torch.int64), seq_threshold_3D=None,
                num_par_softmax_segments=16, softmax_segm_output=None, softmax_segm_max=None,
                softmax_segm_expsum=None, causal=True,
            )  # fmt: skip
            with launch.capture_launches() as launches:
                impl.do_kv_cache_update(layer, k, v, kv, meta.slot_mapping)
                impl.forward(layer, q, k, v, kv, meta, out)
        names = [rec.kernel.__name__ for rec in launches]
        assert names == (
            ["_anchored_decode_split_kernel", "_anchored_decode_merge_kernel"]
            if max(q_lens) <= 16
            else ["_anchored_prefill_kernel"]
        ), names


def test_builder_sizes_the_buffers_and_refuses_a_runner_without_hook(monkeypatch):
    from vllm.v1.attention.backends import triton_attn

    from videoanchor.integrations.vllm import backend_cuda, state

    # TRITON_ATTN's own __init__ / build need a whole engine config: not under test here.
    monkeypatch.setattr(triton_attn.TritonAttentionMetadataBuilder, "__init__",
                        lambda self, *a: None)  # fmt: skip
    monkeypatch.setattr(triton_attn.TritonAttentionMetadataBuilder, "build",
                        lambda self, *a: "metadata")  # fmt: skip

    def cfg(v2):
        return SimpleNamespace(
            use_v2_model_runner=v2,
            scheduler_config=SimpleNamespace(max_num_batched_tokens=64, max_num_seqs=4),
            compilation_config=SimpleNamespace(cudagraph_capture_sizes=[1, 2, 4, 8, 128]),
        )

    with state.isolated(runner_hooks={"v1"}):  # as in a worker with the v1 runner's hook
        builder_cls = backend_cuda.VideoAnchorCUDAMetadataBuilder
        with pytest.raises(RuntimeError, match="VLLM_USE_V2_MODEL_RUNNER=0"):
            builder_cls(None, [], cfg(True), "cpu")
        builder = builder_cls(None, [], cfg(False), "cpu")
        # Sized for the largest padded (captured) batch: 128 tokens, and 128 sequences.
        assert builder.gate_step.key_bias.numel() == 128
        assert builder.gate_step.seq_gated.numel() == 128
        assert builder.build(0, None) == "metadata"  # no step filled yet (warm-up, capture)
        state.set_step(1, None, None, [])  # a hook filled a step but did not publish it
        with pytest.raises(RuntimeError, match="publish"):
            builder.build(0, None)
        state.publish()  # what the hooks do next: the step's copy in the device buffers
        assert builder.gate_step.published == state.STEP.step
        assert builder.build(0, None) == "metadata"
        state.set_step(1, None, None, [])  # the next step, not published: refused again
        with pytest.raises(RuntimeError, match="publish"):
            builder.build(0, None)
