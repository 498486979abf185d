"""Process groups through ``torchrun``: NCCL on GPUs, gloo on CPUs, one process when run plainly.

Several machines use torchrun's rendezvous, e.g. on each of two nodes::

    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \\
        -m latentforge_runner.cli run train-generator --config my.yaml
"""

from __future__ import annotations

import contextlib
import copy
import os
import warnings
import weakref
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

import attrs
import numpy as np
import torch
import torch.distributed as dist

from latentforge_core.checkpoint import CheckpointError
from latentforge_core.device import resolve_device, seed_everything
from latentforge_core.errors import InputError

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
        _release_meshes()
        dist.destroy_process_group()


def _release_meshes() -> None:
    """Destroy the process groups of the device meshes made for FSDP/HSDP and drop the meshes' hold
    on them: a gloo group still referenced when the interpreter exits can abort the process there
    ("terminate called without an active exception"), after all its work was done."""
    world = dist.group.WORLD
    for mesh in _MESHES:
        groups = getattr(mesh, "_pg_registry", {})
        for group in list(groups.values()):
            if group is not world:
                with contextlib.suppress(Exception):
                    dist.destroy_process_group(group)
        groups.clear()
    _MESHES.clear()


def wrap(
    module: torch.nn.Module,
    info: DistInfo,
    method: str = "forward",
    compile: bool = False,
    training: Any = None,
    sharding: bool = True,
):
    """What a training step calls: ``module.<method>`` as the forward (so DDP's gradient hooks see a
    loss that is not ``forward``), inside DDP when there are several processes, compiled when asked.

    ``training`` (the run's :class:`~latentforge_runner.training.TrainingSettings`) chooses more:
    ``activation_checkpointing`` recomputes the transformer blocks' activations in the backward
    (:func:`checkpoint_blocks`, any number of processes), and with several processes ``strategy``
    ``fsdp``/``hsdp`` shards the model with FSDP2 instead of DDP (:func:`fully_shard_model`: each
    block, then the root; ``module`` is sharded in place).  Under FSDP the EMAs are sharded alike: the
    structure of ``module`` is kept on the meta device (no memory) before sharding, for
    :func:`average_copy`.  One process is never wrapped: ``fsdp`` runs unsharded.
    ``sharding=False`` refuses ``fsdp``/``hsdp`` (for any number of processes): a recipe whose steps
    call the model outside this entry (a GAN's losses, a PSNR pass) cannot run under FSDP2, whose
    root forward is what gathers the parameters."""
    strategy = getattr(training, "strategy", "ddp")
    if strategy not in STRATEGIES:
        raise InputError(f"unknown training.strategy {strategy!r}: expected one of {', '.join(STRATEGIES)}")
    if strategy != "ddp" and not sharding:
        raise InputError(
            f"training.strategy {strategy} is unavailable in this recipe (its steps call the model "
            "outside the sharded entry, which FSDP cannot serve): use training.strategy=ddp"
        )
    sharded = info.enabled and strategy in ("fsdp", "hsdp")
    if sharded:
        _check_fsdp(info, training)
        structure = _meta_copy(module)  # before checkpoint_blocks: the EMAs never run a backward
    if training is not None and training.activation_checkpointing != "none":
        every = 1 if training.activation_checkpointing == "full" else training.activation_checkpointing_every
        checkpoint_blocks(module, every)
    entry = module if method == "forward" else _Method(module, method)
    if sharded:
        entry = fully_shard_model(entry, info, training)
        mesh = next(p.device_mesh for p in module.parameters() if isinstance(p, _dtensor()))
        offload = {"offload_policy": _cpu_offload()} if training.cpu_offload else {}
        _STRUCTURES[module] = (structure, {"mesh": mesh, **offload})
    elif info.enabled:
        ids = [info.device.index] if info.device.type == "cuda" else None
        entry = torch.nn.parallel.DistributedDataParallel(entry, device_ids=ids)
    return torch.compile(entry) if compile else entry


STRATEGIES = ("ddp", "fsdp", "hsdp")
FSDP_BACKENDS = ("nccl", "gloo")  # where FSDP2's all-gather and reduce-scatter are known to run


# ------------------------------------------------------------------------------------------------
# Transformer blocks: activation checkpointing and FSDP2's units
# ------------------------------------------------------------------------------------------------
def transformer_blocks(module: torch.nn.Module) -> list[torch.nn.ModuleList]:
    """The ``blocks`` ModuleLists of ``module``'s model families (DiT, LightningDiT, DiT-DH, the stage-2
    token transformers, ViT encoders) that hold parameters, outermost first."""
    return [
        m
        for name, m in module.named_modules()
        if name.rsplit(".", 1)[-1] == "blocks"
        and isinstance(m, torch.nn.ModuleList)
        and any(True for _ in m.parameters())
    ]


class _CheckpointedBlock(torch.nn.Module):
    """Mixed in before a block's own class: its forward runs under ``torch.utils.checkpoint``
    (non-reentrant, RNG state preserved), so the backward recomputes its activations instead of
    keeping them.  Arguments pass through as they are (DiT blocks take ``(h, c, rope)``, token
    transformer blocks keywords); without gradients (sampling, the EMA) it is the plain forward."""

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():
            return super().forward(*args, **kwargs)
        return torch.utils.checkpoint.checkpoint(super().forward, *args, use_reentrant=False, **kwargs)


_CHECKPOINTED: dict[type, type] = {}


def _has_running_stats(block: torch.nn.Module) -> bool:
    """Batch norms update their statistics in every forward, the recomputation too: left alone."""
    return any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in block.modules())


def checkpoint_blocks(module: torch.nn.Module, every: int = 1) -> int:
    """Recompute the activations of every ``every``-th block (0, k, 2k, …) of each of
    :func:`transformer_blocks` in the backward; returns how many blocks.  The block's class becomes
    a subclass with a checkpointed forward (as FSDP2 does for its units), so parameter names,
    state dicts, hooks and copies are unchanged, and the numbers too: the same forward runs twice."""
    count = 0
    for blocks in transformer_blocks(module):
        for i, block in enumerate(blocks):
            cls = type(block)
            if i % every or issubclass(cls, _CheckpointedBlock) or _has_running_stats(block):
                continue
            if cls not in _CHECKPOINTED:
                _CHECKPOINTED[cls] = type(f"Checkpointed{cls.__name__}", (_CheckpointedBlock, cls), {})
            block.__class__ = _CHECKPOINTED[cls]
            count += 1
    return count


# ------------------------------------------------------------------------------------------------
# FSDP2: sharding, and full tensors for the checkpoints
# ------------------------------------------------------------------------------------------------
def _check_fsdp(info: DistInfo, training: Any) -> None:
    backend = dist.get_backend() if dist.is_initialized() else None
    where = f"on the {backend} process group" if backend else "without a process group"
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError as err:  # pragma: no cover - every torch this project supports has FSDP2
        raise InputError(
            f"training.strategy {training.strategy} needs FSDP2 (torch.distributed.fsdp.fully_shard), "
            f"which this torch {torch.__version__} lacks: use training.strategy=ddp"
        ) from err
    if backend not in FSDP_BACKENDS:
        raise InputError(
            f"training.strategy {training.strategy} is unavailable {where} "
            f"(FSDP2 runs on {' and '.join(FSDP_BACKENDS)}): use training.strategy=ddp"
        )
    if training.cpu_offload and info.device.type != "cuda":
        raise InputError(
            f"training.cpu_offload moves FSDP's shards between the GPU and the host, but this run is on "
            f"{info.device.type}: set training.cpu_offload=false"
        )


def device_mesh(info: DistInfo, training: Any) -> Any:
    """``fsdp``: every process one shard group; ``hsdp``: replicas × shards, the shard groups of
    ``training.hsdp_shard_size`` processes (default: the processes of a node, torchrun's
    LOCAL_WORLD_SIZE), so parameters are all-gathered within a node and gradients all-reduced across."""
    from torch.distributed.device_mesh import init_device_mesh

    world = info.world_size
    if training.strategy == "fsdp":
        mesh = init_device_mesh(info.device.type, (world,), mesh_dim_names=("shard",))
        _MESHES.append(mesh)
        return mesh
    size = training.hsdp_shard_size or int(os.environ.get("LOCAL_WORLD_SIZE", world))
    if world % size:
        raise InputError(
            f"training.hsdp_shard_size {size} does not divide the {world} processes: expected a divisor "
            f"of {world} (the processes of a node, e.g. {int(os.environ.get('LOCAL_WORLD_SIZE', world))})"
        )
    mesh = init_device_mesh(info.device.type, (world // size, size), mesh_dim_names=("replicate", "shard"))
    _MESHES.append(mesh)
    return mesh


_MESHES: list[Any] = []  # the meshes made here, released by cleanup()


def fully_shard_model(entry: torch.nn.Module, info: DistInfo, training: Any) -> torch.nn.Module:
    """``entry`` under FSDP2: ``fully_shard`` on each block of :func:`transformer_blocks`, then on
    ``entry`` (the root, whose forward every step calls); mixed precision on CUDA unless
    ``training.precision`` is fp32 (bf16 parameters, fp16 under ``precision: fp16``; fp32 gradient
    reduction); CPU offload when asked."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    kwargs: dict[str, Any] = {"mesh": device_mesh(info, training)}
    if info.device.type == "cuda" and training.dtype != torch.float32:  # auto is bf16 on CUDA
        param_dtype = training.dtype or torch.bfloat16
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    if training.cpu_offload:
        kwargs["offload_policy"] = _cpu_offload()
    return _shard_blocks_and_root(entry, kwargs)


def _shard_blocks_and_root(module: torch.nn.Module, kwargs: Mapping[str, Any]) -> torch.nn.Module:
    from torch.distributed.fsdp import fully_shard

    for blocks in transformer_blocks(module):
        for block in blocks:
            fully_shard(block, **kwargs)
    fully_shard(module, **kwargs)
    return module


def _cpu_offload() -> Any:
    from torch.distributed.fsdp import CPUOffloadPolicy

    return CPUOffloadPolicy()


def _dtensor() -> type:
    from torch.distributed.tensor import DTensor

    return DTensor


def is_sharded(module: torch.nn.Module) -> bool:
    """Whether FSDP holds any of ``module``'s parameters as shards (DTensors)."""
    DTensor = _dtensor()
    return any(isinstance(p, DTensor) for p in module.parameters())


def full_tensor(value: torch.Tensor) -> torch.Tensor:
    """A DTensor's whole value (an all-gather: every process calls it in the same order); else itself."""
    return value.full_tensor() if isinstance(value, _dtensor()) else value


def shard_like(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``full`` cut as the DTensor ``like`` is (no communication: every process holds ``full``)."""
    from torch.distributed.tensor import distribute_tensor

    if not isinstance(like, _dtensor()):
        return full
    cut_alike = isinstance(full, _dtensor()) and full.placements == like.placements
    if cut_alike and full.device_mesh == like.device_mesh:  # a sharded checkpoint's optimiser state
        return full.to(dtype=like.dtype)
    full = full.to(device=like.device, dtype=like.dtype)
    return distribute_tensor(full, like.device_mesh, like.placements, src_data_rank=None)


def full_state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``module``'s state dict with whole tensors, for a checkpoint the main process writes: its own
    ``state_dict()`` when unsharded; under FSDP gathered to the main process's CPU (the others get
    an empty dict) by ``get_model_state_dict``: a collective, every process calls it."""
    if not is_sharded(module):
        return module.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(module, options=options)


@torch.no_grad()
def load_full_state_dict(module: torch.nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Load a whole-tensor state dict (a checkpoint's) into ``module``, sharded or not; every process
    holds ``state``, so each cuts its own shards."""
    if not is_sharded(module):
        module.load_state_dict(state)
        return
    own = module.state_dict()
    if set(own) != set(state):
        module.load_state_dict(state)  # raises, naming the keys
    for key, value in own.items():
        if isinstance(value, _dtensor()):
            value.to_local().copy_(shard_like(state[key], value).to_local())
        else:
            value.copy_(state[key])


# ------------------------------------------------------------------------------------------------
# EMAs sharded like their model: local updates, gathered whole for evaluation only
# ------------------------------------------------------------------------------------------------
# A module wrap() sharded, or an EMA average_copy() made: its unsharded structure on the meta device,
# and the fully_shard arguments (mesh, CPU offload) a copy of it is sharded with.
_STRUCTURES: weakref.WeakKeyDictionary[torch.nn.Module, tuple[torch.nn.Module, dict[str, Any]]] = (
    weakref.WeakKeyDictionary()
)


def _meta_copy(module: torch.nn.Module) -> torch.nn.Module:
    """A deep copy of ``module`` whose parameters and buffers are on the meta device: the structure
    alone, made without a second copy of the weights (they are replaced while copying)."""
    memo: dict[int, Any] = {}
    for tensor in [*module.parameters(), *module.buffers()]:
        meta = torch.empty_like(tensor, device="meta")
        is_param = isinstance(tensor, torch.nn.Parameter)
        memo[id(tensor)] = torch.nn.Parameter(meta, tensor.requires_grad) if is_param else meta
    return copy.deepcopy(module, memo)


def _structure_of(module: torch.nn.Module) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The structure of a sharded ``module`` (a root :func:`wrap` sharded or a part of one, e.g. the
    generator inside REPA's wrapper, or an EMA) and its sharding arguments."""
    for root, (structure, kwargs) in list(_STRUCTURES.items()):
        name = next((n for n, m in root.named_modules() if m is module), None)
        if name is not None:
            return (structure.get_submodule(name) if name else structure), kwargs
    raise InputError(
        f"{type(module).__name__} is sharded by FSDP but not by distributed.wrap: wrap it with "
        "distributed.wrap(..., training=t) before making its EMA"
    )


def local_tensor(value: torch.Tensor) -> torch.Tensor:
    """This process's shard of a DTensor (a view: writing it writes the DTensor); else itself."""
    return value.to_local() if isinstance(value, _dtensor()) else value


@torch.no_grad()
def average_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``model`` with its current weights to average into (an EMA), without gradients.

    Unsharded: a deep copy.  Under FSDP a copy of ``model``'s structure sharded as ``model`` is (each
    block, then the root, on the same mesh: the same placements), filled from ``model``'s own shards
    with no communication: each process holds its shards only, and an update is a local lerp between
    shards (:func:`local_tensor`).  :func:`gathered_copy` makes it whole for evaluation."""
    if not is_sharded(model):
        return copy.deepcopy(model).requires_grad_(False)
    structure, kwargs = _structure_of(model)
    average = _shard_blocks_and_root(_meta_copy(structure), kwargs)
    device = next(local_tensor(p).device for p in model.parameters())  # the host under CPU offload
    average.to_empty(device=device).requires_grad_(False)
    own = dict(average.named_parameters()) | dict(average.named_buffers())
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        local_tensor(own[name]).copy_(local_tensor(tensor))
    _STRUCTURES[average] = (structure, kwargs)
    return average


@torch.no_grad()
def gathered_copy(module: torch.nn.Module) -> torch.nn.Module:
    """A whole, unsharded copy of an :func:`average_copy` sharded by FSDP, on every process (an
    all-gather: every process calls it together); ``module`` itself when unsharded."""
    if not is_sharded(module):
        return module
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    whole = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True))  # every process
    out = _meta_copy(_structure_of(module)[0])
    out.load_state_dict(whole, assign=True)  # the gathered tensors themselves, no second copy
    device = next(iter(whole.values())).device
    for name, buffer in module.named_buffers():  # non-persistent ones too (not in a state dict)
        owner, _, key = name.rpartition(".")
        setattr(out.get_submodule(owner), key, buffer.detach().to(device, copy=True))
    return out.requires_grad_(False)


# ------------------------------------------------------------------------------------------------
# Sharded checkpoints: torch.distributed.checkpoint (DCP) folders
# ------------------------------------------------------------------------------------------------
def save_sharded(tensors: Mapping[str, torch.Tensor], folder: str | os.PathLike) -> None:
    """Write ``tensors`` (DTensor shards or whole tensors) as a DCP folder: each process writes its own
    shards (``__<rank>_0.distcp``; whole tensors held by every process are written once) and the main
    one the ``.metadata`` that maps them.  A collective under torchrun: every process calls it."""
    import torch.distributed.checkpoint as dcp

    with _one_process_is_meant():
        dcp.save(dict(tensors), checkpoint_id=folder, no_dist=not _in_group())


def load_sharded(
    targets: Mapping[str, torch.Tensor], folder: str | os.PathLike, collective: bool = True
) -> None:
    """Fill ``targets`` in place from a DCP folder, whatever the number of processes that wrote it (DCP
    reads the parts of the saved shards each target's own shard covers).  ``collective``: every process
    calls it together; else this process reads alone (exporting, sampling)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        with _one_process_is_meant():
            dcp.load(dict(targets), checkpoint_id=folder, no_dist=not (collective and _in_group()))
    except CheckpointException as err:  # a BaseException gathering every process's failure
        rank, failure = next(iter(err.failures.items()))
        cause = getattr(failure, "exc", failure)
        raise CheckpointError(
            f"the DCP folder {folder} does not load (process {rank}: {type(cause).__name__} {cause})"
        ) from err


def sharded_metadata(folder: str | os.PathLike) -> dict[str, tuple[torch.Size, torch.dtype]]:
    """``{key: (whole shape, dtype)}`` of the tensors of a DCP folder, from its ``.metadata`` only."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    saved = FileSystemReader(folder).read_metadata().state_dict_metadata
    return {k: (m.size, m.properties.dtype) for k, m in saved.items() if isinstance(m, TensorStorageMetadata)}


def _in_group() -> bool:
    return dist.is_available() and dist.is_initialized()


@contextlib.contextmanager
def _one_process_is_meant() -> Iterator[None]:
    """DCP warns whenever it reads or writes without a process group, which one process does on purpose."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninit")
        yield


@contextlib.contextmanager
def no_sync(entry: torch.nn.Module) -> Iterator[None]:
    """No gradient reduction in this backward (a micro-batch before the last): DDP's ``no_sync``,
    FSDP2's ``set_requires_gradient_sync(False)``."""
    from torch.distributed.fsdp import FSDPModule

    inner = getattr(entry, "_orig_mod", entry)  # under torch.compile
    if isinstance(inner, FSDPModule):
        inner.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            inner.set_requires_gradient_sync(True)
    else:
        with entry.no_sync():
            yield


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
