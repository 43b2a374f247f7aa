"""Turn the committed benchmark JSON files into the README's results section.

    python benchmarks/report.py            # print the markdown
    python benchmarks/report.py --write    # replace the section between the README markers

Numbers are never typed by hand: each table is made from one result file and names the
device, versions and git SHA stored in it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"
SKIP = {"meta", "lengths", "ms_p20", "ms_p80"}


def _fmt(x) -> str:
    if isinstance(x, float):
        return f"{x:.3g}"
    return "" if x is None else str(x)


def table(path: Path) -> str:
    data = json.loads(path.read_text())
    meta, rows = data.get("meta", {}), data.get("rows", [])
    cols: list[str] = []
    for r in rows:
        cols += [
            c for c in r if c not in cols and c not in SKIP and not isinstance(r[c], (dict, list))
        ]
    head = (
        f"**{path.stem}**: {meta.get('device', '?')}, torch {meta.get('torch', '?')}, "
        f"triton {meta.get('triton', '?')}, git {str(meta.get('git_sha', '?'))[:12]}, "
        f"{meta.get('date', '?')}"
    )
    lines = [head, "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def section() -> str:
    files = sorted(RESULTS.glob("*.json"))
    if not files:
        return "No benchmark result has been committed yet."
    return "\n\n".join(table(f) for f in files)


def main(argv=None):
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--write", action="store_true", help="update README.md in place")
    args = ap.parse_args(argv)
    text = section()
    if not args.write:
        print(text)
        return
    readme = ROOT / "README.md"
    s = readme.read_text()
    if BEGIN not in s or END not in s:
        raise SystemExit(f"README.md has no {BEGIN} ... {END} markers")
    a, b = s.index(BEGIN) + len(BEGIN), s.index(END)
    readme.write_text(s[:a] + "\n" + text + "\n" + s[b:])
    print(f"updated {readme}")


if __name__ == "__main__":
    main()
