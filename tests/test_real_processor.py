"""The path a real checkpoint takes: transformers' own Qwen2.5-VL processor classes
(Qwen2_5_VLProcessor with Qwen2VLImageProcessor and Qwen2VLVideoProcessor, default configs)
and a tokenizer built locally with the `tokenizers` library, saved next to a tiny random
Qwen2.5-VL whose vision patch size is the processor's (14). `videoanchor run` and `anchors`
run end to end on a generated video and on generated views of different sizes.

transformers' Qwen2-VL video processor imports torchvision, and the Qwen2.5-VL processor
cannot be built without a video processor, so these tests need an importable torchvision.
CI installs torchvision 0.28.0 (the package index only has CUDA builds of it; with torch+cpu
its compiled ops cannot load, and tests/torchvision_shim.py, applied by tests/conftest.py,
lets its pure-Python transforms import, which is all the processors use). Where torchvision
still does not import the tests are skipped, saying why, unless VIDEOANCHOR_REQUIRE_TORCHVISION=1
(set by .ci/run), where they fail instead: CI must run them.
"""

import os

import numpy as np
import pytest
import torch
import torchvision_shim
from test_cli_support import moving_shapes, tiny_tokenizer


def _torchvision_problem() -> str | None:
    try:
        import torchvision  # noqa: F401
    except Exception as err:  # ImportError, or RuntimeError from a build for another torch
        line = (str(err).strip().splitlines() or [type(err).__name__])[0]
        return (
            "the real Qwen2.5-VL processor classes need torchvision (transformers' "
            "Qwen2VLVideoProcessor imports torchvision.transforms.v2 and Qwen2_5_VLProcessor "
            f"cannot be built without it); `import torchvision` fails with torch "
            f"{torch.__version__}: {type(err).__name__}: {line}"
            + (f" (even though {torchvision_shim.applied})" if torchvision_shim.applied else "")
        )
    return None


_PROBLEM = _torchvision_problem()
_REQUIRED = os.environ.get("VIDEOANCHOR_REQUIRE_TORCHVISION") == "1"
pytestmark = [
    pytest.mark.skipif(_PROBLEM is not None and not _REQUIRED, reason=_PROBLEM or ""),
    pytest.mark.usefixtures("one_thread"),  # tests/conftest.py
]

FRAMES = 4
OPTS = ["--n-clusters", "4", "--ssc-max-iter", "200", "--quiet"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    if _PROBLEM is not None:
        pytest.fail(f"VIDEOANCHOR_REQUIRE_TORCHVISION=1, but {_PROBLEM}", pytrace=False)
    from transformers import (
        AutoModelForImageTextToText,
        Qwen2_5_VLProcessor,
        Qwen2VLImageProcessor,
        Qwen2VLVideoProcessor,
    )

    from videoanchor.integrations.transformers.testing import tiny_config

    path = tmp_path_factory.mktemp("real_qwen2_5_vl")
    config = tiny_config("qwen2_5_vl")
    config.vision_config.patch_size = 14  # the processors' default patch size
    config.vision_config.window_size = 112  # Qwen2.5-VL's (in pixels: 4 merged tokens)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForImageTextToText.from_config(config).eval()
        with torch.no_grad():
            for name, p in model.named_parameters():
                std = 0.5 if "embed" in name else 0.08
                p.copy_(1.0 + 0.1 * torch.randn_like(p) if "norm" in name else std * torch.randn_like(p))  # fmt: skip
    model.save_pretrained(path)
    tokenizer = tiny_tokenizer("qwen2_5_vl")
    processor = Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(),
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(),
        chat_template=tokenizer.chat_template,
    )
    processor.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    from PIL import Image

    from videoanchor.video import write_video

    root = tmp_path_factory.mktemp("real_media")
    write_video(root / "shapes.mp4", moving_shapes(12, 64, 96), fps=6)
    frames = moving_shapes(6, 64, 96, seed=5)
    views = [root / "front.png", root / "side.jpg"]
    Image.fromarray(frames[0]).save(views[0])
    Image.fromarray(frames[5]).resize((84, 112)).save(views[1])  # portrait: another grid
    return root / "shapes.mp4", views


def _load(checkpoint):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    import videoanchor

    processor = AutoProcessor.from_pretrained(checkpoint)
    assert type(processor).__name__ == "Qwen2_5_VLProcessor"
    assert type(processor.video_processor).__name__ == "Qwen2VLVideoProcessor"
    model = AutoModelForImageTextToText.from_pretrained(
        checkpoint, attn_implementation="videoanchor_triton"
    ).eval()
    handle = videoanchor.configure(model, n_clusters=4, max_iter=200)
    return model, processor, handle


def test_run_on_a_video_with_the_real_processors(checkpoint, media, capsys):
    from transformers.video_utils import VideoMetadata

    from videoanchor.cli import main
    from videoanchor.video import read_video_frames

    video_path, _ = media
    argv = ["run", "--model", str(checkpoint), "--video", str(video_path), "--frames",
            str(FRAMES), "--question", "where is the box?", "--max-new-tokens", "5", *OPTS]  # fmt: skip
    assert main(argv) == 0
    answer = capsys.readouterr().out.rstrip("\n")

    model, processor, handle = _load(checkpoint)
    v = read_video_frames(video_path, FRAMES, progress=False)
    msgs = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "where is the box?"}]}]  # fmt: skip
    prompt = processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    meta = VideoMetadata(total_num_frames=v.total_frames, fps=v.fps, frames_indices=list(v.indices))
    inputs = processor(text=[prompt], videos=[v.frames], video_metadata=[meta],
                       do_sample_frames=False, return_tensors="pt")  # fmt: skip
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    expected = processor.batch_decode(
        out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True
    )
    assert answer == expected[0].strip() and answer
    assert handle.last_anchored and [s.kind for s in handle.last_segments[0]] == ["video"]


def test_anchors_on_a_video_and_on_views_with_the_real_processors(
    checkpoint, media, tmp_path, capsys
):
    from videoanchor.cli import main

    video_path, views = media
    png = tmp_path / "video.png"
    argv = ["anchors", "--model", str(checkpoint), "--video", str(video_path), "--frames",
            str(FRAMES), "--out", str(png), "--tile-width", "96", *OPTS]  # fmt: skip
    assert main(argv) == 0
    data = np.load(png.with_suffix(".npz"))
    # Qwen merges two frames in time and 2x2 patches of 14 pixels in space.
    tt, gh, gw = data["grid"]
    assert tt == FRAMES // 2 and data["grid_scores"].shape == (tt, gh, gw)
    np.testing.assert_array_equal(
        data["grid_scores"].ravel(), data["scores"][0, data["grid_columns"]]
    )

    png = tmp_path / "views.png"
    argv = ["anchors", "--model", str(checkpoint), "--images", *map(str, views),
            "--out", str(png), "--tile-width", "96", *OPTS]  # fmt: skip
    assert main(argv) == 0
    data = np.load(png.with_suffix(".npz"))

    from PIL import Image

    model, processor, handle = _load(checkpoint)
    images = [Image.open(p).convert("RGB") for p in views]
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "image"},
                                         {"type": "text", "text": "Describe the scene."}]}]  # fmt: skip
    prompt = processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    inputs = processor(text=[prompt], images=[images], return_tensors="pt")
    with torch.inference_mode():
        model(**inputs, use_cache=False)
    merged = inputs["image_grid_thw"][:, 1:].numpy() // 2
    np.testing.assert_array_equal(data["view_grids"], merged)
    assert tuple(merged[0]) != tuple(merged[1])  # the portrait view has its own grid
    np.testing.assert_allclose(
        data["scores"], handle.last_scores.float().numpy(), rtol=0, atol=1e-6
    )
    for k in range(2):
        assert data[f"view{k}_scores"].shape == tuple(merged[k])


def test_run_on_views_with_the_real_processors(checkpoint, media, capsys):
    from PIL import Image

    from videoanchor.cli import main

    _, views = media
    question = "which view shows the disc?"
    argv = ["run", "--model", str(checkpoint), "--images", *map(str, views),
            "--question", question, "--max-new-tokens", "5", *OPTS]  # fmt: skip
    assert main(argv) == 0
    answer = capsys.readouterr().out.rstrip("\n")

    model, processor, handle = _load(checkpoint)
    images = [Image.open(p).convert("RGB") for p in views]
    content = [{"type": "image"}, {"type": "image"}, {"type": "text", "text": question}]
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
    )
    inputs = processor(text=[prompt], images=[images], return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    expected = processor.batch_decode(
        out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True
    )
    assert answer == expected[0].strip() and answer
    assert [s.kind for s in handle.last_segments[0]] == ["image", "image"]


def test_the_torchvision_shim_adds_no_compiled_ops():
    """Where the shim was needed, it only made the import possible: torchvision still knows
    its compiled ops are missing and every one of them raises torchvision's own error."""
    import torchvision

    if torchvision_shim.applied is None:
        assert torchvision.extension._has_ops()  # a torchvision whose `_C` loads: no shim
        return
    assert not torchvision.extension._has_ops()
    boxes = torch.tensor([[0.0, 0.0, 2.0, 2.0], [0.5, 0.5, 2.0, 2.0]])
    with pytest.raises(RuntimeError, match="Couldn't load custom C.. ops"):
        torchvision.ops.nms(boxes, torch.tensor([0.9, 0.8]), 0.5)
    with pytest.raises(NotImplementedError):  # the schema exists, but it has no kernel
        torch.ops.torchvision.nms(boxes, torch.tensor([0.9, 0.8]), 0.5)
