"""cache-latents: a data set's latents (or tokens) written once to safetensors shards, read back for training.

    latentforge run cache-latents tokenizer.name=vavae-f16d32 tokenizer.params.pretrained=/c/va.safetensors \\
        data.name=folder data.root=/data/imagenet/train data.image_size=256 shard_size=10000
    torchrun --nproc-per-node 8 -m latentforge_runner.cli run cache-latents --config my-cache.yaml

Each shard ``shard-r<rank>-<k>.safetensors`` holds ``latents`` ``[n, C, h, w]`` (continuous tokenizers,
raw: normalisation happens at training time) or ``tokens`` ``[n, h, w]`` (discrete ones), with
``flip=true`` the same of the horizontally flipped images under ``latents_flip``/``tokens_flip``
(LightningDiT's extraction), plus ``labels`` and the data set ``indices``.  Rank r of w encodes items
r, r+w, r+2w, …  ``latentforge_runner.latents.LatentShards`` reads a folder of shards back as a
training data set.
"""

from __future__ import annotations

import inspect
import logging
from pathlib import Path
from typing import Any

import attrs
import torch

from latentforge_core.checkpoint import save_checkpoint
from latentforge_runner import distributed
from latentforge_runner.config import Component, ConfigError, Settings, component, setting, settings
from latentforge_runner.data import DataError, DataSettings, build_dataset
from latentforge_runner.run_folder import RunSettings, open_run
from latentforge_runner.training import progress_bar

log = logging.getLogger("latentforge")


@settings
class CacheLatentsSettings(Settings):
    run: RunSettings = RunSettings(output_dir="runs/cache-latents")  # where and on what it runs
    data: DataSettings = DataSettings()  # the images to encode
    tokenizer: Component = component("tokenizers")  # the tokenizer whose latents (or tokens) are cached
    encode: dict = attrs.field(factory=dict)  # keyword arguments of tokenizer.encode (e.g. sample: false)
    flip: bool = True  # also store the horizontally flipped images' latents
    shard_size: int = setting(10_000, ge=1)  # items per shard (per process)
    batch_size: int = setting(64, ge=1)  # images encoded at once
    max_images: int = setting(0, ge=0)  # 0: the whole data set


class CacheLatentsRecipe:
    Settings = CacheLatentsSettings

    def __init__(self, config: CacheLatentsSettings):
        self.cfg = config

    def setup(self) -> None:
        cfg = self.cfg
        self.run_dir, self.dist, self.logger = open_run("cache-latents", cfg)
        if cfg.shard_size < 1 or cfg.batch_size < 1 or cfg.max_images < 0:
            raise ConfigError(
                f"shard_size and batch_size must be ≥ 1 and max_images ≥ 0, got {cfg.shard_size}, "
                f"{cfg.batch_size}, {cfg.max_images}"
            )
        self.dataset = build_dataset(cfg.data.name, image_size=cfg.data.image_size, root=cfg.data.root)
        self.tokenizer = cfg.tokenizer.build("tokenizers").to(self.dist.device).eval()
        self.key = "tokens" if self.tokenizer.vocab_size is not None else "latents"
        known = inspect.signature(self.tokenizer.encode).parameters
        unknown = sorted(set(cfg.encode) - set(known))
        if unknown:
            raise ConfigError(
                f"encode: {', '.join(unknown)} not accepted by {cfg.tokenizer.name!r}'s encode; "
                f"expected some of {', '.join(k for k in known if k != 'images') or 'no options'}"
            )
        self.shards: list[Path] = []
        self.skipped: list[str] = []

    @torch.no_grad()
    def _encode(self, images: torch.Tensor) -> torch.Tensor:
        return self.tokenizer.encode(images.to(self.dist.device), **self.cfg.encode).cpu()

    def run(self) -> dict[str, Any]:
        n = len(self.dataset) if not self.cfg.max_images else min(len(self.dataset), self.cfg.max_images)
        mine = list(range(self.dist.rank, n, self.dist.world_size))
        pending: dict[str, list[torch.Tensor]] = {}
        bar = progress_bar(total=len(mine), desc="cache latents", unit="img", disable=not self.dist.is_main)
        for start in range(0, len(mine), self.cfg.batch_size):
            items = [self.dataset[i] for i in mine[start : start + self.cfg.batch_size]]
            self.skipped += [it["error"] for it in items if "error" in it]
            good = [it for it in items if "error" not in it]
            bar.update(len(items))
            if not good:
                continue
            images = torch.stack([it["image"] for it in good])  # B 3 H W in [0, 1]
            batch = {
                self.key: self._encode(images),
                "labels": torch.tensor([it["label"] for it in good], dtype=torch.long),
                "indices": torch.tensor([it["index"] for it in good], dtype=torch.long),
            }
            if self.cfg.flip:
                batch[f"{self.key}_flip"] = self._encode(images.flip(-1))
            for k, v in batch.items():
                pending.setdefault(k, []).append(v)
            while sum(len(v) for v in pending["labels"]) >= self.cfg.shard_size:
                pending = self._write(pending)
        bar.close()
        if sum(len(v) for v in pending.get("labels", [])):
            self._write(pending, last=True)
        if not self.shards:
            raise DataError(f"none of the {n} image(s) could be read; no shard written")
        if self.skipped:
            log.warning("skipped %d unreadable image(s), first: %s", len(self.skipped), self.skipped[0])
        return {"shards": [str(p) for p in self.shards], "skipped": len(self.skipped)}

    def _write(
        self, pending: dict[str, list[torch.Tensor]], last: bool = False
    ) -> dict[str, list[torch.Tensor]]:
        """One shard of ``shard_size`` items (or the rest, at the end); returns what is left over."""
        joined = {k: torch.cat(v) for k, v in pending.items()}
        size = len(joined["labels"]) if last else self.cfg.shard_size
        path = self.run_dir / f"shard-r{self.dist.rank:03d}-{len(self.shards):05d}.safetensors"
        config = {"kind": "latent_cache", "tokenizer": self.cfg.tokenizer.name, "key": self.key}
        save_checkpoint({k: v[:size] for k, v in joined.items()}, path, config)
        self.shards.append(path)
        return {k: [v[size:]] for k, v in joined.items()}

    def save(self) -> None:
        log.info("rank %d wrote %d shard(s) to %s", self.dist.rank, len(self.shards), self.run_dir)

    def cleanup(self) -> None:
        self.logger.close()
        distributed.cleanup()
