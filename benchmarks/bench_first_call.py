"""The first call after install, in fresh processes (issue 68): what a new user waits for.

Each figure comes from its own Python process, as a user meets it:

- ``scores``: the default anchor scores (``compute_anchor_scores``, ``n_clusters=24``) of
  768 video-like tokens (``video_tokens(16, 48, 1024)``), one torch thread, first call
  against second call, with an empty Numba cache (``NUMBA_CACHE_DIR`` a new folder) and
  with the cache that run left;
- ``compile``: in that empty-cache process, the time Numba spent compiling each function
  (its compile events; ``exclusive_seconds`` leaves out the functions it compiled inside);
- ``snippet``: the README's first snippet (read from README.md) as ``python -c``, the whole
  process, with an empty cache and then warm;
- ``import``: ``import torch`` against ``import videoanchor`` (which imports torch), timed
  in the process.

``meta["summary"]`` holds the medians the README and docs quote. ``--baseline REF``: the
``scores`` part of the tree at git ``REF`` too (``git archive``), run before the current
tree's in each repetition, so that both meet the same load (rows' ``tree``; the summary's
``baseline_*`` and ``cut_*``: the baseline less the current tree). The CPU's instruction set
is what the environment gives (``ATEN_CPU_CAPABILITY``, ``ONEDNN_MAX_CPU_ISA``,
``NUMBA_CPU_NAME``, ``NUMBA_CPU_FEATURES``, recorded in ``meta``)::

    python benchmarks/bench_first_call.py [--quick] [--reps 3] [--baseline REF]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENV_KEYS = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "NUMBA_CPU_NAME", "NUMBA_CPU_FEATURES",
            "NUMBA_OPT")  # fmt: skip
FRAMES, PATCHES, DIM, CLUSTERS = 16, 48, 1024, 24


def _child_scores(root: Path = ROOT) -> dict:
    """In a fresh process: the default scores' first and second call (the clock's and this
    process's CPU seconds), and Numba's compile time per function during the first, with
    ``videoanchor`` imported from ``root``."""
    from numba.core import event

    class Compiles(event.Listener):
        def __init__(self):
            self.stack, self.done = [], []

        def on_start(self, ev):
            self.stack.append(
                [ev.data["dispatcher"].py_func.__qualname__, time.perf_counter(), 0.0]
            )

        def on_end(self, ev):
            name, t0, inner = self.stack.pop()
            took = time.perf_counter() - t0
            if self.stack:
                self.stack[-1][2] += took
            self.done.append((name, took, took - inner))

    compiles = Compiles()
    event.register("numba:compile", compiles)
    import torch

    torch.set_num_threads(1)
    sys.path.insert(0, str(root))
    from benchmarks.common import video_tokens

    x = video_tokens(FRAMES, PATCHES, DIM)
    import videoanchor

    assert Path(videoanchor.__file__).resolve().is_relative_to(root), videoanchor.__file__
    times, cpu = [], []
    for _ in range(2):
        t0, c0 = time.perf_counter(), time.process_time()
        res = videoanchor.compute_anchor_scores(x, n_clusters=CLUSTERS)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    functions: dict[str, dict] = {}
    for name, took, own in compiles.done:
        f = functions.setdefault(name, {"specialisations": 0, "exclusive_seconds": 0.0,
                                        "inclusive_seconds": 0.0})  # fmt: skip
        f["specialisations"] += 1
        f["exclusive_seconds"] += own
        f["inclusive_seconds"] = max(f["inclusive_seconds"], took)
    return {"n": x.shape[0], "d": x.shape[1], "solver": res.solver, "first_seconds": times[0],
            "second_seconds": times[1], "first_cpu_seconds": cpu[0], "second_cpu_seconds": cpu[1],
            "functions": functions}  # fmt: skip


def readme_snippet() -> str:
    """The README's first snippet (the first code block that calls ``videoanchor.``)."""
    text = (ROOT / "README.md").read_text()
    return next(b for b in re.findall(r"```python\n(.*?)```", text, re.S) if "videoanchor." in b)


def _run(args: list[str], env: dict) -> tuple[float, str]:
    t0 = time.perf_counter()
    out = subprocess.run(args, env=env, capture_output=True, text=True, cwd=ROOT, check=False)
    took = time.perf_counter() - t0
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(args[:3])} failed: {out.stderr[-2000:]}")
    return took, out.stdout


def _load() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def run(reps: int, quick: bool, out_dir=None, baseline: str | None = None) -> Path:
    sys.path.insert(0, str(ROOT))
    import numba

    from benchmarks.common import environment, print_table, write_result

    meta = environment("cpu")
    meta.update(quick=quick, reps=reps, numba=numba.__version__, load_before=_load(),
                env={k: os.environ.get(k) for k in ENV_KEYS})  # fmt: skip
    rows: list[dict] = []
    me = [sys.executable, str(Path(__file__).resolve())]
    snippet = readme_snippet()
    with tempfile.TemporaryDirectory(prefix="videoanchor-numba-") as tmp:
        trees = {"current": ROOT}
        if baseline is not None:
            sha = subprocess.run(["git", "rev-parse", baseline], cwd=ROOT, capture_output=True,
                                 text=True, check=True).stdout.strip()  # fmt: skip
            trees = {"baseline": Path(tmp) / "baseline", **trees}
            trees["baseline"].mkdir()
            archive = subprocess.run(["git", "archive", sha], cwd=ROOT, capture_output=True,
                                     check=True).stdout  # fmt: skip
            subprocess.run(["tar", "-x", "-C", str(trees["baseline"])], input=archive,
                           check=True)  # fmt: skip
            meta["baseline"] = {"ref": baseline, "git_sha": sha}
        for rep in range(reps):
            for tree, root in trees.items():
                cache = Path(tmp) / f"cache{rep}{tree}"  # a new, empty cache each repetition
                env = {**os.environ, "NUMBA_CACHE_DIR": str(cache)}
                for state in ("empty", "warm"):
                    _, out = _run([*me, "--child", "scores", "--root", str(root)], env)
                    got = json.loads(out.strip().splitlines()[-1])
                    functions = got.pop("functions")
                    rows.append({"part": "scores", "tree": tree, "cache": state, "rep": rep,
                                 **got, "first_minus_second": got["first_seconds"] - got["second_seconds"],
                                 "load": _load()})  # fmt: skip
                    if state == "empty" and rep == 0:
                        rows += [{"part": "compile", "tree": tree, "function": k, **v} for k, v in
                                 sorted(functions.items(), key=lambda kv: -kv[1]["exclusive_seconds"])]  # fmt: skip
            env = {**os.environ, "NUMBA_CACHE_DIR": str(Path(tmp) / f"snippet{rep}")}
            for state in ("empty", "warm"):
                took, _ = _run([sys.executable, "-c", snippet], env)
                rows.append({"part": "snippet", "cache": state, "rep": rep, "seconds": took,
                             "load": _load()})  # fmt: skip
            for module in ("torch", "videoanchor"):
                code = f"import time; t = time.perf_counter(); import {module}; print(time.perf_counter() - t)"
                took, out = _run([sys.executable, "-c", code], env)
                rows.append({"part": "import", "module": module, "rep": rep,
                             "seconds": float(out.strip().splitlines()[-1]), "process_seconds": took,
                             "load": _load()})  # fmt: skip

    def median(part, key, tree="current", **match):
        vals = [r[key] for r in rows if r["part"] == part and r.get("tree", tree) == tree
                and all(r[k] == v for k, v in match.items())]  # fmt: skip
        return statistics.median(vals)

    def scores(tree="current"):
        return {
            "scores_first_minus_second_empty_cache": median(
                "scores", "first_minus_second", tree, cache="empty"
            ),
            "scores_first_empty_cache": median("scores", "first_seconds", tree, cache="empty"),
            "scores_first_cpu_empty_cache": median(
                "scores", "first_cpu_seconds", tree, cache="empty"
            ),
            "scores_second": median("scores", "second_seconds", tree, cache="empty"),
            "scores_first_warm_cache": median("scores", "first_seconds", tree, cache="warm"),
            "compile_seconds": sum(
                r["exclusive_seconds"] for r in rows if r["part"] == "compile" and r["tree"] == tree
            ),
        }

    meta["summary"] = {
        **scores(),
        "snippet_empty_cache": median("snippet", "seconds", cache="empty"),
        "snippet_warm_cache": median("snippet", "seconds", cache="warm"),
        "import_torch": median("import", "seconds", module="torch"),
        "import_videoanchor": median("import", "seconds", module="videoanchor"),
    }
    if baseline is not None:
        base = scores("baseline")
        meta["summary"].update({f"baseline_{k}": v for k, v in base.items()})
        meta["summary"].update({f"cut_{k}": v - meta["summary"][k] for k, v in base.items()})
    meta["load_after"] = _load()
    print_table([r for r in rows if r["part"] != "compile"],
                ["part", "tree", "cache", "module", "rep", "first_seconds", "first_cpu_seconds",
                 "second_seconds", "seconds"])  # fmt: skip
    print_table([r for r in rows if r["part"] == "compile"],
                ["tree", "function", "specialisations", "exclusive_seconds", "inclusive_seconds"])  # fmt: skip
    print(json.dumps(meta["summary"], indent=1))
    path = write_result("first_call_quick" if quick else "first_call", meta, rows, out_dir)
    print(f"wrote {path}")
    return path


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="one repetition")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default=None)
    ap.add_argument("--baseline", default=None,
                    help="a git ref whose tree's scores part runs beside the current tree's")  # fmt: skip
    ap.add_argument("--child", choices=["scores"], help=argparse.SUPPRESS)
    ap.add_argument("--root", default=str(ROOT), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(_child_scores(Path(args.root).resolve())))
        return None
    if args.reps < 1:
        ap.error(f"--reps: expected a positive integer, got {args.reps}")
    return run(1 if args.quick else args.reps, args.quick, args.out, args.baseline)


if __name__ == "__main__":
    main()
