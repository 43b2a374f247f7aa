"""The anchors picture: sampled frames in a grid, each overlaid with its anchor scores.

`render_anchor_figure` takes the frames the model saw, the per-token anchor scores laid
out on the model's token grid `(Tt, Gh, Gw)` and, optionally, the SSC cluster labels on
the same grid, and returns a PIL image: one tile per frame with the scores as a heat map
(opacity and colour both grow with the score, so frames stay readable where nothing is an
anchor), an optional second tile per frame coloured by cluster, frame indices and times
above each tile, and a colour bar. Only Pillow and numpy are needed.

When the model merges frames in time (Qwen2-VL/Qwen2.5-VL/Qwen3-VL put two frames in one
token), `Tt < T` and frame `i` shows token slice `i * Tt // T`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = [
    "AnchorFigureLayout",
    "anchor_figure_layout",
    "frame_to_token_slice",
    "render_anchor_figure",
    "render_view_figure",
    "save_anchor_figure",
    "save_view_figure",
    "score_colormap",
]

PAD = 12
TITLE_H = 30
CAPTION_H = 20
LABEL_GAP = 4
COLORBAR_H = 56
MIN_WIDTH = 420

# Control points of matplotlib's "inferno" colour map (perceptually uniform, dark -> bright),
# interpolated linearly between them.
_INFERNO = np.array(
    [
        [0, 0, 4],
        [31, 12, 72],
        [85, 15, 109],
        [136, 34, 106],
        [186, 54, 85],
        [227, 89, 51],
        [249, 140, 10],
        [249, 201, 50],
        [252, 255, 164],
    ],
    dtype=np.float64,
)

# 24 distinguishable colours for cluster labels (tab20 followed by four more); label k uses
# colour k mod 24.
_CLUSTER_COLOURS = np.array(
    [
        [31, 119, 180], [255, 127, 14], [44, 160, 44], [214, 39, 40], [148, 103, 189],
        [140, 86, 75], [227, 119, 194], [127, 127, 127], [188, 189, 34], [23, 190, 207],
        [174, 199, 232], [255, 187, 120], [152, 223, 138], [255, 152, 150], [197, 176, 213],
        [196, 156, 148], [247, 182, 210], [199, 199, 199], [219, 219, 141], [158, 218, 229],
        [0, 0, 128], [128, 0, 0], [0, 128, 128], [255, 215, 0],
    ],
    dtype=np.uint8,
)  # fmt: skip


def score_colormap(values: np.ndarray) -> np.ndarray:
    """Map values in [0, 1] to RGB uint8 with the inferno colour map; shape (..., 3)."""
    v = np.clip(np.asarray(values, dtype=np.float64), 0.0, 1.0)
    pos = v * (len(_INFERNO) - 1)
    lo = np.floor(pos).astype(np.int64)
    hi = np.minimum(lo + 1, len(_INFERNO) - 1)
    frac = (pos - lo)[..., None]
    rgb = _INFERNO[lo] * (1.0 - frac) + _INFERNO[hi] * frac
    return np.rint(rgb).astype(np.uint8)


def frame_to_token_slice(frame: int, num_frames: int, num_slices: int) -> int:
    """The token time slice that frame `frame` of `num_frames` belongs to."""
    return min(frame * num_slices // num_frames, num_slices - 1)


@dataclass(frozen=True)
class AnchorFigureLayout:
    """Pixel geometry of the anchors picture; `size` is the PNG's (width, height)."""

    columns: int
    rows: int
    tile_w: int
    tile_h: int
    with_labels: bool
    title_h: int

    @property
    def cell_h(self) -> int:
        """Height in pixels of one frame's cell: caption, heat map, and label tile if drawn."""
        extra = LABEL_GAP + self.tile_h if self.with_labels else 0
        return CAPTION_H + self.tile_h + extra

    @property
    def size(self) -> tuple[int, int]:
        """The PNG's (width, height) in pixels."""
        width = max(PAD + self.columns * (self.tile_w + PAD), MIN_WIDTH)
        height = PAD + self.title_h + self.rows * (self.cell_h + PAD) + COLORBAR_H
        return width, height

    def tile_origin(self, k: int) -> tuple[int, int]:
        """Top-left corner of frame `k`'s caption (the tile starts CAPTION_H below it)."""
        r, c = divmod(k, self.columns)
        return PAD + c * (self.tile_w + PAD), PAD + self.title_h + r * (self.cell_h + PAD)


def anchor_figure_layout(
    num_frames: int,
    frame_height: int,
    frame_width: int,
    *,
    columns: int | None = None,
    tile_width: int = 240,
    with_labels: bool = False,
    with_title: bool = True,
) -> AnchorFigureLayout:
    """The layout `render_anchor_figure` uses for these arguments (see its docstring)."""
    for name, value in (
        ("num_frames", num_frames),
        ("frame_height", frame_height),
        ("frame_width", frame_width),
        ("tile_width", tile_width),
    ):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"expected {name} to be a positive int, got {value!r}")
    if columns is None:
        columns = min(num_frames, 4)
    if isinstance(columns, bool) or not isinstance(columns, (int, np.integer)) or columns < 1:
        raise ValueError(f"expected columns to be a positive int, got {columns!r}")
    columns = min(int(columns), int(num_frames))
    tile_h = max(1, round(tile_width * frame_height / frame_width))
    return AnchorFigureLayout(
        columns=columns,
        rows=math.ceil(num_frames / columns),
        tile_w=int(tile_width),
        tile_h=int(tile_h),
        with_labels=bool(with_labels),
        title_h=TITLE_H if with_title else 0,
    )


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has one fixed-size bitmap font
        return ImageFont.load_default()


def _check_inputs(frames, scores, labels, frame_indices, timestamps):
    if not isinstance(frames, np.ndarray) or frames.ndim != 4 or frames.shape[-1] != 3:
        got = getattr(frames, "shape", type(frames).__name__)
        raise ValueError(f"expected frames as a (T, H, W, 3) array, got {got}")
    if frames.dtype != np.uint8:
        raise TypeError(f"expected uint8 RGB frames, got dtype {frames.dtype}")
    scores = np.asarray(scores)
    if scores.ndim != 3 or min(scores.shape) < 1:
        raise ValueError(
            f"expected scores on the token grid (Tt, Gh, Gw), got shape {scores.shape}"
        )
    if not np.issubdtype(scores.dtype, np.floating):
        raise TypeError(f"expected floating-point scores, got dtype {scores.dtype}")
    if not np.isfinite(scores).all():
        raise ValueError("scores contain NaN or inf; anchor scores must be finite")
    if scores.min() < -1e-6 or scores.max() > 1 + 1e-6:
        raise ValueError(
            "expected normalised anchor scores in [0, 1], got values in "
            f"[{scores.min():.4g}, {scores.max():.4g}]"
        )
    num_frames, num_slices = frames.shape[0], scores.shape[0]
    if num_slices > num_frames:
        raise ValueError(
            f"scores have {num_slices} time slices but only {num_frames} frames were given; "
            "expected at most one slice per frame"
        )
    if labels is not None:
        labels = np.asarray(labels)
        if labels.shape != scores.shape:
            raise ValueError(
                f"expected labels with the scores' shape {scores.shape}, got {labels.shape}"
            )
        if not np.issubdtype(labels.dtype, np.integer):
            raise TypeError(f"expected integer cluster labels, got dtype {labels.dtype}")
        if labels.min() < 0:
            raise ValueError(f"expected cluster labels >= 0, got {labels.min()}")
    for name, seq in (("frame_indices", frame_indices), ("timestamps", timestamps)):
        if seq is not None and len(seq) != num_frames:
            raise ValueError(f"expected {num_frames} {name} (one per frame), got {len(seq)}")
    return scores.astype(np.float64), labels


def _heat_tile(frame, score_map, tile_w, tile_h, alpha):
    from PIL import Image

    base = np.asarray(
        Image.fromarray(frame).resize((tile_w, tile_h), Image.Resampling.BILINEAR), dtype=np.float64
    )
    # Upsample the token grid smoothly to the tile (float image, so no 8-bit banding).
    smap = Image.fromarray(score_map.astype(np.float32), mode="F")
    smap = np.clip(np.asarray(smap.resize((tile_w, tile_h), Image.Resampling.BILINEAR)), 0, 1)
    colour = score_colormap(smap).astype(np.float64)
    a = (alpha * (0.1 + 0.9 * smap**1.5))[..., None]
    out = base * (1.0 - a) + colour * a
    return Image.fromarray(np.rint(out).astype(np.uint8))


def _label_tile(frame, label_map, tile_w, tile_h):
    from PIL import Image

    base = np.asarray(
        Image.fromarray(frame).resize((tile_w, tile_h), Image.Resampling.BILINEAR), dtype=np.float64
    )
    gh, gw = label_map.shape
    rows = np.minimum(np.arange(tile_h) * gh // tile_h, gh - 1)
    cols = np.minimum(np.arange(tile_w) * gw // tile_w, gw - 1)
    lab = label_map[rows[:, None], cols[None, :]]
    colour = _CLUSTER_COLOURS[lab % len(_CLUSTER_COLOURS)].astype(np.float64)
    out = 0.35 * base + 0.65 * colour
    # Thin dark lines where the cluster changes, so neighbouring clusters stay apart.
    edge = np.zeros((tile_h, tile_w), dtype=bool)
    edge[1:, :] |= lab[1:, :] != lab[:-1, :]
    edge[:, 1:] |= lab[:, 1:] != lab[:, :-1]
    out[edge] *= 0.45
    return Image.fromarray(np.rint(out).astype(np.uint8))


def _caption(k, frame_indices, timestamps):
    parts = []
    if frame_indices is not None:
        parts.append(f"frame {int(frame_indices[k])}")
    else:
        parts.append(f"frame #{k}")
    if timestamps is not None and np.isfinite(timestamps[k]):
        parts.append(f"{float(timestamps[k]):.2f} s")
    return "  ".join(parts)


def render_anchor_figure(
    frames: np.ndarray,
    scores: np.ndarray,
    *,
    labels: np.ndarray | None = None,
    frame_indices: Sequence[int] | None = None,
    timestamps: Sequence[float] | None = None,
    title: str | None = None,
    columns: int | None = None,
    tile_width: int = 240,
    alpha: float = 0.7,
):
    """Draw the anchors picture and return it as a PIL RGB image.

    frames:        (T, H, W, 3) uint8 RGB, the frames the model saw.
    scores:        (Tt, Gh, Gw) anchor scores in [0, 1] on the model's token grid, Tt <= T.
    labels:        optional (Tt, Gh, Gw) int cluster labels; adds a cluster tile per frame.
    frame_indices: optional (T,) index of each frame in the video, shown above its tile.
    timestamps:    optional (T,) seconds, shown next to the index.
    title:         optional line across the top (cut to fit).
    columns:       tiles per row (default min(T, 4)); tile_width: tile width in pixels.
    alpha:         opacity of the heat map at score 1 (falling as s**1.5 to 0.1 * alpha at 0).

    The image size is `anchor_figure_layout(T, H, W, columns=..., tile_width=...,
    with_labels=labels is not None, with_title=title is not None).size`.
    """
    scores, labels = _check_inputs(frames, scores, labels, frame_indices, timestamps)
    if not 0.0 < float(alpha) <= 1.0:
        raise ValueError(f"expected 0 < alpha <= 1, got {alpha}")
    num_frames, height, width = frames.shape[:3]
    layout = anchor_figure_layout(
        num_frames,
        height,
        width,
        columns=columns,
        tile_width=tile_width,
        with_labels=labels is not None,
        with_title=title is not None,
    )
    num_slices = scores.shape[0]
    tiles = []
    for k in range(num_frames):
        s = frame_to_token_slice(k, num_frames, num_slices)
        lmap = None if labels is None else labels[s]
        tiles.append((_caption(k, frame_indices, timestamps), frames[k], scores[s], lmap))
    return _compose(layout, title, tiles, alpha, labels is not None)


def _compose(layout, title, tiles, alpha, with_labels):
    """The figure: optional title, one (caption, image, score map, label map or None) tile
    per frame or view at ``layout``'s positions, and the colour bar."""
    from PIL import Image, ImageDraw

    canvas = Image.new("RGB", layout.size, (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    small, big = _font(12), _font(15)
    if title is not None:
        text = " ".join(str(title).split())
        max_chars = max(10, (layout.size[0] - 2 * PAD) // 8)
        if len(text) > max_chars:
            text = text[: max_chars - 3] + "..."
        draw.text((PAD, PAD + 4), text, fill=(20, 20, 20), font=big)
    for k, (caption, image, smap, lmap) in enumerate(tiles):
        x, y = layout.tile_origin(k)
        draw.text((x, y + 3), caption, fill=(40, 40, 40), font=small)
        ty = y + CAPTION_H
        canvas.paste(_heat_tile(image, smap, layout.tile_w, layout.tile_h, alpha), (x, ty))
        if lmap is not None:
            tile = _label_tile(image, lmap, layout.tile_w, layout.tile_h)
            canvas.paste(tile, (x, ty + layout.tile_h + LABEL_GAP))
    _draw_colorbar(draw, layout, small, with_labels)
    return canvas


def _draw_colorbar(draw, layout, font, with_labels):
    width, height = layout.size
    bar_w, bar_h = min(320, width - 2 * PAD), 12
    x0, y0 = PAD, height - COLORBAR_H + 6
    ramp = score_colormap(np.linspace(0.0, 1.0, bar_w))
    for i in range(bar_w):
        draw.line([(x0 + i, y0), (x0 + i, y0 + bar_h - 1)], fill=tuple(int(c) for c in ramp[i]))
    draw.rectangle([x0 - 1, y0 - 1, x0 + bar_w, y0 + bar_h], outline=(60, 60, 60))
    for t in (0.0, 0.25, 0.5, 0.75, 1.0):
        tx = x0 + round(t * (bar_w - 1))
        draw.line([(tx, y0 + bar_h), (tx, y0 + bar_h + 3)], fill=(60, 60, 60))
        label = f"{t:g}"
        draw.text((tx - 3 * len(label), y0 + bar_h + 4), label, fill=(40, 40, 40), font=font)
    caption = "anchor score (0: ordinary token, 1: strongest anchor)"
    if with_labels:
        caption += "; lower tiles: SSC clusters, one colour each"
    draw.text((x0, y0 + bar_h + 20), caption, fill=(40, 40, 40), font=font)


def save_anchor_figure(path: str | os.PathLike, *args, **kwargs):
    """`render_anchor_figure(*args, **kwargs)` saved as PNG at `path`; returns the image."""
    image = render_anchor_figure(*args, **kwargs)
    image.save(os.fspath(path), format="PNG")
    return image


def render_view_figure(
    views: Sequence[np.ndarray],
    scores: Sequence[np.ndarray],
    *,
    labels: Sequence[np.ndarray] | None = None,
    captions: Sequence[str] | None = None,
    title: str | None = None,
    columns: int | None = None,
    tile_width: int = 240,
    alpha: float = 0.7,
):
    """The anchors picture of several views of one scene (multi-view images).

    views:    V images, each (H_k, W_k, 3) uint8 RGB (sizes may differ).
    scores:   V score maps in [0, 1], each (Gh_k, Gw_k) on that view's own token grid.
    labels:   optional V int cluster-label maps with the scores' shapes.
    captions: optional V lines shown above the tiles (default "view k").

    Tiles have the first view's aspect ratio (other views are resized to it for display);
    the layout is `anchor_figure_layout(V, H_0, W_0, ...)`, as for `render_anchor_figure`.
    """
    n = len(views)
    if n < 1:
        raise ValueError("expected at least one view, got none")
    if len(scores) != n:
        raise ValueError(f"expected one score map per view ({n}), got {len(scores)}")
    if labels is not None and len(labels) != n:
        raise ValueError(f"expected one label map per view ({n}), got {len(labels)}")
    if captions is not None and len(captions) != n:
        raise ValueError(f"expected one caption per view ({n}), got {len(captions)}")
    if not 0.0 < float(alpha) <= 1.0:
        raise ValueError(f"expected 0 < alpha <= 1, got {alpha}")
    checked = []
    for k in range(n):
        view = views[k]
        if not isinstance(view, np.ndarray) or view.ndim != 3:
            got = getattr(view, "shape", type(view).__name__)
            raise ValueError(f"view {k}: expected an (H, W, 3) uint8 image, got {got}")
        s = np.asarray(scores[k])
        if s.ndim != 2:
            raise ValueError(f"view {k}: expected a (Gh, Gw) score map, got shape {s.shape}")
        lab = None if labels is None else np.asarray(labels[k])[None]
        s, lab = _check_inputs(view[None], s[None], lab, None, None)
        checked.append((view, s[0], None if lab is None else lab[0]))
    layout = anchor_figure_layout(
        n,
        views[0].shape[0],
        views[0].shape[1],
        columns=columns,
        tile_width=tile_width,
        with_labels=labels is not None,
        with_title=title is not None,
    )
    tiles = [
        (captions[k] if captions is not None else f"view {k}", view, smap, lmap)
        for k, (view, smap, lmap) in enumerate(checked)
    ]
    return _compose(layout, title, tiles, alpha, labels is not None)


def save_view_figure(path: str | os.PathLike, *args, **kwargs):
    """`render_view_figure(*args, **kwargs)` saved as PNG at `path`; returns the image."""
    image = render_view_figure(*args, **kwargs)
    image.save(os.fspath(path), format="PNG")
    return image
