"""Extended Yale B face clustering (Elhamifar & Vidal, TPAMI 2013, Table 5) with our SSC.

Protocol: 38 subjects split into groups 1-10, 11-20, 21-30, 31-38; for n in {2, 3, 5, 8,
10} subjects, the subsets are the choices of n subjects within one group. All subsets are
used when ``--subsets-per-n 0``; otherwise a seeded uniform random sample of that many
(the 3 subsets of n = 10 are always all used). Images are the 48 x 42 = 2016-pixel raw
intensities, one row per image (no projection).

Face settings of E&V's code (``run_SSC_Faces``: ``SSC(X, 0, false, 20, true, 1)``):

* ``--program constrained`` (default): their outlier program
  ``min ||C||_1 + gamma ||E||_1 s.t. Y = Y C + E, diag(C) = 0``, no affine constraint,
  alpha = 20 (``gamma = 20 / ||Y||_1``, ``mu1 = 20 / lambda``, ADMM penalty ``mu2 = 20``),
  stopping threshold 2e-4 and ``maxIter = 150`` (149 iterations), i.e.
  ``sparse_subspace_clustering(data_term="exact", rho=20, max_iter=149)``;
* ``--program squared``: docs/method.md's program (VideoAnchor's: squared data term,
  ``lambda_e ||E||_1``) with alpha_e = alpha_z = 20, no affine constraint, rho = 300, run
  to its own stopping rule: not E&V's program, kept to show the difference.

Then spectral clustering of the column-max-normalised affinity |C| + |C|^T with k-means
(20 restarts) on the row-normalised eigenvectors of the normalised Laplacian, as in
their code.

Error: the fraction of misclustered images under the best matching of clusters to
subjects (Hungarian). ``ours`` is :func:`videoanchor.sparse_subspace_clustering`
(float32, the authors' iteration); ``reference`` is a
plain float64 NumPy transcription of the same program as its authors wrote it
(``constrained``: E&V's ``admmOutlier_mat_func`` with its ``(N + D) x (N + D)``
inverse; ``squared``: the VideoAnchor authors' ADMM with a dense solve per iteration),
with the same spectral clustering in NumPy/scikit-learn, run on the first
``--reference-per-n`` subsets of each n for the time comparison.

    python benchmarks/bench_yaleb.py --data ../shared/data/YaleB_48_42.mat
"""

from __future__ import annotations

import itertools
import random
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.common import environment, finish, parser, skip  # noqa: E402
from videoanchor.anchor import sparse_subspace_clustering  # noqa: E402
from videoanchor.anchor.reference import (  # noqa: E402
    authors_admm,
    elhamifar_vidal_outlier_admm,
)

GROUPS = [range(1, 11), range(11, 21), range(21, 31), range(31, 39)]
# SSC mean clustering error (%) on Extended Yale B, Elhamifar & Vidal 2013, Table 5.
# The issue quotes 2 and 10 subjects; 3, 5 and 8 are transcribed from the same table.
PUBLISHED_MEAN_ERROR = {2: 1.86, 3: 3.10, 5: 4.31, 8: 5.85, 10: 10.94}
FACE = {
    "constrained": dict(
        alpha_e=20.0, alpha_z=20.0, affine=False, outliers=True, data_term="exact",
        rho=20.0, eps=2e-4, max_iter=149,
    ),
    "squared": dict(alpha_e=20.0, alpha_z=20.0, affine=False, outliers=True),
}  # fmt: skip
SETTINGS = {
    "constrained": "E&V constrained outlier program (Y = YC + E), no affine constraint, "
    "alpha = 20, mu2 = 20, eps 2e-4, 149 iterations at most",
    "squared": "docs/method.md squared data term + lambda_e ||E||_1, no affine constraint, "
    "alpha_e = alpha_z = 20, rho = 300, eps 2e-4",
}


def default_data_path() -> Path:
    for p in (
        ROOT.parent / "shared" / "data" / "YaleB_48_42.mat",
        ROOT / "data" / "YaleB_48_42.mat",
    ):
        if p.exists():
            return p
    return ROOT.parent / "shared" / "data" / "YaleB_48_42.mat"


def load_yaleb(path) -> tuple[np.ndarray, np.ndarray]:
    """``(images, subjects)``: images (2414, 2016) float64, one row per image; subjects 1..38."""
    from scipy.io import loadmat

    mat = loadmat(str(path))
    if "DATA" not in mat or "labels" not in mat:
        raise ValueError(f"{path}: expected variables DATA and labels, got {sorted(mat)}")
    images = np.asarray(mat["DATA"], dtype=np.float64).T
    subjects = np.asarray(mat["labels"]).ravel().astype(np.int64)
    if images.shape[0] != subjects.shape[0]:
        raise ValueError(f"{path}: {images.shape[0]} images but {subjects.shape[0]} labels")
    return images, subjects


def clustering_error(truth, pred) -> float:
    """Fraction misclustered under the best one-to-one matching of clusters to classes."""
    from scipy.optimize import linear_sum_assignment

    t = np.unique(np.asarray(truth), return_inverse=True)[1]
    p = np.unique(np.asarray(pred), return_inverse=True)[1]
    m = np.zeros((t.max() + 1, p.max() + 1))
    np.add.at(m, (t, p), 1)
    rows, cols = linear_sum_assignment(-m)
    return 1.0 - m[rows, cols].sum() / len(t)


def subsets(n: int, per_n: int, seed: int) -> list[tuple[int, ...]]:
    """Every choice of ``n`` subjects within a group, or a seeded sample of ``per_n``."""
    all_sets = [c for g in GROUPS for c in itertools.combinations(g, n)]
    if per_n and per_n < len(all_sets):
        rng = random.Random(seed * 1000 + n)
        all_sets = sorted(rng.sample(all_sets, per_n))
    return all_sets


def reference_spectral(coef: np.ndarray, n: int, seed: int) -> np.ndarray:
    """The authors' spectral clustering (column-max affinity, NJW, k-means x 20) in NumPy."""
    from sklearn.cluster import KMeans

    a = np.abs(coef)
    a = a / (a.max(axis=0, keepdims=True) + np.finfo(float).eps)
    w = a + a.T
    dn = 1.0 / np.sqrt(w.sum(axis=0) + np.finfo(float).eps)
    lap = np.eye(len(w)) - dn[:, None] * w * dn[None, :]
    _, vecs = np.linalg.eigh(lap)
    ker = vecs[:, :n]
    ker = ker / np.linalg.norm(ker + np.finfo(float).eps, axis=1, keepdims=True)
    return KMeans(n, n_init=20, max_iter=1000, random_state=seed).fit_predict(ker)


def run_ours(x: np.ndarray, n: int, device: str, seed: int, program: str = "constrained"):
    t = torch.from_numpy(x).to(device)
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    res = sparse_subspace_clustering(
        t, n, affinity="column_max", assign_labels="kmeans", seed=seed, solver="faithful",
        **FACE[program],
    )  # fmt: skip
    if device == "cuda":
        torch.cuda.synchronize()
    return res.labels.cpu().numpy(), time.perf_counter() - t0, res.iterations


def run_reference(x: np.ndarray, n: int, seed: int, program: str = "constrained"):
    t0 = time.perf_counter()
    if program == "constrained":
        coef, it, _ = elhamifar_vidal_outlier_admm(x.T, alpha=20.0, eps=2e-4, max_iter=150)
    else:
        coef, it, _ = authors_admm(x.T, **FACE["squared"])
    labels = reference_spectral(coef, n, seed)
    return labels, time.perf_counter() - t0, it


def run(args):
    images, subjects = load_yaleb(args.data)
    meta = environment(args.device)
    meta.update(
        data=str(args.data),
        n_images=int(images.shape[0]),
        pixels=int(images.shape[1]),
        subsets_per_n=args.subsets_per_n,
        seed=args.seed,
        solver="faithful",
        program=args.program,
        settings=SETTINGS[args.program] + "; column-max affinity, NJW + k-means (20 restarts)",
    )
    rows, per_subset = [], []
    for n in args.n_subjects:
        sets = subsets(n, args.subsets_per_n, args.seed)
        errs, times, ref_errs, ref_times, ours_on_ref = [], [], [], [], []
        for i, subj in enumerate(sets):
            idx = np.isin(subjects, subj)
            x, truth = images[idx], subjects[idx]
            labels, dt, it = run_ours(x, n, args.device, args.seed, args.program)
            e = clustering_error(truth, labels)
            errs.append(e)
            times.append(dt)
            rec = {"n": n, "subjects": list(subj), "error": e, "time_s": dt, "iterations": it}
            if i < args.reference_per_n:
                rl, rt, rit = run_reference(x, n, args.seed, args.program)
                ref_errs.append(clustering_error(truth, rl))
                ref_times.append(rt)
                ours_on_ref.append(dt)
                rec.update(ref_error=ref_errs[-1], ref_time_s=rt, ref_iterations=rit)
            per_subset.append(rec)
            print(f"n={n} {subj}: error {100 * e:.2f}%  {dt:.2f}s", flush=True)
        mean = 100 * statistics.mean(errs)
        row = {
            "n_subjects": n,
            "subsets": len(sets),
            "subsets_total": len(subsets(n, 0, args.seed)),
            "mean_error_pct": mean,
            "median_error_pct": 100 * statistics.median(errs),
            "published_mean_error_pct": PUBLISHED_MEAN_ERROR.get(n),
            "within_published_plus_1": bool(
                mean <= PUBLISHED_MEAN_ERROR.get(n, float("inf")) + 1.0
            ),
            "ours_time_s_mean": statistics.mean(times),
        }
        if ref_times:
            row.update(
                reference_subsets=len(ref_times),
                reference_mean_error_pct=100 * statistics.mean(ref_errs),
                reference_time_s_mean=statistics.mean(ref_times),
                ours_time_s_same_subsets=statistics.mean(ours_on_ref),
                speedup=statistics.mean(ref_times) / statistics.mean(ours_on_ref),
            )
        rows.append(row)
    meta["per_subset"] = per_subset
    name = "yaleb" if args.program == "constrained" else "yaleb_squared"
    cols = ["n_subjects", "subsets", "mean_error_pct", "published_mean_error_pct",
            "within_published_plus_1", "ours_time_s_mean", "reference_time_s_mean", "speedup"]  # fmt: skip
    return finish(name, meta, rows, args.out_dir, cols)


def main(argv=None):
    ap = parser(__doc__, quick="2 and 3 subjects, 3 subsets each, 1 reference run (a smoke run)")
    ap.add_argument(
        "--data",
        type=Path,
        default=None,
        help="default: shared/data beside the checkout, or data/ inside it",
    )
    ap.add_argument("--n-subjects", type=int, nargs="+", default=[2, 3, 5, 8, 10])
    ap.add_argument("--subsets-per-n", type=int, default=20, help="0: every subset")
    ap.add_argument("--reference-per-n", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument(
        "--program",
        choices=["constrained", "squared"],
        default="constrained",
        help="constrained: E&V's program (default); squared: docs/method.md's (VideoAnchor's)",
    )
    args = ap.parse_args(argv)
    if args.data is None:
        args.data = default_data_path()
        if not args.data.exists():
            skip(
                "bench_yaleb",
                f"no Extended Yale B data at {args.data} (YaleB_48_42.mat, not "
                "shipped with the package); pass --data",
            )
            return
    if not args.data.exists():
        ap.error(f"--data: {args.data} does not exist")
    if args.quick:
        args.n_subjects, args.subsets_per_n = [2, 3], min(args.subsets_per_n, 3)
        args.reference_per_n = min(args.reference_per_n, 1)
        skip(
            "bench_yaleb",
            "--quick: 2 and 3 subjects, 3 subsets each (5, 8, 10 subjects and 20 subsets not run)",
        )
    run(args)


if __name__ == "__main__":
    main()
