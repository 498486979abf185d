"""Registered diffusion generators: a named backbone size wrapped in a ``FlowGenerator``.

Every factory takes the backbone's keyword arguments (``in_channels``, ``input_size``,
``num_classes``, ``class_dropout_prob``, ``learn_sigma``, …) and ``transport=dict(...)``, which
overrides the family's published transport settings below key by key.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from latentforge_generators.dit import DiT_models
from latentforge_generators.ditdh import DiTDH_models
from latentforge_generators.flow import FlowGenerator
from latentforge_generators.lightningdit import LightningDiT_models
from latentforge_generators.transport import Transport

#################################################################################
#                         Published transport settings                         #
#################################################################################
# SiT: uniform t, no shift, plain MSE, integrate all the way to the data end.
SIT = {}
# LightningDiT: logit-normal t, velocity-direction loss 1:1, sampling shift 0.3 in its noise-at-0
# time, which is 1 / 0.3 in ours.
LIGHTNINGDIT = {"time_dist": "logit-normal", "cos_weight": 1.0, "sample_shift": 1 / 0.3}
# RAE: logit-normal t truncated to [0, 0.999], dimension shift sqrt(C·H·W / 4096) in training and
# sampling, sampler grid ending at shift(0.001).
RAE = {"time_dist": "logit-normal", "t_max": 0.999, "shift": "auto", "sample_eps": 0.001}

# Tiny defaults of the test sizes, so ``build("test-dit")`` works with no arguments.
TINY = {"in_channels": 4, "input_size": 8, "num_classes": 10}


def _flow(
    builder: Callable[..., nn.Module],
    family: dict[str, Any],
    transport: dict[str, Any] | Transport | None,
    defaults: dict[str, Any],
    kwargs: dict[str, Any],
) -> FlowGenerator:
    if not isinstance(transport, Transport):
        transport = Transport.from_dict({**family, **(transport or {})})
    return FlowGenerator(builder(**{**defaults, **kwargs}), transport)


#################################################################################
#                                     DiT                                       #
#################################################################################
def dit_s_2(*, transport=None, **kwargs) -> FlowGenerator:
    return _flow(DiT_models["DiT-S/2"], SIT, transport, {}, kwargs)


def dit_b_2(*, transport=None, **kwargs) -> FlowGenerator:
    return _flow(DiT_models["DiT-B/2"], SIT, transport, {}, kwargs)


def dit_l_2(*, transport=None, **kwargs) -> FlowGenerator:
    return _flow(DiT_models["DiT-L/2"], SIT, transport, {}, kwargs)


def dit_xl_2(*, transport=None, **kwargs) -> FlowGenerator:
    return _flow(DiT_models["DiT-XL/2"], SIT, transport, {}, kwargs)


def tiny_dit(*, transport=None, **kwargs) -> FlowGenerator:
    return _flow(DiT_models["DiT-T/2"], SIT, transport, {**TINY, "learn_sigma": False}, kwargs)


#################################################################################
#                                LightningDiT                                   #
#################################################################################
def lightningdit_b_1(*, transport=None, **kwargs) -> FlowGenerator:
    return _flow(LightningDiT_models["LightningDiT-B/1"], LIGHTNINGDIT, transport, {}, kwargs)


def lightningdit_l_1(*, transport=None, **kwargs) -> FlowGenerator:
    return _flow(LightningDiT_models["LightningDiT-L/1"], LIGHTNINGDIT, transport, {}, kwargs)


def lightningdit_xl_1(*, transport=None, **kwargs) -> FlowGenerator:
    return _flow(LightningDiT_models["LightningDiT-XL/1"], LIGHTNINGDIT, transport, {}, kwargs)


def tiny_lightningdit(*, transport=None, **kwargs) -> FlowGenerator:
    return _flow(LightningDiT_models["LightningDiT-T/1"], LIGHTNINGDIT, transport, TINY, kwargs)


#################################################################################
#                                   DiT-DH                                      #
#################################################################################
def ditdh_xl(*, transport=None, **kwargs) -> FlowGenerator:
    return _flow(DiTDH_models["DiTDH-XL"], RAE, transport, {}, kwargs)


def ditdh_s(*, transport=None, **kwargs) -> FlowGenerator:
    """RAE's weak model for autoguidance of ``ditdh-xl``."""
    return _flow(DiTDH_models["DiTDH-S"], RAE, transport, {}, kwargs)


def tiny_ditdh(*, transport=None, **kwargs) -> FlowGenerator:
    return _flow(DiTDH_models["DiTDH-T"], RAE, transport, TINY, kwargs)
