"""train-repa-e: the gradient map of REPA-E's step (the alignment reaches the VAE, the diffusion loss
does not; the frozen pass moves neither the generator nor the latent BatchNorm), exact resume, the
tuned VAE reloading as a tokenizer, learning on the digits, and the inputs it cannot use."""

import json

import numpy as np
import pytest
import torch

from latentforge_core import registry
from latentforge_core.checkpoint import load_checkpoint
from latentforge_runner import cli
from latentforge_runner.config import ConfigError
from latentforge_runner.data import Digits
from latentforge_runner.recipes.train_repa_e import TrainREPAERecipe

QUICK = ["training.log_every=1", "data.limit=64", "training.batch_size=8", "eval.stats_batches=2"]


def _settings(out, *extra):
    return cli.load_settings(None, "tiny-repa-e", [*QUICK, f"run.output_dir={out}", *extra])


def _params(module):
    return [p.detach().clone() for p in module.parameters()]


def _same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_one_step_follows_repa_es_gradient_map(tmp_path):
    _, cfg = _settings(tmp_path, "training.steps=1")
    job = TrainREPAERecipe(cfg)
    try:
        job.setup()
        batch = next(iter(job.state.batches))
        images, y = batch["image"], batch["label"]
        x, target = images * 2 - 1, job.encoder.features(images, output="map")
        vae0, gen0, proj0 = _params(job.vae), _params(job.generator), _params(job.repa.projector)
        norm0 = (job.norm.running_mean.clone(), job.norm.running_var.clone())
        disc = job.loss.discriminator
        fixed = [name for name, p in job.generator.named_parameters() if not p.requires_grad]
        logs, z, draws = job._vae_step(x, y, target)
        assert all(p.grad is None for p in disc.parameters())  # the GAN term's gradient is the VAE's
        assert fixed == [n for n, p in job.generator.named_parameters() if not p.requires_grad]  # pos_embed
        assert not _same(vae0, _params(job.vae))  # the VAE moved (its losses and the alignment)
        assert _same(gen0, _params(job.generator)) and _same(proj0, _params(job.repa.projector))
        assert torch.equal(job.norm.running_mean, norm0[0]) and torch.equal(job.norm.running_var, norm0[1])
        vae1 = _params(job.vae)
        terms = job.model(job.norm.train()(z.detach()), y, target, return_terms=True, **draws)
        terms["loss"].backward()
        assert all(
            p.grad is None or not p.grad.abs().sum() for p in job.vae.parameters()
        )  # no diffusion grad
        job.state.update()
        assert _same(vae1, _params(job.vae)) and not _same(gen0, _params(job.generator))
        assert not torch.equal(job.norm.running_mean, norm0[0])  # train-mode BatchNorm: stats move
        assert -1 <= logs["vae_alignment"] <= 1 and "vae_rec" in logs
    finally:
        job.cleanup()


def test_the_vae_loss_is_repa_es(tmp_path):
    """mean |x − x̂| + 1e-6 · ΣKL / B + 0.1 · (−mean D(x̂)) (losses.py, l1_lpips_kl_gan.yaml), not LDM's
    sum over pixels; LPIPS off at this size."""
    _, cfg = _settings(tmp_path, "training.steps=1")
    job = TrainREPAERecipe(cfg)
    try:
        job.setup()
        x = torch.rand(4, 3, 32, 32) * 2 - 1
        out = job.vae(x)
        loss, _ = job.loss.generator_loss(x, out, job.vae, step=0)
        kl = out["posterior"].kl().sum() / 4
        gan = -job.loss.discriminator(out["recon"]).mean()
        expected = (x - out["recon"]).abs().mean() + 1e-6 * kl + 0.1 * gan
        assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    finally:
        job.cleanup()


def test_the_alignment_term_is_what_reaches_the_vae(tmp_path):
    """With vae_align_weight 0 the VAE's step is its own losses' alone; 1.5 changes it."""

    def vae_after_one_step(weight):
        out = tmp_path / f"w{weight}"
        cli.run_recipe(
            *_settings(out, "training.steps=1", "training.checkpoint_every=1", f"vae_align_weight={weight}")
        )
        return load_checkpoint(out / "checkpoints" / "00000001" / "tokenizer.safetensors")[0]

    a, b, c = vae_after_one_step(0), vae_after_one_step(1.5), vae_after_one_step(0)
    assert all(torch.equal(a[k], c[k]) for k in a)  # deterministic
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_resume_is_exact_and_the_tuned_vae_reloads_as_a_tokenizer(tmp_path):
    cli.run_recipe(*_settings(tmp_path / "straight", "training.steps=4", "training.checkpoint_every=4"))
    cli.run_recipe(*_settings(tmp_path / "resumed", "training.steps=2", "training.checkpoint_every=2"))
    cli.run_recipe(*_settings(tmp_path / "resumed", "training.steps=4", "training.checkpoint_every=2"))
    names = ("model", "ema", "projector", "latent_norm", "tokenizer", "discriminator")
    for name in names:
        a = load_checkpoint(tmp_path / "straight" / "checkpoints" / "00000004" / f"{name}.safetensors")[0]
        b = load_checkpoint(tmp_path / "resumed" / "checkpoints" / "00000004" / f"{name}.safetensors")[0]
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    run = tmp_path / "straight"
    tuned = registry.tokenizers.build("test-vavae-tiny", pretrained=run / "tokenizer.safetensors")
    norm = load_checkpoint(run / "checkpoints" / "00000004" / "latent_norm.safetensors")[0]
    weights = load_checkpoint(run / "checkpoints" / "00000004" / "tokenizer.safetensors")[0]
    assert all(torch.equal(v, weights[k]) for k, v in tuned.state_dict().items())
    # Its latent statistics are the BatchNorm's: normalising equals the BatchNorm in eval mode.
    z = torch.randn(3, tuned.z_channels, 8, 8)
    bn = torch.nn.BatchNorm2d(tuned.z_channels, eps=1e-4, affine=False).eval()
    bn.running_mean.copy_(norm["running_mean"]), bn.running_var.copy_(norm["running_var"])
    torch.testing.assert_close(tuned.stats.normalize(z), bn(z), rtol=0, atol=1e-6)
    report = json.loads((run / "eval.json").read_text())
    assert report["step"] == 4 and report["psnr_start"] > 0 and report["psnr_end"] > 0
    resumed = json.loads((tmp_path / "resumed" / "eval.json").read_text())
    assert resumed == report  # the start is the VAE as built, not the one resumed at step 2
    # Any recipe samples with the tuned VAE and the generator's EMA.
    argv = [
        "generator.name=test-sit",
        f"generator.params.pretrained={run / 'generator.safetensors'}",
        "tokenizer.name=test-vavae-tiny",
        f"tokenizer.params.pretrained={run / 'tokenizer.safetensors'}",
        "num_classes=10",
        "num_samples=10",
        "write_png=false",
        f"run.output_dir={tmp_path / 'samples'}",
    ]
    cli.run_recipe(*cli.load_settings("sample", None, argv))
    with np.load(tmp_path / "samples" / "samples.npz") as f:
        assert f["arr_0"].shape == (10, 32, 32, 3)


def test_what_repa_e_cannot_use_is_named(tmp_path):
    with pytest.raises(ConfigError, match="not a trainable VAE: expected a VA-VAE"):
        cli.run_recipe(*_settings(tmp_path / "a", "tokenizer.name=test-rae-tiny", "training.steps=1"))
    with pytest.raises(ConfigError, match="tunes the VAE on images: data.name latents"):
        cli.run_recipe(*_settings(tmp_path / "b", "data.name=latents", f"data.root={tmp_path}"))
    with pytest.raises(ConfigError, match="training.grad_accum: REPA-E's three updates"):
        cli.run_recipe(*_settings(tmp_path / "c", "training.grad_accum=2"))


@pytest.mark.slow
def test_repa_e_keeps_the_vae_and_improves_the_generator_on_digits(tmp_path):
    """A VA-VAE pretrained on the digits, then tuned end to end: its held-out PSNR stays within 1 dB of
    where it started while the generator's samples come closer to the digits (a Fréchet distance in the
    tiny ViT's pooled features, against the held-out digits)."""
    vae_run = tmp_path / "vae"
    pre = ["training.steps=300", "eval.every=0", "loss.params.vf_weight=0.0", f"run.output_dir={vae_run}"]
    cli.run_recipe(*cli.load_settings(None, "tiny-train-vavae", pre))
    run = tmp_path / "repa-e"
    tuned = [
        f"tokenizer.params.pretrained={vae_run / 'tokenizer.safetensors'}",
        "training.steps=300",
        "training.checkpoint_every=30",
        "training.keep_checkpoints=20",
        f"run.output_dir={run}",
        "eval.stats_batches=8",
    ]
    cli.run_recipe(*cli.load_settings(None, "tiny-repa-e", tuned))
    report = json.loads((run / "eval.json").read_text())
    print("REPA-E PSNR (dB): start", report["psnr_start"], "end", report["psnr_end"])
    assert report["psnr_end"] >= report["psnr_start"] - 1.0

    test = Digits("test", 32)
    real = torch.stack([test[i]["image"] for i in range(300)])
    real = (real * 255).round().byte()  # as samples.npz holds images

    def fd_of(step, out):
        """Fréchet distance of 300 class-balanced samples of the generator's EMA at ``step``."""
        argv = [
            "generator.name=test-sit",
            f"generator.params.pretrained={run / 'checkpoints' / f'{step:08d}' / 'ema.safetensors'}",
            "tokenizer.name=test-vavae-tiny",
            f"tokenizer.params.pretrained={run / 'tokenizer.safetensors'}",
            "num_classes=10",
            "num_samples=300",
            "write_png=false",
            "sampler={steps: 20}",
            f"run.output_dir={out}",
        ]
        cli.run_recipe(*cli.load_settings("sample", None, argv))
        metric = registry.metrics.build("fd-dinov2", encoder="test-vit-tiny", output="pooled")
        metric.update(real, real=True)
        with np.load(out / "samples.npz") as f:
            metric.update(torch.from_numpy(f["arr_0"]).permute(0, 3, 1, 2))
        return float(metric.compute())

    early, late = fd_of(30, tmp_path / "s30"), fd_of(300, tmp_path / "s300")
    print(f"REPA-E generator FD (tiny ViT, pooled): step 30 {early:.3f}, step 300 {late:.3f}")
    assert late < 0.8 * early


def test_published_repa_e_config():
    """REPA-E's settings (train_repae.py, l1_lpips_kl_gan.yaml): λ 0.5 / 1.5, BN momentum 0.1, ..."""
    recipe, cfg = cli.load_settings(None, "repa-e-sit-xl-1", [])
    v, a, t = cfg.vae_loss, cfg.alignment, cfg.training
    assert recipe == "train-repa-e" and cfg.generator.name == "sit-xl-1"
    assert (a.encoder.name, a.depth, a.weight, cfg.vae_align_weight) == ("dinov2-vitb14", 8, 0.5, 1.5)
    assert (v.perceptual_weight, v.kl_weight, v.disc_weight, v.disc_start) == (1.0, 1e-6, 0.1, 0)
    assert (t.lr, t.betas, t.batch_size, t.steps, t.grad_clip) == (1e-4, (0.9, 0.999), 256, 400_000, 1.0)
    assert cfg.bn_momentum == 0.1 and cli.main(["validate", "repa-e-sit-xl-1"]) == 0
