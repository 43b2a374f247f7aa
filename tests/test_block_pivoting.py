"""benchmarks/experiments/block_pivoting.py on a tiny set (the counts of
benchmarks/results/logs/block-pivoting-2026-11-28*/ are on 2048 tokens, minutes): every rule
reaches the certified minimiser, ``chains single`` and ``global``'s ``single`` are one rule,
and ``--check`` finds a changed count."""

from __future__ import annotations

import copy
import json

import pytest

from benchmarks.experiments import block_pivoting as bp

COLUMNS = [0, 5, 17, 40]


@pytest.fixture(scope="module")
def p():
    return bp.problem(frames=4, per_frame=16, d=48, k=2)


def test_chains_reach_the_minimiser(p):
    single = bp.chains("single", COLUMNS, p=p)
    block = bp.chains("block", COLUMNS, p=p)
    for out in (single, block):
        assert out["summary"]["converged"] == len(COLUMNS)
        assert out["summary"]["max_diff"] < 1e-8
        for r in out["rows"]:
            assert set(r) == {*bp.CHAIN_KEYS, "column", "set", "support", "max_diff"}
            assert r["steps"] == r["joins"] + r["leaves"] + 1  # a step joins, leaves or ends
    pdas = bp.chains("pdas", COLUMNS, p=p)
    assert [r["column"] for r in pdas["rows"]] == COLUMNS


def test_global_and_passes(p):
    single = bp.chains("single", COLUMNS, p=p)
    g = json.loads(json.dumps(bp.global_rules(COLUMNS, p=p)))
    assert set(g["rows"]) == set(bp.RULES)
    for rule, s in g["summary"].items():
        assert s["converged"] == len(COLUMNS) and s["max_diff"] < 1e-8, rule
    # global's single is chains single's rule (its rows keep no joins or leaves)
    assert g["rows"]["single"]["steps"] == [r["steps"] for r in single["rows"]]
    assert "joins" not in g["rows"]["single"]
    assert bp.check(g, g) == []
    changed = copy.deepcopy(g)
    changed["rows"]["bpp"]["steps"][1] += 1
    assert bp.check(g, changed) == [
        f"bpp column {COLUMNS[1]} steps: {g['rows']['bpp']['steps'][1]} against "
        f"{changed['rows']['bpp']['steps'][1]}"
    ]
    passes = json.loads(json.dumps(bp.passes(16, COLUMNS, p=p)))
    for rule, s in passes["summary"].items():
        assert s["converged"] == len(COLUMNS) and s["max_diff"] < 1e-8, rule
    assert bp.check(passes, passes) == []


def test_help():
    with pytest.raises(SystemExit) as e:
        bp.main(["--help"])
    assert e.value.code == 0
