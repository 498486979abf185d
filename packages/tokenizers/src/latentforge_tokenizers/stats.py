"""Latent statistics: per-channel (VA-VAE) or per-element ``[C, H, W]`` (RAE) mean and variance.

Computed in one exact pass over a data set (Chan et al.'s pairwise merge of count/mean/M2 in
float64, so batches, shards and processes combine exactly; not a momentum average), saved as a
safetensors artifact beside the tokenizer checkpoint, and loadable from the released files: RAE's
``stat.pt`` (``{'var'[, 'mean']}`` of shape [C, H, W]) and LightningDiT's ``latents_stats.pt``
(``{'mean', 'std'}`` of shape [1, C, 1, 1]).  Normalisation is z_n = (z − mean) / sqrt(var + eps).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from latentforge_core.checkpoint import (
    CheckpointError,
    load_checkpoint,
    load_torch_file,
    save_checkpoint,
)
from latentforge_core.errors import InputError, InputTypeError
from latentforge_core.hub import resolve

REDUCTIONS = ("channel", "element")


def stats_path(checkpoint: str | os.PathLike) -> Path:
    """Where a tokenizer checkpoint's latent statistics live: ``<stem>.latent_stats.safetensors``."""
    checkpoint = Path(checkpoint)
    return checkpoint.with_name(checkpoint.stem + ".latent_stats.safetensors")


# ------------------------------------------------------------------------------------------------
# Statistics
# ------------------------------------------------------------------------------------------------
class LatentStats:
    """``mean`` (optional, zero when absent) and ``var`` of shape [C, 1, 1] or [C, H, W]."""

    def __init__(self, var: torch.Tensor, mean: torch.Tensor | None = None, eps: float = 0.0):
        var = _as_chw(var, "var")
        if mean is not None:
            mean = _as_chw(mean, "mean")
            if mean.shape != var.shape:
                raise InputError(f"latent stats: mean {tuple(mean.shape)} and var {tuple(var.shape)} differ")
        if bool((var < 0).any()) or not bool(torch.isfinite(var).all()):
            raise InputError("latent stats: var must be finite and non-negative")
        if float(var.min()) + eps <= 0:
            raise InputError(
                f"latent stats: var + eps must be positive (min var {float(var.min())}, eps {eps})"
            )
        self.var, self.mean, self.eps = var.float(), None if mean is None else mean.float(), float(eps)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.var.shape)

    def check(self, latents: torch.Tensor) -> None:
        c, h, w = self.shape
        ok = latents.ndim == 4 and latents.shape[1] == c and (h, w) in ((1, 1), tuple(latents.shape[2:]))
        if not ok:
            raise InputError(
                f"latent statistics of shape {self.shape} do not fit latents of shape "
                f"{tuple(latents.shape)}; "
                f"expected [B, {c}, H, W]" + ("" if (h, w) == (1, 1) else f" with H, W = {h}, {w}")
            )

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        self.check(z)
        mean = 0.0 if self.mean is None else self.mean.to(z)
        return (z - mean) / torch.sqrt(self.var.to(z) + self.eps)

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        self.check(z)
        mean = 0.0 if self.mean is None else self.mean.to(z)
        return z * torch.sqrt(self.var.to(z) + self.eps) + mean

    # ----------------------------------------------------------------------------- files
    def save(self, path: str | os.PathLike) -> Path:
        tensors = {"var": self.var} | ({} if self.mean is None else {"mean": self.mean})
        return save_checkpoint(tensors, path, {"kind": "latent_stats", "eps": self.eps})

    @classmethod
    def load(cls, path: str | os.PathLike, eps: float | None = None) -> LatentStats:
        """Our safetensors artifact, RAE's ``stat.pt`` or LightningDiT's ``latents_stats.pt``.

        ``eps`` defaults to the artifact's own (ours), 1e-5 (RAE) or 0 (LightningDiT's std); ``path`` may
        be a hub id (``hf:<org>/<repo>/<file>``)."""
        path = resolve(path)
        if path.suffix == ".safetensors":
            sd, config = load_checkpoint(path)
            found_eps = config.get("eps", 0.0)
        else:
            sd, found_eps = load_torch_file(path), None
            if not isinstance(sd, dict):
                raise CheckpointError(f"{path} holds a {type(sd).__name__}, expected a dict of statistics")
        if "std" in sd and "var" not in sd:  # LightningDiT: channel mean/std, no eps
            sd = {"mean": sd.get("mean"), "var": sd["std"].float() ** 2}
            found_eps = 0.0 if found_eps is None else found_eps
        if "var" not in sd:
            raise CheckpointError(
                f"{path}: no latent statistics found (keys {sorted(sd)}); expected 'var' (and optionally "
                "'mean') or LightningDiT's 'mean'/'std'"
            )
        eps = eps if eps is not None else (1e-5 if found_eps is None else found_eps)
        return cls(sd["var"], sd.get("mean"), eps=eps)


def _as_chw(t: torch.Tensor, name: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise InputTypeError(f"latent stats: {name} must be a tensor, got {type(t).__name__}")
    if t.ndim == 4 and t.shape[0] == 1:  # [1, C, 1, 1] (LightningDiT)
        t = t[0]
    if t.ndim == 1:
        t = t[:, None, None]
    if t.ndim != 3:
        raise InputError(
            f"latent stats: {name} must have shape [C, H, W], [C, 1, 1] or [1, C, 1, 1], got {tuple(t.shape)}"
        )
    return t


# ------------------------------------------------------------------------------------------------
# Exact one-pass accumulation
# ------------------------------------------------------------------------------------------------
class StatsAccumulator:
    """Streaming mean/variance over latents ``[B, C, H, W]``; ``reduce="channel"`` pools B, H, W,
    ``"element"`` pools B only.  ``merge`` combines accumulators (other shards, other ranks)."""

    def __init__(self, reduce: str = "element"):
        if reduce not in REDUCTIONS:
            raise InputError(f"reduce must be one of {REDUCTIONS}, got {reduce!r}")
        self.reduce = reduce
        self.count = 0
        self.mean: torch.Tensor | None = None
        self.m2: torch.Tensor | None = None

    def update(self, z: torch.Tensor) -> None:
        if z.ndim != 4:
            raise InputError(f"expected latents [B, C, H, W], got shape {tuple(z.shape)}")
        z = z.detach().to("cpu", torch.float64)
        dims = (0, 2, 3) if self.reduce == "channel" else (0,)
        n = z.numel() // (z.shape[1] if self.reduce == "channel" else z[0].numel())
        mean = z.mean(dim=dims)
        m2 = ((z - z.mean(dim=dims, keepdim=True)) ** 2).sum(dim=dims)
        self._combine(n, mean, m2)

    def merge(self, other: StatsAccumulator) -> None:
        if other.reduce != self.reduce:
            raise InputError(f"cannot merge a {other.reduce!r} accumulator into a {self.reduce!r} one")
        if other.count:
            self._combine(other.count, other.mean, other.m2)

    def _combine(self, n: int, mean: torch.Tensor, m2: torch.Tensor) -> None:
        if self.count == 0:
            self.count, self.mean, self.m2 = n, mean.clone(), m2.clone()
            return
        if mean.shape != self.mean.shape:
            raise InputError(
                f"latents of shape {tuple(mean.shape)} cannot join statistics of shape "
                f"{tuple(self.mean.shape)}"
            )
        total = self.count + n
        delta = mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + m2 + delta**2 * (self.count * n / total)
        self.count = total

    def compute(self, *, unbiased: bool = False, eps: float = 1e-5, with_mean: bool = True) -> LatentStats:
        """Population variance by default (RAE); ``unbiased=True`` for LightningDiT's std."""
        if self.count < (2 if unbiased else 1):
            raise InputError(f"not enough latents for statistics (count {self.count})")
        var = self.m2 / (self.count - 1 if unbiased else self.count)
        mean = self.mean.float() if with_mean else None
        return LatentStats(var.float(), mean, eps=eps)


def compute_latent_stats(
    encode: Callable[[torch.Tensor], torch.Tensor],
    batches: Iterable[torch.Tensor],
    *,
    reduce: str = "element",
    unbiased: bool = False,
    eps: float = 1e-5,
    with_mean: bool = True,
) -> LatentStats:
    """Encode every batch of images once and return the exact statistics of all latents."""
    acc = StatsAccumulator(reduce)
    with torch.no_grad():
        for images in batches:
            acc.update(encode(images))
    return acc.compute(unbiased=unbiased, eps=eps, with_mean=with_mean)
