"""What the default anchor scores cost on this machine and how near they come to the authors'
answer, at two sizes: the user's view of ``bench_request_cost.py``'s fidelity study.

At each size (synthetic video tokens, ``bench_ssc.synthetic_tokens``, 24 clusters):
``compute_anchor_scores`` with its defaults (the fast solver), against the baseline in the
same process, the authors' iteration to their threshold (``solver="faithful"``, eps 2e-4:
the authors' answer), and issue 33's bar, the same iteration stopped at eps 2e-3. Fidelity
is the Spearman correlation of the scores and the ARI of the labels against the authors'
answer; ``meets_bar`` when the default agrees with it at least as well as the bar does.
Seconds are the least of up to 5 runs (``bench_request_cost.ssc_seconds``).

    python benchmarks/bench_scores.py [--quick]   # N = 256 and 384 (D = 256) quick, else N = D = 512 and 1024
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import (  # noqa: E402
    ari,
    environment,
    finish,
    parser,
    spearman,
    ssc_seconds,
    synthetic_tokens,
)

SIZES = {True: ((256, 256), (384, 256)), False: ((512, 512), (1024, 1024))}
CLUSTERS = 24


def row(n: int, d: int, device: torch.device) -> dict:
    x = synthetic_tokens(n, d, seed=2).to(device)
    t_default, default = ssc_seconds(x, CLUSTERS, "auto", precision="auto")
    t_ref, ref = ssc_seconds(x, CLUSTERS, "faithful")
    _, bar = ssc_seconds(x, CLUSTERS, "faithful", eps=2e-3)
    sp, sp_bar = spearman(default.scores, ref.scores), spearman(bar.scores, ref.scores)
    ari_, ari_bar = ari(default.labels, ref.labels), ari(bar.labels, ref.labels)
    return {
        "n": n, "d": d, "n_clusters": CLUSTERS, "solver": default.solver,
        "seconds_default": t_default, "seconds_faithful": t_ref,
        "speedup_vs_faithful": t_ref / t_default, "iterations_default": default.iterations,
        "iterations_faithful": ref.iterations, "spearman_default": sp,
        "spearman_faithful_eps2e-3": sp_bar, "ari_default": ari_, "ari_faithful_eps2e-3": ari_bar,
        "meets_bar": sp >= sp_bar and ari_ >= ari_bar,
    }  # fmt: skip


def main(argv=None) -> Path:
    ap = parser(
        __doc__.splitlines()[0], quick="N = 256 and 384, D = 256 (else N = D = 512 and 1024)"
    )
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    meta = environment(str(device))
    meta["torch_threads"] = torch.get_num_threads()
    rows = [row(n, d, device) for n, d in SIZES[args.quick]]
    return finish("scores", meta, rows, args.out_dir,
                  ["n", "d", "solver", "seconds_default", "seconds_faithful",
                   "speedup_vs_faithful", "spearman_default", "spearman_faithful_eps2e-3",
                   "ari_default", "ari_faithful_eps2e-3", "meets_bar"])  # fmt: skip


if __name__ == "__main__":
    main()
