"""Compile report: every kernel configuration compiled for sm_90 and sm_80 on the CPU
(no GPU: Triton's bundled ptxas), through the package's launchers with their real-GPU
tile choice. Writes benchmarks/results/compile_sm90.json and compile_sm80.json with, per
case and kernel: registers, spill bytes, stack, shared memory, MMA kind, CTAs per SM.

It also reads the main loop of the prefill kernel from the cubins (``nvdisasm``, shipped
with Triton) and counts its instructions, anchored (key bias + value scale) against the
same kernel with the gates off: non-MMA instructions per MMA, and their ratio, our static
stand-in for "anchored >= 0.97x the speed of our own no-bias kernel" (target ratio <= 1.05
for bf16, D 128 on sm_90).

EVERY FIGURE HERE IS STATIC, read from compiled code; none is a timing.

    TRITON_INTERPRET=0 python -m benchmarks.compile_report [--cc 90 80] [--jobs 2] [--quick]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import re
import subprocess
import tempfile
import time
from pathlib import Path

from benchmarks.common import RESULTS_DIR, environment

P, DEC = "prefill", "decode"


def matrix(quick: bool = False) -> list[dict]:
    """The configurations users hit (a subset with ``quick``)."""
    dtypes = ("fp16", "bf16", "fp32")
    dims = (128,) if quick else (64, 80, 96, 128, 256)
    cases = []
    for dtype in dtypes:
        for D in dims:
            for gates in (True, False):
                cases.append(dict(kind=P, dtype=dtype, D=D, gates=gates))
    for dtype in ("bf16", "fp32"):
        cases += [
            dict(kind=P, dtype=dtype, D=128, causal=False),
            dict(kind=P, dtype=dtype, D=128, mask=True, lse=True),
            dict(kind=P, dtype=dtype, D=128, varlen=True, lse=True),
            dict(kind=P, dtype=dtype, D=128, cache_seqlens=True),
        ]
    for dtype in dtypes:
        for group in (1, 7, 8):
            cases.append(dict(kind=DEC, dtype=dtype, D=128, group=group))
            # Sq = 64 queries per sequence against the cache: the largest tile (BLOCK_M 64).
            cases.append(dict(kind=DEC, dtype=dtype, D=128, group=group, Sq=64))
    if not quick:
        for D in (64, 256):
            cases.append(dict(kind=DEC, dtype="bf16", D=D, group=7, mask=True, lse=True))
        cases.append(dict(kind=DEC, dtype="bf16", D=128, group=7, varlen=True))
    # The backward kernels (dK/dV and dQ) of the prefill cases, gates and their gradients on.
    for dtype in dtypes:
        for D in (128,) if quick else (64, 80, 128, 256):
            cases.append(dict(kind="backward", dtype=dtype, D=D))
    if not quick:
        for dtype in ("fp16", "bf16", "fp32"):
            cases += [
                dict(kind="backward", dtype=dtype, D=128, causal=False, mask=True),
                dict(kind="backward", dtype=dtype, D=64, mask=True, cache_seqlens=True),
                dict(kind="backward", dtype=dtype, D=128, varlen=True, grad_lse=True),
                dict(kind="backward", dtype=dtype, D=128, group=1, gates=False),
            ]
    return cases


def _nvdisasm() -> str:
    import triton

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "nvdisasm")


_INSN = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(.*?)\s*;")
_LABEL = re.compile(r"^(\.L_x_\d+):")
_BRANCH = re.compile(r"BRA\s+`\((\.L_x_\d+)\)")


def main_loop_mix(cubin: bytes) -> dict:
    """Instruction counts of the kernel's main loop: the first backward branch's body
    (in address order) among those with the most MMA instructions."""
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
        path = f.name
    try:
        sass = subprocess.run(
            [_nvdisasm(), "-c", path], capture_output=True, text=True, check=True
        ).stdout
    finally:
        os.unlink(path)
    insns, labels = [], {}
    for line in sass.splitlines():
        m = _LABEL.match(line.strip())
        if m:
            labels[m.group(1)] = len(insns)
            continue
        m = _INSN.search(line)
        if m:
            insns.append(m.group(1))
    loops = []
    for i, insn in enumerate(insns):
        m = _BRANCH.search(insn)
        if m and m.group(1) in labels and labels[m.group(1)] <= i:
            body = insns[labels[m.group(1)] : i + 1]
            ops = [re.sub(r"^@!?U?P\w+\s+", "", x).split()[0] for x in body]
            mma = sum(op.split(".")[0] in ("HGMMA", "HMMA") for op in ops)
            loops.append(dict(start=labels[m.group(1)], instructions=len(body), mma=mma, ops=ops))
    if not loops:
        raise RuntimeError("no loop found in the SASS")
    best = max(loops, key=lambda lp: (lp["mma"], -lp["start"]))
    hist: dict[str, int] = {}
    for op in best["ops"]:
        hist[op.split(".")[0]] = hist.get(op.split(".")[0], 0) + 1
    non_mma = best["instructions"] - best["mma"]
    return dict(
        loops=len(loops),
        instructions=best["instructions"],
        mma=best["mma"],
        non_mma=non_mma,
        non_mma_per_mma=round(non_mma / best["mma"], 3) if best["mma"] else None,
        opcodes=dict(sorted(hist.items(), key=lambda kv: -kv[1])),
    )


def instruction_mix(cc: int) -> list[dict]:
    """Anchored vs gates-off prefill main loops, for the 16-bit production shapes."""
    from videoanchor.kernels import aot

    rows = []
    for dtype, D in (("bf16", 128), ("fp16", 128), ("bf16", 64)):
        mix = {}
        for gates in (True, False):
            (row,) = aot.compile_case(
                dict(kind=P, dtype=dtype, D=D, gates=gates), cc, keep_cubin=True
            )
            mix["anchored" if gates else "plain"] = main_loop_mix(row.pop("_cubin"))
        a, p = mix["anchored"], mix["plain"]
        rows.append(
            dict(
                dtype=dtype, D=D, causal=True, cc=cc, anchored=a, plain=p,
                ratio_non_mma_per_mma=round(a["non_mma_per_mma"] / p["non_mma_per_mma"], 3),
                ratio_instructions=round(a["instructions"] / p["instructions"], 3),
            )
        )  # fmt: skip
    return rows


def run(ccs, jobs: int, quick: bool, out_dir: Path) -> None:
    from videoanchor.kernels import aot

    reason = aot.unavailable_reason()
    if reason:
        raise SystemExit(f"compile report unavailable: {reason}")
    for cc in ccs:
        meta = environment(device="cpu")
        meta.update(
            target=f"sm_{cc}",
            note="STATIC figures read from compiled code (ptxas report, PTX, SASS); no timing",
        )
        start = time.time()
        cases = matrix(quick)
        chunks = [[(c, cc) for c in cases[i::jobs]] for i in range(jobs)]
        with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
            rows = [r for part in pool.map(aot.compile_in_subprocess, chunks) for r in part]
        mix = instruction_mix(cc) if cc >= 80 else []
        meta["compile_seconds"] = round(time.time() - start, 1)
        meta["loadavg_end"] = os.getloadavg()
        bad = [r for r in rows if "error" in r or r.get("spill_stores") or r.get("spill_loads")]
        summary = dict(
            cases=len(cases), kernels=len(rows), failures_or_spills=len(bad),
            max_shared_bytes=max((r.get("shared_bytes", 0) for r in rows), default=0),
        )  # fmt: skip
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / f"compile_sm{cc}.json"
        payload = dict(meta=meta, summary=summary, rows=rows, instruction_mix=mix)
        path.write_text(json.dumps(payload, indent=1, default=str) + "\n")
        print(f"sm_{cc}: {summary} -> {path}")
        for r in bad:
            print("  FAIL/SPILL", json.dumps(r)[:300])
        for m in mix:
            print(
                f"  main loop {m['dtype']} D{m['D']}: anchored {m['anchored']['non_mma_per_mma']} "
                f"vs plain {m['plain']['non_mma_per_mma']} non-MMA per MMA "
                f"(ratio {m['ratio_non_mma_per_mma']}; instructions ratio {m['ratio_instructions']})"
            )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cc", type=int, nargs="+", default=[90, 80])
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="D 128 only")
    ap.add_argument("--out", type=Path, default=RESULTS_DIR)
    args = ap.parse_args()
    if os.environ.get("TRITON_INTERPRET", "0") not in ("0", ""):
        raise SystemExit("run with TRITON_INTERPRET=0 (the kernels must be real JIT functions)")
    run(args.cc, args.jobs, args.quick, args.out)


if __name__ == "__main__":
    main()
