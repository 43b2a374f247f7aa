"""Shared by every benchmark script: environment metadata and the JSON result format.

Each result file holds ``{"meta": {...}, "rows": [...]}``; ``meta`` names the device, the
library versions and the git SHA, so a number can always be traced to what produced it.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import subprocess
from pathlib import Path

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


def environment(device: str | None = None) -> dict:
    import torch

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
