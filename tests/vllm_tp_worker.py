"""Runs one anchored vLLM engine with ``tensor_parallel_size`` workers on the CPU and writes
its answers, each worker's scores-ahead counters and the scores it computed as JSON
(tests/test_vllm_tp.py): ``python vllm_tp_worker.py CHECKPOINT TP OUT.json [split]
[defaults] [readme] [sharded]`` (``split``: ``scores_ahead_split``, each request's SSC split
over the ranks; ``defaults``: vLLM's prefix caching on, as it is by default; the caller
leaves the engine core in its own process; ``readme``: the README's options, n_clusters 24
and alphas 9.5 / 2.5, on four 8-frame 224 x 280 videos (320 visual tokens each), with every
SSC's features recorded; ``sharded``: ``replicate_encoder: false``, vLLM's sharded vision
encoder, where the plugin otherwise replicates it under tensor parallelism)."""

from __future__ import annotations

import json
import sys

import vllm_support as vs


def _video(frames, seed, height=56, width=84):
    n = frames
    meta = {"fps": 4.0, "total_num_frames": n, "duration": n / 4.0,
            "frames_indices": list(range(n)), "video_backend": "opencv"}  # fmt: skip
    return (vs.frames(n, seed=seed, height=height, width=width), meta)


def main():
    from vllm import LLM, SamplingParams

    from videoanchor.integrations.vllm import ahead

    checkpoint, tp, out_path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    flags = set(sys.argv[4:])
    split, defaults, readme = "split" in flags, "defaults" in flags, "readme" in flags
    opts = ({"n_clusters": 24, "alpha_k": 9.5, "alpha_v": 2.5} if readme else
            {"n_clusters": 4, "max_iter": 200})  # fmt: skip
    if "sharded" in flags:
        opts["replicate_encoder"] = False
    llm = LLM(model=checkpoint, dtype="float32", enforce_eager=True, max_model_len=2048, seed=0,
              gpu_memory_utilization=0.05, kv_cache_memory_bytes=128 << 20,
              limit_mm_per_prompt={"video": 1}, enable_prefix_caching=defaults,
              tensor_parallel_size=tp,
              additional_config={"videoanchor": {**opts, "scores_ahead_split": split}})  # fmt: skip
    prompt = vs.prompt("qwen2_5_vl", "video")
    if readme:
        llm.collective_rpc(_record_features)
    # four different videos in one batch, then the first again (a score-cache hit)
    size = dict(frames=8, height=224, width=280) if readme else dict(frames=4)
    batches = [[_video(seed=s, **size) for s in range(4)], [_video(seed=0, **size)]]
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
    out = {"results": results, "stats": stats, "scores": scores}
    if readme:
        out["features"] = llm.collective_rpc(_recorded_features)
    with open(out_path, "w") as f:
        json.dump(out, f)


def _record_features(worker) -> None:
    """Records the features, cluster count and options of every SSC this worker runs (on
    the worker object of its process: this function reaches the workers by value, so a
    global of this file would not be the one :func:`_recorded_features` reads)."""
    import videoanchor.anchor as anchor

    orig = anchor.compute_anchor_scores
    recorded = worker.__dict__.setdefault("videoanchor_test_recorded", [])

    def recording(features, n_clusters, **kwargs):
        res = orig(features, n_clusters, **kwargs)
        opts = {k: v for k, v in kwargs.items() if k not in ("progress", "process_group")}
        opts["dtype"] = None if opts.get("dtype") is None else str(opts["dtype"])
        recorded.append({"features": features.float().tolist(), "n_clusters": n_clusters,
                          "options": opts, "scores": res.scores.float().tolist()})  # fmt: skip
        return res

    anchor.compute_anchor_scores = recording


def _recorded_features(worker) -> list:
    return list(worker.__dict__.get("videoanchor_test_recorded", []))


def _cached_scores(worker) -> dict:
    """This worker's score cache: ``{key: scores}`` (runs in the worker)."""
    from videoanchor.integrations.vllm.scoring import score_cache

    runner = worker.model_runner
    cache = score_cache(id(runner), runner.vllm_config.additional_config)
    with cache._lock:  # read as is: get() would count hits
        return {k: v.tolist() for k, v in cache._entries.items()}


if __name__ == "__main__":
    main()
