"""Data: ImageNet-layout folders, WebDataset shards and Hugging Face datasets with the seeds' crops and
flips, the embedded digits, a resumable sampler.

Every image leaves here as a float tensor in [0, 1] ``[3, H, W]`` with an int64 label; components
apply their own preprocessing.  Training augmentation is the seeds' own: the ADM center crop (RAE
stage 2, LightningDiT) or a bicubic resize of the short side then a random crop (DiGIT, VA-VAE, the
RAE decoder), with an optional horizontal flip; its randomness is drawn from ``(seed, epoch,
index)``, so a resumed run and any number of loader workers see the same crops.  An unreadable
image is skipped, counted and reported (the batch carries the paths it dropped) instead of stopping
a long run.  The batch sampler's order depends
only on ``(seed, epoch)``, so its position is two integers a checkpoint can store.  Every image source
is a map-style data set indexed by sample (tar shards through an index of member offsets built when
they are opened, ``datasets`` through its arrow table), so that position means the same images for
every source.
"""

from __future__ import annotations

import glob
import io
import logging
import math
import os
import tarfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from latentforge_core.errors import LatentforgeError
from latentforge_metrics.npz import ReferenceFileError, iter_npz_images, load_reference
from latentforge_runner.config import ConfigError, SettingError, Settings, setting, settings

log = logging.getLogger("latentforge")

CROPS = (
    "center",
    "random",
    "resize",
)  # ADM's center crop; short side → resize, random crop; torchvision Resize+CenterCrop
# What PIL raises on a corrupt, truncated, unknown or oversized (decompression-bomb) image file.
UNREADABLE = (OSError, UnidentifiedImageError, Image.DecompressionBombError, ValueError, SyntaxError)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".JPEG")


class DataError(LatentforgeError, ValueError):
    """A data set that cannot serve a run (empty folder, wrong layout, bad arguments)."""


@settings
class DataSettings(Settings):
    """The ``data`` block of every recipe that reads a data set."""

    # embedded digits, image folder, cached latents, WebDataset .tar shards, Hugging Face datasets
    name: Literal["digits", "folder", "latents", "webdataset", "hf-datasets"] = "folder"
    # folder: ImageNet layout root/<class>/*.JPEG; latents: a cache-latents folder; webdataset: a folder
    # of .tar shards, one .tar or a pattern (shard-{000..099}.tar); hf-datasets: a save_to_disk folder,
    # .parquet files or hf:<org>/<repo>
    root: str | None = None
    # hf-datasets: the split to read (a DatasetDict's key, parquet <split>-*.parquet); latents: its cache file
    split: str = "train"
    image_column: str = "image"  # hf-datasets: the column of encoded images (ImageNet-1k: image)
    label_column: str = "label"  # hf-datasets: the column of class indices (ImageNet-1k: label)
    image_size: int = setting(256, ge=1)  # pixels on each side of a training image
    num_classes: int = setting(1000, ge=1)  # classes the generator is conditioned on
    crop: Literal["center", "random"] = "center"  # ADM center crop, or short side → resize, random crop
    resize: int | None = setting(None, ge=1)  # random crop: short side goes to this first (None: image_size)
    flip: bool = False  # random horizontal flip (RAE stage 2, LightningDiT, DiGIT)
    limit: int | None = setting(None, ge=1)  # train on the first ``limit`` images only (tiny runs)

    def __attrs_post_init__(self):
        if self.resize is not None and self.resize < self.image_size:
            raise SettingError(
                "resize", f"resize {self.resize} is smaller than image_size {self.image_size}: expected ≥ it"
            )


def build_training_data(d: DataSettings, tokenizer: str, seed: int):
    """Images (``digits``, ``folder``, ``webdataset``, ``hf-datasets``, augmented by ``seed``) or the
    latent shards of ``tokenizer``."""
    if d.name != "latents":
        images = build_images(d, crop=d.crop, resize=d.resize, flip=d.flip, seed=seed)
        check_classes(images, d)
        if d.limit is None or d.limit >= len(images):
            return images
        return torch.utils.data.Subset(images, range(d.limit))
    from latentforge_runner.latents import LatentShards  # it reads shards with DataError from here

    if not d.root:
        raise DataError("data.name 'latents' needs data.root: a folder written by cache-latents")
    if d.limit is not None:
        raise DataError(
            "data.limit applies to images: cache fewer of them instead (cache-latents max_images=…)"
        )
    shards = LatentShards(d.root, flip=None, split=d.split)
    if shards.tokenizer != tokenizer:
        raise DataError(
            f"the cache in {d.root} holds latents of tokenizer {shards.tokenizer!r}, but this run's "
            f"tokenizer is {tokenizer!r}; cache them with the same tokenizer"
        )
    return check_classes(shards, d)


def build_images(d: DataSettings, split: str | None = None, **augment: Any):
    """The images of the ``data`` block, for every recipe that reads them: hf-datasets' ``data.split``
    with ``data.image_column``/``data.label_column``; ``split`` (default ``train``) picks the digits'
    split, or another hf-datasets split than ``data.split`` (a held-out one); ``augment`` =
    ImageFolder's crop/flip."""
    if d.name == "latents":
        raise DataError("data.name 'latents' holds cached latents, no images: this recipe reads images")
    if d.name == "hf-datasets":
        augment |= dict(image_column=d.image_column, label_column=d.label_column)
        split = split or d.split
    return build_dataset(d.name, split=split or "train", image_size=d.image_size, root=d.root, **augment)


def check_classes(dataset, d: DataSettings):
    """``dataset`` when its labels fit ``data.num_classes``: a label ≥ ``num_classes`` would silently
    train as the generators' null (unconditional) class."""
    if isinstance(dataset, ImageFolder):
        found, where = (
            max(1, len(dataset.classes)),
            f"data.root {d.root} has {len(dataset.classes)} class folders",
        )
    else:
        found = int(dataset.labels.max()) + 1 if len(dataset.labels) else 0
        where = f"data.name {d.name!r} has labels up to {found - 1}"
    if found > d.num_classes:
        raise DataError(
            f"{where}, but data.num_classes is {d.num_classes}: expected data.num_classes ≥ {found} "
            f"(set data.num_classes={found})"
        )
    return dataset


# ------------------------------------------------------------------------------------------------
# ADM center crop
# ------------------------------------------------------------------------------------------------
def center_crop_arr(image: Image.Image, size: int) -> np.ndarray:
    """ADM's crop: halve with BOX while the short side is ≥ 2·size, BICUBIC to size, crop the centre."""
    while min(image.size) >= 2 * size:
        image = image.resize(tuple(s // 2 for s in image.size), resample=Image.BOX)
    scale = size / min(image.size)
    image = image.resize(tuple(round(s * scale) for s in image.size), resample=Image.BICUBIC)
    arr = np.asarray(image)
    top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return arr[top : top + size, left : left + size]


def resize_center_crop_arr(image: Image.Image, size: int) -> np.ndarray:
    """torchvision's ``Resize(size)`` (bilinear, short side to ``size``) then ``CenterCrop(size)``: how
    DiGIT prepares its ImageNet-val reference (``prepare_imgnet_val.py``)."""
    w, h = image.size
    short, long = (w, h) if w <= h else (h, w)
    long = int(size * long / short)
    image = image.resize((size, long) if w <= h else (long, size), resample=Image.BILINEAR)
    arr = np.asarray(image)
    top, left = round((arr.shape[0] - size) / 2), round((arr.shape[1] - size) / 2)
    return arr[top : top + size, left : left + size]


def random_crop_arr(image: Image.Image, size: int, resize: int, rng: np.random.Generator) -> np.ndarray:
    """torchvision's ``Resize(resize, bicubic)`` then ``RandomCrop(size)``: short side to ``resize``."""
    scale = resize / min(image.size)
    image = image.resize(tuple(max(resize, round(s * scale)) for s in image.size), resample=Image.BICUBIC)
    arr = np.asarray(image)
    top = int(rng.integers(0, arr.shape[0] - size + 1))
    left = int(rng.integers(0, arr.shape[1] - size + 1))
    return arr[top : top + size, left : left + size]


def to_tensor(arr: np.ndarray) -> torch.Tensor:
    """uint8 ``[H, W, 3]`` → contiguous float ``[3, H, W]`` in [0, 1].

    The channels move while the pixels are bytes (a quarter of the floats' memory), so the float
    conversion and the division run on contiguous memory: 2–4× faster per image than converting a
    permuted view, and the batch stacks from contiguous items."""
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1))).float().div_(255.0)


# ------------------------------------------------------------------------------------------------
# Image folders
# ------------------------------------------------------------------------------------------------
class AugmentedImages(torch.utils.data.Dataset):
    """The seeds' training augmentation of encoded images, shared by every image source.

    ``crop="center"`` is ADM's center crop, ``"resize"`` torchvision's Resize + CenterCrop, ``"random"``
    resizes the short side to ``resize`` (default ``image_size``) and crops at random; ``flip`` mirrors
    half the images.  The randomness is drawn from ``(seed, epoch, index)``; the training loop calls
    :meth:`set_epoch` so each epoch draws new crops.
    """

    def __init__(self, image_size: int, crop: str, resize: int | None, flip: bool, seed: int):
        self.image_size = image_size
        if crop not in CROPS:
            raise DataError(f"unknown crop {crop!r}: expected one of {', '.join(CROPS)}")
        self.resize = image_size if resize is None else resize
        if self.resize < image_size:
            raise DataError(
                f"resize {self.resize} is smaller than the crop {image_size}: expected resize ≥ crop"
            )
        self.crop, self.flip, self.seed, self.epoch = crop, flip, seed, 0
        self.warned_small = False

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def augment(self, source: Any, where: str, label: int, index: int) -> dict[str, Any]:
        """The item of ``index``: the image ``source`` (a path or a binary file) decoded, cropped and
        flipped, or an error record naming ``where`` when it cannot be decoded."""
        rng = np.random.default_rng((self.seed, self.epoch, index))
        try:
            with Image.open(source) as img:
                if min(img.size) < self.image_size and not self.warned_small:
                    self.warned_small = True  # once per process: a loader worker has its own copy
                    log.warning(
                        "%s is %dx%d, smaller than the %d-pixel crop: such images are upscaled (expected "
                        "images at least data.image_size on the short side)",
                        where, *img.size, self.image_size,
                    )  # fmt: skip
                if self.crop == "center":
                    arr = center_crop_arr(img.convert("RGB"), self.image_size)
                elif self.crop == "resize":
                    arr = resize_center_crop_arr(img.convert("RGB"), self.image_size)
                else:
                    arr = random_crop_arr(img.convert("RGB"), self.image_size, self.resize, rng)
        except UNREADABLE as err:
            return {"error": f"{where}: {type(err).__name__}: {err}"}
        if self.flip and rng.random() < 0.5:
            arr = arr[:, ::-1]
        return {"image": to_tensor(arr), "label": label, "index": index}


class ImageFolder(AugmentedImages):
    """``root/<class>/*.jpg`` (ImageNet layout) or a flat folder of images (label 0).

    Classes are the sorted sub-folder names.  An image that fails to decode yields an error record;
    :func:`collate` drops it and keeps its path for the count.  ``crop="random"`` resizes the short
    side to ``resize`` (default ``image_size``) and crops at random; ``flip`` mirrors half the images.
    The training loop calls :meth:`set_epoch` so each epoch draws new crops.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        image_size: int,
        *,
        crop: str = "center",
        resize: int | None = None,
        flip: bool = False,
        seed: int = 0,
    ):
        self.root = Path(root)
        super().__init__(image_size, crop, resize, flip, seed)
        if self.root.is_file():
            raise DataError(
                f"data folder {self.root} is a file: expected a folder of images (root/<class>/*.jpg)"
            )
        if not self.root.is_dir():
            raise DataError(f"data folder not found: {self.root}")
        subdirs = sorted(p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if subdirs:
            self.classes = [p.name for p in subdirs]
            files = [(f, i) for i, d in enumerate(subdirs) for f in sorted(_images(d))]
        else:
            self.classes = []
            files = [(f, 0) for f in sorted(_images(self.root))]
        if not files:
            raise DataError(
                f"no images found under {self.root}: expected root/<class>/*.jpg (ImageNet layout) or "
                f"image files directly in the folder, with suffixes {', '.join(IMAGE_SUFFIXES[:-1])}"
            )
        self.samples = files

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        path, label = self.samples[index]
        return self.augment(path, str(path), label, index)


def _images(folder: Path) -> Iterator[Path]:
    return (p for p in folder.rglob("*") if p.suffix in IMAGE_SUFFIXES or p.suffix.lower() in IMAGE_SUFFIXES)


def collate(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stack the good items; ``skipped`` lists what could not be read."""
    good = [it for it in items if "error" not in it]
    skipped = [it["error"] for it in items if "error" in it]
    if not good:
        return {"image": None, "label": None, "index": None, "skipped": skipped}
    return {
        "image": torch.stack([it["image"] for it in good]),
        "label": torch.tensor([it["label"] for it in good], dtype=torch.long),
        "index": torch.tensor([it["index"] for it in good], dtype=torch.long),
        "skipped": skipped,
    }


# ------------------------------------------------------------------------------------------------
# WebDataset tar shards, read by sample index
# ------------------------------------------------------------------------------------------------
# Member suffixes that hold an encoded image, in the order one is chosen when a sample has several.
WDS_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "ppm", "pgm", "pnm", "tif", "tiff")
WDS_LABEL_EXT = "cls"  # the class index as text, as in the WebDataset ImageNet shards


def expand_braces(pattern: str) -> list[str]:
    """WebDataset's shard pattern: ``a-{000..009}.tar`` (numeric range, zero-padded as written) and
    ``{train,val}`` lists, several braces multiplied out left to right."""
    start = pattern.find("{")
    if start < 0:
        return [pattern]
    end = pattern.find("}", start)
    if end < 0:
        raise DataError(f"shard pattern {pattern!r} has an unclosed '{{'")
    body, head, tail = pattern[start + 1 : end], pattern[:start], pattern[end + 1 :]
    if ".." in body and "," not in body:
        lo, hi = body.split("..", 1)
        if not (lo.isdigit() and hi.isdigit()) or int(hi) < int(lo):
            raise DataError(
                f"shard pattern {pattern!r}: expected {{first..last}} with first ≤ last, digits only"
            )
        width = len(lo) if lo.startswith("0") else 0
        choices = [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
    else:
        choices = body.split(",")
    return [head + c + rest for c in choices for rest in expand_braces(tail)]


def shard_paths(root: str) -> list[Path]:
    """The ``.tar`` shards ``root`` names: a folder (its ``*.tar``, sorted), one file, a brace pattern or
    a glob (in sorted order)."""
    if "://" in root or root.startswith(("pipe:", "hf:")):
        raise DataError(
            f"data.root {root!r} is a remote source: data.name 'webdataset' reads local .tar shards by "
            "offset (exact resume needs random access); download them first"
        )
    path = Path(root)
    if path.is_dir():
        found = sorted(p for p in path.iterdir() if p.name.endswith(".tar") and p.is_file())
        if not found:
            kinds = sorted({p.suffix or p.name for p in path.iterdir()})[:6]
            raise DataError(
                f"no .tar shards in {root} (it holds {', '.join(kinds) or 'nothing'}): expected WebDataset "
                "shards <name>.tar (write them with `latentforge run write-shards`)"
            )
        return found
    if "{" in root:
        found = [Path(p) for p in expand_braces(root)]
    elif any(c in root for c in "*?["):
        found = sorted(Path(p) for p in glob.glob(root))
        if not found:
            raise DataError(f"no shards match {root!r}: expected .tar files")
    else:
        found = [path]
    missing = [str(p) for p in found if not p.is_file()]
    if missing:
        raise DataError(
            f"{len(missing)} of the {len(found)} shard(s) data.root {root!r} names do not exist, first: "
            f"{missing[0]} (expected a folder of .tar shards, a .tar file or a pattern like "
            "shard-{000..009}.tar)"
        )
    return found


def _wds_split(name: str) -> tuple[str, str]:
    """WebDataset's key and suffix of a member: the path up to the first dot of its base name."""
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), (ext.lower() if dot else "")


class WebDatasetShards(AugmentedImages):
    """WebDataset ``.tar`` shards as a map-style data set: sample ``i`` is the ``i``-th key in shard order.

    Opening scans every shard's headers with :mod:`tarfile` and keeps, per sample, its shard, the
    offset and size of its image member (``<key>.jpg``, ``.png``, … see :data:`WDS_IMAGE_EXTS`) and its
    label (``<key>.cls``, read now, so the labels are known before training).  An item reads its image
    by offset, so a resumed run, any number of loader workers and any number of processes see the
    same samples.  A sample without a readable label or image, or whose image does not decode, yields
    an error record naming the shard and member (skipped and counted, like an unreadable file).  The
    shards must be uncompressed (``.tar``); classes are the lines of ``classes.txt`` beside them when
    present.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        image_size: int,
        *,
        crop: str = "center",
        resize: int | None = None,
        flip: bool = False,
        seed: int = 0,
    ):
        super().__init__(image_size, crop, resize, flip, seed)
        self.root = str(root)
        self.shards = shard_paths(self.root)
        shard: list[int] = []
        offset: list[int] = []
        size: list[int] = []
        labels: list[int] = []
        members: list[str] = []
        self.problems: dict[int, str] = {}  # sample → why it cannot be used (no label, no image, …)
        for s, path in enumerate(self.shards):
            for key, image, label, why in _scan_shard(path):
                if why is not None:
                    self.problems[len(labels)] = why
                shard.append(s)
                offset.append(image[0] if image else -1)
                size.append(image[1] if image else 0)
                members.append(image[2] if image else key)
                labels.append(-1 if label is None else label)
        if not labels:
            raise DataError(f"the shards of {self.root} hold no samples: expected <key>.jpg/.png + <key>.cls")
        if self.problems:
            first = next(iter(self.problems.values()))
            log.warning(
                "%d of the %d samples in %s cannot be used and will be skipped, first: %s",
                len(self.problems), len(labels), self.root, first,
            )  # fmt: skip
        self.shard = np.asarray(shard, dtype=np.int32)
        self.offset = np.asarray(offset, dtype=np.int64)
        self.size = np.asarray(size, dtype=np.int64)
        # Fixed-width bytes: no per-item Python objects to copy into forked loader workers.
        self.members = np.asarray([m.encode() for m in members], dtype=np.bytes_)
        self.labels = torch.as_tensor(labels, dtype=torch.long)
        names = self.shards[0].parent / "classes.txt"
        self.classes = names.read_text().split("\n")[:-1] if names.is_file() else []

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, Any]:
        path = self.shards[int(self.shard[index])]
        where = f"{path}:{self.members[index].decode()}"
        if index in self.problems:
            return {"error": self.problems[index]}
        try:
            with open(path, "rb") as f:  # opened per item: no file offset shared by forked workers
                f.seek(int(self.offset[index]))
                data = f.read(int(self.size[index]))
        except OSError as err:
            return {"error": f"{where}: {type(err).__name__}: {err}"}
        if len(data) != self.size[index]:
            return {"error": f"{where}: the shard ends inside the member (truncated since it was opened?)"}
        return self.augment(io.BytesIO(data), where, int(self.labels[index]), index)


def _scan_shard(path: Path) -> Iterator[tuple[str, tuple[int, int, str] | None, int | None, str | None]]:
    """``(key, (offset, size, member) of its image or None, label or None, why it is unusable or None)``
    of every sample of one shard, in the order its keys first appear."""
    samples: dict[str, dict[str, tuple[int, int, str]]] = {}
    try:
        with tarfile.open(path, "r:") as tar:
            for m in tar:
                name = m.name.removeprefix("./")
                if not m.isfile() or name.startswith(".") or "/." in name:
                    continue
                key, ext = _wds_split(name)
                samples.setdefault(key, {})[ext] = (m.offset_data, m.size, name)
    except tarfile.ReadError as err:
        raise DataError(
            f"shard {path} is not an uncompressed tar file ({err}): expected WebDataset .tar shards "
            "(compressed shards cannot be read by offset; decompress them)"
        ) from err
    except (tarfile.TarError, OSError) as err:
        raise DataError(f"shard {path} cannot be read: {type(err).__name__}: {err}") from err
    with open(path, "rb") as f:
        for key, parts in samples.items():
            image = next((parts[e] for e in WDS_IMAGE_EXTS if e in parts), None)
            label, why = None, None
            if WDS_LABEL_EXT in parts:
                offset, size, name = parts[WDS_LABEL_EXT]
                f.seek(offset)
                text = f.read(size)
                try:
                    label = int(text.decode().strip())
                except (UnicodeDecodeError, ValueError):
                    why = f"{path}:{name}: the label is {text[:20]!r}, expected a class index like b'3'"
            else:
                why = f"{path}:{key}: no {key}.{WDS_LABEL_EXT} (the class index) in the shard"
            if image is None:
                found = ", ".join(sorted(parts)) or "nothing"
                why = (
                    f"{path}:{key}: no image member (found .{found}; expected one of "
                    f".{', .'.join(WDS_IMAGE_EXTS[:4])}, …)"
                )
            yield key, image, label, why


# ------------------------------------------------------------------------------------------------
# Hugging Face datasets: a save_to_disk folder, parquet files or a hub repository
# ------------------------------------------------------------------------------------------------
class HFImages(AugmentedImages):
    """A Hugging Face ``datasets`` split with an image column and an integer label column (the ImageNet-1k
    schema: ``image`` + ``label``), indexed by row.

    ``root`` is a ``save_to_disk`` folder (a ``Dataset`` or a ``DatasetDict``: ``split`` picks one),
    ``.parquet`` files (one file, a folder — its ``<split>-*.parquet`` names give the splits, as on the
    hub — or a glob), or ``hf:<org>/<repo>`` (``datasets.load_dataset``: the hub, or its local cache
    offline).  The arrow table stays memory-mapped and images are decoded here, from their bytes, with
    the same crops and flips as image folders; an image that does not decode yields an error record
    (skipped and counted).  ``datasets`` is imported only here.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        image_size: int,
        *,
        split: str = "train",
        image_column: str = "image",
        label_column: str = "label",
        crop: str = "center",
        resize: int | None = None,
        flip: bool = False,
        seed: int = 0,
    ):
        super().__init__(image_size, crop, resize, flip, seed)
        try:
            import datasets
        except ImportError as err:
            raise DataError(
                "data.name 'hf-datasets' needs the Hugging Face datasets package: pip install datasets"
            ) from err
        self.root, self.split = str(root), split
        ds = _load_hf(self.root, split)
        columns = list(ds.column_names)
        missing = [c for c in (image_column, label_column) if c not in columns]
        if missing:
            raise DataError(
                f"the {split!r} split of {self.root} has the columns {columns}, but not "
                f"{' and '.join(map(repr, missing))}: expected an image column (data.image_column, now "
                f"{image_column!r}) and an integer label column (data.label_column, now {label_column!r}), "
                "as in ImageNet-1k's image + label; set those keys to the columns that hold them"
            )
        feature = ds.features[image_column]
        if not (
            isinstance(feature, datasets.Image)
            or (isinstance(feature, datasets.Value) and feature.dtype in ("binary", "large_binary"))
        ):
            raise DataError(
                f"column {image_column!r} of {self.root} is {feature}: expected encoded images "
                "(datasets.Image, or binary bytes of a PNG/JPEG file)"
            )
        label = ds.features[label_column]
        labels = ds.with_format("numpy", columns=[label_column])[label_column]
        if not np.issubdtype(np.asarray(labels).dtype, np.integer):
            raise DataError(
                f"column {label_column!r} of {self.root} is {label}: expected integer class indices"
            )
        if len(labels) == 0:
            raise DataError(f"the {split!r} split of {self.root} has no rows")
        self.labels = torch.as_tensor(np.asarray(labels), dtype=torch.long)
        self.classes = list(label.names) if isinstance(label, datasets.ClassLabel) else []
        self.images = ds.with_format("arrow", columns=[image_column])  # rows as arrow: nothing decoded

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, Any]:
        where = f"{self.root}[{self.split}][{index}]"
        cell = self.images[index].column(0)[0].as_py()
        if isinstance(cell, dict):  # datasets.Image's storage: {"bytes": …, "path": …}
            data, path = cell.get("bytes"), cell.get("path")
            if data is None and path:
                return self.augment(path, f"{where} ({path})", int(self.labels[index]), index)
        else:
            data = cell
        if not data:
            return {"error": f"{where}: the image cell is empty"}
        return self.augment(io.BytesIO(data), where, int(self.labels[index]), index)


HF_SAVED = ("dataset_info.json", "dataset_dict.json", "state.json")  # what save_to_disk writes


def _load_hf(root: str, split: str):
    import datasets

    try:
        if root.startswith("hf:"):
            return datasets.load_dataset(root.removeprefix("hf:"), split=split)
        path = Path(root)
        if path.is_dir() and any((path / f).is_file() for f in HF_SAVED):
            loaded = datasets.load_from_disk(str(path))
            if isinstance(loaded, datasets.DatasetDict):
                if split not in loaded:
                    raise DataError(
                        f"{root} holds the splits {list(loaded)}: data.split {split!r} is not one of them"
                    )
                return loaded[split]
            return loaded
        if path.is_dir():
            if not any(path.rglob("*.parquet")):
                raise DataError(
                    f"{root} is neither a save_to_disk folder (no {' or '.join(HF_SAVED[:2])}) nor a folder "
                    "of .parquet files: expected one of them, or hf:<org>/<repo>"
                )
            return datasets.load_dataset("parquet", data_dir=str(path), split=split)
        files = sorted(glob.glob(root)) if any(c in root for c in "*?[") else [root] if path.is_file() else []
        if not files:
            raise DataError(
                f"data.root {root} not found: expected a save_to_disk folder, .parquet files or "
                "hf:<org>/<repo>"
            )
        return datasets.load_dataset("parquet", data_files=files, split="train")
    except DataError:
        raise
    except (ValueError, FileNotFoundError, OSError) as err:  # an unknown split, an unreadable file, …
        raise DataError(
            f"data.root {root} (split {split!r}) cannot be loaded: {type(err).__name__}: {err}"
        ) from err


# ------------------------------------------------------------------------------------------------
# The embedded data set: scikit-learn's digits
# ------------------------------------------------------------------------------------------------
class Digits(torch.utils.data.Dataset):
    """scikit-learn's 1,797 8×8 digits as RGB images in [0, 1], upsampled to ``image_size``.

    A fixed stratified split (seed 0) gives ``train`` (80%) and ``test`` (20%); ``all`` is both.
    """

    num_classes = 10

    def __init__(self, split: str = "train", image_size: int = 16, channels: int = 3):
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        if split not in ("train", "test", "all"):
            raise DataError(f"digits split must be 'train', 'test' or 'all', got {split!r}")
        if image_size < 8:
            raise DataError(f"digits image_size must be ≥ 8, got {image_size}")
        digits = load_digits()
        images = torch.from_numpy(digits.images).float().div_(16.0).unsqueeze(1)  # [N, 1, 8, 8]
        labels = torch.from_numpy(digits.target).long()
        if split != "all":
            train_idx, test_idx = train_test_split(
                np.arange(len(labels)), test_size=0.2, random_state=0, stratify=digits.target
            )
            keep = torch.from_numpy(np.sort(train_idx if split == "train" else test_idx))
            images, labels = images[keep], labels[keep]
        if image_size != 8:
            images = torch.nn.functional.interpolate(
                images, size=image_size, mode="bilinear", align_corners=False
            )
        self.images = images.clamp_(0, 1).expand(-1, channels, -1, -1).contiguous()
        self.labels = labels
        self.classes = [str(i) for i in range(10)]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"image": self.images[index], "label": int(self.labels[index]), "index": index}

    def batch(self, indices: Sequence[int] | torch.Tensor) -> dict[str, Any]:
        """Gather a batch without a DataLoader (the data lives in memory)."""
        idx = torch.as_tensor(indices, dtype=torch.long)
        return {"image": self.images[idx], "label": self.labels[idx], "index": idx, "skipped": []}


def build_dataset(
    name: str, *, split: str = "train", image_size: int, root: str | None = None, **augment: Any
):
    """``digits``, ``folder`` (ImageNet layout at ``root``), ``webdataset`` (``.tar`` shards at ``root``) or
    ``hf-datasets`` (``split`` of the datasets at ``root``; ``augment`` may add ``image_column`` and
    ``label_column``); ``augment`` = ImageFolder's crop/flip."""
    if name == "digits":
        if augment.get("crop", "center") != "center" or augment.get("flip"):
            raise DataError(
                "crop/flip augmentation applies to image folders; the digits are used as they are "
                "(a mirrored digit is another glyph): set data.crop=center data.flip=false"
            )
        return Digits(split, image_size)
    if name == "folder":
        if not root:
            raise DataError("data.name 'folder' needs data.root: a folder in the ImageNet layout")
        return ImageFolder(root, image_size, **augment)
    if name in ("webdataset", "hf-datasets"):
        if not root:
            what = (
                "WebDataset .tar shards"
                if name == "webdataset"
                else "a datasets folder, parquet files or hf:<id>"
            )
            raise DataError(f"data.name {name!r} needs data.root: {what}")
        if name == "webdataset":
            return WebDatasetShards(root, image_size, **augment)
        return HFImages(root, image_size, split=split, **augment)
    raise DataError(
        f"unknown data set {name!r}: expected 'digits' (embedded), or 'folder', 'webdataset' or "
        "'hf-datasets' (these need data.root)"
    )


# ------------------------------------------------------------------------------------------------
# A batch sampler whose position is part of the checkpoint
# ------------------------------------------------------------------------------------------------
class ResumableBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Shuffled global batches, sharded across ranks, resumable from ``(epoch, batch)``.

    Epoch ``e`` uses ``randperm(n)`` seeded by ``seed + e``; global batch ``b`` is positions
    ``[b·B, (b+1)·B)`` of it and rank ``r`` of ``w`` takes the ``r``-th of ``w`` equal slices, so
    two ranks with B/2 each see exactly the images one process sees with B.  The last incomplete
    batch of an epoch is dropped.
    """

    def __init__(
        self,
        n: int,
        global_batch: int,
        *,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
    ):
        if global_batch % world_size:
            raise DataError(f"global batch {global_batch} is not divisible by {world_size} processes")
        if n < global_batch:
            raise DataError(f"the data set has {n} items, fewer than one global batch of {global_batch}")
        self.n, self.global_batch, self.seed = n, global_batch, seed
        self.rank, self.world_size, self.shuffle = rank, world_size, shuffle
        self.epoch, self.batch = 0, 0

    @property
    def batches_per_epoch(self) -> int:
        return self.n // self.global_batch

    def __len__(self) -> int:
        return self.batches_per_epoch - self.batch

    def __iter__(self) -> Iterator[list[int]]:
        if self.shuffle:
            order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        else:
            order = torch.arange(self.n)
        per_rank = self.global_batch // self.world_size
        for b in range(self.batch, self.batches_per_epoch):
            start = b * self.global_batch + self.rank * per_rank
            yield order[start : start + per_rank].tolist()

    def advance(self) -> None:
        """Record that one global batch was consumed (called by the training loop, not the loader)."""
        self.batch += 1
        if self.batch >= self.batches_per_epoch:
            self.epoch, self.batch = self.epoch + 1, 0

    def state_dict(self) -> dict[str, int]:
        return {
            "epoch": self.epoch,
            "batch": self.batch,
            "seed": self.seed,
            "n": self.n,
            "global_batch": self.global_batch,
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        for key in ("seed", "n", "global_batch"):
            if state[key] != getattr(self, key):
                raise DataError(
                    f"cannot resume the data position: the checkpoint's {key} is {state[key]}, this run's "
                    f"is {getattr(self, key)} (did the data set or batch size change?)"
                )
        self.epoch, self.batch = state["epoch"], state["batch"]


def epochs_for(steps: int, batches_per_epoch: int) -> int:
    return math.ceil(steps / max(batches_per_epoch, 1))


# ------------------------------------------------------------------------------------------------
# Image sources for evaluation: an .npz of samples or a folder
# ------------------------------------------------------------------------------------------------
STATISTICS_KEYS = {"mu", "sigma", "mu_s", "sigma_s"}


def reference_statistics(path: str | os.PathLike):
    """The statistics an ADM-style reference ``.npz`` holds, or None for a file of images only; a
    file that has statistics keys but malformed values is an error, not a file of images."""
    try:
        return load_reference(path)
    except ReferenceFileError:
        with np.load(path, allow_pickle=False) as f:
            if STATISTICS_KEYS & set(f.files):
                raise
        return None


class ImageSource:
    """``arr_0`` of an ``.npz``, or a folder read with the ADM crop or ``crop="resize"`` (bilinear short
    side, then the centre), unreadable files skipped and counted."""

    def __init__(self, path: str | os.PathLike, image_size: int | None, what: str, crop: str = "center"):
        self.path, self.image_size, self.skipped = Path(path), image_size, []
        if self.path.is_dir():
            if image_size is None:
                raise ConfigError(
                    f"{what} {self.path} is an image folder: set image_size for its center crop"
                )
            self.folder = ImageFolder(self.path, image_size, crop=crop)
        elif self.path.is_file():
            self.folder = None
        else:
            raise DataError(f"{what} not found: {self.path} (expected an .npz with arr_0 or an image folder)")

    def batches(self, batch_size: int) -> Iterator[torch.Tensor]:
        if self.folder is None:
            yield from iter_npz_images(self.path, batch_size)
            return
        loader = torch.utils.data.DataLoader(self.folder, batch_size=batch_size, collate_fn=collate)
        for batch in loader:
            self.skipped += batch["skipped"]
            if batch["image"] is not None:
                yield batch["image"].mul(255).round().to(torch.uint8)  # [B, 3, H, W]
