"""Data: ImageNet-layout folders with the seeds' crops and flips, the embedded digits, a resumable sampler.

Every image leaves here as a float tensor in [0, 1] ``[3, H, W]`` with an int64 label; components
apply their own preprocessing.  Training augmentation is the seeds' own: the ADM center crop (RAE
stage 2, LightningDiT) or a bicubic resize of the short side then a random crop (DiGIT, VA-VAE, the
RAE decoder), with an optional horizontal flip; its randomness is drawn from ``(seed, epoch,
index)``, so a resumed run and any number of loader workers see the same crops.  An unreadable
image is skipped, counted and reported (the batch carries the paths it dropped) instead of stopping
a long run.  The batch sampler's order depends
only on ``(seed, epoch)``, so its position is two integers a checkpoint can store.
"""

from __future__ import annotations

import logging
import math
import os
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

    name: Literal["digits", "folder", "latents"] = "folder"  # embedded digits, image folder, cached latents
    root: str | None = None  # ImageNet layout root/<class>/*.JPEG; for latents, a cache-latents folder
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
    """Images (``digits``, ``folder``, augmented by ``seed``) or the latent shards of ``tokenizer``."""
    if d.name != "latents":
        images = build_dataset(
            d.name, image_size=d.image_size, root=d.root, crop=d.crop, resize=d.resize, flip=d.flip, seed=seed
        )
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
    shards = LatentShards(d.root, flip=None)
    if shards.tokenizer != tokenizer:
        raise DataError(
            f"the shards in {d.root} hold latents of tokenizer {shards.tokenizer!r}, but this run's "
            f"tokenizer is {tokenizer!r}; cache them with the same tokenizer"
        )
    return check_classes(shards, d)


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
    """uint8 ``[H, W, 3]`` → float ``[3, H, W]`` in [0, 1]."""
    return torch.from_numpy(np.array(arr)).permute(2, 0, 1).float().div_(255.0)


# ------------------------------------------------------------------------------------------------
# Image folders
# ------------------------------------------------------------------------------------------------
class ImageFolder(torch.utils.data.Dataset):
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

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __getitem__(self, index: int) -> dict[str, Any]:
        path, label = self.samples[index]
        rng = np.random.default_rng((self.seed, self.epoch, index))
        try:
            with Image.open(path) as img:
                if min(img.size) < self.image_size and not self.warned_small:
                    self.warned_small = True  # once per process: a loader worker has its own copy
                    log.warning(
                        "%s is %dx%d, smaller than the %d-pixel crop: such images are upscaled (expected "
                        "images at least data.image_size on the short side)",
                        path, *img.size, self.image_size,
                    )  # fmt: skip
                if self.crop == "center":
                    arr = center_crop_arr(img.convert("RGB"), self.image_size)
                elif self.crop == "resize":
                    arr = resize_center_crop_arr(img.convert("RGB"), self.image_size)
                else:
                    arr = random_crop_arr(img.convert("RGB"), self.image_size, self.resize, rng)
        except UNREADABLE as err:
            return {"error": f"{path}: {type(err).__name__}: {err}"}
        if self.flip and rng.random() < 0.5:
            arr = arr[:, ::-1]
        return {"image": to_tensor(arr), "label": label, "index": index}


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
    """``digits`` or ``folder`` (ImageNet layout at ``root``); ``augment`` = ImageFolder's crop/flip."""
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
    raise DataError(f"unknown data set {name!r}: expected 'digits' (embedded) or 'folder' (needs data.root)")


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
