"""Host time of one anchored attention call, with the Triton launches recorded, not run:
decode steps at three cache lengths and a 2048-token prefill (the gates in the general and in
the fast form), without gates, with the gates given to every call, and with the gates
prepared once (``prepare_gates``, what the transformers integration passes to every layer).

What our Python does around the kernels on every call (option checks, the key bias turned
into log2 units and shifted by its maximum, output and partial-result allocations), timed on
CPU tensors: on a GPU each of those torch ops is also a kernel launch, and a decode step at
batch 1 has only microseconds of kernel work, so this host time is its floor. Measured: the
host time per call (median of rounds), and per call, counted with the torch profiler: the
torch operators, the allocations (``aten::empty`` / ``aten::empty_strided``) and the host
reads of tensor values (:data:`SYNC_OPS`, plus ``tolist`` / ``numpy``), each of which
synchronises the host with a GPU; and the Triton launches per call (recorded by
``launch.capture_launches``, entered around each call: its grid check included, about a
microsecond of its own). Not included: Triton's own launch cost and the GPU's launch latency
(a GPU run measures those).

    python benchmarks/bench_host_overhead.py
"""

from __future__ import annotations

import contextlib
import os
import statistics
import sys
import time
from pathlib import Path

if __name__ == "__main__":  # no GPU needed: the launches are recorded (tests import host_counts)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import videoanchor  # noqa: E402
from benchmarks.common import environment, finish, parser  # noqa: E402
from videoanchor.kernels.gates import prepare_gates, value_scale_range_of  # noqa: E402
from videoanchor.kernels.launch import capture_launches  # noqa: E402

#: Operators that read a tensor's value on the host: on a GPU each waits for the stream.
SYNC_OPS = frozenset(
    {"aten::item", "aten::_local_scalar_dense", "aten::is_nonzero", "aten::nonzero",
     "aten::equal", "aten::allclose"}
)  # fmt: skip
#: The operators that allocate (the factory functions all end in one of these).
ALLOC_OPS = frozenset({"aten::empty", "aten::empty_strided"})


@contextlib.contextmanager
def _count_direct_reads(counter: list):
    """``Tensor.tolist`` and ``Tensor.numpy`` read values without an operator the profiler
    sees on a CPU tensor (on a GPU they copy to the host first): count them too."""
    saved = {name: getattr(torch.Tensor, name) for name in ("tolist", "numpy")}

    def wrap(fn):
        def counted(self, *a, **k):
            counter.append(fn.__name__)
            return fn(self, *a, **k)

        return counted

    try:
        for name, fn in saved.items():
            setattr(torch.Tensor, name, wrap(fn))
        yield counter
    finally:
        for name, fn in saved.items():
            setattr(torch.Tensor, name, fn)


def host_counts(call, n: int = 10) -> dict:
    """Per call of ``call()`` (averaged over ``n`` calls after one warm-up): torch operators
    (``aten::``), allocations and host reads of tensor values, from the torch profiler."""
    call()
    reads: list = []
    with (
        _count_direct_reads(reads),
        torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof,
    ):
        for _ in range(n):
            call()
    events = list(prof.events())
    names = [e.name for e in events]
    # A device-side assertion (torch._assert_async) reads its flag on a CPU tensor, never
    # on a CUDA one: what runs inside it is not a host read.
    syncs = [e.name for e in events if e.name in SYNC_OPS and not _inside_assert(e)]
    return {
        "aten_ops_per_call": sum(x.startswith("aten::") for x in names) / n,
        "allocations_per_call": sum(x in ALLOC_OPS for x in names) / n,
        "syncs_per_call": (len(syncs) + len(reads)) / n,
        "sync_ops": sorted(set(syncs) | set(reads)),
    }


def _inside_assert(event) -> bool:
    parent = event.cpu_parent
    while parent is not None:
        if parent.name == "aten::_assert_async":
            return True
        parent = parent.cpu_parent
    return False


def measure(S: int, Sq: int, gates: str | None, calls: int, rounds: int, fast: bool = False):
    """One row: ``gates`` None (no gates), "given" (key_bias / value_scale passed to every
    call, which prepares them) or "prepared" (``prepare_gates`` once, ``gates=``)."""
    g = torch.Generator().manual_seed(S + Sq)
    q = torch.randn(1, 28, Sq, 128, generator=g, dtype=torch.float16)
    k = torch.randn(1, 4, S, 128, generator=g, dtype=torch.float16)
    v = torch.randn(1, 4, S, 128, generator=g, dtype=torch.float16)
    kb = torch.rand(1, S, generator=g) if gates else None
    vs = 1 + torch.rand(1, S, generator=g) if gates else None
    rng = value_scale_range_of(vs) if fast and gates else None
    if gates == "prepared":
        prepared = prepare_gates(kb, vs, value_scale_range=rng)

        def attend():
            return videoanchor.anchored_attention(q, k, v, gates=prepared, backend="triton")
    else:

        def attend():
            return videoanchor.anchored_attention(
                q, k, v, kb, vs, backend="triton", value_scale_range=rng
            )

    launched = []

    def call():  # the launches recorded, not run; counted, then dropped with their tensors
        with capture_launches() as launches:
            attend()
        launched.append(len(launches))

    call()
    per = []
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(calls):
            call()
        per.append((time.perf_counter() - t) / calls)
    return {
        "kind": "decode" if Sq == 1 else "prefill",
        "S": S, "Sq": Sq, "gates": gates,
        "form": ("fast" if fast else "general") if gates else None,
        "host_us_per_call": statistics.median(per) * 1e6,
        "host_us_min": min(per) * 1e6,
        **host_counts(call),
        "triton_launches_per_call": sum(launched) / len(launched),
        "figures": "measured on this CPU, kernel launches recorded (not run)",
    }  # fmt: skip


def main(argv=None):
    ap = parser(__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    meta = environment("cpu")
    meta["torch_threads"] = 1
    rows = []
    # decode at three cache lengths, then a prefill of S = 2048 (16 frames of Qwen2.5-VL-7B):
    # the gates in the general form and in the fast form the integration runs
    # the gates given to every call against prepared once (what the integrations pass)
    kinds = (None, "given", "prepared")
    cases = [(S, 1, gates, False) for S in (8192, 32768, 131072) for gates in kinds]
    cases += [(2048, 2048, gates, fast) for gates in kinds for fast in (False, True)
              if gates or not fast]  # fmt: skip
    for S, Sq, gates, fast in cases:
        rows.append(measure(S, Sq, gates, args.calls, args.rounds, fast))
    finish("host_overhead", meta, rows, args.out_dir,
           ["kind", "S", "gates", "form", "host_us_per_call", "host_us_min", "aten_ops_per_call",
            "allocations_per_call", "syncs_per_call", "triton_launches_per_call"])  # fmt: skip


if __name__ == "__main__":
    main()
