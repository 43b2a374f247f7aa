"""Issue 76 item 2, counted on the CPU (2026-11-28): globalised block rules for a
column's solve on its working set, beside the GPU kernel's single-pivot rule, on
bench_workset_cuda's 16-frame video-like set (Qwen2.5-VL-7B shapes, N = 2048, D = 3584),
float64, NumPy. The set, the working sets and the start are those of
``../block-pivoting-2026-11-28/chains.py`` (its ``problem`` and ``column``): each
column's set W is its certified minimiser's support, the 16 largest KKT ratios off it and
its nearest point; the start is the GPU kernel's, ``c_nearest = 1``. The subproblem:
minimise ``v'Hv / 2 - b'v + sum w|v|`` over W with ``a'v = 1`` (``a``: 1 on coefficients)
and ``v_i = 0``.

A step is one solve of the bordered system of the support (and the variables joining):
the dependent chain a GPU program runs. Per step the rows record the system's size and how
many variables changed since the last solve (the rank of the update a carried inverse would
take). The rules:
- ``single``: the kernel's (chains.py's ``single``, again here as the control);
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

    python chains_global.py OUT.json [COLUMNS]   (COLUMNS: a comma-separated sample)
"""

import json
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np

sys.path.insert(0, ".")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "block-pivoting-2026-11-28"))
from chains import column, problem  # noqa: E402

from benchmarks.common import environment  # noqa: E402

TOL, CAP, BACKUP = 1e-9, 5000, 3


def bordered(H, a, b, w, s, idx):
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


def single(H, a, b, w, v, me):
    """The GPU kernel's rule (chains.py's ``active_set`` without ``block``)."""
    F, s = v != 0, np.sign(v)
    log = Log(F)
    while len(log.sizes) < CAP:
        zt, mu = log.solve(H, a, b, w, s, F)
        bad = F & (s * zt <= 0)
        if bad.any():  # the first support variable to reach zero leaves
            gone = v - zt
            ratio = np.where(bad, v / np.where(gone != 0, gone, 1), 2.0)
            k = int(np.argmin(ratio))
            v = np.where(F, v + ratio[k] * (zt - v), 0.0)
            v[k], F[k], s[k] = 0.0, False, 0.0
            continue
        v = zt
        g, viol = violations(H, a, b, w, v, mu, F, me)
        if viol.max() <= TOL:
            return v, log.row(True)
        k = int(np.argmax(viol))
        F[k], s[k] = True, np.sign(g[k])
    return v, log.row(False)


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


RULES = dict(single=single, bpp=bpp, bpp10=partial(bpp, backup=10), newton=newton,
             bpp_newton=partial(bpp, then=newton))  # fmt: skip


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


def main(out, columns=None):
    p = problem()
    rows, seconds = {r: [] for r in RULES}, dict.fromkeys(RULES, 0.0)
    for i in range(p["N"]) if columns is None else columns:
        c = column(p, i)
        for name, rule in RULES.items():
            t0 = time.perf_counter()
            v, row = rule(c["H"], c["a"], c["b"], c["w"], c["v0"].copy(), c["me"])
            seconds[name] += time.perf_counter() - t0
            row.update(column=int(i), set=len(c["W"]), support=len(c["supp"]),
                       max_diff=float(np.abs(v - c["want"]).max()))  # fmt: skip
            rows[name].append(row)
    result = dict(meta=meta(), reference_gap=p["ref"].residual, seconds=seconds,
                  summary={k: summary(v) for k, v in rows.items()},
                  rows={k: by_key(v) for k, v in rows.items()})  # fmt: skip
    print(json.dumps(result["summary"], indent=1), seconds)
    with open(out, "w") as f:
        json.dump(result, f, separators=(",", ":"))


if __name__ == "__main__":
    sample = sys.argv[2:] and [int(c) for c in sys.argv[2].split(",")]
    main(sys.argv[1], sample or None)
