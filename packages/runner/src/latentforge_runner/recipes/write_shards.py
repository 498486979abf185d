"""write-shards: an image folder → WebDataset ``.tar`` shards (``<key>.jpg``/``.png``/… + ``<key>.cls``).

    latentforge run write-shards root=/data/imagenet/train shard_size=1000 run.output_dir=runs/shards
    latentforge run train-generator --config … data.name=webdataset data.root=runs/shards/shards

The folder is read as ``data.name: folder`` reads it (ImageNet layout ``root/<class>/*.JPEG``, labels the
sorted class indices, or flat with label 0), in the same order, so sample ``i`` of the shards is image
``i`` of the folder and a run on either sees the same images.  Each file's bytes are copied as they
are (no re-encoding: ``.JPEG`` becomes ``<key>.jpg``, ``.png`` stays ``<key>.png``), keys are the sample
numbers ``000000000``, …, and every shard but the last holds ``shard_size`` samples:
``shard-000000.tar``, ….  ``classes.txt`` beside them lists the class names.  With ``verify`` (the
default) every image is decoded first: unreadable ones are skipped, counted and listed in
``write-shards.json``.
"""

from __future__ import annotations

import io
import logging
import tarfile
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from latentforge_runner import distributed
from latentforge_runner.config import ConfigError, Settings, setting, settings
from latentforge_runner.data import UNREADABLE, DataError, ImageFolder
from latentforge_runner.reports import write_report
from latentforge_runner.run_folder import RunSettings, open_run
from latentforge_runner.training import progress_bar

log = logging.getLogger("latentforge")

SUFFIXES = {".jpeg": "jpg", ".jpg": "jpg", ".png": "png", ".webp": "webp", ".bmp": "bmp", ".ppm": "ppm"}
SUFFIXES |= {".tif": "tiff", ".tiff": "tiff"}


@settings
class WriteShardsSettings(Settings):
    run: RunSettings = RunSettings(output_dir="runs/write-shards")  # where and on what it runs
    root: str  # ImageNet layout (root/<class>/*.JPEG) or a flat folder of images
    output: str | None = None  # the folder of shards (default: <output_dir>/shards); must hold no shards
    shard_size: int = setting(1000, ge=1)  # samples per shard (the last may hold fewer)
    max_images: int | None = setting(None, ge=1)  # the first N in sorted order
    verify: bool = True  # decode each image first and skip those that do not decode
    num_workers: int = setting(0, ge=0)  # processes that read (and verify) the files


class WriteShardsRecipe:
    Settings = WriteShardsSettings

    def __init__(self, config: WriteShardsSettings):
        self.cfg = config

    def setup(self) -> None:
        self.run_dir, self.dist, self.logger = open_run("write-shards", self.cfg)
        if self.dist.world_size > 1:
            raise ConfigError(
                "write-shards runs in one process (its work is reading files): run it without torchrun"
            )
        self.folder = ImageFolder(self.cfg.root, 1)  # only its file list and classes are used
        self.output = Path(self.cfg.output) if self.cfg.output else self.run_dir / "shards"
        if self.output.exists() and not self.output.is_dir():
            raise ConfigError(f"output {self.output} is a file: expected a folder for the shards")
        if self.output.is_dir() and any(self.output.glob("*.tar")):
            raise ConfigError(
                f"output {self.output} already holds .tar shards: choose another output (shards of two "
                "writes would mix)"
            )
        self.skipped: list[str] = []

    def run(self) -> dict[str, Any]:
        cfg = self.cfg
        n = len(self.folder) if cfg.max_images is None else min(cfg.max_images, len(self.folder))
        files = _Files(self.folder.samples[:n], cfg.verify)
        loader = torch.utils.data.DataLoader(
            files, batch_size=None, num_workers=cfg.num_workers, collate_fn=_as_is
        )
        self.output.mkdir(parents=True, exist_ok=True)
        written, shards = 0, []
        tar: tarfile.TarFile | None = None
        try:
            for record in progress_bar(loader, desc="write-shards", unit="img", total=n):
                if "error" in record:
                    self.skipped.append(record["error"])
                    continue
                if written % cfg.shard_size == 0:
                    if tar is not None:
                        tar.close()
                    shards.append(self.output / f"shard-{len(shards):06d}.tar")
                    tar = tarfile.open(shards[-1], "w", format=tarfile.USTAR_FORMAT)  # noqa: SIM115
                assert tar is not None
                key = f"{written:09d}"
                _add(tar, f"{key}.{record['ext']}", record["data"])
                _add(tar, f"{key}.cls", str(record["label"]).encode())
                written += 1
        finally:
            if tar is not None:
                tar.close()
        if written == 0:
            raise DataError(
                f"none of the {n} images under {cfg.root} could be read; first: {self.skipped[0]}"
            )
        (self.output / "classes.txt").write_text("".join(f"{c}\n" for c in self.folder.classes))
        if self.skipped:
            log.warning("skipped %d unreadable image(s), first: %s", len(self.skipped), self.skipped[0])
        self.report = {
            "output": str(self.output),
            "shards": [p.name for p in shards],
            "num_images": written,
            "shard_size": cfg.shard_size,
            "classes": self.folder.classes,
            "skipped": len(self.skipped),
            "skipped_files": self.skipped,
        }
        return self.report

    def save(self) -> None:
        write_report(self.run_dir / "write-shards.json", self.report)
        log.info(
            "%d images written to %d shard(s) in %s",
            self.report["num_images"], len(self.report["shards"]), self.output,
        )  # fmt: skip

    def cleanup(self) -> None:
        if hasattr(self, "logger"):
            self.logger.close()
        distributed.cleanup()


class _Files(torch.utils.data.Dataset):
    """``(path, label)`` → the file's bytes, its member suffix and label, or an error record."""

    def __init__(self, samples: list[tuple[Path, int]], verify: bool):
        self.samples, self.verify = samples, verify

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        path, label = self.samples[index]
        try:
            data = path.read_bytes()
            if self.verify:
                with Image.open(io.BytesIO(data)) as img:
                    img.load()
        except UNREADABLE as err:
            return {"error": f"{path}: {type(err).__name__}: {err}"}
        ext = SUFFIXES.get(path.suffix.lower(), path.suffix.lower().lstrip("."))
        return {"data": data, "ext": ext, "label": label}


def _as_is(item: dict[str, Any]) -> dict[str, Any]:
    return item


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o644, 0  # no timestamps: the same folder, the same bytes
    tar.addfile(info, io.BytesIO(data))
