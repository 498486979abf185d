"""train-generator (and train-tokens) run each tiny shipped pipeline on the digits end to end, and resume."""

import json

import pytest
import yaml

from latentforge_runner import cli
from latentforge_runner.training import list_checkpoints

QUICK = [
    "training.steps=2",
    "training.batch_size=8",
    "training.checkpoint_every=2",
    "training.log_every=1",
    "eval.every=0",
    "eval.num_samples=4",
    "eval.stats_batches=1",
]


@pytest.mark.parametrize("config", ["tiny-rae", "tiny-vavae-lightningdit", "tiny-digit-gpt"])
def test_tiny_pipeline_trains_samples_and_resumes(tmp_path, config):
    sampler = ["eval.sampler.steps=2"]
    if config == "tiny-digit-gpt":  # DiGIT: fit the K-Means tokenizer first
        recipe, km = cli.load_settings(
            None, "tiny-digit-kmeans", [f"run.output_dir={tmp_path}/km", "max_images=256"]
        )
        cli.run_recipe(recipe, km)
        sampler = [f"tokenizer.params.centroids={tmp_path}/km/centroids.safetensors"]
    expected = "train-tokens" if config == "tiny-digit-gpt" else "train-generator"
    recipe, cfg = cli.load_settings(None, config, [*QUICK, *sampler, f"run.output_dir={tmp_path}"])
    cli.run_recipe(recipe, cfg)
    assert [p.name for p in list_checkpoints(tmp_path / "checkpoints")] == ["00000002"]
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert saved["recipe"] == expected and saved["training"]["steps"] == 2
    losses = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in losses] == [1, 2] and all(r["generator/loss"] > 0 for r in losses)
    if config != "tiny-digit-gpt":  # K-Means tokens have no pixel decoder of their own
        assert (tmp_path / "samples" / "00000002.png").is_file()
    # Resume: the same folder with more steps continues from step 2.
    _, longer = cli.load_settings(
        expected, config, [*QUICK, *sampler, f"run.output_dir={tmp_path}", "training.steps=3"]
    )
    cli.run_recipe(recipe, longer)
    assert [p.name for p in list_checkpoints(tmp_path / "checkpoints")] == ["00000002", "00000003"]
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]
