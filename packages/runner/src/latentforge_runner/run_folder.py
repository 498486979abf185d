"""The run folder: where a recipe writes, its resolved ``config.yaml``, its logs and its scalars.

Every recipe starts with :func:`open_run`, which joins the process group, seeds, creates
``run.output_dir`` and writes the config into it; :class:`RunLogger` sends scalars to
``metrics.jsonl`` and TensorBoard (and W&B when asked).  :func:`read_run` reads a run folder back as
its recipe's settings, through the registry, so one recipe reads another's run without importing it.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

import torch

from latentforge_core import registry
from latentforge_core.device import seed_everything
from latentforge_runner import distributed
from latentforge_runner.config import ConfigError, Settings, dump_yaml, load_yaml, settings

log = logging.getLogger("latentforge")

CONFIG_FILE = "config.yaml"


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
        dump_yaml({"recipe": recipe, **cfg.to_dict()}, run_dir / CONFIG_FILE)
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


def read_run(run: str | Path, what: str, recipes: Collection[str]) -> tuple[str, Any]:
    """(recipe name, settings) of a run folder written by one of ``recipes``."""
    run = Path(run)
    if not (run / CONFIG_FILE).is_file():
        raise ConfigError(
            f"{what} {run} holds no {CONFIG_FILE}: expected the folder of a {' or '.join(recipes)} run"
        )
    data = load_yaml(run / CONFIG_FILE)
    recipe = data.pop("recipe", None)
    if recipe not in recipes:
        raise ConfigError(
            f"{what} {run} is a {recipe!r} run; expected the folder of a {' or '.join(recipes)} run"
        )
    return recipe, registry.recipes.get(recipe).Settings.from_dict(data, where=str(run / CONFIG_FILE))


class RunLogger:
    """Scalars to ``metrics.jsonl`` and TensorBoard (and W&B when asked and installed); main process only."""

    def __init__(
        self,
        run_dir: str | Path,
        *,
        enabled: bool = True,
        wandb_project: str | None = None,
        config: Mapping[str, Any] | None = None,
    ):
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self._tb = self._wandb = None
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(self.run_dir / "log.txt")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        self._handler = handler
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.run_dir / "tensorboard"))
        except ImportError:
            log.info("tensorboard is not installed: scalars go to metrics.jsonl only")
        if wandb_project:
            try:
                import wandb

                self._wandb = wandb.init(
                    project=wandb_project, dir=str(self.run_dir), config=dict(config or {})
                )
            except ImportError:
                log.warning("wandb is not installed; pip install wandb to log there")

    def scalars(self, values: Mapping[str, float], step: int) -> None:
        if not self.enabled:
            return
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"step": step, **{k: float(v) for k, v in values.items()}}) + "\n")
        if self._tb is not None:
            for k, v in values.items():
                self._tb.add_scalar(k, float(v), step)
        if self._wandb is not None:
            self._wandb.log(dict(values), step=step)

    def images(self, tag: str, grid: torch.Tensor, step: int) -> None:
        """``grid`` in [0, 1], ``[3, H, W]``."""
        if not self.enabled:
            return
        if self._tb is not None:
            self._tb.add_image(tag, grid.clamp(0, 1), step)
        if self._wandb is not None:
            import wandb

            self._wandb.log({tag: wandb.Image(grid.permute(1, 2, 0).numpy())}, step=step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
        if self.enabled:
            log.removeHandler(self._handler)
            self._handler.close()
