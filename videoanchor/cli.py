"""The ``videoanchor`` command: ask a VLM about a video, look at the anchors, time the kernels.

    videoanchor run --video clip.mp4 --question "How many chairs are in the room?" --compare
    videoanchor run --images a.jpg b.jpg c.jpg --question "Which view shows the door?"
    videoanchor anchors --video clip.mp4 --out anchors.png
    videoanchor bench --quick

This module holds the argument parsing and the commands only; what they are made of
(``load_vlm``, ``video_inputs``, ``generate_answer``, ``anchor_token_maps``) lives in
:mod:`videoanchor.pipeline`, which the lmms-eval wrapper uses too. Nothing imports this module.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np

from videoanchor.anchor.options import DEFAULTS as SSC
from videoanchor.anchor.options import SSC_SOLVERS
from videoanchor.anchor.plan import PRECISIONS
from videoanchor.pipeline import (
    PipelineError,
    _first_line,
    anchor_token_maps,
    anchor_view_maps,
    check_model,
    generate_answer,
    image_inputs,
    load_vlm,
    read_images,
    run_prefill,
    ssc_plan,
    video_inputs,
)

__all__ = ["DEFAULT_MODEL", "CLIError", "build_parser", "main"]

DEFAULT_MODEL = "Qwen/Qwen2.5-VL-7B-Instruct"
DEFAULT_ANCHOR_QUESTION = "Describe the video."
DEFAULT_VIEWS_QUESTION = "Describe the scene."
DEFAULT_FRAMES = 16


class CLIError(PipelineError):
    """A user-facing failure of a command: printed as one line, exit status 1."""


# ----------------------------------------------------------------------------------------
# commands


def _check_video_path(path: str) -> None:
    if not os.path.exists(path):
        raise CLIError(f"video file not found: '{path}'")
    if os.path.isdir(path):
        raise CLIError(f"'{path}' is a directory, expected a video file")


def _visual_kind(args) -> str:
    """'video' or 'images', after checking the flags agree; paths are checked too."""
    if args.video is not None and args.images is not None:
        raise CLIError(
            "--video and --images cannot be mixed: give one video, or several views of one "
            "scene as images"
        )
    if args.video is None and args.images is None:
        raise CLIError("expected --video FILE or --images FILE [FILE ...]")
    if args.video is not None:
        _check_video_path(args.video)
        return "video"
    if args.frames is not None:
        raise CLIError("--frames applies to --video only; every image is one view")
    for path in args.images:
        if not os.path.exists(path):
            raise CLIError(f"image file not found: '{path}'")
    return "images"


def _read_visual(args, kind: str):
    """The sampled video or the list of views, with a log line."""
    if kind == "video":
        from videoanchor.video import read_video_frames

        frames = DEFAULT_FRAMES if args.frames is None else args.frames
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            video = read_video_frames(args.video, frames, progress=not args.quiet)
        _log(args, f"sampled {video.num_frames} of {video.total_frames} frames from {args.video}")
        for w in caught:  # e.g. fewer frames than --frames: each frame once, never repeated
            print(f"videoanchor: note: {w.message}", file=sys.stderr, flush=True)
        return video
    views = read_images(args.images)
    sizes = ", ".join(f"{v.shape[1]}x{v.shape[0]}" for v in views)
    _log(args, f"read {len(views)} view(s) ({sizes})")
    return views


def _inputs(processor, kind, visual, question, model):
    if kind == "video":
        return video_inputs(processor, visual, question, device=model.device, dtype=model.dtype)
    return image_inputs(processor, visual, question, device=model.device, dtype=model.dtype)


def _anchor_options(args, enabled: bool) -> dict:
    opts = dict(enabled=enabled, n_clusters=args.n_clusters, decode=args.decode, seed=args.seed)
    opts.update(pca_rank=args.pca_rank, max_iter=args.ssc_max_iter, label_draws=args.label_draws)
    opts.update(ssc_solver=args.ssc_solver, ssc_precision=args.ssc_precision)
    opts.update(ssc_progress=not args.quiet, ssc_time_budget=args.ssc_time_budget)
    for name in ("alpha_q", "alpha_k", "alpha_v"):
        value = getattr(args, name)
        if value is not None:
            opts[name] = value
    return opts


def _configure(handle, args, enabled: bool):
    import videoanchor

    try:
        return videoanchor.configure(handle.model, **_anchor_options(args, enabled))
    except (TypeError, ValueError) as err:
        raise CLIError(_first_line(err)) from err


def _check_writable(path: Path, flag: str) -> None:
    """The file can be created: its folder exists (or can be made) and a file can be
    created in it (probed with a temporary file)."""
    from videoanchor.pipeline import check_output_path

    check_output_path(path, flag, folder=False)


def _check_args(args, kind: str) -> None:
    """Everything the command needs from its flags, checked before any slow step (reading
    the video, loading the model): one place, so a typo costs nothing."""
    from videoanchor.integrations.transformers.configuring import check_options
    from videoanchor.pipeline import check_load_options

    try:
        check_options(**_anchor_options(args, True))
    except (TypeError, ValueError) as err:
        raise CLIError(_first_line(err).replace("max_iter", "--ssc-max-iter")) from err
    check_load_options(args.device, args.dtype)
    if args.cache_dir and not args.no_cache:
        from videoanchor.pipeline import check_output_path

        check_output_path(args.cache_dir, "--cache-dir", folder=True)


def _use_cache(args, model, handle, inputs):
    """Unless --no-cache: the handle takes SSC and the labels from the on-disk cache and the
    inputs carry the cached vision-encoder output instead of pixels (a second run on the same
    video skips the vision encoder and SSC)."""
    if getattr(args, "no_cache", False):
        return inputs
    from videoanchor.integrations.transformers.cache import (
        AnchorCache,
        default_cache_dir,
        model_fingerprint,
    )

    root = Path(args.cache_dir) if args.cache_dir else default_cache_dir()
    handle.cache = AnchorCache(root, model_key=model_fingerprint(model))
    inputs = handle.cache.encode(model, inputs)
    hits = handle.cache.stats["vision_hits"]
    if hits:
        _log(args, f"vision features from the cache in {root}")
    return inputs


def _log(args, message: str) -> None:
    if not args.quiet:
        print(message, file=sys.stderr, flush=True)


def _report_ssc(args, runs) -> None:
    """How each SSC ended. Without --quiet the progress reporter has already said it; with
    --quiet an unconverged SSC is still reported (stderr), a converged one is not."""
    for run in runs:
        if run is not None and not run.converged and args.quiet:
            print(f"videoanchor: warning: {run.message()}", file=sys.stderr, flush=True)


def _report_solver(args, handle) -> None:
    """The solver that answered each sample's SSC and the relative duality gap of the C it
    returned (the plan line said what would run; the working sets answer with the fast
    solver's C where C is dense, and say so here)."""
    ran = [r.solver + ("" if r.gap is None else f" (duality gap {r.gap:.2g})")
           for r in handle.last_result or [] if r is not None]  # fmt: skip
    if ran:
        _log(args, f"SSC solver: {', '.join(ran)}")


def _fmt_s(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f} s"


def cmd_run(args) -> int:
    kind = _visual_kind(args)
    _check_args(args, kind)
    check_model(args.model, trust_remote_code=args.trust_remote_code)
    visual = _read_visual(args, kind)
    model, processor, handle = load_vlm(
        args.model, device=args.device, dtype=args.dtype, trust_remote_code=args.trust_remote_code
    )
    inputs = _use_cache(args, model, handle, _inputs(processor, kind, visual, args.question, model))
    runs = [("anchored", True)]
    if args.no_anchor:
        runs = [("baseline", False)]
    elif args.compare:
        runs.append(("baseline", False))
    results = []
    for label, enabled in runs:
        handle = _configure(handle, args, enabled)
        c = handle.config
        plan = ssc_plan(model, handle, inputs)
        if plan is not None:
            _log(args, plan)
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
        _report_ssc(args, timings.ssc_runs)
        if enabled:
            _report_solver(args, handle)
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
    out = Path(args.out)
    if out.suffix.lower() != ".png":
        raise CLIError(f"--out must be a .png file, got '{args.out}'")
    npz = Path(args.npz) if args.npz else out.with_suffix(".npz")
    if npz.suffix.lower() != ".npz":
        raise CLIError(f"--npz must be a .npz file, got '{args.npz}'")
    if npz.resolve() == out.resolve():
        raise CLIError("--npz and --out must be different files")
    _check_writable(out, "--out")
    _check_writable(npz, "--npz")
    kind = _visual_kind(args)
    _check_args(args, kind)
    check_model(args.model, trust_remote_code=args.trust_remote_code)
    visual = _read_visual(args, kind)
    if kind == "video":
        _check_page_layout(args, visual)
    model, processor, handle = load_vlm(
        args.model, device=args.device, dtype=args.dtype, trust_remote_code=args.trust_remote_code
    )
    handle = _configure(handle, args, True)
    question = args.question
    if question is None:
        question = DEFAULT_ANCHOR_QUESTION if kind == "video" else DEFAULT_VIEWS_QUESTION
    inputs = _use_cache(args, model, handle, _inputs(processor, kind, visual, question, model))
    plan = ssc_plan(model, handle, inputs)
    if plan is not None:
        _log(args, plan)
    run_prefill(model, inputs, progress=not args.quiet)
    c = handle.config
    res = handle.last_result[0]
    run = handle.last_ssc_runs[0] if handle.last_ssc_runs else None
    _report_ssc(args, [run])
    _report_solver(args, handle)
    common = dict(
        scores=handle.last_scores.float().cpu().numpy(),
        input_ids=inputs["input_ids"].cpu().numpy(),
        visual_positions=handle.last_visual_positions[0].numpy(),
        alphas=np.array([c.alpha_q, c.alpha_k, c.alpha_v]),
        n_clusters=np.array(c.n_clusters),
        ssc_solver=np.array(res.solver),
        ssc_iterations=np.array(res.iterations),
        ssc_converged=np.array(res.converged),
        ssc_residual=np.array(res.residual),
        ssc_eps=np.array(c.eps),
        ssc_stopped_by_budget=np.array(bool(run is not None and run.stopped_by_budget)),
        model=np.array(args.model),
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    npz.parent.mkdir(parents=True, exist_ok=True)
    # Written into a temporary folder beside the output and renamed into place (the .npz
    # first, the first page last): an interrupted run leaves each file complete or absent,
    # never a truncated .npz beside a complete PNG.
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.stem}.", suffix=".tmp", dir=out.parent))
    try:
        more = []
        if kind == "video":
            image, strongest, more = _draw_video_anchors(
                args, handle, visual, tmp / out.name, tmp / npz.name, common
            )
        else:
            image, strongest = _draw_view_anchors(
                args, handle, visual, tmp / out.name, tmp / npz.name, common
            )
        os.replace(tmp / npz.name, npz)
        more = [str(out.parent / Path(f).name) for f in more]
        for f in more:
            os.replace(tmp / Path(f).name, f)
        os.replace(tmp / out.name, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    pages = f"; {len(more) + 1} pages, also {', '.join(more)}" if more else ""
    print(f"wrote {out} ({image.size[0]}x{image.size[1]}{pages}) and {npz}")
    _log(args, f"strongest anchors: {strongest}")
    return 0


def _check_page_layout(args, video) -> None:
    """--page-height, --columns and --tile-width against the frames read, before the model
    loads (the page layout only grows a summary strip for long videos after the SSC)."""
    from videoanchor.visualize import anchor_figure_layout

    _, height, width = video.frames.shape[:3]
    try:
        anchor_figure_layout(
            video.num_frames, height, width, columns=args.columns, tile_width=args.tile_width,
            with_labels=not args.no_clusters, max_height=args.page_height,
        )  # fmt: skip
    except ValueError as err:
        message = _first_line(err).replace("max_height=", "--page-height ")
        raise CLIError(message.replace("columns of", "columns (--columns) of")) from err


def _draw_video_anchors(args, handle, video, out, npz, common):
    from videoanchor.visualize import save_anchor_pages

    maps = anchor_token_maps(handle, 0)
    if maps.grid[0] > video.num_frames:
        raise CLIError(
            f"the model made {maps.grid[0]} time slices from {video.num_frames} frames; "
            "cannot match slices to frames"
        )
    title = (
        f"VideoAnchor anchors | {args.model} | {video.num_frames} frames | "
        f"{maps.scores.size} visual tokens on a {'x'.join(map(str, maps.grid))} grid | "
        f"{int(maps.labels.max()) + 1} SSC clusters"
    )
    try:
        pages = save_anchor_pages(
            out,
            video.frames,
            maps.scores,
            labels=None if args.no_clusters else maps.labels,
            frame_indices=video.indices,
            timestamps=video.timestamps,
            title=title,
            columns=args.columns,
            tile_width=args.tile_width,
            max_height=args.page_height,
        )
    except ValueError as err:  # a row wider than the picture allows, a page too low
        raise CLIError(_first_line(err).replace("max_height=", "--page-height ")) from err
    image = pages[0][1]
    np.savez_compressed(
        npz,
        **common,
        grid=np.array(maps.grid, dtype=np.int64),
        grid_scores=maps.scores,
        grid_labels=maps.labels,
        grid_columns=maps.columns,
        frame_indices=video.indices,
        timestamps=video.timestamps,
        video=np.array(os.path.abspath(args.video)),
    )
    top = np.argsort(maps.scores.ravel())[::-1][:3]
    tt, gh, gw = maps.grid
    cells = ", ".join(
        f"slice {i // (gh * gw)} row {(i // gw) % gh} col {i % gw} ({maps.scores.ravel()[i]:.2f})"
        for i in top
    )
    return image, cells, [f for f, _ in pages[1:]]


def _draw_view_anchors(args, handle, views, out, npz, common):
    from videoanchor.visualize import save_view_figure

    maps = anchor_view_maps(handle, 0)
    if len(maps) != len(views):
        raise CLIError(f"the model reported {len(maps)} image segments for {len(views)} views")
    tokens = sum(m.scores.size for m in maps)
    clusters = int(max(m.labels.max() for m in maps)) + 1
    title = (
        f"VideoAnchor anchors | {args.model} | {len(views)} views | {tokens} visual tokens | "
        f"{clusters} SSC clusters"
    )
    captions = [
        f"view {k}: {Path(p).name} ({m.grid[1]}x{m.grid[2]} tokens)"
        for k, (p, m) in enumerate(zip(args.images, maps, strict=True))
    ]
    image = save_view_figure(
        out,
        views,
        [m.scores[0] for m in maps],
        labels=None if args.no_clusters else [m.labels[0] for m in maps],
        captions=captions,
        title=title,
        columns=args.columns,
        tile_width=args.tile_width,
    )
    per_view = {}
    for k, m in enumerate(maps):
        per_view[f"view{k}_scores"] = m.scores[0]
        per_view[f"view{k}_labels"] = m.labels[0]
        per_view[f"view{k}_columns"] = m.columns
    np.savez_compressed(
        npz,
        **common,
        **per_view,
        view_grids=np.array([m.grid[1:] for m in maps], dtype=np.int64),
        images=np.array([os.path.abspath(p) for p in args.images]),
    )
    best = []
    for k, m in enumerate(maps):
        i = int(np.argmax(m.scores[0]))
        gw = m.grid[2]
        best.append((float(m.scores[0].ravel()[i]), k, i // gw, i % gw))
    best.sort(reverse=True)
    cells = ", ".join(f"view {k} row {r} col {col} ({s:.2f})" for s, k, r, col in best[:3])
    return image, cells


def bench_dir() -> Path | None:
    """Where ``videoanchor bench`` finds the benchmark scripts: the checkout's benchmarks/
    beside the package, else ./benchmarks, else None."""
    here = Path(__file__).resolve().parent.parent / "benchmarks"
    if here.is_dir():
        return here
    cwd = Path.cwd() / "benchmarks"
    return cwd if cwd.is_dir() else None


def _script_flags(path: Path) -> set[str]:
    text = path.read_text(errors="replace")
    return set(re.findall(r"[\"'](--[a-z][a-z0-9-]*)[\"']", text))


#: what ``videoanchor bench`` runs unless ``--only`` names scripts: (script, needs CUDA, what
#: it tells a user). The research studies (bench_optimum, bench_schedule, bench_yaleb, ...)
#: run only by name.
USER_BENCHMARKS = (
    ("bench_attention.py", False, "the anchored attention against PyTorch's SDPA"),
    ("bench_scores.py", False, "the default anchor scores' cost and fidelity at two sizes"),
    ("bench_first_call.py", False, "the first call and the import in fresh processes"),
    ("bench_decode.py", True, "decode attention against SDPA"),
    ("bench_paged.py", True, "paged attention, as the vLLM plugin runs it"),
    ("bench_backward.py", True, "the training step against SDPA"),
)

#: a missing module -> the extra that installs it
_EXTRAS = {"av": "video", "PIL": "video", "lmms_eval": "eval", "vllm": "vllm", "cupy": "cupy",
           "matplotlib": "docs", "pytest": "test", "accelerate": "test"}  # fmt: skip
_MISSING = re.compile(r"(?:ModuleNotFoundError|ImportError): No module named '([\w.]+)'")

#: a line a benchmark script prints for a part it does not run here (no CUDA, --quick, ...);
#: ``videoanchor bench`` collects them into its closing summary
_SKIP_LINE = re.compile(r"^\s*(?:bench_\w+:\s*)?(?:SKIP(?:PED)?\b|skipp?ed\b|nothing run\b)", re.I)


def _missing_extra(text: str) -> str | None:
    """``"the [video] extra (...)"`` when ``text`` (a script's stderr) ends on a missing
    module that an extra of this package installs; else None."""
    found = _MISSING.findall(text)
    if not found:
        return None
    module = found[-1].split(".")[0]
    extra = _EXTRAS.get(module)
    if extra is None:
        return None
    return f"the [{extra}] extra (pip install -e \".[{extra}]\"; no module named '{module}')"


def _bench_scripts(bench: Path, only, cuda: bool) -> tuple[list[Path], list[str]]:
    """The scripts to run and the skip lines of the user set's scripts not run here."""
    available = sorted(bench.glob("bench_*.py"))
    if only:
        scripts = [s for s in available if any(o in s.stem for o in only)]
        if not scripts:
            names = ", ".join(s.stem.removeprefix("bench_") for s in available) or "none"
            raise CLIError(
                f"--only {' '.join(only)}: no benchmark script's name contains "
                f"{'it' if len(only) == 1 else 'any of these'}; available: {names}"
            )
        return scripts, []
    scripts, skipped = [], []
    for name, gpu, _ in USER_BENCHMARKS:
        if not (bench / name).exists():
            continue
        if gpu and not cuda:
            skipped.append(f"{name}: skipped: needs a CUDA device")
        else:
            scripts.append(bench / name)
    if not scripts and not skipped:
        raise CLIError(f"no benchmark scripts (bench_*.py) found in {bench}")
    return scripts, skipped


def cmd_bench(args) -> int:
    import time

    import torch

    bench = bench_dir()
    if bench is None:
        raise CLIError(
            "the benchmark scripts ship with the source checkout (benchmarks/bench_*.py); "
            "run `videoanchor bench` from a clone of the repository"
        )
    cuda = torch.cuda.is_available()
    scripts, skipped = _bench_scripts(bench, args.only, cuda)
    if args.out:
        out_dir = Path(args.out).resolve()
        out_dir.mkdir(parents=True, exist_ok=True)
    else:
        out_dir = Path(tempfile.mkdtemp(prefix="videoanchor-bench-")).resolve()
    print(f"results go to {out_dir}")
    if cuda:
        print(f"CUDA device: {torch.cuda.get_device_name(0)}")
    else:
        print(
            "No CUDA device: the GPU kernels cannot be timed here; each benchmark runs its CPU "
            "part, and the GPU-only ones say they skip."
        )
    if not args.only:
        print("Benchmarks (the research studies run by name: --only NAME):")
        for name, gpu, what in USER_BENCHMARKS:
            print(f"  {name:<20} {what}{' (GPU)' if gpu else ''}")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(bench.parent), env.get("PYTHONPATH", "")]).rstrip(
        os.pathsep
    )
    env["VIDEOANCHOR_RESULTS_DIR"] = str(out_dir)
    env["PYTHONUNBUFFERED"] = "1"
    failed, took = [], []
    for script in scripts:
        flags = _script_flags(script)
        cmd = [sys.executable, str(script)]
        if args.quick and "--quick" in flags:
            cmd.append("--quick")
        elif args.quick:
            skipped.append(f"{script.name}: has no --quick; ran its default settings")
        if "--out-dir" in flags:
            cmd += ["--out-dir", str(out_dir)]
        print(f"\n== {script.name} ({' '.join(cmd[2:]) or 'default settings'})", flush=True)
        t0 = time.perf_counter()
        # stderr apart: a missing optional extra becomes one skip line, not a traceback
        with tempfile.TemporaryFile("w+", errors="replace") as err:
            proc = subprocess.Popen(cmd, env=env, cwd=str(out_dir), stdout=subprocess.PIPE,
                                    stderr=err, text=True, errors="replace")  # fmt: skip
            for line in proc.stdout:
                print(line, end="", flush=True)
                if _SKIP_LINE.search(line):
                    skipped.append(f"{script.name}: {line.strip()}")
            rc = proc.wait()
            err.seek(0)
            errors = err.read()
        extra = _missing_extra(errors) if rc != 0 else None
        if extra:
            line = f"{script.name}: skipped: needs {extra}"
            print(line, flush=True)
            skipped.append(line)
            rc = 0
        elif errors:
            print(errors, end="" if errors.endswith("\n") else "\n", file=sys.stderr, flush=True)
        took.append((script.name, time.perf_counter() - t0, rc))
        if rc != 0:
            failed.append(f"{script.name} (exit {rc})")
    _print_bench_summary(out_dir)
    print("\n== time per script")
    for name, seconds, rc in took:
        print(f"  {name:<32} {seconds:7.1f} s{'' if rc == 0 else f'  (exit {rc})'}")
    if skipped:
        print("\n== skipped here")
        for line in skipped:
            print(f"  {line}")
    print(f"\nresults in {out_dir}")
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


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got '{text}'") from None
    if not (value > 0 and value < float("inf")):
        raise argparse.ArgumentTypeError(f"expected a positive finite number, got {value}")
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
        from videoanchor.integrations.transformers.registry import FAMILIES
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
    v = p.add_argument_group("visual input (one of --video or --images)")
    v.add_argument("--video", default=None, help="video file (anything FFmpeg/PyAV decodes)")
    v.add_argument(
        "--images",
        nargs="+",
        default=None,
        metavar="IMAGE",
        help="several views of one scene as image files, one request anchored over the image "
        "tokens of all views together (as the paper does on All-Angles-Bench and SPAR-Bench)",
    )
    v.add_argument(
        "--frames",
        type=_positive_int,
        default=None,
        help="frames sampled uniformly over the whole video, first and last included "
        f"(default {DEFAULT_FRAMES}; videos only)",
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
        default=SSC.n_clusters,
        help=f"spectral clusters of SSC (default {SSC.n_clusters}, the paper's)",
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
        default=SSC.pca_rank,
        help="reduce the visual tokens to this rank before SSC (0: no PCA, the paper)",
    )
    a.add_argument(
        "--ssc-max-iter",
        type=_positive_int,
        default=SSC.max_iter,
        help=f"ADMM iteration limit of SSC (default {SSC.max_iter}, the authors')",
    )
    a.add_argument(
        "--ssc-precision",
        choices=PRECISIONS,
        default=SSC.precision,
        help="precision of the fast solver's products: auto (default: fp16x3 on CUDA, full "
        "elsewhere), full (the working dtype), or fp16x3 (float16 tensor cores at about "
        "float32 accuracy; for CUDA, emulated and slower elsewhere)",
    )
    a.add_argument(
        "--ssc-solver",
        choices=SSC_SOLVERS,
        default=SSC.solver,
        help="SSC solver: auto (default: on the CPU the working sets, the SSC program's "
        "certified minimiser, where C is dense the fast solver's answer; on CUDA fast, or "
        "wherever --ssc-max-iter or --ssc-time-budget is set), workset, fast (a fixed "
        "60-iteration schedule whose scores are continuous in the features) or faithful (the "
        "authors' iterate and stopping rule); the plan line says which runs",
    )
    a.add_argument(
        "--ssc-time-budget",
        type=_positive_float,
        default=None,
        metavar="SECONDS",
        help="stop the SSC after about this many seconds at the iterate reached (reported; NOT "
        "the paper's converged answer). Default: none, run to eps or --ssc-max-iter",
    )
    a.add_argument("--seed", type=int, default=SSC.seed, help="seed of the spectral clustering")
    a.add_argument(
        "--label-draws",
        type=_positive_int,
        default=SSC.label_draws,
        help="label draws from one spectral embedding, cluster shares averaged: scores that "
        "depend less on the seed (default 1, the paper's single draw)",
    )
    c = p.add_argument_group("cache (vision features, SSC and labels, reused by later runs)")
    c.add_argument("--cache-dir", default=None,
                   help="cache directory (default $VIDEOANCHOR_CACHE or ~/.cache/videoanchor)")  # fmt: skip
    c.add_argument("--no-cache", action="store_true",
                   help="run the vision encoder and SSC afresh and store nothing")  # fmt: skip
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars or log lines")
    p.add_argument("--debug", action="store_true", help="show the full traceback on errors")  # fmt: skip


def cmd_warmup(args) -> int:
    """Compile the working-set SSC kernels (the lean and the full one) into Numba's cache (or
    load them from there) and run them once, and on a CUDA machine the GPU working sets'
    Triton kernels into Triton's cache (:func:`videoanchor.anchor.warm_up`): a container
    image built with this step starts without the compile."""
    from videoanchor.anchor import warm_up

    for line in warm_up().lines():
        print(f"videoanchor warmup: {line}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The ``videoanchor`` argument parser, with its ``run``, ``anchors`` and ``bench`` commands."""
    fmt = argparse.HelpFormatter
    parser = argparse.ArgumentParser(
        prog="videoanchor",
        description="VideoAnchor for video VLMs: ask a question about a video (or several views "
        "of a scene) with anchored attention, look at which regions became anchors, time the "
        "kernels.",
        epilog=_families_text(),
        formatter_class=fmt,
    )
    from videoanchor._version import __version__

    parser.add_argument("--version", action="version", version=f"videoanchor {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    run = sub.add_parser(
        "run",
        help="answer a question about a video or views, with anchoring (and optionally without)",
        description="Sample frames uniformly (or read the views), run the model with VideoAnchor (greedy decoding) "
        "and print the answer. --compare also runs it without anchoring and prints both answers "
        "with prefill / SSC / decode times.",
        epilog=_families_text(),
        formatter_class=fmt,
    )
    _add_model_args(run)
    run.add_argument(
        "--question", required=True, help="the question to ask about the video or views"
    )
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
        "`grid_labels` are the video's tokens on the model's (time, rows, cols) grid. With "
        "--images each view is drawn with its tokens' scores, and `view_grids` (V, 2) holds "
        "each view's (rows, cols) token grid, `view{k}_scores`, `view{k}_labels` and "
        "`view{k}_columns` view k's maps and prompt columns.",
        epilog=_families_text(),
        formatter_class=fmt,
    )
    _add_model_args(anchors)
    anchors.add_argument("--out", default="anchors.png", help="PNG to write (default anchors.png)")
    anchors.add_argument("--npz", default=None, help="scores file (default: --out with .npz)")
    anchors.add_argument(
        "--question",
        default=None,
        help="text after the video or images in the prompt (SSC does not depend on it; "
        f"default '{DEFAULT_ANCHOR_QUESTION}' or '{DEFAULT_VIEWS_QUESTION}')",
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
        help="frames per row (default min(frames, 4); 8 beyond 16 frames)",
    )
    anchors.add_argument(
        "--page-height",
        type=_positive_int,
        default=2400,
        metavar="PIXELS",
        help="split a long video's picture into pages (PNG files) of at most this height, "
        "each with its own colour bar: OUT.png, OUT-p2.png, ... (default 2400)",
    )
    anchors.add_argument("--tile-width", type=_positive_int, default=240,
                         help="width of one frame in the picture, in pixels (default 240)")  # fmt: skip
    anchors.set_defaults(func=cmd_anchors)

    from videoanchor import tune as _tune

    tune = sub.add_parser(
        "tune",
        help="sweep alpha_K x alpha_V x n_clusters on a dev set (vision encoder and SSC once)",
        description="Answer a JSONL dev set unanchored and under every alpha_K x alpha_V x "
        "n_clusters setting. The vision encoder and SSC run once per item, the labels once per "
        "item and cluster count, the language model once per setting (settings share a "
        "batch); all of it is cached on disk. Writes results.json (accuracy, paired delta and "
        "its bootstrap interval per setting), summary.json and one heat map per cluster count.",
        formatter_class=fmt,
    )
    _tune.add_arguments(tune)
    tune.set_defaults(func=_tune.run_tune)

    bench = sub.add_parser(
        "bench",
        help="time the anchored attention and the anchor scores on this machine",
        description="Run the benchmarks a user wants on this machine (benchmarks/ of the source "
        "checkout): the anchored attention against PyTorch's SDPA, the default anchor scores' "
        "cost and fidelity at two sizes, and with a CUDA device the GPU kernels (decode, paged, "
        "training step). --quick finishes in a few minutes on a 2-core CPU. The research "
        "studies (optimum, schedule, blocked, yaleb, ...) run by name with --only. Results "
        "are JSON files with the device, versions and git SHA, in --out or a new temporary "
        "folder (printed); a benchmark that needs a missing optional extra says so and skips.",
        formatter_class=fmt,
    )
    bench.add_argument("--quick", action="store_true", help="the scripts' short settings")
    bench.add_argument(
        "--out",
        "--out-dir",
        dest="out",
        default=None,
        metavar="DIR",
        help="where the JSON results go (default: a new temporary folder, printed)",
    )
    bench.add_argument(
        "--only",
        nargs="+",
        metavar="NAME",
        help="run the scripts whose name contains one of these instead (e.g. ssc, yaleb)",
    )
    bench.add_argument("--debug", action="store_true", help="show the full traceback on errors")  # fmt: skip
    bench.set_defaults(func=cmd_bench, quiet=False)

    warmup = sub.add_parser(
        "warmup",
        help="compile the SSC kernel into Numba's cache (a container image's build step)",
        description="Compile the working-set SSC kernels (the lean one, for columns without "
        "outlier entries, and the full one) into Numba's cache, or load them from there, and "
        "run them once; prints where the cache is. On a machine with CUDA it also "
        "compiles the GPU working sets' Triton kernel (every level of slots) into Triton's "
        "cache ($TRITON_CACHE_DIR, else ~/.triton/cache). Numba's cache goes to "
        "$NUMBA_CACHE_DIR where set, else beside the package, else (a read-only install) to "
        "the user's cache folder ($XDG_CACHE_HOME/numba or ~/.cache/numba). Run it in an "
        "image's build with the same NUMBA_CACHE_DIR and CPU target as at run time "
        "(docs/serving.md). Without it, importing videoanchor where the cache is empty "
        "starts this compile in a background process (VIDEOANCHOR_PRECOMPILE=0: none).",
        formatter_class=fmt,
    )
    warmup.add_argument("--debug", action="store_true", help="show the full traceback on errors")  # fmt: skip
    warmup.set_defaults(func=cmd_warmup, quiet=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``videoanchor`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command in ("run", "anchors", "tune"):  # the SSC kernel compiled meanwhile (issue 93)
        from videoanchor.anchor.solvers import precompile

        precompile.start("cli")
    from transformers.utils import logging as hf_logging

    bars_were_on = hf_logging.is_progress_bar_enabled()
    if getattr(args, "quiet", False):
        hf_logging.disable_progress_bar()
    import logging
    import warnings

    from videoanchor.anchor.progress import SSCConvergenceWarning

    # SSC progress lines (when stderr is not a terminal) and the outcome of every SSC run
    progress_log = logging.getLogger("videoanchor.progress")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("videoanchor: %(message)s"))
    level = progress_log.level
    if not getattr(args, "quiet", False):
        progress_log.addHandler(handler)
        progress_log.setLevel(logging.INFO)
    try:
        with warnings.catch_warnings():
            # the command reports how SSC ended itself (_report_ssc / the progress reporter)
            warnings.simplefilter("ignore", SSCConvergenceWarning)
            return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("videoanchor: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        if getattr(args, "debug", False):
            raise
        from videoanchor.video import VideoReadError

        if isinstance(err, (PipelineError, FileNotFoundError, VideoReadError)):
            message = _first_line(err)
        else:
            message = f"{type(err).__name__}: {_first_line(err)} (rerun with --debug for details)"
        print(f"videoanchor {args.command}: error: {message}", file=sys.stderr)
        return 1
    finally:
        progress_log.removeHandler(handler)
        progress_log.setLevel(level)
        if bars_were_on:
            hf_logging.enable_progress_bar()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
