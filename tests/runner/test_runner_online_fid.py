"""Online FID in train-generator: every eval.every steps the EMA's samples are scored against a reference
.npz with a registered Fréchet metric (here fd-dinov2 over the tiny test ViT, to stay fast); the logged
value equals a Fréchet distance recomputed with scipy from the same samples and reference images."""

import json

import numpy as np
import pytest
import scipy.linalg
import torch

from latentforge_metrics.npz import save_samples
from latentforge_runner import cli
from latentforge_runner.config import ConfigError
from latentforge_runner.data import Digits
from latentforge_runner.recipes.train_generator import TrainGeneratorRecipe


def _frechet(a: np.ndarray, b: np.ndarray) -> float:
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    path = tmp_path_factory.mktemp("ref") / "digits_test.npz"
    images = Digits("test", 32).images[:120]
    save_samples(path, (images * 255).round().byte())
    return path


def _settings(out, reference, *extra):
    return cli.load_settings(
        "train-generator",
        "tiny-rae",
        [
            "training.steps=4",
            "training.batch_size=8",
            "training.checkpoint_every=4",
            "eval.every=2",
            "eval.num_samples=4",
            "eval.stats_batches=1",
            "eval.sampler.steps=2",
            "eval.fid_samples=72",
            "eval.fid_batch_size=25",
            f"eval.fid_reference={reference}",
            "eval.fid_metric=fd-dinov2",
            "eval.fid_params={encoder: test-vit-tiny, output: cls}",
            f"run.output_dir={out}",
            *extra,
        ],
    )[1]


def test_online_fid_is_logged_and_matches_scipy(reference, tmp_path):
    job = TrainGeneratorRecipe(_settings(tmp_path, reference))
    try:
        job.setup()
        job.run()
        job.save()
        # Recompute the last evaluation by hand: the same seeded draws, the metric's own encoder.
        metric, seed = job.fid.metric, job.cfg.run.seed
        with torch.no_grad():
            torch.manual_seed(seed)
            fake = torch.cat(
                [
                    metric.features((job.generate(i % 10) * 255).round().to(torch.uint8))
                    for i in torch.arange(72).split(25)
                ]
            )
            real = metric.features(torch.from_numpy(np.load(reference)["arr_0"]).permute(0, 3, 1, 2))
    finally:
        job.cleanup()
    rows = [json.loads(r) for r in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    fids = {r["step"]: r["eval/fd-dinov2"] for r in rows if "eval/fd-dinov2" in r}
    assert sorted(fids) == [2, 4]  # every 2 steps; the end (step 4) is not scored twice
    expected = _frechet(fake.double().numpy(), real.double().numpy())
    assert fids[4] == pytest.approx(expected, rel=1e-3)
    assert fids[2] != fids[4]  # the EMA moved between the evaluations
    # Scoring draws its own noise: the run trains exactly as without it.
    plain = TrainGeneratorRecipe(_settings(tmp_path / "plain", reference, "eval.fid_samples=0"))
    try:
        plain.setup()
        plain.run()
    finally:
        plain.cleanup()
    for a, b in zip(plain.state.ema.module.parameters(), job.state.ema.module.parameters(), strict=True):
        assert torch.equal(a, b)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("eval/fd-dinov2")] == [2, 4]
    assert events.Scalars("eval/fd-dinov2")[-1].value == pytest.approx(fids[4], rel=1e-6)


def test_online_fid_bad_settings(reference, tmp_path):
    with pytest.raises(ConfigError, match="needs eval.fid_reference"):
        cli.load_settings("train-generator", "tiny-rae", ["eval.fid_samples=10"])
    job = TrainGeneratorRecipe(_settings(tmp_path, reference, "eval.fid_metric=psnr", "eval.fid_params={}"))
    try:
        job.setup()
        with pytest.raises(ConfigError, match="'psnr' is not a Fréchet distance"):
            job.evaluate()
    finally:
        job.cleanup()
