"""Fixtures shared by the metrics tests: one random FID-Inception state dict loaded into ours and peers."""

from __future__ import annotations

import pytest
import torch

from latentforge_metrics.inception import FIDInceptionV3


def random_inception_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """He-normal convs plus perturbed BN statistics and a scaled fc, so every feature carries signal."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for key, value in FIDInceptionV3().state_dict().items():
        if key.endswith("num_batches_tracked"):
            state[key] = torch.zeros_like(value)
        elif key.endswith("conv.weight"):
            fan_in = value[0].numel()
            state[key] = torch.randn(value.shape, generator=gen) * (2.0 / fan_in) ** 0.5
        elif key.endswith("bn.weight"):
            state[key] = 1 + 0.1 * torch.randn(value.shape, generator=gen)
        elif key.endswith("bn.bias") or key.endswith("running_mean"):
            state[key] = 0.1 * torch.randn(value.shape, generator=gen)
        elif key.endswith("running_var"):
            state[key] = 0.5 + torch.rand(value.shape, generator=gen)
        elif key == "fc.weight":
            state[key] = torch.randn(value.shape, generator=gen) * 0.5
        else:  # fc.bias
            state[key] = torch.randn(value.shape, generator=gen)
    return state


@pytest.fixture(scope="session")
def inception_state() -> dict[str, torch.Tensor]:
    return random_inception_state()


@pytest.fixture(scope="session")
def inception_file(inception_state, tmp_path_factory):
    """The random weights saved as a ``.pth`` in pytorch-fid's key layout."""
    path = tmp_path_factory.mktemp("weights") / "pt_inception-random.pth"
    torch.save(inception_state, path)
    return path


@pytest.fixture(scope="session")
def inception(inception_file) -> FIDInceptionV3:
    return FIDInceptionV3("torch-fidelity").load_weights(inception_file)
