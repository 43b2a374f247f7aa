"""Labels from a spectral embedding: Yu & Shi's discretisation (scikit-learn's
``SpectralClustering(assign_labels="discretize")``), seeded k-means, their successive draws
from one seeded stream, and the expected share's softened draws. :mod:`~videoanchor.anchor.
clustering` hands an embedding and a seed over once (:func:`labels_from_embedding`,
:func:`expected_shares_from_embedding`, :func:`stable_draws`) and gets labels back.

The discretisation runs on the host (issue 90) over the unit rows ``v`` (``N x k``, float64,
on the CPU; :func:`paths_of`), with its decisions compiled by Numba.

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
:class:`Paths` imports them when a discretisation first runs, so ``import videoanchor`` does
not load Numba. The draws themselves are here too (:func:`draw_labels`, :func:`stable_draws`,
:func:`expected_draws`: a random state, a start row a draw, canonical labels):
:mod:`~videoanchor.anchor.clustering` hands an embedding and a seed over once.
"""

from __future__ import annotations

import math
import numbers

import numpy as np
import torch

__all__ = [
    "EXPECTED_DRAWS",
    "EXPECTED_WIDTH",
    "Paths",
    "discretize",
    "discretize_rows",
    "draw_labels",
    "expected_shares_from_embedding",
    "kmeans",
    "label_random_state",
    "labels_from_embedding",
    "path_margin",
    "paths_of",
    "relabel",
    "soft_draw_shares",
    "stable_draws",
]

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
    :func:`paths_of` makes them); read through NumPy
    without a copy.

    ``completion``: where a step's labels leave clusters empty, ``T`` is singular and the
    empty clusters' columns of ``R = V U^T`` are the null vectors LAPACK happens to return
    (scikit-learn's, which :meth:`draw` keeps: another LAPACK, or a rounding's change, picks
    others; issue 100 measured most of the expected share's move there,
    ``share_null_space_cpu.json``). Set to a ``k x k`` float64 matrix ``G`` (changeable
    between draws: :func:`expected_draws` gives each draw its own), those columns are
    instead the Gram-Schmidt basis of ``null(T)`` from ``G``'s first columns (signs: the QR's
    positive diagonal) and the others ``V_r U_r^T`` of ``T``'s ``r`` non-zero singular
    triplets (unique): a continuous function of ``T`` at a fixed count of empty clusters,
    the same under any LAPACK. ``G`` Gaussian makes it a uniform draw of the completions."""

    def __init__(self, rows: torch.Tensor, n_iter_max: int = 20):
        self.rows = rows
        self.v = rows.numpy()
        if not np.isfinite(self.v).all():
            raise ValueError("embedding: expected finite values, got NaN or infinity")
        self.n, self.k = rows.shape
        self.n_iter_max = n_iter_max
        from videoanchor.anchor import _discretize_loops as loops

        loops.ready()  # the loops loaded from Numba's cache, or compiled (once per process)
        self._decide, self._pick = loops._decide, loops._pick
        k = self.k
        self._no_skip = np.zeros(k, np.bool_)
        self._s = _aligned((self.n, k))
        self._u = _aligned((k, k), "F")  # (torch's SVD returns U and Vh column-major)
        self._sv = _aligned((k,))
        self._vh = _aligned((k, k), "F")
        self._rot = _aligned((k, k))  # R = V U^T of a step, read once
        self._block, self._free = None, 0  # k x k buffers handed out (see _square)
        self._next: dict[bytes, tuple] = {}  # labels -> (ncut, next labels, margin, t)
        self.completion: np.ndarray | None = None  # (see the class docstring)
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
        return labels, self._decide(self._s[0], self.v, skip, labels, t[0]), t

    def _step(self, labels: np.ndarray, t):
        """``(ncut, next labels, next margin, next t)`` of ``labels`` (their ``t``)."""
        key, empty = labels.tobytes(), None
        if self.completion is not None:
            empty = np.flatnonzero(np.bincount(labels, minlength=self.k) == 0)
            if len(empty):  # (the next labels depend on the completion too)
                key += self.completion.tobytes()
        got = self._next.get(key)
        if got is None:
            torch.linalg.svd(t[1], out=(self._u[1], self._sv[1], self._vh[1]))
            ncut = 2.0 * (self.n - float(self._sv[0].sum()))
            torch.mm(self._vh[1].T, self._u[1].T, out=self._rot[1])
            if empty is not None and len(empty):
                self._complete(empty)
            got = (ncut, *self._pass(self._rot, self._no_skip))
            self._next[key] = got
        return got

    def _complete(self, empty: np.ndarray) -> None:
        """The step's rotation with the empty clusters' columns from :attr:`completion`
        (class docstring), from its SVD's factors."""
        r, g = self.k - len(empty), self.completion[:, : len(empty)]
        vr = self._vh[0][:r].T
        rot = self._rot[0]
        rot[:] = vr @ self._u[0][:, :r].T
        q, tri = np.linalg.qr(g - vr @ (vr.T @ g))
        rot[:, empty] = q * np.where(np.diagonal(tri) < 0, -1.0, 1.0)

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
            p = self._pick(c, d, none if sums is None else sums[j - 1])
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


def label_random_state(seed: int, n: int) -> np.random.RandomState:
    """``RandomState(seed)`` advanced as scikit-learn's ``SpectralClustering`` advances it
    before ``discretize``: by ARPACK's start vector, ``uniform(-1, 1, N)``."""
    rng = np.random.RandomState(int(seed))
    rng.uniform(-1, 1, n)
    return rng


def _unit_rows(v: torch.Tensor) -> torch.Tensor:
    rn = v.norm(dim=1, keepdim=True)
    return torch.where(rn > 0, v / rn.clamp_min(torch.finfo(v.dtype).tiny), v)


def discretize_rows(vectors: torch.Tensor) -> torch.Tensor:
    """The discretisation's input rows: the columns scaled to norm ``sqrt(N)``, signed so
    the first row is non-positive, the rows unit (float64, host), as scikit-learn's
    ``discretize`` prepares them."""
    v = vectors.detach().to("cpu", torch.float64).clone()
    v = v / v.norm(dim=0, keepdim=True).clamp_min(torch.finfo(v.dtype).tiny) * math.sqrt(len(v))
    first = torch.sign(v[0])
    return _unit_rows(v * torch.where(first != 0, -first, torch.ones_like(first)))


def paths_of(vectors: torch.Tensor, n_iter_max: int = 20) -> Paths:
    """The :class:`Paths` of an embedding (``N x k``): one host copy of
    :func:`discretize_rows`."""
    return Paths(discretize_rows(vectors), n_iter_max)


def draw_labels(vectors: torch.Tensor, rng: np.random.RandomState, draws: int, *,
                n_iter_max: int = 20, max_svd_restarts: int = 30) -> torch.Tensor:  # fmt: skip
    """``(draws, N)`` canonical labels (CPU) of successive draws from ``rng`` over
    ``vectors``' paths, each restarted from a new start row where LAPACK's SVD fails (as
    scikit-learn does)."""
    paths = paths_of(vectors, n_iter_max)
    out = np.empty((draws, paths.n), dtype=np.int64)
    for r in range(draws):
        for _ in range(max_svd_restarts):
            try:
                out[r] = relabel(paths.draw(int(rng.randint(paths.n))))
                break
            except RuntimeError:  # pragma: no cover - LAPACK failure, as sklearn: restart
                continue
        else:
            raise RuntimeError("discretize: SVD did not converge")  # pragma: no cover
    return torch.from_numpy(out)


def stable_draws(vectors: torch.Tensor, seed: int, draws: int, floor: float,
                 bound: float) -> tuple[np.ndarray, float]:  # fmt: skip
    """``(labels, m)``: ``draws`` successive draws of :func:`label_random_state`'s stream
    (``(draws, N)``, canonical ids) and the smallest margin over their paths and pick
    alternatives (:meth:`Paths.stability`'s, ``floor`` and ``bound`` its)."""
    paths = paths_of(vectors)
    rng = label_random_state(seed, paths.n)
    out = np.empty((draws, paths.n), dtype=np.int64)
    m = math.inf
    for r in range(draws):
        labels, mr = paths.stability(int(rng.randint(paths.n)), floor, bound)
        out[r] = relabel(labels)
        m = min(m, mr)
    return out, m


def expected_draws(vectors: torch.Tensor, seed: int, draws: int, keep: int, *,
                   completion: bool = True,
                   ) -> tuple[torch.Tensor, np.ndarray, np.ndarray, np.ndarray]:  # fmt: skip
    """``draws`` successive draws of :func:`label_random_state`'s stream: ``(rows, uniq,
    counts, labels)``, the paths' unit rows, the distinct raw labellings and how many draws
    ended at each, and the paper's labels (LAPACK's null vectors, as scikit-learn's) from the
    first ``keep`` draws' start rows (canonical ids). ``completion``: each draw's empty
    clusters completed by its own Gaussian ``k x k`` matrix (:class:`Paths`; the ``draws``
    matrices of ``numpy.random.default_rng(seed)``), else LAPACK's (the paper's draws)."""
    paths = paths_of(vectors)
    rng = label_random_state(seed, paths.n)
    starts = [int(rng.randint(paths.n)) for _ in range(draws)]
    gauss = (np.random.default_rng(seed).standard_normal((draws, paths.k, paths.k))
             if completion else None)  # fmt: skip
    raw = np.empty((draws, paths.n), dtype=np.int64)
    for r, start in enumerate(starts):
        paths.completion = None if gauss is None else gauss[r]
        raw[r] = paths.draw(start)
    paths.completion = None
    uniq, inverse = np.unique(raw, axis=0, return_inverse=True)
    counts = np.bincount(inverse.reshape(-1), minlength=len(uniq))
    paper = raw[:keep] if gauss is None else [paths.draw(start) for start in starts[:keep]]
    return paths.rows, uniq, counts, np.stack([relabel(row) for row in paper])


def path_margin(vectors: torch.Tensor, *, seed: int = 0) -> float:
    """The smallest decision margin of the paper's first draw's iterations alone (no pick
    alternatives): what the brief's first design measured (``bench_share_gate.py``)."""
    paths = paths_of(vectors)
    rot, picks, _ = paths.rotation(int(label_random_state(seed, paths.n).randint(paths.n)))
    return paths.iterate(rot, paths.repeats(picks))[1]


def _relabel_by_first_appearance(labels: torch.Tensor) -> torch.Tensor:
    """Renumber clusters 0, 1, 2, ... in order of their first token (canonical ids)."""
    uniq, inverse = torch.unique(labels, return_inverse=True)
    at = torch.arange(labels.numel(), device=labels.device)
    first = at.new_full((uniq.numel(),), labels.numel()).scatter_reduce_(0, inverse, at, "amin")
    return torch.argsort(torch.argsort(first))[inverse]  # the first appearances are distinct


def discretize(vectors: torch.Tensor, *, seed: int = 0,
               random_state: np.random.RandomState | None = None, n_iter_max: int = 20,
               max_svd_restarts: int = 30) -> torch.Tensor:  # fmt: skip
    """Yu & Shi's discretisation of a spectral embedding (``N x k``) into int64 labels,
    scikit-learn's algorithm: its one random draw, the initial rotation's first row, is
    ``random_state.randint(N)`` (advanced; default ``RandomState(seed)``), as in
    ``sklearn.cluster.discretize(..., random_state=seed)``: the same partition. Runs on the
    host from one copy of ``vectors`` (:class:`Paths`: its decisions
    compiled, its products and SVDs torch's); labels on ``vectors``' device."""
    rng = np.random.RandomState(int(seed)) if random_state is None else random_state
    return draw_labels(vectors, rng, 1, n_iter_max=n_iter_max,
                       max_svd_restarts=max_svd_restarts)[0].to(vectors.device)  # fmt: skip


def kmeans(
    points: torch.Tensor, k: int, *, seed: int = 0, n_init: int = 10, max_iter: int = 300
) -> torch.Tensor:
    """Seeded k-means (k-means++ initialisation, Lloyd iterations, best of ``n_init``)."""
    gen = torch.Generator().manual_seed(int(seed))
    x = points.to(torch.float64)
    n = x.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"k: expected 1 <= k <= N = {n}, got {k}")
    sq = (x * x).sum(dim=1)
    best, best_inertia = None, math.inf
    for _ in range(n_init):
        idx = [int(torch.randint(n, (1,), generator=gen))]
        d2 = (sq - 2 * x @ x[idx[0]] + sq[idx[0]]).clamp_min(0)
        for _ in range(1, k):
            total = float(d2.sum())
            if total <= 0:
                nxt = int(torch.randint(n, (1,), generator=gen))
            else:
                r = float(torch.rand(1, generator=gen, dtype=torch.float64)) * total
                cum = torch.cumsum(d2, 0)
                nxt = min(int(torch.searchsorted(cum, cum.new_tensor([r]))), n - 1)
            idx.append(nxt)
            d2 = torch.minimum(d2, (sq - 2 * x @ x[nxt] + sq[nxt]).clamp_min(0))
        centers = x[idx].clone()
        labels = None
        for _ in range(max_iter):
            dist = sq[:, None] - 2 * x @ centers.T + (centers * centers).sum(dim=1)[None, :]
            new = dist.argmin(dim=1)
            if labels is not None and torch.equal(new, labels):
                break
            labels = new
            counts = torch.bincount(labels, minlength=k).to(x.dtype)
            sums = torch.zeros_like(centers).index_add_(0, labels, x)
            empty = counts == 0
            centers = torch.where(empty[:, None], centers, sums / counts.clamp_min(1)[:, None])
        dist = sq[:, None] - 2 * x @ centers.T + (centers * centers).sum(dim=1)[None, :]
        inertia = float(dist.gather(1, labels[:, None]).clamp_min(0).sum())
        if best is None or inertia < best_inertia * (1 - 1e-12):
            best, best_inertia = labels, inertia
    return _relabel_by_first_appearance(best)


def _check_draws(draws) -> int:
    if isinstance(draws, bool) or not isinstance(draws, numbers.Integral):
        raise TypeError(f"label_draws: expected an int, got {type(draws).__name__}")
    if draws < 1:
        raise ValueError(f"label_draws: expected at least 1, got {draws}")
    return int(draws)


def labels_from_embedding(embedding: torch.Tensor, n_clusters: int, *, seed: int = 0,
                          assign_labels: str = "discretize", draws: int = 1) -> torch.Tensor:  # fmt: skip
    """``(draws, N)`` int64 labels from one spectral embedding (``N x n_clusters``).
    ``"discretize"``: successive draws of one :func:`label_random_state` stream (draw 0:
    scikit-learn's ``SpectralClustering(random_state=seed)`` labels). ``"kmeans"``: seeded
    k-means on the row-normalised embedding, draw ``r > 0`` seeded by the ``r``-th number
    of ``RandomState(seed)``, draw 0 by ``seed``."""
    draws = _check_draws(draws)
    n = embedding.shape[0]
    out = torch.empty(draws, n, dtype=torch.long, device=embedding.device)
    if assign_labels == "discretize":  # one copy of the rows, the draws' shared paths
        return draw_labels(embedding, label_random_state(seed, n), draws).to(out.device)
    emb = _unit_rows(embedding)
    more = np.random.RandomState(int(seed)).randint(2**31 - 1, size=draws - 1).tolist()
    for r, s in enumerate([int(seed), *more]):
        out[r] = kmeans(emb, n_clusters, seed=s, n_init=20)
    return out


# The expected share (issue 100): an option (cluster_share="expected"), not the default.

#: the expected share's label draws: successive draws of one :func:`label_random_state`
#: stream (the first is the paper's seeded draw)
EXPECTED_DRAWS = 32
#: the softening's width on the rotated rows' scores ``v R`` (unit rows, ``R`` orthogonal):
#: cluster ``c`` weighs ``(1 - (top - s_c) / width)^2`` where positive, the top 1
EXPECTED_WIDTH = 0.003


def soft_draw_shares(rows: torch.Tensor, labels: torch.Tensor,
                     width: float = EXPECTED_WIDTH) -> torch.Tensor:  # fmt: skip
    """Each draw's softened cluster shares, ``(draws, N)`` float64: for the draw's labels
    ``L`` (``(draws, N)``, raw or canonical ids below ``k``) the rotation ``R(L)`` that
    ``discretize`` computes from them (``T = onehot(L)^T v``, ``R = V U^T`` of ``T``'s SVD),
    the scores ``s = v R`` of the unit rows ``v`` (``N x k``), each row's memberships
    ``p_ic`` proportional to ``max(0, 1 - (max_c' s_ic' - s_ic) / width)^2`` over the draw's
    non-empty clusters (1 on the top cluster: a row whose runner-up is ``width`` or more
    below keeps its hard label; a tie splits evenly), and the share ``pi_i = sum_c p_ic S_c /
    N`` with ``S_c = sum_i p_ic`` the soft cluster sizes."""
    lab = labels.to(rows.device).reshape(-1, rows.shape[0])
    draws, (n, k) = lab.shape[0], rows.shape
    at = (lab + k * torch.arange(draws, device=rows.device)[:, None]).reshape(-1)
    t = torch.zeros(draws * k, k, dtype=rows.dtype, device=rows.device)
    t = t.index_add_(0, at, rows.repeat(draws, 1)).view(draws, k, k)
    u, _, vh = torch.linalg.svd(t)
    rot = vh.mT @ u.mT
    sc = torch.matmul(rows, rot)  # (draws, N, k)
    used = torch.zeros(draws, k, dtype=torch.bool, device=rows.device)
    used.scatter_(1, lab, True)
    sc = sc.masked_fill(~used[:, None, :], -math.inf)
    top = sc.amax(dim=2, keepdim=True)
    h = (1.0 - (top - sc) / width).clamp_min(0.0).square()
    p = h / h.sum(dim=2, keepdim=True)
    sizes = p.sum(dim=1, keepdim=True)
    return (p * sizes).sum(dim=2) / n


def expected_shares_from_embedding(embedding: torch.Tensor, *, seed: int = 0,
                                   draws: int = EXPECTED_DRAWS, width: float = EXPECTED_WIDTH,
                                   keep: int | None = None, completion: bool = True,
                                   ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """``(labels, shares)``: the first ``keep`` (default all) of ``draws`` successive draws of
    the paper's labels from one :func:`label_random_state` stream (``(keep, N)``, canonical
    ids; row 0 the paper's seeded draw) and the mean over all ``draws`` of each draw's
    softened share (:func:`soft_draw_shares`), ``(N,)`` float64. Draws that end at the same
    labels (most do: :class:`Paths` runs their shared steps
    once) are softened once and counted. ``completion``: the draws' empty clusters completed
    continuously (:func:`expected_draws`; False: LAPACK's null vectors, as the paper's)."""
    rows, uniq, counts, labels = expected_draws(embedding, seed, draws, keep or draws,
                                                completion=completion)  # fmt: skip
    soft = soft_draw_shares(rows, torch.from_numpy(uniq), width)
    shares = (torch.from_numpy(counts).to(soft.dtype) @ soft) / draws
    labels = torch.from_numpy(labels)
    return labels.to(embedding.device), shares.to(embedding.device)
