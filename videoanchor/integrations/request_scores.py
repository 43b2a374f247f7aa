"""One request's anchor scores, whichever engine runs the model: the SSC call on its visual
features and the one text said when that SSC stops before ``eps``.

The transformers integration scores each sample of a prefill here
(:mod:`videoanchor.integrations.transformers.scoring`), the vLLM plugin each request
(:mod:`videoanchor.integrations.vllm.scoring`): the same
:func:`~videoanchor.anchor.compute_anchor_scores` call with the options of
:class:`~videoanchor.integrations.options.AnchorConfig`, so that an option means the same SSC
in either engine, and the same words for a run that did not converge
(:func:`unconverged_message`). Each engine says where the text goes: the transformers
integration warns (:class:`~videoanchor.anchor.progress.SSCConvergenceWarning`, the
default), the vLLM plugin logs it naming the request. Imports no engine.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING

import torch

from videoanchor.anchor.progress import SSCConvergenceWarning, SSCProgress, SSCRunSummary
from videoanchor.integrations.options import AnchorConfig, ssc_kwargs

if TYPE_CHECKING:
    from videoanchor.anchor import AnchorResult

__all__ = ["compute_scores", "score_request", "stored_run", "unconverged_message"]


def compute_scores(
    features: torch.Tensor, n_clusters: int, options: AnchorConfig, *, progress, **spread_over
) -> AnchorResult:
    """``compute_anchor_scores(features, n_clusters, **ssc_kwargs(options), progress=progress,
    **spread_over)``: the SSC of one request (``spread_over``: ``process_group=`` where the
    ranks of a group share it). Looked up in :mod:`videoanchor.anchor` at each call, where
    tests and tools observe it."""
    from videoanchor.anchor import compute_anchor_scores

    return compute_anchor_scores(
        features, n_clusters, **ssc_kwargs(options), progress=progress, **spread_over
    )


def score_request(
    features: torch.Tensor,
    n_clusters: int,
    options: AnchorConfig,
    *,
    progress: SSCProgress | None = None,
    process_group=None,
    solve: Callable[[Callable[..., AnchorResult]], AnchorResult] | None = None,
    subject: str | None = None,
    max_iter_setting: str = "max_iter",
    warn: Callable[[str], object] | None = None,
) -> tuple[AnchorResult, SSCRunSummary | None]:
    """The anchor scores of one request's (or sample's) visual tokens, ``features`` (N, D),
    with ``n_clusters`` clusters and ``options``' SSC options: ``(result, run)``, the
    :class:`~videoanchor.anchor.AnchorResult` and the
    :class:`~videoanchor.anchor.progress.SSCRunSummary` of the SSC that ran for it in this
    process (None where none ran: a stored result, or one relayed from another rank).

    ``progress``: the :class:`~videoanchor.anchor.progress.SSCProgress` the solver reports
    to (None: a silent one). ``process_group``: the ranks that all call this at once with the
    same features and share the SSC's columns. ``solve(compute)``: how the engine gets the
    result instead of ``compute()``, where ``compute(**spread_over)`` is
    :func:`compute_scores` on these features (e.g. from a store, or shared over a group).

    A result that did not converge is said once, by :func:`unconverged_message` (naming
    ``subject`` and ``max_iter_setting``), through ``warn`` (None: an
    :class:`~videoanchor.anchor.progress.SSCConvergenceWarning`)."""
    reporter = SSCProgress(enabled=False) if progress is None else progress
    before = len(reporter.runs)
    compute = partial(compute_scores, features, n_clusters, options, progress=reporter)
    if solve is not None:
        result = solve(compute)
    elif process_group is not None:
        result = compute(process_group=process_group)
    else:
        result = compute()
    run = reporter.runs[-1] if len(reporter.runs) > before else None
    if not result.converged:
        text = unconverged_message(result, options, run, subject=subject,
                                   max_iter_setting=max_iter_setting)  # fmt: skip
        if warn is None:
            warnings.warn(text, SSCConvergenceWarning, stacklevel=2)
        else:
            warn(text)
    return result, run


def stored_run(result: AnchorResult, options: AnchorConfig, tokens: int) -> SSCRunSummary:
    """The :class:`~videoanchor.anchor.progress.SSCRunSummary` of a result no SSC computed
    now (taken from a store): how that run ended, as the result says it (0 seconds, never
    stopped by a time budget: a budget-stopped result is not stored)."""
    return SSCRunSummary(
        converged=bool(result.converged), iterations=int(result.iterations),
        residual=float(result.residual), best_residual=float(result.residual),
        eps=float(options.eps), max_iter=int(options.max_iter), seconds=0.0,
        stopped_by_budget=False, tokens=tokens,
    )  # fmt: skip


def unconverged_message(
    result: AnchorResult,
    options: AnchorConfig,
    run: SSCRunSummary | None = None,
    *,
    subject: str | None = None,
    max_iter_setting: str = "max_iter",
) -> str:
    """The one line that says an SSC stopped before ``eps``: ``subject`` (e.g. ``"request
    7"``), its visual tokens, solver and ``rho``, what stopped it (its iteration limit, or the
    time budget when ``run`` says so) after how many iterations, the residual reached against
    ``eps``, that the scores come from that iterate (all 0 where they are), and what to raise:
    ``max_iter_setting`` (where the engine takes ``max_iter``) or ``ssc_time_budget``."""
    it = int(result.iterations)
    if run is not None and run.stopped_by_budget:
        how = f"was stopped by its time budget after {it} iterations"
        advice = "raise ssc_time_budget (None: no budget)"
    else:
        limit = options.max_iter if run is None else run.max_iter
        how = f"reached its iteration limit, max_iter={limit}, after {it} iterations"
        advice = f"raise {max_iter_setting}"
    residual, eps = float(result.residual), float(options.eps)
    below = (
        " (below eps only at the last iteration, before the solver's stopping test, which "
        "also needs an outlier-term update, could confirm it)"
        if residual < eps
        else ""
    )
    flat = "" if bool(result.scores.any()) else " (every score is 0: unanchored)"
    who = "" if subject is None else f"{subject}: "
    return (
        f"videoanchor: {who}SSC over {result.scores.numel()} visual tokens ({result.solver} "
        f"solver, rho {options.rho:g}) {how} at residual {residual:.3g} vs eps {eps:.3g}"
        f"{below}: NOT converged, its scores come from the iterate reached, not from the "
        f"paper's converged solution{flat}; {advice} for the paper's answer"
    )
