"""Runs one anchored vLLM engine with ``tensor_parallel_size`` workers on the CPU and writes
its answers, each worker's scores-ahead counters and the scores it computed as JSON
(tests/test_vllm_tp.py): ``python vllm_tp_worker.py CHECKPOINT TP OUT.json [split]
[defaults]`` (``split``: ``scores_ahead_split``, each request's SSC split over the ranks;
``defaults``: vLLM's prefix caching on, as it is by default; the caller leaves the engine
core in its own process)."""

from __future__ import annotations

import json
import sys

import vllm_support as vs


def _video(n, seed):
    meta = {"fps": 4.0, "total_num_frames": n, "duration": n / 4.0,
            "frames_indices": list(range(n)), "video_backend": "opencv"}  # fmt: skip
    return (vs.frames(n, seed=seed), meta)


def main():
    from vllm import LLM, SamplingParams

    from videoanchor.integrations.vllm import ahead

    checkpoint, tp, out_path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    flags = set(sys.argv[4:])
    split, defaults = "split" in flags, "defaults" in flags
    llm = LLM(model=checkpoint, dtype="float32", enforce_eager=True, max_model_len=2048, seed=0,
              gpu_memory_utilization=0.05, kv_cache_memory_bytes=128 << 20,
              limit_mm_per_prompt={"video": 1}, enable_prefix_caching=defaults,
              tensor_parallel_size=tp,
              additional_config={"videoanchor": {"n_clusters": 4, "max_iter": 200,
                                                 "scores_ahead_split": split}})  # fmt: skip
    prompt = vs.prompt("qwen2_5_vl", "video")
    # four different videos in one batch, then the first again (a score-cache hit)
    batches = [[_video(4, s) for s in range(4)], [_video(4, 0)]]
    sp = SamplingParams(temperature=0.0, max_tokens=4, logprobs=0)
    results = []
    for batch in batches:
        outs = llm.generate([{"prompt": prompt, "multi_modal_data": {"video": v}} for v in batch],
                            sp, use_tqdm=False)  # fmt: skip
        for o in outs:
            g = o.outputs[0]
            results.append({"tokens": list(g.token_ids),
                            "logprobs": [lp[t].logprob for lp, t in zip(g.logprobs, g.token_ids, strict=True)]})  # fmt: skip
    stats = llm.collective_rpc(ahead.stats)
    scores = llm.collective_rpc(_cached_scores)
    with open(out_path, "w") as f:
        json.dump({"results": results, "stats": stats, "scores": scores}, f)


def _cached_scores(worker) -> dict:
    """This worker's score cache: ``{key: scores}`` (runs in the worker)."""
    from videoanchor.integrations.vllm.scoring import score_cache

    runner = worker.model_runner
    cache = score_cache(id(runner), runner.vllm_config.additional_config)
    with cache._lock:  # read as is: get() would count hits
        return {k: v.tolist() for k, v in cache._entries.items()}


if __name__ == "__main__":
    main()
