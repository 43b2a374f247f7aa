"""benchmarks/bench_directions.py: each direction changes the fast solver the way its row says,
leaves the library as it found it, and the rows carry the bar they are judged by."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks import bench_directions as bd
from videoanchor.anchor import admm, compute_anchor_scores


def _tokens():
    from benchmarks.bench_ssc import synthetic_tokens

    return synthetic_tokens(60, 40, k=3, seed=5)


def test_schedule_cuts_and_relaxes_then_restores():
    x = _tokens()
    before, c_step = dict(admm.SCHEDULE), admm.ScheduledStep._c_step
    default = compute_anchor_scores(x, 3, progress=False, mode="exact", solver="fast")
    with bd.schedule(40, relax=1.5):
        assert admm.SCHEDULE["iterations"] == 40 and admm.SCHEDULE["balance_until"] == 20
        assert admm.SCHEDULE["continuation"] == 20  # ends with the balancing
        assert admm.ScheduledStep._c_step is not c_step
        cut = compute_anchor_scores(x, 3, progress=False, mode="exact", solver="fast")
    with bd.schedule(None, relax=1.5):
        relaxed = compute_anchor_scores(x, 3, progress=False, mode="exact", solver="fast")
    assert admm.SCHEDULE == before and admm.ScheduledStep._c_step is c_step
    assert default.iterations == before["iterations"] and cut.iterations == 40
    assert relaxed.iterations == before["iterations"]
    # each change moves the iterate (a context manager that did nothing would not)
    assert not torch.equal(cut.coef, default.coef)
    assert not torch.equal(relaxed.coef, default.coef)
    again = compute_anchor_scores(x, 3, progress=False, mode="exact", solver="fast")
    assert torch.equal(again.coef, default.coef)
    dark = x.clone()
    dark[3] *= 0.01  # the continuation on: a schedule cut to 22 runs it until 10
    with bd.schedule(22):
        assert admm.SCHEDULE["balance_until"] == 11 and admm.SCHEDULE["continuation"] == 10
        assert (
            compute_anchor_scores(dark, 3, progress=False, mode="exact", solver="fast").iterations
            == 22
        )


def test_schedule_restores_after_an_error():
    before, c_step = dict(admm.SCHEDULE), admm.ScheduledStep._c_step
    with pytest.raises(RuntimeError, match="boom"), bd.schedule(30, relax=1.5):
        raise RuntimeError("boom")
    assert admm.SCHEDULE == before and admm.ScheduledStep._c_step is c_step


def test_anderson_changes_the_iterate_then_restores():
    x = _tokens()
    c_step = admm.ScheduledStep._c_step
    default = compute_anchor_scores(x, 3, progress=False, mode="exact", solver="fast")
    with bd.schedule(None, anderson=3):
        assert admm.ScheduledStep._c_step is not c_step
        mixed = compute_anchor_scores(x, 3, progress=False, mode="exact", solver="fast")
    assert admm.ScheduledStep._c_step is c_step
    assert mixed.iterations == default.iterations and mixed.converged
    assert torch.isfinite(mixed.coef).all() and not torch.equal(mixed.coef, default.coef)
    again = compute_anchor_scores(x, 3, progress=False, mode="exact", solver="fast")
    assert torch.equal(again.coef, default.coef)


@pytest.mark.parametrize("seed", [5, 6, 7])
def test_anderson_gets_nearer_the_long_run_iterate(seed):
    # the same number of iterations ends nearer where 3000 of them lead: an acceleration
    from benchmarks.bench_ssc import synthetic_tokens

    x = synthetic_tokens(60, 40, k=3, seed=seed).double()
    with bd.schedule(3000):
        far = bd._fast(x, 3).coef
    for iterations in (40, 60):
        with bd.schedule(iterations):
            plain = bd._fast(x, 3).coef
        with bd.schedule(iterations, anderson=3):
            mixed = bd._fast(x, 3).coef
        assert (mixed - far).norm() < 0.97 * (plain - far).norm()


def test_rows_judge_each_direction_by_the_loose_faithful_bar():
    x = _tokens()
    rows = bd.direction_rows("tokens", x, 3, False, bd._reference(x, 3))
    assert [r["direction"] for r in rows] == [d[0] for d in bd.DIRECTIONS]
    ref = compute_anchor_scores(x, 3, solver="faithful", progress=False, mode="exact")
    loose = compute_anchor_scores(x, 3, solver="faithful", progress=False, mode="exact",
                                  eps=2e-3)  # fmt: skip
    bar = bd._spearman(loose.scores, ref.scores)
    default = compute_anchor_scores(x, 3, progress=False, mode="exact", solver="fast")
    for r in rows:
        assert r["bar_spearman"] == pytest.approx(bar)
        assert r["meets_bar_scores"] == (r["spearman"] >= r["bar_spearman"])
        assert r["meets_bar_labels"] == (r["ari"] >= r["bar_ari"])
    by = {r["direction"]: r for r in rows}
    assert by["default"]["spearman"] == pytest.approx(bd._spearman(default.scores, ref.scores))
    assert by["iterations=40"]["iterations"] == 40 and by["default"]["seconds_over_default"] == 1
    assert by["anderson m=3, iterations=50"]["iterations"] == 50
    assert {r["faithful_iterations"] for r in rows} == {ref.iterations}


def test_checkpoints_are_the_iterates_of_shorter_runs_then_restore(monkeypatch):
    # the long run's C at iteration k is what a k-iteration run returns (same balancing)
    x = _tokens()
    c_step = admm.ScheduledStep._c_step
    with bd.schedule(120), bd.checkpoints() as marks:
        assert admm.SCHEDULE["balance_until"] == 30  # the default's balancing
        bd._fast(x, 3)
    assert admm.ScheduledStep._c_step is c_step
    assert sorted(marks) == list(range(10, 130, 10))
    monkeypatch.setitem(admm.SCHEDULE, "iterations", 80)
    eighty = bd._fast(x, 3)
    assert torch.equal(marks[80][0], eighty.coef)
    assert not torch.equal(marks[70][0], eighty.coef)


def test_length_row_follows_the_iterate_and_stops_on_the_row_sums(monkeypatch):
    monkeypatch.setattr(bd, "LONGEST", 100)
    x = _tokens()
    reference = bd._reference(x, 3)
    default = bd._fast(x, 3)
    row = bd.length_row("tokens", x, 3, False, reference, default.scores)
    ref, bar_sp, bar_ari = reference
    its = [t["iteration"] for t in row["trajectory"]]
    assert its == list(range(10, 110, 10)) and row["longest"] == 100
    at = {t["iteration"]: t for t in row["trajectory"]}
    # the checkpoint at the default's length is the default's answer
    assert row["max_score_difference_to_default"] == 0.0
    assert at[60]["spearman"] == pytest.approx(bd._spearman(default.scores, ref.scores))
    assert at[10]["row_sum_change"] is None and all(t["row_sum_change"] >= 0 for t in
                                                    row["trajectory"][1:])  # fmt: skip
    first = row["first_meeting_both"]
    assert first is None or (at[first]["meets_both"] and all(
        not at[i]["meets_both"] for i in its if i < first))  # fmt: skip
    for tol in bd.STOP_TOLERANCES:
        stop = row[f"stop_{tol:g}_iterations"]
        assert 60 <= stop <= 100
        assert at[stop]["row_sum_change"] <= tol or stop == 100
        assert all(at[i]["row_sum_change"] > tol for i in its if 60 <= i < stop)
        assert row[f"stop_{tol:g}_meets_both"] == at[stop]["meets_both"]
        assert row[f"stop_{tol:g}_meets_both"] == (
            at[stop]["spearman"] >= bar_sp and at[stop]["ari"] >= bar_ari)  # fmt: skip


def test_conditioning_row_reads_lambda_z_and_the_spectrum():
    x = _tokens()
    x[7] *= 1e-2  # one near-black token: mu_z, so lambda_z, is set by it
    row = bd.conditioning_row("tokens", x, 123)
    base = bd.conditioning_row("tokens", _tokens(), 123)
    assert row["faithful_iterations"] == 123 and row["min_norm_over_median"] < 0.02
    assert row["lambda_z"] > 10 * base["lambda_z"]
    assert row["median_eigenvalue_over_rho"] > 5 * base["median_eigenvalue_over_rho"]
    # the continuation: on (start below 1) with the dark token, off without it
    assert base["continuation_start"] == 1.0 and base["mu_z_over_median"] > 0.3
    assert row["continuation_start"] == pytest.approx(row["mu_z_over_median"] / 0.3)
    assert row["continuation_start"] < 0.2


def test_spectrum_row_counts_components_from_the_eigenvalues():
    row = bd.spectrum_row("tokens", _tokens())
    assert row["n"] == 60 and row["rho_final"] > 0
    for key in ("small_in_r_start", "small_in_i_minus_r_start", "small_in_r_final",
                "small_in_i_minus_r_final"):  # fmt: skip
        assert 0 <= row[key] <= 60
    # w / (w + rho) < 1e-2 and rho / (w + rho) < 1e-2 cannot both hold for one component
    assert row["small_in_r_final"] + row["small_in_i_minus_r_final"] <= 60


def test_quick_run_writes_its_rows(tmp_path, monkeypatch):
    # two sets (synthetic tokens, the tiny Qwen model's projector outputs), no Yale B
    monkeypatch.setattr("benchmarks.bench_request_cost.YALE", tmp_path / "absent.mat")
    path = bd.run(quick=True, out_dir=tmp_path)
    data = json.loads(path.read_text())
    kinds = [r["kind"] for r in data["rows"]]
    assert kinds.count("direction") == len(bd.DIRECTIONS) * 2 and "spectrum" in kinds
    assert kinds.count("conditioning") == 2 and kinds.count("length") == 2
    assert {s["stop_tolerance"] for s in data["meta"]["length_summary"]} == set(
        bd.STOP_TOLERANCES)  # fmt: skip
    assert any("Yale B not found" in n for n in data["meta"]["notes"])
    assert {s["direction"] for s in data["meta"]["summary"]} == {d[0] for d in bd.DIRECTIONS}


def test_held_outliers_run_the_e_step_at_full_iterations_only_then_restore(monkeypatch):
    # between full E-steps no E-step runs and Y^T E is made once per full one; the iterate
    # moves (an E-step that still ran would leave it as it was), and the library is restored
    from videoanchor.anchor import fast

    x = _tokens()
    e_step, yte = fast.ActiveSetStep._e_step, fast.ActiveSetStep._yte
    ran = []

    def counting_e_step(self, it, *args):
        ran.append(it)
        return e_step(self, it, *args)

    monkeypatch.setattr(fast.ActiveSetStep, "_e_step", counting_e_step)
    default = bd._fast(x, 3)
    assert ran == list(range(1, 61))
    ran.clear()
    with bd.schedule(None, held_e=True):
        assert fast.ActiveSetStep._e_step is not counting_e_step
        held = bd._fast(x, 3)
    assert fast.ActiveSetStep._e_step is counting_e_step and fast.ActiveSetStep._yte is yte
    assert ran == [it for it in range(1, 61) if it <= 2 or it % 10 == 0]
    assert held.iterations == default.iterations
    assert torch.isfinite(held.coef).all() and not torch.equal(held.coef, default.coef)
    again = bd._fast(x, 3)
    assert torch.equal(again.coef, default.coef)


def test_penalty_prototype_is_the_fast_iterate_and_its_penalties_move_it(monkeypatch):
    """With the default's penalties the float64 transcript the penalty directions run on is
    the fast schedule's iterate (every E-step exact, as the array-API step runs it) to
    rounding; a per-row or a separate affine penalty changes the iterate (the program it
    iterates on is the same: nothing else in the transcript changes)."""
    from videoanchor.anchor import fast
    from videoanchor.anchor.ssc import solve_ssc_admm

    monkeypatch.setitem(fast.FULL, "every", 1)  # the active set's E-step exact every time
    x = _tokens().double()
    x[3] *= 0.05  # one dark token: rows of very different weight for the Jacobi penalty
    ref = solve_ssc_admm(x, scheduled=True, progress=False, dtype=torch.float64).coef
    got = bd.penalty_prototype(x)
    assert (got - ref).abs().max().item() < 1e-7
    for kw in ({"row_weights": "jacobi"}, {"affine_ratio": 10.0}, {"affine_ratio": 0.1},
               {"continuation": False}, {"anderson": 10}):  # fmt: skip
        other = bd.penalty_prototype(x, **kw)
        assert torch.isfinite(other).all() and (other - ref).abs().max().item() > 1e-4, kw
        assert torch.all(other.diagonal() == 0)
    with pytest.raises(ValueError, match="row_weights: expected 'none' or 'jacobi'"):
        bd.penalty_prototype(x, row_weights="ruiz")


def test_penalty_directions_run_their_own_solver():
    """The penalty rows come from the prototype (a callable in DIRECTIONS), and
    prototype_check is its distance from the shipped default on the same tokens."""
    names = [d[0] for d in bd.DIRECTIONS if callable(d[4]) and "prototype" in d[0]]
    assert names == ["rho per row (Jacobi), prototype", "affine penalty x10, prototype",
                     "affine penalty x0.1, prototype",
                     "anderson m=10 after the balancing, prototype"]  # fmt: skip
    x = _tokens()
    labels, scores, its = dict((d[0], d[4]) for d in bd.DIRECTIONS)[names[0]](x, 3)
    assert labels.shape == (60,) and scores.shape == (60,) and its == admm.SCHEDULE["iterations"]
    assert 0 <= bd.prototype_check(x, 3) < 0.05


def test_fresh_sets_have_a_badly_placed_token_and_run_two_directions():
    """The fresh sets (not looked at when the continuation was set) turn it on, and only the
    default and the schedule before it run on them."""
    from videoanchor.anchor.ssc import gram_row_max

    sets = bd.fresh_sets()
    assert len(sets) >= 2 and all(name.startswith("fresh: ") for name, _, _ in sets)
    for _, x, _ in sets[:2]:  # the synthetic ones (Yale B where present)
        assert admm.continuation_start(gram_row_max(x.double())) < 1.0
    x = _tokens()
    ref = bd._reference(x, 3)
    rows = bd.direction_rows("t", x, 3, True, ref, only=bd.FRESH_DIRECTIONS)
    assert [r["direction"] for r in rows] == list(bd.FRESH_DIRECTIONS)
