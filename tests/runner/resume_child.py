"""A tiny training run over the training kit, for the kill-and-resume tests.

usage: python resume_child.py RUN_DIR STEPS [--stall-in-checkpoint STEP]

With ``--stall-in-checkpoint`` the run stops inside the write of checkpoint STEP (after part of
its files exist), touches ``RUN_DIR/stalled`` and waits to be killed.
"""

import sys
import time
from pathlib import Path

import kit_loop
import torch

from latentforge_core.device import seed_everything
from latentforge_runner import training
from latentforge_runner.data import Digits
from latentforge_runner.training import TrainingSettings

run_dir, steps = Path(sys.argv[1]), int(sys.argv[2])
stall_at = int(sys.argv[4]) if len(sys.argv) > 4 and sys.argv[3] == "--stall-in-checkpoint" else None

if stall_at is not None:
    real_save_torch = training.save_torch

    def stalling_save_torch(obj, path):
        if obj["step"] == stall_at:
            Path(path).write_bytes(b"half a file")  # what a kill mid-write could leave behind
            (run_dir / "stalled").touch()
            time.sleep(600)
        return real_save_torch(obj, path)

    training.save_torch = stalling_save_torch

seed_everything(0)
data = Digits("train", image_size=8)
model = torch.nn.Sequential(
    torch.nn.Flatten(),
    torch.nn.Linear(192, 64),
    torch.nn.GELU(),
    torch.nn.Dropout(0.2),
    torch.nn.Linear(64, 10),
)
t = TrainingSettings(
    steps=steps,
    batch_size=32,
    lr=3e-3,
    schedule="cosine",
    warmup_steps=5,
    ema_decay=0.9,
    checkpoint_every=10,
    keep_checkpoints=3,
    log_every=5,
    grad_clip=1.0,
)
state, entry = kit_loop.build(model, t, data.batch, len(data), run_dir, name="digits-mlp")
state.resume()


def loss_fn(m, batch):
    noise = 0.05 * torch.randn_like(batch["image"])  # global RNG: exercises its restoration
    return torch.nn.functional.cross_entropy(m(batch["image"] + noise), batch["label"])


def on_step(state):
    print(f"step {state.step}", flush=True)
    time.sleep(0.02)


kit_loop.fit(state, entry, loss_fn, on_step=on_step)
final = {f"model.{k}": v for k, v in state.model.state_dict().items()}
final.update({f"ema.{k}": v for k, v in state.ema.module.state_dict().items()})
torch.save(final, run_dir / "final.pt")
print("done", flush=True)
