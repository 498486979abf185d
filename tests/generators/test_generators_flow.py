"""FlowGenerator: the Generator protocol on every registered diffusion entry, time conventions at the
model's door, samplers and NFE through ``sample``, and bad input."""

import math

import pytest
import torch
from flow_toys import randomized

from latentforge_core import registry
from latentforge_core.protocols import Generator
from latentforge_generators.flow import FlowGenerator
from latentforge_generators.transport import Transport

TINY = ["test-dit", "test-lightningdit", "test-ditdh"]


@pytest.mark.parametrize("name", TINY)
def test_protocol_loss_and_sample(name):
    gen = randomized(registry.generators.build(name), 0)
    assert isinstance(gen, Generator) and isinstance(gen, FlowGenerator)
    assert gen.input_shape == (4, 8, 8)
    x, y = torch.randn(4, *gen.input_shape), torch.tensor([0, 3, 9, 10])  # 10: the null label
    loss = gen.loss(x, y)
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None for p in gen.parameters() if p.requires_grad)
    out, nfe = gen.sample(y[:3], steps=3, return_nfe=True)
    assert out.shape == (3, 4, 8, 8) and nfe == 3 and torch.isfinite(out).all()
    assert gen.sample(2, steps=2).shape == (2, 4, 8, 8)  # n unconditional samples (null label)
    assert gen.training  # sample() restores the mode it found


def test_registered_sizes_and_transport_overrides():
    assert {"dit-s-2", "dit-b-2", "dit-l-2", "dit-xl-2", "lightningdit-b-1", "lightningdit-l-1",
            "lightningdit-xl-1", "ditdh-xl", "ditdh-s"} <= set(registry.generators.names())  # fmt: skip
    gen = registry.generators.build("dit-s-2", in_channels=4, input_size=8, num_classes=5)
    assert gen.input_shape == (4, 8, 8) and gen.num_classes == 5 and gen.transport == Transport()
    assert len(gen.backbone.blocks) == 12 and gen.backbone.hidden_size == 384
    light = registry.generators.build("test-lightningdit", transport={"cos_weight": 0.5})
    assert light.transport.time_dist == "logit-normal" and light.transport.cos_weight == 0.5
    assert light.transport.sampling_shift == pytest.approx(1 / 0.3)
    rae = registry.generators.build("test-ditdh", in_channels=768, input_size=2)
    assert rae.transport.shift == pytest.approx(math.sqrt(768 * 4 / 4096))  # RAE's dimension shift
    with pytest.raises(ValueError, match="unknown transport option"):
        registry.generators.build("test-dit", transport={"shfit": 3})


@pytest.mark.parametrize("name", ["test-dit", "test-ditdh"])
def test_loss_is_the_backbones_own_flow_matching_loss(name):
    """Reproduce ``loss`` in the backbone's own time: SiT's x_τ = τx + (1 − τ)ε with target x − ε for
    DiT (τ = 0 noise), RAE's x_t = (1 − t)x + tε with target ε − x for DiT-DH."""
    gen = randomized(registry.generators.build(name), 1).eval()
    x, y = torch.randn(6, *gen.input_shape), torch.randint(0, 10, (6,))
    torch.manual_seed(5)
    ours = gen.loss(x, y)
    torch.manual_seed(5)
    noise = torch.randn_like(x)
    t = gen.transport.sample_time(6)  # internal: 1 is noise
    if gen.backbone.time_convention == "noise_at_0":
        tau = (1 - t).view(-1, 1, 1, 1)
        pred = gen.backbone(tau * x + (1 - tau) * noise, 1 - t, y)[:, :4]
        target = x - noise
    else:
        tb = t.view(-1, 1, 1, 1)
        pred, target = gen.backbone((1 - tb) * x + tb * noise, t, y), noise - x
    torch.testing.assert_close(ours, (pred - target).square().mean(), rtol=1e-5, atol=1e-6)


def test_class_dropout_for_backbones_that_do_not_drop_labels():
    backbone = registry.generators.build("test-dit", class_dropout_prob=0.0).backbone
    seen = []
    backbone.register_forward_pre_hook(lambda module, args: seen.append(args[2].clone()))
    assert FlowGenerator(backbone).null_class is None
    gen = FlowGenerator(backbone, class_dropout=0.5)
    assert gen.null_class == 10
    y = torch.randint(0, 10, (400,), generator=torch.Generator().manual_seed(0))
    gen.loss(torch.randn(400, 4, 8, 8), y)
    dropped = seen[-1] == 10
    assert 0.4 < dropped.float().mean() < 0.6 and torch.equal(seen[-1][~dropped], y[~dropped])
    gen.eval().loss(torch.randn(400, 4, 8, 8), y)  # no dropout outside training
    assert torch.equal(seen[-1], y)
    with pytest.raises(ValueError, match="class_dropout"):
        FlowGenerator(backbone, class_dropout=1.0)


def test_velocity_converts_time_and_sign():
    gen = randomized(registry.generators.build("test-dit"), 2).eval()
    x, y = torch.randn(2, *gen.input_shape), torch.tensor([1, 2])
    with torch.no_grad():
        torch.testing.assert_close(gen.velocity(x, 0.3, y), -gen.backbone(x, torch.full((2,), 0.7), y)[:, :4])


@pytest.mark.parametrize(
    "sampler, options, nfe",
    [("euler", {}, 6), ("heun", {}, 12), ("sde", {}, 6), ("dopri5", {"atol": 1e-3, "rtol": 1e-2}, None)],
)
def test_samplers_through_sample(sampler, options, nfe):
    gen = randomized(registry.generators.build("test-dit"), 3)
    y = torch.tensor([0, 5])
    noise = torch.randn(2, *gen.input_shape, generator=torch.Generator().manual_seed(0))
    out, used = gen.sample(
        y, sampler=sampler, steps=6, noise=noise, return_nfe=True, cfg_scale=2.0, **options
    )
    assert out.shape == noise.shape and torch.isfinite(out).all()
    assert used == nfe if nfe is not None else used >= 8  # dopri5: at least the first step's 6 stages + 2
    again = gen.sample(
        y,
        sampler=sampler,
        steps=6,
        noise=noise,
        cfg_scale=2.0,
        generator=torch.Generator().manual_seed(0),
        **options,
    )
    if sampler != "sde":
        torch.testing.assert_close(out, again)  # deterministic given the noise


def test_bad_input():
    gen = registry.generators.build("test-dit")
    x, y = torch.randn(2, 4, 8, 8), torch.tensor([1, 2])
    with pytest.raises(ValueError, match=r"shape \[B, 4, 8, 8\].*got \[2, 3, 8, 8\]"):
        gen.loss(torch.randn(2, 3, 8, 8), y)
    with pytest.raises(ValueError, match=r"shape \[B, 4, 8, 8\].*got \[2, 4, 16, 16\]"):
        gen.loss(torch.randn(2, 4, 16, 16), y)
    with pytest.raises(ValueError, match=r"shape \[B, 4, 8, 8\]"):
        gen.loss(torch.randn(4, 8, 8), y)
    with pytest.raises(ValueError, match="NaN"):
        gen.loss(x.clone().index_put_((torch.tensor([0]),), torch.tensor(float("nan"))), y)
    with pytest.raises(
        ValueError, match=r"class labels must lie in \[0, 10\) or the null label 10, got .*11"
    ):
        gen.loss(x, torch.tensor([1, 11]))
    with pytest.raises(ValueError, match="-1"):
        gen.sample(torch.tensor([-1, 2]), steps=2)
    with pytest.raises(TypeError, match="integer tensor"):
        gen.loss(x, torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match=r"shape \[2\]"):
        gen.loss(x, torch.tensor([1, 2, 3]))
    with pytest.raises(TypeError, match="floating-point"):
        gen.loss(x.long(), y)
    with pytest.raises(ValueError, match="unknown sampler 'ddim'"):
        gen.sample(y, sampler="ddim")
    with pytest.raises(ValueError, match="noise has 3 latents but there are 2 labels"):
        gen.sample(y, noise=torch.randn(3, 4, 8, 8), steps=2)
    with pytest.raises(ValueError, match="noise must have shape"):
        gen.sample(y, noise=torch.randn(2, 4, 4, 4), steps=2)
    with pytest.raises(ValueError, match="noise contains NaN"):
        gen.sample(y, noise=torch.full((2, 4, 8, 8), float("nan")), steps=2)
    with pytest.raises(ValueError, match="number of samples"):
        gen.sample(None)
    no_null = registry.generators.build("test-dit", class_dropout_prob=0.0)
    with pytest.raises(ValueError, match="needs a null class"):
        no_null.sample(y, cfg_scale=1.5, steps=2)
    with pytest.raises(ValueError, match="no trained null class"):
        no_null.sample(2, steps=2)
    with pytest.raises(ValueError, match=r"in \[0, 10\), got"):
        no_null.loss(x, torch.tensor([1, 10]))  # the null label is no valid class without label dropout
    with pytest.raises(TypeError, match="lacks the attribute 'in_channels'"):
        FlowGenerator(torch.nn.Linear(2, 2))
