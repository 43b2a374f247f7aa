"""The anchors picture: sampled frames in a grid, each overlaid with its anchor scores.

`render_anchor_figure` takes the frames the model saw, the per-token anchor scores laid
out on the model's token grid `(Tt, Gh, Gw)` and, optionally, the SSC cluster labels on
the same grid, and returns a PIL image: one tile per frame with the scores as a heat map
(opacity and colour both grow with the score, so frames stay readable where nothing is an
anchor), an optional second tile per frame coloured by cluster, frame indices and times
above each tile, and a colour bar. Only Pillow and numpy are needed.

When the model merges frames in time (Qwen2-VL/Qwen2.5-VL/Qwen3-VL put two frames in one
token), `Tt < T` and frame `i` shows token slice `i * Tt // T`; the frames of one slice (one
temporal patch) are marked as such, since their heat maps are the same.

Long videos: `render_anchor_pages` / `save_anchor_pages` split the picture into pages of at
most `MAX_HEIGHT` pixels, each with its own colour bar, use 8 columns beyond 16 frames, and
start with a time x token-row summary strip (docs/long-videos.md).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

__all__ = [
    "AnchorFigureLayout",
    "anchor_figure_layout",
    "anchor_page_paths",
    "frame_to_token_slice",
    "render_anchor_figure",
    "render_anchor_pages",
    "render_view_figure",
    "save_anchor_figure",
    "save_anchor_pages",
    "save_view_figure",
    "score_colormap",
]

PAD = 12
TITLE_H = 30
CAPTION_H = 20
LABEL_GAP = 4
COLORBAR_H = 56
MIN_WIDTH = 420
MAX_WIDTH = 4096  # widest row of tiles anchor_figure_layout accepts
MAX_HEIGHT = 2400  # default page height of render_anchor_pages / save_anchor_pages
LONG_VIDEO_FRAMES = 16  # longer videos: 8 columns and the summary strip by default
LONG_COLUMNS = 8
STRIP_CAPTION_H = 18
STRIP_AXIS_H = 16
BAND_H = 3  # the band under a caption that groups the frames of one temporal patch

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


def _inferno(values: np.ndarray) -> np.ndarray:
    pos = values * (len(_INFERNO) - 1)
    lo = np.floor(pos).astype(np.int64)
    hi = np.minimum(lo + 1, len(_INFERNO) - 1)
    frac = (pos - lo)[..., None]
    rgb = _INFERNO[lo] * (1.0 - frac) + _INFERNO[hi] * frac
    return np.rint(rgb).astype(np.uint8)


_LUT_SIZE = 4096
_LUT = _inferno(np.linspace(0.0, 1.0, _LUT_SIZE))


def score_colormap(values: np.ndarray) -> np.ndarray:
    """Map values in [0, 1] to RGB uint8 with the inferno colour map; shape (..., 3).

    Looked up in a 4096-entry table of the interpolated map (at most 1/8190 away in value).
    """
    v = np.clip(np.asarray(values, dtype=np.float64), 0.0, 1.0)
    return _LUT[np.rint(v * (_LUT_SIZE - 1)).astype(np.int64)]


def frame_to_token_slice(frame: int, num_frames: int, num_slices: int) -> int:
    """The token time slice that frame `frame` of `num_frames` belongs to."""
    return min(frame * num_slices // num_frames, num_slices - 1)


@dataclass(frozen=True)
class AnchorFigureLayout:
    """Pixel geometry of the anchors picture.

    Tiles are laid out ``columns`` per row, ``rows_per_page`` rows per page (one PNG per
    page); every page has the title (when given) and its own colour bar, and page 1 the
    time x token-row summary strip when ``strip_h > 0``. ``size`` is the (width, height) of
    page 1, the tallest; ``page_size(p)`` of page ``p``.
    """

    columns: int
    rows: int
    tile_w: int
    tile_h: int
    with_labels: bool
    title_h: int
    rows_per_page: int = 0  # 0: everything on one page
    strip_h: int = 0

    @property
    def cell_h(self) -> int:
        """Height in pixels of one frame's cell: caption, heat map, and label tile if drawn."""
        extra = LABEL_GAP + self.tile_h if self.with_labels else 0
        return CAPTION_H + self.tile_h + extra

    @property
    def pages(self) -> int:
        """Number of pages (PNG files)."""
        if not self.rows_per_page:
            return 1
        return max(1, math.ceil(self.rows / self.rows_per_page))

    @property
    def width(self) -> int:
        """Width in pixels of every page."""
        return max(PAD + self.columns * (self.tile_w + PAD), MIN_WIDTH)

    def page_rows(self, page: int) -> int:
        """Rows of tiles on page ``page`` (0-based)."""
        if not self.rows_per_page:
            return self.rows
        return max(0, min(self.rows_per_page, self.rows - page * self.rows_per_page))

    def page_size(self, page: int) -> tuple[int, int]:
        """Page ``page``'s (0-based) PNG (width, height) in pixels."""
        strip = self.strip_h if page == 0 else 0
        rows = self.page_rows(page)
        return self.width, PAD + self.title_h + strip + rows * (self.cell_h + PAD) + COLORBAR_H

    @property
    def size(self) -> tuple[int, int]:
        """Page 1's PNG (width, height) in pixels (the whole picture when it has one page)."""
        return self.page_size(0)

    def tile_page(self, k: int) -> int:
        """The page (0-based) that tile ``k`` is on."""
        r = k // self.columns
        return r // self.rows_per_page if self.rows_per_page else 0

    def tile_origin(self, k: int) -> tuple[int, int]:
        """Top-left corner of tile `k`'s caption on its page (the tile starts CAPTION_H
        below it)."""
        r, c = divmod(k, self.columns)
        page = self.tile_page(k)
        if self.rows_per_page:
            r -= page * self.rows_per_page
        top = PAD + self.title_h + (self.strip_h if page == 0 else 0)
        return PAD + c * (self.tile_w + PAD), top + r * (self.cell_h + PAD)


def _positive_int(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"expected {name} to be a positive int, got {value!r}")


def anchor_figure_layout(
    num_frames: int,
    frame_height: int,
    frame_width: int,
    *,
    columns: int | None = None,
    tile_width: int = 240,
    with_labels: bool = False,
    with_title: bool = True,
    max_height: int | None = None,
    num_slices: int | None = None,
    token_rows: int | None = None,
) -> AnchorFigureLayout:
    """The layout `render_anchor_pages` / `render_anchor_figure` use for these arguments.

    ``columns`` default: ``min(num_frames, 4)`` up to ``LONG_VIDEO_FRAMES`` frames, 8 for
    longer videos. ``max_height``: pages of at most this many pixels (None: one page; at
    least one row per page). ``num_slices`` and ``token_rows`` (the token grid's ``Tt`` and
    ``Gh``): with more than ``LONG_VIDEO_FRAMES`` frames, page 1 gets the time x token-row
    summary strip. Raises ValueError when a row of tiles would be wider than ``MAX_WIDTH``.
    """
    for name, value in (
        ("num_frames", num_frames),
        ("frame_height", frame_height),
        ("frame_width", frame_width),
        ("tile_width", tile_width),
    ):
        _positive_int(name, value)
    if columns is None:
        columns = min(num_frames, 4) if num_frames <= LONG_VIDEO_FRAMES else LONG_COLUMNS
    _positive_int("columns", columns)
    columns = min(int(columns), int(num_frames))
    width = PAD + columns * (int(tile_width) + PAD)
    if width > MAX_WIDTH:
        raise ValueError(
            f"{columns} columns of {tile_width} px make a {width} px wide picture, expected at "
            f"most {MAX_WIDTH} px; pass fewer columns or a smaller tile width"
        )
    tile_h = max(1, round(tile_width * frame_height / frame_width))
    strip_h = 0
    if num_frames > LONG_VIDEO_FRAMES and num_slices is not None and token_rows is not None:
        strip_h = _strip_geometry(num_slices, token_rows, max(width, MIN_WIDTH))[2]
    layout = AnchorFigureLayout(
        columns=columns,
        rows=math.ceil(num_frames / columns),
        tile_w=int(tile_width),
        tile_h=int(tile_h),
        with_labels=bool(with_labels),
        title_h=TITLE_H if with_title else 0,
        strip_h=strip_h,
    )
    if max_height is not None:
        _positive_int("max_height", max_height)
        fixed = PAD + layout.title_h + strip_h + COLORBAR_H
        smallest = fixed + layout.cell_h + PAD  # the title, the colour bar and one row
        if max_height < smallest:
            raise ValueError(
                f"max_height={max_height}: expected at least {smallest} px, the smallest page "
                f"these frames fit on (title, colour bar and one row of {tile_width} px wide "
                "tiles); pass a larger height or a smaller tile width"
            )
        per_page = max(1, (int(max_height) - fixed) // (layout.cell_h + PAD))
        if per_page < layout.rows:
            pages = math.ceil(layout.rows / per_page)
            # the same number of rows on every page (the last may have one fewer)
            layout = replace(layout, rows_per_page=math.ceil(layout.rows / pages))
    return layout


def _strip_geometry(num_slices: int, token_rows: int, width: int) -> tuple[int, int, int]:
    """(column width, row height, total height) of the summary strip: one column per
    temporal patch, one row per token row, a caption line above and a time axis below."""
    avail = width - 2 * PAD
    cw = int(max(1, min(16, avail // max(1, num_slices))))
    rh = int(max(2, min(12, 96 // max(1, token_rows))))
    return cw, rh, STRIP_CAPTION_H + token_rows * rh + STRIP_AXIS_H + PAD


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
    # The frame is shown half desaturated at 75 % brightness, so that the heat colours stand
    # out from it; the opacity of the heat grows linearly with the score.
    grey = base @ np.array([0.299, 0.587, 0.114])
    base = 0.75 * (0.5 * base + 0.5 * grey[..., None])
    # Upsample the token grid smoothly to the tile (float image, so no 8-bit banding).
    smap = Image.fromarray(score_map.astype(np.float32), mode="F")
    smap = np.clip(np.asarray(smap.resize((tile_w, tile_h), Image.Resampling.BILINEAR)), 0, 1)
    colour = score_colormap(smap).astype(np.float64)
    a = (alpha * (0.05 + 0.95 * smap))[..., None]
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


@dataclass(frozen=True)
class _Tile:
    caption: str
    image: np.ndarray
    scores: np.ndarray
    labels: np.ndarray | None
    patch: int | None = None  # the temporal patch (token slice) when shared with other frames
    short: str | None = None  # a shorter caption for narrow tiles


def _frame_tiles(frames, scores, labels, frame_indices, timestamps):
    num_frames, num_slices = frames.shape[0], scores.shape[0]
    slices = [frame_to_token_slice(k, num_frames, num_slices) for k in range(num_frames)]
    count = np.bincount(slices, minlength=num_slices)
    tiles = []
    for k, s in enumerate(slices):
        caption = _caption(k, frame_indices, timestamps)
        shared = count[s] > 1
        short = None
        if shared:
            caption += f"  patch {s}"
            short = f"{int(frame_indices[k]) if frame_indices is not None else k} | p{s}"
        tiles.append(
            _Tile(caption, frames[k], scores[s], None if labels is None else labels[s],
                  s if shared else None, short)
        )  # fmt: skip
    return tiles, int(count.max())


def _anchor_setup(frames, scores, labels, frame_indices, timestamps, title, columns,
                  tile_width, alpha, max_height):  # fmt: skip
    scores, labels = _check_inputs(frames, scores, labels, frame_indices, timestamps)
    if not 0.0 < float(alpha) <= 1.0:
        raise ValueError(f"expected 0 < alpha <= 1, got {alpha}")
    num_frames, height, width = frames.shape[:3]
    layout = anchor_figure_layout(
        num_frames, height, width, columns=columns, tile_width=tile_width,
        with_labels=labels is not None, with_title=title is not None, max_height=max_height,
        num_slices=scores.shape[0], token_rows=scores.shape[1],
    )  # fmt: skip
    tiles, per_patch = _frame_tiles(frames, scores, labels, frame_indices, timestamps)
    strip = None
    if layout.strip_h:
        strip = (scores, timestamps)
    return layout, tiles, per_patch, strip


def render_anchor_pages(
    frames: np.ndarray,
    scores: np.ndarray,
    *,
    labels: np.ndarray | None = None,
    frame_indices: Sequence[int] | None = None,
    timestamps: Sequence[float] | None = None,
    title: str | None = None,
    columns: int | None = None,
    tile_width: int = 240,
    alpha: float = 0.8,
    max_height: int | None = MAX_HEIGHT,
) -> list:
    """Draw the anchors picture as pages of at most ``max_height`` pixels (PIL RGB images).

    frames:        (T, H, W, 3) uint8 RGB, the frames the model saw.
    scores:        (Tt, Gh, Gw) anchor scores in [0, 1] on the model's token grid, Tt <= T.
    labels:        optional (Tt, Gh, Gw) int cluster labels; adds a cluster tile per frame.
    frame_indices: optional (T,) index of each frame in the video, shown above its tile.
    timestamps:    optional (T,) seconds, shown next to the index.
    title:         optional line across the top of every page (cut to fit; "page i/n" added).
    columns:       tiles per row (default min(T, 4), 8 beyond 16 frames); tile_width: pixels.
    alpha:         opacity of the heat map at score 1 (falling linearly to 0.05 * alpha at 0;
                   the frame underneath is shown half desaturated at 75 % brightness).
    max_height:    page height limit in pixels (None: one page).

    Every page has its own colour bar. Frames that share one temporal patch (the model
    merged them into one token slice, so their heat maps are the same) are marked: the
    caption names the patch and a band of one colour runs under the captions of the patch's
    frames. Beyond 16 frames page 1 starts with a summary strip: one column per temporal
    patch, one row per token row, each cell the largest score of that row's tokens.
    The page sizes are ``anchor_figure_layout(T, H, W, columns=..., tile_width=...,
    with_labels=..., with_title=..., max_height=..., num_slices=Tt, token_rows=Gh)``'s.
    """
    layout, tiles, per_patch, strip = _anchor_setup(
        frames, scores, labels, frame_indices, timestamps, title, columns, tile_width, alpha,
        max_height,
    )  # fmt: skip
    return _compose_pages(layout, title, tiles, alpha, labels is not None, per_patch, strip)


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
    alpha: float = 0.8,
):
    """The anchors picture on one page (no height limit), a PIL RGB image.

    The arguments are :func:`render_anchor_pages`'s; for long videos prefer that function
    (or :func:`save_anchor_pages`), which splits the picture into pages. The image size is
    `anchor_figure_layout(T, H, W, columns=..., tile_width=..., with_labels=labels is not
    None, with_title=title is not None, num_slices=Tt, token_rows=Gh).size`.
    """
    return render_anchor_pages(
        frames, scores, labels=labels, frame_indices=frame_indices, timestamps=timestamps,
        title=title, columns=columns, tile_width=tile_width, alpha=alpha, max_height=None,
    )[0]  # fmt: skip


_BAND_COLOURS = ((0, 150, 136), (233, 120, 30))  # alternate between neighbouring patches


def _fit_title(title, width, pages, page):
    text = " ".join(str(title).split())
    suffix = f" | page {page + 1}/{pages}" if pages > 1 else ""
    max_chars = max(10, (width - 2 * PAD) // 8)
    if len(text) + len(suffix) > max_chars:
        text = text[: max(3, max_chars - len(suffix) - 3)] + "..."
    return text + suffix


def _compose_pages(layout, title, tiles, alpha, with_labels, per_patch=1, strip=None):
    """The pages: optional title, the summary strip (page 1), the tiles at ``layout``'s
    positions, and a colour bar on every page."""
    from PIL import Image, ImageDraw

    small, big = _font(12), _font(15)
    pages = []
    for page in range(layout.pages):
        canvas = Image.new("RGB", layout.page_size(page), (255, 255, 255))
        draw = ImageDraw.Draw(canvas)
        if title is not None:
            text = _fit_title(title, layout.width, layout.pages, page)
            draw.text((PAD, PAD + 4), text, fill=(20, 20, 20), font=big)
        if page == 0 and strip is not None:
            _draw_strip(canvas, draw, layout, small, *strip)
        pages.append((canvas, draw))
    for k, tile in enumerate(tiles):
        canvas, draw = pages[layout.tile_page(k)]
        x, y = layout.tile_origin(k)
        caption = tile.caption
        if tile.short is not None and draw.textlength(caption, font=small) > layout.tile_w:
            caption = tile.short
        draw.text((x, y + 3), caption, fill=(40, 40, 40), font=small)
        if tile.patch is not None:
            colour = _BAND_COLOURS[tile.patch % 2]
            # the band runs on into the gap to the right when the next frame is the same patch
            nxt = tiles[k + 1].patch if k + 1 < len(tiles) else None
            same_row = (k + 1) % layout.columns != 0
            right = x + layout.tile_w + (PAD if nxt == tile.patch and same_row else 0) - 1
            yb = y + CAPTION_H - BAND_H - 1
            draw.rectangle([x, yb, right, yb + BAND_H - 1], fill=colour)
        ty = y + CAPTION_H
        canvas.paste(_heat_tile(tile.image, tile.scores, layout.tile_w, layout.tile_h, alpha),
                     (x, ty))  # fmt: skip
        if tile.labels is not None:
            lt = _label_tile(tile.image, tile.labels, layout.tile_w, layout.tile_h)
            canvas.paste(lt, (x, ty + layout.tile_h + LABEL_GAP))
    for page, (_canvas, draw) in enumerate(pages):
        _draw_colorbar(draw, layout.page_size(page), small, with_labels, per_patch)
    return [canvas for canvas, _ in pages]


def _compose(layout, title, tiles, alpha, with_labels):
    """One page of (caption, image, score map, label map or None) tiles (the views)."""
    tiles = [_Tile(c, im, sm, lm) for c, im, sm, lm in tiles]
    return _compose_pages(layout, title, tiles, alpha, with_labels)[0]


def _draw_strip(canvas, draw, layout, font, scores, timestamps):
    """Page 1's summary: column t = temporal patch t, row r = token row r, colour = the
    largest score among the row's tokens."""
    from PIL import Image

    tt, gh = scores.shape[0], scores.shape[1]
    cw, rh, _ = _strip_geometry(tt, gh, layout.width)
    x0, y0 = PAD, PAD + layout.title_h
    draw.text(
        (x0, y0 + 2),
        f"overview: {tt} temporal patches (left to right) x {gh} token rows (top to bottom), "
        "each cell the largest anchor score in that row",
        fill=(40, 40, 40), font=font,
    )  # fmt: skip
    summary = scores.max(axis=2).T  # (Gh, Tt)
    rgb = score_colormap(np.repeat(np.repeat(summary, rh, axis=0), cw, axis=1))
    ys = y0 + STRIP_CAPTION_H
    canvas.paste(Image.fromarray(rgb), (x0, ys))
    draw.rectangle([x0 - 1, ys - 1, x0 + tt * cw, ys + gh * rh], outline=(60, 60, 60))
    ya = ys + gh * rh + 2
    left, right = "patch 0", f"patch {tt - 1}"
    if timestamps is not None and np.isfinite(timestamps[0]) and np.isfinite(timestamps[-1]):
        left += f" ({float(timestamps[0]):.1f} s)"
        right += f" ({float(timestamps[-1]):.1f} s)"
    draw.text((x0, ya), left, fill=(40, 40, 40), font=font)
    rw = draw.textlength(right, font=font)
    draw.text((max(x0 + tt * cw - rw, x0 + draw.textlength(left, font=font) + 8), ya), right,
              fill=(40, 40, 40), font=font)  # fmt: skip


def _draw_colorbar(draw, size, font, with_labels, per_patch=1):
    width, height = size
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
    if per_patch > 1:
        caption += (
            f"; frames under one coloured band share a temporal patch ({per_patch} frames "
            "per token slice): same scores"
        )
    draw.text((x0, y0 + bar_h + 20), caption, fill=(40, 40, 40), font=font)


def save_anchor_figure(path: str | os.PathLike, *args, **kwargs):
    """`render_anchor_figure(*args, **kwargs)` saved as PNG at `path`; returns the image."""
    image = render_anchor_figure(*args, **kwargs)
    image.save(os.fspath(path), format="PNG")
    return image


def anchor_page_paths(path: str | os.PathLike, pages: int) -> list[str]:
    """Files of a ``pages``-page picture: ``path`` itself, then ``<stem>-p2.png``, ..."""
    path = os.fspath(path)
    stem, ext = os.path.splitext(path)
    return [path] + [f"{stem}-p{p}{ext or '.png'}" for p in range(2, pages + 1)]


def save_anchor_pages(path: str | os.PathLike, *args, **kwargs) -> list[tuple[str, object]]:
    """`render_anchor_pages(*args, **kwargs)` saved as PNG files (:func:`anchor_page_paths`);
    returns ``[(file, image), ...]``, page 1 first."""
    images = render_anchor_pages(*args, **kwargs)
    files = anchor_page_paths(path, len(images))
    for f, image in zip(files, images, strict=True):
        image.save(f, format="PNG")
    return list(zip(files, images, strict=True))


def render_view_figure(
    views: Sequence[np.ndarray],
    scores: Sequence[np.ndarray],
    *,
    labels: Sequence[np.ndarray] | None = None,
    captions: Sequence[str] | None = None,
    title: str | None = None,
    columns: int | None = None,
    tile_width: int = 240,
    alpha: float = 0.8,
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
