"""train-generator on the cache-latents file: the same latents give the same loss as encoding on the fly
(exactly in float32, within the rounding in 16 bits)."""

import json

import kit_loop
import pytest
import torch
from safetensors.torch import load_file

from latentforge_runner import cli
from latentforge_runner.data import DataError
from latentforge_runner.recipes.train_generator import TrainGeneratorRecipe

QUICK = [
    "training.steps=3",
    "training.batch_size=8",
    "training.checkpoint_every=3",
    "training.log_every=1",
    "eval.every=0",
    "eval.num_samples=4",
    "eval.stats_batches=1",
    "eval.sampler.steps=2",
]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    out = tmp_path_factory.mktemp("cache")
    recipe, cfg = cli.load_settings(
        "cache-latents",
        None,
        [
            "tokenizer.name=test-rae-tiny",
            "data.name=digits",
            "data.image_size=32",
            "max_images=64",
            "batch_size=32",
            f"run.output_dir={out}",
        ],
    )
    cli.run_recipe(recipe, cfg)
    return out


def _recipe(out, *extra):
    _, cfg = cli.load_settings("train-generator", "tiny-rae", [*QUICK, f"run.output_dir={out}", *extra])
    return TrainGeneratorRecipe(cfg)


def test_cached_latents_give_the_on_the_fly_loss(cache, tmp_path):
    fly, cached = (
        _recipe(tmp_path / "fly"),
        _recipe(tmp_path / "cached", "data.name=latents", f"data.root={cache}"),
    )
    try:
        fly.setup()
        cached.setup()
        assert len(cached.dataset) == 128  # 64 cached images and their flipped copies
        # Statistics from the first 64 images on both paths, the generators' initial weights equal.
        torch.testing.assert_close(cached.tokenizer.stats.var, fly.tokenizer.stats.var)
        torch.testing.assert_close(cached.tokenizer.stats.mean, fly.tokenizer.stats.mean)
        for a, b in zip(fly.generator.parameters(), cached.generator.parameters(), strict=True):
            assert torch.equal(a, b)
        idx = [5, 0, 63, 17, 2, 40, 33, 9]
        images, latents = fly.dataset.batch(idx), cached.dataset.batch(idx)
        torch.testing.assert_close(fly.latents(images), cached.latents(latents))
        torch.manual_seed(3)
        loss_fly = fly.model(fly.latents(images), images["label"])
        torch.manual_seed(3)
        loss_cached = cached.model(cached.latents(latents), latents["label"])
        torch.testing.assert_close(loss_cached, loss_fly, rtol=1e-5, atol=1e-6)
        # The flipped copies are the mirrored images' latents.
        flipped = {k: v for k, v in images.items()} | {"image": images["image"].flip(-1)}
        mirrored = cached.dataset.batch([i + 64 for i in idx])
        torch.testing.assert_close(fly.latents(flipped), cached.latents(mirrored))
        # A few optimisation steps from the cache.
        logs = cached.run()
        cached.save()
    finally:
        fly.cleanup()
        cached.cleanup()
    assert cached.state.step == 3 and torch.isfinite(torch.tensor(logs["loss"]))
    rows = [json.loads(r) for r in (tmp_path / "cached" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert (tmp_path / "cached" / "checkpoints" / "00000003" / "ema.safetensors").is_file()
    assert (tmp_path / "cached" / "samples" / "00000003.png").is_file()


@pytest.mark.parametrize("dtype, rtol", [("bfloat16", 5e-3), ("float16", 1e-3)])
def test_a_16bit_cache_gives_the_loss_within_its_rounding(tmp_path, dtype, rtol):
    """Latents rounded to 16 bits (relative error ≤ 2⁻⁹ bfloat16, 2⁻¹² float16) move the first loss by
    about as much (measured: 7e-4 and 5e-5, against 1e-5 for the float32 cache above); the statistics are
    computed from the rounded latents."""
    recipe, cfg = cli.load_settings(
        "cache-latents",
        None,
        ["tokenizer.name=test-rae-tiny", "data.name=digits", "data.image_size=32", "max_images=64"]
        + [f"dtype={dtype}", f"run.output_dir={tmp_path / 'cache'}"],
    )
    cli.run_recipe(recipe, cfg)
    fly, cached = (
        _recipe(tmp_path / "fly"),
        _recipe(tmp_path / "cached", "data.name=latents", f"data.root={tmp_path / 'cache'}"),
    )
    try:
        fly.setup()
        cached.setup()
        idx = list(range(0, 128, 8))  # originals and flipped copies
        images = fly.dataset.batch([i % 64 for i in idx])
        mirrored = torch.tensor([i >= 64 for i in idx])[:, None, None, None]
        images["image"] = torch.where(mirrored, images["image"].flip(-1), images["image"])
        latents = cached.dataset.batch(idx)
        torch.manual_seed(3)
        loss_fly = fly.model(fly.latents(images), images["label"])
        torch.manual_seed(3)
        loss_cached = cached.model(cached.latents(latents), latents["label"])
        torch.testing.assert_close(loss_cached, loss_fly, rtol=rtol, atol=0)
        assert not torch.equal(cached.latents(latents), fly.latents(images))
    finally:
        fly.cleanup()
        cached.cleanup()


def test_cache_of_another_tokenizer_is_refused(cache, tmp_path):
    recipe = _recipe(tmp_path, "data.name=latents", f"data.root={cache}", "tokenizer.name=test-vavae-tiny")
    try:
        with pytest.raises(
            DataError, match="tokenizer 'test-rae-tiny'.*this run's tokenizer is 'test-vavae-tiny'"
        ):
            recipe.setup()
    finally:
        recipe.cleanup()
    with pytest.raises(DataError, match="needs data.root"):
        _recipe(tmp_path / "b", "data.name=latents").setup()


def test_stopped_and_rerun_on_the_cache_ends_bitwise(cache, tmp_path, monkeypatch):
    """Killed right after checkpoint 2, rerun with the same command: the step-4 weights are the
    uninterrupted run's (the data position indexes the memory-mapped cache like any data set)."""
    steps = ("training.steps=4", "training.checkpoint_every=2", "data.name=latents", f"data.root={cache}")

    def train(out):
        recipe = _recipe(out, *steps)
        try:
            recipe.setup()
            recipe.run()
        finally:
            recipe.cleanup()
        return load_file(out / "checkpoints" / "00000004" / "model.safetensors")

    whole = train(tmp_path / "whole")
    with kit_loop.stopped_after_checkpoint(monkeypatch, 2):
        train(tmp_path / "cut")
    resumed = train(tmp_path / "cut")
    assert whole.keys() == resumed.keys() and all(torch.equal(whole[k], resumed[k]) for k in whole)
