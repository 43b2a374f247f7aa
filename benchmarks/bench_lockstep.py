"""A lockstep working-set solver in torch, on any device: a prototype of issue 52's GPU
working sets (not in the package), timed against the fast solver on the same device.

The SSC program (docs/method.md section 2, ``E`` eliminated: a Huber function of each
column's residual with threshold ``t = lambda_e / lambda_z``) separates over the columns of
``C``. Here every column takes one step of the feature-sign active-set method (Lee, Battle,
Raina & Ng 2007) per iteration, all columns at once in batched tensors of ``K`` slots:

1. minimise the column's model on its active set with its signs fixed, subject to
   ``1^T c = 1``: the l1 term (linear there), the data term's gradient at ``c`` and its
   curvature ``lambda_z Y_IA^T Y_IA`` over the rows ``I`` whose residual is inside ``t``
   (the rows outside, at most ``outlier_rows`` of them, listed per column in a padded
   table): a batched Cholesky factorisation, ``K x K`` per column. That model is the
   objective until a coefficient or a residual changes side. A column with more rows past
   ``t``, or whose rows inside ``t`` leave that curvature singular (more coefficients than
   such rows, as from a start far off), takes ``lambda_z G_AA`` instead, which bounds the
   Huber function's curvature (a majorize-minimize step);
2. step towards the model's minimiser: up to the first coefficient that reaches zero (it
   leaves the set; a new one going the wrong way leaves at once), and, for an exact model,
   the whole way only where the objective falls there, else up to the first residual that
   crosses ``t``: the objective falls;
3. where the whole step was taken and the KKT conditions hold on the set, add the
   coefficient whose condition ``|y_j^T u + nu| <= 1`` (``u = lambda_z clip(r, -t, t)``) is
   violated most, with the sign of ``y_j^T u + nu``; a column with none above ``tol`` is done.

``coef_init`` starts each column from an approximation instead (its largest ``K``
entries, divided by their sum onto the constraint, signs kept; a column whose sum is not
positive starts from its nearest point): the rows time it from the fast solver's answer too
(``warm_*``, ``seconds_warm`` after the fast solve).

Each iteration is two ``D x N x N`` products (the step's residual change and the gradient),
one batched ``K x K`` factorisation and element-wise work over ``D x N``; the host reads
whether every column is done every ``check_every`` iterations. The answer is checked by the program's duality gap
(:func:`videoanchor.anchor.duality_gaps`, float64 on the CPU). Measured on this CPU (one
thread, ``benchmarks/results/lockstep_cpu.json``): iterations, certified columns, time
(the batched form is not what a CPU should run: the Numba working sets are). The GPU run is
a step of ``benchmarks/run_gpu.sh`` (``lockstep``) and has not run.

``--compile`` runs the iteration through ``torch.compile`` (one graph; about 180 operators
an iteration eagerly, 7-8 fused kernels and 8-9 library calls compiled for the CPU) and
writes ``lockstep_compiled_<device>.json``.

    python benchmarks/bench_lockstep.py [--device cuda] [--compile] [--frames 4 8] [--patches 48] [--dim 1024]
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.bench_spectral import _sync  # noqa: E402
from benchmarks.bench_ssc import video_tokens  # noqa: E402
from benchmarks.common import environment, print_table, write_result  # noqa: E402
from videoanchor.anchor import duality_gaps, solve_ssc_admm  # noqa: E402
from videoanchor.anchor.ssc import ssc_lambdas  # noqa: E402
from videoanchor.anchor.workset import nearest_points  # noqa: E402

DONE, RUNNING, FAILED = 1, 0, -1


def _huber(r, t, lam_e, lam_z):
    a = r.abs()
    return torch.where(a <= t, 0.5 * lam_z * r * r, lam_e * (a - 0.5 * t))


def lockstep_workset(x, lam_e: float, lam_z: float, *, slots: int = 96, outlier_rows: int = 64,
                     max_iter: int = 1000, tol: float = 1e-9, check_every: int = 8,
                     coef_init=None, compile: bool = False):  # fmt: skip
    """``(C, status, iterations)`` for features ``x`` (``N x D``) in float64 on ``x``'s
    device, from each point's nearest other point (module docstring). ``status`` per column:
    ``DONE``, ``RUNNING`` (out of iterations) or ``FAILED`` (its set outgrew ``slots``, or
    a singular factor). A column with more than ``outlier_rows`` residuals past ``t`` takes
    the majorize-minimize step. ``compile``: the iteration through ``torch.compile`` (its
    element-wise operators fused: about 180 operators an iteration run eagerly)."""
    dt, dev = torch.float64, x.device
    x = x.to(dt)
    n, d = x.shape
    y = x.T.contiguous()
    gram = x @ x.T
    t = lam_e / lam_z
    k, w = min(slots, n - 1), min(outlier_rows, d)
    idx = torch.zeros(n, k, dtype=torch.long, device=dev)
    idx[:, 0] = nearest_points(gram)
    c = torch.zeros(n, k, dtype=dt, device=dev)
    c[:, 0] = 1.0
    if coef_init is not None:  # each column's largest entries, onto the constraint, signs kept
        start = coef_init.to(dev, dt).clone().T  # row i: column i of C
        start.fill_diagonal_(0.0)
        val, pos = start.abs().topk(k, dim=1)
        kept = start.gather(1, pos) * (val > 0)
        total = kept.sum(1, keepdim=True)
        ok = total[:, 0] > 0
        idx = torch.where(ok[:, None], pos, idx)
        c = torch.where(ok[:, None], kept / torch.where(ok[:, None], total, 1.0), c)
    sig, act = torch.sign(c), c != 0
    status = torch.zeros(n, dtype=torch.long, device=dev)

    ids = (torch.arange(d, device=dev), torch.arange(w, device=dev))
    r = y - y @ _dense(c, idx, act)
    corr = y.T @ (lam_z * r.clamp(-t, t))  # corr[j, i] = y_j^T u_i: minus the data term's gradient
    state = (c, sig, act, idx, status, r, corr)
    step = torch.compile(_iteration, dynamic=False, fullgraph=True) if compile else _iteration
    it = 0
    while it < max_iter:
        it += 1
        refresh = it % check_every == 0
        state = step(state, x, y, gram, ids, t, lam_e, lam_z, w, tol, refresh)
        if refresh and not bool((state[4] == RUNNING).any()):  # the host read
            break
    c, _, act, idx, status, _, _ = state
    return _dense(c, idx, act), status, it


def _dense(v, idx, act):
    """The ``N x N`` matrix with column ``i``'s active slots ``v[i]`` at rows ``idx[i]``
    (active slots never repeat)."""
    n = v.shape[0]
    cols = torch.arange(n, device=v.device)[:, None].expand_as(idx).reshape(-1)
    out = torch.zeros(n, n, dtype=v.dtype, device=v.device)
    return out.index_put_((idx.reshape(-1), cols), (v * act).reshape(-1), accumulate=True)


def _iteration(state, x, y, gram, ids, t, lam_e, lam_z, w, tol, refresh):
    """One step of every running column (module docstring): the new state. ``refresh``
    recomputes the residual from ``C`` (the updates' drift). No host read."""
    c, sig, act, idx, status, r, corr = state
    row_ids, slots_w = ids
    n, dt = c.shape[0], c.dtype
    live = status == RUNNING
    m = act.to(dt)
    # each column's rows past t, in a padded list of w (a column with more: exact=False)
    out = r.abs() > t
    count = out.sum(0)
    exact = count <= w
    pos = torch.where(out, out.cumsum(0) - 1, w).clamp(max=w).T  # N x D, w: not listed
    rows = torch.zeros(n, w + 1, dtype=torch.long, device=c.device)
    rows = rows.scatter_(1, pos, row_ids[None, :].expand(n, -1))[:, :w]
    listed = (slots_w[None, :] < count[:, None]) & exact[:, None]
    yo = x[idx[:, :, None], rows[:, None, :]] * listed[:, None, :]  # N x K x w
    # the model on the set with its signs: the l1 term, the data term's gradient and its
    # curvature, lambda_z Y_IA^T Y_IA (exact: the objective until a sign or a residual
    # changes side) or, where the rows inside t leave that singular (more coefficients than
    # such rows, as from a start far off), lambda_z G_AA (a majorize-minimize step)
    h_mm = lam_z * gram[idx[:, :, None], idx[:, None, :]]
    h_ex = h_mm - lam_z * (yo @ yo.transpose(1, 2))
    pad, eye = m[:, :, None] * m[:, None, :], torch.diag_embed(1 - m)
    f_ex, info_ex = torch.linalg.cholesky_ex(h_ex * pad + eye)
    f_mm, info = torch.linalg.cholesky_ex(h_mm * pad + eye)
    exact = exact & (info_ex == 0)
    h = torch.where(exact[:, None, None], h_ex, h_mm)
    factor = torch.where(exact[:, None, None], f_ex, f_mm)
    b = (h @ c[:, :, None])[..., 0] + corr.T.gather(1, idx) - sig
    status = status.masked_fill(live & (info != 0), FAILED)
    # two triangular solves: cholesky_solve checks its info on the host (a device read)
    rhs = torch.stack([b * m, m], -1)
    sol = torch.linalg.solve_triangular(factor, rhs, upper=False)
    sol = torch.linalg.solve_triangular(factor.transpose(1, 2), sol, upper=True)
    nu = (1 - (m * sol[..., 0]).sum(1)) / (m * sol[..., 1]).sum(1)
    new = (sol[..., 0] + nu[:, None] * sol[..., 1]) * m
    live = status == RUNNING
    step = torch.where(live[:, None], new - c, torch.zeros_like(c))
    # the first coefficient to reach zero (a new one going the wrong way: at once)
    cross = act & (new * sig <= 0)
    at = torch.where(c != 0, c / torch.where(cross, c - new, 1.0), torch.zeros_like(c))
    at = torch.where(cross, at, torch.full_like(c, 2.0))
    a_sign, first = at.min(1)
    cap = a_sign.clamp(max=1.0)
    # an exact model past a residual's crossing of t: the whole step where the objective
    # falls there, else up to the first crossing (a majorizing model: the whole step)
    dr = -(y @ _dense(step, idx, act))
    toward = torch.where(out, torch.sign(r), torch.sign(dr)) * t
    moving = (~out & (dr != 0)) | (out & (dr * r < 0))
    a_row = torch.where(moving, (toward - r) / torch.where(dr == 0, 1.0, dr), 2.0)
    a_row = torch.where(a_row > 0, a_row, 2.0).amin(0)

    def objective(a):
        return (c + a[:, None] * step).abs().sum(1) + _huber(r + a * dr, t, lam_e, lam_z).sum(0)

    whole = ~exact | (objective(cap) <= objective(torch.zeros_like(cap)))
    alpha = torch.where(whole, cap, torch.minimum(cap, a_row))
    alpha = torch.where(live, alpha, torch.zeros_like(alpha))
    c = c + alpha[:, None] * step
    r = r + alpha * dr
    drop = torch.zeros_like(act).scatter_(1, first[:, None], (live & (a_sign <= alpha))[:, None])
    c = c.masked_fill(drop, 0.0)
    act = act & ~drop
    sig = sig * act
    if refresh:
        r = y - y @ _dense(c, idx, act)  # the updates' drift
    corr = y.T @ (lam_z * r.clamp(-t, t))
    # KKT where the whole step was taken: on the set, then the worst violation off it
    full = live & (alpha >= 1.0)
    z = corr + nu
    on = ((z.T.gather(1, idx) - sig).abs() * act).amax(1) <= tol
    held = _dense(torch.ones_like(c), idx, act) > 0
    held = held | torch.eye(n, dtype=torch.bool, device=c.device)
    worst, j = (z.abs() - 1).masked_fill(held, -math.inf).max(0)
    add = full & on & (worst > tol)
    status = status.masked_fill(full & on & ~(worst > tol), DONE)
    free = ~act
    slot = free.to(torch.int8).argmax(1)
    status = status.masked_fill(add & ~free.any(1), FAILED)
    add = add & free.any(1)
    # the new coefficient's slot, by masks (indexing by a boolean mask reads the device)
    sel = torch.zeros_like(act).scatter_(1, slot[:, None], add[:, None])
    idx = torch.where(sel, j[:, None], idx)
    act = act | sel
    sig = torch.where(sel, torch.sign(z.gather(0, j[None, :]))[0][:, None], sig)
    return c, sig, act, idx, status, r, corr


def run_one(x, device, max_iter, compile=False) -> dict:
    x64 = x.double()
    lam_e, lam_z, _, _ = ssc_lambdas(x64, 800.0, 800.0)
    xd = x.to(device)
    solve_ssc_admm(xd, scheduled=True, progress=False)  # warm-up: library start-up
    _sync(device)
    compile_seconds = None
    if compile:  # compiles both iterations (with and without the refresh), untimed below
        tc = time.perf_counter()
        lockstep_workset(xd, lam_e, lam_z, max_iter=8, check_every=8, compile=True)
        _sync(device)
        compile_seconds = time.perf_counter() - tc
    t0 = time.perf_counter()
    fast = solve_ssc_admm(xd, scheduled=True, progress=False)
    _sync(device)
    t1 = time.perf_counter()
    coef, status, iterations = lockstep_workset(
        xd, lam_e, lam_z, max_iter=max_iter, compile=compile
    )
    _sync(device)
    t2 = time.perf_counter()
    warm, warm_status, warm_iterations = lockstep_workset(
        xd, lam_e, lam_z, max_iter=max_iter, coef_init=fast.coef, compile=compile
    )
    _sync(device)
    t3 = time.perf_counter()
    gaps = duality_gaps(x64, coef, lam_e, lam_z)
    warm_gaps = duality_gaps(x64, warm, lam_e, lam_z)
    fast_gaps = duality_gaps(x64, fast.coef, lam_e, lam_z)
    best = float(torch.minimum(gaps.primal, warm_gaps.primal).sum())
    return {
        "n": x.shape[0], "d": x.shape[1], "iterations": iterations,
        "columns_done": int((status == DONE).sum()), "columns_failed": int((status == FAILED).sum()),
        "columns_certified": int((gaps.gap < 1e-9).sum()), "max_gap": float(gaps.gap.max()),
        "affine_violation": gaps.affine, "nonzeros_median": float((coef != 0).sum(0).median()),
        "warm_iterations": warm_iterations,
        "warm_columns_certified": int((warm_gaps.gap < 1e-9).sum()),
        "warm_max_gap": float(warm_gaps.gap.max()), "warm_affine_violation": warm_gaps.affine,
        "fast_nonzeros_median": float((fast.coef != 0).sum(0).double().median()),
        "seconds_lockstep": t2 - t1, "seconds_warm": t3 - t2, "seconds_fast": t1 - t0,
        "lockstep_over_fast": (t2 - t1) / (t1 - t0),
        "fast_and_warm_over_fast": (t3 - t2 + t1 - t0) / (t1 - t0),
        "fast_objective_gap": (float(fast_gaps.primal.sum()) - best) / best,
        "compiled": compile, "compile_seconds": compile_seconds,
    }  # fmt: skip


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--frames", type=int, nargs="+", default=None)
    ap.add_argument("--patches", type=int, default=48)
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--max-iter", type=int, default=1000)
    ap.add_argument("--compile", action="store_true", help="the iteration through torch.compile")
    ap.add_argument("--quick", action="store_true", help="2 frames of 24 patches, D = 64")
    ap.add_argument("--out-dir", default=None)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if args.quick:
        args.frames, args.patches, args.dim = [2], 24, 64
    frames = args.frames or [4, 8]
    if device.type == "cpu":
        torch.set_num_threads(1)
    meta = environment(args.device)
    meta["timing"] = "one solve each after a warm-up of the fast solver, in one process"
    rows = []
    for f in frames:
        x = video_tokens(f, args.patches, args.dim, seed=0)
        rows.append(
            {
                "frames": f,
                "patches": args.patches,
                **run_one(x, device, args.max_iter, args.compile),
            }
        )
        print(rows[-1], flush=True)
    name = ("lockstep_quick" if args.quick else "lockstep") + ("_compiled" if args.compile else "")
    path = write_result(name, meta, rows, args.out_dir)
    print_table(rows, ["n", "d", "iterations", "columns_certified", "max_gap", "warm_iterations",
                       "warm_columns_certified", "seconds_lockstep", "seconds_warm",
                       "seconds_fast", "lockstep_over_fast"])  # fmt: skip
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
