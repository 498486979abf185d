"""train-generator: a flow generator (DiT, LightningDiT, DiT-DH) on a frozen continuous tokenizer's latents.

    latentforge run train-generator --config rae-ditdh-xl data.root=/data/imagenet/train
    latentforge run train-generator --config tiny-rae data.name=latents data.root=runs/cache-latents
    torchrun --nproc-per-node 8 -m latentforge_runner.cli run train-generator --config vavae-lightningdit-xl

The tokenizer (RAE, VA-VAE) gives latents ``[B, C, h, w]``, normalised by the statistics of this run
(``latent_stats.safetensors`` in the run folder: the tokenizer's own, else computed on the first
``eval.stats_batches`` batches); the generator receives ``in_channels``/``input_size``/``num_classes``
and learns them with its transport's loss.  With ``data.name: latents`` the run reads the cache
``cache-latents`` wrote instead of encoding images.  Every ``eval.every`` steps a class-balanced grid
from the EMA goes to TensorBoard and ``samples/``, and with ``eval.fid_samples`` an online FID.
Token models train with ``train-tokens``, DiGIT's stage 2 with ``train-stage2``.

The file reads top to bottom: ``setup`` builds the parts, ``run`` is the training loop, which writes
the checkpoints through the kit's ``TrainState.save``.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from latentforge_core.alignment import encoder_targets
from latentforge_core.device import autocast
from latentforge_runner import distributed
from latentforge_runner.config import Component, ConfigError, Settings, component, settings
from latentforge_runner.data import DataError, DataSettings, build_training_data
from latentforge_runner.generation import (
    AlignmentSettings,
    EvalSettings,
    OnlineFID,
    autoguidance,
    balanced_labels,
    build_alignment,
    check_image_size,
    frozen_tokenizer,
    generator_shapes,
    rng_kept,
    save_grid,
)
from latentforge_runner.latents import STATS_FILE, LatentShards, restore_latent_stats
from latentforge_runner.run_folder import RunSettings, open_run
from latentforge_runner.training import TrainingSettings, TrainState, micro_batches

log = logging.getLogger("latentforge")


@settings
class TrainGeneratorSettings(Settings):
    run: RunSettings = RunSettings(output_dir="runs/train-generator")  # where and on what it runs
    data: DataSettings = DataSettings()  # the images (or their cached latents) to learn
    tokenizer: Component = component("tokenizers")  # the frozen tokenizer whose latents are generated
    # the flow generator; in_channels, input_size and num_classes come from the tokenizer and data
    generator: Component = component("generators", injected=("in_channels", "input_size", "num_classes"))
    training: TrainingSettings = TrainingSettings()  # optimisation, schedule, EMA, checkpoints
    eval: EvalSettings = EvalSettings()  # sample grids, sampler, autoguidance, online FID
    alignment: AlignmentSettings | None = None  # REPA: align a block's tokens to an encoder's features


class TrainGeneratorRecipe:
    Settings = TrainGeneratorSettings

    def __init__(self, config: TrainGeneratorSettings):
        self.cfg = config

    # -------------------------------------------------------------------------------- setup
    def setup(self) -> None:
        cfg, t = self.cfg, self.cfg.training
        if cfg.alignment is not None and cfg.data.name == "latents":
            raise ConfigError(
                "alignment (REPA) computes the encoder's features of the training images, but data.name is "
                "latents (a cache holds no pixels): train from the images (data.name: folder or digits)"
            )
        self.run_dir, self.dist, self.logger = open_run("train-generator", cfg)
        self.device = self.dist.device
        self.dataset = build_training_data(cfg.data, cfg.tokenizer.name, t.seed)
        self.cached = isinstance(self.dataset, LatentShards)
        self.tokenizer = frozen_tokenizer(cfg.tokenizer, cfg.run.seed, self.device)
        check_image_size(self.tokenizer, cfg.data.image_size, cfg.tokenizer.name)
        if self.tokenizer.vocab_size is not None:
            raise ConfigError(
                f"tokenizer {cfg.tokenizer.name!r} gives discrete tokens; train-generator trains flow "
                "generators on continuous latents (train token models with `latentforge run train-tokens`)"
            )
        if self.cached and tuple(self.dataset.values.shape[1:]) != tuple(self.tokenizer.latent_shape):
            raise DataError(
                f"the cached {self.dataset.key} have shape {tuple(self.dataset.values.shape[1:])}, "
                f"but tokenizer {cfg.tokenizer.name!r} gives {tuple(self.tokenizer.latent_shape)}"
            )
        e = cfg.eval
        how = restore_latent_stats(
            self.tokenizer, self.run_dir, lambda: self.dataset, e.stats_batches, e.stats_reduce, self.device
        )
        log.info("latent statistics: %s", how)
        if self.dist.is_main and not (self.run_dir / STATS_FILE).is_file():
            self.tokenizer.stats.save(self.run_dir / STATS_FILE)  # where ``sample`` reads them

        torch.manual_seed(cfg.run.seed)  # every process builds the same initial weights
        shape = generator_shapes(self.tokenizer, cfg.data.num_classes)
        self.generator = cfg.generator.build("generators", **shape).to(self.device)
        self.repa = None
        if cfg.alignment is not None:
            self.encoder, self.repa = build_alignment(cfg.alignment, self.generator, self.device)
        trained = self.repa if self.repa is not None else self.generator  # the projector trains too
        self.model = distributed.wrap(trained, self.dist, method="loss", compile=t.compile, training=t)
        self.state = TrainState(
            self.generator,
            t,
            data=self.dataset.batch if self.cached else self.dataset,  # gathered from memory or the map
            num_items=len(self.dataset),
            dist=self.dist,
            run_dir=self.run_dir,
            config={"name": cfg.generator.name, **cfg.generator.params, **shape},
            params=trained.parameters(),
        )
        if self.repa is not None:
            self.state.keep("projector", self.repa.projector)  # saved and resumed; sampling has no use for it
        if cfg.run.resume != "never":  # open_run has checked the folder may be resumed
            self.state.resume()
        self.guidance: dict[str, Any] | None = None  # the weak model, built at the first evaluation
        self.fid = OnlineFID(cfg.eval, cfg.data.image_size, self.dist, cfg.run.seed, self.logger)

    # -------------------------------------------------------------------------------- the loop
    def run(self) -> dict[str, Any]:
        t, state = self.cfg.training, self.state
        progress = state.step_log(self.logger, "generator")  # a bar or log lines; averages to metrics.jsonl
        self.generator.train()
        for batch in state.steps():  # the rest of the run; on SIGINT/SIGTERM: checkpoint, RunInterrupted
            logs = {"loss": 0.0}
            for part, sync in micro_batches(batch, t.grad_accum, self.model, self.dist):
                with sync:  # DDP all-reduces the gradients at the last micro-batch only
                    with autocast(self.device, t.dtype):
                        if self.repa is None:
                            loss = self.model(self.latents(part), part["label"])  # the transport's loss
                        else:  # + λ · alignment to the encoder's features of the same images
                            target = encoder_targets(self.encoder, part["image"])  # B, D, h, w
                            terms = self.model(self.latents(part), part["label"], target, return_terms=True)
                            loss = terms["loss"]
                            align = float(terms["alignment"].detach())  # −cosine similarity, for the log
                            logs["alignment"] = logs.get("alignment", 0.0) + align / t.grad_accum
                    logs["loss"] += state.optim.backward(loss, t.grad_accum, state.step)
            logs |= state.update()  # optimiser step, LR schedule, EMA
            state.step += 1
            progress.update(state.step, logs, state.optim.lr)
            if self.cfg.eval.due(state.step):
                self.evaluate()
            if t.checkpoint_due(state.step):
                state.save()  # checkpoints/<step>/: weights, EMA, optimiser, data position, RNG
        return progress.close()

    @torch.no_grad()
    def latents(self, batch: dict[str, Any]) -> torch.Tensor:
        """Normalised latents ``[B, C, h, w]``, encoded now or read from the cache; contiguous, so that
        noise drawn ``randn_like`` them is the same on both paths."""
        if self.cached:
            return self.tokenizer.stats.normalize(batch[self.dataset.key]).contiguous()
        return self.tokenizer.encode(batch["image"], normalize=True).contiguous()

    # -------------------------------------------------------------------------------- evaluation
    @torch.no_grad()
    def generate(self, labels: torch.Tensor, model: torch.nn.Module | None = None) -> torch.Tensor:
        """Images in [0, 1] ``[B, 3, H, W]`` from the EMA (or the model) for class ``labels``.
        ``model``: the weights :meth:`~latentforge_runner.training.TrainState.eval_model` gave for this
        evaluation (under FSDP a gathered copy, made by every process together); by default taken now."""
        e, model = self.cfg.eval, self.state.eval_model() if model is None else model.eval()
        if self.guidance is None:
            k = self.cfg.data.num_classes
            self.guidance = autoguidance(e.guidance_model, e.guidance_weights, self.tokenizer, k, self.device)
        try:
            z = model.sample(labels.to(self.device), **e.sampler, **self.guidance)
            return self.tokenizer.decode(z, normalize=True).float().clamp(0, 1)
        finally:
            self.generator.train()

    def evaluate(self) -> None:
        """A class-balanced sample grid, and the online FID when asked; the training RNG is untouched."""
        e, k, step = self.cfg.eval, self.cfg.data.num_classes, self.state.step
        model = self.state.eval_model()  # every process: under FSDP the EMA is gathered here, once
        with rng_kept():
            if self.dist.is_main:
                images = self.generate(balanced_labels(e.num_samples, k), model).cpu()
                save_grid(images, self.logger, self.run_dir, step)
            self.fid(step, lambda index: self.generate(index % k, model))

    def save(self) -> None:
        self.evaluate()

    def cleanup(self) -> None:
        if hasattr(self, "logger"):  # open_run may have refused the run folder (run.resume)
            self.logger.close()
        distributed.cleanup()
