"""Every kernel compiled for real CUDA targets on the CPU (no GPU, no driver: Triton's
bundled ptxas), through the package's own launchers with their real-GPU tile choice.

Asserts, per configuration: it compiles; ptxas spills nothing; shared memory fits the
architecture; the 16-bit prefill uses wgmma on sm_90. A representative subset of the
matrix in benchmarks/compile_report.py, so CI stays within its budget.
"""

import pytest
from compile_cases import compile_cases

P, D_ = "prefill", "decode"
# (id, case, compute capabilities)
CASES = [
    ("prefill-bf16-d128-causal-gates", dict(kind=P, dtype="bf16", D=128), (80, 86, 90)),
    ("prefill-fp16-d64-full-mask-lse",
     dict(kind=P, dtype="fp16", D=64, causal=False, gates=False, mask=True, lse=True), (90,)),
    ("prefill-bf16-d64-gates-mask", dict(kind=P, dtype="bf16", D=64, mask=True), (80,)),
    ("prefill-fp16-d96-full-mask", dict(kind=P, dtype="fp16", D=96, causal=False, mask=True), (80,)),
    ("prefill-bf16-d80-cache-lse", dict(kind=P, dtype="bf16", D=80, cache_seqlens=True, lse=True),
     (90,)),
    ("prefill-bf16-d256-varlen", dict(kind=P, dtype="bf16", D=256, varlen=True), (80, 90)),
    ("prefill-fp32-d128-causal-gates", dict(kind=P, dtype="fp32", D=128), (90,)),
    ("prefill-fp32-d96-mask-lse", dict(kind=P, dtype="fp32", D=96, mask=True, lse=True), (80, 90)),
    ("decode-fp32-d128-g1-sq64", dict(kind=D_, dtype="fp32", D=128, group=1, Sq=64), (80, 90)),
    ("prefill-fp32-d80-gates", dict(kind=P, dtype="fp32", D=80), (80,)),
    ("decode-bf16-d128-g7-cache", dict(kind=D_, dtype="bf16", D=128, group=7, cache_seqlens=True),
     (90,)),
    ("decode-fp16-d128-g8-mask-lse",
     dict(kind=D_, dtype="fp16", D=128, group=8, mask=True, lse=True), (80,)),
    ("decode-bf16-d64-g1-varlen", dict(kind=D_, dtype="bf16", D=64, group=1, varlen=True), (80,)),
    # The fast form (the gates folded: fold_gates, one launch).
    ("prefill-bf16-d128-fast", dict(kind=P, dtype="bf16", D=128, fast=True), (80, 86, 90)),
    ("prefill-fp16-d64-fast-varlen", dict(kind=P, dtype="fp16", D=64, fast=True, varlen=True),
     (90,)),
    # fp16 with a declared range: the row sums on the tensor cores (FOLD 2; sm_90: the
    # Hopper loop's 128 x 128 tiles, the rows reinterpreted; sm_8x and a padding mask: the
    # rows read again as fp16).
    ("prefill-fp16-d128-full-fast", dict(kind=P, dtype="fp16", D=128, causal=False, fast=True),
     (80, 86, 90)),
    ("prefill-fp16-d128-fast-mask", dict(kind=P, dtype="fp16", D=128, fast=True, mask=True),
     (80, 90)),
    # The Hopper loop's float32 row sum (FOLD 1: no range) at D 128: 128 x 128 tiles spilled
    # 28 B non-causal (triton 3.9); it keeps 128 x 64.
    ("prefill-fp16-d128-full-fast-f32sum",
     dict(kind=P, dtype="fp16", D=128, causal=False, fast=True, range=None), (90,)),
    # With a padding mask (batched VLM prompts): 128 x 64 tiles at 255 registers on sm_90.
    ("prefill-bf16-d128-fast-mask-lse",
     dict(kind=P, dtype="bf16", D=128, fast=True, mask=True, lse=True), (80, 90)),
    # Paged (vLLM's layout: K and V strided views of one cache, 16-slot blocks, per-slot
    # gates read through the block table, general form).
    ("paged-prefill-bf16-d128-g7",
     dict(kind=P, dtype="bf16", D=128, paged=True, seq_gated=True), (80, 86, 90)),
    ("paged-prefill-fp16-d64-g4", dict(kind=P, dtype="fp16", D=64, group=4, paged=True), (90,)),
    ("paged-prefill-fp32-d128-g7", dict(kind=P, dtype="fp32", D=128, paged=True), (80, 90)),
    ("paged-decode-bf16-d128-g7",
     dict(kind=D_, dtype="bf16", D=128, paged=True, seq_gated=True), (80, 90)),
    ("paged-decode-fp16-d64-g4-sq4",
     dict(kind=D_, dtype="fp16", D=64, group=4, Sq=4, paged=True), (90,)),
    ("paged-decode-fp32-d128-g7", dict(kind=D_, dtype="fp32", D=128, paged=True), (80, 86)),
]  # fmt: skip
IDS = [f"{name}-sm{cc}" for name, _, ccs in CASES for cc in ccs]


@pytest.fixture(scope="module")
def compiled():
    return compile_cases([(case, cc) for _, case, ccs in CASES for cc in ccs])


@pytest.mark.parametrize(
    "name, case, cc", [(n, c, cc) for n, c, ccs in CASES for cc in ccs], ids=IDS
)
def test_compiles_without_spills_within_shared_memory(compiled, name, case, cc):
    rows = compiled[(repr(case), cc)]
    assert rows, f"{name}: nothing compiled for sm_{cc}"
    errors = [r["error"] for r in rows if "error" in r]
    assert not errors, f"{name} sm_{cc}: {errors[0]}"
    kernels = {r["kernel"] for r in rows}
    expected = (
        {"_anchored_prefill_kernel"}
        if case["kind"] == P
        else {"_anchored_decode_split_kernel", "_anchored_decode_merge_kernel"}
    )
    assert kernels == expected
    for r in rows:
        where = f"{r['kernel']} {name} sm_{cc}"
        assert r["spill_stores"] == 0 and r["spill_loads"] == 0, (
            f"{where}: ptxas spills {r['spill_stores']} B stores / {r['spill_loads']} B loads "
            f"at {r['registers']} registers"
        )
        assert 0 <= r["shared_bytes"] <= r["shared_limit"], f"{where}: shared {r['shared_bytes']}"
        assert r["shared_bytes"] > 0, where
        assert r["ctas_per_sm"] >= 1
        assert r["enable_fp_fusion"] is True, f"{where}: fp fusion not chosen explicitly"
        if cc == 86:
            # sm_86/89 have 100 KB per SM: leave headroom below the 99 KB block limit.
            assert r["shared_bytes"] <= r["shared_limit"] - 8192, f"{where}: {r['shared_bytes']}"
        if r["kernel"] == "_anchored_prefill_kernel" and case["dtype"] != "fp32" and cc == 90:
            assert r["mma"] == "wgmma", f"{where}: expected wgmma, got {r['mma']}"
        if r["kernel"] != "_anchored_decode_merge_kernel" and case["dtype"] != "fp32":
            assert r["mma"] != "none (FMA)", f"{where}: 16-bit dots compiled to FMA loops"
