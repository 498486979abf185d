"""Latents at rest: the memory-mapped file ``cache-latents`` writes (or its older shards), read back as a
training set, and the latent statistics a generator is trained on (kept in its run folder, where
``sample`` reads them).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from latentforge_core.checkpoint import load_checkpoint
from latentforge_core.errors import InputError
from latentforge_runner.config import ConfigError
from latentforge_runner.data import DataError, build_training_data, collate
from latentforge_tokenizers.stats import LatentStats, compute_latent_stats

log = logging.getLogger("latentforge")

STATS_FILE = "latent_stats.safetensors"  # in a generator's run folder: the statistics it was trained on


# ------------------------------------------------------------------------------------------------
# The memory-mapped cache file
# ------------------------------------------------------------------------------------------------
# One file per split: MAGIC, the header's length (uint64), the JSON header, then at HEADER_ALIGN the
# sections it lists (values, flipped copies, labels, data set indices, a status byte per row), each a
# plain little-endian array: read at random through numpy.memmap, nothing unpickled, nothing opened per
# item.  bfloat16 latents are stored as int16 bits (numpy has no bfloat16).
MAGIC = b"LFLATENT"
HEADER_ALIGN = 4096
PENDING, WRITTEN, UNREADABLE = 0, 1, 2  # a row's status: not yet encoded, written, image unreadable
STORED = {"float32": "float32", "float16": "float16", "bfloat16": "int16", "int64": "int64"}


def cache_path(folder: str | Path, split: str) -> Path:
    return Path(folder) / f"latents-{split}.lfcache"


def cache_header(rows: int, shape: tuple[int, ...], dtype: str, flip: bool, **meta: Any) -> dict[str, Any]:
    """The header of a cache of ``rows`` items of ``shape`` stored as ``dtype``: ``meta`` (what was
    encoded, and how) plus each section's ``[offset from the data start, numpy dtype, shape]``."""
    sections: dict[str, list] = {}
    offset = 0
    parts = [("values", STORED[dtype], [rows, *shape])]
    parts += [("flipped", STORED[dtype], [rows, *shape])] if flip else []
    parts += [("labels", "int64", [rows]), ("indices", "int64", [rows]), ("status", "uint8", [rows])]
    for name, stored, dims in parts:
        sections[name] = [offset, stored, dims]
        offset += -(-np.dtype(stored).itemsize * math.prod(dims) // 64) * 64  # 64-byte aligned
    layout = {"dtype": dtype, "shape": list(shape), "rows": rows, "flip": flip, "data_bytes": offset}
    return {"kind": "latent_cache", "format": 1, **layout, "sections": sections, **meta}


def create_cache_file(path: Path, header: dict[str, Any]) -> None:
    """An empty cache file of the full size (sparse: every row pending)."""
    blob = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(MAGIC + len(blob).to_bytes(8, "little") + blob)
        f.truncate(_data_start(len(blob)) + header["data_bytes"])


def _data_start(header_length: int) -> int:
    """Where the sections start: the magic, the length and the header, rounded up to HEADER_ALIGN."""
    return -(-(16 + header_length) // HEADER_ALIGN) * HEADER_ALIGN


def read_cache_header(path: Path) -> tuple[dict[str, Any], int]:
    """The header of a cache file and where its data starts; DataError for anything but a whole one."""
    try:
        with open(path, "rb") as f:
            head = f.read(16)
            length = int.from_bytes(head[8:], "little")
            if head[:8] != MAGIC or not 0 < length < 1 << 24:
                raise DataError(f"{path} is not a cache-latents file (no {MAGIC.decode()} header)")
            header = json.loads(f.read(length))
        sections, data_bytes = header["sections"], int(header["data_bytes"])
    except (OSError, ValueError, KeyError, TypeError) as err:  # unreadable, not JSON, fields missing
        raise DataError(
            f"{path} has a corrupt header ({type(err).__name__}: {err}); run cache-latents again"
        ) from err
    start = _data_start(length)
    size = path.stat().st_size
    if size != start + data_bytes or not {"values", "labels", "indices", "status"} <= set(sections):
        raise DataError(
            f"{path} is truncated or corrupt: {size} bytes, but its header describes {start + data_bytes}; "
            "run cache-latents again to rewrite it"
        )
    return header, start


def map_cache_file(path: Path, mode: str = "c") -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The header and every section of a cache file as memory maps (``mode`` ``c``: read, copy on
    write; ``r+``: write through)."""
    header, start = read_cache_header(path)
    arrays = {
        name: np.memmap(path, dtype=stored, mode=mode, offset=start + offset, shape=tuple(dims))
        for name, (offset, stored, dims) in header["sections"].items()
    }
    return header, arrays


# ------------------------------------------------------------------------------------------------
# Cached latents as a training set
# ------------------------------------------------------------------------------------------------
class LatentShards(torch.utils.data.Dataset):
    """The latents ``cache-latents`` wrote in ``folder``: its memory-mapped file of ``split``, or the
    safetensors shards of earlier versions (read into memory).  Items ``0…N−1`` are the images,
    ``N…2N−1`` (with ``flip``) their flipped copies, so the training sampler's shuffle — not a coin in
    ``__getitem__`` — picks the flip, and a resumed run sees the same items.  Latents are served as
    float32 whatever their stored dtype."""

    def __init__(self, folder: str | Path, flip: bool | None = True, split: str = "train"):
        """``flip=None``: include the flipped copies when the cache holds them."""
        self.folder, self.split, self.want_flip = Path(folder), split, flip
        self.rows: torch.Tensor | None = None  # file rows of the items, when unreadable images left holes
        path = cache_path(folder, split)
        if path.is_file():
            self._map(path)
        elif path.with_name(path.name + ".partial").is_file():
            raise DataError(
                f"the cache in {folder} is unfinished (only {path.name}.partial): run cache-latents again "
                "with the same settings to complete it"
            )
        else:
            self._load_shards()

    def _map(self, path: Path) -> None:
        header, arrays = map_cache_file(path)
        if header.get("kind") != "latent_cache":
            raise DataError(f"{path} is not a cache-latents file (its header says {header.get('kind')!r})")
        status = arrays["status"]
        if (status == PENDING).any():
            raise DataError(
                f"{path} is unfinished ({int((status == PENDING).sum())} rows never written): run "
                "cache-latents again to complete it"
            )
        self.key, self.tokenizer = header["key"], header["tokenizer"]
        flip = self._check_flip("flipped" in arrays, self.folder)

        def tensor(array: np.ndarray) -> torch.Tensor:
            t = torch.from_numpy(array)  # shares the map: nothing read until indexed
            return t.view(torch.bfloat16) if header["dtype"] == "bfloat16" else t

        self.values = tensor(arrays["values"])  # rows, *shape
        self.flipped = tensor(arrays["flipped"]) if flip else None
        good = status == WRITTEN
        self.labels = torch.from_numpy(np.array(arrays["labels"][good]))
        self.indices = torch.from_numpy(np.array(arrays["indices"][good]))
        if not good.all():
            self.rows = torch.from_numpy(np.flatnonzero(good))
        if len(self.labels) and (self.labels.min() < 0 or (self.indices.diff() <= 0).any()):
            raise DataError(f"{path} is corrupt: negative labels or unordered indices")

    def _load_shards(self) -> None:
        paths = sorted(self.folder.glob("shard-r*-*.safetensors"))
        if not paths:
            raise DataError(
                f"no latent cache ({cache_path(self.folder, self.split).name}) and no latent shards "
                f"(shard-r*-*.safetensors) found in {self.folder}; run cache-latents first"
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
                f"the shards in {self.folder} mix {sorted(keys)}; keep one tokenizer's cache per folder"
            )
        self.key = keys.pop()
        flip = self._check_flip(f"{self.key}_flip" in parts, self.folder)
        data = {k: torch.cat(v) for k, v in parts.items()}
        order = data["indices"].argsort()  # data set order, whatever the ranks and shards
        self.values = data[self.key][order]
        self.flipped = data[f"{self.key}_flip"][order] if flip else None
        self.labels, self.indices = data["labels"][order], data["indices"][order]

    def _check_flip(self, stored: bool, where: Path) -> bool:
        flip = stored if self.want_flip is None else self.want_flip
        if flip and not stored:
            raise DataError(
                f"the cache in {where} holds no flipped copies; cache with flip=true or read with flip=False"
            )
        return flip

    # A memory-mapped cache travels to loader workers as its path and is mapped again there.
    def __getstate__(self) -> dict[str, Any]:
        if cache_path(self.folder, self.split).is_file():
            return {"folder": self.folder, "split": self.split, "want_flip": self.want_flip}
        return self.__dict__

    def __setstate__(self, state: dict[str, Any]) -> None:
        if "values" in state:
            self.__dict__.update(state)
        else:
            self.__init__(state["folder"], state["want_flip"], state["split"])

    def __len__(self) -> int:
        return len(self.labels) * (2 if self.flipped is not None else 1)

    def __getitem__(self, index: int) -> dict[str, Any]:
        batch = self.batch([index])
        return {self.key: batch[self.key][0], "label": int(batch["label"][0]), "index": index}

    def batch(self, indices) -> dict[str, Any]:
        """Gather a batch without a DataLoader: rows ``indices mod N``, the flipped copy from ``N`` on."""
        idx = torch.as_tensor(indices, dtype=torch.long)
        n = len(self.labels)
        item = idx % n
        rows = item if self.rows is None else self.rows[item]
        values = self.values[rows]  # B, *shape: read from the map (a copy)
        if self.flipped is not None and (idx >= n).any():
            values[idx >= n] = self.flipped[rows[idx >= n]]
        if values.is_floating_point():
            values = values.float()
        return {self.key: values, "label": self.labels[item], "index": idx, "skipped": []}


# ------------------------------------------------------------------------------------------------
# Latent statistics
# ------------------------------------------------------------------------------------------------
def fit_latent_stats(tokenizer, dataset, num_batches: int, reduce: str, device: torch.device) -> int:
    """Set ``tokenizer``'s latent statistics from the first ``num_batches`` × 64 images (or cached
    latents, flips excluded); returns the count.  ``sample`` calls this too, so it recomputes exactly
    the statistics the generator was trained on."""
    cached = isinstance(dataset, LatentShards)
    n = min(len(dataset.labels) if cached else len(dataset), num_batches * 64)
    skipped: list[str] = []  # unreadable images (none for cached latents)
    if cached:
        batches = (dataset.batch(range(s, min(s + 64, n)))[dataset.key].to(device) for s in range(0, n, 64))
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
