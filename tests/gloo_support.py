"""One rank of a group of CPU processes over gloo, for the tests that spawn ranks with
``torch.multiprocessing`` (test_split_ssc, test_blocked, test_bad_input,
test_vllm_ahead_split)."""

from __future__ import annotations

import datetime

import torch


def join_gloo(rank: int, world: int, store: str, seconds: float = 120) -> None:
    """Join as ``rank`` of ``world`` processes (gloo, meeting through the file ``store``),
    with one torch thread. A collective waiting on a rank that left raises after ``seconds``
    instead of hanging."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{store}", rank=rank, world_size=world,
        timeout=datetime.timedelta(seconds=seconds),
    )  # fmt: skip
