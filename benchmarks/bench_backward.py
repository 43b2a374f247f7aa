"""Training step of attention (forward + backward, gradients for q, k, v and the gates).

Providers, timed the same way in one process, rounds interleaved:
  anchored     videoanchor.anchored_attention (Triton on CUDA, the exact torch path on CPU)
               with key_bias and value_scale requiring grad
  sdpa_flash   (CUDA) SDPA flash backend without gates: the speed of unanchored training
  sdpa_mask    SDPA with a (B, 1, S, S) float mask (causal + key_bias) and V pre-scaled by
               value_scale; autograd gives the gate gradients through the mask build
  eager        materialised logits, softmax, matmul (plain autograd)
Each provider computes loss = sum(out * dO) and its gradients. Also recorded: the bytes of
the tensors autograd saves for backward (counted with saved_tensors_hooks, each storage
once, inputs included): a count, not a timing. FLOPs of forward + backward:
3.5 * 4 * B * Hq * S^2 * D, halved for causal.

    python benchmarks/bench_backward.py            # GPU: S = 2k, 8k; CPU: S = 512, 1024
    python benchmarks/bench_backward.py --quick    # the shortest S only
On a shared CPU run it with OMP_NUM_THREADS=1: the torch path's chunk-sized element-wise
ops suffer far more than one large eager op from threads waiting on busy cores.
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
from videoanchor.kernels.reference import anchored_attention_reference  # noqa: E402

DIMS = dict(Hq=28, Hkv=4, D=128)  # Qwen2.5-VL-7B's attention


def make(S, dtype, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    Hq, Hkv, D = DIMS["Hq"], DIMS["Hkv"], DIMS["D"]
    q = torch.randn(1, Hq, S, D, generator=g)
    k = torch.randn(1, Hkv, S, D, generator=g)
    v = torch.randn(1, Hkv, S, D, generator=g)
    kb, vs = videoanchor.anchor_gates(torch.rand(1, S, generator=g), alpha_k=9.5, alpha_v=2.5)
    go = torch.randn(1, Hq, S, D, generator=g)
    ins = [t.to(device, dtype).requires_grad_() for t in (q, k, v)]
    ins += [t.to(device).requires_grad_() for t in (kb, vs)]
    return ins, go.to(device, dtype)


def providers(inputs):
    """name -> (forward function, tensors to differentiate)."""
    q, k, v, kb, vs = inputs
    S, D = q.shape[2], q.shape[3]
    group = q.shape[1] // k.shape[1]
    out = {}
    out["anchored"] = (lambda: videoanchor.anchored_attention(q, k, v, kb, vs), inputs)
    if q.is_cuda:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        def flash():
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

        out["sdpa_flash"] = (flash, (q, k, v))

    def sdpa_mask():
        causal = torch.ones(S, S, dtype=torch.bool, device=q.device).tril()
        mask = kb[:, None, None, :].to(q.dtype).masked_fill(~causal, float("-inf"))
        v_s = v * vs[:, None, :, None].to(v.dtype)
        return F.scaled_dot_product_attention(q, k, v_s, attn_mask=mask, enable_gqa=True)

    out["sdpa_mask"] = (sdpa_mask, inputs)

    def eager():
        kk = k.repeat_interleave(group, 1)
        vv = (v * vs[:, None, :, None].to(v.dtype)).repeat_interleave(group, 1)
        logits = (q @ kk.transpose(-1, -2)) * (1 / math.sqrt(D)) + kb[:, None, None, :]
        causal = torch.ones(S, S, dtype=torch.bool, device=q.device).tril()
        p = torch.softmax(logits.float().masked_fill(~causal, float("-inf")), dim=-1)
        return p.to(q.dtype) @ vv

    out["eager"] = (eager, inputs)
    return out


def saved_bytes(fn_forward) -> int:
    """Bytes of the distinct storages autograd saves for backward during ``fn_forward``."""
    seen = {}

    def pack(t):
        st = t.untyped_storage()
        seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn_forward()
    return sum(seen.values())


def time_interleaved(fns: dict, device: str, rounds: int) -> dict:
    """Median / p20 / p80 ms per provider; every round runs each provider once."""
    if device == "cuda":
        import triton.testing

        return {
            n: triton.testing.do_bench(f, warmup=10, rep=100, quantiles=[0.5, 0.2, 0.8])
            for n, f in fns.items()
        }
    times = {n: [] for n in fns}
    for f in fns.values():
        f()  # warm-up
    for _ in range(rounds):
        for n, f in fns.items():
            t0 = time.perf_counter()
            f()
            times[n].append((time.perf_counter() - t0) * 1e3)
    res = {}
    for n, ts in times.items():
        res[n] = median_spread(ts)
    return res


def run(quick: bool, out_dir=None, rounds: int = 5):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    meta = environment(device)
    meta["loadavg_start"] = os.getloadavg()
    meta["torch_threads"] = torch.get_num_threads()
    if device == "cpu":
        lengths, dtype = ([512] if quick else [512, 1024]), torch.float32
    else:
        lengths, dtype = ([2048] if quick else [2048, 8192]), torch.bfloat16
    rows = []
    for S in lengths:
        inputs, go = make(S, dtype, device)
        fwds = providers(inputs)
        fns = {
            n: (lambda f=f, w=w, go=go: torch.autograd.grad((f() * go).sum(), w))
            for n, (f, w) in fwds.items()
        }
        # Accuracy against autograd of the float64 reference, where it fits.
        ref = None
        if S <= 2048:
            leaves = [t.detach().double().requires_grad_() for t in inputs]
            ref_out = anchored_attention_reference(*leaves)
            ref = torch.autograd.grad((ref_out * go.double()).sum(), leaves)
            del ref_out
        ok = {}
        for name, fn in fns.items():
            row = dict(S=S, dtype=str(dtype).split(".")[-1], provider=name, **DIMS)
            try:
                grads = fn()
                if ref is not None and name != "sdpa_flash":
                    row["max_grad_err_vs_fp64"] = max(
                        (g.double() - r).abs().max().item() for g, r in zip(grads, ref, strict=True)
                    )
                del grads
                row["saved_for_backward_mib"] = saved_bytes(fwds[name][0]) / 2**20
                ok[name] = fn
            except torch.OutOfMemoryError:
                row["error"] = "out of memory"
            except Exception as exc:  # a baseline that cannot run at this shape
                row["error"] = f"{type(exc).__name__}: {exc}"[:200]
            rows.append(row)
        timed = time_interleaved(ok, device, rounds)
        flops = 3.5 * 4 * DIMS["Hq"] * S * S * DIMS["D"] / 2
        by = {r["provider"]: r for r in rows if r["S"] == S}
        for name, (ms, lo, hi) in timed.items():
            by[name].update(ms=ms, ms_p20=lo, ms_p80=hi, tflops=flops / (ms * 1e-3) / 1e12)
        if "ms" in by.get("anchored", {}):
            for r in by.values():
                if "ms" in r:
                    r["time_vs_anchored"] = r["ms"] / by["anchored"]["ms"]
        for r in by.values():
            print(r, flush=True)
        del inputs, go, fwds, fns, ok, ref
        if device == "cuda":
            torch.cuda.empty_cache()
    meta["loadavg_end"] = os.getloadavg()
    cols = ["S", "provider", "ms", "tflops", "time_vs_anchored", "saved_for_backward_mib",
            "max_grad_err_vs_fp64", "error"]  # fmt: skip
    return finish("backward", meta, rows, out_dir, cols)


def main(argv=None):
    ap = parser(__doc__, quick="only the shortest sequence length")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds (CPU)")
    args = ap.parse_args(argv)
    run(args.quick, args.out_dir, args.rounds)


if __name__ == "__main__":
    main()
