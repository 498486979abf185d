"""sample, pack and latent-stats under torchrun: two gloo processes share the work and write what one
process writes (the same npz arrays, the same statistics)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from latentforge_core import registry
from latentforge_runner import cli
from latentforge_tokenizers.stats import LatentStats, stats_path

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _run(recipe, overrides, nproc=None):
    """The recipe through the CLI under torchrun with ``nproc`` processes, or in this process (None);
    one thread either way, so the float results can match bit for bit."""
    overrides = [*overrides, "run.threads=1", "run.device=cpu"]
    if nproc is None:
        threads = torch.get_num_threads()
        try:
            return cli.run_recipe(*cli.load_settings(recipe, None, overrides))
        finally:
            torch.set_num_threads(threads)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    cmd = [*launcher, "-m", "latentforge_runner.cli", "run", recipe, *overrides]
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _npz(path):
    with np.load(path) as f:
        return {k: f[k] for k in f.files}


def test_sample_two_processes_write_the_samples_of_one(tmp_path):
    gen = tmp_path / "gen"
    train = [
        "training.steps=1",
        "training.batch_size=8",
        "training.checkpoint_every=1",
        "eval.every=0",
        "eval.stats_batches=1",
        "eval.sampler.steps=2",
        f"run.output_dir={gen}",
    ]
    cli.run_recipe(*cli.load_settings("train-generator", "tiny-rae", train))
    # 20 samples in shards of 8: rank 0 takes shards 0 and 2, rank 1 shard 1 (an uneven last round).
    common = [f"generator_run={gen}", "num_samples=20", "shard_size=8", "batch_size=4", "labels=random"]
    common.append("run.seed=3")
    _run("sample", [*common, f"run.output_dir={tmp_path / 'one'}"])
    _run("sample", [*common, f"run.output_dir={tmp_path / 'two'}"], nproc=2)
    one, two = _npz(tmp_path / "one" / "samples.npz"), _npz(tmp_path / "two" / "samples.npz")
    assert two["arr_0"].shape == (20, 32, 32, 3)
    np.testing.assert_array_equal(two["arr_0"], one["arr_0"])
    np.testing.assert_array_equal(two["arr_1"], one["arr_1"])
    assert not np.array_equal(one["arr_0"][:4], one["arr_0"][8:12])  # each sample draws its own noise
    # Each rank wrote its own PNGs: together every index, holding the npz's pixels.
    pngs = sorted((tmp_path / "two" / "images").glob("*.png"))
    assert [p.stem for p in pngs] == [f"{i:06d}" for i in range(20)]
    for i in (3, 12, 19):  # shards 0 and 2 (rank 0), 1 (rank 1)
        np.testing.assert_array_equal(np.asarray(Image.open(pngs[i]).convert("RGB")), one["arr_0"][i])
    grid_one = np.asarray(Image.open(tmp_path / "one" / "grid.png"))
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "two" / "grid.png")), grid_one)


def test_pack_two_processes_write_the_archive_of_one(tmp_path):
    root = tmp_path / "data"
    rng = np.random.default_rng(0)
    for c in ("cat", "dog"):
        (root / c).mkdir(parents=True)
        for i in range(6):
            Image.fromarray(rng.integers(0, 256, (20, 16, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    # Unreadable files in batches of both ranks (batches of 3: cat/1_bad is in batch 0, dog/3_bad in 3).
    (root / "cat" / "1_bad.png").write_bytes(b"not a png")
    (root / "dog" / "3_bad.png").write_bytes(b"not a png either")
    common = [f"root={root}", "image_size=16", "batch_size=3"]
    _run("pack", [*common, f"run.output_dir={tmp_path / 'one'}"])
    _run("pack", [*common, f"run.output_dir={tmp_path / 'two'}"], nproc=2)
    one, two = _npz(tmp_path / "one" / "images.npz"), _npz(tmp_path / "two" / "images.npz")
    assert two["arr_0"].shape == (12, 16, 16, 3) and two["arr_1"].tolist() == [0] * 6 + [1] * 6
    np.testing.assert_array_equal(two["arr_0"], one["arr_0"])
    np.testing.assert_array_equal(two["arr_1"], one["arr_1"])
    report_one = json.loads((tmp_path / "one" / "pack.json").read_text())
    report_two = json.loads((tmp_path / "two" / "pack.json").read_text())
    assert report_two["skipped"] == 2 and report_two["num_images"] == 12
    assert report_two["skipped_files"] == report_one["skipped_files"]
    assert not list((tmp_path / "two").glob(".*"))  # no temporary file left


@pytest.mark.slow  # two launches of two processes: ~20 s each on 2 loaded cores
@pytest.mark.parametrize("tokenizer", ["test-rae-tiny", "test-vavae-tiny"])
def test_latent_stats_two_processes_equal_one(tmp_path, tokenizer):
    """RAE: per element, deterministic encoder (decoder from a checkpoint, the stats beside it);
    VA-VAE: per channel over posterior samples, whose noise is seeded per batch, so these too do not
    depend on the number of processes.  Random-weight parts are built from ``run.seed`` on every rank."""
    common = [
        f"tokenizer.name={tokenizer}",
        "data.name=digits",
        "data.image_size=32",
        "max_images=200",
        "batch_size=48",  # 5 batches, the last of 8: rank 0 takes 0, 2, 4, rank 1 takes 1, 3
    ]
    if tokenizer == "test-rae-tiny":
        ckpt = registry.tokenizers.build(tokenizer).save(tmp_path / "decoder.safetensors")
        common.append(f"tokenizer.params.pretrained_decoder={ckpt}")
    for name, nproc in (("one", None), ("two", 2)):
        _run(
            "latent-stats",
            [
                *common,
                f"checkpoint={tmp_path / name / 'tok.safetensors'}",
                f"run.output_dir={tmp_path / name}",
            ],
            nproc,
        )
    one = LatentStats.load(stats_path(tmp_path / "one" / "tok.safetensors"))
    two = LatentStats.load(stats_path(tmp_path / "two" / "tok.safetensors"))
    assert two.shape == one.shape and two.eps == one.eps
    torch.testing.assert_close(two.mean, one.mean, rtol=0, atol=1e-6)
    torch.testing.assert_close(two.var, one.var, rtol=1e-6, atol=1e-7)
