"""How near each answer comes to the SSC program's minimiser: what issue 33's fidelity bar measures.

The bar (docs/ssc.md) compares the fast default with the authors' solver stopped at eps
2e-4, and holds it to how well the same solver stopped at 2e-3 agrees with that answer. Both
of the authors' answers lie on one trajectory of one iteration; the program they stop short
of has a minimiser of its own. This script computes that minimiser on each of the fidelity
study's data sets (``bench_request_cost.fidelity_sets``;
``videoanchor.anchor.solvers.workset.reference_minimiser``: working sets from each point's nearest
point, else from the fast solver's answer; certified where every column's relative duality
gap is below 1e-9,
reported when it is not) and says for the
authors' answer at eps 2e-4, at 2e-3 and the fast default:

- how their scores and labels agree with the minimiser's (Spearman, ARI, same seed), and
  their signed row sums of ``C`` (the scores' continuous part; Spearman);
- how far their ``C`` is from the minimiser's (relative Frobenius);
- their objective's gap to the minimiser's (``E`` at its optimum for their ``C``; relative),
  how far their ``C`` is from the affine constraint (``max_i |1^T c_i - 1|``) and the zero
  diagonal.

Issue 52's yardstick per set (``<answer>_meets_yardstick``), held against the authors' answer
at eps 2e-4: an objective gap at most theirs, both constraints to 1e-5, row sums at least as
near the minimiser's; for the fast solver and for the default (``solver="auto"``: the working
sets on the CPU, the fast solver where ``C`` is dense; ``solver_default`` says which ran),
each answer's time beside it (``seconds_<answer>``). Where the reference and the default
are both the working sets' answer, the yardstick holds by construction; what certifies it
is the reference's duality gap, which no solver's own stopping rule enters.

And per set: whether the minimiser itself meets the bar (agrees with the authors' answer at
least as well as their 2e-3 stop does). Where it does not, no solver that converges to the
program meets the bar there: only one that follows the authors' iterate does. And the bar
held against the minimiser instead (``fast_meets_minimiser_bar``): the fast default's scores
and labels at least as near the minimiser's as those of the authors' 2e-3 stop. All figures
MEASURED on the machine that runs it (CPU by default). (The fast schedule cut to 40, 30 and
20 iterations, ``fast_40`` ... in ``optimum_cpu.json``, was run by patching the package's
schedule; issue 67 removed that mode: benchmarks pass parameters, docs/ssc.md keeps the
figures.)

    python benchmarks/bench_optimum.py [--quick] [--only NAME ...] [--skip NAME ...]
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.bench_request_cost import fidelity_sets, tiny_sets  # noqa: E402
from benchmarks.common import (  # noqa: E402
    ari,
    environment,
    finish,
    objective,
    parser,
    spearman,
)
from videoanchor.anchor import compute_anchor_scores  # noqa: E402
from videoanchor.anchor.options import DEFAULTS  # noqa: E402
from videoanchor.anchor.scores import (  # noqa: E402
    SSCCoefficients,
    anchor_result_from_coefficients,
)
from videoanchor.anchor.solvers.workset import reference_minimiser  # noqa: E402

#: the answers held against the minimiser: label -> compute_anchor_scores options
ANSWERS = {
    "faithful_eps2e-4": {"solver": "faithful"},
    "faithful_eps2e-3": {"solver": "faithful", "eps": 2e-3},
    "fast": {"solver": "fast", "precision": "full"},
    "default": {},  # solver="auto": the working sets on the CPU, the fast solver where C is dense
}


def minimiser(x, k):
    """``(result, scores and labels, seconds)`` of the program's certified minimiser
    (:func:`~videoanchor.anchor.solvers.workset.reference_minimiser`, float64): ``converged`` where
    every column's relative duality gap is below 1e-9."""
    t = time.perf_counter()
    res = reference_minimiser(x)
    seconds = time.perf_counter() - t
    coef = SSCCoefficients(**res.answer(coef=res.coef.float(), solver="minimiser"))
    scored = anchor_result_from_coefficients(coef, k, seed=DEFAULTS.seed, features=x)
    return res, scored, seconds


def set_row(name, x, k, held_out: bool) -> dict:
    mn, opt, seconds = minimiser(x, k)
    lam_e, lam_z = mn.lambda_e, mn.lambda_z
    f_min = objective(x, mn.coef, lam_e, lam_z)
    sums_min = mn.coef.sum(dim=1)
    row = {
        "data": name, "held_out": held_out, "n": x.shape[0], "d": x.shape[1], "n_clusters": k,
        "minimiser_iterations": mn.iterations, "minimiser_converged": mn.converged,
        "minimiser_residual": float(mn.residual), "minimiser_seconds": seconds,
        # the largest relative duality gap over the columns: certified below 1e-9
        "minimiser_duality_gap": float(mn.residual),
        "minimiser_affine_violation": float((mn.coef.sum(dim=0) - 1).abs().max()),
        "figures": "measured",
    }  # fmt: skip
    answers = {}
    for label, kw in ANSWERS.items():
        t = time.perf_counter()
        res = answers[label] = compute_anchor_scores(x, k, progress=False, **kw)
        row[f"seconds_{label}"] = time.perf_counter() - t
        row[f"solver_{label}"] = res.solver
        c = res.coef.double().cpu()
        row[f"spearman_{label}"] = spearman(res.scores, opt.scores)
        row[f"ari_{label}"] = ari(res.labels, opt.labels)
        row[f"coef_rel_{label}"] = float((c - mn.coef).norm() / mn.coef.norm())
        row[f"objective_gap_{label}"] = (objective(x, c, lam_e, lam_z) - f_min) / abs(f_min)
        row[f"affine_violation_{label}"] = float((c.sum(dim=0) - 1).abs().max())
        row[f"diagonal_{label}"] = float(c.diagonal().abs().max())
        # the signed row sums of C (the scores' continuous part) against the minimiser's
        row[f"row_sum_spearman_{label}"] = spearman(c.sum(dim=1), sums_min)
        row[f"iterations_{label}"] = res.iterations
    ref, loose = answers["faithful_eps2e-4"], answers["faithful_eps2e-3"]
    bar_sp, bar_ari = spearman(loose.scores, ref.scores), ari(loose.labels, ref.labels)
    sp_min, ari_min = spearman(opt.scores, ref.scores), ari(opt.labels, ref.labels)
    fast = answers["fast"]
    row["fast_meets_bar"] = (
        spearman(fast.scores, ref.scores) >= bar_sp and ari(fast.labels, ref.labels) >= bar_ari
    )
    # the bar held against the minimiser instead of the authors' answer: scores and labels
    # at least as near it as the authors' own 2e-3 stop's
    row["fast_meets_minimiser_bar"] = (
        row["spearman_fast"] >= row["spearman_faithful_eps2e-3"]
        and row["ari_fast"] >= row["ari_faithful_eps2e-3"]
    )
    # issue 52's yardstick, held against the authors' answer (eps 2e-4): objective gap to
    # the minimiser at most theirs, the affine constraint and the zero diagonal to 1e-5
    # (float32), the row sums at least as near the minimiser's (Spearman)
    for label in ("default", "fast"):
        row[f"{label}_meets_yardstick"] = (
            row[f"objective_gap_{label}"] <= row["objective_gap_faithful_eps2e-4"]
            and row[f"affine_violation_{label}"] <= 1e-5
            and row[f"diagonal_{label}"] <= 1e-5
            and row[f"row_sum_spearman_{label}"] >= row["row_sum_spearman_faithful_eps2e-4"]
        )
    row.update({
        "bar_spearman": bar_sp, "bar_ari": bar_ari,
        "spearman_minimiser_vs_faithful": sp_min, "ari_minimiser_vs_faithful": ari_min,
        # the bar, held against the program's own answer
        "minimiser_meets_bar": sp_min >= bar_sp and ari_min >= bar_ari,
        # nearer the program's minimiser (objective) than the authors' own 2e-3 stop
        "fast_objective_within_loose": (row["objective_gap_fast"]
                                        <= row["objective_gap_faithful_eps2e-3"]),
    })  # fmt: skip
    return row


def run(quick: bool, only, out_dir=None, area: str | None = None, skip=None):
    torch.manual_seed(0)
    notes: list[str] = []
    sets = fidelity_sets(quick, notes, tiny_sets(quick, notes))
    if only:
        sets = [s for s in sets if any(o in s[0] for o in only)]
    if skip:
        sets = [s for s in sets if not any(o in s[0] for o in skip)]
    meta = environment("cpu")
    meta.update(quick=quick, only=only or None, skip=skip or None, notes=notes,
                torch_threads=torch.get_num_threads())  # fmt: skip
    rows = []
    for name, x, k, held_out in sets:
        rows.append(set_row(name, x, k, held_out))
        r = rows[-1]
        print(f"{name}: minimiser {r['minimiser_iterations']} its "
              f"({'converged' if r['minimiser_converged'] else 'NOT converged'}, "
              f"{r['minimiser_seconds']:.0f} s); meets bar: minimiser {r['minimiser_meets_bar']}, "
              f"fast {r['fast_meets_bar']}", flush=True)  # fmt: skip
    meta["summary"] = {
        "sets": len(rows),
        "minimiser_converged": sum(r["minimiser_converged"] for r in rows),
        "minimiser_meets_bar": sum(r["minimiser_meets_bar"] for r in rows),
        "fast_meets_bar": sum(r["fast_meets_bar"] for r in rows),
        "fast_objective_within_loose": sum(r["fast_objective_within_loose"] for r in rows),
        "fast_meets_minimiser_bar": sum(r["fast_meets_minimiser_bar"] for r in rows),
        "certified_sets": sum(r["minimiser_converged"] for r in rows),
        "fast_meets_yardstick_where_certified": sum(
            r["fast_meets_yardstick"] for r in rows if r["minimiser_converged"]),
        "default_meets_yardstick_where_certified": sum(
            r["default_meets_yardstick"] for r in rows if r["minimiser_converged"]),
        "default_ran": {solver: sum(r["solver_default"] == solver for r in rows)
                        for solver in sorted({r["solver_default"] for r in rows})},
        "converged_sets_fast_meets_minimiser_bar": sum(
            r["fast_meets_minimiser_bar"] for r in rows if r["minimiser_converged"]),
        "faithful_eps2e-4_meets_minimiser_bar": sum(
            r["spearman_faithful_eps2e-4"] >= r["spearman_faithful_eps2e-3"]
            and r["ari_faithful_eps2e-4"] >= r["ari_faithful_eps2e-3"] for r in rows),
        "fast_misses_bar_where_minimiser_meets_it": [
            r["data"] for r in rows if r["minimiser_meets_bar"] and not r["fast_meets_bar"]],
        "minimiser_misses_bar": [r["data"] for r in rows if not r["minimiser_meets_bar"]],
    }  # fmt: skip
    meta["load_after"] = list(os.getloadavg())
    print(meta["summary"])
    # a run over some sets (--only) never takes the name of the whole study's file
    if area is None:
        area = "optimum_quick" if quick else "optimum_only" if only or skip else "optimum"
    return finish(area, meta, rows, out_dir,
                  ["data", "n", "minimiser_iterations", "minimiser_converged",
                   "spearman_faithful_eps2e-4", "spearman_faithful_eps2e-3", "spearman_fast",
                   "objective_gap_faithful_eps2e-4", "objective_gap_faithful_eps2e-3",
                   "objective_gap_fast", "row_sum_spearman_faithful_eps2e-4",
                   "row_sum_spearman_fast", "minimiser_duality_gap", "fast_meets_yardstick",
                   "solver_default", "default_meets_yardstick",
                   "minimiser_meets_bar", "fast_meets_bar", "fast_meets_minimiser_bar"])  # fmt: skip


def main(argv=None):
    ap = parser(__doc__.splitlines()[0], quick=True)
    ap.add_argument("--only", nargs="*", default=None, help="data sets whose name contains one")
    ap.add_argument(
        "--skip", nargs="*", default=None, help="data sets whose name contains one are left out"
    )
    ap.add_argument("--name", default=None, help="the result's area (default: by --quick/--only)")
    args = ap.parse_args(argv)
    run(args.quick, args.only, args.out_dir, args.name, args.skip)


if __name__ == "__main__":
    main()
