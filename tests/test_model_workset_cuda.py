"""benchmarks/model_workset_cuda.py: the committed model JSON is what the script computes
from the committed H100 files, the fit holds its calibration row, and the old calibration's
replay is the 2026-11-27 model's own prediction where their counts agree."""

from __future__ import annotations

import json

import pytest

from benchmarks import model_workset_cuda as mw

RUN = mw.LOGS / "h100-2026-11-28"


@pytest.fixture(scope="module")
def out():
    return mw.model(mw.inputs(RUN))


def test_the_committed_json_is_the_scripts(out):
    committed = json.loads((RUN / "workset_cuda_model_static.json").read_text())
    fresh = json.loads(json.dumps(out))  # (the JSON's keys: strings)
    assert committed["fitted"] == pytest.approx(fresh["fitted"], rel=1e-12)
    assert committed["rows"] == fresh["rows"]
    assert committed["parameters"] == fresh["parameters"]


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


def test_old_calibration_replays_the_11_27_model(out):
    old = json.loads(mw.OLD.read_text())["rows"][0]
    r16 = next(r for r in out["rows"] if r["in_sample"])
    assert old["frames"] == 16 and old["passes_today"] == r16["passes"]
    assert r16["old_calibration_workset_s"] == pytest.approx(old["predicted_workset_today_s"])
