"""VideoAnchor as a vLLM plugin (entry point group ``vllm.general_plugins``).

Turned on per engine with ``additional_config={"videoanchor": {...}}`` (the option names and
defaults of :func:`videoanchor.configure`); without that key vLLM runs unchanged. Per request:
``SamplingParams(extra_args={"videoanchor": "off"})`` or
``extra_args={"videoanchor_alpha_k": 5.0, ...}`` (``vllm_xargs`` in the OpenAI API).
See docs/serving.md. This subpackage imports vLLM; nothing outside it does.

:func:`add_score_observer` / :func:`remove_score_observer` (from :mod:`.state`) let code in
the process that runs the model see each request's anchor scores as the plugin computes
them (e.g. to log them, or to compare them with another engine's), without touching the
plugin's internals; with no observer registered the runner does no extra work.

:func:`register_family` / :func:`unregister_family` (from :mod:`.families`) add a model
family the plugin does not know to the families it anchors (a :class:`Family`, keyed by
``config.model_type``), or take one out.

:data:`SUPPORTED_VLLM`, :func:`check_vllm_version`, :func:`select_cuda_backend` and
:data:`CUDA_BACKEND` come from :mod:`.startup`, the engine's start-up checks.
"""

from __future__ import annotations

import logging

from videoanchor.integrations.vllm.families import Family, register_family, unregister_family
from videoanchor.integrations.vllm.startup import (
    CUDA_BACKEND,
    SUPPORTED_VLLM,
    check_vllm_version,
    select_cuda_backend,
    validate_at_startup,
)
from videoanchor.integrations.vllm.state import add_score_observer, remove_score_observer

__all__ = [
    "CUDA_BACKEND",
    "SUPPORTED_VLLM",
    "Family",
    "add_score_observer",
    "check_vllm_version",
    "register",
    "register_family",
    "remove_score_observer",
    "select_cuda_backend",
    "unregister_family",
]

logger = logging.getLogger("videoanchor.vllm")
_registered = False


class _ThroughVllm(logging.Handler):
    """Hands the package's records to vLLM's own handlers, so they read like vLLM's lines
    (its format, level and stream). vLLM sets its handlers up lazily, after the plugin
    loads, so they are looked up per record. Where the application configured the root
    logger, the records reach it by propagation instead, and this handler stays quiet."""

    def emit(self, record: logging.LogRecord) -> None:
        if logging.getLogger().handlers:
            return
        handlers = logging.getLogger("vllm").handlers
        if not handlers:
            logging.lastResort.handle(record)
            return
        for handler in handlers:
            if record.levelno >= handler.level:
                handler.handle(record)


def _route_logs_through_vllm() -> None:
    """In a vLLM process, the ``videoanchor`` logger (this plugin, SSC progress, warnings)
    logs INFO and above through vLLM's handlers (:class:`_ThroughVllm`), unless the user gave
    it handlers or a level of their own; the ``warnings.warn`` of videoanchor's code (and any
    warning raised while a request is scored) go to it (:func:`.metrics.route_warnings`)."""
    from videoanchor.integrations.vllm.metrics import route_warnings

    route_warnings()
    ours = logging.getLogger("videoanchor")
    if ours.handlers:  # ours already added, or the user's own
        return
    ours.addHandler(_ThroughVllm())
    if ours.level == logging.NOTSET:
        ours.setLevel(logging.INFO)


def register() -> None:
    """The plugin entry point; vLLM calls it in every process (front end, engine core,
    workers). Idempotent. It installs hooks that do nothing unless the engine's
    ``additional_config`` has a ``"videoanchor"`` key."""
    global _registered
    if _registered:
        return
    _registered = True
    import vllm

    _route_logs_through_vllm()
    try:
        check_vllm_version(vllm.__version__)
    except RuntimeError as err:
        # Not fatal here (the plugin loads in every vLLM process, configured or not); an
        # engine asking for videoanchor fails at start-up with this message instead.
        logger.warning("%s", err)
        _install_startup_check_only()
        return
    from videoanchor.integrations.vllm import hooks

    hooks.install()


def _install_startup_check_only() -> None:
    from vllm.engine.arg_utils import EngineArgs

    orig = EngineArgs.create_engine_config
    if getattr(orig, "_videoanchor", False):
        return

    def create_engine_config(self, *args, **kwargs):
        cfg = orig(self, *args, **kwargs)
        validate_at_startup(cfg)
        return cfg

    create_engine_config._videoanchor = True
    EngineArgs.create_engine_config = create_engine_config
