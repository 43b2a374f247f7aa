"""benchmarks/bench_lockstep.py's prototype: the program's minimiser, certified, with the
outlier term active, from every point's nearest point."""

from __future__ import annotations

import torch

from benchmarks import bench_lockstep as bl
from benchmarks.bench_host_overhead import SYNC_OPS
from benchmarks.bench_ssc import video_tokens
from videoanchor.anchor import duality_gaps, reference_minimiser
from videoanchor.anchor.ssc import ssc_lambdas


def test_lockstep_reaches_the_certified_minimiser_with_outliers():
    x = video_tokens(2, 30, 48, seed=3, noise=0.05).double()
    x[7] += 0.8 * torch.randn(48, generator=torch.Generator().manual_seed(0))  # a corrupted token
    lam_e, lam_z, _, _ = ssc_lambdas(x, 800.0, 800.0)
    coef, status, iterations = bl.lockstep_workset(x, lam_e, lam_z, check_every=4)
    assert bool((status == bl.DONE).all()) and iterations < 200
    ref = reference_minimiser(x)
    assert ref.converged
    r = x.T - x.T @ ref.coef
    assert int((r.abs() > lam_e / lam_z).sum()) > 0  # the outlier term is active here
    gaps = duality_gaps(x, coef, lam_e, lam_z)
    assert float(gaps.gap.max()) < 1e-9 and gaps.affine < 1e-12 and gaps.diagonal == 0
    torch.testing.assert_close(coef, ref.coef, rtol=0, atol=1e-8)


def test_lockstep_from_a_start_reaches_the_same_minimiser():
    x = video_tokens(2, 30, 48, seed=3, noise=0.05).double()
    lam_e, lam_z, _, _ = ssc_lambdas(x, 800.0, 800.0)
    cold, status, cold_iterations = bl.lockstep_workset(x, lam_e, lam_z, check_every=4)
    assert bool((status == bl.DONE).all())
    gen = torch.Generator().manual_seed(1)
    # an approximation: the support perturbed, with three wrong entries per column (a start
    # must keep its support independent: the prototype has no rule for one that is not)
    extra = torch.zeros_like(cold).scatter_(0, torch.randint(0, 60, (3, 60), generator=gen), 0.05)
    noisy = cold + 0.05 * torch.randn(cold.shape, generator=gen, dtype=cold.dtype) * (cold != 0)
    noisy = noisy + extra
    negative = -cold.abs()  # no column sums to anything positive: every one from its nearest point
    for start in (cold, noisy, negative):
        coef, status, _ = bl.lockstep_workset(x, lam_e, lam_z, check_every=4, coef_init=start)
        assert bool((status == bl.DONE).all())
        gaps = duality_gaps(x, coef, lam_e, lam_z)
        assert float(gaps.gap.max()) < 1e-9 and gaps.affine < 1e-12 and gaps.diagonal == 0
        torch.testing.assert_close(coef, cold, rtol=0, atol=1e-8)
    exact = bl.lockstep_workset(x, lam_e, lam_z, check_every=4, coef_init=cold)[2]
    assert exact <= 8 < cold_iterations  # the minimiser as a start: one check, no steps to take


def test_lockstep_says_where_its_slots_run_out():
    x = video_tokens(2, 24, 64, seed=0).double()
    lam_e, lam_z, _, _ = ssc_lambdas(x, 800.0, 800.0)
    _, status, _ = bl.lockstep_workset(x, lam_e, lam_z, slots=3)
    assert bool((status == bl.FAILED).any())
    assert not bool((status == bl.RUNNING).any())


def test_bench_lockstep_quick_rows(tmp_path):
    data = bl.main(["--quick", "--out-dir", str(tmp_path)])
    import json

    rows = json.loads(data.read_text())["rows"]
    assert len(rows) == 1 and rows[0]["columns_certified"] == rows[0]["n"] == 48
    assert rows[0]["seconds_lockstep"] > 0 and rows[0]["seconds_fast"] > 0
    assert rows[0]["warm_columns_certified"] == 48 and rows[0]["seconds_warm"] > 0


def test_lockstep_reads_the_device_once_per_check():
    """No host read inside the iterations (each is a stall on a GPU): only the check of
    whether every column is done, once every ``check_every`` iterations."""
    x = video_tokens(2, 30, 48, seed=3, noise=0.05).double()
    lam_e, lam_z, _, _ = ssc_lambdas(x, 800.0, 800.0)

    def reads(max_iter):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            bl.lockstep_workset(x, lam_e, lam_z, max_iter=max_iter, check_every=8)
        # a read is the outermost of the nested operators that take a value to the host
        return sum(
            e.name in SYNC_OPS and (e.cpu_parent is None or e.cpu_parent.name not in SYNC_OPS)
            for e in prof.events()
        )

    assert reads(8) == 1 and reads(24) == 3


def test_compiled_iteration_is_one_graph_with_the_eager_answer(tmp_path, monkeypatch):
    """``compile=True`` runs the iteration through ``torch.compile`` with ``fullgraph``
    (a graph break would raise): the same iterations and answer as eagerly."""
    # Inductor's own cache, fresh: one written under another ATEN_CPU_CAPABILITY (AVX-512
    # kernels) was reused under avx2 and crashed the process (torch 2.13.0, seen here)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    torch._dynamo.reset()
    x = video_tokens(2, 20, 32, seed=5, noise=0.05).double()
    lam_e, lam_z, _, _ = ssc_lambdas(x, 800.0, 800.0)
    eager, status, iterations = bl.lockstep_workset(x, lam_e, lam_z, check_every=4)
    assert bool((status == bl.DONE).all())
    coef, status_c, iterations_c = bl.lockstep_workset(x, lam_e, lam_z, check_every=4, compile=True)
    assert iterations_c == iterations and torch.equal(status_c, status)
    torch.testing.assert_close(coef, eager, rtol=0, atol=1e-10)
