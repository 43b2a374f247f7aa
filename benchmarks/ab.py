"""A/B of two trees: one workload run in fresh processes, the trees alternated, on one machine
in one run, so that the two are compared under the same load. Medians per tree and their
ratio (B / A), and every process's row, in one JSON file with the device, the versions and
each tree's git SHA (``benchmarks/common.py``'s metadata).

    python benchmarks/ab.py A B (--workload NAME | --function FILE:FUNC | --command CMD)
                            [--cases C1 C2 ...] [--rounds 3] --out ab.json

A and B: a directory holding a checkout (a ``git worktree``, a ``git archive`` of a commit
unpacked), or a revision of this repository (a commit, a branch, ``HEAD~1``), which is
unpacked with ``git archive`` into a temporary directory for the run. Each (round, case,
tree) is one process started in the tree's directory with the tree first on ``PYTHONPATH``
(and ``VIDEOANCHOR_GIT_SHA`` set to the tree's commit, which a ``git archive`` cannot tell).
Order: A then B in even rounds, B then A in odd ones (``--order abba``, the default, which
cancels a drift over the run), or A, B, A, B... (``--order ab``).

The workload, one of:

- ``--workload NAME``: one of :data:`WORKLOADS` below (``workset-default``: the default
  anchor scores' SSC, ``ssc_coefficients(x, solver="auto")``, on each of bench_workset's
  ``SETS``; ``import``: ``import videoanchor``);
- ``--function FILE:FUNC``: ``FUNC(case)`` from the Python file ``FILE`` (read from where this
  script runs, executed in each tree's process, so its imports are the tree's: import the
  package inside the function). It returns a zero-argument callable, or ``(callable, info)``
  with ``info`` a dict of fields to record; the callable is timed ``--calls`` times (wall and
  CPU seconds) and its last return value, where a dict, is recorded too (an answer's digest,
  its route). Where ``FUNC`` has an attribute ``cases`` (a function) and ``--cases`` is not
  given, its cases are ``FUNC.cases()`` as tree B lists them;
- ``--command CMD``: a shell command, ``{case}`` replaced by the case; its process's wall
  time is ``seconds``; a line ``AB_RESULT {json}`` that it prints adds its fields (its own
  timing, for instance, then chosen with ``--metric``).

The metric (``--metric``, default ``seconds``): a field of each row; where a list (one value a
call), its least. The summary per case: the median over the rounds of each tree, the ratio
``b_median / a_median`` and every value; and, for each text field (a digest, a route), the
values each tree gave, so that a change of answer shows beside a change of time.
``--threads N`` (default 1) sets ``OMP_NUM_THREADS``, ``MKL_NUM_THREADS``,
``OPENBLAS_NUM_THREADS`` and ``NUMBA_NUM_THREADS`` in the processes (0: leave them).

The JSON: ``meta`` (``benchmarks.common.environment()``: the device, the versions, the date,
the load and ``git_sha``, the checkout that ran this script; ``trees``: each tree's path,
source and commit; the workload, cases and settings; the load before and after), ``summary``
(one entry a case) and ``rows`` (one a process: its fields, ``process_seconds``, the tree,
round and case, the load after it, ``package``: where it imported ``videoanchor`` from,
checked to be inside its tree).

Examples (the first is the A/B of ``benchmarks/results/logs/workset-ab-2026-11-27b/``):

    python benchmarks/ab.py 7aed379 de89308 --workload workset-default --rounds 3 \\
        --metric cpu_seconds --out /tmp/ab_default_cpu.json
    python benchmarks/ab.py HEAD~1 . --command "python benchmarks/bench_x.py --quick" \\
        --rounds 5 --out /tmp/ab_x.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PREFIX = "AB_RESULT "
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMBA_NUM_THREADS")

# ---- workloads ---------------------------------------------------------------------------
# Run inside each tree's process (this file is loaded there by path): import the package
# inside the function, so that it is the tree's.


def workset_default(case: str):
    """bench_workset's set ``case`` (the tree's own ``SETS``: each tree generates it, and
    ``x_sha`` shows that both generated the same features) and the default's SSC on it,
    after the working-set kernel's first call (``first_call_seconds``: Numba compiles or
    loads it). Records the route, the largest column gap of the float64 answer and a
    digest of ``C``. (``ab_default.py`` of 2026-11-27, one torch thread with ``--threads 1``.)"""
    import hashlib
    import warnings

    from benchmarks.bench_workset import SETS
    from benchmarks.common import first_call_seconds
    from videoanchor.anchor import duality_gaps, ssc_coefficients

    first = first_call_seconds()
    x = SETS[case][0]()
    info = dict(first_call_seconds=first, x_sha=hashlib.sha1(x.numpy().tobytes()).hexdigest()[:12])

    def run():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = ssc_coefficients(x, solver="auto")
        gap = duality_gaps(x, res.coef.double(), res.lambda_e, res.lambda_z).max_gap
        digest = hashlib.sha1(res.coef.numpy().tobytes()).hexdigest()[:12]
        return dict(solver=res.solver, gap=gap, coef_sha=digest)

    return run, info


def _workset_sets():
    from benchmarks.bench_workset import SETS

    return list(SETS)


workset_default.cases = _workset_sets


def import_package(case=None):
    """``import videoanchor`` in a fresh process: the import's wall time (one call)."""

    def run():
        import videoanchor

        return dict(version=getattr(videoanchor, "__version__", None))

    return run


#: ``--workload`` names: functions of this file (``--calls`` default per workload)
WORKLOADS = {"workset-default": (workset_default, 2), "import": (import_package, 1)}

# ---- the child process -------------------------------------------------------------------

CHILD = r"""
import importlib.util, json, os, sys, time
spec = json.loads(sys.argv[1])
sys.path.insert(0, os.getcwd())
loader = importlib.util.spec_from_file_location("_ab_workload", spec["file"])
mod = importlib.util.module_from_spec(loader)
loader.loader.exec_module(mod)
fn = getattr(mod, spec["func"])
if spec.get("list_cases"):
    cases = getattr(fn, "cases", None)
    print("AB_RESULT " + json.dumps({"cases": list(cases()) if cases else None}))
    sys.exit(0)
made = fn(spec["case"])
run, info = made if isinstance(made, tuple) else (made, {})
out = dict(info, seconds=[], cpu_seconds=[])
for _ in range(spec["calls"]):
    c0, t0 = time.process_time(), time.perf_counter()
    res = run()
    out["seconds"].append(time.perf_counter() - t0)
    out["cpu_seconds"].append(time.process_time() - c0)
if isinstance(res, dict):
    out.update(res)
pkg = sys.modules.get("videoanchor")
out["package"] = os.path.dirname(pkg.__file__) if pkg and getattr(pkg, "__file__", None) else None
print("AB_RESULT " + json.dumps(out, default=str), flush=True)
"""


def _git(args: list[str], cwd) -> str | None:
    try:
        return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True,
                              check=True).stdout.strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return None


def tree_of(spec: str, tmp: Path, name: str) -> dict:
    """``{"path", "git_sha", "spec"}`` for a directory or a revision of this repository
    (unpacked with ``git archive`` under ``tmp``)."""
    if os.path.isdir(spec):
        path = Path(spec).resolve()
        top = _git(["rev-parse", "--show-toplevel"], path)
        sha = None
        if top and Path(top).resolve() == path:
            sha = _git(["rev-parse", "HEAD"], path)
            if sha and _git(["status", "--porcelain", "--untracked-files=no"], path):
                sha += "-dirty"
        return dict(spec=spec, path=str(path), git_sha=sha or "unknown", source="directory")
    sha = _git(["rev-parse", "--verify", f"{spec}^{{commit}}"], ROOT)
    if sha is None:
        raise SystemExit(f"ab.py: {spec!r} is neither a directory nor a revision of {ROOT}")
    path = tmp / name
    path.mkdir()
    archive = subprocess.run(["git", "archive", sha], cwd=ROOT, capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(path)], input=archive.stdout, check=True)
    return dict(spec=spec, path=str(path), git_sha=sha, source="git archive")


def _env(tree: dict, threads: int) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = tree["path"] + (
        os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else ""
    )
    env["VIDEOANCHOR_GIT_SHA"] = tree["git_sha"]
    env["PYTHONUNBUFFERED"] = "1"
    if threads:
        env.update(dict.fromkeys(THREAD_VARS, str(threads)))
    return env


def _result(stdout: str) -> dict:
    lines = [ln for ln in stdout.splitlines() if ln.startswith(PREFIX)]
    return json.loads(lines[-1][len(PREFIX) :]) if lines else {}


def run_one(work: dict, tree: dict, case, threads: int) -> dict:
    """One process of the workload in ``tree``: its row (fields, ``process_seconds``)."""
    env = _env(tree, threads)
    t0 = time.perf_counter()
    if "command" in work:
        cmd = work["command"].replace("{case}", "" if case is None else str(case))
        p = subprocess.run(cmd, shell=True, cwd=tree["path"], env=env, capture_output=True,
                           text=True)  # fmt: skip
        took = time.perf_counter() - t0
        row = dict(seconds=took, **_result(p.stdout))
    else:
        spec = dict(file=work["file"], func=work["func"], case=case, calls=work["calls"])
        p = subprocess.run([sys.executable, "-c", CHILD, json.dumps(spec)], cwd=tree["path"],
                           env=env, capture_output=True, text=True)  # fmt: skip
        took = time.perf_counter() - t0
        row = _result(p.stdout)
    if p.returncode or ("command" not in work and not row):
        raise SystemExit(f"ab.py: {tree['spec']} {case}: exit {p.returncode}\n{p.stderr[-3000:]}")
    pkg = row.get("package")
    if pkg and not Path(pkg).resolve().is_relative_to(Path(tree["path"]).resolve()):
        raise SystemExit(f"ab.py: the process in {tree['path']} imported videoanchor from {pkg}")
    row["process_seconds"] = took
    return row


def list_cases(work: dict, tree: dict, threads: int) -> list:
    spec = dict(file=work["file"], func=work["func"], list_cases=True)
    p = subprocess.run([sys.executable, "-c", CHILD, json.dumps(spec)], cwd=tree["path"],
                       env=_env(tree, threads), capture_output=True, text=True)  # fmt: skip
    if p.returncode:
        raise SystemExit(f"ab.py: listing the cases in {tree['spec']}: {p.stderr[-3000:]}")
    return _result(p.stdout)["cases"]


def metric_of(row: dict, metric: str) -> float:
    v = row[metric]
    return min(v) if isinstance(v, list) else float(v)


def summarise(rows: list[dict], cases: list, metric: str) -> list[dict]:
    """Per case: each tree's median of ``metric`` over the rounds, ``ratio`` (B / A), every
    value, and the text fields' values per tree."""
    out = []
    for case in cases:
        mine = {t: [r for r in rows if r["case"] == case and r["tree"] == t] for t in "ab"}
        vals = {t: [metric_of(r, metric) for r in mine[t]] for t in "ab"}
        s = dict(case=case, metric=metric, a_median=statistics.median(vals["a"]),
                 b_median=statistics.median(vals["b"]), a_values=vals["a"], b_values=vals["b"])  # fmt: skip
        s["ratio"] = s["b_median"] / s["a_median"] if s["a_median"] else None
        text = sorted({k for r in mine["a"] + mine["b"] for k, v in r.items()
                       if isinstance(v, str) and k not in ("tree", "case", "package")})  # fmt: skip
        s["text"] = {k: {t: sorted({str(r.get(k)) for r in mine[t]}) for t in "ab"} for k in text}
        s["same_text"] = all(v["a"] == v["b"] and len(v["a"]) == 1 for v in s["text"].values())
        out.append(s)
    return out


def parse(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python benchmarks/ab.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("a", help="tree A: a directory or a revision of this repository")
    ap.add_argument("b", help="tree B: a directory or a revision of this repository")
    how = ap.add_mutually_exclusive_group(required=True)
    how.add_argument("--workload", choices=sorted(WORKLOADS), help="a workload of this file")
    how.add_argument("--function", metavar="FILE:FUNC", help="FUNC(case) of a Python file")
    how.add_argument("--command", metavar="CMD", help="a shell command ({case}: the case)")
    ap.add_argument("--cases", nargs="+", default=None,
                    help="the cases (default: FUNC.cases() in tree B, else one case)")  # fmt: skip
    ap.add_argument("--rounds", type=int, default=3, help="processes a tree a case (3)")
    ap.add_argument("--calls", type=int, default=None,
                    help="timed calls a process, function workloads (default: 2, import 1)")  # fmt: skip
    ap.add_argument("--metric", default="seconds",
                    help="the row field compared; a list's least (seconds, cpu_seconds, "
                         "process_seconds, or a field of AB_RESULT; default seconds)")  # fmt: skip
    ap.add_argument("--order", choices=["abba", "ab"], default="abba",
                    help="abba: A, B then B, A round by round (default); ab: A, B always")  # fmt: skip
    ap.add_argument("--threads", type=int, default=1, help="thread variables' value (0: unset)")
    ap.add_argument("--label-a", default=None, help="A's name in the output (default: A)")
    ap.add_argument("--label-b", default=None, help="B's name in the output (default: B)")
    ap.add_argument("--note", default=None, help="a sentence for meta.note")
    ap.add_argument("--keep", action="store_true", help="keep the unpacked revisions")
    ap.add_argument("--out", required=True, help="the JSON written")
    a = ap.parse_args(argv)
    if a.rounds < 1:
        ap.error("--rounds: at least 1")
    return a


def main(argv=None) -> dict:
    a = parse(argv)
    from benchmarks.common import environment, loadavg

    if a.workload:
        fn, calls = WORKLOADS[a.workload]
        work = dict(file=str(Path(__file__).resolve()), func=fn.__name__, calls=a.calls or calls)
    elif a.function:
        file, _, func = a.function.rpartition(":")
        if not file or not Path(file).is_file():
            raise SystemExit(f"ab.py: --function {a.function!r}: expected FILE:FUNC")
        work = dict(file=str(Path(file).resolve()), func=func, calls=a.calls or 2)
    else:
        work = dict(command=a.command)
    with tempfile.TemporaryDirectory(prefix="ab_") as tmp:
        trees = {"a": tree_of(a.a, Path(tmp), "a"), "b": tree_of(a.b, Path(tmp), "b")}
        for t, label in (("a", a.label_a), ("b", a.label_b)):
            trees[t]["label"] = label or t.upper()
        cases = a.cases
        if cases is None and "func" in work:
            cases = list_cases(work, trees["b"], a.threads)
        cases = cases or [None]
        meta = environment()
        meta.update(trees=trees, workload=work,
                    cases=cases, rounds=a.rounds, order=a.order, threads=a.threads,
                    metric=a.metric, argv=sys.argv[1:] if argv is None else list(argv),
                    load_before=loadavg(), note=a.note)  # fmt: skip
        rows = []
        for rnd in range(a.rounds):
            for case in cases:
                order = ("a", "b") if a.order == "ab" or rnd % 2 == 0 else ("b", "a")
                for t in order:
                    row = run_one(work, trees[t], case, a.threads)
                    row.update(tree=t, round=rnd, case=case, load=loadavg())
                    rows.append(row)
                    print(json.dumps(row, default=str), flush=True)
        meta["load_after"] = loadavg()
        if a.keep:
            for t in trees.values():
                if t["source"] == "git archive":
                    kept = Path(tempfile.mkdtemp(prefix="ab_kept_"))
                    os.rename(t["path"], kept / Path(t["path"]).name)
                    t["path"] = str(kept / Path(t["path"]).name)
    summary = summarise(rows, cases, a.metric)
    doc = dict(meta=meta, summary=summary, rows=rows)
    Path(a.out).write_text(json.dumps(doc, indent=1, default=str) + "\n")
    la, lb = trees["a"]["label"], trees["b"]["label"]
    for s in summary:
        same = "same answers" if s["same_text"] else "answers differ: " + json.dumps(s["text"])
        ratio = "-" if s["ratio"] is None else f"{s['ratio']:.3f}"
        print(f"{'(one case)' if s['case'] is None else s['case']}: {la} {s['a_median']:.4g}  "
              f"{lb} {s['b_median']:.4g}  {lb}/{la} {ratio}  ({a.metric}, median of "
              f"{a.rounds}; {same})")  # fmt: skip
    print(f"wrote {a.out}")
    return doc


if __name__ == "__main__":
    # (here only: the processes load this file too, and must import the trees' packages)
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    main()
