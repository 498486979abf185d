"""Sampling throughput: 50-step Euler with classifier-free guidance, images/s and MFU.

Full size: ``dit-s-2`` on 4×32×32 latents (SD-VAE at 256 px), 2 images (a batch of 4 with CFG).
Tiny: the ``test-dit`` entry.
Beside ours, the same sampler with guidance done as two separate forwards (cond, then uncond), the
way a naive loop would, to show what batching them into one forward buys.
"""

import attrs
import torch
from torch.utils.flop_counter import FlopCounterMode

from latentforge_core import registry
from latentforge_generators.guidance import CFG

STEPS = 50


@attrs.frozen(kw_only=True)
class TwoForwardCFG(CFG):
    """The same guidance arithmetic, with the unconditional forward run separately."""

    def __call__(self, velocity, x, t, y, null):
        if not self.active(t):
            return velocity(x, t, y)
        return self.combine(velocity(x, t, y), velocity(x, t, torch.full_like(y, null)))


def _setup(full, device):
    name, kwargs, batch = (
        ("dit-s-2", {"input_size": 32, "in_channels": 4}, 2) if full else ("test-dit", {}, 2)
    )
    gen = registry.generators.build(name, **kwargs).to(device).eval()
    y = torch.arange(batch, device=device) % gen.num_classes
    x = torch.randn(2 * batch, *gen.input_shape, device=device)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        gen.velocity(x, 0.5, torch.cat([y, y]))
    return gen, y, STEPS * counter.get_total_flops()


def test_sampling_euler_cfg(measure, full, device):
    gen, y, flops = _setup(full, device)
    noise = torch.randn(len(y), *gen.input_shape, device=device)
    out = measure(
        lambda: gen.sample(y, noise=noise, steps=STEPS, cfg_scale=4.0),
        group="sample euler-50 cfg",
        impl="ours",
        items=len(y),
        unit="images/s",
        flops=flops,
    )
    assert out.shape == noise.shape


def test_sampling_euler_cfg_two_forwards(measure, full, device):
    gen, y, flops = _setup(full, device)
    noise = torch.randn(len(y), *gen.input_shape, device=device)
    guidance = TwoForwardCFG(scale=4.0)
    out = measure(
        lambda: gen.sample(y, noise=noise, steps=STEPS, guidance=guidance),
        group="sample euler-50 cfg",
        impl="two forwards",
        items=len(y),
        unit="images/s",
        flops=flops,
    )
    assert out.shape == noise.shape
