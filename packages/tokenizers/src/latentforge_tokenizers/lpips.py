"""LPIPS (Zhang et al. 2018): VGG16 features, unit-normalised per channel, weighted by linear heads.

The perceptual term of every autoencoder loss here (VA-VAE, RAE, VQGAN).  Weights load from local
files only: the linear heads in the ``lpips`` package's layout (``lin{k}.model.1.weight``, the file
that package ships as ``weights/v0.1/vgg.pth`` and that taming's ``vgg.pth`` also uses), the trunk
either from torchvision's ``vgg16`` state dict (``features.{i}.*``) or from a full ``lpips.LPIPS``
state dict (``net.slice{s}.{i}.*``).  Nothing is downloaded.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch
import torch.nn as nn

from latentforge_core.checkpoint import CheckpointError, check_state_dict, load_state_file
from latentforge_core.errors import InputError

# VGG16 "features" up to relu5_3: channel count per conv, "M" = 2x2 max-pool (torchvision indices).
VGG16_LAYOUT = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
TAPS = (3, 8, 15, 22, 29)  # indices (in features) of relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
CHANNELS = (64, 128, 256, 512, 512)
# The lpips v0.1 input scaling (inputs in [-1, 1] → ImageNet-like statistics).
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)


class LPIPS(nn.Module):
    """``lpips(x, y)`` on images in [-1, 1] ``[B, 3, H, W]`` → distance ``[B]`` (frozen, eval mode)."""

    def __init__(self, heads: str | os.PathLike | None = None, trunk: str | os.PathLike | None = None):
        super().__init__()
        layers: list[nn.Module] = []
        in_ch = 3
        for item in VGG16_LAYOUT:
            if item == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(in_ch, item, 3, padding=1), nn.ReLU(inplace=False)]
                in_ch = item
        self.features = nn.Sequential(*layers)
        self.heads = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in CHANNELS)
        self.register_buffer("shift", torch.tensor(SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(SCALE).view(1, 3, 1, 1), persistent=False)
        if heads is not None:
            self.load_heads(load_state_file(heads))
        if trunk is not None:
            self.load_trunk(load_state_file(trunk))
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> LPIPS:
        """Always eval: LPIPS is a fixed metric, never trained here."""
        return super().train(False)

    # ----------------------------------------------------------------------------- weights
    def load_heads(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Linear heads from the lpips layout (``lin{k}.model.1.weight``; ``lins.{k}…`` accepted)."""
        found = {}
        for k in range(len(CHANNELS)):
            for key in (f"lin{k}.model.1.weight", f"lins.{k}.model.1.weight", f"heads.{k}.weight"):
                if key in state_dict:
                    found[f"{k}.weight"] = state_dict[key]
                    break
        check_state_dict(
            self.heads.state_dict(), found, what="LPIPS linear heads (lpips 'lin{k}.model.1.weight')"
        )
        self.heads.load_state_dict(found)

    def load_trunk(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """VGG16 trunk from torchvision's ``features.{i}.*`` or lpips' ``net.slice{s}.{i}.*`` keys."""
        found = {}
        for key, value in state_dict.items():
            parts = key.split(".")
            if parts[0] == "features" and len(parts) == 3:
                found[f"{parts[1]}.{parts[2]}"] = value
            elif parts[0] == "net" and len(parts) == 4 and parts[1].startswith("slice"):
                found[f"{parts[2]}.{parts[3]}"] = value
        if not found:
            raise CheckpointError(
                "no VGG16 trunk weights found: expected torchvision keys 'features.{i}.weight' or "
                f"lpips keys 'net.slice{{s}}.{{i}}.weight'; got e.g. {sorted(state_dict)[:4]}"
            )
        check_state_dict(self.features.state_dict(), found, what="LPIPS VGG16 trunk")
        self.features.load_state_dict(found)

    # ----------------------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if x.shape != y.shape or x.ndim != 4 or x.shape[1] != 3:
            raise InputError(
                f"LPIPS expects two RGB batches of the same shape [B, 3, H, W], got {tuple(x.shape)} "
                f"and {tuple(y.shape)}"
            )
        h = torch.cat([x, y]).sub(self.shift).div(self.scale)  # 2B 3 H W
        total = x.new_zeros(x.shape[0])
        taps = iter(zip(TAPS, self.heads, strict=True))
        tap, head = next(taps)
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i == tap:
                f = h / (h.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10)  # 2B C h w
                fx, fy = f.chunk(2)
                total = total + head((fx - fy).pow(2)).mean(dim=(1, 2, 3))  # B
                tap, head = next(taps, (None, None))
                if tap is None:
                    break
        return total


def lpips_vgg(heads: str | os.PathLike | None = None, trunk: str | os.PathLike | None = None) -> LPIPS:
    """LPIPS-VGG; ``heads`` defaults to the file the installed ``lpips`` package ships, if any."""
    if heads is None:
        heads = default_heads_path()
    return LPIPS(heads=heads, trunk=trunk)


def default_heads_path() -> str | None:
    """``lpips/weights/v0.1/vgg.pth`` of the installed lpips package (found without importing it)."""
    import importlib.util

    spec = importlib.util.find_spec("lpips")
    if spec is None or spec.origin is None:
        return None
    path = os.path.join(os.path.dirname(spec.origin), "weights", "v0.1", "vgg.pth")
    return path if os.path.isfile(path) else None
