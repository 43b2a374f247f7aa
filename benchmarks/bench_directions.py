"""The directions issue 33 named for cheaper anchor scores, measured against its fidelity bar.

Issue 33 asks for the anchor scores at a tenth of the prefill, with the faithful solver's
agreement at eps 2e-3 as the fidelity bar (score Spearman and label ARI against the
faithful solver converged at eps 2e-4, same seed). The fast solver (``solver="fast"``, the
default) runs 60 iterations on a fixed schedule. Each row here is one data set of
``bench_request_cost.py``'s fidelity study (the same sets, held-out ones included) under one
change of that solver, all measured in one process:

* ``default``: the fast solver as it ships (with its continuation in ``lambda_z`` since
  2026-11-25: :func:`~videoanchor.anchor.admm.continuation_start`);
* ``no continuation``: the schedule before that, the issue's "warm starts" direction
  measured by its absence (each of the first 30 iterations warm-starts the next at a
  smaller ``lambda_z`` where one token sets it);
* ``iterations=50`` / ``40`` / ``30`` / ``20``: the schedule cut short (residual balancing
  until ``min(30, iterations // 2)``): fewer iterations is the one lever on the GPU
  estimate's iteration term (``request_cost_floor_static.json``: on an H100 the targets
  allow 8-33 fp16x3 iterations at 100% of peak);
* ``relax=1.5``: over-relaxation of the A-step (``A <- 1.5 A - 0.5 C`` before the C-step),
  at 40 and 60 iterations;
* ``rho=100`` / ``rho=30``, 40 iterations (``rho=30`` also at 50): a start closer to where
  residual balancing ends (about 45-60 on these sets) than the authors' 300;
* ``no outliers``: ``E = 0`` (the program without its ``lambda_e ||E||_1`` term). Its every
  product has ``N`` rows instead of ``N + D``, and its factor is the ``N x N`` Gram alone;
* ``anderson m=3``: Anderson acceleration (type II, :class:`Anderson`) of the fast solver's
  fixed-point map on its state ``(C + Lam, d1s, sqrt(lambda_z / rho) E)``, over the last
  ``m`` iterations, at 40, 50 and 60 iterations. The history restarts where the map
  changes: at each change of ``rho`` and at each full E-step (a new active set of ``E``);
* ``rho per row (Jacobi), prototype`` and ``affine penalty x10`` / ``x0.1, prototype``:
  the issue's "scaling of rho" beyond one scalar: a penalty per row of ``A - C`` from the
  data term's diagonal, or the affine constraint's penalty apart from ``rho``, on a dense
  float64 transcript of the fast schedule (:func:`penalty_prototype`; the ``conditioning``
  rows give its distance from the default, ``prototype_max_score_difference``). Their
  ``seconds`` time that transcript, not a solver;
* ``anderson m=10 after the balancing, prototype``: Anderson acceleration with a longer
  memory and no restarts once ``rho`` is fixed, on the float64 transcript
  (:func:`penalty_prototype`);
* ``E held between full E-steps``: the torch CPU solver's E-step only at its full iterations
  (1, 2, every 10th, the last), ``E`` and ``Y^T E`` held in between (:func:`held_outliers`):
  the products with ``D`` in them leave the iterations in between, which is what 10x on this
  CPU would take.

``fresh`` direction rows (``"fresh": True``, not in the summary's ``sets``): data with a
badly placed token that the continuation's settings were not chosen on (:func:`fresh_sets`),
the default against the schedule before the continuation only; counted apart in the
summary (``fresh_meet_both``).

``conditioning`` rows: why one set needs far more faithful iterations than the others (and
whether the continuation runs on it: ``mu_z_over_median``, ``continuation_start``). The
lambdas are set by the worst-placed token (``lambda_z = alpha_z / mu_z``, ``mu_z = min_i
max_{j != i} |y_i^T y_j|``), so one near-black face scales ``lambda_z Y^T Y`` up, and with it
the spread between its eigenvalues and the authors' fixed ``rho = 300``: per set ``lambda_z``,
the median eigenvalue of ``lambda_z Y^T Y`` over ``rho``, the smallest token norm over the
median one, and the faithful solver's iterations.

``length`` rows: whether the fast iterate's own convergence could set its length. One long
run of the fast schedule (``LONGEST`` iterations; its iterate at iteration ``k`` is the
``k``-iteration run's, the balancing of ``rho`` ending at 30 either way) is stopped at every
tenth iteration: there, the scores and labels against the faithful answer, the authors'
residual, and the change of the row sums of ``C`` (which the scores are made of) over the
last ten iterations, relative to their spread (``||r_k - r_(k-10)|| / ||r_k - mean r_k||``).
Per set: the first checkpoint meeting both bars, and where a stop on that change (the
first checkpoint from 60 on where it is at most ``tol``, for each ``tol`` of
``STOP_TOLERANCES``) would end, with the bars there. The two cost-study shapes of
Qwen2.5-VL-7B (2 and 4 frames of synthetic tokens, ``D = 3584``) run too: a rule that
lengthens them costs what the issue measures.

``spectrum`` rows: how many of the factor's eigen-components a truncation could drop.
``R = rho (lambda_z Y^T Y + rho I)^{-1} = V diag(rho / (w + rho)) V^T``, so a component with
``rho / (w + rho)`` under 1e-2 adds little to ``R`` and one with ``w / (w + rho)`` under 1e-2
adds little to ``I - R``: counted at the start (``rho = 300``) and at the fast solver's final
``rho``. If either count were a large share of ``N``, ``R`` or ``I - R`` would be low-rank
and the ``N^3`` A-step could shrink.

    python benchmarks/bench_directions.py           # the committed CPU figures (~10 minutes)
    python benchmarks/bench_directions.py --quick   # fewer sets, a smoke run
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.bench_request_cost import (  # noqa: E402
    YALE,
    _ari,
    _spearman,
    darkened,
    data_term_spectrum,
    fidelity_sets,
    tiny_sets,
    yale_faces,
)
from benchmarks.bench_ssc import synthetic_tokens  # noqa: E402
from benchmarks.common import environment, print_table, write_result  # noqa: E402
from videoanchor.anchor import admm, anchor_scores, compute_anchor_scores, fast  # noqa: E402
from videoanchor.anchor.options import DEFAULTS  # noqa: E402
from videoanchor.anchor.scores import (  # noqa: E402
    SSCCoefficients,
    anchor_result_from_coefficients,
    sparse_subspace_clustering,
)
from videoanchor.anchor.ssc import gram_row_max, solve_ssc_admm, ssc_lambdas  # noqa: E402


class Anderson:
    """Type-II Anderson acceleration of one fast-solver step's iteration map.

    The state entering iteration ``k`` is ``z_k = (T, d1s, w E)`` with ``T = C + Lam`` (``C``
    and ``Lam`` are ``T``'s soft-threshold and remainder), ``d1s`` the affine dual and ``E``
    the outliers as the next A-step reads them (the active entries' values on the CPU's
    :class:`~videoanchor.anchor.fast.ActiveSetStep`, the dense ``E`` elsewhere), weighted by
    ``w = sqrt(lambda_z / rho)`` (the augmented Lagrangian's metric). After the step,
    ``f_k = F(z_k)``; the next state is ``f_k - dF gamma`` with ``gamma`` the least-squares
    fit of the last residual ``g_k = f_k - z_k`` by the differences ``dg`` of the last
    ``m + 1`` residuals (ridge ``1e-10`` times the trace, float64). The history restarts
    where ``F`` changes: a change of ``rho`` (which rescales the duals) and a full E-step
    (a new active set)."""

    def __init__(self, m: int):
        self.m, self.f, self.g, self.last = m, [], [], None

    @staticmethod
    def _e(step):
        return step._e_vals if isinstance(step, fast.ActiveSetStep) else step.E

    def _pack(self, step):
        e = self._e(step)
        parts = [(step.C + step.lam).reshape(-1)]
        if step.d1s is not None:
            parts.append(step.d1s)
        if e is not None:
            parts.append(e.reshape(-1) * math.sqrt(step.dic.lam_z / step.rho))
        return torch.cat(parts).double()

    def _unpack(self, step, z) -> None:
        n, nb = step.C.shape
        t = z[: n * nb].reshape(n, nb).to(step.C.dtype)
        at = n * nb
        if step.d1s is not None:
            step.d1s = z[at : at + nb].to(step.d1s.dtype)
            at += nb
        e = self._e(step)
        if e is not None:
            e = (z[at:] / math.sqrt(step.dic.lam_z / step.rho)).to(e.dtype).reshape(e.shape)
            if isinstance(step, fast.ActiveSetStep):
                step._e_vals = e
            else:
                step.E = e
            step.e_nonzero = bool((e != 0).any())
        step.C, step.lam, _ = step.dic.kernels.shrink(
            step.dic.xp, t, step.lam.clone(), 1.0 / step.rho, step.diag
        )  # fmt: skip

    def after(self, step, it: int, changes_before: int) -> None:
        """Called after iteration ``it``'s C-step: record ``f_it`` and mix."""
        restart = step.rho_changes != changes_before or (
            isinstance(step, fast.ActiveSetStep) and step.is_full(it)
        )  # fmt: skip
        if restart or it >= step.iterations or self.last is None:
            self.f, self.g = [], []
            self.last = None if it >= step.iterations else self._pack(step)
            return
        f = self._pack(step)
        self.f.append(f)
        self.g.append(f - self.last)  # g_k = F(z_k) - z_k
        del self.f[: -(self.m + 1)], self.g[: -(self.m + 1)]
        if len(self.f) >= 2:
            g = torch.stack(self.g)
            dg = g[1:] - g[:-1]
            h = dg @ dg.T
            h += 1e-10 * float(h.diagonal().sum()) * torch.eye(h.shape[0], dtype=h.dtype)
            gamma = torch.linalg.solve(h, dg @ g[-1])
            fs = torch.stack(self.f)
            f = fs[-1] - (fs[1:] - fs[:-1]).T @ gamma
            self._unpack(step, f)
        self.last = f


@contextlib.contextmanager
def held_outliers():
    """The torch fast solver (:class:`~videoanchor.anchor.fast.ActiveSetStep`) with ``E``
    held between its full E-steps: the iterations in between skip the E-step (no sampled
    residual) and reuse ``Y^T E`` from the last full one, rescaled by ``lambda_z / rho``. An
    inexact block update, whose iterations in between cost the A-step's ``N x N x N``
    product alone: the per-iteration cost the CPU's 10x would need."""
    e_step, yte = fast.ActiveSetStep._e_step, fast.ActiveSetStep._yte

    def held_e_step(self, it, *args):
        if self.is_full(it):
            self._held_yte = None  # a new E: its product is made at the next A-step
            e_step(self, it, *args)

    def held_yte(self, scale):
        product = getattr(self, "_held_yte", None)
        if product is None:  # made once per full E-step, unscaled (rho changes in between)
            product = yte(self, 1.0)
            self._held_yte = product = False if product is None else product
        return None if product is False else product * scale

    fast.ActiveSetStep._e_step, fast.ActiveSetStep._yte = held_e_step, held_yte
    try:
        yield
    finally:
        fast.ActiveSetStep._e_step, fast.ActiveSetStep._yte = e_step, yte


@contextlib.contextmanager
def schedule(iterations: int | None = None, relax: float = 1.0, anderson: int = 0,
             held_e: bool = False):  # fmt: skip
    """The fast solver's schedule cut to ``iterations`` (balancing, and the continuation in
    ``lambda_z``, until ``min(30, iterations // 2)``, a multiple of 5), its A-step over-relaxed by ``relax``, its iteration
    Anderson-accelerated over the last ``anderson`` iterations (:class:`Anderson`) and, with
    ``held_e``, ``E`` held between full E-steps (:func:`held_outliers`)."""
    saved, c_step = dict(admm.SCHEDULE), admm.ScheduledStep._c_step
    if iterations is not None:
        until = min(saved["balance_until"], iterations // 2)
        admm.SCHEDULE.update(iterations=iterations, balance_until=until,
                             # the continuation ends with the balancing, at latest
                             continuation=min(saved["continuation"],
                                              until - until % saved["every"]))  # fmt: skip
    if relax != 1.0 or anderson:

        def changed(self, it, a):
            if relax != 1.0:
                a -= self.C  # relax A + (1 - relax) C, in place
                a *= relax
                a += self.C
            if not anderson:
                return c_step(self, it, a)
            changes = self.rho_changes
            out = c_step(self, it, a)
            if not hasattr(self, "_anderson"):
                self._anderson = Anderson(anderson)
            self._anderson.after(self, it, changes)
            return out

        admm.ScheduledStep._c_step = changed
    try:
        with held_outliers() if held_e else contextlib.nullcontext():
            yield
    finally:
        admm.SCHEDULE.clear()
        admm.SCHEDULE.update(saved)
        admm.ScheduledStep._c_step = c_step


def penalty_prototype(
    x, *, row_weights: str = "none", affine_ratio: float = 1.0, iterations: int | None = None,
    continuation: bool = True, anderson: int = 0,
) -> torch.Tensor:  # fmt: skip
    """``C`` of the fast schedule with other penalties, from a plain dense float64 transcript
    (``N x N`` inverse per ``rho``, every E-step exact: the array-API iterate), for the
    penalty directions; ``row_weights="none"`` and ``affine_ratio=1`` are the default's
    iterate (:func:`prototype_check` measures how close).

    * ``row_weights="jacobi"``: the penalty on row ``j`` of ``A - C`` (the coefficients of
      token ``j``) is ``rho w_j`` with ``w_j = G_jj / median(G_jj)`` (``G = Y^T Y``): Jacobi
      scaling, the same program in variables rescaled by the data term's diagonal (a token
      far darker than the rest gets its own penalty); the C-step thresholds row ``j`` at
      ``1 / (rho w_j)``, the balancing uses the ``W``-weighted norms.
    * ``affine_ratio``: the affine constraint's penalty over ``rho`` (1 in the authors'
      program), kept through the rebalancing.
    * ``continuation``: the schedule's continuation in ``lambda_z`` as the default runs it
      (:func:`~videoanchor.anchor.admm.continuation_start`,
      :func:`~videoanchor.anchor.admm.continuation_weight`; ``False``: none, the schedule
      before it).
    * ``anderson`` = m > 0: type-II Anderson acceleration with memory ``m`` of the iteration
      map on ``(C + Lam, d1s, sqrt(lambda_z / rho) E)``, from the end of the balancing on
      (``rho`` fixed, so the map is too), with no restart and a safeguard (a step whose
      fixed-point residual exceeds twice the last one's is taken plain and the history
      restarts there): the acceleration direction with a longer memory than
      :class:`Anderson`'s, whose history restarts at each full E-step."""
    sch = admm.SCHEDULE
    iterations = iterations or sch["iterations"]
    x = x.to(torch.float64)
    y = x.T.contiguous()
    n = y.shape[1]
    lam_e, lam_z, _, _ = ssc_lambdas(x, DEFAULTS.alpha_e, DEFAULTS.alpha_z)
    g = y.T @ y
    w = torch.ones(n, dtype=torch.float64)
    if row_weights == "jacobi":
        w = (g.diagonal() / g.diagonal().median()).clamp_min(1e-12)
    elif row_weights != "none":
        raise ValueError(f"row_weights: expected 'none' or 'jacobi', got {row_weights!r}")
    rho, kappa, sw = DEFAULTS.rho, float(affine_ratio), w.sqrt()[:, None]
    lam_z_full, start = lam_z, 1.0
    if continuation:
        start = admm.continuation_start(gram_row_max(x, gram=g))

    def weight(it):  # lambda_z at iteration it
        return lam_z_full * admm.continuation_weight(start, it)

    def inverse(rho, lam_z):
        m = lam_z * g + kappa * rho
        m.diagonal().add_(rho * w)
        return torch.linalg.inv(m)

    lam_z = weight(1)
    m_inv = inverse(rho, lam_z)
    c, lam = torch.zeros(n, n, dtype=torch.float64), torch.zeros(n, n, dtype=torch.float64)
    d1s, e = torch.zeros(n, dtype=torch.float64), torch.zeros_like(y)
    hist_f, hist_g, last, last_norm = [], [], None, None
    for it in range(1, iterations + 1):
        if weight(it) != lam_z:
            lam_z = weight(it)
            m_inv = inverse(rho, lam_z)
        thr_e = lam_e / lam_z
        rhs = lam_z * (g - y.T @ e) + rho * w[:, None] * (c - lam)
        rhs += kappa * rho * (1.0 - d1s)[None, :]
        a = m_inv @ rhs
        resid = y - y @ a
        e = resid - resid.clamp(-thr_e, thr_e)
        d1s += a.sum(0) - 1.0
        t = a + lam
        thr = (1.0 / (rho * w))[:, None]
        c_new = t - t.clamp(-thr, thr)
        c_new.fill_diagonal_(0.0)
        lam = t - c_new
        if it % sch["every"] == 0 and it <= sch["balance_until"] and it < iterations:
            r_rel = float((sw * (a - c_new)).norm()) / max(float((sw * c_new).norm()), 1e-30)
            s_rel = float((sw * (c_new - c)).norm()) / max(float((sw * lam).norm()), 1e-30)
            f = min(max(math.sqrt(r_rel / max(s_rel, 1e-30)), 1.0 / sch["tau"]), sch["tau"])
            lam /= f
            d1s /= f
            rho *= f
            m_inv = inverse(rho, lam_z)
        elif anderson and it > sch["balance_until"] and it < iterations:
            ew = math.sqrt(lam_z / rho)
            f_k = torch.cat([(c_new + lam).reshape(-1), d1s, e.reshape(-1) * ew])
            if last is not None:
                g_k = f_k - last
                norm = float(g_k.norm())
                if last_norm is not None and norm > 2.0 * last_norm:
                    hist_f, hist_g = [], []  # safeguard: the plain step, a fresh history
                hist_f.append(f_k)
                hist_g.append(g_k)
                del hist_f[: -(anderson + 1)], hist_g[: -(anderson + 1)]
                last_norm = norm
                if len(hist_f) >= 2:
                    gs = torch.stack(hist_g)
                    dg = gs[1:] - gs[:-1]
                    h = dg @ dg.T
                    h += 1e-10 * float(h.diagonal().sum()) * torch.eye(h.shape[0], dtype=h.dtype)
                    gamma = torch.linalg.solve(h, dg @ gs[-1])
                    fs = torch.stack(hist_f)
                    f_k = fs[-1] - (fs[1:] - fs[:-1]).T @ gamma
                    t = f_k[: n * n].reshape(n, n)
                    d1s = f_k[n * n : n * n + n].clone()
                    e = f_k[n * n + n :].reshape(y.shape) / ew
                    c_new = t - t.clamp(-thr, thr)
                    c_new.fill_diagonal_(0.0)
                    lam = t - c_new
            last = f_k
        c = c_new
    return c


def _penalty(row_weights: str = "none", affine_ratio: float = 1.0, anderson: int = 0):
    def solve(x, k):
        coef = penalty_prototype(x, row_weights=row_weights, affine_ratio=affine_ratio,
                                 anderson=anderson)  # fmt: skip
        its = admm.SCHEDULE["iterations"]
        done = anchor_result_from_coefficients(
            SSCCoefficients(coef.float(), its, False, 0.0, 0.0, 0.0, "torch", "prototype"), k,
            seed=DEFAULTS.seed, features=x,
        )  # fmt: skip
        return done.labels, done.scores, its

    return solve


def prototype_check(x, k) -> float:
    """The largest score difference between :func:`penalty_prototype` with the default's
    penalties and the fast default itself: how far the transcript the penalty directions
    run on is from the solver they stand in for."""
    _, scores, _ = _penalty()(x, k)
    return float((scores - _fast(x, k).scores).abs().max())


def _fast(x, k, **kw):
    return compute_anchor_scores(x, k, solver="fast", progress=False, mode="exact", **kw)


def _without_continuation(x, k):
    """The fast solver with the schedule before its continuation in ``lambda_z``
    (``SCHEDULE["continuation"] = 0``): what the default was until 2026-11-25."""
    saved = admm.SCHEDULE["continuation"]
    admm.SCHEDULE["continuation"] = 0
    try:
        res = _fast(x, k)
    finally:
        admm.SCHEDULE["continuation"] = saved
    return res.labels, res.scores, res.iterations


def _no_outliers(x, k):
    res = sparse_subspace_clustering(x, k, solver="fast", outliers=False, progress=False)
    return res.labels, anchor_scores(res.coef, res.labels), res.iterations


#: (name, iterations, relax, Anderson memory, solver keywords or a solver of its own[, E
#: held between full E-steps]); "no outliers" is its own call, the penalty directions run
#: :func:`penalty_prototype`
DIRECTIONS = [
    ("default", None, 1.0, 0, {}),
    ("no continuation (the default before 2026-11-25)", None, 1.0, 0, _without_continuation),
    ("iterations=50", 50, 1.0, 0, {}),
    ("iterations=40", 40, 1.0, 0, {}),
    ("iterations=30", 30, 1.0, 0, {}),
    ("iterations=20", 20, 1.0, 0, {}),
    ("relax=1.5", None, 1.5, 0, {}),
    ("relax=1.5, iterations=40", 40, 1.5, 0, {}),
    ("rho=100, iterations=40", 40, 1.0, 0, {"rho": 100.0}),
    ("rho=30, iterations=40", 40, 1.0, 0, {"rho": 30.0}),
    ("rho=30, iterations=50", 50, 1.0, 0, {"rho": 30.0}),
    ("no outliers", None, 1.0, 0, None),
    ("anderson m=3", None, 1.0, 3, {}),
    ("anderson m=3, iterations=50", 50, 1.0, 3, {}),
    ("anderson m=3, iterations=40", 40, 1.0, 3, {}),
    ("E held between full E-steps", None, 1.0, 0, {}, True),
    ("rho per row (Jacobi), prototype", None, 1.0, 0, _penalty(row_weights="jacobi")),
    ("affine penalty x10, prototype", None, 1.0, 0, _penalty(affine_ratio=10.0)),
    ("affine penalty x0.1, prototype", None, 1.0, 0, _penalty(affine_ratio=0.1)),
    ("anderson m=10 after the balancing, prototype", None, 1.0, 0, _penalty(anderson=10)),
]


def _reference(x, k):
    """The faithful answer (eps 2e-4) and the bar: its agreement with eps 2e-3."""
    ref = compute_anchor_scores(x, k, solver="faithful", progress=False, mode="exact")
    loose = compute_anchor_scores(x, k, solver="faithful", progress=False, mode="exact",
                                  eps=2e-3)  # fmt: skip
    return ref, _spearman(loose.scores, ref.scores), _ari(loose.labels, ref.labels)


def fresh_sets() -> list[tuple]:
    """``(name, features, k)``: data with a badly placed token that the continuation's two
    settings (30 iterations, floor 0.3) were not chosen on (fixed before any was run), for
    the default against the schedule before it. Yale B ones only where the data are."""
    sets = [
        ("fresh: synthetic video tokens, seed 11, token 20 darkened to 0.01",
         darkened(synthetic_tokens(384, 1024, seed=11), 20, 0.01), 24),
        ("fresh: synthetic tokens 256 x 3584, seed 13, token 0 darkened",
         darkened(synthetic_tokens(256, 3584, seed=13), 0, 0.004), 24),
    ]  # fmt: skip
    if YALE.exists():
        sets += [
            ("fresh: Extended Yale B faces, subjects 23-30, face 11 darkened",
             darkened(yale_faces(8, 32, first=22), 11, 0.004), 8),
            ("fresh: Extended Yale B faces, subjects 1-8, 24 each, face 40 darkened to 0.01",
             darkened(yale_faces(8, 24), 40, 0.01), 8),
            ("fresh: Extended Yale B faces, subjects 31-38, 40 each",
             yale_faces(8, 40, first=30), 8),
        ]  # fmt: skip
    return sets


#: the directions run on the fresh sets
FRESH_DIRECTIONS = ("default", "no continuation (the default before 2026-11-25)")


def direction_rows(name, x, k, held_out, reference, only=None) -> list[dict]:
    ref, bar_sp, bar_ari = reference
    rows, base_seconds = [], None
    for direction, iterations, relax, anderson, kw, *held in DIRECTIONS:
        if only is not None and direction not in only:
            continue
        t = time.perf_counter()
        with schedule(iterations, relax, anderson, held_e=bool(held and held[0])):
            if callable(kw):  # a direction with its own solver (the penalty prototypes)
                labels, scores, its = kw(x, k)
            elif kw is None:
                labels, scores, its = _no_outliers(x, k)
            else:
                res = _fast(x, k, **kw)
                labels, scores, its = res.labels, res.scores, res.iterations
        seconds = time.perf_counter() - t
        base_seconds = seconds if base_seconds is None else base_seconds
        sp, ari = _spearman(scores, ref.scores), _ari(labels, ref.labels)
        rows.append({
            "data": name, "held_out": held_out, "n": x.shape[0], "d": x.shape[1],
            "n_clusters": k, "direction": direction, "iterations": its,
            "faithful_iterations": ref.iterations,
            "spearman": sp, "ari": ari, "bar_spearman": bar_sp, "bar_ari": bar_ari,
            "meets_bar_scores": sp >= bar_sp, "meets_bar_labels": ari >= bar_ari,
            "seconds": seconds, "seconds_over_default": seconds / base_seconds,
            "figures": "measured",
        })  # fmt: skip
    return rows


#: The length study's longest run, and the tolerances of the stop on the row sums' change.
LONGEST = 300
STOP_TOLERANCES = (0.09, 0.05, 0.02)


@contextlib.contextmanager
def checkpoints(every: int = 10):
    """``C`` (a copy), the authors' residual and ``rho`` of the fast solver's iterate at every
    ``every``-th iteration, into the dict yielded (iteration -> tuple)."""
    marks, c_step = {}, admm.ScheduledStep._c_step

    def marked(self, it, a):
        out = c_step(self, it, a)
        if it % every == 0:
            marks[it] = (self.C.clone(), out[0], self.rho)
        return out

    admm.ScheduledStep._c_step = marked
    try:
        yield marks
    finally:
        admm.ScheduledStep._c_step = c_step


def length_row(name, x, k, held_out, reference, default_scores=None) -> dict:
    """The fast iterate stopped at every tenth iteration up to :data:`LONGEST` (module
    docstring, ``length`` rows)."""
    ref, bar_sp, bar_ari = reference
    with schedule(LONGEST), checkpoints() as marks:  # balancing until 30, as the default
        _fast(x, k)
    trajectory, prev = [], None
    for it in sorted(marks):
        c, residual, rho = marks[it]
        # the rest of compute_anchor_scores after the SSC step, on this iterate
        done = anchor_result_from_coefficients(
            SSCCoefficients(c, it, False, residual, 0.0, 0.0, "torch", "fast"), k,
            seed=DEFAULTS.seed, features=x,
        )  # fmt: skip
        scores, labels = done.scores, done.labels
        if it == admm.SCHEDULE["iterations"] and default_scores is not None:
            # the checkpoint is the default's answer: the same scores to rounding
            at_default = float((scores - default_scores).abs().max())
        r = c.double().sum(dim=1)
        change = None if prev is None else float((r - prev).norm() / (r - r.mean()).norm())
        prev = r
        sp, ari = _spearman(scores, ref.scores), _ari(labels, ref.labels)
        trajectory.append({"iteration": it, "spearman": sp, "ari": ari, "residual": residual,
                           "row_sum_change": change, "rho": rho,
                           "meets_both": sp >= bar_sp and ari >= bar_ari})  # fmt: skip
    base = admm.SCHEDULE["iterations"]
    needed = next((t["iteration"] for t in trajectory if t["meets_both"]), None)
    row = {
        "data": name, "held_out": held_out, "n": x.shape[0], "d": x.shape[1], "n_clusters": k,
        "faithful_iterations": ref.iterations, "bar_spearman": bar_sp, "bar_ari": bar_ari,
        "first_meeting_both": needed, "longest": LONGEST,
        "row_sum_change_at_default": next(t["row_sum_change"] for t in trajectory
                                          if t["iteration"] == base),
        "trajectory": trajectory, "figures": "measured",
    }  # fmt: skip
    if default_scores is not None:
        row["max_score_difference_to_default"] = at_default
    for tol in STOP_TOLERANCES:
        stop = next((t for t in trajectory if t["iteration"] >= base
                     and t["row_sum_change"] <= tol), trajectory[-1])  # fmt: skip
        row[f"stop_{tol:g}_iterations"] = stop["iteration"]
        row[f"stop_{tol:g}_meets_both"] = stop["meets_both"]
        row[f"stop_{tol:g}_spearman"] = stop["spearman"]
    return row


def spectrum_row(name, x) -> dict:
    """How many eigen-components of ``R`` / ``I - R`` a 1e-2 truncation could drop."""
    res = solve_ssc_admm(x, scheduled=True, progress=False)
    _, _, w = data_term_spectrum(x)
    row = {"data": name, "n": x.shape[0], "d": x.shape[1], "rho_final": res.rho}
    for label, rho in (("start", DEFAULTS.rho), ("final", res.rho)):
        row[f"small_in_r_{label}"] = int((rho / (w + rho) < 1e-2).sum())  # dropped from R
        row[f"small_in_i_minus_r_{label}"] = int((w / (w + rho) < 1e-2).sum())  # from I - R
    row["figures"] = "measured (counted from the eigenvalues)"
    return row


def conditioning_row(name, x, faithful_iterations: int) -> dict:
    """How ``lambda_z`` (set by the worst-placed token) scales the factor's spectrum against
    the authors' ``rho``, and the token norms that set it."""
    lam_z, mu_z, w = data_term_spectrum(x)
    norms = x.double().norm(dim=1)
    row_max = gram_row_max(x.double())
    return {
        "data": name, "n": x.shape[0], "d": x.shape[1], "lambda_z": lam_z, "mu_z": mu_z,
        "median_eigenvalue_over_rho": float(w.median()) / DEFAULTS.rho,
        "min_norm_over_median": float(norms.min() / norms.median()),
        # mu_z over the median row maximum, and the continuation's start weight from it
        "mu_z_over_median": float(row_max.min() / row_max.sort().values[(len(row_max) - 1) // 2]),
        "continuation_start": admm.continuation_start(row_max),
        "faithful_iterations": faithful_iterations,
        "figures": "measured (computed from the features)",
    }  # fmt: skip


def run(quick: bool, out_dir) -> Path:
    torch.manual_seed(0)
    meta = environment("cpu")
    meta["quick"] = quick
    meta["load_before"] = os.getloadavg()
    meta["torch_threads"] = torch.get_num_threads()
    notes: list[str] = []
    meta["notes"] = notes
    rows: list[dict] = []
    sets = fidelity_sets(quick, notes, tiny_sets(quick, notes))
    # the cost study's Qwen2.5-VL-7B shapes at 2 and 4 frames: length rows only
    cost_shapes = [] if quick else [
        (f"synthetic video tokens, Qwen2.5-VL-7B, {f} frames",
         synthetic_tokens(128 * f, 3584, seed=f), 24, False) for f in (2, 4)
    ]  # fmt: skip
    for i, (name, x, k, held_out) in enumerate(sets + cost_shapes):
        reference = _reference(x, k)
        if i < len(sets):  # a fidelity set: every direction, and its conditioning
            mine = direction_rows(name, x, k, held_out, reference)
            rows += [{"kind": "direction", **r} for r in mine]
            rows.append({"kind": "conditioning",
                         **conditioning_row(name, x, mine[0]["faithful_iterations"]),
                         "prototype_max_score_difference": prototype_check(x, k)})  # fmt: skip
        default = _fast(x, k).scores
        rows.append({"kind": "length", **length_row(name, x, k, held_out, reference, default)})
        print(f"{name}: done", flush=True)
    if not quick:
        for name, x, k in fresh_sets():
            mine = direction_rows(name, x, k, True, _reference(x, k), only=FRESH_DIRECTIONS)
            rows += [{"kind": "direction", "fresh": True, **r} for r in mine]
            print(f"{name}: done", flush=True)
    spectra = [(name, x) for name, x, _, _ in sets
               if name in ("synthetic video tokens", "Extended Yale B faces")]  # fmt: skip
    if not quick:  # the shape of Qwen2.5-VL-7B at 8 frames
        spectra.append(("synthetic video tokens, N = 1024, D = 3584",
                        synthetic_tokens(1024, 3584, seed=8)))  # fmt: skip
    rows += [{"kind": "spectrum", **spectrum_row(name, x)} for name, x in spectra]
    meta["load_after"] = os.getloadavg()
    directions = [r for r in rows if r["kind"] == "direction"]
    print_table(directions, ["data", "direction", "iterations", "spearman", "bar_spearman", "ari",
                             "bar_ari", "meets_bar_scores", "meets_bar_labels",
                             "seconds_over_default"])  # fmt: skip
    summary = []
    for direction, *_ in DIRECTIONS:
        mine = [r for r in directions if r["direction"] == direction and not r.get("fresh")]
        fresh = [r for r in directions if r["direction"] == direction and r.get("fresh")]
        summary.append({
            "direction": direction, "sets": len(mine),
            "meet_both_bars": sum(r["meets_bar_scores"] and r["meets_bar_labels"] for r in mine),
            "held_out_meet_both": sum(r["meets_bar_scores"] and r["meets_bar_labels"]
                                      for r in mine if r["held_out"]),
            **({"fresh_sets": len(fresh),
                "fresh_meet_both": sum(r["meets_bar_scores"] and r["meets_bar_labels"]
                                       for r in fresh)} if fresh else {}),
        })  # fmt: skip
    meta["summary"] = summary
    print_table(summary, ["direction", "sets", "meet_both_bars", "held_out_meet_both",
                          "fresh_sets", "fresh_meet_both"])  # fmt: skip
    lengths = [r for r in rows if r["kind"] == "length"]
    stops = []
    fidelity = [r for r in lengths if r["data"] in {d["data"] for d in directions}]
    for tol in STOP_TOLERANCES:
        stops.append({
            "stop_tolerance": tol, "sets": len(fidelity),
            "meet_both_bars": sum(r[f"stop_{tol:g}_meets_both"] for r in fidelity),
            "iterations": {r["data"]: r[f"stop_{tol:g}_iterations"] for r in lengths},
        })  # fmt: skip
    meta["length_summary"] = stops
    print_table(lengths, ["data", "faithful_iterations", "first_meeting_both",
                          "row_sum_change_at_default",
                          *[f"stop_{t:g}_{c}" for t in STOP_TOLERANCES
                            for c in ("iterations", "meets_both")]])  # fmt: skip
    print_table(stops, ["stop_tolerance", "sets", "meet_both_bars"])
    print_table([r for r in rows if r["kind"] == "conditioning"],
                ["data", "lambda_z", "median_eigenvalue_over_rho", "min_norm_over_median",
                 "mu_z_over_median", "continuation_start", "faithful_iterations"])  # fmt: skip
    print_table([r for r in rows if r["kind"] == "spectrum"],
                ["data", "n", "rho_final", "small_in_r_start", "small_in_i_minus_r_start",
                 "small_in_r_final", "small_in_i_minus_r_final"])  # fmt: skip
    path = write_result("directions_quick" if quick else "directions", meta, rows, out_dir)
    print(f"wrote {path}")
    return path


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out-dir", default=None)
    args = ap.parse_args(argv)
    run(args.quick, args.out_dir)


if __name__ == "__main__":
    main()
