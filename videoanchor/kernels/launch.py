"""What the launchers share: the target's compute capability and limits, the grid check,
and one place where every kernel is launched (so a compile harness can capture the exact
arguments of a real launch without a GPU).

Tile choices are pure functions of (dtype, head dim, flags, compute capability) in the
kernel modules; this module knows the hardware limits they are checked against.
"""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass

import torch

LOG2E = 1.4426950408889634  # the kernels' softmax runs in base 2

# CUDA's grid limits: x up to 2^31 - 1, y and z up to 65,535 blocks.
GRID_LIMITS = (2**31 - 1, 65535, 65535)

# Largest dynamic shared memory one block may opt in to, in bytes (CUDA programming
# guide, "Technical Specifications per Compute Capability"); 48 KB without opt-in.
MAX_SHARED_PER_BLOCK = {
    (7, 0): 98304,
    (7, 5): 65536,
    (8, 0): 166912,
    (8, 6): 101376,
    (8, 7): 166912,
    (8, 9): 101376,
    (9, 0): 232448,
}
# Oldest architecture the Triton kernels are configured for. Triton 3.9 emits no tensor-core
# MMA for sm_75 and its 64 KB of shared memory cannot hold the D >= 128 prefill tiles.
MIN_CAPABILITY = (8, 0)


def max_shared_memory(capability: tuple[int, int]) -> int:
    """Opt-in shared memory per block for a compute capability (newer major versions not
    listed take the most conservative figure of their generation we know: 99 KB)."""
    if capability in MAX_SHARED_PER_BLOCK:
        return MAX_SHARED_PER_BLOCK[capability]
    return MAX_SHARED_PER_BLOCK.get((capability[0], 0), 101376)


_CAPABILITY: dict[int, tuple[int, int]] = {}


def device_capability(device: torch.device) -> tuple[int, int]:
    """(major, minor) of a CUDA device, cached per device index."""
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _CAPABILITY:
        _CAPABILITY[idx] = tuple(torch.cuda.get_device_capability(idx))
    return _CAPABILITY[idx]


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for ints on the host (``triton.cdiv`` is a constexpr function whose
    Python call costs microseconds: launchers call these on every launch)."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= ``n`` (1 for ``n <= 1``), on the host."""
    return 1 << max(n - 1, 0).bit_length()


def check_grid(name: str, grid: tuple[int, ...], limits: tuple[int, ...] = GRID_LIMITS) -> None:
    """Raise ValueError if a launch grid exceeds the per-axis ``limits`` (CUDA's by default:
    the interpreter would run such a grid; a GPU refuses it at launch)."""
    for axis, (n, limit) in enumerate(zip(grid, limits[: len(grid)], strict=True)):
        if not 0 <= n <= limit:
            raise ValueError(
                f"{name}: grid axis {axis} needs {n} blocks, expected at most {limit} "
                "(CUDA's limit); split the batch into smaller calls"
            )


@dataclass
class Launch:
    """One kernel launch as the launcher would make it."""

    kernel: object
    grid: tuple[int, ...]
    args: tuple
    kwargs: dict


# (the launches recorded, the grid limits they are checked against) inside capture_launches
_CAPTURE: contextvars.ContextVar[tuple[list[Launch], tuple[int, ...]] | None] = (
    contextvars.ContextVar("videoanchor_capture", default=None)
)


@contextlib.contextmanager
def capture_launches(*, grid_limits: tuple[int, ...] = GRID_LIMITS):
    """Inside this block launchers record their launches (a list of :class:`Launch`)
    instead of running them. Used to compile exactly what a real launch would compile.

    ``grid_limits``: the per-axis grid limits the launches are checked against (default
    CUDA's, :data:`GRID_LIMITS`); lower ones show a launcher's refusal of a grid past a
    limit without building inputs of 2^31 blocks."""
    launches: list[Launch] = []
    token = _CAPTURE.set((launches, tuple(grid_limits)))
    try:
        yield launches
    finally:
        _CAPTURE.reset(token)


def launch(kernel, grid: tuple[int, ...], args: tuple, kwargs: dict) -> None:
    """Check the grid, then run ``kernel[grid](*args, **kwargs)`` (or record it)."""
    captured = _CAPTURE.get()
    if captured is None:
        check_grid(getattr(kernel, "__name__", "kernel"), grid)
        kernel[grid](*args, **kwargs)
        return
    launches, limits = captured
    check_grid(getattr(kernel, "__name__", "kernel"), grid, limits)
    launches.append(Launch(kernel, tuple(grid), tuple(args), dict(kwargs)))
