"""Prefill attention: our fused anchored kernel against what a user would run instead.

Providers, all timed the same way in one process (triton.testing.do_bench, median and
20/80 percentiles; CUDA events):
  anchored        our Triton kernel with key_bias and value_scale, the fast form (one launch:
                  log2(value_scale) folded into the logits with the bias, value_scale_range
                  given: what the transformers integration runs; before issue 77 a separate
                  pass wrote a pre-scaled V first)
  anchored_general  the same without value_scale_range (the value scale inside the loop)
  anchored_prepared the fast form with the gates prepared once (prepare_gates, gates=): what
                  the transformers integration runs since issue 51 (GPU only)
  ours_plain      our Triton kernel without gates (the overhead reference)
  *_pointer       on compute capability 9.x, anchored_prepared and ours_plain through the
                  pointer loop (the Hopper loop, K and V by TMA, turned off): the loop the
                  Hopper loop replaced, timed beside it
  sdpa_flash      torch SDPA, flash backend, no bias (what a user gets today, unanchored)
  sdpa_mask       torch SDPA with a (B, 1, Sq, Skv) float mask (causal + bias) and V pre-scaled
  flex            compiled FlexAttention, score_mod adding bias[b, kv_idx], causal block mask,
                  V pre-scaled
  eager           materialised logits + mask, softmax, matmul (the authors' approach)
Every provider includes its own pre-processing (V scaling, mask building) in the time.
FLOPs: 4 * B * Hq * Sq * Skv * D, halved for causal with Sq = Skv.

    python benchmarks/bench_attention.py            # full sweep (GPU)
    python benchmarks/bench_attention.py --quick    # S = 2k only
    python benchmarks/bench_attention.py --hopper   # S = 8k-32k, Qwen2.5-VL-7B heads: the
                                                    # Hopper loop against the pointer loop
                                                    # and SDPA flash (attention_hopper.json)
    python benchmarks/bench_attention.py --hopper --dtype float16   # the same in fp16
                                                    # (attention_hopper_fp16.json)
Without CUDA it says so and runs a CPU comparison (forward, float32, S = 512, 1024, 2048;
--quick: 512) of the exact torch path (its fused CPU form, and the query-chunk form it
replaced), SDPA without bias, SDPA with the full (B, 1, S, S) bias + causal mask and
compiled FlexAttention on inductor's CPU backend (its compile time per shape is recorded
apart, not in its time; --quick leaves it out),
timed interleaved (one call of each per round, 5 rounds) so that load changes hit all alike.
"""

from __future__ import annotations

import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import videoanchor  # noqa: E402
from benchmarks.common import environment, finish, median_spread, parser  # noqa: E402
from videoanchor.kernels import prepare_gates, triton_prefill, value_scale_range_of  # noqa: E402
from videoanchor.kernels.torch_attention import anchored_attention_torch  # noqa: E402

MODELS = {
    "qwen2.5-vl-7b": dict(Hq=28, Hkv=4, D=128),
    "internvl2-8b": dict(Hq=32, Hkv=8, D=128),
}


def make(B, Hq, Hkv, S, D, dtype, device, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(B, Hq, S, D, device=device, dtype=dtype, generator=g)
    k = torch.randn(B, Hkv, S, D, device=device, dtype=dtype, generator=g)
    v = torch.randn(B, Hkv, S, D, device=device, dtype=dtype, generator=g)
    s = torch.rand(B, S, device=device, generator=g)
    key_bias, value_scale = videoanchor.anchor_gates(s, alpha_k=9.5, alpha_v=2.5)
    return q, k, v, key_bias, value_scale


def _pointer_loop(fn):
    """``fn`` with the prefill launcher's Hopper loop turned off (the pointer loop)."""

    def run():
        real = triton_prefill.hopper_loop
        triton_prefill.hopper_loop = lambda *args: False
        try:
            return fn()
        finally:
            triton_prefill.hopper_loop = real

    return run


def providers(q, k, v, key_bias, value_scale, flex_on_cpu=False):
    B, Hq, S, D = q.shape
    group = Hq // k.shape[1]
    out = {}
    # What the transformers integration runs: the fast form (the gates folded into one pair
    # per key, value_scale_range computed once per request). The general form (the value
    # scale multiplied into the probabilities in the loop) is what a call without
    # value_scale_range gets; the first H100 lease timed only that one, as "anchored".
    vs_range = value_scale_range_of(value_scale)
    out["anchored"] = lambda: videoanchor.anchored_attention(
        q, k, v, key_bias, value_scale, value_scale_range=vs_range
    )
    out["anchored_general"] = lambda: videoanchor.anchored_attention(q, k, v, key_bias, value_scale)
    if q.is_cuda:
        # The gates prepared once (prepare_gates: the key bias's log2 form and its shift),
        # as the transformers integration passes them to every layer since issue 51: the
        # call itself runs no operator on the gates.
        prepared = prepare_gates(key_bias, value_scale, value_scale_range=vs_range)
        out["anchored_prepared"] = lambda: videoanchor.anchored_attention(q, k, v, gates=prepared)
    out["ours_plain"] = lambda: videoanchor.anchored_attention(q, k, v)
    if q.is_cuda and torch.cuda.get_device_capability(q.device)[0] == 9:
        out["anchored_prepared_pointer"] = _pointer_loop(out["anchored_prepared"])
        out["ours_plain_pointer"] = _pointer_loop(out["ours_plain"])
    if not q.is_cuda:
        # the torch path's previous forward (query chunks of matmul + softmax), kept for
        # training and for attn_mask: what the fused CPU form replaced
        out["anchored_chunked"] = lambda: anchored_attention_torch(
            q, k, v, key_bias, value_scale, causal=True, sm_scale=1 / math.sqrt(D),
            key_padding_mask=None, fused=False,
        )[0]  # fmt: skip

    if q.is_cuda:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        def sdpa_flash():
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

        out["sdpa_flash"] = sdpa_flash
    else:
        out["sdpa"] = lambda: F.scaled_dot_product_attention(
            q, k, v, is_causal=True, enable_gqa=True
        )

    def sdpa_mask():
        causal = torch.ones(S, S, dtype=torch.bool, device=q.device).tril()
        mask = key_bias[:, None, None, :].to(q.dtype).masked_fill(~causal, float("-inf"))
        v_s = v * value_scale[:, None, :, None].to(v.dtype)
        return F.scaled_dot_product_attention(q, k, v_s, attn_mask=mask, enable_gqa=True)

    out["sdpa_mask"] = sdpa_mask

    if q.is_cuda or flex_on_cpu:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        flex = torch.compile(flex_attention, dynamic=False)
        block_mask = create_block_mask(
            lambda b, h, qi, ki: ki <= qi, None, None, S, S, device=q.device
        )
        bias = key_bias

        def score_mod(score, b, h, qi, ki):
            return score + bias[b, ki]

        def flex_fn():
            v_s = v * value_scale[:, None, :, None].to(v.dtype)
            return flex(q, k, v_s, score_mod=score_mod, block_mask=block_mask, enable_gqa=True)

        out["flex"] = flex_fn

    def eager():
        kk = k.repeat_interleave(group, 1)
        vv = (v * value_scale[:, None, :, None].to(v.dtype)).repeat_interleave(group, 1)
        logits = (q @ kk.transpose(-1, -2)) * (1 / math.sqrt(D))
        causal = torch.ones(S, S, dtype=torch.bool, device=q.device).tril()
        logits = logits + key_bias[:, None, None, :].to(q.dtype)
        logits = logits.masked_fill(~causal, float("-inf"))
        return torch.softmax(logits.float(), dim=-1).to(q.dtype) @ vv

    out["eager"] = eager
    return out


def measure(fn, device):
    if device == "cuda":
        import triton.testing

        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        ms, lo, hi = triton.testing.do_bench(fn, warmup=25, rep=100, quantiles=[0.5, 0.2, 0.8])
        return ms, lo, hi, peak / 2**20
    import time

    fn()
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return times[len(times) // 2], times[1], times[-2], None


def interleaved(fns: dict, rounds: int = 5) -> dict:
    """CPU timings (ms) of every provider, one call of each per round, so that a change of
    load on a shared machine hits all of them alike. A provider that fails is left out."""
    ok = {}
    for name, fn in fns.items():
        try:
            fn()  # warm-up
            ok[name] = fn
        except Exception:  # noqa: BLE001 (the row records the error when it runs again)
            pass
    times = {name: [] for name in ok}
    for _ in range(rounds):
        for name, fn in ok.items():
            t0 = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t0) * 1e3)
    return times


#: --hopper's providers: the Hopper loop's, the pointer loop's, and SDPA's flash kernel.
HOPPER = ("anchored_prepared", "ours_plain", "anchored_prepared_pointer", "ours_plain_pointer",
          "sdpa_flash")  # fmt: skip


def run(quick: bool, out_dir=None, flex_cpu: bool = True, hopper: bool = False,
        gpu_dtype=torch.bfloat16):  # fmt: skip
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if hopper and (device == "cpu" or torch.cuda.get_device_capability()[0] != 9):
        raise SystemExit("--hopper: expected a GPU of compute capability 9.x, got " + (
            device if device == "cpu" else str(torch.cuda.get_device_capability())))  # fmt: skip
    meta = environment(device)
    meta["anchored_form"] = "fast"  # "anchored" the fast form, "anchored_general" the loop
    if device == "cpu":
        print("No CUDA device: running the exact torch path against SDPA on the CPU at small S.")
        lengths, dtype, models = (
            [512] if quick else [512, 1024, 2048],
            torch.float32,
            {"qwen2.5-vl-7b": MODELS["qwen2.5-vl-7b"]},
        )
        meta["torch_threads"] = torch.get_num_threads()
        meta["forward_only"] = True
        meta["loadavg_start"] = list(os.getloadavg())
    else:
        lengths = [2048] if quick else [2048, 8192, 16384, 32768]
        dtype, models = gpu_dtype, MODELS
        if hopper:
            lengths, models = [8192, 16384, 32768], {"qwen2.5-vl-7b": MODELS["qwen2.5-vl-7b"]}
    rows = []
    for model, dims in models.items():
        for S in lengths:
            q, k, v, kb, vs = make(1, dims["Hq"], dims["Hkv"], S, dims["D"], dtype, device)
            flops = 4 * dims["Hq"] * S * S * dims["D"] / 2
            ref_out = None
            fns = providers(q, k, v, kb, vs, flex_on_cpu=flex_cpu)
            if hopper:
                fns = {name: fns[name] for name in HOPPER}
            compile_s = {}
            if "flex" in fns and device == "cpu":
                t0 = time.perf_counter()
                try:
                    fns["flex"]()  # compiles for this shape (inductor's C++ backend)
                    compile_s["flex"] = time.perf_counter() - t0
                except Exception as exc:  # noqa: BLE001
                    print(f"flex on the CPU failed: {type(exc).__name__}: {exc}"[:300])
            cpu_times = interleaved(fns) if device == "cpu" else {}
            for name, fn in fns.items():
                row = dict(model=model, S=S, B=1, dtype=str(dtype).split(".")[-1], provider=name)
                try:
                    result = fn()
                    if name in ("anchored", "anchored_general", "anchored_prepared",
                                "anchored_prepared_pointer", "sdpa_mask", "flex",
                                "eager"):  # fmt: skip
                        if ref_out is None:
                            ref_out = result.float()
                        row["max_diff_vs_anchored"] = (result.float() - ref_out).abs().max().item()
                    if device == "cpu":
                        ms, lo, hi = median_spread(cpu_times[name])
                        peak = None
                        if name in compile_s:
                            row["compile_s_first_call"] = compile_s[name]
                    else:
                        ms, lo, hi, peak = measure(fn, device)
                    row.update(ms=ms, ms_p20=lo, ms_p80=hi, peak_mib=peak)
                    row["tflops"] = flops / (ms * 1e-3) / 1e12
                except torch.OutOfMemoryError:
                    row["error"] = "out of memory"
                except Exception as exc:  # a baseline that cannot run at this shape
                    row["error"] = f"{type(exc).__name__}: {exc}"[:200]
                finally:
                    if device == "cuda":
                        torch.cuda.empty_cache()
                rows.append(row)
                print(row, flush=True)
            by = {r["provider"]: r for r in rows if r["model"] == model and r["S"] == S}
            if "ms" in by.get("anchored", {}):
                for r in by.values():
                    if "ms" in r:
                        r["speedup_of_anchored"] = r["ms"] / by["anchored"]["ms"]
    if device == "cpu":
        meta["loadavg_end"] = list(os.getloadavg())
    cols = ["model", "S", "provider", "ms", "tflops", "peak_mib", "speedup_of_anchored", "error"]
    name = "attention_hopper" if hopper else "attention"
    if device != "cpu" and gpu_dtype != torch.bfloat16:
        name += "_" + {torch.float16: "fp16"}[gpu_dtype]
    return finish(name, meta, rows, out_dir, cols)


def main(argv=None):
    ap = parser(__doc__, quick="only the shortest sequence length")
    ap.add_argument(
        "--no-flex-cpu",
        action="store_true",
        help="on a CPU, leave out FlexAttention (its compile takes ~20 s a shape)",
    )
    ap.add_argument(
        "--hopper",
        action="store_true",
        help="S = 8k-32k: the Hopper loop against the pointer loop and SDPA flash (sm_90)",
    )
    ap.add_argument(
        "--dtype", default="bfloat16", choices=["bfloat16", "float16"],
        help="on a GPU: the inputs' dtype (fp16: the fast form's fp16 row sum, issue 92)",
    )  # fmt: skip
    args = ap.parse_args(argv)
    run(args.quick, args.out_dir, flex_cpu=not (args.no_flex_cpu or args.quick), hopper=args.hopper,
        gpu_dtype=getattr(torch, args.dtype))  # fmt: skip


if __name__ == "__main__":
    main()
