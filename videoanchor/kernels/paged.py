"""Anchored attention over a paged KV cache (vLLM's layout), exact torch path.

The cache holds ``num_blocks`` blocks of ``block_size`` slots; sequence ``b`` owns the slots
``block_table[b, p // block_size] * block_size + p % block_size`` for its positions
``p < seq_lens[b]``. Per-slot gates (``key_bias_cache``, ``value_scale_cache``) live in the
same slots, so they follow K and V through chunked prefill, block reuse and preemption.

The torch path gathers each sequence's keys through the table and runs the exact varlen
path (:func:`videoanchor.anchored_attention_varlen` with ``backend="torch"``); it is what a
CPU engine runs. GPU launchers of a Triton paged kernel live next to the other kernels.
"""

from __future__ import annotations

import math

import torch

from videoanchor.kernels.interface import (
    _check_dtypes,
    _check_one_device,
    _check_tensor,
    anchored_attention_varlen,
)

__all__ = ["anchored_attention_paged", "gather_paged"]


def _validate_paged(
    q, k_cache, v_cache, block_table, seq_lens, cu_seqlens_q, max_seqlen_q, key_bias_cache,
    value_scale_cache,
):  # fmt: skip
    _check_tensor("q", q, 3)
    _check_tensor("k_cache", k_cache, 4)
    _check_tensor("v_cache", v_cache, 4)
    _check_dtypes(q, k_cache, v_cache)
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
    _check_tensor("block_table", block_table, 2)
    _check_tensor("seq_lens", seq_lens, 1)
    _check_tensor("cu_seqlens_q", cu_seqlens_q, 1)
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
    if not isinstance(max_seqlen_q, int) or isinstance(max_seqlen_q, bool) or max_seqlen_q < 0:
        raise ValueError(f"max_seqlen_q: expected a non-negative int, got {max_seqlen_q!r}")
    for name, t in (("key_bias_cache", key_bias_cache), ("value_scale_cache", value_scale_cache)):
        if t is None:
            continue
        _check_tensor(name, t, 2)
        if tuple(t.shape) != (num_blocks, block_size):
            raise ValueError(
                f"{name}: expected shape (num_blocks, block_size) = {(num_blocks, block_size)}, "
                f"got {tuple(t.shape)}"
            )
        if not t.is_floating_point():
            raise TypeError(f"{name}: expected a floating-point tensor, got dtype {t.dtype}")
    _check_one_device(
        (("q", q), ("k_cache", k_cache), ("v_cache", v_cache), ("block_table", block_table),
         ("seq_lens", seq_lens), ("cu_seqlens_q", cu_seqlens_q),
         ("key_bias_cache", key_bias_cache), ("value_scale_cache", value_scale_cache))
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
    softmax_scale: float | None = None,
    causal: bool = True,
) -> torch.Tensor:
    """Anchored attention of packed queries against a paged KV cache (exact torch path).

    Args:
        q: (total_q, Hq, D) float16/bfloat16/float32; sequence b's queries are
            ``q[cu_seqlens_q[b]:cu_seqlens_q[b + 1]]``.
        k_cache, v_cache: (num_blocks, block_size, Hkv, D), the dtype of q; Hq % Hkv == 0.
        block_table: (batch or more, max_blocks) int32; row b lists sequence b's blocks.
        seq_lens: (batch,) int32, the keys of sequence b (its cached positions, the new
            tokens included). Its queries are its LAST q-len positions, so causal masking
            is bottom-right aligned (query i of a q-len-n sequence sees keys
            ``< seq_len - n + i + 1``).
        cu_seqlens_q: (batch + 1,) int32 query offsets.
        max_seqlen_q: the longest query sequence (checked).
        key_bias_cache, value_scale_cache: (num_blocks, block_size) per-slot gates
            (``log(1 + alpha_k s)``, ``1 + alpha_v s``), or None (neutral).
        softmax_scale: default 1/sqrt(D).
        causal: see above; False lets every query see all seq_len keys.

    Returns:
        (total_q, Hq, D) in q's dtype. Raises TypeError/ValueError on bad shapes, dtypes,
        devices, or a sequence whose queries outnumber its keys.
    """
    _validate_paged(
        q, k_cache, v_cache, block_table, seq_lens, cu_seqlens_q, max_seqlen_q,
        key_bias_cache, value_scale_cache,
    )  # fmt: skip
    lens = [int(n) for n in seq_lens.tolist()]
    qs = cu_seqlens_q.tolist()
    num_blocks, block_size = k_cache.shape[:2]
    for b, n in enumerate(lens):
        nq = qs[b + 1] - qs[b]
        if nq < 0 or nq > n:
            raise ValueError(
                f"sequence {b}: expected 0 <= queries <= seq_len, got {nq} queries and seq_len {n}"
            )
        if n > block_table.shape[1] * block_size:
            raise ValueError(
                f"seq_lens[{b}]={n}: expected at most max_blocks * block_size = "
                f"{block_table.shape[1] * block_size} positions"
            )
    if qs[-1] != q.shape[0]:
        raise ValueError(
            f"cu_seqlens_q: expected the last offset to be total_q = {q.shape[0]}, got {qs[-1]}"
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
    k = gather_paged(k_cache, block_table, lens)
    v = gather_paged(v_cache, block_table, lens)
    kb = None if key_bias_cache is None else gather_paged(key_bias_cache, block_table, lens)
    vs = None if value_scale_cache is None else gather_paged(value_scale_cache, block_table, lens)
    cu_k = torch.zeros(len(lens) + 1, dtype=torch.int32, device=q.device)
    if lens:
        cu_k[1:] = torch.cumsum(torch.tensor(lens, device=q.device), 0)
    scale = 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else float(softmax_scale)
    return anchored_attention_varlen(
        q, k, v, cu_seqlens_q, cu_k, max_seqlen_q, max(lens, default=0), kb, vs,
        causal=causal, sm_scale=scale, backend="torch",
    )  # fmt: skip
