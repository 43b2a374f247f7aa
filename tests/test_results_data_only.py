"""benchmarks/results/ holds data only (issue 89): the result files and the run folders' logs,
files and READMEs, no script. A script that made a result lives in benchmarks/ (the
``bench_*.py`` scripts, ``ab.py``) or benchmarks/experiments/, and the folder's README names
it."""

from __future__ import annotations

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
#: what a results folder may hold: data, text and the READMEs (add a data kind here)
DATA = {".json", ".jsonl", ".csv", ".tsv", ".txt", ".log", ".md", ".svg", ".png"}


def _files() -> list[Path]:
    """The committed files under benchmarks/results and the untracked ones git does not
    ignore (a new script shows before it is committed); every file outside a checkout."""
    try:
        out = subprocess.run(
            ["git", "ls-files", "--cached", "--others", "--exclude-standard", "--", "."],
            cwd=RESULTS, capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return [p for p in RESULTS.rglob("*") if p.is_file()]
    return [RESULTS / line for line in out.splitlines() if (RESULTS / line).is_file()]


def test_results_hold_no_code():
    files = _files()
    assert files, "no files found under benchmarks/results"
    code = sorted(
        str(p.relative_to(ROOT))
        for p in files
        if p.suffix.lower() not in DATA or p.read_bytes()[:2] == b"#!"
    )
    assert not code, (
        "benchmarks/results/ holds data only; move these scripts to benchmarks/experiments/ "
        f"(or remove them, saying so in the folder's README): {code}"
    )
