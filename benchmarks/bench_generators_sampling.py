"""Flow sampling throughput with classifier-free guidance: ours beside peers driving the same model.

Full size: ``dit-s-2`` on 4×32×32 latents (SD-VAE at 256 px), 2 images (a batch of 4 with CFG).
Tiny: the ``test-dit`` entry. Both get random weights (the registered models start with zeroed output
layers, whose velocity is 0 and would make every sampler agree trivially).

Groups (images/s and MFU; the ratio column is ours / peer in the same run):

* Euler, 50 steps: ours (``FlowGenerator.sample``) beside diffusers' ``FlowMatchEulerDiscreteScheduler``
  on the same grid, and beside guidance done as two separate forwards (what batching buys).
* Heun, NFE ≈ 50: ours (25 steps, NFE 50) beside diffusers' ``FlowMatchHeunDiscreteScheduler`` (26
  sigmas, NFE 51: its last interval, onto σ = 0, is an Euler step).
* dopri5 (SiT's atol 1e-6, rtol 1e-3): ours beside ``torchdiffeq.odeint``; each row's name gives its NFE.
* Each loop alone, with a one-multiply model in place of DiT-S/2: what the loop itself costs.

The implementations of a group run interleaved, round by round, so the machine's load hits them alike.

diffusers' flow-match schedulers use σ = our t (1 noise → 0 data) and step ``x += (σ_next - σ)·out``, so
the model they drive must return our velocity dx/dt, and it is called with ``timestep = 1000·σ``. In the
tiny run each peer's samples are checked against ours on the same grid (a correctness assertion).
"""

import attrs
import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from latentforge_core import registry
from latentforge_generators.guidance import CFG
from latentforge_generators.samplers import euler, heun

CFG_SCALE = 4.0
ATOL, RTOL = 1e-6, 1e-3


@attrs.frozen(kw_only=True)
class TwoForwardCFG(CFG):
    """The same guidance arithmetic, with the unconditional forward run separately."""

    def __call__(self, velocity, x, t, y, null):
        if not self.active(t):
            return velocity(x, t, y)
        return self.combine(velocity(x, t, y), velocity(x, t, torch.full_like(y, null)))


@attrs.frozen
class Setup:
    gen: torch.nn.Module
    y: torch.Tensor  # [B] labels
    noise: torch.Tensor  # [B, C, H, W]
    forward_flops: int  # one guided evaluation (a forward at batch 2B)
    steps: int  # Euler steps: 50 at full size, 6 in the tiny run (which only checks correctness)

    def velocity(self, x: torch.Tensor, t: float) -> torch.Tensor:
        """The guided velocity ``FlowGenerator.sample`` integrates (amp off, as in every row here)."""
        return CFG(scale=CFG_SCALE)(self.gen.velocity, x, t, self.y, self.gen.null_class)

    def diffusers_model(self, x: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        """The model as a diffusers flow-match loop calls it: ``timestep = 1000·σ``, output dx/dσ."""
        return self.velocity(x, float(timestep) / 1000)


@pytest.fixture(scope="module")
def setup(full, device) -> Setup:
    name, kwargs, batch = (
        ("dit-s-2", {"input_size": 32, "in_channels": 4}, 2) if full else ("test-dit", {}, 2)
    )
    torch.manual_seed(0)
    gen = registry.generators.build(name, **kwargs).to(device).eval()
    with torch.no_grad():
        for p in gen.parameters():
            p.normal_(std=0.02)
    y = torch.arange(batch, device=device) % gen.num_classes
    noise = torch.randn(batch, *gen.input_shape, generator=torch.Generator().manual_seed(1)).to(device)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        gen.velocity(torch.cat([noise, noise]), 0.5, torch.cat([y, y]))
    return Setup(gen, y, noise, counter.get_total_flops(), 50 if full else 6)


def _sample(setup: Setup, **options):
    return setup.gen.sample(setup.y, noise=setup.noise, cfg_scale=CFG_SCALE, amp=False, **options)


@torch.no_grad()
def _diffusers_loop(model, x: torch.Tensor, scheduler) -> torch.Tensor:
    """A diffusers pipeline's denoising loop, without the pipeline: model, then ``scheduler.step``."""
    for timestep in scheduler.timesteps:
        x = scheduler.step(model(x, timestep), timestep, x).prev_sample
    return x


def _close(ours: torch.Tensor, theirs: torch.Tensor, tol: float) -> None:
    error = (ours - theirs).abs().max().item()
    assert error < tol, f"samples differ by {error:.3g} (tolerance {tol})"
    assert ours.abs().max() > 0.1  # random weights: a velocity far from zero


# ------------------------------------------------------------------------------------------------
#             The same model under each loop, interleaved round by round (a few seconds a call)
# ------------------------------------------------------------------------------------------------


@pytest.mark.headline
def test_sampling_euler_cfg(measure_interleaved, setup, full):
    """Ours beside diffusers' Euler loop and beside guidance as two separate forwards."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    grid = np.linspace(1.0, 0.0, setup.steps + 1)  # our time_grid(steps); diffusers appends the final 0
    scheduler = FlowMatchEulerDiscreteScheduler()

    def diffusers():
        scheduler.set_timesteps(sigmas=grid[:-1])
        return _diffusers_loop(setup.diffusers_model, setup.noise, scheduler)

    def two_forwards():
        return _sample(setup, steps=setup.steps, guidance=TwoForwardCFG(scale=CFG_SCALE))

    ours = _sample(setup, steps=setup.steps)
    _close(two_forwards(), ours, 1e-4)
    theirs = diffusers()
    assert len(scheduler.timesteps) == setup.steps
    if not full:  # float32 σ and timestep/1000 against our float64 grid: round-off only
        _close(theirs, ours, 1e-4)
    measure_interleaved(
        {
            "ours": lambda: _sample(setup, steps=setup.steps),
            "two forwards": two_forwards,
            "diffusers FlowMatchEuler": diffusers,
        },
        group=f"sample euler-{setup.steps} cfg",
        items=len(setup.y),
        unit="images/s",
        flops=setup.steps * setup.forward_flops,
        rounds=3,
    )


@pytest.mark.headline
def test_sampling_heun_cfg(measure_interleaved, setup, full):
    """Ours (25 steps, NFE 50) beside diffusers' Heun loop (26 sigmas, NFE 51: its last interval,
    onto σ = 0, is an Euler step)."""
    from diffusers import FlowMatchHeunDiscreteScheduler

    scheduler = FlowMatchHeunDiscreteScheduler()
    sigmas = setup.steps // 2 + 1  # 25 Heun intervals and the Euler one onto σ = 0
    peer = f"diffusers FlowMatchHeun (NFE {2 * sigmas - 1})"

    def diffusers():
        scheduler.set_timesteps(sigmas)
        return _diffusers_loop(setup.diffusers_model, setup.noise, scheduler)

    theirs = diffusers()
    assert len(scheduler.timesteps) == 2 * sigmas - 1
    if not full:  # ours on its grid: Heun to its last σ, then one Euler step to 0
        grid = torch.cat([scheduler.sigmas[::2], torch.zeros(1)]).tolist()
        with torch.no_grad():
            x = heun(setup.velocity, setup.noise, grid[:-1]).x
            _close(theirs, euler(setup.velocity, x, grid[-2:]).x, 1e-4)
    measure_interleaved(
        {"ours": lambda: _sample(setup, sampler="heun", steps=setup.steps // 2), peer: diffusers},
        group=f"sample heun-nfe{setup.steps} cfg",
        items=len(setup.y),
        unit="images/s",
        flops={"ours": setup.steps * setup.forward_flops, peer: (2 * sigmas - 1) * setup.forward_flops},
        rounds=3,
    )


@pytest.mark.headline
def test_sampling_dopri5_cfg(measure_interleaved, setup, full):
    """Ours beside ``torchdiffeq.odeint`` at SiT's tolerances; each row's name gives its NFE."""
    from torchdiffeq import odeint

    calls = []

    def func(t, x):
        calls.append(1)
        return setup.velocity(x, float(t))

    def torchdiffeq():
        with torch.no_grad():
            span = torch.tensor([1.0, 0.0], device=setup.noise.device)
            return odeint(func, setup.noise, span, method="dopri5", atol=ATOL, rtol=RTOL)[-1]

    def ours():
        return _sample(setup, sampler="dopri5", atol=ATOL, rtol=RTOL)

    theirs = torchdiffeq()
    mine, nfe = _sample(setup, sampler="dopri5", atol=ATOL, rtol=RTOL, return_nfe=True)
    if not full:  # both meet the same tolerance; their step-size controls differ in detail
        _close(theirs, mine, 50 * RTOL)
    peer = f"torchdiffeq odeint (NFE {len(calls)})"
    measure_interleaved(
        {"ours": ours, peer: torchdiffeq},
        group="sample dopri5 cfg",
        items=len(setup.y),
        unit="images/s",
        flops={"ours": nfe * setup.forward_flops, peer: len(calls) * setup.forward_flops},
        rounds=3,
    )
    print(f"dopri5: ours NFE {nfe}, {peer}")


# ------------------------------------------------------------------------------------------------
#                     The sampler loop alone: a one-multiply model, the loop's own cost
# ------------------------------------------------------------------------------------------------
# Above, DiT-S/2's forward is over 99% of every step on a CPU and the same in every loop, so the
# ratios sit at 1.0.  Here the model is one multiply (dx/dt = x/2) on the same latents: what is left
# is each loop's own work per step (its arithmetic, temporaries and bookkeeping), the share a short
# forward leaves visible (a small model, or a GPU step bound by launches).
SOLVES = 20  # per timed call: one solve takes well under a millisecond


def _one_multiply(x: torch.Tensor, t) -> torch.Tensor:
    return x * 0.5


def _solves(solve):
    def run():
        with torch.no_grad():
            for _ in range(SOLVES):
                out = solve()
        return out

    return run


@pytest.mark.headline
@pytest.mark.parametrize("name", ["euler", "heun", "dopri5"])
def test_sampler_loop_alone(measure_interleaved, setup, name):
    from diffusers import FlowMatchEulerDiscreteScheduler, FlowMatchHeunDiscreteScheduler
    from torchdiffeq import odeint

    from latentforge_generators.samplers import dopri5

    x, steps = setup.noise, setup.steps
    euler_grid, heun_grid = np.linspace(1.0, 0.0, steps + 1), np.linspace(1.0, 0.0, steps // 2 + 1)
    span = torch.tensor([1.0, 0.0], device=x.device)
    diffusers_euler, diffusers_heun = FlowMatchEulerDiscreteScheduler(), FlowMatchHeunDiscreteScheduler()

    def diffusers(scheduler, **grid):
        scheduler.set_timesteps(**grid)  # also rewinds its step index, as a pipeline call does
        return _diffusers_loop(_one_multiply, x, scheduler)

    ours, peer, peer_name = {
        "euler": (
            lambda: euler(_one_multiply, x, euler_grid.tolist()).x,
            lambda: diffusers(diffusers_euler, sigmas=euler_grid[:-1]),
            "diffusers FlowMatchEuler",
        ),
        "heun": (
            lambda: heun(_one_multiply, x, heun_grid.tolist()).x,
            lambda: diffusers(diffusers_heun, num_inference_steps=steps // 2 + 1),
            "diffusers FlowMatchHeun",
        ),
        "dopri5": (
            lambda: dopri5(_one_multiply, x, atol=ATOL, rtol=RTOL).x,
            lambda: odeint(lambda t, y: _one_multiply(y, t), x, span, method="dopri5", atol=ATOL, rtol=RTOL)[
                -1
            ],
            "torchdiffeq",
        ),
    }[name]
    with torch.no_grad():  # every loop solves the same linear ODE: x(0) = e^{-1/2}·x(1)
        _close(ours(), peer(), 1e-3)
    measure_interleaved(
        {"ours": _solves(ours), peer_name: _solves(peer)},
        group=f"sampler loop alone (1-multiply model) {name}",
        items=SOLVES,
        unit="solves/s",
    )
