"""A flow whose exact velocity is known: data x0 ~ N(MU, S²) per element on the linear path
x_t = (1 − t)·x0 + t·ε (t = 1 noise), for samplers tested against the exact ODE solution."""

import torch

MU = torch.linspace(-2.0, 2.0, 8, dtype=torch.float64).view(1, 2, 2, 2)
S = torch.linspace(0.3, 1.5, 8, dtype=torch.float64).view(1, 2, 2, 2)


class GaussianVelocity:
    """The exact velocity of the toy, counting its calls."""

    def __init__(self):
        self.calls = 0

    def __call__(self, x, t):
        self.calls += 1
        var = (1 - t) ** 2 * S**2 + t**2
        return (t - (1 - t) * S**2) * (x - (1 - t) * MU) / var - MU


def randomized(gen, seed):
    """Registered models start with zeroed adaLN and output layers; random weights make them speak."""
    torch.manual_seed(seed)
    for p in gen.parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.05)
    return gen
