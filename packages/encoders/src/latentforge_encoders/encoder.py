"""A frozen ViT with its preprocessing and a feature selection: images in [0, 1] → features.

Feature selection is data (``FeatureSpec``): which blocks, which final norm, which tokens.  The
seeds' choices are named presets, each of which may also fix the input grid, the pixel
normalisation and the position-embedding resize of the implementation the seed ran:

=========  =====================================  ==========================================
preset     features                               input
=========  =====================================  ==========================================
``rae``    last block, LayerNorm without affine   16×16 tokens (224 px at patch 14, 256 at 16),
                                                  bicubic resize, the model's mean/std
``digit``  block L-3 (third to last), final norm  224 px, official DINOv2 position resize
                                                  (scale offset 0.1, no antialias)
``vavae``  last block, final norm                 the [-1, 1] image bilinearly resized to 224,
                                                  *no* mean/std (that recipe's quirk), timm's
                                                  antialiased position resize
=========  =====================================  ==========================================

CLS and register tokens are dropped from ``map``/``tokens``/``pooled`` outputs.  Images whose size
differs from the preprocessing input size are resized to it (never refused).
"""

from __future__ import annotations

from collections.abc import Sequence

import attrs
import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from latentforge_core.errors import InputError, InputTypeError, checking_values
from latentforge_core.protocols import Preprocessing
from latentforge_encoders.vit import VisionTransformer

NORMS = ("affine", "no_affine", "none")
OUTPUTS = ("map", "tokens", "cls", "pooled")


def _layers(value: int | Sequence[int]) -> tuple[int, ...]:
    return (value,) if isinstance(value, int) else tuple(value)


def _one_of(choices):
    def check(instance, attribute, value):
        if value not in choices:
            raise InputError(f"FeatureSpec.{attribute.name} must be one of {choices}, got {value!r}")

    return check


@attrs.frozen
class FeatureSpec:
    """Which features an encoder returns.

    ``layers``: block indices (negative from the end; ``-1`` the last block); ``norm``: the final
    LayerNorm as trained (``affine``), standardisation only (``no_affine``) or none; ``output``:
    ``map`` ``[B, C, h, w]``, ``tokens`` ``[B, N, C]`` (patch tokens), ``cls`` ``[B, C]`` or
    ``pooled`` ``[B, C]`` (mean of the patch tokens).
    """

    layers: tuple[int, ...] = attrs.field(default=(-1,), converter=_layers)
    norm: str = attrs.field(default="affine", validator=_one_of(NORMS))
    output: str = attrs.field(default="map", validator=_one_of(OUTPUTS))

    @layers.validator
    def _check_layers(self, attribute, value):
        if not value or not all(isinstance(i, int) for i in value):
            raise InputError(f"FeatureSpec.layers must be a non-empty sequence of ints, got {value!r}")

    def to_dict(self) -> dict:
        return {"layers": list(self.layers), "norm": self.norm, "output": self.output}


@attrs.frozen
class Preset:
    """A seed's feature choice plus the input handling it implies (``None`` keeps the model's)."""

    spec: FeatureSpec
    grid: int | None = None  # tokens per side: input size = grid × patch size
    signed_input: bool = False  # feed the [-1, 1] image, no mean/std
    resize: str | None = None
    pos_antialias: bool | None = None
    pos_offset: float | None = None


PRESETS = {
    "default": Preset(FeatureSpec()),
    "rae": Preset(FeatureSpec((-1,), "no_affine", "map"), grid=16, resize="bicubic"),
    "digit": Preset(FeatureSpec((-3,), "affine", "map"), grid=16, pos_antialias=False, pos_offset=0.1),
    "vavae": Preset(FeatureSpec((-1,), "affine", "map"), grid=16, signed_input=True, resize="bilinear",
                    pos_antialias=True, pos_offset=0.0),
}  # fmt: skip


def resolve_preset(features: str | FeatureSpec | Preset | None) -> Preset:
    if features is None:
        return PRESETS["default"]
    if isinstance(features, Preset):
        return features
    if isinstance(features, FeatureSpec):
        return Preset(features)
    if isinstance(features, str) and features in PRESETS:
        return PRESETS[features]
    raise InputError(f"features must be a FeatureSpec or one of {sorted(PRESETS)}, got {features!r}")


def apply_preset(vit: VisionTransformer, preprocessing: Preprocessing, preset: Preset) -> Preprocessing:
    """Set the preset's position resize on ``vit`` and return the preprocessing it implies."""
    if preset.pos_antialias is not None:
        vit.pos_antialias = preset.pos_antialias
    if preset.pos_offset is not None:
        vit.pos_offset = preset.pos_offset
    changes = {}
    if preset.grid is not None:
        changes["input_size"] = preset.grid * vit.patch_size
    if preset.signed_input:
        changes.update(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), value_range=(-1.0, 1.0))
    if preset.resize is not None:
        changes["resize"] = preset.resize
    return attrs.evolve(preprocessing, **changes)


#################################################################################
#                                 Frozen Encoder                                #
#################################################################################


class FrozenEncoder(nn.Module):
    """A ViT + its preprocessing + a ``FeatureSpec``; fulfils core's ``Encoder`` protocol.

    Frozen (the default) means no parameter needs grad and the module stays in eval mode even when a
    parent calls ``.train()``; gradients still flow to the *input* (a discriminator or a perceptual
    loss on generated images needs them).  ``check_finite=True`` refuses NaN/inf input; when off the
    check is skipped entirely (no reduction, no device sync).
    """

    def __init__(
        self,
        vit: VisionTransformer,
        preprocessing: Preprocessing,
        spec: FeatureSpec | None = None,
        *,
        frozen: bool = True,
        check_finite: bool = False,
        name: str | None = None,
    ):
        super().__init__()
        self.vit = vit
        self.preprocessing = preprocessing
        self.spec = spec if spec is not None else FeatureSpec()
        self.name = name or "vit"
        self.check_finite = check_finite
        self.frozen = frozen
        vit.resolve_layers(self.spec.layers)  # fail at build time on an impossible spec
        self.register_buffer("mean", torch.tensor(preprocessing.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(preprocessing.std).view(1, 3, 1, 1), persistent=False)
        if frozen:
            self.requires_grad_(False)
            self.eval()

    # --------------------------------------------------------------------------- attributes
    @property
    def embed_dim(self) -> int:
        return self.vit.embed_dim

    @property
    def patch_size(self) -> int:
        return self.vit.patch_size

    @property
    def depth(self) -> int:
        return self.vit.depth

    @property
    def layers(self) -> tuple[int, ...]:
        """The blocks ``forward`` returns, as non-negative indices (any of ``range(depth)`` can be asked
        of ``features``)."""
        return self.vit.resolve_layers(self.spec.layers)

    def train(self, mode: bool = True):
        return super().train(False if self.frozen else mode)

    def feature_shape(self, image_size: int | None = None) -> tuple[int, ...]:
        """Shape of one image's features when the encoder runs at ``image_size`` (default: its
        preprocessing input size): ``(C, h, w)``, ``(N, C)`` or ``(C,)`` by the spec's output."""
        size = self.preprocessing.input_size if image_size is None else image_size
        h, w = self.vit.token_grid(size, size)
        return {"map": (self.embed_dim, h, w), "tokens": (h * w, self.embed_dim)}.get(
            self.spec.output, (self.embed_dim,)
        )

    # --------------------------------------------------------------------------- forward
    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """[0, 1] images ``[B, 3, H, W]`` → the ViT's input (resized, normalised)."""
        if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise InputError(
                f"{self.name} expects RGB images in [0, 1] as a [B, 3, H, W] tensor, got {shape}"
            )
        if not images.is_floating_point():
            raise InputTypeError(
                f"{self.name} expects floating-point images in [0, 1], got dtype {images.dtype}"
            )
        if self.check_finite and checking_values() and not bool(torch.isfinite(images).all()):
            raise InputError(
                f"{self.name} was given images containing NaN or inf; expected finite values in [0, 1]"
            )
        size, mode = self.preprocessing.input_size, self.preprocessing.resize
        if tuple(images.shape[-2:]) != (size, size):
            smooth = mode in ("bilinear", "bicubic")
            images = F.interpolate(
                images, size=(size, size), mode=mode, align_corners=False if smooth else None
            )
        return (images - self.mean.to(images.dtype)) / self.std.to(images.dtype)

    def forward(self, images: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        return self.features(images)

    def features(
        self,
        images: torch.Tensor,
        layers: int | Sequence[int] | None = None,
        norm: str | None = None,
        output: str | None = None,
    ) -> torch.Tensor | list[torch.Tensor]:
        """Features of ``images`` in [0, 1]; arguments left ``None`` come from the encoder's spec.

        One layer gives one tensor; several give a list in the order asked.
        """
        spec = FeatureSpec(
            self.spec.layers if layers is None else layers,
            self.spec.norm if norm is None else norm,
            self.spec.output if output is None else output,
        )
        if spec.output == "cls" and self.vit.cls_token is None:
            raise InputError(
                f"{self.name} has no CLS token; ask for output='pooled' (mean of the patch tokens)"
            )
        x = self.preprocess(images)
        h, w = self.vit.token_grid(*x.shape[-2:])
        blocks = self.vit.forward_blocks(x, spec.layers)
        out = [self._select(self.vit.apply_norm(t, spec.norm), spec.output, h, w) for t in blocks]
        return out[0] if len(out) == 1 else out

    def _select(self, tokens: torch.Tensor, output: str, h: int, w: int) -> torch.Tensor:
        if output == "cls":
            return tokens[:, 0]  # B, C
        patches = tokens[:, self.vit.num_prefix_tokens :]  # B, N, C
        if output == "tokens":
            return patches
        if output == "pooled":
            return patches.mean(dim=1)  # B, C
        return rearrange(patches, "b (h w) c -> b c h w", h=h, w=w)  # B, C, h, w

    def extra_repr(self) -> str:
        p = self.preprocessing
        return (
            f"name={self.name!r}, frozen={self.frozen}, spec={self.spec}, input_size={p.input_size}, "
            f"resize={p.resize!r}, mean={p.mean}, std={p.std}, check_finite={self.check_finite}"
        )
