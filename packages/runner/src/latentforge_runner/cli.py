"""``latentforge``: run a recipe, check a config, explain a recipe's settings, copy and list configs.

latentforge run demo                                   # the README's demo, default config
latentforge run train-generator --config rae-ditdh-xl training.lr=1e-4
latentforge run train-generator --help                 # every key: type, default, one line of help
latentforge validate train-generator --config rae-ditdh-xl    # names resolve, parameters bind
latentforge validate rae-ditdh-xl                      # the same: a config names its recipe
latentforge cp rae-ditdh-xl my-run.yaml                # a shipped config, to edit (--force overwrites)
latentforge ls [encoders|tokenizers|generators|metrics|recipes|configs]
latentforge export RUN_DIR [--out ema.safetensors]     # a sharded checkpoint's whole weights
latentforge plan --config repa-sit-xl-2 --gpus 16     # per-GPU memory: strategy × checkpointing

``run`` and ``validate`` take the same arguments.  A bad input ends with one line saying what was
wrong and what was expected (exit status 2); ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import inspect
import logging
import shutil
import sys
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from latentforge_core import registry
from latentforge_core.errors import LatentforgeError, RunInterrupted, first_line
from latentforge_runner.config import ConfigError, apply_overrides, load_yaml, settings_help, validate

log = logging.getLogger("latentforge")


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
    if path.is_dir():
        raise ConfigError(f"config {config!r} is a folder: expected a YAML file or a shipped config name")
    close = difflib.get_close_matches(config, list(shipped), n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
    raise ConfigError(
        f"config {config!r} is neither a file nor a shipped config.{hint} Shipped configs: "
        f"{', '.join(sorted(shipped))} (see `latentforge ls configs`)"
    )


def is_recipe(name: str) -> bool:
    try:
        registry.recipes.info(name)
    except registry.RegistryError:
        return False
    return True


def resolve_target(
    target: str | None, config: str | None, recipe: str | None
) -> tuple[str | None, str | None]:
    """(recipe, config) from ``run``/``validate``'s first argument: a recipe name, or (with no
    ``--config``) a config that names its recipe, as ``validate CONFIG`` always took."""
    if target is None:
        return recipe, config
    if is_recipe(target) and not (recipe is not None and config is None):
        if recipe is not None and recipe != target:
            raise ConfigError(f"two recipes named: {target!r} and --recipe {recipe!r}; name one")
        return target, config
    if config is None:
        if not Path(target).is_file() and target not in shipped_configs():
            known = registry.recipes.names() + list(shipped_configs())
            close = difflib.get_close_matches(target, known, n=3, cutoff=0.5)
            hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
            raise ConfigError(
                f"{target!r} is neither a registered recipe nor a config (a YAML file or a shipped config "
                f"name).{hint} See `latentforge ls recipes` and `latentforge ls configs`"
            )
        return recipe, target
    close = difflib.get_close_matches(target, registry.recipes.names(), n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
    raise ConfigError(
        f"{target!r} is not a registered recipe.{hint} With --config, the first argument names the "
        f"recipe: one of {', '.join(registry.recipes.names())}"
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
            raise ConfigError(
                "the config has no top-level 'recipe:' key: name the recipe first "
                "(`latentforge run RECIPE --config CONFIG`)"
            )
        recipe = named
    elif named is not None and named != recipe:
        raise ConfigError(f"the config is for recipe {named!r}, but recipe {recipe!r} was asked to run it")
    if not isinstance(recipe, str):
        raise ConfigError(f"recipe: expected a recipe name, got {recipe!r}")
    try:
        cls = registry.recipes.get(recipe)
    except registry.RegistryError as err:
        raise ConfigError(f"recipe: {err}") from err
    return recipe, cls.Settings.from_dict(data)


def run_recipe(recipe: str, cfg: Any) -> Any:
    """Build the recipe from its settings and drive its protocol: setup → run → save → cleanup.

    When a step fails, ``cleanup`` still runs, but an error of its own (a recipe whose ``setup``
    stopped before it made what ``cleanup`` closes) never hides the first: it becomes a note on it."""
    job = registry.recipes.build(recipe, config=cfg)
    try:
        job.setup()
        result = job.run()
        job.save()
    except BaseException as err:
        _cleanup_after(job, err)
        raise
    job.cleanup()
    return result


def _cleanup_after(job: Any, err: BaseException) -> None:
    try:
        job.cleanup()
    except Exception as failure:
        note = f"(cleanup after this error failed too: {first_line(failure)})"
        add_note = getattr(err, "add_note", None)
        if add_note is not None:
            add_note(note)
        log.debug("cleanup after %s failed", first_line(err), exc_info=failure)
        from latentforge_runner import distributed

        with contextlib.suppress(Exception):
            distributed.cleanup()


# ------------------------------------------------------------------------------------------------
# Help generated from the settings classes
# ------------------------------------------------------------------------------------------------
def recipe_help(recipe: str, command: str = "run") -> str:
    """Usage, the recipe's summary and every key of its settings: type, default and one line of help."""
    cls = registry.recipes.get(recipe)
    module = inspect.getmodule(cls)
    summary = ((module.__doc__ if module else None) or cls.__doc__ or "").strip().split("\n\n")[0]
    rows = settings_help(cls.Settings)
    kinds = [f"{r.type} = {r.default}" for r in rows]
    width = min(max(len(r.key) for r in rows), 34)
    mid = min(max(len(k) for k in kinds), 34)
    lines = [
        f"usage: latentforge {command} {recipe} [--config CONFIG] [key.sub=value ...]",
        "",
        " ".join(summary.split()),
        "",
    ]
    if recipe in shipped_configs():
        lines += [f"default config: {shipped_configs()[recipe]}", ""]
    lines.append("settings (override any as key.sub=value; values are YAML):")
    for row, kind in zip(rows, kinds, strict=True):
        pad = max(width - len(row.key), 0)
        mpad = max(mid - len(kind), 0)
        lines.append(f"  {row.key}{' ' * pad}  {kind}{' ' * mpad}  {row.help}".rstrip())
    return "\n".join(lines)


def _help(args: argparse.Namespace, command: str) -> int:
    recipe, config = resolve_target(args.target, args.config, args.recipe)
    if recipe is None and config is not None:
        recipe = load_yaml(resolve_config_path(config)).get("recipe")
    if recipe is None:
        build_parser()._subparsers_by_name[command].print_help()  # type: ignore[attr-defined]
        return 0
    if not isinstance(recipe, str) or not is_recipe(recipe):
        registry.recipes.info(str(recipe))  # the registry's message, with close matches
    print(recipe_help(recipe, command))
    return 0


# ------------------------------------------------------------------------------------------------
# Commands
# ------------------------------------------------------------------------------------------------
def cmd_run(args: argparse.Namespace) -> int:
    if args.help:
        return _help(args, "run")
    recipe, config = resolve_target(args.target, args.config, args.recipe)
    if recipe is None and config is None:
        raise ConfigError("name a recipe or a config: `latentforge run RECIPE [--config CONFIG]`")
    recipe, cfg = load_settings(recipe, config, args.overrides)
    validate(cfg)
    run_recipe(recipe, cfg)
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    if args.help:
        return _help(args, "validate")
    recipe, config = resolve_target(args.target, args.config, args.recipe)
    if recipe is None and config is None:
        raise ConfigError("name a recipe or a config: `latentforge validate RECIPE [--config CONFIG]`")
    recipe, cfg = load_settings(recipe, config, args.overrides)
    checked = validate(cfg)
    print(f"{config or recipe}: valid config for recipe {recipe!r}")
    for line in checked:
        print(f"  {line}")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    """Per-process memory of a training config for each strategy × activation checkpointing."""
    from latentforge_runner import plan

    recipe, config = resolve_target(args.target, args.config, None)
    if recipe is None and config is None:
        raise ConfigError("name a config: `latentforge plan --config CONFIG [key.sub=value ...]`")
    recipe, cfg = load_settings(recipe, config, args.overrides)
    if recipe not in plan.PLANNED_RECIPES:
        raise ConfigError(
            f"plan estimates {', '.join(plan.PLANNED_RECIPES)} runs; {config or recipe} is for recipe "
            f"{recipe!r}"
        )
    validate(cfg)
    strategies = args.strategy or plan.STRATEGIES
    rows = plan.plan_rows(cfg, args.gpus, args.device, strategies=strategies)
    if args.json:
        print(plan.to_json(rows, config=config or recipe, recipe=recipe, device=args.device))
    else:
        t = cfg.training
        title = (
            f"{config or recipe}: {args.gpus} process(es) on {args.device}, global batch {t.batch_size}, "
            f"grad_accum {t.grad_accum}, precision {t.precision}"
        )
        print(plan.format_table(rows, title))
    return 0


def cmd_cp(args: argparse.Namespace) -> int:
    """Copy a shipped config to ``dest`` (a file, or a folder to put it in), to edit and run."""
    shipped = shipped_configs()
    name = args.config.removesuffix(".yaml")
    if name not in shipped:
        close = difflib.get_close_matches(name, list(shipped), n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        raise ConfigError(
            f"{args.config!r} is not a shipped config.{hint} Shipped configs: {', '.join(sorted(shipped))}"
        )
    source, dest = shipped[name], Path(args.dest)
    if dest.is_dir():
        dest = dest / source.name
    elif not dest.suffix:
        dest = dest.with_suffix(source.suffix)
    if dest.exists() and not args.force:
        raise ConfigError(f"{dest} already exists; pass --force to overwrite it")
    blocker = next((p for p in dest.parents if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise ConfigError(f"cannot copy to {dest}: {blocker} is a file, not a folder")
    if not dest.parent.is_dir():
        raise ConfigError(f"cannot copy to {dest}: the folder {dest.parent} does not exist")
    try:
        shutil.copyfile(source, dest)
    except OSError as err:
        raise ConfigError(f"cannot copy {name} to {dest}: {err.strerror or err}") from err
    print(f"copied {name} ({source}) to {dest}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """Whole safetensors weights of a checkpoint (a run folder's newest, or the ``checkpoints/<step>/``
    named), as a full checkpoint holds them: every module into ``--out`` (a folder; default the
    checkpoint folder itself), or the one ``--weights`` to ``--out`` when it ends in ``.safetensors``."""
    from latentforge_core.checkpoint import save_checkpoint
    from latentforge_runner.training import consolidate, list_checkpoints, load_weights

    target = Path(args.target)
    found = list_checkpoints(target / "checkpoints")
    folder = found[-1] if found else target
    if not (folder / "state.pt").is_file():
        raise ConfigError(
            f"{target} is neither a run folder with whole checkpoints nor a checkpoint folder: expected "
            "RUN_DIR (holding checkpoints/<step>/) or RUN_DIR/checkpoints/<step> (holding state.pt)"
        )
    if args.out is not None and args.out.endswith(".safetensors"):
        state_dict, config = load_weights(folder, args.weights)
        save_checkpoint(state_dict, args.out, config)
        print(f"exported the {args.weights} weights of {folder} to {args.out}")
        return 0
    out = consolidate(folder, args.out)
    print(f"exported {', '.join(sorted(p.name for p in out.glob('*.safetensors')))} of {folder} to {out}")
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
            try:
                recipe = load_yaml(path).get("recipe", "?")
            except ConfigError:
                recipe = "? (unreadable)"
            print(f"{name:28s} recipe {recipe!s:18s} {path}")
        return 0
    for name in [kind] if kind else list(registry.REGISTRIES):
        reg = registry.REGISTRIES[name]
        for line in reg.clashes():
            print(f"latentforge: warning: {line}", file=sys.stderr)
        entries = reg.entries()
        print(f"{name} ({len(entries)})")
        for e in entries:
            print(f"  {e.name:28s} {e.dist} {e.version}")
    return 0


# ------------------------------------------------------------------------------------------------
# Arguments
# ------------------------------------------------------------------------------------------------
def _run_arguments(parser: argparse.ArgumentParser) -> None:
    """What ``run`` and ``validate`` both take, in the same form."""
    parser.add_argument(
        "target",
        nargs="?",
        metavar="RECIPE",
        help="a registered recipe (latentforge ls recipes); without --config, a config naming its recipe",
    )
    parser.add_argument(
        "--config", "-c", help="a YAML file or a shipped config name (default: the recipe's own)"
    )
    parser.add_argument("--recipe", help=argparse.SUPPRESS)  # `validate CONFIG --recipe R`, as before
    parser.add_argument(
        "-h", "--help", action="store_true", help="list every key of the recipe's settings and exit"
    )
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="overrides (YAML values)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="latentforge", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = sub.add_parser("run", help="run a recipe", add_help=False)
    _run_arguments(run)
    run.set_defaults(fn=cmd_run)
    val = sub.add_parser("validate", help="check a config without building models", add_help=False)
    _run_arguments(val)
    val.set_defaults(fn=cmd_validate)
    cp = sub.add_parser("cp", help="copy a shipped config to edit")
    cp.add_argument("config", help="a shipped config name (latentforge ls configs)")
    cp.add_argument("dest", help="the file to write, or a folder to write it into")
    cp.add_argument("--force", "-f", action="store_true", help="overwrite dest if it exists")
    cp.set_defaults(fn=cmd_cp)
    ls = sub.add_parser("ls", help="list registered components (with their distribution) or shipped configs")
    ls.add_argument("kind", nargs="?", help="encoders, tokenizers, generators, metrics, recipes or configs")
    ls.set_defaults(fn=cmd_ls)
    plan = sub.add_parser("plan", help="estimate per-GPU memory of a training config (nothing allocated)")
    plan.add_argument("target", nargs="?", metavar="CONFIG", help="a YAML file or a shipped config name")
    plan.add_argument("--config", "-c", help="the same, as run and validate take it")
    plan.add_argument("--gpus", type=int, default=8, help="processes (GPUs) of the run (default 8)")
    plan.add_argument("--device", default="cuda", help="cuda (bf16 autocast unless fp32) or cpu (fp32)")
    plan.add_argument("--strategy", action="append", help="only this strategy (repeatable; default all)")
    plan.add_argument("--json", action="store_true", help="print the rows as JSON (bytes) instead")
    plan.add_argument("overrides", nargs="*", metavar="key.sub=value", help="overrides (YAML values)")
    plan.set_defaults(fn=cmd_plan)
    export = sub.add_parser("export", help="write a (sharded) checkpoint's weights as whole safetensors")
    export.add_argument(
        "target", metavar="RUN_DIR", help="a run folder (its newest checkpoint) or a checkpoint folder"
    )
    export.add_argument("--out", help="a folder for every module, or a .safetensors file for --weights")
    export.add_argument("--weights", default="ema", help="the module --out FILE gets (default: ema)")
    export.set_defaults(fn=cmd_export)
    parser._subparsers_by_name = {"run": run, "validate": val}  # type: ignore[attr-defined]
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
    if getattr(args, "target", None) is not None and "=" in args.target:  # an override, no recipe named
        args.overrides = [args.target, *args.overrides]
        args.target = None
    return args


def error_lines(err: BaseException) -> list[str]:
    """``latentforge: error: <message>`` and, when the error has a cause whose message it does not
    already hold, ``  caused by: <its first line>``."""
    lines = [f"latentforge: error: {err}"]
    cause = err.__cause__
    if cause is not None:
        text = str(cause).strip()
        if not text or text.splitlines()[0] not in str(err):
            lines.append(f"  caused by: {first_line(cause)}")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    try:
        args = parse_args(argv)
    except SystemExit as stop:  # --help, or a usage error argparse has already explained
        return stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 2)
    try:
        return args.fn(args)
    except RunInterrupted as err:  # a checkpoint was written: rerunning the command resumes
        if debug:
            raise
        print(f"latentforge: {err}", file=sys.stderr)
        return err.exit_code
    except LatentforgeError as err:
        if debug:
            raise
        print("\n".join(error_lines(err)), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if debug:
            raise
        print("latentforge: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
