"""Column-blocked exact SSC (mode="blocked"): equality with the dense solver, peak memory,
time per iteration, and the same work spread over several processes.

CPU cases (``--device cpu``):
  equality    N = 8192, D = 64, 20 iterations (eps = 0): the dense solver (its own strategy
              choice) and the blocked one, C compared (relative Frobenius), peak memory of
              each;
  large       N = 16384, D = 64, 50 iterations: the blocked solver's peak memory and time
              per iteration (the dense one would need N^2 buffers: not run);
  processes   N = 4096, D = 64, 20 iterations, whole compute_anchor_scores(mode="blocked"):
              1 process against 2 processes over gloo, time and equality (labels, C);
  convergence (not in the default list) N = 1024, D = 64 to eps = 2e-4: the dense mode
              against the blocked solver (8 blocks) with block_eps "own" and "share":
              iterations, C apart, scores Spearman and labels ARI against the dense mode.
GPU cases (``--device cuda``): N = 65,536, D = 3584, pca_rank = 512 to eps = 2e-4 (capped
by ``--max-iter``), its growth in N and in the PCA rank, and the same over 2 and 4 GPUs
(NCCL, one process per GPU; rows say "skipped" when the machine has fewer GPUs).

Memory: every run is its own subprocess. On the CPU it resets its peak resident set
(``/proc/self/clear_refs`` = 5) after the imports and the input generation and reports
``VmHWM - VmRSS`` read just before the run (torch's allocations are invisible to
tracemalloc); on CUDA ``torch.cuda.max_memory_allocated`` after a reset. Data: the seeded
synthetic tokens of bench_ssc.py. Times: wall clock inside the subprocess (synchronised
on CUDA), one thread per process on the CPU (``--threads``).

    python benchmarks/bench_blocked.py --device cpu
    python benchmarks/bench_blocked.py --device cpu --cases convergence --tag convergence
    python benchmarks/bench_blocked.py --device cuda [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import (  # noqa: E402
    environment,
    finish,
    loadavg,
    parser,
    rel,
    sync,
    synthetic_tokens,
)

_ROOT = Path(__file__).resolve().parents[1]


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _tokens(spec: dict) -> torch.Tensor:
    return synthetic_tokens(spec["n"], spec["d"], seed=spec.get("seed", 0))


def _child_solve(spec: dict) -> dict:
    """One solver run (``spec["solver"]``: "dense" or "blocked") in this process."""
    from videoanchor.anchor import solve_ssc_admm, solve_ssc_blocked

    torch.set_num_threads(spec["threads"])
    device = spec["device"]
    x = _tokens(spec).to(device)
    kw = dict(eps=spec["eps"], max_iter=spec["iters"])
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base_kib = _status_kib("VmRSS")
        reset = _reset_peak()
    t0 = time.perf_counter()
    if spec["solver"] == "dense":
        res = solve_ssc_admm(x, **kw)
        extra = {"strategy": res.strategy}
    else:
        res = solve_ssc_blocked(x, block_columns=spec.get("block_columns"), **kw)
        extra = {
            "block_columns": res.block_columns,
            "n_blocks": len(res.block_iterations),
            "nnz": int(res.coef._nnz()),
        }
    sync(device)
    wall = time.perf_counter() - t0
    if cuda:
        peak = (torch.cuda.max_memory_allocated() - base) / 2**30
        method = "torch.cuda.max_memory_allocated - allocated before the run"
    else:
        peak = (_status_kib("VmHWM") - base_kib) / 2**20
        method = (
            "VmHWM after clear_refs=5 minus VmRSS before the run"
            if reset
            else "VmHWM (clear_refs failed: includes the imports) minus VmRSS before the run"
        )
    if spec.get("save"):
        coef = res.coef if spec["solver"] == "dense" else res.coef.to_dense()
        torch.save(coef.cpu(), spec["save"])
    return {
        "wall_s": wall,
        "admm_s": res.timings["admm"],
        "iterations": res.iterations,
        "admm_ms_per_iter": 1e3 * res.timings["admm"] / max(1, res.iterations),
        "peak_mem_gb": peak,
        "memory_method": method,
        **extra,
    }


def _dist_worker(rank: int, world: int, store: str, spec: dict, out: str) -> None:
    """compute_anchor_scores(mode="blocked") on ``world`` processes (1: no group)."""
    import torch.distributed as dist

    from videoanchor.anchor import compute_anchor_scores

    torch.set_num_threads(spec["threads"])
    device = spec["device"]
    group = None
    if device.startswith("cuda"):
        device = f"cuda:{rank}"
        torch.cuda.set_device(rank)
    if world > 1:
        backend = "nccl" if device.startswith("cuda") else "gloo"
        dist.init_process_group(backend, init_method=f"file://{store}", rank=rank, world_size=world)
        group = dist.group.WORLD
    try:
        x = _tokens(spec).to(device)
        if group is not None:
            dist.barrier(group)
        sync(device)
        t0 = time.perf_counter()
        res = compute_anchor_scores(
            x, n_clusters=24, mode="blocked", eps=spec["eps"], max_iter=spec["iters"],
            pca_rank=spec.get("pca_rank", 0), block_columns=spec.get("block_columns"),
            process_group=group,
        )  # fmt: skip
        sync(device)
        wall = time.perf_counter() - t0
        row = {
            "rank": rank,
            "wall_s": wall,
            "iterations": res.iterations,
            "converged": res.converged,
            "timings": res.timings,
            "peak_mem_gb": (
                torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None
            ),
        }
        if rank == 0:
            torch.save(
                {"coef": res.coef.cpu(), "labels": res.labels.cpu(), "scores": res.scores.cpu()},
                os.path.join(out, f"result_w{world}.pt"),
            )
        Path(out, f"row_w{world}_r{rank}.json").write_text(json.dumps(row, default=str))
    finally:
        if group is not None:
            dist.destroy_process_group()


def _child_processes(spec: dict) -> dict:
    """Run ``_dist_worker`` on ``spec["world"]`` processes; the rows of rank 0 and the max
    wall time over ranks."""
    import torch.multiprocessing as mp

    world = spec["world"]
    out = spec["out"]
    if world == 1:
        _dist_worker(0, 1, "", spec, out)
    else:
        store = os.path.join(out, f"store_w{world}")
        mp.spawn(_dist_worker, args=(world, store, spec, out), nprocs=world)
    rows = [json.loads(Path(out, f"row_w{world}_r{r}.json").read_text()) for r in range(world)]
    return {
        "wall_s": max(r["wall_s"] for r in rows),
        "admm_s": max(r["timings"]["admm"] for r in rows),
        "gather_s": max(r["timings"]["gather"] for r in rows),
        "spectral_s": rows[0]["timings"]["spectral"],
        "iterations": rows[0]["iterations"],
        "converged": rows[0]["converged"],
        "peak_mem_gb": max((r["peak_mem_gb"] or 0.0) for r in rows) or None,
    }


def _run_child(spec: dict, timeout: float) -> dict:
    """``spec`` in a fresh Python process (``--child``); returns its JSON answer."""
    env = dict(os.environ, OMP_NUM_THREADS=str(spec["threads"]))
    env["PYTHONPATH"] = str(_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    if p.returncode != 0:
        return {"error": p.stderr.strip().splitlines()[-1] if p.stderr.strip() else "failed"}
    return json.loads(p.stdout.strip().splitlines()[-1])


def case_equality(n, d, iters, threads, timeout, tmp):
    rows, saved = [], {}
    for solver in ("dense", "blocked"):
        path = os.path.join(tmp, f"coef_{solver}.pt")
        spec = dict(solver=solver, n=n, d=d, iters=iters, eps=0.0, threads=threads,
                    device="cpu", save=path)  # fmt: skip
        r = _run_child(spec, timeout)
        r.update(case="equality", provider=solver, n=n, d=d, loadavg=loadavg())
        rows.append(r)
        saved[solver] = path if "error" not in r else None
    if all(saved.values()):
        dense = torch.load(saved["dense"])
        blocked = torch.load(saved["blocked"])
        rows[1]["coef_rel_to_dense"] = rel(blocked, dense)
        rows[1]["coef_max_abs_diff"] = float((blocked - dense).abs().max())
        del dense, blocked
    if "error" not in rows[0] and "error" not in rows[1]:
        rows[1]["peak_mem_ratio_to_dense"] = rows[1]["peak_mem_gb"] / rows[0]["peak_mem_gb"]
        rows[1]["time_ratio_to_dense"] = rows[1]["admm_s"] / rows[0]["admm_s"]
    for path in saved.values():
        if path and os.path.exists(path):
            os.remove(path)
    return rows


def case_large(n, d, iters, threads, timeout, dense_peak_at_8192):
    spec = dict(solver="blocked", n=n, d=d, iters=iters, eps=0.0, threads=threads, device="cpu")
    r = _run_child(spec, timeout)
    r.update(case="large", provider="blocked", n=n, d=d, loadavg=loadavg())
    if dense_peak_at_8192 and "error" not in r:
        r["dense_peak_gb_at_8192"] = dense_peak_at_8192
        r["below_dense_at_8192"] = r["peak_mem_gb"] < dense_peak_at_8192
    return [r]


def case_processes(n, d, iters, worlds, device, threads, timeout, tmp, **extra):
    rows = []
    for world in worlds:
        if device == "cuda" and world > torch.cuda.device_count():
            rows.append({"case": "processes", "provider": f"{world} GPUs", "n": n, "d": d,
                         "note": f"skipped: {torch.cuda.device_count()} GPU(s) here"})  # fmt: skip
            continue
        spec = dict(n=n, d=d, iters=iters, eps=extra.get("eps", 0.0), threads=threads,
                    device=device, world=world, out=tmp, mode="processes",
                    block_columns=extra.get("block_columns"),
                    pca_rank=extra.get("pca_rank", 0))  # fmt: skip
        r = _run_child(spec, timeout)
        unit = "GPU" if device == "cuda" else "process"
        r.update(case="processes", provider=f"{world} x {unit}",
                 n=n, d=d, world=world, pca_rank=extra.get("pca_rank", 0),
                 block_columns=extra.get("block_columns"), loadavg=loadavg())  # fmt: skip
        rows.append(r)
    base = next((r for r in rows if r.get("world") == 1 and "error" not in r), None)
    ref_path = os.path.join(tmp, "result_w1.pt")
    if base is not None and os.path.exists(ref_path):
        ref = torch.load(ref_path)
        for r in rows:
            w = r.get("world")
            if w in (None, 1) or "error" in r:
                continue
            got = torch.load(os.path.join(tmp, f"result_w{w}.pt"))
            r["labels_identical"] = bool(torch.equal(got["labels"], ref["labels"]))
            r["coef_rel_to_1"] = rel(got["coef"].to_dense(), ref["coef"].to_dense())
            r["scores_max_abs_diff"] = float((got["scores"] - ref["scores"]).abs().max())
            r["speedup_vs_1"] = base["wall_s"] / r["wall_s"]
    return rows


def case_convergence(n, d, block, threads):
    """To the authors' eps (2e-4): the dense exact mode against the blocked solver with each
    block's own eps and with the shared one (``block_eps``), clustered and scored as in
    ``mode="blocked"``; same process, one after the other."""
    import numpy as np
    from scipy.stats import spearmanr
    from sklearn.metrics import adjusted_rand_score

    from videoanchor.anchor import anchor_scores, compute_anchor_scores, solve_ssc_blocked
    from videoanchor.anchor.clustering import sparse_spectral_clustering, sparse_ssc_affinity

    torch.set_num_threads(threads)
    x = _tokens({"n": n, "d": d})
    rows, ref = [], None
    for provider in ("dense", "blocked_own", "blocked_share"):
        t0 = time.perf_counter()
        row = {"case": "convergence", "provider": provider, "n": n, "d": d}
        if provider == "dense":
            res = compute_anchor_scores(x, mode="exact")
            coef, its, ok = res.coef, res.iterations, res.converged
            scores, labels = res.scores, res.labels
        else:
            b = solve_ssc_blocked(x, block_columns=block, block_eps=provider.split("_")[1])
            labels = sparse_spectral_clustering(sparse_ssc_affinity(b.coef), 24, seed=0)
            scores = anchor_scores(b.coef, labels)
            coef, its, ok = b.coef.to_dense(), b.iterations, b.converged
            row.update(block_columns=block, block_iterations_min=min(b.block_iterations),
                       block_iterations_max=max(b.block_iterations))  # fmt: skip
        row.update(iterations=its, converged=ok, pipeline_s=time.perf_counter() - t0)
        if ref is None:
            ref = (coef, scores.numpy(), labels.numpy())
        else:
            row["coef_rel_to_dense"] = rel(coef, ref[0])
            row["scores_spearman_vs_dense"] = float(spearmanr(scores.numpy(), ref[1])[0])
            row["scores_max_abs_diff"] = float(np.abs(scores.numpy() - ref[1]).max())
            row["labels_ari_vs_dense"] = float(adjusted_rand_score(ref[2], labels.numpy()))
        row["loadavg"] = loadavg()
        rows.append(row)
    return rows


def cases_gpu(quick: bool, max_iter: int, timeout: float, tmp: str) -> list[dict]:
    big = 16384 if quick else 65536
    # the target size on 1, 2 and 4 GPUs (each compared with the 1-GPU result) ...
    rows = case_processes(big, 3584, max_iter, [1, 2, 4], "cuda", 1, timeout, tmp,
                          eps=2e-4, pca_rank=512)  # fmt: skip
    # ... then its growth in N (D = 3584 -> pca 512) and in the PCA rank, on one GPU
    sizes = [(n, 512) for n in (8192, 16384, 32768) if n < big]
    sizes += [(big // 2, r) for r in (256, 1024)]
    for n, rank in sizes:
        got = case_processes(n, 3584, max_iter, [1], "cuda", 1, timeout, tmp,
                             eps=2e-4, pca_rank=rank)  # fmt: skip
        for r in got:
            r["case"] = "gpu_scaling"
        rows += got
    return rows


def run(args) -> Path:
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.timeout is None:
        args.timeout = 3600.0 if device == "cpu" else 540.0
    meta = environment(device)
    meta["threads_per_process"] = args.threads
    meta["data"] = (
        "synthetic tokens of bench_ssc.py: 24 subspaces of dim 6, mean, noise, 0.2% corruptions"
    )
    meta["memory_method"] = (
        "one subprocess per run; CPU: peak RSS (VmHWM, reset by /proc/self/clear_refs=5 after "
        "imports and input generation) minus the RSS before the run; CUDA: "
        "torch.cuda.max_memory_allocated"
    )
    rows: list[dict] = []
    cases = set(args.cases.split(","))
    with tempfile.TemporaryDirectory() as tmp:
        if device == "cpu":
            dense_peak = None
            if "equality" in cases:
                n = 2048 if args.quick else 8192
                eq = case_equality(n, 64, 20, args.threads, args.timeout, tmp)
                rows += eq
                if "error" not in eq[0]:
                    dense_peak = eq[0]["peak_mem_gb"]
            if "large" in cases:
                n = 4096 if args.quick else 16384
                rows += case_large(n, 64, 50, args.threads, args.timeout, dense_peak)
            if "convergence" in cases:
                n = 256 if args.quick else 1024
                rows += case_convergence(n, 64, n // 8, args.threads)
            if "processes" in cases:
                n = 1024 if args.quick else 4096
                rows += case_processes(n, 64, 20, [1, 2], "cpu", args.threads, args.timeout,
                                       tmp, block_columns=512)  # fmt: skip
        else:
            rows += cases_gpu(args.quick, args.max_iter, args.timeout, tmp)
    meta["loadavg_end"] = loadavg()
    first = ["case", "provider", "n", "d", "world", "block_columns", "n_blocks", "iterations",
             "admm_ms_per_iter", "admm_s", "wall_s", "peak_mem_gb"]  # fmt: skip
    rows = [{**{k: r[k] for k in first if k in r}, **r} for r in rows]
    name = "blocked" + (f"_{args.tag}" if args.tag else "")
    return finish(name, meta, rows, args.out_dir,
                  ["case", "provider", "n", "d", "iterations", "admm_ms_per_iter", "wall_s",
                   "peak_mem_gb", "peak_mem_ratio_to_dense", "coef_rel_to_dense",
                   "coef_rel_to_1", "labels_identical", "speedup_vs_1", "error", "note"])  # fmt: skip


def main(argv=None):
    ap = parser(__doc__, quick="smaller sizes (a smoke run)", device=True)
    ap.add_argument("--cases", default="equality,large,processes", help="CPU cases to run")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process (CPU)")
    ap.add_argument("--max-iter", type=int, default=10000, help="GPU runs: iteration cap")
    ap.add_argument(
        "--timeout", type=float, default=None,
        help="seconds per subprocess (default 3600 on the CPU, 540 on CUDA: a lent GPU "
        "machine allows 10 minutes per command)",
    )  # fmt: skip
    ap.add_argument("--tag", default="", help="result file blocked_<tag>_<device>.json")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child is not None:
        spec = json.loads(args.child)
        out = _child_processes(spec) if spec.get("mode") == "processes" else _child_solve(spec)
        print(json.dumps(out, default=str))
        return
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device")
    run(args)


if __name__ == "__main__":
    main()
