"""Compile the package's kernels for a CUDA target without a GPU or a driver.

A case (prefill or decode, dtype, head dim, flags) is run through the real launcher with
``capability`` set to the target and every launch captured (no kernel runs); each captured
launch is specialised exactly as Triton's runtime would (its own binder: which ints are 1,
which are divisible by 16, pointer alignment), compiled with ``triton.compile`` for
``GPUTarget("cuda", cc, 32)`` and summarised from ptxas's report: registers, spill bytes,
stack, shared memory, the kind of MMA in the PTX and the CTAs that fit on one SM.

Triton's APIs for this are internal; :func:`unavailable_reason` says why this Triton cannot
be used (tested: triton 3.9; triton 3.6, the GPU machine's, compiles the prefill main
loop cases of ``benchmarks/compile_report.py --loop``). Kernels must be real JIT functions,
so run this with ``TRITON_INTERPRET=0`` (``python -m videoanchor.kernels.aot`` does). Every figure here is
STATIC, read from compiled code, never a timing.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import re
import subprocess
import sys

import torch

from videoanchor.kernels import launch as _launch

TESTED_TRITON = ((3, 9),)

# Per-SM resources used for the occupancy estimate (CUDA programming guide, "Technical
# Specifications per Compute Capability"): shared memory per SM, max resident warps and
# blocks; 64K 32-bit registers everywhere; 1 KB of shared memory reserved per block (sm_80+).
SM_RESOURCES = {
    75: dict(smem=65536, warps=32, blocks=16),
    80: dict(smem=167936, warps=64, blocks=32),
    86: dict(smem=102400, warps=48, blocks=16),
    89: dict(smem=102400, warps=48, blocks=24),
    90: dict(smem=233472, warps=64, blocks=32),
}


def unavailable_reason() -> str | None:
    """None if ahead-of-time compilation works with this Triton, else why not."""
    try:
        import triton
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
        from triton.compiler.compiler import make_backend  # noqa: F401
        from triton.runtime.jit import JITFunction, create_function_from_signature  # noqa: F401
    except Exception as exc:
        return f"Triton's compiler internals are not importable: {exc}"
    version = tuple(int(x) for x in re.findall(r"\d+", triton.__version__)[:2])
    if version not in TESTED_TRITON:
        return f"triton {triton.__version__}: the AOT harness is tested on {TESTED_TRITON} only"
    if not hasattr(JITFunction, "_pack_args") or not hasattr(triton.knobs.nvidia, "dump_ptxas_log"):
        return f"triton {triton.__version__} lacks JITFunction._pack_args or knobs.nvidia.dump_ptxas_log"
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        get_ptxas(90)
    except Exception as exc:
        return f"no ptxas for sm_90 in the triton wheel: {exc}"
    return None


_PTXAS_SPILL = re.compile(
    r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads"
)
_PTXAS_REGS = re.compile(r"Used (\d+) registers")


def occupancy(cc: int, regs: int, num_warps: int, shared: int) -> int:
    """CTAs per SM allowed by registers, shared memory, warps and the block limit."""
    res = SM_RESOURCES[cc]
    regs_per_warp = math.ceil(max(regs, 1) * 32 / 256) * 256
    by_regs = 65536 // (regs_per_warp * num_warps)
    by_smem = res["smem"] // (shared + 1024) if shared else res["blocks"]
    by_warps = res["warps"] // num_warps
    return min(by_regs, by_smem, by_warps, res["blocks"])


def mma_kind(ptx: str) -> str:
    if "wgmma.mma_async" in ptx:
        return "wgmma"
    if re.search(r"\bmma\.sync", ptx):
        return "mma.sync"
    return "none (FMA)"


_INSN = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(.*?)\s*;")
_LABEL = re.compile(r"^(\.L_x_\d+):")
_BRANCH = re.compile(r"BRA\s+`\((\.L_x_\d+)\)")


def _nvdisasm() -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "nvdisasm")


def main_loop_mix(cubin: bytes) -> dict:
    """Instruction counts of a kernel's main loop, read from its SASS (``nvdisasm``, shipped
    with Triton): among the innermost loops (backward branches) with the most MMA
    instructions, the one with the fewest instructions (for the prefill kernel the loop
    over key blocks that need no masking). STATIC: a count, not a timing."""
    import tempfile

    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
        path = f.name
    try:
        sass = subprocess.run(
            [_nvdisasm(), "-c", path], capture_output=True, text=True, check=True
        ).stdout
    finally:
        os.unlink(path)
    insns, labels = [], {}
    for line in sass.splitlines():
        m = _LABEL.match(line.strip())
        if m:
            labels[m.group(1)] = len(insns)
            continue
        m = _INSN.search(line)
        if m:
            insns.append(m.group(1))
    loops = []
    for i, insn in enumerate(insns):
        m = _BRANCH.search(insn)
        if m and m.group(1) in labels and labels[m.group(1)] <= i:
            body = insns[labels[m.group(1)] : i + 1]
            ops = [re.sub(r"^@!?U?P\w+\s+", "", x).split()[0] for x in body]
            mma = sum(op.split(".")[0] in ("HGMMA", "HMMA") for op in ops)
            loops.append(
                dict(start=labels[m.group(1)], end=i, instructions=len(body), mma=mma, ops=ops)
            )
    if not loops:
        raise RuntimeError("no loop found in the SASS")
    # Innermost: no other loop inside. A backward branch from out-of-line code into a loop
    # (an mbarrier wait's retry path, placed after the kernel's end) spans other loops.
    inner = [
        lp for lp in loops
        if not any(lp["start"] <= o["start"] and o["end"] < lp["end"] for o in loops)
    ]  # fmt: skip
    best = max(inner, key=lambda lp: (lp["mma"], -lp["instructions"], -lp["start"]))
    hist: dict[str, int] = {}
    for op in best["ops"]:
        hist[op.split(".")[0]] = hist.get(op.split(".")[0], 0) + 1
    non_mma = best["instructions"] - best["mma"]
    return dict(
        loops=len(loops),
        instructions=best["instructions"],
        mma=best["mma"],
        non_mma=non_mma,
        non_mma_per_mma=round(non_mma / best["mma"], 3) if best["mma"] else None,
        opcodes=dict(sorted(hist.items(), key=lambda kv: -kv[1])),
    )


def compile_launch(rec: _launch.Launch, cc: int, keep_cubin: bool = False) -> dict:
    """Compile one captured launch for ``sm_<cc>``; returns its static summary."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.compiler.compiler import make_backend
    from triton.runtime.jit import JITFunction, create_function_from_signature

    kern = rec.kernel
    if not isinstance(kern, JITFunction):
        raise TypeError(
            f"expected a triton JITFunction, got {type(kern).__name__}: run with TRITON_INTERPRET=0"
        )
    target = GPUTarget("cuda", cc, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(kern.signature, kern.params, backend)
    bound, spec, opts = binder(*rec.args, **rec.kwargs)
    options, signature, constexprs, attrs = kern._pack_args(backend, rec.kwargs, bound, spec, opts)
    src = ASTSource(kern, signature, constexprs, attrs)
    knobs = triton.knobs
    log = io.StringIO()
    saved = (knobs.nvidia.dump_ptxas_log, knobs.compilation.always_compile)
    knobs.nvidia.dump_ptxas_log = True
    knobs.compilation.always_compile = True  # a cached kernel would bring no ptxas report
    try:
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(src, target=target, options=options.__dict__)
    finally:
        knobs.nvidia.dump_ptxas_log, knobs.compilation.always_compile = saved
    text = log.getvalue()
    spill = _PTXAS_SPILL.findall(text)
    regs = _PTXAS_REGS.findall(text)
    if not spill or not regs:
        raise RuntimeError(f"no ptxas report for {kern.__name__} on sm_{cc}: {text[-500:]!r}")
    stack, stores, loads = (int(x) for x in spill[-1])
    n_regs = int(regs[-1])
    meta = compiled.metadata
    shared = int(meta.shared)
    row = dict(
        kernel=kern.__name__,
        cc=cc,
        registers=n_regs,
        spill_stores=stores,
        spill_loads=loads,
        stack_bytes=stack,
        shared_bytes=shared,
        shared_limit=_launch.max_shared_memory((cc // 10, cc % 10)),
        num_warps=int(meta.num_warps),
        num_stages=int(meta.num_stages),
        enable_fp_fusion=bool(options.enable_fp_fusion),
        mma=mma_kind(compiled.asm["ptx"]),
        # ptxas's advisory C7515: it made every wgmma of the kernel wait for the previous.
        wgmma_serialized="wgmma.mma_async instructions are serialized" in text,
        ctas_per_sm=occupancy(cc, n_regs, int(meta.num_warps), shared),
        grid=list(rec.grid),
        constexprs={kern.arg_names[p[0]]: v for p, v in constexprs.items()},
    )
    if keep_cubin:
        row["_cubin"] = compiled.asm["cubin"]
    return row


DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def case_inputs(case: dict):
    """Small CPU tensors with the layout and flags of a real call (Qwen2.5-7B heads:
    Hq = 28, Hkv = 28 / group, outputs stored (B, S, H, D) as the public API does)."""
    dtype = DTYPES[case["dtype"]]
    D, group = case["D"], case.get("group", 7)
    Hkv = case.get("Hkv", 4)
    Hq = Hkv * group
    B, Sq = 2, case.get("Sq", 48 if case["kind"] == "prefill" else 1)
    Skv = case.get("Skv", 300)
    varlen = case.get("varlen", False)
    if varlen:
        q = torch.randn(B * Sq, Hq, D).to(dtype)
        k = torch.randn(B * Skv, Hkv, D).to(dtype)
        v = torch.randn_like(k)
        out = torch.empty_like(q)
        n_keys = B * Skv
    else:
        q = torch.randn(B, Sq, Hq, D).to(dtype).transpose(1, 2)
        k = torch.randn(B, Skv, Hkv, D).to(dtype).transpose(1, 2)
        v = torch.randn(B, Skv, Hkv, D).to(dtype).transpose(1, 2)
        out = torch.empty(B, Sq, Hq, D, dtype=dtype).transpose(1, 2)
        n_keys = Skv
    gshape = (B * Skv,) if varlen else (B, Skv)
    kb = torch.rand(gshape) if case.get("gates", True) else None
    vs = 1 + torch.rand(gshape) if case.get("gates", True) else None
    mask = torch.rand(B, Skv) > 0.2 if case.get("mask", False) and not varlen else None
    lse = None
    if case.get("lse", False):
        lse = torch.empty((Hq, B * Sq) if varlen else (B, Hq, Sq), dtype=torch.float32)
    kwargs = dict(causal=case.get("causal", True), sm_scale=1 / math.sqrt(D), interpret=False)
    if varlen:
        kwargs.update(
            cu_seqlens_q=torch.arange(0, B + 1, dtype=torch.int32) * Sq,
            cu_seqlens_k=torch.arange(0, B + 1, dtype=torch.int32) * Skv,
            max_seqlen_q=Sq,
        )
    if case.get("cache_seqlens", False) and not varlen:
        kwargs["cache_seqlens"] = torch.full((B,), n_keys, dtype=torch.int32)
    if case.get("fast", False) and case["kind"] == "prefill":
        # The fast form: the gates folded (fold_gates; gates in [1, 2] here), their range
        # declared (fp16 then sums its rows on the tensor cores, FOLD 2) unless the case
        # sets "range" (None: the float32 row sum, FOLD 1).
        kwargs["fast"] = True
        kwargs["value_scale_range"] = case.get("range", (1.0, 2.0))
    return (q, k, v, kb, vs, mask, out, lse), kwargs


def paged_case_inputs(case: dict):
    """A vLLM-style paged call: one (num_blocks, Hkv, block_size, 2 * D) cache tensor whose
    K and V halves are strided views, 16-slot blocks, int32 block table and seq_lens, the
    float32 per-slot gate caches and (``seq_gated``) per-sequence gate flags."""
    dtype = DTYPES[case["dtype"]]
    D, group = case["D"], case.get("group", 7)
    Hkv = case.get("Hkv", 4)
    Hq = Hkv * group
    B, Sq = 2, case.get("Sq", 48 if case["kind"] == "prefill" else 1)
    block_size, num_blocks, max_blocks = case.get("block_size", 16), 64, 24
    kv = torch.randn(num_blocks, Hkv, block_size, 2 * D).to(dtype)
    k_cache, v_cache = kv[..., :D].transpose(1, 2), kv[..., D:].transpose(1, 2)
    table = torch.randint(0, num_blocks, (B, max_blocks), dtype=torch.int32)
    seq_lens = torch.full((B,), 300, dtype=torch.int32)
    cu_q = torch.arange(0, B + 1, dtype=torch.int32) * Sq
    q = torch.randn(B * Sq, Hq, D).to(dtype)
    gates = case.get("gates", True)
    kb = torch.rand(num_blocks, block_size) if gates else None
    vs = 1 + torch.rand(num_blocks, block_size) if gates else None
    # seq_gated: each program branches on its sequence's flag (two loops in the code);
    # without it, every sequence runs the gated loop (one loop: what "mix" measures).
    gated = torch.ones(B, dtype=torch.int32) if case.get("seq_gated", False) else None
    args = (q, k_cache, v_cache, table, seq_lens, cu_q, Sq, kb, vs, gated, torch.empty_like(q))
    return args, dict(causal=case.get("causal", True), sm_scale=1 / math.sqrt(D), interpret=False)


def capture_backward(case: dict, cc: int) -> list[_launch.Launch]:
    """The launches (dK/dV, then dQ) of the backward of a prefill ``case`` on ``sm_<cc>``:
    the forward's inputs, an output gradient in the output's layout, its float32 lse, and
    the gate gradients wanted when there are gates."""
    from videoanchor.kernels import triton_backward

    (q, k, v, kb, vs, mask, out, lse), kwargs = case_inputs(dict(case, kind="prefill", lse=True))
    out.zero_()
    lse.zero_()
    grad_out = torch.randn_like(out)
    grad_lse = torch.randn_like(lse) if case.get("grad_lse", False) else None
    cache_seqlens = kwargs.pop("cache_seqlens", None)
    kwargs.pop("fast", None)  # the backward has one form
    if "cu_seqlens_k" in kwargs:
        kwargs["max_seqlen_k"] = int(k.shape[0] // (kwargs["cu_seqlens_k"].numel() - 1))
    gate_grads = case.get("gate_grads", True)
    with _launch.capture_launches() as launches:
        triton_backward.launch_backward(
            grad_out, q, k, v, kb, vs, mask, cache_seqlens, out, lse, grad_lse,
            want_dbias=kb is not None and gate_grads, want_dscale=vs is not None and gate_grads,
            capability=(cc // 10, cc % 10), **kwargs,
        )  # fmt: skip
    return launches


def capture_case(case: dict, cc: int) -> list[_launch.Launch]:
    """The launches the package's launcher makes for ``case`` on ``sm_<cc>``."""
    from videoanchor.kernels import triton_decode, triton_prefill

    if case["kind"] == "backward":
        return capture_backward(case, cc)
    if case.get("paged", False):
        from videoanchor.kernels import paged

        args, kwargs = paged_case_inputs(case)
        with _launch.capture_launches() as launches:
            paged.launch_paged(*args, capability=(cc // 10, cc % 10), **kwargs)
        return launches
    args, kwargs = case_inputs(case)
    fn = triton_prefill.launch_prefill if case["kind"] == "prefill" else triton_decode.launch_decode
    with _launch.capture_launches() as launches:
        fn(*args, capability=(cc // 10, cc % 10), **kwargs)
    return launches


def compile_case(case: dict, cc: int, keep_cubin: bool = False) -> list[dict]:
    """Compile every launch of ``case`` for ``sm_<cc>``: one row per kernel. With
    ``case["mix"]`` true each row also has the ``main_loop`` instruction mix (kernels with
    an MMA loop)."""
    rows = []
    for rec in capture_case(case, cc):
        row = compile_launch(rec, cc, keep_cubin=keep_cubin or case.get("mix", False))
        if case.get("mix", False):
            cubin = row["_cubin"] if keep_cubin else row.pop("_cubin")
            if row["mma"] != "none (FMA)":
                row["main_loop"] = main_loop_mix(cubin)
        rows.append(dict(case=case, **row))
    return rows


def compile_in_subprocess(
    cases: list[tuple[dict, int]], timeout: float = 900, argv: list[str] | None = None
) -> list[dict]:
    """Compile (case, cc) pairs in a fresh Python with ``TRITON_INTERPRET=0`` (so the
    kernels are real JIT functions even when this process runs the interpreter).
    ``argv`` runs this module in the child (default ``python -m videoanchor.kernels.aot``).
    A case that fails to compile gives a row with its ``error``."""
    # Default fp fusion off: a compiled kernel reports fusion on only if its launcher chose it.
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_DEFAULT_FP_FUSION="0")
    proc = subprocess.run(
        argv or [sys.executable, "-m", "videoanchor.kernels.aot"],
        input=json.dumps([[c, cc] for c, cc in cases]), capture_output=True, text=True,
        env=env, timeout=timeout,
    )  # fmt: skip
    if proc.returncode != 0:
        raise RuntimeError(f"AOT compile subprocess failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    """Read ``[[case, cc], ...]`` JSON on stdin, print the rows as one JSON line."""
    cases = json.loads(sys.stdin.read())
    rows = []
    for case, cc in cases:
        try:
            rows.extend(compile_case(case, cc))
        except Exception as exc:
            rows.append(dict(case=case, cc=cc, error=f"{type(exc).__name__}: {exc}"[:2000]))
    sys.stdout.write(json.dumps(rows) + "\n")


if __name__ == "__main__":
    main()
