"""The repro-* configs: one per headline number, each the official sampling protocol of released files
with the paper's figure as data; sample copies the figure beside samples.npz, evaluate reports ours
beside it."""

import json

import numpy as np
import pytest
import torch
from test_runner_evaluate import _random_inception_state

from latentforge_core import registry
from latentforge_runner import cli

# config → (paper's FID, Euler steps, guidance scale, labels)
REPRO = {
    "repro-lightningdit-xl-800ep": (1.35, 249, 6.7, "random"),
    "repro-lightningdit-xl-64ep": (2.11, 249, 10.0, "random"),
    "repro-rae-ditdh-xl-256": (1.51, 49, 1.0, "equal"),
    "repro-rae-ditdh-xl-256-ag": (1.13, 49, 1.42, "equal"),
    "repro-rae-ditdh-xl-512-ag": (1.13, 49, 1.5, "equal"),
}


@pytest.mark.parametrize("name", sorted(REPRO))
def test_repro_configs_carry_the_protocol_and_the_papers_figure(name):
    fid, steps, scale, labels = REPRO[name]
    assert name in cli.shipped_configs()
    recipe, cfg = cli.load_settings(None, name, [])
    assert recipe == "sample" and cfg.generator.params["pretrained"].startswith("/path/to/")
    assert cfg.num_samples == 50_000 and cfg.labels == labels and cfg.num_classes == 1000
    assert (cfg.sampler["sampler"], cfg.sampler["steps"], cfg.sampler["cfg_scale"]) == ("euler", steps, scale)
    assert cfg.sampler["amp"] is False
    assert cfg.paper["fid"] == fid and cfg.paper["protocol"] == "adm" and cfg.paper["source"]
    assert (cfg.guidance_model is not None) == name.endswith("-ag")
    if name.startswith("repro-lightningdit"):
        assert cfg.sampler["cfg_channels"] == 3 and cfg.sampler["shift"] == pytest.approx(1 / 0.3)
    assert cli.main(["validate", name]) == 0


@pytest.mark.parametrize(
    ("name", "fid", "num_classes"),
    [("repro-digit-large-cond", 3.39, 1000), ("repro-digit-large-uncond", 4.59, 0)],
)
def test_digit_repro_configs_chain_both_released_stages(name, fid, num_classes):
    recipe, cfg = cli.load_settings(None, name, [])
    assert recipe == "sample" and cfg.num_samples == 50_000 and cfg.num_classes == num_classes
    assert (cfg.generator.name, cfg.stage2.name, cfg.stage2_tokenizer.name) == (
        "gpt-digit-large",
        "digit-stage2-ar-base",
        "vqgan-f16-1024",
    )
    for block in (cfg.generator, cfg.stage2, cfg.stage2_tokenizer):
        assert block.params["pretrained"].startswith("/path/to/")
    assert cfg.tokenizer.params["centroids"].endswith("km_16k.npy")
    assert cfg.sampler == {"top_k": 400, "temperature": 1.0}
    assert cfg.stage2_sampler == {"top_p": 0.8, "temperature": 1.0}
    assert cfg.paper["fid"] == fid and cfg.paper["protocol"] == "torch-fidelity"
    assert cli.main(["validate", name]) == 0


@pytest.fixture
def release(tmp_path):
    """RAE's layouts with random weights: the main model's {"model", "ema"} checkpoint, the weak model's
    raw state dict, stat.pt."""
    torch.manual_seed(0)
    shape = dict(in_channels=64, input_size=8, num_classes=10)
    main = registry.generators.build("test-ditdh", **shape)
    noise = {k: torch.randn_like(v) for k, v in main.backbone.state_dict().items()}
    torch.save({"model": noise, "ema": main.backbone.state_dict()}, tmp_path / "stage2_model.pt")
    weak = registry.generators.build("test-ditdh", **shape)
    torch.save(weak.backbone.state_dict(), tmp_path / "weak.pt")
    torch.save({"mean": torch.randn(64, 8, 8), "var": torch.rand(64, 8, 8) + 0.5}, tmp_path / "stat.pt")
    torch.save(_random_inception_state(), tmp_path / "inception.pth")
    ref = np.random.default_rng(0).integers(0, 256, (10, 32, 32, 3), dtype=np.uint8)
    np.savez(tmp_path / "reference.npz", arr_0=ref)
    return tmp_path


@pytest.mark.filterwarnings("ignore:the covariance of 10 samples")
def test_repro_config_samples_then_evaluates_beside_the_papers_figure(release):
    """The autoguided RAE protocol, pointed at tiny files: sample writes protocol.json, evaluate puts
    our FID and IS beside the paper's 1.13 / 262.6 in evaluation.json."""
    out = release / "sample"
    recipe, cfg = cli.load_settings(
        None,
        "repro-rae-ditdh-xl-256-ag",
        [
            "generator.name=test-ditdh",
            f"generator.params.pretrained={release / 'stage2_model.pt'}",
            "tokenizer.name=test-rae-tiny",
            f"tokenizer.params={{stats: {release / 'stat.pt'}}}",
            "guidance_model.name=test-ditdh",
            f"guidance_model.params.pretrained={release / 'weak.pt'}",
            "num_classes=10",
            "num_samples=10",
            "batch_size=5",
            "sampler.steps=3",
            f"run.output_dir={out}",
        ],
    )
    cli.run_recipe(recipe, cfg)
    protocol = json.loads((out / "protocol.json").read_text())
    assert protocol["paper"]["fid"] == 1.13 and protocol["sampler"]["cfg_scale"] == 1.42
    assert protocol["guidance_model"]["name"] == "test-ditdh" and protocol["num_samples"] == 10

    recipe, cfg = cli.load_settings(
        "evaluate",
        None,
        [
            f"samples={out / 'samples.npz'}",
            f"reference={release / 'reference.npz'}",
            "metrics=[fid,inception-score]",
            "protocol=adm",
            f"weights={release / 'inception.pth'}",
            "batch_size=5",
            f"run.output_dir={release / 'evaluate'}",
        ],
    )
    cli.run_recipe(recipe, cfg)
    report = json.loads((release / "evaluate" / "evaluation.json").read_text())
    assert report["paper"]["fid"] == 1.13 and report["paper"]["inception_score"] == 262.6
    assert set(report["ours"]) == {"fid", "inception_score"}
    assert report["ours"]["fid"] == report["metrics"]["fid"]
    assert report["ours"]["inception_score"] == report["metrics"]["inception-score"]["inception_score"]
    log = (release / "evaluate" / "log.txt").read_text()
    assert f"fid ours {report['ours']['fid']:.4g} vs paper 1.13" in log and "RAE paper" in log


def test_evaluate_without_protocol_json_reports_no_paper(release):
    np.savez(release / "plain.npz", arr_0=np.load(release / "reference.npz")["arr_0"])
    recipe, cfg = cli.load_settings(
        "evaluate",
        None,
        [
            f"samples={release / 'plain.npz'}",
            "metrics=[inception-score]",
            f"weights={release / 'inception.pth'}",
            "batch_size=5",
            f"run.output_dir={release / 'evaluate'}",
        ],
    )
    cli.run_recipe(recipe, cfg)
    report = json.loads((release / "evaluate" / "evaluation.json").read_text())
    assert "paper" not in report and "ours" not in report


@pytest.mark.filterwarnings("ignore:the covariance of")
def test_digit_repro_config_samples_then_evaluates_against_a_val_folder(tmp_path):
    """DiGIT's class-conditional protocol pointed at tiny files in its release layouts (fairseq stages,
    km_*.npy, MAGE's VQGAN): sample chains both stages into samples.npz and protocol.json; evaluate
    scores it with torch-fidelity's preprocessing against a folder of JPEGs prepared as DiGIT's val
    (Resize + CenterCrop: crop=resize) and puts our FID and IS beside the paper's 3.39 / 205.96."""
    from layouts import random_fairseq_stage1, random_fairseq_stage2
    from PIL import Image

    K, V = 64, 64  # test-kmeans-tiny's clusters and width, test-vqgan-tiny's codebook
    np.save(tmp_path / "km_16k.npy", torch.randn(K, 64, generator=torch.Generator().manual_seed(1)).numpy())
    torch.save({"model": random_fairseq_stage1(K, 10, 32, 2)}, tmp_path / "stage1.pt")
    torch.save({"model": random_fairseq_stage2(V, K, 32, 2, seed=2)}, tmp_path / "stage2.pt")
    torch.manual_seed(3)
    vqgan = registry.tokenizers.build("test-vqgan-tiny", image_size=32)
    torch.save({"state_dict": vqgan.state_dict()}, tmp_path / "vqgan_jax_strongaug.ckpt")
    torch.save(_random_inception_state(), tmp_path / "inception.pth")
    val = tmp_path / "val" / "n01440764"
    val.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(10):  # val JPEGs of other sizes than the crop
        Image.fromarray(rng.integers(0, 256, (40 + i, 48, 3), dtype=np.uint8)).save(val / f"{i}.JPEG")

    out = tmp_path / "sample"
    overrides = [
        "generator.name=gpt-digit-base",
        f"generator.params.pretrained={tmp_path / 'stage1.pt'}",
        "generator.params.num_heads=4",
        "tokenizer.name=test-kmeans-tiny",
        f"tokenizer.params={{centroids: {tmp_path / 'km_16k.npy'}}}",
        f"stage2.params={{pretrained: {tmp_path / 'stage2.pt'}, num_heads: 4}}",
        "stage2_tokenizer.name=test-vqgan-tiny",
        f"stage2_tokenizer.params={{image_size: 32, pretrained: {tmp_path / 'vqgan_jax_strongaug.ckpt'}}}",
        "num_classes=10",
        "num_samples=10",
        "batch_size=5",
        "sampler.top_k=20",
        f"run.output_dir={out}",
    ]
    cli.run_recipe(*cli.load_settings(None, "repro-digit-large-cond", overrides))
    protocol = json.loads((out / "protocol.json").read_text())
    assert protocol["paper"]["fid"] == 3.39 and protocol["paper"]["protocol"] == "torch-fidelity"
    with np.load(out / "samples.npz") as f:
        assert f["arr_0"].shape == (10, 32, 32, 3) and f["arr_1"].tolist() == [i % 10 for i in range(10)]

    evaluate = [
        f"samples={out / 'samples.npz'}",
        f"reference={tmp_path / 'val'}",
        "image_size=32",
        "crop=resize",
        "metrics=[fid,inception-score]",
        "protocol=torch-fidelity",
        f"weights={tmp_path / 'inception.pth'}",
        "batch_size=5",
        f"run.output_dir={tmp_path / 'evaluate'}",
    ]
    cli.run_recipe(*cli.load_settings("evaluate", None, evaluate))
    report = json.loads((tmp_path / "evaluate" / "evaluation.json").read_text())
    assert report["paper"]["fid"] == 3.39 and report["paper"]["inception_score"] == 205.96
    assert report["ours"]["fid"] == report["metrics"]["fid"] and np.isfinite(report["ours"]["fid"])
    log = (tmp_path / "evaluate" / "log.txt").read_text()
    assert f"fid ours {report['ours']['fid']:.4g} vs paper 3.39" in log
