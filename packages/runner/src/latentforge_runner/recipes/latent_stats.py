"""latent-stats: exact latent mean/variance of a continuous tokenizer over a data set, saved beside it.

    latentforge run latent-stats tokenizer.name=rae tokenizer.params.pretrained_decoder=/ckpt/m.safetensors \\
        data.name=folder data.root=/data/imagenet/train data.image_size=256

The tokenizer's own ``compute_stats`` fixes the convention (RAE: per element, population variance;
VA-VAE: per channel, unbiased, on posterior samples).  The artifact goes to
``<checkpoint stem>.latent_stats.safetensors`` beside the tokenizer's weights file (``checkpoint`` or,
by default, the block's ``pretrained_decoder``/``checkpoint``/``pretrained`` parameter), where the
tokenizer builders look for it; without a weights file it goes to ``<output_dir>/latent_stats.safetensors``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from latentforge_runner import distributed
from latentforge_runner.config import Component, Settings, component, settings
from latentforge_runner.data import build_dataset
from latentforge_runner.recipes import RunSettings, open_run
from latentforge_runner.recipes.train_generator import DataSettings
from latentforge_tokenizers.stats import stats_path

log = logging.getLogger("latentforge")

WEIGHT_PARAMS = ("pretrained_decoder", "checkpoint", "pretrained")  # where tokenizer builders read weights


@settings
class LatentStatsSettings(Settings):
    run: RunSettings = RunSettings(output_dir="runs/latent-stats")
    data: DataSettings = DataSettings()
    tokenizer: Component = component("tokenizers")
    checkpoint: str | None = None  # the stats go beside this file (default: the tokenizer's weights)
    max_images: int = 0  # 0: the whole data set
    batch_size: int = 64


class LatentStatsRecipe:
    Settings = LatentStatsSettings

    def __init__(self, config: LatentStatsSettings):
        self.cfg = config

    def setup(self) -> None:
        cfg = self.cfg
        self.run_dir, self.dist, self.logger = open_run("latent-stats", cfg)
        if cfg.batch_size < 1 or cfg.max_images < 0:
            raise ValueError(
                f"batch_size must be ≥ 1 and max_images ≥ 0, got {cfg.batch_size}, {cfg.max_images}"
            )
        self.dataset = build_dataset(cfg.data.name, image_size=cfg.data.image_size, root=cfg.data.root)
        self.tokenizer = cfg.tokenizer.build("tokenizers").to(self.dist.device).eval()
        if self.tokenizer.vocab_size is not None or not hasattr(self.tokenizer, "compute_stats"):
            raise ValueError(
                f"tokenizer {cfg.tokenizer.name!r} has no continuous latents to take statistics of; "
                "latent-stats needs a continuous tokenizer (RAE, VA-VAE)"
            )
        self.skipped: list[str] = []

    def _batches(self):
        n = len(self.dataset) if not self.cfg.max_images else min(len(self.dataset), self.cfg.max_images)
        b = self.cfg.batch_size
        for start in tqdm(range(0, n, b), desc="latent stats", unit="batch", disable=not self.dist.is_main):
            items = [self.dataset[i] for i in range(start, min(start + b, n))]
            self.skipped += [it["error"] for it in items if "error" in it]
            good = [it["image"] for it in items if "error" not in it]
            if good:
                yield torch.stack(good).to(self.dist.device)

    def run(self) -> dict[str, Any]:
        self.stats = self.tokenizer.compute_stats(self._batches())
        if self.skipped:
            log.warning("skipped %d unreadable image(s), first: %s", len(self.skipped), self.skipped[0])
        return {"shape": self.stats.shape, "skipped": len(self.skipped)}

    def destination(self) -> Path:
        weights = self.cfg.checkpoint or next(
            (self.cfg.tokenizer.params[k] for k in WEIGHT_PARAMS if self.cfg.tokenizer.params.get(k)), None
        )
        return stats_path(weights) if weights else self.run_dir / "latent_stats.safetensors"

    def save(self) -> None:
        if self.dist.is_main:
            path = self.stats.save(self.destination())
            log.info("latent statistics %s written to %s", self.stats.shape, path)

    def cleanup(self) -> None:
        self.logger.close()
        distributed.cleanup()
