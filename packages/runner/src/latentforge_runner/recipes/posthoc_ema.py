"""posthoc-ema: EMA weights of any width, chosen after training (EDM2's post-hoc EMA).

    latentforge run posthoc-ema generator_run=runs/tiny-rae sigma_rel=[0.05,0.07,0.1]

Reads the power-function EMA snapshots a run wrote (``training.ema_profiles`` with
``training.ema_snapshot_every``) and writes, for each ``sigma_rel``, the reconstructed EMA at
``at_step`` (default: the newest snapshot) as ``<generator_run>/posthoc/ema_sigma_<σ_rel>.safetensors``,
which ``sample`` reads with ``checkpoint=<generator_run>/posthoc weights=ema_sigma_<σ_rel>``.  The
reconstruction is :func:`latentforge_runner.ema.reconstruct`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from latentforge_core.checkpoint import save_checkpoint
from latentforge_core.errors import InputError
from latentforge_runner import distributed, ema
from latentforge_runner.config import ConfigError, Settings, setting, settings
from latentforge_runner.run_folder import RunSettings, open_run

log = logging.getLogger("latentforge")


@settings
class PosthocEMASettings(Settings):
    run: RunSettings = RunSettings(output_dir="runs/posthoc-ema")  # where its log and config go
    generator_run: str  # a training run folder with ema_snapshots/ (training.ema_profiles and snapshots)
    sigma_rel: tuple[float, ...] = setting((0.05, 0.1), gt=0, lt=ema.SIGMA_REL_MAX)  # widths written
    at_step: int | None = setting(None, ge=1)  # the snapshot step reconstructed (None: the newest)


class PosthocEMARecipe:
    Settings = PosthocEMASettings

    def __init__(self, config: PosthocEMASettings):
        self.cfg = config

    def setup(self) -> None:
        if not self.cfg.sigma_rel:
            raise ConfigError("sigma_rel: name at least one width (e.g. [0.05, 0.1])")
        self.run_dir, self.dist, self.logger = open_run("posthoc-ema", self.cfg)
        self.snapshots = Path(self.cfg.generator_run) / ema.SNAPSHOT_DIR
        self.written: list[Path] = []

    def run(self) -> dict[str, Any]:
        cfg = self.cfg
        if not self.dist.is_main:
            return {}
        out = Path(cfg.generator_run) / ema.POSTHOC_DIR
        for sigma in cfg.sigma_rel:
            try:
                state, meta = ema.reconstruct(self.snapshots, sigma, cfg.at_step)
            except InputError as err:
                raise ConfigError(f"generator_run {cfg.generator_run}: {err}") from err
            path = save_checkpoint(state, out / f"{ema.profile_name(sigma)}.safetensors", meta)
            log.info("EMA of sigma_rel %g at step %d → %s", sigma, meta["step"], path)
            self.written.append(path)
        return {"written": len(self.written)}

    def save(self) -> None:
        pass  # run() wrote the files: nothing else to keep

    def cleanup(self) -> None:
        if hasattr(self, "logger"):
            self.logger.close()
        distributed.cleanup()
