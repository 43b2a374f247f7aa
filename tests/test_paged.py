"""anchored_attention_paged (videoanchor/kernels/paged.py): the torch path against the
float64 dense reference, with scattered block tables, odd lengths, GQA, chunked queries
(q-len < seq_len), empty sequences, and its input validation."""

import pytest
import torch

from videoanchor.kernels.paged import anchored_attention_paged
from videoanchor.kernels.reference import anchored_attention_reference


def _paged_case(seq_lens, q_lens, *, Hq=4, Hkv=2, D=16, block_size=4, extra_blocks=5, seed=0,
                dtype=torch.float32):  # fmt: skip
    g = torch.Generator().manual_seed(seed)
    need = [(n + block_size - 1) // block_size for n in seq_lens]
    num_blocks = sum(need) + extra_blocks
    perm = torch.randperm(num_blocks, generator=g)  # scattered, never in order
    max_blocks = max(need) + 1
    table = torch.full((len(seq_lens), max_blocks), -1, dtype=torch.int32)
    k_cache = torch.randn(num_blocks, block_size, Hkv, D, generator=g).to(dtype)
    v_cache = torch.randn(num_blocks, block_size, Hkv, D, generator=g).to(dtype)
    kb = torch.nan * torch.ones(num_blocks, block_size)  # unused slots poisoned
    vs = torch.nan * torch.ones(num_blocks, block_size)
    dense = []
    used = 0
    for b, n in enumerate(seq_lens):
        blocks = perm[used : used + need[b]]
        used += need[b]
        table[b, : need[b]] = blocks.to(torch.int32)
        s = torch.rand(n, generator=g) * (torch.rand(n, generator=g) < 0.5)
        pos = torch.arange(n)
        kb[blocks[pos // block_size], pos % block_size] = torch.log1p(9.5 * s)
        vs[blocks[pos // block_size], pos % block_size] = 1 + 2.5 * s
        k = k_cache[blocks[pos // block_size], pos % block_size]  # (n, Hkv, D)
        v = v_cache[blocks[pos // block_size], pos % block_size]
        dense.append((k, v, torch.log1p(9.5 * s), 1 + 2.5 * s))
    table[table < 0] = 0  # padding entries point anywhere (never read)
    total_q = sum(q_lens)
    q = torch.randn(total_q, Hq, D, generator=g).to(dtype)
    cu_q = torch.zeros(len(q_lens) + 1, dtype=torch.int32)
    cu_q[1:] = torch.cumsum(torch.tensor(q_lens), 0)
    return (
        q,
        k_cache,
        v_cache,
        table,
        torch.tensor(seq_lens, dtype=torch.int32),
        cu_q,
        kb,
        vs,
        dense,
    )


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize(
    "seq_lens,q_lens",
    [([7], [7]), ([13, 1, 9], [13, 1, 9]), ([13, 6, 22], [1, 1, 1]), ([17, 5, 11], [6, 0, 11])],
)
def test_paged_equals_dense_reference(seq_lens, q_lens, causal):
    q, kc, vc, table, lens, cu_q, kb, vs, dense = _paged_case(seq_lens, q_lens)
    out = anchored_attention_paged(
        q, kc, vc, table, lens, cu_seqlens_q=cu_q, max_seqlen_q=max(q_lens),
        key_bias_cache=kb, value_scale_cache=vs, causal=causal,
    )  # fmt: skip
    assert torch.isfinite(out).all()
    qs = cu_q.tolist()
    for b, (k, v, kb_b, vs_b) in enumerate(dense):
        qb = q[qs[b] : qs[b + 1]]
        if qb.shape[0] == 0:
            continue
        ref = anchored_attention_reference(
            qb.transpose(0, 1)[None].double(),
            k.transpose(0, 1)[None].double(), v.transpose(0, 1)[None].double(),
            kb_b[None].double(), vs_b[None].double(), causal=causal,
        )  # fmt: skip
        got = out[qs[b] : qs[b + 1]].transpose(0, 1)[None].double()
        torch.testing.assert_close(got, ref, atol=2e-5, rtol=2e-5)


def test_paged_without_gates_is_plain_attention():
    q, kc, vc, table, lens, cu_q, _, _, dense = _paged_case([9, 4], [3, 4], Hq=2, Hkv=2)
    out = anchored_attention_paged(q, kc, vc, table, lens, cu_seqlens_q=cu_q, max_seqlen_q=4)
    qs = cu_q.tolist()
    for b, (k, v, _, _) in enumerate(dense):
        qb = q[qs[b] : qs[b + 1]].transpose(0, 1)[None]
        ref = torch.nn.functional.scaled_dot_product_attention(
            qb, k.transpose(0, 1)[None], v.transpose(0, 1)[None],
            attn_mask=torch.ones(qb.shape[2], k.shape[0], dtype=torch.bool).tril(
                k.shape[0] - qb.shape[2]
            ),
        )  # fmt: skip
        torch.testing.assert_close(out[qs[b] : qs[b + 1]], ref[0].transpose(0, 1))


def test_paged_validates_its_inputs():
    q, kc, vc, table, lens, cu_q, kb, vs, _ = _paged_case([5, 3], [5, 3])
    call = dict(cu_seqlens_q=cu_q, max_seqlen_q=5)
    with pytest.raises(ValueError, match="k_cache: expected 4 dims"):
        anchored_attention_paged(q, kc[0], vc, table, lens, **call)
    with pytest.raises(ValueError, match="key_bias_cache: expected shape"):
        anchored_attention_paged(q, kc, vc, table, lens, key_bias_cache=kb[:, :2], **call)
    with pytest.raises(TypeError, match="seq_lens: expected dtype int32"):
        anchored_attention_paged(q, kc, vc, table, lens.float(), **call)
    with pytest.raises(ValueError, match="cu_seqlens_q: expected batch \\+ 1"):
        anchored_attention_paged(q, kc, vc, table, lens[:1], **call)
    with pytest.raises(ValueError, match="expected 0 <= queries <= seq_len"):
        anchored_attention_paged(q, kc, vc, table, torch.tensor([2, 3], dtype=torch.int32),
                                 **call)  # fmt: skip
    bad = table.clone()
    bad[0, 0] = 10_000
    with pytest.raises(ValueError, match="block_table\\[0\\]: expected block ids"):
        anchored_attention_paged(q, kc, vc, bad, lens, **call)
    with pytest.raises(ValueError, match="max_seqlen_q: expected the longest|max_seqlen_q"):
        anchored_attention_paged(q, kc, vc, table, lens, cu_seqlens_q=cu_q, max_seqlen_q=2)
