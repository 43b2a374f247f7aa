"""The SSC program solved exactly by working sets, and its per-column duality-gap certificate.

With ``Y = X^T`` (``D x N``) the program of docs/method.md section 2 separates over the
columns: column ``i`` of ``C`` and of ``E`` solve

    min_{c, e}  ||c||_1 + lambda_e ||e||_1 + (lambda_z / 2) ||y_i - Y c - e||^2
    s.t.        1^T c = 1,  c_i = 0

and no two columns share a variable (``E``'s column ``i`` belongs to column ``i`` alone).
This is a weighted lasso in ``z = [c; e]`` over the dictionary ``P = [Y, I]`` with one
equality constraint. :func:`solve_ssc_workset` solves it on every column at once, by working
sets and block principal pivoting (Kim & Park, SIAM J. Sci. Comput. 2011, here with signed
variables and the constraint's multiplier). Each outer pass:

1. finds the minimiser of each changed column's program restricted to its working set (its
   variables, padded to a common ``m``): every variable of the set is held at zero or has a
   sign; the equality-constrained quadratic program on the signed ones is one bordered
   ``(m + 1) x (m + 1)`` system per column (batched; its Gram matrix gathered from
   ``G = Y^T Y``, ``Y`` and ``I``). The infeasible variables (a signed one that came out with
   the other sign, a held one whose multiplier exceeds its l1 weight) all change state at
   once while their count falls, and :data:`BACKUP` more times when it does not; then one at
   a time (the largest violation first) until it falls again: the backup rule that keeps
   block pivoting from cycling;
2. computes every column's gradient against the sparse ``C`` and ``E`` and the KKT violations
   of the variables outside its set, and adds the worst ``grow`` of them, held at zero (the
   next pivoting signs those that violate); a column with none is solved.

The answer is the minimiser up to rounding (the signs and the supports are found, not
approximated), certified per column by :func:`duality_gaps`. Where block pivoting fails
on a column (a set at the rank, nearly dependent points: no exchange sequence ends within
``max_exchanges``), the monotone feature-sign search (:func:`_feature_sign`: one variable
leaves per line search) finishes it from its last restricted minimiser.

Its cost (times in benchmarks/results/workset_cpu.json; the split from a one-off profile):
about 900 block exchanges on 384 video-like tokens, each a batched LU of the changed columns' systems (``O(b m^3)``, a quarter of the
time) and some forty small torch operations (the rest: most exchanges move a few
straggling columns). Rank-one updates of the factors would make an exchange ``O(b m^2)``;
torch's batched LAPACK cannot express them.

**The dual** (docs/ssc.md). Dualising ``r = y_i - Y c - e`` with ``u`` and ``1^T c = 1`` with
``nu`` gives ``max u^T y_i - ||u||^2 / (2 lambda_z) + nu`` subject to
``||u||_inf <= lambda_e`` and ``|y_j^T u + nu| <= 1`` for ``j != i``. At the minimiser
``u = lambda_z clip(y_i - Y c, -t, t)`` with ``t = lambda_e / lambda_z`` (the Huber
gradient of the residual), so any ``C`` gives a dual feasible point: that ``u``, scaled by
the ``s`` that maximises the dual within feasibility, and ``nu = 1 - s max_{j != i} y_j^T u``.
"""

from __future__ import annotations

import math
import time
import warnings

import torch

from videoanchor.anchor._inputs import as_feature_tensor
from videoanchor.anchor.ssc import ADMMResult, gram_row_max, solve_ssc_admm, ssc_lambdas

__all__ = [
    "BACKUP",
    "ColumnGaps",
    "SetsTooLarge",
    "duality_gaps",
    "reference_minimiser",
    "solve_ssc_workset",
]


class SetsTooLarge(RuntimeError):
    """A column's working set outgrew ``max_set``: ``C`` is dense here (docs/ssc.md)."""


class ColumnGaps:
    """Per-column primal and dual objectives of ``C`` (float64, ``N`` each) and its
    constraint violations: ``primal``, ``dual``, ``gap`` (``(primal - dual) / primal``,
    ``primal >= 1`` where ``1^T c = 1``), ``affine`` (``max_i |1^T c_i - 1|``) and
    ``diagonal`` (``max_i |C_ii|``)."""

    def __init__(self, primal, dual, affine: float, diagonal: float):
        self.primal, self.dual = primal, dual
        self.gap = (primal - dual) / primal.abs().clamp_min(1e-300)
        self.affine, self.diagonal = affine, diagonal

    @property
    def max_gap(self) -> float:
        """The largest relative gap over the columns."""
        return float(self.gap.max())

    def objective(self) -> float:
        """The program's objective at ``C`` (``E`` at its optimum for ``C``)."""
        return float(self.primal.sum())


def duality_gaps(features, coef, lambda_e: float, lambda_z: float) -> ColumnGaps:
    """The duality-gap certificate of ``coef`` (``C``, ``N x N``) for ``features`` (``N x D``).

    Column ``i``'s primal objective (``E`` eliminated: a Huber function of the residual
    ``r = y_i - Y c_i`` with threshold ``t = lambda_e / lambda_z``) against the dual objective
    at the feasible point built from ``u = lambda_z clip(r, -t, t)`` (module docstring).
    The gap bounds the objective's distance to the minimiser where ``C`` is feasible (the
    constraint violations are returned beside it). float64 throughout, on the CPU.
    """
    y = as_feature_tensor(features).detach().to("cpu", torch.float64).T
    c = torch.as_tensor(coef).detach().to("cpu", torch.float64)
    d, n = y.shape
    if tuple(c.shape) != (n, n):
        raise ValueError(f"coef: expected {n} x {n} for {n} points, got {tuple(c.shape)}")
    t = lambda_e / lambda_z
    r = y - y @ c
    huber = torch.where(r.abs() <= t, 0.5 * lambda_z * r * r, lambda_e * (r.abs() - 0.5 * t))
    primal = c.abs().sum(dim=0) + huber.sum(dim=0)
    u = lambda_z * r.clamp(-t, t)
    g = y.T @ u  # g[j, i] = y_j^T u_i
    eye = torch.eye(n, dtype=torch.bool)
    gmax = g.masked_fill(eye, -math.inf).amax(dim=0)
    gmin = g.masked_fill(eye, math.inf).amin(dim=0)
    uy, uu = (u * y).sum(dim=0), (u * u).sum(dim=0)
    spread = gmax - gmin
    s_max = torch.where(
        spread > 0, 2.0 / spread.clamp_min(1e-300), torch.full_like(spread, math.inf)
    )
    s_max = torch.minimum(s_max, lambda_e / u.abs().amax(dim=0).clamp_min(1e-300))
    slope = uy - gmax
    s = torch.where(uu > 0, lambda_z * slope / uu.clamp_min(1e-300), torch.zeros_like(uu))
    s = torch.minimum(s.clamp_min(0.0), s_max)
    dual = s * slope - s * s * uu / (2 * lambda_z) + 1.0
    affine = float((c.sum(dim=0) - 1).abs().max())
    diagonal = float(c.diagonal().abs().max())
    return ColumnGaps(primal, dual, affine, diagonal)


#: Block exchanges that may leave a column's count of infeasible variables where it was before
#: the backup rule exchanges one variable at a time (Kim & Park's ``p``).
BACKUP = 3
#: Passes of the feature-sign fallback (it adds 8 variables per pass and removes one per line
#: search: a column left early can take a few hundred).
FALLBACK_PASSES = 1000
#: The ridge on a set's system (relative to its largest diagonal entry) and the refinement
#: steps against the unridged system that remove it where the set is not singular.
RIDGE, REFINE = 1e-11, 2


def _start_sets(start, G: torch.Tensor, n: int, d: int):
    """Each column's first working set: slot indices into ``[c; e]`` and the slots' signs."""
    if start is None:  # each column from its nearest other point (c = e_j meets 1^T c = 1)
        dist = G.diagonal()[:, None] + G.diagonal()[None, :] - 2 * G
        dist.fill_diagonal_(math.inf)
        return dist.argmin(dim=0)[:, None], torch.ones(n, 1, dtype=torch.int8)
    start_c, start_e = (torch.as_tensor(a).detach().to("cpu", torch.float64) for a in start)
    if tuple(start_c.shape) != (n, n) or tuple(start_e.shape) != (d, n):
        raise ValueError(
            f"start: expected (C, E) of shapes {(n, n)} and {(d, n)}, got "
            f"{tuple(start_c.shape)} and {tuple(start_e.shape)}"
        )
    start_c = start_c.clone()
    start_c.fill_diagonal_(0.0)
    if bool(((start_c != 0).sum(dim=0) == 0).any()):
        raise ValueError("start: every column of C needs a non-zero entry off the diagonal")
    zs = torch.cat([start_c, start_e], dim=0).T  # N x (N + D): column i's z
    on = zs != 0
    m = int(on.sum(dim=1).max())
    order = torch.argsort((~on).to(torch.int8), dim=1, stable=True)[:, :m]
    return order, torch.sign(zs.gather(1, order)).to(torch.int8)


def _solve_bordered(system: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """``system \\ rhs`` per batch entry (finite systems); one LAPACK cannot factor gives NaN."""
    m1 = system.shape[-1]
    # a tiny ridge keeps a singular set (dependent columns) bounded; refinement against the
    # unregularised system removes it where the set is not singular
    reg = system.clone()
    diag = reg.diagonal(dim1=1, dim2=2)[:, :-1]
    diag += RIDGE * diag.abs().amax(1, keepdim=True)
    eye = torch.eye(m1, dtype=reg.dtype)
    lu, piv, info = torch.linalg.lu_factor_ex(reg)
    bad = info != 0
    if bool(bad.any()):  # exactly singular despite the ridge: the identity, marked failed
        lu, piv, _ = torch.linalg.lu_factor_ex(torch.where(bad[:, None, None], eye, reg))
    b = rhs[:, :, None]
    try:
        sol = torch.linalg.lu_solve(lu, piv, b)
        for _ in range(REFINE):
            sol = sol + torch.linalg.lu_solve(lu, piv, b - system @ sol)
    except RuntimeError:  # pivots LAPACK left invalid (seen once on 512 tokens): by SVD
        inv = torch.linalg.pinv(torch.where(bad[:, None, None], eye, reg))
        sol = inv @ b
        for _ in range(REFINE):
            sol = sol + inv @ (b - system @ sol)
    sol = sol[:, :, 0]
    return sol.masked_fill(bad[:, None] | ~torch.isfinite(sol).all(dim=1, keepdim=True), math.nan)


def _pivot(K, py, a, w, state, valid, lam_z: float, tol: float, max_exchanges: int, rank: int):
    """The restricted programs' minimisers by block principal pivoting (module docstring).

    ``K`` (b x m x m), ``py`` (b x m): each set's Gram matrix and its products with the
    column's point; ``a``: 1 on coefficient slots (the constraint's), ``w``: the l1 weights;
    ``state``: -1, +1 (signed) or 0 (held at zero; also the pads, ``valid`` false). Returns
    ``z``, ``nu``, the final states and which columns were solved within ``max_exchanges``.
    At most ``rank`` variables are signed at once.
    """
    b, m = state.shape
    z = torch.zeros(b, m, dtype=torch.float64)
    nu = torch.zeros(b, dtype=torch.float64)
    state = state.clone()
    best = torch.full((b,), m + 2)
    backup = torch.full((b,), BACKUP)
    todo = torch.ones(b, dtype=torch.bool)
    unsolved = torch.zeros(b, dtype=torch.bool)
    for _ in range(max_exchanges):
        r = todo.nonzero().squeeze(1)
        if not r.numel():
            break
        Kr, pyr, ar, wr, st, vr = K[r], py[r], a[r], w[r], state[r], valid[r]
        signed = st != 0
        f = signed.to(torch.float64)
        af = ar * f
        none = af.sum(dim=1) == 0  # no coefficient signed: 1^T c = 1 cannot hold
        # [lam_z K_FF, a_F; a_F^T, 0] [z_F; -nu] = [lam_z P_F^T y_i - w_F s_F; 1]; held slots
        # (and pads) are identity rows: z = 0 there
        system = torch.zeros(r.numel(), m + 1, m + 1, dtype=torch.float64)
        system[:, :m, :m] = lam_z * Kr * f[:, :, None] * f[:, None, :] + torch.diag_embed(1 - f)
        system[:, :m, m] = af
        system[:, m, :m] = af
        system[:, m, m] = none.to(torch.float64)
        rhs = torch.cat(
            [(lam_z * pyr - wr * st) * f, torch.ones(r.numel(), 1, dtype=torch.float64)], 1
        )
        sol = _solve_bordered(system, rhs)
        failed = ~torch.isfinite(sol).all(dim=1)
        sol = sol.nan_to_num(0.0)
        zr, nur = sol[:, :m] * f, -sol[:, m]
        # each slot's l1 multiplier: w_j s_j on the signed ones at the restricted optimum
        mult = lam_z * (pyr - (Kr @ zr[:, :, None])[:, :, 0]) + nur[:, None] * ar
        wrong = signed & (zr * st < 0)
        over = ~signed & vr & (mult.abs() > wr * (1 + tol))
        # no coefficient signed: the held coefficient of largest multiplier enters (positive)
        enter = torch.where(vr & (ar > 0) & ~signed, mult, -math.inf).argmax(dim=1)
        over[none, enter[none]] = True
        infeasible = wrong | over
        count = infeasible.sum(dim=1)
        z[r], nu[r] = zr, nur
        done = (count == 0) & ~failed
        fewer = count < best[r]
        best[r] = torch.minimum(best[r], count)
        backup[r] = torch.where(fewer, BACKUP, backup[r] - 1)
        # the backup rule: one exchange (the largest violation) where the count stalled
        worst = torch.where(wrong, math.inf, torch.where(over, mult.abs() / wr, -1.0))
        single = torch.zeros_like(infeasible)
        single.scatter_(1, worst.argmax(dim=1, keepdim=True), True)
        move = torch.where((fewer | (backup[r] >= 0))[:, None], infeasible, single & infeasible)
        # at most `rank` signed variables: more are linearly dependent (P = [Y, I] has rank
        # D; one more for the constraint's border), their system singular and inconsistent
        room = rank - (signed & ~(move & wrong)).sum(dim=1)
        key = torch.where(move & over, mult.abs() / wr, -math.inf)
        place = torch.empty_like(key, dtype=torch.long)
        place.scatter_(1, key.argsort(dim=1, descending=True), torch.arange(m).expand(len(r), m))
        move = move & (wrong | (place < room[:, None]))
        sign = torch.where(none[:, None] & (ar > 0), 1.0, torch.sign(mult)).to(torch.int8)
        st = torch.where(move & wrong, 0, st)
        st = torch.where(move & over, sign, st)
        state[r] = st.to(torch.int8)
        # nothing can move (every entrant blocked by the rank): pivoting cannot go on here
        blocked = ~done & ~move.any(dim=1)
        todo[r] = ~done & ~failed & ~blocked
        unsolved[r] = failed | blocked
    return z, nu, state, ~todo & ~unsolved, unsolved


def _kkt(G, YT, C, E, nu, lam_z: float, lam_e: float):
    """Every variable's KKT violation (relative to its l1 weight), ``N x (N + D)``: row ``i``
    for column ``i``'s ``[c; e]`` (its own coefficient: -inf)."""
    n = C.shape[0]
    with warnings.catch_warnings():  # "sparse CSR support is in beta"
        warnings.simplefilter("ignore", UserWarning)
        ct, et = C.T.contiguous().to_sparse_csr(), E.T.contiguous().to_sparse_csr()
        resid = YT - ct @ YT - E.T  # r_i^T
        grad = G - ct @ G - et @ YT.T  # (Y^T r_i)^T
    mult_c = lam_z * grad + nu[:, None]
    viol = torch.cat([mult_c.abs() - 1.0, (lam_z / lam_e) * resid.abs() - 1.0], dim=1)
    viol[torch.arange(n), torch.arange(n)] = -math.inf
    return viol


def _scatter(idx, z, n: int, d: int):
    rows = torch.arange(idx.shape[0])[:, None].expand_as(idx)
    on = z != 0
    on_c, on_e = on & (idx < n), on & (idx >= n)
    C = torch.zeros(n, n, dtype=torch.float64)
    C.index_put_((idx[on_c], rows[on_c]), z[on_c], accumulate=True)
    E = torch.zeros(d, n, dtype=torch.float64)
    E.index_put_((idx[on_e] - n, rows[on_e]), z[on_e], accumulate=True)
    return C, E


def solve_ssc_workset(
    features,
    *,
    alpha_e: float = 800.0,
    alpha_z: float = 800.0,
    tol: float = 1e-9,
    grow: int = 16,
    max_set: int | None = None,
    max_passes: int = 500,
    max_exchanges: int = 200,
    start=None,
) -> ADMMResult:
    """The SSC program's minimiser for ``features`` (``N x D``) by working sets and block
    principal pivoting (module docstring), float64 on the CPU; ``coef`` is returned in
    ``features``' floating dtype.

    ``tol``: the KKT violation (relative to each variable's l1 weight) below which a
    variable stays out of its set (a tenth of it inside the set: the two multipliers differ
    by rounding, about 1e-10 of the weight, and a variable on the edge must not be added
    and dropped in turn). ``grow``: variables added per column and pass.
    ``max_set``: the most variables (coefficients and outliers) one column's working set may
    hold (None: no limit); a set that outgrows it raises :class:`SetsTooLarge`, where ``C``
    is dense and the working sets stop paying. ``max_passes``: outer passes;
    ``max_exchanges``: block exchanges per pass. ``residual`` of the result is the largest
    relative duality gap over the columns (:func:`duality_gaps`), ``iterations`` the passes,
    ``converged`` whether every column's set is optimal (no violation above ``tol``).
    ``start``: ``(C, E)`` whose non-zero entries (and their signs) are the first working sets
    (:func:`reference_minimiser` starts from the ADMM's answer); default: each point's
    nearest other point.
    """
    t0 = time.perf_counter()
    x = as_feature_tensor(features)
    out_dtype = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
    x64 = x.detach().to("cpu", torch.float64)
    n, d = x64.shape
    if n < 2:
        raise ValueError(f"SSC needs at least 2 points, got N = {n}")
    for name, value in (("grow", grow), ("max_passes", max_passes),
                        ("max_exchanges", max_exchanges)):  # fmt: skip
        if int(value) < 1:
            raise ValueError(f"{name}: expected a positive integer, got {value}")
    if not (tol >= 0):
        raise ValueError(f"tol: expected a non-negative number, got {tol}")
    G = x64 @ x64.T
    lam_e, lam_z, _, _ = ssc_lambdas(x64, alpha_e, alpha_z, row_max=gram_row_max(x64, gram=G))
    YT = x64  # N x D
    nd = n + d
    # [[G, Y^T], [Y, I]] and a pad row and column (zero, a one on the diagonal)
    kfull = torch.zeros(nd + 1, nd + 1, dtype=torch.float64)
    kfull[:n, :n] = G
    kfull[n:nd, :n] = YT.T
    kfull[:n, n:nd] = YT
    kfull[n:, n:].fill_diagonal_(1.0)
    wfull = torch.ones(nd + 1, dtype=torch.float64)
    wfull[n:nd] = lam_e
    cap = nd if max_set is None else int(max_set)
    t1 = time.perf_counter()
    idx, state = _start_sets(start, G, n, d)
    valid = state != 0
    z = torch.zeros(idx.shape, dtype=torch.float64)
    nu = torch.zeros(n, dtype=torch.float64)
    pending = torch.ones(n, dtype=torch.bool)  # columns whose set changed
    # each column's last restricted minimiser (on the constraint, its signs consistent): at
    # first its nearest point
    nearest = _start_sets(None, G, n, d)[0]
    C_ok, E_ok = _scatter(nearest, torch.ones(nearest.shape, dtype=torch.float64), n, d)
    stuck = torch.zeros(n, dtype=torch.bool)  # pivoting failed, blocked or cycled there
    passes = 0
    while True:
        if int(valid.sum(dim=1).max()) > cap:
            raise SetsTooLarge(
                f"a column's working set needs {int(valid.sum(dim=1).max())} variables, above "
                f"max_set = {cap} (C or E is dense on these {n} points)"
            )
        passes += 1
        r = pending.nonzero().squeeze(1)
        ia = idx[r].masked_fill(~valid[r], nd)
        K = kfull.take(ia[:, :, None] * (nd + 1) + ia[:, None, :])
        a = ((ia < n) & valid[r]).to(torch.float64)
        zr, nur, st, ok, lost = _pivot(K, kfull[ia, r[:, None]], a, wfull[ia], state[r], valid[r],
                                 lam_z, tol / 10, int(max_exchanges), d + 1)  # fmt: skip
        z[r], nu[r], state[r] = zr, nur, st
        # pivoting failed, blocked or still exchanging after max_exchanges (block pivoting can
        # cycle where the sets are nearly dependent): the fallback takes the column from its
        # last restricted minimiser
        stuck[r] = ~ok
        C, E = _scatter(idx, z * valid, n, d)
        solved = torch.zeros(n, dtype=torch.bool)
        solved[r] = ok
        C_ok[:, solved], E_ok[:, solved] = C[:, solved], E[:, solved]
        viol = _kkt(G, YT, C, E, nu, lam_z, lam_e)
        held = torch.zeros(viol.shape, dtype=torch.int32).scatter_add_(
            1, idx, valid.to(torch.int32)
        )
        viol.masked_fill_(held > 0, -math.inf)
        top, new = viol.topk(min(int(grow), nd), dim=1)
        add = (top > tol) & ~stuck[:, None]
        pending = add.any(dim=1)
        if not bool(pending.any()) or passes >= int(max_passes):
            break
        # the next sets: the signed variables, and the new ones (held: pivoting signs them)
        keep = valid & (state != 0)
        idx = torch.cat([idx.masked_fill(~keep, 0), new.masked_fill(~add, 0)], dim=1)
        state = torch.cat([state * keep, torch.zeros(add.shape, dtype=torch.int8)], dim=1)
        z = torch.cat([z * keep, torch.zeros(add.shape, dtype=torch.float64)], dim=1)
        valid = torch.cat([keep, add], dim=1)
        width = int(valid.sum(dim=1).max())
        order = torch.argsort((~valid).to(torch.int8), dim=1, stable=True)[:, :width]
        idx, state, z, valid = (t.gather(1, order) for t in (idx, state, z, valid))
    if bool(stuck.any()):  # the columns block pivoting left: feature-sign, from the others' answer
        C[:, stuck], E[:, stuck] = C_ok[:, stuck], E_ok[:, stuck]
        pad_free = wfull.clone()
        pad_free[nd] = 0.0
        C, E, more, solved = _feature_sign(G, YT, kfull, pad_free, lam_e, lam_z, C, E, tol=tol,
                                           cap=cap, max_passes=FALLBACK_PASSES)  # fmt: skip
        pending = pending & ~torch.tensor(solved)
        stuck[:] = not solved
        passes += more
    converged = not bool(pending.any() or stuck.any())
    t2 = time.perf_counter()
    gaps = duality_gaps(x64, C, lam_e, lam_z)
    t3 = time.perf_counter()
    return ADMMResult(
        coef=C.to(x.device, out_dtype),
        iterations=passes,
        converged=converged,
        residual=gaps.max_gap,
        lambda_e=lam_e,
        lambda_z=lam_z,
        rho=0.0,
        strategy="workset",
        outliers=E.to(x.device, out_dtype),
        timings={"lambdas": t1 - t0, "workset": t2 - t1, "certificate": t3 - t2},
    )


class _State:
    """The working sets of the unsolved columns, padded to ``m`` slots."""

    def __init__(self, cols, idx, z, theta, active, stall):
        self.cols, self.idx, self.z, self.theta, self.active = cols, idx, z, theta, active
        self.stall = stall  # the last step made no progress: grow this column by one

    def take(self, keep):
        return _State(self.cols[keep], self.idx[keep], self.z[keep], self.theta[keep],
                      self.active[keep], self.stall[keep])  # fmt: skip

    def widen(self, m: int):
        extra = m - self.idx.shape[1]
        if extra <= 0:
            return
        b = self.idx.shape[0]
        self.idx = torch.cat([self.idx, self.idx.new_zeros(b, extra)], dim=1)
        self.z = torch.cat([self.z, self.z.new_zeros(b, extra)], dim=1)
        self.theta = torch.cat([self.theta, self.theta.new_zeros(b, extra)], dim=1)
        self.active = torch.cat([self.active, self.active.new_zeros(b, extra)], dim=1)


def _feature_sign(G, YT, kfull, wfull, lam_e: float, lam_z: float, start_c, start_e, *,
                  tol: float, cap: int, max_passes: int, grow: int = 8):  # fmt: skip
    """The SSC program's minimiser by the feature-sign search of Lee, Battle, Raina & Ng (NIPS
    2006) with the constraint's multiplier: one bordered system per column and pass, a line
    search that stops where a coefficient crosses zero. Monotone where block pivoting is
    not (a set of more than ``D + 1`` variables, dependent points): the fallback of
    :func:`solve_ssc_workset` for the columns its pivoting left unsolved, on its Gram
    matrices (``kfull``, ``wfull``: the pad's weight is 0 here) and from ``(start_c,
    start_e)`` (their supports and values, moved onto ``1^T c = 1``; every column of
    ``start_c`` has a non-zero entry). ``tol``, ``cap`` (``max_set``) and ``max_passes`` as in
    :func:`solve_ssc_workset`; ``grow``: variables added per column and pass. Returns ``C``,
    ``E``, the passes and whether every column's set is optimal.
    """
    n, d = G.shape[0], YT.shape[1]
    weights_e = lam_e
    start_c = start_c.clone()
    start_c.fill_diagonal_(0.0)
    on = start_c != 0
    start_c = start_c + on * ((1 - start_c.sum(dim=0)) / on.sum(dim=0))[None, :]
    zs = torch.cat([start_c, start_e], dim=0).T  # N x (N + D): column i's z
    on = zs != 0
    widest = int(on.sum(dim=1).max())
    m = max(16, widest)
    if widest > cap:
        raise SetsTooLarge(
            f"a column's start holds {widest} variables, above max_set = {cap} "
            f"(C or E is dense on these {n} points)"
        )
    order = torch.argsort((~on).to(torch.int8), dim=1, stable=True)[:, :m]
    active = on.gather(1, order)
    idx = order.masked_fill(~active, 0)
    z = zs.gather(1, order) * active
    theta = torch.sign(z)
    st = _State(torch.arange(n), idx, z, theta, active, torch.zeros(n, dtype=torch.bool))
    C = torch.zeros(n, n, dtype=torch.float64)
    E = torch.zeros(d, n, dtype=torch.float64)
    passes, converged = 0, True

    while st.cols.numel():
        passes += 1
        if passes > max_passes:
            converged = False
            break
        b, m = st.idx.shape
        # P_A^T P_A and P_A^T y_i gathered from [[G, Y^T], [Y, I]] (pads: its last row and
        # column, zero but for a one on the diagonal)
        ia = st.idx.masked_fill(~st.active, n + d)
        K = kfull.take(ia[:, :, None] * (n + d + 1) + ia[:, None, :])
        py = kfull[ia, st.cols[:, None]]
        a = ((ia < n) & st.active).to(K.dtype)
        w = wfull[ia]
        # [lam_z K, a; a^T, 0] [z; -nu] = [lam_z P^T y - w theta; 1]
        kkt = torch.zeros(b, m + 1, m + 1, dtype=torch.float64)
        kkt[:, :m, :m] = lam_z * K
        kkt[:, :m, m] = a
        kkt[:, m, :m] = a
        rhs = torch.cat([lam_z * py - w * st.theta, torch.ones(b, 1, dtype=torch.float64)], 1)
        # a system LAPACK cannot factor gives NaN: its column stays where it is this pass
        sol = _solve_bordered(kkt, rhs)
        solved = torch.isfinite(sol).all(dim=1, keepdim=True)
        sol = torch.where(solved, sol, 0.0)
        z_new = torch.where(sol[:, m:].abs() > 0, sol[:, :m], st.z) * st.active  # failed: stay
        nu = -sol[:, m]
        # exact line search of the objective (convex, piecewise quadratic in the step s) on
        # the segment to the solution: its pieces end where a coefficient crosses zero
        dz = z_new - st.z
        bp = -st.z / torch.where(dz != 0, dz, 1.0)
        valid = (bp > 0) & (bp < 1) & st.active & (dz != 0)
        bp = torch.where(valid, bp, 1.0)
        ends, order = bp.sort(dim=1)
        lo = torch.cat([torch.zeros(b, 1, dtype=torch.float64), ends[:, :-1]], 1)
        hi = ends
        # the l1 term's slope on each piece: it grows by 2 w |dz| where a coefficient crosses
        sg0 = torch.where(st.z != 0, torch.sign(st.z), torch.sign(dz))
        slope0 = (w * sg0 * dz).sum(1, keepdim=True)
        jump = torch.where(valid, 2 * w * dz.abs(), 0.0).gather(1, order).cumsum(1)
        slopes = slope0 + torch.cat([torch.zeros(b, 1, dtype=torch.float64), jump[:, :-1]], 1)
        l1_lo = (w * st.z.abs()).sum(1, keepdim=True) + torch.cat(
            [torch.zeros(b, 1, dtype=torch.float64), (slopes * (hi - lo)).cumsum(1)[:, :-1]], 1
        )
        kz = (K @ st.z[:, :, None])[:, :, 0]
        lin = ((py - kz) * dz).sum(dim=1, keepdim=True)
        quad = (dz * (K @ dz[:, :, None])[:, :, 0]).sum(dim=1, keepdim=True)
        # each piece's minimiser: its stationary point, or (quad rounded to <= 0) an end
        stat = torch.where(quad > 0, (lam_z * lin - slopes) / (lam_z * quad).clamp_min(1e-300), lo)
        cands = torch.stack([torch.minimum(torch.maximum(stat, lo), hi), lo, hi])
        fs = l1_lo + slopes * (cands - lo) - lam_z * cands * lin + 0.5 * lam_z * cands**2 * quad
        pick = torch.nan_to_num(fs, nan=math.inf).argmin(dim=0, keepdim=True)
        cand = cands.gather(0, pick)[0]
        f = fs.gather(0, pick)[0]
        best = torch.nan_to_num(f, nan=math.inf).argmin(dim=1)
        s_best = cand.gather(1, best[:, None])
        z_next = st.z + s_best * dz
        z_next = torch.where(valid & (bp == s_best), 0.0, z_next)
        consistent = ((torch.sign(z_new) == st.theta) | ~st.active | (z_new == 0)).all(dim=1)
        # the set's solution reached with its signs: the set is solved (rounding aside)
        f1 = (w * z_new.abs()).sum(1) - lam_z * lin[:, 0] + 0.5 * lam_z * quad[:, 0]
        f_best = f.gather(1, best[:, None])[:, 0]
        scale = (w * st.z.abs()).sum(1) + f_best.abs()
        full = consistent & ((s_best[:, 0] > 1 - 1e-9) | (f1 <= f_best + 1e-13 * scale))
        # no descent (rounding): stay where we are
        worse = ~full & (f_best >= l1_lo[:, 0])
        s_best = torch.where(worse[:, None], 0.0, s_best)
        z_next = torch.where(worse[:, None], st.z, z_next)
        # no step: some added variable's sign is wrong in the set's solution (feature-sign
        # descends for one added variable at a time): this column grows by one next time
        st.stall = st.stall | (~full & (s_best[:, 0] == 0))
        z_next = torch.where(full[:, None], z_new, z_next)
        st.z = z_next * st.active
        st.active = st.active & (st.z != 0)
        st.theta = torch.sign(st.z)
        st.idx = st.idx.masked_fill(~st.active, 0)
        if not bool(full.any()):
            continue
        # the columns at their set's optimum: KKT violations outside the set
        fi = full.nonzero().squeeze(1)
        cols, zi, ii, act = st.cols[fi], st.z[fi], st.idx[fi], st.active[fi]
        nf = fi.numel()
        rows = torch.arange(nf)[:, None].expand_as(ii)
        on_c, on_e = act & (ii < n), act & (ii >= n)
        zc = torch.zeros(nf, n, dtype=torch.float64)
        zc.index_put_((rows[on_c], ii[on_c]), zi[on_c], accumulate=True)
        ze = torch.zeros(nf, d, dtype=torch.float64)
        ze.index_put_((rows[on_e], ii[on_e] - n), zi[on_e], accumulate=True)
        with warnings.catch_warnings():  # "sparse CSR support is in beta"
            warnings.simplefilter("ignore", UserWarning)
            zcs, zes = zc.to_sparse_csr(), ze.to_sparse_csr()
        resid = YT[cols] - (zcs @ YT) - ze  # r^T: nf x D
        grad_c = G[cols] - (zcs @ G) - (zes @ YT.T.contiguous())  # Y^T r
        viol_c = (lam_z * grad_c + nu[fi, None]).abs() - 1.0
        sign_c = torch.sign(lam_z * grad_c + nu[fi, None])
        viol_e = (lam_z * resid).abs() / weights_e - 1.0
        sign_e = torch.sign(resid)
        viol_c[torch.arange(nf), cols] = -math.inf
        viol_c.masked_fill_(zc != 0, -math.inf)
        viol_e.masked_fill_(ze != 0, -math.inf)
        viol = torch.cat([viol_c, viol_e], dim=1)
        sgn = torch.cat([sign_c, sign_e], dim=1)
        k = min(int(grow), n + d)
        top_v, top_i = viol.topk(k, dim=1)
        grows = torch.where(st.stall[fi], 1, min(int(grow), k))
        add = (top_v > tol) & (torch.arange(k)[None, :] < grows[:, None])
        st.stall[fi] = False
        done = ~add.any(dim=1)
        for j, c_i in enumerate(cols.tolist()):  # record the solved columns (few per pass)
            if done[j]:
                C[:, c_i] = zc[j]
                E[:, c_i] = ze[j]
        need = int((act.sum(dim=1) + add.sum(dim=1)).max())
        if need > cap:
            raise SetsTooLarge(
                f"a column's working set needs {need} variables, above max_set = {cap} "
                f"(C is dense on these {n} points)"
            )
        if need > st.idx.shape[1]:
            st.widen(max(need, 2 * st.idx.shape[1]))
            ii, act = st.idx[fi], st.active[fi]
            zi = st.z[fi]
        # new variables into free slots (free slots first, in order)
        free = torch.argsort(act.to(torch.int8), dim=1, stable=True)[:, :k]
        slot_rows = torch.arange(nf)[:, None].expand(nf, k)
        new_sign = sgn.gather(1, top_i)
        ii = ii.clone()
        ii[slot_rows[add], free[add]] = top_i[add]
        th = st.theta[fi].clone()
        th[slot_rows[add], free[add]] = new_sign[add]
        act = act.clone()
        act[slot_rows[add], free[add]] = True
        st.idx[fi], st.theta[fi], st.active[fi] = ii, th, act
        keep = torch.ones(b, dtype=torch.bool)
        keep[fi[done]] = False
        st = st.take(keep)
        if st.cols.numel():
            width = int(st.active.sum(dim=1).max()) + 1
            if width < st.idx.shape[1] // 2 and width >= 16:  # narrow the padding again
                order = torch.argsort((~st.active).to(torch.int8), dim=1, stable=True)[:, :width]
                st = _State(st.cols, st.idx.gather(1, order), st.z.gather(1, order),
                            st.theta.gather(1, order), st.active.gather(1, order),
                            st.stall)  # fmt: skip
    if not converged:  # the unsolved columns: their last iterate (feasible)
        for j, c_i in enumerate(st.cols.tolist()):
            for slot in st.active[j].nonzero().squeeze(1).tolist():
                v = int(st.idx[j, slot])
                if v < n:
                    C[v, c_i] = st.z[j, slot]
                else:
                    E[v - n, c_i] = st.z[j, slot]
    return C, E, passes, converged


def reference_minimiser(features, *, alpha_e: float = 800.0, alpha_z: float = 800.0,
                        gap: float = 1e-9, admm_eps: float = 1e-7, max_iter: int = 10000,
                        max_passes: int = 200, memory: int = 4 << 30) -> ADMMResult:  # fmt: skip
    """The program's minimiser for ``features`` in float64, certified: every column's
    relative duality gap below ``gap`` (:func:`duality_gaps`), else ``converged=False``.

    First :func:`solve_ssc_workset` from each point's nearest other point, with working sets
    of at most ``max(64, N / 4)`` variables (where ``C`` is sparse: video-like tokens); where
    it certifies every column, that is the answer. Else the ADMM (float64, over-relaxed,
    residual balancing) to ``admm_eps`` finds the supports and signs, and the working sets
    started there solve the program on them exactly and add what the ADMM missed. Each run of
    the working sets takes at most ``max_passes`` passes and sets whose batched systems fit in
    ``memory`` bytes. The best certified answer of these is returned: the ADMM's own
    (``strategy="admm"``) where the working sets did not fit (``C`` or the outlier term dense:
    Yale B faces) or ended further from the minimiser, its certified gap as ``residual``.
    ``iterations`` counts the ADMM's iterations and the working-set passes; ``timings`` has
    both.
    """
    x = as_feature_tensor(features).detach().to("cpu", torch.float64)
    n = x.shape[0]
    # K, the bordered system, its copy, its LU and the gather's indices: ~48 bytes per entry
    fits = max(2, int(math.sqrt(memory / (48 * n))))

    def sets(start, max_set):
        try:
            return solve_ssc_workset(x, alpha_e=alpha_e, alpha_z=alpha_z,
                                     max_set=max_set, start=start, max_passes=max_passes)  # fmt: skip
        except SetsTooLarge:
            return None

    direct = sets(None, min(fits, max(64, n // 4)))
    if direct is not None and direct.residual < gap:
        direct.converged = True
        return direct
    admm = solve_ssc_admm(x, alpha_e=alpha_e, alpha_z=alpha_z, dtype=torch.float64,
                          eps=admm_eps, max_iter=max_iter, relax=1.8, adaptive_rho=True,
                          progress=False)  # fmt: skip
    admm.residual = duality_gaps(x, admm.coef, admm.lambda_e, admm.lambda_z).max_gap
    admm.strategy, admm.timings = "admm", {"admm": sum(admm.timings.values())}
    polished = sets((admm.coef, admm.outliers), fits)
    if polished is not None:
        polished.iterations += admm.iterations
        polished.timings = {**admm.timings, **polished.timings}
    answers = [a for a in (polished, direct, admm) if a is not None]
    best = min(answers, key=lambda a: a.residual if math.isfinite(a.residual) else math.inf)
    best.converged = bool(best.residual < gap)
    return best
