"""fit-kmeans: K-Means centroids over a frozen encoder's features (DiGIT's tokenizer), one file out.

    latentforge run fit-kmeans --config tiny-digit-kmeans
    latentforge run fit-kmeans --config tiny-digit-kmeans data.name=folder data.root=/data/imagenet/train \\
        tokenizer.name=kmeans tokenizer.params.n_clusters=8192 max_images=128000

Writes ``<output_dir>/centroids.safetensors`` (centroids + encoder config), which ``train-generator``
takes as ``tokenizer.params.centroids``.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from latentforge_runner import distributed
from latentforge_runner.config import Component, ConfigError, Settings, component, setting, settings
from latentforge_runner.data import DataSettings, build_images
from latentforge_runner.run_folder import RunSettings, open_run
from latentforge_runner.training import progress_bar

log = logging.getLogger("latentforge")


@settings
class FitKMeansSettings(Settings):
    run: RunSettings = RunSettings(output_dir="runs/fit-kmeans")  # where and on what it runs
    data: DataSettings = DataSettings()  # the images whose encoder features are clustered
    tokenizer: Component = component("tokenizers")  # a K-Means tokenizer (its encoder and n_clusters)
    max_images: int = setting(128_000, ge=1)  # DiGIT keeps ~10% of ImageNet train
    batch_size: int = setting(64, ge=1)  # images encoded at once


class FitKMeansRecipe:
    Settings = FitKMeansSettings

    def __init__(self, config: FitKMeansSettings):
        self.cfg = config

    def setup(self) -> None:
        self.run_dir, self.dist, self.logger = open_run("fit-kmeans", self.cfg)
        self.dataset = build_images(self.cfg.data)
        self.tokenizer = self.cfg.tokenizer.build("tokenizers").to(self.dist.device)
        if not callable(getattr(self.tokenizer, "fit", None)):
            raise ConfigError(
                f"tokenizer {self.cfg.tokenizer.name!r} is not fitted by clustering: fit-kmeans expects a "
                "K-Means tokenizer (kmeans, test-kmeans-tiny, …)"
            )

    def _batches(self):
        n, b = min(len(self.dataset), self.cfg.max_images), self.cfg.batch_size
        order = torch.randperm(len(self.dataset), generator=torch.Generator().manual_seed(self.cfg.run.seed))[
            :n
        ]
        starts = range(0, n, b)
        for start in progress_bar(starts, desc="features", unit="batch", disable=not self.dist.is_main):
            items = [self.dataset[int(i)] for i in order[start : start + b]]
            good = [it["image"] for it in items if "error" not in it]
            if good:
                yield torch.stack(good).to(self.dist.device)

    def run(self) -> dict[str, Any]:
        self.tokenizer.fit(self._batches())
        return {"n_clusters": int(self.tokenizer.centroids.shape[0])}

    def save(self) -> None:
        if self.dist.is_main:
            path = self.tokenizer.save(self.run_dir / "centroids.safetensors")
            log.info("centroids written to %s", path)

    def cleanup(self) -> None:
        self.logger.close()
        distributed.cleanup()
