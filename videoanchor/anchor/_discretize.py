"""Yu & Shi's discretisation on the host (issue 90): the loops of
:func:`~videoanchor.anchor.clustering.discretize` and of the steady share's paths
(:func:`~videoanchor.anchor.clustering.steady_stability`) over the unit rows ``v`` (``N x
k``, float64, on the CPU), with their decisions compiled by Numba.

The arithmetic is the torch loop's it replaces, call for call: the products ``v R[:, j]``
and ``v R``, the ``k x k`` SVD and ``R = V U^T`` are the same torch calls on operands of the
same layout and alignment (so the same BLAS and LAPACK code, the same bits), written into
buffers this module reads as NumPy arrays; what was a chain of small torch operators a step
(the running sums and their argmin, each row's first argmax and top-1 minus top-2 margin, the
sum of each label's rows in row order) is one Numba pass, exact, in the same order. The SVD's
null vectors matter: where a label is empty ``T`` is singular and ``R`` is LAPACK's choice, so
the labels are defined by these calls, not by the algorithm alone. The shortcuts leave the
answer as it was, bit for bit (tests/test_discretize.py holds it to the torch loop):

- labels equal to the previous iteration's give ``T``, hence ``ncut``, bit for bit: the loop
  stops there without the SVD;
- :class:`Paths` remembers, for each labelling it met, its ``ncut`` and the next iteration's
  labels and margin (they depend on the labels alone), and the products ``v v_p`` of the
  initial rotations by row and column: the draws of one embedding and the steady share's
  pick alternatives, which mostly join a path already run, run each once;
- the pick alternatives run in order of their distance ``a``: one from the minimum reached
  on cannot lower it, and one whose margin falls to its ``a`` contributes ``a`` whatever
  partition it would end at, so it stops there.

Numba compiles two small loops (:mod:`._discretize_loops`, well under a second of CPU,
``bench_discretize.py``) into its on-disk cache: in the background compile that ``import
videoanchor`` starts where the cache is empty (:mod:`videoanchor.anchor.solvers.precompile`,
issue 101), else on the first call of a process that finds it empty; milliseconds afterwards.
:mod:`~videoanchor.anchor.clustering` imports this module when a discretisation first runs,
so ``import videoanchor`` does not load Numba.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from videoanchor.anchor._discretize_loops import _decide, _pick, ready

__all__ = ["Paths", "relabel"]

_EPS = float(np.finfo(np.float64).eps)
#: the buffers' alignment in bytes (torch's CPU allocator's: MKL may round otherwise on
#: operands aligned otherwise)
_ALIGN = 64


def relabel(labels: np.ndarray) -> np.ndarray:
    """Clusters renumbered 0, 1, 2, ... in order of their first row (canonical ids)."""
    n = labels.size
    first = np.full(int(labels.max()) + 1, n)
    first[labels[::-1]] = np.arange(n - 1, -1, -1)  # (the last write wins: the first row)
    rank = np.empty_like(first)
    rank[np.argsort(first, kind="stable")] = np.arange(first.size)
    return rank[labels]


def _aligned(shape, order: str = "C") -> tuple[np.ndarray, torch.Tensor]:
    """A float64 NumPy array at a :data:`_ALIGN`-byte address and a tensor on its memory."""
    size = math.prod(shape)
    raw = np.empty(size + _ALIGN // 8)
    at = (-raw.__array_interface__["data"][0] % _ALIGN) // 8
    arr = raw[at : at + size].reshape(shape, order=order)
    return arr, torch.from_numpy(arr)


class Paths:
    """The discretisation's paths over one set of unit rows, with what they share (module
    docstring): :meth:`draw` runs :func:`~videoanchor.anchor.clustering.discretize`'s draw,
    :meth:`stability` the steady share's path and pick alternatives.

    ``rows``: the unit rows (``N x k`` float64 contiguous CPU tensor, as
    :func:`~videoanchor.anchor.clustering._discretize_rows` makes them); read through NumPy
    without a copy."""

    def __init__(self, rows: torch.Tensor, n_iter_max: int = 20):
        self.rows = rows
        self.v = rows.numpy()
        if not np.isfinite(self.v).all():
            raise ValueError("embedding: expected finite values, got NaN or infinity")
        self.n, self.k = rows.shape
        self.n_iter_max = n_iter_max
        ready()  # the loops loaded from Numba's cache, or compiled (once per process)
        k = self.k
        self._no_skip = np.zeros(k, np.bool_)
        self._s = _aligned((self.n, k))
        self._u = _aligned((k, k), "F")  # (torch's SVD returns U and Vh column-major)
        self._sv = _aligned((k,))
        self._vh = _aligned((k, k), "F")
        self._rot = _aligned((k, k))  # R = V U^T of a step, read once
        self._block, self._free = None, 0  # k x k buffers handed out (see _square)
        self._next: dict[bytes, tuple] = {}  # labels -> (ncut, next labels, margin, t)
        self._dots: dict[tuple[int, int], np.ndarray] = {}  # (row, column) -> v v_row

    def _square(self):
        """A ``k x k`` :func:`_aligned` pair, cut from a block of 32 (one allocation)."""
        if self._block is None or self._free == 32:
            size = -(-self.k * self.k * 8 // _ALIGN) * _ALIGN // 8  # a slot: whole lines
            self._block, self._free = _aligned((32, size)), 0
        arr = self._block[0][self._free, : self.k * self.k].reshape(self.k, self.k)
        self._free += 1
        return arr, torch.from_numpy(arr)

    def _pass(self, rot, skip: np.ndarray):
        """``(labels, margin, t)`` of rotation ``rot`` (an :func:`_aligned` pair)."""
        torch.mm(self.rows, rot[1], out=self._s[1])
        labels = np.empty(self.n, np.int64)
        t = self._square()
        return labels, _decide(self._s[0], self.v, skip, labels, t[0]), t

    def _step(self, labels: np.ndarray, t):
        """``(ncut, next labels, next margin, next t)`` of ``labels`` (their ``t``)."""
        key = labels.tobytes()
        got = self._next.get(key)
        if got is None:
            torch.linalg.svd(t[1], out=(self._u[1], self._sv[1], self._vh[1]))
            ncut = 2.0 * (self.n - float(self._sv[0].sum()))
            torch.mm(self._vh[1].T, self._u[1].T, out=self._rot[1])
            got = (ncut, *self._pass(self._rot, self._no_skip))
            self._next[key] = got
        return got

    def _picks(self, rot, c: np.ndarray, j0: int, picks: np.ndarray,
               sums: np.ndarray | None = None) -> None:  # fmt: skip
        """Columns ``j0 .. k-1`` of an initial rotation: ``c += |v R[:, j-1]|``, pick ``j`` the
        first argmin of ``c``, ``R[:, j] = v[pick]``; ``sums[j - 1] = c`` where given. The
        products are remembered by row and column (the pick alternatives' later picks are
        mostly the path's)."""
        none = np.empty(0)
        for j in range(j0, self.k):
            key = (int(picks[j - 1]), j - 1)
            d = self._dots.get(key)
            if d is None:
                d = _aligned((self.n,))
                torch.mv(self.rows, rot[1].select(1, j - 1), out=d[1])
                d = self._dots[key] = d[0]
            p = _pick(c, d, none if sums is None else sums[j - 1])
            picks[j] = p
            rot[0][:, j] = self.v[p]

    def rotation(self, start: int, *, record: bool = False):
        """The initial rotation from row ``start``: ``(R, picks, sums)``, ``R`` an
        :func:`_aligned` pair, ``sums[j - 1]`` the running sums pick ``j`` was the argmin of
        (where ``record``; else None)."""
        rot = self._square()
        rot[0][:] = 0.0
        rot[0][:, 0] = self.v[start]
        picks = np.empty(self.k, np.int64)
        picks[0] = start
        sums = np.empty((self.k - 1, self.n)) if record else None
        self._picks(rot, np.zeros(self.n), 1, picks, sums)
        return rot, picks, sums

    def iterate(self, rot, skip: np.ndarray | None = None, *,
                stop_at: float = -math.inf):  # fmt: skip
        """The iterations from rotation ``rot``: ``(labels, margin, stopped)``: the raw labels
        where the loop stops, the smallest margin over its iterations (the columns ``skip``
        left out of the first; 0 where it stopped on an ``ncut`` repeated by other labels),
        and whether it stopped early because the margin fell to ``stop_at`` or below (then
        the labels are those reached)."""
        labels, margin, t = self._pass(rot, self._no_skip if skip is None else skip)
        last, prev, n_iter = 0.0, None, 1
        while True:
            if margin <= stop_at:
                return labels, margin, True
            if prev is not None and np.array_equal(labels, prev):
                return labels, margin, False  # T, hence ncut, repeats bit for bit
            if n_iter > self.n_iter_max:
                return labels, margin, False
            ncut, nxt, m, t = self._step(labels, t)
            if abs(ncut - last) < _EPS:  # (other labels: anomalous, the margin 0)
                return labels, (margin if prev is None else 0.0), False
            last, prev, labels, n_iter = ncut, labels, nxt, n_iter + 1
            margin = min(margin, m)

    def draw(self, start: int) -> np.ndarray:
        """:func:`~videoanchor.anchor.clustering.discretize`'s labels from start row ``start``
        (raw ids)."""
        return self.iterate(self.rotation(start)[0])[0]

    def repeats(self, picks: np.ndarray) -> np.ndarray:
        """Which picks repeat an earlier pick's row (by value: its column is the same)."""
        seen, out = set(), np.zeros(self.k, np.bool_)
        for j, p in enumerate(picks):
            row = tuple(self.v[p])
            out[j] = row in seen
            seen.add(row)
        return out

    def stability(self, start: int, floor: float, bound: float):
        """One draw of the paper's labels and ``m``, the smallest margin over its path and its
        pick alternatives (:func:`~videoanchor.anchor.clustering.steady_stability`): exact
        where it is in ``[floor, bound)``; below ``floor`` the path's own margin, from
        ``bound`` on a value at least ``bound``. ``(labels (raw ids), m)``."""
        rot, picks, sums = self.rotation(start, record=True)
        labels, m, _ = self.iterate(rot, self.repeats(picks))
        limit = min(m, bound) if m >= floor else 0.0
        if self.k < 2 or not limit > 0:
            return labels, m
        # each pick's runner-up: the row nearest to being picked instead, at a = (c_i - c_p) / j
        j = np.arange(1, self.k)
        dist = (sums - sums[j - 1, picks[1:]][:, None]) / j[:, None]
        dist[j - 1, picks[1:]] = math.inf
        rows = dist.argmin(axis=1)
        dist = dist[j - 1, rows]
        paper = None
        # an alternative's term is at least its distance a: taken in order of a, those from
        # the minimum reached on cannot lower it, and one whose margin falls to a gives a
        for q in np.argsort(dist, kind="stable"):
            a = float(dist[q])
            if not a < min(limit, m):
                break
            jq = int(q) + 1  # its first jq columns the path's, column jq its runner-up
            alt = self._square()
            alt[0][:] = rot[0]
            alt[0][:, jq] = self.v[rows[q]]
            alt_picks = picks.copy()
            alt_picks[jq] = rows[q]
            self._picks(alt, sums[jq - 1].copy(), jq + 1, alt_picks)
            alab, amarg, stopped = self.iterate(alt, self.repeats(alt_picks), stop_at=a)
            if stopped:
                term = a
            else:
                paper = relabel(labels) if paper is None else paper
                term = max(a, amarg) if np.array_equal(relabel(alab), paper) else a
            m = min(m, term)
        return labels, m
