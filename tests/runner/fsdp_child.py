"""A tiny flow-matching DiT run through the training kit under a chosen strategy; launched plainly
or under torchrun.

usage: [torchrun --nproc-per-node N] fsdp_child.py OUT.pt RUN_DIR STRATEGY BATCH ACCUM CKPT STEPS
           [HSDP_SHARD_SIZE]

STRATEGY: ddp, fsdp or hsdp; CKPT: activation checkpointing (none, full, every_k).  The run resumes
from RUN_DIR's newest checkpoint (checkpoints every 3 steps and at the end), so running it with
fewer STEPS first and then again continues an interrupted run.  Every EMA kind is tracked (ema_decay,
ema_decays, a power-function profile snapshotted every 3 steps).  OUT.pt gets, from the main process,
the whole model and EMA weights, the optimiser state at the end, the EMA gathered for evaluation, the
newest snapshot, and how many EMA parameters the main process holds (its shards) of the whole.
"""

import gc
import os
import sys

import kit_loop
import torch

from latentforge_core import registry
from latentforge_core.checkpoint import load_checkpoint
from latentforge_core.device import seed_everything
from latentforge_runner import distributed, ema
from latentforge_runner.training import TrainingSettings, TrainState

out, run_dir, strategy = sys.argv[1], sys.argv[2], sys.argv[3]
batch, accum, ckpt, steps = int(sys.argv[4]), int(sys.argv[5]), sys.argv[6], int(sys.argv[7])
shard_size = int(sys.argv[8]) if len(sys.argv) > 8 else None
torch.set_num_threads(1)
dist = distributed.init("cpu")
seed_everything(0)
model = registry.generators.build("test-dit", class_dropout_prob=0.0)  # latents 4×8×8, 10 classes

items = 64
fetch = kit_loop.flow_items(items)


t = TrainingSettings(
    steps=steps,
    batch_size=batch,
    grad_accum=accum,
    lr=3e-3,
    warmup_steps=2,
    ema_decay=0.8,
    ema_decays=(0.9,),
    ema_profiles=(0.1,),
    ema_snapshot_every=3,
    grad_clip=1.0,
    checkpoint_every=3,
    keep_checkpoints=5,
    strategy=strategy,
    hsdp_shard_size=shard_size,
    activation_checkpointing=ckpt,
    activation_checkpointing_every=2,
    precision=os.environ.get("FSDP_CHILD_PRECISION", "auto"),  # fp16: the scaler's test
)
model.to(dist.device)
entry = distributed.wrap(model, dist, method="loss", training=t)
state = TrainState(
    model, t, data=fetch, num_items=items, dist=dist, run_dir=run_dir, config={"name": "test-dit"}
)
state.resume()
kit_loop.fit(state, entry, kit_loop.flow_loss)
# Every process gathers (the main one keeps them): the model, each EMA, and the evaluated EMA.
averages = {"ema": state.ema.module} | {name: average.module for name, average in state.emas.items()}
weights = {name: distributed.full_state_dict(m) for name, m in {"model": state.model, **averages}.items()}
evaluated = state.eval_model().state_dict()
optimizer = state.optim.state_dict()
ema_params = list(state.ema.module.parameters())
if dist.is_main:
    torch.save(
        {
            **{name: {k: v.detach().cpu().clone() for k, v in sd.items()} for name, sd in weights.items()},
            "evaluated": {k: v.detach().cpu().clone() for k, v in evaluated.items()},
            "snapshot": load_checkpoint(ema.list_snapshots(state.snapshots)[-1][1])[0],  # the newest
            "optimizer": optimizer["optimizer"],
            "sharded": distributed.is_sharded(state.model),
            "ema_sharded": distributed.is_sharded(state.ema.module),
            "ema_held": sum(distributed.local_tensor(p).numel() for p in ema_params),
            "ema_numel": sum(p.numel() for p in ema_params),
        },
        out,
    )
# Nothing may hold a process group when the interpreter exits (gloo can abort there): the model's
# FSDP state and the DDP reducer go while the groups still exist.
del state, entry, model, averages, ema_params
gc.collect()
distributed.cleanup()
kit_loop.finished()
