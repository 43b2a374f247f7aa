"""SSC-ADMM: iterates against the float64 reference, recovery, accuracy, errors, backends."""

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import adjusted_rand_score

import videoanchor
from videoanchor.anchor import (
    SSCMemoryError,
    compute_anchor_scores,
    plan,
    reference_minimiser,
    solve_ssc_admm,
    sparse_subspace_clustering,
    spectral_clustering,
    ssc_affinity,
    ssc_lambdas,
)
from videoanchor.anchor.reference import authors_admm, authors_lambdas
from videoanchor.anchor.solvers import admm as admm_solver
from videoanchor.anchor.solvers.admm_cupy import solve_ssc_admm_cupy


def union_of_subspaces(n_per, k, d, dim, *, noise=0.0, corrupt=0.0, offset=0.0, seed=0):
    """``k`` random ``dim``-dimensional subspaces of R^d, ``n_per`` points each (rows)."""
    g = torch.Generator().manual_seed(seed)
    xs, labels = [], []
    for c in range(k):
        basis = torch.randn(d, dim, generator=g, dtype=torch.float64)
        xs.append((basis @ torch.randn(dim, n_per, generator=g, dtype=torch.float64)).T)
        labels += [c] * n_per
    x = torch.cat(xs)
    if offset:
        x = x + offset * torch.randn(d, generator=g, dtype=torch.float64)
    if noise:
        x = x + noise * torch.randn(x.shape, generator=g, dtype=torch.float64)
    if corrupt:
        mask = torch.rand(x.shape, generator=g, dtype=torch.float64) < corrupt
        x = x + mask * 20 * torch.randn(x.shape, generator=g, dtype=torch.float64)
    return x, torch.tensor(labels)


def rel_fro(a, b):
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return float((a - b).norm() / b.norm())


MODELS = [
    pytest.param(True, True, id="affine-outliers"),
    pytest.param(True, False, id="affine"),
    pytest.param(False, True, id="outliers"),
    pytest.param(False, False, id="lasso"),
]


@pytest.mark.parametrize("nnz", [0, 1, 17, 40, 200], ids=lambda n: f"nnz{n}")
def test_sparse_e_product_equals_dense(nnz):
    """Y^T E through the CPU gather path (at most one non-zero per column on average) and
    its dense fallback, against the plain product; duplicate columns included."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(40, 12, generator=g, dtype=torch.float64)
    kernels = admm_solver.TorchKernels(x.device, sparse_e_density=1.0)  # only the column cap
    e = torch.zeros(12, 40, dtype=torch.float64)
    flat = torch.randperm(e.numel(), generator=g)[:nnz]
    e.view(-1)[flat] = torch.randn(nnz, generator=g, dtype=torch.float64)
    for m in (x, x.T @ x):
        got = kernels.times_e(m, e)
        torch.testing.assert_close(got, m @ e, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("sparse_e", [False, True], ids=["dense-E", "sparse-E"])
@pytest.mark.parametrize("strategy", ["dense", "woodbury"])
@pytest.mark.parametrize("affine,outliers", MODELS)
def test_iterates_match_float64_reference(strategy, affine, outliers, sparse_e):
    # odd sizes; corruption makes E non-zero so the outlier path is exercised
    x, _ = union_of_subspaces(13, 3, 23, 3, noise=0.01, corrupt=0.08, seed=1)
    # each product Y^T E path on its own: the sparse (gather + index_add_) one at any
    # density, or the dense one
    kernels = admm_solver.TorchKernels(x.device, sparse_e_density=1.0 if sparse_e else 0.0)
    y = x.numpy().T
    ref_iterates = []
    authors_admm(
        y,
        max_iter=40,
        eps=0.0,
        affine=affine,
        outliers=outliers,
        callback=lambda it, A, C, E: ref_iterates.append((C.copy(), E.copy())),
    )
    ours = []
    solve_ssc_admm(
        x,
        dtype=torch.float64,
        max_iter=40,
        eps=0.0,
        strategy=strategy,
        affine=affine,
        outliers=outliers,
        callback=lambda it, C, res: ours.append(C.clone()),
        kernels=kernels,
    )
    assert len(ours) == len(ref_iterates) == 40
    scale = max(np.abs(c).max() for c, _ in ref_iterates)
    for it, (mine, (c_ref, _)) in enumerate(zip(ours, ref_iterates, strict=True), start=1):
        err = np.abs(mine.numpy() - c_ref).max()
        assert err <= 1e-9 * scale, f"iteration {it}: max |C - C_ref| = {err:.3e}"
    if outliers:
        r = solve_ssc_admm(x, dtype=torch.float64, max_iter=40, eps=0.0, strategy=strategy)
        assert bool(r.outliers.ne(0).any()), "the test data should exercise the E term"


def test_stops_where_the_reference_stops():
    x, _ = union_of_subspaces(11, 3, 17, 2, noise=0.02, seed=2)
    c_ref, it_ref, ok_ref = authors_admm(x.numpy().T, eps=2e-4, max_iter=3000)
    r = solve_ssc_admm(x, dtype=torch.float64, eps=2e-4, max_iter=3000)
    assert ok_ref and r.converged
    assert r.iterations == it_ref
    assert np.abs(r.coef.numpy() - c_ref).max() < 1e-9


def test_lambdas_match_the_python_loop():
    x, _ = union_of_subspaces(9, 3, 19, 2, noise=0.1, seed=3)
    lam_e, lam_z, _, _ = ssc_lambdas(x, 800.0, 20.0)
    ref_e, ref_z = authors_lambdas(x.numpy().T, 800.0, 20.0)
    assert math.isclose(lam_e, ref_e, rel_tol=1e-12)
    assert math.isclose(lam_z, ref_z, rel_tol=1e-12)


def test_lambdas_with_a_tied_largest_norm():
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5], [0.2, 0.1]], dtype=torch.float64)
    lam_e, lam_z, mu_e, mu_z = ssc_lambdas(x, 1.0, 1.0)
    ref_e, ref_z = authors_lambdas(x.numpy().T, 1.0, 1.0)
    assert mu_e == 1.0 and math.isclose(lam_e, ref_e) and math.isclose(lam_z, ref_z)


@pytest.mark.parametrize("strategy", ["dense", "woodbury"])
def test_float32_close_to_float64(strategy):
    x, _ = union_of_subspaces(20, 4, 31, 3, noise=0.02, offset=1.0, seed=4)
    r64 = solve_ssc_admm(x, dtype=torch.float64, strategy=strategy, max_iter=3000)
    r32 = solve_ssc_admm(x.float(), strategy=strategy, max_iter=3000)
    assert r32.coef.dtype == torch.float32 and r64.converged and r32.converged
    assert abs(r32.iterations - r64.iterations) <= max(3, r64.iterations // 50)
    assert rel_fro(r32.coef, r64.coef) < 2e-3


def affine_subspaces(n_per, k, d, dim, *, seed=0):
    """``k`` random ``dim``-dimensional affine subspaces of R^d (each with its own offset)."""
    g = torch.Generator().manual_seed(seed)
    xs, labels = [], []
    for c in range(k):
        basis = torch.randn(d, dim, generator=g, dtype=torch.float64)
        offset = 2 * torch.randn(d, generator=g, dtype=torch.float64)
        coords = torch.randn(dim, n_per, generator=g, dtype=torch.float64)
        xs.append(offset + (basis @ coords).T)
        labels += [c] * n_per
    return torch.cat(xs), torch.tensor(labels)


def _cross_mass(coef, labels):
    same = labels[:, None] == labels[None, :]
    c = coef.abs()
    return float(c[~same].sum()) / float(c[same].sum())


# The noiseless program (lambda_z -> infinity) is subspace preserving for independent
# subspaces (Elhamifar & Vidal 2013, Thm. 1); alpha = 1e5 is that regime.
def test_exact_recovery_of_independent_affine_subspaces():
    # 4 affine 3-dim subspaces of R^30: 4 * (3 + 1) = 16 <= 30, so affinely independent
    x, labels = affine_subspaces(15, 4, 30, 3, seed=6)
    res = sparse_subspace_clustering(
        x,
        4,
        solver="faithful",
        alpha_e=1e5,
        alpha_z=1e5,
        eps=1e-6,
        max_iter=1000,
        dtype=torch.float64,
    )
    assert adjusted_rand_score(labels.numpy(), res.labels.numpy()) == 1.0
    assert _cross_mass(res.coef, labels) == 0.0
    assert float(res.coef.diagonal().abs().max()) == 0.0
    col_sums = res.coef.sum(dim=0)
    assert torch.allclose(col_sums, torch.ones_like(col_sums), atol=1e-3)


def test_exact_recovery_of_independent_linear_subspaces_without_affine_constraint():
    x, labels = union_of_subspaces(14, 4, 30, 3, seed=12)  # 4 * 3 = 12 <= 30
    res = sparse_subspace_clustering(
        x,
        4,
        affine=False,
        outliers=False,
        alpha_z=1e5,
        eps=1e-6,
        max_iter=1000,
        dtype=torch.float64,
    )
    assert adjusted_rand_score(labels.numpy(), res.labels.numpy()) == 1.0
    assert _cross_mass(res.coef, labels) == 0.0


def test_default_parameters_nearly_subspace_preserving():
    x, labels = affine_subspaces(15, 4, 30, 3, seed=6)
    res = reference_minimiser(x)  # the program's minimiser at the authors' parameters
    assert res.converged and res.residual < 1e-9
    got = spectral_clustering(ssc_affinity(res.coef), 4)
    assert adjusted_rand_score(labels.numpy(), got.numpy()) == 1.0
    assert _cross_mass(res.coef, labels) < 1e-3


def test_compute_anchor_scores_outputs():
    x, _ = union_of_subspaces(10, 5, 27, 3, noise=0.02, offset=1.0, seed=7)
    x = x.float()
    x_before = x.clone()
    res = videoanchor.compute_anchor_scores(x, n_clusters=5)
    assert torch.equal(x, x_before), "the input must not be modified"
    n = x.shape[0]
    assert res.scores.shape == (n,) and res.scores.dtype == torch.float32
    assert res.labels.shape == (n,) and res.labels.dtype == torch.int64
    assert res.coef.shape == (n, n)
    assert float(res.scores.min()) >= 0.0 and float(res.scores.max()) < 1.0
    assert res.converged and res.iterations >= 1
    assert res.solver == "workset"  # the CPU's default
    for stage in ("lambdas", "workset", "certificate", "spectral", "scores", "total"):
        assert res.timings[stage] >= 0.0
    assert set(res.labels.tolist()) <= set(range(5))


def test_numpy_input_and_pca_rank():
    x, _ = union_of_subspaces(8, 3, 40, 2, noise=0.01, seed=8)
    res = compute_anchor_scores(x.numpy(), n_clusters=3, pca_rank=12, solver="faithful")
    direct = compute_anchor_scores(
        videoanchor.anchor.pca_reduce(x, 12), n_clusters=3, solver="faithful"
    )
    assert torch.allclose(res.coef, direct.coef, atol=1e-6)
    assert torch.equal(res.labels, direct.labels)


def test_progress_shows_residual(caplog):
    # stderr is not a terminal under pytest: log lines (tests/test_progress.py: the bar)
    import logging

    x, _ = union_of_subspaces(6, 2, 9, 2, noise=0.05, seed=9)
    with caplog.at_level(logging.INFO, logger="videoanchor.progress"):
        solve_ssc_admm(x, progress=True, max_iter=30, eps=0.0)
    text = caplog.text
    assert "SSC: 1/30, residual" in text and "max_iter=30" in text


@pytest.mark.parametrize(
    "bad,exc,match",
    [
        (torch.zeros(0, 5), ValueError, "at least one token"),
        (torch.tensor([[1.0, float("nan")], [0.0, 1.0], [1.0, 1.0]]), ValueError, "NaN/Inf"),
        (torch.tensor([[1.0, float("inf")], [0.0, 1.0], [1.0, 1.0]]), ValueError, "NaN/Inf"),
        (torch.randn(5), ValueError, "2-D"),
        (torch.randn(3, 4, dtype=torch.complex64), TypeError, "real"),
        (np.array([["a", "b"], ["c", "d"]]), TypeError, "numeric"),
    ],
    ids=["empty", "nan", "inf", "1d", "complex", "strings"],
)
def test_bad_features_raise(bad, exc, match):
    with pytest.raises(exc, match=match):
        compute_anchor_scores(bad, n_clusters=2)


def test_fewer_tokens_than_clusters_raises():
    with pytest.raises(ValueError, match="n_clusters = 24 tokens, got N = 10"):
        compute_anchor_scores(torch.randn(10, 8))


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"rho": -1.0}, "rho"),
        ({"eps": -1.0}, "eps"),
        ({"max_iter": 0}, "max_iter"),
        ({"alpha_e": 0.0}, "alpha_e"),
        ({"backend": "jax"}, "backend"),
        ({"solver": "fastest"}, "solver"),
        ({"dtype": torch.float16}, "dtype"),
        ({"pca_rank": -2}, "pca_rank"),
    ],
    ids=["rho", "eps", "max_iter", "alpha", "backend", "solver", "dtype", "pca"],
)
def test_bad_parameters_raise(kw, match):
    with pytest.raises(ValueError, match=match):
        compute_anchor_scores(torch.randn(12, 6), n_clusters=3, **kw)


def test_solver_entry_points_take_the_options_by_keyword_and_name_the_unknown_ones():
    """The solvers' SSCOptions keywords are written once (options.takes_options): the signature
    shows them with the home's defaults (E&V's 20 for the constrained program), a value
    given reaches the solver, and an unknown keyword is a TypeError naming it and what the
    function takes."""
    import inspect

    from videoanchor.anchor import solve_ssc_blocked
    from videoanchor.anchor.solvers.equality import solve_ssc_equality

    x = union_of_subspaces(6, 2, 5, 2, seed=3)[0].float()
    for fn in (solve_ssc_admm, solve_ssc_blocked, solve_ssc_equality, authors_admm):
        params = inspect.signature(fn).parameters
        want = 20.0 if fn is solve_ssc_equality else 800.0
        assert params["alpha_z"].default == want and params["max_iter"].kind.name == "KEYWORD_ONLY"
        with pytest.raises(TypeError, match=r"unexpected keyword argument 'alpah_e'.*alpha_e"):
            fn(x, alpah_e=1.0)
    with pytest.raises(TypeError, match="mode"):  # an SSCOptions option it does not take
        solve_ssc_admm(x, mode="blocked")
    with pytest.raises(TypeError, match="too many positional arguments"):
        solve_ssc_admm(x, 100.0)
    with pytest.raises(ValueError, match="rho"):  # the options are still checked
        solve_ssc_blocked(x, rho=-1.0)
    assert solve_ssc_admm(x, max_iter=3, eps=0.0).iterations == 3
    assert solve_ssc_equality(x, max_iter=2, eps=0.0).iterations == 2
    assert authors_admm(x.double().numpy().T, max_iter=2, eps=0.0)[1] == 2


def test_each_route_runs_the_run_of_its_solver_module():
    """solve.SOLVERS maps each of plan.ROUTES to the ``run(x, plan, opts, *, affine,
    outliers)`` of its module in anchor/solvers/; the GPU working sets' Triton kernel is a
    module of its own that no import of the package loads (its first launch does)."""
    import importlib
    import inspect
    import subprocess
    import sys

    from videoanchor.anchor.solve import SOLVERS

    modules = {"workset_then_fast": "workset", "workset_cuda": "workset_cuda", "admm": "admm",
               "admm_cupy": "admm_cupy", "blocked": "blocked", "equality": "equality",
               "workset_blocks": "workset_blocks"}  # fmt: skip
    assert set(SOLVERS) == set(plan.ROUTES) == set(modules)
    for route, name in modules.items():
        run = importlib.import_module(f"videoanchor.anchor.solvers.{name}").run
        assert SOLVERS[route] is run, route
        params = inspect.signature(run).parameters
        assert list(params) == ["x", "plan", "opts", "affine", "outliers"], route
        assert params["affine"].kind is inspect.Parameter.KEYWORD_ONLY, route
    code = ("import sys, videoanchor, videoanchor.anchor.solve\n"
            "print('videoanchor.anchor.solvers._column_kernel' in sys.modules\n"
            "      or 'videoanchor.anchor.solvers._pass_kernel' in sys.modules)")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=300)  # fmt: skip
    assert out.stdout.strip() == "False", out.stderr[-2000:]


def test_too_large_for_memory_raises(monkeypatch):
    monkeypatch.setattr(plan, "free_memory_bytes", lambda device: 1 << 20)
    with pytest.raises(SSCMemoryError, match=r"N = 600 tokens.*needs about .*pca_rank"):
        compute_anchor_scores(torch.randn(600, 16), n_clusters=4, mode="exact")
    assert issubclass(SSCMemoryError, MemoryError)


def test_array_module_backend_matches_torch():
    # the CuPy backend's code, run with NumPy as its array module
    x, _ = union_of_subspaces(9, 3, 21, 2, noise=0.02, corrupt=0.05, seed=10)
    for strategy in ("dense", "woodbury"):
        kw = dict(dtype=torch.float64, strategy=strategy)
        a = solve_ssc_admm(x, max_iter=400, **kw)
        b = solve_ssc_admm_cupy(x, max_iter=400, xp=np, **kw)
        assert a.iterations == b.iterations
        assert torch.allclose(a.coef, b.coef, atol=1e-7, rtol=0)


def test_cupy_backend_without_cuda_raises_clearly():
    try:
        import cupy  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="CuPy"):
            compute_anchor_scores(torch.randn(12, 6), n_clusters=3, backend="cupy")
        return
    if not torch.cuda.is_available():
        pytest.skip("CuPy without CUDA")
    with pytest.raises(ValueError, match="CUDA"):
        compute_anchor_scores(torch.randn(12, 6), n_clusters=3, backend="cupy")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["torch", "cupy"])
def test_cuda_matches_cpu(backend):
    if backend == "cupy":
        pytest.importorskip("cupy")
    x, _ = union_of_subspaces(30, 6, 64, 4, noise=0.02, offset=1.0, seed=11)
    x = x.float()
    # the same solver on both ("auto" is the working sets on the CPU, the fast one on CUDA)
    cpu = compute_anchor_scores(x, n_clusters=6, dtype=torch.float64, solver="fast")
    gpu = compute_anchor_scores(
        x.cuda(), n_clusters=6, backend=backend, dtype=torch.float64, solver="fast"
    )
    assert gpu.scores.is_cuda and gpu.labels.is_cuda and gpu.coef.is_cuda
    assert torch.allclose(gpu.coef.cpu(), cpu.coef, atol=1e-7)
    assert torch.equal(gpu.labels.cpu(), cpu.labels)
    assert torch.allclose(gpu.scores.cpu(), cpu.scores, atol=1e-5)
