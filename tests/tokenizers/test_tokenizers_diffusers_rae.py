"""RAE ↔ diffusers AutoencoderRAE: equal encodes and decodes both ways on random weights (fp32, 1e-5)
for its DINOv2-with-registers and MAE encoders, lossless state-dict round trips, the latent
statistics, the ``diffusers-rae`` tokenizer from a ``save_pretrained`` folder (and a tiny
train-generator run on it), and what is refused."""

import json
import math

import pytest
import torch

from latentforge_core import registry
from latentforge_core.errors import InputError, MissingFileError, UnsupportedError
from latentforge_encoders.zoo import build_encoder
from latentforge_tokenizers.diffusers_rae import rae_from_diffusers, rae_to_diffusers
from latentforge_tokenizers.rae import RAE, RAEDecoder
from latentforge_tokenizers.stats import LatentStats

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")

TOL = 1e-5
# registry encoder, input size, decoder patch: 4×4 or 2×2 tokens of width 64 → 16-px images
ENCODERS = {
    "dinov2": ("dinov2-vits14-reg", 56, 4, {}),  # 518-px position grid resized to 4×4 (antialiased)
    "mae": ("mae-vitb16", 32, 8, {"mlp_hidden_dim": 3072}),  # transformers' default MLP width
}


def perturb(module: torch.nn.Module, seed: int, scale: float = 0.05) -> torch.nn.Module:
    """Move every weight off its initialisation (LayerScale, norms, zero-initialised tokens)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return module


def tiny_rae(kind: str, stats: str | None = "element") -> RAE:
    name, size, patch, extra = ENCODERS[kind]
    encoder = build_encoder(
        name, embed_dim=64, depth=2, num_heads=1, features="rae", image_size=size, **extra
    )
    c, h, w = encoder.feature_shape()
    decoder = RAEDecoder(latent_dim=c, hidden_size=32, depth=1, num_heads=2, mlp_dim=64, patch_size=patch,
                         num_patches=h * w)  # fmt: skip
    model = RAE(encoder, decoder, noise_tau=0.3)
    perturb(model.encoder.vit, 1)
    perturb(model.decoder, 2)
    g = torch.Generator().manual_seed(3)
    shape = (c, h, w) if stats == "element" else (c, 1, 1)
    if stats is not None:
        var, mean = torch.rand(shape, generator=g) + 0.5, torch.randn(shape, generator=g)
        model.set_stats(LatentStats(var, mean, eps=1e-5))
    return model.eval()


def tiny_diffusers_rae(**overrides):
    cfg = dict(
        encoder_type="dinov2", encoder_hidden_size=64, encoder_patch_size=14, encoder_num_hidden_layers=2,
        decoder_hidden_size=32, decoder_num_hidden_layers=1, decoder_num_attention_heads=2,
        decoder_intermediate_size=64, patch_size=8, encoder_input_size=56, noise_tau=0.2,
    )  # fmt: skip
    vae = diffusers.AutoencoderRAE(**(cfg | overrides))
    return perturb(vae, 4).eval()


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def check_same_outputs(ours: RAE, vae) -> None:
    """Normalised latents and decodes of normalised latents agree (images in [0, 1] on both sides)."""
    g = torch.Generator().manual_seed(5)
    x = torch.rand(2, 3, 16, 16, generator=g)
    with torch.no_grad():
        latents = vae.encode(x).latent
        assert latents.shape[1:] == ours.latent_shape
        normalize = ours.stats is not None
        assert max_diff(ours.encode(x, normalize=normalize), latents) < TOL
        z = torch.randn(latents.shape, generator=g)
        raw = ours.stats.denormalize(z) if normalize else z
        assert max_diff(ours.reconstruct(raw), vae.decode(z).sample) < TOL


# ------------------------------------------------------------------------------------------------
# Conformance
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("stats", ["element", "channel", None])
@pytest.mark.parametrize("kind", sorted(ENCODERS))
def test_ours_to_diffusers_gives_the_same_outputs(kind, stats):
    ours = tiny_rae(kind, stats)
    vae = rae_to_diffusers(ours).eval()
    assert vae.config.encoder_type == kind and vae.noise_tau == pytest.approx(0.3)
    check_same_outputs(ours, vae)


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        dict(
            latents_mean=torch.full((64, 1, 1), 0.1),
            latents_std=torch.rand(64, 1, 1) + 0.5,
            scaling_factor=1.5,
        ),
        dict(encoder_patch_size=16, encoder_input_size=64),  # DINOv2 at patch 16: a 32×32 grid of 518 px
        dict(encoder_type="mae", encoder_patch_size=16, encoder_input_size=32),
    ],
)
def test_diffusers_to_ours_gives_the_same_outputs(overrides):
    vae = tiny_diffusers_rae(**overrides)
    ours = rae_from_diffusers(vae)
    assert ours.noise_tau == pytest.approx(0.2) and ours.noise_law == "code"
    assert ours.stats is not None  # diffusers divides by latents_std + 1e-5 even with none given
    check_same_outputs(ours, vae)


def test_state_dicts_round_trip_bit_identically():
    ours = tiny_rae("dinov2")
    back = rae_from_diffusers(rae_to_diffusers(ours))
    a, b = ours.state_dict(), back.state_dict()
    assert set(a) == set(b)
    # the encoder's final-norm affine is unused by an RAE (its latent norm has none) and absent there
    differ = sorted(k for k in a if not torch.equal(a[k], b[k]))
    assert differ == ["encoder.vit.norm.bias", "encoder.vit.norm.weight"]
    assert torch.allclose(back.stats.var, ours.stats.var + ours.stats.eps, rtol=1e-6)

    vae = tiny_diffusers_rae(latents_mean=torch.randn(64, 4, 4), latents_std=torch.rand(64, 4, 4) + 0.5)
    with torch.no_grad():
        vae.encoder.embeddings.mask_token.zero_()  # DINOv2's mask token: unused by an RAE, not kept
    again = rae_to_diffusers(rae_from_diffusers(vae))
    a, b = vae.state_dict(), again.state_dict()
    assert set(a) == set(b)
    stats = ["_latents_mean", "_latents_std"]  # through var = (std + 1e-5)²: equal to fp32 rounding
    assert [k for k in a if k not in stats and not torch.equal(a[k], b[k])] == []
    assert all(torch.allclose(a[k], b[k], rtol=1e-6, atol=1e-7) for k in stats)


def test_a_16x16_grid_saves_exactly_and_another_grid_is_warned_of(tmp_path, caplog):
    """diffusers rebuilds the decoder's sin-cos table on loading, scaled for a 16×16 grid."""
    name = ENCODERS["dinov2"][0]
    encoder = build_encoder(name, embed_dim=64, depth=1, num_heads=1, features="rae", image_size=224)
    decoder = RAEDecoder(latent_dim=64, hidden_size=32, depth=1, num_heads=2, mlp_dim=64, patch_size=1,
                         num_patches=256)  # fmt: skip
    ours = RAE(encoder, perturb(decoder, 6)).eval()
    with caplog.at_level("WARNING", logger="latentforge"):
        rae_to_diffusers(ours).save_pretrained(tmp_path / "rae16")
    assert "position table" not in caplog.text
    loaded = diffusers.AutoencoderRAE.from_pretrained(tmp_path / "rae16").eval()
    z = torch.randn(2, 64, 16, 16)
    with torch.no_grad():
        assert max_diff(ours.reconstruct(z), loaded.decode(z).sample) < TOL
    with caplog.at_level("WARNING", logger="latentforge"):
        rae_to_diffusers(tiny_rae("dinov2"))
    assert "position table" in caplog.text and "4×4" in caplog.text


# ------------------------------------------------------------------------------------------------
# The diffusers-rae tokenizer
# ------------------------------------------------------------------------------------------------
@pytest.fixture
def rae_folder(tmp_path):
    """A diffusers AutoencoderRAE folder making 32-px images from 64×4×4 latents."""
    vae = tiny_diffusers_rae(
        latents_mean=torch.full((64, 1, 1), 0.05), latents_std=torch.full((64, 1, 1), 0.9)
    )
    vae.save_pretrained(tmp_path / "rae")
    return tmp_path / "rae", vae


def test_tokenizer_from_a_save_pretrained_folder(rae_folder):
    folder, vae = rae_folder
    tok = registry.tokenizers.build("diffusers-rae", pretrained=str(folder))
    assert isinstance(tok, RAE) and tok.latent_shape == (64, 4, 4) and tok.preprocessing.input_size == 32
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert max_diff(tok.encode(x, normalize=True), vae.encode(x).latent) < TOL
    assert registry.tokenizers.build("diffusers-rae", pretrained=str(folder), stats=None).stats is None


def test_train_generator_on_a_diffusers_rae(rae_folder, tmp_path):
    from latentforge_runner import cli
    from latentforge_runner.training import list_checkpoints

    folder, _ = rae_folder
    overrides = [
        "tokenizer.name=diffusers-rae",
        f"tokenizer.params.pretrained={folder}",
        "training.steps=2",
        "training.batch_size=4",
        "training.checkpoint_every=2",
        "training.log_every=1",
        "eval.every=0",
        f"run.output_dir={tmp_path / 'run'}",
    ]
    cli.run_recipe(*cli.load_settings(None, "tiny-rae", overrides))
    assert [p.name for p in list_checkpoints(tmp_path / "run" / "checkpoints")] == ["00000002"]
    losses = [
        json.loads(line)["generator/loss"]
        for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    ]
    assert len(losses) == 2 and all(math.isfinite(v) and v > 0 for v in losses)


# ------------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------------
def test_encoders_diffusers_cannot_build_are_refused_by_name():
    with pytest.raises(UnsupportedError, match=r"num_heads=4 \(diffusers: 1\)"):  # 16-wide heads
        rae_to_diffusers(registry.tokenizers.build("test-rae-tiny"))
    ours = tiny_rae("dinov2")
    ours.encoder.spec = type(ours.encoder.spec)((-1,), "affine", "map")
    with pytest.raises(UnsupportedError, match="LayerNorm without affine"):
        rae_to_diffusers(ours)
    with pytest.raises(UnsupportedError, match="eps"):
        rae_to_diffusers(
            RAE(tiny_rae("dinov2").encoder, RAEDecoder(latent_dim=64, hidden_size=32, depth=1, num_heads=2,
                                                       mlp_dim=64, patch_size=4, num_patches=16, eps=1e-6))
        )  # fmt: skip


def test_other_diffusers_classes_are_refused(tmp_path):
    kl = diffusers.AutoencoderKL(block_out_channels=(32,), norm_num_groups=32, latent_channels=4)
    kl.save_pretrained(tmp_path / "kl")
    for call in (
        lambda: registry.tokenizers.build("diffusers-rae", pretrained=str(tmp_path / "kl")),
        lambda: rae_from_diffusers(kl),
    ):
        with pytest.raises(
            UnsupportedError, match=r"AutoencoderKL; the diffusers-rae tokenizer converts AutoencoderRAE only"
        ):
            call()
    with pytest.raises(
        UnsupportedError, match=r"AutoencoderRAE; the diffusers-vae tokenizer converts AutoencoderKL only"
    ):
        registry.tokenizers.build("diffusers-vae", pretrained=str(_saved(tmp_path)))
    with pytest.raises(MissingFileError, match="config.json"):
        registry.tokenizers.build("diffusers-rae", pretrained=str(tmp_path))
    with pytest.raises(InputError, match="pretrained="):
        registry.tokenizers.build("diffusers-rae")
    with pytest.raises(TypeError, match="expects an RAE"):
        rae_to_diffusers(kl)


def _saved(tmp_path):
    tiny_diffusers_rae().save_pretrained(tmp_path / "rae")
    return tmp_path / "rae"
