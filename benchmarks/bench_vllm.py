"""Serving throughput of the vLLM plugin: anchored against plain vLLM on the same engine
settings, and the stall a new video's SSC puts on the decode steps of running requests.

Each engine runs in its own process (one ``LLM`` per process; "plain" is the same settings
without ``additional_config["videoanchor"]``). Measured per engine:

- ``requests/s`` and ``output tokens/s`` for N concurrent video requests (one ``generate``
  call, greedy, ``--max-tokens`` each, ``ignore_eos``);
- the stall: M text requests decode; a new video request arrives; the duration of each
  ``LLMEngine.step()`` is recorded until the video's first token. The largest of them is the
  longest the running requests waited for a token (``largest_step_s``); ``stall_s`` is it
  minus the median decode step before the video arrived; ``video_ttft_s`` the video's time to
  first token; ``steps_before_video_prefill`` how many steps ran while its scores were being
  computed ahead (0 in the step or plain);
- the same with the same video asked again with another question (``repeat_*``): anchored,
  the engine's score cache answers it, so no SSC runs.

Engines: ``plain`` (no plugin options), ``anchored`` (the plugin's defaults: scores computed
ahead of the step, beside the running requests), ``in_step`` (``scores_ahead: false``: the
SSC runs inside the step that reaches the video, as before scores ahead existed) and
``split`` (``scores_ahead_split: true``: under tensor parallelism, each request's SSC split
over the ranks instead of run on one). ``--engines`` picks them (the first is the baseline of
the ratios), ``--tp`` the tensor-parallel size; the tensor-parallel comparison of one rank
per request against the split:
    python benchmarks/bench_vllm.py --tp 2 --engines anchored,split --frames 16 --size 112

CPU (in the vLLM venv of .ci/run; builds the tiny checkpoint of tests/vllm_support.py; the
README's options, vLLM's default process layout, 384 visual tokens per video):
    python benchmarks/bench_vllm.py --frames 8 --size 224
In vLLM's default layout the engine core runs in a process of its own, so a step's time is
the time ``LLMEngine.step()`` waits for its outputs, and ``steps_before_video_prefill`` is
not known (None; ``--layout in-process`` reads it from the scheduler).
GPU (a CUDA build of vllm 0.32; anchored runs the plugin's CUDA backend, a TRITON_ATTN
subclass with CUDA graphs on; plain is whatever vLLM picks, e.g. FLASH_ATTN; benchmarks/
run_gpu.sh runs this with a local checkpoint in VIDEOANCHOR_QWEN25VL_7B):
    python benchmarks/bench_vllm.py --model Qwen/Qwen2.5-VL-7B-Instruct --frames 16 \\
        --size 336 --requests 16 --max-tokens 64 --dtype bfloat16 --n-clusters 24
Beside a busy process (issue 53; ``bench_contention``'s neighbours, started before the first
engine and stopped after the last, so the baseline runs beside it too):
    python benchmarks/bench_vllm.py --frames 8 --size 224 --busy spin
Writes benchmarks/results/vllm_<device>.json (vllm_tp<N>_<device>.json with ``--tp N``,
vllm_busy_<kind>_<device>.json with ``--busy``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
TESTS = HERE.parent / "tests"


def _frames(n, seed, size):
    sys.path.insert(0, str(TESTS))
    from test_cli_support import moving_shapes

    return moving_shapes(n, size, size * 3 // 2, seed=seed)


def _video(args, seed, frames=None):
    """A video of ``frames`` frames (default: the first of ``--frames``) of seed ``seed``."""
    frames = frames or args.frames[0]
    meta = {"fps": 4.0, "total_num_frames": frames, "duration": frames / 4.0,
            "frames_indices": list(range(frames)), "video_backend": "opencv"}  # fmt: skip
    return (_frames(frames, seed, args.size), meta)


def _prompt(args, kind):
    if kind == "video":
        return ("<|im_start|>user\n<|vision_start|><|video_pad|><|vision_end|>Describe the "
                "video.<|im_end|>\n<|im_start|>assistant\n")  # fmt: skip
    return "<|im_start|>user\nCount from one to fifty.<|im_end|>\n<|im_start|>assistant\n"


def worker(args) -> dict:
    """One engine: throughput, then the stall measurement."""
    from vllm import LLM, SamplingParams

    engine = dict(dtype=args.dtype, max_model_len=args.max_model_len, seed=0,
                  limit_mm_per_prompt={"video": 1}, enable_prefix_caching=False,
                  tensor_parallel_size=args.tp)  # fmt: skip
    if args.cpu:
        engine.update(enforce_eager=True, gpu_memory_utilization=0.05,
                      kv_cache_memory_bytes=512 << 20)  # fmt: skip
    if args.anchored:
        # the README's options: alphas 9.5 / 2.5 and 24 clusters (the package's defaults)
        opts = {"n_clusters": args.n_clusters, "alpha_k": args.alpha_k, "alpha_v": args.alpha_v}
        if args.max_iter is not None:
            opts["max_iter"] = args.max_iter
        if args.kind == "in_step":
            opts["scores_ahead"] = False
        if args.kind == "split":
            opts["scores_ahead_split"] = True
        engine["additional_config"] = {"videoanchor": opts}
    t0 = time.perf_counter()
    llm = LLM(model=args.model, **engine)
    startup = {"loadavg": os.getloadavg(), "startup_s": time.perf_counter() - t0,
               "warm_up_s": llm.collective_rpc(_warm_up_seconds)[0]}  # fmt: skip
    if args.startup_only:
        return startup
    sp = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
    # request i: frames --frames[i % len], seed i (every video new); the warm-up's video is
    # none of them (seed 1000), so no request's scores come from the score cache
    reqs = [{"prompt": _prompt(args, "video"),
             "multi_modal_data": {"video": _video(args, s, args.frames[i % len(args.frames)])}}
            for i, s in enumerate([1000, *range(args.requests)])]  # fmt: skip
    llm.generate(reqs[:1], sp, use_tqdm=False)  # warm-up
    t = time.perf_counter()
    outs = llm.generate(reqs[1:], sp, use_tqdm=False)
    elapsed = time.perf_counter() - t
    n_out = sum(len(o.outputs[0].token_ids) for o in outs)
    pad = llm.llm_engine.model_config.hf_config.video_token_id
    tokens = [o.prompt_token_ids.count(pad) for o in outs]
    # The stall: M text requests decoding, then one new video; then the same again with the
    # same video and another question (a repeat: the score cache answers, no SSC).
    eng = llm.llm_engine
    first = _arrival(eng, args, "new", "Describe the video.")
    repeat = _arrival(eng, args, "repeat", "What moves in the video?")
    return {
        "engine": args.kind,
        "anchored": args.anchored,
        **startup,
        "requests": args.requests,
        "visual_tokens": tokens,
        "seconds": elapsed,
        "requests_per_s": args.requests / elapsed,
        "output_tokens_per_s": n_out / elapsed,
        "median_decode_step_s": first["median_decode_step_s"],
        "largest_step_s": first["largest_step_s"],
        "stall_s": first["stall_s"],
        "video_ttft_s": first["ttft_s"],
        "steps_before_video_prefill": first["steps_before_prefill"],
        "repeat_largest_step_s": repeat["largest_step_s"],
        "repeat_stall_s": repeat["stall_s"],
        "repeat_video_ttft_s": repeat["ttft_s"],
    }


def _warm_up_seconds(worker):
    """The plugin's SSC warm-up at start-up, in seconds (None: none ran, or not anchored)."""
    return worker.model_runner.__dict__.get("_videoanchor_warm_up_s")


def _arrival(eng, args, tag: str, question: str) -> dict:
    """M text requests decode; one video request (frames of seed 999) arrives. Every step
    until its first token (the one that prefills it: encoder, prefill and, in the step, its
    SSC; before it, anchored, the steps that ran while its scores were computed ahead)
    against the median decode step, and its time to first token (from add_request to the
    step that returns its first token)."""
    from vllm import SamplingParams

    dec = SamplingParams(temperature=0.0, max_tokens=args.stall_decode_tokens, ignore_eos=True)
    for i in range(args.running):
        eng.add_request(f"{tag}_run{i}", {"prompt": _prompt(args, "text")}, dec)
    for _ in range(3):  # their prefills, then steady decode
        eng.step()
    decode = []
    for _ in range(4):
        t = time.perf_counter()
        eng.step()
        decode.append(time.perf_counter() - t)
    prompt = _prompt(args, "video").replace("Describe the video.", question)
    t_add = time.perf_counter()
    eng.add_request(f"{tag}_video", {"prompt": prompt,
                                     "multi_modal_data": {"video": _video(args, 999)}},
                    SamplingParams(temperature=0.0, max_tokens=2))  # fmt: skip
    steps, ttft, before_prefill = [], None, None
    while eng.has_unfinished_requests():
        t = time.perf_counter()
        outs = eng.step()
        if ttft is None:
            steps.append(time.perf_counter() - t)
            if before_prefill is None and _video_computed(eng, f"{tag}_video"):
                before_prefill = len(steps) - 1
        if ttft is None and any(o.request_id.startswith(f"{tag}_video") and o.outputs
                                and o.outputs[0].token_ids for o in outs):  # fmt: skip
            ttft = time.perf_counter() - t_add
    median = statistics.median(decode)
    return {"median_decode_step_s": median, "largest_step_s": max(steps),
            "stall_s": max(steps) - median, "ttft_s": ttft,
            "steps_before_prefill": before_prefill}  # fmt: skip


def _video_computed(eng, prefix: str) -> bool | None:
    """Whether the video request has tokens in the KV cache yet (None: not known, the engine
    core runs in a process of its own)."""
    core = getattr(getattr(eng, "engine_core", None), "engine_core", None)
    sched = getattr(core, "scheduler", None)
    if sched is None:
        return None
    reqs = [r for rid, r in sched.requests.items() if prefix in rid]
    return not reqs or any(r.num_computed_tokens > 0 for r in reqs)


ENGINES = ("plain", "anchored", "in_step", "split")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="checkpoint (default: the tiny test model)")
    p.add_argument("--frames", default="4",
                   help="frames per video; a comma-separated list gives request i the i-th "
                   "(cycling), e.g. 4,6 for short clips of different lengths")  # fmt: skip
    p.add_argument("--size", type=int, default=56, help="frame height in pixels")
    p.add_argument("--requests", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--running", type=int, default=4, help="decoding requests for the stall")
    p.add_argument("--stall-decode-tokens", type=int, default=24)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--n-clusters", type=int, default=24, help="the README's 24")
    p.add_argument("--alpha-k", type=float, default=9.5, help="the README's 9.5")
    p.add_argument("--alpha-v", type=float, default=2.5, help="the README's 2.5")
    p.add_argument("--max-iter", type=int, default=None, help="default: the package's")
    p.add_argument("--layout", choices=("default", "in-process"), default="default",
                   help="default: vLLM's, the engine core in a process of its own; "
                   "in-process: VLLM_ENABLE_V1_MULTIPROCESSING=0")  # fmt: skip
    p.add_argument("--out-dir", default=None)
    p.add_argument("--tp", type=int, default=1, help="tensor_parallel_size of every engine")
    p.add_argument("--engines", default="plain,anchored,in_step",
                   help="comma-separated engines (the first is the ratios' baseline): "
                        f"{', '.join(ENGINES)}")  # fmt: skip
    p.add_argument("--busy", choices=("spin", "numeric"), default=None,
                   help="run every engine beside a busy process (bench_contention's "
                   "neighbours): writes vllm_busy_<kind>_<device>.json")  # fmt: skip
    p.add_argument("--numba-cache", choices=("as-is", "fresh"), default="as-is",
                   help="fresh: each anchored engine first starts alone with an empty Numba "
                   "cache (NUMBA_CACHE_DIR; start-up only, startup_empty_cache_s), then runs "
                   "with that cache warm")  # fmt: skip
    p.add_argument("--rounds", type=int, default=1,
                   help="run the engines this many times, interleaved (round 0: each engine, "
                   "then round 1, ...); each row's ratios are against its round's baseline")  # fmt: skip
    p.add_argument("--name", default=None, help="result name (default vllm[_tpN][_busy_X])")
    p.add_argument("--worker", choices=ENGINES, default=None)
    p.add_argument("--startup-only", action="store_true")
    p.add_argument("--json-out", default=None)
    args = p.parse_args()
    args.cpu = not _cuda()
    args.frames = [int(f) for f in str(args.frames).split(",")]
    engines = args.engines.split(",")
    if not engines or any(e not in ENGINES for e in engines):
        p.error(f"--engines: expected some of {', '.join(ENGINES)}, got {args.engines!r}")
    if args.worker:
        args.kind = args.worker
        args.anchored = args.worker != "plain"
        Path(args.json_out).write_text(json.dumps(worker(args)))
        return
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        from benchmarks.common import skip

        skip(
            "bench_vllm",
            "vLLM is not installed in this environment (it needs a venv of "
            "its own on a CPU: see .ci/run); run this script with that venv's python",
        )
        return
    tmp = Path(tempfile.mkdtemp(prefix="bench_vllm_"))
    if args.model is None:
        sys.path.insert(0, str(TESTS))
        import torchvision_shim  # the tiny checkpoint's real processors import torchvision

        torchvision_shim.apply()
        import vllm_support

        args.model = str(tmp / "tiny_qwen2_5_vl")
        vllm_support.save_checkpoint(args.model)
    env = dict(os.environ)
    if args.layout == "in-process":
        env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    else:  # vLLM's default; a worker function crossing to the engine core needs pickle
        env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
        env.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
    if args.cpu:  # as tests/test_vllm.py: vLLM's default thread binding stalls a shared box
        env.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
        env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONPATH"] = os.pathsep.join(
        [str(HERE.parent), str(TESTS / "vllm_site"), str(TESTS), env.get("PYTHONPATH", "")]
    )
    rows = []
    sys.path.insert(0, str(HERE.parent))
    from benchmarks.bench_contention import busy

    with busy(args.busy):  # the neighbour beside every engine, the baseline's included
        for rnd, kind in ((r, k) for r in range(args.rounds) for k in engines):
            out = tmp / f"{kind}.json"
            cmd = [sys.executable, __file__, "--worker", kind, "--json-out", str(out)]
            cmd += sys.argv[1:] if "--model" in sys.argv else sys.argv[1:] + ["--model", args.model]
            first, run_env = {}, env
            if args.numba_cache == "fresh" and kind != "plain" and rnd == 0:
                run_env = {**env, "NUMBA_CACHE_DIR": tempfile.mkdtemp(prefix="numba_", dir=tmp)}
                subprocess.run([*cmd, "--startup-only"], env=run_env, check=True)
                first = json.loads(out.read_text())
                first = {"startup_empty_cache_s": first["startup_s"],
                         "warm_up_empty_cache_s": first["warm_up_s"]}  # fmt: skip
            subprocess.run(cmd, env=run_env, check=True)
            rows.append({"round": rnd, **json.loads(out.read_text()), **first})
    # the baseline of the ratios ("plain" by default, named in their keys): its own round's
    bases = {r["round"]: r for r in rows if r["engine"] == engines[0]}
    vs = f"vs_{engines[0]}"
    for r in rows:
        r[f"ratio_{vs}"] = r["output_tokens_per_s"] / bases[r["round"]]["output_tokens_per_s"]
    import vllm

    from benchmarks.common import environment, print_table, write_result

    meta = environment()
    meta["uncommitted"] = subprocess.run(  # what "-dirty" in git_sha was: other work in the tree
        ["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
        text=True, cwd=HERE).stdout.split("\n")  # fmt: skip
    meta.update(vllm=vllm.__version__, model=args.model if args.model and "tiny" not in args.model
                else "tiny Qwen2.5-VL (tests/vllm_support.py)", frames=args.frames,
                size=args.size, max_tokens=args.max_tokens, running=args.running,
                dtype=args.dtype, n_clusters=args.n_clusters, max_iter=args.max_iter,
                alpha_k=args.alpha_k, alpha_v=args.alpha_v, layout=args.layout,
                tensor_parallel_size=args.tp, baseline=engines[0], busy=args.busy,
                numba_cache=args.numba_cache, requests=args.requests, rounds=args.rounds,
                env={k: env.get(k) for k in ("VLLM_CPU_OMP_THREADS_BIND", "OMP_NUM_THREADS",
                                             "VLLM_ENABLE_V1_MULTIPROCESSING")})  # fmt: skip
    print_table(rows, ["round", "engine", "startup_s", "warm_up_s", "requests_per_s", "output_tokens_per_s", f"ratio_{vs}",
                       "median_decode_step_s", "largest_step_s", "stall_s", "video_ttft_s",
                       "steps_before_video_prefill", "repeat_stall_s",
                       "repeat_video_ttft_s"])  # fmt: skip
    for r in (r for r in rows if r["engine"] != engines[0]):
        base = bases[r["round"]]
        r[f"largest_step_{vs}"] = r["largest_step_s"] / base["largest_step_s"]
        r[f"video_ttft_{vs}"] = r["video_ttft_s"] / base["video_ttft_s"]
        print(
            f"{r['engine']} / {base['engine']}: largest step while a new video arrives "
            f"{r[f'largest_step_{vs}']:.2f}, output tokens/s {r[f'ratio_{vs}']:.3f}, "
            f"the video's first token {r[f'video_ttft_{vs}']:.2f}"
        )
    name = args.name or ("vllm" if args.tp == 1 else f"vllm_tp{args.tp}")
    name += f"_busy_{args.busy}" if args.busy and not args.name else ""
    print("wrote", write_result(name, meta, rows, args.out_dir))


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    main()
