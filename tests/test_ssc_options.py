"""The SSC options' one home (issue 33): every entry point's defaults, checks and option lists
come from :class:`videoanchor.anchor.SSCOptions`, and drift between them fails here."""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch

from videoanchor.anchor import (
    SSCOptions,
    compute_anchor_scores,
    solve_ssc_admm,
    solve_ssc_blocked,
    sparse_subspace_clustering,
    ssc_coefficients,
)
from videoanchor.anchor.options import DEFAULTS, SSC_SOLVERS, names_affecting

# (function, {parameter: its deliberate default where it differs from the home's})
_ENTRY_POINTS = [
    (compute_anchor_scores, {}),
    (sparse_subspace_clustering, {"solver": "faithful"}),  # the authors' solver on its own
    (ssc_coefficients, {"progress": False}),
    (solve_ssc_admm, {}),
    (solve_ssc_blocked, {}),
]


@pytest.mark.parametrize("fn,own", _ENTRY_POINTS, ids=[f.__name__ for f, _ in _ENTRY_POINTS])
def test_entry_points_take_the_homes_defaults(fn, own):
    params = inspect.signature(fn).parameters
    shared = [name for name in DEFAULTS.as_dict() if name in params]
    shared = [n for n in shared if params[n].default is not inspect.Parameter.empty]
    assert len(shared) >= 6, f"{fn.__name__} shares only {shared}"
    for name in shared:
        want = own.get(name, getattr(DEFAULTS, name))
        assert params[name].default == want, f"{fn.__name__}({name}=...)"


def test_compute_anchor_scores_takes_every_option():
    params = inspect.signature(compute_anchor_scores).parameters
    assert set(DEFAULTS.as_dict()) <= set(params)
    assert list(params)[:2] == ["features", "n_clusters"]  # (features, n_clusters) unchanged


def test_anchor_config_and_its_forwarding():
    from videoanchor.integrations.options import (
        SSC_CONFIG_NAMES,
        AnchorConfig,
        ssc_kwargs,
        ssc_options,
    )

    cfg = AnchorConfig()
    for name, option in SSC_CONFIG_NAMES.items():
        assert getattr(cfg, name) == getattr(DEFAULTS, option), name
    assert ssc_options(cfg) == DEFAULTS
    kw = ssc_kwargs(AnchorConfig(ssc_solver="faithful", alpha_e=20.0, ssc_dtype=torch.float64))
    assert kw["solver"] == "faithful" and kw["alpha_e"] == 20.0 and kw["dtype"] == torch.float64
    assert "n_clusters" not in kw and "progress" not in kw
    params = inspect.signature(compute_anchor_scores).parameters
    assert set(kw) <= set(params)


def test_ssc_mode_reaches_the_plan_and_the_call():
    """``ssc_mode`` is SSCOptions' ``mode`` under its configure() name: forwarded to
    compute_anchor_scores and to the plan an engine asks for (make_plan decides what "auto"
    runs); a bad value or a combination blocked mode cannot run is refused naming it."""
    from videoanchor.integrations.options import (
        AnchorConfig,
        fast_splits,
        ssc_kwargs,
        ssc_plan,
        validate_ssc_options,
    )

    assert AnchorConfig().ssc_mode == DEFAULTS.mode == "auto"
    for mode, runs in (("auto", "exact"), ("exact", "exact"), ("blocked", "blocked")):
        cfg = AnchorConfig(ssc_mode=mode)
        validate_ssc_options(cfg)
        assert ssc_kwargs(cfg)["mode"] == mode
        plan = ssc_plan(cfg, 40, 8, "cpu")
        assert plan.mode == runs
        assert plan.solver == ("faithful" if mode == "blocked" else "workset")
    # blocked mode runs the authors' iteration: the fast solver is not what splits
    assert fast_splits(AnchorConfig()) and not fast_splits(AnchorConfig(ssc_mode="blocked"))
    with pytest.raises(ValueError, match=r"^ssc_mode: expected one of \('auto', 'exact', "
                                         r"'blocked'\), got 'dense'"):  # fmt: skip
        validate_ssc_options(AnchorConfig(ssc_mode="dense"))
    with pytest.raises(ValueError, match="^ssc_mode: expected one of .*got 3"):
        validate_ssc_options(AnchorConfig(ssc_mode=3))
    with pytest.raises(
        ValueError, match="mode='blocked' runs the authors' iteration or the working sets by blocks"
    ):
        validate_ssc_options(AnchorConfig(ssc_mode="blocked", ssc_solver="fast"))


def test_configure_checks_with_the_home_and_draws_no_seed():
    from videoanchor.integrations.options import AnchorConfig, validate_ssc_options

    state = np.random.get_state()[1].copy()
    validate_ssc_options(AnchorConfig(seed=None))
    assert np.array_equal(np.random.get_state()[1], state)  # seed=None checked, not drawn
    with pytest.raises(ValueError, match="rho: expected a positive finite number"):
        validate_ssc_options(AnchorConfig(rho=-1.0))
    with pytest.raises(ValueError, match="^ssc_solver: expected one of"):  # as configure() names it
        validate_ssc_options(AnchorConfig(ssc_solver="quick"))


def test_every_ssc_option_of_the_config_is_in_the_score_key():
    """Each SSC option a configured model sets changes the cached scores' key, except the
    cluster count (keyed on its own); a gate option does not."""
    from dataclasses import replace

    from videoanchor.integrations.options import SSC_CONFIG_NAMES, AnchorConfig
    from videoanchor.integrations.score_cache import SCORE_OPTIONS, SSC_OPTIONS, score_key

    changed = {"alpha_e": 20.0, "alpha_z": 20.0, "rho": 30.0, "eps": 1e-3, "max_iter": 7,
               "pca_rank": 3, "ssc_backend": "torch", "ssc_solver": "faithful",
               "ssc_dtype": torch.float64, "ssc_precision": "fp16x3", "ssc_mode": "blocked",
               "seed": 5, "label_draws": 2, "dark_tokens": "ignore",
               "cluster_share": "soft"}  # fmt: skip
    assert set(changed) == set(SSC_CONFIG_NAMES) - {"n_clusters"}
    assert set(SSC_OPTIONS) < set(SCORE_OPTIONS) == set(changed)
    base = AnchorConfig()
    key = score_key(["video-hash"], 24, base)
    for name, value in changed.items():
        assert score_key(["video-hash"], 24, replace(base, **{name: value})) != key, name
    assert score_key(["video-hash"], 24, replace(base, alpha_k=1.0)) == key
    assert set(names_affecting("coef")) == {SSC_CONFIG_NAMES[n] for n in SSC_OPTIONS}
    with pytest.raises(ValueError, match="what: expected 'coef' or 'labels'"):
        names_affecting("scores")


def test_command_line_defaults_are_the_homes():
    from videoanchor.cli import build_parser
    from videoanchor.lmms_eval import VideoAnchorLMMCore

    commands = build_parser()._subparsers._group_actions[0].choices
    for name in ("run", "anchors"):
        args = commands[name].parse_args(["--video", "v.mp4", "--question", "q"])
        assert args.n_clusters == DEFAULTS.n_clusters and args.pca_rank == DEFAULTS.pca_rank
        assert args.ssc_max_iter == DEFAULTS.max_iter and args.ssc_solver == DEFAULTS.solver
        assert args.seed == DEFAULTS.seed and args.label_draws == DEFAULTS.label_draws
        solver = next(a for a in commands[name]._actions if a.dest == "ssc_solver")
        assert tuple(solver.choices) == SSC_SOLVERS
    t = commands["tune"].parse_args(["--model", "m", "--data", "d.jsonl"])
    assert (t.pca_rank, t.ssc_max_iter, t.seed, t.label_draws) == (
        DEFAULTS.pca_rank, DEFAULTS.max_iter, DEFAULTS.seed, DEFAULTS.label_draws,
    )  # fmt: skip
    assert t.n_clusters == str(DEFAULTS.n_clusters)
    lmms = inspect.signature(VideoAnchorLMMCore.__init__).parameters
    assert lmms["n_clusters"].default == DEFAULTS.n_clusters
    assert lmms["ssc_max_iter"].default == DEFAULTS.max_iter
    assert lmms["pca_rank"].default == DEFAULTS.pca_rank
    assert lmms["label_draws"].default == DEFAULTS.label_draws


def test_unknown_option_is_a_type_error():
    with pytest.raises(TypeError, match="unexpected keyword argument 'alpha'"):
        SSCOptions(alpha=1.0)
    with pytest.raises(TypeError, match="unexpected keyword argument 'alpha'"):
        compute_anchor_scores(torch.randn(8, 4), 2, alpha=1.0)


def test_checked_normalises():
    out = SSCOptions(max_iter=np.int64(5), seed=np.int32(3), dtype="float64").checked()
    assert type(out.max_iter) is int and type(out.seed) is int and out.dtype == torch.float64
    assert SSCOptions().checked().dtype == torch.float32  # None: float32


def test_process_group_rejects_what_cannot_run_over_processes_up_front():
    """Checked before the ranks' agreement collective, not once a solver has started: the
    faithful solver in exact mode (it runs over processes column-blocked), and CuPy."""
    SSCOptions(mode="exact", solver="faithful").checked()  # fine on one process
    cases = [
        (dict(mode="exact", solver="faithful"), "mode='exact' splits the fast solver's columns"),
        (dict(backend="cupy"), "expected backend 'auto' or 'torch', got 'cupy'"),
    ]
    for kw, phrase in cases:
        with pytest.raises(ValueError) as err:
            SSCOptions(**kw).checked(distributed=True)
        msg = str(err.value)
        assert msg.startswith("process_group: ") and phrase in msg, (kw, msg)
    # what does run: the fast solver split by columns, the authors' iteration blocked
    for kw in (dict(), dict(solver="fast"), dict(mode="exact"), dict(mode="exact", solver="fast"),
               dict(solver="faithful"), dict(mode="blocked"), dict(mode="blocked",
               solver="faithful"), dict(precision="fp16x3")):  # fmt: skip
        SSCOptions(**kw).checked(distributed=True)


def test_scalable_mode_is_gone():
    x = torch.randn(12, 5, generator=torch.Generator().manual_seed(0))
    for kw in (dict(mode="scalable"), dict(candidates=32), dict(mode="exact", candidates=8)):
        with pytest.raises(ValueError, match="scalable approximation was removed") as err:
            compute_anchor_scores(x, 3, **kw)
        assert "mode='blocked'" in str(err.value) and "solver='auto'" in str(err.value)
    with pytest.raises(ModuleNotFoundError):
        import videoanchor.anchor.scalable  # noqa: F401
