"""The torch profile of the default anchor scores at 16 frames on a GPU, in the layout that
issue 76's cost model (``benchmarks/model_workset_cuda.py``, retired with issue 90) read: the default (``solver="auto"``) and the
fast solver, 3 interleaved warm calls each, on video-like tokens (``video16``, Qwen2.5-VL-7B
shapes) and on the dense set (``dense16``), then a torch profile of one default call of
each (a ``== NAME`` line, the call's timings, the operators by CUDA time and by CPU time).

It wrote ``benchmarks/results/logs/h100-2026-11-28/profile_default16.txt`` (at 5851f44; until
eddbdcb this script stood beside it; as run then, less a print of the result's history,
which was empty: the ``[]`` in that file). Run from the repository root, on a GPU::

    python -m benchmarks.experiments.profile_default16 > profile_default16.txt
"""

from __future__ import annotations

import argparse
import time

import torch

from benchmarks.common import synthetic_tokens, video_tokens
from videoanchor.anchor import compute_anchor_scores


def main(argv=None) -> None:
    argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args(argv)
    dev = torch.device("cuda")
    xs = {
        "video16": (video_tokens(16, 128, 3584, k=8, seed=0).to(dev), 8),
        "dense16": (synthetic_tokens(2048, 3584, seed=16).to(dev), 24),
    }
    for name, (x, k) in xs.items():
        for s in ("auto", "fast"):
            compute_anchor_scores(x, k, solver=s, progress=False)
        for rep in range(3):
            for s in ("auto", "fast"):
                torch.cuda.synchronize()
                t = time.perf_counter()
                r = compute_anchor_scores(x, k, solver=s, progress=False)
                torch.cuda.synchronize()
                print(name, s, rep, round(time.perf_counter() - t, 4), r.solver, r.strategy,
                      {a: round(b, 4) for a, b in r.timings.items()}, flush=True)  # fmt: skip
        acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        with torch.profiler.profile(activities=acts) as prof:
            r = compute_anchor_scores(x, k, progress=False)
            torch.cuda.synchronize()
        print("==", name, r.timings)
        avg = prof.key_averages()
        print(avg.table(sort_by="self_cuda_time_total", row_limit=25, max_name_column_width=60))
        print(avg.table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=60))


if __name__ == "__main__":
    main()
