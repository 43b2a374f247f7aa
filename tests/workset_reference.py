"""A float64 torch stand-in for the column kernel (issue 90's contract,
``videoanchor/anchor/solvers/_column_kernel.py: launch(state, active, count)``): each active
column's program restricted to its slots, solved by the primal active-set method with a
dense KKT solve per step. Slow (a Python loop over columns and steps, host reads at will:
it is no part of a pass's count) and fine at the tests' tiny sizes, where the interpreted
Triton kernel takes minutes; the pass loop's tests drive it through ``workset_cuda.launch``."""

from __future__ import annotations

import torch

SOLVED, STALLED = 0, 1


def solve_column(Y, i, ids, z, eids, ze, lam_z, lam_e, tol, max_inner):
    """Column ``i``'s program restricted to the coefficient slots ``ids`` and outlier slots
    ``eids`` (-1 empty), from ``z``, ``ze``: ``(z, ze, mu, status, steps)``."""
    d = Y.shape[0]
    vc = (ids >= 0) & (ids != i)
    ve = eids >= 0
    cid, oid = ids[vc].long(), eids[ve].long()
    P = torch.cat([Y[:, cid], torch.eye(d, dtype=Y.dtype)[:, oid]], dim=1)
    nv, ncf = P.shape[1], len(cid)
    w = torch.cat([torch.ones(ncf, dtype=Y.dtype), torch.full((len(oid),), lam_e, dtype=Y.dtype)])
    a = torch.cat([torch.ones(ncf, dtype=Y.dtype), torch.zeros(len(oid), dtype=Y.dtype)])
    x = torch.cat([z[vc], ze[ve]]).clone()
    y = Y[:, i]
    F = x != 0
    s = torch.sign(x)
    mu, status, steps, tabu = 0.0, STALLED, 0, torch.zeros(nv, dtype=torch.bool)
    while steps < max_inner:
        steps += 1
        f = torch.nonzero(F).flatten()
        Pf = P[:, f]
        K = torch.zeros(len(f) + 1, len(f) + 1, dtype=Y.dtype)
        K[:-1, :-1] = lam_z * Pf.T @ Pf
        K[:-1, -1] = a[f]
        K[-1, :-1] = a[f]
        rhs = torch.cat([lam_z * Pf.T @ y - s[f] * w[f], torch.ones(1, dtype=Y.dtype)])
        sol = torch.linalg.lstsq(K, rhs[:, None]).solution[:, 0]
        xt = torch.zeros(nv, dtype=Y.dtype)
        xt[f] = sol[:-1]
        mu = float(sol[-1])
        bad = F & (s * xt <= 0)
        if bool(bad.any()):
            gone = x - xt
            ratio = torch.where(bad, x / torch.where(gone != 0, gone, 1.0), 2.0)
            alpha = float(ratio.min())
            out = int(ratio.argmin())
            tabu = tabu | (torch.arange(nv) == out) if alpha <= 0 else torch.zeros_like(tabu)
            x = torch.where(F, x + alpha * (xt - x), 0.0)
            x[out] = 0.0
            F[out] = False
            s[out] = 0.0
            continue
        if float((xt - x).abs().max()) > 0:
            tabu = torch.zeros_like(tabu)
        x = xt
        m = lam_z * P.T @ (y - P @ x) - mu * a
        viol = torch.where(F, 0.0, (m.abs() - w) / w)
        viol = torch.where(tabu, 0.0, viol)
        if nv and float(viol.max()) > tol:
            q = int(viol.argmax())
            F[q] = True
            s[q] = 1.0 if float(m[q]) > 0 else -1.0
        else:
            status = SOLVED
            break
    zc = torch.zeros_like(z)
    zc[vc] = torch.where(F[:ncf], x[:ncf], 0.0)
    zo = torch.zeros_like(ze)
    zo[ve] = torch.where(F[ncf:], x[ncf:], 0.0)
    return zc, zo, mu, status, steps


def launch(state: dict, active: torch.Tensor, count: torch.Tensor) -> None:
    """The contract's entry point, in place, on the CPU (``count`` read on the host)."""
    p = state["program"]
    Y = p["X"].T.double()
    lam_z, lam_e, _, tol, _ = p["scalars"].tolist()
    for pos in range(int(count[0])):
        k = int(active[pos])
        i = int(state["cols"][k])
        zc, zo, mu, status, steps = solve_column(
            Y,
            i,
            state["ids"][k],
            state["z"][k],
            state["eids"][k],
            state["ze"][k],
            lam_z,
            lam_e,
            tol,
            p["max_inner"],
        )
        state["z"][k], state["ze"][k] = zc, zo
        state["mu"][k], state["status"][k], state["steps_pass"][k] = mu, status, steps
