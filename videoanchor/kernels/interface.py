"""The attention entry points: :func:`anchored_attention` and
:func:`anchored_attention_varlen`, their custom ops and the backend each call runs on. Their
inputs are checked in :mod:`.checks`; the gates they take are made in :mod:`.gates`."""

from __future__ import annotations

import contextlib
import math
import numbers
import os
import warnings

import torch

from videoanchor.kernels.checks import (
    check_attn_mask,
    check_options,
    check_tensor,
    validate,
    validate_varlen,
)
from videoanchor.kernels.gates import PreparedGates, check_prepared, fast_form
from videoanchor.kernels.launch import MIN_CAPABILITY, device_capability
from videoanchor.kernels.torch_attention import anchored_attention_torch

try:
    import triton  # noqa: F401

    from videoanchor.kernels import triton_backward, triton_decode, triton_prefill

    _TRITON_ERROR: Exception | None = None
except Exception as exc:  # triton missing or unusable on this platform
    triton_prefill = triton_decode = triton_backward = None
    _TRITON_ERROR = exc

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
    check_options(causal, return_lse, sm_scale)
    causal, return_lse = bool(causal), bool(return_lse)
    if gates is not None:
        check_tensor("q", q, 4)
        check_tensor("k", k, 4)
        check_prepared(gates, key_bias, value_scale, value_scale_range, q.shape[0], k.shape[2],
                        packed=False)  # fmt: skip
    validate(q, k, v, key_bias, value_scale, key_padding_mask, backend, cache_seqlens, gates)
    check_attn_mask(attn_mask, q, k)
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
    check_options(causal, return_lse, sm_scale)
    causal, return_lse = bool(causal), bool(return_lse)
    if isinstance(max_seqlen_q, numbers.Integral) and not isinstance(max_seqlen_q, bool):
        max_seqlen_q = int(max_seqlen_q)  # a NumPy int, as a Python int for the launch grid
    if isinstance(max_seqlen_k, numbers.Integral) and not isinstance(max_seqlen_k, bool):
        max_seqlen_k = int(max_seqlen_k)
    if gates is not None:
        check_tensor("k", k, 3)
        check_prepared(gates, key_bias, value_scale, value_scale_range, None, k.shape[0],
                        packed=True)  # fmt: skip
        key_bias, value_scale = gates.key_bias, gates.value_scale
        value_scale_range = gates.value_scale_range
        fold = gates.fold
    validate_varlen(
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
