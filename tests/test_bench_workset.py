"""benchmarks/bench_workset.py: its rows measure what they name (the yardstick's figures
recomputed from the answers, the working sets certified, the ratios from the times)."""

from __future__ import annotations

import json

import pytest

from benchmarks import bench_workset as bw


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    path = bw.run(True, [], 100, tmp_path_factory.mktemp("workset"))
    return json.loads(path.read_text())


def test_the_working_sets_are_certified_and_timed_against_faithful(result):
    (row,) = result["rows"]
    assert result["meta"]["torch_threads"] == 1 and result["meta"]["quick"]
    assert result["meta"]["workset_first_call_seconds"] > 0
    assert row["n"] == 4 * 24 and row["d"] == 128
    assert row["reference_certified"] and row["reference_gap"] < 1e-9
    assert row["workset_converged"] and row["workset_gap"] < 1e-9
    assert row["workset_affine_violation"] < 1e-5  # float32 output
    for solver in ("fast", "workset"):
        ratio = row[f"{solver}_seconds"] / row["faithful_seconds"]
        assert row[f"{solver}_over_faithful"] == pytest.approx(ratio), solver
    assert row["faithful_over_workset"] == pytest.approx(
        row["faithful_seconds"] / row["workset_seconds"]
    )


def test_the_yardstick_figures_are_the_answers(result):
    (row,) = result["rows"]
    # the authors' answer is short of the minimiser: a positive objective gap, the constraint
    # off by about their tolerance; the minimiser is below every answer
    for solver in ("faithful", "fast"):
        assert row[f"{solver}_objective_gap"] > 0, solver
        assert 0 < row[f"{solver}_affine_violation"] < 1, solver
        assert -1 <= row[f"{solver}_row_sum_spearman"] <= 1, solver
    assert 1 <= row["minimiser_nnz_median"] <= row["minimiser_nnz_p90"] < row["n"]


def test_passes_mode_counts_the_slowest_column_per_grow(tmp_path):
    path = bw.main(["--passes", "--quick", "--grow", "4", "64", "--out", str(tmp_path)])
    rows = json.loads(path.read_text())["rows"]
    assert [r["grow"] for r in rows] == [4, 64] and all(r["n"] == 96 for r in rows)
    for r in rows:
        assert r["converged"] and r["gap"] < 1e-9 and r["passes"] >= 1 and r["seconds"] > 0
    # adding more violators per pass never takes more passes on the same columns here
    assert rows[1]["passes"] <= rows[0]["passes"]


def test_the_dark_token_rows_compare_with_the_request_without_them(tmp_path):
    """``--dark --quick``: one warning per call naming the 8 dark tokens; ``"ignore"`` takes
    the clean request's ``lambda_z``; the other tokens' figures are against that request."""
    result = json.loads(bw.dark(True, tmp_path).read_text())
    clean, authors, ignore = result["rows"]
    assert clean["n"] + 8 == authors["n"] == ignore["n"]
    assert not clean["dark_warnings"]
    for row in (authors, ignore):
        (said,) = row["dark_warnings"]
        named = ", ".join(map(str, result["meta"]["dark_tokens"]))
        assert f"8 token(s) ({named})" in said
        assert len(row["dark_scores"]) == 8 and -1 <= row["others_score_spearman"] <= 1
    assert ignore["lambda_z"] == pytest.approx(clean["lambda_z"], rel=1e-12)
    assert authors["lambda_z"] > 100 * clean["lambda_z"]
