"""Guidance: CFG batched in one forward equals two forwards; interval and channel choice; autoguidance."""

from itertools import pairwise

import pytest
import torch

from latentforge_core import registry
from latentforge_generators.guidance import CFG, AutoGuidance


@pytest.fixture(scope="module")
def gen():
    torch.manual_seed(0)
    g = registry.generators.build("test-dit").eval()
    for p in g.parameters():  # adaLN-Zero starts at zero output: give the weights something to say
        torch.nn.init.normal_(p, std=0.05)
    return g


@pytest.fixture(scope="module")
def weak():
    torch.manual_seed(1)
    g = registry.generators.build("test-dit").eval()
    for p in g.parameters():
        torch.nn.init.normal_(p, std=0.05)
    return g


@pytest.fixture
def batch(gen):
    g = torch.Generator().manual_seed(2)
    return torch.randn(3, *gen.input_shape, generator=g), torch.tensor([1, 4, 7])


class CountingVelocity:
    """``gen.velocity`` that records the batch size of every call."""

    def __init__(self, gen):
        self.gen, self.batches = gen, []

    def __call__(self, x, t, y):
        self.batches.append(len(x))
        return self.gen.velocity(x, t, y)


@torch.no_grad()
def test_cfg_batched_equals_two_forwards(gen, batch):
    x, y = batch
    null = torch.full_like(y, gen.null_class)
    cond, uncond = gen.velocity(x, 0.6, y), gen.velocity(x, 0.6, null)
    assert (cond - uncond).abs().max() > 1e-3  # the label matters, so the check below has teeth
    fn = CountingVelocity(gen)
    guided = CFG(scale=4.0)(fn, x, 0.6, y, gen.null_class)
    assert fn.batches == [6]  # conditional and unconditional in one forward
    torch.testing.assert_close(guided, uncond + 4.0 * (cond - uncond), rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_cfg_interval_and_scale_one(gen, batch):
    x, y = batch
    cfg = CFG(scale=4.0, interval=(0.2, 0.7))
    for t, active in ((0.1, False), (0.2, True), (0.5, True), (0.7, True), (0.9, False)):
        fn = CountingVelocity(gen)
        out = cfg(fn, x, t, y, gen.null_class)
        assert fn.batches == ([6] if active else [3]), t
        if not active:
            torch.testing.assert_close(out, gen.velocity(x, t, y))
    fn = CountingVelocity(gen)
    torch.testing.assert_close(CFG(scale=1.0)(fn, x, 0.5, y, gen.null_class), gen.velocity(x, 0.5, y))
    assert fn.batches == [3]


@torch.no_grad()
def test_cfg_first_k_channels(gen, batch):
    x, y = batch
    cond = gen.velocity(x, 0.5, y)
    full = CFG(scale=3.0)(gen.velocity, x, 0.5, y, gen.null_class)
    part = CFG(scale=3.0, channels=3)(gen.velocity, x, 0.5, y, gen.null_class)
    torch.testing.assert_close(part[:, :3], full[:, :3])
    torch.testing.assert_close(part[:, 3:], cond[:, 3:])
    assert (full[:, 3:] - cond[:, 3:]).abs().max() > 1e-3
    with pytest.raises(ValueError, match="exceeds the 4 channels"):
        CFG(scale=3.0, channels=5)(gen.velocity, x, 0.5, y, gen.null_class)


@torch.no_grad()
def test_autoguidance(gen, weak, batch):
    x, y = batch
    labels = []
    guide = lambda x, t, y: labels.append(y) or weak.velocity(x, t, y)  # noqa: E731
    ag = AutoGuidance(guide=guide, scale=1.5, interval=(0.0, 0.8))
    v_main, v_weak = gen.velocity(x, 0.5, y), weak.velocity(x, 0.5, y)
    torch.testing.assert_close(ag(gen.velocity, x, 0.5, y, None), v_weak + 1.5 * (v_main - v_weak))
    assert torch.equal(labels[0], y)  # the weak model is conditioned on the class, not on the null label
    torch.testing.assert_close(ag(gen.velocity, x, 0.9, y, None), gen.velocity(x, 0.9, y))
    assert len(labels) == 1


@torch.no_grad()
def test_sample_with_guidance_matches_a_hand_written_loop(gen, weak, batch):
    """Euler with CFG on 3 channels inside an interval, written out with two separate forwards."""
    noise, y = batch
    null = torch.full_like(y, gen.null_class)
    grid = [1 - i / 8 for i in range(9)]
    x = noise.clone()
    for t, t_next in pairwise(grid):
        v = gen.velocity(x, t, y)
        if 0.3 <= t <= 0.8:
            u = gen.velocity(x, t, null)
            v = torch.cat([u[:, :3] + 2.5 * (v[:, :3] - u[:, :3]), v[:, 3:]], dim=1)
        x = x + (t_next - t) * v
    out, nfe = gen.sample(
        y, noise=noise, steps=8, cfg_scale=2.5, cfg_interval=(0.3, 0.8), cfg_channels=3, return_nfe=True
    )
    assert nfe == 8
    torch.testing.assert_close(out, x, rtol=1e-4, atol=1e-4)
    # Autoguidance through sample(): a weak model equal to the main one leaves the samples unchanged.
    plain = gen.sample(y, noise=noise, steps=4)
    same = gen.sample(y, noise=noise, steps=4, guidance="autoguidance", guidance_model=gen, cfg_scale=3.0)
    torch.testing.assert_close(same, plain, rtol=1e-4, atol=1e-4)
    other = gen.sample(y, noise=noise, steps=4, guidance="autoguidance", guidance_model=weak, cfg_scale=3.0)
    assert (other - plain).abs().max() > 1e-3


def test_guidance_errors(gen, batch):
    x, y = batch
    with pytest.raises(ValueError, match="interval"):
        CFG(scale=2.0, interval=(0.8, 0.2))
    with pytest.raises(ValueError, match="channels"):
        CFG(scale=2.0, channels=0)
    with pytest.raises(ValueError, match="cfg_channels=9 exceeds"):
        gen.sample(y, steps=2, cfg_scale=2.0, cfg_channels=9)
    with pytest.raises(ValueError, match="guidance_model"):
        gen.sample(y, steps=2, guidance="autoguidance", cfg_scale=2.0)
    with pytest.raises(ValueError, match="unknown guidance 'pag'"):
        gen.sample(y, steps=2, guidance="pag")
    no_null = registry.generators.build("test-dit", class_dropout_prob=0.0)
    assert no_null.null_class is None
    with pytest.raises(ValueError, match="needs a null class"):
        no_null.sample(y, steps=2, cfg_scale=4.0)
    with pytest.raises(ValueError, match="needs a null class"):
        CFG(scale=2.0)(no_null.velocity, x, 0.5, y, None)
    assert no_null.sample(y, steps=2).shape == x.shape  # no guidance: fine
