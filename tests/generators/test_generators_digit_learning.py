"""Learning on real data: a tiny GPT and a tiny MaskGIT over K-Means tokens of scikit-learn's digits.

The tokens come from latentforge's K-Means tokenizer (faiss K-Means) over 2×2 pixel patches, so a
token grid decodes back to an image through its centroids; class-conditional samples are decoded
and read by a logistic-regression classifier trained on the real digits.
"""

import math

import numpy as np
import pytest
import torch
from einops import rearrange
from torch import nn

from latentforge_core.protocols import Preprocessing
from latentforge_generators.gpt import GPT
from latentforge_generators.maskgit import MaskGIT

K, GRID = 32, 4


class PixelPatches(nn.Module):
    """A stand-in encoder whose features are the raw 2×2 patches of an 8×8 grey image."""

    preprocessing = Preprocessing(input_size=8)
    embed_dim = 4
    layers = (0,)

    def forward(self, images):
        return rearrange(images[:, :1], "b c (h p) (w q) -> b (c p q) h w", p=2, q=2)  # B 4 4 4

    def feature_shape(self, image_size=None):
        return (4, GRID, GRID)


@pytest.fixture(scope="module")
def digits():
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression

    from latentforge_tokenizers.kmeans import KMeansTokenizer

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: threads only add contention on a shared runner
    data = load_digits()
    images = torch.from_numpy(data.images / 16).float()[:, None].expand(-1, 3, -1, -1)  # B 3 8 8 in [0, 1]
    labels = torch.from_numpy(data.target).long()
    tokenizer = KMeansTokenizer(PixelPatches(), n_clusters=K).fit(images.split(256))
    tokens = tokenizer.encode(images)  # B 4 4
    perm = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
    train, test = perm[:1500], perm[1500:]
    classifier = LogisticRegression(max_iter=3000).fit(
        images[train, 0].flatten(1).numpy(), labels[train].numpy()
    )

    def decode(t):
        return rearrange(tokenizer.lookup(t), "b (p q) h w -> b (h p) (w q)", p=2, q=2)  # B 8 8

    # a unigram model of the training tokens: what a model that ignores context would score
    freq = torch.bincount(tokens[train].flatten(), minlength=K).float() + 1
    test_freq = torch.bincount(tokens[test].flatten(), minlength=K).float()
    unigram = -(test_freq / test_freq.sum() * (freq / freq.sum()).log()).sum().item()
    yield dict(
        tokens=tokens,
        labels=labels,
        train=train,
        test=test,
        decode=decode,
        classifier=classifier,
        unigram=unigram,
    )
    torch.set_num_threads(threads)


def train(model, d, steps=300, batch=64, lr=3e-3):
    torch.manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    tokens, labels = d["tokens"][d["train"]], d["labels"][d["train"]]
    first = None
    for _ in range(steps):
        idx = torch.randint(0, len(tokens), (batch,))
        loss = model.loss(tokens[idx], labels[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = loss.item() if first is None else first
    model.eval()
    torch.manual_seed(1)
    with torch.no_grad():
        test_loss = np.mean(
            [model.loss(d["tokens"][d["test"]], d["labels"][d["test"]]).item() for _ in range(3)]
        )
    return first, test_loss


def sample_accuracy(model, d, **sampler):
    y = torch.arange(10).repeat(10)
    tokens = model.sample(y, generator=torch.Generator().manual_seed(0), **sampler)
    images = d["decode"](tokens)
    assert images.shape == (100, 8, 8) and images.min() >= 0 and images.max() <= 1
    return d["classifier"].score(images.flatten(1).numpy(), y.numpy())


@pytest.mark.slow
@pytest.mark.parametrize("style", ["digit", "modern"])
def test_tiny_gpt_learns_digit_tokens(digits, style):
    model = GPT(
        vocab_size=K, grid_size=GRID, num_classes=10, dim=64, depth=2, num_heads=4, style=style, dropout=0.1
    )
    first, test_loss = train(model, digits)
    # measured: held-out 1.44 (digit) / 1.44 (modern) nats/token vs log K = 3.47 and a unigram model's 2.85;
    # decoded samples read as the requested digit 86% / 77% of the time
    assert test_loss < 0.5 * math.log(K) and test_loss < digits["unigram"] - 0.8, (first, test_loss)
    accuracy = sample_accuracy(model, digits, top_k=K)
    assert accuracy > 0.7, accuracy  # a classifier reads the requested digit in the decoded samples


@pytest.mark.slow
def test_tiny_maskgit_learns_digit_tokens(digits):
    model = MaskGIT(
        vocab_size=K,
        grid_size=GRID,
        num_classes=10,
        dim=64,
        depth=2,
        num_heads=4,
        style="prenorm",
        dropout=0.1,
        label_smoothing=0.0,
    )
    first, test_loss = train(model, digits)
    # measured: 1.62 nats per masked token held out; decoded samples read correctly 95% of the time
    assert test_loss < 0.5 * math.log(K) and test_loss < digits["unigram"] - 0.8, (first, test_loss)
    accuracy = sample_accuracy(model, digits, steps=4)
    assert accuracy > 0.7, accuracy
