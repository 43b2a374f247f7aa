"""The working sets by column blocks (issue 99, route "workset_blocks"): blocked mode's
default on the CPU. Its answer is the dense working sets' minimiser (C within 1e-6,
certified), the certificate adds the candidates the neighbours missed, no N x N buffer is
held, make_plan picks it past EXACT_MAX_TOKENS (the authors' iteration with
solver='faithful'), and 2 gloo processes share its batches and return one process's answer."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from gloo_support import join_gloo, leave
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

from videoanchor.anchor import compute_anchor_scores
from videoanchor.anchor import plan as plan_mod
from videoanchor.anchor.collective import OTHER_RANK_FAILED
from videoanchor.anchor.options import SSCOptions
from videoanchor.anchor.plan import EXACT_MAX_TOKENS, make_plan
from videoanchor.anchor.program import duality_gaps
from videoanchor.anchor.solvers import workset_blocks
from videoanchor.anchor.solvers.workset import solve_ssc_workset
from videoanchor.anchor.solvers.workset_blocks import run_workset_blocks

CPU = torch.device("cpu")


def _video(frames: int, patches: int, d: int, *, seed: int = 0) -> torch.Tensor:
    from benchmarks.common import video_tokens

    return video_tokens(frames, patches, d, seed=seed).to(torch.float64)


def _plan(x: torch.Tensor, block: int):
    opts = SSCOptions(
        mode="blocked", solver="workset", block_columns=block, dtype=x.dtype
    ).checked()
    return make_plan(x.shape, CPU, opts)


@pytest.mark.parametrize("frames,patches,d,block,neighbours", [
    (6, 40, 24, 32, 4),
    (8, 60, 48, 64, 8),
    (5, 97, 64, 50, 12),
], ids=["240x24", "480x48", "485x64-odd-blocks"])  # fmt: skip
def test_the_blocks_give_the_dense_working_sets_minimiser(frames, patches, d, block, neighbours):
    x = _video(frames, patches, d, seed=frames)
    dense = solve_ssc_workset(x)
    plan = _plan(x, block)
    assert plan.route == "workset_blocks" and plan.block_columns == block
    res = run_workset_blocks(x, plan, alpha_e=800.0, alpha_z=800.0, neighbours=neighbours)
    assert res.coef.is_sparse and res.converged
    c = res.coef.to_dense()
    assert float((c - dense.coef).abs().max()) < 1e-6
    assert float(c.diagonal().abs().max()) == 0.0
    assert (res.lambda_e, res.lambda_z) == pytest.approx((dense.lambda_e, dense.lambda_z),
                                                         rel=1e-12)  # fmt: skip
    # the certificate, by blocks, and the dense one agree
    assert res.residual <= 1e-8
    full = duality_gaps(x, c, res.lambda_e, res.lambda_z)
    assert full.max_gap <= 1e-8
    assert res.residual == pytest.approx(full.max_gap, rel=1e-3, abs=1e-12)
    assert float((res.outliers - dense.outliers).abs().max()) < 1e-6


def test_the_certificate_adds_what_the_neighbours_missed():
    """One neighbour per column: the supports (tens of coefficients) are not among the
    candidates; the full dictionary's multipliers bring them in, round after round."""
    x = _video(6, 50, 32, seed=3)
    dense = solve_ssc_workset(x)
    assert int((dense.coef != 0).sum(dim=0).max()) > 8  # (supports the start cannot hold)
    res = run_workset_blocks(x, _plan(x, 25), alpha_e=800.0, alpha_z=800.0, neighbours=1)
    assert res.history["joined"] > 0 and res.iterations > 1
    assert float((res.coef.to_dense() - dense.coef).abs().max()) < 1e-6
    assert res.converged and res.residual <= 1e-8


@settings(max_examples=25, deadline=None)
@given(n=st.integers(3, 60), d=st.integers(1, 9), k=st.integers(1, 8), close=st.integers(0, 8),
       rows=st.integers(1, 70), seed=st.integers(0, 2**16))  # fmt: skip
def test_the_neighbours_pass_gives_each_tokens_nearest_by_distance(n, d, k, close, rows, seed):
    """The seeds' nearest tokens from the neighbours' strips: each token's ``close`` others
    of smallest distance, nearest first, never itself, against torch.cdist on every shape
    and strip height (ties cannot occur: continuous draws)."""
    k, close = min(k, n - 1), min(close, n - 1)
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    nbr, row_max, nearest = workset_blocks._neighbours(x, k, rows, close)
    dist = torch.cdist(x, x)
    dist.fill_diagonal_(float("inf"))
    assert nearest.shape == (n, close)
    want = dist.topk(close, dim=1, largest=False)
    assert torch.equal(nearest, want.indices)
    near = (x @ x.T).abs().fill_diagonal_(-1.0)
    assert torch.equal(nbr, near.topk(k, dim=1).indices)
    torch.testing.assert_close(row_max, near.amax(dim=1).clamp_min(0.0), rtol=1e-12, atol=0)


def test_a_columns_seeds_are_the_supports_of_its_nearest_solved_columns(monkeypatch):
    """Column 9's nearest tokens are 5, 3, 7 and 2; of these 5, 7 and 2 are solved (3 is
    not): its dictionary is its neighbours, then 5 and its support, 7 and its support, each
    token once and never 9, up to SEEDS columns and SEED_TOKENS tokens."""
    nearest = torch.tensor([[5, 3, 7, 2]]).expand(10, 4)
    seeds = workset_blocks._Seeds(10, nearest)
    seeds.support[5], seeds.support[7], seeds.support[2] = [1, 9], [4, 6, 1], [8]
    near = np.array([4, 0])
    monkeypatch.setattr(workset_blocks, "SEEDS", 2)
    assert list(seeds.first(9, near)) == [4, 0, 1, 5, 6, 7]
    monkeypatch.setattr(workset_blocks, "SEEDS", 3)
    assert list(seeds.first(9, near)) == [4, 0, 1, 5, 6, 7, 8, 2]
    monkeypatch.setattr(workset_blocks, "SEED_TOKENS", 3)
    assert list(seeds.first(9, near)) == [4, 0, 1, 5, 6]
    assert list(workset_blocks._Seeds(10, nearest).first(9, near)) == [4, 0]


def test_the_seeds_keep_the_minimiser_and_save_rounds():
    """On a video's tokens (near copies frame to frame) the seeded columns end at the same
    certified minimiser as unseeded ones with fewer tokens joined by the certificate."""
    x = _video(12, 40, 32, seed=4)
    plan = _plan(x, 40)
    plain = run_workset_blocks(x, plan, alpha_e=800.0, alpha_z=800.0, seed=False)
    seeded = run_workset_blocks(x, plan, alpha_e=800.0, alpha_z=800.0)
    assert plain.converged and seeded.converged
    assert plain.residual <= 1e-8 and seeded.residual <= 1e-8
    assert float((plain.coef.to_dense() - seeded.coef.to_dense()).abs().max()) < 1e-6
    assert seeded.history["joined"] < 0.8 * plain.history["joined"], (
        seeded.history["joined"], plain.history["joined"])  # fmt: skip


def test_compute_anchor_scores_by_blocks_gives_the_exact_modes_labels_and_scores(monkeypatch):
    """The same C, then the same default share (steady) from the sparse affinity: float64
    here (in float32 exact mode's dense spectral step rounds its affinity to float32, the
    blocks' sparse one does not: the weight in the ramp moved 1e-3 on this set)."""
    monkeypatch.setattr(workset_blocks, "NEIGHBOURS", 6)
    x = _video(8, 48, 40, seed=5)
    exact = compute_anchor_scores(x, 6, mode="exact")
    blocks = compute_anchor_scores(x, 6, mode="blocked", block_columns=48, solver="workset")
    assert blocks.solver == "workset" and blocks.coef.is_sparse
    assert blocks.residual <= 1e-8 and blocks.gap <= 1e-8
    assert torch.equal(blocks.labels, exact.labels)
    assert blocks.cluster_share == exact.cluster_share == "steady"
    assert 0.0 < exact.share_weight < 1.0  # (the soft share's path runs too)
    assert blocks.share_weight == pytest.approx(exact.share_weight, rel=1e-6)
    torch.testing.assert_close(blocks.scores, exact.scores, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("eigen_solver", ["subspace", "chebyshev"])
def test_the_blocks_steady_share_runs_the_eigen_solver_asked(monkeypatch, eigen_solver):
    """eigen_solver= reaches the sparse affinity's steady share (it ran ARPACK whatever was
    asked): the block solvers give the same labels and share as ARPACK's, without it."""
    from videoanchor.anchor import clustering

    monkeypatch.setattr(workset_blocks, "NEIGHBOURS", 6)
    x = _video(8, 48, 40, seed=5)
    kw = dict(mode="blocked", block_columns=48, solver="workset", dtype=torch.float64)
    arpack = compute_anchor_scores(x, 6, eigen_solver="arpack", **kw)
    calls = []
    real = clustering._top_eigvecs_arpack
    monkeypatch.setattr(clustering, "_top_eigvecs_arpack",
                        lambda *a, **k: calls.append(1) or real(*a, **k))  # fmt: skip
    asked = compute_anchor_scores(x, 6, eigen_solver=eigen_solver, **kw)
    assert not calls
    assert asked.cluster_share == arpack.cluster_share == "steady"
    assert torch.equal(asked.labels, arpack.labels)
    # (the block solvers stop at a residual of 1e-7: the eigengap, and the ramp, move 3e-5)
    assert asked.share_weight == pytest.approx(arpack.share_weight, abs=1e-4)
    torch.testing.assert_close(asked.scores, arpack.scores, rtol=1e-4, atol=1e-5)
    compute_anchor_scores(x, 6, eigen_solver="arpack", **kw)
    assert calls  # (the spy sees ARPACK where it is asked)
    w = clustering.sparse_ssc_affinity(asked.coef)
    with pytest.raises(ValueError, match="eigen_solver: expected .* got 'eigh'"):
        clustering.sparse_steady_shares(w, 6, eigen_solver="eigh")


def test_make_plan_runs_the_blocks_past_the_exact_limit():
    """Past the exact limit the default runs the blocks on a CPU (issue 99: the certified
    working sets at any N); so does ``solver="workset"``, on CUDA too; the default on CUDA
    (its path not yet run on a GPU), ``mode="blocked"`` asked for, ``solver="faithful"`` and
    an iteration's option keep the authors' iteration."""
    n, d = EXACT_MAX_TOKENS + 1, 512
    auto = make_plan((n, d), CPU, SSCOptions().checked(), check_memory_first=False)
    assert (auto.mode, auto.solver, auto.route) == ("blocked", "workset", "workset_blocks")
    cuda = torch.device("cuda")
    on_gpu = make_plan((n, d), cuda, SSCOptions().checked(), check_memory_first=False)
    assert (on_gpu.solver, on_gpu.route) == ("faithful", "blocked")
    asked_gpu = make_plan((n, d), cuda, SSCOptions(solver="workset").checked(),
                          check_memory_first=False)  # fmt: skip
    assert asked_gpu.route == "workset_blocks"
    blocked = make_plan((n, d), CPU, SSCOptions(mode="blocked").checked(),
                        check_memory_first=False)  # fmt: skip
    assert (blocked.solver, blocked.route) == ("faithful", "blocked")
    asked = make_plan((n, d), CPU, SSCOptions(solver="workset").checked(),
                      check_memory_first=False)  # fmt: skip
    assert (asked.mode, asked.solver, asked.route) == ("blocked", "workset", "workset_blocks")
    assert plan_mod.workset_blocks_bytes(n, d, asked.block_columns) < 2**30
    faithful = make_plan((n, d), CPU, SSCOptions(solver="faithful").checked(),
                         check_memory_first=False)  # fmt: skip
    assert (faithful.mode, faithful.solver, faithful.route) == ("blocked", "faithful", "blocked")
    # an iteration's option keeps the authors' iteration; below the limit, the dense sets
    rho = make_plan((n, d), CPU, SSCOptions(rho=2.0).checked(), check_memory_first=False)
    assert rho.route == "blocked"
    small = make_plan((EXACT_MAX_TOKENS, d), CPU, SSCOptions(solver="workset").checked(),
                      check_memory_first=False)  # fmt: skip
    assert small.route == "workset_then_fast"
    assert "working sets by blocks" in asked.describe(SSCOptions().checked())


def test_bad_input_says_what_it_expected():
    x = _video(2, 20, 16, seed=1)
    plan = _plan(x, 8)
    with pytest.raises(ValueError, match="neighbours: expected a positive integer, got 0"):
        run_workset_blocks(x, plan, alpha_e=800.0, alpha_z=800.0, neighbours=0)
    with pytest.raises(ValueError, match=r"affine=True, outliers=True\), got affine=False"):
        workset_blocks.run(x, plan, SSCOptions().checked(), affine=False, outliers=True)
    with pytest.raises(ValueError, match="at least 2 points, got N = 1"):
        run_workset_blocks(x[:1], plan, alpha_e=800.0, alpha_z=800.0)


class _Largest(TorchDispatchMode):
    """The most elements of any tensor a torch op makes while it is active."""

    def __init__(self):
        super().__init__()
        self.most = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.layout == torch.strided:
                self.most = max(self.most, t.numel())
        return out


_RSS_CHILD = """
import json, os, sys, torch
sys.path[:0] = [sys.argv[1], os.path.dirname(sys.argv[1])]  # the tests, the repository
import test_long_route as t
from benchmarks.common import peak_rss_growth
from videoanchor.anchor.solvers.workset_blocks import run_workset_blocks
x = t._video(20, 100, 32, seed=7)
run_workset_blocks(x[:300], t._plan(x[:300], 8), alpha_e=800.0, alpha_z=800.0, neighbours=16)
res, grew = peak_rss_growth(lambda: run_workset_blocks(
    x, t._plan(x, 8), alpha_e=800.0, alpha_z=800.0, neighbours=16))
print(json.dumps(dict(grew=grew, widest=res.history["widest"], nnz=res.coef._nnz(),
                      threads=torch.get_num_threads(), ok=res.converged and res.residual <= 1e-8)))
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="Linux's peak RSS reset")
def test_no_n_by_n_buffer_is_held():
    """N = 2000: no torch tensor of the blocks reaches a quarter of N x N elements, and (in a
    fresh process, glibc's mmap threshold fixed, so that a freed buffer leaves the resident
    set rather than the heap's high-water mark) the resident set grows by less than the
    plan's estimate (workset_blocks_bytes) for the widest local dictionary the run reached
    (~100 tokens here, D = 32) and the sparse C, which it leaves out."""
    import json
    import subprocess
    import sys

    x = _video(20, 100, 32, seed=7)
    n = x.shape[0]
    largest = _Largest()
    with largest:
        res = run_workset_blocks(x, _plan(x, 8), alpha_e=800.0, alpha_z=800.0, neighbours=16)
    assert res.converged and res.residual <= 1e-8
    assert 0 < largest.most < n * n // 4, largest.most
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}
    here = os.path.dirname(os.path.abspath(__file__))
    got = json.loads(subprocess.run([sys.executable, "-c", _RSS_CHILD, here], env=env,
                                    capture_output=True, text=True, check=True,
                                    timeout=600).stdout.strip().splitlines()[-1])  # fmt: skip
    assert got["ok"] and got["nnz"] == res.coef._nnz()
    # each entry of C: its two indices and value, held three times at the end (the batches'
    # pieces, joined, coalesced)
    bound = plan_mod.workset_blocks_bytes(n, x.shape[1], 8, got["threads"],
                                          local=got["widest"]) + 3 * 24 * got["nnz"]  # fmt: skip
    assert got["grew"] < bound, (
        f"peak RSS grew {got['grew'] / 2**20:.1f} MiB, over {bound / 2**20:.1f} MiB"
    )


def _failing_block(*args, **kwargs):
    raise RuntimeError("a batch failed on rank 1")


def _ranks_worker(rank, world, store, x, out):
    import torch.distributed as dist

    join_gloo(rank, world, store)
    try:
        group = dist.group.WORLD
        workset_blocks.NEIGHBOURS = 6  # (this process's module: the parent's monkeypatch's)
        opts = SSCOptions(mode="blocked", solver="workset", block_columns=8,
                          dtype=x.dtype).checked()  # fmt: skip
        plan = make_plan(x.shape, CPU, opts, process_group=group)
        res = run_workset_blocks(x, plan, alpha_e=800.0, alpha_z=800.0, seed=False)
        seeded = run_workset_blocks(x, plan, alpha_e=800.0, alpha_z=800.0)
        scores = compute_anchor_scores(x, 4, mode="blocked", block_columns=8, solver="workset",
                                       process_group=group)  # fmt: skip
        # a rank that fails in its batches: every rank raises, none is left waiting
        if rank == 1:
            workset_blocks._stream = _failing_block
        try:
            run_workset_blocks(x, plan, alpha_e=800.0, alpha_z=800.0)
            failed = None
        except RuntimeError as exc:
            failed = str(exc)
        torch.save({"coef": res.coef, "outliers": res.outliers, "residual": res.residual,
                    "gap": res.gap, "iterations": res.iterations, "converged": res.converged,
                    "history": res.history, "world_size": res.world_size,
                    "seeded": seeded.coef.to_dense(), "seeded_gap": seeded.residual,
                    "scores_coef": scores.coef, "labels": scores.labels, "scores": scores.scores,
                    "failed": failed}, os.path.join(out, f"rank{rank}.pt"))  # fmt: skip
    finally:
        dist.destroy_process_group()
    leave()


@pytest.mark.distributed
def test_two_gloo_processes_share_the_batches_and_equal_one(tmp_path, monkeypatch):
    """N = 50 in batches of 8 (rank 0 solves batches 0, 2, 4 and 6, 26 columns; rank 1 the
    other 24): each column is one rank's, and every rank returns the same answer. A rank's
    columns run beside its own alone and are seeded by its own answers (unseeded too, the
    products' widths differ from one process's): the same certified minimiser (C and E
    within 1e-8), the same labels, the scores within 1e-6; a rank that fails makes every
    rank raise."""
    monkeypatch.setattr(workset_blocks, "NEIGHBOURS", 6)
    x = _video(5, 10, 16, seed=2)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one = run_workset_blocks(x, _plan(x, 8), alpha_e=800.0, alpha_z=800.0, seed=False)
        seeded = run_workset_blocks(x, _plan(x, 8), alpha_e=800.0, alpha_z=800.0)
        scores = compute_anchor_scores(x, 4, mode="blocked", block_columns=8, solver="workset")
    finally:
        torch.set_num_threads(threads)
    assert one.converged and one.history["joined"] > 0 and one.history["columns"] == 50
    mp.spawn(_ranks_worker, args=(2, str(tmp_path / "store"), x, str(tmp_path)), nprocs=2)
    got = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert [g["history"]["columns"] for g in got] == [26, 24]
    for g in got:
        assert g["world_size"] == 2
        torch.testing.assert_close(g["coef"].to_dense(), one.coef.to_dense(), rtol=0, atol=1e-8)
        torch.testing.assert_close(g["outliers"], one.outliers, rtol=0, atol=1e-8)
        assert g["converged"] and g["residual"] <= 1e-8 and g["iterations"] >= 1
        assert g["seeded_gap"] <= 1e-8 and seeded.residual <= 1e-8
        torch.testing.assert_close(g["seeded"], seeded.coef.to_dense(), rtol=0, atol=1e-8)
        torch.testing.assert_close(g["scores_coef"].to_dense(), scores.coef.to_dense(),
                                   rtol=0, atol=1e-8)  # fmt: skip
        assert torch.equal(g["labels"], scores.labels)
        torch.testing.assert_close(g["scores"], scores.scores, rtol=0, atol=1e-6)
    for k in ("seeded", "outliers", "labels", "scores"):  # (every rank: the same answer)
        assert torch.equal(got[0][k], got[1][k])
    assert torch.equal(got[0]["coef"].to_dense(), got[1]["coef"].to_dense())
    assert got[1]["failed"] == "a batch failed on rank 1"
    assert got[0]["failed"] == OTHER_RANK_FAILED


def test_the_blocks_report_progress():
    """The blocks report to a progress option (a long video's call takes minutes): a plain
    callable gets each certificate round and the largest gap of the columns that ran it
    (the round number counted from the last block's end), the last round certified; an
    ``SSCProgress`` keeps the run's summary (converged, rounds, gap) and counts each batch's
    worth of columns ended as a block; a time budget is reported, not obeyed (the answer
    stays the certified minimiser)."""
    from videoanchor.anchor.progress import SSCProgress

    x = _video(6, 40, 24, seed=3)
    plan = _plan(x, 64)
    seen = []
    res = run_workset_blocks(x, plan, alpha_e=800.0, alpha_z=800.0,
                             progress=lambda it, r: seen.append((it, r)))  # fmt: skip
    assert res.converged and seen and all(it >= 1 for it, _ in seen)
    firsts = [i for i, (it, _) in enumerate(seen) if it == 1]
    assert len(firsts) == -(-x.shape[0] // 64)  # one first round per batch's worth
    assert seen[-1][1] <= 1e-8 and res.residual <= 1e-8
    assert max(r for _, r in seen) > 1e-8  # (the rounds before: columns still violated)
    rep = SSCProgress(enabled=False, time_budget=1e-6)
    again = run_workset_blocks(x, plan, alpha_e=800.0, alpha_z=800.0, progress=rep)
    assert again.converged and torch.equal(again.coef.to_dense(), res.coef.to_dense())
    run = rep.runs[-1]
    assert run.converged and not run.stopped_by_budget and run.iterations == res.iterations
    assert rep.block == len(firsts)


@settings(max_examples=30, deadline=None)
@given(n=st.integers(4, 600), d=st.integers(1, 1100), m=st.integers(1, 9),
       scale=st.sampled_from([1e-3, 1.0, 30.0]), far=st.sampled_from([1.0, 50.0]),
       seed=st.integers(0, 2**16))  # fmt: skip
def test_the_float32_screen_is_within_its_error_bound(n, d, m, scale, far, seed):
    """The certificate's float32 product (program.block_gaps' ``screen``) reads every
    multiplier ``|x_j^T u_i + nu_i| - 1`` within ``screen_error`` of the float64 one, on the
    shapes and scales hypothesis draws (a token far from the others; ``nu_i`` read from the
    product too)."""
    from videoanchor.anchor.program import screen_error

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64) * scale
    x[3] *= far
    u = torch.randn(d, m, generator=g, dtype=torch.float64) / scale
    nu_at = torch.randint(n, (m,), generator=g)  # a support token per column

    def viol(prod):
        nu = 1.0 - prod[nu_at, torch.arange(m)].double()
        return (prod + nu.to(prod.dtype)).abs() - 1.0

    exact = viol(x @ u)
    screened = viol(x.float() @ u.float()).double()
    bound = screen_error(d, float(x.norm(dim=1).max()), u.norm(dim=0))
    assert bool(((screened - exact).abs() <= bound).all())


def test_the_float32_screen_leaves_the_minimiser_and_its_certificate():
    """The rounds screened in float32 give the minimiser the float64 rounds give (the same
    joiners or others past the bound: C within the kernel's tolerance) and certify it in
    float64; where torch may reduce float32 products' precision nothing is screened."""
    x = _video(8, 60, 48, seed=3)
    plan = _plan(x, 64)
    screened = run_workset_blocks(x, plan, alpha_e=800.0, alpha_z=800.0, neighbours=8)
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("medium")
        plain = run_workset_blocks(x, plan, alpha_e=800.0, alpha_z=800.0, neighbours=8)
    finally:
        torch.set_float32_matmul_precision(before)
    assert screened.history["screened"] > 0 and screened.history["exact"] > 0
    assert plain.history["screened"] == 0 and plain.history["exact"] > 0
    assert screened.converged and plain.converged
    assert screened.residual < 1e-9 and plain.residual < 1e-9
    diff = (screened.coef.to_dense() - plain.coef.to_dense()).abs().max()
    assert float(diff) < 1e-6
    gaps = duality_gaps(x, screened.coef.to_dense(), screened.lambda_e, screened.lambda_z)
    assert gaps.max_gap < 1e-8
