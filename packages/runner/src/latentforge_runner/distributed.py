"""Process groups through ``torchrun``: NCCL on GPUs, gloo on CPUs, one process when run plainly.

Several machines use torchrun's rendezvous, e.g. on each of two nodes::

    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \\
        -m latentforge_runner.cli run train-generator --config my.yaml
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, TypeVar

import attrs
import numpy as np
import torch
import torch.distributed as dist

from latentforge_core.device import resolve_device, seed_everything

T = TypeVar("T")


@attrs.frozen
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init(device: str | None = "auto") -> DistInfo:
    """Join the process group torchrun describes in the environment (a no-op for one process)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    dev = resolve_device(device)
    if world == 1:
        return DistInfo(device=dev)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if dev.type == "cuda":
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", rank=rank, world_size=world)
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=dev)


def cleanup() -> None:
    """Leave the process group together: a process that tears it down while another still works in
    it can abort at exit (gloo's threads), so every process first waits for the others."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def wrap(module: torch.nn.Module, info: DistInfo, method: str = "forward", compile: bool = False):
    """What a training step calls: ``module.<method>`` as the forward (so DDP's gradient hooks see a
    loss that is not ``forward``), inside DDP when there are several processes, compiled when asked."""
    entry = module if method == "forward" else _Method(module, method)
    if info.enabled:
        ids = [info.device.index] if info.device.type == "cuda" else None
        entry = torch.nn.parallel.DistributedDataParallel(entry, device_ids=ids)
    return torch.compile(entry) if compile else entry


class _Method(torch.nn.Module):
    """Calls ``module.<method>`` as its forward."""

    def __init__(self, module: torch.nn.Module, method: str):
        super().__init__()
        if not callable(getattr(module, method, None)):
            raise AttributeError(f"{type(module).__name__} has no method {method!r} to train through")
        self.module, self.method = module, method

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return getattr(self.module, self.method)(*args, **kwargs)


def wrap_closure(module: torch.nn.Module, info: DistInfo) -> torch.nn.Module:
    """A module whose forward ``(fn, *args)`` runs ``fn(*args)``, holding ``module``'s parameters: a
    loss that calls the bare ``module`` several times (a discriminator on reals and fakes) is then one
    forward of its DDP wrapper."""
    entry: torch.nn.Module = _Closure(module)
    if info.enabled:
        ids = [info.device.index] if info.device.type == "cuda" else None
        entry = torch.nn.parallel.DistributedDataParallel(entry, device_ids=ids)
    return entry


class _Closure(torch.nn.Module):
    def __init__(self, module: torch.nn.Module):
        super().__init__()
        self.module = module

    def forward(self, fn: Any, *args: Any) -> Any:
        return fn(*args)


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_reduce_mean(value: torch.Tensor) -> torch.Tensor:
    """Mean of ``value`` over every process (itself when there is one)."""
    if not (dist.is_available() and dist.is_initialized()):
        return value
    value = value.detach().clone()
    dist.all_reduce(value)
    return value / dist.get_world_size()


def all_gather_cat(value: torch.Tensor) -> torch.Tensor:
    """Concatenate equal-shaped tensors from every process along dim 0."""
    if not (dist.is_available() and dist.is_initialized()):
        return value
    parts = [torch.empty_like(value) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, value.contiguous())
    return torch.cat(parts)


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shard(items: Sequence[T]) -> Sequence[T]:
    """This process's share of ``items``: rank r of w takes items r, r+w, r+2w, … (all of them alone)."""
    rank, world = _rank_world()
    return items[rank::world]


def gather_in_order(mine: Iterable[T], total: int) -> Iterator[T]:
    """The results of every process's :func:`shard` of ``total`` items, yielded on the main process
    in item order (one round of ``w`` results at a time, so memory holds one round); other processes
    yield nothing but must iterate too, since every round is a collective ``gather_object``."""
    rank, world = _rank_world()
    results = iter(mine)
    for start in range(0, total, world):
        result = next(results) if start + rank < total else None
        if world == 1:
            yield result
            continue
        got: list[Any] | None = [None] * world if rank == 0 else None
        dist.gather_object(result, got, dst=0)
        if got is not None:
            yield from got[: total - start]


def seed_batch(seed: int, first: int) -> None:
    """Seed every RNG from (run seed, a batch's first item index): the batch draws the same numbers
    whichever process handles it, so results do not depend on the number of processes."""
    seed_everything(int(np.random.SeedSequence([seed, first]).generate_state(1)[0]))
