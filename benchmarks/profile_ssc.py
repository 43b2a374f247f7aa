"""Where one ``compute_anchor_scores`` call spends its time, by stage and by operator.

Prints the stage timings the result carries (lambdas, factor, admm, spectral, scores) and
PyTorch profiler's top operators by device time (CUDA) or CPU time, for each solver, on
synthetic video tokens of N tokens x D features (defaults: Qwen2.5-VL-7B at 32 frames).

    python benchmarks/profile_ssc.py --n 4096 --d 3584 --device cuda
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import synthetic_tokens  # noqa: E402
from videoanchor.anchor import compute_anchor_scores  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--d", type=int, default=3584)
    ap.add_argument("--k", type=int, default=24)
    ap.add_argument("--solvers", default="faithful,fast")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--precision", default="auto", choices=("auto", "full", "fp16x3"),
                    help="the fast solver's products (the faithful solver: always full)")  # fmt: skip
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    x = synthetic_tokens(args.n, args.d, seed=0).to(device)
    cuda = device.type == "cuda"
    acts = [torch.profiler.ProfilerActivity.CPU]
    if cuda:
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    for solver in args.solvers.split(","):
        kw = dict(solver=solver, progress=False)
        if solver != "faithful":
            kw["precision"] = args.precision
        compute_anchor_scores(x, args.k, **kw)  # warm-up
        with torch.profiler.profile(activities=acts) as prof:
            res = compute_anchor_scores(x, args.k, **kw)
            if cuda:
                torch.cuda.synchronize()
        stages = ", ".join(f"{k} {v:.3f}" for k, v in res.timings.items())
        prec = f" precision={kw['precision']}" if "precision" in kw else ""
        print(f"== {solver}{prec}: N={args.n} D={args.d} iterations={res.iterations} s: {stages}")
        if cuda:  # how much of the call the device was busy (kernels' own time, summed)
            events = prof.key_averages()
            busy = sum(getattr(e, "self_device_time_total", 0) or 0 for e in events) / 1e6
            print(f"   device busy {busy:.3f} s of the call's {res.timings['total']:.3f} s")
        key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
        print(prof.key_averages().table(sort_by=key, row_limit=args.top, max_name_column_width=60))


if __name__ == "__main__":
    main()
