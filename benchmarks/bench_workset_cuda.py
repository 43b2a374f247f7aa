"""The default anchor scores on the GPU (the working sets,
``videoanchor.anchor.solvers.workset_cuda``; issue 76 items 4 and 7) beside the model's
prefill, in one process: the whole default call
(``compute_anchor_scores``: the working sets, the spectral step, the scores) and the fast
solver on video-like tokens of 16, 32 and 64 frames of Qwen2.5-VL-7B (128 tokens a frame,
D = 3584) and InternVL2-8B (256, D = 4096) at the paper's 24 clusters (``--clusters``; the
tokens' own structure, ``max(2, frames // 2)`` subspaces, as before issue 98, so that
the solve's figures compare with earlier runs), each size's first call timed apart
(``seconds_default_first``: compiles, graph captures) from a warm one, each over the prefill of random-weight decoder
layers of the model's shape (``bench_request_cost.prefill_seconds``) against the targets
(0.10x at 16 frames, 0.25x at 64); at the first size the GPU working sets' own record
(passes, the longest chain of inner steps, host reads), its time screening in float32
and in float64 (``screening``: the precision ``wc.screening`` picks for the device) and the
yardstick against the CPU's
certified minimiser (``reference_minimiser``, float64: objective gap, constraints, row sums'
Spearman); and the dense case, ``bench_request_cost``'s synthetic cost set (tokens drawn
independently: a dense minimiser), and Yale B faces of 10 and 38 subjects (the same rule,
on real data: ``bench_request_cost.YALE``, ``VIDEOANCHOR_YALEB``; a row says where the file
is missing), where the default must cost at most 1.25x the fast solver when the fast answer
stands (2x where it certifies).

Every stage of a row is written as it ends (``in_progress`` names the stage running when a
time limit stopped the run), a row's error is its own (``error``; the other rows run on),
and a failing ``warm_up`` is recorded in ``meta.warm_up_error`` (the rows then run without).

    python benchmarks/bench_workset_cuda.py                  # on a GPU; JSON into --out-dir
    python benchmarks/bench_workset_cuda.py --smoke          # tiny, CPU (Triton's interpreter)
    python benchmarks/bench_workset_cuda.py --counts         # CPU: passes, ops, host reads

``--counts`` (issue 90 steps 2 and 4, CPU): on small video-like sets (with and without
corrupted tokens), the passes, the active columns per pass and summed (in units of N), the
torch operators a pass runs (those that launch work: views and other metadata-only
operators aside) and the Triton launches (the column kernel, the residuals), the host reads
inside a pass (target 0) and per call (``solve_workset_cuda``; with the certificate,
``run_workset_cuda``), into ``workset_cuda_counts_cpu.json``. The column kernel runs in
Triton's interpreter (``--kernel reference``: the tests' float64 torch stand-in, faster).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from dataclasses import astuple
from pathlib import Path

if "--smoke" in sys.argv or "--counts" in sys.argv:  # before Triton decorates anything
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import bench_request_cost  # noqa: E402
from benchmarks.common import (  # noqa: E402
    environment,
    objective,
    print_table,
    spearman,
    sync,
    synthetic_tokens,
    video_tokens,
    write_result,
)
from videoanchor.anchor import plan as _plan  # noqa: E402
from videoanchor.anchor.solvers import workset_cuda as wc  # noqa: E402

#: name: (visual tokens per frame, hidden size), as bench_request_cost.SHAPES
SHAPES = {"Qwen2.5-VL-7B": (128, 3584), "InternVL2-8B": (256, 4096)}
#: issue 33's targets: the default's time over the prefill's, by frame count
TARGETS = {16: 0.10, 64: 0.25}
#: the video-like rows' clusters: the paper's n_clusters (issue 98 item 9)
CLUSTERS = 24
#: the dense-C rule (issue 66): the default over the fast solver where the fast answer
#: stands, and where the default certifies
DENSE_RULE = {"fast": 1.25, "workset": 2.0}
#: the dense rows on real data: Yale B subjects (each its first ``YALE_PER_SUBJECT`` faces,
#: D = 2016; issue 76 item 3, as issue 79's CPU sets), and the smoke run's
YALE_SUBJECTS, YALE_SUBJECTS_SMOKE, YALE_PER_SUBJECT = (10, 38), (2,), 64


def _syncs(fn, device) -> int | None:
    """The host synchronisations of one call of ``fn`` on CUDA (issue 66 item 3): the
    operations ``torch.cuda.set_sync_debug_mode`` flags (scalar reads, ``nonzero``, copies to
    the host), counted by their warnings; None off CUDA."""
    if device.type != "cuda":
        return None
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchronizing" in str(w.message) for w in seen)


def _yardstick(x, coef, ref) -> dict:
    lam_e, lam_z = ref.lambda_e, ref.lambda_z
    c = coef.detach().to("cpu", torch.float64)
    want = objective(x, ref.coef, lam_e, lam_z)
    return dict(objective_gap=(objective(x, c, lam_e, lam_z) - want) / abs(want),
                affine=float((c.sum(dim=0) - 1).abs().max()),
                diagonal=float(c.diagonal().abs().max()),
                rowsum_spearman=spearman(c.abs().sum(dim=1), ref.coef.abs().sum(dim=1)))  # fmt: skip


def _timed(fn, device):
    """``(seconds, result, warnings' messages)`` of one call of ``fn``."""
    sync(device)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        t = time.perf_counter()
        res = fn()
        sync(device)
        took = time.perf_counter() - t
    return took, res, [str(w.message)[:300] for w in seen]


def _scores_row(res) -> dict:
    hist = res.history if isinstance(res.history, dict) else {}
    hist = hist.get("workset_cuda", hist)
    return dict(answered=res.solver, strategy=res.strategy, gap=res.gap,
                **{k: hist.get(k) for k in ("passes", "wide_columns", "overflow", "dense",
                                            "host_reads")},
                **{f"seconds_{k}": v for k, v in res.timings.items()})  # fmt: skip


#: operators that move no data (views, metadata): not counted as a pass's kernels
METADATA_OPS = frozenset(
    {"view", "_unsafe_view", "slice", "select", "unsqueeze", "squeeze", "expand", "t",
     "transpose", "permute", "as_strided", "alias", "detach", "lift_fresh", "_to_copy_noop",
     "unbind", "split", "narrow", "reshape", "flatten", "numpy_T", "unfold", "sym_size",
     "sym_stride", "sym_numel", "is_same_size", "_reshape_alias", "empty", "empty_strided",
     "new_empty", "empty_like"}
)  # fmt: skip
#: operators that read a tensor's value on the host (on a GPU each synchronises)
READ_OPS = frozenset({"_local_scalar_dense", "item", "is_nonzero", "nonzero", "equal",
                      "allclose"})  # fmt: skip


class Counter(torch.utils._python_dispatch.TorchDispatchMode):
    """The torch operators run under it (``ops``: by name, metadata-only ones in
    ``metadata``), the host reads (``reads``: :data:`READ_OPS` and ``Tensor.tolist`` /
    ``Tensor.numpy``) and the Triton launches (``launches``, by the wrapped names
    :func:`counting` gives), none counted inside a launch (:meth:`paused`)."""

    def __init__(self):
        super().__init__()
        self.ops, self.metadata, self.reads, self.launches = {}, 0, [], {}
        self._paused = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self._paused:
            name = func.__name__.split(".")[0]
            if name in READ_OPS:
                self.reads.append(name)
            if name in METADATA_OPS:
                self.metadata += 1
            else:
                self.ops[name] = self.ops.get(name, 0) + 1
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        self._saved = {n: getattr(torch.Tensor, n) for n in ("tolist", "numpy")}
        for n, fn in self._saved.items():
            setattr(torch.Tensor, n, self._reading(fn))
        return super().__enter__()

    def __exit__(self, *exc):
        for n, fn in self._saved.items():
            setattr(torch.Tensor, n, fn)
        return super().__exit__(*exc)

    def _reading(self, fn):
        def read(tensor, *a, **k):
            if not self._paused:
                self.reads.append(fn.__name__)
            return fn(tensor, *a, **k)

        return read

    def launched(self, name: str, fn):
        """``fn`` (a launch) counted once under ``name``, what it runs inside not counted."""

        def launch(*a, **k):
            if not self._paused:
                self.launches[name] = self.launches.get(name, 0) + 1
            self._paused += 1
            try:
                with torch.utils._python_dispatch._disable_current_modes():
                    return fn(*a, **k)
            finally:
                self._paused -= 1

        return launch

    def summary(self) -> dict:
        return dict(torch_ops=sum(self.ops.values()), launches=sum(self.launches.values()),
                    kernels=sum(self.ops.values()) + sum(self.launches.values()),
                    host_reads=len(self.reads), ops=dict(sorted(self.ops.items())),
                    launches_by_name=dict(self.launches), reads=list(self.reads))  # fmt: skip


def counting(monkeypatch_setattr, counter: Counter) -> None:
    """The solver's Triton launches (``wc.launch``: the column kernel; ``wc.residuals``,
    ``wc.violations``, ``wc.joins``: the pass's) counted by ``counter``;
    ``monkeypatch_setattr(obj, name, value)`` sets them (and restores them: pytest's
    monkeypatch, or :func:`_patched`)."""
    monkeypatch_setattr(wc, "launch", counter.launched("column_kernel", wc.launch))
    for name in ("residuals", "violations", "joins"):
        monkeypatch_setattr(wc, name, counter.launched(name, getattr(wc, name)))


class _patched:
    """setattr that undoes itself on exit (``monkeypatch.setattr`` outside pytest)."""

    def __init__(self):
        self.saved = []

    def __call__(self, obj, name, value):
        self.saved.append((obj, name, getattr(obj, name)))
        setattr(obj, name, value)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for obj, name, value in reversed(self.saved):
            setattr(obj, name, value)


def pass_counts(x, **kw) -> dict:
    """Issue 90's counts on ``x`` (module docstring, ``--counts``): one call of
    ``solve_workset_cuda`` (its passes, active columns, host reads, operators) and one pass
    on its own from the start (operators and launches a pass, host reads inside it)."""
    n = x.shape[0]
    with _patched() as setattr_, Counter() as call:
        counting(setattr_, call)
        per_pass = []
        saved = wc._pass

        def recorded(state, cap, **k):  # (the active columns read outside the count)
            call._paused += 1
            with torch.utils._python_dispatch._disable_current_modes():
                per_pass.append(int(state["count"][0]))
            call._paused -= 1
            return saved(state, cap, **k)

        setattr_(wc, "_pass", recorded)
        out = wc.solve_workset_cuda(x, **kw)
    # one pass, counted on its own: the first (every column active) at float32 and float64
    one = {}
    for exact in (False, True):
        X = x.detach().double()
        G = X @ X.T
        program = wc._program(X, G, out["lambda_e"], out["lambda_z"], tol=1e-9, max_inner=300)
        M, ME = wc.SLOTS[0], wc.OUTLIER_SLOTS[0]
        ids = torch.full((n, M), -1, dtype=torch.int32)
        z = torch.zeros(n, M, dtype=torch.float64)
        from videoanchor.anchor.program import nearest_points

        ids[:, 0], z[:, 0] = nearest_points(G).to(torch.int32), 1.0
        state = wc._state(program, torch.arange(n), ids, z,
                          torch.full((n, ME), -1, dtype=torch.int32),
                          torch.zeros(n, ME, dtype=torch.float64), wc._support(0, M))  # fmt: skip
        with _patched() as setattr_, Counter() as c:
            counting(setattr_, c)
            wc._pass(state, n, exact=exact, last=False)
        one["float64" if exact else "float32"] = c.summary()
    whole = call.summary()
    return dict(n=n, d=x.shape[1], passes=out["passes"], replayed=out["replayed"],
                converged=out["converged"], active_per_pass=per_pass,
                active_sum=out["active"], active_sum_over_n=out["active"] / n,
                host_reads_call=len(out["reads"]), reads_call=out["reads"],
                host_reads_counted_call=whole["host_reads"], reads_counted_call=whole["reads"],
                kernels_call=whole["kernels"],
                pass_float32=one["float32"], pass_float64=one["float64"],
                kernels_per_pass_float32=one["float32"]["kernels"],
                kernels_per_pass_float64=one["float64"]["kernels"],
                host_reads_per_pass=max(one["float32"]["host_reads"], one["float64"]["host_reads"]),
                wide_columns=out["wide_columns"])  # fmt: skip


#: ``--counts``' sets: (frames, tokens a frame, D, corrupted tokens, alpha_e)
COUNT_SETS = ((4, 16, 48, 0, 800.0), (6, 16, 64, 2, 800.0), (4, 12, 40, 0, 20.0))


def counts(out_dir=None, *, kernel: str = "triton") -> Path:
    """``--counts`` (module docstring): :func:`pass_counts` on :data:`COUNT_SETS`, into
    ``workset_cuda_counts_<device>.json``."""
    meta = environment("cpu")
    meta.update(kernel=kernel, levels=[list(v) for v in zip(wc.SLOTS, wc.OUTLIER_SLOTS, strict=True)],
                grow=list(astuple(_plan.PASS_RULE)), rounds=list(wc.ROUNDS),
                note="kernels: torch operators that launch work (views and allocations "
                "aside) plus the Triton launches; on CUDA a pass is one graph replay")  # fmt: skip
    saved = wc.launch
    if kernel == "reference":
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        import workset_reference

        wc.launch = workset_reference.launch
    rows = []
    try:
        for frames, per_frame, d, corrupt, alpha_e in COUNT_SETS:
            x = video_tokens(frames, per_frame, d, k=max(2, frames // 2), seed=0)
            if corrupt:  # a few tokens with a share of their entries moved far
                g = torch.Generator().manual_seed(1)
                hit = torch.rand(corrupt, d, generator=g) < 0.3
                x[:corrupt] += hit * torch.randn(corrupt, d, generator=g) * 10 * x.std()
            row = dict(frames=frames, tokens_a_frame=per_frame, corrupted=corrupt,
                       alpha_e=alpha_e)  # fmt: skip
            t = time.perf_counter()
            row.update(pass_counts(x, alpha_e=alpha_e, max_inner=1000))
            row["seconds_cpu"] = time.perf_counter() - t
            rows.append(row)
            path = write_result("workset_cuda_counts", meta, rows, out_dir)
    finally:
        wc.launch = saved
    print_table(rows, ["n", "d", "corrupted", "passes", "active_sum_over_n", "host_reads_call",
                       "kernels_per_pass_float32", "kernels_per_pass_float64",
                       "host_reads_per_pass"])  # fmt: skip
    return path


#: a row whose default and fast solver take less than this many seconds together is timed
#: 3 times each, interleaved (medians)
REPEAT_UNDER = 2.0


#: the largest N whose soft share's cost is measured (its float64 eigh on the device)
SHARE_COST_MAX_N = 8192


def _share_cost(res, x, clusters: int, device) -> dict:
    """Issues 78, 91 and 100 on the device: the stages after the solve on the default's own
    ``C``, the paper's share (``cluster_share="paper"``: the spectral step's labels, then the
    scores) against ``"soft"`` (``soft_cluster_shares``), the default ``"steady"`` (one
    eigensolver call, the discretisation's margins, the soft share where its weight is below
    1) and ``"expected"`` (issue 100's option: 32 draws' paths on the host from one copy of
    the embedding, their shares softened on the device), interleaved, median of 3 each
    (fewer where the first round takes over 20 s); each share's scores' largest distance to
    the paper's, and the steady share's weight."""
    from videoanchor.anchor.scores import anchor_result_from_coefficients

    if x.shape[0] > SHARE_COST_MAX_N:
        return dict(share_cost_skipped=f"N = {x.shape[0]} > {SHARE_COST_MAX_N} (a float64 eigh "
                    "of N x N on the device; not run within a lease's call)")  # fmt: skip
    times = {"paper": [], "soft": [], "steady": [], "expected": []}
    out = {}
    while len(times["paper"]) < 3 and (not times["paper"] or sum(map(sum, times.values())) < 20.0):
        for share, t_list in times.items():
            t, out[share], _ = _timed(lambda s=share: anchor_result_from_coefficients(
                res, clusters, features=x, cluster_share=s), device)  # fmt: skip
            t_list.append(t)
    med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    dist = lambda k: float((out[k].scores.double() - out["paper"].scores.double()).abs().max())  # noqa: E731
    return dict(seconds_after_solve_paper=med["paper"], seconds_after_solve_soft=med["soft"],
                seconds_after_solve_steady=med["steady"], share_cost_reps=len(times["paper"]),
                seconds_after_solve_expected=med["expected"],
                soft_over_paper_after_solve=med["soft"] / med["paper"],
                steady_over_paper_after_solve=med["steady"] / med["paper"],
                expected_over_paper_after_solve=med["expected"] / med["paper"],
                soft_vs_paper_max=dist("soft"), steady_vs_paper_max=dist("steady"),
                expected_vs_paper_max=dist("expected"),
                steady_weight=out["steady"].share_weight)  # fmt: skip


def run(shapes: dict, frames, out_dir=None, *, smoke: bool = False, dense: bool = True,
        yardstick: bool = True, budget: float = 420.0, share_cost: bool = True,
        clusters: int = CLUSTERS) -> Path:  # fmt: skip
    """The rows (module docstring), the JSON rewritten as each stage of a row ends; a row
    that would start past ``budget`` seconds is written as not run (``skipped``)."""
    from videoanchor.anchor import compute_anchor_scores
    from videoanchor.anchor.solvers.workset import reference_minimiser

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    meta = environment(str(device))
    meta.update(slots=list(wc.SLOTS), levels=[list(v) for v in zip(wc.SLOTS, wc.OUTLIER_SLOTS, strict=True)],
                grow=list(astuple(_plan.PASS_RULE)), rounds=list(wc.ROUNDS), smoke=smoke,
                targets=TARGETS, dense_rule=DENSE_RULE, budget_s=budget,
                clusters=clusters)  # fmt: skip
    started = time.perf_counter()
    rows = []

    def save(row=None, stage=None):  # the file as it stands (``stage``: running in ``row``)
        if row is not None:
            if stage is None:
                row.pop("in_progress", None)
            else:
                row["in_progress"] = stage
        meta["seconds_total"] = time.perf_counter() - started
        return write_result("workset_cuda", meta, rows, out_dir)

    path = save()
    try:  # the kernels' compile, per level of slots
        meta["seconds_warm_up"] = wc.warm_up(device)
    except Exception as exc:  # reported, not hidden: the rows run (and compile) without it
        meta["warm_up_error"] = f"{type(exc).__name__}: {exc}"[:300]
    kw = dict(slots=(32,), outlier_slots=(16,), max_inner=300) if smoke else {}
    cases = [(name, f, "video-like") for name in shapes for f in frames]
    if dense:  # bench_request_cost's cost set at the first shape's first size (seed = frames),
        # then Yale B's subjects: second, within any budget
        cases[1:1] = [(next(iter(shapes)), frames[0], "synthetic (dense)")] + [
            (None, s, "Yale B faces") for s in (YALE_SUBJECTS_SMOKE if smoke else YALE_SUBJECTS)
        ]
    for i, (name, f, kind) in enumerate(cases):
        if kind == "Yale B faces":
            row = dict(model=None, subjects=f, per_subject=YALE_PER_SUBJECT, tokens=kind)
        else:
            per_frame, d = shapes[name]
            row = dict(model=name, frames=f, n=f * per_frame, d=d, tokens=kind,
                       target=TARGETS.get(f))  # fmt: skip
        rows.append(row)
        if time.perf_counter() - started > budget:
            row["skipped"] = f"past the run's budget of {budget:g} s"
            save()
            continue
        if kind == "Yale B faces" and not bench_request_cost.YALE.exists():
            row["skipped"] = (f"Yale B not found at {bench_request_cost.YALE} (set "
                              "VIDEOANCHOR_YALEB)")  # fmt: skip
            save()
            continue
        # the paper's clusters on the video-like and dense sets, one a subject on Yale B's
        k = f if kind == "Yale B faces" else clusters
        row["clusters"] = k
        try:
            save(row, "tokens")
            if kind == "video-like":
                row["scenes"] = max(2, f // 2)  # (the tokens' subspaces, as before issue 98)
                x = video_tokens(f, per_frame, d, k=row["scenes"], seed=0).to(device)
            elif kind == "Yale B faces":
                x = bench_request_cost.yale_faces(f, YALE_PER_SUBJECT).to(device)
                row.update(n=x.shape[0], d=x.shape[1])
            else:
                x = synthetic_tokens(row["n"], d, seed=f).to(device)
            default = lambda x=x, k=k: compute_anchor_scores(x, k, progress=False)  # noqa: E731
            fast = lambda x=x, k=k: compute_anchor_scores(x, k, solver="fast", progress=False)  # noqa: E731
            if kind == "video-like":  # each size's first call (compiles, graph captures)
                save(row, "seconds_default_first")
                row["seconds_default_first"], _, row["warnings_default_first"] = _timed(
                    default, device
                )
            if i == 0 and not smoke:
                save(row, "the fast solver's first call")
                fast()  # the library's first call outside the timings
            save(row, "seconds_default")
            row["seconds_default"], res, row["warnings_default"] = _timed(default, device)
            row.update(_scores_row(res))
            save(row, "seconds_fast")
            row["seconds_fast"], fres, _ = _timed(fast, device)
            if row["seconds_default"] + row["seconds_fast"] < REPEAT_UNDER:
                # the default and the fast solver again, interleaved: medians of 3 each (one
                # sample of a 0.2 s call moved the dense ratio by 0.2, across the 1.25x rule)
                both = [(row["seconds_default"], row["seconds_fast"])] + [
                    (_timed(default, device)[0], _timed(fast, device)[0]) for _ in range(2)
                ]
                row["samples_default"], row["samples_fast"] = map(list, zip(*both, strict=True))
                row["seconds_default"] = sorted(row["samples_default"])[1]
                row["seconds_fast"] = sorted(row["samples_fast"])[1]
            row["default_over_fast"] = row["seconds_default"] / row["seconds_fast"]
            if kind == "video-like" and name in bench_request_cost.SHAPES:
                save(row, "seconds_prefill")
                pre = bench_request_cost.prefill_seconds(bench_request_cost.SHAPES[name], row["n"],
                                                         device, dtype)  # fmt: skip
                row.update(seconds_prefill=pre, prefill_dtype=str(dtype).replace("torch.", ""),
                           default_over_prefill=row["seconds_default"] / pre,
                           fast_over_prefill=row["seconds_fast"] / pre)  # fmt: skip
                if row["target"] is not None:
                    row["meets_target"] = row["default_over_prefill"] <= row["target"]
            else:
                row["dense_rule"] = DENSE_RULE.get(res.solver)
                row["meets_dense_rule"] = row["default_over_fast"] <= DENSE_RULE.get(res.solver, 0)
            if kind == "video-like" and share_cost:  # issue 78: the soft share's cost
                save(row, "share_cost")
                row.update(_share_cost(res, x, k, device))
            if i == 0:  # the working sets' own record, the synchronisations, the yardstick
                save(row, "seconds_workset_cuda")
                t, out, _ = _timed(lambda x=x: wc.solve_workset_cuda(x, **kw), device)
                row.update(seconds_workset_cuda=t, passes_workset_cuda=out["passes"],
                           replayed_workset_cuda=out["replayed"],
                           active_sum_over_n=out["active"] / row["n"],
                           steps_max=None if out["steps"] is None else int(out["steps"].max()),
                           host_reads_workset_cuda=len(out["reads"]))  # fmt: skip
                # the passes' products (issue 98 item 4: ``wc.screening`` picks float64 where
                # the device multiplies it fast): each precision's warm call, its passes
                save(row, "screening")
                row["screening"] = wc.screening(device)
                for p in ("float32", "float64"):
                    call = lambda x=x, p=p: wc.solve_workset_cuda(x, precision=p, **kw)  # noqa: E731
                    _timed(call, device)  # (its graphs captured)
                    t, out, _ = _timed(call, device)
                    row.update({f"seconds_workset_cuda_{p}": t, f"passes_{p}": out["passes"],
                                f"active_sum_over_n_{p}": out["active"] / row["n"]})  # fmt: skip
                save(row, "syncs_default")
                row["syncs_default"] = _syncs(default, device)
                if yardstick:
                    save(row, "yardstick")
                    t = time.perf_counter()
                    ref = reference_minimiser(x.cpu())
                    row["reference_seconds"] = time.perf_counter() - t
                    row.update(_yardstick(x.cpu(), res.coef, ref), reference_gap=ref.residual,
                               fast_objective_gap=_yardstick(x.cpu(), fres.coef, ref)[
                                   "objective_gap"])  # fmt: skip
        except Exception as exc:  # reported, not hidden
            row["error"] = f"{type(exc).__name__}: {exc}"[:300]
            row["error_in"] = row.get("in_progress")
        path = save(row)  # (each row kept as it ends)
    print_table(rows, ["model", "frames", "subjects", "n", "tokens", "seconds_default", "answered",
                       "passes", "seconds_prefill", "default_over_prefill", "target",
                       "seconds_fast", "default_over_fast", "objective_gap"])  # fmt: skip
    return path


def compile_static(cc: int) -> list[dict]:
    """The pass's Triton kernels (``_pass_kernel``: residuals, violations, joins) compiled
    ahead of time for ``sm_<cc>`` at each level's slots, float32 and float64 (Triton's
    bundled ptxas, no GPU; run with ``TRITON_INTERPRET=0``): registers, spill bytes, shared
    memory. STATIC figures, read from compiled code."""
    from videoanchor.anchor.solvers import _pass_kernel as pk
    from videoanchor.kernels import aot
    from videoanchor.kernels.launch import Launch

    n, d, cap = 2048, 3584, 2048
    i32, i64, f64 = torch.int32, torch.int64, torch.float64
    e = lambda *shape, dtype=f64: torch.empty(*shape, dtype=dtype)  # noqa: E731
    rows = []
    for M, ME in zip(wc.SLOTS, wc.OUTLIER_SLOTS, strict=True):
        k = min(_plan.PASS_RULE.grow_max, n, M)  # (the pass's topk: _pass)
        for dt in (torch.float32, torch.float64):
            one = e(1, dtype=i32)
            common = (e(n, dtype=i64), e(n, M, dtype=i32), e(n, M), e(n, ME, dtype=i32),
                      e(n, ME))  # fmt: skip
            recs = {
                "residuals": Launch(pk._residual_kernel, (cap, d // pk.BD),
                                    (e(n, d), *common, e(cap, dtype=i32), one, e(cap, d, dtype=dt),
                                     e(cap, d, dtype=dt), d, M, ME, e(pk.SCALE + 1)),
                                    {"BD": pk.BD, "BS": pk.BS}),
                "violations": Launch(pk._violations_kernel, (cap, n // 128),
                                     (e(cap, n, dtype=dt), e(cap, n, dtype=dt), common[0],
                                      common[1], common[2], e(n), e(cap, dtype=i32), one,
                                      e(1, dtype=i64), e(1, dtype=i64), n, M, e(pk.SCALE + 1)),
                                     {"BN": 128, "BS": 16}),
                "joins": Launch(pk._joins_kernel, (cap,),
                                (e(cap, k, dtype=dt), e(cap, k, dtype=i64), e(cap, n, dtype=dt),
                                 e(cap, d, dtype=dt), e(cap, d, dtype=dt), e(n, ME, dtype=i32),
                                 *common, e(n), e(n, dtype=i32), e(n, dtype=i32),
                                 e(n, dtype=i64), e(n, dtype=i32), e(n, dtype=i32),
                                 e(n, dtype=i32), e(cap, dtype=i32), e(cap, dtype=i32), one, one,
                                 e(1, dtype=i64), n, d, ME, k, e(pk.SCALE + 1),
                                 _plan.PASS_RULE.grow0, _plan.PASS_RULE.grow_max),
                                {"exact": dt == f64, "last": False, "has_ok": True,
                                 **pk.joins_constexprs(M, ME, _plan.PASS_RULE.grow_max)}),
            }  # fmt: skip
            for name, rec in recs.items():
                row = {"kernel": name, "M": M, "ME": ME, "dtype": str(dt)[6:]}
                try:
                    got = aot.compile_launch(rec, cc)
                except Exception as exc:  # reported, not hidden (the other kernels compile)
                    rows.append(dict(row, cc=cc, error=f"{type(exc).__name__}: {exc}"[:2000]))
                    continue
                rows.append({**row, **{x: got.get(x) for x in ("cc", "registers", "spill_stores",
                                                               "spill_loads", "shared_bytes",
                                                               "num_warps", "ctas_per_sm")}})  # fmt: skip
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--frames", default="16,32,64")
    ap.add_argument("--models", default=",".join(SHAPES))
    ap.add_argument("--out-dir", default=None)
    ap.add_argument("--budget", type=float, default=420.0,
                    help="seconds: a row that would start later is written as not run")  # fmt: skip
    ap.add_argument("--clusters", type=int, default=CLUSTERS,
                    help="the video-like rows' n_clusters (the paper's 24)")  # fmt: skip
    ap.add_argument("--no-dense", action="store_true", help="without the dense (synthetic) row")
    ap.add_argument("--no-yardstick", action="store_true",
                    help="without the CPU's certified minimiser at the first size")  # fmt: skip
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU")
    ap.add_argument("--no-share-cost", action="store_true",
                    help="without the soft cluster share's cost (issue 78) on each video-like "
                    "set")  # fmt: skip
    ap.add_argument("--counts", action="store_true",
                    help="CPU: passes, active columns, operators and host reads a pass and a "
                    "call on small sets (module docstring)")  # fmt: skip
    ap.add_argument("--static", type=int, default=None, metavar="CC",
                    help="compile the pass's Triton kernels for sm_CC ahead of time (no GPU; "
                    "TRITON_INTERPRET=0): one JSON line each")  # fmt: skip
    ap.add_argument("--kernel", default="triton", choices=("triton", "reference"),
                    help="--counts: the column kernel (interpreted) or the tests' stand-in")  # fmt: skip
    ap.add_argument("--ncu", action="store_true",
                    help="for ncu: warm_up (one launch per level of slots, no columns), then "
                    "one solve of the working sets at 16 frames of Qwen2.5-VL-7B")  # fmt: skip
    args = ap.parse_args(argv)
    if args.static is not None:  # one JSON line a kernel, and the JSON file
        rows = compile_static(args.static)
        for row in rows:
            print(json.dumps(row), flush=True)
        meta = environment(f"sm_{args.static} static")
        meta["note"] = ("STATIC: Triton's bundled ptxas, no GPU; the pass's kernels at N = "
                        "2048, D = 3584, capacity 2048, each level's slots")  # fmt: skip
        # another Triton than 3.9 (the lent GPU machines' 3.6) writes a file of its own
        version = "".join((meta["triton"] or "").split(".")[:2])
        suffix = "" if version == "39" else f"_triton{version}"
        name = f"workset_cuda_pass_kernels_sm{args.static}{suffix}"
        print(write_result(name, meta, rows, args.out_dir))
        return
    if args.counts:
        print(counts(args.out_dir, kernel=args.kernel))
        return
    if args.ncu:
        per_frame, d = SHAPES["Qwen2.5-VL-7B"]
        x = video_tokens(16, per_frame, d, k=8, seed=0).cuda()
        wc.warm_up(x.device)
        out = wc.solve_workset_cuda(x)
        print(
            f"passes {out['passes']} of {out['replayed']} replayed (warm_up: 2 launches of "
            f"each kernel a level, {len(wc.SLOTS)} levels)"
        )
        return
    if args.smoke:
        print(run({"tiny": (8, 12)}, [3], args.out_dir, smoke=True,
                  clusters=min(args.clusters, 2)))  # fmt: skip
        return
    shapes = {m: SHAPES[m] for m in args.models.split(",")}
    print(run(shapes, [int(f) for f in args.frames.split(",")], args.out_dir,
              dense=not args.no_dense, yardstick=not args.no_yardstick, budget=args.budget,
              share_cost=not args.no_share_cost, clusters=args.clusters))  # fmt: skip


if __name__ == "__main__":
    main()
