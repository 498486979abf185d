"""train-tokenizer: an autoencoder the seed pipelines decode through — VA-VAE, an RAE decoder or VQGAN.

    latentforge run train-tokenizer --config tiny-train-vavae
    torchrun --nproc-per-node 8 -m latentforge_runner.cli run train-tokenizer \\
        data.root=/data/imagenet/train eval.root=/data/imagenet/val --config vavae-f16d32-train

``loss.name`` picks the objective of the tokenizers package: ``vavae`` (``VAVAELoss``: L1 + LPIPS +
KL + VF loss against a frozen foundation model + adaptive-weight PatchGAN), ``rae`` (``RAELoss``:
frozen encoder, decoder trained with L1 + LPIPS + DINO-discriminator GAN; the latent noise is the
tokenizer's ``noise_tau``) or ``vqgan`` (``VQGANLoss``: codebook + commitment + L1/LPIPS/GAN).  Each
step updates the autoencoder, then the discriminator (the loop below; DDP, accumulation and exact
resume through the training kit).  VA-VAE and VQGAN gates count steps, RAE's count epochs, as in their
code.  Every ``eval.every`` steps the EMA (or live) weights reconstruct a held-out set: PSNR, SSIM and
rFID go to TensorBoard, a grid (originals over reconstructions) to ``eval/``, the numbers to
``eval.json``; the trained tokenizer is written to ``tokenizer.safetensors`` in its own format.
"""

from __future__ import annotations

import inspect
import json
import logging
from typing import Any, Literal

import attrs
import torch
from einops import rearrange
from PIL import Image

from latentforge_core.checkpoint import load_checkpoint, load_into
from latentforge_core.device import autocast, rng_state, set_rng_state
from latentforge_metrics.reconstruction import PSNR, SSIM
from latentforge_runner import distributed
from latentforge_runner.config import (
    Component,
    ConfigError,
    Settings,
    component,
    setting,
    settings,
)
from latentforge_runner.data import DataSettings, Digits, build_dataset, build_images
from latentforge_runner.reports import write_report
from latentforge_runner.run_folder import RunSettings, open_run
from latentforge_runner.training import (
    TrainingSettings,
    TrainState,
    split_batch,
    sync_contexts,
)
from latentforge_tokenizers import losses
from latentforge_tokenizers.discriminators import DiffAug, DinoDiscriminator, dino_trunk
from latentforge_tokenizers.losses import gate
from latentforge_tokenizers.rae import RAE
from latentforge_tokenizers.vavae import VAVAE
from latentforge_tokenizers.vqgan import VQGAN, VQGANLoss

log = logging.getLogger("latentforge")

# loss name → (its class, the tokenizer class it trains); objects the recipe builds are not params.
LOSSES = {"vavae": (losses.VAVAELoss, VAVAE), "rae": (losses.RAELoss, RAE), "vqgan": (VQGANLoss, VQGAN)}
BUILT = ("vf_encoder", "lpips", "discriminator")


# ------------------------------------------------------------------------------------------------
# Settings
# ------------------------------------------------------------------------------------------------
@settings
class DiscriminatorSettings(Settings):
    """taming's PatchGAN (VA-VAE, VQGAN) or RAE's frozen-DINO discriminator with trainable heads."""

    kind: Literal["patchgan", "dino", "none"] = "patchgan"  # none: no GAN loss (not for vavae)
    ndf: int = setting(64, ge=1)  # patchgan: channels of the first layer
    n_layers: int = setting(3, ge=1)  # patchgan: strided conv layers
    recipe: str = "S_8"  # dino: the DINO trunk (S_8, S_16, B_16)
    trunk_weights: str | None = None  # dino: the DINO ``.pth`` (random trunk when None)
    trunk: dict = attrs.field(factory=dict)  # dino: VisionTransformer overrides (a tiny trunk for tests)
    input_size: int = setting(224, ge=1)  # dino: images are resized to this before the trunk
    key_depths: tuple[int, ...] = setting((2, 5, 8, 11), ge=0)  # dino: trunk blocks whose tokens feed heads
    kernel_size: int = setting(9, ge=1)  # dino: the heads' convolution width
    augment: bool = True  # dino: DiffAug (translation + colour) on real and fake
    weights: str | None = None  # start from a discriminator.safetensors of an earlier run (staged training)


@settings
class LossSettings(Settings):
    name: Literal["vavae", "rae", "vqgan"]  # the tokenizer family's loss
    params: dict = attrs.field(factory=dict)  # keyword arguments of VAVAELoss / RAELoss / VQGANLoss
    lpips_heads: str | None = None  # LPIPS linear heads (default: the installed lpips package's file)
    lpips_trunk: str | None = None  # torchvision vgg16 weights for the LPIPS trunk
    vf_encoder: Component | None = component("encoders", default=None)  # VA-VAE's frozen foundation model
    discriminator: DiscriminatorSettings = DiscriminatorSettings()  # the GAN's discriminator

    def __attrs_post_init__(self):
        cls = LOSSES[self.name][0]
        accepted = [p for p in inspect.signature(cls).parameters if p not in BUILT]
        for key in self.params:
            if key not in accepted:
                raise ConfigError(
                    f"loss.params.{key}: {cls.__name__} takes no parameter {key!r} (set by the recipe or "
                    f"unknown); it accepts {', '.join(accepted)}"
                )
        if self.name == "vavae" and self.discriminator.kind == "none":
            raise ConfigError(
                "loss.discriminator.kind 'none' is not available for vavae (VAVAELoss has a GAN)"
            )
        if self.name != "vavae" and self.vf_encoder is not None:
            raise ConfigError(f"loss.vf_encoder is VA-VAE's alignment target; loss {self.name!r} has none")


@settings
class TokenizerEvalSettings(Settings):
    every: int = setting(0, ge=0)  # steps between evaluations (0: only at the end)
    root: str | None = None  # held-out images (folder); the digits use their test split
    num_images: int = setting(1000, ge=1)  # held-out images reconstructed at each evaluation
    batch_size: int = setting(32, ge=1)  # images encoded at once
    grid: int = setting(8, ge=1)  # images in the reconstruction grid
    rfid: Component | None = component("metrics", default=None, injected=("device",))  # rfid or fd-dinov2


@settings
class TrainTokenizerSettings(Settings):
    run: RunSettings = RunSettings(output_dir="runs/train-tokenizer")  # where and on what it runs
    data: DataSettings = DataSettings()  # the training images
    tokenizer: Component = component("tokenizers")  # the tokenizer to train (VA-VAE, RAE decoder, VQGAN)
    loss: LossSettings  # the reconstruction, perceptual and GAN losses
    training: TrainingSettings = TrainingSettings(  # optimisation of the tokenizer (and discriminator)
        lr=1e-4, betas=(0.5, 0.9), ema_decay=None, checkpoint_every=5000
    )
    eval: TokenizerEvalSettings = TokenizerEvalSettings()  # held-out reconstructions and rFID


# ------------------------------------------------------------------------------------------------
# The recipe
# ------------------------------------------------------------------------------------------------
class TrainTokenizerRecipe:
    Settings = TrainTokenizerSettings

    def __init__(self, config: TrainTokenizerSettings):
        self.cfg = config

    def setup(self) -> None:
        cfg = self.cfg
        self.run_dir, self.dist, self.logger = open_run("train-tokenizer", cfg)
        self.device = self.dist.device
        self.train_data, num_items = self._train_data()
        self.heldout = self._heldout()
        torch.manual_seed(cfg.run.seed)  # every process builds the same initial weights
        self.tokenizer = cfg.tokenizer.build("tokenizers")
        self._check_tokenizer()
        self.loss = self._build_loss().to(self.device)
        self.tokenizer.to(self.device)
        # its GAN and eval steps call the tokenizer outside this entry: DDP only, no FSDP
        self.model = distributed.wrap(
            self.tokenizer, self.dist, compile=cfg.training.compile, training=cfg.training, sharding=False
        )
        self.state = TrainState(
            self.tokenizer,
            cfg.training,
            data=self.train_data,
            num_items=num_items,
            dist=self.dist,
            run_dir=self.run_dir,
            config={"name": cfg.tokenizer.name, **cfg.tokenizer.params},
        )
        self.disc = self.loss.discriminator
        if self.disc is not None:  # its own AdamW and schedule, advanced on its updates only (as RAE's)
            self.disc_optim = self.state.add("discriminator", self.disc, key="disc")
            self.disc_model = distributed.wrap_closure(self.disc, self.dist)
        self.rfid = None if cfg.eval.rfid is None else cfg.eval.rfid.build("metrics", device=self.device)
        encode_args = inspect.signature(self.tokenizer.encode).parameters
        self.encode_kwargs = {"sample": False} if "sample" in encode_args else {}  # VA-VAE: the mean
        self.history: list[dict[str, float]] = []
        if cfg.run.resume != "never" and self.state.resume():  # open_run has checked the folder
            self._load_history()

    # ---------------------------------------------------------------------------- building
    def _train_data(self):
        d = self.cfg.data
        dataset = build_images(d, crop=d.crop, resize=d.resize, flip=d.flip, seed=self.cfg.training.seed)
        n = len(dataset) if d.limit is None else min(d.limit, len(dataset))
        if isinstance(dataset, Digits):  # in memory: gather batches without a DataLoader
            return dataset.batch, n
        return (dataset if n == len(dataset) else torch.utils.data.Subset(dataset, range(n))), n

    def _heldout(self):
        d, e = self.cfg.data, self.cfg.eval
        if e.root is not None:
            dataset = build_dataset("folder", image_size=d.image_size, root=e.root)
        elif d.name == "digits":
            dataset = Digits("test", d.image_size)
        else:
            raise ConfigError("eval.root is required with data.name 'folder': a folder of held-out images")
        return torch.utils.data.Subset(dataset, range(min(e.num_images, len(dataset))))

    def _check_tokenizer(self) -> None:
        name, tok = self.cfg.loss.name, self.tokenizer
        expected = LOSSES[name][1]
        if not isinstance(tok, expected):
            raise ConfigError(
                f"loss.name {name!r} trains a {expected.__name__}, but tokenizer {self.cfg.tokenizer.name!r} "
                f"is a {type(tok).__name__}"
            )
        size = self.cfg.data.image_size
        if isinstance(tok, RAE) and size != tok.preprocessing.input_size:
            raise ConfigError(
                f"data.image_size {size} differs from the RAE decoder's output size "
                f"{tok.preprocessing.input_size}; set data.image_size={tok.preprocessing.input_size}"
            )

    def _build_loss(self) -> torch.nn.Module:
        s = self.cfg.loss
        params = dict(s.params)
        cls = LOSSES[s.name][0]
        if params.get("perceptual_weight", 1.0) > 0:
            params["lpips"] = losses.lpips_vgg(s.lpips_heads, s.lpips_trunk)
        if s.vf_encoder is not None:
            params["vf_encoder"] = s.vf_encoder.build("encoders")
        disc = self._build_discriminator()
        if disc is not None or s.name != "vavae":
            params["discriminator"] = disc
        loss = cls(**params)
        if isinstance(loss, losses.VAVAELoss):
            loss.logvar.requires_grad_(False)  # LDM's optimiser leaves logvar out: it stays at its init
            no_vf = loss.vf_encoder is None or loss.vf_weight <= 0
            if no_vf and self.tokenizer.linear_proj is not None:
                self.tokenizer.linear_proj.requires_grad_(False)  # no VF loss: no gradient reaches it
        return loss

    def _build_discriminator(self) -> torch.nn.Module | None:
        d = self.cfg.loss.discriminator
        if d.kind == "none":
            return None
        if d.kind == "patchgan":
            disc = losses.PatchGANDiscriminator(ndf=d.ndf, n_layers=d.n_layers)
        else:
            disc = DinoDiscriminator(
                dino_trunk(d.recipe, d.trunk_weights, **d.trunk),
                input_size=d.input_size,
                key_depths=d.key_depths,
                kernel_size=d.kernel_size,
                augment=DiffAug() if d.augment else None,
            )
        if d.weights is not None:
            load_into(disc, load_checkpoint(d.weights)[0])
        return disc

    # ---------------------------------------------------------------------------- the loop
    def run(self) -> dict[str, Any]:
        t, state = self.cfg.training, self.state
        gen_loss, disc_loss = self._losses()
        progress = state.step_log(self.logger, self.cfg.loss.name)  # a bar or log lines; averages logged
        if self.cfg.eval.every and state.step == 0:
            self.evaluate(0)  # the starting point of the curves
        self.tokenizer.train()
        for batch in state.steps():  # the rest of the run; on SIGINT/SIGTERM: checkpoint, RunInterrupted
            parts = split_batch(batch, t.grad_accum)  # the generator pass leaves its fakes in them
            logs: dict[str, float] = {}
            self._discriminator_trainable(False)  # the GAN term reaches only the autoencoder
            for part, sync in zip(parts, sync_contexts(self.model, self.dist, len(parts)), strict=True):
                with sync:
                    with autocast(self.device, t.dtype):
                        loss, extra = _with_logs(gen_loss(part))
                    _accumulate(
                        logs, "", loss, extra, len(parts), state.optim.backward(loss, len(parts), state.step)
                    )
            logs |= state.update()  # optimiser step, LR schedule, EMA
            self._discriminator_trainable(True)
            if self.disc is not None:
                logs |= self._discriminator_step(parts, disc_loss)
            state.step += 1
            progress.update(state.step, logs, state.optim.lr)
            if self.cfg.eval.every and state.step % self.cfg.eval.every == 0:
                self.evaluate(state.step)
            if t.checkpoint_due(state.step):
                state.save()  # checkpoints/<step>/: weights, discriminator, optimisers, data position, RNG
        return progress.close()

    def _discriminator_step(self, parts: list[dict[str, Any]], disc_loss) -> dict[str, float]:
        """One discriminator update on the step's micro-batches (none while its gate is closed)."""
        t, logs = self.cfg.training, {}
        for part, sync in zip(parts, sync_contexts(self.disc_model, self.dist, len(parts)), strict=True):
            with sync:
                with autocast(self.device, t.dtype):
                    out = self.disc_model(disc_loss, part)
                if out is None:
                    return {}
                loss, extra = _with_logs(out)
                share = self.disc_optim.backward(loss, len(parts), self.state.step, what="discriminator loss")
                _accumulate(logs, "d_", loss, extra, len(parts), share)
        return logs | {f"d_{k}": v for k, v in self.disc_optim.step().items()}

    def _discriminator_trainable(self, flag: bool) -> None:
        for p in self.disc_optim.params if self.disc is not None else ():
            p.requires_grad_(flag)

    # ---------------------------------------------------------------------------- losses per family
    def _losses(self):
        """(autoencoder loss, discriminator loss) of a micro-batch, each ``(loss, logs)``; the
        discriminator's returns None while its gate is closed.  Fakes travel in the micro-batch."""
        name, lf, state, ae = self.cfg.loss.name, self.loss, self.state, self.tokenizer

        if name == "vavae":

            def gen(batch):
                x = batch["image"] * 2 - 1  # B 3 H W in [-1, 1]
                out = self.model(x)
                batch["fake"] = out["recon"].detach()
                return lf.generator_loss(x, out, ae, state.step)

            def disc(batch):
                if not gate(state.step, lf.disc_start):
                    return None
                return lf.discriminator_loss(batch["image"] * 2 - 1, batch["fake"], state.step)

        elif name == "rae":

            def gen(batch):
                recon = self.model(batch["image"])  # noised latents in train mode
                last = ae.decoder.decoder_pred.weight
                return lf.generator_loss(batch["image"], recon, last, state.batches.epoch)

            def disc(batch):
                epoch = state.batches.epoch
                if lf.discriminator is None or not gate(epoch, lf.disc_update_start):
                    return None
                with torch.no_grad():  # RAE regenerates the fakes in eval mode: no latent noise
                    fake = ae.eval()(batch["image"])
                ae.train()
                return lf.discriminator_loss(batch["image"], fake, epoch)

        else:

            def gen(batch):
                recon, qloss, _ = self.model(batch["image"])
                batch["fake"] = recon.detach()
                return lf.generator_loss(batch["image"], recon, qloss, ae, state.step)

            def disc(batch):
                if lf.discriminator is None or not gate(state.step, lf.disc_start):
                    return None
                return lf.discriminator_loss(batch["image"], batch["fake"], state.step)

        return gen, disc

    # ---------------------------------------------------------------------------- evaluation
    @torch.no_grad()
    def evaluate(self, step: int) -> dict[str, float]:
        """PSNR/SSIM on the 8-bit reconstructions of the held-out set (and rFID), logged and saved."""
        state = rng_state()  # evaluation must not move the training RNG
        model = self.state.eval_model()
        psnr, ssim = PSNR(), SSIM()
        if self.rfid is not None:
            self.rfid.reset()  # a frozen reference (the held-out features) is kept
        shard = list(range(self.dist.rank, len(self.heldout), self.dist.world_size))
        first = None
        for start in range(0, len(shard), self.cfg.eval.batch_size):
            items = [self.heldout[i] for i in shard[start : start + self.cfg.eval.batch_size]]
            items = [it["image"] for it in items if "error" not in it]  # unreadable images are skipped
            if not items:
                continue
            images = torch.stack(items).to(self.device)
            recon = model.decode(model.encode(images, **self.encode_kwargs)).clamp(0, 1)
            recon8, target8 = ((t * 255).round().to(torch.uint8).cpu() for t in (recon, images))
            psnr.update(recon8, target8)
            ssim.update(recon8, target8)
            if self.rfid is not None:
                if self.rfid.reference is None:
                    self.rfid.update(target8.float() / 255, real=True)
                self.rfid.update(recon8.float() / 255)
            if first is None:
                first = (target8[: self.cfg.eval.grid], recon8[: self.cfg.eval.grid])
        result = {"step": step, "psnr": psnr.compute(), "ssim": ssim.compute()}
        if self.rfid is not None:
            if self.rfid.reference is None:  # freeze the held-out statistics (a copy: reset clears real)
                real = self.rfid.real.gathered()
                self.rfid.set_reference((real.mu, real.sigma))
            result[self.cfg.eval.rfid.name] = float(self.rfid.compute())  # rfid, fd-dinov2, …
        set_rng_state(state)
        self.tokenizer.train()
        self._record(result, first)
        return result

    def _record(self, result: dict[str, float], first) -> None:
        self.history = [h for h in self.history if h["step"] != result["step"]] + [result]
        if not self.dist.is_main:
            return
        step = result["step"]
        self.logger.scalars({f"eval/{k}": v for k, v in result.items() if k != "step"}, step)
        grid = rearrange(torch.stack(first), "two b c h w -> c (two h) (b w)")  # originals over recons
        self.logger.images("eval/reconstructions", grid.float() / 255, step)
        (self.run_dir / "eval").mkdir(exist_ok=True)
        Image.fromarray(grid.permute(1, 2, 0).numpy()).save(self.run_dir / "eval" / f"grid_{step:08d}.png")
        report = {"tokenizer": self.cfg.tokenizer.name, "final": result, "history": self.history}
        write_report(self.run_dir / "eval.json", report)
        fid = self.cfg.eval.rfid.name if self.rfid is not None else None
        log.info(
            "step %d: PSNR %.2f dB, SSIM %.4f%s",
            step,
            result["psnr"],
            result["ssim"],
            f", {fid} {result[fid]:.3f}" if fid else "",
        )

    def _load_history(self) -> None:
        path = self.run_dir / "eval.json"
        if path.is_file():
            steps = json.loads(path.read_text())["history"]
            self.history = [h for h in steps if h["step"] <= self.state.step]

    # ---------------------------------------------------------------------------- protocol
    def save(self) -> None:
        if not self.history or self.history[-1]["step"] != self.state.step:
            self.evaluate(self.state.step)
        if self.dist.is_main:
            self.state.eval_model().save(self.run_dir / "tokenizer.safetensors")
        self.tokenizer.train()
        distributed.barrier()

    def cleanup(self) -> None:
        if hasattr(self, "logger"):  # open_run may have refused the run folder (run.resume)
            self.logger.close()
        distributed.cleanup()


def _accumulate(logs: dict[str, float], prefix: str, loss, extra, parts: int, share: float) -> None:
    """Add one micro-batch's loss share and its extra scalars (each / ``parts``) to the step's logs."""
    logs[f"{prefix}loss"] = logs.get(f"{prefix}loss", 0.0) + share
    for k, v in extra.items():
        value = float(v.detach() if isinstance(v, torch.Tensor) else v) / parts
        logs[f"{prefix}{k}"] = logs.get(f"{prefix}{k}", 0.0) + value


def _with_logs(out) -> tuple[torch.Tensor, dict[str, Any]]:
    """A loss function's ``loss`` or ``(loss, logs)`` as ``(loss, logs)``."""
    return out if isinstance(out, tuple) else (out, {})
