"""The SSC program (docs/method.md section 2) in one place: its parameters, its objective,
its dual and the certificate that every solver's answer is judged by.

With ``Y = X^T`` (``D x N``, one column per point) the program is

    min_{C, E}  ||C||_1 + lambda_e ||E||_1 + (lambda_z / 2) ||Y - Y C - E||_F^2
    s.t.        1^T C = 1^T,  diag(C) = 0

with ``lambda_e = alpha_e / mu_e`` and ``lambda_z = alpha_z / mu_z`` (:func:`ssc_lambdas`,
the authors' definitions). It separates over the columns, and ``E`` has a closed form for a
given ``C``: the **datafit** of column ``i`` is a Huber function of its residual
``r = y_i - Y c_i`` with threshold ``t = lambda_e / lambda_z`` (:func:`huber`), and the
**penalty** is ``||c_i||_1`` on the affine set ``1^T c_i = 1`` with ``c_ii = 0``.

**The dual** (docs/ssc.md). Dualising ``r = y_i - Y c - e`` with ``u`` and ``1^T c = 1`` with
``nu`` gives ``max u^T y_i - ||u||^2 / (2 lambda_z) + nu`` subject to
``||u||_inf <= lambda_e`` and ``|y_j^T u + nu| <= 1`` for ``j != i``. At the minimiser
``u = lambda_z clip(y_i - Y c, -t, t)`` with ``t = lambda_e / lambda_z`` (the Huber
gradient of the residual), so any ``C`` gives a dual feasible point: that ``u``, scaled by
the ``s`` that maximises the dual within feasibility, and ``nu = 1 - s max_{j != i} y_j^T u``.

Every solver's answer, the reference minimiser and the benchmarks are judged by
:func:`duality_gaps`; the working-set kernel takes the lambdas from here.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field, fields

import array_api_compat
import torch

from videoanchor.anchor._inputs import as_feature_tensor
from videoanchor.anchor.options import DARK_RULES

__all__ = [
    "DARK_RULES",
    "DARK_TOKEN",
    "SSCSolution",
    "ColumnGaps",
    "block_gaps",
    "screen_error",
    "column_gaps",
    "dark_tokens",
    "duality_gaps",
    "gram_row_max",
    "huber",
    "nearest_points",
    "ssc_lambdas",
]


_RUN = {"run": True}
#: the candidates per column whose y_j^T u_i the certificate from G takes again directly
#: (the largest and the smallest of its column): G's cancellation reorders near-ties
TOP = 4


@dataclass(kw_only=True)
class SSCSolution:
    """``C`` and how it was found: the one result type of every SSC solver and entry point
    (:class:`~videoanchor.anchor.scores.AnchorResult` and
    :class:`~videoanchor.anchor.scores.SSCResult` add their labels and scores to it).

    ``coef``: ``C`` (``N x N``, column ``i`` reconstructs point ``i``, zero diagonal; dense,
    or sparse COO from the column-blocked solver); ``iterations``, ``converged``,
    ``residual``: the solver's (the working sets: the most passes a column took, whether
    every column certified, the largest relative duality gap of their float64 answer);
    ``lambda_e``, ``lambda_z``:
    the program's parameters (:func:`ssc_lambdas`); ``solver``: the solver that answered;
    ``gap``: the largest relative duality gap over the columns of the ``coef`` returned, in
    its dtype (:func:`column_gaps` on it, in float64), where the solver computed one (the
    working sets, and the fast answer they fall back to), else None; ``timings``:
    seconds per stage; ``backend``: the array library that ran; ``strategy``: how the solver
    went about it (the authors' iteration's A-step, ``"dense"`` or ``"woodbury"``; the fast
    solver's factor, ``"dense"``, ``"thin"`` or ``"low_rank"``; the working sets' route,
    ``"workset"``, ``"workset_hard"`` or ``"workset_warm"``).

    What a solver adds about its run (not carried by the entry points' results): ``rho``
    (the last), ``rho_changes``, ``outliers`` (``E``), ``history`` (residuals; per block in
    blocked mode), ``stopped`` (a ``progress`` hook ended the run), and blocked mode's
    ``block_columns``, ``block_iterations``, ``block_residuals`` (one per block, in column
    order) and ``world_size``.
    """

    coef: torch.Tensor
    iterations: int
    converged: bool
    residual: float
    lambda_e: float
    lambda_z: float
    solver: str | None = None
    gap: float | None = None
    timings: dict[str, float] = field(default_factory=dict)
    backend: str = "torch"
    strategy: str = ""
    # the run's own record (metadata "run": an entry point's result leaves it at its default)
    rho: float | None = field(default=None, repr=False, metadata=_RUN)
    rho_changes: int = field(default=0, repr=False, metadata=_RUN)
    outliers: torch.Tensor | None = field(default=None, repr=False, metadata=_RUN)
    history: list | dict = field(default_factory=list, repr=False, metadata=_RUN)
    stopped: bool = field(default=False, repr=False, metadata=_RUN)
    block_columns: int = field(default=0, repr=False, metadata=_RUN)
    block_iterations: list[int] = field(default_factory=list, repr=False, metadata=_RUN)
    block_residuals: list[float] = field(default_factory=list, repr=False, metadata=_RUN)
    world_size: int = field(default=1, repr=False, metadata=_RUN)

    @classmethod
    def from_run(cls, out, **given) -> SSCSolution:
        """The result of a run of :func:`videoanchor.anchor.solvers.admm_steps.run` (``out``, its
        :class:`~videoanchor.anchor.solvers.admm_steps.Outcome`) with the fields ``given``."""
        return cls(iterations=out.iterations, converged=out.converged, stopped=out.stopped,
                   residual=out.residual, **given)  # fmt: skip

    @classmethod
    def certified(cls, y: torch.Tensor, coef, outliers, lambda_e: float, lambda_z: float, *,
                  like: torch.Tensor, dtype, timings: dict, gram: torch.Tensor | None = None,
                  support: torch.Tensor | None = None, **given) -> SSCSolution:  # fmt: skip
        """The working sets' ``C`` and ``E`` (float64, of the program on ``y``: ``Y``,
        ``D x N``, float64) as a result in ``dtype`` on ``like``'s device, with the fields
        ``given``, certified (:func:`column_gaps`, largest relative duality gap): ``residual``
        is the float64 answer's (what the solver reached: the routes decide on it), ``gap``
        that of the ``C`` returned, in ``dtype`` (float32's rounding alone leaves ~1e-6 to
        1e-4: issue 79; the same number for float64). ``gram`` (``Y^T Y``, float64, on
        ``y``'s device) where the caller has it: the certificate from G and ``C``'s non-zeros
        (``support``: where they can be, as :func:`column_gaps` takes it), no dense product.
        The certificates' floats are read in one copy. ``timings`` gains ``"certificate"``."""
        t = time.perf_counter()
        out = coef.to(like.device, dtype)
        if gram is not None and support is None:  # (found once: rounding adds none)
            support = torch.stack(torch.nonzero(coef, as_tuple=True))
        kw = dict(gram=gram, support=support, read=False)
        checks = [column_gaps(y, coef, lambda_e, lambda_z, **kw)]
        if out.dtype != coef.dtype:  # the certificate of what is returned
            checks.append(column_gaps(y, out.to(y.device, y.dtype), lambda_e, lambda_z, **kw))
        values = torch.cat([g.summary for g in checks]).tolist()  # one host read
        at = 0
        for g in checks:
            size = g.summary.numel()
            g.take(values[at : at + size])
            at += size
        reached, gap = checks[0].max_gap, checks[-1].max_gap
        return cls(coef=out, outliers=outliers.to(like.device, dtype), residual=reached,
                   gap=gap, lambda_e=lambda_e, lambda_z=lambda_z, rho=0.0,
                   timings={**timings, "certificate": time.perf_counter() - t}, **given)  # fmt: skip

    def uncertified(self, y: torch.Tensor, why: str) -> SSCSolution:
        """This answer (the fast solver's) where the working sets did not certify the
        program on ``y`` (``Y``, ``D x N``, float64): its relative duality gap as ``gap``,
        and one warning that says ``why`` and gives the gap."""
        y = y.to(torch.float64)
        self.gap = column_gaps(y, self.coef.to(y.device, torch.float64), self.lambda_e,
                               self.lambda_z).max_gap  # fmt: skip
        warnings.warn(f"SSC: {why}; the answer is the fast solver's, not certified: relative "
                      f"duality gap {self.gap:.3g}", UserWarning, stacklevel=4)  # fmt: skip
        return self

    def answer(self, **more) -> dict:
        """The fields an entry point's result carries (``C``, the parameters, the solver and
        its gap, timings and backend, not the run's own record), updated with ``more``."""
        keep = (f.name for f in fields(SSCSolution) if not f.metadata.get("run"))
        return {**{k: getattr(self, k) for k in keep}, **more}


def nearest_points(gram: torch.Tensor, cols: torch.Tensor | None = None) -> torch.Tensor:
    """Each point's nearest other point (``N``, long) from the Gram matrix ``gram`` of the
    points (``N x N``): every column's start from nothing, ``c = e_j``. ``cols``: those
    points' only (long), an ``N x |cols|`` pass."""
    if cols is None:
        dist = gram.diagonal()[:, None] + gram.diagonal()[None, :] - 2 * gram
        dist.fill_diagonal_(math.inf)
    else:
        dist = gram.diagonal()[:, None] + gram.diagonal()[cols][None, :] - 2 * gram[:, cols]
        dist[cols, torch.arange(len(cols))] = math.inf
    return dist.argmin(dim=0)


def huber(r: torch.Tensor, lambda_e: float, lambda_z: float) -> torch.Tensor:
    """The datafit of a residual ``r`` with ``E`` eliminated, entrywise:
    ``min_e lambda_e |e| + (lambda_z / 2) (r - e)^2``, quadratic up to ``t = lambda_e /
    lambda_z`` and linear above."""
    t = lambda_e / lambda_z
    a = r.abs()
    return torch.where(a <= t, 0.5 * lambda_z * r * r, lambda_e * (a - 0.5 * t))


def ssc_lambdas(x, alpha_e: float, alpha_z: float, *, block: int = 4096, gram=None,
                row_max=None, dark: str = "authors", warn: bool = True):  # fmt: skip
    """``(lambda_e, lambda_z, mu_e, mu_z)`` for points ``x`` (``N x D``, one row per point).

    ``mu_e = min_i max_{j != i} ||y_j||_1`` and ``mu_z = min_i max_{j != i} |y_i^T y_j|``,
    computed without the authors' ``O(N^2)`` Python loop: ``mu_e`` is the second largest
    point L1 norm, ``mu_z`` a blocked pass over the Gram matrix (no ``N x N`` allocation),
    or read off ``gram`` (``x x^T``) where the caller has it already, or the minimum of
    ``row_max`` (:func:`gram_row_max`) where the caller has that.

    Dark tokens (:func:`dark_tokens`: ``max_{j != i} |y_i^T y_j|`` below :data:`DARK_TOKEN`
    times the median token's) set ``mu_z`` far below the others'; ``dark``: ``"authors"``
    (their definition, the minimum over every token) or ``"ignore"`` (the minimum over the
    tokens that are not dark: ``lambda_z`` as without them; the dark tokens' columns are
    still solved, held by the affine constraint, their data term near zero). ``warn``:
    one warning that names them (a caller that computed the lambdas once already passes
    False). Any array-API array (torch, NumPy, CuPy).
    """
    if dark not in DARK_RULES:
        raise ValueError(f"dark: expected one of {DARK_RULES}, got {dark!r}")
    xp = array_api_compat.array_namespace(x)
    n = x.shape[0]
    if n < 2:
        raise ValueError(f"SSC needs at least 2 points, got {n}")
    norms = xp.sum(xp.abs(x), axis=1, dtype=xp.float64)
    if row_max is None:
        row_max = gram_row_max(x, block=block, gram=gram)
    # mu_e, mu_z and the median token's max |y_i^T y_j|: one host read
    mu_e, mu_z, median = (float(v) for v in xp.stack(
        [xp.sort(norms)[-2], xp.min(row_max), xp.sort(row_max)[(n - 1) // 2]]).tolist())  # fmt: skip
    if not (mu_e > 0):
        raise ValueError("SSC: at most one point is non-zero (mu_e = 0); lambda_e is undefined")
    low = mu_z
    if dark == "ignore" and low < DARK_TOKEN * median:  # the least of the others
        mu_z = float(xp.min(xp.where(row_max < DARK_TOKEN * median, math.inf, row_max)))
    if not (mu_z > 0):
        raise ValueError(
            "SSC: some point is orthogonal to every other point (mu_z = 0); lambda_z is undefined"
        )
    # (the tokens are read only where there are some: no device sync otherwise)
    found = dark_tokens(row_max) if warn and low < DARK_TOKEN * median else []
    if found:
        named = ", ".join(map(str, found[:DARK_NAMED]))
        more = f" and {len(found) - DARK_NAMED} more" if len(found) > DARK_NAMED else ""
        worst = int(xp.argmin(row_max))
        what = (f"mu_z = {mu_z:.3g} is the least of the other tokens' (dark_tokens='ignore'),"
                f" not token {worst}'s {low:.3g}"
                if dark == "ignore" else
                f"token {worst} sets mu_z = {low:.3g}, {median / low:.3g} times below the "
                "median: lambda_z = alpha_z / mu_z (the authors' definition) is that much "
                "larger for every token, C turns dense and the solvers slow; "
                "dark_tokens='ignore' takes mu_z from the other tokens")  # fmt: skip
        warnings.warn(
            f"features: {len(found)} token(s) ({named}{more}) have a max |y_i^T y_j| "
            f"{1 / DARK_TOKEN:g}x or more below the median token's ({median:.3g}); {what} "
            "(near-black or constant tokens: letterbox bars, a black frame, a fade); drop or "
            "mask such tokens if they are not content",
            UserWarning,
            stacklevel=2,
        )
    return alpha_e / mu_e, alpha_z / mu_z, mu_e, mu_z


#: :func:`ssc_lambdas` warns where one token's ``max_(j != i) |y_i^T y_j|`` (which sets
#: ``mu_z``) is below this share of the median token's (issue 66: a few near-black tokens
#: raised ``lambda_z`` 1.4e5-fold and made ``C`` dense; Yale B's darkest faces sit at
#: 0.001-0.06, synthetic and model tokens at 0.4-0.96)
DARK_TOKEN = 1e-2
#: The dark tokens a warning names by index (then a count)
DARK_NAMED = 8


def dark_tokens(row_max) -> list[int]:
    """The tokens whose ``max_{j != i} |y_i^T y_j|`` (``row_max``, :func:`gram_row_max`) is
    below :data:`DARK_TOKEN` times the median token's, by index."""
    xp = array_api_compat.array_namespace(row_max)
    n = row_max.shape[0]
    median = xp.sort(row_max)[(n - 1) // 2]
    (found,) = xp.nonzero(row_max < DARK_TOKEN * median)
    return [int(i) for i in found]


def gram_row_max(x, *, block: int = 4096, gram=None):
    """``max_{j != i} |y_i^T y_j|`` for every point ``i`` (float64), ``block`` rows at a time,
    or from ``gram`` (``x x^T``, ``N x N``) when given."""
    xp = array_api_compat.array_namespace(x)
    dev = array_api_compat.device(x)
    n = x.shape[0]
    if gram is not None and tuple(gram.shape) != (n, n):
        raise ValueError(f"gram: expected the {n} x {n} Gram matrix of x, got {tuple(gram.shape)}")
    row_max = xp.empty(n, dtype=xp.float64, device=dev)
    for a in range(0, n, block):
        b = min(n, a + block)
        g = xp.abs(x[a:b, :] @ x.T if gram is None else gram[a:b, :])  # a copy: gram is kept
        g[xp.arange(b - a, device=dev), xp.arange(a, b, device=dev)] = 0
        row_max[a:b] = xp.astype(xp.max(g, axis=1), xp.float64)
    return row_max


class ColumnGaps:
    """Per-column primal and dual objectives of ``C`` (float64, ``N`` each) and its
    constraint violations: ``primal``, ``dual``, ``gap`` (``(primal - dual) / primal``,
    ``primal >= 1`` where ``1^T c = 1``), ``affine`` (``max_i |1^T c_i - 1|``) and
    ``diagonal`` (``max_i |C_ii|``). ``summary``: ``[max gap, affine, diagonal]`` on the
    device, not read yet (:func:`column_gaps` with ``read=False``); :meth:`read` reads the
    three floats in one copy."""

    def __init__(self, primal, dual, affine, diagonal, *, summary=None):
        self.primal, self.dual = primal, dual
        self.gap = (primal - dual) / primal.abs().clamp_min(1e-300)
        self.affine, self.diagonal = affine, diagonal
        self.summary, self._max_gap = summary, None
        self.again, self.bound = None, 0

    def read(self) -> ColumnGaps:
        """The ``summary``'s three floats read to the host (one copy), in place."""
        if self.summary is not None:
            self.take(self.summary.tolist())
        return self

    def take(self, values: list) -> ColumnGaps:
        """``summary``'s values read by the caller (:meth:`read`, or several certificates'
        summaries read together): ``[max gap, affine, diagonal]`` and, from G
        (:func:`column_gaps`), how many non-zeros of ``E`` exceeded its bound (then the
        certificate is computed again to their count) and of ``C`` its ``support`` missed."""
        self._max_gap, self.affine, self.diagonal = values[:3]
        self.summary = None
        if len(values) > 3:
            over, missed = values[3:5]
            if missed > 0:
                raise ValueError(f"support: {int(missed)} non-zero(s) of C lie outside it")
            if over > 0:
                redone = self.again(self.bound + int(over))
                self.__dict__.update(redone.__dict__)
        return self

    @property
    def max_gap(self) -> float:
        """The largest relative gap over the columns."""
        self.read()
        if self._max_gap is None:
            self._max_gap = float(self.gap.max())
        return self._max_gap

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
    n = y.shape[1]
    if tuple(c.shape) != (n, n):
        raise ValueError(f"coef: expected {n} x {n} for {n} points, got {tuple(c.shape)}")
    return column_gaps(y, c, lambda_e, lambda_z)


def column_gaps(y: torch.Tensor, c: torch.Tensor, lambda_e: float, lambda_z: float, *,
                gram: torch.Tensor | None = None, support: torch.Tensor | None = None,
                read: bool = True) -> ColumnGaps:  # fmt: skip
    """:func:`duality_gaps` of checked float64 ``y`` (``D x N``) and ``c`` (``N x N``, dense).

    Without ``gram``: two dense products, ``Y C`` and ``Y^T u`` (``D x N x N`` each). With
    ``gram`` (``G = Y^T Y``, ``N x N``, float64): from G and ``C``'s non-zeros, no dense
    product: ``r = y_i - Y c_i`` by a sparse product (``D x nnz(C)``), ``e`` its optimum
    (``shrink(r, t)``) and ``Y^T u = lambda_z (G_i - G c_i - Y^T e_i)`` (``N x nnz(C)`` and
    ``N x nnz(E)``); G's cancellation reorders near-ties, so each column's :data:`TOP`
    largest and smallest ``y_j^T u_i`` are taken again directly (``D`` each). ``support``: ``(2, K)`` long, ``(row, column)`` positions that hold
    every non-zero of ``c`` (-1: padding; each position at most once), where the caller
    knows them (else they are found: one host read on a GPU); a non-zero outside them is a
    ``ValueError``. ``read``: the three floats (``max_gap``, ``affine``, ``diagonal``) read
    in one copy; False leaves them in ``summary`` (:meth:`ColumnGaps.read`)."""
    if gram is None:
        return _dense_gaps(y, c, lambda_e, lambda_z, read=read)
    n = y.shape[1]
    if tuple(gram.shape) != (n, n):
        raise ValueError(f"gram: expected the {n} x {n} Gram matrix Y^T Y, got {tuple(gram.shape)}")
    return _gram_gaps(y, c, gram, support, lambda_e, lambda_z, read=read)


def block_gaps(y: torch.Tensor, cols: torch.Tensor, residual: torch.Tensor, l1: torch.Tensor,
               sums: torch.Tensor, own: torch.Tensor, lambda_e: float, lambda_z: float, *,
               screen: torch.Tensor | None = None) -> tuple[torch.Tensor, ColumnGaps]:  # fmt: skip
    """:func:`duality_gaps` of the columns ``cols`` (``m``, long) of ``C`` for checked
    float64 ``y`` (``D x N``), no ``N x N`` buffer and no dense column of ``C`` (the working
    sets by blocks): each column given by its residual ``y_{cols} - Y c`` (``D x m``, from
    its own support; overwritten), its l1 norm, its sum and its entry at its own token
    (``(m,)`` each); one product ``Y^T u`` (``D x N x m``). Returns ``(g, gaps)``:
    ``g[j, i] = y_j^T u_i`` (``N x m``, ``u_i`` the dual point of column ``cols[i]``), from
    which the caller reads every token's multiplier (the entries at ``(cols[i], i)`` are left
    at ``-inf``), and the block's :class:`ColumnGaps` (read).

    ``screen``: ``Y^T`` in float32 (``N x D``): ``g`` is then the float32 product ``screen
    u`` (a third of the float64 one's time on a CPU), each entry within
    :func:`screen_error` of the float64 one, and the gaps are read from it: an estimate, not
    a certificate (the working sets by blocks screen for violators with it)."""
    t = lambda_e / lambda_z
    yb = y[:, cols]
    r = residual
    primal = l1 + huber(r, lambda_e, lambda_z).sum(dim=0)
    u = r.clamp_(-t, t).mul_(lambda_z)
    del r
    g = (u.T @ y).T if screen is None else screen @ u.to(screen.dtype)
    uy, uu, umax = (u * yb).sum(dim=0), (u * u).sum(dim=0), u.abs().amax(dim=0)
    del u
    fixed = ((sums - 1).abs().max(), own.abs().max())
    return g, _finish(g, uy, uu, umax, primal, None, lambda_e, lambda_z, read=True, own=cols,
                      fixed=fixed)  # fmt: skip


def screen_error(d: int, x_norm: float, u_norm: torch.Tensor) -> torch.Tensor:
    """A bound on how far a multiplier ``|x_j^T u_i + nu_i| - 1`` read from
    :func:`block_gaps`' float32 product (``screen``, its ``nu_i`` from the same product's
    entries) is from the float64 one, for ``D = d`` features, ``x_norm`` the largest
    ``||x_j||`` and ``u_norm`` the columns' ``||u_i||``: the float32 dot product's error
    (``gamma_{D+2} sum |x_jd u_id|``, the operands' rounding counted, whatever the summation
    order), twice (the product's entry and ``nu_i``'s), and the rounding of the sum and the
    magnitude. The product's bound holds for IEEE float32 products only: the caller screens
    where ``torch.get_float32_matmul_precision() == "highest"``."""
    unit = 2.0**-24
    gamma = (d + 8) * unit / (1 - (d + 8) * unit)
    return 2 * gamma * (x_norm * u_norm + 1.0)


def _dense_gaps(y, c, lambda_e: float, lambda_z: float, *, read: bool) -> ColumnGaps:
    t = lambda_e / lambda_z
    r = torch.sub(y, y @ c)
    primal = c.abs().sum(dim=0) + huber(r, lambda_e, lambda_z).sum(dim=0)
    u = r.clamp_(-t, t).mul_(lambda_z)  # (r's storage: it is not needed again)
    del r
    g = y.T @ u  # g[j, i] = y_j^T u_i; its diagonal (j = i) is left out, in place
    uy, uu, umax = (u * y).sum(dim=0), (u * u).sum(dim=0), u.abs().amax(dim=0)
    del u
    return _finish(g, uy, uu, umax, primal, c, lambda_e, lambda_z, read=read)


def _finish(g, uy, uu, umax, primal, c, lambda_e: float, lambda_z: float, *, read: bool,
            flags=(), exact=None, own=None, fixed=None) -> ColumnGaps:  # fmt: skip
    """The dual at the scaled ``u`` from ``g`` (``g[j, i] = y_j^T u_i``; its diagonal is
    overwritten, or where ``own`` (``(m,)`` long) is given, column ``i``'s entry at row
    ``own[i]``: the columns of ``C`` that ``g`` and ``c`` hold, ``-inf`` on return),
    ``u_i^T y_i``, ``u_i^T u_i`` and ``max |u_i|``; ``flags`` join the summary.
    ``exact``: ``g``'s largest and smallest entries of a column taken again by ``exact(j)``
    (``y_j^T u_i`` for ``j``, ``(K, N)``, at the ``K`` largest and smallest). ``fixed``:
    ``(affine, diagonal)`` where the caller has them (``c`` is then not read)."""
    top = min(TOP, g.shape[0] - 1)  # (never the diagonal)
    exact = exact if top > 0 else None
    at = None if own is None else (own, torch.arange(len(own), device=g.device))

    def fill(t: torch.Tensor, value: float) -> None:
        if own is None:
            t.diagonal().fill_(value)
        else:
            t[at] = value

    fill(g, -math.inf)
    if exact is None:
        gmax = g.amax(dim=0)
    else:
        gmax = exact(g.topk(top, dim=0).indices).amax(dim=0)
    fill(g, math.inf)
    if exact is None:
        gmin = g.amin(dim=0)
    else:
        gmin = exact(g.topk(top, dim=0, largest=False).indices).amin(dim=0)
    if own is not None:
        fill(g, -math.inf)
    del g
    spread = gmax - gmin
    s_max = torch.where(
        spread > 0, 2.0 / spread.clamp_min(1e-300), torch.full_like(spread, math.inf)
    )
    s_max = torch.minimum(s_max, lambda_e / umax.clamp_min(1e-300))
    slope = uy - gmax
    s = torch.where(uu > 0, lambda_z * slope / uu.clamp_min(1e-300), torch.zeros_like(uu))
    s = torch.minimum(s.clamp_min(0.0), s_max)
    dual = s * slope - s * s * uu / (2 * lambda_z) + 1.0
    if fixed is None:
        affine = (c.sum(dim=0) - 1).abs().max()
        diagonal = (c.diagonal() if own is None else c[at]).abs().max()
    else:
        affine, diagonal = fixed
    out = ColumnGaps(primal, dual, affine, diagonal)
    out.summary = torch.stack([out.gap.max(), affine, diagonal,
                               *(f.to(affine.dtype) for f in flags)])  # fmt: skip
    return out.read() if read else out


def _csr(rows, cols, vals, shape):
    """A CSR matrix from entries sorted by row (no host read: the row pointers by search)."""
    crow = torch.searchsorted(rows, torch.arange(shape[0] + 1, device=rows.device))
    return torch.sparse_csr_tensor(crow, cols, vals, shape, check_invariants=False)


def _padded_csr(e: torch.Tensor, size: int) -> torch.Tensor:
    """``e``'s non-zeros (``N x D``) as CSR with ``size`` entries and no host read: where
    there are fewer, the padding (zero values, in the last column) is spread over the rows,
    at most ``ceil(padding / N)`` a row after its own entries, not heaped on one row (issue
    98 defect 5: 0.4-1.4 M entries in one row of cuSPARSE's product); where there are more,
    the first ``size`` (the caller counts them and computes again)."""
    n, d = e.shape
    dev = e.device
    at = torch.nonzero_static(e, size=size, fill_value=-1)  # (row, column), sorted
    real = at[:, 0] >= 0
    rows = torch.where(real, at[:, 0], n)  # (sorted: the fill at the end)
    pad = size - real.sum()  # (a 0-d tensor: no read)
    i = torch.arange(n + 1, device=dev)
    before = torch.div(i * pad, n, rounding_mode="floor")  # padding in the rows before i
    crow = torch.searchsorted(rows, i) + before
    pos = torch.arange(size, device=dev) + before[rows.clamp_max(n - 1)]
    pos = torch.where(real, pos, size)  # (the fill: written past the end, dropped)
    col = torch.full((size + 1,), d - 1, dtype=at.dtype, device=dev)
    val = torch.zeros(size + 1, dtype=e.dtype, device=dev)
    col.index_copy_(0, pos, torch.where(real, at[:, 1], d - 1))
    val.index_copy_(0, pos, torch.where(real, e[rows.clamp_max(n - 1), at[:, 1].clamp_min(0)],
                                        0.0))  # fmt: skip
    return torch.sparse_csr_tensor(crow, col[:size], val[:size], (n, d), check_invariants=False)


def _gram_gaps(y, c, gram, support, lambda_e: float, lambda_z: float, *, read: bool,
               bound: int | None = None) -> ColumnGaps:  # fmt: skip
    d, n = y.shape
    t = lambda_e / lambda_z
    if support is None:  # (one host read on a GPU: the count)
        cols, rows = torch.nonzero(c.T, as_tuple=True)  # C^T's rows: columns of C, sorted
        vals = c[rows, cols]
    else:
        if support.dim() != 2 or support.shape[0] != 2:
            raise ValueError(f"support: expected (2, K) positions, got {tuple(support.shape)}")
        rows, cols = support[0], support[1]
        valid = (rows >= 0) & (cols >= 0)
        rows, cols = rows.clamp_min(0), cols.clamp_min(0)
        order = torch.argsort(cols * n + rows)  # sorted by column, then row
        rows, cols, valid = rows[order], cols[order], valid[order]
        vals = torch.where(valid, c[rows, cols], 0.0)
    # E's non-zeros are found up to a bound (n + nnz(C)) without a host read; where there
    # are more, the summary says so and :meth:`ColumnGaps.read` runs this again to the count
    bound = n + rows.numel() if bound is None else bound
    yt = y.T.contiguous()  # (a view of the points, N x D, where y is one of them)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # sparse CSR is "beta"
        ct = _csr(cols, rows, vals, (n, n))  # C^T
        r = torch.sub(yt, ct @ yt)  # (y_i - Y c_i)^T: N x D by D x nnz(C)
        u = r.clamp(-t, t)  # clip(r, -t, t): u / lambda_z
        e = torch.sub(r, u)  # the optimum E for C (shrink(r, t)), transposed
        g = torch.sub(gram, ct @ gram)  # G - (G C)^T (G symmetric): N x nnz(C)
        g.sub_(_padded_csr(e, bound) @ y).mul_(lambda_z)  # [i, j]: y_j^T u_i (N x nnz(E))
    over = torch.count_nonzero(e) - bound
    del e
    u.mul_(lambda_z)
    # the datafit sum_d huber(r_d) = u^T r - u^T u / (2 lambda_z) (u = lambda_z clip(r))
    uu = (u * u).sum(dim=1)
    primal = c.abs().sum(dim=0) + ((u * r).sum(dim=1) - uu / (2 * lambda_z))
    del r
    uy, umax = (u * yt).sum(dim=1), u.abs().amax(dim=1)
    missed = torch.count_nonzero(c) - torch.count_nonzero(vals)

    def exact(j, u=u):  # y_j^T u_i at the candidates, directly
        return torch.stack([(yt[jk] * u).sum(dim=1) for jk in j])

    out = _finish(g.T, uy, uu, umax, primal, c, lambda_e, lambda_z, read=False,
                  flags=(over, missed), exact=exact)  # fmt: skip
    del u

    def again(count: int) -> ColumnGaps:
        return _gram_gaps(y, c, gram, support, lambda_e, lambda_z, read=True, bound=count)

    out.again, out.bound = again, bound
    return out.read() if read else out
