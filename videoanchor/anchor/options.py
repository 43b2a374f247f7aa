"""The SSC options in one place: each option's name, default, check and meaning.

Every entry point that takes SSC options derives from :class:`SSCOptions`: the defaults
(:data:`DEFAULTS`), the up-front check (:meth:`SSCOptions.checked`), the options that change
``C`` or the scores (:func:`names_affecting`, the score caches' keys), and, in the
integrations, ``AnchorConfig``'s SSC fields and the command lines' defaults. Every option
check lives here: each option's own and those of options together
(:func:`check_distributed`, and the plan's rules of what runs together,
:func:`~videoanchor.anchor.plan.check_blocked` and
:func:`~videoanchor.anchor.plan.check_precision`, asked up front).
"""

from __future__ import annotations

import functools
import inspect
import math
import warnings
from dataclasses import dataclass, fields, replace

import numpy as np
import torch

from videoanchor.anchor.plan import PRECISIONS, check_blocked, check_precision

__all__ = [
    "CHECKS",
    "DEFAULTS",
    "EIGEN_SOLVERS",
    "SSCOptions",
    "names_affecting",
    "takes_options",
]

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
CLUSTER_SHARES = ("steady", "paper", "soft", "expected")
#: former names of :attr:`SSCOptions.cluster_share`'s choices: accepted with a
#: DeprecationWarning and normalised to the new name (issue 91)
RENAMED_SHARES = {
    "hard": "paper",  # the paper's share, named for what it is
    "stable": "steady",  # the 32-draw gate, superseded by the steady share's continuous one
}
#: ``mu_z``'s rules for dark tokens (the option ``dark_tokens``,
#: :func:`~videoanchor.anchor.program.ssc_lambdas`' ``dark``)
DARK_RULES = ("authors", "ignore")


# ---- checks of one option (the table CHECKS below uses them) -------------------------------


def _is_int(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, np.integer))


def _is_bool(value) -> bool:
    numpy_bool = type(value).__module__ == "numpy" and type(value).__name__ in ("bool", "bool_")
    return isinstance(value, bool) or numpy_bool


def check_int(name: str, value, minimum: int, hint: str = "") -> int:
    """``value`` as an int >= ``minimum``: TypeError for a non-int (a float, even a whole
    one, or inf), ValueError below the minimum."""
    if not _is_int(value):
        raise TypeError(
            f"{name}: expected an int >= {minimum}, got {value!r} ({type(value).__name__})"
            + (f"; try {hint}" if hint else "")
        )
    if value < minimum:
        raise ValueError(
            f"{name}: expected an int >= {minimum}, got {value}" + (f"; try {hint}" if hint else "")
        )
    return int(value)


def check_number(name: str, value, *, positive: bool, hint: str = "") -> float:
    """``value`` as a finite float, > 0 (``positive``) or >= 0: TypeError for a non-number,
    ValueError for NaN, inf or the wrong sign."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name}: expected a finite number, got {type(value).__name__}")
    v = float(value)
    ok = math.isfinite(v) and (v > 0 if positive else v >= 0)
    if not ok:
        want = "a positive finite number" if positive else "a finite number >= 0"
        raise ValueError(
            f"{name}: expected {want}, got {value!r}" + (f"; try {hint}" if hint else "")
        )
    return v


def check_option_range(opts: dict, work: torch.dtype) -> None:
    """``alpha_e``, ``alpha_z`` and ``rho`` within ``[sqrt(tiny), sqrt(max)]`` of the
    working dtype, where the A-step system neither overflows nor loses its ``rho`` term."""
    info = torch.finfo(work)
    lo, hi = math.sqrt(info.tiny), math.sqrt(info.max)
    for name, hint in (("alpha_e", "800"), ("alpha_z", "800"), ("rho", "300")):
        v = opts[name]
        if not lo <= v <= hi:
            raise ValueError(
                f"{name}: expected a value in [{lo:.3g}, {hi:.3g}] for SSC's working dtype "
                f"{str(work).replace('torch.', '')} (the A-step system lambda_z Y^T Y + rho "
                f"(I + 1 1^T) overflows or loses its rho term outside it), got {v!r}; the "
                f"authors use {name}={hint}"
            )


def check_choice(name: str, value, choices) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name}: expected one of {tuple(choices)}, got {value!r}")
    return value


def check_flag(name: str, value) -> bool:
    if not _is_bool(value):
        raise TypeError(f"{name}: expected True or False, got {value!r}")
    return bool(value)


def check_progress(value):
    """The ``progress=`` option: True, False, None, "auto" or an
    :class:`~videoanchor.anchor.progress.SSCProgress`; returned as given (a NumPy bool as bool)."""
    from videoanchor.anchor.progress import SSCProgress

    auto = isinstance(value, str) and value == "auto"
    if value is None or auto or isinstance(value, SSCProgress):
        return value
    if _is_bool(value):
        return bool(value)
    raise TypeError(
        f"progress: expected True, False, None, 'auto' or an SSCProgress, got {value!r}"
    )


def resolve_seed(seed) -> int:
    """An int seed in [0, 2**32 - 1]; ``None`` draws one from NumPy's global generator, as
    scikit-learn's ``random_state=None`` does (so ``numpy.random.seed`` makes it repeatable)."""
    if seed is None:
        return int(np.random.randint(0, 2**31 - 1))
    if not _is_int(seed):
        raise TypeError(f"seed: expected an int or None, got {type(seed).__name__}")
    if not 0 <= seed <= 2**32 - 1:
        raise ValueError(f"seed: expected an int in [0, 2**32 - 1] or None, got {seed}")
    return int(seed)


def check_dtype(name: str, value) -> torch.dtype:
    """The working dtype of the solvers: None (float32), ``torch.float32``, ``torch.float64``
    or their names."""
    if value is not None and not isinstance(value, (str, torch.dtype)):
        raise TypeError(
            f"{name}: expected None, torch.float32 or torch.float64, got {type(value).__name__}"
        )
    if value is None:
        return torch.float32
    if isinstance(value, str):
        value = {"float32": torch.float32, "float64": torch.float64}.get(value, value)
    if value not in (torch.float32, torch.float64):
        raise ValueError(
            f"{name}: expected torch.float32 or torch.float64, got {value!r}; SSC's ADMM needs "
            "at least float32 (try dtype=None, float32)"
        )
    return value


# ---- the options table and its checks ---------------------------------------------------


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


def _share_choice(name, value):
    """:attr:`SSCOptions.cluster_share`'s check: a former name (:data:`RENAMED_SHARES`) warns
    and becomes the new one."""
    if isinstance(value, str) and value in RENAMED_SHARES:
        new = RENAMED_SHARES[value]
        warnings.warn(f"{name}={value!r} is deprecated: it is now {new!r} (issue 91)",
                      DeprecationWarning, stacklevel=4)  # fmt: skip
        return new
    return check_choice(name, value, CLUSTER_SHARES)


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
    cluster_share: str = "steady"
    """Each token's cluster share ``pi_j``: ``"steady"`` (the default, beyond the paper:
    :func:`~videoanchor.anchor.clustering.steady_shares`, the paper's share where its labels are
    far from a change, the soft one where they are near one, blended by a weight that moves
    continuously with the discretisation's decision margins), ``"paper"`` (the paper's, for
    exact reproduction: its cluster's share of the tokens under the spectral labels, averaged
    over ``label_draws``; a rounding's change of the features can move it by 0.45 where the
    clustering is ill-posed), ``"soft"`` (beyond the paper:
    :func:`~videoanchor.anchor.clustering.soft_cluster_shares`, a continuous function of
    ``C`` that no label flip moves, NOT the paper's share) or ``"expected"`` (issue 100: the
    expectation of the paper's share over the spectral step's random label draws, which the
    authors leave unseeded, estimated deterministically from
    :data:`~videoanchor.anchor.clustering.EXPECTED_DRAWS` draws of the seeded stream, each
    draw's near-boundary tokens softened by their own margins:
    :func:`~videoanchor.anchor.clustering.expected_shares_from_embedding`; nearer the
    expectation than a single draw, but NOT continuous: a 1e-6 change of the features moves
    it by up to 0.039 on video-like scenes and 0.091 on Yale B's faces, a 1e-7 one by up to
    0.028 on the tiny model's, ``expected_share_cpu.json``, ``share_smoothing_cpu.json``;
    docs/method.md). ``"hard"`` and
    ``"stable"`` are the former names of ``"paper"`` and ``"steady"`` (deprecated).
    ``"soft"`` needs exact mode; in blocked mode ``"expected"``, and ``"steady"`` after the
    authors' iteration, run the paper's share (and the result says so); after the working
    sets by blocks ``"steady"`` runs, from the sparse affinity's eigenpairs."""
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
        if solver == "workset" and backend == "cupy":
            raise ValueError(
                "solver='workset' runs on torch's features; expected backend 'auto' or "
                f"'torch', got backend={backend!r}"
            )
        if mode == "blocked":
            check_blocked(solver, backend)
            if out.cluster_share == "soft":
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
    (exact mode), and in blocked mode the authors' iteration column-blocked or the working
    sets by blocks."""
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
    "cluster_share": (_share_choice, "labels"),
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
