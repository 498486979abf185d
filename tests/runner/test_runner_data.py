"""Data: ADM center crop, ImageNet-layout folders (empty → error, corrupted → skipped and counted),
the embedded digits, and the resumable sharded batch sampler."""

import logging

import numpy as np
import pytest
import torch
from PIL import Image

from latentforge_runner.data import (
    DataError,
    Digits,
    ImageFolder,
    ResumableBatchSampler,
    center_crop_arr,
    collate,
)
from latentforge_runner.training import Trainer, TrainingSettings


def test_adm_center_crop_halves_with_box_then_bicubic():
    rng = np.random.default_rng(0)
    big = Image.fromarray(rng.integers(0, 256, (512, 512, 3), dtype=np.uint8))
    assert np.array_equal(center_crop_arr(big, 256), np.asarray(big.resize((256, 256), Image.BOX)))
    wide = Image.fromarray(rng.integers(0, 256, (200, 300, 3), dtype=np.uint8))  # H 200, W 300
    out = center_crop_arr(wide, 64)
    halved = wide.resize((150, 100), Image.BOX)  # 200 ≥ 128: one halving, 100 < 128: stop
    scaled = np.asarray(halved.resize((96, 64), Image.BICUBIC))
    assert out.shape == (64, 64, 3) and np.array_equal(out, scaled[:, 16:80])


def _folder(root, corrupt=0):
    digits = Digits("all", image_size=16)
    for i in range(8):
        d = root / f"class_{i % 2}"
        d.mkdir(parents=True, exist_ok=True)
        arr = (digits.images[i].permute(1, 2, 0).numpy() * 255).astype(np.uint8)
        Image.fromarray(arr).save(d / f"{i}.png")
    for j in range(corrupt):
        (root / "class_1" / f"broken_{j}.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return root


def test_empty_or_missing_folder_is_a_clear_error(tmp_path):
    (tmp_path / "cls").mkdir()
    (tmp_path / "cls" / "notes.txt").write_text("no images here")
    with pytest.raises(DataError, match=r"no images found under .*root/<class>/\*.jpg"):
        ImageFolder(tmp_path, 16)
    with pytest.raises(DataError, match="data folder not found"):
        ImageFolder(tmp_path / "nope", 16)


def test_folder_reads_classes_and_matches_the_source_pixels(tmp_path):
    ds = ImageFolder(_folder(tmp_path), 16)
    assert ds.classes == ["class_0", "class_1"] and len(ds) == 8
    item = ds[0]
    assert item["image"].shape == (3, 16, 16) and item["label"] == 0
    expected = torch.from_numpy((Digits("all", 16).images[0].permute(1, 2, 0).numpy() * 255).astype(np.uint8))
    assert torch.equal((item["image"] * 255).round().byte().permute(1, 2, 0), expected)


def test_corrupted_images_are_skipped_counted_and_reported(tmp_path, caplog):
    ds = ImageFolder(_folder(tmp_path / "data", corrupt=2), 16)
    assert len(ds) == 10
    bad = [i for i in range(len(ds)) if "error" in ds[i]]
    assert len(bad) == 2 and "broken_0.jpg" in ds[bad[0]]["error"]
    batch = collate([ds[i] for i in range(len(ds))])
    assert batch["image"].shape == (8, 3, 16, 16) and len(batch["skipped"]) == 2

    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(768, 2))
    t = TrainingSettings(steps=6, batch_size=5, lr=1e-3, ema_decay=None, checkpoint_every=100)
    trainer = Trainer(model, t, run_dir=tmp_path / "run", num_items=len(ds))
    with caplog.at_level(logging.WARNING, logger="latentforge"):
        trainer.fit(ds, lambda m, b: torch.nn.functional.cross_entropy(m(b["image"]), b["label"]))
    assert trainer.step == 6
    assert len(trainer.skipped) == 6  # 3 epochs of 2 batches: each broken file met once per epoch
    assert sorted({s.split(":")[0].rsplit("/", 1)[-1] for s in trainer.skipped}) == [
        "broken_0.jpg",
        "broken_1.jpg",
    ]
    assert "skipped 6 unreadable image(s)" in caplog.text


def test_digits_split_is_fixed_and_stratified():
    train, test = Digits("train", 8), Digits("test", 8)
    assert len(train) + len(test) == 1797 and len(test) == 360
    assert torch.bincount(test.labels).min() >= 35
    assert train.images.shape[1:] == (3, 8, 8) and train.images.min() >= 0 and train.images.max() <= 1
    with pytest.raises(DataError, match="split must be"):
        Digits("val")


def test_sampler_shards_resumes_and_refuses_another_data_set():
    one = ResumableBatchSampler(100, 8, seed=3)
    ranks = [ResumableBatchSampler(100, 8, seed=3, rank=r, world_size=2) for r in range(2)]
    for whole, a, b in zip(one, *ranks, strict=True):
        assert whole == a + b
    assert len(list(one)) == 12  # the last 4 items are dropped
    for _ in range(15):
        one.advance()
    assert one.state_dict()["epoch"] == 1 and one.state_dict()["batch"] == 3
    again = ResumableBatchSampler(100, 8, seed=3)
    again.load_state_dict(one.state_dict())
    assert list(again) == list(one)
    with pytest.raises(DataError, match="checkpoint's n is 100, this run's is 90"):
        ResumableBatchSampler(90, 8, seed=3).load_state_dict(one.state_dict())
    with pytest.raises(DataError, match="not divisible by 3 processes"):
        ResumableBatchSampler(100, 8, world_size=3)
