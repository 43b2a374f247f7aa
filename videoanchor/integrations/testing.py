"""Tiny random-weight models and matching inputs for every supported family.

Used by the tests, the CLI smoke tests and the benchmarks: nothing here downloads weights.
Each builder makes a full vision-language model (vision tower, projector, language model)
small enough to run on a CPU in milliseconds, with the real transformers classes, so the
integration is exercised end to end.

    model = tiny_model("qwen2_5_vl")
    inputs = tiny_inputs(model.config, videos=[[4], [2, 2]])   # sample 0: one 4-frame video,
                                                              # sample 1: two 2-frame videos
    out = model(**inputs)
"""

from __future__ import annotations

import copy

import torch

__all__ = ["TINY_FAMILIES", "tiny_config", "tiny_model", "tiny_inputs", "VOCAB", "TOKENS"]

TINY_FAMILIES = (
    "qwen2_vl",
    "qwen2_5_vl",
    "qwen3_vl",
    "internvl",
    "llava_onevision",
    "llava_next_video",
)

VOCAB = 128
# Special token ids shared by every tiny family; ordinary text uses ids in [TEXT_LO, TEXT_HI).
TOKENS = {
    "pad": 0,
    "bos": 1,
    "eos": 2,
    "image": 120,
    "video": 121,
    "vision_start": 122,
    "vision_end": 123,
}
TEXT_LO, TEXT_HI = 3, 110


def _text_config(model_type: str, hidden: int, layers: int, **extra) -> dict:
    cfg = {
        "model_type": model_type,
        "vocab_size": VOCAB,
        "hidden_size": hidden,
        "intermediate_size": 2 * hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
        "rms_norm_eps": 1e-6,
        "pad_token_id": TOKENS["pad"],
        "bos_token_id": TOKENS["bos"],
        "eos_token_id": TOKENS["eos"],
        "tie_word_embeddings": False,
    }
    cfg.update(extra)
    return cfg


def tiny_config(model_type: str, *, hidden: int = 32, layers: int = 2):
    """A tiny config of the given family (`config.model_type`), with the shared token ids."""
    from transformers import AutoConfig

    qwen_ids = {
        "image_token_id": TOKENS["image"],
        "video_token_id": TOKENS["video"],
        "vision_start_token_id": TOKENS["vision_start"],
        "vision_end_token_id": TOKENS["vision_end"],
    }
    head_dim = hidden // 4
    mrope = {
        "rope_type": "default",
        "rope_theta": 10000.0,
        "mrope_section": _mrope_section(head_dim),
    }
    if model_type == "qwen2_vl":
        return AutoConfig.for_model(
            "qwen2_vl",
            text_config=_text_config("qwen2_vl_text", hidden, layers, rope_parameters=mrope),
            vision_config={
                "depth": 1,
                "embed_dim": 32,
                "hidden_size": hidden,
                "mlp_ratio": 2,
                "num_heads": 2,
                "in_channels": 3,
                "patch_size": 2,
                "spatial_merge_size": 2,
                "temporal_patch_size": 2,
            },
            **qwen_ids,
        )
    if model_type == "qwen2_5_vl":
        return AutoConfig.for_model(
            "qwen2_5_vl",
            text_config=_text_config("qwen2_5_vl_text", hidden, layers, rope_parameters=mrope),
            vision_config={
                "depth": 2,
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_heads": 2,
                "in_channels": 3,
                "patch_size": 2,
                "spatial_merge_size": 2,
                "temporal_patch_size": 2,
                "window_size": 8,
                "fullatt_block_indexes": [1],
                "out_hidden_size": hidden,
            },
            **qwen_ids,
        )
    if model_type == "qwen3_vl":
        return AutoConfig.for_model(
            "qwen3_vl",
            text_config=_text_config(
                "qwen3_vl_text",
                hidden,
                layers,
                head_dim=head_dim,
                rope_parameters={**mrope, "mrope_interleaved": True},
            ),
            vision_config={
                "depth": 2,
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_heads": 2,
                "in_channels": 3,
                "patch_size": 2,
                "spatial_merge_size": 2,
                "temporal_patch_size": 2,
                "out_hidden_size": hidden,
                "num_position_embeddings": 16,
                "deepstack_visual_indexes": [0],
            },
            **qwen_ids,
        )
    if model_type == "internvl":
        return AutoConfig.for_model(
            "internvl",
            text_config=_text_config("qwen2", hidden, layers),
            vision_config={
                "model_type": "internvl_vision",
                "hidden_size": 32,
                "num_hidden_layers": 1,
                "num_attention_heads": 2,
                "intermediate_size": 64,
                "image_size": [32, 32],
                "patch_size": [4, 4],
            },
            image_token_id=TOKENS["image"],
            downsample_ratio=0.5,
            vision_feature_layer=-1,
            vision_feature_select_strategy="default",
            tie_word_embeddings=False,
        )
    if model_type == "llava_onevision":
        return AutoConfig.for_model(
            "llava_onevision",
            text_config=_text_config("qwen2", hidden, layers),
            vision_config={
                "model_type": "siglip_vision_model",
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_hidden_layers": 1,
                "num_attention_heads": 2,
                "image_size": 24,
                "patch_size": 4,
            },
            image_token_index=TOKENS["image"],
            video_token_index=TOKENS["video"],
            vision_feature_layer=-1,
            vision_feature_select_strategy="full",
            tie_word_embeddings=False,
        )
    if model_type == "llava_next_video":
        return AutoConfig.for_model(
            "llava_next_video",
            text_config=_text_config("llama", hidden, layers),
            vision_config={
                "model_type": "clip_vision_model",
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_hidden_layers": 1,
                "num_attention_heads": 2,
                "image_size": 24,
                "patch_size": 4,
                "projection_dim": 32,
            },
            image_token_index=TOKENS["image"],
            video_token_index=TOKENS["video"],
            vision_feature_layer=-1,
            vision_feature_select_strategy="default",
            spatial_pool_stride=2,
            spatial_pool_mode="average",
            tie_word_embeddings=False,
        )
    raise ValueError(
        f"no tiny config for model_type {model_type!r}; expected one of {TINY_FAMILIES}"
    )


def _mrope_section(head_dim: int) -> list[int]:
    half = head_dim // 2
    t = half // 2
    h = (half - t) // 2
    return [t, h, half - t - h]


def tiny_model(
    model_type: str,
    *,
    seed: int = 0,
    hidden: int = 32,
    layers: int = 2,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "sdpa",
):
    """A tiny random-weight model of the family, in eval mode (seeded: same seed, same weights)."""
    from transformers import AutoModelForImageTextToText

    config = tiny_config(model_type, hidden=hidden, layers=layers)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForImageTextToText.from_config(
            config, attn_implementation=attn_implementation, dtype=dtype
        )
        # The default init of a few families leaves some weights at exactly zero or one; random
        # small weights everywhere make the tests sensitive to every term.
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.dtype.is_floating_point:
                    std = 0.5 if "embed" in name or "newline" in name else 0.08
                    if p.ndim == 1 and "norm" in name:
                        p.copy_(1.0 + 0.1 * torch.randn_like(p))
                    else:
                        p.copy_(std * torch.randn_like(p))
    return model.eval()


def _family(config) -> str:
    return config.model_type


def tiny_inputs(
    config,
    videos: list[list[int]],
    *,
    text: int | list[int] = 6,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    padding_side: str = "left",
) -> dict:
    """Inputs for a batch: `videos[b]` lists the frame counts of the videos of sample b.

    Each sample is `text` random text tokens, its videos (with the family's placeholder layout),
    then three more text tokens. Samples are padded on `padding_side` to a common length.
    Frame counts: even numbers for the Qwen families (temporal patch 2); for the LLaVA
    families every video in the batch must have the same frame count (transformers stacks them).
    """
    family = _family(config)
    if family not in TINY_FAMILIES:
        raise ValueError(f"no tiny inputs for model_type {family!r}")
    gen = torch.Generator().manual_seed(seed)
    texts = [text] * len(videos) if isinstance(text, int) else list(text)
    rows, types, extra = [], [], _Extra()
    for b, vids in enumerate(videos):
        ids = [TOKENS["bos"]] + _rand_text(texts[b], gen)
        tt = [0] * len(ids)
        for frames in vids:
            seg, seg_t = _video_tokens(config, frames, gen, extra, dtype)
            ids += seg
            tt += seg_t
        tail = _rand_text(3, gen)
        ids += tail
        tt += [0] * len(tail)
        rows.append(ids)
        types.append(tt)
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), TOKENS["pad"], dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    mm_types = torch.zeros((len(rows), width), dtype=torch.long)
    for b, (r, t) in enumerate(zip(rows, types, strict=True)):
        sl = slice(width - len(r), width) if padding_side == "left" else slice(0, len(r))
        input_ids[b, sl] = torch.tensor(r)
        attention_mask[b, sl] = 1
        mm_types[b, sl] = torch.tensor(t)
    out = {"input_ids": input_ids, "attention_mask": attention_mask}
    out.update(extra.finish(family, mm_types))
    return out


class _Extra:
    def __init__(self):
        self.pixels: list[torch.Tensor] = []
        self.grids: list[list[int]] = []


def _rand_text(n: int, gen: torch.Generator) -> list[int]:
    return torch.randint(TEXT_LO, TEXT_HI, (n,), generator=gen).tolist()


def _video_tokens(config, frames: int, gen, extra: _Extra, dtype) -> tuple[list[int], list[int]]:
    family = _family(config)
    vid, vs, ve = TOKENS["video"], TOKENS["vision_start"], TOKENS["vision_end"]
    if family in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl"):
        vc = config.vision_config
        tp, ps, m = vc.temporal_patch_size, vc.patch_size, vc.spatial_merge_size
        if frames % tp:
            raise ValueError(f"Qwen frame counts must be multiples of {tp}, got {frames}")
        t, h, w = frames // tp, 2 * m, 3 * m
        extra.pixels.append(
            torch.randn(t * h * w, vc.in_channels * tp * ps * ps, generator=gen).to(dtype)
        )
        extra.grids.append([t, h, w])
        per_frame = (h // m) * (w // m)
        if family == "qwen3_vl":
            # Qwen3-VL separates frames with timestamp text: <t> <vs> frame <ve> ...
            ids, tt = [], []
            for _ in range(t):
                stamp = _rand_text(1, gen)
                ids += stamp + [vs] + [vid] * per_frame + [ve]
                tt += [0, 0] + [2] * per_frame + [0]
            return ids, tt
        return [vs] + [vid] * (t * per_frame) + [ve], [0] + [2] * (t * per_frame) + [0]
    if family == "internvl":
        # InternVL feeds video frames as image tiles: one <img> ... </img> block per frame.
        vc = config.vision_config
        side = vc.image_size[0]
        per = int((side // vc.patch_size[0]) * config.downsample_ratio) ** 2
        extra.pixels.append(torch.randn(frames, 3, side, side, generator=gen).to(dtype))
        ids, tt = [], []
        for _ in range(frames):
            ids += [vs] + [TOKENS["image"]] * per + [ve]
            tt += [0] + [1] * per + [0]
        return ids, tt
    if family in ("llava_onevision", "llava_next_video"):
        vc = config.vision_config
        side = vc.image_size
        grid = side // vc.patch_size
        pooled = -(-grid // 2)
        n = frames * pooled * pooled + (1 if family == "llava_onevision" else 0)
        extra.pixels.append(torch.randn(1, frames, 3, side, side, generator=gen).to(dtype))
        return [vid] * n, [2] * n
    raise ValueError(family)


def _finish(self, family: str, mm_types: torch.Tensor) -> dict:
    if not self.pixels:
        return {}
    if family in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl"):
        return {
            "pixel_values_videos": torch.cat(self.pixels),
            "video_grid_thw": torch.tensor(self.grids, dtype=torch.long),
            "mm_token_type_ids": mm_types,
        }
    if family == "internvl":
        return {"pixel_values": torch.cat(self.pixels)}
    frames = {p.shape[1] for p in self.pixels}
    if len(frames) > 1:
        raise ValueError(
            f"{family}: every video in a batch needs the same frame count, got {frames}"
        )
    return {"pixel_values_videos": torch.cat(self.pixels)}


_Extra.finish = _finish


def clone_inputs(inputs: dict) -> dict:
    """A deep copy (generate and some models modify their inputs)."""
    return {k: v.clone() if torch.is_tensor(v) else copy.deepcopy(v) for k, v in inputs.items()}
