"""latent-stats: exact latent mean/variance of a continuous tokenizer over a data set, saved beside it.

    latentforge run latent-stats tokenizer.name=rae tokenizer.params.pretrained_decoder=/ckpt/m.safetensors \\
        data.name=folder data.root=/data/imagenet/train data.image_size=256

The tokenizer's own ``compute_stats`` fixes the convention (RAE: per element, population variance;
VA-VAE: per channel, unbiased, on posterior samples).  The artifact goes to
``<checkpoint stem>.latent_stats.safetensors`` beside the tokenizer's weights file (``checkpoint`` or,
by default, the block's ``pretrained_decoder``/``checkpoint``/``pretrained`` parameter), where the
tokenizer builders look for it; without a weights file it goes to ``<output_dir>/latent_stats.safetensors``.
Under ``torchrun`` the processes encode alternate batches and the first reduces every latent, in the
order and batches of one process, so the statistics do not depend on the number of processes.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from latentforge_core.device import seed_everything
from latentforge_runner import distributed
from latentforge_runner.config import Component, ConfigError, Settings, component, setting, settings
from latentforge_runner.data import DataSettings, build_images
from latentforge_runner.run_folder import RunSettings, open_run
from latentforge_runner.training import progress_bar
from latentforge_tokenizers.stats import stats_path

log = logging.getLogger("latentforge")

WEIGHT_PARAMS = ("pretrained_decoder", "checkpoint", "pretrained")  # where tokenizer builders read weights


@settings
class LatentStatsSettings(Settings):
    run: RunSettings = RunSettings(output_dir="runs/latent-stats")  # where and on what it runs
    data: DataSettings = DataSettings()  # the images whose latents are measured
    tokenizer: Component = component("tokenizers")  # a continuous tokenizer (RAE, VA-VAE)
    checkpoint: str | None = None  # the stats go beside this file (default: the tokenizer's weights)
    max_images: int = setting(0, ge=0)  # 0: the whole data set
    batch_size: int = setting(64, ge=1)  # images encoded at once


class LatentStatsRecipe:
    Settings = LatentStatsSettings

    def __init__(self, config: LatentStatsSettings):
        self.cfg = config

    def setup(self) -> None:
        cfg = self.cfg
        self.run_dir, self.dist, self.logger = open_run("latent-stats", cfg)
        if cfg.batch_size < 1 or cfg.max_images < 0:
            raise ConfigError(
                f"batch_size must be ≥ 1 and max_images ≥ 0, got {cfg.batch_size}, {cfg.max_images}"
            )
        self.dataset = build_images(cfg.data)
        seed_everything(cfg.run.seed)  # random-weight parts (the tiny test tokenizers) equal on every rank
        self.tokenizer = cfg.tokenizer.build("tokenizers").to(self.dist.device).eval()
        if self.tokenizer.vocab_size is not None:
            raise ConfigError(
                f"tokenizer {cfg.tokenizer.name!r} has no continuous latents to take statistics of; "
                "latent-stats needs a continuous tokenizer (RAE, VA-VAE)"
            )
        self.skipped: list[str] = []

    def _latents(self, indices: range) -> tuple[torch.Tensor | None, list[str]]:
        """One batch's latents on the CPU (None when no image could be read) and its unreadable files."""
        items = [self.dataset[i] for i in indices]
        distributed.seed_batch(self.cfg.run.seed, indices.start)  # posterior samples (VA-VAE)
        good = [it["image"] for it in items if "error" not in it]
        z = self._encode(torch.stack(good).to(self.dist.device)).cpu() if good else None
        return z, [it["error"] for it in items if "error" in it]

    def run(self) -> dict[str, Any]:
        """Rank r of w encodes the batches r, r+w, …; the main process runs the tokenizer's own
        ``compute_stats`` (its convention) over every latent, in data-set order and in the batches
        one process would have, with ``encode`` the identity for that call: the statistics do not
        depend on the number of processes."""
        n = len(self.dataset) if not self.cfg.max_images else min(len(self.dataset), self.cfg.max_images)
        b = self.cfg.batch_size
        batches = [range(s, min(s + b, n)) for s in range(0, n, b)]
        self._encode = self.tokenizer.encode
        mine = (self._latents(indices) for indices in distributed.shard(batches))
        ordered = distributed.gather_in_order(mine, len(batches))
        self.stats = None
        if not self.dist.is_main:
            for _ in ordered:  # the main process gathers every round
                pass
            return {}
        bar = progress_bar(ordered, total=len(batches), desc="latent stats", unit="batch")
        self.tokenizer.encode = lambda z, **_: z
        try:
            self.stats = self.tokenizer.compute_stats(self._collect(bar))
        finally:
            del self.tokenizer.encode  # the class's method again
        if self.skipped:
            log.warning("skipped %d unreadable image(s), first: %s", len(self.skipped), self.skipped[0])
        return {"shape": self.stats.shape, "skipped": len(self.skipped)}

    def _collect(self, ordered):
        """Every rank's latents in order, on this device; the unreadable files counted on the way."""
        for z, skipped in ordered:
            self.skipped += skipped
            if z is not None:
                yield z.to(self.dist.device)

    def destination(self) -> Path:
        weights = self.cfg.checkpoint or next(
            (self.cfg.tokenizer.params[k] for k in WEIGHT_PARAMS if self.cfg.tokenizer.params.get(k)), None
        )
        return stats_path(weights) if weights else self.run_dir / "latent_stats.safetensors"

    def save(self) -> None:
        if self.stats is not None:
            path = self.stats.save(self.destination())
            log.info("latent statistics %s written to %s", self.stats.shape, path)

    def cleanup(self) -> None:
        self.logger.close()
        distributed.cleanup()
