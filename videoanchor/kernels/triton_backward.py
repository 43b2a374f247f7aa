"""Fused anchored attention backward: FlashAttention-2 style, from the forward's saved
output and log-sum-exp; nothing of size (Sq, Skv) is stored.

With ``p_ij = exp(q_i . k_j * sm_scale + key_bias_j - lse_i)`` (masked keys: 0),
``out_i = sum_j p_ij * value_scale_j * v_j`` and ``delta_i = dO_i . out_i - dlse_i``:

- ``dp_ij = value_scale_j * (dO_i . v_j)``, ``ds_ij = p_ij * (dp_ij - delta_i)``
- ``dq_i = sm_scale * sum_j ds_ij k_j``, ``dk_j = sm_scale * sum_i ds_ij q_i``
- ``dv_j = value_scale_j * sum_i p_ij dO_i``
- ``d key_bias_j = sum_{h, i} ds_ij``, ``d value_scale_j = sum_{h, i} p_ij (dO_i . v_j)``

Two kernels: one program per (batch * KV head, key block) accumulates dK, dV and the
per-key reductions over every query head of its group and every query block (no atomics,
deterministic); one program per (batch * query head, query block) accumulates dQ. The
per-key reductions are written per KV head and summed over heads by the launcher.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from videoanchor.kernels.launch import cdiv, device_capability, launch, next_power_of_2
from videoanchor.kernels.triton_prefill import LOG2E, bias_shift, dot_precision


@triton.jit
def _sequence_bounds(SeqQ, SeqK, i_b, Sq, Skv, VARLEN: tl.constexpr, SEQLENS_K: tl.constexpr):
    """Where sample ``i_b`` starts (int64 token offsets of its queries and keys), its
    lengths, and how many of its keys are visible (all ``Skv``, or its cache length). Packed
    sequences: batch strides are 0 and sequence b starts at SeqQ/SeqK[b]."""
    q_start = i_b * 0
    k_start = q_start
    if VARLEN:
        q_start = tl.load(SeqQ + i_b).to(tl.int64)
        k_start = tl.load(SeqK + i_b).to(tl.int64)
        Sq = (tl.load(SeqQ + i_b + 1) - q_start).to(tl.int32)
        Skv = (tl.load(SeqK + i_b + 1) - k_start).to(tl.int32)
    n_valid = Skv
    if SEQLENS_K:
        n_valid = tl.load(SeqK + i_b).to(tl.int32)
    return q_start, k_start, Sq, Skv, n_valid


@triton.jit
def _probs_block(
    b_q, b_k, b_bias, b_keep, offs_m, offs_n, m_m, m_n, b_lse, diag, qk_scale,
    CAUSAL: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """Normalised probabilities [BLOCK_M, BLOCK_N] of a tile (0 where hidden)."""
    if HAS_BIAS:  # the bias in log2 units rides in the FMA that applies qk_scale
        b_s = tl.dot(b_q, tl.trans(b_k), input_precision=DOT_PRECISION) * qk_scale + b_bias[None, :]
    else:
        b_s = tl.dot(b_q, tl.trans(b_k), input_precision=DOT_PRECISION) * qk_scale
    visible = m_m[:, None] & m_n[None, :]
    if CAUSAL:
        visible = visible & (offs_n[None, :] <= offs_m[:, None] + diag)
    if HAS_MASK:
        visible = visible & (b_keep[None, :] != 0)
    # lse = -inf only for rows with no visible key, whose tiles are all hidden.
    b_lse2 = tl.where(b_lse == float("-inf"), 0.0, b_lse * 1.4426950408889634)
    return tl.where(visible, tl.exp2(b_s - b_lse2[:, None]), 0.0)


@triton.jit(do_not_specialize=["Sq", "Skv"])
def _anchored_bwd_dkdv_kernel(
    Q, K, V, Bias, Scale, Mask, DO, Lse, Delta, DK, DV, DBias, DScale, SeqQ, SeqK,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    stride_bias_b, stride_bias_n, stride_scale_b, stride_scale_n,
    stride_mask_b, stride_mask_n,
    stride_lse_b, stride_lse_h, stride_lse_m,
    stride_red_b, stride_red_h, stride_red_n,
    Hkv, group, Sq, Skv, qk_scale, sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_SCALE: tl.constexpr, HAS_MASK: tl.constexpr, SEQLENS_K: tl.constexpr,
    VARLEN: tl.constexpr,
    WANT_DBIAS: tl.constexpr, WANT_DSCALE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    pid_bh = tl.program_id(0)
    i_b = (pid_bh // Hkv).to(tl.int64)
    i_hk = (pid_bh % Hkv).to(tl.int64)
    start_n = tl.program_id(1) * BLOCK_N
    q_start, k_start, Sq, Skv, n_valid = _sequence_bounds(
        SeqQ, SeqK, i_b, Sq, Skv, VARLEN, SEQLENS_K
    )
    if VARLEN:
        if start_n >= Skv:
            return
    diag = n_valid - Sq  # bottom-right causal: query i sees key j iff j <= i + diag

    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_n = offs_n < n_valid
    m_d = offs_d < HEAD_DIM
    o_n = k_start + offs_n.to(tl.int64)
    b_keep = tl.full([BLOCK_N], 1, dtype=tl.int8)
    if HAS_MASK:
        p_mask = Mask + i_b * stride_mask_b + o_n * stride_mask_n
        b_keep = tl.load(p_mask, mask=m_n, other=0).to(tl.int8)
        m_n = m_n & (b_keep != 0)
    p_k = K + i_b * stride_kb + i_hk * stride_kh + o_n[:, None] * stride_kn
    b_k = tl.load(p_k + offs_d[None, :] * stride_kd, mask=m_n[:, None] & m_d[None, :], other=0.0)
    p_v = V + i_b * stride_vb + i_hk * stride_vh + o_n[:, None] * stride_vn
    b_v = tl.load(p_v + offs_d[None, :] * stride_vd, mask=m_n[:, None] & m_d[None, :], other=0.0)
    b_bias = tl.zeros([BLOCK_N], dtype=tl.float32)
    if HAS_BIAS:
        p_bias = Bias + i_b * stride_bias_b + o_n * stride_bias_n
        b_bias = tl.load(p_bias, mask=m_n, other=0.0).to(tl.float32)
    b_scale = tl.full([BLOCK_N], 1.0, dtype=tl.float32)
    b_vs = b_v
    if HAS_SCALE:
        p_scale = Scale + i_b * stride_scale_b + o_n * stride_scale_n
        b_scale = tl.load(p_scale, mask=m_n, other=0.0).to(tl.float32)
        # This program's keys are fixed: V scaled once, in registers, so that dO . v'_j is
        # dp_ij * scale_j with no per-logit multiply in the loop.
        b_vs = (b_v.to(tl.float32) * b_scale[:, None]).to(b_v.dtype)

    b_dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    b_dvs = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)  # sum_i p_ij dO_i
    b_dbias = tl.zeros([BLOCK_N], dtype=tl.float32)
    # The first query that sees key start_n under causal masking.
    lo = 0
    if CAUSAL:
        lo = tl.maximum(start_n - diag, 0)
        lo = (lo // BLOCK_M) * BLOCK_M
    for g in range(group):
        i_h = i_hk * group + g
        p_q = Q + i_b * stride_qb + i_h * stride_qh
        p_do = DO + i_b * stride_dob + i_h * stride_doh
        p_lse = Lse + i_b * stride_lse_b + i_h * stride_lse_h
        p_delta = Delta + i_b * stride_lse_b + i_h * stride_lse_h
        for start_m in tl.range(lo, Sq, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            m_m = offs_m < Sq
            o_m = q_start + offs_m.to(tl.int64)
            m_md = m_m[:, None] & m_d[None, :]
            b_q = tl.load(p_q + o_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                          mask=m_md, other=0.0)  # fmt: skip
            b_do = tl.load(p_do + o_m[:, None] * stride_dom + offs_d[None, :] * stride_dod,
                           mask=m_md, other=0.0)  # fmt: skip
            b_lse = tl.load(p_lse + o_m * stride_lse_m, mask=m_m, other=0.0)
            b_delta = tl.load(p_delta + o_m * stride_lse_m, mask=m_m, other=0.0)
            b_p = _probs_block(
                b_q, b_k, b_bias, b_keep, offs_m, offs_n, m_m, m_n, b_lse, diag, qk_scale,
                CAUSAL, HAS_BIAS, HAS_MASK, DOT_PRECISION,
            )  # fmt: skip
            b_dvs = tl.dot(tl.trans(b_p.to(b_do.dtype)), b_do, b_dvs,
                           input_precision=DOT_PRECISION)  # fmt: skip
            b_dp = tl.dot(b_do, tl.trans(b_vs), input_precision=DOT_PRECISION)
            b_ds = b_p * (b_dp - b_delta[:, None])  # [BLOCK_M, BLOCK_N]
            b_dk = tl.dot(tl.trans(b_ds.to(b_q.dtype)), b_q, b_dk,
                          input_precision=DOT_PRECISION)  # fmt: skip
            if WANT_DBIAS:
                b_dbias += tl.sum(b_ds, 0)

    o_store = start_n + tl.arange(0, BLOCK_N)
    m_store = o_store < Skv  # every stored key gets a gradient (0 when hidden)
    o_store = k_start + o_store.to(tl.int64)
    m_sd = m_store[:, None] & m_d[None, :]
    p_dk = DK + i_b * stride_dkb + i_hk * stride_dkh + o_store[:, None] * stride_dkn
    tl.store(p_dk + offs_d[None, :] * stride_dkd, (b_dk * sm_scale).to(DK.dtype.element_ty),
             mask=m_sd)  # fmt: skip
    b_dv = b_dvs * b_scale[:, None] if HAS_SCALE else b_dvs
    p_dv = DV + i_b * stride_dvb + i_hk * stride_dvh + o_store[:, None] * stride_dvn
    tl.store(p_dv + offs_d[None, :] * stride_dvd, b_dv.to(DV.dtype.element_ty), mask=m_sd)
    p_red = i_b * stride_red_b + i_hk * stride_red_h + o_store * stride_red_n
    if WANT_DBIAS:
        tl.store(DBias + p_red, b_dbias, mask=m_store)
    if WANT_DSCALE:
        tl.store(DScale + p_red, tl.sum(b_dvs * b_v.to(tl.float32), 1), mask=m_store)


@triton.jit(do_not_specialize=["Sq", "Skv"])
def _anchored_bwd_dq_kernel(
    Q, K, V, Bias, Scale, Mask, DO, Lse, Delta, DQ, SeqQ, SeqK,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    stride_bias_b, stride_bias_n, stride_scale_b, stride_scale_n,
    stride_mask_b, stride_mask_n,
    stride_lse_b, stride_lse_h, stride_lse_m,
    Hq, group, Sq, Skv, qk_scale, sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_SCALE: tl.constexpr, HAS_MASK: tl.constexpr, SEQLENS_K: tl.constexpr,
    VARLEN: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    pid_bh = tl.program_id(0)
    i_b = (pid_bh // Hq).to(tl.int64)
    i_h = (pid_bh % Hq).to(tl.int64)
    i_hk = i_h // group
    start_m = tl.program_id(1) * BLOCK_M
    q_start, k_start, Sq, Skv, n_valid = _sequence_bounds(
        SeqQ, SeqK, i_b, Sq, Skv, VARLEN, SEQLENS_K
    )
    if VARLEN:
        if start_m >= Sq:
            return
    diag = n_valid - Sq

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_m = offs_m < Sq
    m_d = offs_d < HEAD_DIM
    o_m = q_start + offs_m.to(tl.int64)
    m_md = m_m[:, None] & m_d[None, :]
    p_q = Q + i_b * stride_qb + i_h * stride_qh + o_m[:, None] * stride_qm
    b_q = tl.load(p_q + offs_d[None, :] * stride_qd, mask=m_md, other=0.0)
    p_do = DO + i_b * stride_dob + i_h * stride_doh + o_m[:, None] * stride_dom
    b_do = tl.load(p_do + offs_d[None, :] * stride_dod, mask=m_md, other=0.0)
    p_lse = i_b * stride_lse_b + i_h * stride_lse_h + o_m * stride_lse_m
    b_lse = tl.load(Lse + p_lse, mask=m_m, other=0.0)
    b_delta = tl.load(Delta + p_lse, mask=m_m, other=0.0)

    p_k = K + i_b * stride_kb + i_hk * stride_kh
    p_v = V + i_b * stride_vb + i_hk * stride_vh
    hi = n_valid
    if CAUSAL:
        hi = tl.minimum(tl.maximum(start_m + BLOCK_M + diag, 0), n_valid)
    b_dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_n in tl.range(0, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        m_n = offs_n < n_valid
        o_n = k_start + offs_n.to(tl.int64)
        b_keep = tl.full([BLOCK_N], 1, dtype=tl.int8)
        if HAS_MASK:
            b_keep = tl.load(Mask + i_b * stride_mask_b + o_n * stride_mask_n, mask=m_n,
                             other=0).to(tl.int8)  # fmt: skip
            m_n = m_n & (b_keep != 0)
        m_nd = m_n[:, None] & m_d[None, :]
        b_k = tl.load(p_k + o_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                      mask=m_nd, other=0.0)  # fmt: skip
        b_v = tl.load(p_v + o_n[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                      mask=m_nd, other=0.0)  # fmt: skip
        b_bias = tl.zeros([BLOCK_N], dtype=tl.float32)
        if HAS_BIAS:
            b_bias = tl.load(Bias + i_b * stride_bias_b + o_n * stride_bias_n, mask=m_n,
                             other=0.0).to(tl.float32)  # fmt: skip
        b_p = _probs_block(
            b_q, b_k, b_bias, b_keep, offs_m, offs_n, m_m, m_n, b_lse, diag, qk_scale,
            CAUSAL, HAS_BIAS, HAS_MASK, DOT_PRECISION,
        )  # fmt: skip
        b_dp = tl.dot(b_do, tl.trans(b_v), input_precision=DOT_PRECISION)
        if HAS_SCALE:
            b_scale = tl.load(Scale + i_b * stride_scale_b + o_n * stride_scale_n, mask=m_n,
                              other=0.0).to(tl.float32)  # fmt: skip
            b_dp = b_dp * b_scale[None, :]
        b_ds = b_p * (b_dp - b_delta[:, None])
        b_dq = tl.dot(b_ds.to(b_k.dtype), b_k, b_dq, input_precision=DOT_PRECISION)
    p_dq = DQ + i_b * stride_dqb + i_h * stride_dqh + o_m[:, None] * stride_dqm
    tl.store(p_dq + offs_d[None, :] * stride_dqd, (b_dq * sm_scale).to(DQ.dtype.element_ty),
             mask=m_md)  # fmt: skip


def backward_config(dtype: torch.dtype, head_dim: int, capability: tuple[int, int] | None) -> dict:
    """Tile sizes and compile options of the two backward launches, a pure function of the
    input dtype, head dim and target compute capability (None: the CPU interpreter), as
    :func:`videoanchor.kernels.triton_prefill.prefill_config` is for the forward. The
    shared options at the top level; ``dkdv`` and ``dq`` hold each kernel's BLOCK_M (query
    rows per step or per program), BLOCK_N, num_warps and num_stages. Chosen by rule (no
    autotuning); checked for spills and shared memory by compiling for each target
    (tests/test_compile_targets_backward.py), not yet timed on a GPU."""
    block_d = max(16, next_power_of_2(head_dim))
    # Fused multiply-add chosen explicitly: Triton 3.10 changes the default to off.
    common = dict(BLOCK_D=block_d, DOT_PRECISION=dot_precision(dtype), enable_fp_fusion=True)

    def tiles(m, n, warps, stages):
        return dict(BLOCK_M=m, BLOCK_N=n, num_warps=warps, num_stages=stages)

    if capability is None:
        # Small tiles keep the CPU interpreter fast and exercise the multi-block paths.
        return dict(common, dkdv=tiles(16, 16, 4, 1), dq=tiles(16, 16, 4, 1))
    # Tiles are BLOCK_M x BLOCK_N, measured with ptxas (triton 3.9, the AOT harness, D 128
    # with gates and a padding mask, the worst case compiled). dK/dV keeps K, V and two [BLOCK_N, D] float32
    # accumulators live: 64 x 64 tiles in 4 warps spilled 200-760 B on sm_80 and sm_90
    # (D 64 too), 64 x 128 and 16 x 128 in 8 warps spilled on sm_90; 32 x 64 in 8 warps
    # in one stage is the largest that did not, and keeps wgmma (BLOCK_N 64 rows) on
    # sm_90. dQ: 64 x 64 in 4 warps (wgmma) on sm_90; 4 warps spilled on sm_80, 8 do not
    # (82 KB of shared memory, within sm_86's 99 KB with headroom).
    if dtype == torch.float32:
        # Exact "ieee" FMA loops: 32 x 32 tiles in 4 warps spilled 1-1.3 KB per thread on
        # sm_90; 16 x 32 in 8 warps spilled 12-16 B at D 80 and varlen D 128 and 348 B at
        # D 256 on sm_90; 16 x 16 in 8 warps spills nothing on sm_80/sm_90 at D 64-256.
        if capability[0] < 9 and block_d <= 128:
            # sm_8x: in 8 warps ptxas held dK/dV to 62-64 registers and spilled 16 B on sm_86
            # (D 80; D 128 with a padding mask); 4 warps (128 registers) still spilled 8-16 B.
            # A register budget of 96 per thread (maxnreg) spills nothing. (At D 256 the budget
            # spilled 64 B on sm_80; 8 warps alone do not spill there.)
            return dict(common, dkdv=dict(tiles(16, 16, 8, 1), maxnreg=96), dq=tiles(16, 16, 8, 1))
        return dict(common, dkdv=tiles(16, 16, 8, 1), dq=tiles(16, 16, 8, 1))
    if block_d > 128:
        # 16-bit D 256: 16 x 32 in 8 warps spills nothing on sm_80/sm_90 (mma.sync).
        return dict(common, dkdv=tiles(16, 32, 8, 1), dq=tiles(16, 32, 8, 1))
    hopper = capability[0] in (9, 10)
    dq = tiles(64, 64, 4 if hopper else 8, 2)
    if block_d <= 64 and not hopper:
        # At D 64 on sm_80/86, 32 x 64 (8 warps) took 255 registers and spilled 60-84 B
        # without causal masking, 16 x 64 spilled 32-48 B with cache_seqlens; 32 x 32 in
        # 4 warps takes 128 registers and spills nothing.
        return dict(common, dkdv=tiles(32, 32, 4, 1), dq=dq)
    return dict(common, dkdv=tiles(32, 64, 8, 1), dq=dq)


def _strides(t, n):
    """Strides of an optional input; a 1-D (packed) gate gets batch stride 0."""
    if t is None:
        return (0,) * n
    return (0, t.stride(0)) if t.dim() == 1 else t.stride()


def _packed(t):
    """(total, H, D) strides as (batch 0, head, token, dim)."""
    return (0, t.stride(1), t.stride(0), t.stride(2))


def launch_backward(
    grad_out, q, k, v, key_bias, value_scale, key_padding_mask, cache_seqlens, out, lse,
    grad_lse, *, causal, sm_scale, want_dbias, want_dscale, interpret,
    cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None, max_seqlen_k=None,
    capability=None,
):  # fmt: skip
    """Gradients of anchored attention, on validated inputs. Returns
    ``(dq, dk, dv, d_key_bias, d_value_scale)``, the last two float32 or None.

    Dense: q, grad_out, out (B, Hq, Sq, D); k, v (B, Hkv, Skv, D); gates (B, Skv); lse and
    grad_lse (B, Hq, Sq) (the forward's natural-log lse, float32; grad_lse may be None).
    Varlen (``cu_seqlens_q`` given): q, grad_out, out (total_q, Hq, D); k, v (total_k, Hkv,
    D); gates (total_k,); lse, grad_lse (Hq, total_q); no padding mask or cache_seqlens.
    ``capability``: the compute capability to configure for; default: q's device (None
    under the interpreter).
    """
    varlen = cu_seqlens_q is not None
    # delta_i = dO_i . out_i (= sum_j p_ij dp_ij); an lse gradient enters as -dlse_i.
    delta = (grad_out.float() * out.float()).sum(-1)
    if varlen:
        delta = delta.t()  # (Hq, total_q), the lse layout
    if grad_lse is not None:
        delta = delta - grad_lse.float()
    delta = delta.contiguous()
    lse = lse.contiguous()
    want_dbias = bool(want_dbias and key_bias is not None)
    want_dscale = bool(want_dscale and value_scale is not None)
    n_red = 2 if want_dbias and want_dscale else 1
    if varlen:
        _, Hq, D = q.shape
        Hkv, Skv_total = k.shape[1], k.shape[0]
        B = cu_seqlens_q.numel() - 1
        Sq = Skv = 0  # read per sequence from cu_seqlens inside the kernels
        # Tokens outside every sequence get a zero gradient, not garbage.
        dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        red = torch.zeros(n_red, Hkv, Skv_total, dtype=torch.float32, device=q.device)
        strides = [_packed(t) for t in (q, k, v, grad_out, dq, dk, dv)]
        s_lse = (0, *lse.stride())
        s_red = (0, *red.stride()[1:])
        if max_seqlen_k is None or max_seqlen_k < 0:
            max_seqlen_k = int((cu_seqlens_k[1:] - cu_seqlens_k[:-1]).max()) if B > 0 else 0
        rows_q, rows_k = max_seqlen_q, max_seqlen_k
        seqq, seqk = cu_seqlens_q, cu_seqlens_k
        empty = B <= 0 or rows_q == 0 or rows_k == 0 or q.shape[0] == 0 or Skv_total == 0
    else:
        B, Hq, Sq, D = q.shape
        Hkv, Skv = k.shape[1], k.shape[2]
        # empty_like: q's, k's and v's strides, as the fake implementation promises. Every
        # element is written by the kernels (tests fill new buffers with NaN first:
        # torch.use_deterministic_algorithms with fill_uninitialized_memory).
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        red = torch.empty((n_red, B, Hkv, Skv), dtype=torch.float32, device=q.device)
        strides = [t.stride() for t in (q, k, v, grad_out, dq, dk, dv)]
        s_lse = lse.stride()
        s_red = red.stride()[1:]
        rows_q, rows_k = Sq, Skv
        seqq, seqk = q, (cache_seqlens if cache_seqlens is not None else q)
        empty = Sq == 0 or Skv == 0
    red_bias, red_scale = red[0], red[-1]  # per (sample, KV head, key) partial sums

    def reduce(r, want):
        return r.sum(0 if varlen else 1) if want else None

    if empty:
        for t in (dq, dk, dv, red):
            t.zero_()
        return dq, dk, dv, reduce(red_bias, want_dbias), reduce(red_scale, want_dscale)

    if capability is None and not interpret:
        capability = device_capability(q.device)
    cfg = backward_config(q.dtype, D, None if interpret else capability)
    if key_bias is not None:
        # As in the forward (triton_prefill._gate_args): the bias shifted by its maximum per
        # sample, and the lse by the same amount, so large biases keep float32 precision.
        kb = key_bias.to(torch.float32)
        top = bias_shift(kb, key_padding_mask, cache_seqlens, varlen)
        key_bias = (kb - (top if varlen else top[:, None])) * LOG2E  # log2 units
        lse = (lse - (top if varlen else top[:, None, None])).contiguous()
    bias = key_bias if key_bias is not None else q
    scale = value_scale if value_scale is not None else q
    mask = key_padding_mask.view(torch.uint8) if key_padding_mask is not None else q
    gate_strides = (*_strides(key_bias, 2), *_strides(value_scale, 2),
                    *_strides(key_padding_mask, 2))  # fmt: skip
    s_q, s_k, s_v, s_do, s_dq, s_dk, s_dv = strides
    common = dict(
        HEAD_DIM=D, BLOCK_D=cfg["BLOCK_D"],
        CAUSAL=causal, HAS_BIAS=key_bias is not None, HAS_SCALE=value_scale is not None,
        HAS_MASK=key_padding_mask is not None, SEQLENS_K=cache_seqlens is not None,
        VARLEN=varlen, DOT_PRECISION=cfg["DOT_PRECISION"],
        enable_fp_fusion=cfg["enable_fp_fusion"],
    )  # fmt: skip
    qk_scale = sm_scale * LOG2E
    # Grids: batch * heads on axis 0 (up to 2^31 - 1), blocks of the sequence on axis 1;
    # launch() refuses a grid past CUDA's limits with a ValueError.
    launch(
        _anchored_bwd_dkdv_kernel,
        (B * Hkv, cdiv(rows_k, cfg["dkdv"]["BLOCK_N"])),
        (q, k, v, bias, scale, mask, grad_out, lse, delta, dk, dv, red_bias, red_scale,
         seqq, seqk, *s_q, *s_k, *s_v, *s_do, *s_dk, *s_dv, *gate_strides, *s_lse, *s_red,
         Hkv, Hq // Hkv, Sq, Skv, qk_scale, sm_scale),
        dict(WANT_DBIAS=want_dbias, WANT_DSCALE=want_dscale, **common, **cfg["dkdv"]),
    )  # fmt: skip
    launch(
        _anchored_bwd_dq_kernel,
        (B * Hq, cdiv(rows_q, cfg["dq"]["BLOCK_M"])),
        (q, k, v, bias, scale, mask, grad_out, lse, delta, dq, seqq, seqk,
         *s_q, *s_k, *s_v, *s_do, *s_dq, *gate_strides, *s_lse,
         Hq, Hq // Hkv, Sq, Skv, qk_scale, sm_scale),
        dict(common, **cfg["dq"]),
    )  # fmt: skip
    return dq, dk, dv, reduce(red_bias, want_dbias), reduce(red_scale, want_dscale)


@torch.library.custom_op("videoanchor::anchored_attention_bwd", mutates_args=())
def _anchored_attention_bwd(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_bias: torch.Tensor | None,
    value_scale: torch.Tensor | None,
    key_padding_mask: torch.Tensor | None,
    cache_seqlens: torch.Tensor | None,
    out: torch.Tensor,
    lse: torch.Tensor,
    grad_lse: torch.Tensor | None,
    causal: bool,
    sm_scale: float,
    want_dbias: bool,
    want_dscale: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    device_ctx = torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext()
    with device_ctx:
        dq, dk, dv, dbias, dscale = launch_backward(
            grad_out, q, k, v, key_bias, value_scale, key_padding_mask, cache_seqlens, out,
            lse, grad_lse, causal=causal, sm_scale=sm_scale, want_dbias=want_dbias,
            want_dscale=want_dscale, interpret=not q.is_cuda,
        )  # fmt: skip
    # A custom op returns tensors only (never aliased): an absent gradient is empty.
    dbias = q.new_empty(0, dtype=torch.float32) if dbias is None else dbias
    dscale = q.new_empty(0, dtype=torch.float32) if dscale is None else dscale
    return dq, dk, dv, dbias, dscale


@_anchored_attention_bwd.register_fake
def _(grad_out, q, k, v, key_bias, value_scale, key_padding_mask, cache_seqlens, out, lse,
      grad_lse, causal, sm_scale, want_dbias, want_dscale):  # fmt: skip
    B, Skv = q.shape[0], k.shape[2]

    def gate(want, t):
        shape = (B, Skv) if want and t is not None else (0,)
        return q.new_empty(shape, dtype=torch.float32)

    return (
        torch.empty_like(q), torch.empty_like(k), torch.empty_like(v),
        gate(want_dbias, key_bias), gate(want_dscale, value_scale),
    )  # fmt: skip


def _setup_context(ctx, inputs, output):
    q, k, v, key_bias, value_scale, key_padding_mask, cache_seqlens, causal, sm_scale = inputs[:9]
    out, lse = output
    ctx.save_for_backward(q, k, v, key_bias, value_scale, key_padding_mask, cache_seqlens,
                          out, lse)  # fmt: skip
    ctx.causal, ctx.sm_scale = causal, sm_scale
    ctx.fast = inputs[10] if len(inputs) > 10 else False


def _backward(ctx, grad_out, grad_lse):
    q, k, v, key_bias, value_scale, key_padding_mask, cache_seqlens, out, lse = ctx.saved_tensors
    if lse.dim() != 3:
        # Called without return_lse (anchored_attention asks for it when grads are
        # needed): recompute the forward once to get it; the output is deterministic.
        out, lse = torch.ops.videoanchor.anchored_attention_fwd(
            q, k, v, key_bias, value_scale, key_padding_mask, cache_seqlens, ctx.causal,
            ctx.sm_scale, True, ctx.fast,
        )  # fmt: skip
        grad_lse = None
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    need = ctx.needs_input_grad
    dq, dk, dv, dbias, dscale = _anchored_attention_bwd(
        grad_out, q, k, v, key_bias, value_scale, key_padding_mask, cache_seqlens, out, lse,
        grad_lse, ctx.causal, ctx.sm_scale, bool(need[3]), bool(need[4]),
    )  # fmt: skip
    dbias = dbias.to(key_bias.dtype) if key_bias is not None and need[3] else None
    dscale = dscale.to(value_scale.dtype) if value_scale is not None and need[4] else None
    return dq, dk, dv, dbias, dscale, None, None, None, None, None, None


@torch.library.custom_op("videoanchor::anchored_attention_varlen_bwd", mutates_args=())
def _anchored_attention_varlen_bwd(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    key_bias: torch.Tensor | None,
    value_scale: torch.Tensor | None,
    out: torch.Tensor,
    lse: torch.Tensor,
    grad_lse: torch.Tensor | None,
    causal: bool,
    sm_scale: float,
    want_dbias: bool,
    want_dscale: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    device_ctx = torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext()
    with device_ctx:
        dq, dk, dv, dbias, dscale = launch_backward(
            grad_out, q, k, v, key_bias, value_scale, None, None, out, lse, grad_lse,
            causal=causal, sm_scale=sm_scale, want_dbias=want_dbias, want_dscale=want_dscale,
            interpret=not q.is_cuda, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
            max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k,
        )  # fmt: skip
    dbias = q.new_empty(0, dtype=torch.float32) if dbias is None else dbias
    dscale = q.new_empty(0, dtype=torch.float32) if dscale is None else dscale
    return dq, dk, dv, dbias, dscale


@_anchored_attention_varlen_bwd.register_fake
def _(grad_out, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, key_bias,
      value_scale, out, lse, grad_lse, causal, sm_scale, want_dbias, want_dscale):  # fmt: skip
    def gate(want, t):
        shape = (k.shape[0],) if want and t is not None else (0,)
        return q.new_empty(shape, dtype=torch.float32)

    return (
        torch.empty_like(q), torch.empty_like(k), torch.empty_like(v),
        gate(want_dbias, key_bias), gate(want_dscale, value_scale),
    )  # fmt: skip


def _setup_context_varlen(ctx, inputs, output):
    q, k, v, cu_q, cu_k, max_q, max_k, key_bias, value_scale, causal, sm_scale = inputs[:11]
    out, lse = output
    ctx.save_for_backward(q, k, v, cu_q, cu_k, key_bias, value_scale, out, lse)
    ctx.args = (max_q, max_k, causal, sm_scale, inputs[12] if len(inputs) > 12 else False)


def _backward_varlen(ctx, grad_out, grad_lse):
    q, k, v, cu_q, cu_k, key_bias, value_scale, out, lse = ctx.saved_tensors
    max_q, max_k, causal, sm_scale, fast = ctx.args
    if lse.dim() != 2:  # called without return_lse: recompute it
        out, lse = torch.ops.videoanchor.anchored_attention_varlen_fwd(
            q,
            k,
            v,
            cu_q,
            cu_k,
            max_q,
            max_k,
            key_bias,
            value_scale,
            causal,
            sm_scale,
            True,
            fast,
        )
        grad_lse = None
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    need = ctx.needs_input_grad
    dq, dk, dv, dbias, dscale = _anchored_attention_varlen_bwd(
        grad_out, q, k, v, cu_q, cu_k, max_q, max_k, key_bias, value_scale, out, lse,
        grad_lse, causal, sm_scale, bool(need[7]), bool(need[8]),
    )  # fmt: skip
    dbias = dbias.to(key_bias.dtype) if key_bias is not None and need[7] else None
    dscale = dscale.to(value_scale.dtype) if value_scale is not None and need[8] else None
    return dq, dk, dv, None, None, None, None, dbias, dscale, None, None, None, None


def register_autograd(fwd_op, varlen_fwd_op) -> None:
    """Makes ``videoanchor::anchored_attention_fwd`` and its varlen twin differentiable
    with these kernels."""
    torch.library.register_autograd(fwd_op, _backward, setup_context=_setup_context)
    torch.library.register_autograd(
        varlen_fwd_op, _backward_varlen, setup_context=_setup_context_varlen
    )
