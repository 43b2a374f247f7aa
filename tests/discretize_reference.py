"""The torch discretisation the package ran before issue 90 (``clustering.py`` at 63b1203),
kept as the reference its compiled form (``videoanchor/anchor/labels.py``) is held to, bit
for bit: ``discretize``, the steady share's ``steady_stability`` and ``path_margin``, with
their helpers, verbatim but for the names (tests/test_discretize.py,
benchmarks/bench_discretize.py)."""

from __future__ import annotations

import math

import numpy as np
import torch

from videoanchor.anchor.clustering import STEADY_RAMP
from videoanchor.anchor.labels import (
    _relabel_by_first_appearance,
    label_random_state,
)
from videoanchor.anchor.labels import (
    discretize_rows as _discretize_rows,
)

_EPS = torch.finfo(torch.float64).eps


def discretize_reference(vectors: torch.Tensor, *, seed: int = 0,
                         random_state: np.random.RandomState | None = None,
                         n_iter_max: int = 20, max_svd_restarts: int = 30,
                         ) -> torch.Tensor:  # fmt: skip
    """Yu & Shi's discretisation of a spectral embedding (``N x k``) into int64 labels,
    scikit-learn's algorithm: its one random draw, the initial rotation's first row, is
    ``random_state.randint(N)`` (advanced; default ``RandomState(seed)``), as in
    ``sklearn.cluster.discretize(..., random_state=seed)``: the same partition. Runs on the
    host (on a GPU each start row and SVD step would read a value back); labels on
    ``vectors``' device."""
    rng = np.random.RandomState(int(seed)) if random_state is None else random_state
    device = vectors.device
    v = _discretize_rows(vectors)
    n, k = v.shape
    eps = torch.finfo(torch.float64).eps
    for _ in range(max_svd_restarts):
        rot = torch.zeros(k, k, dtype=v.dtype, device=v.device)
        rot[:, 0] = v[int(rng.randint(n))]
        c = torch.zeros(n, dtype=v.dtype, device=v.device)
        for j in range(1, k):
            c += (v @ rot[:, j - 1]).abs()
            rot[:, j] = v[int(torch.argmin(c))]
        last, n_iter = 0.0, 0
        while True:
            n_iter += 1
            labels = (v @ rot).argmax(dim=1)
            t_svd = torch.zeros(k, k, dtype=v.dtype, device=v.device).index_add_(0, labels, v)
            try:
                u, sv, vh = torch.linalg.svd(t_svd)
            except RuntimeError:  # pragma: no cover - LAPACK failure, as sklearn: restart
                break
            ncut = 2.0 * (n - float(sv.sum()))
            if abs(ncut - last) < eps or n_iter > n_iter_max:
                return _relabel_by_first_appearance(labels).to(device)
            last = ncut
            rot = vh.T @ u.T
    raise RuntimeError("discretize: SVD did not converge")  # pragma: no cover


def _iterate(v: torch.Tensor, rot: torch.Tensor, skip: torch.Tensor, n_iter_max: int = 20):
    """:func:`discretize`'s iterations from ``R`` initial rotations at once (``rot``: ``(R, k,
    k)``; ``skip``: ``(R, k)``, the repeated picks' columns, left out of the first argmax):
    ``(labels (R, N) raw ids, smallest margin (R,), anomaly (R,))``."""
    r, k, _ = rot.shape
    n = v.shape[0]
    last = v.new_zeros(r)
    done = torch.zeros(r, dtype=torch.bool)
    out = torch.full((r, n), -1, dtype=torch.long)
    marg = v.new_full((r,), math.inf)
    anomaly = torch.zeros(r, dtype=torch.bool)
    prev = None
    for it in range(1, n_iter_max + 2):
        s = torch.matmul(v, rot)
        if it == 1:
            s = s.masked_fill(skip[:, None, :], -math.inf)
        two = s.topk(2, dim=2)
        m = (two.values[..., 0] - two.values[..., 1]).amin(dim=1)
        marg = torch.where(done, marg, torch.minimum(marg, m))
        labels = s.argmax(dim=2)
        t = v.new_zeros(r, k, k).scatter_add_(1, labels[:, :, None].expand(-1, -1, k),
                                              v.expand(r, -1, -1))  # fmt: skip
        u, sv, vh = torch.linalg.svd(t)
        ncut = 2.0 * (n - sv.sum(dim=1))
        stop = ((ncut - last).abs() < _EPS) | (it > n_iter_max)
        new = stop & ~done
        if prev is not None:
            anomaly |= new & (it <= n_iter_max) & ~(labels == prev).all(dim=1)
        out[new] = labels[new]
        done |= stop
        if bool(done.all()):
            break
        prev, last, rot = labels, ncut, vh.mT @ u.mT
    return out, torch.where(anomaly, 0.0, marg), anomaly


def _repeats(rot: torch.Tensor) -> torch.Tensor:
    """``(R, k)``: which columns of each rotation repeat an earlier one (a row picked twice)."""
    cols = rot.mT  # (R, k, k): column j as row j
    same = (cols[:, :, None, :] == cols[:, None, :, :]).all(dim=3)
    return torch.triu(same, diagonal=1).any(dim=1)


def _main_path(v: torch.Tensor, start: int, n_iter_max: int = 20):
    """``discretize``'s draw from start row ``start`` on its
    unit rows ``v``, its ops in its order (so its labels, raw ids), with the smallest margin
    of its iterations: ``(labels, margin, rot0, picks, sums)``, ``sums[j - 1]`` the ``c`` that
    pick ``j`` was the argmin of."""
    n, k = v.shape
    rot = torch.zeros(k, k, dtype=v.dtype)
    rot[:, 0] = v[start]
    c = torch.zeros(n, dtype=v.dtype)
    sums, picks = [], [start]
    for j in range(1, k):
        c += (v @ rot[:, j - 1]).abs()
        p = int(torch.argmin(c))
        sums.append(c.clone())
        picks.append(p)
        rot[:, j] = v[p]
    rot0, skip = rot.clone(), _repeats(rot[None])[0]
    last, n_iter, margin, prev = 0.0, 0, math.inf, None
    while True:
        n_iter += 1
        s = v @ rot
        labels = s.argmax(dim=1)
        if n_iter == 1:
            s = s.masked_fill(skip[None, :], -math.inf)
        two = s.topk(2, dim=1).values
        margin = min(margin, float((two[:, 0] - two[:, 1]).min()))
        t_svd = torch.zeros(k, k, dtype=v.dtype).index_add_(0, labels, v)
        u, sv, vh = torch.linalg.svd(t_svd)
        ncut = 2.0 * (n - float(sv.sum()))
        if abs(ncut - last) < _EPS or n_iter > n_iter_max:
            if n_iter <= n_iter_max and prev is not None and not torch.equal(labels, prev):
                margin = 0.0  # stopped on an ncut repeated by other labels
            return labels, margin, rot0, picks, sums
        last, prev = ncut, labels
        rot = vh.T @ u.T


def _path_stability(v: torch.Tensor, start: int, floor: float, bound: float):
    """One draw of the paper's labels (:func:`_main_path`) and ``m``, the smallest margin over
    its path and its pick alternatives (module docstring): exact where it is in
    ``[floor, bound)``; below ``floor`` (where the weight is 0 whatever the alternatives) the
    path's own margin, from ``bound`` on (where the weight is 1) a value at least ``bound``."""
    n, k = v.shape
    labels, m, rot, picks, sums = _main_path(v, start)
    limit = min(m, bound) if m >= floor else 0.0
    alts = []  # (step j, runner-up row, its distance a_j)
    for j, cj in enumerate(sums, 1):
        a = (cj - cj[picks[j]]) / j
        a[picks[j]] = math.inf
        i = int(a.argmin())
        if float(a[i]) < limit:
            alts.append((j, i, float(a[i])))
    if alts:
        # every alternative's picks at once: its first j columns the path's, column j its
        # runner-up, the later ones the argmin of its own running sums
        r = len(alts)
        js = torch.tensor([j for j, _, _ in alts])
        rots = rot[None].repeat(r, 1, 1)
        rots[torch.arange(r), :, js] = v[torch.tensor([i for _, i, _ in alts])]
        cq = torch.stack([sums[j - 1] for j, _, _ in alts])
        for jj in range(1, k):
            after = js < jj  # alternatives past their switched pick
            cq += (rots[:, :, jj - 1] @ v.T).abs() * (js <= jj - 1)[:, None]
            if bool(after.any()):
                rots[after, :, jj] = v[cq[after].argmin(dim=1)]
        alab, amarg, _ = _iterate(v, rots, _repeats(rots))
        paper = _relabel_by_first_appearance(labels)
        for q, (_, _, a) in enumerate(alts):
            same = torch.equal(_relabel_by_first_appearance(alab[q]), paper)
            m = min(m, max(a, float(amarg[q])) if same else a)
    return labels, m


def steady_stability_reference(embedding: torch.Tensor, gap: float, *, seed: int = 0,
                               draws: int = 1, ramp: tuple[float, float] = STEADY_RAMP,
                               ) -> tuple[torch.Tensor, float]:  # fmt: skip
    """``(labels, z)``: the paper's ``(draws, N)`` labels of ``embedding`` (canonical ids, as
    :func:`~videoanchor.anchor.clustering.labels_from_embedding` draws them from one
    :func:`label_random_state` stream) and their stability ``z = gap * m``, ``m`` the smallest
    decision margin over every draw's path and pick alternatives (module docstring). Exact
    where ``z`` is below ``ramp``'s top; above it ``z`` may be an underestimate that still
    reaches it (the weight is 1 either way)."""
    n = embedding.shape[0]
    v = _discretize_rows(embedding)
    rng = label_random_state(seed, n)
    out = torch.empty(draws, n, dtype=torch.long)
    m = math.inf
    for r in range(draws):
        start = int(rng.randint(n))
        floor, bound = (ramp[0] / gap, ramp[1] / gap) if gap > 0 else (math.inf, 0.0)
        labels, mr = _path_stability(v, start, floor, bound)
        out[r] = _relabel_by_first_appearance(labels)
        m = min(m, mr)
    return out.to(embedding.device), max(gap, 0.0) * m


def path_margin_reference(embedding: torch.Tensor, *, seed: int = 0) -> float:
    """The smallest decision margin of the paper's first draw's iterations alone (no pick
    alternatives): what the brief's first design measured (``bench_share_gate.py``)."""
    n = embedding.shape[0]
    v = _discretize_rows(embedding)
    start = int(label_random_state(seed, n).randint(n))
    return _main_path(v, start)[1]


def completed_draw_reference(vectors: torch.Tensor, start: int, g: np.ndarray,
                             n_iter_max: int = 20) -> torch.Tensor:  # fmt: skip
    """:func:`discretize_reference`'s draw from start row ``start`` (raw ids) with the
    expected share's completion (issue 100, :class:`~videoanchor.anchor.labels.Paths`): at a
    step whose labels leave clusters empty, the rotation is ``V_r U_r^T`` of ``T``'s ``r``
    non-zero singular triplets with the empty clusters' columns (in order) the classical
    Gram-Schmidt basis, twice orthogonalised, of ``g``'s first columns projected off
    ``V_r``'s span."""
    v = _discretize_rows(vectors)
    n, k = v.shape
    rot = _main_path(v, start)[2]  # the initial rotation: the picks from ``start``
    last, n_iter = 0.0, 0
    while True:
        n_iter += 1
        labels = (v @ rot).argmax(dim=1)
        t_svd = torch.zeros(k, k, dtype=v.dtype).index_add_(0, labels, v)
        u, sv, vh = torch.linalg.svd(t_svd)
        ncut = 2.0 * (n - float(sv.sum()))
        if abs(ncut - last) < _EPS or n_iter > n_iter_max:
            return labels
        last = ncut
        empty = [cl for cl in range(k) if not bool((labels == cl).any())]
        if not empty:
            rot = vh.T @ u.T
            continue
        r = k - len(empty)
        vr = vh[:r].T
        rot = vr @ u[:, :r].T
        basis = [vr[:, i] for i in range(r)]
        for col, cl in enumerate(empty):
            q = torch.from_numpy(g[:, col].copy())
            for _ in range(2):
                for b in basis:
                    q = q - (b @ q) * b
            q = q / q.norm()
            basis.append(q)
            rot[:, cl] = q
