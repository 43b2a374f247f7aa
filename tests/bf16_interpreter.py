"""Test-only shim: make Triton's CPU interpreter treat bfloat16 as bfloat16 values.

The interpreter stores bf16 as raw uint16 bit patterns: its ``tl.dot`` multiplies those
patterns as integers (values around 1e10) and its float32 -> bf16 cast truncates, where
the GPU rounds to nearest even. This shim patches the interpreter's builder so that

- ``tl.dot`` with bf16 operands widens them exactly to float32 (a bf16 value is the top
  16 bits of its float32) and accumulates in float32, as the tensor cores do; the
  product of two bf16 values is exact in float32;
- a float32 -> bf16 cast rounds to nearest even (NaN stays NaN), as ``cvt.rn.bf16.f32``.

Nothing else in the kernels does arithmetic on bf16 values (loads are upcast before use).
The shim checks the interpreter's internals it replaces and skips, with the reason, when
they are not there (tested with triton 3.9).
"""

from __future__ import annotations

import contextlib

import numpy as np


def _bf16_bits_to_f32(bits: np.ndarray) -> np.ndarray:
    return (np.asarray(bits).astype(np.uint32) << np.uint32(16)).view(np.float32)


def f32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """Round float32 to the nearest bf16 (ties to even); bit patterns as uint16."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = (bits + (np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1)))) >> np.uint32(
        16
    )
    nan = (bits & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
    quiet = (bits >> np.uint32(16)) | np.uint32(0x0040)
    return np.where(nan, quiet, rounded).astype(np.uint16)


def unavailable_reason() -> str | None:
    try:
        import triton.language as tl
        from triton.runtime import interpreter
    except Exception as exc:
        return f"triton's interpreter is not importable: {exc}"
    builder = getattr(interpreter, "InterpreterBuilder", None)
    if builder is None or not all(hasattr(builder, n) for n in ("create_dot", "cast_impl")):
        return "this triton's interpreter has no InterpreterBuilder.create_dot/cast_impl"
    if interpreter._get_np_dtype(tl.bfloat16) != np.dtype(np.uint16):
        return "this triton's interpreter does not store bf16 as uint16 bit patterns"
    return None


@contextlib.contextmanager
def bf16_interpreter():
    """Within this block the interpreter computes bf16 dots and casts as a GPU would."""
    import triton.language as tl
    from triton.runtime import interpreter

    reason = unavailable_reason()
    if reason:
        raise RuntimeError(reason)
    Builder = interpreter.InterpreterBuilder
    TensorHandle = interpreter.TensorHandle
    real_dot, real_cast = Builder.create_dot, Builder.cast_impl

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if a.dtype.scalar == tl.bfloat16 or b.dtype.scalar == tl.bfloat16:
            if not (a.dtype.scalar == b.dtype.scalar == tl.bfloat16):
                raise TypeError(f"bf16 shim: expected two bf16 operands, got {a.dtype}, {b.dtype}")
            if d.data.dtype != np.float32:
                raise TypeError(f"bf16 shim: expected a float32 accumulator, got {d.data.dtype}")
            prod = np.matmul(_bf16_bits_to_f32(a.data), _bf16_bits_to_f32(b.data), dtype=np.float32)
            return TensorHandle(prod + d.data, d.dtype.scalar)
        return real_dot(self, a, b, d, input_precision, max_num_imprecise_acc)

    def cast_impl(self, src, dst_type):
        src_ty, dst_ty = src.dtype.scalar, dst_type.scalar
        if src_ty == tl.float32 and dst_ty == tl.bfloat16:
            return TensorHandle(f32_to_bf16_bits(src.data), dst_ty)
        if src_ty == tl.bfloat16 and dst_ty == tl.float32:
            return TensorHandle(_bf16_bits_to_f32(src.data), dst_ty)
        return real_cast(self, src, dst_type)

    Builder.create_dot, Builder.cast_impl = create_dot, cast_impl
    try:
        yield
    finally:
        Builder.create_dot, Builder.cast_impl = real_dot, real_cast
