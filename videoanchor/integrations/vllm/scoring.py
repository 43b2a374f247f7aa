"""One request's anchor scores: what its SSC runs over, the SSC itself and the engine's score
cache. Both of vLLM's model runners (:mod:`.runner`, :mod:`.runner_v2`) score a request in
the step that first reaches its visual tokens, and :mod:`.ahead` scores it beside the steps;
all three run the same :func:`plan` and :func:`run_ssc`, so the scores are the same
wherever they were computed. :func:`run_ssc` scores through the engine-neutral step that
the transformers integration takes too
(:func:`videoanchor.integrations.request_scores.score_request`).

Each process remembers its latest SSC runs (:class:`SSCRun`: which request, where, how long,
which solver, how many iterations) for the requests' log lines (:func:`report`):
:func:`runs` reads them, :func:`record_run` adds one and :func:`reset_runs` forgets them."""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch

from videoanchor.integrations.options import AnchorConfig, clusters_for, ssc_kwargs, ssc_plan
from videoanchor.integrations.request_scores import score_request
from videoanchor.integrations.score_cache import ScoreCache, score_key
from videoanchor.integrations.vllm import metrics
from videoanchor.integrations.vllm.config import engine_config, score_cache_bytes
from videoanchor.integrations.vllm.families import projector_columns

logger = logging.getLogger("videoanchor.vllm")
_warned: set[str] = set()


@dataclass(frozen=True)
class Failure:
    """The outcome of a request whose scores could not be computed: ``message`` says why.
    It fails that request alone (vLLM's ``FINISHED_ERROR``: the client gets an error), never
    the engine. Picklable: relayed between tensor-parallel ranks like scores."""

    message: str


class ScoringError(RuntimeError):
    """Raised where a request's scores are needed and its scoring failed (:class:`Failure`)."""


#: ``encoder_outputs(req_id, indices)``: the encoder outputs of the request's items
#: ``mm_features[i]`` for i in ``indices`` (one tensor per item, rows = its embedding
#: positions), encoding the ones not in the runner's encoder cache without keeping them.
EncoderOutputs = Callable[[str, list[int]], list]


def projector_only(encoder_outputs: EncoderOutputs, hf_config) -> EncoderOutputs:
    """``encoder_outputs`` keeping only the projector output columns of each item, for a
    family whose vLLM encoder output also carries other features (Qwen3-VL's deepstack,
    :func:`.families.projector_columns`); ``encoder_outputs`` itself for the others.
    ``hf_config``: the engine's ``model_config.hf_config``."""
    cols = projector_columns(hf_config)
    if cols is None:
        return encoder_outputs
    levels = len(getattr(hf_config.vision_config, "deepstack_visual_indexes", None) or [])
    width = cols * (1 + levels)

    def sliced(req_id: str, indices: list[int]) -> list:
        outs = encoder_outputs(req_id, indices)
        for enc in outs:
            if not torch.is_tensor(enc) or enc.ndim != 2 or enc.shape[-1] != width:
                raise RuntimeError(
                    f"videoanchor: expected {hf_config.model_type} encoder outputs of "
                    f"{width} columns ({cols} projector + {levels} deepstack x {cols}), got "
                    f"shape {tuple(getattr(enc, 'shape', ()))}; this model's multimodal "
                    "outputs are not supported (multimodal pruning on?)"
                )
        return [enc[:, :cols] for enc in outs]

    return sliced


def _warn_once(key: str, message: str) -> None:
    """``message`` at WARNING the first time ``key`` is warned in this process, then at
    DEBUG (a setting the operator chose would say the same for every request)."""
    logger.log(logging.DEBUG if key in _warned else logging.WARNING, message)
    _warned.add(key)


def scored_items(mm_features, cfg: AnchorConfig) -> list[int]:
    """Indices into ``mm_features`` of the items SSC scores, in prompt order."""
    idx = [i for i, f in enumerate(mm_features) if f.modality in cfg.tokens]
    return sorted(idx, key=lambda i: mm_features[i].mm_position.offset)


def _positions(feature) -> torch.Tensor:
    """The prompt positions of one item's embeddings."""
    pos = feature.mm_position
    idx = pos.offset + torch.arange(pos.length)
    return idx if pos.is_embed is None else idx[pos.is_embed.cpu()]


@dataclass
class Plan:
    """What one request's joint SSC runs over: its scored ``items`` (indices into
    ``mm_features``, prompt order), their embedding positions ``cols``, ``n`` visual tokens,
    the cluster count ``k`` and the score cache ``key``."""

    items: list[int]
    cols: list[torch.Tensor]
    n: int
    k: int
    key: str


def plan(mm_features, cfg: AnchorConfig, req_id: str | None = None) -> Plan | None:
    """The :class:`Plan` of a request with items ``mm_features`` under ``cfg``, or None
    (fewer than 3 visual tokens: unanchored). With ``req_id`` (the step's call) a request
    with fewer than 3 visual tokens, or fewer than ``n_clusters``, is warned naming it
    (WARNING the first time in the process, then DEBUG)."""
    items = scored_items(mm_features, cfg)
    cols = [_positions(mm_features[i]) for i in items]
    n = sum(c.numel() for c in cols)
    later = "; later requests like it are logged at DEBUG"
    if n < 3:
        if req_id is not None:
            _warn_once("tiny", f"videoanchor: request {req_id} has only {n} visual tokens; SSC "
                       f"needs at least 3, so its scores are 0 (unanchored){later}")  # fmt: skip
        return None
    k = clusters_for(n, cfg)
    if k < cfg.n_clusters and req_id is not None:
        _warn_once("clusters", f"videoanchor: request {req_id} has {n} visual tokens, fewer "
                   f"than n_clusters={cfg.n_clusters}; using n_clusters={k} for it{later}")  # fmt: skip
    key = score_key([mm_features[i].identifier for i in items], k, cfg)
    return Plan(items, cols, n, k, key)


def check_outputs(req, items, cols, outs) -> None:
    """Raises RuntimeError unless ``outs`` holds one encoder output per scored item, with
    as many rows as the item has embedding positions (``cols``)."""
    for i, enc, idx in zip(items, outs, cols, strict=True):
        if not torch.is_tensor(enc) or enc.shape[0] != idx.numel():
            raise RuntimeError(
                f"videoanchor: the {req.mm_features[i].modality} item of request "
                f"{req.req_id!r} has {idx.numel()} embedding positions but its encoder output "
                f"has shape {tuple(getattr(enc, 'shape', ()))}; this model's multimodal "
                "outputs are not supported"
            )


def run_ssc(req, cfg, items, cols, n, k, encoder_outputs, cache, key,
            group=None, progress=None, where="step") -> torch.Tensor:  # fmt: skip
    """SSC over the encoder outputs of the request's scored ``items``: (n,) float32 scores
    on the CPU, stored in ``cache``. ``group``: a process group whose ranks all call this at
    once with the same features; the SSC's columns are split over them (every rank gets the
    same scores). ``progress``: an :class:`~videoanchor.anchor.progress.SSCProgress` the
    solver reports its iterations to (None: a silent one). Its work is bounded by counted
    iterations (``max_iter``), never by time, so the scores do not depend on the load.

    ``where`` the run happens, for the operator's series (:mod:`.metrics`) and the request's
    log line (:func:`report`): ``"ahead"`` of the request's step or in the ``"step"``. A
    warning raised meanwhile goes to the plugin's logger naming the request."""
    encoding = [0.0]

    def timed(rid, indices):  # the encoder's time is not the SSC's
        t0 = time.perf_counter()
        try:
            return encoder_outputs(rid, indices)
        finally:
            encoding[0] += time.perf_counter() - t0

    # one run per request: the rank that runs it ahead, or rank 0 of the ranks that all run it
    counted = (group is None and (where == "ahead" or metrics.tp_rank() == 0)) or (
        group is not None and torch.distributed.get_rank(group) == 0
    )
    t0 = time.perf_counter()
    with metrics.scoring(req.req_id) as held:  # (a failure is counted once, by the caller)
        visual, res = _ssc(req, cfg, items, cols, n, k, timed, cache, key, group, progress)
        if not res.converged:  # a flat iterate is the limit's doing, not the video's
            held[:] = [w for w in held if "row sums agree" not in str(w[0])]
    seconds = time.perf_counter() - t0 - encoding[0]
    record_run(key, SSCRun(req.req_id, where, seconds, res.solver, res.iterations,
                           res.converged, res.gap, res.cluster_share, res.share_weight,
                           res.mode))  # fmt: skip
    if counted:
        metrics.count("videoanchor_ssc_runs", where=where)
        metrics.observe("videoanchor_ssc_seconds", seconds, where=where)
        metrics.observe("videoanchor_ssc_visual_tokens", n, where=where)
    return visual


class SSCRun(NamedTuple):
    """One SSC run of this process, as :func:`report` tells it: the request it ran for
    (``req_id``), ``where`` (``"ahead"`` of the request's step or in the ``"step"``), its
    ``seconds`` (the solver only), the ``solver`` that ran, its ``iterations``, whether
    it ``converged``, the relative duality gap of the ``C`` it returned (``gap``; None
    where the solver computed none), the cluster share that ran with the paper's share's
    weight in it (``cluster_share``, ``share_weight``: the result's record, issue 91) and the
    SSC's ``mode`` (``"blocked"``: by column blocks, past the exact limit or asked for; the
    ``"workset"`` solver there is the working sets by blocks, issue 99); None where not
    given."""

    req_id: str
    where: str
    seconds: float
    solver: str
    iterations: int
    converged: bool
    gap: float | None = None
    cluster_share: str | None = None
    share_weight: float | None = None
    mode: str | None = None


#: How many SSC runs this process remembers (:func:`runs`), the oldest forgotten first.
KEEP_RUNS = 1024
_RUNS: OrderedDict[str, SSCRun] = OrderedDict()
_lock = threading.Lock()


def record_run(key: str, run: SSCRun) -> None:
    """Remembers ``run`` as the SSC run of score key ``key`` (the latest run of a key
    replaces the one before, in its place; beyond :data:`KEEP_RUNS` keys the first recorded
    is forgotten). :func:`run_ssc` records each run it makes; the log line of a request
    whose scores have that key (:func:`report`) names it."""
    with _lock:
        _RUNS[key] = run
        while len(_RUNS) > KEEP_RUNS:
            _RUNS.popitem(last=False)


def runs() -> dict[str, SSCRun]:
    """The SSC runs this process remembers, by score key, in the order the keys were first
    recorded (a copy): e.g. which solver each ran, in a worker (``collective_rpc``) or in a
    test."""
    with _lock:
        return dict(_RUNS)


def reset_runs() -> None:
    """Forget this process's SSC runs (as :func:`.metrics.reset_counts` forgets its counts):
    a request's log line then says its scores' run was on another tensor-parallel rank,
    until a run with its key is recorded again. For tests and tools."""
    with _lock:
        _RUNS.clear()


def report(req_id: str, p: Plan, from_cache: bool, cache) -> None:
    """The one INFO line of a scored request (in the step that takes its scores; tensor-
    parallel rank 0 only), and its score-cache hit or miss (:mod:`.metrics`): its visual
    tokens, where its scores came from (the score cache, or the SSC run ahead of its step or
    in it, for it or for an identical request, with its seconds, solver and iterations) and
    the engine's score-cache counts so far."""
    if metrics.tp_rank() != 0:
        return
    if cache is not None:
        metrics.count("videoanchor_score_cache_hits" if from_cache else
                      "videoanchor_score_cache_misses")  # fmt: skip
    with _lock:
        run = None if from_cache else _RUNS.get(p.key)
    if from_cache:
        how = "scores from the score cache (no SSC)"
    elif run is None:
        how = "SSC run on another tensor-parallel rank"
    else:
        rid, where, seconds, solver, iterations, converged, gap, share, weight, mode = run
        how = (f"SSC {seconds:.2f} s, {solver} solver"
               f"{' by column blocks' if mode == 'blocked' else ''}, {iterations} iterations"
               f"{'' if converged else ' (NOT converged)'}"
               f"{'' if gap is None else f', duality gap {gap:.2g}'}"
               f"{'' if share is None else f', {share} cluster share'}"
               f"{f' (weight {weight:.2g})' if share == 'steady' and weight is not None else ''}, "
               f"{'ahead of its step' if where == 'ahead' else 'in its step'}"
               f"{'' if rid == req_id else f' (for request {rid}, same items and options)'}")  # fmt: skip
    if cache is None:
        summary = "no score cache"
    else:
        counts = metrics.snapshot()  # this process's: one engine's worker
        hits, misses = (sum(v for _, v in counts.get(f"videoanchor_score_cache_{kind}", []))
                        for kind in ("hits", "misses"))  # fmt: skip
        summary = (
            f"score cache {'hit' if from_cache else 'miss'} (engine: {hits:.0f} hits, "
            f"{misses:.0f} misses, "
            f"{len(cache)} entries, {cache.bytes / 2**20:.2f} of {cache.max_bytes / 2**20:.0f} "
            f"MiB, {cache.stats['evictions']} evictions)"
        )
    logger.info("videoanchor: request %s: %d visual tokens, %d clusters: %s; %s",
                req_id, p.n, p.k, how, summary)  # fmt: skip


#: Where an operator or a client raises ``max_iter`` (the not-converged line says it).
MAX_ITER_SETTING = ("additional_config['videoanchor']['max_iter'] (and request_limits) or the "
                    "request's videoanchor_max_iter")  # fmt: skip


def _ssc(req, cfg, items, cols, n, k, encoder_outputs, cache, key, group, progress):
    outs = encoder_outputs(req.req_id, items)
    check_outputs(req, items, cols, outs)
    feats = torch.cat(outs)
    # No progress lines (their advice names the CLI's flags); an SSC that stops before eps
    # is logged at WARNING naming the request (request_scores.unconverged_message).
    res, _ = score_request(feats, k, cfg, progress=progress, process_group=group,
                           subject=f"request {req.req_id}", max_iter_setting=MAX_ITER_SETTING,
                           warn=logger.warning)  # fmt: skip
    visual = res.scores.detach().to("cpu", torch.float32)
    if cache is not None:
        cache.put(key, visual)
    return visual, res


#: Tokens and dimensions of :func:`warm_up`'s random features.
WARM_UP_SHAPE = (16, 8)


def warm_up(worker) -> str | None:
    """``collective_rpc`` target at an anchored engine's start, after vLLM's own warm-up: one
    SSC of random features (:data:`WARM_UP_SHAPE`) with the engine's options on the model
    runner's device, so that what a process's first solve loads does not fall on the first
    request (the working-set kernel: compiled by Numba with an empty cache, loaded from it
    otherwise, docs/serving.md; a GPU's solver libraries). An INFO line before it says what
    it may compile, one after it its seconds and whether the kernel was compiled or loaded.
    Returns the solver that ran, also kept on the runner with its seconds (None: the
    runner's engine is not anchored). A failure is logged, not raised: the requests meet
    it, each failing with its own message."""
    import warnings

    runner = worker.model_runner
    cfg = engine_cfg_of(runner)
    if cfg is None:
        return None
    logger.info("videoanchor: warming the SSC up before the first request; where it runs the "
                "working-set solver with an empty Numba cache, this compiles the SSC kernel, "
                "once per cache (the time measured is in docs/serving.md); set NUMBA_CACHE_DIR "
                "to a kept directory to keep it")  # fmt: skip
    t0 = time.perf_counter()
    x = torch.randn(*WARM_UP_SHAPE, generator=torch.Generator().manual_seed(0))
    try:
        from videoanchor.anchor import compute_anchor_scores
        from videoanchor.anchor import warm_up as warm_kernels

        with warnings.catch_warnings():  # (random features: nothing a request would see)
            warnings.simplefilter("ignore")
            res = compute_anchor_scores(x.to(runner.device), 2, **ssc_kwargs(cfg),
                                        progress=False)  # fmt: skip
        route = ssc_plan(cfg, *WARM_UP_SHAPE, runner.device).route
        kernels = warm_kernels(runner.device, route=route)  # (the route's kernels, if any)
    except Exception as err:
        logger.warning("videoanchor: the SSC warm-up at start-up failed (%s: %s); requests "
                       "will meet the same error", type(err).__name__, err)  # fmt: skip
        return None
    seconds = time.perf_counter() - t0
    runner.__dict__["_videoanchor_warmed"] = res.solver
    runner.__dict__["_videoanchor_warm_up_s"] = seconds
    how = ""
    if kernels.numba is not None:
        done = "compiled into" if kernels.numba == "compiled" else "loaded from"
        how = f"; its Numba kernels {done} the cache at {kernels.numba_cache}"
    logger.info("videoanchor: SSC warmed up before the first request (%s solver, %.1f s%s)",
                res.solver, seconds, how)  # fmt: skip
    return res.solver


#: owner (the runner's id) -> its engine's ScoreCache.
SCORE_CACHES: dict[int, ScoreCache] = {}


def score_cache(owner: int, additional_config) -> ScoreCache | None:
    """The :class:`ScoreCache` of the engine whose runner is ``owner`` (made on first use,
    ``score_cache_mb`` of its ``additional_config["videoanchor"]``), or None when it is 0."""
    cache = SCORE_CACHES.get(owner)
    if cache is None:
        size = score_cache_bytes(additional_config)
        if not size:
            return None
        cache = SCORE_CACHES[owner] = ScoreCache(size)
    return cache


def forget_score_cache(owner: int) -> None:
    """Forgets the :class:`ScoreCache` of the engine whose runner is ``owner`` in this
    process (the next :func:`score_cache` call for it makes a new, empty one); nothing where
    it has none. For a runner taken out of service (tests, tools)."""
    SCORE_CACHES.pop(owner, None)


def engine_cfg_of(runner):
    """The engine options of ``runner``'s engine (None: not anchored), read once per runner."""
    cached = runner.__dict__.get("_videoanchor_cfg", False)
    if cached is False:
        cached = engine_config(runner.vllm_config.additional_config)
        runner.__dict__["_videoanchor_cfg"] = cached
    return cached
