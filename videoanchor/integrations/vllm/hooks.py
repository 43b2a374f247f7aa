"""Where the plugin attaches to vLLM (all no-ops on an engine without
``additional_config["videoanchor"]``):

- ``EngineArgs.create_engine_config``: validates the engine options at start-up (the error
  names the key) in the front-end process, before any engine process starts
  (:func:`.startup.validate_at_startup`);
- ``SamplingParams._verify_extra_args``: validates a request's videoanchor entries, so a bad
  value fails that request only (HTTP 400 in the OpenAI server);
- ``InputProcessor._validate_params``: holds a request to the operator's policy
  (``request_options``, ``request_limits``; HTTP 400 as well);
- the attention backend registry: CPU_ATTN -> :class:`.backend.VideoAnchorCPUBackend`;
  CUSTOM -> :class:`.backend_cuda.VideoAnchorCUDABackend`, which an anchored CUDA engine's
  config selects (:func:`.startup.select_cuda_backend`);
- ``EngineCore.preprocess_add_request``: checks the policy again and salts an anchored
  request's ``cache_salt`` before its block hashes are computed (prefix caching), in
  whatever process the engine core runs;
- the model runners: :mod:`.runner` (V1), :mod:`.runner_v2` (V2).
"""

from __future__ import annotations

import json

from videoanchor.integrations.vllm import metrics, startup
from videoanchor.integrations.vllm.config import (
    check_request,
    engine_config,
    engine_policy,
    request_config,
    request_overrides,
    runnable_problem,
    salt_for,
)
from videoanchor.integrations.vllm.patching import wrap_once


def admit_request(vllm_config, request) -> None:
    """Where an engine core admits ``request`` (an ``EngineCoreRequest``): refuses it
    (ValueError naming the key) when it breaks the operator's :class:`.config.RequestPolicy`
    (the front end refuses it first; this holds for any front end), and salts its
    ``cache_salt`` when the engine and the request are anchored and it carries multimodal
    items. A no-op on an unanchored engine."""
    eng, policy = _engine_options_of(vllm_config)
    if eng is None:
        return
    params = request.sampling_params
    extra = params.extra_args if params is not None else None
    check_admitted(eng, policy, extra)
    if not request.mm_features:
        return
    cfg = request_config(eng, extra)
    if cfg is not None:
        ids = [f.identifier for f in request.mm_features]
        request.cache_salt = salt_for(cfg, ids, request.cache_salt)


def check_admitted(eng, policy, extra_args) -> None:
    """Raises ValueError naming the ``extra_args`` key when a request breaks the operator's
    ``policy`` (:func:`.config.check_request`) or asks for what this server cannot run (an
    SSC backend that is not installed here: :func:`.config.runnable_problem`), so that it is
    refused before it is admitted, never failing in the engine."""
    check_request(policy, extra_args)
    cfg = request_config(eng, extra_args)
    if cfg is None:
        return
    from vllm.platforms import current_platform

    problem = runnable_problem(cfg, current_platform.is_cuda())
    if problem is not None:
        key = (
            "videoanchor_ssc_backend"
            if "videoanchor_ssc_backend" in (extra_args or {})
            else "videoanchor"
        )
        raise ValueError(f"extra_args[{key!r}]: {problem}")


def note_ahead(core, req) -> None:
    """Where an engine core has made the ``Request``: an anchored request with multimodal
    items is noted for scoring ahead of its step (:mod:`.ahead`, :mod:`.holds`), unless the operator turned
    ``scores_ahead`` off or the scheduler has no waiting queue the hold can use."""
    from videoanchor.integrations.vllm import holds
    from videoanchor.integrations.vllm.config import scores_ahead

    if not getattr(req, "mm_features", None) or req.sampling_params is None:
        return
    eng, _ = _engine_options_of(core.vllm_config)
    if eng is None or not scores_ahead(core.vllm_config.additional_config):
        return
    if request_config(eng, req.sampling_params.extra_args) is None:
        return
    waiting = getattr(getattr(core, "scheduler", None), "waiting", None)
    if not (hasattr(waiting, "remove_requests") and hasattr(waiting, "prepend_requests")):
        return
    holds.attach(core).note(req)


#: id(vllm_config) -> (vllm_config, engine options, request policy): parsed once per engine
#: (the config is kept alive with its entry, so the id is never reused).
_ENGINE_CFGS: dict[int, tuple] = {}


def _engine_options_of(vllm_config):
    entry = _ENGINE_CFGS.get(id(vllm_config))
    if entry is None or entry[0] is not vllm_config:
        extra = getattr(vllm_config, "additional_config", None)
        entry = (vllm_config, engine_config(extra), engine_policy(extra))
        _ENGINE_CFGS[id(vllm_config)] = entry
    return entry[1], entry[2]


def xargs_refusal(vllm_config, xargs) -> str | None:
    """Why an OpenAI server request's ``vllm_xargs`` are refused on this engine (a bad value,
    an option or limit of the operator's policy, a backend the server cannot run), or None.
    Asked before the chat's media are rendered: a request refused after rendering leaves
    vLLM's front-end media cache believing the engine holds its items (vLLM's "P0/P1 cache
    drift"), and the next request with the same video got an HTTP 500 once."""
    if not xargs or vllm_config is None:
        return None
    eng, policy = _engine_options_of(vllm_config)
    if eng is None:
        return None
    try:
        check_admitted(eng, policy, xargs)  # (the operator's limits first: a 10**6 list)
    except ValueError as err:
        return str(err)
    return None


async def front_end_refusal(vllm_config, xargs, raw_request) -> str | None:
    """Why the OpenAI server's front end refuses a request's ``vllm_xargs`` on this
    engine, or None: a JSON boolean first (:func:`json_boolean`: vLLM has already read
    ``true`` as 1, which :func:`xargs_refusal` would report as "got 1"), then
    :func:`xargs_refusal`."""
    if not xargs or vllm_config is None or _engine_options_of(vllm_config)[0] is None:
        return None
    why = await json_boolean(xargs, raw_request)
    return why if why is not None else xargs_refusal(vllm_config, xargs)


async def json_boolean(xargs, raw_request) -> str | None:
    """Why a request's ``vllm_xargs`` are refused for a JSON boolean, or None. vLLM reads a
    JSON ``true`` / ``false`` as 1 / 0 (its ``vllm_xargs`` type is str | int | float | list
    of them), so where a videoanchor entry is 0 or 1 the request's JSON is read again."""
    ours = {k: v for k, v in xargs.items() if str(k).startswith("videoanchor")}
    if raw_request is None or not any(v in (0, 1) for v in ours.values()):
        return None
    try:
        raw = (await raw_request.json()).get("vllm_xargs") or {}
    except Exception:  # (vLLM parsed the body: nothing more to find here)
        return None
    for key in ours:
        if isinstance(raw.get(key), bool):
            return (f"extra_args[{key!r}]: expected a number (or 'on' / 'off' for "
                    f"'videoanchor'), got the JSON boolean {json.dumps(raw[key])}")  # fmt: skip
    return None


#: The OpenAI server's endpoints whose requests carry ``vllm_xargs``: (module, class,
#: method). Anthropic's ``/v1/messages`` goes through the chat's method.
FRONT_ENDS = (
    ("vllm.entrypoints.openai.chat_completion.serving", "OpenAIServingChat",
     "create_chat_completion"),
    ("vllm.entrypoints.openai.completion.serving", "OpenAIServingCompletion",
     "create_completion"),
    ("vllm.entrypoints.openai.responses.serving", "OpenAIServingResponses",
     "create_responses"),
)  # fmt: skip


def _check_before_rendering() -> None:
    """Wraps the OpenAI server's endpoints (:data:`FRONT_ENDS`: ``/v1/chat/completions``,
    ``/v1/completions``, ``/v1/responses``) so that :func:`front_end_refusal` answers a
    refused request with HTTP 400 before its prompt and media are rendered, and reports a
    JSON boolean as what the client sent (vLLM has read it as 1 by then, and the checks
    where vLLM validates the request would say "got 1"). Those checks
    (``SamplingParams``, the ``InputProcessor``) still hold for every other front end."""
    import importlib

    for module, cls, method in FRONT_ENDS:
        try:
            serving = getattr(importlib.import_module(module), cls)
        except (ImportError, AttributeError):  # a vLLM without this endpoint
            continue

        def make(orig):
            async def create(self, request, raw_request=None, *args, **kwargs):
                vllm_config = getattr(getattr(self, "engine_client", None), "vllm_config", None)
                xargs = getattr(request, "vllm_xargs", None)
                why = await front_end_refusal(vllm_config, xargs, raw_request)
                if why is not None:
                    metrics.refused(why)
                    return self.create_error_response(why, param="extra_args")
                return await orig(self, request, raw_request, *args, **kwargs)

            return create

        wrap_once(serving, method, make)


def refuse_short_videos() -> None:
    """Wraps vLLM's ``VideoMediaIO.load_bytes`` so that, in the front end of an anchored
    engine, a video too short for the model is refused with a ValueError saying so (HTTP 400
    in the OpenAI server) instead of an HTTP 500: one that vLLM's loader cannot sample (its
    Qwen2-VL loader takes frames in pairs and divides by zero on a 1-frame video), counted in
    ``videoanchor_requests_refused{option="video"}`` (such a front end sets
    :data:`.startup.ANCHORED_FRONT_END`). An engine without
    ``additional_config["videoanchor"]`` keeps vLLM's behaviour."""
    try:
        from vllm.multimodal.media.video import VideoMediaIO
    except ImportError:  # another vLLM layout: vLLM's own behaviour
        return

    def make(orig):
        def load_bytes(self, data):
            try:
                return orig(self, data)
            except ZeroDivisionError as err:
                if not startup.ANCHORED_FRONT_END[0]:
                    raise
                loader = getattr(self.video_loader, "__name__", type(self.video_loader).__name__)
                metrics.count("videoanchor_requests_refused", option="video")
                raise ValueError(
                    f"video: expected a video long enough for this model, got one vLLM's "
                    f"{loader} cannot sample ({type(err).__name__}: {err}); a 1-frame video "
                    "is too short for a model that takes frames in pairs (the Qwen2-VL "
                    "family's temporal patch): send at least 2 frames"
                ) from None

        return load_bytes

    wrap_once(VideoMediaIO, "load_bytes", make)


def install() -> None:
    from vllm.engine.arg_utils import EngineArgs
    from vllm.sampling_params import SamplingParams
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend
    from vllm.v1.engine.core import EngineCore
    from vllm.v1.engine.input_processor import InputProcessor

    from videoanchor.integrations.vllm import holds, runner, runner_v2

    def make_create(orig):
        def create_engine_config(self, *args, **kwargs):
            cfg = orig(self, *args, **kwargs)
            startup.validate_at_startup(cfg)
            return cfg

        return create_engine_config

    wrap_once(EngineArgs, "create_engine_config", make_create)

    def make_verify(orig):
        def _verify_extra_args(self):
            orig(self)
            try:
                request_overrides(self.extra_args)
            except ValueError as err:
                from vllm.exceptions import VLLMValidationError

                metrics.refused(str(err))
                raise VLLMValidationError(str(err), parameter="extra_args") from None

        return _verify_extra_args

    wrap_once(SamplingParams, "_verify_extra_args", make_verify)

    # The operator's policy (which options a request may set, limits on its SSC work) needs
    # the engine's config, which SamplingParams does not see: checked where the front end
    # validates a request's params against its engine (an HTTP 400 in the OpenAI server).
    def make_validate(orig):
        def _validate_params(self, params, *args, **kwargs):
            out = orig(self, params, *args, **kwargs)
            extra = getattr(params, "extra_args", None)
            if extra:
                eng, policy = _engine_options_of(self.vllm_config)
                try:
                    if eng is not None:
                        check_admitted(eng, policy, extra)
                except ValueError as err:
                    from vllm.exceptions import VLLMValidationError

                    metrics.refused(str(err))
                    raise VLLMValidationError(str(err), parameter="extra_args") from None
            return out

        return _validate_params

    wrap_once(InputProcessor, "_validate_params", make_validate)
    _check_before_rendering()
    refuse_short_videos()

    register_backend(
        AttentionBackendEnum.CPU_ATTN,
        "videoanchor.integrations.vllm.backend.VideoAnchorCPUBackend",
    )
    # CUDA: CUSTOM is only ever selected by an anchored engine's config
    # (select_cuda_backend); register it in every process (the workers resolve it), unless
    # another plugin owns CUSTOM (an anchored engine then fails at start-up saying so).
    if not AttentionBackendEnum.CUSTOM.is_overridden():
        register_backend(AttentionBackendEnum.CUSTOM, startup.CUDA_BACKEND)

    # Prefix caching: an anchored request's blocks are salted by its options and items. The
    # salt goes onto the EngineCoreRequest in ``EngineCore.preprocess_add_request``, the one
    # place every engine core (in-process, spawned or forked EngineCoreProc, the API server's
    # engine process, each data-parallel engine) turns a request into the ``Request`` whose
    # block hashes it computes. The method is looked up per request, so patching the class
    # takes effect even when the plugin first loads inside ``EngineCore.__init__`` (a spawned
    # engine core loads its plugins there; wrapping ``__init__`` itself came too late).
    def make_preprocess(orig):
        def preprocess_add_request(self, request):
            admit_request(self.vllm_config, request)
            out = orig(self, request)
            note_ahead(self, out[0] if isinstance(out, tuple) else out)
            return out

        return preprocess_add_request

    wrap_once(EngineCore, "preprocess_add_request", make_preprocess)
    holds.install()
    runner.install()
    runner_v2.install()
