"""Helpers shared by the CLI, video, visualisation and lmms-eval tests (no tests here)."""

from __future__ import annotations

import numpy as np


def moving_shapes(num_frames: int, height: int = 64, width: int = 96, seed: int = 0) -> np.ndarray:
    """(T, H, W, 3) uint8 frames: a white box sliding right and a red disc sliding down
    over a colour gradient; frame t has the box's left edge at column 2 + 3 t."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:height, :width]
    frames = np.empty((num_frames, height, width, 3), dtype=np.uint8)
    for t in range(num_frames):
        img = np.empty((height, width, 3), dtype=np.uint8)
        img[..., 0] = xx * 200 // width
        img[..., 1] = 60 + int(rng.integers(0, 20))
        img[..., 2] = yy * 200 // height
        left = 2 + 3 * t
        img[height // 6 : height // 6 + 14, left : left + 14] = (250, 250, 250)
        disc = (xx - 3 * width // 4) ** 2 + (yy - (8 + 2 * t)) ** 2 < 64
        img[disc] = (230, 30, 30)
        frames[t] = img
    return frames


def box_left_edge(frame: np.ndarray, height: int) -> int:
    """Column where the white box starts in a decoded `moving_shapes` frame."""
    row = frame[height // 6 + 7].astype(int)
    white = np.flatnonzero((row > 200).all(axis=1))
    return int(white[0])


# Token names of the tiny checkpoints, by the ids videoanchor.integrations.transformers.testing uses.
_FAMILY_TOKENS = {
    "qwen": {"image": "<|image_pad|>", "video": "<|video_pad|>",
             "vision_start": "<|vision_start|>", "vision_end": "<|vision_end|>"},
    "internvl": {"image": "<IMG_CONTEXT>", "video": "<video>", "vision_start": "<img>",
                 "vision_end": "</img>"},
    "llava": {"image": "<image>", "video": "<video>", "vision_start": "<unused122>",
              "vision_end": "<unused123>"},
}  # fmt: skip
_VIDEO_IN_TEMPLATE = {
    "qwen": "<|vision_start|><|video_pad|><|vision_end|>",
    "internvl": "<video>\n",
    "llava": "<video>\n",
}
_IMAGE_IN_TEMPLATE = {
    "qwen": "<|vision_start|><|image_pad|><|vision_end|>",
    "internvl": "<IMG_CONTEXT>\n",
    "llava": "<image>\n",
}
_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 \n.,:;!?'\"-()/<>"


def _kind(model_type: str) -> str:
    return "qwen" if model_type.startswith("qwen") else model_type.split("_")[0]


def tiny_tokenizer(model_type: str):
    """A character-level fast tokenizer over the tiny models' 128-token vocabulary."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from videoanchor.integrations.transformers.testing import TEXT_HI, TEXT_LO, TOKENS, VOCAB

    names = {TOKENS["pad"]: "<pad>", TOKENS["bos"]: "<s>", TOKENS["eos"]: "</s>",
             124: "<|im_start|>", 125: "<|im_end|>"}  # fmt: skip
    for key, name in _FAMILY_TOKENS[_kind(model_type)].items():
        names[TOKENS[key]] = name
    vocab = {name: i for i, name in names.items()}
    for k, ch in enumerate(_CHARS[: TEXT_HI - TEXT_LO]):
        vocab[ch] = TEXT_LO + k
    for i in range(VOCAB):
        if i not in vocab.values():
            vocab[f"<unused{i}>"] = i
    tok = Tokenizer(models.WordLevel(vocab, unk_token="?"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    specials = [t for t in vocab if len(t) > 1]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    video = _VIDEO_IN_TEMPLATE[_kind(model_type)]
    image = _IMAGE_IN_TEMPLATE[_kind(model_type)]
    template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
        "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
        "{% if c['type'] == 'video' %}"
        + video
        + "{% elif c['type'] == 'image' %}"
        + image
        + "{% elif c['type'] == 'text' %}{{ c['text'] }}"
        "{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        unk_token="?", chat_template=template,
    )  # fmt: skip


def save_tiny_checkpoint(model_type: str, path) -> None:
    """Save a tiny random model of the family, its tokenizer and the remote-code processor
    (tests/test_cli_tiny_processor.py) so that `videoanchor run --model path
    --trust-remote-code` loads it like a hub checkpoint."""
    import json
    import shutil
    from pathlib import Path

    from videoanchor.integrations.transformers.testing import tiny_model

    path = Path(path)
    model = tiny_model(model_type)
    model.save_pretrained(path)
    tiny_tokenizer(model_type).save_pretrained(path)
    vc = model.config.vision_config
    cfg = {"family": model_type}
    if _kind(model_type) == "qwen":
        cfg.update(frame_size=[8, 12], patch_size=vc.patch_size, merge_size=vc.spatial_merge_size,
                   temporal_patch_size=vc.temporal_patch_size)  # fmt: skip
    elif model_type == "internvl":
        side = vc.image_size[0]
        cfg.update(frame_size=[side, side],
                   pooled=int(side // vc.patch_size[0] * model.config.downsample_ratio))  # fmt: skip
    else:
        side = vc.image_size
        cfg.update(frame_size=[side, side], pooled=-(-(side // vc.patch_size) // 2))
    cfg["processor_class"] = "TinyVideoProcessor"
    cfg["auto_map"] = {"AutoProcessor": "tiny_processor.TinyVideoProcessor"}
    (path / "processor_config.json").write_text(json.dumps(cfg, indent=1))
    shutil.copy(Path(__file__).with_name("test_cli_tiny_processor.py"), path / "tiny_processor.py")


def direct_inputs(model_dir, video_path, question, frames, **configure_opts):
    """What the CLI and the lmms-eval wrapper should compute, written with transformers and
    videoanchor directly: returns (model, processor, handle, inputs)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor
    from transformers.video_utils import VideoMetadata

    import videoanchor
    from videoanchor.video import read_video_frames

    v = read_video_frames(video_path, frames, progress=False)
    model = AutoModelForImageTextToText.from_pretrained(
        model_dir, attn_implementation="videoanchor_triton"
    ).eval()
    processor = AutoProcessor.from_pretrained(model_dir, trust_remote_code=True)
    handle = videoanchor.configure(model, **configure_opts)
    msgs = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": question}]}]
    prompt = processor.apply_chat_template(msgs, add_generation_prompt=True)
    meta = VideoMetadata(total_num_frames=v.total_frames, fps=v.fps, frames_indices=list(v.indices))
    inputs = processor(text=[prompt], videos=[v.frames], video_metadata=[meta], return_tensors="pt")
    return model, processor, handle, dict(inputs)


def greedy_answer(model, processor, inputs, max_new_tokens: int) -> str:
    import torch

    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    new = out[:, inputs["input_ids"].shape[1] :]
    return processor.batch_decode(new, skip_special_tokens=True)[0].strip()


# ---- issue 71: every entry point runs the library's default solver --------------------------


def record_ssc(monkeypatch) -> list:
    """Records the features every SSC of an entry point is handed (observation only): the
    transformers path calls ``compute_anchor_scores``, its anchor cache ``ssc_coefficients``;
    both are looked up in ``videoanchor.anchor`` at each call."""
    import videoanchor.anchor as anchor

    seen = []
    for name in ("compute_anchor_scores", "ssc_coefficients"):
        orig = getattr(anchor, name)

        def recorded(features, *args, _orig=orig, **kwargs):
            seen.append(features.detach().clone())
            return _orig(features, *args, **kwargs)

        monkeypatch.setattr(anchor, name, recorded)
    return seen


def assert_default_solver(seen: list, results: list, n_clusters: int) -> None:
    """Each result an entry point returned (an ``AnchorResult``, or its ``solver`` and
    ``scores``) came from the working sets, the CPU's default, and has the scores that
    ``compute_anchor_scores`` with its own defaults gives on the recorded features."""
    import torch

    from videoanchor.anchor.scores import compute_anchor_scores  # (not the recorded one)

    assert len(seen) == len(results) >= 1, (len(seen), len(results))
    for features, res in zip(seen, results, strict=True):
        again = compute_anchor_scores(features, min(n_clusters, features.shape[0]))
        assert (res.solver, again.solver) == ("workset", "workset"), (res.solver, again.solver)
        torch.testing.assert_close(torch.as_tensor(res.scores).float(), again.scores.float(),
                                   atol=1e-6, rtol=0)  # fmt: skip
