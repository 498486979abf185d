"""fp16 training: the gradient scaler's logic, its state in checkpoints, exact resume, and a tiny model
on the digits learning as it does in fp32 (fp16 autocast runs on this CPU, emulated and slow)."""

import json
from pathlib import Path

import kit_loop
import pytest
import torch
from safetensors.torch import load_file

from latentforge_runner import cli
from latentforge_runner.config import ConfigError, parse
from latentforge_runner.training import Optimization, TrainingSettings, list_checkpoints

FSDP_CHILD = Path(__file__).with_name("fsdp_child.py")
QUICK = ["training.batch_size=8", "training.log_every=1", "eval.every=0", "eval.num_samples=4"]


def _fp16(w: torch.Tensor, **settings) -> Optimization:
    return Optimization([w], TrainingSettings(precision="fp16", lr=0.1, **settings))


def test_backward_scales_the_gradient_and_step_unscales_it_before_clipping():
    w = torch.tensor([3.0, 4.0], requires_grad=True)
    optim = _fp16(w, grad_clip=1.0)
    scale = optim.scaler.get_scale()
    share = optim.backward((w * w).sum() / 2, parts=2, step=0)  # true gradient w / 2 = (1.5, 2)
    assert share == pytest.approx(6.25)
    torch.testing.assert_close(w.grad, torch.tensor([1.5, 2.0]) * scale)
    logs = optim.step()
    assert logs == {"loss_scale": scale, "grad_norm": pytest.approx(2.5)}  # the unscaled norm
    assert not torch.equal(w.detach(), torch.tensor([3.0, 4.0])) and w.grad is None


def test_an_overflowing_step_is_skipped_and_the_scale_halved():
    w = torch.tensor([1.0, 2.0], requires_grad=True)
    optim = _fp16(w)
    scale = optim.scaler.get_scale()
    optim.backward(w.sum() * 1e36, parts=1, step=0)  # finite loss, gradient 1e36 × 65536 = inf
    assert torch.isinf(w.grad).all()
    optim.step()
    torch.testing.assert_close(w.detach(), torch.tensor([1.0, 2.0]), rtol=0, atol=0)
    assert optim.scaler.get_scale() == scale / 2 and not optim.optimizer.state  # AdamW never stepped


def test_the_scale_is_saved_and_restored_and_absent_outside_fp16():
    w = torch.tensor([1.0], requires_grad=True)
    optim = _fp16(w)
    optim.backward(w.sum() * 1e36, parts=1, step=0)
    optim.step()  # scale halved
    state = optim.state_dict()
    assert state["scaler"]["scale"] == optim.scaler.get_scale()
    again = _fp16(torch.tensor([1.0], requires_grad=True))
    again.load_state_dict(state)
    assert again.scaler.get_scale() == optim.scaler.get_scale()
    fp32 = Optimization([torch.tensor([1.0], requires_grad=True)], TrainingSettings(precision="fp32"))
    assert fp32.scaler is None and "scaler" not in fp32.state_dict()
    fresh = _fp16(torch.tensor([1.0], requires_grad=True))
    fresh.load_state_dict(fp32.state_dict())  # an fp32 run continued in fp16 starts a new scale
    assert fresh.scaler.get_scale() == 65536.0


def test_an_unknown_precision_names_the_choices():
    with pytest.raises(ConfigError, match="fp16"):
        parse(TrainingSettings, {"precision": "fp8"})


def _weights(run) -> dict[str, torch.Tensor]:
    return load_file(list_checkpoints(run / "checkpoints")[-1] / "model.safetensors")


def test_fp16_run_resumes_bitwise(tmp_path):
    def run(folder, steps):
        args = [*QUICK, f"run.output_dir={folder}", f"training.steps={steps}", "training.checkpoint_every=2"]
        recipe, cfg = cli.load_settings(None, "tiny-rae", [*args, "training.precision=fp16"])
        cli.run_recipe(recipe, cfg)

    run(tmp_path / "whole", 3)
    run(tmp_path / "parts", 2)
    run(tmp_path / "parts", 3)
    whole, parts = _weights(tmp_path / "whole"), _weights(tmp_path / "parts")
    assert all(torch.equal(whole[k], parts[k]) for k in whole)
    logs = [json.loads(line) for line in (tmp_path / "parts" / "metrics.jsonl").read_text().splitlines()]
    assert [r["generator/loss_scale"] for r in logs] == [65536.0] * 3


@pytest.mark.slow
def test_fp16_learns_the_digits_as_fp32_does(tmp_path):
    """tiny-rae on the digits, 30 steps of 32 images: the loss falls from 1.85 to 1.30 in both; fp16's
    loss stays within 1% of fp32's at every logged step (measured 2e-4 apart)."""
    losses = {}
    for precision in ("fp32", "fp16"):
        folder = tmp_path / precision
        args = [f"run.output_dir={folder}", "training.steps=30", "training.batch_size=32"]
        args += ["training.log_every=10", "eval.every=0", f"training.precision={precision}"]
        recipe, cfg = cli.load_settings(None, "tiny-rae", args)
        cli.run_recipe(recipe, cfg)
        rows = (folder / "metrics.jsonl").read_text().splitlines()
        losses[precision] = [json.loads(line)["generator/loss"] for line in rows]
    assert losses["fp32"][-1] < 0.8 * losses["fp32"][0]  # it learns
    assert losses["fp16"] == pytest.approx(losses["fp32"], rel=0.01)


def test_fsdp_in_fp16_matches_one_process(tmp_path, monkeypatch):
    """Two gloo processes under FSDP2 with the scaler against one process with the whole batch: fp16
    matmuls of half the rows round differently, so the tolerance is fp16's, not fp32's."""
    monkeypatch.setenv("FSDP_CHILD_PRECISION", "fp16")
    results = {}
    for nproc in (None, 2):
        run_dir = tmp_path / f"run{nproc}"
        args = [str(run_dir.with_suffix(".pt")), str(run_dir), "fsdp", "8", "1", "none", "4"]
        results[nproc] = kit_loop.run_child(FSDP_CHILD, args, run_dir.with_suffix(".pt"), nproc)
    one, two = results[None], results[2]
    diff = max((one["model"][k] - two["model"][k]).abs().max().item() for k in one["model"])
    assert diff < 2e-3
