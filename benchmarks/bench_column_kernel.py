"""The column kernel of issue 90 step 3 (videoanchor/anchor/solvers/_column_kernel.py)
compiled ahead of time: registers, spills, shared memory and blocks an SM at each level of
coefficient slots, for sm_90 and sm_80, with Triton's bundled ptxas (no GPU). STATIC
figures, read from compiled code, never a timing.

    TRITON_INTERPRET=0 python benchmarks/bench_column_kernel.py --static 90,80 --slots 64,128,256

writes benchmarks/results/column_kernel_static.json (Triton 3.9; another Triton's python,
e.g. a venv with triton 3.6.0, writes column_kernel_triton36_static.json). The outlier slots' count ``ME`` is a
run-time stride (the kernel sweeps them in chunks from global memory), so one binary per
``M`` serves every ``ME``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import environment, write_result  # noqa: E402

#: The levels compiled by default: coefficient slots (the 64-frame supports reach 205).
LEVELS = (64, 128, 256)


def compile_static(
    cc: int, M: int, ME: int = 1024, num_warps: int | None = None, MS: int | None = None
) -> dict:
    """The kernel compiled for ``sm_<cc>`` at ``M`` coefficient slots and ``MS`` support
    positions (None: ``M``; ``ME`` outlier slots: a run-time stride, it changes nothing
    compiled)."""
    from videoanchor.anchor.solvers import _column_kernel as ck
    from videoanchor.kernels import aot
    from videoanchor.kernels.launch import Launch

    n, d, nc = 256, 128, 8
    f64 = dict(dtype=torch.float64)
    i32 = dict(dtype=torch.int32)
    MS = MS or M
    BR, BE, BC, BRC = ck.tiles(MS, M)
    args = (torch.empty(n, n, **f64), torch.empty(n, d, **f64), torch.empty(5, **f64),
            torch.empty(nc, dtype=torch.int64), torch.empty(nc, M, **i32),
            torch.empty(nc, M, **f64), torch.empty(nc, ME, **i32), torch.empty(nc, ME, **f64),
            torch.empty(nc, **f64), torch.empty(nc, **i32), torch.empty(nc, **i32),
            torch.empty(nc, MS, MS, **f64), torch.empty(nc, 2, MS, **i32),
            torch.empty(nc, ME, **i32), torch.empty(nc, **i32), torch.empty(nc, 2, MS, **f64),
            torch.empty(nc, 3, ME, **f64), torch.empty(nc, M, **f64), torch.empty(nc, **i32),
            torch.empty(1, **i32), n, d, ME, 1000)  # fmt: skip
    warps = num_warps or ck.NUM_WARPS
    rec = Launch(ck._column_kernel, (nc,), args,
                 dict(M=M, MS=MS, BR=BR, BE=min(BE, ME), BC=BC, BRC=BRC, REFINE=ck.REFINE,
                      num_warps=warps, **ck.OPTIONS))  # fmt: skip
    row = aot.compile_launch(rec, cc)
    return dict(M=M, MS=MS, ME=ME, threads=32 * warps, **row)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--static", default="90,80", metavar="CC,...",
                    help="compile for these sm_CC ahead of time (no GPU)")  # fmt: skip
    ap.add_argument(
        "--slots",
        default=",".join(map(str, LEVELS)),
        help="levels M or M:MS (coefficient slots, support positions), comma-separated",
    )
    ap.add_argument("--me", type=int, default=1024, help="outlier slots (a run-time stride)")
    ap.add_argument("--num-warps", type=int, default=None)
    ap.add_argument("--out-dir", default=None)
    ap.add_argument("--no-write", action="store_true", help="print the rows only")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") != "0":
        raise SystemExit("run with TRITON_INTERPRET=0: the kernel must be a real JIT function")
    rows = []
    for cc in (int(c) for c in args.static.split(",")):
        for level in args.slots.split(","):
            M, MS = (int(v) for v in (level.split(":") + [level])[:2])
            try:
                row = compile_static(cc, M, args.me, args.num_warps, MS)
            except Exception as exc:  # reported, not hidden
                row = dict(M=M, ME=args.me, cc=cc, error=f"{type(exc).__name__}: {exc}"[:2000])
            print(json.dumps(row), flush=True)
            rows.append(row)
    if args.no_write:
        return
    import triton

    meta = environment()
    meta["device"] = "static (ptxas of Triton's wheel, no GPU)"
    major, minor = triton.__version__.split(".")[:2]
    name = (
        "column_kernel" if (major, minor) == ("3", "9") else f"column_kernel_triton{major}{minor}"
    )
    path = write_result(name, meta, rows, args.out_dir)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
