"""A whole request: ``model.generate`` on a random-weight Qwen2.5-VL, anchored against plain.

What a user of ``generate`` pays for anchoring (issue 92, item 4). One model object, three
providers, each request timed end to end and cut into its parts by forward hooks:

  plain           transformers' SDPA everywhere, VideoAnchor off (what a user gets today)
  anchored        attn_implementation="videoanchor_triton", VideoAnchor on with the default
                  scores (SSC on the projector output inside the prefill, then the gates)
  anchored_given  the same, the scores given: the handle's ``cache`` hands back the scores
                  of this video's last default run, so no SSC runs and only the gates cost

Parts of a request (milliseconds; they add up to ``total_ms``):

  setup_ms    ``generate``'s own work before the first forward (the vision tower excluded)
  vision_ms   the vision tower (forward pre- and post-hooks on ``model.model.visual``; in
              transformers 5.24 ``generate`` runs it before the first forward, as
              ``mm_encoder_outputs``; ``vision_in_first_forward`` says where it ran)
  scores_ms   the scores step: from a language-model pre-hook placed before VideoAnchor's
              (which scores the prompt and makes the gates) to one placed after it
  prefill_ms  the rest of the first forward (embedding, the decoder layers, the last
              token's logits)
  decode_ms   from the end of the first forward to the end of the forward that makes the
              last counted token
  prompt_ms   vision + scores + prefill (not added to the total again)

On CUDA every boundary above is synchronised (``torch.cuda.synchronize``); the decode
steps in between are not, so they keep the host/device overlap ``generate`` has. On the
CPU the host clock alone. Each request generates ``max(--tokens)`` tokens
(``min_new_tokens`` with it, so that no end of sequence stops it early): the row of a
smaller count is the same request timed at its N-th token (the forward that makes it
ends there), not a separate, shorter request. Frame counts run one after the other;
within one, a warm-up request of each provider (two new tokens), then ``--reps`` rounds
of the three providers in turn (interleaved); the rows hold the medians and every round's
total (``totals_ms``). ``vs_plain`` is a row's median total over plain's at the same frames
and tokens; ``prompt_vs_plain`` the same for ``prompt_ms``.

``--providers`` runs a subset (``anchored_given`` needs ``anchored``, whose scores it is
given). A provider's failing request is its own: its rows carry the ``error`` (and the
rounds it finished before), the other providers run on; a model that cannot be built gives
a file with that error. The file is rewritten after the warm-up and after each round (the
medians over the rounds so far, ``rounds``), so a run stopped by a time limit keeps them.

    python benchmarks/bench_request.py             # CUDA: the 7B model (28 layers, the real
                                                   # vision tower), 16 and 64 frames of
                                                   # 448 x 448, 16 and 256 new tokens
    python benchmarks/bench_request.py --tiny      # CPU: the tiny model, 4 and 8 frames,
                                                   # 4 and 8 new tokens (a smoke test)
Without CUDA ``--tiny`` is implied. The tiny figures time nothing a user runs.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(1, str(ROOT / "tests"))
# A no-op where torchvision loads (the GPU machine); on a CPU machine with a CUDA-only
# torchvision wheel it lets transformers' Qwen2.5-VL modules import (tests/torchvision_shim.py).
import torchvision_shim  # noqa: E402

torchvision_shim.apply()
import videoanchor  # noqa: E402
from benchmarks.bench_integration import (  # noqa: E402
    QWEN25_VL_7B_TEXT,
    QWEN25_VL_7B_VISION,
    TINY_TEXT,
    TINY_VISION,
    build_model,
    make_inputs,
)
from benchmarks.common import environment, finish, parser, write_result  # noqa: E402
from videoanchor.integrations.transformers import find_handle  # noqa: E402

PROVIDERS = ("plain", "anchored", "anchored_given")
PARTS = ("setup_ms", "vision_ms", "scores_ms", "prefill_ms", "decode_ms")
#: Qwen2.5-VL-7B's vision tower: 32 blocks, full attention in blocks 7, 15, 23 and 31 (the
#: others windowed), as its released config has them.
VISION_7B = dict(depth=32, fullatt_block_indexes=[7, 15, 23, 31])


class GivenScores:
    """A handle ``cache`` (``anchor_result(features, n_clusters, config, progress)``) that
    returns the scores of an earlier default run of the same video: the anchored request
    without its SSC. ``calls`` counts the samples it served."""

    def __init__(self, results):
        self.results = list(results)
        self.calls = 0

    def anchor_result(self, features, n_clusters, config, progress=False):
        for res in self.results:
            if res is not None and res.scores.shape[0] == features.shape[0]:
                self.calls += 1
                return res
        raise RuntimeError(f"no given scores for {features.shape[0]} visual tokens")


class RequestClock:
    """Forward hooks that time one ``generate`` call's parts (see the module docstring).
    ``marks`` holds the forward counts (1: the prefill) after which to read the clock."""

    def __init__(self, model, cuda: bool):
        self.cuda = cuda
        base = model.model
        self.hooks = [
            model.register_forward_pre_hook(self._forward_start),
            model.register_forward_hook(self._forward_end),
            base.visual.register_forward_pre_hook(lambda *a: self._mark("vision_start")),
            base.visual.register_forward_hook(lambda *a: self._mark("vision_end")),
            # before VideoAnchor's language-model pre-hook (installed by configure) ...
            base.language_model.register_forward_pre_hook(
                lambda *a: self._mark("scores_start"), prepend=True
            ),
        ]
        self.base = base
        self.after = None
        self.reset(())

    def place_after_videoanchor(self) -> None:
        """... and one after it: call once VideoAnchor's hooks are installed."""
        if self.after is None:
            self.after = self.base.language_model.register_forward_pre_hook(
                lambda *a: self._mark("scores_end")
            )
            self.hooks.append(self.after)

    def reset(self, marks) -> None:
        self.t = {}
        self.forwards = 0
        self.marks = set(marks)

    def _now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def _mark(self, name: str) -> None:
        if name not in self.t:  # once a request (the decode steps' language-model calls: no)
            self.t[name] = self._now()

    def _forward_start(self, *args):
        self.forwards += 1
        if self.forwards == 1:
            self.t["first_start"] = self._now()

    def _forward_end(self, *args):
        if self.forwards == 1:
            self.t["first_end"] = self._now()
        if self.forwards in self.marks:
            self.t[f"after_{self.forwards}"] = self._now()

    def parts(self, start: float, tokens: int) -> dict:
        """The parts (ms) of the request started at ``start``, up to its ``tokens``-th token."""
        t = self.t
        ms = lambda a, b: 1e3 * (t[b] - t[a])  # noqa: E731
        vision = ms("vision_start", "vision_end") if "vision_end" in t else 0.0
        scores = ms("scores_start", "scores_end") if "scores_end" in t else 0.0
        # transformers 5.24's generate runs the vision tower before the first forward
        # (mm_encoder_outputs); older ones inside it
        early = "vision_start" in t and t["vision_start"] < t["first_start"]
        end = t[f"after_{tokens}"]
        return {
            "total_ms": 1e3 * (end - start),
            "setup_ms": 1e3 * (t["first_start"] - start) - (vision if early else 0.0),
            "vision_ms": vision,
            "scores_ms": scores,
            "prefill_ms": ms("first_start", "first_end") - scores - (0.0 if early else vision),
            "decode_ms": 1e3 * (end - t["first_end"]),
            "vision_in_first_forward": not early,
        }

    def remove(self) -> None:
        for h in self.hooks:
            h.remove()


def use(model, provider: str, n_clusters: int | None, given=None):
    """Switches the one model to ``provider``; returns the VideoAnchor handle (None: plain)."""
    if provider == "plain":
        model.set_attn_implementation("sdpa")
        if find_handle(model) is not None:
            videoanchor.configure(model, enabled=False)
        return None
    model.set_attn_implementation("videoanchor_triton")
    options = {} if n_clusters is None else {"n_clusters": n_clusters}
    handle = videoanchor.configure(model, enabled=True, **options)
    handle.cache = given if provider == "anchored_given" else None
    return handle


def run_request(model, inputs, clock, tokens: list[int], cuda: bool) -> list[dict]:
    """One ``generate`` of ``max(tokens)`` new tokens; its parts at each count of ``tokens``."""
    n = max(tokens)
    clock.reset(tokens)
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False)
    made = out.shape[1] - inputs["input_ids"].shape[1]
    if made != n:
        raise RuntimeError(f"generate made {made} new tokens, expected {n}")
    return [clock.parts(start, k) for k in tokens]


def _error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:300]


def run_frames(model, clock, frames: int, args, cuda: bool, device, dtype, save=None) -> list[dict]:
    """The rows of one frame count (module docstring); ``save(rows)``, where given, after the
    warm-up and after each round with the rows over the rounds so far."""
    providers = list(getattr(args, "providers", PROVIDERS))
    inputs, n_visual = make_inputs(model, frames, args.side, 16, 32, device, dtype)
    prompt = int(inputs["input_ids"].shape[1])
    given = GivenScores([])
    times = {p: [] for p in providers}  # per provider: one list of parts per round
    facts = {p: {} for p in providers}  # per provider: what its last request did
    errors = {}  # per provider: its first error

    def one(provider, tokens):
        handle = use(model, provider, args.n_clusters, given)
        if handle is not None:
            clock.place_after_videoanchor()
        calls = given.calls
        got = run_request(model, inputs, clock, tokens, cuda)
        if handle is None:
            return got
        facts[provider]["anchored"] = bool(handle.last_anchored)
        if provider == "anchored":
            given.results = list(handle.last_result)  # the next given run's scores
            res = next((r for r in handle.last_result if r is not None), None)
            if res is not None:
                facts[provider].update(
                    ssc_backend=res.backend, ssc_solver=res.solver, ssc_mode=res.mode,
                    ssc_iterations=int(res.iterations), ssc_converged=bool(res.converged),
                )  # fmt: skip
        else:
            facts[provider]["given_scores_used"] = given.calls > calls
        return got

    def attempt(provider, tokens):  # a failing request is its provider's alone
        if provider in errors:
            return None
        try:
            return one(provider, tokens)
        except Exception as exc:  # reported, not hidden
            errors[provider] = _error(exc)
            print(f"{provider} at {frames} frames: {errors[provider]}", flush=True)
            if cuda:  # an asynchronous error surfaces here, not in the next provider
                try:
                    torch.cuda.synchronize()
                except Exception as late:  # noqa: BLE001 (the context is lost: said)
                    errors[provider] += f"; then {_error(late)}"
            return None

    def rows_now(rounds_done: int) -> list[dict]:
        rows = []
        for i, n_tokens in enumerate(args.tokens):
            plain = None
            for provider in providers:
                rounds = [r[i] for r in times[provider]]
                row = {
                    "frames": frames, "visual_tokens": n_visual, "prompt_tokens": prompt,
                    "new_tokens": n_tokens, "provider": provider, "rounds": len(rounds),
                    "rounds_run": rounds_done,
                }  # fmt: skip
                if provider in errors:
                    row["error"] = errors[provider]
                if rounds:
                    for key in ("total_ms", *PARTS):
                        row[key] = statistics.median(r[key] for r in rounds)
                    row["vision_in_first_forward"] = rounds[0]["vision_in_first_forward"]
                    row["totals_ms"] = [r["total_ms"] for r in rounds]
                    row["prompt_ms"] = row["vision_ms"] + row["scores_ms"] + row["prefill_ms"]
                    if provider == "plain":
                        plain = row
                    if plain is not None:
                        row["vs_plain"] = row["total_ms"] / plain["total_ms"]
                        row["prompt_vs_plain"] = row["prompt_ms"] / plain["prompt_ms"]
                row.update(facts[provider])
                rows.append(row)
        return rows

    for provider in providers:  # warm-up: kernels compiled, the given provider's scores
        attempt(provider, [2])
    if save is not None:
        save(rows_now(0))
    for r in range(args.reps):
        for provider in providers:
            got = attempt(provider, args.tokens)
            if got is not None:
                times[provider].append(got)
        if save is not None and r + 1 < args.reps:
            save(rows_now(r + 1))
    rows = rows_now(args.reps)
    for row in rows:
        print({k: row.get(k) for k in ("frames", "new_tokens", "provider", "total_ms",
                                       "vs_plain", "error")}, flush=True)  # fmt: skip
    return rows


def main(argv=None):
    p = parser(__doc__.split("\n")[0], device=True)
    p.add_argument("--tiny", action="store_true", help="the tiny model (default without CUDA)")
    p.add_argument("--frames", default=None, help="frame counts, comma-separated "
                   "(default 16,64; tiny 4,8)")  # fmt: skip
    p.add_argument("--tokens", default=None, help="new-token counts, comma-separated "
                   "(default 16,256; tiny 4,8)")  # fmt: skip
    p.add_argument("--side", type=int, default=None, help="frame side in pixels (448; tiny 56)")
    p.add_argument("--layers", type=int, default=None, help="decoder layers (28; tiny 2)")
    p.add_argument("--vision-layers", type=int, default=None, help="vision blocks (32; tiny 1)")
    p.add_argument("--reps", type=int, default=3, help="interleaved rounds (medians)")
    p.add_argument("--providers", default=",".join(PROVIDERS),
                   help=f"comma-separated, of {', '.join(PROVIDERS)} (default: all)")  # fmt: skip
    p.add_argument("--n-clusters", type=int, default=None,
                   help="VideoAnchor's n_clusters (default: configure's; tiny 4)")  # fmt: skip
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--budget", type=float, default=None,
                   help="seconds: a frame count that would start past it is written as not "
                   "run (the file is rewritten after each frame count)")  # fmt: skip
    args = p.parse_args(argv)
    args.providers = [x for x in args.providers.split(",") if x]
    bad = sorted(set(args.providers) - set(PROVIDERS))
    if bad or not args.providers:
        p.error(f"--providers: expected some of {', '.join(PROVIDERS)}, got {bad or 'none'}")
    if "anchored_given" in args.providers and "anchored" not in args.providers:
        p.error("--providers: anchored_given needs anchored (its scores are anchored's)")
    args.providers = [x for x in PROVIDERS if x in args.providers]  # (the order they need)
    cuda = torch.cuda.is_available() and args.device != "cpu"
    if not cuda and not args.tiny:
        print("no CUDA device: the tiny model on the CPU (its figures time nothing a user runs)")
        args.tiny = True
    device = "cuda" if cuda else "cpu"
    dtype = getattr(torch, args.dtype) if cuda else torch.float32
    tiny = args.tiny
    args.frames = [int(x) for x in (args.frames or ("4,8" if tiny else "16,64")).split(",")]
    args.tokens = sorted(int(x) for x in (args.tokens or ("4,8" if tiny else "16,256")).split(","))
    args.side = args.side or (56 if tiny else 448)
    layers = args.layers or (2 if tiny else 28)
    vision_layers = args.vision_layers or (1 if tiny else VISION_7B["depth"])
    if tiny and args.n_clusters is None:
        args.n_clusters = 4
    text, vision = (TINY_TEXT, TINY_VISION) if tiny else (QWEN25_VL_7B_TEXT, QWEN25_VL_7B_VISION)
    fullatt = (
        None if tiny or vision_layers != VISION_7B["depth"] else VISION_7B["fullatt_block_indexes"]
    )
    meta = environment(device)
    import transformers

    meta.update(
        transformers=transformers.__version__, command=" ".join(sys.argv),
        model="qwen2.5-vl-tiny" if tiny else "qwen2.5-vl-7b-dims (random weights)",
        decoder_layers=layers, vision_layers=vision_layers, dtype=str(dtype).removeprefix("torch."),
        side=args.side, reps=args.reps, synchronised=cuda, providers=args.providers,
        attention_backend="triton" if cuda else "torch (CPU)",
    )  # fmt: skip
    cols = ["frames", "new_tokens", "provider", "total_ms", *PARTS, "vs_plain",
            "prompt_vs_plain", "error"]  # fmt: skip
    start = time.perf_counter()
    try:
        model = build_model(text, vision, layers, vision_layers, dtype, device, fullatt=fullatt)
    except Exception as exc:  # reported, not hidden: a file that says so
        meta["error"] = f"building the model: {_error(exc)}"
        rows = [{"frames": f, "error": meta["error"]} for f in args.frames]
        return finish("request", meta, rows, args.out_dir, cols)
    meta["seconds_build"] = time.perf_counter() - start
    clock = RequestClock(model, cuda)
    rows = []
    try:
        for frames in args.frames:
            spent = time.perf_counter() - start
            if args.budget is not None and spent > args.budget:
                rows.append({"frames": frames, "not_run": f"past the budget ({spent:.0f} s "
                             f"of {args.budget:.0f} s)"})  # fmt: skip
                continue
            done = list(rows)
            save = lambda now, done=done: write_result("request", meta, done + now, args.out_dir)  # noqa: E731
            try:
                rows += run_frames(model, clock, frames, args, cuda, device, dtype, save)
            except Exception as exc:  # (the inputs, the hooks): the frame count's own error
                rows.append({"frames": frames, "error": _error(exc)})
            meta["seconds_total"] = time.perf_counter() - start
            write_result("request", meta, rows, args.out_dir)  # kept should a cap stop us
            if cuda:
                torch.cuda.empty_cache()
    finally:
        clock.remove()
    return finish("request", meta, rows, args.out_dir, cols)


if __name__ == "__main__":
    main()
