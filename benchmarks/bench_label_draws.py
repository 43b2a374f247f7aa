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

``--flips`` (issue 78): how the paper's scores jump when the features move by a rounding's
worth, and what ``cluster_share="soft"`` and ``"steady"`` (the default since issue 91; before it
``"stable"``, the 32-draw gate it replaced) do instead, at the paper's ``n_clusters = 24``, one
thread. Sets: :func:`benchmarks.common.video_tokens` as ``bench_workset`` builds them (48
patches a frame, D = 1024) at ``--frames`` frames, and the projector output of the tests'
tiny random Qwen2.5-VL (seeded weights) on seeded random pixels, 8 x 70 tokens (N = 560,
D = 32; the shape of the issue's 560-token videos, not those videos). Per set: the solver's
``C`` (the default, ``ssc_coefficients``) of the features and of ``--p7`` and ``--p6``
copies times ``1 + r g`` (``g`` seeded Gaussian, ``r`` = 1e-7, 1e-6), the paper's labels and
scores (``anchor_result_from_coefficients``) and the soft ones of each; reported: the
eigengap at ``k`` of the normalised affinity, how often the labels flip, the largest score
move and the share of tokens moving by more than 0.05, the soft scores' largest move,
their largest distance to the paper's (at the set and at each change), the share of
tokens whose soft score lies within the paper's spread (min..max over the ``--p6``
perturbations), the same for
``cluster_share="steady"`` (with its weight and stability on the unperturbed set), and the time
of the spectral step against the soft and the steady share on the same affinity
(interleaved, median of 3; the steady share as ``cluster()`` runs it: labels and shares from
one eigensolver call, ``steady_share_s``). The committed ``label_flips*_cpu.json`` predate
issue 91 and hold the ``stable_*`` columns of the gate it replaced::

    python benchmarks/bench_label_draws.py --flips              # writes label_flips_cpu.json
    python benchmarks/bench_label_draws.py --flips --frames 64 --tiny --tag 64f

``--expected``: the route of an expected hard share, measured and not shipped: the mean of
the paper's share over ``R`` label draws (``--draws``) of ``discretize``'s unit rows moved
by ``--scale`` times a seeded Gaussian (the same draws at every feature change), each from
the paper's start row; per set and ``R``: how many draws keep the paper's labels, the
largest distance to the paper's scores, the largest move under the first ``--moves`` of the
16 changes of 1e-6 (as ``--flips`` draws them), the share of tokens within the paper's
spread, and, for scale, the same share for the mean of the paper's own scores over the 8
changes of 1e-7::

    python benchmarks/bench_label_draws.py --expected --draws 256,1024 --frames 16 --tiny 0

``--routes`` (issue 78, the spread bar): smooth shares and draw averages measured on the
flip-prone tiny sets and not shipped. Per set, against the paper's scores at the 16 changes
of 1e-6 (as ``--flips`` draws them): the per-token spread of the paper's scores, the
correlation of the soft share with the paper's mean share over those changes, and for
each route the share of tokens within the paper's spread, the largest distance to the
paper's scores and the largest move under the first ``--moves`` changes. Routes: the
soft share with ``cos^(2p)`` for ``cos^2`` (``p`` 1, 2, 8); a soft discretize (per-token
softmax of ``v R / tau`` with ``R`` the polar factor of ``v^T P``, 100 iterations from the
paper's rotation; ``tau`` 0.03, 0.1, 0.3), its share the expected size of each token's
soft cluster; the mean over ``--draws`` label draws of discretize's rows moved by 1e-3 of
the paper's scores, and of their shares (then normalised)::

    python benchmarks/bench_label_draws.py --routes --draws 64,256 --tiny 0 1 2
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
    video_tokens,
)
from videoanchor.anchor import anchor_scores, solve_ssc_admm  # noqa: E402
from videoanchor.anchor.clustering import spectral_labels, ssc_affinity  # noqa: E402

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


TESTS = Path(__file__).resolve().parents[1] / "tests"


def tiny_features(seed: int, frames: int = 8, rows: int = 7, cols: int = 10) -> torch.Tensor:
    """The tests' tiny random Qwen2.5-VL's projector output (``frames * rows * cols`` x 32,
    float32) on seeded random pixels: ``frames`` temporal patches of ``rows x cols`` tokens."""
    sys.path.insert(0, str(TESTS))
    import torchvision_shim  # the tiny model's transformers modules import torchvision

    torchvision_shim.apply()
    from videoanchor.integrations.transformers.testing import tiny_model

    model = tiny_model("qwen2_5_vl")
    vc = model.config.vision_config
    m = vc.spatial_merge_size
    grid = torch.tensor([[frames, rows * m, cols * m]])
    gen = torch.Generator().manual_seed(seed)
    width = vc.in_channels * vc.temporal_patch_size * vc.patch_size**2
    pixels = torch.randn(frames * rows * cols * m * m, width, generator=gen)
    with torch.no_grad():
        out = model.model.visual(pixels, grid_thw=grid)
    return getattr(out, "pooler_output", out).float().contiguous()


def _eigengap(coef, k: int) -> dict:
    from videoanchor.anchor.eigensolvers import _normalized_affinity

    s, _ = _normalized_affinity(ssc_affinity(coef).to(torch.float64))
    theta = torch.linalg.eigvalsh(s).flip(0)
    return dict(theta_k=float(theta[k - 1]), theta_k1=float(theta[k]),
                eigengap=float(theta[k - 1] - theta[k]))  # fmt: skip


def _discretize_draws(v: torch.Tensor, start: int, n_iter_max: int = 20) -> torch.Tensor:
    """``discretize``'s iterations on ``R`` sets of unit rows at once (``v``: ``(R, N, k)``
    float64), every draw from start row ``start``: ``(R, N)`` labels, raw ids (the routes of
    ``--expected`` and ``--routes``; the package's copy went with ``cluster_share="stable"``
    in issue 91)."""
    r, n, k = v.shape
    at = torch.arange(r)
    rot = v.new_zeros(r, k, k)
    rot[:, :, 0] = v[:, start]
    c = v.new_zeros(r, n)
    for j in range(1, k):
        c += torch.bmm(v, rot[:, :, j - 1 : j]).squeeze(2).abs()
        rot[:, :, j] = v[at, c.argmin(dim=1)]
    eps = torch.finfo(torch.float64).eps
    last, done = v.new_zeros(r), torch.zeros(r, dtype=torch.bool)
    out = torch.full((r, n), -1, dtype=torch.long)
    for n_iter in range(1, n_iter_max + 2):
        labels = torch.bmm(v, rot).argmax(dim=2)
        t_svd = v.new_zeros(r, k, k).scatter_add_(1, labels[:, :, None].expand(-1, -1, k), v)
        u, sv, vh = torch.linalg.svd(t_svd)
        ncut = 2.0 * (n - sv.sum(dim=1))
        stop = ((ncut - last).abs() < eps) | (n_iter > n_iter_max)
        out[stop & ~done] = labels[stop & ~done]
        done |= stop
        if bool(done.all()):
            break
        last, rot = ncut, vh.mT @ u.mT
    return out


def flips_case(name: str, x: torch.Tensor, p7: int, p6: int, seed: int = 0) -> dict:
    """One set of ``--flips`` (see the module's docstring)."""
    from videoanchor.anchor import ssc_coefficients
    from videoanchor.anchor.clustering import soft_cluster_shares, steady_shares
    from videoanchor.anchor.scores import anchor_result_from_coefficients

    def shares(c):  # the paper's labels and scores, the soft and the steady scores
        hard = anchor_result_from_coefficients(c, K, features=x, cluster_share="paper")
        soft, stable = (anchor_result_from_coefficients(c, K, features=x, cluster_share=cs)
                        for cs in ("soft", "steady"))  # fmt: skip
        return hard.labels, hard.scores.double(), soft.scores.double(), stable.scores.double()

    t = time.perf_counter()
    base = ssc_coefficients(x)
    row = dict(set=name, n=int(x.shape[0]), d=int(x.shape[1]), k=K, solver=base.solver,
               solve_s=time.perf_counter() - t, **_eigengap(base.coef, K))  # fmt: skip
    labels, hard, soft, stable = shares(base)
    apart = {
        "soft": [float((soft - hard).abs().max())],
        "steady": [float((stable - hard).abs().max())],
    }
    w = ssc_affinity(base.coef)
    record = steady_shares(w, K)[2]
    row.update(steady_weight=record["share_weight"], steady_stability=record["stability"])
    spectral_s, soft_s, steady_s = [], [], []
    for _ in range(3):  # interleaved: the paper's spectral step, the soft share, the steady one
        t = time.perf_counter()
        spectral_labels(w, K)
        spectral_s.append(time.perf_counter() - t)
        t = time.perf_counter()
        soft_cluster_shares(w, K)
        soft_s.append(time.perf_counter() - t)
        t = time.perf_counter()
        steady_shares(w, K)  # (its labels included: the whole spectral step)
        steady_s.append(time.perf_counter() - t)
    row.update(spectral_step_s=statistics.median(spectral_s),
               soft_share_s=statistics.median(soft_s),
               steady_share_s=statistics.median(steady_s))  # fmt: skip
    for name in ("soft_share", "steady_share"):
        row[f"{name}_over_spectral"] = row[f"{name}_s"] / row["spectral_step_s"]
    gen = torch.Generator().manual_seed(seed)
    spread = []
    for rel, count in (("1e-7", p7), ("1e-6", p6)):
        flips, hard_moves, shares_over, soft_moves, stable_moves = [], [], [], [], []
        for _ in range(count):
            xp = x * (1 + float(rel) * torch.randn(x.shape, generator=gen, dtype=x.dtype))
            lp, hp, sp, tp = shares(ssc_coefficients(xp))
            flips.append(not torch.equal(lp, labels))
            move = (hp - hard).abs()
            hard_moves.append(float(move.max()))
            shares_over.append(float((move > 0.05).double().mean()))
            soft_moves.append(float((sp - soft).abs().max()))
            stable_moves.append(float((tp - stable).abs().max()))
            apart["soft"].append(float((sp - hp).abs().max()))
            apart["steady"].append(float((tp - hp).abs().max()))
            if rel == "1e-6":
                spread.append(hp)
        row.update({f"flip_rate_{rel}": sum(flips) / count, f"perturbations_{rel}": count,
                    f"hard_move_max_{rel}": max(hard_moves),
                    f"share_moving_over_0.05_max_{rel}": max(shares_over),
                    f"share_moving_over_0.05_mean_{rel}": statistics.mean(shares_over),
                    f"soft_move_max_{rel}": max(soft_moves),
                    f"steady_move_max_{rel}": max(stable_moves)})  # fmt: skip
    lo, hi = torch.stack(spread).min(0).values, torch.stack(spread).max(0).values
    kept = row["flip_rate_1e-6"] == 0
    row.update(labels_stable_1e_6=kept, paper_spread_max=float((hi - lo).max()))
    for name, new in (("soft", soft), ("steady", stable)):  # the bar of issue 78, per share
        far = max(apart[name])  # at the set and at each of its changes
        within = float(((new >= lo) & (new <= hi)).double().mean())
        row.update({
            f"{name}_vs_paper_max": far,
            f"{name}_vs_paper_max_unperturbed": apart[name][0],
            f"{name}_vs_paper_median": float((new - hard).abs().median()),
            f"{name}_within_paper_spread": within,
            f"{name}_bar_moves_le_1e_3": row[f"{name}_move_max_1e-6"] <= 1e-3,
            f"{name}_bar_equal_where_stable": far <= 1e-6 if kept else None,
            f"{name}_bar_within_spread_95": None if kept else within >= 0.95,
        })  # fmt: skip
    return row


def flips(frames, tiny, p7: int, p6: int, out_dir, tag: str = "") -> Path:
    """``--flips``: every set, one thread, into ``label_flips[_tag]_cpu.json``."""
    torch.set_num_threads(1)
    meta = environment("cpu")
    meta.update(torch_threads=1, loadavg_start=os.getloadavg(), n_clusters=K,
                perturbation="x * (1 + r g), g standard Gaussian (seeded), r in (1e-7, 1e-6)",
                routes="cluster_share='soft' (soft_cluster_shares) and 'steady' "
                       "(videoanchor.anchor.clustering.steady_shares)")  # fmt: skip
    rows = []
    for f in frames:
        rows.append(flips_case(f"video {f}x48 D1024", video_tokens(f, 48, 1024), p7, p6))
        print({k: rows[-1][k] for k in ("set", "flip_rate_1e-6", "soft_move_max_1e-6",
                                        "steady_move_max_1e-6")}, flush=True)  # fmt: skip
    for s in tiny:
        rows.append(flips_case(f"tiny Qwen2.5-VL 8x70 pixels seed {s}", tiny_features(s), p7, p6))
        print({k: rows[-1][k] for k in ("set", "flip_rate_1e-6", "soft_move_max_1e-6",
                                        "steady_move_max_1e-6")}, flush=True)  # fmt: skip
    meta["loadavg_end"] = os.getloadavg()
    cols = ["set", "n", "eigengap", "flip_rate_1e-7", "flip_rate_1e-6", "hard_move_max_1e-6",
            "share_moving_over_0.05_max_1e-6", "soft_move_max_1e-6", "soft_vs_paper_max",
            "soft_within_paper_spread", "steady_weight", "steady_move_max_1e-6",
            "steady_vs_paper_max", "steady_within_paper_spread", "spectral_step_s",
            "soft_share_s", "steady_share_s"]  # fmt: skip
    return finish("label_flips" + (f"_{tag}" if tag else ""), meta, rows, out_dir, cols)


def expected_case(name: str, x: torch.Tensor, draws_list, scale: float, moves: int) -> list[dict]:
    """One set of ``--expected`` (see the module's docstring)."""
    from videoanchor.anchor import ssc_coefficients
    from videoanchor.anchor.eigensolvers import spectral_embedding
    from videoanchor.anchor.labels import (
        _relabel_by_first_appearance,
        _unit_rows,
        discretize,
        label_random_state,
    )
    from videoanchor.anchor.labels import discretize_rows as _discretize_rows
    from videoanchor.anchor.scores import scores_from_row_sums

    def paper(c):  # the embedding, the paper's labels and scores
        emb = spectral_embedding(ssc_affinity(c.coef), K)
        lab = discretize(emb, random_state=label_random_state(0, len(emb)))
        return emb, lab, scores_from_row_sums(c.coef.sum(1), lab).double()

    def expected(c, emb, lab, r):  # the mean hard share over r moved embeddings
        v, n = _discretize_rows(emb), len(emb)
        g = torch.randn(r, *v.shape, generator=torch.Generator().manual_seed(0),
                        dtype=torch.float64)  # fmt: skip
        moved = _unit_rows((v + scale * g).reshape(-1, K)).reshape(g.shape)
        t = time.perf_counter()
        d = _discretize_draws(moved, int(label_random_state(0, n).randint(n)))
        took = time.perf_counter() - t
        same = sum(torch.equal(_relabel_by_first_appearance(row), lab) for row in d) / r
        return scores_from_row_sums(c.coef.sum(1), d).double(), same, took

    gen = torch.Generator().manual_seed(0)
    base = ssc_coefficients(x)
    emb, lab, hard = paper(base)
    runs = {"1e-7": [], "1e-6": []}
    for rel, count in (("1e-7", 8), ("1e-6", 16)):  # as --flips draws them
        for _ in range(count):
            xp = x * (1 + float(rel) * torch.randn(x.shape, generator=gen, dtype=x.dtype))
            c = ssc_coefficients(xp)
            runs[rel].append((c, *paper(c)))
    spread = torch.stack([h for *_, h in runs["1e-6"]])
    lo, hi = spread.min(0).values, spread.max(0).values
    mean7 = torch.stack([h for *_, h in runs["1e-7"]]).mean(0)
    rows = []
    for r in draws_list:
        s0, same, took = expected(base, emb, lab, r)
        moved = [float((expected(c, e, lb, r)[0] - s0).abs().max())
                 for c, e, lb, _ in runs["1e-6"][:moves]]  # fmt: skip
        rows.append(dict(
            set=name, n=int(x.shape[0]), k=K, draws=r, scale=scale,
            paper_flip_rate_1e_6=sum(not torch.equal(lb, lab) for _, _, lb, _ in runs["1e-6"]) / 16,
            draws_keeping_paper_labels=same, expected_vs_paper_max=float((s0 - hard).abs().max()),
            expected_move_max_1e_6=max(moved), moves_measured=len(moved),
            expected_within_paper_spread=float(((s0 >= lo) & (s0 <= hi)).double().mean()),
            paper_mean_of_8_1e_7_within_spread=float(((mean7 >= lo) & (mean7 <= hi)).double().mean()),
            draws_s=took,
        ))  # fmt: skip
        print(rows[-1], flush=True)
    return rows


def expected_route(draws_list, scale: float, moves: int, tiny, frames, out_dir) -> Path:
    """``--expected``: the Monte-Carlo expected share, into ``label_expected_cpu.json``."""
    torch.set_num_threads(1)
    meta = environment("cpu")
    meta.update(torch_threads=1, loadavg_start=os.getloadavg(), n_clusters=K,
                route="mean hard share over R label draws of discretize's unit rows + scale * "
                      "a seeded Gaussian (common draws at every feature change), each from "
                      "the paper's start row")  # fmt: skip
    rows = []
    for f in frames:
        rows += expected_case(f"video {f}x48 D1024", video_tokens(f, 48, 1024), draws_list,
                              scale, moves)  # fmt: skip
    for s in tiny:
        rows += expected_case(f"tiny Qwen2.5-VL 8x70 pixels seed {s}", tiny_features(s),
                              draws_list, scale, moves)  # fmt: skip
    meta["loadavg_end"] = os.getloadavg()
    cols = ["set", "draws", "paper_flip_rate_1e_6", "draws_keeping_paper_labels",
            "expected_vs_paper_max", "expected_move_max_1e_6", "expected_within_paper_spread",
            "paper_mean_of_8_1e_7_within_spread", "draws_s"]  # fmt: skip
    return finish("label_expected", meta, rows, out_dir, cols)


def routes_case(name: str, x: torch.Tensor, draws_list, moves: int) -> dict:
    """One set of ``--routes`` (see the module's docstring)."""
    from videoanchor.anchor import ssc_coefficients
    from videoanchor.anchor.clustering import (
        SOFT_SHARE_WIDTH,
        _unit_rows,
        discretize,
        label_random_state,
        label_shares,
    )
    from videoanchor.anchor.eigensolvers import (
        _filtered_eigenpairs,
        _normalized_affinity,
        spectral_embedding,
    )
    from videoanchor.anchor.labels import discretize_rows as _discretize_rows
    from videoanchor.anchor.scores import scores_from_row_sums

    def paper(coef):  # what each route reads: C's row sums, the embedding's rows, the labels
        emb = spectral_embedding(ssc_affinity(coef), K)
        lab = discretize(emb, random_state=label_random_state(0, len(emb)))
        s, dd = _normalized_affinity(ssc_affinity(coef).to(torch.float64))
        theta, vec = _filtered_eigenpairs(s, K, SOFT_SHARE_WIDTH)
        f = ((theta - float(theta[K - 1]) + SOFT_SHARE_WIDTH) / SOFT_SHARE_WIDTH).clamp(0, 1)
        u = _unit_rows(vec[:, f > 0] * f[f > 0].sqrt() / dd[:, None])
        return dict(r=coef.sum(1), v=_discretize_rows(emb), lab=lab, u=u)

    def cos2p(p):
        return lambda c: scores_from_row_sums(
            c["r"], c["lab"], ((c["u"] @ c["u"].T).square().pow(p).sum(1) / len(c["u"]))
        )

    def polar(t):
        u, _, vh = torch.linalg.svd(t)
        return vh.mT @ u.mT

    def soft_discretize(tau):
        def route(c):
            v, n = c["v"], len(c["v"])
            rot = polar(v.new_zeros(K, K).index_add_(0, c["lab"], v))
            for _ in range(100):
                rot = polar(v.T @ torch.softmax(v @ rot / tau, dim=1))
            p = torch.softmax(v @ rot / tau, dim=1)
            return scores_from_row_sums(c["r"], c["lab"], (1 + (p * (p.sum(0) - p)).sum(1)) / n)

        return route

    def draws_mean(r, of):
        def route(c):
            v, n = c["v"], len(c["v"])
            g = torch.randn(r, *v.shape, generator=torch.Generator().manual_seed(0),
                            dtype=torch.float64)  # fmt: skip
            moved = _unit_rows((v + 1e-3 * g).reshape(-1, K)).reshape(g.shape)
            d = _discretize_draws(moved, int(label_random_state(0, n).randint(n)))
            if of == "shares":
                return scores_from_row_sums(c["r"], d)
            return torch.stack([scores_from_row_sums(c["r"], row).double() for row in d]).mean(0)

        return route

    gen = torch.Generator().manual_seed(0)
    base = paper(ssc_coefficients(x).coef)
    runs = []
    for rel, count in (("1e-7", 8), ("1e-6", 16)):  # as --flips draws them
        for _ in range(count):
            xp = x * (1 + float(rel) * torch.randn(x.shape, generator=gen, dtype=x.dtype))
            if rel == "1e-6":
                runs.append(paper(ssc_coefficients(xp).coef))
    scores = torch.stack([scores_from_row_sums(c["r"], c["lab"]).double() for c in runs])
    lo, hi = scores.min(0).values, scores.max(0).values
    hard = scores_from_row_sums(base["r"], base["lab"]).double()
    mean_pi = torch.stack([label_shares(c["lab"]) for c in runs]).mean(0)
    soft_pi = (base["u"] @ base["u"].T).square().sum(1) / len(base["u"])
    row = dict(set=name, n=int(x.shape[0]), k=K,
               paper_flip_rate_1e_6=sum(not torch.equal(c["lab"], base["lab"]) for c in runs) / 16,
               paper_score_std_max=float(scores.std(0).max()),
               paper_score_std_median=float(scores.std(0).median()),
               soft_share_corr_with_paper_mean_share=float(torch.corrcoef(
                   torch.stack([soft_pi, mean_pi]))[0, 1]))  # fmt: skip
    routes = {f"cos^{2 * p}": cos2p(p) for p in (1, 2, 8)}
    routes.update({f"soft discretize tau {t}": soft_discretize(t) for t in (0.03, 0.1, 0.3)})
    for r in draws_list:
        routes[f"mean of scores over {r} draws"] = draws_mean(r, "scores")
        routes[f"mean of shares over {r} draws"] = draws_mean(r, "shares")
    out = []
    for route, fn in routes.items():
        s0 = fn(base).double()
        moved = [float((fn(c).double() - s0).abs().max()) for c in runs[:moves]]
        out.append(dict(row, route=route, within_paper_spread=float(((s0 >= lo) & (s0 <= hi))
                                                                    .double().mean()),
                        vs_paper_max=float((s0 - hard).abs().max()), move_max_1e_6=max(moved),
                        moves_measured=len(moved)))  # fmt: skip
        print({k: out[-1][k] for k in ("set", "route", "within_paper_spread", "move_max_1e_6")},
              flush=True)  # fmt: skip
    return out


def routes(draws_list, moves: int, tiny, out_dir) -> Path:
    """``--routes``: the spread bar's candidates, into ``label_routes_cpu.json``."""
    torch.set_num_threads(1)
    meta = environment("cpu")
    meta.update(torch_threads=1, loadavg_start=os.getloadavg(), n_clusters=K,
                perturbation="x * (1 + r g), g standard Gaussian (seeded), r = 1e-6")  # fmt: skip
    rows = []
    for s in tiny:
        rows += routes_case(f"tiny Qwen2.5-VL 8x70 pixels seed {s}", tiny_features(s),
                            draws_list, moves)  # fmt: skip
    meta["loadavg_end"] = os.getloadavg()
    cols = ["set", "route", "within_paper_spread", "vs_paper_max", "move_max_1e_6",
            "soft_share_corr_with_paper_mean_share", "paper_score_std_max"]  # fmt: skip
    return finish("label_routes", meta, rows, out_dir, cols)


def main(argv=None):
    ap = parser(__doc__, quick="3 seeds and R in (1, 4) (a smoke run)")
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--draws", default="1,4,16")
    ap.add_argument("--admm-iters", type=int, default=60)
    ap.add_argument("--flips", action="store_true", help="issue 78's measurement (docstring)")
    ap.add_argument("--frames", type=int, nargs="*", default=[8, 16, 32])
    ap.add_argument("--tiny", type=int, nargs="*", default=[0, 1, 2], help="pixel seeds")
    ap.add_argument("--p7", type=int, default=8, help="perturbations of 1e-7")
    ap.add_argument("--p6", type=int, default=16, help="perturbations of 1e-6")
    ap.add_argument("--tag", default="")
    ap.add_argument("--expected", action="store_true", help="the Monte-Carlo route (docstring)")
    ap.add_argument("--scale", type=float, default=1e-3, help="--expected: the rows' move")
    ap.add_argument("--moves", type=int, default=4, help="--expected: 1e-6 changes to measure")
    ap.add_argument("--routes", action="store_true", help="the spread bar's routes (docstring)")
    args = ap.parse_args(argv)
    if args.routes:
        return routes([int(v) for v in args.draws.split(",")], args.moves, args.tiny,
                      args.out_dir)  # fmt: skip
    if args.expected:
        return expected_route([int(v) for v in args.draws.split(",")], args.scale, args.moves,
                              args.tiny, args.frames, args.out_dir)  # fmt: skip
    if args.flips:
        if args.quick:
            args.frames, args.tiny, args.p7, args.p6 = [8], [0], 2, 4
            skip("bench_label_draws --flips", "--quick: 8 frames, one tiny set, 2 + 4 draws")
        return flips(args.frames, args.tiny, args.p7, args.p6, args.out_dir,
                     args.tag or ("quick" if args.quick else ""))  # fmt: skip
    if args.quick:
        args.seeds, args.draws = min(args.seeds, 3), "1,4"
        skip(
            "bench_label_draws", "--quick: 3 seeds and R = 1, 4 only (R = 16 and 10 seeds not run)"
        )
    run(args.seeds, [int(v) for v in args.draws.split(",")], args.out_dir, args.admm_iters)


if __name__ == "__main__":
    main()
