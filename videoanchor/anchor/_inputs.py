"""Stage 1 of an SSC call: the features validated once, before the plan
(:mod:`videoanchor.anchor.plan`). The options are checked in :mod:`videoanchor.anchor.options`."""

from __future__ import annotations

import math
import warnings
from dataclasses import replace

import numpy as np
import torch

from videoanchor.anchor.collective import _group, agree_across_ranks, share_features
from videoanchor.anchor.products import exact_float32


def as_feature_tensor(features, *, name: str = "features") -> torch.Tensor:
    """``features`` (a ``torch.Tensor`` or anything ``numpy.asarray`` takes) as a 2-D real
    floating tensor on its own device: TypeError for non-numeric input, ValueError for a wrong
    shape, an empty matrix or non-finite values."""
    if isinstance(features, torch.Tensor):
        x = features.detach()
    else:
        try:
            arr = np.asarray(features)
        except Exception as exc:  # pragma: no cover - exotic objects
            raise TypeError(
                f"{name}: expected a tensor or array, got {type(features).__name__}"
            ) from exc
        if arr.dtype == object or not (
            np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_
        ):
            raise TypeError(f"{name}: expected a numeric array, got dtype {arr.dtype}")
        x = torch.from_numpy(np.ascontiguousarray(arr))
    if x.is_complex():
        raise TypeError(f"{name}: expected real values, got dtype {x.dtype}")
    if x.dim() != 2:
        raise ValueError(
            f"{name}: expected a 2-D (N, D) matrix with one row per token, got shape {tuple(x.shape)}"
        )
    n, d = x.shape
    if n == 0 or d == 0:
        raise ValueError(f"{name}: expected at least one token and one feature, got shape {(n, d)}")
    if x.device.type == "meta":
        raise ValueError(
            f"{name}: expected a tensor holding values, got one on the 'meta' device (shape "
            f"only, no data); SSC needs the real features: materialise the model (load its "
            f"weights, e.g. without device_map='meta' / init_empty_weights) or pass features "
            f"computed on the CPU or a GPU"
        )
    if not x.is_floating_point():
        x = x.to(torch.float64)
    if not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).sum())
        raise ValueError(f"{name}: expected finite values, got {bad} NaN/Inf entries")
    return x


def warn_dominant_token(x: torch.Tensor, work: torch.dtype) -> None:
    """Warn, before the SSC, when one token's feature norm is more than ``1/sqrt(eps)`` of
    the working dtype times the median token's: its Gram entries dwarf the others', whose
    sparse codes are then lost in rounding (the ADMM typically runs all ``max_iter``)."""
    norms = torch.linalg.vector_norm(x.to(torch.float64), dim=1)
    nonzero = norms[norms > 0]
    if nonzero.numel() < 2:
        return  # no tokens, or all but one zero: the flat-score warning covers it
    median = float(nonzero.median())
    top = int(torch.argmax(norms))
    ratio = float(norms[top]) / median
    limit = 1.0 / math.sqrt(float(torch.finfo(work).eps))
    if ratio > limit:
        warnings.warn(
            f"features: token {top}'s feature norm ({float(norms[top]):.3g}) is {ratio:.3g} "
            f"times the median token's ({median:.3g}), beyond what SSC's working dtype "
            f"{str(work).replace('torch.', '')} resolves (1/sqrt(eps) = {limit:.3g}): the other "
            "tokens' sparse codes are lost in rounding and the SSC will likely run all max_iter "
            "iterations without converging. Rescale or drop that token (a dominant token), or "
            "pass dtype=torch.float64",
            UserWarning,
            stacklevel=3,
        )


def check_tokens(n_clusters: int, n: int) -> None:
    """Enough tokens for ``n_clusters`` clusters and for SSC (``n_clusters`` already checked)."""
    if n < n_clusters:
        raise ValueError(
            f"expected at least n_clusters = {n_clusters} tokens, got N = {n}; "
            "pass fewer clusters or more tokens"
        )
    if n < 2:
        raise ValueError(f"SSC needs at least 2 tokens, got N = {n}")


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


def prepare_features(features, given, *, min_tokens: int | None = None, process_group=None):
    """Stage 1 of an SSC call: ``(opts, x, solved)``, the options ``given``
    (:class:`~videoanchor.anchor.options.SSCOptions`) checked (``dtype=None`` on float64
    features: float64), the features validated once (:func:`as_feature_tensor`, at least
    ``min_tokens`` tokens, default ``n_clusters``; the dominant-token warning) and
    ``solved``, ``x`` PCA-reduced where ``pca_rank`` asks for it. Under a ``process_group``
    every rank reaches one collective before any raises (:func:`agree_across_ranks`), and
    rank 0's features are used on every rank."""
    opts, x, error = None, None, None
    try:
        opts = given.checked(distributed=process_group is not None)
        x = as_feature_tensor(features)
        check_tokens(opts.n_clusters if min_tokens is None else min_tokens, x.shape[0])
    except (TypeError, ValueError) as exc:
        if process_group is None:
            raise
        error = exc
    if process_group is not None:
        group, _, _ = _group(process_group)  # checks that it is an initialised process group
        fingerprint = given.as_dict(without=("progress",))
        fingerprint["features"] = None if x is None else (tuple(x.shape), str(x.dtype))
        agree_across_ranks(group, fingerprint, error)
        x = share_features(x, group)
    if given.dtype is None and x.dtype == torch.float64:  # float64 in, float64 C out
        opts = replace(opts, dtype=torch.float64)
    warn_dominant_token(x, opts.dtype)
    solved = pca_reduce(x, opts.pca_rank) if opts.pca_rank else x
    return opts, x, solved
