"""The contract each kind of component fulfils, so a recipe can drive ours and a plugin's alike.

They are deliberately small: what a component offers beyond its protocol is an ordinary method.
A registry checks a freshly built component against its kind's protocol (attribute presence, as
``typing.runtime_checkable`` does).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import attrs
import torch


@attrs.frozen
class Preprocessing:
    """How an encoder or tokenizer wants its images, as data: the caller hands [0, 1] RGB."""

    input_size: int
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)
    resize: str = "bicubic"  # interpolation mode used to reach ``input_size``
    value_range: tuple[float, float] = (0.0, 1.0)  # range after mean/std (e.g. (-1, 1) for VAEs)

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in attrs.asdict(self).items()}


@runtime_checkable
class Encoder(Protocol):
    """Images in [0, 1] ``[B, 3, H, W]`` → features."""

    preprocessing: Preprocessing
    embed_dim: int

    def forward(self, images: torch.Tensor) -> torch.Tensor: ...

    def feature_shape(self, image_size: int | None = None) -> tuple[int, ...]: ...

    @property
    def layers(self) -> Sequence[int]: ...


@runtime_checkable
class Tokenizer(Protocol):
    """Images → latents ``[B, C, H, W]`` (continuous) or token ids ``[B, H, W]`` (discrete), and back.

    ``can_decode`` is False for tokens that reach pixels only through another model (K-Means tokens,
    decoded by DiGIT's stage 2); their ``decode`` raises.  ``stats`` are the latent normalisation
    statistics (``None`` until set, and always for discrete tokens); a continuous tokenizer also offers
    ``set_stats(stats)`` and ``compute_stats(batches)`` (its own convention), and its ``encode`` and
    ``decode`` take ``normalize=True`` to work in normalised latents.
    """

    preprocessing: Preprocessing
    can_decode: bool
    stats: Any

    def encode(self, images: torch.Tensor) -> torch.Tensor: ...

    def decode(self, latents: torch.Tensor) -> torch.Tensor: ...  # images in [0, 1] ``[B, 3, H, W]``

    @property
    def latent_shape(self) -> tuple[int, ...]: ...

    @property
    def vocab_size(self) -> int | None: ...  # None for continuous tokenizers


@runtime_checkable
class Generator(Protocol):
    """Learns a distribution over latents or token grids, optionally class-conditional."""

    @property
    def input_shape(self) -> tuple[int, ...]: ...

    def loss(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor: ...

    def sample(self, y: torch.Tensor | int, **sampler: Any) -> torch.Tensor: ...


@runtime_checkable
class Metric(Protocol):
    """Accumulates over batches, computes once, merges across processes."""

    def update(self, images: torch.Tensor) -> None: ...

    def compute(self) -> Any: ...

    def reset(self) -> None: ...

    def merge(self, other: Any) -> None: ...


@runtime_checkable
class Recipe(Protocol):
    """One job from one config: ``setup`` → ``run`` → ``save`` → ``cleanup``."""

    def setup(self) -> None: ...

    def run(self) -> Mapping[str, Any] | None: ...

    def save(self) -> None: ...

    def cleanup(self) -> None: ...
