"""Routes to the SSC program's minimiser on video-like tokens: what each costs, on one thread.

Issue 52 asks for a default that meets the yardstick (docs/ssc.md: objective gap at most the
authors' answer's, constraints to 1e-5, row sums at least as near the minimiser's) at least
10x faster than ``solver="faithful"`` on video-like tokens. This script measures, in one
process and at one torch thread, on :func:`benchmarks.bench_ssc.video_tokens` (a sparse
minimiser, as on real video tokens):

- ``faithful`` and ``fast`` (today's default): time, and the yardstick's figures against the
  certified minimiser;
- ``reference``: :func:`videoanchor.anchor.reference_minimiser` (working sets from the
  nearest points; the ADMM route where they do not certify): time, certificate, the
  minimiser's non-zeros per column;
- the working-set solver (:func:`videoanchor.anchor.solve_ssc_workset`: a primal active-set
  method per column, compiled by Numba; at most ``--max-passes`` passes per column) on its
  own: time, passes, its certified duality gap and the yardstick's figures against the
  reference. Its first call in the process (compiling the kernel or loading it from Numba's
  cache) is timed apart, on a tiny input (``workset_first_call_seconds``).

With ``--passes``, the working sets alone, per shape and per ``--grow`` (variables added to
a column's set per pass): how many passes the slowest column takes, which on a GPU would
each be one full ``N x D x N`` product (issue 52's GPU floor, docs/ssc.md), and the time on
this CPU (``workset_passes_cpu.json``)::

    python benchmarks/bench_workset.py --passes --frames 16 32 43 --dims 1024 3584

    python benchmarks/bench_workset.py [--quick] [--frames 8 16] [--max-passes 400]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import (  # noqa: E402
    environment,
    first_call_seconds,
    print_table,
    spearman,
    video_tokens,
    write_result,
)
from videoanchor.anchor import (  # noqa: E402
    duality_gaps,
    reference_minimiser,
    solve_ssc_workset,
)
from videoanchor.anchor.scores import ssc_coefficients  # noqa: E402

PATCHES, DIM = 48, 1024


def yardstick(x, coef, ref) -> dict:
    """Objective gap to the minimiser's (relative), affine violation, row-sum Spearman."""
    g = duality_gaps(x, coef, ref.lambda_e, ref.lambda_z)
    best = float(duality_gaps(x, ref.coef, ref.lambda_e, ref.lambda_z).primal.sum())
    return {
        "objective_gap": (float(g.primal.sum()) - best) / best,
        "affine_violation": g.affine,
        "row_sum_spearman": spearman(coef.sum(dim=1), ref.coef.sum(dim=1)),
    }


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def case(frames: int, patches: int, d: int, max_passes: int) -> dict:
    x = video_tokens(frames, patches, d)
    n = x.shape[0]
    row = {"frames": frames, "patches": patches, "n": n, "d": d}
    ref, row["reference_seconds"] = _timed(lambda: reference_minimiser(x))
    nnz = (ref.coef != 0).sum(dim=0).double()
    row.update(reference_strategy=ref.strategy, reference_certified=ref.converged,
               reference_gap=ref.residual, minimiser_nnz_median=float(nnz.median()),
               minimiser_nnz_p90=float(nnz.quantile(0.9)))  # fmt: skip
    answers = {}
    for solver in ("faithful", "fast"):
        res, row[f"{solver}_seconds"] = _timed(lambda s=solver: ssc_coefficients(x, solver=s))
        answers[solver] = res.coef.double()
        row[f"{solver}_iterations"] = res.iterations
        row.update({f"{solver}_{k}": v for k, v in yardstick(x, answers[solver], ref).items()})
    res, row["workset_seconds"] = _timed(lambda: solve_ssc_workset(x, max_passes=max_passes))
    row.update(workset_passes=res.iterations, workset_converged=res.converged,
               workset_gap=res.residual, **{f"workset_{k}": v for k, v in
                                             yardstick(x, res.coef.double(), ref).items()})  # fmt: skip
    for solver in ("fast", "workset"):
        row[f"{solver}_over_faithful"] = row[f"{solver}_seconds"] / row["faithful_seconds"]
    row["faithful_over_workset"] = row["faithful_seconds"] / row["workset_seconds"]
    return row


def _one_thread(quick: bool, **extra) -> dict:
    """One torch thread, and the result's meta: the machine, the load before, and the
    kernel's first call in the process (it compiles the kernel or loads it from Numba's
    cache), timed apart on a tiny input so that the rows time the solves alone."""
    torch.set_num_threads(1)
    meta = environment("cpu")
    meta.update(quick=quick, torch_threads=1, **extra, load_before=list(os.getloadavg()))
    meta["workset_first_call_seconds"] = first_call_seconds()
    return meta


def run(quick: bool, frames, max_passes: int, out_dir=None):
    meta = _one_thread(quick, max_passes=max_passes)
    shapes = [(4, 24, 128)] if quick else [(f, PATCHES, DIM) for f in frames]
    rows = []
    for f, p, d in shapes:
        rows.append(case(f, p, d, max_passes))
        print({k: v for k, v in rows[-1].items() if "seconds" in k or "passes" in k}, flush=True)
    meta["load_after"] = list(os.getloadavg())
    print_table(rows, ["n", "minimiser_nnz_median", "faithful_seconds", "fast_seconds",
                       "workset_seconds", "faithful_over_workset", "workset_gap",
                       "faithful_objective_gap", "fast_objective_gap",
                       "workset_objective_gap"])  # fmt: skip
    path = write_result("workset_quick" if quick else "workset", meta, rows, out_dir)
    print(f"wrote {path}")
    return path


def passes(quick: bool, frames, dims, grows, out_dir=None):
    """``--passes``: :func:`solve_ssc_workset` alone per shape and ``grow``, one thread."""
    meta = _one_thread(quick)
    shapes = [(4, 24, 128)] if quick else [(f, PATCHES, d) for d in dims for f in frames]
    rows = []
    for f, p, d in shapes:
        x = video_tokens(f, p, d)
        for grow in grows:
            res, seconds = _timed(lambda x=x, g=grow: solve_ssc_workset(x, grow=g))
            nnz = (res.coef != 0).sum(dim=0).double()
            rows.append({"frames": f, "patches": p, "n": x.shape[0], "d": d, "grow": grow,
                         "passes": res.iterations, "converged": res.converged,
                         "gap": res.residual, "nnz_median": float(nnz.median()),
                         "seconds": seconds})  # fmt: skip
            print(rows[-1], flush=True)
    meta["load_after"] = list(os.getloadavg())
    print_table(rows, ["n", "d", "grow", "passes", "converged", "gap", "seconds"])
    path = write_result("workset_passes_quick" if quick else "workset_passes", meta, rows, out_dir)
    print(f"wrote {path}")
    return path


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--frames", type=int, nargs="+", default=[8, 16])
    ap.add_argument("--max-passes", type=int, default=400)
    ap.add_argument("--out", default=None)
    ap.add_argument("--passes", action="store_true", help="the working sets' passes per --grow")
    ap.add_argument("--dims", type=int, nargs="+", default=[DIM])
    ap.add_argument("--grow", type=int, nargs="+", default=[16, 32, 64, 128])
    args = ap.parse_args(argv)
    if args.passes:
        return passes(args.quick, args.frames, args.dims, args.grow, args.out)
    return run(args.quick, args.frames, args.max_passes, args.out)


if __name__ == "__main__":
    main()
