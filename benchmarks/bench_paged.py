"""Paged attention kernels (what the vLLM plugin's CUDA backend runs), on vLLM's cache layout:
one (num_blocks, Hkv, block_size, 2 * D) tensor, 16-slot blocks, scattered block tables.

Per shape (bf16, Qwen2.5-7B heads: Hq 28 / Hkv 4 / D 128), in one process:

- ``ours_anchored``: :func:`videoanchor.kernels.paged.anchored_attention_paged`, gates read
  through the block table (the general form), every sequence gated;
- ``ours_plain``: the same kernels without gate caches;
- ``vllm_triton``: vLLM's own ``unified_attention`` (the TRITON_ATTN backend's kernel), plain,
  what a user serving without VideoAnchor runs on that backend (when vllm is importable);
- ``vllm_flash``: vLLM's FlashAttention ``flash_attn_varlen_func`` with a block table (the
  default CUDA backend's kernel; when importable).

Shapes: decode (one query per sequence, batch 32 and 128, contexts 4k and 16k) and a mixed
prefill step (a 2k chunk continuing a 14k prompt, batched with 31 decode rows). The
ratio the issue asks about is ``ours_anchored`` / ``vllm_flash`` (or ``vllm_triton`` where
FlashAttention is not importable).

    python benchmarks/bench_paged.py [--quick] [--out-dir DIR]
Needs CUDA. Writes benchmarks/results/paged_<device>.json.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import environment, finish, parser, skip  # noqa: E402
from videoanchor.kernels.paged import anchored_attention_paged  # noqa: E402

HQ, HKV, D, BLOCK = 28, 4, 128, 16


def bench(fn):
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=100, quantiles=[0.5, 0.2, 0.8])


def make_batch(seq_lens, q_lens, dtype=torch.bfloat16, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    need = [math.ceil(n / BLOCK) for n in seq_lens]
    num_blocks = sum(need) + 64
    perm = torch.randperm(num_blocks, device="cuda", generator=g)
    table = torch.zeros(len(seq_lens), max(need), dtype=torch.int32, device="cuda")
    used = 0
    for b, nb in enumerate(need):
        table[b, :nb] = perm[used : used + nb].to(torch.int32)
        used += nb
    kv = torch.randn(num_blocks, HKV, BLOCK, 2 * D, device="cuda", dtype=dtype, generator=g)
    k_cache, v_cache = kv[..., :D].transpose(1, 2), kv[..., D:].transpose(1, 2)
    s = torch.rand(num_blocks, BLOCK, device="cuda", generator=g)
    kb, vs = torch.log1p(9.5 * s), 1 + 2.5 * s
    q = torch.randn(sum(q_lens), HQ, D, device="cuda", dtype=dtype, generator=g)
    cu_q = torch.zeros(len(q_lens) + 1, dtype=torch.int32, device="cuda")
    cu_q[1:] = torch.cumsum(torch.tensor(q_lens, device="cuda"), 0)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device="cuda")
    return dict(q=q, k=k_cache, v=v_cache, table=table, lens=lens, cu_q=cu_q, kb=kb, vs=vs,
                max_q=max(q_lens), max_k=max(seq_lens))  # fmt: skip


def runners(b):
    out = torch.empty_like(b["q"])
    scale = 1 / math.sqrt(D)
    common = dict(cu_seqlens_q=b["cu_q"], max_seqlen_q=b["max_q"], softmax_scale=scale,
                  backend="triton", out=out, validate=False)  # fmt: skip
    fns = {
        "ours_anchored": lambda: anchored_attention_paged(
            b["q"],
            b["k"],
            b["v"],
            b["table"],
            b["lens"],
            key_bias_cache=b["kb"],
            value_scale_cache=b["vs"],
            **common,
        ),  # fmt: skip
        "ours_plain": lambda: anchored_attention_paged(
            b["q"], b["k"], b["v"], b["table"], b["lens"], **common
        ),
    }
    why = {}
    try:
        from vllm.v1.attention.ops.triton_unified_attention import unified_attention

        ones = torch.ones(b["lens"].shape[0], HKV, device="cuda")
        fns["vllm_triton"] = lambda: unified_attention(
            q=b["q"], k=b["k"], v=b["v"], out=out, cu_seqlens_q=b["cu_q"],
            max_seqlen_q=b["max_q"], seqused_k=b["lens"], max_seqlen_k=b["max_k"],
            softmax_scale=scale, causal=True, window_size=(-1, -1), block_table=b["table"],
            softcap=0, q_descale=None, k_descale=ones, v_descale=ones,
        )  # fmt: skip
    except Exception as exc:  # not installed, or another vLLM version
        why["vllm_triton"] = f"{type(exc).__name__}: {exc}"
    try:
        from vllm.vllm_flash_attn import flash_attn_varlen_func

        fns["vllm_flash"] = lambda: flash_attn_varlen_func(
            q=b["q"], k=b["k"], v=b["v"], out=out, cu_seqlens_q=b["cu_q"],
            max_seqlen_q=b["max_q"], seqused_k=b["lens"], max_seqlen_k=b["max_k"],
            softmax_scale=scale, causal=True, block_table=b["table"],
        )  # fmt: skip
    except Exception as exc:
        why["vllm_flash"] = f"{type(exc).__name__}: {exc}"
    return fns, why


def shapes(quick):
    rows = []
    for batch in (32,) if quick else (32, 128):
        for ctx in (4096,) if quick else (4096, 16384):
            rows.append((f"decode b{batch} ctx{ctx}", [ctx] * batch, [1] * batch))
    rows.append(("prefill 2k chunk of 16k + 31 decodes", [16384] + [4096] * 31, [2048] + [1] * 31))
    return rows


def main() -> None:
    ap = parser(__doc__.splitlines()[0], quick=True)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        skip(
            "bench_paged",
            "no CUDA device here; the paged decode kernels are only timed on a "
            "GPU (the CPU interpreter is not a target). Nothing run.",
        )
        return
    meta = environment("cuda")
    try:
        import vllm

        meta["vllm"] = vllm.__version__
    except Exception:
        meta["vllm"] = None
    rows = []
    for name, seq_lens, q_lens in shapes(args.quick):
        b = make_batch(seq_lens, q_lens)
        fns, why = runners(b)
        row = {"shape": name, "batch": len(seq_lens), "kv_tokens": sum(seq_lens),
               "q_tokens": sum(q_lens), "not_run": why}  # fmt: skip
        for key, fn in fns.items():
            med, lo, hi = bench(fn)
            row[f"{key}_ms"] = med
            row[f"{key}_ms_p20_p80"] = [lo, hi]
        base = "vllm_flash" if "vllm_flash_ms" in row else "vllm_triton"
        if f"{base}_ms" in row:
            row["baseline"] = base
            row["anchored_over_baseline"] = row["ours_anchored_ms"] / row[f"{base}_ms"]
        row["anchored_over_ours_plain"] = row["ours_anchored_ms"] / row["ours_plain_ms"]
        kv_bytes = sum(seq_lens) * HKV * D * 2 * 2
        row["ours_anchored_kv_gbps"] = kv_bytes / row["ours_anchored_ms"] / 1e6
        rows.append(row)
    cols = ["shape", "ours_anchored_ms", "ours_plain_ms", "vllm_triton_ms", "vllm_flash_ms",
            "anchored_over_baseline", "anchored_over_ours_plain"]  # fmt: skip
    finish("paged", meta, rows, args.out_dir, cols)


if __name__ == "__main__":
    main()
