"""Checks of the kernels' inputs, run by both backends before any work: the tensors and
options of a call (:func:`validate`, :func:`validate_varlen`, :func:`check_options`,
:func:`check_attn_mask`, and the checks they are made of), and the integer metadata
(``cu_seqlens``, ``cache_seqlens``: :func:`check_cu_seqlens`, :func:`check_cache_seqlens`).

The Triton kernels trust the metadata to address memory: an offset past the end reads (or
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
import math
import numbers
import os
import weakref

import torch

__all__ = [
    "BACKENDS",
    "DTYPES",
    "check_attn_mask",
    "check_bool",
    "check_cache_seqlens",
    "check_cu_seqlens",
    "check_dtypes",
    "check_max_seqlen",
    "check_one_device",
    "check_options",
    "check_qkv",
    "check_sm_scale",
    "check_tensor",
    "device_branch",
    "device_checks_enabled",
    "validate",
    "validate_varlen",
]

#: the dtypes of q, k and v the kernels take
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
#: the ``backend=`` choices of the entry points
BACKENDS = ("auto", "triton", "torch")


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


# ---- the tensors and options of a call (one place per entry point) -------------------


def check_bool(name, value):
    """A flag must be a bool: a truthy string such as "no" must not switch it on."""
    numpy_bool = type(value).__module__ == "numpy" and type(value).__name__ in ("bool", "bool_")
    if not (isinstance(value, bool) or numpy_bool):
        raise TypeError(f"{name}: expected True or False, got {value!r}; try {name}=False")


def check_sm_scale(sm_scale):
    """``sm_scale``: None or a finite real number (a TypeError / ValueError naming it)."""
    if sm_scale is None:
        return
    if isinstance(sm_scale, bool) or not isinstance(sm_scale, numbers.Real):
        raise TypeError(f"sm_scale: expected None or a finite float, got {type(sm_scale).__name__}")
    if not math.isfinite(sm_scale):
        raise ValueError(f"sm_scale: expected None or a finite float, got {sm_scale!r}")


def check_options(causal, return_lse, sm_scale):
    """The flags and the softmax scale of an attention call."""
    check_bool("causal", causal)
    check_bool("return_lse", return_lse)
    check_sm_scale(sm_scale)


def check_max_seqlen(name, value, allow_none):
    """A ``max_seqlen_*`` argument: a non-negative int (or None where ``allow_none``)."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        want = "None or a non-negative int" if allow_none else "a non-negative int"
        raise ValueError(f"{name}: expected {want}, got {value!r}")


def check_tensor(name, t, ndim):
    """``t`` a tensor of ``ndim`` dimensions (a TypeError / ValueError naming ``name``)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name}: expected {ndim} dims, got shape {tuple(t.shape)}")


def check_dtypes(q, k, v):
    """``q``, ``k``, ``v`` in one of :data:`DTYPES`, the same for the three."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dtype not in DTYPES:
            raise TypeError(f"{name}: expected dtype float16, bfloat16 or float32, got {t.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v: expected one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")


def check_one_device(named):
    """The tensors of ``named`` (``(name, tensor or None)`` pairs) on one device."""
    devices = {(name, t.device) for name, t in named if t is not None}
    if len({d for _, d in devices}) > 1:
        found = ", ".join(f"{n} on {d}" for n, d in sorted(devices, key=lambda x: x[0]))
        raise ValueError(f"expected all tensors on one device, got {found}")


def check_qkv(q, k, v, backend, kv_layout):
    """Checks shared by the dense (B, H, S, D) and varlen (S, H, D) entry points."""
    ndim = len(kv_layout.split(","))
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t, ndim)
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    check_dtypes(q, k, v)
    if k.shape != v.shape:
        raise ValueError(
            f"k, v: expected the same shape ({kv_layout}), got {tuple(k.shape)} and {tuple(v.shape)}"
        )
    Hq, Hkv = q.shape[1], k.shape[1]  # (B, H, S, D) and (S, H, D) both keep heads at 1
    if q.shape[-1] == 0:
        raise ValueError(
            f"q: expected a head dim D >= 1, got shape {tuple(q.shape)}; try D = 64 or 128"
        )
    if k.shape[-1] != q.shape[-1]:
        raise ValueError(f"k: expected head dim {q.shape[-1]} (from q), got {k.shape[-1]}")
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(
            f"expected the number of query heads to be a multiple of the KV heads, got Hq={Hq}, Hkv={Hkv}"
        )


def validate(
    q, k, v, key_bias, value_scale, key_padding_mask, backend, cache_seqlens=None, gates=None
):  # fmt: skip
    """The inputs of a dense call (:func:`~videoanchor.kernels.anchored_attention`): q, k, v
    and the gates, the key padding mask and ``cache_seqlens`` (their values too), on one
    device; ``gates``: prepared gates, whose tensors join the device check."""
    check_qkv(q, k, v, backend, "B, Hkv, Skv, D")
    B = q.shape[0]
    Bk, Skv = k.shape[0], k.shape[2]
    if Bk != B:
        raise ValueError(f"k: expected batch {B} (from q), got {Bk}")
    for name, t, dtypes in (
        ("key_bias", key_bias, "float"),
        ("value_scale", value_scale, "float"),
        ("key_padding_mask", key_padding_mask, "bool"),
    ):
        if t is None:
            continue
        check_tensor(name, t, 2)
        if tuple(t.shape) != (B, Skv):
            raise ValueError(
                f"{name}: expected shape (B, Skv) = ({B}, {Skv}), got {tuple(t.shape)}"
            )
        if dtypes == "bool" and t.dtype != torch.bool:
            raise TypeError(f"{name}: expected dtype torch.bool (True = may attend), got {t.dtype}")
        if dtypes == "float" and not t.is_floating_point():
            raise TypeError(f"{name}: expected a floating-point tensor, got dtype {t.dtype}")
    if cache_seqlens is not None:
        check_tensor("cache_seqlens", cache_seqlens, 1)
        if cache_seqlens.dtype not in (torch.int32, torch.int64):
            raise TypeError(
                f"cache_seqlens: expected dtype int32 (or int64), got {cache_seqlens.dtype}"
            )
        if cache_seqlens.shape[0] != B:
            raise ValueError(
                f"cache_seqlens: expected shape (B,) = ({B},), got {tuple(cache_seqlens.shape)}"
            )
    prepared = () if gates is None else (("gates", gates.key_bias), ("gates", gates.value_scale))
    check_one_device(
        (("q", q), ("k", k), ("v", v), ("key_bias", key_bias), ("value_scale", value_scale),
         ("key_padding_mask", key_padding_mask), ("cache_seqlens", cache_seqlens), *prepared)
    )  # fmt: skip
    if cache_seqlens is not None:
        check_cache_seqlens(cache_seqlens, Skv)


def check_attn_mask(attn_mask, q, k):
    """``attn_mask``: None, or a bool or floating tensor broadcastable to (B, Hq, Sq, Skv)
    on ``q``'s device."""
    if attn_mask is None:
        return
    if not isinstance(attn_mask, torch.Tensor):
        raise TypeError(f"attn_mask: expected a torch.Tensor, got {type(attn_mask).__name__}")
    if attn_mask.dtype != torch.bool and not attn_mask.is_floating_point():
        raise TypeError(
            "attn_mask: expected dtype torch.bool (True = may attend) or a floating dtype "
            f"(added to the logits), got {attn_mask.dtype}"
        )
    B, Hq, Sq, _ = q.shape
    target = (B, Hq, Sq, k.shape[2])
    shape = tuple(attn_mask.shape)
    padded = (1,) * (4 - len(shape)) + shape
    if len(shape) > 4 or any(n not in (1, t) for n, t in zip(padded, target, strict=True)):
        want = f"a shape broadcastable to (B, Hq, Sq, Skv) = {target}"
        raise ValueError(f"attn_mask: expected {want}, got {shape}")
    if attn_mask.device != q.device:
        raise ValueError(f"expected all tensors on one device, got q on {q.device}, "
                         f"attn_mask on {attn_mask.device}")  # fmt: skip


def validate_varlen(
    q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, key_bias, value_scale,
    backend,
):  # fmt: skip
    """The inputs of a packed call (:func:`~videoanchor.kernels.anchored_attention_varlen`):
    q, k, v, the offsets (their values too), the longest lengths and the (total_k,) gates,
    on one device."""
    check_qkv(q, k, v, backend, "total_k, Hkv, D")
    total_k = k.shape[0]
    for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        check_tensor(name, cu, 1)
        if cu.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"{name}: expected dtype int32 (or int64), got {cu.dtype}")
        if cu.numel() < 1:
            raise ValueError(f"{name}: expected batch + 1 >= 1 offsets, got an empty tensor")
    if cu_seqlens_q.numel() != cu_seqlens_k.numel():
        raise ValueError(
            "cu_seqlens_q, cu_seqlens_k: expected the same number of sequences, got "
            f"{cu_seqlens_q.numel() - 1} and {cu_seqlens_k.numel() - 1}"
        )
    check_max_seqlen("max_seqlen_q", max_seqlen_q, allow_none=False)
    check_max_seqlen("max_seqlen_k", max_seqlen_k, allow_none=True)
    for name, t in (("key_bias", key_bias), ("value_scale", value_scale)):
        if t is None:
            continue
        check_tensor(name, t, 1)
        if t.shape[0] != total_k:
            raise ValueError(
                f"{name}: expected shape (total_k,) = ({total_k},), got {tuple(t.shape)}"
            )
        if not t.is_floating_point():
            raise TypeError(f"{name}: expected a floating-point tensor, got dtype {t.dtype}")
    check_one_device(
        (("q", q), ("k", k), ("v", v), ("cu_seqlens_q", cu_seqlens_q),
         ("cu_seqlens_k", cu_seqlens_k), ("key_bias", key_bias), ("value_scale", value_scale))
    )  # fmt: skip
    check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, q.shape[0], max_seqlen_q)
    check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, total_k, None)
