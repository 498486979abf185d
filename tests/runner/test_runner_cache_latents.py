"""cache-latents: the memory-mapped file (and the older shards) hold exactly tokenizer.encode of the images
(and of their flips); an interrupted cache resumes bitwise; a damaged one is refused."""

import os
import pickle
import subprocess
import sys

import kit_loop
import pytest
import torch

from latentforge_core import registry
from latentforge_core.checkpoint import load_checkpoint
from latentforge_core.device import seed_everything
from latentforge_runner import cli
from latentforge_runner.data import DataError, Digits, ResumableBatchSampler
from latentforge_runner.latents import LatentShards, cache_path, map_cache_file, read_cache_header
from latentforge_runner.recipes.cache_latents import CacheLatentsRecipe


def _cache(tmp_path, tokenizer, size, *extra):
    recipe, cfg = cli.load_settings(
        "cache-latents",
        None,
        [
            f"tokenizer.name={tokenizer}",
            "data.name=digits",
            f"data.image_size={size}",
            "max_images=50",
            "shard_size=16",
            "batch_size=12",
            f"run.output_dir={tmp_path}",
            *extra,
        ],
    )
    return cli.run_recipe(recipe, cfg)


def test_rae_latent_shards_equal_encode_and_flip(tmp_path):
    result = _cache(tmp_path, "test-rae-tiny", 32, "format=shards")
    shards = sorted(tmp_path.glob("shard-*.safetensors"))
    assert [p.name for p in shards] == [f"shard-r000-{k:05d}.safetensors" for k in range(4)]
    assert result["shards"] == [str(p) for p in shards] and result["skipped"] == 0
    contents = [load_checkpoint(p)[0] for p in shards]
    assert [len(c["labels"]) for c in contents] == [16, 16, 16, 2]
    latents = torch.cat([c["latents"] for c in contents])
    flipped = torch.cat([c["latents_flip"] for c in contents])
    data = Digits("train", 32)
    images, labels = data.images[:50], data.labels[:50]
    tok = registry.tokenizers.build("test-rae-tiny").eval()
    with torch.no_grad():
        torch.testing.assert_close(latents, tok.encode(images))
        torch.testing.assert_close(flipped, tok.encode(images.flip(-1)))
        assert not torch.allclose(latents, flipped)  # digits are not mirror-symmetric
    assert torch.equal(torch.cat([c["labels"] for c in contents]), labels)
    assert torch.equal(torch.cat([c["indices"] for c in contents]), torch.arange(50))
    # The training data set: 50 items and their 50 flipped copies.
    ds = LatentShards(tmp_path)
    assert len(ds) == 100 and ds.key == "latents"
    assert torch.equal(ds[7]["latents"], latents[7]) and torch.equal(ds[57]["latents"], flipped[7])
    assert ds[57]["label"] == int(labels[7])
    batch = ds.batch([3, 53])
    assert (
        torch.equal(batch["latents"], torch.stack([latents[3], flipped[3]]))
        and batch["label"].tolist() == [int(labels[3])] * 2
    )


def test_a_generator_trains_on_the_shards(tmp_path):
    from latentforge_runner.training import TrainingSettings

    _cache(tmp_path / "cache", "test-rae-tiny", 32, "max_images=32", "format=shards")
    ds = LatentShards(tmp_path / "cache")
    torch.manual_seed(0)
    generator = registry.generators.build("test-dit", in_channels=64, input_size=8, num_classes=10)
    before = [p.detach().clone() for p in generator.parameters()]
    settings = TrainingSettings(steps=2, batch_size=8, log_every=1, checkpoint_every=2, ema_decay=None)
    trainer, entry = kit_loop.build(generator, settings, ds.batch, len(ds), tmp_path / "train", method="loss")
    logs = kit_loop.fit(trainer, entry, lambda model, batch: model(batch["latents"], batch["label"]))
    assert trainer.step == 2 and logs["loss"] > 0
    assert any(not torch.equal(a, b) for a, b in zip(before, generator.parameters(), strict=True))


def test_vqgan_token_shards_without_flip(tmp_path):
    _cache(tmp_path, "test-vqgan-tiny", 16, "flip=false", "shard_size=50", "format=shards")
    (shard,) = tmp_path.glob("shard-*.safetensors")
    tensors, config = load_checkpoint(shard)
    assert set(tensors) == {"tokens", "labels", "indices"} and config["key"] == "tokens"
    seed_everything(0)  # random weights: built as the recipe built them, right after seeding with run.seed
    tok = registry.tokenizers.build("test-vqgan-tiny").eval()
    with torch.no_grad():
        assert torch.equal(tensors["tokens"], tok.encode(Digits("train", 16).images[:50]))
    assert len(LatentShards(tmp_path, flip=False)) == 50
    with pytest.raises(DataError, match="no flipped copies"):
        LatentShards(tmp_path)
    with pytest.raises(DataError, match="no latent cache .* and no latent shards"):
        LatentShards(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="shard_size"):
        _cache(tmp_path / "bad", "test-vqgan-tiny", 16, "shard_size=0")


# ------------------------------------------------------------------------------------------------
# The memory-mapped cache (the default format)
# ------------------------------------------------------------------------------------------------
def _bytes(folder, split="train"):
    return cache_path(folder, split).read_bytes()


def test_memmap_cache_equals_encode_and_flip(tmp_path):
    result = _cache(tmp_path, "test-rae-tiny", 32)
    path = cache_path(tmp_path, "train")
    assert result == {"cache": str(path), "items": 50, "skipped": 0}
    assert [p.name for p in tmp_path.glob("latents-*")] == [path.name]  # no partial file left behind
    assert not list(tmp_path.glob("shard-*"))
    data = Digits("train", 32)
    tok = registry.tokenizers.build("test-rae-tiny").eval()
    with torch.no_grad():
        latents, flipped = tok.encode(data.images[:50]), tok.encode(data.images[:50].flip(-1))
    ds = LatentShards(tmp_path)
    assert len(ds) == 100 and ds.key == "latents" and ds.tokenizer == "test-rae-tiny"
    assert torch.equal(ds.batch(range(50))["latents"], latents)  # float32: stored exactly
    assert torch.equal(ds.batch(range(50, 100))["latents"], flipped)
    assert torch.equal(ds.labels, data.labels[:50]) and torch.equal(ds.indices, torch.arange(50))
    assert torch.equal(ds[57]["latents"], flipped[7]) and ds[57]["label"] == int(data.labels[7])


@pytest.mark.parametrize("dtype, rtol", [("bfloat16", 2**-8), ("float16", 2**-11)])
def test_16bit_cache_is_within_its_rounding(tmp_path, dtype, rtol):
    _cache(tmp_path / "f32", "test-rae-tiny", 32, "max_images=24")
    _cache(tmp_path / dtype, "test-rae-tiny", 32, "max_images=24", f"dtype={dtype}")
    exact, rounded = LatentShards(tmp_path / "f32"), LatentShards(tmp_path / dtype)
    a, b = exact.batch(range(48))["latents"], rounded.batch(range(48))["latents"]
    assert b.dtype == torch.float32 and not torch.equal(a, b)
    torch.testing.assert_close(b, a, rtol=rtol, atol=1e-6)  # round to nearest: half an ulp at most
    size = lambda d: cache_path(tmp_path / d, "train").stat().st_size  # noqa: E731
    assert size(dtype) < 0.6 * size("f32")


def test_an_interrupted_cache_resumes_bitwise(tmp_path, monkeypatch):
    """test-vavae-tiny samples its posterior: the resumed batches must draw what they would have."""
    args = ("test-vavae-tiny", 32, "max_images=40", "batch_size=8", "dtype=bfloat16")
    _cache(tmp_path / "whole", *args)
    calls = {"n": 0}
    encode = CacheLatentsRecipe._encode

    def stop_in_the_third_batch(self, images):
        calls["n"] += 1
        if calls["n"] > 5:  # two batches written (their flips are encodes too), the third lost
            raise KeyboardInterrupt
        return encode(self, images)

    monkeypatch.setattr(CacheLatentsRecipe, "_encode", stop_in_the_third_batch)
    with pytest.raises(KeyboardInterrupt):
        _cache(tmp_path / "cut", *args)
    monkeypatch.undo()
    partial = tmp_path / "cut" / "latents-train.lfcache.partial"
    assert partial.is_file() and not cache_path(tmp_path / "cut", "train").exists()
    assert map_cache_file(partial)[1]["status"].tolist() == [1] * 16 + [0] * 24
    with pytest.raises(DataError, match="unfinished"):
        LatentShards(tmp_path / "cut")
    _cache(tmp_path / "cut", *args)
    assert _bytes(tmp_path / "cut") == _bytes(tmp_path / "whole") and not partial.exists()
    # Run again: nothing to do, the file stays; other settings write it anew.
    before = cache_path(tmp_path / "cut", "train").stat().st_mtime_ns
    _cache(tmp_path / "cut", *args)
    assert cache_path(tmp_path / "cut", "train").stat().st_mtime_ns == before
    _cache(tmp_path / "cut", *args[:-1], "dtype=float32")
    assert len(_bytes(tmp_path / "cut")) > len(_bytes(tmp_path / "whole"))


def test_a_damaged_cache_is_refused(tmp_path):
    _cache(tmp_path, "test-rae-tiny", 32, "max_images=16")
    path, whole = cache_path(tmp_path, "train"), _bytes(tmp_path)
    path.write_bytes(whole[:-100])
    with pytest.raises(DataError, match="truncated or corrupt"):
        LatentShards(tmp_path)
    path.write_bytes(b"PK\x03\x04" + whole[4:])
    with pytest.raises(DataError, match="not a cache-latents file"):
        LatentShards(tmp_path)
    path.write_bytes(whole[:16] + b"#" + whole[17:])
    with pytest.raises(DataError, match="corrupt header"):
        LatentShards(tmp_path)
    path.write_bytes(whole)
    header, start = read_cache_header(path)  # the whole file's, written back above
    status = start + header["sections"]["status"][0]
    path.write_bytes(whole[:status] + b"\x00" + whole[status + 1 :])
    with pytest.raises(DataError, match="unfinished"):
        LatentShards(tmp_path)
    path.write_bytes(whole)
    assert len(LatentShards(tmp_path)) == 32


def test_any_number_of_loader_workers_reads_the_same(tmp_path):
    _cache(tmp_path, "test-rae-tiny", 32, "max_images=24")
    ds = LatentShards(tmp_path)
    assert len(pickle.dumps(ds)) < 1000  # workers get the path and map the file themselves

    def batches(workers):
        sampler = ResumableBatchSampler(len(ds), 8, seed=1)
        loader = torch.utils.data.DataLoader(ds, batch_sampler=sampler, num_workers=workers)
        return [(b["latents"], b["label"], b["index"]) for b in loader]

    alone, two = batches(0), batches(2)
    assert len(alone) == 6
    for (x, y, i), (x2, y2, i2) in zip(alone, two, strict=True):
        assert torch.equal(x, x2) and torch.equal(y, y2) and torch.equal(i, i2)
        assert torch.equal(x, ds.batch(i)["latents"])


@pytest.mark.slow  # two torchrun processes: about a minute on a loaded 2-core machine
def test_two_processes_fill_one_cache_file(tmp_path):
    """Under torchrun each rank writes its rows r, r+w, … into the same file: one process's cache."""
    common = ["tokenizer.name=test-rae-tiny", "data.name=digits", "data.image_size=32", "max_images=20"]
    common += ["batch_size=4", "run.device=cpu"]
    cli.run_recipe(*cli.load_settings("cache-latents", None, [*common, f"run.output_dir={tmp_path / 'one'}"]))
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    cmd = [*launcher, "-m", "latentforge_runner.cli", "run", "cache-latents", *common]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [*cmd, f"run.output_dir={tmp_path / 'two'}"], env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = LatentShards(tmp_path / "one"), LatentShards(tmp_path / "two")
    assert torch.equal(one.labels, two.labels) and torch.equal(one.indices, two.indices)
    torch.testing.assert_close(two.batch(range(40))["latents"], one.batch(range(40))["latents"])
    assert [p.name for p in (tmp_path / "two").glob("latents-*")] == ["latents-train.lfcache"]
