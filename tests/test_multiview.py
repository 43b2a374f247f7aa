"""Several views of one scene as one request (`--images`, the lmms-eval image tasks): the
CLI and the pipeline on tiny random checkpoints with views the test draws itself."""

from pathlib import Path

import numpy as np
import pytest
import torch
from test_cli_support import moving_shapes, save_tiny_checkpoint

import videoanchor
from videoanchor.cli import main
from videoanchor.pipeline import PipelineError, read_images
from videoanchor.video import write_video
from videoanchor.visualize import CAPTION_H, anchor_figure_layout, render_view_figure

QUESTION = "which view shows the box?"


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def views(tmp_path_factory):
    """Three views of different sizes and formats, as files."""
    from PIL import Image

    root = tmp_path_factory.mktemp("views")
    frames = moving_shapes(9, 64, 96, seed=3)
    paths = []
    for k, (t, size, ext) in enumerate([(0, (96, 64), "png"), (4, (80, 56), "jpg"),
                                        (8, (70, 70), "png")]):  # fmt: skip
        path = root / f"view{k}.{ext}"
        Image.fromarray(frames[t]).resize(size).save(path)
        paths.append(path)
    return paths


_CHECKPOINTS = {}


def checkpoint(family, tmp_path_factory):
    if family not in _CHECKPOINTS:
        path = tmp_path_factory.mktemp(f"mv_{family}")
        save_tiny_checkpoint(family, path)
        _CHECKPOINTS[family] = path
    return _CHECKPOINTS[family]


def _args(model, views, *extra):
    return ["--model", str(model), "--trust-remote-code", "--images", *map(str, views),
            "--n-clusters", "4", "--quiet", *extra]  # fmt: skip


def _direct(model_dir, views, question, **configure_opts):
    """The same request written with transformers and videoanchor directly."""
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(
        model_dir, attn_implementation="videoanchor_triton"
    ).eval()
    processor = AutoProcessor.from_pretrained(model_dir, trust_remote_code=True)
    handle = videoanchor.configure(model, n_clusters=4, **configure_opts)
    content = [{"type": "image"} for _ in views] + [{"type": "text", "text": question}]
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": content}], add_generation_prompt=True
    )
    images = [Image.open(p).convert("RGB") for p in views]
    inputs = dict(processor(text=[prompt], images=[images], return_tensors="pt"))
    return model, processor, handle, inputs


def test_run_with_images_answers_over_all_views(tmp_path_factory, views, capsys):
    model_dir = checkpoint("qwen2_5_vl", tmp_path_factory)
    argv = ["run", *_args(model_dir, views, "--alpha-k", "40", "--alpha-v", "6"),
            "--question", QUESTION, "--max-new-tokens", "6"]  # fmt: skip
    assert main(argv) == 0
    answer = capsys.readouterr().out.rstrip("\n")

    model, processor, handle, inputs = _direct(
        model_dir, views, QUESTION, alpha_k=40.0, alpha_v=6.0
    )
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    expected = processor.batch_decode(
        out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True
    )
    assert answer == expected[0].strip() and answer
    # One SSC over the image tokens of all three views together.
    segments = handle.last_segments[0]
    assert [s.kind for s in segments] == ["image"] * 3
    assert len(handle.last_result[0].labels) == sum(s.length for s in segments)
    # Anchoring changed the answer's logits (so the views were anchored, not just read).
    with torch.inference_mode():
        anchored = model(**inputs).logits[0, -1]
        videoanchor.configure(model, enabled=False)
        plain = model(**inputs).logits[0, -1]
    assert (anchored - plain).abs().max() > 1e-3


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl", "internvl"])
def test_anchors_with_images_draws_every_view(family, tmp_path_factory, tmp_path, views, capsys):
    model_dir = checkpoint(family, tmp_path_factory)
    png = tmp_path / "views.png"
    assert main(["anchors", *_args(model_dir, views), "--out", str(png), "--tile-width", "90"]) == 0
    assert f"wrote {png}" in capsys.readouterr().out

    from PIL import Image

    with Image.open(png) as img:
        size = img.size
    assert size == anchor_figure_layout(3, 64, 96, tile_width=90, with_labels=True).size

    data = np.load(png.with_suffix(".npz"))
    model, _, handle, inputs = _direct(model_dir, views, "Describe the scene.")
    with torch.inference_mode():
        model(**inputs, use_cache=False)
    expected = handle.last_scores.float().numpy()
    np.testing.assert_allclose(data["scores"], expected, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(data["input_ids"], inputs["input_ids"].numpy())
    grids = data["view_grids"]
    assert grids.shape == (3, 2)
    columns = []
    for k in range(3):
        gh, gw = grids[k]
        assert data[f"view{k}_scores"].shape == (gh, gw) == data[f"view{k}_labels"].shape
        np.testing.assert_array_equal(
            data[f"view{k}_scores"].ravel(), data["scores"][0, data[f"view{k}_columns"]]
        )
        columns.append(data[f"view{k}_columns"])
    # The views' columns are disjoint, in prompt order, and cover the visual positions.
    allc = np.concatenate(columns)
    assert (np.diff(allc) > 0).all()
    np.testing.assert_array_equal(np.sort(allc), np.sort(data["visual_positions"]))
    assert [Path(p).name for p in data["images"]] == [p.name for p in views]
    assert data["scores"][0, allc].max() > 0.5


def _one_line_error(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    return err[0]


def test_unreadable_image_is_one_line(tmp_path_factory, tmp_path, views, capsys):
    junk = tmp_path / "broken.jpg"
    junk.write_bytes(b"\xff\xd8 not really a jpeg" * 20)
    model_dir = checkpoint("qwen2_5_vl", tmp_path_factory)
    capsys.readouterr()
    rc = main(["run", *_args(model_dir, [views[0], junk]), "--question", "q"])
    line = _one_line_error(capsys)
    assert rc == 1 and line.startswith("videoanchor run: error: cannot read image")
    assert "broken.jpg" in line
    rc = main(["run", *_args(model_dir, [tmp_path / "gone.png"]), "--question", "q"])
    assert rc == 1 and "image file not found" in _one_line_error(capsys)


def test_video_and_images_cannot_be_mixed(tmp_path, views, capsys):
    video = tmp_path / "v.mp4"
    write_video(video, moving_shapes(4, 32, 32), fps=4)
    rc = main(["anchors", "--video", str(video), "--images", str(views[0]), "-q"])
    assert rc == 1 and "--video and --images cannot be mixed" in _one_line_error(capsys)
    rc = main(["run", "--question", "q", "-q"])
    assert rc == 1 and "expected --video FILE or --images FILE" in _one_line_error(capsys)
    rc = main(["run", "--images", str(views[0]), "--frames", "4", "--question", "q", "-q"])
    assert rc == 1 and "--frames applies to --video only" in _one_line_error(capsys)


def test_family_whose_processor_takes_no_images(tmp_path_factory, views, capsys):
    # The tiny LLaVA processors take videos only (like a processor without an image path).
    model_dir = checkpoint("llava_next_video", tmp_path_factory)
    capsys.readouterr()
    rc = main(["run", *_args(model_dir, views), "--question", "q"])
    line = _one_line_error(capsys)
    assert rc == 1 and "cannot take 3 image(s) in one prompt" in line


def test_read_images(tmp_path, views):
    out = read_images(views)
    assert [v.shape for v in out] == [(64, 96, 3), (56, 80, 3), (70, 70, 3)]
    assert all(v.dtype == np.uint8 for v in out)
    (tmp_path / "d").mkdir()
    with pytest.raises(PipelineError, match="is a directory"):
        read_images([tmp_path / "d"])
    with pytest.raises(PipelineError, match="at least one image"):
        read_images([])


def test_render_view_figure_draws_each_view_with_its_own_grid():
    rng = np.random.default_rng(0)
    views = [rng.integers(0, 255, (40, 60, 3), dtype=np.uint8),
             rng.integers(0, 255, (30, 30, 3), dtype=np.uint8)]  # fmt: skip
    low = [np.zeros((2, 3)), np.zeros((5, 4))]
    high = [np.zeros((2, 3)), np.ones((5, 4))]
    a = np.asarray(render_view_figure(views, low, tile_width=60))
    b = np.asarray(render_view_figure(views, high, tile_width=60))
    layout = anchor_figure_layout(2, 40, 60, tile_width=60, with_title=False)
    assert a.shape[1::-1] == layout.size
    x0, y0 = layout.tile_origin(0)
    x1, y1 = layout.tile_origin(1)
    first = (slice(y0 + CAPTION_H, y0 + CAPTION_H + layout.tile_h), slice(x0, x0 + layout.tile_w))
    second = (slice(y1 + CAPTION_H, y1 + CAPTION_H + layout.tile_h), slice(x1, x1 + layout.tile_w))
    np.testing.assert_array_equal(a[first], b[first])  # view 0 has the same scores
    assert np.abs(a[second].astype(int) - b[second].astype(int)).mean() > 20
    with pytest.raises(ValueError, match="one score map per view"):
        render_view_figure(views, low[:1])
    with pytest.raises(ValueError, match=r"\(Gh, Gw\) score map"):
        render_view_figure(views, [np.zeros((1, 2, 3)), np.zeros((5, 4))])
