"""Resume a user can trust: run.resume auto/never/force decided before config.yaml is touched, a
corrupt newest checkpoint falling back to the one before, the same metrics.jsonl after a resume,
SIGINT/SIGTERM stopping with a checkpoint and a one-line message, and progress lines off a terminal."""

import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import kit_loop
import pytest
import torch

from latentforge_core.checkpoint import CheckpointError, load_checkpoint
from latentforge_core.errors import RunInterrupted
from latentforge_runner import cli
from latentforge_runner.config import ConfigError
from latentforge_runner.run_folder import RunLogger, RunSettings
from latentforge_runner.training import (
    ProgressLines,
    TrainingSettings,
    list_checkpoints,
    progress_bar,
)


# ------------------------------------------------------------------------------------------------
# The kit in process: a small MLP on the digits
# ------------------------------------------------------------------------------------------------
def _kit(run_dir, steps=12, stop_at=None, save_at=(), on_step=None, logger=None, **t):
    """A kit run (resumed when ``run_dir`` holds a checkpoint); stops with ``Stop`` after step
    ``stop_at``, saving first at the steps in ``save_at``."""
    from latentforge_core.device import seed_everything
    from latentforge_runner.data import Digits

    seed_everything(0)
    data = Digits("train", image_size=8)
    model = torch.nn.Sequential(
        torch.nn.Flatten(), torch.nn.Linear(192, 32), torch.nn.Dropout(0.2), torch.nn.Linear(32, 10)
    )
    settings = dict(steps=steps, batch_size=16, lr=3e-3, ema_decay=0.8, checkpoint_every=4, log_every=5)
    state, entry = kit_loop.build(
        model, TrainingSettings(**{**settings, **t}), data.batch, len(data), run_dir, name="mlp"
    )
    state.resume()

    def step(state):
        if state.step in save_at:
            state.save()
        if on_step is not None:
            on_step(state)
        if state.step == stop_at:
            raise Stop

    try:
        kit_loop.fit(state, entry, kit_loop.cross_entropy, on_step=step, logger=logger)
    except Stop:
        return None
    return state


class Stop(Exception):
    pass


def _weights(state):
    return {**state.model.state_dict(), **{f"ema.{k}": v for k, v in state.ema.module.state_dict().items()}}


def _assert_equal(a, b):
    a, b = _weights(a), _weights(b)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ------------------------------------------------------------------------------------------------
# 2. A corrupt newest checkpoint falls back to the previous whole one
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("broken", ["model.safetensors", "state.pt"])
def test_corrupt_newest_checkpoint_falls_back_to_the_previous(tmp_path, caplog, broken):
    full = _kit(tmp_path / "full")
    assert _kit(tmp_path / "cut", stop_at=10) is None
    ckpts = tmp_path / "cut" / "checkpoints"
    assert [p.name for p in list_checkpoints(ckpts)] == ["00000004", "00000008"]
    path = ckpts / "00000008" / broken
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])  # truncated on disk
    with caplog.at_level(logging.WARNING, logger="latentforge"):
        resumed = _kit(tmp_path / "cut")
    warning = next(r.getMessage() for r in caplog.records if "unreadable" in r.getMessage())
    assert "00000008" in warning and broken in warning and "00000004" in warning
    assert (ckpts / ".00000008.unreadable" / broken).is_file()  # kept for a look, out of the way
    assert [p.name for p in list_checkpoints(ckpts)] == ["00000008", "00000012"]  # 8 written anew
    _assert_equal(resumed, full)


def test_no_readable_checkpoint_is_an_error_that_keeps_them(tmp_path):
    _kit(tmp_path, stop_at=5)
    (tmp_path / "checkpoints" / "00000004" / "state.pt").write_bytes(b"not a torch file")
    with pytest.raises(CheckpointError, match="none of the 1 checkpoint.*00000004: state.pt does not load"):
        _kit(tmp_path)
    assert [p.name for p in list_checkpoints(tmp_path / "checkpoints")] == ["00000004"]


def test_resume_past_the_configured_steps_is_an_error(tmp_path):
    _kit(tmp_path, steps=8)
    with pytest.raises(ConfigError, match="training.steps is 6, but the checkpoint .*00000008 is at step 8"):
        _kit(tmp_path, steps=6)


# ------------------------------------------------------------------------------------------------
# 3. metrics.jsonl after a resume is the uninterrupted run's (images/s aside: a timing)
# ------------------------------------------------------------------------------------------------
def _rows(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.endswith("images_per_s")} for r in rows]


def _logged_kit(run_dir, **kw):
    logger = RunLogger(run_dir)
    try:
        return _kit(run_dir, logger=logger, checkpoint_every=100, **kw)
    finally:
        logger.close()


def test_metrics_after_a_resume_mid_window_equal_the_uninterrupted_run(tmp_path):
    _logged_kit(tmp_path / "full")
    # Checkpoint at 7 (mid-window: log_every 5), then on to step 11 (the row of step 10 is written
    # after the checkpoint) and killed: the resumed run drops that row and writes it again.
    assert _logged_kit(tmp_path / "cut", save_at=(7,), stop_at=11) is None
    assert [r["step"] for r in _rows(tmp_path / "cut")] == [5, 10]
    _logged_kit(tmp_path / "cut")
    assert [r["step"] for r in _rows(tmp_path / "full")] == [5, 10, 12]
    assert _rows(tmp_path / "cut") == _rows(tmp_path / "full")


# ------------------------------------------------------------------------------------------------
# 4. SIGINT/SIGTERM: the step finishes, a checkpoint is written, RunInterrupted names it
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143), (signal.SIGUSR1, 75)])
def test_signal_stops_after_the_step_with_a_checkpoint(tmp_path, sig, code):
    before = signal.getsignal(sig)
    full = _kit(tmp_path / "full")

    def send(state):
        if state.step == 6:
            signal.raise_signal(sig)

    with pytest.raises(RunInterrupted) as info:
        _kit(tmp_path / "cut", on_step=send)
    assert info.value.exit_code == code
    message = str(info.value)
    assert "\n" not in message and f"{sig.name} received: stopped after step 6 of 12" in message
    assert str(tmp_path / "cut" / "checkpoints" / "00000006") in message and "same command again" in message
    assert signal.getsignal(sig) is before  # the handlers from before are back
    assert [p.name for p in list_checkpoints(tmp_path / "cut" / "checkpoints")] == ["00000004", "00000006"]
    _assert_equal(_kit(tmp_path / "cut"), full)


def test_a_spent_time_budget_stops_with_a_checkpoint_and_the_requeue_code(tmp_path, monkeypatch):
    """training.max_minutes: before a step that would end past the budget (twice the longest step kept
    in hand), checkpoint and exit 75; the rerun (here without a budget) ends as an uninterrupted run."""
    import latentforge_runner.training as training

    full = _kit(tmp_path / "full")
    clock = {"now": 0.0}
    monkeypatch.setattr(training.time, "monotonic", lambda: clock["now"])

    def tick(state):  # each step takes 10 s of the 60 s budget
        clock["now"] += 10.0

    with pytest.raises(RunInterrupted) as info:
        _kit(tmp_path / "cut", on_step=tick, max_minutes=1.0)
    assert info.value.exit_code == 75
    # 10 s steps (+ the timing of each yield): after step 4, 40 s + 2 × 10 s reaches the 60 s budget
    assert "training.max_minutes (1) would run out during the next step: stopped after step 4" in str(
        info.value
    )
    assert [p.name for p in list_checkpoints(tmp_path / "cut" / "checkpoints")] == ["00000004"]
    monkeypatch.undo()
    _assert_equal(_kit(tmp_path / "cut"), full)


def test_signal_on_a_checkpoint_step_writes_no_second_checkpoint(tmp_path):
    def send(state):
        if state.step == 8:
            signal.raise_signal(signal.SIGINT)

    with pytest.raises(RunInterrupted, match="00000008"):
        _kit(tmp_path, on_step=send)
    assert [p.name for p in list_checkpoints(tmp_path / "checkpoints")] == ["00000004", "00000008"]


def test_under_torchrun_a_signal_to_one_rank_stops_every_rank_at_the_same_step(tmp_path):
    child = [str(Path(__file__).with_name("interrupt_child.py")), str(tmp_path)]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([*launcher, *child], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # The ranks print at the same moment: their lines may interleave on the shared stdout.
    assert sorted(re.findall(r"rank \d: \d+ \d+", proc.stdout)) == ["rank 0: 143 3", "rank 1: 143 3"]
    assert [p.name for p in list_checkpoints(tmp_path / "checkpoints")] == ["00000003"]


# ------------------------------------------------------------------------------------------------
# 1. run.resume: auto, never, force — decided before config.yaml is rewritten
# ------------------------------------------------------------------------------------------------
QUICK = [
    "training.steps=2",
    "training.batch_size=8",
    "training.checkpoint_every=2",
    "training.log_every=1",
    "eval.every=0",
    "eval.num_samples=4",
    "eval.stats_batches=1",
    "eval.sampler.steps=2",
]


def _train(run_dir, *extra):
    recipe, cfg = cli.load_settings(
        "train-generator", "tiny-rae", [*QUICK, f"run.output_dir={run_dir}", *extra]
    )
    cli.run_recipe(recipe, cfg)


def test_resume_modes(tmp_path, caplog):
    _train(tmp_path)
    saved = (tmp_path / "config.yaml").read_text()
    weights = load_checkpoint(tmp_path / "checkpoints" / "00000002" / "model.safetensors")[0]

    def untouched():
        assert (tmp_path / "config.yaml").read_text() == saved
        assert [p.name for p in list_checkpoints(tmp_path / "checkpoints")] == ["00000002"]
        now = load_checkpoint(tmp_path / "checkpoints" / "00000002" / "model.safetensors")[0]
        assert all(torch.equal(now[k], weights[k]) for k in weights)

    # auto: a key that changes what is computed → an error listing old → new; nothing written.
    with pytest.raises(ConfigError) as info:
        _train(tmp_path, "training.lr=5e-4", "generator.params.transport.shift=2.0")
    message = str(info.value)
    assert (
        "training.lr: 0.001 → 0.0005" in message
        and "generator.params.transport.shift: (absent) → 2.0" in message
    )
    assert "run.resume=force" in message and "another run.output_dir" in message
    assert "log_every" not in message
    untouched()
    # never: a folder holding checkpoints is refused, whatever the config.
    with pytest.raises(ConfigError, match="run.resume is never, but .* already holds checkpoints"):
        _train(tmp_path, "run.resume=never")
    untouched()
    # Fewer steps than the checkpoint's: an error in every mode (it used to exit 0).
    for mode in ("auto", "force"):
        with pytest.raises(ConfigError, match="training.steps is 1, but .* checkpoint at step 2"):
            _train(tmp_path, "training.steps=1", f"run.resume={mode}")
        untouched()
    # auto: run-only keys (and more steps under a constant schedule) resume.
    _train(
        tmp_path, "training.steps=3", "training.log_every=5", "training.checkpoint_every=7", "run.threads=1"
    )
    assert [p.name for p in list_checkpoints(tmp_path / "checkpoints")] == ["00000002", "00000003"]
    # force: resumes though the LR changed, and says so.
    with caplog.at_level(logging.WARNING, logger="latentforge"):
        _train(tmp_path, "training.steps=4", "training.lr=5e-4", "run.resume=force")
    assert any(
        "run.resume=force" in r.getMessage() and "training.lr" in r.getMessage() for r in caplog.records
    )
    assert [p.name for p in list_checkpoints(tmp_path / "checkpoints")] == ["00000003", "00000004"]


def test_resume_reads_old_yaml_booleans_and_refuses_other_values():
    assert RunSettings.from_dict({"resume": True}).resume == "auto"
    assert RunSettings.from_dict({"resume": False}).resume == "never"
    assert RunSettings.from_dict({"resume": "force"}).resume == "force"
    with pytest.raises(ConfigError, match="run.resume"):
        RunSettings.from_dict({"resume": "sometimes"}, where="run")


def test_steps_of_a_decaying_schedule_are_compared(tmp_path):
    _train(tmp_path, "training.schedule=cosine")
    with pytest.raises(ConfigError, match="training.steps: 2 → 3"):
        _train(tmp_path, "training.schedule=cosine", "training.steps=3")


# ------------------------------------------------------------------------------------------------
# 5. Progress off a terminal: plain lines
# ------------------------------------------------------------------------------------------------
def test_progress_off_a_terminal_is_plain_lines(tmp_path, caplog):
    assert not sys.stderr.isatty()  # as under pytest's capture, a log file or a batch job
    with caplog.at_level(logging.INFO, logger="latentforge"):
        bar = progress_bar(range(20), desc="sample", unit="batch")
        assert isinstance(bar, ProgressLines)
        assert sum(1 for _ in bar) == 20
        _logged_kit(tmp_path)
    lines = [r.getMessage() for r in caplog.records]
    sample = [m for m in lines if m.startswith("sample: ")]
    assert len(sample) == 10 and sample[0].startswith("sample: 2/20 batch (10%)") and "ETA" in sample[0]
    assert sample[-1].startswith("sample: 20/20 batch (100%)")
    steps = [m for m in lines if m.startswith("kit: step")]
    assert [m.split(",")[0] for m in steps] == ["kit: step 5/12", "kit: step 10/12", "kit: step 12/12"]
    assert all("loss" in m and "lr" in m and "images/s" in m for m in steps) and "ETA" in steps[0]


# ------------------------------------------------------------------------------------------------
# 4 end to end: `latentforge run train-generator`, SIGINT then SIGTERM, then the rest
# ------------------------------------------------------------------------------------------------
CLI_RUN = [
    "run",
    "train-generator",
    "--config",
    "tiny-rae",
    "training.steps=40",
    "training.batch_size=8",
    "training.log_every=4",
    "training.checkpoint_every=10",
    "eval.every=0",
    "eval.num_samples=4",
    "eval.stats_batches=1",
    "eval.sampler.steps=2",
    "run.threads=1",
]


def _cli(run_dir, stop=None):
    """The CLI in a child process; with ``stop=(signal, step)`` the signal is sent once the child has
    logged that step (it stops a step or so later, at the end of the step under way)."""
    cmd = [sys.executable, "-m", "latentforge_runner.cli", *CLI_RUN, f"run.output_dir={run_dir}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)
    err = []
    deadline = time.monotonic() + 300
    for line in proc.stderr:
        err.append(line)
        if stop is not None and line.startswith(f"generator: step {stop[1]}/"):
            proc.send_signal(stop[0])
            break
        assert time.monotonic() < deadline
    err.append(proc.stderr.read())
    proc.wait(timeout=300)
    return proc.returncode, "".join(err)


@pytest.mark.slow
def test_cli_interrupted_by_sigint_then_sigterm_resumes_bitwise(tmp_path):
    code, err = _cli(tmp_path / "full")
    assert code == 0, err
    runs = tmp_path / "cut"
    stopped = []
    for sig, step, exit_code in [(signal.SIGINT, 8, 130), (signal.SIGTERM, 20, 143)]:
        code, err = _cli(runs, stop=(sig, step))
        assert code == exit_code, err
        assert "Traceback" not in err
        last = err.strip().splitlines()[-1]
        assert f"{sig.name} received: stopped after step" in last and "same command again" in last, err
        folder = last.split("wrote the checkpoint ")[1].split(";")[0]
        stopped.append(int(folder.rsplit("/", 1)[1]))
        assert (runs / "checkpoints" / folder.rsplit("/", 1)[1]).is_dir()
    assert stopped[0] >= 8 and stopped[1] >= 20
    code, err = _cli(runs)
    assert code == 0, err
    for name in ("model", "ema"):
        a = load_checkpoint(tmp_path / "full" / "checkpoints" / "00000040" / f"{name}.safetensors")[0]
        b = load_checkpoint(runs / "checkpoints" / "00000040" / f"{name}.safetensors")[0]
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert _rows(runs) == _rows(tmp_path / "full")
