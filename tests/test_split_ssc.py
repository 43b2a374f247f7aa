"""The fast solver with the columns of C split over a process group (2 and 3 CPU processes,
gloo): every rank ends with the single-process result (to the rounding of the cross-rank
sums), in both of its paths (the CPU active set and the dense schedule other devices run),
at both precisions, with PCA and label draws; a stop asked on one rank stops all of them at
the same iteration; ``mode="auto"`` makes the same choice on every rank."""

import os

import pytest
import torch
import torch.multiprocessing as mp
import torchvision_shim
from gloo_support import join_gloo, leave
from hypothesis import given
from hypothesis import strategies as st

# A spawned rank imports this module but not conftest.py: apply the test-only shim here too.
torchvision_shim.apply()

from benchmarks.bench_request_cost import corrupted_subspaces  # noqa: E402
from videoanchor.anchor import compute_anchor_scores, solve_ssc_admm  # noqa: E402
from videoanchor.anchor import plan as plan_mod  # noqa: E402
from videoanchor.anchor.collective import column_range  # noqa: E402


def tokens(n, d, *, seed=0):
    """Points on 4 random subspaces, a little noise, and sparse large corruptions (so that
    the outlier matrix E is not zero): the benchmark's corrupted subspaces."""
    return corrupted_subspaces(n, d, seed=seed)


def _rel(a, b):
    a, b = a.double(), b.double()
    return float((a - b).norm() / max(float(b.norm()), 1e-30))


def _worker(rank, world, store, x, out):
    import torch.distributed as dist

    join_gloo(rank, world, store)
    got = {}
    try:
        group = dist.group.WORLD
        # rank 1's features differ slightly: rank 0's are used everywhere
        mine = x if rank == 0 else x + 1e-3 * torch.randn(x.shape, dtype=x.dtype)
        res = compute_anchor_scores(mine, 4, process_group=group)
        got["default"] = {k: getattr(res, k) for k in
                          ("coef", "scores", "labels", "mode", "solver", "iterations")}  # fmt: skip
        if world == 2:
            admm = solve_ssc_admm(mine, scheduled=True, process_group=group, keep_history=True)
            got["active"] = (admm.coef, admm.outliers, admm.history, admm.rho_changes)
            admm = solve_ssc_admm(mine, scheduled=True, process_group=group, keep_history=True,
                                  strategy="dense")  # fmt: skip
            got["dense"] = (admm.coef, admm.outliers, admm.history, admm.rho_changes)
            res = compute_anchor_scores(mine, 4, precision="fp16x3", process_group=group)
            got["fp16x3"] = (res.coef, res.scores, res.labels)
            res = compute_anchor_scores(mine, 4, pca_rank=8, label_draws=3, process_group=group)
            got["pca_draws"] = (res.coef, res.scores, res.labels)
            admm = solve_ssc_admm(mine, scheduled=True, process_group=group,
                                  progress=lambda it, r: rank == 1 and it >= 7)  # fmt: skip
            got["stop"] = (admm.iterations, admm.converged, admm.stopped, admm.coef)
            # the dense problem "does not fit" on rank 1 only: both ranks take blocked mode
            fits = plan_mod.exact_fits
            if rank == 1:
                plan_mod.exact_fits = lambda *a, **k: False
            try:
                res = compute_anchor_scores(mine, 4, max_iter=400, process_group=group)
            finally:
                plan_mod.exact_fits = fits
            got["auto"] = (res.mode, res.solver, res.scores)
    finally:
        torch.save(got, os.path.join(out, f"rank{rank}.pt"))
        dist.destroy_process_group()
    leave()


def _spawn(tmp_path, world, x):
    mp.spawn(_worker, args=(world, str(tmp_path / "store"), x, str(tmp_path)), nprocs=world)
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    x = tokens(57, 40, seed=3)
    return x, _spawn(tmp_path_factory.mktemp("two"), 2, x)


def _same_on_every_rank(got, key):
    for g in got[1:]:
        for a, b in zip(g[key] if isinstance(g[key], tuple) else g[key].values(),
                        got[0][key] if isinstance(got[0][key], tuple) else got[0][key].values(),
                        strict=True):  # fmt: skip
            if isinstance(a, torch.Tensor):
                assert torch.equal(a, b), key
            else:
                assert a == b, key


@pytest.mark.distributed
def test_default_split_equals_one_process(two):
    x, got = two
    single = compute_anchor_scores(x, 4)
    _same_on_every_rank(got, "default")
    g = got[0]["default"]
    # the CPU's default, the working sets: each rank solves its stride of the columns, and
    # every column is computed as one process computes it
    assert g["mode"] == "exact" and g["solver"] == single.solver == "workset"
    assert torch.equal(g["coef"], single.coef)
    assert torch.equal(g["labels"], single.labels)
    torch.testing.assert_close(g["scores"], single.scores, atol=1e-5, rtol=0)


@pytest.mark.distributed
@pytest.mark.parametrize("path", ["active", "dense"])
def test_both_paths_follow_the_single_process_iterate(two, path):
    x, got = two
    step = "dense" if path == "dense" else "auto"
    single = solve_ssc_admm(x, scheduled=True, keep_history=True, strategy=step)
    _same_on_every_rank(got, path)
    coef, e, history, changes = got[0][path]
    assert single.outliers.count_nonzero() > 0  # E is exercised
    assert _rel(coef, single.coef) < 1e-5
    assert _rel(e, single.outliers) < 1e-4
    assert changes == single.rho_changes
    assert len(history) == len(single.history) == 60
    # the reported residual is the whole C's (row sums over every rank's columns)
    torch.testing.assert_close(torch.tensor(history), torch.tensor(single.history),
                               rtol=1e-4, atol=1e-6)  # fmt: skip


@pytest.mark.distributed
def test_fp16x3_pca_and_label_draws_split(two):
    x, got = two
    for key, kw in (("fp16x3", dict(precision="fp16x3")),
                    ("pca_draws", dict(pca_rank=8, label_draws=3))):  # fmt: skip
        _same_on_every_rank(got, key)
        single = compute_anchor_scores(x, 4, **kw)
        coef, s, labels = got[0][key]
        assert _rel(coef, single.coef) < 1e-5, key
        assert torch.equal(labels, single.labels), key
        torch.testing.assert_close(s, single.scores, atol=1e-5, rtol=0)


@pytest.mark.distributed
def test_a_stop_on_one_rank_stops_every_rank(two):
    x, got = two
    single = solve_ssc_admm(x, scheduled=True, max_iter=7)  # the iterate after 7 iterations
    for g in got:
        its, converged, stopped, coef = g["stop"]
        assert (its, converged, stopped) == (7, False, True)
        assert _rel(coef, single.coef) < 1e-5


@pytest.mark.distributed
def test_auto_mode_makes_one_choice_on_every_rank(two):
    _, got = two
    for g in got:
        mode, solver, _ = g["auto"]
        assert (mode, solver) == ("blocked", "faithful")
    assert torch.equal(got[0]["auto"][2], got[1]["auto"][2])


@pytest.mark.distributed
def test_three_ranks_uneven_columns(tmp_path):
    x = tokens(40, 12, seed=5)  # 13, 13 and 14 columns
    got = _spawn(tmp_path, 3, x)
    single = compute_anchor_scores(x, 4)
    _same_on_every_rank(got, "default")
    g = got[0]["default"]
    assert _rel(g["coef"], single.coef) < 1e-5
    assert torch.equal(g["labels"], single.labels)
    torch.testing.assert_close(g["scores"], single.scores, atol=1e-5, rtol=0)


@given(n=st.integers(0, 300), world=st.integers(1, 40))
def test_column_ranges_tile_the_columns(n, world):
    ranges = [column_range(n, r, world) for r in range(world)]
    assert ranges[0][0] == 0 and ranges[-1][1] == n
    for (a, b), (c, _) in zip(ranges, ranges[1:], strict=False):
        assert b == c and a <= b
    sizes = [b - a for a, b in ranges]
    assert max(sizes) - min(sizes) <= 1


def test_split_needs_the_fast_solver_on_torch():
    import torch.distributed as dist

    if not dist.is_available():
        pytest.skip("torch built without distributed")
    with pytest.raises(ValueError, match="torch.distributed is not initialised"):
        solve_ssc_admm(tokens(10, 4), scheduled=True, process_group=object())
