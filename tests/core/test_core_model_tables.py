"""One spelling per named model: the registry entry points a package declares in its pyproject.toml
name exactly the rows of its size tables, and each points at that row's own builder.

A size table is a module-level ``SIZES: dict[str, dict]`` (registry name -> keyword arguments) in a
family's model file (the encoders': ``zoo.py``); its builders are one small function per row, named
after the row (``dit_xl_2`` for ``dit-xl-2``; a test row ``test-<x>[-tiny]`` gets ``tiny_<x>``, as a
``test_*`` function would be collected by pytest), which read the row by its name.  Metrics and
recipes register classes, not named sizes, and are not checked here.
"""

from __future__ import annotations

import ast
import importlib
import importlib.metadata as md
import inspect
import re
import sys
from pathlib import Path

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = sorted(p.name for p in (ROOT / "packages").iterdir() if (p / "pyproject.toml").is_file())
MODEL_GROUPS = ("latentforge.encoders", "latentforge.tokenizers", "latentforge.generators")
KEBAB = re.compile(r"[a-z0-9]+(?:-[a-z0-9]+)*")
# Entries that build whatever architecture a file describes (no named size, so no row).
# a diffusers AutoencoderKL's / AutoencoderRAE's / VQModel's config.json
FROM_FILE = {"diffusers-vae", "diffusers-rae", "diffusers-vqmodel"}


def declared(package: str) -> dict[str, str]:
    """``{registry name: "module:function"}`` of the model-registry entry points in the pyproject."""
    with open(ROOT / "packages" / package / "pyproject.toml", "rb") as f:
        groups = tomllib.load(f).get("project", {}).get("entry-points", {})
    out: dict[str, str] = {}
    for group in MODEL_GROUPS:
        for name, target in groups.get(group, {}).items():
            assert name not in out, f"{package}: {name!r} is declared in two registries"
            if name not in FROM_FILE:
                out[name] = target
    return out


def tables(package: str) -> dict[str, dict]:
    """``{module name: SIZES}`` for every module of the package that assigns ``SIZES`` at top level
    (found in the source, so modules without a table are not imported)."""
    src = ROOT / "packages" / package / "src"
    found = {}
    for path in sorted(src.rglob("*.py")):
        if any(_assigns_sizes(node) for node in ast.parse(path.read_text(), str(path)).body):
            module = ".".join(path.relative_to(src).with_suffix("").parts).removesuffix(".__init__")
            found[module] = importlib.import_module(module).SIZES
    return found


def _assigns_sizes(node: ast.stmt) -> bool:
    targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
    return any(isinstance(t, ast.Name) and t.id == "SIZES" for t in targets)


def builder_name(name: str) -> str:
    if name.startswith("test-"):
        name = "tiny-" + name.removeprefix("test-").removesuffix("-tiny")
    return name.replace("-", "_")


@pytest.mark.parametrize("package", PACKAGES)
def test_entry_points_name_exactly_the_table_rows(package):
    entries, found = declared(package), tables(package)
    rows: dict[str, str] = {}
    for module, table in found.items():
        assert isinstance(table, dict), f"{module}.SIZES is a {type(table).__name__}, not a dict"
        for name, row in table.items():
            assert isinstance(row, dict), f"{module}.SIZES[{name!r}] is a {type(row).__name__}, not a dict"
            assert KEBAB.fullmatch(name), f"{module}.SIZES: {name!r} is not a kebab-case registry name"
            assert name not in rows, f"{name!r} is a row of both {rows[name]}.SIZES and {module}.SIZES"
            rows[name] = module
    without_entry = sorted(set(rows) - set(entries))
    without_row = sorted(set(entries) - set(rows))
    assert not without_entry, (
        f"rows without an entry point in packages/{package}/pyproject.toml: "
        + ", ".join(f"{n} ({rows[n]}.SIZES)" for n in without_entry)
    )
    assert not without_row, (
        f"entry points of packages/{package}/pyproject.toml without a SIZES row: {without_row}"
    )


@pytest.mark.parametrize("package", PACKAGES)
def test_every_entry_point_is_the_builder_of_its_row(package):
    for name, target in declared(package).items():
        module, _, attr = target.partition(":")
        assert attr == builder_name(name), f"{name} = {target!r}: its builder is spelled {builder_name(name)}"
        fn = getattr(importlib.import_module(module), attr, None)
        assert inspect.isfunction(fn), f"{name} = {target!r}: no function {attr} in {module}"
        assert (fn.__module__, fn.__name__) == (module, attr), f"{name} = {target!r} is an alias of {fn}"
        assert f'"{name}"' in inspect.getsource(fn), f"{attr} does not read the row {name!r}"


@pytest.mark.parametrize("package", PACKAGES)
def test_installed_metadata_matches_the_pyproject(package):
    """The registry reads the installed metadata: a pyproject edit needs a reinstall to take effect."""
    entries = declared(package)
    if not entries:
        return
    dist = md.distribution(f"latentforge-{package}")
    installed = {
        ep.name: ep.value for ep in dist.entry_points if ep.group in MODEL_GROUPS and ep.name not in FROM_FILE
    }
    assert installed == entries, (
        f"latentforge-{package}'s installed entry points differ from its pyproject.toml; reinstall it: "
        f"pip install --no-deps --no-build-isolation -e packages/{package}"
    )
