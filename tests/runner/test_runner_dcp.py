"""Sharded checkpoints (training.checkpoint_format: sharded, a DCP folder per checkpoint): FSDP2 runs
under torchrun on CPU resume exactly on the same number of processes and to fp32 rounding on
another, either format resumes under the other, a kill during the DCP write leaves no visible
checkpoint, and the export gives the files of a full checkpoint bit for bit."""

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import kit_loop
import pytest
import torch
from torch.distributed.checkpoint import FileSystemReader

from latentforge_core.checkpoint import CheckpointError, load_checkpoint
from latentforge_runner import cli, distributed
from latentforge_runner.config import Component, ConfigError, parse
from latentforge_runner.generation import load_generator
from latentforge_runner.training import (
    SHARDED,
    TrainingSettings,
    TrainState,
    consolidate,
    is_sharded_checkpoint,
    list_checkpoints,
    load_weights,
)

CHILD = Path(__file__).with_name("dcp_child.py")
# Another number of processes reduces the gradients in another order (a reduce-scatter against one
# mean over the whole batch): fp32 rounding only.  Measured after 3 + 3 steps of AdamW, largest weight
# difference: 2→1 4.4e-7 against one process and 8.2e-8 against two; 1→2 4.4e-7 against two (two
# uninterrupted processes against one: 4.4e-7 too); AdamW moments 3e-9.
TOL = 1e-6


def _run(run_dir: Path, fmt="sharded", steps=6, nproc=None) -> dict:
    """``dcp_child.py`` in ``nproc`` processes under torchrun, or in this process when None."""
    out = run_dir.with_suffix(f".{steps}.pt")
    return kit_loop.run_child(CHILD, [str(out), str(run_dir), fmt, str(steps)], out, nproc)


def _max_diff(a: dict, b: dict) -> float:
    """The largest difference of the model and EMA weights and the optimiser state of two runs."""
    weights = [(a[p][k] - b[p][k]).abs().max().item() for p in ("model", "ema") for k in a[p]]
    opt_a, opt_b = a["optimizer"]["state"], b["optimizer"]["state"]
    assert set(opt_a) == set(opt_b)
    moments = [(opt_a[i][k] - opt_b[i][k]).abs().max().item() for i in opt_a for k in opt_a[i]]
    return max(weights + moments)


@pytest.fixture(scope="module")
def one(tmp_path_factory) -> tuple[dict, Path]:
    """One process (unsharded), sharded checkpoints at steps 3 and 6: the run and its folder."""
    run_dir = tmp_path_factory.mktemp("one") / "run"
    return _run(run_dir), run_dir


# ------------------------------------------------------------------------------------------------
# Resuming: another number of processes, another format
# ------------------------------------------------------------------------------------------------
def test_two_process_sharded_checkpoint_resumes_in_one_process(tmp_path, one):
    half = _run(tmp_path / "run", steps=3, nproc=2)
    assert half["sharded"]
    folder = tmp_path / "run" / "checkpoints" / "00000003"
    files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    assert files == [f"{SHARDED}/.metadata", f"{SHARDED}/__0_0.distcp", f"{SHARDED}/__1_0.distcp", "state.pt"]
    saved = FileSystemReader(folder / SHARDED).read_metadata().state_dict_metadata
    pieces = {k: len(m.chunks) for k, m in saved.items() if k.startswith(("model/", "ema/"))}
    ema = {k.partition("/")[2]: n for k, n in pieces.items() if k.startswith("ema/")}
    assert ema == {k.partition("/")[2]: n for k, n in pieces.items() if k.startswith("model/")}
    assert 2 in ema.values()  # the EMA's parameters written in the model's two shards each
    resumed = _run(tmp_path / "run")  # one process reads both processes' shards
    assert not resumed["sharded"]
    assert _max_diff(resumed, one[0]) < TOL  # another reduction order: not bitwise, but close


@pytest.mark.parametrize("first, then", [("sharded", "full"), ("full", "sharded")])
def test_either_format_resumes_under_the_other(tmp_path, one, first, then):
    _run(tmp_path / "run", first, steps=3)
    resumed = _run(tmp_path / "run", then)
    assert _max_diff(resumed, one[0]) == 0.0
    written = [is_sharded_checkpoint(p) for p in list_checkpoints(tmp_path / "run" / "checkpoints")]
    assert written == [first == "sharded", then == "sharded"]


@pytest.fixture(scope="module")
def two(tmp_path_factory) -> dict:
    """Two processes under FSDP2, uninterrupted."""
    return _run(tmp_path_factory.mktemp("two") / "run", nproc=2)


@pytest.mark.slow
def test_two_process_sharded_resume_is_bitwise(tmp_path, two):
    _run(tmp_path / "run", steps=3, nproc=2)
    resumed = _run(tmp_path / "run", nproc=2)
    assert resumed["ema_sharded"]  # the EMA's shards written and read back as the model's
    assert _max_diff(resumed, two) == 0.0  # the same shards back in place: bitwise


@pytest.mark.slow
def test_one_process_sharded_checkpoint_resumes_on_two(tmp_path, two):
    _run(tmp_path / "run", steps=3)
    resumed = _run(tmp_path / "run", nproc=2)  # each process reads its shard of the whole tensors
    assert resumed["sharded"] and resumed["ema_sharded"]
    assert _max_diff(resumed, two) < TOL


# ------------------------------------------------------------------------------------------------
# SIGKILL of a torchrun run mid-step and mid-DCP-write
# ------------------------------------------------------------------------------------------------
def _launch(run_dir: Path, *extra: str) -> subprocess.Popen:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    out = run_dir.with_suffix(".6.pt")
    cmd = [*launcher, str(CHILD), str(out), str(run_dir), "sharded", "6", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True
    )


def _kill_when(proc: subprocess.Popen, run_dir: Path, ready) -> None:
    """SIGKILL the launcher's session and both workers (by the pids they wrote) once ``ready()``."""
    deadline = time.monotonic() + 300
    while not ready():
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.monotonic() < deadline, "the child never reached the kill point"
        time.sleep(0.01)
    pids = [int((run_dir / f"pid.{rank}").read_text()) for rank in (0, 1)]
    os.killpg(proc.pid, signal.SIGKILL)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):  # gone with the launcher
            os.kill(pid, signal.SIGKILL)
    proc.wait()


def _visible(run_dir: Path) -> list[str]:
    return [p.name for p in list_checkpoints(run_dir / "checkpoints")]


@pytest.mark.slow
def test_killed_mid_step_and_mid_dcp_write_resumes(tmp_path, two):
    run_dir = tmp_path / "run"
    # 1. SIGKILL between steps 4 and 5: checkpoint 3 is whole, nothing else is visible.
    proc = _launch(run_dir)
    _kill_when(proc, run_dir, lambda: proc.stdout.readline().startswith("step 4"))
    assert _visible(run_dir) == ["00000003"]
    # 2. Resume from 3, SIGKILL inside the DCP write of checkpoint 6 (rank 0's shards on disk).
    proc = _launch(run_dir, "--stall-in-write", "6")
    _kill_when(proc, run_dir, (run_dir / "stalled").exists)
    partial = run_dir / "checkpoints" / ".00000006.partial"
    assert (partial / SHARDED / "__0_0.distcp").is_file()  # the write really was under way
    assert not (partial / SHARDED / ".metadata").exists() and not (partial / "state.pt").exists()
    assert _visible(run_dir) == ["00000003"]  # 6 is not visible
    # 3. Resume from 3 on two processes and, from a copy, on one: the partial folder is removed.
    shutil.copytree(run_dir, tmp_path / "copy")
    on_two = _run(run_dir, nproc=2)
    on_one = _run(tmp_path / "copy")
    for folder in (run_dir, tmp_path / "copy"):
        assert not list((folder / "checkpoints").glob(".*.partial"))
        assert _visible(folder) == ["00000003", "00000006"]
    assert _max_diff(on_two, two) == 0.0
    assert _max_diff(on_one, two) < TOL


# ------------------------------------------------------------------------------------------------
# Export: the files of a full checkpoint
# ------------------------------------------------------------------------------------------------
def test_export_equals_the_full_checkpoint(tmp_path, one, capsys):
    _run(tmp_path / "full", "full")  # the same run, full checkpoints
    full, sharded = (folder / "checkpoints" / "00000006" for folder in (tmp_path / "full", one[1]))
    assert not list(sharded.glob("*.safetensors"))
    out = consolidate(sharded, tmp_path / "export")
    assert sorted(p.name for p in out.iterdir()) == ["ema.safetensors", "model.safetensors"]
    for name in ("model", "ema"):
        (want, want_config), (got, got_config) = (
            load_checkpoint(f / f"{name}.safetensors") for f in (full, out)
        )
        assert got_config == want_config == {"name": "test-dit", "step": 6}
        assert got.keys() == want.keys()
        assert all(torch.equal(got[k], want[k]) for k in want)
        direct, _ = load_weights(sharded, name)  # what sample reads, without an export
        assert all(torch.equal(direct[k], want[k]) for k in want)
    # sample's reader: a run folder's newest checkpoint, sharded, read directly.
    train = SimpleNamespace(training=TrainingSettings(ema_decay=0.8), generator=Component(name="test-dit"))
    generator = load_generator(one[1], train, None, "ema", {})
    want, _ = load_checkpoint(full / "ema.safetensors")
    assert all(torch.equal(v, want[k]) for k, v in generator.state_dict().items())
    # The command: a run folder's newest checkpoint, to one file (the EMA by default).
    assert cli.main(["export", str(one[1]), "--out", str(tmp_path / "ema.safetensors")]) == 0
    got, config = load_checkpoint(tmp_path / "ema.safetensors")
    want, _ = load_checkpoint(full / "ema.safetensors")
    assert config["step"] == 6 and all(torch.equal(got[k], want[k]) for k in want)
    assert "ema.safetensors" in capsys.readouterr().out


def test_export_into_the_checkpoint_folder(tmp_path, one):
    run_dir = tmp_path / "run"
    shutil.copytree(one[1], run_dir)
    assert cli.main(["export", str(run_dir / "checkpoints" / "00000003")]) == 0
    folder = run_dir / "checkpoints" / "00000003"
    assert sorted(p.name for p in folder.glob("*.safetensors")) == ["ema.safetensors", "model.safetensors"]
    assert load_checkpoint(folder / "model.safetensors")[1] == {"name": "test-dit", "step": 3}


# ------------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------------
def _state(run_dir: Path, name="test-dit", model="test-dit") -> TrainState:
    """The child's run (one process), not resumed yet; ``name`` is the run's, ``model`` what it builds."""
    from latentforge_core import registry

    model = registry.generators.build(model)
    t = TrainingSettings(steps=6, batch_size=8, ema_decay=0.8, checkpoint_format="sharded")
    state, _ = kit_loop.build(model, t, lambda indices: {}, 64, run_dir, name=name)
    return state


def test_resume_refuses_a_dcp_checkpoint_of_another_model(tmp_path, one, monkeypatch):
    def no_tensor_read(*args, **kwargs):
        raise AssertionError("tensors were read before the checkpoint was checked")

    monkeypatch.setattr(distributed, "load_sharded", no_tensor_read)
    with pytest.raises(
        CheckpointError, match="a DCP checkpoint of 'test-dit', but this run trains 'other-dit'"
    ):
        _state(one[1], name="other-dit").resume()
    with pytest.raises(CheckpointError, match=f"{SHARDED}: the checkpoint does not fit this model test-dit"):
        _state(one[1], model="test-lightningdit").resume()  # the same name, other weights


@pytest.mark.parametrize("damage", ["truncate_metadata", "remove_metadata", "truncate_shard"])
def test_unreadable_sharded_checkpoint_falls_back(tmp_path, one, damage, caplog):
    run_dir = tmp_path / "run"
    shutil.copytree(one[1], run_dir)
    dcp_folder = run_dir / "checkpoints" / "00000006" / SHARDED
    path = dcp_folder / (".metadata" if "metadata" in damage else "__0_0.distcp")
    if damage.startswith("truncate"):
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:
        path.unlink()
    state = _state(run_dir)
    assert state.resume()
    assert state.step == 3  # the checkpoint before it
    assert _visible(run_dir) == ["00000003"]
    assert (run_dir / "checkpoints" / ".00000006.unreadable").is_dir()
    assert "is unreadable" in caplog.text and SHARDED in caplog.text


def test_export_bad_inputs(tmp_path, one):
    with pytest.raises(CheckpointError, match="holds no ema_0.99 weights .*it holds: model, ema"):
        load_weights(one[1] / "checkpoints" / "00000006", "ema_0.99")
    assert cli.main(["export", str(tmp_path)]) == 2  # an empty folder: neither a run nor a checkpoint
    with pytest.raises(ConfigError, match="training.checkpoint_format: expected one of 'full', 'sharded'"):
        parse(TrainingSettings, {"checkpoint_format": "dcp"}, "training")
