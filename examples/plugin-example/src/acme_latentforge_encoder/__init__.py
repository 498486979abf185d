"""A deliberately small encoder: the mean colour of each patch, as a [B, 3, H/p, W/p] map."""

import torch
import torch.nn.functional as F

from latentforge_core import Preprocessing


class PatchMeanEncoder(torch.nn.Module):
    def __init__(self, patch_size: int = 8, image_size: int = 32):
        super().__init__()
        self.patch_size = patch_size
        self.embed_dim = 3
        self.preprocessing = Preprocessing(input_size=image_size)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(images, self.patch_size)  # B 3 H/p W/p

    def feature_shape(self, image_size: int | None = None) -> tuple[int, ...]:
        side = (image_size or self.preprocessing.input_size) // self.patch_size
        return (self.embed_dim, side, side)

    @property
    def layers(self) -> list[int]:
        return [0]


def patch_mean_encoder(patch_size: int = 8, image_size: int = 32) -> PatchMeanEncoder:
    return PatchMeanEncoder(patch_size, image_size)
