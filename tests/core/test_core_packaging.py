"""Installability: a third-party plugin appears and disappears with pip; packages install alone."""

import configparser
import json
import site as site_module
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PIP = ["-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-build-isolation", "--no-deps"]


def make_venv(path: Path, *, chain_to_current: bool) -> Path:
    """A fresh venv; when chained, it also sees this interpreter's site-packages (torch, editables)."""
    # A chained venv borrows pip from this interpreter; a clean one gets its own (ensurepip, offline).
    flags = ["--without-pip"] if chain_to_current else []
    subprocess.run([sys.executable, "-m", "venv", *flags, str(path)], check=True)
    python = path / "bin" / "python"
    site = Path(
        subprocess.run(
            [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
    )
    if chain_to_current:  # this venv's packages, and the system's when it was made with them (setup.sh)
        here = dict.fromkeys([sysconfig.get_paths()["purelib"], *site_module.getsitepackages()])
        (site / "_chain.pth").write_text("".join(f"import site; site.addsitedir({d!r})\n" for d in here))
    return python


def run(python: Path, code: str) -> str:
    proc = subprocess.run([python, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


LIST = """
import json, latentforge_core as lf
enc = lf.encoders
out = {"names": enc.names(), "dists": {e.name: e.dist for e in enc.entries()}}
if "acme-patch-mean" in out["names"]:
    import torch
    out["shape"] = list(enc.build("acme-patch-mean")(torch.rand(2, 3, 32, 32)).shape)
print(json.dumps(out))
"""


def test_plugin_example_installs_lists_builds_and_uninstalls(tmp_path):
    python = make_venv(tmp_path / "venv", chain_to_current=True)
    before = json.loads(run(python, LIST))
    assert "acme-patch-mean" not in before["names"]

    subprocess.run([python, *PIP, str(ROOT / "examples" / "plugin-example")], check=True)
    after = json.loads(run(python, LIST))
    assert after["dists"]["acme-patch-mean"] == "acme-latentforge-encoder"
    assert after["shape"] == [2, 3, 4, 4]

    subprocess.run([python, "-m", "pip", "uninstall", "-q", "-y", "acme-latentforge-encoder"], check=True)
    assert "acme-patch-mean" not in json.loads(run(python, LIST))["names"]


def build_wheel(package: str, out: Path) -> Path:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(out),
            str(ROOT / "packages" / package),
        ],
        check=True,
    )
    return next(out.glob(f"latentforge_{package}-*.whl"))


def wheel_entry_names(wheel: Path, group: str) -> list[str]:
    """Entry-point names a wheel declares in ``group``, read from its dist-info."""
    parser = configparser.ConfigParser(delimiters=("=",))
    parser.optionxform = str
    with zipfile.ZipFile(wheel) as zf:
        name = next((n for n in zf.namelist() if n.endswith(".dist-info/entry_points.txt")), None)
        if name is None:
            return []
        parser.read_string(zf.read(name).decode())
    return sorted(parser[group]) if parser.has_section(group) else []


@pytest.mark.slow
@pytest.mark.parametrize("package", ["metrics", "encoders"])
def test_package_installs_alone_from_wheels(tmp_path, package):
    """core + one package from wheels into a venv that has no latentforge at all."""
    wheels = tmp_path / "wheels"
    core, pkg = build_wheel("core", wheels), build_wheel(package, wheels)
    declared = wheel_entry_names(pkg, f"latentforge.{package}")
    python = make_venv(tmp_path / "venv", chain_to_current=False)
    # Dependencies resolve normally (torch from this machine's local wheel: pin it so no CUDA build).
    subprocess.run(
        [
            python,
            "-m",
            "pip",
            "install",
            "-q",
            "--disable-pip-version-check",
            "torch==2.13.0",
            str(core),
            str(pkg),
        ],
        check=True,
    )
    out = json.loads(
        run(
            python,
            f"""
import json, importlib.metadata as md, latentforge_core as lf, latentforge_{package}
reg = lf.REGISTRIES[{package!r}]
print(json.dumps({{"dists": sorted(d.metadata["Name"] for d in md.distributions()
                                   if d.metadata["Name"].startswith("latentforge")),
                  "entries": sorted((e.name, e.dist) for e in reg.entries())}}))
""",
        )
    )
    assert out["dists"] == ["latentforge-core", f"latentforge-{package}"]
    assert out["entries"] == sorted([name, f"latentforge-{package}"] for name in declared)
