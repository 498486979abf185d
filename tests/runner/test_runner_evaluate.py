"""evaluate: the recipe's FID/IS/P-R equal latentforge_metrics computed directly on the same arrays."""

import hashlib
import json
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits

from latentforge_metrics import (
    FID,
    KID,
    KNOWN_REFERENCES,
    PSNR,
    InceptionScore,
    PrecisionRecall,
    ReferenceFileError,
    save_reference,
    save_samples,
)
from latentforge_metrics import npz as npz_module
from latentforge_metrics.inception import FIDInceptionV3
from latentforge_metrics.npz import KnownReference
from latentforge_runner import cli
from latentforge_runner.config import ConfigError
from latentforge_runner.data import DataError

N = 10  # Inception at 299 px costs ~0.5 s per image on a loaded CPU


def _random_inception_state(seed=0):
    """He-normal convs and perturbed BN, as tests/metrics/conftest.py builds them (informative features)."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for key, value in FIDInceptionV3().state_dict().items():
        if key.endswith("num_batches_tracked"):
            state[key] = torch.zeros_like(value)
        elif key.endswith("conv.weight"):
            state[key] = torch.randn(value.shape, generator=gen) * (2.0 / value[0].numel()) ** 0.5
        elif key.endswith("bn.weight"):
            state[key] = 1 + 0.1 * torch.randn(value.shape, generator=gen)
        elif key.endswith("bn.bias") or key.endswith("running_mean"):
            state[key] = 0.1 * torch.randn(value.shape, generator=gen)
        elif key.endswith("running_var"):
            state[key] = 0.5 + torch.rand(value.shape, generator=gen)
        else:
            state[key] = torch.randn(value.shape, generator=gen) * (0.5 if key == "fc.weight" else 1.0)
    return state


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("weights") / "pt_inception-random.pth"
    torch.save(_random_inception_state(), path)
    return path


def _digits(offset, n, size=32):
    """n digits as uint8 [n, size, size, 3] (nearest upsampling keeps every pixel value exact)."""
    img = (load_digits().images[offset : offset + n] * 255 / 16).round().astype(np.uint8)
    img = img.repeat(size // 8, axis=1).repeat(size // 8, axis=2)
    return np.repeat(img[..., None], 3, axis=-1)


def _nchw(arr):
    return torch.from_numpy(arr).permute(0, 3, 1, 2)


def _evaluate(tmp_path, *overrides):
    recipe, cfg = cli.load_settings(
        "evaluate", None, [f"run.output_dir={tmp_path / 'run'}", "batch_size=5", *overrides]
    )
    return cli.run_recipe(recipe, cfg)


def test_evaluate_npz_against_folder_equals_direct_metrics(tmp_path, weights):
    fake, real = _digits(0, N), _digits(500, N)
    save_samples(tmp_path / "samples.npz", _nchw(fake))
    (tmp_path / "ref").mkdir()
    for i, arr in enumerate(real):
        Image.fromarray(arr).save(tmp_path / "ref" / f"{i:03d}.png")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # fewer samples than 2048 dimensions
        report = _evaluate(
            tmp_path,
            f"samples={tmp_path / 'samples.npz'}",
            f"reference={tmp_path / 'ref'}",
            "image_size=32",
            f"weights={weights}",
            "metrics=[fid,inception-score,precision-recall]",
            "params={inception-score: {splits: 2}}",
        )
        # Directly: one pass of the metric's own feature path per array, fed to each metric.
        inception = FIDInceptionV3("torch-fidelity").load_weights(weights)
        fid, isc, prc = FID(inception=inception), InceptionScore(2, inception=inception), PrecisionRecall()
        f_real = fid.inception_features(_nchw(real), ("pool3",))
        f_fake = fid.inception_features(_nchw(fake), ("pool3", "logits"))
        fid.update_features(f_real["pool3"], real=True)
        fid.update_features(f_fake["pool3"])
        isc.update_features(f_fake["logits"])
        prc.update_features(f_real["pool3"], real=True)
        prc.update_features(f_fake["pool3"])
        expected_fid = fid.compute()
    assert report["num_samples"] == N and report["num_reference"] == N
    assert report["metrics"]["fid"] == pytest.approx(expected_fid, rel=1e-6)
    assert report["metrics"]["fid"] > 0
    assert report["metrics"]["inception-score"] == pytest.approx(isc.compute(), rel=1e-6)
    assert report["metrics"]["precision-recall"] == pytest.approx(prc.compute(), abs=1e-9)
    on_disk = json.loads((tmp_path / "run" / "evaluation.json").read_text())
    assert on_disk["metrics"]["fid"] == report["metrics"]["fid"]
    # A reference .npz with statistics only (pytorch-fid / ADM mu, sigma) serves FID through them.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        save_reference(tmp_path / "stats.npz", fid.real)
        by_stats = _evaluate(
            tmp_path,
            f"samples={tmp_path / 'samples.npz'}",
            f"reference={tmp_path / 'stats.npz'}",
            f"weights={weights}",
        )
    assert by_stats["modes"] == {"fid": "statistics"} and by_stats["num_reference"] == 0
    assert by_stats["metrics"]["fid"] == pytest.approx(expected_fid, rel=1e-6)


def test_evaluate_paired_psnr_on_npz(tmp_path):
    a, b = _digits(0, 7), _digits(0, 7)
    b[:, :4] = 0  # damage the top rows of every reference image
    save_samples(tmp_path / "a.npz", _nchw(a))
    save_samples(tmp_path / "b.npz", _nchw(b))
    report = _evaluate(
        tmp_path, f"samples={tmp_path / 'a.npz'}", f"reference={tmp_path / 'b.npz'}", "metrics=[psnr,ssim]"
    )
    expected = PSNR()
    expected.update(_nchw(a).float() / 255, _nchw(b).float() / 255)
    assert report["modes"] == {"psnr": "paired", "ssim": "paired"}
    assert report["metrics"]["psnr"] == pytest.approx(expected.compute(), rel=1e-9)
    assert 0 < report["metrics"]["ssim"] < 1


def test_evaluate_bad_input(tmp_path, weights):
    with pytest.raises(ConfigError, match="Did you mean 'fid'"):
        cli.load_settings("evaluate", None, ["samples=x.npz", "metrics=[fdi]"])
    with pytest.raises(DataError, match="samples not found"):
        _evaluate(tmp_path, f"samples={tmp_path / 'missing.npz'}", "metrics=[psnr]")
    save_samples(tmp_path / "s.npz", _nchw(_digits(0, 4)))
    with pytest.raises(ConfigError, match="set reference"):
        _evaluate(tmp_path, f"samples={tmp_path / 's.npz'}", "metrics=[psnr]")
    with pytest.raises(ConfigError, match="set image_size"):
        _evaluate(tmp_path, f"samples={tmp_path}", "metrics=[psnr]")
    with pytest.raises(ConfigError, match="FID Inception weights not found"):
        _evaluate(tmp_path, f"samples={tmp_path / 's.npz'}", f"weights={tmp_path / 'none.pth'}")


def test_evaluate_kid_and_fid_share_the_clean_protocol_pass(tmp_path, weights):
    n = 6
    fake, real = _digits(0, n), _digits(500, n)
    save_samples(tmp_path / "samples.npz", _nchw(fake))
    save_samples(tmp_path / "real.npz", _nchw(real))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # fewer samples than 2048 dimensions
        report = _evaluate(
            tmp_path,
            f"samples={tmp_path / 'samples.npz'}",
            f"reference={tmp_path / 'real.npz'}",
            f"weights={weights}",
            "protocol=clean",
            "metrics=[fid,kid]",
            f"params={{kid: {{subsets: 3, subset_size: {n}}}}}",
        )
        # Directly, with clean-fid's preprocessing (PIL bicubic of float pixels) on the same arrays.
        inception = FIDInceptionV3("clean").load_weights(weights)
        fid, kid = FID(protocol="clean", inception=inception), KID(subsets=3, subset_size=n, protocol="clean")
        f_fake = fid.inception_features(_nchw(fake))["pool3"]
        f_real = fid.inception_features(_nchw(real))["pool3"]
        for metric in (fid, kid):
            metric.update_features(f_fake)
            metric.update_features(f_real, real=True)
        expected_fid = fid.compute()
    assert report["protocol"] == "clean" and report["modes"] == {"fid": "real", "kid": "real"}
    assert report["metrics"]["fid"] == pytest.approx(expected_fid, rel=1e-6)
    assert report["metrics"]["kid"] == pytest.approx(kid.compute(), rel=1e-6)
    assert report["metrics"]["kid"]["kid_std"] < 1e-12  # subsets of every sample: permutations of one set


def test_evaluate_checks_a_known_reference_batch_sha256(tmp_path, monkeypatch):
    images = _nchw(_digits(0, 4))
    save_samples(tmp_path / "samples.npz", images)
    reference = save_samples(tmp_path / "VIRTUAL_imagenet256_labeled.npz", images)  # the name, not the file
    found = hashlib.sha256(reference.read_bytes()).hexdigest()
    args = (f"samples={tmp_path / 'samples.npz'}", f"reference={reference}", "metrics=[psnr]")
    with pytest.raises(ReferenceFileError) as err:
        _evaluate(tmp_path, *args)
    for words in ("VIRTUAL_imagenet256_labeled.npz", found, KNOWN_REFERENCES[reference.name].sha256):
        assert words in str(err.value)
    assert "check_reference=false" in str(err.value)
    assert _evaluate(tmp_path, *args, "check_reference=false")["metrics"]["psnr"] == float("inf")
    known = KnownReference(found, reference.stat().st_size, "https://example/VIRTUAL_imagenet256_labeled.npz")
    monkeypatch.setitem(npz_module.KNOWN_REFERENCES, reference.name, known)
    assert _evaluate(tmp_path, *args)["metrics"]["psnr"] == float("inf")  # the published file passes
