"""Paired reconstruction metrics: PSNR and SSIM, numerically those of torchmetrics.

Tokenizer papers report the mean over images of the per-image value (``per_image=True``, the
default here); torchmetrics' ``PeakSignalNoiseRatio()`` default instead pools the squared error over
the whole data set (``per_image=False``). SSIM uses the Gaussian window of Wang et al. (11 taps,
sigma 1.5, K1 0.01, K2 0.03) on reflect-padded images, averaged over the full map, as torchmetrics.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from latentforge_core.errors import InputError, InputTypeError, StateError
from latentforge_metrics.inception import check_images
from latentforge_metrics.stats import all_gather_rows


def _pair(preds: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate two image batches; uint8 maps to [0, 1]."""
    for name, x in (("preds", preds), ("target", target)):
        check_images(x, name)
    if preds.shape != target.shape:
        raise InputError(
            f"preds {tuple(preds.shape)} and target {tuple(target.shape)} must have the same shape"
        )
    return tuple(x.float() / 255 if x.dtype == torch.uint8 else x.float() for x in (preds, target))


def psnr(preds: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR ``[B]`` in dB for images in [0, 1] (or uint8)."""
    preds, target = _pair(preds, target)
    mse = (preds.double() - target.double()).pow(2).flatten(1).mean(dim=1)
    return (10 * torch.log10(1.0 / mse)).float()


def _gaussian_window(kernel_size: int, sigma: float, device) -> torch.Tensor:
    x = torch.arange(kernel_size, dtype=torch.float32, device=device) - (kernel_size - 1) / 2
    g = torch.exp(-0.5 * (x / sigma) ** 2)
    return g / g.sum()


def ssim(preds: torch.Tensor, target: torch.Tensor, sigma: float = 1.5, k1: float = 0.01, k2: float = 0.03):
    """Per-image SSIM ``[B]`` for images in [0, 1] (or uint8), data range 1."""
    preds, target = _pair(preds, target)
    size = int(3.5 * sigma + 0.5) * 2 + 1  # torchmetrics' window for a given sigma (11 for 1.5)
    pad = (size - 1) // 2
    if min(preds.shape[-2:]) <= pad:
        raise InputError(
            f"SSIM needs images larger than {pad} pixels per side, got {tuple(preds.shape[-2:])}"
        )
    c = preds.shape[1]
    g = _gaussian_window(size, sigma, preds.device)
    stack = torch.cat([preds, target, preds * preds, target * target, preds * target])  # [5B, C, H, W]
    stack = F.pad(stack, (pad, pad, pad, pad), mode="reflect")
    stack = F.conv2d(stack, g.view(1, 1, 1, size).expand(c, 1, 1, size), groups=c)  # separable: rows
    stack = F.conv2d(stack, g.view(1, 1, size, 1).expand(c, 1, size, 1), groups=c)  # then columns
    mu_p, mu_t, e_pp, e_tt, e_pt = stack.split(preds.shape[0])
    var_p, var_t = (e_pp - mu_p**2).clamp_min(0), (e_tt - mu_t**2).clamp_min(0)
    cov = e_pt - mu_p * mu_t
    c1, c2 = k1**2, k2**2
    score = ((2 * mu_p * mu_t + c1) * (2 * cov + c2)) / ((mu_p**2 + mu_t**2 + c1) * (var_p + var_t + c2))
    return score.flatten(1).mean(dim=1)


class _PairedMean:
    """Running sums of a per-image score (float64), mergeable and summed across processes."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.total, self.count = 0.0, 0

    def merge(self, other) -> None:
        if type(other) is not type(self):
            raise InputTypeError(f"cannot merge a {type(other).__name__} into a {type(self).__name__}")
        self.total += other.total
        self.count += other.count

    def _gathered(self) -> tuple[float, int]:
        sums = all_gather_rows(torch.tensor([[self.total, float(self.count)]], dtype=torch.float64)).sum(
            dim=0
        )
        return float(sums[0]), int(sums[1])


class PSNR(_PairedMean):
    """Mean PSNR (dB). ``per_image=False`` pools the squared error over every pixel first."""

    def __init__(self, per_image: bool = True):
        self.per_image = per_image
        super().__init__()

    def update(self, images: torch.Tensor, target: torch.Tensor) -> None:
        if self.per_image:
            values = psnr(images, target).double()
            self.total += float(values.sum())
            self.count += values.numel()
        else:
            preds, target = _pair(images, target)
            self.total += float((preds.double() - target.double()).pow(2).sum())
            self.count += preds.numel()

    def compute(self) -> float:
        total, count = self._gathered()
        if count == 0:
            raise StateError("PSNR: no images were given to update()")
        if self.per_image:
            return total / count
        return 10 * math.log10(count / total) if total > 0 else math.inf  # lossless: inf, as torchmetrics


class SSIM(_PairedMean):
    """Mean SSIM over images (Gaussian window, data range 1)."""

    def __init__(self, sigma: float = 1.5):
        self.sigma = sigma
        super().__init__()

    def update(self, images: torch.Tensor, target: torch.Tensor) -> None:
        values = ssim(images, target, self.sigma).double()
        self.total += float(values.sum())
        self.count += values.numel()

    def compute(self) -> float:
        total, count = self._gathered()
        if count == 0:
            raise StateError("SSIM: no images were given to update()")
        return total / count
