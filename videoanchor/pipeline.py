"""The library layer the ``videoanchor`` command and the lmms-eval wrapper share.

``load_vlm`` loads a supported VLM with the videoanchor attention and its processor,
``video_inputs`` turns a sampled video and a question into processor inputs,
``generate_answer`` decodes greedily and times prefill / SSC / decode, and
``anchor_token_maps`` lays the last prefill's anchor scores out on the model's token grid.
Failures a user can fix (unsupported family, missing model, missing package) raise
:class:`PipelineError` with a one-line message.
"""

from __future__ import annotations

import sys
import threading
import time
from dataclasses import dataclass

import numpy as np

__all__ = [
    "GenerationTimings",
    "PipelineError",
    "TokenMaps",
    "anchor_token_maps",
    "check_model",
    "generate_answer",
    "load_vlm",
    "run_prefill",
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


def _resolve_dtype(dtype: str, device: str):
    import torch

    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    table = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
    return table[dtype]


def check_model(model_name: str, *, trust_remote_code: bool = False):
    """Load only the model's config and check its family is supported; returns the config.

    Cheap (no weights), so the commands call it before decoding the video. Raises PipelineError.
    """
    import transformers

    from videoanchor.integrations import get_family

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

    import videoanchor
    from videoanchor.integrations import ATTN_IMPLEMENTATION

    check_model(model_name, trust_remote_code=trust_remote_code)
    device = _resolve_device(device)
    torch_dtype = _resolve_dtype(dtype, device)
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
    handle = videoanchor.configure(model)
    return model, processor, handle


def video_inputs(processor, video, question: str, device=None, dtype=None, **processor_kwargs):
    """Processor inputs for one video and one question (a single user turn, chat template).

    ``video`` is a :class:`videoanchor.video.SampledVideo`; its frames are passed as already
    sampled (``do_sample_frames=False``) with their true indices and frame rate, so models that
    encode time (Qwen2.5-VL, Qwen3-VL) see the real timestamps. ``processor_kwargs`` go to
    the processor call (e.g. ``size=...`` for the Qwen video processor). Tensors are moved to
    ``device`` and floating ones cast to ``dtype``.
    """
    from transformers.video_utils import VideoMetadata

    messages = [
        {"role": "user", "content": [{"type": "video"}, {"type": "text", "text": question}]}
    ]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    metadata = VideoMetadata(
        total_num_frames=int(video.total_frames),
        fps=float(video.fps) if video.fps else None,
        frames_indices=[int(i) for i in video.indices],
        height=int(video.frames.shape[1]),
        width=int(video.frames.shape[2]),
    )
    try:
        inputs = processor(
            text=[prompt],
            videos=[video.frames],
            video_metadata=[metadata],
            do_sample_frames=False,
            return_tensors="pt",
            **processor_kwargs,
        )
    except ImportError as err:
        raise PipelineError(
            "processing the video needs a package that is missing "
            f"(transformers' video processors need torchvision): {_first_line(err)}"
        ) from err
    return _to_device(inputs, device, dtype)


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
    """

    prefill_s: float
    ssc_s: float | None
    decode_s: float
    new_tokens: int

    @property
    def tokens_per_s(self) -> float | None:
        steps = self.new_tokens - 1
        return steps / self.decode_s if steps > 0 and self.decode_s > 0 else None


def generate_answer(model, processor, inputs, handle, *, max_new_tokens=128, progress=True):
    """Greedy decoding (the paper's setting); returns ``(answer, GenerationTimings)``."""
    import torch

    if (
        isinstance(max_new_tokens, bool)
        or not isinstance(max_new_tokens, int)
        or max_new_tokens < 1
    ):
        raise ValueError(f"expected max_new_tokens >= 1, got {max_new_tokens!r}")
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
    answer = processor.batch_decode(out[:, prompt_len:], skip_special_tokens=True)[0].strip()
    t_first = streamer.t_first if streamer.t_first is not None else t_end
    ssc = None
    if handle is not None and handle.config.enabled and handle.last_anchored:
        ssc = sum(float(r.timings.get("total", 0.0)) for r in handle.last_result if r is not None)
    timings = GenerationTimings(
        prefill_s=t_first - streamer.t_start,
        ssc_s=ssc,
        decode_s=t_end - t_first,
        new_tokens=int(out.shape[1] - prompt_len),
    )
    return answer, timings


def run_prefill(model, inputs, *, progress: bool = True) -> None:
    """One forward over the prompt (vision encoder, SSC when anchored, language model), no
    generation; afterwards the handle holds the scores (``handle.last_scores``)."""
    import torch

    with _Ticker("prefill (vision encoder, SSC)", progress), torch.inference_mode():
        model(**inputs, use_cache=False)


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


def anchor_token_maps(handle, sample: int = 0) -> TokenMaps:
    """Lay the last prefill's scores of ``sample`` out on its video's token grid.

    Uses the handle's segments: a Qwen video is one ``thw`` segment, LLaVA-OneVision adds one
    newline token (dropped here), InternVL has one ``tiles`` segment per frame (stacked in time).
    Raises PipelineError when the layout is not a grid (e.g. LLaVA anyres images).
    """
    if handle.last_scores is None or not handle.last_anchored:
        raise PipelineError("the model produced no anchor scores (no visual tokens were scored)")
    segments = handle.last_segments[sample]
    result = handle.last_result[sample]
    positions = handle.last_visual_positions[sample].numpy()
    scores_all = handle.last_scores[sample].float().cpu().numpy()
    labels_all = result.labels.cpu().numpy()
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
