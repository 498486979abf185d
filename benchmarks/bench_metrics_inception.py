"""FID Inception feature extraction, images/s: ours vs pytorch-fid on the same weights and inputs."""

from __future__ import annotations

import pytest
import torch
from pytorch_fid import inception as pfid_inception

from latentforge_metrics.inception import FIDInceptionV3

# 2 multiply-adds per MAC; the network costs 5.71 GMACs per 299x299 image (torchvision's figure)
FLOPS_PER_IMAGE = 2 * 5.71e9


@pytest.fixture(scope="module")
def models(device):
    ours = FIDInceptionV3("pytorch-fid").to(device)
    state = ours.state_dict()
    patch = pytest.MonkeyPatch()
    patch.setattr(pfid_inception, "load_state_dict_from_url", lambda *a, **k: state)  # no download
    peer = pfid_inception.InceptionV3([3], resize_input=True, normalize_input=True).eval().to(device)
    patch.undo()
    return ours, peer


@pytest.fixture(scope="module")
def images(full, device):
    n, size = (16, 256) if full else (1, 64)
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device)


def test_ours(measure, models, images):
    ours, _ = models
    out = measure(
        lambda: ours(images)["pool3"],
        group="metrics: Inception pool3",
        impl="ours",
        items=images.shape[0],
        unit="images/s",
        flops=FLOPS_PER_IMAGE * images.shape[0],
    )
    assert out.shape == (images.shape[0], 2048)


def test_pytorch_fid(measure, models, images):
    ours, peer = models

    def run():
        with torch.no_grad():
            return peer(images)[0].flatten(1)

    out = measure(
        run,
        group="metrics: Inception pool3",
        impl="pytorch-fid",
        items=images.shape[0],
        unit="images/s",
        flops=FLOPS_PER_IMAGE * images.shape[0],
    )
    assert torch.allclose(out, ours(images)["pool3"], rtol=1e-4, atol=1e-4 * out.abs().max().item())
