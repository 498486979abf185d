"""Data path throughput: JPEG folder images/s per loader worker (ours beside torchvision's ImageFolder
with the same resize, random crop and flip), and latents/s from the memory-mapped cache beside the
safetensors shards it replaces, each beside what one training step consumes.

The step is measured here, on this machine: a DiT (``test-dit``) on VA-VAE-f16d32-shaped latents
``[32, 16, 16]`` (a 256-pixel image), loss + backward + AdamW, batch 64.  On the image path the step
would also encode the images, so it consumes fewer than this: the row is an upper bound.  The JPEGs are
cut from scikit-learn's two bundled photographs (ImageNet-like 500×375), nothing is downloaded.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from latentforge_core import registry
from latentforge_core.checkpoint import save_checkpoint
from latentforge_runner.data import ImageFolder, ResumableBatchSampler, collate
from latentforge_runner.latents import (
    LatentShards,
    cache_header,
    cache_path,
    create_cache_file,
    map_cache_file,
)
from latentforge_runner.training import Optimization, TrainingSettings

LATENT = (32, 16, 16)  # VA-VAE f16d32 at 256 pixels
STEP_BATCH = 64


@pytest.fixture(scope="module")
def train_steps(full):
    """``consume(n)``: the CPU training steps that take ``n`` latents (``n`` a multiple of the batch)."""
    torch.manual_seed(0)
    generator = registry.generators.build(
        "test-dit", in_channels=LATENT[0], input_size=LATENT[1], num_classes=10
    )
    t = TrainingSettings(steps=10**9, batch_size=STEP_BATCH, lr=1e-4, checkpoint_every=10**9, log_every=10**9)
    optim = Optimization(generator.parameters(), t)
    batch = STEP_BATCH if full else 4
    z, labels = torch.randn(batch, *LATENT), torch.randint(0, 10, (batch,))

    def consume(n: int):
        def run():
            for _ in range(n // batch if full else 1):  # the tiny run only checks that a step runs
                optim.backward(generator.loss(z, labels), 1, 0)
                optim.step()

        return run

    return consume


# ------------------------------------------------------------------------------------------------
# JPEG folder → 256-pixel crops
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def jpeg_folder(full, tmp_path_factory):
    """ImageNet-like JPEGs (500×375, quality 90, 4 classes) cut at random from the sample photographs."""
    from sklearn.datasets import load_sample_images

    root = tmp_path_factory.mktemp("jpegs")
    photos = load_sample_images().images  # 2 × [427, 640, 3] uint8
    rng = np.random.default_rng(0)
    for i in range(128 if full else 8):
        photo = photos[i % 2]
        top, left = rng.integers(0, 427 - 300), rng.integers(0, 640 - 400)
        crop = Image.fromarray(photo[top : top + 300, left : left + 400]).resize((500, 375), Image.BICUBIC)
        (root / f"class{i % 4}").mkdir(exist_ok=True)
        crop.save(root / f"class{i % 4}" / f"{i:05d}.jpg", quality=90)
    return root


@pytest.mark.headline
@pytest.mark.parametrize("workers", [0, 1, 2])
def test_jpeg_folder_images_per_second(measure_interleaved, full, jpeg_folder, train_steps, workers):
    """Bicubic short side → 256, random 256 crop, random flip, to a float tensor, batches of 32."""
    if not full and workers:
        pytest.skip("worker processes are timed at full size only")
    import torchvision
    from torchvision import transforms

    size, batch = (256, 32) if full else (64, 4)
    ours = ImageFolder(jpeg_folder, size, crop="random", flip=True, seed=0)
    peer = torchvision.datasets.ImageFolder(
        str(jpeg_folder),
        transforms.Compose(
            [
                transforms.Resize(size, interpolation=transforms.InterpolationMode.BICUBIC),
                transforms.RandomCrop(size),
                transforms.RandomHorizontalFlip(),
                transforms.ToTensor(),
            ]
        ),
    )
    assert len(ours) == len(peer) and ours.classes == peer.classes
    n = len(ours) // batch * batch

    def read_ours():
        sampler = ResumableBatchSampler(len(ours), batch)
        loader = torch.utils.data.DataLoader(
            ours, batch_sampler=sampler, num_workers=workers, collate_fn=collate
        )
        return sum(len(b["image"]) for b in loader)

    def read_peer():
        loader = torch.utils.data.DataLoader(
            peer, batch_size=batch, shuffle=True, drop_last=True, num_workers=workers
        )
        return sum(len(images) for images, _ in loader)

    assert read_ours() == read_peer() == n
    measure_interleaved(
        {
            "ours": read_ours,
            "torchvision ImageFolder": read_peer,
            "train step test-dit (CPU)": train_steps(n),
        },
        group=f"data JPEG folder → {size}px crop+flip, {workers} workers",
        items=n,
        unit="images/s",
        rounds=3,
    )


# ------------------------------------------------------------------------------------------------
# Cached latents: the memory-mapped file beside the safetensors shards
# ------------------------------------------------------------------------------------------------
def write_caches(folder, n: int, shard_size: int) -> None:
    """The same ``n`` random latents (and flipped copies) as a float32 memory-mapped cache and as
    safetensors shards of ``shard_size``, the two layouts cache-latents writes."""
    g = torch.Generator().manual_seed(0)
    values, flipped = torch.randn(n, *LATENT, generator=g), torch.randn(n, *LATENT, generator=g)
    labels, indices = torch.randint(0, 1000, (n,), generator=g), torch.arange(n)
    header = cache_header(n, LATENT, "float32", True, key="latents", tokenizer="bench")
    create_cache_file(cache_path(folder, "train"), header)
    _, arrays = map_cache_file(cache_path(folder, "train"), mode="r+")
    arrays["values"][:], arrays["flipped"][:] = values.numpy(), flipped.numpy()
    arrays["labels"][:], arrays["indices"][:], arrays["status"][:] = labels.numpy(), indices.numpy(), 1
    for array in arrays.values():
        array.flush()
    shards = folder / "shards"
    shards.mkdir()
    for k, start in enumerate(range(0, n, shard_size)):
        part = slice(start, start + shard_size)
        tensors = {"latents": values[part], "latents_flip": flipped[part], "labels": labels[part]}
        config = {"kind": "latent_cache", "tokenizer": "bench", "key": "latents"}
        save_checkpoint(
            tensors | {"indices": indices[part]}, shards / f"shard-r000-{k:05d}.safetensors", config
        )


@pytest.mark.headline
def test_cached_latents_per_second(measure_interleaved, full, tmp_path, train_steps):
    """Open the cache, then one epoch of shuffled batches of 256 (originals and flips) through ``batch``."""
    n, batch = (2048, 256) if full else (16, 8)
    write_caches(tmp_path, n, shard_size=512 if full else 8)

    def epoch(folder):
        def run():
            cache = LatentShards(folder)
            sampler = ResumableBatchSampler(len(cache), batch, seed=0)
            return sum(len(cache.batch(indices)["latents"]) for indices in sampler)

        return run

    items = 2 * n // batch * batch
    assert epoch(tmp_path)() == epoch(tmp_path / "shards")() == items
    ours, shards, step = epoch(tmp_path), epoch(tmp_path / "shards"), train_steps(items)
    measure_interleaved(
        {"ours": ours, "safetensors shards": shards, "train step test-dit (CPU)": step},
        group=f"data cached latents {'×'.join(map(str, LATENT))} fp32, {n} + flips, batches of {batch}",
        items=items,
        unit="latents/s",
        rounds=3,
    )
