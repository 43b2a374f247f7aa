"""VideoAnchor as a vLLM plugin (entry point group ``vllm.general_plugins``).

Turned on per engine with ``additional_config={"videoanchor": {...}}`` (the option names and
defaults of :func:`videoanchor.configure`); without that key vLLM runs unchanged. Per request:
``SamplingParams(extra_args={"videoanchor": "off"})`` or
``extra_args={"videoanchor_alpha_k": 5.0, ...}`` (``vllm_xargs`` in the OpenAI API).
See docs/serving.md. This subpackage imports vLLM; nothing outside it does.
"""

from __future__ import annotations

import logging

__all__ = ["SUPPORTED_VLLM", "check_vllm_version", "register"]

#: vLLM versions the plugin is written and tested against: [low, high).
SUPPORTED_VLLM = ((0, 32, 0), (0, 33, 0))
logger = logging.getLogger("videoanchor.vllm")
_registered = False


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
            "(pip install 'videoanchor[vllm]') or start the engine without "
            "additional_config['videoanchor']"
        )


def _validate_at_startup(vllm_config) -> None:
    from videoanchor.integrations.vllm.config import engine_config

    if engine_config(vllm_config.additional_config) is not None:
        check_vllm_version()
        from videoanchor.integrations.vllm.families import check_family

        hf_config = getattr(vllm_config.model_config, "hf_config", None)
        check_family(getattr(hf_config, "model_type", None))
        from vllm.platforms import current_platform

        if not current_platform.is_cpu():
            raise NotImplementedError(
                "additional_config['videoanchor']: this version of the plugin anchors on "
                f"vLLM's CPU platform only (found {type(current_platform).__name__}); the "
                "CUDA backend (Triton paged kernels) is not wired yet. Start the engine "
                "without additional_config['videoanchor'] to serve unanchored"
            )


def register() -> None:
    """The plugin entry point; vLLM calls it in every process (front end, engine core,
    workers). Idempotent. It installs hooks that do nothing unless the engine's
    ``additional_config`` has a ``"videoanchor"`` key."""
    global _registered
    if _registered:
        return
    _registered = True
    import vllm

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
        _validate_at_startup(cfg)
        return cfg

    create_engine_config._videoanchor = True
    EngineArgs.create_engine_config = create_engine_config
