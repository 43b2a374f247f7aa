"""benchmarks/bench_lockstep.py's prototype: the program's minimiser, certified, with the
outlier term active, from every point's nearest point."""

from __future__ import annotations

import torch

from benchmarks import bench_lockstep as bl
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
