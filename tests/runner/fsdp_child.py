"""A tiny flow-matching DiT run through the training kit under a chosen strategy; launched plainly
or under torchrun.

usage: [torchrun --nproc-per-node N] fsdp_child.py OUT.pt RUN_DIR STRATEGY BATCH ACCUM CKPT STEPS
           [HSDP_SHARD_SIZE]

STRATEGY: ddp, fsdp or hsdp; CKPT: activation checkpointing (none, full, every_k).  The run resumes
from RUN_DIR's newest checkpoint (checkpoints every 3 steps and at the end), so running it with
fewer STEPS first and then again continues an interrupted run.  OUT.pt gets, from the main process,
the whole model and EMA weights and the optimiser state at the end.
"""

import gc
import os
import sys

import kit_loop
import torch

from latentforge_core import registry
from latentforge_core.device import seed_everything
from latentforge_runner import distributed
from latentforge_runner.training import TrainingSettings, TrainState

out, run_dir, strategy = sys.argv[1], sys.argv[2], sys.argv[3]
batch, accum, ckpt, steps = int(sys.argv[4]), int(sys.argv[5]), sys.argv[6], int(sys.argv[7])
shard_size = int(sys.argv[8]) if len(sys.argv) > 8 else None
torch.set_num_threads(1)
dist = distributed.init("cpu")
seed_everything(0)
model = registry.generators.build("test-dit", class_dropout_prob=0.0)  # latents 4×8×8, 10 classes

# Latents, labels, noise and times fixed per item: the same numbers whichever process draws an item.
items = 64
g = torch.Generator().manual_seed(1)
table = {
    "x": torch.randn(items, 4, 8, 8, generator=g),
    "y": torch.randint(0, 10, (items,), generator=g),
    "noise": torch.randn(items, 4, 8, 8, generator=g),
    "t": torch.rand(items, generator=g),
}


def fetch(indices):
    return {k: v[indices] for k, v in table.items()}


def flow_loss(entry, part):
    return entry(part["x"], part["y"], noise=part["noise"], t=part["t"])


t = TrainingSettings(
    steps=steps,
    batch_size=batch,
    grad_accum=accum,
    lr=3e-3,
    warmup_steps=2,
    ema_decay=0.8,
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
kit_loop.fit(state, entry, flow_loss)
weights = distributed.full_state_dict(state.model)  # every process gathers, the main one keeps it
optimizer = state.optim.state_dict()
if dist.is_main:
    torch.save(
        {
            "model": {k: v.detach().cpu().clone() for k, v in weights.items()},
            "ema": {k: v.detach().cpu().clone() for k, v in state.ema.module.state_dict().items()},
            "optimizer": optimizer["optimizer"],
            "sharded": distributed.is_sharded(state.model),
        },
        out,
    )
# Nothing may hold a process group when the interpreter exits (gloo can abort there): the model's
# FSDP state and the DDP reducer go while the groups still exist.
del state, entry, model
gc.collect()
distributed.cleanup()
