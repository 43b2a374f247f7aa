"""videoanchor.anchor.warm_up: the one warm-up of the working-set kernels that
``videoanchor warmup`` and the vLLM plugin's start-up call, route by route (the CUDA
kernels stood in for: no GPU here; tests/test_workset_cuda.py compiles them on one)."""

from __future__ import annotations

import torch

from videoanchor.anchor import WarmUp, warm_up
from videoanchor.anchor.solvers import workset_cuda


def _stand_in(monkeypatch) -> list:
    calls = []
    monkeypatch.setattr(
        workset_cuda, "warm_up", lambda device: calls.append(device) or {128: 0.5, 256: 1.5}
    )
    return calls


def test_each_route_warms_its_own_kernels(monkeypatch):
    calls = _stand_in(monkeypatch)
    got = warm_up("cpu", route="admm")  # (no working-set kernel on this route)
    assert got.numba is None and got.cuda == {} and calls == [] and got.lines() == []
    got = warm_up("cpu", route="workset_then_fast")
    assert got.numba in ("compiled", "loaded") and got.numba_cache and calls == []
    assert 0 < got.numba_seconds <= got.seconds and len(got.lines()) == 1
    got = warm_up("cuda:1", route="workset_cuda")
    assert calls == [torch.device("cuda:1")] and got.numba is None
    assert got.cuda == {128: 0.5, 256: 1.5}
    assert got.lines() == [
        "the CUDA working-set kernel (slots 128, 256) compiled into or loaded from Triton's "
        "cache in 2.0 s ($TRITON_CACHE_DIR, else ~/.triton/cache)"
    ]


def test_no_route_warms_every_kernel_of_the_machine(monkeypatch):
    calls = _stand_in(monkeypatch)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    got = warm_up()
    assert isinstance(got, WarmUp) and got.numba is not None and calls == []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    got = warm_up()
    assert got.numba is not None and calls == [torch.device("cuda")]
    starts = ("the working-set SSC kernel ", "the CUDA working-set kernel ")
    assert [line.startswith(w) for line, w in zip(got.lines(), starts, strict=True)] == [True] * 2
