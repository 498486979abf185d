"""The smallest recipe loop over the training kit: what the kit's tests (resume, DDP, data) drive.

A recipe writes this loop itself (see ``recipes/train_generator.py``); the tests share this one.
"""

from __future__ import annotations

import contextlib
import os
import runpy
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from unittest import mock

import pytest
import torch

from latentforge_core.device import autocast
from latentforge_runner import distributed
from latentforge_runner.training import TrainingSettings, TrainState, micro_batches


def build(
    model, t: TrainingSettings, data, num_items: int, run_dir, *, dist=None, name=None, method="forward"
):
    """A run's state (not resumed yet) and the module its step calls."""
    dist = dist or distributed.DistInfo()
    model.to(dist.device)
    state = TrainState(
        model,
        t,
        data=data,
        num_items=num_items,
        dist=dist,
        run_dir=run_dir,
        config={"name": name} if name else {},
    )
    return state, distributed.wrap(model, dist, method=method, compile=t.compile)


def fit(
    state: TrainState, entry, loss_fn: Callable, on_step: Callable | None = None, logger=None
) -> dict[str, float]:
    """Train until ``steps`` on ``loss_fn(entry, micro_batch)``; ``on_step(state)`` after each step;
    with a ``logger`` (a RunLogger), the step's scalars go to it through the state's step log."""
    t, dist = state.t, state.dist
    progress = state.step_log(logger, "kit") if logger is not None else None
    state.model.train()
    last = {}
    for batch in state.steps():
        logs = {"loss": 0.0}
        for part, sync in micro_batches(batch, t.grad_accum, entry, dist):
            with sync:
                with autocast(dist.device, t.dtype):
                    loss = loss_fn(entry, part)
                logs["loss"] += state.optim.backward(loss, t.grad_accum, state.step)
        logs |= state.update()
        state.step += 1
        last = logs
        if progress is not None:
            progress.update(state.step, logs, state.optim.lr)
        if on_step is not None:
            on_step(state)
        if t.checkpoint_due(state.step):
            state.save()
    return last


def flow_items(items: int) -> Callable[[list[int]], dict[str, torch.Tensor]]:
    """A tiny flow-matching data set for ``test-dit`` (latents 4×8×8, 10 classes) with its noise and
    times fixed per item: the same numbers whichever process draws an item."""
    g = torch.Generator().manual_seed(1)
    table = {
        "x": torch.randn(items, 4, 8, 8, generator=g),
        "y": torch.randint(0, 10, (items,), generator=g),
        "noise": torch.randn(items, 4, 8, 8, generator=g),
        "t": torch.rand(items, generator=g),
    }
    return lambda indices: {k: v[indices] for k, v in table.items()}


def flow_loss(entry, batch) -> torch.Tensor:
    return entry(batch["x"], batch["y"], noise=batch["noise"], t=batch["t"])


def cross_entropy(model, batch) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(model(batch["image"]), batch["label"])


def run_child(child: Path, args: list[str], out: Path, nproc: int | None = None) -> dict:
    """``child`` (a script writing its result to ``out``) with ``args``, under torchrun with ``nproc``
    processes (one thread each), or in this process when None; returns what it saved."""
    argv = [str(child), *args]
    if nproc is None:
        threads = torch.get_num_threads()
        with mock.patch.object(sys, "argv", argv):
            runpy.run_path(str(child), run_name="__main__")
        torch.set_num_threads(threads)
    else:
        launcher = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={nproc}",
        ]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        proc = subprocess.run([*launcher, *argv], env=env, capture_output=True, text=True, timeout=300)
        # gloo's threads can abort the interpreter at its exit ("terminate called without an active
        # exception", about 1 launch in 20 here), after every process reported its work done: only
        # that form is tolerated.
        exit_abort = "terminate called without an active exception" in proc.stderr
        all_done = proc.stdout.count(FINISHED) == nproc
        assert proc.returncode == 0 or (exit_abort and all_done), proc.stderr[-3000:]
    return torch.load(out, weights_only=True)


FINISHED = "child finished"  # the last line of each child process, printed by finished()


def finished() -> None:
    """A child's last act, after its process groups are gone: what :func:`run_child` counts."""
    print(FINISHED, flush=True)


class Stopped(Exception):
    """What :func:`stopped_after_checkpoint` raises: the run ended right after a checkpoint."""


@contextlib.contextmanager
def stopped_after_checkpoint(monkeypatch, step: int) -> Iterator[None]:
    """The run inside stops right after writing checkpoint ``step`` (a kill that loses the steps
    after it); the test fails unless it did."""
    save = TrainState.save

    def save_then_stop(state):
        path = save(state)
        if state.step == step:
            raise Stopped
        return path

    monkeypatch.setattr(TrainState, "save", save_then_stop)
    with pytest.raises(Stopped):
        yield
    monkeypatch.setattr(TrainState, "save", save)
