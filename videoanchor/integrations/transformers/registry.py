"""What differs per model family, keyed by ``config.model_type``: the only place that knows.

Adding a family is one :class:`FamilySpec` entry in :data:`FAMILIES`. Everything else
(the hooks, the attention function, the scores) is family-agnostic: it finds the module that
owns ``language_model``, reads the placeholder ids named here from the config, and reads the
projector output from the language model's input embeddings at those positions (transformers
has already scattered it there with ``masked_scatter``), so the vision encoder runs once.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

__all__ = ["FamilySpec", "VisualSegment", "FAMILIES", "get_family", "supported_families"]

# Published values (docs/method.md section 4): InternVL2-8B (alpha_Q, alpha_K, alpha_V).
# The paper gives no values for the other families; they start from the same numbers.
PAPER_ALPHAS = (4.0, 9.5, 2.5)


@dataclass(frozen=True)
class VisualSegment:
    """One image or video inside one sample, in units of language-model tokens.

    ``start``/``length`` index into that sample's visual tokens (``handle.last_visual_positions[b]``,
    which holds their column in the prompt). ``grid`` is ``(frames, rows, cols)`` when the
    family lays the tokens out on a regular grid, else None. ``order`` says how the
    ``length`` tokens are laid out:

    - ``"thw"``: frame-major, then rows, then columns (``length == t * h * w``);
    - ``"thw+newline"``: as ``"thw"`` followed by one learned newline token (LLaVA-OneVision videos);
    - ``"tiles"``: InternVL tiles, each a ``rows x cols`` grid, tile-major (``grid[0]`` tiles);
    - ``"unknown"``: a layout the registry does not describe (LLaVA anyres images).
    """

    kind: str
    start: int
    length: int
    grid: tuple[int, int, int] | None
    order: str


# A layout function gets (config, captured model kwargs, kind) and returns, for the whole batch
# in order, one (length, grid, order) per image or video of that kind, or None when it cannot say.
LayoutFn = Callable[
    [object, dict, str], "list[tuple[int, tuple[int, int, int] | None, str]] | None"
]


@dataclass(frozen=True)
class FamilySpec:
    """Per-family knowledge.

    Attributes:
        model_type: ``config.model_type`` of the top-level VLM config.
        name: human-readable family name.
        token_id_attrs: visual kind -> config attribute holding that placeholder token id.
        visual_input_kwargs: forward kwargs whose presence means the projector output is being
            scattered into the prompt in this call (a prefill with visual inputs).
        default_alphas: (alpha_q, alpha_k, alpha_v) used when configure() is not told otherwise.
        layout: see ``LayoutFn``.
        language_model_attr: attribute of the base VLM model holding the language model.
        vision_config_attr: sub-config of the vision encoder, kept on SDPA.
    """

    model_type: str
    name: str
    token_id_attrs: dict[str, str]
    visual_input_kwargs: tuple[str, ...]
    default_alphas: tuple[float, float, float] = PAPER_ALPHAS
    layout: LayoutFn | None = None
    language_model_attr: str = "language_model"
    vision_config_attr: str = "vision_config"
    notes: str = ""
    extra: dict = field(default_factory=dict)

    def token_ids(self, config, kinds) -> dict[str, int]:
        """kind -> placeholder token id, for the requested kinds this family has."""
        out = {}
        for kind in kinds:
            attr = self.token_id_attrs.get(kind)
            if attr is None:
                continue
            value = getattr(config, attr, None)
            if value is not None:
                out[kind] = int(value)
        return out


def _qwen_layout(config, kwargs, kind):
    grid = kwargs.get("video_grid_thw" if kind == "video" else "image_grid_thw")
    if grid is None:
        return None
    m = int(config.vision_config.spatial_merge_size)
    items = []
    for t, h, w in grid.tolist():
        g = (int(t), int(h) // m, int(w) // m)
        items.append((g[0] * g[1] * g[2], g, "thw"))
    return items


def _internvl_layout(config, kwargs, kind):
    # Each <img>...</img> run is one image (several tiles) or one video frame; the run lengths
    # come from the prompt, so only the per-tile grid is described here.
    return None


def _internvl_tile_grid(config) -> tuple[int, int]:
    vc = config.vision_config
    size = vc.image_size[0] if isinstance(vc.image_size, (list, tuple)) else vc.image_size
    patch = vc.patch_size[0] if isinstance(vc.patch_size, (list, tuple)) else vc.patch_size
    side = int(size // patch * config.downsample_ratio)
    return side, side


def _llava_video_layout(newline: bool):
    def layout(config, kwargs, kind):
        if kind != "video":
            return None  # anyres images: layout depends on image_sizes and packing
        vc = config.vision_config
        side = vc.image_size // vc.patch_size
        stride = int(getattr(config, "spatial_pool_stride", 2) or 2)
        pooled = math.ceil(side / stride) if newline else side // stride
        pv = kwargs.get("pixel_values_videos")
        if pv is not None and pv.dim() == 5:
            n_videos, frames = int(pv.shape[0]), int(pv.shape[1])
        else:  # precomputed features (mm_encoder_outputs): (videos, frames * pooled^2 [+ 1], D)
            encoded = (kwargs.get("mm_encoder_outputs") or {}).get("video")
            po = getattr(encoded, "pooler_output", None)
            if not torch.is_tensor(po) or po.dim() != 3:
                return None
            n_videos, tokens = int(po.shape[0]), int(po.shape[1]) - (1 if newline else 0)
            if tokens <= 0 or tokens % (pooled * pooled):
                return None
            frames = tokens // (pooled * pooled)
        g = (frames, pooled, pooled)
        length = frames * pooled * pooled + (1 if newline else 0)
        return [(length, g, "thw+newline" if newline else "thw")] * n_videos

    return layout


_QWEN_INPUTS = (
    "pixel_values",
    "pixel_values_videos",
    "mm_encoder_outputs",
    "image_embeds",
    "video_embeds",
)
_LLAVA_INPUTS = ("pixel_values", "pixel_values_videos", "mm_encoder_outputs", "image_features")

FAMILIES: dict[str, FamilySpec] = {
    spec.model_type: spec
    for spec in (
        FamilySpec(
            "qwen2_vl",
            "Qwen2-VL",
            {"video": "video_token_id", "image": "image_token_id"},
            _QWEN_INPUTS,
            layout=_qwen_layout,
        ),
        FamilySpec(
            "qwen2_5_vl",
            "Qwen2.5-VL",
            {"video": "video_token_id", "image": "image_token_id"},
            _QWEN_INPUTS,
            layout=_qwen_layout,
        ),
        FamilySpec(
            "qwen3_vl",
            "Qwen3-VL",
            {"video": "video_token_id", "image": "image_token_id"},
            _QWEN_INPUTS,
            layout=_qwen_layout,
            notes="video frames are separated by timestamp text; a video's tokens are not contiguous",
        ),
        FamilySpec(
            "internvl",
            "InternVL (2/2.5/3, transformers' InternVL classes)",
            {"image": "image_token_id", "video": "video_token_id"},
            ("pixel_values", "mm_encoder_outputs", "image_features"),
            layout=_internvl_layout,
            notes="video frames are fed as image tiles; each <img> run is one segment",
        ),
        FamilySpec(
            "llava_onevision",
            "LLaVA-OneVision",
            {"video": "video_token_id", "image": "image_token_id"},
            _LLAVA_INPUTS,
            layout=_llava_video_layout(newline=True),
        ),
        FamilySpec(
            "llava_next_video",
            "LLaVA-NeXT-Video",
            {"video": "video_token_id", "image": "image_token_id"},
            _LLAVA_INPUTS,
            layout=_llava_video_layout(newline=False),
        ),
    )
}


def supported_families() -> list[str]:
    """The supported ``config.model_type`` values, sorted."""
    return sorted(FAMILIES)


def get_family(config) -> FamilySpec:
    """The registry entry for ``config.model_type``; ValueError naming the supported ones."""
    model_type = getattr(config, "model_type", None)
    spec = FAMILIES.get(model_type)
    if spec is None:
        names = ", ".join(f"{k} ({v.name})" for k, v in sorted(FAMILIES.items()))
        raise ValueError(
            f"videoanchor: model family {model_type!r} is not supported; expected config.model_type "
            f"to be one of: {names}. Adding a family is one FamilySpec entry in "
            "videoanchor/integrations/registry.py."
        )
    return spec


def segments_for_batch(
    spec: FamilySpec,
    config,
    kwargs: dict,
    input_ids: torch.Tensor,
    visual_mask: dict[str, torch.Tensor],
) -> list[list[VisualSegment]]:
    """Per sample, the images/videos in prompt order with their token grids.

    ``visual_mask[kind]`` is the (B, S) bool mask of the scored placeholder positions of that
    kind. Segment ``start`` indexes the sample's visual tokens of all scored kinds together,
    in prompt order.
    """
    B = input_ids.shape[0]
    any_mask = None
    for m in visual_mask.values():
        any_mask = m if any_mask is None else any_mask | m
    out: list[list[VisualSegment]] = [[] for _ in range(B)]
    if any_mask is None:
        return out
    for kind, mask in visual_mask.items():
        items = spec.layout(config, kwargs, kind) if spec.layout is not None else None
        item_iter = iter(items) if items else None
        for b in range(B):
            cols = torch.nonzero(mask[b]).flatten().tolist()
            if not cols:
                continue
            all_cols = torch.nonzero(any_mask[b]).flatten().tolist()
            index_of = {c: i for i, c in enumerate(all_cols)}
            pos = 0
            while pos < len(cols):
                item = next(item_iter, None) if item_iter is not None else None
                if item is not None and pos + item[0] <= len(cols):
                    length, grid, order = item
                else:
                    # One segment per contiguous run of placeholders.
                    length = 1
                    while (
                        pos + length < len(cols)
                        and cols[pos + length] == cols[pos + length - 1] + 1
                    ):
                        length += 1
                    grid, order = None, "unknown"
                    if spec.model_type == "internvl":
                        rows, colsz = _internvl_tile_grid(config)
                        if length % (rows * colsz) == 0:
                            grid, order = (length // (rows * colsz), rows, colsz), "tiles"
                out[b].append(VisualSegment(kind, index_of[cols[pos]], length, grid, order))
                pos += length
    for segs in out:
        segs.sort(key=lambda s: s.start)
    return out
