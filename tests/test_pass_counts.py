"""Issue 90 step 2's counts (benchmarks/bench_pass_counts.py): the pass rule's numbers and the
kernel's variants (``_workset_kernel.variant_kernel``) on a tiny corrupted video-like set.
The CPU's rule with the counts recorded computes the default kernel's answer bit for bit;
the other rules reach the same minimiser; the per-pass records agree with each column's own
passes; every violating outlier entry joins at once."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from benchmarks import bench_pass_counts as bpc
from videoanchor.anchor.program import column_gaps
from videoanchor.anchor.solvers import _workset_kernel as k
from videoanchor.anchor.solvers import workset

pytestmark = pytest.mark.usefixtures("one_thread")

# 60 tokens of D = 96, 2 of them corrupted on 50% of their entries (~35 outlier entries each:
# many times GROW, so that a rule that counted them in ``grow`` would need passes for them)
FRAMES, PER_FRAME, D, GROW = 4, 15, 96, 3
CORRUPT = {"tokens": 2, "share": 0.5, "scale": 5.0}


@pytest.fixture(scope="module")
def tiny():
    x, bad = bpc.tokens(FRAMES, PER_FRAME, D, corrupt=CORRUPT, seed=2)
    return x, bad


def _default(x, grow):
    """The default kernel (run_columns) on ``x``: C, E, status, passes (numpy)."""
    x64, G, lam_e, lam_z = workset._prepare(x, 800.0, 800.0)
    n, d = x64.shape
    out = workset._columns(x64, lam_e, lam_z, G, tol=bpc.TOL, grow=grow, cap=n + d,
                           max_passes=bpc.MAX_PASSES, threads=1)  # fmt: skip
    return [a.numpy() for a in out[:4]]


@pytest.mark.parametrize("threads", [1, 2])
def test_the_cpus_rule_with_counts_is_the_default_kernel_bit_for_bit(tiny, threads):
    x, bad = tiny
    want = _default(x, GROW)
    res = bpc.run_rule(x, *workset._grows(GROW), threads=threads)
    for name, a in zip(("C", "E", "status", "passes"), want, strict=True):
        assert np.array_equal(res[name], a), name
    assert (res["status"] == k.SOLVED).all()
    assert all((res["E"][:, i] != 0).sum() > 3 * GROW for i in bad), "the set lost its point"


def test_the_records_agree_with_each_columns_passes(tiny):
    """Column by column (a fresh record each): the passes with a support recorded are the
    column's passes, the last one's support is its answer's; their sums are the whole call's
    record, and the row's counts add up."""
    x, bad = tiny
    whole = bpc.run_rule(x, GROW, GROW << 8)
    n, d = x.shape
    kernel = k.variant_kernel(PASS_SUPPORTS=True)
    x64, gram, lam_e, lam_z = workset._prepare(x, 800.0, 800.0)
    G, YT = gram.numpy(), x64.numpy()
    Y = np.ascontiguousarray(YT.T)
    ptr, var, val = workset._seeds(x64, gram, lam_e, lam_z)
    C, E = np.zeros((n, n)), np.zeros((d, n))  # (the kernel's contract: zero on entry)
    status, passes = np.full(n, -1, dtype=np.int64), np.zeros(n, dtype=np.int64)
    gamma = lam_z * float(np.diagonal(G).max())
    sums, most = np.zeros((bpc.MAX_PASSES, 2)), np.zeros((bpc.MAX_PASSES, 2))
    for i in range(n):
        s = k.scratch(n, d, n + d, n - 1, GROW, bpc.MAX_PASSES)
        kernel(np.array([i]), 0, 1, G, YT, Y, ptr, var, val, lam_z, lam_e, bpc.TOL, GROW,
               GROW << 8, n + d, n - 1, bpc.MAX_PASSES, bpc.MAX_INNER, float("inf"), C, E,
               status, passes, np.zeros(n), np.array([0, n + 1]), gamma, k.RIDGE, *s)  # fmt: skip
        rec = s[-1][2:].reshape(-1, 4)
        p = passes[i]
        assert (rec[:p, 0] >= 1).all() and not rec[p:].any(), i
        assert (rec[:p, 2:] >= rec[:p, :2]).all(), i  # the set holds the support
        assert (rec[: p - 1, 2:].sum(axis=1) > rec[: p - 1, :2].sum(axis=1)).all(), i  # joiners
        # the last pass: no joiner, the support is the answer's
        assert list(rec[p - 1]) == [(C[:, i] != 0).sum(), (E[:, i] != 0).sum()] * 2, i
        sums += rec[:, :2]
        most = np.maximum(most, rec[:, 2:])
    assert np.array_equal(C, whole["C"]) and np.array_equal(passes, whole["passes"])
    last = passes.max()
    assert not sums[last:].any()
    for j, key in enumerate(("nnz_c", "nnz_e")):
        assert np.array_equal(sums[:last, j], whole[key]), key
    for j, key in enumerate(("set_c", "set_e")):
        assert np.array_equal(most[:last, j], whole[key]), key
    row = bpc.counts(whole, bad)
    assert sum(row["active_per_pass"]) == row["sum_active"] == passes.sum()
    assert row["active_per_pass"][0] == n and row["passes_call"] == len(row["active_per_pass"])
    assert row["flops"] == row["flops_gather"] + row["flops_gemm"] == sum(row["flops_per_pass"])
    assert row["flops_gemm"] == 2 * n * d * passes.sum()
    assert 0 < row["flops_fp64"] < row["flops"] and row["flops_screen"] > 0


@pytest.mark.parametrize(("grow_max", "slots"),
                         [(GROW, (0, 0)), (GROW << 8, (0, 0)), (GROW << 8, (8, 24))],
                         ids=["b", "c", "d"])  # fmt: skip
def test_every_rule_reaches_the_same_minimiser_with_the_outlier_entries_at_once(tiny, grow_max,
                                                                                slots):  # fmt: skip
    """Rules b, c and d (b: GROW every pass; c growing geometrically, d too within the slots)
    solve every column to the default's minimiser; in each, a corrupted column's ~35 outlier
    entries join its working set in its first pass, outside ``grow``."""
    x, bad = tiny
    C0 = _default(x, GROW)[0]
    res = bpc.run_rule(x, GROW, grow_max, slots)
    if slots[0]:  # the joiners fit the level's slots (a support that fills them: one joins)
        fc = (C0 != 0).sum(axis=0).max()
        assert res["set_c"].max() <= max(slots[1], fc + 1), res["set_c"]
        assert res["set_c"].max() > slots[0], "the set does not reach the wide level"
    assert (res["status"] == k.SOLVED).all()
    # the same minimiser: each column certified, the same objective and C
    x64, _, lam_e, lam_z = workset._prepare(x, 800.0, 800.0)
    gaps = [column_gaps(x64.T, torch.from_numpy(c), lam_e, lam_z) for c in (C0, res["C"])]
    assert max(float(g.gap.max()) for g in gaps) < 1e-9
    assert float(((gaps[1].primal - gaps[0].primal) / gaps[0].primal).abs().max()) < 1e-12
    assert np.abs(res["C"] - C0).max() < 1e-8
    assert res["set_e"][0] > 3 * GROW, res["set_e"]  # (the first pass's grow: GROW)


def test_variant_kernel_refuses_what_it_does_not_know():
    with pytest.raises(ValueError, match="booleans"):
        k.variant_kernel(PASS_SUPPORTS=1)
    with pytest.raises(ValueError, match="booleans"):
        k.variant_kernel(OUTLIERS=False)
    with pytest.raises(ValueError, match="booleans"):
        k.variant_kernel(SLOT_BOUND=-1)
