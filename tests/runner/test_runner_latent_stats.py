"""latent-stats writes the exact latent statistics of a tokenizer beside its checkpoint."""

import pytest
import torch

from latentforge_core import registry
from latentforge_runner import cli
from latentforge_runner.config import ConfigError
from latentforge_runner.data import DataError
from latentforge_tokenizers.stats import LatentStats, stats_path


def test_rae_stats_equal_float64_torch_over_the_same_latents(tmp_path):
    ckpt = registry.tokenizers.build("test-rae-tiny").save(tmp_path / "rae.safetensors")
    recipe, cfg = cli.load_settings(
        "latent-stats",
        None,
        [
            "tokenizer.name=test-rae-tiny",
            f"tokenizer.params.pretrained_decoder={ckpt}",
            "data.name=digits",
            "data.image_size=32",
            "max_images=200",
            "batch_size=48",  # 200 = 4·48 + 8: uneven batches merge exactly
            f"run.output_dir={tmp_path / 'run'}",
        ],
    )
    job = registry.recipes.build(recipe, config=cfg)
    job.setup()
    job.run()
    job.save()
    job.cleanup()
    saved = LatentStats.load(stats_path(ckpt))
    with torch.no_grad():
        images = torch.stack([job.dataset[i]["image"] for i in range(200)])
        z = job.tokenizer.encode(images).double()  # [200, 64, 8, 8]
    assert saved.shape == (64, 8, 8)
    torch.testing.assert_close(saved.mean, z.mean(0).float(), rtol=0, atol=1e-6)
    torch.testing.assert_close(saved.var, z.var(0, unbiased=False).float(), rtol=1e-6, atol=1e-7)
    # The builder picks the artifact up beside the checkpoint.
    again = registry.tokenizers.build("test-rae-tiny", pretrained_decoder=str(ckpt))
    torch.testing.assert_close(again.stats.var, saved.var)


def test_vavae_channel_stats_go_to_the_run_folder_without_a_checkpoint(tmp_path):
    recipe, cfg = cli.load_settings(
        "latent-stats",
        None,
        [
            "tokenizer.name=test-vavae-tiny",
            "data.name=digits",
            "data.image_size=32",
            "max_images=64",
            f"run.output_dir={tmp_path}",
        ],
    )
    cli.run_recipe(recipe, cfg)
    stats = LatentStats.load(tmp_path / "latent_stats.safetensors")
    assert stats.shape[1:] == (1, 1) and stats.eps == 0.0  # per channel, LightningDiT's convention


def test_bad_input_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="max_imags.*max_images"):
        cli.load_settings("latent-stats", None, ["tokenizer.name=test-rae-tiny", "max_imags=3"])
    (tmp_path / "empty").mkdir()
    recipe, cfg = cli.load_settings(
        "latent-stats",
        None,
        [
            "tokenizer.name=test-rae-tiny",
            "data.name=folder",
            f"data.root={tmp_path / 'empty'}",
            f"run.output_dir={tmp_path / 'run'}",
        ],
    )
    with pytest.raises(DataError, match="no images found"):
        cli.run_recipe(recipe, cfg)
    recipe, cfg = cli.load_settings(
        "latent-stats",
        None,
        [
            "tokenizer.name=test-vqgan-tiny",
            "data.name=digits",
            "data.image_size=16",
            f"run.output_dir={tmp_path}",
        ],
    )
    with pytest.raises(ValueError, match="needs a continuous tokenizer"):
        cli.run_recipe(recipe, cfg)
