"""One request's fast SSC split over the ranks of a process group, against one process.

``compute_anchor_scores(x, 24, process_group=group)`` (the fast solver with the columns of
``C`` split over the ranks, clustering on rank 0) against ``compute_anchor_scores(x, 24)``
in one process with the same hardware: on the CPU, ``--world`` gloo processes of
``cores / world`` threads each against rank 0's process alone with all the cores (the
other ranks wait at a barrier meanwhile); on GPUs (``torchrun --nproc_per_node G``, NCCL),
one GPU per rank against rank 0's GPU alone. The single-process baseline runs in rank 0's
process, interleaved rep by rep with the split. Synthetic video tokens of the
Qwen2.5-VL-7B shape (D = 3584, 128 tokens per frame). Recorded per size: the medians and
spreads, the speedup, and how far the split's scores are from the single process's.

    python benchmarks/bench_split.py                     # CPU, 2 gloo ranks
    torchrun --nproc_per_node 4 benchmarks/bench_split.py   # 4 GPUs, NCCL
"""

from __future__ import annotations

import os
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import (  # noqa: E402
    environment,
    finish,
    median_spread,
    parser,
    sync,
    synthetic_tokens,
)
from videoanchor.anchor import compute_anchor_scores  # noqa: E402

D = 3584
PER_FRAME = 128


def measure(frames_list, reps, device, cores, world) -> list[dict]:
    """Every rank calls this; rank 0 returns the rows."""
    rank = dist.get_rank()
    rows = []
    for frames in frames_list:
        n = frames * PER_FRAME
        x = synthetic_tokens(n, D, seed=frames).to(device)
        split_s, single_s = [], []
        res = ref = None
        for rep in range(reps + 1):  # the first rep warms up, not timed
            sync(device)
            dist.barrier()
            t0 = time.perf_counter()
            res = compute_anchor_scores(
                x, 24, process_group=dist.group.WORLD, progress=False, solver="fast"
            )
            sync(device)
            dist.barrier()
            if rep:
                split_s.append(time.perf_counter() - t0)
            if rank == 0:  # the baseline: this process alone, with every core
                if device.type == "cpu":
                    torch.set_num_threads(cores)
                t0 = time.perf_counter()
                ref = compute_anchor_scores(x, 24, progress=False, solver="fast")
                sync(device)
                if rep:
                    single_s.append(time.perf_counter() - t0)
                if device.type == "cpu":
                    torch.set_num_threads(max(1, cores // world))
            dist.barrier()
        if rank == 0:
            med_split, lo_split, hi_split = median_spread(split_s)
            med_one, lo_one, hi_one = median_spread(single_s)
            rows.append({
                "frames": frames, "n": n, "d": D, "world": world,
                "seconds_split": med_split, "seconds_split_p20_p80": [lo_split, hi_split],
                "seconds_one_process": med_one, "seconds_one_process_p20_p80": [lo_one, hi_one],
                "speedup_split": med_one / med_split,
                "max_abs_score_diff": float((res.scores - ref.scores).abs().max()),
                "labels_equal": bool(torch.equal(res.labels.cpu(), ref.labels.cpu())),
                "stages_split_rank0": dict(res.timings), "stages_one_process": dict(ref.timings),
                "reps": reps, "figures": f"measured on {device.type}",
            })  # fmt: skip
    return rows


def _cpu_rank(rank, world, store, args, cores, out):
    torch.set_num_threads(max(1, cores // world))
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=timedelta(minutes=30))  # fmt: skip
    try:
        rows = measure(args.frames, args.reps, torch.device("cpu"), cores, world)
        if rank == 0:
            torch.save(rows, out)
    finally:
        dist.destroy_process_group()


def main(argv=None):
    p = parser(__doc__.split("\n")[0], quick=True)
    p.add_argument("--frames", type=int, nargs="+", default=None)
    p.add_argument("--world", type=int, default=2, help="CPU: gloo processes")
    p.add_argument("--reps", type=int, default=3)
    args = p.parse_args(argv)
    torchrun = "LOCAL_RANK" in os.environ
    cuda = torchrun and torch.cuda.is_available()
    if args.frames is None:
        args.frames = [2] if args.quick else ([4, 8] if not cuda else [8, 16, 32, 64])
    if args.quick:
        args.reps = 1
    if cuda:
        local = int(os.environ["LOCAL_RANK"])
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
        dist.init_process_group("nccl", timeout=timedelta(minutes=30))
        world = dist.get_world_size()
        rows = measure(args.frames, args.reps, device, 0, world)
        rank = dist.get_rank()
        dist.destroy_process_group()
        if rank != 0:
            return
        meta = environment(str(device))
        meta["devices"] = [torch.cuda.get_device_name(i) for i in range(world)]
    else:
        import tempfile

        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        world = args.world
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "rows.pt")
            mp.spawn(_cpu_rank, args=(world, os.path.join(tmp, "store"), args, cores, out),
                     nprocs=world)  # fmt: skip
            rows = torch.load(out)
        meta = environment("cpu")
        meta["threads_per_rank"] = max(1, cores // world)
        meta["threads_one_process"] = cores
    meta.update(world_size=world, quick=args.quick, command=" ".join(sys.argv))
    finish("split_quick" if args.quick else "split", meta, rows, args.out_dir,
           ["frames", "n", "world", "seconds_split", "seconds_one_process", "speedup_split",
            "max_abs_score_diff", "labels_equal"])  # fmt: skip


if __name__ == "__main__":
    main()
