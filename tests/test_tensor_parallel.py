"""Tensor-parallel inference: 2 CPU processes (spawn, gloo), transformers' ``tp_plan="auto"``.

A tiny random Qwen2.5-VL is saved to a temporary directory; the test process loads it alone
(the reference) and two spawned ranks load it with ``tp_plan="auto"`` (q/k/v column-sharded,
o row-sharded: each rank holds 2 of the 4 query heads and 1 of the 2 KV heads). Every rank
must give the single-process logits and greedy tokens, see only its own heads and apply
bitwise-identical gates. With the fast solver (the default) every rank runs its share of
the SSC (the columns split over the group); with the faithful one rank 0 runs it alone and
rank 1 never runs SSC (its SSC raises if called without the group).
"""

import os
import pickle
import socket
import time

import pytest
import torch
import torch.multiprocessing as mp
import torchvision_shim

# A spawned rank imports this module but not conftest.py: apply the test-only shim here too,
# before videoanchor imports transformers (a no-op where torchvision is absent or loads).
torchvision_shim.apply()

import videoanchor  # noqa: E402
from videoanchor.integrations.transformers.testing import TOKENS, collate, tiny_model, tiny_sample  # noqa: E402

pytestmark = pytest.mark.distributed

WORLD = 2
SSC = {"n_clusters": 3, "max_iter": 300}
SPECIAL = [TOKENS[k] for k in ("image", "video", "vision_start", "vision_end", "eos", "pad")]
GEN = {"max_new_tokens": 4, "min_new_tokens": 4, "do_sample": False, "suppress_tokens": SPECIAL}
TIMEOUT_S = 240


def _batch(config, seed=10):
    # Two samples with different visual token counts, left padded.
    return collate(
        [
            tiny_sample(config, [4], text=5, seed=seed),
            tiny_sample(config, [2], text=9, seed=seed + 1),
        ]
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _groups(model, dist):
    """Ranks of the group "auto" finds on the TP model, and on a model sharded over a mesh
    whose only dimension is "fsdp" (not tensor parallel: None)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, distribute_tensor

    from videoanchor.integrations.transformers.distributed import tensor_parallel_group

    tp = tensor_parallel_group(model.model.language_model)
    fsdp = init_device_mesh("cpu", (WORLD,), mesh_dim_names=("fsdp",))
    lin = torch.nn.Linear(3, 3)
    lin.weight = torch.nn.Parameter(distribute_tensor(lin.weight.data, fsdp, [Replicate()]))
    return {
        "tp": dist.get_process_group_ranks(tp),
        "model_tp": dist.get_process_group_ranks(model._device_mesh["tp"].get_group()),
        "fsdp": tensor_parallel_group(lin),
    }


def _rank_main(rank, path, port, out_dir):
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(WORLD),
        LOCAL_WORLD_SIZE=str(WORLD),
    )
    torch.set_num_threads(1)
    from datetime import timedelta

    import torch.distributed as dist
    from transformers import AutoModelForImageTextToText

    import videoanchor.anchor as anchor

    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=timedelta(seconds=120))
    report = {}
    try:
        model = AutoModelForImageTextToText.from_pretrained(
            path, attn_implementation="videoanchor_triton", tp_plan="auto"
        ).eval()
        handle = videoanchor.configure(model, **SSC, decode="all")
        report["groups"] = _groups(model, dist)
        original = anchor.compute_anchor_scores
        calls = []

        def spy(*args, **kwargs):
            calls.append(kwargs.get("process_group") is not None)
            if rank != 0 and kwargs.get("process_group") is None:
                raise AssertionError("SSC ran alone on rank 1: the scores must come from rank 0")
            return original(*args, **kwargs)

        anchor.compute_anchor_scores = spy
        # What every attention call hands the kernel: its heads and the gates.
        import videoanchor.integrations.transformers.attention as attention_mod

        seen = []
        kernel = attention_mod.anchored_attention

        def record(query, key, value, gates=None, **kw):
            kept = None if gates is None else [t.clone() for t in gates.natural(key.shape[2])]
            seen.append((query.shape[1], key.shape[1], kept))
            return kernel(query, key, value, gates=gates, **kw)

        attention_mod.anchored_attention = record
        batch = _batch(model.config)
        with torch.no_grad():
            report["logits"] = model(**batch).logits
            report["scores"] = handle.last_scores.clone()
            report["prefill_seen"] = list(seen)
            report["tokens"] = model.generate(**batch, **GEN)
        report["ssc_calls"] = list(calls)
        report["coef_none"] = [r is None or r.coef is None for r in handle.last_result]
        report["labels"] = [None if r is None else r.labels for r in handle.last_result]
        report["heads"] = sorted({(q, k) for q, k, _ in seen})

        # Long videos: where one process would take the blocked solver ("auto" does where the
        # dense one does not fit; ssc_mode="blocked" here), its column blocks are divided
        # among the ranks.
        handle = videoanchor.configure(model, ssc_mode="blocked")
        calls.clear()
        with torch.no_grad():
            report["blocked_logits"] = model(**batch).logits
        handle = videoanchor.configure(model, ssc_mode="auto")
        report["blocked_scores"] = handle.last_scores.clone()
        report["blocked_calls"] = list(calls)
        report["blocked_modes"] = [r.mode for r in handle.last_result]
        report["blocked_coef"] = [r.coef is not None for r in handle.last_result]

        # The faithful solver in exact mode does not split: rank 0 alone, scores sent.
        handle = videoanchor.configure(model, **SSC, decode="all", ssc_solver="faithful")
        calls.clear()
        with torch.no_grad():
            report["alone_logits"] = model(**batch).logits
        report["alone_scores"] = handle.last_scores.clone()
        report["alone_calls"] = list(calls)
        report["alone_coef_none"] = [r is None or r.coef is None for r in handle.last_result]

        # Different requests on the ranks (same shapes, other pixels): every rank must raise.
        other = _batch(model.config, seed=10 + 7 * rank)
        try:
            with torch.no_grad():
                model(**other)
            report["mismatch"] = "no error"
        except RuntimeError as exc:
            report["mismatch"] = str(exc)

        # SSC failing on rank 0: rank 0 raises its error, rank 1 a RuntimeError naming it.
        def broken(*args, **kwargs):
            raise ValueError("boom from the SSC of rank 0")

        anchor.compute_anchor_scores = broken
        try:
            with torch.no_grad():
                model(**batch)
            report["failure"] = "no error"
        except Exception as exc:
            report["failure"] = f"{type(exc).__name__}: {exc}"
        anchor.compute_anchor_scores = original
    except Exception as exc:  # reported to the test process, which fails with it
        import traceback

        report["crash"] = f"{exc!r}\n{traceback.format_exc()}"
    finally:
        with open(os.path.join(out_dir, f"rank{rank}.pkl"), "wb") as f:
            pickle.dump(report, f)
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_qwen2_5_vl")
    out_dir = tmp_path_factory.mktemp("ranks")
    tiny_model("qwen2_5_vl", seed=1).save_pretrained(path)

    from transformers import AutoModelForImageTextToText

    single = AutoModelForImageTextToText.from_pretrained(
        path, attn_implementation="videoanchor_triton"
    ).eval()
    handle = videoanchor.configure(single, **SSC, decode="all")
    batch = _batch(single.config)

    with torch.no_grad():
        ref = {
            "logits": single(**batch).logits,
            "scores": handle.last_scores.clone(),
            "tokens": single.generate(**batch, **GEN),
        }
        handle = videoanchor.configure(single, ssc_mode="blocked")
        ref["blocked_logits"] = single(**batch).logits
        handle = videoanchor.configure(single, ssc_mode="auto")
        ref["blocked_scores"] = handle.last_scores.clone()
        ref["blocked_modes"] = [r.mode for r in handle.last_result]
        handle = videoanchor.configure(single, **SSC, decode="all", ssc_solver="faithful")
        ref["alone_logits"] = single(**batch).logits
        ref["alone_scores"] = handle.last_scores.clone()

    ctx = mp.start_processes(
        _rank_main,
        args=(str(path), _free_port(), str(out_dir)),
        nprocs=WORLD,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + TIMEOUT_S
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            pytest.fail(f"the {WORLD} ranks did not finish within {TIMEOUT_S} s (a hang)")
    ranks = []
    for r in range(WORLD):
        with open(out_dir / f"rank{r}.pkl", "rb") as f:
            rep = pickle.load(f)
        assert "crash" not in rep, f"rank {r} failed:\n{rep['crash']}"
        ranks.append(rep)
    return ref, ranks, batch


def test_auto_finds_the_tensor_parallel_group_only(runs):
    _, ranks, _ = runs
    for rep in ranks:
        assert rep["groups"] == {"tp": [0, 1], "model_tp": [0, 1], "fsdp": None}


def test_each_rank_sees_its_own_heads(runs):
    _, ranks, _ = runs
    for rep in ranks:  # the tiny text config has 4 query and 2 KV heads
        assert rep["heads"] == [(4 // WORLD, 2 // WORLD)]


def test_fast_scores_split_over_the_ranks_and_gates_identical(runs):
    ref, ranks, _ = runs
    # (forward + generate) x samples, every rank with the group: the columns split
    for rep in ranks:
        assert rep["ssc_calls"] == [True] * (2 * 2)
        assert torch.equal(rep["scores"], ranks[0]["scores"])
        for a, b in zip(rep["labels"], ranks[0]["labels"], strict=True):
            assert torch.equal(a, b)
        assert rep["coef_none"] == [False, False]  # C all-gathered on every rank
    # The single-process fast scores, to the rounding of the split's cross-rank sums.
    assert torch.allclose(ranks[0]["scores"], ref["scores"], rtol=0, atol=1e-5)
    assert (ranks[0]["scores"] > 0.5).any()
    # Every anchored attention call, prefill and layers alike, got the same gates everywhere.
    seen0, seen1 = ranks[0]["prefill_seen"], ranks[1]["prefill_seen"]
    assert len(seen0) == len(seen1) == 2  # two decoder layers
    for (_, _, g0), (_, _, g1) in zip(seen0, seen1, strict=True):
        assert g0 is not None and torch.equal(g0[0], g1[0]) and torch.equal(g0[1], g1[1])


def test_faithful_scores_computed_once_on_rank0(runs):
    ref, ranks, batch = runs
    assert ranks[0]["alone_calls"] == [False, False]  # one per sample, alone
    assert ranks[1]["alone_calls"] == []
    assert ranks[0]["alone_coef_none"] == [False, False]  # the source keeps its full result
    assert ranks[1]["alone_coef_none"] == [True, True]  # C is never sent
    valid = batch["attention_mask"].bool()
    for rep in ranks:
        assert torch.equal(rep["alone_scores"], ranks[0]["alone_scores"])
        assert torch.allclose(rep["alone_scores"], ref["alone_scores"], rtol=0, atol=1e-6)
        diff = (rep["alone_logits"].double() - ref["alone_logits"].double())[valid]
        assert diff.abs().max().item() < 2e-5


def test_logits_and_greedy_tokens_equal_single_process(runs):
    ref, ranks, batch = runs
    valid = batch["attention_mask"].bool()
    for rep in ranks:
        # Row-parallel o_proj / down_proj sum partial products: fp32 summation order only.
        diff = (rep["logits"].double() - ref["logits"].double())[valid].abs().max().item()
        assert diff < 2e-5
        assert torch.equal(rep["tokens"], ref["tokens"])
    assert ref["tokens"].shape[1] == batch["input_ids"].shape[1] + GEN["max_new_tokens"]


def test_blocked_solver_spread_over_the_ranks(runs):
    ref, ranks, batch = runs
    assert ref["blocked_modes"] == ["blocked", "blocked"]
    valid = batch["attention_mask"].bool()
    for rep in ranks:
        assert rep["blocked_calls"] == [True, True]  # every rank, with the group, per sample
        assert rep["blocked_modes"] == ["blocked", "blocked"]
        assert rep["blocked_coef"] == [True, True]
        assert torch.equal(rep["blocked_scores"], ranks[0]["blocked_scores"])
        assert torch.allclose(rep["blocked_scores"], ref["blocked_scores"], rtol=0, atol=1e-6)
        diff = (rep["blocked_logits"].double() - ref["blocked_logits"].double())[valid]
        assert diff.abs().max().item() < 2e-5


def test_ranks_with_different_requests_all_raise(runs):
    _, ranks, _ = runs
    for rep in ranks:
        assert "hold different requests" in rep["mismatch"]


def test_a_failure_on_rank0_reaches_every_rank(runs):
    _, ranks, _ = runs
    assert ranks[0]["failure"] == "ValueError: boom from the SSC of rank 0"
    assert ranks[1]["failure"].startswith("RuntimeError: videoanchor: rank 0 of the anchoring")
    assert "boom from the SSC of rank 0" in ranks[1]["failure"]


def test_process_group_option_is_validated():
    model = tiny_model("qwen2_5_vl", attn_implementation="videoanchor_triton")
    with pytest.raises(TypeError, match="process_group: expected 'auto'"):
        videoanchor.configure(model, process_group="tp")
    handle = videoanchor.configure(model, process_group=None)
    assert handle.config.process_group is None
    # Not tensor parallel: "auto" finds no group and nothing is communicated.
    from videoanchor.integrations.transformers.distributed import resolve_group

    assert resolve_group("auto", model.model.language_model) is None
