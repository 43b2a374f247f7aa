"""The paged Triton kernels (anchored_attention_paged(backend="triton"): the prefill kernel
and the split-KV decode kernel with PAGED on) through Triton's CPU interpreter, against the
float64 dense reference run on each sequence's gathered keys: scattered block tables, pages
smaller and larger than a key tile, odd lengths, chunked queries, GQA, sequences that read
the gates and ones that do not, vLLM's strided (num_blocks, Hkv, block_size, 2 * D) cache
views, fp32, fp16 and bf16 (through the test-only shim), outputs and every unused cache slot
poisoned with NaN."""

import pytest
import torch
from bf16_interpreter import bf16_interpreter
from bf16_interpreter import unavailable_reason as bf16_unavailable
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_attention import check_close, native_error

from videoanchor.kernels.interface import triton_interpret_enabled
from videoanchor.kernels.paged import PAGED_DECODE_MAX_Q, anchored_attention_paged
from videoanchor.kernels.reference import anchored_attention_reference


@pytest.fixture(autouse=True)
def _interpreter_or_gpu(request):
    """The CPU tests run Triton's interpreter; the GPU test runs without it. (A module-wide
    skip without the interpreter also skipped the GPU test on the first H100 lease.)"""
    if request.node.get_closest_marker("gpu") is None and not triton_interpret_enabled():
        pytest.skip("runs Triton's CPU interpreter (TRITON_INTERPRET=1)")


DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def paged_case(seq_lens, q_lens, *, Hq, Hkv, D, block_size, dtype, seed=0, vllm_layout=False):
    """Caches with scattered blocks; every slot no sequence owns (spare blocks, the tail of
    a sequence's last block) holds NaN in K, V and both gate caches."""
    g = torch.Generator().manual_seed(seed)
    need = [-(-n // block_size) for n in seq_lens]
    num_blocks = sum(need) + 3
    perm = torch.randperm(num_blocks, generator=g)
    table = torch.zeros(len(seq_lens), max(need, default=0) + 2, dtype=torch.int32)
    if vllm_layout:  # one tensor, keys then values along the last dim, as vLLM allocates it
        kv = torch.full((num_blocks, Hkv, block_size, 2 * D), float("nan")).to(dtype)
        k_cache, v_cache = kv[..., :D].transpose(1, 2), kv[..., D:].transpose(1, 2)
    else:
        k_cache = torch.full((num_blocks, block_size, Hkv, D), float("nan")).to(dtype)
        v_cache = torch.full_like(k_cache, float("nan"))
    kb = torch.full((num_blocks, block_size), float("nan"))
    vs = torch.full((num_blocks, block_size), float("nan"))
    dense, used = [], 0
    for b, n in enumerate(seq_lens):
        blocks = perm[used : used + need[b]]
        used += need[b]
        table[b, : need[b]] = blocks.to(torch.int32)
        pos = torch.arange(n)
        blk, off = blocks[pos // block_size], pos % block_size
        k = torch.randn(n, Hkv, D, generator=g).to(dtype)
        v = torch.randn(n, Hkv, D, generator=g).to(dtype)
        s = torch.rand(n, generator=g) * (torch.rand(n, generator=g) < 0.5)
        k_cache[blk, off], v_cache[blk, off] = k, v
        kb[blk, off], vs[blk, off] = torch.log1p(9.5 * s), 1 + 2.5 * s
        dense.append((k, v, torch.log1p(9.5 * s), 1 + 2.5 * s))
    q = torch.randn(sum(q_lens), Hq, D, generator=g).to(dtype)
    cu_q = torch.zeros(len(q_lens) + 1, dtype=torch.int32)
    cu_q[1:] = torch.cumsum(torch.tensor(q_lens, dtype=torch.int32), 0)
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    return q, k_cache, v_cache, table, lens, cu_q, kb, vs, dense


def check_against_reference(out, q, cu_q, dense, gated, causal, dtype, gates=True):
    """``gated``: per sequence, bool (all its queries read the gates or none) or an int
    count of its first queries that do."""
    assert not out.isnan().any(), "unwritten rows, or NaN from an unused slot"
    qs = cu_q.tolist()
    for b, (k, v, kb_b, vs_b) in enumerate(dense):
        nq = qs[b + 1] - qs[b]
        if nq == 0:
            continue
        if not gates:
            n_gated = 0
        elif gated.dtype == torch.bool:
            n_gated = nq if bool(gated[b]) else 0
        else:
            n_gated = min(int(gated[b]), nq)
        args = (q[None, qs[b] : qs[b + 1]].transpose(1, 2), k[None].transpose(1, 2),
                v[None].transpose(1, 2))  # fmt: skip
        got = out[None, qs[b] : qs[b + 1]].transpose(1, 2)
        for rows, (kb_r, vs_r) in (
            (slice(0, n_gated), (kb_b, vs_b)),
            (slice(n_gated, nq), (torch.zeros_like(kb_b), torch.ones_like(vs_b))),
        ):
            if rows.start == rows.stop:
                continue
            ref = anchored_attention_reference(*args, kb_r[None], vs_r[None], causal=causal)
            base = native_error(*args, kb_r[None], vs_r[None], None, causal, ref)
            check_close(got[:, :, rows], ref[:, :, rows], base, dtype)


def run(case, gated, causal, dtype, gates=True, **kw):
    q, kc, vc, table, lens, cu_q, kb, vs, _ = case
    out = torch.full_like(q, float("nan"))
    ctx = bf16_interpreter() if dtype == torch.bfloat16 else _null()
    with ctx:
        res = anchored_attention_paged(
            q, kc, vc, table, lens, cu_seqlens_q=cu_q, max_seqlen_q=int((cu_q[1:] - cu_q[:-1]).max()),
            key_bias_cache=kb if gates else None, value_scale_cache=vs if gates else None,
            seq_gated=gated, causal=causal, backend="triton", out=out, **kw,
        )  # fmt: skip
    assert res is out
    return out


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _dtype_param(name):
    marks = ()
    if name == "bf16" and bf16_unavailable() is not None:
        marks = pytest.mark.skip(reason=str(bf16_unavailable()))
    return pytest.param(DTYPES[name], id=name, marks=marks)


ALL_DTYPES = [_dtype_param(n) for n in DTYPES]
# (seq_lens, q_lens): prefill kernel (longest query > PAGED_DECODE_MAX_Q): whole prompts,
# chunked continuations and a decode row in one batch; decode kernel: one to three queries
# per sequence (speculative steps), a sequence with no keys, one shorter than a page.
PREFILL = ([37, 5, 50, 9], [37, 5, 20, 1])
DECODE = ([70, 3, 41, 0, 18], [1, 3, 2, 0, 1])


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("block_size", [4, 32], ids=["page4", "page32"])
@pytest.mark.parametrize("kind", ["prefill", "decode"])
def test_paged_kernels_match_reference(kind, block_size, dtype):
    seq_lens, q_lens = PREFILL if kind == "prefill" else DECODE
    assert (max(q_lens) > PAGED_DECODE_MAX_Q) == (kind == "prefill")
    case = paged_case(seq_lens, q_lens, Hq=6, Hkv=2, D=24, block_size=block_size, dtype=dtype)
    gated = torch.tensor([True, False, True, True, False][: len(seq_lens)])
    out = run(case, gated, True, dtype)
    check_against_reference(out, case[0], case[5], case[8], gated, True, dtype)


@pytest.mark.parametrize("dtype", [DTYPES["fp32"], _dtype_param("bf16")])
@pytest.mark.parametrize("kind", ["prefill", "decode"])
def test_paged_counts_of_gated_queries(kind, dtype):
    """int32 seq_gated: only each sequence's first n queries read the gates (a preempted
    request recomputing its prompt and the tokens it generated). Counts inside a query
    block, at 0, at and past the query count."""
    seq_lens, q_lens = PREFILL if kind == "prefill" else DECODE
    counts = [21, 0, 40, 1] if kind == "prefill" else [1, 2, 0, 7, 0]
    case = paged_case(seq_lens, q_lens, Hq=4, Hkv=2, D=16, block_size=8, dtype=dtype, seed=4)
    gated = torch.tensor(counts, dtype=torch.int32)
    out = run(case, gated, True, dtype)
    check_against_reference(out, case[0], case[5], case[8], gated, True, dtype)
    # int32 counts reach the kernels unclamped: a negative count reads as 0
    negative = torch.where(gated == 0, -3, gated).to(torch.int32)
    assert torch.equal(run(case, negative, True, dtype), out)
    torch_out = anchored_attention_paged(
        case[0], *case[1:5], cu_seqlens_q=case[5], max_seqlen_q=max(q_lens),
        key_bias_cache=case[6], value_scale_cache=case[7], seq_gated=gated, backend="torch",
    )  # fmt: skip
    check_against_reference(torch_out, case[0], case[5], case[8], gated, True, dtype)


@pytest.mark.parametrize("kind", ["prefill", "decode"])
def test_paged_vllm_layout_no_gates_non_causal(kind):
    """vLLM's cache is one (num_blocks, Hkv, block_size, 2 * D) tensor: K and V are strided
    views. Also: no gate caches at all, and bidirectional attention."""
    seq_lens, q_lens = PREFILL if kind == "prefill" else DECODE
    case = paged_case(seq_lens, q_lens, Hq=4, Hkv=4, D=16, block_size=16, dtype=torch.float32,
                      vllm_layout=True, seed=1)  # fmt: skip
    assert not case[1].is_contiguous()
    for gates in (False, True):
        out = run(case, None, False, torch.float32, gates=gates)
        ones = torch.ones(len(seq_lens), dtype=torch.bool)
        check_against_reference(out, case[0], case[5], case[8], ones, False, torch.float32,
                                gates=gates)  # fmt: skip


@pytest.mark.parametrize("num_splits", [1, 3, 8])
def test_paged_decode_any_split_count(num_splits):
    """A fixed split count (what a CUDA graph captures) never drops or double-counts keys,
    with splits longer and shorter than a sequence; validate=False gives the same bits."""
    case = paged_case(*DECODE, Hq=4, Hkv=1, D=16, block_size=8, dtype=torch.float32, seed=2)
    gated = torch.tensor([1, 1, 0, 1, 1], dtype=torch.bool)
    out = run(case, gated, True, torch.float32, num_splits=num_splits)
    check_against_reference(out, case[0], case[5], case[8], gated, True, torch.float32)
    again = run(case, gated, True, torch.float32, num_splits=num_splits, validate=False)
    assert torch.equal(out, again)


def test_triton_equals_torch_path():
    case = paged_case(*PREFILL, Hq=4, Hkv=2, D=16, block_size=16, dtype=torch.float32, seed=3)
    q, kc, vc, table, lens, cu_q, kb, vs, _ = case
    gated = torch.tensor([30, 0, 20, 1], dtype=torch.int32)
    common = dict(cu_seqlens_q=cu_q, max_seqlen_q=37, key_bias_cache=kb, value_scale_cache=vs,
                  seq_gated=gated)  # fmt: skip
    tri = anchored_attention_paged(q, kc, vc, table, lens, backend="triton", **common)
    ref = anchored_attention_paged(q, kc, vc, table, lens, backend="torch", **common)
    torch.testing.assert_close(tri, ref, atol=2e-5, rtol=2e-5)


def test_paged_rejects_bad_inputs():
    q, kc, vc, table, lens, cu_q, kb, vs, _ = paged_case(
        [5, 3], [5, 3], Hq=2, Hkv=1, D=16, block_size=4, dtype=torch.float32
    )
    call = dict(cu_seqlens_q=cu_q, max_seqlen_q=5, backend="triton")
    with pytest.raises(ValueError, match=r"seq_gated: expected shape \(batch,\)"):
        anchored_attention_paged(
            q, kc, vc, table, lens, seq_gated=torch.ones(3, dtype=torch.int32), **call
        )
    with pytest.raises(TypeError, match="seq_gated: expected dtype bool"):
        anchored_attention_paged(q, kc, vc, table, lens, seq_gated=torch.ones(2), **call)
    with pytest.raises(ValueError, match="out: expected shape"):
        anchored_attention_paged(q, kc, vc, table, lens, out=q[:3], **call)
    with pytest.raises(ValueError, match="backend: expected"):
        anchored_attention_paged(q, kc, vc, table, lens, **dict(call, backend="cuda"))
    with pytest.raises(ValueError, match="has 5 queries, expected at most max_seqlen_q=4"):
        anchored_attention_paged(q, kc, vc, table, lens, **dict(call, max_seqlen_q=4))
    with pytest.raises(ValueError, match="num_splits: expected a positive int"):
        anchored_attention_paged(q[:2], kc, vc, table, lens,
                                 **dict(call, cu_seqlens_q=torch.tensor([0, 1, 2], dtype=torch.int32),
                                        max_seqlen_q=1), num_splits=0)  # fmt: skip


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=st.data(),
    batch=st.integers(1, 3),
    group=st.sampled_from([1, 2, 3]),
    block_size=st.sampled_from([1, 3, 8, 16]),
    decode=st.booleans(),
    causal=st.booleans(),
)
def test_paged_property(data, batch, group, block_size, decode, causal):
    """Hypothesis: any lengths (0 included), page sizes that do not divide a key tile,
    GQA groups, both kernels, gated or not per sequence or per leading query; against the
    float64 reference."""
    seq_lens = data.draw(st.lists(st.integers(0, 40), min_size=batch, max_size=batch))
    hi_q = 3 if decode else PAGED_DECODE_MAX_Q + 8
    q_lens = [data.draw(st.integers(0, min(n, hi_q))) for n in seq_lens]
    if not decode and max(q_lens) <= PAGED_DECODE_MAX_Q:
        q_lens[0] = seq_lens[0] = max(seq_lens[0], PAGED_DECODE_MAX_Q + 1)
    if max(q_lens) == 0:
        q_lens[0] = seq_lens[0] = max(seq_lens[0], 1)
    if data.draw(st.booleans()):
        gated = torch.tensor(data.draw(st.lists(st.booleans(), min_size=batch, max_size=batch)))
    else:
        gated = torch.tensor([data.draw(st.integers(0, n + 1)) for n in q_lens], dtype=torch.int32)
    case = paged_case(seq_lens, q_lens, Hq=2 * group, Hkv=2, D=16, block_size=block_size,
                      dtype=torch.float32, seed=data.draw(st.integers(0, 99)))  # fmt: skip
    out = run(case, gated, causal, torch.float32)
    check_against_reference(out, case[0], case[5], case[8], gated, causal, torch.float32)


@pytest.mark.parametrize("lens", [DECODE, PREFILL], ids=["decode", "prefill"])
def test_paged_launch_reads_nothing_back_to_the_host(lens):
    """With validate=False the launcher never needs a device value on the host (what a CUDA
    graph capture and an asynchronous engine step need): under FakeTensorMode tensors have
    no data, so any ``.item()``/``.tolist()``/``bool(t)`` raises. validate=True does read."""
    from torch._subclasses.fake_tensor import DataDependentOutputException, FakeTensorMode

    from videoanchor.kernels import launch

    seq_lens, q_lens = lens
    case = paged_case(seq_lens, q_lens, Hq=4, Hkv=2, D=16, block_size=4, dtype=torch.float16)
    mode = FakeTensorMode()
    with mode:
        q, kc, vc, table, lens_t, cu_q, kb, vs = (mode.from_tensor(t) for t in case[:8])
        gated = torch.ones(len(seq_lens), dtype=torch.bool)
        call = dict(cu_seqlens_q=cu_q, max_seqlen_q=max(q_lens), key_bias_cache=kb,
                    value_scale_cache=vs, seq_gated=gated, backend="triton")  # fmt: skip
        with launch.capture_launches() as launches:
            anchored_attention_paged(q, kc, vc, table, lens_t, validate=False, **call)
        with pytest.raises(DataDependentOutputException):
            anchored_attention_paged(q, kc, vc, table, lens_t, validate=True, **call)
    names = [rec.kernel.__name__ for rec in launches]
    kind = "prefill" if max(q_lens) > PAGED_DECODE_MAX_Q else "decode"
    assert names == (
        ["_anchored_prefill_kernel"]
        if kind == "prefill"
        else ["_anchored_decode_split_kernel", "_anchored_decode_merge_kernel"]
    )


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_gpu_paged_in_a_cuda_graph(dtype):
    """On a GPU: both kernels against the float64 reference, then captured in a CUDA graph
    (validate=False, fixed num_splits) and replayed after the sequence lengths, gates and
    flags changed in place: the replay equals an eager call on the new values."""
    for seq_lens, q_lens in (DECODE, ([300, 41, 77], [1, 1, 1]), PREFILL):
        case = paged_case(seq_lens, q_lens, Hq=28, Hkv=4, D=128, block_size=16, dtype=dtype)
        case = tuple(t.cuda() if torch.is_tensor(t) else t for t in case[:8]) + (case[8],)
        q, kc, vc, table, lens, cu_q, kb, vs = case[:8]
        gated = torch.tensor([9, 0, 1, 1, 0][: len(seq_lens)], dtype=torch.int32, device="cuda")
        out = torch.full_like(q, float("nan"))
        call = dict(cu_seqlens_q=cu_q, max_seqlen_q=max(q_lens), key_bias_cache=kb,
                    value_scale_cache=vs, seq_gated=gated, backend="triton", out=out,
                    num_splits=4)  # fmt: skip
        anchored_attention_paged(q, kc, vc, table, lens, **call)
        dense = [tuple(t.cuda() for t in d) for d in case[8]]
        check_against_reference(out, q, cu_q, dense, gated.cpu(), True, dtype)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            anchored_attention_paged(q, kc, vc, table, lens, validate=False, **call)
        lens.sub_(torch.minimum(lens - (cu_q[1:] - cu_q[:-1]), torch.ones_like(lens)))
        kb.mul_(0.5)
        gated.copy_(torch.flip(gated, [0]))
        out.fill_(float("nan"))
        graph.replay()
        eager = torch.empty_like(q)
        anchored_attention_paged(q, kc, vc, table, lens, **dict(call, out=eager))
        torch.testing.assert_close(out, eager, atol=0, rtol=0)
