"""bench_workset's default (solver="auto") on each of its SETS, two trees alternated in fresh
processes, one torch thread: the default's wall and CPU seconds, route and certificate, and a
digest of C, so that the trees can be compared in one run on one machine.

    python ab_default.py OLD_TREE NEW_TREE --reps 3 --out ab_default.json
(each tree a directory holding a checkout: ``git archive SHA | tar -x -C DIR``)
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import time

CHILD = r"""
import json, os, sys, time, warnings
sys.path.insert(0, os.getcwd())
import torch
torch.set_num_threads(1)
from benchmarks.bench_workset import SETS
from benchmarks.common import first_call_seconds
from videoanchor.anchor import duality_gaps
from videoanchor.anchor.scores import ssc_coefficients
import hashlib
name = sys.argv[1]
first = first_call_seconds()
x = SETS[name][0]()
out = {"set": name, "first_call_seconds": first, "x_sha": hashlib.sha1(x.numpy().tobytes()).hexdigest()[:12]}
for i in range(2):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        c0, t0 = time.process_time(), time.perf_counter()
        res = ssc_coefficients(x, solver="auto")
        out[f"seconds_{i}"] = time.perf_counter() - t0
        out[f"cpu_seconds_{i}"] = time.process_time() - c0
out["solver"] = res.solver
c = res.coef.double()
out["gap"] = duality_gaps(x, c, res.lambda_e, res.lambda_z).max_gap
out["coef_sha"] = hashlib.sha1(res.coef.numpy().tobytes()).hexdigest()[:12]
print("RESULT " + json.dumps(out))
"""


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("old")
    ap.add_argument("new")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--only", nargs="+", default=None)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    names = a.only
    if names is None:
        names = json.loads(
            subprocess.run(
                [
                    sys.executable,
                    "-c",
                    "import sys, os, json; sys.path.insert(0, os.getcwd());"
                    "from benchmarks.bench_workset import SETS; print(json.dumps(list(SETS)))",
                ],
                cwd=a.new,
                capture_output=True,
                text=True,
                check=True,
            ).stdout
        )
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    rows = []
    meta = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "trees": {"old": os.path.abspath(a.old), "new": os.path.abspath(a.new)},
        "load_before": list(os.getloadavg()),
        "reps": a.reps,
    }
    for rep in range(a.reps):
        for name in names:
            order = ("old", "new") if rep % 2 == 0 else ("new", "old")
            for tree in order:
                p = subprocess.run(
                    [sys.executable, "-c", CHILD, name],
                    cwd=getattr(a, tree),
                    capture_output=True,
                    text=True,
                    env=env,
                )
                line = [l for l in p.stdout.splitlines() if l.startswith("RESULT ")]
                if p.returncode or not line:
                    raise SystemExit(f"{tree} {name}: rc {p.returncode}\n{p.stderr[-3000:]}")
                row = json.loads(line[0][7:])
                row.update(tree=tree, rep=rep, load=list(os.getloadavg()))
                rows.append(row)
                print(json.dumps(row), flush=True)
    meta["load_after"] = list(os.getloadavg())
    with open(a.out, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
