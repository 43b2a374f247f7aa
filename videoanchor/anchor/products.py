"""The fast solver's dense products at a chosen precision: ``"full"`` or ``"bf16x3"``.

``"full"`` multiplies in the working dtype (float32 by default): on a GPU that is FP32 on
the CUDA cores (PyTorch's default; the package never turns TF32 on).

``"bf16x3"`` runs each float32 product on bfloat16 tensor cores at about float32 accuracy.
Each operand is split into a bfloat16 head and a bfloat16 tail, ``a = a_hi + a_lo`` (the
tail holds the next 8 bits of the mantissa), and ``a b`` is computed as
``a_hi b_hi + a_hi b_lo + a_lo b_hi``, the three terms as ONE product with the inner
dimension tripled, ``[a_hi | a_hi | a_lo] @ [b_hi; b_lo; b_hi]``, accumulated in float32.
The dropped term ``a_lo b_lo`` and the tails' rounding leave a relative error of about
``2^-16`` per product, against ``2^-24`` for float32 and ``2^-11`` for TF32 inputs.

Why not TF32 inputs: on this package's fidelity sets (``benchmarks/bench_request_cost.py``,
``request_cost_cpu.json``, emulated on a CPU), 1e-6 relative perturbations of the features
move the fast solver's scores by 2e-3 to 0.09 with TF32 inputs, 5e-5 to 1.6e-3 in bf16x3 and
1.3e-5 to 1.0e-4 in float32 (one small set changes a label in both TF32 and bf16x3). PyTorch
also has no per-call TF32 switch, only a process-wide flag, which would change the model's
float32 products on other threads while the scores are computed beside them.

On CUDA the product is ``torch.mm(..., out_dtype=torch.float32)`` (PyTorch >= 2.8): bf16
inputs, float32 accumulation and output, on the tensor cores, with no global flag. Elsewhere
it is emulated exactly (the parts upcast to float32, whose products of two 8-bit
significands are exact, summed in float32): three times the work of ``"full"``, for tests.
"""

from __future__ import annotations

import torch

__all__ = ["PRECISIONS", "Products", "resolve_precision"]

PRECISIONS = ("auto", "full", "bf16x3")


def resolve_precision(precision: str) -> str:
    """The precision ``precision`` runs: ``"auto"`` is ``"full"`` (bf16x3 is opt-in until a
    GPU run has timed it, docs/ssc.md)."""
    return "full" if precision == "auto" else precision


def _parts(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    hi = a.to(torch.bfloat16)
    lo = (a - hi.to(a.dtype)).to(torch.bfloat16)
    return hi, lo


def _mm_float32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` of bfloat16 parts, accumulated and returned in float32."""
    if a.is_cuda:
        try:
            return torch.mm(a, b, out_dtype=torch.float32)
        except TypeError as exc:  # no out_dtype overload (errors of the product pass through)
            raise RuntimeError(
                "SSC precision='bf16x3' needs torch.mm(..., out_dtype=torch.float32) on CUDA "
                f"(PyTorch >= 2.8), which torch {torch.__version__} does not run ({exc}); "
                "use precision='full'"
            ) from exc
    return a.float() @ b.float()


class Products:
    """``a @ b`` at one precision. ``left`` / ``right`` prepare an operand that several
    products share (the split, once); ``mm`` takes prepared or plain float operands."""

    def __init__(self, precision: str = "full"):
        if precision not in ("full", "bf16x3"):
            raise ValueError(f"precision: expected 'full' or 'bf16x3', got {precision!r}")
        self.precision = precision
        self.split = precision == "bf16x3"

    def left(self, a: torch.Tensor) -> torch.Tensor:
        """``a`` ready to be a left operand: itself, or ``[a_hi | a_hi | a_lo]`` (bf16)."""
        if not self.split or a.dtype == torch.bfloat16:
            return a
        hi, lo = _parts(a)
        return torch.cat([hi, hi, lo], dim=1)

    def right(self, b: torch.Tensor) -> torch.Tensor:
        """``b`` ready to be a right operand: itself, or ``[b_hi; b_lo; b_hi]`` (bf16)."""
        if not self.split or b.dtype == torch.bfloat16:
            return b
        hi, lo = _parts(b)
        return torch.cat([hi, lo, hi], dim=0)

    def mm(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """``a @ b`` (float32 out in bf16x3; the working dtype in full)."""
        if not self.split:
            return a @ b
        return _mm_float32(self.left(a), self.right(b))
