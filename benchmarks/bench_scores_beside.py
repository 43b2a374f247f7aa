"""The default anchor scores beside other work on the same GPU (issue 90 step 6;
../shared/docs/GPU-SCORES.md, "Serving: the cost beside other work"): the throughput a
decode-like loop loses while ``compute_anchor_scores`` (default options) runs back to back
beside it, and the scores' own latency there and alone.

- **The plain work** stands in for a server's decode: items of one bf16 GEMV batch each,
  ``(B x 4096) @ (4096 x n_out)`` with B = 16, two weight matrices taken in turn (each
  past the L2 cache), ``n_out`` sized from the device so that an item takes about
  ``--item-us`` (50 µs; 14336 columns, an MLP's up-projection, 117 MB of weights, are
  about 35 µs at an H100's bandwidth: an estimate). Items are issued in steps (one CUDA graph of ``--step-items`` of them, about 2 ms:
  a decode step's launches) on one stream, at most ``--depth`` steps queued ahead, as a
  server that reads each step's tokens before the next.
- **The scores** run in a second thread on a second stream, one call after the other, on
  ``video_tokens`` of Qwen2.5-VL-7B's shape (128 tokens a frame, D = 3584) at 16 frames
  (N = 2048) and 64 (N = 8192), the paper's 24 clusters (``--clusters``; the tokens'
  own ``max(2, frames // 2)`` subspaces, as bench_workset_cuda).
- **Pairs**: plain alone and plain with the scores beside it, the order alternating (alone
  first in the 1st and 3rd pair), then one call of the scores alone; ``--pairs`` (3). The
  plain window spans at least ``--window`` seconds and 3.5 calls of the scores alone, and
  starts after the thread's first call has ended, so the scores run through all of it.
- **Timing**: CUDA events on the plain stream around each step; ``items_per_s`` is the
  items over the window's span (first step's start to last step's end), ``busy_share`` the
  steps' own time over the span (the rest: the stream waiting for the host, e.g. for the
  GIL); the scores' calls by events on their stream, those wholly inside a window counted as
  beside (wall-clock spans). ``loss = 1 - items_per_s beside / alone`` per pair (median
  over the pairs), ``loss_gpu`` the same on the steps' busy time alone (the SMs shared,
  without the host's gaps). Target: loss <= 0.10 at 16 frames.
- **What a stopped run leaves**: the JSON is rewritten after each pair (the row's figures
  over the pairs so far; ``in_progress`` while it runs); an error is its row's own
  (``error``), and one in setting up the plain work is written into every row.

The scores capture CUDA graphs in CUDA's global capture mode, in which another thread's
event query or synchronisation during a capture is refused and breaks the capture: the
plain thread switches itself to the relaxed mode (``cuThreadExchangeStreamCaptureMode``);
``meta.plain_capture_mode`` says whether it did. A server thread beside the scores needs
the same. The scores' stage timings and ``torch.cuda.graph`` synchronise the whole device,
so beside the plain stream each such point also waits for its queued steps (at most
``--depth``): their latency beside includes that, as it would beside a server.

    python benchmarks/bench_scores_beside.py                 # on a GPU; JSON into --out-dir
    python benchmarks/bench_scores_beside.py --quick         # tiny; on the CPU threads alone

``--quick`` on the CPU: small GEMMs and small N, threads without streams, ``perf_counter``
for the events, the same code otherwise; its figures say nothing about a GPU.
"""

from __future__ import annotations

import ctypes
import math
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import (  # noqa: E402
    environment,
    finish,
    parser,
    skip,
    video_tokens,
    write_result,
)

#: name: (visual tokens per frame, hidden size), as bench_workset_cuda.SHAPES
SHAPE = ("Qwen2.5-VL-7B", 128, 3584)
#: issue 90's target: the loss at 16 frames
TARGETS = {16: 0.10}
#: the scores' clusters: the paper's n_clusters (issue 98 item 9); --quick's tiny sets take
#: at most ``max(2, frames // 2)``
CLUSTERS = 24
#: the plain work: batch, hidden size, the columns an item's time is sized from
BATCH, HIDDEN, BASE_OUT = 16, 4096, 14336
#: --quick: (frames, tokens a frame, D) of the scores, and the plain work's sizes
QUICK_SCORES = ((4, 8, 24), (8, 8, 24))
QUICK_PLAIN = dict(batch=4, hidden=64, n_out=256, step_items=8)
#: CU_STREAM_CAPTURE_MODE_RELAXED (cuda.h)
_RELAXED = 2


class Clock:
    """Marks and their distance: CUDA events (timing enabled) recorded on the current
    stream, or ``perf_counter`` readings where the device is the CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def mark(self):
        if not self.cuda:
            return time.perf_counter()
        ev = torch.cuda.Event(enable_timing=True)
        ev.record()
        return ev

    def wait(self, mark) -> None:
        if self.cuda:
            mark.synchronize()

    def seconds(self, a, b) -> float:
        return a.elapsed_time(b) / 1e3 if self.cuda else b - a


def _on(stream):
    """The context that makes ``stream`` current (none on the CPU)."""
    import contextlib

    return torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()


def relax_capture_mode() -> str:
    """This thread's stream-capture mode set to relaxed (its event queries then leave other
    threads' captures alone); the mode it runs in, or why it stays global."""
    try:
        mode = ctypes.c_int(_RELAXED)
        rc = ctypes.CDLL("libcuda.so.1").cuThreadExchangeStreamCaptureMode(ctypes.byref(mode))
    except (OSError, AttributeError) as exc:
        return f"global (cuThreadExchangeStreamCaptureMode not found: {exc})"
    return "relaxed" if rc == 0 else f"global (cuThreadExchangeStreamCaptureMode returned {rc})"


class PlainWork:
    """The decode-like work: ``step()`` issues ``items`` GEMV batches (one CUDA graph on
    CUDA, the matmuls themselves elsewhere) on the current stream."""

    def __init__(self, device, *, batch: int, hidden: int, n_out: int, items: int, seed=0):
        g = torch.Generator().manual_seed(seed)
        make = lambda *s: torch.randn(*s, generator=g).to(device, torch.bfloat16)  # noqa: E731
        self.x = make(batch, hidden)
        self.w = [make(hidden, n_out) / hidden**0.5 for _ in range(2)]
        self.out = torch.empty(batch, n_out, device=device, dtype=torch.bfloat16)
        self.items, self.n_out, self.batch, self.hidden = items, n_out, batch, hidden
        self.graph = None
        if device.type == "cuda":
            self._run()  # cuBLAS's handle and workspace before the capture
            torch.cuda.synchronize(device)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self._run()
            torch.cuda.synchronize(device)

    def _run(self) -> None:
        for i in range(self.items):
            torch.mm(self.x, self.w[i % 2], out=self.out)

    def step(self) -> None:
        if self.graph is not None:
            self.graph.replay()
        else:
            self._run()


def size_plain(device, *, item_us: float, items: int, batch=BATCH, hidden=HIDDEN) -> PlainWork:
    """The plain work with ``n_out`` sized so that an item takes about ``item_us`` alone on
    ``device``: timed at :data:`BASE_OUT` columns, scaled (multiples of 256, at most 4x)."""
    clock = Clock(device)
    probe = PlainWork(device, batch=batch, hidden=hidden, n_out=BASE_OUT, items=items)
    per_item = min(_step_seconds(probe, clock, 5)) / items
    n_out = BASE_OUT * item_us * 1e-6 / per_item
    n_out = int(min(4 * BASE_OUT, max(256, round(n_out / 256) * 256)))
    del probe
    return PlainWork(device, batch=batch, hidden=hidden, n_out=n_out, items=items)


def _step_seconds(work: PlainWork, clock: Clock, reps: int) -> list[float]:
    out = []
    for _ in range(reps):
        a = clock.mark()
        work.step()
        b = clock.mark()
        clock.wait(b)
        out.append(clock.seconds(a, b))
    return out


def plain_window(work: PlainWork, steps: int, depth: int, clock: Clock, stream) -> dict:
    """``steps`` steps of the plain work on ``stream``, at most ``depth`` queued ahead: the
    items a second over the span, and the steps' own time over it."""
    marks = []
    with _on(stream):
        for i in range(steps):
            before = clock.mark()
            work.step()
            marks.append((before, clock.mark()))
            if i >= depth:
                clock.wait(marks[i - depth][1])
        clock.wait(marks[-1][1])
    span = clock.seconds(marks[0][0], marks[-1][1])
    busy = sum(clock.seconds(a, b) for a, b in marks)
    return dict(items_per_s=steps * work.items / span, busy_share=busy / span,
                items_per_busy_s=steps * work.items / busy, span_s=span)  # fmt: skip


class ScoresBeside(threading.Thread):
    """``call`` back to back on ``stream`` in a thread of its own until :meth:`stop`; each
    call's seconds (``clock``) and wall-clock span; ``ready`` once the first call ended."""

    def __init__(self, call, clock: Clock, stream):
        super().__init__(daemon=True)
        self.call, self.clock, self.stream = call, clock, stream
        self.calls: list[tuple[float, float, float]] = []  # (wall start, wall end, seconds)
        self.ready, self._stop_flag = threading.Event(), threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with _on(self.stream):
                while not self._stop_flag.is_set():
                    t0, a = time.perf_counter(), self.clock.mark()
                    self.call()
                    b = self.clock.mark()
                    self.clock.wait(b)
                    self.calls.append((t0, time.perf_counter(), self.clock.seconds(a, b)))
                    self.ready.set()
        except BaseException as exc:  # noqa: BLE001 (reported in the row)
            self.error = exc
            self.ready.set()

    def stop(self) -> None:
        self._stop_flag.set()
        self.join()


def scores_alone(call, clock: Clock, stream) -> float:
    """Seconds of one call of ``call`` on ``stream`` with nothing beside it."""
    with _on(stream):
        a = clock.mark()
        call()
        b = clock.mark()
        clock.wait(b)
    return clock.seconds(a, b)


def measure(work: PlainWork, call, device, *, pairs: int, depth: int, window: float,
            step_s: float, deadline: float = math.inf, on_pair=None) -> dict:  # fmt: skip
    """The pairs (module docstring) for one set of features: per pair the plain work alone
    and beside the scores, the scores alone; their medians and the losses (``on_pair``,
    where given, called with them after each pair)."""
    clock = Clock(device)
    cuda = device.type == "cuda"
    plain_stream = torch.cuda.Stream(device) if cuda else None
    scores_stream = torch.cuda.Stream(device) if cuda else None
    alone_s = [scores_alone(call, clock, scores_stream) for _ in range(2)][-1:]  # (warm)
    span = max(window, 3.5 * alone_s[0])
    steps = max(4 * depth, math.ceil(span / step_s))
    rows = []
    pair_s = 2 * steps * step_s + 3 * alone_s[0]  # a pair's time, until one is measured
    for p in range(pairs):
        t_pair = time.perf_counter()
        if t_pair + pair_s > deadline:
            break
        got = {}
        for kind in ("alone", "beside") if p % 2 == 0 else ("beside", "alone"):
            if kind == "alone":
                got[kind] = plain_window(work, steps, depth, clock, plain_stream)
                continue
            thread = ScoresBeside(call, clock, scores_stream)
            thread.start()
            thread.ready.wait()
            t0 = time.perf_counter()
            if thread.error is None:
                got[kind] = plain_window(work, steps, depth, clock, plain_stream)
            t1 = time.perf_counter()
            thread.stop()
            if thread.error is not None:
                raise RuntimeError(f"the scores beside the plain work: {thread.error!r}")
            inside = [s for a, b, s in thread.calls if a >= t0 and b <= t1]
            got[kind].update(scores_s=inside, scores_calls=len(thread.calls))
        alone_s.append(scores_alone(call, clock, scores_stream))
        a, b = got["alone"], got["beside"]
        rows.append(dict(order=f"{'alone first' if p % 2 == 0 else 'beside first'}",
                         items_per_s_alone=a["items_per_s"], items_per_s_beside=b["items_per_s"],
                         busy_share_alone=a["busy_share"], busy_share_beside=b["busy_share"],
                         loss=1 - b["items_per_s"] / a["items_per_s"],
                         loss_gpu=1 - b["items_per_busy_s"] / a["items_per_busy_s"],
                         window_s=b["span_s"], scores_beside_s=b["scores_s"],
                         scores_calls_beside=b["scores_calls"]))  # fmt: skip
        pair_s = time.perf_counter() - t_pair
        if on_pair is not None and p + 1 < pairs:
            on_pair(_summary(rows, alone_s, steps, depth))
    if not rows:
        return dict(skipped=f"a pair ({pair_s:.1f} s) would end past the run's budget",
                    steps=steps)  # fmt: skip
    return _summary(rows, alone_s, steps, depth)


def _summary(rows: list[dict], alone_s: list[float], steps: int, depth: int) -> dict:
    """The pairs' rows, their medians and losses, the scores' latencies (:func:`measure`)."""
    med = lambda k: statistics.median(r[k] for r in rows)  # noqa: E731
    beside = [s for r in rows for s in r["scores_beside_s"]]
    out = dict(pairs=len(rows), steps=steps, depth=depth, loss=med("loss"),
               loss_gpu=med("loss_gpu"), losses=[r["loss"] for r in rows],
               items_per_s_alone=med("items_per_s_alone"),
               items_per_s_beside=med("items_per_s_beside"),
               busy_share_alone=med("busy_share_alone"),
               busy_share_beside=med("busy_share_beside"),
               scores_ms_alone=1e3 * statistics.median(alone_s[1:] or alone_s),
               scores_ms_alone_samples=[1e3 * s for s in alone_s],
               scores_ms_beside=1e3 * statistics.median(beside) if beside else None,
               scores_ms_beside_samples=[1e3 * s for s in beside],
               pair_rows=rows)  # fmt: skip
    if beside:
        out["scores_beside_over_alone"] = out["scores_ms_beside"] / out["scores_ms_alone"]
    return out


def run(*, quick: bool = False, frames=(16, 64), pairs: int = 3, depth: int = 2,
        window: float = 1.0, item_us: float = 50.0, step_items: int = 40,
        budget: float = math.inf, out_dir=None, clusters: int = CLUSTERS) -> Path | None:  # fmt: skip
    """The rows (module docstring), one per frame count; the JSON rewritten as each ends
    (None, saying so, without CUDA and ``quick``)."""
    from videoanchor.anchor import compute_anchor_scores

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not quick:
        skip("bench_scores_beside", "needs a CUDA device (--quick runs it tiny on the CPU)")
        return None
    started = time.perf_counter()
    meta = environment(str(device))
    meta.update(quick=quick, target=TARGETS, switch_interval_s=sys.getswitchinterval(),
                streams=device.type == "cuda",
                timer="cuda events" if device.type == "cuda" else "perf_counter (CPU)")  # fmt: skip
    if device.type == "cuda":
        meta["plain_capture_mode"] = relax_capture_mode()
    else:
        meta["note"] = "CPU --quick: threads without streams; the figures say nothing of a GPU"
    meta.update(pairs=pairs, window_s=window, budget_s=budget, clusters=clusters)
    sets = [(f, p, d) for f, p, d in QUICK_SCORES] if quick else [(f, SHAPE[1], SHAPE[2])
                                                                  for f in frames]  # fmt: skip
    planned = [dict(model="tiny" if quick else SHAPE[0], frames=f, n=f * per_frame, d=d,
                    clusters=min(clusters, max(2, f // 2)) if quick else clusters,
                    scenes=max(2, f // 2), target=TARGETS.get(f))
               for f, per_frame, d in sets]  # fmt: skip
    rows = []  # those started: the file's
    cols = ["frames", "n", "loss", "loss_gpu", "items_per_s_alone", "items_per_s_beside",
            "busy_share_beside", "scores_ms_alone", "scores_ms_beside", "target", "skipped",
            "error"]  # fmt: skip
    save = lambda: write_result("scores_beside", meta, rows, out_dir)  # noqa: E731
    try:  # the plain work (its CUDA graph, its size from the device's pace)
        if quick:
            work = PlainWork(device, **{k: v for k, v in QUICK_PLAIN.items() if k != "step_items"},
                             items=QUICK_PLAIN["step_items"])  # fmt: skip
            item_us = None
        else:
            work = size_plain(device, item_us=item_us, items=step_items)
        step_s = statistics.median(_step_seconds(work, Clock(device), 5))
    except Exception as exc:  # reported, not hidden: no row runs without the plain work
        for row in planned:
            row["error"] = f"the plain work: {type(exc).__name__}: {exc}"[:300]
        rows[:] = planned
        meta["seconds_total"] = time.perf_counter() - started
        return finish("scores_beside", meta, rows, out_dir, cols)
    meta["plain"] = dict(batch=work.batch, hidden=work.hidden, n_out=work.n_out,
                         dtype="bfloat16", items_per_step=work.items, step_ms=1e3 * step_s,
                         item_us=1e6 * step_s / work.items, item_us_target=item_us,
                         depth=depth, cuda_graph=work.graph is not None)  # fmt: skip
    path = None
    for row, (f, per_frame, d) in zip(planned, sets, strict=True):
        rows.append(row)
        if time.perf_counter() - started > budget:
            row["skipped"] = f"past the run's budget of {budget:g} s"
        else:
            row["in_progress"] = "pairs"

            def pair_done(got, row=row):  # the row over the pairs so far, written
                row.update(got)
                meta["seconds_total"] = time.perf_counter() - started
                save()

            try:
                x = video_tokens(f, per_frame, d, k=row["scenes"], seed=0).to(device)
                call = lambda x=x, k=row["clusters"]: compute_anchor_scores(x, k, progress=False)  # noqa: E731
                save()
                row.update(measure(work, call, device, pairs=pairs, depth=depth, window=window,
                                   step_s=step_s, deadline=started + budget,
                                   on_pair=pair_done))  # fmt: skip
                if row["target"] is not None and "loss" in row:
                    row["meets_target"] = row["loss"] <= row["target"]
            except Exception as exc:  # reported, not hidden
                row["error"] = f"{type(exc).__name__}: {exc}"[:300]
            row.pop("in_progress")
        meta["seconds_total"] = time.perf_counter() - started
        path = finish("scores_beside", meta, rows, out_dir, cols)
    return path


def main(argv=None) -> Path | None:
    ap = parser(__doc__, quick="tiny sizes; on the CPU threads without streams")
    ap.add_argument("--frames", default="16,64", help="frame counts (Qwen2.5-VL-7B's shape)")
    ap.add_argument("--clusters", type=int, default=CLUSTERS,
                    help="the scores' n_clusters (the paper's 24; --quick: at most frames / 2)")  # fmt: skip
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--depth", type=int, default=2, help="plain steps queued ahead, at most")
    ap.add_argument(
        "--window",
        type=float,
        default=None,
        help="seconds of plain work a window, at least (and 3.5 calls of the "
        "scores); 1, or 0.2 with --quick",
    )
    ap.add_argument("--item-us", type=float, default=50.0, help="an item's time alone, about")
    ap.add_argument("--step-items", type=int, default=40, help="items a step (one CUDA graph)")
    ap.add_argument(
        "--budget",
        type=float,
        default=math.inf,
        help="seconds: a frame count that would start later, or a pair that would "
        "end later (as long as the last), is not run",
    )
    args = ap.parse_args(argv)
    for name in ("pairs", "depth", "step_items", "clusters"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')}: expected at least 1, got {getattr(args, name)}")
    return run(quick=args.quick, frames=[int(f) for f in args.frames.split(",") if f],
               pairs=args.pairs, depth=args.depth,
               window=args.window if args.window is not None else (0.2 if args.quick else 1.0),
               item_us=args.item_us,
               step_items=args.step_items, budget=args.budget, out_dir=args.out_dir,
               clusters=args.clusters)  # fmt: skip


if __name__ == "__main__":
    main()
