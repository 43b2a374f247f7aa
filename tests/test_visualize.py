from pathlib import Path

import numpy as np
import pytest
from test_cli_support import moving_shapes

from videoanchor.visualize import (
    CAPTION_H,
    anchor_figure_layout,
    frame_to_token_slice,
    render_anchor_figure,
    save_anchor_figure,
    score_colormap,
)


def _scores(tt=3, gh=4, gw=6, seed=0):
    return np.random.default_rng(seed).random((tt, gh, gw)) * 0.2


def test_colormap_ends_and_monotone_brightness():
    rgb = score_colormap(np.linspace(0, 1, 11)).astype(int)
    assert rgb.shape == (11, 3)
    np.testing.assert_array_equal(rgb[0], [0, 0, 4])
    np.testing.assert_array_equal(rgb[-1], [252, 255, 164])
    assert (np.diff(rgb.sum(axis=1)) > 0).all()


def test_frame_to_token_slice_pairs_frames_when_time_is_merged():
    assert [frame_to_token_slice(i, 6, 3) for i in range(6)] == [0, 0, 1, 1, 2, 2]
    assert [frame_to_token_slice(i, 5, 5) for i in range(5)] == [0, 1, 2, 3, 4]
    assert [frame_to_token_slice(i, 5, 3) for i in range(5)] == [0, 0, 1, 1, 2]


@pytest.mark.parametrize("with_labels", [False, True], ids=["heat", "heat+clusters"])
@pytest.mark.parametrize("columns", [None, 2], ids=["auto-cols", "2-cols"])
def test_figure_size_follows_layout(tmp_path, with_labels, columns):
    frames = moving_shapes(5, 64, 96)
    scores = _scores(3)
    labels = np.arange(3 * 4 * 6).reshape(3, 4, 6) % 7 if with_labels else None
    path = tmp_path / "a.png"
    save_anchor_figure(
        path, frames, scores, labels=labels, title="t", columns=columns, tile_width=120
    )
    from PIL import Image

    with Image.open(path) as img:
        assert img.format == "PNG" and img.mode == "RGB"
        size = img.size
    cols = 4 if columns is None else 2
    rows = -(-5 // cols)
    tile_h = 80  # 120 * 64 / 96
    cell_h = CAPTION_H + tile_h + ((4 + tile_h) if with_labels else 0)
    assert size == (max(12 + cols * 132, 420), 12 + 30 + rows * (cell_h + 12) + 56)
    assert (
        size
        == anchor_figure_layout(
            5, 64, 96, columns=columns, tile_width=120, with_labels=with_labels
        ).size
    )


def test_heat_map_marks_the_high_score_token():
    # Uniform grey frames: any colour in the tile comes from the heat map.
    frames = np.full((2, 64, 96, 3), 128, dtype=np.uint8)
    scores = np.zeros((2, 4, 6))
    scores[1, 2, 4] = 1.0  # one anchor, second frame, row 2 col 4
    img = np.asarray(render_anchor_figure(frames, scores, tile_width=96, title=None))
    layout = anchor_figure_layout(2, 64, 96, tile_width=96, with_title=False)
    x0, y0 = layout.tile_origin(1)
    tile = img[y0 + CAPTION_H : y0 + CAPTION_H + 64, x0 : x0 + 96].astype(int)
    hot = tile[2 * 16 + 8, 4 * 16 + 8]  # centre of token (2, 4)
    cold = tile[8, 8]  # centre of token (0, 0)
    assert hot.sum() > cold.sum() + 150, (hot, cold)
    assert hot[0] > hot[2]  # warm colour, not grey
    # The first frame has no anchor: its tile is uniform.
    x0, y0 = layout.tile_origin(0)
    tile0 = img[y0 + CAPTION_H : y0 + CAPTION_H + 64, x0 : x0 + 96].astype(int)
    assert np.ptp(tile0) <= 2


def test_cluster_tiles_show_label_colours():
    frames = np.full((1, 32, 32, 3), 128, dtype=np.uint8)
    scores = np.zeros((1, 2, 2))
    labels = np.array([[[0, 0], [3, 3]]])
    img = np.asarray(render_anchor_figure(frames, scores, labels=labels, tile_width=64))
    layout = anchor_figure_layout(1, 32, 32, tile_width=64, with_labels=True)
    x0, y0 = layout.tile_origin(0)
    ly = y0 + CAPTION_H + 64 + 4
    top, bottom = img[ly + 10, x0 + 30].astype(int), img[ly + 50, x0 + 30].astype(int)
    assert np.abs(top - bottom).sum() > 60


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(scores=np.full((1, 2, 2), np.nan)), ValueError, "NaN"),
        (dict(scores=np.full((1, 2, 2), 1.5)), ValueError, r"\[0, 1\]"),
        (dict(scores=np.zeros((2, 2))), ValueError, "token grid"),
        (dict(scores=np.zeros((4, 2, 2))), ValueError, "time slices"),
        (dict(scores=np.zeros((1, 2, 2), np.int64)), TypeError, "floating"),
        (dict(labels=np.zeros((1, 2, 3), np.int64)), ValueError, "labels"),
        (dict(labels=np.zeros((1, 2, 2))), TypeError, "integer"),
        (dict(frames=np.zeros((2, 8, 8, 3), np.float32)), TypeError, "uint8"),
        (dict(frame_indices=[1]), ValueError, "frame_indices"),
    ],
    ids=["nan", "range", "2d", "too-many-slices", "int-scores", "label-shape", "float-labels",
         "float-frames", "indices-len"],
)  # fmt: skip
def test_render_rejects_bad_input(kwargs, error, match):
    args = dict(frames=np.zeros((2, 8, 8, 3), np.uint8), scores=np.zeros((1, 2, 2)))
    args.update(kwargs)
    frames, scores = args.pop("frames"), args.pop("scores")
    with pytest.raises(error, match=match):
        render_anchor_figure(frames, scores, **args)


# ---- long videos: pages, a colour bar per page, the summary strip, shared temporal patches


@pytest.mark.parametrize("num_frames", [64, 256])
def test_long_video_picture_is_paged_and_each_page_is_readable(tmp_path, num_frames):
    from PIL import Image

    from videoanchor.visualize import (
        _BAND_COLOURS,
        BAND_H,
        COLORBAR_H,
        MAX_HEIGHT,
        MAX_WIDTH,
        PAD,
        TITLE_H,
        save_anchor_pages,
    )

    tt, gh, gw = num_frames // 2, 3, 5  # two frames per temporal patch, as Qwen does
    frames = np.zeros((num_frames, 18, 32, 3), np.uint8) + 100
    rng = np.random.default_rng(num_frames)
    scores = rng.random((tt, gh, gw))
    labels = rng.integers(0, 24, (tt, gh, gw))
    tile_width = 240 if num_frames == 64 else 96
    pages = save_anchor_pages(
        tmp_path / "a.png", frames, scores, labels=labels, title="long",
        frame_indices=np.arange(num_frames) * 2, timestamps=np.arange(num_frames) * 0.5,
        tile_width=tile_width,
    )  # fmt: skip
    layout = anchor_figure_layout(
        num_frames, 18, 32, tile_width=tile_width, with_labels=True, max_height=MAX_HEIGHT,
        num_slices=tt, token_rows=gh,
    )  # fmt: skip
    assert layout.columns == 8 and layout.rows == num_frames // 8
    assert layout.pages == len(pages) and len(pages) > 1
    assert layout.tile_page(num_frames - 1) == len(pages) - 1  # every frame is drawn
    expected_names = ["a.png"] + [f"a-p{p}.png" for p in range(2, len(pages) + 1)]
    assert [Path(f).name for f, _ in pages] == expected_names
    per_page = [layout.page_rows(p) for p in range(layout.pages)]
    assert sum(per_page) == layout.rows and max(per_page) - min(per_page) <= 1  # balanced
    for p, (f, _) in enumerate(pages):
        with Image.open(f) as img:
            size, px = img.size, np.asarray(img.convert("RGB")).astype(int)
        assert size == layout.page_size(p)
        assert size[0] <= MAX_WIDTH and size[1] <= MAX_HEIGHT
        # every page ends with its own colour bar: 0 at the left end, 1 at the right end
        y = size[1] - COLORBAR_H + 6 + 5
        bar_w = min(320, size[0] - 2 * PAD)
        np.testing.assert_array_equal(px[y, PAD], score_colormap(0.0))
        np.testing.assert_array_equal(px[y, PAD + bar_w - 1], score_colormap(1.0))
    first = np.asarray(pages[0][1]).astype(int)
    # page 1's summary strip: cell (patch t, row r) is the row's largest score
    from videoanchor.visualize import STRIP_CAPTION_H, _strip_geometry

    cw, rh, strip_h = _strip_geometry(tt, gh, layout.width)
    assert layout.strip_h == strip_h > 0
    ys = PAD + TITLE_H + STRIP_CAPTION_H
    for t, r in ((0, 0), (tt - 1, gh - 1), (tt // 3, 1)):
        cell = first[ys + r * rh + rh // 2, PAD + t * cw + cw // 2]
        np.testing.assert_array_equal(cell, score_colormap(scores[t, r].max()))
    # frames 0 and 1 share patch 0 (one band across both and the gap), frame 2 starts patch 1
    x0, y0 = layout.tile_origin(0)
    yb = y0 + 20 - BAND_H  # CAPTION_H - BAND_H - 1, middle row of the band
    np.testing.assert_array_equal(first[yb, x0 + 5], _BAND_COLOURS[0])
    np.testing.assert_array_equal(first[yb, x0 + layout.tile_w + PAD // 2], _BAND_COLOURS[0])
    x2, _ = layout.tile_origin(2)
    np.testing.assert_array_equal(first[yb, x2 + 5], _BAND_COLOURS[1])
    np.testing.assert_array_equal(first[yb, x2 - PAD // 2], [255, 255, 255])  # no band between


def test_heat_overlay_contrast_between_score_0_and_1():
    frames = np.full((2, 16, 16, 3), 128, np.uint8)
    scores = np.stack([np.zeros((2, 2)), np.ones((2, 2))])
    img = np.asarray(render_anchor_figure(frames, scores, tile_width=32, title=None)).astype(int)
    layout = anchor_figure_layout(2, 16, 16, tile_width=32, with_title=False)
    lum = []
    for k in range(2):
        x, y = layout.tile_origin(k)
        lum.append(img[y + CAPTION_H + 16, x + 16] @ np.array([0.299, 0.587, 0.114]))
    assert lum[1] - lum[0] > 110, lum  # the earlier overlay gave about 90 here


def test_layout_rejects_a_picture_too_wide():
    with pytest.raises(ValueError, match="fewer columns"):
        anchor_figure_layout(64, 90, 160, columns=64, tile_width=240)
