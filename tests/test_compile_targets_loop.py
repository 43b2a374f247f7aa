"""The prefill kernel's main loop on sm_90, read from the SASS of the package's own launch
(Triton's bundled ptxas and nvdisasm, no GPU): the anchored loop against the plain one.

STATIC figures: instruction counts of the loop over the key blocks every row sees (bf16,
D 128, causal, the real sm_90 tiles: 128 x 64 in 8 warps, 512 keys), registers and spills
from ptxas. The issue's targets are anchored <= plain + 3% instructions and registers <=
plain + 8. What the fast form reaches (compile_loop_triton36_static.json, with the form
before it in compile_loop_triton36_static_71cbffb.json): triton 3.9, 443 against 434
instructions (1.021x; before 469, 1.081x) and 180 against 163 registers (before 199);
triton 3.6 (the GPU machine's), 425 against 411 (1.034x; before 445, 1.083x) and 212
against 157 registers (before 191). The bounds below hold the installed Triton's (3.9)
with a little slack for ptxas's scheduling, so a change that adds work to the loop fails
here; the instruction bound is the issue's target, the register bound is not.

Where the rest goes (the SASS, triton 3.9): the row sum is on the tensor cores (the bf16 P
tile times each key's row of 1 / scale, 4 HGMMA.64x16 a tile, its accumulator rescaled by 8
FFMA), so the plain loop's per-logit row-sum adds and its 4 shuffles are gone, and the
logits cost what plain's do (one FFMA applies the scale and the gates, one FADD the
maximum; plain: an FMUL and an FFMA). Above plain: the bias read back from shared memory
(8 LDS.64 a thread a tile), two more pipelined copies (the bias vector and the 64 x 16
rows: LDGSTS, LDGDEPBAR, their ring counters and addresses), the row-sum MMA's descriptors
and fence; and one wait more a tile (the FMA consumes the product at once: the forms that
avoid that wait made triton 3.6's ptxas serialise every wgmma). Triton 3.6 copies the bias
vector with 8 predicated 8-byte LDGSTS a thread (3.9: one), and holds 55 registers above
plain. Both kernels run one 256-thread program an SM on sm_90 (shared memory bounds it),
so those registers cost no occupancy there.
"""

import pytest
from compile_cases import compile_cases

BASE = dict(kind="prefill", dtype="bf16", D=128, causal=True, mix=True, Skv=512)
FORMS = {
    "plain": dict(BASE, gates=False),
    "fast": dict(BASE, fast=True),
    "general": dict(BASE),
}
#: anchored (fast form) / plain main-loop instructions, achieved 1.021 (443 / 434).
MAX_INSTRUCTION_RATIO = 1.03
#: registers above plain, achieved 17 (180 / 163).
MAX_EXTRA_REGISTERS = 21


@pytest.fixture(scope="module")
def loops():
    rows = compile_cases([(case, 90) for case in FORMS.values()])
    out = {}
    for name, case in FORMS.items():
        got = [r for r in rows[(repr(case), 90)] if r.get("kernel") == "_anchored_prefill_kernel"]
        assert got and "error" not in got[0], f"{name}: {got}"
        out[name] = got[0]
    return out


def test_no_spills_and_wgmma(loops):
    for name, r in loops.items():
        assert r["spill_stores"] == 0 and r["spill_loads"] == 0, (name, r["registers"])
        assert r["mma"] == "wgmma", name
        # ptxas would otherwise make each wgmma wait for the one before (its advisory C7515).
        assert not r["wgmma_serialized"], name
        assert "main_loop" in r, name


def test_fast_form_loop_against_plain(loops):
    plain, fast = loops["plain"]["main_loop"], loops["fast"]["main_loop"]
    # Plain's MMAs plus the row sum's (64 x 16 per 16 keys of the 64-key block), and one
    # exp2 per logit: the scale costs no second MUFU pass.
    assert fast["mma"] == plain["mma"] + 64 // 16
    assert fast["opcodes"].get("MUFU", 0) == plain["opcodes"].get("MUFU", 0)
    # The row sum left the FMA pipe: no multiply a logit, no row-sum shuffles.
    assert fast["opcodes"].get("FMUL", 0) < plain["opcodes"].get("FMUL", 0)
    assert fast["opcodes"].get("SHFL", 0) < plain["opcodes"].get("SHFL", 0)
    ratio = fast["instructions"] / plain["instructions"]
    assert ratio <= MAX_INSTRUCTION_RATIO, (fast["instructions"], plain["instructions"])
    extra = loops["fast"]["registers"] - loops["plain"]["registers"]
    assert extra <= MAX_EXTRA_REGISTERS, (loops["fast"]["registers"], loops["plain"]["registers"])
    # ... and cost no occupancy: the same programs fit an SM.
    assert loops["fast"]["ctas_per_sm"] == loops["plain"]["ctas_per_sm"]


def test_fast_form_loop_is_shorter_than_general(loops):
    """The general form (any value scale) multiplies every probability by its scale: the
    fast form's folded gates must issue fewer instructions."""
    fast, general = loops["fast"]["main_loop"], loops["general"]["main_loop"]
    assert fast["instructions"] < general["instructions"]
