"""The house rules of the runner: recipes stand alone, and every shipped recipe is registered."""

import ast
from pathlib import Path

import pytest
import tomllib

RUNNER = Path(__file__).parents[2] / "packages" / "runner"
RECIPES = RUNNER / "src" / "latentforge_runner" / "recipes"


def _imported_modules(path: Path) -> set[str]:
    """Every module a file imports, at any depth (function-level imports included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return found


def recipe_imports(path: Path) -> list[str]:
    """The recipe modules ``path`` imports (the ``recipes`` package itself holds no recipe)."""
    prefix = "latentforge_runner.recipes."
    return sorted(m for m in _imported_modules(path) if m.startswith(prefix))


@pytest.mark.parametrize("path", sorted(RECIPES.glob("*.py")), ids=lambda p: p.name)
def test_no_recipe_imports_another_recipe(path):
    assert recipe_imports(path) == [], (
        f"{path.name} imports another recipe: move what they share to a runner module"
    )


def test_the_import_check_catches_a_recipe_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text(
        "def f():\n    from latentforge_runner.recipes.train_generator import TrainGeneratorSettings\n"
        "from latentforge_runner.recipes import sample\n"
    )
    assert recipe_imports(bad) == [
        "latentforge_runner.recipes.sample",
        "latentforge_runner.recipes.train_generator",
        "latentforge_runner.recipes.train_generator.TrainGeneratorSettings",
    ]


def test_every_recipe_file_is_registered():
    declared = tomllib.loads((RUNNER / "pyproject.toml").read_text())["project"]["entry-points"]
    targets = {v.split(":")[0].rsplit(".", 1)[-1] for v in declared["latentforge.recipes"].values()}
    files = {p.stem for p in RECIPES.glob("*.py") if p.stem != "__init__"}
    assert files == targets
