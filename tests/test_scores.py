"""Anchor scores (docs/method.md section 3) and the end-to-end pipeline against the authors'."""

import numpy as np
import pytest
import torch
from sklearn.metrics import adjusted_rand_score

from videoanchor.anchor import anchor_scores, compute_anchor_scores, duality_gaps
from videoanchor.anchor.reference import authors_pipeline, reference_scores


def test_hand_made_example():
    c = torch.tensor([[0.0, 1.0, 2.0], [0.5, 0.0, 0.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    labels = torch.tensor([0, 0, 1])
    # r = row sums = [3, 0.5, 0]; pi = [2/3, 2/3, 1/3]; s^ = [2, 1/3, 0]
    expected = torch.tensor([2.0, 1.0 / 3.0, 0.0], dtype=torch.float64) / (2.0 + 1e-5)
    s = anchor_scores(c, labels)
    assert s.dtype == torch.float32
    assert torch.allclose(s.double(), expected, atol=1e-7, rtol=0)


def test_uses_row_sums_of_the_signed_coefficients():
    c = torch.tensor([[0.0, 1.5, 0.7], [0.8, 0.0, 0.3], [0.2, -1.5, 0.0]], dtype=torch.float64)
    labels = torch.zeros(3, dtype=torch.long)
    s = anchor_scores(c, labels)
    r = c.sum(dim=1)  # [2.2, 1.1, -1.3]
    assert torch.allclose(s.double(), (r - r.min()) / (r.max() - r.min() + 1e-5), atol=1e-7)
    assert float(s[0]) > float(s[1]) > float(s[2]) == 0.0
    # |C| row sums [2.2, 1.1, 1.7] or column sums [1.0, 0.0, 1.0] would rank differently
    assert int(torch.argmin(c.abs().sum(dim=1))) == 1
    assert int(torch.argmin(c.sum(dim=0))) == 1


@pytest.mark.parametrize("n,k", [(29, 4), (64, 7), (5, 5)], ids=["29x4", "64x7", "5x5"])
def test_matches_the_loop_reference(n, k):
    g = torch.Generator().manual_seed(n)
    c = torch.randn(n, n, generator=g, dtype=torch.float64)
    c.fill_diagonal_(0)
    labels = torch.randint(0, k, (n,), generator=g)
    s = anchor_scores(c, labels)
    ref = reference_scores(c.numpy(), labels.numpy())
    assert np.allclose(s.numpy(), ref, atol=1e-6, rtol=0)


def test_range_and_degenerate_cases():
    n = 6
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    assert torch.equal(anchor_scores(torch.zeros(n, n), labels), torch.zeros(n))
    # a huge spread would round (max - min) / (max - min + 1e-5) to 1.0 in float32
    c = torch.zeros(n, n, dtype=torch.float64)
    c[0, 1] = 1e9
    s = anchor_scores(c, labels)
    assert float(s.max()) < 1.0 and float(s.min()) == 0.0


def test_bad_inputs():
    with pytest.raises(ValueError, match="square"):
        anchor_scores(torch.zeros(3, 4), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="labels"):
        anchor_scores(torch.zeros(3, 3), torch.zeros(4, dtype=torch.long))
    with pytest.raises(TypeError, match="integer"):
        anchor_scores(torch.zeros(3, 3), torch.zeros(3))


def clustered_tokens(n_per, k, d, *, seed=0):
    g = torch.Generator().manual_seed(seed)
    mean = torch.randn(d, generator=g, dtype=torch.float64)
    xs = []
    for _ in range(k):
        basis = torch.randn(d, 3, generator=g, dtype=torch.float64)
        xs.append((basis @ torch.randn(3, n_per, generator=g, dtype=torch.float64)).T)
    x = torch.cat(xs) + mean + 0.05 * torch.randn(n_per * k, d, generator=g, dtype=torch.float64)
    return x


def test_faithful_pipeline_matches_the_authors_pipeline():
    x = clustered_tokens(9, 5, 33, seed=1)
    ref = authors_pipeline(x.numpy(), n_clusters=5, seed=0)
    ours = compute_anchor_scores(x, n_clusters=5, solver="faithful", dtype=torch.float64)
    assert ours.iterations == ref["iterations"]
    assert np.abs(ours.coef.numpy() - ref["coef"]).max() < 1e-9
    assert adjusted_rand_score(ref["labels"], ours.labels.numpy()) == 1.0
    # same partition => same scores (they depend on cluster sizes, not on the ids)
    assert np.allclose(ours.scores.numpy(), ref["scores"], atol=1e-6)


def test_default_float32_pipeline_close_to_float64():
    x = clustered_tokens(12, 4, 40, seed=2)
    r64 = compute_anchor_scores(x, n_clusters=4, dtype=torch.float64)
    r32 = compute_anchor_scores(x.float(), n_clusters=4)
    assert r32.coef.dtype == torch.float32
    assert adjusted_rand_score(r64.labels.numpy(), r32.labels.numpy()) == 1.0
    assert float((r32.scores - r64.scores).abs().max()) < 5e-3


def test_a_token_that_sets_mu_z_far_below_the_others_is_named_once():
    """Issue 66: a near-black token sets mu_z (the authors' lambda_z = alpha_z / mu_z) far
    below the others'; one warning names it, whichever solvers the call runs; ordinary
    tokens get none."""
    import warnings

    g = torch.Generator().manual_seed(0)
    x = torch.randn(60, 20, generator=g)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("default")
        compute_anchor_scores(x, 3)
    assert not [w for w in seen if "mu_z" in str(w.message)]
    x[17] *= 1e-3
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("default")
        compute_anchor_scores(x, 3)
    dark = [str(w.message) for w in seen if "mu_z" in str(w.message)]
    assert len(dark) == 1 and "token 17 sets mu_z" in dark[0], dark


def test_an_uncertified_default_answer_says_its_gap():
    """Issue 66: where the working sets give up (C dense) and the fast solver's answer
    stands, one warning gives the relative duality gap it reached and the result carries
    it; a certified answer carries its own gap, below the working sets' tolerance."""
    import warnings

    g = torch.Generator().manual_seed(2)
    x = torch.randn(60, 20, generator=g)
    ok = compute_anchor_scores(x, 3)
    # the float64 answer certified (residual); gap: the float32 C returned (issue 79)
    assert ok.solver == "workset" and ok.residual < 1e-9
    assert ok.gap == duality_gaps(x, ok.coef, ok.lambda_e, ok.lambda_z).max_gap
    x[17] *= 1e-3  # a near-black token: lambda_z x 1e3, C dense (on this seed)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        res = compute_anchor_scores(x, 3)
    assert res.solver == "fast" and res.gap is not None and res.gap > 1e-6
    said = [str(w.message) for w in seen if "relative duality gap" in str(w.message)]
    assert len(said) == 1 and f"{res.gap:.3g}" in said[0], said
    # the route the warning names reaches the certified bar (it named solver='workset'
    # alone, which is this route and gave this answer again)
    assert "mode='blocked' with solver='workset'" in said[0], said
    blocks = compute_anchor_scores(x, 3, mode="blocked", solver="workset")
    assert blocks.solver == "workset" and blocks.residual < 1e-8 < res.gap
