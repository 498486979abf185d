"""Latents at rest: the shards ``cache-latents`` writes, read back as a training set, and the latent
statistics a generator is trained on (kept in its run folder, where ``sample`` reads them).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from latentforge_core.checkpoint import load_checkpoint
from latentforge_core.errors import InputError
from latentforge_runner.config import ConfigError
from latentforge_runner.data import DataError, build_training_data, collate
from latentforge_tokenizers.stats import LatentStats, compute_latent_stats

log = logging.getLogger("latentforge")

STATS_FILE = "latent_stats.safetensors"  # in a generator's run folder: the statistics it was trained on


class LatentShards(torch.utils.data.Dataset):
    """Every shard of a folder in memory; items ``0…N−1`` are the images, ``N…2N−1`` (with ``flip``)
    their flipped copies, so the training sampler's shuffle — not a coin in ``__getitem__`` — picks
    the flip, and a resumed run sees the same items."""

    def __init__(self, folder: str | Path, flip: bool | None = True):
        """``flip=None``: include the flipped copies when the shards hold them."""
        paths = sorted(Path(folder).glob("shard-r*-*.safetensors"))
        if not paths:
            raise DataError(
                f"no latent shards (shard-r*-*.safetensors) found in {folder}; run cache-latents first"
            )
        parts: dict[str, list[torch.Tensor]] = {}
        keys = set()
        for path in paths:
            tensors, config = load_checkpoint(path)
            if config.get("kind") != "latent_cache":
                raise DataError(f"{path} is not a cache-latents shard (its metadata says {config})")
            keys.add(config["key"])
            self.tokenizer = config.get("tokenizer")
            for k, v in tensors.items():
                parts.setdefault(k, []).append(v)
        if len(keys) != 1:
            raise DataError(
                f"the shards in {folder} mix {sorted(keys)}; keep one tokenizer's cache per folder"
            )
        self.key = keys.pop()
        if flip is None:
            flip = f"{self.key}_flip" in parts
        if flip and f"{self.key}_flip" not in parts:
            raise DataError(
                f"the shards in {folder} hold no flipped copies; cache with flip=true or read with flip=False"
            )
        data = {k: torch.cat(v) for k, v in parts.items()}
        order = data["indices"].argsort()  # data set order, whatever the ranks and shards
        self.values = data[self.key][order]
        self.flipped = data[f"{self.key}_flip"][order] if flip else None
        self.labels, self.indices = data["labels"][order], data["indices"][order]

    def __len__(self) -> int:
        return len(self.labels) * (2 if self.flipped is not None else 1)

    def __getitem__(self, index: int) -> dict[str, Any]:
        n = len(self.labels)
        source = self.values if index < n else self.flipped
        return {self.key: source[index % n], "label": int(self.labels[index % n]), "index": index}

    def batch(self, indices) -> dict[str, Any]:
        """Gather a batch without a DataLoader (the shards live in memory)."""
        idx = torch.as_tensor(indices, dtype=torch.long)
        n = len(self.labels)
        both = self.values if self.flipped is None else torch.cat([self.values, self.flipped])
        return {self.key: both[idx], "label": self.labels[idx % n], "index": idx, "skipped": []}


# ------------------------------------------------------------------------------------------------
# Latent statistics
# ------------------------------------------------------------------------------------------------
def fit_latent_stats(tokenizer, dataset, num_batches: int, reduce: str, device: torch.device) -> int:
    """Set ``tokenizer``'s latent statistics from the first ``num_batches`` × 64 images (or cached
    latents, flips excluded); returns the count.  ``sample`` calls this too, so it recomputes exactly
    the statistics the generator was trained on."""
    cached = isinstance(dataset, LatentShards)
    n = min(len(dataset.values) if cached else len(dataset), num_batches * 64)
    skipped: list[str] = []  # unreadable images (none for cached latents)
    if cached:
        batches = (dataset.values[s : s + 64].to(device) for s in range(0, n, 64))
        encode = lambda z: z  # noqa: E731
    else:
        batches = (images.to(device) for images in _readable(dataset, n, skipped))
        encode = tokenizer.encode
    tokenizer.set_stats(compute_latent_stats(encode, batches, reduce=reduce))
    if skipped:
        log.warning("latent statistics: skipped %d unreadable image(s), first: %s", len(skipped), skipped[0])
    return n - len(skipped)


def _readable(dataset, n: int, skipped: list[str]) -> Iterator[torch.Tensor]:
    """Batches of 64 of the first ``n`` items, unreadable ones left out and listed in ``skipped``."""
    for start in range(0, n, 64):
        batch = collate([dataset[i] for i in range(start, min(start + 64, n))])
        skipped += batch["skipped"]
        if batch["image"] is not None:
            yield batch["image"]
    if len(skipped) == n:
        raise DataError(f"none of the first {n} images could be read for the latent statistics: {skipped[0]}")


def restore_latent_stats(
    tokenizer, run_dir: Path, dataset, num_batches: int, reduce: str, device: torch.device
) -> str:
    """Give ``tokenizer`` the statistics of the run in ``run_dir``: the file saved there, else the
    tokenizer's own, else computed on ``dataset`` (the callable returns it lazily); says which."""
    path = Path(run_dir) / STATS_FILE
    if path.is_file():
        tokenizer.set_stats(LatentStats.load(path))
        return f"read from {path}"
    if tokenizer.stats is not None:
        return "the tokenizer's own"
    n = fit_latent_stats(tokenizer, dataset(), num_batches, reduce, device)
    return f"computed (per {reduce}) on {n} images"


def restore_run_stats(tokenizer, run: Path, train: Any, name: str, device: torch.device) -> str:
    """The statistics a generator run (settings ``train``) trained on, for ``tokenizer`` (registry
    ``name``): the run's file, the tokenizer's own, or recomputed as the run did (the same images, the
    same reduction) for a run that has neither."""
    d, e = train.data, train.eval
    if not (run / STATS_FILE).is_file() and tokenizer.stats is None:
        log.info("%s holds no %s: recomputing the latent statistics as its training run did", run, STATS_FILE)
    dataset = lambda: build_training_data(d, train.tokenizer.name, train.training.seed)  # noqa: E731
    try:
        return restore_latent_stats(tokenizer, run, dataset, e.stats_batches, e.stats_reduce, device)
    except InputError as err:  # statistics of another latent shape
        raise ConfigError(
            f"tokenizer {name!r} does not fit the statistics of {run / STATS_FILE}: {err} (a tokenizer "
            "override must give the latents the generator was trained on)"
        ) from err
