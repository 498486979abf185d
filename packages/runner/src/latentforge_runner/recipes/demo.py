"""The demo: one whole representation-aligned pipeline on scikit-learn's digits, on a CPU, in minutes.

    latentforge run demo                       # default config, nothing downloaded
    latentforge run demo generator_training.steps=6000 run.output_dir=runs/demo-long

Stages (each a training loop with its own checkpoints, so an interrupted demo resumes):
  1. evaluator  — a small CNN trained on the digits; it only *measures* (never trains the pipeline);
  2. encoder    — a tiny ViT (latentforge_encoders) trained briefly as a digit classifier, then frozen:
                  the representation encoder no one can download here;
  3. decoder    — an RAE (latentforge_tokenizers): a ViT decoder trained on the frozen encoder's features;
  4. generator  — latent statistics, then a DiT-family FlowGenerator (latentforge_generators) on the
                  normalised latents, class-conditional;
  5. report     — 10 samples per class in ``samples.png``; the evaluator's accuracy on generated digits
                  (asked class vs predicted) and the Fréchet distance of its features, beside the same
                  distance for held-out real digits (the floor) and for noise (the ceiling).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from PIL import Image
from torch import nn

from latentforge_core.device import autocast
from latentforge_runner import distributed
from latentforge_runner.config import Component, Settings, component, sampler_block, setting, settings
from latentforge_runner.data import Digits
from latentforge_runner.reports import write_report
from latentforge_runner.run_folder import RunSettings, open_run
from latentforge_runner.training import TrainingSettings, TrainState, micro_batches

log = logging.getLogger("latentforge")


# ------------------------------------------------------------------------------------------------
# Settings (the defaults are the demo's config)
# ------------------------------------------------------------------------------------------------
def _quick(**kw: Any) -> TrainingSettings:
    base = dict(
        lr=2e-3,
        betas=(0.9, 0.99),
        ema_decay=None,
        log_every=25,
        checkpoint_every=10**9,
        warmup_steps=20,
        schedule="cosine",
        final_lr=1e-5,
    )
    return TrainingSettings(**{**base, **kw})


@settings
class EvaluatorSettings(Settings):
    """The judge: trained on the digits' train split only, scored on the held-out split."""

    training: TrainingSettings = _quick(steps=800, batch_size=64, lr=3e-3)  # the judge's own training
    samples_per_class: int = setting(36, ge=1)  # 360 generated digits, as many as the held-out real ones
    sampler: dict = sampler_block(  # keyword arguments of generator.sample for the judged digits
        "generator", factory=lambda: {"sampler": "heun", "steps": 20, "cfg_scale": 4.0}
    )


@settings
class DecoderSettings(Settings):
    """The RAE decoder (latentforge_tokenizers' RAEDecoder) on the frozen encoder's features."""

    size: str = "test-tiny"  # a key of latentforge_tokenizers.rae.RAE_DECODERS
    noise_tau: float = setting(0.3, ge=0)  # RAE's noise augmentation of the latents while the decoder trains
    training: TrainingSettings = _quick(steps=600, batch_size=64)  # the decoder's training


@settings
class DemoSettings(Settings):
    # One thread: the demo's small matrices gain little from two, and lose much when the cores are busy.
    run: RunSettings = RunSettings(output_dir="runs/demo", threads=1)  # where and on what it runs
    image_size: int = setting(16, ge=1)  # the 8×8 digits, upsampled
    encoder: Component = component(  # the representation encoder, trained first on the digits
        "encoders",
        default=Component(name="test-vit-tiny", params={"features": "rae", "image_size": 16, "depth": 2}),
    )
    encoder_training: TrainingSettings = _quick(steps=300, batch_size=64)  # the encoder's training
    decoder: DecoderSettings = DecoderSettings()  # the pixel decoder of the encoder's features
    generator: Component = component(
        "generators",
        injected=("in_channels", "input_size", "num_classes"),
        # RAE's DiT with a wide DDT head, tiny size; no dimension shift (sqrt(1024/4096) would be 0.5)
        default=Component(name="test-ditdh", params={"transport": {"shift": 1.0}}),
    )
    generator_training: TrainingSettings = _quick(  # the generator's training
        steps=3000, batch_size=64, lr=3e-3, ema_decay=0.995, warmup_steps=50, grad_clip=1.0
    )
    # DiT's class table starts at N(0, 0.02) behind zero-initialised adaLN, so class conditioning forms
    # over ~10^5 steps; the demo has ~10^3. A unit-variance table forms it within a few hundred.
    class_embedding_std: float | None = setting(1.0, gt=0)  # None: the generator's own initialisation
    evaluator: EvaluatorSettings = EvaluatorSettings()  # the judge that scores the samples


# ------------------------------------------------------------------------------------------------
# The evaluator: a small CNN whose penultimate features define the Fréchet distance
# ------------------------------------------------------------------------------------------------
class DigitEvaluator(nn.Module):
    """Conv net on [0, 1] ``[B, 3, 16, 16]`` digits → 64-d features → 10 logits."""

    def __init__(self, width: int = 32, dim: int = 64):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1), nn.GELU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.GELU(),
            nn.Conv2d(2 * width, dim, 3, stride=2, padding=1), nn.GELU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )  # fmt: skip
        self.head = nn.Linear(dim, 10)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))  # B, 10


class Classifier(nn.Module):
    """The encoder being trained as a digit classifier: a linear head on its mean patch token."""

    def __init__(self, encoder: nn.Module, num_classes: int = 10):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.embed_dim, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder.features(images, output="pooled"))  # B, 10


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to feature sets ``a`` [N, D] and ``b`` [M, D]."""
    from latentforge_metrics.stats import GaussianStats, stats_distance

    fitted = []
    for feats in (a, b):
        stats = GaussianStats(feats.shape[1])
        stats.update(feats)
        fitted.append(stats)
    return stats_distance(*fitted)


# ------------------------------------------------------------------------------------------------
# The recipe
# ------------------------------------------------------------------------------------------------
class DemoRecipe:
    """Evaluator → encoder → RAE decoder → latent stats → flow generator → samples and report."""

    Settings = DemoSettings

    def __init__(self, config: DemoSettings):
        self.cfg = config

    def setup(self) -> None:
        self.start = time.perf_counter()
        c = self.cfg  # each stage's checkpoints live in <run>/<stage>/checkpoints
        stages = {
            "evaluator": c.evaluator.training,
            "encoder": c.encoder_training,
            "decoder": c.decoder.training,
            "generator": c.generator_training,
        }
        self.run_dir, self.dist, self.logger = open_run("demo", c, stages=stages)
        self.device = self.dist.device
        self.train = Digits("train", self.cfg.image_size)
        self.test = Digits("test", self.cfg.image_size)
        self.report: dict[str, Any] = {}

    # -------------------------------------------------------------------------------- stages
    def _fit(self, stage: str, model: nn.Module, t: TrainingSettings, fetch, loss_fn, **kw) -> TrainState:
        """Train ``model`` on ``loss_fn(model, batch)`` for ``t.steps``; the run of one stage lives in
        ``<run>/<stage>/``.  ``kw``: ``params`` (what to optimise) and ``method`` (``loss``)."""
        model.to(self.device)
        entry = distributed.wrap(model, self.dist, method=kw.get("method", "forward"), compile=t.compile)
        state = TrainState(
            model,
            t,
            data=fetch,
            num_items=len(self.train),
            dist=self.dist,
            run_dir=self.run_dir / stage,
            config={"name": f"demo-{stage}"},
            params=kw.get("params"),
        )
        if self.cfg.run.resume != "never":  # open_run has checked the folder may be resumed
            state.resume()
        progress = state.step_log(self.logger, stage)
        model.train()
        for batch in state.steps():  # on SIGINT/SIGTERM: a checkpoint, then RunInterrupted
            logs = {"loss": 0.0}
            for part, sync in micro_batches(batch, t.grad_accum, entry, self.dist):
                with sync:
                    with autocast(self.device, t.dtype):
                        loss = loss_fn(entry, part)
                    logs["loss"] += state.optim.backward(loss, t.grad_accum, state.step)
            logs |= state.update()
            state.step += 1
            progress.update(state.step, logs, state.optim.lr)
            if t.checkpoint_due(state.step):
                state.save()
        progress.close()
        return state

    def _images(self, indices) -> dict[str, torch.Tensor]:
        batch = self.train.batch(indices)
        return {"image": batch["image"].to(self.device), "label": batch["label"].to(self.device)}

    def train_evaluator(self) -> DigitEvaluator:
        torch.manual_seed(self.cfg.run.seed)
        model = DigitEvaluator()

        def loss_fn(m, b):
            shifted = torch.roll(b["image"], shifts=tuple(torch.randint(-1, 2, (2,)).tolist()), dims=(2, 3))
            return F.cross_entropy(m(shifted), b["label"])

        model = self._fit("evaluator", model, self.cfg.evaluator.training, self._images, loss_fn).model.eval()
        self.report["evaluator_accuracy_heldout"] = _accuracy(
            model, self.test.images, self.test.labels, self.device
        )
        return model

    def train_encoder(self) -> nn.Module:
        torch.manual_seed(self.cfg.run.seed)
        encoder = self.cfg.encoder.build("encoders", frozen=False)
        classifier = Classifier(encoder)
        state = self._fit(
            "encoder",
            classifier,
            self.cfg.encoder_training,
            self._images,
            lambda m, b: F.cross_entropy(m(b["image"]), b["label"]),
        )
        classifier = state.model.eval()
        self.report["encoder_accuracy_heldout"] = _accuracy(
            classifier, self.test.images, self.test.labels, self.device
        )
        encoder = classifier.encoder.requires_grad_(False).eval()
        encoder.frozen = True
        return encoder

    def train_decoder(self, encoder: nn.Module) -> nn.Module:
        from latentforge_tokenizers.rae import RAE, RAE_DECODERS, RAEDecoder

        torch.manual_seed(self.cfg.run.seed)
        c, h, w = encoder.feature_shape()
        decoder = RAEDecoder(
            latent_dim=c,
            patch_size=self.cfg.image_size // h,
            num_patches=h * w,
            **RAE_DECODERS[self.cfg.decoder.size],
        )
        rae = RAE(encoder, decoder, noise_tau=self.cfg.decoder.noise_tau)
        state = self._fit(
            "decoder",
            rae,
            self.cfg.decoder.training,
            self._images,
            lambda m, b: F.mse_loss(m(b["image"]), b["image"]),
            params=decoder.parameters(),
        )
        rae = state.model.eval()
        with torch.no_grad():
            recon = torch.cat(
                [rae.decode(rae.encode(x.to(self.device))).cpu() for x in self.test.images.split(256)]
            )
        mse = (recon - self.test.images).pow(2).flatten(1).mean(1)
        self.report["decoder_psnr_heldout"] = float((10 * torch.log10(1 / mse.clamp_min(1e-10))).mean())
        return rae

    def train_generator(self, rae: nn.Module) -> nn.Module:
        rae.compute_stats([x.to(self.device) for x in self.train.images.split(256)])  # per element, as RAE
        with torch.no_grad():
            z = torch.cat(
                [rae.encode(x.to(self.device), normalize=True) for x in self.train.images.split(256)]
            )
        labels = self.train.labels.to(self.device)
        torch.manual_seed(self.cfg.run.seed)
        c, h, w = z.shape[1:]
        generator = self.cfg.generator.build("generators", in_channels=c, input_size=h, num_classes=10)
        if self.cfg.class_embedding_std is not None:
            nn.init.normal_(
                generator.backbone.y_embedder.embedding_table.weight, std=self.cfg.class_embedding_std
            )
        state = self._fit(
            "generator",
            generator,
            self.cfg.generator_training,
            lambda idx: {"x": z[idx], "y": labels[idx]},
            lambda m, b: m(b["x"], b["y"]),
            method="loss",
        )
        rae.stats.save(self.run_dir / "generator" / "latent_stats.safetensors")
        return state.eval_model()

    # -------------------------------------------------------------------------------- run
    def run(self) -> dict[str, Any]:
        evaluator = self.train_evaluator()
        encoder = self.train_encoder()
        rae = self.train_decoder(encoder)
        generator = self.train_generator(rae)
        images, asked = self.sample(generator, rae)
        self.score(evaluator, images, asked)
        return self.report

    @torch.no_grad()
    def sample(self, generator, rae) -> tuple[torch.Tensor, torch.Tensor]:
        per_class = self.cfg.evaluator.samples_per_class
        asked = torch.arange(10).repeat_interleave(per_class)
        gen = torch.Generator(device=self.device).manual_seed(self.cfg.run.seed)
        images = []
        for y in asked.split(128):
            z = generator.sample(y.to(self.device), generator=gen, **self.cfg.evaluator.sampler)
            images.append(rae.decode(z, normalize=True).cpu())
        images = torch.cat(images)
        self.grid = _grid(images.view(10, per_class, *images.shape[1:])[:, :10])
        return images, asked

    @torch.no_grad()
    def score(self, evaluator, images, asked) -> None:
        feats = lambda x: torch.cat([evaluator.features(b.to(self.device)).cpu() for b in x.split(256)])  # noqa: E731
        logits = torch.cat([evaluator(b.to(self.device)).cpu() for b in images.split(256)])
        reference = feats(self.train.images)
        noise = torch.rand(images.shape, generator=torch.Generator().manual_seed(self.cfg.run.seed))
        self.report.update(
            generated_accuracy=float((logits.argmax(1) == asked).float().mean()),
            fd_generated=frechet_distance(feats(images), reference),
            fd_real_heldout=frechet_distance(feats(self.test.images), reference),
            fd_noise=frechet_distance(feats(noise), reference),
            num_generated=len(images),
        )

    def save(self) -> None:
        if not self.dist.is_main:
            return
        self.report["seconds"] = round(time.perf_counter() - self.start, 1)
        Image.fromarray(self.grid).save(self.run_dir / "samples.png")
        self.logger.images("demo/samples", torch.from_numpy(self.grid).permute(2, 0, 1).float() / 255, 0)
        write_report(self.run_dir / "report.json", self.report)
        text = format_report(self.report, self.run_dir)
        (self.run_dir / "report.md").write_text(text)
        print(text)

    def cleanup(self) -> None:
        if hasattr(self, "logger"):  # open_run may have refused the run folder (run.resume)
            self.logger.close()
        distributed.cleanup()


# ------------------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------------------
@torch.no_grad()
def _accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, device: torch.device) -> float:
    with autocast(device):
        pred = torch.cat([model(b.to(device)).argmax(1).cpu() for b in images.split(256)])
    return float((pred == labels).float().mean())


def _grid(images: torch.Tensor) -> np.ndarray:
    """``[rows, cols, 3, H, W]`` in [0, 1] → a uint8 ``[rows·(H+2), cols·(W+2), 3]`` grid, upscaled 4×."""
    padded = F.pad(images, (1, 1, 1, 1), value=0.3)
    grid = rearrange(padded, "r c ch h w -> (r h) (c w) ch")
    grid = grid.repeat_interleave(4, 0).repeat_interleave(4, 1)
    return (grid * 255).round().clamp(0, 255).byte().numpy()


def format_report(report: dict[str, Any], run_dir: Path) -> str:
    r = report
    return "\n".join([
        "# latentforge demo report (scikit-learn digits)",
        "",
        f"samples: {run_dir / 'samples.png'} (one row per class 0-9)",
        "",
        "| what | value |",
        "|---|---|",
        f"| evaluator accuracy, held-out real digits | {100 * r['evaluator_accuracy_heldout']:.1f}% |",
        f"| encoder (tiny ViT) accuracy, held-out | {100 * r['encoder_accuracy_heldout']:.1f}% |",
        f"| RAE decoder PSNR, held-out | {r['decoder_psnr_heldout']:.1f} dB |",
        f"| **generated digits classified as asked** (goal ≥ 90%) "
        f"| **{100 * r['generated_accuracy']:.1f}%** |",
        f"| Fréchet distance, generated ({r['num_generated']}) | **{r['fd_generated']:.2f}** |",
        f"| Fréchet distance, held-out real digits (floor) | {r['fd_real_heldout']:.2f} |",
        f"| Fréchet distance, uniform noise (ceiling) | {r['fd_noise']:.2f} |",
        f"| wall time | {r.get('seconds', float('nan')):.0f} s |",
        "",
    ])  # fmt: skip
