"""Helpers shared by the CLI, video, visualisation and lmms-eval tests (no tests here)."""

from __future__ import annotations

import numpy as np


def moving_shapes(num_frames: int, height: int = 64, width: int = 96, seed: int = 0) -> np.ndarray:
    """(T, H, W, 3) uint8 frames: a white box sliding right and a red disc sliding down
    over a colour gradient; frame t has the box's left edge at column 2 + 3 t."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:height, :width]
    frames = np.empty((num_frames, height, width, 3), dtype=np.uint8)
    for t in range(num_frames):
        img = np.empty((height, width, 3), dtype=np.uint8)
        img[..., 0] = xx * 200 // width
        img[..., 1] = 60 + int(rng.integers(0, 20))
        img[..., 2] = yy * 200 // height
        left = 2 + 3 * t
        img[height // 6 : height // 6 + 14, left : left + 14] = (250, 250, 250)
        disc = (xx - 3 * width // 4) ** 2 + (yy - (8 + 2 * t)) ** 2 < 64
        img[disc] = (230, 30, 30)
        frames[t] = img
    return frames


def box_left_edge(frame: np.ndarray, height: int) -> int:
    """Column where the white box starts in a decoded `moving_shapes` frame."""
    row = frame[height // 6 + 7].astype(int)
    white = np.flatnonzero((row > 200).all(axis=1))
    return int(white[0])
