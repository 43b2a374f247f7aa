"""Anchored attention over a paged KV cache (vLLM's layout), exact torch path.

The cache holds ``num_blocks`` blocks of ``block_size`` slots; sequence ``b`` owns the slots
``block_table[b, p // block_size] * block_size + p % block_size`` for its positions
``p < seq_lens[b]``. Per-slot gates (``key_bias_cache``, ``value_scale_cache``) live in the
same slots, so they follow K and V through chunked prefill, block reuse and preemption.

Two backends, the same result:

- ``"torch"`` gathers each sequence's keys through the table and runs the exact varlen
  path (:func:`videoanchor.anchored_attention_varlen` with ``backend="torch"``); it is what
  a CPU engine runs;
- ``"triton"`` runs the prefill kernel or the split-KV decode kernel (short queries) with
  ``PAGED`` on: every key tile reads its block ids from ``block_table`` and K, V and the
  gates from those blocks, in the cache's own layout (any strides; vLLM's is
  (num_blocks, block_size, Hkv, D)). Nothing is gathered or copied, no value is read back
  to the host, and the decode grid depends only on the batch, the heads and
  ``num_splits``, so a CUDA graph can capture it. The gate caches are read as stored:
  the key bias in natural-log units (the kernel multiplies by log2(e)), the value scale
  in the general form (one multiply per logit: the fast form's pre-scaled V would need a
  second copy of the cache).

``seq_gated`` says per sequence whether its queries read the gates, or how many of its
first queries do (vLLM's "prefill" mode: a decode step of an anchored request reads K and
V plainly, and so do the generated tokens a preempted request recomputes after its
prompt); its keys' gates stay in the cache either way.
"""

from __future__ import annotations

import math
import numbers

import torch

from videoanchor.kernels import interface as _iface
from videoanchor.kernels.checks import check_dtypes, check_one_device, check_tensor
from videoanchor.kernels.interface import _pick_backend, anchored_attention_varlen
from videoanchor.kernels.launch import device_capability, launch

__all__ = ["anchored_attention_paged", "gather_paged", "launch_paged"]

#: The split-KV decode kernel takes batches whose longest query is at most this long
#: (decode and speculative steps); longer ones run the prefill kernel.
PAGED_DECODE_MAX_Q = 16


def _validate_paged(
    q, k_cache, v_cache, block_table, seq_lens, cu_seqlens_q, max_seqlen_q, key_bias_cache,
    value_scale_cache, seq_gated=None, out=None,
):  # fmt: skip
    check_tensor("q", q, 3)
    check_tensor("k_cache", k_cache, 4)
    check_tensor("v_cache", v_cache, 4)
    check_dtypes(q, k_cache, v_cache)
    if k_cache.shape != v_cache.shape:
        raise ValueError(
            "k_cache, v_cache: expected the same shape (num_blocks, block_size, Hkv, D), got "
            f"{tuple(k_cache.shape)} and {tuple(v_cache.shape)}"
        )
    num_blocks, block_size, Hkv, D = k_cache.shape
    Hq = q.shape[1]
    if q.shape[2] != D:
        raise ValueError(f"q: expected head dim {D} (from k_cache), got {q.shape[2]}")
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(
            f"expected the number of query heads to be a multiple of the KV heads, got Hq={Hq}, "
            f"Hkv={Hkv}"
        )
    for name, t in (("block_table", block_table), ("seq_lens", seq_lens),
                    ("cu_seqlens_q", cu_seqlens_q)):  # fmt: skip
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"{name}: expected dtype int32 (or int64), got {t.dtype}")
    check_tensor("block_table", block_table, 2)
    check_tensor("seq_lens", seq_lens, 1)
    check_tensor("cu_seqlens_q", cu_seqlens_q, 1)
    batch = seq_lens.shape[0]
    if block_table.shape[0] < batch:
        raise ValueError(
            f"block_table: expected at least {batch} rows (one per sequence of seq_lens), got "
            f"{block_table.shape[0]}"
        )
    if cu_seqlens_q.shape[0] != batch + 1:
        raise ValueError(
            f"cu_seqlens_q: expected batch + 1 = {batch + 1} offsets (from seq_lens), got "
            f"{cu_seqlens_q.shape[0]}"
        )
    if (
        not isinstance(max_seqlen_q, numbers.Integral)
        or isinstance(max_seqlen_q, bool)
        or max_seqlen_q < 0
    ):
        raise ValueError(f"max_seqlen_q: expected a non-negative int, got {max_seqlen_q!r}")
    for name, t in (("key_bias_cache", key_bias_cache), ("value_scale_cache", value_scale_cache)):
        if t is None:
            continue
        check_tensor(name, t, 2)
        if tuple(t.shape) != (num_blocks, block_size):
            raise ValueError(
                f"{name}: expected shape (num_blocks, block_size) = {(num_blocks, block_size)}, "
                f"got {tuple(t.shape)}"
            )
        if not t.is_floating_point():
            raise TypeError(f"{name}: expected a floating-point tensor, got dtype {t.dtype}")
    if seq_gated is not None:
        if not isinstance(seq_gated, torch.Tensor):
            raise TypeError(f"seq_gated: expected a torch.Tensor, got {type(seq_gated).__name__}")
        if seq_gated.dtype not in (torch.bool, torch.int32, torch.int64):
            raise TypeError(
                f"seq_gated: expected dtype bool (per sequence) or int32 (gated queries per "
                f"sequence), got {seq_gated.dtype}"
            )
        if tuple(seq_gated.shape) != (batch,):
            raise ValueError(
                f"seq_gated: expected shape (batch,) = ({batch},) (from seq_lens), got "
                f"{tuple(seq_gated.shape)}"
            )
    if out is not None:
        check_tensor("out", out, 3)
        if tuple(out.shape) != tuple(q.shape) or out.dtype != q.dtype:
            raise ValueError(
                f"out: expected shape {tuple(q.shape)} and dtype {q.dtype} (those of q), got "
                f"{tuple(out.shape)} and {out.dtype}"
            )
    if block_table.stride(-1) != 1 and block_table.numel() > 0:
        raise ValueError(
            f"block_table: expected unit stride along the blocks, got strides "
            f"{tuple(block_table.stride())}"
        )
    check_one_device(
        (("q", q), ("k_cache", k_cache), ("v_cache", v_cache), ("block_table", block_table),
         ("seq_lens", seq_lens), ("cu_seqlens_q", cu_seqlens_q),
         ("key_bias_cache", key_bias_cache), ("value_scale_cache", value_scale_cache),
         ("seq_gated", seq_gated), ("out", out))
    )  # fmt: skip


def gather_paged(cache: torch.Tensor, block_table: torch.Tensor, seq_lens: list[int]):
    """The slots of each sequence, packed: ``cache`` (num_blocks, block_size, ...), any
    strides -> (sum(seq_lens), ...), sequence b's positions 0..seq_lens[b]-1 in order."""
    block_size = cache.shape[1]
    blocks, offs = [], []
    for b, n in enumerate(seq_lens):
        pos = torch.arange(n, device=cache.device)
        blocks.append(block_table[b, pos // block_size].to(torch.long))
        offs.append(pos % block_size)
    if not blocks:
        return cache[:0, 0]
    # Advanced indexing on the two leading dims: reads only the listed slots, also from a
    # strided view of a cache stored in another order (no copy of the whole cache).
    return cache[torch.cat(blocks), torch.cat(offs)]


def launch_paged(
    q, k_cache, v_cache, block_table, seq_lens, cu_seqlens_q, max_seqlen_q, key_bias_cache,
    value_scale_cache, seq_gated, out, *, causal, sm_scale, interpret, num_splits=None,
    capability=None,
):  # fmt: skip
    """Launch the paged Triton kernels on validated inputs; writes ``out`` (total_q, Hq, D).

    Batches whose longest query is at most :data:`PAGED_DECODE_MAX_Q` run the split-KV
    decode kernel with ``num_splits`` splits (default: enough to fill the GPU for the
    longest sequence the block table can hold, a fixed number for a fixed table width);
    the others run the prefill kernel. ``seq_gated`` None: every sequence reads the gates.
    ``capability``: the compute capability to configure for (default: q's device; None
    under the interpreter). Reads nothing back to the host.
    """
    tp, td = _iface.triton_prefill, _iface.triton_decode
    total_q, Hq, D = q.shape
    _, page, Hkv, _ = k_cache.shape
    B = seq_lens.shape[0]
    if B == 0 or total_q == 0:
        return out
    if capability is None and not interpret:
        capability = device_capability(q.device)
    cap = None if interpret else capability
    has_bias, has_scale = key_bias_cache is not None, value_scale_cache is not None
    # With seq_gated (and gates), each program branches on its sequence's count of gated
    # queries: the gated loop, the plain loop, or (the block where the count falls) both.
    # Without, every sequence runs the gated loop.
    seq_gate = seq_gated is not None and (has_bias or has_scale)
    if not seq_gate:
        seq_gated = q
    elif seq_gated.dtype != torch.int32:
        seq_gated = gated_counts(seq_gated)
    # int32 counts are read as they are (no clamp kernel per layer): the kernels treat a
    # negative count as 0 (no query of the sequence reads the gates).
    bias = key_bias_cache if has_bias else q
    scale = value_scale_cache if has_scale else q
    s_k, s_v = k_cache.stride(), v_cache.stride()
    # The kernels compute one address per key for K and V, and one for both gates.
    if s_v != s_k:
        raise ValueError(
            f"backend='triton': expected v_cache with k_cache's strides {s_k}, got {s_v} "
            "(vLLM's K and V views share them); use backend='torch' for other layouts"
        )
    s_gate = (key_bias_cache if has_bias else value_scale_cache if has_scale else q).stride()
    if has_bias and has_scale and value_scale_cache.stride() != s_gate:
        raise ValueError(
            f"backend='triton': expected value_scale_cache with key_bias_cache's strides "
            f"{s_gate}, got {value_scale_cache.stride()}"
        )
    s_bias = s_scale = s_gate[:2] if (has_bias or has_scale) else (0, 0)
    # (block, slot, head, dim) strides -> the kernels' (batch, head, position, dim) with
    # batch stride 0, plus the block strides.
    sq = (0, q.stride(1), q.stride(0), q.stride(2))
    sk = (0, s_k[2], s_k[1], s_k[3])
    sv = (0, s_v[2], s_v[1], s_v[3])
    so = (0, out.stride(1), out.stride(0), out.stride(2))
    gate_strides = (0, s_bias[1], 0, s_scale[1], 0, 0)
    paged = (block_table.stride(0), s_k[0], s_v[0], s_bias[0], s_scale[0])
    seq_lens = seq_lens if seq_lens.dtype == torch.int32 else seq_lens.to(torch.int32)
    group = Hq // Hkv
    flags = dict(
        HEAD_DIM=D, CAUSAL=causal, HAS_BIAS=has_bias, HAS_SCALE=has_scale, HAS_MASK=False,
        SEQLENS_K=False, PAGE_SIZE=page, PAGED=True, SEQ_GATE=seq_gate,
    )  # fmt: skip
    if max_seqlen_q > PAGED_DECODE_MAX_Q:
        cfg = tp.prefill_config(q.dtype, D, cap)
        n_blocks_m = -(-max_seqlen_q // cfg["BLOCK_M"])
        args = (
            q, k_cache, v_cache, bias, scale, q, out, out, q, cu_seqlens_q, seq_lens,
            block_table, seq_gated, *sq, *sk, *sv, *so, *gate_strides, 0, 0, 0, 0, *paged,
            Hq, group, 0, 0, n_blocks_m, sm_scale * tp.LOG2E,
        )  # fmt: skip
        kwargs = dict(
            flags, BLOCK_D=cfg["BLOCK_D"], BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
            STORE_LSE=False, VARLEN=False, FOLD=False, DOT_PRECISION=cfg["DOT_PRECISION"],
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
            enable_fp_fusion=cfg["enable_fp_fusion"],
        )  # fmt: skip
        launch(tp._anchored_prefill_kernel, (n_blocks_m * B * Hq,), args, kwargs)
        return out
    cfg = td.decode_config(q.dtype, D, cap)
    if cap is not None and cap[0] < 9 and q.dtype == torch.float32:
        # The paged address arithmetic (64-bit block offsets per key) spilled 8 B at 80
        # registers in two stages on sm_80 at D 128 (ptxas, triton 3.9); one stage: none.
        cfg = dict(cfg, num_stages=1)
    block_d, block_n = cfg["BLOCK_D"], cfg["BLOCK_N"]
    rows = group * max_seqlen_q
    block_m = min(cfg["BLOCK_M_MAX"], max(16, 1 << max(rows - 1, 0).bit_length()))
    row_blocks = -(-rows // block_m)
    if num_splits is None:
        capacity = block_table.shape[1] * page
        num_splits = td.num_splits(B * Hkv, row_blocks, max(capacity, 1), block_n, q.device)
    n_split = int(num_splits)
    if n_split < 1:
        raise ValueError(f"num_splits: expected a positive int, got {num_splits!r}")
    o_part = torch.empty(B * Hkv, n_split, rows, block_d, dtype=torch.float32, device=q.device)
    lse_part = torch.empty(B * Hkv, n_split, rows, dtype=torch.float32, device=q.device)
    args = (
        q, k_cache, v_cache, bias, scale, q, q, cu_seqlens_q, seq_lens, block_table,
        seq_gated, o_part, lse_part, *sq, *sk, *sv, *gate_strides, *paged,
        Hkv, group, max_seqlen_q, 0, 0, rows, n_split, sm_scale * tp.LOG2E,
    )  # fmt: skip
    kwargs = dict(
        flags, BLOCK_D=block_d, BLOCK_M=block_m, BLOCK_N=block_n, VARLEN=False,
        DOT_PRECISION=cfg["DOT_PRECISION"], enable_fp_fusion=cfg["enable_fp_fusion"],
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )  # fmt: skip
    launch(td._anchored_decode_split_kernel, (B * Hkv, n_split, row_blocks), args, kwargs)
    mcfg = td.merge_config(D)
    args = (
        o_part, lse_part, out, out, q, cu_seqlens_q, *so, 0, 0, 0, 0,
        Hq, group, max_seqlen_q, rows, n_split,
    )  # fmt: skip
    kwargs = dict(
        HEAD_DIM=D, BLOCK_D=block_d, BLOCK_S=max(2, 1 << max(n_split - 1, 0).bit_length()),
        STORE_LSE=False, SHIFT_LSE=False, VARLEN=True, num_warps=mcfg["num_warps"],
        enable_fp_fusion=mcfg["enable_fp_fusion"],
    )  # fmt: skip
    launch(td._anchored_decode_merge_kernel, (B * Hq * max_seqlen_q,), args, kwargs)
    return out


def gated_counts(seq_gated: torch.Tensor) -> torch.Tensor:
    """``seq_gated`` as int32 counts of gated leading queries per sequence: bool True (all
    queries) becomes 2^31 - 1, False 0; integer counts are kept (clamped at 0). A device
    operation, no host synchronisation."""
    if seq_gated.dtype == torch.bool:
        return seq_gated.to(torch.int32) * (2**31 - 1)
    return seq_gated.clamp(min=0, max=2**31 - 1).to(torch.int32)


def _check_values(q, k_cache, block_table, seq_lens, cu_seqlens_q, max_seqlen_q):
    """The checks that read device values (a host synchronisation on a GPU)."""
    lens = [int(n) for n in seq_lens.tolist()]
    qs = cu_seqlens_q.tolist()
    num_blocks, block_size = k_cache.shape[:2]
    for b, n in enumerate(lens):
        nq = qs[b + 1] - qs[b]
        if nq < 0 or nq > n:
            raise ValueError(
                f"sequence {b}: expected 0 <= queries <= seq_len, got {nq} queries and seq_len {n}"
            )
        if nq > max_seqlen_q:
            raise ValueError(
                f"sequence {b}: has {nq} queries, expected at most max_seqlen_q={max_seqlen_q}"
            )
        if n > block_table.shape[1] * block_size:
            raise ValueError(
                f"seq_lens[{b}]={n}: expected at most max_blocks * block_size = "
                f"{block_table.shape[1] * block_size} positions"
            )
    if qs[0] != 0 or qs[-1] != q.shape[0]:
        raise ValueError(
            f"cu_seqlens_q: expected offsets from 0 to total_q = {q.shape[0]}, got {qs[0]} to "
            f"{qs[-1]}"
        )
    if lens:
        used = block_table[: len(lens)]
        need = [(n + block_size - 1) // block_size for n in lens]
        for b, nb in enumerate(need):
            if nb and (int(used[b, :nb].min()) < 0 or int(used[b, :nb].max()) >= num_blocks):
                raise ValueError(
                    f"block_table[{b}]: expected block ids in [0, {num_blocks}), got "
                    f"{used[b, :nb].tolist()}"
                )
    return lens


def anchored_attention_paged(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    *,
    cu_seqlens_q: torch.Tensor,
    max_seqlen_q: int,
    key_bias_cache: torch.Tensor | None = None,
    value_scale_cache: torch.Tensor | None = None,
    seq_gated: torch.Tensor | None = None,
    softmax_scale: float | None = None,
    causal: bool = True,
    backend: str = "auto",
    out: torch.Tensor | None = None,
    validate: bool = True,
    num_splits: int | None = None,
) -> torch.Tensor:
    """Anchored attention of packed queries against a paged KV cache.

    Args:
        q: (total_q, Hq, D) float16/bfloat16/float32; sequence b's queries are
            ``q[cu_seqlens_q[b]:cu_seqlens_q[b + 1]]``.
        k_cache, v_cache: (num_blocks, block_size, Hkv, D), the dtype of q; Hq % Hkv == 0;
            any strides (e.g. views into vLLM's (num_blocks, Hkv, block_size, 2 * D) cache).
        block_table: (batch or more, max_blocks) int32; row b lists sequence b's blocks.
        seq_lens: (batch,) int32, the keys of sequence b (its cached positions, the new
            tokens included). Its queries are its LAST q-len positions, so causal masking
            is bottom-right aligned (query i of a q-len-n sequence sees keys
            ``< seq_len - n + i + 1``).
        cu_seqlens_q: (batch + 1,) int32 query offsets.
        max_seqlen_q: the longest query sequence (an upper bound; checked when
            ``validate``).
        key_bias_cache, value_scale_cache: (num_blocks, block_size) float32 per-slot gates
            (``log(1 + alpha_k s)``, ``1 + alpha_v s``), or None (neutral).
        seq_gated: (batch,) bool: sequence b's queries read the gates where True; or
            int32: the number of sequence b's FIRST queries that read them (e.g. a prompt's
            queries in a chunk that also holds generated tokens; a negative count reads as
            0, and int32 counts reach the kernels with no operator run on them). None: all do. A query
            that does not reads its keys and values plainly.
        softmax_scale: default 1/sqrt(D).
        causal: see above; False lets every query see all seq_len keys.
        backend: ``"torch"`` (exact), ``"triton"`` (the paged kernels: CUDA, or CPU under
            ``TRITON_INTERPRET=1``), ``"auto"`` (triton on a CUDA device that supports it).
        out: (total_q, Hq, D) in q's dtype, written in place (default: a new tensor).
        validate: False skips the checks that read device values (sequence lengths, block
            ids), so the Triton path synchronises nothing with the host (CUDA graphs); shapes,
            dtypes and devices are checked either way.
        num_splits: the decode kernel's number of KV splits (default: from the block
            table's width, so fixed for one engine).

    Returns:
        ``out``, (total_q, Hq, D) in q's dtype. Raises TypeError/ValueError on bad shapes,
        dtypes, devices, or (``validate``) a sequence whose queries outnumber its keys or
        whose blocks are out of range.
    """
    _validate_paged(
        q, k_cache, v_cache, block_table, seq_lens, cu_seqlens_q, max_seqlen_q,
        key_bias_cache, value_scale_cache, seq_gated, out,
    )  # fmt: skip
    max_seqlen_q = int(max_seqlen_q)  # a NumPy int too, as a Python int for the launch grid
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"backend: expected 'auto', 'triton' or 'torch', got {backend!r}")
    if out is None:
        out = torch.empty_like(q)
    scale = 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else float(softmax_scale)
    lens = None
    if validate:
        lens = _check_values(q, k_cache, block_table, seq_lens, cu_seqlens_q, max_seqlen_q)
    if _pick_backend(q, backend) == "triton":
        return launch_paged(
            q, k_cache, v_cache, block_table, seq_lens, cu_seqlens_q, max_seqlen_q,
            key_bias_cache, value_scale_cache, seq_gated, out, causal=causal, sm_scale=scale,
            interpret=not q.is_cuda, num_splits=num_splits,
        )  # fmt: skip
    if lens is None:
        lens = [int(n) for n in seq_lens.tolist()]
    gated = key_bias_cache is not None or value_scale_cache is not None
    counts = gated_counts(seq_gated).tolist() if gated and seq_gated is not None else None
    qs = cu_seqlens_q.tolist()
    # Pieces (sequence, first query row, end row, key count), gated or not: a sequence whose
    # first c queries read the gates and the rest not is two pieces; under causal masking
    # the gated piece keeps the bottom-right layout by ending its keys where its last query
    # does. Each group runs once, so no query is computed twice.
    pieces: dict[bool, list] = {True: [], False: []}
    for b, n in enumerate(lens):
        s, e = qs[b], qs[b + 1]
        c = e - s if counts is None else min(counts[b], e - s)
        if c > 0:
            pieces[gated].append((b, s, s + c, n - (e - s - c) if causal else n))
        if c < e - s:
            pieces[False].append((b, s + c, e, n))
    for with_gates, group in pieces.items():
        if group:
            _torch_pieces(q, k_cache, v_cache, block_table, group, out, scale, causal,
                          key_bias_cache if with_gates else None,
                          value_scale_cache if with_gates else None)  # fmt: skip
    return out


def _torch_pieces(q, k_cache, v_cache, block_table, group, out, scale, causal, kb_cache,
                  vs_cache):  # fmt: skip
    """The exact varlen path on ``group``'s pieces (sequence, first row, end row, keys),
    written into their rows of ``out``."""
    sel = torch.tensor([p[0] for p in group], dtype=torch.long, device=block_table.device)
    table = block_table[sel]
    lens = [p[3] for p in group]
    q_lens = torch.tensor([p[2] - p[1] for p in group], dtype=torch.int32, device=q.device)
    cu_q = torch.zeros(len(group) + 1, dtype=torch.int32, device=q.device)
    cu_q[1:] = torch.cumsum(q_lens, 0)
    cu_k = torch.zeros(len(group) + 1, dtype=torch.int32, device=q.device)
    cu_k[1:] = torch.cumsum(torch.tensor(lens, device=q.device), 0)
    rows = torch.cat([torch.arange(p[1], p[2], device=q.device) for p in group])
    kb = None if kb_cache is None else gather_paged(kb_cache, table, lens)
    vs = None if vs_cache is None else gather_paged(vs_cache, table, lens)
    res = anchored_attention_varlen(
        q[rows], gather_paged(k_cache, table, lens), gather_paged(v_cache, table, lens),
        cu_q, cu_k, int(q_lens.max()), max(lens), kb, vs,
        causal=causal, sm_scale=scale, backend="torch",
    )  # fmt: skip
    out[rows] = res.to(out.dtype)
