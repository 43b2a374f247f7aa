import numpy as np
import pytest
from test_cli_support import box_left_edge, moving_shapes

from videoanchor.video import (
    VideoReadError,
    read_video_frames,
    uniform_frame_indices,
    write_video,
)


@pytest.fixture(scope="module")
def video_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("video") / "shapes.mp4"
    write_video(path, moving_shapes(23), fps=10)
    return path


@pytest.mark.parametrize(
    "total,num,expected",
    [
        (23, 8, [0, 3, 6, 9, 13, 16, 19, 22]),
        (10, 1, [4]),
        (1, 3, [0, 0, 0]),
        (5, 5, [0, 1, 2, 3, 4]),
        (4, 6, [0, 1, 1, 2, 2, 3]),
    ],
    ids=["23of8", "single", "one-frame-video", "exact", "fewer-than-asked"],
)
def test_uniform_frame_indices(total, num, expected):
    got = uniform_frame_indices(total, num)
    assert got.dtype == np.int64
    np.testing.assert_array_equal(got, expected)


def test_uniform_frame_indices_rejects_bad_input():
    with pytest.raises(ValueError, match="num_frames >= 1"):
        uniform_frame_indices(10, 0)
    with pytest.raises(ValueError, match="at least one frame"):
        uniform_frame_indices(0, 4)
    with pytest.raises(TypeError, match="int"):
        uniform_frame_indices(10, 2.0)


def test_read_video_frames_samples_the_right_frames(video_path):
    video = read_video_frames(video_path, 8, progress=False)
    assert video.frames.shape == (8, 64, 96, 3) and video.frames.dtype == np.uint8
    assert video.total_frames == 23 and video.fps == pytest.approx(10.0)
    np.testing.assert_array_equal(video.indices, [0, 3, 6, 9, 13, 16, 19, 22])
    np.testing.assert_allclose(video.timestamps, video.indices / 10.0, atol=1e-6)
    # The decoded content is the frame at that index: the box moved 3 px per frame.
    edges = [box_left_edge(f, 64) for f in video.frames]
    expected = [2 + 3 * int(i) for i in video.indices]
    assert all(abs(e - x) <= 1 for e, x in zip(edges, expected, strict=True)), (edges, expected)


def test_read_video_frames_repeats_frames_of_a_short_video(video_path):
    with pytest.warns(UserWarning, match="some repeated"):
        video = read_video_frames(video_path, 30, progress=False, repeat=True)
    assert video.frames.shape[0] == 30
    np.testing.assert_array_equal(video.indices, uniform_frame_indices(23, 30))
    dup = int(np.flatnonzero(np.diff(video.indices) == 0)[0])
    np.testing.assert_array_equal(video.frames[dup], video.frames[dup + 1])


def test_read_video_frames_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        read_video_frames(tmp_path / "missing.mp4", 4)
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"not a video at all" * 50)
    with pytest.raises(VideoReadError, match="cannot read video"):
        read_video_frames(junk, 4)
    with pytest.raises(VideoReadError, match="directory"):
        read_video_frames(tmp_path, 4)
    with pytest.raises(ValueError, match="num_frames >= 1"):
        read_video_frames(junk, 0)


def test_write_video_rejects_odd_sizes(tmp_path):
    with pytest.raises(ValueError, match="even height and width"):
        write_video(tmp_path / "x.mp4", np.zeros((2, 63, 96, 3), np.uint8))
    with pytest.raises(TypeError, match="uint8"):
        write_video(tmp_path / "x.mp4", np.zeros((2, 64, 96, 3), np.float32))
