"""Runs one vLLM engine (or the transformers reference) on requests described in JSON and
writes tokens / logprobs as JSON: ``python vllm_worker.py SPEC.json OUT.json``.

tests/test_vllm.py runs each engine configuration in its own process (vLLM keeps
process-wide state, and "vLLM without the plugin" needs VLLM_PLUGINS set before it loads),
with VLLM_ENABLE_V1_MULTIPROCESSING=0 so the engine core runs in this process.
Spec: {"mode": "vllm"|"transformers", "checkpoint": path, "family": "qwen2_5_vl" (default)
| "llava_onevision" (the prompt format), "engine": {LLM kwargs},
"batches": [[request, ...], ...], "startup_checks": [...] (see run_vllm), "record_scores":
true (each batch gets "scores": the plugin's anchor scores of its requests; the transformers
mode gives each result its "scores"), "record_ssc": true (both modes: each batch gets "ssc",
one entry per SSC run in it: the features the engine handed to ``compute_anchor_scores``, the
cluster count, the options, the scores it returned and the solver that answered), "ssc": the
transformers mode's SSC options (default: vllm_support.SSC), "ahead_stats": true (each batch gets
"ahead": every worker's counts of requests scored ahead of their step, after the batch),
"ssc_runs": true / "ssc_records": true (vllm mode: each batch gets the solver, or the solver,
mode, convergence and cluster share, of every SSC the plugin ran in the worker's process so
far)}; request: {"media": "image:SEED" | "video:FRAMES:SEED" |
"video:FRAMES:SEED:HEIGHTxWIDTH" (frames of that size; default 56 x 84) | "none", "max_tokens": n, "ignore_eos": bool, "extra_args": {...}, "question": text (default: the family's)}. Each batch is one ``generate`` call.
"""

from __future__ import annotations

import json
import sys
import threading
import time
import traceback

import vllm_support as vs

FPS = 4.0


def _media(spec: str):
    from PIL import Image

    kind, *rest = spec.split(":")
    if kind == "image":
        return "image", Image.fromarray(vs.frames(1, seed=int(rest[0]))[0])
    if kind == "video":
        size = map(int, rest[2].split("x")) if len(rest) > 2 else ()
        return "video", _video(int(rest[0]), int(rest[1]), *size)
    if kind == "videos":  # several videos in one request: "videos:N:SEED,N:SEED"
        items = [p.split(":") for p in spec[len("videos:") :].split(",")]
        return "videos", [_video(int(n), int(seed)) for n, seed in items]
    return None, None


def _video(n, seed, height=56, width=84):
    meta = {"fps": FPS, "total_num_frames": n, "duration": n / FPS,
            "frames_indices": list(range(n)), "video_backend": "opencv"}  # fmt: skip
    return (vs.frames(n, seed=seed, height=height, width=width), meta)


def _prompt(kind, data=None, family="qwen2_5_vl", question=None):
    if kind == "videos":
        return vs.prompt(family, "video", len(data), question)
    return vs.prompt(family, kind, question=question)


def _runner_info(worker):
    """Which model runner the worker runs, whether the plugin's V2 hook is on it, which
    solver the plugin's SSC warm-up ran at start-up (None: none ran) and whether the
    working-set kernel is compiled in the worker's process (asked before any request)."""
    runner = worker.model_runner
    state = getattr(runner, "model_state", None)
    kernel = sys.modules.get("videoanchor.anchor.solvers._workset_kernel")
    return {"module": type(runner).__module__,
            "v2_hooked": state is not None and "_videoanchor" in state.__dict__,
            "ssc_warmed": runner.__dict__.get("_videoanchor_warmed"),
            "workset_kernel_compiled": bool(kernel and kernel.solve_columns.signatures)}  # fmt: skip


def _ssc_runs(worker):
    """The solver of each SSC the plugin ran in the worker's process, oldest first."""
    return [run["solver"] for run in _ssc_records(worker)]


def _ssc_records(worker):
    """Each SSC the plugin ran in the worker's process, oldest first: its solver, mode,
    whether it converged and its cluster share."""
    from videoanchor.integrations.vllm import scoring

    return [{"solver": run.solver, "mode": run.mode, "converged": run.converged,
             "cluster_share": run.cluster_share} for run in scoring.runs().values()]  # fmt: skip


_PREEMPTED = [0]


def _count_preemptions():
    """Counts the scheduler's preemptions (observation only), so a test can tell that its
    batch was preempted."""
    from vllm.v1.core.sched.scheduler import Scheduler

    orig = Scheduler._preempt_request

    def counted(self, *args, **kwargs):
        _PREEMPTED[0] += 1
        return orig(self, *args, **kwargs)

    Scheduler._preempt_request = counted


_SCORES: list = []


def _record_scores():
    """Records the anchor scores the plugin computes (each request's (prompt_len,) scores,
    0 at text, or None when it is unscored, in the order the requests are scored) through
    the plugin's score observers; the engine's worker runs in this process."""
    from videoanchor.integrations.vllm import add_score_observer

    def recorded(req_id, scores):
        _SCORES.append(None if scores is None else scores.tolist())

    add_score_observer(recorded)


_SSC: list = []
_SSC_OPTIONS = ("alpha_e", "alpha_z", "rho", "eps", "max_iter", "pca_rank", "seed",
                "label_draws", "solver", "cluster_share")  # fmt: skip


def _record_ssc():
    """Records every ``compute_anchor_scores`` call of the engine (observation only): both
    engines import it from ``videoanchor.anchor`` when they score a request."""
    import videoanchor.anchor as anchor

    orig = anchor.compute_anchor_scores

    def recorded(features, n_clusters, **kwargs):
        res = orig(features, n_clusters, **kwargs)
        opts = {k: kwargs[k] for k in _SSC_OPTIONS if k in kwargs}
        _SSC.append({"features": features.detach().to("cpu").float().tolist(),
                     "n_clusters": int(n_clusters), "options": opts,
                     "scores": res.scores.detach().to("cpu").float().tolist(),
                     "iterations": int(res.iterations), "solver": res.solver,
                     "thread": threading.current_thread().name})  # fmt: skip
        return res

    anchor.compute_anchor_scores = recorded


def run_vllm(spec):
    if spec.get("model_runner") == "v2":  # before vLLM is imported
        import vllm_v2_shim

        vllm_v2_shim.apply()
    from vllm import LLM, SamplingParams

    # Engines that must fail at start-up, tried first in this process (cheaper than a
    # process of their own): {"checkpoint": path, "engine": {LLM kwargs}} each.
    startup_errors = [
        run_vllm({"checkpoint": c["checkpoint"], "engine": c["engine"], "batches": []}).get(
            "startup_error"
        )
        for c in spec.get("startup_checks", [])
    ]
    if spec.get("count_preemptions"):
        _count_preemptions()
    if spec.get("record_scores"):
        _record_scores()
    if spec.get("record_ssc"):
        _record_ssc()

    t0 = time.perf_counter()
    engine = dict(
        dtype="float32", enforce_eager=True, max_model_len=2048, seed=0,
        gpu_memory_utilization=0.05, kv_cache_memory_bytes=256 << 20,
        limit_mm_per_prompt={"video": 2, "image": 2},
    )  # fmt: skip
    engine.update(spec.get("engine", {}))
    try:
        llm = LLM(model=spec["checkpoint"], **engine)
    except Exception as err:  # start-up failure: the test checks the message
        return {"startup_error": f"{type(err).__name__}: {err}"}
    out = {"startup_s": time.perf_counter() - t0, "batches": [], "startup_errors": startup_errors,
           "model_runner": llm.collective_rpc(_runner_info)[0]}  # fmt: skip
    for batch in spec["batches"]:
        results = []
        prompts, params, slots = [], [], []
        for i, req in enumerate(batch):
            kind, data = _media(req.get("media", "none"))
            prompt = {"prompt": _prompt(kind, data, spec.get("family", "qwen2_5_vl"),
                                        req.get("question"))}  # fmt: skip
            if kind is not None:
                prompt["multi_modal_data"] = {kind.rstrip("s"): data}
            try:
                sp = SamplingParams(
                    temperature=0.0, max_tokens=req.get("max_tokens", 6), logprobs=1,
                    extra_args=req.get("extra_args"), ignore_eos=req.get("ignore_eos", False),
                )  # fmt: skip
            except Exception as err:
                results.append({"error": f"{type(err).__name__}: {err}"})
                continue
            results.append(None)
            prompts.append(prompt)
            params.append(sp)
            slots.append(i)
        t, preempted = time.perf_counter(), _PREEMPTED[0]
        _SCORES.clear()
        _SSC.clear()
        try:
            gens = llm.generate(prompts, params, use_tqdm=False) if prompts else []
        except Exception as err:  # refused by the front end (e.g. the operator's limits)
            out["batches"].append({"error": f"{type(err).__name__}: {err}", "results": results})
            continue
        elapsed = time.perf_counter() - t
        for i, g in zip(slots, gens, strict=True):
            o = g.outputs[0]
            results[i] = {
                "tokens": list(o.token_ids),
                "logprobs": [lp[t].logprob for lp, t in zip(o.logprobs, o.token_ids, strict=True)],
                "prompt_len": len(g.prompt_token_ids),
                "prompt_ids": list(g.prompt_token_ids),
                "cached": g.num_cached_tokens,
            }
        out["batches"].append({"results": results, "seconds": elapsed, "scores": list(_SCORES),
                               "ssc": list(_SSC),
                               "preemptions": _PREEMPTED[0] - preempted})  # fmt: skip
        if spec.get("ssc_runs"):  # in whatever process the workers run
            out["batches"][-1]["ssc_runs"] = llm.collective_rpc(_ssc_runs)[0]
        if spec.get("ssc_records"):  # in whatever process the workers run
            out["batches"][-1]["ssc_records"] = llm.collective_rpc(_ssc_records)[0]
        if spec.get("ahead_stats"):  # in whatever process the workers run
            from videoanchor.integrations.vllm import ahead

            out["batches"][-1]["ahead"] = llm.collective_rpc(ahead.stats)
    return out


def run_transformers(spec):
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    import videoanchor

    processor = AutoProcessor.from_pretrained(spec["checkpoint"])
    model = AutoModelForImageTextToText.from_pretrained(
        spec["checkpoint"], attn_implementation="videoanchor_triton", dtype=torch.float32
    ).eval()
    if spec.get("record_ssc"):
        _record_ssc()
    out = {"batches": []}
    for batch in spec["batches"]:
        results = []
        _SSC.clear()
        t = time.perf_counter()
        for req in batch:
            from videoanchor.integrations.options import AnchorConfig

            d = AnchorConfig()  # every request starts from the defaults (configure() keeps
            # the previous call's values for options not given)
            opts = dict(alpha_q=d.alpha_q, alpha_k=d.alpha_k, alpha_v=d.alpha_v,
                        decode=d.decode, seed=d.seed, **spec.get("ssc", vs.SSC))  # fmt: skip
            for k, v in (req.get("extra_args") or {}).items():
                if k.startswith("videoanchor_"):
                    opts[k[len("videoanchor_") :]] = v
            handle = videoanchor.configure(model, **opts)
            kind, data = _media(req["media"])
            kw = {"images": [data]} if kind == "image" else {}
            if kind in ("video", "videos"):
                from transformers.video_utils import VideoMetadata

                items = [data] if kind == "video" else data
                kw = {"videos": [f for f, _ in items],
                      "video_metadata": [VideoMetadata(**m) for _, m in items],
                      "do_sample_frames": False}  # fmt: skip
            text = _prompt(kind, data, spec.get("family", "qwen2_5_vl"), req.get("question"))
            inputs = processor(text=[text], return_tensors="pt", **kw)
            with torch.no_grad():
                gen = model.generate(
                    **inputs, max_new_tokens=req.get("max_tokens", 6), do_sample=False,
                    output_logits=True, return_dict_in_generate=True,
                )  # fmt: skip
            toks = gen.sequences[0, inputs["input_ids"].shape[1] :].tolist()
            lps = [
                float(torch.log_softmax(lg[0].float(), -1)[t])
                for lg, t in zip(gen.logits, toks, strict=True)
            ]
            results.append({"tokens": toks, "logprobs": lps,
                            "prompt_len": int(inputs["input_ids"].shape[1]),
                            "prompt_ids": inputs["input_ids"][0].tolist(),
                            "scores": (None if handle.last_scores is None
                                       else handle.last_scores[0].tolist())})  # fmt: skip
        out["batches"].append({"results": results, "ssc": list(_SSC),
                               "seconds": time.perf_counter() - t})  # fmt: skip
    return out


def run_startup(spec):
    """Engines that must fail at start-up: the error of each."""
    errors = []
    for engine in spec["engines"]:
        out = run_vllm({**spec, "engine": engine, "batches": []})
        errors.append(out.get("startup_error"))
    return {"errors": errors}


def main():
    spec = json.load(open(sys.argv[1]))
    mode = spec.get("mode", "vllm")
    run = {"vllm": run_vllm, "transformers": run_transformers, "startup": run_startup}[mode]
    try:
        out = run(spec)
    except Exception:
        out = {"crash": traceback.format_exc()}
    json.dump(out, open(sys.argv[2], "w"))


if __name__ == "__main__":
    main()
