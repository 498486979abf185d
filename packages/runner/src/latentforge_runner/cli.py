"""``latentforge``: run a recipe from a config, list the registries, validate a config.

latentforge run demo                                   # the README's demo, default config
latentforge run train-generator --config rae-ditdh-xl training.lr=1e-4
latentforge ls [encoders|tokenizers|generators|metrics|recipes|configs]
latentforge validate rae-ditdh-xl                      # names resolve, parameters bind
"""

from __future__ import annotations

import argparse
import difflib
import sys
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from latentforge_core import registry
from latentforge_core.checkpoint import CheckpointError
from latentforge_runner.config import ConfigError, apply_overrides, load_yaml, validate
from latentforge_runner.data import DataError


# ------------------------------------------------------------------------------------------------
# Configs: a path, or the name of one shipped inside the package
# ------------------------------------------------------------------------------------------------
def shipped_configs() -> dict[str, Path]:
    folder = resources.files("latentforge_runner") / "configs"
    return {Path(p.name).stem: Path(str(p)) for p in folder.iterdir() if p.name.endswith(".yaml")}


def resolve_config_path(config: str) -> Path:
    path = Path(config)
    if path.is_file():
        return path
    shipped = shipped_configs()
    if config in shipped:
        return shipped[config]
    close = difflib.get_close_matches(config, list(shipped), n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
    raise ConfigError(
        f"config {config!r} is neither a file nor a shipped config.{hint} Shipped configs: "
        f"{', '.join(sorted(shipped))} (see `latentforge ls configs`)"
    )


def load_settings(recipe: str | None, config: str | None, overrides: Sequence[str] = ()) -> tuple[str, Any]:
    """(recipe name, its settings) from a config file or the recipe's default config, plus overrides."""
    data: dict[str, Any] = {}
    if config is not None:
        data = load_yaml(resolve_config_path(config))
    elif recipe is not None and recipe in shipped_configs():
        data = load_yaml(shipped_configs()[recipe])
    data = apply_overrides(data, overrides)
    named = data.pop("recipe", None)
    if recipe is None:
        if named is None:
            raise ConfigError("the config has no top-level 'recipe:' key; name the recipe with --recipe")
        recipe = named
    elif named is not None and named != recipe:
        raise ConfigError(f"the config is for recipe {named!r}, but recipe {recipe!r} was asked to run it")
    cls = registry.recipes.get(recipe)
    return recipe, cls.Settings.from_dict(data)


def run_recipe(recipe: str, cfg: Any) -> Any:
    """Build the recipe from its settings and drive its protocol: setup → run → save → cleanup."""
    job = registry.recipes.build(recipe, config=cfg)
    try:
        job.setup()
        result = job.run()
        job.save()
    finally:
        job.cleanup()
    return result


# ------------------------------------------------------------------------------------------------
# Commands
# ------------------------------------------------------------------------------------------------
def cmd_run(args: argparse.Namespace) -> int:
    recipe, cfg = load_settings(args.recipe, args.config, args.overrides)
    validate(cfg)
    run_recipe(recipe, cfg)
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    recipe, cfg = load_settings(args.recipe, args.config, args.overrides)
    checked = validate(cfg)
    print(f"{args.config}: valid config for recipe {recipe!r}")
    for line in checked:
        print(f"  {line}")
    return 0


def cmd_ls(args: argparse.Namespace) -> int:
    kinds = list(registry.REGISTRIES) + ["configs"]
    kind = args.kind
    if kind is not None and kind not in kinds:
        singular = {k.rstrip("s"): k for k in kinds}
        if kind in singular:
            kind = singular[kind]
        else:
            raise ConfigError(f"unknown kind {kind!r}; expected one of {', '.join(kinds)}")
    if kind == "configs":
        for name, path in sorted(shipped_configs().items()):
            print(f"{name:32s} recipe {load_yaml(path).get('recipe', '?')}")
        return 0
    for name in [kind] if kind else list(registry.REGISTRIES):
        entries = registry.REGISTRIES[name].entries()
        print(f"{name} ({len(entries)})")
        for e in entries:
            print(f"  {e.name:28s} {e.dist} {e.version}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="latentforge", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a recipe")
    run.add_argument("recipe", help="a registered recipe (latentforge ls recipes)")
    run.add_argument(
        "--config", "-c", help="a YAML file or a shipped config name (default: the recipe's own)"
    )
    run.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    run.set_defaults(fn=cmd_run)
    val = sub.add_parser("validate", help="check a config without building models")
    val.add_argument("config", help="a YAML file or a shipped config name")
    val.add_argument("--recipe", help="the recipe, when the config has no 'recipe:' key")
    val.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    val.set_defaults(fn=cmd_validate)
    ls = sub.add_parser("ls", help="list registered components (with their distribution) or shipped configs")
    ls.add_argument("kind", nargs="?", help="encoders, tokenizers, generators, metrics, recipes or configs")
    ls.set_defaults(fn=cmd_ls)
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse, taking ``key=value`` overrides on either side of ``--config`` (argparse alone stops
    collecting positionals at the first option, so ``run R --config F a.b=1`` would be refused)."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    misplaced = [e for e in extra if e.startswith("-") or "=" not in e]
    if misplaced or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(misplaced or extra)} (overrides are key.sub=value)")
    if extra:
        args.overrides = [*args.overrides, *extra]
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return args.fn(args)
    except (ConfigError, DataError, CheckpointError, registry.RegistryError) as err:
        print(f"latentforge: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
