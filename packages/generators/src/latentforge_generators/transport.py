"""Flow-matching transport: the linear path, its velocity target, time sampling and the loss.

One internal time convention for everything in this package (transport, samplers, guidance):
``t = 0`` is data and ``t = 1`` is pure noise, ``x_t = (1 - t) x + t eps`` and the velocity is
``v = dx_t/dt = eps - x`` (the rectified-flow / SD3 / RAE convention). A backbone declares its own
``time_convention``: "noise_at_1" (RAE) is ours; "noise_at_0" (SiT, LightningDiT, DDT) runs time
backwards, so its time is ``1 - t`` and its velocity ``-v``. The converters below translate at the
model's door, which is why a backbone never needs to know which convention a sampler uses.
"""

from __future__ import annotations

import math
from typing import Any

import attrs
import torch
import torch.nn.functional as F

from latentforge_core.errors import InputError

Tensor = torch.Tensor

INTERNAL = "noise_at_1"
CONVENTIONS = ("noise_at_1", "noise_at_0")


# ------------------------------------------------------------------------------------------------
#                                   Time-convention converters
# ------------------------------------------------------------------------------------------------


def check_convention(convention: str) -> str:
    if convention not in CONVENTIONS:
        raise InputError(
            f"unknown time convention {convention!r}; expected one of {CONVENTIONS} "
            "('noise_at_0': t=0 is noise as in SiT/LightningDiT, 'noise_at_1': t=1 is noise as in RAE)"
        )
    return convention


def to_model_time(t: Tensor, convention: str) -> Tensor:
    """Internal time → the backbone's time."""
    return t if check_convention(convention) == INTERNAL else 1.0 - t


def from_model_time(t: Tensor, convention: str) -> Tensor:
    """The backbone's time → internal time (the map is its own inverse)."""
    return to_model_time(t, convention)


def to_model_velocity(v: Tensor, convention: str) -> Tensor:
    """Internal velocity → the velocity a backbone of ``convention`` is trained to predict."""
    return v if check_convention(convention) == INTERNAL else -v


def from_model_velocity(v: Tensor, convention: str) -> Tensor:
    """A backbone's predicted velocity → internal velocity (reversing time flips the sign)."""
    return to_model_velocity(v, convention)


# ------------------------------------------------------------------------------------------------
#                               Linear path and prediction conversions
# ------------------------------------------------------------------------------------------------


def _bcast(t: Tensor | float, like: Tensor) -> Tensor:
    """A scalar or per-sample time as a tensor broadcastable against ``like`` ([B, ...])."""
    t = torch.as_tensor(t, dtype=like.dtype, device=like.device)
    return t.reshape(-1, *([1] * (like.ndim - 1))) if t.ndim == 1 else t


def interpolate(x: Tensor, noise: Tensor, t: Tensor) -> Tensor:
    """``x_t = (1 - t) x + t eps``."""
    t = _bcast(t, x)
    return (1 - t) * x + t * noise


def velocity_target(x: Tensor, noise: Tensor) -> Tensor:
    """``d x_t / dt`` on the linear path: independent of t."""
    return noise - x


def data_from_velocity(x_t: Tensor, v: Tensor, t: Tensor | float) -> Tensor:
    """Denoised estimate ``x̂ = x_t - t v`` (Tweedie's formula in velocity form)."""
    return x_t - _bcast(t, x_t) * v


def noise_from_velocity(x_t: Tensor, v: Tensor, t: Tensor | float) -> Tensor:
    """``ε̂ = x_t + (1 - t) v``."""
    return x_t + (1 - _bcast(t, x_t)) * v


def score_from_velocity(x_t: Tensor, v: Tensor, t: Tensor | float) -> Tensor:
    """``∇ log p_t(x_t) = -ε̂ / t`` (undefined at t = 0, where the path has no noise)."""
    return -noise_from_velocity(x_t, v, t) / _bcast(t, x_t)


def velocity_from_noise(x_t: Tensor, noise: Tensor, t: Tensor | float) -> Tensor:
    """``v = (ε - x_t) / (1 - t)`` (undefined at t = 1)."""
    return (noise - x_t) / (1 - _bcast(t, x_t))


def velocity_from_score(x_t: Tensor, score: Tensor, t: Tensor | float) -> Tensor:
    return velocity_from_noise(x_t, -_bcast(t, x_t) * score, t)


# ------------------------------------------------------------------------------------------------
#                                         Time shift
# ------------------------------------------------------------------------------------------------


def time_shift(t: Tensor, shift: float) -> Tensor:
    """``α t / (1 + (α - 1) t)``: α > 1 moves every t toward noise (RAE, SD3).

    LightningDiT's sampling shift s = 0.3, written in its noise-at-0 time, is α = 1 / 0.3 here.
    """
    if shift == 1.0:
        return t
    return shift * t / (1 + (shift - 1) * t)


def dimension_shift(dim: int, base: int = 4096) -> float:
    """RAE's shift for a latent of ``dim = C·H·W`` numbers: ``sqrt(dim / base)``."""
    if dim <= 0 or base <= 0:
        raise InputError(f"dimension shift needs positive dim and base, got dim={dim}, base={base}")
    return math.sqrt(dim / base)


# ------------------------------------------------------------------------------------------------
#                                         Transport
# ------------------------------------------------------------------------------------------------


def _check_shift(inst: Any, attribute: attrs.Attribute, value: Any) -> None:
    if value == "auto" or (value is None and attribute.name == "sample_shift"):
        return
    if not isinstance(value, (int, float)) or not value > 0:
        raise InputError(f"{attribute.name} must be a positive number or 'auto', got {value!r}")


def _check_unit(inst: Any, attribute: attrs.Attribute, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise InputError(f"{attribute.name} must lie in [0, 1], got {value}")


@attrs.frozen(kw_only=True)
class Transport:
    """Linear-path flow matching with velocity prediction.

    ``time_dist``: "uniform" or "logit-normal" (``t = sigmoid(N(loc, scale))``, truncated to
    ``[t_min, t_max]`` by inverse CDF). ``shift`` is applied to the drawn times in training;
    ``sample_shift`` (default: ``shift``) to the sampler grid. "auto" means RAE's dimension shift
    ``sqrt(C·H·W / shift_base)``, resolved once the latent shape is known. ``cos_weight`` adds
    LightningDiT's velocity-direction term ``1 - cos(v̂, u)`` along channels (1.0 in its recipe).
    Samplers stop at ``time_shift(sample_eps)`` (RAE: 0.001; SiT and LightningDiT: 0).
    """

    time_dist: str = attrs.field(
        default="uniform", validator=attrs.validators.in_(("uniform", "logit-normal"))
    )
    loc: float = 0.0
    scale: float = attrs.field(default=1.0, validator=attrs.validators.gt(0.0))
    t_min: float = attrs.field(default=0.0, validator=_check_unit)
    t_max: float = attrs.field(default=1.0, validator=_check_unit)
    shift: float | str = attrs.field(default=1.0, validator=_check_shift)
    sample_shift: float | str | None = attrs.field(default=None, validator=_check_shift)
    shift_base: int = attrs.field(default=4096, validator=attrs.validators.gt(0))
    cos_weight: float = attrs.field(default=0.0, validator=attrs.validators.ge(0.0))
    sample_eps: float = attrs.field(default=0.0, validator=_check_unit)

    def __attrs_post_init__(self) -> None:
        if self.t_min >= self.t_max:
            raise InputError(f"t_min must be below t_max, got [{self.t_min}, {self.t_max}]")
        if self.sample_eps >= 1.0:
            raise InputError(f"sample_eps must lie in [0, 1), got {self.sample_eps}")

    def to_dict(self) -> dict[str, Any]:
        return attrs.asdict(self)

    @classmethod
    def from_dict(cls, config: dict[str, Any] | None) -> Transport:
        config = dict(config or {})
        unknown = set(config) - {f.name for f in attrs.fields(cls)}
        if unknown:
            names = ", ".join(f.name for f in attrs.fields(cls))
            raise InputError(f"unknown transport option(s) {sorted(unknown)}; expected some of: {names}")
        return cls(**config)

    def resolve(self, input_shape: tuple[int, ...]) -> Transport:
        """Replace "auto" shifts by the dimension shift of a latent of ``input_shape``."""
        auto = dimension_shift(math.prod(input_shape), self.shift_base)
        shift = auto if self.shift == "auto" else self.shift
        sample_shift = auto if self.sample_shift == "auto" else self.sample_shift
        return attrs.evolve(self, shift=shift, sample_shift=sample_shift)

    @property
    def sampling_shift(self) -> float:
        shift = self.shift if self.sample_shift is None else self.sample_shift
        if isinstance(shift, str):
            raise InputError("the transport's 'auto' shift is unresolved; call resolve(input_shape) first")
        return float(shift)

    # ---------------------------------------------------------------------------- training
    def sample_time(self, n: int, device: torch.device | str | None = None, generator=None) -> Tensor:
        """Training times in the internal convention, shifted."""
        u = torch.rand(n, device=device, generator=generator, dtype=torch.float64)
        if self.time_dist == "uniform":
            t = self.t_min + (self.t_max - self.t_min) * u
        else:  # truncated logit-normal by inverse CDF: sigmoid(loc + scale·Φ⁻¹(U(Φ(a), Φ(b))))
            lo, hi = (self._std_normal_cdf_of_logit(v) for v in (self.t_min, self.t_max))
            u = (lo + (hi - lo) * u).clamp(1e-12, 1 - 1e-12)
            t = torch.sigmoid(self.loc + self.scale * torch.special.ndtri(u))
        if isinstance(self.shift, str):
            raise InputError("the transport's 'auto' shift is unresolved; call resolve(input_shape) first")
        return time_shift(t, float(self.shift)).float()

    def _std_normal_cdf_of_logit(self, p: float) -> float:
        if p <= 0.0:
            return 0.0
        if p >= 1.0:
            return 1.0
        z = (math.log(p / (1 - p)) - self.loc) / self.scale
        return 0.5 * math.erfc(-z / math.sqrt(2))

    def loss_terms(self, pred: Tensor, target: Tensor) -> dict[str, Tensor]:
        """Per-sample MSE (mean over every latent number) and the direction term, batch-averaged."""
        mse = (pred.float() - target.float()).square().flatten(1).mean(1)
        terms = {"mse": mse.mean()}
        loss = mse
        if self.cos_weight > 0:
            cos = 1 - F.cosine_similarity(pred.float(), target.float(), dim=1).flatten(1).mean(1)
            terms["cos"] = cos.mean()
            loss = loss + self.cos_weight * cos
        terms["loss"] = loss.mean()
        return terms
