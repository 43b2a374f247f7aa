"""Profile targets for issue 51: where a gated call's time goes on a GPU.

Each case runs ``WARMUP`` calls, then ``--calls`` calls inside an NVTX range named after
it (``gates/<case>``), between ``cudaProfilerStart`` and ``cudaProfilerStop``, so that
``nsys profile --capture-range=cudaProfilerApi`` sees the steady state only; ncu selects
by kernel name and launch order (``--launch-skip`` the warm-up launches: an NVTX filter
with ``/`` in it reads each ``/`` as a nested range and profiles nothing). Cases
(Qwen2.5-VL-7B's attention: Hq 28, Hkv 4, D 128, bf16, batch 1):

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
the script without a GPU, its numbers not meaningful. ``--ncu-summary FILE:LABELS`` (no
GPU needed) reads an ``ncu --page details`` text export and prints, per profiled kernel
in launch order, the figures the issues compare (duration, instructions, registers,
throughputs, IPC, occupancy), LABELS naming the launches (comma-separated).

    python benchmarks/profile_gates.py --cases prefill,decode --out $OUT/logs/profile_gates.txt
    nsys profile --capture-range=cudaProfilerApi -o $OUT/gates python benchmarks/profile_gates.py
    # launch 7 anchored (prepared gates), launch 8 plain: 2 cases x WARMUP launches skipped
    ncu --kernel-name regex:_anchored_prefill_kernel --launch-skip 6 --launch-count 2 \\
        -o $OUT/ncu python benchmarks/profile_gates.py --cases ncu --S 16384
    ncu --import $OUT/ncu.ncu-rep --page details > $OUT/ncu.txt
    python benchmarks/profile_gates.py --ncu-summary $OUT/ncu.txt:anchored_prepared,plain
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
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
#: Calls of each case before the profiled ones (ncu's --launch-skip counts them).
WARMUP = 3
#: (metric, unit) rows of ``ncu --page details`` that the summary keeps, and their labels.
NCU_ROWS = {
    ("Duration", "ms"): "duration ms", ("Duration", "us"): "duration us",
    ("Executed Instructions", "inst"): "instructions",
    ("Registers Per Thread", "register/thread"): "registers",
    ("Compute (SM) Throughput", "%"): "compute %", ("Memory Throughput", "%"): "memory %",
    ("Memory Throughput", "Gbyte/s"): "memory GB/s", ("Memory Throughput", "Tbyte/s"): "memory TB/s",
    ("Executed Ipc Active", "inst/cycle"): "IPC",
    ("Achieved Occupancy", "%"): "occupancy %",
}  # fmt: skip
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


def ncu_kernels(text: str) -> list[dict]:
    """Per kernel of an ``ncu --page details`` text export, in launch order: its name and
    the :data:`NCU_ROWS` figures found (floats)."""
    head = re.compile(r"^  (\S+) \(\d+, \d+, \d+\)x\(\d+, \d+, \d+\)")
    row = re.compile(r"^    (\S.*?)\s{2,}(\S+)\s+([\d,.]+)\s*$")
    kernels = []
    for line in text.splitlines():
        m = head.match(line)
        if m:
            kernels.append({"kernel": m.group(1)})
            continue
        m = row.match(line)
        if m and kernels:
            label = NCU_ROWS.get((m.group(1).strip(), m.group(2)))
            if label and label not in kernels[-1]:
                kernels[-1][label] = float(m.group(3).replace(",", ""))
    return kernels


def ncu_summary(text: str, labels: list[str]) -> str:
    """A text table of :func:`ncu_kernels`, one row per launch named by ``labels`` (in
    order; extra launches are numbered), the first launch the baseline of the ratios."""
    kernels = ncu_kernels(text)
    if not kernels:
        return "no kernel in the ncu export (nothing profiled)"
    cols = [c for c in dict.fromkeys(NCU_ROWS.values()) if any(c in k for k in kernels)]
    lines = ["launch".ljust(20) + "kernel".ljust(34) + "".join(c.rjust(15) for c in cols)]
    for i, k in enumerate(kernels):
        name = labels[i] if i < len(labels) else f"launch {i + 1}"
        lines.append(name.ljust(20) + k["kernel"][:33].ljust(34)
                     + "".join(f"{k[c]:15.4g}" if c in k else " " * 15 for c in cols))  # fmt: skip
    base = kernels[-1]
    for i, k in enumerate(kernels[:-1]):
        name = labels[i] if i < len(labels) else f"launch {i + 1}"
        last = labels[len(kernels) - 1] if len(kernels) - 1 < len(labels) else "the last"
        ratios = [f"{c} {k[c] / base[c]:.3f}x" for c in cols if base.get(c) and c in k]
        lines.append(f"{name} / {last}: " + ", ".join(ratios))
    return "\n".join(lines)


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
    ap.add_argument(
        "--ncu-summary", action="append", default=[], metavar="FILE:LABELS",
        help="summarise an ncu --page details text export (no GPU needed), then exit",
    )  # fmt: skip
    args = ap.parse_args(argv)
    if args.ncu_summary:
        for spec in args.ncu_summary:
            path, _, labels = spec.partition(":")
            print(f"== {path}")
            if not Path(path).exists():
                print("missing: ncu exported nothing")
                continue
            print(ncu_summary(Path(path).read_text(), [x for x in labels.split(",") if x]))
        return None
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        skip("profile_gates", "no CUDA device here; nothing profiled")
        return None
    names = args.cases.split(",")
    fns = cases(names, args.S, args.cache, args.device)
    for fn in fns.values():  # compile and warm up before the captured range
        for _ in range(WARMUP):
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
