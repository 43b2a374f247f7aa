"""Issue 100: the expected share (``cluster_share="expected"``, an option) and the default
(``"steady"``) against the mean of the paper's share over 64 seeded draws, their moves under
1e-6 changes of the features, and what the expected share costs after the solve against the
paper's share.

Sets: :mod:`benchmarks.scene_family` (44 video-like scenes of moving objects, N = 768-2048,
D = 1024-3584), and with ``--family`` the plain sets of :mod:`benchmarks.share_family`. Per
set, the default solver's ``C`` (``ssc_coefficients``, cached by the features' hash under
``--cache``) of the features and of two seeded changes ``x * (1 + 1e-6 g)``, one spectral
embedding per ``C`` (seed 0), and:

- ``ref``: the mean of the paper's share over 64 draws of the seeded streams 100-163
  (``label_random_state(s)``'s first start row: the paper's draw under ``seed=s``, from the
  one embedding), its scores;
- ``single_median`` / ``single_max``: the median and largest distance (max over tokens) of a
  single seeded draw's scores (each of the 64) to ``ref``'s;
- ``expected_vs_ref``: the expected share's distance to ``ref`` (``EXPECTED_DRAWS`` draws of
  seed 0's stream, softened, their empty clusters completed continuously); ``hard_mean_vs_ref``: the
  same draws' hard shares averaged (no softening); ``paper_vs_ref``: the paper's seed-0 draw;
  ``lapack_vs_ref`` and ``lapack_move``: the option as it was before the completion (LAPACK's
  null vectors, ``completion=False``), in the same process;
- ``expected_move``: the expected share's largest score move over the changes (the solver's
  ``C`` re-solved: its row sums move too); ``expected_share_move``: with the base set's row
  sums, the share's part alone; ``paper_move``: the paper's seed-0 scores' move;
- ``steady_vs_ref``, ``steady_move``, ``steady_weight``: the default (``steady_shares``, seed
  0) from the same ``C``: its distance to ``ref``, its largest score move over the changes and
  its paper share's weight at the set (the smallest over the changes: ``steady_weight_min``).

``--exact``: also the exact expectation of the paper's share over its random draw (the
embedding fixed, every one of the ``N`` start rows ``randint(N)`` can draw, one path each: 15-45
s a set here), its move under the changes (``exact_move``, ``starts_changed``: how many of the
``N`` start rows end at another partition) and the expected share's and ``ref``'s distance to it.

``meta.summary``: on how many sets each of the two is within the median single draw, and
within 1e-3 under the changes, and the largest moves. ``--cost``: the stages after the solve
(``anchor_result_from_coefficients``), ``"paper"`` and ``"expected"`` alternated, medians
over ``--reps`` at 16 frames (the sets of ``bench_share_cost.py``); one torch thread.

    python benchmarks/bench_expected_share.py --cache /tmp/share-cache   # expected_share_cpu.json
    python benchmarks/bench_expected_share.py --cost                     # expected_cost_cpu.json
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import scene_family as scenes  # noqa: E402
from benchmarks import share_family as fam  # noqa: E402
from benchmarks.common import environment, finish, parser, skip  # noqa: E402

K = fam.K
REF_SEEDS = range(100, 164)


def embedding(coef: torch.Tensor) -> torch.Tensor:
    from videoanchor.anchor.clustering import spectral_embedding, ssc_affinity

    return spectral_embedding(ssc_affinity(coef), K, seed=0)


def seeded_draws(emb: torch.Tensor, seeds) -> torch.Tensor:
    """The paper's labels under each of ``seeds`` from one embedding (``(len, N)``)."""
    from videoanchor.anchor.labels import label_random_state, paths_of, relabel

    paths, n = paths_of(emb), emb.shape[0]
    out = np.empty((len(seeds), n), np.int64)
    for i, s in enumerate(seeds):
        out[i] = relabel(paths.draw(int(label_random_state(s, n).randint(n))))
    return torch.from_numpy(out)


def exact(emb: torch.Tensor) -> torch.Tensor:
    """The paper's labels from every start row (``(N, N)``): their shares' mean is the exact
    expectation of the paper's share over its draw, the embedding fixed."""
    return seeded_draws_from_starts(emb, range(emb.shape[0]))


def seeded_draws_from_starts(emb: torch.Tensor, starts) -> torch.Tensor:
    from videoanchor.anchor.labels import paths_of, relabel

    paths = paths_of(emb)
    return torch.from_numpy(np.stack([relabel(paths.draw(int(s))) for s in starts]))


def steady_scores(coef: torch.Tensor) -> tuple[torch.Tensor, float]:
    """The default's scores of ``C`` (``cluster_share="steady"``, seed 0) and its paper share's
    weight."""
    from videoanchor.anchor.clustering import ssc_affinity, steady_shares
    from videoanchor.anchor.scores import scores_from_row_sums as scores

    labels, shares, record = steady_shares(ssc_affinity(coef), K, seed=0)
    r = coef.to(torch.float64).sum(dim=1)
    return scores(r, labels, shares).double(), float(record["share_weight"])


def measure(name: str, kind: str, x: torch.Tensor, seed: int, cache, with_exact=False) -> dict:
    from videoanchor.anchor.clustering import expected_shares_from_embedding, label_shares
    from videoanchor.anchor.scores import scores_from_row_sums as scores

    t0 = time.perf_counter()
    coefs = [fam.solve(x, cache)] + [fam.solve(xp, cache) for xp in scenes.changed(x, seed)]
    r = coefs[0].to(torch.float64).sum(dim=1)
    emb = embedding(coefs[0])
    ref = seeded_draws(emb, REF_SEEDS)
    ref_scores = scores(r, ref).double()
    single = [float((scores(r, ref[j]).double() - ref_scores).abs().max()) for j in range(len(ref))]
    labels, shares = expected_shares_from_embedding(emb)
    expected = scores(r, labels, shares).double()
    steady, weight = steady_scores(coefs[0])
    lapack = scores(r, labels, expected_shares_from_embedding(emb, completion=False)[1]).double()
    hard = scores(r, labels, label_shares(labels)).double()
    paper = scores(r, seeded_draws(emb, [0])[0]).double()
    moves, share_moves, paper_moves, lapack_moves, steady_moves, weights = [], [], [], [], [], []
    for c in coefs[1:]:
        st, wc = steady_scores(c)
        steady_moves.append(float((st - steady).abs().max()))
        weights.append(wc)
        rc, e = c.to(torch.float64).sum(dim=1), embedding(c)
        lab, sh = expected_shares_from_embedding(e)
        moves.append(float((scores(rc, lab, sh).double() - expected).abs().max()))
        sh_l = expected_shares_from_embedding(e, completion=False)[1]
        lapack_moves.append(float((scores(rc, lab, sh_l).double() - lapack).abs().max()))
        share_moves.append(float((scores(r, lab, sh).double() - expected).abs().max()))
        paper_moves.append(
            float((scores(rc, seeded_draws(e, [0])[0]).double() - paper).abs().max())
        )
    more = {}
    if with_exact:
        every = exact(emb)
        ex = scores(r, every).double()
        ex_moves, starts_changed = [], []
        for c in coefs[1:]:
            other = exact(embedding(c))
            starts_changed.append(int((other != every).any(dim=1).sum()))
            ex_moves.append(float((scores(r, other).double() - ex).abs().max()))
        more = dict(exact_move=max(ex_moves), starts_changed=starts_changed,
                    expected_vs_exact=float((expected - ex).abs().max()),
                    ref_vs_exact=float((ref_scores - ex).abs().max()),
                    single_median_vs_exact=statistics.median(
                        float((scores(r, ref[j]).double() - ex).abs().max()) for j in range(len(ref))))  # fmt: skip
    return dict(set=name, kind=kind, n=int(x.shape[0]), d=int(x.shape[1]), k=K, **more,
                single_median=statistics.median(single), single_max=max(single),
                expected_vs_ref=float((expected - ref_scores).abs().max()),
                steady_vs_ref=float((steady - ref_scores).abs().max()),
                steady_move=max(steady_moves), steady_weight=weight,
                steady_weight_min=min([weight, *weights]),
                hard_mean_vs_ref=float((hard - ref_scores).abs().max()),
                paper_vs_ref=float((paper - ref_scores).abs().max()),
                lapack_vs_ref=float((lapack - ref_scores).abs().max()),
                lapack_move=max(lapack_moves),
                expected_move=max(moves), expected_share_move=max(share_moves),
                paper_move=max(paper_moves), seconds=time.perf_counter() - t0)  # fmt: skip


def summary(rows: list[dict]) -> dict:
    def worst(key):
        r = max(rows, key=lambda r: r[key])
        return {"value": r[key], "set": r["set"]}

    within = [r for r in rows if r["expected_vs_ref"] <= r["single_median"]]
    return dict(
        sets=len(rows),
        sets_by_kind={k: sum(r["kind"] == k for r in rows) for k in sorted({r["kind"] for r in rows})},
        expected_within_single_median=len(within),
        expected_outside=[{k: r[k] for k in ("set", "expected_vs_ref", "single_median")}
                          for r in rows if r not in within],
        ratio_expected_to_single_median_max=worst("ratio"),
        expected_move_max=worst("expected_move"),
        expected_share_move_max=worst("expected_share_move"),
        paper_move_max=worst("paper_move"),
        expected_moves_within_1e_3=sum(r["expected_move"] <= 1e-3 for r in rows),
        lapack_move_max=worst("lapack_move"),
        lapack_moves_within_1e_3=sum(r["lapack_move"] <= 1e-3 for r in rows),
        lapack_within_single_median=sum(r["lapack_vs_ref"] <= r["single_median"] for r in rows),
        expected_move_median=statistics.median(r["expected_move"] for r in rows),
        lapack_move_median=statistics.median(r["lapack_move"] for r in rows),
        share_moves_within_1e_3=sum(r["expected_share_move"] <= 1e-3 for r in rows),
        steady_within_single_median=sum(r["steady_vs_ref"] <= r["single_median"] for r in rows),
        steady_moves_within_1e_3=sum(r["steady_move"] <= 1e-3 for r in rows),
        steady_move_max=worst("steady_move"),
        steady_vs_ref_median=statistics.median(r["steady_vs_ref"] for r in rows),
        expected_vs_ref_median=statistics.median(r["expected_vs_ref"] for r in rows),
        single_median_median=statistics.median(r["single_median"] for r in rows),
        steady_weight_zero=sum(r["steady_weight_min"] == 0.0 for r in rows),
        both_bars=dict(expected=sum(r["expected_vs_ref"] <= r["single_median"]
                                    and r["expected_move"] <= 1e-3 for r in rows),
                       steady=sum(r["steady_vs_ref"] <= r["single_median"]
                                  and r["steady_move"] <= 1e-3 for r in rows)),
    )  # fmt: skip


def cost(reps: int, cache) -> list[dict]:
    from benchmarks.bench_share_cost import SETS
    from videoanchor.anchor.scores import anchor_result_from_coefficients, ssc_coefficients

    rows = []
    for name, make in SETS.items():
        x = make()
        c = ssc_coefficients(x[:8], progress=False)  # a shell of the right type, C replaced
        c.coef, c.timings = fam.solve(x, cache), {}
        times = {"paper": [], "expected": []}
        for rep in range(reps):
            for share in ("paper", "expected") if rep % 2 == 0 else ("expected", "paper"):
                t = time.perf_counter()
                anchor_result_from_coefficients(c, K, features=x, cluster_share=share)
                times[share].append(time.perf_counter() - t)
        row = dict(set=name, n=int(x.shape[0]), d=int(x.shape[1]), k=K, reps=reps)
        for share, ts in times.items():
            row[f"seconds_{share}"], row[f"samples_{share}"] = statistics.median(ts), ts
        row["expected_over_paper"] = row["seconds_expected"] / row["seconds_paper"]
        rows.append(row)
        print({k: row[k] for k in ("set", "seconds_paper", "seconds_expected",
                                   "expected_over_paper")}, flush=True)  # fmt: skip
    return rows


def main(argv=None):
    ap = parser(__doc__, quick="the first 3 scenes")
    ap.add_argument("--cache", default=os.environ.get("VIDEOANCHOR_SHARE_CACHE"))
    ap.add_argument("--family", action="store_true", help="also share_family's plain sets")
    ap.add_argument("--family-only", action="store_true", help="share_family's plain sets only")
    ap.add_argument("--cost", action="store_true", help="the cost after the solve instead")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--only", help="comma-separated scene indices")
    ap.add_argument("--exact", action="store_true", help="also the exact expectation (slow)")
    ap.add_argument("--partial", help="a JSON-lines file the rows are appended to as they come")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    from videoanchor.anchor.clustering import EXPECTED_DRAWS, EXPECTED_WIDTH

    meta = environment("cpu")
    meta.update(torch_threads=1, loadavg_start=os.getloadavg(), n_clusters=K,
                expected_draws=EXPECTED_DRAWS, expected_width=EXPECTED_WIDTH,
                change=scenes.CHANGE, changes=scenes.CHANGES, reference_seeds=list(REF_SEEDS))  # fmt: skip
    if args.cost:
        meta["what"] = ("anchor_result_from_coefficients (spectral step, shares, scores) on the "
                        "default solver's C, cluster_share 'paper' and 'expected' alternated")  # fmt: skip
        rows = cost(args.reps, args.cache)
        meta["loadavg_end"] = os.getloadavg()
        cols = ["set", "n", "seconds_paper", "seconds_expected", "expected_over_paper"]
        return finish("expected_cost", meta, rows, args.out_dir, cols)
    sets = [(*s, spec[5]) for s, spec in zip(scenes.scenes(), scenes.SCENES, strict=True)]
    if args.only:
        sets = [sets[int(i)] for i in args.only.split(",")]
    if args.quick:
        sets = sets[:3]
        skip("bench_expected_share", "--quick: the first 3 scenes")
    if args.family_only:
        sets, args.family = [], True
    if args.family:
        sets += [(*s, 1000 + j) for j, s in enumerate(fam.plain_sets(large=False))]
    rows = []
    for name, kind, make, seed in sets:
        x = make()
        if x is None:
            skip("bench_expected_share", f"{name}: no data")
            continue
        row = measure(name, kind, x, seed, args.cache, args.exact)
        row["ratio"] = row["expected_vs_ref"] / max(row["single_median"], 1e-12)
        rows.append(row)
        print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
        if args.partial:
            with open(args.partial, "a") as f:
                f.write(json.dumps(row) + "\n")
    meta["loadavg_end"] = os.getloadavg()
    meta["summary"] = summary(rows)
    cols = ["set", "n", "single_median", "expected_vs_ref", "steady_vs_ref", "paper_vs_ref",
            "expected_move", "steady_move", "paper_move"]  # fmt: skip
    if args.exact:
        ex = [r for r in rows if "exact_move" in r]
        meta["summary"].update(exact_move_max=max(r["exact_move"] for r in ex),
                               exact_moves_within_1e_3=sum(r["exact_move"] <= 1e-3 for r in ex))  # fmt: skip
        cols += ["exact_move", "expected_vs_exact"]
    name = "expected_share" + ("_family" if args.family_only else "") + (
        "_exact" if args.exact else "") + ("_quick" if args.quick else "")  # fmt: skip
    return finish(name, meta, rows, args.out_dir, cols)


if __name__ == "__main__":
    main()
