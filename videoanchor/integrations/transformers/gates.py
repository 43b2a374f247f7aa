"""The gates of one request: made from its anchor scores, kept for its decode steps, and
prepared once per device for the kernels.

A prefill's scores ``s`` (0 at text, padding and unscored positions) give
``key_bias = log(1 + alpha_k s)`` and ``value_scale = 1 + alpha_v s``
(:func:`gates_from_scores`; docs/method.md section 4). :class:`RequestGates` holds them,
and :meth:`RequestGates.prepared` hands each attention call the
:class:`~videoanchor.kernels.PreparedGates` over a buffer on its device: one copy per device
per request, views afterwards, no host sync per layer. The KV cache only ever holds the
unscaled K and V: the gates enter inside the kernel.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field

import torch

from videoanchor.kernels import PreparedGates, anchor_gates, prepare_gates, value_scale_range_of

__all__ = ["RequestGates", "gates_from_scores", "value_scale_range_for"]


def value_scale_range_for(alphas_v, value_scale: torch.Tensor) -> tuple[float, float]:
    """The ``value_scale_range`` a request promises the kernels (it lets the prefill take its
    fast form): ``[1, 1 + alpha_v]`` (ordered) for every row's ``alpha_v``, since the scores
    lie in [0, 1] (docs/method.md, section 3), widened to the scales' actual range should
    they leave it. A constant of the configuration, not of the request's data, so that a
    compiled decode step (torch.compile reads the range on the host) keeps one graph for
    every request instead of specialising on each request's largest scale. Reads the
    scales' range on the host, once per request."""
    lo, hi = value_scale_range_of(value_scale)
    bounds = [1.0 + float(a) for a in alphas_v]
    lo_cfg, hi_cfg = min(1.0, *bounds), max(1.0, *bounds)
    if lo_cfg <= 0:  # alpha_v <= -1: only the scales themselves bound them away from 0
        return lo, hi
    return min(lo, lo_cfg), max(hi, hi_cfg)


def gates_from_scores(
    scores: torch.Tensor, config, rows=None, *, packed: bool = False, cache=None, pool=None
) -> RequestGates:
    """The :class:`RequestGates` of a prefill's (batch, prompt) ``scores`` under ``config``'s
    strengths, or ``rows[b]``'s (a :class:`~.handle.RowSetting` per row: each row gets its own
    gates). ``packed``: scored per sequence of a padding-free row. ``cache``: the prefill's
    KV cache (its decode steps are recognised by it). ``pool``: the handle's gate buffers
    (None: buffers of its own, for a model in training mode)."""
    if rows is None:
        key_bias, value_scale = anchor_gates(scores, config.alpha_k, config.alpha_v)
    else:  # one row at a time: each row of the batch has its own gates
        gates = [anchor_gates(scores[b : b + 1], r.alpha_k, r.alpha_v) for b, r in
                 enumerate(rows)]  # fmt: skip
        key_bias = torch.cat([g[0] for g in gates])
        value_scale = torch.cat([g[1] for g in gates])
    anchor_gates(scores, config.alpha_q, 0.0)  # validates the (no-op) query gate
    alphas_v = [config.alpha_v] if rows is None else [r.alpha_v for r in rows]
    request = RequestGates(
        key_bias=key_bias,
        value_scale=value_scale,
        value_scale_range=value_scale_range_for(alphas_v, value_scale),  # once per request
        packed=packed,
        pool=pool,
    )
    if cache is not None:
        request.cache_ref = weakref.ref(cache)
    return request


@dataclass
class RequestGates:
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

    def set_strengths(self, scores: torch.Tensor, alpha_k: float, alpha_v: float) -> None:
        """The gates of the same ``scores`` under new strengths, from the next attention call
        on (``configure()`` between the steps of a ``decode="all"`` generate)."""
        self.key_bias, self.value_scale = anchor_gates(scores, alpha_k, alpha_v)
        self.value_scale_range = value_scale_range_for([alpha_v], self.value_scale)
        self.buffers.clear()

    def check_packed(self, packed: bool) -> None:
        """Raise where the attention mask's packing is not the one the scores were made for."""
        if packed != self.packed:
            scored = "per packed sequence" if self.packed else "per row"
            raise RuntimeError(
                f"videoanchor: the scores were computed {scored} but the attention mask is "
                f"{'packed' if packed else 'not packed'}; expected both decided by the same rule "
                "(position_ids that restart, no attention_mask, no cache)"
            )

    @property
    def batch(self) -> int:
        """The gates' rows (batch size)."""
        return self.key_bias.shape[0]

    @property
    def length(self) -> int:
        """The gates' key length."""
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
