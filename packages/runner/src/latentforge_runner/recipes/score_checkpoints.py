"""score-checkpoints: a Fréchet distance for each checkpoint × EMA of a flow generator run — which
weights to release.

    latentforge run score-checkpoints generator_run=runs/tiny-rae reference=digits.npz \\
        steps=[20000,40000] weights=[ema,ema_0.999] posthoc=[0.05,0.07,0.1] num_samples=1000 \\
        metric=fd-dinov2 'metric_params={encoder: test-vit-tiny, output: pooled}'

``weights`` are files of each checkpoint (``model``, ``ema``, a tracked rate ``ema_<decay>``, a tracked
power-function EMA ``ema_sigma_<σ_rel>``); ``posthoc`` are widths reconstructed at each step from
``ema_snapshots/`` (EDM2's post-hoc EMA; the step needs a snapshot).  Every row draws the same
class-balanced labels and starting noise as ``sample`` does (same ``run.seed`` and ``batch_size``:
the same images), so rows differ by their weights alone.  Writes ``scores.json`` (one row per step and
weights, and the best) and ``scores.md`` (the metric in a weights × step table, the best in bold).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import attrs
import torch

from latentforge_core.checkpoint import CheckpointError, load_into
from latentforge_core.errors import InputError
from latentforge_metrics.inception import to_uint8
from latentforge_runner import distributed, ema
from latentforge_runner.config import ConfigError, Settings, sampler_block, setting, settings
from latentforge_runner.generation import (
    EvalSettings,
    OnlineFID,
    autoguidance,
    frozen_tokenizer,
    generator_shapes,
    initial_noise,
    load_generator,
)
from latentforge_runner.latents import restore_run_stats
from latentforge_runner.reports import write_report
from latentforge_runner.run_folder import RunSettings, open_run, read_run
from latentforge_runner.training import list_checkpoints

log = logging.getLogger("latentforge")


@settings
class ScoreCheckpointsSettings(Settings):
    run: RunSettings = RunSettings(output_dir="runs/score-checkpoints")  # where and on what it runs
    generator_run: str  # a train-generator run folder
    steps: tuple[int, ...] = setting((), ge=1)  # the steps scored (empty: every whole checkpoint's)
    # each checkpoint's files: model, ema, ema_<decay>, ema_sigma_<σ_rel>
    weights: tuple[str, ...] = setting(("ema",), validator=ema.weights_name)
    # σ_rel reconstructed from ema_snapshots/ at each step (training.ema_profiles with snapshots)
    posthoc: tuple[float, ...] = setting((), gt=0, lt=ema.SIGMA_REL_MAX)
    sampler: dict | None = sampler_block(run="generator_run", default=None)  # default: the run's eval.sampler
    num_samples: int = setting(1000, ge=2)  # class-balanced samples per row
    batch_size: int = setting(100, ge=1)  # samples generated at once (as sample's, for the same images)
    reference: str  # the real images: an ADM-style .npz (statistics or arr_0) or an image folder
    metric: str = "fd-dinov2"  # a registered Fréchet metric: fid or fd-dinov2
    metric_params: dict = attrs.field(factory=dict)  # its keyword arguments (fd-dinov2: encoder, output)


class ScoreCheckpointsRecipe:
    Settings = ScoreCheckpointsSettings

    def __init__(self, config: ScoreCheckpointsSettings):
        self.cfg = config

    def setup(self) -> None:
        cfg = self.cfg
        if not cfg.weights and not cfg.posthoc:
            raise ConfigError("weights, posthoc: name at least one EMA to score")
        self.run_dir, self.dist, self.logger = open_run("score-checkpoints", cfg)
        self.device = self.dist.device
        run = self.generator_run = Path(cfg.generator_run)
        _, self.train = read_run(run, "generator_run", ("train-generator",))
        self.plan = self._plan()
        self.tokenizer = frozen_tokenizer(self.train.tokenizer, self.train.run.seed, self.device)
        log.info(
            "latent statistics: %s",
            restore_run_stats(self.tokenizer, run, self.train, self.train.tokenizer.name, self.device),
        )
        self.k = self.train.data.num_classes
        self.shape = generator_shapes(self.tokenizer, self.k)
        e = self.train.eval
        self.guidance = autoguidance(
            e.guidance_model, e.guidance_weights, self.tokenizer, self.k, self.device
        )
        self.options = self.train.eval.sampler if cfg.sampler is None else cfg.sampler
        self.labels = torch.arange(cfg.num_samples) % self.k if self.k else None  # sample's labels=equal
        fid = EvalSettings(
            fid_samples=cfg.num_samples,
            fid_reference=cfg.reference,
            fid_metric=cfg.metric,
            fid_params=cfg.metric_params,
            fid_batch_size=cfg.batch_size,
        )
        self.measure = OnlineFID(fid, self.train.data.image_size, self.dist, cfg.run.seed, self.logger)

    def _plan(self) -> list[tuple[int, str, Path | None]]:
        """``(step, weights, checkpoint folder)`` of every row, each checked before anything samples."""
        cfg, run = self.cfg, self.generator_run
        folders = {int(p.name): p for p in list_checkpoints(run / "checkpoints")}
        snapshots = {step for step, _ in ema.list_snapshots(run / ema.SNAPSHOT_DIR)}
        steps = list(cfg.steps) or sorted(folders)
        if not steps:
            raise ConfigError(f"generator_run {run}: no whole checkpoint to score (checkpoints/ is empty)")
        plan: list[tuple[int, str, Path | None]] = []
        for step in steps:
            if cfg.weights and step not in folders:
                raise ConfigError(
                    f"steps: {run / 'checkpoints'} holds no checkpoint of step {step}; expected some of "
                    f"{', '.join(map(str, sorted(folders))) or 'none (it is empty)'}"
                )
            for weights in cfg.weights:
                ema.check_weights(folders[step], weights, what="weights")
                plan.append((step, weights, folders[step]))
            if cfg.posthoc and step not in snapshots:
                held = ", ".join(map(str, sorted(snapshots))) or "none"
                raise ConfigError(
                    f"posthoc: {run / ema.SNAPSHOT_DIR} holds no snapshot of step {step} (written with "
                    f"training.ema_profiles and ema_snapshot_every); its snapshot steps: {held}"
                )
            plan += [(step, f"{ema.POSTHOC_DIR}/{ema.profile_name(s)}", None) for s in cfg.posthoc]
        return plan

    def _generator(self, step: int, weights: str, folder: Path | None) -> torch.nn.Module:
        if folder is not None:
            return load_generator(self.generator_run, self.train, str(folder), weights, self.shape)
        sigma = float(weights.rsplit("_", 1)[1])
        try:
            state, _ = ema.reconstruct(self.generator_run / ema.SNAPSHOT_DIR, sigma, step)
        except InputError as err:
            raise ConfigError(f"posthoc: {err}") from err
        generator = self.train.generator.build("generators", **self.shape)
        try:
            load_into(generator, state)
        except CheckpointError as err:
            raise CheckpointError(f"the post-hoc EMA of sigma_rel {sigma} at step {step}: {err}") from err
        return generator

    @torch.no_grad()
    def run(self) -> dict[str, Any]:
        cfg, rows = self.cfg, []
        for step, weights, folder in self.plan:
            generator = self._generator(step, weights, folder).to(self.device).eval()
            value = self.measure(len(rows), lambda index, g=generator: self._images(g, index))
            rows.append({"step": step, "weights": weights, cfg.metric: value})
            log.info("step %d, %s: %s %.4f", step, weights, cfg.metric, value)
        self.rows = rows
        self.best = min(rows, key=lambda r: r[cfg.metric])
        return {"rows": len(rows), "best_step": self.best["step"], "best_weights": self.best["weights"]}

    def _images(self, generator: torch.nn.Module, index: torch.Tensor) -> torch.Tensor:
        """The samples ``index`` as ``sample`` makes them (noise per index, other draws per batch), in
        [0, 1] on the 8-bit grid its ``samples.npz`` holds."""
        seed, indices = self.cfg.run.seed, index.tolist()
        distributed.seed_batch(seed, indices[0])
        noise = initial_noise(seed, indices, tuple(self.tokenizer.latent_shape)).to(self.device)
        labels = len(indices) if self.labels is None else self.labels[index].to(self.device)
        z = generator.sample(labels, **self.options, noise=noise, **self.guidance)
        images = self.tokenizer.decode(z, normalize=True).float().clamp(0, 1)  # [B, 3, H, W]
        return to_uint8(images).float() / 255

    def save(self) -> None:
        if not self.dist.is_main:
            return
        cfg, metric = self.cfg, self.cfg.metric
        best = self.best
        write_report(
            self.run_dir / "scores.json",
            {"metric": metric, "num_samples": cfg.num_samples, "rows": self.rows, "best": best},
        )
        steps = sorted({r["step"] for r in self.rows})
        choices = list(dict.fromkeys(r["weights"] for r in self.rows))
        lines = [f"| weights | {' | '.join(f'step {s}' for s in steps)} |", "|---|" + "---|" * len(steps)]
        for choice in choices:
            cells = []
            for step in steps:
                row = next((r for r in self.rows if r["step"] == step and r["weights"] == choice), None)
                cell = "" if row is None else f"{row[metric]:.4f}"
                cells.append(f"**{cell}**" if row is best else cell)
            lines.append(f"| {choice} | {' | '.join(cells)} |")
        table = "\n".join(lines) + "\n"
        summary = f"best: step {best['step']}, {best['weights']} ({metric} {best[metric]:.4f})"
        (self.run_dir / "scores.md").write_text(
            f"{metric} of {cfg.num_samples} samples\n\n{table}\n{summary}\n"
        )
        log.info("%s of %d samples by weights and step:\n%s%s", metric, cfg.num_samples, table, summary)

    def cleanup(self) -> None:
        if hasattr(self, "logger"):
            self.logger.close()
        distributed.cleanup()
