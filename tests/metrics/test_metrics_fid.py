"""FID-family metrics end to end: references (ADM / pytorch-fid .npz), sample files, FD-DINOv2, rFID."""

from __future__ import annotations

import zipfile

import numpy as np
import pytest
import torch

from latentforge_core import registry
from latentforge_core.errors import StateError
from latentforge_core.protocols import Metric
from latentforge_metrics import (
    FID,
    RFID,
    SFID,
    FDDINOv2,
    GaussianStats,
    ReferenceFileError,
    SampleWriter,
    evaluate_npz,
    frechet_distance,
    inception_score_adm,
    iter_npz_images,
    load_reference,
    precision_recall,
    save_fid_stats,
    save_reference,
    save_samples,
)
from latentforge_metrics.generative import FrechetMetric


def _feats(n, d, seed, shift=0.0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=gen).relu() + shift


def test_every_registered_metric_fulfils_the_protocol():
    names = registry.metrics.names()
    for name in (
        "fid",
        "sfid",
        "rfid",
        "inception-score",
        "precision-recall",
        "fd-dinov2",
        "psnr",
        "ssim",
        "linear-probe",
    ):
        assert name in names
    for name in ("fid", "sfid", "rfid", "inception-score", "precision-recall", "psnr", "ssim"):
        assert isinstance(registry.metrics.build(name), Metric)  # the Inception is built on first use


class SmallFrechet(FrechetMetric):
    """The FID machinery (references, streaming, merge) at 48-d, so the test needs no 2048-d eigensolve."""

    dim = 48


def test_frechet_metric_against_fixed_and_streamed_references(tmp_path):
    real, fake = _feats(600, 48, 0), _feats(500, 48, 1, shift=0.02)
    ref = GaussianStats()
    ref.update(real)
    path = save_fid_stats(tmp_path / "ref.npz", ref)
    with np.load(path) as f:  # pytorch-fid's layout
        assert sorted(f.files) == ["mu", "sigma"] and f["sigma"].dtype == np.float64
    fixed, streamed = SmallFrechet(path), SmallFrechet()
    for chunk in fake.split(100):
        fixed.update_features(chunk)
    streamed.update_features(real, real=True)
    half = SmallFrechet()
    half.update_features(fake[:240])
    streamed.update_features(fake[240:])
    streamed.merge(half)
    want = frechet_distance(
        fake.double().mean(0), np.cov(fake.double().numpy(), rowvar=False), ref.mu, ref.sigma
    )
    assert want > 0.01
    assert fixed.compute() == pytest.approx(want, rel=1e-9)
    assert streamed.compute() == pytest.approx(want, rel=1e-9)
    with pytest.raises(ValueError, match="fixed reference"):
        fixed.update_features(real, real=True)
    fixed.reset()
    with pytest.raises(StateError, match="no generated images"):
        fixed.compute()
    with pytest.raises(ValueError, match="no reference"):
        half.compute()
    with pytest.raises(TypeError, match="cannot merge a FID into a SmallFrechet"):
        half.merge(FID())
    with pytest.raises(ValueError, match="reference statistics are 48-d but FID features are 2048-d"):
        FID(path)


def test_adm_reference_round_trip_and_dimension_checks(tmp_path):
    pool, spatial = GaussianStats(), GaussianStats()
    pool.update(_feats(100, 2048, 2))
    spatial.update(_feats(100, 2023, 3))
    images = np.random.default_rng(0).integers(0, 256, (5, 16, 16, 3), dtype=np.uint8)
    with pytest.warns(RuntimeWarning, match=r"100 samples of (2048|2023)-d features is singular"):
        path = save_reference(tmp_path / "VIRTUAL_test.npz", pool, spatial, images)
    with np.load(path) as f:
        assert sorted(f.files) == ["arr_0", "mu", "mu_s", "sigma", "sigma_s"] and f["mu_s"].shape == (2023,)
    ref = load_reference(path)
    assert ref.num_images == 5 and ref.spatial.dim == 2023
    np.testing.assert_array_equal(ref.fid.mu, pool.mu)
    sfid = SFID(path)
    np.testing.assert_array_equal(sfid.reference.mu, spatial.mu)
    with pytest.raises(ValueError, match="reference statistics are 2048-d but SFID features are 2023-d"):
        SFID(ref.fid)
    only_pool = save_fid_stats(tmp_path / "pool.npz", GaussianStats.from_moments(pool.mu, np.eye(2048)))
    with pytest.raises(ValueError, match="no spatial statistics"):
        SFID(only_pool)
    metric = FID(path)
    with pytest.raises(ValueError, match="features have 2023 dims"):
        metric.update_features(_feats(4, 2023, 4))


def test_corrupted_and_incomplete_files_are_reported(tmp_path):
    pool = GaussianStats.from_moments(np.zeros(8), np.eye(8))
    good = save_fid_stats(tmp_path / "good.npz", pool)
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(good.read_bytes()[:-40])
    with pytest.raises(ReferenceFileError, match="truncated or corrupted"):
        load_reference(truncated)
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"PK\x03\x04 this is not a zip archive")
    with pytest.raises(ReferenceFileError, match="not a readable .npz"):
        load_reference(garbage)
    samples = save_samples(tmp_path / "samples.npz", torch.rand(3, 3, 8, 8))
    with pytest.raises(ReferenceFileError, match=r"no statistics \(found arrays \['arr_0'\]"):
        load_reference(samples)
    with pytest.raises(FileNotFoundError):
        load_reference(tmp_path / "missing.npz")
    nan = tmp_path / "nan.npz"
    np.savez(nan, mu=np.full(8, np.nan), sigma=np.eye(8))
    with pytest.raises(ReferenceFileError, match="NaN"):
        load_reference(nan)
    cut = tmp_path / "cut.npz"  # a valid zip whose arr_0 lost its last image
    with zipfile.ZipFile(samples) as src, zipfile.ZipFile(cut, "w") as dst:
        dst.writestr("arr_0.npy", src.read("arr_0.npy")[:-10])
    with pytest.raises(ReferenceFileError, match="truncated at image 2"):
        list(iter_npz_images(cut, batch_size=1))


def test_sample_writer_streams_an_adm_sample_batch(tmp_path):
    images = torch.rand(7, 3, 12, 10)
    labels = torch.arange(7)
    path = tmp_path / "samples.npz"
    with SampleWriter(path, num_samples=7, image_size=(12, 10)) as writer:
        writer.write(images[:4], labels[:4])
        writer.write((images[4:] * 255).round().to(torch.uint8), labels[4:])
    with np.load(path) as f:  # what the ADM evaluator reads
        assert f["arr_0"].dtype == np.uint8 and f["arr_0"].shape == (7, 12, 10, 3)
        np.testing.assert_array_equal(f["arr_1"], np.arange(7))
        expected = (
            torch.floor(images * 255 + 0.5).to(torch.uint8).permute(0, 2, 3, 1).numpy()
        )  # DiT's rounding
        np.testing.assert_array_equal(f["arr_0"], expected)
    batches = list(iter_npz_images(path, batch_size=3))
    assert [b.shape[0] for b in batches] == [3, 3, 1]
    assert torch.equal(torch.cat(batches), torch.from_numpy(expected).permute(0, 3, 1, 2))
    short = tmp_path / "short.npz"
    with (
        pytest.raises(ValueError, match="2 samples were written, 5 declared"),
        SampleWriter(short, 5, 12) as w,
    ):
        w.write(torch.rand(2, 3, 12, 12))
    assert not short.exists() and not list(tmp_path.glob(".short*"))
    with pytest.raises(ValueError, match="labels for every batch"), SampleWriter(short, 4, 12) as w:
        w.write(torch.rand(2, 3, 12, 12), torch.zeros(2))
        w.write(torch.rand(2, 3, 12, 12))
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        save_samples(short, torch.rand(2, 3, 12, 12) * 2 - 1)
    assert not short.exists()


def test_fid_metric_runs_the_network_with_its_protocol(inception):
    gen = torch.Generator().manual_seed(6)
    images = torch.rand(1, 3, 40, 40, generator=gen)
    rfid = RFID(inception=inception, protocol="pytorch-fid")
    rfid.update(images, (images + 0.05).clamp(0, 1))
    with torch.no_grad():
        pool = inception.forward_features(
            2 * torch.nn.functional.interpolate(images, size=(299, 299), mode="bilinear", align_corners=False)
            - 1
        )["pool3"]
    np.testing.assert_allclose(rfid.fake.mu, pool.double().mean(0).numpy(), rtol=1e-6, atol=1e-7)
    assert rfid.real.n == 1 and rfid.fake.n == 1 and not np.allclose(rfid.real.mu, rfid.fake.mu)
    with pytest.raises(ValueError, match="differ"):
        rfid.update(images, images[..., :20])
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        rfid.update(images[:, :1])


def test_fd_dinov2_uses_the_registered_encoder():
    encoder = registry.encoders.build("test-vit-tiny")
    gen = torch.Generator().manual_seed(7)
    real, fake = torch.rand(40, 3, 32, 32, generator=gen), torch.rand(30, 3, 32, 32, generator=gen) ** 2
    metric = registry.metrics.build("fd-dinov2", encoder="test-vit-tiny")
    assert metric.dim == 64
    metric.update(real, real=True)
    metric.update(fake[:13])
    metric.update((fake[13:] * 255).round().to(torch.uint8) / 255)
    with torch.no_grad():
        fr, ff = encoder.features(real, output="cls").double(), encoder.features(fake, output="cls").double()
    want = frechet_distance(
        ff.mean(0), np.cov(ff.numpy(), rowvar=False), fr.mean(0), np.cov(fr.numpy(), rowvar=False)
    )
    assert want > 0
    with pytest.warns(RuntimeWarning, match="singular"):
        got = metric.compute()
    assert got == pytest.approx(want, rel=1e-4)
    with pytest.raises(ValueError, match="reference statistics are 2048-d but FDDINOv2 features are 64-d"):
        FDDINOv2((np.zeros(2048), np.eye(2048)), encoder=encoder)


@pytest.mark.slow
def test_evaluate_npz_matches_the_metrics_one_by_one(tmp_path, inception):
    gen = torch.Generator().manual_seed(8)
    ref_images = torch.randint(0, 256, (6, 3, 32, 32), generator=gen, dtype=torch.uint8)
    samples = save_samples(tmp_path / "samples.npz", torch.rand(5, 3, 32, 32, generator=gen))
    metric = FID(inception=inception, protocol="adm")
    ref_feats = metric.inception_features(ref_images, ("pool3", "spatial"))
    (sample_images,) = list(iter_npz_images(samples))
    feats = metric.inception_features(sample_images, ("pool3", "logits", "spatial"))
    stats = {}
    for name, key in (("fid", "pool3"), ("sfid", "spatial")):
        ref, gen_stats = GaussianStats(), GaussianStats()
        ref.update(ref_feats[key])
        gen_stats.update(feats[key])
        stats[name] = (ref, gen_stats)
    with pytest.warns(RuntimeWarning, match="singular"):
        path = save_reference(
            tmp_path / "ref.npz", stats["fid"][0], stats["sfid"][0], ref_images.permute(0, 2, 3, 1)
        )
        out = evaluate_npz(samples, path, inception=inception, batch_size=2)
        want = {name: frechet_distance(g.mu, g.sigma, r.mu, r.sigma) for name, (r, g) in stats.items()}
    want["inception_score"] = inception_score_adm(feats["logits"])[0]
    want.update(precision_recall(ref_feats["pool3"], feats["pool3"]))
    assert out == pytest.approx(want, rel=1e-6)
    assert (
        out["fid"] > 0
        and out["sfid"] > 0
        and np.isfinite(out["inception_score"])
        and out["inception_score"] >= 1
    )
