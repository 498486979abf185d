"""sample turns released files (official key layouts, random weights here) into samples.npz with no
Python: by local path, and by hub id from a local huggingface_hub cache with HF_HUB_OFFLINE=1."""

import numpy as np
import pytest
import torch

from latentforge_core import registry
from latentforge_core.checkpoint import CheckpointError
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
    # The 512-px release (16×16 latents here) given to the 256-px protocol: named by hub id and size.
    torch.save({"ema": _backbone_state(input_size=16)}, snap / "stage2_512.pt")
    with pytest.raises(CheckpointError, match="RAE-tiny/stage2_512.pt holds weights for .*input_size=16"):
        _sample(tmp_path / "y", "hf:nyu-visionx/RAE-tiny/stage2_512.pt", folder / "stat.pt")


def _backbone_state(**shape):
    generator = registry.generators.build("test-ditdh", **{"in_channels": 64, "input_size": 8, **shape})
    return generator.backbone.state_dict()


@pytest.mark.parametrize(
    ("shape", "named"),
    [
        ({"input_size": 16}, "input_size=16, but this DiTDH is built for in_channels=64, input_size=8"),
        ({"in_channels": 32}, "in_channels=32, input_size=8, but this DiTDH is built for in_channels=64"),
    ],
    ids=["another-resolution", "another-latent-width"],
)
def test_weights_of_another_resolution_or_latent_size_are_named(release, tmp_path, shape, named):
    """A protocol given the release of another resolution (or another tokenizer's latents): one error
    naming the file, both latent shapes and what to do, not a list of tensor mismatches."""
    folder, _ = release
    torch.save({"ema": _backbone_state(**shape)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="another resolution or on another tokenizer") as err:
        _sample(tmp_path / "o", tmp_path / "other.pt", folder / "stat.pt")
    assert str(tmp_path / "other.pt") in str(err.value) and named in str(err.value)
    assert "mismatch" not in str(err.value)


def test_a_release_needs_its_tokenizer_statistics_and_classes(release):
    folder, _ = release
    with pytest.raises(ConfigError, match="has no latent statistics"):
        _sample(folder / "a", folder / "stage2_model.pt", "null", "tokenizer.params={}")
    with pytest.raises(ConfigError, match="one generator"):
        recipe, cfg = cli.load_settings("sample", None, [f"run.output_dir={folder / 'b'}"])
        cli.run_recipe(recipe, cfg)


@pytest.fixture
def digit_release(tmp_path):
    """DiGIT's released files at tiny size: fairseq stage-1/stage-2 checkpoints ({"model": …}), the
    K-Means centroids as km_8k.npy (float32 [K, D]) and MAGE's VQGAN checkpoint ({"state_dict": …})."""
    from layouts import random_fairseq_stage1, random_fairseq_stage2

    K, V, D = 64, 64, 64  # test-kmeans-tiny's clusters and feature width, test-vqgan-tiny's codebook
    np.save(tmp_path / "km_8k.npy", torch.randn(K, D, generator=torch.Generator().manual_seed(1)).numpy())
    for classes, name in ((10, "stage1_cond.pt"), (0, "stage1_uncond.pt")):
        torch.save({"model": random_fairseq_stage1(K, classes, 32, 2, seed=classes)}, tmp_path / name)
    torch.save({"model": random_fairseq_stage2(V, K, 32, 2, seed=2)}, tmp_path / "stage2.pt")
    torch.manual_seed(3)
    vqgan = registry.tokenizers.build("test-vqgan-tiny", image_size=32)
    torch.save({"state_dict": vqgan.state_dict()}, tmp_path / "vqgan_jax_strongaug.ckpt")
    return tmp_path


def _digit_argv(folder, stage1, num_classes, out):
    return [
        "generator.name=gpt-digit-base",
        f"generator.params={{pretrained: {folder / stage1}, num_heads: 4}}",
        "tokenizer.name=test-kmeans-tiny",
        f"tokenizer.params.centroids={folder / 'km_8k.npy'}",
        "stage2.name=digit-stage2-ar-base",
        f"stage2.params={{pretrained: {folder / 'stage2.pt'}, num_heads: 4}}",
        "stage2_tokenizer.name=test-vqgan-tiny",
        f"stage2_tokenizer.params={{image_size: 32, pretrained: {folder / 'vqgan_jax_strongaug.ckpt'}}}",
        f"num_classes={num_classes}",
        "num_samples=10",
        "batch_size=5",
        "write_png=false",
        "sampler={top_k: 20}",
        f"run.output_dir={out}",
    ]


@pytest.mark.parametrize("num_classes", [10, 0], ids=["class-conditional", "unconditional"])
def test_digit_released_stages_chain_into_samples(digit_release, tmp_path, num_classes):
    """Stage 1's K-Means tokens → stage 2's VQGAN codes → pixels, from DiGIT's file layouts alone; equal
    to the same chain built by hand from the loaders (seeded per batch as sample seeds it)."""
    from latentforge_generators.digit_stage2 import load_digit_stage2
    from latentforge_generators.gpt import load_digit_stage1
    from latentforge_runner.distributed import seed_batch

    folder = digit_release
    stage1 = "stage1_cond.pt" if num_classes else "stage1_uncond.pt"
    cli.run_recipe(
        *cli.load_settings("sample", None, _digit_argv(folder, stage1, num_classes, tmp_path / "o"))
    )
    with np.load(tmp_path / "o" / "samples.npz") as f:
        arr, files = f["arr_0"], f.files
    assert arr.shape == (10, 32, 32, 3)
    assert ("arr_1" in files) == bool(num_classes)  # an unconditional model's samples have no labels

    gpt = load_digit_stage1(str(folder / stage1), num_heads=4, grid_size=(8, 8)).eval()
    stage2 = load_digit_stage2(str(folder / "stage2.pt"), num_heads=4, grid_size=(8, 8)).eval()
    vqgan = registry.tokenizers.build(
        "test-vqgan-tiny", image_size=32, pretrained=folder / "vqgan_jax_strongaug.ckpt"
    ).eval()
    parts = []
    with torch.no_grad():
        for start in (0, 5):
            seed_batch(0, start)
            y = torch.arange(start, start + 5) % 10 if num_classes else 5
            tokens = gpt.sample(y, top_k=20)
            parts.append(vqgan.decode(stage2.sample(tokens)).float().clamp(0, 1))
    by_hand = (torch.cat(parts) * 255).round().byte().permute(0, 2, 3, 1).numpy()
    np.testing.assert_array_equal(arr, by_hand)


def test_digit_release_bad_pairings(digit_release, tmp_path):
    argv = _digit_argv(digit_release, "stage1_cond.pt", 10, tmp_path / "o")
    without_vqgan = [a for a in argv if not a.startswith("stage2_tokenizer")]
    with pytest.raises(ConfigError, match="needs stage2_tokenizer, the VQGAN"):
        cli.run_recipe(*cli.load_settings("sample", None, without_vqgan))
    without_stage2 = [a for a in argv if not a.startswith("stage2")]
    with pytest.raises(ConfigError, match="no pixel decoder .* give stage2 and stage2_tokenizer"):
        cli.run_recipe(*cli.load_settings("sample", None, without_stage2))


# LightningDiT's protocol (repro-lightningdit-xl-800ep's sampler block) with a few steps.
LIGHTNINGDIT_SAMPLER = {
    "sampler": "euler",
    "steps": 4,
    "shift": 1 / 0.3,
    "t_end": 0.0,
    "cfg_scale": 6.7,
    "cfg_interval": [0.0, 0.875],
    "cfg_channels": 3,
    "amp": False,
}


@pytest.fixture
def lightningdit_release(tmp_path):
    """LightningDiT's released files at tiny size: the DiT's {"model", "ema", "opt", "config"} .pt, the
    VA-VAE's Lightning .pt ({"state_dict": …} with loss.*/foundation_model.*, no linear_proj) and
    latents_stats.pt ({"mean", "std"}, each [1, C, 1, 1])."""
    from layouts import write_latents_stats, write_lightningdit_release, write_vavae_release

    torch.manual_seed(0)
    generator = registry.generators.build("test-lightningdit", in_channels=8, input_size=8, num_classes=10)
    ema = write_lightningdit_release(tmp_path / "lightningdit.pt", generator.backbone.state_dict(), seed=4)
    torch.manual_seed(5)
    write_vavae_release(tmp_path / "vavae.pt", registry.tokenizers.build("test-vavae-tiny").state_dict())
    write_latents_stats(tmp_path / "latents_stats.pt", 8, seed=6)
    return tmp_path, ema


def _lightningdit_by_hand(folder, ema, labels, sampler):
    """The released EMA (checked to be what the loader took) sampled from the per-index noise, decoded
    by the released VA-VAE after z = z_n·std + mean."""
    generator = registry.generators.build(
        "test-lightningdit",
        in_channels=8,
        input_size=8,
        num_classes=10,
        pretrained=folder / "lightningdit.pt",
    ).eval()
    for k, v in generator.backbone.state_dict().items():
        torch.testing.assert_close(v, ema[k], rtol=0, atol=0, msg=k)
    tokenizer = registry.tokenizers.build(
        "test-vavae-tiny", pretrained=folder / "vavae.pt", stats=folder / "latents_stats.pt"
    ).eval()
    parts = []
    with torch.no_grad():
        for start, y in zip((0, 5), labels.split(5), strict=True):
            noise = initial_noise(0, range(start, start + 5), tokenizer.latent_shape)
            z = generator.sample(y, noise=noise, **sampler)
            parts.append(tokenizer.decode(z, normalize=True).float().clamp(0, 1))
    return (torch.cat(parts) * 255).round().byte().permute(0, 2, 3, 1).numpy()


@pytest.mark.parametrize("linear_proj", [False, True], ids=["vavae-inference-keys", "vavae-with-linear-proj"])
def test_lightningdit_vavae_released_files_by_path(lightningdit_release, tmp_path, linear_proj):
    """LightningDiT + VA-VAE from their released layouts with the official sampler's shape (Euler,
    shift, CFG on the first 3 channels within an interval): samples.npz equals the chain by hand. The
    VA-VAE file loads with or without the VF loss's linear_proj (training only)."""
    import yaml
    from layouts import write_vavae_release

    folder, ema = lightningdit_release
    if linear_proj:
        torch.manual_seed(5)
        state = registry.tokenizers.build("test-vavae-tiny").state_dict()
        write_vavae_release(folder / "vavae.pt", state, linear_proj=True)
    argv = [
        "generator.name=test-lightningdit",
        f"generator.params.pretrained={folder / 'lightningdit.pt'}",
        "tokenizer.name=test-vavae-tiny",
        f"tokenizer.params={{pretrained: {folder / 'vavae.pt'}, stats: {folder / 'latents_stats.pt'}}}",
        "num_classes=10",
        "num_samples=10",
        "batch_size=5",
        "write_png=false",
        f"sampler={yaml.safe_dump(LIGHTNINGDIT_SAMPLER, default_flow_style=True).strip()}",
        f"run.output_dir={tmp_path / 'o'}",
    ]
    cli.run_recipe(*cli.load_settings("sample", None, argv))
    with np.load(tmp_path / "o" / "samples.npz") as f:
        arr, labels = f["arr_0"], f["arr_1"]
    assert arr.shape == (10, 32, 32, 3) and labels.tolist() == list(range(10))
    by_hand = _lightningdit_by_hand(folder, ema, torch.arange(10), LIGHTNINGDIT_SAMPLER)
    assert np.abs(arr.astype(int) - by_hand.astype(int)).max() <= 1
    assert arr.std() > 5  # not one flat colour: the weights reached the pixels


def _hub_cache(monkeypatch, cache, files):
    """A local huggingface_hub cache holding ``files`` ({"org/repo/path": source}) at COMMIT, offline."""
    import huggingface_hub.constants as hc

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(cache))
    for name, source in files.items():
        org, repo, path = name.split("/", 2)
        folder = cache / f"models--{org}--{repo}"
        (folder / "refs").mkdir(parents=True, exist_ok=True)
        (folder / "refs" / "main").write_text(COMMIT)
        (folder / "snapshots" / COMMIT / path).parent.mkdir(parents=True, exist_ok=True)
        (folder / "snapshots" / COMMIT / path).write_bytes(source.read_bytes())


def test_lightningdit_repro_config_by_hub_id_offline(lightningdit_release, tmp_path, monkeypatch):
    """The repro-lightningdit-xl-800ep config itself, its hub ids served from a local cache offline, with
    only the sizes overridden (the tiny models, 10 classes, 10 samples, 4 steps): its protocol's
    random labels, shift, CFG scale/channels/interval reach samples.npz as the chain by hand makes it."""
    import json

    folder, ema = lightningdit_release
    dit = "hustvl/lightningdit-xl-imagenet256-800ep/lightningdit-xl-imagenet256-800ep.pt"
    vae = "hustvl/vavae-imagenet256-f16d32-dinov2"
    _hub_cache(
        monkeypatch,
        tmp_path / "hub",
        {
            dit: folder / "lightningdit.pt",
            f"{vae}/vavae-imagenet256-f16d32-dinov2.pt": folder / "vavae.pt",
            f"{vae}/latents_stats.pt": folder / "latents_stats.pt",
        },
    )
    overrides = [
        "generator.name=test-lightningdit",
        f"generator.params.pretrained=hf:{dit}",
        "tokenizer.name=test-vavae-tiny",
        f"tokenizer.params.pretrained=hf:{vae}/vavae-imagenet256-f16d32-dinov2.pt",
        f"tokenizer.params.stats=hf:{vae}/latents_stats.pt",
        "num_classes=10",
        "num_samples=10",
        "batch_size=5",
        "sampler.steps=4",
        f"run.output_dir={tmp_path / 'o'}",
    ]
    recipe, cfg = cli.load_settings(None, "repro-lightningdit-xl-800ep", overrides)
    assert recipe == "sample" and cfg.sampler == LIGHTNINGDIT_SAMPLER and cfg.labels == "random"
    cli.run_recipe(recipe, cfg)
    with np.load(tmp_path / "o" / "samples.npz") as f:
        arr, labels = f["arr_0"], f["arr_1"]
    # labels=random: uniform draws seeded by run.seed (0), as torch.randint over the classes
    expected = torch.randint(10, (10,), generator=torch.Generator().manual_seed(0))
    assert labels.tolist() == expected.tolist() and len(set(labels.tolist())) > 1
    by_hand = _lightningdit_by_hand(folder, ema, expected, LIGHTNINGDIT_SAMPLER)
    assert np.abs(arr.astype(int) - by_hand.astype(int)).max() <= 1
    protocol = json.loads((tmp_path / "o" / "protocol.json").read_text())
    assert protocol["paper"]["fid"] == 1.35 and protocol["sampler"] == LIGHTNINGDIT_SAMPLER
    assert protocol["generator"]["params"]["pretrained"] == f"hf:{dit}"


DIGIT_HUB = {  # each released file's setting and its hub id in the test cache
    "stage1_cond.pt": "generator.params.pretrained",
    "km_8k.npy": "tokenizer.params.centroids",
    "stage2.pt": "stage2.params.pretrained",
    "vqgan_jax_strongaug.ckpt": "stage2_tokenizer.params.pretrained",
}


@pytest.mark.parametrize(
    "by_id",
    [
        pytest.param(("stage1_cond.pt", "stage2.pt", "vqgan_jax_strongaug.ckpt"), id="checkpoints"),
        pytest.param(tuple(DIGIT_HUB), id="checkpoints-and-centroids"),
    ],
)
def test_digit_released_files_by_hub_id_offline(digit_release, tmp_path, monkeypatch, by_id):
    """DiGIT's released files (stage 1, the K-Means centroids, stage 2, MAGE's VQGAN) named by hub ids
    served from a local cache offline (the local copies deleted): the same samples.npz as by path."""
    folder, repo = digit_release, "DAMO-NLP-SG/DiGIT-tiny"
    _hub_cache(monkeypatch, tmp_path / "hub", {f"{repo}/{n}": folder / n for n in DIGIT_HUB})
    argv = _digit_argv(folder, "stage1_cond.pt", 10, tmp_path / "p")
    cli.run_recipe(*cli.load_settings("sample", None, argv))
    for name in by_id:  # only the cache has them now
        (folder / name).unlink()
    hub = [f"{DIGIT_HUB[n]}=hf:{repo}/{n}" for n in by_id]
    cli.run_recipe(*cli.load_settings("sample", None, [*argv, *hub, f"run.output_dir={tmp_path / 'h'}"]))
    with np.load(tmp_path / "p" / "samples.npz") as by_path, np.load(tmp_path / "h" / "samples.npz") as hub:
        np.testing.assert_array_equal(hub["arr_0"], by_path["arr_0"])
        np.testing.assert_array_equal(hub["arr_1"], by_path["arr_1"])
