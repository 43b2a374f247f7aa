"""Input checks and memory estimates shared by the SSC entry points."""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch


class SSCMemoryError(MemoryError):
    """The dense SSC problem does not fit in the memory of the chosen device."""


def as_feature_tensor(features, *, name: str = "features") -> torch.Tensor:
    """Return ``features`` as a 2-D real floating tensor on its own device.

    Accepts a ``torch.Tensor`` or anything ``numpy.asarray`` understands. Raises
    ``TypeError`` for non-numeric input and ``ValueError`` for a wrong shape, an empty
    matrix or non-finite values.
    """
    if isinstance(features, torch.Tensor):
        x = features.detach()
    else:
        try:
            arr = np.asarray(features)
        except Exception as exc:  # pragma: no cover - exotic objects
            raise TypeError(
                f"{name}: expected a tensor or array, got {type(features).__name__}"
            ) from exc
        if arr.dtype == object or not (
            np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_
        ):
            raise TypeError(f"{name}: expected a numeric array, got dtype {arr.dtype}")
        x = torch.from_numpy(np.ascontiguousarray(arr))
    if x.is_complex():
        raise TypeError(f"{name}: expected real values, got dtype {x.dtype}")
    if x.dim() != 2:
        raise ValueError(
            f"{name}: expected a 2-D (N, D) matrix with one row per token, got shape {tuple(x.shape)}"
        )
    n, d = x.shape
    if n == 0 or d == 0:
        raise ValueError(f"{name}: expected at least one token and one feature, got shape {(n, d)}")
    if not x.is_floating_point():
        x = x.to(torch.float64)
    if not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).sum())
        raise ValueError(f"{name}: expected finite values, got {bad} NaN/Inf entries")
    return x


def resolve_dtype(dtype, device: torch.device) -> torch.dtype:
    """The working dtype of the ADMM iterations (default float32)."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, str):
        dtype = {"float32": torch.float32, "float64": torch.float64}.get(dtype, dtype)
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype: expected torch.float32 or torch.float64, got {dtype!r}")
    return dtype


# The memory rule (docs/long-videos.md). The SSC may use MEMORY_FRACTION of the memory the
# device has available when the check runs:
# * CPU: ``MemAvailable`` of /proc/meminfo (the kernel's estimate of what new allocations can
#   get without swapping: free pages plus reclaimable page cache), lowered to the cgroup v2
#   limit left (``memory.max - memory.current + inactive_file``) when a limit is set; where
#   /proc/meminfo does not exist (macOS, Windows), no check is made;
# * CUDA: ``torch.cuda.mem_get_info`` free bytes plus what PyTorch's allocator holds
#   reserved but unallocated (it is reused before new memory is asked of the driver).
# The fraction leaves room for the rest of the process (model, activations, allocator
# fragmentation). One reading, one rule: the same reading always gives the same decision.
MEMORY_FRACTION = 0.9


@dataclass(frozen=True)
class MemoryReading:
    """Memory available on a device: ``available`` bytes and where it was read (``source``)."""

    available: int
    source: str

    @property
    def budget(self) -> int:
        """Bytes the SSC may use: ``MEMORY_FRACTION`` of ``available``."""
        return int(self.available * MEMORY_FRACTION)


def _meminfo_available(path: str = "/proc/meminfo") -> int | None:
    try:
        with open(path) as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # the kernel reports kB (KiB)
    except (OSError, ValueError, IndexError):
        return None
    return None


def _cgroup_available(root: str = "/sys/fs/cgroup") -> int | None:
    """Bytes left under a cgroup v2 memory limit, reclaimable file cache counted as free."""
    try:
        with open(os.path.join(root, "memory.max")) as f:
            limit = f.read().strip()
        if limit == "max":
            return None
        with open(os.path.join(root, "memory.current")) as f:
            current = int(f.read().strip())
        inactive = 0
        with open(os.path.join(root, "memory.stat")) as f:
            for line in f:
                if line.startswith("inactive_file "):
                    inactive = int(line.split()[1])
        return max(0, int(limit) - current + inactive)
    except (OSError, ValueError, IndexError):
        return None


def read_available_memory(device: torch.device) -> MemoryReading | None:
    """What ``device`` has available now (see the memory rule above), or None when unknown."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return MemoryReading(int(free + cached), "torch.cuda.mem_get_info + PyTorch's cache")
    if device.type == "cpu":
        avail = _meminfo_available()
        if avail is None:
            return None
        cg = _cgroup_available()
        if cg is not None and cg < avail:
            return MemoryReading(cg, "cgroup memory.max - memory.current + inactive_file")
        return MemoryReading(avail, "MemAvailable in /proc/meminfo")
    return None


_LAST_READING: dict[str, MemoryReading | None] = {}


def free_memory_bytes(device: torch.device) -> int | None:
    """Bytes the SSC may use on ``device`` (the memory rule's budget), or None when unknown."""
    reading = read_available_memory(device)
    _LAST_READING[device.type] = reading  # for check_memory's message
    return None if reading is None else reading.budget


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


def check_memory(required: int, device: torch.device, *, n: int, d: int, what: str) -> None:
    """Raise ``SSCMemoryError`` when ``required`` bytes exceed the memory rule's budget on
    ``device`` (``MEMORY_FRACTION`` of the available memory; no check when unknown)."""
    budget = free_memory_bytes(device)
    if budget is None or required <= budget:
        return
    reading = _LAST_READING.get(device.type)
    if reading is not None and reading.budget == budget:
        room = (
            f"{_fmt_bytes(reading.available)} is available ({reading.source}) and the SSC may "
            f"use {MEMORY_FRACTION:.0%} of it, {_fmt_bytes(budget)}"
        )
    else:
        room = f"the SSC may use {_fmt_bytes(budget)}"
    if device.type == "cuda":
        where = (
            "run on the CPU (features.cpu()) if it has more memory, free GPU memory first "
            "(torch.cuda.empty_cache(), other processes)"
        )
    else:
        where = "close other programs or use a machine (or a GPU) with more memory"
    raise SSCMemoryError(
        f"{what} with N = {n} tokens and D = {d} features needs about {_fmt_bytes(required)} "
        f"on {device}, but {room}. Options: use mode='blocked' (exact, no N x N "
        f"buffer; smaller block_columns=...), use fewer frames (fewer tokens; memory grows "
        f"as N^2), reduce the feature dimension with pca_rank=..., {where}, or "
        f"mode='scalable' (an approximation)."
    )
