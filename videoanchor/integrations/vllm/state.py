"""Per-step data handed from the model runner to the attention backend, in one process.

The runner (:mod:`.runner`) fills it before each forward: per scheduled token, in the
step's flat token order (the order of ``slot_mapping``), the gates to store in the token's
slot; per sequence, in batch order (the order of ``seq_lens`` / ``block_table``), whether
its queries read the gates, and how many of its first queries do (a chunk can hold the end
of a prompt and generated tokens: a preempted request's recompute). The backend (:mod:`.backend`) writes the token gates into a
per-slot gate cache through ``slot_mapping`` (once per step) and reads them through the
block table. vLLM's CPU engine runs its worker in the engine-core process, so both run in
the same process; one engine's runner and backend share an ``owner`` key.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class StepState:
    owner: int | None = None
    step: int = 0
    key_bias: torch.Tensor | None = None  # (num_scheduled_tokens,) float32
    value_scale: torch.Tensor | None = None
    seq_anchored: list[bool] = field(default_factory=list)
    # Per sequence: how many of its first scheduled queries read the gates (the others do
    # not); its length is that of seq_anchored. Empty: all queries of a flagged sequence.
    seq_gated_queries: list[int] = field(default_factory=list)
    written: int = -1  # the step whose gates are in the gate cache


STEP = StepState()
#: (owner, num_blocks, block_size) -> (key_bias cache, value_scale cache), each
#: (num_blocks, block_size) float32.
GATE_CACHES: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def gate_cache(owner: int, num_blocks: int, block_size: int, device) -> tuple:
    key = (owner, num_blocks, block_size)
    caches = GATE_CACHES.get(key)
    if caches is None:
        caches = GATE_CACHES[key] = (
            torch.zeros(num_blocks, block_size, dtype=torch.float32, device=device),
            torch.ones(num_blocks, block_size, dtype=torch.float32, device=device),
        )
    return caches
