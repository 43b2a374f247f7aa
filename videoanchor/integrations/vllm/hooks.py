"""Where the plugin attaches to vLLM (all no-ops on an engine without
``additional_config["videoanchor"]``):

- ``EngineArgs.create_engine_config``: validates the engine options at start-up (the error
  names the key) in the front-end process, before any engine process starts;
- ``SamplingParams._verify_extra_args``: validates a request's videoanchor entries, so a bad
  value fails that request only (HTTP 400 in the OpenAI server);
- the attention backend registry: CPU_ATTN -> :class:`.backend.VideoAnchorCPUBackend`;
  CUSTOM -> :class:`.backend_cuda.VideoAnchorCUDABackend`, which an anchored CUDA engine's
  config selects (:func:`videoanchor.integrations.vllm.select_cuda_backend`);
- ``EngineCore``'s block hasher: salts an anchored request's ``cache_salt`` (prefix caching);
- the model runners: :mod:`.runner` (V1), :mod:`.runner_v2` (V2).
"""

from __future__ import annotations

from videoanchor.integrations.vllm.config import (
    engine_config,
    request_config,
    request_overrides,
    salt_for,
)


def _once(owner, name, make):
    orig = getattr(owner, name)
    if getattr(orig, "_videoanchor", False):
        return
    new = make(orig)
    new._videoanchor = True
    setattr(owner, name, new)


def install() -> None:
    from vllm.engine.arg_utils import EngineArgs
    from vllm.sampling_params import SamplingParams
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend
    from vllm.v1.engine.core import EngineCore

    from videoanchor.integrations.vllm import CUDA_BACKEND, _validate_at_startup, runner, runner_v2

    def make_create(orig):
        def create_engine_config(self, *args, **kwargs):
            cfg = orig(self, *args, **kwargs)
            _validate_at_startup(cfg)
            return cfg

        return create_engine_config

    _once(EngineArgs, "create_engine_config", make_create)

    def make_verify(orig):
        def _verify_extra_args(self):
            orig(self)
            try:
                request_overrides(self.extra_args)
            except ValueError as err:
                from vllm.exceptions import VLLMValidationError

                raise VLLMValidationError(str(err), parameter="extra_args") from None

        return _verify_extra_args

    _once(SamplingParams, "_verify_extra_args", make_verify)

    register_backend(
        AttentionBackendEnum.CPU_ATTN,
        "videoanchor.integrations.vllm.backend.VideoAnchorCPUBackend",
    )
    # CUDA: CUSTOM is only ever selected by an anchored engine's config
    # (select_cuda_backend); register it in every process (the workers resolve it), unless
    # another plugin owns CUSTOM (an anchored engine then fails at start-up saying so).
    if not AttentionBackendEnum.CUSTOM.is_overridden():
        register_backend(AttentionBackendEnum.CUSTOM, CUDA_BACKEND)

    def make_core_init(orig):
        def __init__(self, vllm_config, *args, **kwargs):
            orig(self, vllm_config, *args, **kwargs)
            eng = engine_config(vllm_config.additional_config)
            inner = self.request_block_hasher
            if eng is None or inner is None:
                return

            def hasher(request):
                if not getattr(request, "_videoanchor_salted", False):
                    request._videoanchor_salted = True
                    params = request.sampling_params
                    cfg = request_config(eng, params.extra_args if params else None)
                    if cfg is not None and request.mm_features:
                        ids = [f.identifier for f in request.mm_features]
                        request.cache_salt = salt_for(cfg, ids, request.cache_salt)
                return inner(request)

            self.request_block_hasher = hasher

        return __init__

    _once(EngineCore, "__init__", make_core_init)
    runner.install()
    runner_v2.install()
