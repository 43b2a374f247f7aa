"""label_draws: several label assignments from one spectral embedding, shares averaged."""

import numpy as np
import pytest
import torch

import videoanchor
import videoanchor.anchor as anchor_module
from videoanchor.anchor import anchor_scores, compute_anchor_scores
from videoanchor.anchor.spectral import spectral_labels, ssc_affinity


def ambiguous_tokens(n_per=15, k=6, d=24, seed=0):
    """Six 3-dimensional subspaces through a shared mean, noisy: asked for 8 clusters, the
    label draws disagree."""
    g = torch.Generator().manual_seed(seed)
    mean = torch.randn(d, generator=g, dtype=torch.float64)
    xs = [
        (torch.randn(d, 3, generator=g, dtype=torch.float64) @ torch.randn(3, n_per, generator=g, dtype=torch.float64)).T
        for _ in range(k)
    ]  # fmt: skip
    return torch.cat(xs) + mean + 0.3 * torch.randn(n_per * k, d, generator=g, dtype=torch.float64)


def reference_scores(coef, draws):
    """docs/method.md section 3 with pi_j averaged over label draws, in numpy float64."""
    c = coef.to(torch.float64).numpy()
    lab = draws.numpy()
    n = c.shape[0]
    pi = np.zeros(n)
    for row in lab:
        for j in range(n):
            pi[j] += np.sum(row == row[j]) / n
    pi /= lab.shape[0]
    s_hat = pi * c.sum(axis=1)
    return (s_hat - s_hat.min()) / (s_hat.max() - s_hat.min() + 1e-5)


KW = dict(max_iter=300, dtype=torch.float64)


def test_label_draws_average_the_cluster_shares():
    x = ambiguous_tokens()
    one = compute_anchor_scores(x, 8, seed=2, **KW)
    four = compute_anchor_scores(x, 8, seed=2, label_draws=4, **KW)
    assert torch.equal(one.coef, four.coef) and torch.equal(one.labels, four.labels)
    draws = spectral_labels(ssc_affinity(four.coef), 8, seed=2, draws=4)
    assert torch.equal(draws[0], four.labels)
    assert len({tuple(d.tolist()) for d in draws}) > 1, "the draws must disagree here"
    ref = reference_scores(four.coef, draws)
    np.testing.assert_allclose(four.scores.numpy(), ref, rtol=0, atol=1e-6)
    np.testing.assert_allclose(one.scores.numpy(), reference_scores(one.coef, draws[:1]), atol=1e-6)
    assert torch.equal(one.scores, anchor_scores(one.coef, one.labels))
    assert float((four.scores - one.scores).abs().max()) > 1e-3


def test_label_draws_in_blocked_mode():
    """The sparse spectral step of blocked mode draws its labels as the dense one does."""
    x = ambiguous_tokens(seed=1)
    kw = dict(mode="blocked", block_columns=16, seed=3, max_iter=300)
    one = compute_anchor_scores(x.float(), 8, **kw)
    five = compute_anchor_scores(x.float(), 8, label_draws=5, **kw)
    assert torch.equal(one.labels, five.labels)
    assert bool(((five.scores >= 0) & (five.scores < 1)).all())
    assert float((five.scores - one.scores).abs().max()) > 1e-3


@pytest.mark.parametrize(
    "value,exc", [(0, ValueError), (-2, ValueError), (2.0, TypeError), (True, TypeError)],
    ids=["zero", "negative", "float", "bool"],
)  # fmt: skip
def test_bad_label_draws(value, exc):
    with pytest.raises(exc, match="label_draws"):
        compute_anchor_scores(ambiguous_tokens(n_per=4, k=3), 3, label_draws=value, max_iter=5)


def test_anchor_scores_checks_the_draws_shape():
    c = torch.zeros(4, 4)
    with pytest.raises(ValueError, match=r"\(draws, 4\)"):
        anchor_scores(c, torch.zeros(2, 5, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\(draws, 4\)"):
        anchor_scores(c, torch.zeros(0, 4, dtype=torch.long))


@torch.no_grad()
def test_configure_passes_label_draws(monkeypatch):
    from transformers import AutoModelForImageTextToText

    from videoanchor.integrations.transformers.testing import tiny_model, tiny_sample

    model = tiny_model("qwen2_5_vl", seed=2)
    model = AutoModelForImageTextToText.from_config(
        model.config, attn_implementation="videoanchor_triton"
    ).eval()
    seen = []
    real = anchor_module.compute_anchor_scores

    def spy(*args, **kw):
        seen.append(kw.get("label_draws"))
        return real(*args, **kw)

    monkeypatch.setattr(anchor_module, "compute_anchor_scores", spy)
    handle = videoanchor.configure(model, enabled=True, n_clusters=3, max_iter=50, label_draws=3)
    assert handle.config.label_draws == 3
    model(**tiny_sample(model.config, [4], text=4, seed=5))
    assert seen and set(seen) == {3}
    with pytest.raises(ValueError, match="label_draws"):
        videoanchor.configure(model, label_draws=0)
