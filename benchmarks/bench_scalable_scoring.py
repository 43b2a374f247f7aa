"""Scalable anchor scoring (mode="scalable") against the exact mode, and its cost against N.

Two synthetic token sets, seeded:
  subspaces   the tokens of bench_ssc.py (24 random 6-dim subspaces, shared mean, noise,
              0.2% corruptions), each token independent: no redundancy between frames,
              the exact C is dense-ish (hundreds of non-zeros per column), a hard case.
  video       256 tokens per frame; frame t+1 is frame t with small drift (noise 0.05),
              5% of the tokens replaced by new ones from the same subspaces: the
              temporal redundancy of real videos.

Agreement (exact mode, default solver, run in the same process): Spearman correlation
of the scores and of the row sums of C, adjusted Rand index of the labels. Next to it, the
exact mode's own reproducibility: the same C clustered with seed 1 instead of 0
(``exact_seed1_*``); where the labels are unstable this bounds what any approximation can
reach.
Cost: time of the whole scalable pipeline and peak memory against N
(``torch.cuda.max_memory_allocated`` on a GPU; on the CPU the peak resident set size of
the process, which only grows, so the CPU rows give an upper bound).

    python benchmarks/bench_scalable_scoring.py --device cpu    # agreement at the CPU's sizes
    python benchmarks/bench_scalable_scoring.py --device cuda   # N = 4k/8k agreement, D = 3584,
                                                                 # and N up to 65536
    python benchmarks/bench_scalable_scoring.py --sizes 2048x128 --candidates 32 96 160 \
        --no-scaling --tag ksweep                                # agreement against K only
    python benchmarks/bench_scalable_scoring.py --sizes 1024x128 --early-stopping \
        --tag stopping                                           # exact mode vs a tighter eps
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.bench_ssc import synthetic_tokens  # noqa: E402
from benchmarks.common import environment, print_table, skip, write_result  # noqa: E402
from videoanchor.anchor import (  # noqa: E402
    anchor_scores,
    compute_anchor_scores,
    spectral_clustering,
    ssc_affinity,
)


def video_tokens(n, d, *, per_frame=256, k=24, sub_dim=6, drift=0.05, churn=0.05, seed=0):
    """Token-like features with temporal redundancy (see the module docstring)."""
    g = torch.Generator().manual_seed(seed)
    bases = torch.randn(k, d, sub_dim, generator=g) / sub_dim**0.5
    mean = 0.5 * torch.randn(d, generator=g)

    def fresh(m):
        c = torch.randint(0, k, (m,), generator=g)
        coords = torch.randn(m, sub_dim, 1, generator=g)
        return (bases[c] @ coords).squeeze(2) + mean

    frames = [fresh(per_frame)]
    while sum(f.shape[0] for f in frames) < n:
        f = frames[-1] + drift * torch.randn(per_frame, d, generator=g)
        swap = torch.rand(per_frame, generator=g) < churn
        if bool(swap.any()):
            f[swap] = fresh(int(swap.sum()))
        frames.append(f)
    return torch.cat(frames)[:n].contiguous()


def _rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def _agreement(exact, fast) -> dict:
    from scipy.stats import spearmanr
    from sklearn.metrics import adjusted_rand_score

    r_exact = exact.coef.double().sum(dim=1).cpu().numpy()
    r_fast = torch.sparse.sum(fast.coef.double(), dim=1).to_dense().cpu().numpy()
    return {
        "spearman_scores": float(
            spearmanr(exact.scores.cpu().numpy(), fast.scores.cpu().numpy())[0]
        ),
        "spearman_row_sums": float(spearmanr(r_exact, r_fast)[0]),
        "labels_ari": float(
            adjusted_rand_score(exact.labels.cpu().numpy(), fast.labels.cpu().numpy())
        ),
    }


def _run(x, device, **kw):
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    _sync(device)
    t = time.perf_counter()
    res = compute_anchor_scores(x, n_clusters=24, **kw)
    _sync(device)
    dt = time.perf_counter() - t
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else _rss_gb()
    return res, dt, peak


def _exact_reproducibility(exact) -> dict:
    """The exact mode against itself: the same C, spectral clustering seeded 1 instead of 0."""
    from scipy.stats import spearmanr
    from sklearn.metrics import adjusted_rand_score

    labels = spectral_clustering(ssc_affinity(exact.coef), 24, seed=1)
    scores = anchor_scores(exact.coef, labels)
    return {
        "exact_seed1_spearman_scores": float(
            spearmanr(exact.scores.cpu().numpy(), scores.cpu().numpy())[0]
        ),
        "exact_seed1_labels_ari": float(
            adjusted_rand_score(exact.labels.cpu().numpy(), labels.cpu().numpy())
        ),
    }


def agreement_rows(device, sizes, candidates, datasets=("subspaces", "video")):
    rows = []
    for data in datasets:
        for n, d in sizes:
            make = synthetic_tokens if data == "subspaces" else video_tokens
            x = make(n, d, seed=7).to(device)
            exact, t_exact, _ = _run(x, device, mode="exact")
            floor = _exact_reproducibility(exact)
            print(f"{data} N={n} D={d}: exact {t_exact:.1f}s {floor}", flush=True)
            for k in candidates:
                fast, t_fast, peak = _run(x, device, mode="scalable", candidates=k)
                row = {
                    "case": "agreement",
                    "data": data,
                    "n": n,
                    "d": d,
                    "candidates": k,
                    "exact_s": t_exact,
                    "exact_iterations": exact.iterations,
                    "scalable_s": t_fast,
                    "scalable_iterations": fast.iterations,
                    "kkt_worst_violation": fast.residual,
                    "peak_gb": peak,
                    **_agreement(exact, fast),
                    **floor,
                }
                rows.append(row)
                print_table(
                    [row],
                    ["data", "n", "candidates", "scalable_s", "spearman_scores", "labels_ari"],
                )
            del x, exact
    return rows


def stopping_rows(device, sizes, datasets, factors=(10, 100)):
    """How far the exact mode's answer is from the minimiser it approaches: the exact mode
    at the default eps against the same solver run to ``eps / factor``. The relative
    Frobenius distance of C shows the early stop; the Spearman correlation of the row sums
    and scores says how much of it reaches the anchor scores, i.e. whether agreement with
    the exact mode is a well-posed target for a solver that follows another path."""
    from scipy.stats import spearmanr

    rows = []
    for data in datasets:
        for n, d in sizes:
            make = synthetic_tokens if data == "subspaces" else video_tokens
            x = make(n, d, seed=7).to(device)
            runs = {}
            for f in (1, *factors):
                # float64: a float32 residual may not get below the tightest eps
                res, dt, _ = _run(
                    x, device, mode="exact", eps=2e-4 / f, max_iter=50000, dtype=torch.float64
                )
                runs[f] = (res, dt)
                print(f"{data} N={n} D={d} eps={2e-4 / f:.0e}: {res.iterations} it, {dt:.1f}s")
            tight, _ = runs[factors[-1]]
            c_t = tight.coef.double()
            for f in (1, *factors[:-1]):
                res, dt = runs[f]
                c = res.coef.double()
                rows.append(
                    {
                        "case": "early_stopping",
                        "data": data,
                        "n": n,
                        "d": d,
                        "eps": 2e-4 / f,
                        "tight_eps": 2e-4 / factors[-1],
                        "iterations": res.iterations,
                        "tight_iterations": tight.iterations,
                        "seconds": dt,
                        "tight_seconds": runs[factors[-1]][1],
                        "coef_rel_fro_to_tight": float((c - c_t).norm() / c_t.norm()),
                        "spearman_row_sums_to_tight": float(
                            spearmanr(c.sum(1).cpu().numpy(), c_t.sum(1).cpu().numpy())[0]
                        ),
                        "spearman_scores_to_tight": float(
                            spearmanr(res.scores.cpu().numpy(), tight.scores.cpu().numpy())[0]
                        ),
                    }
                )
                print_table(
                    rows[-1:],
                    ["data", "eps", "coef_rel_fro_to_tight", "spearman_row_sums_to_tight"],
                )
            del x, runs, tight
    return rows


def scaling_rows(device, ns, d, reps):
    rows = []
    for n in ns:
        x = video_tokens(n, d, seed=8).to(device)
        times, peak, res = [], 0.0, None
        for _ in range(reps):
            res, dt, peak = _run(x, device, mode="scalable")
            times.append(dt)
        rows.append(
            {
                "case": "scaling",
                "data": "video",
                "n": n,
                "d": d,
                "candidates": 32,
                "scalable_s": statistics.median(times),
                "scalable_s_runs": times,
                "scalable_iterations": res.iterations,
                "peak_gb": peak,
                "dense_n2_float32_gb": n * n * 4 / 2**30,
                "timings": res.timings,
            }
        )
        print_table(rows[-1:], ["n", "d", "scalable_s", "peak_gb", "dense_n2_float32_gb"])
        del x, res
        if device == "cuda":
            torch.cuda.empty_cache()
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--device", choices=["cpu", "cuda"], default=None)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--sizes", nargs="+", default=None, help="agreement sizes, e.g. 4096x3584")
    ap.add_argument("--candidates", type=int, nargs="+", default=None)
    ap.add_argument("--data", nargs="+", choices=["subspaces", "video"], default=None)
    ap.add_argument("--no-scaling", action="store_true", help="agreement rows only")
    ap.add_argument(
        "--early-stopping",
        action="store_true",
        help="only the exact mode at eps against eps / 10 and eps / 100 (no scalable runs)",
    )
    ap.add_argument("--tag", default="", help="suffix of the result file name")
    ap.add_argument("--out-dir", default=None)
    args = ap.parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    meta = environment(device)
    meta["torch_threads"] = torch.get_num_threads()
    if device == "cpu":
        sizes = [(512, 64)] if args.quick else [(1024, 128), (2048, 128)]
        candidates, ns, d_scale, reps = [32], [1024] if args.quick else [2048, 4096], 128, 1
    else:
        sizes = [(4096, 3584)] if args.quick else [(4096, 3584), (8192, 3584)]
        candidates, d_scale, reps = [32, 64], 3584, 3
        ns = [8192, 16384] if args.quick else [8192, 16384, 32768, 65536]
    if args.sizes:
        sizes = [tuple(int(v) for v in s.lower().split("x")) for s in args.sizes]
    candidates = args.candidates or candidates
    datasets = tuple(args.data or ("subspaces", "video"))
    if args.early_stopping:
        rows = stopping_rows(device, sizes, datasets)
    else:
        rows = agreement_rows(device, sizes, candidates, datasets)
        if args.quick and device == "cpu" and not args.no_scaling:
            skip(
                "bench_scalable_scoring",
                "--quick: the scaling rows (N = 1024 alone takes "
                "minutes on a CPU); run without --quick for them",
            )
        elif not args.no_scaling:
            rows += scaling_rows(device, ns, d_scale, reps)
    meta["loadavg_end"] = list(np.round(np.array(__import__("os").getloadavg()), 2))
    path = write_result("scalable" + (f"_{args.tag}" if args.tag else ""), meta, rows, args.out_dir)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
