"""The MaskGIT/MAGE f16 VQGAN that DiGIT's second stage decodes through, and its training loss.

A taming-style convolutional autoencoder with a 1024 × 256 codebook and no attention: the encoder
downsamples by 2×2 average pooling, the decoder upsamples by nearest ×2 + a 3×3 conv.  MAGE's
port of the JAX checkpoint (``vqgan_jax_strongaug.ckpt``) has two traits a loader depends on: the
3×3 convs of a residual block carry no bias, and when a block changes width its 1×1
``nin_shortcut`` (out → out channels) is applied to the block's *output* h, giving nin(h) + h
instead of nin(x) + h.  Our module names equal MAGE's keys, so its state dict loads strictly.
Pixels are in [0, 1] on both sides; there is no quant_conv / post_quant_conv.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from latentforge_core.checkpoint import CheckpointError, load_into, load_state_file, save_checkpoint
from latentforge_core.errors import (
    InputError,
    StateError,
    check_divisible,
    check_int,
    check_int_sequence,
    check_ints,
    check_number,
)
from latentforge_core.protocols import Preprocessing
from latentforge_tokenizers.codebook import check_token_ids, nearest
from latentforge_tokenizers.losses import LPIPS, adaptive_weight, gate, hinge_d_loss, hinge_g_loss

#################################################################################
#                                 Building blocks                               #
#################################################################################


def group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, channels, eps=1e-6)


class ResnetBlock(nn.Module):
    """norm → swish → conv3×3 (no bias), twice; a width change adds ``nin_shortcut(h)``, not ``nin(x)``."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.norm1 = group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
        self.norm2 = group_norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.changes_width = in_channels != out_channels
        if self.changes_width:
            self.nin_shortcut = nn.Conv2d(out_channels, out_channels, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))  # B C_out H W
        h = self.conv2(F.silu(self.norm2(h)))  # B C_out H W
        skip = self.nin_shortcut(h) if self.changes_width else x  # MAGE's quirk: the shortcut reads h
        return skip + h


class Level(nn.Module):
    """One resolution: ``block`` (residual blocks) and, between resolutions, ``upsample`` or a 2×2 pool."""

    def __init__(self, channels: list[int], resample: str | None):
        super().__init__()
        self.block = nn.ModuleList(
            ResnetBlock(a, b) for a, b in zip(channels[:-1], channels[1:], strict=True)
        )
        self.resample = resample
        if resample == "up":
            self.upsample = nn.Module()
            self.upsample.conv = nn.Conv2d(channels[-1], channels[-1], 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.block:
            x = block(x)
        if self.resample == "down":
            x = F.avg_pool2d(x, 2)  # B C H/2 W/2
        elif self.resample == "up":
            x = self.upsample.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))  # B C 2H 2W
        return x


class Middle(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels)
        self.block_2 = ResnetBlock(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.block_1(x))


#################################################################################
#                                Encoder / Decoder                              #
#################################################################################


class Encoder(nn.Module):
    def __init__(
        self, *, ch: int, ch_mult: tuple[int, ...], num_res_blocks: int, z_channels: int, in_channels: int = 3
    ):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1, bias=False)
        widths = [ch] + [ch * m for m in ch_mult]
        self.down = nn.ModuleList(
            Level([widths[i]] + [widths[i + 1]] * num_res_blocks, "down" if i < len(ch_mult) - 1 else None)
            for i in range(len(ch_mult))
        )
        self.mid = Middle(widths[-1])
        self.norm_out = group_norm(widths[-1])
        self.conv_out = nn.Conv2d(widths[-1], z_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)  # B ch H W
        for level in self.down:
            h = level(h)  # B C H/2^i W/2^i
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))  # B z h w


class Decoder(nn.Module):
    def __init__(
        self,
        *,
        ch: int,
        ch_mult: tuple[int, ...],
        num_res_blocks: int,
        z_channels: int,
        out_channels: int = 3,
    ):
        super().__init__()
        widths = [ch * m for m in ch_mult]
        self.conv_in = nn.Conv2d(z_channels, widths[-1], 3, padding=1)
        self.mid = Middle(widths[-1])
        # up[i] works at the resolution of encoder level i; it is run from the coarsest level up.
        self.up = nn.ModuleList(
            Level(
                [widths[min(i + 1, len(widths) - 1)]] + [widths[i]] * num_res_blocks, "up" if i > 0 else None
            )
            for i in range(len(ch_mult))
        )
        self.norm_out = group_norm(widths[0])
        self.conv_out = nn.Conv2d(widths[0], out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))  # B C h w
        for level in reversed(self.up):
            h = level(h)  # B C 2h 2w
        return self.conv_out(F.silu(self.norm_out(h)))  # B 3 H W


#################################################################################
#                                   Quantizer                                   #
#################################################################################


class VectorQuantizer(nn.Module):
    """Nearest codeword in squared L2, straight-through gradient, codebook + β·commitment loss.

    ``legacy=True`` reproduces taming's ``VectorQuantizer2`` default that MAGE trained with: β
    multiplies the codebook term ‖sg(z) − e‖², not the commitment term ‖z − sg(e)‖².
    """

    def __init__(self, n_embed: int, embed_dim: int, beta: float = 0.25, legacy: bool = True):
        super().__init__()
        self.embedding = nn.Embedding(n_embed, embed_dim)
        self.beta, self.legacy = beta, legacy

    def indices(self, z: torch.Tensor) -> torch.Tensor:
        """Code ids ``[B, h, w]`` of a latent ``[B, C, h, w]`` (fp32 distances)."""
        ids, _ = nearest(
            rearrange(z.detach(), "b c h w -> (b h w) c"),
            self.embedding.weight.detach(),
            what="latents",
            with_distances=False,
        )
        return rearrange(ids, "(b h w) -> b h w", b=z.shape[0], h=z.shape[2])

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Codewords ``[B, C, h, w]`` of ids ``[B, h, w]``."""
        check_token_ids(ids, self.embedding.num_embeddings)
        return rearrange(self.embedding(ids), "b h w c -> b c h w")

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        ids = self.indices(z)  # B h w
        z_q = rearrange(self.embedding(ids), "b h w c -> b c h w")  # B C h w
        codebook = F.mse_loss(z_q, z.detach())
        commitment = F.mse_loss(z, z_q.detach())
        loss = commitment + self.beta * codebook if self.legacy else codebook + self.beta * commitment
        return z + (z_q - z).detach(), loss, ids


#################################################################################
#                                      VQGAN                                    #
#################################################################################


class VQGAN(nn.Module):
    """Images in [0, 1] ``[B, 3, H, W]`` ↔ code ids ``[B, H/f, W/f]`` (int64), f = 2^(len(ch_mult)−1)."""

    def __init__(
        self,
        *,
        ch: int = 128,
        ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4),
        num_res_blocks: int = 2,
        z_channels: int = 256,
        n_embed: int = 1024,
        image_size: int = 256,
        beta: float = 0.25,
    ):
        super().__init__()
        check_ints("VQGAN", ch=ch, num_res_blocks=num_res_blocks, z_channels=z_channels, n_embed=n_embed)
        check_int(image_size, "image_size", owner="VQGAN")
        check_int_sequence(ch_mult, "ch_mult", owner="VQGAN")
        check_number(beta, "beta", low=0, owner="VQGAN")
        if ch % 32:
            raise InputError(f"ch must be a multiple of 32 (GroupNorm with 32 groups), got {ch}")
        check_divisible(image_size, "image_size", 2 ** (len(ch_mult) - 1), "the downsampling", owner="VQGAN")
        self.config = dict(
            ch=ch,
            ch_mult=tuple(ch_mult),
            num_res_blocks=num_res_blocks,
            z_channels=z_channels,
            n_embed=n_embed,
            image_size=image_size,
            beta=beta,
        )
        self.downsample = 2 ** (len(ch_mult) - 1)
        self.preprocessing = Preprocessing(input_size=image_size, resize="bicubic")
        self.encoder = Encoder(ch=ch, ch_mult=ch_mult, num_res_blocks=num_res_blocks, z_channels=z_channels)
        self.decoder = Decoder(ch=ch, ch_mult=ch_mult, num_res_blocks=num_res_blocks, z_channels=z_channels)
        self.quantize = VectorQuantizer(n_embed, z_channels, beta=beta)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """Convs and norms keep PyTorch's defaults (as taming); the codebook is U(−1/K, 1/K)."""
        n = self.quantize.embedding.num_embeddings
        nn.init.uniform_(self.quantize.embedding.weight, -1.0 / n, 1.0 / n)

    # ---------------------------------------------------------------------------- tokenizer protocol
    can_decode = True
    stats = None  # discrete codes are not normalised

    @property
    def vocab_size(self) -> int:
        return self.quantize.embedding.num_embeddings

    @property
    def latent_shape(self) -> tuple[int, int]:
        size = self.preprocessing.input_size // self.downsample
        return (size, size)

    def _check_images(self, images: torch.Tensor) -> None:
        if images.ndim != 4 or images.shape[1] != 3 or not images.is_floating_point():
            raise InputError(
                f"expected float RGB images [B, 3, H, W] in [0, 1], got {images.dtype} {tuple(images.shape)}"
            )
        if images.shape[-1] % self.downsample or images.shape[-2] % self.downsample:
            raise InputError(
                f"image sides must be multiples of {self.downsample}, got {tuple(images.shape[-2:])}"
            )

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Code ids ``[B, H/f, W/f]`` (int64) of images in [0, 1]."""
        self._check_images(images)
        return self.quantize.indices(self.encoder(images))

    @torch.no_grad()
    def decode(self, ids: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] ``[B, 3, f·h, f·w]`` from code ids ``[B, h, w]``."""
        if ids.ndim != 3:
            raise InputError(f"expected code ids [B, h, w], got shape {tuple(ids.shape)}")
        return self.decoder(self.quantize.embed(ids)).clamp(0, 1)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(reconstruction, unclamped; quantizer loss; code ids) — the training path."""
        self._check_images(images)
        z_q, qloss, ids = self.quantize(self.encoder(images))  # B z h w
        return self.decoder(z_q), qloss, ids  # B 3 H W

    # ---------------------------------------------------------------------------- files
    def load_mage(self, source: str | os.PathLike | dict[str, torch.Tensor]) -> VQGAN:
        """Load MAGE's ``vqgan_jax_strongaug.ckpt`` layout (or our safetensors) strictly."""
        state = load_state_file(source) if isinstance(source, (str, os.PathLike)) else dict(source)
        if "state_dict" in state and isinstance(state["state_dict"], dict):
            state = state["state_dict"]
        bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
        if bad:
            raise CheckpointError(f"a VQGAN state dict maps names to tensors; {bad[:4]} are not tensors")
        load_into(self, state, strict=True)
        return self

    def save(self, path: str | os.PathLike) -> Path:
        return save_checkpoint(self.state_dict(), path, {"kind": "vqgan", **self.config})


#################################################################################
#                                 Training loss                                 #
#################################################################################


class VQGANLoss(nn.Module):
    """taming's VQ objective: |x − x̂| + w_p·LPIPS, + quantizer loss, + adaptive-weighted hinge GAN.

    ``lpips`` and ``discriminator`` are passed in (``losses.lpips_vgg()``, ``PatchGANDiscriminator``);
    ``None`` turns that term off.  Both see images mapped from [0, 1] to [−1, 1].
    """

    def __init__(
        self,
        *,
        lpips: LPIPS | None = None,
        discriminator: nn.Module | None = None,
        perceptual_weight: float = 1.0,
        codebook_weight: float = 1.0,
        disc_start: int = 0,
        disc_weight: float = 0.8,
        disc_factor: float = 1.0,
    ):
        super().__init__()
        self.lpips, self.discriminator = lpips, discriminator
        self.perceptual_weight, self.codebook_weight = perceptual_weight, codebook_weight
        self.disc_start, self.disc_weight, self.disc_factor = disc_start, disc_weight, disc_factor

    def generator_loss(
        self, images: torch.Tensor, recon: torch.Tensor, qloss: torch.Tensor, model: VQGAN, step: int
    ) -> tuple[torch.Tensor, dict[str, float]]:
        x, x_hat = images * 2 - 1, recon * 2 - 1
        rec = (x - x_hat).abs().mean(dim=(1, 2, 3))  # B
        p = (
            self.lpips(x, x_hat)
            if self.lpips is not None and self.perceptual_weight > 0
            else torch.zeros_like(rec)
        )
        nll = (rec + self.perceptual_weight * p).mean()
        loss = nll + self.codebook_weight * qloss
        logs = {"rec": rec.mean().item(), "lpips": p.mean().item(), "qloss": qloss.item()}
        gan_on = gate(step, self.disc_start, self.disc_factor)
        if self.discriminator is not None and gan_on > 0 and self.training:
            g = hinge_g_loss(self.discriminator(x_hat.contiguous()))
            w = adaptive_weight(nll, g, model.decoder.conv_out.weight) * self.disc_weight
            loss = loss + w * gan_on * g
            logs.update(g_loss=g.item(), d_weight=w.item())
        logs["loss"] = loss.item()
        return loss, logs

    def discriminator_loss(self, images: torch.Tensor, recon: torch.Tensor, step: int) -> torch.Tensor:
        if self.discriminator is None:
            raise StateError("this VQGANLoss has no discriminator")
        real = self.discriminator(images.detach() * 2 - 1)
        fake = self.discriminator(recon.detach() * 2 - 1)
        return gate(step, self.disc_start, self.disc_factor) * hinge_d_loss(real, fake)


def train_step(
    model: VQGAN,
    loss_fn: VQGANLoss,
    images: torch.Tensor,
    opt: torch.optim.Optimizer,
    step: int,
    disc_opt: torch.optim.Optimizer | None = None,
) -> dict[str, float]:
    """One generator update, then (with a discriminator and its optimizer) one discriminator update."""
    recon, qloss, _ = model(images)
    loss, logs = loss_fn.generator_loss(images, recon, qloss, model, step)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    if loss_fn.discriminator is not None and disc_opt is not None and gate(step, loss_fn.disc_start) > 0:
        d_loss = loss_fn.discriminator_loss(images, recon, step)
        disc_opt.zero_grad(set_to_none=True)
        d_loss.backward()
        disc_opt.step()
        logs["d_loss"] = d_loss.item()
    return logs


#################################################################################
#                                  VQGAN sizes                                  #
#################################################################################


# Registry name -> the VQGAN keyword arguments of that model; one builder per row below.
SIZES: dict[str, dict] = {
    "vqgan-f16-1024": dict(
        ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, z_channels=256, n_embed=1024, image_size=256
    ),
    "test-vqgan-tiny": dict(
        ch=32, ch_mult=(1, 1, 2), num_res_blocks=1, z_channels=32, n_embed=64, image_size=16
    ),
}


def build_vqgan(name: str, pretrained: str | os.PathLike | None = None, **overrides: Any) -> VQGAN:
    if name not in SIZES:
        raise InputError(f"unknown VQGAN {name!r}; expected one of {sorted(SIZES)}")
    model = VQGAN(**{**SIZES[name], **overrides})
    return model.load_mage(pretrained) if pretrained is not None else model


def vqgan_f16_1024(**kw: Any) -> VQGAN:
    """MAGE/MaskGIT f16 VQGAN; ``pretrained`` = ``vqgan_jax_strongaug.ckpt`` or our safetensors."""
    return build_vqgan("vqgan-f16-1024", **kw)


def tiny_vqgan(**kw: Any) -> VQGAN:
    """16 px images → 4×4 codes of a 64-entry codebook: for tests and demos."""
    return build_vqgan("test-vqgan-tiny", **kw)
