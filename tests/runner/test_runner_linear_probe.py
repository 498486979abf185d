"""linear-probe: a registered encoder's features on the digits beat chance by a wide margin."""

import json

import pytest

from latentforge_runner import cli
from latentforge_runner.data import DataError


def test_probe_on_digits_beats_chance(tmp_path):
    recipe, cfg = cli.load_settings(
        "linear-probe",
        None,
        [
            "encoder.name=test-vit-tiny",
            "data.name=digits",
            "data.image_size=32",
            "data.num_classes=10",
            "output=pooled",
            "epochs=30",
            "batch_size=128",
            f"run.output_dir={tmp_path}",
        ],
    )
    report = cli.run_recipe(recipe, cfg)
    assert json.loads((tmp_path / "report.json").read_text()) == report
    assert report["train_images"] == 1437 and report["val_images"] == 360  # the fixed 80/20 split
    # random test-vit-tiny weights, mean-pooled tokens: measured 0.80 held-out top-1 (chance 0.10)
    assert report["top1"] >= 0.6 and report["chance"] == pytest.approx(0.1)


def test_folder_without_val_root_is_an_error(tmp_path):
    recipe, cfg = cli.load_settings(
        "linear-probe",
        None,
        [
            "encoder.name=test-vit-tiny",
            "data.name=folder",
            f"data.root={tmp_path}",
            f"run.output_dir={tmp_path}",
        ],
    )
    with pytest.raises(DataError, match="needs val_root"):
        cli.run_recipe(recipe, cfg)
