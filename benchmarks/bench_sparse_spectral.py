"""The spectral step on a sparse affinity (issue 52 item 3): blocked mode's path, never dense.

Every provider clusters the same sparse affinity ``W = |C| + |C|^T`` (float64 COO, as
blocked mode hands it to the clustering) into k = 24 clusters, interleaved in one process,
repeated; the median is reported.

Providers:
  sparse_auto     ``sparse_spectral_labels(W, 24)``, eigen_solver="auto" (the default:
                  ARPACK on the CPU, the Chebyshev solver on a GPU)
  sparse_arpack   eigen_solver="arpack": scipy's ``eigsh`` (CPU)
  sparse_krylov   eigen_solver="subspace": the block Krylov solver on the device (the torch
                  path a GPU ran until the 2026-11-26 H200 lease; before issue 52 the CPU
                  ran it too)
  sparse_chebyshev  eigen_solver="chebyshev": Chebyshev-filtered subspace iteration on the
                  device, to the same block residual (1e-7), with its step count
  dense_eigh      ``spectral_labels`` of ``W`` densified, eigen_solver="eigh": the labels
                  the others are held against (up to ``--eigh-max``)

Each row has the labels' agreement with dense_eigh (ARI) and, for the eigensolvers, the
block residual ``||S Q - Q Theta||_F`` of the 24 vectors they return and the sine of the
largest principal angle between their span and dense ``eigh``'s top 24 (``subspace_sin``),
with the eigengap ``lambda_24 - lambda_25`` of the normalised affinity (``eigengap``),
outside the timing. Without a gap at 24 the labels are not defined by the affinity (which
ones come out depends on the arithmetic: ARI 0.93 against ``eigh`` on one AVX-512 CPU, 1.0 on
another, issue 80); the span is, to within ``residual / eigengap`` (Davis-Kahan).

Affinities:
  minimiser   the certified minimiser's C (``reference_minimiser``, duality gap < 1e-9) of
              video-like tokens (``bench_ssc.video_tokens``: 96 patches per frame, 4 and 8
              frames, D = 1024): N = 384 and 768 (its solve is not timed: minutes)
  gap, no_gap ``bench_spectral``'s seeded SSC-like affinities (24 groups with a gap at 24;
              16 groups without one), sparse, at N = 1024 to 8192

CPU runs use one thread (torch and, through threadpoolctl, BLAS) and record the load.

    python benchmarks/bench_sparse_spectral.py                 # CPU: minimiser + 1k..8k
    python benchmarks/bench_sparse_spectral.py --device cuda   # GPU (no ARPACK row)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import common  # noqa: E402
from benchmarks.bench_spectral import STRUCTURES, group_affinity, parse_args, start_meta  # noqa: E402
from benchmarks.common import print_table, sizes_and_reps, write_result  # noqa: E402
from videoanchor.anchor import reference_minimiser  # noqa: E402
from videoanchor.anchor.clustering import (  # noqa: E402
    sparse_spectral_labels,
    sparse_ssc_affinity,
    spectral_labels,
)
from videoanchor.anchor.eigensolvers import (  # noqa: E402
    _top_eigvecs_arpack,
    block_krylov_eigvecs,
    chebyshev_eigvecs,
    sparse_normalized_affinity,
)

K = 24


def minimiser_affinity(frames: int):
    """The sparse affinity of the certified minimiser of ``frames`` frames of video-like
    tokens, and the minimiser's certified gap."""
    res = reference_minimiser(common.video_tokens(frames, 96, 1024))
    if not res.converged:
        raise RuntimeError(f"the minimiser of {frames} frames did not certify ({res.residual})")
    return sparse_ssc_affinity(res.coef.to_sparse()), res.residual


def bench_one(w, name, reps, device, eigh_max, extra=None):
    n = w.shape[0]
    w = w.to(device)
    providers = {"sparse_auto": lambda: sparse_spectral_labels(w, K, seed=0)}
    if device.type == "cpu":
        providers["sparse_arpack"] = lambda: sparse_spectral_labels(
            w, K, seed=0, eigen_solver="arpack"
        )
    providers["sparse_krylov"] = lambda: sparse_spectral_labels(
        w, K, seed=0, eigen_solver="subspace"
    )
    providers["sparse_chebyshev"] = lambda: sparse_spectral_labels(
        w, K, seed=0, eigen_solver="chebyshev"
    )
    if n <= eigh_max:
        dense = w.to_dense()
        providers["dense_eigh"] = lambda: spectral_labels(dense, K, seed=0, eigen_solver="eigh")
    times = {p: [] for p in providers}
    labels = {}
    for _ in range(reps):
        for p, fn in providers.items():  # interleaved
            common.sync(device)
            t = time.perf_counter()
            labels[p] = fn()[0]
            common.sync(device)
            times[p].append(time.perf_counter() - t)
    s, _ = sparse_normalized_affinity(w)
    residual = {}
    if device.type == "cpu":
        q_arpack = q = _top_eigvecs_arpack(s, K, 0)
        theta = ((s @ q) * q).sum(0)
        residual["sparse_arpack"] = float((s @ q - q * theta).norm())
    theta, q, _ = block_krylov_eigvecs(
        lambda x: s @ x, n, K, dtype=s.dtype, device=s.device, seed=0, tol=1e-7,
        matmul_flops=2 * s._nnz(), max_steps=200,
    )  # fmt: skip
    residual["sparse_krylov"] = float((s @ q - q * theta.to(q)).norm())  # (theta: host)
    q_krylov = q
    theta, q, info = chebyshev_eigvecs(lambda x: s @ x, n, K, dtype=s.dtype, device=s.device,
                                       seed=0, tol=1e-7, max_steps=200)  # fmt: skip
    residual["sparse_chebyshev"] = float((s @ q - q * theta.to(q)).norm())
    steps = {"sparse_chebyshev": info["steps"]}
    residual["sparse_auto"] = residual[
        "sparse_arpack" if device.type == "cpu" else "sparse_chebyshev"
    ]
    spans = {"sparse_krylov": q_krylov, "sparse_chebyshev": q}
    if device.type == "cpu":
        spans["sparse_arpack"] = q_arpack
    spans["sparse_auto"] = spans["sparse_arpack" if device.type == "cpu" else "sparse_chebyshev"]
    subspace, eigengap = {}, None
    if n <= eigh_max:  # dense eigh's top K: the span the others are held against
        values, vectors = torch.linalg.eigh(s.to_dense().double())
        eigengap = float(values[-K] - values[-K - 1])
        top = vectors[:, -K:]
        for p, v in spans.items():
            v = torch.linalg.qr(v.double())[0]
            subspace[p] = float(torch.linalg.matrix_norm(v - top @ (top.T @ v), ord=2))
    med = {p: statistics.median(v) for p, v in times.items()}
    rows = []
    for p in providers:
        row = dict(affinity=name, n=n, k=K, nnz_per_row=w._nnz() / n, provider=p, reps=reps,
                   median_s=med[p], min_s=min(times[p]), max_s=max(times[p]), **(extra or {}))  # fmt: skip
        if p in residual:
            row["block_residual"] = residual[p]
        if p in steps:
            row["steps"] = steps[p]
        if p in subspace:
            row["subspace_sin"] = subspace[p]
        if eigengap is not None:
            row["eigengap"] = eigengap
        if "dense_eigh" in labels and p != "dense_eigh":
            row["ari_vs_dense_eigh"] = common.ari(labels[p].cpu(), labels["dense_eigh"].cpu())
            row["speedup_vs_dense_eigh"] = med["dense_eigh"] / med[p]
        if p != "sparse_krylov":
            row["speedup_vs_krylov"] = med["sparse_krylov"] / med[p]
        rows.append(row)
    return rows


def run(device, sizes, reps, frames, out_dir, eigh_max):
    from threadpoolctl import threadpool_limits

    dev = torch.device(device)
    meta = start_meta(device)
    rows = []
    with threadpool_limits(1 if device == "cpu" else None):
        for f in frames:
            w, gap = minimiser_affinity(f)
            rows += bench_one(w, "minimiser", max(reps, default=3), dev, eigh_max,
                              extra={"frames": f, "minimiser_gap": gap})  # fmt: skip
            print(f"done minimiser {f} frames load={common.loadavg()}", flush=True)
        for n, r in zip(sizes, reps, strict=True):
            for structure, (groups, nnz, p_out) in STRUCTURES.items():
                w = group_affinity(n, groups, nnz, p_out).double().to_sparse()
                rows += bench_one(w, structure, r, dev, eigh_max)
                print(f"done n={n} {structure} load={common.loadavg()}", flush=True)
    meta["loadavg_end"] = common.loadavg()
    path = write_result("sparse_spectral", meta, rows, out_dir)
    print_table(rows, ["affinity", "n", "provider", "median_s", "speedup_vs_krylov",
                       "ari_vs_dense_eigh", "block_residual"])  # fmt: skip
    print(f"wrote {path}")
    return path


def main(argv=None):
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--sizes", default="1024,2048,4096,8192", help="comma-separated N")
    ap.add_argument("--reps", default="3,3,3,1", help="comma-separated repetitions per N")
    ap.add_argument("--frames", default="4,8", help="minimiser affinities ('' for none)")
    ap.add_argument("--eigh-max", type=int, default=4096, help="largest N for dense_eigh")
    ap.add_argument("--quick", action="store_true", help="N = 512, 1 rep, no minimiser")
    ap.add_argument("--out-dir", default=None, help="default benchmarks/results")
    args, device = parse_args(ap, argv)
    if args.quick:
        args.sizes, args.reps, args.frames = "512", "1", ""
    sizes, reps = sizes_and_reps(ap, args.sizes, args.reps)
    frames = [int(v) for v in args.frames.split(",") if v]
    return run(device, sizes, reps, frames, args.out_dir, args.eigh_max)


if __name__ == "__main__":
    main()
