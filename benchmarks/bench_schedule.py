"""Does the fast solver's schedule still earn its parts? Issue 67's same-run ablation.

The fast solver (the CUDA default and the CPU default's fallback where ``C`` is dense) runs
the authors' steps on a fixed schedule (:class:`videoanchor.anchor.solvers.admm_steps.Schedule`): 60
iterations, ``rho`` rebalanced every 5 up to iteration 30, and a continuation in
``lambda_z`` over the first 30 where one near-black token sets it. Issue 67 removes every
schedule part that does not win, by a margin measured in the same run, on a path that still
runs by default. Per set, each schedule's answer is held against the program's certified
minimiser (:func:`~videoanchor.anchor.solvers.workset.reference_minimiser`):

- ``default``: the schedule as it runs;
- ``no_continuation``: the same without the continuation in ``lambda_z``;
- ``no_balancing``: neither the rebalancing of ``rho`` nor the continuation (the authors'
  iteration stopped at 60).

Per schedule: the relative objective gap to the minimiser (``E`` at its optimum for the
answer's ``C``: :func:`~videoanchor.anchor.program.duality_gaps`), the affine constraint's
violation, the row sums' Spearman against the minimiser's, and the seconds. All MEASURED on
the machine that runs it, one thread.

    python benchmarks/bench_schedule.py [--quick]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.bench_request_cost import YALE, darkened, yale_faces  # noqa: E402
from benchmarks.common import (  # noqa: E402
    environment,
    finish,
    loadavg,
    spearman,
    synthetic_tokens,
    video_tokens,
)
from videoanchor.anchor.program import duality_gaps  # noqa: E402
from videoanchor.anchor.solvers import admm_steps  # noqa: E402
from videoanchor.anchor.solvers.admm import solve_ssc_admm  # noqa: E402
from videoanchor.anchor.solvers.workset import reference_minimiser  # noqa: E402

SCHEDULES = {
    "default": admm_steps.SCHEDULE,
    "no_continuation": admm_steps.Schedule(continuation=0),
    "no_balancing": admm_steps.Schedule(balance_until=0, continuation=0),
}


def data_sets(quick: bool) -> list[tuple[str, torch.Tensor]]:
    """``(name, features)``: video-like and synthetic tokens, each also with one token
    darkened (what the continuation is for), and Yale B faces where the file is present."""
    video = video_tokens(4, 48, 512, seed=1)
    syn = synthetic_tokens(192, 256, seed=2)
    sets = [("video-like tokens (4 frames)", video), ("synthetic tokens", syn),
            ("synthetic tokens, one token darkened", darkened(syn, 7, 0.004))]  # fmt: skip
    if not quick:
        sets.append(("video-like tokens, one token darkened", darkened(video, 5, 0.004)))
        if YALE.exists():
            faces = yale_faces(4, 32)
            sets += [("Extended Yale B faces, subjects 1-4", faces),
                     ("Extended Yale B faces, subjects 1-4, one face darkened",
                      darkened(faces, 5, 0.004))]  # fmt: skip
    return sets


def set_rows(name: str, x: torch.Tensor) -> list[dict]:
    """One row per schedule on ``x``, held against the certified minimiser."""
    ref = reference_minimiser(x)
    lam_e, lam_z = ref.lambda_e, ref.lambda_z
    f_min = duality_gaps(x, ref.coef, lam_e, lam_z).objective()
    sums = ref.coef.sum(dim=1)
    rows = []
    for label, schedule in SCHEDULES.items():
        t = time.perf_counter()
        res = solve_ssc_admm(x, scheduled=True, schedule=schedule, progress=False)
        seconds = time.perf_counter() - t
        c = res.coef.double()
        gaps = duality_gaps(x, c, lam_e, lam_z)
        rows.append({
            "data": name, "n": x.shape[0], "d": x.shape[1], "schedule": label,
            "minimiser_certified": bool(ref.converged), "minimiser_gap": float(ref.residual),
            "objective_gap": (gaps.objective() - f_min) / abs(f_min),
            "affine_violation": gaps.affine,
            "row_sum_spearman": spearman(c.sum(dim=1), sums),
            "seconds": seconds, "figures": "measured",
        })  # fmt: skip
    return rows


def run(quick: bool, out_dir=None):
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    meta = environment()
    meta.update(torch_threads=1, loadavg_start=loadavg(), quick=quick)
    rows = []
    try:
        for name, x in data_sets(quick):
            rows += set_rows(name, x)
    finally:
        torch.set_num_threads(threads)
    meta["loadavg_end"] = loadavg()
    by_set = {}
    for r in rows:
        by_set.setdefault(r["data"], {})[r["schedule"]] = r
    # the default wins over a variant on a set where its objective gap is smaller
    meta["default_wins"] = {
        variant: sum(
            s["default"]["objective_gap"] < s[variant]["objective_gap"] for s in by_set.values()
        )  # fmt: skip
        for variant in SCHEDULES
        if variant != "default"
    }
    meta["sets"] = len(by_set)
    print(f"the default's objective gap is smaller on {meta['default_wins']} of {len(by_set)} sets")
    cols = ["data", "schedule", "objective_gap", "affine_violation", "row_sum_spearman", "seconds"]
    return finish("schedule", meta, rows, out_dir, cols)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="three small sets, no Yale B")
    ap.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    args = ap.parse_args(argv)
    run(args.quick, args.out)


if __name__ == "__main__":
    main()
