"""The real lmms-eval (0.7.3) end to end: its command-line entry evaluates the `videoanchor`
model plugin on a local task (a YAML, its utils.py and a JSONL dataset the test writes), and
`videoanchor tune` sweeps on the same task with the task's own metric.

lmms-eval is installed in CI without its heavy dependency list (see .ci/run); where it is
not installed these tests skip, unless VIDEOANCHOR_REQUIRE_LMMS_EVAL=1 (CI) makes that a
failure. tests/test_lmms_eval.py covers the wrapper's contract in detail (against the real
package when it is installed, else against its stand-in of lmms-eval's model API).
"""

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from test_cli_support import direct_inputs, greedy_answer, moving_shapes, save_tiny_checkpoint

from videoanchor.cli import main
from videoanchor.tune import TuneError, load_lmms_task
from videoanchor.video import write_video

HAVE = importlib.util.find_spec("lmms_eval") is not None
if not HAVE and os.environ.get("VIDEOANCHOR_REQUIRE_LMMS_EVAL") == "1":
    raise RuntimeError("VIDEOANCHOR_REQUIRE_LMMS_EVAL=1 but lmms_eval does not import")
pytestmark = pytest.mark.skipif(not HAVE, reason="lmms-eval is not installed")

TESTS = Path(__file__).resolve().parent
FRAMES = 4
DOCS = 2

_UTILS = """
def doc_to_visual(doc):
    return [doc["video"]]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"]


def process_results(doc, results):
    return {"accuracy": float(doc["answer"] in results[0])}
"""


def _task_yaml(name, data):
    scoring = "doc_to_target: answer\nprocess_results: !function utils.process_results\n"
    return (
        textwrap.dedent(f"""\
        task: {name}
        dataset_path: json
        dataset_kwargs:
          data_files:
            test: {data}
        test_split: test
        output_type: generate_until
        doc_to_visual: !function utils.doc_to_visual
        doc_to_text: !function utils.doc_to_text
        generation_kwargs:
          max_new_tokens: 3
        metric_list:
          - metric: accuracy
            aggregation: mean
            higher_is_better: true
        """)
        + scoring
    )


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    root = tmp_path_factory.mktemp("lmms_real")
    model = root / "model"
    save_tiny_checkpoint("qwen2_5_vl", model)
    tasks = root / "tasks"
    tasks.mkdir()
    with open(root / "docs.jsonl", "w") as f:
        for i in range(DOCS):
            write_video(root / f"v{i}.mp4", moving_shapes(10, 64, 96, seed=i), fps=10)
            f.write(json.dumps({"video": str(root / f"v{i}.mp4"), "question": "Which?",
                                "answer": "s"}) + "\n")  # fmt: skip
    # the same documents without answers (e.g. a benchmark's unlabelled test split)
    with open(root / "unlabelled.jsonl", "w") as f:
        f.write(json.dumps({"video": str(root / "v0.mp4"), "question": "Which?"}) + "\n")
    (tasks / "utils.py").write_text(_UTILS)
    (tasks / "va_local.yaml").write_text(_task_yaml("va_local", root / "docs.jsonl"))
    (tasks / "va_noanswer.yaml").write_text(_task_yaml("va_noanswer", root / "unlabelled.jsonl"))
    return {"root": root, "model": model, "tasks": tasks}


def test_lmms_eval_cli_runs_the_videoanchor_model(task, tmp_path):
    out = tmp_path / "out"
    model_args = (
        f"pretrained={task['model']},trust_remote_code=True,max_num_frames={FRAMES},n_clusters=3"
    )
    code = (
        "import sys, torchvision_shim; torchvision_shim.apply()\n"
        "from lmms_eval.__main__ import cli_evaluate\n"
        f"sys.argv = ['lmms-eval', '--model', 'videoanchor', '--model_args', {model_args!r}, "
        f"'--tasks', 'va_local', '--include_path', {str(task['tasks'])!r}, '--batch_size', '2', "
        f"'--output_path', {str(out)!r}, '--log_samples']\n"
        "cli_evaluate()\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS.parent), str(TESTS),
                                                         os.environ.get("PYTHONPATH", "")]),
           "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}  # fmt: skip
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=600)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    samples = sorted(out.rglob("*_samples_va_local.jsonl"))
    assert samples, run.stderr[-3000:]
    rows = [json.loads(line) for line in samples[0].read_text().splitlines()]
    assert len(rows) == DOCS
    torch.set_num_threads(1)
    for row in sorted(rows, key=lambda r: r["doc_id"]):
        video = task["root"] / f"v{row['doc_id']}.mp4"
        model, processor, _, inputs = direct_inputs(task["model"], video, "Which?", FRAMES,
                                                    n_clusters=3)  # fmt: skip
        want = greedy_answer(model, processor, inputs, 3)
        got = row["filtered_resps"]
        got = got[0] if isinstance(got, list) else got
        assert got == want
        assert row["accuracy"] == float("s" in got)
    results = sorted(out.rglob("*_results.json"))
    assert results
    acc = json.loads(results[0].read_text())["results"]["va_local"]["accuracy,none"]
    assert acc == pytest.approx(sum(r["accuracy"] for r in rows) / DOCS)


def test_tune_on_an_lmms_eval_task_uses_its_metric(task, tmp_path):
    out = tmp_path / "tune"
    argv = ["tune", "--model", str(task["model"]), "--trust-remote-code", "--data", "va_local",
            "--include-path", str(task["tasks"]), "--limit", str(DOCS), "--frames", str(FRAMES),
            "--alpha-k", "0,9.5", "--alpha-v", "0", "--n-clusters", "3", "--max-new-tokens", "3",
            "--bootstrap", "100", "--out", str(out), "--quiet", "--no-cache"]  # fmt: skip
    assert main(argv) == 0
    rows = json.loads((out / "results.json").read_text())
    assert len(rows) == 2
    lines = (out / "answers.jsonl").read_text().splitlines()[1:]
    for rec in map(json.loads, lines):
        assert rec["score"] == float("s" in rec["answer"])  # the task's process_results


def test_lmms_eval_task_without_answers_is_refused(task):
    with pytest.raises(TuneError, match="no answer .* expected documents with answers"):
        load_lmms_task("va_noanswer", include_path=str(task["tasks"]))
    with pytest.raises(TuneError, match="neither a file nor an lmms-eval task"):
        load_lmms_task("va_missing_task", include_path=str(task["tasks"]))
