"""Learning on real data: the registered tiny DiT (``test-dit``) as a class-conditional flow on
scikit-learn's 8×8 digits (1×8×8 latents in [-1, 1]), trained for 1,000 AdamW steps on CPU.

Measured when written (seeded, 1 thread): held-out loss 1.73 → 0.49; Fréchet distance to the 297
held-out digits over the informative pixels: samples 2.8 (cfg 1) / 3.4 (cfg 2), Gaussian noise 59.5,
the training digits themselves 1.35; a logistic-regression digit classifier (92 % on held-out digits)
reads the requested class in 68 % of the samples without guidance and 92 % with cfg 2 (chance 10 %).
"""

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression

from latentforge_core import registry


def frechet(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance of Gaussians fitted to rows; tr sqrt(C1 C2) from the symmetric C1½ C2 C1½."""
    m1, m2 = a.mean(0), b.mean(0)
    c1, c2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    w, v = np.linalg.eigh(c1)
    root1 = (v * np.sqrt(w.clip(min=0))) @ v.T
    cross = np.sqrt(np.linalg.eigvalsh(root1 @ c2 @ root1).clip(min=0)).sum()
    return float(((m1 - m2) ** 2).sum() + np.trace(c1) + np.trace(c2) - 2 * cross)


@pytest.mark.slow
def test_tiny_dit_learns_digits():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _learn()
    finally:
        torch.set_num_threads(threads)


def _learn():
    torch.manual_seed(0)
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 8 - 1  # B, 1, 8, 8 in [-1, 1]
    y = torch.tensor(digits.target)
    x_train, y_train, x_test, y_test = x[:1500], y[:1500], x[1500:], y[1500:]
    gen = registry.generators.build("test-dit", in_channels=1, input_size=8, num_classes=10)

    def held_out_loss() -> float:
        gen.eval()
        torch.manual_seed(123)  # same noise and times before and after training
        with torch.no_grad():
            loss = gen.loss(x_test, y_test).item()
        gen.train()
        return loss

    start = held_out_loss()
    opt = torch.optim.AdamW(gen.parameters(), lr=1e-3, weight_decay=0.0)
    batches = torch.Generator().manual_seed(0)
    for _ in range(1000):
        idx = torch.randint(0, len(x_train), (128,), generator=batches)
        loss = gen.loss(x_train[idx], y_train[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    end = held_out_loss()
    assert end < 0.5 * start, (start, end)

    flat = lambda t: t.reshape(len(t), -1).double().numpy()  # noqa: E731
    keep = flat(x_train).std(0) > 1e-3  # the always-blank border pixels make covariances singular
    test = flat(x_test)[:, keep]
    labels = torch.arange(10).repeat_interleave(30)
    classifier = LogisticRegression(max_iter=2000).fit(flat(x_train), y_train.numpy())
    assert classifier.score(flat(x_test), y_test.numpy()) > 0.85

    noise = torch.randn(len(labels), 1, 8, 8, generator=torch.Generator().manual_seed(2))
    fd_noise = frechet(flat(noise)[:, keep], test)
    fd_train = frechet(flat(x_train)[:, keep], test)
    accuracy, fd = {}, {}
    for scale in (1.0, 2.0):
        samples = gen.sample(labels, steps=30, cfg_scale=scale, generator=torch.Generator().manual_seed(1))
        fd[scale] = frechet(flat(samples)[:, keep], test)
        accuracy[scale] = (classifier.predict(flat(samples.clamp(-1, 1))) == labels.numpy()).mean()
    summary = f"loss {start:.3f} -> {end:.3f}; FD samples {fd}, noise {fd_noise:.2f}, train {fd_train:.2f}"
    print(f"{summary}; class accuracy of samples {accuracy}")
    for scale in fd:
        assert fd[scale] < 0.1 * fd_noise and fd[scale] < 4 * fd_train, (scale, fd, fd_noise, fd_train)
    assert accuracy[1.0] > 0.4 and accuracy[2.0] > 0.7, accuracy  # chance: 0.1
    assert accuracy[2.0] > accuracy[1.0]  # guidance makes the class more recognisable
