"""The spectral step's eigensolvers, in torch, on any device.

The ``k`` leading eigenvectors of the normalised affinity ``S = D^{-1/2} W D^{-1/2}`` of a
symmetric non-negative ``W`` (dense ``eigh`` up to a crossover measured per device; above it a
block Krylov solver on the CPU, Chebyshev-filtered subspace iteration on a GPU; a sparse ``W``
is never densified: ARPACK on the CPU), and the spectral embedding ``D^{-1/2} V`` that the
labels and the cluster shares (:mod:`videoanchor.anchor.clustering`) are drawn from.

ARPACK starts from scikit-learn's vector for ``seed`` (``N`` uniform numbers of
``RandomState(seed)``). The block solvers start from a CPU generator seeded with ``seed``:
the same vectors on every device (up to ties).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import math
import threading
import warnings

import numpy as np
import torch

from videoanchor.anchor.graphs import capture as capture_graph

__all__ = [
    "spectral_embedding",
    "block_krylov_eigvecs",
    "chebyshev_eigvecs",
    "sparse_normalized_affinity",
]


def sparse_normalized_affinity(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(S, d^{1/2})`` of a sparse COO affinity ``W``: ``S = D^{-1/2} W D^{-1/2}`` without its
    diagonal, sparse CSR, and the square roots of the degrees (1 where a degree is 0)."""
    w = w.coalesce()
    n, ind, val = w.shape[0], w.indices(), w.values()
    deg = torch.zeros(n, dtype=val.dtype, device=w.device).index_add_(0, ind[0], val)
    dd = torch.where(deg > 0, deg.sqrt(), torch.ones_like(deg))
    offdiag = ind[0] != ind[1]
    s_val = val[offdiag] / dd[ind[0, offdiag]] / dd[ind[1, offdiag]]
    s = torch.sparse_coo_tensor(ind[:, offdiag], s_val, (n, n), check_invariants=False)
    return s.to_sparse_csr(), dd


def _normalized_affinity(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    deg = w.sum(dim=1)
    dd = torch.where(deg > 0, deg.sqrt(), torch.ones_like(deg))
    s = w / dd[:, None] / dd[None, :]
    s.diagonal().zero_()  # the Laplacian's diagonal is 1, as in scikit-learn
    return s, dd


# spectral_cpu.json (one thread, k = 24, float32): dense (LAPACK's ?syevx) wins at N = 1024,
# draws at 2048, loses at 4096 (26-33 s against Krylov's 3.9-16.5 s); eigh_cost: its time
# times the GEMM rate over N^3 (median 2.7). spectral_nvidia-h200.json: Chebyshev 16-25 ms
# against eigh's 20-23 ms at N = 1024, 18-31 against 35-39 at 2048 (the same labels at a gap).
@dataclasses.dataclass(frozen=True)
class EigenChoice:
    """What ``eigen_solver="auto"`` runs by device (:func:`spectral_embedding`): dense
    ``eigh`` up to ``crossover_*`` tokens, ``above_*`` (``"krylov"`` or ``"chebyshev"``)
    above, Krylov within ``eigh_cost * N^3`` flops. Passed as ``choice=``."""

    crossover_cpu: int = 2048
    crossover_cuda: int = 1024
    above_cpu: str = "krylov"
    above_cuda: str = "chebyshev"
    eigh_cost: float = 2.7


EIGEN_CHOICE = EigenChoice()


def _orthonormal_complement(w: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """An orthonormal basis of ``w``'s columns with ``span(v)`` projected out (CGS2 + QR)."""
    for _ in range(2):
        w = w - v @ (v.T @ w)
    q = torch.linalg.qr(w)[0]
    q = q - v @ (v.T @ q)  # QR of a nearly dependent block can re-admit span(v)
    return torch.linalg.qr(q)[0]


def _start_block(n: int, m: int, seed: int, device, dtype) -> torch.Tensor:
    """An orthonormal ``N x m`` start block from a CPU generator: the same on every device."""
    gen = torch.Generator().manual_seed(int(seed))
    x = torch.randn(n, m, generator=gen, dtype=torch.float64)
    return torch.linalg.qr(x.to(device, dtype))[0]


def block_krylov_eigvecs(matmul, n: int, k: int, *, dtype: torch.dtype, device, seed: int = 0,
                         tol: float = 1e-4, max_flops: float = math.inf,
                         max_steps: int | None = None, matmul_flops: float,
                         ) -> tuple[torch.Tensor, torch.Tensor, dict]:  # fmt: skip
    """The ``k`` leading eigenpairs of a symmetric ``N x N`` operator (``matmul(X) = S X``)
    by thick-restart block Lanczos: ``k + max(8, k // 2)`` vectors a block, full
    re-orthogonalisation, Rayleigh-Ritz in float64, a restart at six blocks.

    Converged where the Ritz block's residual ``||S Q - Q diag(theta)||_F <= tol`` (confirmed
    with a fresh product): judged on the subspace, so eigenvalues clustered inside the block
    do not slow it. Unconverged, it stops after ``max_flops`` (``matmul_flops`` a column
    plus the orthogonalisation) or ``max_steps`` block steps.

    Returns ``(theta (k,) descending, float64, host; Q (N, k) on device; info)``, ``info``
    with ``converged``, ``steps``, ``flops``, ``residual``."""
    m = min(n, k + max(8, k // 2))
    max_basis = min(n, 6 * m)
    v = [_start_block(n, m, seed, device, dtype)]
    sv = [matmul(v[0])]
    h = (v[0].T @ sv[0]).double().cpu()
    h, flops, steps = (h + h.T) / 2, matmul_flops * m + 8 * n * m * m, 0
    while True:
        steps += 1
        theta, y = torch.linalg.eigh(h)
        theta, y = theta.flip(0), y.flip(1)
        vc, svc = torch.cat(v, 1), torch.cat(sv, 1)
        p = vc.shape[1]
        yk, thk = y[:, :k].to(device, dtype), theta[:k].to(device, dtype)
        q = vc @ yk
        res = float((svc @ yk - q * thk).norm())
        flops += 4 * n * p * k
        if res <= tol or p >= n:
            true_res = float((matmul(q) - q * thk).norm())  # the stored images may drift
            flops += matmul_flops * k
            if true_res <= tol or p >= n:
                info = dict(converged=true_res <= tol, steps=steps, flops=flops, residual=true_res)
                return theta[:k], q, info
            sv = [matmul(vc)]
            flops += matmul_flops * p
            continue
        if flops >= max_flops or (max_steps is not None and steps >= max_steps):
            return theta[:k], q, dict(converged=False, steps=steps, flops=flops, residual=res)
        if p + m > max_basis:  # thick restart on the leading m Ritz vectors
            ym = y[:, :m].to(device, dtype)
            v, sv = [vc @ ym], [svc @ ym]
            vc, h = v[0], torch.diag(theta[:m])
            flops += 4 * n * p * m
        pp = vc.shape[1]
        w = _orthonormal_complement(sv[-1][:, : n - pp], vc)  # never more than N columns
        b, sw = w.shape[1], matmul(w)
        v.append(w), sv.append(sw)
        c = (torch.cat([vc, w], 1).T @ sw).double().cpu()  # [[h, c[:pp]], [c[:pp].T, c[pp:]]]
        top, sym = torch.cat([h, c[:pp]], 1), (c[pp:] + c[pp:].T) / 2
        h = torch.cat([top, torch.cat([c[:pp].T, sym], 1)])
        flops += matmul_flops * b + 6 * n * pp * b + 16 * n * b * b + 2 * n * (pp + b) * b


#: :func:`chebyshev_eigvecs`' degree, guard vectors and most steps under "auto" (3 steps with
#: a gap at k = 24, 9-17 without, spectral_nvidia-h200.json), and its stall ratio.
CHEBYSHEV_DEGREE, CHEBYSHEV_GUARD, CHEBYSHEV_STEPS, STALL_RATIO = 8, 12, 30, 0.9
#: :func:`chebyshev_eigvecs`' first round, run before any read: ``FIRST_STEPS`` steps that
#: damp ``[-1, FIRST_CUT]`` (the random start block's Ritz values say little: its smallest
#: one, the former cut, was -0.2 on the test sets).
FIRST_CUT, FIRST_STEPS = 0.0, 2
#: the guard vectors a ``window`` leaves (beyond them the window's pairs are not converged),
#: and the cap on a round's planned steps, a multiple of the plan from the Ritz values alone
WINDOW_GUARD, PLAN_CAP = 4, 2.0
#: the residual a round plans for, a multiple of ``tol``: below 1 it buys rounds with steps
#: (test_host_reads' set at seeds 0-5, k = 24, the rounds and steps in docs/ssc.md)
PLAN_AIM = 1.0


def chebyshev_eigvecs(matmul, n: int, k: int, *, dtype: torch.dtype, device, seed: int = 0,
                      tol: float = 1e-4, max_steps: int = CHEBYSHEV_STEPS,
                      degree: int = CHEBYSHEV_DEGREE, guard: int = CHEBYSHEV_GUARD,
                      operator: torch.Tensor | None = None, capture=None,
                      window: tuple[int, float] | None = None,
                      ) -> tuple[torch.Tensor, torch.Tensor, dict]:  # fmt: skip
    """The ``k`` leading eigenpairs of a normalised affinity (``matmul(X) = S X``, spectrum
    in ``[-1, 1]``) by Chebyshev-filtered subspace iteration on ``k + guard`` vectors.

    A first round of ``FIRST_STEPS`` steps on a fixed cut (``FIRST_CUT``) reads nothing;
    each round after it reads the Rayleigh-Ritz projection and the block residual
    ``||S Q - Q diag(theta)||_F`` to the host, and fixes the cut (the smallest Ritz value)
    and the steps that should bring the residual to ``tol`` (:func:`_plan`: the rate
    from the Ritz values, the eigenvalue below the block taken as high as the last Ritz
    value plus its residual, so that one planned round usually suffices: 2 reads on five
    of the six sets of docs/ssc.md's count, 3 on one). A step applies the
    degree-``degree`` Chebyshev polynomial of ``S`` at most 1 on ``[-1, cut]`` and a QR,
    with no host read: on CUDA one CUDA graph, captured once per shape where ``operator``
    (``S`` itself, dense or sparse CSR, that ``matmul`` multiplies by) is given, and replayed
    with ``S`` copied into its buffers (:func:`_filter_step`; ``capture``: a stand-in for
    the capture, for tests). It stops at ``tol``, after ``max_steps``
    steps, or where a round of ``r`` steps cuts the residual by less than
    ``1 - STALL_RATIO ** r`` (TF32-rounded products floor it near 1e-3: ``info["stalled"]``).

    ``window = (j, width)``: the residual (and ``tol``) also covers every pair down to
    ``theta_j - width`` and the next one, where the block less ``WINDOW_GUARD`` vectors
    holds them, and those pairs are returned too (the soft share's window from the same
    call, :func:`spectral_pairs`); more than ``k`` pairs come back only where it held them.

    Returns as :func:`block_krylov_eigvecs`; ``info`` with ``converged``, ``steps``,
    ``residual``, ``stalled``."""
    if not 1 <= k <= n:
        raise ValueError(f"k: expected 1 <= k <= N = {n}, got {k}")
    for name, value in (("degree", degree), ("max_steps", max_steps)):
        if int(value) < 1:
            raise ValueError(f"{name}: expected a positive integer, got {value}")
    m = min(n, k + max(0, int(guard)))
    x = _start_block(n, m, seed, device, dtype)
    with _filter_step(matmul, operator, x, int(degree), capture) as step:
        return _chebyshev(matmul, step, x, k, n, tol, int(max_steps), int(degree), window)


def _chebyshev(matmul, step, x, k: int, n: int, tol: float, max_steps: int, degree: int,
               window: tuple[int, float] | None = None):  # fmt: skip
    """:func:`chebyshev_eigvecs`' rounds with its filter step ``step``."""
    device, dtype, m = x.device, x.dtype, x.shape[1]

    def wanted(theta) -> int:
        """The pairs to converge: ``k``, or with ``window = (j, width)`` every one down to
        ``theta_j - width`` and the next, where the block less ``WINDOW_GUARD`` holds them."""
        if window is None:
            return k
        inside = int((theta >= float(theta[window[0]]) - window[1]).sum())
        return max(k, inside + 1) if inside + 1 <= m - WINDOW_GUARD else k

    def ritz(x):
        """``(theta, Q, residual of the wanted pairs, their count, the last pair's residual)``:
        in float32 one host read (the projection and, from float64 Grams, each pair's
        residual ``||S q_i - theta_i q_i||^2 = y_i^T (B - 2 theta_i H + theta_i^2 M) y_i``, ``B
        = (SX)^T SX``, ``H = X^T S X``, ``M = X^T X``); in float64 two (the projection, then
        the residuals from the vectors: the Grams' cancellation would reach its tolerance)."""
        sx = matmul(x)
        if dtype == torch.float64:
            h = torch.tensor((x.T @ sx).tolist(), dtype=torch.float64)
        else:
            x64, sx64 = x.double(), sx.double()
            grams = torch.stack([(x.T @ sx).double(), x64.T @ sx64, sx64.T @ sx64, x64.T @ x64])
            h, h64, b, mm = torch.tensor(grams.tolist(), dtype=torch.float64)
        theta, y = torch.linalg.eigh((h + h.T) / 2)
        theta, y = theta.flip(0), y.flip(1)
        q = x @ y.to(device, dtype)
        if dtype == torch.float64:
            r = (sx @ y.to(device, dtype) - q * theta.to(device, dtype)).norm(dim=0) ** 2
            per = torch.tensor(r.tolist(), dtype=torch.float64)
        else:
            per = (y * (b @ y)).sum(0) - 2 * theta * (y * (h64 @ y)).sum(0)
            per = per + theta * theta * (y * (mm @ y)).sum(0)
        per, kw = per.clamp_min(0.0), wanted(theta)
        return theta, q, float(per[:kw].sum().sqrt()), kw, float(per[-1].sqrt())

    # the first round, before any read: a fixed cut
    todo = min(FIRST_STEPS, max_steps)
    for _ in range(todo):
        x = step(x, (FIRST_CUT - 1.0) / 2, (FIRST_CUT + 1.0) / 2)
    steps, stalled = todo, False
    theta, x, res, kw, last = ritz(x)
    while not res <= tol and steps < max_steps:
        centre, half, want = _plan(theta, kw, last, res, tol, degree, n)
        todo = min(want, int(max_steps) - steps)
        for _ in range(todo):  # no host read in here
            x = step(x, centre, half)
        steps += todo
        before = res
        theta, x, res, kw, last = ritz(x)
        if not res <= tol and res > STALL_RATIO**todo * before:
            stalled = steps < max_steps  # the products' rounding floors it (TF32: ~1e-3)
            break
    kw = k if window is None else kw
    return theta[:kw], x[:, :kw], dict(converged=res <= tol, steps=steps, residual=res,
                                       stalled=stalled)  # fmt: skip


def _plan(theta, kw: int, last: float, res: float, tol: float, degree: int, n: int):
    """``(centre, half, steps)`` of a round: the filter damps ``[-1, cut]`` (``cut`` the
    smallest Ritz value; ``half >= 1e-2`` keeps ``T_degree`` under 1e21), and the error of
    pair ``kw`` shrinks by ``T(below) / T(theta_kw)`` a step, ``below`` the eigenvalue next
    under the block. Early Ritz values lie low, so ``below`` is taken as ``cut`` plus the
    last pair's residual ``last`` (an eigenvalue lies within it of ``cut``); the steps are at
    most ``PLAN_CAP`` times those planned with ``below = cut`` (a residual that large says
    little)."""
    cut, top = float(theta[-1]), float(theta[kw - 1])
    centre, half = (cut - 1.0) / 2, max((cut + 1.0) / 2, 1e-2)

    def t(v: float) -> float:
        z = (v - centre) / half
        return math.cosh(degree * math.acosh(z)) if z > 1 else 1.0

    def steps(below: float) -> float:
        rate = t(below) / t(top)
        return math.log(PLAN_AIM * tol / res) / math.log(rate) if 0 < rate < 1 and tol > 0 else n

    want = min(steps(min(top, cut + last)), PLAN_CAP * steps(cut))
    return centre, half, max(math.ceil(want), 1)


def _filter(matmul, x, centre, half, degree: int) -> torch.Tensor:
    """One Chebyshev filter step: ``T_degree((S - centre) / half) x``, orthonormalised (QR)."""
    y_prev, y = x, (matmul(x) - centre * x) / half
    for _ in range(degree - 1):
        y_prev, y = y, 2 * (matmul(y) - centre * y) / half - y_prev
    return torch.linalg.qr(y)[0]


#: the captured filter steps kept (:func:`_filter_step`), least recently used dropped first
GRAPH_CACHE = 4
_GRAPHS: collections.OrderedDict = collections.OrderedDict()
_GRAPHS_LOCK = threading.Lock()
#: captures made (the cache's misses), for the tests and the benchmarks
GRAPH_COUNTS = {"captures": 0, "replays": 0}


def _nnz_bucket(nnz: int, n: int) -> tuple[int, int]:
    """``(bucket, phantom rows)``: ``nnz`` padded up to a multiple of the largest power of two
    at most ``nnz / 8`` (under 1/8 more), the padding held in phantom rows below ``S``'s
    ``n`` (``n`` entries a row, distinct columns): the same shapes for every ``nnz`` of the
    bucket."""
    step = 1 << max(0, int(nnz).bit_length() - 4)
    bucket = -(-max(int(nnz), 1) // step) * step
    return bucket, max(1, -(-(step - 1) // n))


class _Static:
    """One captured filter step: the operator's static buffers (dense ``S``, or sparse CSR
    ``S`` padded to its nnz bucket, ``n + p`` rows), the block's, ``centre``'s and ``half``'s,
    and the graph that reads them (``graph.replay()`` refills ``out``)."""

    def __init__(self, operator, x, degree: int, capture):
        n = x.shape[0]
        self.x, self.c, self.h = x.clone(), x.new_zeros(()), x.new_ones(())
        self.sparse = operator.layout == torch.sparse_csr
        if self.sparse:
            bucket, phantom = _nnz_bucket(operator._nnz(), n)
            idx = operator.crow_indices()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # sparse CSR is "beta"
                self.s = torch.sparse_csr_tensor(
                    idx.new_zeros(n + phantom + 1), idx.new_zeros(bucket),
                    operator.values().new_zeros(bucket), (n + phantom, n),
                    check_invariants=False,
                )  # fmt: skip
            self.load(operator)

            def matmul(v):
                return (self.s @ v)[:n]
        else:
            self.s = operator.clone()

            def matmul(v):
                return self.s @ v

        self.graph, self.out = capture(lambda: _filter(matmul, self.x, self.c, self.h, degree))
        self.busy = False

    def load(self, operator) -> None:
        """Copy ``operator`` into the static buffers (no host read: its nnz is metadata)."""
        if not self.sparse:
            self.s.copy_(operator)
            return
        n, nnz = operator.shape[0], operator._nnz()
        crow, col, val = self.s.crow_indices(), self.s.col_indices(), self.s.values()
        pad = val.numel() - nnz
        crow[: n + 1].copy_(operator.crow_indices())
        # the padding's rows: n entries each (the last one the rest), columns 0, 1, ...
        ends = [min(pad, n * (q + 1)) for q in range(crow.numel() - n - 1)]
        crow[n + 1 :].copy_(torch.tensor(ends, dtype=crow.dtype) + nnz)
        col[:nnz].copy_(operator.col_indices())
        col[nnz:].copy_(torch.arange(pad, dtype=col.dtype) % n)
        val[:nnz].copy_(operator.values())
        val[nnz:].zero_()

    def __call__(self, x, centre: float, half: float):
        self.x.copy_(x), self.c.fill_(centre), self.h.fill_(half)
        self.graph.replay()
        GRAPH_COUNTS["replays"] += 1
        return self.out


def _cuda_capture(run):
    """``(graph, out)``: ``run()`` captured as a CUDA graph after a warm-up on a side stream,
    as torch asks (:func:`videoanchor.anchor.graphs.capture`: thread-local, a private pool,
    no device sync, cache emptied or garbage collected); ``out`` is what ``run`` returned in
    the capture, refilled by a replay."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        run()
    torch.cuda.current_stream().wait_stream(side)
    return capture_graph(run, side)


def _graph_key(operator, x, degree: int) -> tuple:
    key = (operator.layout, tuple(operator.shape), operator.dtype, str(operator.device),
           tuple(x.shape), x.dtype, int(degree))  # fmt: skip
    if operator.layout == torch.sparse_csr:
        key += (operator.crow_indices().dtype, _nnz_bucket(operator._nnz(), x.shape[0]))
    return key


@contextlib.contextmanager
def _filter_step(matmul, operator, x: torch.Tensor, degree: int, capture=None):
    """The filter step (``step(x, centre, half)``, :func:`_filter`) of one call: on CUDA (or
    with ``capture``, a stand-in for :func:`_cuda_capture`) a graph replayed from static
    buffers, captured once per operator layout, shapes, dtype, device and, for a sparse CSR
    operator, nnz bucket (:func:`_nnz_bucket`), and kept (:data:`GRAPH_CACHE`, least recently
    used dropped); the operator is copied into its buffers at each call. Eager elsewhere,
    without ``operator``, or where capture fails (warned)."""
    if capture is None and x.device.type == "cuda":
        capture = _cuda_capture
    if capture is None or operator is None:
        yield lambda x, c, h: _filter(matmul, x, c, h, degree)
        return
    key = _graph_key(operator, x, degree)
    with _GRAPHS_LOCK:
        entry = _GRAPHS.get(key)
        if entry is not None and not entry.busy:
            _GRAPHS.move_to_end(key)
            entry.busy = True
        else:
            entry = None
    if entry is not None:
        entry.load(operator)
    else:
        try:
            entry = _Static(operator, x, degree, capture)
        except Exception as exc:  # noqa: BLE001 - whatever capture refuses runs eagerly
            warnings.warn(f"chebyshev_eigvecs: no CUDA graph ({exc}); eager", RuntimeWarning,
                          stacklevel=4)  # fmt: skip
            yield lambda x, c, h: _filter(matmul, x, c, h, degree)
            return
        GRAPH_COUNTS["captures"] += 1
        entry.busy = True
        with _GRAPHS_LOCK:
            if key not in _GRAPHS:  # (a call of the same shape running meanwhile keeps its own)
                _GRAPHS[key] = entry
                while len(_GRAPHS) > GRAPH_CACHE:
                    _GRAPHS.popitem(last=False)
    try:
        yield entry
    finally:
        entry.busy = False


def _subset_eigh(a: np.ndarray, lo: int, hi: int, driver: str) -> tuple[np.ndarray, np.ndarray]:
    """Eigenpairs ``lo..hi`` (ascending) of the symmetric ``a`` by LAPACK's subset driver
    ``driver`` (``"evr"``: MRRR, ``"evx"``: bisection). Where the driver fails (MRRR's
    "Internal Error" on the repeated eigenvalues of identical tokens: scipy-openblas 0.3.30
    on an AMD EPYC, issue 97), the full ``eigh`` answers, sliced: the same pairs."""
    import scipy.linalg

    try:
        return scipy.linalg.eigh(a, subset_by_index=[lo, hi], driver=driver, check_finite=False)
    except np.linalg.LinAlgError:
        w, v = torch.linalg.eigh(torch.from_numpy(a))
        return w[lo : hi + 1].numpy(), v[:, lo : hi + 1].numpy()


def _dense_top_eigvecs(s: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k`` leading eigenvectors of the symmetric ``s``, descending. On the CPU by
    LAPACK's partial solver (only ``k`` vectors are formed), elsewhere by ``eigh``."""
    n = s.shape[0]
    if s.device.type == "cpu":
        _, vec = _subset_eigh(s.numpy(), n - k, n - 1, "evx")
        return torch.from_numpy(vec[:, ::-1].copy())
    _, v = torch.linalg.eigh(s)
    return v[:, -k:].flip(1)


def _block_eigvecs(s, k: int, solver: str, *, seed: int, tol: float, max_steps: int | None,
                   max_flops: float = math.inf, then: str = "using its last Ritz vectors",
                   window: tuple[int, float] | None = None):  # fmt: skip
    """``(theta, Q, info)`` of ``s`` (dense or sparse) by :func:`chebyshev_eigvecs` (``solver``
    "chebyshev"; ``max_steps`` None: ``CHEBYSHEV_STEPS``) or :func:`block_krylov_eigvecs`;
    unconverged, it warns that the caller goes on ``then``."""
    n, kw = s.shape[0], dict(dtype=s.dtype, device=s.device, seed=seed, tol=tol)
    if solver == "chebyshev":
        steps = CHEBYSHEV_STEPS if max_steps is None else max_steps
        theta, q, info = chebyshev_eigvecs(lambda x: s @ x, n, k, max_steps=steps, operator=s,
                                           window=window, **kw)  # fmt: skip
    else:
        nnz = s._nnz() if s.layout != torch.strided else n * n
        theta, q, info = block_krylov_eigvecs(lambda x: s @ x, n, k, matmul_flops=2.0 * nnz,
                                              max_flops=max_flops, max_steps=max_steps, **kw)  # fmt: skip
    if not info["converged"]:
        name = "Chebyshev" if solver == "chebyshev" else "Krylov"
        why = "stalled (TF32 products?)" if info.get("stalled") else "stopped at its budget"
        warnings.warn(f"spectral: the {name} solver {why} after {info['steps']} steps (block residual "
                      f"{info['residual']:.2e} > tol {tol:.0e}, N = {n}); {then}", RuntimeWarning,
                      stacklevel=3)  # fmt: skip
    return theta, q, info


#: ARPACK's relative residual per Ritz vector in the sparse path (``||S v - theta v|| <=
#: tol |theta|``): 24 vectors at 1e-8 keep the block residual under the Krylov solver's 1e-7
ARPACK_TOL = 1e-8


def _top_eigvecs_arpack(s, k: int, seed: int, *, values: bool = False):
    """The ``k`` leading eigenvectors (descending) of the sparse CSR ``s`` (``values``: with
    their eigenvalues, ``(theta, vectors)``, ``theta`` float64 on the host): each connected
    component's top ``min(k, size)`` by ARPACK (``eigsh``, ``which="LA"``, from scikit-learn's
    start vector restricted to it; dense ``eigh`` for a small one), the ``k`` largest kept.
    None where there are more components than ``k`` or ARPACK does not converge (warned).
    Per component because each adds an eigenvalue 1 and one Lanczos start vector misses
    repeats (on three components of 44 points it returned 0.60 for the third 1)."""
    import scipy.linalg
    import scipy.sparse.csgraph
    import scipy.sparse.linalg

    n = s.shape[0]
    m = scipy.sparse.csr_matrix(
        (s.values().cpu().double().numpy(), s.col_indices().cpu().numpy(),
         s.crow_indices().cpu().numpy()), shape=(n, n),
    )  # fmt: skip
    count, comp = scipy.sparse.csgraph.connected_components(m, directed=False)
    if count > k:
        return None  # more than k eigenvalues 1: no gap at k; the block solver picks
    v0 = np.random.RandomState(int(seed)).uniform(-1, 1, n)
    pairs = []  # (value, component's indices, vector), by component and column
    for c in range(count):
        idx = np.flatnonzero(comp == c)
        sub, kc = m[idx][:, idx], min(k, idx.size)
        if idx.size <= 4 * (kc + 8):
            w, v = scipy.linalg.eigh(sub.toarray(), subset_by_index=[idx.size - kc, idx.size - 1])
        else:
            try:
                w, v = scipy.sparse.linalg.eigsh(sub, k=kc, which="LA", v0=v0[idx], tol=ARPACK_TOL)
            except scipy.sparse.linalg.ArpackNoConvergence as exc:
                warnings.warn(f"spectral: ARPACK did not converge (N = {n}, k = {k}, a component "
                              f"of {idx.size}: {exc}); finishing with the block Krylov solver",
                              RuntimeWarning, stacklevel=3)  # fmt: skip
                return None
        pairs += [(value, idx, v[:, j]) for j, value in enumerate(w.tolist())]
    q, top = np.zeros((n, k)), sorted(pairs, key=lambda p: -p[0])[:k]  # (stable)
    for col, (_, idx, vec) in enumerate(top):
        q[idx, col] = vec
    q = torch.from_numpy(q).to(s.device, s.dtype)
    return (torch.tensor([p[0] for p in top], dtype=torch.float64), q) if values else q


def spectral_embedding(affinity: torch.Tensor, n_components: int, *, seed: int = 0,
                       eigen_solver: str = "auto", tol: float | None = None,
                       max_iter: int | None = None, choice: EigenChoice = EIGEN_CHOICE,
                       ) -> torch.Tensor:  # fmt: skip
    """The ``(N, n_components)`` spectral embedding ``D^{-1/2} V`` of ``affinity``, ``V`` the
    leading eigenvectors of the normalised affinity, descending. ``eigen_solver``: ``"eigh"``
    (dense; on the CPU LAPACK's partial solver), ``"krylov"`` (alias ``"subspace"``,
    :func:`block_krylov_eigvecs`) or ``"chebyshev"`` (:func:`chebyshev_eigvecs`, at most
    ``max_iter`` or ``CHEBYSHEV_STEPS`` steps), both to a block residual ``tol`` (1e-4 in
    float32, 1e-7 in float64), or ``"auto"``: ``eigh`` up to ``choice``'s crossover for the
    device (:class:`EigenChoice`), above it the device's block solver (Krylov within
    ``eigh_cost * N^3`` flops), which, if it runs out, warns and finishes with ``eigh``. A
    solver named explicitly warns and keeps its last Ritz vectors."""
    n = affinity.shape[0]
    if not 1 <= n_components <= n:
        raise ValueError(f"n_components: expected 1 <= n_components <= N = {n}, got {n_components}")
    if eigen_solver not in ("auto", "eigh", "krylov", "subspace", "chebyshev"):
        raise ValueError(
            f"eigen_solver: expected 'auto', 'eigh', 'krylov' or 'chebyshev', got {eigen_solver!r}"
        )
    s, dd = _normalized_affinity(affinity)
    if tol is None:
        tol = 1e-4 if s.dtype == torch.float32 else 1e-7
    cpu, auto, solver = s.device.type == "cpu", eigen_solver == "auto", eigen_solver
    if auto:
        crossover = choice.crossover_cpu if cpu else choice.crossover_cuda
        solver = "eigh" if n <= crossover else (choice.above_cpu if cpu else choice.above_cuda)
    vecs = None
    if solver != "eigh" and n >= 4 * (n_components + 8):
        _, vecs, info = _block_eigvecs(
            s, n_components, solver, seed=seed, tol=tol, max_steps=max_iter,
            max_flops=choice.eigh_cost * float(n) ** 3 if auto else math.inf,
            then="finishing with dense eigh" if auto else "using its last Ritz vectors",
        )  # fmt: skip
        vecs = None if auto and not info["converged"] else vecs
    if vecs is None:
        vecs = _dense_top_eigvecs(s, n_components).to(s.device, s.dtype)
    return vecs / dd[:, None]


def spectral_pairs(affinity: torch.Tensor, n_components: int, *, extra: int, seed: int = 0,
                   eigen_solver: str = "auto", choice: EigenChoice = EIGEN_CHOICE,
                   window: float | None = None,
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]:  # fmt: skip
    """:func:`spectral_embedding`'s eigenpairs and ``extra`` more, from one solver call:
    ``(theta, vecs, dd, dense)``, ``theta`` the leading eigenvalues of the normalised
    affinity (float64, host, descending), ``vecs`` their eigenvectors (``N x m``, on the
    affinity's device and dtype), ``dd`` the degrees' square roots, and ``dense`` whether
    every pair given is converged, a window's caller may take them: a dense solver ran (then
    ``m = n_components + extra`` pairs: LAPACK's partial solver forms ``m`` vectors for the
    price of ``n_components``, its cost being the reduction), or the Chebyshev solver with
    ``window`` (a width) converged (it converges every pair down to ``theta_k - window`` and
    the next where its block holds them, else ``n_components + 1``, the last one inside the
    window); a block solver otherwise converges only ``n_components + 1``, the eigengap's.
    The embedding is ``vecs[:, :n_components] / dd[:, None]``. ``eigen_solver`` and
    ``choice`` as in :func:`spectral_embedding`."""
    n = affinity.shape[0]
    if not 1 <= n_components <= n:
        raise ValueError(f"n_components: expected 1 <= n_components <= N = {n}, got {n_components}")
    s, dd = _normalized_affinity(affinity)
    m = min(n, n_components + max(1, int(extra)))
    tol = 1e-4 if s.dtype == torch.float32 else 1e-7
    cpu, auto, solver = s.device.type == "cpu", eigen_solver == "auto", eigen_solver
    if auto:
        crossover = choice.crossover_cpu if cpu else choice.crossover_cuda
        solver = "eigh" if n <= crossover else (choice.above_cpu if cpu else choice.above_cuda)
    if solver != "eigh" and n >= 4 * (n_components + 9):
        kb = min(n, n_components + 1)
        span = (n_components - 1, float(window)) if window and solver == "chebyshev" else None
        theta, vecs, info = _block_eigvecs(
            s, kb, solver, seed=seed, tol=tol, max_steps=None,
            max_flops=choice.eigh_cost * float(n) ** 3 if auto else math.inf,
            then="finishing with dense eigh" if auto else "using its last Ritz vectors",
            window=span,
        )  # fmt: skip
        if info["converged"] or not auto:
            # (a window crowded past the block comes back as k + 1 pairs, inside it)
            whole = span is not None and info["converged"]
            return theta.to(torch.float64).cpu(), vecs, dd, whole
    if s.device.type == "cpu":
        theta, vec = _subset_eigh(s.numpy(), n - m, n - 1, "evx")
        theta = torch.from_numpy(theta[::-1].astype(np.float64))
        return theta, torch.from_numpy(vec[:, ::-1].copy()), dd, True
    theta, vec = torch.linalg.eigh(s)
    return theta.flip(0)[:m].to(torch.float64).cpu(), vec.flip(1)[:, :m], dd, True


def _filtered_eigenpairs(s: torch.Tensor, k: int, width: float):
    """The leading eigenpairs of the symmetric ``s`` (float64), descending, at least down to
    ``theta_k - width`` (``theta_k`` the ``k``-th largest eigenvalue). On the CPU by LAPACK's
    MRRR for a subset (``evr``; its cost is the tridiagonal reduction, the same for any
    subset: the window is widened by doubling where it is crowded), elsewhere by ``eigh``."""
    n = s.shape[0]
    if s.device.type != "cpu":
        theta, vec = torch.linalg.eigh(s)
        return theta.flip(0), vec.flip(1)
    m = min(n, k + max(8, k // 2))
    while True:
        theta, vec = _subset_eigh(s.numpy(), n - m, n - 1, "evr")
        if m == n or theta[0] < theta[-k] - width:
            return torch.from_numpy(theta[::-1].copy()), torch.from_numpy(vec[:, ::-1].copy())
        m = min(n, 2 * m)
