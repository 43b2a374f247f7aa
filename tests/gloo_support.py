"""One rank of a group of CPU processes over gloo, for the tests that spawn ranks with
``torch.multiprocessing`` (test_split_ssc, test_blocked, test_bad_input,
test_vllm_ahead_split)."""

from __future__ import annotations

import datetime
import os
import sys

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


def leave() -> None:
    """End this rank's process once its work is done and its results are on disk, without
    the interpreter's teardown. With torch 2.13's gloo, a rank that raised after a
    collective-guarded agreement (bad input on one rank: every rank raises together) aborts
    at exit now and then, after its group was destroyed ("terminate called without an
    active exception", SIGABRT, no Python frame; 1 run in 6-12 of a two-rank test, also at
    d6e7961): the spawning test then failed though every result was written. A worker that
    raises does not get here, so its error still reaches ``mp.spawn``."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
