"""The VideoAnchor state of one configured model: :class:`AnchorHandle`.

:func:`~.configuring.configure` makes it and installs its model hooks (:mod:`.hooks`), which
score each prefill with visual inputs (:mod:`.scoring`) and set the request of the running
forward; the attention function asks the handle for that request's gates
(:meth:`AnchorHandle.gates_for`). The handle keeps what the last prefill computed
(``last_*``) for the user.
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, replace

import torch

from videoanchor.integrations.options import (
    AnchorConfig,
    validate_options,
    validate_ssc_options,
)
from videoanchor.integrations.transformers.attention import ATTN_IMPLEMENTATION, REQUEST_KWARG
from videoanchor.integrations.transformers.distributed import validate_group_option
from videoanchor.integrations.transformers.gates import RequestGates
from videoanchor.integrations.transformers.registry import FamilySpec, VisualSegment
from videoanchor.kernels import PreparedGates

__all__ = ["AnchorHandle", "RowSetting", "find_handle", "validate_config"]


def validate_config(cfg: AnchorConfig) -> AnchorConfig:
    """``cfg`` checked and normalised as :func:`~.configuring.configure` takes it (every
    option, the process group too); raises TypeError / ValueError naming the option."""
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
        # The gates of the last anchored prefill, kept for its decode steps, and those of the
        # forward running now (None between forwards and in unanchored ones): set by the
        # model hooks (.hooks), read by gates_for.
        self._request: RequestGates | None = None
        self._current: RequestGates | None = None
        self._warned: set[str] = set()
        self._hooks: list = []  # the model hooks' handles (torch.utils.hooks.RemovableHandle)
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
            validate_config(replace(self.config, alpha_k=s.alpha_k, alpha_v=s.alpha_v,
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

    def gates_for(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        forward_kwargs: Mapping,
        *,
        cache_seqlens: torch.Tensor | None = None,
        packed: bool = False,
    ) -> PreparedGates | None:
        """The gates of one attention call (``query`` (B, Hq, Sq, D), ``key`` (B, Hkv, Skv,
        D)): the :class:`~videoanchor.kernels.PreparedGates` of its forward's request over
        its keys on ``key``'s device, or None (an unanchored forward). The same object for
        every layer and decode step on that device (:meth:`.gates.RequestGates.prepared`).

        ``forward_kwargs``: the call's keyword arguments. The language model's pre-hook puts
        the request of its forward there (``REQUEST_KWARG``), so that a layer recomputed
        under gradient checkpointing, which replays them, gets the gates of its own forward;
        without it, the request of the forward running now. ``cache_seqlens``: (B,) filled
        slots of a preallocated (static) cache, read once per request to place the prompt.
        ``packed``: whether the call's mask packs several sequences per row, which must
        agree with how the scores were computed (RuntimeError otherwise)."""
        request = forward_kwargs.get(REQUEST_KWARG, _RUNNING)
        if request is _RUNNING:
            request = self._current
        if request is None:
            return None
        request.check_packed(packed)
        n_valid = None
        if cache_seqlens is not None and request.offset is None:
            n_valid = int(cache_seqlens.max())  # once per request: where the prompt ends
        return request.prepared(key.device, query.shape[0], key.shape[2], n_valid)

    # -- used by the model hooks (.hooks) and the scoring (.scoring) -------------------
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

    def _remember(self, scores, results, runs, positions, segments) -> None:
        """What the last prefill computed: the ``last_*`` attributes (see the class)."""
        self.last_scores, self.last_result, self.last_ssc_runs = scores, results, runs
        self.last_visual_positions, self.last_segments = positions, segments

    def _remember_unscored(self, like: torch.Tensor | None) -> None:
        """A prefill without visual inputs: the ``last_*`` attributes describe it (zero
        scores of its (batch, prompt_len) ``like``, no SSC), not the request before it."""
        if like is None:  # shape unknown
            self._remember(None, None, [], [], [])
            return
        B, S = like.shape[:2]
        self._remember(
            torch.zeros(B, S, dtype=torch.float32, device=like.device),
            [None] * B,
            [None] * B,
            [torch.zeros(0, dtype=torch.long) for _ in range(B)],
            [[] for _ in range(B)],
        )


_RUNNING = object()  # gates_for: no request in the call's kwargs, the running forward's


def find_handle(model: torch.nn.Module) -> AnchorHandle | None:
    """The handle installed on ``model`` (or one of its submodules), or None."""
    for m in model.modules():
        h = m.__dict__.get("_videoanchor_handle_root")
        if h is not None:
            return h
    return None
