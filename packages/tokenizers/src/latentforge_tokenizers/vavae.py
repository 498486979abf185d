"""VA-VAE (Yao et al. 2025): the LDM KL autoencoder at f16 with 32 latent channels, whose latent is
aligned to a frozen vision foundation model by the VF loss (``losses.VAVAELoss``).

Module names follow LDM's ``AutoencoderKL`` so the released LightningDiT VA-VAE checkpoint loads
strictly (``load_released``); ``linear_proj`` (latent → foundation-model width, no bias) is the VF
loss's projection.  Images enter ``encode`` in [0, 1]; the network itself works in [-1, 1].
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from latentforge_core import attention
from latentforge_core.checkpoint import load_checkpoint, load_into, load_state_file, save_checkpoint
from latentforge_core.errors import (
    InputError,
    InputTypeError,
    StateError,
    check_divisible,
    check_int,
    check_int_sequence,
    check_ints,
    check_number,
    checking_values,
)
from latentforge_core.protocols import Preprocessing
from latentforge_tokenizers.stats import LatentStats, compute_latent_stats, stats_path

log = logging.getLogger("latentforge")


def check_images(images: torch.Tensor, multiple: int, what: str) -> None:
    """Images must be float RGB in [0, 1] with sides divisible by ``multiple``."""
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise InputError(f"{what} expects RGB images [B, 3, H, W] in [0, 1], got {shape}")
    if not images.is_floating_point():
        raise InputTypeError(f"{what} expects floating-point images in [0, 1], got {images.dtype}")
    if checking_values():
        lo, hi = float(images.min()), float(images.max())
        if not (lo >= -1e-3 and hi <= 1 + 1e-3):
            raise InputError(
                f"{what} expects images in [0, 1], got values in [{lo:.3f}, {hi:.3f}] (pass x/255 or (x+1)/2)"
            )
    if images.shape[-2] % multiple or images.shape[-1] % multiple:
        raise InputError(f"{what}: image size {tuple(images.shape[-2:])} is not a multiple of {multiple}")


#################################################################################
#                                 Building blocks                               #
#################################################################################


def _norm(channels: int) -> nn.GroupNorm:
    """LDM's GroupNorm(32); a tiny model narrower than 32 channels gets one group per channel."""
    return nn.GroupNorm(min(32, channels), channels, eps=1e-6)


class ResnetBlock(nn.Module):
    def __init__(self, cin: int, cout: int, dropout: float = 0.0):
        super().__init__()
        self.norm1, self.conv1 = _norm(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2, self.conv2 = _norm(cout), nn.Conv2d(cout, cout, 3, padding=1)
        self.dropout = nn.Dropout(dropout)
        self.nin_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))  # B Cout H W
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))  # B Cout H W
        return (x if self.nin_shortcut is None else self.nin_shortcut(x)) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the H·W positions, 1×1-conv projections."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = _norm(channels)
        self.q, self.k, self.v = (nn.Conv2d(channels, channels, 1) for _ in range(3))
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x):
        h, w = x.shape[-2:]
        y = self.norm(x)
        q, k, v = (rearrange(f(y), "b c h w -> b 1 (h w) c") for f in (self.q, self.k, self.v))
        out = attention(q, k, v)  # B 1 HW C
        return x + self.proj_out(rearrange(out, "b 1 (h w) c -> b c h w", h=h, w=w))


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # B C H/2 W/2


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))  # B C 2H 2W


def _mid(channels: int) -> nn.Module:
    mid = nn.Module()
    mid.block_1, mid.attn_1, mid.block_2 = (
        ResnetBlock(channels, channels),
        AttnBlock(channels),
        ResnetBlock(channels, channels),
    )
    return mid


def _run_mid(mid: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return mid.block_2(mid.attn_1(mid.block_1(x)))


class Encoder(nn.Module):
    def __init__(
        self,
        *,
        ch,
        ch_mult,
        num_res_blocks,
        attn_resolutions,
        resolution,
        z_channels,
        in_channels=3,
        dropout=0.0,
    ):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        self.down = nn.ModuleList()
        cin, res = ch, resolution
        for level, mult in enumerate(ch_mult):
            stage = nn.Module()
            stage.block, stage.attn = nn.ModuleList(), nn.ModuleList()
            for _ in range(num_res_blocks):
                stage.block.append(ResnetBlock(cin, ch * mult, dropout))
                cin = ch * mult
                if res in attn_resolutions:
                    stage.attn.append(AttnBlock(cin))
            if level != len(ch_mult) - 1:
                stage.downsample = Downsample(cin)
                res //= 2
            self.down.append(stage)
        self.mid = _mid(cin)
        self.norm_out = _norm(cin)
        self.conv_out = nn.Conv2d(cin, 2 * z_channels, 3, padding=1)

    def forward(self, x):
        h = self.conv_in(x)  # B ch H W
        for stage in self.down:
            for i, block in enumerate(stage.block):
                h = block(h)
                if len(stage.attn):
                    h = stage.attn[i](h)
            if hasattr(stage, "downsample"):
                h = stage.downsample(h)  # B C H/2 W/2
        h = _run_mid(self.mid, h)
        return self.conv_out(F.silu(self.norm_out(h)))  # B 2z h w


class Decoder(nn.Module):
    def __init__(
        self,
        *,
        ch,
        ch_mult,
        num_res_blocks,
        attn_resolutions,
        resolution,
        z_channels,
        out_channels=3,
        dropout=0.0,
    ):
        super().__init__()
        cin = ch * ch_mult[-1]
        res = resolution // 2 ** (len(ch_mult) - 1)
        self.conv_in = nn.Conv2d(z_channels, cin, 3, padding=1)
        self.mid = _mid(cin)
        up = []
        for level in reversed(range(len(ch_mult))):
            stage = nn.Module()
            stage.block, stage.attn = nn.ModuleList(), nn.ModuleList()
            for _ in range(num_res_blocks + 1):
                stage.block.append(ResnetBlock(cin, ch * ch_mult[level], dropout))
                cin = ch * ch_mult[level]
                if res in attn_resolutions:
                    stage.attn.append(AttnBlock(cin))
            if level != 0:
                stage.upsample = Upsample(cin)
                res *= 2
            up.insert(0, stage)  # up[level]: index 0 is the full-resolution stage, as in LDM
        self.up = nn.ModuleList(up)
        self.norm_out = _norm(cin)
        self.conv_out = nn.Conv2d(cin, out_channels, 3, padding=1)

    def forward(self, z):
        h = _run_mid(self.mid, self.conv_in(z))  # B C h w
        for stage in reversed(self.up):
            for i, block in enumerate(stage.block):
                h = block(h)
                if len(stage.attn):
                    h = stage.attn[i](h)
            if hasattr(stage, "upsample"):
                h = stage.upsample(h)  # B C 2H 2W
        return self.conv_out(F.silu(self.norm_out(h)))  # B 3 H W


class DiagonalGaussian:
    """The posterior N(mean, exp(logvar)) of one batch; logvar clamped to [-30, 20] as in LDM."""

    def __init__(self, moments: torch.Tensor):
        self.mean, logvar = moments.chunk(2, dim=1)
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        # a generator of another device (a CPU one on a GPU) draws where it lives; the noise is moved
        where = self.mean.device if generator is None else generator.device
        noise = torch.randn(self.mean.shape, generator=generator, device=where, dtype=self.mean.dtype)
        noise = noise.to(self.mean.device)
        return self.mean + self.std * noise

    def kl(self) -> torch.Tensor:
        """KL to N(0, I) per sample, summed over C·H·W → ``[B]``."""
        return 0.5 * (self.mean**2 + self.std**2 - 1.0 - self.logvar).sum(dim=(1, 2, 3))


#################################################################################
#                                  The tokenizer                                #
#################################################################################


class VAVAE(nn.Module):
    """KL autoencoder; ``encode`` [0, 1] images → latents, ``decode`` latents → [0, 1] images."""

    def __init__(
        self,
        *,
        ch: int = 128,
        ch_mult: Sequence[int] = (1, 1, 2, 2, 4),
        num_res_blocks: int = 2,
        attn_resolutions: Sequence[int] = (16,),
        resolution: int = 256,
        z_channels: int = 32,
        vf_dim: int | None = 1024,
        dropout: float = 0.0,
    ):
        super().__init__()
        check_ints("VAVAE", ch=ch, num_res_blocks=num_res_blocks, resolution=resolution)
        check_int(z_channels, "z_channels", owner="VAVAE")
        check_int_sequence(ch_mult, "ch_mult", owner="VAVAE")
        check_int_sequence(attn_resolutions, "attn_resolutions", owner="VAVAE", empty=True)
        if vf_dim is not None:
            check_int(vf_dim, "vf_dim", owner="VAVAE")
        check_number(dropout, "dropout", low=0, high=1, high_open=True, owner="VAVAE")
        check_divisible(resolution, "resolution", 2 ** (len(ch_mult) - 1), "the downsampling", owner="VAVAE")
        self.config = dict(
            ch=ch,
            ch_mult=list(ch_mult),
            num_res_blocks=num_res_blocks,
            attn_resolutions=list(attn_resolutions),
            resolution=resolution,
            z_channels=z_channels,
            vf_dim=vf_dim,
            dropout=dropout,
        )
        arch = {k: v for k, v in self.config.items() if k != "vf_dim"}
        self.encoder = Encoder(**arch)
        self.decoder = Decoder(**arch)
        self.quant_conv = nn.Conv2d(2 * z_channels, 2 * z_channels, 1)
        self.post_quant_conv = nn.Conv2d(z_channels, z_channels, 1)
        self.linear_proj = nn.Conv2d(z_channels, vf_dim, 1, bias=False) if vf_dim else None
        self.downsample = 2 ** (len(ch_mult) - 1)
        self.z_channels = z_channels
        self.preprocessing = Preprocessing(resolution, (0.5,) * 3, (0.5,) * 3, "bicubic", (-1.0, 1.0))
        self.stats: LatentStats | None = None  # set by ``set_stats`` / loaded beside the checkpoint

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        side = self.preprocessing.input_size // self.downsample
        return (self.z_channels, side, side)

    can_decode = True

    @property
    def vocab_size(self) -> None:
        return None

    # ----------------------------------------------------------------------------- network
    def posterior(self, x: torch.Tensor) -> DiagonalGaussian:
        """Images in [-1, 1] → the Gaussian posterior over latents."""
        return DiagonalGaussian(self.quant_conv(self.encoder(x)))  # moments B 2z h w

    def project(self, z: torch.Tensor) -> torch.Tensor:
        """The VF loss's view of a latent: 1×1 conv to the foundation model's width."""
        if self.linear_proj is None:
            raise InputError("this VA-VAE was built with vf_dim=None: it has no VF projection")
        return self.linear_proj(z)  # B vf_dim h w

    def reconstruct(self, z: torch.Tensor) -> torch.Tensor:
        """Raw latents → images in [-1, 1] (unclamped)."""
        return self.decoder(self.post_quant_conv(z))  # B 3 H W

    def forward(self, x: torch.Tensor, sample: bool = True) -> dict[str, Any]:
        """Training pass on images in [-1, 1]: ``{"recon", "posterior", "z"}``."""
        post = self.posterior(x)
        z = post.sample() if sample else post.mean
        return {"recon": self.reconstruct(z), "posterior": post, "z": z}

    # ----------------------------------------------------------------------------- tokenizer API
    def encode(
        self,
        images: torch.Tensor,
        *,
        normalize: bool = False,
        sample: bool = True,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """[0, 1] images → latents ``[B, z, H/16, W/16]``; a posterior sample by default (as LightningDiT
        extracts its training latents), the mean with ``sample=False``."""
        check_images(images, self.downsample, "VAVAE.encode")
        post = self.posterior(images * 2 - 1)
        z = post.sample(generator) if sample else post.mean
        return self._stats_or_raise().normalize(z) if normalize else z

    def decode(self, latents: torch.Tensor, *, normalize: bool = False) -> torch.Tensor:
        """Latents → [0, 1] images; ``normalize=True`` says the latents are normalised (undo it first)."""
        if latents.ndim != 4 or latents.shape[1] != self.z_channels:
            raise InputError(
                f"VAVAE.decode expects latents [B, {self.z_channels}, h, w], got {tuple(latents.shape)}"
            )
        if normalize:
            latents = self._stats_or_raise().denormalize(latents)
        return ((self.reconstruct(latents) + 1) / 2).clamp(0, 1)

    def compute_stats(self, batches, *, sample: bool = True) -> LatentStats:
        """Exact channel mean and unbiased std over ``batches`` of [0, 1] images (LightningDiT's
        ``latents_stats.pt``, taken on posterior samples), set and returned."""
        stats = compute_latent_stats(
            lambda x: self.encode(x, sample=sample), batches, reduce="channel", unbiased=True, eps=0.0
        )
        self.set_stats(stats)
        return stats

    def set_stats(self, stats: LatentStats | None) -> None:
        if stats is not None and stats.shape[0] != self.z_channels:
            raise InputError(
                f"latent statistics of shape {stats.shape} do not fit this VA-VAE tokenizer's "
                f"{self.z_channels} latent channels (statistics of another tokenizer?)"
            )
        self.stats = stats

    def _stats_or_raise(self) -> LatentStats:
        if self.stats is None:
            raise StateError(
                "no latent statistics: compute them (stats.compute_latent_stats) or load them first"
            )
        return self.stats

    # ----------------------------------------------------------------------------- checkpoints
    def save(self, path: str | os.PathLike) -> Path:
        """Our safetensors checkpoint (+ latent statistics beside it, when set)."""
        path = save_checkpoint(self.state_dict(), path, {"kind": "vavae", **self.config})
        if self.stats is not None:
            self.stats.save(stats_path(path))
        return path

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike) -> VAVAE:
        sd, config = load_checkpoint(path)
        if config.get("kind") != "vavae":
            raise InputError(f"{path} is not a VA-VAE checkpoint (config kind {config.get('kind')!r})")
        config.pop("kind")
        model = cls(**config)
        load_into(model, sd)
        if stats_path(path).is_file():
            model.set_stats(LatentStats.load(stats_path(path)))
        return model

    def load_released(self, source: str | os.PathLike | Mapping[str, torch.Tensor]) -> None:
        """The released LightningDiT VA-VAE ``.pt`` (Lightning dict or raw state dict), strictly:
        training-only keys (``loss.*``, ``foundation_model.*``) are dropped, ``linear_proj`` kept if built.

        ``linear_proj`` is the VF loss's projection, used only in training: a file without it (an
        inference release) loads with the projection left at its initialisation, said in a log line.
        Any other missing key is an error."""
        sd = load_state_file(source) if not isinstance(source, Mapping) else dict(source)
        if "state_dict" in sd and isinstance(sd["state_dict"], Mapping):
            sd = dict(sd["state_dict"])
        drop = ("loss.", "foundation_model.") + (("linear_proj.",) if self.linear_proj is None else ())
        sd = {k: v for k, v in sd.items() if not k.startswith(drop)}
        if self.linear_proj is not None and not any(k.startswith("linear_proj.") for k in sd):
            sd |= {f"linear_proj.{k}": v for k, v in self.linear_proj.state_dict().items()}
            log.info(
                "VA-VAE checkpoint has no linear_proj (the VF loss's projection, training only): it "
                "stays at its initialisation; encode and decode do not use it"
            )
        load_into(self, sd)


#################################################################################
#                                  Named sizes                                  #
#################################################################################

# Registry name -> the VAVAE keyword arguments of that model; one builder per row below.
SIZES: dict[str, dict] = {
    "vavae-f16d32": dict(
        ch=128,
        ch_mult=(1, 1, 2, 2, 4),
        num_res_blocks=2,
        attn_resolutions=(16,),
        resolution=256,
        z_channels=32,
        vf_dim=1024,
    ),
    # Tiny model for tests and CPU demos.
    "test-vavae-tiny": dict(
        ch=16,
        ch_mult=(1, 2, 2),
        num_res_blocks=1,
        attn_resolutions=(8,),
        resolution=32,
        z_channels=8,
        vf_dim=64,
    ),
}


def build_vavae(
    name: str,
    pretrained: str | os.PathLike | None = None,
    stats: str | os.PathLike | None = None,
    **overrides,
) -> VAVAE:
    """The model ``name`` of ``SIZES``; ``pretrained`` is our checkpoint or the released ``.pt``;
    ``stats`` a stats file (default: the artifact beside our checkpoint)."""
    if pretrained is not None and str(pretrained).endswith(".safetensors") and not overrides:
        model = VAVAE.from_checkpoint(pretrained)
    else:
        model = VAVAE(**{**SIZES[name], **overrides})
        if pretrained is not None:
            model.load_released(pretrained)
    if stats is not None:
        model.set_stats(LatentStats.load(stats))
    return model.eval()


def vavae_f16d32(**kw) -> VAVAE:
    return build_vavae("vavae-f16d32", **kw)


def tiny_vavae(**kw) -> VAVAE:
    return build_vavae("test-vavae-tiny", **kw)
