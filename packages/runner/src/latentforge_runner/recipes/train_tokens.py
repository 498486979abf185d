"""train-tokens: a token generator (GPT, MaskGIT) on a frozen discrete tokenizer's token grids.

    latentforge run train-tokens --config digit-base-gpt data.root=/data/imagenet/train
    latentforge run train-tokens --config tiny-digit-gpt

The tokenizer (K-Means over SSL features as in DiGIT, or a VQGAN) gives token grids ``[B, h, w]``;
the generator receives ``vocab_size``/``grid_size``/``num_classes`` and learns them class-conditionally
(next-token or masked-token cross-entropy).  With ``data.name: latents`` the run reads the token shards
``cache-latents`` wrote.  When the tokenizer decodes to pixels (a VQGAN), every ``eval.every`` steps a
class-balanced grid goes to TensorBoard and ``samples/``, and ``eval.fid_samples`` measures an online
FID; K-Means tokens decode through DiGIT's stage 2 (``train-stage2``, then ``sample``).
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from latentforge_core.device import autocast
from latentforge_runner import distributed
from latentforge_runner.config import Component, ConfigError, Settings, component, settings
from latentforge_runner.data import DataSettings, build_training_data
from latentforge_runner.generation import (
    EvalSettings,
    OnlineFID,
    balanced_labels,
    check_image_size,
    frozen_tokenizer,
    generator_shapes,
    rng_kept,
    save_grid,
)
from latentforge_runner.latents import LatentShards
from latentforge_runner.run_folder import RunSettings, open_run
from latentforge_runner.training import TrainingSettings, TrainState, micro_batches

log = logging.getLogger("latentforge")


@settings
class TrainTokensSettings(Settings):
    run: RunSettings = RunSettings(output_dir="runs/train-tokens")  # where and on what it runs
    data: DataSettings = DataSettings()  # the images (or their cached tokens) to learn
    tokenizer: Component = component("tokenizers")  # the frozen discrete tokenizer (K-Means, VQGAN)
    # the token generator (GPT, MaskGIT); vocab_size, grid_size and num_classes come from the tokenizer
    generator: Component = component("generators", injected=("vocab_size", "grid_size", "num_classes"))
    training: TrainingSettings = TrainingSettings()  # optimisation, schedule, EMA, checkpoints
    eval: EvalSettings = EvalSettings()  # sample grids, sampler, online FID


class TrainTokensRecipe:
    Settings = TrainTokensSettings

    def __init__(self, config: TrainTokensSettings):
        self.cfg = config

    # -------------------------------------------------------------------------------- setup
    def setup(self) -> None:
        cfg, t = self.cfg, self.cfg.training
        self.run_dir, self.dist, self.logger = open_run("train-tokens", cfg)
        self.device = self.dist.device
        self.dataset = build_training_data(cfg.data, cfg.tokenizer.name, t.seed)
        self.cached = isinstance(self.dataset, LatentShards)
        self.tokenizer = frozen_tokenizer(cfg.tokenizer, cfg.run.seed, self.device)
        check_image_size(self.tokenizer, cfg.data.image_size, cfg.tokenizer.name)
        if self.tokenizer.vocab_size is None:
            raise ConfigError(
                f"tokenizer {cfg.tokenizer.name!r} gives continuous latents; train-tokens trains token "
                "models on discrete tokens (train flow generators with `latentforge run train-generator`)"
            )
        if cfg.eval.fid_samples and not self.tokenizer.can_decode:
            raise ConfigError(
                f"eval.fid_samples: tokenizer {cfg.tokenizer.name!r} has no pixel decoder to make images "
                "from (K-Means tokens decode through stage 2; measure FID with sample + evaluate)"
            )
        torch.manual_seed(cfg.run.seed)  # every process builds the same initial weights
        shape = generator_shapes(self.tokenizer, cfg.data.num_classes)
        self.generator = cfg.generator.build("generators", **shape).to(self.device)
        self.model = distributed.wrap(self.generator, self.dist, method="loss", compile=t.compile, training=t)
        self.state = TrainState(
            self.generator,
            t,
            data=self.dataset.batch if self.cached else self.dataset,  # the shards live in memory
            num_items=len(self.dataset),
            dist=self.dist,
            run_dir=self.run_dir,
            config={"name": cfg.generator.name, **cfg.generator.params, **shape},
        )
        if cfg.run.resume != "never":  # open_run has checked the folder may be resumed
            self.state.resume()
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
                        loss = self.model(self.tokens(part), part["label"])  # cross-entropy over tokens
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
    def tokens(self, batch: dict[str, Any]) -> torch.Tensor:
        """Token grids ``[B, h, w]``, encoded now or read from the cache."""
        return batch[self.dataset.key] if self.cached else self.tokenizer.encode(batch["image"])

    # -------------------------------------------------------------------------------- evaluation
    @torch.no_grad()
    def generate(self, labels: torch.Tensor, model: torch.nn.Module | None = None) -> torch.Tensor:
        """Images in [0, 1] ``[B, 3, H, W]`` from the EMA (or the model) for class ``labels``.
        ``model``: the weights :meth:`~latentforge_runner.training.TrainState.eval_model` gave for this
        evaluation (under FSDP a gathered copy, made by every process together); by default taken now."""
        model = self.state.eval_model() if model is None else model.eval()
        try:
            ids = model.sample(labels.to(self.device), **self.cfg.eval.sampler)
            return self.tokenizer.decode(ids).float().clamp(0, 1)
        finally:
            self.generator.train()

    def evaluate(self) -> None:
        """A class-balanced sample grid and the online FID, when the tokens decode to pixels."""
        e, k, step = self.cfg.eval, self.cfg.data.num_classes, self.state.step
        if not self.tokenizer.can_decode:
            return  # K-Means tokens decode through stage 2
        model = self.state.eval_model()  # every process: under FSDP the EMA is gathered here, once
        with rng_kept():  # the training RNG is untouched
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
