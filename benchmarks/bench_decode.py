"""Long-context kernels: split-KV decode, packed varlen batches and chunked prefill.

Decode (bf16, Hq 28 / Hkv 4 / D 128, cache 8k/32k/128k, batch 1 and 8): achieved bandwidth
= K+V bytes read / time, against the measured copy bandwidth of this GPU (bytes read +
written by ``dst.copy_(src)``), SDPA with a broadcast (B, 1, 1, S) float mask and pre-scaled
V, and compiled FlexAttention with the same bias as a score_mod. Caches rotate through
enough copies to defeat the L2 cache.
Every decode provider but FlexAttention is also timed replayed from a CUDA graph
(``ms_graph``, ``triton.testing.do_bench_cudagraph``: the calls captured once, the caches
still rotating), as a serving engine runs its decode step: the eager ``ms`` includes the
host's launch work (bench_host_overhead.py counts it), which at batch 1 is most of a call.
``speedup_of_ours_graph`` compares the graph timings with the prepared anchored call's
(the issue's targets: anchored <= 1.1x plain and <= SDPA with the gates as a mask). The
graph timings have not run on a GPU yet. ``--graph`` (issue 92, item 3): the decode rows
alone, at batch 1, 8 and 64 and 8k, 32k and 128k cached tokens, the graph-timed providers
only (no FlexAttention, no varlen or chunked sections); ``--dry-run`` prints what a run
would time (shapes, providers, bytes) without CUDA.
Varlen: 8 sequences of mixed length, packed (cu_seqlens) vs padded with a key padding mask.
Chunked prefill: a 16k prompt in 2k chunks against the growing cache vs one prefill.

    python benchmarks/bench_decode.py [--quick] [--graph] [--dry-run] [--out-dir DIR]
Needs CUDA (the Triton kernels' CPU interpreter is not a performance target).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import videoanchor  # noqa: E402
from benchmarks.common import environment, finish, parser, skip  # noqa: E402

HQ, HKV, D = 28, 4, 128
#: The decode providers also timed from a CUDA graph (``ms_graph``).
GRAPH_TIMED = ("anchored_split_kv", "anchored_prepared", "sdpa_mask", "plain_split_kv",
               "sdpa_plain")  # fmt: skip
PROVIDERS = ("anchored_split_kv", "anchored_prepared", "sdpa_mask", "flex", "plain_split_kv",
             "sdpa_plain")  # fmt: skip
L2_BYTES = 50 * 2**20


def bench(fn):
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=100, quantiles=[0.5, 0.2, 0.8])


def bench_graph(fn):
    """``fn``'s calls replayed from one CUDA graph (milliseconds per call): the GPU's own
    time, without the host's launch work, as an engine that captures its decode step runs
    it. At batch 1 ``bench`` times the host as much as the kernels."""
    import triton.testing

    return triton.testing.do_bench_cudagraph(fn, rep=50)


def peak_mib(fn):
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def copy_bandwidth():
    src = torch.empty(2**30 // 2, dtype=torch.bfloat16, device="cuda").normal_()
    dst = torch.empty_like(src)
    ms, _, _ = bench(lambda: dst.copy_(src))
    return 2 * src.numel() * src.element_size() / (ms * 1e-3) / 1e9


def kv_bytes(B, S, dtype=torch.bfloat16) -> int:
    """K + V bytes of one (B, S) cache (Hkv 4, D 128)."""
    return 2 * B * HKV * S * D * torch.tensor([], dtype=dtype).element_size()


def cache_copies(B, S, dtype=torch.bfloat16) -> int:
    """How many caches :class:`Rotating` keeps: enough to exceed 4x the L2, at most 8."""
    return max(1, min(8, -(-4 * L2_BYTES // kv_bytes(B, S, dtype))))


def decode_plan(graph: bool, quick: bool) -> tuple[list[tuple[int, int]], tuple[str, ...]]:
    """The (B, S) shapes and the providers of the decode section."""
    batches = (1, 8, 64) if graph else (1, 8)
    lengths = (8192,) if quick else (8192, 32768, 131072)
    providers = GRAPH_TIMED if graph else PROVIDERS
    return [(B, S) for B in batches for S in lengths], providers


class Rotating:
    """Several independent caches used in turn so that no call hits a warm L2."""

    def __init__(self, B, S, dtype, device="cuda"):
        one = kv_bytes(B, S, dtype)
        n = cache_copies(B, S, dtype)
        g = torch.Generator(device=device).manual_seed(0)
        self.sets = []
        for _ in range(n):
            k = torch.randn(B, HKV, S, D, device=device, dtype=dtype, generator=g)
            v = torch.randn(B, HKV, S, D, device=device, dtype=dtype, generator=g)
            s = torch.rand(B, S, device=device, generator=g)
            kb, vs = videoanchor.anchor_gates(s, 9.5, 2.5)
            self.sets.append((k, v, kb, vs))
        self.prepared = [videoanchor.kernels.prepare_gates(kb, vs) for _, _, kb, vs in self.sets]
        self.i = 0
        self.kv_bytes = one

    def next(self):
        self.i = (self.i + 1) % len(self.sets)
        return self.sets[self.i]


def decode_shape(B, S, flex, copy_gbs, providers=None, device="cuda"):
    """The decode rows of one (B, S): ``providers`` (default all) timed eagerly, those of
    GRAPH_TIMED from a CUDA graph too. ``device`` other than CUDA only for a check of the
    calls (tests/test_bench_decode.py, with the timers replaced)."""
    dtype = torch.bfloat16
    q = torch.randn(B, HQ, 1, D, device=device, dtype=dtype)
    caches = Rotating(B, S, dtype, device)

    def ours():
        k, v, kb, vs = caches.next()
        return videoanchor.anchored_attention(q, k, v, kb, vs)

    def ours_prepared():  # the gates prepared once per cache (what the integration passes)
        k, v, _, _ = caches.next()
        return videoanchor.anchored_attention(q, k, v, gates=caches.prepared[caches.i])

    def sdpa_mask():
        k, v, kb, vs = caches.next()
        mask = kb[:, None, None, :].to(dtype)
        v_s = v * vs[:, None, :, None].to(dtype)
        return F.scaled_dot_product_attention(q, k, v_s, attn_mask=mask, enable_gqa=True)

    def flex_fn():
        k, v, kb, vs = caches.next()

        def score_mod(score, b, h, qi, ki):
            return score + kb[b, ki]

        v_s = v * vs[:, None, :, None].to(dtype)
        return flex(q, k, v_s, score_mod=score_mod, enable_gqa=True)

    # Without the gates (a different output: no difference is taken): where a batch-1 step's
    # floor comes from (our host code, bench_host_overhead.py) against SDPA's.
    def ours_plain():
        k, v, _, _ = caches.next()
        return videoanchor.anchored_attention(q, k, v)

    def sdpa_plain():
        k, v, _, _ = caches.next()
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)

    rows, ref = [], None
    for name, fn in (("anchored_split_kv", ours), ("anchored_prepared", ours_prepared),
                     ("sdpa_mask", sdpa_mask), ("flex", flex_fn),
                     ("plain_split_kv", ours_plain), ("sdpa_plain", sdpa_plain)):  # fmt: skip
        if providers is not None and name not in providers:
            continue
        row = dict(section="decode", B=B, S=S, provider=name)
        try:
            caches.i = 0
            out = fn().float()
            ref = out if ref is None else ref
            if name not in ("plain_split_kv", "sdpa_plain"):
                row["max_diff_vs_anchored"] = (out - ref).abs().max().item()
            ms, lo, hi = bench(fn)
            row.update(ms=ms, ms_p20=lo, ms_p80=hi, peak_mib=peak_mib(fn))
            if name in GRAPH_TIMED:  # a provider that cannot be captured keeps its row
                try:
                    row["ms_graph"] = bench_graph(fn)
                except Exception as exc:
                    row["graph_error"] = f"{type(exc).__name__}: {exc}"[:200]
            row["kv_gbs"] = caches.kv_bytes / (ms * 1e-3) / 1e9
            if "ms_graph" in row:
                row["kv_gbs_graph"] = caches.kv_bytes / (row["ms_graph"] * 1e-3) / 1e9
            row["fraction_of_copy_bw"] = row["kv_gbs"] / copy_gbs
        except torch.OutOfMemoryError:
            row["error"] = "out of memory"
        except Exception as exc:
            row["error"] = f"{type(exc).__name__}: {exc}"[:200]
        rows.append(row)
        print(row, flush=True)
    return rows


def decode_rows(quick, graph=False):
    copy_gbs = copy_bandwidth()
    print(f"copy bandwidth: {copy_gbs:.0f} GB/s (read + write)")
    shapes, providers = decode_plan(graph, quick)
    flex = None
    if "flex" in providers:
        from torch.nn.attention.flex_attention import flex_attention

        flex = torch.compile(flex_attention, dynamic=False)
    rows = []
    for B, S in shapes:
        rows += decode_shape(B, S, flex, copy_gbs, providers)
        torch.cuda.empty_cache()
    _ratios(rows, "anchored_split_kv", ("B", "S"))
    _ratios(rows, "anchored_prepared", ("B", "S"), field="ms_graph")
    return rows, copy_gbs


def varlen_rows():
    rows = []
    lengths = [1024, 7000, 2500, 8192, 300, 4100, 6000, 1500]
    dtype = torch.bfloat16
    total = sum(lengths)
    q = torch.randn(total, HQ, D, device="cuda", dtype=dtype)
    k = torch.randn(total, HKV, D, device="cuda", dtype=dtype)
    v = torch.randn(total, HKV, D, device="cuda", dtype=dtype)
    kb, vs = videoanchor.anchor_gates(torch.rand(total, device="cuda"), 9.5, 2.5)
    cu = torch.tensor(
        [0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device="cuda"
    )
    Smax, B = max(lengths), len(lengths)
    qp = torch.zeros(B, Smax, HQ, D, device="cuda", dtype=dtype)
    kp = torch.zeros(B, Smax, HKV, D, device="cuda", dtype=dtype)
    vp = torch.zeros_like(kp)
    kbp = torch.zeros(B, Smax, device="cuda")
    vsp = torch.ones(B, Smax, device="cuda")
    mask = torch.zeros(B, Smax, dtype=torch.bool, device="cuda")
    for b, n in enumerate(lengths):  # left padding, as a VLM batch would have
        a, e = cu[b].item(), cu[b + 1].item()
        qp[b, Smax - n :], kp[b, Smax - n :], vp[b, Smax - n :] = q[a:e], k[a:e], v[a:e]
        kbp[b, Smax - n :], vsp[b, Smax - n :], mask[b, Smax - n :] = kb[a:e], vs[a:e], True

    def packed():
        return videoanchor.anchored_attention_varlen(q, k, v, cu, cu, Smax, Smax, kb, vs)

    def padded():
        return videoanchor.anchored_attention(
            qp.transpose(1, 2),
            kp.transpose(1, 2),
            vp.transpose(1, 2),
            kbp,
            vsp,
            key_padding_mask=mask,
        )

    for name, fn in (("varlen_packed", packed), ("padded_with_mask", padded)):
        ms, lo, hi = bench(fn)
        rows.append(
            dict(section="varlen", provider=name, lengths=lengths, ms=ms, ms_p20=lo, ms_p80=hi,
                 tokens_per_s=total / (ms * 1e-3), peak_mib=peak_mib(fn))
        )  # fmt: skip
        print(rows[-1], flush=True)
    _ratios(rows, "varlen_packed", ("section",))
    return rows


def varlen_decode_rows():
    """One new token per sequence against packed caches of different lengths (continuous
    batching): the split-KV varlen path, the same call through the prefill kernel (a
    ``max_seqlen_k`` hint of 1), and a left-padded dense batch with a key mask."""
    rows = []
    lengths = [31000, 4096, 17000, 900, 65536, 12000, 2500, 28000]
    dtype = torch.bfloat16
    B, total, Smax = len(lengths), sum(lengths), max(lengths)
    q = torch.randn(B, HQ, D, device="cuda", dtype=dtype)
    k = torch.randn(total, HKV, D, device="cuda", dtype=dtype)
    v = torch.randn(total, HKV, D, device="cuda", dtype=dtype)
    kb, vs = videoanchor.anchor_gates(torch.rand(total, device="cuda"), 9.5, 2.5)
    cu_q = torch.arange(B + 1, dtype=torch.int32, device="cuda")
    cu_k = torch.tensor(
        [0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device="cuda"
    )
    kp = torch.zeros(B, HKV, Smax, D, device="cuda", dtype=dtype)
    vp = torch.zeros_like(kp)
    kbp = torch.zeros(B, Smax, device="cuda")
    vsp = torch.ones(B, Smax, device="cuda")
    mask = torch.zeros(B, Smax, dtype=torch.bool, device="cuda")
    for b, n in enumerate(lengths):
        a, e = cu_k[b].item(), cu_k[b + 1].item()
        kp[b, :, Smax - n :], vp[b, :, Smax - n :] = k[a:e].transpose(0, 1), v[a:e].transpose(0, 1)
        kbp[b, Smax - n :], vsp[b, Smax - n :], mask[b, Smax - n :] = kb[a:e], vs[a:e], True

    def packed():
        return videoanchor.anchored_attention_varlen(q, k, v, cu_q, cu_k, 1, Smax, kb, vs)

    def packed_prefill_kernel():
        # a max_seqlen_k hint under DECODE_MIN_SKV keeps the prefill kernel (documented)
        return videoanchor.anchored_attention_varlen(q, k, v, cu_q, cu_k, 1, 1, kb, vs)

    def padded():
        out = videoanchor.anchored_attention(q[:, :, None], kp, vp, kbp, vsp, key_padding_mask=mask)
        return out[:, :, 0]

    ref = padded().float()
    kv_bytes = 2 * total * HKV * D * k.element_size()
    for name, fn in (
        ("varlen_split_kv", packed),
        ("varlen_prefill_kernel", packed_prefill_kernel),
        ("padded_with_mask", padded),
    ):
        err = (fn().float() - ref).abs().max().item()
        ms, lo, hi = bench(fn)
        rows.append(
            dict(section="varlen_decode", provider=name, lengths=lengths, ms=ms, ms_p20=lo,
                 ms_p80=hi, kv_gbs=kv_bytes / (ms * 1e-3) / 1e9, max_diff_vs_padded=err,
                 peak_mib=peak_mib(fn))
        )  # fmt: skip
        print(rows[-1], flush=True)
    _ratios(rows, "varlen_split_kv", ("section",))
    return rows


def chunked_rows(quick):
    rows = []
    S, chunk = (8192, 2048) if quick else (16384, 2048)
    dtype = torch.bfloat16
    q = torch.randn(1, HQ, S, D, device="cuda", dtype=dtype)
    k = torch.randn(1, HKV, S, D, device="cuda", dtype=dtype)
    v = torch.randn(1, HKV, S, D, device="cuda", dtype=dtype)
    kb, vs = videoanchor.anchor_gates(torch.rand(1, S, device="cuda"), 9.5, 2.5)

    def one_shot():
        return videoanchor.anchored_attention(q, k, v, kb, vs)

    def chunked():
        return [
            videoanchor.anchored_attention(
                q[:, :, a : a + chunk],
                k[:, :, : a + chunk],
                v[:, :, : a + chunk],
                kb[:, : a + chunk],
                vs[:, : a + chunk],
            )  # fmt: skip
            for a in range(0, S, chunk)
        ]

    diff = (torch.cat(chunked(), 2).float() - one_shot().float()).abs().max().item()
    for name, fn in (("one_prefill", one_shot), ("chunked_prefill", chunked)):
        ms, lo, hi = bench(fn)
        rows.append(
            dict(section="chunked_prefill", provider=name, S=S, chunk=chunk, ms=ms, ms_p20=lo,
                 ms_p80=hi, tokens_per_s=S / (ms * 1e-3), max_diff_vs_one_prefill=diff)
        )  # fmt: skip
        print(rows[-1], flush=True)
    _ratios(rows, "chunked_prefill", ("section",))
    return rows


def _ratios(rows, ours, keys, field="ms"):
    """speedup_of_ours = baseline time / our time, for rows sharing ``keys`` (``field``
    "ms_graph": speedup_of_ours_graph, from the graph timings)."""
    name = "speedup_of_ours" + ("" if field == "ms" else "_graph")
    for r in rows:
        mine = [
            o for o in rows
            if o["provider"] == ours and all(o.get(k) == r.get(k) for k in keys) and field in o
        ]  # fmt: skip
        if mine and field in r:
            r[name] = r[field] / mine[0][field]


def plan_rows(graph: bool, quick: bool) -> list[dict]:
    """What a run would time (``--dry-run``): per shape the providers, the K + V bytes of a
    cache, the caches kept and the bytes they take."""
    shapes, providers = decode_plan(graph, quick)
    return [
        dict(section="plan", B=B, S=S, providers=list(providers), kv_bytes=kv_bytes(B, S),
             caches=cache_copies(B, S), cache_gib=cache_copies(B, S) * kv_bytes(B, S) / 2**30,
             graph_timed=[p for p in providers if p in GRAPH_TIMED])
        for B, S in shapes
    ]  # fmt: skip


def main(argv=None):
    ap = parser(__doc__, quick="smallest shapes only")
    ap.add_argument(
        "--graph",
        action="store_true",
        help="the decode rows alone at batch 1-64, graph-timed providers only",
    )
    ap.add_argument("--dry-run", action="store_true", help="print the plan; time nothing")
    args = ap.parse_args(argv)
    if args.dry_run:
        rows = plan_rows(args.graph, args.quick)
        for row in rows:
            print(row)
        return rows
    if not torch.cuda.is_available():
        skip(
            "bench_decode",
            "no CUDA device here; these kernels are only timed on a GPU. Nothing run.",
        )
        return None
    meta = environment("cuda")
    rows, copy_gbs = decode_rows(args.quick, args.graph)
    meta["copy_bandwidth_gbs"] = copy_gbs
    meta["graph_only"] = args.graph
    sections = () if args.graph else (varlen_rows, varlen_decode_rows,
                                      lambda: chunked_rows(args.quick))  # fmt: skip
    for section in sections:
        try:  # a failing section is recorded, and does not lose the others' rows
            rows += section()
        except Exception as exc:  # noqa: BLE001
            rows.append({"section": getattr(section, "__name__", "chunked_rows"),
                         "failed": f"{type(exc).__name__}: {exc}"})  # fmt: skip
            print(rows[-1], flush=True)
        torch.cuda.empty_cache()
    cols = ["section", "B", "S", "provider", "ms", "ms_graph", "kv_gbs", "fraction_of_copy_bw",
            "speedup_of_ours", "speedup_of_ours_graph", "error"]  # fmt: skip
    return finish("decode_graph" if args.graph else "decode", meta, rows, args.out_dir, cols)


if __name__ == "__main__":
    main()
