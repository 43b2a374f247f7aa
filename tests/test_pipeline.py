"""The library layer (videoanchor.pipeline) stands on its own: nothing imports the CLI."""

import ast
from pathlib import Path

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
