"""MAGE VQGAN ↔ diffusers VQModel: the same pre-quantisation latents, codes and decodes both ways on
random weights (fp32, 1e-5), the ``diffusers-vqmodel`` tokenizer from a ``save_pretrained`` folder,
and the exact layer named when a VQModel is not of our VQGAN's form."""

import pytest
import torch

from latentforge_core import registry
from latentforge_core.errors import InputError, UnsupportedError
from latentforge_tokenizers.diffusers_vqmodel import vqgan_from_diffusers, vqgan_to_diffusers
from latentforge_tokenizers.vqgan import VQGAN

diffusers = pytest.importorskip("diffusers")

TOL = 1e-5


def tiny_vqgan(ch_mult=(1, 1, 2), num_res_blocks=1) -> VQGAN:
    """Width changes in the encoder's last level and the decoder's (MAGE's nin(h) + h blocks)."""
    torch.manual_seed(0)
    model = VQGAN(
        ch=32, ch_mult=ch_mult, num_res_blocks=num_res_blocks, z_channels=8, n_embed=16, image_size=16
    )
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model.eval()


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def check_same_function(ours: VQGAN, vae) -> None:
    """Pre-quantisation latents, code ids and decodes agree (images in [0, 1] on both sides)."""
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        latents = vae.encode(x).latents
        assert max_diff(ours.encoder(x), latents) < TOL
        ids = ours.encode(x)
        assert torch.equal(ids.flatten(), vae.quantize(latents)[2][2].flatten())
        assert max_diff(ours.decoder(ours.quantize.embed(ids)), vae.decode(latents).sample) < TOL


@pytest.mark.parametrize("ch_mult, blocks", [((1, 1, 2), 1), ((1, 2), 2)])
def test_ours_to_diffusers_and_back_compute_the_same_function(ch_mult, blocks):
    ours = tiny_vqgan(ch_mult, blocks)
    vae = vqgan_to_diffusers(ours).eval()
    assert vae.config.layers_per_block == blocks and not vae.config.mid_block_add_attention
    check_same_function(ours, vae)
    back = vqgan_from_diffusers(vae)
    check_same_function(back, vae)
    # every tensor but the folded width-changing blocks comes back as it was
    a, b = ours.state_dict(), back.state_dict()
    folded = {k.rsplit(".", 2)[0] for k in a if "nin_shortcut" in k}
    assert folded and all(torch.equal(a[k], b[k]) for k in a if k.rsplit(".", 2)[0] not in folded)


def test_the_quirk_matters_and_is_carried():
    """Reading the shortcut from the block's input (the usual resnet) gives another function."""
    ours = tiny_vqgan()
    vae = vqgan_to_diffusers(ours).eval()
    block = vae.encoder.down_blocks[2].resnets[0]  # 32 → 64: a width change
    with torch.no_grad():
        block.conv_shortcut.weight.normal_(0, 0.1)
    x = torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        assert max_diff(ours.encoder(x), vae.encode(x).latents) > 1e-3
    with pytest.raises(UnsupportedError, match=r"encoder\.down_blocks\.2\.resnets\.0\.conv_shortcut\.weight"):
        vqgan_from_diffusers(vae)


def test_tokenizer_from_a_save_pretrained_folder(tmp_path):
    ours = tiny_vqgan()
    vqgan_to_diffusers(ours).save_pretrained(tmp_path / "vq")
    tok = registry.tokenizers.build("diffusers-vqmodel", pretrained=str(tmp_path / "vq"))
    assert isinstance(tok, VQGAN) and tok.vocab_size == 16 and tok.latent_shape == (4, 4)
    x = torch.rand(2, 3, 16, 16)
    ids = ours.encode(x)
    assert torch.equal(tok.encode(x), ids)
    assert max_diff(tok.decode(ids), ours.decode(ids)) < TOL


# ------------------------------------------------------------------------------------------------
# What does not map
# ------------------------------------------------------------------------------------------------
def test_a_diffusers_trained_vqmodel_is_refused_naming_the_layer():
    vae = diffusers.VQModel(
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(32, 64), latent_channels=8, num_vq_embeddings=16, mid_block_add_attention=False,
    )  # fmt: skip
    with pytest.raises(UnsupportedError, match=r"encoder\.conv_in\.bias.*no bias"):
        vqgan_from_diffusers(vae)
    with pytest.raises(UnsupportedError, match="mid_block_add_attention=True"):
        vqgan_from_diffusers(diffusers.VQModel(block_out_channels=(32,), latent_channels=4))
    converted = vqgan_to_diffusers(tiny_vqgan())
    with torch.no_grad():
        converted.encoder.down_blocks[0].downsamplers[0].conv.weight.add_(0.01)
    with pytest.raises(UnsupportedError, match=r"downsamplers\.0\.conv.*average pooling"):
        vqgan_from_diffusers(converted)
    converted = vqgan_to_diffusers(tiny_vqgan())
    with torch.no_grad():
        converted.decoder.up_blocks[1].resnets[1].conv2.weight.add_(0.01)
    with pytest.raises(UnsupportedError, match=r"up_blocks\.1\.resnets\.1: not an identity.*1 blocks"):
        vqgan_from_diffusers(converted)


def test_ch_mult_not_starting_at_one_is_refused():
    with pytest.raises(UnsupportedError, match=r"ch_mult\[0\] = 1"):
        vqgan_to_diffusers(tiny_vqgan(ch_mult=(2, 2)))


def test_other_diffusers_classes_are_refused(tmp_path):
    kl = diffusers.AutoencoderKL(block_out_channels=(32,), norm_num_groups=32, latent_channels=4)
    kl.save_pretrained(tmp_path / "kl")
    for call in (
        lambda: registry.tokenizers.build("diffusers-vqmodel", pretrained=str(tmp_path / "kl")),
        lambda: vqgan_from_diffusers(kl),
    ):
        with pytest.raises(
            UnsupportedError,
            match=r"AutoencoderKL; the diffusers-vqmodel tokenizer converts VQModel only.*AutoencoderRAE",
        ):
            call()
    with pytest.raises(InputError, match="pretrained="):
        registry.tokenizers.build("diffusers-vqmodel")
