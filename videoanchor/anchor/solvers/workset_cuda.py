"""The working sets on the features' device (issue 90; docs/ssc-gpu.md has the design):
each active column's program restricted to its working set in one Triton program
(:mod:`videoanchor.anchor.solvers._column_kernel`), the passes between the kernel's runs on
the same device with no host read inside them.

- **a pass** (:func:`_pass`, 12 kernels) runs over the active columns alone, a list
  compacted on the device with its length ``count`` a device tensor: the kernel; each
  column's residual ``R = Y_a - Y C_a - E_a`` gathered from its slots; ONE GEMM ``Y^T R``
  (float32 while screening, float64 in the passes that certify; float64 throughout where
  the device's float64 products are fast, :func:`screening`); the violations and the
  joins in Triton (:mod:`._pass_kernel`) by the working sets' one pass rule
  (:class:`videoanchor.anchor.plan.PassRule`, the CPU's too): the worst coefficient
  violators (``grow``: ``grow0`` doubling each pass up to ``grow_max``) into each column's
  free coefficient slots and EVERY violating outlier entry into its free outlier slots; the
  next active list. Its shapes are fixed (the
  capacity ``cap``, a power of two at least ``count`` when it was last read), so on CUDA a
  pass is captured once as a CUDA graph and replayed, the graph kept for later calls of
  the same shape with its static buffers (:class:`_Workspace`); a pass with no active
  column changes nothing.
- **the host** reads five integers after a round of :data:`ROUNDS` passes: the active
  columns, those set aside, the passes that ran, the active columns summed and the slots
  held (the support's size: no padding in the certificate's sparse products). Screening
  in float32: float32 passes until no column violates at ``SCREEN``, then float64 ones, the
  first over every column (the kernel off), until none violates at ``tol``; in float64
  (:data:`FAST_FLOAT64`'s devices), float64 passes alone. The answer is certified in
  float64.
- **levels of slots** ``(M, ME)`` (:data:`SLOTS`, :data:`OUTLIER_SLOTS`; the column
  kernel's support positions :data:`SUPPORT`, at most ``M``): a column whose coefficient
  slots are full while a coefficient violates, whose support would pass the level's
  positions (the kernel's ``FULL``), or whose free outlier slots are fewer than its
  violating entries, continues at the next level; one that outgrows the last,
  or passes that run out, gives the whole call the fast solver's answer with a warning
  (``strategy``: ``"workset_cuda"``, ``"workset_cuda_wide"`` or the fast solver's).

Triton is imported when this solver runs (the kernels' first launch), never by
``import videoanchor``.
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
import warnings
from collections import OrderedDict

import torch

from videoanchor.anchor import plan as _plan
from videoanchor.anchor._inputs import as_feature_tensor
from videoanchor.anchor.graphs import capture as capture_graph
from videoanchor.anchor.options import SSCOptions
from videoanchor.anchor.plan import Plan, SSCMemoryError
from videoanchor.anchor.program import (
    SSCSolution,
    gram_row_max,
    nearest_points,
    ssc_lambdas,
)
from videoanchor.anchor.solvers import program_kwargs
from videoanchor.anchor.solvers.admm import run_admm

__all__ = ["OUTLIER_SLOTS", "SLOTS", "run", "run_workset_cuda", "screening",
           "solve_workset_cuda", "warm_up"]  # fmt: skip

#: A column's end in a kernel run: its set is optimal; the inner steps ran out; its support
#: would pass the level's positions (:data:`SUPPORT`: the pass sets it aside).
SOLVED, STALLED, FULL = 0, 1, 2
#: The coefficient slots of each level: every column's, and the wider one for a column
#: that fills them or its support positions. The slots hold the candidates as well as the
#: support (46 / 110 / 152 coefficients, median / p90 / max, at 16 frames; up to 205 at 64
#: frames: ../shared/docs/GPU-SCORES.md), so that the pass rule's joiners (256 doubling to
#: 1024) fit (issue 98 item 4; the candidates live in global memory, so a slot costs 16
#: bytes, not registers). The CPU kernel's simulation of the rule within 1024 slots sums
#: 5.82 N active columns at 16 frames and 7.76 N at 64, within 512 5.84 N and 8.77 N
#: (``bench_pass_counts``' rules w256 and e256, ``pass_counts_cpu.json``); the route's own
#: pass loop at 16 frames: ``benchmarks/experiments/route_counts.py``.
SLOTS = (1024, 2048)
#: The support's positions of each level (at most its slots): the column kernel holds its
#: inverse over them alone, its other slots (the candidates) in global memory, so a level's
#: slots may be wider than what the registers follow (issue 98 item 4).
SUPPORT = (128, 256)
#: The outlier slots of each level: outlier entries are eliminated in the kernel (their
#: count costs no factor), so a level holds many; the corrupted tokens hold 478-551 each.
#: 512 at the first level: with 64, 406 of 2048 columns at 16 frames took the second level
#: in their first pass (16 with 512; route_counts.py).
OUTLIER_SLOTS = (512, 1024)
#: The dense screen's bound (:func:`dense_at_start`, at most the first level's outlier
#: slots): the lower median column's outlier entries violating at its nearest point.
DENSE_ENTRIES = 64
#: Slot counts a level may have: powers of two, 4 to 4096 (the kernel's constexprs).
SLOT_COUNTS = tuple(2**k for k in range(2, 13))
#: Passes between the host's reads: the first round, then each later one (a pass past the
#: last active column changes nothing; passes at 16 frames: median 5, max 13 at grow 64).
ROUNDS = (8, 4)
#: The relative KKT violation below which a float32 pass adds nothing: then float64 passes
#: follow (float32's products are good to ~1e-6 relative here).
SCREEN = 1e-5
#: The kernel's smallest Schur pivot of a join, relative to the variable's diagonal.
RIDGE = 1e-10
#: The largest relative duality gap of an answer called certified (as the CPU's sets).
CERTIFIED = 1e-8
#: ``C`` is dense, and the fast answer stands, where more than this share of the columns
#: is set aside at the first level (slots or support positions full); or before any pass,
#: :func:`dense_at_start`. Half: at 64 frames 13.5% of the minimiser's columns hold more
#: than the first level's 128 support positions on ``bench_pass_counts``' set (p90 137)
#: and more on ../shared/docs/GPU-SCORES.md's (p90 152), where a quarter was near; a dense
#: ``C`` sets aside nearly every column.
WIDE_SHARE = 0.5
#: The CUDA compute capabilities whose float64 matrix products run at half float32's rate or
#: better (FP64 tensor cores; NVIDIA's datasheets, float64 tensor / float32 TFLOPS: A100
#: 19.5 / 19.5, H100 and H200 SXM 67 / 67, B200 about 40 / 80): there the passes screen in
#: float64 (:func:`screening`), which needs no float64 pass over every column to certify
#: (issue 98 item 4: ``route_counts_default_cpu.json``). Elsewhere (sm_86, sm_89, sm_120,
#: sm_103: float64 at 1/64 of float32 or less) float32.
FAST_FLOAT64 = frozenset({(8, 0), (9, 0), (10, 0)})
#: The parts of those capabilities whose float64 was cut to about 1 TFLOPS (the export
#: parts of sm_90: H800, H20, against 34-67 on an H100): float32 there, told by name.
SLOW_FLOAT64 = frozenset({"H800", "H20"})


def launch(state: dict, active: torch.Tensor, count: torch.Tensor) -> None:
    """The column kernel over ``active[:count]`` (the contract:
    :func:`videoanchor.anchor.solvers._column_kernel.launch`; Triton imported on the first)."""
    from videoanchor.anchor.solvers import _column_kernel

    _column_kernel.launch(state, active, count)


def residuals(state: dict, R: torch.Tensor, VE: torch.Tensor, cap: int) -> None:
    """Into ``R`` (``cap x D``): the residuals of the columns at ``state["active"][:cap]``,
    into ``VE`` their outlier entries' violations
    (:func:`videoanchor.anchor.solvers._pass_kernel.residuals`; past ``count``: 0, -inf)."""
    from videoanchor.anchor.solvers import _pass_kernel

    p = state["program"]
    _pass_kernel.residuals(p["X"], state["cols"], state["ids"], state["z"], state["eids"],
                           state["ze"], state["active"][:cap], state["count"], R, VE,
                           p["scalars"])  # fmt: skip


def violations(state: dict, m: torch.Tensor, V: torch.Tensor, cap: int) -> None:
    """Into ``V``: the coefficients' violations of the active columns from ``m = R X^T``
    (:func:`videoanchor.anchor.solvers._pass_kernel.violations`); the pass's counters."""
    from videoanchor.anchor.solvers import _pass_kernel

    _pass_kernel.violations(m, V, state["cols"], state["ids"], state["z"], state["mu"],
                            state["active"][:cap], state["count"], state["passes"],
                            state["active_sum"], state["program"]["scalars"])  # fmt: skip


def joins(state: dict, top, new, m, R, VE, again, cap: int, *, exact: bool,
          last: bool) -> None:  # fmt: skip
    """The pass's joins, asides and next-pass flags ``again``
    (:func:`videoanchor.anchor.solvers._pass_kernel.joins`)."""
    from videoanchor.anchor.solvers import _pass_kernel

    _pass_kernel.joins(top, new, m, R, VE, state["JL"], state, state["active"][:cap], again,
                       scalars=state["program"]["scalars"], grow0=_plan.PASS_RULE.grow0,
                       grow_max=_plan.PASS_RULE.grow_max,
                       exact=exact, last=last)  # fmt: skip


def dense_at_start(X: torch.Tensor, nearest: torch.Tensor, lam_e: float, lam_z: float,
                   slots: int) -> torch.Tensor:  # fmt: skip
    """Whether ``C`` is dense before any pass (a 0-d bool on the device): the lower median
    column has more outlier entries violating at its nearest point (``c_i = e_nearest``, the
    first pass's start; at the float32 passes' ``SCREEN``) than ``slots``.
    Its minimiser's outlier term is then dense: 2286 of D = 3584 entries violate on
    ``bench_request_cost``'s synthetic set (N = 2048; the working sets ran 71.8 s there on an
    H100 before the fast answer stood), 204-730 on smaller synthetic sets, 9-48 on video-like
    tokens of 16-64 frames (Qwen2.5-VL-7B and InternVL2-8B shapes), which certify (issue 76).
    ``X``: the features (``N x D``), ``nearest``: each point's nearest point."""
    r = (X[nearest] - X).abs_()  # |y_nearest - y_i|, each point's row: (N, D)
    count = (r > lam_e * (1.0 + SCREEN) / lam_z).sum(dim=1)
    return count.median() > slots


def warm_up(device, slots: tuple[int, ...] = SLOTS,
            outlier_slots: tuple[int, ...] | None = None) -> dict[int, float]:  # fmt: skip
    """Compile the kernels on ``device`` for each level (into Triton's cache, on disk: a
    later process loads them) by a pass over one column with no active one; the seconds per
    level, by its coefficient slots."""
    device = torch.device(device)
    levels = _checked_levels(slots, outlier_slots)
    f64 = dict(dtype=torch.float64, device=device)
    one = torch.zeros(1, 1, **f64)
    program = _program(one, one, 1.0, 1.0, tol=1e-9, max_inner=1)
    took = {}
    for level, (M, ME) in enumerate(levels):
        t = time.perf_counter()
        cols = torch.zeros(1, dtype=torch.int64, device=device)
        state = _state(program, cols, torch.full((1, M), -1, dtype=torch.int32, device=device),
                       torch.zeros(1, M, **f64), torch.full((1, ME), -1, dtype=torch.int32,
                                                            device=device),
                       torch.zeros(1, ME, **f64), _support(level, M))  # fmt: skip
        state["count"].zero_()
        state["kcount"].zero_()
        for exact in (False, True):
            _pass(state, 1, exact=exact, last=level + 1 == len(levels))
        if device.type == "cuda":
            torch.cuda.current_stream(device).synchronize()
        took[M] = time.perf_counter() - t
    return took


def screening(device) -> str:
    """The passes' products on ``device`` (``precision="auto"``): ``"float64"`` on an NVIDIA
    device of :data:`FAST_FLOAT64` (but :data:`SLOW_FLOAT64`'s parts), ``"float32"``
    elsewhere (the CPU included, and ROCm: its devices are ``"cuda"`` too, and their
    capability is the GCN architecture's number, ``(9, 0)`` on Vega 10 as on MI200, which
    the rule was not written for; float32 screening is certified by its float64 passes on
    any device)."""
    device = torch.device(device)
    if (device.type != "cuda" or torch.version.hip is not None
            or torch.cuda.get_device_capability(device) not in FAST_FLOAT64):  # fmt: skip
        return "float32"
    words = torch.cuda.get_device_name(device).replace("-", " ").split()
    return "float32" if SLOW_FLOAT64.intersection(words) else "float64"


def _checked_levels(slots, outlier_slots) -> tuple[tuple[int, int], ...]:
    """The levels ``((M, ME), ...)``, or a ValueError: increasing counts of
    :data:`SLOT_COUNTS` (``outlier_slots`` None: :data:`OUTLIER_SLOTS`' first, its last past
    them)."""
    slots = tuple(int(s) for s in slots)
    if outlier_slots is None:
        outlier_slots = tuple(OUTLIER_SLOTS[min(i, len(OUTLIER_SLOTS) - 1)]
                              for i in range(len(slots)))  # fmt: skip
    outlier_slots = tuple(int(s) for s in outlier_slots)
    for name, v in (("slots", slots), ("outlier_slots", outlier_slots)):
        if not v or any(s not in SLOT_COUNTS for s in v) or list(v) != sorted(v):
            raise ValueError(
                f"{name}: expected non-decreasing slot counts from {SLOT_COUNTS}, got {v}"
            )
    if len(outlier_slots) != len(slots) or len(set(zip(slots, outlier_slots, strict=True))) != len(
        slots
    ):
        raise ValueError(
            f"outlier_slots: expected one count per level of slots {slots}, the levels "
            f"distinct, got {outlier_slots}"
        )
    return tuple(zip(slots, outlier_slots, strict=True))


def _program(X: torch.Tensor, G: torch.Tensor, lam_e: float, lam_z: float, *, tol: float,
             max_inner: int) -> dict:  # fmt: skip
    """The program's tensors and scalars, as the kernel's contract names them; ``scalars``
    (float64, on the device: every kernel reads its floats there, never as arguments):
    ``lambda_z``, ``lambda_e``, ``gamma``, ``tol``, :data:`RIDGE` (the column kernel's),
    :data:`SCREEN` and ``lambda_z / lambda_e`` (the pass's, ``_pass_kernel.SCALE``)."""
    f64 = dict(dtype=torch.float64, device=X.device)
    scalars = torch.tensor([lam_z, lam_e, 0.0, tol, RIDGE, SCREEN, lam_z / lam_e], **f64)
    scalars[2] = lam_z * G.diagonal().max()  # gamma, on the device
    n, d = X.shape
    return dict(G=G, X=X, X32=X.float(), n=n, d=d, lam_z=float(lam_z), lam_e=float(lam_e),
                tol=float(tol), max_inner=int(max_inner), scalars=scalars)  # fmt: skip


def _support(level: int, M: int) -> int:
    """The support's positions at ``level`` of ``M`` slots: :data:`SUPPORT`'s (its last past
    it), at most ``M``."""
    return min(M, SUPPORT[min(level, len(SUPPORT) - 1)])


def _state(program: dict, cols: torch.Tensor, ids: torch.Tensor, z: torch.Tensor,
           eids: torch.Tensor, ze: torch.Tensor, support: int | None = None) -> dict:  # fmt: skip
    """A level's state (the kernel's contract) with every column active, ``support`` the
    column kernel's positions (None: every slot)."""
    nc = len(cols)
    dev = ids.device
    i32 = dict(dtype=torch.int32, device=dev)
    support = ids.shape[1] if support is None else support
    return dict(program=program, cols=cols, ids=ids, z=z, eids=eids, ze=ze, support=support,
                mu=torch.zeros(nc, dtype=torch.float64, device=dev),
                status=torch.zeros(nc, **i32), steps_pass=torch.zeros(nc, **i32),
                steps=torch.zeros(nc, dtype=torch.int64, device=dev),
                aside=torch.zeros(nc, **i32),
                # (1 where the last pass took variables into the column's slots: the joins'
                # test of a run that did not move)
                joined=torch.zeros(nc, **i32),
                # the active list (a permutation of the rows: its first ``count`` are
                # active), the kernel's count (0: a pass that only checks), the passes run
                # (those with an active column) and the active columns summed over them
                active=torch.arange(nc, **i32),
                count=torch.full((1,), nc, **i32), kcount=torch.full((1,), nc, **i32),
                passes=torch.zeros(1, dtype=torch.int64, device=dev),
                JL=torch.zeros(ids.shape[0], eids.shape[1], **i32),  # (the joins' scratch)
                active_sum=torch.zeros(1, dtype=torch.int64, device=dev),
                graphs={})  # fmt: skip


def _pass(state: dict, cap: int, *, exact: bool, last: bool) -> None:
    """One pass over the active columns (``state["active"][:count]``, ``count <= cap``) with
    no host read and shapes fixed by ``cap``, 13 operators: the kernel (over ``kcount`` of
    them), their residuals and outlier violations (:func:`residuals`), the one GEMM
    ``R X^T`` (float64 where ``exact``, else float32), the coefficients' violations
    (:func:`violations`), their ``grow`` worst (``topk``), the joins (:func:`joins`: those
    into the free coefficient slots, every violating outlier entry into the free outlier
    slots; a column whose slots cannot take them is set aside, ``last``: only where no slot
    is free; the columns that took variables, did not solve, or (``exact``) whose support is
    off its own stationarity run again, but one whose run took one step after taking
    variables: they did not join, rounding flagged them), and the next active list (a
    stable sort of those flags) with its count."""
    p = state["program"]
    act = state["active"][:cap]
    launch(state, act, state["kcount"])
    dt = torch.float64 if exact else torch.float32
    R = torch.empty(cap, p["d"], dtype=dt, device=act.device)
    VE = torch.empty_like(R)
    residuals(state, R, VE, cap)
    m = torch.mm(R, (p["X"] if exact else p["X32"]).T)
    V = torch.empty_like(m)
    violations(state, m, V, cap)
    top, new = V.topk(min(_plan.PASS_RULE.grow_max, p["n"], state["ids"].shape[1]), dim=1)
    again = torch.empty(cap, dtype=torch.int32, device=act.device)
    joins(state, top, new, m, R, VE, again, cap, exact=exact, last=last)
    state["active"][:cap] = act[torch.argsort(again, descending=True, stable=True)]
    state["count"].copy_(again.sum(dim=0, keepdim=True))
    state["kcount"].copy_(state["count"])


def _capacity(count: int, nc: int) -> int:
    """The pass's capacity for ``count`` active columns of ``nc``: a power of two (few
    shapes, few graphs), at most ``nc``."""
    return min(nc, 1 << max(0, count - 1).bit_length())


def _replay(state: dict, cap: int, *, exact: bool, last: bool, passes: int) -> None:
    """``passes`` passes at capacity ``cap``. With a capture (``state["capture"]``: on CUDA
    :func:`_cuda_capture`) the pass's graph, kept with the state's static buffers across
    calls (:class:`_Workspace`), captured on the first pass at this shape after that pass
    ran eagerly (it compiles and warms what it runs), and replayed; eager where the capture
    or a replay fails (one warning a call, the graph not kept) and elsewhere."""
    capture = state.get("capture")
    if capture is None or state.get("eager"):
        for _ in range(passes):
            _pass(state, cap, exact=exact, last=last)
        return
    key = (cap, exact, last)
    graph = state["graphs"].get(key)
    if graph is None and passes > 0:
        _warm_pass(state, cap, exact=exact, last=last)
        passes -= 1
        try:
            graph = capture(lambda: _pass(state, cap, exact=exact, last=last), state)
        except Exception as exc:  # noqa: BLE001 - whatever capture refuses runs eagerly
            _eager_from_now(state, f"no CUDA graph of the pass ({type(exc).__name__}: {exc})")
            _replay(state, cap, exact=exact, last=last, passes=passes)
            return
        state["graphs"][key] = graph
        GRAPH_COUNTS["captures"] += 1
    for done in range(passes):
        try:
            graph.replay()
        except Exception as exc:  # noqa: BLE001 - the rest eagerly, the graph dropped
            state["graphs"].pop(key, None)
            _eager_from_now(state, f"a replay of the pass's CUDA graph failed "
                            f"({type(exc).__name__}: {exc})")  # fmt: skip
            _replay(state, cap, exact=exact, last=last, passes=passes - done)
            return
        GRAPH_COUNTS["replays"] += 1


def _warm_pass(state: dict, cap: int, *, exact: bool, last: bool) -> None:
    """One eager pass before a capture: on CUDA on the workspace's side stream, as torch
    asks of what a graph captures next."""
    if state["ids"].device.type != "cuda":
        _pass(state, cap, exact=exact, last=last)
        return
    side = state["workspace"].side_stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        _pass(state, cap, exact=exact, last=last)
    torch.cuda.current_stream().wait_stream(side)


def _eager_from_now(state: dict, why: str) -> None:
    if not state.get("eager"):
        warnings.warn(f"workset_cuda: {why}; the passes run eagerly", RuntimeWarning,
                      stacklevel=5)  # fmt: skip
    state["eager"] = True


def _cuda_capture(run, state: dict):
    """``run()`` (one pass) captured as a CUDA graph on the workspace's side stream, into its
    private memory pool, in the thread-local capture mode (:func:`videoanchor.anchor.graphs.capture`:
    no device sync, cache emptied or garbage collected)."""
    ws = state["workspace"]
    return capture_graph(run, ws.side_stream(), ws.graph_pool())[0]


#: The pass graphs' counts in this process (the tests read them).
GRAPH_COUNTS = {"captures": 0, "replays": 0}
#: Workspaces kept per device (least recently used dropped), and levels of slots kept per
#: workspace: each holds its call's static buffers (G, X, the slots, the column kernel's
#: inverses: about ``8 N^2 + 8 N M^2`` bytes at ``M`` slots) and its pass graphs.
WORKSPACES, LEVELS = 2, 4


class _Workspace:
    """A call's program and levels' state in static buffers, with the pass graphs captured
    on them (by ``(cap, exact, last)``), kept across calls of one device, ``N``, ``D`` and
    ``max_inner``: a later call copies its inputs in and replays. One call uses it at a
    time (``busy``); a call finding it busy gets a workspace of its own, not kept."""

    def __init__(self):
        self.program, self.levels, self.busy = None, OrderedDict(), False
        self._pool = self._stream = None

    def graph_pool(self):
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        return self._pool

    def side_stream(self):
        if self._stream is None:
            self._stream = torch.cuda.Stream()
        return self._stream

    def bind_program(self, X, G, lam_e, lam_z, *, tol, max_inner) -> dict:
        """The program (:func:`_program`) in this workspace's buffers (the call's ``G`` and
        ``X`` copied in: the call keeps its own)."""
        fresh = _program(X, G, lam_e, lam_z, tol=tol, max_inner=max_inner)
        if self.program is None:
            self.program = {**fresh, **{k: fresh[k].clone() for k in ("G", "X", "X32")}}
        else:
            for k in ("G", "X", "X32", "scalars"):
                self.program[k].copy_(fresh[k])
            self.program.update({k: v for k, v in fresh.items()
                                 if not isinstance(v, torch.Tensor)})  # fmt: skip
        return self.program

    def bind_state(self, cols, ids, z, eids, ze, capture, support: int) -> dict:
        """A level's state (:func:`_state`) in this workspace's buffers, reset as
        :func:`_state` makes it; its graphs kept (``LEVELS`` levels, least recent
        dropped)."""
        key = (len(cols), ids.shape[1], eids.shape[1], support)
        st = self.levels.get(key)
        if st is None:
            st = _state(self.program, cols.clone(), ids.clone(), z.clone(), eids.clone(),
                        ze.clone(), support)  # fmt: skip
            self.levels[key] = st
            while len(self.levels) > LEVELS:
                self.levels.popitem(last=False)
        else:
            self.levels.move_to_end(key)
            fresh = _state(self.program, cols, ids, z, eids, ze, support)
            for k, v in fresh.items():  # (into the buffers the graphs read)
                if isinstance(v, torch.Tensor):
                    st[k].copy_(v)
            for k in ("Sok", "Skey"):  # (the column kernel's carried inverses: rebuilt)
                if k in st:
                    st[k].zero_()
        st.update(workspace=self, capture=capture, eager=False)
        return st


_WORKSPACES: OrderedDict = OrderedDict()
_WORKSPACES_LOCK = threading.Lock()


@contextlib.contextmanager
def _workspace(device: torch.device, n: int, d: int, max_inner: int, capture):
    """The call's workspace (None without a capture: plain state, eager passes), taken
    from :data:`_WORKSPACES` where one of this key is free, else new and kept (at most
    :data:`WORKSPACES` per device, least recently used dropped)."""
    if capture is None:
        yield None
        return
    key = (str(device), n, d, int(max_inner))
    with _WORKSPACES_LOCK:
        ws = _WORKSPACES.get(key)
        if ws is not None and not ws.busy:
            _WORKSPACES.move_to_end(key)
        elif ws is None:
            ws = _WORKSPACES[key] = _Workspace()
            mine = [k for k in _WORKSPACES if k[0] == key[0]]
            for k in mine[: max(0, len(mine) - WORKSPACES)]:
                if not _WORKSPACES[k].busy:
                    del _WORKSPACES[k]
        else:
            ws = _Workspace()  # (one of this key in use: a call's own)
        ws.busy = True
    try:
        yield ws
    except BaseException:  # (a failed call's buffers are not kept: an out-of-memory's)
        with _WORKSPACES_LOCK:
            if _WORKSPACES.get(key) is ws:
                del _WORKSPACES[key]
        raise
    finally:
        ws.busy = False


def clear_graphs() -> None:
    """Drop every kept workspace and its graphs (their memory returns to torch's cache)."""
    with _WORKSPACES_LOCK:
        for k in [k for k, ws in _WORKSPACES.items() if not ws.busy]:
            del _WORKSPACES[k]


def _solve_level(state: dict, *, precision: str, max_passes: int, reads: list, last: bool,
                 max_aside: float = math.inf) -> tuple[int, bool, int, int, int, int]:  # fmt: skip
    """Rounds of passes over ``state`` until no column that is not set aside violates
    (float64), at most ``max_passes``, or until more than ``max_aside`` columns are set
    aside; returns the passes replayed, whether it got there, the columns set aside, the
    passes that ran an active column, the active columns summed over them and the slots
    held by the columns not set aside. One host read a round (``reads`` counts them): five
    integers."""
    exact = precision == "float64"
    nc = state["ids"].shape[0]
    cap, replayed, rounds = nc, 0, 0
    while replayed < max_passes:
        todo = min(ROUNDS[min(rounds, len(ROUNDS) - 1)], max_passes - replayed)
        _replay(state, cap, exact=exact, last=last, passes=todo)
        replayed, rounds = replayed + todo, rounds + 1
        held = ((state["ids"] >= 0) & (state["aside"] == 0)[:, None]).sum().view(1)
        flags = torch.cat([state["count"].long(), state["aside"].sum().view(1),
                           state["passes"], state["active_sum"], held])  # fmt: skip
        count, aside, passes, active, held = flags.tolist()
        reads.append("round")
        if aside > max_aside:
            return replayed, False, aside, passes, active, held
        if count == 0:
            if exact:
                return replayed, True, aside, passes, active, held
            # float32 quiet: float64 from here, every column not set aside checked once
            # (the kernel off in that pass)
            exact = True
            order = torch.argsort(state["aside"].to(torch.int8), stable=True)
            state["active"].copy_(order.to(torch.int32))
            state["count"].fill_(nc - aside)
            state["kcount"].zero_()
            count = nc - aside
        cap = _capacity(count, nc)
    return replayed, False, aside, passes, active, held


def solve_workset_cuda(features, *, alpha_e: float = 800.0, alpha_z: float = 800.0,
                       slots: tuple[int, ...] = SLOTS,
                       outlier_slots: tuple[int, ...] | None = None, tol: float = 1e-9,
                       max_passes: int = 500, max_inner: int = 1000,
                       precision: str = "auto", wide_share: float = WIDE_SHARE,
                       checked: bool = False, capture=None) -> dict:  # fmt: skip
    """The program's minimiser for ``features`` (``N x D``) by the working sets on their
    device (module docstring), float64 inside the kernel. ``slots``, ``outlier_slots``: the
    coefficient and outlier slots per column at each level (non-decreasing, from
    :data:`SLOT_COUNTS`; ``outlier_slots`` None: :data:`OUTLIER_SLOTS`'). ``precision``:
    the first passes' products (``"float32"``: screening, then float64; ``"float64"``;
    ``"auto"``: :func:`screening`'s for the features' device).
    Where ``C`` is dense (:func:`dense_at_start`; or more than ``wide_share`` of the columns
    fill the first level) it stops there: ``dense`` says why (else None), ``coef`` and
    ``outliers`` are None where no pass ran. On CUDA the passes are CUDA graphs kept
    across calls with their static buffers (:class:`_Workspace`); ``capture``: a stand-in
    for :func:`_cuda_capture` (the tests' bookkeeping on the CPU; None: CUDA's, eager
    elsewhere).

    Returns a dict: ``coef``, ``outliers`` (float64, on the device), ``lambda_e``,
    ``lambda_z``, ``gram`` (``X X^T``, float64), ``support`` (``(2, K)``, the ``(row,
    column)`` positions of ``coef`` its slots held, sorted by column, no padding: every
    non-zero), ``passes`` (the passes that ran an active
    column, summed over the levels), ``replayed`` (the passes run, those past the last
    active column included), ``active`` (the active columns summed over the passes),
    ``converged`` (every column solved within its slots and the passes), ``wide_columns``
    (columns that took a level past the first), ``overflow`` (columns whose set outgrew the
    last level), ``steps`` (per column, on the device), ``reads`` (host reads, by kind),
    ``dense`` and ``timings``."""
    t0 = time.perf_counter()
    # (``checked``: features the entry point checked already; their finiteness test is a
    # host read)
    x = features if checked else as_feature_tensor(features)
    n, d = x.shape
    if n < 2:
        raise ValueError(f"SSC needs at least 2 points, got N = {n}")
    levels = _checked_levels(slots, outlier_slots)
    if precision not in ("auto", "float32", "float64"):
        raise ValueError(f"precision: expected 'auto', 'float32' or 'float64', got {precision!r}")
    if precision == "auto":
        precision = screening(x.device)
    for name, value in (("max_passes", max_passes), ("max_inner", max_inner)):
        if int(value) < 1:
            raise ValueError(f"{name}: expected a positive integer, got {value}")
    if not tol >= 0:
        raise ValueError(f"tol: expected a non-negative number, got {tol}")
    if not 0 < wide_share <= 1:
        raise ValueError(f"wide_share: expected a share in (0, 1], got {wide_share}")
    dev = x.device
    reads: list = []
    X = x.detach().to(torch.float64).contiguous()
    G = X @ X.T
    G = (G + G.T) / 2  # (the kernel reads G's rows for its columns: exactly symmetric)
    lam_e, lam_z, _, _ = ssc_lambdas(X, alpha_e, alpha_z, row_max=gram_row_max(X, gram=G))
    reads.append("lambdas")  # (mu_e, mu_z and the median: ssc_lambdas' one copy)
    M, ME = levels[0]
    i32 = dict(dtype=torch.int32, device=dev)
    cols = torch.arange(n, device=dev)
    ids = torch.full((n, M), -1, **i32)
    z = torch.zeros((n, M), dtype=torch.float64, device=dev)
    ids[:, 0], z[:, 0] = nearest_points(G).to(torch.int32), 1.0  # each column from its nearest
    eids = torch.full((n, ME), -1, **i32)
    ze = torch.zeros((n, ME), dtype=torch.float64, device=dev)
    t1 = time.perf_counter()
    bound = min(ME, DENSE_ENTRIES)
    dense_now = bool(dense_at_start(X, ids[:, 0].long(), lam_e, lam_z, bound))
    reads.append("dense")
    if dense_now:
        return dict(coef=None, outliers=None, lambda_e=lam_e, lambda_z=lam_z, gram=G,
                    support=None, passes=0, replayed=0, active=0, converged=False, wide_columns=0,
                    overflow=0, steps=None, reads=reads,
                    dense=f"the median column has more outlier entries violating at its "
                    f"nearest point than {bound}; the working sets did not run",
                    timings={"lambdas": t1 - t0, "workset_cuda": time.perf_counter() - t1})  # fmt: skip
    if capture is None and dev.type == "cuda":
        capture = _cuda_capture
    with _workspace(dev, n, d, max_inner, capture) as ws:
        return _levels(X, G, lam_e, lam_z, levels, cols, ids, z, eids, ze, ws=ws,
                       capture=capture, tol=tol, max_inner=max_inner, precision=precision,
                       max_passes=max_passes, wide_share=wide_share, reads=reads, t0=t0,
                       t1=t1)  # fmt: skip


def _levels(X, G, lam_e, lam_z, levels, cols, ids, z, eids, ze, *, ws, capture, tol,
            max_inner, precision, max_passes, wide_share, reads, t0, t1) -> dict:  # fmt: skip
    """:func:`solve_workset_cuda` from its start (each column at its nearest point) over
    the levels of slots, in the workspace ``ws`` (None: fresh state)."""
    n, d = X.shape
    dev = X.device
    if ws is None:
        program = _program(X, G, lam_e, lam_z, tol=tol, max_inner=max_inner)
    else:
        program = ws.bind_program(X, G, lam_e, lam_z, tol=tol, max_inner=max_inner)
    coef = torch.zeros(n, n + 1, dtype=torch.float64, device=dev)  # (a column past the end
    outl = torch.zeros(n, d + 1, dtype=torch.float64, device=dev)  # takes the empty slots)
    final = torch.full((n, levels[-1][0]), -1, dtype=torch.int64, device=dev)
    steps = torch.zeros(n, dtype=torch.int64, device=dev)
    total, passes, active_sum, converged, wide, overflow, dense = 0, 0, 0, True, 0, 0, None
    size = 0  # (the slots that ``final`` holds: the support's size, read with the flags)
    for level, (M, ME) in enumerate(levels):
        if ws is None:
            state = _state(program, cols, ids, z, eids, ze, _support(level, M))
        else:
            state = ws.bind_state(cols, ids, z, eids, ze, capture, _support(level, M))
        last = level + 1 == len(levels)
        max_aside = wide_share * n if level == 0 and not last else math.inf
        replayed, done, aside, ran, active, held = _solve_level(
            state, precision=precision, max_passes=max_passes, reads=reads, last=last,
            max_aside=max_aside)  # fmt: skip
        total, passes, active_sum = total + replayed, passes + ran, active_sum + active
        size += held
        converged &= done
        ok = state["aside"] == 0  # (the columns set aside write at the next level)
        at = torch.where(ok[:, None], state["ids"].long(), n)
        coef.index_copy_(0, cols, torch.zeros_like(coef[: len(cols)]).scatter_(
            1, torch.where(at >= 0, at, n), torch.where(ok[:, None], state["z"], 0.0)))  # fmt: skip
        at = torch.where(ok[:, None], state["eids"].long(), d)
        outl.index_copy_(0, cols, torch.zeros_like(outl[: len(cols)]).scatter_(
            1, torch.where(at >= 0, at, d), torch.where(ok[:, None], state["ze"], 0.0)))  # fmt: skip
        final[cols, :M] = torch.where(ok[:, None], state["ids"].long(), -1)
        steps.index_add_(0, cols, state["steps"])
        if aside > max_aside:
            dense = (f"{aside} of {n} columns filled the first level's slots ({M}, {ME}) "
                     f"in {replayed} passes (more than {wide_share:g} of them)")  # fmt: skip
            converged, overflow = False, aside
            break
        if not aside or not done or last:
            overflow = aside
            converged &= aside == 0
            break
        wide += aside if level == 0 else 0
        # the columns set aside continue with the next level's slots, from their sets
        # (their count was read with the last round's flags: no read here)
        keep = torch.argsort(ok.to(torch.int8), stable=True)[:aside]
        cols = cols[keep]
        M2, ME2 = levels[level + 1]
        ids = torch.cat([state["ids"][keep], state["ids"].new_full((aside, M2 - M), -1)], 1)
        z = torch.cat([state["z"][keep], z.new_zeros((aside, M2 - M))], 1)
        eids = torch.cat([state["eids"][keep], state["eids"].new_full((aside, ME2 - ME), -1)], 1)
        ze = torch.cat([state["ze"][keep], ze.new_zeros((aside, ME2 - ME))], 1)
    if dev.type == "cuda":
        torch.cuda.current_stream(dev).synchronize()
    t2 = time.perf_counter()
    # (row, column) positions that hold every non-zero of C: each column's held slots, no
    # padding (their count read with the flags: issue 98 defect 5)
    at = torch.nonzero_static((final >= 0).flatten(), size=size)[:, 0]
    support = torch.stack([final.flatten()[at], torch.div(at, final.shape[1],
                                                          rounding_mode="floor")])  # fmt: skip
    return dict(coef=coef[:, :n].T.contiguous(), outliers=outl[:, :d].T.contiguous(),
                lambda_e=lam_e, lambda_z=lam_z, gram=G, support=support, passes=passes, replayed=total,
                active=active_sum, converged=converged, wide_columns=wide, overflow=overflow,
                steps=steps, reads=reads, dense=dense,
                timings={"lambdas": t1 - t0, "workset_cuda": t2 - t1})  # fmt: skip


def run(x: torch.Tensor, plan: Plan, opts: SSCOptions, *, affine: bool,
        outliers: bool) -> SSCSolution:  # fmt: skip
    """Route ``"workset_cuda"``: :func:`run_workset_cuda` on checked features ``x`` as
    ``plan`` says, with the program's parameters from the checked options ``opts``."""
    return run_workset_cuda(x, plan, affine=affine, outliers=outliers, **program_kwargs(opts))


def run_workset_cuda(x: torch.Tensor, plan: Plan, *, alpha_e: float, alpha_z: float,
                     rho: float, eps: float, max_iter: int, affine: bool = True,
                     outliers: bool = True, progress=None, slots: tuple[int, ...] = SLOTS,
                     outlier_slots: tuple[int, ...] | None = None, **_) -> SSCSolution:  # fmt: skip
    """The working sets on ``x``'s device (:func:`solve_workset_cuda`) as ``plan`` says,
    with :func:`~videoanchor.anchor.solvers.workset.run_workset`'s calling convention and result:
    ``coef`` in ``plan.work`` on ``x``'s device, certified in float64 on the device
    (``gap``: the largest relative duality gap; ``strategy`` ``"workset_cuda"`` or
    ``"workset_cuda_wide"``; ``history``: passes, wide and overflowing columns, host reads).
    Where a column outgrows the slots, the passes run out or the answer is not certified
    (gap below :data:`CERTIFIED`), the fast solver's answer (``plan.fallback``, with
    ``rho``, ``eps``, ``max_iter``, ``progress``) with ``solver="fast"`` and a warning
    giving its gap; where ``C`` is dense (:func:`solve_workset_cuda`'s ``dense``) that answer
    at once. ``slots``, ``outlier_slots``: the levels of slots (:data:`SLOTS`,
    :data:`OUTLIER_SLOTS`). The certificate from the solve's G and its slots (no dense
    product). Where the working sets fail (a compile, capture, out-of-memory or launch
    error: not a bad argument), the fast solver's answer on the device with one warning
    naming the cause (``history["workset_cuda"]["failure"]``); an ``SSCMemoryError`` where
    the fast solver does not fit either. Solves the method's program
    only (``affine``, ``outliers``)."""
    if not (affine and outliers):
        raise ValueError(
            "the working sets solve the method's program (affine=True, outliers=True), got "
            f"affine={affine}, outliers={outliers}; use solver 'fast' or 'faithful'"
        )
    if getattr(progress, "schedules_only", False):  # a scheduler's hook: its turn
        progress.wait()
    y = x.detach().to(torch.float64).T  # (the program's Y, for either answer's certificate)
    failure = None
    try:
        out = solve_workset_cuda(x, alpha_e=alpha_e, alpha_z=alpha_z, slots=slots,
                                 outlier_slots=outlier_slots, checked=True)  # fmt: skip
        history = {k: out[k] for k in ("passes", "active", "wide_columns", "overflow", "dense")}
        history["host_reads"] = len(out["reads"])
        timings = out["timings"]
        if out["dense"] is None:
            history["host_reads"] += 1  # (the certificates' floats, in one copy)
            res = SSCSolution.certified(
                y, out["coef"], out["outliers"], out["lambda_e"],
                out["lambda_z"], like=x, dtype=plan.work, timings=timings, gram=out["gram"],
                support=out["support"],
                iterations=out["passes"], converged=out["converged"], history=history,
                solver=plan.solver,
                strategy="workset_cuda_wide" if out["wide_columns"] else "workset_cuda")  # fmt: skip
            if res.converged and res.residual < CERTIFIED:
                return res
            timings = res.timings
    except (ValueError, TypeError):  # (a caller's argument: said as it is)
        raise
    except Exception as exc:  # noqa: BLE001 - a compile, capture, memory or launch failure
        # (issue 98 defect 7: the fast solver answers on the device; the exception and its
        # frames, holding the call's tensors, are dropped before it runs)
        failure = " ".join(f"{type(exc).__name__}: {exc}".split())[:400]
    if failure is not None:
        out = dict(dense=None, overflow=0, converged=False)
        history, timings = {"failure": failure}, {}
    # (solve_workset_cuda's lambdas named the dark tokens: the fallback does not again)
    try:
        fast = run_admm(x, plan.fallback, alpha_e=alpha_e, alpha_z=alpha_z, rho=rho, eps=eps,
                        max_iter=max_iter, progress=progress, warn_dark=False)  # fmt: skip
    except (torch.OutOfMemoryError, MemoryError) as exc:
        if failure is None:
            raise
        raise SSCMemoryError(
            f"neither the working sets on {x.device} ({failure}) nor the fast solver "
            f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]}) fit for these "
            f"{x.shape[0]} tokens; use fewer frames or mode='blocked', or free device memory"
        ) from exc
    why = (f"they failed: {failure}" if failure else
           f"C is dense here: {out['dense']}" if out["dense"] else
           f"{out['overflow']} columns outgrew {slots[-1]} slots" if out["overflow"] else
           "the passes ran out" if not out["converged"] else f"its gap {res.residual:.3g}")  # fmt: skip
    fast.uncertified(y, "the working sets on the GPU did not certify these "
                     f"{x.shape[0]} tokens ({why})")  # fmt: skip
    fast.history = {"workset_cuda": history, "fast": fast.history}
    fast.timings = {**timings, **{f"fast_{k}": v for k, v in fast.timings.items()}}
    return fast
