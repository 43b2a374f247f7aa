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


def compile_table(path: Path) -> str:
    """A compile report (``compile_sm*.json``, STATIC figures read from compiled code) in
    brief: per kernel the worst case over its configurations, then the main-loop mix."""
    data = json.loads(path.read_text())
    meta, rows = data.get("meta", {}), data.get("rows", [])
    summary = ", ".join(f"{k} {_fmt(v)}" for k, v in data.get("summary", {}).items())
    lines = [
        f"**{path.stem}** (STATIC, read from compiled code; not a timing): "
        f"triton {meta.get('triton', '?')}, git {str(meta.get('git_sha', '?'))[:12]}; {summary}",
        "",
        "| kernel | configurations | max registers | spill bytes (max) | max shared bytes "
        "| shared limit | MMA kinds |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in sorted({r["kernel"] for r in rows if "kernel" in r}):
        rs = [r for r in rows if r.get("kernel") == name and "error" not in r]
        spills = max(r["spill_stores"] + r["spill_loads"] for r in rs)
        kinds = "/".join(sorted({str(r["mma"]) for r in rs}))
        lines.append(
            f"| {name} | {len(rs)} | {max(r['registers'] for r in rs)} | {spills} "
            f"| {max(r['shared_bytes'] for r in rs)} | {rs[0]['shared_limit']} | {kinds} |"
        )
    mix = data.get("instruction_mix", [])
    if mix:
        lines += [
            "",
            "| main loop | anchored non-MMA per MMA | plain non-MMA per MMA | ratio |",
            "|---|---|---|---|",
        ]
        for m in mix:
            label = f"{m['dtype']} D {m['D']}" + (" causal" if m.get("causal") else "")
            lines.append(
                f"| {label} | {_fmt(m['anchored']['non_mma_per_mma'])} "
                f"| {_fmt(m['plain']['non_mma_per_mma'])} | {m['ratio_non_mma_per_mma']:.3f} |"
            )
    return "\n".join(lines)


def section() -> str:
    files = sorted(RESULTS.glob("*.json"))
    if not files:
        return "No benchmark result has been committed yet."
    return "\n\n".join(
        compile_table(f) if f.stem.startswith("compile_") else table(f) for f in files
    )


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
