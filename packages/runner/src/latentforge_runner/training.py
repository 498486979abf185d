"""The training kit: small pieces a recipe calls from its own loop (as torchtune's recipes do).

Nothing here owns a loop or calls back into a recipe.  A recipe builds the pieces in ``setup`` and
writes its step where a reader sees it::

    progress = state.step_log(logger, "generator")  # averaged scalars, a bar or plain lines
    for batch in state.steps():                    # the rest of the run, from the resume point
        for part, sync in micro_batches(batch, t.grad_accum, ddp_model, dist):
            with sync, autocast(device, t.dtype):
                loss = ddp_model(part["x"], part["y"])
            logs["loss"] += backward(loss, t.grad_accum, state.step)
        logs |= state.update()                     # optimiser step, schedule, EMA
        state.step += 1
        progress.update(state.step, logs, state.optim.lr)
        if t.checkpoint_due(state.step):
            state.save()

The pieces: :class:`TrainingSettings` (the ``training`` block), :class:`Optimization` (AdamW, the LR
schedule, gradient clipping), :class:`EMA`, :class:`Batches` (the data order and its resumable
position), :func:`micro_batches` and :func:`backward` (gradient accumulation under DDP),
:class:`StepLog` (progress and averaged scalars), :class:`Checkpointer`, and :class:`TrainState`,
which holds one run's model, optimisation, EMA, data position and step and saves or resumes them.

A checkpoint is a folder ``checkpoints/<step>/`` of named weight files (our safetensors, config in
the metadata) and ``state.pt`` (optimisers, schedules, step, every RNG state, the data position, the
step logs' running windows); it is written under a hidden name and renamed when whole, so a process
killed at any moment leaves only whole checkpoints, and resuming from one continues bitwise as if
never stopped.  A newest checkpoint that does not load (a file truncated or corrupted after it was
written) is set aside with a warning and the one before it resumes.  :meth:`TrainState.steps` stops
on SIGINT/SIGTERM after the current step, writes a checkpoint and raises
:class:`~latentforge_core.errors.RunInterrupted`: rerunning the same command resumes.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, Literal, NoReturn

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
from latentforge_core.errors import InputError, InputTypeError, NumericalError, RunInterrupted, first_line
from latentforge_runner import distributed, ema
from latentforge_runner.config import ConfigError, SettingError, Settings, setting, settings
from latentforge_runner.data import ResumableBatchSampler, collate
from latentforge_runner.ema import SIGMA_REL_MAX

log = logging.getLogger("latentforge")


# ------------------------------------------------------------------------------------------------
# Settings
# ------------------------------------------------------------------------------------------------
@settings
class TrainingSettings(Settings):
    """One optimisation run; defaults follow LightningDiT/RAE stage 2 (AdamW, betas 0.9/0.95)."""

    steps: int = setting(1000, ge=1)  # optimiser updates in the whole run
    batch_size: int = setting(64, ge=1)  # global: summed over processes and accumulation steps
    grad_accum: int = setting(1, ge=1)  # micro-batches per update (batch_size must be a multiple)
    lr: float = setting(2e-4, gt=0)  # peak learning rate of AdamW
    final_lr: float = setting(2e-5, ge=0)  # where ``linear``/``cosine`` decay ends
    decay_end: int | None = setting(None, ge=1)  # step where decay reaches final_lr (None: training.steps)
    schedule: Literal["constant", "linear", "cosine", "inverse_sqrt"] = "constant"  # inverse_sqrt: DiGIT
    warmup_steps: int = setting(0, ge=0)  # linear warm-up updates before the schedule
    warmup_from_zero: bool = True  # False: hold ``lr`` during warm-up (RAE stage 2's ``linear``)
    betas: tuple[float, float] = setting((0.9, 0.95), ge=0, lt=1)  # AdamW's (beta1, beta2)
    weight_decay: float = setting(0.0, ge=0)  # AdamW's decoupled weight decay
    eps: float = setting(1e-8, gt=0)  # AdamW's epsilon
    grad_clip: float | None = setting(None, gt=0)  # max global grad norm; None = no clipping
    ema_decay: float | None = setting(0.9999, ge=0, lt=1)  # None = no EMA
    ema_decays: tuple[float, ...] = setting((), ge=0, lt=1)  # more EMA rates tracked: ema_<decay>.safetensors
    # EDM2's power-function EMAs tracked (σ_rel each, e.g. [0.05, 0.1]): ema_sigma_<σ_rel>.safetensors
    ema_profiles: tuple[float, ...] = setting((), gt=0, lt=SIGMA_REL_MAX)
    # Steps between snapshots of the ema_profiles in <run>/ema_snapshots/ (kept: post-hoc EMA reads them)
    ema_snapshot_every: int | None = setting(None, ge=1)
    # auto: bf16 autocast on CUDA, fp32 on CPU; fp16: fp16 autocast with a gradient scaler (GPUs without
    # bf16), its scale saved in every checkpoint
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    compile: bool = False  # torch.compile the model (CUDA; slow to start)
    seed: int = setting(0, ge=0, lt=2**32)  # data order and augmentation
    log_every: int = setting(50, ge=1)  # updates between logged scalars
    checkpoint_every: int = setting(1000, ge=1)  # updates between checkpoints (and one at the end)
    keep_checkpoints: int = setting(2, ge=1)  # newest whole checkpoints kept on disk
    # full: whole weights gathered to the main process, which writes safetensors; sharded: every process
    # writes its own shards of weights and optimiser state (a DCP folder: no gather, for fsdp/hsdp runs
    # too large for one process), resumable on any number of processes; `latentforge export` makes
    # safetensors of it
    checkpoint_format: Literal["full", "sharded"] = "full"
    num_workers: int = setting(0, ge=0)  # data loader processes (0: load in the main process)
    # Wall-clock budget of this process in minutes (a cluster job's limit less the time a checkpoint
    # takes): before a step that would not fit, checkpoint and exit 75 (requeue); None: no budget.
    max_minutes: float | None = setting(None, gt=0)
    # Several processes: ddp (a replica each), fsdp (FSDP2: parameters, gradients and optimiser state
    # sharded over all processes, per transformer block) or hsdp (sharded within groups of
    # hsdp_shard_size processes, replicated across them).  One process runs unsharded whatever this is.
    strategy: Literal["ddp", "fsdp", "hsdp"] = "ddp"
    hsdp_shard_size: int | None = setting(None, ge=1)  # hsdp: processes per shard group (None: a node's)
    cpu_offload: bool = False  # fsdp: keep the shards and optimiser state in host memory (CUDA only)
    # Recompute the transformer blocks' activations in the backward instead of keeping them: none,
    # full (every block) or every_k (blocks 0, k, 2k, … with k = activation_checkpointing_every).
    activation_checkpointing: Literal["none", "full", "every_k"] = "none"
    activation_checkpointing_every: int = setting(2, ge=1)  # k of every_k

    def __attrs_post_init__(self):
        if self.batch_size % self.grad_accum:
            example = max(1, self.batch_size // self.grad_accum) * self.grad_accum
            raise SettingError(
                "batch_size",
                f"batch_size {self.batch_size} is not divisible by grad_accum {self.grad_accum}: expected "
                f"a multiple of grad_accum (e.g. {example})",
            )
        if self.decay_end is not None and self.decay_end <= self.warmup_steps:
            raise SettingError(
                "decay_end",
                f"decay_end {self.decay_end} must come after the warm-up ({self.warmup_steps} steps): "
                "expected decay_end > warmup_steps",
            )
        for key in ("ema_decays", "ema_profiles"):
            values = getattr(self, key)
            if len(set(values)) != len(values):
                raise SettingError(key, f"{key} {list(values)} names a value twice: expected distinct values")
        if self.ema_snapshot_every is not None and not self.ema_profiles:
            raise SettingError(
                "ema_snapshot_every",
                "ema_snapshot_every snapshots the power-function EMAs, but ema_profiles is empty: set "
                "training.ema_profiles (e.g. [0.05, 0.1]) or leave ema_snapshot_every unset",
            )
        if self.cpu_offload and self.strategy != "fsdp":
            raise SettingError(
                "cpu_offload",
                f"cpu_offload applies to training.strategy fsdp, not {self.strategy}: set "
                "training.strategy=fsdp or training.cpu_offload=false",
            )
        if self.hsdp_shard_size is not None and self.strategy != "hsdp":
            raise SettingError(
                "hsdp_shard_size",
                f"hsdp_shard_size applies to training.strategy hsdp, not {self.strategy}: set "
                "training.strategy=hsdp or leave hsdp_shard_size unset",
            )

    @property
    def dtype(self) -> torch.dtype | None:
        """The autocast dtype (None: the device's default, bf16 on CUDA and fp32 on CPU)."""
        return {"auto": None, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[
            self.precision
        ]

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
        end = t.steps if t.decay_end is None else t.decay_end  # constant at final_lr after it
        progress = min(1.0, (step - t.warmup_steps) / max(1, end - t.warmup_steps))
        if t.schedule == "linear":
            return 1.0 + (final - 1.0) * progress
        return final + (1.0 - final) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


class Optimization:
    """AdamW over the trainable ``params`` with the settings' schedule and clipping; one ``step`` per
    update (the schedule advances on updates, as RAE's discriminator schedule does).

    Under ``precision: fp16`` a gradient scaler multiplies the loss before :meth:`backward` and unscales
    the gradients before clipping; a step whose gradients overflowed is skipped and the scale halved
    (PyTorch's ``GradScaler``; under FSDP2 the overflow flag is reduced over the shards by DTensor)."""

    def __init__(self, params: Iterable[torch.nn.Parameter], t: TrainingSettings, what: str = "model"):
        self.params = [p for p in params if p.requires_grad]
        if not self.params:
            raise InputError(f"the {what} has no trainable parameters: expected some with requires_grad")
        self.grad_clip = t.grad_clip
        self.optimizer = torch.optim.AdamW(
            self.params, lr=t.lr, betas=t.betas, eps=t.eps, weight_decay=t.weight_decay
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(t))
        fp16 = t.precision == "fp16"
        self.scaler = torch.amp.GradScaler(self.params[0].device.type, enabled=fp16) if fp16 else None

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def backward(self, loss: torch.Tensor, parts: int, step: int, what: str = "loss") -> float:
        """``(loss / parts).backward()`` (scaled under fp16) after checking the loss is finite; returns
        its share of the step's loss (one read of the value: the check and the log share the sync)."""
        value = float(loss.detach())
        if not math.isfinite(value):
            raise NumericalError(
                f"the {what} is {value} at step {step}; lower training.lr or set training.grad_clip "
                "(the last checkpoint is intact)"
            )
        share = loss / parts
        (share if self.scaler is None else self.scaler.scale(share)).backward()
        return value / parts

    def step(self) -> dict[str, float]:
        """Clip, update, zero the gradients, advance the schedule; returns ``grad_norm`` when clipping
        and ``loss_scale`` (the scale this step's gradients had) under fp16."""
        logs = {}
        if self.scaler is not None:
            logs["loss_scale"] = self.scaler.get_scale()
            self.scaler.unscale_(self.optimizer)
        if self.grad_clip is not None:
            logs["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip))
        with warnings.catch_warnings():
            if self.scaler is None:
                self.optimizer.step()
            else:
                self.scaler.step(self.optimizer)  # skipped when the gradients overflowed
                self.scaler.update()
                # the schedule counts updates tried, skipped ones too (as every fp16 trainer's does)
                warnings.filterwarnings("ignore", "Detected call of `lr_scheduler.step", UserWarning)
            self.optimizer.zero_grad(set_to_none=True)
            self.scheduler.step()
        return logs

    def state_dict(self, whole: bool = True) -> dict[str, Any]:
        """The optimiser's and schedule's states; under FSDP with whole tensors (gathered on every
        process, in host memory), so a checkpoint is the same whatever the processes and strategy —
        or, ``whole=False``, the tensors as this process holds them (what a sharded checkpoint writes)."""
        optimizer = self.optimizer.state_dict()
        if whole and any(isinstance(p, _DTensor()) for p in self.params):
            whole = distributed.full_tensor
            optimizer["state"] = {
                i: {k: whole(v).cpu() if isinstance(v, _DTensor()) else v for k, v in s.items()}
                for i, s in optimizer["state"].items()
            }
        state = {"optimizer": optimizer, "scheduler": self.scheduler.state_dict()}
        return state | ({"scaler": self.scaler.state_dict()} if self.scaler is not None else {})

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        optimizer = state["optimizer"]
        if any(isinstance(p, _DTensor()) for p in self.params):  # whole tensors, cut as the shards
            params = dict(enumerate(self.params))  # the optimiser's indices (one param group)
            optimizer = {
                **optimizer,
                "state": {
                    i: {
                        k: distributed.shard_like(v, params[i])
                        if isinstance(v, torch.Tensor) and i in params and v.shape == params[i].shape
                        else v
                        for k, v in s.items()
                    }
                    for i, s in optimizer["state"].items()
                },
            }
        self.optimizer.load_state_dict(optimizer)
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and "scaler" in state:  # a run switched to fp16 starts a new scale
            self.scaler.load_state_dict(state["scaler"])


def _DTensor() -> type:
    from torch.distributed.tensor import DTensor

    return DTensor


# ------------------------------------------------------------------------------------------------
# EMA
# ------------------------------------------------------------------------------------------------
class EMA:
    """An exponential moving average of a model's parameters (buffers copied), updated every step.

    Under FSDP it is sharded as its model is (:func:`~latentforge_runner.distributed.average_copy`):
    each process holds and updates its own shards, with no communication, and the whole EMA is
    gathered only to evaluate (:meth:`TrainState.eval_model`), to save a full checkpoint or a snapshot."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.module = distributed.average_copy(model).eval()

    def decay_at(self, step: int) -> float:
        """The decay of the update that ends ``step`` (1 for the first)."""
        return self.decay

    def update(self, model: torch.nn.Module, step: int) -> None:
        """Average in ``model``'s parameters after the update that ends ``step``."""
        update_averages([self], model, step)


class PowerEMA(EMA):
    """EDM2's power-function EMA of width ``sigma_rel``: at step t it weighs step τ's parameters in
    proportion to τ^γ, so it averages a fixed fraction of the run whatever its length (see
    :mod:`latentforge_runner.ema`; its snapshots make any other width reconstructible after training)."""

    def __init__(self, model: torch.nn.Module, sigma_rel: float):
        super().__init__(model, decay=0.0)
        self.sigma_rel, self.gamma = sigma_rel, ema.gamma_of(sigma_rel)

    def decay_at(self, step: int) -> float:
        return ema.power_beta(self.gamma, step)


@torch.no_grad()
def update_averages(averages: Iterable[EMA], model: torch.nn.Module, step: int) -> None:
    """Every EMA of ``averages`` after the update that ends ``step``; under FSDP each process lerps its
    shards toward the model's (the same placements: no communication)."""
    averages = list(averages)
    weights = [1.0 - average.decay_at(step) for average in averages]
    params = [dict(average.module.named_parameters()) for average in averages]
    local = distributed.local_tensor
    for name, param in model.named_parameters():
        source = local(param.detach())
        for own, weight in zip(params, weights, strict=True):
            target = local(own[name])
            if target.shape != source.shape:  # lerp_ would broadcast a one-row shard silently
                raise InputError(
                    f"the EMA holds {name} as {tuple(target.shape)}, the model as {tuple(source.shape)}: "
                    "make the EMA of a model FSDP shards after distributed.wrap(..., training=t)"
                )
            target.lerp_(source, weight)
    buffers = [dict(average.module.named_buffers()) for average in averages]
    for name, buf in model.named_buffers():
        for own in buffers:
            own[name].copy_(buf)


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
        if t.batch_size % (dist.world_size * t.grad_accum):
            per = dist.world_size * t.grad_accum
            raise SettingError(
                "batch_size",
                f"batch_size {t.batch_size} is not divisible by {dist.world_size} process(es) × grad_accum "
                f"{t.grad_accum}: expected a multiple of {per} (e.g. {max(1, t.batch_size // per) * per})",
            )
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
            worker_init_fn=_ignore_interrupt if self.t.num_workers else None,
        )

    def state_dict(self) -> dict[str, Any]:
        return {**self.sampler.state_dict(), "handed_out": self.handed_out, "skipped": len(self.skipped)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.sampler.load_state_dict(state)
        self.handed_out = state["handed_out"]


def _ignore_interrupt(worker_id: int) -> None:
    """In a loader worker: Ctrl-C reaches the whole process group, and the main process stops the
    run cleanly (:meth:`TrainState.steps`) only if its workers live on to the end of the step."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


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
    """DDP's ``no_sync`` (FSDP's alike) for all but the last of ``parts`` backwards: gradients are
    reduced once per update."""
    for i in range(parts):
        yield distributed.no_sync(ddp_model) if dist.enabled and i < parts - 1 else contextlib.nullcontext()


def split_batch(batch: Mapping[str, Any], parts: int) -> list[dict[str, Any]]:
    if parts == 1:
        return [dict(batch)]
    out: list[dict[str, Any]] = [{} for _ in range(parts)]
    for key, value in batch.items():
        chunks = value.chunk(parts) if isinstance(value, torch.Tensor) else [value] * parts
        if len(chunks) != parts:
            raise InputError(
                f"batch field {key!r} of {len(value)} cannot be split into {parts} micro-batches"
            )
        for d, c in zip(out, chunks, strict=True):
            d[key] = c
    return out


# ------------------------------------------------------------------------------------------------
# Progress: a bar on a terminal, plain log lines elsewhere; scalars averaged over ``log_every`` steps
# ------------------------------------------------------------------------------------------------
def on_terminal() -> bool:
    """Whether progress may draw a bar: stderr is a terminal (or a notebook, where tqdm draws a widget).
    Elsewhere (a log file, a batch job's output) a bar's carriage returns are noise: lines are written."""
    isatty = getattr(sys.stderr, "isatty", None)
    return bool(isatty is not None and isatty()) or "ipykernel" in sys.modules


def progress_bar(
    iterable: Iterable[Any] | None = None,
    *,
    total: int | None = None,
    desc: str = "",
    unit: str = "it",
    disable: bool = False,
    initial: int = 0,
) -> Any:
    """A tqdm bar on a terminal; where stderr is not one, a :class:`ProgressLines` with the same calls
    (iteration, ``update``, ``set_postfix``, ``close``) that logs a plain line now and then."""
    if disable or on_terminal():
        return tqdm(iterable, total=total, desc=desc, unit=unit, disable=disable, initial=initial)
    return ProgressLines(iterable, total=total, desc=desc, unit=unit, initial=initial)


class ProgressLines:
    """What stands in for a progress bar where stderr is not a terminal: a log line (count, rate, ETA)
    at every tenth of ``total`` and at least every ``interval`` seconds, and one at the end."""

    def __init__(
        self,
        iterable: Iterable[Any] | None = None,
        *,
        total: int | None = None,
        desc: str = "",
        unit: str = "it",
        initial: int = 0,
        interval: float = 60.0,
    ):
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)  # type: ignore[arg-type]
        self.iterable, self.total, self.desc, self.unit = iterable, total, desc, unit
        self.n = self.start_n = self.logged_n = initial
        self.interval, self.postfix, self.closed = interval, "", False
        self.start = self.logged_at = time.perf_counter()

    def __iter__(self) -> Iterator[Any]:
        if self.iterable is None:
            raise InputTypeError("ProgressLines was given nothing to iterate over")
        for item in self.iterable:
            yield item
            self.update(1)
        self.close()

    def __enter__(self) -> ProgressLines:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def update(self, n: int = 1) -> None:
        total = self.total or 0
        tenth = total > 0 and self.n * 10 // total != (self.n + n) * 10 // total  # crossed a tenth
        self.n += n
        if tenth or time.perf_counter() - self.logged_at >= self.interval:
            self._line()

    def set_postfix(self, **values: Any) -> None:
        self.postfix = ", ".join(f"{k} {v}" for k, v in values.items())

    def close(self) -> None:
        if not self.closed and self.n != self.logged_n:
            self._line()
        self.closed = True

    def _line(self) -> None:
        now = time.perf_counter()
        rate = (self.n - self.start_n) / max(now - self.start, 1e-9)
        parts = [f"{self.desc}: {self.n}" + (f"/{self.total}" if self.total else "") + f" {self.unit}"]
        if self.total:
            parts[0] += f" ({100 * self.n / self.total:.0f}%)"
        parts.append(f"{rate:.3g} {self.unit}/s")
        if self.total and rate > 0 and self.n < self.total:
            parts.append(f"ETA {_duration((self.total - self.n) / rate)}")
        if self.postfix:
            parts.append(self.postfix)
        log.info(", ".join(parts))
        self.logged_n, self.logged_at = self.n, now


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class StepLog:
    """Sums each step's scalars; every ``log_every`` steps (and at the last) writes their averages,
    the LR and images/s to the run logger under ``<desc>/``.  Progress shows as a bar on a terminal and
    as a log line at each of those steps elsewhere (step, loss, LR, images/s, ETA).

    Its state (:meth:`state_dict`: the running window, the last averages and how long
    ``metrics.jsonl`` was) travels in the checkpoints (see :meth:`TrainState.step_log`), so a resumed
    run writes the same averages as an uninterrupted one; ``images_per_s`` is a timing of this
    process (from its first step) and differs."""

    def __init__(self, t: TrainingSettings, logger: Any, start: int, desc: str, show: bool):
        self.t, self.logger, self.desc = t, logger, desc
        self.lines = show and not on_terminal()
        self.bar = tqdm(
            total=t.steps,
            initial=start,
            desc=desc,
            disable=not show or self.lines,
            dynamic_ncols=True,
            unit="step",
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
        elapsed = time.perf_counter() - self.start
        last["images_per_s"] = (step - self.start_step) * self.t.batch_size / elapsed
        self.logger.scalars({f"{self.desc}/{k}": v for k, v in last.items()}, step)
        self.bar.set_postfix(loss=f"{last.get('loss', float('nan')):.4f}")
        if self.lines:
            rate = (step - self.start_step) / elapsed
            eta = f", ETA {_duration((self.t.steps - step) / rate)}" if step < self.t.steps else ""
            log.info(
                "%s: step %d/%d, loss %.4f, lr %.3g, %.3g images/s%s",
                self.desc,
                step,
                self.t.steps,
                last.get("loss", float("nan")),
                lr,
                last["images_per_s"],
                eta,
            )
        self.window, self.last = {}, last

    def close(self) -> dict[str, float]:
        self.bar.close()
        return self.last

    def state_dict(self) -> dict[str, Any]:
        return {
            "window": {k: list(v) for k, v in self.window.items()},
            "last": dict(self.last),
            "metrics_size": self.logger.metrics_size(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue the saved window; rows ``metrics.jsonl`` gained after the checkpoint (steps this run
        computes again) are cut off, unless nothing is left to run (a finished stage keeps its file)."""
        self.window = {k: list(v) for k, v in state["window"].items()}
        self.last = dict(state["last"])
        if self.start_step < self.t.steps:
            self.logger.rewind_metrics(state["metrics_size"])


# ------------------------------------------------------------------------------------------------
# Checkpoints
# ------------------------------------------------------------------------------------------------
class Checkpointer:
    """Whole-or-nothing checkpoint folders ``<run_dir>/checkpoints/<step>/`` (the newest ``keep``).

    ``weights`` name the modules saved; ``state`` is everything else, saved with the RNG states as
    ``state.pt``.  A full checkpoint holds each module as ``<name>.safetensors`` (``model`` and ``ema``
    carry ``config``, whose ``name`` a resume checks); a sharded one holds the modules and the
    optimisers' tensors in a DCP folder ``dcp/`` that every process writes its shards into, and
    ``config`` in ``state.pt``.  :meth:`load` reads either, on any number of processes.
    """

    def __init__(self, run_dir: str | Path, keep: int, dist: distributed.DistInfo, config: Mapping[str, Any]):
        self.folder = Path(run_dir) / "checkpoints"
        self.keep, self.dist, self.config = keep, dist, dict(config)

    def save(
        self,
        step: int,
        weights: Mapping[str, torch.nn.Module],
        state: Mapping[str, Any],
        sharded: bool = False,
    ) -> Path:
        """Write ``checkpoints/<step>/`` into a hidden ``.partial`` folder, renamed by the main process
        once whole; every process waits for it.  Full: whole state dicts (under FSDP gathered, a
        collective) written by the main process.  ``sharded``: each process writes its own shards of
        the weights and of the optimisers' state (the ``*optimizer`` entries of ``state``) to ``dcp/``."""
        final = self.folder / f"{step:08d}"
        tmp = self.folder / f".{final.name}.partial"
        written = final.exists()  # the same on every process: nobody renames before the barrier below
        if sharded:
            states: dict[str, Any] = {}
            if not written:
                if self.dist.is_main:
                    _fresh_folder(tmp)
                distributed.barrier()  # the folder exists before any process writes into it
                tensors, state = _split_tensors(weights, state)
                distributed.save_sharded(tensors, tmp / SHARDED)
                state = {**state, "config": self.config, "weights": list(weights)}
        else:  # whole state dicts (under FSDP a collective, so every process gathers; the main one writes)
            states = {name: distributed.full_state_dict(module) for name, module in weights.items()}
        if self.dist.is_main and not written:
            if not sharded:
                _fresh_folder(tmp)
            for name, sd in states.items():
                save_checkpoint(sd, tmp / f"{name}.safetensors", _weights_config(name, self.config, step))
            save_torch({**state, "step": step, "rng": rng_state()}, tmp / "state.pt")
            os.replace(tmp, final)
            _fsync_dir(self.folder)
            for old in list_checkpoints(self.folder)[: -self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        distributed.barrier()
        return final

    def latest(self) -> Path | None:
        """The newest whole checkpoint (unfinished ones, left by a kill, are removed first)."""
        found = self.whole()
        return found[-1] if found else None

    def whole(self) -> list[Path]:
        """The whole checkpoints, oldest first (unfinished ones, left by a kill, are removed first)."""
        if self.folder.exists() and not self.folder.is_dir():
            raise CheckpointError(f"{self.folder} is a file, where this run keeps its checkpoint folders")
        if self.dist.is_main:
            for partial in self.folder.glob(".*.partial"):
                log.warning(
                    "removing the unfinished checkpoint %s (the run stopped while writing it)", partial
                )
                shutil.rmtree(partial, ignore_errors=True)
        return list_checkpoints(self.folder)

    def set_aside(self, folder: Path) -> Path:
        """Rename an unreadable checkpoint to a hidden ``.<step>.unreadable`` (kept for a look, out of
        the way of the resumed run, which writes that step again); main process only."""
        target = folder.with_name(f".{folder.name}.unreadable")
        n = 1
        while target.exists():
            n += 1
            target = folder.with_name(f".{folder.name}.unreadable{n}")
        if self.dist.is_main:
            os.replace(folder, target)
        return target

    def load(
        self,
        folder: str | Path,
        weights: Mapping[str, torch.nn.Module],
        params: Mapping[str, list[torch.Tensor]] | None = None,
    ) -> dict[str, Any]:
        """Load ``weights`` from ``folder`` and restore the RNG states; returns the saved state.

        ``params`` are the parameters of each optimiser by its state key (``optimizer``,
        ``<key>_optimizer``): a sharded checkpoint's optimiser tensors are read into tensors cut as
        these are.  A file of the folder that does not load (truncated, corrupted, ``state.pt`` or
        ``dcp/.metadata`` missing) raises :class:`UnreadableCheckpoint`; a checkpoint that loads but
        does not fit this run (another model, another size, weights this run trains and it lacks)
        raises :class:`CheckpointError` (a sharded one before any of its tensors is read)."""
        folder = Path(folder)
        state = _read(folder, "state.pt", load_torch_file)
        if not isinstance(state, Mapping) or not set(state) >= STATE_KEYS:
            missing = sorted(STATE_KEYS - set(state)) if isinstance(state, Mapping) else sorted(STATE_KEYS)
            raise UnreadableCheckpoint(f"{folder}: state.pt lacks {', '.join(missing)}")
        if is_sharded_checkpoint(folder):
            state = self._load_sharded(folder, weights, dict(state), params or {})
        else:
            self._load_full(folder, weights)
        set_rng_state(state["rng"])
        log.info("resumed from %s at step %d", folder, state["step"])
        return dict(state)

    def _load_full(self, folder: Path, weights: Mapping[str, torch.nn.Module]) -> None:
        expected = self.config.get("name")
        for name, module in weights.items():
            path = folder / f"{name}.safetensors"
            if not path.is_file():
                raise CheckpointError(
                    f"{folder} has no {name} weights ({path.name}), but this run trains one"
                )
            sd, config = _read(folder, path.name, load_checkpoint)
            if name == "model" and expected and config.get("name") not in (None, expected):
                raise CheckpointError(
                    f"{folder} is a checkpoint of {config.get('name')!r}, but this run trains {expected!r}"
                )
            self._check(module, sd, name, path)
            distributed.load_full_state_dict(module, sd)

    def _load_sharded(
        self,
        folder: Path,
        weights: Mapping[str, torch.nn.Module],
        state: dict[str, Any],
        params: Mapping[str, list[torch.Tensor]],
    ) -> dict[str, Any]:
        """The weights read in place into ``weights``' own tensors (their shards under FSDP) and the
        optimisers' tensors into ``state``, from a DCP folder written by any number of processes."""
        expected, saved_name = self.config.get("name"), dict(state.get("config") or {}).get("name")
        if expected and saved_name not in (None, expected):
            raise CheckpointError(
                f"{folder} is a DCP checkpoint of {saved_name!r}, but this run trains {expected!r}"
            )
        saved = _read(folder, SHARDED, _dcp_metadata)
        targets: dict[str, torch.Tensor] = {}
        for name, module in weights.items():
            own = module.state_dict()  # FSDP2: the DTensor shards themselves, so loading fills them
            given = _saved_tensors(saved, name, device="meta")  # shapes only: nothing read yet
            if not given:
                raise CheckpointError(
                    f"{folder} has no {name} weights (in {SHARDED}/), but this run trains one"
                )
            self._check(module, given, name, folder / SHARDED)
            targets |= {f"{name}/{key}": value for key, value in own.items()}
        for key, held in params.items():
            if key not in state:
                continue  # resume names the optimiser the checkpoint lacks
            per_param = state[key]["state"]
            for saved_key, (size, dtype) in saved.items():
                what, _, rest = saved_key.partition("/")
                if what != key:
                    continue
                index, _, part = rest.partition("/")
                i = int(index)
                like = held[i] if i < len(held) and held[i].shape == size else None
                target = (
                    torch.empty(size, dtype=dtype) if like is None else torch.zeros_like(like, dtype=dtype)
                )
                per_param.setdefault(i, {})[part] = targets[saved_key] = target
        try:
            distributed.load_sharded(targets, folder / SHARDED)
        except Exception as err:  # DCP wraps every process's failure (a truncated or missing shard file)
            raise UnreadableCheckpoint(f"{folder}: {SHARDED}/ does not load ({first_line(err)})") from err
        return state

    def _check(
        self, module: torch.nn.Module, given: Mapping[str, torch.Tensor], name: str, where: Path
    ) -> None:
        expected = self.config.get("name")
        what = f"model {expected or type(module).__name__}" if name == "model" else name
        try:
            check_state_dict(module.state_dict(), given, what=what)
        except CheckpointError as err:
            raise CheckpointError(f"{where}: {err}") from err


STATE_KEYS = {"step", "rng", "optimizer", "scheduler", "data"}  # what every state.pt holds
SHARDED = "dcp"  # a sharded checkpoint's DCP folder: .metadata and one __<rank>_0.distcp per process


class UnreadableCheckpoint(CheckpointError):
    """A whole-looking checkpoint folder with a file that does not load (truncated or corrupted after
    it was written, or missing): :meth:`TrainState.resume` falls back to the one before it."""


def _read(folder: Path, name: str, reader: Callable[[Path], Any]) -> Any:
    path = folder / name
    if not path.exists():
        raise UnreadableCheckpoint(f"{folder}: {name} is missing")
    try:
        return reader(path)
    except (CheckpointError, OSError) as err:
        raise UnreadableCheckpoint(f"{folder}: {name} does not load ({first_line(err)})") from err


def _dcp_metadata(path: Path) -> dict[str, tuple[torch.Size, torch.dtype]]:
    try:
        return distributed.sharded_metadata(path)
    except Exception as err:  # missing, or truncated: unpickling it fails with any error
        raise CheckpointError(f"its .metadata does not load: {first_line(err)}") from err


def _saved_tensors(
    saved: Mapping[str, tuple[torch.Size, torch.dtype]], name: str, device: str = "cpu"
) -> dict[str, torch.Tensor]:
    """Empty tensors shaped as the weights ``name`` of a DCP folder's metadata, by their own keys."""
    prefix = f"{name}/"
    return {
        key[len(prefix) :]: torch.empty(size, dtype=dtype, device=device)
        for key, (size, dtype) in saved.items()
        if key.startswith(prefix)
    }


def _split_tensors(
    weights: Mapping[str, torch.nn.Module], state: Mapping[str, Any]
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """What a sharded checkpoint writes through DCP (``<name>/<key>`` of every module's state dict,
    ``<optimizer>/<index>/<part>`` of every optimiser's per-parameter tensors, as the processes hold
    them) and what stays for ``state.pt`` (the rest: schedules, hyperparameters, steps' counts)."""
    tensors = {
        f"{name}/{key}": value
        for name, module in weights.items()
        for key, value in module.state_dict().items()
    }
    small = dict(state)
    for key, value in state.items():
        if not key.endswith("optimizer"):
            continue
        kept: dict[int, dict[str, Any]] = {}
        for i, per_param in value["state"].items():
            kept[i] = {part: v for part, v in per_param.items() if not isinstance(v, torch.Tensor)}
            tensors |= {
                f"{key}/{i}/{part}": v for part, v in per_param.items() if isinstance(v, torch.Tensor)
            }
        small[key] = {**value, "state": kept}
    return tensors, small


def _weights_config(name: str, config: Mapping[str, Any], step: int) -> dict[str, Any]:
    """The metadata of a checkpoint's ``<name>.safetensors``: the model's config for the weights that
    sample (the model and its EMAs), the step for all."""
    return {**config, "step": step} if name in ("model", "ema") or name.startswith("ema_") else {"step": step}


def _fresh_folder(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)


def is_sharded_checkpoint(folder: str | Path) -> bool:
    """Whether ``folder`` is a checkpoint written with ``training.checkpoint_format: sharded``."""
    return (Path(folder) / SHARDED).is_dir()


def checkpoint_weights(folder: str | Path) -> list[str]:
    """The names of the weights (``model``, ``ema``, ``ema_0.999``, …) a checkpoint folder holds, in
    either format."""
    folder = Path(folder)
    names = {p.stem for p in folder.glob("*.safetensors")}
    if is_sharded_checkpoint(folder):
        names |= set(_read(folder, "state.pt", load_torch_file).get("weights", []))
    return sorted(names)


def load_weights(folder: str | Path, name: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``(state dict, config)`` of the weights ``name`` (``model``, ``ema``, …) of a checkpoint folder,
    full or sharded (whole tensors, read by this process alone), as :func:`load_checkpoint` gives them."""
    folder = Path(folder)
    if (folder / f"{name}.safetensors").is_file() or not is_sharded_checkpoint(folder):
        return load_checkpoint(folder / f"{name}.safetensors")
    state = _read(folder, "state.pt", load_torch_file)
    tensors = _saved_tensors(_read(folder, SHARDED, _dcp_metadata), name)
    if not tensors:
        held = ", ".join(state.get("weights", [])) or "none"
        raise CheckpointError(f"{folder} holds no {name} weights (it holds: {held})")
    try:
        distributed.load_sharded(
            {f"{name}/{k}": v for k, v in tensors.items()}, folder / SHARDED, collective=False
        )
    except Exception as err:
        raise UnreadableCheckpoint(f"{folder}: {SHARDED}/ does not load ({first_line(err)})") from err
    return tensors, _weights_config(name, state.get("config") or {}, state["step"])


def consolidate(folder: str | Path, out: str | Path | None = None) -> Path:
    """Write every module of the checkpoint ``folder`` as ``<name>.safetensors`` (whole tensors, the
    metadata of a full checkpoint) into ``out``, by default ``folder`` itself (a sharded checkpoint then
    reads as a full one too); returns the folder written.  No process group is needed: this is
    ``latentforge export``."""
    folder = Path(folder)
    out = folder if out is None else Path(out)
    names = checkpoint_weights(folder)
    if not names:
        raise CheckpointError(
            f"{folder} holds no weights: expected a checkpoint folder (checkpoints/<step>/, with a "
            f"{SHARDED}/ folder or .safetensors files)"
        )
    out.mkdir(parents=True, exist_ok=True)
    for name in names:
        if out != folder or not (out / f"{name}.safetensors").is_file():
            sd, config = load_weights(folder, name)
            save_checkpoint(sd, out / f"{name}.safetensors", config)
    return out


# ------------------------------------------------------------------------------------------------
# The state of a run, together
# ------------------------------------------------------------------------------------------------
class TrainState:
    """What one run optimises and checkpoints: ``model`` with its :class:`Optimization` and
    :class:`EMA`, the data's :class:`Batches`, the step, its :class:`StepLog` (:meth:`step_log`) and
    any further ``(module, optimisation)`` pairs (a GAN's discriminator) added with :meth:`add`.  It
    holds no loop: the recipe's loop iterates :meth:`steps`, updates through ``optim`` and calls
    :meth:`save` when a checkpoint is due."""

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
        self.profiles = {sigma: PowerEMA(model, sigma) for sigma in t.ema_profiles}
        self.emas = {ema.decay_name(d): EMA(model, d) for d in t.ema_decays} | {
            ema.profile_name(sigma): profile for sigma, profile in self.profiles.items()
        }  # tracked beside ``ema``, saved as ``<name>.safetensors``
        self.snapshots = Path(run_dir) / ema.SNAPSHOT_DIR
        self.batches = Batches(data, num_items, t, dist)
        self.checkpointer = Checkpointer(run_dir, t.keep_checkpoints, dist, config or {})
        self.others: dict[str, tuple[torch.nn.Module, Optimization, str]] = {}
        self.companions: dict[str, torch.nn.Module] = {}
        self.logs: dict[str, StepLog] = {}
        self._log_states: dict[str, Any] = {}  # the resumed checkpoint's, for step logs made later
        self.saved_step: int | None = None  # the step of the checkpoint last written or resumed from
        self.step = 0
        minutes = t.max_minutes
        self.deadline = None if minutes is None else time.monotonic() + 60 * minutes  # this process's budget

    def keep(self, name: str, module: torch.nn.Module) -> None:
        """Save and resume ``module`` too, as ``<name>.safetensors``: a part the model's own optimiser
        trains (its parameters among ``params``) that sampling does not use (REPA's projector)."""
        self.companions[name] = module

    def add(self, name: str, module: torch.nn.Module, key: str) -> Optimization:
        """Optimise ``module`` too (AdamW with the same settings): its weights are saved as
        ``<name>.safetensors``, its optimiser, schedule (and fp16 scale) as ``<key>_optimizer``, … ."""
        optim = Optimization(module.parameters(), self.t, what=name)
        self.others[name] = (module, optim, key)
        return optim

    def update(self) -> dict[str, float]:
        """The model's optimiser step, then its EMAs (and a snapshot of the power-function ones when
        due); returns ``grad_norm`` when clipping."""
        logs = self.optim.step()
        step = self.step + 1  # the step this update ends
        update_averages([a for a in [self.ema, *self.emas.values()] if a is not None], self.model, step)
        every = self.t.ema_snapshot_every
        if every is not None and (step % every == 0 or step == self.t.steps):  # every process: a gather
            modules = {sigma: profile.module for sigma, profile in self.profiles.items()}
            ema.write_snapshot(self.snapshots, step, modules, self.checkpointer.config, self.dist.is_main)
        return logs

    def eval_model(self) -> torch.nn.Module:
        """The EMA weights when there are any, else the live model, in eval mode.  Under FSDP a whole
        copy of the sharded EMA gathered now: every process calls it together, once per evaluation,
        and keeps it while sampling (dropped after, as it holds a whole copy of the weights)."""
        if self.ema is None and distributed.is_sharded(self.model):
            raise InputError(
                f"training.strategy {self.t.strategy} shards the model, which then runs only inside the "
                "training step: set training.ema_decay to evaluate and sample from the (whole) EMA"
            )
        if self.ema is None:
            return self.model.eval()
        return distributed.gathered_copy(self.ema.module).eval()

    def _weights(self) -> dict[str, torch.nn.Module]:
        weights = {"model": self.model} | ({"ema": self.ema.module} if self.ema is not None else {})
        weights |= {name: average.module for name, average in self.emas.items()}
        return weights | self.companions | {name: module for name, (module, _, _) in self.others.items()}

    def step_log(self, logger: Any, desc: str) -> StepLog:
        """The :class:`StepLog` of this run under ``desc`` (its scalars are ``<desc>/…``), shown on the
        main process.  Its running window is saved in every checkpoint and, made after :meth:`resume`,
        continues the resumed one's: a resumed run logs the same averages as an uninterrupted one.
        Made, the run goes on: ``logger`` (a :class:`~latentforge_runner.run_folder.RunLogger`) writes
        the ``config.yaml`` that :func:`~latentforge_runner.run_folder.open_run` held back for a
        resumed run, so a resume refused on the way here (a checkpoint that does not fit) leaves the
        folder's as it was."""
        logger.write_config()  # the run goes on: a resumed run's config.yaml is written now
        step_log = StepLog(self.t, logger, self.step, desc, show=self.dist.is_main)
        if desc in self._log_states:
            step_log.load_state_dict(self._log_states[desc])
        self.logs[desc] = step_log
        return step_log

    def steps(self) -> Iterator[dict[str, Any]]:
        """The rest of the run's batches (:attr:`batches`, from the resume point), one per step, stopping
        cleanly on SIGINT or SIGTERM: the step under way finishes (the loop's body, its checkpoint
        included), a checkpoint is written unless that step wrote one, and
        :class:`~latentforge_core.errors.RunInterrupted` (exit code 130 or 143) names it; rerunning
        the same command resumes there.  A second signal stops at once, as it would have without this.
        Under torchrun every process stops at the same step (the request is all-reduced each step).
        The handlers are installed while this iterates, from the main thread only, and then restored."""
        with _StopRequests(self.dist, self.deadline) as stop:
            batches = iter(self.batches)
            while self.batches.handed_out < self.t.steps:
                # Agreed before the next batch is drawn (its data position would be in a checkpoint),
                # and never after the last step: no collective is left pending when processes exit.
                signum = stop.requested() if self.batches.handed_out > 0 else 0
                if signum:
                    self._stop(signum)
                batch = next(batches, None)
                if batch is None:
                    return
                began = time.monotonic()
                yield batch
                stop.step_took(time.monotonic() - began)
            next(batches, None)  # the data's end: it reports the images it skipped

    def _stop(self, signum: int) -> NoReturn:
        folder = self.checkpointer.folder / f"{self.step:08d}"
        if self.saved_step != self.step:  # the same on every process: save() is collective
            folder = self.save()
        for step_log in self.logs.values():
            step_log.close()
        if signum == OUT_OF_TIME:
            why = f"training.max_minutes ({self.t.max_minutes:g}) would run out during the next step"
        else:
            why = f"{signal.Signals(signum).name} received"
        requeue = signum in (OUT_OF_TIME, getattr(signal, "SIGUSR1", None))
        raise RunInterrupted(
            f"{why}: stopped after step {self.step} of {self.t.steps} and wrote the checkpoint {folder}; "
            "run the same command again to resume from it",
            exit_code=REQUEUE_EXIT if requeue else 128 + signum,
        )

    def save(self) -> Path:
        sharded = self.t.checkpoint_format == "sharded"
        state = {**self.optim.state_dict(whole=not sharded), "data": self.batches.state_dict()}
        for _, optim, key in self.others.values():
            state |= {f"{key}_{part}": value for part, value in optim.state_dict(whole=not sharded).items()}
        state["log"] = {desc: step_log.state_dict() for desc, step_log in self.logs.items()}
        folder = self.checkpointer.save(self.step, self._weights(), state, sharded=sharded)
        self.saved_step = self.step
        return folder

    def resume(self, folder: str | Path | None = None) -> bool:
        """Continue from ``folder``, else from the run's newest whole checkpoint; False when there is
        none.  Without ``folder``, a newest checkpoint that does not load (:class:`UnreadableCheckpoint`)
        is set aside as ``.<step>.unreadable`` with a warning and the one before it resumes.  Either
        checkpoint format resumes, whatever this run's ``checkpoint_format`` and number of processes."""
        params = {"optimizer": self.optim.params}  # where a sharded checkpoint's optimiser tensors go
        params |= {f"{key}_optimizer": optim.params for _, optim, key in self.others.values()}
        if folder is not None:
            state = self.checkpointer.load(folder, self._weights(), params)
        else:
            found = self.checkpointer.whole()
            if not found:
                return False
            unreadable: list[tuple[Path, UnreadableCheckpoint]] = []
            for folder in reversed(found):
                try:
                    state = self.checkpointer.load(folder, self._weights(), params)
                    break
                except UnreadableCheckpoint as err:
                    unreadable.append((folder, err))
            else:
                raise CheckpointError(
                    f"none of the {len(found)} checkpoint(s) in {self.checkpointer.folder} loads: "
                    + "; ".join(str(why) for _, why in unreadable)
                    + ". Delete them to start over, or choose another run.output_dir"
                )
            for bad, why in unreadable:
                aside = self.checkpointer.set_aside(bad)
                if not self.dist.is_main:
                    continue
                log.warning(
                    "the checkpoint %s is unreadable (%s); resuming from the one before it, %s. "
                    "The unreadable one is kept as %s",
                    bad,
                    why,
                    folder,
                    aside.name,
                )
        if state["step"] > self.t.steps:
            raise ConfigError(
                f"training.steps is {self.t.steps}, but the checkpoint {folder} is at step {state['step']}: "
                f"set training.steps to {state['step']} or more to continue this run, or choose another "
                "run.output_dir"
            )
        self.optim.load_state_dict(state)
        for name, (_, optim, key) in self.others.items():
            if f"{key}_optimizer" not in state:
                raise CheckpointError(f"{folder} has no {name} optimiser state, but this run trains one")
            optim.load_state_dict(
                {part[len(key) + 1 :]: v for part, v in state.items() if part.startswith(f"{key}_")}
            )
        self.batches.load_state_dict(state["data"])
        self.step = self.saved_step = state["step"]
        self._log_states = dict(state.get("log", {}))
        for desc, step_log in self.logs.items():  # step logs made before the resume
            if desc in self._log_states:
                step_log.start_step = self.step
                step_log.load_state_dict(self._log_states[desc])
        return True


# Exit code of a run stopped to be requeued (SIGUSR1, Slurm's warning before a job's time limit, or
# training.max_minutes): EX_TEMPFAIL, "try again"; SIGINT and SIGTERM exit 130 and 143 as a shell shows.
REQUEUE_EXIT = 75
OUT_OF_TIME = 1000  # the stop request of a spent budget, beside the signal numbers


class _StopRequests:
    """SIGINT/SIGTERM/SIGUSR1 handlers that only note the request, for :meth:`TrainState.steps` to
    act on between steps, and the wall-clock ``deadline`` (a step that would end past it is not
    begun: twice the longest step so far is kept in hand).  A second signal restores the handlers
    from before and delivers itself to them (SIGINT raises KeyboardInterrupt, SIGTERM ends the
    process).  The handlers from before are restored on exit.  Signal handlers can be set from the
    main thread only: elsewhere, none are; a signal ignored when the loop starts stays ignored."""

    SIGNALS = tuple(s for s in (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGUSR1", None)) if s)

    def __init__(self, dist: distributed.DistInfo, deadline: float | None = None):
        self.dist, self.received, self.deadline, self.longest = dist, 0, deadline, 0.0
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> _StopRequests:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                if signal.getsignal(sig) is signal.SIG_IGN:  # ignored on purpose (a shell's `cmd &`)
                    continue
                previous = signal.signal(sig, self._handle)
                self.previous[sig] = signal.SIG_DFL if previous is None else previous
        return self

    def __exit__(self, *exc: Any) -> None:
        self._restore()

    def _restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.received:  # asked twice: stop now, as without these handlers
            self._restore()
            signal.raise_signal(signum)
            return
        self.received = signum
        if self.dist.is_main:  # no logging inside a signal handler: one plain write
            name = signal.Signals(signum).name
            message = (
                f"\n{name} received: stopping after the current step, with a checkpoint "
                "(send it again to stop at once, without one)\n"
            )
            os.write(2, message.encode())

    def step_took(self, seconds: float) -> None:
        self.longest = max(self.longest, seconds)

    def requested(self) -> int:
        """The signal to stop for, or :data:`OUT_OF_TIME`; the same on every process (0: go on)."""
        local = self.received
        if not local and self.deadline is not None and time.monotonic() + 2 * self.longest >= self.deadline:
            local = OUT_OF_TIME
        group = torch.distributed.is_available() and torch.distributed.is_initialized()
        if not (self.dist.enabled and group):
            return local
        flag = torch.tensor([local], device=self.dist.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return int(flag.item())


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
