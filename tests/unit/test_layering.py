"""Layers point down only: pipelines → components → components.training. Nothing under components/ imports
pipelines (a step's image carries components/ alone, and the engine must not know the workflow)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports, at any depth (function bodies included)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
    return out


def test_components_never_import_pipelines():
    offenders = {str(p.relative_to(ROOT)): sorted(m for m in imported_modules(p) if m.split(".")[0] == "pipelines")
                 for p in sorted((ROOT / "components").rglob("*.py"))}
    offenders = {p: mods for p, mods in offenders.items() if mods}
    assert not offenders, f"components/ imports pipelines: {offenders}"


def test_the_check_sees_an_import_inside_a_function(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("def f():\n    from pipelines.spec import load_spec\n    import pipelines.local\n")
    assert {"pipelines.spec", "pipelines.local"} <= imported_modules(f)
