"""Record the working-set kernel's calls in one tree and replay them through another's, bit for
bit (issue 93: the lean kernel against the whole one).

``record`` wraps the tree's ``run_columns`` (``videoanchor.anchor.solvers._workset_kernel``,
or ``videoanchor.anchor._workset_kernel`` before the solvers' move) and saves each call's
inputs and outputs (``C``, ``E``, status, passes, work, the hard-column count) as one ``.npz``
per call, for calls of at most ``--max-size`` N x D; what runs: ``pytest`` on the given test
files (the hook as a plugin) and/or the default, ``reference_minimiser`` and
``solve_ssc_workset`` on ``bench_workset``'s sets (one thread). ``replay`` runs each call again
through this tree's ``run_columns`` (``--lean-first``: the lean kernel on every call, the full
one only for the columns it hands on) and compares the call's own columns (``cols[first::
step]``; in a two-thread call that stopped at its hard-column bound, those that ran in both)::

    cd OLD_TREE && python NEW_TREE/benchmarks/experiments/kernel_replay.py record \\
        --out /tmp/rec --pytest tests/test_workset.py --sets "video 8x48 D1024"
    cd NEW_TREE && python -m benchmarks.experiments.kernel_replay replay /tmp/rec [--lean-first]

(``record`` imports ``videoanchor`` and ``benchmarks`` from the folder it runs in.) Issue 93's
check: 2,839 calls recorded at eddbdcb (``tests/test_workset.py`` and the sets ``video 8x48
D1024``, ``video 16x48 D1024``, ``video 16x48 D1024, 3 tokens darkened`` and ``video 20x48
D1536, 12 subspaces of 5``), all equal in both modes. Since issue 101 the kernel takes
``grow_max`` after ``grow`` (the pass rule, ``videoanchor.anchor.plan.PassRule``): a tree
before it records and replays with ``git show 14425cb:benchmarks/experiments/kernel_replay.py``
(its rule differs: its answers are not this tree's bit for bit).
"""

from __future__ import annotations

import argparse
import glob
import importlib
import itertools
import json
import os
import sys
import threading

import numpy as np

NAMES = ("cols", "first", "step", "G", "YT", "Y", "seed_ptr", "seed_var", "seed_val", "lam_z",
         "lam_e", "tol", "grow", "grow_max", "cap", "cap_c", "max_passes", "max_inner", "max_work",
         "C", "E", "status", "passes", "work", "hard", "floor")  # fmt: skip
OUTPUTS = ("C", "E", "status", "passes", "work", "hard")


def kernel_module():
    for name in (
        "videoanchor.anchor.solvers._workset_kernel",
        "videoanchor.anchor._workset_kernel",
    ):
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    raise SystemExit("kernel_replay: no working-set kernel in this tree")


def install(out: str, max_size: int) -> None:
    """Wrap ``run_columns`` to save each call into ``out``."""
    k = kernel_module()
    if getattr(k.run_columns, "_recording", False):
        return
    orig, count, lock = k.run_columns, itertools.count(), threading.Lock()

    def run_columns(*args):
        args = list(args) + ([k.RIDGE] if len(args) == len(NAMES) - 1 else [])
        pre = {n: np.array(a, copy=True) for n, a in zip(NAMES, args, strict=True)}
        orig(*args)
        if args[3].shape[0] * args[4].shape[1] > max_size:
            return
        post = {f"out_{n}": np.array(args[NAMES.index(n)], copy=True) for n in OUTPUTS}
        with lock:
            i = next(count)
        own = np.asarray(args[0])[args[1] :: args[2]]
        np.savez(os.path.join(out, f"{os.getpid()}_{i}.npz"), own=own, **pre, **post)

    run_columns._recording = True
    k.run_columns = run_columns


class _Plugin:
    def __init__(self, out: str, max_size: int):
        self.out, self.max_size = out, max_size

    def pytest_configure(self, config):
        install(self.out, self.max_size)


def record(args) -> None:
    sys.path.insert(0, os.getcwd())
    os.makedirs(args.out, exist_ok=True)
    if args.pytest:
        import pytest

        pytest.main(["-q", *args.pytest], plugins=[_Plugin(args.out, args.max_size)])
    if args.sets:
        import warnings

        import torch

        torch.set_num_threads(1)
        install(args.out, args.max_size)
        from benchmarks.bench_workset import SETS
        from videoanchor.anchor import reference_minimiser, solve_ssc_workset
        from videoanchor.anchor.scores import ssc_coefficients

        warnings.simplefilter("ignore")
        for name in args.sets:
            x, reference = SETS[name][0](), SETS[name][1]
            ssc_coefficients(x, solver="auto")
            if reference:
                reference_minimiser(x)
                solve_ssc_workset(x, max_passes=400)
    print(f"kernel_replay: {len(glob.glob(os.path.join(args.out, '*.npz')))} calls in {args.out}")


def replay(args) -> int:
    k = kernel_module()
    if args.lean_first:
        ready = k.ready

        def lean_first(kernel="full", *, compile=True):
            return None if kernel == "full" and not compile else ready(kernel, compile=compile)

        k.ready = lean_first
    equal, different, partial = 0, [], 0
    for path in sorted(glob.glob(os.path.join(args.dir, "*.npz"))):
        r = np.load(path)
        call = [r[n].item() if r[n].ndim == 0 else r[n].copy() for n in NAMES]
        k.run_columns(*call)
        own = r["own"]
        if r["out_hard"][0] >= r["out_hard"][1] and int(r["step"]) > 1:
            partial += 1  # (which columns a two-thread call ran before its stop is the threads')
            status = call[NAMES.index("status")]
            own = own[(status[own] >= 0) & (r["out_status"][own] >= 0)]
        same = all(call[NAMES.index(n)][..., own].tobytes() == r[f"out_{n}"][..., own].tobytes()
                   for n in ("C", "E", "status", "passes", "work"))  # fmt: skip
        equal += same
        if not same:
            different.append(os.path.basename(path))
    print(json.dumps({"equal": equal, "different": len(different), "first_different":
                      different[:10], "two_thread_stops": partial}))  # fmt: skip
    return 1 if different else 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)
    rec = sub.add_parser("record")
    rec.add_argument("--out", required=True)
    rec.add_argument("--pytest", nargs="+", default=[])
    rec.add_argument("--sets", nargs="+", default=[])
    rec.add_argument("--max-size", type=int, default=3_200_000, help="N x D of a saved call")
    rep = sub.add_parser("replay")
    rep.add_argument("dir")
    rep.add_argument("--lean-first", action="store_true")
    args = ap.parse_args(argv)
    if args.command == "record":
        record(args)
        return 0
    return replay(args)


if __name__ == "__main__":
    sys.exit(main())
