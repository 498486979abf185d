"""Run settings: frozen, validated ``attrs`` classes read from one YAML file plus ``key.sub=value`` overrides.

A recipe declares its settings as a tree of :class:`Settings` classes (the one source of defaults).
:func:`parse` turns a plain dict (a YAML file after overrides) into that tree, naming the dotted key
of every problem: an unknown key (with close matches), a missing required key, a value of the wrong
type.  Blocks that name a registry entry (:class:`Component`) are checked by :func:`validate` without
building anything: the name must resolve and the parameters must bind to the builder's signature,
as torchtune's ``config.validate`` does.
"""

from __future__ import annotations

import difflib
import inspect
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
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _convert(value, arg, key)
            except ConfigError as err:
                errors.append(str(err))
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
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {err}") from err
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of blocks, got {type(data).__name__}")
    return data


def apply_overrides(data: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """``["training.lr=1e-4", "generator.params.depth=2"]`` → a new dict; values parse as YAML."""
    out = _deepcopy(data)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} is not of the form key.sub=value")
        value = yaml.safe_load(raw) if raw.strip() else None
        node = out
        parts = key.strip().split(".")
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


def validate(config: Any) -> list[str]:
    """Check every registry block of ``config``; returns ``["key: kind name", …]`` or raises ConfigError."""
    checked = []
    for where, block, kind, injected in component_blocks(config):
        check_component(kind, block, where, injected)
        checked.append(f"{where}: {kind[:-1]} {block.name}")
    return checked


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


def _build_on_meta(factory: Any, params: dict[str, Any], where: str, kind: str, name: str) -> None:
    """A builder taking ``**kwargs`` passes them on: build it on the meta device (no memory, no
    weights read) to see that every parameter is accepted somewhere down the line."""
    import torch

    files = {
        k
        for k, v in params.items()
        if isinstance(v, str) and (v.endswith(WEIGHT_SUFFIXES) or v.startswith("hf:"))
    }
    try:
        with torch.device("meta"):
            factory(**{k: v for k, v in params.items() if k not in files})
    except (TypeError, ValueError) as err:
        raise ConfigError(
            f"{where}.params: {kind[:-1]} {name!r} does not accept these parameters: {err}"
        ) from err
