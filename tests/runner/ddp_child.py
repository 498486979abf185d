"""A tiny run on the digits through the training kit; launched plainly or under torchrun.

usage: [torchrun --nproc-per-node N] ddp_child.py OUT.pt GLOBAL_BATCH GRAD_ACCUM
"""

import sys

import kit_loop
import torch

from latentforge_core.device import seed_everything
from latentforge_runner import distributed
from latentforge_runner.data import Digits
from latentforge_runner.training import TrainingSettings

out, batch_size, grad_accum = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
torch.set_num_threads(1)
dist = distributed.init("cpu")
seed_everything(0)
data = Digits("train", image_size=8)
model = torch.nn.Sequential(
    torch.nn.Flatten(), torch.nn.Linear(192, 64), torch.nn.GELU(), torch.nn.Linear(64, 10)
)
t = TrainingSettings(
    steps=8,
    batch_size=batch_size,
    grad_accum=grad_accum,
    lr=1e-2,
    ema_decay=0.5,
    grad_clip=1.0,
    checkpoint_every=100,
)
state, entry = kit_loop.build(model, t, data.batch, len(data), out + ".run", dist=dist)
kit_loop.fit(state, entry, kit_loop.cross_entropy)
if dist.is_main:
    torch.save({k: v.clone() for k, v in state.model.state_dict().items()}, out)
del state, entry  # DDP's reducer goes while the process group it uses still exists
distributed.cleanup()
kit_loop.finished()
