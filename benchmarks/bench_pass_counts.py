"""Issue 90 step 2, counted on the CPU: the outer passes of the working sets when a pass runs
over the active columns only, under each rule for who joins a column's working set.

A column's program is independent of the others' given ``G``, so the CPU kernel
(:mod:`videoanchor.anchor.solvers._workset_kernel`, float64), which runs each column's outer
passes on its own, gives what a pass loop over the active columns does: a column is active
in pass ``p`` when it runs at least ``p`` outer passes (the last finds no violator above
``tol``). Each column starts from its nearest point, ``tol`` 1e-9, as the GPU working sets
do. The rules (:data:`RULES`), each the pass rule's form
(:class:`videoanchor.anchor.plan.PassRule`: every violating outlier entry joins at once,
outside ``grow``; of the coefficients the ``grow`` worst, ``grow`` doubling each pass up to
``grow_max``) with its own numbers:

- ``rule_cpu`` and ``rule_gpu``: :data:`videoanchor.anchor.plan.PASS_RULE`'s, the CPU's
  (16, no doubling) and the GPU's (256 doubling to 1024 since issue 98 item 4; the result
  file's ``rule_gpu`` rows were counted at 16 doubling to 64, the GPU's rule then);
- ``b``: ``grow`` every pass;
- ``c``: geometric growth: pass ``p`` adds up to ``grow * 2^(p - 1)`` coefficients, at most
  8 doublings (the rows before issue 101 doubled without that bound);
- ``d``: ``c`` with the joining coefficients bounded by the GPU kernel's slots
  (:data:`LEVELS`: 128 a column, 512 for one whose support holds more than 64; at least
  one joins; the kernel's ``SLOT_BOUND``, ``SLOT_WIDE``, compiled by ``variant_kernel``):
  ``c``'s working sets reach 1000-1500 coefficients; ``e``: the same with
  :data:`WIDE_LEVELS` (512 and 2048); ``w``: with :data:`WIDER_LEVELS` (1024 and 4096; issue
  98 item 4, the candidates in global memory).

The result file's rows of rule ``a`` (the ``grow`` worst violators, coefficients and outlier
entries alike: the CPU's rule before issue 101) were counted before that rule left the
kernel (``git show 9879cd3:benchmarks/bench_pass_counts.py``).

Per set and rule (``rows``): the passes of the call (the most a column runs), the columns
active in each pass (``active_per_pass``), their sum over the call in units of ``N``
(``sum_active_over_n``: the products a pass loop over the active columns computes, one
column each; issue 90's target: at most 6 N at 16 frames, 8 N at 64), the per-column passes'
median, p90, p99 and max, the passes of the corrupted tokens' columns, the statuses, and the
FLOPs a call: per pass, the gather ``R = Y_a - Y C_a - E_a`` (``2 D nnz(C_a) + nnz(E_a)``,
from the supports each pass reads, recorded by the kernel) and the GEMM ``Y^T R``
(``2 N D`` a column); split by precision as the pass loop would run them: each column's last
pass in float64 (``flops_fp64``: its support then is its answer's), every pass before it
while screening in float32-accurate products (``flops_screen``: 3xTF32 runs three TF32
products for each of these). The counts do not depend on the machine (the kernel's C is the
same on any x86-64 with the same Numba, bit for bit, under any thread count).

The sets (:func:`tokens`): ``bench_workset_cuda``'s video-like tokens (``video_tokens``,
``k = frames / 2`` subspaces, seed 0) of Qwen2.5-VL-7B (128 tokens a frame, D = 3584) and
InternVL2-8B (256, D = 4096), with :data:`CORRUPT` tokens corrupted (a share of their entries
moved by a large Gaussian: the outlier term's work, 468-545 outlier entries each at 16 frames
of Qwen2.5-VL-7B's shape; ``--clean``: without them). Rows are merged into the result file
by ``(set, rule)``, so sizes can run in separate processes::

    python benchmarks/bench_pass_counts.py --sets qwen16,intern16        # every rule
    python benchmarks/bench_pass_counts.py --sets qwen64 --rules a16,c16  # the large ones
    python benchmarks/bench_pass_counts.py --smoke                        # tiny, seconds
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.bench_workset_cuda import SHAPES  # noqa: E402
from benchmarks.common import (  # noqa: E402
    RESULTS_DIR,
    environment,
    finish,
    loadavg,
    print_table,
    video_tokens,
)
from videoanchor.anchor.plan import PASS_RULE  # noqa: E402

try:
    import fcntl
except ImportError:  # (not POSIX: the result file is rewritten without a lock)
    fcntl = None

#: The corrupted tokens: how many, the share of their entries moved, the Gaussian's scale.
CORRUPT = {"tokens": 10, "share": 0.15, "scale": 5.0}
#: the GPU kernel's levels of coefficient slots that rule ``d`` bounds the joiners by, rule
#: ``e``'s wider ones and rule ``w``'s wider still (the candidates in global memory since
#: issue 98 item 4: a level's slots cost memory, not registers)
LEVELS, WIDE_LEVELS, WIDER_LEVELS = (128, 512), (512, 2048), (1024, 4096)
#: ``name: (grow, grow_max, (SLOT_BOUND, SLOT_WIDE))`` (module docstring)
RULES = {
    "rule_cpu": (PASS_RULE.cpu_grow0, PASS_RULE.cpu_grow_max, (0, 0)),
    "rule_gpu": (PASS_RULE.grow0, PASS_RULE.grow_max, (0, 0)),
    "b16": (16, 16, (0, 0)),
    "b64": (64, 64, (0, 0)),
    **{f"c{g}": (g, g << 8, (0, 0)) for g in (8, 16, 32, 64, 128, 256)},
    **{f"d{g}": (g, g << 8, LEVELS) for g in (16, 32, 64, 128)},
    **{f"e{g}": (g, g << 8, WIDE_LEVELS) for g in (64, 256)},
    **{f"w{g}": (g, g << 8, WIDER_LEVELS) for g in (256,)},
}
#: ``name: (model, frames)``; ``smoke``: a tiny set for the test and ``--smoke``
SETS = {
    **{f"qwen{f}": ("Qwen2.5-VL-7B", f) for f in (16, 32, 64)},
    **{f"intern{f}": ("InternVL2-8B", f) for f in (16, 32, 64)},
}
SMOKE = {"frames": 4, "per_frame": 16, "d": 48, "tokens": 2}
#: issue 90's targets: the sum of active columns over the call, in units of N, by frames
TARGETS = {16: 6.0, 64: 8.0}
TOL, MAX_PASSES, MAX_INNER = 1e-9, 500, 100_000


def tokens(frames: int, per_frame: int, d: int, *, corrupt: dict | None = CORRUPT,
           seed: int = 0) -> tuple[torch.Tensor, list[int]]:  # fmt: skip
    """``bench_workset_cuda``'s video-like set (``k = max(2, frames // 2)``) with
    ``corrupt["tokens"]`` tokens (seeded) corrupted: a ``share`` of their entries moved by
    ``scale`` times a Gaussian. Returns the features and the corrupted tokens."""
    x = video_tokens(frames, per_frame, d, k=max(2, frames // 2), seed=seed)
    if not corrupt:
        return x, []
    g = torch.Generator().manual_seed(seed + 1)
    idx = torch.randperm(x.shape[0], generator=g)[: corrupt["tokens"]]
    mask = torch.rand(len(idx), d, generator=g) < corrupt["share"]
    x[idx] += mask * corrupt["scale"] * torch.randn(len(idx), d, generator=g)
    return x, sorted(idx.tolist())


def run_rule(x: torch.Tensor, grow: int, grow_max: int, slots=(0, 0), *, threads: int = 1,
             tol: float = TOL, max_passes: int = MAX_PASSES) -> dict:  # fmt: skip
    """The kernel's variant for the rule on ``x`` (``N x D``; ``grow`` coefficients in the first
    pass, doubling up to ``grow_max``; the joiners within ``slots``' levels), every column from
    its nearest point, unbounded sets: ``C``, ``E`` (numpy, float64), each column's ``status``
    and ``passes``, and per pass ``p`` (index ``p - 1``) the supports' sizes the active columns
    had (``nnz_c``, ``nnz_e``), summed over the threads' records."""
    from videoanchor.anchor.solvers import _workset_kernel as k
    from videoanchor.anchor.solvers import workset

    kernel = k.variant_kernel(PASS_SUPPORTS=True, SLOT_BOUND=slots[0], SLOT_WIDE=slots[1])
    x64, gram, lam_e, lam_z = workset._prepare(x, 800.0, 800.0)
    n, d = x64.shape
    G, YT = gram.numpy(), x64.numpy()
    Y = np.ascontiguousarray(YT.T)
    ptr, var, val = workset._seeds(x64, gram, lam_e, lam_z)
    C, E = np.zeros((n, n)), np.zeros((d, n))
    status = np.full(n, -1, dtype=np.int64)
    passes, spent = np.zeros(n, dtype=np.int64), np.zeros(n)
    hard = np.array([0, n + 1], dtype=np.int64)
    cap = n + d
    cap_c = min(cap, n - 1)
    gamma = max(0.0, lam_z * float(np.diagonal(G).max()))
    cols = np.arange(n, dtype=np.int64)
    scratches = [k.scratch(n, d, cap, cap_c, grow, max_passes) for _ in range(threads)]

    def one(t: int) -> None:
        kernel(cols, t, threads, G, YT, Y, ptr, var, val, lam_z, lam_e, tol, grow, grow_max, cap,
               cap_c, max_passes, MAX_INNER, float("inf"), C, E, status, passes, spent, hard,
               gamma, k.RIDGE, *scratches[t])  # fmt: skip

    if threads == 1:
        one(0)
    else:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(one, range(threads)))
    records = np.stack([s[-1][2:].reshape(max_passes, 4) for s in scratches])
    last = int(passes.max())
    sums, most = records[:, :last, :2].sum(axis=0), records[:, :last, 2:].max(axis=0)
    return dict(C=C, E=E, status=status, passes=passes, work=spent, n=n, d=d,
                nnz_c=sums[:, 0].astype(np.int64), nnz_e=sums[:, 1].astype(np.int64),
                set_c=most[:, 0].astype(np.int64), set_e=most[:, 1].astype(np.int64))  # fmt: skip


def counts(res: dict, corrupted=()) -> dict:
    """:func:`run_rule`'s answer as the row's counts (module docstring)."""
    from videoanchor.anchor.solvers import _workset_kernel as k

    n, d, passes = res["n"], res["d"], res["passes"]
    last = int(passes.max())
    active = np.array([(passes >= p).sum() for p in range(1, last + 1)], dtype=np.int64)
    gather = 2 * d * res["nnz_c"] + res["nnz_e"]
    gemm = 2 * n * d * active
    per_pass = gather + gemm
    # each column's last pass in float64: its support then is its answer's
    fc, fe = (res["C"] != 0).sum(axis=0), (res["E"] != 0).sum(axis=0)
    fp64 = int((2 * d * fc + fe).sum() + 2 * n * d * (passes > 0).sum())
    names = {k.SOLVED: "solved", k.TOO_LARGE: "too_large", k.STALLED: "stalled",
             k.MAX_PASSES: "max_passes", k.SINGULAR: "singular", k.OVER_BUDGET: "over_budget"}  # fmt: skip
    statuses = {names.get(int(s), str(int(s))): int(c) for s, c in zip(*np.unique(
        res["status"], return_counts=True), strict=True)}  # fmt: skip
    q = lambda p: float(np.percentile(passes, p))  # noqa: E731
    return dict(
        n=n, d=d, passes_call=last, passes_median=q(50), passes_p90=q(90), passes_p99=q(99),
        passes_max=last, sum_active=int(passes.sum()),
        sum_active_over_n=float(passes.sum()) / n,
        active_per_pass=active.tolist(), support_c_per_pass=res["nnz_c"].tolist(),
        support_e_per_pass=res["nnz_e"].tolist(),
        flops_gather=int(gather.sum()), flops_gemm=int(gemm.sum()), flops=int(per_pass.sum()),
        flops_fp64=fp64, flops_screen=int(per_pass.sum()) - fp64,
        flops_per_pass=per_pass.tolist(),
        coef_support_median=float(np.median(fc)), coef_support_max=int(fc.max()),
        outlier_columns=int((fe > 0).sum()), outlier_entries_max=int(fe.max()),
        set_c_max=int(res["set_c"].max()), set_e_max=int(res["set_e"].max()),
        set_c_per_pass=res["set_c"].tolist(), set_e_per_pass=res["set_e"].tolist(),
        work_median=float(np.median(res["work"])), work_max=float(res["work"].max()),
        work_sum_over_n=float(res["work"].sum()) / n,
        corrupted_passes=[int(passes[i]) for i in corrupted],
        clean_passes_max=int(np.delete(passes, list(corrupted)).max()) if len(corrupted) < n else None,
        statuses=statuses,
    )  # fmt: skip


#: ``--ab``'s rules, ``name: (grow0, grow_max)`` (the first is the baseline of the ratios):
#: :data:`videoanchor.anchor.plan.PASS_RULE` on the CPU (16, no doubling) and the GPU's
#: growth (16 doubling to 64) on the CPU. ``pass_rule_ab_cpu.json`` holds the A/B that chose
#: the CPU's, run before the rule before it (``grow`` 16 every pass, the outlier entries among
#: them) left the kernel: ``git show 9879cd3:benchmarks/bench_pass_counts.py``; this one
#: writes ``pass_rule_growth_ab_cpu.json``.
AB_RULES = {"rule_cpu": (PASS_RULE.cpu_grow0, PASS_RULE.cpu_grow_max),
            "rule_gpu": (16, 64)}  # (the GPU's rule when the A/B ran)  # fmt: skip
#: ``--ab``'s sets: ``name: (frames, tokens a frame, D, corrupted tokens)`` (:func:`tokens`,
#: :data:`CORRUPT`'s share and scale): 16 frames of Qwen2.5-VL-7B's shape and at D = 1024,
#: and 8 frames of 96 tokens
AB_SETS = {"qwen16": (16, 128, 3584, 10), "video16_d1024": (16, 128, 1024, 10),
           "video8_d1024": (8, 96, 1024, 4)}  # fmt: skip


@contextlib.contextmanager
def _ab_rule(name: str):
    """``solve_ssc_workset`` and ``run_workset`` under ``--ab``'s rule ``name``
    (:data:`AB_RULES`): the kernel's ``grow`` and ``grow_max`` (``workset._grows``) set to its
    growth."""
    from videoanchor.anchor.solvers import workset

    grow0, grow_max = AB_RULES[name]
    saved = workset._grows
    workset._grows = lambda grow: (grow0, grow_max)
    try:
        yield
    finally:
        workset._grows = saved


def ab(names, reps: int, *, threads: int, routes=("solve_ssc_workset", "run_workset"),
       out_dir=None) -> Path:  # fmt: skip
    """``--ab``: the warm seconds of :data:`AB_RULES`' rules in this process, interleaved (each
    round runs every rule once, the first rule of round ``k`` the ``k``-th: ``reps`` rounds),
    per set of :data:`AB_SETS` and route (``solve_ssc_workset``; ``run_workset``: the default
    anchor scores' SSC, ``ssc_coefficients(x, solver="auto")``): the medians, each rule's
    passes (the most a column took), its answer's largest relative duality gap
    (``program.duality_gaps``), its median's ratio to the first rule's and the largest
    difference of its ``C`` from the first rule's; rows into
    ``pass_rule_growth_ab_cpu.json``. The
    kernels are compiled or loaded before any timing (a first call per set and rule, not
    timed)."""
    import numba

    from videoanchor.anchor.program import duality_gaps
    from videoanchor.anchor.scores import ssc_coefficients
    from videoanchor.anchor.solvers.workset import LIMITS, solve_ssc_workset

    torch.set_num_threads(threads)
    meta = environment("cpu")
    meta.update(numba=numba.__version__, numpy=np.__version__, threads=threads, reps=reps,
                rules={k: dict(zip(("grow0", "grow_max"), v, strict=True))
                       for k, v in AB_RULES.items()},
                sets={k: dict(zip(("frames", "per_frame", "d", "corrupted"), v, strict=True))
                      for k, v in AB_SETS.items()},
                gap_threshold=LIMITS.gap,
                order="round k: every rule once, from the k-th (rotated)")  # fmt: skip
    calls = {"solve_ssc_workset": lambda x: solve_ssc_workset(x, threads=threads),
             "run_workset": lambda x: ssc_coefficients(x, solver="auto")}  # fmt: skip
    rows = []
    for name in names:
        frames, per_frame, d, bad = AB_SETS[name]
        x, corrupted = tokens(frames, per_frame, d, corrupt={**CORRUPT, "tokens": bad})
        x = x.double()
        for route in routes:
            call = calls[route]
            times, answers, info = {r: [] for r in AB_RULES}, {}, {}
            for rule in AB_RULES:  # the first call of each: compiles or loads, not timed
                with _ab_rule(rule):
                    res = call(x)
                answers[rule] = res.coef.double()
                gaps = duality_gaps(x, answers[rule], res.lambda_e, res.lambda_z)
                info[rule] = dict(passes=int(res.iterations), gap=float(gaps.max_gap),
                                  affine=float(gaps.affine), strategy=res.strategy,
                                  solver=res.solver)  # fmt: skip
            names_ = list(AB_RULES)
            base = names_[0]
            for k in range(reps):
                for rule in names_[k % len(names_) :] + names_[: k % len(names_)]:
                    with _ab_rule(rule):
                        t = time.perf_counter()
                        call(x)
                        times[rule].append(time.perf_counter() - t)
            med = {r: float(np.median(v)) for r, v in times.items()}
            row = dict(set=name, route=route, n=int(x.shape[0]), d=d, frames=frames,
                       corrupted=corrupted, threads=threads,
                       **{f"{r}_seconds": med[r] for r in AB_RULES},
                       **{f"{r}_times": times[r] for r in AB_RULES},
                       **{f"{r}_{k}": v for r in AB_RULES for k, v in info[r].items()},
                       **{f"{r}_ratio": med[r] / med[base] for r in names_[1:]},
                       **{f"{r}_c_max_diff": float((answers[r] - answers[base]).abs().max())
                          for r in names_[1:]},
                       git_sha=meta["git_sha"], loadavg=loadavg())  # fmt: skip
            rows.append(row)
            print(f"{name} {route}: " + "; ".join(
                f"{r} {med[r]:.2f} s, {info[r]['passes']} passes, gap {info[r]['gap']:.1e}"
                + (f", {row[r + '_ratio']:.3f}x, C diff {row[r + '_c_max_diff']:.1e}"
                   if r != base else "") for r in names_) + f"; load {row['loadavg']}",
                  flush=True)  # fmt: skip
    return finish("pass_rule_growth_ab", meta, rows, out_dir,
                  ["set", "route", "n", "d"] + [f"{r}_{k}" for r in AB_RULES for k in
                                                 ("seconds", "ratio", "passes", "gap")
                                                 if f"{r}_{k}" in rows[0]])  # fmt: skip


def _merge(path: Path, meta: dict, rows: list[dict]) -> None:
    """``rows`` into ``path``'s (replacing those of the same set and rule), under a lock."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:
        if fcntl is not None:
            fcntl.flock(lock, fcntl.LOCK_EX)
        old = json.loads(path.read_text()) if path.exists() else {"meta": {}, "rows": []}
        keys = {(r["set"], r["rule"]) for r in rows}
        kept = [r for r in old["rows"] if (r["set"], r["rule"]) not in keys]
        order = list(SETS) + ["smoke"]
        merged = sorted(kept + rows, key=lambda r: (
            order.index(r["set"].split(" ")[0]) if r["set"].split(" ")[0] in order else 99,
            r["set"], list(RULES).index(r["rule"]) if r["rule"] in RULES else 99))  # fmt: skip
        path.write_text(json.dumps({"meta": {**old["meta"], **meta}, "rows": merged}, indent=1,
                                   default=str) + "\n")  # fmt: skip
    with contextlib.suppress(OSError):
        path.with_suffix(".lock").unlink()


def main(argv=None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--sets",
        default=None,
        help=f"comma-separated, of {', '.join(SETS)} (--ab: of {', '.join(AB_SETS)}; "
        "default qwen16, --ab: all)",
    )
    ap.add_argument("--rules", default=",".join(RULES), help="comma-separated")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--clean", action="store_true", help="without the corrupted tokens")
    ap.add_argument("--smoke", action="store_true", help="a tiny set (seconds)")
    ap.add_argument("--out-dir", default=None)
    ap.add_argument(
        "--ab",
        action="store_true",
        help="the warm A/B of AB_RULES' rules (--sets of AB_SETS, --reps each)",
    )
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--routes", default="solve_ssc_workset,run_workset")
    args = ap.parse_args(argv)
    if args.ab:
        names = list(AB_SETS) if args.sets is None else args.sets.split(",")
        return ab(names, args.reps, threads=args.threads, routes=args.routes.split(","),
                  out_dir=args.out_dir)  # fmt: skip
    import numba

    meta = environment("cpu")
    meta.update(numba=numba.__version__, numpy=np.__version__, tol=TOL, max_passes=MAX_PASSES,
                corrupt=CORRUPT, rules={k: dict(zip(("grow", "grow_max", "slot_levels"), v,
                                                    strict=True)) for k, v in RULES.items()},
                targets_sum_active_over_n=TARGETS)  # fmt: skip
    names = ["smoke"] if args.smoke else (args.sets or "qwen16").split(",")
    rules = args.rules.split(",")
    for r in rules:
        if r not in RULES:
            raise ValueError(f"--rules: expected names of {list(RULES)}, got {r!r}")
    path = Path(args.out_dir or RESULTS_DIR) / "pass_counts_cpu.json"
    rows = []
    for name in names:
        if name == "smoke":
            model, frames = "tiny", SMOKE["frames"]
            x, bad = tokens(frames, SMOKE["per_frame"], SMOKE["d"],
                            corrupt={**CORRUPT, "tokens": SMOKE["tokens"]})  # fmt: skip
        elif name in SETS:
            model, frames = SETS[name]
            x, bad = tokens(frames, *SHAPES[model], corrupt=None if args.clean else CORRUPT)
        else:
            raise ValueError(f"--sets: expected names of {list(SETS)}, got {name!r}")
        label = name + (" clean" if args.clean else "")
        for rule in rules:
            grow, grow_max, slots = RULES[rule]
            t = time.perf_counter()
            res = run_rule(x, grow, grow_max, slots, threads=args.threads)
            row = dict(set=label, model=model, frames=frames, corrupted=bad, rule=rule,
                       grow=grow, grow_max=grow_max, outliers_at_once=True,
                       geometric=grow_max > grow,
                       slot_levels=list(slots) if slots[0] else None,
                       target_sum_active_over_n=TARGETS.get(frames), **counts(res, bad),
                       seconds=time.perf_counter() - t, git_sha=meta["git_sha"],
                       loadavg=meta.get("loadavg"))  # fmt: skip
            rows.append(row)
            print(f"{label} {rule}: passes {row['passes_call']}, sum active "
                  f"{row['sum_active_over_n']:.2f} N, {row['flops'] / 1e12:.3f} TFLOP, "
                  f"{row['seconds']:.0f} s", flush=True)  # fmt: skip
            if not args.smoke or args.out_dir:
                _merge(path, meta, [row])
    print_table(rows, ["set", "rule", "n", "passes_call", "passes_median", "passes_p90",
                       "sum_active_over_n", "flops", "flops_fp64", "clean_passes_max"])  # fmt: skip
    return path


if __name__ == "__main__":
    main()
