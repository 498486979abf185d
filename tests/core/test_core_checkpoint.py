import argparse
import os
import subprocess
import sys

import pytest
import torch

from latentforge_core.checkpoint import (
    CheckpointError,
    atomic_path,
    load_checkpoint,
    load_into,
    load_state_file,
    load_torch_file,
    save_checkpoint,
    save_torch,
)


def tiny():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.GELU(), torch.nn.Linear(8, 2))


def test_round_trip_keeps_weights_and_config(tmp_path):
    model = tiny()
    path = save_checkpoint(model.state_dict(), tmp_path / "m.safetensors", {"depth": 2, "name": "tiny"})
    state, config = load_checkpoint(path)
    assert config == {"depth": 2, "name": "tiny"}
    other = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.GELU(), torch.nn.Linear(8, 2))
    load_into(other, state)
    x = torch.randn(3, 4)
    torch.testing.assert_close(other(x), model(x), rtol=0, atol=0)


def test_truncated_file_is_reported(tmp_path):
    path = save_checkpoint(tiny().state_dict(), tmp_path / "m.safetensors")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 17])
    with pytest.raises(CheckpointError, match="truncated or corrupted"):
        load_checkpoint(path)
    path.write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_checkpoint(path)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "nope.safetensors")


def test_wrong_model_lists_keys_and_shapes():
    model = tiny()
    bigger = torch.nn.Sequential(
        torch.nn.Linear(4, 16), torch.nn.GELU(), torch.nn.Linear(16, 2), torch.nn.Linear(2, 2)
    )
    with pytest.raises(CheckpointError) as err:
        load_into(model, bigger.state_dict())
    msg = str(err.value)
    assert "0.weight: checkpoint (16, 4) vs model (8, 4)" in msg
    assert "2.weight: checkpoint (2, 16) vs model (2, 8)" in msg
    assert "2 unexpected key(s): 3.bias, 3.weight" in msg
    state = model.state_dict()
    del state["2.bias"]
    with pytest.raises(CheckpointError, match=r"1 missing key\(s\): 2\.bias"):
        load_into(model, state)


def test_torch_files_load_weights_only(tmp_path):
    good = tmp_path / "good.pth"
    torch.save({"w": torch.ones(2)}, good)
    assert load_state_file(good)["w"].sum() == 2

    bad = tmp_path / "bad.pt"
    torch.save({"obj": argparse.Namespace(x=1)}, bad)  # arbitrary objects need full unpickling
    with pytest.raises(CheckpointError, match="weights_only=True"):
        load_torch_file(bad)
    with pytest.raises(CheckpointError, match="unknown checkpoint suffix"):
        (tmp_path / "x.h5").write_bytes(b"")
        load_state_file(tmp_path / "x.h5")


def test_atomic_write_leaves_old_file_when_interrupted(tmp_path):
    path = tmp_path / "state.pt"
    save_torch({"step": 1}, path)
    with pytest.raises(RuntimeError), atomic_path(path) as tmp:
        tmp.write_bytes(b"half a checkpoint")
        raise RuntimeError("killed mid-write")
    assert load_torch_file(path) == {"step": 1}
    assert sorted(os.listdir(tmp_path)) == ["state.pt"]


def test_sigkill_during_write_never_leaves_a_half_file(tmp_path):
    """A process killed while writing leaves the previous checkpoint intact."""
    path = tmp_path / "m.safetensors"
    save_checkpoint({"w": torch.zeros(4)}, path, {"version": 1})
    code = f"""
import os, signal, torch
from latentforge_core import checkpoint
real_replace = os.replace
def die(*a, **k):
    os.kill(os.getpid(), signal.SIGKILL)
os.replace = die
checkpoint.save_checkpoint({{"w": torch.ones(1 << 20)}}, {str(path)!r}, {{"version": 2}})
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True)
    assert proc.returncode == -9
    state, config = load_checkpoint(path)
    assert config == {"version": 1} and state["w"].shape == (4,)
