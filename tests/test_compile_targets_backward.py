"""The backward kernels (dK/dV and dQ) compiled for real CUDA targets on the CPU, through
the package's own launcher with its real-GPU tile choice (videoanchor.kernels.aot, as
tests/test_compile_targets.py does for the forward kernels).

Asserts, per configuration: both kernels compile; ptxas spills nothing; shared memory fits
the architecture (with headroom on sm_86); fp fusion was chosen by the launcher; 16-bit
dots use tensor cores, wgmma on sm_90. Every figure is static, read from compiled code.
"""

import pytest
from compile_cases import compile_cases

B_ = "backward"
# (id, case, compute capabilities); prefill-shaped inputs (Qwen2.5-7B heads: 28 query
# heads over 4 KV heads unless group says otherwise), gates unless gates=False.
CASES = [
    ("bwd-bf16-d128-causal-gates-gqa", dict(kind=B_, dtype="bf16", D=128), (80, 86, 90)),
    ("bwd-fp16-d128-causal-gates-mask", dict(kind=B_, dtype="fp16", D=128, mask=True), (80, 90)),
    ("bwd-bf16-d64-full-gates-mask",
     dict(kind=B_, dtype="bf16", D=64, causal=False, mask=True), (80, 90)),
    ("bwd-fp16-d64-causal-cache-dlse",
     dict(kind=B_, dtype="fp16", D=64, cache_seqlens=True, grad_lse=True), (86, 90)),
    ("bwd-fp16-d64-mha-nogates", dict(kind=B_, dtype="fp16", D=64, group=1, gates=False), (80,)),
    ("bwd-fp32-d128-causal-gates-mask", dict(kind=B_, dtype="fp32", D=128, mask=True), (80, 90)),
    ("bwd-bf16-d128-varlen", dict(kind=B_, dtype="bf16", D=128, varlen=True), (80, 90)),
    # fp32 dK/dV spilled 16 B on sm_86 in 8 warps until it got a register budget (maxnreg).
    ("bwd-fp32-d80-causal-gates", dict(kind=B_, dtype="fp32", D=80), (86,)),
    ("bwd-fp32-d128-full-gates-mask", dict(kind=B_, dtype="fp32", D=128, causal=False,
                                           mask=True), (86,)),
]  # fmt: skip
JOBS = [(n, c, cc) for n, c, ccs in CASES for cc in ccs]
KERNELS = {"_anchored_bwd_dkdv_kernel", "_anchored_bwd_dq_kernel"}


@pytest.fixture(scope="module")
def compiled():
    return compile_cases([(case, cc) for _, case, cc in JOBS])


@pytest.mark.parametrize("name, case, cc", JOBS, ids=[f"{n}-sm{cc}" for n, _, cc in JOBS])
def test_backward_compiles_without_spills_within_shared_memory(compiled, name, case, cc):
    rows = compiled[(repr(case), cc)]
    assert rows, f"{name}: nothing compiled for sm_{cc}"
    errors = [r["error"] for r in rows if "error" in r]
    assert not errors, f"{name} sm_{cc}: {errors[0]}"
    assert sorted(r["kernel"] for r in rows) == sorted(KERNELS)
    for r in rows:
        where = f"{r['kernel']} {name} sm_{cc}"
        assert r["spill_stores"] == 0 and r["spill_loads"] == 0, (
            f"{where}: ptxas spills {r['spill_stores']} B stores / {r['spill_loads']} B loads "
            f"at {r['registers']} registers"
        )
        assert 0 < r["shared_bytes"] <= r["shared_limit"], f"{where}: shared {r['shared_bytes']}"
        assert r["ctas_per_sm"] >= 1
        assert r["enable_fp_fusion"] is True, f"{where}: fp fusion not chosen explicitly"
        # Every launch's offsets: the grid is (batch * heads, sequence blocks).
        assert len(r["grid"]) == 2 and r["grid"][0] >= 2
        if cc == 86:
            # sm_86/89 have 100 KB per SM: leave headroom below the 99 KB block limit.
            assert r["shared_bytes"] <= r["shared_limit"] - 8192, f"{where}: {r['shared_bytes']}"
        if case["dtype"] != "fp32":
            expected = "wgmma" if cc == 90 else "mma.sync"
            assert r["mma"] == expected, f"{where}: expected {expected}, got {r['mma']}"
        else:
            assert r["constexprs"]["DOT_PRECISION"] == "ieee", where
