"""train-stage2: DiGIT's second stage — a pixel tokenizer's codes generated from the K-Means tokens of
the same image.

    latentforge run train-stage2 --config digit-base-stage2 data.root=/data/imagenet/train
    latentforge run train-stage2 --config tiny-digit-stage2

``tokenizer`` (the VQGAN) gives the codes ``[B, h, w]`` the generator (``digit-stage2-*``) learns;
``condition_tokenizer`` (K-Means over SSL features) gives the tokens it is conditioned on, in place of
a class label.  The generator receives ``vocab_size``/``grid_size`` and ``cond_vocab_size``/
``cond_grid_size``.  ``sample`` chains a stage-1 run (``train-tokens``) with a run of this recipe
(``stage2_run=``).  Every ``eval.every`` steps a grid regenerated from the K-Means tokens of the first
images goes to TensorBoard and ``samples/``, and ``eval.fid_samples`` measures an online FID.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from latentforge_core.device import autocast
from latentforge_runner import distributed
from latentforge_runner.config import Component, ConfigError, Settings, component, settings
from latentforge_runner.data import DataSettings, build_images, collate
from latentforge_runner.generation import (
    EvalSettings,
    OnlineFID,
    check_image_size,
    frozen_tokenizer,
    generator_shapes,
    rng_kept,
    save_grid,
)
from latentforge_runner.run_folder import RunSettings, open_run
from latentforge_runner.training import TrainingSettings, TrainState, micro_batches

log = logging.getLogger("latentforge")


@settings
class TrainStage2Settings(Settings):
    run: RunSettings = RunSettings(output_dir="runs/train-stage2")  # where and on what it runs
    data: DataSettings = DataSettings()  # the images both tokenizers encode
    tokenizer: Component = component("tokenizers")  # the codes to generate (VQGAN)
    condition_tokenizer: Component = component("tokenizers")  # the tokens they are conditioned on (K-Means)
    generator: Component = component(  # DiGIT's stage 2; its vocabularies and grids come from the tokenizers
        "generators", injected=("vocab_size", "grid_size", "cond_vocab_size", "cond_grid_size")
    )
    training: TrainingSettings = TrainingSettings()  # optimisation, schedule, EMA, checkpoints
    eval: EvalSettings = EvalSettings()  # sample grids, sampler, online FID


class TrainStage2Recipe:
    Settings = TrainStage2Settings

    def __init__(self, config: TrainStage2Settings):
        self.cfg = config

    # -------------------------------------------------------------------------------- setup
    def setup(self) -> None:
        cfg, t, d = self.cfg, self.cfg.training, self.cfg.data
        self.run_dir, self.dist, self.logger = open_run("train-stage2", cfg)
        self.device = self.dist.device
        if d.name == "latents":
            raise ConfigError(
                "train-stage2 encodes both tokenizers on the same images: data.name must be 'digits' or "
                "'folder', not cached latents"
            )
        self.dataset = build_images(d, crop=d.crop, resize=d.resize, flip=d.flip, seed=t.seed)
        self.tokenizer = frozen_tokenizer(cfg.tokenizer, cfg.run.seed, self.device)
        check_image_size(self.tokenizer, cfg.data.image_size, cfg.tokenizer.name)
        self.condition = frozen_tokenizer(cfg.condition_tokenizer, cfg.run.seed, self.device)
        if self.tokenizer.vocab_size is None or self.condition.vocab_size is None:
            raise ConfigError(
                "train-stage2 (DiGIT stage 2) pairs two discrete tokenizers over the same images: got "
                f"tokenizer {cfg.tokenizer.name!r}, condition_tokenizer {cfg.condition_tokenizer.name!r}"
            )
        torch.manual_seed(cfg.run.seed)  # every process builds the same initial weights
        shape = generator_shapes(self.tokenizer, d.num_classes, self.condition)
        self.generator = cfg.generator.build("generators", **shape).to(self.device)
        self.model = distributed.wrap(self.generator, self.dist, method="loss", compile=t.compile, training=t)
        self.state = TrainState(
            self.generator,
            t,
            data=self.dataset,
            num_items=len(self.dataset),
            dist=self.dist,
            run_dir=self.run_dir,
            config={"name": cfg.generator.name, **cfg.generator.params, **shape},
        )
        if cfg.run.resume != "never":  # open_run has checked the folder may be resumed
            self.state.resume()
        self.fid = OnlineFID(cfg.eval, d.image_size, self.dist, cfg.run.seed, self.logger)

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
                        loss = self.model(*self.encode(part["image"]))  # cross-entropy over the codes
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
    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(codes to learn, K-Means tokens that condition them), both ``[B, h, w]``."""
        return self.tokenizer.encode(images), self.condition.encode(images)

    # -------------------------------------------------------------------------------- evaluation
    @torch.no_grad()
    def generate(self, index: torch.Tensor, model: torch.nn.Module | None = None) -> torch.Tensor:
        """Images in [0, 1] ``[B, 3, H, W]`` regenerated from the K-Means tokens of images ``index``.
        ``model``: the weights :meth:`~latentforge_runner.training.TrainState.eval_model` gave for this
        evaluation (under FSDP a gathered copy, made by every process together); by default taken now."""
        images = collate([self.dataset[int(i) % len(self.dataset)] for i in index])["image"]
        model = self.state.eval_model() if model is None else model.eval()
        try:
            codes = model.sample(self.condition.encode(images.to(self.device)), **self.cfg.eval.sampler)
            return self.tokenizer.decode(codes).float().clamp(0, 1)
        finally:
            self.generator.train()

    def evaluate(self) -> None:
        """A grid regenerated from the first images' K-Means tokens, and the online FID when asked."""
        step = self.state.step
        model = self.state.eval_model()  # every process: under FSDP the EMA is gathered here, once
        with rng_kept():  # the training RNG is untouched
            if self.dist.is_main:
                images = self.generate(torch.arange(self.cfg.eval.num_samples), model).cpu()
                save_grid(images, self.logger, self.run_dir, step)
            self.fid(step, lambda index: self.generate(index, model))

    def save(self) -> None:
        self.evaluate()

    def cleanup(self) -> None:
        if hasattr(self, "logger"):  # open_run may have refused the run folder (run.resume)
            self.logger.close()
        distributed.cleanup()
