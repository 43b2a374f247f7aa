"""The CUDA working sets' pass loop counted at the real shapes on the CPU (one-off, issue 98
item 4): ``solve_workset_cuda`` as it runs, with two stand-ins that compute what the GPU's
kernels do, so that no Triton interpreter runs (at N = 2048 it would take hours):

- the pass (``workset_cuda._pass``, 4 Triton kernels and 8 torch operators) by
  ``tests/workset_reference.py``'s ``torch_pass``, which ``tests/test_workset_cuda.py``
  holds equal to it (the same slots, asides, steps, counters and active list, pass after
  pass);
- the residuals' kernel (``workset_cuda.residuals``, which the pass reads) by the same
  residuals in float64 torch products (:func:`torch_residuals`; the test of that kernel
  holds it to a dense product);
- the column kernel by the tests' float64 stand-in (``workset_reference.launch``: the same
  contract, the same restricted program solved to its minimiser, ``FULL`` past the level's
  support positions), so each pass ends where the kernel's would (a restricted minimiser
  is unique where the column's system is not degenerate).

The sets are ``bench_pass_counts``' (video-like tokens of Qwen2.5-VL-7B's shape, 10 of them
corrupted), whose simulated rules (the CPU kernel's own passes, ``pass_counts_cpu.json``)
gave 5.84 N (e256) at 16 frames and 7.55 N (c256) at 64. Each configuration sets the levels
(``SLOTS``, ``SUPPORT``, ``OUTLIER_SLOTS``) and the pass rule (``grow0``, ``grow_max``) for
its run only; the package's defaults are not changed. Per row: the passes, the active
columns per pass and their sum over N (issue 98's target: at most 6 N at 16 frames, 8 N at
64), the columns that took the second level, convergence, the certificate's gap against the
float64 program, seconds.

    python benchmarks/experiments/route_counts.py --sets qwen16 --configs default,e256
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))

import torch  # noqa: E402

from benchmarks.bench_pass_counts import SETS, tokens  # noqa: E402
from benchmarks.bench_workset_cuda import SHAPES  # noqa: E402
from benchmarks.common import environment, finish, parser  # noqa: E402

#: name: (SLOTS, SUPPORT, OUTLIER_SLOTS, grow0, grow_max[, precision]) (precision: the
#: first passes' products, ``solve_workset_cuda``'s; default ``"float32"``)
CONFIGS = {
    "default": None,  # the package's (route_counts_cpu.json's rows, at 829c7e7: d16's;
    # route_counts_default_cpu.json's, at 0dc1101: e256_o512's; since, (1024, 2048) slots':
    # route_counts_wider_cpu.json, its levels in each row)
    "d16": ((128, 256), (128, 256), (64, 1024), 16, 64),  # (the defaults before issue 98)
    "e256": ((512, 1024), (128, 256), (64, 1024), 256, 1024),
    "e256_2048": ((512, 2048), (128, 256), (64, 1024), 256, 2048),
    "e128": ((512, 1024), (128, 256), (64, 1024), 128, 1024),
    "e256_o256": ((512, 1024), (128, 256), (256, 1024), 256, 1024),
    "e256_o512": ((512, 1024), (128, 256), (512, 1024), 256, 1024),
    "e256_o512_f64": ((512, 1024), (128, 256), (512, 1024), 256, 1024, "float64"),
    "default_f64": (None, None, None, None, None, "float64"),
}
COLUMNS = ["set", "config", "n", "passes", "active_sum_over_n", "wide_columns", "overflow",
           "converged", "gap", "seconds"]  # fmt: skip


def torch_residuals(state: dict, R: torch.Tensor, VE: torch.Tensor, cap: int) -> None:
    """``workset_cuda.residuals`` in torch: row ``p < count`` of ``R`` the residual
    ``y_i - Y c_i - e_i`` of the column at ``active[p]`` (float64, then ``R``'s dtype), rows
    past ``count`` zero (``VE``: the pass reads its violations from ``R``)."""
    p = state["program"]
    X, n, d = p["X"], p["n"], p["d"]
    a = state["active"][:cap].long()
    ids, z, eids, ze = state["ids"][a], state["z"][a], state["eids"][a], state["ze"][a]
    c = torch.zeros(cap, n + 1, dtype=torch.float64)
    c.scatter_add_(1, torch.where(ids >= 0, ids, n).long(), torch.where(ids >= 0, z, 0.0))
    e = torch.zeros(cap, d + 1, dtype=torch.float64)
    e.scatter_add_(1, torch.where(eids >= 0, eids, d).long(), torch.where(eids >= 0, ze, 0.0))
    r = X[state["cols"][a]] - c[:, :n] @ X - e[:, :d]
    r[torch.arange(cap) >= int(state["count"][0])] = 0.0
    R.copy_(r.to(R.dtype))


def count(x: torch.Tensor, config) -> dict:
    import workset_reference

    from videoanchor.anchor import plan as _plan
    from videoanchor.anchor.program import duality_gaps
    from videoanchor.anchor.solvers import workset_cuda as wc

    saved = (wc._pass, wc.launch, wc.residuals, wc.SLOTS, wc.SUPPORT, wc.OUTLIER_SLOTS,
             _plan.PASS_RULE)  # fmt: skip
    per_pass = []

    def recorded(state, cap, **k):
        per_pass.append(int(state["count"][0]))
        return workset_reference.torch_pass(state, cap, **k)

    try:
        wc._pass, wc.launch, wc.residuals = recorded, workset_reference.launch, torch_residuals
        precision = "float32"
        if config is not None:
            slots, support, outlier, grow0, grow_max = config[:5]
            precision = config[5] if len(config) > 5 else precision
            if slots is not None:
                wc.SLOTS, wc.SUPPORT, wc.OUTLIER_SLOTS = slots, support, outlier
                _plan.PASS_RULE = _plan.PassRule(grow0=grow0, grow_max=grow_max)
        t = time.perf_counter()
        out = wc.solve_workset_cuda(x, slots=wc.SLOTS, outlier_slots=wc.OUTLIER_SLOTS,
                                    max_inner=1000, precision=precision)  # fmt: skip
        seconds = time.perf_counter() - t
        rule = _plan.PASS_RULE
        levels = [list(v) for v in zip(wc.SLOTS, wc.SUPPORT, wc.OUTLIER_SLOTS, strict=False)]
    finally:
        (wc._pass, wc.launch, wc.residuals, wc.SLOTS, wc.SUPPORT, wc.OUTLIER_SLOTS,
         _plan.PASS_RULE) = saved  # fmt: skip
    n = x.shape[0]
    gap = None
    if out["coef"] is not None:
        g = duality_gaps(x.double(), out["coef"], out["lambda_e"], out["lambda_z"])
        gap = float(g.max_gap)
    return dict(n=n, d=x.shape[1], levels=levels, grow0=rule.grow0, grow_max=rule.grow_max,
                precision=precision,
                passes=out["passes"], replayed=out["replayed"], active_per_pass=per_pass,
                active_sum=out["active"], active_sum_over_n=out["active"] / n,
                wide_columns=out["wide_columns"], overflow=out["overflow"],
                converged=out["converged"], dense=out["dense"], gap=gap, seconds=seconds)  # fmt: skip


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--sets", default="qwen16")
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--name", default="route_counts", help="the result file's name")
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1)))
    rows = []
    meta = environment("cpu")
    for name in args.sets.split(","):
        model, frames = SETS[name]
        per_frame, d = SHAPES[model]
        x, corrupted = tokens(frames, per_frame, d)
        for config in args.configs.split(","):
            row = dict(set=name, model=model, frames=frames, corrupted=len(corrupted),
                       config=config, **count(x, CONFIGS[config]), loadavg=os.getloadavg())  # fmt: skip
            rows.append(row)
            print({k: row[k] for k in COLUMNS}, flush=True)
            finish(args.name, meta, rows, args.out_dir, COLUMNS)


if __name__ == "__main__":
    main()
