"""Options of the vLLM plugin: the engine's ``additional_config["videoanchor"]`` and the
per-request ``SamplingParams.extra_args`` (``vllm_xargs`` in the OpenAI API).

Option names, defaults and checks are :func:`videoanchor.configure`'s
(:mod:`videoanchor.integrations.options`); nothing here re-implements them.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, fields, replace

from videoanchor.integrations.options import AnchorConfig, validate_options, validate_ssc_options

__all__ = [
    "ENGINE_KEYS",
    "REQUEST_KEYS",
    "engine_config",
    "request_config",
    "request_overrides",
    "salt_for",
]

# attention_backend, process_group, ssc_dtype, ssc_progress and ssc_time_budget are
# transformers-only (the engine picks its attention backend; one engine process scores its
# requests; SSC runs in the model dtype or float32 as compute_anchor_scores decides; the
# plugin does not wire SSC progress or a time budget yet, so it refuses them).
_NOT_FOR_VLLM = ("attention_backend", "process_group", "ssc_dtype", "ssc_progress",
                 "ssc_time_budget")  # fmt: skip
ENGINE_KEYS = tuple(f.name for f in fields(AnchorConfig) if f.name not in _NOT_FOR_VLLM)
#: Per-request keys: ``extra_args["videoanchor_<name>"]`` (flat, since ``vllm_xargs`` values
#: are scalars or lists), plus ``extra_args["videoanchor"]`` = "on" / "off".
REQUEST_KEYS = tuple(k for k in ENGINE_KEYS if k != "enabled")
_PREFIX = "videoanchor_"


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
    unknown = sorted(k for k in given if k not in ENGINE_KEYS)
    if unknown:
        raise ValueError(
            f"additional_config['videoanchor']: unknown option {unknown[0]!r}; expected some of "
            f"{', '.join(ENGINE_KEYS)}"
        )
    if "tokens" in given and isinstance(given["tokens"], list):
        given = {**given, "tokens": tuple(given["tokens"])}
    try:
        cfg = validate_options(AnchorConfig(**given))
        validate_ssc_options(cfg)
        return cfg
    except (TypeError, ValueError) as err:
        raise type(err)(f"additional_config['videoanchor']: {err}") from None


def request_overrides(extra_args) -> dict:
    """The videoanchor entries of one request's ``extra_args``, checked on their own (names,
    types, ranges). Returns ``{option: value}`` with ``enabled`` for "on"/"off". Raises
    ValueError naming the key: the front end turns it into that request's HTTP 400."""
    if not extra_args:
        return {}
    out: dict = {}
    for key, value in extra_args.items():
        if key == "videoanchor":
            if value not in ("on", "off"):
                raise ValueError(
                    f"extra_args['videoanchor']: expected 'on' or 'off', got {value!r}"
                )
            out["enabled"] = value == "on"
        elif key.startswith(_PREFIX):
            name = key[len(_PREFIX) :]
            if name not in REQUEST_KEYS:
                raise ValueError(
                    f"extra_args[{key!r}]: unknown videoanchor option {name!r}; expected "
                    f"videoanchor_<name> with name one of {', '.join(REQUEST_KEYS)}"
                )
            if name == "tokens" and isinstance(value, list):
                value = tuple(value)
            out[name] = value
    if out:
        try:
            validate_ssc_options(validate_options(replace(AnchorConfig(), **out)))
        except (TypeError, ValueError) as err:
            key = _key_of(err, out)
            raise ValueError(f"extra_args[{key!r}]: {err}") from None
    return out


def _key_of(err: Exception, out: dict) -> str:
    text = str(err)
    for name in out:
        if text.startswith(name):
            return "videoanchor" if name == "enabled" else _PREFIX + name
    return "videoanchor"


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
