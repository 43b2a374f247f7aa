"""Column-blocked exact SSC: equal to the dense iterates, per-block stopping, sparse C and
its affinity, mode="auto", and the same result spread over 2 CPU processes (gloo)."""

import os

import pytest
import torch
import torch.multiprocessing as mp
import torchvision_shim
from gloo_support import join_gloo, leave
from sklearn.metrics import adjusted_rand_score

# A spawned rank imports this module but not conftest.py: apply the test-only shim here too,
# before videoanchor imports transformers (a no-op where torchvision is absent or loads).
torchvision_shim.apply()

from videoanchor.anchor import (  # noqa: E402
    anchor_scores,
    compute_anchor_scores,
    eigensolvers,
    plan,
    solve_ssc_admm,
    solve_ssc_blocked,
    ssc_affinity,
)
from videoanchor.anchor.clustering import sparse_spectral_labels, sparse_ssc_affinity  # noqa: E402
from videoanchor.anchor.plan import (  # noqa: E402
    admm_bytes,
    blocked_admm_bytes,
    default_block_columns,
)
from videoanchor.anchor.scores import sparse_row_sums  # noqa: E402


def tokens(n_per, k, d, *, noise=0.05, seed=0):
    g = torch.Generator().manual_seed(seed)
    mean = torch.randn(d, generator=g, dtype=torch.float64)
    xs = []
    for _ in range(k):
        basis = torch.randn(d, 3, generator=g, dtype=torch.float64) / 2
        xs.append((basis @ torch.randn(3, n_per, generator=g, dtype=torch.float64)).T)
    x = torch.cat(xs) + 0.5 * mean
    x = x + noise * torch.randn(x.shape, generator=g, dtype=torch.float64)
    x[3, :4] += 4.0  # a corrupted token, so that E has non-zeros
    return x


def _rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize(
    "affine,outliers,dtype,tol",
    [
        (True, True, torch.float64, 1e-11),
        (False, False, torch.float64, 1e-11),
        (True, True, torch.float32, 1e-5),
    ],
    ids=["authors-f64", "lasso-f64", "authors-f32"],
)
def test_blocked_equals_dense_iterates(affine, outliers, dtype, tol):
    x = tokens(13, 4, 11, seed=1)  # N = 52, blocks of 7: the last one has 3 columns
    kw = dict(eps=0.0, max_iter=17, affine=affine, outliers=outliers, dtype=dtype)
    dense = solve_ssc_admm(x, strategy="woodbury", **kw)
    blocked = solve_ssc_blocked(x, block_columns=7, **kw)
    assert blocked.coef.is_sparse and blocked.coef.is_coalesced()
    assert blocked.block_iterations == [17] * 8
    c = blocked.coef.to_dense()
    assert c.dtype == dtype
    assert float(c.diagonal().abs().max()) == 0.0
    assert _rel(c, dense.coef) < tol
    assert (dense.lambda_e, dense.lambda_z) == pytest.approx((blocked.lambda_e, blocked.lambda_z))
    # exact zeros of the shrinkage are not stored
    assert blocked.coef._nnz() == int((c != 0).sum()) < c.numel() - c.shape[0]


def test_each_block_stops_on_its_own_part_of_the_criterion():
    x = tokens(15, 4, 12, seed=2)  # N = 60, blocks of 16, 16, 16, 12
    n, eps = x.shape[0], 1e-3
    res = solve_ssc_blocked(
        x, block_columns=16, eps=eps, max_iter=5000, dtype=torch.float64, keep_history=True
    )
    its = res.block_iterations
    assert res.converged and len(its) == 4 and len(set(its)) > 1
    assert res.iterations == max(its)
    c = res.coef.to_dense()
    for k, t in enumerate(its):
        hist = res.history[k]
        assert len(hist) == t and hist[-1] < eps and min(hist[:-1]) >= eps
        assert res.block_residuals[k] == hist[-1]
        # the block's columns are the dense iterate at its own stopping iteration
        dense = solve_ssc_admm(
            x, strategy="woodbury", eps=0.0, max_iter=t, dtype=torch.float64
        ).coef
        cols = slice(16 * k, min(n, 16 * k + 16))
        assert _rel(c[:, cols], dense[:, cols]) < 1e-11
    # one block over every column is the authors' rule: same stop, same C
    whole = solve_ssc_blocked(x, block_columns=n, eps=eps, max_iter=5000, dtype=torch.float64)
    dense = solve_ssc_admm(x, strategy="woodbury", eps=eps, max_iter=5000, dtype=torch.float64)
    assert whole.iterations == dense.iterations
    assert _rel(whole.coef.to_dense(), dense.coef) < 1e-11
    # "share": every block meets eps * b / N, so the assembled C meets eps overall
    shared = solve_ssc_blocked(
        x, block_columns=16, eps=eps, max_iter=5000, dtype=torch.float64, block_eps="share"
    )
    sizes = [16, 16, 16, 12]
    assert all(r < eps * b / n for r, b in zip(shared.block_residuals, sizes, strict=True))
    assert sum(shared.block_residuals) < eps
    assert min(shared.block_iterations) > min(its)


def test_sparse_affinity_row_sums_and_scores():
    x = tokens(9, 3, 10, seed=3)
    res = solve_ssc_blocked(x, block_columns=5, eps=1e-3, dtype=torch.float64)
    c = res.coef.to_dense()
    w = sparse_ssc_affinity(res.coef)
    assert w.is_sparse and torch.allclose(w.to_dense(), ssc_affinity(c), rtol=0, atol=1e-15)
    assert torch.allclose(sparse_row_sums(res.coef), c.sum(dim=1), rtol=0, atol=1e-13)
    labels = torch.arange(c.shape[0]) % 3
    assert torch.equal(anchor_scores(res.coef, labels), anchor_scores(c, labels))


def test_blocked_mode_matches_exact_mode():
    x = tokens(12, 3, 14, seed=4)
    kw = dict(n_clusters=3, eps=0.0, max_iter=300, dtype=torch.float64)
    exact = compute_anchor_scores(x, mode="exact", solver="faithful", **kw)
    blocked = compute_anchor_scores(x, mode="blocked", block_columns=10, **kw)
    assert blocked.mode == "blocked" and blocked.solver == "faithful"
    assert blocked.coef.is_sparse and blocked.iterations == exact.iterations == 300
    assert _rel(blocked.coef.to_dense(), exact.coef) < 1e-9
    # dense eigh's labels against ARPACK's: equal where the affinity has a gap at k (0.11),
    # far above both solvers' tolerances, on any CPU (issue 80)
    s, _ = eigensolvers._normalized_affinity(ssc_affinity(exact.coef))
    ev = torch.linalg.eigvalsh(s).flip(0)
    assert float(ev[2] - ev[3]) > 0.05
    assert adjusted_rand_score(exact.labels.numpy(), blocked.labels.numpy()) == 1.0
    assert blocked.scores.dtype == torch.float32 and blocked.scores.shape == (36,)
    assert float((blocked.scores - exact.scores).abs().max()) < 1e-6
    kw.update(pca_rank=5, max_iter=40)
    exact = compute_anchor_scores(x, mode="exact", solver="faithful", **kw)
    blocked = compute_anchor_scores(x, mode="blocked", block_columns=10, **kw)
    assert _rel(blocked.coef.to_dense(), exact.coef) < 1e-9


def test_label_draws_reach_the_blocked_mode():
    # More clusters than groups: the label draws differ, so averaging them changes the scores.
    x = tokens(10, 3, 12, seed=5)
    kw = dict(n_clusters=7, mode="blocked", block_columns=8, eps=1e-3, dtype=torch.float64)
    one = compute_anchor_scores(x, **kw)
    four = compute_anchor_scores(x, label_draws=4, **kw)
    draws = sparse_spectral_labels(sparse_ssc_affinity(four.coef), 7, seed=0, draws=4)
    assert torch.equal(four.labels, one.labels) and torch.equal(four.labels, draws[0])
    assert torch.equal(four.scores, anchor_scores(four.coef, draws))
    assert not torch.equal(four.scores, one.scores)


def test_block_eps_reaches_the_solver():
    x = tokens(6, 3, 9, seed=8)
    kw = dict(n_clusters=3, mode="blocked", block_columns=5, eps=1e-3, dtype=torch.float64)
    own = compute_anchor_scores(x, **kw)
    shared = compute_anchor_scores(x, block_eps="share", **kw)
    assert shared.iterations > own.iterations


def test_auto_mode_uses_the_blocked_exact_solver_beyond_the_dense_limit(monkeypatch):
    x = tokens(40, 3, 5, seed=5).float()  # (the needs below are float32's)
    n, d = x.shape
    kw = dict(n_clusters=3, max_iter=40, block_columns=16)
    assert compute_anchor_scores(x, **kw).mode == "exact"
    # past the token limit, blocked whatever the memory (here: no limit read)
    cpu, limit = torch.device("cpu"), plan.EXACT_MAX_TOKENS
    with monkeypatch.context() as m:
        m.setattr(plan, "free_memory_bytes", lambda device: None)
        assert plan.exact_fits(limit, 4, torch.float32, cpu)
        assert not plan.exact_fits(limit + 1, 4, torch.float32, cpu)
    # free memory between the blocked and the dense needs: blocked
    need_blocked = blocked_admm_bytes(n, d, 4, 16)
    need_dense = admm_bytes(n, d, 4, "dense")
    assert need_blocked < need_dense
    monkeypatch.setattr(plan, "free_memory_bytes", lambda device: need_blocked)
    assert compute_anchor_scores(x, **kw).mode == "blocked"
    assert default_block_columns(100_000, 64, torch.float32, "cpu") % 64 == 0


def test_blocked_bad_input():
    x = tokens(5, 3, 8, seed=6)
    with pytest.raises(ValueError, match="block_columns"):
        solve_ssc_blocked(x, block_columns=0)
    with pytest.raises(ValueError, match="block_eps"):
        solve_ssc_blocked(x, block_eps="global")
    with pytest.raises(ValueError, match="block_eps"):
        compute_anchor_scores(x, n_clusters=3, mode="blocked", block_eps="global")
    with pytest.raises(ValueError, match="solver 'auto', 'workset' or 'faithful', got 'fast'"):
        compute_anchor_scores(x, n_clusters=3, mode="blocked", solver="fast")
    with pytest.raises(ValueError, match="eigh"):
        compute_anchor_scores(x, n_clusters=3, mode="blocked", eigen_solver="eigh")
    with pytest.raises(TypeError, match="pca_rank"):
        compute_anchor_scores(x, n_clusters=3, mode="blocked", pca_rank=2.5)
    with pytest.raises(ValueError, match="not initialised"):
        compute_anchor_scores(x, n_clusters=3, process_group=object())
    with pytest.raises(ValueError, match="finite"):
        solve_ssc_blocked(torch.full((6, 3), float("nan")))


def _worker(rank, world, store, x, kw, out):
    import torch.distributed as dist

    join_gloo(rank, world, store)
    try:
        group = dist.group.WORLD
        # rank 1's features differ slightly: rank 0's are used everywhere
        mine = x if rank == 0 else x + 1e-3 * torch.randn(x.shape, dtype=x.dtype)
        res = compute_anchor_scores(mine, process_group=group, **kw)
        try:
            compute_anchor_scores(x[: x.shape[0] - rank], process_group=group, **kw)
            shape_error = None
        except ValueError as exc:
            shape_error = str(exc)
        try:
            compute_anchor_scores(x, process_group=group, **{**kw, "mode": "exact"})
            mode_error = None
        except ValueError as exc:
            mode_error = str(exc)
        # bad features on one rank: every rank raises (no rank left waiting)
        bad = x.clone()
        if rank == 1:
            bad[2, 3] = float("nan")
        try:
            compute_anchor_scores(bad, process_group=group, **kw)
            nan_error = None
        except (ValueError, RuntimeError) as exc:
            nan_error = f"{type(exc).__name__}: {exc}"
        torch.save(
            {
                "coef": res.coef,
                "labels": res.labels,
                "scores": res.scores,
                "mode": res.mode,
                "iterations": res.iterations,
                "shape_error": shape_error,
                "mode_error": mode_error,
                "nan_error": nan_error,
            },
            os.path.join(out, f"rank{rank}.pt"),
        )
    finally:
        dist.destroy_process_group()
    leave()


@pytest.mark.distributed
def test_two_gloo_processes_equal_one(tmp_path):
    x = tokens(14, 4, 13, seed=7).float()  # N = 56
    kw = dict(n_clusters=4, mode="blocked", block_columns=9, eps=2e-4, max_iter=3000)
    single = compute_anchor_scores(x, **kw)
    mp.spawn(_worker, args=(2, str(tmp_path / "store"), x, kw, str(tmp_path)), nprocs=2)
    got = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    want = single.coef.to_dense()
    for g in got:
        assert g["mode"] == "blocked" and g["iterations"] == single.iterations
        assert torch.equal(g["labels"], single.labels)
        assert _rel(g["coef"].to_dense(), want) < 1e-6
        assert torch.allclose(g["scores"], single.scores, rtol=0, atol=1e-6)
        assert "same features" in g["shape_error"]
        assert "mode='exact'" in g["mode_error"]
    # the same error on every rank (issue 23), naming the rank it came from
    assert got[0]["nan_error"].startswith("ValueError: features: expected finite values")
    assert "raised on rank 1" in got[0]["nan_error"]
    assert got[1]["nan_error"].startswith("ValueError: features: expected finite values")
    # and the ranks agree with each other exactly
    assert torch.equal(got[0]["coef"].to_dense(), got[1]["coef"].to_dense())
    assert torch.equal(got[0]["scores"], got[1]["scores"])
