"""Input checks and memory estimates shared by the SSC entry points."""

from __future__ import annotations

import os

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


def free_memory_bytes(device: torch.device) -> int | None:
    """Free memory on ``device`` in bytes, or None when it cannot be measured."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        # memory cached by PyTorch's allocator is free for our purposes too
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    if device.type == "cpu":
        try:
            return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
        except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
            return None
    return None


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


def check_memory(required: int, device: torch.device, *, n: int, d: int, what: str) -> None:
    """Raise ``SSCMemoryError`` when ``required`` bytes exceed the free memory of ``device``."""
    free = free_memory_bytes(device)
    if free is None or required <= free:
        return
    raise SSCMemoryError(
        f"{what} with N = {n} tokens and D = {d} features needs about {_fmt_bytes(required)} "
        f"on {device}, but only {_fmt_bytes(free)} is free. Options: reduce the feature "
        f"dimension with pca_rank=..., use fewer frames (fewer tokens; memory grows as N^2), "
        f"run on the CPU (features.cpu()), use mode='blocked' (exact, no N x N buffer; "
        f"smaller block_columns=...) or mode='scalable' (an approximation)."
    )
