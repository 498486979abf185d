"""Guidance: classifier-free (with an interval in t and a channel choice) and autoguidance.

A guidance object turns a model's velocity ``velocity(x, t, y)`` (internal time: t = 1 is noise)
into the guided velocity a sampler integrates. Intervals are in that internal time, so
LightningDiT's "guidance off while its t < 0.125" (its t = 0 is noise) is ``interval=(0, 0.875)``
here, and DDT's "0.3 < t < 1" is ``interval=(0, 0.7)``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs
import torch

from latentforge_core.errors import InputError, check_number

Tensor = torch.Tensor
ModelVelocity = Callable[[Tensor, float, Tensor], Tensor]


def _check_interval(inst: Any, attribute: attrs.Attribute, value: tuple[float, float]) -> None:
    if len(value) != 2 or not 0.0 <= value[0] <= value[1] <= 1.0:
        raise InputError(
            f"guidance interval must be (t_min, t_max) with 0 ≤ t_min ≤ t_max ≤ 1, got {value!r}"
        )


def _check_scale(inst: Any, attribute: attrs.Attribute, value: float) -> None:
    check_number(value, "guidance scale", low=0)  # 1: no guidance, 0: the unconditional/weak model


def _check_channels(inst: Any, attribute: attrs.Attribute, value: int | None) -> None:
    if value is not None and (not isinstance(value, int) or value < 1):
        raise InputError(
            f"guidance channels must be None (all) or a positive int k (the first k), got {value!r}"
        )


@attrs.frozen(kw_only=True)
class CFG:
    """Classifier-free guidance ``v_u + s (v_c - v_u)``, conditional and null label in one forward.

    ``channels=k`` guides only the first k channels and leaves the rest conditional: the DiT /
    LightningDiT sampling code does this with k = 3, and their published scales assume it.
    Outside ``interval`` the plain conditional velocity is used (one forward at batch B).
    """

    scale: float = attrs.field(default=1.0, validator=_check_scale)
    interval: tuple[float, float] = attrs.field(
        default=(0.0, 1.0), converter=tuple, validator=_check_interval
    )
    channels: int | None = attrs.field(default=None, validator=_check_channels)

    @property
    def needs_null_class(self) -> bool:
        return self.scale != 1.0

    def active(self, t: float) -> bool:
        return self.scale != 1.0 and self.interval[0] <= t <= self.interval[1]

    def __call__(self, velocity: ModelVelocity, x: Tensor, t: float, y: Tensor, null: int | None) -> Tensor:
        if not self.active(t):
            return velocity(x, t, y)
        if null is None:
            raise InputError("classifier-free guidance needs a null class, but the model has none")
        v_cond, v_uncond = velocity(torch.cat([x, x]), t, torch.cat([y, torch.full_like(y, null)])).chunk(2)
        return self.combine(v_cond, v_uncond)

    def combine(self, cond: Tensor, uncond: Tensor) -> Tensor:
        guided = uncond + self.scale * (cond - uncond)
        if self.channels is None:
            return guided
        if self.channels > cond.shape[1]:
            raise InputError(
                f"guidance channels={self.channels} exceeds the {cond.shape[1]} channels of the model output"
            )
        return torch.cat([guided[:, : self.channels], cond[:, self.channels :]], dim=1)


@attrs.frozen(kw_only=True)
class AutoGuidance:
    """Autoguidance (Karras et al. 2024; RAE): ``v_weak + s (v_main - v_weak)``, both given the label.

    ``guide`` is the weak model's velocity in the internal time, e.g. a smaller or less trained
    ``FlowGenerator``'s ``velocity`` method.
    """

    guide: ModelVelocity
    scale: float = attrs.field(default=1.0, validator=_check_scale)
    interval: tuple[float, float] = attrs.field(
        default=(0.0, 1.0), converter=tuple, validator=_check_interval
    )

    needs_null_class = False

    def active(self, t: float) -> bool:
        return self.scale != 1.0 and self.interval[0] <= t <= self.interval[1]

    def __call__(self, velocity: ModelVelocity, x: Tensor, t: float, y: Tensor, null: int | None) -> Tensor:
        v_main = velocity(x, t, y)
        if not self.active(t):
            return v_main
        v_weak = self.guide(x, t, y)
        return v_weak + self.scale * (v_main - v_weak)
