"""The working sets on the features' device: each column's inner steps in its own Triton
program, the passes in torch on the same device (docs/ssc-gpu.md has the design and its
static checks).

- **one program per column at a time** (the Triton kernel, persistent:
  :mod:`videoanchor.anchor.solvers._workset_triton`) holds the column's working set in ``M``
  slots and solves the program restricted to it by the primal active-set method of
  :mod:`videoanchor.anchor.solvers.workset`; the support's system lives in a per-program
  scratch in global memory and its inverse in the column's own, carried from
  pass to pass (rebuilt only where a run did not solve the column or joined at the ridge),
  both read in row tiles, so the registers follow the tile, not ``M``; a product with
  either (both symmetric) weights each tile's rows by the vector's entries there (staged in
  a per-program vector scratch) and sums over the rows once after the sweep, so that the
  sweep's iterations hold no reduction;
- **the passes** (:func:`_pass`) run in torch on all columns at once, with no host read
  inside a pass and one after it; float32 products until no column violates at ``SCREEN``,
  then float64 to ``tol``: the answer is certified in float64;
- **two levels of slots**: a column that fills ``slots[0]`` continues alone with
  ``slots[1]``; one that outgrows those too, or passes that run out, gives the whole call
  the fast solver's answer with a warning (``strategy``: ``"workset_cuda"``,
  ``"workset_cuda_wide"`` or the fast solver's).

Triton is imported when this solver runs (the kernel's first launch, :func:`launch`), never
by ``import videoanchor``.
"""

from __future__ import annotations

import math
import re
import time

import torch

from videoanchor.anchor._inputs import as_feature_tensor
from videoanchor.anchor.options import SSCOptions
from videoanchor.anchor.plan import Plan
from videoanchor.anchor.program import (
    SSCSolution,
    gram_row_max,
    nearest_points,
    ssc_lambdas,
)
from videoanchor.anchor.solvers import program_kwargs
from videoanchor.anchor.solvers.admm import run_admm

__all__ = ["SLOTS", "SLOT_COUNTS", "run", "run_workset_cuda", "solve_workset_cuda", "warm_up"]

#: A column's end in a kernel run: its set is optimal; the inner steps ran out.
SOLVED, STALLED = 0, 1
#: The two levels of slots: every column's, and the wider one for a column that fills it
#: (video-like tokens at N = 2064 need up to ~114: 98 coefficients and 16 new; docs/ssc.md).
SLOTS = (128, 512)
#: Every slot count a level may have: powers of two, 4 to 512 (1024 spills 428 bytes on
#: sm_90; tests/test_workset_cuda.py compiles each for sm_90 and sm_80).
SLOT_COUNTS = (4, 8, 16, 32, 64, 128, 256, 512)
#: Slot counts that Triton before 3.9 does not compile (its RemoveLayoutConversions pass
#: fails on the kernel for sm_90 and sm_80 at 4 warps, whatever the row tile: the H100 of
#: 2026-11-27 with Triton 3.6 at 64; Triton 3.6.0's compiler here at 32 and 64, at 2 and 8
#: warps too but 64 at 2, which spills 1 KB with 3.9): refused up front on CUDA there.
OLD_TRITON_FAILS = (32, 64)
#: Elements of one row tile (``BR x M``): the registers a program holds for a matrix. With
#: the sweeps' one reduction after the loop (2c09e9e) the H100 (Triton 3.6) ran the working
#: sets at 2048 in 0.85-0.92x the previous kernel's time, at 1024 in 0.81-0.84x (16, 32 and
#: 64 frames, one process: benchmarks/results/logs/h100-2026-11-28/ab_kernel.json). 2048
#: stays: Triton 3.9 compiles it for sm_90 and sm_80 without spills, where 1024 spills 56
#: bytes at 128 slots (test_every_slot_count_accepted_compiles); Triton 3.6 spills 356
#: bytes at 2048 and none at 1024. ``tile=`` keeps the knob.
TILE = 2048
#: The relative KKT violation below which a float32 pass adds nothing: then float64 passes
#: follow (float32's products are good to ~1e-6 relative here).
SCREEN = 1e-5
#: The kernel's smallest Schur pivot of a join, relative to the variable's diagonal.
RIDGE = 1e-10
#: The largest relative duality gap of an answer called certified (as the CPU's sets).
CERTIFIED = 1e-8
#: ``C`` is dense, and the fast answer stands, where more than this share of the columns
#: fills the first level's slots (the 64-frame video-like set: 943 of 8192, certified in
#: the wide level); or before any pass, :func:`dense_at_start`.
WIDE_SHARE = 0.25


def row_tile(slots: int, tile: int = TILE) -> int:
    """Rows per tile at ``slots`` slots (``tile`` elements, at least one row)."""
    return max(1, min(slots, tile // slots))


def launch(state: dict, *, programs: int, work: torch.Tensor | None = None,
           num_warps: int = 4) -> None:  # fmt: skip
    """One kernel run over the columns of ``state`` (:func:`_state`) at the positions
    ``work`` (int32 on the device; None: all of them), in place. The kernel's module (and
    Triton) is imported on the first launch."""
    from videoanchor.anchor.solvers import _workset_triton

    M = state["ids"].shape[1]
    if work is None:
        work = torch.arange(state["ids"].shape[0], dtype=torch.int32, device=state["ids"].device)
    # (one scratch for the level's widest run: a run over fewer columns uses its first rows)
    scratch = state.get("H")
    if scratch is None:
        rows = max(1, min(programs, state["ids"].shape[0]))
        scratch = state["H"] = torch.empty(rows, M, M, dtype=torch.float64,
                                           device=state["ids"].device)  # fmt: skip
        state["V"] = torch.empty(rows, 2, M, dtype=torch.float64, device=scratch.device)
    p = state["program"]
    _workset_triton._columns_kernel[(max(1, min(scratch.shape[0], len(work))),)](
        p["G"], p["X"], state["cols"], state["ids"], state["z"], state["mu"], state["status"],
        state["steps_pass"], scratch, state["Hinv"], state["V"], p["scalars"], work, len(work),
        p["n"], p["d"], p["max_inner"], int(state["first"]), M=M, BR=row_tile(M, p.get("tile", TILE)),
        num_warps=num_warps,
    )  # fmt: skip
    state["first"] = False


def dense_at_start(X: torch.Tensor, nearest: torch.Tensor, lam_e: float, lam_z: float,
                   slots: int) -> torch.Tensor:  # fmt: skip
    """Whether ``C`` is dense before any pass (a 0-d bool on the device): the lower median
    column has more outlier entries violating at its nearest point (``c_i = e_nearest``, the
    first pass's start; at the float32 passes' ``SCREEN``) than the first level's ``slots``.
    Its minimiser's outlier term is then dense: 2286 of D = 3584 entries violate on
    ``bench_request_cost``'s synthetic set (N = 2048; the working sets ran 71.8 s there on an
    H100 before the fast answer stood), 204-730 on smaller synthetic sets, 9-48 on video-like
    tokens of 16-64 frames (Qwen2.5-VL-7B and InternVL2-8B shapes), which certify (issue 76).
    ``X``: the features (``N x D``), ``nearest``: each point's nearest point."""
    r = (X[nearest] - X).abs_()  # |y_nearest - y_i|, each point's row: (N, D)
    count = (r > lam_e * (1.0 + SCREEN) / lam_z).sum(dim=1)
    return count.median() > slots


def warm_up(device, slots: tuple[int, ...] = SLOTS, tile: int = TILE) -> dict[int, float]:
    """Compile the kernel on ``device`` for each level of ``slots`` (into Triton's cache, on
    disk: a later process loads it) by a launch over no columns; the seconds per level. A
    first solve compiles only the levels it reaches (the wide one where a column fills the
    first), 10.5 s on an H100 (2026-11-27) for the first."""
    device = torch.device(device)
    f64 = dict(dtype=torch.float64, device=device)
    one = torch.zeros(1, 1, **f64)
    program = dict(G=one, X=one, n=1, d=1, scalars=torch.zeros(5, **f64), max_inner=1,
                   tile=tile)  # fmt: skip
    none = torch.zeros(0, dtype=torch.int64, device=device)
    took = {}
    for M in _checked_slots(slots, device):
        t = time.perf_counter()
        launch(_state(program, none, none.new_full((0, M), -1), torch.zeros(0, M, **f64)),
               programs=1)  # fmt: skip
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        took[M] = time.perf_counter() - t
    return took


def _checked_slots(slots, device: torch.device) -> tuple[int, ...]:
    """``slots`` as a tuple, or a ValueError: increasing counts of :data:`SLOT_COUNTS`, and
    on CUDA with a Triton before 3.9 none of :data:`OLD_TRITON_FAILS`."""
    slots = tuple(int(s) for s in slots)
    if not slots or any(s not in SLOT_COUNTS for s in slots) or list(slots) != sorted(set(slots)):
        raise ValueError(
            f"slots: expected increasing slot counts from {SLOT_COUNTS} (each compiled for "
            f"sm_90 and sm_80 in the tests), got {slots}"
        )
    bad = [s for s in slots if s in OLD_TRITON_FAILS]
    if bad and device.type == "cuda":
        import triton

        if tuple(int(v) for v in re.findall(r"\d+", triton.__version__)[:2]) < (3, 9):
            ok = tuple(s for s in SLOT_COUNTS if s not in OLD_TRITON_FAILS)
            raise ValueError(
                f"slots: {bad} do not compile with triton {triton.__version__} (its "
                "RemoveLayoutConversions pass fails on this kernel at 32 and 64 slots for sm_80 "
                f"and sm_90; Triton 3.9 compiles them): expected counts from {ok}, got {slots}"
            )
    return slots


def _state(program: dict, cols: torch.Tensor, ids: torch.Tensor, z: torch.Tensor) -> dict:
    n = len(cols)
    dev = ids.device
    return dict(program=program, cols=cols, ids=ids, z=z,
                mu=torch.zeros(n, dtype=torch.float64, device=dev),
                status=torch.zeros(n, dtype=torch.int32, device=dev),
                steps_pass=torch.zeros(n, dtype=torch.int32, device=dev),
                steps=torch.zeros(n, dtype=torch.int64, device=dev),
                aside=torch.zeros(n, dtype=torch.bool, device=dev),
                # each column's inverse over its support, carried from pass to pass by the
                # kernel (zero before the level's first pass, ``first``)
                Hinv=torch.zeros((*ids.shape, ids.shape[1]), dtype=torch.float64, device=dev),
                first=True)  # fmt: skip


def _scatter(ids: torch.Tensor, z: torch.Tensor, width: int) -> torch.Tensor:
    """Each row's slots as a dense row of ``width`` variables (empty slots into a column
    past the end, dropped): no host read."""
    out = torch.zeros((ids.shape[0], width + 1), dtype=z.dtype, device=z.device)
    out.scatter_(1, torch.where(ids >= 0, ids, width), z)
    return out[:, :width]


def _pass(state: dict, work: torch.Tensor | None = None, *, exact: bool, grow: int,
          programs: int, run: bool = True, redo: int = 0):  # fmt: skip
    """One pass over the columns of ``state`` at the positions ``work`` (int32 on the
    device; None: all), on their device with no host read: the kernel (where ``run``), the
    KKT violations of their variables (products in float64 where ``exact``, else float32),
    the ``grow`` worst into each column's free slots. A column whose slots are full while a
    variable violates is set aside (``state["aside"]``). The columns that the next pass
    runs, those of ``work`` that took variables, did not solve or whose support is off its
    own stationarity (float64 passes), lead ``state["next"]`` (the others are solved: the
    program is separable in its columns); those off their stationarity lead
    ``state["redo"]``, whose first ``redo`` the next pass zeroes the inverses of before its
    run (the kernel then rebuilds them from zero).
    Returns the flags the host reads after it: ``[a column of work not aside violates,
    every column of work not aside is solved, every such column took at most one inner
    step, the columns aside (all of the state's), the columns of the next pass, the columns
    off their stationarity]`` (int64)."""
    nc = state["ids"].shape[0]
    if work is None:
        work = torch.arange(nc, dtype=torch.int32, device=state["ids"].device)
    if run:
        if redo:  # the last pass's columns off their stationarity: inverses rebuilt from zero
            state["Hinv"].index_fill_(0, state["redo"][:redo].long(), 0.0)
        launch(state, programs=programs, work=work)
    p = state["program"]
    n, d = p["n"], p["d"]
    w = work.long()
    ids, z, cols = state["ids"][w], state["z"][w], state["cols"][w]
    status, steps_pass = state["status"][w], state["steps_pass"][w]
    if run:
        state["steps"].index_add_(0, w, steps_pass.long())
    nw, M = ids.shape
    full = _scatter(ids, z, n + d)  # (nw, n + d): column k's variables in row k
    dt = torch.float64 if exact else torch.float32
    X = p["X"] if exact else p["X32"]
    c, e = full[:, :n].T.to(dt), full[:, n:].T.to(dt)
    r = X.T[:, cols] - X.T @ c - e  # (D, nw): each column's residual
    m = p["lam_z"] * torch.cat([X @ r, r]).T  # (nw, N + D): lambda_z P^T r per column
    m[:, :n] -= state["mu"][w][:, None].to(dt)
    viol = torch.cat([(m.abs() - p["weights"].to(dt)) / p["weights"].to(dt),
                      torch.zeros(nw, 1, dtype=dt, device=m.device)], dim=1)  # fmt: skip
    # c_i stays 0; the support is not a candidate (a scalar's scatter: no copy to the device)
    viol.scatter_(1, cols[:, None], -math.inf)
    support = (ids >= 0) & (z != 0)
    viol.scatter_(1, torch.where(support, ids, n + d), -math.inf)
    top, new = viol[:, : n + d].topk(min(grow, n + d - 1, M), dim=1)
    fresh = top > (p["tol"] if exact else SCREEN)
    # the support's own stationarity, m_j = sign(z_j) w_j (float64 passes: the kernel's
    # inverse may have carried the rounding of near-singular joins): where it fails, the
    # column runs again with its inverse rebuilt from zero
    off = torch.zeros(nw, dtype=torch.bool, device=ids.device)
    if exact:
        at = torch.where(support, ids, 0)
        ws = p["weights"][at]
        err = (m.gather(1, at) - torch.sign(z) * ws).abs() / ws
        off = torch.where(support, err, 0.0).amax(dim=1) > p["tol"]
    keep = support.sum(dim=1)
    aside = fresh.any(dim=1) & (keep == M)  # its slots are full: the next level's
    # each column keeps its support in its slots (the kernel's inverse over them stays
    # valid) and takes its violators into the free slots, lowest first
    free = torch.argsort(support.to(torch.int8), dim=1, stable=True)[:, : new.shape[1]]
    ok = fresh & (torch.arange(new.shape[1], device=ids.device)[None, :] < (M - keep)[:, None])
    ids2 = torch.cat([torch.where(support, ids, -1), ids.new_full((nw, 1), -1)], dim=1)
    ids2.scatter_(1, torch.where(ok, free, M), torch.where(ok, new, -1))
    state["ids"].index_copy_(0, w, torch.where(aside[:, None], ids, ids2[:, :M]))
    state["z"].index_copy_(0, w, torch.where(aside[:, None], z, torch.where(support, z, 0.0)))
    state["aside"].index_copy_(0, w, aside)
    live = ~aside
    off &= live  # (a column set aside starts the next level from a new inverse)
    state["redo"] = work[torch.argsort((~off).to(torch.int8), stable=True)]  # they lead
    again = live & (ok.any(dim=1) | off | (status != SOLVED))
    state["next"] = work[torch.argsort((~again).to(torch.int8), stable=True)]
    # (a float32 pass may flag variables that float64 finds optimal: where every kernel
    # run took at most one step, nothing joined, and float64 passes follow)
    return torch.stack([((fresh.any(dim=1) | off) & live).any(),
                        ((status == SOLVED) | aside).all(),
                        ((steps_pass <= 1) | aside).all(), state["aside"].sum(),
                        again.sum(), off.sum()])  # fmt: skip


def _solve_level(state: dict, *, precision: str, grow: int, max_passes: int, programs: int,
                 reads: list, max_aside: float = math.inf) -> tuple[int, bool]:  # fmt: skip
    """Passes over ``state`` until no column that is not set aside violates (float64), at
    most ``max_passes``, or until more than ``max_aside`` columns are set aside; returns the
    passes and whether it got there. One host read per pass (``reads`` counts them). A pass
    runs the columns that the last one gave variables or left unsolved; where float32 falls
    quiet, one float64 pass checks every column not set aside without a kernel run."""
    exact = precision == "float64"
    nc = state["ids"].shape[0]
    work, run, redo = None, True, 0
    for passes in range(1, max_passes + 1):
        flags = _pass(state, work, exact=exact, grow=grow, programs=programs, run=run,
                      redo=redo)  # fmt: skip
        any_fresh, all_solved, still, aside, count, redo = flags.tolist()  # the pass's read
        reads.append("pass")
        if aside > max_aside:
            return passes, False
        if all_solved and (not any_fresh or (still and passes > 1 and not exact)):
            if exact and not any_fresh:
                return passes, True
            if not exact:  # float32 quiet: float64 from here, every column checked once
                exact, run = True, False
                order = torch.argsort(state["aside"].to(torch.int8), stable=True)
                work = order[: nc - aside].to(torch.int32)
                continue
        work, run = state["next"][:count], True
    return max_passes, False


def solve_workset_cuda(features, *, alpha_e: float = 800.0, alpha_z: float = 800.0,
                       slots: tuple[int, ...] = SLOTS, grow: int = 16, tol: float = 1e-9,
                       max_passes: int = 500, max_inner: int = 1000,
                       precision: str = "float32", programs: int | None = None,
                       wide_share: float = WIDE_SHARE, tile: int = TILE) -> dict:  # fmt: skip
    """The program's minimiser for ``features`` (``N x D``) by the working sets on their
    device (module docstring), float64 inside the kernel. ``slots``: the slots per column at
    each level (increasing, from :data:`SLOT_COUNTS`; at most two levels are needed, more are allowed).
    ``programs``: the kernel's programs (None: 4 per SM on CUDA, 8 elsewhere). ``tile``: the
    elements of the kernel's row tiles (a power of two, :data:`TILE`).
    Where ``C`` is dense (:func:`dense_at_start`; or more than ``wide_share`` of the columns
    fill the first level) it stops there: ``dense`` says why (else None), ``coef`` and
    ``outliers`` are None where no pass ran.

    Returns a dict: ``coef``, ``outliers`` (float64, on the device), ``lambda_e``,
    ``lambda_z``, ``passes`` (the sum over the levels), ``converged`` (every column solved
    within its slots and the passes), ``wide_columns`` (columns that took a level past the
    first), ``overflow`` (columns whose set outgrew the last level), ``steps`` (per column,
    on the device), ``reads`` (host reads, by kind), ``dense`` and ``timings``."""
    t0 = time.perf_counter()
    x = as_feature_tensor(features)
    n, d = x.shape
    if n < 2:
        raise ValueError(f"SSC needs at least 2 points, got N = {n}")
    slots = _checked_slots(slots, x.device)
    if precision not in ("float32", "float64"):
        raise ValueError(f"precision: expected 'float32' or 'float64', got {precision!r}")
    for name, value in (("grow", grow), ("max_passes", max_passes), ("max_inner", max_inner)):
        if int(value) < 1:
            raise ValueError(f"{name}: expected a positive integer, got {value}")
    if not tol >= 0:
        raise ValueError(f"tol: expected a non-negative number, got {tol}")
    if int(tile) < 1 or int(tile) & (int(tile) - 1):
        raise ValueError(f"tile: expected a power of two, got {tile}")
    if not 0 < wide_share <= 1:
        raise ValueError(f"wide_share: expected a share in (0, 1], got {wide_share}")
    dev = x.device
    if programs is None:
        programs = (4 * torch.cuda.get_device_properties(dev).multi_processor_count
                    if dev.type == "cuda" else 8)  # fmt: skip
    reads: list = []
    X = x.detach().to(torch.float64).contiguous()
    G = X @ X.T
    G = (G + G.T) / 2  # (the kernel reads H's rows for its columns: exactly symmetric)
    lam_e, lam_z, _, _ = ssc_lambdas(X, alpha_e, alpha_z, row_max=gram_row_max(X, gram=G))
    reads += ["lambdas"] * 3  # (mu_e, mu_z and the median: ssc_lambdas' floats)
    f64 = dict(dtype=torch.float64, device=dev)
    scalars = torch.tensor([lam_z, lam_e, 0.0, tol, RIDGE], **f64)
    scalars[2] = lam_z * G.diagonal().max()  # gamma, on the device
    program = dict(G=G, X=X, X32=X.float(), n=n, d=d, lam_z=lam_z, scalars=scalars,
                   tol=float(tol), max_inner=int(max_inner), tile=int(tile),
                   weights=torch.cat([torch.ones(n, dtype=torch.float64, device=dev),
                                      torch.full((d,), lam_e, dtype=torch.float64,
                                                 device=dev)]))  # fmt: skip
    cols = torch.arange(n, device=dev)
    ids = torch.full((n, slots[0]), -1, dtype=torch.int64, device=dev)
    z = torch.zeros((n, slots[0]), dtype=torch.float64, device=dev)
    ids[:, 0], z[:, 0] = nearest_points(G), 1.0  # each column from its nearest point
    t1 = time.perf_counter()
    if bool(dense_at_start(X, ids[:, 0], lam_e, lam_z, slots[0])):
        reads.append("dense")
        return dict(coef=None, outliers=None, lambda_e=lam_e, lambda_z=lam_z, passes=0,
                    converged=False, wide_columns=0, overflow=0, steps=None, reads=reads,
                    dense=f"the median column has more outlier entries violating at its "
                    f"nearest point than {slots[0]} slots; the working sets did not run",
                    timings={"lambdas": t1 - t0, "workset_cuda": time.perf_counter() - t1})  # fmt: skip
    reads.append("dense")
    final_ids = torch.full((n, slots[-1]), -1, dtype=torch.int64, device=dev)
    final_z = torch.zeros((n, slots[-1]), dtype=torch.float64, device=dev)
    steps = torch.zeros(n, dtype=torch.int64, device=dev)
    total, converged, wide, overflow, dense = 0, True, 0, 0, None
    for level, M in enumerate(slots):
        state = _state(program, cols, ids, z)
        max_aside = wide_share * n if level == 0 and len(slots) > 1 else math.inf
        passes, done = _solve_level(state, precision=precision, grow=grow,
                                    max_passes=max_passes, programs=programs,
                                    reads=reads, max_aside=max_aside)  # fmt: skip
        total += passes
        converged &= done
        final_ids[cols, :M], final_z[cols, :M] = state["ids"], state["z"]
        steps[cols] += state["steps"]
        aside = state["aside"]
        count = int(aside.sum())
        reads.append("level")
        if count > max_aside:
            dense = (f"{count} of {n} columns filled {M} slots in {passes} passes (more than "
                     f"{wide_share:g} of them)")  # fmt: skip
            converged, overflow = False, count
            break
        if not count or not done or level + 1 == len(slots):
            overflow = count
            converged &= count == 0
            break
        wide += count if level == 0 else 0
        # the columns set aside continue with the next level's slots, from their sets
        keep = torch.nonzero(aside).flatten()
        cols = cols[keep]
        nxt = slots[level + 1]
        ids = torch.cat([state["ids"][keep], ids.new_full((count, nxt - M), -1)], dim=1)
        z = torch.cat([state["z"][keep], z.new_zeros((count, nxt - M))], dim=1)
    full = _scatter(final_ids, final_z, n + d)
    coef, outliers = full[:, :n].T.contiguous(), full[:, n:].T.contiguous()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    t2 = time.perf_counter()
    return dict(coef=coef, outliers=outliers, lambda_e=lam_e, lambda_z=lam_z, passes=total,
                converged=converged, wide_columns=wide, overflow=overflow, steps=steps,
                reads=reads, dense=dense,
                timings={"lambdas": t1 - t0, "workset_cuda": t2 - t1})  # fmt: skip


def run(x: torch.Tensor, plan: Plan, opts: SSCOptions, *, affine: bool,
        outliers: bool) -> SSCSolution:  # fmt: skip
    """Route ``"workset_cuda"``: :func:`run_workset_cuda` on checked features ``x`` as
    ``plan`` says, with the program's parameters from the checked options ``opts``."""
    return run_workset_cuda(x, plan, affine=affine, outliers=outliers, **program_kwargs(opts))


def run_workset_cuda(x: torch.Tensor, plan: Plan, *, alpha_e: float, alpha_z: float,
                     rho: float, eps: float, max_iter: int, affine: bool = True,
                     outliers: bool = True, progress=None, slots: tuple[int, ...] = SLOTS,
                     **_) -> SSCSolution:  # fmt: skip
    """The working sets on ``x``'s device (:func:`solve_workset_cuda`) as ``plan`` says,
    with :func:`~videoanchor.anchor.solvers.workset.run_workset`'s calling convention and result:
    ``coef`` in ``plan.work`` on ``x``'s device, certified in float64 on the device
    (``gap``: the largest relative duality gap; ``strategy`` ``"workset_cuda"`` or
    ``"workset_cuda_wide"``; ``history``: passes, wide and overflowing columns, host reads).
    Where a column outgrows the slots, the passes run out or the answer is not certified
    (gap below :data:`CERTIFIED`), the fast solver's answer (``plan.fallback``, with
    ``rho``, ``eps``, ``max_iter``, ``progress``) with ``solver="fast"`` and a warning
    giving its gap; where ``C`` is dense (:func:`solve_workset_cuda`'s ``dense``) that answer
    at once. ``slots``: the levels of slots (:data:`SLOTS`). Solves the method's program
    only (``affine``, ``outliers``)."""
    if not (affine and outliers):
        raise ValueError(
            "the working sets solve the method's program (affine=True, outliers=True), got "
            f"affine={affine}, outliers={outliers}; use solver 'fast' or 'faithful'"
        )
    if getattr(progress, "schedules_only", False):  # a scheduler's hook: its turn
        progress.wait()
    out = solve_workset_cuda(x, alpha_e=alpha_e, alpha_z=alpha_z, slots=slots)
    history = {k: out[k] for k in ("passes", "wide_columns", "overflow", "dense")}
    history["host_reads"] = len(out["reads"])
    y = x.detach().to(torch.float64).T  # (the program's Y, for either answer's certificate)
    timings = out["timings"]
    if out["dense"] is None:
        history["host_reads"] += 3  # (the certificate's three floats)
        res = SSCSolution.certified(
            y, out["coef"], out["outliers"], out["lambda_e"],
            out["lambda_z"], like=x, dtype=plan.work, timings=timings,
            iterations=out["passes"], converged=out["converged"], history=history,
            solver=plan.solver,
            strategy="workset_cuda_wide" if out["wide_columns"] else "workset_cuda")  # fmt: skip
        if res.converged and res.residual < CERTIFIED:
            return res
        timings = res.timings
    # (solve_workset_cuda's lambdas named the dark tokens: the fallback does not again)
    fast = run_admm(x, plan.fallback, alpha_e=alpha_e, alpha_z=alpha_z, rho=rho, eps=eps,
                    max_iter=max_iter, progress=progress, warn_dark=False)  # fmt: skip
    why = (f"C is dense here: {out['dense']}" if out["dense"] else
           f"{out['overflow']} columns outgrew {slots[-1]} slots" if out["overflow"] else
           "the passes ran out" if not out["converged"] else f"its gap {res.residual:.3g}")  # fmt: skip
    fast.uncertified(y, "the working sets on the GPU did not certify these "
                     f"{x.shape[0]} tokens ({why})")  # fmt: skip
    fast.history = {"workset_cuda": history, "fast": fast.history}
    fast.timings = {**timings, **{f"fast_{k}": v for k, v in fast.timings.items()}}
    return fast
