"""train-repa-e: REPA-E (Leng, Singh et al., 2025) — a VA-VAE tuned end to end with a flow generator
through REPA's alignment loss.

    latentforge run train-repa-e --config tiny-repa-e
    torchrun --nproc-per-node 8 -m latentforge_runner.cli run train-repa-e --config repa-e-sit-xl-1 \\
        data.root=/data/imagenet/train tokenizer.params.pretrained=/w/vavae.pt \\
        tokenizer.params.stats=/w/latents_stats.pt

Each step, on one batch of images (End2End-Diffusion/REPA-E ``train_repae.py``):

1. the frozen encoder's patch features of the images (REPA's targets);
2. the VAE's pass: a posterior sample ``z`` of the images, its losses (L1 + LPIPS + KL + a fixed-weight
   GAN term) plus ``vae_align_weight`` × REPA's alignment of the generator's block ``depth`` on the
   batch-normalised ``z`` — the generator and the normalisation frozen and in eval mode, so the
   alignment's gradient reaches only the VAE — then the VAE's AdamW step and the discriminator's;
3. the generator's pass on ``z`` detached (the diffusion loss never reaches the VAE), with the same
   noise and times, normalised by the latent BatchNorm in train mode (its running statistics move):
   flow loss + λ · alignment, the generator's (and projector's) AdamW step, EMA.

The latent normalisation is REPA-E's BatchNorm (no affine, eps 1e-4), started from the VAE's latent
statistics; it belongs to the tokenizer: ``save`` writes the tuned VAE as ``tokenizer.safetensors``
with its statistics beside it (the BatchNorm's running mean and variance), a tokenizer every other
recipe reads (``tokenizer.params.pretrained=<run>/tokenizer.safetensors``), and the generator's EMA
as ``generator.safetensors``.  ``eval.json`` holds the VAE's held-out PSNR at the start and at the end.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

import torch
from torch import nn

from latentforge_core.alignment import encoder_targets
from latentforge_core.checkpoint import save_checkpoint
from latentforge_core.device import autocast
from latentforge_metrics.reconstruction import PSNR
from latentforge_runner import distributed
from latentforge_runner.config import Component, ConfigError, Settings, component, setting, settings
from latentforge_runner.data import DataSettings, Digits, build_training_data
from latentforge_runner.generation import AlignmentSettings, EvalSettings, build_alignment, generator_shapes
from latentforge_runner.latents import STATS_FILE, restore_latent_stats
from latentforge_runner.reports import write_report
from latentforge_runner.run_folder import RunSettings, open_run
from latentforge_runner.training import TrainingSettings, TrainState
from latentforge_tokenizers import losses
from latentforge_tokenizers.stats import LatentStats
from latentforge_tokenizers.vavae import VAVAE

log = logging.getLogger("latentforge")


@settings
class VAELossSettings(Settings):
    """REPA-E's VAE objective (configs/l1_lpips_kl_gan.yaml): L1, LPIPS, KL and a fixed-weight GAN."""

    perceptual_weight: float = setting(1.0, ge=0)  # LPIPS
    kl_weight: float = setting(1e-6, ge=0)
    disc_weight: float = setting(0.1, ge=0)  # the GAN term's fixed weight, from step disc_start
    disc_start: int = setting(0, ge=0)
    disc_layers: int = setting(3, ge=1)  # PatchGAN discriminator depth (ndf 64)
    disc_channels: int = setting(64, ge=1)
    # REPA-E hands its [-1, 1] images to an LPIPS that maps [0, 1] to [-1, 1] again (lpips.py:89-94),
    # so LPIPS sees [-3, 1]: "repa-e" reproduces that, "standard" feeds [-1, 1]
    lpips_range: Literal["repa-e", "standard"] = "repa-e"
    lpips_heads: str | None = None  # LPIPS linear heads (default: the installed lpips package's file)
    lpips_trunk: str | None = None  # torchvision vgg16 weights for the LPIPS trunk


@settings
class TrainREPAESettings(Settings):
    run: RunSettings = RunSettings(output_dir="runs/train-repa-e")  # where and on what it runs
    data: DataSettings = DataSettings()  # the training images (pixels: the VAE and the encoder see them)
    tokenizer: Component = component("tokenizers")  # the VA-VAE tuned end to end (with its latent stats)
    generator: Component = component("generators", injected=("in_channels", "input_size", "num_classes"))
    alignment: AlignmentSettings  # REPA: the encoder, depth, λ (the generator's weight) and projector
    vae_align_weight: float = setting(1.5, ge=0)  # the alignment's weight in the VAE's loss (REPA-E: 1.5)
    vae_loss: VAELossSettings = VAELossSettings()  # the VAE's own losses (L1, LPIPS, KL, GAN)
    bn_momentum: float = setting(0.1, gt=0, le=1)  # the latent BatchNorm's running-statistics momentum
    training: TrainingSettings = TrainingSettings(lr=1e-4, betas=(0.9, 0.999), grad_clip=1.0)  # all three
    eval: EvalSettings = EvalSettings()  # sample grids and online FID of the generator
    psnr_images: int = setting(256, ge=1)  # held-out images whose reconstruction PSNR is reported


class _DoubledRange(nn.Module):
    """LPIPS as REPA-E calls it: its inputs mapped by 2x − 1 once more."""

    def __init__(self, lpips: nn.Module):
        super().__init__()
        self.lpips = lpips

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.lpips(2 * x - 1, 2 * y - 1)


class TrainREPAERecipe:
    Settings = TrainREPAESettings

    def __init__(self, config: TrainREPAESettings):
        self.cfg = config

    # -------------------------------------------------------------------------------- setup
    def setup(self) -> None:
        cfg, t = self.cfg, self.cfg.training
        if cfg.data.name == "latents":
            raise ConfigError(
                "REPA-E tunes the VAE on images: data.name latents holds none (use folder or digits)"
            )
        if t.grad_accum != 1:
            raise ConfigError(
                "training.grad_accum: REPA-E's three updates per step take whole batches (set 1)"
            )
        self.run_dir, self.dist, self.logger = open_run("train-repa-e", cfg)
        self.device = self.dist.device
        torch.manual_seed(cfg.run.seed)  # every process builds the same initial weights
        self.vae = cfg.tokenizer.build("tokenizers").to(self.device)
        if not isinstance(self.vae, VAVAE) or not any(p.requires_grad for p in self.vae.parameters()):
            raise ConfigError(
                f"REPA-E tunes the tokenizer end to end, but {cfg.tokenizer.name!r} is a "
                f"{type(self.vae).__name__}, not a trainable VAE: expected a VA-VAE (vavae-f16d32, "
                "test-vavae-tiny) with its latent statistics"
            )
        self.vae.train().requires_grad_(True)
        if self.vae.linear_proj is not None:
            self.vae.linear_proj.requires_grad_(False)  # the VF loss's projection: no gradient reaches it
        self.dataset = build_training_data(cfg.data, cfg.tokenizer.name, t.seed)
        # The latent BatchNorm starts from the VAE's statistics (its file, else per channel on a few
        # batches, kept in the run folder so a resumed run starts alike).
        e = cfg.eval
        how = restore_latent_stats(
            self.vae, self.run_dir, lambda: self.dataset, e.stats_batches, "channel", self.device
        )
        log.info("starting latent statistics: %s", how)
        if self.dist.is_main and not (self.run_dir / STATS_FILE).is_file():
            self.vae.stats.save(self.run_dir / STATS_FILE)
        self.norm = self._latent_norm()
        shape = generator_shapes(self.vae, cfg.data.num_classes)
        self.gen_config = {"name": cfg.generator.name, **cfg.generator.params, **shape}
        self.generator = cfg.generator.build("generators", **shape).to(self.device)
        self.encoder, self.repa = build_alignment(cfg.alignment, self.generator, self.device)
        self.loss = self._vae_loss().to(self.device)
        # its alignment and PSNR passes call the models outside these entries: DDP only, no FSDP
        self.model = distributed.wrap(
            self.repa, self.dist, method="loss", compile=t.compile, training=t, sharding=False
        )
        self.vae_model = distributed.wrap(self.vae, self.dist)
        self.state = TrainState(
            self.generator,
            t,
            data=self.dataset,
            num_items=len(self.dataset),
            dist=self.dist,
            run_dir=self.run_dir,
            config=self.gen_config,
            params=self.repa.parameters(),
        )
        self.state.keep("projector", self.repa.projector)
        self.state.keep("latent_norm", self.norm)
        self.vae_optim = self.state.add("tokenizer", self.vae, key="vae")
        self.disc_optim = self.state.add("discriminator", self.loss.discriminator, key="disc")
        self.disc_model = distributed.wrap_closure(self.loss.discriminator, self.dist)
        self.psnr_start = self.psnr()  # the VAE as built, before any resume: the run's starting point
        if cfg.run.resume != "never":
            self.state.resume()

    def _latent_norm(self) -> nn.BatchNorm2d:
        """REPA-E's latent BatchNorm (no affine, eps 1e-4) started at the VAE's per-channel statistics."""
        stats, c = self.vae.stats, self.vae.z_channels
        if stats.var.numel() != c:
            raise ConfigError(
                f"REPA-E normalises each latent channel: the VAE's statistics have shape "
                f"{tuple(stats.var.shape)}, expected one value per channel ({c}); compute them per channel"
            )
        norm = nn.BatchNorm2d(c, eps=1e-4, momentum=self.cfg.bn_momentum, affine=False)
        norm.running_var.copy_(stats.var.flatten())  # train_repae.py:203-208: 1 / scale²
        norm.running_mean.copy_(stats.mean.flatten() if stats.mean is not None else torch.zeros(c))
        if self.dist.world_size > 1 and self.device.type == "cuda":
            return nn.SyncBatchNorm.convert_sync_batchnorm(norm).to(self.device)  # as REPA-E (L210-212)
        if self.dist.world_size > 1:
            log.warning(
                "the latent BatchNorm normalises each process's batch alone on %s (SyncBatchNorm needs "
                "CUDA); REPA-E's statistics span the global batch",
                self.device,
            )
        return norm.to(self.device)

    def _vae_loss(self) -> losses.VAVAELoss:
        v = self.cfg.vae_loss
        loss = losses.VAVAELoss(
            lpips=losses.lpips_vgg(v.lpips_heads, v.lpips_trunk) if v.perceptual_weight > 0 else None,
            discriminator=losses.PatchGANDiscriminator(ndf=v.disc_channels, n_layers=v.disc_layers),
            perceptual_weight=v.perceptual_weight,
            kl_weight=v.kl_weight,
            disc_start=v.disc_start,
            disc_weight=v.disc_weight,
            adaptive_disc=False,
            pixel_mean=True,  # mean L1 and LPIPS (losses.py), not LDM's sum over pixels
        )
        loss.logvar.requires_grad_(False)  # REPA-E's logvar stays 0
        if loss.lpips is not None and v.lpips_range == "repa-e":
            loss.lpips = _DoubledRange(loss.lpips)
        return loss

    # -------------------------------------------------------------------------------- the loop
    def run(self) -> dict[str, Any]:
        t, state = self.cfg.training, self.state
        progress = state.step_log(self.logger, "repa-e")
        for batch in state.steps():  # the rest of the run; on SIGINT/SIGTERM: checkpoint, RunInterrupted
            images, y = batch["image"].to(self.device), batch["label"].to(self.device)
            x = images * 2 - 1  # B, 3, H, W in [-1, 1], the VAE's range
            with autocast(self.device, t.dtype):
                target = encoder_targets(self.encoder, images)  # B, D, h, w
                logs, z, draws = self._vae_step(x, y, target)
                logs |= self._discriminator_step(x)
                zn = self.norm.train()(z.detach())  # the running statistics move; no gradient to the VAE
                terms = self.model(zn, y, target, return_terms=True, **draws)
            logs["alignment"] = float(terms["alignment"].detach())  # read before the backward is queued
            logs["loss"] = state.optim.backward(terms["loss"], 1, state.step)
            logs |= state.update()  # the generator's (and projector's) step, then its EMA
            state.step += 1
            progress.update(state.step, logs, state.optim.lr)
            if t.checkpoint_due(state.step):
                state.save()
        return progress.close() | {"psnr_start": self.psnr_start}

    def _vae_step(self, x: torch.Tensor, y: torch.Tensor, target: torch.Tensor):
        """The VAE's losses + its weight × the frozen generator's alignment on its normalised sample;
        returns the logs, the sample ``z`` and the (noise, t) the generator's pass reuses."""
        self.vae.train()
        trainable = [
            p for p in [*self.repa.parameters(), *self.loss.discriminator.parameters()] if p.requires_grad
        ]
        self.repa.eval()
        for p in trainable:  # the alignment's and the GAN term's gradients reach the VAE only
            p.requires_grad_(False)
        try:
            out = self.vae_model(x)  # recon, posterior, z (sampled)
            z = out["z"]
            zn = self.norm.eval()(z)  # fixed statistics: no update from this pass
            draws = {
                "noise": torch.randn_like(zn),
                "t": self.generator.transport.sample_time(len(zn), zn.device),
            }
            align = self.repa.loss(zn, y, target, return_terms=True, **draws)["alignment"]
            vae_loss, logs = self.loss.generator_loss(x, out, self.vae, self.state.step)
            total = vae_loss + self.cfg.vae_align_weight * align
            logs = {f"vae_{k}": v for k, v in logs.items()} | {"vae_alignment": float(align.detach())}
            self.vae_optim.backward(total, 1, self.state.step, what="VAE loss")
            logs |= {f"vae_{k}": v for k, v in self.vae_optim.step().items()}
        finally:
            self.repa.train()
            for p in trainable:
                p.requires_grad_(True)
        self.fake = out["recon"].detach()
        return logs, z, draws

    def _discriminator_step(self, x: torch.Tensor) -> dict[str, float]:
        if not losses.gate(self.state.step, self.loss.disc_start):
            return {}
        loss = self.disc_model(self.loss.discriminator_loss, x, self.fake, self.state.step)
        share = self.disc_optim.backward(loss, 1, self.state.step, what="discriminator loss")
        return {"d_loss": share} | {f"d_{k}": v for k, v in self.disc_optim.step().items()}

    # -------------------------------------------------------------------------------- evaluation
    @torch.no_grad()
    def psnr(self) -> float:
        """The VAE's reconstruction PSNR (posterior means) on held-out images: the digits' test split, or
        the first training images."""
        d = self.cfg.data
        held = Digits("test", d.image_size) if d.name == "digits" else self.dataset
        n = min(self.cfg.psnr_images, len(held))
        images = torch.stack([held[i]["image"] for i in range(n)]).to(self.device)
        metric, was_training = PSNR(), self.vae.training
        self.vae.eval()
        for chunk in images.split(64):
            metric.update(self.vae.decode(self.vae.encode(chunk, sample=False)).clamp(0, 1), chunk)
        self.vae.train(was_training)
        return float(metric.compute())

    def tuned_stats(self) -> LatentStats:
        """The latent BatchNorm's running statistics as the tokenizer's latent statistics."""
        c = self.vae.z_channels
        return LatentStats(
            self.norm.running_var.detach().view(c, 1, 1).cpu(),
            self.norm.running_mean.detach().view(c, 1, 1).cpu(),
            eps=self.norm.eps,
        )

    def save(self) -> None:
        psnr_end = self.psnr()
        log.info("VAE reconstruction PSNR: %.2f dB at the start, %.2f dB now", self.psnr_start, psnr_end)
        if self.dist.is_main:
            self.vae.set_stats(self.tuned_stats())
            self.vae.save(self.run_dir / "tokenizer.safetensors")  # and its statistics beside it
            ema = self.state.eval_model()
            save_checkpoint(ema.state_dict(), self.run_dir / "generator.safetensors", self.gen_config)
            write_report(
                self.run_dir / "eval.json",
                {"psnr_start": self.psnr_start, "psnr_end": psnr_end, "step": self.state.step},
            )
        distributed.barrier()

    def cleanup(self) -> None:
        if hasattr(self, "logger"):  # open_run may have refused the run folder (run.resume)
            self.logger.close()
        distributed.cleanup()
