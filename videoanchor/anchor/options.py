"""The SSC options in one place: each option's name, default, check and meaning.

Every entry point that takes SSC options derives from :class:`SSCOptions`: the defaults
(:data:`DEFAULTS`), the up-front check (:meth:`SSCOptions.checked`), the options that change
``C`` or the scores (:func:`names_affecting`, the score caches' keys), and, in the
integrations, ``AnchorConfig``'s SSC fields and the command lines' defaults.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass, fields, replace

import torch

from videoanchor.anchor._inputs import (
    DARK_RULES,
    check_blocked,
    check_choice,
    check_dtype,
    check_int,
    check_number,
    check_option_range,
    check_progress,
    resolve_seed,
)
from videoanchor.anchor.products import PRECISIONS, check_precision

__all__ = ["CHECKS", "DEFAULTS", "EIGEN_SOLVERS", "SSCOptions", "names_affecting", "takes_options"]

SSC_BACKENDS = ("auto", "torch", "cupy")
SSC_SOLVERS = ("auto", "fast", "faithful", "workset")
SSC_MODES = ("auto", "exact", "blocked")
EIGEN_SOLVERS = {  # per mode: what the spectral step of that mode can run
    "exact": ("auto", "eigh", "krylov", "chebyshev"),
    "auto": ("auto",),
    "blocked": ("auto", "arpack", "subspace", "chebyshev"),
}
#: the most label draws an SSC call accepts (checked before the SSC, not at the allocation)
MAX_LABEL_DRAWS = 10_000
#: what ``mode="scalable"`` and ``candidates=`` became (they were removed; issue 33)
REMOVED_SCALABLE = (
    "the scalable approximation was removed (issue 33; its scores agreed only loosely with the "
    "exact ones); try the defaults (mode='auto', solver='auto': the program's minimiser by "
    "working sets on the CPU, the fast solver's 60-iteration approximation on CUDA) or "
    "mode='blocked' for exact SSC on long videos (no N x N buffer)"
)
#: what ``solver="accelerated"`` became (removed; issue 52)
REMOVED_ACCELERATED = (
    "solver='accelerated' was removed (issue 52): the program's minimiser it ran towards is "
    "videoanchor.anchor.reference_minimiser (float64, certified by a duality gap); the "
    "authors' answer is solver='faithful', the default approximation solver='auto'"
)


#: :attr:`SSCOptions.cluster_share`'s choices
CLUSTER_SHARES = ("hard", "soft", "stable")


def _label_draws(name, value):
    draws = check_int(name, value, 1)
    if draws > MAX_LABEL_DRAWS:
        raise ValueError(
            f"{name}: expected an int in [1, {MAX_LABEL_DRAWS}], got {value}; each draw runs one "
            f"more spectral label assignment after the SSC and keeps an (N,) int64 row of "
            f"labels in memory (try label_draws=16)"
        )
    return draws


def _choice(choices, removed: dict[str, str] | None = None):
    """The check of an option with ``choices``; a value in ``removed`` (a former choice) is a
    ValueError that says what became of it."""

    def check(name, value):
        if isinstance(value, str) and value in (removed or {}):
            raise ValueError(f"{name}: expected one of {choices}, got {value!r}: {removed[value]}")
        return check_choice(name, value, choices)

    return check


def _positive(hint):
    return lambda name, value: check_number(name, value, positive=True, hint=hint)


@dataclass(frozen=True)
class SSCOptions:
    """The options of one SSC run (docs/method.md section 2), with the paper's defaults.

    Build one from keyword arguments (an unknown name is a TypeError) and call
    :meth:`checked` for the validated, normalised copy. Each option's check, and whether it
    changes SSC's ``C`` or the labels, is in the table :data:`CHECKS` beside it.
    """

    n_clusters: int = 24
    """Spectral clusters (the paper's 24)."""
    alpha_e: float = 800.0
    """Outlier weight: ``lambda_e = alpha_e / mu_e`` (the authors' 800)."""
    alpha_z: float = 800.0
    """Data weight: ``lambda_z = alpha_z / mu_z`` (the authors' 800)."""
    rho: float = 300.0
    """ADMM penalty (the authors' 300)."""
    eps: float = 2e-4
    """Stopping tolerance of ``max_i sum_j |A - C|_ij`` (0: run ``max_iter`` iterations)."""
    max_iter: int = 10000
    """ADMM iteration limit (the authors' 10000)."""
    pca_rank: int = 0
    """PCA to this rank before SSC (0: none, the paper)."""
    backend: str = "auto"
    """Array library of the dense solver: ``"auto"`` (torch), ``"torch"``, ``"cupy"``."""
    solver: str = "auto"
    """``"workset"`` (the program's certified minimiser by working sets, exact mode, on the
    CPU or the features' CUDA device; the fast solver where ``C`` is dense), ``"fast"`` (the
    authors' steps on a fixed 60-iteration schedule), ``"faithful"`` (the authors' iteration
    and stopping rule) or ``"auto"``: ``"workset"`` on the CPU and CUDA, ``"fast"`` elsewhere
    or where an option only an iteration honours is set (``rho``, ``max_iter``,
    ``precision``, a reporter's time budget: :func:`~videoanchor.anchor.plan.auto_solver`;
    how a run is reported never changes what runs). An ``eps`` the solver that runs would
    ignore (``"fast"``, ``"workset"``) is a ValueError."""
    dtype: torch.dtype | None = None
    """Working dtype of the solvers and of ``C``: None (float32; float64 for float64
    features), ``torch.float32`` or ``torch.float64``."""
    precision: str = "auto"
    """Precision of the fast solver's dense products: ``"full"`` (the working dtype),
    ``"fp16x3"`` (float16 tensor cores at about float32 accuracy; float32, torch, fast solver
    only: :mod:`videoanchor.anchor.products`) or ``"auto"`` (``"fp16x3"`` where it runs
    natively, on CUDA, and the rest allows it; else ``"full"``)."""
    seed: int | None = 0
    """Seed of the spectral clustering (None: drawn from NumPy's global generator)."""
    label_draws: int = 1
    """Label draws averaged into each token's cluster share (the paper: 1)."""
    cluster_share: str = "hard"
    """Each token's cluster share ``pi_j``: ``"hard"`` (the paper's: its cluster's share of
    the tokens under the spectral labels, averaged over ``label_draws``), ``"soft"`` (beyond
    the paper: :func:`~videoanchor.anchor.clustering.soft_cluster_shares`, a continuous
    function of ``C`` that no label flip moves, NOT the paper's share) or ``"stable"``
    (beyond the paper: :func:`~videoanchor.anchor.clustering.stable_cluster_shares`, the
    paper's share where its labels survive a small move of the embedding, the soft one where
    they do not, blended between); exact mode."""
    eigen_solver: str = "auto"
    """Eigen-solver of the spectral step: ``"auto"``, ``"eigh"``, ``"krylov"`` or
    ``"chebyshev"`` (exact mode), ``"arpack"``, ``"subspace"`` or ``"chebyshev"`` (blocked
    mode's sparse affinity)."""
    mode: str = "auto"
    """``"exact"`` (dense ``N x N``), ``"blocked"`` (the same program by column blocks) or
    ``"auto"`` (exact when it fits, blocked above)."""
    block_columns: int | None = None
    """Columns of ``C`` per block in blocked mode (None: sized to the device)."""
    block_eps: str = "own"
    """Blocked mode's stopping rule per block: ``"own"`` or ``"share"``."""
    progress: object = None
    """Progress bar or log lines: True, False, None, ``"auto"`` or an ``SSCProgress``."""
    dark_tokens: str = "authors"
    """``mu_z`` where some tokens are dark (their largest ``|y_i^T y_j|`` 100x or more below
    the median token's: near-black or constant tokens): ``"authors"`` (their definition,
    the minimum over every token) or ``"ignore"`` (the minimum over the other tokens, so
    that a few dark tokens do not raise ``lambda_z`` for all: docs/ssc.md, issue 79)."""

    @classmethod
    def of(cls, arguments: dict, **overrides) -> SSCOptions:
        """The options among ``arguments`` (a function's ``locals()``: other names are
        ignored) and ``overrides``; the ones neither names keep their defaults."""
        given = {f.name: arguments[f.name] for f in fields(cls) if f.name in arguments}
        return cls(**{**given, **overrides})

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
        values = {f.name: CHECKS[f.name][0](f.name, getattr(self, f.name)) for f in fields(self)}
        out = replace(self, **values)
        mode, solver, backend = out.mode, out.solver, out.backend
        if out.eigen_solver not in EIGEN_SOLVERS[mode]:
            raise ValueError(
                f"mode={mode!r}: expected eigen_solver in {EIGEN_SOLVERS[mode]}, got "
                f"{out.eigen_solver!r}; try eigen_solver='auto'"
            )
        check_option_range(values, out.dtype)
        if distributed:
            check_distributed(mode, solver, backend)
        if solver == "workset" and (mode == "blocked" or backend == "cupy"):
            raise ValueError(
                "solver='workset' runs in exact mode on torch's features; expected mode "
                f"'exact' or 'auto' and backend 'auto' or 'torch', got mode={mode!r}, "
                f"backend={backend!r}"
            )
        if mode == "blocked":
            check_blocked(solver, backend)
            if out.cluster_share != "hard":
                raise ValueError(
                    f"cluster_share={out.cluster_share!r} reads a dense affinity's spectrum; "
                    "expected mode 'exact' or 'auto' (where the dense problem fits), got "
                    "mode='blocked'"
                )
        check_precision(out.precision, fast=solver in ("auto", "fast"), work=out.dtype,
                        solver=solver, blocked=mode == "blocked", backend=backend)  # fmt: skip
        for name, unset in (("block_columns", None), ("block_eps", "own")):
            if getattr(out, name) != unset and mode not in ("blocked", "auto"):
                raise ValueError(
                    f"{name}: applies to mode='blocked' (or 'auto') only, got mode={mode!r}"
                )
        return out


def check_distributed(mode: str, solver: str, backend: str) -> None:
    """Refuse what cannot run over a process group: only the fast solver split by columns
    (exact mode) and the authors' iteration column-blocked (blocked mode)."""
    if mode == "exact" and solver == "faithful":
        raise ValueError(
            "process_group: mode='exact' splits the fast solver's columns over the ranks; the "
            "authors' iteration runs over processes column-blocked: expected solver 'auto' or "
            "'fast' with mode='exact', or mode 'blocked' or 'auto' with solver='faithful'"
        )
    if backend == "cupy":
        raise ValueError(
            "process_group: the solvers that run over processes are torch's; expected backend "
            "'auto' or 'torch', got 'cupy'"
        )


_PROGRAM = ("alpha_e", "alpha_z", "rho", "eps", "max_iter", "dtype", "progress")
_D = SSCOptions  # its class attributes are the defaults

#: ``{option: (check, what it changes)}``: ``check(name, value)`` returns the value
#: normalised or raises TypeError / ValueError; "coef" options change SSC's C, "labels" ones
#: the clustering given C, "" ones neither (how the work is done or reported).
CHECKS = {
    "n_clusters": (lambda n, v: check_int(n, v, 1), "labels"),
    "alpha_e": (_positive(f"the authors' {_D.alpha_e:g}"), "coef"),
    "alpha_z": (_positive(f"the authors' {_D.alpha_z:g}"), "coef"),
    "rho": (_positive(f"the authors' {_D.rho:g}"), "coef"),
    "eps": (
        lambda n, v: check_number(
            n, v, positive=False, hint=f"{_D.eps:g} (0: run max_iter iterations)"
        ),
        "coef",
    ),
    "max_iter": (lambda n, v: check_int(n, v, 1, hint=f"max_iter={_D.max_iter}"), "coef"),
    "pca_rank": (lambda n, v: check_int(n, v, 0, hint=f"{_D.pca_rank} (no PCA)"), "coef"),
    "backend": (_choice(SSC_BACKENDS), "coef"),
    "solver": (_choice(SSC_SOLVERS, {"accelerated": REMOVED_ACCELERATED}), "coef"),
    "dtype": (check_dtype, "coef"),
    "precision": (_choice(PRECISIONS), "coef"),
    "seed": (lambda n, v: resolve_seed(v), "labels"),
    "label_draws": (_label_draws, "labels"),
    "cluster_share": (_choice(CLUSTER_SHARES), "labels"),
    "eigen_solver": (_choice(tuple(dict.fromkeys(sum(EIGEN_SOLVERS.values(), ())))), ""),
    "mode": (_choice(SSC_MODES, {"scalable": REMOVED_SCALABLE}), ""),
    "block_columns": (lambda n, v: None if v is None else check_int(n, v, 1), ""),
    "block_eps": (_choice(("own", "share")), ""),
    "progress": (lambda n, v: check_progress(v), ""),
    "dark_tokens": (_choice(DARK_RULES), "coef"),
}
if set(CHECKS) != {f.name for f in fields(SSCOptions)}:  # pragma: no cover - caught by any test
    raise ImportError("videoanchor.anchor.options: CHECKS and SSCOptions name different options")
#: the defaults of every SSC entry point (``compute_anchor_scores``'s keyword defaults)
DEFAULTS = SSCOptions()


def names_affecting(what: str) -> tuple[str, ...]:
    """The options, in declaration order, that change ``what``: "coef" (SSC's C) or "labels"
    (the clustering, given C)."""
    if what not in ("coef", "labels"):
        raise ValueError(f"what: expected 'coef' or 'labels', got {what!r}")
    return tuple(f.name for f in fields(SSCOptions) if CHECKS[f.name][1] == what)


def takes_options(*names: str, **defaults):
    """Decorator of an SSC entry point ``fn(features, *, ..., **options)`` that takes the
    :class:`~videoanchor.anchor.options.SSCOptions` ``names`` as keywords, with the home's
    defaults (or ``defaults``): written once, not in every signature. The signature shows
    them (``inspect.signature``, ``help``), ``fn`` gets each one in ``options`` and any
    other keyword is a TypeError that names what it got and what ``fn`` takes."""

    def decorate(fn):
        sig = inspect.signature(fn)
        own = [p for p in sig.parameters.values() if p.kind is not p.VAR_KEYWORD]
        kind = inspect.Parameter.KEYWORD_ONLY
        extra = [inspect.Parameter(n, kind, default=defaults.get(n, getattr(DEFAULTS, n)))
                 for n in names]  # fmt: skip
        full = sig.replace(parameters=own + extra)

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            try:
                bound = full.bind(*args, **kwargs)
            except TypeError as exc:
                takes = ", ".join(full.parameters)
                raise TypeError(f"{fn.__name__}: {exc}; expected {takes}") from None
            bound.apply_defaults()
            return fn(**bound.arguments)

        wrapper.__signature__ = full
        return wrapper

    return decorate
