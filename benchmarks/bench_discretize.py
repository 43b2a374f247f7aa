"""Issue 90 step 1: the discretisation (``clustering.discretize``) and the steady share's
paths (``clustering.steady_stability``: the default share's labels and stability, its host
work after the eigensolver) with their decisions compiled (``anchor/labels.py``),
against the torch loop they replaced (``tests/discretize_reference.py``), in one process.

Timing sets (k = 24, the embedding and eigengap of ``spectral_pairs`` as ``steady_shares``
reads them): the video-like set of Qwen2.5-VL-7B's 16-frame count (16 x 128 tokens, D = 1024,
the default solver's ``C``: N = 2048), and ``bench_spectral.py``'s affinities at N = 2048 and
8192 (``gap``: 24 separated groups; ``no_gap``: 16 groups, no gap at 24, repeated picks and
empty labels). Per set: one ``discretize`` draw (seed 0) and one ``steady_stability`` call at
the set's eigengap, old and new alternated (``--reps`` rounds, the order swapped each round),
one thread (``torch.set_num_threads(1)``), medians of the wall time and of the thread's CPU
time (the machine may be shared: the load average is recorded); and per call of each the
torch operators, allocations and host reads (``bench_host_overhead.host_counts``: on the CPU
every read of a tensor's value counts; the new form's are its one copy of the rows and the
two LAPACK status reads of each SVD, host tensors on any device).

Equality (every set, and ``share_family.py``'s plain sets: video-like, the tiny model's
projector outputs, Yale B where the file is, each solved by the default solver; ``--cache``):
three label draws, ``discretize(seed=0)``, ``steady_stability`` with two draws at the set's
eigengap and with one at an eigengap that puts the path's margin inside the ramp (pick
alternatives run), and ``path_margin``, each compared with the reference bit for bit.

Compile: the first call in a process with an empty Numba cache, and in the next one (its
cache filled), in child processes: the thread CPU seconds of the first ``discretize`` after
Numba has compiled one trivial function (its own start-up, shared with every kernel).

    python benchmarks/bench_discretize.py                # writes discretize_cpu.json
    python benchmarks/bench_discretize.py --quick        # N = 2048 sets, 2 rounds, 3 equality sets
"""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numba
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
from discretize_reference import (  # noqa: E402
    discretize_reference,
    path_margin_reference,
    steady_stability_reference,
)

from benchmarks import share_family as fam  # noqa: E402
from benchmarks.bench_host_overhead import host_counts  # noqa: E402
from benchmarks.bench_spectral import group_affinity  # noqa: E402
from benchmarks.common import environment, finish, parser, skip  # noqa: E402
from videoanchor.anchor.clustering import (  # noqa: E402
    EXTRA_PAIRS,
    discretize,
    label_random_state,
    labels_from_embedding,
    ssc_affinity,
    steady_stability,
)
from videoanchor.anchor.eigensolvers import spectral_pairs  # noqa: E402
from videoanchor.anchor.labels import path_margin  # noqa: E402

K = 24


def video_affinity(cache):
    return ssc_affinity(fam.solve(fam.video(16, 128, 1024, 0), cache))


def groups(n, structure):
    g, nnz, p_out = {"gap": (24, 10, 0.02), "no_gap": (16, 60, 0.8)}[structure]
    return lambda cache: group_affinity(n, g, nnz, p_out, seed=0, dtype=torch.float64)


TIMING = {
    "video 16x128 D1024 (N = 2048)": video_affinity,
    "groups gap (N = 2048)": groups(2048, "gap"),
    "groups no_gap (N = 2048)": groups(2048, "no_gap"),
    "groups gap (N = 8192)": groups(8192, "gap"),
    "groups no_gap (N = 8192)": groups(8192, "no_gap"),
}


def embedding(w):
    """``(embedding, eigengap)`` at k = 24, as ``steady_shares`` reads them."""
    theta, vecs, dd, _ = spectral_pairs(w, K, extra=EXTRA_PAIRS, seed=0)
    return vecs[:, :K] / dd[:, None], float(theta[K - 1] - theta[K])


def same(e, gap) -> dict:
    """The new form against the reference on one embedding (module docstring)."""
    n = e.shape[0]
    rng = label_random_state(0, n)
    want = torch.stack([discretize_reference(e, random_state=rng) for _ in range(3)])
    out = dict(labels_3_draws=torch.equal(labels_from_embedding(e, K, draws=3), want),
               discretize=torch.equal(discretize(e), discretize_reference(e)))  # fmt: skip
    m = path_margin_reference(e)
    out["path_margin"] = path_margin(e) == m
    ramp = 1.5e-5 / m if 0 < m < math.inf else 1.0
    for name, g, draws in (("steady_own_gap", gap, 2), ("steady_ramp_gap", ramp, 1)):
        labels, z = steady_stability(e, g, draws=draws)
        want_labels, want_z = steady_stability_reference(e, g, draws=draws)
        out[name] = torch.equal(labels, want_labels) and z == want_z
    out["all_equal"] = all(out.values())
    return out


def timed(fn) -> tuple[float, float]:
    w, c = time.perf_counter(), time.thread_time()
    fn()
    return time.perf_counter() - w, time.thread_time() - c


def measure(name: str, w: torch.Tensor, reps: int) -> dict:
    e, gap = embedding(w)
    calls = {
        ("discretize", "old"): lambda: discretize_reference(e),
        ("discretize", "new"): lambda: discretize(e),
        ("steady", "old"): lambda: steady_stability_reference(e, gap),
        ("steady", "new"): lambda: steady_stability(e, gap),
    }
    for fn in calls.values():
        fn()
    samples = {key: [] for key in calls}
    for rep in range(reps):
        for what in ("discretize", "steady"):
            for who in ("old", "new") if rep % 2 == 0 else ("new", "old"):
                samples[what, who].append(timed(calls[what, who]))
    row = dict(kind="timing", set=name, n=int(e.shape[0]), k=K, gap=gap, reps=reps,
               stability=steady_stability(e, gap)[1])  # fmt: skip
    for (what, who), ts in samples.items():
        row[f"{what}_{who}_seconds"] = statistics.median(t for t, _ in ts)
        row[f"{what}_{who}_cpu_seconds"] = statistics.median(c for _, c in ts)
        row[f"{what}_{who}_samples"] = ts
        counts = host_counts(calls[what, who], n=1)
        row[f"{what}_{who}_ops"] = counts["aten_ops_per_call"]
        row[f"{what}_{who}_allocations"] = counts["allocations_per_call"]
        row[f"{what}_{who}_host_reads"] = counts["syncs_per_call"]
    for what in ("discretize", "steady"):
        row[f"{what}_speedup_cpu"] = row[f"{what}_old_cpu_seconds"] / row[f"{what}_new_cpu_seconds"]
    row.update(same(e, gap))
    return row


_CHILD = """
import json, sys, time
sys.path.insert(0, sys.argv[1])
import numba, numpy as np, torch
@numba.njit
def trivial(x):
    return x[0] + 1.0
t = time.thread_time(); trivial(np.zeros(1)); numba_start = time.thread_time() - t
from videoanchor.anchor.clustering import discretize
e = torch.from_numpy(np.random.RandomState(0).randn(60, 4))
t = time.thread_time(); discretize(e); first = time.thread_time() - t
t = time.thread_time(); discretize(e); second = time.thread_time() - t
print(json.dumps(dict(numba_start=numba_start, first_call=first, second_call=second)))
"""


def compile_cost() -> dict:
    """The first call's CPU seconds with an empty Numba cache, and with it filled (no background
    compile: since issue 101 it would compile the loops in another process)."""
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "NUMBA_CACHE_DIR": cache, "VIDEOANCHOR_PRECOMPILE": "0"}
        runs = []
        for _ in range(2):
            out = subprocess.run([sys.executable, "-c", _CHILD, str(ROOT)], env=env,
                                 capture_output=True, text=True, check=True)  # fmt: skip
            runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return dict(kind="compile", set="60 x 4 embedding, child processes",
                empty_cache=runs[0], filled_cache=runs[1],
                compile_cpu_seconds=runs[0]["first_call"] - runs[1]["first_call"])  # fmt: skip


def main(argv=None):
    ap = parser(__doc__, quick="the N = 2048 sets, 2 rounds, 3 equality sets")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--cache", default=os.environ.get("VIDEOANCHOR_SHARE_CACHE"))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    meta = environment("cpu")
    meta.update(torch_threads=1, loadavg_start=os.getloadavg(), n_clusters=K,
                numba=numba.__version__, numpy=np.__version__,
                what="discretize and steady_stability: the compiled decisions (new) against "
                     "the torch loop they replaced (old, tests/discretize_reference.py)")  # fmt: skip
    timing = list(TIMING)
    plain = list(fam.plain_sets(large=False))
    if args.quick:
        timing, plain, args.reps = [n for n in timing if "2048" in n], plain[:3], 2
        skip("bench_discretize", "--quick: the N = 2048 sets, 2 rounds, 3 equality sets")
    rows = [compile_cost()]
    print(rows[-1], flush=True)
    for name in timing:
        rows.append(measure(name, TIMING[name](args.cache), args.reps))
        print({k: v for k, v in rows[-1].items() if not k.endswith("samples")}, flush=True)
    for name, kind, make in plain:
        x = make()
        if x is None:
            continue
        e, gap = embedding(ssc_affinity(fam.solve(x, args.cache)))
        rows.append(dict(kind="equality", set=name, family=kind, n=int(e.shape[0]), k=K,
                         gap=gap, **same(e, gap)))  # fmt: skip
        print(rows[-1], flush=True)
    compared = [r for r in rows if "all_equal" in r]
    meta.update(loadavg_end=os.getloadavg(), sets_compared=len(compared),
                sets_all_equal=sum(r["all_equal"] for r in compared))  # fmt: skip
    cols = ["kind", "set", "n", "discretize_old_cpu_seconds", "discretize_new_cpu_seconds",
            "steady_old_cpu_seconds", "steady_new_cpu_seconds", "discretize_old_host_reads",
            "discretize_new_host_reads", "steady_old_host_reads", "steady_new_host_reads",
            "all_equal"]  # fmt: skip
    return finish("discretize" + ("_quick" if args.quick else ""), meta, rows, args.out_dir, cols)


if __name__ == "__main__":
    main()
