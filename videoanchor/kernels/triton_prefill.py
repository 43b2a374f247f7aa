"""Fused anchored attention forward (prefill): FlashAttention-2 style, one program per
(query block, batch * query head), online softmax in base 2.

Per key j the logit gets ``key_bias[b, j]`` before the running max: the launcher hands the
kernel the bias in log2 units (``(key_bias - shift) * log2(e)``, an O(Skv) float32 copy,
shifted by its largest visible value per sample: see :func:`_gate_args`), so it
enters the logit in the fused multiply-add that applies the softmax scale
(``s = qk * qk_scale + bias``), the instruction the plain loop spends on ``qk * qk_scale``.

The value scale has two forms, both exact:

- general (any ``value_scale``): the probabilities fed into ``P @ V`` are multiplied by
  ``value_scale[b, j]`` in the loop (one multiply per logit); the normaliser uses the
  unscaled probabilities;
- fast (when the caller bounds the value scale, as VideoAnchor's gates are): the gates
  folded (:func:`fold_gates`): ``log2(value_scale)`` rides in the logit with the bias, so
  the probabilities come out already scaled, and the normaliser sums them times
  ``1 / value_scale``: for 16-bit inputs without the lse on the tensor cores (one small
  MMA per key block from the same P tile that ``P @ V`` reads, times a row of
  ``1 / value_scale`` per key; fp16 where the declared range allows, see
  :func:`half_rows`), otherwise in float32 in the loop's row sum.

Nothing of size (Sq, Skv) is ever stored. docs/kernels-internals.md has the details.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from videoanchor.kernels.launch import LOG2E, cdiv, device_capability, launch, next_power_of_2

# stride_bt and the four block strides of a launch that is not paged (unused there).
NOT_PAGED = (0, 0, 0, 0, 0)


@triton.jit
def _attend_key_range(
    acc,
    l_i,
    m_i,
    b_q,
    p_k,
    p_v,
    p_bias,
    p_scale,
    p_mask,
    stride_kn,
    stride_vn,
    stride_bias_n,
    stride_scale_n,
    stride_mask_n,
    offs_m,
    offs_d,
    lo,
    hi,
    Skv,
    diag,
    qk_scale,
    p_bt,
    stride_kblk,
    stride_vblk,
    stride_bias_blk,
    stride_scale_blk,
    gate,
    BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BOUNDARY: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_MASK: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    PAGED: tl.constexpr,
    FOLD: tl.constexpr,
    TMA: tl.constexpr = False,
):
    # TMA (the Hopper loop, dense keys): p_k and p_v are (tensor descriptor over
    # (B, Skv, Hkv, D), sample, kv head); K and V tiles come by TMA copies, zero past Skv
    # and HEAD_DIM, the loop software-pipelined and warp-specialised by Triton. The tile
    # arithmetic is the same code either way.
    # PAGED: key position p lives in block p_bt[p // PAGE_SIZE], slot p % PAGE_SIZE (K, V
    # and the gate caches alike; V at K's strides, the value scale at the bias's); the bias
    # arrives in natural-log units and is multiplied by ``gate`` (log2(e)). Otherwise p_bt,
    # the block strides and ``gate`` are unused.
    m_d = offs_d < HEAD_DIM
    o_n = tl.arange(0, BLOCK_N)
    if FOLD == 2:
        # The bias MMA's left operand: ones in the columns that hold each key's bias.
        o_c = tl.arange(0, 16)[None, :] + offs_m[:, None] * 0
        b_e = tl.where((o_c >= 3) & (o_c < 6), 1.0, 0.0).to(tl.bfloat16)
    for start_n in tl.range(lo, hi, BLOCK_N):
        offs_n = start_n + o_n
        # Positions times strides in 64 bits: a (B, S, H, D) cache passes 2^31 elements
        # at S * H * D > 2^31 (e.g. 600k tokens of 28 x 128 heads).
        o_kn = offs_n.to(tl.int64)
        m_n = offs_n < Skv
        if PAGED:
            b_blk = tl.load(p_bt + offs_n // PAGE_SIZE, mask=m_n, other=0).to(tl.int64)
            b_slot = (offs_n % PAGE_SIZE).to(tl.int64)
            # The launcher guarantees V shares K's strides and the two gate caches share
            # theirs (vLLM's layout): one address computation each.
            o_k = b_blk * stride_kblk + b_slot * stride_kn
            o_v = o_k
            o_b = b_blk * stride_bias_blk + b_slot * stride_bias_n
            o_s = o_b
        else:
            o_k = o_kn * stride_kn
            o_v = o_kn * stride_vn
            o_b = o_kn * stride_bias_n
            o_s = o_kn * stride_scale_n
        if TMA:
            b_kt = p_k[0].load([p_k[1], start_n, p_k[2], 0]).reshape(BLOCK_N, HEAD_DIM).T
        elif BOUNDARY:
            b_kt = tl.load(p_k + o_k[None, :], mask=m_d[:, None] & m_n[None, :], other=0.0)
        else:
            b_kt = tl.load(p_k + o_k[None, :], mask=m_d[:, None], other=0.0)
        if FOLD == 2:  # the gate rows' load needs the keys read (elsewhere later, so that
            # the mask is not live across QK^T: the float32 row sum's loop spilled)
            if HAS_MASK:
                b_keep = tl.load(p_mask + o_kn * stride_mask_n, mask=m_n, other=0)
                m_v = m_n & (b_keep != 0)
            else:
                m_v = m_n
        # [BLOCK_M, BLOCK_N] logits in log2 units
        if FOLD == 2:
            # The fast form, 16-bit inputs: each key's row of 16 bf16 (fold_gates):
            # columns 0-2 1 / scale, 3-5 bias + log2(scale), each exactly as the sum of
            # three bf16 terms (fp16 inputs too: this MMA is bf16 whatever the inputs;
            # their row sum reads columns 6-8, below). The bias enters the scaled logits on the tensor cores (ones times the
            # rows' bias columns, the logits as the accumulator), so no register holds a
            # bias a column; the row sum below reads the same tile. Contiguous per
            # sequence: int32 offsets (a sequence's keys < 2^31 / 16). Hidden keys' rows
            # read as 0 (their p is 0, but 0 * NaN is not).
            o_r = offs_n[:, None] * 16 + tl.arange(0, 16)[None, :]
            if TMA:
                b_r = p_scale[0].load([p_scale[1], start_n, 0]).reshape(BLOCK_N, 16)
            elif BOUNDARY or HAS_MASK:
                b_r = tl.load(p_scale + o_r, mask=m_v[:, None], other=0.0)
            else:
                b_r = tl.load(p_scale + o_r)
            b_s = tl.dot(b_q, b_kt, input_precision=DOT_PRECISION) * qk_scale
            b_s = tl.dot(b_e, tl.trans(b_r), b_s, input_precision=DOT_PRECISION)
        elif HAS_BIAS:
            # The bias arrives in log2 units: it rides in the FMA that applies qk_scale.
            if FOLD:
                # The fast form, fp16 / fp32: per key the pair (bias + log2(scale),
                # 1 / scale), contiguous pairs (fold_gates). Blocks every row sees read the
                # tile as rows of two keys (16 bytes; int32 offsets: a sequence's pairs
                # index < 2^31): triton 3.6 pipelines it with one 16-byte async copy per two
                # keys instead of an 8-byte copy and a 64-bit address per key (loop 496 ->
                # 445 SASS instructions on sm_90 in bf16, compile_loop_triton36_static_
                # 71cbffb.json). The masked blocks keep the 2-D load (that form's mask made
                # ptxas serialise wgmma).
                if BOUNDARY:
                    o_g = (o_kn * 2)[:, None] + tl.arange(0, 2)[None, :]
                    b_g = tl.load(p_bias + o_g, mask=m_n[:, None], other=0.0)
                else:
                    o_g = start_n * 2 + tl.arange(0, BLOCK_N // 2)[:, None] * 4
                    o_g += tl.arange(0, 4)[None, :]
                    b_g = tl.reshape(tl.load(p_bias + o_g), (BLOCK_N, 2))
                b_bias, b_rcp = tl.split(b_g)
            elif BOUNDARY:
                b_bias = tl.load(p_bias + o_b, mask=m_n, other=0.0)
            else:
                b_bias = tl.load(p_bias + o_b)
            if PAGED:
                b_bias = b_bias.to(tl.float32) * gate
            b_s = tl.dot(b_q, b_kt, input_precision=DOT_PRECISION) * qk_scale + b_bias[None, :]
        else:
            b_s = tl.dot(b_q, b_kt, input_precision=DOT_PRECISION) * qk_scale
        if BOUNDARY:
            b_s = tl.where(m_n[None, :], b_s, float("-inf"))
        if CAUSAL:
            b_s = tl.where(offs_n[None, :] <= offs_m[:, None] + diag, b_s, float("-inf"))
        if HAS_MASK:
            if FOLD != 2:
                b_keep = tl.load(p_mask + o_kn * stride_mask_n, mask=m_n, other=0)
            b_s = tl.where(b_keep[None, :] != 0, b_s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(b_s, 1))
        # A row that has seen no visible key keeps m = -inf; subtract 0 instead so that
        # exp2(-inf - -inf) never produces NaN.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        b_p = tl.exp2(b_s - m_safe[:, None])
        if FOLD != 2:  # (the fast form set m_v with its gate rows' load, above)
            if HAS_MASK:
                # Padded keys' values and scales are never read: whatever they hold cannot
                # leak into the output (0 * NaN would).
                m_v = m_n & (b_keep != 0)
            else:
                m_v = m_n
        if FOLD == 1:
            # b_p holds p * scale (log2(scale) rode in the logit); the normaliser sums the
            # unscaled p = (p * scale) * (1 / scale), in float32 (fp16 / fp32 inputs),
            # the reciprocal's multiply fused into the row sum's adds.
            if BOUNDARY or HAS_MASK:
                b_rcp = tl.where(m_v, b_rcp, 0.0)
            l_i = l_i * alpha + tl.sum(b_p * b_rcp[None, :], 1)
        elif not FOLD:
            l_i = l_i * alpha + tl.sum(b_p, 1)
        acc = acc * alpha[:, None]
        if HAS_SCALE and not FOLD:
            b_vs = tl.load(p_scale + o_s, mask=m_v, other=0.0).to(tl.float32)
            b_p = b_p * b_vs[None, :]
        if TMA:
            b_v = p_v[0].load([p_v[1], start_n, p_v[2], 0]).reshape(BLOCK_N, HEAD_DIM)
        elif HAS_MASK:
            b_v = tl.load(p_v + o_v[:, None], mask=m_v[:, None] & m_d[None, :], other=0.0)
        elif BOUNDARY:
            b_v = tl.load(p_v + o_v[:, None], mask=m_n[:, None] & m_d[None, :], other=0.0)
        else:
            b_v = tl.load(p_v + o_v[:, None], mask=m_d[None, :], other=0.0)
        b_p16 = b_p.to(b_v.dtype)
        acc = tl.dot(b_p16, b_v, acc, input_precision=DOT_PRECISION)
        if FOLD == 2:
            # 16-bit inputs: the same sum on the tensor cores, the P tile of P @ V times
            # the keys' gate rows (fold_gates: bf16 reads 1 / scale exactly as the sum of
            # columns 0-2; fp16 2^14 / scale as the sum of columns 6-8, fp16 terms): no
            # multiply or add per logit, the row sum's shuffles gone. l_i is the
            # [BLOCK_M, 16] product; the epilogue adds its three columns (the others are
            # unused). The sum is of the 16-bit p that P @ V weighs, not of their float32
            # values. After P @ V, into a fresh accumulator, rescaled by an FMA (tl.fma:
            # Triton would fold a multiply-add into the dot's accumulator): ptxas 12.x
            # (triton 3.6) serialised every wgmma of the kernel (its advisory C7515) when
            # the rescale of either accumulator fell between the two MMAs, or when the
            # product was carried to the next block. The price: the loop waits for both
            # MMAs at the FMA, where the plain loop waits for P @ V at the next QK^T.
            if b_p16.dtype == tl.float16:
                # The same row as fp16. The TMA tile is reinterpreted; elsewhere the row
                # is read again through an fp16 pointer (L1 hits), which took ptxas 180
                # registers instead of 236 on sm_80 at D 128 (static, triton 3.9).
                if TMA:
                    b_rh = b_r.to(tl.float16, bitcast=True)
                else:
                    p_h = (p_scale + o_r).to(tl.pointer_type(tl.float16), bitcast=True)
                    if BOUNDARY or HAS_MASK:
                        b_rh = tl.load(p_h, mask=m_v[:, None], other=0.0)
                    else:
                        b_rh = tl.load(p_h)
                b_l = tl.dot(b_p16, b_rh, input_precision=DOT_PRECISION)
            else:
                b_l = tl.dot(b_p16, b_r, input_precision=DOT_PRECISION)
            l_i = tl.fma(l_i, alpha[:, None], b_l)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attend_prefill_ranges(
    acc, l_i, m_i, b_q, p_k, p_v, p_bias, p_scale, p_mask,
    stride_kn, stride_vn, stride_bias_n, stride_scale_n, stride_mask_n,
    offs_m, offs_d, full_hi, hi, Skv, diag, qk_scale,
    p_bt, stride_kblk, stride_vblk, stride_bias_blk, stride_scale_blk, gate,
    BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_MASK: tl.constexpr,
    DOT_PRECISION: tl.constexpr, PAGE_SIZE: tl.constexpr, PAGED: tl.constexpr,
    FOLD: tl.constexpr, TMA: tl.constexpr = False,
):  # fmt: skip
    """A prefill query block's keys: the blocks every row sees (no masking), then the
    diagonal and boundary blocks."""
    acc, l_i, m_i = _attend_key_range(
        acc, l_i, m_i, b_q, p_k, p_v, p_bias, p_scale, p_mask,
        stride_kn, stride_vn, stride_bias_n, stride_scale_n, stride_mask_n,
        offs_m, offs_d, 0, full_hi, Skv, diag, qk_scale,
        p_bt, stride_kblk, stride_vblk, stride_bias_blk, stride_scale_blk, gate,
        BLOCK_N, HEAD_DIM, False, False, HAS_BIAS, HAS_SCALE, HAS_MASK, DOT_PRECISION,
        PAGE_SIZE, PAGED, FOLD, TMA,
    )  # fmt: skip
    return _attend_key_range(
        acc, l_i, m_i, b_q, p_k, p_v, p_bias, p_scale, p_mask,
        stride_kn, stride_vn, stride_bias_n, stride_scale_n, stride_mask_n,
        offs_m, offs_d, full_hi, hi, Skv, diag, qk_scale,
        p_bt, stride_kblk, stride_vblk, stride_bias_blk, stride_scale_blk, gate,
        BLOCK_N, HEAD_DIM, True, CAUSAL, HAS_BIAS, HAS_SCALE, HAS_MASK, DOT_PRECISION,
        PAGE_SIZE, PAGED, FOLD, TMA,
    )  # fmt: skip


@triton.jit(do_not_specialize=["Sq", "Skv", "n_blocks_m"])
def _anchored_prefill_kernel(
    Q,
    K,
    V,
    Bias,
    Scale,
    Mask,
    Out,
    Lse,
    LseShift,
    CuSeqQ,
    CuSeqK,
    BlockTable,
    SeqGate,
    stride_qb,
    stride_qh,
    stride_qm,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_kd,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_vd,
    stride_ob,
    stride_oh,
    stride_om,
    stride_od,
    stride_bias_b,
    stride_bias_n,
    stride_scale_b,
    stride_scale_n,
    stride_mask_b,
    stride_mask_n,
    stride_lse_b,
    stride_lse_h,
    stride_lse_m,
    stride_shift_b,
    stride_bt,
    stride_kblk,
    stride_vblk,
    stride_bias_blk,
    stride_scale_blk,
    Hq,
    group,
    Sq,
    Skv,
    n_blocks_m,
    qk_scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_MASK: tl.constexpr,
    STORE_LSE: tl.constexpr,
    VARLEN: tl.constexpr,
    SEQLENS_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    PAGED: tl.constexpr,
    SEQ_GATE: tl.constexpr,
    FOLD: tl.constexpr,
    TMA: tl.constexpr = False,
):
    # One grid axis (CUDA allows 2^31 - 1 blocks on x, 65,535 on y and z), query blocks
    # fastest. Under causal masking the last query blocks do the most work: start them
    # first so the tail of the launch is made of short blocks.
    pid = tl.program_id(0)
    pid_m = n_blocks_m - 1 - pid % n_blocks_m
    pid_bh = pid // n_blocks_m
    i_b = pid_bh // Hq
    i_h = pid_bh % Hq
    i_hk = i_h // group
    start_m = pid_m * BLOCK_M

    gate = 1.4426950408889634  # PAGED: the bias cache's natural-log units to log2
    if VARLEN or PAGED:
        # Packed sequences: batch strides are 0; sequence b starts at CuSeq[b].
        q_start = tl.load(CuSeqQ + i_b).to(tl.int64)
        Sq = (tl.load(CuSeqQ + i_b + 1) - q_start).to(tl.int32)
        if PAGED:
            # Keys through the block table; CuSeqK holds seq_lens.
            k_start = q_start * 0
            Skv = tl.load(CuSeqK + i_b).to(tl.int32)
        else:
            k_start = tl.load(CuSeqK + i_b).to(tl.int64)
            Skv = (tl.load(CuSeqK + i_b + 1) - k_start).to(tl.int32)
        if start_m >= Sq:
            return
    else:
        q_start = i_b.to(tl.int64) * 0
        k_start = q_start
        if SEQLENS_K:
            # Per-sample number of valid cache keys (CuSeqK holds cache_seqlens here).
            Skv = tl.load(CuSeqK + i_b).to(tl.int32)

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_m = offs_m < Sq
    m_d = offs_d < HEAD_DIM

    p_q = Q + i_b.to(tl.int64) * stride_qb + i_h.to(tl.int64) * stride_qh + q_start * stride_qm
    o_qm = offs_m.to(tl.int64)
    o_d = offs_d.to(tl.int64)
    p_q = p_q + o_qm[:, None] * stride_qm + o_d[None, :] * stride_qd
    b_q = tl.load(p_q, mask=m_m[:, None] & m_d[None, :], other=0.0)  # [BLOCK_M, BLOCK_D]

    if TMA:  # K and V are tensor descriptors (dense keys: launch_prefill's hopper_loop)
        p_k = (K, i_b, i_hk)
        p_v = (V, i_b, i_hk)
    else:
        p_k = K + i_b.to(tl.int64) * stride_kb + i_hk.to(tl.int64) * stride_kh
        p_k = p_k + k_start * stride_kn + o_d[:, None] * stride_kd
        p_v = V + i_b.to(tl.int64) * stride_vb + i_hk.to(tl.int64) * stride_vh
        p_v = p_v + k_start * stride_vn + o_d[None, :] * stride_vd
    p_bias = Bias + i_b.to(tl.int64) * stride_bias_b + k_start * stride_bias_n
    if TMA and FOLD == 2:  # the gate rows too: a descriptor over (B or 1, Skv, 16)
        p_scale = (Scale, tl.where(stride_scale_b != 0, i_b, 0))
    else:
        p_scale = Scale + i_b.to(tl.int64) * stride_scale_b + k_start * stride_scale_n
    p_mask = Mask + i_b.to(tl.int64) * stride_mask_b + k_start * stride_mask_n
    p_bt = BlockTable + i_b.to(tl.int64) * stride_bt

    # Bottom-right causal alignment: query i sees key j iff j <= i + diag.
    diag = Skv - Sq
    if CAUSAL:
        # Blocks below `full_hi` are visible to every row of this query block.
        full_hi = tl.minimum(tl.maximum(start_m + diag + 1, 0), Skv)
        full_hi = (full_hi // BLOCK_N) * BLOCK_N
        hi = tl.minimum(tl.maximum(start_m + BLOCK_M + diag, 0), Skv)
    else:
        full_hi = (Skv // BLOCK_N) * BLOCK_N
        hi = Skv

    # Arguments shared by every call of the key loop and of the epilogue.
    loop = (b_q, p_k, p_v, p_bias, p_scale, p_mask,
            stride_kn, stride_vn, stride_bias_n, stride_scale_n, stride_mask_n,
            offs_m, offs_d, full_hi, hi, Skv, diag, qk_scale,
            p_bt, stride_kblk, stride_vblk, stride_bias_blk, stride_scale_blk, gate)  # fmt: skip
    # The epilogue's pointers are formed after the loop (a 2-D pointer tile kept live
    # across it costs registers).
    out_at = (Out, Lse, LseShift, i_b, i_h, q_start, o_qm, o_d, m_d,
              stride_ob, stride_oh, stride_om, stride_od,
              stride_lse_b, stride_lse_h, stride_lse_m, stride_shift_b)  # fmt: skip
    if SEQ_GATE:
        # Sequence b's first SeqGate[b] queries read the gates, the rest K and V plainly
        # (uniform per program except in the one block where the count falls): the gated
        # loop for the block's gated rows, then the plain loop for the others, each storing
        # its own rows. Only that block does both.
        n_gated = tl.load(SeqGate + i_b)
        if start_m < n_gated:
            acc, l_i, m_i = _attend_prefill_ranges(
                *_fresh_state(BLOCK_M, BLOCK_D), *loop,
                BLOCK_N, HEAD_DIM, CAUSAL, HAS_BIAS, HAS_SCALE, HAS_MASK, DOT_PRECISION,
                PAGE_SIZE, PAGED, False,
            )  # fmt: skip
            _prefill_epilogue(acc, l_i, m_i, m_m & (offs_m < n_gated), *out_at,
                              HAS_BIAS, STORE_LSE)  # fmt: skip
        if start_m + BLOCK_M > n_gated:
            acc, l_i, m_i = _attend_prefill_ranges(
                *_fresh_state(BLOCK_M, BLOCK_D), *loop,
                BLOCK_N, HEAD_DIM, CAUSAL, False, False, HAS_MASK, DOT_PRECISION,
                PAGE_SIZE, PAGED, False,
            )  # fmt: skip
            _prefill_epilogue(acc, l_i, m_i, m_m & (offs_m >= n_gated), *out_at,
                              False, STORE_LSE)  # fmt: skip
    else:
        acc, l_i, m_i = _attend_prefill_ranges(
            *_fresh_state(BLOCK_M, BLOCK_D, FOLD), *loop,
            BLOCK_N, HEAD_DIM, CAUSAL, HAS_BIAS, HAS_SCALE, HAS_MASK, DOT_PRECISION,
            PAGE_SIZE, PAGED, FOLD, TMA,
        )  # fmt: skip
        if FOLD == 2:  # the row sums: columns 0-2 of the MMA's (fp16: 6-8, times 2^-14)
            o_c = tl.arange(0, 16)[None, :]
            if Q.dtype.element_ty == tl.float16:
                l_i = tl.sum(tl.where((o_c >= 6) & (o_c < 9), l_i, 0.0), 1) * 6.103515625e-05
            else:
                l_i = tl.sum(tl.where(o_c < 3, l_i, 0.0), 1)
        _prefill_epilogue(acc, l_i, m_i, m_m, *out_at, HAS_BIAS, STORE_LSE)


@triton.jit
def _fresh_state(BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, FOLD: tl.constexpr = 0):
    """The online softmax's starting accumulator, row sums (FOLD 2: the row-sum MMA's
    [BLOCK_M, 16] accumulator) and row maxima."""
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    if FOLD == 2:
        l_i = tl.zeros([BLOCK_M, 16], dtype=tl.float32)
    else:
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    return acc, l_i, m_i


@triton.jit
def _prefill_epilogue(
    acc, l_i, m_i, rows, Out, Lse, LseShift, i_b, i_h, q_start, o_qm, o_d, m_d,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_lse_b, stride_lse_h, stride_lse_m, stride_shift_b,
    HAS_BIAS: tl.constexpr, STORE_LSE: tl.constexpr,
):  # fmt: skip
    """Normalise and store the ``rows`` of a query block (and their lse)."""
    # Rows with no visible key have l = 0 and acc = 0: they give 0, never NaN.
    has_key = l_i > 0
    b_o = acc / tl.where(has_key, l_i, 1.0)[:, None]
    p_o = Out + i_b.to(tl.int64) * stride_ob + i_h.to(tl.int64) * stride_oh + q_start * stride_om
    p_o = p_o + o_qm[:, None] * stride_om + o_d[None, :] * stride_od
    tl.store(p_o, b_o.to(Out.dtype.element_ty), mask=rows[:, None] & m_d[None, :])
    if STORE_LSE:
        l_log2 = tl.log2(tl.where(has_key, l_i, 1.0))
        lse = tl.where(has_key, (m_i + l_log2) * 0.6931471805599453, float("-inf"))
        if HAS_BIAS:
            lse += tl.load(LseShift + i_b.to(tl.int64) * stride_shift_b)
        p_lse = Lse + i_b.to(tl.int64) * stride_lse_b + i_h.to(tl.int64) * stride_lse_h
        tl.store(p_lse + (q_start + o_qm) * stride_lse_m, lse, mask=rows)


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` input precision: 16-bit inputs multiply exactly on the tensor cores;
    float32 keeps exact float32 products ("ieee", FMA loops), with tiles small enough not
    to spill (see :func:`prefill_config`)."""
    return "ieee" if dtype == torch.float32 else "tf32"


def prefill_config(dtype: torch.dtype, head_dim: int, capability: tuple[int, int] | None) -> dict:
    """Tile sizes and compile options of a prefill launch, a pure function of the input
    dtype, head dim and target compute capability (None: the CPU interpreter). Chosen by
    rule rather than autotuned, so the first call inside a CUDA graph capture or
    torch.compile does not benchmark; checked for spills and shared memory by compiling
    for each target (tests/test_compile_targets.py), not yet timed on a GPU."""
    block_d = max(16, next_power_of_2(head_dim))
    # Fused multiply-add chosen explicitly: Triton 3.10 changes the default to off.
    common = dict(BLOCK_D=block_d, DOT_PRECISION=dot_precision(dtype), enable_fp_fusion=True)
    if capability is None:
        # Small tiles keep the CPU interpreter fast and exercise the multi-block paths.
        return dict(common, BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=1)
    if dtype == torch.float32:
        # ptxas on 64 x 32 tiles at D 128: ~3.8 KB spilled per thread on sm_90, 27 KB of
        # spill traffic on sm_80. 3xTF32 ("tf32x3") spilled too at every tile with M >= 32
        # tried on sm_90 (it keeps hi and lo halves of Q in registers), so float32 stays
        # exact ("ieee") on small tiles: 32 x 16 in 8 warps (4 warps spilled at D 80/96
        # and with a padding mask on sm_90); on sm_8x ptxas gives those only 64-80
        # registers and spills at D 80/96, so 16 x 16 in 4 warps there below D 256, in one
        # stage (two spilled 8 B on sm_86 with varlen + LSE).
        if block_d <= 128 and capability[0] < 9:
            return dict(common, BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=1)
        return dict(
            common, BLOCK_M=32, BLOCK_N=16, num_warps=8, num_stages=2 if block_d <= 128 else 1
        )
    # sm_90/sm_100 (wgmma, 227 KB of shared memory) take the larger tiles. Elsewhere
    # (ptxas, triton 3.9): on sm_80, 4-warp tiles spill at D 64 with gates and a padding
    # mask (128 x 64, 128 x 32, 64 x 64), 128 x 64 tiles in 8 warps spill at D 96/128
    # with a padding mask, 64 x 32 tiles in 4 warps at D 256; on sm_86/89/120 (99 KB per
    # block) 128 x 64 tiles in 3 stages take 97 KB at D 128, 2 KB short of the limit.
    # 128 x 32 in 8 warps spills in none of the cases compiled (compile_sm80.json), 65 KB.
    hopper = capability[0] in (9, 10)
    if block_d <= 64 and hopper:
        return dict(common, BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=3)
    if block_d <= 128:
        return dict(common, BLOCK_M=128, BLOCK_N=64 if hopper else 32, num_warps=8, num_stages=3)
    return dict(common, BLOCK_M=64, BLOCK_N=32, num_warps=4 if hopper else 8, num_stages=2)


def bias_shift(kb, key_padding_mask=None, cache_seqlens=None, varlen=False):
    """The constant taken out of a float32 key bias ``kb``: its largest visible finite value
    per sample (over all packed keys for varlen: a scalar), 0 where there is none. Hidden
    keys (padding, cache slots past ``cache_seqlens``) and NaN do not take part, so what
    they hold cannot change the result (a largest value of +inf gives 0 too). O(Skv), on the
    device, no synchronisation; three kernels without masks (each one a launch on every
    anchored attention call)."""
    inf = float("inf")
    top = kb.nan_to_num(nan=-inf, posinf=inf, neginf=-inf)  # NaN keys take no part
    if key_padding_mask is not None:
        top = torch.where(key_padding_mask, top, -inf)
    if cache_seqlens is not None:
        pos = torch.arange(kb.shape[-1], device=kb.device)
        top = torch.where(pos[None, :] < cache_seqlens.to(kb.device)[:, None], top, -inf)
    top = top.amax() if varlen else top.amax(-1)
    return top.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)  # none visible, or +inf: 0


def _gate_args(
    q, key_bias, value_scale, key_padding_mask, *, varlen=False, cache_seqlens=None,
    prepared_shift=None,
):  # fmt: skip
    """Pointer and stride arguments for the optional per-key inputs. An absent input
    gets a real tensor and zero strides so the kernel signature stays fixed.

    The key bias is handed over in log2 units, shifted by its maximum per sample (one
    maximum over all packed keys for varlen): ``(key_bias - shift) * log2(e)`` in float32.
    A constant per row cancels in the softmax, and a bias of large magnitude (+200 on every
    key, or -1e4 used as a mask) then no longer costs the logits their float32 precision.
    The lse adds the shift back. ``prepared_shift`` given (prepared gates,
    :func:`videoanchor.kernels.prepare_gates`): ``key_bias`` is that form already and the
    shift is ``prepared_shift``; nothing is computed. Returns ``(bias, scale, mask), strides,
    (shift, stride)``.
    """
    shift = (q, 0)
    if key_bias is not None:
        if prepared_shift is None:
            kb = key_bias.to(torch.float32)
            top = bias_shift(kb, key_padding_mask, cache_seqlens, varlen).reshape(-1)
            key_bias = (kb - (top if varlen else top[:, None])) * LOG2E
        else:
            top = prepared_shift
        shift = (top, 0 if varlen else top.stride(0))
    bias = key_bias if key_bias is not None else q
    scale = value_scale if value_scale is not None else q
    mask = key_padding_mask.view(torch.uint8) if key_padding_mask is not None else q

    def strides(t):
        if t is None:
            return (0, 0)
        return (0, t.stride(0)) if t.dim() == 1 else t.stride()

    ptrs = (bias, scale, mask)
    return ptrs, (*strides(key_bias), *strides(value_scale), *strides(key_padding_mask)), shift


def fold_gates(bias_log2, value_scale):
    """The fast form's gates for N keys: three views of one float32 buffer (..., 11 N
    rounded up to a multiple of 4),
    made once (a prepared call slices nothing):

    - bias, (..., N) float32: ``bias_log2 + log2(value_scale)`` (``log2(value_scale)``
      without a key bias); added to the logits, so the probabilities come out already
      scaled.
    - rows, (..., N, 16) bfloat16 (32 bytes a key), what 16-bit inputs read: columns 0-2
      ``1 / value_scale`` and columns 3-5 that bias, each split exactly into three bf16
      terms (hi + mid + lo: 24 bits, a float32 exactly; a bias of +-inf or NaN: hi, then
      zeros); columns 6-8 hold the bit patterns of three fp16 terms of
      ``HALF_ROWS_SCALE / value_scale`` (exact for scales in :data:`HALF_ROWS_RANGE`),
      columns 9-15 zeros. The loop adds the bias to the logits and sums the P tile times
      columns 0-2 (bf16) or 6-8 (fp16) (the unscaled row sums), both on the tensor cores.
    - pairs, (..., N, 2) float32: (that bias, ``1 / value_scale``) a key, what float32
      inputs, fp16 outside :data:`HALF_ROWS_RANGE` and calls with the lse read: the second
      takes the scale back out of the normaliser in the loop's float32 row sum.

    For value scales bounded away from 0 and infinity
    (:func:`videoanchor.kernels.gates.fast_form`)."""
    vs = value_scale.to(torch.float32)
    n = vs.shape[-1]
    # Each sample's part a multiple of 16 bytes (the Hopper loop reads the rows by TMA).
    width = -(-11 * n // 4) * 4
    buf = torch.zeros(*vs.shape[:-1], width, dtype=torch.float32, device=vs.device)
    rows = buf[..., : 8 * n].view(torch.bfloat16).unflatten(-1, (n, 16))
    bias, pairs = buf[..., 8 * n : 9 * n], buf[..., 9 * n : 11 * n].unflatten(-1, (n, 2))
    logs = torch.log2(vs)
    bias.copy_(logs if bias_log2 is None else bias_log2.to(torch.float32) + logs)
    pairs[..., 0] = bias
    pairs[..., 1] = vs.reciprocal()
    for first, rest in ((0, pairs[..., 1]), (3, bias)):
        for col in range(first, first + 3):
            rows[..., col] = rest.to(torch.bfloat16)
            # exact: the low bits (none after an infinite or NaN term)
            rest = (rest - rows[..., col].to(torch.float32)).nan_to_num_(0.0, 0.0, 0.0)
    halves = rows.view(torch.float16)
    rest = (pairs[..., 1] * HALF_ROWS_SCALE).nan_to_num_(0.0, 0.0, 0.0).clamp_(max=65504.0)
    for col in range(6, 9):
        halves[..., col] = rest.to(torch.float16)
        rest = rest - halves[..., col].to(torch.float32)
    return rows, bias, pairs


#: fp16's row sums on the tensor cores read ``HALF_ROWS_SCALE / value_scale`` as three fp16
#: terms (fold_gates' columns 6-8): exactly that float32 for value scales in
#: HALF_ROWS_RANGE (the terms within fp16's range, the last one's bits above its
#: subnormals); the epilogue divides the sums by HALF_ROWS_SCALE (a power of two).
HALF_ROWS_SCALE = 2.0**14
HALF_ROWS_RANGE = (0.5, 2.0**15)


def half_rows(value_scale_range) -> bool:
    """Whether a declared value-scale range ``(lo, hi)`` lets fp16 inputs sum their rows on
    the tensor cores (FOLD 2; :data:`HALF_ROWS_RANGE`); None: unknown, no."""
    if value_scale_range is None:
        return False
    lo, hi = value_scale_range
    return HALF_ROWS_RANGE[0] <= lo and hi <= HALF_ROWS_RANGE[1]


def hopper_loop(q, k, capability, cfg, masked_keys, tiles) -> bool:
    """Whether a prefill launch takes the Hopper loop (``TMA``: K, V and the bf16 gate rows
    by tensor descriptors): compute capability 9.x, 16-bit inputs, dense keys every slot of
    which may be read (no padding mask, varlen or ``cache_seqlens``: ``masked_keys``), a
    power-of-two head dim, and the ``tiles`` read by descriptor laid out as TMA requires
    (unit last stride, the others and the base 16-byte aligned)."""
    if capability is None or capability[0] != 9 or masked_keys:
        return False
    if q.dtype not in (torch.float16, torch.bfloat16) or k.shape[-1] != cfg["BLOCK_D"]:
        return False
    return all(
        t.stride(-1) == 1 and t.data_ptr() % 16 == 0
        and all(t.stride(i) * t.element_size() % 16 == 0 for i in range(t.dim() - 1))
        for t in tiles
    )  # fmt: skip


def launch_prefill(
    q, k, v, key_bias, value_scale, key_padding_mask, out, lse, *, causal, sm_scale, interpret,
    cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None, cache_seqlens=None,
    capability=None, fast=False, prepared_shift=None, prepared_fold=None, value_scale_range=None,
):  # fmt: skip
    """Launch on validated inputs; writes ``out`` and, when ``lse`` is not None, the
    natural-log log-sum-exp (float32). ``prepared_shift``: the key bias is prepared (see
    :func:`_gate_args`).

    ``fast`` (the caller promises value scales within the fast form's bounds) with a value
    scale: the fast form, the gates folded into one row per key (:func:`fold_gates`;
    ``prepared_fold``: those rows made beforehand, from the prepared bias); otherwise the
    general form (the probabilities fed into ``P @ V`` multiplied by the scale in the loop).
    One launch either way. ``value_scale_range``: the declared range, where known; fp16
    inputs sum their rows on the tensor cores only within :data:`HALF_ROWS_RANGE`.

    Dense: q (B, Hq, Sq, D), out (B, Hq, Sq, D), lse (B, Hq, Sq).
    Varlen (``cu_seqlens_q`` given): q (total_q, Hq, D), k/v (total_k, Hkv, D), gates
    (total_k,), out (total_q, Hq, D), lse (Hq, total_q); no padding mask.
    ``cache_seqlens`` (B,) (dense only): keys at or past ``cache_seqlens[b]`` are invisible
    and causal alignment uses that length.
    ``capability``: the compute capability to configure for; default: q's device (None
    under the interpreter).
    """
    varlen = cu_seqlens_q is not None
    if varlen:
        _, Hq, D = q.shape
        Hkv = k.shape[1]
        B = cu_seqlens_q.numel() - 1
        Sq = Skv = 0  # read per sequence from cu_seqlens inside the kernel
        sq = (0, q.stride(1), q.stride(0), q.stride(2))
        sk = (0, k.stride(1), k.stride(0), k.stride(2))
        sv = (0, v.stride(1), v.stride(0), v.stride(2))
        so = (0, out.stride(1), out.stride(0), out.stride(2))
        sl = (0, lse.stride(0), lse.stride(1)) if lse is not None else (0, 0, 0)
        rows = max_seqlen_q
        cu_q, cu_k = cu_seqlens_q, cu_seqlens_k
    else:
        B, Hq, Sq, D = q.shape
        Hkv, Skv = k.shape[1], k.shape[2]
        sq, sk, sv, so = q.stride(), k.stride(), v.stride(), out.stride()
        sl = (*lse.stride(),) if lse is not None else (0, 0, 0)
        rows = Sq
        cu_q = q
        cu_k = cache_seqlens if cache_seqlens is not None else q
    fold = value_scale is not None and (fast or prepared_fold is not None)
    if capability is None and not interpret:
        capability = device_capability(q.device)
    cfg = prefill_config(q.dtype, D, None if interpret else capability)
    if (
        capability is not None and not interpret and capability[0] in (9, 10)
        and q.dtype != torch.float32 and 64 < cfg["BLOCK_D"] <= 128
        and key_padding_mask is not None and value_scale is not None and not fold
    ):  # fmt: skip
        # The general form (value scale in the loop) with a padding mask at D 128 on sm_90:
        # 128 x 64 tiles spilled 52-60 B at 255 registers (ptxas, triton 3.9); 128 x 32 take
        # 206 and spill nothing. The fast form keeps 128 x 64.
        cfg = dict(cfg, BLOCK_N=32)
    (bias, scale, mask), gate_strides, (shift, s_shift) = _gate_args(
        q,
        key_bias,
        value_scale if not fold else None,
        key_padding_mask,
        varlen=varlen,
        cache_seqlens=cache_seqlens,
        prepared_shift=prepared_shift,
    )
    if fold:
        if prepared_fold is None:
            prepared_fold = fold_gates(bias if key_bias is not None else None, value_scale)
        scale, bias, pairs = prepared_fold  # contiguous per sample (fold_gates)
        # bf16 (fp16 within HALF_ROWS_RANGE) without the lse: the bias, the row sums on
        # the tensor cores (FOLD 2, the rows); else the pairs, the row sums in float32
        # (FOLD 1; the scale pointer unused). The MMA sums the 16-bit probabilities: the
        # output's weights, but an lse off by up to 2^-9 relative in the sum (bf16; 1e-3
        # in the lse at two keys).
        # D 256 on sm_8x (64 x 32 tiles in 8 warps): FOLD 2 spilled 28 B at 255 registers
        # (ptxas, triton 3.9, sm_80 and sm_86); the float32 row sum does not.
        wide = cfg["BLOCK_D"] > 128 and capability is not None and capability[0] < 9
        mma_sum = q.dtype == torch.bfloat16 or (
            q.dtype == torch.float16 and half_rows(value_scale_range)
        )
        fold = 2 if mma_sum and lse is None and not wide else 1
        bias, s_n = (bias, 1) if fold == 2 else (pairs, 2)
        dense = scale.dim() == 3  # one buffer per sample
        s_bias = (bias.stride(0), s_n) if dense else (0, s_n)
        s_rows = (scale.stride(0), 16) if dense else (0, 16)
        gate_strides = (*s_bias, *s_rows, *gate_strides[4:])
        if key_bias is None:  # the lse adds the bias's shift: none here
            shift, s_shift = torch.zeros(1, dtype=torch.float32, device=q.device), 0
    masked_keys = varlen or key_padding_mask is not None or cache_seqlens is not None
    tma = hopper_loop(q, k, capability, cfg, masked_keys, (k, v, scale) if fold == 2 else (k, v))
    if tma:
        if cfg["BLOCK_D"] == 128 and fold != 1 and (value_scale is None or fold):
            # 128 x 128 tiles in two stages (160-173 KB of shared memory): per key 26% fewer
            # loop instructions than 128 x 64 (static, sm_90). Not for the float32 row sum
            # (FOLD 1) or the general form: fp16's FOLD 1 spilled 28 B there at 255
            # registers (triton 3.9, non-causal); they keep 128 x 64 in three stages.
            cfg = dict(cfg, BLOCK_N=128, num_stages=2)
        block = [1, cfg["BLOCK_N"], 1, D]
        k, v = (
            TensorDescriptor(t, [B, Skv, Hkv, D], [t.stride(0), t.stride(2), t.stride(1), 1], block)
            for t in (k, v)
        )
        if fold == 2:
            g = scale if scale.dim() == 3 else scale[None]
            scale = TensorDescriptor(g, [*g.shape], [*g.stride()], [1, cfg["BLOCK_N"], 16])
    n_blocks_m = cdiv(rows, cfg["BLOCK_M"])
    args = (
        q, k, v, bias, scale, mask, out, lse if lse is not None else out, shift, cu_q, cu_k,
        q, q, *sq, *sk, *sv, *so, *gate_strides, *sl, s_shift, *NOT_PAGED,
        Hq, Hq // Hkv, Sq, Skv, n_blocks_m, sm_scale * LOG2E,
    )  # fmt: skip
    kwargs = dict(
        HEAD_DIM=D, BLOCK_D=cfg["BLOCK_D"], BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
        CAUSAL=causal, HAS_BIAS=key_bias is not None or bool(fold), HAS_SCALE=value_scale is not None,
        HAS_MASK=key_padding_mask is not None, STORE_LSE=lse is not None, VARLEN=varlen,
        SEQLENS_K=cache_seqlens is not None, DOT_PRECISION=cfg["DOT_PRECISION"],
        PAGE_SIZE=1, PAGED=False, SEQ_GATE=False, FOLD=int(fold), TMA=tma,
        num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
        enable_fp_fusion=cfg["enable_fp_fusion"],
    )  # fmt: skip
    launch(_anchored_prefill_kernel, (n_blocks_m * B * Hq,), args, kwargs)
