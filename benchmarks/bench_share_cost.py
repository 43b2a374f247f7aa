"""Issue 91 item 5: what the default cluster share (``"steady"``) costs after the solve,
against the paper's, on the CPU at 16 frames; and the operators and host reads of each.

Sets (16 frames): the video-like set of Qwen2.5-VL-7B's 16-frame count (16 x 128 tokens,
N = 2048, D = 1024), a 16 x 48 one (N = 768), and the tiny Qwen2.5-VL's 16 x 5 x 6 tokens
(N = 480; flip-prone: there the weight is below 1 and the soft share is computed). Per set
the default solver's ``C`` (once), then the stages after the solve,
``anchor_result_from_coefficients(C, 24, features=x, cluster_share=...)`` (the spectral step,
the shares and the scores), for ``"paper"`` and ``"steady"`` alternated in one process
(``--reps`` rounds, the order swapped each round), medians and their ratio.

Counts: one call of each under a counting ``TorchDispatchMode``: the aten operators it runs
(``ops``; the top ones by count) and its host reads (``aten._local_scalar_dense``: every
``float()``/``int()``/``bool()``/``.item()`` of a tensor, which on a GPU is a synchronising
read; the CPU run counts what the GPU path would read, since the code is the same, except
that LAPACK's partial eigensolver runs on the CPU where the GPU runs ``eigh``, and that the
discretisation is on the host on both, its input copied once).

    python benchmarks/bench_share_cost.py                # writes share_cost_cpu.json
    python benchmarks/bench_share_cost.py --quick        # the N = 768 set, 2 rounds
"""

from __future__ import annotations

import collections
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import share_family as fam  # noqa: E402
from benchmarks.common import environment, finish, parser, skip  # noqa: E402

SETS = {
    "video 16x128 D1024 (N = 2048)": lambda: fam.video(16, 128, 1024, 0),
    "video 16x48 D1024 (N = 768)": lambda: fam.video(16, 48, 1024, 0),
    "tiny Qwen2.5-VL 16x5x6 pixels seed 1 (N = 480)": lambda: fam.tiny(1, 16, 5, 6),
}


class Counting(TorchDispatchMode):
    """Counts the aten operators dispatched inside it."""

    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket.__name__)] += 1
        return func(*args, **(kwargs or {}))


def after_solve(c, x, share):
    from videoanchor.anchor.scores import anchor_result_from_coefficients

    return anchor_result_from_coefficients(c, fam.K, features=x, cluster_share=share)


def measure(name: str, x: torch.Tensor, reps: int, cache) -> dict:
    from videoanchor.anchor.scores import ssc_coefficients

    coef = fam.solve(x, cache)
    c = ssc_coefficients(x[:8], progress=False)  # a shell of the right type, C replaced
    c.coef, c.timings = coef, {}
    times = {"paper": [], "steady": []}
    res = {}
    for rep in range(reps):
        for share in ("paper", "steady") if rep % 2 == 0 else ("steady", "paper"):
            t = time.perf_counter()
            res[share] = after_solve(c, x, share)
            times[share].append(time.perf_counter() - t)
    row = dict(set=name, n=int(x.shape[0]), d=int(x.shape[1]), k=fam.K, reps=reps,
               weight=res["steady"].share_weight, stability=res["steady"].share_stability,
               default_vs_paper=float((res["steady"].scores - res["paper"].scores).abs().max()))  # fmt: skip
    for share, ts in times.items():
        row[f"seconds_{share}"] = statistics.median(ts)
        row[f"samples_{share}"] = ts
    row["steady_over_paper"] = row["seconds_steady"] / row["seconds_paper"]
    for share in ("paper", "steady"):
        with Counting() as counting:
            after_solve(c, x, share)
        row[f"ops_{share}"] = sum(counting.ops.values())
        row[f"host_reads_{share}"] = counting.ops.get("_local_scalar_dense", 0)
        row[f"top_ops_{share}"] = dict(counting.ops.most_common(12))
    return row


def main(argv=None):
    ap = parser(__doc__, quick="the N = 768 set, 2 rounds")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--cache", default=os.environ.get("VIDEOANCHOR_SHARE_CACHE"))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    meta = environment("cpu")
    meta.update(torch_threads=1, loadavg_start=os.getloadavg(), n_clusters=fam.K,
                what="anchor_result_from_coefficients (spectral step, shares, scores) on the "
                     "default solver's C, cluster_share 'paper' and 'steady' alternated")  # fmt: skip
    names = list(SETS)
    if args.quick:
        names, args.reps = [names[1]], 2
        skip("bench_share_cost", "--quick: the N = 768 set, 2 rounds")
    rows = []
    for name in names:
        rows.append(measure(name, SETS[name](), args.reps, args.cache))
        print({k: rows[-1][k] for k in ("set", "weight", "seconds_paper", "seconds_steady",
                                        "steady_over_paper", "host_reads_paper",
                                        "host_reads_steady")}, flush=True)  # fmt: skip
    meta["loadavg_end"] = os.getloadavg()
    cols = ["set", "n", "weight", "seconds_paper", "seconds_steady", "steady_over_paper",
            "ops_paper", "ops_steady", "host_reads_paper", "host_reads_steady"]  # fmt: skip
    return finish("share_cost" + ("_quick" if args.quick else ""), meta, rows, args.out_dir, cols)


if __name__ == "__main__":
    main()
