"""reconstruct: PNGs and a report whose PSNR/SSIM equal latentforge_metrics' on the same pixels."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits

from latentforge_metrics.reconstruction import psnr, ssim
from latentforge_runner import cli
from latentforge_runner.config import ConfigError
from latentforge_runner.data import DataError


def _digit_folder(root, n=5):
    """``root/<class>/<i>.png``: digits scaled to 40×40 (the recipe center-crops them to 32)."""
    digits = load_digits()
    for i in range(n):
        folder = root / str(digits.target[i])
        folder.mkdir(parents=True, exist_ok=True)
        gray = (digits.images[i] / 16 * 255).astype(np.uint8)
        Image.fromarray(gray).convert("RGB").resize((40, 48), Image.BILINEAR).save(folder / f"{i}.png")
    (root / "0" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    return root


def _run(tmp_path, source, tokenizer="test-rae-tiny", *extra):
    recipe, cfg = cli.load_settings(
        "reconstruct",
        None,
        [
            f"input={source}",
            f"tokenizer.name={tokenizer}",
            "image_size=32",
            "batch_size=2",
            f"run.output_dir={tmp_path / 'run'}",
            *extra,
        ],
    )
    return cli.run_recipe(recipe, cfg)


@pytest.mark.parametrize("tokenizer", ["test-rae-tiny", "test-vavae-tiny"])
def test_folder_report_matches_metrics_and_skips_the_broken_image(tmp_path, tokenizer):
    from latentforge_runner.data import center_crop_arr

    root = _digit_folder(tmp_path / "images")
    report = _run(tmp_path, root, tokenizer)
    saved = json.loads((tmp_path / "run" / "report.json").read_text())
    assert saved["count"] == 5 and saved["skipped"] == 1 and "broken.png" in saved["skipped_files"][0]
    assert saved == json.loads(json.dumps(report))
    originals, recons = [], []
    for rel in sorted(saved["images"]):
        with Image.open(root / rel) as img:
            originals.append(
                torch.from_numpy(center_crop_arr(img.convert("RGB"), 32).copy()).permute(2, 0, 1)
            )
        recons.append(
            torch.from_numpy(np.array(Image.open(tmp_path / "run" / "reconstructions" / rel))).permute(
                2, 0, 1
            )
        )
    target, preds = torch.stack(originals), torch.stack(recons)  # uint8 [5, 3, 32, 32]
    p, s = psnr(preds, target), ssim(preds, target)
    for i, rel in enumerate(sorted(saved["images"])):
        assert saved["images"][rel]["psnr"] == pytest.approx(float(p[i]), abs=1e-5)
        assert saved["images"][rel]["ssim"] == pytest.approx(float(s[i]), abs=1e-6)
    assert saved["psnr"] == pytest.approx(float(p.mean()), abs=1e-5)
    assert saved["ssim"] == pytest.approx(float(s.mean()), abs=1e-6)


@pytest.mark.filterwarnings("ignore:the covariance of 4 samples")  # 4 images: a biased but exact FD
def test_rfid_equals_the_metric_on_the_written_pixels(tmp_path):
    from latentforge_metrics.generative import RFID
    from latentforge_metrics.inception import FIDInceptionV3
    from latentforge_runner.data import center_crop_arr

    weights = tmp_path / "inception-random.pth"  # random weights in the FID Inception's layout
    torch.manual_seed(0)
    torch.save(FIDInceptionV3().state_dict(), weights)
    root = _digit_folder(tmp_path / "images", n=4)
    report = _run(tmp_path, root, "test-rae-tiny", "rfid.name=rfid", f"rfid.params.weights={weights}")
    direct = RFID(weights=weights)
    for rel in sorted(report["images"]):
        with Image.open(root / rel) as img:
            target = torch.from_numpy(center_crop_arr(img.convert("RGB"), 32).copy()).permute(2, 0, 1)
        recon = torch.from_numpy(np.array(Image.open(tmp_path / "run" / "reconstructions" / rel))).permute(
            2, 0, 1
        )
        direct.update(recon[None].float() / 255, target[None].float() / 255)
    assert report["rfid"] == pytest.approx(direct.compute(), rel=1e-4)


def test_one_image_and_bad_input(tmp_path):
    root = _digit_folder(tmp_path / "images", n=1)
    one = next((root / "0").glob("0.png"))
    report = _run(tmp_path, one)
    assert report["count"] == 1 and list(report["images"]) == ["0.png"]
    assert (tmp_path / "run" / "reconstructions" / "0.png").is_file()
    with pytest.raises(DataError, match="input not found"):
        _run(tmp_path, tmp_path / "nowhere")
    with pytest.raises(DataError, match="could be read"):
        _run(tmp_path, root / "0" / "broken.png")
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(DataError, match="not an image file"):
        _run(tmp_path, tmp_path / "notes.txt")
    with pytest.raises(ConfigError, match="missing required key 'input'"):
        cli.load_settings("reconstruct", None, ["tokenizer.name=test-rae-tiny"])
