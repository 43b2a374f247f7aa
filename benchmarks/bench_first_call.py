"""The first call after install, in wall time, in fresh processes (issues 68, 93, 101): what a
new user waits for.

Each figure comes from its own Python process, as a user meets it, with the package as
installed (``import videoanchor`` starts the background compile where Numba's cache is
empty, issue 93/101):

- ``scores``: the default anchor scores (``compute_anchor_scores``, ``n_clusters=24``) of
  768 video-like tokens (``video_tokens(16, 48, 1024)``, made before the import), one torch
  thread, right after ``import videoanchor``: the first and the second call in wall time
  (``time.perf_counter`` around each call, in the process), the import's, and the whole
  process's wall time (``process_seconds``: from its start to its exit, measured by this
  script), with an empty Numba cache (``NUMBA_CACHE_DIR`` a new folder, ``cache: "empty"``)
  and with the cache that run left (``"warm"``); each row with what the process did for
  each kernel (``kernels``: loaded or compiled, seconds waited for another process's
  compile), the functions Numba compiled in the process itself (``compiled_here``: none
  where the background compile covered the call), the seconds this script then waited for
  the background compile to end (``background_seconds``) and the load average when it ran
  (``load``: the machine's 1, 5 and 15 minute load);
- ``snippet``: the README's first snippet (read from README.md) as ``python -c``, the whole
  process, as installed, with an empty cache and then warm (each run starts once the
  background compile of the one before has ended);
- ``import``: ``import torch`` against ``import videoanchor`` (which imports torch), timed
  in the process.

``meta["summary"]`` holds the medians over the repetitions (``--reps``, 5 by default)
that the README and docs quote, with ``first_minus_second`` (the first call's wall time
less the second's, per process, then the median) against the target of issue 101 (at most
5 s: ``target_met``). ``--baseline REF``: the ``scores`` part of the tree at git ``REF`` too
(``git archive``), run before the current tree's in each repetition, so that both meet the
same load (rows' ``tree``, an empty cache alone; the summary's ``baseline_*``). ``--isa avx2``: torch's AVX2
kernels and MKL's AVX2 code path (``ATEN_CPU_CAPABILITY=avx2 MKL_CBWR=AVX2``, Numba's target
the CPU's own), written to ``first_call_avx2_<device>.json``; the environment's values are
recorded in ``meta["env"]``. ``meta["cpu_model"]``: the CPU's model name and whether it has
AVX2 and AVX-512 (``/proc/cpuinfo``); each scores row's ``numba_cpu`` and ``numba_avx512``:
the target Numba compiled for::

    python benchmarks/bench_first_call.py [--quick] [--reps 5] [--baseline REF] [--isa avx2]
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
ENV_KEYS = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_CBWR", "NUMBA_CPU_NAME",
            "NUMBA_CPU_FEATURES", "NUMBA_OPT", "NUMBA_NUM_THREADS")  # fmt: skip
FRAMES, PATCHES, DIM, CLUSTERS = 16, 48, 1024, 24
PRECOMPILE = "VIDEOANCHOR_PRECOMPILE"
#: Issue 101's bound on the first call's wall time less the second's (seconds).
TARGET = 5.0


def cpu_model() -> dict:
    """The CPU's model name and whether it has AVX2 and AVX-512 (``/proc/cpuinfo``; None
    where it cannot be read)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {"name": None, "avx2": None, "avx512f": None}
    name = re.search(r"^model name\s*:\s*(.*)$", text, re.M)
    flags = re.search(r"^flags\s*:\s*(.*)$", text, re.M)
    flags = set(flags.group(1).split()) if flags else set()
    return {"name": name.group(1).strip() if name else None, "avx2": "avx2" in flags,
            "avx512f": "avx512f" in flags}  # fmt: skip


def isa_env(isa: str) -> dict:
    """The environment that runs torch's AVX2 kernels and MKL's AVX2 code path on this CPU
    (``isa == "avx2"``: ``ATEN_CPU_CAPABILITY=avx2 MKL_CBWR=AVX2``, issue 101); Numba keeps
    its target, the CPU's own. Empty for ``"native"``."""
    return {} if isa == "native" else {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2"}


def _wait_for_background(cache: Path, timeout: float = 900.0) -> float:
    """Seconds until no process holds a lock of Numba's cache in ``cache`` (the background
    compile a run started has ended)."""
    import fcntl

    t0 = time.perf_counter()
    for path in sorted(cache.rglob("*.lock")) if cache.exists() else []:
        fd = os.open(path, os.O_RDWR)
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.perf_counter() - t0 > timeout:
                        raise RuntimeError(f"{path}: still locked after {timeout} s") from None
                    time.sleep(0.05)
        finally:
            os.close(fd)
    return time.perf_counter() - t0


def _child_scores(root: Path = ROOT) -> dict:
    """In a fresh process: ``import videoanchor`` from ``root`` and the default scores' first
    and second call right after it, in wall time (``time.perf_counter``), and what the
    process did for each group of compiled functions (the kernels' and the discretisation
    loops' events: loaded or compiled here, seconds waited). Numba is not imported before
    the call (a user's first call imports it)."""
    import torch

    torch.set_num_threads(1)
    sys.path.insert(0, str(root))
    from benchmarks.common import video_tokens

    x = video_tokens(FRAMES, PATCHES, DIM)
    t0 = time.perf_counter()
    import videoanchor

    imported = time.perf_counter() - t0
    assert Path(videoanchor.__file__).resolve().is_relative_to(root), videoanchor.__file__
    times = []
    for _ in range(2):
        t0 = time.perf_counter()
        res = videoanchor.compute_anchor_scores(x, n_clusters=CLUSTERS)
        times.append(time.perf_counter() - t0)
    from numba.core.registry import cpu_target

    _, numba_cpu, features = cpu_target.target_context.codegen().magic_tuple()
    events = []
    for name in (
        "videoanchor.anchor.solvers._workset_kernel",
        "videoanchor.anchor._discretize_loops",
    ):
        module = sys.modules.get(name)
        events += [{k: round(e[k], 3) if isinstance(e[k], float) else e[k]
                    for k in ("kernel", "how", "seconds", "waited")}
                   for e in getattr(module, "EVENTS", [])]  # fmt: skip
    return {"n": x.shape[0], "d": x.shape[1], "solver": res.solver, "import_seconds": imported,
            "first_seconds": times[0], "second_seconds": times[1],
            "numba_cpu": numba_cpu, "numba_avx512": ("+avx512f" in features.split(",")
                                                     if features else None),
            "kernels": events,
            "compiled_here": [e["kernel"] for e in events if e["how"] == "compiled"]}  # fmt: skip


def readme_snippet() -> str:
    """The README's first snippet (the first code block that calls ``videoanchor.``)."""
    text = (ROOT / "README.md").read_text()
    return next(b for b in re.findall(r"```python\n(.*?)```", text, re.S) if "videoanchor." in b)


def _run(args: list[str], env: dict) -> tuple[float, str]:
    """The process's wall time (from its start to its exit) and its stdout."""
    t0 = time.perf_counter()
    out = subprocess.run(args, env=env, capture_output=True, text=True, cwd=ROOT, check=False)
    took = time.perf_counter() - t0
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(args[:3])} failed: {out.stderr[-2000:]}")
    return took, out.stdout


def _load() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def run(reps: int, quick: bool, out_dir=None, baseline: str | None = None,
        isa: str = "native") -> Path:  # fmt: skip
    sys.path.insert(0, str(ROOT))
    import numba

    from benchmarks.common import environment, print_table, write_result

    forced = isa_env(isa)
    base_env = {k: v for k, v in os.environ.items() if k != PRECOMPILE}
    base_env.update(forced)
    meta = environment("cpu")
    meta.update(quick=quick, reps=reps, numba=numba.__version__, load_before=_load(),
                cpu_model=cpu_model(), isa=isa, cpus=len(os.sched_getaffinity(0)),
                env={k: base_env.get(k) for k in ENV_KEYS})  # fmt: skip
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
                env = {**base_env, "NUMBA_CACHE_DIR": str(cache), "PYTHONPATH": str(root)}
                for state in ("empty", "warm") if tree == "current" else ("empty",):
                    load = _load()
                    took, out = _run([*me, "--child", "scores", "--root", str(root)], env)
                    got = json.loads(out.strip().splitlines()[-1])
                    rows.append({"part": "scores", "tree": tree, "cache": state, "rep": rep,
                                 **got, "process_seconds": took,
                                 "first_minus_second": got["first_seconds"] - got["second_seconds"],
                                 "load": load, "background_seconds": _wait_for_background(cache)})  # fmt: skip
            cache = Path(tmp) / f"snippet{rep}"
            env = {**base_env, "NUMBA_CACHE_DIR": str(cache)}
            for state in ("empty", "warm"):
                load = _load()
                took, _ = _run([sys.executable, "-c", snippet], env)
                rows.append({"part": "snippet", "cache": state, "rep": rep, "seconds": took,
                             "load": load, "background_seconds": _wait_for_background(cache)})  # fmt: skip
            for module in ("torch", "videoanchor"):
                code = f"import time; t = time.perf_counter(); import {module}; print(time.perf_counter() - t)"
                load = _load()
                took, out = _run([sys.executable, "-c", code], env)
                rows.append({"part": "import", "module": module, "rep": rep,
                             "seconds": float(out.strip().splitlines()[-1]), "process_seconds": took,
                             "load": load})  # fmt: skip

    def median(part, key, tree="current", **match):
        vals = [r[key] for r in rows if r["part"] == part and r.get("tree", tree) == tree
                and all(r[k] == v for k, v in match.items())]  # fmt: skip
        return statistics.median(vals)

    def scores(tree="current"):
        if tree != "current":  # (the baseline: an empty cache alone)
            return {k: median("scores", key, tree, cache="empty") for k, key in (
                ("scores_first_minus_second_empty_cache", "first_minus_second"),
                ("scores_first_empty_cache", "first_seconds"), ("scores_second", "second_seconds"),
                ("scores_process_empty_cache", "process_seconds"))}  # fmt: skip
        out = {
            "scores_first_minus_second_empty_cache": median(
                "scores", "first_minus_second", tree, cache="empty"
            ),
            "scores_first_empty_cache": median("scores", "first_seconds", tree, cache="empty"),
            "scores_second": median("scores", "second_seconds", tree, cache="empty"),
            "scores_process_empty_cache": median("scores", "process_seconds", tree, cache="empty"),
            "scores_import_empty_cache": median("scores", "import_seconds", tree, cache="empty"),
            "scores_first_warm_cache": median("scores", "first_seconds", tree, cache="warm"),
            "scores_second_warm_cache": median("scores", "second_seconds", tree, cache="warm"),
            "scores_process_warm_cache": median("scores", "process_seconds", tree, cache="warm"),
            "scores_background_seconds": median(
                "scores", "background_seconds", tree, cache="empty"
            ),
        }
        out["target_met"] = out["scores_first_minus_second_empty_cache"] <= TARGET
        return out

    loads = [r["load"][0] for r in rows if "load" in r]
    meta["summary"] = {
        **scores(),
        "target_seconds": TARGET,
        "snippet_empty_cache": median("snippet", "seconds", cache="empty"),
        "snippet_warm_cache": median("snippet", "seconds", cache="warm"),
        "import_torch": median("import", "seconds", module="torch"),
        "import_videoanchor": median("import", "seconds", module="videoanchor"),
        "load_min": min(loads),
        "load_max": max(loads),
    }
    if baseline is not None:
        meta["summary"].update({f"baseline_{k}": v for k, v in scores("baseline").items()})
    meta["load_after"] = _load()
    meta["note"] = (f"Wall time on a shared machine ({meta['cpus']} CPUs): other processes ran "
                    f"beside each run (1-minute load {min(loads):.1f}-{max(loads):.1f}, each "
                    "row's load); the background compile runs at nice 10, below them.")  # fmt: skip
    print_table(rows, ["part", "tree", "cache", "module", "rep", "import_seconds",
                       "first_seconds", "second_seconds", "process_seconds", "compiled_here",
                       "seconds", "load"])  # fmt: skip
    print(json.dumps(meta["summary"], indent=1))
    name = "first_call" + ("" if isa == "native" else f"_{isa}") + ("_quick" if quick else "")
    path = write_result(name, meta, rows, out_dir)
    print(f"wrote {path}")
    return path


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="one repetition")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", default=None)
    ap.add_argument("--baseline", default=None,
                    help="a git ref whose tree's scores part runs beside the current tree's")  # fmt: skip
    ap.add_argument("--isa", choices=["native", "avx2"], default="native",
                    help="the CPU's own instruction set, or AVX2 forced (torch's kernels and MKL's "
                    "code path; written to first_call_avx2_<device>.json)")  # fmt: skip
    ap.add_argument("--child", choices=["scores"], help=argparse.SUPPRESS)
    ap.add_argument("--root", default=str(ROOT), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(_child_scores(Path(args.root).resolve())))
        return None
    if args.reps < 1:
        ap.error(f"--reps: expected a positive integer, got {args.reps}")
    return run(1 if args.quick else args.reps, args.quick, args.out, args.baseline, args.isa)


if __name__ == "__main__":
    main()
