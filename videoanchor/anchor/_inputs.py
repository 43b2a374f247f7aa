"""Input checks and memory estimates shared by the SSC entry points."""

from __future__ import annotations

import math
import os
import threading
import warnings
from dataclasses import dataclass

import numpy as np
import torch


class SSCMemoryError(MemoryError):
    """The dense SSC problem does not fit in the memory of the chosen device."""


def as_feature_tensor(features, *, name: str = "features") -> torch.Tensor:
    """Return ``features`` as a 2-D real floating tensor on its own device.

    Accepts a ``torch.Tensor`` or anything ``numpy.asarray`` understands. Raises
    ``TypeError`` for non-numeric input and ``ValueError`` for a wrong shape, an empty
    matrix or non-finite values.
    """
    if isinstance(features, torch.Tensor):
        x = features.detach()
    else:
        try:
            arr = np.asarray(features)
        except Exception as exc:  # pragma: no cover - exotic objects
            raise TypeError(
                f"{name}: expected a tensor or array, got {type(features).__name__}"
            ) from exc
        if arr.dtype == object or not (
            np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_
        ):
            raise TypeError(f"{name}: expected a numeric array, got dtype {arr.dtype}")
        x = torch.from_numpy(np.ascontiguousarray(arr))
    if x.is_complex():
        raise TypeError(f"{name}: expected real values, got dtype {x.dtype}")
    if x.dim() != 2:
        raise ValueError(
            f"{name}: expected a 2-D (N, D) matrix with one row per token, got shape {tuple(x.shape)}"
        )
    n, d = x.shape
    if n == 0 or d == 0:
        raise ValueError(f"{name}: expected at least one token and one feature, got shape {(n, d)}")
    if x.device.type == "meta":
        raise ValueError(
            f"{name}: expected a tensor holding values, got one on the 'meta' device (shape "
            f"only, no data); SSC needs the real features: materialise the model (load its "
            f"weights, e.g. without device_map='meta' / init_empty_weights) or pass features "
            f"computed on the CPU or a GPU"
        )
    if not x.is_floating_point():
        x = x.to(torch.float64)
    if not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).sum())
        raise ValueError(f"{name}: expected finite values, got {bad} NaN/Inf entries")
    return x


def warn_dominant_token(x: torch.Tensor, work: torch.dtype) -> None:
    """Warn, before the SSC, when one token's feature norm dwarfs the others' beyond what the
    working dtype can resolve: its Gram entries ``y_i^T y_j`` are ``r^2`` times the others'
    (``r`` = its norm over the median token's), and past ``r = 1/sqrt(eps)`` of the dtype
    the other tokens' sparse codes are lost in rounding: the ADMM then typically runs all
    ``max_iter`` iterations without converging (minutes at the authors' 10000)."""
    norms = torch.linalg.vector_norm(x.to(torch.float64), dim=1)
    nonzero = norms[norms > 0]
    if nonzero.numel() < 2:
        return  # no tokens, or all but one zero: the flat-score warning covers it
    median = float(nonzero.median())
    top = int(torch.argmax(norms))
    ratio = float(norms[top]) / median
    limit = 1.0 / math.sqrt(float(torch.finfo(work).eps))
    if ratio > limit:
        warnings.warn(
            f"features: token {top}'s feature norm ({float(norms[top]):.3g}) is {ratio:.3g} "
            f"times the median token's ({median:.3g}), beyond what SSC's working dtype "
            f"{str(work).replace('torch.', '')} resolves (1/sqrt(eps) = {limit:.3g}): the other "
            "tokens' sparse codes are lost in rounding and the SSC will likely run all max_iter "
            "iterations without converging. Rescale or drop that token (a dominant token), or "
            "pass dtype=torch.float64",
            UserWarning,
            stacklevel=3,
        )


def resolve_dtype(dtype, device: torch.device) -> torch.dtype:
    """The working dtype of the ADMM iterations (default float32)."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, str):
        dtype = {"float32": torch.float32, "float64": torch.float64}.get(dtype, dtype)
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(
            f"dtype: expected torch.float32 or torch.float64, got {dtype!r}; SSC's ADMM needs "
            "at least float32 (try dtype=None, float32)"
        )
    return dtype


# The memory rule (docs/long-videos.md). The SSC may use MEMORY_FRACTION of the memory the
# device has available when the check runs:
# * CPU: ``MemAvailable`` of /proc/meminfo (the kernel's estimate of what new allocations can
#   get without swapping: free pages plus reclaimable page cache), lowered to the cgroup v2
#   limit left (``memory.max - memory.current + inactive_file``) when a limit is set; where
#   /proc/meminfo does not exist (macOS, Windows), no check is made;
# * CUDA: ``torch.cuda.mem_get_info`` free bytes plus what PyTorch's allocator holds
#   reserved but unallocated (it is reused before new memory is asked of the driver).
# The fraction leaves room for the rest of the process (model, activations, allocator
# fragmentation). One reading, one rule: the same reading always gives the same decision.
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


def _meminfo_available(path: str = "/proc/meminfo") -> int | None:
    try:
        with open(path) as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # the kernel reports kB (KiB)
    except (OSError, ValueError, IndexError):
        return None
    return None


def _cgroup_available(root: str = "/sys/fs/cgroup") -> int | None:
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
    """What ``device`` has available now (see the memory rule above), or None when unknown."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return MemoryReading(int(free + cached), "torch.cuda.mem_get_info + PyTorch's cache")
    if device.type == "cpu":
        avail = _meminfo_available()
        if avail is None:
            return None
        cg = _cgroup_available()
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


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


def check_memory(required: int, device: torch.device, *, n: int, d: int, what: str) -> None:
    """Raise ``SSCMemoryError`` when ``required`` bytes exceed the memory rule's budget on
    ``device`` (``MEMORY_FRACTION`` of the available memory; no check when unknown)."""
    budget = free_memory_bytes(device)
    if budget is None or required <= budget:
        return
    reading = _LAST_READING.get(device.type)
    if reading is not None and reading.budget == budget:
        room = (
            f"{_fmt_bytes(reading.available)} is available ({reading.source}) and the SSC may "
            f"use {MEMORY_FRACTION:.0%} of it, {_fmt_bytes(budget)}"
        )
    else:
        room = f"the SSC may use {_fmt_bytes(budget)}"
    if device.type == "cuda":
        where = (
            "run on the CPU (features.cpu()) if it has more memory, free GPU memory first "
            "(torch.cuda.empty_cache(), other processes)"
        )
    else:
        where = "close other programs or use a machine (or a GPU) with more memory"
    raise SSCMemoryError(
        f"{what} with N = {n} tokens and D = {d} features needs about {_fmt_bytes(required)} "
        f"on {device}, but {room}. Options: use mode='blocked' (exact, no N x N "
        f"buffer; smaller block_columns=...), use fewer frames (fewer tokens; memory grows "
        f"as N^2), reduce the feature dimension with pca_rank=..., or {where}."
    )


# ---- checks of one option (the options themselves: videoanchor.anchor.options) ------------


def _is_int(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, np.integer))


def check_int(name: str, value, minimum: int, hint: str = "") -> int:
    """``value`` as an int >= ``minimum``: TypeError for a non-int (a float, even a whole
    one, or inf), ValueError below the minimum."""
    if not _is_int(value):
        raise TypeError(
            f"{name}: expected an int >= {minimum}, got {value!r} ({type(value).__name__})"
            + (f"; try {hint}" if hint else "")
        )
    if value < minimum:
        raise ValueError(
            f"{name}: expected an int >= {minimum}, got {value}" + (f"; try {hint}" if hint else "")
        )
    return int(value)


def check_number(name: str, value, *, positive: bool, hint: str = "") -> float:
    """``value`` as a finite float, > 0 (``positive``) or >= 0: TypeError for a non-number,
    ValueError for NaN, inf or the wrong sign."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name}: expected a finite number, got {type(value).__name__}")
    v = float(value)
    ok = math.isfinite(v) and (v > 0 if positive else v >= 0)
    if not ok:
        want = "a positive finite number" if positive else "a finite number >= 0"
        raise ValueError(
            f"{name}: expected {want}, got {value!r}" + (f"; try {hint}" if hint else "")
        )
    return v


def check_option_range(opts: dict, work: torch.dtype) -> None:
    """``alpha_e``, ``alpha_z`` and ``rho`` within ``[sqrt(tiny), sqrt(max)]`` of the
    working dtype: the ADMM forms ``lambda_z Y^T Y + rho (I + 1 1^T)`` and ``1 / rho``, which
    overflow or lose the ``rho`` term outside it (then "the A-step system is not positive
    definite" would name no option)."""
    info = torch.finfo(work)
    lo, hi = math.sqrt(info.tiny), math.sqrt(info.max)
    for name, hint in (("alpha_e", "800"), ("alpha_z", "800"), ("rho", "300")):
        v = opts[name]
        if not lo <= v <= hi:
            raise ValueError(
                f"{name}: expected a value in [{lo:.3g}, {hi:.3g}] for SSC's working dtype "
                f"{str(work).replace('torch.', '')} (the A-step system lambda_z Y^T Y + rho "
                f"(I + 1 1^T) overflows or loses its rho term outside it), got {v!r}; the "
                f"authors use {name}={hint}"
            )


def check_choice(name: str, value, choices) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name}: expected one of {tuple(choices)}, got {value!r}")
    return value


def check_flag(name: str, value) -> bool:
    numpy_bool = type(value).__module__ == "numpy" and type(value).__name__ in ("bool", "bool_")
    if not (isinstance(value, bool) or numpy_bool):
        raise TypeError(f"{name}: expected True or False, got {value!r}")
    return bool(value)


def check_progress(value):
    """The ``progress=`` option: True, False, None or "auto" (a bar on a terminal, log lines
    otherwise), or an :class:`~videoanchor.anchor.progress.SSCProgress`; returned as given."""
    from videoanchor.anchor.progress import SSCProgress

    numpy_bool = type(value).__module__ == "numpy" and type(value).__name__ in ("bool", "bool_")
    if value is None or (isinstance(value, str) and value == "auto"):
        return value
    if isinstance(value, (bool, SSCProgress)) or numpy_bool:
        return bool(value) if numpy_bool else value
    raise TypeError(
        f"progress: expected True, False, None, 'auto' or an SSCProgress, got {value!r}"
    )


def resolve_seed(seed) -> int:
    """An int seed in [0, 2**32 - 1]; ``None`` draws one from NumPy's global generator, as
    scikit-learn's ``random_state=None`` does (so ``numpy.random.seed`` makes it repeatable)."""
    if seed is None:
        return int(np.random.randint(0, 2**31 - 1))
    if not _is_int(seed):
        raise TypeError(f"seed: expected an int or None, got {type(seed).__name__}")
    if not 0 <= seed <= 2**32 - 1:
        raise ValueError(f"seed: expected an int in [0, 2**32 - 1] or None, got {seed}")
    return int(seed)


# ---- ranks of a process group: one collective, the same outcome everywhere ----------------


def _canonical(value) -> str:
    """A text form of an option that is equal on two ranks exactly when the option is."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return repr(value)
    if isinstance(value, (int, np.integer)):
        return repr(int(value))
    if isinstance(value, (float, np.floating)):
        return repr(float(value))
    return repr(value)


#: seconds a rank waits in an agreement check before it warns that a rank may be missing
AGREE_WARN_AFTER = 60.0


def gather_from_every_rank(group, obj, *, what: str) -> list:
    """``all_gather_object`` of ``obj`` over ``group`` that explains a missing rank.

    A rank of the group that passes ``process_group=None`` (or skips the call) never joins
    the collective: the others would wait until the backend's timeout, or fail with the
    backend's "Connection closed by peer" once that rank's process ends. Here they warn after
    ``AGREE_WARN_AFTER`` seconds of waiting, and a failed collective is a RuntimeError
    saying what every rank was expected to do. (No collective can tell a late rank from one
    that never comes, so the wait itself is the backend's timeout.)
    """
    import torch.distributed as dist

    me = dist.get_rank(group)
    hint = (
        "expected every rank of the process group to make the same call with this "
        "process_group; a rank that passes process_group=None (or does not make the call) "
        "runs alone and leaves the others waiting here"
    )
    timer = threading.Timer(
        AGREE_WARN_AFTER,
        lambda: warnings.warn(
            f"process_group: rank {me} has waited {AGREE_WARN_AFTER:g} s for the other ranks "
            f"to reach {what}; {hint}",
            RuntimeWarning,
            stacklevel=1,
        ),
    )
    timer.daemon = True
    timer.start()
    seen: list = [None] * dist.get_world_size(group)
    try:
        dist.all_gather_object(seen, obj, group=group)
    except RuntimeError as exc:  # DistBackendError too: a peer gone, or the backend timeout
        raise RuntimeError(
            f"process_group: {what} across the ranks failed on rank {me} "
            f"({type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0]}); {hint}"
        ) from exc
    finally:
        timer.cancel()
    return seen


def agree_across_ranks(group, options: dict, error: BaseException | None) -> None:
    """Collective over ``group`` (one ``all_gather_object``), reached by every rank before
    any rank may raise: every rank raises the same error or none does.

    - A rank whose own input or options were rejected (``error``): the lowest such rank's
      error is raised on every rank (that rank re-raises its own; the others raise the same
      type with the same message, naming the rank).
    - Options that differ between ranks (``options``, compared as text): a ValueError
      on every rank naming the first option that differs.
    """
    import torch.distributed as dist

    mine = (
        {k: _canonical(v) for k, v in options.items()},
        None if error is None else (type(error).__name__, str(error)),
    )
    seen = gather_from_every_rank(group, mine, what="the SSC's agreement check")
    for rank, (_, err) in enumerate(seen):
        if err is None:
            continue
        if error is not None and rank == dist.get_rank(group):
            raise error
        kind = {"TypeError": TypeError, "ValueError": ValueError}.get(err[0], RuntimeError)
        raise kind(f"{err[1]} (raised on rank {rank} of the process group; every rank stops)")
    ref = seen[0][0]
    for rank, (opts, _) in enumerate(seen[1:], start=1):
        for key in ref:
            if opts.get(key) != ref[key]:
                raise ValueError(
                    f"process_group: expected the same {key} on every rank, got {key}="
                    f"{ref[key]} on rank 0 and {key}={opts.get(key)} on rank {rank}; try "
                    "passing identical arguments on every rank"
                )


# ---- identical tokens get identical scores ------------------------------------------------


# Tokens within this distance of their mean (relative to the largest norm) are one point.
FLAT_FEATURES_RTOL = 1e-3


def tie_duplicate_scores(x: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """Scores of bitwise-identical rows of ``x`` replaced by their mean; all 0 (with a
    warning) when every row lies within ``FLAT_FEATURES_RTOL`` of the rows' mean.

    SSC treats identical tokens symmetrically, but its solution among them is not unique
    and the ADMM splits the weight unevenly; by symmetry identical tokens get one score
    (the mean of theirs, which keeps the scores' range). A row hash finds candidates in
    O(N D); only rows whose hashes collide are compared exactly.
    """
    n = x.shape[0]
    if n < 2 or scores.numel() != n:
        return scores
    x64 = x.to(torch.float64)
    spread = float((x64 - x64.mean(dim=0, keepdim=True)).norm(dim=1).max())
    if spread <= FLAT_FEATURES_RTOL * float(x64.norm(dim=1).max()):
        if not bool(scores.any()):  # already all 0 (flat row sums, warned there)
            return torch.zeros_like(scores)
        warnings.warn(
            f"videoanchor: the {n} tokens are identical to within {FLAT_FEATURES_RTOL:g} of "
            "their norm (e.g. a static or blank video); no token stands out, so every anchor "
            "score is 0 (unanchored)",
            stacklevel=3,
        )
        return torch.zeros_like(scores)
    gen = torch.Generator(device="cpu").manual_seed(12345)
    probe = torch.rand(x.shape[1], generator=gen, dtype=torch.float64).to(x.device)
    h = x.to(torch.float64) @ probe
    _, inv_h, counts_h = torch.unique(h, return_inverse=True, return_counts=True)
    if int(counts_h.max()) < 2:
        return scores
    cand = torch.nonzero(counts_h[inv_h] > 1).flatten()
    _, inverse, counts = torch.unique(x[cand], dim=0, return_inverse=True, return_counts=True)
    if int(counts.max()) < 2:
        return scores
    sums = torch.zeros(counts.numel(), dtype=torch.float64, device=scores.device)
    sums.index_add_(0, inverse.to(scores.device), scores[cand.to(scores.device)].to(torch.float64))
    out = scores.clone()
    out[cand.to(scores.device)] = (sums / counts.to(sums))[inverse.to(scores.device)].to(out.dtype)
    return out
