"""Two processes under torchrun; only rank 1 receives SIGTERM, after step 3: both must stop there.

usage: torchrun --nproc-per-node 2 interrupt_child.py RUN_DIR
Each rank prints ``rank R: EXIT_CODE STEP``.
"""

import signal
import sys

import kit_loop
import torch

from latentforge_core.device import seed_everything
from latentforge_core.errors import RunInterrupted
from latentforge_runner import distributed
from latentforge_runner.data import Digits
from latentforge_runner.training import TrainingSettings

torch.set_num_threads(1)
dist = distributed.init("cpu")
seed_everything(0)
data = Digits("train", image_size=8)
model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(192, 16), torch.nn.Linear(16, 10))
t = TrainingSettings(steps=10, batch_size=16, ema_decay=None, checkpoint_every=100)
state, entry = kit_loop.build(model, t, data.batch, len(data), sys.argv[1], dist=dist)


def on_step(state):
    if state.step == 3 and dist.rank == 1:
        signal.raise_signal(signal.SIGTERM)


try:
    kit_loop.fit(state, entry, kit_loop.cross_entropy, on_step=on_step)
    print(f"rank {dist.rank}: 0 {state.step}", flush=True)
except RunInterrupted as err:
    print(f"rank {dist.rank}: {err.exit_code} {state.step}", flush=True)
distributed.cleanup()
