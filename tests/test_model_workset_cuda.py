"""benchmarks/model_workset_cuda.py: the committed model JSON is what the script computes from
the input files the JSON names (their contents unchanged since), the fit holds its
calibration row, and the old calibration's replay is the 2026-11-27 model's own prediction
where their counts agree."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import model_workset_cuda as mw


@pytest.fixture(scope="module")
def committed():
    return json.loads(mw.MODEL.read_text())


@pytest.fixture(scope="module")
def named(committed):
    return mw.committed_inputs(mw.MODEL)


@pytest.fixture(scope="module")
def out(named):
    return mw.model(mw.inputs(**named))


def test_the_inputs_are_named_and_unchanged(committed, named):
    # the script names no log folder: its inputs are its arguments, their defaults the
    # files the committed JSON names
    assert "logs/" not in Path(mw.__file__).read_text()
    assert set(named) == set(mw.INPUTS)
    files = [p for v in named.values() for p in (v if isinstance(v, list) else [v])]
    digests = committed["meta"]["input_sha256"]
    assert sorted(mw._rel(p) for p in files) == sorted(digests)
    for p in files:
        assert mw.sha256(p) == digests[mw._rel(p)], f"{mw._rel(p)} changed since the model"


def test_the_committed_json_is_the_scripts(committed, out):
    fresh = json.loads(json.dumps(out))  # (the JSON's keys: strings)
    assert committed["fitted"] == pytest.approx(fresh["fitted"], rel=1e-12)
    assert committed["rows"] == fresh["rows"]
    assert committed["parameters"] == fresh["parameters"]


def test_the_script_writes_what_it_read(tmp_path, committed):
    path = mw.main(["--out", str(tmp_path / "model.json")])
    written = json.loads(path.read_text())
    assert written["meta"]["inputs"] == committed["meta"]["inputs"]
    assert written["meta"]["input_sha256"] == committed["meta"]["input_sha256"]
    assert written["rows"] == committed["rows"]


def test_fitted_at_16_frames_predicted_elsewhere(out):
    rows = {(r["model"], r["frames"]): r for r in out["rows"]}
    assert [k for k, r in rows.items() if r["in_sample"]] == [("Qwen2.5-VL-7B", 16)]
    r16 = rows["Qwen2.5-VL-7B", 16]
    assert r16["predicted_workset_s"] == pytest.approx(r16["measured_workset_s"], rel=1e-12)
    assert r16["predicted_workset_low_s"] == pytest.approx(r16["measured_workset_s"], rel=1e-12)
    # the counts the H100 recorded (not assumed) for every Qwen2.5-VL-7B row
    assert not any(rows["Qwen2.5-VL-7B", f]["counts_assumed"] for f in (16, 32, 64))
    assert rows["InternVL2-8B", 64]["counts_assumed"]
    for r in out["rows"]:
        assert r["error_workset"] == pytest.approx(
            r["predicted_workset_s"] / r["measured_workset_s"] - 1
        )


def test_old_calibration_replays_the_11_27_model(named, out):
    old = json.loads(named["old_model"].read_text())["rows"][0]
    r16 = next(r for r in out["rows"] if r["in_sample"])
    assert old["frames"] == 16 and old["passes_today"] == r16["passes"]
    assert r16["old_calibration_workset_s"] == pytest.approx(old["predicted_workset_today_s"])
