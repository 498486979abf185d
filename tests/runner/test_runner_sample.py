"""sample: a tiny train-generator run → N PNGs, a grid and an ADM npz with equal class counts."""

import numpy as np
import pytest
import torch
from PIL import Image

from latentforge_core.checkpoint import CheckpointError
from latentforge_runner import cli
from latentforge_runner.config import ConfigError
from latentforge_runner.recipes.sample import class_labels

TRAIN = [
    "training.steps=2",
    "training.batch_size=8",
    "training.checkpoint_every=2",
    "eval.every=0",
    "eval.num_samples=4",
    "eval.stats_batches=1",
    "eval.sampler.steps=2",
]


@pytest.fixture(scope="module")
def generator_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("train")
    recipe, cfg = cli.load_settings("train-generator", "tiny-rae", [*TRAIN, f"run.output_dir={out}"])
    cli.run_recipe(recipe, cfg)
    return out


def _sample(generator_run, out, *extra):
    return cli.load_settings(
        "sample", None, [f"generator_run={generator_run}", f"run.output_dir={out}", "batch_size=8", *extra]
    )


def test_sample_writes_pngs_grid_and_npz_with_equal_counts(generator_run, tmp_path):
    recipe, cfg = _sample(generator_run, tmp_path, "num_samples=20", "labels=equal")
    result = cli.run_recipe(recipe, cfg)
    pngs = sorted((tmp_path / "images").glob("*.png"))
    assert len(pngs) == 20
    with np.load(tmp_path / "samples.npz") as f:
        arr, labels = f["arr_0"], f["arr_1"]
    assert arr.dtype == np.uint8 and arr.shape == (20, 32, 32, 3)
    assert np.bincount(labels, minlength=10).tolist() == [2] * 10
    assert result["per_class_min"] == result["per_class_max"] == 2
    # The PNG files hold exactly the npz's pixels, in order.
    np.testing.assert_array_equal(np.asarray(Image.open(pngs[7]).convert("RGB")), arr[7])
    grid = Image.open(tmp_path / "grid.png")
    assert grid.size == (10 * 32, 2 * 32)  # one column per class


def test_sample_random_labels_are_seeded(generator_run, tmp_path):
    recipe, cfg = _sample(generator_run, tmp_path, "num_samples=8", "labels=random", "write_png=false")
    cli.run_recipe(recipe, cfg)
    with np.load(tmp_path / "samples.npz") as f:
        assert f["arr_0"].shape == (8, 32, 32, 3)
        np.testing.assert_array_equal(f["arr_1"], class_labels("random", 8, 10, seed=0).numpy())
    assert not list((tmp_path / "images").glob("*.png"))


def test_sample_bad_input(generator_run, tmp_path):
    with pytest.raises(ConfigError, match="expected one of 'equal', 'random'"):
        _sample(generator_run, tmp_path, "labels=balanced")
    with pytest.raises(ConfigError, match="multiple of the 10 classes"):
        class_labels("equal", 15, 10)
    with pytest.raises(ConfigError, match="no config.yaml"):
        recipe, cfg = _sample(tmp_path / "nowhere", tmp_path / "out")
        cli.run_recipe(recipe, cfg)
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        recipe, cfg = _sample(
            generator_run, tmp_path / "out", "num_samples=10", "weights=model", f"checkpoint={tmp_path}"
        )
        cli.run_recipe(recipe, cfg)


def test_sample_rebuilds_the_training_runs_models(tmp_path):
    """Generator (EMA), tokenizer and latent statistics equal those train-generator held in memory."""
    from latentforge_runner.recipes.sample import SampleRecipe
    from latentforge_runner.recipes.train_generator import TrainGeneratorRecipe

    _, cfg = cli.load_settings("train-generator", "tiny-rae", [*TRAIN, f"run.output_dir={tmp_path / 't'}"])
    train = TrainGeneratorRecipe(cfg)
    _, scfg = _sample(tmp_path / "t", tmp_path / "s", "num_samples=10")
    sample = SampleRecipe(scfg)
    try:
        train.setup()
        train.run()
        sample.setup()
        for ours, theirs in [
            (sample.generator, train.state.ema.module),
            (sample.tokenizer, train.tokenizer),
        ]:
            a, b = ours.state_dict(), theirs.state_dict()
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k].cpu()) for k in a)
        assert torch.equal(sample.tokenizer.stats.var, train.tokenizer.stats.var)
        assert torch.equal(sample.tokenizer.stats.mean, train.tokenizer.stats.mean)
    finally:
        train.cleanup()
        sample.cleanup()


def test_sample_reads_the_runs_latent_statistics_and_recomputes_only_without_them(tmp_path, caplog):
    """train-generator saves the statistics it trained with; sample loads that file (a changed file
    changes what sample uses) and recomputes, saying so, only when the file is absent."""
    from latentforge_runner.latents import STATS_FILE
    from latentforge_runner.recipes.sample import SampleRecipe
    from latentforge_runner.recipes.train_generator import TrainGeneratorRecipe
    from latentforge_tokenizers.stats import LatentStats

    _, cfg = cli.load_settings("train-generator", "tiny-rae", [*TRAIN, f"run.output_dir={tmp_path / 't'}"])
    train = TrainGeneratorRecipe(cfg)
    try:
        train.setup()
        computed = train.tokenizer.stats
    finally:
        train.cleanup()
    saved = LatentStats.load(tmp_path / "t" / STATS_FILE)
    assert torch.equal(saved.var, computed.var) and torch.equal(saved.mean, computed.mean)
    assert saved.eps == computed.eps

    # The generator checkpoint is not needed to read statistics: stop before loading it.
    def stats_of(out):
        _, scfg = _sample(tmp_path / "t", out, "num_samples=10")
        recipe = SampleRecipe(scfg)
        recipe._load_generator = lambda *args: None
        try:
            recipe.setup()
            return recipe.tokenizer.stats
        finally:
            recipe.cleanup()

    LatentStats(saved.var * 4, saved.mean + 1, eps=saved.eps).save(tmp_path / "t" / STATS_FILE)
    with caplog.at_level("INFO", logger="latentforge"):
        loaded = stats_of(tmp_path / "s1")
    assert torch.equal(loaded.var, saved.var * 4) and torch.equal(loaded.mean, saved.mean + 1)
    assert "recomputing" not in caplog.text
    (tmp_path / "t" / STATS_FILE).unlink()
    with caplog.at_level("INFO", logger="latentforge"):
        recomputed = stats_of(tmp_path / "s2")
    assert f"holds no {STATS_FILE}: recomputing" in caplog.text
    assert torch.equal(recomputed.var, computed.var) and torch.equal(recomputed.mean, computed.mean)
