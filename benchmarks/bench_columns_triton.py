"""Working sets with one Triton program per column: a prototype of the GPU kernel that
docs/ssc.md's floor asks for (issue 52; not in the package), checked against the Numba
working sets.

The program (docs/method.md section 2) is, per column ``i``, a weighted lasso in
``z = [c; e]`` over ``P = [Y, I]`` with ``a^T z = 1`` (``a``: 1 on ``c``, 0 on ``e``) and
``c_i = 0``, as in ``videoanchor/anchor/_workset_kernel.py``. Here:

- **one program per column** (:func:`_columns_kernel`) holds the column's working set in
  ``M`` slots (a variable per slot: a coefficient ``0..N-1`` or an outlier entry ``N..``)
  and solves the program restricted to it by the primal active-set method: the worst
  violator joins the support with its multiplier's sign; the support's equality-constrained
  system is solved; where a support variable would change sign the step stops at the first
  and that variable leaves. The support's system ``lambda_z K_FF + gamma a a^T`` is kept as
  **its inverse over the slots** (a variable joins by a bordering update, leaves by a Schur
  downdate), so every step is a few tile-wide ``O(M^2)`` operations with no sequential
  triangular solve, as a Triton program wants; one refinement step against the system
  itself follows each solve. The inverse is rebuilt by joins at each pass's start;
- **the passes** run in torch over all columns at once (:func:`solve`): every variable's
  multiplier from the slots' answer (two products with ``Y``), the ``grow`` worst
  violators of each column into its free slots; none above ``tol``: done. Three host
  reads per pass (whether any column violates, whether all are solved, whether a set is full).

Checked here in Triton's interpreter (``TRITON_INTERPRET=1``, float64, small shapes: the
test against the Numba working sets' certified answer); compiled ahead of time for sm_90 by
``tests/test_bench_columns_triton.py``. Not timed on a GPU (no device was lent when it was
written): ``python benchmarks/bench_columns_triton.py --n 2064 --d 3584`` on one times it
against the fast solver on the same device.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import environment, print_table, write_result  # noqa: E402
from videoanchor.anchor._inputs import as_feature_tensor  # noqa: E402
from videoanchor.anchor.program import duality_gaps, gram_row_max, ssc_lambdas  # noqa: E402
from videoanchor.anchor.workset import nearest_points  # noqa: E402

#: A column's end in a pass: its set is optimal; the inner steps ran out.
SOLVED, STALLED = 0, 1
#: The smallest Schur pivot of a join, relative to the variable's diagonal.
RIDGE = 1e-10


@triton.jit
def _matvec(A, x):
    return tl.sum(A * x[None, :], axis=1)


@triton.jit
def _join(Hinv, H, F, q, offs, ridge):
    """The inverse of the support's system with slot ``q`` joined (``F``: the support
    before, without ``q``; ``Hinv`` zero outside ``F``)."""
    hq = tl.sum(tl.where(offs[None, :] == q, H, 0.0), axis=1)
    eta = tl.sum(tl.where(offs == q, hq, 0.0))
    h = tl.where(F, hq, 0.0)
    u = _matvec(Hinv, h)
    delta = tl.maximum(eta - tl.sum(h * u), ridge * eta)
    Hinv = Hinv + u[:, None] * u[None, :] / delta
    eq = offs == q
    Hinv = tl.where(eq[:, None], -u[None, :] / delta, Hinv)
    Hinv = tl.where(eq[None, :], -u[:, None] / delta, Hinv)
    return tl.where(eq[:, None] & eq[None, :], 1.0 / delta, Hinv)


@triton.jit
def _leave(Hinv, p, offs):
    """The inverse with slot ``p`` left out of the support (a Schur downdate)."""
    ep = offs == p
    cp = tl.sum(tl.where(ep[None, :], Hinv, 0.0), axis=1)
    d = tl.sum(tl.where(ep, cp, 0.0))
    cp = tl.where(ep, 0.0, cp)
    Hinv = Hinv - cp[:, None] * cp[None, :] / d
    return tl.where(ep[:, None] | ep[None, :], 0.0, Hinv)


@triton.jit
def _target(Hinv, H, F, r, a):
    """The support's equality-constrained minimiser (zero off ``F``) and its multiplier
    ``t`` of the border: ``H z = r + t a``, ``a^T z = 1``, refined once against ``H``."""
    af = tl.where(F, a, 0.0)
    x1 = _matvec(Hinv, r)
    x2 = _matvec(Hinv, af)
    den = tl.sum(af * x2)
    t = (1.0 - tl.sum(af * x1)) / den
    z = x1 + t * x2
    for _ in tl.static_range(2):
        res = tl.where(F, r + t * af - _matvec(H, z), 0.0)
        dz = _matvec(Hinv, res)
        dt = (1.0 - tl.sum(af * (z + dz))) / den
        z = z + dz + dt * x2
        t = t + dt
    return z, t


@triton.jit
def _columns_kernel(G, X, ids_ptr, z_ptr, mu_ptr, status_ptr, steps_ptr, N, D, lam_z, lam_e,
                    gamma, tol, ridge, max_inner, M: tl.constexpr):  # fmt: skip
    i = tl.program_id(0)
    offs = tl.arange(0, M)
    ids = tl.load(ids_ptr + i * M + offs)
    valid = ids >= 0
    coef = valid & (ids < N)
    outl = valid & (ids >= N)
    cid = tl.where(coef, ids, 0)
    oid = tl.where(outl, ids - N, 0)
    a = tl.where(coef, 1.0, 0.0).to(tl.float64)
    w = tl.where(coef, 1.0, tl.where(outl, lam_e, 1.0)).to(tl.float64)
    # P^T y_i over the slots: G[:, i] on coefficients, y_i = X[i, :] on outlier entries
    p = tl.load(G + cid * N + i, mask=coef, other=0.0) + tl.load(X + i * D + oid, mask=outl,
                                                                 other=0.0)  # fmt: skip
    # K = P^T P over the slots: G, Y^T, Y and I by the slots' kinds
    K = tl.load(G + cid[:, None] * N + cid[None, :], mask=coef[:, None] & coef[None, :],
                other=0.0)  # fmt: skip
    K += tl.load(X + cid[:, None] * D + oid[None, :], mask=coef[:, None] & outl[None, :],
                 other=0.0)  # fmt: skip
    K += tl.load(X + cid[None, :] * D + oid[:, None], mask=outl[:, None] & coef[None, :],
                 other=0.0)  # fmt: skip
    K += tl.where(outl[:, None] & outl[None, :] & (ids[:, None] == ids[None, :]), 1.0, 0.0)
    H = lam_z * K + gamma * a[:, None] * a[None, :]
    z = tl.load(z_ptr + i * M + offs)
    F = z != 0.0
    s = tl.where(z > 0.0, 1.0, tl.where(z < 0.0, -1.0, 0.0)).to(tl.float64)
    Hinv = tl.zeros([M, M], dtype=tl.float64)
    Fb = offs < 0  # the support joined so far
    for q in range(M):
        if tl.sum(tl.where((offs == q) & F, 1, 0)) > 0:
            Hinv = _join(Hinv, H, Fb, q, offs, ridge)
            Fb = Fb | (offs == q)
    steps = 0
    status = 1
    mu = tl.zeros([], dtype=tl.float64)
    # slots that left at once after joining (a step of length 0): kept out until the iterate
    # moves, else the same violator would join and leave forever
    tabu = offs < 0
    done = 0
    while (done == 0) & (steps < max_inner):
        zt, t = _target(Hinv, H, F, tl.where(F, lam_z * p - s * w, 0.0), a)
        mu = gamma - t
        bad = F & (s * zt <= 0.0)
        if tl.sum(tl.where(bad, 1, 0)) > 0:
            # step to the first support variable that reaches zero; it leaves
            gone = z - zt  # (same sign as z where it crosses; 0 only for a joined 0)
            ratio = tl.where(bad, z / tl.where(gone != 0.0, gone, 1.0), 2.0)
            alpha = tl.min(ratio)
            out = tl.argmin(ratio, axis=0)
            tabu = tl.where(alpha > 0.0, offs < 0, tabu | (offs == out))
            z = tl.where(F, z + alpha * (zt - z), 0.0)
            z = tl.where(offs == out, 0.0, z)
            F = F & (offs != out)
            s = tl.where(offs == out, 0.0, s)
            Hinv = _leave(Hinv, out, offs)
        else:
            moved = tl.max(tl.where(F, tl.abs(zt - z), 0.0)) > 0.0
            tabu = tl.where(moved, offs < 0, tabu)
            z = tl.where(F, zt, 0.0)
            # lambda_z K z = H z - gamma a (a^T z): K is not kept beside H (registers)
            m = lam_z * p - (_matvec(H, z) - gamma * a * tl.sum(a * z)) - mu * a
            viol = tl.where(valid & ~F & (ids != i), (tl.abs(m) - w) / w, 0.0)
            worst = tl.max(tl.where(tabu, 0.0, viol))
            if worst > tol:
                q = tl.argmax(tl.where(tabu, 0.0, viol), axis=0)
                mq = tl.sum(tl.where(offs == q, m, 0.0))
                Hinv = _join(Hinv, H, F, q, offs, ridge)
                F = F | (offs == q)
                s = tl.where(offs == q, tl.where(mq > 0.0, 1.0, -1.0), s)
            else:  # solved, unless a slot kept out still violates (the next pass retries)
                status = tl.where(tl.max(viol) > tol, 1, 0)
                done = 1
        steps += 1
    tl.store(z_ptr + i * M + offs, tl.where(F, z, 0.0))
    tl.store(mu_ptr + i, mu)
    tl.store(status_ptr + i, status)
    tl.store(steps_ptr + i, steps)


def solve(features, *, alpha_e: float = 800.0, alpha_z: float = 800.0, slots: int = 64,
          grow: int = 16, tol: float = 1e-9, max_passes: int = 100,
          max_inner: int = 1000, num_warps: int = 4) -> dict:  # fmt: skip
    """The program's minimiser for ``features`` (``N x D``) by working sets of at most
    ``slots`` variables per column (a power of two), each pass one program per column
    (:func:`_columns_kernel`, ``num_warps`` warps each) on ``features``' device, float64.
    Returns ``coef``, ``outliers``, ``passes``, ``steps`` (per column, summed over the
    passes), ``converged``, ``status``, ``timings`` (the solve; the certificate) and the
    certificate (``gap``: the largest relative duality gap, and ``affine``, on the CPU)."""
    t0 = time.perf_counter()
    x = as_feature_tensor(features)  # (a clear error for a bad shape, dtype or value)
    device = x.device
    if slots & (slots - 1) or slots < 2:
        raise ValueError(f"slots: expected a power of two >= 2, got {slots}")
    if x.shape[0] < 2:
        raise ValueError(f"SSC needs at least 2 points, got N = {x.shape[0]}")
    X = x.detach().to(torch.float64).contiguous()  # on the device: G and the passes there
    n, d = X.shape
    G = X @ X.T
    lam_e, lam_z, _, _ = ssc_lambdas(X, alpha_e, alpha_z, row_max=gram_row_max(X, gram=G))
    gamma = lam_z * float(G.diagonal().max())
    ids = torch.full((n, slots), -1, dtype=torch.int64, device=device)
    z = torch.zeros((n, slots), dtype=torch.float64, device=device)
    ids[:, 0], z[:, 0] = nearest_points(G), 1.0
    mu = torch.zeros(n, dtype=torch.float64, device=device)
    status = torch.zeros(n, dtype=torch.int32, device=device)
    steps_pass = torch.zeros(n, dtype=torch.int32, device=device)
    steps = torch.zeros(n, dtype=torch.int64, device=device)
    cols = torch.arange(n, device=device)
    passes, converged = 0, False
    weights = torch.cat([torch.ones(n, dtype=torch.float64, device=device),
                         torch.full((d,), lam_e, dtype=torch.float64, device=device)])  # fmt: skip
    while passes < max_passes:
        passes += 1
        _columns_kernel[(n,)](G, X, ids, z, mu, status, steps_pass, n, d, lam_z, lam_e, gamma,
                              tol, RIDGE, max_inner, M=slots, num_warps=num_warps)  # fmt: skip
        steps += steps_pass
        full = _scatter(ids, z, n + d)  # (n, n + d): column i's variables in row i
        c, e = full[:, :n].T, full[:, n:].T
        r = X.T - X.T @ c - e  # (D, N): each column's residual
        m = lam_z * torch.cat([X @ r, r]).T  # (N, N + D): lambda_z P^T r per column
        m[:, :n] -= mu[:, None]
        viol = (m.abs() - weights) / weights
        viol[cols, cols] = -math.inf  # c_i stays 0
        support = (ids >= 0) & (z != 0)
        viol[cols[:, None].expand_as(ids)[support], ids[support]] = -math.inf
        width = min(grow, n + d - 1)
        top, new = viol.topk(width, dim=1)
        fresh = top > tol
        if not bool(fresh.any()) and bool((status == SOLVED).all()):
            converged = True
            break
        # each column keeps its support and takes its violators into the free slots
        keep = support
        ids = torch.where(keep, ids, -1)
        order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)
        ids, z = ids.gather(1, order), z.gather(1, order)
        room = slots - keep.sum(dim=1)  # (the worst violators first, as many as fit)
        if bool((fresh.any(dim=1) & (room == 0)).any()):
            raise RuntimeError(f"a column's support fills its slots = {slots}: use more")
        rank = torch.arange(width, device=device)
        put = keep.sum(dim=1, keepdim=True) + rank[None, :]
        ok = fresh & (put < slots)
        ids[cols[:, None].expand_as(put)[ok], put[ok]] = new[ok]
    coef, outliers = (full[:, :n].T.contiguous(), full[:, n:].T.contiguous())
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t1 = time.perf_counter()
    gaps = duality_gaps(X.cpu(), coef.cpu(), lam_e, lam_z)  # (float64 on the CPU)
    return {"coef": coef, "outliers": outliers, "passes": passes, "steps": steps.cpu(),
            "converged": converged, "gap": gaps.max_gap, "affine": gaps.affine,
            "status": status.cpu(),
            "timings": {"solve": t1 - t0, "certificate": time.perf_counter() - t1}}  # fmt: skip


def _scatter(ids, z, width: int) -> torch.Tensor:
    out = torch.zeros((ids.shape[0], width), dtype=z.dtype, device=z.device)
    rows = torch.arange(ids.shape[0], device=ids.device)[:, None].expand_as(ids)
    held = ids >= 0
    out[rows[held], ids[held]] = z[held]
    return out


def run(n: int, d: int, slots: int, grow: int, out_dir=None, clusters: int = 24,
        num_warps: int = 4) -> Path:  # fmt: skip
    """Times :func:`solve` against the fast solver (one call each after a first one that
    compiles and loads) on video-like tokens (48 per frame, ``clusters`` subspaces) on this
    machine's device; writes ``columns_triton_<device>.json``."""
    from benchmarks.common import video_tokens
    from videoanchor.anchor import compute_anchor_scores

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    x = video_tokens(-(-n // 48), 48, d, k=clusters, seed=0)[:n].to(device)
    meta = environment(str(device))
    meta.update(slots=slots, grow=grow, clusters=clusters, num_warps=num_warps)
    rows = []
    for name, fn in (("columns_triton", lambda: solve(x, slots=slots, grow=grow,
                                                      num_warps=num_warps)),
                     ("fast", lambda: compute_anchor_scores(x, clusters, solver="fast",
                                                            progress=False))):  # fmt: skip
        fn()  # compiles, loads the libraries
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        res = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        row = {"solver": name, "n": n, "d": d, "seconds": time.perf_counter() - t}
        if isinstance(res, dict):  # the solve alone: the certificate runs on the CPU after it
            row.update(seconds=res["timings"]["solve"],
                       seconds_certificate=res["timings"]["certificate"], passes=res["passes"],
                       converged=res["converged"], gap=res["gap"],
                       steps_max=int(res["steps"].max()))  # fmt: skip
        rows.append(row)
    print_table(rows, ["solver", "n", "d", "seconds", "passes", "converged", "gap", "steps_max"])
    return write_result("columns_triton", meta, rows, out_dir)


def compile_static(cc: int, slots: int, num_warps: int = 4) -> dict:
    """:func:`_columns_kernel` compiled ahead of time for ``sm_<cc>`` at ``slots`` (Triton's
    bundled ptxas, no GPU; run with ``TRITON_INTERPRET=0``): registers, spill bytes, shared
    memory. STATIC figures, read from compiled code."""
    from videoanchor.kernels import aot
    from videoanchor.kernels.launch import Launch

    n, d = 256, 128
    f64 = dict(dtype=torch.float64)
    args = (torch.empty(n, n, **f64), torch.empty(n, d, **f64),
            torch.empty(n, slots, dtype=torch.int64), torch.empty(n, slots, **f64),
            torch.empty(n, **f64), torch.empty(n, dtype=torch.int32),
            torch.empty(n, dtype=torch.int32), n, d, 800.0, 8.0, 1e3, 1e-9, 1e-10, 1000)  # fmt: skip
    rec = Launch(_columns_kernel, (n,), args, {"M": slots, "num_warps": num_warps})
    return {"slots": slots, **aot.compile_launch(rec, cc)}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=2064)
    ap.add_argument("--d", type=int, default=3584)
    ap.add_argument("--slots", type=int, default=128)
    ap.add_argument("--grow", type=int, default=16)
    ap.add_argument("--out-dir", default=None)
    ap.add_argument("--static", type=int, default=None, metavar="CC",
                    help="compile for sm_CC ahead of time (no GPU) and print the static "
                         "report as one JSON line instead")  # fmt: skip
    ap.add_argument("--num-warps", type=int, default=4)
    args = ap.parse_args(argv)
    if args.static is not None:
        print(json.dumps(compile_static(args.static, args.slots, args.num_warps)))
        return
    print(run(args.n, args.d, args.slots, args.grow, args.out_dir, num_warps=args.num_warps))


if __name__ == "__main__":
    main()
