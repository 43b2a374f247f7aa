"""The per-step logic both vLLM model runners share (videoanchor/integrations/vllm/runner.py
``fill_step``), without vLLM: requests described as the runners describe them, checked
against a plain reference (one joint SSC over the request's items, placed at their embedding
positions, then ``anchor_gates``). The real runners are tested on a real engine in
tests/test_vllm.py (V1) and tests/test_vllm_v2.py (V2 against V1). Cost: ~2 s.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch

from videoanchor.anchor import compute_anchor_scores
from videoanchor.integrations.options import clusters_for, ssc_kwargs
from videoanchor.integrations.vllm import state
from videoanchor.integrations.vllm.config import engine_config
from videoanchor.integrations.vllm.runner import Scheduled, fill_step
from videoanchor.kernels import anchor_gates

PROMPT = 23
# An image at 4..9 whose first and last positions are not embeddings (is_embed), a video at
# 13..18, text elsewhere; the items are listed out of prompt order on purpose.
IS_EMBED = torch.tensor([False, True, True, True, True, False])
FEATURES = [
    SimpleNamespace(modality="video", identifier="v",
                    mm_position=SimpleNamespace(offset=13, length=6, is_embed=None)),
    SimpleNamespace(modality="image", identifier="i",
                    mm_position=SimpleNamespace(offset=4, length=6, is_embed=IS_EMBED)),
]  # fmt: skip
ROWS = {"v": 6, "i": 4}


def _outputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(n, 8, generator=g) for k, n in ROWS.items()}


def _reference(eng, outs):
    feats = torch.cat([outs["i"], outs["v"]])  # prompt order
    cols = torch.tensor([5, 6, 7, 8, *range(13, 19)])
    res = compute_anchor_scores(feats, clusters_for(feats.shape[0], eng), **ssc_kwargs(eng))
    scores = torch.zeros(PROMPT)
    scores[cols] = res.scores.float()
    return anchor_gates(scores, eng.alpha_k, eng.alpha_v)


def _req(rid, nc, ns, extra=None):
    return Scheduled(rid, nc, ns, PROMPT, FEATURES, extra)


def test_chunks_concurrent_requests_and_padding_match_the_reference(one_thread):
    eng = engine_config({"videoanchor": {"n_clusters": 3, "max_iter": 100}})
    outs = _outputs()
    kb_ref, vs_ref = _reference(eng, outs)
    assert kb_ref[5:9].abs().sum() > 0 and kb_ref[:5].abs().sum() == 0  # scored, text 0
    calls = []

    def encoder_outputs(req_id, indices):
        calls.append((req_id, list(indices)))
        return [outs[FEATURES[i].identifier] for i in indices]

    store = {}
    live = {"a", "off", "all"}

    def step(batch, **pad):
        fill_step(7, eng, store, batch, live, encoder_outputs, **pad)
        st = state.STEP
        assert st.seq_anchored == [n > 0 for n in st.seq_gated_queries]
        return st.key_bias, st.value_scale, st.seq_gated_queries

    # Step 1: "a" prefills 0..7 (reaches the image: one joint SSC over both items, the video
    # not reached yet); "off" its first 5 tokens. Padded to 16 tokens, 4 sequences.
    kb, vs, flags = step([_req("a", 0, 8), _req("off", 0, 5, {"videoanchor": "off"})],
                         num_tokens=16, num_seqs=4)  # fmt: skip
    assert calls == [("a", [1, 0])]  # prompt order: image, video
    torch.testing.assert_close(kb[:8], kb_ref[:8], rtol=0, atol=1e-6)
    torch.testing.assert_close(vs[:8], vs_ref[:8], rtol=0, atol=1e-6)
    assert kb[8:].abs().sum() == 0 and (vs[8:] == 1).all() and kb.numel() == 16
    assert flags == [8, 0, 0, 0]  # queries reading gates, per sequence
    # Step 2: "a" prefills the rest and one generated token (as a preempted request's
    # recompute does): neutral gates there, and its query reads none; "all" (decode="all")
    # reaches only the video.
    batch = [_req("all", 10, 5, {"videoanchor_decode": "all"}), _req("a", 8, PROMPT + 1 - 8)]
    kb, vs, flags = step(batch)
    assert calls[1:] == [("all", [1, 0])]  # "a" is not scored twice
    torch.testing.assert_close(kb[:5], kb_ref[10:15], rtol=0, atol=1e-6)
    torch.testing.assert_close(kb[5:-1], kb_ref[8:], rtol=0, atol=1e-6)
    torch.testing.assert_close(vs[5:-1], vs_ref[8:], rtol=0, atol=1e-6)
    assert kb[-1] == 0 and vs[-1] == 1 and flags == [5, PROMPT - 8]
    # Step 3: decode. "prefill" mode: "a"'s queries read no gates; "all": they do.
    kb, vs, flags = step([_req("a", PROMPT + 1, 1), _req("all", PROMPT + 3, 1)])
    assert kb.tolist() == [0.0, 0.0] and vs.tolist() == [1.0, 1.0] and flags == [0, 1]
    # A request gone from the runner is forgotten.
    live.discard("off")
    step([_req("a", PROMPT + 2, 1)])
    assert set(store) == {"a", "all"}


def test_a_request_whose_scoring_fails_gets_neutral_gates_and_is_recorded(one_thread):
    """A failure while scoring one request (here its encoder outputs have the wrong number
    of rows) does not fail the step: that request gets neutral gates and no gated queries,
    the others of the batch are scored as usual, and the failure is recorded for the
    scheduler (state.FAILED), which finishes the request with an error."""
    eng = engine_config({"videoanchor": {"n_clusters": 3, "max_iter": 100}})
    outs = _outputs()
    kb_ref, _ = _reference(eng, outs)

    def encoder_outputs(req_id, indices):
        if req_id == "bad":
            return [torch.randn(2, 8) for _ in indices]  # fewer rows than positions
        return [outs[FEATURES[i].identifier] for i in indices]

    state.take_failed()
    store = {}
    fill_step(9, eng, store, [_req("bad", 0, PROMPT), _req("good", 0, PROMPT)],
              {"bad", "good"}, encoder_outputs)  # fmt: skip
    st = state.STEP
    bad_kb, good_kb = st.key_bias[:PROMPT], st.key_bias[PROMPT:]
    assert bad_kb.abs().sum() == 0 and (st.value_scale[:PROMPT] == 1).all()
    torch.testing.assert_close(good_kb, kb_ref, rtol=0, atol=1e-6)
    failed = state.take_failed()
    assert list(failed) == ["bad"] and "embedding positions" in failed["bad"], failed
    assert store["bad"].failed and store["good"].failed is None
    # the next step of the failed request scores nothing again and stays neutral
    fill_step(9, eng, store, [_req("bad", PROMPT, 1)], {"bad"}, encoder_outputs)
    assert state.STEP.key_bias.abs().sum() == 0 and not state.take_failed()
