"""The README and the user guides against the code: option names, links, the API pages.

Cheap text checks (no docs toolchain needed); the site itself is built by CI with
``mkdocs build --strict`` (a broken reference or an exported object without a docstring fails
there). Each check here fails if a documented name stops existing in the code.
"""

from __future__ import annotations

import importlib
import inspect
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
CLI_DOCS = [README, DOCS / "guides" / "cli.md"]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def _code_blocks(text: str) -> list[str]:
    return re.findall(r"```[a-z]*\n(.*?)```", text, re.S)


def test_readme_is_a_landing_page_with_the_ci_test_command():
    text = README.read_text()
    lines = text.count("\n")
    assert lines <= 200, f"README.md has {lines} lines; expected at most 200 (move detail to docs/)"
    ci = (ROOT / ".ci" / "run").read_text()
    assert "python3 -m pytest -q" in ci
    assert "python3 -m pytest -q" in text, "the README must show the test command CI runs"


@pytest.mark.parametrize(
    "page", [README, *sorted(DOCS.rglob("*.md"))], ids=lambda p: str(p.relative_to(ROOT))
)
def test_relative_links_point_to_files(page):
    missing = []
    for target in LINK.findall(page.read_text()):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue  # a URL or an anchor on the same page (mkdocs --strict checks anchors)
        path = (page.parent / target.split("#")[0]).resolve()
        if not path.exists():
            missing.append(target)
    assert not missing, f"{page.name}: links to missing files {missing}"


def _parser_options() -> set[str]:
    from videoanchor.cli import build_parser

    parser = build_parser()
    options = set(parser._option_string_actions)
    for action in parser._subparsers._group_actions:
        for sub in action.choices.values():
            options |= set(sub._option_string_actions)
    return options


def test_documented_cli_options_exist():
    options = _parser_options()
    documented = set()
    for page in CLI_DOCS:
        text = page.read_text()
        for block in _code_blocks(text):
            for line in block.splitlines():
                if line.strip().startswith("videoanchor "):
                    documented |= set(re.findall(r"(?<![\w-])(--?[a-z][a-z-]*)", line))
        if page.name == "cli.md":  # the prose there only talks about this command's options
            documented |= set(re.findall(r"`(--?[a-z][a-z-]*)", text))
    assert documented, "no options found: has the guide's format changed?"
    unknown = sorted(documented - options)
    assert not unknown, f"documented but not accepted by `videoanchor`: {unknown}"


def test_documented_cli_commands_exist():
    from videoanchor.cli import build_parser

    commands = set(build_parser()._subparsers._group_actions[0].choices)
    used = set()
    for page in CLI_DOCS:
        used |= set(re.findall(r"^\s*videoanchor ([a-z]+)", page.read_text(), re.M))
    assert used and used <= commands, f"unknown commands {sorted(used - commands)}"


def test_documented_lmms_eval_names_and_arguments_exist():
    from videoanchor.integrations.transformers import ATTN_IMPLEMENTATION
    from videoanchor.lmms_eval import MODEL_NAMES, VideoAnchorLMMCore

    accepted = set(inspect.signature(VideoAnchorLMMCore.__init__).parameters) - {"self", "kwargs"}
    for page in (README, DOCS / "guides" / "evaluation.md"):
        text = page.read_text()
        names = set(re.findall(r"\bvideoanchor_[a-z0-9_]+", text)) - {ATTN_IMPLEMENTATION}
        assert names and names <= set(MODEL_NAMES), sorted(names - set(MODEL_NAMES))
        args = set()
        for value in re.findall(r"ARGS=(\S+)", text) + re.findall(r"\$ARGS,(\S+)", text):
            args |= {kv.split("=")[0] for kv in value.split(",")}
        assert args and args <= accepted, f"{page.name}: unknown model_args {args - accepted}"
    guide = (DOCS / "guides" / "evaluation.md").read_text()
    listed = guide[guide.index("`--model_args`:") : guide.index("A document's visuals")]
    listed = set(re.findall(r"`([a-z_]+)`", re.sub(r"\([^)]*\)", "", listed)))  # not the values
    assert listed and listed <= accepted, f"unknown model_args {sorted(listed - accepted)}"
    assert accepted - {"max_batch_size", "batch_size"} <= listed, "an argument is undocumented"


def test_documented_configure_options_exist():
    from videoanchor.integrations.transformers import configure

    accepted = set(inspect.signature(configure).parameters) - {"model"}
    guide = (DOCS / "guides" / "transformers.md").read_text()
    section = guide[guide.index("## `configure`") : guide.index("## Supported families")]
    bullets = "\n".join(line for line in section.splitlines() if line.startswith(("- ", "  ")))
    named = set(re.findall(r"(?<!\[)`([a-z_]+)(?:=[^`]*)?`", bullets))
    assert named, "no options found: has the guide's format changed?"
    assert named <= accepted, f"documented but not accepted: {sorted(named - accepted)}"
    assert accepted <= named, f"configure options missing from the guide: {accepted - named}"


def _rendered_modules() -> set[str]:
    modules = set()
    for page in (DOCS / "api").glob("*.md"):
        modules |= set(re.findall(r"^::: ([\w.]+)", page.read_text(), re.M))
    return modules


def test_api_reference_renders_every_public_name():
    modules = _rendered_modules()
    wanted = {
        "videoanchor.kernels",
        "videoanchor.anchor",
        "videoanchor.integrations.transformers",
        "videoanchor.pipeline",
        "videoanchor.cli",
    }
    assert wanted <= modules, f"API pages miss {sorted(wanted - modules)}"
    exported = set()
    for name in modules:
        module = importlib.import_module(name)
        exported |= set(getattr(module, "__all__", ()))
    import videoanchor

    top = set(videoanchor.__all__) - {"__version__"}
    assert top <= exported, f"videoanchor names not in any API page: {sorted(top - exported)}"
    overview = (DOCS / "api" / "index.md").read_text()
    missing = sorted(n for n in videoanchor.__all__ if f"`videoanchor.{n}`" not in overview)
    assert not missing, f"docs/api/index.md does not list {missing}"
