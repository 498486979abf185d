"""A tiny flow-matching DiT run under FSDP2 with a chosen checkpoint format, for the sharded
checkpoint tests; launched plainly (one process, unsharded) or under torchrun.

usage: [torchrun --nproc-per-node N] dcp_child.py OUT.pt RUN_DIR FORMAT STEPS [--stall-in-write STEP]

FORMAT: full or sharded (training.checkpoint_format).  The run resumes from RUN_DIR's newest
checkpoint (checkpoints every 3 steps and at the end) and prints ``step N`` after each step (main
process); each process writes its pid to ``RUN_DIR/pid.<rank>`` so a test can SIGKILL them all.
With ``--stall-in-write`` the main process, inside the DCP write of checkpoint STEP (its shard file
written, the folder's ``.metadata`` not yet), touches ``RUN_DIR/stalled`` and waits to be killed.
OUT.pt gets, from the main process, the whole model and EMA weights and the optimiser state.
"""

import gc
import os
import sys
import time
from pathlib import Path

import kit_loop
import torch
from torch.distributed.checkpoint.filesystem import FileSystemWriter

from latentforge_core import registry
from latentforge_core.device import seed_everything
from latentforge_runner import distributed
from latentforge_runner.training import TrainingSettings, TrainState

out, run_dir, checkpoint_format, steps = sys.argv[1], Path(sys.argv[2]), sys.argv[3], int(sys.argv[4])
stall_at = int(sys.argv[6]) if len(sys.argv) > 6 and sys.argv[5] == "--stall-in-write" else None
torch.set_num_threads(1)
dist = distributed.init("cpu")
run_dir.mkdir(parents=True, exist_ok=True)
(run_dir / f"pid.{dist.rank}").write_text(str(os.getpid()))

if stall_at is not None and dist.is_main:
    real_write_data = FileSystemWriter.write_data

    def stalling_write_data(self, plan, planner):
        written = real_write_data(self, plan, planner)
        if f".{stall_at:08d}.partial" in str(self.path):
            written.wait()  # this process's shards are on disk; the .metadata comes after them
            (run_dir / "stalled").touch()
            time.sleep(600)
        return written

    FileSystemWriter.write_data = stalling_write_data

seed_everything(0)
model = registry.generators.build("test-dit", class_dropout_prob=0.0)  # latents 4×8×8, 10 classes

items = 64
fetch = kit_loop.flow_items(items)


def on_step(state):
    if dist.is_main:
        print(f"step {state.step}", flush=True)
    time.sleep(0.05)  # room for a test to kill the run between two steps


t = TrainingSettings(
    steps=steps,
    batch_size=8,
    lr=3e-3,
    warmup_steps=2,
    ema_decay=0.8,
    grad_clip=1.0,
    checkpoint_every=3,
    keep_checkpoints=5,
    strategy="fsdp",
    checkpoint_format=checkpoint_format,
)
model.to(dist.device)
entry = distributed.wrap(model, dist, method="loss", training=t)
state = TrainState(
    model, t, data=fetch, num_items=items, dist=dist, run_dir=run_dir, config={"name": "test-dit"}
)
state.resume()
kit_loop.fit(state, entry, kit_loop.flow_loss, on_step=on_step)
weights = distributed.full_state_dict(state.model)  # every process gathers, the main one keeps it
ema_weights = distributed.full_state_dict(state.ema.module)  # sharded as the model is
optimizer = state.optim.state_dict()
if dist.is_main:
    torch.save(
        {
            "model": {k: v.detach().cpu().clone() for k, v in weights.items()},
            "ema": {k: v.detach().cpu().clone() for k, v in ema_weights.items()},
            "ema_sharded": distributed.is_sharded(state.ema.module),
            "optimizer": optimizer["optimizer"],
            "sharded": distributed.is_sharded(state.model),
        },
        out,
    )
# Nothing may hold a process group when the interpreter exits (gloo can abort there).
del state, entry, model
gc.collect()
distributed.cleanup()
kit_loop.finished()
