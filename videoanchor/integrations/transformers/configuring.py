"""Turning VideoAnchor on for a model: :func:`configure` (and :func:`check_options`, its
option check without a model), and the installation on every base VLM loaded with
``attn_implementation="videoanchor_triton"`` (:func:`maybe_install`, called after
transformers' ``post_init``). Installing makes the model's :class:`~.handle.AnchorHandle`
and its hooks (:mod:`.hooks`)."""

from __future__ import annotations

from dataclasses import replace

import torch

from videoanchor.integrations.options import AnchorConfig
from videoanchor.integrations.transformers.attention import ATTN_IMPLEMENTATION
from videoanchor.integrations.transformers.handle import (
    AnchorHandle,
    find_handle,
    validate_config,
)
from videoanchor.integrations.transformers.hooks import install, keep_vision_on_sdpa
from videoanchor.integrations.transformers.registry import get_family

__all__ = ["check_options", "configure", "maybe_install"]


def _is_base_vlm(m: torch.nn.Module) -> bool:
    """The module that owns the language model as a child (e.g. Qwen2VLModel, InternVLModel)."""
    return "language_model" in m._modules and hasattr(m, "config")


def _base_model(model: torch.nn.Module) -> torch.nn.Module | None:
    return next((m for m in model.modules() if _is_base_vlm(m)), None)


def _install_on(base: torch.nn.Module) -> AnchorHandle:
    spec = get_family(base.config)
    a_q, a_k, a_v = spec.default_alphas
    handle = AnchorHandle(
        base, spec, validate_config(AnchorConfig(alpha_q=a_q, alpha_k=a_k, alpha_v=a_v))
    )
    install(handle, base)
    base._videoanchor_handle_root = handle
    return handle


def maybe_install(model: torch.nn.Module) -> None:
    """Called after every PreTrainedModel.post_init: installs on a base VLM loaded with our name."""
    if "_videoanchor_handle_root" in model.__dict__ or not _is_base_vlm(model):
        return
    text_config = getattr(model.config, "text_config", None)
    if (
        text_config is None
        or getattr(text_config, "_attn_implementation", None) != ATTN_IMPLEMENTATION
    ):
        return
    _install_on(model)


_UNSET = object()


def check_options(**options) -> AnchorConfig:
    """Check :func:`configure`'s options without a model (the family's alphas stand in
    as the defaults): applications call it before loading a model. Returns the config
    those options give; raises TypeError / ValueError as :func:`configure` would."""
    unknown = sorted(set(options) - set(AnchorConfig.__dataclass_fields__))
    if unknown:
        raise TypeError(
            f"unexpected option(s) {unknown}; expected some of {sorted(AnchorConfig.__dataclass_fields__)}"
        )
    return validate_config(AnchorConfig(**options))


def configure(
    model: torch.nn.Module,
    *,
    enabled=_UNSET,
    alpha_q=_UNSET,
    alpha_k=_UNSET,
    alpha_v=_UNSET,
    n_clusters=_UNSET,
    decode=_UNSET,
    tokens=_UNSET,
    alpha_e=_UNSET,
    alpha_z=_UNSET,
    rho=_UNSET,
    eps=_UNSET,
    max_iter=_UNSET,
    pca_rank=_UNSET,
    seed=_UNSET,
    label_draws=_UNSET,
    cluster_share=_UNSET,
    ssc_backend=_UNSET,
    ssc_solver=_UNSET,
    ssc_dtype=_UNSET,
    ssc_precision=_UNSET,
    ssc_mode=_UNSET,
    attention_backend=_UNSET,
    process_group=_UNSET,
    ssc_progress=_UNSET,
    ssc_time_budget=_UNSET,
) -> AnchorHandle:
    """Configure VideoAnchor on a model loaded with ``attn_implementation="videoanchor_triton"``.

    Options not given keep their current value (the first call starts from the family's
    defaults in the registry and n_clusters=24, decode="prefill", tokens=("video", "image"),
    the authors' SSC parameters). Returns the model's :class:`AnchorHandle`.

    Args:
        model: the loaded VLM (``...ForConditionalGeneration`` or its base model).
        enabled: False turns anchoring off (plain attention) without reloading.
        alpha_q, alpha_k, alpha_v: gate strengths (docs/method.md section 4); alpha_q cancels in
            the softmax and is only validated. Must be >= -1 so that every gate stays positive.
        n_clusters: spectral clusters (lowered to the token count for tiny prompts).
        decode: "prefill" (paper: decode steps unanchored) or "all" (decode steps keep the
            prompt's visual gates).
        tokens: which placeholders are scored: ("video", "image"), ("video",) or ("image",).
        alpha_e, alpha_z, rho, eps, max_iter, pca_rank, seed, ssc_backend, ssc_dtype: passed
            to :func:`videoanchor.compute_anchor_scores` (``backend=ssc_backend``, ``dtype=ssc_dtype``).
        ssc_solver: ``solver`` of :func:`videoanchor.compute_anchor_scores`: ``"auto"``
            (default: the working sets on the CPU, the fast solver on CUDA), ``"workset"``,
            ``"fast"`` or ``"faithful"`` (the authors' iterate).
        ssc_precision: ``precision`` of :func:`videoanchor.compute_anchor_scores`: ``"auto"``
            (default: ``"fp16x3"`` on CUDA, else ``"full"``), ``"full"`` (the working dtype)
            or ``"fp16x3"`` (the fast solver's products on float16 tensor cores at about
            float32 accuracy; for CUDA).
        ssc_mode: ``mode`` of :func:`videoanchor.compute_anchor_scores`: ``"auto"`` (default:
            exact where the dense ``N x N`` problem fits, column-blocked above: the working
            sets by blocks on a CPU, the authors' iteration on CUDA or with
            ``ssc_solver="faithful"``),
            ``"exact"`` or ``"blocked"`` (the same program by column blocks with the authors'
            iteration, no ``N x N`` buffer; spread over the ranks of ``process_group``). An SSC in blocked
            mode bypasses ``handle.cache``, which keeps exact mode's dense C.
        label_draws: 1 (default, the paper's single random label draw) or R > 1: R label
            draws from one spectral embedding with the cluster shares averaged, for scores
            that depend much less on the seed (beyond the paper).
        cluster_share: "steady" (default, beyond the paper: the paper's cluster share where
            its labels are far from a change, a share continuous in the features where they
            are near one, so that another engine's or device's rounding does not move the
            scores: :mod:`videoanchor.anchor.clustering`, docs/guides/anchor-scores.md), "paper"
            (the paper's share, for exact reproduction; formerly "hard") or "soft" (beyond
            the paper: continuous everywhere, NOT the paper's scores:
            :func:`~videoanchor.anchor.clustering.soft_cluster_shares`).
        attention_backend: "auto" (Triton on CUDA, exact torch path on CPU), "triton" or "torch".
        process_group: the ranks that share one request's scores (tensor parallelism):
            "auto" (default) takes the "tp" group of the model's DTensor parameters when it
            was loaded with ``tp_plan``, else none; a ``torch.distributed.ProcessGroup``; or
            None (every process scores its own requests, e.g. data parallel). With a group
            every rank applies the same gates: rank 0 runs the dense SSC and sends the
            scores to the others (``last_result[b].coef`` is None there), or, where one
            process would take the blocked solver, its column blocks are divided among the
            ranks.

        ssc_progress: "auto" (default: a progress bar on a terminal, else log lines on the
            ``videoanchor.progress`` logger, once an SSC run lasts 5 s), True or False.
        ssc_time_budget: seconds, or None (default: run to ``eps`` or ``max_iter``, the
            paper). With a budget the SSC stops at the iterate reached when it runs out:
            NOT the paper's converged answer. Either way, an SSC that stops before ``eps``
            is reported with an :class:`~videoanchor.anchor.progress.SSCConvergenceWarning`
            naming the residual reached, ``eps`` and the iteration limit, and in
            ``handle.last_ssc_runs``.

    Raises TypeError for a model that is not a vision-language model (e.g. a plain module or
    a text-only LM), ValueError for an unsupported VLM family (both name the supported ones),
    a model not loaded with the videoanchor attention, or invalid options.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(
            f"model: expected a transformers model (torch.nn.Module), got {type(model).__name__}"
        )
    handle = find_handle(model)
    if handle is None:
        base = _base_model(model)
        if base is None:
            from videoanchor.integrations.transformers.registry import FAMILIES

            model_type = getattr(getattr(model, "config", None), "model_type", None)
            raise TypeError(
                "videoanchor.configure: expected a vision-language model of a supported family "
                f"(config.model_type one of {', '.join(sorted(FAMILIES))}), got "
                f"{type(model).__name__} ("
                + (f"model_type {model_type!r}" if model_type else "no transformers config")
                + ", no language_model inside)"
            )
        get_family(base.config)
        text_config = getattr(base.config, "text_config", base.config)
        if text_config._attn_implementation != ATTN_IMPLEMENTATION:
            raise ValueError(
                f"videoanchor: the language model uses attn_implementation="
                f"{text_config._attn_implementation!r}; load the model with "
                f"from_pretrained(..., attn_implementation={ATTN_IMPLEMENTATION!r}) or call "
                f"model.set_attn_implementation({ATTN_IMPLEMENTATION!r}) before configure()"
            )
        handle = _install_on(base)
    given = {
        k: v
        for k, v in dict(
            enabled=enabled,
            alpha_q=alpha_q,
            alpha_k=alpha_k,
            alpha_v=alpha_v,
            n_clusters=n_clusters,
            decode=decode,
            tokens=tokens,
            alpha_e=alpha_e,
            alpha_z=alpha_z,
            rho=rho,
            eps=eps,
            max_iter=max_iter,
            pca_rank=pca_rank,
            seed=seed,
            label_draws=label_draws,
            cluster_share=cluster_share,
            ssc_backend=ssc_backend,
            ssc_solver=ssc_solver,
            ssc_dtype=ssc_dtype,
            ssc_precision=ssc_precision,
            ssc_mode=ssc_mode,
            attention_backend=attention_backend,
            process_group=process_group,
            ssc_progress=ssc_progress,
            ssc_time_budget=ssc_time_budget,
        ).items()
        if v is not _UNSET
    }
    old = handle.config
    handle.config = validate_config(replace(old, **given))
    keep_vision_on_sdpa(handle)
    request = handle._request
    if (
        request is not None
        and (old.alpha_k, old.alpha_v) != (handle.config.alpha_k, handle.config.alpha_v)
        and handle.last_scores is not None
    ):
        # Called between the steps of a generate (decode="all"): the prompt's scores stay,
        # its gates follow the new strengths from the next step on.
        request.set_strengths(handle.last_scores, handle.config.alpha_k, handle.config.alpha_v)
    return handle
