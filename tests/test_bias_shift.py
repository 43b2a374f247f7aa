"""``triton_prefill.bias_shift``: the constant taken out of the key bias before the kernels,
against a plain statement of its rule, on biases drawn by hypothesis (NaN, +-inf, huge
values, padding masks with all-hidden rows, cache lengths, packed batches), bit for bit;
and the work it adds to every anchored call, counted."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from videoanchor.kernels.triton_prefill import bias_shift

SPECIAL = [float("nan"), float("inf"), float("-inf"), 0.0, -0.0, 3e38, -3e38, 1e-30]


def _plain(kb, mask, seqlens, varlen):
    """Largest visible non-NaN value (per sample; over everything for varlen) if finite,
    else 0: a loop over the entries."""
    rows = [kb.reshape(-1)] if varlen else list(kb)
    out = []
    for b, row in enumerate(rows):
        best = float("-inf")
        for j, value in enumerate(row.tolist()):
            hidden = value != value
            if mask is not None and not varlen:
                hidden |= not bool(mask[b, j])
            if seqlens is not None and not varlen:
                hidden |= j >= int(seqlens[b])
            if not hidden:
                best = max(best, value)
        out.append(best if best not in (float("inf"), float("-inf")) else 0.0)
    return torch.tensor(out[0] if varlen else out, dtype=torch.float32)


@st.composite
def cases(draw):
    varlen = draw(st.booleans())
    b = 1 if varlen else draw(st.integers(1, 3))
    s = draw(st.integers(1, 9))
    values = draw(st.lists(st.one_of(st.sampled_from(SPECIAL),
                                     st.floats(-1e4, 1e4, width=32)),
                           min_size=b * s, max_size=b * s))  # fmt: skip
    kb = torch.tensor(values, dtype=torch.float32).reshape(b, s)
    if varlen:
        return kb.reshape(-1), None, None, True
    mask = None
    if draw(st.booleans()):
        mask = torch.tensor(draw(st.lists(st.booleans(), min_size=b * s, max_size=b * s)))
        mask = mask.reshape(b, s)
    seqlens = None
    if draw(st.booleans()):
        seqlens = torch.tensor(draw(st.lists(st.integers(0, s), min_size=b, max_size=b)),
                               dtype=torch.int32)  # fmt: skip
    return kb, mask, seqlens, False


@settings(max_examples=300, deadline=None)
@given(cases())
def test_bias_shift_is_the_largest_visible_finite_value(case):
    kb, mask, seqlens, varlen = case
    got = bias_shift(kb, mask, seqlens, varlen)
    want = _plain(kb, mask, seqlens, varlen)
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert torch.equal(got, want), (kb, mask, seqlens, got, want)


def test_bias_shift_adds_three_operations_without_masks():
    # each of these is a kernel launch on every anchored attention call (every layer)
    kb = torch.rand(2, 64)
    bias_shift(kb)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        bias_shift(kb)
    top = [e.name for e in prof.events()
           if e.name.startswith("aten::") and (e.cpu_parent is None
                                               or not e.cpu_parent.name.startswith("aten::"))]  # fmt: skip
    assert top == ["aten::nan_to_num", "aten::amax", "aten::nan_to_num_"]


@pytest.mark.parametrize("varlen", [False, True])
def test_bias_shift_ignores_what_hidden_keys_hold(varlen):
    g = torch.Generator().manual_seed(0)
    kb = torch.randn(2, 8, generator=g)
    mask = torch.ones(2, 8, dtype=torch.bool)
    mask[0, 5:] = False
    if varlen:
        assert torch.equal(bias_shift(kb.reshape(-1), varlen=True), kb.max())
        return
    poisoned = kb.clone()
    poisoned[0, 5:] = torch.tensor([float("nan"), float("inf"), 1e30])
    assert torch.equal(bias_shift(poisoned, mask), bias_shift(kb, mask))
    lengths = torch.tensor([5, 8], dtype=torch.int32)
    assert torch.equal(bias_shift(poisoned, None, lengths), bias_shift(kb, mask))
