"""Autoencoder training losses: GAN terms, the adaptive GAN weight, VA-VAE's VF loss, and the
complete generator/discriminator objectives of VA-VAE (LDM ``LPIPSWithDiscriminator`` + VF) and RAE.

The building blocks (``LPIPS``, ``PatchGANDiscriminator``, ``hinge_d_loss``, ``adaptive_weight``,
``gate``) are shared with VQGAN training.  Images are in [-1, 1] unless a docstring says otherwise.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from latentforge_core.alignment import encoder_targets
from latentforge_core.errors import InputError
from latentforge_tokenizers.discriminators import (
    DiffAug,
    DinoDiscriminator,
    PatchGANDiscriminator,
)
from latentforge_tokenizers.lpips import LPIPS, lpips_vgg

__all__ = [
    "LPIPS",
    "DiffAug",
    "DinoDiscriminator",
    "PatchGANDiscriminator",
    "RAELoss",
    "VAVAELoss",
    "adaptive_weight",
    "gate",
    "hinge_d_loss",
    "hinge_g_loss",
    "lpips_vgg",
    "margin_cosine_loss",
    "margin_distance_matrix_loss",
    "quantize_8bit",
    "vanilla_d_loss",
    "vf_loss",
]


# ------------------------------------------------------------------------------------------------
# GAN terms and weights
# ------------------------------------------------------------------------------------------------
def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """0.5 · (E relu(1 − D(x)) + E relu(1 + D(x̂)))."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def vanilla_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """0.5 · (E softplus(−D(x)) + E softplus(D(x̂))), the non-saturating logistic loss."""
    return 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())


def hinge_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """−E D(x̂): the generator side of the hinge GAN (taming, LDM and RAE all use it)."""
    return -logits_fake.mean()


def adaptive_weight(
    numerator: torch.Tensor,
    denominator: torch.Tensor,
    layer_weight: torch.Tensor,
    *,
    eps: float = 1e-4,
    max_weight: float = 1e4,
) -> torch.Tensor:
    """‖∇_W numerator‖ / (‖∇_W denominator‖ + eps), clamped to [0, max_weight], detached (VQGAN).

    Balances a new term against the reconstruction loss at the last layer ``W`` that both reach.
    """
    if not layer_weight.requires_grad:
        raise InputError("adaptive_weight needs a layer weight that requires grad (got a frozen one)")
    g_num = torch.autograd.grad(numerator, layer_weight, retain_graph=True)[0]
    g_den = torch.autograd.grad(denominator, layer_weight, retain_graph=True)[0]
    return (g_num.norm() / (g_den.norm() + eps)).clamp(0.0, max_weight).detach()


def gate(step: int, start: int, value: float = 1.0) -> float:
    """``value`` once ``step >= start``, else 0: switches a loss term on at a step or epoch."""
    return value if step >= start else 0.0


def quantize_8bit(x: torch.Tensor) -> torch.Tensor:
    """Clamp to [-1, 1] and snap to the 256 levels an image file can store (RAE's fake images)."""
    return torch.round((x.clamp(-1, 1) + 1) * 127.5) / 127.5 - 1


# ------------------------------------------------------------------------------------------------
# VF loss (VA-VAE): align the projected latent with frozen foundation-model features
# ------------------------------------------------------------------------------------------------
def margin_cosine_loss(z: torch.Tensor, feats: torch.Tensor, margin: float) -> torch.Tensor:
    """mean over (b, i) of relu(1 − m1 − cos(z_bi, f_bi)), cosine along channels."""
    return F.relu(1.0 - margin - F.cosine_similarity(z, feats, dim=1)).mean()


def margin_distance_matrix_loss(z: torch.Tensor, feats: torch.Tensor, margin: float) -> torch.Tensor:
    """mean over (b, i, j) of relu(|cos(z_i, z_j) − cos(f_i, f_j)| − m2) over positions of one image."""
    a = F.normalize(z.flatten(2), dim=1)  # B C N
    b = F.normalize(feats.flatten(2), dim=1)  # B C N
    gram_a = a.transpose(1, 2) @ a  # B N N
    gram_b = b.transpose(1, 2) @ b  # B N N
    return F.relu((gram_a - gram_b).abs() - margin).mean()


def vf_loss(
    z: torch.Tensor,
    feats: torch.Tensor,
    *,
    m1: float = 0.5,
    m2: float = 0.25,
    cos_weight: float = 1.0,
    distmat_weight: float = 1.0,
) -> torch.Tensor:
    """VF loss between the projected latent ``z`` and features ``feats``, both ``[B, C, h, w]``."""
    if z.shape != feats.shape:
        raise InputError(
            f"VF loss: projected latent {tuple(z.shape)} and features {tuple(feats.shape)} must have the "
            "same shape [B, C, h, w] (projection width = encoder width, latent grid = feature grid)"
        )
    return distmat_weight * margin_distance_matrix_loss(z, feats, m2) + cos_weight * margin_cosine_loss(
        z, feats, m1
    )


# ------------------------------------------------------------------------------------------------
# VA-VAE objective
# ------------------------------------------------------------------------------------------------
class VAVAELoss(nn.Module):
    """LDM's KL-autoencoder loss plus the VF loss; one generator and one discriminator objective.

    Generator: Σ(|x − x̂| + w_p·LPIPS)/exp(logvar) + logvar summed over pixels / B  (learnable logvar)
    + kl_weight·KL + d_weight·gate(step, disc_start)·(−E D(x̂)) + vf_weight·w_vf·VF.
    ``d_weight`` is the adaptive weight on the decoder's last conv × ``disc_weight`` (``disc_weight``
    alone with ``adaptive_disc=False``, as REPA-E's end-to-end VAE loss, which also averages the
    reconstruction over pixels instead of summing it: ``pixel_mean=True``); ``w_vf`` the one
    on the encoder's last conv (clamped to 1e8).  ``vf_encoder`` (frozen, images in [0, 1]) may be None
    to train without alignment.
    """

    def __init__(
        self,
        *,
        vf_encoder: nn.Module | None = None,
        lpips: LPIPS | None = None,
        discriminator: nn.Module | None = None,
        perceptual_weight: float = 1.0,
        kl_weight: float = 1e-6,
        logvar_init: float = 0.0,
        disc_start: int = 5001,
        disc_weight: float = 0.5,
        disc_factor: float = 1.0,
        vf_weight: float = 0.1,
        m1: float = 0.5,
        m2: float = 0.25,
        cos_weight: float = 1.0,
        distmat_weight: float = 1.0,
        adaptive_vf: bool = True,
        adaptive_disc: bool = True,
        pixel_mean: bool = False,
    ):
        super().__init__()
        self.logvar = nn.Parameter(torch.tensor(float(logvar_init)))
        self.lpips = lpips if lpips is not None else lpips_vgg()
        self.discriminator = discriminator if discriminator is not None else PatchGANDiscriminator()
        self.vf_encoder = vf_encoder.requires_grad_(False).eval() if vf_encoder is not None else None
        self.perceptual_weight, self.kl_weight = perceptual_weight, kl_weight
        self.disc_start, self.disc_weight, self.disc_factor = disc_start, disc_weight, disc_factor
        self.vf_weight, self.m1, self.m2 = vf_weight, m1, m2
        self.cos_weight, self.distmat_weight, self.adaptive_vf = cos_weight, distmat_weight, adaptive_vf
        self.adaptive_disc, self.pixel_mean = adaptive_disc, pixel_mean

    def vf_target(self, x: torch.Tensor) -> torch.Tensor:
        """Frozen encoder features of images ``x`` in [-1, 1] → ``[B, C, h, w]`` (REPA's targets too)."""
        return encoder_targets(self.vf_encoder, (x.clamp(-1, 1) + 1) / 2)

    def generator_loss(
        self, x: torch.Tensor, out: dict[str, Any], model: nn.Module, step: int
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """``out`` is ``VAVAE.forward``'s dict (recon, posterior, z); ``model`` gives the last layers."""
        recon, posterior = out["recon"], out["posterior"]
        rec = (x - recon).abs()
        p = self.lpips(x, recon) if self.perceptual_weight > 0 else x.new_zeros(x.shape[0])
        rec = rec + self.perceptual_weight * p.view(-1, 1, 1, 1)
        nll = rec / torch.exp(self.logvar) + self.logvar
        nll = nll.mean() if self.pixel_mean else nll.sum() / x.shape[0]
        kl = posterior.kl().sum() / x.shape[0]
        loss = nll + self.kl_weight * kl
        logs = {"nll": nll.item(), "rec": rec.mean().item(), "lpips": p.mean().item(), "kl": kl.item()}
        gan_on = gate(step, self.disc_start, self.disc_factor)
        if gan_on > 0 and self.training:
            g = hinge_g_loss(self.discriminator(recon.contiguous()))
            w = self.disc_weight * (  # REPA-E: a fixed weight
                adaptive_weight(nll, g, model.decoder.conv_out.weight)
                if self.adaptive_disc
                else torch.ones(())
            )
            loss = loss + w * gan_on * g
            logs.update(g_loss=g.item(), d_weight=w.item())
        if self.vf_encoder is not None and self.vf_weight > 0:
            feats = self.vf_target(x)
            zp = model.project(out["z"])
            if zp.shape[-2:] != feats.shape[-2:]:
                raise InputError(
                    f"VF loss: latent grid {tuple(zp.shape[-2:])} differs from the encoder's feature grid "
                    f"{tuple(feats.shape[-2:])}; pick an encoder image size that gives the latent's grid"
                )
            vf = vf_loss(
                zp,
                feats,
                m1=self.m1,
                m2=self.m2,
                cos_weight=self.cos_weight,
                distmat_weight=self.distmat_weight,
            )
            w_vf = torch.ones((), device=x.device)
            if self.adaptive_vf and self.training:
                w_vf = adaptive_weight(nll, vf, model.encoder.conv_out.weight, max_weight=1e8)
            loss = loss + self.vf_weight * w_vf * vf
            logs.update(vf_loss=vf.item(), vf_weight=(self.vf_weight * w_vf).item())
        logs["loss"] = loss.item()
        return loss, logs

    def discriminator_loss(self, x: torch.Tensor, recon: torch.Tensor, step: int) -> torch.Tensor:
        """Hinge loss on real ``x`` vs detached ``recon``, gated like the generator term."""
        real = self.discriminator(x.detach())
        fake = self.discriminator(recon.detach())
        return gate(step, self.disc_start, self.disc_factor) * hinge_d_loss(real, fake)


# ------------------------------------------------------------------------------------------------
# RAE decoder objective
# ------------------------------------------------------------------------------------------------
class RAELoss(nn.Module):
    """RAE stage-1 loss on images in [0, 1]: L1 + w_p·LPIPS (from ``lpips_start``) and, from epoch
    ``disc_start``, ``disc_weight``·w·(−E D(aug(x̂))) with w the adaptive weight on the decoder's
    last layer (eps 1e-6, clamped to ``max_d_weight``).  The discriminator (a ``DinoDiscriminator``)
    learns from epoch ``disc_update_start`` on 8-bit-quantised fakes.
    """

    def __init__(
        self,
        discriminator: nn.Module | None,
        *,
        lpips: LPIPS | None = None,
        perceptual_weight: float = 1.0,
        lpips_start: int = 0,
        disc_weight: float = 0.75,
        disc_start: int = 8,
        disc_update_start: int = 6,
        max_d_weight: float = 1e4,
    ):
        super().__init__()
        self.discriminator = discriminator
        self.lpips = lpips if lpips is not None else lpips_vgg()
        self.perceptual_weight, self.lpips_start = perceptual_weight, lpips_start
        self.disc_weight, self.disc_start = disc_weight, disc_start
        self.disc_update_start, self.max_d_weight = disc_update_start, max_d_weight

    def generator_loss(
        self, x: torch.Tensor, recon: torch.Tensor, last_layer: torch.Tensor, epoch: int
    ) -> tuple[torch.Tensor, dict[str, float]]:
        rec = (recon - x).abs().mean()
        p = (
            self.lpips(x * 2 - 1, recon * 2 - 1).mean()
            if self.perceptual_weight > 0 and gate(epoch, self.lpips_start)
            else rec.new_zeros(())
        )
        loss = rec + self.perceptual_weight * p
        logs = {"l1": rec.item(), "lpips": p.item()}
        if self.discriminator is not None and gate(epoch, self.disc_start) and self.training:
            g = hinge_g_loss(self.discriminator(recon * 2 - 1))
            w = adaptive_weight(loss, g, last_layer, eps=1e-6, max_weight=self.max_d_weight)
            loss = loss + self.disc_weight * w * g
            logs.update(g_loss=g.item(), d_weight=w.item())
        logs["loss"] = loss.item()
        return loss, logs

    def discriminator_loss(self, x: torch.Tensor, recon: torch.Tensor, epoch: int) -> torch.Tensor | None:
        """Hinge loss on real vs quantised fake (both [0, 1]); None before ``disc_update_start``."""
        if self.discriminator is None or not gate(epoch, self.disc_update_start):
            return None
        real = self.discriminator(x.detach() * 2 - 1)
        fake = self.discriminator(quantize_8bit(recon.detach() * 2 - 1))
        return hinge_d_loss(real, fake)
