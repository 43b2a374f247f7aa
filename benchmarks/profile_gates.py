"""Profile targets for issue 51: where a gated call's time goes on a GPU.

Each case runs a few warm-up calls, then ``--calls`` calls inside an NVTX range named after
it (``gates/<case>``), between ``cudaProfilerStart`` and ``cudaProfilerStop``, so that
``nsys profile --capture-range=cudaProfilerApi`` and ``ncu --nvtx --nvtx-include
"gates/..."`` see the steady state only. Cases (Qwen2.5-VL-7B's attention: Hq 28, Hkv 4,
D 128, bf16, batch 1):

- ``prefill``: one causal prefill of ``--S`` tokens (default 2048), anchored with the gates
  prepared once (the fast form, what the transformers integration runs), anchored with the
  gates given to the call, and our kernel without gates;
- ``decode``: one decode step against ``--cache`` cached tokens (default 8192), the same
  three, and SDPA with the gates as a mask;
- ``ncu``: one prefill of ``--S`` tokens (16384 for the ncu run), anchored (fast form) and
  without gates, once each, for ``ncu`` to compare the kernels.

Without nsys the script still reports, from the torch profiler (CUDA activity), per call:
the host time, the GPU kernel time, the kernels launched, the CUDA API calls that wait for
the device (synchronise, DtoH copies) and the allocations (``cudaMalloc``), into
``--out`` (text) and a JSON beside it. ``--device cpu`` runs the same cases on the CPU (no
NVTX ranges or profiler capture range, the torch profiler's CPU activity only): a check of
the script without a GPU, its numbers not meaningful.

    python benchmarks/profile_gates.py --cases prefill,decode --out $OUT/logs/profile_gates.txt
    nsys profile --capture-range=cudaProfilerApi -o $OUT/gates python benchmarks/profile_gates.py
    ncu --nvtx --nvtx-include "gates/ncu/" -o $OUT/ncu python benchmarks/profile_gates.py \\
        --cases ncu --S 16384
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import videoanchor  # noqa: E402
from benchmarks.common import environment, skip  # noqa: E402
from videoanchor.kernels import prepare_gates, value_scale_range_of  # noqa: E402

HQ, HKV, D = 28, 4, 128
#: CUDA API calls that wait for the device or copy (a DtoH copy waits too).
WAITS = ("Synchronize", "cudaMemcpy", "cuMemcpy")


def _inputs(sq: int, skv: int, device: str, seed: int = 0):
    g = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(1, HQ, sq, D, device=device, dtype=torch.bfloat16, generator=g)
    k, v = (torch.randn(1, HKV, skv, D, device=device, dtype=torch.bfloat16, generator=g)
            for _ in range(2))  # fmt: skip
    kb, vs = videoanchor.anchor_gates(torch.rand(1, skv, device=device, generator=g), 9.5, 2.5)
    return q, k, v, kb, vs


def _sync(device: str) -> None:
    if device != "cpu":
        torch.cuda.synchronize()


def cases(names: list[str], S: int, cache: int, device: str = "cuda") -> dict:
    """``{name: call}`` for the requested case groups, on ``device``."""
    out = {}
    if "prefill" in names or "ncu" in names:
        q, k, v, kb, vs = _inputs(S, S, device)
        rng = value_scale_range_of(vs)
        gates = prepare_gates(kb, vs, value_scale_range=rng)
        group = "ncu" if "ncu" in names else "prefill"
        out[f"{group}/anchored_prepared"] = lambda: videoanchor.anchored_attention(
            q, k, v, gates=gates
        )
        if group == "prefill":
            out["prefill/anchored_given"] = lambda: videoanchor.anchored_attention(
                q, k, v, kb, vs, value_scale_range=rng
            )
        out[f"{group}/plain"] = lambda: videoanchor.anchored_attention(q, k, v)
    if "decode" in names:
        q1, k1, v1, kb1, vs1 = _inputs(1, cache, device, seed=1)
        gates1 = prepare_gates(kb1, vs1)
        mask = kb1[:, None, None, :].to(torch.bfloat16)
        out["decode/anchored_prepared"] = lambda: videoanchor.anchored_attention(
            q1, k1, v1, gates=gates1
        )
        out["decode/anchored_given"] = lambda: videoanchor.anchored_attention(q1, k1, v1, kb1, vs1)
        out["decode/plain"] = lambda: videoanchor.anchored_attention(q1, k1, v1)
        out["decode/sdpa_gates_as_mask"] = lambda: F.scaled_dot_product_attention(
            q1, k1, v1 * vs1[:, None, :, None].to(torch.bfloat16), attn_mask=mask, enable_gqa=True
        )
    return out


def summarise(name: str, fn, calls: int, device: str = "cuda") -> dict:
    """Host and GPU time per call, and per call what the torch profiler saw on the CUDA API
    (on the CPU: the CPU activity only)."""
    _sync(device)
    t = time.perf_counter()
    for _ in range(calls):
        fn()
    host = (time.perf_counter() - t) / calls  # the host returns before the GPU finishes
    _sync(device)
    wall = (time.perf_counter() - t) / calls
    acts = [torch.profiler.ProfilerActivity.CPU]
    if device != "cpu":
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(calls):
            fn()
    events = prof.events()
    api = [e.name for e in events if e.name.startswith(("cuda", "cu")) and e.device_type.name
           == "CPU"]  # fmt: skip
    kernels = [e for e in events if e.device_type.name == "CUDA"]
    per = 1.0 / calls
    return {
        "case": name,
        "host_ms_per_call": host * 1e3,
        "wall_ms_per_call": wall * 1e3,
        "gpu_kernel_ms_per_call": sum(e.device_time for e in kernels) * 1e-3 * per,
        "kernels_per_call": len(kernels) * per,
        "launch_api_per_call": sum("LaunchKernel" in a or "LaunchCooperative" in a for a in api)
        * per,
        "sync_or_copy_api_per_call": sum(any(w in a for w in WAITS) for a in api) * per,
        "mallocs_per_call": sum(a.startswith("cudaMalloc") for a in api) * per,
        "aten_ops_per_call": sum(e.name.startswith("aten::") for e in events) * per,
        "kernel_names": sorted({e.name[:60] for e in kernels}),
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default="prefill,decode", help="prefill, decode, ncu")
    ap.add_argument("--S", type=int, default=2048, help="prefill tokens")
    ap.add_argument("--cache", type=int, default=8192, help="decode: cached tokens")
    ap.add_argument("--calls", type=int, default=20)
    ap.add_argument("--out", default=None, help="text summary (a JSON is written beside it)")
    ap.add_argument(
        "--no-summary", action="store_true", help="only the NVTX ranges (under nsys: no CUPTI)"
    )
    ap.add_argument(
        "--device", default="cuda", choices=("cuda", "cpu"),
        help="cpu: the cases on the CPU, to check the script without a GPU",
    )  # fmt: skip
    args = ap.parse_args(argv)
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        skip("profile_gates", "no CUDA device here; nothing profiled")
        return None
    names = args.cases.split(",")
    fns = cases(names, args.S, args.cache, args.device)
    for fn in fns.values():  # compile and warm up before the captured range
        for _ in range(3):
            fn()
    _sync(args.device)
    if cuda:
        torch.cuda.profiler.start()
    for name, fn in fns.items():
        with torch.cuda.nvtx.range(f"gates/{name}") if cuda else contextlib.nullcontext():
            for _ in range(1 if "ncu" in names else args.calls):
                fn()
        _sync(args.device)
    if cuda:
        torch.cuda.profiler.stop()
    if "ncu" in names or args.no_summary:  # ncu replays kernels; nsys holds CUPTI itself
        return None
    rows = [summarise(name, fn, args.calls, args.device) for name, fn in fns.items()]
    cols = {"host_ms_per_call": "host ms", "wall_ms_per_call": "wall ms",
            "gpu_kernel_ms_per_call": "gpu ms", "kernels_per_call": "kernels",
            "launch_api_per_call": "launches", "sync_or_copy_api_per_call": "sync/copy",
            "mallocs_per_call": "mallocs", "aten_ops_per_call": "aten ops"}  # fmt: skip
    meta = environment(args.device)
    lines = [
        f"profile_gates: S={args.S}, cache={args.cache}, {args.calls} calls per case, "
        f"{meta.get('device')}, git {meta.get('git_sha')}; per call:",
        "case".ljust(28) + "".join(label.rjust(11) for label in cols.values()),
    ]
    for r in rows:
        lines.append(r["case"].ljust(28) + "".join(f"{r[c]:11.4g}" for c in cols))
    lines += [f"kernels of {r['case']}: {', '.join(r['kernel_names'])}" for r in rows]
    text = "\n".join(lines)
    print(text)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
        out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    return rows


if __name__ == "__main__":
    main()
