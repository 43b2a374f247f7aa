"""Reuse of the work that does not depend on the anchoring strengths: an on-disk cache.

What a request computes, and what it depends on:

- the vision encoder's output (``get_image_features`` / ``get_video_features``, what
  transformers' ``generate`` hands the model as ``mm_encoder_outputs``): the pixel inputs
  and the model;
- SSC's coefficient matrix C: those features and the SSC options;
- the cluster labels and the scores: C, ``n_clusters``, the seed and the label draws;
- the language model's pass: everything, the alphas included.

:class:`AnchorCache` keeps the first three, in memory and (with a directory) on disk, keyed by
a SHA-256 of their content and options. :meth:`AnchorCache.encode` turns processor inputs into
inputs that carry ``mm_encoder_outputs`` instead of pixels, running the vision encoder only on
a miss; set ``handle.cache = cache`` and the handle asks :meth:`AnchorCache.anchor_result`
instead of running SSC. Files are written atomically (a temporary file, then a rename), so an
interrupted run leaves only whole entries.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import inspect
import numbers
import os
import tempfile
from collections import OrderedDict
from pathlib import Path

import torch

from videoanchor.integrations.options import ssc_plan
from videoanchor.integrations.score_cache import SSC_OPTIONS, CacheStats

__all__ = [
    "AnchorCache",
    "CacheStats",
    "batch_prompts",
    "concat_encoder_outputs",
    "content_hash",
    "default_cache_dir",
    "model_fingerprint",
    "repeat_prompt",
]

# Inputs of the vision encoder that the processor produces (any family); what is not in the
# encoder's signature is ignored.
_PIXEL_KEYS = ("pixel_values", "pixel_values_videos", "pixel_values_images", "image_patches")
# Fields of a vision encoder output that the language model never reads (large).
_DROP_FIELDS = ("last_hidden_state", "hidden_states", "attentions")
FORMAT = 2  # bump when the stored layout changes: old entries are then ignored


def default_cache_dir() -> Path:
    """``$VIDEOANCHOR_CACHE``, else ``~/.cache/videoanchor``."""
    env = os.environ.get("VIDEOANCHOR_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "videoanchor"


def model_fingerprint(model: torch.nn.Module) -> str:
    """What names a loaded model's weights in the vision keys: its ``name_or_path``, the hub
    commit when known, the dtype, and for a local directory the size and modification time
    of its weight files (a re-saved checkpoint gets new keys)."""
    config = getattr(model, "config", None)
    name = str(getattr(config, "_name_or_path", "") or type(model).__name__)
    parts = [name, str(getattr(config, "_commit_hash", None)), str(getattr(model, "dtype", ""))]
    path = Path(name)
    if path.is_dir():
        for f in sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin")):
            st = f.stat()
            parts.append(f"{f.name}:{st.st_size}:{st.st_mtime_ns}")
    return "|".join(parts)


def content_hash(*parts) -> str:
    """SHA-256 (hex) of tensors (dtype, shape and bytes), strings, numbers, None and nested
    lists/tuples/dicts of them."""
    h = hashlib.sha256()

    def feed(x):
        if torch.is_tensor(x):
            t = x.detach().to("cpu").contiguous()
            h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        elif isinstance(x, dict):
            h.update(b"D")
            for k in sorted(x, key=str):
                feed(str(k))
                feed(x[k])
        elif isinstance(x, (list, tuple)):
            h.update(f"L{len(x)}".encode())
            for v in x:
                feed(v)
        else:
            h.update(f"{type(x).__name__}:{x!r};".encode())

    for p in parts:
        feed(p)
    return h.hexdigest()


class AnchorCache:
    """Vision-encoder outputs, SSC coefficients and cluster labels, keyed by content hash.

    Args:
        root: directory of the on-disk cache (created on the first write), or None for
            memory only.
        model_key: names the model in the vision keys (e.g. its path or hub id and dtype);
            the features' own hash keys the SSC and label entries, so they need none.
        memory_bytes: keep the most recently used entries in memory too, up to this many
            bytes of tensors (a sweep reads each many times); 0 for none. Without ``root``
            nothing is evicted (memory is then the only store).
    """

    def __init__(self, root: str | os.PathLike | None, *, model_key: str = "",
                 memory_bytes: int = 2**30):  # fmt: skip
        self.root = None if root is None else Path(root)
        self.model_key = str(model_key)
        self._memory: OrderedDict[str, tuple[object, int]] = OrderedDict()
        self._memory_bytes = int(memory_bytes)
        self._held = 0
        self.stats = CacheStats()

    def _remember(self, mkey: str, entry) -> None:
        if self.root is not None and self._memory_bytes <= 0:
            return
        size = _nbytes(entry)
        old = self._memory.pop(mkey, None)
        if old is not None:
            self._held -= old[1]
        self._memory[mkey] = (entry, size)
        self._held += size
        while self.root is not None and self._held > self._memory_bytes and len(self._memory) > 1:
            _, (_, freed) = self._memory.popitem(last=False)
            self._held -= freed

    # -- storage -------------------------------------------------------------------------
    def _path(self, kind: str, key: str) -> Path | None:
        if self.root is None:
            return None
        return self.root / kind / key[:2] / f"{key}.pt"

    def _get(self, kind: str, key: str):
        mkey = f"{kind}/{key}"
        if mkey in self._memory:
            self._memory.move_to_end(mkey)
            return self._memory[mkey][0]
        path = self._path(kind, key)
        if path is None or not path.exists():
            return None
        try:
            entry = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # a damaged entry (e.g. a full disk) is recomputed, not fatal
            return None
        if not isinstance(entry, dict) or entry.get("format") != FORMAT:
            return None
        self._remember(mkey, entry)
        return entry

    def _put(self, kind: str, key: str, entry: dict) -> None:
        entry = {**entry, "format": FORMAT}
        self._remember(f"{kind}/{key}", entry)
        path = self._path(kind, key)
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(entry, f)
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise

    # -- vision encoder ------------------------------------------------------------------
    def encode(self, model: torch.nn.Module, inputs: dict) -> dict:
        """``inputs`` (processor output of one prompt, on the model's device) with the pixel
        inputs replaced by ``mm_encoder_outputs``: what ``generate`` would compute first,
        read from the cache or computed once (one vision-encoder call per modality).

        Inputs without pixels, or a model whose ``forward`` takes no ``mm_encoder_outputs``,
        come back unchanged.
        """
        base = getattr(model, "base_model", model)
        if "mm_encoder_outputs" not in inspect.signature(model.forward).parameters:
            return dict(inputs)
        if not any(inputs.get(k) is not None for k in _PIXEL_KEYS):
            return dict(inputs)
        rows = inputs["input_ids"].shape[0] if torch.is_tensor(inputs.get("input_ids")) else 1
        if rows != 1:
            raise ValueError(
                f"AnchorCache.encode: expected the inputs of one prompt, got {rows}; encode "
                "each prompt, then batch them with concat_encoder_outputs"
            )
        out = dict(inputs)
        encoded: dict = {}
        used: set[str] = set()
        dtype = next(base.parameters()).dtype
        for modality in ("image", "video"):
            fn = getattr(base, f"get_{modality}_features", None)
            if fn is None:
                continue
            params = inspect.signature(fn).parameters
            kwargs = {k: inputs[k] for k in params if k != "kwargs" and k in inputs}
            if not any(k in kwargs and kwargs[k] is not None for k in _PIXEL_KEYS):
                continue
            used.update(k for k in kwargs if k in _PIXEL_KEYS)
            key = content_hash(FORMAT, self.model_key, str(dtype), modality, kwargs)
            entry = self._get("vision", key)
            self.stats.add("vision", entry is not None)
            if entry is None:
                with torch.inference_mode():
                    result = fn(**kwargs, return_dict=True)
                entry = _pack_output(result)
                self._put("vision", key, entry)
            encoded[modality] = _unpack_output(entry, _device_of(inputs))
        for k in used:
            out.pop(k, None)
        if encoded:
            out["mm_encoder_outputs"] = encoded
        return out

    # -- SSC ------------------------------------------------------------------------------
    def ssc_key(self, features: torch.Tensor, config, progress=False, *, schedule=None) -> str:
        """The key :meth:`anchor_result` stores and finds the SSC coefficients of
        ``features`` under: a content hash of the features, ``config``'s SSC options, the
        solver that runs (from the plan the call makes) and the fast solver's schedule,
        ``schedule`` (default the package's own,
        ``videoanchor.anchor.solvers.admm_steps.SCHEDULE``; the schedule decides the fast
        solver's answer as much as the options do, so an entry a version with another
        schedule stored is not hit).

        The entries are exact mode's dense C (what :meth:`anchor_result` solves), so the
        plan is exact mode's whatever ``ssc_mode`` says ("auto" and "exact" share entries);
        ``ssc_mode="blocked"`` has none here, a ValueError (the handle runs an SSC in blocked
        mode uncached)."""
        from videoanchor.anchor.solvers import admm_steps

        if config.ssc_mode == "blocked":
            raise ValueError(
                "AnchorCache keeps exact mode's dense SSC coefficients; expected ssc_mode "
                "'auto' or 'exact', got 'blocked' (call compute_anchor_scores, uncached)"
            )
        plan = ssc_plan(dataclasses.replace(config, ssc_mode="exact"), *features.shape,
                        features.device, progress)  # fmt: skip
        opts = {k: getattr(config, k) for k in SSC_OPTIONS}
        opts["ssc_dtype"] = str(config.ssc_dtype)
        # (the continuation in lambda_z, 2026-11-25, changed the schedule)
        opts["schedule"] = dataclasses.asdict(admm_steps.SCHEDULE if schedule is None else schedule)
        # the solver that runs, from the plan the call makes (issue 71: before, "auto" ran
        # the fast solver wherever a progress reporter was passed, as this cache always did;
        # those entries are not hit)
        opts["runs"] = plan.solver
        return content_hash(FORMAT, features, opts)

    def anchor_result(self, features: torch.Tensor, n_clusters: int, config, progress=False):
        """The :class:`~videoanchor.anchor.AnchorResult` of one sample's visual tokens
        (``features`` (N, D)), as ``compute_anchor_scores(mode="exact")`` with ``config``'s
        SSC options would return it (``ssc_mode="blocked"`` is a ValueError: :meth:`ssc_key`):
        C from the cache or solved once per features, labels and scores once per
        ``n_clusters``, seed, label draws and cluster share. ``progress`` reports an SSC
        that runs (see :func:`~videoanchor.anchor.compute_anchor_scores`)."""
        from videoanchor.anchor import (
            SSCCoefficients,
            anchor_result_from_coefficients,
            ssc_coefficients,
        )

        ssc_key = self.ssc_key(features, config, progress)
        device = features.device
        entry = self._get("ssc", ssc_key)
        self.stats.add("ssc", entry is not None)
        if entry is None:
            c = ssc_coefficients(
                features, alpha_e=config.alpha_e, alpha_z=config.alpha_z, rho=config.rho,
                eps=config.eps, max_iter=config.max_iter, pca_rank=config.pca_rank,
                backend=config.ssc_backend, solver=config.ssc_solver, dtype=config.ssc_dtype,
                precision=config.ssc_precision, progress=progress,
                dark_tokens=config.dark_tokens,
            )  # fmt: skip
            entry = {
                "coef": c.coef.cpu(), "iterations": int(c.iterations),
                "converged": bool(c.converged), "residual": float(c.residual),
                "lambda_e": float(c.lambda_e), "lambda_z": float(c.lambda_z),
                "backend": c.backend, "solver": c.solver,
                "gap": None if c.gap is None else float(c.gap),
                "timings": {k: float(v) for k, v in c.timings.items()},
            }  # fmt: skip
            self._put("ssc", ssc_key, entry)
        ssc = SSCCoefficients(**{k: v for k, v in entry.items() if k != "format"})
        ssc.coef = ssc.coef.to(device)
        label_key = content_hash(
            ssc_key, int(n_clusters), int(config.seed), int(config.label_draws),
            *_share_key(config.cluster_share),
        )  # fmt: skip
        labels = self._get("labels", label_key)
        self.stats.add("labels", labels is not None)
        if labels is None:
            res = anchor_result_from_coefficients(
                ssc,
                int(n_clusters),
                seed=int(config.seed),
                label_draws=int(config.label_draws),
                features=features,
                cluster_share=config.cluster_share,
            )
            self._put("labels", label_key, {"labels": res.labels.cpu(), "scores": res.scores.cpu(),
                                            "timings": dict(res.timings),
                                            "share": {"cluster_share": res.cluster_share,
                                                      "share_weight": res.share_weight,
                                                      "share_stability": res.share_stability}})  # fmt: skip
            return res
        from videoanchor.anchor import AnchorResult

        return AnchorResult(
            scores=labels["scores"].to(device), labels=labels["labels"].to(device),
            coef=ssc.coef, iterations=ssc.iterations, converged=ssc.converged,
            residual=ssc.residual, lambda_e=ssc.lambda_e, lambda_z=ssc.lambda_z,
            backend=ssc.backend, solver=ssc.solver, gap=ssc.gap,
            timings={"total": 0.0, "cached": 1.0}, **labels.get("share", {}),
        )  # fmt: skip


def _share_key(share: str) -> tuple:
    """The cluster share's part of a labels entry's key: none for the paper's (so that the
    entries written before issue 91, under its former name "hard", still serve it), the name
    and the gate's ramp for the steady share, the draws and width for the expected share (an
    entry of another calibration, or of the draws before their completion, is not reused)."""
    from videoanchor.anchor.clustering import EXPECTED_DRAWS, EXPECTED_WIDTH, STEADY_RAMP
    from videoanchor.anchor.options import RENAMED_SHARES

    share = RENAMED_SHARES.get(share, share)
    if share == "paper":
        return ()
    if share == "expected":  # ("completed": its draws' empty clusters, issue 100)
        return (share, EXPECTED_DRAWS, EXPECTED_WIDTH, "completed")
    return (share, *STEADY_RAMP) if share == "steady" else (str(share),)


def _nbytes(x) -> int:
    if torch.is_tensor(x):
        return x.numel() * x.element_size()
    if isinstance(x, dict):
        return sum(_nbytes(v) for v in x.values())
    if isinstance(x, (list, tuple)):
        return sum(_nbytes(v) for v in x)
    return 0


def _device_of(inputs: dict):
    ids = inputs.get("input_ids")
    return ids.device if torch.is_tensor(ids) else torch.device("cpu")


def _to_cpu(x):
    if torch.is_tensor(x):
        return x.detach().to("cpu")
    if isinstance(x, (list, tuple)):
        return [_to_cpu(v) for v in x]
    return x


def _to(x, device):
    if torch.is_tensor(x):
        return x.to(device)
    if isinstance(x, (list, tuple)):
        return tuple(_to(v, device) for v in x)
    return x


def _pack_output(result) -> dict:
    """A vision encoder output (a transformers ModelOutput) as plain lists and tensors."""
    cls = type(result)
    fields = {
        k: _to_cpu(v) for k, v in dict(result).items() if k not in _DROP_FIELDS and v is not None
    }
    return {"cls": f"{cls.__module__}:{cls.__qualname__}", "fields": fields}


def _unpack_output(entry: dict, device):
    module, _, name = entry["cls"].partition(":")
    fields = {k: _to(v, device) for k, v in entry["fields"].items()}
    try:
        cls = getattr(importlib.import_module(module), name)
        return cls(**fields)
    except Exception:
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        out = BaseModelOutputWithPooling(pooler_output=fields.pop("pooler_output", None))
        for k, v in fields.items():
            setattr(out, k, v)
        return out


def _concat(values):
    """Join one field of several prompts' encoder outputs, in prompt order."""
    first = values[0]
    if torch.is_tensor(first):
        return torch.cat(values, dim=0)
    if isinstance(first, (list, tuple)) and first and isinstance(first[0], (list, tuple)):
        # per layer, per image (Qwen3-VL's deepstack features): join each layer
        return [tuple(x for v in values for x in v[layer]) for layer in range(len(first))]
    if isinstance(first, (list, tuple)):  # per image or video
        return tuple(x for v in values for x in v)
    return first


def concat_encoder_outputs(outputs: list[dict]) -> dict:
    """One ``mm_encoder_outputs`` for a batch from the per-prompt ones (the images/videos of
    the prompts in batch order, as the processor lays them out for a batch)."""
    if not outputs:
        raise ValueError("expected at least one prompt's encoder outputs, got none")
    modalities = {m for o in outputs for m in o}
    joined = {}
    for m in sorted(modalities):
        parts = [o[m] for o in outputs if m in o]
        cls = type(parts[0])
        keys = [k for k, v in dict(parts[0]).items() if v is not None]
        fields = {k: _concat([dict(p)[k] for p in parts]) for k in keys}
        joined[m] = cls(**fields)
    return joined


def repeat_prompt(inputs: dict, rows: int) -> dict:
    """A batch of ``rows`` copies of one prompt's (encoded) inputs: per-row and per-visual
    tensors are repeated along dim 0, lists are repeated, ``mm_encoder_outputs`` joined with
    :func:`concat_encoder_outputs` (so each row can carry its own anchoring settings)."""
    if isinstance(rows, bool) or not isinstance(rows, numbers.Integral) or rows < 1:
        raise ValueError(f"rows: expected a positive int, got {rows!r}")
    rows = int(rows)
    out = {}
    for k, v in inputs.items():
        if k == "mm_encoder_outputs":
            out[k] = concat_encoder_outputs([v] * rows)
        elif torch.is_tensor(v) and v.dim() > 0:
            out[k] = torch.cat([v] * rows, dim=0)
        elif isinstance(v, (list, tuple)):
            out[k] = type(v)(list(v) * rows)
        else:
            out[k] = v
    return out


def batch_prompts(prompts: list[dict], pad_token_id: int) -> dict:
    """One left-padded batch from several single-prompt (encoded) inputs, as the processor
    lays a batch out: per-token tensors ``(1, S_i)`` left-padded to the longest (``input_ids``
    with ``pad_token_id``, the others with 0), per-visual tensors joined along dim 0, lists
    joined, ``mm_encoder_outputs`` joined with :func:`concat_encoder_outputs`."""
    if not prompts:
        raise ValueError("expected at least one prompt, got none")
    lengths = [int(p["input_ids"].shape[1]) for p in prompts]
    width = max(lengths)
    out = {}
    for key in prompts[0]:
        values = [p.get(key) for p in prompts]
        if key == "mm_encoder_outputs":
            out[key] = concat_encoder_outputs([v for v in values if v])
        elif all(torch.is_tensor(v) and v.dim() == 2 and v.shape == (1, n)
                 for v, n in zip(values, lengths, strict=True)):  # fmt: skip
            fill = pad_token_id if key == "input_ids" else 0
            rows = [torch.nn.functional.pad(v, (width - v.shape[1], 0), value=fill) for v in values]
            out[key] = torch.cat(rows, dim=0)
        elif all(torch.is_tensor(v) and v.dim() > 0 for v in values):
            out[key] = torch.cat(values, dim=0)
        elif all(isinstance(v, (list, tuple)) for v in values):
            out[key] = [x for v in values for x in v]
        else:
            out[key] = values[0]
    return out
