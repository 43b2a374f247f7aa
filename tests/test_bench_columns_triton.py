"""benchmarks/bench_columns_triton.py: the per-column Triton working sets (a prototype of the
GPU kernel issue 52's floor asks for) in Triton's interpreter against the Numba working
sets' certified minimiser, and compiled ahead of time for sm_90 (static)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import triton
import triton.language as tl
from hypothesis import given, settings
from hypothesis import strategies as st

from benchmarks import bench_columns_triton as bct
from benchmarks.common import objective, synthetic_tokens, video_tokens
from videoanchor.anchor.workset import _prepare, solve_ssc_workset

ROOT = Path(__file__).resolve().parents[1]


def test_video_like_tokens_reach_the_certified_minimiser():
    """Video-like tokens (no outlier entry at the minimiser): the same C as the Numba
    working sets to 1e-10, certified by the program's duality gap."""
    x = video_tokens(4, 10, 16, k=4, seed=0)
    ref = solve_ssc_workset(x.double())
    assert ref.converged and ref.residual < 1e-9
    got = bct.solve(x, slots=32, grow=8)
    assert got["converged"] and bool((got["status"] == bct.SOLVED).all())
    assert got["gap"] < 1e-9 and got["affine"] < 1e-12
    assert float((got["coef"] - ref.coef).abs().max()) < 1e-10
    assert float(got["coef"].diagonal().abs().max()) == 0.0
    assert int(got["steps"].max()) < 200  # (a cycling column would run to max_inner)


def test_supports_at_the_rank_reach_the_certified_minimiser():
    """More points than dimensions (N = 24, D = 12, two-dimensional subspaces): supports
    reach the inlier rows' rank and a variable can join and leave at once, which must not
    repeat forever (before the kept-out slots: a gap of 2.8e-8 and 648 steps)."""
    x = synthetic_tokens(24, 12, k=3, sub_dim=2, corrupt=0.1, seed=1)
    ref = solve_ssc_workset(x.double())
    got = bct.solve(x, slots=32, grow=8, max_inner=300)
    assert got["converged"] and got["gap"] < 1e-9
    assert float((got["coef"] - ref.coef).abs().max()) < 1e-9


def test_outlier_entries_are_solved_too():
    """With a small alpha_e the minimiser holds 8-19 outlier entries per column, which the
    program's slots hold beside the coefficients (K's Y, Y^T and I blocks): the objective
    of the Numba working sets' certified minimiser to 1e-12, C and E to 1e-7. The
    certificate built from C (duality_gaps) reads about 6.5e-8 for this answer, not 1e-9:
    a bound, loose here, on a gap the objectives show to be at rounding (docs/ssc.md)."""
    x = video_tokens(3, 8, 24, k=3, seed=2)
    ref = solve_ssc_workset(x.double(), alpha_e=10.0)
    held = (ref.outliers != 0).sum(dim=0)
    assert int(held.min()) >= 5  # the case exercises the outlier slots
    got = bct.solve(x, alpha_e=10.0, slots=32, grow=8, max_inner=300)
    assert got["converged"] and got["gap"] < 1e-6
    _, _, lam_e, lam_z = _prepare(x, 10.0, 800.0)
    want = objective(x, ref.coef, lam_e, lam_z)
    assert abs(objective(x, got["coef"], lam_e, lam_z) - want) <= 1e-12 * abs(want)
    assert float((got["coef"] - ref.coef).abs().max()) < 1e-7
    assert float((got["outliers"] - ref.outliers).abs().max()) < 1e-7


def test_kernel_writes_every_output_of_every_column():
    """One pass from NaN-poisoned outputs: every column's multiplier, status and step count
    is written, and slots that are not in the support come back zero."""
    x = video_tokens(2, 8, 12, k=2, seed=1).double()
    n, d = x.shape
    g = x @ x.T
    ids = torch.full((n, 16), -1, dtype=torch.int64)
    ids[:, 0] = (torch.arange(n) + 1) % n
    ids[:, 1] = (torch.arange(n) + 2) % n
    z = torch.zeros(n, 16, dtype=torch.float64)
    z[:, 0] = 1.0
    mu = torch.full((n,), float("nan"), dtype=torch.float64)
    status = torch.full((n,), -7, dtype=torch.int32)
    steps = torch.full((n,), -7, dtype=torch.int32)
    bct._columns_kernel[(n,)](g, x, ids, z, mu, status, steps, n, d, 800.0, 8.0,
                              800.0 * float(g.diagonal().max()), 1e-9, bct.RIDGE, 50, M=16)  # fmt: skip
    assert bool(torch.isfinite(mu).all()) and bool(torch.isfinite(z).all())
    assert set(status.tolist()) <= {bct.SOLVED, bct.STALLED} and bool((steps >= 1).all())
    assert bool((z[:, 2:] == 0).all())  # empty slots hold nothing
    assert torch.allclose(z.sum(dim=1), torch.ones(n, dtype=torch.float64))  # on 1^T c = 1


def test_bad_input_is_refused_saying_what_was_expected():
    with pytest.raises(ValueError, match="slots: expected a power of two"):
        bct.solve(torch.randn(6, 4), slots=24)
    with pytest.raises(ValueError, match="at least 2 points"):
        bct.solve(torch.randn(1, 4))
    bad = torch.randn(6, 4)
    bad[2, 1] = float("nan")
    with pytest.raises(ValueError, match="(?i)finite|nan"):
        bct.solve(bad)


def test_compiles_for_sm90_ahead_of_time():
    """Compiled for sm_90 with Triton's bundled ptxas (no GPU): it compiles, on CUDA cores
    (no MMA), within shared memory; its registers and spills are reported, not bounded
    (STATIC: 64 slots spill with 4 and 8 warps, docs/ssc.md)."""
    from videoanchor.kernels import aot

    reason = aot.unavailable_reason()
    if reason:
        pytest.skip(reason)
    env = dict(os.environ, TRITON_INTERPRET="0")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_columns_triton.py"), "--static", "90",
         "--slots", "32"], capture_output=True, text=True, env=env, cwd=str(ROOT), timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    assert row["kernel"] == "_columns_kernel" and row["cc"] == 90 and row["slots"] == 32
    assert row["mma"] == "none (FMA)" and 0 < row["shared_bytes"] <= row["shared_limit"]
    assert row["registers"] > 0 and row["spill_stores"] >= 0


def test_run_times_both_solvers_and_writes_the_result(tmp_path):
    """The GPU command's rows (here on the CPU, in the interpreter, at a tiny shape)."""
    path = bct.run(32, 12, 32, 8, tmp_path, clusters=3)
    rows = json.loads(path.read_text())["rows"]
    assert [r["solver"] for r in rows] == ["columns_triton", "fast"]
    assert rows[0]["converged"] and rows[0]["gap"] < 1e-9 and rows[0]["passes"] >= 1
    assert all(r["seconds"] > 0 and r["n"] == 32 and r["d"] == 12 for r in rows)


@triton.jit
def _updates_kernel(h_ptr, ops_ptr, out_ptr, n_ops, ridge, M: tl.constexpr):
    """Applies ``ops`` (slot + 1: join; -(slot + 1): leave) to an empty support of the
    system ``h`` and stores the inverse kept by bct._join / bct._leave."""
    offs = tl.arange(0, M)
    H = tl.load(h_ptr + offs[:, None] * M + offs[None, :])
    Hinv = tl.zeros([M, M], dtype=tl.float64)
    F = offs < 0
    for k in range(n_ops):
        op = tl.load(ops_ptr + k)
        if op > 0:
            Hinv = bct._join(Hinv, H, F, op - 1, offs, ridge)
            F = F | (offs == op - 1)
        else:
            Hinv = bct._leave(Hinv, -op - 1, offs)
            F = F & (offs != -op - 1)
    tl.store(out_ptr + offs[:, None] * M + offs[None, :], Hinv)


@settings(max_examples=25, deadline=None)
@given(m=st.sampled_from([4, 8, 16]), seed=st.integers(0, 2**31 - 1), data=st.data())
def test_bordering_and_downdates_keep_the_supports_inverse(m, seed, data):
    """Any sequence of joins and leaves: the kept inverse is the support's system inverted
    (float64), zero off the support."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(m, m + 3, dtype=torch.float64, generator=g)
    h = a @ a.T + 0.1 * torch.eye(m, dtype=torch.float64)  # SPD, as lambda_z K + gamma a a^T
    ops, support = [], []
    for _ in range(data.draw(st.integers(1, 3 * m))):
        free = [s for s in range(m) if s not in support]
        if support and (not free or data.draw(st.booleans())):
            s = data.draw(st.sampled_from(support))
            support.remove(s)
            ops.append(-(s + 1))
        else:
            s = data.draw(st.sampled_from(free))
            support.append(s)
            ops.append(s + 1)
    out = torch.full((m, m), float("nan"), dtype=torch.float64)
    _updates_kernel[(1,)](h, torch.tensor(ops, dtype=torch.int64), out, len(ops), 0.0, M=m)
    want = torch.zeros(m, m, dtype=torch.float64)
    if support:
        idx = torch.tensor(sorted(support))
        want[idx[:, None], idx[None, :]] = torch.linalg.inv(h[idx][:, idx])
    assert torch.allclose(out, want, rtol=1e-8, atol=1e-8 * float(want.abs().max() + 1))
