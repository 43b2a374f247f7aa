"""The shared SSC-ADMM iteration (anchor/solvers/admm_steps.py): backend kernels against the
array-API forms, and the one per-iteration hook (progress) in every solver."""

import numpy as np
import pytest
import torch

from videoanchor.anchor import solve_ssc_admm, solve_ssc_blocked
from videoanchor.anchor.solvers import admm_steps
from videoanchor.anchor.solvers.admm import TorchKernels
from videoanchor.anchor.solvers.admm_cupy import solve_ssc_admm_cupy
from videoanchor.anchor.solvers.equality import solve_ssc_equality


def _points(n, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64) + 0.3
    x[2, 1] += 6.0  # a gross error, so that E is exercised
    return x


@pytest.mark.parametrize("start,stop", [(0, 13), (4, 9)], ids=["whole", "block"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_torch_shrink_equals_the_array_api_form(start, stop, dtype):
    """The in-place torch C-step gives the bits of the array-API C-step (numpy too)."""
    g = torch.Generator().manual_seed(1)
    n, nb = 13, stop - start
    t = torch.randn(n, nb, generator=g, dtype=dtype) * 0.01
    lam = torch.randn(n, nb, generator=g, dtype=dtype) * 0.01
    thr = 1 / 300
    import array_api_compat

    xp_t = array_api_compat.array_namespace(t)
    diag = admm_steps.Diagonal(xp_t, "cpu", start, stop)
    fast = TorchKernels(t.device).shrink(xp_t, t.clone(), lam.clone(), thr, diag)
    plain = admm_steps.Kernels().shrink(xp_t, t.clone(), lam.clone(), thr, diag)
    xp_n = array_api_compat.array_namespace(t.numpy())
    on_numpy = admm_steps.Kernels().shrink(
        xp_n,
        t.numpy().copy(),
        lam.numpy().copy(),
        thr,
        admm_steps.Diagonal(xp_n, "cpu", start, stop),
    )
    for a, b, c in zip(fast, plain, on_numpy, strict=True):
        assert torch.equal(a, b)
        assert np.array_equal(a.numpy(), c)
    c, lam_new, _ = fast
    assert bool((c[torch.arange(start, stop), torch.arange(nb)] == 0).all())
    soft = torch.sign(t) * (t.abs() - thr).clamp_min(0)
    off = torch.ones(n, nb, dtype=torch.bool)
    off[torch.arange(start, stop), torch.arange(nb)] = False
    assert torch.equal(c[off], soft[off]), "C = soft(T, 1/rho) off the diagonal"
    assert torch.allclose(lam_new + c, t, rtol=2 * torch.finfo(dtype).eps, atol=0), "T = C + Lam"


def test_run_reports_hook_stops_and_divergence():
    calls = []

    def step(it):
        return 1.0 / it, it >= 50

    out = admm_steps.run(step, 100, lambda it, r: calls.append(it) or it == 4)
    assert (out.iterations, out.converged, out.stopped) == (4, False, True)
    assert calls == [1, 2, 3, 4]
    out = admm_steps.run(step, 100)
    assert (out.iterations, out.converged, out.stopped) == (50, True, False)
    out = admm_steps.run(step, 10)
    assert (out.iterations, out.converged, out.stopped) == (10, False, False)
    with pytest.raises(FloatingPointError, match="diverged at iteration 1"):
        admm_steps.run(lambda it: (float("nan"), False), 5)


SOLVERS = {
    "torch": lambda x, **kw: solve_ssc_admm(x, **kw),
    "numpy": lambda x, **kw: solve_ssc_admm_cupy(x, xp=np, **kw),
    "blocked": lambda x, **kw: solve_ssc_blocked(x, block_columns=8, **kw),
    "equality": lambda x, **kw: solve_ssc_equality(x, **kw),
}


@pytest.mark.parametrize("name", list(SOLVERS))
def test_progress_callable_sees_every_iteration_and_can_stop(name):
    x = _points(19, 11)
    seen = []

    def hook(it, residual):
        seen.append((it, residual))
        return it == 7

    res = SOLVERS[name](x, eps=0.0, max_iter=40, dtype=torch.float64, progress=hook)
    assert res.iterations == 7 and not res.converged
    if name == "blocked":  # every block is asked: 3 blocks of 8, 8 and 3 columns
        assert [it for it, _ in seen] == [1, 2, 3, 4, 5, 6, 7] * 3
        assert res.block_iterations == [7, 7, 7]
    else:
        assert [it for it, _ in seen] == list(range(1, 8))
        assert seen[-1][1] == res.residual
    assert res.stopped
    full = SOLVERS[name](x, eps=0.0, max_iter=7, dtype=torch.float64)
    assert not full.stopped
    assert torch.equal(full.coef.to_dense(), res.coef.to_dense()), "stopping is not changing"


def test_progress_rejects_other_values():
    with pytest.raises(ValueError, match="progress: expected True, False"):
        solve_ssc_admm(_points(8, 5), progress="yes")


@pytest.mark.gpu
def test_cupy_fused_shrink_equals_the_array_api_form():
    cp = pytest.importorskip("cupy")
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    import array_api_compat

    from videoanchor.anchor.solvers.admm_cupy import CupyKernels

    rng = np.random.default_rng(2)
    t = cp.asarray(rng.standard_normal((13, 5)) * 0.01)
    lam = cp.asarray(rng.standard_normal((13, 5)) * 0.01)
    xp = array_api_compat.array_namespace(t)
    for diag in (admm_steps.Diagonal(xp, t.device, 4, 9), None):
        fused = CupyKernels(cp).shrink(xp, t.copy(), lam.copy(), 1 / 300, diag)
        plain = admm_steps.Kernels().shrink(xp, t.copy(), lam.copy(), 1 / 300, diag)
        for a, b in zip(fused, plain, strict=True):
            assert bool(cp.array_equal(a, b))


def test_run_with_a_lazy_residual_checks_it_now_and_then_and_hooks_can_read_it():
    """A step with ``lazy_residual`` (the fast solver's schedule on torch) returns device
    scalars: the loop reads them every LAZY_CHECK_EVERY iterations and on the last, still
    raises on a divergence (up to that many iterations late), and reports floats."""

    class Lazy:
        lazy_residual = True

        def __init__(self, bad_at=None, done_at=25):
            self.bad_at, self.done_at = bad_at, done_at

        def __call__(self, it):
            r = torch.tensor(float("nan") if self.bad_at and it >= self.bad_at else 1.0 / it)
            return r, it >= self.done_at

    seen = []
    out = admm_steps.run(Lazy(), 100, lambda it, r: seen.append(r) and False)
    assert (out.iterations, out.converged) == (25, True)
    assert isinstance(out.residual, float) and out.residual == pytest.approx(1 / 25)
    assert all(isinstance(r, torch.Tensor) for r in seen) and len(seen) == 25
    every = admm_steps.LAZY_CHECK_EVERY
    with pytest.raises(FloatingPointError, match=f"diverged at iteration {every}"):
        admm_steps.run(Lazy(bad_at=3), 100)
    with pytest.raises(FloatingPointError, match="diverged at iteration 7"):
        admm_steps.run(Lazy(bad_at=3), 7)  # the last iteration is always checked
    with pytest.raises(FloatingPointError, match="diverged at iteration 4"):
        admm_steps.run(Lazy(bad_at=3, done_at=4), 100)  # and so is the one that ends the run


def _host_reads(fn):
    """(result, host reads) of ``fn()``: the operations that make a CUDA stream wait for the
    host, counted on any device: aten._local_scalar_dense (``float(t)``, ``bool(t)``,
    ``t.item()``...), ``nonzero``, ``masked_select``, indexing by a boolean mask (a
    ``nonzero`` inside) and ``lift_fresh`` (a tensor made from Python data: a synchronous
    upload on CUDA)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    aten = torch.ops.aten
    reads = {aten._local_scalar_dense.default, aten.nonzero.default,
             aten.masked_select.default, aten.lift_fresh.default, aten.lift_fresh_copy.default}  # fmt: skip
    indexing = {aten.index.Tensor, aten.index_put_.default, aten.index_put.default,
                aten._index_put_impl_.default}  # fmt: skip

    class Count(TorchDispatchMode):
        reads = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in reads or (
                func in indexing
                and any(i is not None and i.dtype in (torch.bool, torch.uint8) for i in args[1])
            ):
                Count.reads += 1
            return func(*args, **(kwargs or {}))

    with Count():
        out = fn()
    return out, Count.reads


def test_the_dense_schedule_reads_the_device_only_to_rebalance(monkeypatch):
    """The fast solver's dense schedule (what CUDA runs; ``strategy="dense"`` on the CPU, with the
    CUDA decision for E's product) reads nothing from the device in an iteration but the
    rebalancing's norms and its refactor, and the residual every LAZY_CHECK_EVERY
    iterations: no iteration waits for the previous one's kernels. The iterate is the one
    of the run that reads the residual and E's non-zeros every iteration, to the bit."""
    import functools

    import array_api_compat
    from array_api_compat.common import _aliases

    from videoanchor.anchor.solvers.admm import TorchKernels

    x = _points(96, 40, seed=3).float()
    runs, steps = {}, []
    orig_run = admm_steps.run

    def counted_run(step, max_iter, hook=None, **kw):
        steps.append(step)
        out, reads = _host_reads(lambda: orig_run(step, max_iter, hook, **kw))
        runs[len(runs)] = reads
        return out

    monkeypatch.setattr(admm_steps, "run", counted_run)

    def dense_e():  # the dense product with E, which reads nothing back
        return TorchKernels(x.device, sparse_e_density=0.0)

    lazy = solve_ssc_admm(x, scheduled=True, progress=False, kernels=dense_e(), strategy="dense")
    step = steps[0]
    assert step.lazy_residual and lazy.iterations == step.iterations
    checks = -(-step.iterations // admm_steps.LAZY_CHECK_EVERY)
    # per rebalancing: four norms and the Sherman-Morrison denominator of the refactor
    assert runs[0] <= 5 * step.rho_changes + checks + 1, (runs[0], step.rho_changes)
    assert runs[0] < step.iterations  # it read ~3.5 times per iteration before
    # array_api_compat 1.12's torch clip (the one the H100 of 2026-11-27 had): boolean masks
    # and uploaded bounds, 6 reads a call, 403 synchronisations in the GPU test; not here
    with monkeypatch.context() as m:
        m.setattr(array_api_compat.torch, "clip", functools.partial(_aliases.clip, xp=torch))
        again = solve_ssc_admm(
            x, scheduled=True, progress=False, kernels=dense_e(), strategy="dense"
        )
    assert runs[1] == runs[0] and torch.equal(again.coef, lazy.coef)
    steps.pop()
    with monkeypatch.context() as m:  # the eager form: reads every iteration
        m.setattr(array_api_compat, "is_torch_namespace", lambda xp: False)
        eager = solve_ssc_admm(
            x, scheduled=True, progress=False, kernels=dense_e(), strategy="dense"
        )
    assert not steps[1].lazy_residual and runs[2] > step.iterations
    assert torch.equal(lazy.coef, eager.coef) and torch.equal(lazy.outliers, eager.outliers)
    assert lazy.residual == eager.residual


def test_lazy_residuals_reach_callables_histories_and_reports_as_floats():
    from videoanchor.anchor.progress import SSCProgress

    x = _points(40, 24, seed=5).float()
    seen, cb = [], []
    res = solve_ssc_admm(x, scheduled=True, progress=lambda it, r: seen.append(r) and False,
                         keep_history=True, callback=lambda it, c, r: cb.append(r))  # fmt: skip
    assert len(seen) == len(cb) == len(res.history) == res.iterations
    for values in (seen, cb, res.history):
        assert all(type(r) is float for r in values)
    assert seen == res.history == cb and seen[-1] == res.residual
    reporter = SSCProgress(enabled=False)
    again = solve_ssc_admm(x, scheduled=True, progress=reporter)
    summary = reporter.runs[-1]
    assert summary.residual == again.residual == res.residual
    assert summary.best_residual == min(res.history)
    assert summary.fixed_schedule and summary.iterations == res.iterations


def test_cuda_density_decision_is_counted_every_tenth_product():
    from videoanchor.anchor.solvers import admm as admm_solver

    k = TorchKernels(torch.device("cpu"))
    dense = torch.ones(10, 10)
    sparse = torch.zeros(10, 10)
    counts = []
    orig = torch.count_nonzero

    def spy(t, *a, **kw):
        counts.append(1)
        return orig(t, *a, **kw)

    with pytest.MonkeyPatch.context() as m:
        m.setattr(torch, "count_nonzero", spy)
        got = [k._sparse_by_density(dense if i < 12 else sparse) for i in range(25)]
    every = admm_solver._DENSITY_RECHECK
    assert len(counts) == 1 + 25 // every  # the first call, then every tenth
    assert got[: every - 1] == [False] * (every - 1)  # kept between counts
    assert got[19:] == [True] * 6  # the count at the 20th call saw the sparse E
    assert got[12:19] == [False] * 7  # (the decision lags by up to ten products)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_dense_schedule_synchronises_only_to_rebalance():
    """On CUDA, PyTorch's sync debug mode counts the host synchronisations of the fast
    solver's iterations: those of the rebalancings (four norms and a refactor each), the
    residual's check every LAZY_CHECK_EVERY iterations and E's density count every tenth
    product, not ~3.5 per iteration."""
    import warnings

    from videoanchor.anchor.solvers import admm as admm_solver

    x = _points(512, 96, seed=3).float().cuda()
    steps = []
    orig_run = admm_steps.run

    def counted_run(step, max_iter, hook=None, **kw):
        steps.append(step)
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                out = orig_run(step, max_iter, hook, **kw)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        steps.append(sum("synchroniz" in str(w.message).lower() for w in caught))
        return out

    with pytest.MonkeyPatch.context() as m:
        m.setattr(admm_steps, "run", counted_run)
        res = solve_ssc_admm(x, scheduled=True, progress=False)
    step, syncs = steps
    checks = -(-step.iterations // admm_steps.LAZY_CHECK_EVERY)
    density = -(-step.iterations // admm_solver._DENSITY_RECHECK) + 1
    assert res.iterations == step.iterations and step.lazy_residual
    assert syncs <= 6 * step.rho_changes + checks + density + 2, (syncs, step.rho_changes)
