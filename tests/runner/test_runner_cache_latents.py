"""cache-latents: shards hold exactly tokenizer.encode of the images (and of their flips)."""

import kit_loop
import pytest
import torch

from latentforge_core import registry
from latentforge_core.checkpoint import load_checkpoint
from latentforge_core.device import seed_everything
from latentforge_runner import cli
from latentforge_runner.data import DataError, Digits
from latentforge_runner.latents import LatentShards


def _cache(tmp_path, tokenizer, size, *extra):
    recipe, cfg = cli.load_settings(
        "cache-latents",
        None,
        [
            f"tokenizer.name={tokenizer}",
            "data.name=digits",
            f"data.image_size={size}",
            "max_images=50",
            "shard_size=16",
            "batch_size=12",
            f"run.output_dir={tmp_path}",
            *extra,
        ],
    )
    return cli.run_recipe(recipe, cfg)


def test_rae_latent_shards_equal_encode_and_flip(tmp_path):
    result = _cache(tmp_path, "test-rae-tiny", 32)
    shards = sorted(tmp_path.glob("shard-*.safetensors"))
    assert [p.name for p in shards] == [f"shard-r000-{k:05d}.safetensors" for k in range(4)]
    assert result["shards"] == [str(p) for p in shards] and result["skipped"] == 0
    contents = [load_checkpoint(p)[0] for p in shards]
    assert [len(c["labels"]) for c in contents] == [16, 16, 16, 2]
    latents = torch.cat([c["latents"] for c in contents])
    flipped = torch.cat([c["latents_flip"] for c in contents])
    data = Digits("train", 32)
    images, labels = data.images[:50], data.labels[:50]
    tok = registry.tokenizers.build("test-rae-tiny").eval()
    with torch.no_grad():
        torch.testing.assert_close(latents, tok.encode(images))
        torch.testing.assert_close(flipped, tok.encode(images.flip(-1)))
        assert not torch.allclose(latents, flipped)  # digits are not mirror-symmetric
    assert torch.equal(torch.cat([c["labels"] for c in contents]), labels)
    assert torch.equal(torch.cat([c["indices"] for c in contents]), torch.arange(50))
    # The training data set: 50 items and their 50 flipped copies.
    ds = LatentShards(tmp_path)
    assert len(ds) == 100 and ds.key == "latents"
    assert torch.equal(ds[7]["latents"], latents[7]) and torch.equal(ds[57]["latents"], flipped[7])
    assert ds[57]["label"] == int(labels[7])
    batch = ds.batch([3, 53])
    assert (
        torch.equal(batch["latents"], torch.stack([latents[3], flipped[3]]))
        and batch["label"].tolist() == [int(labels[3])] * 2
    )


def test_a_generator_trains_on_the_shards(tmp_path):
    from latentforge_runner.training import TrainingSettings

    _cache(tmp_path / "cache", "test-rae-tiny", 32, "max_images=32")
    ds = LatentShards(tmp_path / "cache")
    torch.manual_seed(0)
    generator = registry.generators.build("test-dit", in_channels=64, input_size=8, num_classes=10)
    before = [p.detach().clone() for p in generator.parameters()]
    settings = TrainingSettings(steps=2, batch_size=8, log_every=1, checkpoint_every=2, ema_decay=None)
    trainer, entry = kit_loop.build(generator, settings, ds.batch, len(ds), tmp_path / "train", method="loss")
    logs = kit_loop.fit(trainer, entry, lambda model, batch: model(batch["latents"], batch["label"]))
    assert trainer.step == 2 and logs["loss"] > 0
    assert any(not torch.equal(a, b) for a, b in zip(before, generator.parameters(), strict=True))


def test_vqgan_token_shards_without_flip(tmp_path):
    _cache(tmp_path, "test-vqgan-tiny", 16, "flip=false", "shard_size=50")
    (shard,) = tmp_path.glob("shard-*.safetensors")
    tensors, config = load_checkpoint(shard)
    assert set(tensors) == {"tokens", "labels", "indices"} and config["key"] == "tokens"
    seed_everything(0)  # random weights: built as the recipe built them, right after seeding with run.seed
    tok = registry.tokenizers.build("test-vqgan-tiny").eval()
    with torch.no_grad():
        assert torch.equal(tensors["tokens"], tok.encode(Digits("train", 16).images[:50]))
    assert len(LatentShards(tmp_path, flip=False)) == 50
    with pytest.raises(DataError, match="no flipped copies"):
        LatentShards(tmp_path)
    with pytest.raises(DataError, match="no latent shards"):
        LatentShards(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="shard_size"):
        _cache(tmp_path / "bad", "test-vqgan-tiny", 16, "shard_size=0")
