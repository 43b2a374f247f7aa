"""Shared by tests/test_vllm*.py and benchmarks/bench_vllm.py: tiny random-weight checkpoints
saved with transformers' real processors (as tests/test_real_processor.py does) but with head
dim 64 (vLLM's CPU attention supports head sizes 32, 64, 80, ...), and media made here.

Families: Qwen2.5-VL (the default), and for tests/test_vllm_families.py LLaVA-OneVision,
Qwen2-VL, LLaVA-NeXT-Video, InternVL and Qwen3-VL. Also what the test modules share to run
an engine: :func:`vllm_problem` (why a module skips) and :func:`run_worker` (one engine
configuration in a process of its own, tests/vllm_worker.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
# One unbound OpenMP thread per CPU engine: tiny matmuls, and a shared 2-core CI machine where
# vLLM's default binding of one spinning thread per core slows everything down. No dynamo:
# vLLM's sampler torch.compiles its logprob-rank helper with inductor on the first request
# asking for logprobs (~40 s of gcc per engine process here); eager gives the same ranks.
CPU_THREADS = {
    "VLLM_CPU_OMP_THREADS_BIND": "nobind",
    "OMP_NUM_THREADS": "1",
    "TORCHDYNAMO_DISABLE": "1",
}


#: ``env_extra`` of :func:`run_worker` for vLLM's default process layout: the engine core in
#: a process of its own (``worker_env`` otherwise runs it in the worker's process); the
#: worker's collective_rpc sends a function to it, which needs pickle.
ENGINE_CORE_PROCESS = {
    "VLLM_ENABLE_V1_MULTIPROCESSING": "1",
    "VLLM_ALLOW_INSECURE_SERIALIZATION": "1",
}


def vllm_problem(where: str = ".ci/run runs this file in its own venv") -> str | None:
    """None where vllm imports, else why not (a module's skip reason)."""
    try:
        import vllm  # noqa: F401
    except Exception as err:  # ImportError, or a broken install
        return f"vllm is not importable here ({type(err).__name__}: {err}); {where}"
    return None


def worker_env(plugins: str | None = None, cpu: bool = True, single_process: bool = True,
               extra: dict | None = None) -> dict:  # fmt: skip
    """The environment of an engine process: this checkout and the torchvision shim's
    sitecustomize on PYTHONPATH, the engine core in-process (``single_process``), the CPU
    thread settings (``cpu``), ``VLLM_PLUGINS`` when ``plugins`` is given ("" loads none)."""
    env = dict(os.environ)
    if single_process:
        env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    if cpu:
        env.update(CPU_THREADS)
    env["PYTHONPATH"] = os.pathsep.join([str(HERE.parent), str(HERE / "vllm_site"), str(HERE)])
    if plugins is not None:
        env["VLLM_PLUGINS"] = plugins
    env.update(extra or {})
    return env


def run_worker(tmp, name: str, spec: dict, plugins: str | None = None, cpu: bool = True,
               env_extra: dict | None = None, fail_on_startup_error: bool = False) -> dict:  # fmt: skip
    """Runs tests/vllm_worker.py on ``spec`` in its own process and returns what it wrote;
    fails the test (with the worker's stderr) when it wrote nothing or crashed, or, with
    ``fail_on_startup_error``, when the engine did not start."""
    import pytest

    spec_path, out_path = tmp / f"{name}.json", tmp / f"{name}.out.json"
    spec_path.write_text(json.dumps(spec))
    proc = subprocess.run(
        [sys.executable, str(HERE / "vllm_worker.py"), str(spec_path), str(out_path)],
        env=worker_env(plugins, cpu=cpu, extra=env_extra), cwd=str(HERE),
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    if not out_path.exists():
        pytest.fail(f"{name}: worker wrote nothing (rc {proc.returncode}):\n{proc.stderr[-4000:]}")
    out = json.loads(out_path.read_text())
    problem = out.get("crash") or (out.get("startup_error") if fail_on_startup_error else None)
    if problem:
        pytest.fail(f"{name}: worker failed:\n{problem}\n{proc.stderr[-3000:]}")
    return out


HIDDEN = 256  # 4 heads of 64
N_CLUSTERS = 4
#: the tests' SSC options: the paper's cluster share (issue 91 made "steady" the default; the
#: engines-agree tests at 1e-4 are the paper's share's, test_vllm.py's share_* ones the default's)
SSC = {"n_clusters": N_CLUSTERS, "max_iter": 200, "cluster_share": "paper"}
#: LLaVA-OneVision: SigLIP tower on 56 px frames with 8 px patches (a 7 x 7 grid, pooled to
#: ceil(7 / 2) = 4 x 4 tokens per frame, the odd grid exercising the ceil of both engines).
OV_SIZE, OV_PATCH = 56, 8
#: LLaVA-NeXT-Video: CLIP on 64 px frames, 8 px patches (8 x 8, average-pooled to 4 x 4).
NV_SIZE = 64


def _random_model(config, qwen2_5_rule: bool = False):
    """``AutoModelForImageTextToText`` of ``config`` with seeded random weights (seed 0, the
    caller's RNG untouched): norms near 1, embeddings std 0.5, the rest std 0.08.
    ``qwen2_5_rule``: the first checkpoint's rule (any "norm" parameter near 1, newline
    embeddings at 0.08), kept so its weights do not change."""
    from transformers import AutoModelForImageTextToText

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForImageTextToText.from_config(config).eval()
        with torch.no_grad():
            for name, p in model.named_parameters():
                if qwen2_5_rule:
                    std, norm = (0.5 if "embed" in name else 0.08), "norm" in name
                else:
                    std = 0.5 if "embed" in name or "newline" in name else 0.08
                    norm = "norm" in name and p.ndim == 1
                p.copy_(1.0 + 0.1 * torch.randn_like(p) if norm else std * torch.randn_like(p))
    return model


def save_checkpoint(path, family: str = "qwen2_5_vl") -> None:
    """A tiny random-weight checkpoint of ``family`` with its real processor at ``path``.

    ``"qwen2_5_vl"``: Qwen2.5-VL (2 layers, hidden 256, head dim 64, vision patch 14) with
    Qwen2_5_VLProcessor(Qwen2VLImageProcessor, Qwen2VLVideoProcessor).
    ``"llava_onevision"``: LLaVA-OneVision (Qwen2 language model of the same size, SigLIP
    56 px / patch 8, anyres grid pinpoints of 56 px tiles) with
    LlavaOnevisionProcessor(LlavaOnevisionImageProcessor, LlavaOnevisionVideoProcessor).
    Both with a tiny character-level tokenizer."""
    if family == "qwen2_5_vl":
        return _save_qwen2_5_vl(path)
    if family == "llava_onevision":
        return _save_llava_onevision(path)
    if family == "llava_next_video":
        return _save_llava_next_video(path)
    if family == "qwen2_vl":
        return _save_qwen2_vl(path)
    if family == "internvl":
        return _save_internvl(path)
    if family == "qwen3_vl":
        return _save_qwen3_vl(path)
    raise ValueError(f"family: expected one of {', '.join(_ITEM)}, got {family!r}")


def _save_qwen2_5_vl(path) -> None:
    from test_cli_support import tiny_tokenizer
    from transformers import (
        Qwen2_5_VLProcessor,
        Qwen2VLImageProcessor,
        Qwen2VLVideoProcessor,
    )

    from videoanchor.integrations.transformers.testing import tiny_config

    config = tiny_config("qwen2_5_vl", hidden=HIDDEN)
    config.vision_config.patch_size = 14
    config.vision_config.window_size = 112
    config.text_config.max_position_embeddings = 4096
    model = _random_model(config, qwen2_5_rule=True)
    model.save_pretrained(path)
    tokenizer = tiny_tokenizer("qwen2_5_vl")
    processor = Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(),
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(),
        chat_template=tokenizer.chat_template,
    )
    processor.save_pretrained(path)


def _save_llava_onevision(path) -> None:
    from test_cli_support import tiny_tokenizer
    from transformers import (
        LlavaOnevisionImageProcessor,
        LlavaOnevisionProcessor,
        LlavaOnevisionVideoProcessor,
    )

    from videoanchor.integrations.transformers.testing import tiny_config

    config = tiny_config("llava_onevision", hidden=HIDDEN)
    config.vision_config.image_size = OV_SIZE
    config.vision_config.patch_size = OV_PATCH
    s = OV_SIZE
    config.image_grid_pinpoints = [[s, s], [s, 2 * s], [2 * s, s], [2 * s, 2 * s]]
    config.text_config.max_position_embeddings = 4096
    config.vision_config.vision_use_head = False  # as the published checkpoints
    model = _random_model(config)
    _save_hub_layout(model, path)
    tokenizer = tiny_tokenizer("llava_onevision")
    size = {"height": s, "width": s}
    processor = LlavaOnevisionProcessor(
        image_processor=LlavaOnevisionImageProcessor(
            size=size, crop_size=size, image_grid_pinpoints=config.image_grid_pinpoints
        ),
        tokenizer=tokenizer,
        video_processor=LlavaOnevisionVideoProcessor(size=size),
        chat_template=tokenizer.chat_template,
        num_image_tokens=(s // OV_PATCH) ** 2,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
    )
    processor.save_pretrained(path)


def _save_llava_next_video(path) -> None:
    from test_cli_support import tiny_tokenizer
    from transformers import (
        LlavaNextImageProcessor,
        LlavaNextVideoProcessor,
        LlavaNextVideoVideoProcessor,
    )

    from videoanchor.integrations.transformers.testing import tiny_config

    config = tiny_config("llava_next_video", hidden=HIDDEN)
    s, patch = NV_SIZE, OV_PATCH
    config.vision_config.image_size = s
    config.vision_config.patch_size = patch
    config.image_grid_pinpoints = [[s, s], [s, 2 * s], [2 * s, s], [2 * s, 2 * s]]
    config.text_config.max_position_embeddings = 4096
    model = _random_model(config)
    _save_hub_layout(model, path)
    tokenizer = tiny_tokenizer("llava_next_video")
    size, crop = {"shortest_edge": s}, {"height": s, "width": s}
    processor = LlavaNextVideoProcessor(
        video_processor=LlavaNextVideoVideoProcessor(size=size, crop_size=crop),
        image_processor=LlavaNextImageProcessor(
            size=size, crop_size=crop, image_grid_pinpoints=config.image_grid_pinpoints
        ),
        tokenizer=tokenizer,
        chat_template=tokenizer.chat_template,
        patch_size=patch,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        num_additional_image_tokens=1,
    )
    processor.save_pretrained(path)


def _save_qwen2_vl(path) -> None:
    from test_cli_support import tiny_tokenizer
    from transformers import (
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
        Qwen2VLVideoProcessor,
    )

    from videoanchor.integrations.transformers.testing import tiny_config

    config = tiny_config("qwen2_vl", hidden=HIDDEN)
    config.vision_config.patch_size = 14
    config.text_config.max_position_embeddings = 4096
    model = _random_model(config)
    _save_hub_layout(model, path)
    tokenizer = tiny_tokenizer("qwen2_vl")
    processor = Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessor(),
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(),
        chat_template=tokenizer.chat_template,
    )
    processor.save_pretrained(path)


#: Qwen3-VL: vision patch 16 (the published one), position-embedding grid 4 x 4.
Q3_PATCH = 16


def _save_qwen3_vl(path) -> None:
    """Qwen3-VL (2 text layers, hidden 256, head dim 64, one deepstack level) with
    Qwen3VLProcessor(Qwen2VLImageProcessor, Qwen3VLVideoProcessor), patch 16."""
    from test_cli_support import tiny_tokenizer
    from transformers import (
        Qwen2VLImageProcessor,
        Qwen3VLProcessor,
        Qwen3VLVideoProcessor,
    )

    from videoanchor.integrations.transformers.testing import tiny_config

    config = tiny_config("qwen3_vl", hidden=HIDDEN)
    config.vision_config.patch_size = Q3_PATCH
    config.text_config.max_position_embeddings = 4096
    model = _random_model(config)
    model.save_pretrained(path)
    tokenizer = tiny_tokenizer("qwen3_vl")
    processor = Qwen3VLProcessor(
        # mean / std 0.5 for images as for videos, as the published Qwen3-VL: vLLM 0.32
        # normalises both modalities inside the model with the IMAGE processor's values
        # (vllm/model_executor/layers/fusion/mm_input_norm.py), so a checkpoint whose two
        # processors differ (transformers' Qwen2VLImageProcessor defaults to CLIP's) gets
        # different video features there than in transformers.
        # min_pixels 24 merged patches: the 56 x 84 test image is upscaled to 4 x 6 tokens
        image_processor=Qwen2VLImageProcessor(
            patch_size=Q3_PATCH,
            image_mean=[0.5] * 3,
            image_std=[0.5] * 3,
            size={"shortest_edge": 24 * (2 * Q3_PATCH) ** 2, "longest_edge": 1 << 20},
        ),  # fmt: skip
        tokenizer=tokenizer,
        video_processor=Qwen3VLVideoProcessor(patch_size=Q3_PATCH),
        chat_template=tokenizer.chat_template,
    )
    processor.save_pretrained(path)


def _save_internvl(path) -> None:
    from test_cli_support import tiny_tokenizer
    from transformers import (
        GotOcr2ImageProcessor,
        InternVLProcessor,
        InternVLVideoProcessor,
    )

    from videoanchor.integrations.transformers.testing import tiny_config

    config = tiny_config("internvl", hidden=HIDDEN)
    config.text_config.max_position_embeddings = 4096
    model = _random_model(config)
    model.save_pretrained(path)
    tokenizer = tiny_tokenizer("internvl")
    tokenizer = _with_internvl_tokens(tokenizer)
    size = {
        "height": config.vision_config.image_size[0],
        "width": config.vision_config.image_size[1],
    }
    grid = config.vision_config.image_size[0] // config.vision_config.patch_size[0]
    processor = InternVLProcessor(
        image_processor=GotOcr2ImageProcessor(size=size, crop_to_patches=True, max_patches=4),
        tokenizer=tokenizer,
        video_processor=InternVLVideoProcessor(size=size),
        chat_template=tokenizer.chat_template,
        image_seq_length=int(grid * grid * config.downsample_ratio**2),
    )
    processor.save_pretrained(path)


def _with_internvl_tokens(tokenizer):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer.backend_tokenizer, bos_token="<s>", eos_token="</s>",
        pad_token="<pad>", unk_token="?", chat_template=tokenizer.chat_template,
        extra_special_tokens={"start_image_token": "<img>", "end_image_token": "</img>",
                              "context_image_token": "<IMG_CONTEXT>", "video_token": "<video>"},
    )  # fmt: skip


def _save_hub_layout(model, path) -> None:
    """``save_pretrained``, the vision tower renamed to the published layout, and a check
    that transformers loads every weight back unchanged."""
    from transformers import AutoModelForImageTextToText

    model.save_pretrained(path)
    _hub_vision_prefix(path)
    loaded = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32)
    want, got = model.state_dict(), loaded.state_dict()
    bad = [k for k in want if k not in got or not torch.equal(want[k], got[k])]
    if bad or len(got) != len(want):
        raise RuntimeError(f"the saved {model.config.model_type} does not load back: {bad[:5]}")


def _hub_vision_prefix(path) -> None:
    """transformers 5.x saves the SigLIP tower as ``vision_tower.<module>``; the published
    LLaVA-OneVision checkpoints (and vLLM's loader) have ``vision_tower.vision_model.<module>``,
    which transformers also loads. Rewrites the saved weights in the published layout."""
    from pathlib import Path

    from safetensors.torch import load_file, save_file

    file = Path(path) / "model.safetensors"
    tensors = load_file(file)
    renamed = {
        ("vision_tower.vision_model." + k[len("vision_tower.") :]
         if k.startswith("vision_tower.") and not k.startswith("vision_tower.vision_model.")
         else k): v
        for k, v in tensors.items()
    }  # fmt: skip
    save_file(renamed, file, metadata={"format": "pt"})


def frames(num: int, seed: int = 0, height: int = 56, width: int = 84) -> np.ndarray:
    """(T, H, W, 3) uint8 moving shapes."""
    from test_cli_support import moving_shapes

    return moving_shapes(num, height, width, seed=seed)


VIDEO_PROMPT = "<|im_start|>user\n<|vision_start|><|video_pad|><|vision_end|>what moves?<|im_end|>\n<|im_start|>assistant\n"  # fmt: skip
IMAGE_PROMPT = "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>what is it?<|im_end|>\n<|im_start|>assistant\n"  # fmt: skip
_ITEM = {
    "qwen2_5_vl": {"image": "<|vision_start|><|image_pad|><|vision_end|>",
                   "video": "<|vision_start|><|video_pad|><|vision_end|>"},
    "llava_onevision": {"image": "<image>\n", "video": "<video>\n"},
}  # fmt: skip
_ITEM["qwen2_vl"] = _ITEM["qwen3_vl"] = _ITEM["qwen2_5_vl"]
_ITEM["llava_next_video"] = _ITEM["llava_onevision"]
_ITEM["internvl"] = {"image": "<IMG_CONTEXT>\n", "video": "<video>\n"}


def prompt(family: str, kind: str | None, count: int = 1, question: str | None = None) -> str:
    """The chat prompt of the tiny checkpoints: ``count`` items of ``kind`` ("image",
    "video" or None for text only), then ``question`` (default: one per kind)."""
    if kind is None:
        return "<|im_start|>user\nhello there<|im_end|>\n<|im_start|>assistant\n"
    if question is None:
        question = "what is it?" if kind == "image" else "what moves?"
    items = _ITEM[family][kind] * count
    return f"<|im_start|>user\n{items}{question}<|im_end|>\n<|im_start|>assistant\n"


def assert_same_ssc(got: dict, want: dict, feature_rtol: float = 1e-4,
                    feature_atol: float = 1e-5, score_atol: float = 1e-4) -> None:  # fmt: skip
    """Checks one batch's SSC at its source, for two engines' worker outputs (``record_ssc``):
    the features each engine handed to SSC agree within the stated tolerance; given its own
    features, each engine's scores are what SSC gives on them here (the solver is
    deterministic); and the two engines' scores agree within ``score_atol``, which holds
    because the default solver's scores are a continuous function of the features (the
    faithful iterate's are not: docs/method.md)."""
    from videoanchor.anchor import compute_anchor_scores

    got_runs, want_runs = got["ssc"], want["ssc"]
    assert len(got_runs) == len(want_runs) >= 1, (len(got_runs), len(want_runs))
    for g, w in zip(got_runs, want_runs, strict=True):
        fg, fw = torch.tensor(g["features"]), torch.tensor(w["features"])
        assert fg.shape == fw.shape, (fg.shape, fw.shape)
        torch.testing.assert_close(fg, fw, rtol=feature_rtol, atol=feature_atol)
        assert (g["n_clusters"], g["options"]) == (w["n_clusters"], w["options"])
        with torch.random.fork_rng(devices=[]):
            threads = torch.get_num_threads()
            torch.set_num_threads(1)  # as the engines ran it (CPU_THREADS)
            try:
                for rec in (g, w):
                    again = compute_anchor_scores(
                        torch.tensor(rec["features"]), rec["n_clusters"], **rec["options"]
                    )
                    torch.testing.assert_close(
                        again.scores.float(), torch.tensor(rec["scores"]), atol=1e-6, rtol=0
                    )
            finally:
                torch.set_num_threads(threads)
        torch.testing.assert_close(
            torch.tensor(g["scores"]), torch.tensor(w["scores"]), atol=score_atol, rtol=0
        )
