"""Long videos (issue 99): ``compute_anchor_scores`` with default options on
video-like tokens (8 x 16 patches a frame, D = 512, or ``--dim``) of 16 to 256 frames, N = 2k
to 32k.

Below ``EXACT_MAX_TOKENS`` the default is the dense working sets (exact mode); past it the
working sets by blocks (route ``workset_blocks``, issue 99). Below it the blocks
(``mode="blocked", solver="workset"``) run beside the default, and their labels and scores
are compared with the default's; ``plan`` is the route that ran (the result's strategy). Each (N, route) runs in a fresh subprocess (the kernel loaded by a small call
first): wall seconds of the call, the peak resident set's growth during it (Linux's VmHWM,
reset through /proc/self/clear_refs, minus VmRSS before the call), the float64 answer's
relative duality gap (``residual``) and the returned C's (``gap``). The load average goes in
every row: the machine may be shared. The rows are written as each run ends.

With ``--device cuda`` the tokens are made on the GPU (issue 99 item 4, ``run_gpu.sh
CALL=long``): the seconds end after the device's work (synchronised), ``peak_mib`` is the
device's allocated peak above what the call started with (``torch.cuda``'s statistics), and
the default there is the CUDA working sets below the limit and the authors' iteration,
column-blocked on the device, past it; the blocks (``solver="workset"``) solve on the host.

    python benchmarks/bench_long_video.py --frames 16,32,64      # N = 2048, 4096, 8192
    python benchmarks/bench_long_video.py --frames 16,32,64,160 --blocks-frames 16,32,64
    python benchmarks/bench_long_video.py --frames 16,32 --routes blocks,blocks2 \
        --name long_video_ranks
    python benchmarks/bench_long_video.py --frames 16,32,64,160 --default-frames 16,32,64 \
        --timeout 1500
    python benchmarks/bench_long_video.py --frames 16,32 --dim 3584 --name long_video_d3584
    python benchmarks/bench_long_video.py --device cuda --frames 64,128,256 \
        --default-frames 64,128 --timeout 150
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (  # noqa: E402
    environment,
    finish,
    parser,
    peak_rss_growth,
    sync,
    video_tokens,
    write_result,
)

PATCHES = 128
D = int(os.environ.get("BENCH_DIM", "512"))  # --dim, passed to each run's process
DEVICE = os.environ.get("BENCH_DEVICE", "cpu")  # --device, passed to each run's process
COLUMNS = ["frames", "n", "d", "route", "plan", "seconds", "peak_mib", "residual", "gap", "rounds",
           "same_labels", "scores_max_diff", "loadavg"]  # fmt: skip


def _call(frames: int, kw: dict, barrier=None) -> tuple:
    """One timed ``compute_anchor_scores`` call on the first ``frames`` frames after a
    warm-up (the kernel loaded): ``(x, result, seconds, peak growth)``; ``barrier`` (a
    process group's) lines the ranks up before the clock starts and before it stops."""
    import torch

    from videoanchor.anchor import compute_anchor_scores

    x = video_tokens(frames, PATCHES, D, seed=0).to(DEVICE)
    compute_anchor_scores(video_tokens(2, 64, D, seed=1).to(DEVICE), **kw)  # the kernel loaded
    if barrier:
        barrier()

    def run():
        sync(DEVICE)
        t = time.perf_counter()
        res = compute_anchor_scores(x, **kw)
        sync(DEVICE)
        if barrier:
            barrier()
        return res, time.perf_counter() - t

    if x.is_cuda:  # the device's memory, not the host's
        torch.cuda.reset_peak_memory_stats(x.device)
        before = torch.cuda.memory_allocated(x.device)
        res, seconds = run()
        return x, res, seconds, torch.cuda.max_memory_allocated(x.device) - before
    (res, seconds), peak = peak_rss_growth(run)
    return x, res, seconds, peak


def _rank(rank: int, world: int, frames: int, store: str, out: str) -> None:
    """Rank ``rank`` of ``world`` gloo processes (one torch thread each) making the call
    together (``process_group=``); its row of numbers to ``out``.rank."""
    import datetime

    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(hours=2))  # fmt: skip
    kw = {"mode": "blocked", "solver": "workset", "process_group": dist.group.WORLD}
    _, res, seconds, peak = _call(frames, kw, barrier=dist.barrier)
    if rank == 0:
        torch.save({"labels": res.labels, "scores": res.scores}, out)
    with open(f"{out}.{rank}", "w") as f:
        json.dump(dict(seconds=seconds, peak=peak, residual=res.residual, gap=res.gap,
                       rounds=res.iterations, timings=res.timings), f)  # fmt: skip
    dist.barrier()
    dist.destroy_process_group()


def one(frames: int, route: str) -> dict:
    """One call: ``route`` ``"default"`` (default options), ``"blocks"`` (``mode="blocked",
    solver="workset"``) in this process, or ``"blocks2"`` (the same over 2 gloo processes
    of one thread each, spawned from this one: the slowest rank's seconds, the ranks' peak
    growths summed), on the first ``frames`` frames."""
    import torch

    if route == "blocks2":
        if DEVICE != "cpu":
            raise ValueError(
                f"route blocks2 (gloo processes) runs on the CPU, got --device {DEVICE}"
            )
        import tempfile

        import torch.multiprocessing as mp

        out = os.environ["BENCH_OUT"]
        with tempfile.TemporaryDirectory() as tmp:
            mp.spawn(_rank, args=(2, frames, f"{tmp}/store", out), nprocs=2, join=True)
        ranks = []
        for r in range(2):
            with open(f"{out}.{r}") as f:
                ranks.append(json.load(f))
            os.unlink(f"{out}.{r}")
        first = ranks[0]
        return dict(frames=frames, n=frames * PATCHES, d=D, route=route,
                    seconds=max(r["seconds"] for r in ranks),
                    peak_mib=sum(r["peak"] for r in ranks) / 2**20, residual=first["residual"],
                    gap=first["gap"], rounds=first["rounds"], timings=first["timings"],
                    plan="workset_blocks",
                    threads=1, processes=2, loadavg=os.getloadavg())  # fmt: skip
    kw = {} if route == "default" else {"mode": "blocked", "solver": "workset"}
    x, res, seconds, peak = _call(frames, kw)
    torch.save({"labels": res.labels.cpu(), "scores": res.scores.cpu()}, os.environ["BENCH_OUT"])
    return dict(frames=frames, n=x.shape[0], d=D, device=DEVICE, route=route, plan=res.strategy,
                seconds=seconds,
                peak_mib=peak / 2**20, residual=res.residual, gap=res.gap,
                rounds=res.iterations, solver=res.solver, cluster_share=res.cluster_share,
                share_weight=res.share_weight, timings=res.timings,
                threads=torch.get_num_threads(), loadavg=os.getloadavg())  # fmt: skip


def main() -> None:
    ap = parser(__doc__, device=True)
    ap.add_argument("--frames", default="16,32,64,128,160,256")
    ap.add_argument(
        "--routes",
        default="default,blocks",
        help="default, blocks and/or blocks2 (the blocks over 2 gloo processes of one thread)",
    )
    ap.add_argument(
        "--blocks-frames",
        default="",
        help="the frames at which the blocks run (default: all)",
    )
    ap.add_argument(
        "--default-frames",
        default="",
        help="the frames at which the default runs (default: all)",
    )
    ap.add_argument(
        "--timeout",
        type=float,
        default=None,
        help="seconds a run may take; one past it is stopped and recorded unfinished",
    )
    ap.add_argument(
        "--name",
        default="long_video",
        help="the result's area (long_video_ranks: the blocks over processes beside one)",
    )
    ap.add_argument("--dim", type=int, default=512, help="the tokens' features, D")
    ap.add_argument("--one", nargs=2, help=argparse_hidden())
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(int(args.one[0]), args.one[1])))
        return
    import torch

    device = args.device or "cpu"
    meta = environment(device)
    rows = []
    tmp = Path(os.environ.get("TMPDIR", "/tmp"))
    for frames in (int(f) for f in args.frames.split(",")):
        outs = {}
        for route in args.routes.split(","):
            only = args.default_frames if route == "default" else args.blocks_frames
            if only and str(frames) not in only.split(","):
                continue
            out = tmp / f"bench_long_video_{os.getpid()}_{frames}_{route}.pt"
            env = {**os.environ, "BENCH_OUT": str(out), "BENCH_DIM": str(args.dim),
                   "BENCH_DEVICE": device}  # fmt: skip
            try:
                proc = subprocess.run([sys.executable, __file__, "--one", str(frames), route],
                                      capture_output=True, text=True, env=env,
                                      timeout=args.timeout)  # fmt: skip
            except subprocess.TimeoutExpired:
                rows.append(dict(frames=frames, n=frames * PATCHES, d=args.dim, route=route,
                                 error=f"stopped unfinished after {args.timeout:g} s (--timeout)",
                                 loadavg=os.getloadavg()))  # fmt: skip
                print(json.dumps(rows[-1]), flush=True)
                write_result(args.name, meta, rows, args.out_dir)
                continue
            if proc.returncode != 0:
                print(proc.stderr[-3000:], file=sys.stderr)
                rows.append(dict(frames=frames, d=args.dim, route=route, error=proc.stderr[-500:]))
                write_result(args.name, meta, rows, args.out_dir)
                continue
            row = json.loads(proc.stdout.strip().splitlines()[-1])
            outs[route] = torch.load(out)
            out.unlink()
            if route != "default" and "default" in outs:
                row["same_labels"] = bool(torch.equal(outs[route]["labels"],
                                                      outs["default"]["labels"]))  # fmt: skip
                row["scores_max_diff"] = float((outs[route]["scores"] -
                                                outs["default"]["scores"]).abs().max())  # fmt: skip
            rows.append(row)
            print(json.dumps({k: row.get(k) for k in COLUMNS}), flush=True)
            write_result(args.name, meta, rows, args.out_dir)  # (each row as it ends)
    finish(args.name, meta, rows, args.out_dir, COLUMNS)


def argparse_hidden():
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    main()
