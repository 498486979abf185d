"""UniPC (bh2, data prediction) and the few-step time grids ("logsnr", "edm") for flow models.

The Gaussian toy of flow_toys has a closed-form ODE map (noise z at t = 1 → μ + s·z at t = 0), and
diffusers' UniPCMultistepScheduler, driven step by step on the same grid and velocity, is the peer.
"""

from itertools import pairwise

import numpy as np
import pytest
import torch
from flow_toys import MU, GaussianVelocity, S

from latentforge_core import registry
from latentforge_generators.samplers import GRIDS, check_sample_options, dopri5, solve, time_grid, unipc
from latentforge_metrics.stats import frechet_distance


@pytest.fixture(scope="module")
def noise():
    return torch.randn(256, 2, 2, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def _error(name, noise, steps, **kwargs):
    fn = GaussianVelocity()
    result = solve(name, fn, noise, steps=steps, **kwargs)
    assert result.nfe == fn.calls == steps
    return (result.x - (MU + S * noise)).abs().max().item()


def _diffusers_unipc(noise, grid):
    """diffusers' UniPC-bh2 (order 2, flow sigmas = our t) on ``grid``, one velocity call per step."""
    from diffusers import UniPCMultistepScheduler

    scheduler = UniPCMultistepScheduler(
        use_flow_sigmas=True, prediction_type="flow_prediction", solver_order=2, solver_type="bh2"
    )
    scheduler.set_timesteps(len(grid) - 1)
    scheduler.sigmas = torch.tensor(grid, dtype=torch.float64)  # our grid, in place of its own
    scheduler.timesteps = torch.tensor(grid[:-1], dtype=torch.float64) * 1000
    x, fn = noise.clone(), GaussianVelocity()
    for t, timestep in zip(grid, scheduler.timesteps, strict=False):
        x = scheduler.step(fn(x, t), timestep, x).prev_sample
    return x


@pytest.mark.parametrize("steps", [3, 8, 20])
@pytest.mark.parametrize("t_end, shift", [(0.0, 1.0), (1e-3, 3.0)])
def test_unipc_matches_diffusers(noise, steps, t_end, shift):
    """Same grid, same velocity: the same samples to float64 round-off. diffusers starts at
    t = 1 − 1e-6 (its λ must stay finite), so both start there; from exactly t = 1 ours is first
    order for one more step (tested below)."""
    grid = time_grid(steps, shift, t_end)
    grid[0] = 1 - 1e-6
    theirs = _diffusers_unipc(noise, grid)
    ours = unipc(GaussianVelocity(), noise, grid)
    assert ours.nfe == steps
    assert (ours.x - theirs).abs().max() < 1e-11
    assert (ours.x - (MU + S * noise)).abs().max() > 1e-4  # not both trivially exact


def test_unipc_converges_on_the_gaussian(noise):
    """Max error against the closed form as the steps double: ratio ≥ 4 on average (measured to
    t = 0: 3.8, 3.0, 3.8, 4.0, 4.1 from 16 to 512 steps; to t = 0.001 against dopri5 at 1e-11: 4.1,
    3.1, 4.2, 5.1, 6.6, rising toward the corrector's order 3)."""
    errors = [_error("unipc", noise, n) for n in (16, 32, 64, 128, 256, 512)]
    ratios = [a / b for a, b in pairwise(errors)]
    assert all(r > 2.8 for r in ratios) and ratios[-1] > 3.8, ratios
    assert errors[-1] < 5e-5
    ref = dopri5(GaussianVelocity(), noise, t_end=1e-3, atol=1e-11, rtol=1e-11).x
    errors = [
        (solve("unipc", GaussianVelocity(), noise, steps=n, t_end=1e-3).x - ref).abs().max().item()
        for n in (64, 128, 256, 512)
    ]
    ratios = [a / b for a, b in pairwise(errors)]
    assert all(r > 4.0 for r in ratios) and ratios[-1] > 6.0, ratios


def test_unipc_beats_euler_and_dpm_solver_at_equal_nfe(noise):
    """Max error at NFE 4, 8, 16, 32 — Euler: 1.33, 0.71, 0.37, 0.19; dpm++2m: 0.97, 0.15, 0.034,
    0.010; UniPC: 0.54, 0.092, 0.021, 0.0055."""
    for steps in (4, 8, 16, 32):
        uni, eul = _error("unipc", noise, steps), _error("euler", noise, steps)
        assert uni < eul / 2, (steps, uni, eul)
        assert uni < 0.7 * _error("dpm++2m", noise, steps), steps


def test_unipc_low_order_ends(noise):
    """From exactly t = 1 (λ = −∞) the first corrector is the order-1 one (ρ = ½: a trapezoid in x̂0),
    and the last step is first order: to t = 0 it is the denoised estimate at the predicted point."""
    z, fn = noise[:16], GaussianVelocity()
    assert torch.allclose(unipc(fn, z, [1.0, 0.0]).x, z - fn(z, 1.0))
    x0_a = z - fn(z, 1.0)
    x1 = 0.5 * z + 0.5 * x0_a  # predictor from t = 1: DDIM, the Euler step
    x0_b = x1 - 0.5 * fn(x1, 0.5)  # the evaluation at the predicted point
    corrected = 0.5 * z + 0.5 * (x0_a + 0.5 * (x0_b - x0_a))
    # Last step 0.5 → 0.25 from the corrected point: (σ_t/σ_s)·x + α_t(1 − e^{−h})·x̂0, e^{−h} = 1/3.
    assert torch.allclose(unipc(fn, z, [1.0, 0.5, 0.25]).x, 0.5 * corrected + 0.5 * x0_b)
    assert torch.allclose(unipc(fn, z, [1.0, 0.5, 0.0]).x, x0_b)


def test_grids():
    for spacing in GRIDS:
        for steps, t_end, shift in ((1, 0.0, 1.0), (4, 0.0, 1.0), (8, 1e-3, 3.0), (50, 0.0, 1.0)):
            grid = time_grid(steps, shift, t_end, spacing)
            assert len(grid) == steps + 1 and grid[0] == 1.0
            assert grid[-1] == pytest.approx(shift * t_end / (1 + (shift - 1) * t_end))
            assert all(a > b for a, b in pairwise(grid)), (spacing, grid)
    # The few-step grids crowd both ends: the first and last steps are shorter than uniform's 1/8.
    for spacing in ("logsnr", "edm"):
        grid = time_grid(8, spacing=spacing)
        assert grid[0] - grid[1] < 1 / 8 and grid[-2] - grid[-1] < 1 / 8, grid
    assert time_grid(4, spacing="logsnr")[2] == pytest.approx(0.5)  # symmetric in λ
    with pytest.raises(ValueError, match="unknown time grid 'karras'.*'logsnr'"):
        time_grid(4, spacing="karras")
    with pytest.raises(ValueError, match=r"grid must be one of 'uniform', 'logsnr', 'edm', got 'karras'"):
        check_sample_options("test-dit", {"sampler": "unipc", "grid": "karras"})
    with pytest.raises(TypeError, match="unknown option 'sampler.grid' with sampler 'dopri5'"):
        check_sample_options("test-dit", {"sampler": "dopri5", "grid": "logsnr"})
    with pytest.raises(ValueError, match="unknown time grid"):
        solve("unipc", GaussianVelocity(), torch.zeros(2, 2, 2, 2), steps=4, grid="karras")


@pytest.mark.parametrize("cfg_scale", [1.0, 4.0])
def test_unipc_on_a_registered_generator(tiny_dit, cfg_scale):
    """float32 random-weight DiT against dopri5 (atol = rtol = 1e-7), max error at 4, 8, 16, 64 steps
    (cfg 1): UniPC 3.5e-2, 1.6e-3, 6.2e-4, 8e-5; Euler 7.0e-2, 3.5e-2, 1.7e-2, 4.3e-3; dpm++2m 5.2e-2,
    7.8e-3, 1.1e-3, 1.0e-4 (≈ 1e-4 is the float32 reference's own floor). The spaced grids converge
    to the same map (64 steps: 3e-5 "logsnr", 1e-4 "edm") but do not help this random model."""
    y = torch.tensor([0, 3, 7, 9])
    z = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    common = dict(noise=z, cfg_scale=cfg_scale, amp=False, return_nfe=True)
    ref, _ = tiny_dit.sample(y, sampler="dopri5", atol=1e-7, rtol=1e-7, **common)
    errors = []
    for steps in (4, 8, 16):
        x, nfe = tiny_dit.sample(y, sampler="unipc", steps=steps, **common)
        assert nfe == steps  # CFG doubles the batch inside one evaluation, not the NFE
        errors.append((x - ref).abs().max().item())
        x_euler, _ = tiny_dit.sample(y, sampler="euler", steps=steps, **common)
        x_dpm, _ = tiny_dit.sample(y, sampler="dpm++2m", steps=steps, **common)
        assert errors[-1] < (x_euler - ref).abs().max().item() / 1.8
        assert errors[-1] < (x_dpm - ref).abs().max().item()
    assert errors[0] / errors[1] > 8 and errors[1] > errors[2], errors
    assert errors[-1] < 1e-3
    for spacing in ("logsnr", "edm"):
        x, nfe = tiny_dit.sample(y, sampler="unipc", steps=64, grid=spacing, **common)
        assert nfe == 64 and (x - ref).abs().max() < 3e-4, spacing


# ------------------------------------------------------------------------------------------------
#                              The digits: metric against NFE (slow)
# ------------------------------------------------------------------------------------------------

DIGITS_ROWS = (
    ("euler", "uniform"),
    ("heun", "uniform"),
    ("dpm++2m", "uniform"),
    ("unipc", "uniform"),
    ("unipc", "logsnr"),
    ("unipc", "edm"),
    ("dpm++2m", "logsnr"),
)


def _fd(a: np.ndarray, b: np.ndarray) -> float:
    return frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))


@pytest.mark.slow
def test_samplers_on_the_digits():
    """test-dit trained as a class-conditional flow on scikit-learn's 8×8 digits (the recipe of
    test_generators_flow_digits: 1,000 AdamW steps, seeded, 1 thread), then 300 class-balanced samples
    per sampler and NFE from the same noise: the Fréchet distance over the informative pixels to the 297
    held-out digits, and the max error against dopri5 (1e-6) samples of the same noise."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        table = _digits_table()
    finally:
        torch.set_num_threads(threads)
    print("\n" + "\n".join(table["lines"]))
    fd, err, fd_ode = table["fd"], table["error"], table["fd_ode"]
    # Measured (FD / max error; dopri5's FD 3.372 at NFE 110):
    #   NFE          2              4              8              16
    #   euler        5.161 / 1.080  3.571 / 0.634  3.303 / 0.405  3.294 / 0.241
    #   heun         17.34 / 3.045  4.781 / 1.071  3.572 / 0.436  3.404 / 0.132
    #   dpm++2m      5.161 / 1.080  3.397 / 0.558  3.290 / 0.218  3.379 / 0.049
    #   unipc        5.161 / 1.080  3.317 / 0.490  3.307 / 0.200  3.382 / 0.057
    #   unipc logsnr 5.161 / 1.080  3.456 / 0.812  3.441 / 0.294  3.383 / 0.069
    #   unipc edm    6.989 / 1.314  3.887 / 1.140  3.512 / 0.307  3.449 / 0.103
    # UniPC is closest to the ODE's samples at NFE 4 and 8 (dpm++2m at 16), and its FD is within 0.1 of
    # the ODE's from NFE 4, where Euler's is still 0.2 off. The spaced grids do not help this model.
    for nfe in (4, 8, 16):
        assert err["unipc", "uniform", nfe] < err["euler", "uniform", nfe], nfe
        assert abs(fd["unipc", "uniform", nfe] - fd_ode) < 0.1, nfe
    for nfe in (4, 8):
        assert err["unipc", "uniform", nfe] < err["dpm++2m", "uniform", nfe], nfe
    assert abs(fd["euler", "uniform", 4] - fd_ode) > 0.15


def _digits_table() -> dict:
    from sklearn.datasets import load_digits

    torch.manual_seed(0)
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 8 - 1  # B, 1, 8, 8 in [-1, 1]
    y = torch.tensor(digits.target)
    gen = registry.generators.build("test-dit", in_channels=1, input_size=8, num_classes=10)
    opt = torch.optim.AdamW(gen.parameters(), lr=1e-3, weight_decay=0.0)
    batches = torch.Generator().manual_seed(0)
    for _ in range(1000):
        idx = torch.randint(0, 1500, (128,), generator=batches)
        loss = gen.loss(x[idx], y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    gen.eval()

    flat = lambda t: t.reshape(len(t), -1).double().numpy()  # noqa: E731
    keep = flat(x[:1500]).std(0) > 1e-3  # the always-blank border pixels make covariances singular
    held_out = flat(x[1500:])[:, keep]
    labels = torch.arange(10).repeat_interleave(30)
    noise = torch.randn(len(labels), 1, 8, 8, generator=torch.Generator().manual_seed(1))
    common = dict(noise=noise, amp=False, return_nfe=True)
    ode, ode_nfe = gen.sample(labels, sampler="dopri5", atol=1e-6, rtol=1e-6, **common)
    fd_ode = _fd(flat(ode)[:, keep], held_out)
    fd, error = {}, {}
    for sampler, grid in DIGITS_ROWS:
        for nfe in (2, 4, 8, 16):
            steps = nfe // 2 if sampler == "heun" else nfe
            out, spent = gen.sample(labels, sampler=sampler, steps=steps, grid=grid, **common)
            assert spent == nfe
            fd[sampler, grid, nfe] = _fd(flat(out)[:, keep], held_out)
            error[sampler, grid, nfe] = (out - ode).abs().max().item()
    lines = [
        f"FD to held-out digits (dopri5 at 1e-6, NFE {ode_nfe}: {fd_ode:.3f}) / max |x − x_dopri5|",
        "| sampler | NFE 2 | NFE 4 | NFE 8 | NFE 16 |",
        "|---|---|---|---|---|",
    ]
    for sampler, grid in DIGITS_ROWS:
        name = sampler if grid == "uniform" else f"{sampler} ({grid} grid)"
        cells = [f"{fd[sampler, grid, n]:.3f} / {error[sampler, grid, n]:.3f}" for n in (2, 4, 8, 16)]
        lines.append(f"| {name} | {' | '.join(cells)} |")
    return {"fd": fd, "error": error, "fd_ode": fd_ode, "lines": lines}
