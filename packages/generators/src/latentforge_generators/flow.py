"""FlowGenerator: a diffusion backbone + a transport = core's ``Generator`` (loss, sample, input_shape).

The backbone contract (DiT, LightningDiT, DiT-DH, or a plugin's): ``forward(x [B,C,H,W], t [B],
y [B] long) -> [B, C_out, H, W]`` with ``t`` in its declared ``time_convention``; attributes
``in_channels``, ``out_channels``, ``input_size``, ``num_classes`` (the null label for guidance is
index ``num_classes``; a backbone may say ``null_class = None`` when it has none) and
``learn_sigma`` (then the first ``in_channels`` outputs are the velocity, as in SiT).
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn

from latentforge_core.device import autocast
from latentforge_core.errors import InputError, InputTypeError, checking_values
from latentforge_generators.guidance import CFG, AutoGuidance
from latentforge_generators.samplers import SAMPLERS, check_sample_options, solve
from latentforge_generators.transport import (
    Transport,
    check_convention,
    from_model_velocity,
    interpolate,
    to_model_time,
    velocity_target,
)

Tensor = torch.Tensor


class FlowGenerator(nn.Module):
    """Flow matching around a backbone. Time inside is the package's (t = 1 noise, see transport).

    ``class_dropout``: rate at which ``loss`` swaps labels for the null label, for backbones that do
    not drop labels themselves (DiT-family backbones do, in train mode; then leave it None).
    """

    def __init__(
        self,
        backbone: nn.Module,
        transport: Transport | dict | None = None,
        class_dropout: float | None = None,
    ):
        super().__init__()
        for attr in ("in_channels", "input_size", "num_classes", "time_convention"):
            if not hasattr(backbone, attr):
                raise InputTypeError(
                    f"backbone {type(backbone).__name__} lacks the attribute {attr!r} FlowGenerator needs"
                )
        check_convention(backbone.time_convention)
        if class_dropout is not None and not 0.0 <= class_dropout < 1.0:
            raise InputError(f"class_dropout must lie in [0, 1), got {class_dropout}")
        self.backbone = backbone
        transport = transport if isinstance(transport, Transport) else Transport.from_dict(transport)
        self.transport = transport.resolve(self.input_shape)
        self.class_dropout = class_dropout

    # ---------------------------------------------------------------------------- description
    @property
    def input_shape(self) -> tuple[int, int, int]:
        size = self.backbone.input_size
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        return (self.backbone.in_channels, h, w)

    @property
    def num_classes(self) -> int:
        return int(self.backbone.num_classes or 0)

    @property
    def null_class(self) -> int | None:
        """The label meaning "no class" (index ``num_classes``), or None when it was never trained:
        an unconditional backbone, or one built without label dropout (so guidance has nothing to use)."""
        if hasattr(self.backbone, "null_class"):
            return self.backbone.null_class
        dropout = self.class_dropout or getattr(
            getattr(self.backbone, "y_embedder", None), "dropout_prob", 0.0
        )
        return self.num_classes if self.num_classes > 0 and dropout > 0 else None

    # ---------------------------------------------------------------------------- checks
    def _check_latents(self, x: Tensor, name: str = "x") -> None:
        expected = "[B, " + ", ".join(map(str, self.input_shape)) + "]"
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise InputTypeError(
                f"{name} must be a floating-point tensor of shape {expected}, got {type(x).__name__} "
                f"{getattr(x, 'dtype', '')}"
            )
        if x.ndim != 4 or tuple(x.shape[1:]) != self.input_shape:
            raise InputError(
                f"{name} must have shape {expected} (channels, height, width of this generator), "
                f"got {list(x.shape)}"
            )
        if checking_values() and not torch.isfinite(x).all():
            raise InputError(f"{name} contains NaN or infinite values")

    def _check_labels(self, y: Tensor, batch: int, allow_null: bool) -> Tensor:
        if not torch.is_tensor(y) or y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
            raise InputTypeError(
                f"class labels must be an integer tensor of shape [{batch}], got {type(y).__name__} "
                f"{getattr(y, 'dtype', '')}"
            )
        if y.shape != (batch,):
            raise InputError(f"class labels must have shape [{batch}] (one per latent), got {list(y.shape)}")
        high = self.num_classes + (1 if allow_null and self.null_class is not None else 0)
        if checking_values() and y.numel() and (y.min() < 0 or y.max() >= high):
            null = (
                f" or the null label {self.null_class}" if allow_null and self.null_class is not None else ""
            )
            raise InputError(
                f"class labels must lie in [0, {self.num_classes}){null}, got values in "
                f"[{int(y.min())}, {int(y.max())}]"
            )
        return y.long()

    def _null_labels(self, batch: int, device: torch.device) -> Tensor:
        if self.num_classes > 0 and self.null_class is None:
            raise InputError(
                "this class-conditional generator has no trained null class (it was built "
                "without label dropout), so it cannot generate without labels; pass y"
            )
        return torch.full((batch,), self.num_classes, dtype=torch.long, device=device)

    # ---------------------------------------------------------------------------- model
    def velocity(self, x: Tensor, t: Tensor | float, y: Tensor) -> Tensor:
        """The backbone's prediction as the internal velocity ``dx_t/dt`` at internal time ``t``."""
        if isinstance(t, torch.Tensor):
            t = t.to(dtype=torch.float32, device=x.device).expand(x.shape[0])
        else:  # a sampler's Python float: filled on the device, no host-to-device copy (a sync on CUDA)
            t = torch.full((x.shape[0],), t, dtype=torch.float32, device=x.device)
        convention = self.backbone.time_convention
        out = self.backbone(x, to_model_time(t, convention), y)  # [B, C_out, H, W]
        return from_model_velocity(out[:, : self.input_shape[0]], convention).to(x.dtype)

    def loss(
        self,
        x: Tensor,
        y: Tensor | None = None,
        return_terms: bool = False,
        *,
        noise: Tensor | None = None,
        t: Tensor | None = None,
    ) -> Tensor | dict[str, Tensor]:
        """Flow-matching loss for clean latents ``x`` [B, C, H, W] and labels ``y`` [B]; ``noise`` and
        internal times ``t`` [B] are drawn unless given (REPA-E's two passes share them)."""
        self._check_latents(x)
        y = (
            self._null_labels(len(x), x.device)
            if y is None
            else self._check_labels(y, len(x), allow_null=True)
        )
        if self.class_dropout and self.training:
            drop = torch.rand(len(x), device=x.device) < self.class_dropout
            y = torch.where(drop, self._null_labels(len(x), x.device), y)
        noise = torch.randn_like(x) if noise is None else noise
        t = self.transport.sample_time(len(x), device=x.device) if t is None else t
        pred = self.velocity(interpolate(x, noise, t), t, y)
        terms = self.transport.loss_terms(pred, velocity_target(x, noise))
        return terms if return_terms else terms["loss"]

    # ---------------------------------------------------------------------------- sampling
    @torch.no_grad()
    def sample(
        self,
        y: Tensor | int | None = None,
        *,
        n: int | None = None,
        sampler: str = "euler",
        steps: int = 50,
        cfg_scale: float = 1.0,
        cfg_interval: tuple[float, float] = (0.0, 1.0),
        cfg_channels: int | None = None,
        guidance: str | CFG | AutoGuidance | None = None,
        guidance_model: FlowGenerator | None = None,
        shift: float | None = None,
        t_end: float | None = None,
        noise: Tensor | None = None,
        generator: torch.Generator | None = None,
        amp: bool = True,
        return_nfe: bool = False,
        **options: Any,
    ) -> Tensor | tuple[Tensor, int]:
        """Latents for labels ``y`` [B] (or ``n`` unconditional ones with the null label).

        ``sampler``: "euler", "heun", "midpoint", "dpm++2m", "unipc" (these take ``grid``: "uniform",
        "logsnr" or "edm" spacing), "dopri5" (``atol``, ``rtol``) or "sde" (``diffusion``,
        ``last_step``, …). ``guidance``: None/"cfg" (``cfg_scale``, ``cfg_interval``
        in internal t, ``cfg_channels`` = first k), "autoguidance" with ``guidance_model``, or a
        guidance object.
        ``shift`` and the unshifted end time ``t_end`` default to the transport's. With
        ``return_nfe`` it also returns the number of velocity evaluations.
        """
        device = next(self.parameters()).device
        if isinstance(y, int):
            y, n = None, y
        if y is None:
            if not isinstance(n, int) or n < 1:
                raise InputError(f"give class labels y, or a number of samples n ≥ 1; got y=None, n={n!r}")
            y = self._null_labels(n, device)
        else:
            y = self._check_labels(
                y.to(device) if isinstance(y, torch.Tensor) else y, len(y), allow_null=True
            )
        if sampler not in SAMPLERS:
            raise InputError(f"unknown sampler {sampler!r}; expected one of {SAMPLERS}")
        check_sample_options(  # what the solver and the guidance do not check themselves
            self,
            dict(sampler=sampler, cfg_scale=cfg_scale, shift=shift, amp=amp, **options),
            owner="FlowGenerator.sample",
            from_config=False,
        )
        guide = self._guidance(guidance, guidance_model, cfg_scale, cfg_interval, cfg_channels)
        if noise is None:
            where = device if generator is None else generator.device  # a CPU generator may seed GPU sampling
            noise = torch.randn((len(y), *self.input_shape), generator=generator, device=where).to(device)
        else:
            self._check_latents(noise, "noise")
            if len(noise) != len(y):
                raise InputError(f"noise has {len(noise)} latents but there are {len(y)} labels")
            noise = noise.to(device)
        shift = self.transport.sampling_shift if shift is None else shift
        t_end = self.transport.sample_eps if t_end is None else t_end

        def fn(x: Tensor, t: float) -> Tensor:
            with autocast(device) if amp else contextlib.nullcontext():
                return guide(self.velocity, x, t, y, self.null_class).float()

        was_training = self.training
        self.eval()
        try:
            result = solve(
                sampler,
                fn,
                noise.float(),
                steps=steps,
                shift=shift,
                t_end=t_end,
                generator=generator,
                **options,
            )
        finally:
            self.train(was_training)
        return (result.x, result.nfe) if return_nfe else result.x

    def _guidance(self, guidance, guidance_model, scale, interval, channels) -> CFG | AutoGuidance:
        if isinstance(guidance, (CFG, AutoGuidance)):
            guide = guidance
        elif guidance in (None, "cfg"):
            guide = CFG(scale=scale, interval=interval, channels=channels)
            if channels is not None and channels > self.input_shape[0]:
                raise InputError(
                    f"cfg_channels={channels} exceeds the generator's {self.input_shape[0]} channels"
                )
        elif guidance == "autoguidance":
            if not isinstance(guidance_model, FlowGenerator):
                raise InputError(
                    "autoguidance needs guidance_model=<a weaker FlowGenerator>, got "
                    f"{type(guidance_model).__name__}"
                )
            if guidance_model.input_shape != self.input_shape:
                raise InputError(
                    f"the guidance model works on {guidance_model.input_shape} latents, "
                    f"this generator on {self.input_shape}"
                )
            guidance_model.eval()
            guide = AutoGuidance(guide=guidance_model.velocity, scale=scale, interval=interval)
        else:
            raise InputError(
                f"unknown guidance {guidance!r}; expected None, 'cfg', 'autoguidance' or a guidance object"
            )
        if guide.needs_null_class and self.null_class is None:
            raise InputError(
                f"classifier-free guidance (scale {guide.scale}) needs a null class, but this "
                "generator's backbone has none; use scale 1.0 or autoguidance"
            )
        return guide

    def extra_repr(self) -> str:
        return f"input_shape={self.input_shape}, transport={self.transport}"
