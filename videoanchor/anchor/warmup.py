"""The working-set kernels loaded or compiled ahead of the first solve, in one place: what
``videoanchor warmup`` (a container image's build step) and the vLLM plugin's start-up run.

The CPU's working sets run a Numba kernel, in two variants (lean and full,
:mod:`.solvers._workset_kernel`), that Numba compiles in the first process needing it and
keeps in its on-disk cache; the CUDA working sets run Triton kernels at each level of slots
(:mod:`.solvers.workset_cuda`), kept in Triton's cache. :func:`warm_up` makes both ready and
says what it did (:class:`WarmUp`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

__all__ = ["WarmUp", "warm_up"]

#: Tokens and dimensions of the set the CPU kernel solves once after its compile (a check
#: that it runs, not a measurement).
CHECK_SHAPE = (12, 6)


@dataclass(frozen=True)
class WarmUp:
    """What :func:`warm_up` did. ``seconds``: its wall time. ``numba``: ``"compiled"`` where
    this process compiled a working-set kernel of the CPU (and saved it in Numba's cache),
    ``"loaded"`` where it loaded every one it holds from there, None where none was warmed;
    ``numba_cache``: that cache's folder; ``numba_seconds``: the CPU kernels' part of
    ``seconds`` (their load or compile and the check's solve). ``cuda``: the seconds of each level of the CUDA
    working sets' Triton kernels, by its coefficient slots (empty: none warmed)."""

    seconds: float
    numba: str | None = None
    numba_cache: str | None = None
    numba_seconds: float = 0.0
    cuda: dict[int, float] = field(default_factory=dict)

    def lines(self) -> list[str]:
        """One line per kind of kernel warmed, as ``videoanchor warmup`` prints them."""
        out = []
        if self.numba is not None:
            how = "compiled into" if self.numba == "compiled" else "loaded from"
            out.append(f"the working-set SSC kernel {how} Numba's cache in {self.numba_seconds:.1f} s: "
                       f"{self.numba_cache}")  # fmt: skip
        if self.cuda:
            out.append(f"the CUDA working-set kernel (slots {', '.join(map(str, self.cuda))}) "
                       f"compiled into or loaded from Triton's cache in "
                       f"{sum(self.cuda.values()):.1f} s ($TRITON_CACHE_DIR, else "
                       "~/.triton/cache)")  # fmt: skip
        return out


def _numba_kernels() -> tuple[str | None, str | None]:
    """``(how, cache folder)`` of the CPU kernels this process holds (:class:`WarmUp`), from
    the kernel module's record of its loads and compiles; ``(None, None)`` where it has not
    been imported or holds none."""
    import sys

    kernel = sys.modules.get("videoanchor.anchor.solvers._workset_kernel")
    if kernel is None or not kernel.EVENTS:
        return None, None
    how = "compiled" if any(e["how"] == "compiled" for e in kernel.EVENTS) else "loaded"
    return how, kernel.solve_columns.stats.cache_path


def warm_up(device=None, *, route: str | None = None) -> WarmUp:
    """Load the working-set kernels that a solve on ``device`` runs from their caches, or
    compile them into those, and run each once, so that the first request does not wait
    for them. ``route``: the plan's route (:data:`~videoanchor.anchor.plan.ROUTES`, e.g. an
    engine's ``ssc_plan(...).route``) whose kernels to warm: ``"workset_then_fast"`` the
    CPU's (both variants, the lean one first), ``"workset_cuda"`` the CUDA ones on
    ``device`` (every level of slots); another route has none. None: every working-set
    kernel of this machine, the CPU's and, where ``device`` is a CUDA device or (``device``
    None) CUDA is available, the CUDA ones. Raises what a compile raises, and a
    RuntimeError where the CPU kernel ran but did not solve a 12-point set."""
    t0 = time.perf_counter()
    if device is None:
        device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(device)
    cpu = route in (None, "workset_then_fast")
    cuda = route == "workset_cuda" or (route is None and device.type == "cuda")
    if cpu:
        from videoanchor.anchor.solvers import _workset_kernel
        from videoanchor.anchor.solvers.workset import solve_ssc_workset

        _workset_kernel.precompile()
        x = torch.randn(*CHECK_SHAPE, generator=torch.Generator().manual_seed(0))
        if not solve_ssc_workset(x).converged:
            raise RuntimeError("the working-set kernel ran but did not solve a 12-point set")
    cpu_seconds = time.perf_counter() - t0
    took = {}
    if cuda:
        from videoanchor.anchor.solvers import workset_cuda

        took = workset_cuda.warm_up(device)
    how, cache = _numba_kernels() if cpu else (None, None)
    return WarmUp(time.perf_counter() - t0, how, cache, cpu_seconds if cpu else 0.0, took)
