"""Run settings: frozen, validated ``attrs`` classes read from one YAML file plus ``key.sub=value`` overrides.

A recipe declares its settings as a tree of :class:`Settings` classes (the one source of defaults).
:func:`parse` turns a plain dict (a YAML file after overrides) into that tree, naming the dotted key
of every problem: an unknown key (with close matches), a missing required key, a value of the wrong
type.  Blocks that name a registry entry (:class:`Component`) are checked by :func:`validate` without
building anything: the name must resolve and the parameters must bind to the builder's signature,
as torchtune's ``config.validate`` does.
"""

from __future__ import annotations

import ast
import contextlib
import difflib
import inspect
import io
import re
import textwrap
import tokenize
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import attrs
import yaml

from latentforge_core import registry
from latentforge_core.errors import LatentforgeError


class ConfigError(LatentforgeError, ValueError):
    """A config that does not fit its recipe's settings: says which key and what was expected."""


class SettingError(ConfigError):
    """One value out of range, raised by a field's validator with the field's own name; :func:`parse`
    puts the dotted key of its block in front (``training.lr``, ``generator_training.lr``)."""

    def __init__(self, key: str, problem: str):
        self.key, self.problem = key, problem
        super().__init__(f"{key}: {problem}")


# ------------------------------------------------------------------------------------------------
# Settings base
# ------------------------------------------------------------------------------------------------
def settings(cls: type) -> type:
    """Class decorator for a settings block: frozen, keyword-only, typed fields."""
    return attrs.frozen(kw_only=True)(cls)


class Settings:
    """Mixin giving every settings block ``to_dict``/``from_dict`` (round trips exactly)."""

    def to_dict(self) -> dict[str, Any]:
        return to_plain(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None, where: str = "") -> Settings:
        return parse(cls, data or {}, where)

    def replace(self, **changes: Any) -> Settings:
        return attrs.evolve(self, **changes)


@settings
class Component(Settings):
    """A block naming a registry entry: ``name`` plus the keyword arguments of its builder."""

    name: str
    params: dict = attrs.field(factory=dict)

    def build(self, kind: str, **injected: Any) -> Any:
        """Build the entry; ``injected`` are values the recipe supplies (shapes from other blocks)."""
        return registry.REGISTRIES[kind].build(self.name, **{**self.params, **injected})


def accepts(factory: Any, name: str) -> bool:
    """Whether a builder (a function or a class) takes the keyword ``name``: what a recipe injects."""
    target = factory.__init__ if inspect.isclass(factory) else factory
    return name in inspect.signature(target).parameters


def to_plain(value: Any) -> Any:
    """Settings → nested dicts/lists of YAML scalars."""
    if attrs.has(type(value)):
        return {f.name: to_plain(getattr(value, f.name)) for f in attrs.fields(type(value))}
    if isinstance(value, Mapping):
        return {str(k): to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_plain(v) for v in value]
    return value


# ------------------------------------------------------------------------------------------------
# Ranges: ``lr: float = setting(2e-4, gt=0)  # help`` checks at parse time and shows in --help
# ------------------------------------------------------------------------------------------------
def describe_range(
    *, ge: float | None = None, gt: float | None = None, le: float | None = None, lt: float | None = None
) -> str:
    """``"> 0"``, ``"in [0, 1)"``, ``"≥ 1"``: the range a value must lie in, as the messages say it."""
    n = _number
    low = f"[{n(ge)}" if ge is not None else (f"({n(gt)}" if gt is not None else None)
    high = f"{n(le)}]" if le is not None else (f"{n(lt)})" if lt is not None else None)
    if low and high:
        return f"in {low}, {high}"
    if low:
        return f"≥ {n(ge)}" if ge is not None else f"> {n(gt)}"
    if high:
        return f"≤ {n(le)}" if le is not None else f"< {n(lt)}"
    return ""


def _number(x: Any) -> str:
    """``2**32`` as ``4294967296``, ``1e-08`` as ``1e-08``, ``0.5`` as ``0.5``."""
    return str(x) if isinstance(x, int) else f"{x:g}"


def in_range(
    *, ge: float | None = None, gt: float | None = None, le: float | None = None, lt: float | None = None
) -> Any:
    """An attrs validator: the value (or each item of a tuple/list value) lies in the range; None passes
    (``int | None`` fields say "unset" with it)."""
    text = describe_range(ge=ge, gt=gt, le=le, lt=lt)

    def check(inst: Any, attribute: attrs.Attribute, value: Any) -> None:
        items = list(enumerate(value)) if isinstance(value, (list, tuple)) else [(None, value)]
        for i, v in items:
            key = attribute.name if i is None else f"{attribute.name}[{i}]"
            if v is None:
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise SettingError(key, f"expected a number {text}, got {_show(v)}")
            if (
                v != v
                or (ge is not None and v < ge)
                or (gt is not None and v <= gt)
                or (le is not None and v > le)
                or (lt is not None and v >= lt)
            ):
                raise SettingError(key, f"expected a value {text}, got {v!r}")

    check.range = text  # type: ignore[attr-defined]
    return check


def setting(
    default: Any = attrs.NOTHING,
    *,
    factory: Any = None,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    validator: Any = None,
    expected: str | None = None,
) -> Any:
    """A settings field whose value is checked when the settings are made (parsing a config included):
    ``ge``/``gt``/``le``/``lt`` bound it (each item of a tuple), ``validator`` adds an attrs validator;
    the range shows in ``latentforge run RECIPE --help`` (``expected`` overrides its text)."""
    checks = [in_range(ge=ge, gt=gt, le=le, lt=lt)] if (ge, gt, le, lt) != (None,) * 4 else []
    if validator is not None:
        checks.append(validator)
    text = expected or describe_range(ge=ge, gt=gt, le=le, lt=lt)
    return attrs.field(
        default=default,
        factory=factory,
        validator=checks or None,
        metadata={"range": text} if text else {},
    )


def non_empty(inst: Any, attribute: attrs.Attribute, value: Any) -> None:
    """An attrs validator: a non-empty string (a path, a name)."""
    if isinstance(value, str) and not value.strip():
        raise SettingError(attribute.name, "expected a non-empty string, got ''")


def device_name(inst: Any, attribute: attrs.Attribute, value: Any) -> None:
    """An attrs validator: ``auto`` or a device string torch parses (``cpu``, ``cuda``, ``cuda:1``, …);
    whether CUDA is present is checked when the run starts, not here (a config validates anywhere)."""
    if value == "auto":
        return
    import torch

    try:
        torch.device(value)
    except (RuntimeError, ValueError, TypeError):
        raise SettingError(
            attribute.name, f"expected auto, cpu, cuda or cuda:N (a torch device), got {value!r}"
        ) from None


def sampler_block(
    generator: str | None = None, *, run: str | None = None, default: Any = attrs.NOTHING, factory: Any = None
) -> Any:
    """A field holding keyword arguments of ``generator.sample``, checked by :func:`validate` (and at
    sampling time) without building a model: ``generator`` is the dotted key (from the top of the
    settings) of the generator's registry block, or ``run`` the key of a run folder whose
    ``config.yaml`` names it.  Without either, only the values of known options are checked."""
    if factory is None and default is attrs.NOTHING:
        factory = dict
    kwargs: dict[str, Any] = {"factory": factory} if default is attrs.NOTHING else {"default": default}
    return attrs.field(**kwargs, metadata={"sampler_of": generator, "sampler_run": run})


# ------------------------------------------------------------------------------------------------
# Parsing dicts into settings (types checked, unknown keys caught)
# ------------------------------------------------------------------------------------------------
def parse(cls: type, data: Any, where: str = "") -> Any:
    """Build ``cls`` from ``data``; every error names its dotted key."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where or 'config'}: expected a mapping for {cls.__name__}, got {_show(data)}")
    attrs.resolve_types(cls)
    fields = {f.name: f for f in attrs.fields(cls)}
    unknown = [k for k in data if k not in fields]
    if unknown:
        key = unknown[0]
        close = difflib.get_close_matches(str(key), list(fields), n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        raise ConfigError(
            f"unknown key {_join(where, key)!r}.{hint} {cls.__name__} accepts: {', '.join(fields)}"
        )
    kwargs = {}
    for name, field in fields.items():
        key = _join(where, name)
        if name not in data:
            if field.default is attrs.NOTHING:
                raise ConfigError(f"missing required key {key!r} ({_type_name(field.type)})")
            continue
        kwargs[name] = _convert(data[name], field.type, key)
    try:
        return cls(**kwargs)
    except SettingError as err:  # a validator of this block: give it the block's dotted key
        raise SettingError(_join(where, err.key), err.problem) from err.__cause__
    except (TypeError, ValueError) as err:
        if isinstance(err, ConfigError):
            raise
        raise ConfigError(f"{where or 'config'}: {err}") from err


def _convert(value: Any, tp: Any, key: str) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        members = [a for a in args if a is not type(None)]
        if len(members) == 1:  # an optional value: its own error names the key inside it
            return _convert(value, members[0], key)
        for arg in members:
            with contextlib.suppress(ConfigError):
                return _convert(value, arg, key)
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {_show(value)}")
    if origin is Literal:
        if value not in args:
            close = difflib.get_close_matches(str(value), [str(a) for a in args], n=3, cutoff=0.4)
            hint = f" (did you mean {', '.join(map(repr, close))}?)" if close else ""
            raise ConfigError(f"{key}: expected one of {', '.join(map(repr, args))}, got {value!r}{hint}")
        return value
    if isinstance(tp, type) and attrs.has(tp):
        return parse(tp, value, key)
    if origin in (tuple, list, Sequence) or tp in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list ({_type_name(tp)}), got {_show(value)}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"{key}: expected {len(args)} items ({_type_name(tp)}), got {len(value)}")
            items = [_convert(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True))]
        else:
            item_tp = args[0] if args else Any
            items = [_convert(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
        return list(items) if origin is list or tp is list else tuple(items)
    if origin in (dict, Mapping) or tp in (dict,):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a mapping, got {_show(value)}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {_show(value)}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "3e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {_show(value)}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {_show(value)}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {_show(value)}")
        return value
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(f"{key}: expected {tp.__name__}, got {_show(value)}")
    return value


def _join(where: str, key: Any) -> str:
    return f"{where}.{key}" if where else str(key)


def _show(value: Any) -> str:
    return f"{type(value).__name__} {value!r}"


def _type_name(tp: Any) -> str:
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


# ------------------------------------------------------------------------------------------------
# YAML files and command-line overrides
# ------------------------------------------------------------------------------------------------
def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        what = "is a folder, not a file" if path.is_dir() else "not found"
        raise ConfigError(f"config file {path} {what}: expected a YAML file or a shipped config name")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {yaml_problem(err)}") from err
    except (UnicodeDecodeError, OSError) as err:
        raise ConfigError(f"config file {path} cannot be read as YAML text: {err}") from err
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of blocks, got {type(data).__name__}")
    return data


def yaml_problem(err: yaml.YAMLError) -> str:
    """A YAML error in one line: what, and where (line and column, counted from 1)."""
    problem = getattr(err, "problem", None) or str(err).strip().splitlines()[0]
    mark = getattr(err, "problem_mark", None)
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else problem


def apply_overrides(data: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """``["training.lr=1e-4", "generator.params.depth=2"]`` → a new dict; values parse as YAML."""
    out = _deepcopy(data)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} is not of the form key.sub=value")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as err:
            raise ConfigError(
                f"override {item!r}: the value {raw!r} is not valid YAML ({yaml_problem(err)}); expected "
                "a YAML value such as 3, 1e-4, true, [0.9, 0.95] or {a: 1} (quote a string that looks "
                "like something else)"
            ) from err
        node = out
        parts = key.strip().split(".")
        if not all(part.strip() for part in parts):
            raise ConfigError(
                f"override {item!r}: the key {key.strip()!r} has an empty part; expected key.sub=value "
                "(dot-separated names, e.g. training.lr=1e-4)"
            )
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {'.'.join(parts[: i + 1])} is a value, not a block")
            node = child
        node[parts[-1]] = value
    return out


def _deepcopy(data: Any) -> Any:
    if isinstance(data, Mapping):
        return {k: _deepcopy(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_deepcopy(v) for v in data]
    return data


def dump_yaml(data: Mapping[str, Any], path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_plain(data), sort_keys=False))


# ------------------------------------------------------------------------------------------------
# Validation of registry blocks (nothing built)
# ------------------------------------------------------------------------------------------------
def component(kind: str, *, injected: Sequence[str] = (), default: Any = attrs.NOTHING) -> Any:
    """A settings field holding a :class:`Component` of registry ``kind``.

    ``injected`` names the builder arguments the recipe fills in itself (e.g. ``in_channels`` from
    the tokenizer's latent shape), so validation does not ask the config for them.
    """
    return attrs.field(default=default, metadata={"kind": kind, "injected": tuple(injected)})


def component_blocks(config: Any, where: str = "") -> list[tuple[str, Component, str, tuple[str, ...]]]:
    """Every registry block of a settings tree: ``(dotted key, block, kind, injected names)``."""
    found = []
    if not attrs.has(type(config)):
        return found
    for f in attrs.fields(type(config)):
        value = getattr(config, f.name)
        if isinstance(value, Component) and "kind" in f.metadata:
            found.append((_join(where, f.name), value, f.metadata["kind"], f.metadata["injected"]))
        elif attrs.has(type(value)):
            found += component_blocks(value, _join(where, f.name))
    return found


def sampler_fields(config: Any, where: str = "") -> list[tuple[str, Any, Mapping[str, Any]]]:
    """Every :func:`sampler_block` of a settings tree that is set: ``(dotted key, options, metadata)``."""
    found: list[tuple[str, Any, Mapping[str, Any]]] = []
    if not attrs.has(type(config)):
        return found
    for f in attrs.fields(type(config)):
        value = getattr(config, f.name)
        if "sampler_of" in f.metadata and value is not None:
            found.append((_join(where, f.name), value, f.metadata))
        elif attrs.has(type(value)):
            found += sampler_fields(value, _join(where, f.name))
    return found


def sampler_generator(config: Any, meta: Mapping[str, Any]) -> str | None:
    """The registry name of the generator a sampler block is for, when it can be known without
    building anything: a block of this config, or the ``generator`` of a run folder's config.yaml."""
    name = None
    if meta.get("sampler_of"):
        node = config
        for part in meta["sampler_of"].split("."):
            node = getattr(node, part, None)
        name = node.name if isinstance(node, Component) else None
    if name is None and meta.get("sampler_run"):
        folder = getattr(config, meta["sampler_run"], None)
        path = Path(folder) / "config.yaml" if isinstance(folder, str) else None
        if path is not None and path.is_file():
            try:
                block = load_yaml(path).get("generator")
            except ConfigError:
                block = None
            name = block.get("name") if isinstance(block, Mapping) else None
    if not isinstance(name, str):
        return None
    try:
        registry.generators.info(name)
    except registry.RegistryError:  # reported by the generator block itself (or by the run's reader)
        return None
    return name


def check_sampler_blocks(config: Any) -> list[str]:
    """Check every sampler block's options against its generator's ``sample`` (nothing built)."""
    from latentforge_generators.samplers import check_sample_options

    checked = []
    for where, options, meta in sampler_fields(config):
        name = sampler_generator(config, meta)
        try:
            check_sample_options(name, options, where=where)
        except LatentforgeError as err:
            raise ConfigError(str(err)) from err
        checked.append(f"{where}: sample() options of {name or 'any generator'}")
    return checked


def validate(config: Any) -> list[str]:
    """Check every registry block of ``config`` and every sampler block; returns ``["key: kind name",
    …]`` or raises ConfigError."""
    checked = []
    for where, block, kind, injected in component_blocks(config):
        check_component(kind, block, where, injected)
        checked.append(f"{where}: {kind[:-1]} {block.name}")
    return checked + check_sampler_blocks(config)


def check_component(kind: str, block: Component, where: str, injected: Sequence[str] = ()) -> None:
    """The name resolves in ``kind``'s registry and ``params`` (+ injected names) bind to its builder."""
    reg = registry.REGISTRIES[kind]
    try:
        factory = reg.get(block.name)
    except registry.RegistryError as err:
        raise ConfigError(f"{where}.name: {err}") from err
    target = factory.__init__ if inspect.isclass(factory) else factory
    try:
        sig = inspect.signature(target)
    except (TypeError, ValueError):  # a builtin without a signature: nothing to bind
        return
    params = dict(block.params)
    for key in params:
        if key in injected:  # the recipe's value would silently replace it
            raise ConfigError(
                f"{where}.params.{key}: {key!r} of {kind[:-1]} {block.name!r} is injected by the recipe "
                f"(from the tokenizer and the data: {', '.join(injected)}); expected it not to be set here"
            )
    accepts_any = any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values())
    names = [p for p in sig.parameters if p != "self"]
    for key in params:
        if key not in sig.parameters and not accepts_any:
            close = difflib.get_close_matches(key, names, n=3, cutoff=0.5)
            hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
            raise ConfigError(
                f"{where}.params.{key}: {kind[:-1]} {block.name!r} takes no parameter {key!r}.{hint} "
                f"It accepts: {', '.join(names) or 'nothing'}"
            )
    missing = [
        name
        for name, p in sig.parameters.items()
        if name != "self"
        and p.default is p.empty
        and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        and name not in params
        and name not in injected
    ]
    if missing:
        raise ConfigError(
            f"{where}.params: {kind[:-1]} {block.name!r} requires {', '.join(map(repr, missing))}"
        )
    if accepts_any and params:
        _build_on_meta(factory, params, where, kind, block.name)


WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors", ".npy")


def without_weight_files(params: Mapping[str, Any]) -> dict[str, Any]:
    """``params`` less those naming weight files or hub ids: what builds the architecture alone."""
    return {
        k: v
        for k, v in params.items()
        if not (isinstance(v, str) and (v.endswith(WEIGHT_SUFFIXES) or v.startswith("hf:")))
    }


def _build_on_meta(factory: Any, params: dict[str, Any], where: str, kind: str, name: str) -> None:
    """A builder taking ``**kwargs`` passes them on: build it on the meta device (no memory, no
    weights read) to see that every parameter is accepted somewhere down the line."""
    import torch

    try:
        with torch.device("meta"):
            factory(**without_weight_files(params))
    except TypeError as err:  # an unknown keyword, one the named size fixes, a value of the wrong type
        raise ConfigError(
            f"{where}.params: {kind[:-1]} {name!r} does not accept these parameters: {err}"
        ) from err
    except LatentforgeError as err:  # the builder's own check of a value (a range, a divisibility)
        raise ConfigError(f"{where}.params: {kind[:-1]} {name!r}: {err}") from err
    except ValueError as err:
        raise ConfigError(
            f"{where}.params: {kind[:-1]} {name!r} does not accept these parameters: {err}"
        ) from err


# ------------------------------------------------------------------------------------------------
# Help: every key of a settings tree with its type, default and one line from the source
# ------------------------------------------------------------------------------------------------
@attrs.frozen
class KeyHelp:
    key: str  # dotted
    type: str
    default: str
    help: str


_SKIP_COMMENTS = ("fmt:", "type:", "noqa", "pragma")


def field_help(cls: type) -> dict[str, str]:
    """``{field: help}`` of a settings class, from its source: the field's trailing ``# comment``, else a
    comment inside the field's statement, else the comment block right above it, else a sentence of
    the class docstring that names the field in double backticks."""
    helps: dict[str, str] = {}
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):  # no source (a class made at run time): docstring only
        source = ""
    if source:
        lines = source.splitlines()
        comments: dict[int, tuple[bool, str]] = {}  # line → (trailing, text)
        for tok in tokenize.generate_tokens(io.StringIO(source).readline):
            if tok.type == tokenize.COMMENT:
                text = tok.string.lstrip("#").strip()
                if text and not text.startswith(_SKIP_COMMENTS):
                    row, col = tok.start
                    comments[row] = (bool(lines[row - 1][:col].strip()), text)
        body = next(n for n in ast.parse(source).body if isinstance(n, ast.ClassDef)).body
        for stmt in body:
            if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
                continue
            rows = range(stmt.lineno, (stmt.end_lineno or stmt.lineno) + 1)
            trailing = [comments[r][1] for r in rows if r in comments and comments[r][0]]
            inner = [comments[r][1] for r in rows if r in comments and not comments[r][0]]
            above: list[str] = []
            row = stmt.lineno - 1
            while row in comments and not comments[row][0]:
                above.insert(0, comments[row][1])
                row -= 1
            text = " ".join(trailing or inner or above)
            if text:
                helps[stmt.target.id] = text
    doc = " ".join((cls.__doc__ or "").split())
    for f in attrs.fields(cls):
        if f.name not in helps and f"``{f.name}``" in doc:
            sentence = next(s for s in doc.split(". ") if f"``{f.name}``" in s).rstrip(".")
            sentence = re.sub(r":\w+:`([^`]*)`", r"\1", sentence)  # :func:`x` → x
            helps[f.name] = sentence if len(sentence) <= 100 else sentence[:99].rstrip() + "…"
    return {k: v.replace("``", "") for k, v in helps.items()}


def help_type(tp: Any) -> str:
    """A type as ``--help`` shows it: ``int | None``, ``'center' | 'random'``, ``list[str]``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return " | ".join(map(repr, args))
    if origin in (typing.Union, types.UnionType):
        return " | ".join("None" if a is type(None) else help_type(a) for a in args)
    if isinstance(tp, type) and not args:
        return tp.__name__
    return _type_name(tp)


def _show_default(value: Any) -> str:
    if isinstance(value, Component):
        return value.name
    if value is None:
        return "null"
    return yaml.safe_dump(to_plain(value), default_flow_style=True).strip().removesuffix("...").strip()


def settings_help(cls: type, where: str = "") -> list[KeyHelp]:
    """Every key of settings class ``cls`` (nested blocks expanded, a registry block as ``.name`` and
    ``.params``), with its type, its default (``(required)`` when it has none) and its help line."""
    attrs.resolve_types(cls)
    helps = field_help(cls)
    out: list[KeyHelp] = []
    for f in attrs.fields(cls):
        key = _join(where, f.name)
        if f.default is attrs.NOTHING:
            default: Any = attrs.NOTHING
        elif isinstance(f.default, attrs.Factory):  # type: ignore[arg-type]
            default = f.default.factory()  # type: ignore[call-arg]
        else:
            default = f.default
        text = helps.get(f.name, "")
        if f.metadata.get("range"):
            text = f"{text} [{f.metadata['range']}]".strip()
        tp = f.type
        nested = [a for a in (typing.get_args(tp) or (tp,)) if isinstance(a, type) and attrs.has(a)]
        if nested and nested[0] is not Component:
            out.append(KeyHelp(key, nested[0].__name__, "(block)", text))
            out += settings_help(nested[0], key)
            continue
        if nested:  # a registry block
            kind = f.metadata.get("kind", "registry")
            name = default.name if isinstance(default, Component) else None
            shown = name if name else ("null" if default is None else "(required)")
            out.append(KeyHelp(f"{key}.name", "str", shown, text or f"a registered {kind[:-1]}"))
            params = to_plain(default.params) if isinstance(default, Component) else {}
            out.append(
                KeyHelp(
                    f"{key}.params", "dict", _show_default(params),
                    f"keyword arguments of the {kind[:-1]} (`latentforge ls {kind}`)",
                )
            )  # fmt: skip
            continue
        shown = "(required)" if default is attrs.NOTHING else _show_default(default)
        out.append(KeyHelp(key, help_type(tp), shown, text))
    return out
