"""A/B of the GPU working sets' kernel in one process (2026-11-28): the tree's kernel, whose
sweeps weight each row tile by the vector's rows and sum once after the sweep ("new", at
tiles of 2048 and 1024 elements), against the module as it was before that change
("old", ``workset_cuda_old.py`` beside this script, tile 2048), alternated, on the
benchmark's video-like tokens (Qwen2.5-VL-7B shapes). Each solve's certificate (the largest
column gap, float64 on the device) and the two answers' largest difference are recorded.

    python ab_kernel.py OUT_DIR      # from the tree's root, on a GPU
"""

import importlib.util
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, ".")
from benchmarks.common import environment, video_tokens  # noqa: E402
from videoanchor.anchor import workset_cuda as new  # noqa: E402
from videoanchor.anchor.program import column_gaps  # noqa: E402

here = Path(__file__).resolve().parent
spec = importlib.util.spec_from_file_location(
    "videoanchor.anchor.workset_cuda_old", here / "workset_cuda_old.py"
)
old = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = old
spec.loader.exec_module(old)

dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# (without a GPU: tiny shapes through Triton's interpreter, to check the script itself)
FRAMES, PER_FRAME, D = ((16, 32, 64), 128, 3584) if dev.type == "cuda" else ((2,), 12, 24)
configs = [("old", old, 2048), ("new", new, 2048), ("new", new, 1024)]
sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
meta = environment(dev.type)
meta["git_sha"] = os.environ.get("VIDEOANCHOR_GIT_SHA", meta.get("git_sha"))
meta["warm_up_s"] = {}
for name, mod, tile in configs:
    t = time.perf_counter()
    mod.warm_up(dev, tile=tile)
    meta["warm_up_s"][f"{name}_{tile}"] = time.perf_counter() - t
rows = []
for frames in FRAMES:
    x = video_tokens(frames, PER_FRAME, D, k=max(2, frames // 2), seed=0).to(dev)
    X = x.detach().to(torch.float64).T
    coefs = {}
    for rep in range(3 if frames < 64 else 2):
        for name, mod, tile in configs:
            sync()
            t = time.perf_counter()
            out = mod.solve_workset_cuda(x, tile=tile)
            sync()
            took = time.perf_counter() - t
            gap = column_gaps(X, out["coef"], out["lambda_e"], out["lambda_z"]).max_gap
            coefs[(name, tile)] = out["coef"]
            row = dict(frames=frames, n=x.shape[0], kernel=name, tile=tile, rep=rep,
                       seconds=took, passes=out["passes"], converged=out["converged"],
                       gap=float(gap), wide_columns=out["wide_columns"],
                       steps_max=int(out["steps"].max()))  # fmt: skip
            rows.append(row)
            print(row, flush=True)
    ref = coefs[("old", 2048)]
    for key, c in coefs.items():
        if key != ("old", 2048):
            d = float((c - ref).abs().max())
            rows.append(dict(frames=frames, kernel=key[0], tile=key[1], max_abs_vs_old=d))
            print(frames, key, "max |C - C_old|", d, flush=True)
out_dir = Path(sys.argv[1] if len(sys.argv) > 1 else ".")
(out_dir / "ab_kernel.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
for frames in FRAMES:
    for name, _, tile in configs:
        s = sorted(r["seconds"] for r in rows if r.get("seconds") and r["frames"] == frames
                   and r["kernel"] == name and r["tile"] == tile)  # fmt: skip
        print(frames, name, tile, "median", s[len(s) // 2], "all", [round(v, 4) for v in s])
