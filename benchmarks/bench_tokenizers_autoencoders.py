"""Continuous tokenizers: encode/decode images/s of VA-VAE and of RAE's ViT-B/L/XL decoders at 256 px,
and one training step's images/s, with decoder GFLOPs per image next to them.

Full size: VA-VAE f16d32 (peer: diffusers' AutoencoderKL in the same configuration, random weights),
RAE decoders on a 768×16×16 latent (peer: diffusers' RAEDecoder), RAE encoding with DINOv2-B/14-reg at
224 px; batch 8 (training steps: batch 2).  FLOPs come from ``torch.utils.flop_counter`` (2 per
multiply-add); reference/rae.md quotes ≈22/78/107 G multiply-adds for the ViT-B/L/XL decoders and
≈310 G for the SD-VAE decoder.  The tiny run uses the ``test-*`` sizes at 32 px.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from latentforge_core.device import autocast
from latentforge_tokenizers.discriminators import PatchGANDiscriminator
from latentforge_tokenizers.losses import RAELoss, VAVAELoss
from latentforge_tokenizers.lpips import LPIPS
from latentforge_tokenizers.rae import RAE_DECODERS, RAEDecoder, build_rae, tiny_rae
from latentforge_tokenizers.vavae import build_vavae


def flops_of(fn) -> float:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def vavae_model(full: bool, device):
    return build_vavae("vavae-f16d32" if full else "test-vavae-tiny").to(device)


def diffusers_vae(full: bool, device):
    from diffusers import AutoencoderKL

    if full:
        widths, blocks, latent, size = (128, 128, 256, 256, 512), 2, 32, 256
    else:
        widths, blocks, latent, size = (16, 32, 32), 1, 8, 32
    n = len(widths)
    return (
        AutoencoderKL(
            down_block_types=("DownEncoderBlock2D",) * (n - 1) + ("AttnDownEncoderBlock2D",),
            up_block_types=("AttnUpDecoderBlock2D",) + ("UpDecoderBlock2D",) * (n - 1),
            block_out_channels=widths,
            layers_per_block=blocks,
            latent_channels=latent,
            norm_num_groups=min(32, widths[0]),
            sample_size=size,
        )
        .to(device)
        .eval()
    )


# ------------------------------------------------------------------------------------------------
# VA-VAE
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("impl", ["ours", "diffusers"])
@pytest.mark.parametrize("op", ["encode", "decode"])
def test_vavae_images_per_second(measure, full, device, op, impl):
    batch, size = (8, 256) if full else (2, 32)
    x = torch.rand(batch, 3, size, size, device=device)
    if impl == "ours":
        model = vavae_model(full, device).eval()
        z = torch.randn(batch, *model.latent_shape, device=device)
        fn = (lambda: model.encode(x, sample=False)) if op == "encode" else (lambda: model.decode(z))
        dec_flops = flops_of(lambda: model.reconstruct(z[:1]))
    else:
        model = diffusers_vae(full, device)
        z = torch.randn(
            batch,
            model.config.latent_channels,
            size // 2 ** (len(model.config.block_out_channels) - 1),
            size // 2 ** (len(model.config.block_out_channels) - 1),
            device=device,
        )
        fn = (
            (lambda: model.encode(x * 2 - 1).latent_dist.mean)
            if op == "encode"
            else (lambda: model.decode(z).sample)
        )
        dec_flops = flops_of(lambda: model.decode(z[:1]).sample)

    def run():
        with torch.no_grad(), autocast(device):
            return fn()

    measure(
        run,
        group=f"vavae-{op}",
        impl=impl,
        items=batch,
        unit="images/s",
        flops=dec_flops * batch if op == "decode" else None,
    )
    print(f"VA-VAE decoder ({impl}): {dec_flops / 1e9:.1f} GFLOPs/image")


# ------------------------------------------------------------------------------------------------
# RAE
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("impl", ["ours", "diffusers"])
@pytest.mark.parametrize("size", ["ViT-B", "ViT-L", "ViT-XL"])
def test_rae_decoder_images_per_second(measure, full, device, size, impl):
    from diffusers.models.autoencoders.autoencoder_rae import RAEDecoder as PeerDecoder

    batch = 8 if full else 2
    cfg = RAE_DECODERS[size] if full else RAE_DECODERS["test-tiny"]
    c, n, p = (768, 256, 16) if full else (64, 64, 4)
    if impl == "ours":
        dec = RAEDecoder(latent_dim=c, patch_size=p, num_patches=n, **cfg).to(device).eval()
        call = lambda t: dec.unpatchify(dec(t))  # noqa: E731
    else:
        dec = (
            PeerDecoder(
                hidden_size=c,
                decoder_hidden_size=cfg["hidden_size"],
                decoder_num_hidden_layers=cfg["depth"],
                decoder_num_attention_heads=cfg["num_heads"],
                decoder_intermediate_size=cfg["mlp_dim"],
                num_patches=n,
                patch_size=p,
                image_size=p * int(n**0.5),
            )
            .to(device)
            .eval()
        )
        call = lambda t: dec.unpatchify(dec(t).logits)  # noqa: E731
    tokens = torch.randn(batch, n, c, device=device)
    per_image = flops_of(lambda: call(tokens[:1]))

    def run():
        with torch.no_grad(), autocast(device):
            return call(tokens)

    measure(run, group=f"rae-decode-{size}", impl=impl, items=batch, unit="images/s", flops=per_image * batch)
    print(
        f"RAE {size} decoder ({impl}): {per_image / 1e9:.1f} GFLOPs/image "
        f"({per_image / 2e9:.1f} G multiply-adds)"
    )


def test_rae_encode_images_per_second(measure, full, device):
    batch = 8 if full else 2
    model = (build_rae("dinov2-vitb14-reg", "ViT-B") if full else tiny_rae()).to(device)
    x = torch.rand(batch, 3, 256 if full else 32, 256 if full else 32, device=device)

    def run():
        with torch.no_grad(), autocast(device):
            return model.encode(x)

    measure(run, group="rae-encode", impl="ours", items=batch, unit="images/s")


# ------------------------------------------------------------------------------------------------
# One training step (generator + discriminator update)
# ------------------------------------------------------------------------------------------------
def test_vavae_training_step_images_per_second(measure, full, device):
    from latentforge_core import registry
    from latentforge_encoders.encoder import FeatureSpec

    torch.manual_seed(0)
    batch = 2
    model = vavae_model(full, device).train()
    if full:  # DINOv2-L/14 (random weights) at 224 px: 16×16×1024, the latent's grid
        vf = registry.encoders.build("dinov2-vitl14", features="vavae")
    else:
        vf = registry.encoders.build("test-vit-tiny", features=FeatureSpec((-1,), "affine", "map"))
    loss_fn = (
        VAVAELoss(vf_encoder=vf, lpips=LPIPS(), discriminator=PatchGANDiscriminator(), disc_start=0)
        .to(device)
        .train()
    )
    opt = torch.optim.Adam(list(model.parameters()) + [loss_fn.logvar], lr=1e-4, betas=(0.5, 0.9))
    opt_d = torch.optim.Adam(loss_fn.discriminator.parameters(), lr=1e-4, betas=(0.5, 0.9))
    x = torch.rand(batch, 3, 256 if full else 32, 256 if full else 32, device=device) * 2 - 1

    def step():
        out = model(x)
        loss, _ = loss_fn.generator_loss(x, out, model, step=1)
        opt.zero_grad()
        loss.backward()
        opt.step()
        d_loss = loss_fn.discriminator_loss(x, out["recon"], step=1)
        opt_d.zero_grad()
        d_loss.backward()
        opt_d.step()

    measure(step, group="vavae-train-step", impl="ours", items=batch, unit="images/s")


@pytest.mark.parametrize("size", ["ViT-B", "ViT-XL"])
def test_rae_training_step_images_per_second(measure, full, device, size):
    from latentforge_tokenizers.discriminators import dino_discriminator

    torch.manual_seed(0)
    batch = 2
    if full:
        model = build_rae("dinov2-vitb14-reg", size, noise_tau=0.8).to(device).train()
        disc = dino_discriminator()
    else:
        from latentforge_encoders.vit import VisionTransformer
        from latentforge_tokenizers.discriminators import DiffAug, DinoDiscriminator

        model = tiny_rae(noise_tau=0.8).train()
        trunk = VisionTransformer(
            image_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2, act="gelu_tanh"
        )
        disc = DinoDiscriminator(trunk, input_size=32, key_depths=(1, 2), kernel_size=3, augment=DiffAug())
    loss_fn = RAELoss(disc.to(device), lpips=LPIPS(), disc_start=0, disc_update_start=0).to(device).train()
    opt = torch.optim.AdamW(model.decoder.parameters(), lr=2e-4, betas=(0.9, 0.95))
    opt_d = torch.optim.AdamW([p for p in disc.parameters() if p.requires_grad], lr=2e-4, betas=(0.9, 0.95))
    x = torch.rand(batch, 3, 256 if full else 32, 256 if full else 32, device=device)

    def step():
        loss, _ = loss_fn.generator_loss(x, model(x), model.decoder.decoder_pred.weight, epoch=0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            fake = model.eval()(x)
        model.train()
        d_loss = loss_fn.discriminator_loss(x, fake, epoch=0)
        opt_d.zero_grad()
        d_loss.backward()
        opt_d.step()

    measure(step, group=f"rae-train-step-{size}", impl="ours", items=batch, unit="images/s")
