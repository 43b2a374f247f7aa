"""Issue 76 item 2, counted on the CPU (2026-11-28): how many dependent steps a column's
solve takes on its working set under three pivoting rules, on bench_workset_cuda's
16-frame video-like set (Qwen2.5-VL-7B shapes, N = 2048, D = 3584), float64, NumPy.

Each column's set W is its certified minimiser's support (reference_minimiser), the 16
largest KKT ratios off it and its nearest point, the GPU kernel's start (c_nearest = 1).
The rules (a dense solve of the support's bordered system per step):
- ``single``: the GPU kernel's primal active set: the worst violator joins; a step that
  would change a support variable's sign stops at the first, which leaves;
- ``block``: every violator joins at once, leaves as in ``single``;
- ``pdas``: the primal-dual active set (semismooth Newton without a line search): the
  support and signs from ``v + tau g`` against ``tau w``, ``tau = 1 / median diag H``,
  at most 200 iterations.
Each column's answer is checked against the minimiser (largest difference) and its KKT.

    python chains.py single|block|pdas OUT.json
"""

import json
import sys
import time

import numpy as np

sys.path.insert(0, ".")
from benchmarks.common import video_tokens  # noqa: E402
from videoanchor.anchor.workset import reference_minimiser  # noqa: E402


def problem() -> dict:
    """The set, its certified minimiser (``ref``, ``C``, ``E``) and what the working sets
    read: ``Y`` (D x N), ``G = Y'Y``, the lambdas and the l1 weights of all N + D variables."""
    x = video_tokens(16, 128, 3584, k=8, seed=0).double()
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


def bordered(H, a, b, w, s, idx):
    K = np.zeros((len(idx) + 1, len(idx) + 1))
    K[:-1, :-1] = H[np.ix_(idx, idx)]
    K[:-1, -1] = K[-1, :-1] = a[idx]
    sol = np.linalg.solve(K, np.concatenate([b[idx] - w[idx] * s[idx], [1.0]]))
    return sol[:-1], sol[-1]


def active_set(H, a, b, w, v, me, block):
    F, s = v != 0, np.sign(v)
    steps = joins = leaves = 0
    while steps < 5000:
        idx = np.flatnonzero(F)
        zi, mu = bordered(H, a, b, w, s, idx)
        zt = np.zeros_like(v)
        zt[idx] = zi
        steps += 1
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
        g = b - H @ v - mu * a
        viol = np.where(~F, np.abs(g) / w - 1, -1.0)
        viol[me] = -1.0
        if viol.max() <= 1e-9:
            return v, mu, dict(steps=steps, joins=joins, leaves=leaves, converged=True)
        new = viol > 1e-9 if block else viol == viol.max()
        F |= new
        s = np.where(new, np.sign(g), s)
        joins += 1
    return v, mu, dict(steps=steps, joins=joins, leaves=leaves, converged=False)


def pdas(H, a, b, w, v, coef):
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
            return v, mu, dict(steps=it, converged=True)
        prev = key
        idx = np.flatnonzero(A)
        vi, mu = bordered(H, a, b, w, s, idx)
        v = np.zeros_like(v)
        v[idx] = vi
        g = b - H @ v - mu * a
    return v, mu, dict(steps=200, converged=False)


def main(rule: str, out: str) -> None:
    p = problem()
    rows, t0 = [], time.perf_counter()
    for i in range(p["N"]):
        c = column(p, i)
        H, a, b, w, v = c["H"], c["a"], c["b"], c["w"], c["v0"]
        if rule == "pdas":
            v, mu, row = pdas(H, a, b, w, v, c["coef"])
        else:
            v, mu, row = active_set(H, a, b, w, v, c["me"], rule == "block")
        row.update(column=i, set=len(c["W"]), support=len(c["supp"]),
                   max_diff=float(np.abs(v - c["want"]).max()))  # fmt: skip
        rows.append(row)
    steps = np.array([r["steps"] for r in rows])
    support = np.array([r["support"] for r in rows])
    summary = dict(rule=rule, n=p["N"], seconds=time.perf_counter() - t0,
                   reference_gap=p["ref"].residual,
                   converged=int(sum(r["converged"] for r in rows)),
                   steps_median=float(np.median(steps)), steps_max=int(steps.max()),
                   support_median=float(np.median(support)), support_max=int(support.max()),
                   max_diff=max(r["max_diff"] for r in rows))  # fmt: skip
    print(summary)
    json.dump(dict(summary=summary, rows=rows), open(out, "w"))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
