"""benchmarks/ab.py, run tiny: two trees (this checkout twice, or a revision unpacked beside
it), a trivial workload, 2 rounds, fresh processes alternated; the JSON's medians, ratio,
metadata and rows."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import ab

ROOT = Path(__file__).resolve().parents[1]

WORKLOAD = """
import os


def tiny(case):
    n = int(case)
    return (lambda: dict(total=str(sum(range(n))))), dict(cwd=os.getcwd())


tiny.cases = lambda: ["1000", "5000"]
"""


def test_function_workload_same_tree_twice(tmp_path):
    (tmp_path / "work.py").write_text(WORKLOAD)
    out = tmp_path / "ab.json"
    doc = ab.main([str(ROOT), str(ROOT), "--function", f"{tmp_path / 'work.py'}:tiny",
                   "--rounds", "2", "--calls", "3", "--out", str(out)])  # fmt: skip
    assert json.loads(out.read_text()) == json.loads(json.dumps(doc, default=str))
    meta = doc["meta"]
    assert meta["device"] and meta["torch"] and meta["python"]
    assert meta["trees"]["a"]["path"] == meta["trees"]["b"]["path"] == str(ROOT)
    assert meta["trees"]["a"]["git_sha"] != "unknown"
    assert meta["cases"] == ["1000", "5000"]  # FUNC.cases(), listed in tree B
    # fresh processes, A then B in round 0, B then A in round 1, each case
    assert [(r["round"], r["case"], r["tree"]) for r in doc["rows"]] == [
        (0, "1000", "a"), (0, "1000", "b"), (0, "5000", "a"), (0, "5000", "b"),
        (1, "1000", "b"), (1, "1000", "a"), (1, "5000", "b"), (1, "5000", "a"),
    ]  # fmt: skip
    for r in doc["rows"]:
        assert len(r["seconds"]) == len(r["cpu_seconds"]) == 3
        assert r["cwd"] == str(ROOT) and r["process_seconds"] > 0
    for s in doc["summary"]:
        mine = [r for r in doc["rows"] if r["case"] == s["case"]]
        a = sorted(min(r["seconds"]) for r in mine if r["tree"] == "a")
        assert s["a_values"] and sorted(s["a_values"]) == a
        assert s["a_median"] == pytest.approx(sum(a) / 2)
        assert s["ratio"] == pytest.approx(s["b_median"] / s["a_median"])
        assert s["same_text"] and s["text"]["total"]["a"] == [str(sum(range(int(s["case"]))))]


def test_command_workload_against_a_revision(tmp_path):
    """Tree A: HEAD's commit (abbreviated) unpacked by ``git archive``; B: this checkout.
    The command's own AB_RESULT field is the metric."""
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                          text=True, check=True).stdout.strip()  # fmt: skip
    out = tmp_path / "ab.json"
    cmd = (f"{sys.executable} -c \"import json, os; print('AB_RESULT', "
           "json.dumps(dict(inner=0.5 if os.path.exists('.git') else 0.25)))\"")  # fmt: skip
    doc = ab.main([head[:12], str(ROOT), "--command", cmd, "--metric", "inner", "--rounds", "2",
                   "--order", "ab", "--label-a", "head", "--out", str(out)])  # fmt: skip
    trees = doc["meta"]["trees"]
    assert trees["a"]["source"] == "git archive" and trees["a"]["git_sha"] == head
    assert trees["a"]["label"] == "head" and not Path(trees["a"]["path"]).exists()  # removed
    assert [r["tree"] for r in doc["rows"]] == ["a", "b", "a", "b"]
    (s,) = doc["summary"]
    assert (s["a_median"], s["b_median"], s["ratio"]) == (0.25, 0.5, 2.0)


def test_help_and_bad_tree(capsys):
    with pytest.raises(SystemExit) as e:
        ab.main(["--help"])
    assert e.value.code == 0 and "alternated" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="neither a directory nor a revision"):
        ab.main(["no-such-rev-xyz", ".", "--command", "true", "--out", "/dev/null"])
