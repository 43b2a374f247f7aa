"""Where the default does not certify (one-off, not filed as an issue): issue 100's 44
realistic scenes (:mod:`benchmarks.scene_family`), ``compute_anchor_scores`` with default
options (k = 24) and, where its answer is not certified, with ``mode="blocked",
solver="workset"`` (the working sets by blocks: the program's certified minimiser, without
the dense working sets' bounds on a column's set and work), in the same process, one after
the other: seconds, solver, the float64 gap (``residual``) and the returned C's (``gap``),
and how far the default's scores and C are from the certified minimiser's.

    python benchmarks/experiments/scene_certificates.py
"""

from __future__ import annotations

import os
import sys
import time
import warnings
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from benchmarks.common import environment, finish, parser  # noqa: E402
from benchmarks.scene_family import scenes  # noqa: E402

COLUMNS = ["set", "n", "d", "default_solver", "default_seconds", "default_gap",
           "blocks_seconds", "blocks_residual", "scores_max_diff", "top10_overlap",
           "coef_rel_diff", "nnz_per_column"]  # fmt: skip


def _dense(coef: torch.Tensor) -> torch.Tensor:
    return (coef.to_dense() if coef.is_sparse else coef).double()


def _call(x, **kw):
    from videoanchor.anchor import compute_anchor_scores

    t = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (the default's "not certified" warning: recorded)
        res = compute_anchor_scores(x, n_clusters=24, **kw)
    return res, time.perf_counter() - t


def main() -> None:
    ap = parser(__doc__)
    ap.parse_args()
    _call(next(scenes())[2]())  # the kernels loaded
    rows = []
    for name, _, make in scenes():
        x = make()
        res, seconds = _call(x)
        row = dict(set=name, n=x.shape[0], d=x.shape[1], default_solver=res.solver,
                   default_strategy=res.strategy, default_seconds=seconds,
                   default_residual=float(res.residual), default_gap=float(res.gap),
                   loadavg=os.getloadavg())  # fmt: skip
        if res.solver != "workset":  # not certified: the certified minimiser beside it
            ref, seconds = _call(x, mode="blocked", solver="workset")
            n = x.shape[0]
            top = n // 10
            a, b = _dense(res.coef), _dense(ref.coef)
            row.update(blocks_solver=ref.solver, blocks_seconds=seconds,
                       blocks_residual=float(ref.residual), blocks_gap=float(ref.gap),
                       scores_max_diff=float((res.scores - ref.scores).abs().max()),
                       top10_overlap=len(set(res.scores.topk(top).indices.tolist()) &
                                         set(ref.scores.topk(top).indices.tolist())) / top,
                       coef_rel_diff=float((a - b).norm() / b.norm()),
                       nnz_per_column=float((b != 0).sum() / n))  # fmt: skip
        rows.append(row)
        print({k: row.get(k) for k in COLUMNS}, flush=True)
    finish("scene_certificates", environment("cpu"), rows, None, COLUMNS)


if __name__ == "__main__":
    main()
