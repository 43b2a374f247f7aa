"""Issue 76 item 2, counted on the CPU (2026-11-28): the chain a column runs over a whole
call, each pass warm-started from the previous pass's answer, under the rules of
``chains_global.py`` (the same set: 16 frames, N = 2048, float64, NumPy).

The passes are the GPU kernel's (``workset_cuda._pass``), all in float64 at ``tol = 1e-9``
(the kernel runs float32 passes first, to ``SCREEN = 1e-5``, then float64: its passes
differ): each column starts from its nearest point (``W = {nearest}``, ``c_nearest = 1``);
after each solve its set becomes its support and the ``grow`` largest KKT violations off
it (over all N + D variables, ``c_i`` excepted; the kernel's default ``grow`` is 16), until
no column violates. Every rule
reaches the set's minimiser, so the sets follow the kernel's rule's answers and are the
same for every rule; each pass each rule starts from the previous pass's answer (its
support and signs). A column's chain is the sum of its steps over the passes; its
``max_diff``: the largest difference of the final answer to the certified minimiser, or
of a rule's answer to the kernel's rule's in any pass.

    python passes.py OUT.json GROW [COLUMNS]   (COLUMNS: a comma-separated sample; all by default)
"""

import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, ".")
sys.path.insert(0, str(Path(__file__).resolve().parent))
from chains_global import RULES, TOL, by_key, meta, problem, summary  # noqa: E402

GROW = 16


def main(out, grow=GROW, sample=None):
    p = problem()
    ref, Y, G, wfull = p["ref"], p["Y"], p["G"], p["wfull"]
    d, N, lam_e, lam_z = p["d"], p["N"], p["lam_e"], p["lam_z"]
    cos = G / np.sqrt(np.outer(np.diag(G), np.diag(G)))
    np.fill_diagonal(cos, -np.inf)
    W = [np.array([j]) for j in cos.argmax(axis=0)]  # each column's set: its nearest point
    z = [np.ones(1) for _ in range(N)]
    rows = {r: [dict(column=i, steps=0, sizes=[], changed=[0], converged=True, passes=0)
                for i in range(N)] for r in RULES}  # fmt: skip
    cols = np.arange(N) if sample is None else np.sort(sample)
    live, passes, t0 = cols, 0, time.perf_counter()
    while len(live):
        passes += 1
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
        print(f"pass {passes}: {len(live)} columns, {len(nxt)} violate", flush=True)
        live = np.array(nxt, dtype=int)
    want = np.concatenate([ref.coef.numpy(), ref.outliers.numpy()])
    for name in RULES:
        rows[name] = [rows[name][i] for i in cols]
        for r in rows[name]:
            i = r["column"]
            diff = np.abs(want[W[i], i] - z[i]).max()
            full = np.abs(np.delete(want[:, i], W[i])).max(initial=0.0)
            r.update(max_diff=float(max(diff, full, r["pass_diff"])))
    result = dict(meta=meta(), reference_gap=ref.residual, grow=grow, passes=passes,
                  seconds=time.perf_counter() - t0,
                  summary={k: summary(v) for k, v in rows.items()},
                  rows={k: by_key(v) for k, v in rows.items()})  # fmt: skip
    print(json.dumps(result["summary"], indent=1))
    with open(out, "w") as f:
        json.dump(result, f, separators=(",", ":"))


if __name__ == "__main__":
    sample = sys.argv[3:] and [int(c) for c in sys.argv[3].split(",")]
    main(sys.argv[1], int(sys.argv[2]), sample or None)
