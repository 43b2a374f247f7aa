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
