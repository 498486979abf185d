"""The training kit: small pieces a recipe calls from its own loop (as torchtune's recipes do).

Nothing here owns a loop or calls back into a recipe.  A recipe builds the pieces in ``setup`` and
writes its step where a reader sees it::

    for batch in state.batches:                    # the rest of the run, from the resume point
        for part, sync in micro_batches(batch, t.grad_accum, ddp_model, dist):
            with sync, autocast(device, t.dtype):
                loss = ddp_model(part["x"], part["y"])
            logs["loss"] += backward(loss, t.grad_accum, state.step)
        logs |= state.update()                     # optimiser step, schedule, EMA
        state.step += 1
        if t.checkpoint_due(state.step):
            state.save()

The pieces: :class:`TrainingSettings` (the ``training`` block), :class:`Optimization` (AdamW, the LR
schedule, gradient clipping), :class:`EMA`, :class:`Batches` (the data order and its resumable
position), :func:`micro_batches` and :func:`backward` (gradient accumulation under DDP),
:class:`StepLog` (progress bar and averaged scalars), :class:`Checkpointer`, and :class:`TrainState`,
which holds one run's model, optimisation, EMA, data position and step and saves or resumes them.

A checkpoint is a folder ``checkpoints/<step>/`` of named weight files (our safetensors, config in
the metadata) and ``state.pt`` (optimisers, schedules, step, every RNG state, the data position); it
is written under a hidden name and renamed when whole, so a process killed at any moment leaves
only whole checkpoints, and resuming from one continues bitwise as if never stopped.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from tqdm.auto import tqdm

from latentforge_core.checkpoint import (
    CheckpointError,
    check_state_dict,
    load_checkpoint,
    load_torch_file,
    save_checkpoint,
    save_torch,
)
from latentforge_core.device import rng_state, set_rng_state
from latentforge_runner import distributed
from latentforge_runner.config import Settings, settings
from latentforge_runner.data import ResumableBatchSampler, collate

log = logging.getLogger("latentforge")


# ------------------------------------------------------------------------------------------------
# Settings
# ------------------------------------------------------------------------------------------------
@settings
class TrainingSettings(Settings):
    """One optimisation run; defaults follow LightningDiT/RAE stage 2 (AdamW, betas 0.9/0.95)."""

    steps: int = 1000
    batch_size: int = 64  # global: summed over processes and accumulation steps
    grad_accum: int = 1
    lr: float = 2e-4
    final_lr: float = 2e-5  # where ``linear``/``cosine`` decay ends
    schedule: Literal["constant", "linear", "cosine", "inverse_sqrt"] = "constant"  # inverse_sqrt: DiGIT
    warmup_steps: int = 0
    warmup_from_zero: bool = True  # False: hold ``lr`` during warm-up (RAE stage 2's ``linear``)
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.0
    eps: float = 1e-8
    grad_clip: float | None = None  # max global grad norm; None = no clipping
    ema_decay: float | None = 0.9999  # None = no EMA
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU
    compile: bool = False
    seed: int = 0
    log_every: int = 50
    checkpoint_every: int = 1000
    keep_checkpoints: int = 2
    num_workers: int = 0

    def __attrs_post_init__(self):
        for name in (
            "steps",
            "batch_size",
            "grad_accum",
            "log_every",
            "checkpoint_every",
            "keep_checkpoints",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"training.{name} must be ≥ 1, got {getattr(self, name)}")
        if self.batch_size % self.grad_accum:
            raise ValueError(
                f"training.batch_size {self.batch_size} is not divisible by grad_accum {self.grad_accum}"
            )
        if self.ema_decay is not None and not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"training.ema_decay must be in [0, 1), got {self.ema_decay}")

    @property
    def dtype(self) -> torch.dtype | None:
        """The autocast dtype (None: the device's default, bf16 on CUDA and fp32 on CPU)."""
        return {"auto": None, "fp32": torch.float32, "bf16": torch.bfloat16}[self.precision]

    def checkpoint_due(self, step: int) -> bool:
        return step % self.checkpoint_every == 0 or step == self.steps


# ------------------------------------------------------------------------------------------------
# Optimisation: AdamW, LR schedule, clipping
# ------------------------------------------------------------------------------------------------
def lr_lambda(t: TrainingSettings) -> Callable[[int], float]:
    """Multiplier of ``t.lr`` at each step: warm-up, then constant, linear or cosine decay to ``final_lr``."""
    final = t.final_lr / t.lr if t.lr > 0 else 1.0

    def factor(step: int) -> float:
        if step < t.warmup_steps:
            return (step + 1) / t.warmup_steps if t.warmup_from_zero else 1.0
        if t.schedule == "constant":
            return 1.0
        if t.schedule == "inverse_sqrt":
            return math.sqrt(max(1, t.warmup_steps) / (step + 1))
        progress = min(1.0, (step - t.warmup_steps) / max(1, t.steps - t.warmup_steps))
        if t.schedule == "linear":
            return 1.0 + (final - 1.0) * progress
        return final + (1.0 - final) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


class Optimization:
    """AdamW over the trainable ``params`` with the settings' schedule and clipping; one ``step`` per
    update (the schedule advances on updates, as RAE's discriminator schedule does)."""

    def __init__(self, params: Iterable[torch.nn.Parameter], t: TrainingSettings, what: str = "model"):
        self.params = [p for p in params if p.requires_grad]
        if not self.params:
            raise ValueError(f"the {what} has no trainable parameters")
        self.grad_clip = t.grad_clip
        self.optimizer = torch.optim.AdamW(
            self.params, lr=t.lr, betas=t.betas, eps=t.eps, weight_decay=t.weight_decay
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(t))

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def step(self) -> dict[str, float]:
        """Clip, update, zero the gradients, advance the schedule; returns ``grad_norm`` when clipping."""
        logs = {}
        if self.grad_clip is not None:
            logs["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return logs

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])


# ------------------------------------------------------------------------------------------------
# EMA
# ------------------------------------------------------------------------------------------------
class EMA:
    """An exponential moving average of a model's parameters (buffers copied), updated every step."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.module = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        ema_params = dict(self.module.named_parameters())
        for name, param in model.named_parameters():
            ema_params[name].lerp_(param.detach(), 1.0 - self.decay)
        ema_buffers = dict(self.module.named_buffers())
        for name, buf in model.named_buffers():
            ema_buffers[name].copy_(buf)


# ------------------------------------------------------------------------------------------------
# Batches: the data order, resumable
# ------------------------------------------------------------------------------------------------
class Batches:
    """The run's batches on ``device``, from the current data position until ``steps`` batches were
    handed out in all (a resumed run continues the count).

    ``data`` is ``fetch(indices) -> batch`` (data in memory) or a Dataset read by a fresh DataLoader
    per epoch with ``t.num_workers`` workers and :func:`~latentforge_runner.data.collate`.  Unreadable
    images are dropped from their batch and listed in ``skipped``; a batch with none left is passed
    over (it moves the data position but is no step).
    """

    def __init__(
        self,
        data: Callable[[list[int]], Mapping[str, Any]] | torch.utils.data.Dataset,
        num_items: int,
        t: TrainingSettings,
        dist: distributed.DistInfo,
    ):
        self.data, self.t, self.device = data, t, dist.device
        self.sampler = ResumableBatchSampler(
            num_items, t.batch_size, seed=t.seed, rank=dist.rank, world_size=dist.world_size
        )
        self.handed_out = 0  # batches yielded over the whole run (= optimiser steps), restored on resume
        self.epoch = 0  # the epoch of the batch last handed out (RAE's GAN gates count epochs)
        self.skipped: list[str] = []

    def __iter__(self) -> Iterator[dict[str, Any]]:
        while self.handed_out < self.t.steps:
            for batch in self._epoch():
                self.epoch = self.sampler.epoch
                self.sampler.advance()  # the position moves before the step, so a checkpoint holds it
                self.skipped += batch.get("skipped", [])
                if any(v is None for v in batch.values()):
                    log.warning("after %d batches: every image of one was unreadable", self.handed_out)
                    continue
                self.handed_out += 1
                yield {
                    k: v.to(self.device, non_blocking=True) if isinstance(v, torch.Tensor) else v
                    for k, v in batch.items()
                    if k != "skipped"
                }
                if self.handed_out >= self.t.steps:
                    break
        if self.skipped:
            log.warning("skipped %d unreadable image(s), first: %s", len(self.skipped), self.skipped[0])

    def _epoch(self) -> Iterable[Mapping[str, Any]]:
        """The rest of the current epoch's batches, from the sampler's position."""
        if not isinstance(self.data, torch.utils.data.Dataset):
            return (self.data(indices) for indices in self.sampler)
        images = self.data.dataset if isinstance(self.data, torch.utils.data.Subset) else self.data
        if hasattr(images, "set_epoch"):  # new random crops/flips each epoch, the same after a resume
            images.set_epoch(self.sampler.epoch)
        # A fresh loader per epoch, its worker seeds drawn from its own generator, so that creating
        # it never touches the global RNG (a resumed run creates one at another moment).
        generator = torch.Generator().manual_seed(self.t.seed * 100_003 + self.sampler.epoch)
        return torch.utils.data.DataLoader(
            self.data,
            batch_sampler=self.sampler,
            num_workers=self.t.num_workers,
            collate_fn=collate,
            generator=generator,
            pin_memory=self.device.type == "cuda",
        )

    def state_dict(self) -> dict[str, Any]:
        return {**self.sampler.state_dict(), "handed_out": self.handed_out, "skipped": len(self.skipped)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.sampler.load_state_dict(state)
        self.handed_out = state["handed_out"]


# ------------------------------------------------------------------------------------------------
# One update: micro-batches under DDP, a checked backward
# ------------------------------------------------------------------------------------------------
def micro_batches(
    batch: Mapping[str, Any], parts: int, ddp_model: torch.nn.Module, dist: distributed.DistInfo
) -> Iterator[tuple[dict[str, Any], contextlib.AbstractContextManager]]:
    """``batch`` split into ``parts`` along dim 0, each with the context its backward runs in."""
    split = split_batch(batch, parts)
    return zip(split, sync_contexts(ddp_model, dist, parts), strict=True)


def sync_contexts(
    ddp_model: torch.nn.Module, dist: distributed.DistInfo, parts: int
) -> Iterator[contextlib.AbstractContextManager]:
    """DDP's ``no_sync`` for all but the last of ``parts`` backwards: gradients are all-reduced once
    per update."""
    for i in range(parts):
        yield ddp_model.no_sync() if dist.enabled and i < parts - 1 else contextlib.nullcontext()


def backward(loss: torch.Tensor, parts: int, step: int, what: str = "loss") -> float:
    """``(loss / parts).backward()`` after checking it is finite; returns its share of the step's loss."""
    if not torch.isfinite(loss):
        raise FloatingPointError(
            f"the {what} is {loss.item()} at step {step}; lower training.lr or set training.grad_clip "
            "(the last checkpoint is intact)"
        )
    (loss / parts).backward()
    return float(loss.detach()) / parts


def split_batch(batch: Mapping[str, Any], parts: int) -> list[dict[str, Any]]:
    if parts == 1:
        return [dict(batch)]
    out: list[dict[str, Any]] = [{} for _ in range(parts)]
    for key, value in batch.items():
        chunks = value.chunk(parts) if isinstance(value, torch.Tensor) else [value] * parts
        if len(chunks) != parts:
            raise ValueError(
                f"batch field {key!r} of {len(value)} cannot be split into {parts} micro-batches"
            )
        for d, c in zip(out, chunks, strict=True):
            d[key] = c
    return out


# ------------------------------------------------------------------------------------------------
# Logging: a progress bar, scalars averaged over ``log_every`` steps
# ------------------------------------------------------------------------------------------------
class StepLog:
    """Sums each step's scalars; every ``log_every`` steps (and at the last) writes their averages,
    the LR and images/s to the run logger under ``<desc>/``."""

    def __init__(self, t: TrainingSettings, logger: Any, start: int, desc: str, show: bool):
        self.t, self.logger, self.desc = t, logger, desc
        self.bar = tqdm(
            total=t.steps, initial=start, desc=desc, disable=not show, dynamic_ncols=True, unit="step"
        )
        self.window: dict[str, list[float]] = {}
        self.last: dict[str, float] = {}
        self.start, self.start_step = time.perf_counter(), start

    def update(self, step: int, logs: Mapping[str, float], lr: float) -> None:
        self.bar.update(1)
        for k, v in logs.items():
            self.window.setdefault(k, []).append(v)
        if step % self.t.log_every and step != self.t.steps:
            return
        last = {k: sum(v) / len(v) for k, v in self.window.items()}
        last["lr"] = lr
        last["images_per_s"] = (
            (step - self.start_step) * self.t.batch_size / (time.perf_counter() - self.start)
        )
        self.logger.scalars({f"{self.desc}/{k}": v for k, v in last.items()}, step)
        self.bar.set_postfix(loss=f"{last.get('loss', float('nan')):.4f}")
        self.window, self.last = {}, last

    def close(self) -> dict[str, float]:
        self.bar.close()
        return self.last


# ------------------------------------------------------------------------------------------------
# Checkpoints
# ------------------------------------------------------------------------------------------------
class Checkpointer:
    """Whole-or-nothing checkpoint folders ``<run_dir>/checkpoints/<step>/`` (the newest ``keep``).

    ``weights`` name the modules saved as ``<name>.safetensors`` (``model`` carries ``config``, whose
    ``name`` a resume checks); ``state`` is everything else, saved with the RNG states as ``state.pt``.
    """

    def __init__(self, run_dir: str | Path, keep: int, dist: distributed.DistInfo, config: Mapping[str, Any]):
        self.folder = Path(run_dir) / "checkpoints"
        self.keep, self.dist, self.config = keep, dist, dict(config)

    def save(self, step: int, weights: Mapping[str, torch.nn.Module], state: Mapping[str, Any]) -> Path:
        """Write ``checkpoints/<step>/`` on the main process; every process waits for it."""
        final = self.folder / f"{step:08d}"
        if self.dist.is_main and not final.exists():
            tmp = self.folder / f".{final.name}.partial"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            for name, module in weights.items():
                meta = {**self.config, "step": step} if name in ("model", "ema") else {"step": step}
                save_checkpoint(module.state_dict(), tmp / f"{name}.safetensors", meta)
            save_torch({**state, "step": step, "rng": rng_state()}, tmp / "state.pt")
            os.replace(tmp, final)
            _fsync_dir(self.folder)
            for old in list_checkpoints(self.folder)[: -self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        distributed.barrier()
        return final

    def latest(self) -> Path | None:
        """The newest whole checkpoint (unfinished ones, left by a kill, are removed first)."""
        for partial in self.folder.glob(".*.partial"):
            log.warning("removing the unfinished checkpoint %s (the run stopped while writing it)", partial)
            shutil.rmtree(partial, ignore_errors=True)
        found = list_checkpoints(self.folder)
        return found[-1] if found else None

    def load(self, folder: str | Path, weights: Mapping[str, torch.nn.Module]) -> dict[str, Any]:
        """Load ``weights`` from ``folder`` and restore the RNG states; returns the saved state."""
        folder = Path(folder)
        expected = self.config.get("name")
        for name, module in weights.items():
            path = folder / f"{name}.safetensors"
            if not path.is_file():
                raise CheckpointError(
                    f"{folder} has no {name} weights ({path.name}), but this run trains one"
                )
            sd, config = load_checkpoint(path)
            if name == "model" and expected and config.get("name") not in (None, expected):
                raise CheckpointError(
                    f"{folder} is a checkpoint of {config.get('name')!r}, but this run trains {expected!r}"
                )
            what = f"model {expected or type(module).__name__}" if name == "model" else name
            check_state_dict(module.state_dict(), sd, what=what)
            module.load_state_dict(sd)
        state = load_torch_file(folder / "state.pt")
        set_rng_state(state["rng"])
        log.info("resumed from %s at step %d", folder, state["step"])
        return state


# ------------------------------------------------------------------------------------------------
# The state of a run, together
# ------------------------------------------------------------------------------------------------
class TrainState:
    """What one run optimises and checkpoints: ``model`` with its :class:`Optimization` and
    :class:`EMA`, the data's :class:`Batches`, the step, and any further ``(module, optimisation)``
    pairs (a GAN's discriminator) added with :meth:`add`.  It holds no loop: the recipe's loop reads
    ``batches``, updates through ``optim`` and calls :meth:`save` when a checkpoint is due."""

    def __init__(
        self,
        model: torch.nn.Module,
        t: TrainingSettings,
        *,
        data: Callable[[list[int]], Mapping[str, Any]] | torch.utils.data.Dataset,
        num_items: int,
        dist: distributed.DistInfo,
        run_dir: str | Path,
        config: Mapping[str, Any] | None = None,
        params: Iterable[torch.nn.Parameter] | None = None,
    ):
        self.model, self.t, self.dist = model, t, dist
        self.optim = Optimization(model.parameters() if params is None else params, t)
        self.ema = EMA(model, t.ema_decay) if t.ema_decay is not None else None
        self.batches = Batches(data, num_items, t, dist)
        self.checkpointer = Checkpointer(run_dir, t.keep_checkpoints, dist, config or {})
        self.others: dict[str, tuple[torch.nn.Module, Optimization, str]] = {}
        self.step = 0

    def add(self, name: str, module: torch.nn.Module, key: str) -> Optimization:
        """Optimise ``module`` too (AdamW with the same settings): its weights are saved as
        ``<name>.safetensors``, its optimiser and schedule as ``<key>_optimizer``/``<key>_scheduler``."""
        optim = Optimization(module.parameters(), self.t, what=name)
        self.others[name] = (module, optim, key)
        return optim

    def update(self) -> dict[str, float]:
        """The model's optimiser step, then its EMA; returns ``grad_norm`` when clipping."""
        logs = self.optim.step()
        if self.ema is not None:
            self.ema.update(self.model)
        return logs

    def eval_model(self) -> torch.nn.Module:
        """The EMA weights when there are any, else the live model, in eval mode."""
        return (self.ema.module if self.ema is not None else self.model).eval()

    def _weights(self) -> dict[str, torch.nn.Module]:
        weights = {"model": self.model} | ({"ema": self.ema.module} if self.ema is not None else {})
        return weights | {name: module for name, (module, _, _) in self.others.items()}

    def save(self) -> Path:
        state = {**self.optim.state_dict(), "data": self.batches.state_dict()}
        for _, optim, key in self.others.values():
            state |= {f"{key}_{part}": value for part, value in optim.state_dict().items()}
        return self.checkpointer.save(self.step, self._weights(), state)

    def resume(self, folder: str | Path | None = None) -> bool:
        """Continue from ``folder`` or the run's newest whole checkpoint; False when there is none."""
        folder = folder if folder is not None else self.checkpointer.latest()
        if folder is None:
            return False
        state = self.checkpointer.load(folder, self._weights())
        self.optim.load_state_dict(state)
        for name, (_, optim, key) in self.others.items():
            if f"{key}_optimizer" not in state:
                raise CheckpointError(f"{folder} has no {name} optimiser state, but this run trains one")
            optim.load_state_dict({part: state[f"{key}_{part}"] for part in ("optimizer", "scheduler")})
        self.batches.load_state_dict(state["data"])
        self.step = state["step"]
        return True


def list_checkpoints(folder: str | Path) -> list[Path]:
    """Complete checkpoint folders, oldest first (hidden ``.partial`` ones excluded)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_dir() and p.name.isdigit())


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
