"""Host reads of a GPU call, counted on the CPU, and the certificate's cost (issue 90 step 1).

:class:`DeviceReads` counts what would read a device tensor's values on the host if the CPU
tensors were a GPU's: a tensor is a *device* tensor unless it came from the host (made
without a ``device=``, from Python data, from a read, or by an op on host tensors alone);
a read is an operator that needs a value on the host (:data:`READ_OPS`: ``item``,
``nonzero``, ``unique``, ...), an index by a boolean mask (:data:`MASK_OPS`: ``x[mask]``
sizes its result by the mask's count, a ``nonzero`` inside the operator) or ``tolist`` /
``numpy`` / ``cpu()`` / ``to("cpu")`` of a device tensor. A tensor moved back with ``to(device)`` is a device tensor again. Within a
*host region* (functions named in ``host=``, which work on host tensors: ``discretize``)
factories make host tensors (their reads of device tensors still count). On a CPU tensor ``cpu()`` returns the tensor itself:
here it returns a copy, so the original stays a device tensor.

The benchmark: the certificate of a working-set answer (``SSCSolution.certified``, float64
and its float32 rounding), before (the dense form, ``column_gaps`` at the commit given by
``--before``) and after (from G; with the support as the GPU working sets' slots hold it, a
slot for each non-zero of ``C`` and of ``E``, or found), at N = 2048 and 8192, D = 3584,
video-like tokens with ten corrupted tokens: aten operators, host reads, FLOPs (static,
from the shapes and non-zeros) and CPU seconds, in one process. ``C``: the CPU working
sets' minimiser at N = 2048; at 8192 (a CPU solve takes too long here) each column's
affine least-squares fit by its 90 nearest tokens (the median support of ``GPU-SCORES.md``),
not a minimiser: the cost follows the shapes and non-zeros.

    python benchmarks/bench_host_reads.py --before <commit>
"""

from __future__ import annotations

import contextlib
import functools
import subprocess
import sys
import time
import traceback
import weakref
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import (  # noqa: E402
    environment,
    finish,
    module_at,
    parser,
    video_tokens,
)

#: Operators whose result needs a device tensor's value on the host (each waits for the GPU).
READ_OPS = frozenset(
    {"aten::item", "aten::_local_scalar_dense", "aten::is_nonzero", "aten::nonzero",
     "aten::equal", "aten::allclose", "aten::_unique2", "aten::unique_dim",
     "aten::unique_consecutive", "aten::masked_select", "aten::repeat_interleave",
     "aten::bincount", "aten::histc"}
)  # fmt: skip
#: Operators that read where an index is a boolean mask (``x[mask]``, ``x[:, mask]``: the
#: mask's count sizes the result; setting through a mask does not read).
MASK_OPS = frozenset({"aten::index"})


def _tensors(tree):
    out = []

    def visit(a):
        if isinstance(a, torch.Tensor):
            out.append(a)
        elif isinstance(a, (list, tuple)):
            for b in a:
                visit(b)
        elif isinstance(a, dict):
            for b in a.values():
                visit(b)

    visit(tree)
    return out


def _caller() -> str:
    """The innermost ``videoanchor`` frame of the stack, as ``module.py:line (function)``."""
    for frame in reversed(traceback.extract_stack()):
        if "videoanchor" in frame.filename.replace("\\", "/").split("/")[-3:-1] or (
            "/videoanchor/" in frame.filename
        ):
            return f"{Path(frame.filename).name}:{frame.lineno} ({frame.name})"
    return "?"


class DeviceReads(TorchDispatchMode):
    """Counts host reads of device tensors (module docstring) in ``reads`` (by kind, in
    order). ``host``: ``(module, name)`` of functions that run on host tensors."""

    def __init__(self, host=()):
        super().__init__()
        self.reads: list[str] = []
        self.where: list[str] = []  # the package's line that read, for each read
        self._host: dict = {}  # id -> weak reference (a tensor's == is elementwise)
        self._host_fns = list(host)
        self._depth = 0  # inside a host region
        self._moving = None  # a to()/cpu() in progress: "host" or "device"
        self._named_device = False  # the torch function running named a device=
        self._inside = False  # in a patched method

    class _Names(TorchFunctionMode):
        """Whether a torch function was given ``device=`` (the dispatcher sees the default
        filled in)."""

        def __init__(self, owner):
            super().__init__()
            self.owner = owner

        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            saved = self.owner._named_device
            self.owner._named_device = kwargs.get("device") is not None
            try:
                return func(*args, **kwargs)
            finally:
                self.owner._named_device = saved

    def is_host(self, t) -> bool:
        ref = self._host.get(id(t))
        return ref is not None and ref() is t

    def _mark(self, t, host: bool) -> None:
        if host:
            self._host[id(t)] = weakref.ref(t)
        else:
            self._host.pop(id(t), None)

    def _read(self, kind: str, t) -> None:
        if not self.is_host(t):
            self.reads.append(kind)
            self.where.append(_caller())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = f"aten::{func.__name__.split('.')[0]}"
        inputs = _tensors((args, kwargs))
        if name in READ_OPS:
            for t in inputs[:1]:
                self._read(name, t)
        elif name in MASK_OPS:  # a boolean mask's count of True is read (a nonzero inside)
            for t in inputs[1:]:
                if t.dtype == torch.bool:
                    self._read(f"{name}[bool]", t)
                    break
        out = func(*args, **kwargs)
        if self._moving is not None:
            host = self._moving == "host"
        elif name in ("aten::lift_fresh", "aten::lift_fresh_copy"):  # torch.tensor(data)
            host = True
        elif inputs:
            host = all(self.is_host(t) for t in inputs)
        else:  # a factory: a device tensor where it names a device (outside a host region)
            host = self._depth > 0 or not self._named_device
        for t in _tensors(out):
            self._mark(t, host)
        return out

    @contextlib.contextmanager
    def counting(self):
        """This mode, with ``Tensor.tolist``/``numpy``/``cpu``/``to`` and the host regions
        patched."""
        saved = {k: getattr(torch.Tensor, k) for k in ("tolist", "numpy", "cpu", "to")}
        mode = self

        def once(fn, name):  # (a torch function mode hands the method back to us: once)
            def call(t, *a, **k):
                if mode._inside:
                    return saved[name](t, *a, **k)
                mode._inside = True
                try:
                    return fn(t, *a, **k)
                finally:
                    mode._inside = False

            return call

        def reading(kind):
            fn = saved[kind]

            def read(t, *a, **k):
                mode._read(kind, t)
                return fn(t, *a, **k)

            return once(read, kind)

        def cpu(t, *a, **k):
            mode._read("cpu", t)
            mode._moving = "host"
            try:
                out = saved["cpu"](t, *a, **k)
                return out.clone() if out is t else out
            finally:
                mode._moving = None

        def to(t, *a, **k):
            target = k.get("device", a[0] if a and not isinstance(a[0], torch.dtype) else None)
            if isinstance(target, torch.Tensor):
                target = target.device
            if target is None:
                return saved["to"](t, *a, **k)
            if isinstance(target, str) and target.startswith("cpu"):  # a read
                mode._read("to_cpu", t)
                mode._moving = "host"
            elif mode.is_host(t):  # back to the device
                mode._moving = "device"
            try:
                out = saved["to"](t, *a, **k)
                if out is t and mode._moving is not None:
                    out = out.clone()
                return out
            finally:
                mode._moving = None

        patched = []
        for mod, name in self._host_fns:
            fn = getattr(mod, name)

            def region(*a, _fn=fn, **k):
                mode._depth += 1
                try:
                    return _fn(*a, **k)
                finally:
                    mode._depth -= 1

            functools.update_wrapper(region, fn)
            setattr(mod, name, region)
            patched.append((mod, name, fn))
        try:
            torch.Tensor.tolist, torch.Tensor.numpy = reading("tolist"), reading("numpy")
            torch.Tensor.cpu, torch.Tensor.to = once(cpu, "cpu"), once(to, "to")
            with self, DeviceReads._Names(self):
                yield self
        finally:
            for k, fn in saved.items():
                setattr(torch.Tensor, k, fn)
            for mod, name, fn in patched:
                setattr(mod, name, fn)


def device_reads(call, host=(), *, where: bool = False) -> list[str]:
    """The host reads of ``call()`` (:class:`DeviceReads`), by kind, in order (``where``: as
    ``kind at module.py:line (function)``)."""
    counter = DeviceReads(host)
    with counter.counting():
        call()
    if where:
        return [f"{k} at {w}" for k, w in zip(counter.reads, counter.where, strict=True)]
    return counter.reads


# ---- the certificate's cost ---------------------------------------------------------------


def corrupted_video(n: int, d: int, *, corrupt: int = 10, seed: int = 0) -> torch.Tensor:
    """Video-like tokens (``n / 128`` frames of 128 patches, 24 clusters) with ``corrupt``
    tokens whose quarter of entries are corrupted by 5x the largest entry (float64)."""
    x = video_tokens(n // 128, 128, d, k=24, seed=seed).double()
    g = torch.Generator().manual_seed(seed)
    scale = float(x.abs().max())
    for i in torch.randperm(n, generator=g)[:corrupt].tolist():
        j = torch.randperm(d, generator=g)[: d // 4]
        x[i, j] += 5 * scale * torch.randn(len(j), generator=g, dtype=x.dtype)
    return x


def nearest_affine(gram: torch.Tensor, per: int) -> torch.Tensor:
    """A sparse affine ``C`` near a minimiser's structure: each column the least-squares
    affine fit of its token by its ``per`` nearest other tokens (by ``gram``'s distances;
    the normal equations from ``gram``, a 1e-10 ridge), zero diagonal (dense)."""
    n = gram.shape[0]
    dist = gram.diagonal()[:, None] + gram.diagonal()[None, :] - 2 * gram
    dist.fill_diagonal_(float("inf"))
    near = dist.topk(per, dim=0, largest=False).indices.T  # (n, per)
    del dist
    a = gram[near[:, :, None], near[:, None, :]]  # (n, per, per): G_SS
    a += 1e-10 * a.diagonal(dim1=1, dim2=2).mean(dim=1)[:, None, None] * torch.eye(per)
    kkt = torch.zeros(n, per + 1, per + 1, dtype=torch.float64)
    kkt[:, :per, :per], kkt[:, :per, per], kkt[:, per, :per] = a, 1.0, 1.0
    rhs = torch.cat([gram[near, torch.arange(n)[:, None]], torch.ones(n, 1)], dim=1)
    coef = torch.linalg.solve(kkt, rhs[:, :, None])[:, :per, 0]
    c = torch.zeros(n, n, dtype=torch.float64)
    c[near.T, torch.arange(n)[None, :].expand(per, n)] = coef.T
    return c


def _support(c: torch.Tensor) -> torch.Tensor:
    rows, cols = torch.nonzero(c, as_tuple=True)
    return torch.stack([rows, cols])


def _before_program(commit: str):
    """``videoanchor/anchor/program.py`` at ``commit``, imported as a module of its own."""
    return module_at(commit, "videoanchor/anchor/program.py", "program_before")


def measure(n: int, d: int, per: int, before, *, solve: bool, forms=None) -> list[dict]:
    """The certificate's rows at ``n`` tokens: ``C`` the CPU working sets' minimiser
    (``solve``) or :func:`nearest_affine`'s; ``forms``: the forms to run (default all)."""
    from videoanchor.anchor import solve_ssc_workset
    from videoanchor.anchor.options import DEFAULTS
    from videoanchor.anchor.program import SSCSolution, ssc_lambdas

    x = corrupted_video(n, d)
    y = x.T.contiguous()
    gram = y.T @ y
    t0 = time.perf_counter()
    if solve:
        res = solve_ssc_workset(x)
        c, lam_e, lam_z = res.coef.double(), res.lambda_e, res.lambda_z
    else:
        c = nearest_affine(gram, per)
        lam_e, lam_z, _, _ = ssc_lambdas(x, DEFAULTS.alpha_e, DEFAULTS.alpha_z, gram=gram)
    made = time.perf_counter() - t0
    e = torch.zeros(d, n, dtype=torch.float64)
    kw = dict(like=x, dtype=torch.float32, timings={}, iterations=1, converged=True)
    nnz_e = int(((y - y @ c).abs() > lam_e / lam_z).sum())
    # as the GPU working sets hold them: a slot for each non-zero of C and of E (E's: -1)
    support = torch.cat([_support(c), torch.full((2, nnz_e), -1)], dim=1)
    every = {
        "dense (before)": lambda: before.SSCSolution.certified(y, c, e, lam_e, lam_z, **kw),
        "from G, support given": lambda: SSCSolution.certified(
            y, c, e, lam_e, lam_z, gram=gram, support=support, **kw),
        "from G, support found": lambda: SSCSolution.certified(
            y, c, e, lam_e, lam_z, gram=gram, **kw),
    }  # fmt: skip
    rows, ref = [], None
    nnz_c = int((c != 0).sum())
    for name in forms or every:
        call = every[name]
        t0 = time.perf_counter()
        res = call()
        seconds = time.perf_counter() - t0
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            reads = device_reads(call)
        ops = sum(ev.name.startswith("aten::") for ev in prof.events())
        if ref is None:
            ref = res
        dense = name.startswith("dense")
        # (program.TOP; E's bound: N + the support's entries, then E's count where above)
        top, bound = 4, n + (support.shape[1] if "given" in name else nnz_c)
        passes = 1 + (nnz_e > bound)
        flops = (2 * 2 * 2 * d * n * n if dense else
                 2 * passes * (2 * (d + n) * (support.shape[1] if "given" in name else nnz_c)
                               + 2 * n * max(bound, nnz_e)
                               + 2 * 2 * top * d * n))  # fmt: skip
        rows.append({
            "form": name, "N": n, "D": d, "C": "minimiser" if solve else "synthetic",
            "C_seconds": round(made, 1), "nnz_C": nnz_c, "nnz_E": nnz_e, "E_bound": bound,
            "host_reads": len(reads), "reads": ",".join(reads), "aten_ops": ops,
            "flops_static": flops, "cpu_seconds": round(seconds, 3),
            "residual": res.residual, "gap": res.gap,
            "residual_rel_diff": abs(res.residual - ref.residual) / abs(ref.residual),
            "gap_rel_diff": abs(res.gap - ref.gap) / abs(ref.gap),
        })  # fmt: skip
        print(rows[-1], flush=True)
    return rows


def main(argv=None):
    ap = parser(__doc__.splitlines()[0])
    ap.add_argument("--before", default="85ac76b~1", help="the commit of the dense form")
    ap.add_argument("--sizes", default="2048,8192")
    ap.add_argument("--solve-up-to", type=int, default=2048,
                    help="C the CPU working sets' minimiser up to this N, synthetic above")  # fmt: skip
    args = ap.parse_args(argv)
    before = _before_program(args.before)
    meta = environment("cpu")
    meta["before"] = subprocess.run(["git", "rev-parse", args.before], capture_output=True,
                                    text=True, cwd=Path(__file__).resolve().parent).stdout.strip()  # fmt: skip
    meta["torch_threads"] = torch.get_num_threads()
    meta["c"] = (
        "synthetic: each column the affine least-squares fit by its 46 (N = 2048) or "
        "90 (N = 8192) nearest tokens; the program's lambdas (ssc_lambdas, defaults)"
    )
    meta["flops"] = "static, from the shapes; float64 C and its float32 rounding (2 certificates)"
    rows = []
    for n in (int(s) for s in args.sizes.split(",")):
        small = n <= args.solve_up_to
        rows += measure(n, 3584, 46 if n <= 2048 else 90, before, solve=small,
                        forms=None if small else ["dense (before)", "from G, support given"])  # fmt: skip
    meta["loadavg_after"] = environment("cpu").get("loadavg")
    finish("host_reads_certificate", meta, rows, args.out_dir,
           ["form", "N", "nnz_C", "host_reads", "aten_ops", "flops_static", "cpu_seconds",
            "gap_rel_diff"])  # fmt: skip


if __name__ == "__main__":
    main()
