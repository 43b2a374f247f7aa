"""Tensor-parallel prefill (transformers' ``tp_plan="auto"``): videoanchor_triton vs SDPA.

Run under torchrun, one process per GPU (world size 1 is the single-GPU baseline, loaded
without ``tp_plan``):

    torchrun --nproc_per_node 1 benchmarks/bench_tp.py --out-dir OUT
    torchrun --nproc_per_node 2 benchmarks/bench_tp.py --out-dir OUT
    torchrun --nproc_per_node 4 benchmarks/bench_tp.py --out-dir OUT

A random-weight Qwen2.5-VL with the 7B (default; 28 query / 4 KV heads, so TP 2 and 4) or
72B (``--dims 72b``; 64 / 8 heads) text dimensions and ``--layers`` decoder layers is built
on rank 0, saved to ``--model-dir`` and loaded by every rank. One video of ``--frames``
448x448 frames (16 frames: 2048 visual tokens). Providers, on the same model in the same
processes, interleaved rep by rep:

  sdpa         transformers' SDPA, unanchored (what TP users run today)
  videoanchor  attn_implementation="videoanchor_triton": the fast SSC split over the ranks
               by columns, or (``--frames`` beyond the dense limit, or ``--force-blocked``)
               the blocked solver spread over the ranks (configure's process_group="auto");
               the fused anchored kernel on each rank's own heads

Timing: a fixed number of reps on every rank (collectives inside the forward forbid
per-rank adaptive counts such as triton.testing.do_bench's), each rep between a device
synchronise and a barrier, host clock; median and 20/80 percentiles of rank 0. Also
recorded: SSC time on rank 0, the time spent in the request check and the score
broadcast (``share_ms``, rank 0), whether every rank applied identical scores, and the
top-5 next-token ids (compare them across world sizes: same weights, same input).
Without CUDA it runs a tiny CPU configuration over gloo so the script can be checked
anywhere (numbers not meaningful).
"""

from __future__ import annotations

import os
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import videoanchor  # noqa: E402
import videoanchor.integrations.transformers.scoring as integration  # noqa: E402
from benchmarks.bench_integration import (  # noqa: E402
    QWEN25_VL_7B_TEXT,
    QWEN25_VL_7B_VISION,
    TINY_TEXT,
    TINY_VISION,
    build_model,
    make_inputs,
    prefill_row,
)
from benchmarks.common import environment, finish, median_spread, parser  # noqa: E402

QWEN25_VL_72B_TEXT = dict(
    QWEN25_VL_7B_TEXT,
    hidden_size=8192,
    intermediate_size=29568,
    num_attention_heads=64,
    num_key_value_heads=8,
)
QWEN25_VL_72B_VISION = dict(QWEN25_VL_7B_VISION, out_hidden_size=8192)


class ShareTimer:
    """Host time spent in the request check and the score broadcast, SSC excluded (the SSC
    runs inside shared_scores and is timed apart; on ranks other than 0 this includes the
    wait for rank 0's SSC where it runs alone; the split and blocked solvers' own
    collectives count as SSC)."""

    def __init__(self):
        self.seconds = 0.0
        self._check, self._score = integration.check_same_request, integration.shared_scores

        def check(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return self._check(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - t0

        def score(group, compute, device, spread=None):
            inner = [0.0]

            def timed_compute(**kw):
                t1 = time.perf_counter()
                try:
                    return compute(**kw)
                finally:
                    inner[0] += time.perf_counter() - t1

            t0 = time.perf_counter()
            try:
                return self._score(group, timed_compute, device, spread=spread)
            finally:
                self.seconds += time.perf_counter() - t0 - inner[0]

        integration.check_same_request, integration.shared_scores = check, score


def timed(fn, cuda: bool, warmup: int, reps: int) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(reps):
        if cuda:
            torch.cuda.synchronize()
        if dist.is_initialized():
            dist.barrier()
        t0 = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        out.append(1e3 * (time.perf_counter() - t0))
    return out


def load(args, world: int, device: str):
    from transformers import AutoModelForImageTextToText

    text, vision = {
        "7b": (QWEN25_VL_7B_TEXT, QWEN25_VL_7B_VISION),
        "72b": (QWEN25_VL_72B_TEXT, QWEN25_VL_72B_VISION),
        "tiny": (TINY_TEXT, TINY_VISION),
    }[args.dims]
    path = Path(args.model_dir or f"/tmp/videoanchor_bench_tp_{args.dims}_{args.layers}")
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0 and not (path / "config.json").exists():
        model = build_model(text, vision, args.layers, args.vision_layers, args.dtype, "cpu")
        model.save_pretrained(path)
        del model
    if dist.is_initialized():
        dist.barrier()
    kwargs = {"tp_plan": "auto"} if world > 1 else {"device_map": device}
    model = AutoModelForImageTextToText.from_pretrained(
        path, attn_implementation="videoanchor_triton", dtype=args.dtype, **kwargs
    ).eval()
    return model


def main(argv=None):
    p = parser(__doc__.split("\n")[0], quick="16 frames only")
    p.add_argument("--dims", default="7b", choices=["7b", "72b", "tiny"])
    p.add_argument("--layers", type=int, default=4, help="decoder layers")
    p.add_argument("--vision-layers", type=int, default=4)
    p.add_argument("--frames", type=int, nargs="+", default=[16, 64])
    p.add_argument("--side", type=int, default=448)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--model-dir", default=None, help="where rank 0 saves the random model")
    p.add_argument("--tiny", action="store_true", help="tiny CPU configuration (no CUDA)")
    p.add_argument(
        "--force-blocked",
        action="store_true",
        help="score with the blocked solver spread over the ranks at every size "
        "(configure's ssc_mode='blocked')",
    )
    args = p.parse_args(argv)
    if args.quick:
        args.frames = [16]
    cuda = torch.cuda.is_available() and not args.tiny
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if not cuda:
        print("no CUDA device (or --tiny): tiny CPU configuration over gloo, not meaningful")
        args.dims, args.dtype, args.frames, args.side, args.vision_layers = (
            "tiny", "float32", [4], 56, 1,
        )  # fmt: skip
    args.dtype = getattr(torch, args.dtype)
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = f"cuda:{local}" if cuda else "cpu"
    if cuda:
        torch.cuda.set_device(local)
    if world > 1:
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(minutes=30))
    rank = dist.get_rank() if dist.is_initialized() else 0
    meta = environment(device)
    import transformers

    meta.update(
        transformers=transformers.__version__,
        command=" ".join(sys.argv),
        world_size=world,
        devices=[torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        if cuda
        else [],
    )
    model = load(args, world, device)
    videoanchor.configure(model, ssc_mode="blocked" if args.force_blocked else "auto")
    handle = videoanchor.integrations.transformers.find_handle(model)
    timer = ShareTimer()
    rows = []
    with torch.no_grad():
        for frames in args.frames:
            inputs, n_visual = make_inputs(model, frames, args.side, 16, 32, device, args.dtype)
            fwd = lambda inputs=inputs: model(**inputs, use_cache=False, logits_to_keep=1)  # noqa: E731
            times = {"sdpa": [], "videoanchor": []}
            top5 = {}
            for provider in times:
                model.set_attn_implementation(
                    "sdpa" if provider == "sdpa" else "videoanchor_triton"
                )
                top5[provider] = fwd().logits[0, -1].float().topk(5).indices.tolist()
            timer.seconds = 0.0
            for _ in range(args.reps):  # interleaved, one rep each
                for provider in times:
                    model.set_attn_implementation(
                        "sdpa" if provider == "sdpa" else "videoanchor_triton"
                    )
                    times[provider] += timed(
                        fwd, cuda, args.warmup if not times[provider] else 0, 1
                    )
            ssc = handle.last_result[0]
            share_ms = 1e3 * timer.seconds / (args.reps + args.warmup)
            scores = handle.last_scores.double()
            mine = torch.tensor([scores.sum().item(), (scores * scores).sum().item()])
            every = [torch.zeros(2, dtype=torch.float64) for _ in range(world)]
            if world > 1:
                dist.all_gather(every, mine.double().to(device))
                every = [e.cpu() for e in every]
            else:
                every = [mine.double()]
            identical = all(torch.equal(e, every[0]) for e in every)
            for provider, ms in times.items():
                row = {
                    "dims": args.dims,
                    "decoder_layers": args.layers,
                    "world_size": world,
                    "frames": frames,
                    **prefill_row(inputs, n_visual, args.dtype, provider, median_spread(ms)),
                    "top5_next_tokens": top5[provider],
                }
                if provider == "videoanchor":
                    row["ssc_mode"] = ssc.mode
                    row["ssc_iterations"] = ssc.iterations
                    row["ssc_ms"] = 1e3 * ssc.timings.get("total", float("nan"))
                    row["share_ms"] = share_ms
                    row["scores_identical_across_ranks"] = identical
                rows.append(row)
            sdpa = rows[-2]["prefill_ms"]
            rows[-1]["vs_sdpa"] = rows[-1]["prefill_ms"] / sdpa
    meta["loadavg_end"] = os.getloadavg()
    if rank == 0:
        name = f"tp{world}" + ("_blocked" if args.force_blocked else "")
        name += "" if cuda else "_cpu_smoke"
        finish(name, meta, rows, args.out_dir,
               ["world_size", "visual_tokens", "provider", "prefill_ms", "p20_ms", "p80_ms",
                "vs_sdpa", "ssc_mode", "ssc_ms", "share_ms", "scores_identical_across_ranks"])  # fmt: skip
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
