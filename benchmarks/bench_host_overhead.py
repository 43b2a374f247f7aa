"""Host time of one anchored attention call, with the Triton launches replaced by no-ops:
decode steps at three cache lengths and a 2048-token prefill (the gates in the general and in
the fast form), with the gates against without.

What our Python does around the kernels on every call (option checks, the key bias turned
into log2 units and shifted by its maximum, output and partial-result allocations), timed on
CPU tensors: on a GPU each of those torch ops is also a kernel launch, and a decode step at
batch 1 has only microseconds of kernel work, so this host time is its floor. Measured: the
host time per call (median of rounds), the torch operators per call (profiler) and the
Triton launches per call (stubbed). Not
included: Triton's own launch cost and the GPU's launch latency (a GPU run measures those).

    python benchmarks/bench_host_overhead.py
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")  # no GPU needed: the launches are stubbed

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import videoanchor  # noqa: E402
from benchmarks.common import environment, print_table, write_result  # noqa: E402
from videoanchor.kernels import triton_decode, triton_prefill  # noqa: E402
from videoanchor.kernels.interface import value_scale_range_of  # noqa: E402


def measure(S: int, Sq: int, gates: bool, calls: int, rounds: int, fast: bool = False) -> dict:
    g = torch.Generator().manual_seed(S + Sq)
    q = torch.randn(1, 28, Sq, 128, generator=g, dtype=torch.float16)
    k = torch.randn(1, 4, S, 128, generator=g, dtype=torch.float16)
    v = torch.randn(1, 4, S, 128, generator=g, dtype=torch.float16)
    kb = torch.rand(1, S, generator=g) if gates else None
    vs = 1 + torch.rand(1, S, generator=g) if gates else None

    extra = {"value_scale_range": value_scale_range_of(vs)} if fast and gates else {}

    def call():
        return videoanchor.anchored_attention(q, k, v, kb, vs, backend="triton", **extra)

    call()
    per = []
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(calls):
            call()
        per.append((time.perf_counter() - t) / calls)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(10):
            call()
    ops = sum(e.count for e in prof.key_averages() if e.key.startswith("aten::"))
    return {
        "kind": "decode" if Sq == 1 else "prefill",
        "S": S, "Sq": Sq, "gates": gates,
        "form": ("fast" if fast else "general") if gates else None,
        "host_us_per_call": statistics.median(per) * 1e6,
        "aten_ops_per_call": ops / 10,
        "figures": "measured on this CPU, kernel launches stubbed",
    }  # fmt: skip


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out-dir", default=None)
    args = ap.parse_args(argv)
    launches = []
    triton_decode.launch = lambda *a, **k: launches.append(a[0])
    triton_prefill.launch = lambda *a, **k: launches.append(a[0])
    torch.set_num_threads(1)
    meta = environment("cpu")
    meta["torch_threads"] = 1
    rows = []
    # decode at three cache lengths, then a prefill of S = 2048 (16 frames of Qwen2.5-VL-7B):
    # the gates in the general form and in the fast form the integration runs
    cases = [(S, 1, gates, False) for S in (8192, 32768, 131072) for gates in (False, True)]
    cases += [(2048, 2048, False, False), (2048, 2048, True, False), (2048, 2048, True, True)]
    for S, Sq, gates, fast in cases:
        launches.clear()
        rows.append(measure(S, Sq, gates, args.calls, args.rounds, fast))
        rows[-1]["triton_launches_per_call"] = len(launches) / (1 + args.calls * args.rounds + 10)
    print_table(rows, ["kind", "S", "gates", "form", "host_us_per_call", "aten_ops_per_call",
                       "triton_launches_per_call"])  # fmt: skip
    print(f"wrote {write_result('host_overhead', meta, rows, args.out_dir)}")


if __name__ == "__main__":
    main()
