"""The CPU default's contract (issue 79): ``result.gap`` is the certificate of the ``C`` the
call returns, in its dtype, checked against a dual bound written here from the program alone
(NumPy, column by column); dark tokens are named in one warning per call; the option
``dark_tokens="ignore"`` takes ``mu_z`` from the other tokens."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

from videoanchor.anchor import compute_anchor_scores
from videoanchor.anchor.program import DARK_NAMED, column_gaps


def _tokens(frames=5, patches=13, d=97, seed=3):
    """Video-like tokens at odd shapes (N = 65, D = 97: a 16-frame request's structure,
    small)."""
    from benchmarks.common import video_tokens

    return video_tokens(frames, patches, d, k=4, seed=seed)


def _independent_gaps(x, coef, lam_e, lam_z) -> np.ndarray:
    """Each column's relative duality gap, from the program (module docstring of
    ``videoanchor.anchor.program``) alone, in NumPy float64, one column at a time: the primal
    objective with ``E`` eliminated against the dual at ``u = lambda_z clip(r, -t, t)``
    scaled by the best feasible ``s``."""
    y = np.asarray(x, dtype=np.float64).T
    c = np.asarray(coef, dtype=np.float64)
    d, n = y.shape
    t = lam_e / lam_z
    out = np.empty(n)
    for i in range(n):
        r = y[:, i] - y @ c[:, i]
        a = np.abs(r)
        huber = np.where(a <= t, 0.5 * lam_z * r**2, lam_e * (a - 0.5 * t)).sum()
        primal = np.abs(c[:, i]).sum() + huber
        u = lam_z * np.clip(r, -t, t)
        g = np.delete(y, i, axis=1).T @ u  # y_j^T u for j != i
        lo, hi = g.min(), g.max()
        s_max = min(2.0 / (hi - lo) if hi > lo else math.inf, lam_e / np.abs(u).max())
        slope, uu = u @ y[:, i] - hi, u @ u
        s = min(max(lam_z * slope / uu, 0.0), s_max)  # the concave quadratic's best s
        dual = s * slope - s * s * uu / (2 * lam_z) + 1.0  # nu = 1 - s max_j y_j^T u
        out[i] = (primal - dual) / primal
    return out


@pytest.mark.parametrize("features", [torch.float32, torch.float64])
def test_the_gap_is_the_certificate_of_the_returned_c(features):
    """``gap`` is the largest column gap of ``coef`` as returned (float32 C from float32
    features: its rounding's gap, which the float64 answer's ``residual`` does not show)."""
    x = _tokens().to(features)
    res = compute_anchor_scores(x, 4)
    assert res.solver == "workset" and res.coef.dtype == features
    indep = _independent_gaps(x, res.coef, res.lambda_e, res.lambda_z)
    # two float64 sums of primal - dual differ by 1e-15 to 2.3e-14 where the gap is 1e-12
    # (AVX-512 and AVX2 arithmetic): that much absolute slack, 1e-6 relative above it
    slack = 1e-13
    assert res.gap >= indep.max() * (1 - 1e-6) - slack
    assert res.gap == pytest.approx(indep.max(), rel=1e-6, abs=slack)
    assert res.residual < 1e-9  # the float64 answer the routes certified
    if features == torch.float64:
        assert res.gap == res.residual
    else:  # the rounding of the float32 C: far above the float64 answer's gap
        assert res.gap > 100 * res.residual


def test_the_certificate_of_a_poisoned_c_is_nan_or_large():
    """The certificate cannot pass a C it was not given: a NaN entry poisons its column's
    gap, a moved coefficient opens it."""
    x = _tokens().double()
    res = compute_anchor_scores(x, 4)
    y = x.T.contiguous()
    c = res.coef.clone()
    c[0, 1] = math.nan
    assert math.isnan(float(column_gaps(y, c, res.lambda_e, res.lambda_z).gap[1]))
    c = res.coef.clone()
    c[:, 2] *= 0.9
    c[3, 2] += 0.1 * float(res.coef[:, 2].sum())
    assert float(column_gaps(y, c, res.lambda_e, res.lambda_z).gap[2]) > 1e-6


def _darkened(x, seed=0, noise=6, constant=2):
    """``x`` with ``noise`` tokens replaced by Gaussian noise at 1e-3 of the median token
    norm and ``constant`` by a constant at the same scale (a black frame, a letterbox bar),
    at seeded positions; returns the features and the dark tokens' indices, sorted."""
    g = torch.Generator().manual_seed(seed)
    x = x.clone()
    n, d = x.shape
    scale = 1e-3 * float(x.norm(dim=1).median())
    where = torch.randperm(n, generator=g)[: noise + constant].sort().values
    for k, i in enumerate(where.tolist()):
        if k < noise:
            x[i] = scale * torch.randn(d, generator=g, dtype=x.dtype) / d**0.5
        else:
            x[i] = scale / d**0.5
    return x, where.tolist()


@pytest.mark.parametrize("count", [8, 11])
def test_dark_tokens_are_named_in_one_warning(count):
    """One warning per call (the working sets and the fast solver they fall back to used to
    warn once each), naming every dark token up to :data:`DARK_NAMED`, then a count."""
    x, dark = _darkened(_tokens(frames=6, patches=16, d=64), noise=count - 2)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        compute_anchor_scores(x, 4)
    said = [str(w.message) for w in seen if "mu_z" in str(w.message)]
    assert len(said) == 1, said
    named = ", ".join(map(str, dark[:DARK_NAMED]))
    more = f" and {count - DARK_NAMED} more" if count > DARK_NAMED else ""
    assert f"{count} token(s) ({named}{more})" in said[0], said[0]


def test_the_cuda_route_names_dark_tokens_in_one_warning_too():
    """The GPU working sets' route (``run_workset_cuda``, its host code run here on CPU
    tensors): its lambdas name the dark tokens, and the fast solver it falls back to (C is
    dense here: the dark tokens' columns) does not name them again."""
    from videoanchor.anchor.plan import Plan
    from videoanchor.anchor.solvers import workset_cuda as wc

    x, dark = _darkened(_tokens(frames=6, patches=16, d=64))
    fast_plan = Plan(mode="exact", solver="fast", backend="torch", device=x.device,
                     work=torch.float32, route="admm")  # fmt: skip
    plan = Plan(mode="exact", solver="workset", backend="torch", device=x.device,
                work=torch.float32, fallback=fast_plan)  # fmt: skip
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        res = wc.run_workset_cuda(x, plan, slots=(4,), outlier_slots=(4,), alpha_e=800.0,
                                  alpha_z=800.0, rho=0.1, eps=1e-4, max_iter=60,
                                  progress=False)  # fmt: skip
    assert res.solver == "fast", res.strategy  # (the fallback ran: the path that warned twice)
    said = [str(w.message) for w in seen if "mu_z" in str(w.message)]
    assert len(said) == 1, said
    assert f"{len(dark)} token(s) ({', '.join(map(str, dark))})" in said[0], said[0]


def _dark_request():
    """A request with dark tokens (:func:`_darkened`) and the default's answer for the same
    request without them."""
    clean = _tokens(frames=6, patches=16, d=64).double()
    x, dark = _darkened(clean)
    keep = [i for i in range(x.shape[0]) if i not in dark]
    return x, compute_anchor_scores(clean[keep], 4)


def test_ignoring_dark_tokens_takes_mu_z_from_the_others():
    """``dark_tokens="ignore"``: ``lambda_z`` is the request's without its dark tokens, the
    default certifies, and the other tokens' scores stay near those without the dark ones;
    the authors' rule raises ``lambda_z`` by orders of magnitude."""
    x, ref = _dark_request()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = compute_anchor_scores(x, 4, dark_tokens="ignore")
        authors = compute_anchor_scores(x, 4)
    assert ours.lambda_z == pytest.approx(ref.lambda_z, rel=1e-12)
    assert authors.lambda_z > 100 * ref.lambda_z
    assert ours.solver == "workset" and ours.residual < 1e-8
    assert bool(torch.isfinite(ours.scores).all())


def test_the_rule_is_checked_and_refused_where_it_cannot_run():
    from videoanchor.anchor.options import SSCOptions
    from videoanchor.anchor.plan import make_plan

    with pytest.raises(ValueError, match="dark_tokens: expected one of"):
        compute_anchor_scores(_tokens(), 4, dark_tokens="floor")
    opts = SSCOptions(dark_tokens="ignore", solver="faithful").checked()
    with pytest.raises(ValueError, match="dark_tokens='ignore'.*authors' mu_z only"):
        make_plan((40, 8), torch.device("cpu"), opts, program="exact")


def test_the_transformers_anchor_cache_takes_the_rule_and_keeps_the_gap():
    """The transformers path's cache solves with the configured ``dark_tokens`` (it is part
    of its key) and its results carry the gap, as ``compute_anchor_scores``' do."""
    from videoanchor.integrations.options import AnchorConfig
    from videoanchor.integrations.transformers.cache import AnchorCache

    x, ref = _dark_request()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = AnchorCache(None).anchor_result(x, 4, AnchorConfig(dark_tokens="ignore"))
    assert res.lambda_z == pytest.approx(ref.lambda_z, rel=1e-12)
    assert res.gap is not None and res.gap < 1e-3
