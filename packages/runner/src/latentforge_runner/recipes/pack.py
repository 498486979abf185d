"""pack: an image folder → an ADM-style ``.npz`` (``arr_0`` uint8 ``[N, H, W, 3]``, ``arr_1`` labels).

    latentforge run pack root=/data/imagenet/val image_size=256 run.output_dir=runs/val256

The folder is in the ImageNet layout (``root/<class>/*.JPEG``: labels are the sorted class indices)
or flat (no labels).  Every image gets the ADM center crop of ``data.py``, so a packed reference
matches what the training recipes read.  Unreadable images are skipped, counted and listed in
``pack.json``.  The pixels stream through a temporary file, so the count of readable images (which
the ``.npz`` header declares) is known before the archive is written, without holding the set in memory.
Under ``torchrun`` the processes decode alternate batches and the first writes them in data-set order,
so the archive is the same for any number of processes.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from latentforge_metrics.npz import SampleWriter
from latentforge_runner import distributed
from latentforge_runner.config import ConfigError, Settings, setting, settings
from latentforge_runner.data import DataError, ImageFolder, collate
from latentforge_runner.reports import write_report
from latentforge_runner.run_folder import RunSettings, open_run
from latentforge_runner.training import progress_bar

log = logging.getLogger("latentforge")


@settings
class PackSettings(Settings):
    run: RunSettings = RunSettings(output_dir="runs/pack")  # where and on what it runs
    root: str  # ImageNet layout (root/<class>/*.JPEG) or a flat folder of images
    image_size: int = setting(256, ge=1)  # ADM center crop to this many pixels a side
    output: str | None = None  # default: <output_dir>/images.npz
    max_images: int | None = setting(None, ge=1)  # the first N in sorted order
    batch_size: int = setting(64, ge=1)  # images read at once
    num_workers: int = setting(0, ge=0)  # data loader processes (0: read in the main process)


class PackRecipe:
    Settings = PackSettings

    def __init__(self, config: PackSettings):
        self.cfg = config

    def setup(self) -> None:
        self.run_dir, self.dist, self.logger = open_run("pack", self.cfg)
        self.dataset = ImageFolder(self.cfg.root, self.cfg.image_size)
        self.output = Path(self.cfg.output) if self.cfg.output else self.run_dir / "images.npz"
        if self.output.is_dir():
            raise ConfigError(f"output {self.output} is a folder: expected the path of the .npz to write")
        blocking = next((p for p in self.output.parents if p.exists() and not p.is_dir()), None)
        if blocking is not None:
            raise ConfigError(f"output {self.output} lies under {blocking}, a file: expected a folder there")
        self.skipped: list[str] = []

    def run(self) -> dict[str, Any]:
        """Rank r of w decodes the batches r, r+w, …; the main process writes them in data-set order."""
        cfg = self.cfg
        n = len(self.dataset) if cfg.max_images is None else min(cfg.max_images, len(self.dataset))
        batches = [list(range(s, min(s + cfg.batch_size, n))) for s in range(0, n, cfg.batch_size)]
        loader = torch.utils.data.DataLoader(
            self.dataset,
            batch_sampler=distributed.shard(batches),
            num_workers=cfg.num_workers,
            collate_fn=collate,
        )
        ordered = distributed.gather_in_order(map(_to_bytes, loader), len(batches))
        self.report = None
        if not self.dist.is_main:
            for _ in ordered:  # the main process gathers every round
                pass
            return {}
        raw_path = self.run_dir / ".pack.raw"
        try:
            good, labels = self._decode(ordered, raw_path)
            if good == 0:
                raise DataError(
                    f"none of the {n} images under {cfg.root} could be read; first: {self.skipped[0]}"
                )
            self._write(raw_path, good, labels)
        finally:
            raw_path.unlink(missing_ok=True)
        if self.skipped:
            log.warning("skipped %d unreadable image(s), first: %s", len(self.skipped), self.skipped[0])
        self.report = {
            "output": str(self.output),
            "num_images": good,
            "image_size": cfg.image_size,
            "classes": self.dataset.classes,
            "skipped": len(self.skipped),
            "skipped_files": self.skipped,
        }
        return self.report

    def _decode(self, batches, raw_path: Path) -> tuple[int, torch.Tensor | None]:
        """Append every batch's pixels to ``raw_path``; (readable count, labels or None)."""
        labels: list[torch.Tensor] = []
        good = 0
        with open(raw_path, "wb") as raw:
            for batch in progress_bar(batches, desc="pack", unit="batch"):
                self.skipped += batch["skipped"]
                if batch["image"] is None:
                    continue
                raw.write(batch["image"].numpy().tobytes())
                labels.append(batch["label"])
                good += batch["image"].shape[0]
        return good, (torch.cat(labels) if labels and self.dataset.classes else None)

    def _write(self, raw_path: Path, good: int, labels: torch.Tensor | None) -> None:
        size, b = self.cfg.image_size, self.cfg.batch_size
        row = 3 * size * size
        with open(raw_path, "rb") as raw, SampleWriter(self.output, good, size) as writer:
            for start in range(0, good, b):
                count = min(b, good - start)
                chunk = np.frombuffer(raw.read(count * row), dtype=np.uint8).reshape(count, 3, size, size)
                writer.write(
                    torch.from_numpy(chunk.copy()), None if labels is None else labels[start : start + count]
                )

    def save(self) -> None:
        if self.report is None:
            return
        write_report(self.run_dir / "pack.json", self.report)
        log.info("%d images packed into %s", self.report["num_images"], self.output)

    def cleanup(self) -> None:
        self.logger.close()
        distributed.cleanup()


def _to_bytes(batch: dict[str, Any]) -> dict[str, Any]:
    """A collated batch with its pixels as uint8 (exact: the crop gave k/255), a quarter of the bytes
    to gather."""
    if batch["image"] is not None:
        batch["image"] = batch["image"].mul(255).round().to(torch.uint8)  # [B, 3, H, W]
    return batch
