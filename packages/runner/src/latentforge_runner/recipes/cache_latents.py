"""cache-latents: a data set's latents (or tokens) written once, read back for training.

    latentforge run cache-latents tokenizer.name=vavae-f16d32 tokenizer.params.pretrained=/c/va.safetensors \\
        data.name=folder data.root=/data/imagenet/train data.image_size=256 dtype=bfloat16
    torchrun --nproc-per-node 8 -m latentforge_runner.cli run cache-latents --config my-cache.yaml

The cache is one memory-mapped file per split, ``latents-<data.split>.lfcache``: ``latents``
``[N, C, h, w]`` (continuous tokenizers, raw: normalisation happens at training time; stored as
``dtype``) or ``tokens`` ``[N, h, w]`` (discrete ones, int64), with ``flip=true`` the same of the
horizontally flipped images (LightningDiT's extraction), the labels, the data set indices and a status
byte per row (see :mod:`latentforge_runner.latents`).  Every process writes its rows r, r+w, r+2w, …
into ``<file>.partial``, a batch's status bytes after its latents, so a run that stops is resumed by
running it again (the batches not written yet are encoded, each seeded by its first index: the file
comes out bitwise the same); the finished file is renamed into place, so a reader sees a whole cache or
none.  ``format=shards`` writes the safetensors shards of earlier versions instead
(``shard-r<rank>-<k>.safetensors``, ``shard_size`` items each), which
``latentforge_runner.latents.LatentShards`` reads too.
"""

from __future__ import annotations

import inspect
import logging
import os
from pathlib import Path
from typing import Any, Literal

import attrs
import numpy as np
import torch

from latentforge_core.checkpoint import save_checkpoint
from latentforge_runner import distributed
from latentforge_runner.config import Component, ConfigError, Settings, component, setting, settings, to_plain
from latentforge_runner.data import DataError, DataSettings, build_images
from latentforge_runner.latents import (
    PENDING,
    UNREADABLE,
    WRITTEN,
    cache_header,
    cache_path,
    create_cache_file,
    map_cache_file,
)
from latentforge_runner.run_folder import RunSettings, open_run
from latentforge_runner.training import progress_bar

log = logging.getLogger("latentforge")


def _made_as(path: Path, header: dict[str, Any]) -> bool:
    """Whether ``path`` is a whole cache file with ``header``."""
    try:
        return path.is_file() and map_cache_file(path)[0] == header
    except DataError:
        return False


@settings
class CacheLatentsSettings(Settings):
    run: RunSettings = RunSettings(output_dir="runs/cache-latents")  # where and on what it runs
    data: DataSettings = DataSettings()  # the images to encode
    tokenizer: Component = component("tokenizers")  # the tokenizer whose latents (or tokens) are cached
    encode: dict = attrs.field(factory=dict)  # keyword arguments of tokenizer.encode (e.g. sample: false)
    flip: bool = True  # also store the horizontally flipped images' latents
    # memmap: one memory-mapped file per split (resumable); shards: safetensors shards (earlier versions)
    format: Literal["memmap", "shards"] = "memmap"
    # memmap: how continuous latents are stored (float32 keeps them exact; the 16-bit ones halve the file)
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    shard_size: int = setting(10_000, ge=1)  # format shards: items per shard (per process)
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
        self.dataset = build_images(cfg.data)
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

    def _batches(self, rows: list[int]):
        """``(rows, encoded batch or None)`` per batch of ``rows``; unreadable images are left out of
        the batch (and counted), a batch of none of them gives None."""
        bar = progress_bar(total=len(rows), desc="cache latents", unit="img", disable=not self.dist.is_main)
        for start in range(0, len(rows), self.cfg.batch_size):
            chunk = rows[start : start + self.cfg.batch_size]
            items = [self.dataset[i] for i in chunk]
            self.skipped += [it["error"] for it in items if "error" in it]
            good = [it for it in items if "error" not in it]
            bar.update(len(items))
            if not good:
                yield chunk, None
                continue
            images = torch.stack([it["image"] for it in good])  # B 3 H W in [0, 1]
            distributed.seed_batch(self.cfg.run.seed, chunk[0])  # a sampling encode draws the same on resume
            batch = {
                self.key: self._encode(images),
                "labels": torch.tensor([it["label"] for it in good], dtype=torch.long),
                "indices": torch.tensor([it["index"] for it in good], dtype=torch.long),
            }
            if self.cfg.flip:
                batch[f"{self.key}_flip"] = self._encode(images.flip(-1))
            yield chunk, batch
        bar.close()

    def run(self) -> dict[str, Any]:
        n = len(self.dataset) if not self.cfg.max_images else min(len(self.dataset), self.cfg.max_images)
        result = self._run_memmap(n) if self.cfg.format == "memmap" else self._run_shards(n)
        if self.skipped:
            log.warning("skipped %d unreadable image(s), first: %s", len(self.skipped), self.skipped[0])
        return result | {"skipped": len(self.skipped)}

    # ---------------------------------------------------------------------------- the memory-mapped file
    def _run_memmap(self, n: int) -> dict[str, Any]:
        cfg = self.cfg
        path = cache_path(self.run_dir, cfg.data.split)
        partial = path.with_name(path.name + ".partial")
        dtype = "int64" if self.key == "tokens" else cfg.dtype
        # A cache is resumed, or kept, only when what made it is the same.
        source = {"tokenizer": cfg.tokenizer, "encode": cfg.encode, "data": cfg.data, "seed": cfg.run.seed}
        made_by = {"tokenizer": cfg.tokenizer.name, "key": self.key, "source": to_plain(source)}
        header = cache_header(n, tuple(self.tokenizer.latent_shape), dtype, cfg.flip, **made_by)
        if self.dist.is_main:
            self._prepare(path, partial, header)
        distributed.barrier()
        if partial.is_file():  # every process decides before the main one renames it
            _, arrays = map_cache_file(partial, mode="r+")
            status = arrays["status"]
            mine = list(range(self.dist.rank, n, self.dist.world_size))
            batches = [mine[s : s + cfg.batch_size] for s in range(0, len(mine), cfg.batch_size)]
            todo = [row for chunk in batches if (status[chunk] == PENDING).any() for row in chunk]
            for chunk, batch in self._batches(todo):
                written = set()
                if batch is not None:
                    rows = batch["indices"].numpy()  # an item's row is its data set index
                    for name, key in (("values", self.key), ("flipped", f"{self.key}_flip")):
                        if key in batch:
                            arrays[name][rows] = self._stored(batch[key], arrays[name].shape[1:])
                    arrays["labels"][rows], arrays["indices"][rows] = batch["labels"].numpy(), rows
                    written = set(rows.tolist())
                status[chunk] = [WRITTEN if row in written else UNREADABLE for row in chunk]  # after the rows
            for array in arrays.values():
                array.flush()
            del arrays, status
            distributed.barrier()
            if self.dist.is_main:
                self._publish(partial, path)
            distributed.barrier()
        _, arrays = map_cache_file(path)
        written = int((arrays["status"] == WRITTEN).sum())
        if not written:
            raise DataError(f"none of the {n} image(s) could be read; {path} holds no latents")
        return {"cache": str(path), "items": written}

    def _prepare(self, path: Path, partial: Path, header: dict[str, Any]) -> None:
        """Keep a finished cache made the same way, or continue such a partial one; else start anew."""
        if _made_as(path, header):
            log.info("%s is already cached with these settings", path)
            partial.unlink(missing_ok=True)
        elif _made_as(partial, header):
            log.info("continuing the unfinished %s", partial)
        else:
            if path.is_file() or partial.is_file():
                log.info(
                    "the cache in %s was made with other settings or is damaged: writing it anew", path.parent
                )
            create_cache_file(partial, header)

    def _stored(self, value: torch.Tensor, shape: tuple[int, ...]) -> np.ndarray:
        """``value`` as the cache stores it (bfloat16 as its int16 bits)."""
        if tuple(value.shape[1:]) != tuple(shape):
            raise DataError(
                f"tokenizer {self.cfg.tokenizer.name!r} encoded {tuple(value.shape[1:])}, but its "
                f"latent_shape says {tuple(shape)}"
            )
        if self.key == "tokens":
            return value.long().numpy()
        stored = value.to(getattr(torch, self.cfg.dtype))
        return (stored.view(torch.int16) if self.cfg.dtype == "bfloat16" else stored).numpy()

    def _publish(self, partial: Path, path: Path) -> None:
        """Sync the finished partial file to disk and rename it into place (atomic)."""
        with open(partial, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(partial, path)
        log.info("wrote %s", path)

    # ---------------------------------------------------------------------------- safetensors shards
    def _run_shards(self, n: int) -> dict[str, Any]:
        pending: dict[str, list[torch.Tensor]] = {}
        for _, batch in self._batches(list(range(self.dist.rank, n, self.dist.world_size))):
            for k, v in (batch or {}).items():
                pending.setdefault(k, []).append(v)
            while pending and sum(len(v) for v in pending["labels"]) >= self.cfg.shard_size:
                pending = self._write(pending)
        if sum(len(v) for v in pending.get("labels", [])):
            self._write(pending, last=True)
        if not self.shards:
            raise DataError(f"none of the {n} image(s) could be read; no shard written")
        return {"shards": [str(p) for p in self.shards]}

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
        log.info("rank %d finished the cache in %s", self.dist.rank, self.run_dir)

    def cleanup(self) -> None:
        self.logger.close()
        distributed.cleanup()
