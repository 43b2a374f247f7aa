"""A float64 torch stand-in for the column kernel (issue 90's contract,
``videoanchor/anchor/solvers/_column_kernel.py: launch(state, active, count)``): each active
column's program restricted to its slots, solved by the primal active-set method with a
dense KKT solve per step. Slow (a Python loop over columns and steps, host reads at will:
it is no part of a pass's count) and fine at the tests' tiny sizes, where the interpreted
Triton kernel takes minutes; the pass loop's tests drive it through ``workset_cuda.launch``.
And :func:`torch_pass`: a pass in torch operators, the fused pass's reference."""

from __future__ import annotations

import torch

from videoanchor.anchor import plan as _plan
from videoanchor.anchor.solvers import workset_cuda as wc

SOLVED, STALLED, FULL = wc.SOLVED, wc.STALLED, wc.FULL
EPS = torch.finfo(torch.float64).eps


def kkt_rounding(X, i, c, e, lam_z, lam_e, k):
    """What float64 rounding alone can put on column ``i``'s restricted KKT check, from the
    problem's own magnitudes (no machine's run): the multipliers
    ``m = lambda_z Y^T (y_i - Y c - e) - mu`` are sums of at most ``k`` products, so each
    computation is off by at most ``gamma_k`` times the sum of the terms' magnitudes,
    ``lambda_z |Y|^T (|y_i| + |Y| |c| + |e|)`` (``gamma_k = k eps / (1 - k eps)``, Higham,
    Accuracy and Stability of Numerical Algorithms, section 3.1); a check compares two such
    computations: ``2 gamma_k`` times that. Outlier entries' multipliers ``lambda_z r`` are
    checked relative to ``lambda_e``. ``X``: the tokens (``N x D``), ``c`` (N), ``e`` (D)."""
    gamma = k * EPS / (1 - k * EPS)
    res = X[i].abs() + X.T.abs() @ c.abs() + e.abs()  # (D): |y_i| + |Y| |c| + |e|
    return 2 * gamma * max(lam_z * float((X.abs() @ res).max()),
                           lam_z * float(res.max()) / lam_e)  # fmt: skip


def support_spread(X, c, e, lam_z, slack):
    """How far apart two answers of one column's restricted system on one support can lie
    when each is within ``slack`` (:func:`kkt_rounding`) of it: the support's KKT matrix
    ``K = [[H, 1], [1^T, 0]]``, ``H = lambda_z (G_FF - Y_OF^T Y_OF)`` (the held outlier
    entries ``O`` eliminated), moves ``c`` by at most ``||K^-1||_inf`` times twice the
    residuals' bound, and ``e_O = y_iO - Y_OF c - (lambda_e / lambda_z) s_O`` moves by
    ``||Y_OF||_inf`` times that: ``(dc, de)``."""
    F, O = torch.nonzero(c).flatten(), torch.nonzero(e).flatten()
    Y_OF = X[F][:, O].T
    K = torch.zeros(len(F) + 1, len(F) + 1, dtype=torch.float64)
    K[:-1, :-1] = lam_z * (X[F] @ X[F].T - Y_OF.T @ Y_OF)
    K[:-1, -1] = K[-1, :-1] = 1.0
    dc = float(torch.linalg.inv(K).abs().sum(dim=1).max()) * 2 * slack
    return dc, dc * float(Y_OF.abs().sum(dim=1).max()) if len(O) else 0.0


def solve_column(Y, i, ids, z, eids, ze, lam_z, lam_e, tol, max_inner, support=None):
    """Column ``i``'s program restricted to the coefficient slots ``ids`` and outlier slots
    ``eids`` (-1 empty), from ``z``, ``ze``: ``(z, ze, mu, status, steps)``. A coefficient
    support that would pass ``support`` (None: no bound) stops it (``FULL``, as the column
    kernel at its level's positions)."""
    d = Y.shape[0]
    vc = (ids >= 0) & (ids != i)
    ve = eids >= 0
    cid, oid = ids[vc].long(), eids[ve].long()
    unit = torch.zeros(d, len(oid), dtype=Y.dtype)  # (the outlier entries' unit columns)
    unit[oid, torch.arange(len(oid))] = 1.0
    P = torch.cat([Y[:, cid], unit], dim=1)
    nv, ncf = P.shape[1], len(cid)
    w = torch.cat([torch.ones(ncf, dtype=Y.dtype), torch.full((len(oid),), lam_e, dtype=Y.dtype)])
    a = torch.cat([torch.ones(ncf, dtype=Y.dtype), torch.zeros(len(oid), dtype=Y.dtype)])
    x = torch.cat([z[vc], ze[ve]]).clone()
    y = Y[:, i]
    F = x != 0
    s = torch.sign(x)
    mu, status, steps, tabu = 0.0, STALLED, 0, torch.zeros(nv, dtype=torch.bool)
    if support is not None and int(F[:ncf].sum()) > support:
        return z.clone(), ze.clone(), mu, FULL, steps
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
            if support is not None and q < ncf and int(F[:ncf].sum()) >= support:
                status = FULL
                break
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
    lam_z, lam_e, _, tol = p["scalars"].tolist()[:4]
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
            state.get("support"),
        )
        state["z"][k], state["ze"][k] = zc, zo
        state["mu"][k], state["status"][k], state["steps_pass"][k] = mu, status, steps


def torch_pass(state: dict, cap: int, *, exact: bool, last: bool) -> None:
    """issue 90's pass in torch operators (about 130 a pass), the reference the fused pass
    (``workset_cuda._pass``: its Triton kernels) is checked against. One pass over the active columns (``state["active"][:count]``, ``count <= cap``) with
    no host read and shapes fixed by ``cap``: the kernel (over ``kcount`` of them), their
    residuals, the one GEMM ``Y^T R`` (float64 where ``exact``, else float32), their
    violations; the ``grow`` worst coefficient violators into the free coefficient slots,
    every violating outlier entry into the free outlier slots; a column whose slots cannot
    take them is set aside (``last``: only where no slot is free); the columns that took
    variables, did not solve, or (``exact``) whose support is off its own stationarity,
    lead the next active list. A column whose run took one step after taking variables
    (they did not join: rounding flagged them) leaves the list."""
    p = state["program"]
    n, d = p["n"], p["d"]
    lam_z, lam_e = p["lam_z"], p["lam_e"]
    positions = torch.arange(max(cap, d, _plan.PASS_RULE.grow_max), dtype=torch.int32)
    state["positions"] = positions
    ran = state["kcount"] > 0
    wc.launch(state, state["active"][:cap], state["kcount"])
    dt = torch.float64 if exact else torch.float32
    R = torch.empty(cap, d, dtype=dt, device=state["ids"].device)
    wc.residuals(state, R, torch.empty_like(R), cap)
    act = state["active"][:cap]
    a = act.long()
    live = state["positions"][:cap] < state["count"]
    ids, z, eids, ze = state["ids"][a], state["z"][a], state["eids"][a], state["ze"][a]
    cols = state["cols"][a]
    M, ME = ids.shape[1], eids.shape[1]
    # coefficients: m_u = lambda_z (Y^T r)_u - mu, violation |m_u| - 1; c_i and the support
    # are no candidates (their entries at -inf; an empty slot's at i)
    m = torch.mm(R, (p["X"] if exact else p["X32"]).T)
    m.mul_(lam_z).sub_(state["mu"][a, None].to(dt))
    support = (ids >= 0) & (z != 0)
    viol = m.abs().sub_(1.0)
    viol.scatter_(1, torch.cat([cols[:, None], torch.where(support, ids, cols[:, None])], 1),
                  -float("inf"))  # fmt: skip
    rule = _plan.PASS_RULE  # (the pass rule: the CPU's kernel's too)
    k = min(rule.grow_max, n, M)
    top, new = viol.topk(k, dim=1)
    grow = torch.clamp(rule.grow0 * torch.pow(2, state["passes"].clamp(max=8)), max=rule.grow_max)
    rank = state["positions"][None, :k]
    thr = p["tol"] if exact else wc.SCREEN
    keep = support.sum(dim=1, dtype=torch.int32)
    fresh = (top > thr) & live[:, None]
    ok = fresh & (rank < grow) & (rank < (M - keep)[:, None])
    # outlier entries: m_o = lambda_z r_o, violation (|m_o| - lambda_e) / lambda_e; every
    # violator off the support joins
    held = (eids >= 0) & (ze != 0)
    ve = R.abs().mul_(lam_z / lam_e).sub_(1.0)
    ve = torch.cat([ve, ve.new_zeros(cap, 1)], 1)
    ve.scatter_(1, torch.where(held, eids, d).long(), -float("inf"))
    vio = (ve[:, :d] > thr) & live[:, None]
    nvio = vio.sum(dim=1, dtype=torch.int32)
    free_e = ME - held.sum(dim=1, dtype=torch.int32)
    full_c = (fresh[:, 0] & (keep == M)) | (ran & (state["status"][a] == wc.FULL))
    full_e = (nvio > 0) & (free_e == 0) if last else nvio > free_e
    aside = full_c | full_e
    # each column keeps its support in its slots (the kernel's inverse over it stays valid)
    # and takes its joiners into the free slots, lowest first
    take = live & ~aside
    slot = torch.argsort(support.to(torch.int8), dim=1, stable=True)[:, :k]
    ok &= take[:, None]
    ids2 = torch.cat([torch.where(support, ids, -1), ids.new_full((cap, 1), -1)], dim=1)
    ids2.scatter_(1, torch.where(ok, slot, M), torch.where(ok, new, -1).to(ids2.dtype))
    rk = torch.cumsum(vio, dim=1, dtype=torch.int32) - 1  # each violator's rank in its row
    slot_e = torch.argsort(held.to(torch.int8), dim=1, stable=True)
    join = vio & take[:, None] & (rk < free_e[:, None])
    to = torch.where(join, slot_e.gather(1, rk.clamp(0, ME - 1).long()), ME)
    eids2 = torch.cat([torch.where(held, eids, -1), eids.new_full((cap, 1), -1)], dim=1)
    eids2.scatter_(1, to, state["positions"][None, :d].expand(cap, d))
    again = take & (ok.any(dim=1) | join.any(dim=1) | (state["status"][a] != wc.SOLVED))
    if exact:  # the support's own stationarity: where it fails, the kernel rebuilds
        sc = torch.where(support, ids, 0).long()
        err_c = (m.gather(1, sc) - torch.sign(z)).abs()
        se = torch.where(held, eids, 0).long()
        err_e = (R.gather(1, se) * (lam_z / lam_e) - torch.sign(ze)).abs()
        off = torch.cat([torch.where(support, err_c, 0.0), torch.where(held, err_e, 0.0)],
                        1).amax(dim=1) > thr  # fmt: skip
        off &= take
        if "Sok" in state:
            state["Sok"].index_copy_(0, a, torch.where(off, 0, state["Sok"][a]))
        again |= off
    # a run of one step after the last pass's joiners: they did not join (rounding)
    stuck = ran & (state["passes"] > 0) & (state["steps_pass"][a] <= 1)
    stuck &= state["joined"][a] != 0  # (only after joiners: a rebuilt run may move in one)
    again &= ~(stuck & (state["status"][a] == wc.SOLVED))
    joined = torch.where(take, (ok.any(dim=1) | join.any(dim=1)).to(torch.int32), 0)
    state["joined"].index_copy_(0, a, torch.where(live, joined, state["joined"][a]))
    state["ids"].index_copy_(0, a, torch.where(take[:, None], ids2[:, :M], ids))
    state["eids"].index_copy_(0, a, torch.where(take[:, None], eids2[:, :ME], eids))
    state["aside"].index_add_(0, a, (aside & live).to(torch.int32))
    state["steps"].index_add_(0, a, torch.where(live & ran, state["steps_pass"][a], 0).long())
    state["passes"] += state["count"] > 0
    state["active_sum"] += state["count"]
    state["active"][:cap] = act[torch.argsort(again.to(torch.int32), descending=True, stable=True)]
    state["count"][0] = again.sum()
    state["kcount"].copy_(state["count"])
