"""Shared by every benchmark script: environment metadata, the JSON result format, the
seeded token-like data the SSC benchmarks run on and the measures they compare answers by.

Each result file holds ``{"meta": {...}, "rows": [...]}``; ``meta`` names the device, the
library versions and the git SHA, so a number can always be traced to what produced it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path

import numpy as np
import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def git_sha() -> str:
    """The checkout's commit (``-dirty`` with uncommitted changes to tracked files).

    ``VIDEOANCHOR_GIT_SHA`` wins when set: a copy of the working tree sent to another
    machine (the lent GPU machine) can carry a stale ``.git``, whose HEAD is not the code
    that ran (seen 2026-11-23: results stamped with the session's first commit, "-dirty")."""
    if os.environ.get("VIDEOANCHOR_GIT_SHA"):
        return os.environ["VIDEOANCHOR_GIT_SHA"]
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
            cwd=Path(__file__).resolve().parent,
        ).stdout.strip()  # fmt: skip
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
            text=True, cwd=Path(__file__).resolve().parent,
        ).stdout.strip()  # fmt: skip
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def module_at(commit: str, path: str, name: str):
    """The repository's file ``path`` (``videoanchor/anchor/...``) as it was at ``commit``,
    imported as a module ``name`` of its own (registered in ``sys.modules``: its dataclasses
    look their module up): the code a benchmark or test compares with."""
    import importlib.util
    import sys
    import tempfile

    root = Path(__file__).resolve().parent.parent
    src = subprocess.run(["git", "show", f"{commit}:{path}"], cwd=root, capture_output=True,
                         text=True, check=True).stdout  # fmt: skip
    file = Path(tempfile.mkdtemp()) / f"{name}.py"
    file.write_text(src)
    spec = importlib.util.spec_from_file_location(name, file)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def environment(device: str | None = None) -> dict:
    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_sha": git_sha(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
    }
    try:
        import triton

        meta["triton"] = triton.__version__
    except ImportError:
        meta["triton"] = None
    try:
        meta["loadavg"] = os.getloadavg()
    except OSError:
        pass
    use_cuda = torch.cuda.is_available() and (device is None or str(device).startswith("cuda"))
    if use_cuda:
        props = torch.cuda.get_device_properties(0)
        meta.update(
            device=torch.cuda.get_device_name(0),
            device_memory_gb=round(props.total_memory / 2**30, 1),
            cuda=torch.version.cuda,
        )
    else:
        meta["device"] = f"cpu ({meta['cpu']}, {meta['cpu_count']} cores)"
    return meta


def device_slug(meta: dict) -> str:
    name = meta["device"].split("(")[0].strip().lower()
    return "".join(c if c.isalnum() else "-" for c in name).strip("-")


def write_result(
    name: str, meta: dict, rows: list[dict], out_dir: str | Path | None = None
) -> Path:
    """Write ``<out_dir>/<name>_<device>.json`` and return its path."""
    out = Path(out_dir or os.environ.get("VIDEOANCHOR_RESULTS_DIR") or RESULTS_DIR)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}_{device_slug(meta)}.json"
    path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1, default=str) + "\n")
    return path


def print_table(rows: list[dict], columns: list[str]) -> None:
    # a list inside max(): with no rows, the headers alone
    widths = [max([len(c), *(len(_fmt(r.get(c))) for r in rows)]) for c in columns]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)))
    for r in rows:
        print("  ".join(_fmt(r.get(c)).ljust(w) for c, w in zip(columns, widths, strict=True)))


def finish(name: str, meta: dict, rows: list[dict], out_dir, columns: list[str]) -> Path:
    """The end of a run: the rows as a table of ``columns``, the result file written
    (:func:`write_result`), its path said and returned."""
    print_table(rows, columns)
    path = write_result(name, meta, rows, out_dir)
    print(f"wrote {path}")
    return path


def parser(description: str | None, *, quick: str | bool = False, device: bool = False):
    """A script's argument parser: ``description`` (its docstring) printed as written, and
    the common flags: ``--device cpu|cuda`` (default None) with ``device``, ``--quick``
    (``quick`` its help, or True for none) and ``--out-dir``."""
    ap = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    if device:
        ap.add_argument("--device", choices=["cpu", "cuda"], default=None)
    if quick:
        ap.add_argument("--quick", action="store_true", help=None if quick is True else quick)
    ap.add_argument("--out-dir", help="where the JSON goes (default benchmarks/results)")
    return ap


def _fmt(x) -> str:
    if isinstance(x, float):
        return f"{x:.4g}"
    return "-" if x is None else str(x)


def median_spread(times: list[float]) -> tuple[float, float, float]:
    """``(median, p20, p80)`` of a few timings. The 20th/80th percentiles interpolate
    between the samples (``statistics.quantiles(method="inclusive")``), so they stay inside
    ``[min, max]``; the default "exclusive" method extrapolates beyond them for few samples
    (3 samples gave a negative p20)."""
    if not times:
        raise ValueError("median_spread: expected at least one timing, got none")
    if len(times) == 1:
        return times[0], times[0], times[0]
    q = statistics.quantiles(times, n=5, method="inclusive")
    return statistics.median(times), q[0], q[-1]


def sizes_and_reps(ap, sizes: str, reps: str) -> tuple[list[int], list[int]]:
    """``--sizes`` and ``--reps`` (comma-separated) as lists of ints, one repetition count per
    size (a single count serves every size); an argparse error (``ap``) otherwise."""
    n = [int(v) for v in sizes.split(",") if v]
    r = [int(v) for v in reps.split(",") if v]
    if len(r) == 1:
        r = r * len(n)
    if len(r) != len(n):
        ap.error(f"--reps: expected 1 or {len(n)} values, got {len(r)}")
    return n, r


def skip(script: str, reason: str) -> None:
    """Say that ``script`` (or a part of it) does not run here, in the form
    ``videoanchor bench`` collects into its summary (``bench_x: skipped: ...``)."""
    print(f"{script}: skipped: {reason}", flush=True)


def loadavg() -> list[float] | None:
    """The load average (1, 5 and 15 minutes), or None where the platform has none."""
    try:
        return list(os.getloadavg())
    except OSError:
        return None


def peak_rss_growth(run):
    """``(run(), bytes)``: its result and how far the resident set's high-water mark rose
    above the resident set during it (Linux: the mark reset through /proc/self/clear_refs
    first)."""

    def read(key: str) -> int:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))

    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = read("VmRSS:")
    out = run()
    return out, read("VmHWM:") - before


def sync(device) -> None:
    """Wait for the work queued on ``device`` (a CUDA device; nothing to wait for elsewhere)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _numpy(a) -> np.ndarray:
    return a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)


def spearman(a, b) -> float:
    """Spearman's rank correlation of two score vectors (tensors on any device or arrays)."""
    from scipy.stats import spearmanr

    return float(spearmanr(_numpy(a).astype(np.float64), _numpy(b).astype(np.float64))[0])


def ari(a, b) -> float:
    """The adjusted Rand index of two labelings (tensors on any device or arrays)."""
    from sklearn.metrics import adjusted_rand_score

    return float(adjusted_rand_score(_numpy(a), _numpy(b)))


def rel(a, b) -> float:
    """``||a - b|| / ||b||`` (Frobenius, float64, on the CPU)."""
    a, b = torch.as_tensor(a).double().cpu(), torch.as_tensor(b).double().cpu()
    return float((a - b).norm() / b.norm())


def objective(x, coef, lam_e, lam_z) -> float:
    """The SSC objective of ``coef`` on the features ``x`` (``N x D``) with ``E`` at its
    optimum for this ``C``, in float64: the package's one copy of the program
    (:func:`videoanchor.anchor.program.duality_gaps`)."""
    from videoanchor.anchor.program import duality_gaps

    return duality_gaps(x, coef, lam_e, lam_z).objective()


def synthetic_tokens(n, d, *, k=24, sub_dim=6, noise=0.05, corrupt=0.002, seed=0):
    """Seeded token-like features (``n x d``, float32, CPU): ``k`` random ``sub_dim``-dimensional
    subspaces, a shared mean direction (tokens of one video are correlated), Gaussian
    ``noise`` and a share ``corrupt`` of sparse large corruptions (the outlier term's work)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % k
    x = torch.empty(n, d)
    for c in range(k):
        idx = (labels == c).nonzero().squeeze(1)
        basis = torch.randn(d, sub_dim, generator=g) / sub_dim**0.5
        x[idx] = (basis @ torch.randn(sub_dim, idx.numel(), generator=g)).T
    x += 0.5 * torch.randn(d, generator=g)
    x += noise * torch.randn(n, d, generator=g)
    mask = torch.rand(n, d, generator=g) < corrupt
    x += mask * 5.0 * torch.randn(n, d, generator=g)
    return x


def video_tokens(frames, patches, d, *, k=24, sub_dim=6, drift=0.1, noise=0.02, seed=0):
    """Seeded tokens with a video's temporal redundancy (``frames * patches`` x ``d``, float32).

    Each of ``patches`` positions lies on one of ``k`` random ``sub_dim``-dimensional
    subspaces; its coefficients drift by ``drift`` (Gaussian) from one frame to the next, so a
    token is nearly its own position's token in the neighbouring frames; a shared mean
    direction and ``noise`` as in :func:`synthetic_tokens`. The SSC program's minimiser is
    sparse here as on real video tokens (issue 52: a median of 13 non-zeros per column of
    768): 44 of 384 at 8 frames of 48 patches, D = 1024. :func:`synthetic_tokens` draws every
    token afresh and its minimiser is dense (768 tokens, D = 1024, seed 2: the float64 ADMM at
    eps 1e-7, gap 2.5e-5, has a median of 255 non-zeros per column; one measurement).
    """
    g = torch.Generator().manual_seed(seed)
    basis = torch.randn(k, d, sub_dim, generator=g) / sub_dim**0.5
    cluster = torch.randint(0, k, (patches,), generator=g)
    coeffs = torch.randn(patches, sub_dim, generator=g)
    mean = 0.5 * torch.randn(d, generator=g)
    out = []
    for _ in range(frames):
        coeffs = coeffs + drift * torch.randn(patches, sub_dim, generator=g)
        tokens = torch.einsum("pds,ps->pd", basis[cluster], coeffs)
        out.append(tokens + mean + noise * torch.randn(patches, d, generator=g))
    return torch.cat(out)


def ssc_seconds(x, k, solver, **kw):
    """Seconds of one ``compute_anchor_scores(mode="exact")`` call (the least of 5 when it
    takes under 0.5 s, where one run is mostly noise) and its result. ``progress`` (default
    False) may be an ``SSCProgress`` with a time budget."""
    from videoanchor.anchor import compute_anchor_scores

    best, res = float("inf"), None
    kw.setdefault("progress", False)
    for _ in range(5):
        sync(x.device)
        t = time.perf_counter()
        res = compute_anchor_scores(x, k, solver=solver, mode="exact", **kw)
        sync(x.device)
        best = min(best, time.perf_counter() - t)
        if best >= 0.5:
            break
    return best, res


def first_call_seconds() -> float:
    """The working-set kernel's first call in the process, on a tiny input: Numba compiles
    it or loads it from its cache. Benchmarks time it apart so that no row pays it."""
    from videoanchor.anchor import solve_ssc_workset

    t = time.perf_counter()
    solve_ssc_workset(torch.randn(8, 4))
    return time.perf_counter() - t
