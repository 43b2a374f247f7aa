"""Checks of the kernels' integer metadata (``cu_seqlens``, ``cache_seqlens``).

The Triton kernels trust these values to address memory: an offset past the end reads (or
writes) outside the tensors. Both backends run the same checks, so they accept and reject
the same inputs.

- Metadata on the host (CPU tensors, the interpreter, the torch path on CPU): every value
  is checked and a bad one is a ``ValueError`` naming it.
- Metadata on a CUDA device: reading it on the host would synchronise the stream, so the
  same conditions are computed on the device and asserted with ``torch._assert_async``
  (no synchronisation; the assertion kernel runs before the attention kernel on the same
  stream, so a bad offset stops the stream instead of touching memory out of bounds). A
  failed device assertion is reported by CUDA at the next synchronisation, as
  "device-side assert triggered", and leaves the CUDA context unusable (CUDA's rule for
  every device assertion). Setting ``VIDEOANCHOR_DEVICE_CHECKS=0`` skips these device
  checks (a handful of tiny kernels per call) where the caller guarantees the metadata.
- Inside :func:`device_branch`, metadata on the host takes the device branch too (what a
  GPU runs, checked without one).
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import weakref

import torch

__all__ = ["check_cache_seqlens", "check_cu_seqlens", "device_branch", "device_checks_enabled"]


def device_checks_enabled() -> bool:
    """False when ``VIDEOANCHOR_DEVICE_CHECKS`` is 0/false/no/off (read on every call)."""
    return os.environ.get("VIDEOANCHOR_DEVICE_CHECKS", "1").lower() not in (
        "0",
        "false",
        "no",
        "off",
    )


_EVERYWHERE: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "videoanchor_device_branch", default=False
)


@contextlib.contextmanager
def device_branch():
    """Inside this block, metadata on the host (CPU tensors) is checked as CUDA metadata
    is: the conditions asserted with ``torch._assert_async`` (which raises at once on a CPU
    tensor), once per tensor and version, with no host read of the values. It runs on a
    machine without a GPU what a GPU runs: the device assertions themselves, and the host
    work of a call as a GPU would see it (tests/test_host_overhead.py)."""
    token = _EVERYWHERE.set(True)
    try:
        yield
    finally:
        _EVERYWHERE.reset(token)


def _on_device(t: torch.Tensor) -> bool:
    if t.device.type == "meta":
        return False
    return t.device.type != "cpu" or _EVERYWHERE.get()


def _traced() -> bool:
    """Inside torch.compile: checks become graph ops (``torch._assert_async``), on any
    device, instead of reading values on the host."""
    return torch.compiler.is_compiling()


# The last device tensors checked, with their version counter and the bound they were
# checked against: every decoder layer of one forward passes the same metadata tensor, so
# only the first layer pays for the check kernels (an in-place change bumps the version).
_CHECKED: dict[str, tuple] = {}


def _already_checked(kind: str, t: torch.Tensor, bound) -> bool:
    seen = _CHECKED.get(kind)
    if seen is not None and seen[0]() is t and seen[1] == t._version and seen[2] == bound:
        return True
    _CHECKED[kind] = (weakref.ref(t), t._version, bound)
    return False


def check_cache_seqlens(cache_seqlens: torch.Tensor, skv: int) -> None:
    """Every ``cache_seqlens[b]`` must lie in ``[0, skv]`` (the slots of the cache)."""
    if cache_seqlens.numel() == 0 or cache_seqlens.device.type == "meta":
        return
    if _traced():  # torch.compile: no host read of the values (a graph break in fullgraph)
        ok = ((cache_seqlens >= 0) & (cache_seqlens <= skv)).all()
        torch._assert_async(ok, f"videoanchor: cache_seqlens outside [0, Skv={skv}]")
        return
    if _on_device(cache_seqlens):
        if device_checks_enabled() and not _already_checked("cache", cache_seqlens, skv):
            ok = ((cache_seqlens >= 0) & (cache_seqlens <= skv)).all()
            torch._assert_async(ok, f"videoanchor: cache_seqlens outside [0, Skv={skv}]")
        return
    lo, hi = int(cache_seqlens.min()), int(cache_seqlens.max())
    if lo < 0 or hi > skv:
        bad = lo if lo < 0 else hi
        raise ValueError(
            f"cache_seqlens: expected values in [0, Skv] = [0, {skv}] (the filled slots of "
            f"the cache), got {bad}; try cache_seqlens.clamp(0, k.shape[2]) if the cache "
            "holds fewer slots than the lengths say"
        )


def check_cu_seqlens(name: str, cu: torch.Tensor, total: int, max_seqlen: int | None) -> None:
    """``cu`` (batch + 1,) offsets into ``total`` packed tokens: ``cu[0] == 0``, non-decreasing,
    ``cu[-1] == total`` (every token in exactly one sequence) and, when ``max_seqlen`` is
    given, no sequence longer than it."""
    if cu.device.type == "meta":
        return
    traced = _traced()
    if traced or _on_device(cu):
        if not traced and (
            not device_checks_enabled() or _already_checked(name, cu, (total, max_seqlen))
        ):
            return
        ok = (cu[0] == 0) & (cu[-1] == total)
        if cu.numel() > 1:
            lengths = cu[1:] - cu[:-1]
            ok = ok & (lengths >= 0).all()
            if max_seqlen is not None:
                ok = ok & (lengths <= max_seqlen).all()
        torch._assert_async(
            ok,
            f"videoanchor: {name} must start at 0, not decrease, end at {total} and hold no "
            f"sequence longer than {max_seqlen}",
        )
        return
    offsets = cu.tolist()
    if offsets[0] != 0:
        raise ValueError(f"{name}: expected the first offset to be 0, got {offsets[0]}")
    for b in range(len(offsets) - 1):
        if offsets[b + 1] < offsets[b]:
            raise ValueError(
                f"{name}: expected non-decreasing offsets, got {name}[{b}] = {offsets[b]} > "
                f"{name}[{b + 1}] = {offsets[b + 1]}; try torch.cumsum of the lengths"
            )
    if offsets[-1] != total:
        raise ValueError(
            f"{name}: expected the last offset to equal the packed length {total} (every token "
            f"in exactly one sequence), got {offsets[-1]}"
        )
    if max_seqlen is not None and len(offsets) > 1:
        lengths = [offsets[b + 1] - offsets[b] for b in range(len(offsets) - 1)]
        b = max(range(len(lengths)), key=lengths.__getitem__)
        if lengths[b] > max_seqlen:
            which = name.replace("cu_seqlens", "max_seqlen")
            what = "queries" if name.endswith("_q") else "keys"
            raise ValueError(
                f"{which}: expected at least the longest sequence, got {max_seqlen} but "
                f"sequence {b} has {lengths[b]} {what}; try int({name}.diff().max())"
            )
