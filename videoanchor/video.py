"""Video decoding and uniform frame sampling with PyAV.

`read_video_frames(path, num_frames)` returns `num_frames` RGB frames spread evenly over
the whole video, first and last frame included, as one `(T, H, W, 3)` uint8 array, plus
the frame indices and timestamps they came from. PyAV (`pip install "videoanchor[video]"`)
is imported on first use, so the rest of the package does not need it.
"""

from __future__ import annotations

import numbers
import os
import warnings
from dataclasses import dataclass

import numpy as np

__all__ = [
    "SampledVideo",
    "VideoReadError",
    "read_video_frames",
    "uniform_frame_indices",
    "write_video",
]


class VideoReadError(ValueError):
    """The file exists but holds no decodable video stream."""


@dataclass(frozen=True)
class SampledVideo:
    """Frames sampled from one video.

    frames:       (T, H, W, 3) uint8 RGB.
    indices:      (T,) int64, the position of each frame in the decoded stream (0-based).
    timestamps:   (T,) float64 seconds from the start of the stream.
    total_frames: number of frames the stream decoded to.
    fps:          the stream's average frame rate (0.0 when the container does not say).
    path:         the file the frames came from.
    """

    frames: np.ndarray
    indices: np.ndarray
    timestamps: np.ndarray
    total_frames: int
    fps: float
    path: str

    @property
    def num_frames(self) -> int:
        """T, the number of sampled frames."""
        return int(self.frames.shape[0])


def uniform_frame_indices(total_frames: int, num_frames: int) -> np.ndarray:
    """`num_frames` indices spread evenly over `[0, total_frames)`, first and last included.

    The same rule VSI-Bench evaluations use (`linspace(0, total - 1, n)`), rounded to the
    nearest frame. When the video has fewer frames than asked for, some frames repeat, so
    the model always sees exactly `num_frames` frames.
    """
    if isinstance(total_frames, bool) or not isinstance(total_frames, (int, np.integer)):
        raise TypeError(f"total_frames must be an int, got {type(total_frames).__name__}")
    if isinstance(num_frames, bool) or not isinstance(num_frames, (int, np.integer)):
        raise TypeError(f"num_frames must be an int, got {type(num_frames).__name__}")
    if total_frames < 1:
        raise ValueError(
            f"expected a video with at least one frame, got total_frames={total_frames}"
        )
    if num_frames < 1:
        raise ValueError(f"expected num_frames >= 1, got {num_frames}")
    if num_frames == 1:
        return np.array([(total_frames - 1) // 2], dtype=np.int64)
    return np.rint(np.linspace(0, total_frames - 1, num_frames)).astype(np.int64)


def _import_av():
    try:
        import av
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            'decoding video needs PyAV; install it with: pip install "videoanchor[video]"'
        ) from err
    return av


def _open(av, path: str):
    try:
        container = av.open(path)
    except Exception as err:  # PyAV raises many error types (InvalidDataError, OSError, ...)
        raise VideoReadError(f"cannot read video '{path}': {_short(err)}") from err
    if not container.streams.video:
        container.close()
        raise VideoReadError(f"cannot read video '{path}': the file has no video stream")
    return container


def _short(err: Exception) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def _count_frames(av, path: str) -> int:
    """Frame count from the container header, or by demuxing (no decoding) when absent."""
    container = _open(av, path)
    try:
        stream = container.streams.video[0]
        if stream.frames and stream.frames > 0:
            return int(stream.frames)
        count = 0
        for packet in container.demux(stream):
            if packet.size:
                count += 1
        return count
    finally:
        container.close()


def _decode_selected(av, path: str, wanted: np.ndarray, progress: bool):
    """Decode the stream in order, keep the frames at the (sorted, unique) `wanted` indices.

    Returns (frames by index, timestamps by index, number of frames decoded, fps).
    """
    from tqdm.auto import tqdm

    container = _open(av, path)
    kept: dict[int, np.ndarray] = {}
    times: dict[int, float] = {}
    wanted_set = {int(i) for i in wanted}
    last = int(wanted.max())
    decoded = 0
    try:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        fps = float(stream.average_rate) if stream.average_rate else 0.0
        time_base = float(stream.time_base) if stream.time_base else 0.0
        bar = tqdm(
            total=last + 1,
            desc="decoding frames",
            unit="frame",
            delay=1.0,
            disable=None if progress else True,
            leave=False,
        )
        try:
            for frame in container.decode(stream):
                if decoded in wanted_set:
                    kept[decoded] = frame.to_ndarray(format="rgb24")
                    if frame.pts is not None and time_base:
                        times[decoded] = frame.pts * time_base
                    elif fps:
                        times[decoded] = decoded / fps
                    else:
                        times[decoded] = float("nan")
                decoded += 1
                bar.update(1)
                if decoded > last:
                    break
        finally:
            bar.close()
    except VideoReadError:
        raise
    except Exception as err:
        raise VideoReadError(f"cannot decode video '{path}': {_short(err)}") from err
    finally:
        container.close()
    return kept, times, decoded, fps


def read_video_frames(
    path: str | os.PathLike, num_frames: int, *, progress: bool = True, repeat: bool = False
) -> SampledVideo:
    """Decode `num_frames` frames spread uniformly over the video at `path`.

    A video with fewer frames than `num_frames` gives each of its frames once (a
    `UserWarning` says how many), never the same frame twice: repeated frames are
    identical visual tokens, which carry no information for the anchors. `repeat=True`
    keeps the old rule (exactly `num_frames` frames, some repeated; warned too).

    Raises FileNotFoundError when `path` does not exist and VideoReadError (a ValueError)
    when it cannot be decoded as video. A progress bar appears when decoding takes longer
    than a second (`progress=False` turns it off).
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"video file not found: '{path}'")
    if os.path.isdir(path):
        raise VideoReadError(f"cannot read video '{path}': it is a directory")
    if isinstance(num_frames, bool) or not isinstance(num_frames, (int, np.integer)):
        raise TypeError(f"num_frames must be an int, got {type(num_frames).__name__}")
    if num_frames < 1:
        raise ValueError(f"expected num_frames >= 1, got {num_frames}")
    if not isinstance(repeat, bool):
        raise TypeError(f"repeat: expected True or False, got {repeat!r}")
    asked = int(num_frames)

    av = _import_av()
    total = _count_frames(av, path)
    if total < 1:
        raise VideoReadError(f"cannot read video '{path}': the video stream has no frames")
    num_frames = asked if repeat else min(asked, total)
    indices = uniform_frame_indices(total, num_frames)
    kept, times, decoded, fps = _decode_selected(av, path, np.unique(indices), progress)
    if decoded == 0:
        raise VideoReadError(f"cannot read video '{path}': no frame could be decoded")
    if len(kept) < len(np.unique(indices)):
        # The header over-counted (common for variable-frame-rate files): the stream ended
        # at `decoded` frames. Sample again over what is really there.
        total = decoded
        num_frames = asked if repeat else min(asked, total)
        indices = uniform_frame_indices(total, num_frames)
        kept, times, decoded, fps = _decode_selected(av, path, np.unique(indices), progress)
        if len(kept) < len(np.unique(indices)):
            raise VideoReadError(
                f"cannot read video '{path}': the stream ended after {decoded} frames while "
                f"frame {int(indices.max())} was expected"
            )
    if asked > total:
        warnings.warn(
            f"video '{path}' has {total} frames, fewer than the {asked} asked for: "
            + (
                f"{asked} frames sampled, some repeated (repeat=True)"
                if repeat
                else f"using each of its {total} frames once"
            ),
            stacklevel=2,
        )
    frames = np.stack([kept[int(i)] for i in indices])
    timestamps = np.array([times[int(i)] for i in indices], dtype=np.float64)
    return SampledVideo(
        frames=frames,
        indices=indices,
        timestamps=timestamps,
        total_frames=int(total),
        fps=fps,
        path=path,
    )


def write_video(path: str | os.PathLike, frames: np.ndarray, *, fps: int = 10) -> None:
    """Encode `frames` ((T, H, W, 3) uint8 RGB, H and W even) as an H.264 (or MPEG-4) file."""
    if not isinstance(frames, np.ndarray) or frames.ndim != 4 or frames.shape[-1] != 3:
        got = getattr(frames, "shape", type(frames).__name__)
        raise ValueError(f"expected frames as a (T, H, W, 3) array, got {got}")
    if frames.dtype != np.uint8:
        raise TypeError(f"expected uint8 RGB frames, got dtype {frames.dtype}")
    num, height, width = frames.shape[:3]
    if num < 1 or height % 2 or width % 2:
        raise ValueError(
            f"expected at least one frame with even height and width, got {frames.shape}"
        )
    if isinstance(fps, bool) or not isinstance(fps, numbers.Integral) or fps < 1:
        raise ValueError(f"expected fps to be a positive int, got {fps!r}")
    fps = int(fps)
    av = _import_av()
    codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
    with av.open(os.fspath(path), mode="w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
