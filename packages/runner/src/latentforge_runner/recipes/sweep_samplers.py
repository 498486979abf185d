"""sweep-samplers: a Fréchet distance of a flow generator's samples for each sampler and step count,
against the velocity evaluations (NFE) each spends — which sampler to use at a given budget.

    latentforge run sweep-samplers generator_run=runs/tiny-rae reference=digits.npz \\
        samplers=[euler,heun,dpm++2m,unipc] grids=[uniform,logsnr] steps=[2,4,8,16] \\
        num_samples=1000 metric=fd-dinov2 'metric_params={encoder: test-vit-tiny, output: pooled}'

Every configuration samples the same class-balanced labels from the same starting noise (the run's
EMA, its tokenizer and latent statistics, as ``sample`` reads them), so the rows differ by the
sampler alone.  Each sampler runs on each time grid of ``grids`` (the fixed-grid samplers' spacing:
"uniform", or the few-step "logsnr" / "edm").  Writes ``sweep.json`` (one row per sampler, grid and
step count: NFE, the metric) and ``sweep.md`` (the metric in a sampler × NFE table).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Literal

import attrs
import torch

from latentforge_generators.samplers import GRIDS, SAMPLERS, SOLVER_OPTIONS
from latentforge_runner import distributed
from latentforge_runner.config import ConfigError, Settings, sampler_block, setting, settings
from latentforge_runner.generation import (
    GENERATOR_RECIPES,
    EvalSettings,
    OnlineFID,
    frozen_tokenizer,
    generator_shapes,
    load_generator,
)
from latentforge_runner.latents import restore_run_stats
from latentforge_runner.reports import write_report
from latentforge_runner.run_folder import RunSettings, open_run, read_run

log = logging.getLogger("latentforge")


@settings
class SweepSamplersSettings(Settings):
    run: RunSettings = RunSettings(output_dir="runs/sweep-samplers")  # where and on what it runs
    generator_run: str  # a train-generator run folder (its newest checkpoint, EMA weights)
    weights: Literal["ema", "model"] = "ema"  # a run trained without EMA has only its model weights
    samplers: tuple[str, ...] = ("euler", "heun", "dpm++2m", "unipc")  # the ODE samplers compared
    grids: tuple[str, ...] = (
        "uniform",
    )  # time-grid spacings tried with every sampler (uniform, logsnr, edm)
    steps: tuple[int, ...] = setting((4, 8, 16, 32), ge=1)  # step counts tried with every sampler
    sampler: dict = sampler_block(run="generator_run")  # other sample() options of every row (cfg_scale, …)
    num_samples: int = setting(1000, ge=2)  # class-balanced samples per row
    batch_size: int = setting(100, ge=1)  # samples generated at once
    reference: str  # the real images: an ADM-style .npz (statistics or arr_0) or an image folder
    metric: str = "fd-dinov2"  # a registered Fréchet metric: fid or fd-dinov2
    metric_params: dict = attrs.field(factory=dict)  # its keyword arguments (fd-dinov2: encoder, output)


class SweepSamplersRecipe:
    Settings = SweepSamplersSettings

    def __init__(self, config: SweepSamplersSettings):
        self.cfg = config

    def setup(self) -> None:
        cfg = self.cfg
        for key in ("samplers", "grids", "steps"):
            if not getattr(cfg, key):
                raise ConfigError(f"{key}: name at least one")
        self.run_dir, self.dist, self.logger = open_run("sweep-samplers", cfg)
        self.device = self.dist.device
        run = Path(cfg.generator_run)
        recipe, self.train = read_run(run, "generator_run", GENERATOR_RECIPES)
        if recipe != "train-generator":
            raise ConfigError(
                f"generator_run {run} is a {recipe} run: sweep-samplers compares the ODE samplers of a flow "
                "generator (a train-generator run)"
            )
        self.tokenizer = frozen_tokenizer(self.train.tokenizer, self.train.run.seed, self.device)
        how = restore_run_stats(self.tokenizer, run, self.train, self.train.tokenizer.name, self.device)
        log.info("latent statistics: %s", how)
        self.k = self.train.data.num_classes
        shape = generator_shapes(self.tokenizer, self.k)
        self.generator = load_generator(run, self.train, None, cfg.weights, shape).to(self.device).eval()
        unknown = [s for s in cfg.samplers if s not in SAMPLERS]
        if unknown:
            raise ConfigError(f"samplers: unknown {unknown}; expected some of {', '.join(SAMPLERS)}")
        unknown = [g for g in cfg.grids if g not in GRIDS]
        if unknown:
            raise ConfigError(f"grids: unknown {unknown}; expected some of {', '.join(GRIDS)}")
        gridless = [s for s in cfg.samplers if "grid" not in SOLVER_OPTIONS[s]]
        if gridless and cfg.grids != ("uniform",):
            raise ConfigError(
                f"grids: {list(cfg.grids)} set the spacing of fixed-grid samplers, but {gridless} "
                "choose their own times; sweep those separately with grids=[uniform]"
            )
        if "grid" in cfg.sampler:
            raise ConfigError("sampler.grid: give the time grids as grids=[...], which the sweep iterates")
        e = EvalSettings(
            fid_samples=cfg.num_samples,
            fid_reference=cfg.reference,
            fid_metric=cfg.metric,
            fid_params=cfg.metric_params,
            fid_batch_size=cfg.batch_size,
        )
        self.measure = OnlineFID(e, self.train.data.image_size, self.dist, cfg.run.seed, self.logger)

    @torch.no_grad()
    def run(self) -> dict[str, Any]:
        cfg, rows = self.cfg, []
        for sampler in cfg.samplers:
            for grid in cfg.grids:
                for steps in cfg.steps:
                    options = {**cfg.sampler, "sampler": sampler, "steps": steps, "return_nfe": True}
                    if grid != "uniform":  # the samplers without a grid take no grid option
                        options["grid"] = grid
                    nfe: list[int] = []
                    value = self.measure(len(rows), lambda index, o=options, n=nfe: self._images(index, o, n))
                    row = {"sampler": sampler, "grid": grid, "steps": steps, "nfe": nfe[0], cfg.metric: value}
                    rows.append(row)
                    log.info(
                        "%s, %s grid, %d steps (NFE %d): %s %.4f",
                        sampler,
                        grid,
                        steps,
                        nfe[0],
                        cfg.metric,
                        value,
                    )
        self.rows = rows
        return {"rows": len(rows)}

    def _images(self, index: torch.Tensor, options: dict[str, Any], nfe: list[int]) -> torch.Tensor:
        """Images in [0, 1] for the samples ``index`` (class ``index % K``); notes the NFE spent."""
        z, calls = self.generator.sample((index % self.k).to(self.device), **options)
        nfe.append(calls)
        return self.tokenizer.decode(z, normalize=True).float().clamp(0, 1)

    def save(self) -> None:
        if not self.dist.is_main:
            return
        cfg = self.cfg
        write_report(self.run_dir / "sweep.json", {"metric": cfg.metric, "rows": self.rows})
        nfes = sorted({r["nfe"] for r in self.rows})
        lines = [f"| sampler | {' | '.join(f'NFE {n}' for n in nfes)} |", "|---|" + "---|" * len(nfes)]
        for sampler in cfg.samplers:
            for grid in cfg.grids:
                by_nfe = {
                    r["nfe"]: r[cfg.metric] for r in self.rows if (r["sampler"], r["grid"]) == (sampler, grid)
                }
                cells = [f"{by_nfe[n]:.4f}" if n in by_nfe else "" for n in nfes]
                name = sampler if grid == "uniform" else f"{sampler} ({grid} grid)"
                lines.append(f"| {name} | {' | '.join(cells)} |")
        table = "\n".join(lines) + "\n"
        (self.run_dir / "sweep.md").write_text(f"{cfg.metric} of {cfg.num_samples} samples\n\n{table}")
        log.info("%s of %d samples by sampler and NFE:\n%s", cfg.metric, cfg.num_samples, table)

    def cleanup(self) -> None:
        if hasattr(self, "logger"):
            self.logger.close()
        distributed.cleanup()
