"""The SSC options in one place: each option's name, default, check and meaning.

Every entry point that takes SSC options derives from :class:`SSCOptions`: the defaults of
:func:`~videoanchor.anchor.compute_anchor_scores` and its siblings (:data:`DEFAULTS`), the
up-front check of every option (:meth:`SSCOptions.checked`), the options that change the
coefficient matrix or the scores (:func:`names_affecting`, the score caches' keys), and,
in the integrations, ``AnchorConfig``'s SSC fields and the command lines' defaults.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

import torch

from videoanchor.anchor._inputs import (
    check_choice,
    check_int,
    check_number,
    check_option_range,
    check_progress,
    resolve_dtype,
    resolve_seed,
)

__all__ = ["DEFAULTS", "EIGEN_SOLVERS", "SSCOptions", "names_affecting"]

SSC_BACKENDS = ("auto", "torch", "cupy")
SSC_SOLVERS = ("auto", "fast", "faithful", "accelerated")
SSC_MODES = ("auto", "exact", "blocked")
EIGEN_SOLVERS = {  # per mode: what the spectral step of that mode can run
    "exact": ("auto", "eigh", "krylov"),
    "auto": ("auto",),
    "blocked": ("auto", "subspace"),
}
#: the most label draws an SSC call accepts (checked before the SSC, not at the allocation)
MAX_LABEL_DRAWS = 10_000
#: what ``mode="scalable"`` and ``candidates=`` became (they were removed; issue 33)
REMOVED_SCALABLE = (
    "the scalable approximation was removed (issue 33; its scores agreed only loosely with the "
    "exact ones); try the defaults (mode='auto', solver='auto': the fast solver, a fixed "
    "60-iteration approximation of the authors' answer) or mode='blocked' for exact SSC on "
    "long videos (no N x N buffer)"
)


def _label_draws(name, value):
    draws = check_int(name, value, 1)
    if draws > MAX_LABEL_DRAWS:
        raise ValueError(
            f"{name}: expected an int in [1, {MAX_LABEL_DRAWS}], got {value}; each draw runs one "
            f"more spectral label assignment after the SSC and keeps an (N,) int64 row of "
            f"labels in memory (try label_draws=16)"
        )
    return draws


def _dtype(name, value):
    if value is not None and not isinstance(value, (str, torch.dtype)):
        raise TypeError(
            f"{name}: expected None, torch.float32 or torch.float64, got {type(value).__name__}"
        )
    return resolve_dtype(value, torch.device("cpu"))


def _mode(name, value):
    if isinstance(value, str) and value == "scalable":
        raise ValueError(f"mode: expected one of {SSC_MODES}, got 'scalable': {REMOVED_SCALABLE}")
    return check_choice(name, value, SSC_MODES)


def _block_columns(name, value):
    return None if value is None else check_int(name, value, 1)


def _choice(choices):
    return lambda name, value: check_choice(name, value, choices)


def _positive(hint):
    return lambda name, value: check_number(name, value, positive=True, hint=hint)


def _option(default, doc: str, check, affects: str = ""):
    """One option: ``affects`` is "coef" (it changes SSC's C), "labels" (the clustering) or
    "" (neither: how the work is done or reported)."""
    return field(default=default, metadata={"doc": doc, "check": check, "affects": affects})


@dataclass(frozen=True)
class SSCOptions:
    """The options of one SSC run (docs/method.md section 2), with the paper's defaults.

    Build one from keyword arguments (unknown names are a TypeError) and call
    :meth:`checked` for the normalised, validated copy. ``doc(name)`` is an option's meaning.
    """

    n_clusters: int = _option(
        24, "spectral clusters (the paper's 24)", lambda n, v: check_int(n, v, 1), "labels"
    )
    alpha_e: float = _option(
        800.0,
        "outlier weight, lambda_e = alpha_e / mu_e (the authors' 800)",
        _positive("the authors' 800"),
        "coef",
    )
    alpha_z: float = _option(
        800.0,
        "data weight, lambda_z = alpha_z / mu_z (the authors' 800)",
        _positive("the authors' 800"),
        "coef",
    )
    rho: float = _option(
        300.0, "ADMM penalty (the authors' 300)", _positive("the authors' 300"), "coef"
    )
    eps: float = _option(
        2e-4,
        "stopping tolerance max_i sum_j |A - C|_ij < eps (0: run max_iter iterations)",
        lambda n, v: check_number(n, v, positive=False, hint="2e-4 (0: run max_iter iterations)"),
        "coef",
    )
    max_iter: int = _option(
        10000,
        "ADMM iteration limit (the authors' 10000)",
        lambda n, v: check_int(n, v, 1, hint="max_iter=10000"),
        "coef",
    )
    pca_rank: int = _option(
        0,
        "PCA to this rank before SSC (0: none, the paper)",
        lambda n, v: check_int(n, v, 0, hint="0 (no PCA)"),
        "coef",
    )
    backend: str = _option(
        "auto",
        "array library of the dense solver: 'auto' (torch), 'torch', 'cupy'",
        _choice(SSC_BACKENDS),
        "coef",
    )
    solver: str = _option(
        "auto",
        "'fast' (the default through 'auto': 60 iterations on a fixed schedule), 'faithful' "
        "(the authors' iteration and stopping rule) or 'accelerated'",
        _choice(SSC_SOLVERS),
        "coef",
    )
    dtype: torch.dtype | None = _option(
        None,
        "working dtype of the ADMM: None (float32), torch.float32 or torch.float64",
        _dtype,
        "coef",
    )
    seed: int | None = _option(
        0,
        "seed of the spectral clustering (None: drawn from NumPy)",
        lambda n, v: resolve_seed(v),
        "labels",
    )
    label_draws: int = _option(
        1,
        "label draws averaged into each token's cluster share (the paper: 1)",
        _label_draws,
        "labels",
    )
    eigen_solver: str = _option(
        "auto",
        "eigen-solver of the spectral step: 'auto', 'eigh', "
        "'krylov' (exact mode), 'subspace' (blocked mode)",
        _choice(("auto", "eigh", "krylov", "subspace")),
    )
    mode: str = _option(
        "auto",
        "'exact' (dense N x N), 'blocked' (the same program, column "
        "blocks) or 'auto' (exact when it fits, blocked above)",
        _mode,
    )
    block_columns: int | None = _option(
        None, "columns of C per block (blocked mode; None: sized to the device)", _block_columns
    )
    block_eps: str = _option(
        "own", "blocked mode's stopping rule per block: 'own' or 'share'", _choice(("own", "share"))
    )
    progress: object = _option(
        None,
        "progress bar / log lines: True, False, None or 'auto', or an SSCProgress",
        lambda n, v: check_progress(v),
    )

    @classmethod
    def of(cls, arguments: dict, **overrides) -> SSCOptions:
        """The options among ``arguments`` (a function's ``locals()``: other names are
        ignored) and ``overrides``; the ones neither names keep their defaults."""
        given = {f.name: arguments[f.name] for f in fields(cls) if f.name in arguments}
        return cls(**{**given, **overrides})

    @staticmethod
    def doc(name: str) -> str:
        """The one-line meaning of option ``name``."""
        return _FIELDS[name].metadata["doc"]

    def as_dict(self, *, without: tuple[str, ...] = ()) -> dict:
        """``{name: value}`` of every option but those in ``without``."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in without}

    def program(self) -> dict:
        """The keyword arguments of the ADMM solvers (:func:`~videoanchor.anchor.solve_ssc_admm`,
        :func:`~videoanchor.anchor.solve_ssc_blocked`) that these options set."""
        return {name: getattr(self, name) for name in _PROGRAM}

    def checked(self, *, distributed: bool = False) -> SSCOptions:
        """Every option checked before any work, returned normalised (NumPy ints as ints,
        ``seed=None`` drawn, ``dtype`` resolved). ``distributed``: the call has a
        ``process_group``. Raises TypeError / ValueError "name: expected X, got Y"; an
        option the chosen ``mode`` would ignore is a ValueError."""
        values = {f.name: f.metadata["check"](f.name, getattr(self, f.name)) for f in fields(self)}
        out = replace(self, **values)
        mode, solver, backend = out.mode, out.solver, out.backend
        if out.eigen_solver not in EIGEN_SOLVERS[mode]:
            raise ValueError(
                f"mode={mode!r}: expected eigen_solver in {EIGEN_SOLVERS[mode]}, got "
                f"{out.eigen_solver!r}; try eigen_solver='auto'"
            )
        check_option_range(values, out.dtype)
        if distributed and mode not in ("auto", "blocked"):
            raise ValueError(
                f"process_group: only the blocked exact solver is spread over processes; "
                f"expected mode='auto' or 'blocked', got mode={mode!r}"
            )
        if distributed and solver in ("accelerated", "fast"):
            raise ValueError(
                "process_group: the blocked exact solver that runs over processes runs the "
                f"authors' iteration only; expected solver 'auto' or 'faithful', got "
                f"solver={solver!r}"
            )
        if mode == "blocked":
            if backend == "cupy":
                raise ValueError("mode='blocked': expected backend 'auto' or 'torch', got 'cupy'")
            if solver in ("accelerated", "fast"):
                raise ValueError(
                    "mode='blocked' runs the authors' iteration only; expected solver 'auto' "
                    f"or 'faithful', got {solver!r}"
                )
        for name, unset in (("block_columns", None), ("block_eps", "own")):
            if getattr(out, name) != unset and mode not in ("blocked", "auto"):
                raise ValueError(
                    f"{name}: applies to mode='blocked' (or 'auto') only, got mode={mode!r}"
                )
        return out


_PROGRAM = ("alpha_e", "alpha_z", "rho", "eps", "max_iter", "dtype", "progress")
_FIELDS = {f.name: f for f in fields(SSCOptions)}
#: the defaults of every SSC entry point (``compute_anchor_scores``'s keyword defaults)
DEFAULTS = SSCOptions()


def names_affecting(what: str) -> tuple[str, ...]:
    """The options, in declaration order, that change ``what``: "coef" (SSC's C) or "labels"
    (the clustering, given C)."""
    if what not in ("coef", "labels"):
        raise ValueError(f"what: expected 'coef' or 'labels', got {what!r}")
    return tuple(f.name for f in fields(SSCOptions) if f.metadata["affects"] == what)
