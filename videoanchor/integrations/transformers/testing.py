"""Tiny random-weight models and matching inputs for every supported family.

Used by the tests, the CLI smoke tests and the benchmarks: nothing here downloads weights.
Each builder makes a full vision-language model (vision tower, projector, language model)
small enough to run on a CPU in milliseconds, with the real transformers classes, so the
integration is exercised end to end.

    model = tiny_model("qwen2_5_vl")
    inputs = tiny_inputs(model.config, videos=[[4], [2, 2]])
    # sample 0: one 4-frame video, sample 1: two 2-frame videos, left-padded
    out = model(**inputs)
"""

from __future__ import annotations

import copy

import torch

__all__ = [
    "TINY_FAMILIES",
    "TOKENS",
    "VOCAB",
    "clone_inputs",
    "collate",
    "load_saved",
    "tiny_config",
    "tiny_inputs",
    "tiny_model",
    "tiny_sample",
]

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


def load_saved(path, attn_implementation: str = "videoanchor_triton", **kwargs):
    """A tiny model saved with ``save_pretrained``, loaded back in eval mode (``kwargs`` go
    to ``from_pretrained``: ``device_map``, ``tp_plan``, ...)."""
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(
        path, attn_implementation=attn_implementation, **kwargs
    ).eval()


def tiny_sample(
    config, videos: list[int], *, text: int = 6, seed: int = 0, dtype=torch.float32
) -> dict:
    """Inputs of one sample (batch 1): ``text`` random text tokens, the videos (frame counts
    in ``videos``, with the family's placeholder layout), then three more text tokens.

    Frame counts: multiples of 2 for the Qwen families (temporal patch 2); for the LLaVA
    families every video of a batch must have the same frame count (transformers stacks them).
    """
    family = config.model_type
    if family not in TINY_FAMILIES:
        raise ValueError(
            f"no tiny inputs for model_type {family!r}; expected one of {TINY_FAMILIES}"
        )
    gen = torch.Generator().manual_seed(seed)
    ids = [TOKENS["bos"]] + _rand_text(text, gen)
    types = [0] * len(ids)
    pixels, grids = [], []
    for frames in videos:
        seg, seg_t = _video_tokens(config, frames, gen, pixels, grids, dtype)
        ids += seg
        types += seg_t
    tail = _rand_text(3, gen)
    ids += tail
    types += [0] * len(tail)
    out = {
        "input_ids": torch.tensor([ids]),
        "attention_mask": torch.ones(1, len(ids), dtype=torch.long),
    }
    if family in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl"):
        out["mm_token_type_ids"] = torch.tensor([types])
        if pixels:
            out["pixel_values_videos"] = torch.cat(pixels)
            out["video_grid_thw"] = torch.tensor(grids, dtype=torch.long)
    elif pixels:
        out["pixel_values" if family == "internvl" else "pixel_values_videos"] = torch.cat(pixels)
    return out


_SEQ_KEYS = ("input_ids", "attention_mask", "mm_token_type_ids")


def collate(samples: list[dict], *, padding_side: str = "left") -> dict:
    """Pad the per-sample sequences (pad id 0, mask 0) and concatenate the visual inputs."""
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side: expected 'left' or 'right', got {padding_side!r}")
    width = max(s["input_ids"].shape[1] for s in samples)
    out = {}
    for key in samples[0]:
        parts = [s[key] for s in samples]
        if key in _SEQ_KEYS:
            rows = []
            for p in parts:
                pad = torch.zeros(1, width - p.shape[1], dtype=p.dtype)
                rows.append(torch.cat([pad, p] if padding_side == "left" else [p, pad], dim=1))
            out[key] = torch.cat(rows)
        else:
            out[key] = torch.cat(parts)
    return out


def tiny_inputs(
    config,
    videos: list[list[int]],
    *,
    text: int | list[int] = 6,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    padding_side: str = "left",
) -> dict:
    """A batch: sample b has the videos ``videos[b]`` (frame counts) and seed ``seed + b``."""
    texts = [text] * len(videos) if isinstance(text, int) else list(text)
    samples = [
        tiny_sample(config, v, text=t, seed=seed + b, dtype=dtype)
        for b, (v, t) in enumerate(zip(videos, texts, strict=True))
    ]
    return collate(samples, padding_side=padding_side)


def _rand_text(n: int, gen: torch.Generator) -> list[int]:
    return torch.randint(TEXT_LO, TEXT_HI, (n,), generator=gen).tolist()


def _video_tokens(config, frames: int, gen, pixels: list, grids: list, dtype):
    family = config.model_type
    vid, vs, ve = TOKENS["video"], TOKENS["vision_start"], TOKENS["vision_end"]
    if family in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl"):
        vc = config.vision_config
        tp, ps, m = vc.temporal_patch_size, vc.patch_size, vc.spatial_merge_size
        if frames % tp:
            raise ValueError(f"Qwen frame counts must be multiples of {tp}, got {frames}")
        t, h, w = frames // tp, 2 * m, 3 * m
        pixels.append(
            torch.randn(t * h * w, vc.in_channels * tp * ps * ps, generator=gen).to(dtype)
        )
        grids.append([t, h, w])
        per_frame = (h // m) * (w // m)
        if family == "qwen3_vl":
            # Qwen3-VL separates frames with timestamp text: <t> <vs> frame <ve> ...
            ids, types = [], []
            for _ in range(t):
                ids += _rand_text(1, gen) + [vs] + [vid] * per_frame + [ve]
                types += [0, 0] + [2] * per_frame + [0]
            return ids, types
        n = t * per_frame
        return [vs] + [vid] * n + [ve], [0] + [2] * n + [0]
    if family == "internvl":
        # InternVL feeds video frames as image tiles: one <img> ... </img> block per frame.
        vc = config.vision_config
        side = vc.image_size[0]
        per = int((side // vc.patch_size[0]) * config.downsample_ratio) ** 2
        pixels.append(torch.randn(frames, 3, side, side, generator=gen).to(dtype))
        ids, types = [], []
        for _ in range(frames):
            ids += [vs] + [TOKENS["image"]] * per + [ve]
            types += [0] + [1] * per + [0]
        return ids, types
    # LLaVA-OneVision / LLaVA-NeXT-Video: one run of video placeholders per video.
    vc = config.vision_config
    side = vc.image_size
    grid = side // vc.patch_size
    pooled = -(-grid // 2)
    n = frames * pooled * pooled + (1 if family == "llava_onevision" else 0)
    pixels.append(torch.randn(1, frames, 3, side, side, generator=gen).to(dtype))
    return [vid] * n, [2] * n


def clone_inputs(inputs: dict) -> dict:
    """A deep copy (generate and some models modify their inputs)."""
    return {k: v.clone() if torch.is_tensor(v) else copy.deepcopy(v) for k, v in inputs.items()}


class EagerAnchorReference:
    """docs/method.md section 4 written out eagerly, as an attention implementation for transformers.

    ``softmax(Q K^T * scale + log gamma_Q[:, None] + log gamma_K[None, :] + mask) (gamma_V * V)``
    with an explicit (Sq, Skv) boolean mask from transformers' own mask builder, GQA by
    repeating K/V, in ``compute_dtype``. Shares no code with the videoanchor kernels or hooks:
    the tests use it (float64) as the independent reference, the benchmark (model dtype) as
    the authors' eager approach. Set ``scores`` ((B, S) for a cache-free forward over S tokens)
    and ``alphas`` before a forward; ``scores=None`` gives plain attention.
    """

    def __init__(self, name: str = "videoanchor_eager_reference", compute_dtype=torch.float64):
        self.name = name
        self.compute_dtype = compute_dtype
        self.scores: torch.Tensor | None = None
        self.alphas: tuple[float, float, float] = (0.0, 0.0, 0.0)

    def register(self) -> EagerAnchorReference:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

        def mask(*args, **kwargs):
            kwargs["allow_is_causal_skip"] = False
            return sdpa_mask(*args, **kwargs)

        AttentionInterface.register(self.name, self.forward)
        AttentionMaskInterface.register(self.name, mask)
        return self

    def load(self, path, **kwargs):
        """``from_pretrained`` with this attention in the language model, SDPA in the vision tower."""
        from transformers import AutoModelForImageTextToText

        model = AutoModelForImageTextToText.from_pretrained(
            path, attn_implementation=self.name, **kwargs
        )
        vc = getattr(model.config, "vision_config", None)
        if vc is not None:
            vc._attn_implementation_internal = "sdpa"
        return model.eval()

    def forward(
        self,
        module,
        query,
        key,
        value,
        attention_mask,
        dropout=0.0,
        scaling=None,
        is_causal=None,
        **kwargs,
    ):
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
        if not causal:
            return sdpa_attention_forward(
                module,
                query,
                key,
                value,
                attention_mask,
                dropout=dropout,
                scaling=scaling,
                **kwargs,
            )
        B, Hq, Sq, D = query.shape
        Skv = key.shape[2]
        cd = self.compute_dtype
        rep = Hq // key.shape[1]
        q = query.to(cd)
        k = key.to(cd).repeat_interleave(rep, dim=1)
        v = value.to(cd).repeat_interleave(rep, dim=1)
        scale = scaling if scaling is not None else D**-0.5
        logits = (q @ k.transpose(-1, -2)) * scale  # [B, Hq, Sq, Skv]
        if self.scores is not None:
            s = self.scores.to(device=q.device, dtype=cd)
            if s.shape != (B, Skv):
                raise ValueError(
                    f"reference scores: expected shape {(B, Skv)}, got {tuple(s.shape)}"
                )
            a_q, a_k, a_v = self.alphas
            logits = logits + torch.log(1 + a_q * s[:, Skv - Sq :])[:, None, :, None]
            logits = logits + torch.log(1 + a_k * s)[:, None, None, :]
            v = v * (1 + a_v * s)[:, None, :, None]
        if attention_mask is None:
            keep = torch.ones(Sq, Skv, dtype=torch.bool, device=q.device).tril(Skv - Sq)
            keep = keep[None, None]
        else:
            keep = attention_mask if attention_mask.dtype == torch.bool else attention_mask == 0
        logits = logits.masked_fill(~keep, float("-inf"))
        probs = torch.softmax(logits, dim=-1).nan_to_num(0.0)  # rows with no visible key -> 0
        out = (probs @ v).to(query.dtype)
        return out.transpose(1, 2).contiguous(), None
