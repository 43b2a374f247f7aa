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
    wrapper = _imported_modules(PACKAGE / "integrations" / "lmms_eval.py")
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
