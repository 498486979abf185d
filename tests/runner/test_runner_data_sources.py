"""Data sources beside image folders: WebDataset ``.tar`` shards and Hugging Face ``datasets``.

The digits are written by the tests as a PNG image folder, as shards (by ``write-shards``) and as a
``datasets`` folder and parquet file; decoding PNG is lossless, so every source gives the same pixels,
the same seeds' crops and flips, and a tiny generator trained on each has the same losses bit for bit.
A run stopped after a checkpoint and rerun ends with the weights of an uninterrupted one.  Nothing is
downloaded.
"""

from __future__ import annotations

import gzip
import io
import json
import logging
import sys
import tarfile
from pathlib import Path

import kit_loop
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from sklearn.datasets import load_digits

from latentforge_runner import cli
from latentforge_runner.data import (
    DataError,
    HFImages,
    ImageFolder,
    WebDatasetShards,
    build_dataset,
    collate,
    expand_braces,
    to_tensor,
)
from latentforge_runner.latents import LatentShards

try:
    import datasets
except ImportError:  # the webdataset tests still run
    datasets = None
needs_datasets = pytest.mark.skipif(datasets is None, reason="needs the datasets package (the dev group)")

N_IMAGES = 40  # 5 batches of 8: the runs below cross an epoch boundary
AUGMENT = ("data.crop=random", "data.resize=36", "data.flip=true")


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """The same 40 digits (32 px PNG, 10 classes) as a folder, tar shards, a save_to_disk folder and a
    parquet folder."""
    root = tmp_path_factory.mktemp("sources")
    digits = load_digits()
    folder = root / "folder"
    for i in range(N_IMAGES):
        gray = (digits.images[i] / 16 * 255).round().astype(np.uint8)
        image = Image.fromarray(gray).convert("RGB").resize((32, 32), Image.BILINEAR)
        (folder / f"class{digits.target[i]}").mkdir(parents=True, exist_ok=True)
        image.save(folder / f"class{digits.target[i]}" / f"{i:04d}.png")
    report = _quiet("write-shards", [f"root={folder}", f"run.output_dir={root / 'write'}", "shard_size=16"])
    assert report["shards"] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    assert report["num_images"] == N_IMAGES and report["skipped"] == 0
    images = ImageFolder(folder, 32)
    found = {
        "folder": str(folder),
        "webdataset": str(root / "write" / "shards"),
        "hf-datasets": str(root / "hf"),
        "parquet": str(root / "parquet"),
        "root": root,
    }
    if datasets is None:
        return found
    rows = {
        "image": [{"bytes": p.read_bytes(), "path": None} for p, _ in images.samples],
        "label": [label for _, label in images.samples],
    }
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=images.classes)}
    )
    ds = datasets.Dataset.from_dict(rows, features=features)
    datasets.DatasetDict({"train": ds, "test": ds.select(range(8))}).save_to_disk(str(root / "hf"))
    (root / "parquet").mkdir()
    ds.to_parquet(str(root / "parquet" / "train-00000-of-00001.parquet"))
    return found


@pytest.fixture(autouse=True)
def _hf_cache(tmp_path, monkeypatch):
    """``datasets`` caches what it converts from parquet: here, under the test's folder, offline."""
    if datasets is None:
        return
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)


def _quiet(recipe, overrides, config=None):
    threads = torch.get_num_threads()
    try:
        return cli.run_recipe(*cli.load_settings(recipe if config is None else None, config, overrides))
    finally:
        torch.set_num_threads(threads)


def _source(name, sources):
    if name == "parquet":
        return ("data.name=hf-datasets", f"data.root={sources['parquet']}")
    return (f"data.name={name}", f"data.root={sources[name]}")


# ------------------------------------------------------------------------------------------------
# The same pixels from every source
# ------------------------------------------------------------------------------------------------
@needs_datasets
def test_every_source_gives_the_folder_pixels_labels_and_crops(sources):
    augment = dict(crop="random", resize=36, flip=True, seed=3)
    folder = build_dataset("folder", image_size=32, root=sources["folder"], **augment)
    others = {
        "webdataset": build_dataset("webdataset", image_size=32, root=sources["webdataset"], **augment),
        "hf-datasets": build_dataset("hf-datasets", image_size=32, root=sources["hf-datasets"], **augment),
        "parquet": build_dataset("hf-datasets", image_size=32, root=sources["parquet"], **augment),
    }
    for name, ds in others.items():
        assert len(ds) == len(folder) == N_IMAGES, name
        assert ds.classes == folder.classes, name
        assert torch.equal(ds.labels, torch.tensor([label for _, label in folder.samples])), name
        for epoch in (0, 1):
            folder.set_epoch(epoch)
            ds.set_epoch(epoch)
            for i in range(N_IMAGES):
                a, b = folder[i], ds[i]
                assert torch.equal(a["image"], b["image"]) and a["label"] == b["label"], (name, epoch, i)
    flipped = [folder[i]["image"] for i in range(N_IMAGES)]
    folder.set_epoch(0)
    assert any(not torch.equal(a, folder[i]["image"]) for i, a in enumerate(flipped))  # epochs differ


@needs_datasets
def test_hf_splits(sources):
    assert len(HFImages(sources["hf-datasets"], 32, split="test")) == 8
    with pytest.raises(DataError, match=r"splits \['train', 'test'\].*'validation'"):
        HFImages(sources["hf-datasets"], 32, split="validation")


def test_the_shards_index_and_patterns(sources):
    shards = WebDatasetShards(sources["webdataset"], 32)
    assert [p.name for p in shards.shards] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    assert shards.members[17] == b"000000017.png" and shards.shard[17] == 1
    pattern = sources["webdataset"] + "/shard-{000000..000001}.tar"
    assert len(WebDatasetShards(pattern, 32)) == 32
    assert expand_braces("a-{08..10}-{x,y}.tar") == [
        "a-08-x.tar", "a-08-y.tar", "a-09-x.tar", "a-09-y.tar", "a-10-x.tar", "a-10-y.tar"
    ]  # fmt: skip


def test_shards_interoperate_with_the_webdataset_library(sources, tmp_path):
    wds = pytest.importorskip("webdataset")
    folder = ImageFolder(sources["folder"], 32)
    # Ours, read by the library: the files' bytes and labels in the folder's order.
    pattern = sources["webdataset"] + "/shard-{000000..000002}.tar"
    read = list(wds.WebDataset(pattern, shardshuffle=False, empty_check=False))
    assert [r["png"] for r in read] == [p.read_bytes() for p, _ in folder.samples]
    assert [int(r["cls"]) for r in read] == [label for _, label in folder.samples]
    # The library's, read by us: its ShardWriter with a key per image.
    out = tmp_path / "lib"
    out.mkdir()
    with wds.ShardWriter(str(out / "lib-%03d.tar"), maxcount=15, verbose=0) as sink:
        for i, (path, label) in enumerate(folder.samples):
            sink.write({"__key__": f"sample{i:04d}", "png": path.read_bytes(), "cls": label})
    ours = WebDatasetShards(out, 32)
    assert len(ours) == N_IMAGES and len(ours.shards) == 3
    for i in range(N_IMAGES):
        assert torch.equal(ours[i]["image"], folder[i]["image"]) and ours[i]["label"] == folder[i]["label"]


# ------------------------------------------------------------------------------------------------
# Training: the same losses, and exact resume
# ------------------------------------------------------------------------------------------------
TRAIN = (
    "training.steps=8",
    "training.batch_size=8",
    "training.log_every=1",
    "training.checkpoint_every=4",
    "eval.every=0",
    "eval.num_samples=4",
    "eval.stats_batches=1",
    "eval.sampler.steps=1",
    "data.num_classes=10",
    *AUGMENT,
)


def _train(out: Path, data, *extra):
    _quiet(None, [*TRAIN, *data, *extra, f"run.output_dir={out}"], config="tiny-rae")
    rows = [json.loads(r) for r in (out / "metrics.jsonl").read_text().splitlines()]
    losses = {r["step"]: r["generator/loss"] for r in rows if "generator/loss" in r}
    return losses, load_file(out / "checkpoints" / "00000008" / "model.safetensors")


@pytest.fixture(scope="module")
def folder_run(sources):
    return _train(sources["root"] / "runs" / "folder", _source("folder", sources))


HF = pytest.param("hf-datasets", marks=needs_datasets)
PARQUET = pytest.param("parquet", marks=needs_datasets)


@pytest.mark.parametrize("name", ["webdataset", HF, PARQUET])
def test_training_on_a_source_equals_training_on_the_folder(sources, folder_run, name, tmp_path):
    losses, weights = _train(tmp_path / name, _source(name, sources))
    assert sorted(losses) == list(range(1, 9))
    assert losses == folder_run[0]  # bitwise: the same floats in metrics.jsonl
    for k, v in folder_run[1].items():
        assert torch.equal(v, weights[k]), k


@pytest.mark.parametrize("name", ["webdataset", HF])
def test_stopped_after_a_checkpoint_and_rerun_ends_bitwise(sources, folder_run, name, tmp_path, monkeypatch):
    """Killed right after checkpoint 4 (steps 5… lost), rerun with the same command, two loader
    workers this time: the weights at step 8 are the uninterrupted run's."""
    with kit_loop.stopped_after_checkpoint(monkeypatch, 4):
        _train(tmp_path, _source(name, sources))
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["00000004"]
    losses, weights = _train(tmp_path, _source(name, sources), "training.num_workers=2")
    assert losses == folder_run[0]
    for k, v in folder_run[1].items():
        assert torch.equal(v, weights[k]), k


# ------------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------------
def _member(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _bad_shards(sources, out: Path) -> Path:
    """Shard 0: 10 good samples, then one without .cls, one corrupt PNG, one with a label 'cat', one
    .cls without an image."""
    out.mkdir()
    folder = ImageFolder(sources["folder"], 32)
    with tarfile.open(out / "bad-000.tar", "w") as tar:
        for i, (path, label) in enumerate(folder.samples[:10]):
            _member(tar, f"k{i:03d}.png", path.read_bytes())
            _member(tar, f"k{i:03d}.cls", str(label).encode())
        _member(tar, "nolabel.png", folder.samples[0][0].read_bytes())
        _member(tar, "corrupt.png", b"\x89PNG\r\n\x1a\n" + b"\0" * 50)
        _member(tar, "corrupt.cls", b"1")
        _member(tar, "badlabel.png", folder.samples[0][0].read_bytes())
        _member(tar, "badlabel.cls", b"cat")
        _member(tar, "noimage.cls", b"2")
    return out


def test_bad_samples_in_a_shard_are_skipped_counted_and_named(sources, tmp_path, caplog):
    root = _bad_shards(sources, tmp_path / "bad")
    with caplog.at_level(logging.WARNING, logger="latentforge"):
        ds = WebDatasetShards(root, 32)
    assert len(ds) == 14
    assert "3 of the 14 samples" in caplog.text and "nolabel" in caplog.text
    batch = collate([ds[i] for i in range(len(ds))])
    assert batch["image"].shape == (10, 3, 32, 32)
    skipped = "\n".join(batch["skipped"])
    assert len(batch["skipped"]) == 4
    shard = str(root / "bad-000.tar")
    assert f"{shard}:nolabel: no nolabel.cls" in skipped
    assert f"{shard}:corrupt.png: UnidentifiedImageError" in skipped or f"{shard}:corrupt.png: " in skipped
    assert f"{shard}:badlabel.cls: the label is b'cat'" in skipped
    assert f"{shard}:noimage: no image member (found .cls" in skipped


def test_training_on_bad_shards_skips_and_reports(sources, tmp_path, caplog):
    root = _bad_shards(sources, tmp_path / "bad")
    with caplog.at_level(logging.WARNING, logger="latentforge"):
        _quiet(
            None,
            [*TRAIN[:-4], "training.steps=3", "data.num_classes=10", "data.name=webdataset",
             f"data.root={root}", "training.batch_size=4", f"run.output_dir={tmp_path / 'run'}"],
            config="tiny-rae",
        )  # fmt: skip
    assert "skipped" in caplog.text and "unreadable image(s), first:" in caplog.text
    assert (tmp_path / "run" / "checkpoints" / "00000003").is_dir()


def test_unreadable_shards_and_roots_are_clear_errors(sources, tmp_path):
    gz = tmp_path / "gz"
    gz.mkdir()
    (gz / "a.tar").write_bytes(gzip.compress(b"not a tar at all" * 100))
    with pytest.raises(DataError, match=r"a\.tar is not an uncompressed tar file"):
        WebDatasetShards(gz, 32)
    with pytest.raises(DataError, match="no .tar shards in"):
        WebDatasetShards(sources["folder"], 32)
    with pytest.raises(DataError, match=r"1 of the 2 shard\(s\).*shard-000003\.tar"):
        WebDatasetShards(sources["webdataset"] + "/shard-{000002..000003}.tar", 32)
    with pytest.raises(DataError, match="remote source"):
        WebDatasetShards("https://example.com/shard-{000..009}.tar", 32)
    if datasets is not None:
        with pytest.raises(DataError, match="neither a save_to_disk folder"):
            HFImages(sources["folder"], 32)


@needs_datasets
def test_a_split_without_the_image_column_names_the_columns(sources, tmp_path, capsys):
    ds = datasets.Dataset.from_dict({"img": [b"x"] * 3, "label": [0, 1, 2]})
    ds.save_to_disk(str(tmp_path / "noimage"))
    with pytest.raises(DataError) as err:
        HFImages(tmp_path / "noimage", 32)
    message = str(err.value)
    assert "has the columns ['img', 'label']" in message and "not 'image'" in message
    assert "data.image_column" in message
    # The same through the CLI: exit code 2, the error on stderr, no traceback.
    code = cli.main(
        ["run", "train-generator", "--config", "tiny-rae", "data.name=hf-datasets",
         f"data.root={tmp_path / 'noimage'}", f"run.output_dir={tmp_path / 'run'}"]
    )  # fmt: skip
    err_text = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err_text
    assert "latentforge: error:" in err_text and "['img', 'label']" in err_text
    # A renamed column is read once data.image_column names it (here: bytes that do not decode).
    bad = HFImages(tmp_path / "noimage", 32, image_column="img")
    assert "UnidentifiedImageError" in bad[0]["error"] and "[train][0]" in bad[0]["error"]
    assert HFImages(tmp_path / "noimage", 32, image_column="img").labels.tolist() == [0, 1, 2]


def test_labels_beyond_num_classes_are_refused(sources, tmp_path):
    with pytest.raises(DataError, match=r"labels up to 9, but data.num_classes is 4"):
        _quiet(
            None,
            [*_source("webdataset", sources), "data.num_classes=4", f"run.output_dir={tmp_path}"],
            config="tiny-rae",
        )


def test_the_loss_comparison_sees_the_augmentation(sources, folder_run, tmp_path):
    """A control: without the flips, the same shards train to other losses (so equal losses above
    mean equal images, not a loss blind to the data)."""
    losses, _ = _train(tmp_path, _source("webdataset", sources), "data.flip=false")
    assert losses[1] != folder_run[0][1]


def test_without_the_datasets_package_hf_datasets_says_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets → ImportError
    with pytest.raises(DataError, match="needs the Hugging Face datasets package: pip install datasets"):
        HFImages(tmp_path, 32)


@needs_datasets
def test_every_image_recipe_reads_the_chosen_split_and_columns(sources, tmp_path):
    """cache-latents and latent-stats on a renamed, non-default hf-datasets split see the folder's
    images; a split without the image column is refused by name (here by linear-probe)."""
    digits = datasets.load_from_disk(sources["hf-datasets"])["train"]
    renamed = digits.rename_columns({"image": "png", "label": "digit"})
    captions = datasets.Dataset.from_dict({"caption": ["a digit"] * 3, "digit": [0, 1, 2]})
    splits = {"train": renamed.select(range(8)), "holdout": renamed, "meta": captions}
    datasets.DatasetDict(splits).save_to_disk(str(tmp_path / "renamed"))
    hf = ("data.name=hf-datasets", f"data.root={tmp_path / 'renamed'}", "data.image_column=png")
    hf += ("data.label_column=digit",)
    common = ("tokenizer.name=test-rae-tiny", "data.image_size=32")
    for name, source in (("hf", (*hf, "data.split=holdout")), ("folder", _source("folder", sources))):
        _quiet("cache-latents", [*common, *source, "flip=false", f"run.output_dir={tmp_path / name}"])
        _quiet("latent-stats", [*common, *source, f"run.output_dir={tmp_path / name / 'stats'}"])
    cached = LatentShards(tmp_path / "hf", flip=False, split="holdout")
    expected = LatentShards(tmp_path / "folder", flip=False)
    assert len(cached) == N_IMAGES and torch.equal(cached.labels, expected.labels)
    assert torch.equal(cached.batch(range(N_IMAGES))["latents"], expected.batch(range(N_IMAGES))["latents"])
    stats = [load_file(tmp_path / name / "stats" / "latent_stats.safetensors") for name in ("hf", "folder")]
    assert stats[0].keys() == stats[1].keys()
    assert all(torch.equal(stats[0][k], stats[1][k]) for k in stats[0])
    probe = ("encoder.name=test-vit-tiny", "data.image_size=32", "epochs=1", *hf, "data.split=meta")
    with pytest.raises(DataError, match=r"'meta' split .* has the columns \['caption', 'digit'\].*not 'png'"):
        _quiet("linear-probe", [*probe, f"run.output_dir={tmp_path / 'probe'}"])


def test_to_tensor_gives_contiguous_channels_first_floats_of_a_cropped_flipped_view():
    """A non-square crop of a mirrored image (a negative-stride view), as the loaders pass it."""
    pixels = np.random.default_rng(0).integers(0, 256, (20, 31, 3), dtype=np.uint8)
    view = pixels[2:14, 5:26][:, ::-1]  # 12 × 21, flipped
    out = to_tensor(view)
    assert out.shape == (3, 12, 21) and out.dtype == torch.float32 and out.is_contiguous()
    for channel in range(3):
        expected = torch.from_numpy(view[:, :, channel].copy()).float() / 255.0
        assert torch.equal(out[channel], expected)
