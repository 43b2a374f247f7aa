"""The CUDA attention backend of the plugin: vLLM's TRITON_ATTN, subclassed.

Selected only on an anchored CUDA engine: the ``create_engine_config`` hook sets
``attention_config.backend = CUSTOM`` and the plugin registers ``CUSTOM`` to
:class:`VideoAnchorCUDABackend` (:func:`videoanchor.integrations.vllm.select_cuda_backend`).
An engine without ``additional_config["videoanchor"]`` keeps the backend vLLM picks.

The KV cache is TRITON_ATTN's own (logical ``(num_blocks, Hkv, block_size, 2 * D)``;
``kv_cache.transpose(1, 2).split(D, -1)`` gives (num_blocks, block_size, Hkv, D) K and V
views) and vLLM's ``triton_reshape_and_cache_flash`` writes K/V into it. Next to it, per-slot
gates (``log(1 + alpha_k s)``, ``1 + alpha_v s``) live in two flat float32 device caches
(:func:`.state.device_gate_cache`): each step, every decoder layer scatters the step's token
gates into them through ``slot_mapping`` (padding slots < 0 go to one extra dummy slot;
idempotent across layers), and attention reads them through ``block_table`` / ``seq_lens``
with :func:`videoanchor.kernels.paged.anchored_attention_paged` (the paged Triton kernels on
CUDA); how many of sequence b's first queries read them is ``seq_gated[b]``, a device tensor.

No host synchronisation: the forward and the KV/gate update read no device value on the host
(``validate=False``, a fixed ``num_splits`` for the decode kernel, no ``.item()``). CUDA
graphs: the builder keeps TRITON_ATTN's ``AttentionCGSupport.ALWAYS``, so vLLM captures full
graphs for decode batches. That is correct because every per-step input the captured kernels
read sits at a fixed address: vLLM's persistent ``slot_mapping`` / ``block_table`` /
``seq_lens`` / ``query_start_loc`` buffers, the gate caches, and the step's gates and
per-sequence flags in :class:`.state.DeviceStep`, which the model-runner hook refills before
every forward (:func:`.state.publish`: pinned host memory, non-blocking copies on the
forward's stream). The only Python values frozen at capture are shapes, ``max_query_len``
(1 in a uniform-decode graph) and the scale. To run attention eagerly instead, serve with
``compilation_config={"cudagraph_mode": "PIECEWISE"}``.

Layers that are not decoder self-attention (encoder, encoder-only, cross-attention) run
vLLM's own TRITON_ATTN code. Features the anchored kernels do not have (fp8/int KV cache,
sliding window, R-SWA, ALiBi, logits soft cap, attention sinks, partial multimodal prefix
attention, non-causal decoders, batch invariance, KV sharing, chunked lookback, fused
output quantisation) fail at start-up with a message naming them.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from vllm.v1.attention.backend import AttentionType
from vllm.v1.attention.backends.triton_attn import (
    TritonAttentionBackend,
    TritonAttentionImpl,
    TritonAttentionMetadataBuilder,
)

from videoanchor.integrations.vllm import state
from videoanchor.integrations.vllm.config import refuse_unsupported_attention
from videoanchor.kernels.paged import anchored_attention_paged

__all__ = [
    "DECODE_SPLITS",
    "VideoAnchorCUDABackend",
    "VideoAnchorCUDAImpl",
    "VideoAnchorCUDAMetadataBuilder",
]

#: KV splits of the decode kernel: fixed, so its grid does not depend on the step's
#: sequence lengths (graph-capturable, no host read of ``seq_lens``). vLLM's TRITON_ATTN
#: uses 16 softmax segments the same way.
DECODE_SPLITS = 16
_DELEGATED = (AttentionType.ENCODER, AttentionType.ENCODER_ONLY, AttentionType.ENCODER_DECODER)
_HINT = "start the engine without additional_config['videoanchor'] to serve unanchored"


class VideoAnchorCUDABackend(TritonAttentionBackend):
    """TRITON_ATTN with anchored decoder self-attention (:class:`VideoAnchorCUDAImpl`)."""

    supported_kv_cache_dtypes: ClassVar[list] = ["auto", "float16", "bfloat16"]

    @staticmethod
    def get_impl_cls():
        """The anchored impl (vLLM's TRITON_ATTN impl with gates)."""
        return VideoAnchorCUDAImpl

    @staticmethod
    def get_builder_cls():
        """The metadata builder that owns the per-step gate buffers."""
        return VideoAnchorCUDAMetadataBuilder

    @classmethod
    def supports_sink(cls) -> bool:
        """False: the anchored kernels implement no attention sinks."""
        return False

    @classmethod
    def supports_sliding_window(cls) -> bool:
        """False: the anchored kernels implement no sliding windows."""
        return False

    @classmethod
    def supports_rswa(cls) -> bool:
        """False: the anchored kernels implement no R-SWA."""
        return False

    @classmethod
    def supports_mm_prefix(cls) -> bool:
        """False: the anchored kernels implement no multimodal prefix attention."""
        return False

    @classmethod
    def supports_non_causal(cls) -> bool:
        """False: the anchored kernels implement no non-causal decoders."""
        return False

    @classmethod
    def supports_batch_invariance(cls) -> bool:
        """False: the anchored kernels implement no batch invariance."""
        return False

    @classmethod
    def supports_alibi_sqrt(cls) -> bool:
        """False: the anchored kernels implement no ALiBi."""
        return False

    @classmethod
    def validate_configuration(cls, *args, **kwargs) -> list[str]:
        """vLLM's checks with our narrower feature set; each reason names videoanchor, so
        vLLM's start-up error ("Selected backend CUSTOM is not valid ...") says why."""
        reasons = super().validate_configuration(*args, **kwargs)
        return [f"videoanchor's anchored CUDA attention: {r} ({_HINT})" for r in reasons]


class VideoAnchorCUDAMetadataBuilder(TritonAttentionMetadataBuilder):
    """TRITON_ATTN's builder (``_cudagraph_support`` stays ALWAYS; see the module
    docstring); also allocates the persistent per-step gate buffers of its device, before
    any CUDA graph capture."""

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        runner = "v2" if getattr(vllm_config, "use_v2_model_runner", False) else "v1"
        if runner not in state.RUNNER_HOOKS:
            raise RuntimeError(
                f"videoanchor's vLLM CUDA backend: the engine runs model runner "
                f"{runner.upper()}, but the plugin's hook into it is not installed in this "
                "process, so no step would get its gates"
                + ("; set VLLM_USE_V2_MODEL_RUNNER=0" if runner == "v2" else "")
            )
        sched = vllm_config.scheduler_config
        sizes = list(vllm_config.compilation_config.cudagraph_capture_sizes or [])
        # A captured batch is padded up to its capture size (tokens, and sequences in a
        # uniform-decode graph), never past the largest one.
        self.gate_step = state.device_step(
            device,
            max([sched.max_num_batched_tokens, *sizes]),
            max([sched.max_num_seqs, *sizes]),
        )

    def build(self, common_prefix_len, common_attn_metadata, fast_build: bool = False):
        """TRITON_ATTN's metadata, after checking that this step's gates were published."""
        st = state.STEP
        if st.owner is not None and self.gate_step.published != st.step:
            raise RuntimeError(
                "videoanchor: a model-runner hook filled this step's gates (state.STEP) "
                "without copying them to the device (state.publish()); the CUDA backend "
                "would read stale gates"
            )
        return super().build(common_prefix_len, common_attn_metadata, fast_build)


class VideoAnchorCUDAImpl(TritonAttentionImpl):
    """Decoder self-attention with per-slot anchor gates over TRITON_ATTN's paged cache."""

    #: ``backend`` of anchored_attention_paged: "auto" is the Triton kernels on CUDA tensors.
    kernel_backend = "auto"

    def __init__(self, num_heads, head_size, scale, num_kv_heads, alibi_slopes, sliding_window,
                 kv_cache_dtype, logits_soft_cap=None, attn_type=AttentionType.DECODER,
                 kv_sharing_target_layer_name=None, sinks=None, use_alibi_sqrt=False,
                 chunk_lookback=-1):  # fmt: skip
        super().__init__(
            num_heads, head_size, scale, num_kv_heads, alibi_slopes, sliding_window,
            kv_cache_dtype, logits_soft_cap, attn_type, kv_sharing_target_layer_name, sinks,
            use_alibi_sqrt, chunk_lookback,
        )  # fmt: skip
        if attn_type == AttentionType.DECODER:
            refuse_unsupported_attention(
                "CUDA", ("auto", "float16", "bfloat16"), alibi_slopes=alibi_slopes,
                sliding_window=sliding_window, logits_soft_cap=logits_soft_cap, sinks=sinks,
                kv_cache_dtype=kv_cache_dtype,
                kv_sharing_target_layer_name=kv_sharing_target_layer_name,
                use_alibi_sqrt=bool(use_alibi_sqrt),
                **{f"chunk_lookback={chunk_lookback}": chunk_lookback is not None
                   and chunk_lookback > -1},
            )  # fmt: skip

    def fused_output_quant_supported(self, quant_key) -> bool:
        """Only for the layers delegated to vLLM's own code (not decoder self-attention)."""
        return self.attn_type in _DELEGATED and super().fused_output_quant_supported(quant_key)

    def _gate_caches(self, kv_cache: torch.Tensor):
        num_blocks, _, block_size, _ = kv_cache.shape
        return state.device_gate_cache(kv_cache.device, num_blocks, block_size)

    def _step(self, device) -> state.DeviceStep:
        ds = state.DEVICE_STEPS.get(str(torch.device(device)))
        if ds is None:
            raise RuntimeError(
                "videoanchor's vLLM CUDA backend: no per-step gate buffers on "
                f"{device}; they are made by VideoAnchorCUDAMetadataBuilder (or "
                "state.device_step) before the first forward"
            )
        return ds

    def do_kv_cache_update(self, layer, key, value, kv_cache, slot_mapping) -> None:
        """vLLM's K/V write, then (decoder layers) the step's token gates into the gate caches
        through ``slot_mapping``; padding tokens (slot < 0) write the dummy slot."""
        super().do_kv_cache_update(layer, key, value, kv_cache, slot_mapping)
        if self.attn_type != AttentionType.DECODER:
            return
        kb_cache, vs_cache = self._gate_caches(kv_cache)
        ds = self._step(kv_cache.device)
        n = slot_mapping.shape[0]
        if n > ds.key_bias.shape[0]:
            raise RuntimeError(
                f"videoanchor: {n} tokens in a step, more than the gate buffers hold "
                f"({ds.key_bias.shape[0]})"
            )
        dummy = kb_cache.shape[0] - 1
        slots = torch.where(slot_mapping < 0, dummy, slot_mapping).to(torch.long)
        kb_cache.index_copy_(0, slots, ds.key_bias[:n])
        vs_cache.index_copy_(0, slots, ds.value_scale[:n])

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output,
                output_scale=None, output_block_scale=None):  # fmt: skip
        """Decoder self-attention through the paged Triton kernels (gates read through the
        block table, per-sequence gated-query counts), no host synchronisation; other
        layers run vLLM's TRITON_ATTN."""
        if self.attn_type != AttentionType.DECODER or attn_metadata is None:
            return super().forward(
                layer, query, key, value, kv_cache, attn_metadata, output, output_scale,
                output_block_scale,
            )  # fmt: skip
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError(
                f"videoanchor's vLLM CUDA backend: fused output quantisation; {_HINT}"
            )
        causal = attn_metadata.causal
        if not isinstance(causal, bool):
            raise NotImplementedError(
                "videoanchor's vLLM CUDA backend: expected a Python bool for causal, got a "
                f"per-request {type(causal).__name__} (non-causal decoders); {_HINT}"
            )
        n = attn_metadata.num_actual_tokens
        num_blocks, _, block_size, _ = kv_cache.shape
        k_cache, v_cache = kv_cache.transpose(1, 2).split(self.head_size, dim=-1)
        kb_cache, vs_cache = self._gate_caches(kv_cache)
        slots = num_blocks * block_size
        seq_lens = attn_metadata.seq_lens
        ds = self._step(kv_cache.device)
        if seq_lens.shape[0] > ds.seq_gated.shape[0]:
            raise RuntimeError(
                f"videoanchor: {seq_lens.shape[0]} sequences in a step, more than the gate "
                f"buffers hold ({ds.seq_gated.shape[0]})"
            )
        anchored_attention_paged(
            query[:n], k_cache, v_cache, attn_metadata.block_table, seq_lens,
            cu_seqlens_q=attn_metadata.query_start_loc,
            max_seqlen_q=attn_metadata.max_query_len,
            key_bias_cache=kb_cache[:slots].view(num_blocks, block_size),
            value_scale_cache=vs_cache[:slots].view(num_blocks, block_size),
            seq_gated=ds.seq_gated[: seq_lens.shape[0]], softmax_scale=self.scale,
            causal=causal, backend=self.kernel_backend, out=output[:n], validate=False,
            num_splits=DECODE_SPLITS,
        )  # fmt: skip
        return output
