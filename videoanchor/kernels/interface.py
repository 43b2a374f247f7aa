"""Public entry points: :func:`anchored_attention` and :func:`anchor_gates`."""

from __future__ import annotations

import contextlib
import math
import numbers
import os
import warnings
from dataclasses import dataclass

import torch

from videoanchor.kernels.checks import check_cache_seqlens, check_cu_seqlens
from videoanchor.kernels.launch import LOG2E, MIN_CAPABILITY, device_capability
from videoanchor.kernels.torch_attention import anchored_attention_torch

try:
    import triton  # noqa: F401

    from videoanchor.kernels import triton_backward, triton_decode, triton_prefill

    _TRITON_ERROR: Exception | None = None
except Exception as exc:  # triton missing or unusable on this platform
    triton_prefill = triton_decode = triton_backward = None
    _TRITON_ERROR = exc

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_BACKENDS = ("auto", "triton", "torch")
_TRITON_HEAD_DIMS = (16, 256)
# The split-KV path serves short query blocks against long caches (decode, small chunks).
DECODE_MAX_SQ = 64
DECODE_MIN_SKV = 256


def empty_output(q: torch.Tensor) -> torch.Tensor:
    """(B, Hq, Sq, D) output stored as (B, Sq, Hq, D): the layout transformers and most
    callers want next, so ``out.transpose(1, 2)`` is contiguous and needs no copy."""
    B, Hq, Sq, D = q.shape
    s_h = max(D, 1)  # the strides of a contiguous (B, Sq, Hq, D) tensor, as torch makes them
    s_q = s_h * max(Hq, 1)
    # One operator (empty_strided) where new_empty + transpose are three.
    return torch.empty_strided(
        (B, Hq, Sq, D), (s_q * max(Sq, 1), s_h, s_q, 1), dtype=q.dtype, device=q.device
    )


def triton_interpret_enabled() -> bool:
    """True when Triton runs kernels on the CPU through its interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


#: the gates are formed in float32 (whatever the scores' dtype): its largest finite value.
_GATE_MAX = float(torch.finfo(torch.float32).max)


def gate_overflow_message(name: str, alpha: float, s_max: float = 1.0) -> str:
    """The error for a gate strength whose gate ``1 + alpha * s`` is not finite in float32
    (finite in Python's float64, it passes the finite check but makes the gates inf and
    every attention output NaN)."""
    return (
        f"{name}={alpha!r}: the gate 1 + {name} * s overflows its dtype float32 (largest "
        f"finite {_GATE_MAX:.4g}) for scores up to {s_max:.4g}; expected |{name}| * max(s) "
        f"well below {_GATE_MAX:.4g} (useful gate strengths are around 1 to 100)"
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
        if abs(alpha) > _GATE_MAX:
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


# ---- host-side validation of the options (one place per entry point) -----------------


def _check_bool(name, value):
    """A flag must be a bool: a truthy string such as "no" must not switch it on."""
    numpy_bool = type(value).__module__ == "numpy" and type(value).__name__ in ("bool", "bool_")
    if not (isinstance(value, bool) or numpy_bool):
        raise TypeError(f"{name}: expected True or False, got {value!r}; try {name}=False")


def _check_sm_scale(sm_scale):
    if sm_scale is None:
        return
    if isinstance(sm_scale, bool) or not isinstance(sm_scale, numbers.Real):
        raise TypeError(f"sm_scale: expected None or a finite float, got {type(sm_scale).__name__}")
    if not math.isfinite(sm_scale):
        raise ValueError(f"sm_scale: expected None or a finite float, got {sm_scale!r}")


def _check_options(causal, return_lse, sm_scale):
    _check_bool("causal", causal)
    _check_bool("return_lse", return_lse)
    _check_sm_scale(sm_scale)


def _check_max_seqlen(name, value, allow_none):
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        want = "None or a non-negative int" if allow_none else "a non-negative int"
        raise ValueError(f"{name}: expected {want}, got {value!r}")


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
    _check_one_device(given)
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


def _check_prepared(gates, key_bias, value_scale, value_scale_range, batch, n_keys, packed):
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


def _check_tensor(name, t, ndim):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name}: expected {ndim} dims, got shape {tuple(t.shape)}")


def _check_dtypes(q, k, v):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dtype not in _DTYPES:
            raise TypeError(f"{name}: expected dtype float16, bfloat16 or float32, got {t.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v: expected one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")


def _check_one_device(named):
    devices = {(name, t.device) for name, t in named if t is not None}
    if len({d for _, d in devices}) > 1:
        found = ", ".join(f"{n} on {d}" for n, d in sorted(devices, key=lambda x: x[0]))
        raise ValueError(f"expected all tensors on one device, got {found}")


def _check_qkv(q, k, v, backend, kv_layout):
    """Checks shared by the dense (B, H, S, D) and varlen (S, H, D) entry points."""
    ndim = len(kv_layout.split(","))
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_tensor(name, t, ndim)
    if backend not in _BACKENDS:
        raise ValueError(f"backend: expected one of {_BACKENDS}, got {backend!r}")
    _check_dtypes(q, k, v)
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


def _validate(
    q, k, v, key_bias, value_scale, key_padding_mask, backend, cache_seqlens=None, gates=None
):  # fmt: skip
    _check_qkv(q, k, v, backend, "B, Hkv, Skv, D")
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
        _check_tensor(name, t, 2)
        if tuple(t.shape) != (B, Skv):
            raise ValueError(
                f"{name}: expected shape (B, Skv) = ({B}, {Skv}), got {tuple(t.shape)}"
            )
        if dtypes == "bool" and t.dtype != torch.bool:
            raise TypeError(f"{name}: expected dtype torch.bool (True = may attend), got {t.dtype}")
        if dtypes == "float" and not t.is_floating_point():
            raise TypeError(f"{name}: expected a floating-point tensor, got dtype {t.dtype}")
    if cache_seqlens is not None:
        _check_tensor("cache_seqlens", cache_seqlens, 1)
        if cache_seqlens.dtype not in (torch.int32, torch.int64):
            raise TypeError(
                f"cache_seqlens: expected dtype int32 (or int64), got {cache_seqlens.dtype}"
            )
        if cache_seqlens.shape[0] != B:
            raise ValueError(
                f"cache_seqlens: expected shape (B,) = ({B},), got {tuple(cache_seqlens.shape)}"
            )
    prepared = () if gates is None else (("gates", gates.key_bias), ("gates", gates.value_scale))
    _check_one_device(
        (("q", q), ("k", k), ("v", v), ("key_bias", key_bias), ("value_scale", value_scale),
         ("key_padding_mask", key_padding_mask), ("cache_seqlens", cache_seqlens), *prepared)
    )  # fmt: skip
    if cache_seqlens is not None:
        check_cache_seqlens(cache_seqlens, Skv)


def _check_attn_mask(attn_mask, q, k):
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


# The warnings given once per process (reset_warnings forgets them): the attn_mask
# fallback ("attn_mask") and each reason of backend="auto"'s fallback to the torch path.
_WARNED: set[str] = set()


def reset_warnings() -> None:
    """Forget which of the kernels' once-per-process warnings were given (the ``attn_mask``
    fallback to the exact torch path, ``backend="auto"`` falling back on a device the Triton
    kernels cannot run on): each is given again at its next occasion, as in a new process.
    For tests and notebooks that check or want to see these warnings."""
    _WARNED.clear()


def _warn_attn_mask_fallback():
    if "attn_mask" not in _WARNED:
        _WARNED.add("attn_mask")
        warnings.warn(
            "anchored_attention: attn_mask is served by the exact PyTorch path (chunked, "
            "bounded memory), not the fused Triton kernel; pass key_padding_mask / causal / "
            "cache_seqlens instead when they describe the mask, to keep the fused kernel",
            stacklevel=3,
        )


def triton_unsupported_reason(capability: tuple[int, int] | None, head_dim: int) -> str | None:
    """Why the Triton kernels cannot serve this device and head dim, or None if they can.
    ``capability`` is the CUDA compute capability (None: the CPU interpreter)."""
    lo, hi = _TRITON_HEAD_DIMS
    if not lo <= head_dim <= hi:
        return f"expected head dim in [{lo}, {hi}], got {head_dim}"
    if capability is not None and tuple(capability) < MIN_CAPABILITY:
        major, minor = capability
        return (
            f"expected compute capability >= {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]}, got "
            f"{major}.{minor}: Triton emits no tensor-core MMA there and the D >= 128 prefill "
            "tiles need more shared memory than its 64 KB"
        )
    return None


def choose_backend(backend: str, *, is_cuda: bool, capability, head_dim: int) -> str:
    """The backend a call runs on, from the request and the device (no tensors needed, so
    the choice can be tested for any compute capability). ``"auto"`` never picks a kernel
    that cannot run on the device: it falls back to the exact torch path and says why once."""
    if backend == "torch":
        return "torch"
    if backend == "auto":
        if not is_cuda or triton_prefill is None:
            return "torch"
        reason = triton_unsupported_reason(capability, head_dim)
        if reason is None:
            return "triton"
        if reason not in _WARNED:
            _WARNED.add(reason)
            warnings.warn(
                f"videoanchor: backend='auto' uses the exact torch path on this device ({reason})",
                stacklevel=3,
            )
        return "torch"
    if triton_prefill is None:
        raise ValueError(
            f"backend='triton': Triton is not usable here ({_TRITON_ERROR}); use backend='torch'"
        )
    if not (is_cuda or triton_interpret_enabled()):
        raise ValueError(
            "backend='triton': expected CUDA tensors, got CPU tensors; set TRITON_INTERPRET=1 "
            "before importing videoanchor to run the kernel on CPU, or use backend='torch'"
        )
    reason = triton_unsupported_reason(capability if is_cuda else None, head_dim)
    if reason is not None:
        raise ValueError(f"backend='triton': {reason}; use backend='torch' or 'auto'")
    return "triton"


def _pick_backend(q, backend):
    capability = device_capability(q.device) if q.is_cuda else None
    return choose_backend(backend, is_cuda=q.is_cuda, capability=capability, head_dim=q.shape[-1])


def _forward(
    q, k, v, key_bias, value_scale, key_padding_mask, cache_seqlens, causal, sm_scale,
    return_lse, fast=False, prepared_shift=None, prepared_fold=None, value_scale_range=None,
):  # fmt: skip
    """The Triton forward on validated inputs: ``(out, lse)``, lse None unless
    ``return_lse``. ``prepared_shift``: ``key_bias`` is :attr:`PreparedGates.bias_log2`;
    ``fast``: the prefill kernel's fast form (``prepared_fold``: :attr:`PreparedGates.fold`;
    ``value_scale_range``: the declared range, which lets fp16 sum rows on the tensor
    cores)."""
    B, Hq, Sq, D = q.shape
    Skv = k.shape[2]
    out = empty_output(q)
    lse = torch.empty((B, Hq, Sq), dtype=torch.float32, device=q.device) if return_lse else None
    if Sq == 0:
        return out, lse
    if Skv == 0:
        out.zero_()
        if lse is not None:
            lse.fill_(float("-inf"))
        return out, lse
    device_ctx = torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext()
    use_split_kv = Sq <= DECODE_MAX_SQ and Skv >= DECODE_MIN_SKV
    launch = triton_decode.launch_decode if use_split_kv else triton_prefill.launch_prefill
    # The split-KV path keeps the general form (its loop is short: one query row block).
    extra = {} if use_split_kv else {
        "fast": fast, "prepared_fold": prepared_fold, "value_scale_range": value_scale_range,
    }  # fmt: skip
    with device_ctx:
        launch(
            q, k, v, key_bias, value_scale, key_padding_mask, out, lse,
            causal=causal, sm_scale=sm_scale, interpret=not q.is_cuda, cache_seqlens=cache_seqlens,
            prepared_shift=prepared_shift, **extra,
        )  # fmt: skip
    return out, lse


@torch.library.custom_op("videoanchor::anchored_attention_fwd", mutates_args=())
def _anchored_attention_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_bias: torch.Tensor | None,
    value_scale: torch.Tensor | None,
    key_padding_mask: torch.Tensor | None,
    cache_seqlens: torch.Tensor | None,
    causal: bool,
    sm_scale: float,
    return_lse: bool,
    fast: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    out, lse = _forward(
        q, k, v, key_bias, value_scale, key_padding_mask, cache_seqlens, causal, sm_scale,
        return_lse, fast,
    )  # fmt: skip
    return out, lse if lse is not None else q.new_empty((0,), dtype=torch.float32)


@_anchored_attention_fwd.register_fake
def _(
    q,
    k,
    v,
    key_bias,
    value_scale,
    key_padding_mask,
    cache_seqlens,
    causal,
    sm_scale,
    return_lse,
    fast=False,
):
    B, Hq, Sq, D = q.shape
    out = empty_output(q)
    lse = q.new_empty((B, Hq, Sq) if return_lse else (0,), dtype=torch.float32)
    return out, lse


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _eager_inference(*tensors) -> bool:
    """Whether a Triton call may run its forward directly instead of through its custom op,
    whose dispatch (autograd and dispatcher layers) costs tens of microseconds of host time
    per call, most of a batch-1 decode step's (``bench_host_overhead.py``): no gradient
    wanted, no torch.compile tracing, no dispatch mode or functorch transform active (they
    need the op's fake implementation), plain tensors (``tensors[0]`` is q)."""
    return (
        not _needs_grad(*tensors)
        and not torch.compiler.is_compiling()
        and not torch._C._are_functorch_transforms_active()
        and not torch._C._len_torch_dispatch_stack()
        and all(t is None or type(t) is torch.Tensor for t in tensors)
        and tensors[0].device.type != "meta"
    )


def anchored_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_bias: torch.Tensor | None = None,
    value_scale: torch.Tensor | None = None,
    *,
    causal: bool = True,
    sm_scale: float | None = None,
    key_padding_mask: torch.Tensor | None = None,
    backend: str = "auto",
    return_lse: bool = False,
    cache_seqlens: torch.Tensor | None = None,
    attn_mask: torch.Tensor | None = None,
    value_scale_range: tuple[float, float] | None = None,
    gates: PreparedGates | None = None,
):
    """Attention with VideoAnchor's per-key gate, fused (no (Sq, Skv) tensor is built).

    ``out[b, h, i] = sum_j softmax_j(q_i . k_j * sm_scale + key_bias[b, j]) * value_scale[b, j] * v_j``

    Differentiable in q, k, v, key_bias and value_scale (and through lse): the Triton
    backend has a fused backward kernel, the torch backend a chunked exact one.

    Args:
        q: (B, Hq, Sq, D) float16, bfloat16 or float32, any strides.
        k, v: (B, Hkv, Skv, D), same dtype and device; ``Hq % Hkv == 0`` (GQA/MQA: query
            head h reads KV head ``h // (Hq // Hkv)``).
        key_bias: (B, Skv) float, added to the logits of key j after ``sm_scale`` (natural
            log units: ``log(1 + alpha_K s_j)``); None for no bias.
        value_scale: (B, Skv) float, multiplies ``v_j`` (``1 + alpha_V s_j``); the softmax
            normaliser uses the unscaled probabilities. None for no scale.
        causal: bottom-right aligned, as in flash-attention: query i sees key j iff
            ``j <= i + Skv - Sq``. For Sq = 2, Skv = 5 (1 = visible)::

                1 1 1 1 0
                1 1 1 1 1

            and for Sq = 5, Skv = 2 the first three queries see nothing (they return 0)::

                0 0
                0 0
                0 0
                1 0
                1 1

        sm_scale: logit scale, default ``1 / sqrt(D)``.
        key_padding_mask: (B, Skv) bool, True = the key may be attended. A query row with no
            visible key returns zeros (and lse ``-inf``), never NaN.
        backend: ``"triton"`` (CUDA, or CPU under ``TRITON_INTERPRET=1``), ``"torch"`` (exact
            PyTorch path, bounded memory, any device), or ``"auto"`` (triton on CUDA,
            torch otherwise).
        return_lse: also return the natural-log log-sum-exp of each row's logits
            (bias included), (B, Hq, Sq) float32, to merge partial attentions.
        cache_seqlens: (B,) int32, for a preallocated (static) KV cache: sample b uses only
            its first ``cache_seqlens[b]`` keys (those of the current queries included), and
            the causal diagonal is aligned to that length, as in flash-attention's
            ``flash_attn_with_kvcache``. Values must lie in [0, Skv]: a ValueError on the host,
            a device-side assertion (no sync) for CUDA tensors (see ``kernels/checks.py``).
        attn_mask: a general mask broadcastable to (B, Hq, Sq, Skv), as in SDPA: bool
            (True = may attend) or floating (added to the logits after ``key_bias``), on
            top of ``causal``, ``key_padding_mask`` and ``cache_seqlens``; the gates still
            apply. It is served by the exact PyTorch path (a one-time warning says so when
            the Triton kernel would have run). A row with no visible key returns 0; a
            float mask of large finite negatives (``finfo.min``) is a logit like any other.
        value_scale_range: ``(lo, hi)``, a promise that every ``value_scale`` entry lies in
            ``[lo, hi]`` with ``0 < lo``, e.g. :func:`value_scale_range_of` of VideoAnchor's
            gates (``[1, 1 + alpha_V]``). It lets the Triton prefill kernel take its fast
            form, in the same single launch: ``log2(value_scale)`` rides in the logit
            with the key bias, so the probabilities come out scaled, and the row sum
            takes ``1 / value_scale`` back out (16-bit inputs without the lse: on the
            tensor cores; fp16 only for ranges within ``[0.5, 2^15]``). Not checked on
            the device: positive scales outside the range change no arithmetic (only
            the no-overflow argument's bounds), except in fp16's tensor-core row sum,
            exact for scales in ``[0.2502, 2^15]``, within fp16's rounding up to
            ``2^28`` and wrong below ``1/4``; a scale <= 0 under a range gives NaN.
            Ignored by the torch backend, by the split-KV (decode) path and outside
            ``FAST_FORM_BOUNDS``. ``key_bias`` needs no bound in either form.
        gates: the gates prepared once (:func:`prepare_gates`), in place of ``key_bias``,
            ``value_scale`` and ``value_scale_range``: (B, N) with N >= Skv, the first Skv
            positions used. A call then runs no torch operator on the gates (the
            integrations prepare them once per request and pass them to every layer and
            decode step); calls that take the gates as given (the torch backend,
            gradients, torch.compile, ``attn_mask``) use their first Skv positions.

    Returns:
        ``out`` (B, Hq, Sq, D) in q's dtype, stored as (B, Sq, Hq, D) so that
        ``out.transpose(1, 2)`` is contiguous, or ``(out, lse)`` when ``return_lse``.

    Host synchronisation: none on CUDA tensors (metadata checks are device assertions).
    Eager calls without gradients run the Triton launchers directly, the others (autograd,
    torch.compile) through the custom op ``videoanchor::anchored_attention_fwd``.
    """
    _check_options(causal, return_lse, sm_scale)
    causal, return_lse = bool(causal), bool(return_lse)
    if gates is not None:
        _check_tensor("q", q, 4)
        _check_tensor("k", k, 4)
        _check_prepared(gates, key_bias, value_scale, value_scale_range, q.shape[0], k.shape[2],
                        packed=False)  # fmt: skip
    _validate(q, k, v, key_bias, value_scale, key_padding_mask, backend, cache_seqlens, gates)
    _check_attn_mask(attn_mask, q, k)
    scale = 1.0 / math.sqrt(q.shape[-1]) if sm_scale is None else float(sm_scale)
    if attn_mask is not None:
        if backend == "triton" or (backend == "auto" and q.is_cuda):
            _warn_attn_mask_fallback()
        use_triton = False
    else:
        use_triton = _pick_backend(q, backend) == "triton"
    shift = fold = None
    if gates is not None:
        direct = use_triton and _eager_inference(q, k, v, gates.key_bias, gates.value_scale)
        value_scale_range = gates.value_scale_range
        if direct:  # the prepared form: nothing computed on the gates in this call
            key_bias, value_scale, shift = gates.bias_log2, gates.value_scale, gates.shift
            fold = gates.fold
        else:
            key_bias, value_scale = gates.natural(k.shape[2])
    else:
        direct = use_triton and _eager_inference(q, k, v, key_bias, value_scale)
    fast = value_scale is not None and fast_form(value_scale_range)
    if direct:
        out, lse = _forward(
            q, k, v, key_bias, value_scale, key_padding_mask, cache_seqlens, causal, scale,
            return_lse, fast, shift, fold, value_scale_range,
        )  # fmt: skip
    elif use_triton:
        # Training saves the lse for the backward kernel.
        want_lse = return_lse or _needs_grad(q, k, v, key_bias, value_scale)
        out, lse = _anchored_attention_fwd(
            q, k, v, key_bias, value_scale, key_padding_mask, cache_seqlens, causal, scale,
            want_lse, fast,
        )  # fmt: skip
    else:
        out, lse = anchored_attention_torch(
            q, k, v, key_bias, value_scale, causal=causal, sm_scale=scale,
            key_padding_mask=key_padding_mask, cache_seqlens=cache_seqlens, attn_mask=attn_mask,
        )  # fmt: skip
    return (out, lse) if return_lse else out


# ---- variable-length (packed) batches -------------------------------------------------


def _validate_varlen(
    q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, key_bias, value_scale,
    backend,
):  # fmt: skip
    _check_qkv(q, k, v, backend, "total_k, Hkv, D")
    total_k = k.shape[0]
    for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        _check_tensor(name, cu, 1)
        if cu.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"{name}: expected dtype int32 (or int64), got {cu.dtype}")
        if cu.numel() < 1:
            raise ValueError(f"{name}: expected batch + 1 >= 1 offsets, got an empty tensor")
    if cu_seqlens_q.numel() != cu_seqlens_k.numel():
        raise ValueError(
            "cu_seqlens_q, cu_seqlens_k: expected the same number of sequences, got "
            f"{cu_seqlens_q.numel() - 1} and {cu_seqlens_k.numel() - 1}"
        )
    _check_max_seqlen("max_seqlen_q", max_seqlen_q, allow_none=False)
    _check_max_seqlen("max_seqlen_k", max_seqlen_k, allow_none=True)
    for name, t in (("key_bias", key_bias), ("value_scale", value_scale)):
        if t is None:
            continue
        _check_tensor(name, t, 1)
        if t.shape[0] != total_k:
            raise ValueError(
                f"{name}: expected shape (total_k,) = ({total_k},), got {tuple(t.shape)}"
            )
        if not t.is_floating_point():
            raise TypeError(f"{name}: expected a floating-point tensor, got dtype {t.dtype}")
    _check_one_device(
        (("q", q), ("k", k), ("v", v), ("cu_seqlens_q", cu_seqlens_q),
         ("cu_seqlens_k", cu_seqlens_k), ("key_bias", key_bias), ("value_scale", value_scale))
    )  # fmt: skip
    check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, q.shape[0], max_seqlen_q)
    check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, total_k, None)


def _forward_varlen(
    q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, key_bias, value_scale,
    causal, sm_scale, return_lse, fast=False, prepared_shift=None, prepared_fold=None,
    value_scale_range=None,
):  # fmt: skip
    """The varlen Triton forward on validated inputs: ``(out, lse)``, lse None unless
    ``return_lse``. ``prepared_shift``: ``key_bias`` is :attr:`PreparedGates.bias_log2`;
    ``fast``: the prefill kernel's fast form (``prepared_fold``: :attr:`PreparedGates.fold`;
    ``value_scale_range`` as in :func:`_forward`)."""
    total_q, Hq, D = q.shape
    out = torch.empty(total_q, Hq, D, dtype=q.dtype, device=q.device)
    lse = torch.empty((Hq, total_q), dtype=torch.float32, device=q.device) if return_lse else None
    if total_q == 0 or max_seqlen_q == 0 or cu_seqlens_q.numel() < 2:
        return out, lse
    if k.shape[0] == 0:
        out.zero_()
        if lse is not None:
            lse.fill_(float("-inf"))
        return out, lse
    device_ctx = torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext()
    # max_seqlen_k < 0: unknown; the mean sequence length stands in for the choice.
    hint_k = max_seqlen_k if max_seqlen_k >= 0 else k.shape[0] // (cu_seqlens_q.numel() - 1)
    use_split_kv = max_seqlen_q <= DECODE_MAX_SQ and hint_k >= DECODE_MIN_SKV
    launch = triton_decode.launch_decode if use_split_kv else triton_prefill.launch_prefill
    if use_split_kv:
        extra = {"max_seqlen_k": max_seqlen_k if max_seqlen_k >= 0 else None}
    else:
        extra = {
            "fast": fast, "prepared_fold": prepared_fold, "value_scale_range": value_scale_range,
        }  # fmt: skip
    with device_ctx:
        launch(
            q, k, v, key_bias, value_scale, None, out, lse,
            causal=causal, sm_scale=sm_scale, interpret=not q.is_cuda,
            cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q,
            prepared_shift=prepared_shift, **extra,
        )  # fmt: skip
    return out, lse


@torch.library.custom_op("videoanchor::anchored_attention_varlen_fwd", mutates_args=())
def _anchored_attention_varlen_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    key_bias: torch.Tensor | None,
    value_scale: torch.Tensor | None,
    causal: bool,
    sm_scale: float,
    return_lse: bool,
    fast: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    out, lse = _forward_varlen(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, key_bias, value_scale,
        causal, sm_scale, return_lse, fast,
    )  # fmt: skip
    return out, lse if lse is not None else q.new_empty((0,), dtype=torch.float32)


@_anchored_attention_varlen_fwd.register_fake
def _(
    q,
    k,
    v,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q,
    max_seqlen_k,
    key_bias,
    value_scale,
    causal,
    sm_scale,
    return_lse,
    fast=False,
):
    total_q, Hq, D = q.shape
    out = q.new_empty(total_q, Hq, D)
    lse = q.new_empty((Hq, total_q) if return_lse else (0,), dtype=torch.float32)
    return out, lse


if triton_backward is not None:
    triton_backward.register_autograd(_anchored_attention_fwd, _anchored_attention_varlen_fwd)


def _varlen_torch(q, k, v, cu_q, cu_k, max_seqlen_q, key_bias, value_scale, causal, sm_scale):
    total_q, Hq, D = q.shape
    out = torch.zeros(total_q, Hq, D, dtype=q.dtype, device=q.device)
    lse = torch.full((Hq, total_q), float("-inf"), dtype=torch.float32, device=q.device)
    qs, ks = cu_q.tolist(), cu_k.tolist()
    for b in range(len(qs) - 1):
        (q0, q1), (k0, k1) = (qs[b], qs[b + 1]), (ks[b], ks[b + 1])
        if q1 < q0 or k1 < k0 or q1 > total_q or k1 > k.shape[0]:
            raise ValueError(
                f"cu_seqlens: expected non-decreasing offsets within q ({total_q} tokens) and "
                f"k ({k.shape[0]} tokens), got sequence {b}: q[{q0}:{q1}], k[{k0}:{k1}]"
            )
        if q1 - q0 > max_seqlen_q:
            raise ValueError(
                f"max_seqlen_q: expected at least the longest query sequence, got "
                f"{max_seqlen_q} but sequence {b} has {q1 - q0} queries"
            )
        gates = [None if t is None else t[None, k0:k1] for t in (key_bias, value_scale)]
        o, l = anchored_attention_torch(
            q[None, q0:q1].transpose(1, 2), k[None, k0:k1].transpose(1, 2),
            v[None, k0:k1].transpose(1, 2), *gates,
            causal=causal, sm_scale=sm_scale, key_padding_mask=None,
        )  # fmt: skip
        out[q0:q1] = o[0].transpose(0, 1)
        lse[:, q0:q1] = l[0]
    return out, lse


def anchored_attention_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int | None = None,
    key_bias: torch.Tensor | None = None,
    value_scale: torch.Tensor | None = None,
    *,
    causal: bool = True,
    sm_scale: float | None = None,
    backend: str = "auto",
    return_lse: bool = False,
    value_scale_range: tuple[float, float] | None = None,
    gates: PreparedGates | None = None,
):
    """Anchored attention over packed variable-length sequences (flash-attention's varlen
    layout): no padding tokens are stored or computed. Differentiable like
    :func:`anchored_attention`.

    Args:
        q: (total_q, Hq, D); k, v: (total_k, Hkv, D); any strides.
        cu_seqlens_q, cu_seqlens_k: (batch + 1,) int32 offsets; sequence b is
            ``q[cu_seqlens_q[b]:cu_seqlens_q[b + 1]]`` and likewise for k, v. They must
            start at 0, never decrease and end at total_q (total_k): a ValueError on the
            host, a device-side assertion (no sync) for CUDA tensors.
        max_seqlen_q: the longest query sequence (sizes the launch grid without a device
            sync). It must be at least the longest (checked like the offsets).
        max_seqlen_k: the longest key sequence, or None. A hint only: with
            ``max_seqlen_q <= 64`` and long keys (decode against packed caches: this hint,
            or without it the mean key length, at least 256) the Triton backend takes the
            split-KV path, and this sizes its number of splits; each sequence still splits
            its own keys, so a wrong value costs speed, not correctness (a hint under 256
            keeps the prefill kernel).
        key_bias, value_scale: (total_k,) per-key gates, or None.
        causal: bottom-right aligned per sequence (see :func:`anchored_attention`).
        value_scale_range: as in :func:`anchored_attention` (the fast form).
        gates: the gates prepared once (:func:`prepare_gates` of (total_k,) tensors), in
            place of ``key_bias``, ``value_scale`` and ``value_scale_range``.

    Returns:
        ``out`` (total_q, Hq, D), or ``(out, lse)`` with lse (Hq, total_q) float32 when
        ``return_lse``.
    """
    _check_options(causal, return_lse, sm_scale)
    causal, return_lse = bool(causal), bool(return_lse)
    if isinstance(max_seqlen_q, numbers.Integral) and not isinstance(max_seqlen_q, bool):
        max_seqlen_q = int(max_seqlen_q)  # a NumPy int, as a Python int for the launch grid
    if isinstance(max_seqlen_k, numbers.Integral) and not isinstance(max_seqlen_k, bool):
        max_seqlen_k = int(max_seqlen_k)
    if gates is not None:
        _check_tensor("k", k, 3)
        _check_prepared(gates, key_bias, value_scale, value_scale_range, None, k.shape[0],
                        packed=True)  # fmt: skip
        key_bias, value_scale = gates.key_bias, gates.value_scale
        value_scale_range = gates.value_scale_range
        fold = gates.fold
    _validate_varlen(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, key_bias, value_scale,
        backend,
    )  # fmt: skip
    fast = value_scale is not None and fast_form(value_scale_range)
    scale = 1.0 / math.sqrt(q.shape[-1]) if sm_scale is None else float(sm_scale)
    use_triton = _pick_backend(q, backend) == "triton"
    if use_triton and _eager_inference(q, k, v, key_bias, value_scale):
        shift = prepared_fold = None
        if gates is not None:  # the prepared form
            prepared_fold = fold
            if gates.shift is not None:
                key_bias, shift = gates.bias_log2, gates.shift
        out, lse = _forward_varlen(
            q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
            -1 if max_seqlen_k is None else max_seqlen_k, key_bias, value_scale,
            causal, scale, return_lse, fast, shift, prepared_fold, value_scale_range,
        )  # fmt: skip
    elif use_triton:
        want_lse = return_lse or _needs_grad(q, k, v, key_bias, value_scale)
        out, lse = _anchored_attention_varlen_fwd(
            q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
            -1 if max_seqlen_k is None else max_seqlen_k, key_bias, value_scale,
            causal, scale, want_lse, fast,
        )  # fmt: skip
    else:
        out, lse = _varlen_torch(
            q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, key_bias, value_scale, causal,
            scale,
        )  # fmt: skip
    return (out, lse) if return_lse else out
