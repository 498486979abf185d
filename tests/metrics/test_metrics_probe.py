"""The linear probe really learns on scikit-learn's digits, as well as scikit-learn's own classifier."""

from __future__ import annotations

import pytest
import torch
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from latentforge_core import registry
from latentforge_metrics import LinearProbe


@pytest.fixture(scope="module")
def digits():
    data = load_digits()
    images = (
        torch.tensor(data.images, dtype=torch.float32)[:, None].expand(-1, 3, -1, -1) / 16
    )  # [N, 3, 8, 8]
    labels = torch.tensor(data.target)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    return images[order], labels[order]


def _sklearn_accuracy(train_x, train_y, val_x, val_y) -> float:
    scaler = StandardScaler().fit(train_x.numpy())
    clf = LogisticRegression(max_iter=2000).fit(scaler.transform(train_x.numpy()), train_y.numpy())
    return clf.score(scaler.transform(val_x.numpy()), val_y.numpy())


def _probe(features, images, labels, **kw) -> LinearProbe:
    probe = LinearProbe(10, features, epochs=60, lr=1.0, batch_size=256, **kw)
    for start in range(0, 1200, 300):  # streamed in batches, as inside a training loop
        probe.update(images[start : start + 300], labels[start : start + 300], train=True)
    probe.update(images[1200:], labels[1200:], train=False)
    return probe


def test_probe_on_pixels_learns_like_logistic_regression(digits):
    images, labels = digits
    pixels = lambda x: x[:, 0].flatten(1)  # any function of images is a feature extractor
    result = _probe(pixels, images, labels).compute()
    want = _sklearn_accuracy(pixels(images[:1200]), labels[:1200], pixels(images[1200:]), labels[1200:])
    assert result["top1"] > 0.85
    assert result["top1"] == pytest.approx(want, abs=0.05)


def test_probe_on_a_registered_encoder(digits):
    images, labels = digits
    probe = _probe("test-vit-tiny", images, labels, output="cls")
    result = probe.compute()
    encoder = registry.encoders.build("test-vit-tiny")
    with torch.no_grad():  # the probe holds the encoder's CLS features
        assert torch.allclose(
            probe.train_x.parts[0][:8], encoder.features(images[:8], output="cls"), atol=1e-5
        )
    train_x, val_x = probe.train_x.gathered(), probe.val_x.gathered()
    want = _sklearn_accuracy(train_x, labels[:1200], val_x, labels[1200:])
    assert result["top1"] > 0.5  # chance is 0.1: random ViT features are still informative
    assert result["top1"] == pytest.approx(want, abs=0.05)


def test_probe_merge_and_bad_input(digits):
    images, labels = digits
    pixels = lambda x: x[:, 0].flatten(1)
    a, b = LinearProbe(10, pixels, epochs=5), LinearProbe(10, pixels, epochs=5)
    a.update(images[:600], labels[:600])
    b.update(images[600:1200], labels[600:1200])
    b.update(images[1200:], labels[1200:], train=False)
    a.merge(b)
    assert len(a.train_x) == 1200 and len(a.val_x) == 597
    with pytest.raises(ValueError, match=r"labels must be in \[0, 10\)"):
        a.update(images[:4], torch.tensor([0, 1, 2, 10]))
    with pytest.raises(ValueError, match="4 feature rows but 3 labels"):
        a.update(images[:4], labels[:3])
    with pytest.raises(ValueError, match="held-out"):
        LinearProbe(10, pixels).compute()
