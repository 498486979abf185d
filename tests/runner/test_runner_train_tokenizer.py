"""train-tokenizer: each tiny shipped config really learns on the digits (online PSNR/SSIM/rFID), writes
a complete run folder and a tokenizer that reloads through the registry, and resumes bitwise."""

import json
import os
import subprocess
import sys
from unittest import mock

import pytest
import torch

from latentforge_core import registry
from latentforge_core.checkpoint import load_checkpoint, load_torch_file
from latentforge_metrics.reconstruction import psnr
from latentforge_runner import cli
from latentforge_runner.config import ConfigError
from latentforge_runner.data import Digits
from latentforge_runner.training import TrainState, list_checkpoints

# config → (registry name, builder argument of the exported weights, image size, PSNR rise asserted).
# Measured rises over 40 steps (seed 0): VA-VAE 7.7 → 20.1 dB, RAE 7.5 → 19.3 dB, VQGAN 7.8 → 14.3 dB.
TINY = {
    "tiny-train-vavae": ("test-vavae-tiny", "pretrained", 32, 8.0),
    "tiny-train-rae": ("test-rae-tiny", "pretrained_decoder", 32, 8.0),
    "tiny-train-vqgan": ("test-vqgan-tiny", "pretrained", 16, 4.0),
}


def _run(config, run_dir, *overrides):
    code = cli.main(["run", "train-tokenizer", f"run.output_dir={run_dir}", *overrides, "--config", config])
    assert code == 0
    return json.loads((run_dir / "eval.json").read_text())


@pytest.mark.parametrize("config", list(TINY))
def test_tiny_tokenizer_learns_on_digits(tmp_path, config):
    name, weights_arg, size, margin = TINY[config]
    report = _run(config, tmp_path)
    first, final = report["history"][0], report["final"]
    assert [h["step"] for h in report["history"]] == [0, 20, 40] and final["step"] == 40
    assert final["psnr"] > first["psnr"] + margin, report["history"]
    assert final["ssim"] > first["ssim"] + 0.2, report["history"]
    assert final["fd-dinov2"] < first["fd-dinov2"] / 4, report["history"]  # the metric under its own name
    # The run folder: config, whole checkpoints with the discriminator, scalars, grids, the tokenizer.
    assert (tmp_path / "config.yaml").is_file()
    for ckpt in list_checkpoints(tmp_path / "checkpoints"):
        load_checkpoint(ckpt / "model.safetensors")
        load_checkpoint(ckpt / "discriminator.safetensors")
        assert {"disc_optimizer", "disc_scheduler"} <= set(load_torch_file(ckpt / "state.pt"))
    assert [p.name for p in list_checkpoints(tmp_path / "checkpoints")] == ["00000020", "00000040"]
    assert sorted(p.name for p in (tmp_path / "eval").iterdir()) == [f"grid_{s:08d}.png" for s in (0, 20, 40)]
    assert list((tmp_path / "tensorboard").iterdir())
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    trained = [r for r in rows if any(k.endswith("/d_loss") for k in r)]
    assert trained and any(any(k.endswith("/g_loss") for k in r) for r in rows)  # both GAN sides ran
    # The exported tokenizer reloads through its registry builder and scores what the eval reported.
    tok = registry.tokenizers.build(name, **{weights_arg: str(tmp_path / "tokenizer.safetensors")})
    images = Digits("test", size).images[:120]
    kwargs = {"sample": False} if name == "test-vavae-tiny" else {}
    with torch.no_grad():
        recon = tok.decode(tok.encode(images, **kwargs)).clamp(0, 1)
    to8 = lambda x: (x * 255).round().to(torch.uint8)  # noqa: E731
    assert psnr(to8(recon), to8(images)).mean().item() == pytest.approx(final["psnr"], abs=1e-4)


@pytest.mark.slow  # 48 Inception passes at 299 px
@pytest.mark.filterwarnings("ignore:the covariance of 8 samples")  # 8 images: a biased but exact FD
def test_inception_rfid_equals_the_metric_on_the_exported_tokenizer(tmp_path):
    """The registered Inception rFID (random weights in its layout): the held-out statistics frozen at
    the first evaluation serve the later ones, and the final number is RFID's on the exported weights."""
    from latentforge_metrics.generative import RFID
    from latentforge_metrics.inception import FIDInceptionV3

    weights = tmp_path / "inception-random.pth"
    torch.manual_seed(0)
    torch.save(FIDInceptionV3().state_dict(), weights)
    rfid = ["eval.rfid.name=rfid", f"eval.rfid.params={{weights: {weights}}}"]
    quick = ["training.steps=2", "training.checkpoint_every=2", "eval.every=1", "eval.num_images=8"]
    report = _run("tiny-train-vqgan", tmp_path / "run", *quick, *rfid)
    assert [h["step"] for h in report["history"]] == [0, 1, 2]
    tok = registry.tokenizers.build(
        "test-vqgan-tiny", pretrained=str(tmp_path / "run" / "tokenizer.safetensors")
    )
    images = Digits("test", 16).images[:8]
    with torch.no_grad():
        recon = (tok.decode(tok.encode(images)).clamp(0, 1) * 255).round() / 255
    direct = RFID(weights=weights)
    direct.update(recon, (images * 255).round() / 255)
    assert report["final"]["rfid"] == pytest.approx(direct.compute(), rel=1e-4)


def _checkpoint_tensors(folder):
    out = {}
    for f in ("model", "ema", "discriminator"):
        for k, v in load_checkpoint(folder / f"{f}.safetensors")[0].items():
            out[f"{f}.{k}"] = v
    state = load_torch_file(folder / "state.pt")
    for group in ("optimizer", "disc_optimizer"):
        for i, s in state[group]["state"].items():
            out.update({f"{group}.{i}.{k}": v for k, v in s.items() if isinstance(v, torch.Tensor)})
    return out


def test_train_tokenizer_resumes_bitwise(tmp_path):
    """RAE (noise, EMA, cosine schedule, DINO discriminator with DiffAug and its own schedule), stopped
    at step 10 and resumed, ends equal to the uninterrupted run: weights, both optimisers, eval numbers."""
    quick = ["data.limit=96", "training.steps=20", "training.checkpoint_every=10", "eval.every=10"]
    full = _run("tiny-train-rae", tmp_path / "full", *quick)

    class Stop(Exception):
        pass

    def save_then_stop(state):
        path = save_checkpoint(state)
        if state.step == 10:
            raise Stop
        return path

    save_checkpoint = TrainState.save
    with mock.patch.object(TrainState, "save", save_then_stop), pytest.raises(Stop):
        _run("tiny-train-rae", tmp_path / "cut", *quick)
    assert [p.name for p in list_checkpoints(tmp_path / "cut" / "checkpoints")] == ["00000010"]
    torch.manual_seed(1234)  # clobber the RNG: the resumed run restores its own
    resumed = _run("tiny-train-rae", tmp_path / "cut", *quick)
    assert resumed["history"] == full["history"]
    a = _checkpoint_tensors(tmp_path / "full" / "checkpoints" / "00000020")
    b = _checkpoint_tensors(tmp_path / "cut" / "checkpoints" / "00000020")
    assert a.keys() == b.keys() and any(k.startswith("disc_optimizer.") for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_lpips_term_runs_when_weighted(tmp_path):
    """The tiny configs leave LPIPS off for speed; with a weight the recipe builds and uses it."""
    quick = ["training.steps=2", "training.log_every=1", "eval.every=0", "eval.rfid=null"]
    _run("tiny-train-vqgan", tmp_path, *quick, "loss.params.perceptual_weight=1.0")
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all(r["vqgan/lpips"] > 0 for r in rows if "vqgan/lpips" in r) and len(rows) >= 2


def test_bad_loss_settings_name_the_key(tmp_path):
    cases = [
        (["loss.params.disc_strat=3"], r"loss.params.disc_strat: RAELoss takes no parameter"),
        (
            ["loss.name=vqgan", "loss.params={}"],
            r"'vqgan' trains a VQGAN, but tokenizer 'test-rae-tiny' is a RAE",
        ),
        (["data.image_size=64"], r"data.image_size 64 differs from the RAE decoder's output size 32"),
    ]
    for overrides, match in cases:
        with pytest.raises((ConfigError, ValueError), match=match):
            recipe, cfg = cli.load_settings(
                None, "tiny-train-rae", [f"run.output_dir={tmp_path}", *overrides]
            )
            cli.run_recipe(recipe, cfg)


@pytest.mark.slow
def test_two_gloo_processes_train_generator_and_discriminator_as_one(tmp_path):
    """torchrun with 2 × 8 images per step gives the weights of one process with 16: the decoder and the
    DINO discriminator are both DDP-wrapped. The GAN term is off (its adaptive weight is per process, as
    in RAE) and Adam's eps is 1, so that directions with a vanishing gradient (a bias before a per-token
    norm, a key bias) do not turn rounding noise into full-size steps; lr 0.05 keeps the run tame."""
    same = [
        "data.limit=96",
        "training.steps=8",
        "training.checkpoint_every=4",
        "training.lr=0.05",
        "training.final_lr=0.005",
        "training.eps=1.0",
        "eval.every=0",
        "eval.rfid=null",
        "tokenizer.params.noise_tau=0.0",
        "loss.discriminator.augment=false",
        "loss.params.disc_update_start=0",
        "loss.params.disc_start=1000",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for nproc, out in ((1, "one"), (2, "two")):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
        cmd += ["-m", "latentforge_runner.cli", "run", "train-tokenizer", f"run.output_dir={tmp_path / out}"]
        cmd += [*same, "run.device=cpu", "--config", "tiny-train-rae"]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]

    def weights(out, step, f):
        return load_checkpoint(tmp_path / out / "checkpoints" / f"{step:08d}" / f"{f}.safetensors")[0]

    for f, key in (("model", "decoder."), ("discriminator", "weight_orig")):
        one, two, before = weights("one", 8, f), weights("two", 8, f), weights("one", 4, f)
        moved = max((v - before[k]).abs().max().item() for k, v in one.items() if key in k)
        assert moved > 5e-3, f  # both networks really trained between the two checkpoints
        for k, v in one.items():
            torch.testing.assert_close(two[k], v, rtol=0, atol=1e-5, msg=f"{f}.{k}")
