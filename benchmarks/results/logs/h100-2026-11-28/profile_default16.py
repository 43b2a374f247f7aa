"""The script of profile_default16.txt (run from the tree's root on the H100, 2026-11-28, at
5851f44): the default and the fast solver at 16 frames, 3 interleaved warm calls each, on
video-like tokens and on the dense set, then a torch profile of one default call of each
(as run, less a print of the result's history, which was empty: the "[]" in the log)."""

import sys
import time

import torch

sys.path.insert(0, ".")
from benchmarks.common import synthetic_tokens, video_tokens  # noqa: E402
from videoanchor.anchor import compute_anchor_scores  # noqa: E402

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
