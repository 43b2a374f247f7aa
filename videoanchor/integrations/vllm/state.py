"""Per-step data handed from the model runner to the attention backend, in one process.

The runner (:mod:`.runner`) fills it before each forward: per scheduled token, in the
step's flat token order (the order of ``slot_mapping``), the gates to store in the token's
slot; per sequence, in batch order (the order of ``seq_lens`` / ``block_table``), whether
its queries read the gates, and how many of its first queries do (a chunk can hold the end
of a prompt and generated tokens: a preempted request's recompute). The backend (:mod:`.backend`) writes the token gates into a
per-slot gate cache through ``slot_mapping`` (once per step) and reads them through the
block table. vLLM's CPU engine runs its worker in the engine-core process, so both run in
the same process; one engine's runner and backend share an ``owner`` key.

On CUDA (:mod:`.backend_cuda`) the backend reads no Python per-step data at all: the
runner's :func:`publish` copies :data:`STEP` into persistent device buffers
(:class:`DeviceStep`, fixed addresses, so a captured CUDA graph reads each step's values),
and the gate caches are device tensors with one extra dummy slot for padding.

:func:`set_step` fills :data:`STEP` (the runner hooks' write, then :func:`publish`), and
:func:`isolated` gives a block a fresh, empty state (a backend run outside an engine).

**Score observers.** :func:`add_score_observer` registers a function the runner calls with
each request's anchor scores once they are computed (:func:`notify_scores`), e.g. to log or
check them; with none registered the runner does no extra work.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field, fields, replace

import torch


@dataclass
class StepState:
    """The per-step data of :data:`STEP`: ``owner`` (the engine's key, the runner's id; None:
    no anchored step), ``step`` (a counter, one more per step filled or cleared), per
    scheduled token its ``key_bias`` / ``value_scale`` gates, per sequence
    ``seq_anchored`` and ``seq_gated_queries``, and the step whose gates the CPU backend
    wrote into its gate cache (``written``). Filled by :func:`set_step`."""

    owner: int | None = None
    step: int = 0
    key_bias: torch.Tensor | None = None  # (num_scheduled_tokens,) float32
    value_scale: torch.Tensor | None = None
    seq_anchored: list[bool] = field(default_factory=list)
    # Per sequence: how many of its first scheduled queries read the gates (the others do
    # not); its length is that of seq_anchored. Empty: all queries of a flagged sequence.
    seq_gated_queries: list[int] = field(default_factory=list)
    written: int = -1  # the step whose gates are in the gate cache


STEP = StepState()
#: The model runners whose hook is installed in this process ("v1", "v2"): the CUDA backend
#: refuses to start under a runner whose steps would never fill STEP.
RUNNER_HOOKS: set[str] = set()
#: req_id -> why its scores could not be computed in its step, in this worker process. The
#: worker hands them to the scheduler on the step's ``ModelRunnerOutput`` (attribute
#: :data:`FAILED_ATTR`, :func:`.runner.install`), which finishes those requests with an error
#: (:func:`.holds.update_failing`); the step gives them neutral gates meanwhile.
FAILED: dict[str, str] = {}
FAILED_ATTR = "videoanchor_failed"

logger = logging.getLogger("videoanchor.vllm")
#: The functions :func:`notify_scores` calls, in registration order (a tuple replaced, never
#: changed in place, so a registration from another thread never disturbs a call).
_SCORE_OBSERVERS: tuple[Callable[[str, torch.Tensor | None], object], ...] = ()


def add_score_observer(fn: Callable[[str, torch.Tensor | None], object]) -> None:
    """Calls ``fn(request_id, scores)`` each time this process's model runner has scored a
    request: once per anchored request with visual items, when its scheduled tokens first
    reach them, in the order the requests are scored (batch order within a step).

    ``scores`` is the request's (prompt_len,) float32 CPU tensor of anchor scores (0 at
    text; the tensor its gates are made from, so read or copy it, do not change it), or
    None when the request is anchored but unscored (fewer than 3 visual tokens: neutral
    gates). A request whose scoring fails (it finishes with an error), one whose visual
    tokens the prefix cache serves (no step reaches them) and one with
    ``extra_args={"videoanchor": "off"}`` or on an unanchored engine are not reported. The
    call runs in the model runner's thread while the step is prepared, so keep it short; an
    exception it raises is logged and the engine goes on.

    Observers are per process: register them in the process that runs the model (vLLM's
    worker; the engine-core process for a one-GPU or CPU engine with
    ``VLLM_ENABLE_V1_MULTIPROCESSING=0``, or every process through a
    ``vllm.general_plugins`` entry point of your own). Under tensor parallelism every rank
    scores each request and calls its own observers. Registering ``fn`` twice calls it
    twice."""
    global _SCORE_OBSERVERS
    if not callable(fn):
        raise TypeError(f"add_score_observer: expected a callable, got {type(fn).__name__}")
    _SCORE_OBSERVERS = (*_SCORE_OBSERVERS, fn)


def remove_score_observer(fn: Callable[[str, torch.Tensor | None], object]) -> None:
    """Stops calling ``fn`` (one registration of it, the latest); ValueError if it is not
    registered."""
    global _SCORE_OBSERVERS
    obs = list(_SCORE_OBSERVERS)
    for i in range(len(obs) - 1, -1, -1):
        if obs[i] == fn:
            del obs[i]
            _SCORE_OBSERVERS = tuple(obs)
            return
    raise ValueError("remove_score_observer: this function is not a score observer")


def notify_scores(req_id: str, scores: torch.Tensor | None) -> None:
    """Calls every score observer with ``(req_id, scores)`` (see :func:`add_score_observer`;
    none registered: nothing); an observer's exception is logged, not raised."""
    for fn in _SCORE_OBSERVERS:
        try:
            fn(req_id, scores)
        except Exception:
            logger.exception("videoanchor: score observer %r failed on request %s", fn, req_id)


def set_step(
    owner: int,
    key_bias: torch.Tensor | None,
    value_scale: torch.Tensor | None,
    seq_gated_queries: list[int],
) -> None:
    """Fills :data:`STEP` with one anchored step of the engine ``owner`` (its runner's id):
    the next step number, per scheduled token (in ``slot_mapping`` order) its ``key_bias``
    and ``value_scale`` gates ((num_tokens,) float32 CPU tensors; None: no tokens), per
    sequence (in batch order) how many of its first queries read the gates
    (``seq_gated_queries``; 0: none, and it is not anchored). The model-runner hooks call it
    before each forward (:func:`.runner.fill_step`), then :func:`publish`; so does code that
    drives a backend outside an engine (after :func:`isolated`)."""
    st = STEP
    st.owner = owner
    st.step += 1
    st.key_bias = key_bias
    st.value_scale = value_scale
    st.seq_anchored = [n > 0 for n in seq_gated_queries]
    st.seq_gated_queries = seq_gated_queries


def take_failed() -> dict[str, str]:
    """The step failures recorded so far (and forgets them)."""
    out = {}
    for rid in list(FAILED):
        why = FAILED.pop(rid, None)
        if why is not None:
            out[rid] = why
    return out


#: (owner, num_blocks, block_size) -> (key_bias cache, value_scale cache), each
#: (num_blocks, block_size) float32.
GATE_CACHES: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def gate_cache(owner: int, num_blocks: int, block_size: int, device) -> tuple:
    key = (owner, num_blocks, block_size)
    caches = GATE_CACHES.get(key)
    if caches is None:
        caches = GATE_CACHES[key] = (
            torch.zeros(num_blocks, block_size, dtype=torch.float32, device=device),
            torch.ones(num_blocks, block_size, dtype=torch.float32, device=device),
        )
    return caches


@dataclass
class DeviceStep:
    """Persistent device copies of :data:`STEP` for one device (allocated once, before any
    CUDA graph capture; addresses never change). Entries past the step's tokens/sequences
    are don't-care (tokens: their slots are padding, redirected to the dummy slot) or
    neutral (sequences: 0 = not gated)."""

    key_bias: torch.Tensor  # (max_tokens,) float32
    value_scale: torch.Tensor  # (max_tokens,) float32
    seq_gated: torch.Tensor  # (max_seqs,) int32: gated leading queries per sequence
    published: int = -1  # the STEP.step last copied in (:func:`publish`)


#: str(device) -> its DeviceStep (one engine worker per device per process).
DEVICE_STEPS: dict[str, DeviceStep] = {}
#: (str(device), num_blocks, block_size) -> flat (num_blocks * block_size + 1,) float32
#: key-bias and value-scale caches; the last slot is the dummy slot padding tokens write to.
DEVICE_GATE_CACHES: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def _capturing(device) -> bool:
    dev = torch.device(device)
    return dev.type == "cuda" and torch.cuda.is_current_stream_capturing()


def device_step(device, max_tokens: int, max_seqs: int) -> DeviceStep:
    """The :class:`DeviceStep` of ``device``, made (or grown) to hold ``max_tokens`` tokens
    and ``max_seqs`` sequences. Call before CUDA graph capture (the metadata builder does)."""
    key = str(torch.device(device))
    ds = DEVICE_STEPS.get(key)
    if ds is not None and ds.key_bias.numel() >= max_tokens and ds.seq_gated.numel() >= max_seqs:
        return ds
    if _capturing(device):
        raise RuntimeError(
            "videoanchor: the per-step gate buffers must be allocated before CUDA graph "
            "capture (the attention metadata builder allocates them)"
        )
    if ds is not None:
        max_tokens = max(max_tokens, ds.key_bias.numel())
        max_seqs = max(max_seqs, ds.seq_gated.numel())
    ds = DEVICE_STEPS[key] = DeviceStep(
        key_bias=torch.zeros(max_tokens, dtype=torch.float32, device=device),
        value_scale=torch.ones(max_tokens, dtype=torch.float32, device=device),
        seq_gated=torch.zeros(max_seqs, dtype=torch.int32, device=device),
    )
    return ds


def device_gate_cache(device, num_blocks: int, block_size: int) -> tuple:
    """Flat (num_blocks * block_size + 1,) float32 key-bias / value-scale caches on
    ``device``: slot ``block * block_size + offset`` as in ``slot_mapping``, plus one dummy
    slot at the end that padding tokens (slot < 0) are redirected to. Allocated on first use
    (vLLM's warm-up run, before CUDA graph capture)."""
    key = (str(torch.device(device)), num_blocks, block_size)
    caches = DEVICE_GATE_CACHES.get(key)
    if caches is None:
        if _capturing(device):
            raise RuntimeError(
                "videoanchor: the gate caches were not allocated before CUDA graph capture "
                "(vLLM runs one eager warm-up before each capture: "
                "compilation_config.cudagraph_num_of_warmups >= 1); or serve with "
                "compilation_config={'cudagraph_mode': 'PIECEWISE'}"
            )
        n = num_blocks * block_size + 1
        caches = DEVICE_GATE_CACHES[key] = (
            torch.zeros(n, dtype=torch.float32, device=device),
            torch.ones(n, dtype=torch.float32, device=device),
        )
    return caches


def publish(device=None) -> None:
    """Copies this step's :data:`STEP` into the :class:`DeviceStep` of ``device`` (None:
    every DeviceStep of this process; one engine worker per process), with no host
    synchronisation: pinned staging, non-blocking copies on the current stream, so they land
    before the forward that reads them. Both model-runner hooks call it right after filling
    STEP. A no-op where no anchored CUDA backend made buffers."""
    if device is None:
        targets = list(DEVICE_STEPS.values())
    else:
        ds = DEVICE_STEPS.get(str(torch.device(device)))
        targets = [] if ds is None else [ds]
    st = STEP
    n = 0 if st.key_bias is None else st.key_bias.numel()
    # Per sequence, how many of its first queries read the gates (the paged kernels'
    # seq_gated counts; 0: none).
    flags = st.seq_gated_queries if st.owner is not None else []
    for ds in targets:
        if n > ds.key_bias.numel() or len(flags) > ds.seq_gated.numel():
            raise RuntimeError(
                f"videoanchor: a step of {n} tokens / {len(flags)} sequences exceeds the gate "
                f"buffers ({ds.key_bias.numel()} tokens / {ds.seq_gated.numel()} sequences) "
                "sized from max_num_batched_tokens / max_num_seqs"
            )
        pin = ds.seq_gated.device.type == "cuda"
        # Fresh pinned tensors each step: the caching host allocator keeps each one until
        # its copy has run, so a later step never overwrites data still in flight.
        gated = torch.zeros(ds.seq_gated.numel(), dtype=torch.int32, pin_memory=pin)
        if flags:
            gated[: len(flags)] = torch.tensor(flags, dtype=torch.int32)
        ds.seq_gated.copy_(gated, non_blocking=pin)
        if n:
            gates = torch.stack([st.key_bias, st.value_scale]).to(torch.float32)
            if pin:
                gates = gates.pin_memory()
            ds.key_bias[:n].copy_(gates[0], non_blocking=pin)
            ds.value_scale[:n].copy_(gates[1], non_blocking=pin)
        ds.published = st.step


@contextmanager
def isolated(runner_hooks=()):
    """Inside this block this process's per-step state starts empty: a fresh :data:`STEP`,
    no device buffers or gate caches (:data:`DEVICE_STEPS`, :data:`DEVICE_GATE_CACHES`,
    :data:`GATE_CACHES`), no recorded failures, and :data:`RUNNER_HOOKS` = ``runner_hooks``
    (the model runners whose hook counts as installed, e.g. ``{"v1"}``). The state before
    is put back after it, in the same objects. For running a backend or a runner hook
    outside an engine (tests, tools) without touching an engine's state in this process."""
    tables = (DEVICE_STEPS, DEVICE_GATE_CACHES, GATE_CACHES, FAILED)
    saved = [dict(t) for t in tables]
    saved_hooks, saved_step = set(RUNNER_HOOKS), replace(STEP)
    fresh = StepState()
    for t in tables:
        t.clear()
    RUNNER_HOOKS.clear()
    RUNNER_HOOKS.update(runner_hooks)
    for f in fields(StepState):
        setattr(STEP, f.name, getattr(fresh, f.name))
    try:
        yield
    finally:
        for t, old in zip(tables, saved, strict=True):
            t.clear()
            t.update(old)
        RUNNER_HOOKS.clear()
        RUNNER_HOOKS.update(saved_hooks)
        for f in fields(StepState):
            setattr(STEP, f.name, getattr(saved_step, f.name))
