"""train-generator with alignment (REPA): the projector trains with the generator, is checkpointed and
resumed exactly, and is left out of what sample loads; the inputs REPA cannot use are named."""

import json

import pytest
import torch

from latentforge_core.checkpoint import load_checkpoint
from latentforge_core.errors import InputError
from latentforge_runner import cli
from latentforge_runner.config import ConfigError

QUICK = ["eval.every=0", "training.log_every=1", "data.limit=64", "training.batch_size=8"]


def _train(out, *extra):
    return cli.run_recipe(*cli.load_settings(None, "tiny-repa", [*QUICK, f"run.output_dir={out}", *extra]))


def test_repa_run_logs_alignment_checkpoints_the_projector_and_resumes_exactly(tmp_path):
    _train(tmp_path / "straight", "training.steps=4", "training.checkpoint_every=4")
    rows = [json.loads(r) for r in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert all(-1 <= r["generator/alignment"] <= 1 for r in rows) and len(rows) == 4
    _train(tmp_path / "resumed", "training.steps=2", "training.checkpoint_every=2")
    _train(tmp_path / "resumed", "training.steps=4", "training.checkpoint_every=2")
    for name in ("model", "ema", "projector"):
        a = load_checkpoint(tmp_path / "straight" / "checkpoints" / "00000004" / f"{name}.safetensors")[0]
        b = load_checkpoint(tmp_path / "resumed" / "checkpoints" / "00000004" / f"{name}.safetensors")[0]
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    first = load_checkpoint(tmp_path / "resumed" / "checkpoints" / "00000002" / "projector.safetensors")[0]
    assert any(not torch.equal(first[k], b[k]) for k in first)  # the projector trains
    assert not any(k.startswith("projector") for k in a)  # the generator's weights hold no projector
    out = tmp_path / "samples"
    args = [
        f"generator_run={tmp_path / 'straight'}",
        "num_samples=10",
        f"run.output_dir={out}",
        "write_png=false",
    ]
    cli.run_recipe(*cli.load_settings("sample", None, args))
    assert (out / "samples.npz").is_file()


def test_repa_without_images_or_with_an_impossible_depth_is_refused(tmp_path):
    with pytest.raises(
        ConfigError, match=r"alignment \(REPA\) computes .* latents \(a cache holds no pixels\)"
    ):
        _train(tmp_path / "a", "data.name=latents", f"data.root={tmp_path}", "training.steps=1")
    with pytest.raises(InputError, match="REPA depth 5 is beyond the 2 blocks"):
        _train(tmp_path / "b", "alignment.depth=5", "training.steps=1")
    with pytest.raises(ConfigError, match="alignment.weight"):
        cli.load_settings(None, "tiny-repa", ["alignment.weight=-1"])


@pytest.mark.parametrize(
    ("name", "generator"),
    [
        ("repa-sit-xl-2", "sit-xl-2"),
        ("repa-sit-xl-1", "sit-xl-1"),
        ("repa-lightningdit-xl", "lightningdit-xl-1"),
    ],
)
def test_published_repa_configs(name, generator):
    """REPA's settings (train.py: depth 8, λ 0.5; sit.py: 2048-wide projector; DINOv2-B/14)."""
    recipe, cfg = cli.load_settings(None, name, [])
    a = cfg.alignment
    assert recipe == "train-generator" and cfg.generator.name == generator
    assert (a.encoder.name, a.depth, a.weight, a.projector_dim) == ("dinov2-vitb14", 8, 0.5, 2048)
    assert cli.main(["validate", name]) == 0


def test_an_encoder_grid_other_than_the_token_grid_is_resampled_with_a_warning(tmp_path, caplog):
    """The tiny ViT's 8×8 grid against test-dit's 4×4 tokens (patch 2): trained, and said once."""
    with caplog.at_level("WARNING", logger="latentforge"):
        _train(tmp_path, "generator.name=test-dit", "training.steps=1")
    assert "encoder's 8×8 feature grid is resampled to the generator's 4×4 token grid" in caplog.text
