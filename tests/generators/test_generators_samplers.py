"""Samplers on a Gaussian toy whose exact velocity field and exact ODE map are known in closed form.

Data N(μ, diag s²) on the path x_t = (1 − t)x + tε has x_t ~ N((1 − t)μ, σ_t²), σ_t² = (1 − t)²s² + t²,
and E[ε − x | x_t] = (t − (1 − t)s²)(x_t − (1 − t)μ)/σ_t² − μ. Its probability-flow ODE carries noise
z at t = 1 to exactly μ + s·z at t = 0, so every ODE sampler can be checked sample by sample.
"""

from itertools import pairwise

import numpy as np
import pytest
import torch
from flow_toys import MU, GaussianVelocity, S
from scipy.integrate import solve_ivp

from latentforge_generators.samplers import SAMPLERS, dopri5, euler, euler_maruyama, heun, solve, time_grid


@pytest.fixture(scope="module")
def noise():
    return torch.randn(10000, 2, 2, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def _exact(noise):
    return MU + S * noise


def _max_error(result, noise):
    return (result.x - _exact(noise)).abs().max().item()


def _check_moments(x, noise=None, bias_tol=0.01):
    """Mean and variance per dimension: against the target (4 standard errors of the estimates plus
    the solver's bias) and, for ODE samplers, against the exact map of the same noise (bias only)."""
    n = len(x)
    mean, var = x.mean(0, keepdim=True), x.var(0, keepdim=True)
    assert (mean - MU).abs().max() < 4 * 1.5 / n**0.5 + bias_tol, (mean - MU).abs().max()
    assert ((var / S**2) - 1).abs().max() < 4 * (2 / n) ** 0.5 + 2 * bias_tol, ((var / S**2) - 1).abs().max()
    if noise is not None:
        exact = _exact(noise)
        assert (mean - exact.mean(0)).abs().max() < bias_tol, (mean - exact.mean(0)).abs().max()
        assert ((var / exact.var(0)) - 1).abs().max() < 2 * bias_tol, ((var / exact.var(0)) - 1).abs().max()


def test_time_grid():
    grid = time_grid(4)
    assert grid == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0])
    shifted = time_grid(4, shift=3.0, t_end=0.001)
    assert shifted[0] == 1.0 and shifted[-1] == pytest.approx(3 * 0.001 / (1 + 2 * 0.001))
    assert all(a > b for a, b in pairwise(shifted)) and shifted[2] > 0.5  # toward noise
    with pytest.raises(ValueError, match="positive integer"):
        time_grid(0)


def test_euler_recovers_the_gaussian(noise):
    fn = GaussianVelocity()
    result = euler(fn, noise, time_grid(200))
    assert result.nfe == 200 == fn.calls
    _check_moments(result.x, noise, bias_tol=0.015)  # first order: 2.7 % variance bias at s = 0.3
    # First order: doubling the steps halves the per-sample error against the exact ODE map.
    errors = [
        _max_error(euler(GaussianVelocity(), noise[:256], time_grid(n)), noise[:256]) for n in (25, 50, 100)
    ]
    assert errors[0] / errors[1] == pytest.approx(2, rel=0.25) and errors[1] / errors[2] == pytest.approx(
        2, rel=0.25
    )
    # On a shifted grid (more steps near the noise end) it converges to the same map.
    assert _max_error(euler(GaussianVelocity(), noise[:256], time_grid(400, shift=3.0)), noise[:256]) < 0.02


def test_heun_is_second_order(noise):
    fn = GaussianVelocity()
    result = heun(fn, noise, time_grid(50))
    assert result.nfe == 100 == fn.calls
    _check_moments(result.x, noise)
    errors = [
        _max_error(heun(GaussianVelocity(), noise[:256], time_grid(n)), noise[:256]) for n in (10, 20, 40)
    ]
    assert errors[0] / errors[1] > 3.0 and errors[1] / errors[2] > 3.0
    assert errors[2] < 1e-3


def test_dopri5_adapts_to_tolerance(noise):
    loose, tight = GaussianVelocity(), GaussianVelocity()
    coarse = dopri5(loose, noise, atol=1e-4, rtol=1e-3)
    fine = dopri5(tight, noise, atol=1e-8, rtol=1e-8)
    assert coarse.nfe == loose.calls and fine.nfe == tight.calls
    assert fine.nfe > coarse.nfe
    assert (coarse.x - _exact(noise)).square().mean().sqrt() < 1e-2 and _max_error(coarse, noise) < 0.05
    assert _max_error(fine, noise) < 1e-6
    _check_moments(fine.x, noise, bias_tol=1e-6)


def test_euler_maruyama_converges(noise):
    fn = GaussianVelocity()
    gen = torch.Generator().manual_seed(1)
    result = euler_maruyama(fn, noise, steps=250, generator=gen)
    assert result.nfe == 250 == fn.calls
    _check_moments(result.x)
    # A stochastic sampler: it does not follow the deterministic ODE map sample by sample.
    assert _max_error(result, noise) > 0.5
    for options in (
        {"last_step": "denoise"},
        {"last_step": "euler"},
        {"diffusion": "constant", "last_step": "denoise"},
    ):
        _check_moments(
            euler_maruyama(GaussianVelocity(), noise, steps=100, generator=gen, **options).x, bias_tol=0.02
        )
    # Without the last step it stops at t = 0.04, on that time's marginal N(0.96 μ, 0.96² s² + 0.04²).
    stopped = euler_maruyama(GaussianVelocity(), noise, steps=100, last_step="none", generator=gen)
    assert stopped.nfe == 99
    var_t = 0.96**2 * S[0] ** 2 + 0.04**2
    assert ((stopped.x.var(0) / var_t) - 1).abs().max() < 0.08
    assert (stopped.x.mean(0) - 0.96 * MU[0]).abs().max() < 0.07


class MixtureVelocity:
    """Exact velocity of a 1-D two-component Gaussian mixture: a nonlinear field."""

    weights, means, stds = (0.3, 0.7), (-2.0, 1.5), (0.4, 0.6)

    def __call__(self, x, t):
        x = torch.as_tensor(x, dtype=torch.float64)
        logits, vels = [], []
        for w, m, s in zip(self.weights, self.means, self.stds, strict=True):
            var = (1 - t) ** 2 * s**2 + t**2
            logits.append(np.log(w) - 0.5 * (x - (1 - t) * m) ** 2 / var - 0.5 * np.log(var))
            vels.append((t - (1 - t) * s**2) * (x - (1 - t) * m) / var - m)
        r = torch.softmax(torch.stack(logits), dim=0)
        return (r * torch.stack(vels)).sum(0)


def test_ode_solvers_agree_with_scipy_on_a_nonlinear_field():
    """Against scipy's DOP853 at tolerance 1e-12 (an independent integrator) on a bimodal flow."""
    fn = MixtureVelocity()
    z = torch.randn(64, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    ref = solve_ivp(
        lambda t, x: fn(x, t).numpy(), (1.0, 0.0), z.numpy(), method="DOP853", rtol=1e-12, atol=1e-12
    )
    ref = torch.from_numpy(ref.y[:, -1])
    assert (ref < 0).float().mean().item() == pytest.approx(0.3, abs=0.15)  # both modes are reached
    assert (dopri5(fn, z, atol=1e-9, rtol=1e-9).x - ref).abs().max() < 1e-6
    assert (heun(fn, z, time_grid(200)).x - ref).abs().max() < 1e-3
    assert (euler(fn, z, time_grid(1000)).x - ref).abs().max() < 2e-2


def test_solve_dispatch_and_errors(noise):
    x = noise[:64]
    for name in SAMPLERS:
        result = solve(name, GaussianVelocity(), x, steps=20, generator=torch.Generator().manual_seed(0))
        assert result.x.shape == x.shape and result.nfe > 0
    assert solve("euler", GaussianVelocity(), x, steps=20).nfe == 20
    assert solve("heun", GaussianVelocity(), x, steps=20).nfe == 40
    with pytest.raises(ValueError, match="unknown sampler 'rk4'"):
        solve("rk4", GaussianVelocity(), x)
    with pytest.raises(TypeError, match="takes no options"):
        solve("euler", GaussianVelocity(), x, atol=1e-3)
    with pytest.raises(ValueError, match="unknown SDE diffusion"):
        solve("sde", GaussianVelocity(), x, diffusion="sbdm2")
    with pytest.raises(ValueError, match="atol"):
        solve("dopri5", GaussianVelocity(), x, atol=0.0)
    with pytest.raises(RuntimeError, match="did not reach"):
        dopri5(GaussianVelocity(), x, atol=1e-12, rtol=1e-12, max_steps=3)
