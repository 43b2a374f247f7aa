"""Spectral clustering of an SSC affinity, in torch, on any device.

Normalised spectral clustering (Shi & Malik; Ng, Jordan & Weiss): the ``k`` leading
eigenvectors of ``S = D^{-1/2} W D^{-1/2}`` for a symmetric non-negative affinity ``W`` (dense
``eigh`` up to a crossover measured per device; above it a block Krylov solver on the CPU,
Chebyshev-filtered subspace iteration on a GPU; a sparse ``W`` is never densified: ARPACK
on the CPU), then labels by the Yu & Shi discretisation of scikit-learn's
``SpectralClustering(assign_labels="discretize")`` or by seeded k-means.

Seeds follow scikit-learn: ``seed=s`` draws ARPACK's start vector (``N`` uniform numbers)
before ``discretize`` draws its start row, so it gives the authors' labels after
``np.random.seed(s)`` wherever the clustering is well-posed. The block solvers start from a
CPU generator seeded with ``seed``: the same labels on every device (up to ties).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import warnings

import numpy as np
import torch

from videoanchor.anchor.collective import broadcast_from_first, raise_together
from videoanchor.anchor.products import exact_float32
from videoanchor.anchor.threads import bounded

__all__ = [
    "ssc_affinity",
    "spectral_embedding",
    "block_krylov_eigvecs",
    "chebyshev_eigvecs",
    "discretize",
    "kmeans",
    "label_random_state",
    "labels_from_embedding",
    "spectral_labels",
    "spectral_clustering",
    "sparse_spectral_clustering",
    "sparse_spectral_labels",
    "sparse_ssc_affinity",
    "sparse_normalized_affinity",
    "soft_cluster_shares",
    "label_shares",
    "paper_label_agreement",
    "stable_cluster_shares",
    "cluster",
]


def ssc_affinity(coef: torch.Tensor, *, normalize: str = "none") -> torch.Tensor:
    """``W = |C| + |C|^T`` (docs/method.md). ``normalize="column_max"`` first divides each
    column of ``|C|`` by its largest entry (Elhamifar & Vidal's ``BuildAdjacency``)."""
    if coef.dim() != 2 or coef.shape[0] != coef.shape[1]:
        raise ValueError(f"coef: expected a square (N, N) matrix, got shape {tuple(coef.shape)}")
    a = coef.abs()
    if normalize == "column_max":
        a = a / (a.amax(dim=0, keepdim=True) + torch.finfo(a.dtype).eps)
    elif normalize != "none":
        raise ValueError(f"normalize: expected 'none' or 'column_max', got {normalize!r}")
    return a + a.T


def sparse_ssc_affinity(coef: torch.Tensor) -> torch.Tensor:
    """``W = |C| + |C|^T`` of a sparse COO ``C``: coalesced sparse COO, float64."""
    c, n = coef.coalesce(), coef.shape[0]
    v = c.values().abs().to(torch.float64)
    ind, v = c.indices()[:, v > 0], v[v > 0]
    both, vv = torch.cat([ind, ind.flip(0)], dim=1), torch.cat([v, v])
    return torch.sparse_coo_tensor(both, vv, (n, n), check_invariants=False).coalesce()


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


def chebyshev_eigvecs(matmul, n: int, k: int, *, dtype: torch.dtype, device, seed: int = 0,
                      tol: float = 1e-4, max_steps: int = CHEBYSHEV_STEPS,
                      degree: int = CHEBYSHEV_DEGREE, guard: int = CHEBYSHEV_GUARD,
                      ) -> tuple[torch.Tensor, torch.Tensor, dict]:  # fmt: skip
    """The ``k`` leading eigenpairs of a normalised affinity (``matmul(X) = S X``, spectrum
    in ``[-1, 1]``) by Chebyshev-filtered subspace iteration on ``k + guard`` vectors.

    Each round reads the Rayleigh-Ritz projection and the block residual
    ``||S Q - Q diag(theta)||_F`` to the host, and fixes the cut (the smallest Ritz value)
    and the steps that should bring the residual to ``tol``. A step applies the
    degree-``degree`` Chebyshev polynomial of ``S`` at most 1 on ``[-1, cut]`` and a QR,
    with no host read (one CUDA graph on CUDA). It stops at ``tol``, after ``max_steps``
    steps, or where a round of ``r`` steps cuts the residual by less than
    ``1 - STALL_RATIO ** r`` (TF32-rounded products floor it near 1e-3: ``info["stalled"]``).

    Returns as :func:`block_krylov_eigvecs`; ``info`` with ``converged``, ``steps``,
    ``residual``, ``stalled``."""
    if not 1 <= k <= n:
        raise ValueError(f"k: expected 1 <= k <= N = {n}, got {k}")
    for name, value in (("degree", degree), ("max_steps", max_steps)):
        if int(value) < 1:
            raise ValueError(f"{name}: expected a positive integer, got {value}")
    m = min(n, k + max(0, int(guard)))
    x = _start_block(n, m, seed, device, dtype)
    step = _FilterStep(matmul, x, int(degree))

    def ritz(x):  # two host reads: the m x m projection, the residual
        sx = matmul(x)
        h = torch.tensor((x.T @ sx).tolist(), dtype=torch.float64)
        theta, y = torch.linalg.eigh((h + h.T) / 2)
        theta, y = theta.flip(0), y.flip(1).to(device, dtype)
        q, sq = x @ y, sx @ y
        res = float((sq[:, :k] - q[:, :k] * theta[:k].to(device, dtype)).norm())
        return theta, q, res

    theta, x, res = ritz(x)
    steps, stalled = 0, False
    while not res <= tol and steps < max_steps:
        cut = float(theta[-1])  # damp [-1, cut]; half >= 1e-2 keeps T_degree under 1e21
        centre, half = (cut - 1.0) / 2, max((cut + 1.0) / 2, 1e-2)
        # the round's steps: the error shrinks by about 1 / T_degree(z) per step
        z = (float(theta[k - 1]) - centre) / half
        rate = 1 / math.cosh(degree * math.acosh(z)) if z > 1 else 1.0
        want = math.ceil(math.log(tol / res) / math.log(rate)) if 0 < rate < 1 and tol > 0 else n
        todo = min(max(want, 1), int(max_steps) - steps)
        for _ in range(todo):  # no host read in here
            x = step(x, centre, half)
        steps += todo
        before = res
        theta, x, res = ritz(x)
        if not res <= tol and res > STALL_RATIO**todo * before:
            stalled = steps < max_steps  # the products' rounding floors it (TF32: ~1e-3)
            break
    return theta[:k], x[:, :k], dict(converged=res <= tol, steps=steps, residual=res,
                                     stalled=stalled)  # fmt: skip


def _filter(matmul, x, centre, half, degree: int) -> torch.Tensor:
    """One Chebyshev filter step: ``T_degree((S - centre) / half) x``, orthonormalised (QR)."""
    y_prev, y = x, (matmul(x) - centre * x) / half
    for _ in range(degree - 1):
        y_prev, y = y, 2 * (matmul(y) - centre * y) / half - y_prev
    return torch.linalg.qr(y)[0]


class _FilterStep:
    """:func:`_filter` for one operator and block shape: on CUDA captured once as a CUDA
    graph (block, ``centre``, ``half`` in static buffers) and replayed; eager elsewhere or
    where capture fails (``self.graph`` None)."""

    def __init__(self, matmul, x: torch.Tensor, degree: int):
        self.run = lambda x, c, h: _filter(matmul, x, c, h, degree)
        self.graph = None
        if x.device.type != "cuda":
            return
        self.x, self.c, self.h = x.clone(), x.new_zeros(()), x.new_ones(())
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up before capture, as torch asks
                self.run(self.x, self.c, self.h)
            torch.cuda.current_stream().wait_stream(side)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                self.out = self.run(self.x, self.c, self.h)
            self.graph = g
        except Exception as exc:  # noqa: BLE001 - whatever capture refuses runs eagerly
            warnings.warn(f"chebyshev_eigvecs: no CUDA graph ({exc}); eager", RuntimeWarning,
                          stacklevel=3)  # fmt: skip

    def __call__(self, x: torch.Tensor, centre: float, half: float) -> torch.Tensor:
        if self.graph is None:
            return self.run(x, centre, half)
        self.x.copy_(x), self.c.fill_(centre), self.h.fill_(half)
        self.graph.replay()
        return self.out


def _dense_top_eigvecs(s: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k`` leading eigenvectors of the symmetric ``s``, descending. On the CPU by
    LAPACK's partial solver (only ``k`` vectors are formed), elsewhere by ``eigh``."""
    n = s.shape[0]
    if s.device.type == "cpu":
        import scipy.linalg

        try:
            _, vec = scipy.linalg.eigh(
                s.numpy(), subset_by_index=[n - k, n - 1], driver="evx", check_finite=False
            )
            return torch.from_numpy(vec[:, ::-1].copy())
        except (np.linalg.LinAlgError, ValueError):  # pragma: no cover - LAPACK failure
            pass
    _, v = torch.linalg.eigh(s)
    return v[:, -k:].flip(1)


def _block_eigvecs(s, k: int, solver: str, *, seed: int, tol: float, max_steps: int | None,
                   max_flops: float = math.inf, then: str = "using its last Ritz vectors"):  # fmt: skip
    """``(theta, Q, info)`` of ``s`` (dense or sparse) by :func:`chebyshev_eigvecs` (``solver``
    "chebyshev"; ``max_steps`` None: ``CHEBYSHEV_STEPS``) or :func:`block_krylov_eigvecs`;
    unconverged, it warns that the caller goes on ``then``."""
    n, kw = s.shape[0], dict(dtype=s.dtype, device=s.device, seed=seed, tol=tol)
    if solver == "chebyshev":
        steps = CHEBYSHEV_STEPS if max_steps is None else max_steps
        theta, q, info = chebyshev_eigvecs(lambda x: s @ x, n, k, max_steps=steps, **kw)
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


def _top_eigvecs_arpack(s, k: int, seed: int):
    """The ``k`` leading eigenvectors (descending) of the sparse CSR ``s``: each connected
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
    q = np.zeros((n, k))
    for col, (_, idx, vec) in enumerate(sorted(pairs, key=lambda p: -p[0])[:k]):  # stable
        q[idx, col] = vec
    return torch.from_numpy(q).to(s.device, s.dtype)


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


def _relabel_by_first_appearance(labels: torch.Tensor) -> torch.Tensor:
    """Renumber clusters 0, 1, 2, ... in order of their first token (canonical ids)."""
    uniq, inverse = torch.unique(labels, return_inverse=True)
    at = torch.arange(labels.numel(), device=labels.device)
    first = at.new_full((uniq.numel(),), labels.numel()).scatter_reduce_(0, inverse, at, "amin")
    return torch.argsort(torch.argsort(first))[inverse]  # the first appearances are distinct


def _unit_rows(v: torch.Tensor) -> torch.Tensor:
    rn = v.norm(dim=1, keepdim=True)
    return torch.where(rn > 0, v / rn.clamp_min(torch.finfo(v.dtype).tiny), v)


def _discretize_rows(vectors: torch.Tensor) -> torch.Tensor:
    """:func:`discretize`'s input rows: the columns scaled to norm ``sqrt(N)``, signed so the
    first row is non-positive, the rows unit (float64, host)."""
    v = vectors.detach().to("cpu", torch.float64).clone()
    v = v / v.norm(dim=0, keepdim=True).clamp_min(torch.finfo(v.dtype).tiny) * math.sqrt(len(v))
    first = torch.sign(v[0])
    return _unit_rows(v * torch.where(first != 0, -first, torch.ones_like(first)))


def discretize(vectors: torch.Tensor, *, seed: int = 0,
               random_state: np.random.RandomState | None = None, n_iter_max: int = 20,
               max_svd_restarts: int = 30) -> torch.Tensor:  # fmt: skip
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


def label_random_state(seed: int, n: int) -> np.random.RandomState:
    """``RandomState(seed)`` advanced as scikit-learn's ``SpectralClustering`` advances it
    before ``discretize``: by ARPACK's start vector, ``uniform(-1, 1, N)``."""
    rng = np.random.RandomState(int(seed))
    rng.uniform(-1, 1, n)
    return rng


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
    if assign_labels == "discretize":
        rng = label_random_state(seed, n)
        for r in range(draws):
            out[r] = discretize(embedding, random_state=rng)
        return out
    emb = _unit_rows(embedding)
    more = np.random.RandomState(int(seed)).randint(2**31 - 1, size=draws - 1).tolist()
    for r, s in enumerate([int(seed), *more]):
        out[r] = kmeans(emb, n_clusters, seed=s, n_init=20)
    return out


@bounded()
@exact_float32
def spectral_labels(affinity: torch.Tensor, n_clusters: int, *, seed: int = 0,
                    assign_labels: str = "discretize", eigen_solver: str = "auto",
                    draws: int = 1) -> torch.Tensor:  # fmt: skip
    """``(draws, N)`` labels of a precomputed affinity: one spectral embedding, ``draws``
    label assignments from it (:func:`labels_from_embedding`). Row 0 is
    :func:`spectral_clustering`'s answer."""
    if affinity.dim() != 2 or affinity.shape[0] != affinity.shape[1]:
        raise ValueError(
            f"affinity: expected a square (N, N) matrix, got shape {tuple(affinity.shape)}"
        )
    n = affinity.shape[0]
    if not 1 <= n_clusters <= n:
        raise ValueError(f"n_clusters: expected 1 <= n_clusters <= N = {n}, got {n_clusters}")
    if assign_labels not in ("discretize", "kmeans"):
        raise ValueError(f"assign_labels: expected 'discretize' or 'kmeans', got {assign_labels!r}")
    draws = _check_draws(draws)
    if n_clusters == 1:
        return torch.zeros(draws, n, dtype=torch.long, device=affinity.device)
    emb = spectral_embedding(affinity, n_clusters, seed=seed, eigen_solver=eigen_solver)
    return labels_from_embedding(
        emb, n_clusters, seed=seed, assign_labels=assign_labels, draws=draws
    )


@bounded()
@exact_float32
def spectral_clustering(affinity: torch.Tensor, n_clusters: int, *, seed: int = 0,
                        assign_labels: str = "discretize", eigen_solver: str = "auto",
                        ) -> torch.Tensor:  # fmt: skip
    """Labels (``N``, int64, canonical ids by first appearance) of a precomputed affinity.

    ``assign_labels="discretize"`` follows scikit-learn's
    ``SpectralClustering(affinity="precomputed", assign_labels="discretize",
    random_state=seed)``, random draws included; ``"kmeans"`` runs seeded k-means on the
    row-normalised eigenvectors (Ng-Jordan-Weiss, as in Elhamifar & Vidal's code).
    ``eigen_solver``: see :func:`spectral_embedding`."""
    return spectral_labels(
        affinity, n_clusters, seed=seed, assign_labels=assign_labels, eigen_solver=eigen_solver
    )[0]


@bounded()
@exact_float32
def sparse_spectral_labels(w: torch.Tensor, n_clusters: int, *, seed: int = 0,
                           assign_labels: str = "discretize", draws: int = 1,
                           eigen_solver: str = "auto", max_steps: int = 200,
                           ) -> torch.Tensor:  # fmt: skip
    """``(draws, N)`` labels of a sparse symmetric affinity (COO), never densified: one
    embedding, ``draws`` label assignments (:func:`labels_from_embedding`). ``eigen_solver``:
    ``"arpack"`` (scipy's ``eigsh`` per connected component, to ``ARPACK_TOL``; CPU),
    ``"subspace"`` (:func:`block_krylov_eigvecs`) or ``"chebyshev"``
    (:func:`chebyshev_eigvecs`), both on the device to a block residual 1e-7 in at most
    ``max_steps`` steps (warned), or ``"auto"``: ARPACK on the CPU (6-14x faster than block
    Krylov, ``sparse_spectral_cpu.json``), Chebyshev elsewhere. Where ARPACK gives up (more
    components than ``n_clusters``, or no convergence: warned) block Krylov finishes."""
    if eigen_solver not in ("auto", "arpack", "subspace", "chebyshev"):
        raise ValueError(
            f"eigen_solver: expected 'auto', 'arpack', 'subspace' or 'chebyshev' for a sparse "
            f"affinity, got {eigen_solver!r}"
        )
    n = w.shape[0]
    if n_clusters == 1:
        return torch.zeros(draws, n, dtype=torch.long, device=w.device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # sparse CSR is "beta"
        s, dd = sparse_normalized_affinity(w)
        cpu = s.device.type == "cpu"
        if n < 4 * (n_clusters + 8):
            vecs = torch.linalg.eigh(s.to_dense())[1][:, -n_clusters:].flip(1)
        else:
            arpack = eigen_solver == "arpack" or (eigen_solver == "auto" and cpu)
            vecs = _top_eigvecs_arpack(s, n_clusters, seed) if arpack else None
        if vecs is None:
            cheb = eigen_solver == "chebyshev" or (eigen_solver == "auto" and not cpu)
            gen = torch.Generator().manual_seed(int(seed))
            start = int(torch.randint(2**31 - 1, (1,), generator=gen))  # the block's seed
            _, vecs, _ = _block_eigvecs(s, n_clusters, "chebyshev" if cheb else "krylov",
                                        seed=start, tol=1e-7, max_steps=max_steps)  # fmt: skip
    emb = vecs / dd[:, None]
    return labels_from_embedding(
        emb, n_clusters, seed=seed, assign_labels=assign_labels, draws=draws
    )


@exact_float32
def sparse_spectral_clustering(
    w: torch.Tensor, n_clusters: int, *, seed: int = 0, assign_labels: str = "discretize"
) -> torch.Tensor:
    """Spectral clustering of a sparse symmetric affinity (COO), without densifying it."""
    return sparse_spectral_labels(w, n_clusters, seed=seed, assign_labels=assign_labels)[0]


#: :func:`soft_cluster_shares`' spectral filter: its width on the normalised affinity's
#: eigenvalues, below the ``k``-th.
SOFT_SHARE_WIDTH = 1e-2


def _filtered_eigenpairs(s: torch.Tensor, k: int, width: float):
    """The leading eigenpairs of the symmetric ``s`` (float64), descending, at least down to
    ``theta_k - width`` (``theta_k`` the ``k``-th largest eigenvalue). On the CPU by LAPACK's
    MRRR for a subset (``evr``; its cost is the tridiagonal reduction, the same for any
    subset: the window is widened by doubling where it is crowded), elsewhere by ``eigh``."""
    n = s.shape[0]
    if s.device.type != "cpu":
        theta, vec = torch.linalg.eigh(s)
        return theta.flip(0), vec.flip(1)
    import scipy.linalg

    m = min(n, k + max(8, k // 2))
    while True:
        theta, vec = scipy.linalg.eigh(s.numpy(), subset_by_index=[n - m, n - 1], driver="evr",
                                       check_finite=False)  # fmt: skip
        if m == n or theta[0] < theta[-k] - width:
            return torch.from_numpy(theta[::-1].copy()), torch.from_numpy(vec[:, ::-1].copy())
        m = min(n, 2 * m)


@bounded()
def soft_cluster_shares(
    affinity: torch.Tensor, n_clusters: int, *, width: float = SOFT_SHARE_WIDTH
) -> torch.Tensor:
    """Each token's soft cluster share (``(N,)`` float64 in ``(0, 1]``), a continuous
    function of a dense symmetric affinity ``W`` (``cluster_share="soft"``, beyond the
    paper).

    The spectral embedding's rows ``u_i`` (``D^{-1/2} V``, as the paper's labels use) are
    taken through a spectral filter instead of a hard cut at ``k``: eigenvalue ``theta``
    weighs ``clamp((theta - theta_k + width) / width, 0, 1)``, so a near-tie at ``k`` (no
    eigengap) moves the embedding continuously. Two tokens belong together by the degree
    ``cos^2(u_i, u_j)``, and ``pi_j = (1/N) sum_i cos^2(u_i, u_j)`` (``O(N m^2)``, ``m`` the
    filter's eigenvectors). Where the affinity has ``k`` components and the eigengap
    exceeds ``width``, the rows of one component are parallel and those of two orthogonal,
    and ``pi_j`` is the hard share ``|c_j| / N`` exactly. Elsewhere it is NOT the paper's
    share, even where the paper's labels are stable: measured in
    ``benchmarks/bench_label_draws.py --flips`` (docs/guides/anchor-scores.md)."""
    if affinity.dim() != 2 or affinity.shape[0] != affinity.shape[1] or affinity.is_sparse:
        raise ValueError(
            f"affinity: expected a dense square (N, N) matrix, got shape {tuple(affinity.shape)}"
            + (" (sparse)" if affinity.is_sparse else "")
        )
    n = affinity.shape[0]
    if not 1 <= n_clusters <= n:
        raise ValueError(f"n_clusters: expected 1 <= n_clusters <= N = {n}, got {n_clusters}")
    if not width > 0:
        raise ValueError(f"width: expected a positive number, got {width!r}")
    s, dd = _normalized_affinity(affinity.to(torch.float64))
    theta, vec = _filtered_eigenpairs(s, n_clusters, width)
    f = ((theta - float(theta[n_clusters - 1]) + width) / width).clamp(0, 1)
    keep = f > 0
    u = _unit_rows(vec[:, keep] * f[keep].sqrt() / dd[:, None])
    return ((u @ (u.T @ u)) * u).sum(dim=1) / n


#: ``cluster_share="stable"``'s gate (:func:`paper_label_agreement`): label draws, the
#: Gaussian's scale on :func:`discretize`'s unit rows (per coordinate), and the agreements
#: at and below which the paper's share gets no weight, at and above which it gets all.
#: Measured (``label_flips_cpu.json``, ``label_expected_cpu.json``): at 1e-3 the draws kept
#: the paper's labels on the video-like sets (whose labels never flip under 1e-6 feature
#: noise; 255 of 256 on the 16-frame one) and none did on the tiny-model sets (which flip).
STABLE_DRAWS, STABLE_SCALE, STABLE_AGREE = 32, 1e-3, (0.5, 0.9)


def label_shares(labels: torch.Tensor) -> torch.Tensor:
    """The paper's cluster share ``pi_j`` (``(N,)`` float64): token ``j``'s cluster's share
    of the tokens under ``labels`` (``(N,)``, or ``(draws, N)``: averaged over the draws)."""
    lab = labels.reshape(-1, labels.shape[-1])
    return (
        torch.stack([torch.bincount(row)[row] for row in lab]).to(torch.float64).mean(0)
        / lab.shape[1]
    )


def _discretize_draws(v: torch.Tensor, start: int, n_iter_max: int = 20) -> torch.Tensor:
    """:func:`discretize`'s iterations on ``R`` sets of unit rows at once (``v``: ``(R, N,
    k)`` float64), every draw from start row ``start``: ``(R, N)`` labels, raw ids."""
    r, n, k = v.shape
    at = torch.arange(r)
    rot = v.new_zeros(r, k, k)
    rot[:, :, 0] = v[:, start]
    c = v.new_zeros(r, n)
    for j in range(1, k):
        c += torch.bmm(v, rot[:, :, j - 1 : j]).squeeze(2).abs()
        rot[:, :, j] = v[at, c.argmin(dim=1)]
    eps = torch.finfo(torch.float64).eps
    last, done = v.new_zeros(r), torch.zeros(r, dtype=torch.bool)
    out = torch.full((r, n), -1, dtype=torch.long)
    for n_iter in range(1, n_iter_max + 2):
        labels = torch.bmm(v, rot).argmax(dim=2)
        t_svd = v.new_zeros(r, k, k).scatter_add_(1, labels[:, :, None].expand(-1, -1, k), v)
        u, sv, vh = torch.linalg.svd(t_svd)
        ncut = 2.0 * (n - sv.sum(dim=1))
        stop = ((ncut - last).abs() < eps) | (n_iter > n_iter_max)
        out[stop & ~done] = labels[stop & ~done]
        done |= stop
        if bool(done.all()):
            break
        last, rot = ncut, vh.mT @ u.mT
    return out


def paper_label_agreement(embedding: torch.Tensor, *, seed: int = 0, draws: int = STABLE_DRAWS,
                          scale: float = STABLE_SCALE, labels: torch.Tensor | None = None,
                          ) -> tuple[float, torch.Tensor]:  # fmt: skip
    """How well the paper's labels survive a small move of the spectral embedding:
    ``(agreement, labels)``, ``labels`` the paper's (:func:`discretize` from
    :func:`label_random_state`, as :func:`spectral_labels`' draw 0; given: taken as they
    are, not recomputed) and ``agreement`` the share of ``draws`` label assignments that
    give the same partition when discretize's unit rows are moved by ``scale`` times a
    seeded standard Gaussian (``seed``), each from the paper's start row. Seeded: a
    deterministic function of the embedding."""
    draws = _check_draws(draws)
    n = embedding.shape[0]
    if labels is None:
        labels = discretize(embedding, random_state=label_random_state(seed, n))
    start = int(label_random_state(seed, n).randint(n))  # that draw's start row
    v = _discretize_rows(embedding)
    gen = torch.Generator().manual_seed(int(seed))
    g = torch.randn(draws, *v.shape, generator=gen, dtype=torch.float64)
    moved = _unit_rows((v + scale * g).reshape(-1, v.shape[1])).reshape(g.shape)
    same = [torch.equal(_relabel_by_first_appearance(d), labels.cpu())
            for d in _discretize_draws(moved, start)]  # fmt: skip
    return sum(same) / draws, labels


@bounded()
def stable_cluster_shares(affinity: torch.Tensor, n_clusters: int, *, seed: int = 0,
                          labels: torch.Tensor | None = None,
                          embedding: torch.Tensor | None = None, eigen_solver: str = "auto",
                          draws: int = STABLE_DRAWS, scale: float = STABLE_SCALE,
                          agree: tuple[float, float] = STABLE_AGREE) -> torch.Tensor:  # fmt: skip
    """Each token's cluster share under ``cluster_share="stable"`` (``(N,)`` float64, beyond
    the paper): ``w * hard + (1 - w) * soft``, ``hard`` the paper's share of ``labels``,
    ``soft`` :func:`soft_cluster_shares`, ``w = clamp((a - lo) / (hi - lo), 0, 1)`` for
    ``agree = (lo, hi)`` and ``a`` :func:`paper_label_agreement` on the paper's embedding.
    Where the perturbed draws keep the paper's labels (``a >= hi``) it is the paper's share
    exactly; where at most ``lo`` do it is the soft share. Between, ``w`` moves in steps of
    ``1 / (draws (hi - lo))``: no continuity is claimed there (docs/guides/anchor-scores.md).

    ``embedding``: :func:`spectral_embedding` of ``affinity`` (same ``seed`` and
    ``eigen_solver``) and ``labels``: the paper's labels from it, ``(N,)`` or ``(draws, N)``
    as :func:`labels_from_embedding` gives them (draw 0 is the discretize draw the agreement
    compares against), passed by :func:`cluster` so that neither is computed twice; None:
    computed here."""
    lo, hi = agree
    if not 0 <= lo < hi <= 1:
        raise ValueError(f"agree: expected (lo, hi) with 0 <= lo < hi <= 1, got {agree!r}")
    n = affinity.shape[0]
    if n_clusters == 1:  # one cluster: every share is 1, as the paper's
        return torch.ones(n, dtype=torch.float64, device=affinity.device)
    if embedding is None:
        embedding = spectral_embedding(affinity, n_clusters, seed=seed, eigen_solver=eigen_solver)
    paper = None if labels is None else labels.reshape(-1, n)[0]
    a, paper = paper_label_agreement(embedding, seed=seed, draws=draws, scale=scale, labels=paper)
    hard = label_shares((paper if labels is None else labels).cpu())
    w = min(max((a - lo) / (hi - lo), 0.0), 1.0)
    if w == 1.0:
        return hard.to(affinity.device)
    soft = soft_cluster_shares(affinity, n_clusters).cpu()
    return (w * hard + (1 - w) * soft).to(affinity.device)


def cluster(coef: torch.Tensor, opts, *, group=None, rank: int = 0, affinity: str = "symmetric",
            assign_labels: str = "discretize") -> tuple[torch.Tensor, torch.Tensor | None]:  # fmt: skip
    """Stage 4 of an SSC call: ``(draws, shares)``, the ``(label_draws, N)`` labels of ``C``
    (dense, or sparse COO kept sparse) into ``opts.n_clusters`` clusters, seeded by
    ``opts.seed`` (:class:`~videoanchor.anchor.options.SSCOptions`, checked), and each
    token's cluster share under ``opts.cluster_share`` (``(N,)`` float64; None for
    ``"hard"``, whose shares are read from the labels): :func:`soft_cluster_shares` or
    :func:`stable_cluster_shares`, which gets the labels' spectral embedding and labels
    instead of computing them again. ``affinity``: ``"symmetric"`` (``W = |C| + |C|^T``) or
    ``"column_max"`` (dense ``C`` only). Under a process ``group`` (every rank holds the
    same ``C``) rank 0 computes them and broadcasts them; if that fails, every rank raises."""
    n, share = coef.shape[0], getattr(opts, "cluster_share", "hard")
    draws = torch.empty(opts.label_draws, n, dtype=torch.long, device=coef.device)
    shares = None if share == "hard" else coef.new_empty(n, dtype=torch.float64)
    error = None
    if rank == 0:
        try:
            if coef.is_sparse and share != "hard":
                raise ValueError(
                    f"cluster_share={share!r} reads a dense affinity's spectrum; expected a "
                    f"dense C (mode='exact'), got a sparse one (blocked mode, N = {n})"
                )
            if coef.is_sparse:
                draws = sparse_spectral_labels(
                    sparse_ssc_affinity(coef), opts.n_clusters, seed=opts.seed,
                    draws=opts.label_draws, eigen_solver=opts.eigen_solver,
                )  # fmt: skip
            else:
                normalize = "column_max" if affinity == "column_max" else "none"
                w = ssc_affinity(coef, normalize=normalize)
                draws, shares = _labels_and_shares(w, opts, share, assign_labels)
        except Exception as exc:  # re-raised on every rank
            error = exc
    raise_together(group, error, coef.device)
    draws = draws.to(coef.device)
    shares = None if shares is None else shares.to(coef.device)
    if group is None:
        return draws, shares
    return (broadcast_from_first(draws, group),
            None if shares is None else broadcast_from_first(shares, group))  # fmt: skip


@bounded()
@exact_float32
def _labels_and_shares(w: torch.Tensor, opts, share: str, assign_labels: str):
    """:func:`cluster`'s dense part: ``(draws, shares)`` of the affinity ``w``; under
    ``"stable"`` one spectral embedding feeds both the labels and the shares."""
    k, kw = opts.n_clusters, dict(seed=opts.seed, eigen_solver=opts.eigen_solver)
    if share != "stable" or k == 1:
        draws = spectral_labels(w, k, assign_labels=assign_labels, draws=opts.label_draws, **kw)
        shares = {"hard": None, "soft": soft_cluster_shares, "stable": stable_cluster_shares}
        return draws, None if shares[share] is None else shares[share](w, k)
    if assign_labels != "discretize":
        raise ValueError(
            f"cluster_share='stable' compares against the paper's discretize labels; expected "
            f"assign_labels='discretize', got {assign_labels!r}"
        )
    emb = spectral_embedding(w, k, **kw)
    draws = labels_from_embedding(emb, k, seed=opts.seed, draws=opts.label_draws)
    return draws, stable_cluster_shares(w, k, labels=draws, embedding=emb, **kw)
