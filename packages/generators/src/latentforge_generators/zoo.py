"""Registered diffusion generators: a named backbone size wrapped in a ``FlowGenerator``.

Each family's size table is ``SIZES`` in its model file (``dit.py``, ``lightningdit.py``,
``ditdh.py``), keyed by the registry name; here are one builder per row (``dit_xl_2`` for
``dit-xl-2``) and each family's published transport.  Every builder takes the backbone's keyword
arguments (``in_channels``, ``input_size``, ``num_classes``, ``class_dropout_prob``,
``learn_sigma``, …; not the row's, which fix the size) and ``transport=dict(...)``, which overrides
the family's published transport settings below key by key.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from latentforge_generators import dit, ditdh, lightningdit
from latentforge_generators.dit import DiT
from latentforge_generators.ditdh import DiTDH
from latentforge_generators.flow import FlowGenerator
from latentforge_generators.lightningdit import LightningDiT
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
    model: type[nn.Module],
    size: dict[str, Any],
    family: dict[str, Any],
    transport: dict[str, Any] | Transport | None,
    defaults: dict[str, Any],
    kwargs: dict[str, Any],
) -> FlowGenerator:
    if not isinstance(transport, Transport):
        transport = Transport.from_dict({**family, **(transport or {})})
    return FlowGenerator(model(**size, **{**defaults, **kwargs}), transport)


#################################################################################
#                                     DiT                                       #
#################################################################################
def dit_s_2(*, transport=None, **kwargs) -> FlowGenerator:
    return _flow(DiT, dit.SIZES["dit-s-2"], SIT, transport, {}, kwargs)


def dit_b_2(*, transport=None, **kwargs) -> FlowGenerator:
    return _flow(DiT, dit.SIZES["dit-b-2"], SIT, transport, {}, kwargs)


def dit_l_2(*, transport=None, **kwargs) -> FlowGenerator:
    return _flow(DiT, dit.SIZES["dit-l-2"], SIT, transport, {}, kwargs)


def dit_xl_2(*, transport=None, **kwargs) -> FlowGenerator:
    return _flow(DiT, dit.SIZES["dit-xl-2"], SIT, transport, {}, kwargs)


def tiny_dit(*, transport=None, **kwargs) -> FlowGenerator:
    return _flow(DiT, dit.SIZES["test-dit"], SIT, transport, {**TINY, "learn_sigma": False}, kwargs)


#################################################################################
#                                LightningDiT                                   #
#################################################################################
def lightningdit_b_1(*, transport=None, **kwargs) -> FlowGenerator:
    return _flow(LightningDiT, lightningdit.SIZES["lightningdit-b-1"], LIGHTNINGDIT, transport, {}, kwargs)


def lightningdit_l_1(*, transport=None, **kwargs) -> FlowGenerator:
    return _flow(LightningDiT, lightningdit.SIZES["lightningdit-l-1"], LIGHTNINGDIT, transport, {}, kwargs)


def lightningdit_xl_1(*, transport=None, **kwargs) -> FlowGenerator:
    return _flow(LightningDiT, lightningdit.SIZES["lightningdit-xl-1"], LIGHTNINGDIT, transport, {}, kwargs)


def tiny_lightningdit(*, transport=None, **kwargs) -> FlowGenerator:
    return _flow(LightningDiT, lightningdit.SIZES["test-lightningdit"], LIGHTNINGDIT, transport, TINY, kwargs)


#################################################################################
#                                   DiT-DH                                      #
#################################################################################
def ditdh_xl(*, transport=None, **kwargs) -> FlowGenerator:
    return _flow(DiTDH, ditdh.SIZES["ditdh-xl"], RAE, transport, {}, kwargs)


def ditdh_s(*, transport=None, **kwargs) -> FlowGenerator:
    """RAE's weak model for autoguidance of ``ditdh-xl``."""
    return _flow(DiTDH, ditdh.SIZES["ditdh-s"], RAE, transport, {}, kwargs)


def tiny_ditdh(*, transport=None, **kwargs) -> FlowGenerator:
    return _flow(DiTDH, ditdh.SIZES["test-ditdh"], RAE, transport, TINY, kwargs)
