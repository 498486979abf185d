"""Representation alignment: a frozen encoder's patch features as the target of a trained model's own.

One idea, two places: VA-VAE's VF loss aligns a tokenizer's latent to an encoder (``tokenizers``),
REPA a generator's hidden tokens (``generators.repa``).  Both take the encoder's features of the same
images without gradients (:func:`encoder_targets`), bring them to the trained model's token grid
(:func:`match_grid`), map the model's side to the encoder's width (:class:`Projector`, or VA-VAE's
1×1 convolution) and compare per position by cosine similarity (:func:`negative_cosine`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from latentforge_core.errors import InputError, InputTypeError


class Projector(nn.Module):
    """REPA's per-token MLP ``in_dim → hidden → hidden → out_dim`` with SiLU between (xavier-uniform
    weights, zero biases): the generator's hidden width to the encoder's."""

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int = 2048):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(in_dim, hidden_dim),
            nn.SiLU(),
            nn.Linear(hidden_dim, hidden_dim),
            nn.SiLU(),
            nn.Linear(hidden_dim, out_dim),
        )
        for layer in self.net:
            if isinstance(layer, nn.Linear):
                nn.init.xavier_uniform_(layer.weight)
                nn.init.zeros_(layer.bias)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.net(tokens)  # B, N, out_dim


@torch.no_grad()
def encoder_targets(encoder: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """A frozen encoder's patch features of ``images`` in [0, 1] as a map ``[B, D, h, w]``: a
    registered encoder's ``features(output="map")`` (its own resize and normalisation, the final norm
    by its spec), or the map a plugin encoder's ``forward`` returns."""
    features = getattr(encoder, "features", None)
    out = features(images, output="map") if callable(features) else encoder(images)
    if not isinstance(out, torch.Tensor) or out.ndim != 4:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise InputTypeError(
            f"encoder {type(encoder).__name__} gave features of shape {shape}; alignment needs a patch "
            "feature map [B, D, h, w] (an encoder whose features have a spatial grid)"
        )
    return out.float()


def match_grid(features: torch.Tensor, grid: tuple[int, int], what: str = "the model") -> torch.Tensor:
    """``[B, D, h, w]`` features on ``grid`` (bilinear, antialiased when shrinking); grids of another
    aspect ratio cannot be matched position for position and are refused."""
    h, w = features.shape[-2:]
    if (h, w) == tuple(grid):
        return features
    if h * grid[1] != w * grid[0]:
        raise InputError(
            f"the encoder's {h}×{w} feature grid cannot be matched to the {grid[0]}×{grid[1]} token grid "
            f"of {what} (another aspect ratio); expected grids of the same shape, e.g. an encoder image "
            "size that gives the token grid"
        )
    shrink = h > grid[0]
    return F.interpolate(features, size=tuple(grid), mode="bilinear", align_corners=False, antialias=shrink)


def negative_cosine(predicted: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """−cos(predicted, target) along the last dim, averaged over positions and batch (REPA's loss)."""
    if predicted.shape != target.shape:
        raise InputError(
            f"alignment: projected features {tuple(predicted.shape)} and targets {tuple(target.shape)} "
            "must have the same shape [B, N, D]"
        )
    return -F.cosine_similarity(predicted, target.to(predicted.dtype), dim=-1).mean()
