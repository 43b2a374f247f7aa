"""The CPU attention backend of the plugin: vLLM's CPU_ATTN, subclassed.

vLLM's own CPU kernels store K and V in an ISA-specific layout (keys transposed on AVX,
other layouts for AMX and NEON), so this backend never reads theirs: on an anchored engine
its impl owns a plain layout of the same tensor (``kv_cache`` of shape
(num_blocks, Hkv, block_size, 2 * D): keys in ``[..., :D]``, values in ``[..., D:]``),
writes K/V and the per-slot gates through ``slot_mapping`` and runs
:func:`videoanchor.kernels.paged.anchored_attention_paged` through ``block_table`` /
``seq_lens``. On an engine without ``additional_config["videoanchor"]`` the backend hands
out vLLM's own impl class, so nothing changes.
"""

from __future__ import annotations

import torch
from vllm.config import get_current_vllm_config
from vllm.v1.attention.backend import AttentionType
from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend, CPUAttentionBackendImpl

from videoanchor.integrations.vllm import state
from videoanchor.integrations.vllm.config import engine_config, refuse_unsupported_attention
from videoanchor.kernels.paged import anchored_attention_paged


def _anchored_engine() -> bool:
    try:
        cfg = get_current_vllm_config()
    except Exception:  # no config in context: vLLM's own behaviour
        return False
    return engine_config(getattr(cfg, "additional_config", None)) is not None


class VideoAnchorCPUBackend(CPUAttentionBackend):
    """CPU_ATTN, with :class:`VideoAnchorCPUImpl` on engines configured for VideoAnchor."""

    @staticmethod
    def get_impl_cls():
        return VideoAnchorCPUImpl if _anchored_engine() else CPUAttentionBackendImpl


class VideoAnchorCPUImpl(CPUAttentionBackendImpl):
    """Decoder self-attention over a plain paged layout with per-slot anchor gates."""

    def __init__(self, num_heads, head_size, scale, num_kv_heads, alibi_slopes, sliding_window,
                 kv_cache_dtype, logits_soft_cap=None, attn_type=AttentionType.DECODER,
                 kv_sharing_target_layer_name=None, sinks=None):  # fmt: skip
        super().__init__(
            num_heads, head_size, scale, num_kv_heads, alibi_slopes, sliding_window,
            kv_cache_dtype, logits_soft_cap, attn_type, kv_sharing_target_layer_name, sinks,
        )  # fmt: skip
        if attn_type == AttentionType.DECODER:
            refuse_unsupported_attention(
                "CPU", ("auto",), alibi_slopes=alibi_slopes, sliding_window=sliding_window,
                logits_soft_cap=logits_soft_cap, sinks=sinks, kv_cache_dtype=kv_cache_dtype,
                kv_sharing_target_layer_name=kv_sharing_target_layer_name,
            )  # fmt: skip

    def _plain(self, kv_cache):
        D = self.head_size
        # (num_blocks, block_size, Hkv, D) views of our own plain layout.
        return kv_cache[..., :D].transpose(1, 2), kv_cache[..., D:].transpose(1, 2)

    def do_kv_cache_update(self, layer, key, value, kv_cache, slot_mapping) -> None:
        if self.attn_type != AttentionType.DECODER:
            return super().do_kv_cache_update(layer, key, value, kv_cache, slot_mapping)
        n = min(key.shape[0], slot_mapping.shape[0])
        slots = slot_mapping[:n].to(torch.long)
        valid = slots >= 0
        num_blocks, _, block_size, _ = kv_cache.shape
        blocks, offs = slots // block_size, slots % block_size
        if not bool(valid.all()):
            blocks, offs = blocks[valid], offs[valid]
            key, value = key[:n][valid], value[:n][valid]
        else:
            key, value = key[:n], value[:n]
        k_cache, v_cache = self._plain(kv_cache)
        k_cache[blocks, offs] = key.to(k_cache.dtype)
        v_cache[blocks, offs] = value.to(v_cache.dtype)
        st = state.STEP
        if st.owner is not None and st.written != st.step and st.key_bias is not None:
            kb_c, vs_c = state.gate_cache(st.owner, num_blocks, block_size, kv_cache.device)
            kb, vs = st.key_bias[:n], st.value_scale[:n]
            if not bool(valid.all()):
                kb, vs = kb[valid], vs[valid]
            kb_c[blocks, offs] = kb.to(kb_c.device)
            vs_c[blocks, offs] = vs.to(vs_c.device)
            st.written = st.step

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output,
                output_scale=None, output_block_scale=None):  # fmt: skip
        if self.attn_type != AttentionType.DECODER or attn_metadata is None:
            return super().forward(
                layer, query, key, value, kv_cache, attn_metadata, output, output_scale,
                output_block_scale,
            )  # fmt: skip
        n = attn_metadata.num_actual_tokens
        k_cache, v_cache = self._plain(kv_cache)
        seq_lens = attn_metadata.seq_lens
        qsl = attn_metadata.query_start_loc
        num_seqs = seq_lens.shape[0]
        st = state.STEP
        flags = st.seq_anchored if st.owner is not None else []
        if len(flags) != num_seqs:
            flags = [False] * num_seqs
        counts = st.seq_gated_queries if len(st.seq_gated_queries) == num_seqs else None
        if not attn_metadata.causal:  # a piece would cut keys off: whole sequences only
            counts = None
        qsl = qsl[: num_seqs + 1]
        q_lens = (qsl[1:] - qsl[:-1]).tolist()
        # Per sequence, how many of its first queries read the gates (the paged path splits a
        # partly gated sequence itself); a whole sequence where no counts were given.
        gated = [(q_lens[b] if counts is None else counts[b]) if flags[b] else 0
                 for b in range(num_seqs)]  # fmt: skip
        gates = None
        if any(flags):
            num_blocks, _, block_size, _ = kv_cache.shape
            gates = state.gate_cache(st.owner, num_blocks, block_size, kv_cache.device)
        out = output[:n].view(n, self.num_heads, self.head_size)
        anchored_attention_paged(
            query[:n], k_cache, v_cache, attn_metadata.block_table[:num_seqs], seq_lens,
            cu_seqlens_q=qsl, max_seqlen_q=max(q_lens, default=0),
            key_bias_cache=None if gates is None else gates[0],
            value_scale_cache=None if gates is None else gates[1],
            seq_gated=torch.tensor(gated, dtype=torch.int32), softmax_scale=self.scale,
            causal=bool(attn_metadata.causal), backend="torch", out=out,
        )  # fmt: skip
        return output
