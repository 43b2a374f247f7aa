"""The plan of one SSC call: where and how it runs, decided once, before any work.

An SSC entry point runs in stages: options (:mod:`videoanchor.anchor.options`) and features
(:func:`~videoanchor.anchor._inputs.prepare_features`), checked once; the plan
(:func:`make_plan`: mode, solver, backend, device, working dtype, precision, A-step strategy,
block size and the memory they take); the solve (:mod:`videoanchor.anchor.solve`); the
clustering and the scores. Here: the plan, its rules of what runs together (what blocked mode
and ``precision="fp16x3"`` can run: :func:`check_blocked`, :func:`check_precision`, which the
options' up-front check asks as well), the memory rule (what the device has available now)
and the solvers' cost models (peak bytes, the A-step's cheaper inverse).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields, replace

import torch

from videoanchor.anchor.collective import OTHER_RANK_FAILED, _group, any_rank
from videoanchor.anchor.products import resolve_precision

__all__ = [
    "EXACT_MAX_TOKENS",
    "PASS_RULE",
    "PRECISIONS",
    "ROUTES",
    "PassRule",
    "WARM_SET",
    "Plan",
    "SSCMemoryError",
    "admm_bytes",
    "blocked_admm_bytes",
    "check_memory",
    "choose_strategy",
    "default_block_columns",
    "equality_bytes",
    "exact_bytes",
    "exact_fits",
    "fast_step",
    "format_bytes",
    "free_memory_bytes",
    "auto_solver",
    "blocked_refusal",
    "check_blocked",
    "check_precision",
    "iteration_options",
    "make_plan",
    "split_bytes",
    "workset_blocks_bytes",
    "workset_bytes",
]


class SSCMemoryError(MemoryError):
    """The dense SSC problem does not fit in the memory of the chosen device."""


#: The memory rule (docs/long-videos.md): the SSC may use this fraction of what the device
#: has available when the check runs (:func:`read_available_memory`), leaving room for the
#: rest of the process (model, activations, allocator fragmentation). One reading, one rule.
MEMORY_FRACTION = 0.9


@dataclass(frozen=True)
class MemoryReading:
    """Memory available on a device: ``available`` bytes and where it was read (``source``)."""

    available: int
    source: str

    @property
    def budget(self) -> int:
        """Bytes the SSC may use: ``MEMORY_FRACTION`` of ``available``."""
        return int(self.available * MEMORY_FRACTION)


def meminfo_available(path: str = "/proc/meminfo") -> int | None:
    """``MemAvailable`` of ``path`` in bytes, or None where it cannot be read."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # the kernel reports kB (KiB)
    except (OSError, ValueError, IndexError):
        return None
    return None


def cgroup_available(root: str = "/sys/fs/cgroup") -> int | None:
    """Bytes left under a cgroup v2 memory limit, reclaimable file cache counted as free."""
    try:
        with open(os.path.join(root, "memory.max")) as f:
            limit = f.read().strip()
        if limit == "max":
            return None
        with open(os.path.join(root, "memory.current")) as f:
            current = int(f.read().strip())
        inactive = 0
        with open(os.path.join(root, "memory.stat")) as f:
            for line in f:
                if line.startswith("inactive_file "):
                    inactive = int(line.split()[1])
        return max(0, int(limit) - current + inactive)
    except (OSError, ValueError, IndexError):
        return None


def read_available_memory(device: torch.device) -> MemoryReading | None:
    """What ``device`` has available now, or None when unknown (no check): on CUDA
    ``torch.cuda.mem_get_info``'s free bytes plus what PyTorch's allocator holds reserved but
    unallocated; on the CPU ``MemAvailable`` of /proc/meminfo (free pages plus reclaimable
    page cache), lowered to the cgroup v2 limit left where one is set (no /proc/meminfo, as
    on macOS or Windows: unknown)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return MemoryReading(int(free + cached), "torch.cuda.mem_get_info + PyTorch's cache")
    if device.type == "cpu":
        avail = meminfo_available()
        if avail is None:
            return None
        cg = cgroup_available()
        if cg is not None and cg < avail:
            return MemoryReading(cg, "cgroup memory.max - memory.current + inactive_file")
        return MemoryReading(avail, "MemAvailable in /proc/meminfo")
    return None


_LAST_READING: dict[str, MemoryReading | None] = {}


def free_memory_bytes(device: torch.device) -> int | None:
    """Bytes the SSC may use on ``device`` (the memory rule's budget), or None when unknown."""
    reading = read_available_memory(device)
    _LAST_READING[device.type] = reading  # for check_memory's message
    return None if reading is None else reading.budget


def format_bytes(n: float) -> str:
    """``n`` bytes for a message: ``"1.5 GiB"``."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def check_memory(required: int, device: torch.device, *, n: int, d: int, what: str) -> None:
    """Raise ``SSCMemoryError`` when ``required`` bytes exceed the memory rule's budget on
    ``device`` (``MEMORY_FRACTION`` of the available memory; no check when unknown)."""
    budget = free_memory_bytes(device)
    if budget is None or required <= budget:
        return
    reading = _LAST_READING.get(device.type)
    if reading is not None and reading.budget == budget:
        room = (
            f"{format_bytes(reading.available)} is available ({reading.source}) and the SSC may "
            f"use {MEMORY_FRACTION:.0%} of it, {format_bytes(budget)}"
        )
    else:
        room = f"the SSC may use {format_bytes(budget)}"
    where = (
        "run on the CPU (features.cpu()) if it has more memory, free GPU memory first "
        "(torch.cuda.empty_cache(), other processes)"
        if device.type == "cuda"
        else "close other programs or use a machine (or a GPU) with more memory"
    )
    raise SSCMemoryError(
        f"{what} with N = {n} tokens and D = {d} features needs about {format_bytes(required)} "
        f"on {device}, but {room}. Options: use mode='blocked' (exact, no N x N "
        f"buffer; smaller block_columns=...), use fewer frames (fewer tokens; memory grows "
        f"as N^2), reduce the feature dimension with pca_rank=..., or {where}."
    )


def choose_strategy(n: int, d: int, outliers: bool = True, device_type: str = "cpu") -> str:
    """The cheaper way to apply the system inverse: ``"dense"`` or ``"woodbury"``, from the
    multiply-adds per iteration (E = 0) of the dominant products. Woodbury runs in float64
    (its float32 form loses the last digits to cancellation): on the CPU a float64
    multiply-add costs about two float32 ones, on data-centre GPUs (H100/H200 float64 tensor
    cores) about the same as a float32 SIMT one. Ties go to ``"dense"``."""
    dense = n**3 + (d * n * n if outliers else 0.0)
    woodbury = 2.0 * d * n * n + 2.0 * d * d * n
    f64_cost = 1.2 if device_type == "cuda" else 2.0
    return "woodbury" if f64_cost * woodbury < 0.8 * dense else "dense"


def admm_bytes(n: int, d: int, itemsize: int, strategy: str, precision: str = "full",
               cuda: bool = True) -> int:  # fmt: skip
    """Peak bytes of :func:`~videoanchor.anchor.solvers.admm.solve_ssc_admm` (working buffers plus
    the float64 factorisation); with ``precision="fp16x3"`` also the float16 parts
    (:func:`split_bytes`)."""
    if precision == "fp16x3":
        return admm_bytes(n, d, itemsize, strategy) + split_bytes(n, d, cuda=cuda)
    nn = n * n
    if strategy == "dense":
        # float64 factorisation (M and its inverse), then A, C, Lam, Minv, R in work dtype;
        # with outliers Minv, B0 and A carry D extra rows (Y Minv, Y B0, Y A)
        return max(2 * nn * 8, nn * 8 + nn * itemsize) + 5 * nn * itemsize + 9 * n * d * itemsize
    return 4 * nn * itemsize + 3 * nn * 8 + 8 * n * d * 8 + 3 * (d + 1) ** 2 * 8


def exact_bytes(n: int, d: int, itemsize: int, device_type: str, precision: str = "full", *,
                strategy: str = "auto", outliers: bool = True) -> int:  # fmt: skip
    """Peak bytes of :func:`~videoanchor.anchor.solvers.admm.solve_ssc_admm` on ``N x D``
    features on a device of ``device_type`` (:func:`admm_bytes`; ``strategy="auto"``: the one
    :func:`choose_strategy` picks). The one memory rule of the dense solver, the
    ``mode="auto"`` choice and the CLI's SSC plan."""
    if precision not in ("full", "fp16x3"):
        raise ValueError(
            f"precision: expected the precision that runs, 'full' or 'fp16x3' (resolve 'auto' "
            f"with videoanchor.anchor.plan.check_precision first), got {precision!r}"
        )
    if strategy == "auto":
        strategy = choose_strategy(n, d, outliers, device_type)
    return admm_bytes(n, d, itemsize, strategy, precision, cuda=device_type == "cuda")


def split_bytes(n: int, d: int, *, cuda: bool) -> int:
    """Bytes ``precision="fp16x3"`` adds to the fast solver: the float16 parts (three halves,
    6 bytes per entry) of ``[R; Y R]``, ``V^T``, the features and one ``T - I``; off CUDA also
    the emulation's float32 copies of the largest product's parts."""
    split = 6 * n * (n + d) + 6 * n * n + 6 * n * d + 6 * n * n
    return split if cuda else split + 12 * n * (n + d) + 12 * n * n


# A block's working-set budget (bytes) per device type: large on a GPU (efficient products),
# small on the CPU (a low peak); not read from the free memory, so every rank picks the same.
_BLOCK_BUDGET = {"cpu": 256 * 2**20, "cuda": 4 * 2**30}
_BLOCK_ALIGN = 64


def _column_bytes(n: int, itemsize: int) -> int:
    """Bytes per column of a block's working set: C, Lam, A, the new Lam and a temporary
    in the working dtype, and the float64 right-hand side and A-step output."""
    return n * (5 * itemsize + 2 * 8)


def default_block_columns(n: int, d: int, dtype: torch.dtype, device_type: str) -> int:
    """Columns per block: the largest multiple of 64 whose working set fits the device
    type's budget (256 MiB on the CPU, 4 GiB on CUDA), at least 64, at most ``N``."""
    itemsize = torch.finfo(dtype).bits // 8
    budget = _BLOCK_BUDGET.get(device_type, _BLOCK_BUDGET["cpu"])
    b = budget // _column_bytes(n, itemsize)
    b = max(_BLOCK_ALIGN, (b // _BLOCK_ALIGN) * _BLOCK_ALIGN)
    return int(min(n, b))


def blocked_admm_bytes(n: int, d: int, itemsize: int, block: int) -> int:
    """Working memory of :func:`~videoanchor.anchor.solvers.blocked.solve_ssc_blocked` without the
    sparse ``C`` (whose size is only known at the end): one block's buffers plus the
    ``O(N D)`` factors."""
    return block * _column_bytes(n, itemsize) + 4 * n * d * 8 + block * d * 8 * 4


def equality_bytes(n: int, d: int, itemsize: int) -> int:
    """Peak bytes of :func:`~videoanchor.anchor.solvers.equality.solve_ssc_equality` (working
    buffers plus the factorisation)."""
    small = min(n, d)
    return (5 * n * n + 9 * d * n) * itemsize + 3 * small * small * 8 + 2 * n * d * 8


#: ``mode="auto"``: the dense exact solver up to this many tokens (if it fits), blocked above
EXACT_MAX_TOKENS = 16384


def exact_fits(n: int, d: int, work: torch.dtype, device: torch.device,
               precision: str = "full") -> bool:  # fmt: skip
    """Whether ``mode="auto"`` runs exact mode on ``N x D`` features: at most
    :data:`EXACT_MAX_TOKENS` tokens and the dense solver's peak (working dtype ``work``,
    ``precision`` as it runs) within the memory rule."""
    if n > EXACT_MAX_TOKENS:
        return False
    need = exact_bytes(n, d, torch.finfo(work).bits // 8, device.type, precision)
    free = free_memory_bytes(device)
    return free is None or need <= free


@dataclass(frozen=True)
class Plan:
    """How one SSC call runs, fixed before any work (:func:`make_plan`).

    ``mode``: ``"exact"`` (dense ``N x N``) or ``"blocked"`` (column blocks, sparse C);
    ``solver``: ``"workset"``, ``"fast"`` or ``"faithful"``; ``program``: ``"squared"``
    (docs/method.md) or ``"exact"`` (Elhamifar & Vidal's constrained outlier program);
    ``backend``: ``"torch"``, ``"cupy"`` (or the name of the ``xp`` given to
    :func:`~videoanchor.anchor.solvers.admm.solve_ssc_admm`); ``work``: the working dtype;
    ``precision``: the fast solver's products (``"full"`` or ``"fp16x3"``); ``strategy``: the
    authors' A-step inverse (``"dense"`` or ``"woodbury"``), the fast solver's step
    (:func:`fast_step`: ``"active_set"`` or ``"dense"``), or the working sets' route
    (``"workset"`` or ``"workset_cuda"``);
    ``block_columns``: columns per block (``N`` outside blocked mode); ``group``, ``rank``,
    ``world``: the process group the work is split over (None, 0, 1 alone); ``need``: the
    peak bytes the memory rule checked; ``route``: the solver routine that runs it
    (:data:`ROUTES`, mapped to functions by :data:`videoanchor.anchor.solve.SOLVERS`);
    ``fallback``: the plan of the solver whose answer a composite route falls back on (the
    working sets': the fast solver's), so that no solver builds a plan of its own;
    ``dark``: how ``mu_z`` treats dark tokens (the option ``dark_tokens``:
    :func:`~videoanchor.anchor.program.ssc_lambdas`' ``dark``).
    """

    mode: str
    solver: str
    backend: str
    device: torch.device
    work: torch.dtype
    precision: str = "full"
    strategy: str = "dense"
    block_columns: int = 0
    program: str = "squared"
    group: object = None
    rank: int = 0
    world: int = 1
    need: int = 0
    route: str = ""
    fallback: Plan | None = None
    dark: str = "authors"

    def describe(self, opts) -> str:
        """What this plan runs, in words, for a plan line (the command line, the logs);
        ``opts``: the checked options it was made with."""
        if self.route == "workset_blocks":
            return (f"the working sets by blocks of {self.block_columns} columns (the "
                    "program's certified minimiser, no N x N buffer)")  # fmt: skip
        if self.mode == "blocked":
            return (f"the authors' iteration by blocks of {self.block_columns} columns (to eps "
                    f"{opts.eps:g}, at most {opts.max_iter} iterations)")  # fmt: skip
        if self.solver == "workset":
            return ("the working sets (the program's certified minimiser; where C is dense, "
                    "the fast solver's answer)")  # fmt: skip
        if self.solver == "fast":
            return (f"the fast solver (the authors' steps on a fixed schedule, iteration limit "
                    f"{opts.max_iter}; products in {self.precision} precision)")  # fmt: skip
        return (f"the authors' iteration (to eps {opts.eps:g}, at most {opts.max_iter} "
                "iterations)")  # fmt: skip


#: The solver routines a plan's ``route`` names: ``"workset_then_fast"`` (the working sets,
#: from the fast solver's answer where ``C`` is dense: ``workset.run_workset``),
#: ``"workset_cuda"`` (one Triton program per column on CUDA, the fast answer where a column
#: outgrows its slots), ``"admm"`` (the fast schedule or the authors' iteration),
#: ``"admm_cupy"`` (the same on CuPy), ``"blocked"``, ``"equality"``.
#: ``"workset_blocks"`` (the working sets by column blocks against local dictionaries,
#: certified against the full one: blocked mode with ``solver="workset"``, issue 99).
ROUTES = (
    "workset_then_fast",
    "workset_cuda",
    "admm",
    "admm_cupy",
    "blocked",
    "equality",
    "workset_blocks",
)


#: The most coefficients per column's working set where ``workset.run_workset`` starts from
#: the fast solver's answer (a dense ``C``: ~200-330 per column on the synthetic sets,
#: ~100-150 on Yale B faces; outlier entries are not bounded, the kernel eliminates them).
#: It sizes the kernel's per-thread buffers (:func:`workset_bytes`).
WARM_SET = 512


@dataclass(frozen=True)
class PassRule:
    """The working sets' pass rule, one for the CPU's kernel
    (:mod:`~videoanchor.anchor.solvers.workset`) and the GPU's passes
    (:mod:`~videoanchor.anchor.solvers.workset_cuda`), both reading :data:`PASS_RULE` when they
    run (the GPU's kept CUDA graphs: when captured; issue 101). At a column's outer pass ``p``
    (1, 2, ...), EVERY outlier entry that violates its KKT condition joins the column's working
    set at once, and of the coefficients the :meth:`grow` worst violators: ``grow0`` in the
    first pass, doubling each pass (at most 8 times) up to ``grow_max`` (issue 90: geometric
    growth; the outlier entries, which cost no factor, outside it). Where the two routes
    differ, by design:

    - ``cpu_grow0`` and ``cpu_grow_max``: the CPU's, 16 and 16 (no doubling), against the
      GPU's 256 doubling to 1024 (within the level's slots: issue 98 item 4). The GPU's pass
      is a GEMM and 12 kernels over the active columns: fewer passes pay there; on the
      route's own pass loop at 16 frames of Qwen2.5-VL-7B's shape (10 corrupted tokens),
      256 doubling within slots of 1024 then 2048 sums 5.83 N active columns in 21 passes
      screening in float64 (6.85 N in 22 within 512 then 1024, in float32), where 16
      doubling to 64 within 128 then 256 slots summed 11.87 N in 52
      (``benchmarks/experiments/route_counts.py``, ``route_counts_cpu.json``). A
      CPU pass is a column's own ``|F| (N + D)`` products, and fewer of them did not pay:
      ``benchmarks/results/pass_rule_ab_cpu.json`` (one thread, warm, interleaved) has
      doubling to 64 on the CPU 1.05-1.09x slower at 16 frames, D = 1024 (the most passes
      a column takes 53 -> 24), 1.01-1.12x at 8 frames and 0.90-0.98x at 16 frames,
      D = 3584 (two runs, the first in the file's history), while doubling to 16 (none) is
      0.96-0.995x the rule before (``grow`` 16, the outlier entries among them) on every set
      and route; against this rule on the CPU, after the switch, doubling is 1.09-1.13x,
      1.07-1.10x and 1.00x (``pass_rule_growth_ab_cpu.json``). At 16 frames, D = 1024 doubling halves the columns' passes (50222 -> 26005
      in all) for the same factor work (1.37e7 -> 1.39e7 support sizes summed over the inner
      steps; counted once, 2026-11-28): what it adds is likely the inner steps' scans of the
      larger working sets (each step prices every variable of ``W``), not timed apart;
    - ``p``: the CPU's is the column's own pass; the GPU's the call's, over the active columns
      (the float64 passes after float32 screening continue its count);
    - the GPU's joins also fit its slots (``workset_cuda.SLOTS``, ``OUTLIER_SLOTS``, and the
      column kernel's support positions ``SUPPORT``: a column that would outgrow them moves
      to the next level); the CPU's sets are bounded by ``cap`` alone.
    """

    grow0: int = 256
    grow_max: int = 1024
    cpu_grow0: int = 16
    cpu_grow_max: int = 16

    def __post_init__(self):
        for name in ("grow0", "grow_max", "cpu_grow0", "cpu_grow_max"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"PassRule.{name}: expected a positive integer, got {value!r}")
        for most, first in (("grow_max", "grow0"), ("cpu_grow_max", "cpu_grow0")):
            if getattr(self, most) < getattr(self, first):
                raise ValueError(f"PassRule: expected {most} >= {first}, got "
                                 f"{getattr(self, most)} < {getattr(self, first)}")  # fmt: skip

    def grow(self, p: int, *, cpu: bool = False) -> int:
        """The most coefficients that join a column at its outer pass ``p`` (1, 2, ...):
        ``min(grow0 * 2^(p - 1), grow_max)`` (``cpu``: ``cpu_grow0`` and ``cpu_grow_max``),
        at most 8 doublings (the GPU's int32 shift)."""
        first, most = (self.cpu_grow0, self.cpu_grow_max) if cpu else (self.grow0, self.grow_max)
        return min(first << min(max(p - 1, 0), 8), most)


#: The working sets' one pass rule (:class:`PassRule`; ``benchmarks/bench_pass_counts.py``
#: counted its passes on the CPU, ``pass_counts_cpu.json``, and timed it against the rule
#: before it, ``pass_rule_ab_cpu.json``).
PASS_RULE = PassRule()


def workset_bytes(n: int, d: int, threads: int = 1) -> int:
    """Peak host bytes of :func:`~videoanchor.anchor.solvers.workset.solve_ssc_workset`: float64
    ``G``, ``C``, the certificate's ``N x N`` products, ``X``, ``X^T``, ``E`` and a start's
    residual and outliers; per thread, the kernel's ``WARM_SET x D`` gathered outlier rows."""
    return 8 * (3 * n * n + 5 * n * d + threads * (min(n, WARM_SET) + 1) * (d + 1))


#: Each column's starting candidates in the working sets by blocks (its tokens of largest
#: ``|x_i^T x_u|``; the certificate adds what they miss).
NEIGHBOURS = 96
#: The most tokens one certificate round adds to a column's local dictionary in the working
#: sets by blocks (its worst violators).
JOIN = 64
#: The most solved columns whose supports seed a column's first dictionary in the working
#: sets by blocks (:class:`~videoanchor.anchor.solvers.workset_blocks._Seeds`).
SEEDS = 4
#: The nearest tokens (by distance) whose solved columns may seed a column, nearest first.
SEED_NEAR = 8
#: The most tokens the seeds add to a column's first dictionary (past its :data:`NEIGHBOURS`).
SEED_TOKENS = 256
#: The support per column that :func:`workset_blocks_bytes` assumes (not a bound: a column's
#: support may hold up to ``D + 1`` tokens, which at D = 3584 would size batches of one
#: column): video-like tokens' minimisers hold at most 160 at N = 8192, D = 512 (issue 99).
LOCAL_SUPPORT = 256
#: Rows of ``X X^T`` the working sets by blocks' neighbours pass makes at a time: at most 256,
#: and ``N x rows`` float64 within 64 MiB.
NEIGHBOUR_BYTES = 64 * 2**20


def neighbour_rows(n: int) -> int:
    """Rows of ``X X^T`` per step of the neighbours pass over ``N = n`` tokens."""
    return max(1, min(256, NEIGHBOUR_BYTES // (8 * n)))


#: The memory the working sets by blocks size their batch of columns to, past ``X`` and ``E``.
LONG_BUDGET = 512 * 2**20


def workset_blocks_bytes(n: int, d: int, block: int, threads: int = 1, *,
                         local: int | None = None) -> int:  # fmt: skip
    """Host bytes of the working sets by blocks
    (:mod:`~videoanchor.anchor.solvers.workset_blocks`) without the sparse ``C``: float64
    ``X`` and ``E`` and the screen's float32 ``X``; the neighbours pass (an ``N x rows``
    product, :func:`neighbour_rows`, its distances, magnitudes and top-k); per batch of ``block``
    columns four ``N x block`` float64 buffers (the certificate's product, its multipliers,
    their top-k's copies) and two float32 ones (the screen's) and each column's local
    dictionary (``local`` tokens: its Gram matrix and rows); per thread, a solve's
    ``local x local`` buffers (the kernel's answer, factor and matrix, the Gram matrix's
    growth and copies: eight, from the peak measured in tests/test_long_route.py) and its
    ``D x local`` outliers. ``local`` (None: what it assumes): a dictionary holds its token,
    the kernel's support (:data:`LOCAL_SUPPORT` assumed, at most ``D + 1``) and :data:`JOIN`
    joiners, or in the first round its token, :data:`NEIGHBOURS` and :data:`SEED_TOKENS`."""
    support = min(d + 1, LOCAL_SUPPORT)
    t = min(n, 1 + max(NEIGHBOURS + SEED_TOKENS, support + JOIN) if local is None else local)
    rows = neighbour_rows(n)
    return 8 * (2 * n * d + 3 * n * rows + 2 * NEIGHBOURS * rows + 4 * n * block
                + block * (t * t + t * d) + threads * (8 * t * t + t * d)) \
        + 4 * (n * d + 2 * n * block)  # fmt: skip


def long_block_columns(n: int, d: int, budget: int = LONG_BUDGET) -> int:
    """Columns per batch of the working sets by blocks: the most (a power of two, at most
    64, at least 1) whose :func:`workset_blocks_bytes` past ``X`` (both copies) and ``E``
    fits ``budget``."""
    b = 64
    while b > 1 and workset_blocks_bytes(n, d, b) - 20 * n * d > budget:
        b //= 2
    return min(n, b)


def iteration_options(opts) -> list[str]:
    """The options set away from their defaults that only an iteration honours: ``rho``,
    ``max_iter``, ``precision`` and a ``progress`` reporter's ``time_budget``; with any of
    them ``solver="auto"`` runs the fast solver. Not ``eps`` (the fast solver has no stopping
    test: :func:`make_plan` refuses an ``eps`` its solver would ignore), nor a reporter
    without a budget: how a run is reported never changes what runs (issue 71)."""
    named = [k for k in ("rho", "max_iter", "precision")
             if getattr(opts, k) != fields_default(opts, k)]  # fmt: skip
    if getattr(opts.progress, "time_budget", None) is not None:
        named.append("time_budget")
    return named


def fields_default(opts, name: str):
    """The default of option ``name`` of the options dataclass ``opts``."""
    return next(f.default for f in fields(opts) if f.name == name)


#: what the fast solver's products may run as (:func:`check_precision`)
PRECISIONS = ("auto", "full", "fp16x3")


def blocked_refusal(solver: str, backend: str, precision: str = "auto", *,
                    tokens: int | None = None) -> str | None:  # fmt: skip
    """Why blocked mode cannot run ``solver``, ``backend`` and ``precision`` (it runs the
    authors' iteration or the working sets by blocks, on torch, in full precision), or None
    where it can. ``tokens``: the N
    for which ``mode="auto"`` chose it (None: asked for)."""
    chose = "" if tokens is None else (
        f" (mode='auto' chose it: these {tokens} tokens need blocked mode, as exact mode does "
        "not fit in memory or N exceeds its limit)"
    )  # fmt: skip
    if backend == "cupy":
        return f"mode='blocked'{chose}: expected backend 'auto' or 'torch', got 'cupy'"
    if solver == "fast":
        return (
            f"mode='blocked'{chose} runs the authors' iteration or the working sets by "
            f"blocks; expected solver 'auto', 'workset' or 'faithful', got {solver!r}"
        )
    if precision == "fp16x3":
        return (
            f"mode='blocked'{chose} runs the authors' iteration in full precision; expected "
            "precision 'auto' or 'full', got 'fp16x3'"
        )
    return None


def check_blocked(solver: str, backend: str, precision: str = "auto", *,
                  tokens: int | None = None) -> None:  # fmt: skip
    """Refuse what blocked mode cannot run: a ValueError saying why
    (:func:`blocked_refusal`)."""
    why = blocked_refusal(solver, backend, precision, tokens=tokens)
    if why is not None:
        raise ValueError(why)


def check_precision(precision, *, fast: bool, work, solver: str | None = None,
                    blocked: bool = False, backend: str = "torch", device=None) -> str:  # fmt: skip
    """``precision`` resolved for ``device`` (``None``: not known yet); a ValueError naming
    what is missing where ``"fp16x3"`` is asked for and cannot run: only the fast solver's
    torch iteration in float32, in exact mode, has it (``fast``: the fast solver runs,
    ``solver``: the one asked for; ``work``: the working dtype). ``"auto"`` never raises:
    ``"fp16x3"`` where that runs natively (:func:`~videoanchor.anchor.products.resolve_precision`) and the rest allows
    it, else ``"full"``."""
    if not isinstance(precision, str) or precision not in PRECISIONS:
        raise ValueError(f"precision: expected one of {PRECISIONS}, got {precision!r}")
    got = f" (got {solver!r})" if solver is not None else ""
    problems = [
        what
        for bad, what in (
            (not fast, f"the fast solver: solver 'fast' or 'auto'{got}"),
            (blocked, "mode 'exact' or 'auto' (blocked runs the authors' iteration)"),
            (backend not in ("torch", "auto"), f"backend 'torch' or 'auto' (got {backend!r})"),
            (work != torch.float32, f"dtype float32 (got {work})"),
        )
        if bad
    ]
    if precision == "auto":
        return "full" if problems else resolve_precision("auto", device)
    if precision != "fp16x3":
        return precision
    if problems:
        raise ValueError(
            "precision='fp16x3' runs the fast solver's float32 products on float16 tensor "
            "cores; it needs " + "; ".join(problems) + ". Use precision='auto' or 'full' otherwise"
        )
    return precision


def auto_solver(device: torch.device, backend: str, opts, *, program: str = "squared",
                outliers: bool = True) -> str:  # fmt: skip
    """What ``solver="auto"`` runs in exact mode, the one rule of every entry point:
    ``"workset"`` (the program's certified minimiser by working sets, on the CPU or CUDA;
    the fast answer where ``C`` is dense or a column outgrows the GPU's slots) with torch's
    backend and the outlier term where no :func:`iteration_options` option is set;
    ``"faithful"`` for Elhamifar & Vidal's constrained program; else ``"fast"``."""
    if program != "squared":
        return "faithful"
    program_on_torch = device.type in ("cpu", "cuda") and backend == "torch" and outliers
    return "workset" if program_on_torch and not iteration_options(opts) else "fast"


def make_plan(shape, device: torch.device, opts, *, process_group=None,
              program: str = "squared", outliers: bool = True, check_memory_first: bool = True,
              strategy: str = "auto", backend: str | None = None,
              auto: str | None = None) -> Plan:  # fmt: skip
    """The :class:`Plan` of an SSC call on ``N x D`` features (``shape``: the validated,
    PCA-reduced features' shape) on ``device`` with the checked options ``opts``
    (:class:`~videoanchor.anchor.options.SSCOptions`); the only place that picks a solver.
    It takes no features, so an integration or the command line can ask what a call will
    run before it runs.

    ``mode="auto"`` is exact where the dense problem fits (:func:`exact_fits`, agreed by every
    rank of ``process_group``), else blocked (always, for the authors' iteration over a
    group); ``solver="auto"`` is :func:`auto_solver`'s choice (where ``mode="auto"`` chose
    blocked mode: the working sets by blocks, :func:`_blocked_workset`), the authors'
    iteration where ``mode="blocked"`` was asked for. What the mode cannot run is a
    ValueError; a plan over the memory rule an :class:`SSCMemoryError` on every rank together
    (``check_memory_first=False``: unchecked).
    ``strategy``: the authors' A-step (``"auto"``: :func:`choose_strategy`'s), the fast
    solver's step (:func:`fast_step`); ``backend``: the dense solver's array module where not
    ``opts.backend``'s; ``auto``: the solver ``solver="auto"`` runs where an entry point
    fixes it (:func:`~videoanchor.anchor.sparse_subspace_clustering`: ``"faithful"``)."""
    if auto is not None and opts.solver == "auto":
        opts = replace(opts, solver=auto)
    group, rank, world = _group(process_group)
    n, d = (int(v) for v in shape)
    device, work = torch.device(device), opts.dtype
    backend = backend or ("torch" if opts.backend == "auto" else opts.backend)
    # the option checks, together, before anything is decided: what the fast solver's
    # products run as, where it is the one that runs (options checked: an fp16x3 that no
    # mode could run has been refused already), and what blocked mode would refuse
    fast = opts.solver in ("auto", "fast") and program == "squared"
    precision = check_precision(opts.precision, fast=fast, work=work, solver=opts.solver,
                                device=device, backend=backend)  # fmt: skip
    refusal = blocked_refusal(opts.solver, opts.backend, opts.precision, tokens=n)
    mode, fits = opts.mode, None
    if mode == "auto":
        if opts.solver == "workset":  # its memory is the dense solver's at most (workset_bytes)
            mode = "exact" if n <= EXACT_MAX_TOKENS else "blocked"
        elif group is not None and opts.solver == "faithful":
            mode = "blocked"  # the authors' iteration runs over processes column-blocked
        else:
            fits = exact_fits(n, d, work, device, precision)
            mode = "exact" if fits else "blocked"
    # this rank's plan of each mode it may run, or what refuses it; under a process group
    # with the mode left to the memory (fits), both, so that one collective agrees on the
    # mode (exact where it fits on every rank) and on whether the agreed plan failed anywhere
    modes = ("exact", "blocked") if group is not None and fits is not None else (mode,)
    outcomes = {}
    for m in modes:
        try:
            outcomes[m] = _mode_plan(m, n, d, device, work, opts, precision, refusal, backend,
                                     program=program, outliers=outliers, strategy=strategy,
                                     check_memory_first=check_memory_first, group=group,
                                     rank=rank, world=world)  # fmt: skip
        except (ValueError, SSCMemoryError) as exc:
            outcomes[m] = exc
    if group is not None:  # the same choice on every rank, and raised together
        failed = [isinstance(outcomes.get(m), Exception) for m in ("exact", "blocked")]
        not_fits, *failed = any_rank((fits is False, *failed), group, device)
        mode = mode if fits is None else "blocked" if not_fits else "exact"
        if failed[mode == "blocked"] and not isinstance(outcomes[mode], Exception):
            raise RuntimeError(OTHER_RANK_FAILED)
    if isinstance(outcomes[mode], Exception):
        raise outcomes[mode]
    return outcomes[mode]


def _mode_plan(mode: str, n: int, d: int, device: torch.device, work: torch.dtype, opts,
               precision: str, refusal: str | None, backend: str, *, program: str,
               outliers: bool, strategy: str, check_memory_first: bool, group, rank: int,
               world: int) -> Plan:  # fmt: skip
    """:func:`make_plan`'s plan in ``mode`` (``"exact"`` or ``"blocked"``) on this rank: a
    ValueError where the mode cannot run the options, an :class:`SSCMemoryError` where the
    plan is over the memory rule (``check_memory_first``)."""
    solver = opts.solver
    if mode == "blocked":
        if refusal is not None:
            raise ValueError(refusal)
        blocks = _blocked_workset(opts, device, backend, program=program, outliers=outliers)
        solver = "workset" if blocks else "faithful"
        precision = "full"
    elif solver == "auto":
        solver = auto_solver(device, backend, opts, program=program, outliers=outliers)
    if solver in ("fast", "workset") and opts.eps != fields_default(opts, "eps"):
        what = "solver='auto' picks it here" if opts.solver == "auto" else "the solver asked for"
        raise ValueError(
            f"eps={opts.eps:g}: the stopping tolerance of the authors' iteration "
            f"(solver='faithful', or mode='blocked'), but solver={solver!r} runs ({what}), "
            "which has no stopping test; expected eps at its default "
            f"{fields_default(opts, 'eps'):g}, or solver='faithful'"
        )
    itemsize = torch.finfo(work).bits // 8
    given_strategy, strategy, block = strategy, "dense", n
    # the fast solver's step: its own, or the working sets' fallback's
    step = fast_step(device, backend, given_strategy if solver == "fast" else "auto")
    if mode == "blocked" and solver == "workset":  # (host memory, whatever the device)
        block = min(opts.block_columns or long_block_columns(n, d), n)
        strategy = route = "workset_blocks"
        need = workset_blocks_bytes(n, d, block, torch.get_num_threads())
        what = "Working-set SSC by blocks"
    elif mode == "blocked":  # (the authors' steps against a Woodbury factor, by blocks)
        block = min(opts.block_columns or default_block_columns(n, d, work, device.type), n)
        strategy, route = "woodbury", "equality" if program == "exact" else "blocked"
        need, what = blocked_admm_bytes(n, d, itemsize, block), "Blocked SSC"
    elif program == "exact":
        need, what, route = equality_bytes(n, d, itemsize), "Constrained SSC", "equality"
    elif solver == "workset" and device.type == "cuda":
        # G, C and the certificate's products in float64 on the device: about the fast
        # solver's peak, which is what its fallback takes
        strategy = route = "workset_cuda"
        need, what = exact_bytes(n, d, 8, "cuda", "full", strategy="dense"), "Working-set SSC"
    elif solver == "workset":
        strategy, route = "workset", "workset_then_fast"
        need, what = workset_bytes(n, d, torch.get_num_threads()), "Working-set SSC"
    else:  # the dense solvers (the fast one's eigendecomposition gives the dense [R; Y R])
        if solver == "fast":
            strategy, inverse = step, "dense"
        else:
            strategy = inverse = (choose_strategy(n, d, outliers, device.type)
                                  if given_strategy == "auto" else given_strategy)  # fmt: skip
        need = exact_bytes(n, d, itemsize, device.type, precision, strategy=inverse)
        what, route = "Dense SSC", "admm_cupy" if backend == "cupy" else "admm"
    dark = getattr(opts, "dark_tokens", "authors")
    if dark != "authors" and route in ("equality", "workset_cuda"):
        raise ValueError(
            f"dark_tokens={dark!r}: the {what} route ({route}) takes the authors' mu_z "
            "only; expected dark_tokens='authors'"
            + (", or solver='fast' on CUDA" if route == "workset_cuda" else "")
        )
    if check_memory_first:  # (the working sets work in host memory whatever the device)
        host = strategy in ("workset", "workset_blocks")
        check_memory(need, torch.device("cpu") if host else device, n=n, d=d, what=what)
    plan = Plan(mode=mode, solver=solver, backend=backend, device=device, work=work,
                precision=precision, strategy=strategy, block_columns=block, program=program,
                group=group, rank=rank, world=world, need=need, route=route, dark=dark)  # fmt: skip
    if solver == "workset" and mode == "exact":  # the fast solver, on the memory `need` checked
        plan = replace(plan, fallback=replace(plan, solver="fast", strategy=step, route="admm"))
    return plan


def _blocked_workset(
    opts, device: torch.device, backend: str, *, program: str, outliers: bool
) -> bool:
    """Whether blocked mode runs the working sets by blocks (route ``"workset_blocks"``, the
    program's certified minimiser) rather than the authors' iteration (``"blocked"``): where
    ``solver="workset"`` asks for them, and where ``mode="auto"`` chose blocked mode (past
    :data:`EXACT_MAX_TOKENS`, or where the dense problem does not fit) and ``solver="auto"``
    is :func:`auto_solver`'s working sets (issue 99: the default is the certified working
    sets at any ``N``), on a CPU: on CUDA the default there stays the authors' iteration on
    the device until the blocks' path (host solves, the sparse steady share on the device)
    has run on a GPU. ``mode="blocked"`` asked for with ``solver="auto"`` stays the authors'
    iteration column-blocked, as ``solver="faithful"`` does everywhere."""
    if program != "squared":
        return False
    if opts.solver == "workset":
        return True
    return (opts.mode == "auto" and opts.solver == "auto" and device.type == "cpu"
            and auto_solver(device, backend, opts, program=program, outliers=outliers)
            == "workset")  # fmt: skip


def fast_step(device: torch.device, backend: str, strategy: str = "auto") -> str:
    """How the fast solver steps (a plan's ``strategy``): ``"active_set"``, ``E`` on an
    active set (:class:`~videoanchor.anchor.solvers.fast.ActiveSetStep`), for torch on a CPU;
    ``"dense"``, the dense array-API schedule (:class:`~videoanchor.anchor.solvers.admm_steps.
    ScheduledStep`: the same steps and iterate), elsewhere or where asked for. On an H100
    (2026-11-23, ``benchmarks/results/logs/h100-2026-11-23/``) cuSPARSE's sampled and sparse
    products took 64% of the active set's device time at N = 2048, D = 3584, and it was
    slower than the authors' iterate at N = 4096 (2.54 s against 1.84 s)."""
    if strategy not in ("auto", "dense"):
        raise ValueError(f"strategy: the fast solver steps 'auto' (an active set for E on a "
                         f"CPU) or 'dense', got {strategy!r}")  # fmt: skip
    cpu_torch = device.type == "cpu" and backend == "torch"
    return "active_set" if strategy == "auto" and cpu_torch else "dense"
