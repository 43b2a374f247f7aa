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
    command = "python3 -m pytest -q -n 2 --dist loadfile"
    assert f"\n{command}\n" in ci
    assert command in text, "the README must show the test command CI runs"


FIRST_SCREEN = re.compile(r"<!-- first-screen[^>]*-->\n(.*?)<!-- /first-screen -->", re.S)


def _first_screen(page: Path) -> str:
    m = FIRST_SCREEN.search(page.read_text())
    assert m, f"{page.relative_to(ROOT)}: no <!-- first-screen --> ... <!-- /first-screen -->"
    return m.group(1)


def test_readme_and_docs_home_share_the_first_screen():
    readme, home = _first_screen(README), _first_screen(DOCS / "index.md")
    # the same text; the README links into docs/, the home page from inside it
    assert readme.replace("](docs/", "](") == home, "README.md and docs/index.md differ"
    assert README.read_text().index("<!-- first-screen") < 200, "not at the top of the README"
    for part in ("**What it does.**", "```python", "pip install", "**Status.**",
                 "<!-- report.py:verification -->", "<!-- report.py:speed -->", "**Serving.**"):  # fmt: skip
        assert part in home, f"the first screen lacks {part!r}"
    table = re.search(r"\| Component \|.*\n", home)
    assert table and all(c in table.group(0) for c in
                         ("Run on a GPU", "Compiled for a GPU", "Runs on the CPU", "Timed"))  # fmt: skip


def test_the_first_screen_code_fits_the_docs_column():
    # about 80 characters show in the docs' code blocks at 1280 px before they scroll
    long = [line for block in _code_blocks(_first_screen(README)) for line in block.splitlines()
            if len(line) > 80]  # fmt: skip
    assert not long, f"first-screen code lines over 80 characters: {long}"


@pytest.mark.slow
def test_the_first_screen_snippet_runs_on_a_cpu_within_its_stated_time():
    import subprocess
    import sys
    import time

    code = _code_blocks(_first_screen(README))
    snippet = next(c for c in code if "videoanchor." in c)
    stated = re.search(r"runs in about (?:\d+-)?(\d+) s", _first_screen(README))
    assert stated, "the run time next to the snippet is not stated"
    t0 = time.perf_counter()
    # the test-only torchvision shim first, as conftest.py applies it here (see its docstring)
    shim = "import sys; sys.path.insert(0, 'tests'); import torchvision_shim; torchvision_shim.apply()\n"
    out = subprocess.run([sys.executable, "-c", shim + snippet + "\nprint(tuple(out.shape))"],
                         capture_output=True, text=True, cwd=ROOT, timeout=600)  # fmt: skip
    took = time.perf_counter() - t0
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("(1, 4, 128, 64)")
    # a loose bound: the stated time is from a shared 2-core machine
    assert took < 10 * int(stated.group(1)), f"took {took:.0f} s"


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


def test_every_run_option_is_documented():
    """The converse of the test above: each option of `run` and `anchors` is in the guide."""
    from videoanchor.cli import build_parser

    guide = (DOCS / "guides" / "cli.md").read_text()
    documented = set(re.findall(r"(?<![\w-])(--[a-z][a-z-]*)", guide))
    commands = build_parser()._subparsers._group_actions[0].choices
    for name in ("run", "anchors"):
        options = {o for o in commands[name]._option_string_actions if o.startswith("--")}
        missing = sorted(options - documented - {"--help"})
        assert not missing, f"`videoanchor {name}` options missing from guides/cli.md: {missing}"


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
        if page == README:  # the evaluation section only (vLLM request keys look alike)
            text = text[text.index("### Evaluation") :]
            text = text[: text.index("\n### ", 1)]
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


def _rendered() -> tuple[set[str], set[str]]:
    """(the objects the API pages render, as "module.name", and the modules they render
    from): a ``::: module`` directive renders its ``__all__`` (or its ``members:`` list;
    none with ``members: false``), a ``::: module.object`` directive that one object."""
    names, modules = set(), set()
    for page in (DOCS / "api").glob("*.md"):
        text = page.read_text()
        for m in re.finditer(r"^::: ([\w.]+)\n((?:[ \t]+.*\n)*)", text, re.M):
            target, opts = m.group(1), m.group(2)
            try:
                module = importlib.import_module(target)
            except ModuleNotFoundError:
                parent, obj = target.rsplit(".", 1)
                importlib.import_module(parent)
                names.add(f"{parent}.{obj}")
                modules.add(parent)
                continue
            modules.add(target)
            listed = re.search(r"members:\s*\[([^\]]*)\]", opts)
            if re.search(r"members:\s*false", opts):
                members = []
            elif listed:
                members = [x.strip() for x in listed.group(1).split(",") if x.strip()]
            else:
                members = list(getattr(module, "__all__", ()))
            names |= {f"{target}.{x}" for x in members}
    return names, modules


def test_api_reference_renders_every_public_name():
    names, modules = _rendered()
    wanted = {
        "videoanchor.kernels",
        "videoanchor.anchor",
        "videoanchor.integrations.transformers",
        "videoanchor.integrations.vllm",
        "videoanchor.pipeline",
        "videoanchor.cli",
    }
    assert wanted <= modules, f"API pages miss {sorted(wanted - modules)}"
    rendered = {n.rsplit(".", 1)[1] for n in names}
    for mod in ("videoanchor.anchor", "videoanchor.kernels"):
        exported = set(importlib.import_module(mod).__all__)
        assert exported <= rendered, f"{mod}: not in an API page: {sorted(exported - rendered)}"
    import videoanchor

    top = set(videoanchor.__all__) - {"__version__"}
    assert top <= rendered, f"videoanchor names not in any API page: {sorted(top - rendered)}"
    overview = (DOCS / "api" / "index.md").read_text()
    missing = sorted(n for n in videoanchor.__all__ if f"`videoanchor.{n}`" not in overview)
    assert not missing, f"docs/api/index.md does not list {missing}"


def _layer_contracts_rendered() -> str:
    """pyproject.toml's import-linter layer contracts, as docs/development.md shows them."""
    import tomllib

    contracts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    out = []
    for c in contracts["contracts"]:
        if c["type"] != "layers":
            continue
        out.append(f"{c.get('containers', ['videoanchor'])[0]}:")
        for i, layer in enumerate(c["layers"]):
            names = [n.strip().removeprefix("videoanchor.") for n in layer.split("|")]
            out.append(("  " if i == 0 else "  > ") + " | ".join(names))
    return "\n".join(out) + "\n"


def test_the_layer_picture_is_the_import_contracts():
    text = (DOCS / "development.md").read_text()
    got = re.search(r"<!-- layers:[^>]*-->\n```\n(.*?)```\n<!-- /layers -->", text, re.S)
    assert got, "docs/development.md: expected the layers block (<!-- layers: ... -->)"
    assert got.group(1) == _layer_contracts_rendered(), (
        "docs/development.md's layers block differs from pyproject.toml's import-linter "
        "contracts; render them again (tests/test_docs.py: _layer_contracts_rendered)"
    )


def test_every_package_module_is_in_its_containers_layers():
    """A module added to a layered folder without a place in its contract goes unchecked."""
    import tomllib

    contracts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    for c in contracts["contracts"]:
        if c["type"] != "layers" or "containers" not in c:
            continue
        container = c["containers"][0]
        folder = ROOT / Path(*container.split("."))
        listed = {n.strip() for layer in c["layers"] for n in layer.split("|")}
        present = {
            p.stem if p.suffix == ".py" else p.name
            for p in folder.iterdir()
            if (p.suffix == ".py" and p.stem != "__init__") or (p / "__init__.py").exists()
        }
        assert present <= listed, f"{container}: not in its layers contract: {present - listed}"


def _private_anchor_modules() -> set[str]:
    """Every module under ``videoanchor/anchor`` whose own name starts with an underscore."""
    folder = ROOT / "videoanchor" / "anchor"
    return {
        ".".join(("videoanchor", *p.relative_to(ROOT / "videoanchor").with_suffix("").parts))
        for p in folder.rglob("_*.py")
        if p.name != "__init__.py"
    }


def test_no_module_outside_anchor_imports_a_private_anchor_module():
    """Outside ``videoanchor/anchor`` (the integrations, the applications, the kernels), no
    import names a private ``anchor`` module, even inside a function: what they need has a
    public face (``anchor.collective``, ``anchor.warm_up``)."""
    import ast

    private = _private_anchor_modules()
    assert "videoanchor.anchor._inputs" in private  # (the scan finds them)
    found = []
    for path in sorted((ROOT / "videoanchor").rglob("*.py")):
        if (ROOT / "videoanchor" / "anchor") in path.parents:
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            for name in names:
                if any(name == m or name.startswith(m + ".") for m in private):
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {name}")
    assert not found, f"private anchor modules imported outside anchor: {found}"


def test_the_private_anchor_contract_names_every_private_module_and_every_outsider():
    """pyproject.toml's forbidden contract keeps every private ``anchor`` module from every
    other part of the package, so that a new private module or a new part is not left out."""
    import tomllib

    contracts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    forbidden = [
        c
        for c in contracts["contracts"]
        if c["type"] == "forbidden" and "videoanchor.anchor._inputs" in c["forbidden_modules"]
    ]
    assert len(forbidden) == 1, "pyproject.toml: expected one contract on anchor's private modules"
    (c,) = forbidden
    assert set(c["forbidden_modules"]) == _private_anchor_modules()
    parts = {
        f"videoanchor.{p.stem if p.suffix == '.py' else p.name}"
        for p in (ROOT / "videoanchor").iterdir()
        if (p.suffix == ".py" and not p.stem.startswith("_")) or (p / "__init__.py").exists()
    } - {"videoanchor.anchor"}
    assert set(c["source_modules"]) == parts
