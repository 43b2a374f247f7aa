"""Batched evaluation through the lmms-eval wrapper: batch_size=B vs batch_size=1.

A tiny random Qwen2.5-VL (saved with the test suite's tokenizer and remote-code processor,
tests/test_cli_support.py) answers the same list of video requests, greedily, once with
``batch_size=1`` and once with ``batch_size=B``; both wrappers live in one process and
the rounds alternate (1, B, 1, B, ...), so load on the machine hits both alike. Reported:
median seconds per full pass, requests per second, the speedup, and whether the answers
are identical (they must be: SSC runs per sample). On a GPU the model is too small to say
anything about a real checkpoint; the number shows what batching removes from the per
request overhead (one generate loop and one processor call per batch instead of per request).

    python benchmarks/bench_lmms_batch.py            # 16 requests, B = 4 and 8, 3 rounds
    python benchmarks/bench_lmms_batch.py --quick    # 8 requests, B = 4, 2 rounds
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
import types
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
from benchmarks.common import environment, finish, parser  # noqa: E402


def _requests(paths, questions, max_new_tokens):
    docs = [{"video": str(p), "question": q} for p, q in zip(paths, questions, strict=True)]
    task_dict = {"bench": {"test": docs}}

    def doc_to_visual(doc):
        return [doc["video"]]

    reqs = [
        types.SimpleNamespace(
            args=(
                d["question"],
                {"max_new_tokens": max_new_tokens},
                doc_to_visual,
                i,
                "bench",
                "test",
            )
        )
        for i, d in enumerate(docs)
    ]
    return reqs, task_dict


def main(argv=None) -> int:
    ap = parser(__doc__.splitlines()[0], quick=True)
    ap.add_argument("--requests", type=int, default=None)
    ap.add_argument("--frames", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    args = ap.parse_args(argv)
    n_req = args.requests or (8 if args.quick else 16)
    batches = [4] if args.quick else [4, 8]
    rounds = 2 if args.quick else 3

    from test_cli_support import moving_shapes, save_tiny_checkpoint

    from videoanchor.lmms_eval import VideoAnchorLMMCore
    from videoanchor.video import write_video

    meta = environment()
    meta["loadavg_start"] = os.getloadavg()
    meta["torch_threads"] = torch.get_num_threads()
    tmp = Path(tempfile.mkdtemp(prefix="bench_lmms_batch_"))
    save_tiny_checkpoint("qwen2_5_vl", tmp / "ckpt")
    paths = []
    for i in range(n_req):
        path = tmp / f"v{i}.mp4"
        write_video(path, moving_shapes(10 + i % 5, 64, 96, seed=i), fps=10)
        paths.append(path)
    questions = [f"what happens in clip {i}?" + " tell me more" * (i % 3) for i in range(n_req)]
    reqs, task_dict = _requests(paths, questions, args.max_new_tokens)

    def make(bs):
        lm = VideoAnchorLMMCore(
            pretrained=str(tmp / "ckpt"), trust_remote_code=True, device="cpu",
            max_num_frames=args.frames, n_clusters=4, batch_size=bs,
        )  # fmt: skip
        lm.task_dict = task_dict
        return lm

    single = make(1)
    single.generate_until(reqs[:2])  # warm-up
    rows = []
    for bs in batches:
        batched = make(bs)
        batched.generate_until(reqs[:bs])  # warm-up
        times = {1: [], bs: []}
        answers = {}
        for _ in range(rounds):
            for lm, key in ((single, 1), (batched, bs)):
                t0 = time.perf_counter()
                answers[key] = lm.generate_until(reqs)
                times[key].append(time.perf_counter() - t0)
        t1, tb = statistics.median(times[1]), statistics.median(times[bs])
        rows.append(
            {
                "model": "tiny qwen2_5_vl (random, hidden 32)",
                "requests": n_req,
                "frames": args.frames,
                "max_new_tokens": args.max_new_tokens,
                "batch_size": bs,
                "single_s": round(t1, 4),
                "batched_s": round(tb, 4),
                "single_s_all": [round(t, 4) for t in times[1]],
                "batched_s_all": [round(t, 4) for t in times[bs]],
                "single_req_per_s": round(n_req / t1, 3),
                "batched_req_per_s": round(n_req / tb, 3),
                "speedup": round(t1 / tb, 3),
                "answers_equal": answers[1] == answers[bs],
            }
        )
    meta["loadavg_end"] = os.getloadavg()
    cols = ["batch_size", "requests", "single_s", "batched_s", "speedup", "answers_equal"]
    finish("lmms_batch", meta, rows, args.out_dir, cols)
    return 0 if all(r["answers_equal"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
