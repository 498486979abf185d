"""Exact resume: a run killed with SIGKILL (mid-step or mid-checkpoint) and resumed ends bitwise equal."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import kit_loop
import pytest
import torch

from latentforge_core.checkpoint import load_checkpoint, load_torch_file
from latentforge_runner.training import list_checkpoints

CHILD = Path(__file__).with_name("resume_child.py")
STEPS = 45


def _run(run_dir, *extra, wait=True):
    cmd = [sys.executable, str(CHILD), str(run_dir), str(STEPS), *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    if wait:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
    return proc


def _kill_when(proc, ready):
    deadline = time.monotonic() + 300
    while not ready():
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline, "the child never reached the kill point"
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL


def _assert_whole(run_dir):
    """Every visible checkpoint loads in full; only hidden .partial folders may be unfinished."""
    found = list_checkpoints(run_dir / "checkpoints")
    for ckpt in found:
        load_checkpoint(ckpt / "model.safetensors")
        load_checkpoint(ckpt / "ema.safetensors")
        assert set(load_torch_file(ckpt / "state.pt")) >= {"step", "optimizer", "scheduler", "rng", "data"}
    return found


def _inprocess(run_dir, steps, stop_at=None):
    """The child's run inside this process, optionally stopped after ``stop_at`` steps."""
    from latentforge_core.device import seed_everything
    from latentforge_runner.data import Digits
    from latentforge_runner.training import TrainingSettings

    seed_everything(0)
    data = Digits("train", image_size=8)
    model = torch.nn.Sequential(
        torch.nn.Flatten(), torch.nn.Linear(192, 32), torch.nn.Dropout(0.2), torch.nn.Linear(32, 10)
    )
    t = TrainingSettings(
        steps=steps,
        batch_size=16,
        grad_accum=2,
        lr=3e-3,
        schedule="linear",
        warmup_steps=3,
        ema_decay=0.8,
        checkpoint_every=5,
        log_every=5,
    )
    state, entry = kit_loop.build(model, t, data.batch, len(data), run_dir, name="mlp")
    state.resume()

    class Stop(Exception):
        pass

    def on_step(state):
        if state.step == stop_at:
            state.save()
            raise Stop

    try:
        kit_loop.fit(state, entry, kit_loop.cross_entropy, on_step=on_step)
    except Stop:
        return None
    return state


def test_resume_in_process_is_bitwise(tmp_path):
    """The quick version: stop after 7 steps (checkpoint at 7), resume in a new run, finish 12."""
    full = _inprocess(tmp_path / "a", 12)
    assert _inprocess(tmp_path / "b", 12, stop_at=7) is None
    torch.manual_seed(123)  # clobber every RNG: the resumed run must restore them itself
    resumed = _inprocess(tmp_path / "b", 12)
    assert resumed.step == full.step == 12
    for (k, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    for a, b in zip(full.ema.module.parameters(), resumed.ema.module.parameters(), strict=True):
        assert torch.equal(a, b)
    assert resumed.optim.scheduler.get_last_lr() == full.optim.scheduler.get_last_lr()
    assert resumed.batches.sampler.state_dict() == full.batches.sampler.state_dict()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    _run(run_dir)
    return torch.load(run_dir / "final.pt", weights_only=True)


def _assert_bitwise(run_dir, reference):
    final = torch.load(run_dir / "final.pt", weights_only=True)
    assert final.keys() == reference.keys()
    for k in final:
        assert torch.equal(final[k], reference[k]), k


@pytest.mark.slow
def test_killed_mid_step_and_mid_checkpoint_resumes_bitwise(tmp_path, reference):
    # 1. SIGKILL between steps 25 and 26: checkpoints 10 and 20 are whole, nothing else is visible.
    proc = _run(tmp_path, wait=False)
    _kill_when(proc, lambda: proc.stdout.readline().startswith("step 25"))
    assert [p.name for p in _assert_whole(tmp_path)] == ["00000010", "00000020"]
    assert not (tmp_path / "final.pt").exists()
    # 2. Resume from 20, then SIGKILL inside the write of checkpoint 30 (its state.pt half written).
    proc = _run(tmp_path, "--stall-in-checkpoint", "30", wait=False)
    _kill_when(proc, (tmp_path / "stalled").exists)
    partial = list((tmp_path / "checkpoints").glob(".*.partial"))
    assert [p.name for p in partial] == [".00000030.partial"]  # the write really was cut short
    assert (partial[0] / "state.pt").read_bytes() == b"half a file"
    assert [p.name for p in _assert_whole(tmp_path)] == ["00000010", "00000020"]  # 30 is not visible
    # 3. Resume from 20 again (the partial folder is removed) and finish.
    _run(tmp_path)
    assert not list((tmp_path / "checkpoints").glob(".*.partial"))
    assert [p.name for p in _assert_whole(tmp_path)] == ["00000030", "00000040", "00000045"]
    _assert_bitwise(tmp_path, reference)


def test_resume_refuses_checkpoint_of_another_model(tmp_path):
    from latentforge_core.checkpoint import CheckpointError
    from latentforge_runner.training import TrainingSettings

    _inprocess(tmp_path, 6)
    other = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(192, 16), torch.nn.Linear(16, 10))
    t = TrainingSettings(steps=STEPS, batch_size=32)
    state, _ = kit_loop.build(other, t, None, 1437, tmp_path, name="mlp")
    with pytest.raises(CheckpointError, match="shape mismatch.*1.weight"):
        state.resume()
    renamed, _ = kit_loop.build(other, t, None, 1437, tmp_path, name="other-net")
    with pytest.raises(CheckpointError, match="checkpoint of 'mlp'.*trains 'other-net'"):
        renamed.resume()
