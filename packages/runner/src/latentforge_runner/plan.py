"""``latentforge plan``: per-process memory of a ``train-generator`` run, before any GPU is rented.

    latentforge plan --config repa-sit-xl-2 --gpus 16 training.batch_size=512
    latentforge plan --config rae-ditdh-xl --json

The run's parts are built on the meta device (shapes only, no weights read or allocated): the frozen
tokenizer, the generator, REPA's projector and its frozen encoder.  Static terms are counted from
their parameters as the code holds them: fp32 parameters, fp32 gradients, AdamW's two fp32 moments,
each EMA (a copy of the generator, sharded like it: ``training.EMA``), the frozen parts; DDP's
gradient buckets (one more fp32 copy of the gradients, ``gradient_as_bucket_view`` off).  Under
``fsdp`` the trained parameters, gradients, moments and the EMAs' parameters are divided by the
processes, under ``hsdp`` by the shard group; one process is unsharded whatever the strategy, as
``distributed.wrap``.  Evaluation gathers one whole EMA between steps (not counted).

Activations are measured, not modelled: the training loss runs forward on meta tensors at the
micro-batch ``batch_size / (processes × grad_accum)`` under ``saved_tensors_hooks``, and every
storage autograd keeps for the backward is counted once (parameters excluded).  With activation
checkpointing the blocks are wrapped by ``distributed.checkpoint_blocks`` as in a run, and what a
checkpointed block keeps is its inputs (held for the recompute) instead of its saved tensors.

Precision.  On CUDA with ``training.precision`` auto or bf16 a run trains under bf16 autocast; meta
tensors have no autocast, so :class:`_AsOnDevice` repeats CUDA autocast's casting rules for the
ops that matter at function level (matmuls, convolutions and attention in bf16, with the bf16 copy
of each weight cached for the region; norms, softmax and losses in fp32; the rest in the dtype its
inputs promote to).  This emulation is checked on CPU against itself only (no GPU here): read the
bf16 activations as an estimate.  fp32 runs (and ``--device cpu``) are exact.

Transient peaks are stated terms: the recompute of the largest checkpointed block (its saved tensors
live again during its backward), FSDP's all-gathered units (two blocks' parameters in the gather
dtype, current and prefetched, one block's fp32 unsharded gradients and the root's parameters), and
the optimiser step (CUDA's foreach AdamW: one intermediate as large as the shard of the trained
parameters; CPU: the largest parameter).  The peak is the static terms plus the larger of the
forward/backward phase and the optimiser step.  Not counted: the CUDA context and allocator slack
(fragmentation; allow 5–10 %), the data batch and the frozen tokenizer's no-grad encode.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import attrs
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from latentforge_core.alignment import encoder_targets
from latentforge_core.errors import InputError, value_checks
from latentforge_runner import distributed
from latentforge_runner.config import Component, without_weight_files
from latentforge_runner.generation import generator_shapes

STRATEGIES = distributed.STRATEGIES
CHECKPOINTING = ("none", "full", "every_k")
PLANNED_RECIPES = ("train-generator",)
GPUS_PER_NODE = 8  # hsdp's default shard group (torchrun's LOCAL_WORLD_SIZE on an 8-GPU node)


# ------------------------------------------------------------------------------------------------
# The run's parts, on the meta device
# ------------------------------------------------------------------------------------------------
@attrs.define
class MetaRun:
    """The modules of a ``train-generator`` run, as its ``setup`` builds them, without storage."""

    tokenizer: torch.nn.Module
    generator: torch.nn.Module
    trained: torch.nn.Module  # what the optimiser updates: the generator, or REPA around it
    encoder: torch.nn.Module | None  # REPA's frozen encoder
    latent_shape: tuple[int, ...]  # C, h, w
    image_size: int


def _without_files(block: Component) -> Component:
    """The block without weight files (``validate``'s rule): the architecture alone."""
    return Component(name=block.name, params=without_weight_files(block.params))


def build_on_meta(cfg: Any) -> MetaRun:
    """``train-generator``'s tokenizer, generator and REPA parts on the meta device."""
    from latentforge_generators.repa import REPA

    with torch.device("meta"):
        tokenizer = _build(cfg.tokenizer, "tokenizers", "tokenizer")
        if tokenizer.vocab_size is not None:
            raise InputError(
                f"tokenizer {cfg.tokenizer.name!r} gives discrete tokens; plan covers train-generator's "
                "flow generators on continuous latents"
            )
        shape = generator_shapes(tokenizer, cfg.data.num_classes)
        generator = _build(cfg.generator, "generators", "generator", **shape)
        trained, encoder = generator, None
        if cfg.alignment is not None:
            a = cfg.alignment
            encoder = _build(a.encoder, "encoders", "alignment.encoder")
            trained = REPA(generator, encoder.embed_dim, a.depth, a.weight, a.projector_dim)
    for frozen in (tokenizer, encoder):
        if frozen is not None:
            frozen.eval().requires_grad_(False)
    return MetaRun(tokenizer, generator, trained, encoder, tuple(tokenizer.latent_shape), cfg.data.image_size)


def _build(block: Component, kind: str, where: str, **injected: Any) -> torch.nn.Module:
    architecture = _without_files(block)
    try:
        return architecture.build(kind, **injected)
    except (TypeError, ValueError, InputError) as err:
        why = "cannot be built without its weight files (plan reads none)"
        raise InputError(
            f"{where} {block.name!r} {why if architecture != block else 'does not build'}: {err}"
        ) from err


# ------------------------------------------------------------------------------------------------
# Activations: what autograd keeps for the backward, measured on meta tensors
# ------------------------------------------------------------------------------------------------
_LOW = {F.linear, F.conv1d, F.conv2d, F.conv3d, F.conv_transpose2d, F.scaled_dot_product_attention,
        torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.mm, torch.bmm, torch.addmm,
        torch.baddbmm}  # fmt: skip
_FP32 = {F.layer_norm, F.group_norm, F.rms_norm, F.softmax, torch.softmax, torch.Tensor.softmax,
         F.log_softmax, F.mse_loss, F.l1_loss, F.cross_entropy, F.cosine_similarity, F.normalize,
         torch.exp, torch.rsqrt, torch.pow, torch.Tensor.pow, torch.sum, torch.Tensor.sum}  # fmt: skip


class _AsOnDevice(TorchFunctionMode):
    """Meta tensors run what the device runs: attention through the fused kernel (meta's own SDPA is
    the math path, which keeps the attention matrix CUDA's and the CPU's kernels never store), and
    with ``bf16`` CUDA autocast's casts repeated at function level (see the module doc)."""

    def __init__(self, bf16: bool) -> None:
        super().__init__()
        self.bf16 = bf16
        self.cache: dict[int, torch.Tensor] = {}  # weight → its bf16 copy (autocast's weight cache)

    def _cast(self, value: Any, dtype: torch.dtype) -> Any:
        if not (isinstance(value, torch.Tensor) and value.is_floating_point() and value.dtype != dtype):
            return value
        if dtype == torch.bfloat16 and value.is_leaf and value.requires_grad:
            if id(value) not in self.cache:
                self.cache[id(value)] = value.to(dtype)
            return self.cache[id(value)]
        return value.to(dtype)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        dtype = torch.bfloat16 if func in _LOW else torch.float32 if func in _FP32 else None
        if self.bf16 and dtype is not None:
            args = tuple(self._cast(a, dtype) for a in args)
            kwargs = {k: self._cast(v, dtype) for k, v in kwargs.items()}
        if func is F.scaled_dot_product_attention:
            return _fused_attention(*args, **kwargs)
        return func(*args, **kwargs)


def _fused_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    out, *_ = torch.ops.aten._scaled_dot_product_efficient_attention(
        q, k, v, attn_mask, True, dropout_p, is_causal, scale=scale
    )
    return out


def measure_activations(
    run: MetaRun, micro_batch: int, bf16: bool, checkpointing: str = "none", every: int = 2
) -> tuple[int, dict[tuple[int, int], int]]:
    """(bytes saved for the backward by one forward of the training loss at ``micro_batch``, the
    bytes each block saved as ``{(blocks list, index): bytes}``, its inputs only when checkpointed)."""
    model = run.trained
    groups = distributed.transformer_blocks(model)
    where = {block: (g, i) for g, group in enumerate(groups) for i, block in enumerate(group)}
    classes = {block: type(block) for block in where}
    if checkpointing != "none":
        distributed.checkpoint_blocks(model, 1 if checkpointing == "full" else every)
    params = {_storage_key(t) for m in (model, run.tokenizer, run.encoder) if m for t in _tensors(m)}
    saved: dict[int, int] = {}
    keep: list[torch.Tensor] = []  # alive until counted: a freed storage's key may be reused
    per_block: dict[tuple[int, int], int] = {}
    current: list[torch.nn.Module] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = _storage_key(t)
        if key not in params and key not in saved:
            saved[key] = t.untyped_storage().nbytes()
            keep.append(t)
            if current:
                at = where[current[-1]]
                per_block[at] = per_block.get(at, 0) + saved[key]
        return t

    def enter(block: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        current.append(block)
        if isinstance(block, distributed._CheckpointedBlock):  # the recompute's inputs stay alive
            for t in [*args, *kwargs.values()]:
                if isinstance(t, torch.Tensor):
                    pack(t)

    def leave(*_: Any) -> None:
        current.pop()

    hooks = [b.register_forward_pre_hook(enter, with_kwargs=True) for b in where]
    hooks += [b.register_forward_hook(leave) for b in where]
    try:
        with torch.device("meta"), value_checks(False):
            x = torch.empty(micro_batch, *run.latent_shape)
            y = torch.zeros(micro_batch, dtype=torch.long)
            target = None
            if run.encoder is not None:
                images = torch.empty(micro_batch, 3, run.image_size, run.image_size)
                with torch.no_grad():
                    target = encoder_targets(run.encoder, images)
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), _AsOnDevice(bf16):
                model.train()
                if target is None:
                    model.loss(x, y)
                else:
                    model.loss(x, y, target, return_terms=True)
    finally:
        for hook in hooks:
            hook.remove()
        for block, cls in classes.items():
            block.__class__ = cls
    return sum(saved.values()), per_block


def _storage_key(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata


def _tensors(module: torch.nn.Module) -> Iterator[torch.Tensor]:
    yield from module.parameters()
    yield from module.buffers()


# ------------------------------------------------------------------------------------------------
# The plan: terms per process, for each strategy × activation checkpointing
# ------------------------------------------------------------------------------------------------
@attrs.frozen
class PlanRow:
    """Bytes per process of one strategy × activation checkpointing."""

    strategy: str
    checkpointing: str
    processes: int
    shards: int  # how many processes share one copy of the trained weights
    micro_batch: int
    params: int  # the trained parameters (their shard) and buffers, fp32
    grads: int  # fp32, their shard
    optimizer: int  # AdamW's exp_avg and exp_avg_sq, fp32, their shard
    ema: int  # a copy of the generator per EMA (ema_decay, ema_decays, ema_profiles), params their shard
    frozen: int  # the tokenizer and the alignment encoder
    buckets: int  # DDP's gradient buckets
    activations: int  # saved for the backward of one micro-batch
    backward_transient: int  # the largest checkpointed block's recompute + FSDP's gathered units
    step_transient: int  # the optimiser step's intermediates
    peak: int  # static terms + the larger of the forward/backward phase and the optimiser step

    @property
    def static(self) -> int:
        return self.params + self.optimizer + self.ema + self.frozen + self.buckets


def _bytes(tensors: Iterable[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def shard_count(strategy: str, processes: int, hsdp_shard_size: int | None) -> int:
    """Processes sharing one copy of the trained weights: 1 (DDP, or one process), all (FSDP), the
    shard group (HSDP: ``hsdp_shard_size``, else a node's GPUs)."""
    if processes == 1 or strategy == "ddp":
        return 1
    if strategy == "fsdp":
        return processes
    size = hsdp_shard_size or min(processes, GPUS_PER_NODE)
    if processes % size:
        raise InputError(
            f"training.hsdp_shard_size {size} does not divide the {processes} processes: expected a "
            f"divisor of {processes}"
        )
    return size


def plan_rows(
    cfg: Any,
    processes: int,
    device: str = "cuda",
    strategies: Sequence[str] = STRATEGIES,
    checkpointing: Sequence[str] = CHECKPOINTING,
    run: MetaRun | None = None,
) -> list[PlanRow]:
    """One :class:`PlanRow` per strategy × activation checkpointing for ``cfg`` (train-generator's
    settings) at ``processes`` processes on ``device`` (``cuda``: bf16 autocast unless fp32)."""
    t = cfg.training
    if isinstance(processes, bool) or not isinstance(processes, int) or processes < 1:
        raise InputError(f"--gpus {processes!r}: expected a whole number of processes, 1 or more")
    if device not in ("cuda", "cpu"):
        raise InputError(f"--device {device!r}: expected cuda or cpu")
    for name, known in [*((s, STRATEGIES) for s in strategies), *((c, CHECKPOINTING) for c in checkpointing)]:
        if name not in known:
            raise InputError(
                f"unknown {'strategy' if known is STRATEGIES else 'activation checkpointing'} "
                f"{name!r}: expected one of {', '.join(known)}"
            )
    per = processes * t.grad_accum
    if t.batch_size % per:
        raise InputError(
            f"training.batch_size {t.batch_size} is not divisible by {processes} process(es) × grad_accum "
            f"{t.grad_accum}: expected a multiple of {per} (or another --gpus)"
        )
    micro = t.batch_size // per
    bf16 = device == "cuda" and t.precision != "fp32"
    run = build_on_meta(cfg) if run is None else run

    trained = [p for p in run.trained.parameters() if p.requires_grad]
    trained_bytes, buffers = _bytes(trained), _bytes(run.trained.buffers())
    averages = (
        (t.ema_decay is not None) + len(getattr(t, "ema_decays", ())) + len(getattr(t, "ema_profiles", ()))
    )
    ema_params, ema_buffers = _bytes(run.generator.parameters()), _bytes(run.generator.buffers())
    frozen = sum(_bytes(_tensors(m)) for m in (run.tokenizer, run.encoder) if m is not None)
    blocks = [b for group in distributed.transformer_blocks(run.trained) for b in group]
    block_bytes = max((_bytes(b.parameters()) for b in blocks), default=0)
    root_bytes = trained_bytes - sum(_bytes(b.parameters()) for b in blocks)
    largest_param = max((p.numel() * p.element_size() for p in trained), default=0)
    gathered = 0.5 if bf16 else 1.0  # FSDP's mixed precision gathers bf16 parameters on CUDA

    every = {"none": 0, "full": 1, "every_k": t.activation_checkpointing_every}
    whole, per_block = measure_activations(run, micro, bf16)
    saved = {mode: measure_activations(run, micro, bf16, mode, every[mode])[0] for mode in checkpointing}
    saved["none"] = whole
    recompute = {  # the largest block checkpointed, whose saved tensors live again in its backward
        mode: max((b for (_, i), b in per_block.items() if i % every[mode] == 0), default=0)
        if every[mode]
        else 0
        for mode in checkpointing
    }
    rows = []
    for strategy in strategies:
        shards = shard_count(strategy, processes, t.hsdp_shard_size)
        shard = math.ceil(trained_bytes / shards)
        units = 0  # FSDP: two blocks gathered (current, prefetched), one block's gradients, the root
        if shards > 1:
            units = int(2 * block_bytes * gathered + block_bytes + root_bytes * gathered)
        step = shard if device == "cuda" else largest_param  # foreach intermediates, or one tensor's
        ema = averages * (math.ceil(ema_params / shards) + ema_buffers)  # sharded as the generator
        for mode in checkpointing:
            backward_transient = recompute[mode] + units
            held = shard if t.grad_accum > 1 else 0  # earlier micro-batches' gradients
            row = dict(
                strategy=strategy,
                checkpointing=mode,
                processes=processes,
                shards=shards,
                micro_batch=micro,
                params=shard + buffers,
                grads=shard,
                optimizer=2 * shard,
                ema=ema,
                frozen=frozen,
                buckets=trained_bytes if strategy == "ddp" and processes > 1 else 0,
                activations=saved[mode],
                backward_transient=backward_transient,
                step_transient=step,
            )
            static = row["params"] + row["optimizer"] + ema + frozen + row["buckets"]
            peak = static + max(saved[mode] + held + backward_transient, shard + step)
            rows.append(PlanRow(**row, peak=peak))
    return rows


# ------------------------------------------------------------------------------------------------
# Output
# ------------------------------------------------------------------------------------------------
COLUMNS = {  # header → PlanRow field, in GiB
    "params": "params",
    "grads": "grads",
    "AdamW": "optimizer",
    "EMA": "ema",
    "frozen": "frozen",
    "DDP bkt": "buckets",
    "activ.": "activations",
    "bwd tr.": "backward_transient",
    "step tr.": "step_transient",
    "peak": "peak",
}


def format_table(rows: Sequence[PlanRow], title: str) -> str:
    """A fixed-width table of the rows per process (GiB, or MiB when every peak is under 1 GiB), with
    the assumptions under it."""
    unit, scale = ("GiB", 2**30) if max(r.peak for r in rows) >= 2**30 else ("MiB", 2**20)
    head = f"{'strategy':8s} {'ckpt':8s} {'shards':>6s} {'micro':>5s} "
    head += " ".join(f"{h:>8s}" for h in COLUMNS)
    lines = [title, head, "-" * len(head)]
    for r in rows:
        cells = " ".join(f"{getattr(r, field) / scale:8.2f}" for field in COLUMNS.values())
        lines.append(f"{r.strategy:8s} {r.checkpointing:8s} {r.shards:6d} {r.micro_batch:5d} {cells}")
    lines += [
        f"{unit} per process. peak = params + AdamW + EMA + frozen + DDP buckets + the larger of",
        "  (activations [+ grads when accumulating] + bwd transient) and (grads + step transient).",
        "Not counted: the CUDA context, allocator fragmentation (allow 5-10 %), the data batch and",
        "  the tokenizer's no-grad encode.",
    ]
    return "\n".join(lines)


def to_json(rows: Sequence[PlanRow], **about: Any) -> str:
    return json.dumps(
        {**about, "unit": "bytes per process", "rows": [attrs.asdict(r) for r in rows]}, indent=2
    )
