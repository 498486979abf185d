"""Data: ADM center crop, ImageNet-layout folders (empty → error, corrupted → skipped and counted),
the embedded digits, and the resumable sharded batch sampler."""

import logging

import kit_loop
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
    resize_center_crop_arr,
)
from latentforge_runner.training import TrainingSettings


def test_adm_center_crop_halves_with_box_then_bicubic():
    rng = np.random.default_rng(0)
    big = Image.fromarray(rng.integers(0, 256, (512, 512, 3), dtype=np.uint8))
    assert np.array_equal(center_crop_arr(big, 256), np.asarray(big.resize((256, 256), Image.BOX)))
    wide = Image.fromarray(rng.integers(0, 256, (200, 300, 3), dtype=np.uint8))  # H 200, W 300
    out = center_crop_arr(wide, 64)
    halved = wide.resize((150, 100), Image.BOX)  # 200 ≥ 128: one halving, 100 < 128: stop
    scaled = np.asarray(halved.resize((96, 64), Image.BICUBIC))
    assert out.shape == (64, 64, 3) and np.array_equal(out, scaled[:, 16:80])


@pytest.mark.parametrize("name", ["astronaut", "chelsea", "rocket", "rocket-portrait"])
@pytest.mark.parametrize("size", [64, 256])
def test_resize_crop_equals_torchvision_resize_then_center_crop(name, size):
    """DiGIT's ImageNet-val reference (prepare_imgnet_val.py): Resize(size) bilinear + CenterCrop(size)."""
    import skimage.data
    from torchvision import transforms

    arr = getattr(skimage.data, name.removesuffix("-portrait"))()  # square, 300×451, 427×640
    image = Image.fromarray(arr.transpose(1, 0, 2) if name.endswith("-portrait") else arr).convert("RGB")
    theirs = transforms.Compose([transforms.Resize(size), transforms.CenterCrop(size)])(image)
    assert np.array_equal(resize_center_crop_arr(image, size), np.asarray(theirs))


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
    trainer, entry = kit_loop.build(model, t, ds, len(ds), tmp_path / "run")
    with caplog.at_level(logging.WARNING, logger="latentforge"):
        kit_loop.fit(trainer, entry, kit_loop.cross_entropy)
    assert trainer.step == 6
    assert len(trainer.batches.skipped) == 6  # 3 epochs of 2 batches: each broken file met once per epoch
    assert sorted({s.split(":")[0].rsplit("/", 1)[-1] for s in trainer.batches.skipped}) == [
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


def _wide_folder(root, n=12):
    """Images wider than tall with a distinct pattern each, so a crop window can be located."""
    rng = np.random.default_rng(1)
    (root / "a").mkdir(parents=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)).save(root / "a" / f"{i}.png")
    return root


def as_uint8(image: torch.Tensor) -> np.ndarray:
    return (image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def _locate(window: np.ndarray, image: np.ndarray) -> list[tuple[int, int]]:
    h, w = window.shape[:2]
    return [
        (top, left)
        for top in range(image.shape[0] - h + 1)
        for left in range(image.shape[1] - w + 1)
        if np.array_equal(image[top : top + h, left : left + w], window)
    ]


def test_random_crop_is_a_window_of_the_bicubic_resize_and_flips_half(tmp_path):
    folder = ImageFolder(_wide_folder(tmp_path), 16, crop="random", resize=20, seed=5)
    path, _ = folder.samples[3]
    resized = np.asarray(Image.open(path).convert("RGB").resize((28, 20), Image.BICUBIC))  # short side 20
    assert len(_locate(as_uint8(folder[3]["image"]), resized)) == 1
    positions = set()
    for i in range(len(folder)):
        source = np.asarray(Image.open(folder.samples[i][0]).convert("RGB").resize((28, 20), Image.BICUBIC))
        positions.add(_locate(as_uint8(folder[i]["image"]), source)[0])
    assert len(positions) > 4  # the window moves from image to image
    flipping = ImageFolder(tmp_path, 16, flip=True, seed=5)
    plain = ImageFolder(tmp_path, 16)
    flipped = [
        not torch.equal(flipping[i]["image"], plain[i]["image"])
        and torch.equal(flipping[i]["image"], plain[i]["image"].flip(-1))
        for i in range(len(plain))
    ]
    assert 2 <= sum(flipped) <= len(plain) - 2  # about half, each an exact mirror


def test_augmentation_depends_on_seed_epoch_and_index_only(tmp_path):
    root = _wide_folder(tmp_path)
    a = ImageFolder(root, 16, crop="random", resize=24, flip=True, seed=0)
    b = ImageFolder(root, 16, crop="random", resize=24, flip=True, seed=0)
    first = [a[i]["image"] for i in range(len(a))]
    a.set_epoch(1)
    second = [a[i]["image"] for i in range(len(a))]
    assert sum(not torch.equal(x, y) for x, y in zip(first, second, strict=True)) > len(a) // 2
    b.set_epoch(1)  # a resumed run (or a loader worker) reaches the same crops from the epoch alone
    assert all(torch.equal(x, b[i]["image"]) for i, x in enumerate(second))
    with pytest.raises(DataError, match="resize 12 is smaller than the crop 16"):
        ImageFolder(root, 16, crop="random", resize=12)
    with pytest.raises(DataError, match="unknown crop 'corner'"):
        ImageFolder(root, 16, crop="corner")
    from latentforge_runner.data import build_dataset

    with pytest.raises(DataError, match="a mirrored digit is another glyph"):
        build_dataset("digits", image_size=16, flip=True)


def test_trainer_draws_new_crops_each_epoch_and_the_same_after_resume(tmp_path):
    root = _wide_folder(tmp_path / "data", n=8)
    seen: list[torch.Tensor] = []

    def loss(model, batch):
        seen.append(batch["image"][batch["index"].argsort()])  # data-set order within the batch
        return model(batch["image"]).square().mean()

    def train(steps, run, resume=False):
        ds = ImageFolder(root, 16, crop="random", resize=24, flip=True, seed=3)
        model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(768, 1))
        t = TrainingSettings(steps=steps, batch_size=8, lr=1e-3, ema_decay=None, checkpoint_every=2)
        trainer, entry = kit_loop.build(model, t, ds, len(ds), tmp_path / run)
        if resume:
            trainer.resume()
        kit_loop.fit(trainer, entry, loss)

    train(4, "whole")  # one batch per epoch: four epochs
    whole, seen[:] = list(seen), []
    assert not torch.equal(whole[0], whole[1])
    train(2, "cut")
    train(4, "cut", resume=True)
    assert len(seen) == 4 and all(torch.equal(a, b) for a, b in zip(whole, seen, strict=True))
