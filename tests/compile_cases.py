"""Shared by the compile tests: (case, cc) pairs compiled ahead of time in two child
processes (CI has two cores), rows grouped per pair."""

import concurrent.futures

import pytest
import torchvision_shim

from videoanchor.kernels import aot


def compile_cases(jobs: list[tuple[dict, int]]) -> dict:
    """``{(repr(case), cc): rows}`` for every pair; skips with the reason where the
    installed Triton has no usable ahead-of-time compiler."""
    reason = aot.unavailable_reason()
    if reason:
        pytest.skip(reason)
    halves = [jobs[0::2], jobs[1::2]]  # round-robin
    # The child does not run conftest.py: python_m applies the torchvision shim there too.
    argv = torchvision_shim.python_m("videoanchor.kernels.aot")
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        parts = list(pool.map(lambda half: aot.compile_in_subprocess(half, argv=argv), halves))
    rows = {}
    for half, part in zip(halves, parts, strict=True):
        for case, cc in half:
            rows[(repr(case), cc)] = [r for r in part if r["case"] == case and r["cc"] == cc]
    return rows
