"""sample turns released files (official key layouts, random weights here) into samples.npz with no
Python: by local path, and by hub id from a local huggingface_hub cache with HF_HUB_OFFLINE=1."""

import numpy as np
import pytest
import torch

from latentforge_core import registry
from latentforge_runner import cli
from latentforge_runner.config import ConfigError
from latentforge_runner.generation import initial_noise

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def release(tmp_path):
    """RAE's stage-2 training checkpoint layout ({"ema", "model"}) of a tiny DiT-DH and RAE's stat.pt."""
    torch.manual_seed(0)
    generator = registry.generators.build("test-ditdh", in_channels=64, input_size=8, num_classes=10)
    noise = {k: torch.randn_like(v) for k, v in generator.backbone.state_dict().items()}
    torch.save({"model": noise, "ema": generator.backbone.state_dict()}, tmp_path / "stage2_model.pt")
    stats = {"mean": torch.randn(64, 8, 8), "var": torch.rand(64, 8, 8) + 0.5}
    torch.save(stats, tmp_path / "stat.pt")
    return tmp_path, generator


def _sample(out, generator_weights, stats, *extra):
    argv = [
        "generator.name=test-ditdh",
        f"generator.params.pretrained={generator_weights}",
        "tokenizer.name=test-rae-tiny",
        f"tokenizer.params.stats={stats}",
        "num_classes=10",
        "num_samples=10",
        "batch_size=5",
        "write_png=false",
        "sampler={steps: 3}",
        f"run.output_dir={out}",
        *extra,
    ]
    recipe, cfg = cli.load_settings("sample", None, argv)
    cli.run_recipe(recipe, cfg)
    with np.load(out / "samples.npz") as f:
        return f["arr_0"], f["arr_1"]


def _by_hand(generator, stats_file):
    """The released EMA over the tokenizer normalised by the release's statistics, from the starting
    noise sample draws for each index (run seed, index)."""
    from latentforge_tokenizers.stats import LatentStats

    torch.manual_seed(0)  # sample builds the (random test) tokenizer after seeding with run.seed
    tokenizer = registry.tokenizers.build("test-rae-tiny").eval()
    tokenizer.set_stats(LatentStats.load(stats_file))
    parts = []
    with torch.no_grad():
        for start, y in zip((0, 5), torch.arange(10).split(5), strict=True):
            noise = initial_noise(0, range(start, start + 5), generator.input_shape)
            z = generator.eval().sample(y, steps=3, noise=noise)
            parts.append(tokenizer.decode(z, normalize=True).float().clamp(0, 1))
    return (torch.cat(parts) * 255).round().byte().permute(0, 2, 3, 1).numpy()


def test_released_files_by_path(release):
    folder, generator = release
    arr, labels = _sample(folder / "out", folder / "stage2_model.pt", folder / "stat.pt")
    assert arr.shape == (10, 32, 32, 3) and labels.tolist() == list(range(10))
    assert np.abs(arr.astype(int) - _by_hand(generator, folder / "stat.pt").astype(int)).max() <= 1


def test_released_files_by_hub_id_offline(release, tmp_path, monkeypatch):
    import huggingface_hub.constants as hc

    folder, generator = release
    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(cache))
    repo = cache / "models--nyu-visionx--RAE-tiny"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    snap = repo / "snapshots" / COMMIT
    (snap / "stats").mkdir(parents=True)
    (snap / "stage2_model.pt").write_bytes((folder / "stage2_model.pt").read_bytes())
    (snap / "stats" / "stat.pt").write_bytes((folder / "stat.pt").read_bytes())
    arr, _ = _sample(
        tmp_path / "hub-out",
        "hf:nyu-visionx/RAE-tiny/stage2_model.pt",
        "hf:nyu-visionx/RAE-tiny/stats/stat.pt",
    )
    assert np.abs(arr.astype(int) - _by_hand(generator, folder / "stat.pt").astype(int)).max() <= 1
    with pytest.raises(Exception, match="not in the local hub cache"):
        _sample(tmp_path / "x", "hf:nyu-visionx/RAE-tiny/absent.pt", folder / "stat.pt")


def test_a_release_needs_its_tokenizer_statistics_and_classes(release):
    folder, _ = release
    with pytest.raises(ConfigError, match="has no latent statistics"):
        _sample(folder / "a", folder / "stage2_model.pt", "null", "tokenizer.params={}")
    with pytest.raises(ConfigError, match="one generator"):
        recipe, cfg = cli.load_settings("sample", None, [f"run.output_dir={folder / 'b'}"])
        cli.run_recipe(recipe, cfg)
