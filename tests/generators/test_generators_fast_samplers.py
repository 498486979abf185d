"""Fast samplers for flow models: DPM-Solver++(2M) ("dpm++2m") and the explicit midpoint rule.

The toy: data x0 ~ N(μ, diag s²) on the path x_t = (1 − t)·x0 + t·ε. Then x_t ~ N((1 − t)μ, σ_t²) with
σ_t² = (1 − t)²s² + t², Cov(x0, x_t) = (1 − t)s², so the Gaussian conditional mean is
E[x0 | x_t = x] = μ + (1 − t)s²·(x − (1 − t)μ)/σ_t². Since ε − x0 = (x_t − x0)/t, the marginal
velocity is v(x, t) = E[ε − x0 | x_t = x] = (x − E[x0 | x_t = x])/t, which simplifies (no 1/t) to
v = (t − (1 − t)s²)(x − (1 − t)μ)/σ_t² − μ. Its ODE carries z at t = 1 to exactly μ + s·z at t = 0.
"""

import pytest
import torch
from flow_toys import MU, GaussianVelocity, S

from latentforge_generators.samplers import (
    SAMPLERS,
    check_sample_options,
    dopri5,
    dpm_solver_2m,
    euler,
    midpoint,
    solve,
    time_grid,
)
from latentforge_generators.transport import time_shift


@pytest.fixture(scope="module")
def noise():
    return torch.randn(256, 2, 2, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


@pytest.fixture(scope="module")
def reference(noise):
    """dopri5 at tolerance 1e-11 (to t = 0 and to t = 0.001), checked against the closed form."""
    to_zero = dopri5(GaussianVelocity(), noise, atol=1e-11, rtol=1e-11).x
    assert (to_zero - (MU + S * noise)).abs().max() < 1e-9
    return {0.0: to_zero, 1e-3: dopri5(GaussianVelocity(), noise, t_end=1e-3, atol=1e-11, rtol=1e-11).x}


def _error(name, noise, reference, steps, t_end=0.0, shift=1.0):
    fn = GaussianVelocity()
    result = solve(name, fn, noise, steps=steps, t_end=t_end, shift=shift)
    assert result.nfe == fn.calls
    if shift != 1.0:
        reference = dopri5(
            GaussianVelocity(),
            noise,
            t_end=float(time_shift(torch.tensor(t_end), shift)),
            atol=1e-11,
            rtol=1e-11,
        ).x
    else:
        reference = reference[t_end]
    return (result.x - reference).abs().max().item(), result.nfe


def test_toy_velocity_is_the_conditional_mean_form():
    """v = (x − E[x0 | x_t = x])/t, the form derived in the module docstring, at a few t in (0, 1)."""
    x = torch.randn(64, 2, 2, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for t in (0.05, 0.3, 0.7, 0.99):
        var = (1 - t) ** 2 * S**2 + t**2
        mean_x0 = MU + (1 - t) * S**2 * (x - (1 - t) * MU) / var
        assert torch.allclose(GaussianVelocity()(x, t), (x - mean_x0) / t, atol=1e-12)


def test_dpm_solver_2m_is_second_order(noise, reference):
    """Max error against dopri5 as the steps double: ratio → 4 (second order). On the uniform grid to
    t = 0 the λ-steps next to t = 0 stay O(1) (λ = log((1 − t)/t) → ∞), which costs a slowly fading
    log factor (ratios 3.2, 3.4, 3.5 at 128 → 1024 steps); stopping at t = 0.001 the ratios are ≈ 4.4."""
    errors = [_error("dpm++2m", noise, reference, n)[0] for n in (128, 256, 512, 1024)]
    ratios = [a / b for a, b in zip(errors, errors[1:], strict=False)]
    assert all(3.0 < r < 4.5 for r in ratios), ratios
    assert ratios[-1] > ratios[0]  # approaching 4
    assert errors[-1] < 5e-5
    errors = [_error("dpm++2m", noise, reference, n, t_end=1e-3)[0] for n in (64, 128, 256)]
    ratios = [a / b for a, b in zip(errors, errors[1:], strict=False)]
    assert all(3.8 < r < 5.0 for r in ratios), ratios
    # With a time shift (more steps near the noise end) it converges to the same map.
    assert _error("dpm++2m", noise, reference, 256, shift=3.0)[0] < 4e-3


def test_dpm_solver_2m_beats_euler_at_equal_nfe(noise, reference):
    for steps in (8, 16, 32, 64):
        dpm, dpm_nfe = _error("dpm++2m", noise, reference, steps)
        eul, eul_nfe = _error("euler", noise, reference, steps)
        assert dpm_nfe == eul_nfe == steps
        assert dpm < eul / 4, (steps, dpm, eul)


def test_dpm_solver_2m_low_order_ends():
    """The first two steps (from t = 1, λ = −∞) and the step onto t = 0 are first order: DDIM in
    data-prediction form, which on the linear path is the Euler step; so up to 3 steps to t = 0 it
    is Euler, and the second-order correction acts from 4 steps on."""
    z = torch.randn(16, 2, 2, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    for steps in (1, 2, 3):
        grid = time_grid(steps)
        assert torch.allclose(
            dpm_solver_2m(GaussianVelocity(), z, grid).x, euler(GaussianVelocity(), z, grid).x
        )
    grid = time_grid(4)
    assert not torch.allclose(
        dpm_solver_2m(GaussianVelocity(), z, grid).x, euler(GaussianVelocity(), z, grid).x
    )
    # One step lands on the denoised estimate x̂0 = x − t·v at t = 1.
    assert torch.allclose(dpm_solver_2m(GaussianVelocity(), z, [1.0, 0.0]).x, z - GaussianVelocity()(z, 1.0))
    # Stopping short of 0 gives a finite, second-order last step.
    assert torch.isfinite(dpm_solver_2m(GaussianVelocity(), z, time_grid(5, t_end=1e-4)).x).all()


def test_midpoint_is_second_order(noise, reference):
    fn = GaussianVelocity()
    assert midpoint(fn, noise, time_grid(10)).nfe == 20 == fn.calls
    errors = [_error("midpoint", noise, reference, n)[0] for n in (8, 16, 32)]
    # ≥ 2nd order (on this linear-Gaussian toy its error even falls 8× per doubling)
    assert errors[0] / errors[1] > 3.5 and errors[1] / errors[2] > 3.5
    assert errors[2] < 1e-3


def test_fast_samplers_on_a_nonlinear_field():
    """A 1-D two-mode Gaussian mixture (exact velocity: the posterior-weighted mix of the components'
    velocities) against scipy's DOP853 at 1e-12: both converge at second order to the same map."""
    from scipy.integrate import solve_ivp

    weights, means, stds = torch.tensor([[0.3, 0.7], [-2.0, 1.5], [0.4, 0.6]], dtype=torch.float64)

    def fn(x, t):
        x = torch.as_tensor(x, dtype=torch.float64)[..., None]
        var = (1 - t) ** 2 * stds**2 + t**2
        logits = weights.log() - 0.5 * (x - (1 - t) * means) ** 2 / var - 0.5 * var.log()
        vels = (t - (1 - t) * stds**2) * (x - (1 - t) * means) / var - means
        return (torch.softmax(logits, -1) * vels).sum(-1)

    z = torch.randn(64, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    ref = solve_ivp(
        lambda t, x: fn(x, t).numpy(), (1.0, 0.0), z.numpy(), method="DOP853", rtol=1e-12, atol=1e-12
    )
    ref = torch.from_numpy(ref.y[:, -1])
    assert (ref < 0).double().mean() == pytest.approx(0.3, abs=0.15)  # both modes are reached
    for name, steps in (("dpm++2m", (64, 128, 256)), ("midpoint", (32, 64, 128))):
        errors = [(solve(name, fn, z, steps=n).x - ref).abs().max().item() for n in steps]
        assert errors[0] / errors[1] > 3.0 and errors[1] / errors[2] > 3.0, (name, errors)
        assert errors[2] < 1e-3, (name, errors)
    # dpm++2m against euler at equal NFE
    assert (solve("dpm++2m", fn, z, steps=32).x - ref).abs().max() < (
        solve("euler", fn, z, steps=32).x - ref
    ).abs().max() / 3


@pytest.mark.parametrize("cfg_scale", [1.0, 4.0])
def test_dpm_solver_2m_on_a_registered_generator(tiny_dit, cfg_scale):
    """float32 random-weight DiT: errors vs dopri5 (atol = rtol = 1e-7) fall ≥ 4× per doubling from
    8 steps (measured: 2.6e-3, 3.7e-4, 4.7e-5 at 8, 16, 32 steps; Euler: 9.8e-3, 4.9e-3, 2.5e-3)."""
    y = torch.tensor([0, 3, 7, 9])
    z = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    common = dict(noise=z, cfg_scale=cfg_scale, amp=False, return_nfe=True)
    ref, ref_nfe = tiny_dit.sample(y, sampler="dopri5", atol=1e-7, rtol=1e-7, **common)
    assert ref_nfe > 8
    errors = []
    for steps in (8, 16, 32):
        x, nfe = tiny_dit.sample(y, sampler="dpm++2m", steps=steps, **common)
        assert nfe == steps  # CFG doubles the batch inside one evaluation, not the NFE
        errors.append((x - ref).abs().max().item())
        x_euler, _ = tiny_dit.sample(y, sampler="euler", steps=steps, **common)
        assert errors[-1] < (x_euler - ref).abs().max().item() / 3
    assert errors[0] / errors[1] > 4 and errors[1] / errors[2] > 4, errors
    assert errors[-1] < 2e-4
    x, nfe = tiny_dit.sample(y, sampler="midpoint", steps=8, **common)
    assert nfe == 16 and (x - ref).abs().max() < 2e-3


def _message(call):
    with pytest.raises((ValueError, TypeError)) as info:
        call()
    return info.type, str(info.value).replace("'euler'", "'NAME'")


def test_fast_samplers_reject_bad_input(tiny_dit):
    """The same errors, word for word, as the Euler sampler gives."""
    y = torch.tensor([1, 2])
    x = torch.zeros(2, 2, 2, 2)
    bad = {
        "sample(steps=0)": lambda s: tiny_dit.sample(y, sampler=s, steps=0),
        "sample(steps=1.5)": lambda s: tiny_dit.sample(y, sampler=s, steps=1.5),
        "sample(atol=...)": lambda s: tiny_dit.sample(y, sampler=s, atol=1e-3),
        "config steps: 0": lambda s: check_sample_options("test-dit", {"sampler": s, "steps": 0}),
        "config last_step": lambda s: check_sample_options("test-dit", {"sampler": s, "last_step": "mean"}),
        "solve(steps=0)": lambda s: solve(s, GaussianVelocity(), x, steps=0),
        "solve(rtol=...)": lambda s: solve(s, GaussianVelocity(), x, steps=4, rtol=1e-3),
    }
    expected = {case: _message(lambda call=call: call("euler")) for case, call in bad.items()}
    assert "positive integer, got 0" in expected["sample(steps=0)"][1]
    assert "steps must be an integer ≥ 1, got 0" in expected["config steps: 0"][1]
    assert "'atol' is an option of sampler 'dopri5'" in expected["sample(atol=...)"][1]
    for name in ("dpm++2m", "midpoint", "unipc"):
        assert name in SAMPLERS
        for case, call in bad.items():
            kind, message = _message(lambda call=call, name=name: call(name))
            assert (kind, message.replace(f"'{name}'", "'NAME'")) == expected[case], case
    with pytest.raises(ValueError, match=r"unknown sampler 'dpm\+\+3m'.*'dpm\+\+2m'"):
        solve("dpm++3m", GaussianVelocity(), x)
    check_sample_options("test-dit", {"sampler": "dpm++2m", "steps": 10, "shift": 2.0, "t_end": 0.001})
