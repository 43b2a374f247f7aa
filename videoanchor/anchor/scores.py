"""Anchor scores (docs/method.md section 3) and the public SSC entry points."""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field, replace

import torch

from videoanchor.anchor import _inputs
from videoanchor.anchor._inputs import (
    agree_across_ranks,
    as_feature_tensor,
    check_flag,
    resolve_dtype,
    tie_duplicate_scores,
    warn_dominant_token,
)
from videoanchor.anchor.blocked import solve_ssc_blocked, sparse_row_sums, sparse_ssc_affinity
from videoanchor.anchor.collective import _group, all_agree, comm_device
from videoanchor.anchor.options import DEFAULTS, REMOVED_SCALABLE, SSCOptions
from videoanchor.anchor.products import exact_float32
from videoanchor.anchor.spectral import (
    sparse_spectral_labels,
    spectral_labels,
    ssc_affinity,
)
from videoanchor.anchor.ssc import exact_bytes, solve_ssc_admm
from videoanchor.anchor.ssc_equality import solve_ssc_equality
from videoanchor.anchor.threads import bounded

__all__ = [
    "AnchorResult",
    "SSCResult",
    "anchor_scores",
    "SSCCoefficients",
    "anchor_result_from_coefficients",
    "compute_anchor_scores",
    "sparse_subspace_clustering",
    "ssc_coefficients",
    "pca_reduce",
]

_DATA_TERMS = ("squared", "exact")
# mode="auto": the dense exact solver up to this many tokens (and the free memory), the
# column-blocked exact solver above
EXACT_MAX_TOKENS = 16384
ACCEL_RELAX = 1.8  # over-relaxation of the accelerated solver (Eckstein & Bertsekas)


# Row sums of C that agree to this relative tolerance are "flat": within what the ADMM's
# stopping rule (eps = 2e-4 per column) leaves, measured at 1e-6 for identical tokens and
# 1e-3 for tokens that differ by 1e-3 of their norm (docs/validation.md).
FLAT_ROW_SUM_RTOL = 1e-3


def scores_from_row_sums(r: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """docs/method.md section 3 from the row sums ``r`` of ``C`` and the labels (float32).

    Degenerate case: when the row sums agree within ``FLAT_ROW_SUM_RTOL`` of their size
    (identical or near-identical tokens), every score is 0 and a warning says so, instead
    of min-max normalisation stretching the solver's noise over [0, 1).

    ``labels`` (N,) or (draws, N): with several draws, ``pi_j`` is token ``j``'s cluster
    share averaged over them."""
    n = r.numel()
    lab = labels.reshape(-1, n)
    r64 = r.to(torch.float64)
    if n > 1 and float(r64.max() - r64.min()) <= FLAT_ROW_SUM_RTOL * float(r64.abs().max()):
        # Identical (or near-identical) tokens: the row sums agree within the solver's
        # tolerance, so min-max normalisation would stretch solver noise over [0, 1).
        warnings.warn(
            f"videoanchor: the {n} tokens' SSC row sums agree to within "
            f"{FLAT_ROW_SUM_RTOL:g} of their size (identical or near-identical tokens, e.g. "
            "a static or blank video); no token stands out, so every anchor score is 0 "
            "(unanchored)",
            stacklevel=3,
        )
        return torch.zeros(n, dtype=torch.float32, device=r.device)
    pi = torch.stack([torch.bincount(row)[row] for row in lab]).to(torch.float64).mean(0) / n
    s_hat = pi * r64
    lo, hi = s_hat.min(), s_hat.max()
    s = ((s_hat - lo) / (hi - lo + 1e-5)).to(torch.float32)
    below_one = torch.nextafter(torch.tensor(1.0), torch.tensor(0.0)).item()
    return s.clamp_(0.0, below_one)


def anchor_scores(coef: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Anchor score of every token from ``C`` and cluster labels (docs/method.md section 3).

    ``r_j = sum_i C[j, i]`` (row sum of the signed ``C``, ``Y = Y C`` convention; ``coef``
    dense or sparse COO, which is never densified),
    ``pi_j`` = share of tokens in ``j``'s cluster, ``s^ = pi * r``, and
    ``s = (s^ - min s^) / (max s^ - min s^ + 1e-5)``. Computed in float64 and returned
    as float32 in ``[0, 1)`` (clamped below 1 where float32 rounding would reach it).
    ``labels`` may also be ``(draws, N)``, several label draws of one clustering: then
    ``pi_j`` is token ``j``'s cluster share averaged over the draws (``label_draws``).
    """
    if coef.dim() != 2 or coef.shape[0] != coef.shape[1]:
        raise ValueError(f"coef: expected a square (N, N) matrix, got shape {tuple(coef.shape)}")
    n = coef.shape[0]
    if labels.dim() not in (1, 2) or labels.shape[-1] != n or labels.shape[0] == 0 < n:
        raise ValueError(
            f"labels: expected shape ({n},) or (draws, {n}), got {tuple(labels.shape)}"
        )
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise TypeError(f"labels: expected an integer tensor, got {labels.dtype}")
    if n == 0:
        raise ValueError("coef: expected at least one token, got N = 0")
    if bool((labels < 0).any()):
        raise ValueError("labels: expected non-negative cluster ids")
    labels = labels.to(device=coef.device, dtype=torch.long)
    if coef.is_sparse:
        return scores_from_row_sums(sparse_row_sums(coef), labels)
    return scores_from_row_sums(coef.to(torch.float64).sum(dim=1), labels)


@exact_float32
def pca_reduce(x: torch.Tensor, rank: int) -> torch.Tensor:
    """Project the rows of ``x`` (``N x D``) on their top ``rank`` principal directions.

    Centers the rows (PCA), computes in float64 through the smaller Gram matrix, and
    returns ``N x rank`` in ``x``'s dtype. ``rank >= min(N, D)`` keeps every direction.
    """
    n, d = x.shape
    if rank <= 0:
        raise ValueError(f"pca_rank: expected a positive rank, got {rank}")
    x64 = x.to(torch.float64)
    xc = x64 - x64.mean(dim=0, keepdim=True)
    rank = min(rank, n, d)
    if d <= n:
        _, v = torch.linalg.eigh(xc.T @ xc)
        proj = xc @ v[:, -rank:].flip(1)
    else:
        w, u = torch.linalg.eigh(xc @ xc.T)
        u, w = u[:, -rank:].flip(1), w[-rank:].flip(0)
        proj = u * w.clamp_min(0).sqrt()
    return proj.to(x.dtype)


@dataclass
class SSCResult:
    """Output of :func:`sparse_subspace_clustering`.

    ``labels`` (N,) int64; ``coef`` C (N, N), column ``i`` reconstructs point ``i``;
    ``timings`` seconds per stage (``lambdas``, ``factor``, ``admm``, ``spectral``,
    ``total``); ``label_draws`` (draws, N) int64, every label draw (row 0 is ``labels``).
    """

    labels: torch.Tensor
    coef: torch.Tensor
    iterations: int
    converged: bool
    residual: float
    lambda_e: float
    lambda_z: float
    backend: str
    solver: str
    timings: dict[str, float] = field(default_factory=dict)
    label_draws: torch.Tensor | None = None


@dataclass
class AnchorResult:
    """Output of :func:`compute_anchor_scores`.

    ``scores`` (N,) float32 in [0, 1); ``labels`` (N,) int64 cluster ids; ``coef`` C
    (N, N) in the ``Y = Y C`` convention with ``Y = features.T`` (labels of the first
    label draw when ``label_draws > 1``); ``iterations`` and
    ``converged`` of the ADMM; ``timings`` seconds per stage (``lambdas``, ``factor``,
    ``admm``, ``spectral``, ``scores``, ``total``).
    """

    scores: torch.Tensor
    labels: torch.Tensor
    coef: torch.Tensor
    iterations: int
    converged: bool
    residual: float
    lambda_e: float
    lambda_z: float
    backend: str
    solver: str
    mode: str = "exact"
    timings: dict[str, float] = field(default_factory=dict)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _check_tokens(n_clusters: int, n: int) -> None:
    """Enough tokens for ``n_clusters`` clusters and for SSC (``n_clusters`` already checked)."""
    if n < n_clusters:
        raise ValueError(
            f"expected at least n_clusters = {n_clusters} tokens, got N = {n}; "
            "pass fewer clusters or more tokens"
        )
    if n < 2:
        raise ValueError(f"SSC needs at least 2 tokens, got N = {n}")


def _exact_fits(x: torch.Tensor, dtype, pca_rank: int, precision: str = "full") -> bool:
    n, d = x.shape
    if n > EXACT_MAX_TOKENS:
        return False
    d = min(d, pca_rank) if pca_rank else d
    work = resolve_dtype(dtype, x.device)
    itemsize = torch.finfo(work).bits // 8
    need = exact_bytes(n, d, itemsize, x.device.type, precision)
    free = _inputs.free_memory_bytes(x.device)
    return free is None or need <= free


def _solve(x, opts: SSCOptions, *, backend, solver, **kw):
    """The dense solver of ``backend`` (one iteration, two array namespaces) on ``opts``'
    program."""
    solve = solve_ssc_admm
    if backend == "cupy":
        from videoanchor.anchor.cupy_backend import solve_ssc_admm_cupy as solve
    kw.update(opts.program())
    if solver == "fast":
        return solve(x, scheduled=True, precision=opts.precision, **kw)
    relax, adaptive = (1.0, False) if solver == "faithful" else (ACCEL_RELAX, True)
    return solve(x, relax=relax, adaptive_rho=adaptive, e_every=3 if adaptive else 1, **kw)


@bounded()
@exact_float32
def sparse_subspace_clustering(
    features,
    n_clusters: int,
    *,
    alpha_e: float = DEFAULTS.alpha_e,
    alpha_z: float = DEFAULTS.alpha_z,
    rho: float = DEFAULTS.rho,
    eps: float = DEFAULTS.eps,
    max_iter: int = DEFAULTS.max_iter,
    affine: bool = True,
    outliers: bool = True,
    data_term: str = "squared",
    pca_rank: int = DEFAULTS.pca_rank,
    affinity: str = "symmetric",
    assign_labels: str = "discretize",
    eigen_solver: str = DEFAULTS.eigen_solver,
    seed: int = DEFAULTS.seed,
    label_draws: int = DEFAULTS.label_draws,
    backend: str = DEFAULTS.backend,
    solver: str = "faithful",
    dtype=DEFAULTS.dtype,
    precision: str = DEFAULTS.precision,
    progress=DEFAULTS.progress,
) -> SSCResult:
    """Sparse subspace clustering of the rows of ``features`` (``N x D``) into ``n_clusters``.

    Solves docs/method.md's SSC program (``affine``: the ``1^T C = 1^T`` constraint;
    ``outliers``: the ``lambda_e ||E||_1`` term, else ``E = 0``) on the features' device,
    then spectral clustering of ``W = |C| + |C|^T`` (``affinity="column_max"``: each
    column of ``|C|`` scaled by its largest entry first). ``solver="faithful"`` runs the
    authors' iteration; ``"accelerated"`` an over-relaxed ADMM with residual balancing that
    converges to the minimiser of the same program; ``"fast"`` the authors' steps on a fixed
    schedule (see :func:`compute_anchor_scores`); ``"auto"`` picks ``"faithful"`` here.

    ``data_term="exact"`` solves Elhamifar & Vidal's constrained outlier program instead,
    ``min ||C||_1 + gamma ||E||_1 s.t. Y = Y C + E, diag(C) = 0``, by their ADMM
    (:mod:`videoanchor.anchor.ssc_equality`; ``rho`` is their ``mu2``, which their face
    experiments set to ``alpha = 20``, with ``max_iter = 149`` and ``affine=False``). It
    needs ``outliers=True``, the torch backend and the faithful solver.

    ``label_draws``: label assignments drawn from the one spectral embedding (see
    :func:`compute_anchor_scores`); ``labels`` is the first, ``label_draws`` holds all.
    """
    t0 = time.perf_counter()
    opts = SSCOptions.of(locals(), mode="exact").checked()
    check_flag("affine", affine)
    check_flag("outliers", outliers)
    x = as_feature_tensor(features)
    _check_tokens(opts.n_clusters, x.shape[0])
    warn_dominant_token(x, opts.dtype)
    backend = "torch" if opts.backend == "auto" else opts.backend
    solver = "faithful" if opts.solver == "auto" else opts.solver
    if data_term not in _DATA_TERMS:
        raise ValueError(f"data_term: expected one of {_DATA_TERMS}, got {data_term!r}")
    if data_term == "exact":
        unsupported = [
            msg
            for bad, msg in (
                (not outliers, "outliers=False (the constraint Y = Y C + E needs E)"),
                (backend == "cupy", "backend='cupy' (torch only)"),
                (solver in ("accelerated", "fast"), f"solver={solver!r} (faithful only)"),
            )
            if bad
        ]
        if unsupported:
            raise ValueError(
                "data_term='exact' (Elhamifar & Vidal's constrained outlier program) does "
                "not support " + "; ".join(unsupported)
            )
    if affinity not in ("symmetric", "column_max"):
        raise ValueError(f"affinity: expected 'symmetric' or 'column_max', got {affinity!r}")
    if assign_labels not in ("discretize", "kmeans"):
        raise ValueError(f"assign_labels: expected 'discretize' or 'kmeans', got {assign_labels!r}")
    if opts.pca_rank:
        x = pca_reduce(x, opts.pca_rank)
    if data_term == "exact":
        admm = solve_ssc_equality(x, affine=affine, **opts.program())
    else:
        admm = _solve(x, opts, backend=backend, solver=solver, outliers=outliers, affine=affine)
    coef = admm.coef
    t1 = time.perf_counter()
    w = ssc_affinity(coef, normalize="column_max" if affinity == "column_max" else "none")
    draws = spectral_labels(
        w, opts.n_clusters, seed=opts.seed, assign_labels=assign_labels,
        eigen_solver=opts.eigen_solver, draws=opts.label_draws,
    )  # fmt: skip
    _sync(x.device)
    t2 = time.perf_counter()
    timings = dict(admm.timings)
    timings["spectral"] = t2 - t1
    timings["total"] = t2 - t0
    return SSCResult(
        labels=draws[0],
        coef=coef,
        iterations=admm.iterations,
        converged=admm.converged,
        residual=admm.residual,
        lambda_e=admm.lambda_e,
        lambda_z=admm.lambda_z,
        backend=backend,
        solver=solver,
        timings=timings,
        label_draws=draws,
    )


@bounded()
@exact_float32
def compute_anchor_scores(
    features,
    n_clusters: int = DEFAULTS.n_clusters,
    *,
    alpha_e: float = DEFAULTS.alpha_e,
    alpha_z: float = DEFAULTS.alpha_z,
    rho: float = DEFAULTS.rho,
    eps: float = DEFAULTS.eps,
    max_iter: int = DEFAULTS.max_iter,
    pca_rank: int = DEFAULTS.pca_rank,
    seed: int = DEFAULTS.seed,
    backend: str = DEFAULTS.backend,
    dtype=DEFAULTS.dtype,
    precision: str = DEFAULTS.precision,
    progress=DEFAULTS.progress,
    solver: str = DEFAULTS.solver,
    eigen_solver: str = DEFAULTS.eigen_solver,
    mode: str = DEFAULTS.mode,
    block_columns: int | None = DEFAULTS.block_columns,
    block_eps: str = DEFAULTS.block_eps,
    process_group=None,
    label_draws: int = DEFAULTS.label_draws,
    candidates=None,
) -> AnchorResult:
    """VideoAnchor scores of ``features`` (``N x D`` visual tokens of one request).

    SSC with the authors' model and parameters (docs/method.md section 2), spectral clustering
    into ``n_clusters`` (seeded), then the anchor score of section 3. Work happens on
    the features' device; ``scores`` (N,) float32 in [0, 1), ``labels`` (N,) int64 and
    ``coef`` (N, N) are returned there.

    ``solver``: ``"fast"`` (the default through ``"auto"`` in exact mode; an approximation
    of the faithful answer: the authors' A-, E- and C-steps on a fixed schedule of 60
    iterations (``converged`` when it ran them all; a smaller ``max_iter`` cuts it short)
    with ``rho`` rebalanced by a continuous factor, the
    system factored once by an eigendecomposition; ``eps`` does not apply; no stopping test,
    so the scores are a continuous function of the features, see docs/ssc.md for its
    fidelity), ``"faithful"`` (the authors' iteration and stopping rule
    ``max_i sum_j |A - C|_ij < eps``, iterate for iterate, so the authors' answer; near that
    threshold a tiny change of the features can move the stopping iteration and the scores
    jump) or ``"accelerated"`` (over-relaxed ADMM with residual balancing, stopped on both
    the primal and the dual residual: it converges to the minimiser of the authors'
    program, which the authors' stopping rule leaves several percent away from; not always
    fewer iterations). Blocked mode runs the faithful iteration (``"auto"`` picks it there).

    ``precision`` (fast solver): ``"full"`` multiplies in the working dtype; ``"fp16x3"``
    runs the solver's dense products on float16 tensor cores at about float32 accuracy (each
    float32 operand scaled by a power of two and split into two float16 parts, three
    products accumulated in float32; emulated, three times slower, off CUDA). Float32,
    torch backend, exact mode. ``"auto"`` (default) is ``"fp16x3"`` where it runs natively
    (CUDA, compute capability 7.0 or later) and the rest allows it, else ``"full"``.

    ``mode``: ``"exact"`` (dense ``N x N`` SSC), ``"blocked"`` (the same exact program and
    iteration on ``block_columns`` columns of ``C`` at a time against all tokens, no
    ``N x N`` buffer, each block stopped by its own part of the authors' criterion; see
    :mod:`videoanchor.anchor.blocked`; ``block_eps="share"`` gives each block
    ``eps * b / N`` so that the assembled ``C`` meets the authors' criterion over all
    columns; ``coef`` is then a sparse COO tensor and the
    spectral step runs on the sparse affinity) or ``"auto"``: dense exact up to
    ``N = 16384`` tokens when it fits in memory, blocked exact above. (``mode="scalable"``
    and ``candidates``, an approximation, were removed: passing them is a ``ValueError``.)

    ``process_group``: a ``torch.distributed`` process group (any backend: gloo, NCCL).
    Every rank of the group must call this with features of the same shape; rank 0's
    features are used, and every rank returns the same ``AnchorResult`` (``timings`` are
    each rank's own; clustering and scores are computed once on rank 0 and broadcast). The
    solver's work is divided among the ranks:

    - exact mode (``mode="exact"``, or ``"auto"`` where the dense problem fits on every
      rank), fast solver (``solver="auto"`` or ``"fast"``): the columns of ``C`` are split
      over the ranks, each iterating its own share against the whole factor, and ``C`` is
      all-gathered; the result is the single-process fast result to rounding (the residual
      and the rebalancing norms are sums over the ranks);
    - blocked mode (``mode="blocked"``, ``"auto"`` where the dense problem does not fit, or
      ``solver="faithful"`` with ``mode="auto"``): the authors' iteration, the column blocks
      dealt to the ranks, the sparse columns all-gathered; it equals the single-process
      ``mode="blocked"`` result.

    ``solver="accelerated"``, ``solver="faithful"`` with ``mode="exact"`` and
    ``backend="cupy"`` are a ``ValueError`` before any work.

    ``label_draws`` (beyond the paper): the default 1 is the paper's single random label
    assignment (the authors' scikit-learn call, seed-compatible). With ``R > 1``, ``R``
    assignments are drawn from the one spectral embedding (one random stream, the first
    draw being the default's) and each token's cluster share ``pi_j`` is averaged over
    them, so the scores depend much less on the seed; the embedding is computed once.

    Identical tokens get identical scores (bitwise-identical rows share the mean of their
    scores); when all tokens are one point, or the row sums of ``C`` agree to 1e-3, every
    score is 0 and a warning says so (docs/validation.md). ``seed=None`` draws a seed from
    NumPy's global generator, as scikit-learn's ``random_state=None`` does.

    Every option is checked before any work, in every mode; an option the chosen mode
    would ignore is a ``ValueError``. Under a ``process_group`` the checks and a
    fingerprint of all options meet in one collective that every rank reaches first, so
    every rank raises the same error or none does.

    ``progress``: False, True, None (default: a progress bar on a terminal, log lines on
    the ``videoanchor.progress`` logger otherwise, once a run lasts a few seconds) or an
    :class:`~videoanchor.anchor.progress.SSCProgress` (its ``time_budget`` stops the ADMM
    at the iterate reached: ``converged=False``, not the paper's answer).

    The options, their defaults and their checks live in
    :class:`~videoanchor.anchor.options.SSCOptions`.

    Raises ``ValueError`` for N = 0, fewer tokens than clusters or non-finite features,
    ``TypeError`` for non-numeric input, and ``SSCMemoryError`` (a ``MemoryError``) with
    the size it would need when the dense problem does not fit on the device.
    """
    t0 = time.perf_counter()
    given = SSCOptions.of(locals())
    opts, x, error = None, None, None
    try:
        if candidates is not None:
            raise ValueError(f"candidates: {REMOVED_SCALABLE}")
        opts = given.checked(distributed=process_group is not None)
        x = as_feature_tensor(features)
        _check_tokens(opts.n_clusters, x.shape[0])
    except (TypeError, ValueError) as exc:
        if process_group is None:
            raise
        error = exc
    if process_group is not None:
        _group(process_group)  # checks that it is an initialised process group
        # Every rank reaches this one collective before any can fail: all raise the same
        # error (a rank's own bad input, or options that differ between ranks), or none.
        fingerprint = given.as_dict(without=("progress",))
        fingerprint["features"] = None if x is None else (tuple(x.shape), str(x.dtype))
        agree_across_ranks(process_group, fingerprint, error)
    mode = opts.mode
    if mode == "auto":
        if process_group is not None and opts.solver == "faithful":
            mode = "blocked"  # the authors' iteration runs over processes column-blocked
        else:
            fits = _exact_fits(x, opts.dtype, opts.pca_rank, opts.precision)
            if process_group is not None:  # the same choice on every rank
                fits = all_agree(fits, process_group, x.device)
            mode = "exact" if fits else "blocked"
    if mode == "blocked" and opts.precision == "fp16x3":  # ("auto" is "full" there)
        raise ValueError(
            f"precision={opts.precision!r} applies to the fast solver of exact mode, but these "
            f"{x.shape[0]} tokens need blocked mode (the authors' iteration: exact mode does not "
            "fit in memory or N exceeds its limit); use precision='auto' or 'full'"
        )
    if mode == "blocked":
        warn_dominant_token(x, opts.dtype)  # (mode='exact' warns in the call below)
        return _blocked_anchor_scores(x, opts, t0=t0, process_group=process_group)
    if process_group is not None:
        warn_dominant_token(x, opts.dtype)
        return _split_anchor_scores(x, opts, t0=t0, process_group=process_group)
    solver = "fast" if opts.solver == "auto" else opts.solver
    res = sparse_subspace_clustering(
        x, **replace(opts, solver=solver).as_dict(without=("mode", "block_columns", "block_eps"))
    )
    t1 = time.perf_counter()
    scores = tie_duplicate_scores(x, anchor_scores(res.coef, res.label_draws))
    _sync(scores.device)
    t2 = time.perf_counter()
    timings = dict(res.timings)
    timings["scores"] = t2 - t1
    timings["total"] = t2 - t0
    return AnchorResult(
        scores=scores,
        labels=res.labels,
        coef=res.coef,
        iterations=res.iterations,
        converged=res.converged,
        residual=res.residual,
        lambda_e=res.lambda_e,
        lambda_z=res.lambda_z,
        backend=res.backend,
        solver=res.solver,
        timings=timings,
    )


@dataclass
class SSCCoefficients:
    """The SSC step of :func:`compute_anchor_scores` (``mode="exact"``) on its own.

    ``coef`` C (N, N) dense, in the ``Y = Y C`` convention; the other fields as in
    :class:`AnchorResult`. It depends on the features and the SSC options only, not on
    ``n_clusters`` or the seed: :func:`anchor_result_from_coefficients` finishes it.
    """

    coef: torch.Tensor
    iterations: int
    converged: bool
    residual: float
    lambda_e: float
    lambda_z: float
    backend: str
    solver: str
    timings: dict[str, float] = field(default_factory=dict)


@bounded()
@exact_float32
def ssc_coefficients(
    features,
    *,
    alpha_e: float = DEFAULTS.alpha_e,
    alpha_z: float = DEFAULTS.alpha_z,
    rho: float = DEFAULTS.rho,
    eps: float = DEFAULTS.eps,
    max_iter: int = DEFAULTS.max_iter,
    pca_rank: int = DEFAULTS.pca_rank,
    backend: str = DEFAULTS.backend,
    solver: str = DEFAULTS.solver,
    dtype=DEFAULTS.dtype,
    precision: str = DEFAULTS.precision,
    progress=False,
) -> SSCCoefficients:
    """Solve SSC on ``features`` (``N x D``) as :func:`compute_anchor_scores` does with
    ``mode="exact"`` (the authors' program, affine, with outliers), without clustering.

    ``compute_anchor_scores(x, k, mode="exact", ...)`` equals
    ``anchor_result_from_coefficients(ssc_coefficients(x, ...), k, seed=..., label_draws=...)``
    for the same options: the split lets a sweep over ``n_clusters`` solve SSC once.
    ``progress`` as in :func:`compute_anchor_scores`.
    """
    t0 = time.perf_counter()
    opts = SSCOptions.of(locals(), mode="exact").checked()
    x = as_feature_tensor(features)
    _check_tokens(1, x.shape[0])
    backend = "torch" if opts.backend == "auto" else opts.backend
    solver = "fast" if opts.solver == "auto" else opts.solver
    if opts.pca_rank:
        x = pca_reduce(x, opts.pca_rank)
    admm = _solve(x, opts, backend=backend, solver=solver, outliers=True, affine=True)
    _sync(x.device)
    timings = dict(admm.timings)
    timings["total"] = time.perf_counter() - t0
    return SSCCoefficients(
        coef=admm.coef, iterations=admm.iterations, converged=admm.converged,
        residual=admm.residual, lambda_e=admm.lambda_e, lambda_z=admm.lambda_z,
        backend=backend, solver=solver, timings=timings,
    )  # fmt: skip


@bounded()
@exact_float32
def anchor_result_from_coefficients(
    ssc: SSCCoefficients,
    n_clusters: int,
    *,
    seed: int = 0,
    label_draws: int = 1,
    eigen_solver: str = "auto",
    features=None,
) -> AnchorResult:
    """Spectral clustering of ``ssc.coef`` into ``n_clusters`` (seeded) and the anchor
    scores: the rest of :func:`compute_anchor_scores` after :func:`ssc_coefficients`.
    ``features``: the (N, D) tokens C was solved on; when given, identical tokens get
    identical scores as in :func:`compute_anchor_scores` (pass them for the same answer)."""
    t0 = time.perf_counter()
    opts = SSCOptions(
        n_clusters=n_clusters, seed=seed, label_draws=label_draws, eigen_solver=eigen_solver,
        mode="exact",
    ).checked()  # fmt: skip
    _check_tokens(opts.n_clusters, ssc.coef.shape[0])
    w = ssc_affinity(ssc.coef, normalize="none")
    draws = spectral_labels(
        w, opts.n_clusters, seed=opts.seed, assign_labels="discretize",
        eigen_solver=opts.eigen_solver, draws=opts.label_draws,
    )  # fmt: skip
    t1 = time.perf_counter()
    scores = anchor_scores(ssc.coef, draws)
    if features is not None:
        scores = tie_duplicate_scores(as_feature_tensor(features), scores)
    _sync(scores.device)
    t2 = time.perf_counter()
    timings = dict(ssc.timings)
    timings.update(spectral=t1 - t0, scores=t2 - t1, total=timings.get("total", 0.0) + t2 - t0)
    return AnchorResult(
        scores=scores, labels=draws[0], coef=ssc.coef, iterations=ssc.iterations,
        converged=ssc.converged, residual=ssc.residual, lambda_e=ssc.lambda_e,
        lambda_z=ssc.lambda_z, backend=ssc.backend, solver=ssc.solver, timings=timings,
    )  # fmt: skip


def _blocked_anchor_scores(x, opts: SSCOptions, *, t0, process_group) -> AnchorResult:
    """``mode="blocked"`` of :func:`compute_anchor_scores`, on one process or a group
    (``opts`` checked; ``mode="auto"`` may choose this for a solver it cannot run)."""
    if opts.solver in ("accelerated", "fast"):
        raise ValueError(
            f"mode='blocked' does not support solver={opts.solver!r} (the authors' iteration "
            "only); mode='auto' chose it for these tokens: pass solver='auto' or 'faithful'"
        )
    if opts.backend == "cupy":
        raise ValueError(
            "mode='blocked' does not support backend='cupy' (torch only); mode='auto' chose it "
            "for these tokens: pass backend='auto' or 'torch'"
        )
    if opts.pca_rank:
        x = pca_reduce(x, opts.pca_rank)
    admm = solve_ssc_blocked(
        x, **opts.program(), block_columns=opts.block_columns, block_eps=opts.block_eps,
        process_group=process_group,
    )  # fmt: skip
    return _finish_over_group(admm, x, opts, process_group, t0=t0, sparse=True,
                              solver="faithful", mode="blocked")  # fmt: skip


def _cluster_on_first(coef, x, opts: SSCOptions, process_group, *, sparse: bool):
    """``(label draws, scores)`` of ``coef`` (every rank holds the same ``C``), clustered
    once on rank 0 of ``process_group`` and broadcast; if that fails, every rank raises."""
    group, rank, _ = _group(process_group)
    n = coef.shape[0]
    draws = torch.empty(opts.label_draws, n, dtype=torch.long, device=x.device)
    scores = torch.empty(n, dtype=torch.float32, device=x.device)
    error = None
    if rank == 0:
        try:
            if sparse:
                w = sparse_ssc_affinity(coef)
                draws = sparse_spectral_labels(w, opts.n_clusters, seed=opts.seed,
                                               draws=opts.label_draws)  # fmt: skip
            else:
                w = ssc_affinity(coef, normalize="none")
                draws = spectral_labels(
                    w, opts.n_clusters, seed=opts.seed, assign_labels="discretize",
                    eigen_solver=opts.eigen_solver, draws=opts.label_draws,
                )  # fmt: skip
            draws = draws.to(x.device)
            del w
            scores = tie_duplicate_scores(x, anchor_scores(coef, draws))
        except Exception as exc:  # re-raised below, after the other ranks are told
            error = exc
    if group is not None:
        import torch.distributed as dist

        dev = comm_device(group, x.device)
        src = dist.get_global_rank(group, 0)
        flag = torch.tensor([0 if error is None else 1], device=dev)
        dist.broadcast(flag, src=src, group=group)
        if int(flag) != 0:
            if error is not None:
                raise error
            raise RuntimeError("compute_anchor_scores: clustering failed on rank 0 of the group")
        buf_l, buf_s = draws.to(dev), scores.to(dev)
        dist.broadcast(buf_l, src=src, group=group)
        dist.broadcast(buf_s, src=src, group=group)
        draws, scores = buf_l.to(x.device), buf_s.to(x.device)
    elif error is not None:
        raise error
    return draws, scores


def _split_anchor_scores(x, opts: SSCOptions, *, t0, process_group) -> AnchorResult:
    """``mode="exact"`` of :func:`compute_anchor_scores` over a process group: the fast
    solver with the columns of ``C`` split over the ranks (``solve_ssc_admm``'s
    ``process_group``), ``C`` on every rank, clustered once on rank 0 and broadcast."""
    feats = x
    if opts.pca_rank:
        x = pca_reduce(x, opts.pca_rank)
    admm = solve_ssc_admm(x, scheduled=True, precision=opts.precision,
                          process_group=process_group, **opts.program())  # fmt: skip
    return _finish_over_group(admm, feats, opts, process_group, t0=t0, sparse=False,
                              solver="fast", mode="exact")  # fmt: skip


def _finish_over_group(admm, x, opts, process_group, *, t0, sparse, solver, mode):
    """The :class:`AnchorResult` of a solve over a process group (or of blocked mode on one
    process): ``admm.coef`` clustered once on rank 0 (:func:`_cluster_on_first`)."""
    t1 = time.perf_counter()
    draws, scores = _cluster_on_first(admm.coef, x, opts, process_group, sparse=sparse)
    _sync(x.device)
    t2 = time.perf_counter()
    timings = dict(admm.timings)
    timings["spectral"] = t2 - t1
    timings["scores"] = 0.0  # computed with the clustering on rank 0
    timings["total"] = t2 - t0
    return AnchorResult(
        scores=scores, labels=draws[0], coef=admm.coef, iterations=admm.iterations,
        converged=admm.converged, residual=admm.residual, lambda_e=admm.lambda_e,
        lambda_z=admm.lambda_z, backend="torch", solver=solver, mode=mode, timings=timings,
    )  # fmt: skip
