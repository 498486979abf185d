"""Bad input: each refusal names what was wrong and what was expected."""

from __future__ import annotations

import pytest
import torch

from latentforge_core import registry
from latentforge_encoders import FeatureSpec, VisionTransformer, build_encoder


@pytest.fixture(scope="module")
def encoder():
    return registry.encoders.build("test-vit-tiny")


def test_wrong_channel_count(encoder):
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\].*\(2, 1, 32, 32\)"):
        encoder(torch.rand(2, 1, 32, 32))
    vit = VisionTransformer(image_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2)
    with pytest.raises(ValueError, match="expected 3 input channels.*got 4"):
        vit(torch.rand(1, 4, 16, 16))


@pytest.mark.parametrize("shape", [(3, 32, 32), (1, 1, 3, 32, 32), (32,)])
def test_not_four_dimensional(encoder, shape):
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\] tensor, got"):
        encoder(torch.rand(*shape))
    with pytest.raises(ValueError, match="4-D tensor"):
        encoder.vit(torch.rand(*shape))


def test_not_a_tensor_or_not_float(encoder):
    with pytest.raises(ValueError, match="got ndarray"):
        encoder(torch.rand(1, 3, 32, 32).numpy())
    with pytest.raises(TypeError, match="floating-point images.*uint8"):
        encoder(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))


def test_size_not_a_multiple_of_the_patch(encoder):
    """The bare ViT refuses it; an encoder resizes to its preprocessing input size (documented)."""
    with pytest.raises(ValueError, match="30x30 is not a multiple of the patch size 4"):
        encoder.vit(torch.rand(1, 3, 30, 30))
    assert encoder(torch.rand(1, 3, 30, 30)).shape == (1, *encoder.feature_shape())
    with pytest.raises(ValueError, match="image_size 30 is not a multiple of test-vit-tiny's patch size 4"):
        build_encoder("test-vit-tiny", image_size=30)


def test_nan_refused_when_checked():
    checked = registry.encoders.build("test-vit-tiny", check_finite=True)
    images = torch.rand(2, 3, 32, 32)
    images[1, 0, 3, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf; expected finite values"):
        checked(images)
    images[1, 0, 3, 3] = float("inf")
    with pytest.raises(ValueError, match="NaN or inf"):
        checked(images)


def test_nan_check_costs_nothing_when_disabled(encoder, monkeypatch):
    """Disabled, no reduction over the input runs at all (nothing to sync on a GPU)."""

    def forbidden(*args, **kwargs):
        raise AssertionError("the finite check ran although it is disabled")

    monkeypatch.setattr(torch, "isfinite", forbidden)
    monkeypatch.setattr(torch, "isnan", forbidden)
    assert encoder(torch.rand(1, 3, 32, 32)).shape == (1, 64, 8, 8)


def test_bad_feature_requests(encoder):
    with pytest.raises(ValueError, match="norm must be one of"):
        encoder.features(torch.rand(1, 3, 32, 32), norm="batch")
    with pytest.raises(ValueError, match="output must be one of"):
        FeatureSpec(output="grid")
    with pytest.raises(ValueError, match=r"block indices \[4\] out of range for a ViT of depth 4"):
        encoder.features(torch.rand(1, 3, 32, 32), layers=(1, 4))
    with pytest.raises(ValueError, match=r"out of range.*expected integers in \[-4, 3\]"):
        build_encoder("test-vit-tiny", features=FeatureSpec(layers=(-5,)))
    with pytest.raises(ValueError, match="features must be a FeatureSpec or one of"):
        build_encoder("test-vit-tiny", features="repa")


def test_bad_architecture_arguments():
    with pytest.raises(ValueError, match="ffn must be 'mlp' or 'swiglu'"):
        VisionTransformer(ffn="geglu")
    with pytest.raises(ValueError, match="divisible by num_heads 5"):
        VisionTransformer(image_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=5)
    with pytest.raises(ValueError, match="image_size 30 is not a multiple of patch_size 4"):
        VisionTransformer(image_size=30, patch_size=4)
