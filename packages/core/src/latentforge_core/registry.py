"""Entry-point registries: one per component kind, a third party's plugin on equal terms with ours.

Rules (docs/design.md): listing reads metadata only; ``get`` imports once and caches; a plugin that fails
to import never breaks listing and ``get`` names its distribution; identical duplicates are dropped;
first-party names are reserved; two third parties claiming a name make it ambiguous (``dist/name``
picks one); unknown names get close matches; ``LATENTFORGE_DISABLE_PLUGIN_AUTOLOAD=1`` hides every
third-party entry before anything is imported; ``register``/``override`` serve tests and notebooks.
"""

from __future__ import annotations

import contextlib
import difflib
import fnmatch
import importlib.metadata as md
import os
import re
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import attrs

from latentforge_core import protocols
from latentforge_core.errors import InputTypeError, LatentforgeError

DISABLE_AUTOLOAD_ENV = "LATENTFORGE_DISABLE_PLUGIN_AUTOLOAD"
FIRST_PARTY_PREFIX = "latentforge-"
IN_PROCESS = "<in-process>"


class RegistryError(LatentforgeError, LookupError):
    """A name that cannot be resolved: unknown, ambiguous, or reserved."""


class PluginLoadError(LatentforgeError, ImportError):
    """An entry point whose target could not be imported or built."""


def _normalize(dist_name: str) -> str:
    return re.sub(r"[-_.]+", "-", dist_name).lower()


def _autoload_disabled() -> bool:
    return os.environ.get(DISABLE_AUTOLOAD_ENV, "").strip().lower() in {"1", "true", "yes", "on"}


@attrs.frozen
class Entry:
    """One registered name, known from metadata alone (nothing imported)."""

    name: str
    value: str  # "module:attr", or IN_PROCESS
    dist: str  # distribution name, or IN_PROCESS
    version: str

    @property
    def first_party(self) -> bool:
        return _normalize(self.dist).startswith(FIRST_PARTY_PREFIX) or self.dist == IN_PROCESS

    @property
    def qualified(self) -> str:
        return f"{_normalize(self.dist)}/{self.name}"


class Registry:
    """Names of one entry-point group → factories (or classes) of one component kind."""

    def __init__(self, group: str, kind: str, protocol: type | None = None):
        self.group = group
        self.kind = kind
        self.protocol = protocol
        self._index: dict[str, list[Entry]] | None = None
        self._loaded: dict[Entry, Any] = {}
        self._local: dict[str, tuple[Entry, Any]] = {}

    # -------------------------------------------------------------------------------- discovery
    def _discover(self) -> dict[str, list[Entry]]:
        """Metadata only: name → the entries claiming it (first party first, duplicates dropped)."""
        if self._index is not None:
            return self._index
        third_party_allowed = not _autoload_disabled()
        seen: set[tuple[str, str, str]] = set()
        index: dict[str, list[Entry]] = {}
        for dist in md.distributions():
            dist_name = dist.metadata["Name"] or "?"
            for ep in dist.entry_points:
                if ep.group != self.group:
                    continue
                entry = Entry(ep.name, ep.value, dist_name, dist.version or "?")
                key = (entry.name, entry.value, _normalize(dist_name))
                if key in seen:  # the same distribution seen twice on sys.path (editable installs)
                    continue
                seen.add(key)
                if entry.first_party or third_party_allowed:
                    index.setdefault(entry.name, []).append(entry)
        for name, entries in index.items():
            entries.sort(key=lambda e: (not e.first_party, _normalize(e.dist)))
            ours = [e for e in entries if e.first_party]
            if ours and len(entries) > len(ours):
                intruders = ", ".join(f"{e.dist} {e.version}" for e in entries if not e.first_party)
                warnings.warn(
                    f"{self.kind} name {name!r} is reserved by {ours[0].dist}; the entry point of "
                    f"{intruders} is ignored (reach it as 'dist/{name}')",
                    stacklevel=3,
                )
        self._index = index
        return index

    def refresh(self) -> None:
        """Forget what was discovered (after a pip install or uninstall in this process)."""
        self._index = None
        self._loaded.clear()

    # -------------------------------------------------------------------------------- listing
    def entries(self, pattern: str | None = None) -> list[Entry]:
        """Every entry (including shadowed and ambiguous ones), optionally filtered by a glob."""
        found = [e for entries in self._discover().values() for e in entries]
        found += [entry for entry, _ in self._local.values()]
        if pattern:
            found = [e for e in found if fnmatch.fnmatch(e.name, pattern)]
        return sorted(found, key=lambda e: (e.name, not e.first_party, e.dist))

    def clashes(self) -> list[str]:
        """One line per name that several distributions claim: a third party's entry that a first-party
        name shadows, or two third parties making a name ambiguous (``dist/name`` picks one)."""
        lines = []
        with warnings.catch_warnings():  # the same news, told here instead
            warnings.simplefilter("ignore")
            index = self._discover()
        for name, entries in sorted(index.items()):
            if len({_normalize(e.dist) for e in entries}) < 2:
                continue
            claims = ", ".join(f"{e.dist} {e.version}" for e in entries)
            ours = [e for e in entries if e.first_party]
            if ours:
                lines.append(
                    f"{self.kind} name {name!r} is claimed by {claims}: {ours[0].dist}'s is used (the name "
                    f"is reserved); reach the others as 'dist/{name}'"
                )
            else:
                choices = " or ".join(repr(e.qualified) for e in entries)
                lines.append(f"{self.kind} name {name!r} is ambiguous, claimed by {claims}: use {choices}")
        return lines

    def names(self, pattern: str | None = None) -> list[str]:
        """The names a user can pass to ``get``; imports nothing."""
        return sorted({e.name for e in self.entries(pattern)})

    def __contains__(self, name: str) -> bool:
        try:
            self.info(name)
        except RegistryError:
            return False
        return True

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __repr__(self) -> str:
        return f"Registry({self.group!r}, {len(self.names())} names)"

    def info(self, name: str) -> Entry:
        """The one entry ``name`` resolves to (``dist/name`` accepted), without importing it."""
        return self._resolve(name)[0]

    def _resolve(self, name: str) -> tuple[Entry, Any]:
        if not isinstance(name, str) or not name:
            raise RegistryError(f"a {self.kind} name must be a non-empty string, got {name!r}")
        if name in self._local:
            return self._local[name]
        index = self._discover()
        if "/" in name:
            dist, _, bare = name.partition("/")
            for entry in index.get(bare, []):
                if _normalize(entry.dist) == _normalize(dist):
                    return entry, None
            raise self._unknown(name)
        entries = index.get(name)
        if not entries:
            raise self._unknown(name)
        if entries[0].first_party or len(entries) == 1:
            return entries[0], None
        claims = ", ".join(f"{e.dist} {e.version} ({e.value})" for e in entries)
        choices = " or ".join(repr(e.qualified) for e in entries)
        raise RegistryError(
            f"{self.kind} name {name!r} is ambiguous: it is claimed by {claims}. Use {choices}."
        )

    def _unknown(self, name: str) -> RegistryError:
        names = self.names()
        qualified = [e.qualified for e in self.entries()]
        close = difflib.get_close_matches(name, names + qualified, n=5, cutoff=0.5)
        hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        if not names:
            return RegistryError(f"no {self.kind} is registered (entry-point group {self.group!r}).")
        disabled = (
            f" Third-party plugins are off ({DISABLE_AUTOLOAD_ENV} is set)." if _autoload_disabled() else ""
        )
        return RegistryError(
            f"unknown {self.kind} {name!r}.{hint} {len(names)} {self.kind}s are registered; "
            f"list them with `latentforge ls {self.group.rsplit('.', 1)[-1]}`.{disabled}"
        )

    # -------------------------------------------------------------------------------- loading
    def get(self, name: str) -> Any:
        """The factory (or class) registered as ``name``, imported once and cached."""
        entry, obj = self._resolve(name)
        if entry.value == IN_PROCESS:
            return obj
        if entry not in self._loaded:
            ep = md.EntryPoint(name=entry.name, value=entry.value, group=self.group)
            try:
                self._loaded[entry] = ep.load()
            except Exception as err:
                raise PluginLoadError(
                    f"{self.kind} {entry.name!r} ({entry.value}) from distribution {entry.dist} "
                    f"{entry.version} failed to import: {type(err).__name__}: {err}"
                ) from err
        return self._loaded[entry]

    def build(self, name: str, **kwargs: Any) -> Any:
        """Call the factory registered as ``name`` and check the result against the kind's protocol."""
        factory = self.get(name)
        if not callable(factory):
            raise PluginLoadError(f"{self.kind} {name!r} resolves to a non-callable {type(factory).__name__}")
        try:
            component = factory(**kwargs)
        except LatentforgeError:
            raise
        except Exception as err:  # a third party's builder failing its own way: say whose it is
            entry = self.info(name)
            if entry.first_party:
                raise
            raise PluginLoadError(
                f"{self.kind} {name!r} ({entry.value}) from distribution {entry.dist} {entry.version} "
                f"failed to build: {type(err).__name__}: {err}"
            ) from err
        self.check(component, name)
        return component

    def check(self, component: Any, name: str = "?") -> None:
        """Raise ``TypeError`` if ``component`` lacks a member of the kind's protocol."""
        if self.protocol is None or isinstance(component, self.protocol):
            return
        required = [m for m in _protocol_members(self.protocol) if not hasattr(component, m)]
        raise InputTypeError(
            f"{self.kind} {name!r} built a {type(component).__name__} that does not fulfil the "
            f"{self.protocol.__name__} protocol: missing {', '.join(required)}"
        )

    def load_all(self) -> dict[str, Exception]:
        """Import every entry; returns (and warns about) the failures instead of raising."""
        failures: dict[str, Exception] = {}
        for entry in self.entries():
            key = entry.qualified
            try:
                self.get(key if entry.dist != IN_PROCESS else entry.name)
            except (PluginLoadError, RegistryError) as err:
                failures[key] = err
                warnings.warn(str(err), stacklevel=2)
        return failures

    # -------------------------------------------------------------------------------- in-process
    def register(
        self, name: str, obj: Callable[..., Any] | None = None, *, replace: bool = False
    ) -> Callable[..., Any]:
        """Register ``obj`` as ``name`` in this process; usable as a decorator."""

        def add(target: Callable[..., Any]) -> Callable[..., Any]:
            if not replace and (name in self._local or name in self._discover()):
                raise RegistryError(
                    f"{self.kind} {name!r} is already registered; pass replace=True or use override()"
                )
            self._local[name] = (Entry(name, IN_PROCESS, IN_PROCESS, "0"), target)
            return target

        return add if obj is None else add(obj)

    def unregister(self, name: str) -> None:
        if name not in self._local:
            raise RegistryError(f"{self.kind} {name!r} was not registered in this process")
        del self._local[name]

    @contextlib.contextmanager
    def override(self, name: str, obj: Callable[..., Any]) -> Iterator[Callable[..., Any]]:
        """Temporarily make ``name`` resolve to ``obj`` (restores the previous state on exit)."""
        previous = self._local.get(name)
        self._local[name] = (Entry(name, IN_PROCESS, IN_PROCESS, "0"), obj)
        try:
            yield obj
        finally:
            if previous is None:
                self._local.pop(name, None)
            else:
                self._local[name] = previous


def _protocol_members(protocol: type) -> list[str]:
    return sorted(m for m in getattr(protocol, "__protocol_attrs__", dir(protocol)) if not m.startswith("_"))


encoders = Registry("latentforge.encoders", "encoder", protocols.Encoder)
tokenizers = Registry("latentforge.tokenizers", "tokenizer", protocols.Tokenizer)
generators = Registry("latentforge.generators", "generator", protocols.Generator)
metrics = Registry("latentforge.metrics", "metric", protocols.Metric)
recipes = Registry("latentforge.recipes", "recipe", protocols.Recipe)

REGISTRIES: dict[str, Registry] = {
    "encoders": encoders,
    "tokenizers": tokenizers,
    "generators": generators,
    "metrics": metrics,
    "recipes": recipes,
}
