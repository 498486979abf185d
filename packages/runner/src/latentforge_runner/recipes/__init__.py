"""Recipes: one readable file each, one class with ``setup → run → save → cleanup`` (no inheritance).

Each recipe class carries its ``Settings`` (the schema and defaults of its config) and is registered
under the ``latentforge.recipes`` entry-point group.  What every recipe shares — the ``run`` block
and the run folder — lives here as plain functions.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import torch

from latentforge_core.device import seed_everything
from latentforge_runner import distributed
from latentforge_runner.config import Settings, dump_yaml, settings
from latentforge_runner.training import RunLogger

log = logging.getLogger("latentforge")


@settings
class RunSettings(Settings):
    """Where a run writes and on what it runs; never changes what it computes (except ``seed``)."""

    output_dir: str = "runs/default"
    device: str = "auto"
    seed: int = 0
    resume: bool = True  # continue from the newest whole checkpoint in output_dir
    threads: int | None = None  # CPU threads for torch (None: torch's default)
    wandb_project: str | None = None


def open_run(recipe: str, cfg: Any) -> tuple[Path, distributed.DistInfo, RunLogger]:
    """Join the process group, seed, create the run folder and write the resolved config into it."""
    if cfg.run.threads is not None:
        torch.set_num_threads(cfg.run.threads)
    dist = distributed.init(cfg.run.device)
    seed_everything(cfg.run.seed + dist.rank)
    run_dir = Path(cfg.run.output_dir)
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        dump_yaml({"recipe": recipe, **cfg.to_dict()}, run_dir / "config.yaml")
        if not any(
            isinstance(h, logging.StreamHandler) and getattr(h, "stream", None) is sys.stderr
            for h in log.handlers
        ):
            log.addHandler(logging.StreamHandler(sys.stderr))
    logger = RunLogger(
        run_dir, enabled=dist.is_main, wandb_project=cfg.run.wandb_project, config=cfg.to_dict()
    )
    log.info("%s: run folder %s, device %s, %d process(es)", recipe, run_dir, dist.device, dist.world_size)
    return run_dir, dist, logger
