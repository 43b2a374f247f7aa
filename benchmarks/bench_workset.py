"""Routes to the SSC program's minimiser on video-like tokens: what each costs, on one thread.

Issue 66 holds the default (``solver="auto"``: the working sets on the CPU,
:func:`videoanchor.anchor.solvers.workset.run_workset`) to at least 30x faster than
``solver="faithful"`` and certified on every video-like set at one torch thread, a
16-frame set (N = 1536, D = 2048), overlaid and near-black tokens included (:data:`SETS`).
This script measures per set, in one process:

- ``faithful``, ``fast`` and ``auto`` (the default; ``auto_solver``, ``auto_timings``: the
  route that answered; ``auto_warnings``): time and each answer's largest relative duality
  gap (``*_gap``), and where the reference runs the yardstick's figures against it
  (objective gap, affine violation, row-sum Spearman);
- ``reference``: :func:`videoanchor.anchor.reference_minimiser`: time, certificate, the
  minimiser's non-zeros and outlier entries per column;
- :func:`videoanchor.anchor.solve_ssc_workset` alone (no bound; at most ``--max-passes``
  passes per column). The kernel's first call in the process (compiling it or loading it
  from Numba's cache) is timed apart on a tiny input (``workset_first_call_seconds``).

With ``--passes``, the working sets alone, per shape and per ``--grow`` (variables added to
a column's set per pass): how many passes the slowest column takes, which on a GPU would
each be one full ``N x D x N`` product (issue 52's GPU floor, docs/ssc.md), and the time on
this CPU (``workset_passes_cpu.json``)::

    python benchmarks/bench_workset.py --passes --frames 16 32 43 --dims 1024 3584

    python benchmarks/bench_workset.py [--quick] [--only NAME ...] [--max-passes 400]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.bench_request_cost import corrupted_subspaces, darkened  # noqa: E402
from benchmarks.common import (  # noqa: E402
    ari,
    environment,
    first_call_seconds,
    print_table,
    spearman,
    synthetic_tokens,
    video_tokens,
    write_result,
)
from videoanchor.anchor import (  # noqa: E402
    duality_gaps,
    reference_minimiser,
    solve_ssc_workset,
)
from videoanchor.anchor.scores import ssc_coefficients  # noqa: E402
from videoanchor.anchor.solvers.workset import LIMITS  # noqa: E402

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


def overlaid(
    frames: int, patches: int, d: int, *, tokens: int = 4, entries: int = 170, seed: int = 0
):
    """:func:`video_tokens` with ``tokens`` tokens overlaid (a caption or a logo over them):
    ``entries`` of their entries moved by 3 times a Gaussian (seeded). Their columns need
    ~160 outlier entries beside ~90 coefficients (issue 66: one such column stopped the
    working sets)."""
    x = video_tokens(frames, patches, d, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    for j in torch.randperm(x.shape[0], generator=g)[:tokens].tolist():
        x[j, torch.randperm(d, generator=g)[:entries]] += 3.0 * torch.randn(entries, generator=g)
    return x


def darkened_tokens(frames: int, patches: int, d: int, *, tokens: int = 3, scale: float = 1e-5):
    """:func:`video_tokens` with ``tokens`` near-black tokens (each scaled to ``scale`` times
    the median token norm: a black frame's or a letterbox bar's): ``lambda_z`` rises ~1.5e5
    fold and ``C`` turns dense (issue 66)."""
    x = video_tokens(frames, patches, d)
    for j in range(tokens):
        x = darkened(x, 7 + 101 * j, scale)
    return x


#: ``name: (features, reference)``: the video-like sets the default is held to (issue 66:
#: at least 30x faster than faithful at one thread, and certified); ``reference`` False
#: where :func:`reference_minimiser` takes longer than faithful (the darkened set's dense C)
SETS = {
    "video 8x48 D1024": (lambda: video_tokens(8, PATCHES, DIM), True),
    "video 16x48 D1024": (lambda: video_tokens(16, PATCHES, DIM), True),
    "video 20x48 D1536, 12 subspaces of 5": (
        lambda: video_tokens(20, PATCHES, 1536, k=12, sub_dim=5), True),
    "video 16x96 D2048": (lambda: video_tokens(16, 96, 2048), True),
    "video 16x96 D2048, 4 tokens overlaid": (lambda: overlaid(16, 96, 2048), True),
    "video 16x48 D1024, 3 tokens darkened": (lambda: darkened_tokens(16, PATCHES, DIM), False),
}  # fmt: skip


def case(name: str, x, max_passes: int, reference: bool = True) -> dict:
    n, d = x.shape
    row = {"set": name, "n": n, "d": d, "load": list(os.getloadavg())}
    ref = None
    if reference:
        ref, row["reference_seconds"], row["reference_cpu_seconds"] = _timed_cpu(
            lambda: reference_minimiser(x))  # fmt: skip
        nnz = (ref.coef != 0).sum(dim=0).double()
        row.update(reference_strategy=ref.strategy, reference_certified=ref.converged,
                   reference_gap=ref.residual, minimiser_nnz_median=float(nnz.median()),
                   minimiser_nnz_p90=float(nnz.quantile(0.9)),
                   minimiser_outliers_max=int((ref.outliers != 0).sum(dim=0).max()))  # fmt: skip
    answers = {}
    for solver in ("faithful", "fast", "auto"):
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            res, row[f"{solver}_seconds"], row[f"{solver}_cpu_seconds"] = _timed_cpu(
                lambda s=solver: ssc_coefficients(x, solver=s))  # fmt: skip
        answers[solver] = res.coef.double()
        row[f"{solver}_iterations"] = res.iterations
        row[f"{solver}_gap"] = duality_gaps(x, answers[solver], res.lambda_e, res.lambda_z).max_gap
        if ref is not None:
            row.update({f"{solver}_{k}": v for k, v in yardstick(x, answers[solver], ref).items()})
    row.update(auto_solver=res.solver, auto_timings=res.timings, auto_certified=res.residual < LIMITS.gap,
               auto_warnings=[str(w.message) for w in seen if "certified" in str(w.message)])  # fmt: skip
    row["faithful_over_auto"] = row["faithful_seconds"] / row["auto_seconds"]
    row["faithful_over_auto_cpu"] = row["faithful_cpu_seconds"] / row["auto_cpu_seconds"]
    for solver in ("fast", "auto"):
        row[f"{solver}_over_faithful"] = row[f"{solver}_seconds"] / row["faithful_seconds"]
    if ref is None:  # (unbounded, the working sets alone take as long as the reference)
        return row
    res, row["workset_seconds"], row["workset_cpu_seconds"] = _timed_cpu(
        lambda: solve_ssc_workset(x, max_passes=max_passes))  # fmt: skip
    row.update(workset_passes=res.iterations, workset_converged=res.converged,
               workset_gap=res.residual, workset_over_faithful=row["workset_seconds"] /
               row["faithful_seconds"], faithful_over_workset=row["faithful_seconds"] /
               row["workset_seconds"])  # fmt: skip
    row.update({f"workset_{k}": v for k, v in yardstick(x, res.coef.double(), ref).items()})
    return row


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def _timed_cpu(fn):
    """``fn()``, the clock's seconds and this process's CPU seconds (``time.process_time``:
    on a CPU shared with other processes the clock's vary with their load)."""
    c0 = time.process_time()
    out, seconds = _timed(fn)
    return out, seconds, time.process_time() - c0


def _one_thread(quick: bool, **extra) -> dict:
    """One torch thread, and the result's meta: the machine, the load before, and the
    kernel's first call in the process (it compiles the kernel or loads it from Numba's
    cache), timed apart on a tiny input so that the rows time the solves alone."""
    torch.set_num_threads(1)
    meta = environment("cpu")
    meta.update(quick=quick, torch_threads=1, **extra, load_before=list(os.getloadavg()))
    meta["workset_first_call_seconds"] = first_call_seconds()
    return meta


def run(quick: bool, names, max_passes: int, out_dir=None, tag: str = ""):
    """The sets ``names`` of :data:`SETS` (all where empty; ``quick``: one tiny set), into
    ``workset[_tag]_<device>.json``."""
    meta = _one_thread(quick, max_passes=max_passes)
    chosen = {"video 4x24 D128": (lambda: video_tokens(4, 24, 128), True)} if quick else {
        k: v for k, v in SETS.items() if not names or k in names}  # fmt: skip
    rows, path = [], None
    name = "workset_quick" if quick else "workset" + (f"_{tag}" if tag else "")
    for set_name, (make, reference) in chosen.items():
        rows.append(case(set_name, make(), max_passes, reference))
        print({k: v for k, v in rows[-1].items() if "seconds" in k or k in ("set", "auto_solver")},
              flush=True)  # fmt: skip
        meta["load_after"] = list(os.getloadavg())
        path = write_result(name, meta, rows, out_dir)  # (each row as it comes)
    print_table(rows, ["set", "n", "minimiser_nnz_median", "faithful_seconds", "auto_seconds",
                       "faithful_over_auto", "auto_solver", "auto_gap", "workset_seconds",
                       "faithful_objective_gap", "fast_objective_gap"])  # fmt: skip
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


def with_dark_tokens(x, *, noise: int = 6, constant: int = 2, seed: int = 0):
    """``x`` with ``noise + constant`` dark tokens inserted at seeded positions (issue 79's
    16-frame request): ``noise`` of Gaussian noise at 1e-3 of the median token norm, and
    ``constant`` constant tokens at that norm (a black frame, a letterbox bar). Returns the
    features and the dark tokens' positions."""
    g = torch.Generator().manual_seed(seed)
    n, d = x.shape
    total = n + noise + constant
    dark = torch.randperm(total, generator=g)[: noise + constant].sort().values
    scale = 1e-3 * float(x.norm(dim=1).median())
    out = torch.empty(total, d, dtype=x.dtype)
    keep = torch.ones(total, dtype=torch.bool)
    keep[dark] = False
    out[keep] = x
    for k, i in enumerate(dark.tolist()):
        out[i] = scale * torch.randn(d, generator=g) if k < noise else torch.full((d,), scale)
        out[i] /= d**0.5
    return out, dark


def dark(quick: bool, out_dir=None, frames: int = 16, patches: int = 128, d: int = 3584):
    """``--dark``: a request without and with 8 dark tokens (:func:`with_dark_tokens`):
    ``compute_anchor_scores`` with the authors' ``mu_z`` and with ``dark_tokens="ignore"``,
    each against the request without the dark tokens (the other tokens' scores, labels),
    one thread, one process (``dark_tokens_cpu.json``)."""
    from videoanchor.anchor import compute_anchor_scores

    meta = _one_thread(quick)
    shape = (4, 24, 128) if quick else (frames, patches, d)
    clean = video_tokens(*shape)
    x, where = with_dark_tokens(clean)
    others = torch.ones(x.shape[0], dtype=torch.bool)
    others[where] = False
    rows = []
    ref = None
    for name, feats, kw in (("without dark tokens", clean, {}),
                            ("authors' mu_z", x, {}),
                            ("dark_tokens='ignore'", x, {"dark_tokens": "ignore"})):  # fmt: skip
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            res, seconds = _timed(lambda f=feats, k=kw: compute_anchor_scores(f, 24, **k))
        said = [str(w.message) for w in seen]
        row = {"request": name, "n": feats.shape[0], "d": feats.shape[1], "seconds": seconds,
               "solver": res.solver, "strategy": res.strategy, "gap": res.gap,
               "residual": res.residual, "lambda_z": res.lambda_z,
               "coef_nnz_median": float((res.coef != 0).sum(dim=0).double().median()),
               "dark_warnings": [w for w in said if "mu_z" in w],
               "other_warnings": [w for w in said if "mu_z" not in w]}  # fmt: skip
        if ref is None:
            ref = res
        else:
            s, r = res.scores[others].double(), ref.scores.double()
            top = max(1, len(r) // 4)
            shared = set(s.topk(top).indices.tolist()) & set(r.topk(top).indices.tolist())
            row.update(others_score_max_abs_diff=float((s - r).abs().max()),
                       others_score_mean_abs_diff=float((s - r).abs().mean()),
                       others_score_spearman=spearman(s, r),
                       others_top_quarter_shared=len(shared) / top,
                       others_labels_ari=ari(res.labels[others], ref.labels),
                       dark_scores=[float(v) for v in res.scores[~others]])  # fmt: skip
        rows.append(row)
        print({k: v for k, v in row.items() if "warnings" not in k}, flush=True)
    meta["load_after"] = list(os.getloadavg())
    meta["dark_tokens"] = where.tolist()
    print_table(rows, ["request", "n", "seconds", "solver", "gap", "lambda_z",
                       "coef_nnz_median", "others_score_spearman",
                       "others_score_max_abs_diff", "others_top_quarter_shared"])  # fmt: skip
    path = write_result("dark_tokens_quick" if quick else "dark_tokens", meta, rows, out_dir)
    print(f"wrote {path}")
    return path


def _yaleb(subjects: int, first: int = 1):
    """Subjects ``first`` to ``first + subjects - 1`` of Extended Yale B
    (``/work/shared/data``, 48 x 42 pixels, one row per image, float32), or None where the
    file is not there."""
    from benchmarks.bench_yaleb import default_data_path, load_yaleb

    path = default_data_path()
    if not Path(path).exists():
        return None
    x, labels = load_yaleb(path)
    keep = np.isin(labels, np.arange(first, first + subjects))
    return torch.from_numpy(np.ascontiguousarray(x[keep], dtype=np.float32))


#: ``--dense``'s sets: ``name: features`` (issue 79: tokens drawn independently, whose C is
#: dense, and Yale B faces)
DENSE = {
    **{f"{kind} {n} x 1024": make for n in (1024, 2048, 4096) for kind, make in (
        ("randn", lambda n=n: torch.randn(n, 1024, generator=torch.Generator().manual_seed(n))),
        ("synthetic", lambda n=n: synthetic_tokens(n, 1024, seed=1)),
    ) if n < 4096 or kind == "randn"},
    "Yale B 10 subjects": lambda: _yaleb(10),
    "Yale B 38 subjects": lambda: _yaleb(38),
    "Yale B subjects 17-30": lambda: _yaleb(14, 17),  # (where the warm route certified)
    # a small corrupted set (where a column spent its work bound before the time budget)
    "corrupted 512 x 256": lambda: corrupted_subspaces(512, 256).float(),
    "video 16x48 D1024, 3 tokens darkened": lambda: darkened_tokens(16, PATCHES, DIM),
}  # fmt: skip
#: the order ``--dense`` runs them in: the smaller first (each row is written as it comes)
DENSE_ORDER = ("corrupted 512 x 256", "randn 1024 x 1024", "synthetic 1024 x 1024", "Yale B 10 subjects",
               "randn 2048 x 1024", "synthetic 2048 x 1024", "Yale B 38 subjects",
               "randn 4096 x 1024", "Yale B subjects 17-30",
               "video 16x48 D1024, 3 tokens darkened")  # fmt: skip


def dense(names, out_dir=None, tag: str = ""):
    """``--dense``: the fast solver and the default on :data:`DENSE` (``names``; all where
    empty), each once, in one process, one thread: the default's seconds over the fast
    solver's (the clock's and the process's CPU seconds: on a CPU shared with other
    processes the clock's vary with their load, the CPU seconds much less), its route,
    whether it certified and the gap of the C it returned (``workset_dense[_tag]_cpu.json``).
    Issue 79: at most 2x where it certifies, 1.25x where the fast answer stands."""
    meta = _one_thread(False, warm_share=LIMITS.warm_share)
    rows = []
    for name in DENSE_ORDER:
        if names and name not in names:
            continue
        x = DENSE[name]()
        if x is None:
            print(f"{name}: no data, skipped", flush=True)
            continue
        row = {"set": name, "n": x.shape[0], "d": x.shape[1], "load": list(os.getloadavg())}
        for solver in ("fast", "auto"):
            with warnings.catch_warnings(record=True) as seen:
                warnings.simplefilter("always")
                cpu = time.process_time()
                res, row[f"{solver}_seconds"] = _timed(
                    lambda s=solver, x=x: ssc_coefficients(x, solver=s))  # fmt: skip
                row[f"{solver}_cpu_seconds"] = time.process_time() - cpu
            row[f"{solver}_solver"] = res.solver
            row[f"{solver}_gap"] = res.gap if res.gap is not None else duality_gaps(
                x, res.coef, res.lambda_e, res.lambda_z).max_gap  # fmt: skip
        nnz = (res.coef != 0).sum(dim=0).double()
        row.update(auto_strategy=res.strategy, auto_residual=res.residual,
                   auto_certified=res.solver == "workset" and res.residual < LIMITS.gap,
                   auto_timings=res.timings, coef_nnz_median=float(nnz.median()),
                   auto_over_fast=row["auto_seconds"] / row["fast_seconds"],
                   auto_over_fast_cpu=row["auto_cpu_seconds"] / row["fast_cpu_seconds"],
                   auto_warnings=[str(w.message) for w in seen])  # fmt: skip
        row["bound"] = 2.0 if row["auto_certified"] else 1.25
        rows.append(row)
        print({k: v for k, v in row.items() if k not in ("auto_warnings",)}, flush=True)
        meta["load_after"] = list(os.getloadavg())
        path = write_result("workset_dense" + (f"_{tag}" if tag else ""), meta, rows, out_dir)
    print_table(rows, ["set", "n", "d", "fast_cpu_seconds", "auto_cpu_seconds",
                       "auto_over_fast_cpu", "auto_over_fast", "bound", "auto_strategy", "auto_certified", "auto_gap", "fast_gap"])  # fmt: skip
    print(f"wrote {path}")
    return path


#: ``--calibrate``'s sets: the dense ones, a small corrupted one (issue 79's 1.5-1.65x),
#: near-black and video-like tokens (the first sweep's passes)
CALIBRATE = {
    "randn 512 x 1024": lambda: torch.randn(512, 1024, generator=torch.Generator().manual_seed(512)),
    "video 16x48 D1024": lambda: video_tokens(16, PATCHES, DIM),
    **{k: DENSE[k] for k in DENSE_ORDER},
}  # fmt: skip


def _fallback(x):
    """The fast solver's answer for ``x`` as the default's fallback runs it (``run_workset``'s
    plan, its ``E`` kept: ``ssc_coefficients`` leaves it out)."""
    from videoanchor.anchor._inputs import prepare_features
    from videoanchor.anchor.options import SSCOptions
    from videoanchor.anchor.plan import make_plan
    from videoanchor.anchor.solvers.admm import run_admm

    opts, _, xs = prepare_features(x, SSCOptions(solver="workset", mode="exact"), min_tokens=1)
    plan = make_plan(xs.shape, xs.device, opts)
    program = {k: v for k, v in opts.program().items()
               if k in ("alpha_e", "alpha_z", "rho", "eps", "max_iter")}  # fmt: skip
    return run_admm(xs, plan.fallback, warn_dark=False, **program)


def calibrate(names, out_dir=None, columns: int = 48):
    """``--calibrate``: the counts of :mod:`videoanchor.anchor.solvers.workset`'s cost model and the
    CPU seconds they stand for, one thread, one process (``workset_calibration_cpu.json``):
    per set the Gram matrix and lambdas (``_prepare``), the fast solver (its factor's
    strategy and iterations: ``_fast_counts``), and ``columns`` columns (a stride) run one at
    a time by the kernel, from the fast answer as the warm sweep runs them and from their
    nearest points as the first sweep does (``_kernel_counts``; each call's scratch, timed
    on no column, taken off). ``meta["fit"]``: the weights (nanoseconds a count) by least
    squares on the relative error, non-negative, and each set's modelled over measured CPU
    seconds; ``KERNEL_NS``, ``FAST_NS`` and ``GRAM_NS`` are these, rounded."""
    from scipy.optimize import nnls

    import videoanchor.anchor.solvers.workset as ws

    meta = _one_thread(False, columns=columns)
    kernel = ws._kernel()
    rows = []
    for name, make in CALIBRATE.items():
        if names and name not in names:
            continue
        x = make()
        if x is None:
            print(f"{name}: no data, skipped", flush=True)
            continue
        n, d = x.shape
        c0 = time.process_time()
        x64, G, lam_e, lam_z = ws._prepare(x, 800.0, 800.0)
        rows.append({"set": name, "part": "gram", "n": n, "d": d,
                     "cpu_seconds": time.process_time() - c0, "counts": [n * n * d]})  # fmt: skip
        c0 = time.process_time()
        fast = _fallback(x)
        seconds, share = time.process_time() - c0, ws._e_share(fast)
        rows.append({"set": name, "part": "fast", "n": n, "d": d, "strategy": fast.strategy,
                     "iterations": fast.iterations, "e_share": share, "cpu_seconds": seconds,
                     "counts": ws._fast_counts(n, d, fast.strategy, fast.iterations,
                                               share).tolist()})  # fmt: skip
        cols = np.unique(np.linspace(0, n - 1, columns).round().astype(np.int64))
        YT, Gn = x64.numpy(), G.numpy()
        Y = np.ascontiguousarray(YT.T)
        for part, start, cap_c, max_work in (
            ("warm", fast.coef, LIMITS.warm_set, LIMITS.warm_work),
            ("cold", None, LIMITS.dense_set, LIMITS.cold_work),
        ):
            ptr, var, val = ws._seeds(x64, G, lam_e, lam_z, start,
                                      None if start is None else cap_c, cols)  # fmt: skip
            fc0, fe0 = ws._start_sizes(n, ptr, var)
            C, E = np.zeros((n, n)), np.zeros((d, n))
            status = np.full(n, -1, dtype=np.int64)
            passes, work = np.zeros(n, dtype=np.int64), np.zeros(n)
            hard = np.array([0, n + 1], dtype=np.int64)

            args = (Gn, YT, Y, ptr, var, val, lam_z, lam_e, ws.TOL, *ws._grows(None), n + d,
                    int(min(cap_c, n + d)), LIMITS.max_passes, ws.MAX_STEPS, max_work, C, E,
                    status, passes, work, hard, LIMITS.downdate_floor)  # fmt: skip

            def call(which, args=args):
                t = time.process_time()
                kernel.run_columns(which, 0, 1, *args)
                return time.process_time() - t

            empty = min(call(np.zeros(0, dtype=np.int64)) for _ in range(3))
            for i in cols.tolist():
                sec = call(np.array([i], dtype=np.int64)) - empty
                fc, fe = int((C[:, i] != 0).sum()), int((E[:, i] != 0).sum())
                rows.append({"set": name, "part": part, "n": n, "d": d, "column": i,
                             "cpu_seconds": sec, "status": int(status[i]),
                             "counts": ws._kernel_counts(n, d, fc0[i], fe0[i], fc, fe, work[i],
                                                         passes[i]).tolist()})  # fmt: skip
        part = [r for r in rows if r["set"] == name]
        print(name, {p: round(sum(r["cpu_seconds"] for r in part if r["part"] == p), 3)
                     for p in ("gram", "fast", "warm", "cold")}, flush=True)  # fmt: skip
    fit = {}
    for key, parts in (("KERNEL_NS", ("warm", "cold")), ("FAST_NS", ("fast",)),
                       ("GRAM_NS", ("gram",))):  # fmt: skip
        use = [r for r in rows if r["part"] in parts and r["cpu_seconds"] > 0]
        X = np.array([r["counts"] for r in use], dtype=np.float64)
        y = np.array([r["cpu_seconds"] for r in use]) * 1e9
        w = 1.0 / np.maximum(y, 1e5)  # relative error (columns under 0.1 ms: absolute)
        coef, _ = nnls(X * w[:, None], y * w)
        fit[key] = coef.tolist()
        for r in use:
            r["model_cpu_seconds"] = float(np.asarray(r["counts"]) @ coef) / 1e9
    fit["model_over_measured"] = {
        f"{name} {part}": sum(r["model_cpu_seconds"] for r in rows if (r["set"], r["part"]) ==
                              (name, part) and "model_cpu_seconds" in r) /
        max(1e-12, sum(r["cpu_seconds"] for r in rows if (r["set"], r["part"]) == (name, part)
                       and "model_cpu_seconds" in r))
        for name in dict.fromkeys(r["set"] for r in rows) for part in ("gram", "fast", "warm",
                                                                       "cold")}  # fmt: skip
    meta.update(fit=fit, load_after=list(os.getloadavg()))
    print(json.dumps(fit, indent=1))
    path = write_result("workset_calibration", meta, rows, out_dir)
    print(f"wrote {path}")
    return path


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", nargs="+", default=[], help="names of SETS (default: all)")
    ap.add_argument("--tag", default="", help="workset_<tag>_<device>.json")
    ap.add_argument("--frames", type=int, nargs="+", default=[8, 16], help="--passes' shapes")
    ap.add_argument("--max-passes", type=int, default=400)
    ap.add_argument("--out", default=None)
    ap.add_argument("--passes", action="store_true", help="the working sets' passes per --grow")
    ap.add_argument("--dims", type=int, nargs="+", default=[DIM])
    ap.add_argument("--grow", type=int, nargs="+", default=[16, 32, 64, 128])
    ap.add_argument("--dark", action="store_true", help="a request with 8 dark tokens")
    ap.add_argument("--dense", action="store_true", help="DENSE's sets: default over fast")
    ap.add_argument("--calibrate", action="store_true", help="the warm budget's cost model")
    args = ap.parse_args(argv)
    if args.dark:
        return dark(args.quick, args.out)
    if args.dense:
        return dense(args.only, args.out, args.tag)
    if args.calibrate:
        return calibrate(args.only, args.out)
    if args.passes:
        return passes(args.quick, args.frames, args.dims, args.grow, args.out)
    return run(args.quick, args.only, args.max_passes, args.out, args.tag)


if __name__ == "__main__":
    main()
