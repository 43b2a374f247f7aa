"""Issue 98 item 4, counted on the CPU (2026-11-28): the Chebyshev solver's rounds (its host
reads, one a round in float32) and filter steps, before (``--before``, the solver that read
the random start block's Ritz values and planned from the smallest Ritz value) and after,
with and without the steady share's window (``window=(k - 1, 1e-2)``), on test_host_reads'
8-frame set and five ``bench_spectral.group_affinity`` sets, float32, seed 0, ``k + 1``
pairs converged as ``spectral_pairs`` asks. For the window: the pairs returned, whether they
cover it, and the soft share from them against float64 ``eigh``'s (``soft_cluster_shares``).
``--aims``: instead, the set at seeds 0-5 under several ``PLAN_AIM``. The counts do not
depend on the machine (the tables in docs/ssc.md, "Its host reads").

    python benchmarks/experiments/chebyshev_rounds.py --before ac431ef
    python benchmarks/experiments/chebyshev_rounds.py --aims 1,0.3,0.1
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchmarks.common import module_at  # noqa: E402


def _before(commit: str):
    return module_at(commit, "videoanchor/anchor/eigensolvers.py", "eigensolvers_before")


def sets() -> dict:
    from benchmarks.bench_spectral import group_affinity
    from benchmarks.common import video_tokens
    from videoanchor.anchor import clustering, solve_ssc_workset

    x = video_tokens(8, 48, 97, k=6, seed=0)  # test_host_reads' set
    out = {"test_host_reads 8 frames, N 384": (
        clustering.ssc_affinity(solve_ssc_workset(x.double()).coef.float()), 24)}  # fmt: skip
    for n, g, nnz, p_out, seed, k in ((401, 16, 60, 0.8, 11, 24), (300, 8, 10, 0.02, 3, 8),
                                      (311, 9, 10, 0.02, 311, 9), (1200, 24, 10, 0.3, 5, 24),
                                      (2000, 16, 30, 0.8, 6, 24)):  # fmt: skip
        w = group_affinity(n, g, nnz, p_out, seed=seed, dtype=torch.float64).float()
        out[f"group_affinity({n}, {g}, {nnz}, {p_out}) seed {seed}"] = (w, k)
    return out


def run(es, w, k, window: bool) -> dict:
    s, dd = es._normalized_affinity(w)
    calls = [0]

    def matmul(v):  # (the eager filter steps call it too: degree a step)
        calls[0] += 1
        return s @ v

    kw = {"window": (k - 1, 1e-2)} if window else {}
    theta, q, info = es.chebyshev_eigvecs(matmul, s.shape[0], k + 1, dtype=s.dtype,
                                          device="cpu", seed=0, **kw)  # fmt: skip
    row = {"rounds": calls[0] - info["steps"] * es.CHEBYSHEV_DEGREE, "steps": info["steps"],
           "converged": info["converged"], "pairs": len(theta)}  # fmt: skip
    if window:
        from videoanchor.anchor.clustering import _soft_from_pairs, soft_cluster_shares

        row["covered"] = float(theta[-1]) < float(theta[k - 1]) - 1e-2
        if row["covered"]:
            ref = soft_cluster_shares(w.double(), k)
            row["soft_err"] = float((_soft_from_pairs(theta, q, dd, k) - ref).abs().max())
    return row


def seeds(aims: list[float]) -> None:
    """test_host_reads' set at seeds 0-5 (its SSC solved each time): the rounds and steps of
    the paper's call (k = 24, as ``spectral_embedding``) and the steady share's (k + 1, the
    window), under ``PLAN_AIM`` = each of ``aims``."""
    from benchmarks.common import video_tokens
    from videoanchor.anchor import clustering, solve_ssc_workset
    from videoanchor.anchor import eigensolvers as es

    ws = [clustering.ssc_affinity(solve_ssc_workset(video_tokens(8, 48, 97, k=6, seed=seed)
                                                    .double()).coef.float())
          for seed in range(6)]  # fmt: skip
    for aim in aims:
        es.PLAN_AIM = aim
        for name, k, window in (("paper", 24, None), ("steady", 25, (23, 1e-2))):
            got = []
            for w in ws:
                s, _ = es._normalized_affinity(w)
                calls = [0]

                def matmul(v, s=s, calls=calls):
                    calls[0] += 1
                    return s @ v

                _, _, info = es.chebyshev_eigvecs(matmul, s.shape[0], k, dtype=s.dtype,
                                                  device="cpu", seed=0, window=window)  # fmt: skip
                got.append((calls[0] - info["steps"] * es.CHEBYSHEV_DEGREE, info["steps"]))
            print(f"PLAN_AIM {aim} {name}: (rounds, steps) by seed {got}", flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--before", default="ac431ef")
    ap.add_argument("--aims", help="instead: the seeds' sweep under these PLAN_AIM, e.g. 1,0.3,0.1")
    args = ap.parse_args(argv)
    from videoanchor.anchor import eigensolvers as after

    if args.aims:
        return seeds([float(a) for a in args.aims.split(",")])
    before = _before(args.before)
    for name, (w, k) in sets().items():
        print(name, "k", k)
        print("  before       ", run(before, w, k, False))
        print("  after        ", run(after, w, k, False))
        print("  after, window", run(after, w, k, True), flush=True)


if __name__ == "__main__":
    main()
