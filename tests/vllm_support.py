"""Shared by tests/test_vllm*.py and benchmarks/bench_vllm.py: a tiny Qwen2.5-VL saved with
transformers' real processors (as tests/test_real_processor.py does) but with head dim 64
(vLLM's CPU attention supports head sizes 32, 64, 80, ...), and media made here."""

from __future__ import annotations

import numpy as np
import torch

HIDDEN = 256  # 4 heads of 64
N_CLUSTERS = 4
SSC = {"n_clusters": N_CLUSTERS, "max_iter": 200}


def save_checkpoint(path) -> None:
    """Random-weight Qwen2.5-VL (2 layers, hidden 256, head dim 64, vision patch 14) with
    Qwen2_5_VLProcessor(Qwen2VLImageProcessor, Qwen2VLVideoProcessor) and a tiny tokenizer."""
    from test_cli_support import tiny_tokenizer
    from transformers import (
        AutoModelForImageTextToText,
        Qwen2_5_VLProcessor,
        Qwen2VLImageProcessor,
        Qwen2VLVideoProcessor,
    )

    from videoanchor.integrations.transformers.testing import tiny_config

    config = tiny_config("qwen2_5_vl", hidden=HIDDEN)
    config.vision_config.patch_size = 14
    config.vision_config.window_size = 112
    config.text_config.max_position_embeddings = 4096
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForImageTextToText.from_config(config).eval()
        with torch.no_grad():
            for name, p in model.named_parameters():
                std = 0.5 if "embed" in name else 0.08
                p.copy_(1.0 + 0.1 * torch.randn_like(p) if "norm" in name else std * torch.randn_like(p))  # fmt: skip
    model.save_pretrained(path)
    tokenizer = tiny_tokenizer("qwen2_5_vl")
    processor = Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(),
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(),
        chat_template=tokenizer.chat_template,
    )
    processor.save_pretrained(path)


def frames(num: int, seed: int = 0, height: int = 56, width: int = 84) -> np.ndarray:
    """(T, H, W, 3) uint8 moving shapes."""
    from test_cli_support import moving_shapes

    return moving_shapes(num, height, width, seed=seed)


VIDEO_PROMPT = "<|im_start|>user\n<|vision_start|><|video_pad|><|vision_end|>what moves?<|im_end|>\n<|im_start|>assistant\n"  # fmt: skip
IMAGE_PROMPT = "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>what is it?<|im_end|>\n<|im_start|>assistant\n"  # fmt: skip
