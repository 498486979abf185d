"""The run folder: where a recipe writes, its resolved ``config.yaml``, its logs and its scalars.

Every recipe starts with :func:`open_run`, which joins the process group, seeds, creates
``run.output_dir`` and writes the config into it; :class:`RunLogger` sends scalars to
``metrics.jsonl`` and TensorBoard (and W&B when asked).  :func:`read_run` reads a run folder back as
its recipe's settings, through the registry, so one recipe reads another's run without importing it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import sys
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any, Literal

import attrs
import torch

from latentforge_core import registry
from latentforge_core.device import seed_everything
from latentforge_core.errors import InputError, StateError
from latentforge_runner import distributed
from latentforge_runner.config import (
    ConfigError,
    Settings,
    device_name,
    dump_yaml,
    load_yaml,
    non_empty,
    setting,
    settings,
)
from latentforge_runner.training import TrainingSettings, list_checkpoints

log = logging.getLogger("latentforge")

CONFIG_FILE = "config.yaml"


def _resume_mode(value: Any) -> str:
    """``run.resume`` as a mode; the YAML booleans of older configs read as ``auto`` (true) and
    ``never`` (false)."""
    if value is True or value is False:
        return "auto" if value else "never"
    if value not in RESUME_MODES:
        raise ConfigError(f"run.resume: expected one of auto, never, force, got {value!r}")
    return value


RESUME_MODES = ("auto", "never", "force")


@settings
class RunSettings(Settings):
    """Where a run writes and on what it runs; never changes what it computes (except ``seed``).

    ``resume`` decides what a training run does with a run folder that already holds checkpoints
    (see :func:`check_resume`): ``auto`` continues from the newest whole one if the folder's
    ``config.yaml`` asks for the same computation (else it stops and lists what differs), ``never``
    refuses the folder, ``force`` continues whatever changed."""

    output_dir: str = setting("runs/default", validator=non_empty)  # the run folder (created if missing)
    device: str = setting("auto", validator=device_name)  # auto (CUDA when present), cpu, cuda or cuda:N
    seed: int = setting(0, ge=0, lt=2**32)  # seeds weights, noise and sampling (plus the process rank)
    # auto: resume the newest checkpoint if config.yaml computes the same; never: refuse a folder holding
    # checkpoints; force: resume whatever changed (older configs' true/false read as auto/never)
    resume: Literal["auto", "never", "force"] | bool = attrs.field(default="auto", converter=_resume_mode)
    threads: int | None = setting(None, ge=1)  # CPU threads for torch (None: torch's default)
    wandb_project: str | None = None  # also log to this Weights & Biases project (needs wandb)


# Keys that change where or how fast a run goes, or what it reports, but not what it computes: a run
# folder resumes under ``run.resume=auto`` whatever they are.  ``<training>`` is every training block
# (``training``, the demo's ``encoder_training``, …); its ``steps`` is here when its LR schedule does
# not depend on it (``constant``, ``inverse_sqrt``): more steps continue the same run (fewer than the
# checkpoint's are refused in every mode).  ``linear`` and ``cosine`` decay over ``steps``, so there
# changing it changes every step's LR and it is compared like any other key.
RUN_ONLY_KEYS = (
    "run.output_dir",
    "run.device",
    "run.threads",
    "run.wandb_project",
    "run.resume",
    "<training>.log_every",
    "<training>.checkpoint_every",
    "<training>.keep_checkpoints",
    "<training>.num_workers",
    "<training>.max_minutes",
    "<training>.activation_checkpointing",  # recomputes what it would have kept: bitwise the same
    "<training>.activation_checkpointing_every",
    "<training>.ema_snapshot_every",  # when post-hoc EMA snapshots are written, not what is trained
    "<training>.checkpoint_format",  # how checkpoints are written; either format resumes bitwise
    "<training>.steps",
    "eval.every",
)
STEPS_DECAY = ("linear", "cosine")  # schedules that decay over ``training.steps``


def open_run(
    recipe: str, cfg: Any, stages: Mapping[str, TrainingSettings] | None = None
) -> tuple[Path, distributed.DistInfo, RunLogger]:
    """Join the process group, seed, check that the run folder may be written (:func:`check_resume`),
    create it and write the resolved config into it.  A training run that resumes writes its config
    only once it goes on (:meth:`RunLogger.write_config`, called by the training kit's step log):
    until then, a refused resume leaves the folder's ``config.yaml`` as it was.

    ``stages`` are the training runs whose checkpoints the folder holds, by subfolder (``""``: the
    run folder itself, ``<run>/checkpoints``); by default ``cfg.training``'s, when ``cfg`` has one."""
    if cfg.run.threads is not None:
        torch.set_num_threads(cfg.run.threads)
    try:
        dist = distributed.init(cfg.run.device)
    except (InputError, StateError) as err:  # no CUDA here, or a device torch does not know
        raise ConfigError(f"run.device {cfg.run.device!r}: {err}") from err
    seed_everything(cfg.run.seed + dist.rank)
    run_dir = Path(cfg.run.output_dir)
    if stages is None:
        training = getattr(cfg, "training", None)
        stages = {"": training} if isinstance(training, TrainingSettings) else {}
    note = check_resume(run_dir, recipe, cfg, stages)  # every process, before anything is written
    resuming = bool(stage_checkpoints(run_dir, stages))
    distributed.barrier()
    config = {"recipe": recipe, **cfg.to_dict()}
    if dist.is_main:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            if not resuming:  # a resumed run's is written once it goes on (RunLogger.write_config)
                _write_config(run_dir, config)
        except OSError as err:  # a file where the folder (or one above it) should be, no permission, …
            raise output_dir_error(run_dir, err) from err
        if not any(
            isinstance(h, logging.StreamHandler) and getattr(h, "stream", None) is sys.stderr
            for h in log.handlers
        ):
            log.addHandler(logging.StreamHandler(sys.stderr))
    logger = RunLogger(
        run_dir, enabled=dist.is_main, wandb_project=cfg.run.wandb_project, config=cfg.to_dict()
    )
    if resuming:
        logger.pending_config = config
    log.info("%s: run folder %s, device %s, %d process(es)", recipe, run_dir, dist.device, dist.world_size)
    if note and dist.is_main:
        log.warning(note)
    return run_dir, dist, logger


def _write_config(run_dir: Path, config: Mapping[str, Any]) -> None:
    tmp = run_dir / f".{CONFIG_FILE}.tmp"
    dump_yaml(config, tmp)
    os.replace(tmp, run_dir / CONFIG_FILE)  # whole or not at all


def output_dir_error(run_dir: Path, err: OSError) -> ConfigError:
    """``run.output_dir`` that cannot be made a folder, said in one line."""
    blocker = next((p for p in [run_dir, *run_dir.parents] if p.exists() and not p.is_dir()), None)
    why = f"{blocker} is a file" if blocker is not None else (err.strerror or str(err))
    return ConfigError(
        f"run.output_dir {str(run_dir)!r}: cannot create the run folder ({why}); expected a folder path "
        "that is not a file and not under one"
    )


def check_resume(run_dir: Path, recipe: str, cfg: Any, stages: Mapping[str, TrainingSettings]) -> str | None:
    """Whether a training run may go on in ``run_dir``, decided before anything there is written.

    Nothing to decide when no stage holds a checkpoint.  Otherwise ``run.resume=never`` refuses the
    folder; a checkpoint past a stage's ``steps`` is refused in every mode; ``auto`` compares the
    folder's ``config.yaml`` with ``cfg`` on every key but :data:`RUN_ONLY_KEYS` and refuses any
    difference, listing it (old → new); ``force`` goes on and returns the differences as a warning."""
    found = stage_checkpoints(run_dir, stages)
    if not found:
        return None
    newest = max((ckpts[-1] for ckpts in found.values()), key=lambda p: p.stat().st_mtime)
    mode = cfg.run.resume
    if mode == "never":
        raise ConfigError(
            f"run.resume is never, but {run_dir} already holds checkpoints (the newest: {newest}): "
            "choose another run.output_dir, or set run.resume=auto to continue that run"
        )
    for stage, ckpts in found.items():
        t, step = stages[stage], int(ckpts[-1].name)
        if step > t.steps:
            key = _training_keys(cfg).get(id(t), "training")
            raise ConfigError(
                f"{key}.steps is {t.steps}, but {run_dir} holds a checkpoint at step {step} "
                f"({ckpts[-1]}): set {key}.steps to {step} or more to continue that run, or choose "
                "another run.output_dir"
            )
    differences = config_differences(run_dir, recipe, cfg)
    if differences is None:
        what = f"there is no {run_dir / CONFIG_FILE} to compare the config with"
    elif differences:
        what = f"the config differs from {run_dir / CONFIG_FILE}: " + "; ".join(differences)
    else:
        return None
    if mode == "force":
        return f"run.resume=force: resuming from {newest} although {what}"
    raise ConfigError(
        f"{run_dir} holds checkpoints (the newest: {newest}), but {what}. run.resume=auto resumes only "
        "a run that computes the same: set run.resume=force to resume it anyway, or choose another "
        "run.output_dir"
    )


def stage_checkpoints(run_dir: Path, stages: Collection[str]) -> dict[str, list[Path]]:
    """The whole checkpoints of each stage that has any (oldest first), by stage."""
    found = {}
    for stage in stages:
        folder = run_dir / stage / "checkpoints"
        if folder.exists() and not folder.is_dir():
            raise ConfigError(
                f"{folder} is a file, where this run keeps its checkpoint folders: move it away, or choose "
                "another run.output_dir"
            )
        if ckpts := list_checkpoints(folder):
            found[stage] = ckpts
    return found


def config_differences(run_dir: Path, recipe: str, cfg: Any) -> list[str] | None:
    """``["key: old → new", …]`` between the folder's ``config.yaml`` and ``{recipe, cfg}``, leaving out
    :data:`RUN_ONLY_KEYS`; None when the folder has no ``config.yaml``.  The saved config is read as
    this version reads it (defaults filled in), when it still parses."""
    path = run_dir / CONFIG_FILE
    if not path.is_file():
        return None
    old = load_yaml(path)
    old_recipe = old.pop("recipe", None)
    if old_recipe == recipe:
        with contextlib.suppress(ConfigError):  # else compared as written
            old = type(cfg).from_dict(old).to_dict()
    return differences({"recipe": old_recipe, **old}, {"recipe": recipe, **cfg.to_dict()}, _run_only(cfg))


def differences(
    before: Mapping[str, Any], after: Mapping[str, Any], ignored: Collection[str] = ()
) -> list[str]:
    """``["key: old → new", …]`` between two nested settings mappings, by dotted key, but ``ignored``."""
    before, after = _flatten(before), _flatten(after)
    out = []
    for key in [*after, *(k for k in before if k not in after)]:
        a, b = before.get(key, _ABSENT), after.get(key, _ABSENT)
        if key not in ignored and not _same(a, b):
            out.append(f"{key}: {_shown(a)} → {_shown(b)}")
    return out


_ABSENT = object()


def _run_only(cfg: Any) -> set[str]:
    keys = {k for k in RUN_ONLY_KEYS if not k.startswith("<training>")}
    for where, t in _training_blocks(cfg):
        for key in RUN_ONLY_KEYS:
            name = key.removeprefix("<training>.")
            if key.startswith("<training>") and (name != "steps" or t.schedule not in STEPS_DECAY):
                keys.add(f"{where}.{name}")
    return keys


def _training_blocks(cfg: Any, where: str = "") -> list[tuple[str, TrainingSettings]]:
    """``(dotted key, block)`` of every :class:`TrainingSettings` in a settings tree."""
    if isinstance(cfg, TrainingSettings):
        return [(where, cfg)]
    if not attrs.has(type(cfg)):
        return []
    found = []
    for f in attrs.fields(type(cfg)):
        found += _training_blocks(getattr(cfg, f.name), f"{where}.{f.name}" if where else f.name)
    return found


def _training_keys(cfg: Any) -> dict[int, str]:
    return {id(t): where for where, t in _training_blocks(cfg)}


def _flatten(data: Mapping[str, Any], where: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in data.items():
        key = f"{where}.{k}" if where else str(k)
        if isinstance(v, Mapping):  # an empty block is no key: {} and {a: 1} differ in a only
            out |= _flatten(v, key)
        else:
            out[key] = list(v) if isinstance(v, tuple) else v
    return out


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return type(a) is type(b) and a == b if isinstance(a, bool) or isinstance(b, bool) else a == b


def _shown(value: Any) -> str:
    return "(absent)" if value is _ABSENT else json.dumps(value, default=str)


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
        self.pending_config: dict[str, Any] | None = None  # a resumed run's config.yaml, held back
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

    def write_config(self) -> None:
        """Write ``config.yaml`` if :func:`open_run` held it back (a resumed run, once it goes on)."""
        if self.pending_config is not None and self.enabled:
            _write_config(self.run_dir, self.pending_config)
        self.pending_config = None

    def metrics_size(self) -> int:
        """How many bytes ``metrics.jsonl`` holds (a checkpoint notes it for :meth:`rewind_metrics`)."""
        path = self.run_dir / "metrics.jsonl"
        return path.stat().st_size if self.enabled and path.is_file() else 0

    def rewind_metrics(self, size: int) -> None:
        """Cut ``metrics.jsonl`` back to ``size`` bytes, what it held when the checkpoint a run resumes
        from was written: the rows after it are of steps the resumed run computes and logs again.
        (TensorBoard and W&B keep theirs: they show both.)"""
        path = self.run_dir / "metrics.jsonl"
        if self.enabled and path.is_file() and path.stat().st_size > size:
            with open(path, "r+b") as f:
                f.truncate(size)

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
