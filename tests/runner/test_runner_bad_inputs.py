"""Every bad input a user (or an attacker) can give, in one table: each is a clear error, never a
traceback, never something silently wrong, and a failing command loses nothing already written.

Read the table as documentation.  A case is a command line (``latentforge_runner.cli.main``, run
in-process) or a Python API call, the error class it must raise (every one derives from
``latentforge_core.errors.LatentforgeError``) and the words its message must hold: the offending key,
argument or file, and a word of what was expected.  A ``must_mention`` item that is a tuple is
satisfied by any one of its spellings; matching ignores case.

The command-line contract: exit code 2 (``code``), stderr without "Traceback", the error printed as
``latentforge: error: …`` (first thing on stderr when the problem is visible in the command line and
config alone, ``early``; otherwise after whatever the run logged before it found the problem).
Commands that act on an existing run folder or checkpoint (``guard``) must leave every file there
as it was: the same bytes (``log.txt`` may only grow; ``config.yaml`` must keep the same settings),
none removed.  No case may ever unpickle the booby-trapped ``.pt`` files:
their ``__reduce__`` creates a sentinel file, which must never appear.

A few inputs are not errors but must not crash either (an unreadable image among good ones is
skipped and counted): those cases have ``error=None`` and a ``check`` of what must hold afterwards.

Shared data (image folders, ``.npz`` files, two tiny trained runs, tiny models) is built once per
module, lazily; a case that changes a run works on its own copy.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import pickle
import re
import shutil
import signal
import struct
import sys
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file
from sklearn.datasets import load_digits

from latentforge_core import registry
from latentforge_core.checkpoint import CheckpointError
from latentforge_core.errors import (
    InputError,
    InputTypeError,
    LatentforgeError,
    MissingFileError,
    NumericalError,
    StateError,
)
from latentforge_core.registry import PluginLoadError, RegistryError
from latentforge_metrics.npz import ReferenceFileError
from latentforge_runner import cli
from latentforge_runner.config import ConfigError
from latentforge_runner.data import DataError

# Where more than one class of the hierarchy is a fair answer, a case accepts any of them.
BAD_ARG = (InputError, InputTypeError)  # a tensor of the wrong dtype: a wrong value or a wrong type
NAME = (ConfigError, RegistryError)  # an unknown registry name in a config
FOLDER = (DataError, MissingFileError, ConfigError)  # a data path that is missing or not a folder
BAD_CKPT = (CheckpointError, MissingFileError)
NAN_CKPT = (CheckpointError, NumericalError)
NPZ = (ReferenceFileError, DataError)
USAGE = (SystemExit, LatentforgeError)  # argparse's own usage errors, or ours
CASE_SECONDS = 60  # a hung case fails instead of stalling the suite

# ------------------------------------------------------------------------------------------------
# Command lines
# ------------------------------------------------------------------------------------------------
FAST = (  # one tiny step, so that a bad value which is not caught costs a second, not a run
    "training.steps=1",
    "training.batch_size=8",
    "training.log_every=1",
    "training.checkpoint_every=1",
    "eval.num_samples=4",
    "eval.stats_batches=1",
    "eval.sampler.steps=1",
)
RUN_ARGS = (  # how the shared tiny-rae run was trained; resuming with these changes nothing
    "training.steps=2",
    "training.batch_size=8",
    "training.checkpoint_every=2",
    "training.log_every=1",
    "eval.every=0",
    "eval.num_samples=4",
    "eval.stats_batches=1",
    "eval.sampler.steps=1",
)
FOLDER_DATA = ("data.name=folder", "data.num_classes=2", "training.batch_size=4")
DIGITS32 = ("data.name=digits", "data.image_size=32", "max_images=16", "batch_size=8")
CACHE = ("run", "cache-latents", "tokenizer.name=test-rae-tiny", *DIGITS32)
PROBE = ("run", "linear-probe", "encoder.name=test-vit-tiny", "data.name=digits", "data.image_size=32")
PROBE += ("data.num_classes=10", "max_images=20", "epochs=1")


def rae(*overrides: str) -> tuple[str, ...]:
    """train-generator on the tiny RAE pipeline (digits, 32 px), one step."""
    return ("run", "train-generator", "--config", "tiny-rae", *FAST, *overrides)


def vavae(*overrides: str) -> tuple[str, ...]:
    """train-generator on the tiny VA-VAE + LightningDiT pipeline, one step."""
    return ("run", "train-generator", "--config", "tiny-vavae-lightningdit", *FAST, *overrides)


def tokens(*overrides: str) -> tuple[str, ...]:
    """train-tokens on the tiny DiGIT GPT (K-Means tokens), one step."""
    fast = (
        "training.steps=1",
        "training.batch_size=8",
        "training.log_every=1",
        "training.checkpoint_every=1",
    )
    return ("run", "train-tokens", "--config", "tiny-digit-gpt", *fast, *overrides)


def tok(*overrides: str, config: str = "tiny-train-vavae") -> tuple[str, ...]:
    """train-tokenizer (VA-VAE by default), one step."""
    fast = (
        "training.steps=1",
        "training.batch_size=4",
        "training.log_every=1",
        "training.checkpoint_every=1",
        "eval.num_images=4",
        "eval.batch_size=4",
    )
    return ("run", "train-tokenizer", "--config", config, *fast, *overrides)


def resume(*overrides: str) -> tuple[str, ...]:
    """The shared run's own command again, in its private copy <run>, plus ``overrides``."""
    return ("run", "train-generator", "--config", "tiny-rae", *RUN_ARGS, "run.output_dir=<run>", *overrides)


def sample(*overrides: str) -> tuple[str, ...]:
    return (
        "run",
        "sample",
        "generator_run=<run>",
        "num_samples=10",
        "batch_size=10",
        "write_png=false",
        *overrides,
    )


def pack(*overrides: str) -> tuple[str, ...]:
    return ("run", "pack", "image_size=32", "batch_size=4", *overrides)


def reconstruct(*overrides: str) -> tuple[str, ...]:
    return ("run", "reconstruct", "tokenizer.name=test-rae-tiny", "image_size=32", "batch_size=4", *overrides)


def evaluate(*overrides: str) -> tuple[str, ...]:
    return ("run", "evaluate", "batch_size=2", *overrides)


# ------------------------------------------------------------------------------------------------
# Data builders
# ------------------------------------------------------------------------------------------------
class Explodes:
    """Unpickling this calls ``open(sentinel, "w")``: a loader that executes pickles creates the file."""

    def __init__(self, sentinel: Path):
        self.sentinel = str(sentinel)

    def __reduce__(self):
        return (open, (self.sentinel, "w"))


def digit_images(n: int, size: int = 32, offset: int = 0) -> np.ndarray:
    """``n`` digits as uint8 ``[n, size, size, 3]`` (nearest upsampling of the 8×8 originals)."""
    img = (load_digits().images[offset : offset + n] * 255 / 16).round().astype(np.uint8)
    img = img.repeat(size // 8, axis=1).repeat(size // 8, axis=2)
    return np.repeat(img[..., None], 3, axis=-1)


def write_images(
    folder: Path, n: int, *, size: int = 32, offset: int = 0, suffix: str = ".png"
) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, arr in enumerate(digit_images(n, size, offset)):
        path = folder / f"{offset + i:03d}{suffix}"
        Image.fromarray(arr).save(path)
        paths.append(path)
    return paths


def bomb_png(path: Path, side: int = 100_000) -> None:
    """A valid PNG header claiming side × side pixels: Pillow refuses it as a decompression bomb."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    body = chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + body)


def npz(path: Path, **arrays: Any) -> Path:
    with open(path, "wb") as f:
        np.savez(f, **arrays)
    return path


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def rewrite_safetensors(
    path: Path, tensors: Callable[[dict], dict] = lambda t: t, **meta_changes: Any
) -> None:
    """Rewrite our safetensors file with its tensors passed through ``tensors`` and its config metadata
    updated by ``meta_changes`` (the format is read with safetensors itself, not with the code under test)."""
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata() or {})
        state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open, not a dict)
    if meta_changes:
        meta["config"] = json.dumps({**json.loads(meta.get("config", "{}")), **meta_changes})
    save_file(tensors(state), str(path), metadata=meta)


def with_nan(state: dict) -> dict:
    key = next(k for k, v in state.items() if v.is_floating_point() and v.numel() > 1)
    return {**state, key: torch.full_like(state[key], float("nan"))}


def reshaped(state: dict) -> dict:
    key = next(k for k, v in state.items() if v.ndim == 2)
    return {**state, key: torch.zeros(state[key].shape[0] + 1, state[key].shape[1])}


def snapshot(folder: Path) -> dict[str, Any]:
    """Every file under ``folder``: ``log.txt`` whole (it may only grow), ``config.yaml`` as its YAML
    content (rewriting the same settings is no change), anything else as a sha256."""

    def state(path: Path) -> Any:
        data = path.read_bytes()
        if path.name == "log.txt":
            return data
        if path.name == "config.yaml":
            try:
                return repr(yaml.safe_load(data))
            except yaml.YAMLError:
                pass
        return hashlib.sha256(data).digest()

    return {p.relative_to(folder).as_posix(): state(p) for p in sorted(folder.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------------------------
# Shared inputs, built once per module (lazily: a -k subset builds only what it uses)
# ------------------------------------------------------------------------------------------------
class Env:
    def __init__(self, root: Path):
        self.root = root
        self.sentinel = root / "UNPICKLED"

    def _dir(self, name: str) -> Path:
        path = self.root / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    # ---------------------------------------------------------------------------- image folders
    @functools.cached_property
    def good(self) -> Path:
        """ImageNet layout, 2 classes × 4 digits at 32 px."""
        root = self._dir("good")
        write_images(root / "a", 4, offset=0)
        write_images(root / "b", 4, offset=10)
        return root

    @functools.cached_property
    def three_classes(self) -> Path:
        root = self._dir("three_classes")
        for i, name in enumerate("abc"):
            write_images(root / name, 2, offset=10 * i)
        return root

    @functools.cached_property
    def empty(self) -> Path:
        return self._dir("empty")

    @functools.cached_property
    def afile(self) -> Path:
        path = self.root / "notes.txt"
        path.write_text("not an image, not a folder\n")
        return path

    @functools.cached_property
    def text_only(self) -> Path:
        root = self._dir("text_only")
        for i in range(3):
            (root / f"readme{i}.txt").write_text("hello")
        return root

    @functools.cached_property
    def corrupt(self) -> Path:
        root = self._dir("corrupt")
        for i in range(5):
            (root / f"garbage{i}.png").write_bytes(b"this is not a png" * (i + 1))
        return root

    @functools.cached_property
    def zero(self) -> Path:
        root = self._dir("zero")
        (root / "blank.png").write_bytes(b"")
        return root

    @functools.cached_property
    def truncated(self) -> Path:
        """A flat folder: 4 good JPEGs and one cut in half."""
        root = self._dir("truncated")
        good = write_images(root, 4, suffix=".jpg")
        data = good[0].read_bytes()
        (root / "trunc.jpg").write_bytes(data[: len(data) // 2])
        return root

    @functools.cached_property
    def bomb(self) -> Path:
        """A flat folder: 4 good PNGs and a decompression bomb."""
        root = self._dir("bomb")
        write_images(root, 4)
        bomb_png(root / "bomb.png")
        return root

    @functools.cached_property
    def small(self) -> Path:
        """A flat folder of 8×8 images, smaller than a 32-pixel crop."""
        return write_images(self._dir("small"), 6, size=8)[0].parent

    @functools.cached_property
    def img(self) -> Path:
        return write_images(self._dir("one"), 1)[0]

    @functools.cached_property
    def broken_img(self) -> Path:
        path = self._dir("broken") / "broken.png"
        path.write_bytes(b"\x89PNG\r\n\x1a\n but then garbage")
        return path

    # ---------------------------------------------------------------------------- .npz files
    @functools.cached_property
    def samples(self) -> Path:
        return npz(self.root / "samples.npz", arr_0=digit_images(4))

    @functools.cached_property
    def ref2(self) -> Path:
        return npz(self.root / "ref2.npz", arr_0=digit_images(2, offset=100))

    @functools.cached_property
    def ref16px(self) -> Path:
        return npz(self.root / "ref16px.npz", arr_0=digit_images(4, size=16))

    @functools.cached_property
    def no_arr0(self) -> Path:
        return npz(self.root / "no_arr0.npz", images=digit_images(4))

    @functools.cached_property
    def float_arr0(self) -> Path:
        return npz(self.root / "float_arr0.npz", arr_0=digit_images(4).astype(np.float32) / 255)

    @functools.cached_property
    def nchw(self) -> Path:
        return npz(self.root / "nchw.npz", arr_0=digit_images(4).transpose(0, 3, 1, 2).copy())

    @functools.cached_property
    def gray(self) -> Path:
        return npz(self.root / "gray.npz", arr_0=digit_images(4)[..., 0].copy())

    @functools.cached_property
    def truncated_npz(self) -> Path:
        path = npz(self.root / "halved.npz", arr_0=digit_images(4))
        truncate(path)
        return path

    @functools.cached_property
    def garbage_npz(self) -> Path:
        path = self.root / "garbage.npz"
        path.write_bytes(b"PK\x03\x04 not really a zip archive" * 8)
        return path

    @functools.cached_property
    def pickled_npz(self) -> Path:
        """``arr_0`` an object array whose element would create the sentinel when unpickled."""
        path = self.root / "pickled.npz"
        with open(path, "wb") as f:
            np.savez(f, arr_0=np.array([Explodes(self.sentinel)], dtype=object), allow_pickle=True)
        return path

    @functools.cached_property
    def stats_good(self) -> Path:
        return npz(self.root / "stats_good.npz", mu=np.zeros(4), sigma=np.eye(4))

    @functools.cached_property
    def stats_bad_shape(self) -> Path:
        return npz(self.root / "stats_uneven.npz", mu=np.zeros(8), sigma=np.eye(7))

    @functools.cached_property
    def stats_nan(self) -> Path:
        sigma = np.eye(4)
        sigma[1, 2] = np.nan
        return npz(self.root / "stats_bad_values.npz", mu=np.zeros(4), sigma=sigma)

    # ---------------------------------------------------------------------------- weight files
    @functools.cached_property
    def evil_pt(self) -> Path:
        """A torch.save file whose unpickling creates the sentinel."""
        path = self.root / "evil.pt"
        torch.save({"model": Explodes(self.sentinel), "w": torch.zeros(2)}, path)
        return path

    @functools.cached_property
    def evil_pickle(self) -> Path:
        """A raw (non-zip) pickle whose unpickling creates the sentinel."""
        path = self.root / "evil_raw.pkl.pt"
        path.write_bytes(pickle.dumps({"state": Explodes(self.sentinel)}))
        return path

    @functools.cached_property
    def evil_npy(self) -> Path:
        path = self.root / "evil.npy"
        np.save(path, np.array([Explodes(self.sentinel)], dtype=object), allow_pickle=True)
        return path

    @functools.cached_property
    def garbage_pth(self) -> Path:
        path = self.root / "garbage.pth"
        path.write_bytes(b"\x00\x01not torch at all" * 64)
        return path

    @functools.cached_property
    def list_pt(self) -> Path:
        path = self.root / "list.pt"
        torch.save([torch.zeros(2), torch.ones(2)], path)
        return path

    @functools.cached_property
    def good_ckpt(self) -> Path:
        from latentforge_core.checkpoint import save_checkpoint

        return save_checkpoint(
            {"w": torch.zeros(3, 2), "b": torch.zeros(3)}, self.root / "good.safetensors", {"name": "x"}
        )

    @functools.cached_property
    def truncated_ckpt(self) -> Path:
        path = self.root / "halved.safetensors"
        path.write_bytes(self.good_ckpt.read_bytes())
        truncate(path)
        return path

    @functools.cached_property
    def zero_ckpt(self) -> Path:
        path = self.root / "zero.safetensors"
        path.write_bytes(b"")
        return path

    @functools.cached_property
    def bad_json_ckpt(self) -> Path:
        path = self.root / "badmeta.safetensors"
        save_file({"w": torch.zeros(2)}, str(path), metadata={"format": "latentforge", "config": "{not json"})
        return path

    @functools.cached_property
    def inception_weights(self) -> Path:
        """Random FID Inception weights (never downloaded)."""
        from latentforge_metrics.inception import FIDInceptionV3

        path = self.root / "pt_inception-random.pth"
        torch.manual_seed(0)
        torch.save(FIDInceptionV3().state_dict(), path)
        return path

    # ---------------------------------------------------------------------------- runs
    def _main(self, *argv: str) -> None:
        handlers = list(logging.getLogger("latentforge").handlers)
        try:
            assert cli.main(list(argv)) == 0, f"building shared input failed: {argv}"
        finally:
            logging.getLogger("latentforge").handlers[:] = handlers

    @functools.cached_property
    def rae_run(self) -> Path:
        """tiny-rae trained 2 steps: config.yaml, latent stats, checkpoints/00000002 (model, ema, state)."""
        out = self.root / "rae_run"
        self._main("run", "train-generator", "--config", "tiny-rae", *RUN_ARGS, f"run.output_dir={out}")
        assert (out / "checkpoints" / "00000002" / "ema.safetensors").is_file()
        return out

    @functools.cached_property
    def ldit_run(self) -> Path:
        """tiny-vavae-lightningdit trained 1 step: a checkpoint of another generator."""
        out = self.root / "ldit_run"
        self._main(*vavae("eval.every=0", f"run.output_dir={out}"))
        return out

    @functools.cached_property
    def pack_run(self) -> Path:
        out = self.root / "other_recipe_run"
        self._main(*pack(f"root={self.good}", f"run.output_dir={out}"))
        return out

    # ---------------------------------------------------------------------------- models
    @functools.cached_property
    def rae_tok(self):
        torch.manual_seed(0)
        return registry.tokenizers.build("test-rae-tiny").eval()

    @functools.cached_property
    def vavae_tok(self):
        return registry.tokenizers.build("test-vavae-tiny").eval()

    @functools.cached_property
    def vqgan_tok(self):
        return registry.tokenizers.build("test-vqgan-tiny").eval()

    @functools.cached_property
    def kmeans_tok(self):
        return registry.tokenizers.build("test-kmeans-tiny").eval()

    @functools.cached_property
    def dit(self):
        return registry.generators.build("test-dit")  # latents 4×8×8, 10 classes (+ null class 10)

    @functools.cached_property
    def gpt(self):
        return registry.generators.build("test-gpt")  # 4×4 grids of 64 tokens, 10 classes

    @functools.cached_property
    def maskgit(self):
        return registry.generators.build("test-maskgit")

    @functools.cached_property
    def fd(self):
        return registry.metrics.build("fd-dinov2", encoder="test-vit-tiny", output="pooled")

    @functools.cached_property
    def fid(self):
        from latentforge_metrics import FID
        from latentforge_metrics.inception import FIDInceptionV3

        return FID(inception=FIDInceptionV3())


# ------------------------------------------------------------------------------------------------
# A case, its context, and per-case setups
# ------------------------------------------------------------------------------------------------
class Ctx:
    """One case's world: the shared ``env``, a private ``tmp`` folder and ``<name>`` placeholders."""

    def __init__(self, env: Env, tmp: Path, mp: pytest.MonkeyPatch):
        self.env, self.tmp, self.mp = env, tmp, mp
        self.paths: dict[str, Path] = {"tmp": tmp, "out": tmp / "out"}
        self.on_exit: list[Callable[[], None]] = []

    def path(self, name: str) -> Path:
        return self.paths[name] if name in self.paths else getattr(self.env, name)

    def resolve(self, arg: str) -> str:
        return re.sub(r"<(\w+)>", lambda m: str(self.path(m.group(1))), arg)


Setup = Callable[[Ctx], None]


@dataclasses.dataclass(frozen=True)
class Case:
    id: str
    argv: tuple[str, ...] | None = None  # a command line, <name> placeholders resolved
    call: Callable[[Ctx], Any] | None = None  # or a Python API call
    error: type[BaseException] | tuple[type[BaseException], ...] | None = LatentforgeError
    must_mention: tuple[str | tuple[str, ...], ...] = ()
    setup: Setup | None = None
    guard: str | None = None  # a placeholder naming a folder whose files the command must not change
    early: bool = True  # the error is the first thing on stderr
    usage: bool = False  # an argparse usage error: "usage: …" then "latentforge: error: …"
    code: int = 2
    check: Callable[[Ctx, str], None] | None = None  # for error=None: what must hold after success
    no_cuda: bool = False  # only meaningful where CUDA is absent

    def __repr__(self) -> str:
        return self.id


def C(id: str, argv: tuple[str, ...], error, *mention, **kw) -> Case:
    """A command-line case."""
    return Case(id, argv=tuple(argv), error=error, must_mention=mention, **kw)


def A(id: str, call: Callable[[Ctx], Any], error, *mention, **kw) -> Case:
    """A Python API case."""
    return Case(id, call=call, error=error, must_mention=mention, **kw)


def steps(*setups: Setup) -> Setup:
    def run(ctx: Ctx) -> None:
        for s in setups:
            s(ctx)

    return run


def copy_run(name: str = "rae_run", as_: str = "run") -> Setup:
    """A private copy of a shared run folder, as placeholder ``<as_>``; its ``config.yaml`` names the
    copy as ``run.output_dir``, as if it had been trained there."""

    def run(ctx: Ctx) -> None:
        folder = Path(shutil.copytree(getattr(ctx.env, name), ctx.tmp / as_))
        config = yaml.safe_load((folder / "config.yaml").read_text())
        config["run"]["output_dir"] = str(folder)
        (folder / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        ctx.paths[as_] = folder

    return run


def in_ckpt(action: Callable[[Path], None]) -> Setup:
    """Act on the copied run's checkpoint folder ``checkpoints/00000002``."""
    return lambda ctx: action(ctx.paths["run"] / "checkpoints" / "00000002")


def in_run(action: Callable[[Path], None]) -> Setup:
    return lambda ctx: action(ctx.paths["run"])


def file(key: str, name: str, content: str | bytes) -> Setup:
    """Write ``content`` to ``<tmp>/name``, as placeholder ``<key>``."""

    def run(ctx: Ctx) -> None:
        path = ctx.tmp / name
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        ctx.paths[key] = path

    return run


def tiny_rae_yaml(edit: Callable[[dict], None]) -> str:
    data = yaml.safe_load(cli.shipped_configs()["tiny-rae"].read_text())
    edit(data)
    return yaml.safe_dump(data)


PLUGIN_GROUP = "latentforge.generators"
PLUGIN_MODULES = {
    "lfbad_broken": "import not_a_module_anywhere\n",
    "lfbad_boom": "def make(**kwargs):\n    raise RuntimeError('boom: the builder fell over')\n",
    "lfbad_odd": "def make(**kwargs):\n    return object()\n",
    "lfbad_const": "VALUE = 3\n",
    "lfbad_twin1": "def make(**kwargs):\n    return None\n",
    "lfbad_twin2": "def make(**kwargs):\n    return None\n",
}


def plugins(disabled: bool = False) -> Setup:
    """Two third-party distributions on sys.path declaring generators that break in every way."""

    def dist(site: Path, name: str, version: str, entries: dict[str, str]) -> None:
        info = site / f"{name.replace('-', '_')}-{version}.dist-info"
        info.mkdir(parents=True)
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        lines = "\n".join(f"{k} = {v}" for k, v in entries.items())
        (info / "entry_points.txt").write_text(f"[{PLUGIN_GROUP}]\n{lines}\n")

    def run(ctx: Ctx) -> None:
        site = ctx.tmp / "site"
        site.mkdir()
        for module, code in PLUGIN_MODULES.items():
            (site / f"{module}.py").write_text(code)
        dist(
            site,
            "acme-bad",
            "1.0",
            {
                "broken-gen": "lfbad_broken:make",
                "boom-gen": "lfbad_boom:make",
                "odd-gen": "lfbad_odd:make",
                "const-gen": "lfbad_const:VALUE",
                "twin-gen": "lfbad_twin1:make",
            },
        )
        dist(site, "acme-other", "2.0", {"twin-gen": "lfbad_twin2:make"})
        ctx.mp.syspath_prepend(str(site))
        if disabled:
            ctx.mp.setenv(registry.DISABLE_AUTOLOAD_ENV, "1")
        else:
            ctx.mp.delenv(registry.DISABLE_AUTOLOAD_ENV, raising=False)
        for reg in registry.REGISTRIES.values():
            reg.refresh()

        def forget() -> None:
            for reg in registry.REGISTRIES.values():
                reg.refresh()
            for module in [m for m in sys.modules if m.startswith("lfbad_")]:
                del sys.modules[module]

        ctx.on_exit.append(forget)

    return run


# Success checks for the inputs that must be skipped and counted, not fatal.
def log_mentions(*words: str) -> Callable[[Ctx, str], None]:
    def check(ctx: Ctx, err: str) -> None:
        text = (
            (ctx.paths["out"] / "log.txt").read_text() if (ctx.paths["out"] / "log.txt").is_file() else ""
        ) + err
        for word in words:
            assert word.lower() in text.lower(), f"the run's log does not mention {word!r}"

    return check


def packed(count: int, skipped: str) -> Callable[[Ctx, str], None]:
    def check(ctx: Ctx, err: str) -> None:
        report = json.loads((ctx.paths["out"] / "pack.json").read_text())
        assert report["skipped"] == 1 and any(skipped in f for f in report["skipped_files"]), report
        with np.load(ctx.paths["out"] / "images.npz") as f:
            assert f["arr_0"].shape == (count, 32, 32, 3)

    return check


def stdout_mentions(*words: str) -> Callable[[Ctx, str], None]:
    def check(ctx: Ctx, out: str) -> None:
        for word in words:
            assert word in out, f"the output does not mention {word!r}"

    return check


# ------------------------------------------------------------------------------------------------
# API calls (each builds its bad input inline)
# ------------------------------------------------------------------------------------------------
def build(kind: str, name: str, **kwargs: Any) -> Callable[[Ctx], Any]:
    return lambda ctx: registry.REGISTRIES[kind].build(name, **kwargs)


def checkpoint_api(fn: str, placeholder: str) -> Callable[[Ctx], Any]:
    def call(ctx: Ctx) -> Any:
        from latentforge_core import checkpoint

        return getattr(checkpoint, fn)(ctx.path(placeholder))

    return call


def npz_api(fn: str, placeholder: str) -> Callable[[Ctx], Any]:
    def call(ctx: Ctx) -> Any:
        from latentforge_metrics import npz as module

        result = getattr(module, fn)(ctx.path(placeholder))
        return list(result) if fn == "iter_npz_images" else result

    return call


def y(*labels: int) -> torch.Tensor:
    return torch.tensor(labels)


def images(*shape: int, scale: float = 1.0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    if dtype == torch.uint8 or not dtype.is_floating_point:
        return torch.randint(0, 256, shape, generator=gen).to(dtype)
    return (torch.rand(shape, generator=gen) * scale).to(dtype)


def nan_images(*shape: int) -> torch.Tensor:
    x = images(*shape)
    x[0, 0, 0, 0] = float("nan")
    return x


def grid(value: int | None = None, shape: tuple[int, ...] = (2, 4, 4), dtype: torch.dtype = torch.long):
    if value is None:
        return torch.randint(0, 64, shape).to(dtype)
    return torch.full(shape, value, dtype=dtype)


def latents(*shape: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(0))


def vq_ids(ctx: Ctx, value: int | None = None, dtype: torch.dtype = torch.long) -> torch.Tensor:
    h, w = ctx.env.vqgan_tok.latent_shape[-2:]
    if value is None:
        return torch.rand(2, h, w).to(dtype)
    return torch.full((2, h, w), value, dtype=dtype)


def vavae_wrong_channels(ctx: Ctx) -> torch.Tensor:
    c, h, w = ctx.env.vavae_tok.latent_shape
    return latents(2, c + 1, h, w)


def lstats(*shape: int):
    from latentforge_tokenizers.stats import LatentStats

    return LatentStats(torch.ones(shape))


def probe_rows_mismatch(ctx: Ctx) -> None:
    from latentforge_metrics.probe import LinearProbe

    LinearProbe(10, features=lambda x: x.flatten(1)).update_features(torch.randn(4, 8), y(0, 1, 2))


def psnr_merge_ssim(ctx: Ctx) -> None:
    from latentforge_metrics import PSNR, SSIM

    PSNR().merge(SSIM())


def psnr(ctx: Ctx, a: torch.Tensor | None, b: torch.Tensor | None) -> Any:
    from latentforge_metrics import PSNR

    metric = PSNR()
    if a is None:
        return metric.compute()
    metric.update(a, b)
    return metric.compute()


def ssim(ctx: Ctx, a: torch.Tensor, b: torch.Tensor) -> Any:
    from latentforge_metrics import SSIM

    metric = SSIM()
    metric.update(a, b)
    return metric.compute()


def fresh_fd(ctx: Ctx):
    ctx.env.fd.reset()
    return ctx.env.fd


def gaussian_mismatch(ctx: Ctx) -> Any:
    from latentforge_metrics import GaussianStats

    return GaussianStats.from_moments(np.zeros(3), np.eye(4))


def frechet_mismatch(ctx: Ctx) -> Any:
    from latentforge_metrics import frechet_distance

    return frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def sample_writer_wrong_size(ctx: Ctx) -> None:
    from latentforge_metrics import SampleWriter

    with SampleWriter(ctx.tmp / "x.npz", 2, 32) as writer:
        writer.write(images(2, 3, 16, 16))


def save_samples_nan(ctx: Ctx) -> Any:
    from latentforge_metrics import save_samples

    return save_samples(ctx.tmp / "nan.npz", nan_images(2, 3, 8, 8))


def load_into_api(ctx: Ctx, state: dict) -> None:
    from latentforge_core.checkpoint import load_into

    load_into(torch.nn.Linear(2, 3), state)


def save_checkpoint_non_tensor(ctx: Ctx) -> Any:
    from latentforge_core.checkpoint import save_checkpoint

    return save_checkpoint({"w": 1.5}, ctx.tmp / "x.safetensors")


def latent_stats_load(ctx: Ctx) -> Any:
    from latentforge_tokenizers.stats import LatentStats

    return LatentStats.load(ctx.env.evil_pt)


def unknown_suffix(ctx: Ctx) -> Any:
    from latentforge_core.checkpoint import load_state_file

    path = ctx.tmp / "weights.txt"
    path.write_text("w = 1")
    return load_state_file(path)


# ------------------------------------------------------------------------------------------------
# THE TABLE
# ------------------------------------------------------------------------------------------------
CASES: list[Case] = [
    # ============================================================================================
    # The command line itself: argparse usage errors (usage, then "latentforge: error: …")
    # ============================================================================================
    C("cli-no-command", (), USAGE, "command", usage=True),
    C("cli-unknown-command", ("frobnicate",), USAGE, "frobnicate", ("run", "choose"), usage=True),
    C("cli-run-without-recipe", ("run",), USAGE, "recipe", usage=True),
    C("cli-unknown-option", (*rae(), "--bogus"), USAGE, "--bogus", usage=True),
    C(
        "cli-override-without-equals",
        (*rae(), "training.steps"),
        USAGE,
        "training.steps",
        "key.sub=value",
        usage=True,
    ),
    C("cli-ls-extra-argument", ("ls", "recipes", "a=1"), USAGE, "a=1", usage=True),
    C("cli-validate-without-config", ("validate",), USAGE, "config", usage=True),
    C("cli-ls-unknown-kind", ("ls", "widgets"), ConfigError, "widgets", "recipes"),
    C("cli-unknown-recipe", ("run", "train-generatr"), NAME, "train-generatr", "train-generator"),
    # ============================================================================================
    # Overrides: key.sub=value, values parsed as YAML
    # ============================================================================================
    C("override-empty-key", rae("=5"), ConfigError, "=5", "key.sub=value"),
    C(
        "override-double-dot",
        rae("training..steps=1"),
        ConfigError,
        "training..steps",
        ("empty", "key.sub=value"),
    ),
    C(
        "override-leading-dot",
        rae(".training.steps=1"),
        ConfigError,
        ".training.steps",
        ("empty", "key.sub=value"),
    ),
    C(
        "override-trailing-dot",
        rae("training.steps.=1"),
        ConfigError,
        "training.steps.",
        ("empty", "key.sub=value"),
    ),
    C("override-yaml-error-list", rae("training.steps=[1,"), ConfigError, "training.steps", "YAML"),
    C("override-yaml-error-mapping", rae("eval.sampler={steps: 2"), ConfigError, "eval.sampler", "YAML"),
    C("override-yaml-error-quote", rae("run.output_dir='abc"), ConfigError, "run.output_dir", "YAML"),
    C("override-unknown-top-level-block", rae("trainig.steps=1"), ConfigError, "trainig", "training"),
    C("override-unknown-key", rae("training.stepz=1"), ConfigError, "training.stepz", "steps"),
    C("override-unknown-run-key", rae("run.outdir=x"), ConfigError, "run.outdir", "output_dir"),
    C("override-unknown-data-key", rae("data.imagesize=32"), ConfigError, "data.imagesize", "image_size"),
    C("override-unknown-eval-key", rae("eval.num_sample=4"), ConfigError, "eval.num_sample", "num_samples"),
    C("override-into-a-value", rae("training.lr.x=2"), ConfigError, "training.lr", ("value", "block")),
    C("override-block-with-scalar", rae("training=5"), ConfigError, "training", "mapping"),
    C("override-component-as-string", rae("generator=test-dit"), ConfigError, "generator", "mapping"),
    C("override-required-name-null", rae("generator.name=null"), ConfigError, "generator.name", "string"),
    C("override-recipe-key", rae("recipe=demo"), ConfigError, "demo", "train-generator"),
    # ============================================================================================
    # Configs: names, files, recipes, required keys
    # ============================================================================================
    C("config-unknown-name", ("validate", "tiny-ra"), ConfigError, "tiny-ra", "tiny-rae"),
    C(
        "config-missing-file",
        ("validate", "<tmp>/nothere.yaml"),
        ConfigError,
        "nothere.yaml",
        ("not found", "neither"),
    ),
    C(
        "config-is-a-folder",
        ("validate", "<empty>"),
        ConfigError,
        "empty",
        ("folder", "directory", "not a file", "neither"),
    ),
    C(
        "config-yaml-parse-error",
        ("validate", "<bad>"),
        ConfigError,
        "broken.yml",
        "YAML",
        setup=file("bad", "broken.yml", "recipe: train-generator\ntraining: {steps: [1,\n"),
    ),
    C(
        "config-top-level-list",
        ("validate", "<lst>"),
        ConfigError,
        "list.yaml",
        "mapping",
        setup=file("lst", "list.yaml", "- recipe\n- training\n"),
    ),
    C("config-empty-file", ("validate", "<e>"), ConfigError, "recipe", setup=file("e", "empty.yaml", "")),
    C(
        "config-not-utf8",
        ("validate", "<bin>"),
        ConfigError,
        "binary.yaml",
        ("UTF-8", "utf8", "text", "decode"),
        setup=file("bin", "binary.yaml", b"\xff\xfe\x00\x81recipe: train-generator\n"),
    ),
    C(
        "config-for-another-recipe",
        ("run", "demo", "--config", "tiny-rae"),
        ConfigError,
        "train-generator",
        "demo",
    ),
    C(
        "config-for-another-recipe-train-tokens",
        ("run", "train-tokens", "--config", "tiny-rae"),
        ConfigError,
        "train-generator",
        "train-tokens",
    ),
    C(
        "config-recipe-flag-mismatch",
        ("validate", "tiny-rae", "--recipe", "pack"),
        ConfigError,
        "train-generator",
        "pack",
    ),
    C(
        "config-unknown-recipe",
        ("validate", "<c>"),
        NAME,
        "train-generatr",
        "train-generator",
        setup=file("c", "c.yaml", "recipe: train-generatr\n"),
    ),
    C(
        "config-recipe-not-a-string",
        ("validate", "<c>"),
        NAME,
        "recipe",
        ("string", "recipe name"),
        setup=file("c", "c.yaml", "recipe: [train-generator]\n"),
    ),
    C(
        "config-no-recipe-key",
        ("validate", "<c>"),
        ConfigError,
        "recipe",
        ("--recipe", "name the recipe"),
        setup=file("c", "c.yaml", tiny_rae_yaml(lambda d: d.pop("recipe"))),
    ),
    C(
        "config-missing-required-key",
        ("validate", "<c>"),
        ConfigError,
        "generator.name",
        ("missing", "required"),
        setup=file("c", "c.yaml", tiny_rae_yaml(lambda d: d["generator"].pop("name"))),
    ),
    C(
        "config-unknown-block-in-file",
        ("validate", "<c>"),
        ConfigError,
        "trainer",
        "training",
        setup=file("c", "c.yaml", tiny_rae_yaml(lambda d: d.update(trainer={"steps": 1}))),
    ),
    C("config-pack-missing-root", ("run", "pack"), ConfigError, "root", ("missing", "required")),
    C(
        "config-reconstruct-missing-input",
        ("run", "reconstruct", "tokenizer.name=test-rae-tiny"),
        ConfigError,
        "input",
        ("missing", "required"),
    ),
    C("config-sample-missing-run", ("run", "sample"), ConfigError, "generator_run", ("missing", "required")),
    C(
        "config-cp-would-overwrite",
        ("cp", "tiny-rae", "<mine>"),
        ConfigError,
        "my-run.yaml",
        "--force",
        setup=steps(lambda ctx: (ctx.tmp / "mine").mkdir(), file("mine", "mine/my-run.yaml", "# my edits\n")),
        guard="tmp",
    ),
    C("config-cp-unknown-config", ("cp", "tiny-ra", "<tmp>/x.yaml"), ConfigError, "tiny-ra", "tiny-rae"),
    C(
        "config-cp-into-missing-folder",
        ("cp", "tiny-rae", "<tmp>/no/such/x.yaml"),
        ConfigError,
        "no/such",
        ("does not exist", "not found"),
    ),
    C(
        "config-cp-under-a-file",
        ("cp", "tiny-rae", "<afile>/x.yaml"),
        ConfigError,
        "notes.txt",
        ("is a file", "not a folder", "not a directory"),
    ),
    C(
        "config-evaluate-missing-samples",
        ("run", "evaluate"),
        ConfigError,
        "samples",
        ("missing", "required"),
    ),
    # ============================================================================================
    # Settings: wrong types
    # ============================================================================================
    C("type-steps-string", rae("training.steps=ten"), ConfigError, "training.steps", "integer"),
    C("type-steps-float", rae("training.steps=1.5"), ConfigError, "training.steps", "integer"),
    C("type-lr-bool", rae("training.lr=true"), ConfigError, "training.lr", "number"),
    C("type-lr-word", rae("training.lr=fast"), ConfigError, "training.lr", "number"),
    C("type-betas-scalar", rae("training.betas=0.9"), ConfigError, "training.betas", "list"),
    C("type-betas-one-item", rae("training.betas=[0.9]"), ConfigError, "training.betas", "2 items"),
    C("type-betas-words", rae("training.betas=[a, b]"), ConfigError, "training.betas", "number"),
    C("type-schedule-unknown", rae("training.schedule=cosin"), ConfigError, "training.schedule", "cosine"),
    C("type-precision-unknown", rae("training.precision=fp8"), ConfigError, "training.precision", "fp16"),
    C("type-data-name-unknown", rae("data.name=imagenet"), ConfigError, "data.name", "digits"),
    C("type-data-crop-unknown", rae("data.crop=middle"), ConfigError, "data.crop", "center"),
    C("type-flip-not-bool", rae("data.flip=maybe"), ConfigError, "data.flip", ("true or false", "bool")),
    C("type-num-classes-word", rae("data.num_classes=ten"), ConfigError, "data.num_classes", "integer"),
    C("type-seed-word", rae("run.seed=abc"), ConfigError, "run.seed", "integer"),
    C("type-threads-word", rae("run.threads=many"), ConfigError, "run.threads", ("integer", "int")),
    C("type-resume-word", rae("run.resume=perhaps"), ConfigError, "run.resume", ("auto", "never", "true")),
    C(
        "type-generator-params-list",
        rae("generator.params=[1, 2]"),
        ConfigError,
        "generator.params",
        "mapping",
    ),
    C("type-eval-sampler-list", rae("eval.sampler=[euler]"), ConfigError, "eval.sampler", "mapping"),
    C(
        "type-input-size-string",
        ("validate", "tiny-rae", "generator.params.input_size='8'"),
        ConfigError,
        "generator.params",
        "input_size",
    ),
    C(
        "type-depth-word",
        ("validate", "tiny-rae", "generator.params.patch_size=two"),
        ConfigError,
        "patch_size",
        "integer",
    ),
    C(
        "type-param-injected-by-the-recipe-input-size",
        rae("generator.params.input_size=16"),
        ConfigError,
        "generator.params.input_size",
        ("tokenizer", "recipe", "injected"),
    ),
    C(
        "type-param-injected-by-the-recipe-num-classes",
        rae("generator.params.num_classes=5"),
        ConfigError,
        "generator.params.num_classes",
        ("data.num_classes", "recipe", "injected"),
    ),
    C(
        "type-param-fixed-by-the-named-size",
        ("validate", "tiny-rae", "generator.params.depth=3"),
        ConfigError,
        "depth",
        ("fixed", "set by", "named size", "its size"),
    ),
    # ============================================================================================
    # Settings: out of range (every field of the training kit that has a range)
    # ============================================================================================
    C("range-lr-zero", rae("training.lr=0"), ConfigError, "training.lr", (">", "positive")),
    C("range-lr-negative", rae("training.lr=-1e-4"), ConfigError, "training.lr", (">", "positive")),
    C(
        "range-final-lr-negative",
        rae("training.final_lr=-1"),
        ConfigError,
        "training.final_lr",
        ("≥", ">=", "negative"),
    ),
    C(
        "range-steps-zero",
        rae("training.steps=0"),
        ConfigError,
        "training.steps",
        ("≥ 1", ">= 1", "at least", "positive"),
    ),
    C(
        "range-steps-negative",
        rae("training.steps=-3"),
        ConfigError,
        "training.steps",
        ("≥ 1", ">= 1", "positive"),
    ),
    C(
        "range-batch-size-zero",
        rae("training.batch_size=0"),
        ConfigError,
        "training.batch_size",
        ("≥ 1", ">= 1"),
    ),
    C(
        "range-grad-accum-zero",
        rae("training.grad_accum=0"),
        ConfigError,
        "training.grad_accum",
        ("≥ 1", ">= 1"),
    ),
    C(
        "range-batch-not-divisible",
        rae("training.grad_accum=3"),
        ConfigError,
        "training.batch_size",
        "grad_accum",
    ),
    C(
        "range-beta1-one",
        rae("training.betas=[1.0, 0.95]"),
        ConfigError,
        "training.betas",
        ("[0, 1)", "< 1", "below 1"),
    ),
    C(
        "range-beta2-negative",
        rae("training.betas=[0.9, -0.1]"),
        ConfigError,
        "training.betas",
        ("[0, 1)", "≥ 0"),
    ),
    C(
        "range-beta2-above-one",
        rae("training.betas=[0.9, 1.5]"),
        ConfigError,
        "training.betas",
        ("[0, 1)", "< 1"),
    ),
    C("range-eps-zero", rae("training.eps=0"), ConfigError, "training.eps", (">", "positive")),
    C(
        "range-weight-decay-negative",
        rae("training.weight_decay=-0.1"),
        ConfigError,
        "training.weight_decay",
        ("≥", ">="),
    ),
    C(
        "range-warmup-negative",
        rae("training.warmup_steps=-1"),
        ConfigError,
        "training.warmup_steps",
        ("≥", ">="),
    ),
    C(
        "range-grad-clip-zero",
        rae("training.grad_clip=0"),
        ConfigError,
        "training.grad_clip",
        (">", "positive"),
    ),
    C(
        "range-grad-clip-negative",
        rae("training.grad_clip=-1"),
        ConfigError,
        "training.grad_clip",
        (">", "positive"),
    ),
    C("range-ema-decay-one", rae("training.ema_decay=1.0"), ConfigError, "training.ema_decay", "[0, 1)"),
    C(
        "range-ema-decay-negative",
        rae("training.ema_decay=-0.5"),
        ConfigError,
        "training.ema_decay",
        "[0, 1)",
    ),
    C(
        "range-ema-decay-above-one",
        rae("training.ema_decay=1.5"),
        ConfigError,
        "training.ema_decay",
        "[0, 1)",
    ),
    C(
        "range-log-every-zero",
        rae("training.log_every=0"),
        ConfigError,
        "training.log_every",
        ("≥ 1", ">= 1"),
    ),
    C(
        "range-checkpoint-every-zero",
        rae("training.checkpoint_every=0"),
        ConfigError,
        "training.checkpoint_every",
        ("≥ 1", ">= 1"),
    ),
    C(
        "range-keep-checkpoints-zero",
        rae("training.keep_checkpoints=0"),
        ConfigError,
        "training.keep_checkpoints",
        ("≥ 1", ">= 1"),
    ),
    C(
        "range-num-workers-negative",
        rae("training.num_workers=-1"),
        ConfigError,
        "training.num_workers",
        ("≥ 0", ">= 0"),
    ),
    C(
        "range-training-seed-negative",
        rae("training.seed=-1"),
        ConfigError,
        "training.seed",
        ("≥ 0", ">= 0", "[0"),
    ),
    C("range-run-seed-negative", rae("run.seed=-1"), ConfigError, "run.seed", ("≥ 0", ">= 0", "[0")),
    C(
        "range-run-seed-too-large",
        rae("run.seed=4294967296"),
        ConfigError,
        "run.seed",
        ("2**32", "2^32", "4294967296"),
    ),
    # ---------------------------------------------------------------------- the eval block
    C(
        "range-eval-num-samples-zero",
        rae("eval.num_samples=0"),
        ConfigError,
        "eval.num_samples",
        ("≥ 1", ">= 1"),
    ),
    C(
        "range-eval-num-samples-negative",
        rae("eval.num_samples=-4"),
        ConfigError,
        "eval.num_samples",
        ("≥ 1", ">= 1"),
    ),
    C("range-eval-every-negative", rae("eval.every=-1"), ConfigError, "eval.every", ("≥ 0", ">= 0")),
    C(
        "range-eval-stats-batches-zero",
        rae("eval.stats_batches=0"),
        ConfigError,
        "eval.stats_batches",
        ("≥ 1", ">= 1"),
    ),
    C(
        "range-fid-samples-no-reference",
        rae("eval.fid_samples=4"),
        ConfigError,
        "eval.fid_samples",
        "eval.fid_reference",
    ),
    C(
        "range-fid-samples-negative",
        rae("eval.fid_samples=-1"),
        ConfigError,
        "eval.fid_samples",
        ("≥ 0", ">= 0"),
    ),
    C(
        "range-fid-batch-size-zero",
        rae("eval.fid_batch_size=0"),
        ConfigError,
        "eval.fid_batch_size",
        ("≥ 1", ">= 1"),
    ),
    C(
        "range-stats-reduce-unknown",
        rae("eval.stats_reduce=pixel"),
        ConfigError,
        "eval.stats_reduce",
        "channel",
    ),
    C(
        "eval-fid-reference-missing",
        rae("eval.fid_samples=2", "eval.fid_reference=<tmp>/nope.npz"),
        FOLDER,
        "nope.npz",
        ("not found", "no such", "does not exist"),
        early=False,
    ),
    C(
        "eval-fid-metric-unknown",
        rae("eval.fid_samples=2", "eval.fid_reference=<samples>", "eval.fid_metric=fidd"),
        NAME,
        "eval.fid_metric",
        "fid",
        early=False,
    ),
    C(
        "eval-fid-metric-not-frechet",
        rae("eval.fid_samples=2", "eval.fid_reference=<samples>", "eval.fid_metric=psnr"),
        ConfigError,
        "eval.fid_metric",
        ("Fréchet", "frechet"),
        early=False,
    ),
    # ---------------------------------------------------------------------- the sampler (eval.sampler)
    C(
        "sampler-cfg-scale-negative",
        rae("eval.sampler.cfg_scale=-1"),
        ConfigError,
        "eval.sampler",
        "cfg_scale",
    ),
    C("sampler-unknown-sampler", rae("eval.sampler.sampler=eulr"), ConfigError, "eval.sampler", "euler"),
    C("sampler-unknown-option", rae("eval.sampler.stepz=10"), ConfigError, "eval.sampler", "stepz"),
    C("sampler-steps-zero", rae("eval.sampler.steps=0"), ConfigError, "eval.sampler", "steps"),
    C("sampler-steps-word", rae("eval.sampler.steps=ten"), ConfigError, "eval.sampler", "steps"),
    C(
        "sampler-unknown-guidance",
        rae("eval.sampler.guidance=bogus"),
        ConfigError,
        "eval.sampler",
        "guidance",
    ),
    C(
        "sampler-dopri5-atol-negative",
        rae("eval.sampler.sampler=dopri5", "eval.sampler.atol=-1"),
        ConfigError,
        "eval.sampler",
        "atol",
    ),
    # ---------------------------------------------------------------------- data block
    C(
        "range-image-size-zero",
        rae("data.image_size=0"),
        ConfigError,
        "data.image_size",
        ("≥", ">=", "positive"),
    ),
    C(
        "range-image-size-negative",
        rae("data.image_size=-32"),
        ConfigError,
        "data.image_size",
        ("≥", ">=", "positive"),
    ),
    C(
        "range-image-size-not-the-tokenizers",
        rae("data.image_size=24"),
        ConfigError,
        "data.image_size",
        ("32-pixel", "32 px", "32 pixels", "image_size=32", "size 32"),
        early=False,
    ),
    C(
        "range-image-size-not-divisible-by-patch",
        vavae("generator.name=test-dit", "data.image_size=20"),
        ConfigError,
        "data.image_size",
        ("patch", "divisible", "multiple", "data.image_size="),
        early=False,
    ),
    C(
        "range-patch-size-does-not-divide-latents",
        rae("generator.params.patch_size=3"),
        ConfigError,
        "patch_size",
        ("divisible", "multiple"),
        early=False,
    ),
    C(
        "range-num-classes-zero",
        rae("data.num_classes=0"),
        ConfigError,
        "data.num_classes",
        ("≥ 1", ">= 1"),
    ),
    C(
        "range-num-classes-negative",
        rae("data.num_classes=-1"),
        ConfigError,
        "data.num_classes",
        ("≥ 1", ">= 1"),
    ),
    C(
        "range-resize-below-crop",
        rae(*FOLDER_DATA, "data.root=<good>", "data.crop=random", "data.resize=16"),
        (ConfigError, DataError),
        "data.resize",
        ("crop", "image_size"),
    ),
    C("range-folder-without-root", rae("data.name=folder"), FOLDER, "data.root", "folder", early=False),
    C(
        "range-latents-without-root",
        rae("data.name=latents"),
        (ConfigError, DataError),
        "data.root",
        "cache-latents",
        early=False,
    ),
    C("range-digits-random-crop", rae("data.crop=random"), FOLDER, "data.crop", "center", early=False),
    # ---------------------------------------------------------------------- run block
    C(
        "run-device-cuda-without-cuda",
        rae("run.device=cuda"),
        ConfigError,
        "run.device",
        "CUDA",
        no_cuda=True,
    ),
    C("run-device-unknown", rae("run.device=tpu"), ConfigError, "run.device", ("cpu", "auto")),
    C("run-threads-zero", rae("run.threads=0"), ConfigError, "run.threads", ("≥ 1", ">= 1", "positive")),
    C("run-threads-negative", rae("run.threads=-2"), ConfigError, "run.threads", ("≥ 1", ">= 1", "positive")),
    C(
        "run-output-dir-under-a-file",
        rae("run.output_dir=<afile>/run"),
        (ConfigError, DataError),
        "notes.txt",
        ("file", "folder", "directory"),
    ),
    C(
        "run-output-dir-is-a-file",
        rae("run.output_dir=<afile>"),
        (ConfigError, DataError),
        "notes.txt",
        ("file", "folder", "directory"),
    ),
    # ---------------------------------------------------------------------- other recipes' settings
    C(
        "sample-num-samples-zero",
        ("run", "sample", "generator_run=x", "num_samples=0"),
        ConfigError,
        "num_samples",
        ("≥ 1", ">= 1"),
    ),
    C(
        "sample-batch-size-zero",
        ("run", "sample", "generator_run=x", "batch_size=0"),
        ConfigError,
        "batch_size",
        ("≥ 1", ">= 1"),
    ),
    C(
        "sample-labels-unknown",
        ("run", "sample", "generator_run=x", "labels=balanced"),
        ConfigError,
        "labels",
        "equal",
    ),
    C(
        "sample-weights-unknown",
        ("run", "sample", "generator_run=x", "weights=best"),
        ConfigError,
        "weights",
        "ema",
    ),
    C(
        "pack-image-size-zero",
        pack("root=<good>", "image_size=0"),
        ConfigError,
        "image_size",
        ("≥ 1", ">= 1"),
    ),
    C(
        "pack-batch-size-zero",
        pack("root=<good>", "batch_size=0"),
        ConfigError,
        "batch_size",
        ("≥ 1", ">= 1"),
    ),
    C(
        "pack-max-images-zero",
        pack("root=<good>", "max_images=0"),
        ConfigError,
        "max_images",
        ("≥ 1", ">= 1", "positive"),
    ),
    C(
        "pack-max-images-negative",
        pack("root=<good>", "max_images=-1"),
        ConfigError,
        "max_images",
        ("≥ 1", ">= 1"),
    ),
    C(
        "pack-num-workers-negative",
        pack("root=<good>", "num_workers=-1"),
        ConfigError,
        "num_workers",
        ("≥ 0", ">= 0"),
    ),
    C(
        "evaluate-no-metrics",
        evaluate("samples=<samples>", "metrics=[]"),
        ConfigError,
        "metrics",
        ("at least", "name"),
    ),
    C("evaluate-unknown-metric", evaluate("samples=<samples>", "metrics=[fdi]"), NAME, "fdi", "fid"),
    C(
        "evaluate-params-for-unlisted-metric",
        evaluate("samples=<samples>", "metrics=[psnr]", "params={ssim: {}}"),
        ConfigError,
        "params",
        "ssim",
    ),
    C(
        "evaluate-batch-size-zero",
        evaluate("samples=<samples>", "reference=<samples>", "metrics=[psnr]", "batch_size=0"),
        ConfigError,
        "batch_size",
        ("≥ 1", ">= 1", "positive"),
    ),
    C(
        "evaluate-image-size-zero",
        evaluate("samples=<good>", "reference=<good>", "metrics=[psnr]", "image_size=0"),
        ConfigError,
        "image_size",
        ("≥ 1", ">= 1", "positive"),
    ),
    C(
        "evaluate-protocol-unknown",
        evaluate("samples=<samples>", "metrics=[fid]", "weights=<inception_weights>", "protocol=bogus"),
        (ConfigError, InputError),
        "protocol",
        ("torch-fidelity", "expected one of"),
        early=False,
    ),
    C(
        "reconstruct-image-size-zero",
        reconstruct("input=<img>", "image_size=0"),
        ConfigError,
        "image_size",
        ("≥ 1", ">= 1", "positive"),
    ),
    C(
        "reconstruct-batch-size-zero",
        reconstruct("input=<img>", "batch_size=0"),
        ConfigError,
        "batch_size",
        ("≥ 1", ">= 1", "positive"),
    ),
    # ============================================================================================
    # Data folders for training
    # ============================================================================================
    C(
        "data-root-missing",
        rae(*FOLDER_DATA, "data.root=<tmp>/nowhere"),
        FOLDER,
        "nowhere",
        ("not found", "no such"),
        early=False,
    ),
    C("data-root-empty", rae(*FOLDER_DATA, "data.root=<empty>"), FOLDER, "empty", "no images", early=False),
    C(
        "data-root-is-a-file",
        rae(*FOLDER_DATA, "data.root=<afile>"),
        FOLDER,
        "notes.txt",
        ("is a file", "not a folder", "not a directory"),
        early=False,
    ),
    C(
        "data-root-text-files-only",
        rae(*FOLDER_DATA, "data.root=<text_only>"),
        FOLDER,
        "text_only",
        "no images",
        early=False,
    ),
    C(
        "data-only-corrupt-images",
        rae(*FOLDER_DATA, "data.root=<corrupt>"),
        DataError,
        "garbage",
        ("could be read", "unreadable", "none of"),
        early=False,
    ),
    C(
        "data-only-a-zero-byte-image",
        rae(*FOLDER_DATA, "data.root=<zero>"),
        DataError,
        "blank.png",
        ("could be read", "unreadable", "none of", "empty"),
        early=False,
    ),
    C(
        "data-more-classes-than-num-classes",
        rae("data.name=folder", "data.root=<three_classes>", "data.num_classes=2", "training.batch_size=4"),
        (DataError, ConfigError),
        "data.num_classes",
        ("3 class", "≥ 3", ">= 3", "num_classes=3"),
        early=False,
    ),
    C(
        "data-latents-folder-without-shards",
        rae("data.name=latents", "data.root=<empty>"),
        DataError,
        "empty",
        ("shard", "cache-latents"),
        early=False,
    ),
    C(
        "data-truncated-jpeg-among-good-is-skipped",
        rae(*FOLDER_DATA, "data.root=<truncated>"),
        None,
        check=log_mentions("skipped", "trunc.jpg"),
    ),
    C(
        "data-images-smaller-than-the-crop-warn",
        rae(*FOLDER_DATA, "data.root=<small>"),
        None,
        check=log_mentions("smaller"),
    ),
    # ============================================================================================
    # Data for pack, reconstruct, evaluate
    # ============================================================================================
    C(
        "pack-root-missing",
        pack("root=<tmp>/nowhere"),
        FOLDER,
        "nowhere",
        ("not found", "no such"),
        early=False,
    ),
    C("pack-root-empty", pack("root=<empty>"), FOLDER, "empty", "no images", early=False),
    C(
        "pack-root-is-a-file",
        pack("root=<afile>"),
        FOLDER,
        "notes.txt",
        ("is a file", "not a folder", "not a directory"),
        early=False,
    ),
    C(
        "pack-only-corrupt",
        pack("root=<corrupt>"),
        DataError,
        "garbage",
        ("could be read", "unreadable"),
        early=False,
    ),
    C(
        "pack-only-zero-byte",
        pack("root=<zero>"),
        DataError,
        "blank.png",
        ("could be read", "unreadable"),
        early=False,
    ),
    C(
        "pack-truncated-jpeg-among-good-is-skipped",
        pack("root=<truncated>"),
        None,
        check=packed(4, "trunc.jpg"),
    ),
    C(
        "pack-decompression-bomb-among-good-is-skipped",
        pack("root=<bomb>"),
        None,
        check=packed(4, "bomb.png"),
    ),
    C(
        "pack-output-under-a-file",
        pack("root=<good>", "output=<afile>/x.npz"),
        (ConfigError, DataError),
        "notes.txt",
        ("file", "folder", "directory"),
        early=False,  # found once the run folder is open, before any work
    ),
    C(
        "pack-output-is-a-folder",
        pack("root=<good>", "output=<empty>"),
        (ConfigError, DataError),
        "output",
        ("folder", "directory", ".npz"),
        early=False,  # found once the run folder is open, before any work
    ),
    C(
        "reconstruct-input-missing",
        reconstruct("input=<tmp>/nowhere"),
        FOLDER,
        "nowhere",
        ("not found", "no such"),
        early=False,
    ),
    C(
        "reconstruct-input-text-file",
        reconstruct("input=<afile>"),
        DataError,
        "notes.txt",
        "image",
        early=False,
    ),
    C(
        "reconstruct-input-empty-folder",
        reconstruct("input=<empty>"),
        FOLDER,
        "empty",
        "no images",
        early=False,
    ),
    C(
        "reconstruct-input-corrupt-image",
        reconstruct("input=<broken_img>"),
        DataError,
        "broken.png",
        "read",
        early=False,
    ),
    C(
        "reconstruct-input-all-corrupt",
        reconstruct("input=<corrupt>"),
        DataError,
        "corrupt",
        "read",
        early=False,
    ),
    C(
        "reconstruct-tokenizer-without-decoder",
        reconstruct("input=<img>", "tokenizer.name=test-kmeans-tiny"),
        ConfigError,
        "tokenizer",
        "decode",
        early=False,  # found once the run folder is open, before any work
    ),
    C(
        "reconstruct-image-size-not-the-tokenizers",
        reconstruct("input=<img>", "image_size=16"),
        ConfigError,
        "image_size",
        ("32-pixel", "32 px", "32 pixels", "image_size=32", "size 32"),
        early=False,
    ),
    C(
        "reconstruct-unknown-tokenizer",
        reconstruct("input=<img>", "tokenizer.name=test-rae-tinyy"),
        NAME,
        "test-rae-tinyy",
        "test-rae-tiny",
    ),
    C(
        "evaluate-samples-missing",
        evaluate("samples=<tmp>/missing.npz", "metrics=[psnr]"),
        FOLDER,
        "missing.npz",
        "not found",
        early=False,
    ),
    C(
        "evaluate-reference-missing",
        evaluate("samples=<samples>", "reference=<tmp>/nope.npz", "metrics=[psnr]"),
        FOLDER,
        "nope.npz",
        "not found",
        early=False,
    ),
    C(
        "evaluate-folder-without-image-size",
        evaluate("samples=<good>", "reference=<good>", "metrics=[psnr]"),
        ConfigError,
        "image_size",
        ("set", "crop"),
        early=False,
    ),
    C(
        "evaluate-reference-needed",
        evaluate("samples=<samples>", "metrics=[psnr]"),
        ConfigError,
        "reference",
        "psnr",
        early=False,
    ),
    C(
        "evaluate-metric-without-image-update",
        evaluate("samples=<samples>", "reference=<samples>", "metrics=[linear-probe]"),
        ConfigError,
        "linear-probe",
        ("update", "recipe", "images"),
        early=False,
    ),
    # ============================================================================================
    # .npz files: samples and references
    # ============================================================================================
    C(
        "npz-without-arr0",
        evaluate("samples=<no_arr0>", "reference=<samples>", "metrics=[psnr]"),
        NPZ,
        "no_arr0.npz",
        "arr_0",
        early=False,
    ),
    C(
        "npz-float-arr0",
        evaluate("samples=<float_arr0>", "reference=<samples>", "metrics=[psnr]"),
        NPZ,
        "float_arr0.npz",
        "uint8",
        early=False,
    ),
    C(
        "npz-nchw-arr0",
        evaluate("samples=<nchw>", "reference=<samples>", "metrics=[psnr]"),
        NPZ,
        "nchw.npz",
        ("H, W, 3", "NHWC"),
        early=False,
    ),
    C(
        "npz-grayscale-arr0",
        evaluate("samples=<gray>", "reference=<samples>", "metrics=[psnr]"),
        NPZ,
        "gray.npz",
        ("H, W, 3", "NHWC"),
        early=False,
    ),
    C(
        "npz-truncated",
        evaluate("samples=<truncated_npz>", "reference=<samples>", "metrics=[psnr]"),
        NPZ,
        "halved.npz",
        ("truncated", "corrupt", "readable"),
        early=False,
    ),
    C(
        "npz-not-a-zip",
        evaluate("samples=<garbage_npz>", "reference=<samples>", "metrics=[psnr]"),
        NPZ,
        "garbage.npz",
        ("truncated", "corrupt", "readable"),
        early=False,
    ),
    C(
        "npz-pickled-object-array",
        evaluate("samples=<pickled_npz>", "reference=<samples>", "metrics=[psnr]"),
        NPZ,
        "pickled.npz",
        "uint8",
        early=False,
    ),
    C(
        "npz-paired-fewer-references",
        evaluate("samples=<samples>", "reference=<ref2>", "metrics=[psnr]"),
        NPZ,
        "reference",
        ("fewer", "differ", "count", "same number", "none left"),
        early=False,
    ),
    C(
        "npz-paired-other-size",
        evaluate("samples=<samples>", "reference=<ref16px>", "metrics=[psnr]"),
        NPZ,
        "reference",
        "size",
        early=False,
    ),
    C(
        "npz-statistics-only-for-paired-metric",
        evaluate("samples=<samples>", "reference=<stats_good>", "metrics=[psnr]"),
        NPZ,
        "stats_good.npz",
        "arr_0",
        early=False,
    ),
    C(
        "npz-reference-statistics-shapes",
        evaluate(
            "samples=<samples>", "reference=<stats_bad_shape>", "metrics=[fid]", "weights=<inception_weights>"
        ),
        NPZ,
        "stats_uneven.npz",
        "sigma",
        ("[D, D]", "shape", "differ", "match"),
        early=False,
    ),
    C(
        "npz-reference-statistics-nan",
        evaluate(
            "samples=<samples>", "reference=<stats_nan>", "metrics=[fid]", "weights=<inception_weights>"
        ),
        NPZ,
        "stats_bad_values.npz",
        ("nan", "finite"),
        early=False,
    ),
    C(
        "evaluate-weights-missing",
        evaluate("samples=<samples>", "weights=<tmp>/none.pth"),
        BAD_CKPT + (ConfigError,),
        "none.pth",
        "not found",
        early=False,
    ),
    C(
        "evaluate-weights-garbage",
        evaluate("samples=<samples>", "weights=<garbage_pth>"),
        BAD_CKPT + (ConfigError,),
        "garbage.pth",
        ("corrupt", "truncated", "could not"),
        early=False,
    ),
    C(
        "evaluate-weights-pickle-not-executed",
        evaluate("samples=<samples>", "weights=<evil_pt>"),
        BAD_CKPT + (ConfigError,),
        "evil.pt",
        "weights_only",
        early=False,
    ),
    # ============================================================================================
    # Checkpoints and resume (each on a private copy of a trained run, which must stay as it was)
    # ============================================================================================
    C(
        "resume-fewer-steps-than-the-checkpoint",
        resume("training.steps=1"),
        ConfigError,
        "training.steps",
        ("step 2", "at 2", "2 steps"),
        setup=copy_run(),
        guard="run",
        early=False,
    ),
    C(
        "resume-auto-changed-lr",
        resume("training.lr=0.5", "run.resume=auto"),
        ConfigError,
        "training.lr",
        ("config.yaml", "changed", "differ"),
        setup=copy_run(),
        guard="run",
        early=False,
    ),
    C(
        "resume-auto-changed-model",
        resume("generator.params.patch_size=2", "run.resume=auto"),
        (ConfigError, CheckpointError),
        "patch_size",
        ("config.yaml", "changed", "differ"),
        setup=copy_run(),
        guard="run",
        early=False,
    ),
    C(
        "resume-auto-changed-batch-size",
        resume("training.batch_size=4", "run.resume=auto"),
        (ConfigError, DataError),
        "batch_size",
        ("config.yaml", "changed", "differ"),
        setup=copy_run(),
        guard="run",
        early=False,
    ),
    C(
        "resume-never-on-a-folder-with-checkpoints",
        resume("run.resume=never"),
        ConfigError,
        "run.resume",
        ("another run.output_dir", "run.resume=auto", "auto"),
        setup=copy_run(),
        guard="run",
        early=False,
    ),
    C(
        "resume-truncated-model-weights",
        resume(),
        CheckpointError,
        "model.safetensors",
        ("truncated", "corrupt"),
        setup=steps(copy_run(), in_ckpt(lambda c: truncate(c / "model.safetensors"))),
        guard="run",
        early=False,
    ),
    C(
        "resume-missing-ema-weights",
        resume(),
        BAD_CKPT,
        "ema.safetensors",
        ("has no", "missing", "not found"),
        setup=steps(copy_run(), in_ckpt(lambda c: (c / "ema.safetensors").unlink())),
        guard="run",
        early=False,
    ),
    C(
        "resume-truncated-state",
        resume(),
        CheckpointError,
        "state.pt",
        ("truncated", "corrupt"),
        setup=steps(copy_run(), in_ckpt(lambda c: truncate(c / "state.pt"))),
        guard="run",
        early=False,
    ),
    C(
        "resume-state-pickle-not-executed",
        resume(),
        CheckpointError,
        "state.pt",
        "weights_only",
        setup=steps(
            copy_run(),
            lambda ctx: shutil.copy(ctx.env.evil_pt, ctx.paths["run"] / "checkpoints/00000002/state.pt"),
        ),
        guard="run",
        early=False,
    ),
    C(
        "resume-nan-weights",
        resume("training.steps=3"),
        NAN_CKPT,
        "nan",
        ("model.safetensors", "00000002"),
        setup=steps(copy_run(), in_ckpt(lambda c: rewrite_safetensors(c / "model.safetensors", with_nan))),
        guard="run",
        early=False,
    ),
    C(
        "resume-wrong-shapes",
        resume(),
        CheckpointError,
        "shape",
        ("model.safetensors", "00000002"),
        setup=steps(copy_run(), in_ckpt(lambda c: rewrite_safetensors(c / "model.safetensors", reshaped))),
        guard="run",
        early=False,
    ),
    C(
        "resume-checkpoint-of-another-model",
        resume(),
        CheckpointError,
        "test-lightningdit",
        "test-ditdh",
        setup=steps(
            copy_run(),
            in_ckpt(shutil.rmtree),
            lambda ctx: shutil.copytree(
                ctx.env.ldit_run / "checkpoints" / "00000001", ctx.paths["run"] / "checkpoints" / "00000002"
            ),
        ),
        guard="run",
        early=False,
    ),
    C(
        "resume-checkpoints-is-a-file",
        resume(),
        (CheckpointError, ConfigError),
        "checkpoints",
        ("folder", "directory"),
        setup=steps(
            copy_run(),
            in_run(lambda r: shutil.rmtree(r / "checkpoints")),
            in_run(lambda r: (r / "checkpoints").write_text("oops")),
        ),
        guard="run",
        early=False,
    ),
    # ---------------------------------------------------------------------- sample (reads a run)
    C(
        "sample-run-missing",
        ("run", "sample", "generator_run=<tmp>/nowhere"),
        ConfigError,
        "nowhere",
        "config.yaml",
        early=False,
    ),
    C(
        "sample-run-of-another-recipe",
        ("run", "sample", "generator_run=<pack_run>"),
        ConfigError,
        "pack",
        "train-generator",
        early=False,
    ),
    C(
        "sample-run-without-checkpoints",
        sample(),
        CheckpointError,
        "checkpoints",
        ("holds no", "no checkpoint", "no whole", "empty"),
        setup=steps(copy_run(), in_run(lambda r: shutil.rmtree(r / "checkpoints"))),
        guard="run",
        early=False,
    ),
    C(
        "sample-checkpoint-folder-missing",
        sample("checkpoint=<tmp>/nowhere"),
        BAD_CKPT,
        "nowhere",
        "not found",
        setup=copy_run(),
        guard="run",
        early=False,
    ),
    C(
        "sample-checkpoint-of-another-model",
        sample("checkpoint=<ldit_run>/checkpoints/00000001"),
        CheckpointError,
        "test-lightningdit",
        "test-ditdh",
        setup=copy_run(),
        guard="run",
        early=False,
    ),
    C(
        "sample-nan-weights",
        sample(),
        NAN_CKPT,
        "nan",
        ("ema.safetensors", "00000002"),
        setup=steps(copy_run(), in_ckpt(lambda c: rewrite_safetensors(c / "ema.safetensors", with_nan))),
        guard="run",
        early=False,
    ),
    C(
        "sample-truncated-weights",
        sample(),
        CheckpointError,
        "ema.safetensors",
        ("truncated", "corrupt"),
        setup=steps(copy_run(), in_ckpt(lambda c: truncate(c / "ema.safetensors"))),
        guard="run",
        early=False,
    ),
    C(
        "sample-wrong-shapes",
        sample(),
        CheckpointError,
        "shape",
        ("ema.safetensors", "00000002"),
        setup=steps(copy_run(), in_ckpt(lambda c: rewrite_safetensors(c / "ema.safetensors", reshaped))),
        guard="run",
        early=False,
    ),
    C(
        "sample-string-input-size-in-checkpoint",
        sample(),
        CheckpointError,
        "input_size",
        ("'8'", "string", " str"),
        setup=steps(
            copy_run(), in_ckpt(lambda c: rewrite_safetensors(c / "ema.safetensors", input_size="8"))
        ),
        guard="run",
        early=False,
    ),
    C(
        "sample-config-yaml-corrupt",
        sample(),
        ConfigError,
        "config.yaml",
        ("not valid", "invalid", "parse"),
        setup=steps(
            copy_run(), in_run(lambda r: (r / "config.yaml").write_text("recipe: [train-generator\n"))
        ),
        guard="run",
        early=False,
    ),
    C(
        "sample-config-yaml-unknown-key",
        sample(),
        ConfigError,
        "config.yaml",
        "trainer",
        setup=steps(
            copy_run(),
            in_run(
                lambda r: (r / "config.yaml").write_text((r / "config.yaml").read_text() + "trainer: {}\n")
            ),
        ),
        guard="run",
        early=False,
    ),
    C(
        "sample-tokenizer-of-another-shape",
        sample("tokenizer={name: test-vavae-tiny}"),
        (CheckpointError, ConfigError),
        ("tokenizer", "test-vavae-tiny"),
        ("64, 8, 8", "64 channels", "64-channel", "(64,"),
        setup=copy_run(),
        guard="run",
        early=False,
    ),
    C(
        "sample-labels-equal-not-a-multiple",
        sample("num_samples=15", "batch_size=5"),
        ConfigError,
        "num_samples",
        "multiple",
        setup=copy_run(),
        guard="run",
        early=False,
    ),
    C(
        "sample-unknown-sampler",
        sample("sampler={sampler: eulr, steps: 1}"),
        ConfigError,
        "sampler",
        "euler",
        setup=copy_run(),
        guard="run",
        early=False,
    ),
    C(
        "sample-guidance-weights-pickle-not-executed",
        sample("guidance_model={name: test-ditdh}", "guidance_weights=<evil_pt>"),
        CheckpointError,
        "evil.pt",
        "safetensors",
        setup=copy_run(),
        guard="run",
        early=False,
    ),
    C(
        "sample-stage2-run-not-stage2",
        sample("stage2_run=<run>"),
        ConfigError,
        "stage2_run",
        "train-stage2",
        setup=copy_run(),
        guard="run",
        early=False,
    ),
    # ---------------------------------------------------------------------- weights named in configs
    C(
        "tokenizer-decoder-pickle-not-executed",
        reconstruct("input=<img>", "tokenizer.params.pretrained_decoder=<evil_pt>"),
        CheckpointError,
        "evil.pt",
        "weights_only",
        early=False,
    ),
    C(
        "tokenizer-stats-pickle-not-executed",
        reconstruct("input=<img>", "tokenizer.params.stats=<evil_pt>"),
        CheckpointError,
        "evil.pt",
        "weights_only",
        early=False,
    ),
    C(
        "tokenizer-decoder-missing",
        reconstruct("input=<img>", "tokenizer.params.pretrained_decoder=<tmp>/nope.pt"),
        BAD_CKPT,
        "nope.pt",
        "not found",
        early=False,
    ),
    C(
        "tokenizer-centroids-missing",
        tokens("tokenizer.params.centroids=<tmp>/nope.safetensors"),
        BAD_CKPT,
        "nope.safetensors",
        "not found",
        early=False,
    ),
    C(
        "tokenizer-centroids-not-a-centroid-file",
        tokens("tokenizer.params.centroids=<good_ckpt>"),
        CheckpointError,
        "good.safetensors",
        "centroids",
        early=False,
    ),
    C(
        "tokenizer-centroids-pickle-not-executed",
        tokens("tokenizer.params.centroids=<evil_npy>"),
        CheckpointError,
        "evil.npy",
        ("pickle", "readable", "object"),
        early=False,
    ),
    C(
        "train-tokens-kmeans-not-fitted",
        tokens(),
        (ConfigError, LatentforgeError),
        "centroids",
        ("fit-kmeans", "centroid file", "tokenizer.params.centroids"),
        early=False,
    ),
    C(
        "train-generator-discrete-tokenizer",
        rae("tokenizer.name=test-kmeans-tiny"),
        ConfigError,
        "test-kmeans-tiny",
        "train-tokens",
        early=False,
    ),
    C(
        "train-tokens-continuous-tokenizer",
        tokens("tokenizer.name=test-rae-tiny", "tokenizer.params={}"),
        ConfigError,
        "test-rae-tiny",
        "train-generator",
        early=False,
    ),
    C(
        "train-tokenizer-loss-of-another-tokenizer",
        tok("tokenizer.name=test-rae-tiny"),
        ConfigError,
        "loss.name",
        "tokenizer",
        early=False,
    ),
    C(
        "train-tokenizer-folder-without-eval-root",
        tok("data.name=folder", "data.root=<good>", "data.image_size=32"),
        ConfigError,
        "eval.root",
        "folder",
        early=False,
    ),
    C(
        "train-tokenizer-unknown-loss-param",
        tok("loss.params.bogus=1"),
        ConfigError,
        "loss.params.bogus",
        "accepts",
    ),
    C(
        "train-tokenizer-rae-image-size",
        tok("data.image_size=16", config="tiny-train-rae"),
        ConfigError,
        "data.image_size",
        ("32-pixel", "32 px", "32 pixels", "image_size=32", "size 32"),
        early=False,
    ),
    C(
        "train-tokenizer-discriminator-pickle-not-executed",
        tok("loss.discriminator.weights=<evil_pt>"),
        CheckpointError,
        "evil.pt",
        "safetensors",
        early=False,
    ),
    # ---------------------------------------------------------------------- the other recipes
    C(
        "cache-latents-unknown-encode-option",
        CACHE + ("encode={bogus: 1}",),
        ConfigError,
        "encode",
        "bogus",
        early=False,
    ),
    C("cache-latents-shard-size-zero", CACHE + ("shard_size=0",), ConfigError, "shard_size", ("≥ 1", ">= 1")),
    C(
        "latent-stats-discrete-tokenizer",
        ("run", "latent-stats", "tokenizer.name=test-kmeans-tiny", *DIGITS32),
        ConfigError,
        "test-kmeans-tiny",
        "continuous",
        early=False,
    ),
    C(
        "latent-stats-max-images-negative",
        ("run", "latent-stats", "tokenizer.name=test-rae-tiny", *DIGITS32, "max_images=-1"),
        ConfigError,
        "max_images",
        ("≥ 0", ">= 0"),
    ),
    C(
        "fit-kmeans-max-images-zero",
        ("run", "fit-kmeans", "--config", "tiny-digit-kmeans", "max_images=0"),
        ConfigError,
        "max_images",
        ("≥ 1", ">= 1"),
    ),
    C(
        "fit-kmeans-continuous-tokenizer",
        (
            "run",
            "fit-kmeans",
            "--config",
            "tiny-digit-kmeans",
            "max_images=64",
            "tokenizer.name=test-rae-tiny",
        ),
        ConfigError,
        "test-rae-tiny",
        ("K-Means", "kmeans"),
        early=False,
    ),
    C(
        "linear-probe-folder-without-val-root",
        PROBE + ("data.name=folder", "data.root=<good>", "data.num_classes=2"),
        (DataError, ConfigError),
        "val_root",
        "folder",
        early=False,
    ),
    C("linear-probe-epochs-zero", PROBE + ("epochs=0",), ConfigError, "epochs", ("≥ 1", ">= 1")),
    C("linear-probe-lr-zero", PROBE + ("lr=0",), ConfigError, "lr", (">", "positive")),
    C(
        "train-stage2-condition-centroids-missing",
        (
            "run",
            "train-stage2",
            "--config",
            "tiny-digit-stage2",
            "training.steps=1",
            "training.batch_size=8",
            "condition_tokenizer.params.centroids=<tmp>/nope.safetensors",
        ),
        BAD_CKPT,
        "nope.safetensors",
        "not found",
        early=False,
    ),
    # ============================================================================================
    # Plugins and registry names
    # ============================================================================================
    C(
        "plugin-fails-to-import",
        ("validate", "tiny-rae", "generator.name=broken-gen"),
        (PluginLoadError, ConfigError),
        "broken-gen",
        "acme-bad",
        "not_a_module_anywhere",
        setup=plugins(),
    ),
    C(
        "plugin-fails-to-import-on-run",
        rae("generator.name=broken-gen"),
        (PluginLoadError, ConfigError),
        "broken-gen",
        "acme-bad",
        "import",
        setup=plugins(),
    ),
    C(
        "plugin-builder-raises",
        rae("generator.name=boom-gen"),
        PluginLoadError,
        "boom-gen",
        "acme-bad",
        "boom",
        setup=plugins(),
        early=False,
    ),
    C(
        "plugin-builds-no-generator",
        rae("generator.name=odd-gen"),
        LatentforgeError,
        "odd-gen",
        "protocol",
        setup=plugins(),
        early=False,
    ),
    C(
        "plugin-ambiguous-name",
        ("validate", "tiny-rae", "generator.name=twin-gen"),
        NAME,
        "twin-gen",
        "acme-other/twin-gen",
        setup=plugins(),
    ),
    C(
        "plugin-disabled-by-environment",
        ("validate", "tiny-rae", "generator.name=broken-gen"),
        NAME,
        "broken-gen",
        registry.DISABLE_AUTOLOAD_ENV,
        setup=plugins(disabled=True),
    ),
    C(
        "plugin-broken-still-listed",
        ("ls", "generators"),
        None,
        setup=plugins(),
        check=stdout_mentions("broken-gen", "acme-bad"),
    ),
    A(
        "plugin-unknown-name-close-match",
        lambda ctx: registry.generators.get("broken-genn"),
        RegistryError,
        "broken-gen",
        setup=plugins(),
    ),
    A(
        "plugin-non-callable",
        lambda ctx: registry.generators.build("const-gen"),
        PluginLoadError,
        "const-gen",
        "callable",
        setup=plugins(),
    ),
    A(
        "plugin-import-failure-api",
        lambda ctx: registry.generators.get("broken-gen"),
        PluginLoadError,
        "broken-gen",
        "acme-bad",
        setup=plugins(),
    ),
    C(
        "registry-unknown-generator",
        ("validate", "tiny-rae", "generator.name=test-ditd"),
        NAME,
        "test-ditd",
        "test-ditdh",
    ),
    C(
        "registry-unknown-tokenizer",
        ("validate", "tiny-rae", "tokenizer.name=test-rae-tinyy"),
        NAME,
        "test-rae-tinyy",
        "test-rae-tiny",
    ),
    C(
        "registry-unknown-guidance-model",
        ("validate", "tiny-rae", "eval.guidance_model.name=test-ditdhh"),
        NAME,
        "test-ditdhh",
        "test-ditdh",
    ),
    C(
        "registry-unknown-encoder",
        ("validate", "tiny-train-vavae", "loss.vf_encoder.name=test-vit-tinyy"),
        NAME,
        "test-vit-tinyy",
        "test-vit-tiny",
    ),
    C(
        "registry-unknown-metric",
        ("validate", "tiny-train-vavae", "eval.rfid.name=fd-dinov3"),
        NAME,
        "fd-dinov3",
        "fd-dinov2",
    ),
    C(
        "registry-param-misspelt",
        ("validate", "tiny-vavae-lightningdit", "generator.params.lern_sigma=true"),
        ConfigError,
        "lern_sigma",
        "learn_sigma",
    ),
    C(
        "registry-tokenizer-param-misspelt",
        ("validate", "tiny-rae", "tokenizer.params.noise_tauu=0.1"),
        ConfigError,
        "noise_tauu",
        "noise_tau",
    ),
    A(
        "registry-name-not-a-string",
        lambda ctx: registry.generators.get(None),
        RegistryError,
        "generator",
        "string",
    ),
    # ============================================================================================
    # Python API: registry builds with wrong arguments
    # ============================================================================================
    A(
        "api-generator-string-input-size",
        build("generators", "test-dit", input_size="8"),
        InputTypeError,
        "input_size",
        "integer",
    ),
    A(
        "api-generator-input-size-not-divisible",
        build("generators", "test-dit", input_size=7),
        InputError,
        "input_size",
        "patch",
    ),
    A("api-generator-unknown-argument", build("generators", "test-dit", bogus=1), BAD_ARG, "bogus"),
    A(
        "api-generator-negative-classes",
        build("generators", "test-dit", num_classes=-1),
        InputError,
        "num_classes",
    ),
    A(
        "api-generator-size-key-overridden",
        build("generators", "test-lightningdit", depth=3),
        BAD_ARG,
        "depth",
    ),
    A(
        "api-generator-unknown-transport-option",
        build("generators", "test-dit", transport={"shiftt": 1}),
        BAD_ARG,
        "shiftt",
    ),
    A("api-gpt-vocab-zero", build("generators", "test-gpt", vocab_size=0), InputError, "vocab_size"),
    A(
        "api-tokenizer-unknown-decoder",
        build("tokenizers", "test-rae-tiny", decoder="ViT-Q"),
        InputError,
        "ViT-Q",
        "test-tiny",
    ),
    A(
        "api-tokenizer-image-size",
        build("tokenizers", "test-rae-tiny", image_size=30),
        InputError,
        "image_size",
        "30",
    ),
    A(
        "api-tokenizer-noise-law",
        build("tokenizers", "test-rae-tiny", noise_law="gauss"),
        InputError,
        "noise_law",
        "code",
    ),
    A(
        "api-tokenizer-centroids-missing",
        lambda ctx: registry.tokenizers.build(
            "test-kmeans-tiny", centroids=str(ctx.tmp / "nope.safetensors")
        ),
        BAD_CKPT,
        "nope.safetensors",
        "not found",
    ),
    A(
        "api-encoder-unknown-features",
        build("encoders", "test-vit-tiny", features="bogus"),
        BAD_ARG,
        "bogus",
        "features",
    ),
    A(
        "api-encoder-image-size",
        build("encoders", "test-vit-tiny", image_size=30),
        InputError,
        "image_size",
        "patch",
    ),
    A(
        "api-metric-unknown-encoder",
        build("metrics", "fd-dinov2", encoder="test-vit-tinyy"),
        RegistryError,
        "test-vit-tinyy",
        "test-vit-tiny",
    ),
    # ============================================================================================
    # Python API: tokenizers
    # ============================================================================================
    A(
        "api-rae-encode-3d",
        lambda ctx: ctx.env.rae_tok.encode(images(2, 32, 32)),
        InputError,
        "images",
        "[B, 3, H, W]",
    ),
    A(
        "api-rae-encode-one-channel",
        lambda ctx: ctx.env.rae_tok.encode(images(2, 1, 32, 32)),
        InputError,
        "images",
        "[B, 3, H, W]",
    ),
    A(
        "api-rae-encode-uint8",
        lambda ctx: ctx.env.rae_tok.encode(images(2, 3, 32, 32, dtype=torch.uint8)),
        BAD_ARG,
        "images",
        "float",
    ),
    A(
        "api-rae-encode-out-of-range",
        lambda ctx: ctx.env.rae_tok.encode(images(2, 3, 32, 32, scale=255)),
        InputError,
        "images",
        "[0, 1]",
    ),
    A(
        "api-rae-encode-nan",
        lambda ctx: ctx.env.rae_tok.encode(nan_images(2, 3, 32, 32)),
        InputError,
        "images",
        "nan",
    ),
    A(
        "api-rae-encode-numpy",
        lambda ctx: ctx.env.rae_tok.encode(np.zeros((2, 3, 32, 32), np.float32)),
        BAD_ARG,
        "images",
        ("tensor", "[B, 3, H, W]"),
    ),
    A(
        "api-rae-decode-wrong-shape",
        lambda ctx: ctx.env.rae_tok.decode(latents(2, 64, 4, 4)),
        InputError,
        "latents",
        "64, 8, 8",
    ),
    A(
        "api-rae-decode-normalized-without-stats",
        lambda ctx: ctx.env.rae_tok.decode(latents(2, 64, 8, 8), normalize=True),
        StateError,
        "statistics",
        ("compute", "set_stats", "load"),
    ),
    A(
        "api-rae-stats-wrong-shape",
        lambda ctx: ctx.env.rae_tok.set_stats(lstats(3, 1, 1)),
        InputError,
        "statistics",
        "shape",
    ),
    A(
        "api-vavae-encode-size-not-multiple",
        lambda ctx: ctx.env.vavae_tok.encode(images(2, 3, 30, 30)),
        InputError,
        "30",
        "multiple",
    ),
    A(
        "api-vavae-decode-wrong-channels",
        lambda ctx: ctx.env.vavae_tok.decode(vavae_wrong_channels(ctx)),
        InputError,
        "latents",
        ("[B, 8", "shape"),
    ),
    A(
        "api-vqgan-encode-3d",
        lambda ctx: ctx.env.vqgan_tok.encode(images(2, 16, 16)),
        InputError,
        "images",
        "[B, 3, H, W]",
    ),
    A(
        "api-vqgan-decode-float-ids",
        lambda ctx: ctx.env.vqgan_tok.decode(vq_ids(ctx, dtype=torch.float32)),
        BAD_ARG,
        "integer",
    ),
    A(
        "api-vqgan-decode-ids-out-of-range",
        lambda ctx: ctx.env.vqgan_tok.decode(vq_ids(ctx, 10_000)),
        InputError,
        "10000",
        "[0,",
    ),
    A(
        "api-vqgan-decode-negative-ids",
        lambda ctx: ctx.env.vqgan_tok.decode(vq_ids(ctx, -1)),
        InputError,
        "-1",
        "[0,",
    ),
    A(
        "api-vqgan-decode-flat-ids",
        lambda ctx: ctx.env.vqgan_tok.decode(torch.zeros(2, 16, dtype=torch.long)),
        InputError,
        "[B, h, w]",
    ),
    A(
        "api-kmeans-encode-without-centroids",
        lambda ctx: ctx.env.kmeans_tok.encode(images(2, 3, 32, 32)),
        StateError,
        "centroids",
        "fit",
    ),
    A(
        "api-kmeans-decode",
        lambda ctx: ctx.env.kmeans_tok.decode(grid(0, (2, 8, 8))),
        LatentforgeError,
        "decode",
        ("stage 2", "stage2"),
    ),
    # ============================================================================================
    # Python API: generators
    # ============================================================================================
    A(
        "api-flow-loss-wrong-channels",
        lambda ctx: ctx.env.dit.loss(latents(2, 3, 8, 8), y(0, 1)),
        InputError,
        "x",
        "4, 8, 8",
    ),
    A(
        "api-flow-loss-3d",
        lambda ctx: ctx.env.dit.loss(latents(2, 4, 8), y(0, 1)),
        InputError,
        "x",
        "4, 8, 8",
    ),
    A(
        "api-flow-loss-integer-latents",
        lambda ctx: ctx.env.dit.loss(torch.zeros(2, 4, 8, 8, dtype=torch.long), y(0, 1)),
        BAD_ARG,
        "x",
        "floating",
    ),
    A(
        "api-flow-loss-nan",
        lambda ctx: ctx.env.dit.loss(nan_images(2, 4, 8, 8), y(0, 1)),
        InputError,
        "x",
        "nan",
    ),
    A(
        "api-flow-loss-float-labels",
        lambda ctx: ctx.env.dit.loss(latents(2, 4, 8, 8), torch.tensor([0.0, 1.0])),
        BAD_ARG,
        "labels",
        "integer",
    ),
    A(
        "api-flow-loss-label-out-of-range",
        lambda ctx: ctx.env.dit.loss(latents(2, 4, 8, 8), y(11, 0)),
        InputError,
        "labels",
        "[0, 10)",
    ),
    A(
        "api-flow-loss-negative-label",
        lambda ctx: ctx.env.dit.loss(latents(2, 4, 8, 8), y(-1, 0)),
        InputError,
        "labels",
        "[0, 10)",
    ),
    A(
        "api-flow-loss-label-count",
        lambda ctx: ctx.env.dit.loss(latents(2, 4, 8, 8), y(0, 1, 2)),
        InputError,
        "labels",
        "[2]",
    ),
    A(
        "api-flow-sample-label-out-of-range",
        lambda ctx: ctx.env.dit.sample(y(12), steps=1),
        InputError,
        "labels",
        "[0, 10)",
    ),
    A(
        "api-flow-sample-unknown-sampler",
        lambda ctx: ctx.env.dit.sample(y(1), sampler="eulr", steps=1),
        InputError,
        "eulr",
        "euler",
    ),
    A(
        "api-flow-sample-steps-zero",
        lambda ctx: ctx.env.dit.sample(y(1), steps=0),
        InputError,
        "steps",
        ("positive", "≥ 1", ">= 1"),
    ),
    A(
        "api-flow-sample-steps-float",
        lambda ctx: ctx.env.dit.sample(y(1), steps=2.5),
        BAD_ARG,
        "steps",
        "integer",
    ),
    A(
        "api-flow-sample-unknown-option",
        lambda ctx: ctx.env.dit.sample(y(1), steps=1, stepz=3),
        BAD_ARG,
        "stepz",
    ),
    A(
        "api-flow-sample-cfg-scale-negative",
        lambda ctx: ctx.env.dit.sample(y(1), steps=1, cfg_scale=-1.0),
        InputError,
        "cfg_scale",
    ),
    A(
        "api-flow-sample-noise-shape",
        lambda ctx: ctx.env.dit.sample(y(1), steps=1, noise=latents(1, 3, 8, 8)),
        InputError,
        "noise",
        "4, 8, 8",
    ),
    A(
        "api-flow-sample-zero-samples",
        lambda ctx: ctx.env.dit.sample(n=0, steps=1),
        InputError,
        "n",
        ("≥ 1", ">= 1", "positive"),
    ),
    A(
        "api-flow-sample-unknown-guidance",
        lambda ctx: ctx.env.dit.sample(y(1), steps=1, guidance="bogus"),
        InputError,
        "guidance",
        "cfg",
    ),
    A(
        "api-flow-sample-autoguidance-without-model",
        lambda ctx: ctx.env.dit.sample(y(1), steps=1, guidance="autoguidance"),
        InputError,
        "guidance_model",
    ),
    A(
        "api-flow-sample-cfg-channels-too-many",
        lambda ctx: ctx.env.dit.sample(y(1), steps=1, cfg_scale=2.0, cfg_channels=9),
        InputError,
        "cfg_channels",
        "4",
    ),
    A(
        "api-gpt-loss-token-out-of-vocab",
        lambda ctx: ctx.env.gpt.loss(grid(64), y(0, 1)),
        InputError,
        "token",
        "[0, 64)",
    ),
    A(
        "api-gpt-loss-float-tokens",
        lambda ctx: ctx.env.gpt.loss(grid(1, dtype=torch.float32), y(0, 1)),
        BAD_ARG,
        "token",
        "integer",
    ),
    A(
        "api-gpt-loss-wrong-grid",
        lambda ctx: ctx.env.gpt.loss(grid(1, (2, 3, 3)), y(0, 1)),
        InputError,
        "4, 4",
    ),
    A(
        "api-gpt-loss-label-out-of-range",
        lambda ctx: ctx.env.gpt.loss(grid(), y(10, 0)),
        InputError,
        "class",
        "[0, 10)",
    ),
    A(
        "api-gpt-sample-top-p-zero",
        lambda ctx: ctx.env.gpt.sample(y(1), top_p=0.0),
        InputError,
        "top_p",
        "(0, 1]",
    ),
    A(
        "api-gpt-sample-temperature-zero",
        lambda ctx: ctx.env.gpt.sample(y(1), temperature=0.0),
        InputError,
        "temperature",
        "> 0",
    ),
    A(
        "api-gpt-sample-top-k-zero",
        lambda ctx: ctx.env.gpt.sample(y(1), top_k=0),
        InputError,
        "top_k",
        ("≥ 1", ">= 1"),
    ),
    A(
        "api-maskgit-loss-wrong-grid",
        lambda ctx: ctx.env.maskgit.loss(grid(1, (2, 5, 5)), y(0, 1)),
        InputError,
        "4, 4",
    ),
    A(
        "api-maskgit-sample-steps-zero",
        lambda ctx: ctx.env.maskgit.sample(y(1), steps=0),
        InputError,
        "steps",
        ("≥ 1", ">= 1"),
    ),
    # ============================================================================================
    # Python API: metrics
    # ============================================================================================
    A(
        "api-psnr-shape-mismatch",
        lambda ctx: psnr(ctx, images(2, 3, 8, 8), images(2, 3, 16, 16)),
        InputError,
        "shape",
    ),
    A(
        "api-psnr-out-of-range",
        lambda ctx: psnr(ctx, images(2, 3, 8, 8, scale=3), images(2, 3, 8, 8)),
        InputError,
        "[0, 1]",
    ),
    A("api-psnr-compute-before-update", lambda ctx: psnr(ctx, None, None), StateError, "update"),
    A(
        "api-ssim-images-smaller-than-window",
        lambda ctx: ssim(ctx, images(1, 3, 4, 4), images(1, 3, 4, 4)),
        InputError,
        "4, 4",
        ("larger", "window", "at least"),
    ),
    A("api-metric-merge-other-kind", psnr_merge_ssim, InputTypeError, "SSIM", "PSNR"),
    A(
        "api-fd-update-3d",
        lambda ctx: fresh_fd(ctx).update(images(2, 32, 32)),
        InputError,
        "images",
        "[B, 3, H, W]",
    ),
    A(
        "api-fd-update-one-channel",
        lambda ctx: fresh_fd(ctx).update(images(2, 1, 32, 32)),
        InputError,
        "images",
        "[B, 3, H, W]",
    ),
    A(
        "api-fd-update-out-of-range",
        lambda ctx: fresh_fd(ctx).update(images(2, 3, 32, 32, scale=255)),
        InputError,
        "images",
        "[0, 1]",
    ),
    A(
        "api-fd-update-int32",
        lambda ctx: fresh_fd(ctx).update(images(2, 3, 32, 32, dtype=torch.int32)),
        BAD_ARG,
        "images",
        "uint8",
    ),
    A(
        "api-fd-update-empty-batch",
        lambda ctx: fresh_fd(ctx).update(images(0, 3, 32, 32)),
        InputError,
        "images",
        "empty",
    ),
    A(
        "api-fd-update-nan",
        lambda ctx: fresh_fd(ctx).update(nan_images(2, 3, 32, 32)),
        InputError,
        "images",
        "nan",
    ),
    A(
        "api-fd-update-numpy",
        lambda ctx: fresh_fd(ctx).update(np.zeros((2, 3, 32, 32), np.uint8)),
        BAD_ARG,
        "images",
        "tensor",
    ),
    A("api-fd-compute-before-update", lambda ctx: fresh_fd(ctx).compute(), StateError, "update"),
    A(
        "api-fid-features-wrong-width",
        lambda ctx: ctx.env.fid.update_features(torch.randn(4, 100)),
        InputError,
        "2048",
        "100",
    ),
    A("api-gaussian-moments-mismatch", gaussian_mismatch, InputError, "mu", "sigma"),
    A("api-frechet-distance-dims", frechet_mismatch, InputError, ("dimension", "dim")),
    A("api-probe-rows-and-labels", probe_rows_mismatch, InputError, ("rows", "features"), "labels"),
    # ============================================================================================
    # Python API: .npz files
    # ============================================================================================
    A(
        "api-load-reference-missing",
        lambda ctx: _load_reference(ctx.tmp / "nope.npz"),
        MissingFileError,
        "nope.npz",
    ),
    A(
        "api-load-reference-images-only",
        npz_api("load_reference", "samples"),
        ReferenceFileError,
        "samples.npz",
        "mu",
    ),
    A(
        "api-load-reference-shapes",
        npz_api("load_reference", "stats_bad_shape"),
        ReferenceFileError,
        "stats_uneven.npz",
        "sigma",
        ("[D, D]", "shape", "differ", "match"),
    ),
    A(
        "api-load-reference-nan",
        npz_api("load_reference", "stats_nan"),
        ReferenceFileError,
        "stats_bad_values.npz",
        ("nan", "finite"),
    ),
    A(
        "api-load-reference-not-a-zip",
        npz_api("load_reference", "garbage_npz"),
        ReferenceFileError,
        "garbage.npz",
        "readable",
    ),
    A(
        "api-load-reference-pickled",
        npz_api("load_reference", "pickled_npz"),
        ReferenceFileError,
        "pickled.npz",
        "mu",
    ),
    A(
        "api-iter-npz-without-arr0",
        npz_api("iter_npz_images", "no_arr0"),
        ReferenceFileError,
        "no_arr0.npz",
        "arr_0",
    ),
    A(
        "api-iter-npz-float",
        npz_api("iter_npz_images", "float_arr0"),
        ReferenceFileError,
        "float_arr0.npz",
        "uint8",
    ),
    A(
        "api-iter-npz-pickled",
        npz_api("iter_npz_images", "pickled_npz"),
        ReferenceFileError,
        "pickled.npz",
        "uint8",
    ),
    A("api-sample-writer-wrong-size", sample_writer_wrong_size, InputError, "16", "32"),
    A("api-save-samples-nan", save_samples_nan, InputError, "nan"),
    # ============================================================================================
    # Python API: latentforge_core.checkpoint on bad files
    # ============================================================================================
    A(
        "api-load-checkpoint-missing",
        lambda ctx: _load_checkpoint(ctx.tmp / "nope.safetensors"),
        MissingFileError,
        "nope.safetensors",
    ),
    A(
        "api-load-checkpoint-truncated",
        checkpoint_api("load_checkpoint", "truncated_ckpt"),
        CheckpointError,
        "halved.safetensors",
        "truncated",
    ),
    A(
        "api-load-checkpoint-empty-file",
        checkpoint_api("load_checkpoint", "zero_ckpt"),
        CheckpointError,
        "zero.safetensors",
        ("empty", "too small", "truncated", "readable"),
    ),
    A(
        "api-load-checkpoint-not-safetensors",
        checkpoint_api("load_checkpoint", "evil_pt"),
        CheckpointError,
        "evil.pt",
        "safetensors",
    ),
    A(
        "api-load-checkpoint-folder",
        checkpoint_api("load_checkpoint", "empty"),
        LatentforgeError,
        "empty",
        ("is a folder", "is a directory", "not a file"),
    ),
    A(
        "api-load-checkpoint-bad-config-json",
        checkpoint_api("load_checkpoint", "bad_json_ckpt"),
        CheckpointError,
        "badmeta.safetensors",
        "JSON",
    ),
    A(
        "api-load-torch-file-pickle",
        checkpoint_api("load_torch_file", "evil_pt"),
        CheckpointError,
        "evil.pt",
        "weights_only",
    ),
    A(
        "api-load-torch-file-raw-pickle",
        checkpoint_api("load_torch_file", "evil_pickle"),
        CheckpointError,
        "evil_raw.pkl.pt",
        "weights_only",
    ),
    A(
        "api-load-torch-file-garbage",
        checkpoint_api("load_torch_file", "garbage_pth"),
        CheckpointError,
        "garbage.pth",
        "corrupt",
    ),
    A(
        "api-load-state-file-object-npy",
        checkpoint_api("load_state_file", "evil_npy"),
        CheckpointError,
        "evil.npy",
        ("pickle", "object"),
    ),
    A(
        "api-load-state-file-list",
        checkpoint_api("load_state_file", "list_pt"),
        CheckpointError,
        "list.pt",
        "state dict",
    ),
    A("api-load-state-file-unknown-suffix", unknown_suffix, CheckpointError, "weights.txt", ".safetensors"),
    A(
        "api-load-into-wrong-shapes",
        lambda ctx: load_into_api(ctx, {"weight": torch.zeros(3, 5), "bias": torch.zeros(3)}),
        CheckpointError,
        "weight",
        "shape",
    ),
    A(
        "api-load-into-missing-keys",
        lambda ctx: load_into_api(ctx, {"weight": torch.zeros(3, 2)}),
        CheckpointError,
        "bias",
        "missing",
    ),
    A("api-save-checkpoint-non-tensor", save_checkpoint_non_tensor, InputTypeError, "w", "tensor"),
    A("api-latent-stats-pickle", latent_stats_load, CheckpointError, "evil.pt", "weights_only"),
]


def _load_reference(path: Path) -> Any:
    from latentforge_metrics.npz import load_reference

    return load_reference(path)


def _load_checkpoint(path: Path) -> Any:
    from latentforge_core.checkpoint import load_checkpoint

    return load_checkpoint(path)


# ------------------------------------------------------------------------------------------------
# The harness
# ------------------------------------------------------------------------------------------------
class CaseTimeout(BaseException):
    """Raised in the main thread when a case runs past CASE_SECONDS (a hang is a failure too)."""


def _observed(code: Any, escaped: BaseException | None, raised: BaseException | None, err: str) -> str:
    parts = [f"exit {code}"]
    if escaped is not None:
        parts.append(f"escaped {type(escaped).__name__}: {_first(escaped)}")
    if raised is not None and raised is not escaped:
        parts.append(f"raised {type(raised).__name__}: {_first(raised)}")
    tail = [line for line in err.strip().splitlines() if line.strip()]
    if tail:
        parts.append(f"stderr ends: {tail[-1][:300]}")
    return "; ".join(parts)


def _first(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return lines[0][:300] if lines else ""


def _mentions(text: str, items: tuple[str | tuple[str, ...], ...], ctx: Ctx) -> list[str]:
    """The ``must_mention`` items missing from ``text``.  The temporary root is blanked out first, so
    that no word of it ("pytest-of-root", …) can stand in for the word a message owes."""
    base = ctx.env.root.parent
    for prefix in {str(base.resolve()), str(base)}:
        text = text.replace(prefix, "<tmp>")
    low = text.lower()
    missing = []
    for item in items:
        options = (item,) if isinstance(item, str) else item
        if not any(o.lower() in low for o in options):
            missing.append(" | ".join(options))
    return missing


def _run_cli(case: Case, ctx: Ctx, capsys) -> None:
    argv = [ctx.resolve(a) for a in case.argv]
    if argv[:1] == ["run"] and not any(a.startswith("run.output_dir=") for a in argv):
        argv.append(f"run.output_dir={ctx.paths['out']}")
    raised: list[BaseException] = []
    original = getattr(cli, "parse_args", None)
    if original is not None:  # record what the command raised, to check its class

        def parse_args(args=None):
            ns = original(args)
            fn = getattr(ns, "fn", None)
            if callable(fn):

                def recorded(n):
                    try:
                        return fn(n)
                    except BaseException as err:
                        raised.append(err)
                        raise

                ns.fn = recorded
            return ns

        ctx.mp.setattr(cli, "parse_args", parse_args)
    escaped: BaseException | None = None
    try:
        code = cli.main(argv)
    except SystemExit as exit_:
        code = exit_.code
    except CaseTimeout:
        raise
    except BaseException as err:  # the command escaped main: a traceback for the user
        code, escaped = None, err
    out, err = capsys.readouterr()
    last = raised[-1] if raised else None
    observed = _observed(code, escaped, last, err)
    if case.error is None:
        assert escaped is None and code == 0, f"OBSERVED {observed}"
        assert "Traceback" not in err, f"OBSERVED a traceback on stderr; {observed}"
        if case.check is not None:
            case.check(ctx, out if case.argv[:1] == ("ls",) else err)
        return
    assert escaped is None, f"OBSERVED {observed}"
    assert code == case.code, f"OBSERVED {observed}"
    assert "Traceback" not in err, f"OBSERVED a traceback on stderr; {observed}"
    body = err
    if case.usage and err.startswith("usage:"):
        body = err[err.find("latentforge: error:") :] if "latentforge: error:" in err else err
    if case.early or case.usage:
        assert body.startswith("latentforge: error:"), f"OBSERVED stderr starts {err[:200]!r}; {observed}"
    else:
        assert "latentforge: error:" in body, f"OBSERVED {observed}"
        body = body[body.index("latentforge: error:") :]
    assert body.count("latentforge: error:") == 1, f"OBSERVED several error lines; {observed}"
    missing = _mentions(body, case.must_mention, ctx)
    assert not missing, f"OBSERVED message lacks {missing}: {body.strip()[:400]!r}"
    if last is not None and not isinstance(last, SystemExit):
        assert isinstance(last, LatentforgeError), f"OBSERVED class {type(last).__name__}; {observed}"
        assert isinstance(last, case.error), f"OBSERVED class {type(last).__name__}, expected {case.error}"


def _run_api(case: Case, ctx: Ctx) -> None:
    try:
        result = case.call(ctx)
    except CaseTimeout:
        raise
    except BaseException as err:
        observed = f"raised {type(err).__name__}: {_first(err)}"
        assert isinstance(err, LatentforgeError), f"OBSERVED {observed}"
        assert isinstance(err, case.error), f"OBSERVED {observed}; expected {case.error}"
        missing = _mentions(str(err), case.must_mention, ctx)
        assert not missing, f"OBSERVED message lacks {missing}: {str(err)[:400]!r}"
    else:
        pytest.fail(f"OBSERVED no error; returned {type(result).__name__}")


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> Env:
    return Env(tmp_path_factory.mktemp("shared"))


def test_the_table_is_large_and_its_ids_unique():
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids)), sorted({i for i in ids if ids.count(i) > 1})
    assert len(ids) >= 150


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, env: Env, tmp_path_factory, capsys):
    if case.no_cuda and torch.cuda.is_available():
        pytest.skip("this machine has CUDA: run.device=cuda is valid here")
    logger = logging.getLogger("latentforge")
    handlers, level = list(logger.handlers), logger.level
    torch_threads = torch.get_num_threads()

    def hung(*_):
        raise CaseTimeout(f"{case.id} ran past {CASE_SECONDS} s")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.setitimer(signal.ITIMER_REAL, CASE_SECONDS)
    with pytest.MonkeyPatch.context() as mp:
        tmp_path = tmp_path_factory.mktemp("case")  # a neutral name: no word of the case id in paths
        ctx = Ctx(env, tmp_path, mp)
        try:
            mp.chdir(tmp_path)
            if case.setup is not None:
                case.setup(ctx)
            before = snapshot(ctx.path(case.guard)) if case.guard else None
            capsys.readouterr()
            if case.argv is not None:
                _run_cli(case, ctx, capsys)
            else:
                _run_api(case, ctx)
            if before is not None:
                after = snapshot(ctx.path(case.guard))
                changed = [
                    name
                    for name, old in before.items()
                    if name not in after
                    or not (after[name].startswith(old) if name.endswith("log.txt") else after[name] == old)
                ]
                assert not changed, f"OBSERVED the failing command changed or removed {changed}"
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
            logger.handlers[:] = handlers
            logger.setLevel(level)
            torch.set_num_threads(torch_threads)
            mp.undo()
            for undo in ctx.on_exit:
                undo()
    assert not env.sentinel.exists(), "OBSERVED a pickle was executed: the sentinel file exists"


# ------------------------------------------------------------------------------------------------
# A file saved under a known ADM reference batch's name is checked against the published SHA-256
# ------------------------------------------------------------------------------------------------
NOT_ADM = b"other bytes saved under the name of the ADM ImageNet 256 reference batch\n"
NOT_ADM_SHA256 = hashlib.sha256(NOT_ADM).hexdigest()
ADM_256_SHA256 = "b32732719497e42660a9affb4a966068cba0855ac449b82015e34ec376d20758"
fake_adm_reference = file("adm_ref", "VIRTUAL_imagenet256_labeled.npz", NOT_ADM)


def reference_metric(name: str) -> Callable[[Ctx], Any]:
    def call(ctx: Ctx) -> Any:
        import latentforge_metrics

        return getattr(latentforge_metrics, name)(ctx.path("adm_ref"))

    return call


REFERENCE_HASH_CASES: list[Case] = [
    C(
        "evaluate-reference-sha256-mismatch",
        evaluate("samples=<samples>", "reference=<adm_ref>", "metrics=[psnr]"),
        ReferenceFileError,
        "VIRTUAL_imagenet256_labeled.npz",
        NOT_ADM_SHA256,
        ("expected " + ADM_256_SHA256,),
        "check_reference=false",
        setup=fake_adm_reference,
        early=False,
    ),
    *(
        A(
            f"{name.lower()}-reference-sha256-mismatch",
            reference_metric(name),
            ReferenceFileError,
            "VIRTUAL_imagenet256_labeled.npz",
            NOT_ADM_SHA256,
            ADM_256_SHA256,
            "check_reference=False",
            setup=fake_adm_reference,
        )
        for name in ("FID", "KID", "PrecisionRecall")
    ),
]


@pytest.mark.parametrize("case", REFERENCE_HASH_CASES, ids=[c.id for c in REFERENCE_HASH_CASES])
def test_bad_reference_hash(case: Case, env: Env, tmp_path_factory, capsys):
    assert case.id not in {c.id for c in CASES}
    test_bad_input(case, env, tmp_path_factory, capsys)
