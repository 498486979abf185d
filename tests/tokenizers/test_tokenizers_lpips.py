"""Our LPIPS against the `lpips` package on identical (random-trunk) weights."""

import os

import lpips as lpips_pkg
import pytest
import torch

from latentforge_core.checkpoint import CheckpointError
from latentforge_tokenizers.lpips import LPIPS, default_heads_path, lpips_vgg


@pytest.fixture(scope="module")
def peer():
    torch.manual_seed(0)
    # pnet_rand: the VGG trunk is random (nothing downloads); the linear heads are the package's file.
    return lpips_pkg.LPIPS(pretrained=True, net="vgg", pnet_rand=True, verbose=False).eval()


@pytest.fixture(scope="module")
def ours(peer, tmp_path_factory):
    path = tmp_path_factory.mktemp("lpips") / "trunk.pt"
    torch.save({k: v for k, v in peer.state_dict().items() if k.startswith("net.")}, path)
    return LPIPS(heads=default_heads_path(), trunk=path)


def test_heads_file_is_the_packages():
    path = default_heads_path()
    assert path is not None and os.path.samefile(
        path, os.path.join(os.path.dirname(lpips_pkg.__file__), "weights/v0.1/vgg.pth")
    )


@pytest.mark.parametrize("size", [32, 64])
def test_matches_lpips_package(peer, ours, size):
    torch.manual_seed(1)
    x = torch.rand(3, 3, size, size) * 2 - 1
    y = (x + 0.3 * torch.randn_like(x)).clamp(-1, 1)
    with torch.no_grad():
        expected = peer(x, y).flatten()
        got = ours(x, y)
    assert got.shape == (3,)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert (got > 0).all()
    torch.testing.assert_close(ours(x, x), torch.zeros(3), atol=1e-6, rtol=0)


def test_gradient_flows_to_input_but_not_weights(ours):
    x = torch.rand(2, 3, 32, 32, requires_grad=True)
    ours(x * 2 - 1, torch.zeros(2, 3, 32, 32)).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(not p.requires_grad for p in ours.parameters())
    ours.train()
    assert not ours.training


def test_torchvision_trunk_layout_loads(peer, tmp_path):
    tv = {
        f"features.{k.split('.')[2]}.{k.split('.')[3]}": v
        for k, v in peer.state_dict().items()
        if k.startswith("net.")
    }
    path = tmp_path / "vgg16.pth"
    torch.save(tv, path)
    model = lpips_vgg(trunk=path)
    torch.testing.assert_close(model.features[28].weight, peer.net.slice5._modules["28"].weight)


def test_bad_inputs(ours, tmp_path):
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        ours(torch.zeros(1, 3, 32, 32), torch.zeros(1, 3, 16, 16))
    bad = tmp_path / "bad.pt"
    torch.save({"something.else": torch.zeros(3)}, bad)
    with pytest.raises(CheckpointError, match="features"):
        LPIPS(trunk=bad)
    with pytest.raises(CheckpointError, match="lin"):
        LPIPS(heads=bad)
