"""CUDA graphs captured without stopping the device (issue 98): the Chebyshev filter's
steps (:mod:`videoanchor.anchor.eigensolvers`) and the working sets' passes
(:mod:`videoanchor.anchor.solvers.workset_cuda`) capture through :func:`capture`."""

from __future__ import annotations

import contextlib

import torch


def capture(run, side, pool=None):
    """``(graph, out)``: ``run()`` captured as a CUDA graph on the stream ``side`` (the
    caller has warmed ``run`` up there, as torch asks), into ``pool`` (a private pool where
    None), in the thread-local capture mode: another thread's allocation or sync during the
    capture (vLLM's scoring thread beside the model's) does not break it. ``out`` is what
    ``run`` returned in the capture, refilled by a replay. ``torch.cuda.graph`` is not used:
    its ``__enter__`` synchronises the device, empties the allocator's cache (a server's
    blocks included) and, in torch before 2.13, collects garbage. A ``run`` that raises ends
    the capture and raises its own error."""
    graph = torch.cuda.CUDAGraph()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        graph.capture_begin(pool=pool, capture_error_mode="thread_local")
        try:
            out = run()
        except BaseException:
            with contextlib.suppress(Exception):  # (the capture's own error is the one raised)
                graph.capture_end()
            raise
        graph.capture_end()
    torch.cuda.current_stream().wait_stream(side)
    return graph, out
