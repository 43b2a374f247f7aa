"""The first call after install (issue 68): what ``import videoanchor`` loads, and Numba's
cache for the working-set kernel where the package cannot be written to."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

from numba_support import COMPILE_REPORT

ROOT = Path(__file__).resolve().parents[1]


def _child(code: str, env: dict | None = None, cwd=None) -> str:
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=cwd or ROOT,
                         capture_output=True, text=True, timeout=600)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.strip().splitlines()[-1]


def test_import_loads_neither_transformers_nor_scipy_nor_numba():
    got = json.loads(_child(
        "import json, sys, videoanchor\n"
        "print(json.dumps([m for m in ('transformers', 'scipy', 'numba', 'sklearn', "
        "'videoanchor.cli', 'videoanchor.integrations.vllm') if m in sys.modules]))"
    ))  # fmt: skip
    assert got == [], f"import videoanchor loaded {got}"


def test_the_attention_registers_when_transformers_is_imported_after_videoanchor():
    """``attn_implementation="videoanchor_triton"`` works after ``import videoanchor`` alone:
    the import hook registers it once transformers is imported (and at once where it was)."""
    shim = "import sys; sys.path.insert(0, 'tests'); import torchvision_shim; torchvision_shim.apply()\n"
    for order in ("import videoanchor, transformers", "import transformers, videoanchor"):
        got = _child(shim + order + "\n"
                     "from transformers import AttentionInterface, PreTrainedModel\n"
                     "print('videoanchor_triton' in AttentionInterface._global_mapping, "
                     "getattr(PreTrainedModel.post_init, '_videoanchor_wrapped', False))")  # fmt: skip
        assert got == "True True", (order, got)


def test_a_read_only_install_caches_the_kernel_in_the_user_cache(tmp_path):
    """The package copied and made read-only (its ``__pycache__`` folders a file where the
    tests run as root, whom the mode bits do not stop), ``NUMBA_CACHE_DIR`` unset: the first
    ``videoanchor warmup`` compiles the kernel into ``$XDG_CACHE_HOME``, a second process
    loads it from there."""
    copy = tmp_path / "site"
    shutil.copytree(ROOT / "videoanchor", copy / "videoanchor",
                    ignore=shutil.ignore_patterns("__pycache__", "*.so"))  # fmt: skip
    kernel_dir = copy / "videoanchor" / "anchor" / "solvers"  # (_workset_kernel.py)
    if os.geteuid() == 0:  # (the kernels' folder, and the discretisation loops')
        for folder in (kernel_dir, kernel_dir.parent):
            (folder / "__pycache__").write_text("not a folder\n")
    for path in [copy, *copy.rglob("*")]:
        path.chmod(path.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_CACHE_DIR"}
    env.update(PYTHONPATH=str(copy), XDG_CACHE_HOME=str(tmp_path / "xdg"),
               HOME=str(tmp_path / "home"), PYTHONDONTWRITEBYTECODE="1")  # fmt: skip
    try:
        first, second = (_child("from videoanchor.cli import main; main(['warmup'])", env,
                                cwd=tmp_path) for _ in range(2))  # fmt: skip
        # the background compile's check (issue 93) finds the same index files, warm
        paths = json.loads(_child(
            "import json\n"
            "from videoanchor.anchor.solvers import _workset_kernel as k, precompile as p\n"
            "print(json.dumps([[str(x) for x in p.index_paths()], p.cache_is_cold(),\n"
            "    [k.KERNELS[n]._cache._cache_file._index_path for n in ('lean', 'full')]]))",
            env, cwd=tmp_path))  # fmt: skip
    finally:
        for path in [copy, *copy.rglob("*")]:
            path.chmod(path.stat().st_mode | stat.S_IWUSR)
    cache = str(tmp_path / "xdg" / "numba")
    assert "kernel compiled into Numba's cache" in first and f": {cache}/" in first, first
    assert "kernel loaded from Numba's cache" in second and f": {cache}/" in second, second
    assert any((tmp_path / "xdg").rglob("*.nbi")), "no Numba index in the user cache"
    assert paths[0][:2] == paths[2] and not paths[1] and paths[0][0].startswith(cache), paths
    assert all(p.startswith(cache) for p in paths[0]), paths  # (the loops' too, issue 101)


def test_the_readme_states_the_snippet_time_that_bench_first_call_measured():
    """The first screen's times for the snippet are bench_first_call.py's medians, rounded: the
    range over the committed first-call files, the CPU's own instruction set and AVX2 forced
    (issue 93; report.py's first-call fragment writes the sentence)."""
    import re

    warm, cold = [], []
    for name in ("first_call_cpu.json", "first_call_avx2_cpu.json"):
        summary = json.loads((ROOT / "benchmarks/results" / name).read_text())["meta"]["summary"]
        warm.append(summary["snippet_warm_cache"])
        cold.append(summary["snippet_empty_cache"])
    text = (ROOT / "README.md").read_text()
    m = re.search(r"runs in about (\d+)(?:-(\d+))? s in a fresh process \((\d+)(?:-(\d+))? s "
                  r"the first time", text)  # fmt: skip
    assert m, "README: the snippet's time is not stated in the form bench_first_call measures"
    got = [int(g) if g else None for g in m.groups()]
    for (lo, hi), values in (((got[0], got[1]), warm), ((got[2], got[3]), cold)):
        assert lo == round(min(values)) and (hi or lo) == round(max(values)), (got, warm, cold)


def test_a_warm_cache_compiles_nothing(tmp_path):
    """Numba's cache holds each kernel as one function (its helpers are linked into it, issue
    79): a process that finds it warm compiles nothing, the helpers included, and solves. A
    set without outlier entries needs the lean kernel alone (issue 93): the first process
    compiles that one and its helpers, not the full kernel's (``_add_outlier``)."""
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / "numba")}
    code = COMPILE_REPORT + (
        "import torch\n"
        "from videoanchor.anchor.solvers.workset import solve_ssc_workset\n"
        "res = solve_ssc_workset(torch.randn(12, 6, generator=torch.Generator().manual_seed(0)))\n"
        "report(converged=bool(res.converged))\n"
    )

    def how(got):  # what the process did for each kernel
        return [(e["kernel"], e["how"]) for e in got["events"]]

    first = json.loads(_child(code, env))
    assert how(first) == [("lean", "compiled")] and first["converged"], first
    assert {"solve_columns_lean", "_hsolve"} <= set(first["compiled"]), first
    assert "_add_outlier" not in first["compiled"], first
    assert "solve_columns" not in first["compiled"], first
    indexes = [p.name for p in (tmp_path / "numba").rglob("*.nbi")]
    assert len(indexes) == 1 and "solve_columns_lean-" in indexes[0], indexes
    second = json.loads(_child(code, env))
    assert second["compiled"] == [] and how(second) == [("lean", "loaded")], second
    assert second["converged"] is True, second
