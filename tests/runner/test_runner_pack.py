"""pack: an image folder → ADM npz; pixels read back equal the cropped images, bad files are counted."""

import json

import numpy as np
import pytest
from PIL import Image

from latentforge_metrics.npz import iter_npz_images
from latentforge_runner import cli
from latentforge_runner.config import ConfigError
from latentforge_runner.data import DataError


def _images(seed, n, h, w):
    return np.random.default_rng(seed).integers(0, 256, size=(n, h, w, 3), dtype=np.uint8)


def _pack(tmp_path, root, *extra):
    recipe, cfg = cli.load_settings(
        "pack",
        None,
        [f"root={root}", "image_size=16", f"run.output_dir={tmp_path / 'run'}", "batch_size=3", *extra],
    )
    return cli.run_recipe(recipe, cfg)


def test_pack_imagenet_layout_pixels_labels_and_skips(tmp_path):
    root = tmp_path / "data"
    expected, labels = [], []
    for c, name in enumerate(["cat", "dog"]):
        (root / name).mkdir(parents=True)
        # 16×24 (W×H) images: scale 1, so the ADM crop is the centre 16 rows — checked by slicing here.
        for i, arr in enumerate(_images(c, 4, 24, 16)):
            Image.fromarray(arr).save(root / name / f"{i}.png")
            expected.append(arr[4:20])
            labels.append(c)
    (root / "dog" / "9_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    result = _pack(tmp_path, root)
    assert result["num_images"] == 8 and result["skipped"] == 1
    assert "9_broken.png" in result["skipped_files"][0]
    with np.load(tmp_path / "run" / "images.npz") as f:
        arr, arr_labels = f["arr_0"], f["arr_1"]
    assert arr.dtype == np.uint8 and arr.shape == (8, 16, 16, 3)
    np.testing.assert_array_equal(arr, np.stack(expected))
    np.testing.assert_array_equal(arr_labels, labels)
    report = json.loads((tmp_path / "run" / "pack.json").read_text())
    assert report["classes"] == ["cat", "dog"] and report["skipped"] == 1
    # The metrics package streams it back in the evaluator's layout.
    back = np.concatenate(
        [b.permute(0, 2, 3, 1).numpy() for b in iter_npz_images(tmp_path / "run" / "images.npz", 5)]
    )
    np.testing.assert_array_equal(back, arr)
    assert not list((tmp_path / "run").glob(".*"))  # no temporary file left


def test_pack_flat_folder_downscales_without_labels(tmp_path):
    root = tmp_path / "flat"
    root.mkdir()
    for i, arr in enumerate(_images(3, 5, 64, 64)):
        Image.fromarray(arr).save(root / f"{i:02d}.png")
    result = _pack(tmp_path, root, "max_images=4", "output=" + str(tmp_path / "flat.npz"))
    assert result["num_images"] == 4 and result["skipped"] == 0 and result["classes"] == []
    with np.load(tmp_path / "flat.npz") as f:
        assert f["arr_0"].shape == (4, 16, 16, 3) and "arr_1" not in f.files
        # 64 → 32 → 16 by two BOX halvings (ADM): the mean of each 4×4 block up to two 8-bit roundings.
        img0 = np.asarray(Image.open(root / "00.png"), dtype=np.float64)
        blocks = img0.reshape(16, 4, 16, 4, 3).mean(axis=(1, 3))
        assert np.abs(f["arr_0"][0] - blocks).max() <= 2.0


def test_pack_bad_input(tmp_path):
    with pytest.raises(DataError, match="data folder not found"):
        _pack(tmp_path, tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images found"):
        _pack(tmp_path, tmp_path / "empty")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "a.png").write_bytes(b"garbage")
    with pytest.raises(DataError, match="none of the 1 images"):
        _pack(tmp_path, tmp_path / "bad")
    assert not (tmp_path / "run" / "images.npz").exists()
    with pytest.raises(ConfigError, match="missing required key 'root'"):
        cli.load_settings("pack", None, [])
