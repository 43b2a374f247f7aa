"""Anchor scores (SSC + spectral clustering + scores): ours against the authors' pipeline.

The baseline is a faithful re-implementation of the authors' pipeline
(``videoanchor.anchor.reference``): lambdas by the O(N^2) Python loop, the SSC-ADMM with a
dense float64 ``numpy.linalg.solve`` of the N x N system at every iteration, and
scikit-learn's ``SpectralClustering(affinity="precomputed", assign_labels="discretize")``.
It runs in the same process, on the same data, right before ours (``solver="faithful"``,
the authors' iteration); each "ours" row holds the ratio of the two times
(``speedup_total``) and the load average before and after each.

Data: synthetic visual tokens, seeded (``benchmarks.common.synthetic_tokens``): 24 random
6-dimensional subspaces, a shared mean direction, Gaussian noise (0.05) and 0.2% sparse
large corruptions (so the outlier term E is exercised).

CPU cases (``--device cpu``; sizes ``--fixed60 N,D`` and ``--converge N,D``):
  fixed60   N = 1024, D = 512, both pipelines held to the same 60 ADMM iterations.
  converge  N = 512, D = 256, each to its own convergence (the authors' rule, eps 2e-4).
            Unless ``--skip-limits``, the SSC program's certified minimiser
            (``reference_minimiser``, float64) too, and every C is compared with it.
``--repeats R`` runs the cases R times over (each repeat a pair of rows, ``repeat``);
``--threads T`` holds torch and NumPy's BLAS (threadpoolctl) to T threads.
GPU cases (``--device cuda``):
  target    N = 2048, D = 4096 (InternVL2-8B, 8 frames) and N = 16384, D = 3584
            (64 frames of Qwen2.5-VL): whole pipeline, median of repeated runs, peak memory.
  scaling   time against N (D = 3584) and against D (N = 2048).
  backends  torch against cupy at N = 2048, D = 4096 (when CuPy is installed).

    python benchmarks/bench_ssc.py --device cpu      # on this machine's CPU
    python benchmarks/bench_ssc.py --device cuda     # on a GPU
    python benchmarks/bench_ssc.py --device cpu --threads 1 --repeats 3 \
        --converge 1024,512 --skip-limits --name ssc_ratio   # issue 67's same-run ratios
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import (  # noqa: E402
    ari,
    environment,
    finish,
    loadavg,
    objective,
    parser,
    print_table,
    rel,
    skip,
    spearman,
    synthetic_tokens,
)
from videoanchor.anchor import compute_anchor_scores, reference_minimiser  # noqa: E402
from videoanchor.anchor.reference import (  # noqa: E402
    authors_admm,
    authors_lambdas,
    authors_spectral_labels,
)


def reference_pipeline(x: torch.Tensor, n_clusters: int, max_iter: int) -> dict:
    """The authors' pipeline, stage by stage, on the CPU in float64."""
    y = x.double().numpy().T
    t0 = time.perf_counter()
    lambdas = authors_lambdas(y, 800.0, 800.0)
    t1 = time.perf_counter()
    coef, iterations, converged = authors_admm(y, max_iter=max_iter, lambdas=lambdas)
    t2 = time.perf_counter()
    labels = authors_spectral_labels(coef, n_clusters, seed=0)
    t3 = time.perf_counter()
    r = coef.sum(axis=1)
    s_hat = np.bincount(labels)[labels] / coef.shape[0] * r
    scores = (s_hat - s_hat.min()) / (s_hat.max() - s_hat.min() + 1e-5)
    t4 = time.perf_counter()
    return {
        "coef": coef,
        "labels": labels,
        "scores": scores,
        "iterations": iterations,
        "converged": converged,
        "lambdas": lambdas,
        "timings": {
            "lambdas": t1 - t0,
            "admm": t2 - t1,
            "spectral": t3 - t2,
            "scores": t4 - t3,
            "total": t4 - t0,
        },
    }


def _row(case, provider, n, d, res_timings, iterations, converged, **extra):
    row = {"case": case, "provider": provider, "n": n, "d": d}
    row["total_s"] = res_timings["total"]
    for stage in ("lambdas", "factor", "admm", "spectral", "scores"):
        row[f"{stage}_s"] = res_timings.get(stage)
    row["iterations"] = iterations
    row["converged"] = converged
    row["admm_ms_per_iter"] = 1e3 * res_timings["admm"] / max(iterations, 1)
    row.update(extra)
    return row


def pair(case: str, x: torch.Tensor, max_iter: int | None = None) -> list[dict]:
    """The authors' pipeline, then ours (``solver="faithful"``) on ``x``, both held to
    ``max_iter`` iterations (None: each to its own convergence): a row each, ours with the
    ratio of the two times and how near its answer is to the reference's."""
    n, d = x.shape
    load0 = loadavg()
    ref = reference_pipeline(x, 24, max_iter or 10000)
    load1 = loadavg()
    limit = {} if max_iter is None else {"max_iter": max_iter}
    ours = compute_anchor_scores(x, n_clusters=24, solver="faithful", progress=False, **limit)
    load2 = loadavg()
    t_ref, t_ours = ref["timings"], ours.timings
    print(f"{case}: reference {t_ref['total']:.2f} s, ours {t_ours['total']:.2f} s "
          f"({t_ref['total'] / t_ours['total']:.2f}x), load {load0} -> {load2}", flush=True)  # fmt: skip
    return [
        _row(case, "reference", n, d, t_ref, ref["iterations"], ref["converged"],
             loadavg_before=load0, loadavg_after=load1, coef=ref["coef"]),
        _row(case, "ours_faithful", n, d, t_ours, ours.iterations, ours.converged,
             loadavg_before=load1, loadavg_after=load2, solver=ours.solver, coef=ours.coef,
             speedup_total=t_ref["total"] / t_ours["total"],
             speedup_admm_per_iter=(t_ref["admm"] / ref["iterations"])
             / (t_ours["admm"] / ours.iterations),
             coef_rel_to_reference=rel(ours.coef, ref["coef"]),
             labels_ari_vs_reference=ari(ref["labels"], ours.labels),
             scores_spearman_vs_reference=spearman(ref["scores"], ours.scores)),
    ]  # fmt: skip


def case_fixed60(n=1024, d=512, iters=60):
    return pair("fixed60", synthetic_tokens(n, d, seed=1), iters)


def case_converge(n=512, d=256, limits=True):
    x = synthetic_tokens(n, d, seed=2)
    rows = pair("converge", x)
    if limits:  # the program's minimiser, certified by its duality gap (float64)
        t = time.perf_counter()
        mn = reference_minimiser(x)
        seconds = time.perf_counter() - t
        f_min = objective(x, mn.coef, mn.lambda_e, mn.lambda_z)
        for row in rows:
            f = objective(x, row["coef"], mn.lambda_e, mn.lambda_z)
            row.update(coef_rel_to_minimiser=rel(row["coef"], mn.coef),
                       objective_rel_gap=(f - f_min) / abs(f_min))  # fmt: skip
        rows.append({"case": "converge", "provider": "minimiser_float64", "n": n, "d": d,
                     "total_s": seconds, "converged": mn.converged,
                     "duality_gap": float(mn.residual), "objective": f_min})  # fmt: skip
    return rows


def _time_cuda(fn, reps):
    times, out = [], None
    for _ in range(reps):
        torch.cuda.synchronize()
        t = time.perf_counter()
        out = fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times), times, out


def _gpu_run(n, d, reps, **kw):
    x = synthetic_tokens(n, d, seed=3).cuda()

    def fn():
        return compute_anchor_scores(x, n_clusters=24, **kw)

    fn()  # warm-up (allocator, cuBLAS/cuSOLVER handles)
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    med, times, res = _time_cuda(fn, reps)
    peak = torch.cuda.max_memory_allocated() - base
    row = _row("gpu", kw.get("solver", "auto"), n, d, res.timings, res.iterations, res.converged)
    row.update(
        total_s=med,
        total_s_runs=times,
        peak_mem_gb=peak / 2**30,
        backend=res.backend,
        solver=res.solver,
    )
    return row


def cases_gpu(quick: bool):
    rows = []
    targets = [(2048, 4096, 5, 0.150), (16384, 3584, 1, 3.0)]
    if quick:
        targets = targets[:1]
    for n, d, reps, limit in targets:
        r = _gpu_run(n, d, reps)
        r.update(case="target", target_s=limit, meets_target=r["total_s"] < limit)
        rows.append(r)
        print_table([r], ["case", "n", "d", "total_s", "iterations", "peak_mem_gb"])
        torch.cuda.empty_cache()
    ns = [1024, 2048, 4096, 8192] + ([] if quick else [16384])
    for n in ns:
        r = _gpu_run(n, 3584, 1 if n >= 16384 else 3)
        r.update(case="scaling_n")
        rows.append(r)
    for d in [1024, 2048, 4096] + ([] if quick else [8192]):
        r = _gpu_run(2048, d, 3)
        r.update(case="scaling_d")
        rows.append(r)
    try:
        import cupy  # noqa: F401

        for backend in ("torch", "cupy"):
            r = _gpu_run(2048, 4096, 3, backend=backend, solver="faithful")
            r.update(case="backends")
            rows.append(r)
    except ImportError:
        rows.append({"case": "backends", "provider": "cupy", "note": "CuPy not installed"})
    return rows


def run(device: str, quick: bool, out_dir, cases, limits=True, *, sizes=None, repeats=1,
        threads=None, name="ssc"):  # fmt: skip
    """``sizes``: ``{"fixed60": (N, D), "converge": (N, D)}`` for the CPU cases (default by
    ``quick``); ``threads``: torch's and NumPy's BLAS threads for the run (None: as set)."""
    from threadpoolctl import threadpool_info, threadpool_limits

    if threads is not None:
        torch.set_num_threads(threads)
    sizes = {"fixed60": (512, 256) if quick else (1024, 512),
             "converge": (128, 64) if quick else (512, 256), **(sizes or {})}  # fmt: skip
    meta = environment(device)
    meta["data"] = (
        "synthetic tokens: 24 subspaces of dim 6, shared mean, noise 0.05, 0.2% corruptions"
    )
    rows = []
    with threadpool_limits(threads):
        if device == "cpu":  # imports and first calls outside the timings (7.2 s against 0.85 s)
            pair("warm-up", synthetic_tokens(96, 48), 5)
        meta["torch_threads"] = torch.get_num_threads()
        meta["blas_threads"] = {p["internal_api"]: p["num_threads"] for p in threadpool_info()}
        for repeat in range(repeats):
            got = []
            if device != "cpu":
                got += cases_gpu(quick)
            if device == "cpu" and "fixed60" in cases:
                got += case_fixed60(*sizes["fixed60"])
            if device == "cpu" and "converge" in cases:
                got += case_converge(*sizes["converge"], limits=limits)
            rows += [{**r, "repeat": repeat} for r in got]
    meta["loadavg_end"] = loadavg()
    for r in rows:
        r.pop("coef", None)
    ratios = {}
    for r in rows:
        if "speedup_total" in r:
            ratios.setdefault(r["case"], []).append(r["speedup_total"])
    meta["speedup_total_median"] = {c: statistics.median(v) for c, v in ratios.items()}
    print(f"speed-up, median over {repeats} repeat(s): {meta['speedup_total_median']}")
    return finish(name, meta, rows, out_dir,
                  ["case", "repeat", "provider", "n", "d", "total_s", "iterations",
                   "admm_ms_per_iter", "speedup_total", "coef_rel_to_reference",
                   "coef_rel_to_minimiser", "peak_mem_gb"])  # fmt: skip


def _size(text: str) -> tuple[int, int]:
    n, d = (int(v) for v in text.split(","))
    return n, d


def main(argv=None):
    ap = parser(__doc__, quick="smaller sizes (a smoke run)", device=True)
    ap.add_argument("--cases", default="fixed60,converge", help="CPU cases to run")
    ap.add_argument("--fixed60", type=_size, default=None, help="N,D of the fixed60 case")
    ap.add_argument("--converge", type=_size, default=None, help="N,D of the converge case")
    ap.add_argument("--repeats", type=int, default=1, help="run the cases this many times")
    ap.add_argument("--threads", type=int, default=None, help="torch and BLAS threads")
    ap.add_argument("--name", default="ssc", help="the result file's area (default ssc)")
    ap.add_argument(
        "--skip-limits", action="store_true",
        help="converge: skip the float64 minimiser (speed ratios only)",
    )  # fmt: skip
    args = ap.parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device")
    if args.repeats < 1 or (args.threads is not None and args.threads < 1):
        ap.error("--repeats and --threads: expected positive integers")
    limits = not args.skip_limits
    if args.quick and device == "cpu" and limits:
        limits = False
        skip("bench_ssc", "--quick: the float64 minimiser (converge case; run without --quick)")
    sizes = {k: v for k, v in (("fixed60", args.fixed60), ("converge", args.converge)) if v}
    run(device, args.quick, args.out_dir, set(args.cases.split(",")), limits=limits,
        sizes=sizes, repeats=args.repeats, threads=args.threads, name=args.name)  # fmt: skip


if __name__ == "__main__":
    main()
