"""Options of the vLLM plugin: the engine's ``additional_config["videoanchor"]`` and the
per-request ``SamplingParams.extra_args`` (``vllm_xargs`` in the OpenAI API).

Option names, defaults and checks are :func:`videoanchor.configure`'s
(:mod:`videoanchor.integrations.options`); nothing here re-implements them.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, fields, replace

from videoanchor.integrations.options import AnchorConfig, validate_options, validate_ssc_options

__all__ = [
    "ENGINE_KEYS",
    "POLICY_KEYS",
    "REQUEST_KEYS",
    "RequestPolicy",
    "check_request",
    "engine_config",
    "engine_policy",
    "request_config",
    "request_overrides",
    "ahead_nice",
    "ahead_split",
    "ahead_workers",
    "DEFAULT_REQUEST_OPTIONS",
    "replicate_encoder",
    "runnable_problem",
    "salt_for",
    "score_cache_bytes",
    "scores_ahead",
]

# attention_backend, process_group, ssc_dtype and ssc_progress are transformers-only (the
# engine picks its attention backend; one engine process scores its requests; SSC runs in the
# model dtype or float32 as compute_anchor_scores decides; the engine logs SSC itself).
# ssc_time_budget is too: a wall-clock bound stops the SSC at an iterate that depends on the
# machine's load, so a server's answers would; the plugin bounds the work instead
# (request_limits, whose max_iter is counted, not timed).
_NOT_FOR_VLLM = ("attention_backend", "process_group", "ssc_dtype", "ssc_progress",
                 "ssc_time_budget")  # fmt: skip
_WHY_NOT = {
    "ssc_time_budget": "the vLLM plugin bounds a request's SSC by counted work, never by wall "
    "time (an answer must not depend on the machine's load): set "
    "request_limits['max_iter'] and leave ssc_solver, rho and eps to the operator "
    "(the default request_options)",
}
ENGINE_KEYS = tuple(f.name for f in fields(AnchorConfig) if f.name not in _NOT_FOR_VLLM)
#: The operator's keys of ``additional_config["videoanchor"]`` that are not configure()
#: options: which options a request may set, and the limits on the costly ones
#: (:class:`RequestPolicy`).
POLICY_KEYS = (
    "request_options",
    "request_limits",
    "score_cache_mb",
    "scores_ahead",
    "scores_ahead_nice",
    "scores_ahead_split",
    "scores_ahead_workers",
    "replicate_encoder",
)
#: ``request_options`` default: what changes the method's output at a bounded cost (the
#: alphas, ``n_clusters`` under its limit, ``seed``, on/off, ``decode`` and which item kinds
#: are scored, ``tokens``). The solver, its mode, backend and
#: precision, ``rho``, ``eps`` and the other SSC options are the operator's unless
#: ``request_options`` opens them.
DEFAULT_REQUEST_OPTIONS = (
    "enabled",
    "alpha_q",
    "alpha_k",
    "alpha_v",
    "n_clusters",
    "seed",
    "decode",
    "tokens",
)
#: ``score_cache_mb`` default: MiB of anchor scores kept across requests (16k visual tokens
#: take 64 KiB), so repeated videos run no SSC (:func:`score_cache_bytes`).
SCORE_CACHE_MB = 64
#: Engine-only options (a request turns anchoring on or off with ``extra_args["videoanchor"]``).
_ENGINE_ONLY = ("enabled",)
#: Per-request keys: ``extra_args["videoanchor_<name>"]`` (flat, since ``vllm_xargs`` values
#: are scalars or lists), plus ``extra_args["videoanchor"]`` = "on" / "off".
REQUEST_KEYS = tuple(k for k in ENGINE_KEYS if k not in _ENGINE_ONLY)
_PREFIX = "videoanchor_"
#: ``request_limits`` keys: the largest ``max_iter`` / ``label_draws`` / ``n_clusters`` a
#: request may ask for, and the smallest ``eps``. Each defaults to the engine's own value, so
#: by default a request cannot make its SSC costlier than the engine's configuration.
LIMIT_KEYS = ("max_iter", "label_draws", "n_clusters", "eps", "tokens")
#: ``request_limits["tokens"]`` default: the most entries a request's ``videoanchor_tokens``
#: list may have ("video" and "image"); a longer list is refused before any other check.
TOKENS_LIMIT = 2


@dataclass(frozen=True)
class RequestPolicy:
    """What an anchored engine lets one request set (``additional_config["videoanchor"]``
    keys ``request_options`` and ``request_limits``).

    ``allowed``: the per-request option names a request may set ("enabled" is the
    ``extra_args["videoanchor"]`` on/off switch); ``request_options`` is a list of names,
    ``"all"`` or ``"none"`` (default :data:`DEFAULT_REQUEST_OPTIONS`). ``max_iter``,
    ``label_draws``, ``n_clusters``: the largest values a request may ask for; ``eps``: the
    smallest. Each limit defaults to the engine's own value, so a request's SSC work is
    bounded by counted iterations over its own visual tokens, never by wall time.
    ``tokens``: the most entries of a request's ``tokens`` list (default
    :data:`TOKENS_LIMIT`)."""

    allowed: frozenset
    max_iter: int
    label_draws: int
    n_clusters: int
    eps: float
    tokens: int = TOKENS_LIMIT


def engine_config(additional_config) -> AnchorConfig | None:
    """The engine's options, or None when ``additional_config`` has no ``"videoanchor"`` key
    (the plugin then changes nothing). Raises TypeError/ValueError naming the bad key."""
    if not additional_config or "videoanchor" not in additional_config:
        return None
    given = additional_config["videoanchor"]
    if not isinstance(given, dict):
        raise TypeError(
            "additional_config['videoanchor']: expected a dict of configure() options (e.g. "
            f'{{"alpha_k": 9.5, "n_clusters": 24}}), got {type(given).__name__}'
        )
    unknown = sorted(k for k in given if k not in ENGINE_KEYS + POLICY_KEYS)
    if unknown and unknown[0] in _WHY_NOT:
        raise ValueError(
            f"additional_config['videoanchor']: {unknown[0]!r} is not accepted: "
            f"{_WHY_NOT[unknown[0]]}"
        )
    if unknown:
        raise ValueError(
            f"additional_config['videoanchor']: unknown option {unknown[0]!r}; expected some of "
            f"{', '.join(ENGINE_KEYS + POLICY_KEYS)}"
        )
    given = {k: v for k, v in given.items() if k not in POLICY_KEYS}
    if "tokens" in given and isinstance(given["tokens"], list):
        given = {**given, "tokens": tuple(given["tokens"])}
    try:
        cfg = validate_options(AnchorConfig(**given))
        validate_ssc_options(cfg)
        return cfg
    except (TypeError, ValueError) as err:
        raise type(err)(f"additional_config['videoanchor']: {err}") from None


def engine_policy(additional_config) -> RequestPolicy | None:
    """The operator's :class:`RequestPolicy` of an anchored engine (None when the engine is
    not anchored). Raises TypeError/ValueError naming the bad key."""
    eng = engine_config(additional_config)
    if eng is None:
        return None
    given = additional_config["videoanchor"]
    where = "additional_config['videoanchor']"
    opts = given.get("request_options", list(DEFAULT_REQUEST_OPTIONS))
    names = REQUEST_KEYS + ("enabled",)
    if opts == "all":
        allowed = frozenset(names)
    elif opts == "none":
        allowed = frozenset()
    elif isinstance(opts, (list, tuple)) and all(isinstance(o, str) for o in opts):
        bad = [o for o in opts if o not in names]
        if bad:
            raise ValueError(
                f"{where}['request_options']: unknown option {bad[0]!r}; expected 'all', "
                f"'none' or a list of some of {', '.join(names)}"
            )
        allowed = frozenset(opts)
    else:
        raise TypeError(
            f"{where}['request_options']: expected 'all', 'none' or a list of option names, "
            f"got {opts!r}"
        )
    limits = given.get("request_limits", {})
    if not isinstance(limits, dict):
        raise TypeError(
            f"{where}['request_limits']: expected a dict with some of {', '.join(LIMIT_KEYS)}, "
            f"got {type(limits).__name__}"
        )
    unknown = sorted(k for k in limits if k not in LIMIT_KEYS)
    if unknown:
        raise ValueError(
            f"{where}['request_limits']: unknown limit {unknown[0]!r}; expected some of "
            f"{', '.join(LIMIT_KEYS)}"
        )
    score_cache_bytes(additional_config)
    scores_ahead(additional_config)
    ahead_nice(additional_config)
    ahead_split(additional_config)
    ahead_workers(additional_config)
    replicate_encoder(additional_config)
    tokens = limits.get("tokens", TOKENS_LIMIT)
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1:
        raise ValueError(
            f"{where}['request_limits']['tokens']: expected the most entries of a request's "
            f"videoanchor_tokens list (an int >= 1, default {TOKENS_LIMIT}), got {tokens!r}"
        )
    vals = {k: limits.get(k, getattr(eng, k)) for k in LIMIT_KEYS if k != "tokens"}
    try:  # the limits are values of the options they bound: the same checks
        validate_ssc_options(validate_options(replace(eng, **vals)))
    except (TypeError, ValueError) as err:
        raise type(err)(f"{where}['request_limits']: {err}") from None
    return RequestPolicy(allowed=allowed, tokens=tokens, **vals)


def score_cache_bytes(additional_config) -> int:
    """Bytes of the engine's score cache (``additional_config["videoanchor"]["score_cache_mb"]``,
    default :data:`SCORE_CACHE_MB`; 0 turns it off). Raises ValueError naming the key."""
    given = (additional_config or {}).get("videoanchor") or {}
    mb = given.get("score_cache_mb", SCORE_CACHE_MB) if isinstance(given, dict) else 0
    if isinstance(mb, bool) or not isinstance(mb, (int, float)) or not 0 <= mb < 2**20:
        raise ValueError(
            "additional_config['videoanchor']['score_cache_mb']: expected MiB of scores to keep "
            f"across requests (a number >= 0; 0 turns the cache off), got {mb!r}"
        )
    return int(mb * 2**20)


def scores_ahead(additional_config) -> bool:
    """Whether the engine computes a request's scores ahead of its step, beside the running
    requests (``additional_config["videoanchor"]["scores_ahead"]``, default True; False runs
    the SSC inside the step that first reaches the request's visual tokens, stalling the
    batch). Raises TypeError naming the key."""
    given = (additional_config or {}).get("videoanchor") or {}
    value = given.get("scores_ahead", True) if isinstance(given, dict) else True
    if not isinstance(value, bool):
        raise TypeError(
            "additional_config['videoanchor']['scores_ahead']: expected true (score requests "
            f"beside the running steps) or false (inside the step), got {value!r}"
        )
    return value


def ahead_nice(additional_config) -> int:
    """Niceness of the side thread that computes scores ahead, on Linux
    (``additional_config["videoanchor"]["scores_ahead_nice"]``, 0 to 19, default 19: the
    running requests' steps come first, the SSC takes the cores' idle time; lower it where
    the cores are saturated and new requests' first tokens matter more). Raises ValueError
    naming the key."""
    given = (additional_config or {}).get("videoanchor") or {}
    value = given.get("scores_ahead_nice", 19) if isinstance(given, dict) else 19
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 19:
        raise ValueError(
            "additional_config['videoanchor']['scores_ahead_nice']: expected a niceness from 0 "
            f"to 19 for the side thread that computes scores (default 19), got {value!r}"
        )
    return value


def ahead_split(additional_config) -> bool:
    """Whether, under tensor parallelism, each request's SSC ahead of its step is split over
    the tensor-parallel ranks (``additional_config["videoanchor"]["scores_ahead_split"]``,
    default False: each request is scored on one rank and its scores relayed to the others,
    so that concurrent requests are scored on different ranks without communication; True
    splits the fast solver's columns over every rank through a gloo group of the workers, so
    that one request's scores, and its first token, come sooner). Raises TypeError naming
    the key."""
    given = (additional_config or {}).get("videoanchor") or {}
    value = given.get("scores_ahead_split", False) if isinstance(given, dict) else False
    if not isinstance(value, bool):
        raise TypeError(
            "additional_config['videoanchor']['scores_ahead_split']: expected true (split each "
            "request's SSC over the tensor-parallel ranks) or false (one rank per request, "
            f"the default), got {value!r}"
        )
    return value


def ahead_workers(additional_config) -> int:
    """Side threads that compute scores ahead
    (``additional_config["videoanchor"]["scores_ahead_workers"]``, default 2). A new video
    never waits for a longer job to end: the jobs run side by side, and the one with the
    least counted work computes while the others wait at their next iteration
    (:class:`.worker_queue.Turns`); with every thread busy, the least work starts first. Raises
    ValueError naming the key."""
    given = (additional_config or {}).get("videoanchor") or {}
    value = given.get("scores_ahead_workers", 2) if isinstance(given, dict) else 2
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 64:
        raise ValueError(
            "additional_config['videoanchor']['scores_ahead_workers']: expected an int from 1 "
            f"to 64 (side threads computing scores ahead; default 2), got {value!r}"
        )
    return value


def replicate_encoder(additional_config) -> bool:
    """Whether an anchored tensor-parallel engine runs its vision encoder replicated on every
    rank (vLLM's ``mm_encoder_tp_mode="data"``, where the model supports it) instead of
    sharded (``additional_config["videoanchor"]["replicate_encoder"]``, default True). A
    sharded encoder's features differ from one worker's by about 1e-8 (relative), and the
    spectral labels can flip under such a change (docs/serving.md); replicated, each
    request's SSC reads bitwise the features one worker would. Raises TypeError naming the
    key."""
    given = (additional_config or {}).get("videoanchor") or {}
    value = given.get("replicate_encoder", True) if isinstance(given, dict) else True
    if not isinstance(value, bool):
        raise TypeError(
            "additional_config['videoanchor']['replicate_encoder']: expected true (the vision "
            "encoder replicated on every tensor-parallel rank: the SSC reads one worker's "
            f"features) or false (sharded, vLLM's default), got {value!r}"
        )
    return value


def runnable_problem(cfg: AnchorConfig, cuda: bool) -> str | None:
    """Why this server cannot run ``cfg``'s SSC (None: it can): ``ssc_backend="cupy"``
    needs CuPy installed and a CUDA platform. ``cuda``: the engine's platform is CUDA."""
    if cfg.ssc_backend != "cupy":
        return None
    if not cuda:
        return "ssc_backend='cupy' runs on a CUDA engine only; this engine is not one"
    import importlib.util

    if importlib.util.find_spec("cupy") is None:
        return "ssc_backend='cupy' needs CuPy, which is not installed on this server"
    return None


def check_request(policy: RequestPolicy | None, extra_args) -> None:
    """Raises ValueError naming the ``extra_args`` key when one request sets an option the
    operator's ``policy`` does not allow, or asks for more SSC work than its limits (checked
    in the front end, so the request gets an HTTP 400, and again where the engine core
    admits it). A no-op on an unanchored engine."""
    if policy is None:
        return
    key = _PREFIX + "tokens"
    tokens = (extra_args or {}).get(key)
    if isinstance(tokens, (list, tuple)) and len(tokens) > policy.tokens:
        raise ValueError(  # before any other work on the list (a client may send 10**6)
            f"extra_args[{key!r}]: expected at most {policy.tokens} entries (some of 'video', "
            f"'image') on this server, got a list of {len(tokens)} (the operator raises it with "
            "additional_config['videoanchor']['request_limits']['tokens'])"
        )
    over = request_overrides(extra_args)
    for name, value in over.items():
        key = "videoanchor" if name == "enabled" else _PREFIX + name
        if name not in policy.allowed:
            allowed = ", ".join(sorted(policy.allowed)) or "none"
            raise ValueError(
                f"extra_args[{key!r}]: this server does not let requests set {name!r} "
                f"(additional_config['videoanchor']['request_options'] allows: {allowed})"
            )
        if name in ("max_iter", "label_draws", "n_clusters") and value > getattr(policy, name):
            raise ValueError(
                f"extra_args[{key!r}]: expected at most {getattr(policy, name)} on this server, "
                f"got {value!r} (the operator raises it with additional_config['videoanchor']"
                f"['request_limits']['{name}'])"
            )
        if name == "eps" and value < policy.eps:
            raise ValueError(
                f"extra_args[{key!r}]: expected at least {policy.eps} on this server, got "
                f"{value!r} (the operator lowers it with additional_config['videoanchor']"
                "['request_limits']['eps'])"
            )


#: The most characters of a request's value an error message repeats
#: (:func:`shown`): a client's 10**6-entry list must not come back as a 5 MB error body.
SHOWN_CHARS = 80


def shown(value) -> str:
    """``repr(value)`` for an error message, bounded: a list, tuple or dict of more than 8
    entries as its type, length and first entries; any repr past :data:`SHOWN_CHARS`
    characters cut there, with its length."""
    if isinstance(value, (list, tuple, dict)) and len(value) > 8:
        first = list(value)[:3]
        return (f"a {type(value).__name__} of {len(value)} entries "
                f"({', '.join(shown(v) for v in first)}, ...)")  # fmt: skip
    text = repr(value)
    if len(text) > SHOWN_CHARS:
        return f"{text[:SHOWN_CHARS]}... ({len(text)} characters)"
    return text


def _scalar(key: str, value) -> None:
    """A per-request option other than ``tokens`` takes one value: refuse a list (vLLM's
    ``vllm_xargs`` admits lists of scalars) or a long string before any check repeats it."""
    if isinstance(value, (list, tuple, dict)) or (
        isinstance(value, str) and len(value) > SHOWN_CHARS
    ):  # fmt: skip
        raise ValueError(
            f"extra_args[{shown(key)}]: expected one value (a number, a bool or a short "
            f"string), got {shown(value)}"
        )


def request_overrides(extra_args) -> dict:
    """The videoanchor entries of one request's ``extra_args``, checked on their own (names,
    types, ranges). Returns ``{option: value}`` with ``enabled`` for "on"/"off". Raises
    ValueError naming the key: the front end turns it into that request's HTTP 400."""
    if not extra_args:
        return {}
    out: dict = {}
    for key, value in extra_args.items():
        if key == "videoanchor":
            if isinstance(value, bool) or value not in ("on", "off"):
                raise ValueError(
                    f"extra_args['videoanchor']: expected 'on' or 'off', got {shown(value)}"
                )
            out["enabled"] = value == "on"
        elif key.startswith(_PREFIX):
            name = key[len(_PREFIX) :]
            if name not in REQUEST_KEYS:
                raise ValueError(
                    f"extra_args[{shown(key)}]: unknown videoanchor option {shown(name)}; "
                    f"expected videoanchor_<name> with name one of {', '.join(REQUEST_KEYS)}"
                )
            if name == "tokens" and isinstance(value, list):
                value = tuple(value)
            elif name != "tokens":
                _scalar(key, value)
            out[name] = value
    # each key alone first, so the error names the key that is wrong; then together (a
    # combination the options refuse names every key the request set)
    for group in [*({n: v} for n, v in out.items()), out] if out else []:
        try:
            validate_ssc_options(validate_options(replace(AnchorConfig(), **group)))
        except (TypeError, ValueError) as err:
            keys = ", ".join(f"extra_args[{'videoanchor' if n == 'enabled' else _PREFIX + n!r}]"
                             for n in group)  # fmt: skip
            why = str(err)  # bounded: a check may repeat a long value (a tokens list)
            if len(why) > 4 * SHOWN_CHARS:
                why = f"{why[: 4 * SHOWN_CHARS]}... ({len(why)} characters)"
            raise ValueError(f"{keys}: {why}") from None
    return out


def request_config(engine: AnchorConfig | None, extra_args) -> AnchorConfig | None:
    """The options in force for one request: the engine's, overridden by its extra_args.
    None when anchoring is off for it (engine not configured, or "off")."""
    if engine is None:
        return None
    over = request_overrides(extra_args)
    cfg = validate_options(replace(engine, **over)) if over else engine
    return cfg if cfg.enabled else None


def salt_for(cfg: AnchorConfig, identifiers: list[str], salt: str | None) -> str:
    """A prefix-cache salt for an anchored request. The gates of every visual token come
    from one joint SSC over all the request's items, and from layer 1 on its KV depends on
    them: requests may share blocks only with the same options AND the same items."""
    opts = {k: v for k, v in asdict(cfg).items() if k in ENGINE_KEYS}
    blob = json.dumps([opts, list(identifiers)], sort_keys=True, default=str)
    digest = hashlib.sha256(blob.encode()).hexdigest()[:32]
    return f"{salt or ''}|videoanchor:{digest}"


def refuse_unsupported_attention(backend: str, cache_dtypes: tuple[str, ...], *, alibi_slopes,
                                 sliding_window, logits_soft_cap, sinks, kv_cache_dtype,
                                 kv_sharing_target_layer_name, **more) -> None:  # fmt: skip
    """Raises NotImplementedError naming every decoder-attention feature an anchored
    ``backend`` impl does not implement (``more``: name -> whether it is in use)."""
    unsupported = {
        "alibi_slopes": alibi_slopes is not None,
        "sliding_window": sliding_window is not None,
        "logits_soft_cap": bool(logits_soft_cap),
        "sinks": sinks is not None,
        f"kv_cache_dtype={kv_cache_dtype!r}": kv_cache_dtype not in cache_dtypes,
        "kv_sharing_target_layer_name": kv_sharing_target_layer_name is not None,
        **more,
    }
    bad = [k for k, v in unsupported.items() if v]
    if bad:
        raise NotImplementedError(
            f"videoanchor's vLLM {backend} backend: expected plain decoder self-attention, got "
            f"{', '.join(bad)}; start the engine without additional_config['videoanchor']"
        )
