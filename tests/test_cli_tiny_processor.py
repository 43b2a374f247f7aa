"""A small processor for the tiny test models, shipped into their checkpoint as remote code.

transformers' video processors need torchvision, which has no CPU build for this machine's
torch; this stand-in does what the families' processors do for one video (expand the video
placeholder of the chat template into the model's visual tokens, resize and normalise the
frames, lay the pixels out as the family's model expects) with plain torch. The tests copy
this file into the tiny checkpoint as ``tiny_processor.py`` and point ``auto_map`` at it, so
``AutoProcessor.from_pretrained(dir, trust_remote_code=True)`` returns it, exactly as it
would a model's own remote-code processor. Nothing here is collected as a test.
"""

from __future__ import annotations

import json
import os

import numpy as np
import torch
from transformers import BatchFeature, PreTrainedTokenizerFast

PROCESSOR_CONFIG = "processor_config.json"
QWEN = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")


class TinyVideoProcessor:
    """Tokenizer + chat template + per-family video layout for one tiny model family."""

    def __init__(self, tokenizer, family: str, frame_size, patch_size: int = 2, merge_size: int = 2,
                 temporal_patch_size: int = 2, pooled: int | None = None):  # fmt: skip
        self.tokenizer = tokenizer
        self.family = family
        self.frame_size = tuple(int(x) for x in frame_size)
        self.patch_size, self.merge_size = int(patch_size), int(merge_size)
        self.temporal_patch_size = int(temporal_patch_size)
        self.pooled = pooled
        self.chat_template = tokenizer.chat_template

    @classmethod
    def register_for_auto_class(cls, auto_class="AutoProcessor"):
        pass  # transformers calls this on remote-code classes; nothing to record here

    @classmethod
    def from_pretrained(cls, path, **kwargs):
        with open(os.path.join(path, PROCESSOR_CONFIG)) as f:
            cfg = json.load(f)
        tokenizer = PreTrainedTokenizerFast.from_pretrained(path)
        keys = ("family", "frame_size", "patch_size", "merge_size", "temporal_patch_size", "pooled")
        return cls(tokenizer, **{k: cfg[k] for k in keys if k in cfg})

    def apply_chat_template(
        self, conversation, add_generation_prompt=False, tokenize=False, **kwargs
    ):
        return self.tokenizer.apply_chat_template(
            conversation, add_generation_prompt=add_generation_prompt, tokenize=False
        )

    def batch_decode(self, *args, **kwargs):
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args, **kwargs):
        return self.tokenizer.decode(*args, **kwargs)

    def _frames(self, video, size):
        x = torch.as_tensor(np.asarray(video)).permute(0, 3, 1, 2).float() / 255.0
        x = torch.nn.functional.interpolate(x, size=size, mode="bilinear", align_corners=False)
        return (x - 0.5) / 0.5

    def __call__(self, text=None, videos=None, video_metadata=None, return_tensors="pt",
                 images=None, padding_side=None, **kwargs):  # fmt: skip
        if isinstance(text, str):
            text = [text]
        if padding_side is not None:
            self.tokenizer.padding_side = padding_side
        if images is not None:
            if videos is not None:
                raise ValueError("the tiny processor takes images or videos, not both")
            return self._images(text, images)
        if videos is None or len(videos) != len(text):
            raise ValueError("the tiny processor expects one video per prompt")
        prompts, pixels, grids = [], [], []
        for i, (prompt, video) in enumerate(zip(text, videos, strict=True)):
            meta = video_metadata[i] if video_metadata is not None else None
            prompt, px, grid = self._one(prompt, video, meta)
            prompts.append(prompt)
            pixels.append(px)
            grids.append(grid)
        enc = self.tokenizer(prompts, padding=True, return_tensors="pt")
        out = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
        if self.family in QWEN:
            out["pixel_values_videos"] = torch.cat(pixels)
            out["video_grid_thw"] = torch.tensor(grids, dtype=torch.long)
            vid = self.tokenizer.convert_tokens_to_ids("<|video_pad|>")
            out["mm_token_type_ids"] = (enc["input_ids"] == vid).long() * 2
            if self.family == "qwen2_5_vl":
                fps = [
                    getattr(m, "sampled_fps", None) or 2.0
                    for m in (video_metadata or [None] * len(text))
                ]
                out["second_per_grid_ts"] = [self.temporal_patch_size / f for f in fps]
        elif self.family == "internvl":
            out["pixel_values"] = torch.cat(pixels)
        else:
            out["pixel_values_videos"] = torch.stack(pixels)
        return BatchFeature(out, tensor_type=None)

    def _images(self, text, images):
        # images: per prompt, the list of its views (PIL images), in order.
        if self.family not in QWEN + ("internvl",):
            raise ValueError(f"the tiny {self.family} processor takes videos only, not images")
        if len(images) != len(text):
            raise ValueError("the tiny processor expects one list of images per prompt")
        qwen = self.family in QWEN
        placeholder = "<|vision_start|><|image_pad|><|vision_end|>" if qwen else "<IMG_CONTEXT>\n"
        merged, pixels, grids = [], [], []
        for prompt, views in zip(text, images, strict=True):
            pieces = prompt.split(placeholder)
            if len(pieces) - 1 != len(views):
                raise ValueError(f"{len(views)} images for {len(pieces) - 1} image placeholders")
            parts = [pieces[0]]
            for view, piece in zip(views, pieces[1:], strict=True):
                frame = np.array(view.convert("RGB"))[None]
                x = self._frames(frame, self.frame_size)
                if qwen:
                    x = x.expand(self.temporal_patch_size, -1, -1, -1)
                    px, grid, body = self._qwen_patches(x, "<|image_pad|>")
                    grids.append(grid)
                else:
                    px = x
                    body = "<img>" + "<IMG_CONTEXT>" * int(self.pooled) ** 2 + "</img>\n"
                parts += [body, piece]
                pixels.append(px)
            merged.append("".join(parts))
        enc = self.tokenizer(merged, padding=True, return_tensors="pt")
        out = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
        out["pixel_values"] = torch.cat(pixels)
        if self.family in QWEN:
            out["image_grid_thw"] = torch.tensor(grids, dtype=torch.long)
            img = self.tokenizer.convert_tokens_to_ids("<|image_pad|>")
            out["mm_token_type_ids"] = (enc["input_ids"] == img).long()
        return BatchFeature(out, tensor_type=None)

    def _qwen_patches(self, x, pad):
        tp, ps, m = self.temporal_patch_size, self.patch_size, self.merge_size
        gt, gh, gw = x.shape[0] // tp, self.frame_size[0] // ps, self.frame_size[1] // ps
        px = x.reshape(gt, tp, 3, gh // m, m, ps, gw // m, m, ps)
        px = px.permute(0, 3, 6, 4, 7, 2, 1, 5, 8).reshape(gt * gh * gw, 3 * tp * ps * ps)
        body = "<|vision_start|>" + pad * (gt * (gh // m) * (gw // m)) + "<|vision_end|>"
        return px, [gt, gh, gw], body

    def _one(self, prompt, video, meta):
        fam = self.family
        frames = np.asarray(video)
        if fam in QWEN:
            x = self._frames(frames, self.frame_size)
            tp, ps, m = self.temporal_patch_size, self.patch_size, self.merge_size
            if x.shape[0] % tp:
                x = torch.cat([x, x[-1:].expand(tp - x.shape[0] % tp, -1, -1, -1)])
            gt, gh, gw = x.shape[0] // tp, self.frame_size[0] // ps, self.frame_size[1] // ps
            px = x.view(gt, tp, 3, gh // m, m, ps, gw // m, m, ps)
            px = px.permute(0, 3, 6, 4, 7, 2, 1, 5, 8).reshape(gt * gh * gw, 3 * tp * ps * ps)
            per = (gh // m) * (gw // m)
            placeholder = "<|vision_start|><|video_pad|><|vision_end|>"
            if fam == "qwen3_vl":
                fps = (getattr(meta, "fps", None) or 2.0) if meta is not None else 2.0
                idx = list(getattr(meta, "frames_indices", None) or range(len(frames)))
                body = ""
                for t in range(gt):
                    stamp = (
                        (idx[min(2 * t, len(idx) - 1)] + idx[min(2 * t + 1, len(idx) - 1)])
                        / 2
                        / fps
                    )
                    body += (
                        f"<{stamp:.1f} seconds><|vision_start|>"
                        + "<|video_pad|>" * per
                        + "<|vision_end|>"
                    )
                return prompt.replace(placeholder, body, 1), px, [gt, gh, gw]
            body = "<|vision_start|>" + "<|video_pad|>" * (gt * per) + "<|vision_end|>"
            return prompt.replace(placeholder, body, 1), px, [gt, gh, gw]
        if fam == "internvl":
            x = self._frames(frames, self.frame_size)
            per = int(self.pooled) ** 2
            body = "".join(
                f"Frame{i + 1}: <img>" + "<IMG_CONTEXT>" * per + "</img>\n"
                for i in range(len(frames))
            )
            return prompt.replace("<video>", body, 1), x, None
        x = self._frames(frames, self.frame_size)
        n = len(frames) * int(self.pooled) ** 2 + (1 if fam == "llava_onevision" else 0)
        return prompt.replace("<video>", "<video>" * n, 1), x, None
