"""The SSC-ADMM of :mod:`videoanchor.anchor.solvers.admm` on CuPy arrays (``backend="cupy"``).

The same iteration (:mod:`videoanchor.anchor.solvers.admm_steps`) on CuPy arrays, the features
in and ``C`` out through DLPack (no copy); the only CuPy-specific code is the C-step, one fused
element-wise kernel. With ``xp=numpy`` the same code runs on the CPU (the tests' check).
"""

from __future__ import annotations

from videoanchor.anchor.options import SSCOptions
from videoanchor.anchor.plan import Plan
from videoanchor.anchor.program import SSCSolution
from videoanchor.anchor.solvers import program_kwargs
from videoanchor.anchor.solvers.admm import run_admm, solve_ssc_admm
from videoanchor.anchor.solvers.admm_steps import Kernels

__all__ = ["CupyKernels", "run", "run_admm_cupy", "solve_ssc_admm_cupy"]

_FUSED = None


def _fused_kernel(cp):
    """``(T, Lam_old, thr, width, offset) -> (Lam_new, C, |Lam_old - Lam_new|)`` in one pass:
    ``Lam_new = clip(T, +-thr)`` except on the diagonal (``row == col + offset``), where it
    is ``T``; ``C = T - Lam_new``."""
    global _FUSED
    if _FUSED is None:
        _FUSED = cp.ElementwiseKernel(
            "T t, T lam_old, T thr, int64 width, int64 offset",
            "T lam_new, T c, T absdiff",
            """
            const long long row = i / width;
            const long long col = i % width;
            T l = t;
            if (row != col + offset) { l = t > thr ? thr : (t < -thr ? -thr : t); }
            lam_new = l;
            c = t - l;
            absdiff = fabs(lam_old - l);
            """,
            "videoanchor_ssc_shrink",
        )
    return _FUSED


class CupyKernels(Kernels):
    """The C-step as one fused CuPy kernel; everything else is the array-API code."""

    def __init__(self, cp):
        self.cp = cp

    def shrink(self, xp, t, lam, thr, diag):
        """The C-step's soft threshold and the multiplier update in one fused CuPy kernel."""
        cp = self.cp
        t, lam = cp.ascontiguousarray(t), cp.ascontiguousarray(lam)
        offset = diag.offset if diag is not None else t.shape[0] + t.shape[1]  # none
        lam_new, c, absdiff = _fused_kernel(cp)(t, lam, t.dtype.type(thr), t.shape[1], offset)
        return c, lam_new, absdiff

    def sync(self) -> None:
        """Wait for CuPy's current stream."""
        self.cp.cuda.get_current_stream().synchronize()


def _cupy_on(device):
    """``(cupy, CupyKernels)`` on CUDA device ``device`` (ImportError without CuPy,
    ValueError off CUDA)."""
    try:
        import cupy as cp
    except ImportError as exc:
        raise ImportError(
            "backend='cupy' needs CuPy (pip install cupy-cuda12x or cupy-cuda13x); "
            "backend='torch' computes the same result"
        ) from exc
    if getattr(device, "type", None) != "cuda":
        raise ValueError(
            f"backend='cupy' expected features on a CUDA device, got {device}; "
            "use backend='torch' on the CPU"
        )
    cp.cuda.Device(device.index if device.index is not None else 0).use()
    return cp, CupyKernels(cp)


def solve_ssc_admm_cupy(features, *, xp=None, **options) -> SSCSolution:
    """:func:`videoanchor.anchor.solvers.admm.solve_ssc_admm` (same options and result) computed
    with CuPy: ``features`` on CUDA, unless ``xp`` is another array module (``numpy``: on
    the CPU); ``coef`` and ``outliers`` come back as torch tensors on their device."""
    kernels = None
    if xp is None:
        xp, kernels = _cupy_on(getattr(features, "device", "cpu"))
    return solve_ssc_admm(features, xp=xp, kernels=kernels, **options)


def run(x, plan: Plan, opts: SSCOptions, *, affine: bool, outliers: bool) -> SSCSolution:
    """Route ``"admm_cupy"``: :func:`run_admm_cupy` on checked features ``x`` as ``plan``
    says, with the program's parameters from the checked options ``opts``."""
    return run_admm_cupy(x, plan, affine=affine, outliers=outliers, **program_kwargs(opts))


def run_admm_cupy(x, plan, **options) -> SSCSolution:
    """:func:`videoanchor.anchor.solvers.admm.run_admm` (checked features, a plan) computed
    with CuPy."""
    xp, kernels = _cupy_on(x.device)
    return run_admm(x, plan, xp=xp, kernels=kernels, **options)
