"""The first call after install, in fresh processes (issue 68): what a new user waits for.

Each figure comes from its own Python process, as a user meets it:

- ``scores``: the default anchor scores (``compute_anchor_scores``, ``n_clusters=24``) of
  768 video-like tokens (``video_tokens(16, 48, 1024)``), one torch thread, first call
  against second call (the clock's seconds and the process's CPU seconds), with an empty
  Numba cache (``NUMBA_CACHE_DIR`` a new folder) and with the cache that run left; with no
  background compile (``precompile: "off"``, ``VIDEOANCHOR_PRECOMPILE=0``: the call compiles
  what it needs) and as installed (``"on"``: ``import videoanchor`` starts the compile in a
  background process, which the call waits for where it has not ended; issue 93), each row
  with what the process did for each kernel (``kernels``: loaded or compiled, seconds
  waited for another process);
- ``compile``: in the empty-cache process without the background compile, the time Numba
  spent compiling each function (its compile events; ``exclusive_seconds`` leaves out the
  functions it compiled inside);
- ``snippet``: the README's first snippet (read from README.md) as ``python -c``, the whole
  process (and its CPU seconds, ``cpu_seconds``: the background compile's process not
  counted), as installed, with an empty cache and then warm (each run starts once the
  background compile of the one before has ended);
- ``import``: ``import torch`` against ``import videoanchor`` (which imports torch), timed
  in the process.

``meta["summary"]`` holds the medians the README and docs quote. ``--baseline REF``: the
``scores`` part of the tree at git ``REF`` too (``git archive``; ``precompile: "off"``
alone), run before the current tree's in each repetition, so that both meet the same load
(rows' ``tree``; the summary's ``baseline_*`` and ``cut_*``: the baseline less the current
tree). The CPU's instruction set is what the environment gives (``ATEN_CPU_CAPABILITY``,
``ONEDNN_MAX_CPU_ISA``, ``MKL_CBWR``, ``NUMBA_CPU_NAME``, ``NUMBA_CPU_FEATURES``, recorded
in ``meta["env"]``) or ``--isa avx2`` sets (torch's AVX2 kernels, and Numba's code for an
AVX2 CPU of this one's maker: ``znver3`` for an AMD one, ``haswell`` else), written to
``first_call_avx2_<device>.json``. ``meta["cpu_model"]``: the CPU's model name and whether
it has AVX2 and AVX-512 (``/proc/cpuinfo``); each scores row's ``numba_cpu`` and
``numba_avx512`` (None: the CPU name's own features): the target Numba compiled for::

    python benchmarks/bench_first_call.py [--quick] [--reps 3] [--baseline REF] [--isa avx2]
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
            "NUMBA_CPU_FEATURES", "NUMBA_OPT", "VIDEOANCHOR_PRECOMPILE")  # fmt: skip
FRAMES, PATCHES, DIM, CLUSTERS = 16, 48, 1024, 24
PRECOMPILE = "VIDEOANCHOR_PRECOMPILE"


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
    """The environment that runs this CPU as an AVX2 CPU (``isa == "avx2"``): torch's AVX2
    kernels, and Numba's target an AVX2 CPU of the same maker with its own features
    (``znver3`` for an AMD CPU, ``haswell`` else; ``NUMBA_CPU_FEATURES=""``, as the Dockerfile
    of docs/serving.md). Empty for ``"native"``."""
    if isa == "native":
        return {}
    from llvmlite import binding as llvm

    name = "znver3" if llvm.get_host_cpu_name().startswith("znver") else "haswell"
    return {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_CBWR": "AVX2",
            "NUMBA_CPU_NAME": name, "NUMBA_CPU_FEATURES": ""}  # fmt: skip


def _wait_for_background(cache: Path, timeout: float = 900.0) -> float:
    """Seconds until no process holds a lock of the kernels' cache in ``cache`` (the background
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
                    time.sleep(0.1)
        finally:
            os.close(fd)
    return time.perf_counter() - t0


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
    from numba.core.registry import cpu_target

    _, numba_cpu, features = cpu_target.target_context.codegen().magic_tuple()
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
    kernel = sys.modules.get("videoanchor.anchor.solvers._workset_kernel")
    kernels = [{k: e[k] for k in ("kernel", "how", "seconds", "waited")}
               for e in getattr(kernel, "EVENTS", [])]  # fmt: skip
    return {"n": x.shape[0], "d": x.shape[1], "solver": res.solver, "first_seconds": times[0],
            "second_seconds": times[1], "first_cpu_seconds": cpu[0], "second_cpu_seconds": cpu[1],
            "numba_cpu": numba_cpu, "numba_avx512": ("+avx512f" in features.split(",")
                                                     if features else None),
            "kernels": kernels, "functions": functions}  # fmt: skip


def readme_snippet() -> str:
    """The README's first snippet (the first code block that calls ``videoanchor.``)."""
    text = (ROOT / "README.md").read_text()
    return next(b for b in re.findall(r"```python\n(.*?)```", text, re.S) if "videoanchor." in b)


def _run(args: list[str], env: dict) -> tuple[float, str, float]:
    """The process's clock seconds, its stdout and its CPU seconds (user and system)."""
    import resource

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    out = subprocess.run(args, env=env, capture_output=True, text=True, cwd=ROOT, check=False)
    took = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(args[:3])} failed: {out.stderr[-2000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return took, out.stdout, cpu


def _load() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def run(reps: int, quick: bool, out_dir=None, baseline: str | None = None,
        isa: str = "native") -> Path:  # fmt: skip
    sys.path.insert(0, str(ROOT))
    import numba

    from benchmarks.common import environment, print_table, write_result

    forced = isa_env(isa)
    base_env = {**os.environ, **forced}
    meta = environment("cpu")
    meta.update(quick=quick, reps=reps, numba=numba.__version__, load_before=_load(),
                cpu_model=cpu_model(), isa=isa,
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
                for precompile in ("off", "on") if tree == "current" else ("off",):
                    # a new, empty cache each repetition
                    cache = Path(tmp) / f"cache{rep}{tree}{precompile}"
                    env = {**base_env, "NUMBA_CACHE_DIR": str(cache),
                           PRECOMPILE: "0" if precompile == "off" else "1"}  # fmt: skip
                    for state in ("empty", "warm"):
                        _, out, _ = _run([*me, "--child", "scores", "--root", str(root)], env)
                        got = json.loads(out.strip().splitlines()[-1])
                        functions = got.pop("functions")
                        rows.append({"part": "scores", "tree": tree, "precompile": precompile,
                                     "cache": state, "rep": rep, **got,
                                     "first_minus_second": got["first_seconds"] - got["second_seconds"],
                                     "first_minus_second_cpu": got["first_cpu_seconds"] - got["second_cpu_seconds"],
                                     "load": _load()})  # fmt: skip
                        if state == "empty" and rep == 0 and precompile == "off":
                            rows += [{"part": "compile", "tree": tree, "function": k, **v} for k, v in
                                     sorted(functions.items(), key=lambda kv: -kv[1]["exclusive_seconds"])]  # fmt: skip
                        rows[-1]["background_seconds"] = _wait_for_background(cache)
            cache = Path(tmp) / f"snippet{rep}"
            env = {**base_env, "NUMBA_CACHE_DIR": str(cache)}
            for state in ("empty", "warm"):
                took, _, cpu = _run([sys.executable, "-c", snippet], env)
                rows.append({"part": "snippet", "cache": state, "rep": rep, "seconds": took,
                             "cpu_seconds": cpu, "load": _load(),
                             "background_seconds": _wait_for_background(cache)})  # fmt: skip
            for module in ("torch", "videoanchor"):
                code = f"import time; t = time.perf_counter(); import {module}; print(time.perf_counter() - t)"
                took, out, _ = _run([sys.executable, "-c", code], env)
                rows.append({"part": "import", "module": module, "rep": rep,
                             "seconds": float(out.strip().splitlines()[-1]), "process_seconds": took,
                             "load": _load()})  # fmt: skip

    def median(part, key, tree="current", precompile="off", **match):
        vals = [r[key] for r in rows if r["part"] == part and r.get("tree", tree) == tree
                and r.get("precompile", precompile) == precompile
                and all(r[k] == v for k, v in match.items())]  # fmt: skip
        return statistics.median(vals)

    def scores(tree="current", precompile="off"):
        at = {"tree": tree, "precompile": precompile}
        out = {
            "scores_first_minus_second_empty_cache": median(
                "scores", "first_minus_second", **at, cache="empty"
            ),
            "scores_first_minus_second_cpu_empty_cache": median(
                "scores", "first_minus_second_cpu", **at, cache="empty"
            ),
            "scores_first_empty_cache": median("scores", "first_seconds", **at, cache="empty"),
            "scores_first_cpu_empty_cache": median(
                "scores", "first_cpu_seconds", **at, cache="empty"
            ),
            "scores_second": median("scores", "second_seconds", **at, cache="empty"),
            "scores_second_cpu": median("scores", "second_cpu_seconds", **at, cache="empty"),
            "scores_first_warm_cache": median("scores", "first_seconds", **at, cache="warm"),
        }
        if precompile == "off":
            out["compile_seconds"] = sum(r["exclusive_seconds"] for r in rows
                                         if r["part"] == "compile" and r["tree"] == tree)  # fmt: skip
        return out

    meta["summary"] = {
        **scores(),
        **{f"precompiled_{k}": v for k, v in scores(precompile="on").items()},
        "snippet_empty_cache": median("snippet", "seconds", cache="empty"),
        "snippet_warm_cache": median("snippet", "seconds", cache="warm"),
        "snippet_cpu_empty_cache": median("snippet", "cpu_seconds", cache="empty"),
        "snippet_cpu_warm_cache": median("snippet", "cpu_seconds", cache="warm"),
        "import_torch": median("import", "seconds", module="torch"),
        "import_videoanchor": median("import", "seconds", module="videoanchor"),
        "load_min": min(min(r["load"]) for r in rows if "load" in r),
        "load_max": max(max(r["load"]) for r in rows if "load" in r),
    }
    if baseline is not None:
        base = scores("baseline")
        meta["summary"].update({f"baseline_{k}": v for k, v in base.items()})
        meta["summary"].update({f"cut_{k}": v - meta["summary"][k] for k, v in base.items()})
    meta["load_after"] = _load()
    print_table([r for r in rows if r["part"] != "compile"],
                ["part", "tree", "precompile", "cache", "module", "rep", "first_seconds",
                 "first_cpu_seconds", "second_seconds", "second_cpu_seconds", "seconds",
                 "cpu_seconds"])  # fmt: skip
    print_table([r for r in rows if r["part"] == "compile"],
                ["tree", "function", "specialisations", "exclusive_seconds", "inclusive_seconds"])  # fmt: skip
    print(json.dumps(meta["summary"], indent=1))
    name = "first_call" + ("" if isa == "native" else f"_{isa}") + ("_quick" if quick else "")
    path = write_result(name, meta, rows, out_dir)
    print(f"wrote {path}")
    return path


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="one repetition")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default=None)
    ap.add_argument("--baseline", default=None,
                    help="a git ref whose tree's scores part runs beside the current tree's")  # fmt: skip
    ap.add_argument("--isa", choices=["native", "avx2"], default="native",
                    help="the CPU's own instruction set, or AVX2 forced (torch's kernels and "
                    "Numba's target; written to first_call_avx2_<device>.json)")  # fmt: skip
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
