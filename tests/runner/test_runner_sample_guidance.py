"""sample with autoguidance: the run's eval.guidance_model (weights of another run's EMA) guides sampling,
as the RAE config's DiT-DH-S guides DiT-DH-XL."""

import numpy as np
import pytest
import torch

from latentforge_core.checkpoint import CheckpointError, load_checkpoint
from latentforge_runner import cli
from latentforge_runner.generation import initial_noise
from latentforge_runner.recipes.sample import SampleRecipe

TRAIN = [
    "training.steps=20",
    "training.batch_size=8",
    "training.checkpoint_every=1000",
    "eval.every=0",
    "eval.num_samples=4",
    "eval.stats_batches=1",
    "eval.sampler.steps=3",
]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A weak tiny DiT-DH (another seed, fewer steps) and a main one that names it as its guide."""
    root = tmp_path_factory.mktemp("guided")
    recipe, weak = cli.load_settings(
        "train-generator",
        "tiny-rae",
        [*TRAIN, "training.steps=5", "run.seed=5", f"run.output_dir={root}/weak"],
    )
    cli.run_recipe(recipe, weak)
    weights = root / "weak" / "checkpoints" / "00000005" / "ema.safetensors"
    recipe, main = cli.load_settings(
        "train-generator",
        "tiny-rae",
        [
            *TRAIN,
            f"run.output_dir={root}/main",
            "eval.sampler.cfg_scale=1.42",
            "eval.guidance_model.name=test-ditdh",
            f"eval.guidance_weights={weights}",
        ],
    )
    cli.run_recipe(recipe, main)  # its end-of-run grid is sampled with the guide too
    assert (root / "main" / "samples" / "00000020.png").is_file()
    return root / "main", weights


def _sample(run, out, *extra):
    _, cfg = cli.load_settings(
        "sample",
        None,
        [f"generator_run={run}", f"run.output_dir={out}", "num_samples=10", "write_png=false", *extra],
    )
    recipe = SampleRecipe(cfg)
    try:
        recipe.setup()
        recipe.run()
        recipe.save()
    finally:
        recipe.cleanup()
    with np.load(out / "samples.npz") as f:
        return recipe, f["arr_0"], f["arr_1"]


def test_sample_uses_the_runs_autoguidance(runs, tmp_path):
    run, weights = runs
    recipe, guided, labels = _sample(run, tmp_path / "g")
    guide = recipe.guidance["guidance_model"]
    assert recipe.guidance["guidance"] == "autoguidance"
    expected = load_checkpoint(weights)[0]
    assert all(torch.equal(v, expected[k]) for k, v in guide.state_dict().items())
    # The same draw by hand: v = v_weak + 1.42 (v_main - v_weak), 3 Euler steps.
    with torch.no_grad():
        y = torch.as_tensor(labels)
        noise = initial_noise(0, range(len(y)), recipe.generator.input_shape)  # sample's, per index
        z = recipe.generator.sample(
            y,
            sampler="euler",
            steps=3,
            cfg_scale=1.42,
            guidance="autoguidance",
            guidance_model=guide,
            noise=noise,
        )
        images = recipe.tokenizer.decode(z, normalize=True).clamp(0, 1)
    by_hand = (images * 255).round().byte().permute(0, 2, 3, 1).numpy()
    assert np.abs(by_hand.astype(int) - guided.astype(int)).max() <= 1
    # Scale 1 is the main model alone; 1.42 moves the samples away from it.
    _, plain, _ = _sample(
        run, tmp_path / "p", "sampler.cfg_scale=1.0", "sampler.sampler=euler", "sampler.steps=3"
    )
    with torch.no_grad():
        z = recipe.generator.sample(y, sampler="euler", steps=3, noise=noise)
        alone = recipe.tokenizer.decode(z, normalize=True)
    alone = (alone.clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).numpy()
    assert np.abs(alone.astype(int) - plain.astype(int)).max() <= 1
    assert (plain != guided).mean() > 0.05


def test_guidance_settings_override_the_runs(runs, tmp_path):
    """guidance_weights in sample replaces the run's: the main model's own EMA as its guide gives
    v_weak = v_main, so the samples equal unguided ones."""
    run, _ = runs
    own = run / "checkpoints" / "00000020" / "ema.safetensors"
    recipe, self_guided, _ = _sample(run, tmp_path / "s", f"guidance_weights={own}")
    guide = recipe.guidance["guidance_model"]
    assert all(torch.equal(v, recipe.generator.state_dict()[k]) for k, v in guide.state_dict().items())
    _, plain, _ = _sample(run, tmp_path / "p", "sampler.cfg_scale=1.0")
    assert np.abs(self_guided.astype(int) - plain.astype(int)).max() <= 1
    with pytest.raises(CheckpointError, match="guidance_weights .* for 'test-dit'.*shape mismatch"):
        _sample(run, tmp_path / "x", "guidance_model.name=test-dit", f"guidance_weights={own}")
