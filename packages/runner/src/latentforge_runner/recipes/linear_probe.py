"""linear-probe: top-1 accuracy of a linear classifier on a frozen encoder's features (MAE's protocol).

    latentforge run linear-probe encoder.name=test-vit-tiny data.name=digits data.image_size=32 \\
        data.num_classes=10
    latentforge run linear-probe encoder.name=dinov2-vitb14 data.name=folder data.root=/data/imagenet/train \\
        val_root=/data/imagenet/val data.image_size=224 epochs=90

Training features come from ``data`` (the digits' ``train`` split, hf-datasets' ``data.split``),
held-out ones from ``val_split`` (the digits', or hf-datasets' of ``data.root``) or ``val_root`` (same
layout and class folders).  Features are taken once; the probe
itself is :class:`latentforge_metrics.probe.LinearProbe`.  Writes ``<output_dir>/report.json``.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

import attrs
import torch

from latentforge_metrics.probe import LinearProbe
from latentforge_runner import distributed
from latentforge_runner.config import Component, Settings, component, setting, settings
from latentforge_runner.data import DataError, DataSettings, build_images
from latentforge_runner.reports import write_report
from latentforge_runner.run_folder import RunSettings, open_run
from latentforge_runner.training import progress_bar

log = logging.getLogger("latentforge")


@settings
class LinearProbeSettings(Settings):
    run: RunSettings = RunSettings(output_dir="runs/linear-probe")  # where and on what it runs
    data: DataSettings = DataSettings()  # the training split
    val_root: str | None = None  # held-out folder or hf-datasets root (default: data.root's val_split)
    val_split: str = "test"  # digits, hf-datasets: the held-out split (ImageNet-1k on the hub: validation)
    encoder: Component = component("encoders")  # the frozen encoder whose features are probed
    output: Literal["cls", "pooled", "map", "tokens"] = "cls"  # maps and tokens are averaged
    epochs: int = setting(90, ge=1)  # passes of the probe's SGD over the features
    lr: float = setting(0.1, gt=0)  # the probe's learning rate
    batch_size: int = setting(256, ge=1)  # of the probe's SGD; features are taken in batches of the same size
    weight_decay: float = setting(0.0, ge=0)  # the probe's weight decay
    max_images: int = setting(0, ge=0)  # per split; 0: all


class LinearProbeRecipe:
    Settings = LinearProbeSettings

    def __init__(self, config: LinearProbeSettings):
        self.cfg = config

    def setup(self) -> None:
        cfg = self.cfg
        self.run_dir, self.dist, self.logger = open_run("linear-probe", cfg)
        if cfg.data.name == "folder" and not cfg.val_root:
            raise DataError(
                "linear-probe on a folder needs val_root: a held-out folder with the same classes"
            )
        self.train = build_images(cfg.data)
        held_out = attrs.evolve(cfg.data, root=cfg.val_root or cfg.data.root)
        self.val = build_images(held_out, split=cfg.val_split)
        if cfg.data.name == "folder" and self.train.classes != self.val.classes:
            raise DataError(
                f"val_root's classes {self.val.classes[:5]}… differ from data.root's "
                f"{self.train.classes[:5]}…"
            )
        encoder = cfg.encoder.build("encoders")
        self.probe = LinearProbe(
            cfg.data.num_classes,
            encoder,
            output=cfg.output,
            epochs=cfg.epochs,
            lr=cfg.lr,
            batch_size=cfg.batch_size,
            weight_decay=cfg.weight_decay,
            seed=cfg.run.seed,
            device=self.dist.device,
        )
        self.skipped: list[str] = []

    @torch.no_grad()
    def _features(self, dataset, train: bool) -> int:
        n = len(dataset) if not self.cfg.max_images else min(len(dataset), self.cfg.max_images)
        b, seen = self.cfg.batch_size, 0
        desc = "train features" if train else "held-out features"
        for start in progress_bar(range(0, n, b), desc=desc, unit="batch", disable=not self.dist.is_main):
            items = [dataset[i] for i in range(start, min(start + b, n))]
            self.skipped += [it["error"] for it in items if "error" in it]
            good = [it for it in items if "error" not in it]
            if good:
                labels = torch.tensor([it["label"] for it in good])
                self.probe.update(torch.stack([it["image"] for it in good]), labels, train=train)
                seen += len(good)
        return seen

    def run(self) -> dict[str, Any]:
        counts = {
            "train_images": self._features(self.train, True),
            "val_images": self._features(self.val, False),
        }
        if self.skipped:
            log.warning("skipped %d unreadable image(s), first: %s", len(self.skipped), self.skipped[0])
        self.report = {
            "encoder": self.cfg.encoder.name,
            **self.probe.compute(),
            "chance": 1 / self.cfg.data.num_classes,
            **counts,
            "skipped": len(self.skipped),
        }
        return self.report

    def save(self) -> None:
        if self.dist.is_main:
            write_report(self.run_dir / "report.json", self.report)
            log.info("linear probe top-1 %.4f (chance %.4f)", self.report["top1"], self.report["chance"])

    def cleanup(self) -> None:
        self.logger.close()
        distributed.cleanup()
