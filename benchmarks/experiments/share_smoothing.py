"""Issue 100, one-off (2026-11-29): two more ways to make the expected share continuous, the
soft share's kernel, and what a draw's switch is. On scenes of :mod:`benchmarks.scene_family` (the default solver's
``C`` of each set and of its two seeded 1e-6 changes, cached as ``bench_expected_share.py``
caches them), one spectral embedding per ``C`` (seed 0), the 32 draws of seed 0's stream
(their empty clusters completed as ``cluster_share="expected"`` completes them). Moves are
the largest score change over the two changes (max over tokens, the base set's row sums:
the share's part); ``*_close`` is the distance to ``ref`` (the mean of the paper's share over
the 64 seeded draws of ``bench_expected_share.py``) over the median single draw's.

- ``distinct``: how many distinct partitions the 32 draws end at (at the set);
- ``switched``: per change, how many of the 32 draws end at another partition, and how many of
  those kept their initial picks (the switch is then a token's flip at an iteration; else a
  pick's near-tie): :class:`~videoanchor.anchor.labels.Paths`, the package's own iteration.
- ``width_*``: the expected share with its softening width (``EXPECTED_WIDTH`` = 3e-3)
  widened to each of :data:`WIDTHS`: a wider softening smooths a switch's jump where the
  clusters it moves are near each other.
- ``branch_*``: first-order branch smoothing at each ``tau`` of :data:`TAUS`: every decision
  of a draw's path whose margin ``m`` is below ``tau`` (a token's label at an iteration,
  exact ties of zero rows left out, or a pick), run again with its runner-up and the path
  continued to its end; the draw's share becomes ``O + sum 0.5 (1 - m / tau) (O_b - O)``, which
  is continuous where one decision crosses at a time. A NumPy iteration (the same steps as
  ``Paths``, not its bits); ``branch_hard_move``: its plain mean's move for comparison;
  ``branch_count``: the branches a draw ran (median, largest).
- ``kernel_{p}_*``: the default's soft share (``cluster_share="soft"``, what ``"steady"`` gives
  on these scenes: ``(1/N) sum_i cos^2`` of the filtered embedding's unit rows) with
  ``|cos|^p`` in place of ``cos^2`` for each ``p`` of :data:`KERNEL_POWERS`: its distance to
  ``ref`` over the single draw's median and its move (each change's own row sums).
- ``rounding`` rows: the expected share's move (scores, each change's own row sums) under
  changes of the features by :data:`ROUNDING` (``x * (1 + r g)``, seeded), about what vLLM's
  encoder rounds differently from transformers' (``tests/test_vllm.py``), on the tiny
  Qwen2.5-VL sets of :mod:`benchmarks.share_family` (its flip-prone video is one of them in
  kind: 560 tokens of the tiny checkpoint).

    python benchmarks/experiments/share_smoothing.py --cache /tmp/share-cache
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
from benchmarks.experiments.share_null_space import canonical_rotation  # noqa: E402

#: scenes whose expected share moved most in expected_share_cpu.json (three noise levels),
#: and a clean one whose draws nearly agree (4: the single draw's median distance 0.007)
SETS = (1, 6, 8, 9, 24, 28, 4)
#: the branch smoothing's scenes (it costs 5-30 s a set and tau here)
BRANCH_SETS = (1, 6, 8)
WIDTHS = (0.003, 0.01, 0.03, 0.1, 0.3)
#: the soft share's kernel powers (2: today's soft share)
KERNEL_POWERS = (1, 2, 4, 8)
#: the rounding rows' changes: two of 1e-7, one of 1e-8
ROUNDING = (1e-7, 1e-7, 1e-8)
TAUS = (3e-4, 1e-3, 3e-3)
DRAWS = 32
_TIE = 1e-12  # a margin at or below: an exact tie (zero rows), which no rounding moves


def _rotation(v, lab, k, g):
    """One step's ``(R, ncut)`` from labels ``lab``: :func:`benchmarks.experiments.
    share_null_space.canonical_rotation` (the expected share's completion of empty
    clusters) of their ``T``."""
    t = np.zeros((k, k))
    np.add.at(t, lab, v)
    return canonical_rotation(t, np.bincount(lab, minlength=k), g, len(v))


def _decide(v, rot):
    """Each row's label, margin to its runner-up, and runner-up."""
    s = v @ rot
    order = np.argsort(-s, axis=1, kind="stable")
    at = np.arange(len(v))
    return order[:, 0], s[at, order[:, 0]] - s[at, order[:, 1]], order[:, 1]


def _iterate(v, lab, k, g, t0, rec=None):
    last, prev, it = 0.0, None, t0 + 1
    while True:
        if (prev is not None and np.array_equal(lab, prev)) or it > 20:
            return lab
        rot, ncut = _rotation(v, lab, k, g)
        if abs(ncut - last) < np.finfo(np.float64).eps:
            return lab
        nxt, m, run = _decide(v, rot)
        if rec is not None:
            rec.append((it, nxt, m, run))
        last, prev, lab, it = ncut, lab, nxt, it + 1


def _picks(v, start, k, forced=None):
    """Greedy picks from ``start`` (``forced = (j, row)`` replaces pick ``j``) and each pick's
    ``(j, margin, runner-up)``."""
    c, picks, alts = np.zeros(len(v)), [start], []
    for j in range(1, k):
        c += np.abs(v @ v[picks[-1]])
        cc = c.copy()
        cc[picks] = np.inf
        order = np.argsort(cc, kind="stable")
        p = order[0] if forced is None or forced[0] != j else forced[1]
        alts.append((j, (cc[order[1]] - cc[order[0]]) / j, order[1] if p == order[0] else order[0]))
        picks.append(p)
    return np.array(picks), alts


def _run(v, start, k, g, forced=None, rec=None):
    picks, alts = _picks(v, start, k, forced)
    lab, m, run = _decide(v, v[picks].T)
    if rec is not None:
        rec.append((0, lab, m, run))
    return _iterate(v, lab, k, g, 0, rec), alts


def branch_smoothed(emb, tau, seed=0):
    """``(smoothed mean share, plain mean share, branches a draw)`` of seed 0's 32 draws."""
    from videoanchor.anchor.labels import discretize_rows, label_random_state, soft_draw_shares

    rows = discretize_rows(emb)
    v, (n, k) = rows.numpy(), rows.shape
    rng = label_random_state(seed, n)
    starts = [int(rng.randint(n)) for _ in range(DRAWS)]
    gauss = np.random.default_rng(seed).standard_normal((DRAWS, k, k))
    smooth, plain, count = [], [], []
    for start, g in zip(starts, gauss, strict=True):
        rec = []
        main, alts = _run(v, start, k, g, rec=rec)
        outs, weights = [main], []
        for j, a, q in alts:
            if a < tau:
                outs.append(_run(v, start, k, g, forced=(j, q))[0])
                weights.append(0.5 * (1 - a / tau))
        for it, lab, m, run in rec:
            for i in np.flatnonzero((m < tau) & (m > _TIE)):
                flipped = lab.copy()
                flipped[i] = run[i]
                outs.append(_iterate(v, flipped, k, g, it))
                weights.append(0.5 * (1 - m[i] / tau))
        sh = soft_draw_shares(rows, torch.from_numpy(np.stack(outs)))
        w = torch.tensor(weights, dtype=sh.dtype)
        smooth.append(sh[0] + (w[:, None] * (sh[1:] - sh[0])).sum(0))
        plain.append(sh[0])
        count.append(len(weights))
    return torch.stack(smooth).mean(0), torch.stack(plain).mean(0), count


def soft_powers(coef: torch.Tensor) -> dict:
    """The soft share of ``C`` with ``|cos|^p`` for each of :data:`KERNEL_POWERS` (the
    eigenpairs and filter of ``steady_shares``' soft share)."""
    from videoanchor.anchor.clustering import (
        EXTRA_PAIRS,
        SOFT_SHARE_WIDTH,
        spectral_pairs,
        ssc_affinity,
    )

    k = fam.K
    theta, vec, dd, _ = spectral_pairs(ssc_affinity(coef), k, extra=EXTRA_PAIRS, seed=0,
                                       window=SOFT_SHARE_WIDTH)  # fmt: skip
    f = ((theta - float(theta[k - 1]) + SOFT_SHARE_WIDTH) / SOFT_SHARE_WIDTH).clamp(0, 1)
    keep = int((f > 0).sum())
    u = vec[:, :keep].to(torch.float64) * f[:keep].sqrt() / dd.to(torch.float64)[:, None]
    u = u / u.norm(dim=1, keepdim=True).clamp_min(torch.finfo(u.dtype).tiny)
    cos = (u @ u.T).abs()
    return {p: (cos**p).sum(dim=1) / len(u) for p in KERNEL_POWERS}


def switched(embs, seed=0):
    """Per change: (draws that end at another partition, of those how many kept their picks)."""
    from videoanchor.anchor.labels import label_random_state, paths_of, relabel

    paths = [paths_of(e) for e in embs]
    n, k = paths[0].n, paths[0].k
    rng = label_random_state(seed, n)
    starts = [int(rng.randint(n)) for _ in range(DRAWS)]
    gauss = np.random.default_rng(seed).standard_normal((DRAWS, k, k))

    def run(p, start, g):
        p.completion = g
        rot, picks, _ = p.rotation(start)
        return picks, relabel(p.iterate(rot)[0])

    base = [run(paths[0], s, g) for s, g in zip(starts, gauss, strict=True)]
    out = []
    for p in paths[1:]:
        moved = [run(p, s, g) for s, g in zip(starts, gauss, strict=True)]
        sw = [i for i in range(DRAWS) if not np.array_equal(base[i][1], moved[i][1])]
        out.append([len(sw), sum(np.array_equal(base[i][0], moved[i][0]) for i in sw)])
    return out


def measure(idx: int, cache) -> dict:
    from videoanchor.anchor.labels import expected_draws, soft_draw_shares
    from videoanchor.anchor.scores import scores_from_row_sums as scores

    t0 = time.perf_counter()
    (name, _, make), seed = list(scenes.scenes())[idx], scenes.SCENES[idx][5]
    x = make()
    coefs = [fam.solve(x, cache)] + [fam.solve(xp, cache) for xp in scenes.changed(x, seed)]
    r = coefs[0].to(torch.float64).sum(dim=1)
    embs = [embedding(c) for c in coefs]
    ref = seeded_draws(embs[0], REF_SEEDS)
    ref_scores = scores(r, ref).double()
    single = statistics.median(
        float((scores(r, ref[j]).double() - ref_scores).abs().max()) for j in range(len(ref))
    )
    one = torch.zeros(len(r), dtype=torch.long)

    def score(sh):
        return scores(r, one, sh).double()

    def move_close(per):  # [base, change 1, change 2] of shares
        s = [score(p) for p in per]
        move = max(float((o - s[0]).abs().max()) for o in s[1:])
        return move, float((s[0] - ref_scores).abs().max()) / max(single, 1e-12)

    row = dict(set=name, kind="scene", scene=idx, n=int(x.shape[0]), d=int(x.shape[1]), single_median=single,
               switched=switched(embs))  # fmt: skip
    soft = [soft_powers(c) for c in coefs]
    for p in KERNEL_POWERS:
        s = [scores(c.to(torch.float64).sum(dim=1), one, sp[p]).double()
             for c, sp in zip(coefs, soft, strict=True)]  # fmt: skip
        row[f"kernel_{p}_move"] = max(float((o - s[0]).abs().max()) for o in s[1:])
        row[f"kernel_{p}_close"] = float((s[0] - ref_scores).abs().max()) / max(single, 1e-12)
    draws = [expected_draws(e, 0, DRAWS, 1) for e in embs]
    row["distinct"] = len(draws[0][1])
    for w in WIDTHS:
        per = [(torch.from_numpy(c).double() @ soft_draw_shares(rows, torch.from_numpy(u), w))
               / DRAWS for rows, u, c, _ in draws]  # fmt: skip
        row[f"width_{w}_move"], row[f"width_{w}_close"] = move_close(per)
    if idx in BRANCH_SETS:
        for tau in TAUS:
            got = [branch_smoothed(e, tau) for e in embs]
            row[f"branch_{tau}_move"], row[f"branch_{tau}_close"] = move_close([g[0] for g in got])
            row[f"branch_{tau}_count"] = [statistics.median(got[0][2]), max(got[0][2])]
            row["branch_hard_move"] = move_close([g[1] for g in got])[0]
    row["seconds"] = time.perf_counter() - t0
    return row


def rounding(name: str, make, cache) -> dict:
    """The expected share's moves under :data:`ROUNDING`'s changes of one set's features."""
    from videoanchor.anchor.clustering import expected_shares_from_embedding
    from videoanchor.anchor.scores import scores_from_row_sums as scores

    x = make()

    def expected(c):
        labels, shares = expected_shares_from_embedding(embedding(c))
        return scores(c.to(torch.float64).sum(dim=1), labels, shares).double()

    base = expected(fam.solve(x, cache))
    gen = torch.Generator().manual_seed(0)
    moves = []
    for rel in ROUNDING:
        xp = x * (1 + rel * torch.randn(x.shape, generator=gen, dtype=x.dtype))
        moves.append(float((expected(fam.solve(xp, cache)) - base).abs().max()))
    return dict(set=name, kind="rounding", n=int(x.shape[0]), d=int(x.shape[1]),
                rounding=list(ROUNDING), rounding_moves=moves)  # fmt: skip


def main(argv=None):
    ap = parser(__doc__)
    ap.add_argument("--cache", default=os.environ.get("VIDEOANCHOR_SHARE_CACHE"))
    ap.add_argument("--only", help="comma-separated scene indices (default: SETS)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    meta = environment("cpu")
    meta.update(torch_threads=1, change=scenes.CHANGE, changes=scenes.CHANGES, draws=DRAWS,
                reference_seeds=list(REF_SEEDS), widths=list(WIDTHS), taus=list(TAUS),
                loadavg_start=os.getloadavg())  # fmt: skip
    rows = []
    for idx in [int(i) for i in args.only.split(",")] if args.only else SETS:
        row = measure(idx, args.cache)
        rows.append(row)
        print({k: (round(v, 5) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
    tiny = []
    for name, kind, make in [] if args.only else fam.plain_sets(large=False):
        if kind == "tiny":
            tiny.append(rounding(name, make, args.cache))
            print(tiny[-1], flush=True)
    meta["loadavg_end"] = os.getloadavg()
    branch = [r for r in rows if "branch_hard_move" in r]
    meta["summary"] = dict(
        sets=len(rows),
        distinct_min=min(r["distinct"] for r in rows),
        draws_switched=sum(n for r in rows for n, _ in r["switched"]),
        switched_same_picks=sum(s for r in rows for _, s in r["switched"]),
        width_moves_within_1e_3={str(w): sum(r[f"width_{w}_move"] <= 1e-3 for r in rows)
                                 for w in WIDTHS},
        width_move_max={str(w): max(r[f"width_{w}_move"] for r in rows) for w in WIDTHS},
        branch_move_max={str(t): max((r[f"branch_{t}_move"] for r in branch), default=None)
                         for t in TAUS},
        branch_hard_move_max=max((r["branch_hard_move"] for r in branch), default=None),
        kernel_within_single_median={str(p): sum(r[f"kernel_{p}_close"] <= 1 for r in rows)
                                     for p in KERNEL_POWERS},
        kernel_close_median={str(p): statistics.median(r[f"kernel_{p}_close"] for r in rows)
                             for p in KERNEL_POWERS},
        kernel_move_max={str(p): max(r[f"kernel_{p}_move"] for r in rows) for p in KERNEL_POWERS},
        rounding_sets=len(tiny),
        rounding_1e_7_moves_within_1e_3=sum(max(r["rounding_moves"][:2]) <= 1e-3 for r in tiny),
        rounding_1e_7_move_max=max((max(r["rounding_moves"][:2]) for r in tiny), default=None),
    )  # fmt: skip
    cols = ["set", "n", "single_median", "width_0.003_move", "width_0.1_move", "width_0.3_move",
            "width_0.3_close", "branch_hard_move", "branch_0.0003_move", "branch_0.003_move"]  # fmt: skip
    return finish("share_smoothing", meta, rows + tiny, args.out_dir, cols)


if __name__ == "__main__":
    main()
