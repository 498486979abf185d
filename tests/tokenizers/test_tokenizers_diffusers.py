"""VA-VAE ↔ diffusers AutoencoderKL: equal outputs both ways on random weights (fp32, 1e-5), lossless
state-dict round trips, the latent scaling as statistics, the ``diffusers-vae`` tokenizer from a
``save_pretrained`` folder, a tiny train-generator run on it, and the settings it refuses."""

import json
import math
import sys

import pytest
import torch

from latentforge_core import registry
from latentforge_core.errors import (
    InputError,
    MissingDependencyError,
    MissingFileError,
    UnsupportedError,
)
from latentforge_tokenizers.diffusers_vae import (
    stats_from_config,
    vavae_from_diffusers,
    vavae_to_diffusers,
)
from latentforge_tokenizers.stats import LatentStats
from latentforge_tokenizers.vavae import VAVAE

diffusers = pytest.importorskip("diffusers")

TOL = 1e-5
SMALL = dict(  # f2, 4 latent channels: 32 px -> 4 x 16 x 16
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
    up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
    block_out_channels=(32, 64),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=32,
    sample_size=32,
)
WITH_ATTENTION = SMALL | dict(  # attention at 16 px in encoder and decoder
    down_block_types=("DownEncoderBlock2D", "AttnDownEncoderBlock2D"),
    up_block_types=("AttnUpDecoderBlock2D", "UpDecoderBlock2D"),
)


def perturb(module: torch.nn.Module, seed: int = 0, scale: float = 0.05) -> torch.nn.Module:
    """Move every weight off its initialisation (GroupNorm affines, biases, zero-initialised convs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return module.eval()


def small_vae(**overrides):
    torch.manual_seed(0)
    return perturb(diffusers.AutoencoderKL(**(SMALL | overrides)))


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def check_same_outputs(ours: VAVAE, vae, size: int = 32) -> None:
    """Posterior moments, posterior samples, and decodes agree (in [-1, 1] space; ours takes [0, 1])."""
    torch.manual_seed(1)
    x = torch.rand(2, 3, size, size)  # [0, 1]
    z = torch.randn(2, *ours.latent_shape[:1], size // ours.downsample, size // ours.downsample)
    with torch.no_grad():
        dist = vae.encode(x * 2 - 1).latent_dist
        post = ours.posterior(x * 2 - 1)
        assert max_diff(ours.encode(x, sample=False), dist.mean) < TOL
        assert max_diff(post.logvar, dist.logvar) < TOL
        sample = ours.encode(x, generator=torch.Generator().manual_seed(3))
        assert max_diff(sample, dist.sample(torch.Generator().manual_seed(3))) < TOL  # same draw
        recon = vae.decode(z).sample  # [-1, 1], unclamped
        assert max_diff(ours.reconstruct(z), recon) < TOL
        assert max_diff(ours.decode(z), ((recon + 1) / 2).clamp(0, 1)) < TOL


# ------------------------------------------------------------------------------------------------
# Ours -> diffusers
# ------------------------------------------------------------------------------------------------
def test_vavae_to_diffusers_equal_outputs():
    torch.manual_seed(0)
    ours = perturb(
        VAVAE(
            ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(16, 8), resolution=32, z_channels=4
        )
    )
    ours.set_stats(LatentStats(torch.rand(4) + 0.5, torch.randn(4)))  # per channel -> latents_mean/std
    vae = vavae_to_diffusers(ours)
    assert isinstance(vae, diffusers.AutoencoderKL) and not vae.training
    assert list(vae.config.down_block_types) == [
        "DownEncoderBlock2D",
        "AttnDownEncoderBlock2D",
        "AttnDownEncoderBlock2D",
    ]
    assert list(vae.config.up_block_types) == [
        "AttnUpDecoderBlock2D",
        "AttnUpDecoderBlock2D",
        "UpDecoderBlock2D",
    ]
    assert vae.config.scaling_factor == 1.0 and len(vae.config.latents_mean) == 4
    check_same_outputs(ours, vae)
    z = torch.randn(2, 4, 8, 8)
    back = stats_from_config(vae.config, 4)  # the statistics survive the config
    assert max_diff(back.normalize(z), ours.stats.normalize(z)) < 1e-6
    # ... and the model comes back as it was (the VF projection, training only, is not carried)
    again = vavae_from_diffusers(vae)
    assert again.config == {**ours.config, "vf_dim": None}
    theirs = again.state_dict()
    assert all(torch.equal(theirs[k], v) for k, v in ours.state_dict().items() if not k.startswith("linear_"))


def test_test_vavae_tiny_is_refused_naming_the_groups():
    """test-vavae-tiny has ch=16: LDM's min(32, C) gives 16 and 32 groups, diffusers has one count."""
    tiny = registry.tokenizers.build("test-vavae-tiny")
    with pytest.raises(UnsupportedError, match="norm_num_groups"):
        vavae_to_diffusers(tiny)


# ------------------------------------------------------------------------------------------------
# diffusers -> ours
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cfg", [SMALL, WITH_ATTENTION], ids=["plain", "attention"])
def test_diffusers_to_vavae_equal_outputs_and_round_trip(cfg):
    torch.manual_seed(0)
    vae = perturb(diffusers.AutoencoderKL(**cfg))
    ours = vavae_from_diffusers(vae)
    assert ours.latent_shape == (4, 16, 16) and ours.linear_proj is None and not ours.training
    assert ours.config["attn_resolutions"] == ([16] if cfg is WITH_ATTENTION else [])
    check_same_outputs(ours, vae)
    # scaling_factor (0.18215, the default) -> statistics: normalize is diffusers' z * scaling_factor
    z = torch.randn(2, 4, 16, 16)
    assert max_diff(ours.stats.normalize(z), z * vae.config.scaling_factor) < 1e-6
    back = vavae_to_diffusers(ours)
    sd, again = vae.state_dict(), back.state_dict()
    assert sd.keys() == again.keys() and all(torch.equal(sd[k], again[k]) for k in sd)
    for key in ("down_block_types", "up_block_types", "block_out_channels"):
        assert list(back.config[key]) == list(vae.config[key])
    assert back.config.layers_per_block == vae.config.layers_per_block
    assert back.config.scaling_factor == pytest.approx(vae.config.scaling_factor, rel=1e-6)
    assert back.config.shift_factor is None and back.config.latents_mean is None


def test_shift_factor_and_no_scaling():
    stats = stats_from_config({"scaling_factor": 0.5, "shift_factor": 0.1}, 4)
    z = torch.randn(1, 4, 2, 2)
    assert max_diff(stats.normalize(z), (z - 0.1) * 0.5) < 1e-6
    assert stats_from_config({"scaling_factor": 1.0}, 4) is None  # nothing to normalise by
    sdxl = {"scaling_factor": 0.5, "latents_mean": [0.1, 0.2, 0.3, 0.4], "latents_std": [1.0, 2.0, 3.0, 4.0]}
    mean, std = torch.tensor(sdxl["latents_mean"]), torch.tensor(sdxl["latents_std"])
    expected = (z - mean[:, None, None]) * 0.5 / std[:, None, None]  # SDXL-style pipelines
    assert max_diff(stats_from_config(sdxl, 4).normalize(z), expected) < 1e-6


# ------------------------------------------------------------------------------------------------
# The diffusers-vae tokenizer
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def vae_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vae")
    vae = small_vae()
    vae.save_pretrained(folder)
    return folder, vae


def test_registry_builds_from_a_save_pretrained_folder(vae_folder, tmp_path):
    folder, vae = vae_folder
    tok = registry.tokenizers.build("diffusers-vae", pretrained=str(folder))
    assert isinstance(tok, VAVAE) and tok.preprocessing.input_size == 32
    assert tok.stats.var.flatten().tolist() == pytest.approx([1 / 0.18215**2] * 4, rel=1e-6)
    check_same_outputs(tok, vae)
    # a pipeline folder: the VAE in vae/; stats=None leaves the statistics to the run; image_size=
    pipe = tmp_path / "pipe"
    vae.save_pretrained(pipe / "vae")
    (pipe / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    tok = registry.tokenizers.build("diffusers-vae", pretrained=str(pipe), stats=None, image_size=64)
    assert tok.stats is None and tok.latent_shape == (4, 32, 32)


def test_hub_ids_fetch_only_the_vae_files(vae_folder, tmp_path, monkeypatch):
    """``hf:<org>/<repo>`` of a pipeline repository: its vae/ config and weights, nothing else."""
    from latentforge_core.hub import HubId, is_hub_id
    from latentforge_tokenizers import diffusers_vae as module

    folder, vae = vae_folder
    vae.save_pretrained(tmp_path / "snapshot" / "vae")  # the repository, as the hub cache holds it
    (tmp_path / "snapshot" / "model_index.json").write_text("{}")
    asked = []

    def fake_resolve(source):
        assert is_hub_id(source)
        hub = HubId.parse(str(source))
        asked.append((hub.repo, hub.file, hub.revision))
        path = tmp_path / "snapshot" / hub.file
        if not path.is_file():
            raise MissingFileError(f"{hub.file} of {hub.repo} is not on the hub")
        return path

    monkeypatch.setattr(module, "resolve", fake_resolve)
    tok = registry.tokenizers.build("diffusers-vae", pretrained="hf:org/pipeline@v1")
    assert tok.latent_shape == (4, 16, 16)
    assert asked == [
        ("org/pipeline", "config.json", "v1"),  # not a model folder: a pipeline
        ("org/pipeline", "vae/config.json", "v1"),
        ("org/pipeline", "vae/diffusion_pytorch_model.safetensors", "v1"),
    ]
    with pytest.raises(MissingFileError, match="unet/config.json"):
        registry.tokenizers.build("diffusers-vae", pretrained="hf:org/pipeline/unet")


def test_train_generator_on_a_diffusers_vae(vae_folder, tmp_path):
    from latentforge_runner import cli
    from latentforge_runner.training import list_checkpoints

    folder, _ = vae_folder
    overrides = [
        "tokenizer.name=diffusers-vae",
        f"tokenizer.params.pretrained={folder}",
        "training.steps=3",
        "training.batch_size=8",
        "training.checkpoint_every=3",
        "training.log_every=1",
        "eval.every=0",
        f"run.output_dir={tmp_path}",
    ]
    cli.run_recipe(*cli.load_settings(None, "tiny-vavae-lightningdit", overrides))
    assert [p.name for p in list_checkpoints(tmp_path / "checkpoints")] == ["00000003"]
    losses = [
        json.loads(line)["generator/loss"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()
    ]
    assert len(losses) == 3 and all(math.isfinite(v) and v > 0 for v in losses)
    stats = LatentStats.load(tmp_path / "latent_stats.safetensors")  # the VAE's own scaling was used
    assert stats.var.flatten().tolist() == pytest.approx([1 / 0.18215**2] * 4, rel=1e-6)


# ------------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------------
def test_other_diffusers_classes_are_refused(tmp_path):
    vq = diffusers.VQModel(
        block_out_channels=(32,), norm_num_groups=32, latent_channels=4, num_vq_embeddings=16
    )
    vq.save_pretrained(tmp_path / "vq")
    with pytest.raises(UnsupportedError, match=r"VQModel.*AutoencoderKL"):
        registry.tokenizers.build("diffusers-vae", pretrained=str(tmp_path / "vq"))
    with pytest.raises(UnsupportedError, match=r"VQModel.*AutoencoderKL"):
        vavae_from_diffusers(vq)
    with pytest.raises(MissingFileError, match="config.json"):
        registry.tokenizers.build("diffusers-vae", pretrained=str(tmp_path))
    with pytest.raises(InputError, match="pretrained="):
        registry.tokenizers.build("diffusers-vae")


@pytest.mark.parametrize(
    "overrides, setting",
    [
        (dict(use_quant_conv=False), "use_quant_conv=False"),
        (dict(use_post_quant_conv=False), "use_post_quant_conv=False"),
        (dict(mid_block_add_attention=False), "mid_block_add_attention=False"),
        (dict(norm_num_groups=16), "norm_num_groups=16"),
        (dict(block_out_channels=(64, 96)), "block_out_channels"),
        (dict(act_fn="gelu"), "act_fn"),
        (dict(in_channels=4), "in_channels=4"),
        (dict(down_block_types=("DownEncoderBlock2D", "AttnDownEncoderBlock2D")), "up_block_types"),
    ],
)
def test_unsupported_settings_are_named(overrides, setting):
    vae = diffusers.AutoencoderKL(**(SMALL | overrides))
    with pytest.raises(UnsupportedError, match=setting):
        vavae_from_diffusers(vae)


def test_missing_diffusers(monkeypatch, vae_folder):
    folder, vae = vae_folder
    monkeypatch.setitem(sys.modules, "diffusers", None)  # import diffusers -> ImportError
    ours = VAVAE(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), resolution=32, z_channels=4)
    for call in (
        lambda: vavae_to_diffusers(ours),
        lambda: vavae_from_diffusers(vae),
        lambda: registry.tokenizers.build("diffusers-vae", pretrained=str(folder)),
    ):
        with pytest.raises(MissingDependencyError, match="pip install diffusers"):
            call()
