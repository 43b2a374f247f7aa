"""Engine-neutral options of VideoAnchor: the :class:`AnchorConfig` that ``configure()``
(transformers) and the vLLM plugin both use, its validation, and the SSC call options.

Every engine subpackage imports these instead of keeping its own copy, so an option means the
same thing (name, default, accepted values, error message) whichever engine runs the model.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, fields, replace

import torch

__all__ = [
    "AnchorConfig",
    "clusters_for",
    "ssc_kwargs",
    "validate_options",
    "validate_ssc_options",
]

_DECODE_MODES = ("prefill", "all")
_KINDS = ("video", "image")
_ATTN_BACKENDS = ("auto", "triton", "torch")
_GATE_MAX = float(torch.finfo(torch.float32).max)  # the gates are formed in float32


def _plain(value):
    """A NumPy number as the Python int or float it stands for (so the stored options
    compare, print and serialise like the user's ints and floats); anything else as is."""
    if isinstance(value, bool) or type(value) in (int, float):
        return value
    if not isinstance(value, numbers.Real):  # NumPy bools are not numbers.Real either
        return value
    return int(value) if isinstance(value, numbers.Integral) else float(value)


@dataclass(frozen=True)
class AnchorConfig:
    """Options of one configured model (see :func:`videoanchor.configure`)."""

    enabled: bool = True
    alpha_q: float = 4.0
    alpha_k: float = 9.5
    alpha_v: float = 2.5
    n_clusters: int = 24
    decode: str = "prefill"
    tokens: tuple[str, ...] = _KINDS
    alpha_e: float = 800.0
    alpha_z: float = 800.0
    rho: float = 300.0
    eps: float = 2e-4
    max_iter: int = 10000
    pca_rank: int = 0
    seed: int = 0
    label_draws: int = 1
    ssc_backend: str = "auto"
    ssc_solver: str = "auto"
    ssc_dtype: torch.dtype | None = None
    attention_backend: str = "auto"
    process_group: object = "auto"
    ssc_progress: object = "auto"
    ssc_time_budget: float | None = None


def validate_options(cfg: AnchorConfig) -> AnchorConfig:
    """Checks every engine-neutral option of ``cfg`` (all but ``process_group``, which the
    transformers integration checks) and returns it normalised (tuple ``tokens``, float
    alphas, NumPy numbers as Python ints and floats). Raises TypeError/ValueError naming the
    option."""
    if not isinstance(cfg.enabled, bool):
        raise TypeError(f"enabled: expected a bool, got {cfg.enabled!r}")
    cfg = replace(cfg, **{f.name: _plain(getattr(cfg, f.name)) for f in fields(cfg)})
    for name in ("alpha_q", "alpha_k", "alpha_v"):
        a = getattr(cfg, name)
        if isinstance(a, bool) or not isinstance(a, numbers.Real) or not math.isfinite(a):
            raise ValueError(f"{name}: expected a finite number, got {a!r}")
        if a < -1.0:
            raise ValueError(
                f"{name}={a} makes the gate 1 + {name} * s non-positive for the highest-scored "
                f"tokens (scores lie in [0, 1)); expected {name} >= -1"
            )
        if abs(a) > _GATE_MAX:  # finite in float64, inf in the float32 gates
            from videoanchor.kernels.interface import gate_overflow_message

            raise ValueError(gate_overflow_message(name, a))
    if (
        isinstance(cfg.n_clusters, bool)
        or not isinstance(cfg.n_clusters, numbers.Integral)
        or cfg.n_clusters < 1
    ):
        raise ValueError(f"n_clusters: expected a positive int, got {cfg.n_clusters!r}")
    if (
        isinstance(cfg.label_draws, bool)
        or not isinstance(cfg.label_draws, numbers.Integral)
        or cfg.label_draws < 1
    ):
        raise ValueError(f"label_draws: expected a positive int, got {cfg.label_draws!r}")
    if cfg.decode not in _DECODE_MODES:
        raise ValueError(f"decode: expected one of {_DECODE_MODES}, got {cfg.decode!r}")
    tokens = (cfg.tokens,) if isinstance(cfg.tokens, str) else tuple(cfg.tokens)
    if not tokens or any(t not in _KINDS for t in tokens):
        raise ValueError(f"tokens: expected a non-empty subset of {_KINDS}, got {cfg.tokens!r}")
    if cfg.attention_backend not in _ATTN_BACKENDS:
        raise ValueError(
            f"attention_backend: expected one of {_ATTN_BACKENDS}, got {cfg.attention_backend!r}"
        )
    if not (isinstance(cfg.ssc_progress, bool) or (
        isinstance(cfg.ssc_progress, str) and cfg.ssc_progress == "auto"
    )):  # fmt: skip
        raise ValueError(f"ssc_progress: expected True, False or 'auto', got {cfg.ssc_progress!r}")
    from videoanchor.anchor.progress import SSCProgress

    try:
        SSCProgress(time_budget=cfg.ssc_time_budget)  # validates the budget
    except (TypeError, ValueError) as err:  # named as the user passed it
        raise type(err)(f"ssc_{err}" if str(err).startswith("time_budget") else str(err)) from None
    return replace(cfg, tokens=tokens, alpha_q=float(cfg.alpha_q), alpha_k=float(cfg.alpha_k),
                   alpha_v=float(cfg.alpha_v))  # fmt: skip


def validate_ssc_options(cfg: AnchorConfig) -> None:
    """The SSC options, checked at configure() time by the same function
    compute_anchor_scores uses (so a bad ssc_dtype or ssc_backend fails here, not at
    generate)."""
    from videoanchor.anchor._inputs import check_ssc_options

    check_ssc_options(
        n_clusters=cfg.n_clusters, alpha_e=cfg.alpha_e, alpha_z=cfg.alpha_z, rho=cfg.rho,
        eps=cfg.eps, max_iter=cfg.max_iter, pca_rank=cfg.pca_rank,
        seed=0 if cfg.seed is None else cfg.seed, label_draws=cfg.label_draws,
        backend=cfg.ssc_backend, solver=cfg.ssc_solver, eigen_solver="auto", dtype=cfg.ssc_dtype,
        progress=False, mode="auto",
    )  # fmt: skip


def ssc_kwargs(cfg: AnchorConfig) -> dict:
    """The keyword arguments of :func:`videoanchor.anchor.compute_anchor_scores` that ``cfg``
    sets (everything but the features and the cluster count)."""
    return dict(
        alpha_e=cfg.alpha_e,
        alpha_z=cfg.alpha_z,
        rho=cfg.rho,
        eps=cfg.eps,
        max_iter=cfg.max_iter,
        pca_rank=cfg.pca_rank,
        seed=cfg.seed,
        label_draws=cfg.label_draws,
        backend=cfg.ssc_backend,
        solver=cfg.ssc_solver,
        dtype=cfg.ssc_dtype,
    )


def clusters_for(n_tokens: int, cfg: AnchorConfig) -> int:
    """The cluster count SSC uses for ``n_tokens`` visual tokens: ``n_clusters``, lowered to
    the token count for tiny prompts (callers warn when it is lowered)."""
    return min(cfg.n_clusters, n_tokens)
