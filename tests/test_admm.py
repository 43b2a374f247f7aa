"""The shared SSC-ADMM iteration (anchor/admm.py): backend kernels against the array-API
forms, and the one per-iteration hook (progress) in every solver."""

import numpy as np
import pytest
import torch

from videoanchor.anchor import admm, solve_ssc_admm, solve_ssc_blocked
from videoanchor.anchor.cupy_backend import solve_ssc_admm_cupy
from videoanchor.anchor.ssc import TorchKernels
from videoanchor.anchor.ssc_equality import solve_ssc_equality


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
    diag = admm.Diagonal(xp_t, "cpu", start, stop)
    fast = TorchKernels(t.device).shrink(xp_t, t.clone(), lam.clone(), thr, diag)
    plain = admm.Kernels().shrink(xp_t, t.clone(), lam.clone(), thr, diag)
    xp_n = array_api_compat.array_namespace(t.numpy())
    on_numpy = admm.Kernels().shrink(
        xp_n, t.numpy().copy(), lam.numpy().copy(), thr, admm.Diagonal(xp_n, "cpu", start, stop)
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

    out = admm.run(step, 100, lambda it, r: calls.append(it) or it == 4)
    assert (out.iterations, out.converged, out.stopped) == (4, False, True)
    assert calls == [1, 2, 3, 4]
    out = admm.run(step, 100)
    assert (out.iterations, out.converged, out.stopped) == (50, True, False)
    out = admm.run(step, 10)
    assert (out.iterations, out.converged, out.stopped) == (10, False, False)
    with pytest.raises(FloatingPointError, match="diverged at iteration 1"):
        admm.run(lambda it: (float("nan"), False), 5)


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

    from videoanchor.anchor.cupy_backend import CupyKernels

    rng = np.random.default_rng(2)
    t = cp.asarray(rng.standard_normal((13, 5)) * 0.01)
    lam = cp.asarray(rng.standard_normal((13, 5)) * 0.01)
    xp = array_api_compat.array_namespace(t)
    for diag in (admm.Diagonal(xp, t.device, 4, 9), None):
        fused = CupyKernels(cp).shrink(xp, t.copy(), lam.copy(), 1 / 300, diag)
        plain = admm.Kernels().shrink(xp, t.copy(), lam.copy(), 1 / 300, diag)
        for a, b in zip(fused, plain, strict=True):
            assert bool(cp.array_equal(a, b))
