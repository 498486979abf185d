"""Training machinery a recipe composes: optimiser, LR schedule, EMA, DDP, precision, exact resume.

:class:`Trainer` owns one model's optimisation (plus, for GAN training, a discriminator's) and
nothing else — the recipe supplies the losses as functions of a batch, as torchtune recipes own
their loop.  A checkpoint is a folder ``checkpoints/<step>/`` with ``model.safetensors``,
``ema.safetensors`` and ``discriminator.safetensors`` (our format, config in the metadata) and
``state.pt`` (optimisers, schedulers, step, every RNG state, the data position).
The folder is written under a hidden temporary name and renamed when complete, so a process killed
at any moment leaves only whole checkpoints; resuming from one continues bitwise as if never stopped.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from latentforge_core.checkpoint import (
    CheckpointError,
    check_state_dict,
    load_checkpoint,
    load_torch_file,
    save_checkpoint,
    save_torch,
)
from latentforge_core.device import autocast, rng_state, set_rng_state
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
# Run folder: logs, TensorBoard, optional Weights & Biases
# ------------------------------------------------------------------------------------------------
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


# ------------------------------------------------------------------------------------------------
# Trainer
# ------------------------------------------------------------------------------------------------
class Trainer:
    """Optimises ``model`` on ``loss_fn(model, batch)`` with the settings' schedule, EMA and checkpoints.

    ``fetch(indices) -> batch`` turns the sampler's per-process index list into a batch (a dict);
    the trainer splits it into ``grad_accum`` micro-batches along dim 0 of every tensor.

    With a ``discriminator`` each step is a generator update, then a discriminator update on
    ``disc_loss_fn(batch)`` (the same micro-batches; ``loss_fn`` may leave detached fakes in them).
    The discriminator has its own AdamW with the same settings and schedule (the schedule advances
    on its updates only, as RAE's); its parameters are frozen during the generator's pass, so the
    GAN term reaches only the generator.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        t: TrainingSettings,
        *,
        run_dir: str | Path,
        num_items: int,
        dist: distributed.DistInfo | None = None,
        model_config: Mapping[str, Any] | None = None,
        logger: RunLogger | None = None,
        params: Iterable[torch.nn.Parameter] | None = None,
        forward: str = "forward",
        discriminator: torch.nn.Module | None = None,
    ):
        self.t = t
        self.dist = dist or distributed.DistInfo()
        self.device = self.dist.device
        self.run_dir = Path(run_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.model_config = dict(model_config or {})
        self.logger = logger or RunLogger(self.run_dir, enabled=False)
        self.model = model.to(self.device)
        trainable = [p for p in (params if params is not None else model.parameters()) if p.requires_grad]
        if not trainable:
            raise ValueError("the model has no trainable parameters")
        self.optimizer = torch.optim.AdamW(
            trainable, lr=t.lr, betas=t.betas, eps=t.eps, weight_decay=t.weight_decay
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(t))
        self.ema = EMA(self.model, t.ema_decay) if t.ema_decay is not None else None
        self.sampler = ResumableBatchSampler(
            num_items, t.batch_size, seed=t.seed, rank=self.dist.rank, world_size=self.dist.world_size
        )
        self.step = 0
        self.skipped: list[str] = []
        self.dtype = {"auto": None, "fp32": torch.float32, "bf16": torch.bfloat16}[t.precision]
        # ``forward`` names the method the loss goes through (``loss`` for a generator), so that DDP's
        # gradient hooks see the call.
        entry = self.model if forward == "forward" else _Method(self.model, forward)
        if self.dist.enabled:
            entry = DistributedDataParallel(
                entry, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )
        self.ddp = entry
        self.forward_model = torch.compile(entry) if t.compile else entry
        self.discriminator = self.disc_ddp = None
        if discriminator is not None:
            self._setup_discriminator(discriminator)

    def _setup_discriminator(self, discriminator: torch.nn.Module) -> None:
        t = self.t
        self.discriminator = discriminator.to(self.device)
        self.disc_params = [p for p in discriminator.parameters() if p.requires_grad]
        if not self.disc_params:
            raise ValueError("the discriminator has no trainable parameters")
        self.disc_optimizer = torch.optim.AdamW(
            self.disc_params, lr=t.lr, betas=t.betas, eps=t.eps, weight_decay=t.weight_decay
        )
        self.disc_scheduler = torch.optim.lr_scheduler.LambdaLR(self.disc_optimizer, lr_lambda(t))
        entry = _Closure(self.discriminator)
        if self.dist.enabled:
            entry = DistributedDataParallel(
                entry, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )
        self.disc_ddp = entry

    # -------------------------------------------------------------------------------- the loop
    def fit(
        self,
        data: Callable[[list[int]], Mapping[str, Any]] | torch.utils.data.Dataset,
        loss_fn: Callable[[torch.nn.Module, Mapping[str, Any]], torch.Tensor | tuple[torch.Tensor, dict]],
        *,
        disc_loss_fn: Callable[[dict[str, Any]], torch.Tensor | tuple[torch.Tensor, dict] | None]
        | None = None,
        on_step: Callable[[Trainer], None] | None = None,
        desc: str = "train",
    ) -> dict[str, float]:
        """Run until ``t.steps``; checkpoints every ``checkpoint_every`` steps and at the end.

        ``data`` is ``fetch(indices) -> batch`` (data in memory), or a Dataset read by a DataLoader
        with ``t.num_workers`` workers and :func:`~latentforge_runner.data.collate`.
        ``disc_loss_fn(micro_batch)`` (with a discriminator) returns its loss, or None for no update.
        """
        if (disc_loss_fn is None) != (self.discriminator is None):
            raise ValueError("a discriminator and a disc_loss_fn go together: give both or neither")
        self.model.train()
        bar = tqdm(
            total=self.t.steps,
            initial=self.step,
            desc=desc,
            disable=not self.dist.is_main,
            dynamic_ncols=True,
            unit="step",
        )
        window: dict[str, list[float]] = {}
        last: dict[str, float] = {}
        start, start_step = time.perf_counter(), self.step
        while self.step < self.t.steps:
            for batch in self._epoch(data):
                logs = self._train_step(batch, loss_fn, disc_loss_fn)
                self.sampler.advance()
                self.step += 1
                bar.update(1)
                for k, v in logs.items():
                    window.setdefault(k, []).append(v)
                if self.step % self.t.log_every == 0 or self.step == self.t.steps:
                    last = {k: sum(v) / len(v) for k, v in window.items()}
                    last["lr"] = self.scheduler.get_last_lr()[0]
                    last["images_per_s"] = (
                        (self.step - start_step) * self.t.batch_size / (time.perf_counter() - start)
                    )
                    self.logger.scalars({f"{desc}/{k}": v for k, v in last.items()}, self.step)
                    bar.set_postfix(loss=f"{last.get('loss', float('nan')):.4f}")
                    window = {}
                if on_step is not None:
                    on_step(self)
                if self.step % self.t.checkpoint_every == 0 or self.step == self.t.steps:
                    self.save_checkpoint()
                if self.step >= self.t.steps:
                    break
        bar.close()
        if self.skipped:
            log.warning(
                "skipped %d unreadable image(s) so far, first: %s", len(self.skipped), self.skipped[0]
            )
        return last

    def _epoch(self, data) -> Iterable[Mapping[str, Any]]:
        """The rest of the current epoch's batches, from the sampler's position."""
        if not isinstance(data, torch.utils.data.Dataset):
            return (data(indices) for indices in self.sampler)
        images = data.dataset if isinstance(data, torch.utils.data.Subset) else data
        if hasattr(images, "set_epoch"):  # new random crops/flips each epoch, the same after a resume
            images.set_epoch(self.sampler.epoch)
        # A fresh loader per epoch, its worker seeds drawn from its own generator, so that creating
        # it never touches the global RNG (a resumed run creates one at another moment).
        generator = torch.Generator().manual_seed(self.t.seed * 100_003 + self.sampler.epoch)
        return torch.utils.data.DataLoader(
            data,
            batch_sampler=self.sampler,
            num_workers=self.t.num_workers,
            collate_fn=collate,
            generator=generator,
            pin_memory=self.device.type == "cuda",
        )

    def _train_step(self, batch: Mapping[str, Any], loss_fn, disc_loss_fn=None) -> dict[str, float]:
        self.skipped += batch.get("skipped", [])
        if any(v is None for v in batch.values()):
            log.warning("step %d: every image of the batch was unreadable; no update", self.step)
            return {}
        batch = {
            k: v.to(self.device, non_blocking=True) if isinstance(v, torch.Tensor) else v
            for k, v in batch.items()
            if k != "skipped"
        }
        micro = _split(batch, self.t.grad_accum)
        logs: dict[str, float] = {}
        if self.discriminator is not None:
            for p in self.disc_params:
                p.requires_grad_(False)
        for i, part in enumerate(micro):
            sync = i == len(micro) - 1
            ctx = self.ddp.no_sync() if (self.dist.enabled and not sync) else contextlib.nullcontext()
            with ctx:
                with autocast(self.device, self.dtype):
                    out = loss_fn(self.forward_model, part)
                loss, extra = out if isinstance(out, tuple) else (out, {})
                if not torch.isfinite(loss):
                    raise FloatingPointError(
                        f"the loss is {loss.item()} at step {self.step}; lower training.lr or set "
                        "training.grad_clip (the last checkpoint is intact)"
                    )
                (loss / len(micro)).backward()
            for k, v in {"loss": loss, **extra}.items():
                logs[k] = logs.get(k, 0.0) + float(v.detach() if isinstance(v, torch.Tensor) else v) / len(
                    micro
                )
        if self.t.grad_clip is not None:
            logs["grad_norm"] = float(
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.t.grad_clip)
            )
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update(self.model)
        if self.discriminator is not None:
            for p in self.disc_params:
                p.requires_grad_(True)
            logs.update(self._disc_step(micro, disc_loss_fn))
        return logs

    def _disc_step(self, micro: list[dict[str, Any]], disc_loss_fn) -> dict[str, float]:
        """One discriminator update on the step's micro-batches (none when the loss says None)."""
        logs: dict[str, float] = {}
        for i, part in enumerate(micro):
            sync = i == len(micro) - 1
            ctx = self.disc_ddp.no_sync() if (self.dist.enabled and not sync) else contextlib.nullcontext()
            with ctx:
                with autocast(self.device, self.dtype):
                    out = self.disc_ddp(disc_loss_fn, part)
                if out is None:
                    return {}
                loss, extra = out if isinstance(out, tuple) else (out, {})
                if not torch.isfinite(loss):
                    raise FloatingPointError(
                        f"the discriminator loss is {loss.item()} at step {self.step}; lower training.lr "
                        "or set training.grad_clip (the last checkpoint is intact)"
                    )
                (loss / len(micro)).backward()
            for k, v in {"loss": loss, **extra}.items():
                value = float(v.detach() if isinstance(v, torch.Tensor) else v)
                logs[f"d_{k}"] = logs.get(f"d_{k}", 0.0) + value / len(micro)
        if self.t.grad_clip is not None:
            logs["d_grad_norm"] = float(torch.nn.utils.clip_grad_norm_(self.disc_params, self.t.grad_clip))
        self.disc_optimizer.step()
        self.disc_optimizer.zero_grad(set_to_none=True)
        self.disc_scheduler.step()
        return logs

    # -------------------------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        state = {
            "step": self.step,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "data": self.sampler.state_dict(),
            "rng": rng_state(),
            "skipped": len(self.skipped),
        }
        if self.discriminator is not None:
            state["disc_optimizer"] = self.disc_optimizer.state_dict()
            state["disc_scheduler"] = self.disc_scheduler.state_dict()
        return state

    def save_checkpoint(self) -> Path | None:
        """Write ``checkpoints/<step>/`` on the main process: whole or not at all."""
        final = self.ckpt_dir / f"{self.step:08d}"
        if self.dist.is_main and not final.exists():
            tmp = self.ckpt_dir / f".{final.name}.partial"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            config = {**self.model_config, "step": self.step}
            save_checkpoint(self.model.state_dict(), tmp / "model.safetensors", config)
            if self.ema is not None:
                save_checkpoint(self.ema.module.state_dict(), tmp / "ema.safetensors", config)
            if self.discriminator is not None:
                save_checkpoint(
                    self.discriminator.state_dict(), tmp / "discriminator.safetensors", {"step": self.step}
                )
            save_torch(self.state_dict(), tmp / "state.pt")
            os.replace(tmp, final)
            _fsync_dir(self.ckpt_dir)
            for old in list_checkpoints(self.ckpt_dir)[: -self.t.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
        distributed.barrier()
        return final

    def resume(self, path: str | Path | None = None) -> bool:
        """Load the newest whole checkpoint of this run (or ``path``); False when there is none."""
        if path is None:
            for partial in self.ckpt_dir.glob(".*.partial"):
                log.warning(
                    "removing the unfinished checkpoint %s (the run stopped while writing it)", partial
                )
                shutil.rmtree(partial, ignore_errors=True)
            found = list_checkpoints(self.ckpt_dir)
            if not found:
                return False
            path = found[-1]
        path = Path(path)
        sd, config = load_checkpoint(path / "model.safetensors")
        expected = self.model_config.get("name")
        if expected and config.get("name") not in (None, expected):
            raise CheckpointError(
                f"{path} is a checkpoint of {config.get('name')!r}, but this run trains {expected!r}"
            )
        check_state_dict(self.model.state_dict(), sd, what=f"model {expected or type(self.model).__name__}")
        self.model.load_state_dict(sd)
        if self.ema is not None:
            ema_sd, _ = load_checkpoint(path / "ema.safetensors")
            self.ema.module.load_state_dict(ema_sd)
        state = load_torch_file(path / "state.pt")
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.discriminator is not None:
            if not (path / "discriminator.safetensors").is_file() or "disc_optimizer" not in state:
                raise CheckpointError(f"{path} has no discriminator state, but this run trains one")
            disc_sd, _ = load_checkpoint(path / "discriminator.safetensors")
            check_state_dict(self.discriminator.state_dict(), disc_sd, what="discriminator")
            self.discriminator.load_state_dict(disc_sd)
            self.disc_optimizer.load_state_dict(state["disc_optimizer"])
            self.disc_scheduler.load_state_dict(state["disc_scheduler"])
        self.sampler.load_state_dict(state["data"])
        set_rng_state(state["rng"])
        self.step = state["step"]
        log.info("resumed from %s at step %d", path, self.step)
        return True

    def eval_model(self) -> torch.nn.Module:
        """The EMA weights when there are any, else the live model, in eval mode."""
        return (self.ema.module if self.ema is not None else self.model).eval()


class _Method(torch.nn.Module):
    """Calls ``module.<method>`` as its forward (what DDP wraps when the loss is not ``forward``)."""

    def __init__(self, module: torch.nn.Module, method: str):
        super().__init__()
        if not callable(getattr(module, method, None)):
            raise AttributeError(f"{type(module).__name__} has no method {method!r} to train through")
        self.module, self.method = module, method

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return getattr(self.module, self.method)(*args, **kwargs)


class _Closure(torch.nn.Module):
    """Holds ``module``'s parameters and runs ``fn(*args)`` as its forward: a discriminator loss that
    calls the bare module (real and fake) is then one forward of its DDP wrapper."""

    def __init__(self, module: torch.nn.Module):
        super().__init__()
        self.module = module

    def forward(self, fn: Callable[..., Any], *args: Any) -> Any:
        return fn(*args)


def list_checkpoints(folder: str | Path) -> list[Path]:
    """Complete checkpoint folders, oldest first (hidden ``.partial`` ones excluded)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_dir() and p.name.isdigit())


def _split(batch: Mapping[str, Any], parts: int) -> list[dict[str, Any]]:
    if parts == 1:
        return [dict(batch)]
    out = [{} for _ in range(parts)]
    for key, value in batch.items():
        chunks = value.chunk(parts) if isinstance(value, torch.Tensor) else [value] * parts
        if len(chunks) != parts:
            raise ValueError(
                f"batch field {key!r} of {len(value)} cannot be split into {parts} micro-batches"
            )
        for d, c in zip(out, chunks, strict=True):
            d[key] = c
    return out


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
