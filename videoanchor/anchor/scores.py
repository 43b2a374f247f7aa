"""Anchor scores (docs/method.md section 3) and the public SSC entry points."""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, replace

import torch

from videoanchor.anchor._inputs import (
    as_feature_tensor,
    check_tokens,
    pca_reduce,
    prepare_features,
)
from videoanchor.anchor.clustering import cluster, label_shares
from videoanchor.anchor.options import DEFAULTS, REMOVED_SCALABLE, SSCOptions, check_flag
from videoanchor.anchor.plan import make_plan
from videoanchor.anchor.products import exact_float32
from videoanchor.anchor.program import SSCSolution
from videoanchor.anchor.solve import solve
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


# Row sums of C that agree to this relative tolerance are "flat": within what the ADMM's
# stopping rule (eps = 2e-4 per column) leaves, measured at 1e-6 for identical tokens and
# 1e-3 for tokens that differ by 1e-3 of their norm (docs/validation.md).
FLAT_ROW_SUM_RTOL = 1e-3


def scores_from_row_sums(
    r: torch.Tensor, labels: torch.Tensor, shares: torch.Tensor | None = None
) -> torch.Tensor:
    """docs/method.md section 3 from the row sums ``r`` of ``C`` and the labels (float32).

    Degenerate case: when the row sums agree within ``FLAT_ROW_SUM_RTOL`` of their size
    (identical or near-identical tokens), every score is 0 and a warning says so, instead
    of min-max normalisation stretching the solver's noise over [0, 1).

    ``labels`` (N,) or (draws, N): with several draws, ``pi_j`` is token ``j``'s cluster
    share averaged over them. ``shares`` (N,): the ``pi_j`` themselves instead
    (``cluster_share="soft"``); ``labels`` are then not read."""
    out, flat = _score_parts(r, labels, shares)
    if bool(flat):  # (one host read)
        _warn_flat_rows(r.numel(), stacklevel=3)
    return out


def _score_parts(r: torch.Tensor, labels: torch.Tensor, shares: torch.Tensor | None):
    """:func:`scores_from_row_sums` on the device, no host read: ``(scores, flat)``, ``flat``
    a device bool (the row sums agree: the scores are 0, the caller warns)."""
    n = r.numel()
    lab = labels.reshape(-1, n)
    r64 = r.to(torch.float64)
    flat = (r64.max() - r64.min() <= FLAT_ROW_SUM_RTOL * r64.abs().max()) & (n > 1)
    if shares is not None:
        pi = shares.to(device=r.device, dtype=torch.float64)
    else:
        pi = label_shares(lab)
    s_hat = pi * r64
    lo, hi = s_hat.min(), s_hat.max()
    s = ((s_hat - lo) / (hi - lo + 1e-5)).to(torch.float32)
    below_one = torch.nextafter(torch.tensor(1.0), torch.tensor(0.0)).item()
    s = s.clamp_(0.0, below_one)
    return torch.where(flat, torch.zeros_like(s), s), flat


def _warn_flat_rows(n: int, stacklevel: int) -> None:
    # Identical (or near-identical) tokens: the row sums agree within the solver's
    # tolerance, so min-max normalisation would stretch solver noise over [0, 1).
    warnings.warn(
        f"videoanchor: the {n} tokens' SSC row sums agree to within "
        f"{FLAT_ROW_SUM_RTOL:g} of their size (near-identical tokens, e.g. a static or "
        "blank video, or an SSC stopped far from its answer: see its convergence); no "
        "token stands out, so every anchor score is 0 (unanchored)",
        stacklevel=stacklevel + 1,
    )


def sparse_row_sums(coef: torch.Tensor) -> torch.Tensor:
    """``r_j = sum_i C[j, i]`` of a sparse COO ``C`` (float64, ``N``), no densifying."""
    c = coef.coalesce()
    ind = c.indices()
    out = torch.zeros(c.shape[0], dtype=torch.float64, device=c.device)
    return out.index_add_(0, ind[0], c.values().to(torch.float64))


# ---- identical tokens get identical scores ------------------------------------------------


# Tokens within this distance of their mean (relative to the largest norm) are one point.
FLAT_FEATURES_RTOL = 1e-3


def tie_duplicate_scores(x: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """Scores of bitwise-identical rows of ``x`` replaced by their mean; all 0 (with a
    warning) when every row lies within ``FLAT_FEATURES_RTOL`` of the rows' mean.

    SSC treats identical tokens symmetrically, but its solution among them is not unique
    and the ADMM splits the weight unevenly; by symmetry identical tokens get one score
    (the mean of theirs, which keeps the scores' range). A row hash finds candidates in
    O(N D) (one host read of three flags); only rows whose hashes collide are compared
    exactly.
    """
    if x.shape[0] < 2 or scores.numel() != x.shape[0]:
        return scores
    flags, h = _tie_flags(x, scores)
    return _tie(x, scores, h, flags.tolist(), stacklevel=2)


def _tie_flags(x: torch.Tensor, scores: torch.Tensor):
    """``([flat features, any score, colliding hashes], hashes)`` on the device."""
    x64 = x.to(torch.float64)
    spread = (x64 - x64.mean(dim=0, keepdim=True)).norm(dim=1).max()
    flat = spread <= FLAT_FEATURES_RTOL * x64.norm(dim=1).max()
    gen = torch.Generator(device="cpu").manual_seed(12345)
    probe = torch.rand(x.shape[1], generator=gen, dtype=torch.float64).to(x.device)
    h = x64 @ probe
    hs = h.sort().values
    collide = (hs[1:] == hs[:-1]).any()
    return torch.stack([flat, scores.any().to(flat.device), collide.to(flat.device)]), h


def _tie(x: torch.Tensor, scores: torch.Tensor, h: torch.Tensor, flags: list, *,
         stacklevel: int) -> torch.Tensor:  # fmt: skip
    """:func:`tie_duplicate_scores` from its flags (read) and the row hashes ``h``."""
    n = x.shape[0]
    flat, any_score, collide = flags
    if flat:
        if not any_score:  # already all 0 (flat row sums, warned there)
            return torch.zeros_like(scores)
        warnings.warn(
            f"videoanchor: the {n} tokens are identical to within {FLAT_FEATURES_RTOL:g} of "
            "their norm (e.g. a static or blank video); no token stands out, so every anchor "
            "score is 0 (unanchored)",
            stacklevel=stacklevel + 1,
        )
        return torch.zeros_like(scores)
    if not collide:
        return scores
    _, inv_h, counts_h = torch.unique(h, return_inverse=True, return_counts=True)
    cand = torch.nonzero(counts_h[inv_h] > 1).flatten()
    _, inverse, counts = torch.unique(x[cand], dim=0, return_inverse=True, return_counts=True)
    if int(counts.max()) < 2:
        return scores
    sums = torch.zeros(counts.numel(), dtype=torch.float64, device=scores.device)
    sums.index_add_(0, inverse.to(scores.device), scores[cand.to(scores.device)].to(torch.float64))
    out = scores.clone()
    out[cand.to(scores.device)] = (sums / counts.to(sums))[inverse.to(scores.device)].to(out.dtype)
    return out


def anchor_scores(
    coef: torch.Tensor, labels: torch.Tensor, *, shares: torch.Tensor | None = None
) -> torch.Tensor:
    """Anchor score of every token from ``C`` and cluster labels (docs/method.md section 3).

    ``r_j = sum_i C[j, i]`` (row sum of the signed ``C``, ``Y = Y C`` convention; ``coef``
    dense or sparse COO, which is never densified),
    ``pi_j`` = share of tokens in ``j``'s cluster, ``s^ = pi * r``, and
    ``s = (s^ - min s^) / (max s^ - min s^ + 1e-5)``. Computed in float64 and returned
    as float32 in ``[0, 1)`` (clamped below 1 where float32 rounding would reach it).
    ``labels`` may also be ``(draws, N)``, several label draws of one clustering: then
    ``pi_j`` is token ``j``'s cluster share averaged over the draws (``label_draws``).
    ``shares`` (N,) in ``(0, 1]``: the ``pi_j`` given instead of read from the labels
    (``cluster_share="soft"`` or ``"steady"``: :func:`~videoanchor.anchor.clustering.cluster`'s).
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
    if shares is not None and (shares.shape != (n,) or not shares.dtype.is_floating_point):
        raise ValueError(_bad_shares(n, shares))
    out, flags = _anchor_parts(coef, labels, shares)
    return _anchor_checked(out, flags.tolist(), n, shares, stacklevel=2)


def _bad_shares(n: int, shares: torch.Tensor) -> str:
    return (f"shares: expected ({n},) floats in (0, 1], got shape {tuple(shares.shape)}, "
            f"{shares.dtype}")  # fmt: skip


def _anchor_parts(coef, labels, shares):
    """:func:`anchor_scores` of checked shapes on the device, no host read: ``(scores,
    [negative labels, shares outside (0, 1], flat row sums])`` (device bools)."""
    labels = labels.to(device=coef.device, dtype=torch.long)
    negative = (labels < 0).any()
    r = sparse_row_sums(coef) if coef.is_sparse else coef.to(torch.float64).sum(dim=1)
    out, flat = _score_parts(r, labels.clamp_min(0), shares)  # (raised below if negative)
    outside = ~((shares > 0) & (shares <= 1)).all() if shares is not None else negative & False
    return out, torch.stack([negative, outside.to(negative.device), flat.to(negative.device)])


def _anchor_checked(out, flags: list, n: int, shares, *, stacklevel: int) -> torch.Tensor:
    """:func:`anchor_scores`' answer from its flags, read: raised, warned or ``out``."""
    negative, outside, flat = flags
    if negative:
        raise ValueError("labels: expected non-negative cluster ids")
    if outside:
        raise ValueError(_bad_shares(n, shares))
    if flat:
        _warn_flat_rows(n, stacklevel=stacklevel + 1)
    return out


def _scores_tied(x: torch.Tensor, coef, labels, shares) -> torch.Tensor:
    """``tie_duplicate_scores(x, anchor_scores(coef, labels, shares=shares))`` with one host
    read (both functions' flags together) where no token has a twin."""
    out, flags = _anchor_parts(coef, labels, shares)
    if x.shape[0] < 2 or out.numel() != x.shape[0]:
        return _anchor_checked(out, flags.tolist(), coef.shape[0], shares, stacklevel=3)
    ties, h = _tie_flags(x, out)
    values = torch.cat([flags, ties.to(flags.device)]).tolist()
    out = _anchor_checked(out, values[:3], coef.shape[0], shares, stacklevel=3)
    return _tie(x, out, h, values[3:], stacklevel=3)


@dataclass(kw_only=True)
class SSCResult(SSCSolution):
    """Output of :func:`sparse_subspace_clustering`: its solve
    (:class:`~videoanchor.anchor.program.SSCSolution`; ``timings``: ``lambdas``, ``factor``,
    ``admm``, ``spectral``, ``total``), ``labels`` (N,) int64 and ``label_draws`` (draws, N)
    int64, every label draw (row 0 is ``labels``)."""

    labels: torch.Tensor
    label_draws: torch.Tensor | None = None


@dataclass(kw_only=True)
class AnchorResult(SSCSolution):
    """Output of :func:`compute_anchor_scores`: its solve
    (:class:`~videoanchor.anchor.program.SSCSolution`; ``coef`` in the ``Y = Y C`` convention
    with ``Y = features.T``; ``timings``: ``lambdas``, ``factor``, ``admm``, ``spectral``,
    ``scores``, ``total``), ``scores`` (N,) float32 in [0, 1), ``labels`` (N,) int64 cluster
    ids (of the first label draw when ``label_draws > 1``), the ``mode`` that ran and the
    record of the cluster share that ran: ``cluster_share`` (``"steady"``, ``"paper"`` (the
    paper's ``pi_j``), ``"soft"`` or ``"expected"``), ``share_weight`` (the paper's share's
    weight in it: 1.0 for ``"paper"`` and ``"expected"``, 0.0 for ``"soft"``, the steady
    share's in [0, 1]) and
    ``share_stability`` (the steady share's stability ``z``, else None;
    :mod:`videoanchor.anchor.clustering`)."""

    scores: torch.Tensor
    labels: torch.Tensor
    mode: str = "exact"
    cluster_share: str = "paper"
    share_weight: float = 1.0
    share_stability: float | None = None


#: The SSC step of :func:`compute_anchor_scores` (``mode="exact"``) on its own
#: (:func:`ssc_coefficients`): it depends on the features and the SSC options only, not on
#: ``n_clusters`` or the seed; :func:`anchor_result_from_coefficients` finishes it.
SSCCoefficients = SSCSolution


def _shared(record: dict) -> dict:
    """:class:`AnchorResult`'s record of the cluster share from :func:`cluster`'s."""
    return dict(cluster_share=record["cluster_share"], share_weight=float(record["share_weight"]),
                share_stability=record.get("stability"))  # fmt: skip


def _sync(device: torch.device) -> None:
    """Wait for this stream's work on ``device`` (the stage timings): not the whole device,
    so that a server's decode queued on another stream is not waited for."""
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()


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
    authors' iteration; ``"fast"`` the authors' steps on a fixed
    schedule (see :func:`compute_anchor_scores`); ``"auto"`` picks ``"faithful"`` here.
    Why the default is not :func:`compute_anchor_scores`' (the working sets on the CPU):
    this is the clustering routine whose published figures (Extended Yale B clustering
    errors, ``benchmarks/bench_yaleb.py``) are reproduced against the authors' iterate, and
    it solves programs the working sets do not (``affine=False``, ``outliers=False``,
    ``data_term="exact"``); ``solver="workset"`` runs them on the method's program.

    ``data_term="exact"`` solves Elhamifar & Vidal's constrained outlier program instead,
    ``min ||C||_1 + gamma ||E||_1 s.t. Y = Y C + E, diag(C) = 0``, by their ADMM
    (:mod:`videoanchor.anchor.solvers.equality`; ``rho`` is their ``mu2``, which their face
    experiments set to ``alpha = 20``, with ``max_iter = 149`` and ``affine=False``). It
    needs ``outliers=True``, the torch backend and the faithful solver.

    ``label_draws``: label assignments drawn from the one spectral embedding (see
    :func:`compute_anchor_scores`); ``labels`` is the first, ``label_draws`` holds all.
    """
    t0 = time.perf_counter()
    given = SSCOptions.of(locals(), mode="exact")
    check_flag("affine", affine)
    check_flag("outliers", outliers)
    if data_term not in _DATA_TERMS:
        raise ValueError(f"data_term: expected one of {_DATA_TERMS}, got {data_term!r}")
    if affinity not in ("symmetric", "column_max"):
        raise ValueError(f"affinity: expected 'symmetric' or 'column_max', got {affinity!r}")
    if assign_labels not in ("discretize", "kmeans"):
        raise ValueError(f"assign_labels: expected 'discretize' or 'kmeans', got {assign_labels!r}")
    if data_term == "exact":
        unsupported = [msg for bad, msg in (
            (not outliers, "outliers=False (the constraint Y = Y C + E needs E)"),
            (given.backend == "cupy", "backend='cupy' (torch only)"),
            (given.solver not in ("auto", "faithful"), f"solver={given.solver!r} (faithful only)"),
        ) if bad]  # fmt: skip
        if unsupported:
            raise ValueError(
                "data_term='exact' (Elhamifar & Vidal's constrained outlier program) does "
                "not support " + "; ".join(unsupported)
            )
    opts, _, x = prepare_features(features, given)
    plan = make_plan(
        x.shape, x.device, opts, program=data_term, outliers=outliers, auto="faithful"
    )  # (the authors' iteration here)
    res = solve(x, plan, opts, affine=affine, outliers=outliers)
    t1 = time.perf_counter()
    draws, _, _ = cluster(
        res.coef,
        replace(opts, cluster_share="paper"),
        affinity=affinity,
        assign_labels=assign_labels,
    )  # (labels only)
    _sync(x.device)
    t2 = time.perf_counter()
    timings = dict(res.timings)
    timings["spectral"] = t2 - t1
    timings["total"] = t2 - t0
    return SSCResult(labels=draws[0], label_draws=draws,
                     **res.answer(backend=plan.backend, timings=timings))  # fmt: skip


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
    cluster_share: str = DEFAULTS.cluster_share,
    candidates=None,
    dark_tokens: str = DEFAULTS.dark_tokens,
) -> AnchorResult:
    """VideoAnchor scores of ``features`` (``N x D`` visual tokens of one request).

    SSC with the authors' model and parameters (docs/method.md section 2), spectral clustering
    into ``n_clusters`` (seeded), then the anchor score of section 3. Work happens on
    the features' device; ``scores`` (N,) float32 in [0, 1), ``labels`` (N,) int64 and
    ``coef`` (N, N) are returned there.

    ``solver``: ``"auto"`` (default) runs ``"workset"`` in exact mode on the CPU and on CUDA
    (its Triton working sets) with torch's backend, and ``"fast"`` instead where
    ``backend="cupy"`` or where an option only an iteration honours is set away from its
    default: ``rho``, ``max_iter``, ``precision`` (``"full"`` or ``"fp16x3"`` named
    explicitly) or a ``progress`` reporter's ``time_budget``
    (:func:`~videoanchor.anchor.plan.auto_solver`). A reporter without a budget changes
    nothing, and an ``eps`` away from its default is a ``ValueError`` wherever the solver that
    would run has no stopping test (``"workset"``, ``"fast"``): it is the faithful
    iteration's option. In blocked mode that ``mode="auto"`` chose (past ``N = 16384``, or
    where exact mode does not fit) ``"workset"``, and ``"auto"`` on a CPU, are the working
    sets by blocks (the certified minimiser, sparse ``C``:
    :mod:`~videoanchor.anchor.solvers.workset_blocks`, issue 99); in ``mode="blocked"`` asked
    for, ``"auto"`` is the authors' iteration. The other choices:
    ``"fast"`` (an approximation
    of the faithful answer: the authors' A-, E- and C-steps on a fixed schedule of 60
    iterations (``converged`` when it ran them all; a smaller ``max_iter`` cuts it short)
    with ``rho`` rebalanced by a continuous factor, the
    system factored once by an eigendecomposition; ``eps`` does not apply; no stopping test,
    so the scores are a continuous function of the features, see docs/ssc.md for its
    fidelity), ``"faithful"`` (the authors' iteration and stopping rule
    ``max_i sum_j |A - C|_ij < eps``, iterate for iterate, so the authors' answer; near that
    threshold a tiny change of the features can move the stopping iteration and the scores
    jump), ``"workset"`` (the program's minimiser itself, certified by a duality gap
    (``residual``), by working sets on the CPU: :func:`~videoanchor.anchor.solve_ssc_workset`;
    exact mode, one process; where ``C`` is dense the fast solver runs instead and
    ``solver`` of the result says ``"fast"``; ``solver="accelerated"``, an ADMM run towards
    the minimiser, was removed).

    ``precision`` (fast solver): ``"full"`` multiplies in the working dtype; ``"fp16x3"``
    runs the solver's dense products on float16 tensor cores at about float32 accuracy (each
    float32 operand scaled by a power of two and split into two float16 parts, three
    products accumulated in float32; emulated, three times slower, off CUDA). Float32,
    torch backend, exact mode. ``"auto"`` (default) is ``"fp16x3"`` where it runs natively
    (CUDA, compute capability 7.0 or later) and the rest allows it, else ``"full"``.

    ``mode``: ``"exact"`` (dense ``N x N`` SSC), ``"blocked"`` (the same exact program and
    iteration on ``block_columns`` columns of ``C`` at a time against all tokens, no
    ``N x N`` buffer, each block stopped by its own part of the authors' criterion; see
    :mod:`videoanchor.anchor.solvers.blocked`; ``block_eps="share"`` gives each block
    ``eps * b / N`` so that the assembled ``C`` meets the authors' criterion over all
    columns; ``coef`` is then a sparse COO tensor and the
    spectral step runs on the sparse affinity) or ``"auto"``: dense exact up to
    ``N = 16384`` tokens when it fits in memory, blocked above (the working sets by blocks
    under ``solver="auto"`` on a CPU, the authors' iteration on CUDA and under
    ``"faithful"``). (``mode="scalable"``
    and ``candidates``, an approximation, were removed: passing them is a ``ValueError``.)

    ``process_group``: a ``torch.distributed`` process group (any backend: gloo, NCCL).
    Every rank of the group must call this with features of the same shape; rank 0's
    features are used, and every rank returns the same ``AnchorResult`` (``timings`` are
    each rank's own; the clustering is computed once on rank 0 and broadcast, the scores
    from the same C and labels on every rank). The
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

    ``solver="faithful"`` with ``mode="exact"`` and ``backend="cupy"`` are a
    ``ValueError`` before any work.

    ``label_draws`` (beyond the paper): the default 1 is the paper's single random label
    assignment (the authors' scikit-learn call, seed-compatible). With ``R > 1``, ``R``
    assignments are drawn from the one spectral embedding (one random stream, the first
    draw being the default's) and each token's cluster share ``pi_j`` is averaged over
    them, so the scores depend much less on the seed; the embedding is computed once.

    ``cluster_share``: ``"steady"`` (default, beyond the paper:
    :func:`~videoanchor.anchor.clustering.steady_shares`), ``"paper"``, ``"soft"`` or
    ``"expected"`` (issue 100: the paper's share averaged over ``EXPECTED_DRAWS`` seeded label
    draws, each softened by its margins: :func:`~videoanchor.anchor.clustering.
    expected_shares_from_embedding`; nearer the expectation over the authors' unseeded draw
    than one draw, not continuous under rounding). The paper's
    ``pi_j`` (``"paper"``, formerly ``"hard"``) is its cluster's share of the tokens under the
    spectral labels; where the clustering at ``n_clusters`` is ill-posed, a 1e-7 relative
    change of the features (another engine's or device's rounding) flips the labels and
    moves the scores by up to 0.45 (docs/guides/anchor-scores.md). ``"steady"`` is the
    paper's share where the discretisation's decisions are far from a change (stability
    ``z``, the smallest decision margin over its path and its picks' alternatives times the
    eigengap at ``n_clusters``, at least 2e-5), :func:`~videoanchor.anchor.clustering.
    soft_cluster_shares` (a continuous function of ``C``, NOT the paper's share) where they
    are near one (``z`` at most 1e-5), blended between by a smoothstep in ``z``. The result
    records what ran (``cluster_share``, ``share_weight``, ``share_stability``). ``"soft"``
    needs exact mode; in blocked mode ``"steady"`` and ``"expected"`` run the paper's share
    (recorded as ``"paper"``). ``labels`` are the paper's labels in every case.

    ``dark_tokens``: ``mu_z`` where some tokens are near-black or constant (one warning
    names them): ``"authors"`` (default, their definition) or ``"ignore"`` (the least of the
    other tokens'; docs/ssc.md, "Dark tokens").

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
    if candidates is not None:
        raise ValueError(f"candidates: {REMOVED_SCALABLE}")
    given = SSCOptions.of(locals())
    opts, x, solved = prepare_features(features, given, process_group=process_group)
    plan = make_plan(solved.shape, solved.device, opts, process_group=process_group)
    res = solve(solved, plan, opts)
    t1 = time.perf_counter()
    draws, shares, record = cluster(res.coef, opts, group=plan.group, rank=plan.rank,
                                    sparse_steady=plan.route == "workset_blocks")  # fmt: skip
    _sync(x.device)
    t2 = time.perf_counter()
    scores = _scores_tied(x, res.coef, draws, shares)
    _sync(scores.device)
    t3 = time.perf_counter()
    timings = dict(res.timings)
    timings.update(spectral=t2 - t1, scores=t3 - t2, total=t3 - t0)
    return AnchorResult(scores=scores, labels=draws[0], mode=plan.mode, **_shared(record),
                        **res.answer(backend=plan.backend, timings=timings))  # fmt: skip


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
    dark_tokens: str = DEFAULTS.dark_tokens,
) -> SSCCoefficients:
    """Solve SSC on ``features`` (``N x D``) as :func:`compute_anchor_scores` does with
    ``mode="exact"`` (the authors' program, affine, with outliers), without clustering.

    ``compute_anchor_scores(x, k, mode="exact", ...)`` equals
    ``anchor_result_from_coefficients(ssc_coefficients(x, ...), k, seed=..., label_draws=...)``
    for the same options: the split lets a sweep over ``n_clusters`` solve SSC once.
    ``progress`` as in :func:`compute_anchor_scores`.
    """
    t0 = time.perf_counter()
    opts, _, x = prepare_features(features, SSCOptions.of(locals(), mode="exact"), min_tokens=1)
    plan = make_plan(x.shape, x.device, opts)
    res = solve(x, plan, opts)
    _sync(x.device)
    timings = dict(res.timings)
    timings["total"] = time.perf_counter() - t0
    return SSCCoefficients(**res.answer(backend=plan.backend, timings=timings))  # fmt: skip


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
    cluster_share: str = DEFAULTS.cluster_share,
) -> AnchorResult:
    """Spectral clustering of ``ssc.coef`` into ``n_clusters`` (seeded) and the anchor
    scores: the rest of :func:`compute_anchor_scores` after :func:`ssc_coefficients`.
    ``features``: the (N, D) tokens C was solved on; when given, identical tokens get
    identical scores as in :func:`compute_anchor_scores` (pass them for the same answer).
    ``cluster_share``: as in :func:`compute_anchor_scores`."""
    t0 = time.perf_counter()
    opts = SSCOptions(
        n_clusters=n_clusters, seed=seed, label_draws=label_draws, eigen_solver=eigen_solver,
        mode="exact", cluster_share=cluster_share,
    ).checked()  # fmt: skip
    check_tokens(opts.n_clusters, ssc.coef.shape[0])
    draws, shares, record = cluster(ssc.coef, opts)
    t1 = time.perf_counter()
    scores = anchor_scores(ssc.coef, draws, shares=shares)
    if features is not None:
        scores = tie_duplicate_scores(as_feature_tensor(features), scores)
    _sync(scores.device)
    t2 = time.perf_counter()
    timings = dict(ssc.timings)
    timings.update(spectral=t1 - t0, scores=t2 - t1, total=timings.get("total", 0.0) + t2 - t0)
    return AnchorResult(scores=scores, labels=draws[0], **_shared(record),
                        **ssc.answer(timings=timings))  # fmt: skip
