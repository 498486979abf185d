"""GAN discriminators for autoencoder training: taming's PatchGAN and RAE's frozen-DINO discriminator.

PatchGAN (VQGAN, VA-VAE) keeps taming-transformers' ``NLayerDiscriminator`` key layout (``main.{i}``)
so its released discriminator weights load.  The DINO discriminator (RAE, after StyleGAN-T) runs a
frozen DINO ViT-S/8 trunk and trains only small spectral-norm 1-D conv heads on the tokens of several
blocks; its inputs go through DiffAug (translation + colour), applied independently to real and fake.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from latentforge_core.checkpoint import load_into, load_state_file
from latentforge_core.errors import InputError
from latentforge_encoders.convert import to_ours
from latentforge_encoders.vit import VisionTransformer

# ImageNet statistics of the DINO trunk, used to map [-1, 1] images to its input space.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# ------------------------------------------------------------------------------------------------
# PatchGAN (taming NLayerDiscriminator)
# ------------------------------------------------------------------------------------------------
class PatchGANDiscriminator(nn.Module):
    """``D(x [B, 3, H, W] in [-1, 1]) → logits [B, 1, h, w]``, one per overlapping patch."""

    def __init__(self, in_channels: int = 3, ndf: int = 64, n_layers: int = 3):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, ndf, 4, 2, 1), nn.LeakyReLU(0.2)]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2**n, 8)
            stride = 2 if n < n_layers else 1  # the last hidden conv keeps the resolution
            layers += [
                nn.Conv2d(ndf * prev, ndf * mult, 4, stride, 1, bias=False),
                nn.BatchNorm2d(ndf * mult),
                nn.LeakyReLU(0.2),
            ]
        layers.append(nn.Conv2d(ndf * mult, 1, 4, 1, 1))
        self.main = nn.Sequential(*layers)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)  # B 1 h w


# ------------------------------------------------------------------------------------------------
# DiffAug (differentiable augmentation: translation, colour)
# ------------------------------------------------------------------------------------------------
class DiffAug(nn.Module):
    """Per-sample random integer translation (±``translation`` of the size, zero fill) and colour jitter.

    Colour: brightness + U(-0.5, 0.5), saturation × U(0, 2), contrast × U(0.5, 1.5).  Each kind is
    switched on for the whole batch with probability ``prob``; everything is differentiable in x.
    """

    def __init__(self, prob: float = 1.0, translation: float = 0.125, colour: bool = True):
        super().__init__()
        if not 0.0 <= prob <= 1.0:
            raise InputError(f"DiffAug prob must lie in [0, 1], got {prob}")
        self.prob, self.translation, self.colour = prob, translation, colour

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        if self.translation > 0 and torch.rand(()) < self.prob:
            dh, dw = round(h * self.translation), round(w * self.translation)
            sh = torch.randint(-dh, dh + 1, (b, 1, 1), device=x.device)
            sw = torch.randint(-dw, dw + 1, (b, 1, 1), device=x.device)
            rows = (torch.arange(h, device=x.device).view(1, h, 1) + sh + 1).clamp(0, h + 1)  # B h 1
            cols = (torch.arange(w, device=x.device).view(1, 1, w) + sw + 1).clamp(0, w + 1)  # B 1 w
            padded = F.pad(x, (1, 1, 1, 1)).permute(0, 2, 3, 1)  # B H+2 W+2 C, zero border
            x = padded[torch.arange(b, device=x.device).view(b, 1, 1), rows, cols].permute(0, 3, 1, 2)
        if self.colour and torch.rand(()) < self.prob:
            r = torch.rand(3, b, 1, 1, 1, device=x.device, dtype=x.dtype)
            x = x + (r[0] - 0.5)
            mean = x.mean(dim=1, keepdim=True)
            x = (x - mean) * (2 * r[1]) + mean
            mean = x.mean(dim=(1, 2, 3), keepdim=True)
            x = (x - mean) * (r[2] + 0.5) + mean
        return x


# ------------------------------------------------------------------------------------------------
# DINO discriminator (frozen ViT trunk + spectral-norm heads)
# ------------------------------------------------------------------------------------------------
class BatchNormLocal(nn.Module):
    """Per-sample, per-channel normalisation over tokens (a batch norm with virtual batch size 1)."""

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # B C N
        var, mean = torch.var_mean(x.float(), dim=2, keepdim=True, correction=0)
        x = (x - mean) / torch.sqrt(var + self.eps)
        return x * self.weight[:, None] + self.bias[:, None]


def _conv_block(channels: int, kernel_size: int, eps: float) -> nn.Sequential:
    conv = nn.Conv1d(channels, channels, kernel_size, padding=kernel_size // 2, padding_mode="circular")
    return nn.Sequential(nn.utils.spectral_norm(conv), BatchNormLocal(channels, eps), nn.LeakyReLU(0.2))


class _Residual(nn.Module):
    def __init__(self, fn: nn.Module):
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.fn(x) + x) / math.sqrt(2)


class DinoDiscriminator(nn.Module):
    """``D(x [B, 3, H, W] in [-1, 1]) → logits [B, (len(key_depths) + 1) · N]``.

    ``trunk`` is a ViT with ``forward_blocks(x, layers)`` (latentforge_encoders' VisionTransformer;
    DINO ViT-S/8 for RAE).  It stays frozen and outside ``parameters()``' trainable set; one head per
    tapped block (the last block first, then ``key_depths``).  Inputs are resized to the trunk's
    ``input_size`` and mapped to ImageNet statistics; DiffAug is applied when ``augment`` is given.
    """

    def __init__(
        self,
        trunk: nn.Module,
        *,
        input_size: int = 224,
        key_depths: Sequence[int] = (2, 5, 8, 11),
        kernel_size: int = 9,
        norm_eps: float = 1e-6,
        augment: DiffAug | None = None,
    ):
        super().__init__()
        depth = len(trunk.blocks)
        self.layers = [depth - 1] + [d for d in key_depths if d < depth]
        self.trunk = trunk.requires_grad_(False).eval()
        self.input_size = input_size
        self.augment = augment
        c = trunk.embed_dim
        self.heads = nn.ModuleList(
            nn.Sequential(
                _conv_block(c, 1, norm_eps),
                _Residual(_conv_block(c, kernel_size, norm_eps)),
                nn.utils.spectral_norm(nn.Conv1d(c, 1, 1)),
            )
            for _ in self.layers
        )
        mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
        self.register_buffer("x_scale", (0.5 / std).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("x_shift", ((0.5 - mean) / std).view(1, 3, 1, 1), persistent=False)

    def train(self, mode: bool = True) -> DinoDiscriminator:
        super().train(mode)
        self.trunk.eval()  # the trunk is a fixed feature extractor
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.augment is not None:
            x = self.augment(x)
        if x.shape[-2:] != (self.input_size, self.input_size):
            x = F.interpolate(x, size=(self.input_size,) * 2, mode="bilinear", align_corners=False)
        x = x * self.x_scale + self.x_shift  # B 3 S S, ImageNet-normalised
        skip = self.trunk.num_prefix_tokens  # CLS (+ registers)
        feats = self.trunk.forward_blocks(x, self.layers)  # [B, 1+R+N, C] per tapped block
        logits = [
            head(f[:, skip:].transpose(1, 2)).flatten(1) for head, f in zip(self.heads, feats, strict=True)
        ]
        return torch.cat(logits, dim=1)  # B (L·N)


# RAE's discriminator trunks (DINO v1 ViTs at 224 px, tanh-GELU, LayerNorm eps 1e-6).
DINO_TRUNKS = {
    "S_8": dict(patch_size=8, embed_dim=384, depth=12, num_heads=6),
    "S_16": dict(patch_size=16, embed_dim=384, depth=12, num_heads=6),
    "B_16": dict(patch_size=16, embed_dim=768, depth=12, num_heads=12),
}


def dino_trunk(
    recipe: str = "S_8", weights: str | os.PathLike | None = None, **overrides
) -> VisionTransformer:
    """A DINO ViT for the discriminator; ``weights`` is the DINO ``.pth`` (timm/DINO key names).

    As in RAE, the key part of every qkv bias is zeroed on load (softmax ignores it anyway, so only
    the state differs, never the output)."""
    if recipe not in DINO_TRUNKS:
        raise InputError(f"unknown DINO trunk {recipe!r}; expected one of {sorted(DINO_TRUNKS)}")
    vit = VisionTransformer(
        **{"image_size": 224, "act": "gelu_tanh", "norm_eps": 1e-6, **DINO_TRUNKS[recipe], **overrides}
    )
    if weights is not None:
        sd = to_ours(load_state_file(weights))
        for key in [k for k in sd if k.endswith("attn.qkv.bias")]:
            c = sd[key].numel() // 3
            sd[key] = torch.cat([sd[key][:c], torch.zeros_like(sd[key][c : 2 * c]), sd[key][2 * c :]])
        load_into(vit, sd)
    return vit


def dino_discriminator(
    weights: str | os.PathLike | None = None,
    *,
    recipe: str = "S_8",
    kernel_size: int = 9,
    key_depths: Sequence[int] = (2, 5, 8, 11),
    augment: bool = True,
) -> DinoDiscriminator:
    """RAE's discriminator: frozen DINO trunk (``recipe``), spectral-norm heads, DiffAug on inputs."""
    return DinoDiscriminator(
        dino_trunk(recipe, weights),
        key_depths=key_depths,
        kernel_size=kernel_size,
        augment=DiffAug() if augment else None,
    )
