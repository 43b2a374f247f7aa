"""The family of SSC sets that issue 91's cluster-share gate is calibrated and held on.

Every set is ``N x D`` features asked for the paper's ``k = 24`` clusters, solved by the
default solver (``ssc_coefficients``: the working sets' certified minimiser, the fast
solver where ``C`` is dense), and re-solved at seeded relative changes of the features
(``x * (1 + r g)``, ``g`` standard Gaussian, ``r`` = 1e-6 and 1e-7). Four kinds:

- ``video``: :func:`benchmarks.common.video_tokens` at 8 to 64 frames (N = 256-1024, one
  16-frame set of N = 2048), some with more noise or drift (smaller eigengaps);
- ``tiny``: the tests' tiny random Qwen2.5-VL projector output on seeded random pixels
  (:func:`benchmarks.bench_label_draws.tiny_features`, D = 32), which flips;
- ``yaleb``: Extended Yale B faces (``../shared/data/YaleB_48_42.mat``), 60 images of each of
  3 to 8 subjects (D = 2016), where the file is;
- ``near``: sets placed on purpose near a change of the paper's partition: along a path
  ``x(t)`` (two sets interpolated, or one set's noise raised) the first change from ``t = 0``
  is bracketed and bisected until the two ends are within ``1e-8`` of the features
  (relative); the sets are the two ends and the points ``1e-6`` to ``1e-3`` away on either
  side.

:func:`family` yields the sets (name, kind, features); :func:`coefficients` solves one set
and its changes, cached on disk (``--cache``: the solves dominate, 0.5-20 s each).
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import video_tokens  # noqa: E402

K = 24
#: the changes of the features each set is re-solved at: ``{relative size: count}``
CHANGES = {1e-6: 4, 1e-7: 2}
#: the near-change sets' offsets from the bracketed change (relative to the features)
OFFSETS = (1e-6, 1e-5, 1e-4, 1e-3)
#: how close the bisection brings the two ends of a bracket (relative to the features)
BRACKET = 1e-8

VIDEO = [  # (frames, patches, D, seed, noise, drift)
    (8, 48, 256, 0, 0.02, 0.1), (8, 48, 1024, 0, 0.02, 0.1), (12, 32, 256, 1, 0.02, 0.1),
    (16, 32, 256, 2, 0.02, 0.1), (16, 48, 512, 3, 0.02, 0.1), (24, 24, 256, 4, 0.02, 0.1),
    (32, 16, 256, 5, 0.02, 0.1), (8, 64, 256, 6, 0.02, 0.1), (16, 48, 1024, 0, 0.02, 0.1),
    (64, 16, 256, 7, 0.02, 0.1), (16, 64, 256, 8, 0.02, 0.1),
    (8, 48, 256, 0, 0.1, 0.1), (8, 48, 256, 0, 0.2, 0.1), (8, 48, 256, 0, 0.4, 0.1),
    (8, 48, 256, 1, 0.02, 0.5), (8, 48, 256, 2, 0.02, 1.0),
]  # fmt: skip
LARGE = [(16, 128, 1024, 0, 0.02, 0.1)]  # N = 2048, the 16-frame Qwen2.5-VL-7B count
TINY = [  # (pixels seed, frames, rows, cols)
    (0, 8, 7, 10), (1, 8, 7, 10), (2, 8, 7, 10), (3, 8, 7, 10), (4, 8, 7, 10), (5, 8, 7, 10),
    (0, 4, 8, 8), (1, 16, 5, 6), (2, 8, 6, 6), (3, 12, 6, 8),
]  # fmt: skip
YALEB = [(1, 3), (4, 4), (8, 5), (13, 3), (16, 5), (21, 6), (27, 4), (31, 8)]  # (first, count)


def video(frames, patches, d, seed, noise=0.02, drift=0.1) -> torch.Tensor:
    return video_tokens(frames, patches, d, seed=seed, noise=noise, drift=drift)


_TINY_CACHE: dict = {}


def tiny(seed, frames=8, rows=7, cols=10) -> torch.Tensor:
    from benchmarks.bench_label_draws import tiny_features

    key = (seed, frames, rows, cols)
    if key not in _TINY_CACHE:
        _TINY_CACHE[key] = tiny_features(seed, frames, rows, cols)
    return _TINY_CACHE[key]


def yaleb(first: int, count: int, per: int = 60) -> torch.Tensor | None:
    """``per`` images of each of subjects ``first .. first + count - 1`` (float32), or None
    where the data file is not there."""
    from benchmarks.bench_yaleb import default_data_path, load_yaleb

    path = default_data_path()
    if not Path(path).exists():
        return None
    x, labels = load_yaleb(path)
    rows = [x[labels == s][:per] for s in range(first, first + count)]
    return torch.from_numpy(np.ascontiguousarray(np.concatenate(rows), dtype=np.float32))


def plain_sets(large: bool = True):
    """``(name, kind, make)`` of the sets that are not placed near a change."""
    for f, p, d, s, noise, drift in VIDEO + (LARGE if large else []):
        name = f"video {f}x{p} D{d} seed {s}" + (f" noise {noise}" if noise != 0.02 else "") + (
            f" drift {drift}" if drift != 0.1 else "")  # fmt: skip
        yield name, "video", lambda a=(f, p, d, s, noise, drift): video(*a)
    for s, f, r, c in TINY:
        yield (
            f"tiny Qwen2.5-VL {f}x{r}x{c} pixels seed {s}",
            "tiny",
            lambda a=(s, f, r, c): tiny(*a),
        )
    for first, count in YALEB:
        yield (f"Yale B subjects {first}-{first + count - 1} x 60", "yaleb",
               lambda a=(first, count): yaleb(*a))  # fmt: skip


def paths():
    """``(name, x(t))`` of the paths along which a change of the paper's partition is placed:
    ``x(t)`` continuous in ``t`` in [0, 1]."""

    def between(a, b):
        return lambda t: (1 - t) * a() + t * b()

    yield "video 8x48 D256 seed 0 to seed 1", between(lambda: video(8, 48, 256, 0),
                                                       lambda: video(8, 48, 256, 1))  # fmt: skip
    yield "video 16x32 D256 seed 2 to seed 9", between(lambda: video(16, 32, 256, 2),
                                                        lambda: video(16, 32, 256, 9))  # fmt: skip
    yield (
        "video 8x48 D256 seed 3, noise 0.02 to 0.5",
        lambda t: video(8, 48, 256, 3, 0.02 + 0.48 * t),
    )
    yield "tiny 8x7x10 pixels seed 6 to seed 7", between(lambda: tiny(6), lambda: tiny(7))
    if yaleb(1, 5) is not None:
        yield "Yale B subjects 1-5 to 6-10", between(lambda: yaleb(1, 5), lambda: yaleb(6, 5))


def _key(x: torch.Tensor) -> str:
    return hashlib.sha1(x.contiguous().numpy().tobytes()).hexdigest()[:16]


def solve(x: torch.Tensor, cache: Path | None) -> torch.Tensor:
    """The default solver's ``C`` of ``x`` (float32, CPU), from ``cache`` where it is there."""
    from videoanchor.anchor.scores import ssc_coefficients

    path = None if cache is None else Path(cache) / f"{_key(x)}.pt"
    if path is not None and path.exists():
        return torch.load(path)
    coef = ssc_coefficients(x, progress=False).coef.contiguous()
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(coef, path)
    return coef


def changed(x: torch.Tensor, seed: int):
    """``[(r, x * (1 + r g))]``: the set's seeded changes, :data:`CHANGES` of them."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for r, count in CHANGES.items():
        for _ in range(count):
            out.append((r, x * (1 + r * torch.randn(x.shape, generator=gen, dtype=x.dtype))))
    return out


def paper_partition(coef: torch.Tensor) -> torch.Tensor:
    """The paper's labels of ``C`` (seed 0, canonical ids: equal tensors, equal partitions)."""
    from videoanchor.anchor import spectral_clustering, ssc_affinity

    return spectral_clustering(ssc_affinity(coef), K)


def bracket(xt, partition, cache, *, step: float = 0.01, log=print):
    """``(t_lo, t_hi, scale)``: the first change of ``partition(solve(x(t)))`` from ``t = 0``,
    bracketed (doubling steps) and bisected until ``|t_hi - t_lo| * scale <= BRACKET``, where
    ``scale = ||x(1) - x(0)|| / ||x(0)||`` turns ``t`` into a relative change."""
    x0 = xt(0.0)
    scale = float((xt(1.0) - x0).norm() / x0.norm())
    base = partition(solve(x0, cache))
    lo, hi = 0.0, step
    while hi <= 1.0 and torch.equal(partition(solve(xt(hi), cache)), base):
        lo, hi = hi, min(1.0, 2 * hi) if hi < 1.0 else 2.0
    if hi > 1.0:
        return None
    while (hi - lo) * scale > BRACKET:
        mid = (lo + hi) / 2
        if torch.equal(partition(solve(xt(mid), cache)), base):
            lo = mid
        else:
            hi = mid
    log(f"bracketed: t in [{lo:.12g}, {hi:.12g}] (relative {(hi - lo) * scale:.1e})")
    return lo, hi, scale


def near_sets(cache, partition, log=print):
    """``(name, kind, make)`` of the sets placed near a change (see the module's docstring)."""
    for name, xt in paths():
        found = bracket(xt, partition, cache, log=log)
        if found is None:
            log(f"{name}: no change of the partition along the path")
            continue
        lo, hi, scale = found
        yield f"{name}: below the change", "near", lambda t=lo, f=xt: f(t)
        yield f"{name}: above the change", "near", lambda t=hi, f=xt: f(t)
        for off in OFFSETS:
            dt = off / scale
            yield f"{name}: {off:g} below", "near", lambda t=lo - dt, f=xt: f(t)
            yield f"{name}: {off:g} above", "near", lambda t=hi + dt, f=xt: f(t)
