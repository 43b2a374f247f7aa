"""Hardware limits the CPU interpreter would otherwise hide: element offsets past 2^31
(a position times a stride must be computed in 64 bits) and CUDA's grid limits."""

import math
import warnings

import pytest
import torch

from videoanchor.kernels import interface as api
from videoanchor.kernels import launch as launch_mod
from videoanchor.kernels import triton_decode, triton_prefill
from videoanchor.kernels.reference import anchored_attention_reference

# Rows of q, k, v and out are 2^27 + 64 elements apart in one storage, so row 16 sits
# past element 2^31: a 32-bit `position * stride` wraps there. The storage is ~4.8 GB of
# untouched virtual memory; only the few pages the kernel reads or writes become real.
ROW_STRIDE = 2**27 + 64


def _huge_strided(n_rows, D, dtype, seed):
    """q, k, v, out as (1, 1, n_rows, D) views of one huge storage (rows ROW_STRIDE apart,
    the four tensors interleaved inside a row), plus contiguous copies of q, k, v."""
    g = torch.Generator().manual_seed(seed)
    if ROW_STRIDE * n_rows * torch.finfo(dtype).bits // 8 > 5 * 2**30:
        raise ValueError("test storage too large")
    store = torch.empty(ROW_STRIDE * n_rows, dtype=dtype)
    views = [
        store.as_strided((1, 1, n_rows, D), (0, 0, ROW_STRIDE, 1), storage_offset=i * D)
        for i in range(4)
    ]
    q, k, v, out = views
    dense = []
    for t in (q, k, v):
        x = torch.randn(1, 1, n_rows, D, generator=g).to(dtype)
        t.copy_(x)
        dense.append(x)
    out.fill_(float("nan"))
    return q, k, v, out, dense


@pytest.mark.skipif(not api.triton_interpret_enabled(), reason="runs Triton's CPU interpreter")
@pytest.mark.parametrize("path", ["prefill", "decode"])
def test_offsets_past_2_31_elements(path):
    """Positions 16.. of q, k, v and out lie past element 2^31 of their storage: with
    32-bit offsets the kernel reads and writes wrapped addresses (garbage or a crash)."""
    n, D = 18, 16
    q, k, v, out, (qd, kd, vd) = _huge_strided(n, D, torch.float16, seed=1)
    assert (n - 1) * q.stride(2) >= 2**31
    s = torch.rand(1, n, generator=torch.Generator().manual_seed(2))
    kb, vs = torch.log1p(9.5 * s), 1 + 2.5 * s
    lse = torch.full((1, 1, n), float("nan"))
    launch = triton_prefill.launch_prefill if path == "prefill" else triton_decode.launch_decode
    launch(
        q, k, v, kb, vs, None, out, lse, causal=True, sm_scale=1 / math.sqrt(D),
        interpret=True,
    )  # fmt: skip
    assert not out.isnan().any(), "rows past 2^31 were never written"
    # The same launch on contiguous copies runs the same arithmetic: equal bits.
    dense_out = torch.full_like(qd, float("nan"))
    launch(
        qd, kd, vd, kb, vs, None, dense_out, None, causal=True, sm_scale=1 / math.sqrt(D),
        interpret=True,
    )  # fmt: skip
    assert torch.equal(out, dense_out)
    ref = anchored_attention_reference(qd, kd, vd, kb, vs, causal=True)
    torch.testing.assert_close(out.double(), ref, atol=2e-3, rtol=2e-3)  # fp16 rounding


def _capture(launch_fn, *args, **kwargs):
    with launch_mod.capture_launches() as launches:
        launch_fn(*args, **kwargs)
    return launches


@pytest.mark.parametrize("path", ["prefill", "decode"])
def test_grid_within_cuda_limits_at_100k_batch_heads(path):
    """A packed batch of 25,000 sequences x 4 query heads (B * Hq = 100,000): every grid
    axis stays within CUDA's limits (the interpreter never checks them; a GPU refuses
    the launch) and the grid still covers every (sequence, head, block)."""
    B, Hq, Hkv, D = 25_000, 4, 2, 16
    assert B * Hq == 100_000
    q = torch.randn(B, Hq, D)
    k = torch.randn(2 * B, Hkv, D)
    v = torch.randn_like(k)
    out = torch.empty_like(q)
    cu_q = torch.arange(B + 1, dtype=torch.int32)
    cu_k = 2 * cu_q
    fn = triton_prefill.launch_prefill if path == "prefill" else triton_decode.launch_decode
    launches = _capture(
        fn, q, k, v, None, None, None, out, None, causal=True, sm_scale=0.25, interpret=False,
        cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=1, capability=(9, 0),
    )  # fmt: skip
    assert launches
    for rec in launches:
        for n, limit in zip(rec.grid, launch_mod.GRID_LIMITS[: len(rec.grid)], strict=True):
            assert 1 <= n <= limit, f"{rec.kernel.__name__}: grid {rec.grid}"
    programs = [math.prod(rec.grid) for rec in launches]
    if path == "prefill":
        assert programs == [B * Hq]  # one query block per (sequence, head)
    else:
        assert launches[0].grid[0] == B * Hkv and programs[1] == B * Hq


def test_grid_over_limit_raises():
    """A grid past a limit is a clear ValueError before any launch (shown with the x-axis
    limit lowered to 7 blocks); CUDA's own limits take the same grid."""
    q, k, v = (torch.randn(2, 4, 3, 16) for _ in range(3))
    out = torch.empty_like(q)
    with launch_mod.capture_launches(grid_limits=(7, 65535, 65535)) as launches:
        with pytest.raises(ValueError, match="grid axis 0 needs 8 blocks, expected at most 7"):
            triton_prefill.launch_prefill(
                q, k, v, None, None, None, out, None, causal=True, sm_scale=0.25, interpret=True
            )
    assert launches == []  # nothing launched
    with launch_mod.capture_launches() as launches:
        triton_prefill.launch_prefill(
            q, k, v, None, None, None, out, None, causal=True, sm_scale=0.25, interpret=True
        )
    assert [rec.grid for rec in launches] == [(8,)]


@pytest.mark.parametrize(
    "cc, expected",
    [
        ((7, 5), "torch"),
        ((8, 0), "triton"),
        ((8, 6), "triton"),
        ((8, 9), "triton"),
        ((9, 0), "triton"),
    ],
    ids=["sm75", "sm80", "sm86", "sm89", "sm90"],
)
def test_auto_backend_by_compute_capability(cc, expected):
    """backend='auto' never launches a kernel the device cannot run: sm_75 falls back to
    the exact torch path with one warning saying why; explicit 'triton' there raises."""
    api.reset_warnings()  # the fallback warns once per process: this test sees its first
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            got = api.choose_backend("auto", is_cuda=True, capability=cc, head_dim=128)
            assert got == expected
    messages = [str(w.message) for w in caught]
    if expected == "torch":
        assert len(messages) == 1 and "compute capability >= 8.0, got 7.5" in messages[0]
        with pytest.raises(ValueError, match="compute capability >= 8.0, got 7.5"):
            api.choose_backend("triton", is_cuda=True, capability=cc, head_dim=128)
    else:
        assert messages == []
    assert api.choose_backend("auto", is_cuda=False, capability=None, head_dim=128) == "torch"
    with pytest.warns(UserWarning, match="expected head dim in \\[16, 256\\], got 512"):
        assert api.choose_backend("auto", is_cuda=True, capability=cc, head_dim=512) == "torch"


def test_tile_choice_by_compute_capability():
    """The launchers' tile choice is a pure function of (dtype, D, capability): sm_86/89
    (99 KB per block) get smaller key blocks than sm_90 (227 KB), and the
    interpreter (None) its own small tiles. Their compiled shared memory is checked in
    tests/test_compile_targets.py."""
    cfg = {cc: triton_prefill.prefill_config(torch.bfloat16, 128, cc) for cc in CCS}
    assert cfg[(8, 6)] == cfg[(8, 9)]
    assert (cfg[(8, 6)]["BLOCK_N"], cfg[(9, 0)]["BLOCK_N"]) == (32, 64)
    assert triton_prefill.prefill_config(torch.bfloat16, 128, None)["BLOCK_M"] == 16
    for cc in CCS:
        for dt in (torch.float16, torch.bfloat16, torch.float32):
            for D in (16, 64, 80, 128, 200, 256):
                c = triton_prefill.prefill_config(dt, D, cc)
                assert c["enable_fp_fusion"] is True
                assert c["DOT_PRECISION"] == ("tf32" if dt != torch.float32 else c["DOT_PRECISION"])
                c = triton_decode.decode_config(dt, D, cc)
                assert c["enable_fp_fusion"] is True


CCS = [(8, 0), (8, 6), (8, 9), (9, 0)]


@pytest.mark.parametrize("path", ["prefill", "decode"])
def test_fp_fusion_chosen_at_every_launch(path):
    """Every launch passes enable_fp_fusion itself (Triton 3.10 changes the default)."""
    q, k, v = (torch.randn(1, 2, 5, 16) for _ in range(3))
    out = torch.empty_like(q)
    fn = triton_prefill.launch_prefill if path == "prefill" else triton_decode.launch_decode
    for cc in (None, (8, 0), (9, 0)):
        launches = _capture(
            fn, q, k, v, None, None, None, out, None, causal=True, sm_scale=0.25,
            interpret=cc is None, capability=cc,
        )  # fmt: skip
        assert len(launches) == (1 if path == "prefill" else 2)
        assert all(rec.kwargs.get("enable_fp_fusion") is True for rec in launches)
