"""DiGIT's two stages on the digits: stage 2 learns VQGAN codes from the K-Means tokens of the same
images, and sample chains GPT → K-Means tokens → stage 2 → VQGAN codes → pixels."""

import json

import numpy as np
import pytest
import torch

from latentforge_core import registry
from latentforge_core.checkpoint import load_checkpoint
from latentforge_runner import cli
from latentforge_runner.config import ConfigError
from latentforge_runner.distributed import seed_batch
from latentforge_runner.recipes.sample import SampleRecipe

QUICK = ["eval.every=0", "eval.num_samples=4"]


@pytest.fixture(scope="module")
def centroids(tmp_path_factory):
    out = tmp_path_factory.mktemp("km")
    recipe, cfg = cli.load_settings(None, "tiny-digit-kmeans", [f"run.output_dir={out}", "max_images=256"])
    cli.run_recipe(recipe, cfg)
    return out / "centroids.safetensors"


def _train(config, out, *extra):
    recipe, cfg = cli.load_settings(None, config, [*QUICK, f"run.output_dir={out}", *extra])
    job = registry.recipes.build(recipe, config=cfg)
    try:
        job.setup()
        job.run()
        job.save()
    finally:
        job.cleanup()
    return job


def test_stage2_learns_and_samples_through_both_stages(centroids, tmp_path):
    _train(
        "tiny-digit-stage2",
        tmp_path / "s2",
        f"condition_tokenizer.params.centroids={centroids}",
        "training.steps=40",
        "training.log_every=5",
        "training.checkpoint_every=40",
        "training.warmup_steps=5",
        "training.lr=3e-3",
    )
    rows = [json.loads(r) for r in (tmp_path / "s2" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["generator/loss"] for r in rows]
    print("stage-2 loss every 5 steps:", [round(x, 3) for x in losses])
    assert losses[-1] < 0.85 * losses[0]
    assert (tmp_path / "s2" / "samples" / "00000040.png").is_file()  # a grid from the first images' tokens

    # Stage 1 (a GPT over the same K-Means tokens), then both stages chained by sample.
    _train(
        "tiny-digit-gpt",
        tmp_path / "s1",
        f"tokenizer.params.centroids={centroids}",
        "training.steps=2",
        "training.batch_size=8",
        "training.checkpoint_every=2",
    )
    _, scfg = cli.load_settings(
        "sample",
        None,
        [
            f"generator_run={tmp_path / 's1'}",
            f"stage2_run={tmp_path / 's2'}",
            f"run.output_dir={tmp_path / 'out'}",
            "num_samples=10",
            "batch_size=5",
            "write_png=false",
        ],
    )
    recipe = SampleRecipe(scfg)
    try:
        recipe.setup()
        recipe.run()
        recipe.save()
    finally:
        recipe.cleanup()
    with np.load(tmp_path / "out" / "samples.npz") as f:
        arr, labels = f["arr_0"], f["arr_1"]
    assert arr.shape == (10, 32, 32, 3) and labels.tolist() == list(range(10))
    trained = load_checkpoint(tmp_path / "s2" / "checkpoints" / "00000040" / "model.safetensors")[0]
    assert all(torch.equal(v, trained[k]) for k, v in recipe.stage2.state_dict().items())
    # The same chain by hand, from the same seed.
    with torch.no_grad():
        parts = []
        for start, y in zip((0, 5), torch.arange(10).split(5), strict=True):
            seed_batch(0, start)  # sample seeds each batch by (run seed, its first index)
            tokens = recipe.generator.sample(y)  # [B, 8, 8] K-Means tokens
            assert tokens.shape == (5, 8, 8) and int(tokens.max()) < 64
            parts.append(recipe.decoder.decode(recipe.stage2.sample(tokens, top_p=0.8)))
    by_hand = (torch.cat(parts).clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).numpy()
    assert np.abs(by_hand.astype(int) - arr.astype(int)).max() <= 1


def test_stage2_bad_pairings(centroids, tmp_path):
    with pytest.raises(ConfigError, match="pairs two discrete tokenizers"):
        _train(
            "tiny-digit-stage2",
            tmp_path / "a",
            "tokenizer.name=test-rae-tiny",
            "tokenizer.params={}",
            f"condition_tokenizer.params.centroids={centroids}",
        )
    _train("tiny-rae", tmp_path / "rae", "training.steps=1", "training.batch_size=8", "eval.stats_batches=1")
    with pytest.raises(ConfigError, match="not a stage-2 run"):
        SampleRecipe(
            cli.load_settings(
                "sample",
                None,
                [
                    f"generator_run={tmp_path / 'rae'}",
                    f"stage2_run={tmp_path / 'rae'}",
                    f"run.output_dir={tmp_path / 'x'}",
                ],
            )[1]
        ).setup()


@pytest.mark.slow
def test_stage2_reads_its_condition(centroids, tmp_path):
    """After 300 steps, held-out codes are likelier under their own images' K-Means tokens than under
    another image's: stage 2 uses the condition, not only the codes' own statistics."""
    import torch.nn.functional as F

    from latentforge_runner.data import Digits

    job = _train(
        "tiny-digit-stage2",
        tmp_path,
        f"condition_tokenizer.params.centroids={centroids}",
        "training.steps=300",
        "training.checkpoint_every=300",
        "training.warmup_steps=5",
        "training.lr=3e-3",
    )
    images = Digits("test", 32).images[:128]
    model = job.generator.eval()
    with torch.no_grad():
        codes, cond = job.tokenizer.encode(images), job.condition.encode(images)

        def nll(shift):
            return float(F.cross_entropy(model(codes, cond.roll(shift, 0)).flatten(0, 1), codes.flatten()))

        own, others = nll(0), [nll(s) for s in (1, 7, 31)]
    print(f"held-out code NLL: own tokens {own:.3f}, other images' tokens {[round(o, 3) for o in others]}")
    assert own + 0.01 < min(others)
