"""Issue 76 item 2, counted on the CPU (2026-11-28): how many dependent steps a column's solve
on its working set takes under several pivoting rules, on bench_workset_cuda's 16-frame
video-like set (Qwen2.5-VL-7B shapes, N = 2048, D = 3584), float64, NumPy. The counts do not
depend on the machine. Three counts, one subcommand each (until eddbdcb they were three
scripts in the log folders: ``chains.py``, ``chains_global.py`` and ``passes.py``):

- ``chains RULE OUT.json``: each column's set W is its certified minimiser's support
  (``reference_minimiser``), the 16 largest KKT ratios off it and its nearest point; the
  start is the GPU kernel's (``c_nearest = 1``). A dense solve of the support's bordered
  system per step. Rules: ``single`` (the GPU kernel's primal active set: the worst violator
  joins; a step that would change a support variable's sign stops at the first, which
  leaves), ``block`` (every violator joins at once, leaves as in ``single``) and ``pdas``
  (the primal-dual active set, semismooth Newton without a line search: the support and
  signs from ``v + tau g`` against ``tau w``, ``tau = 1 / median diag H``, at most 200
  iterations). Per column: steps, joins, leaves, set and support sizes and the largest
  difference to the minimiser (``logs/block-pivoting-2026-11-28/chains_*.json``).
- ``global OUT.json``: the same sets and start, every rule of :data:`RULES` (the globalised
  block rules beside ``single``), per step the system's size and how many variables changed
  since the last solve (the rank of the update a carried inverse would take)
  (``logs/block-pivoting-2026-11-28b/chains_global.json``).
- ``passes OUT.json --grow G``: the chain a column runs over a whole call, each pass
  warm-started from the previous pass's answer, under every rule of :data:`RULES`
  (``-28b/passes.json`` at grow 16, ``passes_grow64.json`` at 64). The passes are the GPU
  kernel's (``workset_cuda._pass``), all in float64 at ``tol = 1e-9`` (the kernel runs
  float32 passes first, to ``SCREEN = 1e-5``, then float64: its passes differ): each column
  starts from its nearest point (``W = {nearest}``, ``c_nearest = 1``); after each solve its
  set becomes its support and the ``grow`` largest KKT violations off it (over all N + D
  variables, ``c_i`` excepted; the kernel's default ``grow`` is 16), until no column
  violates. Every rule reaches the set's minimiser, so the sets follow the kernel's rule's
  answers and are the same for every rule; each pass each rule starts from the previous
  pass's answer (its support and signs). A column's chain is the sum of its steps over the
  passes; its ``max_diff``: the largest difference of the final answer to the certified
  minimiser, or of a rule's answer to the kernel's rule's in any pass.

The subproblem on a set W: minimise ``v'Hv / 2 - b'v + sum w|v|`` over W with ``a'v = 1``
(``a``: 1 on coefficients) and ``v_i = 0``. A step is one solve of the bordered system of the
support (and the variables joining): the dependent chain a GPU program runs. The rules of
``global`` and ``passes``:

- ``single``: the kernel's (``chains single`` again, as the control);
- ``bpp``: block principal pivoting safeguarded as Júdice and Pires (1994) do: every
  infeasible variable is exchanged at once (a support variable of the wrong sign leaves,
  an off-support violator joins with the sign of its gradient) while the count of
  infeasibilities falls below its best, or for ``BACKUP`` more steps after it last did;
  then Murty's single least-index exchange until the count falls below the best again.
  Where the exchange would leave no coefficient (``a'v = 1`` has no solution), the
  coefficient of largest ``|z|`` stays with its sign flipped (counted as ``guards``);
- ``bpp10``: the same with 10 backup steps instead of Júdice and Pires's 3 (chosen after
  3, 5, 10 and 20 were tried on 100 columns: the 40 longest under ``bpp`` and 60 drawn
  with seed 0; Murty's single exchanges make ``bpp``'s tail);
- ``newton``: a Newton step with an exact line search on the objective (the block
  feature-sign method): every violator joins at once with its gradient's sign, one solve
  of the sign-fixed system gives ``z``, and the objective is minimised exactly on the
  segment from ``v`` to ``z`` (a convex piecewise quadratic: its pieces are "cheap trials",
  matrix-vector work, no solve); variables may cross zero and change sign, and one that
  ends at zero leaves (a ``z`` that keeps every sign is taken whole, no line search).
  Where the block's direction does not descend (the line search stays at ``v``), the
  worst violator alone joins instead (Lee et al. 2007's step, which descends); where a
  step of that kind stays at ``v`` by rounding, the first variable to reach zero leaves;
- ``bpp_newton``: ``bpp`` until its backup runs out, then ``newton`` from its last iterate
  (instead of Murty's exchanges; its row then counts ``newton``'s trials and fallbacks,
  not ``bpp``'s guards).

Run from the repository root (the committed files ran with ``OMP_NUM_THREADS=1
OPENBLAS_NUM_THREADS=1 MKL_NUM_THREADS=1 NUMBA_NUM_THREADS=1``; all 2048 columns take about
2, 5 and 7 minutes for ``global``, ``passes --grow 16`` and ``--grow 64``)::

    python -m benchmarks.experiments.block_pivoting chains single chains_single.json
    python -m benchmarks.experiments.block_pivoting global chains_global.json
    python -m benchmarks.experiments.block_pivoting passes passes.json --grow 16

``--columns 0,5,186`` runs a sample of columns; ``--check COMMITTED.json`` then compares the
sample's rows with a committed file's (every key the committed rows have: the counts
exactly, ``max_diff`` within ``--check-tol``) and exits 1 on a difference.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from functools import partial

import numpy as np

from benchmarks.common import environment, video_tokens
from videoanchor.anchor import reference_minimiser

TOL, CAP, BACKUP = 1e-9, 5000, 3
#: the keys a ``chains`` row keeps of a rule's row (the rest: ``global``'s per-step lists)
CHAIN_KEYS = ("steps", "joins", "leaves", "converged")


# ---- the set and each column's working set ------------------------------------------------


def problem(frames: int = 16, per_frame: int = 128, d: int = 3584, k: int = 8) -> dict:
    """The set, its certified minimiser (``ref``, ``C``, ``E``) and what the working sets
    read: ``Y`` (D x N), ``G = Y'Y``, the lambdas and the l1 weights of all N + D variables.
    The defaults: bench_workset_cuda's 16-frame video-like set (smaller shapes for a test)."""
    x = video_tokens(frames, per_frame, d, k=k, seed=0).double()
    ref = reference_minimiser(x)
    Y = x.numpy().T  # D x N
    d, N = Y.shape
    return dict(ref=ref, Y=Y, d=d, N=N, C=ref.coef.numpy(), E=ref.outliers.numpy(),
                lam_e=ref.lambda_e, lam_z=ref.lambda_z, G=Y.T @ Y,
                wfull=np.concatenate([np.ones(N), np.full(d, ref.lambda_e)]))  # fmt: skip


def column(p: dict, i: int) -> dict:
    """Column ``i``'s working set ``W`` (its minimiser's support ``supp``, the 16 largest KKT
    ratios off it, its nearest point), the subproblem on it (``H``, ``b``, ``w``, ``a``; ``coef``
    marks the coefficients, ``me`` the position of ``c_i``), the kernel's start ``v0``
    (``c_nearest = 1``) and the minimiser's values ``want``."""
    Y, G, C, E, N, d = p["Y"], p["G"], p["C"], p["E"], p["N"], p["d"]
    r = Y[:, i] - Y @ C[:, i] - E[:, i]
    m = p["lam_z"] * np.concatenate([Y.T @ r, r])
    supp = np.flatnonzero(np.concatenate([C[:, i], E[:, i]]) != 0)
    ratio = np.abs(m) / p["wfull"]
    ratio[supp] = ratio[i] = -1.0
    cos = G[i] / np.sqrt(np.diag(G) * G[i, i])
    cos[i] = -np.inf
    nearest = int(np.argmax(cos))
    W = np.unique(np.concatenate([supp, np.argsort(-ratio)[:16], [nearest]]))
    coef = W < N
    c_ids, o_ids = W[coef], W[~coef] - N
    P = np.concatenate([Y[:, c_ids], np.eye(d)[:, o_ids]], axis=1)  # W sorted: coefs first
    return dict(W=W, supp=supp, coef=coef, H=p["lam_z"] * P.T @ P,
                b=p["lam_z"] * P.T @ Y[:, i], w=np.where(coef, 1.0, p["lam_e"]),
                a=coef.astype(float), v0=np.where(W == nearest, 1.0, 0.0),
                me=np.flatnonzero(W == i),
                want=np.concatenate([C[c_ids, i], E[o_ids, i]]))  # fmt: skip


# ---- the rules ---------------------------------------------------------------------------


def bordered(H, a, b, w, s, idx):
    """The solve of the bordered system on ``idx`` with signs ``s``: ``(z, mu)``, ``z`` zero
    off ``idx``."""
    K = np.zeros((len(idx) + 1, len(idx) + 1))
    K[:-1, :-1] = H[np.ix_(idx, idx)]
    K[:-1, -1] = K[-1, :-1] = a[idx]
    sol = np.linalg.solve(K, np.concatenate([b[idx] - w[idx] * s[idx], [1.0]]))
    z = np.zeros(len(b))
    z[idx] = sol[:-1]
    return z, sol[-1]


def violations(H, a, b, w, z, mu, F, me):
    g = b - H @ z - mu * a
    viol = np.where(~F, np.abs(g) / w - 1, -1.0)
    viol[me] = -1.0
    return g, viol


class Log:
    """The steps of one column: the system's size, the variables changed since the last."""

    def __init__(self, F):
        self.sizes, self.changed, self.last = [], [], F.copy()

    def solve(self, H, a, b, w, s, F):
        self.sizes.append(int(F.sum()))
        self.changed.append(int((F != self.last).sum()))
        self.last = F.copy()
        return bordered(H, a, b, w, s, np.flatnonzero(F))

    def row(self, converged, **kw):
        return dict(steps=len(self.sizes), converged=converged, sizes=self.sizes,
                    changed=self.changed, **kw)  # fmt: skip


def active_set(H, a, b, w, v, me, block=False):
    """The GPU kernel's primal active set (``single``): the worst violator joins (``block``:
    every violator at once); a step that would change a support variable's sign stops at the
    first, which leaves. The row also counts the joins and the leaves."""
    F, s = v != 0, np.sign(v)
    log, joins, leaves = Log(F), 0, 0
    while len(log.sizes) < CAP:
        zt, mu = log.solve(H, a, b, w, s, F)
        bad = F & (s * zt <= 0)
        if bad.any():  # the first support variable to reach zero leaves
            gone = v - zt
            ratio = np.where(bad, v / np.where(gone != 0, gone, 1), 2.0)
            k = int(np.argmin(ratio))
            v = np.where(F, v + ratio[k] * (zt - v), 0.0)
            v[k], F[k], s[k] = 0.0, False, 0.0
            leaves += 1
            continue
        v = zt
        g, viol = violations(H, a, b, w, v, mu, F, me)
        if viol.max() <= TOL:
            return v, log.row(True, joins=joins, leaves=leaves)
        new = viol > TOL if block else np.arange(len(F)) == np.argmax(viol)
        F |= new
        s = np.where(new, np.sign(g), s)
        joins += 1
    return v, log.row(False, joins=joins, leaves=leaves)


def pdas(H, a, b, w, v, coef):
    """The primal-dual active set without a line search (``chains pdas``)."""
    mu, tau, prev = 0.0, 1.0 / np.median(np.diag(H)), None
    g = b - H @ v - mu * a
    for it in range(200):
        z = v + tau * g
        A = np.abs(z) > tau * w
        s = np.where(A, np.sign(z), 0.0)
        if not (A & coef).any():
            j = int(np.argmax(np.where(coef, np.abs(g), -1)))
            A[j], s[j] = True, np.sign(g[j]) or 1.0
        key = (A.tobytes(), s.tobytes())
        if key == prev:
            return v, dict(steps=it, converged=True)
        prev = key
        v, mu = bordered(H, a, b, w, s, np.flatnonzero(A))
        g = b - H @ v - mu * a
    return v, dict(steps=200, converged=False)


def bpp(H, a, b, w, v, me, backup=BACKUP, then=None):
    """Safeguarded block principal pivoting (Júdice and Pires; Murty's rule as backup, or
    the rule ``then`` from the last iterate, where given)."""
    F, s, most = v != 0, np.sign(v), backup
    log, best, murty, guards = Log(F), np.inf, 0, 0
    while len(log.sizes) < CAP:
        z, mu = log.solve(H, a, b, w, s, F)
        g, viol = violations(H, a, b, w, z, mu, F, me)
        out = F & (s * z <= 0)  # primal infeasible: leaves
        join = viol > TOL  # dual infeasible: joins
        count = int(out.sum() + join.sum())
        if count == 0:
            return z, log.row(True, murty=murty, guards=guards)
        if count < best:
            best, backup = count, most
        elif backup > 0:
            backup -= 1
        elif then is not None:
            return then(H, a, b, w, z, me, log)
        else:  # Murty: the least infeasible index alone
            k = int(np.flatnonzero(out | join)[0])
            out, join = out & (np.arange(len(F)) == k), join & (np.arange(len(F)) == k)
            murty += 1
        coef = a > 0
        if not (F & ~out & coef).any() and not join[coef].any():
            k = int(np.argmax(np.where(out & coef, np.abs(z), -1.0)))
            out[k], s[k] = False, -s[k]
            guards += 1
        F = (F & ~out) | join
        s = np.where(join, np.sign(g), np.where(F, s, 0.0))
    return z, log.row(False, murty=murty, guards=guards)


def line_search(H, b, w, v, d, Hv):
    """The exact minimiser over [0, 1] of the objective on v + t d, the pieces tried, and
    the variables at zero there."""
    c0, c1 = (Hv - b) @ d, d @ H @ d
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.where(d != 0, -v / d, np.inf)
    if c1 <= 0:  # d = 0: v is z
        return 1.0, 0, np.zeros(len(v), bool)
    ends = np.unique(np.concatenate([t[(t > 0) & (t < 1)], [1.0]]))
    lo = 0.0
    for n, hi in enumerate(ends, 1):
        sig = np.sign(v + 0.5 * (lo + hi) * d)  # the signs on the piece (lo, hi)
        slope = c0 + w @ (sig * d)  # the derivative at t: slope + t c1
        if slope + lo * c1 >= 0:
            return lo, n, t == lo
        if slope + hi * c1 >= 0:
            return -slope / c1, n, np.zeros(len(v), bool)
        lo = hi
    return 1.0, len(ends), t == 1.0


def newton(H, a, b, w, v, me, log=None):
    """Block joins, a sign-fixed solve, an exact line search on the objective (from any
    ``v`` with ``a'v = 1``; ``log``: the steps so far)."""
    F, s, idx = v != 0, np.sign(v), np.arange(len(v))
    log, cheap, fallbacks = log or Log(F), 0, 0
    J, done, viol = np.zeros_like(F), False, None  # the first step solves the start's support
    while len(log.sizes) < CAP:
        if done:
            return v, log.row(True, cheap_trials=cheap, fallbacks=fallbacks)
        z, mu = log.solve(H, a, b, w, s, F | J)
        full = np.all(np.sign(z[F | J]) == s[F | J])  # z keeps the signs: it is the step
        if not full:  # the objective's minimum on the segment [v, z]
            d = z - v
            t, n, zero = line_search(H, b, w, v, d, H @ v)
            cheap += n
            if t == 0 and J.sum() > 1:  # no descent: the worst violator alone joins
                k = int(np.argmax(viol))
                s = np.where(J & (idx != k), 0.0, s)
                J = idx == k
                fallbacks += 1
                continue
            if t == 0:  # (rounding, z next to v): the first variable to reach zero leaves
                with np.errstate(divide="ignore", invalid="ignore"):
                    tb = np.where(d * v < 0, -v / d, np.inf)
                t, zero = tb.min(), tb == tb.min()
            v = np.where(zero, 0.0, v + t * d)
        else:
            v = z
        F, s = v != 0, np.sign(v)
        if full:  # v solves its support: the violators join
            g, viol = violations(H, a, b, w, v, mu, F, me)
            J, done = viol > TOL, viol.max() <= TOL
            s = np.where(J, np.sign(g), s)
        else:  # the new support is solved first
            J = np.zeros_like(F)
    return v, log.row(False, cheap_trials=cheap, fallbacks=fallbacks)


#: the rules of ``global`` and ``passes`` (``single`` is ``chains single``'s rule)
RULES = dict(single=active_set, bpp=bpp, bpp10=partial(bpp, backup=10), newton=newton,
             bpp_newton=partial(bpp, then=newton))  # fmt: skip


# ---- the JSON ----------------------------------------------------------------------------


def summary(rows):
    """The summary of a rule's rows; each row's per-step lists become their sums (the
    JSON's size), ``size_sq``: the sum of the squared sizes (a rank-one update's work)."""
    steps = np.array([r["steps"] for r in rows])
    sizes = np.concatenate([r["sizes"] for r in rows])
    changed = np.concatenate([r["changed"][1:] for r in rows])  # (the first: the start)
    out = dict(columns=len(rows), converged=int(sum(r["converged"] for r in rows)),
               steps_median=float(np.median(steps)),
               steps_p90=float(np.percentile(steps, 90)), steps_max=int(steps.max()),
               size_median=float(np.median(sizes)), size_p90=float(np.percentile(sizes, 90)),
               size_max=int(sizes.max()), changed_median=float(np.median(changed)),
               changed_p90=float(np.percentile(changed, 90)), changed_max=int(changed.max()),
               max_diff=max(r["max_diff"] for r in rows))  # fmt: skip
    for r in rows:
        s = np.array(r.pop("sizes"))
        r.update(size_max=int(s.max()), size_sum=int(s.sum()), size_sq=int((s**2).sum()),
                 changed_sum=int(sum(r.pop("changed")[1:])))  # fmt: skip
    for key in ("cheap_trials", "murty", "guards", "fallbacks"):
        if any(key in r for r in rows):
            vals = np.array([r.get(key, 0) for r in rows])
            out.update({f"{key}_median": float(np.median(vals)), f"{key}_max": int(vals.max())})
    return out


def by_key(rows):
    """A rule's rows as one list per key (the JSON's size)."""
    keys = dict.fromkeys(k for r in rows for k in r)
    return {k: [r.get(k) for r in rows] for k in keys}


def meta() -> dict:
    out = environment()
    out.update(numpy=np.__version__, machine="CPU (NumPy float64, one thread; the counts do "
               "not depend on the machine)")  # fmt: skip
    return out


# ---- the three counts --------------------------------------------------------------------


def chains(rule: str, columns=None, p=None) -> dict:
    """``chains``: one rule (``single``, ``block``, ``pdas``) on each column's final set."""
    p = p or problem()
    rows, t0 = [], time.perf_counter()
    for i in range(p["N"]) if columns is None else columns:
        c = column(p, i)
        H, a, b, w, v = c["H"], c["a"], c["b"], c["w"], c["v0"]
        if rule == "pdas":
            v, row = pdas(H, a, b, w, v, c["coef"])
        else:
            v, row = active_set(H, a, b, w, v, c["me"], block=rule == "block")
            row = {k: row[k] for k in CHAIN_KEYS}
        row.update(column=int(i), set=len(c["W"]), support=len(c["supp"]),
                   max_diff=float(np.abs(v - c["want"]).max()))  # fmt: skip
        rows.append(row)
    steps = np.array([r["steps"] for r in rows])
    support = np.array([r["support"] for r in rows])
    out = dict(rule=rule, n=len(rows), seconds=time.perf_counter() - t0,
               reference_gap=p["ref"].residual,
               converged=int(sum(r["converged"] for r in rows)),
               steps_median=float(np.median(steps)), steps_max=int(steps.max()),
               support_median=float(np.median(support)), support_max=int(support.max()),
               max_diff=max(r["max_diff"] for r in rows))  # fmt: skip
    print(out)
    return dict(summary=out, rows=rows)


def global_rules(columns=None, p=None) -> dict:
    """``global``: every rule of :data:`RULES` on each column's final set."""
    p = p or problem()
    rows, seconds = {r: [] for r in RULES}, dict.fromkeys(RULES, 0.0)
    for i in range(p["N"]) if columns is None else columns:
        c = column(p, i)
        for name, rule in RULES.items():
            t0 = time.perf_counter()
            v, row = rule(c["H"], c["a"], c["b"], c["w"], c["v0"].copy(), c["me"])
            seconds[name] += time.perf_counter() - t0
            if name == "single":  # (the joins and leaves: chains single's)
                del row["joins"], row["leaves"]
            row.update(column=int(i), set=len(c["W"]), support=len(c["supp"]),
                       max_diff=float(np.abs(v - c["want"]).max()))  # fmt: skip
            rows[name].append(row)
    result = dict(meta=meta(), reference_gap=p["ref"].residual, seconds=seconds,
                  summary={k: summary(v) for k, v in rows.items()},
                  rows={k: by_key(v) for k, v in rows.items()})  # fmt: skip
    print(json.dumps(result["summary"], indent=1), seconds)
    return result


def passes(grow: int = 16, columns=None, p=None) -> dict:
    """``passes``: every rule over the kernel's passes, warm-started (module docstring)."""
    p = p or problem()
    ref, Y, G, wfull = p["ref"], p["Y"], p["G"], p["wfull"]
    d, N, lam_e, lam_z = p["d"], p["N"], p["lam_e"], p["lam_z"]
    cos = G / np.sqrt(np.outer(np.diag(G), np.diag(G)))
    np.fill_diagonal(cos, -np.inf)
    W = [np.array([j]) for j in cos.argmax(axis=0)]  # each column's set: its nearest point
    z = [np.ones(1) for _ in range(N)]
    rows = {r: [dict(column=i, steps=0, sizes=[], changed=[0], converged=True, passes=0)
                for i in range(N)] for r in RULES}  # fmt: skip
    cols = np.arange(N) if columns is None else np.sort(columns)
    live, count, t0 = cols, 0, time.perf_counter()
    while len(live):
        count += 1
        for i in live:  # each rule from the last pass's answer, on the set W[i]
            ids = W[i]
            coef = ids < N
            c, o = ids[coef], ids[~coef] - N
            H = lam_z * np.block([[G[np.ix_(c, c)], Y[np.ix_(o, c)].T],
                                  [Y[np.ix_(o, c)], np.eye(len(o))]])  # fmt: skip
            b = lam_z * np.concatenate([G[c, i], Y[o, i]])
            w, a = np.where(coef, 1.0, lam_e), coef.astype(float)
            me = np.flatnonzero(ids == i)
            start = z[i]
            for name, rule in RULES.items():
                v, row = rule(H, a, b, w, start.copy(), me)
                acc = rows[name][i]
                acc["steps"] += row["steps"]
                acc["sizes"] += row["sizes"]
                acc["changed"] += row["changed"]
                acc["converged"] &= row["converged"]
                for key in ("murty", "guards", "cheap_trials", "fallbacks"):
                    if key in row:
                        acc[key] = acc.get(key, 0) + row[key]
                acc["passes"] += 1
                if name == "single":
                    z[i] = v
                acc["pass_diff"] = max(acc.get("pass_diff", 0.0), float(np.abs(v - z[i]).max()))
        # the KKT violations of every live column's answer, over all N + D variables
        C = np.zeros((N, len(live)))
        E = np.zeros((d, len(live)))
        mu = np.zeros(len(live))
        for k, i in enumerate(live):
            coef = W[i] < N
            C[W[i][coef], k] = z[i][coef]
            E[W[i][~coef] - N, k] = z[i][~coef]
        R = Y[:, live] - Y @ C - E
        m = lam_z * np.concatenate([Y.T @ R, R])  # (N + D, live)
        for k, i in enumerate(live):  # mu from the support's stationarity, m_j = mu + s_j
            sup = (W[i] < N) & (z[i] != 0)
            mu[k] = np.mean(m[W[i][sup], k] - np.sign(z[i][sup]))
        m[:N] -= mu
        viol = np.abs(m) / wfull[:, None] - 1
        nxt = []
        for k, i in enumerate(live):
            keep = W[i][z[i] != 0]
            viol[keep, k] = viol[i, k] = -np.inf
            new = np.argsort(-viol[:, k])[:grow]
            new = new[viol[new, k] > TOL]
            if len(new):
                W[i] = np.concatenate([keep, new])
                order = np.argsort(W[i])
                z[i] = np.concatenate([z[i][z[i] != 0], np.zeros(len(new))])[order]
                W[i] = W[i][order]
                nxt.append(i)
        print(f"pass {count}: {len(live)} columns, {len(nxt)} violate", flush=True)
        live = np.array(nxt, dtype=int)
    want = np.concatenate([ref.coef.numpy(), ref.outliers.numpy()])
    for name in RULES:
        rows[name] = [rows[name][i] for i in cols]
        for r in rows[name]:
            i = r["column"]
            diff = np.abs(want[W[i], i] - z[i]).max()
            full = np.abs(np.delete(want[:, i], W[i])).max(initial=0.0)
            r.update(max_diff=float(max(diff, full, r["pass_diff"])))
    result = dict(meta=meta(), reference_gap=ref.residual, grow=grow, passes=count,
                  seconds=time.perf_counter() - t0,
                  summary={k: summary(v) for k, v in rows.items()},
                  rows={k: by_key(v) for k, v in rows.items()})  # fmt: skip
    print(json.dumps(result["summary"], indent=1))
    return result


# ---- the check against a committed file ---------------------------------------------------


def _rows_by_column(data: dict) -> dict:
    """``{rule: {column: row}}`` from either layout: ``chains``'s list of rows (one rule)
    or ``global``'s and ``passes``'s lists per key (per rule)."""
    if isinstance(data["rows"], list):
        return {data["summary"]["rule"]: {r["column"]: r for r in data["rows"]}}
    out = {}
    for rule, cols in data["rows"].items():
        n = len(cols["column"])
        out[rule] = {cols["column"][j]: {k: v[j] for k, v in cols.items()} for j in range(n)}
    return out


def check(result: dict, committed: dict, tol: float = 1e-10) -> list[str]:
    """The differences of ``result``'s rows from ``committed``'s on the same columns (every
    key the committed rows have; ``max_diff`` and ``pass_diff`` within ``tol``, the rest
    exactly); empty when they agree."""
    ours, theirs = _rows_by_column(result), _rows_by_column(committed)
    bad = []
    for rule, rows in ours.items():
        for col, row in rows.items():
            want = theirs.get(rule, {}).get(col)
            if want is None:
                bad.append(f"{rule} column {col}: not in the committed file")
                continue
            for key, v in want.items():
                near = key in ("max_diff", "pass_diff") and v is not None
                if (abs(row.get(key, np.inf) - v) > tol) if near else row.get(key) != v:
                    bad.append(f"{rule} column {col} {key}: {row.get(key)} against {v}")
    return bad


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks.experiments.block_pivoting",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = ap.add_subparsers(dest="count", required=True)
    one = sub.add_parser("chains", help="one rule on each column's final set (chains_*.json)")
    one.add_argument("rule", choices=["single", "block", "pdas"])
    sub.add_parser("global", help="every rule on each column's final set (chains_global.json)")
    pas = sub.add_parser("passes", help="every rule over the kernel's passes (passes*.json)")
    pas.add_argument("--grow", type=int, default=16, help="variables a column a pass (16)")
    for s in sub.choices.values():
        s.add_argument("out", help="the JSON written")
        s.add_argument("--columns", help="a comma-separated sample (default: all N)")
        s.add_argument("--check", metavar="COMMITTED", help="compare the rows with this file's")
        s.add_argument("--check-tol", type=float, default=1e-10,
                       help="max_diff's allowed difference in --check (1e-10)")  # fmt: skip
    a = ap.parse_args(argv)
    columns = [int(c) for c in a.columns.split(",")] if a.columns else None
    if a.count == "chains":
        result = chains(a.rule, columns)
    elif a.count == "global":
        result = global_rules(columns)
    else:
        result = passes(a.grow, columns)
    with open(a.out, "w") as f:
        if a.count == "chains":
            json.dump(result, f)
        else:
            json.dump(result, f, separators=(",", ":"))
    if a.check:
        with open(a.check) as f:
            bad = check(result, json.load(f), a.check_tol)
        print("\n".join(bad) if bad else f"the rows equal {a.check}'s on these columns")
        return 1 if bad else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
