"""A cost model of the default anchor scores on an H100 (issue 76 item 7): STATIC/MODEL
figures, no timing. It reads its inputs from the H100 run of 2026-11-27 (at a95f85b, Triton
3.6) and the H100 results of 2026-11-24, as committed under ``benchmarks/results``, fits its
constants at 16 frames (Qwen2.5-VL-7B shapes, N = 2048) and predicts 16, 32 and 64 frames:

- **today's kernel** (one program per column, single-variable steps): a pass costs the
  kernel's columns per resident program (``N / R``, ``R`` = 2 programs an SM x 132 SMs,
  register-limited at 255 registers: ncu) times the time a column-pass took at 16 frames,
  plus the pass's float32 KKT products (``N^2 D``, scaled from the profile's non-kernel GPU
  time) and the host's share (the solve's wall time less its GPU time, per pass); times the
  passes the H100 counted at each size. The wide level (columns past 128 slots) is not
  modelled: what the measured time exceeds the prediction by is reported as its cost;
- **the proposed route** (block pivoting in lockstep, sets grown geometrically, a pass as
  one graph): the passes of doubling sets (``ceil(log2(max set / grow)) + 2``, the max set
  from the H100's longest chain of steps, an upper bound), each the same KKT products on
  fp16x3 tensor cores and a few dependent batched steps, no host read inside;
- **the rest of the default call**: the spectral step (16 frames: the default call's stage;
  32 and 64: scaled by the H100 spectral benchmark's ``ours`` at N = 4096 and 8192), the
  certificate and the scores (16 frames' stages, the certificate scaled by ``N^2 D``).

    python benchmarks/model_workset_cuda.py      # JSON into benchmarks/results/logs/h100-2026-11-27
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOGS = ROOT / "benchmarks" / "results" / "logs" / "h100-2026-11-27"
RESULTS = ROOT / "benchmarks" / "results"
SMS = 132  # H100 SXM
#: FP32 (no TF32) and fp16 dense tensor-core peaks of an H100 SXM, FLOP/s (NVIDIA's sheet);
#: fp16x3 runs three fp16 products for one float32 product
PEAK = {"fp32": 67e12, "fp16": 989e12}
TARGETS = {16: 0.10, 64: 0.25}
QWEN_D, PER_FRAME = 3584, 128


def _num(pattern: str, text: str) -> float:
    m = re.search(pattern, text)
    if m is None:
        raise ValueError(f"expected {pattern!r} in the input file")
    return float(m.group(1))


def inputs() -> dict:
    """Every figure the model uses, read from the committed files (path per figure)."""
    prof = (LOGS / "torch_profile_workset_cuda_16frames.txt").read_text()
    ncu = (LOGS / "ncu_workset_columns_kernel.txt").read_text()
    runs = {}
    for line in (LOGS / "workset_cuda_16_32_64_frames.log").read_text().splitlines():
        f = line.split()
        runs[int(f[0])] = dict(n=int(f[1]), seconds=float(f[3]), passes=int(f[5]),
                               wide=int(f[9]), steps_max=int(f[13]), reads=int(f[15]))  # fmt: skip
    bench = json.loads((LOGS / "workset_cuda_nvidia-h100-80gb-hbm3.json").read_text())
    default = next(r for r in bench["rows"] if r["solver"] == "default")
    cost = json.loads((RESULTS / "request_cost_nvidia-h100-80gb-hbm3.json").read_text())
    prefill = {r["frames"]: r["seconds_prefill"] for r in cost["rows"]
               if r.get("model") == "Qwen2.5-VL-7B" and "seconds_prefill" in r}  # fmt: skip
    spec = json.loads((RESULTS / "spectral_nvidia-h100-80gb-hbm3.json").read_text())
    ours = {r["n"]: r["median_s"] for r in spec["rows"]
            if r["provider"] == "ours" and r["structure"] == "gap"}  # fmt: skip
    m = re.search(
        r"_columns_kernel\s.*?([\d.]+)ms\s+[\d.]+%\s+([\d.]+)ms\s+([\d.]+)ms\s+(\d+)", prof
    )
    return {
        "kernel_ms_16": float(m.group(1)), "kernel_launches_16": int(m.group(4)),
        "gpu_ms_16": _num(r"Self CUDA time total:\s+([\d.]+)ms", prof),
        "registers": int(_num(r"Registers Per Thread\s+register/thread\s+(\d+)", ncu)),
        "blocks_per_sm_by_registers": int(_num(r"Block Limit Registers\s+block\s+(\d+)", ncu)),
        "programs": int(_num(r"Grid Size\s+(\d+)", ncu)),
        "runs": runs,
        "default_stages_16": {k: default[k] for k in ("seconds_workset_cuda", "seconds_spectral",
                              "seconds_certificate", "seconds_scores", "seconds_lambdas")},  # fmt: skip
        "prefill": prefill,
        "spectral_ours": {n: ours[n] for n in (2048, 4096, 8192) if n in ours},
        "files": {
            "kernel_ms_16, gpu_ms_16": str((LOGS / "torch_profile_workset_cuda_16frames.txt").relative_to(ROOT)),
            "registers, blocks, programs": str((LOGS / "ncu_workset_columns_kernel.txt").relative_to(ROOT)),
            "runs": str((LOGS / "workset_cuda_16_32_64_frames.log").relative_to(ROOT)),
            "default_stages_16": str((LOGS / "workset_cuda_nvidia-h100-80gb-hbm3.json").relative_to(ROOT)),
            "prefill": "benchmarks/results/request_cost_nvidia-h100-80gb-hbm3.json (2026-11-24)",
            "spectral_ours": "benchmarks/results/spectral_nvidia-h100-80gb-hbm3.json (2026-11-24)",
        },
    }  # fmt: skip


def model(inp: dict, grow: int = 16, route_steps: int = 8, step_us: float = 20.0,
          host_ms_route: float = 0.1) -> dict:  # fmt: skip
    """The fitted constants and the predictions (module docstring). ``route_steps``: the
    dependent batched steps a pass of the proposed route takes (block pivoting: a few
    Newton-like steps a pass, not one step per variable), ``step_us`` each; its host share
    ``host_ms_route`` a pass (a pass as one CUDA graph, one read at its end)."""
    r16 = inp["runs"][16]
    n16, passes16 = r16["n"], r16["passes"]
    resident = inp["blocks_per_sm_by_registers"] * SMS
    pass_kernel = inp["kernel_ms_16"] / inp["kernel_launches_16"] / 1e3
    column_pass = pass_kernel / (n16 / resident)  # one column-pass on one resident program
    other_pass = (inp["gpu_ms_16"] - inp["kernel_ms_16"]) / 1e3 / passes16
    host_pass = (
        inp["default_stages_16"]["seconds_workset_cuda"] - inp["gpu_ms_16"] / 1e3
    ) / passes16
    st = inp["default_stages_16"]
    fitted = dict(resident_programs=resident, pass_kernel_s_16=pass_kernel,
                  column_pass_s=column_pass, kkt_products_s_16=other_pass,
                  host_s_per_pass=host_pass)  # fmt: skip
    rows = []
    for frames, run in sorted(inp["runs"].items()):
        n = run["n"]
        scale = (n / n16) ** 2  # the KKT products and the certificate: N^2 D (D fixed)
        spectral = st["seconds_spectral"] * inp["spectral_ours"].get(n, math.nan) / inp[
            "spectral_ours"][n16]  # fmt: skip
        rest = spectral + st["seconds_certificate"] * scale + st["seconds_scores"] * n / n16
        rest += st["seconds_lambdas"] * scale
        today_pass = column_pass * math.ceil(n / resident) + other_pass * scale + host_pass
        today = run["passes"] * today_pass
        # the proposed route: doubling sets from `grow`, up to the longest chain's set (an
        # upper bound on a column's set: every step adds or removes one variable)
        route_passes = math.ceil(math.log2(max(run["steps_max"], grow) / grow)) + 2
        kkt_flops = 2 * 2.0 * n * n * QWEN_D  # X^T c and X r, per pass (float32)
        kkt_fp16x3 = 3 * kkt_flops / PEAK["fp16"]
        route_pass = kkt_fp16x3 + route_steps * step_us / 1e6 + host_ms_route / 1e3
        route = route_passes * route_pass
        pre = inp["prefill"].get(frames)
        row = dict(frames=frames, n=n, d=QWEN_D, passes_today=run["passes"],
                   steps_max_today=run["steps_max"], wide_columns_today=run["wide"],
                   measured_workset_s=run["seconds"], predicted_workset_today_s=today,
                   unmodelled_wide_level_s=run["seconds"] - today,
                   predicted_rest_of_call_s=rest, predicted_default_today_s=today + rest,
                   passes_route=route_passes, kkt_flops_per_pass=kkt_flops,
                   kkt_seconds_per_pass_fp16x3=kkt_fp16x3,
                   kkt_seconds_per_pass_fp32=kkt_flops / PEAK["fp32"],
                   predicted_workset_route_s=route, predicted_default_route_s=route + rest,
                   prefill_s=pre, target=TARGETS.get(frames))  # fmt: skip
        if pre:
            row.update(measured_default_over_prefill=(run["seconds"] + rest) / pre,
                       predicted_today_over_prefill=(today + rest) / pre,
                       predicted_route_over_prefill=(route + rest) / pre,
                       rest_of_call_over_prefill=rest / pre)  # fmt: skip
            if row["target"] is not None:
                row["route_meets_target"] = row["predicted_route_over_prefill"] <= row["target"]
        rows.append(row)
    return dict(fitted=fitted, rows=rows,
                parameters=dict(grow=grow, route_steps=route_steps, step_us=step_us,
                                host_ms_route=host_ms_route, peaks=PEAK, sms=SMS))  # fmt: skip


def main(argv=None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(LOGS / "workset_cuda_model_static.json"))
    args = ap.parse_args(argv)
    inp = inputs()
    out = model(inp)
    sys.path.insert(0, str(ROOT))
    from benchmarks.common import git_sha

    doc = dict(meta=dict(figures="static/model: no timing; inputs read from the files named",
                         device="NVIDIA H100 80GB HBM3 (modelled)", git_sha=git_sha()),
               inputs=inp, **out)  # fmt: skip
    path = Path(args.out)
    path.write_text(json.dumps(doc, indent=1) + "\n")
    for r in out["rows"]:
        print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()})
    print(path)
    return path


if __name__ == "__main__":
    main()
