"""The working sets on the GPU (``videoanchor.anchor.workset_cuda``, issue 66 items 1 and 5)
against the fast solver in the same process, by stage, at the video tokens of 16, 32 and 64
frames of Qwen2.5-VL-7B (128 tokens per frame, D = 3584) and InternVL2-8B (256, D = 4096);
at 16 frames the yardstick against the CPU's certified minimiser (``reference_minimiser``,
float64): objective gap, constraints, row sums' Spearman.

    python benchmarks/bench_workset_cuda.py                  # on a GPU; JSON into --out-dir
    python benchmarks/bench_workset_cuda.py --smoke          # tiny, CPU (Triton's interpreter)
    TRITON_INTERPRET=0 python benchmarks/bench_workset_cuda.py --static 90 --slots 128
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

if "--smoke" in sys.argv:  # before Triton decorates anything
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import (  # noqa: E402
    environment,
    objective,
    print_table,
    spearman,
    video_tokens,
    write_result,
)
from videoanchor.anchor import workset_cuda as wc  # noqa: E402

#: name: (visual tokens per frame, hidden size), as bench_request_cost.SHAPES
SHAPES = {"Qwen2.5-VL-7B": (128, 3584), "InternVL2-8B": (256, 4096)}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _syncs(fn, device) -> int | None:
    """The host synchronisations of one call of ``fn`` on CUDA (issue 66 item 3): the
    operations ``torch.cuda.set_sync_debug_mode`` flags (scalar reads, ``nonzero``, copies to
    the host), counted by their warnings; None off CUDA."""
    if device.type != "cuda":
        return None
    import warnings

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchronizing" in str(w.message) for w in seen)


def _yardstick(x, coef, ref) -> dict:
    lam_e, lam_z = ref.lambda_e, ref.lambda_z
    c = coef.detach().to("cpu", torch.float64)
    want = objective(x, ref.coef, lam_e, lam_z)
    return dict(objective_gap=(objective(x, c, lam_e, lam_z) - want) / abs(want),
                affine=float((c.sum(dim=0) - 1).abs().max()),
                diagonal=float(c.diagonal().abs().max()),
                rowsum_spearman=spearman(c.abs().sum(dim=1), ref.coef.abs().sum(dim=1)))  # fmt: skip


def run(shapes: dict, frames, out_dir=None, *, smoke: bool = False) -> Path:
    from videoanchor.anchor import compute_anchor_scores
    from videoanchor.anchor.workset import reference_minimiser

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    meta = environment(str(device))
    meta.update(slots=list(wc.SLOTS), tile=wc.TILE, smoke=smoke)
    rows = []
    for name, (per_frame, d) in shapes.items():
        for f in frames:
            clusters = max(2, f // 2)
            x = video_tokens(f, per_frame, d, k=clusters, seed=0).to(device)
            n = x.shape[0]
            kw = dict(slots=(32,), grow=8, max_inner=300) if smoke else {}
            solvers = {
                "workset_cuda": lambda x=x, kw=kw: wc.solve_workset_cuda(x, **kw),
                "fast": lambda x=x, k=clusters: compute_anchor_scores(
                    x, k, solver="fast", progress=False),
                # the whole default call (the working sets, the spectral step, the scores)
                "default": lambda x=x, k=clusters: compute_anchor_scores(x, k, progress=False),
            }  # fmt: skip
            ref = None
            if f == frames[0]:
                t = time.perf_counter()
                ref = reference_minimiser(x.cpu())
                ref_s = time.perf_counter() - t
            for solver, fn in solvers.items():
                row = dict(model=name, frames=f, n=n, d=d, solver=solver)
                try:
                    if not smoke:
                        fn()  # compiles, loads the libraries
                    _sync(device)
                    t = time.perf_counter()
                    res = fn()
                    _sync(device)
                    row["seconds"] = time.perf_counter() - t
                except Exception as exc:  # reported, not hidden
                    row["error"] = f"{type(exc).__name__}: {exc}"[:300]
                    rows.append(row)
                    continue
                coef = res["coef"] if isinstance(res, dict) else res.coef
                if isinstance(res, dict):
                    row.update(passes=res["passes"], converged=res["converged"],
                               wide_columns=res["wide_columns"], overflow=res["overflow"],
                               host_reads=len(res["reads"]),
                               steps_max=int(res["steps"].max()),
                               **{f"seconds_{k}": v for k, v in res["timings"].items()})  # fmt: skip
                else:
                    row.update({f"seconds_{k}": v for k, v in res.timings.items()},
                               answered=res.solver, strategy=res.strategy,
                               host_reads=res.history.get("host_reads")
                               if isinstance(res.history, dict) else None)  # fmt: skip
                row["syncs"] = _syncs(fn, device)
                if ref is not None:
                    row.update(_yardstick(x.cpu(), coef, ref), reference_seconds=ref_s,
                               reference_gap=ref.residual)  # fmt: skip
                rows.append(row)
    print_table(rows, ["model", "frames", "n", "solver", "seconds", "passes", "converged",
                       "syncs", "objective_gap", "affine", "rowsum_spearman"])  # fmt: skip
    return write_result("workset_cuda", meta, rows, out_dir)


def compile_static(cc: int, slots: int, num_warps: int = 4) -> dict:
    """The kernel compiled ahead of time for ``sm_<cc>`` at ``slots`` slots (Triton's
    bundled ptxas, no GPU; run with ``TRITON_INTERPRET=0``): registers, spill bytes, shared
    memory. STATIC figures, read from compiled code."""
    from videoanchor.kernels import aot
    from videoanchor.kernels.launch import Launch

    n, d, programs = 256, 128, 8
    f64 = dict(dtype=torch.float64)
    i32 = dict(dtype=torch.int32)
    args = (torch.empty(n, n, **f64), torch.empty(n, d, **f64),
            torch.empty(n, dtype=torch.int64), torch.empty(n, slots, dtype=torch.int64),
            torch.empty(n, slots, **f64), torch.empty(n, **f64), torch.empty(n, **i32),
            torch.empty(n, **i32), torch.empty(programs, slots, slots, **f64),
            torch.empty(programs, slots, slots, **f64), torch.empty(5, **f64), n, n, d, 1000)  # fmt: skip
    rec = Launch(wc._triton(), (programs,), args,
                 {"M": slots, "BR": wc.row_tile(slots), "num_warps": num_warps})  # fmt: skip
    return {"slots": slots, **aot.compile_launch(rec, cc)}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--frames", default="16,32,64")
    ap.add_argument("--models", default=",".join(SHAPES))
    ap.add_argument("--out-dir", default=None)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU")
    ap.add_argument(
        "--static",
        type=int,
        default=None,
        metavar="CC",
        help="compile for sm_CC ahead of time (no GPU); print one JSON line",
    )
    ap.add_argument("--slots", type=int, default=wc.SLOTS[0])
    ap.add_argument("--num-warps", type=int, default=4)
    args = ap.parse_args(argv)
    if args.static is not None:
        print(json.dumps(compile_static(args.static, args.slots, args.num_warps)))
        return
    if args.smoke:
        print(run({"tiny": (8, 12)}, [3], args.out_dir, smoke=True))
        return
    shapes = {m: SHAPES[m] for m in args.models.split(",")}
    print(run(shapes, [int(f) for f in args.frames.split(",")], args.out_dir))


if __name__ == "__main__":
    main()
