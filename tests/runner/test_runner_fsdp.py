"""FSDP2, HSDP and activation checkpointing on CPU: two gloo processes under torchrun train the same
weights as one process with the whole batch, DDP and FSDP agree, and a sharded run resumes exactly
(from two processes, and from two processes into one)."""

import os
import subprocess
import sys
from pathlib import Path

import kit_loop
import pytest
import torch

from latentforge_core import registry
from latentforge_core.errors import InputError
from latentforge_runner import distributed
from latentforge_runner.config import ConfigError, parse
from latentforge_runner.training import EMA, Batches, TrainingSettings, update_averages

CHILD = Path(__file__).with_name("fsdp_child.py")
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
# Two processes average their gradients (an all-reduce or a reduce-scatter) where one process takes a
# mean over the whole batch: fp32 rounding only, measured about 1e-7 after 6 steps of AdamW.
TOL = 1e-6


def _run(run_dir: Path, strategy="fsdp", batch=8, accum=1, ckpt="none", steps=6, nproc=None, shard=None):
    """``fsdp_child.py`` in ``nproc`` processes under torchrun, or in this process when None."""
    out = run_dir.with_suffix(".pt")
    args = [str(out), str(run_dir), strategy, str(batch), str(accum), ckpt, str(steps)]
    args += [] if shard is None else [str(shard)]
    return kit_loop.run_child(CHILD, args, out, nproc)


WEIGHTS = ("model", "ema", "ema_0.9", "ema_sigma_0.1", "snapshot")  # every EMA kind, and a snapshot


def _max_diff(a, b) -> float:
    """The largest difference of the model and EMA weights (every kind, a snapshot) of two runs."""
    assert all(a[part].keys() == b[part].keys() for part in WEIGHTS)
    return max((a[part][k] - b[part][k]).abs().max().item() for part in WEIGHTS for k in a[part])


def _holds_shards_of_the_ema(run, shards: int) -> bool:
    """The EMA is sharded when the model is, the main process holding its shards only (dim 0 split,
    its rows rounded up), and the EMA gathered for evaluation is the whole EMA."""
    share = run["ema_numel"] / shards
    sharded = run["ema_sharded"] == run["sharded"]
    gathered = all(torch.equal(run["evaluated"][k], run["ema"][k]) for k in run["ema"])
    return sharded and gathered and share <= run["ema_held"] < 1.05 * share


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """One process (unsharded whatever the strategy), global batch 8."""
    return _run(tmp_path_factory.mktemp("single") / "run", strategy="ddp")


@pytest.fixture(scope="module")
def fsdp(tmp_path_factory):
    """Two processes under FSDP2, 2 × 4 items per step."""
    return _run(tmp_path_factory.mktemp("fsdp") / "run", nproc=2)


def test_fsdp_two_processes_match_one_process(single, fsdp):
    assert fsdp["sharded"] and not single["sharded"]
    assert _holds_shards_of_the_ema(fsdp, 2) and _holds_shards_of_the_ema(single, 1)
    assert _max_diff(fsdp, single) < TOL
    assert set(fsdp["model"]) == set(single["model"])  # whole state dicts with the same names
    opt_a, opt_b = fsdp["optimizer"]["state"], single["optimizer"]["state"]
    assert set(opt_a) == set(opt_b)  # the optimiser state gathered into the unsharded format
    assert max((opt_a[i][k] - opt_b[i][k]).abs().max().item() for i in opt_a for k in opt_a[i]) < TOL


def test_fsdp_with_activation_checkpointing_and_accumulation(tmp_path, single):
    run = _run(tmp_path / "run", ckpt="full", accum=2, nproc=2)  # 2 processes × 2 micro-batches of 2
    assert _max_diff(run, single) < TOL


def test_ddp_and_fsdp_agree(tmp_path, fsdp):
    ddp = _run(tmp_path / "run", strategy="ddp", ckpt="every_k", nproc=2)
    assert not ddp["sharded"] and _holds_shards_of_the_ema(ddp, 1)  # DDP: a whole EMA per process
    assert _max_diff(ddp, fsdp) < TOL


@pytest.mark.parametrize("shard", [2, 1])  # meshes (replicate, shard) = (1, 2) and (2, 1)
def test_hsdp_matches_one_process(tmp_path, single, shard):
    run = _run(tmp_path / "run", strategy="hsdp", shard=shard, nproc=2)
    assert run["sharded"] and _holds_shards_of_the_ema(run, shard)
    assert _max_diff(run, single) < TOL


def test_fsdp_resume_is_exact(tmp_path, fsdp):
    _run(tmp_path / "run", steps=3, nproc=2)  # checkpoint at step 3, then the run stops
    resumed = _run(tmp_path / "run", steps=6, nproc=2)
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["00000003", "00000006"]
    assert _max_diff(resumed, fsdp) == 0.0  # whole weights and optimiser state: bitwise


def test_fsdp_checkpoint_resumes_in_one_process(tmp_path, fsdp):
    _run(tmp_path / "run", steps=3, nproc=2)
    resumed = _run(tmp_path / "run", steps=6)  # one process continues the two-process checkpoint
    assert not resumed["sharded"]
    assert _max_diff(resumed, fsdp) < TOL


# ------------------------------------------------------------------------------------------------
# Activation checkpointing: the same gradients, for every transformer family
# ------------------------------------------------------------------------------------------------
TRANSFORMERS = [
    "test-dit",
    "test-lightningdit",
    "test-ditdh",
    "test-gpt",
    "test-gpt-modern",
    "test-maskgit",
    "test-digit-stage2-ar",
    "test-digit-stage2-maskgit",
]


def _loss(model, seed):
    torch.manual_seed(seed)  # the loss's own draws (noise, times, masks, label drops) repeat
    if hasattr(model, "vocab_size"):
        tokens = torch.randint(0, model.vocab_size, (4, *model.grid))
        if hasattr(model, "cond_grid"):  # DiGIT stage 2: conditioned on stage-1 token grids
            return model.loss(tokens, torch.randint(0, model.cond_vocab_size, (4, *model.cond_grid)))
        return model.loss(tokens, torch.randint(0, 10, (4,)))
    return model.loss(torch.randn(4, *model.input_shape), torch.randint(0, 10, (4,)))


@pytest.mark.parametrize("name", TRANSFORMERS)
@pytest.mark.parametrize("every", [1, 2])
def test_activation_checkpointing_keeps_the_gradients(name, every):
    torch.manual_seed(0)
    plain = registry.generators.build(name).train()
    torch.manual_seed(0)
    checkpointed = registry.generators.build(name).train()
    blocks = sum(len(b) for b in distributed.transformer_blocks(checkpointed))
    assert distributed.checkpoint_blocks(checkpointed, every) == (blocks + every - 1) // every > 0
    assert checkpointed.state_dict().keys() == plain.state_dict().keys()  # names unchanged
    _loss(plain, 1).backward()
    _loss(checkpointed, 1).backward()
    worst = max(
        (p.grad - q.grad).abs().max().item()
        for p, q in zip(plain.parameters(), checkpointed.parameters(), strict=True)
        if p.grad is not None
    )
    assert worst == 0.0  # the same forward, run again in the backward: bitwise on CPU


def test_checkpointed_model_samples_and_copies():
    model = registry.generators.build("test-dit")
    distributed.checkpoint_blocks(model)
    copied = __import__("copy").deepcopy(model)  # the EMA's copy
    assert type(copied.backbone.blocks[0]) is type(model.backbone.blocks[0])
    with torch.no_grad():  # sampling: the plain forward
        assert copied.sample(torch.tensor([1, 2]), steps=2).shape == (2, 4, 8, 8)


# ------------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "data, message",
    [
        ({"strategy": "foo"}, r"training.strategy: expected one of 'ddp', 'fsdp', 'hsdp'"),
        ({"activation_checkpointing": "half"}, r"expected one of 'none', 'full', 'every_k'"),
        ({"cpu_offload": True}, r"training.cpu_offload: cpu_offload applies to training.strategy fsdp"),
        ({"strategy": "fsdp", "hsdp_shard_size": 2}, r"hsdp_shard_size applies to training.strategy hsdp"),
        ({"activation_checkpointing_every": 0}, r"training.activation_checkpointing_every"),
    ],
)
def test_bad_settings(data, message):
    with pytest.raises(ConfigError, match=message):
        parse(TrainingSettings, data, "training")


def test_one_process_runs_unsharded():
    model = torch.nn.Linear(3, 2)
    entry = distributed.wrap(model, distributed.DistInfo(), training=TrainingSettings(strategy="fsdp"))
    assert entry is model and not distributed.is_sharded(model)


def test_unknown_strategy_in_code():
    t = TrainingSettings()
    object.__setattr__(t, "strategy", "foo")  # past the settings' check
    with pytest.raises(InputError, match="unknown training.strategy 'foo'"):
        distributed.wrap(torch.nn.Linear(3, 2), distributed.DistInfo(), training=t)


def test_fsdp_without_a_usable_process_group_is_a_clear_error():
    info = distributed.DistInfo(world_size=2)  # no process group joined
    with pytest.raises(InputError, match="training.strategy fsdp is unavailable without a process group"):
        distributed.wrap(torch.nn.Linear(3, 2), info, training=TrainingSettings(strategy="fsdp"))


def test_cpu_offload_needs_cuda():
    store = torch.distributed.HashStore()
    torch.distributed.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        t = TrainingSettings(strategy="fsdp", cpu_offload=True)
        with pytest.raises(InputError, match="training.cpu_offload .* this run is on cpu"):
            distributed.wrap(torch.nn.Linear(3, 2), distributed.DistInfo(world_size=2), training=t)
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.parametrize("batch, world, accum", [(5, 2, 1), (12, 2, 4)])
def test_batch_not_divisible_by_the_processes(batch, world, accum):
    t = TrainingSettings(batch_size=batch, grad_accum=accum)
    info = distributed.DistInfo(rank=0, world_size=world)
    with pytest.raises(ConfigError, match=f"batch_size {batch} is not divisible by {world} process"):
        Batches(lambda indices: {}, 64, t, info)


def test_ema_that_does_not_match_the_model_shards_is_a_clear_error():
    """An EMA made before ``wrap`` shards its model holds whole tensors where the model holds shards:
    a shard of one row would broadcast into the whole EMA tensor without the check."""
    average = EMA(torch.nn.Linear(3, 2), 0.9)  # weight [2, 3]
    shard = torch.nn.Linear(3, 1)  # weight [1, 3]: the first process's shard of it
    with pytest.raises(InputError, match=r"EMA holds weight as \(2, 3\), the model as \(1, 3\).*after "):
        update_averages([average], shard, 1)


def test_recipe_without_sharding_refuses_fsdp():
    t = TrainingSettings(strategy="fsdp")
    with pytest.raises(
        InputError, match="training.strategy fsdp is unavailable in this recipe.*strategy=ddp"
    ):
        distributed.wrap(torch.nn.Linear(3, 2), distributed.DistInfo(), training=t, sharding=False)


# ------------------------------------------------------------------------------------------------
# A recipe: train-generator under DDP and under FSDP2 with activation checkpointing
# ------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_train_generator_fsdp_matches_ddp(tmp_path):
    from safetensors.torch import load_file

    overrides = [
        "training.steps=3",
        "training.batch_size=8",
        "training.checkpoint_every=3",
        "eval.every=0",
        "eval.stats_batches=1",
        "run.threads=1",
        "run.device=cpu",
    ]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    cmd = [*launcher, "-m", "latentforge_runner.cli", "run", "train-generator", "--config", "tiny-rae"]
    runs = {
        "ddp": [],
        "fsdp": ["training.strategy=fsdp", "training.activation_checkpointing=full"],
    }
    for name, extra in runs.items():
        out = f"run.output_dir={tmp_path / name}"
        proc = subprocess.run(
            [*cmd, *overrides, *extra, out], env=ENV, capture_output=True, text=True, timeout=300
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
    for weights in ("model", "ema"):
        ddp, fsdp = (
            load_file(tmp_path / n / "checkpoints/00000003" / f"{weights}.safetensors") for n in runs
        )
        assert ddp.keys() == fsdp.keys()
        assert max((ddp[k] - fsdp[k]).abs().max().item() for k in ddp) < TOL  # measured: 0 (bitwise)
