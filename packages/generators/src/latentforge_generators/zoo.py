"""Registered diffusion generators: a named backbone size wrapped in a ``FlowGenerator``.

Each family's size table is ``SIZES`` in its model file (``dit.py``, ``lightningdit.py``,
``ditdh.py``), keyed by the registry name; here are one builder per row (``dit_xl_2`` for
``dit-xl-2``) and each family's published transport.  Every builder takes the backbone's keyword
arguments (``in_channels``, ``input_size``, ``num_classes``, ``class_dropout_prob``,
``learn_sigma``, …; not the row's, which fix the size), ``transport=dict(...)``, which overrides
the family's published transport settings below key by key, and ``pretrained``: a path or hub id of
an official DiT / LightningDiT / RAE stage-2 file (``{"ema"|"model": …}`` containers unwrapped, EMA
first) or of our own weights.
"""

from __future__ import annotations

import difflib
import inspect
from typing import Any

from torch import nn

from latentforge_core.errors import InputTypeError
from latentforge_generators import dit, ditdh, lightningdit
from latentforge_generators.convert import load_official
from latentforge_generators.dit import DiT, SiT
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

# REPA's SiT predicts the velocity only (out_channels = in_channels).
NO_SIGMA = {"learn_sigma": False}
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
    pretrained = kwargs.pop("pretrained", None)
    _check_arguments(model, size, kwargs)
    backbone = model(**size, **{**defaults, **kwargs})
    if pretrained is not None:  # a path or hub id: official DiT / LightningDiT / RAE stage-2 files, or ours
        load_official(backbone, pretrained)
    return FlowGenerator(backbone, transport)


def _check_arguments(model: type[nn.Module], size: dict[str, Any], kwargs: dict[str, Any]) -> None:
    """A keyword the backbone does not take, or one the named size fixes, said by name."""
    fixed = [k for k in kwargs if k in size]
    if fixed:
        shown = ", ".join(f"{k}={size[k]!r}" for k in fixed)
        raise InputTypeError(
            f"{model.__name__}: {', '.join(fixed)} is fixed by the named size ({shown}); expected only "
            "the data's shape and training options here (choose another registered size to change it)"
        )
    accepted: list[str] = []
    for cls in model.__mro__:  # a subclass passes **kwargs on to its base (LightningDiT → DiT)
        init = cls.__dict__.get("__init__")
        if init is None:
            continue
        params = inspect.signature(init).parameters
        accepted += [p for p, v in params.items() if p != "self" and v.kind is not v.VAR_KEYWORD]
        if not any(v.kind is v.VAR_KEYWORD for v in params.values()):
            break
    every = list(dict.fromkeys(accepted))
    accepted = [p for p in every if p not in size]
    for key in kwargs:
        if key not in accepted:
            close = difflib.get_close_matches(key, every, n=3, cutoff=0.5)
            fixed_close = [c for c in close if c in size]
            hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
            if fixed_close:
                hint += f" ({', '.join(fixed_close)}: fixed by the named size)"
            raise InputTypeError(
                f"{model.__name__} takes no parameter {key!r}.{hint} It accepts: "
                f"{', '.join([*accepted, 'transport', 'pretrained'])}"
            )


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
#                              SiT (REPA's)                                     #
#################################################################################
def sit_s_2(*, transport=None, **kwargs) -> FlowGenerator:
    return _flow(SiT, dit.SIZES["sit-s-2"], SIT, transport, NO_SIGMA, kwargs)


def sit_b_2(*, transport=None, **kwargs) -> FlowGenerator:
    return _flow(SiT, dit.SIZES["sit-b-2"], SIT, transport, NO_SIGMA, kwargs)


def sit_l_2(*, transport=None, **kwargs) -> FlowGenerator:
    return _flow(SiT, dit.SIZES["sit-l-2"], SIT, transport, NO_SIGMA, kwargs)


def sit_xl_2(*, transport=None, **kwargs) -> FlowGenerator:
    return _flow(SiT, dit.SIZES["sit-xl-2"], SIT, transport, NO_SIGMA, kwargs)


def sit_xl_1(*, transport=None, **kwargs) -> FlowGenerator:
    return _flow(SiT, dit.SIZES["sit-xl-1"], SIT, transport, NO_SIGMA, kwargs)


def tiny_sit(*, transport=None, **kwargs) -> FlowGenerator:
    return _flow(SiT, dit.SIZES["test-sit"], SIT, transport, {**TINY, **NO_SIGMA}, kwargs)


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
