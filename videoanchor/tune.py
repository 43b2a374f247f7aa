"""``videoanchor tune``: sweep alpha_K x alpha_V x n_clusters on a dev set, reusing the work
that does not depend on them.

    videoanchor tune --model Qwen/Qwen2.5-VL-7B-Instruct --data dev.jsonl \\
        --alpha-k 0,2,4,9.5 --alpha-v 0,1,2.5 --n-clusters 16,24 --out tune/

Per item the vision encoder runs once and SSC's C is solved once; the labels and scores are
computed once per item and cluster count; every alpha setting re-runs only the language
model, the settings of one item and cluster count sharing a batch (each row carries its own
gates, :meth:`AnchorHandle.per_row`). All of it goes through
:class:`~videoanchor.integrations.transformers.cache.AnchorCache`, on disk, so a second run
recomputes nothing.

Outputs in ``--out``: ``results.json`` (one entry per setting: ``alpha_k``, ``alpha_v``,
``n_clusters``, ``accuracy``, ``delta`` against the unanchored baseline on the same items and
the paired bootstrap interval ``ci_low`` / ``ci_high``), ``summary.json`` (baseline, best
setting, hold-out result), ``heatmap_k{K}.png`` per cluster count and ``answers.jsonl`` (every
answer, appended as it is produced: an interrupted run keeps them and ``--resume`` goes on).
An application: nothing imports it but :mod:`videoanchor.cli`.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from videoanchor.anchor.options import DEFAULTS as SSC
from videoanchor.pipeline import PipelineError, _first_line

__all__ = [
    "Item",
    "Setting",
    "TuneError",
    "add_arguments",
    "bootstrap_delta",
    "load_items",
    "mean_relative_accuracy",
    "multiple_choice_correct",
    "parse_grid",
    "score_answer",
    "run_tune",
]

DEFAULT_FRAMES = 16
ANSWERS = "answers.jsonl"
RESULTS = "results.json"
SUMMARY = "summary.json"
_BASELINE = "baseline"


class TuneError(PipelineError):
    """A user-facing failure of ``videoanchor tune`` (one line, exit status 1)."""


# ----------------------------------------------------------------------------------------
# data


@dataclass(frozen=True)
class Item:
    """One dev-set question: a ``video`` path or ``images`` (views), the question, the
    reference answer and optional multiple-choice ``options`` (shown as ``A. ...``)."""

    id: str
    question: str
    answer: str
    video: str | None = None
    images: tuple | None = None
    options: tuple[str, ...] | None = None
    prompt: str | None = None  # the exact text sent (lmms-eval: the task's doc_to_text)
    scorer: object = field(default=None, compare=False, repr=False)  # prediction -> float


def load_items(path: str | os.PathLike) -> list[Item]:
    """Read a JSONL dev set: one object per line with ``video`` or ``images``, ``question``,
    ``answer`` and optionally ``options`` (list of str) and ``id``. Relative media paths are
    taken from the file's directory. Raises TuneError naming the line for a bad entry."""
    path = Path(path)
    if not path.exists():
        raise TuneError(
            f"--data: file not found: '{path}'; expected a JSONL file of items "
            "(video or images, question, answer)"
        )
    if path.is_dir():
        raise TuneError(f"--data: '{path}' is a directory, expected a JSONL file")
    items, seen = [], set()
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{n}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise TuneError(f"{where}: expected one JSON object per line, got invalid "
                                f"JSON ({err.msg} at column {err.colno})") from err  # fmt: skip
            if not isinstance(obj, dict):
                raise TuneError(f"{where}: expected a JSON object, got {type(obj).__name__}")
            items.append(_item(obj, where, path.parent, len(items)))
            if items[-1].id in seen:
                raise TuneError(f"{where}: duplicate id {items[-1].id!r}; expected unique ids")
            seen.add(items[-1].id)
    if not items:
        raise TuneError(f"--data: '{path}' has no items; expected one JSON object per line")
    return items


def _item(obj: dict, where: str, base: Path, index: int) -> Item:
    for key in ("question", "answer"):
        if key not in obj:
            raise TuneError(f"{where}: missing {key!r}; expected video or images, question, answer")
    question, answer = obj["question"], obj["answer"]
    if not isinstance(question, str) or not question.strip():
        raise TuneError(f"{where}: expected 'question' to be a non-empty string, got {question!r}")
    if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
        raise TuneError(f"{where}: expected 'answer' to be a string or number, got {answer!r}")
    video, images = obj.get("video"), obj.get("images")
    if (video is None) == (images is None):
        raise TuneError(f"{where}: expected exactly one of 'video' (a path) or 'images' (paths)")
    if video is not None:
        if not isinstance(video, str):
            raise TuneError(f"{where}: expected 'video' to be a path string, got {video!r}")
        video = str(base / video)
        if not os.path.exists(video):
            raise TuneError(f"{where}: video file not found: '{video}'")
    else:
        if isinstance(images, str):
            images = [images]
        if (
            not isinstance(images, list)
            or not images
            or not all(isinstance(p, str) for p in images)
        ):
            raise TuneError(f"{where}: expected 'images' to be a non-empty list of paths")
        images = tuple(str(base / p) for p in images)
        for p in images:
            if not os.path.exists(p):
                raise TuneError(f"{where}: image file not found: '{p}'")
    options = obj.get("options")
    if options is not None:
        if (
            not isinstance(options, list)
            or not options
            or len(options) > 26
            or not all(isinstance(o, str) for o in options)
        ):
            raise TuneError(f"{where}: expected 'options' to be a list of 1-26 strings")
        options = tuple(options)
    return Item(id=str(obj.get("id", index)), question=question, answer=str(answer),
                video=video, images=images, options=options)  # fmt: skip


_VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".flv", ".mpeg", ".mpg")


def load_lmms_task(name: str, *, include_path=None, limit: int | None = None) -> list[Item]:
    """The documents of an lmms-eval task as items: its ``doc_to_visual`` (one video path, or
    images), its ``doc_to_text`` prompt, its ``generation_kwargs`` stop strings, and its
    ``process_results`` as the metric (the first metric of its ``metric_list``, which must be
    a number per document). ``include_path``: a directory of local task YAML files."""
    try:
        from lmms_eval.tasks import TaskManager, get_task_dict
    except ImportError as err:
        raise TuneError(
            f"--data '{name}' is not a file; to use it as an lmms-eval task install lmms-eval "
            f"(pip install 'videoanchor[eval]'): {_first_line(err)}"
        ) from err
    try:  # lmms-eval logs every YAML it indexes (loguru, DEBUG) to stderr
        from loguru import logger

        logger.disable("lmms_eval")
    except ImportError:
        logger = None
    try:
        return _lmms_items(name, include_path, limit, TaskManager, get_task_dict)
    finally:
        if logger is not None:
            logger.enable("lmms_eval")


def _lmms_items(name, include_path, limit, TaskManager, get_task_dict) -> list[Item]:  # noqa: N803
    manager = None
    if include_path is not None:  # local tasks first: indexing lmms-eval's own takes seconds
        manager = TaskManager(include_path=include_path, include_defaults=False)
        if name not in manager.all_tasks:
            manager = None
    if manager is None:
        manager = TaskManager(include_path=include_path)
    if name not in manager.all_tasks:
        raise TuneError(
            f"--data '{name}' is neither a file nor an lmms-eval task; expected a JSONL file or "
            "a task name (local task YAML: --include-path DIR)"
        )
    try:
        task = get_task_dict([name], manager).get(name)
    except Exception as err:  # lmms-eval raises many kinds while building a task
        raise TuneError(
            f"cannot load lmms-eval task '{name}': {type(err).__name__}: {_first_line(err)}"
        ) from err
    if task is None or not hasattr(task, "process_results"):
        raise TuneError(f"--data '{name}' is an lmms-eval group; expected one task of it")
    if getattr(task, "OUTPUT_TYPE", None) != "generate_until":
        raise TuneError(
            f"lmms-eval task '{name}' has output_type {task.OUTPUT_TYPE!r}; tune answers "
            "generate_until tasks"
        )
    cfg = task.config
    if not callable(cfg.process_results) and cfg.doc_to_target is None:
        raise TuneError(
            f"lmms-eval task '{name}' has no answers (neither process_results nor "
            "doc_to_target); expected a task that scores its documents"
        )
    metrics = [
        m["metric"] for m in (cfg.metric_list or []) if isinstance(m, dict) and "metric" in m
    ]
    if not metrics:
        raise TuneError(f"lmms-eval task '{name}' lists no metric; expected a metric_list")
    until = (cfg.generation_kwargs or {}).get("until") or []
    until = [until] if isinstance(until, str) else list(until)
    docs = task.eval_docs
    count = len(docs) if limit is None else min(limit, len(docs))
    items = []
    for i in range(count):
        doc = docs[i]
        if cfg.doc_to_target is not None:
            try:
                target = task.doc_to_target(doc)
            except (KeyError, IndexError, TypeError) as err:
                raise TuneError(
                    f"lmms-eval task '{name}', document {i}: no answer (doc_to_target failed: "
                    f"{_first_line(err)}); expected documents with answers"
                ) from err
        else:
            target = ""
        visuals = task.doc_to_visual(doc)
        visuals = [visuals] if not isinstance(visuals, (list, tuple)) else list(visuals)
        if (
            len(visuals) == 1
            and isinstance(visuals[0], str)
            and visuals[0].lower().endswith(_VIDEO_SUFFIXES)
        ):
            video, images = visuals[0], None
        elif visuals:
            video, images = None, tuple(visuals)
        else:
            raise TuneError(f"lmms-eval task '{name}', document {i}: no visual input")
        scorer = _LmmsScorer(task, doc, metrics[0], until, name, i)
        scorer("")  # before any model runs: the document has an answer and a number metric
        items.append(Item(id=f"{name}/{i}", question=str(task.doc_to_text(doc)),
                          answer=str(target), video=video, images=images,
                          prompt=str(task.doc_to_text(doc)), scorer=scorer))  # fmt: skip
    if not items:
        raise TuneError(f"lmms-eval task '{name}' has no documents")
    return items


class _LmmsScorer:
    """An lmms-eval document's own metric: the answer cut at the task's stop strings, then
    ``process_results(doc, [answer])[metric]`` (a number)."""

    def __init__(self, task, doc, metric, until, name, index):
        self.task, self.doc, self.metric, self.until = task, doc, metric, until
        self.where = f"lmms-eval task '{name}', document {index}"

    def __call__(self, prediction: str) -> float:
        for stop in self.until:
            if stop:
                prediction = prediction.split(stop)[0]
        own = self.task.config.process_results
        try:
            # the task's own function directly (lmms-eval's method wraps it in retries)
            if callable(own):
                out = own(dict(self.doc), [prediction.strip()])  # a copy: some fill it in
            else:
                out = self.task.process_results(self.doc, [prediction])
        except (KeyError, IndexError) as err:
            raise TuneError(f"{self.where}: no answer (process_results failed: "
                            f"{type(err).__name__} {_first_line(err)}); expected documents "
                            "with answers") from err  # fmt: skip
        value = out.get(self.metric) if isinstance(out, dict) else None
        if isinstance(value, dict):
            # VSI-Bench & co. return the document with the per-question score filled in and
            # aggregate later: the one numeric field process_results added is the score.
            added = [k for k, v in value.items() if k not in self.doc and k != "prediction"
                     and not isinstance(v, bool) and isinstance(v, (int, float))]  # fmt: skip
            if len(added) == 1:
                value = value[added[0]]
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TuneError(
                f"{self.where}: metric {self.metric!r} of process_results is "
                f"{type(value).__name__}, expected a number per document"
            )
        return float(value)


def prompt_text(item: Item) -> str:
    """The question as sent to the model: with options, one ``A. text`` line each and an
    instruction to answer with the letter."""
    if item.prompt is not None:
        return item.prompt
    if not item.options:
        return item.question
    lines = [item.question] + [f"{chr(65 + i)}. {o}" for i, o in enumerate(item.options)]
    return "\n".join(lines) + "\nAnswer with the option's letter from the given choices directly."


# ----------------------------------------------------------------------------------------
# metrics

_MRA_THRESHOLDS = tuple(0.5 + 0.05 * i for i in range(10))  # VSI-Bench: 0.50, 0.55, ..., 0.95
_NUMBER = re.compile(r"[-+]?\d*\.?\d+(?:[eE][-+]?\d+)?")


def _letter(text: str, n_options: int) -> str | None:
    valid = "".join(chr(65 + i) for i in range(n_options))
    m = re.search(rf"(?<![A-Za-z])([{valid}])(?![A-Za-z])", text.strip())
    return m.group(1) if m else None


def multiple_choice_correct(prediction: str, answer: str, options) -> float:
    """1.0 when the prediction's letter (the first standalone option letter, or the option
    whose text it repeats) is the answer's (a letter, or an option's text), else 0.0."""
    options = list(options)
    ans = answer.strip()
    gold = ans.upper() if len(ans) == 1 else None
    if gold is None:
        matches = [i for i, o in enumerate(options) if o.strip().lower() == ans.lower()]
        gold = chr(65 + matches[0]) if matches else _letter(ans, len(options))
    pred = _letter(prediction, len(options))
    if pred is None:
        low = prediction.strip().lower()
        hits = [i for i, o in enumerate(options) if o.strip().lower() and o.strip().lower() in low]
        pred = chr(65 + hits[0]) if len(hits) == 1 else None
    return float(pred is not None and pred == gold)


def mean_relative_accuracy(prediction: str, answer: float) -> float:
    """VSI-Bench's mean relative accuracy: the share of thresholds theta in
    {0.50, 0.55, ..., 0.95} with ``|pred - answer| / |answer| < 1 - theta``; the first number
    in the prediction is read, none scores 0."""
    m = _NUMBER.search(prediction.replace(",", ""))
    if m is None:
        return 0.0
    pred = float(m.group(0))
    if answer == 0:
        return float(pred == 0)
    rel = abs(pred - answer) / abs(answer)
    return sum(rel < 1 - t for t in _MRA_THRESHOLDS) / len(_MRA_THRESHOLDS)


def _as_number(text: str) -> float | None:
    try:
        value = float(text.strip())
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def score_answer(item: Item, prediction: str) -> float:
    """The built-in metric: multiple-choice letter match when the item has options,
    mean relative accuracy when its answer is a number, else normalised exact match; an
    lmms-eval item is scored by its task's own ``process_results``."""
    if item.scorer is not None:
        return item.scorer(prediction)
    if item.options:
        return multiple_choice_correct(prediction, item.answer, item.options)
    number = _as_number(item.answer)
    if number is not None:
        return mean_relative_accuracy(prediction, number)
    norm = lambda s: re.sub(r"[\s.]+$", "", s.strip().lower())
    return float(norm(prediction) == norm(item.answer))


# ----------------------------------------------------------------------------------------
# grid and statistics


@dataclass(frozen=True)
class Setting:
    """One point of the sweep."""

    alpha_k: float
    alpha_v: float
    n_clusters: int

    @property
    def key(self) -> str:
        """The setting's name in ``answers.jsonl``, e.g. ``k9.5_v2.5_c24``."""
        return f"k{self.alpha_k:g}_v{self.alpha_v:g}_c{self.n_clusters}"


def parse_grid(text: str, name: str, kind=float) -> list:
    """``"0,2,4.5"`` -> ``[0.0, 2.0, 4.5]`` (``kind=int`` for cluster counts); duplicates
    dropped, order kept. Raises TuneError for an empty or malformed list."""
    parts = [p.strip() for p in str(text).split(",")]
    if not any(parts):
        raise TuneError(f"{name}: expected a comma-separated list of values, got an empty grid")
    values = []
    for p in parts:
        if not p:
            raise TuneError(f"{name}: empty entry in {text!r}; expected e.g. 0,2,4")
        try:
            v = kind(p)
        except ValueError as err:
            raise TuneError(f"{name}: expected {kind.__name__} values, got {p!r}") from err
        if kind is float and (not math.isfinite(v) or v < -1):
            raise TuneError(
                f"{name}: expected finite values >= -1 (gates 1 + alpha s > 0), got {p}"
            )
        if kind is int and v < 1:
            raise TuneError(f"{name}: expected positive cluster counts, got {v}")
        if v not in values:
            values.append(v)
    return values


def bootstrap_delta(treated, baseline, *, n_boot: int = 2000, level: float = 0.95,
                    seed: int = 0) -> tuple[float, float, float]:  # fmt: skip
    """Mean paired difference ``treated - baseline`` over items and its percentile bootstrap
    interval: items are resampled with replacement, each keeping its pair. Returns
    ``(delta, low, high)``; NaN-free for n >= 1 (a single item gives a zero-width interval)."""
    a = np.asarray(treated, dtype=np.float64)
    b = np.asarray(baseline, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or a.size == 0:
        raise ValueError(
            f"expected two 1-D score arrays of the same non-zero length, got {a.shape} and {b.shape}"
        )
    d = a - b
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, d.size, size=(n_boot, d.size))
    means = d[idx].mean(axis=1)
    tail = (1.0 - level) / 2
    lo, hi = np.quantile(means, [tail, 1.0 - tail])
    return float(d.mean()), float(lo), float(hi)


def split_holdout(items: list[Item], fraction: float, seed: int = 0):
    """(search items, hold-out items): a seeded random ``fraction`` held out."""
    if not 0.0 <= fraction < 1.0:
        raise TuneError(f"--holdout: expected a fraction in [0, 1), got {fraction}")
    n_hold = int(round(fraction * len(items)))
    if fraction > 0 and (n_hold == 0 or n_hold == len(items)):
        raise TuneError(
            f"--holdout {fraction} of {len(items)} items leaves "
            f"{'no item held out' if n_hold == 0 else 'no item to search on'}; expected more items "
            "or another fraction"
        )
    order = np.random.default_rng(seed).permutation(len(items))
    hold = {int(i) for i in order[:n_hold]}
    return ([it for i, it in enumerate(items) if i not in hold],
            [it for i, it in enumerate(items) if i in hold])  # fmt: skip


# ----------------------------------------------------------------------------------------
# the sweep


class _Answers:
    """``answers.jsonl``: every (item, setting) answer, appended and flushed as produced."""

    def __init__(self, path: Path, resume: bool, signature: dict):
        self.path = path
        self.done: dict[tuple[str, str], dict] = {}
        if path.exists() and path.stat().st_size:
            if not resume:
                raise TuneError(
                    f"'{path.parent}' holds the answers of an earlier run; pass --resume to "
                    "continue it, or choose another --out"
                )
            lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
            try:
                head = json.loads(lines[0]) if lines else {}
            except json.JSONDecodeError as err:
                raise TuneError(
                    f"--resume: '{path}' is not an answers file of videoanchor tune (its first "
                    f"line is not JSON: {err.msg}); expected the file an earlier run wrote, or "
                    "another --out"
                ) from err
            if not isinstance(head, dict) or "signature" not in head:
                raise TuneError(
                    f"--resume: '{path}' is not an answers file of videoanchor tune (its first "
                    "line holds no signature); expected the file an earlier run wrote, or "
                    "another --out"
                )
            if head.get("signature") != signature:
                raise TuneError(
                    f"--resume: '{path}' was written with other options ({head.get('signature')}); "
                    "expected the same model, data and options, or another --out"
                )
            for line in lines[1:]:
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut by an interrupt: that answer is computed again
                if not isinstance(rec, dict) or not {"item", "setting", "score"} <= rec.keys():
                    raise TuneError(
                        f"--resume: '{path}' holds a line that is not an answer "
                        f"({line[:80]!r}); expected the file an earlier run wrote, or another "
                        "--out"
                    )
                self.done[(rec["item"], rec["setting"])] = rec
            self._f = open(path, "a", encoding="utf-8")
            if not path.read_bytes().endswith(b"\n"):
                self._f.write("\n")  # after a line cut by an interrupt
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._f = open(path, "w", encoding="utf-8")
            self._f.write(json.dumps({"signature": signature}) + "\n")
            self._f.flush()

    def add(self, item: str, setting: str, answer: str, score: float) -> None:
        rec = {"item": item, "setting": setting, "answer": answer, "score": score}
        self.done[(item, setting)] = rec
        self._f.write(json.dumps(rec) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()


@dataclass
class TuneOptions:
    """What the sweep needs besides the model (from the command line or a caller)."""

    frames: int = DEFAULT_FRAMES
    max_new_tokens: int = 16
    batch_size: int = 8
    n_boot: int = 2000
    seed: int = 0
    progress: bool = True


def _inputs_of(item: Item, processor, model, frames: int):
    from videoanchor.pipeline import image_inputs, read_images, video_inputs

    if item.video is not None:
        from videoanchor.video import read_video_frames

        video = read_video_frames(item.video, frames, progress=False)
        return video_inputs(processor, video, prompt_text(item), device=model.device,
                            dtype=model.dtype)  # fmt: skip
    views = (
        read_images(item.images)
        if all(isinstance(v, str) for v in item.images)
        else list(item.images)
    )
    return image_inputs(processor, views, prompt_text(item), device=model.device, dtype=model.dtype)


def _generate(model, processor, inputs, max_new_tokens: int) -> list[str]:
    import torch

    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                             num_beams=1)  # fmt: skip
    n = inputs["input_ids"].shape[1]
    return [a.strip() for a in processor.batch_decode(out[:, n:], skip_special_tokens=True)]


def sweep(model, processor, handle, cache, items: list[Item], settings: list[Setting],
          answers: _Answers, opts: TuneOptions) -> None:  # fmt: skip
    """Answer every item unanchored (the baseline) and under every setting, skipping what
    ``answers`` already holds. Order: baseline, then per cluster count, per item, the alpha
    settings in batches of ``opts.batch_size`` rows (one prompt repeated, per-row gates)."""
    from tqdm.auto import tqdm

    import videoanchor
    from videoanchor.integrations.transformers.cache import repeat_prompt

    handle.cache = cache
    todo = sum((it.id, _BASELINE) not in answers.done for it in items) + sum(
        (it.id, s.key) not in answers.done for it in items for s in settings
    )
    bar = tqdm(total=todo, desc="tune", unit="answer", disable=None if opts.progress else True,
               dynamic_ncols=True)  # fmt: skip
    encoded: dict[str, dict] = {}

    def enc(item):  # the vision encoder runs at most once per item (the cache)
        if item.id not in encoded:
            if len(encoded) >= 4:  # a few prompts on the device; the cache holds the rest
                encoded.pop(next(iter(encoded)))
            encoded[item.id] = cache.encode(model, _inputs_of(item, processor, model, opts.frames))
        return encoded[item.id]

    try:
        videoanchor.configure(model, enabled=False)
        for item in items:
            if (item.id, _BASELINE) in answers.done:
                continue
            (answer,) = _generate(model, processor, enc(item), opts.max_new_tokens)
            answers.add(item.id, _BASELINE, answer, score_answer(item, answer))
            bar.update(1)
        videoanchor.configure(model, enabled=True)
        for k in sorted({s.n_clusters for s in settings}):
            group = [s for s in settings if s.n_clusters == k]
            for item in items:
                left = [s for s in group if (item.id, s.key) not in answers.done]
                for start in range(0, len(left), opts.batch_size):
                    chunk = left[start : start + opts.batch_size]
                    batch = repeat_prompt(enc(item), len(chunk))
                    rows = [(s.alpha_k, s.alpha_v, s.n_clusters) for s in chunk]
                    with handle.per_row(rows):
                        outs = _generate(model, processor, batch, opts.max_new_tokens)
                    for s, answer in zip(chunk, outs, strict=True):
                        answers.add(item.id, s.key, answer, score_answer(item, answer))
                    bar.update(len(chunk))
    finally:
        bar.close()


def summarize(items: list[Item], settings: list[Setting], done: dict, *, n_boot: int = 2000,
              seed: int = 0) -> list[dict]:  # fmt: skip
    """One entry per setting answered on every item: accuracy, paired delta against the
    baseline and its bootstrap interval (settings not finished are left out)."""
    base = [done.get((it.id, _BASELINE)) for it in items]
    if any(b is None for b in base):
        return []
    base_scores = [b["score"] for b in base]
    rows = []
    for s in settings:
        recs = [done.get((it.id, s.key)) for it in items]
        if any(r is None for r in recs):
            continue
        scores = [r["score"] for r in recs]
        delta, lo, hi = bootstrap_delta(scores, base_scores, n_boot=n_boot, seed=seed)
        rows.append({"alpha_k": s.alpha_k, "alpha_v": s.alpha_v, "n_clusters": s.n_clusters,
                     "accuracy": float(np.mean(scores)), "delta": delta, "ci_low": lo,
                     "ci_high": hi, "n_items": len(items)})  # fmt: skip
    return rows


def best_setting(rows: list[dict]) -> dict | None:
    """The highest accuracy; ties go to the smaller alphas, then fewer clusters."""
    if not rows:
        return None
    return max(rows, key=lambda r: (r["accuracy"], -r["alpha_k"] - r["alpha_v"], -r["n_clusters"]))


# ----------------------------------------------------------------------------------------
# outputs


def format_table(rows: list[dict], baseline: float | None) -> str:
    """The results as a plain-text table (one line per setting, best first)."""
    head = ["alpha_k", "alpha_v", "n_clusters", "accuracy", "delta", "95% CI"]
    lines = [head]
    for r in sorted(rows, key=lambda r: -r["accuracy"]):
        lines.append([f"{r['alpha_k']:g}", f"{r['alpha_v']:g}", str(r["n_clusters"]),
                      f"{r['accuracy']:.3f}", f"{r['delta']:+.3f}",
                      f"[{r['ci_low']:+.3f}, {r['ci_high']:+.3f}]"])  # fmt: skip
    widths = [max(len(x[i]) for x in lines) for i in range(len(head))]
    text = "\n".join("  ".join(c.ljust(w) for c, w in zip(x, widths, strict=True)).rstrip()
                     for x in lines)  # fmt: skip
    if baseline is not None:
        text = f"unanchored baseline accuracy: {baseline:.3f}\n" + text
    return text


def save_heatmaps(rows: list[dict], out: Path, title: str = "") -> list[Path]:
    """One PNG per cluster count, ``heatmap_k{K}.png``: the alpha_K x alpha_V grid, each
    cell coloured by its accuracy delta against the unanchored baseline (red above zero,
    blue below, white at zero) and labelled with the delta and the accuracy."""
    from PIL import Image, ImageDraw

    from videoanchor.visualize import _font

    paths = []
    for k in sorted({r["n_clusters"] for r in rows}):
        sub = [r for r in rows if r["n_clusters"] == k]
        aks = sorted({r["alpha_k"] for r in sub})
        avs = sorted({r["alpha_v"] for r in sub})
        cell, left, top = 84, 78, 60
        w, h = max(left + cell * len(aks) + 16, 360), top + cell * len(avs) + 44
        img = Image.new("RGB", (w, h), (255, 255, 255))
        draw = ImageDraw.Draw(img)
        font, small = _font(14), _font(12)
        span = max([abs(r["delta"]) for r in sub] + [1e-9])
        draw.text((8, 6), f"{title}  n_clusters={k}".strip(), fill=(0, 0, 0), font=font)
        draw.text((8, 28), "cell: delta vs unanchored / accuracy", fill=(90, 90, 90), font=small)
        for i, av in enumerate(reversed(avs)):
            draw.text((8, top + i * cell + cell // 2 - 7), f"aV={av:g}", fill=(0, 0, 0), font=small)
        for j, ak in enumerate(aks):
            draw.text((left + j * cell + 10, top + cell * len(avs) + 8), f"aK={ak:g}",
                      fill=(0, 0, 0), font=small)  # fmt: skip
        for r in sub:
            j, i = aks.index(r["alpha_k"]), len(avs) - 1 - avs.index(r["alpha_v"])
            t = 0.7 * r["delta"] / span  # in [-0.7, 0.7]: text stays readable
            fade = int(255 * (1 - abs(t)))
            colour = (255, fade, fade) if t >= 0 else (fade, fade, 255)
            x0, y0 = left + j * cell, top + i * cell
            draw.rectangle([x0, y0, x0 + cell - 2, y0 + cell - 2], fill=colour)
            sign = "+" if r["delta"] >= 0 else "-"
            draw.text((x0 + 8, y0 + cell // 2 - 16), f"{sign}{abs(r['delta']):.3f}",
                      fill=(0, 0, 0), font=font)  # fmt: skip
            draw.text((x0 + 8, y0 + cell // 2 + 4), f"acc {r['accuracy']:.3f}",
                      fill=(40, 40, 40), font=small)  # fmt: skip
        path = out / f"heatmap_k{k}.png"
        img.save(path)
        paths.append(path)
    return paths


def usage_lines(best: dict, model: str) -> list[str]:
    """The command line and the configure() call that use ``best``."""
    return [
        f"videoanchor run --model {model} --alpha-k {best['alpha_k']:g} --alpha-v "
        f"{best['alpha_v']:g} --n-clusters {best['n_clusters']} --video VIDEO --question ...",
        f"videoanchor.configure(model, alpha_k={best['alpha_k']:g}, alpha_v={best['alpha_v']:g}, "
        f"n_clusters={best['n_clusters']})",
    ]


# ----------------------------------------------------------------------------------------
# command line


def add_arguments(p) -> None:
    """The ``tune`` subcommand's options (the model/input options of ``run`` included)."""
    g = p.add_argument_group("model")
    g.add_argument("--model", required=True, help="Hugging Face model id or local directory")
    g.add_argument("--device", default="auto", help="'auto', 'cpu', 'cuda' or 'cuda:N'")
    g.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"])
    g.add_argument("--trust-remote-code", action="store_true",
                   help="allow the model's own code from its repository")  # fmt: skip
    g.add_argument("--frames", type=int, default=DEFAULT_FRAMES,
                   help=f"frames sampled per video (default {DEFAULT_FRAMES})")  # fmt: skip
    d = p.add_argument_group("data and grid")
    d.add_argument("--data", required=True,
                   help="JSONL dev set: per line video (path) or images (paths), question, "
                   "answer, optional options (list); or an lmms-eval task name (its prompts "
                   "and its process_results metric)")  # fmt: skip
    d.add_argument("--limit", type=int, default=None, help="use only the first N items")
    d.add_argument("--include-path", default=None,
                   help="directory of local lmms-eval task YAML files")  # fmt: skip
    d.add_argument("--alpha-k", default="0,2,4,9.5", help="alpha_K values (default 0,2,4,9.5)")
    d.add_argument("--alpha-v", default="0,1,2.5", help="alpha_V values (default 0,1,2.5)")
    d.add_argument("--n-clusters", default=str(SSC.n_clusters),
                   help=f"cluster counts (default {SSC.n_clusters})")  # fmt: skip
    d.add_argument("--holdout", type=float, default=0.0,
                   help="fraction of items kept out of the search; the chosen setting's gain "
                   "is reported on them")  # fmt: skip
    o = p.add_argument_group("run")
    o.add_argument("--out", default="tune", help="output directory (default ./tune)")
    o.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    o.add_argument("--max-new-tokens", type=int, default=16, help="answer length (default 16)")
    o.add_argument("--batch-size", type=int, default=8,
                   help="settings answered together per item (rows of one batch)")  # fmt: skip
    o.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples (default 2000)")
    o.add_argument("--cache-dir", default=None,
                   help="where vision features, SSC and labels are kept (default "
                   "$VIDEOANCHOR_CACHE or ~/.cache/videoanchor)")  # fmt: skip
    o.add_argument(
        "--no-cache",
        action="store_true",
        help="keep nothing on disk (still computed once per item within this run)",
    )
    a = p.add_argument_group("SSC (fixed during the sweep)")
    a.add_argument("--decode", choices=["prefill", "all"], default="prefill")
    a.add_argument("--pca-rank", type=int, default=SSC.pca_rank)
    a.add_argument("--ssc-max-iter", type=int, default=SSC.max_iter)
    a.add_argument("--seed", type=int, default=SSC.seed, help="clustering and bootstrap seed")
    a.add_argument("--label-draws", type=int, default=SSC.label_draws)
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar or log lines")
    p.add_argument("--debug", action="store_true", help="show the full traceback on errors")


def _log(args, message: str) -> None:
    if not args.quiet:
        print(message, file=sys.stderr, flush=True)


def _check_positive(name: str, value: int) -> None:
    if value < 1:
        raise TuneError(f"{name}: expected a positive integer, got {value}")


def run_tune(args) -> int:
    """The ``videoanchor tune`` command (parsed arguments in, exit status out)."""
    from videoanchor.integrations.transformers.cache import (
        AnchorCache,
        default_cache_dir,
        model_fingerprint,
    )
    from videoanchor.pipeline import check_model, check_output_path, load_vlm

    # Everything a user can get wrong is checked before the model loads.
    aks = parse_grid(args.alpha_k, "--alpha-k")
    avs = parse_grid(args.alpha_v, "--alpha-v")
    ks = parse_grid(args.n_clusters, "--n-clusters", int)
    for name in ("frames", "max_new_tokens", "batch_size", "bootstrap", "ssc_max_iter",
                 "label_draws"):  # fmt: skip
        _check_positive("--" + name.replace("_", "-"), getattr(args, name))
    if args.limit is not None:
        _check_positive("--limit", args.limit)
    if str(args.data).endswith(".jsonl") or os.path.exists(args.data):
        items = load_items(args.data)
        if args.limit is not None:
            items = items[: args.limit]
    else:
        items = load_lmms_task(args.data, include_path=args.include_path, limit=args.limit)
    search, held = split_holdout(items, args.holdout, args.seed)
    settings = [Setting(a, b, k) for k in ks for a in aks for b in avs]
    from videoanchor.integrations.transformers.configuring import check_options

    for a in aks:  # each grid value as configure() takes it (a gate that overflows float32...)
        for b in avs:
            try:
                check_options(alpha_k=a, alpha_v=b)
            except (TypeError, ValueError) as err:
                flag = "--alpha-k" if str(err).startswith("alpha_k") else "--alpha-v"
                raise TuneError(f"{flag}: {_first_line(err)}") from err
    check_output_path(args.out, "--out", folder=True)
    if args.cache_dir and not args.no_cache:
        check_output_path(args.cache_dir, "--cache-dir", folder=True)
    check_model(args.model, trust_remote_code=args.trust_remote_code)
    out = Path(args.out)
    data = str(Path(args.data).resolve()) if os.path.exists(args.data) else str(args.data)
    signature = {"model": str(args.model), "data": data, "limit": args.limit,
                 "frames": args.frames, "dtype": args.dtype, "max_new_tokens": args.max_new_tokens,
                 "decode": args.decode, "pca_rank": args.pca_rank, "seed": args.seed,
                 "ssc_max_iter": args.ssc_max_iter, "label_draws": args.label_draws,
                 "holdout": args.holdout}  # fmt: skip
    answers = _Answers(out / ANSWERS, args.resume, signature)
    try:
        model, processor, handle = load_vlm(args.model, device=args.device, dtype=args.dtype,
                                            trust_remote_code=args.trust_remote_code)  # fmt: skip
        import videoanchor

        try:
            videoanchor.configure(model, decode=args.decode, pca_rank=args.pca_rank, seed=args.seed,
                                  max_iter=args.ssc_max_iter, label_draws=args.label_draws)  # fmt: skip
        except (TypeError, ValueError) as err:
            raise TuneError(_first_line(err)) from err
        if args.no_cache:  # nothing kept after the run; within it, each item once
            scratch = tempfile.TemporaryDirectory(prefix="videoanchor-tune-")
            root = Path(scratch.name)
        else:
            root = Path(args.cache_dir or default_cache_dir())
        cache = AnchorCache(root, model_key=model_fingerprint(model))
        opts = TuneOptions(frames=args.frames, max_new_tokens=args.max_new_tokens,
                           batch_size=args.batch_size, n_boot=args.bootstrap, seed=args.seed,
                           progress=not args.quiet)  # fmt: skip
        _log(args, f"tune: {len(search)} items x {len(settings)} settings"
                   + (f", {len(held)} held out" if held else ""))  # fmt: skip
        interrupted = False
        try:
            sweep(model, processor, handle, cache, search, settings, answers, opts)
        except KeyboardInterrupt:
            interrupted = True
        rows = summarize(search, settings, answers.done, n_boot=opts.n_boot, seed=opts.seed)
        out.mkdir(parents=True, exist_ok=True)
        (out / RESULTS).write_text(json.dumps(rows, indent=1) + "\n")
        if interrupted:
            print(f"videoanchor tune: interrupted; {len(rows)} of {len(settings)} settings "
                  f"finished (in {out / RESULTS}); rerun with --resume to continue",
                  file=sys.stderr)  # fmt: skip
            return 130
        base = float(np.mean([answers.done[(it.id, _BASELINE)]["score"] for it in search]))
        best = best_setting(rows)
        summary = {"baseline_accuracy": base, "items": len(search), "settings": len(settings),
                   "best": best, "holdout": None, "cache": cache.stats.counts}  # fmt: skip
        if held and best is not None:
            chosen = Setting(best["alpha_k"], best["alpha_v"], best["n_clusters"])
            sweep(model, processor, handle, cache, held, [chosen], answers, opts)
            (hrow,) = summarize(held, [chosen], answers.done, n_boot=opts.n_boot, seed=opts.seed)
            hbase = float(np.mean([answers.done[(it.id, _BASELINE)]["score"] for it in held]))
            summary["holdout"] = {**hrow, "baseline_accuracy": hbase}
        summary["usage"] = usage_lines(best, args.model) if best else []
        (out / SUMMARY).write_text(json.dumps(summary, indent=1) + "\n")
        pngs = save_heatmaps(rows, out, title=Path(str(args.model)).name)
    finally:
        answers.close()
    print(format_table(rows, base))
    if best is not None:
        print(f"\nbest: alpha_k={best['alpha_k']:g} alpha_v={best['alpha_v']:g} "
              f"n_clusters={best['n_clusters']}: accuracy {best['accuracy']:.3f}, delta "
              f"{best['delta']:+.3f} [{best['ci_low']:+.3f}, {best['ci_high']:+.3f}] "
              f"on {len(search)} items")  # fmt: skip
        if summary["holdout"]:
            h = summary["holdout"]
            print(f"hold-out ({h['n_items']} items): delta {h['delta']:+.3f} "
                  f"[{h['ci_low']:+.3f}, {h['ci_high']:+.3f}]")  # fmt: skip
        for line in summary["usage"]:
            print("  " + line)
    _log(args, f"wrote {out / RESULTS}, {out / SUMMARY}, " + ", ".join(str(p) for p in pngs))
    return 0
