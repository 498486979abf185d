"""Linear-probe accuracy: a linear classifier trained with SGD on frozen features.

The features come from a registered encoder (by name), any module or any function of images
(e.g. a generator's intermediate layer). As in MAE's protocol, features are standardised with the
training set's statistics (a BatchNorm without affine), then a linear head is trained with SGD,
momentum 0.9 and a cosine learning rate; the score is top-1 accuracy on the held-out images.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from latentforge_core import registry
from latentforge_core.device import resolve_device
from latentforge_core.errors import InputError, InputTypeError, checking_values
from latentforge_metrics.generative import encoder_features
from latentforge_metrics.stats import FeatureBank


def train_linear_probe(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    num_classes: int,
    *,
    epochs: int = 90,
    lr: float = 0.1,
    batch_size: int = 256,
    weight_decay: float = 0.0,
    seed: int = 0,
) -> Callable[[torch.Tensor], torch.Tensor]:
    """Fit standardisation + ``nn.Linear`` on ``[N, D]`` features; returns a logits function."""
    mean, std = train_x.mean(dim=0), train_x.std(dim=0).clamp_min(1e-6)
    x = (train_x - mean) / std
    gen = torch.Generator(device="cpu").manual_seed(seed)
    head = nn.Linear(x.shape[1], num_classes, device=x.device)
    with torch.no_grad():  # MAE initialises the probe head with a small normal, drawn by the CPU `gen`
        head.weight.copy_(torch.empty(head.weight.shape).normal_(0, 0.01, generator=gen))
        head.bias.zero_()
    opt = torch.optim.SGD(head.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
    steps_per_epoch = math.ceil(x.shape[0] / batch_size)
    total = epochs * steps_per_epoch
    for step in range(total):
        if step % steps_per_epoch == 0:
            order = torch.randperm(x.shape[0], generator=gen).to(x.device)
        idx = order[(step % steps_per_epoch) * batch_size : (step % steps_per_epoch + 1) * batch_size]
        for group in opt.param_groups:
            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / total))
        loss = F.cross_entropy(head(x[idx]), train_y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    head.requires_grad_(False)
    return lambda feats: head((feats.to(mean.device) - mean) / std)


class LinearProbe:
    """Top-1 accuracy of a linear probe. ``update(images, labels, train=True|False)``.

    ``features``: a registered encoder name, a module (its ``features(output=...)`` when it has one)
    or a function ``images -> [B, D] | [B, C, h, w] | [B, N, C]`` (maps and tokens are averaged).
    """

    def __init__(
        self,
        num_classes: int,
        features: str | nn.Module | Callable = "dinov2-vitb14",
        *,
        output: str = "cls",
        encoder_kwargs: dict | None = None,
        epochs: int = 90,
        lr: float = 0.1,
        batch_size: int = 256,
        weight_decay: float = 0.0,
        seed: int = 0,
        device=None,
    ):
        self.num_classes = num_classes
        self.device = resolve_device(device)
        if isinstance(features, str):
            features = registry.encoders.build(features, **(encoder_kwargs or {}))
        if isinstance(features, nn.Module):
            features = features.to(self.device).eval()
        self.extractor, self.output = features, output
        self.settings = dict(
            epochs=epochs, lr=lr, batch_size=batch_size, weight_decay=weight_decay, seed=seed
        )
        self.train_x, self.val_x = FeatureBank(), FeatureBank()
        self.train_y, self.val_y = FeatureBank(1), FeatureBank(1)

    def update(self, images: torch.Tensor, labels: torch.Tensor, train: bool = True) -> None:
        feats = encoder_features(self.extractor, images.to(self.device), self.output)
        self.update_features(feats, labels, train)

    def update_features(self, features: torch.Tensor, labels: torch.Tensor, train: bool = True) -> None:
        labels = torch.as_tensor(labels).long().reshape(-1, 1)
        if labels.shape[0] != features.shape[0]:
            raise InputError(f"{features.shape[0]} feature rows but {labels.shape[0]} labels")
        if checking_values() and labels.numel() and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise InputError(
                f"labels must be in [0, {self.num_classes}), got [{labels.min()}, {labels.max()}]"
            )
        (self.train_x if train else self.val_x).update(features.float())
        (self.train_y if train else self.val_y).update(labels)

    def compute(self) -> dict[str, float]:
        if not self.train_x.parts or not self.val_x.parts:
            raise InputError("LinearProbe needs training (train=True) and held-out (train=False) images")
        train_x, train_y = (
            self.train_x.gathered().to(self.device),
            self.train_y.gathered()[:, 0].to(self.device),
        )
        val_x, val_y = self.val_x.gathered().to(self.device), self.val_y.gathered()[:, 0].to(self.device)
        with torch.enable_grad():
            logits_fn = train_linear_probe(train_x, train_y, self.num_classes, **self.settings)
        with torch.no_grad():
            top1 = (logits_fn(val_x).argmax(dim=1) == val_y).float().mean().item()
            train_top1 = (logits_fn(train_x).argmax(dim=1) == train_y).float().mean().item()
        return {"top1": top1, "train_top1": train_top1}

    def reset(self) -> None:
        for bank in (self.train_x, self.val_x, self.train_y, self.val_y):
            bank.reset()

    def merge(self, other: LinearProbe) -> None:
        if not isinstance(other, LinearProbe):
            raise InputTypeError(f"cannot merge a {type(other).__name__} into a LinearProbe")
        for mine, theirs in zip(
            (self.train_x, self.val_x, self.train_y, self.val_y),
            (other.train_x, other.val_x, other.train_y, other.val_y),
            strict=True,
        ):
            mine.merge(theirs)
