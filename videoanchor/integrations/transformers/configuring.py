"""Per-model state, hooks and :func:`configure`.

How a request flows (no change to the user's code):

1. A forward pre-hook on the base VLM model (the module owning ``language_model``) records
   ``input_ids``, the 2D attention mask, the cache object and whether visual inputs
   (``pixel_values``, ``pixel_values_videos``, ...) came with this call.
2. A forward pre-hook on the language model receives ``inputs_embeds`` after transformers
   scattered the projector output into the placeholder positions. On a call with visual
   inputs (a prefill) it runs SSC once per sample on the embeddings at the visual positions,
   builds the (batch, prompt) scores (0 elsewhere) and the gates
   ``key_bias = log(1 + alpha_k s)``, ``value_scale = 1 + alpha_v s``.
3. Every decoder self-attention module carries a reference to the handle. The request of
   the forward rides along as a forward kwarg down to the attention function, which asks it
   for the gates on its own device (one copy per device per request, views afterwards: no
   host sync per layer). A layer recomputed under gradient checkpointing replays its
   kwargs, so it sees the gates of its own forward.
4. Decode steps (later calls with the same cache object) are unanchored with
   ``decode="prefill"`` (the authors' code) or keep the prompt's gates, padded with
   neutral gates for generated tokens, with ``decode="all"``.

The KV cache only ever holds the unscaled K and V: the gates enter inside the kernel.
"""

from __future__ import annotations

import dataclasses
import warnings
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

import torch

from videoanchor.integrations.options import (
    AnchorConfig,
    fast_splits,
    ssc_kwargs,
    ssc_plan,
    validate_options,
    validate_ssc_options,
)
from videoanchor.integrations.transformers.attention import (
    ATTN_IMPLEMENTATION,
    REQUEST_KWARG,
    current_tokens_of_slot_mask,
)
from videoanchor.integrations.transformers.distributed import (
    check_same_request,
    resolve_group,
    shared_scores,
    validate_group_option,
)
from videoanchor.integrations.transformers.registry import (
    FamilySpec,
    VisualSegment,
    get_family,
    segments_for_batch,
)
from videoanchor.kernels import PreparedGates, prepare_gates

__all__ = [
    "AnchorConfig",
    "AnchorHandle",
    "RowSetting",
    "check_options",
    "configure",
    "find_handle",
]


def _validate(cfg: AnchorConfig) -> AnchorConfig:
    cfg = validate_options(cfg)
    validate_group_option(cfg.process_group)
    validate_ssc_options(cfg)
    return cfg


@dataclass(frozen=True)
class RowSetting:
    """The anchoring of one batch row (see :meth:`AnchorHandle.per_row`)."""

    alpha_k: float
    alpha_v: float
    n_clusters: int


class _RowScope:
    def __init__(self, handle, settings):
        self.handle, self.settings = handle, settings

    def __enter__(self):
        self.previous, self.handle.row_settings = self.handle.row_settings, self.settings
        return self.handle

    def __exit__(self, *exc):
        self.handle.row_settings = self.previous


@dataclass
class _Pending:
    """What the base-model pre-hook saw, consumed by the language-model pre-hook."""

    input_ids: torch.Tensor | None
    attention_mask: torch.Tensor | None
    visual_mask_from_embeds: dict[str, torch.Tensor] | None
    has_visual_inputs: bool
    cache: object
    layout_kwargs: dict


def _value_scale_range(alphas_v, value_scale: torch.Tensor) -> tuple[float, float]:
    """The ``value_scale_range`` a request promises the kernels (it lets the prefill take its
    fast form): ``[1, 1 + alpha_v]`` (ordered) for every row's ``alpha_v``, since the scores
    lie in [0, 1] (docs/method.md, section 3), widened to the scales' actual range should
    they leave it. A constant of the configuration, not of the request's data, so that a
    compiled decode step (torch.compile reads the range on the host) keeps one graph for
    every request instead of specialising on each request's largest scale. Reads the
    scales' range on the host, once per request."""
    from videoanchor.kernels import value_scale_range_of

    lo, hi = value_scale_range_of(value_scale)
    bounds = [1.0 + float(a) for a in alphas_v]
    lo_cfg, hi_cfg = min(1.0, *bounds), max(1.0, *bounds)
    if lo_cfg <= 0:  # alpha_v <= -1: only the scales themselves bound them away from 0
        return lo, hi
    return min(lo, lo_cfg), max(hi, hi_cfg)


@dataclass
class _Request:
    """Gates of one prefill, reused by its decode steps (decode="all")."""

    key_bias: torch.Tensor  # (B, P) float32
    value_scale: torch.Tensor  # (B, P) float32
    # (lo, hi) bounding value_scale and 1.0: lets the kernel take its fast form (one launch)
    value_scale_range: tuple[float, float] | None = None
    cache_ref: weakref.ref | None = None
    offset: int | None = None  # cache slot of prompt position 0
    buffers: dict = field(default_factory=dict)  # device -> PreparedGates over a buffer
    packed: bool = False  # scored per sequence of a padding-free row
    # The handle's gate buffers, device -> (kb, vs), rewritten in place by the next request
    # without gradients (see ``prepared``); None: a new buffer for every request.
    pool: dict | None = None

    def check_packed(self, packed: bool) -> None:
        if packed != self.packed:
            scored = "per packed sequence" if self.packed else "per row"
            raise RuntimeError(
                f"videoanchor: the scores were computed {scored} but the attention mask is "
                f"{'packed' if packed else 'not packed'}; expected both decided by the same rule "
                "(position_ids that restart, no attention_mask, no cache)"
            )

    @property
    def batch(self) -> int:
        return self.key_bias.shape[0]

    @property
    def length(self) -> int:
        return self.key_bias.shape[1]

    def prepared(
        self, device: torch.device, batch: int, skv: int, n_valid: int | None = None
    ) -> PreparedGates:
        """The gates of ``skv`` keys on ``device``, prepared for the kernels
        (:func:`videoanchor.kernels.prepare_gates`) over a buffer of at least ``skv``
        positions: made once per device and buffer size, then the same object for every
        layer and decode step (a call runs no operator on the gates). ``n_valid``: the
        filled cache slots when the cache is preallocated (skv is its size), else skv.

        Once the buffer covers ``skv`` this reads nothing of the request's own tensors or
        prompt length: what torch.compile traces of it (a compiled decode step) then holds
        for the next request too, so the step is not compiled again for each prompt."""
        buf = self.buffers.get(device)
        # Once the buffer exists its batch is the request's (and reading it guards nothing
        # on the request's own tensors).
        have = self.batch if buf is None else buf.key_bias.shape[0]
        if batch != have:
            raise RuntimeError(
                f"videoanchor: the prefill had batch {have} but this attention call has batch "
                f"{batch}; decoding strategies that change the batch after the prefill are not "
                "supported with decode='all'"
            )
        if buf is not None and buf.length >= skv:  # every later layer and decode step
            return buf
        if self.offset is None:
            self.offset = (skv if n_valid is None else n_valid) - self.length
            if self.offset < 0:
                raise RuntimeError(
                    f"videoanchor: the prompt has {self.length} positions but the attention sees "
                    f"only {skv} keys"
                )
        end = self.offset + self.length
        if skv < end:
            raise RuntimeError(f"videoanchor: expected at least {end} keys, got {skv}")
        cap = skv if buf is None else max(skv, 2 * buf.length)
        if skv > end and n_valid is None:  # a growing cache: room for most steps
            cap = max(cap, end + 256)  # (a preallocated one, n_valid given, never grows)
        kb, vs = self._buffer(device, cap)
        # A non-blocking copy to the host would be read before it lands (device_map with
        # layers on the CPU); to another GPU it is stream-ordered.
        async_copy = device.type != "cpu"
        kb[:, self.offset : end] = self.key_bias.to(device, non_blocking=async_copy)
        vs[:, self.offset : end] = self.value_scale.to(device, non_blocking=async_copy)
        buf = self.buffers[device] = prepare_gates(kb, vs, value_scale_range=self.value_scale_range)
        return buf

    def _buffer(self, device: torch.device, cap: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(key bias, value scale) buffers of (batch, cap), neutral (0 and 1). Without
        gradients they are the handle's buffers of that shape, rewritten in place: the
        gates of every request then sit at the same addresses, which a compiled decode step
        reads as static inputs (torch.compile "reduce-overhead": a CUDA graph replayed for
        every request instead of one recorded per request). With gradients a request keeps
        buffers of its own, as does every request of a model in training mode (no ``pool``):
        gradient checkpointing replays a layer with its request's gates after later requests
        started, and its reentrant form runs the first forward without gradients."""
        key = (self.batch, cap)
        if self.pool is not None and not torch.is_grad_enabled():
            kb, vs = self.pool.get(device, (None, None))
            if kb is None or tuple(kb.shape) != key:
                kb = torch.empty(key, dtype=torch.float32, device=device)
                vs = torch.empty(key, dtype=torch.float32, device=device)
                self.pool[device] = (kb, vs)
            return kb.zero_(), vs.fill_(1.0)
        kb = torch.zeros(key, dtype=torch.float32, device=device)
        return kb, torch.ones(key, dtype=torch.float32, device=device)


class AnchorHandle:
    """The VideoAnchor state of one model; returned by :func:`configure`.

    Attributes (after a prefill with visual tokens; None/empty before):
        config: the :class:`AnchorConfig` in force.
        family: the registry entry of the model.
        last_scores: (batch, prompt_len) float32 anchor scores of the last prefill, on the
            language model's input device; 0 at text, padding and unscored positions. After a
            prefill without visual inputs (text only) it is all zeros of that prefill's
            shape, and ``last_result`` / ``last_ssc_runs`` hold None per row (never the
            previous request's).
        last_result: list, per sample (per sequence of a padding-free row), of the SSC
            :class:`~videoanchor.anchor.AnchorResult` (None for a sample without scored
            visual tokens).
        last_visual_positions: list, per sample (per sequence of a padding-free row), of a
            LongTensor (CPU) with the prompt columns of the scored visual tokens, in prompt
            order (left padding included in the column).
        last_segments: list, per sample, of :class:`VisualSegment` (kind, start, length, grid,
            order): the images/videos of the sample; ``start`` indexes
            ``last_visual_positions[b]``.
        last_anchored: True when the last forward with a fresh request was anchored.
        cache: None, or an object with ``anchor_result(features, n_clusters, config)``
            returning the :class:`~videoanchor.anchor.AnchorResult` of one sample (e.g.
            :class:`~videoanchor.integrations.transformers.cache.AnchorCache`, which stores
            C once per features and the labels once per ``n_clusters``); used instead of
            running SSC for samples the dense exact solver takes, on one process.
        row_settings: None, or one :class:`RowSetting` per batch row of the next prefills:
            each row gets its own alpha_k, alpha_v and n_clusters (settings of a sweep
            sharing a batch); the config's values otherwise. Set it with
            :meth:`per_row`.
        last_ssc_runs: list, per entry of ``last_result``, of the
            :class:`~videoanchor.anchor.progress.SSCRunSummary` of its SSC (converged or
            not, iterations, residual vs eps, stopped by the time budget; None where no
            SSC ran on this process).
        gate_devices: the devices that hold a copy of the last request's gates
            (read-only; see the property).
    """

    def __init__(self, model: torch.nn.Module, family: FamilySpec, config: AnchorConfig):
        self._model_ref = weakref.ref(model)
        self.family = family
        self.config = config
        self.last_scores: torch.Tensor | None = None
        self.last_result: list | None = None
        self.last_visual_positions: list[torch.Tensor] = []
        self.last_segments: list[list[VisualSegment]] = []
        self.last_anchored = False
        self.last_ssc_runs: list = []
        self._pending: _Pending | None = None
        self._request: _Request | None = None
        self._current: _Request | None = None
        self._warned: set[str] = set()
        self._hooks: list = []
        self._gate_pool: dict = {}  # device -> the gate buffers of requests without gradients
        self.cache = None
        self.row_settings: list[RowSetting] | None = None

    @property
    def gate_devices(self) -> list[torch.device]:
        """The devices holding a copy of the last request's gates, in the order its
        attention layers first asked for them: one copy per device the anchored layers ran
        on (several for a model spread over devices with ``device_map``), made once and
        shared by every layer and decode step on it. Empty before an anchored prefill."""
        request = self._request
        return [] if request is None else list(request.buffers)

    def per_row(self, settings) -> _RowScope:
        """Context manager: the prefills inside use ``settings[b]`` (a :class:`RowSetting`)
        for batch row b. Validates each alpha as :func:`configure` does."""
        settings = [RowSetting(*s) if not isinstance(s, RowSetting) else s for s in settings]
        for s in settings:
            _validate(replace(self.config, alpha_k=s.alpha_k, alpha_v=s.alpha_v,
                              n_clusters=s.n_clusters))  # fmt: skip
        return _RowScope(self, settings)

    def __repr__(self) -> str:
        c = self.config
        return (
            f"AnchorHandle(family={self.family.model_type!r}, enabled={c.enabled}, "
            f"alpha_q={c.alpha_q}, alpha_k={c.alpha_k}, alpha_v={c.alpha_v}, "
            f"n_clusters={c.n_clusters}, decode={c.decode!r}, tokens={c.tokens})"
        )

    @property
    def model(self) -> torch.nn.Module | None:
        """The base VLM the handle is installed on (a weak reference: None once it is freed)."""
        return self._model_ref()

    def _text_config(self):
        model = self.model
        return getattr(model.config, "text_config", model.config)

    def _active(self) -> bool:
        return (
            self.config.enabled and self._text_config()._attn_implementation == ATTN_IMPLEMENTATION
        )

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, stacklevel=4)

    # -- hooks -------------------------------------------------------------------------
    def _on_base_forward(self, module, args, kwargs):
        self._pending = None
        self._current = None
        if not self._active():
            return None
        input_ids = kwargs.get("input_ids")
        if (
            input_ids is None
            and args
            and torch.is_tensor(args[0])
            and not args[0].is_floating_point()
        ):
            input_ids = args[0]
        has_visual = any(_given(kwargs.get(n)) for n in self.family.visual_input_kwargs)
        from_embeds = None
        if input_ids is None and has_visual and kwargs.get("inputs_embeds") is not None:
            from_embeds = self._placeholder_mask_from_embeds(module, kwargs["inputs_embeds"])
        layout = {
            k: kwargs.get(k)
            for k in (
                "video_grid_thw",
                "image_grid_thw",
                "pixel_values_videos",
                "mm_encoder_outputs",
            )
        }
        mask = kwargs.get("attention_mask")
        self._pending = _Pending(
            input_ids=input_ids,
            attention_mask=mask if torch.is_tensor(mask) and mask.dim() == 2 else None,
            visual_mask_from_embeds=from_embeds,
            has_visual_inputs=has_visual,
            cache=_cache_of(kwargs),
            layout_kwargs=layout,
        )
        return None

    def _placeholder_mask_from_embeds(self, module, embeds):
        ids = self.family.token_ids(self.model.config, self.config.tokens)
        emb = module.get_input_embeddings()
        out = {}
        for kind, tid in ids.items():
            ref = emb(torch.tensor(tid, device=embeds.device))
            out[kind] = (embeds == ref).all(-1)
        return out

    def _on_lm_forward(self, module, args, kwargs):
        self._start_lm_forward(module, kwargs)
        if self._text_config()._attn_implementation != ATTN_IMPLEMENTATION:
            return None  # another attention implementation gets no extra kwarg
        # The request rides along as a forward kwarg down to the attention calls: a layer
        # recomputed under gradient checkpointing replays its kwargs, so it gets the gates of
        # its own forward even after this forward ended (or another one started).
        return args, {**kwargs, REQUEST_KWARG: self._current}

    def _start_lm_forward(self, module, kwargs):
        pending, self._pending = self._pending, None
        self._current = None
        if pending is None:
            return None
        request = self._request
        cache = pending.cache
        continuation = (
            request is not None
            and cache is not None
            and request.cache_ref is not None
            and request.cache_ref() is cache
        )
        if continuation and pending.has_visual_inputs and pending.input_ids is not None:
            # Visual inputs re-sent with a decode step: a new prefill only if the new tokens
            # hold placeholders (a multi-turn continuation), else still a decode step.
            ids = self.family.token_ids(self.model.config, self.config.tokens)
            ref = torch.tensor(list(ids.values()), device=pending.input_ids.device)
            pending.has_visual_inputs = bool(torch.isin(pending.input_ids, ref).any())
        if continuation and not pending.has_visual_inputs:
            if self.config.decode == "all":
                self._current = request
            return None
        self._request = None
        embeds = kwargs.get("inputs_embeds")
        if not pending.has_visual_inputs or embeds is None:
            self.last_anchored = False
            self._forget_last_request(embeds if embeds is not None else pending.input_ids)
            self._warn_once(
                "no-visual",
                "videoanchor: this request has no visual inputs; it runs unanchored (plain attention)",
            )
            return None
        with torch.no_grad():
            packed = _packed_sequence_ids(module, kwargs, embeds.shape[0])
            self._start_request(pending, embeds, packed)
        return None

    def _forget_last_request(self, like: torch.Tensor | None) -> None:
        """A prefill without visual inputs: the ``last_*`` attributes describe it (zero
        scores of its (batch, prompt_len), no SSC), not the request before it."""
        if like is None:  # shape unknown
            self.last_scores, self.last_result = None, None
            self.last_visual_positions, self.last_segments, self.last_ssc_runs = [], [], []
            return
        B, S = like.shape[:2]
        self.last_scores = torch.zeros(B, S, dtype=torch.float32, device=like.device)
        self.last_result = [None] * B
        self.last_ssc_runs = [None] * B
        self.last_visual_positions = [torch.zeros(0, dtype=torch.long) for _ in range(B)]
        self.last_segments = [[] for _ in range(B)]

    def _on_lm_output(self, module, args, kwargs, output):
        request = self._request
        if request is not None and request.cache_ref is None:
            cache = _cache_of(output) if isinstance(output, Mapping) else None
            if cache is None:
                cache = _cache_of(kwargs)
            if cache is not None:
                request.cache_ref = weakref.ref(cache)
        self._current = None
        return None

    # -- scores ------------------------------------------------------------------------
    def _visual_masks(self, pending: _Pending, embeds: torch.Tensor) -> dict[str, torch.Tensor]:
        B, S = embeds.shape[:2]
        if pending.visual_mask_from_embeds is not None:
            masks = dict(pending.visual_mask_from_embeds)
        else:
            ids = pending.input_ids
            if ids is None or tuple(ids.shape) != (B, S):
                raise RuntimeError(
                    f"videoanchor: expected input_ids of shape {(B, S)} with the visual inputs, got "
                    f"{None if ids is None else tuple(ids.shape)}"
                )
            token_ids = self.family.token_ids(self.model.config, self.config.tokens)
            masks = {kind: ids.to(embeds.device) == tid for kind, tid in token_ids.items()}
        am = pending.attention_mask
        if am is not None and am.dtype == torch.int8:
            am = current_tokens_of_slot_mask(am, S)  # generate's mask over a static cache
        if am is not None and am.shape[0] == B and am.shape[-1] >= S:
            valid = am[:, -S:].to(device=embeds.device, dtype=torch.bool)
            masks = {k: m & valid for k, m in masks.items()}
        return masks

    def _start_request(
        self, pending: _Pending, embeds: torch.Tensor, packed: torch.Tensor | None = None
    ) -> None:
        from videoanchor.anchor import compute_anchor_scores
        from videoanchor.anchor.progress import SSCProgress
        from videoanchor.kernels import anchor_gates

        cfg = self.config
        B, S = embeds.shape[:2]
        masks = self._visual_masks(pending, embeds)
        any_mask = torch.zeros(B, S, dtype=torch.bool, device=embeds.device)
        for m in masks.values():
            any_mask |= m
        group = resolve_group(
            cfg.process_group, getattr(self.model, self.family.language_model_attr)
        )
        if group is not None:
            options = {
                f.name: getattr(cfg, f.name)
                for f in dataclasses.fields(cfg)
                if f.name not in ("process_group", "attention_backend")
            }
            check_same_request(group, embeds, any_mask, options=options)
        scores = torch.zeros(B, S, dtype=torch.float32, device=embeds.device)
        results: list = []
        runs: list = []
        positions: list[torch.Tensor] = []
        seen: list[tuple[int, torch.Tensor, object]] = []
        rows = self.row_settings
        if rows is not None and len(rows) != B:
            raise ValueError(
                f"videoanchor: per_row got {len(rows)} settings but the batch has {B} rows; "
                "expected one setting per row"
            )
        # SSC runs per sample: per row, or per sequence of a padding-free (packed) row.
        units = [(b, any_mask[b]) for b in range(B)]
        if packed is not None:
            packed = packed.to(any_mask.device)
            units = [
                (b, any_mask[b] & (packed[b] == g))
                for b in range(B)
                for g in torch.unique(packed[b]).tolist()
            ]
        for b, unit in units:
            cols = torch.nonzero(unit).flatten()
            positions.append(cols.cpu())
            n = cols.numel()
            if n == 0:
                results.append(None)
                runs.append(None)
                continue
            if n < 3:
                self._warn_once(
                    "tiny",
                    f"videoanchor: a sample has only {n} visual tokens; SSC needs at least 3, so its "
                    "scores are 0 (unanchored)",
                )
                results.append(None)
                runs.append(None)
                continue
            feats = embeds[b, cols]
            want = cfg.n_clusters if rows is None else rows[b].n_clusters
            k = min(want, n)
            res, run = next(
                (
                    (r, u)
                    for kk, f, r, u in seen
                    if kk == k and f.shape == feats.shape and torch.equal(f, feats)
                ),
                (None, None),
            )
            if res is None:
                reporter = SSCProgress(
                    enabled=cfg.ssc_progress, time_budget=cfg.ssc_time_budget,
                    desc=f"SSC sample {b}" if len(units) > 1 else "SSC",
                )  # fmt: skip
                if k < want:
                    self._warn_once(
                        "clusters",
                        f"videoanchor: a sample has {n} visual tokens, fewer than n_clusters="
                        f"{want}; using n_clusters={k} for it",
                    )

                def compute(feats=feats, k=k, reporter=reporter, **spread_over):
                    return compute_anchor_scores(
                        feats, k, **ssc_kwargs(cfg), progress=reporter, **spread_over
                    )

                def blocked(feats=feats, reporter=reporter):  # ssc_mode's (auto: the plan's)
                    from videoanchor.anchor.plan import SSCMemoryError

                    try:
                        plan = ssc_plan(cfg, *feats.shape, feats.device, reporter)
                    except SSCMemoryError:  # (compute() raises it with the full message)
                        return False
                    return plan.mode == "blocked"

                def spread():  # the ranks share the work: blocked, or the fast solver split
                    return fast_splits(cfg) or blocked()

                # Under a process group the ranks get the same result (distributed.py).
                if group is not None:
                    res = shared_scores(group, compute, feats.device, spread=spread)
                elif self.cache is not None and cfg.ssc_time_budget is None and not blocked():
                    # (a budget-stopped C depends on timing: never cached)
                    res = self.cache.anchor_result(feats, k, cfg, progress=reporter)
                else:
                    res = compute()
                run = reporter.runs[-1] if reporter.runs else None
                if run is None and group is None:
                    # Taken from the anchor cache: no SSC ran now; the stored result says how
                    # that run ended, so an unconverged C is still reported as such.
                    from videoanchor.anchor.progress import SSCRunSummary

                    run = SSCRunSummary(
                        converged=bool(res.converged), iterations=int(res.iterations),
                        residual=float(res.residual), best_residual=float(res.residual),
                        eps=float(cfg.eps), max_iter=int(cfg.max_iter), seconds=0.0,
                        stopped_by_budget=False, tokens=n,
                    )  # fmt: skip
                if not res.converged:
                    _warn_unconverged(res, run, cfg)
                seen.append((k, feats, res, run))
            results.append(res)
            runs.append(run)
            scores[b, cols] = res.scores.to(device=scores.device, dtype=torch.float32)
        self.last_scores = scores
        self.last_result = results
        self.last_ssc_runs = runs
        self.last_visual_positions = positions
        if pending.input_ids is not None:
            self.last_segments = segments_for_batch(
                self.family, self.model.config, pending.layout_kwargs, pending.input_ids, masks
            )
        else:
            self.last_segments = [[] for _ in range(B)]
        if all(r is None for r in results):
            self.last_anchored = False
            self._warn_once(
                "no-visual-tokens",
                f"videoanchor: no {'/'.join(cfg.tokens)} placeholder tokens with enough tokens in this "
                "prompt; it runs unanchored (plain attention)",
            )
            return
        if rows is None:
            key_bias, value_scale = anchor_gates(scores, cfg.alpha_k, cfg.alpha_v)
        else:  # one row at a time: each row of the batch has its own gates
            gates = [anchor_gates(scores[b : b + 1], r.alpha_k, r.alpha_v) for b, r in
                     enumerate(rows)]  # fmt: skip
            key_bias = torch.cat([g[0] for g in gates])
            value_scale = torch.cat([g[1] for g in gates])
        anchor_gates(scores, cfg.alpha_q, 0.0)  # validates the (no-op) query gate
        alphas_v = [cfg.alpha_v] if rows is None else [r.alpha_v for r in rows]
        self._request = _Request(
            key_bias=key_bias,
            value_scale=value_scale,
            value_scale_range=_value_scale_range(alphas_v, value_scale),  # once per request
            packed=packed is not None,
            # (a model in training mode keeps its own buffers per request: reentrant gradient
            # checkpointing runs the first forward without gradients, then replays it)
            pool=None if self.model.training else self._gate_pool,
        )
        if pending.cache is not None:
            self._request.cache_ref = weakref.ref(pending.cache)
        self._current = self._request
        self.last_anchored = True

    # -- called by the attention function ----------------------------------------------
    def _gates_for(self, query: torch.Tensor, key: torch.Tensor, n_valid: int | None = None):
        """The current request's :class:`~videoanchor.kernels.PreparedGates` for this call,
        or None (no anchored request)."""
        request = self._current
        if request is None:
            return None
        return request.prepared(key.device, query.shape[0], key.shape[2], n_valid)

    # -- install -----------------------------------------------------------------------
    def _install(self, base: torch.nn.Module) -> None:
        lm = getattr(base, self.family.language_model_attr)
        self._hooks = [
            base.register_forward_pre_hook(self._on_base_forward, with_kwargs=True),
            lm.register_forward_pre_hook(self._on_lm_forward, with_kwargs=True),
            lm.register_forward_hook(self._on_lm_output, with_kwargs=True),
        ]
        n = 0
        for m in lm.modules():
            if _is_decoder_self_attention(m):
                m._videoanchor_handle = self
                n += 1
        if n == 0:
            raise RuntimeError(
                f"videoanchor: found no decoder self-attention modules in {type(lm).__name__}"
            )
        self._keep_vision_on_sdpa()

    def _keep_vision_on_sdpa(self) -> None:
        vc = getattr(self.model.config, self.family.vision_config_attr, None)
        if vc is not None and getattr(vc, "_attn_implementation", None) == ATTN_IMPLEMENTATION:
            vc._attn_implementation_internal = "sdpa"


def _warn_unconverged(res, run, cfg: AnchorConfig) -> None:
    """Say that a sample's SSC stopped before ``eps`` (iteration limit or time budget)."""
    from videoanchor.anchor.progress import SSCConvergenceWarning

    if run is not None:
        text = run.message()
    else:  # computed on another rank of the group
        text = (
            f"SSC stopped after {res.iterations} iterations (max_iter={cfg.max_iter}) at "
            f"residual {res.residual:.3g} vs eps {cfg.eps:.3g}: NOT converged"
        )
    warnings.warn(f"videoanchor: {text}", SSCConvergenceWarning, stacklevel=2)


def _given(value) -> bool:
    """A visual input counts when it is not None and not an empty container."""
    if value is None:
        return False
    if isinstance(value, (dict, list, tuple)):
        return len(value) > 0
    return True


def _cache_of(kwargs: Mapping) -> object | None:
    """The KV cache a forward was given (or a model output holds): transformers 5.24 renamed
    ``past_key_values`` to ``cache`` (the old name still works there, with a deprecation
    warning); earlier 5.x releases know only ``past_key_values``."""
    cache = kwargs.get("cache")
    if cache is None and "past_key_values" in kwargs.keys():
        cache = kwargs.get("past_key_values")
    return cache


def _packed_sequence_ids(lm: torch.nn.Module, lm_kwargs: dict, batch: int) -> torch.Tensor | None:
    """(B, S) ids of the sequences packed in each row (padding-free batches), decided as
    transformers' mask builder will: position_ids that restart, no 2D mask and no cache (the
    language model makes one when use_cache resolves to True). Qwen-VL models carry the text
    positions as row 0 of a (4, B, S) position_ids. The attention function checks that its
    mask agrees (:meth:`_Request.check_packed`)."""
    from transformers.masking_utils import find_packed_sequence_indices

    use_cache = lm_kwargs.get("use_cache")
    if use_cache is None:
        use_cache = getattr(lm.config, "use_cache", False)
    if getattr(lm, "gradient_checkpointing", False) and lm.training:
        use_cache = False
    if use_cache or _cache_of(lm_kwargs) is not None:
        return None
    if lm_kwargs.get("attention_mask") is not None:
        return None
    pos = lm_kwargs.get("position_ids")
    if torch.is_tensor(pos) and pos.dim() == 3 and pos.shape[0] == 4:
        pos = pos[0]
    if not torch.is_tensor(pos) or pos.dim() != 2:
        return None
    return find_packed_sequence_indices(pos.expand(batch, -1))


def _is_decoder_self_attention(m: torch.nn.Module) -> bool:
    return (
        type(m).__name__.endswith("Attention")
        and hasattr(m, "layer_idx")
        and getattr(m, "is_causal", False)
        and hasattr(m, "config")
    )


def _is_base_vlm(m: torch.nn.Module) -> bool:
    """The module that owns the language model as a child (e.g. Qwen2VLModel, InternVLModel)."""
    return "language_model" in m._modules and hasattr(m, "config")


def _base_model(model: torch.nn.Module) -> torch.nn.Module | None:
    return next((m for m in model.modules() if _is_base_vlm(m)), None)


def find_handle(model: torch.nn.Module) -> AnchorHandle | None:
    """The handle installed on ``model`` (or one of its submodules), or None."""
    for m in model.modules():
        h = m.__dict__.get("_videoanchor_handle_root")
        if h is not None:
            return h
    return None


def _install_on(base: torch.nn.Module) -> AnchorHandle:
    spec = get_family(base.config)
    a_q, a_k, a_v = spec.default_alphas
    handle = AnchorHandle(
        base, spec, _validate(AnchorConfig(alpha_q=a_q, alpha_k=a_k, alpha_v=a_v))
    )
    handle._install(base)
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
    return _validate(AnchorConfig(**options))


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
            exact where the dense ``N x N`` problem fits, column-blocked above), ``"exact"``
            or ``"blocked"`` (the same program by column blocks with the authors' iteration,
            no ``N x N`` buffer; spread over the ranks of ``process_group``). An SSC in blocked
            mode bypasses ``handle.cache``, which keeps exact mode's dense C.
        label_draws: 1 (default, the paper's single random label draw) or R > 1: R label
            draws from one spectral embedding with the cluster shares averaged, for scores
            that depend much less on the seed (beyond the paper).
        cluster_share: "hard" (default, the paper's cluster share), "soft" (beyond the
            paper: a share continuous in the features, so that another engine's or device's
            rounding cannot flip it; NOT the paper's scores:
            :func:`~videoanchor.anchor.clustering.soft_cluster_shares`, docs/serving.md) or
            "stable" (beyond the paper: the paper's share where its labels survive a small
            move of the embedding, the soft one where they do not:
            :func:`~videoanchor.anchor.clustering.stable_cluster_shares`).
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
    handle.config = _validate(replace(old, **given))
    handle._keep_vision_on_sdpa()
    request = handle._request
    if (
        request is not None
        and (old.alpha_k, old.alpha_v) != (handle.config.alpha_k, handle.config.alpha_v)
        and handle.last_scores is not None
    ):
        # Called between the steps of a generate (decode="all"): the prompt's scores stay,
        # its gates follow the new strengths from the next step on.
        from videoanchor.kernels import anchor_gates

        request.key_bias, request.value_scale = anchor_gates(
            handle.last_scores, handle.config.alpha_k, handle.config.alpha_v
        )
        request.value_scale_range = _value_scale_range([handle.config.alpha_v], request.value_scale)
        request.buffers.clear()
    return handle
