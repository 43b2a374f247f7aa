"""Plain references shared by the tests and the benchmarks (not used by the fast path).

* :func:`authors_lambdas`, :func:`authors_admm`, :func:`authors_spectral_labels`,
  :func:`authors_pipeline`: the authors' pipeline in NumPy float64 (the lambdas' Python
  double loop, a dense solve of the ``N x N`` system every ADMM iteration, scikit-learn's
  discretised spectral clustering); baseline of ``benchmarks/bench_ssc.py``.
* :func:`elhamifar_vidal_outlier_admm`: Elhamifar & Vidal's ``admmOutlier_mat_func``
  transcribed with its explicit ``(N + D) x (N + D)`` inverse; baseline of ``bench_yaleb.py``.
* :func:`reference_scores`: docs/method.md section 3 written as loops.
"""

from __future__ import annotations

import numpy as np

from videoanchor.anchor.options import takes_options

__all__ = [
    "authors_lambdas",
    "authors_admm",
    "authors_spectral_labels",
    "authors_pipeline",
    "elhamifar_vidal_outlier_admm",
    "reference_scores",
]


def authors_lambdas(y: np.ndarray, alpha_e: float, alpha_z: float) -> tuple[float, float]:
    """``(lambda_e, lambda_z)`` for ``y`` (``D x N``) by the O(N^2) Python loops."""
    n = y.shape[1]
    col_l1 = [float(np.abs(y[:, j]).sum()) for j in range(n)]
    gram = y.T @ y
    mu_e = min(max(col_l1[j] for j in range(n) if j != i) for i in range(n))
    mu_z = min(max(abs(gram[i, j]) for j in range(n) if j != i) for i in range(n))
    return alpha_e / mu_e, alpha_z / mu_z


@takes_options("alpha_e", "alpha_z", "rho", "eps", "max_iter")
def authors_admm(y: np.ndarray, *, affine: bool = True, outliers: bool = True,
                 lambdas: tuple[float, float] | None = None, callback=None,
                 **options) -> tuple[np.ndarray, int, bool]:  # fmt: skip
    """SSC-ADMM of docs/method.md section 2 for ``y`` (``D x N``), float64, dense solve each step.

    ``alpha_e``, ``alpha_z``, ``rho``, ``eps`` and ``max_iter`` as in
    :class:`~videoanchor.anchor.SSCOptions` (the authors' defaults). Returns
    ``(C, iterations, converged)``. ``callback(it, A, C, E)`` sees every iterate.
    """
    rho, eps = options["rho"], options["eps"]
    y = np.asarray(y, dtype=np.float64)
    d, n = y.shape
    alphas = options["alpha_e"], options["alpha_z"]
    lam_e, lam_z = lambdas if lambdas is not None else authors_lambdas(y, *alphas)
    ones = np.ones((n, 1))
    C = np.zeros((n, n))
    E = np.zeros((d, n))
    delta1 = np.zeros((n, 1))
    delta2 = np.zeros((n, n))
    gram = y.T @ y
    it = 0
    for it in range(1, options["max_iter"] + 1):
        lhs = lam_z * gram + rho * np.eye(n)
        rhs = lam_z * (y.T @ (y - E)) + rho * C - delta2
        if affine:
            lhs = lhs + rho * (ones @ ones.T)
            rhs = rhs + rho * (ones @ ones.T) - ones @ delta1.T
        A = np.linalg.solve(lhs, rhs)
        t = A + delta2 / rho
        C = np.maximum(np.abs(t) - 1.0 / rho, 0.0) * np.sign(t)
        C = C - np.diag(np.diag(C))
        if outliers:
            r = y - y @ A
            E = np.maximum(np.abs(r) - lam_e / lam_z, 0.0) * np.sign(r)
        if affine:
            delta1 = delta1 + rho * (A.T @ ones - ones)
        delta2 = delta2 + rho * (A - C)
        if callback is not None:
            callback(it, A, C, E)
        err = np.abs(A - C).sum(axis=1).max()
        if err < eps:
            return C, it, True
    return C, it, False


def authors_spectral_labels(coef: np.ndarray, n_clusters: int, seed=None) -> np.ndarray:
    """scikit-learn spectral clustering of ``|C| + |C|^T`` with discretisation."""
    from sklearn.cluster import SpectralClustering

    w = np.abs(coef) + np.abs(coef).T
    sc = SpectralClustering(
        n_clusters=n_clusters,
        affinity="precomputed",
        assign_labels="discretize",
        random_state=seed,
    )
    return sc.fit_predict(w)


def reference_scores(coef: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """docs/method.md section 3, written with loops, float64."""
    n = coef.shape[0]
    s_hat = np.zeros(n)
    for j in range(n):
        r_j = sum(coef[j, i] for i in range(n))
        pi_j = sum(1 for k in range(n) if labels[k] == labels[j]) / n
        s_hat[j] = pi_j * r_j
    return (s_hat - s_hat.min()) / (s_hat.max() - s_hat.min() + 1e-5)


def authors_pipeline(features: np.ndarray, n_clusters: int = 24, seed=None, **admm_kw) -> dict:
    """Lambdas, ADMM, spectral clustering and scores as the authors compute them.

    ``features`` is ``N x D``. Returns a dict with ``scores``, ``labels``, ``coef``,
    ``iterations``, ``converged``.
    """
    y = np.asarray(features, dtype=np.float64).T
    coef, it, ok = authors_admm(y, **admm_kw)
    labels = authors_spectral_labels(coef, n_clusters, seed)
    r = coef.sum(axis=1)
    counts = np.bincount(labels)
    s_hat = counts[labels] / coef.shape[0] * r
    scores = (s_hat - s_hat.min()) / (s_hat.max() - s_hat.min() + 1e-5)
    return {"scores": scores, "labels": labels, "coef": coef, "iterations": it, "converged": ok}


def elhamifar_vidal_outlier_admm(
    y: np.ndarray,
    *,
    alpha: float = 20.0,
    affine: bool = False,
    eps: float = 2e-4,
    max_iter: int = 150,
    callback=None,
) -> tuple[np.ndarray, int, bool]:
    """E&V's ``admmOutlier_mat_func(Y, affine, alpha)`` in NumPy float64, line for line.

    ``y`` is ``D x N``. ``min ||C||_1 + gamma ||E||_1 s.t. Y = Y C + E, diag(C) = 0`` (and
    ``1^T C = 1^T`` when ``affine``) with ``P = [Y, I / gamma]``, ``gamma = alpha / ||Y||_1``,
    ``mu1 = alpha / lambda(Y, P)``, ``mu2 = alpha``; at most ``max_iter - 1`` iterations, as
    in their loop. Returns ``(C, iterations, converged)``; ``callback(it, C, E)`` sees every
    iterate.
    """
    y = np.asarray(y, dtype=np.float64)
    d, n = y.shape
    gamma = alpha / np.abs(y).sum(axis=0).max()
    p = np.hstack([y, np.eye(d) / gamma])
    t = np.abs(p.T @ y)
    t[:n] -= np.diag(np.diag(t[:n]))
    mu1 = alpha / t.max(axis=0).min()
    mu2 = alpha
    delta = np.concatenate([np.ones(n), np.zeros(d)])[:, None]
    system = mu1 * (p.T @ p) + mu2 * np.eye(n + d)
    if affine:
        system = system + mu2 * (delta @ delta.T)
    a = np.linalg.inv(system)
    c1 = np.zeros((n + d, n))
    lam1 = np.zeros((d, n))
    lam2 = np.zeros((n + d, n))
    lam3 = np.zeros((1, n))
    it, err1, err2, err3 = 1, 10 * eps, 10 * eps, 10 * eps if affine else 0.0
    while (err1 > eps or err2 > eps or err3 > eps) and it < max_iter:
        rhs = mu1 * p.T @ (y + lam1 / mu1) + mu2 * (c1 - lam2 / mu2)
        if affine:
            rhs = rhs + mu2 * delta @ (np.ones((1, n)) - lam3 / mu2)
        z = a @ rhs
        z[:n] -= np.diag(np.diag(z[:n]))
        v = z + lam2 / mu2
        c2 = np.maximum(0.0, np.abs(v) - 1.0 / mu2) * np.sign(v)
        c2[:n] -= np.diag(np.diag(c2[:n]))
        lam1 = lam1 + mu1 * (y - p @ z)
        lam2 = lam2 + mu2 * (z - c2)
        err1 = np.abs(z - c2).max()
        y0 = y - p[:, n:] @ z[n:]
        err2 = np.sqrt((((y0 - y @ z[:n]) / np.linalg.norm(y0, axis=0)) ** 2).sum(axis=0).max())
        if affine:
            lam3 = lam3 + mu2 * (delta.T @ z - np.ones((1, n)))
            err3 = np.abs(delta.T @ z - np.ones((1, n))).max()
        c1 = c2
        if callback is not None:
            callback(it, c1[:n], c1[n:] / gamma)
        it += 1
    return c1[:n], it - 1, bool(err1 <= eps and err2 <= eps and err3 <= eps)
