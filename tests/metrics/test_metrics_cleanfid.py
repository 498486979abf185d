"""protocol="clean" and KID against clean-fid 0.1.35 itself: its PIL resizer, its folder pipeline, its
``kernel_distance``. clean-fid's own network (NVIDIA's TorchScript Inception) is a download, so its
pipeline is fed our network with the same random weights, as the ``model`` it accepts."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from cleanfid.fid import get_folder_features, kernel_distance
from cleanfid.resize import build_resizer, make_resizer
from PIL import Image
from skimage import data
from sklearn.datasets import load_digits

from latentforge_metrics import KID, kernel_inception_distance, preprocess
from latentforge_metrics.inception import INPUT_SIZE, resize_pil_bicubic


def _digits(n: int, size: int, offset: int = 0) -> np.ndarray:
    """``n`` digits as uint8 ``[n, size, size, 3]`` (nearest upsampling of the 8x8 originals)."""
    img = (load_digits().images[offset : offset + n] * 255 / 16).round().astype(np.uint8)
    img = img.repeat(size // 8, axis=1).repeat(size // 8, axis=2)
    return np.repeat(img[..., None], 3, axis=-1)


def _images() -> dict[str, np.ndarray]:
    """Real photographs (down- and non-uniform resizes), upscaled digits and noise (up, odd sizes)."""
    rng = np.random.default_rng(0)
    return {
        "astronaut 512x512": data.astronaut(),
        "chelsea 300x451": data.chelsea(),
        "coffee 400x600": data.coffee(),
        "digit 64x64": _digits(1, 64)[0],
        "digit 256x256": _digits(1, 256, offset=7)[0],
        "noise 37x50": rng.integers(0, 256, (37, 50, 3), dtype=np.uint8),
        "noise 1000x300": rng.integers(0, 256, (1000, 300, 3), dtype=np.uint8),
        "noise 299x299": rng.integers(0, 256, (299, 299, 3), dtype=np.uint8),
    }


def _nchw(arr: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1)[None]


@pytest.mark.parametrize("name", list(_images()))
def test_clean_resize_equals_clean_fid_pil_resizer(name):
    image = _images()[name]
    want = make_resizer("PIL", False, "bicubic", (INPUT_SIZE, INPUT_SIZE))(image)  # float32 [299, 299, 3]
    assert build_resizer("clean")(image).tobytes() == want.tobytes()  # mode="clean" is this resizer
    got = resize_pil_bicubic(_nchw(image).float(), INPUT_SIZE)[0].permute(1, 2, 0).numpy()
    assert np.abs(got - want).max() <= 2e-5  # 0..255 scale: bit-exact or one float32 ulp at 255
    # The protocol: uint8 in, clean-resized, then InceptionV3W's (x - 128) / 128.
    x = preprocess(_nchw(image), "clean")[0].permute(1, 2, 0).numpy()
    assert np.abs(x - (want - 128) / 128).max() <= 2e-7


def test_clean_protocol_keeps_float_images_unquantised():
    """clean-fid's generator path resizes float pixels as they are; [0, 1] floats here are ×255."""
    image = torch.from_numpy(data.chelsea()).permute(2, 0, 1)[None].float() / 255
    image = (image + 0.3 / 255).clamp(0, 1)  # between uint8 levels: quantising would move it
    want = make_resizer("PIL", False, "bicubic", (INPUT_SIZE, INPUT_SIZE))(
        (image[0].permute(1, 2, 0) * 255).numpy()
    )
    got = preprocess(image, "clean")[0].permute(1, 2, 0).numpy()
    assert np.abs(got - (want - 128) / 128).max() <= 2e-7
    assert preprocess(image, "clean-fid").equal(preprocess(image, "clean"))  # the alias


def test_kid_equals_clean_fid_kernel_distance():
    """clean-fid's subsets are unseeded; with every row in one subset both are the whole-set MMD²."""
    gen = torch.Generator().manual_seed(0)
    fake = torch.randn(120, 2048, generator=gen, dtype=torch.float64).relu()
    real = (torch.randn(120, 2048, generator=gen, dtype=torch.float64) + 0.1).relu()
    mean, _ = kernel_inception_distance(fake, real, subsets=1, subset_size=120)
    want = kernel_distance(fake.numpy(), real.numpy(), num_subsets=1, max_subset_size=1000)
    assert mean == pytest.approx(want, rel=1e-10)


def test_kid_clean_protocol_equals_clean_fid_folder_pipeline(inception, tmp_path):
    """PNG folders through clean-fid's reader, resizer and normalisation vs our KID(protocol="clean")."""
    sets = {"fake": _digits(3, 48, offset=0), "real": _digits(3, 48, offset=40)}
    for name, images in sets.items():
        (tmp_path / name).mkdir()
        for i, arr in enumerate(images):
            Image.fromarray(arr).save(tmp_path / name / f"{i}.png")

    def model(x):  # float32 [B, 3, 299, 299] in 0..255, clean-resized: InceptionV3W's normalisation
        return inception.forward_features((x - 128) / 128, ("pool3",))["pool3"]

    theirs = {
        name: get_folder_features(
            str(tmp_path / name),
            model,
            num_workers=0,
            batch_size=3,
            device=torch.device("cpu"),
            mode="clean",
            verbose=False,
        )  # fmt: skip
        for name in sets
    }
    kid = KID(subsets=1, subset_size=3, protocol="clean", inception=inception)
    ours = {
        name: kid.inception_features(torch.from_numpy(a).permute(0, 3, 1, 2))["pool3"]
        for name, a in sets.items()
    }
    for name in sets:
        scale = np.abs(theirs[name]).max()
        assert np.abs(ours[name].numpy() - theirs[name]).max() <= 1e-5 * scale
    kid.update_features(ours["fake"])
    kid.update_features(ours["real"], real=True)
    want = kernel_distance(theirs["fake"].astype(np.float64), theirs["real"].astype(np.float64), 100, 1000)
    assert kid.compute()["kid"] == pytest.approx(want, rel=1e-5)
