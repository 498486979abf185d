"""A latentforge training run as a torchx component (``torchx run -s <scheduler>``).

    torchx run -s slurm examples/launch/torchx.py:train --nnodes 2 --nproc_per_node 8 \\
        train-generator --config vavae-lightningdit-xl data.root=/data/imagenet/train

torchx's ``dist.ddp`` starts ``torchrun`` on every node with the rendezvous set; latentforge reads the
process group from torchrun's environment.  ``max_retries`` reruns the job after a failure or a
preemption, and the rerun resumes from the newest checkpoint (``run.resume=auto``).  torchrun forwards
SIGTERM to the workers, which checkpoint and exit 143; give ``training.max_minutes`` for a scheduler's
time limit.  Written against torchx's ``dist.ddp`` component; torchx is not installed where this was
written, so this file was not run.
"""

from torchx import specs
from torchx.components import dist


def train(*args: str, nnodes: int = 1, nproc_per_node: int = 8, max_retries: int = 3) -> specs.AppDef:
    """``latentforge run <args>`` on ``nnodes`` × ``nproc_per_node`` processes."""
    return dist.ddp(
        "run", *args, m="latentforge_runner.cli", j=f"{nnodes}x{nproc_per_node}", max_retries=max_retries
    )
