"""Issue 100, one-off (2026-11-29): why the expectation of the paper's share over its draws
moves under a 1e-6 change of the features, and how far a cheaper or continuous estimate of it
can get. On scenes of :mod:`benchmarks.scene_family` (the default solver's ``C`` of each set
and of its two seeded changes, cached as ``bench_expected_share.py`` caches them), one
spectral embedding per ``C`` (seed 0), every start row ``0 .. N-1``:

- ``lapack_*``: the authors' discretisation (:class:`~videoanchor.anchor.labels.Paths`, the
  same LAPACK calls as scikit-learn's): how many start rows end at another partition under
  a change (``lapack_starts_changed``), how many of those kept their initial rotation's
  picks (``lapack_same_picks``), and how many of these had an empty cluster at the first
  iteration (``T`` exactly singular: its null vectors, hence the next rotation, are LAPACK's
  choice; ``lapack_singular_first``), the clusters used at the first iteration (quantiles),
  and the exact expectation's move (max over tokens of the scores, the base set's row sums).
- ``canon_*``: the same iteration with the rotation's null-space block made a continuous
  function of ``T`` (the empty clusters' columns a Gram-Schmidt basis of ``null(T)`` from a
  fixed Gaussian matrix, seed 12345; the rest ``V U^T`` of ``T``'s non-zero singular triplets,
  which is unique): paths changed, the mean's move, its distance to ``ref`` (the mean of the
  paper's share over the 64 seeded draws of ``bench_expected_share.py``) over the median single
  draw's, and the move of the mean over ``M`` draws of seed 0's stream for ``canon_moves_by_m``.
- ``paths_for_1e_3``: ``N * (canon_move / 1e-3)^2``, the paths an average of independent
  switches would need for a move of 1e-3 (the move of an ``M``-path mean falling as
  ``1 / sqrt(M)``: ``canon_moves_by_m`` shows how far it does).

    python benchmarks/experiments/share_null_space.py --cache /tmp/share-cache
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchmarks import scene_family as scenes  # noqa: E402
from benchmarks import share_family as fam  # noqa: E402
from benchmarks.bench_expected_share import REF_SEEDS, embedding, seeded_draws  # noqa: E402
from benchmarks.common import environment, finish, parser  # noqa: E402

#: the exact bench's six scenes and two noisier ones
SETS = (3, 4, 0, 29, 21, 5, 8, 9)
M_DRAWS = (32, 128, 384)
_EPS = float(np.finfo(np.float64).eps)


def canonical_rotation(t: np.ndarray, counts: np.ndarray, g: np.ndarray, n: int):
    """``(R, ncut)`` of one step: ``V U^T`` of ``t``'s SVD with the empty clusters' columns a
    Gram-Schmidt basis of ``null(t)`` from ``g``'s first columns (signs fixed: positive
    diagonal of the QR's ``R``), so that ``R`` is continuous in ``t`` at a fixed count."""
    u, s, vh = np.linalg.svd(t)
    empty = np.flatnonzero(counts == 0)
    rot = vh.T @ u.T
    if len(empty):
        r = t.shape[0] - len(empty)
        vr = vh[:r].T
        rot = vr @ u[:, :r].T
        q, qr = np.linalg.qr((np.eye(t.shape[0]) - vr @ vr.T) @ g[:, : len(empty)])
        rot[:, empty] = q * np.sign(np.diag(qr))
    return rot, 2.0 * (n - s.sum())


def canonical_path(v: np.ndarray, rot: np.ndarray, g: np.ndarray, n_iter_max: int = 20):
    """scikit-learn's iteration (its stop test and cap) from rotation ``rot`` with
    :func:`canonical_rotation`'s steps: the final raw labels."""
    n, k = v.shape
    last, it = 0.0, 0
    while True:
        it += 1
        labels = (v @ rot).argmax(1)
        t = np.zeros((k, k))
        np.add.at(t, labels, v)
        rot_next, ncut = canonical_rotation(t, np.bincount(labels, minlength=k), g, n)
        if abs(ncut - last) < _EPS or it > n_iter_max:
            return labels
        last, rot = ncut, rot_next


def measure(idx: int, cache) -> dict:
    from videoanchor.anchor.clustering import label_shares
    from videoanchor.anchor.labels import label_random_state, paths_of, relabel
    from videoanchor.anchor.scores import scores_from_row_sums as scores

    name, _, make = list(scenes.scenes())[idx]
    x, seed = make(), scenes.SCENES[idx][5]
    t0 = time.perf_counter()
    coefs = [fam.solve(x, cache)] + [fam.solve(xp, cache) for xp in scenes.changed(x, seed)]
    r = coefs[0].to(torch.float64).sum(dim=1)
    zero = torch.zeros(r.numel(), dtype=torch.long)
    embs = [embedding(c) for c in coefs]
    n, k = embs[0].shape
    ref = seeded_draws(embs[0], REF_SEEDS)
    ref_s = scores(r, ref).double()
    single = statistics.median(
        float((scores(r, ref[j]).double() - ref_s).abs().max()) for j in range(len(ref))
    )
    g = np.random.RandomState(12345).standard_normal((k, k))
    lapack, canon, picks, used, seconds = [], [], [], [], 0.0
    for e in embs:
        p = paths_of(e)
        rots = [p.rotation(s) for s in range(n)]
        picks.append(np.stack([rp[1] for rp in rots]))
        used.append(np.array([len(np.unique(p._pass(rp[0], p._no_skip)[0])) for rp in rots]))
        lapack.append(np.stack([relabel(p.iterate(rp[0])[0]) for rp in rots]))
        s = time.perf_counter()
        canon.append(np.stack([relabel(canonical_path(p.v, rp[0][0].copy(), g)) for rp in rots]))
        seconds += time.perf_counter() - s

    def mean_scores(ends, rows=slice(None)):
        return scores(r, zero, label_shares(torch.from_numpy(ends[rows]))).double()

    def moves(runs, rows=slice(None)):
        base = mean_scores(runs[0], rows)
        return [float((mean_scores(o, rows) - base).abs().max()) for o in runs[1:]]

    changed = [~(o == lapack[0]).all(1) for o in lapack[1:]]
    same = [(pk == picks[0]).all(1) for pk in picks[1:]]
    singular = used[0] < k
    stream = label_random_state(0, n)
    draws = np.array([stream.randint(n) for _ in range(max(M_DRAWS))])
    canon_move = max(moves(canon))
    return dict(
        set=name, n=n, d=int(x.shape[1]), k=k, single_median=single,
        lapack_starts_changed=[int(c.sum()) for c in changed],
        lapack_same_picks=[int((c & s).sum()) for c, s in zip(changed, same, strict=True)],
        lapack_singular_first=[int((c & s & singular).sum())
                               for c, s in zip(changed, same, strict=True)],
        lapack_used_first_quantiles=np.quantile(used[0], [0, 0.5, 1]).tolist(),
        lapack_exact_move=max(moves(lapack)),
        canon_paths_changed=[int((~(o == canon[0]).all(1)).sum()) for o in canon[1:]],
        canon_move=canon_move,
        canon_vs_ref_over_single=float((mean_scores(canon[0]) - ref_s).abs().max()) / single,
        canon_moves_by_m={str(m): max(moves(canon, draws[:m])) for m in M_DRAWS},
        paths_for_1e_3=n * (canon_move / 1e-3) ** 2,
        canon_seconds_per_path=seconds / (3 * n),
        seconds=time.perf_counter() - t0,
    )  # fmt: skip


def main(argv=None):
    ap = parser(__doc__)
    ap.add_argument("--cache", default=os.environ.get("VIDEOANCHOR_SHARE_CACHE"))
    ap.add_argument("--only", help="comma-separated scene indices (default: SETS)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    meta = environment("cpu")
    meta.update(torch_threads=1, change=scenes.CHANGE, changes=scenes.CHANGES,
                reference_seeds=list(REF_SEEDS), m_draws=list(M_DRAWS),
                loadavg_start=os.getloadavg())  # fmt: skip
    rows = []
    for idx in [int(i) for i in args.only.split(",")] if args.only else SETS:
        row = measure(idx, args.cache)
        rows.append(row)
        print({k: (round(v, 5) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
    meta["loadavg_end"] = os.getloadavg()
    meta["summary"] = dict(
        sets=len(rows),
        lapack_switches=sum(sum(r["lapack_starts_changed"]) for r in rows),
        lapack_switches_same_picks_singular_first=sum(sum(r["lapack_singular_first"])
                                                      for r in rows),
        lapack_exact_move_max=max(r["lapack_exact_move"] for r in rows),
        canon_switches=sum(sum(r["canon_paths_changed"]) for r in rows),
        canon_move_max=max(r["canon_move"] for r in rows),
        canon_moves_within_1e_3=sum(r["canon_move"] <= 1e-3 for r in rows),
        paths_for_1e_3_max=max(r["paths_for_1e_3"] for r in rows),
    )  # fmt: skip
    cols = ["set", "n", "lapack_exact_move", "canon_move", "canon_vs_ref_over_single",
            "paths_for_1e_3"]  # fmt: skip
    return finish("share_null_space", meta, rows, args.out_dir, cols)


if __name__ == "__main__":
    main()
