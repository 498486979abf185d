"""Runner throughput: end-to-end training images/s of the tiny pipelines, and the image loader's
images/s (ADM crop from JPEG files), so the loader can be seen not to be the bottleneck."""

import numpy as np
import pytest
import torch
from PIL import Image

from latentforge_core import registry
from latentforge_runner.data import Digits, ImageFolder, ResumableBatchSampler, collate
from latentforge_runner.training import EMA, Optimization, TrainingSettings


@pytest.mark.parametrize("pipeline", ["rae", "vavae-lightningdit"])
def test_train_images_per_second(measure, full, tmp_path, pipeline):
    """One training step = tokenizer encode on the fly + generator loss + backward + AdamW + EMA."""
    tok_name, gen_name = {
        "rae": ("test-rae-tiny", "test-ditdh"),
        "vavae-lightningdit": ("test-vavae-tiny", "test-lightningdit"),
    }[pipeline]
    tokenizer = registry.tokenizers.build(tok_name).eval().requires_grad_(False)
    data = Digits("train", image_size=32)
    c, h, _ = tokenizer.latent_shape
    generator = registry.generators.build(gen_name, in_channels=c, input_size=h, num_classes=10)
    batch, steps = (64, 10) if full else (8, 2)
    t = TrainingSettings(
        steps=10**9, batch_size=batch, lr=1e-4, ema_decay=0.999, checkpoint_every=10**9, log_every=10**9
    )
    optim, ema = Optimization(generator.parameters(), t), EMA(generator, t.ema_decay)
    sampler = ResumableBatchSampler(len(data), batch)

    def run():
        for step in range(1, steps + 1):
            b = data.batch(next(iter(sampler)))
            sampler.advance()
            with torch.no_grad():
                z = tokenizer.encode(b["image"])
            optim.backward(generator.loss(z, b["label"]), 1, step)
            optim.step()
            ema.update(generator, step)

    measure(run, group=f"runner train tiny-{pipeline}", impl="ours", items=batch * steps, unit="images/s")


def test_image_folder_loader_images_per_second(measure, full, tmp_path):
    """JPEG decode + ADM center crop + collate through a DataLoader fed by the resumable sampler."""
    n, src, size, workers = (256, 400, 256, 2) if full else (16, 80, 32, 0)
    rng = np.random.default_rng(0)
    for i in range(n):
        folder = tmp_path / f"class_{i % 4}"
        folder.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (src, src + src // 3, 3), dtype=np.uint8)).save(
            folder / f"{i}.jpg"
        )
    dataset = ImageFolder(tmp_path, size)
    sampler = ResumableBatchSampler(len(dataset), 16 if full else 8)

    def run():
        loader = torch.utils.data.DataLoader(
            dataset, batch_sampler=sampler, num_workers=workers, collate_fn=collate
        )
        return sum(len(b["image"]) for b in loader)

    seen = measure(
        run,
        group="runner image loader",
        impl="ours",
        items=sampler.batches_per_epoch * sampler.global_batch,
        unit="images/s",
    )
    assert seen == sampler.batches_per_epoch * sampler.global_batch
