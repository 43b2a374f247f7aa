"""Seed stability of the anchor scores against ``label_draws`` (beyond the paper).

The paper's pipeline draws one random label assignment (scikit-learn's ``discretize``),
so two seeds give different scores for the same video. ``label_draws=R`` draws ``R``
assignments from the one spectral embedding and averages each token's cluster share.

Data: the issue's example, tokens without a gap at k: a union of 16 subspaces (dim 8, 64
points each, ambient 512, noise 0.02), N = 1024, C after 60 ADMM iterations (computed
once: it does not depend on the seed), asked for k = 24 clusters. For each R in
(1, 4, 16) and each of ``--seeds`` seeds, the spectral step and the scores are computed
(``spectral_labels`` + ``anchor_scores``, what ``compute_anchor_scores`` runs after the
ADMM); over all seed pairs we report the Spearman correlation of the scores, the largest
score difference and the labels' ARI (of the first draw), and the time of the spectral
step and scores against R = 1, measured interleaved (one thread, median over seeds).

    python benchmarks/bench_label_draws.py            # CPU, writes label_draws_cpu.json
    python benchmarks/bench_label_draws.py --quick    # 3 seeds, R in (1, 4): a smoke run
"""

from __future__ import annotations

import itertools
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.bench_spectral import example_tokens  # noqa: E402
from benchmarks.common import (  # noqa: E402
    ari,
    environment,
    finish,
    parser,
    skip,
    spearman,
)
from videoanchor.anchor import anchor_scores, solve_ssc_admm  # noqa: E402
from videoanchor.anchor.spectral import spectral_labels, ssc_affinity  # noqa: E402

K = 24


def run(seeds, draws_list, out_dir, admm_iters):
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(1)
    meta = environment("cpu")
    meta["loadavg_start"] = os.getloadavg()
    meta["torch_threads"] = torch.get_num_threads()
    meta["blas_threads"] = 1
    meta["data"] = (
        "union of 16 subspaces (dim 8, 64 points each, D = 512, noise 0.02), N = 1024, "
        f"C after {admm_iters} ADMM iterations, k = {K}"
    )
    with threadpool_limits(1):
        x = example_tokens()
        t = time.perf_counter()
        admm = solve_ssc_admm(x, max_iter=admm_iters)
        meta["admm_s"] = time.perf_counter() - t
        coef = admm.coef
        w = ssc_affinity(coef)
        scores = {r: {} for r in draws_list}
        labels = {r: {} for r in draws_list}
        times = {r: [] for r in draws_list}
        for seed in range(seeds):
            for r in draws_list:  # interleaved
                t = time.perf_counter()
                lab = spectral_labels(w, K, seed=seed, draws=r)
                s = anchor_scores(coef, lab)
                times[r].append(time.perf_counter() - t)
                scores[r][seed] = s.numpy()
                labels[r][seed] = lab[0].numpy()
    meta["loadavg_end"] = os.getloadavg()
    rows = []
    base = statistics.median(times[draws_list[0]])
    for r in draws_list:
        pairs = list(itertools.combinations(range(seeds), 2))
        rho = [spearman(scores[r][a], scores[r][b]) for a, b in pairs]
        diff = [float(np.abs(scores[r][a] - scores[r][b]).max()) for a, b in pairs]
        aris = [ari(labels[r][a], labels[r][b]) for a, b in pairs]
        med = statistics.median(times[r])
        rows.append(
            dict(
                label_draws=r,
                n=int(x.shape[0]),
                k=K,
                seeds=seeds,
                seed_pairs=len(pairs),
                spearman_median=statistics.median(rho),
                spearman_min=min(rho),
                spearman_max=max(rho),
                max_score_diff_median=statistics.median(diff),
                max_score_diff_max=max(diff),
                labels_ari_median=statistics.median(aris),
                spectral_and_scores_s=med,
                extra_s_vs_r1=med - base,
                extra_vs_admm=(med - base) / meta["admm_s"],
            )  # fmt: skip
        )
    cols = ["label_draws", "spearman_median", "spearman_min", "max_score_diff_max",
            "labels_ari_median", "spectral_and_scores_s", "extra_s_vs_r1"]  # fmt: skip
    return finish("label_draws", meta, rows, out_dir, cols)


def main(argv=None):
    ap = parser(__doc__, quick="3 seeds and R in (1, 4) (a smoke run)")
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--draws", default="1,4,16")
    ap.add_argument("--admm-iters", type=int, default=60)
    args = ap.parse_args(argv)
    if args.quick:
        args.seeds, args.draws = min(args.seeds, 3), "1,4"
        skip(
            "bench_label_draws", "--quick: 3 seeds and R = 1, 4 only (R = 16 and 10 seeds not run)"
        )
    run(args.seeds, [int(v) for v in args.draws.split(",")], args.out_dir, args.admm_iters)


if __name__ == "__main__":
    main()
