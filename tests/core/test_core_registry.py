"""Registry rules of docs/design.md, each against real distribution metadata on a temporary sys.path."""

import sys
import textwrap
from pathlib import Path

import pytest

from latentforge_core import protocols, registry
from latentforge_core.registry import PluginLoadError, Registry, RegistryError

GROUP = "latentforge.testkind"


class Site:
    """A folder on sys.path holding fake installed distributions (dist-info + module)."""

    def __init__(self, root: Path):
        self.root = root

    def dist(
        self, name: str, version: str, entries: dict[str, str], module: str | None = None, code: str = ""
    ):
        info = self.root / f"{name.replace('-', '_')}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        lines = "\n".join(f"{k} = {v}" for k, v in entries.items())
        (info / "entry_points.txt").write_text(f"[{GROUP}]\n{lines}\n")
        if module:
            (self.root / f"{module}.py").write_text(textwrap.dedent(code))


@pytest.fixture
def site(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv(registry.DISABLE_AUTOLOAD_ENV, raising=False)
    yield Site(tmp_path)
    for name in [m for m in sys.modules if m.startswith("lfplug_")]:
        del sys.modules[name]


def make() -> Registry:
    return Registry(GROUP, "widget")


def test_listing_reads_metadata_only(site):
    site.dist(
        "acme-widgets",
        "1.2",
        {"spinner": "lfplug_acme:make"},
        "lfplug_acme",
        "raise RuntimeError('imported!')",
    )
    reg = make()
    assert reg.names() == ["spinner"]
    entry = reg.info("spinner")
    assert (entry.dist, entry.version, entry.value) == ("acme-widgets", "1.2", "lfplug_acme:make")
    assert "lfplug_acme" not in sys.modules


def test_get_imports_once_and_caches(site, tmp_path):
    counter = tmp_path / "imports.txt"
    site.dist(
        "acme-widgets",
        "1.0",
        {"spinner": "lfplug_count:make"},
        "lfplug_count",
        f"""
        from pathlib import Path
        p = Path({str(counter)!r}); p.write_text(p.read_text() + 'x' if p.exists() else 'x')
        def make(**kw):
            return ('spinner', kw)
        """,
    )
    reg = make()
    first = reg.get("spinner")
    del sys.modules["lfplug_count"]  # a second import would show in the counter
    assert reg.get("spinner") is first
    assert counter.read_text() == "x"
    assert reg.build("spinner", size=3) == ("spinner", {"size": 3})


def test_broken_plugin_never_breaks_listing_and_get_names_the_distribution(site):
    site.dist(
        "acme-widgets",
        "2.0",
        {"broken": "lfplug_broken:make"},
        "lfplug_broken",
        "import not_a_module_anywhere",
    )
    site.dist("other-widgets", "0.3", {"fine": "lfplug_fine:make"}, "lfplug_fine", "def make(): return 1")
    reg = make()
    assert reg.names() == ["broken", "fine"]
    with pytest.raises(PluginLoadError, match=r"'broken'.*acme-widgets 2\.0.*not_a_module_anywhere") as err:
        reg.get("broken")
    assert isinstance(err.value.__cause__, ModuleNotFoundError)
    assert reg.get("fine")() == 1
    with pytest.warns(UserWarning, match="acme-widgets"):
        failures = reg.load_all()
    assert list(failures) == ["acme-widgets/broken"]


def test_identical_duplicates_are_dropped(site, tmp_path, monkeypatch):
    site.dist("acme-widgets", "1.0", {"spinner": "lfplug_dup:make"}, "lfplug_dup", "def make(): return 'ok'")
    twin = tmp_path / "twin"
    twin.mkdir()
    Site(twin).dist("acme-widgets", "1.0", {"spinner": "lfplug_dup:make"})
    monkeypatch.syspath_prepend(str(twin))  # the editable-install-seen-twice situation
    reg = make()
    assert len(reg.entries()) == 1
    assert reg.get("spinner")() == "ok"


def test_first_party_names_are_reserved(site):
    site.dist(
        "latentforge-widgets",
        "0.1",
        {"spinner": "lfplug_ours:make"},
        "lfplug_ours",
        "def make(): return 'ours'",
    )
    site.dist(
        "acme-widgets",
        "1.0",
        {"spinner": "lfplug_theirs:make"},
        "lfplug_theirs",
        "def make(): return 'theirs'",
    )
    reg = make()
    with pytest.warns(UserWarning, match=r"reserved by latentforge-widgets.*acme-widgets 1\.0 is ignored"):
        assert reg.get("spinner")() == "ours"
    assert reg.get("acme-widgets/spinner")() == "theirs"


def test_two_third_parties_make_a_name_ambiguous(site):
    site.dist("acme-widgets", "1.0", {"gear": "lfplug_a:make"}, "lfplug_a", "def make(): return 'a'")
    site.dist("bolt-widgets", "4.2", {"gear": "lfplug_b:make"}, "lfplug_b", "def make(): return 'b'")
    reg = make()
    with pytest.raises(
        RegistryError, match=r"ambiguous.*acme-widgets 1\.0.*bolt-widgets 4\.2.*'acme-widgets/gear'"
    ):
        reg.get("gear")
    assert reg.get("bolt-widgets/gear")() == "b"
    assert reg.get("acme_widgets/gear")() == "a"  # distribution names are normalised


def test_unknown_names_get_close_matches(site):
    site.dist("acme-widgets", "1.0", {"dinov2-vitb14": "x:y", "dinov2-vitl14": "x:z", "mae-vitb16": "x:w"})
    reg = make()
    with pytest.raises(RegistryError, match=r"unknown widget 'dinov2-vitb16'.*Did you mean 'dinov2-vitb14'"):
        reg.get("dinov2-vitb16")
    assert "dinov2-vitb16" not in reg
    assert reg.names("dinov2-*") == ["dinov2-vitb14", "dinov2-vitl14"]


def test_environment_switch_hides_third_party_before_import(site, monkeypatch):
    site.dist("latentforge-widgets", "0.1", {"ours": "lfplug_o:make"}, "lfplug_o", "def make(): return 1")
    site.dist(
        "acme-widgets", "1.0", {"theirs": "lfplug_t:make"}, "lfplug_t", "raise RuntimeError('imported!')"
    )
    monkeypatch.setenv(registry.DISABLE_AUTOLOAD_ENV, "1")
    reg = make()
    assert reg.names() == ["ours"]
    with pytest.raises(RegistryError, match=registry.DISABLE_AUTOLOAD_ENV):
        reg.get("theirs")
    reg.load_all()
    assert "lfplug_t" not in sys.modules


def test_register_and_override_in_process(site):
    site.dist(
        "latentforge-widgets",
        "0.1",
        {"spinner": "lfplug_s:make"},
        "lfplug_s",
        "def make(): return 'installed'",
    )
    reg = make()

    @reg.register("local")
    def local():
        return "local"

    assert reg.get("local")() == "local"
    with pytest.raises(RegistryError, match="already registered"):
        reg.register("spinner", local)
    with reg.override("spinner", lambda: "patched"):
        assert reg.get("spinner")() == "patched"
    assert reg.get("spinner")() == "installed"
    reg.unregister("local")
    assert "local" not in reg


def test_build_checks_the_protocol(site):
    site.dist(
        "acme-widgets", "1.0", {"half": "lfplug_half:make"}, "lfplug_half", "def make(): return object()"
    )
    reg = Registry(GROUP, "metric", protocols.Metric)
    with pytest.raises(
        TypeError, match=r"does not fulfil the Metric protocol: missing compute, merge, reset, update"
    ):
        reg.build("half")


@pytest.mark.parametrize("kind", sorted(registry.REGISTRIES))
def test_every_installed_entry_imports(kind):
    reg = registry.REGISTRIES[kind]
    assert reg.group == f"latentforge.{kind}"
    assert reg.load_all() == {}  # a broken first-party entry point is reported here, by name
