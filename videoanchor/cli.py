"""The ``videoanchor`` command: ask a VLM about a video, look at the anchors, time the kernels.

    videoanchor run --video clip.mp4 --question "How many chairs are in the room?" --compare
    videoanchor anchors --video clip.mp4 --out anchors.png
    videoanchor bench --quick

The functions below the parser (``load_vlm``, ``video_inputs``, ``generate_answer``,
``anchor_token_maps``) are what the commands (and the lmms-eval wrapper) are made of.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = [
    "DEFAULT_MODEL",
    "CLIError",
    "GenerationTimings",
    "TokenMaps",
    "anchor_token_maps",
    "build_parser",
    "check_model",
    "generate_answer",
    "load_vlm",
    "main",
    "video_inputs",
]

DEFAULT_MODEL = "Qwen/Qwen2.5-VL-7B-Instruct"
DEFAULT_ANCHOR_QUESTION = "Describe the video."


class CLIError(Exception):
    """A user-facing failure: printed as one line, exit status 1."""


# ----------------------------------------------------------------------------------------
# progress


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


# ----------------------------------------------------------------------------------------
# model, inputs, generation


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    line = text.splitlines()[0].strip() if text else type(err).__name__
    return line


def _resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise CLIError(f"--device {device} was asked for but torch sees no CUDA device")
    return device


def _resolve_dtype(dtype: str, device: str):
    import torch

    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    table = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
    return table[dtype]


def check_model(model_name: str, *, trust_remote_code: bool = False):
    """Load only the model's config and check its family is supported; returns the config.

    Cheap (no weights), so the commands call it before decoding the video. Raises CLIError.
    """
    import transformers

    from videoanchor.integrations import get_family

    try:
        config = transformers.AutoConfig.from_pretrained(
            model_name, trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError) as err:
        raise CLIError(f"cannot load model '{model_name}': {_first_line(err)}") from err
    try:
        get_family(config)
    except ValueError as err:
        raise CLIError(_first_line(err)) from err
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
    with the family's defaults. Raises CLIError (one line) for an unsupported family, a
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
        raise CLIError(f"cannot load model '{model_name}': {_first_line(err)}") from err
    model = model.to(device).eval()
    try:
        processor = transformers.AutoProcessor.from_pretrained(
            model_name, trust_remote_code=trust_remote_code
        )
    except ImportError as err:
        hint = ""
        if "torchvision" in str(err).lower():
            hint = " (transformers' video processors need torchvision: pip install torchvision)"
        raise CLIError(
            f"cannot build the processor of '{model_name}'{hint}: {_first_line(err)}"
        ) from err
    except (OSError, ValueError) as err:
        raise CLIError(f"cannot load the processor of '{model_name}': {_first_line(err)}") from err
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
        raise CLIError(
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


# ----------------------------------------------------------------------------------------
# anchors on the token grid


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
    Raises CLIError when the layout is not a grid (e.g. LLaVA anyres images).
    """
    if handle.last_scores is None or not handle.last_anchored:
        raise CLIError("the model produced no anchor scores (no visual tokens were scored)")
    segments = handle.last_segments[sample]
    result = handle.last_result[sample]
    positions = handle.last_visual_positions[sample].numpy()
    scores_all = handle.last_scores[sample].float().cpu().numpy()
    labels_all = result.labels.cpu().numpy()
    if not segments:
        raise CLIError("the model reported no visual segments for this prompt")
    bad = [s for s in segments if s.grid is None or s.order not in _GRID_ORDERS]
    if bad:
        raise CLIError(
            f"cannot draw anchors: the {bad[0].kind} tokens of this family have no grid layout "
            f"(layout {bad[0].order!r})"
        )
    spatial = {tuple(s.grid[1:]) for s in segments}
    if len(spatial) != 1:
        raise CLIError(f"cannot draw anchors: the visual segments have different grids {spatial}")
    gh, gw = spatial.pop()
    idx = []
    for s in segments:
        n = s.grid[0] * gh * gw
        if n > s.length:
            raise CLIError(f"segment of {s.length} tokens is smaller than its grid {s.grid}")
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


# ----------------------------------------------------------------------------------------
# commands


def _read_video(path: str, frames: int, progress: bool):
    from videoanchor.video import read_video_frames

    return read_video_frames(path, frames, progress=progress)


def _check_video_path(path: str) -> None:
    if not os.path.exists(path):
        raise CLIError(f"video file not found: '{path}'")
    if os.path.isdir(path):
        raise CLIError(f"'{path}' is a directory, expected a video file")


def _configure(handle, args, enabled: bool):
    import videoanchor

    opts = dict(enabled=enabled, n_clusters=args.n_clusters, decode=args.decode, seed=args.seed)
    opts.update(pca_rank=args.pca_rank, max_iter=args.ssc_max_iter, label_draws=args.label_draws)
    for name in ("alpha_q", "alpha_k", "alpha_v"):
        value = getattr(args, name)
        if value is not None:
            opts[name] = value
    try:
        return videoanchor.configure(handle.model, **opts)
    except (TypeError, ValueError) as err:
        raise CLIError(_first_line(err)) from err


def _log(args, message: str) -> None:
    if not args.quiet:
        print(message, file=sys.stderr, flush=True)


def _fmt_s(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f} s"


def cmd_run(args) -> int:
    _check_video_path(args.video)
    check_model(args.model, trust_remote_code=args.trust_remote_code)
    video = _read_video(args.video, args.frames, not args.quiet)
    _log(args, f"sampled {video.num_frames} of {video.total_frames} frames from {args.video}")
    model, processor, handle = load_vlm(
        args.model, device=args.device, dtype=args.dtype, trust_remote_code=args.trust_remote_code
    )
    inputs = video_inputs(processor, video, args.question, device=model.device, dtype=model.dtype)
    runs = [("anchored", True)]
    if args.no_anchor:
        runs = [("baseline", False)]
    elif args.compare:
        runs.append(("baseline", False))
    results = []
    for label, enabled in runs:
        handle = _configure(handle, args, enabled)
        c = handle.config
        detail = (
            f"alpha_k={c.alpha_k:g}, alpha_v={c.alpha_v:g}, n_clusters={c.n_clusters}"
            if enabled
            else "plain attention"
        )
        _log(args, f"{label}: {detail}")
        answer, timings = generate_answer(
            model, processor, inputs, handle,
            max_new_tokens=args.max_new_tokens, progress=not args.quiet,
        )  # fmt: skip
        results.append((label, detail, answer, timings))
    if len(results) == 1:
        label, detail, answer, t = results[0]
        print(answer)
        _log(
            args,
            f"[{label}] prefill {_fmt_s(t.prefill_s)} (SSC {_fmt_s(t.ssc_s)}), decode "
            f"{_fmt_s(t.decode_s)}, {t.new_tokens} tokens",
        )
        return 0
    for label, detail, answer, _ in results:
        body = answer.replace("\n", "\n    ")
        print(f"{label} ({detail}):\n    {body}")
    print()
    header = ["", "prefill", "of which SSC", "decode", "new tokens", "decode tok/s"]
    rows = [header]
    for label, _, _, t in results:
        tps = "-" if t.tokens_per_s is None else f"{t.tokens_per_s:.1f}"
        rows.append([label, _fmt_s(t.prefill_s), _fmt_s(t.ssc_s), _fmt_s(t.decode_s),
                     str(t.new_tokens), tps])  # fmt: skip
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    for r in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip())
    return 0


def cmd_anchors(args) -> int:
    import torch

    from videoanchor.visualize import save_anchor_figure

    out = Path(args.out)
    if out.suffix.lower() != ".png":
        raise CLIError(f"--out must be a .png file, got '{args.out}'")
    npz = Path(args.npz) if args.npz else out.with_suffix(".npz")
    _check_video_path(args.video)
    check_model(args.model, trust_remote_code=args.trust_remote_code)
    video = _read_video(args.video, args.frames, not args.quiet)
    _log(args, f"sampled {video.num_frames} of {video.total_frames} frames from {args.video}")
    model, processor, handle = load_vlm(
        args.model, device=args.device, dtype=args.dtype, trust_remote_code=args.trust_remote_code
    )
    handle = _configure(handle, args, True)
    inputs = video_inputs(processor, video, args.question, device=model.device, dtype=model.dtype)
    with _Ticker("prefill (vision encoder, SSC)", not args.quiet), torch.inference_mode():
        model(**inputs, use_cache=False)
    maps = anchor_token_maps(handle, 0)
    if maps.grid[0] > video.num_frames:
        raise CLIError(
            f"the model made {maps.grid[0]} time slices from {video.num_frames} frames; "
            "cannot match slices to frames"
        )
    c = handle.config
    res = handle.last_result[0]
    title = (
        f"VideoAnchor anchors | {args.model} | {video.num_frames} frames | "
        f"{maps.scores.size} visual tokens on a {'x'.join(map(str, maps.grid))} grid | "
        f"{int(maps.labels.max()) + 1} SSC clusters"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    image = save_anchor_figure(
        out,
        video.frames,
        maps.scores,
        labels=None if args.no_clusters else maps.labels,
        frame_indices=video.indices,
        timestamps=video.timestamps,
        title=title,
        columns=args.columns,
        tile_width=args.tile_width,
    )
    npz.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        npz,
        scores=handle.last_scores.float().cpu().numpy(),
        input_ids=inputs["input_ids"].cpu().numpy(),
        visual_positions=handle.last_visual_positions[0].numpy(),
        grid=np.array(maps.grid, dtype=np.int64),
        grid_scores=maps.scores,
        grid_labels=maps.labels,
        grid_columns=maps.columns,
        frame_indices=video.indices,
        timestamps=video.timestamps,
        alphas=np.array([c.alpha_q, c.alpha_k, c.alpha_v]),
        n_clusters=np.array(c.n_clusters),
        ssc_iterations=np.array(res.iterations),
        ssc_converged=np.array(res.converged),
        model=np.array(args.model),
        video=np.array(os.path.abspath(args.video)),
    )
    print(f"wrote {out} ({image.size[0]}x{image.size[1]}) and {npz}")
    top = np.argsort(maps.scores.ravel())[::-1][:3]
    tt, gh, gw = maps.grid
    cells = ", ".join(
        f"slice {i // (gh * gw)} row {(i // gw) % gh} col {i % gw} ({maps.scores.ravel()[i]:.2f})"
        for i in top
    )
    _log(args, f"strongest anchors: {cells}")
    return 0


def _bench_dir() -> Path | None:
    here = Path(__file__).resolve().parent.parent / "benchmarks"
    if here.is_dir():
        return here
    cwd = Path.cwd() / "benchmarks"
    return cwd if cwd.is_dir() else None


def _script_flags(path: Path) -> set[str]:
    text = path.read_text(errors="replace")
    return set(re.findall(r"[\"'](--[a-z][a-z0-9-]*)[\"']", text))


def cmd_bench(args) -> int:
    import torch

    bench = _bench_dir()
    if bench is None:
        raise CLIError(
            "the benchmark scripts ship with the source checkout (benchmarks/bench_*.py); "
            "run `videoanchor bench` from a clone of the repository"
        )
    scripts = sorted(bench.glob("bench_*.py"))
    if args.only:
        scripts = [s for s in scripts if any(o in s.stem for o in args.only)]
    if not scripts:
        raise CLIError(f"no benchmark scripts found in {bench}")
    out_dir = Path(args.out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    if torch.cuda.is_available():
        print(f"CUDA device: {torch.cuda.get_device_name(0)}")
    else:
        print(
            "No CUDA device: the GPU kernels cannot be timed here; each benchmark runs its CPU part."
        )
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(bench.parent), env.get("PYTHONPATH", "")]).rstrip(
        os.pathsep
    )
    env.setdefault("VIDEOANCHOR_RESULTS_DIR", str(out_dir))
    failed = []
    for script in scripts:
        flags = _script_flags(script)
        cmd = [sys.executable, str(script)]
        if args.quick and "--quick" in flags:
            cmd.append("--quick")
        if "--out-dir" in flags:
            cmd += ["--out-dir", str(out_dir)]
        print(f"\n== {script.name} ({' '.join(cmd[2:]) or 'default settings'})", flush=True)
        rc = subprocess.call(cmd, env=env, cwd=str(bench.parent))
        if rc != 0:
            failed.append(f"{script.name} (exit {rc})")
    _print_bench_summary(out_dir)
    if failed:
        raise CLIError(f"benchmark(s) failed: {', '.join(failed)}")
    return 0


_ID_COLUMNS = ("model", "B", "S", "N", "D", "decoder_layers", "visual_tokens", "dtype",
               "provider", "backend", "method", "solver")  # fmt: skip
_VALUE_COLUMN = re.compile(r"^(ms|tflops|gbps|error)$|_ms$|speedup|^vs_|_share$|tflops|gbps")


def _summary_columns(rows: list[dict]) -> list[str]:
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    ids = [k for k in keys if k in _ID_COLUMNS]
    values = [k for k in keys if _VALUE_COLUMN.search(k) and not re.search(r"(^|_)p\d+(_|$)", k)]
    return (ids + values)[:12] or keys[:8]


def _print_bench_summary(out_dir: Path) -> None:
    files = sorted(out_dir.glob("*.json"))
    if not files:
        return
    print(f"\n== results in {out_dir}")
    for path in files:
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        rows = data.get("rows", []) if isinstance(data, dict) else []
        meta = data.get("meta", {}) if isinstance(data, dict) else {}
        print(f"\n{path.name}: {meta.get('device', '?')}, torch {meta.get('torch', '?')}, "
              f"git {meta.get('git_sha', '?')}")  # fmt: skip
        if not rows:
            continue
        cols = _summary_columns(rows)
        table = [cols] + [[_cell(r.get(c)) for c in cols] for r in rows]
        widths = [max(len(row[i]) for row in table) for i in range(len(cols))]
        for row in table:
            print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())


def _cell(x) -> str:
    if isinstance(x, float):
        return f"{x:.4g}"
    return "-" if x is None else str(x)[:40]


# ----------------------------------------------------------------------------------------
# parser


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got '{text}'") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _nonneg_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got '{text}'") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value}")
    return value


def _families_text() -> str:
    try:
        from videoanchor.integrations.registry import FAMILIES
    except Exception:  # pragma: no cover - only when the package is broken
        return ""
    names = ", ".join(f"{spec.name} ({key})" for key, spec in sorted(FAMILIES.items()))
    return f"supported model families (config.model_type): {names}"


def _add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"Hugging Face model id or local directory (default: {DEFAULT_MODEL})",
    )
    g.add_argument(
        "--device",
        default="auto",
        help="'auto' (CUDA when available, else CPU), 'cpu', 'cuda' or 'cuda:N'",
    )
    g.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "bfloat16", "float16", "float32"],
        help="weights dtype (auto: bfloat16 on CUDA, float32 on CPU)",
    )
    g.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="allow the model's own code from its repository (as transformers does)",
    )
    v = p.add_argument_group("video")
    v.add_argument("--video", required=True, help="video file (anything FFmpeg/PyAV decodes)")
    v.add_argument(
        "--frames",
        type=_positive_int,
        default=16,
        help="frames sampled uniformly over the whole video, first and last included (default 16)",
    )
    a = p.add_argument_group("anchoring (defaults: the family's values in the registry)")
    a.add_argument("--alpha-k", type=float, default=None, help="key gate strength alpha_K")
    a.add_argument("--alpha-v", type=float, default=None, help="value gate strength alpha_V")
    a.add_argument(
        "--alpha-q",
        type=float,
        default=None,
        help="query gate alpha_Q (cancels in the softmax: kept for fidelity, no effect)",
    )
    a.add_argument(
        "--n-clusters",
        type=_positive_int,
        default=24,
        help="spectral clusters of SSC (default 24, the paper's)",
    )
    a.add_argument(
        "--decode",
        choices=["prefill", "all"],
        default="prefill",
        help="'prefill': anchor the prompt only (the paper); 'all': decode steps too",
    )
    a.add_argument(
        "--pca-rank",
        type=_nonneg_int,
        default=0,
        help="reduce the visual tokens to this rank before SSC (0: no PCA, the paper)",
    )
    a.add_argument(
        "--ssc-max-iter",
        type=_positive_int,
        default=10000,
        help="ADMM iteration limit of SSC (default 10000, the authors')",
    )
    a.add_argument("--seed", type=int, default=0, help="seed of the spectral clustering")
    a.add_argument(
        "--label-draws",
        type=_positive_int,
        default=1,
        help="label draws from one spectral embedding, cluster shares averaged: scores that "
        "depend less on the seed (default 1, the paper's single draw)",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars or log lines")
    p.add_argument("--debug", action="store_true", help="show the full traceback on errors")  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.HelpFormatter
    parser = argparse.ArgumentParser(
        prog="videoanchor",
        description="VideoAnchor for video VLMs: ask a question about a video with anchored "
        "attention, look at which regions became anchors, time the kernels.",
        epilog=_families_text(),
        formatter_class=fmt,
    )
    from videoanchor import __version__

    parser.add_argument("--version", action="version", version=f"videoanchor {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    run = sub.add_parser(
        "run",
        help="answer a question about a video, with anchoring (and optionally without)",
        description="Sample frames uniformly, run the model with VideoAnchor (greedy decoding) "
        "and print the answer. --compare also runs it without anchoring and prints both answers "
        "with prefill / SSC / decode times.",
        epilog=_families_text(),
        formatter_class=fmt,
    )
    _add_model_args(run)
    run.add_argument("--question", required=True, help="the question to ask about the video")
    run.add_argument("--max-new-tokens", type=_positive_int, default=128,
                     help="answer length limit (default 128)")  # fmt: skip
    mode = run.add_mutually_exclusive_group()
    mode.add_argument(
        "--compare",
        action="store_true",
        help="also answer without anchoring; print both answers and timings",
    )
    mode.add_argument("--no-anchor", action="store_true",
                      help="answer without anchoring only (the baseline)")  # fmt: skip
    run.set_defaults(func=cmd_run)

    anchors = sub.add_parser(
        "anchors",
        help="draw which regions became anchors (PNG) and save the scores (.npz)",
        description="Run the prefill once with anchoring and draw the sampled frames in a grid, "
        "each overlaid with its tokens' anchor scores as a heat map, and below each frame its "
        "SSC cluster labels as colours. The scores go to an .npz next to the PNG: `scores` is "
        "the (batch, prompt_len) score of every prompt position (0 at text), `grid_scores` and "
        "`grid_labels` are the video's tokens on the model's (time, rows, cols) grid.",
        epilog=_families_text(),
        formatter_class=fmt,
    )
    _add_model_args(anchors)
    anchors.add_argument("--out", default="anchors.png", help="PNG to write (default anchors.png)")
    anchors.add_argument("--npz", default=None, help="scores file (default: --out with .npz)")
    anchors.add_argument(
        "--question",
        default=DEFAULT_ANCHOR_QUESTION,
        help="text after the video in the prompt (SSC does not depend on it)",
    )
    anchors.add_argument(
        "--no-clusters",
        action="store_true",
        help="draw only the heat maps, not the cluster-label tiles",
    )
    anchors.add_argument(
        "--columns",
        type=_positive_int,
        default=None,
        help="frames per row (default min(frames, 4))",
    )
    anchors.add_argument("--tile-width", type=_positive_int, default=240,
                         help="width of one frame in the picture, in pixels (default 240)")  # fmt: skip
    anchors.set_defaults(func=cmd_anchors)

    bench = sub.add_parser(
        "bench",
        help="run the kernel and SSC benchmarks on this machine and print a table",
        description="Run every benchmarks/bench_*.py script of the source checkout (attention "
        "kernels, SSC, ...) and print their results. Without CUDA it says so and runs the parts "
        "that can run on the CPU. Results are JSON files with the device, versions and git SHA.",
        formatter_class=fmt,
    )
    bench.add_argument("--quick", action="store_true", help="the scripts' short settings")
    bench.add_argument(
        "--out-dir",
        default="videoanchor-bench",
        help="where the JSON results go (default ./videoanchor-bench)",
    )
    bench.add_argument(
        "--only",
        nargs="+",
        metavar="NAME",
        help="run only the scripts whose name contains one of these (e.g. ssc)",
    )
    bench.add_argument("--debug", action="store_true", help="show the full traceback on errors")  # fmt: skip
    bench.set_defaults(func=cmd_bench, quiet=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``videoanchor`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    from transformers.utils import logging as hf_logging

    bars_were_on = hf_logging.is_progress_bar_enabled()
    if getattr(args, "quiet", False):
        hf_logging.disable_progress_bar()
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("videoanchor: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        if getattr(args, "debug", False):
            raise
        from videoanchor.video import VideoReadError

        if isinstance(err, (CLIError, FileNotFoundError, VideoReadError)):
            message = _first_line(err)
        else:
            message = f"{type(err).__name__}: {_first_line(err)} (rerun with --debug for details)"
        print(f"videoanchor {args.command}: error: {message}", file=sys.stderr)
        return 1
    finally:
        if bars_were_on:
            hf_logging.enable_progress_bar()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
