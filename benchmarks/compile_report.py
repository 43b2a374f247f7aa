"""Compile report: every kernel configuration compiled for sm_90, sm_80 and sm_86 on the
CPU (no GPU: Triton's bundled ptxas), through the package's launchers with their real-GPU
tile choice. Writes benchmarks/results/compile_sm90.json, compile_sm80.json and
compile_sm86.json with, per case and kernel: registers, spill bytes, stack, shared memory,
MMA kind, CTAs per SM.

It also reads the main loop of every MMA kernel from the cubins (``nvdisasm``, shipped
with Triton) and counts its instructions, anchored against the same kernel with the gates
off: non-MMA instructions per MMA, registers, and their ratio (:func:`mix_cases`: prefill
in its fast and general forms, split-KV decode, the two backward kernels; bf16/fp16, D
64/128), our
static stand-in for "anchored >= 0.97x the speed of our own no-bias kernel" (target ratio
<= 1.05; a loop that adds MMAs, the fast prefill's bias and row sum, is held to issue 77's
instructions <= plain + 3% instead). ``--table`` prints those ratios from the committed
files as markdown.

EVERY FIGURE HERE IS STATIC, read from compiled code; none is a timing.

    TRITON_INTERPRET=0 python -m benchmarks.compile_report [--cc 90 80 86] [--jobs 2] [--quick]
    TRITON_INTERPRET=0 python -m benchmarks.compile_report --loop python3 /path/to/other/python
"""

from __future__ import annotations

import argparse
import concurrent.futures
import functools
import json
import os
import time
from pathlib import Path

from benchmarks.common import RESULTS_DIR, environment

P, DEC = "prefill", "decode"


def matrix(quick: bool = False) -> list[dict]:
    """The configurations users hit (a subset with ``quick``)."""
    dtypes = ("fp16", "bf16", "fp32")
    dims = (128,) if quick else (64, 80, 96, 128, 256)
    cases = []
    for dtype in dtypes:
        for D in dims:
            for gates in (True, False):
                cases.append(dict(kind=P, dtype=dtype, D=D, gates=gates))
    for dtype in dtypes:
        for D in (64, 128) if quick else (64, 80, 128, 256):
            cases.append(dict(kind=P, dtype=dtype, D=D, fast=True))  # the fast form
    for dtype in ("bf16", "fp32"):
        cases += [
            dict(kind=P, dtype=dtype, D=128, causal=False),
            dict(kind=P, dtype=dtype, D=128, mask=True, lse=True),
            dict(kind=P, dtype=dtype, D=128, varlen=True, lse=True),
            dict(kind=P, dtype=dtype, D=128, cache_seqlens=True),
        ]
    for dtype in dtypes:
        for group in (1, 7, 8):
            cases.append(dict(kind=DEC, dtype=dtype, D=128, group=group))
            # Sq = 64 queries per sequence against the cache: the largest tile (BLOCK_M 64).
            cases.append(dict(kind=DEC, dtype=dtype, D=128, group=group, Sq=64))
    if not quick:
        for D in (64, 256):
            cases.append(dict(kind=DEC, dtype="bf16", D=D, group=7, mask=True, lse=True))
        cases.append(dict(kind=DEC, dtype="bf16", D=128, group=7, varlen=True))
    # Paged (the vLLM backend's kernels: vLLM's strided cache views, 16-slot blocks).
    for dtype in dtypes:
        for D in (128,) if quick else (64, 128):
            for seq_gated in (False, True):
                cases.append(dict(kind=P, dtype=dtype, D=D, paged=True, seq_gated=seq_gated))
                cases.append(dict(kind=DEC, dtype=dtype, D=D, paged=True, seq_gated=seq_gated))
    # The backward kernels (dK/dV and dQ) of the prefill cases, gates and their gradients on.
    for dtype in dtypes:
        for D in (128,) if quick else (64, 80, 128, 256):
            cases.append(dict(kind="backward", dtype=dtype, D=D))
    if not quick:
        for dtype in ("fp16", "bf16", "fp32"):
            cases += [
                dict(kind="backward", dtype=dtype, D=128, causal=False, mask=True),
                dict(kind="backward", dtype=dtype, D=64, mask=True, cache_seqlens=True),
                dict(kind="backward", dtype=dtype, D=128, varlen=True, grad_lse=True),
                dict(kind="backward", dtype=dtype, D=128, group=1, gates=False),
            ]
    return cases


#: The compile files with main-loop figures (``--table``).
MIX_FILES = ("compile_sm80", "compile_sm86", "compile_sm90")
TARGET = 1.05  # the goal: anchored main loop <= 1.05x the plain loop's non-MMA/MMA
#: issue 77's for a loop that adds MMAs (the fast prefill: the bias and the row sum on the
#: tensor cores, which a per-MMA figure would count as work): instructions <= plain + 3%.
TARGET_INSTRUCTIONS = 1.03


def mix_cases() -> list[dict]:
    """The main-loop comparisons (each case compiled with ``mix``): per kernel, the anchored
    form against the same kernel with the gates off.

    - prefill: the fast form (the gates folded, ``fold_gates``: bf16 sums the rows on the
      tensor cores, fp16 reads one float32 pair per key; what the VLM paths run), the
      general form (value scale in the loop) and plain; bf16/fp16, D
      64/128, causal or not;
    - decode (split-KV, 7 query heads per KV head, one query): gates vs plain;
    - backward (dK/dV and dQ kernels): fixed gates (no gate gradients; the dK/dV kernel
      scales its V tile once in registers), gates with their gradients, and plain;
    - paged prefill and decode (vLLM's layout; gates through the block table, general
      form, every sequence gated) vs the same paged kernels without gate caches. With
      per-sequence flags an ungated sequence runs the plain loop.
    """
    cases = []
    for dtype in ("bf16", "fp16"):
        for D in (64, 128):
            for causal in (True, False):
                base = dict(kind=P, dtype=dtype, D=D, causal=causal, mix=True)
                cases += [dict(base, fast=True), dict(base), dict(base, gates=False)]
            base = dict(kind=DEC, dtype=dtype, D=D, group=7, mix=True)
            cases += [dict(base), dict(base, gates=False)]
            base = dict(kind="backward", dtype=dtype, D=D, mix=True)
            cases += [dict(base, gate_grads=False), dict(base), dict(base, gates=False)]
            for kind in (P, DEC):
                base = dict(kind=kind, dtype=dtype, D=D, paged=True, mix=True)
                cases += [dict(base), dict(base, gates=False)]
    return cases


def _ratio(a: dict, p: dict) -> tuple[float, float]:
    """(non-MMA per MMA, instructions per key) of the anchored loop over plain's: the two
    may take different tiles (the Hopper loop: 128 or 64 keys a block)."""
    keys = a["block_n"] / p["block_n"]
    return (
        round(a["non_mma_per_mma"] / p["non_mma_per_mma"], 3),
        round(a["instructions"] / p["instructions"] / keys, 3),
    )


def instruction_mix(rows: list[dict], cc: int) -> list[dict]:
    """Pairs the compiled ``mix_cases`` rows into anchored-vs-plain entries (one per kernel
    with an MMA loop). ``anchored`` is the form a VLM runs (prefill: fast; backward: fixed
    gates); the other anchored form is kept under ``also``."""

    def find(case, kernel):
        for r in rows:
            if r.get("case") == case and r.get("kernel") == kernel and "main_loop" in r:
                block_n = r["constexprs"].get("BLOCK_N", 1)
                return dict(r["main_loop"], registers=r["registers"], block_n=block_n)
        return None

    out = []
    for case in mix_cases():
        if case.get("gates", True) is False or case.get("fast") is False:
            continue
        kind = case["kind"]
        paged = case.get("paged", False)
        if kind == P and not case.get("fast") and not paged:
            continue  # the general form is reported with the fast one
        if kind == "backward" and case.get("gate_grads", True):
            continue  # reported with the fixed gates
        plain_case = {k: v for k, v in case.items() if k not in ("fast", "gate_grads")}
        plain_case["gates"] = False
        if paged:
            kernels = ["_anchored_prefill_kernel" if kind == P else "_anchored_decode_split_kernel"]
            other_case = other_name = None
        elif kind == P:
            kernels = ["_anchored_prefill_kernel"]
            other_case, other_name = {k: v for k, v in case.items() if k != "fast"}, "general"
        elif kind == DEC:
            kernels = ["_anchored_decode_split_kernel"]
            other_case = other_name = None
        else:
            kernels = ["_anchored_bwd_dkdv_kernel", "_anchored_bwd_dq_kernel"]
            other_case = {k: v for k, v in case.items() if k not in ("gate_grads", "fast")}
            other_name = "with gate gradients"
        for kernel in kernels:
            a, p = find(case, kernel), find(plain_case, kernel)
            if a is None or p is None:
                out.append(dict(kernel=kernel, case=case, cc=cc, error="not compiled"))
                continue
            ratio, ratio_insn = _ratio(a, p)
            entry = dict(
                kernel=kernel, dtype=case["dtype"], D=case["D"],
                causal=case.get("causal", True), cc=cc,
                form="paged, general (scale in loop)" if paged else
                {P: "fast (gates folded)", DEC: "general (scale in loop)"}.get(
                    kind, "fixed gates (no gate gradients)"),
                anchored=a, plain=p, ratio_non_mma_per_mma=ratio, ratio_instructions=ratio_insn,
                meets_target=ratio <= TARGET if a["mma"] == p["mma"]
                else ratio_insn <= TARGET_INSTRUCTIONS,
            )  # fmt: skip
            if other_case is not None:
                o = find(other_case, kernel)
                if o is not None:
                    entry["also"] = dict(
                        form=other_name, mix=o, ratio_non_mma_per_mma=_ratio(o, p)[0]
                    )
            out.append(entry)
    return out


def spill_table(paths) -> str:
    """Markdown table of the compile files' summaries: per target, per kernel, the
    configurations compiled, the largest spill and register count (STATIC, ptxas)."""
    lines = [
        "| target | kernel | configurations | max registers | max spill bytes | failures |",
        "|---|---|---|---|---|---|",
    ]
    for path in paths:
        data = json.loads(Path(path).read_text())
        rows = data["rows"]
        target = data["meta"].get("target", Path(path).stem)
        for name in sorted({r["kernel"] for r in rows if "kernel" in r}):
            rs = [r for r in rows if r.get("kernel") == name and "error" not in r]
            spill = max(r["spill_stores"] + r["spill_loads"] for r in rs)
            errors = sum(1 for r in rows if r.get("kernel") == name and "error" in r)
            lines.append(
                f"| {target} | {name} | {len(rs)} | {max(r['registers'] for r in rs)} "
                f"| {spill} | {errors} |"
            )
        errors = [r for r in rows if "error" in r and "kernel" not in r]
        if errors:
            lines.append(f"| {target} | (cases that failed to compile) | {len(errors)} | | | |")
    return "\n".join(lines)


def mix_table(paths) -> str:
    """Markdown table of the anchored/plain main-loop ratios of compile_sm*.json files
    (STATIC: instruction counts read from the SASS), for docs/kernels-internals.md: non-MMA
    instructions per MMA, and all instructions per key (the measure for a loop that adds
    MMAs, the fast prefill's)."""
    lines = [
        "| target | kernel | dtype | D | causal | form | anchored | plain | ratio "
        "| instructions a key, ratio | other form |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for path in paths:
        data = json.loads(Path(path).read_text())
        for m in data.get("instruction_mix", []):
            if "error" in m or "kernel" not in m:
                continue
            other = m.get("also")
            other_txt = f"{other['form']}: {other['ratio_non_mma_per_mma']:.3f}" if other else ""
            lines.append(
                f"| sm_{m['cc']} | {m['kernel'].replace('_anchored_', '').replace('_kernel', '')} "
                f"| {m['dtype']} | {m['D']} | {'yes' if m['causal'] else 'no'} | {m['form']} "
                f"| {m['anchored']['non_mma_per_mma']} | {m['plain']['non_mma_per_mma']} "
                f"| **{m['ratio_non_mma_per_mma']:.3f}** | {m['ratio_instructions']:.3f} "
                f"| {other_txt} |"
            )
    return "\n".join(lines)


def run(ccs, jobs: int, quick: bool, out_dir: Path, child_argv=None) -> None:
    from videoanchor.kernels import aot

    reason = aot.unavailable_reason()
    if reason:
        raise SystemExit(f"compile report unavailable: {reason}")
    for cc in ccs:
        meta = environment(device="cpu")
        meta.update(
            target=f"sm_{cc}",
            note="STATIC figures read from compiled code (ptxas report, PTX, SASS); no timing",
        )
        start = time.time()
        cases = matrix(quick)
        mixes = mix_cases() if cc in (80, 86, 90) else []  # the targets issue 92 names
        todo = cases + mixes
        # Small chunks: a child per 6 cases, so a loaded machine stays within the timeout.
        chunks = [[(c, cc) for c in todo[i : i + 6]] for i in range(0, len(todo), 6)]
        with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
            compile_part = functools.partial(
                aot.compile_in_subprocess, argv=child_argv, timeout=3600
            )
            got = [r for part in pool.map(compile_part, chunks) for r in part]
        rows = [r for r in got if not r.get("case", {}).get("mix")]
        mix = instruction_mix([r for r in got if r.get("case", {}).get("mix")], cc) if mixes else []
        meta["compile_seconds"] = round(time.time() - start, 1)
        meta["loadavg_end"] = os.getloadavg()
        bad = [r for r in rows if "error" in r or r.get("spill_stores") or r.get("spill_loads")]
        summary = dict(
            cases=len(cases), kernels=len(rows), failures_or_spills=len(bad),
            max_shared_bytes=max((r.get("shared_bytes", 0) for r in rows), default=0),
        )  # fmt: skip
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / f"compile_sm{cc}.json"
        payload = dict(meta=meta, summary=summary, rows=rows, instruction_mix=mix)
        path.write_text(json.dumps(payload, indent=1, default=str) + "\n")
        print(f"sm_{cc}: {summary} -> {path}")
        for r in bad:
            print("  FAIL/SPILL", json.dumps(r)[:300])
        for m in mix:
            if "error" in m:
                print("  MIX FAIL", m)
                continue
            print(
                f"  {m['kernel']} {m['dtype']} D{m['D']} causal={m['causal']}: "
                f"anchored {m['anchored']['non_mma_per_mma']} vs plain "
                f"{m['plain']['non_mma_per_mma']} non-MMA per MMA "
                f"(ratio {m['ratio_non_mma_per_mma']}"
                + (
                    f"; {m['also']['form']} {m['also']['ratio_non_mma_per_mma']}"
                    if "also" in m
                    else ""
                )
                + ")"
            )


#: The prefill main loop the issue's instruction target is about (bf16, D 128, causal, the
#: sm_90 tiles), with 512 keys: pointers 16-byte aligned as at the measured lengths (300
#: keys leave the gate pairs 8-byte aligned, another copy width).
LOOP_BASE = dict(kind=P, dtype="bf16", D=128, causal=True, mix=True, Skv=512)
LOOP_FORMS = {
    "plain": dict(LOOP_BASE, gates=False),
    "fast": dict(LOOP_BASE, fast=True),
    "general": dict(LOOP_BASE),
    # Batched prompts: a padding mask (the loop reads it per key too), with and without the
    # lse (bf16 with the lse: the fast form's row sum in float32, not on the tensor cores).
    "plain_mask": dict(LOOP_BASE, gates=False, mask=True),
    "fast_mask": dict(LOOP_BASE, fast=True, mask=True),
    "plain_mask_lse": dict(LOOP_BASE, gates=False, mask=True, lse=True),
    "fast_mask_lse": dict(LOOP_BASE, fast=True, mask=True, lse=True),
}
#: Each anchored form against its plain kernel.
LOOP_PAIRS = {
    "fast": "plain",
    "general": "plain",
    "fast_mask": "plain_mask",
    "fast_mask_lse": "plain_mask_lse",
}


def loop_report(pythons: list[str], out_dir: Path, child_argv=None) -> None:
    """The prefill main loop on sm_90 under each Python's Triton (``--loop``): SASS
    instructions, the opcode mix, registers, spills and ptxas's wgmma-serialisation
    advisory per form. Writes compile_loop_triton36_static.json. STATIC."""
    import subprocess
    import sys

    from videoanchor.kernels import aot

    versions = {}
    for py in pythons:
        argv = [py, *(child_argv or [sys.executable, "-m", "videoanchor.kernels.aot"])[1:]]
        ver = subprocess.run(
            [py, "-c", "import triton, torch; print(triton.__version__, torch.__version__)"],
            capture_output=True, text=True, check=True,
        ).stdout.split()  # fmt: skip
        rows = aot.compile_in_subprocess([(c, 90) for c in LOOP_FORMS.values()], argv=argv)
        forms = {}
        for name, case in LOOP_FORMS.items():
            got = [
                r
                for r in rows
                if r["case"] == case and r.get("kernel") == "_anchored_prefill_kernel"
            ]
            if not got or "error" in got[0]:
                forms[name] = dict(error=str(got[0].get("error") if got else "no row"))
                continue
            r = got[0]
            forms[name] = {
                k: r[k] for k in ("registers", "spill_stores", "spill_loads", "mma",
                                  "wgmma_serialized", "main_loop") if k in r
            }  # fmt: skip
            forms[name]["tiles"] = {
                k: r["constexprs"].get(k) for k in ("BLOCK_M", "BLOCK_N", "TMA")
            } | {"num_stages": r["num_stages"]}
        for name, base in LOOP_PAIRS.items():
            plain = forms[base].get("main_loop")
            if plain and "main_loop" in forms[name]:
                # per key: the forms' tiles may differ (the Hopper loop's general form
                # takes 64 keys a block where plain takes 128)
                keys = forms[name]["tiles"]["BLOCK_N"] / forms[base]["tiles"]["BLOCK_N"]
                ratio = forms[name]["main_loop"]["instructions"] / plain["instructions"] / keys
                forms[name]["vs_plain"] = dict(
                    plain=base,
                    instructions=round(ratio, 3),
                    extra_registers=forms[name]["registers"] - forms[base]["registers"],
                )
        versions[ver[0]] = dict(python=py, torch=ver[1], forms=forms)
        print(ver[0], {n: (f.get("main_loop", {}).get("instructions"), f.get("registers"),
                           f.get("wgmma_serialized")) for n, f in forms.items()})  # fmt: skip
    meta = environment(device="cpu")
    meta.update(
        target="sm_90",
        case=LOOP_BASE,
        note="STATIC figures read from compiled code (ptxas report, SASS of the loop over "
        "the key blocks every row sees); no timing. vs_plain.instructions is per key "
        "(a loop iteration reads BLOCK_N keys)",
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "compile_loop_triton36_static.json"
    path.write_text(json.dumps(dict(meta=meta, triton=versions), indent=1) + "\n")
    print("->", path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cc", type=int, nargs="+", default=[90, 80, 86])
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="D 128 only")
    ap.add_argument("--out", type=Path, default=RESULTS_DIR)
    ap.add_argument(
        "--torchvision-shim", action="store_true", help="apply tests/torchvision_shim.py"
    )
    ap.add_argument(
        "--table", action="store_true", help="print the main-loop table of the committed files"
    )
    ap.add_argument(
        "--loop", nargs="+", metavar="PYTHON",
        help="only the prefill main loop, under each of these Pythons' Triton",
    )  # fmt: skip
    args = ap.parse_args()
    if args.table:
        paths = sorted(args.out.glob("compile_sm*.json"))
        print(mix_table(p for p in paths if p.stem in MIX_FILES))
        print()
        print(spill_table(paths))
        return
    if os.environ.get("TRITON_INTERPRET", "0") not in ("0", ""):
        raise SystemExit("run with TRITON_INTERPRET=0 (the kernels must be real JIT functions)")
    child_argv = None
    if args.torchvision_shim:
        # Machines whose torchvision cannot load (see tests/torchvision_shim.py): the shim is
        # applied here and in the compile children.
        import sys

        sys.path.insert(1, str(Path(__file__).resolve().parents[1] / "tests"))
        import torchvision_shim

        torchvision_shim.apply()
        child_argv = torchvision_shim.python_m("videoanchor.kernels.aot")
    if args.loop:
        loop_report(args.loop, args.out, child_argv)
        return
    run(args.cc, args.jobs, args.quick, args.out, child_argv)


if __name__ == "__main__":
    main()
