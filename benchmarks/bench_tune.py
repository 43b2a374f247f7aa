"""`videoanchor tune`'s sweep against a naive loop that re-runs everything per setting.

Both answer the same items under the same alpha_K x alpha_V x n_clusters grid, greedily, in
one process:

- naive: per setting, per item: decode the video, run the processor, ``generate`` from
  pixels (vision encoder, SSC, labels, language model), one prompt at a time;
- sweep: :func:`videoanchor.tune.sweep` with a fresh :class:`AnchorCache` (memory, or
  ``--cache-dir``): the vision encoder and SSC once per item, labels once per item and
  cluster count, the settings of one item batched (``--batch-size`` rows);
- warm sweep: the sweep again with the cache the first one filled (a re-run).

Reported: seconds per setting for each, the speedups, and whether the sweep's answers equal
the naive loop's (they must: the cache returns what the pipeline computes). The items are
videos of moving shapes this script writes; the model is the test suite's tiny random
Qwen2.5-VL unless ``--model`` names a real checkpoint.

    python benchmarks/bench_tune.py --quick                # CPU, tiny model (committed JSON)
    python benchmarks/bench_tune.py --model Qwen/Qwen2.5-VL-7B-Instruct --device cuda \\
        --items 8 --frames 16 --n-clusters 16,24         # GPU
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
from benchmarks.common import environment, finish, parser  # noqa: E402


def _items(tmp: Path, n: int):
    from test_cli_support import moving_shapes

    from videoanchor.tune import load_items
    from videoanchor.video import write_video

    with open(tmp / "dev.jsonl", "w") as f:
        for i in range(n):
            write_video(tmp / f"v{i}.mp4", moving_shapes(16, 64, 96, seed=i), fps=10)
            # single-character options the tiny random model writes, so some answers score
            f.write(json.dumps({"video": f"v{i}.mp4", "question": "Which shape moves?",
                                "answer": "abc"[i % 3], "options": ["s", "q", "x"]}) + "\n")  # fmt: skip
    return load_items(tmp / "dev.jsonl")


def main(argv=None) -> int:
    p = parser(__doc__.splitlines()[0], quick="4 items, 2 x 2 x 2 grid")
    p.add_argument("--model", default=None, help="checkpoint (default: the tiny random Qwen2.5-VL)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--items", type=int, default=6)
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--alpha-k", default="0,2,4,9.5")
    p.add_argument("--alpha-v", default="0,1,2.5")
    p.add_argument("--n-clusters", default="3,4")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=4)
    p.add_argument("--figure", default=None, help="also save the sweep's heat map here (PNG)")
    args = p.parse_args(argv)
    if args.quick:
        args.items, args.alpha_k, args.alpha_v = 4, "0,9.5", "0,2.5"

    import torchvision_shim

    torchvision_shim.apply()
    import videoanchor
    from videoanchor.integrations.transformers.cache import AnchorCache
    from videoanchor.pipeline import load_vlm, video_inputs
    from videoanchor.tune import (
        Setting,
        TuneOptions,
        _Answers,
        _generate,
        parse_grid,
        prompt_text,
        save_heatmaps,
        summarize,
        sweep,
    )
    from videoanchor.video import read_video_frames

    if args.device == "cpu":
        torch.set_num_threads(1)  # tiny matmuls: threads only spin on a shared machine
    tmp = Path(tempfile.mkdtemp(prefix="bench_tune_"))
    model_path = args.model
    if model_path is None:
        from test_cli_support import save_tiny_checkpoint

        model_path = str(tmp / "tiny_qwen2_5_vl")
        save_tiny_checkpoint("qwen2_5_vl", model_path)
    items = _items(tmp, args.items)
    settings = [
        Setting(a, b, k)
        for k in parse_grid(args.n_clusters, "--n-clusters", int)
        for a in parse_grid(args.alpha_k, "--alpha-k")
        for b in parse_grid(args.alpha_v, "--alpha-v")
    ]
    model, processor, handle = load_vlm(model_path, device=args.device,
                                        trust_remote_code=args.model is None)  # fmt: skip
    opts = TuneOptions(frames=args.frames, max_new_tokens=args.max_new_tokens,
                       batch_size=args.batch_size, progress=False)  # fmt: skip

    # naive: everything per setting and item
    t0 = time.perf_counter()
    naive = {}
    for s in settings:
        videoanchor.configure(model, enabled=True, alpha_k=s.alpha_k, alpha_v=s.alpha_v,
                              n_clusters=s.n_clusters)  # fmt: skip
        for it in items:
            video = read_video_frames(it.video, args.frames, progress=False)
            inputs = video_inputs(processor, video, prompt_text(it), device=model.device,
                                  dtype=model.dtype)  # fmt: skip
            (naive[(it.id, s.key)],) = _generate(model, processor, inputs, args.max_new_tokens)
    t_naive = time.perf_counter() - t0

    def run_sweep(cache_dir, out):
        cache = AnchorCache(cache_dir, model_key=model_path)
        answers = _Answers(out / "answers.jsonl", False, {"bench": 1})
        t = time.perf_counter()
        sweep(model, processor, handle, cache, items, settings, answers, opts)
        dt = time.perf_counter() - t
        answers.close()
        return dt, answers.done, cache.stats.counts

    cache_dir = tmp / "cache"
    t_cold, done, stats_cold = run_sweep(cache_dir, tmp / "cold")
    t_warm, done_warm, stats_warm = run_sweep(cache_dir, tmp / "warm")
    same = all(done[(it.id, s.key)]["answer"] == naive[(it.id, s.key)]
               for it in items for s in settings)  # fmt: skip
    same_warm = all(done_warm[k]["answer"] == done[k]["answer"] for k in done)
    # the sweep also answers each item once unanchored (the baseline): counted in its time
    n = len(settings)
    row = {
        "model": "tiny random qwen2_5_vl" if args.model is None else args.model,
        "items": len(items), "settings": n, "frames": args.frames,
        "batch_size": args.batch_size, "max_new_tokens": args.max_new_tokens,
        "naive_s_per_setting": t_naive / n, "sweep_s_per_setting": t_cold / n,
        "warm_sweep_s_per_setting": t_warm / n, "speedup_cold": t_naive / t_cold,
        "speedup_warm": t_naive / t_warm, "answers_equal_naive": same,
        "warm_answers_equal_cold": same_warm, "cache_cold": stats_cold, "cache_warm": stats_warm,
        "sweep_includes_baseline_pass": True,
    }  # fmt: skip
    finish("tune", environment(args.device), [row], args.out_dir,
           ["items", "settings", "naive_s_per_setting", "sweep_s_per_setting",
            "warm_sweep_s_per_setting", "speedup_cold", "speedup_warm", "answers_equal_naive"])  # fmt: skip
    if args.figure:
        rows = summarize(items, settings, done)
        fig = Path(args.figure)
        fig.parent.mkdir(parents=True, exist_ok=True)
        for png in save_heatmaps(rows, tmp, title="tiny random Qwen2.5-VL"):
            target = fig if png.name.endswith(f"k{settings[-1].n_clusters}.png") else None
            if target is not None:
                target.write_bytes(png.read_bytes())
                print(f"wrote {target}")
    return 0 if same and same_warm else 1


if __name__ == "__main__":
    sys.exit(main())
