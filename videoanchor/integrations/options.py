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

from videoanchor.anchor.options import DEFAULTS as SSC
from videoanchor.anchor.options import SSCOptions

__all__ = [
    "AnchorConfig",
    "SSC_CONFIG_NAMES",
    "clusters_for",
    "fast_splits",
    "ssc_plan",
    "ssc_kwargs",
    "ssc_options",
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
    """Options of one configured model (see :func:`videoanchor.configure`).

    The SSC options (:data:`SSC_CONFIG_NAMES`) are
    :class:`~videoanchor.anchor.options.SSCOptions`' (defaults, checks, meaning), five of
    them under an ``ssc_`` name here: ``ssc_backend``, ``ssc_solver``, ``ssc_dtype``,
    ``ssc_precision``, ``ssc_mode`` (``mode``: ``"auto"``, ``"exact"`` or ``"blocked"``;
    :func:`~videoanchor.anchor.plan.make_plan` picks what ``"auto"`` runs).
    """

    enabled: bool = True
    alpha_q: float = 4.0
    alpha_k: float = 9.5
    alpha_v: float = 2.5
    n_clusters: int = SSC.n_clusters
    decode: str = "prefill"
    tokens: tuple[str, ...] = _KINDS
    alpha_e: float = SSC.alpha_e
    alpha_z: float = SSC.alpha_z
    rho: float = SSC.rho
    eps: float = SSC.eps
    max_iter: int = SSC.max_iter
    pca_rank: int = SSC.pca_rank
    seed: int = SSC.seed
    label_draws: int = SSC.label_draws
    cluster_share: str = SSC.cluster_share
    dark_tokens: str = SSC.dark_tokens
    ssc_backend: str = SSC.backend
    ssc_solver: str = SSC.solver
    ssc_dtype: torch.dtype | None = SSC.dtype
    ssc_precision: str = SSC.precision
    ssc_mode: str = SSC.mode
    attention_backend: str = "auto"
    process_group: object = "auto"
    ssc_progress: object = "auto"
    ssc_time_budget: float | None = None


_SSC_PREFIXED = ("backend", "solver", "dtype", "precision", "mode")  # ssc_backend, ...
_SSC_UNSET = ("eigen_solver", "block_columns", "block_eps", "progress")
#: ``{AnchorConfig field: SSCOptions option}`` of the SSC options a configured model sets
#: (the others keep their defaults, but ``progress``, which ``ssc_progress`` and
#: ``ssc_time_budget`` make).
SSC_CONFIG_NAMES = {
    ("ssc_" if f.name in _SSC_PREFIXED else "") + f.name: f.name
    for f in fields(SSCOptions)
    if f.name not in _SSC_UNSET
}


def validate_options(cfg: AnchorConfig) -> AnchorConfig:
    """Checks every engine-neutral option of ``cfg`` but the SSC options
    (:func:`validate_ssc_options`) and ``process_group`` (the transformers integration checks
    it), and returns it normalised (tuple ``tokens``, float
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
            from videoanchor.kernels.gates import gate_overflow_message

            raise ValueError(gate_overflow_message(name, a))
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


def ssc_options(cfg: AnchorConfig) -> SSCOptions:
    """The :class:`~videoanchor.anchor.options.SSCOptions` that ``cfg`` sets (unchecked)."""
    return SSCOptions(**{opt: getattr(cfg, name) for name, opt in SSC_CONFIG_NAMES.items()})


def validate_ssc_options(cfg: AnchorConfig) -> None:
    """The SSC options, checked at configure() time by the check compute_anchor_scores
    uses (:meth:`SSCOptions.checked`, so a bad ssc_dtype or ssc_backend fails here, not at
    generate). ``seed=None`` is checked without drawing a seed. An error about one option
    names it as the user passed it (``ssc_mode: expected one of ..., got ...``)."""
    opts = ssc_options(cfg)
    try:
        replace(opts, seed=0 if opts.seed is None else opts.seed, progress=False).checked()
    except (TypeError, ValueError) as err:
        if str(err).partition(":")[0] not in _SSC_PREFIXED:
            raise
        raise type(err)(f"ssc_{err}") from None


def ssc_kwargs(cfg: AnchorConfig) -> dict:
    """The keyword arguments of :func:`videoanchor.anchor.compute_anchor_scores` that ``cfg``
    sets (everything but the features and the cluster count)."""
    return ssc_options(cfg).as_dict(without=("n_clusters", *_SSC_UNSET))


def fast_splits(cfg: AnchorConfig) -> bool:
    """Whether ``cfg``'s SSC splits its columns over a process group in exact mode: the fast
    solver on torch (``ssc_solver`` "auto" or "fast", ``ssc_backend`` not "cupy", ``ssc_mode``
    not "blocked", which runs the authors' iteration); the faithful solver and CuPy run on
    one process (:func:`videoanchor.anchor.options.check_distributed`)."""
    return (cfg.ssc_solver in ("auto", "fast") and cfg.ssc_backend != "cupy"
            and cfg.ssc_mode != "blocked")  # fmt: skip


def clusters_for(n_tokens: int, cfg: AnchorConfig) -> int:
    """The cluster count SSC uses for ``n_tokens`` visual tokens: ``n_clusters``, lowered to
    the token count for tiny prompts (callers warn when it is lowered)."""
    return min(cfg.n_clusters, n_tokens)


def ssc_plan(cfg: AnchorConfig, n: int, d: int, device, progress=None):
    """The :class:`~videoanchor.anchor.plan.Plan` that
    :func:`videoanchor.anchor.compute_anchor_scores` makes for ``n`` visual tokens of ``d``
    features on ``device`` with ``cfg``'s options (``ssc_mode`` too) and the ``progress``
    reporter an engine passes (its time budget counts; None: ``cfg``'s ``ssc_time_budget``),
    on one process: the same plan, from the same function, as the call itself. Raises
    :class:`~videoanchor.anchor.plan.SSCMemoryError` where nothing fits."""
    from videoanchor.anchor.plan import make_plan
    from videoanchor.anchor.progress import SSCProgress

    if progress is None:
        progress = SSCProgress(enabled=False, time_budget=cfg.ssc_time_budget)
    opts = replace(ssc_options(cfg), seed=0, progress=progress).checked()
    return make_plan((n, min(d, cfg.pca_rank) if cfg.pca_rank else d), device, opts)
