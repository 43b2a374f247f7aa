"""Split-KV ("flash-decoding") anchored attention for short query blocks (Sq <= 64)
against long caches.

Stage 1: one program per (KV split, row block, batch * KV head). The query rows of all
query heads that share a KV head are packed into one tile (row r = g * Sq + i for group
member g and query position i), so every K/V block is read once per KV head and the
tile's M dimension is >= 16, legal for the GPU's matrix units even when Sq = 1. Each
program runs the online softmax over its key range and writes a normalised partial
output and its log-sum-exp.
Stage 2: one program per output row merges the partials by log-sum-exp.
Per-key bias, value scale, padding and bottom-right causal masking are exactly as in the
prefill kernel (the same inner loop).
Dense batches (B, H, S, D), optionally with ``cache_seqlens``, and packed varlen batches
(``cu_seqlens_q`` / ``cu_seqlens_k``) share both kernels; a packed sequence divides its
own keys among the splits.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from videoanchor.kernels.launch import cdiv, device_capability, launch, next_power_of_2
from videoanchor.kernels.triton_prefill import (
    LOG2E,
    NOT_PAGED,
    _attend_key_range,
    _fresh_state,
    _gate_args,
    dot_precision,
)


@triton.jit(do_not_specialize=["Sq", "Skv", "split_len", "rows", "n_split"])
def _anchored_decode_split_kernel(
    Q,
    K,
    V,
    Bias,
    Scale,
    Mask,
    SeqLensK,
    CuSeqQ,
    CuSeqK,
    BlockTable,
    SeqGate,
    OPart,
    LsePart,
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
    stride_bias_b,
    stride_bias_n,
    stride_scale_b,
    stride_scale_n,
    stride_mask_b,
    stride_mask_n,
    stride_bt,
    stride_kblk,
    stride_vblk,
    stride_bias_blk,
    stride_scale_blk,
    Hkv,
    group,
    Sq,
    Skv,
    split_len,
    rows,
    n_split,
    qk_scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_MASK: tl.constexpr,
    SEQLENS_K: tl.constexpr,
    VARLEN: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    PAGED: tl.constexpr,
    SEQ_GATE: tl.constexpr,
):
    # Batch * KV heads on grid axis 0, the only one that allows more than 65,535 blocks.
    pid_bh = tl.program_id(0)
    i_s = tl.program_id(1)
    pid_r = tl.program_id(2)
    i_b = pid_bh // Hkv
    i_hk = pid_bh % Hkv
    # Sq is the packing stride of the rows (max_seqlen_q for packed sequences); sq_b is
    # this sequence's number of queries.
    sq_b = Sq
    gate = 1.4426950408889634  # PAGED: the bias cache's natural-log units to log2
    if VARLEN or PAGED:
        # Packed sequences: batch strides are 0; sequence b starts at CuSeq[b]. Its split
        # length comes from its own key count, so no host-side length hint can drop keys.
        q_start = tl.load(CuSeqQ + i_b).to(tl.int64)
        sq_b = (tl.load(CuSeqQ + i_b + 1) - q_start).to(tl.int32)
        if PAGED:
            # Keys through the block table: CuSeqK holds seq_lens.
            k_start = q_start * 0
            Skv = tl.load(CuSeqK + i_b).to(tl.int32)
        else:
            k_start = tl.load(CuSeqK + i_b).to(tl.int64)
            Skv = (tl.load(CuSeqK + i_b + 1) - k_start).to(tl.int32)
        split_len = tl.cdiv(tl.cdiv(Skv, n_split), BLOCK_N) * BLOCK_N
    else:
        q_start = i_b.to(tl.int64) * 0
        k_start = q_start
        if SEQLENS_K:
            Skv = tl.load(SeqLensK + i_b).to(tl.int32)  # splits past it stay empty

    o_r = pid_r * BLOCK_M + tl.arange(0, BLOCK_M)  # packed row ids
    m_r = o_r < group * Sq
    i_g = o_r // Sq  # group member
    i_q = o_r % Sq  # query position
    m_q = m_r & (i_q < sq_b)
    offs_d = tl.arange(0, BLOCK_D)
    m_d = offs_d < HEAD_DIM
    o_d = offs_d.to(tl.int64)

    p_q = Q + i_b.to(tl.int64) * stride_qb + (i_hk * group + i_g).to(tl.int64)[:, None] * stride_qh
    p_q = p_q + (q_start + i_q)[:, None] * stride_qm + o_d[None, :] * stride_qd
    b_q = tl.load(p_q, mask=m_q[:, None] & m_d[None, :], other=0.0)  # [BLOCK_M, BLOCK_D]

    p_k = K + i_b.to(tl.int64) * stride_kb + i_hk.to(tl.int64) * stride_kh + k_start * stride_kn
    p_k = p_k + o_d[:, None] * stride_kd
    p_v = V + i_b.to(tl.int64) * stride_vb + i_hk.to(tl.int64) * stride_vh + k_start * stride_vn
    p_v = p_v + o_d[None, :] * stride_vd
    p_bias = Bias + i_b.to(tl.int64) * stride_bias_b + k_start * stride_bias_n
    p_scale = Scale + i_b.to(tl.int64) * stride_scale_b + k_start * stride_scale_n
    p_mask = Mask + i_b.to(tl.int64) * stride_mask_b + k_start * stride_mask_n
    p_bt = BlockTable + i_b.to(tl.int64) * stride_bt

    lo = i_s * split_len
    hi = tl.minimum(lo + split_len, Skv)
    loop = (b_q, p_k, p_v, p_bias, p_scale, p_mask,
            stride_kn, stride_vn, stride_bias_n, stride_scale_n, stride_mask_n,
            i_q, offs_d, lo, hi, Skv, Skv - sq_b, qk_scale,
            p_bt, stride_kblk, stride_vblk, stride_bias_blk, stride_scale_blk, gate)  # fmt: skip
    # Partials: OPart [B * Hkv, n_split, rows, BLOCK_D], LsePart [B * Hkv, n_split, rows]
    # (log2 units), both contiguous.
    base = pid_bh.to(tl.int64) * n_split * rows + i_s * rows
    out_at = (OPart, LsePart, base, o_r, offs_d, BLOCK_D)  # pointers formed after the loop
    if SEQ_GATE:
        # Sequence b's first SeqGate[b] queries read the gates, the rest K and V plainly (a
        # decode step in decode="prefill" mode): the gated loop for the gated rows, the
        # plain loop for the others; a sequence split between the two runs both.
        n_gated = tl.load(SeqGate + i_b)
        if n_gated > 0:
            acc, l_i, m_i = _attend_key_range(
                *_fresh_state(BLOCK_M, BLOCK_D), *loop,
                BLOCK_N, HEAD_DIM, True, CAUSAL, HAS_BIAS, HAS_SCALE, HAS_MASK, DOT_PRECISION,
                PAGE_SIZE, PAGED, False,
            )  # fmt: skip
            _store_partial(acc, l_i, m_i, m_r & (i_q < n_gated), *out_at)
        if n_gated < sq_b:
            acc, l_i, m_i = _attend_key_range(
                *_fresh_state(BLOCK_M, BLOCK_D), *loop,
                BLOCK_N, HEAD_DIM, True, CAUSAL, False, False, HAS_MASK, DOT_PRECISION,
                PAGE_SIZE, PAGED, False,
            )  # fmt: skip
            _store_partial(acc, l_i, m_i, m_r & (i_q >= n_gated), *out_at)
    else:
        acc, l_i, m_i = _attend_key_range(
            *_fresh_state(BLOCK_M, BLOCK_D), *loop,
            BLOCK_N, HEAD_DIM, True, CAUSAL, HAS_BIAS, HAS_SCALE, HAS_MASK, DOT_PRECISION,
            PAGE_SIZE, PAGED, False,
        )  # fmt: skip
        _store_partial(acc, l_i, m_i, m_r, *out_at)


@triton.jit
def _store_partial(acc, l_i, m_i, rows, OPart, LsePart, base, o_r, offs_d, BLOCK_D: tl.constexpr):
    """One split's normalised partial output and its log2-sum-exp, for ``rows``."""
    has_key = l_i > 0
    b_o = acc / tl.where(has_key, l_i, 1.0)[:, None]
    lse = tl.where(has_key, m_i + tl.log2(tl.where(has_key, l_i, 1.0)), float("-inf"))
    tl.store(OPart + (base + o_r)[:, None] * BLOCK_D + offs_d[None, :], b_o, mask=rows[:, None])
    tl.store(LsePart + base + o_r, lse, mask=rows)


@triton.jit(do_not_specialize=["Sq", "rows", "n_split"])
def _anchored_decode_merge_kernel(
    OPart,
    LsePart,
    Out,
    Lse,
    LseShift,
    CuSeqQ,
    stride_ob,
    stride_oh,
    stride_om,
    stride_od,
    stride_lse_b,
    stride_lse_h,
    stride_lse_m,
    stride_shift_b,
    Hq,
    group,
    Sq,
    rows,
    n_split,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_S: tl.constexpr,
    STORE_LSE: tl.constexpr,
    SHIFT_LSE: tl.constexpr,
    VARLEN: tl.constexpr,
):
    pid = tl.program_id(0)  # over B * Hq * Sq output rows
    i_q = pid % Sq
    i_bh = pid // Sq
    i_b = i_bh // Hq
    i_h = i_bh % Hq
    if VARLEN:
        q_start = tl.load(CuSeqQ + i_b).to(tl.int64)
        if i_q >= tl.load(CuSeqQ + i_b + 1) - q_start:
            return  # past this sequence's queries
    else:
        q_start = i_b.to(tl.int64) * 0
    i_hk = i_h // group
    row = (i_h % group) * Sq + i_q

    o_s = tl.arange(0, BLOCK_S)
    m_s = o_s < n_split
    offs_d = tl.arange(0, BLOCK_D)
    base = (i_b * (Hq // group) + i_hk).to(tl.int64) * n_split * rows + o_s * rows + row
    b_lse = tl.load(LsePart + base, mask=m_s, other=float("-inf"))  # [BLOCK_S]
    b_max = tl.max(b_lse, 0)
    b_max = tl.where(b_max == float("-inf"), 0.0, b_max)
    b_w = tl.exp2(b_lse - b_max)  # 0 for empty splits
    b_sum = tl.sum(b_w, 0)
    b_op = tl.load(OPart + base[:, None] * BLOCK_D + offs_d[None, :], mask=m_s[:, None], other=0.0)
    b_o = tl.sum(b_op * b_w[:, None], 0) / tl.where(b_sum > 0, b_sum, 1.0)  # [BLOCK_D]
    p_o = Out + i_b.to(tl.int64) * stride_ob + i_h.to(tl.int64) * stride_oh
    p_o = p_o + (q_start + i_q) * stride_om
    tl.store(
        p_o + offs_d.to(tl.int64) * stride_od, b_o.to(Out.dtype.element_ty), mask=offs_d < HEAD_DIM
    )
    if STORE_LSE:
        lse = tl.where(b_sum > 0, (b_max + tl.log2(tl.where(b_sum > 0, b_sum, 1.0))), float("-inf"))
        p_lse = Lse + i_b.to(tl.int64) * stride_lse_b + i_h.to(tl.int64) * stride_lse_h
        p_lse = p_lse + (q_start + i_q) * stride_lse_m
        lse = lse * 0.6931471805599453
        if SHIFT_LSE:  # the key bias's per-sample shift (see _gate_args)
            lse += tl.load(LseShift + i_b.to(tl.int64) * stride_shift_b)
        tl.store(p_lse, lse)


_SM_COUNT: dict[int, int] = {}


def _sm_count(device: torch.device) -> int:
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]


def decode_config(dtype: torch.dtype, head_dim: int, capability: tuple[int, int] | None) -> dict:
    """Tile sizes and compile options of the split-KV kernel, a pure function of the input
    dtype, head dim and target compute capability (None: the CPU interpreter). BLOCK_M is
    chosen per launch from the number of packed rows."""
    block_d = max(16, next_power_of_2(head_dim))
    common = dict(BLOCK_D=block_d, DOT_PRECISION=dot_precision(dtype), enable_fp_fusion=True)
    if capability is None:
        return dict(common, BLOCK_M_MAX=64, BLOCK_N=16, num_warps=4, num_stages=1)
    if dtype == torch.float32:
        # Exact float32 dots are FMA loops: 64 x 32 tiles in 4 warps spilled 2.6 KB per
        # thread (ptxas, sm_90, D 128); 32 x 16 in 8 warps spills nothing on sm_90, but on
        # sm_80 (where ptxas gives it 64 registers), so 16 x 16 in 4 warps there.
        if capability[0] < 9:
            return dict(common, BLOCK_M_MAX=16, BLOCK_N=16, num_warps=4, num_stages=2)
        return dict(common, BLOCK_M_MAX=32, BLOCK_N=16, num_warps=8, num_stages=2)
    if block_d > 128:
        return dict(common, BLOCK_M_MAX=64, BLOCK_N=32, num_warps=4, num_stages=2)
    return dict(common, BLOCK_M_MAX=64, BLOCK_N=64, num_warps=4, num_stages=3)


def merge_config(head_dim: int) -> dict:
    block_d = max(16, next_power_of_2(head_dim))
    return dict(BLOCK_D=block_d, num_warps=4 if block_d <= 128 else 8, enable_fp_fusion=True)


def num_splits(batch_heads: int, row_blocks: int, Skv: int, block_n: int, device) -> int:
    """Enough programs to fill the GPU about twice, each split at least 4 key blocks."""
    if device.type != "cuda":
        target = 4
    else:
        target = 2 * _sm_count(device)
    by_occupancy = cdiv(target, batch_heads * row_blocks)
    by_length = max(1, Skv // (4 * block_n))
    return max(1, min(by_occupancy, by_length, 128))


def launch_decode(
    q, k, v, key_bias, value_scale, key_padding_mask, out, lse, *, causal, sm_scale, interpret,
    n_split=None, cache_seqlens=None, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None,
    max_seqlen_k=None, capability=None, prepared_shift=None,
):  # fmt: skip
    """Split-KV launch on validated inputs with Sq <= 64; writes ``out`` and ``lse``.

    Dense: q (B, Hq, Sq, D), k/v (B, Hkv, Skv, D), out (B, Hq, Sq, D), lse (B, Hq, Sq).
    Varlen (``cu_seqlens_q`` given): q (total_q, Hq, D), k/v (total_k, Hkv, D), gates
    (total_k,), out (total_q, Hq, D), lse (Hq, total_q), ``max_seqlen_q`` queries at most
    per sequence. ``max_seqlen_k`` only sizes the number of splits (each sequence divides
    its own keys among them), so a wrong hint costs speed, never correctness; None uses
    the mean length. ``capability``: the compute capability to configure for; default:
    q's device (None under the interpreter). ``prepared_shift``: the key bias is prepared (see
    ``triton_prefill._gate_args``).
    """
    varlen = cu_seqlens_q is not None
    D = q.shape[-1]
    if varlen:
        _, Hq, _ = q.shape
        Hkv = k.shape[1]
        B = cu_seqlens_q.numel() - 1
        Sq = max_seqlen_q
        Skv = max_seqlen_k if max_seqlen_k is not None else cdiv(k.shape[0], max(B, 1))
        sq = (0, q.stride(1), q.stride(0), q.stride(2))
        sk = (0, k.stride(1), k.stride(0), k.stride(2))
        sv = (0, v.stride(1), v.stride(0), v.stride(2))
        so = (0, out.stride(1), out.stride(0), out.stride(2))
        sl = (0, lse.stride(0), lse.stride(1)) if lse is not None else (0, 0, 0)
    else:
        B, Hq, Sq, _ = q.shape
        Hkv, Skv = k.shape[1], k.shape[2]
        sq, sk, sv, so = q.stride(), k.stride(), v.stride(), out.stride()
        sl = (*lse.stride(),) if lse is not None else (0, 0, 0)
    if capability is None and not interpret:
        capability = device_capability(q.device)
    group = Hq // Hkv
    rows = group * Sq
    cfg = decode_config(q.dtype, D, None if interpret else capability)
    block_d = cfg["BLOCK_D"]
    block_m = min(cfg["BLOCK_M_MAX"], max(16, next_power_of_2(rows)))
    row_blocks = cdiv(rows, block_m)
    if n_split is None:
        n_split = num_splits(B * Hkv, row_blocks, max(Skv, 1), cfg["BLOCK_N"], q.device)
    split_len = cdiv(cdiv(max(Skv, 1), n_split), cfg["BLOCK_N"]) * cfg["BLOCK_N"]
    if not varlen:
        n_split = cdiv(Skv, split_len)

    o_part = torch.empty(B * Hkv, n_split, rows, block_d, dtype=torch.float32, device=q.device)
    lse_part = torch.empty(B * Hkv, n_split, rows, dtype=torch.float32, device=q.device)
    (bias, scale, mask), gate_strides, (shift, s_shift) = _gate_args(
        q,
        key_bias,
        value_scale,
        key_padding_mask,
        varlen=varlen,
        cache_seqlens=cache_seqlens,
        prepared_shift=prepared_shift,
    )
    cu_q = cu_seqlens_q if varlen else q
    cu_k = cu_seqlens_k if varlen else q
    args = (
        q, k, v, bias, scale, mask, cache_seqlens if cache_seqlens is not None else q,
        cu_q, cu_k, q, q, o_part, lse_part,
        *sq, *sk, *sv, *gate_strides, *NOT_PAGED,
        Hkv, group, Sq, Skv, split_len, rows, n_split, sm_scale * LOG2E,
    )  # fmt: skip
    kwargs = dict(
        HEAD_DIM=D, BLOCK_D=block_d, BLOCK_M=block_m,
        BLOCK_N=cfg["BLOCK_N"], CAUSAL=causal, HAS_BIAS=key_bias is not None,
        HAS_SCALE=value_scale is not None, HAS_MASK=key_padding_mask is not None,
        SEQLENS_K=cache_seqlens is not None, VARLEN=varlen, PAGE_SIZE=1, PAGED=False,
        SEQ_GATE=False,
        DOT_PRECISION=cfg["DOT_PRECISION"], enable_fp_fusion=cfg["enable_fp_fusion"],
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )  # fmt: skip
    launch(_anchored_decode_split_kernel, (B * Hkv, n_split, row_blocks), args, kwargs)
    store_lse = lse is not None
    mcfg = merge_config(D)
    args = (
        o_part, lse_part, out, lse if store_lse else out, shift, cu_q,
        *so, *(sl if store_lse else (0, 0, 0)), s_shift,
        Hq, group, Sq, rows, n_split,
    )  # fmt: skip
    kwargs = dict(
        HEAD_DIM=D, BLOCK_D=block_d,
        BLOCK_S=max(2, next_power_of_2(n_split)), STORE_LSE=store_lse,
        SHIFT_LSE=store_lse and key_bias is not None, VARLEN=varlen,
        num_warps=mcfg["num_warps"], enable_fp_fusion=mcfg["enable_fp_fusion"],
    )  # fmt: skip
    launch(_anchored_decode_merge_kernel, (B * Hq * Sq,), args, kwargs)
