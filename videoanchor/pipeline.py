"""The library layer the ``videoanchor`` command and the lmms-eval wrapper share.

``load_vlm`` loads a supported VLM with the videoanchor attention and its processor;
``video_inputs`` / ``image_inputs`` turn a sampled video, or several views of one scene,
and a question into processor inputs (``video_batch_inputs`` / ``image_batch_inputs``:
left-padded batches); ``generate_answer(s)`` decodes greedily and times prefill / SSC /
decode; ``anchor_token_maps`` / ``anchor_view_maps`` lay the last prefill's anchor scores
out on the video's token grid or on each view's.
Failures a user can fix (unsupported family, missing model, missing package) raise
:class:`PipelineError` with a one-line message.
"""

from __future__ import annotations

import numbers
import sys
import threading
import time
from dataclasses import dataclass, field

import numpy as np

__all__ = [
    "GenerationTimings",
    "PipelineError",
    "TokenMaps",
    "anchor_token_maps",
    "anchor_view_maps",
    "check_load_options",
    "check_model",
    "generate_answer",
    "generate_answers",
    "image_batch_inputs",
    "image_inputs",
    "load_vlm",
    "read_images",
    "run_prefill",
    "ssc_plan",
    "video_batch_inputs",
    "video_inputs",
]


class PipelineError(Exception):
    """A failure the user can fix, stated in one line (the CLI prints it, exit status 1)."""


class _Ticker:
    """A progress bar with unknown total that shows elapsed time while a blocking call runs.

    It appears only if the phase lasts longer than ``delay`` seconds (tqdm's ``delay``), and
    is drawn from a background thread, because the phase itself (a model forward with SSC)
    cannot report progress.
    """

    def __init__(self, desc: str, enabled: bool, delay: float = 1.0):
        self.desc, self.enabled, self.delay = desc, enabled, delay
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> _Ticker:
        if self.enabled and sys.stderr.isatty():
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        if self._stop.wait(self.delay):
            return
        from tqdm.auto import tqdm

        bar = tqdm(desc=self.desc, bar_format="{desc}: {elapsed}", leave=False)
        while not self._stop.wait(0.25):
            bar.refresh()
        bar.close()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def __enter__(self) -> _Ticker:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _streamer(max_new_tokens: int, progress: bool):
    """A generate() streamer that times the first token and shows a bar for the others."""
    from transformers.generation.streamers import BaseStreamer

    class _Timing(BaseStreamer):
        def __init__(self):
            self.t_start = time.perf_counter()
            self.t_first: float | None = None
            self.t_end: float | None = None
            self.steps = 0
            self._prompt_seen = False
            self._ticker = _Ticker("prefill (vision encoder, SSC, language model)", progress)
            self._ticker.start()
            self._bar = None

        def put(self, value):
            if not self._prompt_seen:  # generate() first pushes the prompt
                self._prompt_seen = True
                return
            if self.t_first is None:
                self.t_first = time.perf_counter()
                self._ticker.stop()
                from tqdm.auto import tqdm

                self._bar = tqdm(
                    total=max_new_tokens, desc="generating", unit="tok", delay=1.0,
                    disable=None if progress else True, leave=False,
                )  # fmt: skip
            self.steps += 1
            self._bar.update(1)

        def end(self):
            self.t_end = time.perf_counter()
            self._ticker.stop()
            if self._bar is not None:
                self._bar.close()

    return _Timing()


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    line = text.splitlines()[0].strip() if text else type(err).__name__
    return line


def _resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise PipelineError(f"device {device!r} was asked for but torch sees no CUDA device")
    return device


LOAD_DTYPES = ("auto", "bfloat16", "float16", "float32")


def _resolve_dtype(dtype: str, device: str):
    import torch

    if not isinstance(dtype, str) or dtype not in LOAD_DTYPES:
        raise PipelineError(
            f"dtype: expected one of {', '.join(LOAD_DTYPES)}, got {dtype!r}; try dtype=auto "
            "(bfloat16 on CUDA, float32 on CPU)"
        )
    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    table = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
    return table[dtype]


def check_load_options(device: str = "auto", dtype: str = "auto"):
    """Check ``load_vlm``'s device and dtype without loading anything; returns the resolved
    ``(device, torch dtype)``. Raises PipelineError (one line). Callers run it before
    any slow step (reading a video, loading weights)."""
    if not isinstance(device, str) or not device:
        raise PipelineError(f"device: expected 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    import re

    if device != "auto" and not re.fullmatch(r"(cpu|cuda|xpu|mps)(:\d+)?", device):
        raise PipelineError(
            f"device: expected 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}; try device=auto"
        )
    resolved = _resolve_device(device)
    return resolved, _resolve_dtype(dtype, resolved)


def check_output_path(path, flag: str, *, folder: bool) -> None:
    """Before any slow step: ``path`` (a file to write, or with ``folder`` a folder to write
    into) can be created. Its nearest existing ancestor must be a folder in which a file can
    actually be created: probed with a temporary file (removed at once), since permission
    bits say nothing about read-only mounts or /proc. Raises PipelineError naming ``flag``."""
    import os
    import tempfile
    from pathlib import Path

    path = Path(path)
    if path.exists():
        if folder and not path.is_dir():
            raise PipelineError(f"{flag}: expected a folder, got the file '{path}'")
        if not folder and path.is_dir():
            raise PipelineError(f"{flag}: expected a file path, got the directory '{path}'")
    probe = path if folder else (path.parent if str(path.parent) else Path("."))
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise PipelineError(f"{flag}: cannot create '{path}': '{probe}' is a file, not a folder")
    try:
        fd, name = tempfile.mkstemp(prefix=".videoanchor-probe-", dir=probe)
    except OSError as err:
        raise PipelineError(
            f"{flag}: cannot write '{path}': creating a file in '{probe}' failed "
            f"({err.strerror or err})"
        ) from err
    os.close(fd)
    os.unlink(name)


def check_model(model_name: str, *, trust_remote_code: bool = False):
    """Load only the model's config and check its family is supported; returns the config.

    Cheap (no weights), so the commands call it before decoding the video. Raises PipelineError.
    """
    import transformers

    from videoanchor.integrations.transformers import get_family

    try:
        config = transformers.AutoConfig.from_pretrained(
            model_name, trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError) as err:
        raise PipelineError(f"cannot load model '{model_name}': {_first_line(err)}") from err
    try:
        get_family(config)
    except ValueError as err:
        raise PipelineError(_first_line(err)) from err
    return config


def load_vlm(
    model_name: str,
    *,
    device: str = "auto",
    dtype: str = "auto",
    trust_remote_code: bool = False,
):
    """Load a supported VLM with the videoanchor attention, and its processor.

    Returns ``(model, processor, handle)``; the handle comes from ``videoanchor.configure``
    with the family's defaults. Raises PipelineError (one line) for an unsupported family, a
    model that cannot be found, or a processor that cannot be built.
    """
    import transformers

    from videoanchor.integrations.transformers import ATTN_IMPLEMENTATION, configure, register

    register()  # idempotent; importing the package root does it too

    device, torch_dtype = check_load_options(device, dtype)
    check_model(model_name, trust_remote_code=trust_remote_code)
    try:
        model = transformers.AutoModelForImageTextToText.from_pretrained(
            model_name,
            attn_implementation=ATTN_IMPLEMENTATION,
            dtype=torch_dtype,
            trust_remote_code=trust_remote_code,
        )
    except (OSError, ValueError) as err:
        raise PipelineError(f"cannot load model '{model_name}': {_first_line(err)}") from err
    model = model.to(device).eval()
    try:
        processor = transformers.AutoProcessor.from_pretrained(
            model_name, trust_remote_code=trust_remote_code
        )
    except ImportError as err:
        hint = ""
        if "torchvision" in str(err).lower():
            hint = " (transformers' video processors need torchvision: pip install torchvision)"
        raise PipelineError(
            f"cannot build the processor of '{model_name}'{hint}: {_first_line(err)}"
        ) from err
    except (OSError, ValueError) as err:
        raise PipelineError(
            f"cannot load the processor of '{model_name}': {_first_line(err)}"
        ) from err
    handle = configure(model)
    return model, processor, handle


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")


def read_images(paths) -> list[np.ndarray]:
    """Read image files as (H, W, 3) uint8 RGB arrays, in order (the views of one scene).

    Raises PipelineError naming the file for a missing, unreadable or non-image file.
    """
    import os

    from PIL import Image, UnidentifiedImageError

    if isinstance(paths, (str, bytes, os.PathLike)):
        paths = [paths]
    views = []
    for path in paths:
        path = os.fspath(path)
        if not os.path.exists(path):
            raise PipelineError(f"image file not found: '{path}'")
        if os.path.isdir(path):
            raise PipelineError(f"'{path}' is a directory, expected an image file")
        try:
            with Image.open(path) as img:
                views.append(np.asarray(img.convert("RGB"), dtype=np.uint8).copy())
        except (UnidentifiedImageError, OSError, ValueError) as err:
            raise PipelineError(f"cannot read image '{path}': {_first_line(err)}") from err
    if not views:
        raise PipelineError("expected at least one image, got none")
    return views


def _as_view(image) -> np.ndarray:
    """One view as (H, W, 3) uint8 RGB from a PIL image or an array."""
    if hasattr(image, "convert") and hasattr(image, "size"):  # PIL.Image.Image
        return np.asarray(image.convert("RGB"), dtype=np.uint8).copy()
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[-1] != 3 or arr.dtype != np.uint8:
        raise TypeError(
            f"expected an image as a PIL image or an (H, W, 3) uint8 array, got "
            f"{type(image).__name__} with shape {getattr(arr, 'shape', None)} and dtype {arr.dtype}"
        )
    return arr


def _prompt(processor, question: str, kind: str, count: int) -> str:
    if not isinstance(question, str):
        raise TypeError(f"expected the question as a str, got {type(question).__name__}")
    content = [{"type": kind} for _ in range(count)] + [{"type": "text", "text": question}]
    messages = [{"role": "user", "content": content}]
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


class _LeftPadding:
    """Left-pad the prompts of a batch (what batched ``generate`` needs), then restore."""

    def __init__(self, processor):
        self.tokenizer = getattr(processor, "tokenizer", None)
        self.side = getattr(self.tokenizer, "padding_side", None)

    def __enter__(self):
        if self.side is not None:
            self.tokenizer.padding_side = "left"

    def __exit__(self, *exc):
        if self.side is not None:
            self.tokenizer.padding_side = self.side


def video_inputs(processor, video, question: str, device=None, dtype=None, **processor_kwargs):
    """Processor inputs for one video and one question (a single user turn, chat template).

    ``video`` is a :class:`videoanchor.video.SampledVideo`; its frames are passed as already
    sampled (``do_sample_frames=False``) with their true indices and frame rate, so models that
    encode time (Qwen2.5-VL, Qwen3-VL) see the real timestamps. ``processor_kwargs`` go to
    the processor call (e.g. ``size=...`` for the Qwen video processor). Tensors are moved to
    ``device`` and floating ones cast to ``dtype``.
    """
    return video_batch_inputs(processor, [video], [question], device, dtype, **processor_kwargs)


def video_batch_inputs(processor, videos, questions, device=None, dtype=None, **processor_kwargs):
    """As :func:`video_inputs` for a batch: one video and one question per sample, prompts
    left-padded to a common length (for batched ``generate``)."""
    from transformers.video_utils import VideoMetadata

    if len(videos) != len(questions) or not videos:
        raise ValueError(
            f"expected one video per question, got {len(videos)} videos and "
            f"{len(questions)} questions"
        )
    prompts = [_prompt(processor, q, "video", 1) for q in questions]
    metadata = [
        VideoMetadata(
            total_num_frames=int(v.total_frames),
            fps=float(v.fps) if v.fps else None,
            frames_indices=[int(i) for i in v.indices],
            height=int(v.frames.shape[1]),
            width=int(v.frames.shape[2]),
        )
        for v in videos
    ]
    try:
        with _LeftPadding(processor):
            inputs = processor(
                text=prompts,
                videos=[v.frames for v in videos],
                video_metadata=metadata,
                do_sample_frames=False,
                padding=True,
                return_tensors="pt",
                **processor_kwargs,
            )
    except ImportError as err:
        raise PipelineError(
            "processing the video needs a package that is missing "
            f"(transformers' video processors need torchvision): {_first_line(err)}"
        ) from err
    return _to_device(inputs, device, dtype)


def image_inputs(processor, images, question: str, device=None, dtype=None, **processor_kwargs):
    """Processor inputs for several views of one scene and one question: one user turn with
    one image placeholder per view, then the question (the views are one request, anchored
    together). ``images``: PIL images or (H, W, 3) uint8 arrays, in order."""
    return image_batch_inputs(processor, [images], [question], device, dtype, **processor_kwargs)


def image_batch_inputs(processor, views, questions, device=None, dtype=None, **processor_kwargs):
    """As :func:`image_inputs` for a batch: ``views[b]`` is the list of images of sample b.

    Raises PipelineError when the family's processor cannot take several images in a prompt.
    """
    if len(views) != len(questions) or not views:
        raise ValueError(
            f"expected one list of views per question, got {len(views)} and {len(questions)}"
        )
    views = [[_as_view(im) for im in sample] for sample in views]
    if any(not sample for sample in views):
        raise ValueError("expected at least one image per sample, got an empty list")
    prompts = [
        _prompt(processor, q, "image", len(s)) for q, s in zip(questions, views, strict=True)
    ]
    most = max(len(s) for s in views)
    try:
        with _LeftPadding(processor):
            inputs = processor(
                text=prompts,
                images=[[_pil(im) for im in sample] for sample in views],
                padding=True,
                return_tensors="pt",
                **processor_kwargs,
            )
    except ImportError as err:
        raise PipelineError(
            f"processing the images needs a package that is missing: {_first_line(err)}"
        ) from err
    except (TypeError, ValueError, NotImplementedError) as err:
        raise PipelineError(
            f"the processor {type(processor).__name__} cannot take {most} image(s) in one "
            f"prompt: {_first_line(err)}"
        ) from err
    return _to_device(inputs, device, dtype)


def _pil(view: np.ndarray):
    from PIL import Image

    return Image.fromarray(view)


def _to_device(inputs, device, dtype):
    import torch

    out = {}
    for key, value in dict(inputs).items():
        if torch.is_tensor(value):
            if device is not None:
                value = value.to(device)
            if dtype is not None and value.is_floating_point():
                value = value.to(dtype)
        out[key] = value
    return out


@dataclass
class GenerationTimings:
    """Wall-clock seconds of one generate() call.

    prefill_s: until the first new token (vision encoder, SSC when anchored, LLM prefill).
    ssc_s: SSC and scores inside the prefill (from the SSC results), None when unanchored.
    decode_s: the remaining tokens. new_tokens: tokens generated.
    ssc_runs: per sample, how its SSC ended (:class:`~videoanchor.anchor.progress.SSCRunSummary`:
    converged, iterations, residual vs eps, stopped by a time budget), empty when unanchored.
    """

    prefill_s: float
    ssc_s: float | None
    decode_s: float
    new_tokens: int
    ssc_runs: list = field(default_factory=list)

    @property
    def ssc_converged(self) -> bool | None:
        """True when every sample's SSC converged, None when no SSC ran."""
        runs = [r for r in self.ssc_runs if r is not None]
        return all(r.converged for r in runs) if runs else None

    @property
    def tokens_per_s(self) -> float | None:
        """Decode speed, ``(new_tokens - 1) / decode_s``; None with fewer than 2 new tokens."""
        steps = self.new_tokens - 1
        return steps / self.decode_s if steps > 0 and self.decode_s > 0 else None


def generate_answer(model, processor, inputs, handle, *, max_new_tokens=128, progress=True):
    """Greedy decoding (the paper's setting) of one prompt; returns ``(answer, GenerationTimings)``."""
    rows = inputs["input_ids"].shape[0]
    if rows != 1:
        raise ValueError(f"expected inputs of one prompt, got {rows}; use generate_answers")
    answers, timings = generate_answers(
        model, processor, inputs, handle, max_new_tokens=max_new_tokens, progress=progress
    )
    return answers[0], timings


def generate_answers(model, processor, inputs, handle, *, max_new_tokens=128, progress=True):
    """Greedy decoding of a batch of left-padded prompts in one ``generate`` call (SSC runs
    per sample inside the prefill); returns ``(answers, GenerationTimings)``, one answer per
    prompt, in order."""
    import torch

    if (
        isinstance(max_new_tokens, bool)
        or not isinstance(max_new_tokens, numbers.Integral)
        or max_new_tokens < 1
    ):
        raise ValueError(f"expected max_new_tokens >= 1, got {max_new_tokens!r}")
    max_new_tokens = int(max_new_tokens)
    mask = inputs.get("attention_mask")
    if mask is not None and mask.shape[0] > 1 and not bool(mask[:, -1].all()):
        raise ValueError(
            "expected left-padded prompts for batched generation (every prompt's last "
            "position attended), got right padding; build the inputs with video_batch_inputs "
            "or image_batch_inputs"
        )
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    streamer = _streamer(max_new_tokens, progress)
    sync()
    streamer.t_start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            num_beams=1,
            streamer=streamer,
        )
    sync()
    t_end = time.perf_counter()
    prompt_len = inputs["input_ids"].shape[1]
    answers = [
        a.strip() for a in processor.batch_decode(out[:, prompt_len:], skip_special_tokens=True)
    ]
    t_first = streamer.t_first if streamer.t_first is not None else t_end
    ssc, runs = None, []
    if handle is not None and handle.config.enabled and handle.last_anchored:
        ssc = sum(float(r.timings.get("total", 0.0)) for r in handle.last_result if r is not None)
        runs = list(handle.last_ssc_runs)
    timings = GenerationTimings(
        prefill_s=t_first - streamer.t_start,
        ssc_s=ssc,
        decode_s=t_end - t_first,
        new_tokens=int(out.shape[1] - prompt_len),
        ssc_runs=runs,
    )
    return answers, timings


def run_prefill(model, inputs, *, progress: bool = True) -> None:
    """One forward over the prompt (vision encoder, SSC when anchored, language model), no
    generation; afterwards the handle holds the scores (``handle.last_scores``)."""
    import torch

    with _Ticker("prefill (vision encoder, SSC)", progress), torch.inference_mode():
        model(**inputs, use_cache=False)


def ssc_plan(model, handle, inputs) -> str | None:
    """One line on the SSC a prefill of ``inputs`` will run, before it runs: visual tokens
    per sample, the solver that will run (the plan
    :func:`videoanchor.anchor.compute_anchor_scores` makes, from the same function), its
    memory need against the budget, and the iteration limit and time budget where an
    iteration runs. None when anchoring is off or no token is scored."""
    from videoanchor.anchor import plan as plans
    from videoanchor.integrations.options import ssc_options
    from videoanchor.integrations.options import ssc_plan as make

    cfg = handle.config
    if not cfg.enabled:
        return None
    ids = handle.family.token_ids(model.config, cfg.tokens)
    input_ids = inputs.get("input_ids")
    if not ids or input_ids is None:
        return None
    is_visual = sum((input_ids == i) for i in ids.values()).bool()
    counts = [int(c) for c in is_visual.sum(dim=1).tolist()]
    n = max(counts)
    if n < 3:
        return None
    text_cfg = getattr(model.config, "text_config", model.config)
    d = int(getattr(text_cfg, "hidden_size", 0)) or 1
    if cfg.pca_rank:
        d = min(d, cfg.pca_rank)
    device = model.device
    tokens = "/".join(str(c) for c in counts)
    head = f"SSC plan: {tokens} visual tokens x {d} features on {device}, "
    try:
        plan = make(cfg, n, d, device)
    except plans.SSCMemoryError as err:
        return head + f"does not fit: {err}"
    room = plans.free_memory_bytes(device)
    room = "unknown" if room is None else plans.format_bytes(room)
    line = head + f"{plan.describe(ssc_options(cfg))}, needs ~{plans.format_bytes(plan.need)} "
    line += f"(budget {room})"
    if plan.solver == "workset":
        return line
    if cfg.ssc_time_budget is not None:
        line += f", time budget {cfg.ssc_time_budget:g} s (stops unconverged when it runs out)"
    return line + "; seconds per iteration are measured on its first iterations"


@dataclass
class TokenMaps:
    """One sample's anchor scores and cluster labels laid out on the model's token grid.

    scores, labels: (Tt, Gh, Gw) float32 / int64; grid: (Tt, Gh, Gw);
    columns: (Tt * Gh * Gw,) prompt columns of these tokens in grid order.
    """

    scores: np.ndarray
    labels: np.ndarray
    grid: tuple[int, int, int]
    columns: np.ndarray


_GRID_ORDERS = ("thw", "thw+newline", "tiles")


def _last_prefill(handle, sample: int):
    """The last prefill of ``sample``: its visual segments, the sequence positions of its
    scored tokens, its scores over the whole sequence and its tokens' cluster labels."""
    if handle.last_scores is None or not handle.last_anchored:
        raise PipelineError("the model produced no anchor scores (no visual tokens were scored)")
    return (
        handle.last_segments[sample],
        handle.last_visual_positions[sample].numpy(),
        handle.last_scores[sample].float().cpu().numpy(),
        handle.last_result[sample].labels.cpu().numpy(),
    )


def anchor_token_maps(handle, sample: int = 0) -> TokenMaps:
    """Lay the last prefill's scores of ``sample`` out on its video's token grid.

    Uses the handle's segments: a Qwen video is one ``thw`` segment, LLaVA-OneVision adds one
    newline token (dropped here), InternVL has one ``tiles`` segment per frame (stacked in time).
    Raises PipelineError when the layout is not a grid (e.g. LLaVA anyres images).
    """
    segments, positions, scores_all, labels_all = _last_prefill(handle, sample)
    if not segments:
        raise PipelineError("the model reported no visual segments for this prompt")
    bad = [s for s in segments if s.grid is None or s.order not in _GRID_ORDERS]
    if bad:
        raise PipelineError(
            f"cannot draw anchors: the {bad[0].kind} tokens of this family have no grid layout "
            f"(layout {bad[0].order!r})"
        )
    spatial = {tuple(s.grid[1:]) for s in segments}
    if len(spatial) != 1:
        raise PipelineError(
            f"cannot draw anchors: the visual segments have different grids {spatial}"
        )
    gh, gw = spatial.pop()
    idx = []
    for s in segments:
        n = s.grid[0] * gh * gw
        if n > s.length:
            raise PipelineError(f"segment of {s.length} tokens is smaller than its grid {s.grid}")
        idx.append(np.arange(s.start, s.start + n))
    idx = np.concatenate(idx)
    tt = len(idx) // (gh * gw)
    columns = positions[idx]
    return TokenMaps(
        scores=scores_all[columns].reshape(tt, gh, gw).astype(np.float32),
        labels=labels_all[idx].reshape(tt, gh, gw).astype(np.int64),
        grid=(tt, gh, gw),
        columns=columns.astype(np.int64),
    )


def anchor_view_maps(handle, sample: int = 0) -> list[TokenMaps]:
    """Per view (image) of ``sample``, the last prefill's scores on that view's token grid.

    Each image is one segment of the handle; its maps have grid ``(1, Gh, Gw)`` (views of
    different sizes have different grids). Raises PipelineError when an image's tokens have no
    single grid (LLaVA anyres images, an InternVL image split into several tiles).
    """
    segments, positions, scores_all, labels_all = _last_prefill(handle, sample)
    views = [s for s in segments if s.kind == "image"]
    if not views:
        raise PipelineError("the model reported no image segments for this prompt")
    maps = []
    for k, s in enumerate(views):
        if s.grid is None or s.order not in ("thw", "tiles"):
            raise PipelineError(
                f"cannot draw anchors: the image tokens of this family have no grid layout "
                f"(layout {s.order!r})"
            )
        if s.grid[0] != 1:
            raise PipelineError(
                f"cannot draw anchors: view {k} became {s.grid[0]} token slices or tiles "
                f"(grid {s.grid}); expected one grid per view"
            )
        _, gh, gw = s.grid
        if gh * gw > s.length:
            raise PipelineError(f"segment of {s.length} tokens is smaller than its grid {s.grid}")
        idx = np.arange(s.start, s.start + gh * gw)
        columns = positions[idx]
        maps.append(
            TokenMaps(
                scores=scores_all[columns].reshape(1, gh, gw).astype(np.float32),
                labels=labels_all[idx].reshape(1, gh, gw).astype(np.int64),
                grid=(1, gh, gw),
                columns=columns.astype(np.int64),
            )
        )
    return maps
