"""Transport identities: path derivative, time conventions, conversions, shift, time sampling, loss."""

import math

import numpy as np
import pytest
import torch
from scipy import stats

from latentforge_generators.transport import (
    Transport,
    data_from_velocity,
    dimension_shift,
    from_model_time,
    from_model_velocity,
    interpolate,
    noise_from_velocity,
    score_from_velocity,
    time_shift,
    to_model_time,
    to_model_velocity,
    velocity_from_noise,
    velocity_from_score,
    velocity_target,
)


@pytest.fixture
def pair():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 3, 4, 4, generator=g, dtype=torch.float64)
    noise = torch.randn(5, 3, 4, 4, generator=g, dtype=torch.float64)
    t = torch.rand(5, generator=g, dtype=torch.float64) * 0.9 + 0.05
    return x, noise, t


@pytest.mark.parametrize("convention", ["noise_at_1", "noise_at_0"])
def test_velocity_target_is_the_path_derivative(pair, convention):
    """Central differences of x_t, taken in the backbone's own time, equal the target it is trained on."""
    x, noise, t = pair
    tau = to_model_time(t, convention)

    def path(tau):
        return interpolate(x, noise, from_model_time(tau, convention))

    h = 1e-5
    finite = (path(tau + h) - path(tau - h)) / (2 * h)
    target = to_model_velocity(velocity_target(x, noise), convention)
    torch.testing.assert_close(finite, target, rtol=0, atol=1e-8)


def test_converters_round_trip_and_match_sit(pair):
    x, noise, t = pair
    for convention in ("noise_at_1", "noise_at_0"):
        torch.testing.assert_close(from_model_time(to_model_time(t, convention), convention), t)
        v = velocity_target(x, noise)
        torch.testing.assert_close(from_model_velocity(to_model_velocity(v, convention), convention), v)
    # SiT / LightningDiT write the path as x_τ = τ·x + (1 − τ)·ε with target x − ε (τ = 0 is noise).
    tau = to_model_time(t, "noise_at_0")
    sit_path = tau.view(-1, 1, 1, 1) * x + (1 - tau.view(-1, 1, 1, 1)) * noise
    torch.testing.assert_close(interpolate(x, noise, t), sit_path)
    torch.testing.assert_close(to_model_velocity(velocity_target(x, noise), "noise_at_0"), x - noise)
    # RAE: x_t = (1 − t)·x + t·ε, target ε − x: our internal convention itself.
    torch.testing.assert_close(to_model_velocity(velocity_target(x, noise), "noise_at_1"), noise - x)
    assert to_model_time(torch.tensor(1.0), "noise_at_0") == 0.0  # pure noise is SiT's t = 0
    with pytest.raises(ValueError, match="noise_at_0"):
        to_model_time(t, "noise_at_one")


def test_noise_data_score_conversions(pair):
    x, noise, t = pair
    x_t = interpolate(x, noise, t)
    v = velocity_target(x, noise)
    torch.testing.assert_close(data_from_velocity(x_t, v, t), x)
    torch.testing.assert_close(noise_from_velocity(x_t, v, t), noise)
    # The score of the conditional path N((1 − t)x, t²I) at x_t.
    tb = t.view(-1, 1, 1, 1)
    score = -(x_t - (1 - tb) * x) / tb**2
    torch.testing.assert_close(score_from_velocity(x_t, v, t), score)
    torch.testing.assert_close(velocity_from_noise(x_t, noise, t), v)
    torch.testing.assert_close(velocity_from_score(x_t, score, t), v)


def test_time_shift():
    t = torch.linspace(0, 1, 101, dtype=torch.float64)
    alpha = dimension_shift(768 * 16 * 16)
    assert alpha == pytest.approx(math.sqrt(48))
    shifted = time_shift(t, alpha)
    assert shifted[0] == 0 and shifted[-1] == 1 and (shifted.diff() > 0).all() and (shifted >= t).all()
    assert time_shift(torch.tensor(0.5), alpha).item() == pytest.approx(0.874, abs=1e-3)  # RAE: 0.5 → 0.87
    # LightningDiT's shift s·τ/(1 + (s − 1)τ) in its noise-at-0 time is ours with α = 1/s.
    s = 0.3
    tau = to_model_time(t, "noise_at_0")
    ours = to_model_time(time_shift(t, 1 / s), "noise_at_0")
    torch.testing.assert_close(ours, s * tau / (1 + (s - 1) * tau))
    with pytest.raises(ValueError, match="positive"):
        dimension_shift(0)


def _ks_pvalue(sample, cdf):
    return stats.kstest(np.asarray(sample, dtype=np.float64), cdf).pvalue


def test_time_sampling_distributions():
    g = torch.Generator().manual_seed(1)
    uniform = Transport(t_min=0.1, t_max=0.9).sample_time(20000, generator=g)
    assert _ks_pvalue(uniform, stats.uniform(0.1, 0.8).cdf) > 1e-3
    lognorm = Transport(time_dist="logit-normal", loc=0.3, scale=0.8).sample_time(20000, generator=g)
    assert _ks_pvalue(torch.logit(lognorm.double()), stats.norm(0.3, 0.8).cdf) > 1e-3
    # Truncated to [0, 0.999] as in RAE's configs: a truncated normal in logit space.
    hi = (math.log(0.999 / 0.001) - 0.0) / 1.0
    trunc = Transport(time_dist="logit-normal", t_max=0.999).sample_time(20000, generator=g)
    assert trunc.max() <= 0.999 + 1e-6
    assert _ks_pvalue(torch.logit(trunc.double()), stats.truncnorm(-np.inf, hi).cdf) > 1e-3
    # Shifted times: undoing the shift (its inverse is the shift by 1/α) gives back uniform times.
    shifted = Transport(shift=3.0).sample_time(20000, generator=g)
    assert _ks_pvalue(time_shift(shifted.double(), 1 / 3.0), stats.uniform(0, 1).cdf) > 1e-3
    # Uniform times are not logit-normal: the test above has power.
    assert _ks_pvalue(torch.logit(uniform.double()), stats.norm(0.3, 0.8).cdf) < 1e-6


def test_loss_terms_mse_and_direction():
    g = torch.Generator().manual_seed(2)
    pred, target = torch.randn(2, 4, 3, 3, 3, generator=g).unbind(0)
    plain = Transport().loss_terms(pred, target)
    assert set(plain) == {"mse", "loss"}
    torch.testing.assert_close(plain["loss"], torch.nn.functional.mse_loss(pred, target))
    terms = Transport(cos_weight=0.5).loss_terms(pred, target)
    unit = lambda a: a / a.norm(dim=1, keepdim=True)  # noqa: E731
    cos = 1 - (unit(pred) * unit(target)).sum(1)  # [B, H, W]
    torch.testing.assert_close(terms["cos"], cos.mean())
    torch.testing.assert_close(terms["loss"], terms["mse"] + 0.5 * cos.mean())
    assert Transport(cos_weight=1).loss_terms(target, target)["loss"].abs() < 1e-6


def test_transport_config_validation():
    assert Transport.from_dict({"shift": "auto"}).resolve((768, 16, 16)).shift == pytest.approx(math.sqrt(48))
    resolved = Transport(sample_shift="auto").resolve((4, 8, 8))
    assert resolved.sampling_shift == pytest.approx(math.sqrt(256 / 4096)) and resolved.shift == 1.0
    assert Transport(shift=2.0).sampling_shift == 2.0
    with pytest.raises(ValueError, match="unknown transport option"):
        Transport.from_dict({"shfit": 2})
    with pytest.raises(ValueError, match="t_min must be below t_max"):
        Transport(t_min=0.5, t_max=0.5)
    with pytest.raises(ValueError, match="positive number or 'auto'"):
        Transport(shift=-1.0)
    with pytest.raises(ValueError):
        Transport(time_dist="beta")
    with pytest.raises(ValueError, match="unresolved"):
        Transport(shift="auto").sample_time(3)
