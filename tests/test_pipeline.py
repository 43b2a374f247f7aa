"""The library layer (videoanchor.pipeline) stands on its own: nothing imports the CLI."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "videoanchor"


def _imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_nothing_in_the_package_imports_the_cli():
    importers = [
        str(path.relative_to(PACKAGE.parent))
        for path in sorted(PACKAGE.rglob("*.py"))
        if path.name != "cli.py" and "videoanchor.cli" in _imported_modules(path)
    ]
    assert importers == []


def test_lmms_eval_wrapper_uses_the_pipeline():
    wrapper = _imported_modules(PACKAGE / "lmms_eval.py")
    assert "videoanchor.pipeline" in wrapper
    assert "videoanchor.pipeline" in _imported_modules(PACKAGE / "cli.py")


@pytest.mark.parametrize("kind", ["linear", "text_only_lm"])
def test_configure_rejects_a_model_that_is_not_a_vlm(kind):
    import torch

    import videoanchor

    if kind == "linear":
        model, got = torch.nn.Linear(3, 3), "got Linear (no transformers config"
    else:
        from transformers import LlamaConfig, LlamaForCausalLM

        cfg = LlamaConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1,
                          num_attention_heads=2, intermediate_size=32)  # fmt: skip
        model, got = LlamaForCausalLM(cfg), "got LlamaForCausalLM (model_type 'llama'"
    with pytest.raises(TypeError, match="expected a vision-language model") as exc:
        videoanchor.configure(model)
    assert got in str(exc.value)
    assert "qwen2_5_vl" in str(exc.value) and "llava_onevision" in str(exc.value)


@pytest.mark.parametrize("family", ["qwen3_vl", "internvl", "llava_onevision"])
def test_batched_prefill_matches_single_prompts(family, tmp_path):
    """Left-padded batches: each sample's scores and next-token logits are those of its own
    single-prompt prefill (SSC per sample, padding ignored)."""
    import torch
    from test_cli_support import moving_shapes, save_tiny_checkpoint

    import videoanchor
    from videoanchor.pipeline import load_vlm, video_batch_inputs
    from videoanchor.video import read_video_frames, write_video

    save_tiny_checkpoint(family, tmp_path / "ckpt")
    videos = []
    for i, n in enumerate((9, 14, 11)):
        write_video(tmp_path / f"{i}.mp4", moving_shapes(n, 64, 96, seed=i), fps=10)
        videos.append(read_video_frames(tmp_path / f"{i}.mp4", 4, progress=False))
    questions = ["where?", "what colour is the disc, and where is the box?", "how many?"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model, processor, _ = load_vlm(str(tmp_path / "ckpt"), device="cpu", trust_remote_code=True)
        handle = videoanchor.configure(model, n_clusters=4, alpha_k=40.0, alpha_v=6.0)
        batch = video_batch_inputs(processor, videos, questions)
        mask = batch["attention_mask"]
        assert not mask[:, 0].all() and mask[:, -1].all()  # left-padded
        with torch.inference_mode():
            logits = model(**batch).logits[:, -1].double()
            scores = handle.last_scores.double().clone()
            for b in range(3):
                one = video_batch_inputs(processor, videos[b : b + 1], questions[b : b + 1])
                single = model(**one).logits[0, -1].double()
                torch.testing.assert_close(logits[b], single, rtol=0, atol=1e-4)
                n = one["input_ids"].shape[1]
                torch.testing.assert_close(
                    scores[b, -n:], handle.last_scores[0].double(), rtol=0, atol=1e-5
                )
                assert (scores[b, :-n] == 0).all()  # padding is never scored
    finally:
        torch.set_num_threads(threads)


def test_bad_inputs_are_clear_errors():
    import numpy as np
    import torch

    from videoanchor.pipeline import generate_answer, generate_answers, image_batch_inputs

    right_padded = {
        "input_ids": torch.ones(2, 5, dtype=torch.long),
        "attention_mask": torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]),
    }
    with pytest.raises(ValueError, match="expected left-padded prompts"):
        generate_answers(None, None, right_padded, None, max_new_tokens=2)
    with pytest.raises(ValueError, match="expected inputs of one prompt, got 2"):
        generate_answer(None, None, right_padded, None, max_new_tokens=2)
    with pytest.raises(ValueError, match="max_new_tokens >= 1"):
        generate_answers(None, None, right_padded, None, max_new_tokens=0)
    with pytest.raises(TypeError, match=r"\(H, W, 3\) uint8 array"):
        image_batch_inputs(None, [[np.zeros((4, 4, 3), np.float32)]], ["q"])
    with pytest.raises(ValueError, match="one list of views per question"):
        image_batch_inputs(None, [[np.zeros((4, 4, 3), np.uint8)]], ["q", "r"])
