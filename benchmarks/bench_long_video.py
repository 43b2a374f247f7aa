"""Long videos on the CPU (issue 99): ``compute_anchor_scores`` with default options on
video-like tokens (8 x 16 patches a frame, D = 512) of 16 to 256 frames, N = 2k to 32k.

Below ``EXACT_MAX_TOKENS`` the default is the dense working sets (exact mode); past it the
authors' iteration column-blocked. The working sets by blocks (``mode="blocked",
solver="workset"``, route ``workset_blocks``: issue 99's candidate, not the default yet) run
beside it, and their labels and scores are compared with the default's. Each (N, route) runs in a fresh subprocess (the kernel loaded by a small call
first): wall seconds of the call, the peak resident set's growth during it (Linux's VmHWM,
reset through /proc/self/clear_refs, minus VmRSS before the call), the float64 answer's
relative duality gap (``residual``) and the returned C's (``gap``). The load average goes in
every row: the machine may be shared.

    python benchmarks/bench_long_video.py --frames 16,32,64      # N = 2048, 4096, 8192
    python benchmarks/bench_long_video.py --frames 16,64,160 --blocks-frames 16
    python benchmarks/bench_long_video.py --frames 16,32,64,160 --default-frames 16,32,64 \
        --timeout 1500
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

from benchmarks.common import environment, finish, parser, video_tokens  # noqa: E402

PATCHES, D = 128, 512
COLUMNS = ["frames", "n", "route", "plan", "seconds", "peak_mib", "residual", "gap", "rounds",
           "same_labels", "scores_max_diff", "loadavg"]  # fmt: skip


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))


def one(frames: int, route: str) -> dict:
    """One call in this process: ``route`` ``"default"`` (default options) or ``"blocks"``
    (``mode="blocked", solver="workset"``), on the first ``frames`` frames."""
    import torch

    from videoanchor.anchor import compute_anchor_scores

    x = video_tokens(frames, PATCHES, D, seed=0)
    kw = {} if route == "default" else {"mode": "blocked", "solver": "workset"}
    compute_anchor_scores(video_tokens(2, 64, D, seed=1), **kw)  # the kernel loaded
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _status("VmRSS:")
    t = time.perf_counter()
    res = compute_anchor_scores(x, **kw)
    seconds = time.perf_counter() - t
    peak = _status("VmHWM:") - before
    torch.save({"labels": res.labels, "scores": res.scores}, os.environ["BENCH_OUT"])
    return dict(frames=frames, n=x.shape[0], route=route, seconds=seconds,
                peak_mib=peak / 2**20, residual=res.residual, gap=res.gap,
                rounds=res.iterations, solver=res.solver, cluster_share=res.cluster_share,
                share_weight=res.share_weight, timings=res.timings,
                threads=torch.get_num_threads(), loadavg=os.getloadavg())  # fmt: skip


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--frames", default="16,32,64,128,160,256")
    ap.add_argument(
        "--routes",
        default="default,blocks",
        help="default and/or blocks (the blocks where N <= 16384 only)",
    )
    ap.add_argument(
        "--blocks-frames",
        default="",
        help="the frames at which the blocks run beside the default (default: all with N <= 16384)",
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
    ap.add_argument("--one", nargs=2, help=argparse_hidden())
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(int(args.one[0]), args.one[1])))
        return
    import torch

    rows = []
    tmp = Path(os.environ.get("TMPDIR", "/tmp"))
    for frames in (int(f) for f in args.frames.split(",")):
        outs = {}
        for route in args.routes.split(","):
            only = args.blocks_frames if route == "blocks" else args.default_frames
            if only and str(frames) not in only.split(","):
                continue
            out = tmp / f"bench_long_video_{os.getpid()}_{frames}_{route}.pt"
            env = {**os.environ, "BENCH_OUT": str(out)}
            try:
                proc = subprocess.run([sys.executable, __file__, "--one", str(frames), route],
                                      capture_output=True, text=True, env=env,
                                      timeout=args.timeout)  # fmt: skip
            except subprocess.TimeoutExpired:
                rows.append(dict(frames=frames, n=frames * PATCHES, route=route,
                                 error=f"stopped unfinished after {args.timeout:g} s (--timeout)",
                                 loadavg=os.getloadavg()))  # fmt: skip
                print(json.dumps(rows[-1]), flush=True)
                continue
            if proc.returncode != 0:
                print(proc.stderr[-3000:], file=sys.stderr)
                rows.append(dict(frames=frames, route=route, error=proc.stderr[-500:]))
                continue
            row = json.loads(proc.stdout.strip().splitlines()[-1])
            row["plan"] = (
                "workset_blocks"
                if route == "blocks"
                else ("blocked" if row["n"] > 16384 else "workset")
            )
            outs[route] = torch.load(out)
            out.unlink()
            if route != "default" and "default" in outs:
                row["same_labels"] = bool(torch.equal(outs[route]["labels"],
                                                      outs["default"]["labels"]))  # fmt: skip
                row["scores_max_diff"] = float((outs[route]["scores"] -
                                                outs["default"]["scores"]).abs().max())  # fmt: skip
            rows.append(row)
            print(json.dumps({k: row.get(k) for k in COLUMNS}), flush=True)
    finish("long_video", environment("cpu"), rows, args.out_dir, COLUMNS)


def argparse_hidden():
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    main()
