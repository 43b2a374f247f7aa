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

from videoanchor.kernels.triton_prefill import LOG2E


@triton.jit
def _probs_block(
    b_q, b_k, b_bias, b_keep, offs_m, offs_n, m_m, m_n, b_lse, diag, qk_scale,
    CAUSAL: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """Normalised probabilities [BLOCK_M, BLOCK_N] of a tile (0 where hidden)."""
    b_s = tl.dot(b_q, tl.trans(b_k), input_precision=DOT_PRECISION) * qk_scale
    if HAS_BIAS:
        b_s += b_bias[None, :] * 1.4426950408889634
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
    Q, K, V, Bias, Scale, Mask, DO, Lse, Delta, DK, DV, DBias, DScale, SeqK,
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
    WANT_DBIAS: tl.constexpr, WANT_DSCALE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    pid_bh = tl.program_id(0)
    i_b = (pid_bh // Hkv).to(tl.int64)
    i_hk = (pid_bh % Hkv).to(tl.int64)
    start_n = tl.program_id(1) * BLOCK_N
    # Keys visible to this sample: all Skv stored ones, or its cache length.
    n_valid = Skv
    if SEQLENS_K:
        n_valid = tl.load(SeqK + i_b).to(tl.int32)
    diag = n_valid - Sq  # bottom-right causal: query i sees key j iff j <= i + diag

    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_n = offs_n < n_valid
    m_d = offs_d < HEAD_DIM
    o_n = offs_n.to(tl.int64)
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
    if HAS_SCALE:
        p_scale = Scale + i_b * stride_scale_b + o_n * stride_scale_n
        b_scale = tl.load(p_scale, mask=m_n, other=0.0).to(tl.float32)

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
            o_m = offs_m.to(tl.int64)
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
            b_dp = tl.dot(b_do, tl.trans(b_v), input_precision=DOT_PRECISION)
            if HAS_SCALE:
                b_dp = b_dp * b_scale[None, :]
            b_ds = b_p * (b_dp - b_delta[:, None])  # [BLOCK_M, BLOCK_N]
            b_dk = tl.dot(tl.trans(b_ds.to(b_q.dtype)), b_q, b_dk,
                          input_precision=DOT_PRECISION)  # fmt: skip
            if WANT_DBIAS:
                b_dbias += tl.sum(b_ds, 0)

    o_store = start_n + tl.arange(0, BLOCK_N)
    m_store = o_store < Skv  # every stored key gets a gradient (0 when hidden)
    o_store = o_store.to(tl.int64)
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
    Q, K, V, Bias, Scale, Mask, DO, Lse, Delta, DQ, SeqK,
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
    DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    pid_bh = tl.program_id(0)
    i_b = (pid_bh // Hq).to(tl.int64)
    i_h = (pid_bh % Hq).to(tl.int64)
    i_hk = i_h // group
    start_m = tl.program_id(1) * BLOCK_M
    n_valid = Skv
    if SEQLENS_K:
        n_valid = tl.load(SeqK + i_b).to(tl.int32)
    diag = n_valid - Sq

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_m = offs_m < Sq
    m_d = offs_d < HEAD_DIM
    o_m = offs_m.to(tl.int64)
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
        o_n = offs_n.to(tl.int64)
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


def backward_config(head_dim_padded: int, elem_bytes: int, interpret: bool) -> dict:
    """Tile sizes, by rule (no autotuning). Not yet tuned on a GPU."""
    if interpret:
        return dict(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=1)
    if elem_bytes == 4 or head_dim_padded > 128:
        return dict(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=1)
    return dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2)


def _empty(shape, dtype, device):
    """Allocates every buffer the kernels fill (tests poison it with NaN)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _strides(t, n):
    return t.stride() if t is not None else (0,) * n


def launch_backward(
    grad_out, q, k, v, key_bias, value_scale, key_padding_mask, cache_seqlens, out, lse,
    grad_lse, *, causal, sm_scale, want_dbias, want_dscale, interpret,
):  # fmt: skip
    """Gradients of anchored attention (dense layout), on validated inputs.

    q, grad_out, out (B, Hq, Sq, D); k, v (B, Hkv, Skv, D); lse (B, Hq, Sq) float32 (the
    forward's natural-log lse); grad_lse (B, Hq, Sq) or None. Returns
    ``(dq, dk, dv, d_key_bias, d_value_scale)``; the last two (B, Skv) float32 or None.
    """
    B, Hq, Sq, D = q.shape
    Hkv, Skv = k.shape[1], k.shape[2]
    # delta_i = dO_i . out_i (= sum_j p_ij dp_ij); an lse gradient enters as -dlse_i.
    delta = (grad_out.float() * out.float()).sum(-1)
    if grad_lse is not None:
        delta = delta - grad_lse.float()
    delta = delta.contiguous()
    lse = lse.contiguous()
    dq, dk, dv = (
        _empty(q.shape, q.dtype, q.device),
        _empty(k.shape, k.dtype, k.device),
        _empty(v.shape, v.dtype, v.device),
    )
    want_dbias = bool(want_dbias and key_bias is not None)
    want_dscale = bool(want_dscale and value_scale is not None)
    red = _empty((2 if want_dbias and want_dscale else 1, B, Hkv, Skv), torch.float32, q.device)
    red_bias, red_scale = red[0], red[-1]  # per (b, KV head, key) partial sums
    if Sq == 0 or Skv == 0:
        zero = [t.zero_() for t in (dq, dk, dv)]
        red.zero_()
        return (*zero, red_bias.sum(1) if want_dbias else None,
                red_scale.sum(1) if want_dscale else None)  # fmt: skip

    block_d = max(16, triton.next_power_of_2(D))
    cfg = backward_config(block_d, q.element_size(), interpret)
    bias = key_bias if key_bias is not None else q
    scale = value_scale if value_scale is not None else q
    mask = key_padding_mask.view(torch.uint8) if key_padding_mask is not None else q
    seqk = cache_seqlens if cache_seqlens is not None else q
    gate_strides = (*_strides(key_bias, 2), *_strides(value_scale, 2),
                    *_strides(key_padding_mask, 2))  # fmt: skip
    common = dict(
        HEAD_DIM=D, BLOCK_D=block_d, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
        CAUSAL=causal, HAS_BIAS=key_bias is not None, HAS_SCALE=value_scale is not None,
        HAS_MASK=key_padding_mask is not None, SEQLENS_K=cache_seqlens is not None,
        DOT_PRECISION="ieee" if q.element_size() == 4 else "tf32",
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )  # fmt: skip
    qk_scale = sm_scale * LOG2E
    _anchored_bwd_dkdv_kernel[(B * Hkv, triton.cdiv(Skv, cfg["BLOCK_N"]))](
        q, k, v, bias, scale, mask, grad_out, lse, delta, dk, dv, red_bias, red_scale, seqk,
        *q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), *dk.stride(), *dv.stride(),
        *gate_strides, *lse.stride(), *red_bias.stride(),
        Hkv, Hq // Hkv, Sq, Skv, qk_scale, sm_scale,
        WANT_DBIAS=want_dbias, WANT_DSCALE=want_dscale, **common,
    )  # fmt: skip
    _anchored_bwd_dq_kernel[(B * Hq, triton.cdiv(Sq, cfg["BLOCK_M"]))](
        q, k, v, bias, scale, mask, grad_out, lse, delta, dq, seqk,
        *q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), *dq.stride(),
        *gate_strides, *lse.stride(),
        Hq, Hq // Hkv, Sq, Skv, qk_scale, sm_scale, **common,
    )  # fmt: skip
    return (
        dq, dk, dv,
        red_bias.sum(1) if want_dbias else None,
        red_scale.sum(1) if want_dscale else None,
    )  # fmt: skip


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
    q, k, v, key_bias, value_scale, key_padding_mask, cache_seqlens, causal, sm_scale, _ = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, key_bias, value_scale, key_padding_mask, cache_seqlens,
                          out, lse)  # fmt: skip
    ctx.causal, ctx.sm_scale = causal, sm_scale


def _backward(ctx, grad_out, grad_lse):
    q, k, v, key_bias, value_scale, key_padding_mask, cache_seqlens, out, lse = ctx.saved_tensors
    if lse.dim() != 3:
        # Called without return_lse (anchored_attention asks for it when grads are
        # needed): recompute the forward once to get it; the output is deterministic.
        out, lse = torch.ops.videoanchor.anchored_attention_fwd(
            q, k, v, key_bias, value_scale, key_padding_mask, cache_seqlens, ctx.causal,
            ctx.sm_scale, True,
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
    return dq, dk, dv, dbias, dscale, None, None, None, None, None


def register_autograd(fwd_op) -> None:
    """Makes ``videoanchor::anchored_attention_fwd`` differentiable with these kernels."""
    torch.library.register_autograd(fwd_op, _backward, setup_context=_setup_context)
