"""Hardware limits of the backward launches the CPU interpreter would otherwise hide
(as tests/test_kernel_limits.py does for the forward): element offsets past 2^31, CUDA's
grid limits, explicit fp fusion at every launch, and the tile choice as a pure function
of (dtype, D, capability)."""

import math

import pytest
import torch
from test_kernel_limits import ROW_STRIDE

from videoanchor.kernels import launch as launch_mod
from videoanchor.kernels import triton_backward, triton_prefill
from videoanchor.kernels.interface import triton_interpret_enabled

CCS = [(8, 0), (8, 6), (8, 9), (9, 0)]


def _backward(q, k, v, kb, vs, out, lse, go, **kw):
    return triton_backward.launch_backward(
        go, q, k, v, kb, vs, None, None, out, lse, None, causal=True,
        sm_scale=1 / math.sqrt(q.shape[-1]), want_dbias=kb is not None,
        want_dscale=vs is not None, **kw,
    )  # fmt: skip


@pytest.mark.skipif(not triton_interpret_enabled(), reason="runs Triton's CPU interpreter")
def test_backward_offsets_past_2_31_elements():
    """q, k, v and dO rows 16.. lie past element 2^31 of one storage: with 32-bit offsets
    the kernels read wrapped addresses. The gradients equal, bit for bit, those of the
    same launch on contiguous copies."""
    n, D = 18, 16
    g = torch.Generator().manual_seed(4)
    store = torch.empty(ROW_STRIDE * n, dtype=torch.float16)
    views = [
        store.as_strided((1, 1, n, D), (0, 0, ROW_STRIDE, 1), storage_offset=i * D)
        for i in range(4)
    ]
    dense = [torch.randn(1, 1, n, D, generator=g).half() for _ in range(4)]
    for view, x in zip(views, dense, strict=True):
        view.copy_(x)
    assert (n - 1) * views[0].stride(2) >= 2**31
    s = torch.rand(1, n, generator=g)
    kb, vs = torch.log1p(9.5 * s), 1 + 2.5 * s
    out = torch.full_like(dense[0], float("nan"))
    lse = torch.full((1, 1, n), float("nan"))
    triton_prefill.launch_prefill(
        *dense[:3], kb, vs, None, out, lse, causal=True, sm_scale=1 / math.sqrt(D),
        interpret=True,
    )  # fmt: skip
    far = _backward(*views[:3], kb, vs, out, lse, views[3], interpret=True)
    near = _backward(*dense[:3], kb, vs, out, lse, dense[3], interpret=True)
    for name, a, b in zip(("dq", "dk", "dv", "dbias", "dscale"), far, near, strict=True):
        assert not a.isnan().any(), f"{name}: rows past 2^31 were never written"
        assert torch.equal(a, b), name


def test_backward_grid_within_cuda_limits_at_100k_batch_heads():
    """A packed batch of 25,000 sequences x 4 query heads: both backward grids stay within
    CUDA's limits and cover every (sequence, head, block)."""
    B, Hq, Hkv, D = 25_000, 4, 2, 16
    q = torch.randn(B, Hq, D)
    k = torch.randn(2 * B, Hkv, D)
    v = torch.randn_like(k)
    out, go = torch.zeros_like(q), torch.randn_like(q)
    lse = torch.zeros(Hq, B)
    cu_q = torch.arange(B + 1, dtype=torch.int32)
    with launch_mod.capture_launches() as launches:
        _backward(
            q, k, v, None, None, out, lse, go, interpret=False, capability=(9, 0),
            cu_seqlens_q=cu_q, cu_seqlens_k=2 * cu_q, max_seqlen_q=1, max_seqlen_k=2,
        )  # fmt: skip
    assert [rec.kernel.__name__ for rec in launches] == [
        "_anchored_bwd_dkdv_kernel", "_anchored_bwd_dq_kernel",
    ]  # fmt: skip
    for rec in launches:
        for n, limit in zip(rec.grid, launch_mod.GRID_LIMITS[: len(rec.grid)], strict=True):
            assert 1 <= n <= limit, f"{rec.kernel.__name__}: grid {rec.grid}"
    assert launches[0].grid == (B * Hkv, 1) and launches[1].grid == (B * Hq, 1)


def test_backward_grid_over_limit_raises():
    """A backward grid past a limit is a clear ValueError before any launch (x-axis limit
    lowered to 7 blocks: B * Hkv = 8 programs of dK/dV)."""
    q, k, v, go = (torch.randn(2, 4, 3, 16) for _ in range(4))
    out, lse = torch.zeros_like(q), torch.zeros(2, 4, 3)
    with launch_mod.capture_launches(grid_limits=(7, 65535, 65535)) as launches:
        with pytest.raises(ValueError, match="grid axis 0 needs 8 blocks, expected at most 7"):
            _backward(q, k, v, None, None, out, lse, go, interpret=True)
    assert launches == []  # nothing launched


def test_backward_tile_choice_and_fp_fusion():
    """backward_config is a pure function of (dtype, D, capability) with fp fusion chosen
    explicitly; every captured backward launch passes it and its kernel's own tiles."""
    for cc in [None, *CCS]:
        for dt in (torch.float16, torch.bfloat16, torch.float32):
            for D in (16, 64, 80, 128, 200, 256):
                c = triton_backward.backward_config(dt, D, cc)
                assert c == triton_backward.backward_config(dt, D, cc)
                assert c["enable_fp_fusion"] is True
                assert c["BLOCK_D"] == max(16, 2 ** math.ceil(math.log2(D)))
                assert c["DOT_PRECISION"] == ("ieee" if dt == torch.float32 else "tf32")
                tiles = {"BLOCK_M", "BLOCK_N", "num_warps", "num_stages"}
                assert set(c["dq"]) == tiles
                # fp32 dK/dV on sm_8x also sets a register budget (ptxas spilled without).
                budget = dt == torch.float32 and cc is not None and cc[0] < 9 and D <= 128
                assert set(c["dkdv"]) == (tiles | {"maxnreg"} if budget else tiles)
    # sm_90 keeps 64-row operands for wgmma in both kernels at D 128 (16-bit).
    c = triton_backward.backward_config(torch.bfloat16, 128, (9, 0))
    assert c["dkdv"]["BLOCK_N"] == 64 and c["dq"]["BLOCK_M"] == 64
    q, k, v, go = (torch.randn(1, 2, 5, 16) for _ in range(4))
    out, lse = torch.zeros_like(q), torch.zeros(1, 2, 5)
    kb = vs = torch.ones(1, 5)
    for cc in (None, (8, 0), (9, 0)):
        with launch_mod.capture_launches() as launches:
            _backward(q, k, v, kb, vs, out, lse, go, interpret=cc is None, capability=cc)
        cfg = triton_backward.backward_config(q.dtype, 16, cc)
        assert len(launches) == 2
        for rec, key in zip(launches, ("dkdv", "dq"), strict=True):
            assert rec.kwargs["enable_fp_fusion"] is True
            assert {n: rec.kwargs[n] for n in cfg[key]} == cfg[key]
