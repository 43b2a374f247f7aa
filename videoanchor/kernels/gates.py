"""The anchor gates: scores to per-key gates (:func:`anchor_gates`, docs/method.md section 4)
and the gates in the Triton kernels' own form, made once per request
(:func:`prepare_gates`, :class:`PreparedGates`; the prefill kernel's fast form,
:func:`fast_form`). The entry points that take them are in :mod:`.interface`.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch

from videoanchor.kernels.checks import check_one_device
from videoanchor.kernels.launch import LOG2E

try:
    from videoanchor.kernels import triton_prefill
except Exception:  # triton missing or unusable here: no kernel forms (interface.py says why)
    triton_prefill = None

__all__ = [
    "FAST_FORM_BOUNDS",
    "GATE_MAX",
    "PreparedGates",
    "anchor_gates",
    "check_prepared",
    "fast_form",
    "gate_overflow_message",
    "prepare_gates",
    "value_scale_range_of",
]

#: the gates are formed in float32 (whatever the scores' dtype): its largest finite value.
GATE_MAX = float(torch.finfo(torch.float32).max)


def gate_overflow_message(name: str, alpha: float, s_max: float = 1.0) -> str:
    """The error for a gate strength whose gate ``1 + alpha * s`` is not finite in float32
    (finite in Python's float64, it passes the finite check but makes the gates inf and
    every attention output NaN)."""
    return (
        f"{name}={alpha!r}: the gate 1 + {name} * s overflows its dtype float32 (largest "
        f"finite {GATE_MAX:.4g}) for scores up to {s_max:.4g}; expected |{name}| * max(s) "
        f"well below {GATE_MAX:.4g} (useful gate strengths are around 1 to 100)"
    )


def anchor_gates(
    scores: torch.Tensor, alpha_k: float, alpha_v: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Turn anchor scores into the kernel's per-key gates.

    Args:
        scores: (B, S) (or any shape) anchor scores, 0 at non-visual positions.
        alpha_k, alpha_v: gate strengths (docs/method.md section 4).

    Returns:
        ``(key_bias, value_scale)`` = ``(log(1 + alpha_k * s), 1 + alpha_v * s)`` in float32.

    Raises ValueError if a score is NaN/Inf or a gate ``1 + alpha * s`` is not positive
    (this check synchronises with the device; call it once per request, not per layer).
    """
    if not isinstance(scores, torch.Tensor):
        raise TypeError(f"scores: expected a torch.Tensor, got {type(scores).__name__}")
    if not scores.is_floating_point():
        raise TypeError(f"scores: expected a floating-point tensor, got dtype {scores.dtype}")
    for name, alpha in (("alpha_k", alpha_k), ("alpha_v", alpha_v)):
        if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real):
            raise TypeError(f"{name}: expected a finite number, got {type(alpha).__name__}")
        if not math.isfinite(alpha):
            raise ValueError(f"{name}: expected a finite number, got {alpha!r}")
        if abs(alpha) > GATE_MAX:
            raise ValueError(gate_overflow_message(name, alpha))
    s = scores.to(torch.float32)
    if not bool(torch.isfinite(s).all()):
        raise ValueError("scores: expected finite values, got NaN or Inf")
    gamma_k = 1.0 + alpha_k * s
    gamma_v = 1.0 + alpha_v * s
    for name, alpha, gamma in (("alpha_k", alpha_k, gamma_k), ("alpha_v", alpha_v, gamma_v)):
        if not bool(torch.isfinite(gamma).all()):  # alpha finite in float64, s * alpha is not
            raise ValueError(gate_overflow_message(name, alpha, float(s.abs().max())))
        if s.numel() and bool((gamma <= 0).any()):
            worst = float(gamma.min())
            raise ValueError(
                f"{name}={alpha} makes the gate 1 + {name} * s non-positive (min {worst:.4g}); "
                f"expected 1 + {name} * s > 0 for every score s in [{float(s.min()):.4g}, "
                f"{float(s.max()):.4g}]"
            )
    return torch.log1p(alpha_k * s), gamma_v


# Fast form eligibility: a declared value-scale range within these bounds. The fast form
# folds log2(value_scale) into the logits, so its running maximum is that of the scaled
# logits: each unscaled probability is then at most 1 / lo and a row's sum at least 1 / hi
# (its largest scaled term is 1), far inside float32 for any range within 2^-60 .. 2^60.
FAST_FORM_BOUNDS = (2.0**-60, 2.0**60)


def value_scale_range_of(value_scale: torch.Tensor) -> tuple[float, float]:
    """``(min, max)`` of a value-scale tensor, with 1.0 included (the scale of keys outside
    the anchored prompt), for ``value_scale_range=``. Synchronises with the device: call it
    once per request (next to :func:`anchor_gates`), never per layer."""
    if value_scale.numel() == 0:
        return (1.0, 1.0)
    lo, hi = torch.aminmax(value_scale.detach().to(torch.float32))
    return (min(1.0, float(lo)), max(1.0, float(hi)))


def fast_form(value_scale_range) -> bool:
    """Whether a declared value-scale range lets the prefill kernel take its fast form.

    ``value_scale_range``: None, or ``(lo, hi)`` with ``0 < lo <= hi`` finite; the fast form
    needs ``FAST_FORM_BOUNDS[0] <= lo`` and ``hi <= FAST_FORM_BOUNDS[1]``. Raises ValueError
    on a malformed range.
    """
    if value_scale_range is None:
        return False
    try:
        lo, hi = (float(x) for x in value_scale_range)
    except (TypeError, ValueError):
        raise ValueError(
            f"value_scale_range: expected None or (lo, hi) floats, got {value_scale_range!r}"
        ) from None
    if not (math.isfinite(lo) and math.isfinite(hi) and 0 < lo <= hi):
        raise ValueError(
            f"value_scale_range: expected finite 0 < lo <= hi, got ({lo!r}, {hi!r}); pass "
            "None for value scales that are not bounded away from 0"
        )
    return FAST_FORM_BOUNDS[0] <= lo and hi <= FAST_FORM_BOUNDS[1]


@dataclass(frozen=True, eq=False)
class PreparedGates:
    """Per-key gates in the form the Triton kernels read, made once by :func:`prepare_gates`
    and passed to every call of a request (``gates=``: every layer, every decode step).

    Attributes:
        key_bias, value_scale: the gates as given, (B, N) (dense) or (N,) (packed), or None.
        value_scale_range: the declared ``(lo, hi)`` of ``value_scale`` (the fast form), or
            None.
        fold: the fast form's gates (``triton_prefill.fold_gates`` of ``bias_log2`` and
            ``value_scale``: the bf16 rows (B, N, 16) or (N, 16), the float32 bias (B, N)
            or (N,) and pairs (B, N, 2) or (N, 2), views of one buffer), where the range
            allows that form and Triton is installed; else None.
        bias_log2: float32 ``(key_bias - shift) * log2(e)``, what the kernels add to the
            logits (None without a key bias, or where Triton is not installed).
        shift: float32 (B,) (dense) or (1,) (packed): the largest finite ``key_bias`` of
            each row (of all positions, packed), 0 where there is none; the lse adds it back.
    """

    key_bias: torch.Tensor | None
    value_scale: torch.Tensor | None
    value_scale_range: tuple[float, float] | None
    bias_log2: torch.Tensor | None
    shift: torch.Tensor | None
    fold: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    @property
    def length(self) -> int:
        """N, the positions the gates cover (a call may use a prefix of them: dense gates
        serve any ``Skv <= N``)."""
        t = self.key_bias if self.key_bias is not None else self.value_scale
        return 0 if t is None else t.shape[-1]

    def natural(self, n: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """``(key_bias, value_scale)`` over the first ``n`` positions (views), for the paths
        that take the gates as given (the torch backend, gradients, torch.compile)."""
        return tuple(
            None if t is None else t if t.shape[-1] == n else t[..., :n]
            for t in (self.key_bias, self.value_scale)
        )


def prepare_gates(
    key_bias: torch.Tensor | None = None,
    value_scale: torch.Tensor | None = None,
    *,
    value_scale_range: tuple[float, float] | None = None,
) -> PreparedGates:
    """The gates of a request in the kernels' own form, for :func:`anchored_attention`'s and
    :func:`anchored_attention_varlen`'s ``gates=``: the work that does not depend on the
    call (the key bias in log2 units, shifted by its largest finite value per row) runs
    here, once, instead of in every layer's call.

    Args:
        key_bias, value_scale: (B, N) float gates for dense calls, whose keys are the first
            ``Skv <= N`` positions (N may exceed Skv: a decode cache's gates prepared once
            with room to grow), or (N,) for packed (varlen) calls with N = total_k; None
            for no bias / no scale.
        value_scale_range: as in :func:`anchored_attention` (the fast form); e.g.
            :func:`value_scale_range_of` of ``value_scale``.

    Runs on the device, no host synchronisation (call :func:`anchor_gates`, which checks the
    scores, before it). A call with prepared gates reads nothing back to the host beyond
    what the same call without gates reads. The shift is taken over all N positions, padded
    or not (a per-call shift sees the mask): exact either way (a constant per row cancels in
    the softmax); for rounding it matters only where hidden keys carry a bias far above the
    visible ones'.
    """
    named = (("key_bias", key_bias), ("value_scale", value_scale))
    given = [(n, t) for n, t in named if t is not None]
    for name, t in given:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor or None, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name}: expected a floating-point tensor, got dtype {t.dtype}")
        if t.dim() not in (1, 2):
            raise ValueError(
                f"{name}: expected (B, N) gates (dense calls) or (N,) (packed calls), got "
                f"shape {tuple(t.shape)}"
            )
    if len(given) == 2 and key_bias.shape != value_scale.shape:
        raise ValueError(
            "key_bias, value_scale: expected the same shape, got "
            f"{tuple(key_bias.shape)} and {tuple(value_scale.shape)}"
        )
    check_one_device(given)
    fast = fast_form(value_scale_range)  # raises on a malformed range
    if value_scale_range is not None:
        value_scale_range = tuple(float(x) for x in value_scale_range)
    bias_log2 = shift = None
    if key_bias is not None and triton_prefill is not None:
        with torch.no_grad():
            kb = key_bias.detach().to(torch.float32)
            varlen = kb.dim() == 1
            shift = triton_prefill.bias_shift(kb, varlen=varlen).reshape(-1)
            bias_log2 = ((kb - (shift if varlen else shift[:, None])) * LOG2E).contiguous()
    fold = None
    if fast and value_scale is not None and triton_prefill is not None:
        with torch.no_grad():
            fold = triton_prefill.fold_gates(bias_log2, value_scale.detach())
    return PreparedGates(key_bias, value_scale, value_scale_range, bias_log2, shift, fold)


def check_prepared(gates, key_bias, value_scale, value_scale_range, batch, n_keys, packed):
    """A ``gates=`` argument: a :class:`PreparedGates` of the call's layout, alone."""
    if not isinstance(gates, PreparedGates):
        raise TypeError(
            f"gates: expected None or videoanchor.kernels.PreparedGates (from prepare_gates), "
            f"got {type(gates).__name__}"
        )
    if key_bias is not None or value_scale is not None or value_scale_range is not None:
        raise ValueError(
            "gates: expected either gates= (prepared) or key_bias / value_scale / "
            "value_scale_range, got both; pass the prepared gates alone"
        )
    t = gates.key_bias if gates.key_bias is not None else gates.value_scale
    if t is None:
        return
    if packed:
        if tuple(t.shape) != (n_keys,):
            raise ValueError(
                f"gates: expected packed gates of shape (total_k,) = ({n_keys},), got "
                f"{tuple(t.shape)}; prepare them from (total_k,) tensors"
            )
    elif t.dim() != 2 or t.shape[0] != batch or t.shape[1] < n_keys:
        raise ValueError(
            f"gates: expected gates of shape (B, N) with B = {batch} and N >= Skv = {n_keys}, "
            f"got {tuple(t.shape)}"
        )
