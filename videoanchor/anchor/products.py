"""The fast solver's dense products at a chosen precision: ``"full"`` or ``"fp16x3"``.

``"full"`` multiplies in the working dtype (float32 by default): on a GPU that is FP32 on
the CUDA cores (PyTorch's default; the package never turns TF32 on).

``"fp16x3"`` runs each float32 product on half-precision tensor cores at about float32
accuracy. Each operand is scaled by a power of two (its largest magnitude brought into
``(2^13, 2^14]``: nothing overflows float16, the scaling is exact) and split into a float16
head and tail, ``a = a_hi + a_lo``; ``a b`` is ``a_hi b_hi + a_hi b_lo + a_lo b_hi``,
computed as ONE product with the inner dimension tripled, ``[a_hi | a_hi | a_lo] @
[b_hi; b_lo; b_hi]``, accumulated in float32, then unscaled. The relative error is about
``2^-22`` per entry (float32: ``2^-24``; entries below ``2^-17`` of the operand's largest
lose tail bits to float16's subnormals, an absolute error under ``2^-38`` of it). On CUDA
the product is ``torch.mm(..., out_dtype=torch.float32)`` (PyTorch >= 2.8: no global flag,
no host synchronisation); elsewhere it is emulated exactly, three times the work of
``"full"``, for tests.

Why not TF32 or a bfloat16 split: on the fidelity sets (``request_cost_cpu.json``), 1e-6
relative perturbations of the features move the fast solver's scores by 2e-3 to 0.17 with
TF32 inputs and 4e-5 to 1.4e-3 with the bfloat16 split, against 1.3e-5 to 1.0e-4 in float32
and 1.3e-5 to 1.2e-4 in fp16x3; and PyTorch's TF32 switch is process-wide.

A user's process-wide setting (``torch.set_float32_matmul_precision("high")``,
``allow_tf32 = True``) would turn every solver's float32 products into TF32 on CUDA, or
bfloat16 passes in oneDNN (on the second H100 lease TF32 left the fast solver's scores at
64 frames uncorrelated with the faithful ones): the public SSC and spectral entry points
run under :func:`exact_float32_matmul`, which holds them at IEEE precision meanwhile.
"""

from __future__ import annotations

import contextlib
import functools
import threading
import warnings

import torch

__all__ = [
    "Products",
    "Split",
    "exact_float32",
    "exact_float32_matmul",
    "keep_cuda_setting_in_this_thread",
    "native_fp16x3",
    "resolve_precision",
]

#: the largest magnitude of a scaled operand lies in (2^(TOP - 1), 2^TOP]: float16's largest
#: finite value is 65504 (just under 2^16), and its head rounds to at most 2^TOP
TOP = 14


_EXACT = threading.Lock()
#: per setting ``(holder, attribute)``: ``[entries holding it, the value to restore]``
_held: dict[tuple[int, str], list] = {}
_thread = threading.local()
_warned: set[str] = set()


def _fp32_settings() -> list[tuple[object, str]]:
    """``(holder, attribute)`` of each float32-matmul precision setting this PyTorch has:
    per backend (``fp32_precision``, PyTorch >= 2.9: CUDA's TF32, oneDNN's bfloat16 on the
    CPU), else the legacy CUDA flag ``allow_tf32``."""
    found = []
    for name in ("cuda", "mkldnn"):
        holder = getattr(getattr(torch.backends, name, None), "matmul", None)
        if holder is not None and hasattr(holder, "fp32_precision"):
            found.append((holder, "fp32_precision"))
    if not found and hasattr(torch.backends.cuda.matmul, "allow_tf32"):
        found.append((torch.backends.cuda.matmul, "allow_tf32"))
    return found


def keep_cuda_setting_in_this_thread() -> None:
    """In the calling thread, :func:`exact_float32_matmul` leaves CUDA's setting alone (the
    CPU's oneDNN one it still holds): for a thread that computes scores beside a model that
    ``torch.compile`` traces or guards in another thread (TF32 is part of the global state
    Dynamo checks). Where that setting is lowered, it says once which products keep it."""
    _thread.keep_cuda = True


def _lowered(holder, attr) -> bool:
    value = getattr(holder, attr)
    return value is True or value in ("tf32", "bf16")


@contextlib.contextmanager
def exact_float32_matmul():
    """Float32 matrix products at IEEE precision (no TF32, no bfloat16 passes) inside, what
    the process-wide setting was before restored after (also on an exception).

    The settings are process-wide, so other threads' float32 products are exact too
    meanwhile (half-precision products are not affected). Nested and concurrent uses are
    counted per setting: the first to hold it saves and sets it, the last to let go restores
    it. A thread that called :func:`keep_cuda_setting_in_this_thread` does not hold CUDA's."""
    mine = []
    with _EXACT:
        for holder, attr in _fp32_settings():
            if holder is torch.backends.cuda.matmul and getattr(_thread, "keep_cuda", False):
                if _lowered(holder, attr) and "cuda" not in _warned:
                    _warned.add("cuda")
                    warnings.warn(
                        "videoanchor: float32 matrix products are set to TF32 in this process "
                        "(torch.set_float32_matmul_precision, VLLM_FLOAT32_MATMUL_PRECISION); "
                        "the anchor scores computed beside the model keep that setting "
                        "(changing it from this thread would fail torch.compile's global-state "
                        "check), so their float32 products on CUDA (the spectral step; the "
                        "solver's with ssc_precision='full') run in TF32",
                        RuntimeWarning,
                        stacklevel=3,
                    )
                continue
            key = (id(holder), attr)
            entry = _held.setdefault(key, [0, None])
            if entry[0] == 0:
                entry[1] = getattr(holder, attr)
                setattr(holder, attr, False if attr == "allow_tf32" else "ieee")
            entry[0] += 1
            mine.append((holder, attr, key))
    try:
        yield
    finally:
        with _EXACT:
            for holder, attr, key in mine:
                entry = _held[key]
                entry[0] -= 1
                if entry[0] == 0:
                    setattr(holder, attr, entry[1])
                    del _held[key]


def exact_float32(fn):
    """Run ``fn`` under :func:`exact_float32_matmul` (the public SSC and spectral entry
    points)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with exact_float32_matmul():
            return fn(*args, **kwargs)

    return wrapper


def native_fp16x3(device) -> bool:
    """Whether ``precision="fp16x3"`` runs natively on ``device`` (a ``torch.device``, a
    device string or ``None``): a CUDA device (not ROCm) with float16 tensor cores (compute
    capability 7.0 or later) and a PyTorch whose ``torch.mm`` takes ``out_dtype``
    (PyTorch >= 2.8). Elsewhere it is emulated, three times the work of ``"full"``."""
    if device is None:
        return False
    device = torch.device(device)
    if device.type != "cuda" or torch.version.cuda is None or not torch.cuda.is_available():
        return False
    if torch.cuda.get_device_capability(device) < (7, 0):
        return False
    return _has_out_dtype()


@functools.cache
def _has_out_dtype() -> bool:
    """Whether this PyTorch's ``torch.mm`` has the ``out_dtype`` overload (PyTorch >= 2.8)."""
    try:
        return any("out_dtype" in str(s) for s in torch.ops.aten.mm._schemas.values())
    except Exception:  # a dispatcher without _schemas: "auto" stays "full"
        return False


def resolve_precision(precision: str, device=None) -> str:
    """The precision ``precision`` runs on ``device``: ``"auto"`` is ``"fp16x3"`` where it
    runs natively (:func:`native_fp16x3`: CUDA tensor cores; as faithful and as stable as
    float32 there and 1.1-1.4x faster, measured on an H100, docs/ssc.md), else ``"full"``
    (on a CPU ``"fp16x3"`` is an exact emulation at three times the work)."""
    if precision != "auto":
        return precision
    return "fp16x3" if native_fp16x3(device) else "full"


class Split:
    """An operand prepared for :meth:`Products.mm`: its float16 parts side by side (``t``)
    and the power of two it was scaled by (``scale``, a 0-d float32 tensor on its device).
    Row slices of a left operand (``split[:rows]``) keep the scale."""

    __slots__ = ("t", "scale")

    def __init__(self, t: torch.Tensor, scale: torch.Tensor):
        self.t, self.scale = t, scale

    def __getitem__(self, index) -> Split:
        return Split(self.t[index], self.scale)


def _parts(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(hi, lo, scale)`` with ``a * scale = hi + lo`` to about 2^-22, ``scale`` a power of
    two (1 for an all-zero ``a``)."""
    top = a.abs().amax().to(torch.float32)
    exp = torch.where(top > 0, TOP - torch.ceil(torch.log2(top)), torch.zeros_like(top))
    scale = torch.exp2(exp.clamp(-126.0, 126.0))  # a finite float32 power of two
    x = a * scale
    hi = x.to(torch.float16)
    lo = (x - hi.to(x.dtype)).to(torch.float16)
    return hi, lo, scale


def _mm_float32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` of float16 parts, accumulated and returned in float32."""
    if a.is_cuda:
        try:
            return torch.mm(a, b, out_dtype=torch.float32)
        except TypeError as exc:  # no out_dtype overload (errors of the product pass through)
            raise RuntimeError(
                "SSC precision='fp16x3' needs torch.mm(..., out_dtype=torch.float32) on CUDA "
                f"(PyTorch >= 2.8), which torch {torch.__version__} does not run ({exc}); "
                "use precision='full'"
            ) from exc
    return a.float() @ b.float()


class Products:
    """``a @ b`` at one precision. ``left`` / ``right`` prepare an operand that several
    products share (scaled and split once); ``mm`` takes prepared or plain operands."""

    def __init__(self, precision: str = "full"):
        if precision not in ("full", "fp16x3"):
            raise ValueError(f"precision: expected 'full' or 'fp16x3', got {precision!r}")
        self.precision = precision
        self.split = precision == "fp16x3"

    def left(self, a):
        """``a`` ready to be a left operand: itself, or a :class:`Split` of
        ``[a_hi | a_hi | a_lo]``."""
        if not self.split or isinstance(a, Split):
            return a
        hi, lo, scale = _parts(a)
        return Split(torch.cat([hi, hi, lo], dim=1), scale)

    def right(self, b):
        """``b`` ready to be a right operand: itself, or a :class:`Split` of
        ``[b_hi; b_lo; b_hi]``."""
        if not self.split or isinstance(b, Split):
            return b
        hi, lo, scale = _parts(b)
        return Split(torch.cat([hi, lo, hi], dim=0), scale)

    def mm(self, a, b) -> torch.Tensor:
        """``a @ b`` (float32 out in fp16x3; the working dtype in full)."""
        if not self.split:
            return a @ b
        a, b = self.left(a), self.right(b)
        out = _mm_float32(a.t, b.t)
        # undo the scales (powers of two: exact), the smaller factor first so that an
        # intermediate never overflows where the product itself does not
        fa, fb = 1.0 / a.scale, 1.0 / b.scale
        return out.mul_(torch.minimum(fa, fb)).mul_(torch.maximum(fa, fb))
