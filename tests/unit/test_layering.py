"""Layers point down only: pipelines → the stage packages → the shared modules → components.training (the engine).

- Nothing under components/ imports pipelines (a step's image carries components/ alone, and the engine must not
  know the workflow).
- A stage package (each of the registry's stages, components.stages.STAGES, and preflight, a step of every
  pipeline) imports no other stage package, and no shared module imports one: what two stages share lives in a
  module below both.
- components.training, the engine, imports no stage package and none of components.models, components.rewards and
  components.tasks: a stage hands the engine what it needs (a loader, a checked model directory, its rewards) as
  arguments.
"""

from __future__ import annotations

import ast
from pathlib import Path

from components.stages import STAGES

ROOT = Path(__file__).resolve().parents[2]
COMPONENTS = ROOT / "components"
ENGINE_MAY_NOT_IMPORT = ("components.models", "components.rewards", "components.tasks")


def imported_modules(path: Path, root: Path = ROOT) -> set[str]:
    """Every module a file imports, at any depth (function bodies included): `from a import b` counts as a and as
    a.b (b may be a module: `from components import reward_model`), a relative import is resolved against the
    file's package."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = list(path.relative_to(root).with_suffix("").parts)[:-1]
                package = package[:len(package) - (node.level - 1)]
                base = ".".join(package + ([node.module] if node.module else []))
            if base:
                out.add(base)
            out |= {f"{base}.{alias.name}" if base else alias.name for alias in node.names if alias.name != "*"}
    return out


def stage_packages() -> set[str]:
    """components.<module> of every bundled stage of the registry, and of every other step package (a folder with a
    KFP component: preflight)."""
    registered = {f"components.{s.module}" for s in STAGES.values() if not s.package}
    steps = {f"components.{p.parent.name}" for p in COMPONENTS.glob("*/component.py")}
    return registered | steps


def within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def offenders(files, forbidden) -> dict[str, list[str]]:
    """Each file → the modules it imports that `forbidden(file, module)` refuses."""
    out = {str(p.relative_to(ROOT)): sorted(m for m in imported_modules(p) if forbidden(p, m)) for p in files}
    return {p: mods for p, mods in out.items() if mods}


def package_of(path: Path) -> str:
    return "components." + path.relative_to(COMPONENTS).parts[0] if path.parent != COMPONENTS else ""


def test_components_never_import_pipelines():
    bad = offenders(sorted(COMPONENTS.rglob("*.py")), lambda p, m: m.split(".")[0] == "pipelines")
    assert not bad, f"components/ imports pipelines: {bad}"


def test_the_stage_packages_are_the_registry_s():
    packages = stage_packages()
    assert {f"components.{s.module}" for s in STAGES.values() if not s.package} <= packages
    assert {"components.sft", "components.ppo", "components.reward_model", "components.preflight"} <= packages


def sideways(path: Path, module: str) -> bool:
    """`module` is in a stage package other than the one `path` is in (a shared module is in none)."""
    return any(within(module, pkg) for pkg in stage_packages() if pkg != package_of(path))


def upward(path: Path, module: str) -> bool:
    """`module` is a stage package's, or models', rewards' or tasks' (refused to the engine)."""
    return any(within(module, pkg) for pkg in stage_packages() | set(ENGINE_MAY_NOT_IMPORT))


def test_no_module_imports_another_stage_s_package():
    """A stage package imports only itself among the stage packages; a shared module imports none."""
    bad = offenders(sorted(COMPONENTS.rglob("*.py")), sideways)
    assert not bad, f"imports of another stage's package (move what they share below both): {bad}"


def test_the_engine_imports_no_stage_models_rewards_or_tasks():
    bad = offenders(sorted((COMPONENTS / "training").rglob("*.py")), upward)
    assert not bad, f"components/training imports up (take it as an argument from the stage): {bad}"


def test_the_check_sees_an_import_inside_a_function(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("def f():\n    from pipelines.spec import load_spec\n    import pipelines.local\n")
    assert {"pipelines.spec", "pipelines.local"} <= imported_modules(f)


def test_the_check_sees_a_module_imported_by_name_and_a_relative_import(tmp_path):
    f = tmp_path / "components" / "ppo" / "main.py"
    f.parent.mkdir(parents=True)
    f.write_text("from components import reward_model\nfrom ..data_prep import readers\nfrom . import config\n")
    got = imported_modules(f, root=tmp_path)
    assert {"components.reward_model", "components.data_prep.readers", "components.ppo.config"} <= got
    ppo = COMPONENTS / "ppo" / "main.py"
    assert sideways(ppo, "components.reward_model") and sideways(ppo, "components.data_prep.readers")
    assert not sideways(ppo, "components.ppo.config")


def test_the_rules_refuse_what_they_name():
    ppo, step, engine = COMPONENTS / "ppo" / "main.py", COMPONENTS / "step.py", COMPONENTS / "training" / "rl.py"
    assert sideways(ppo, "components.reward_model.main") and sideways(ppo, "components.data_prep")
    assert sideways(step, "components.evaluate.config")
    assert not sideways(ppo, "components.ppo.config") and not sideways(ppo, "components.rewards.reward_model")
    assert upward(engine, "components.rewards") and upward(engine, "components.models.config")
    assert upward(engine, "components.tasks") and upward(engine, "components.grpo.config")
    assert not upward(engine, "components.training.config") and not upward(engine, "components.config")
