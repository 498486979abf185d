"""reconstruct: one image or a folder through a tokenizer's encode → decode, PNGs plus PSNR/SSIM.

    latentforge run reconstruct input=photo.jpg tokenizer.name=test-rae-tiny image_size=32
    latentforge run reconstruct input=/data/imagenet/val tokenizer.name=vavae-f16d32 \\
        tokenizer.params.pretrained=/ckpt/vavae.safetensors image_size=256

Images get the ADM center crop to ``image_size``.  ``<output_dir>/reconstructions/`` mirrors the input
tree with PNGs; ``<output_dir>/report.json`` has per-image and mean PSNR/SSIM, measured on the 8-bit
reconstructions that were written (so the files and the numbers agree), rFID when ``rfid`` names
the metric (it needs the FID Inception weights; meaningful on thousands of images), and the unreadable
images that were skipped.  VA-VAE encodes to its posterior mean here (deterministic).
"""

from __future__ import annotations

import inspect
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from latentforge_metrics.reconstruction import psnr, ssim
from latentforge_runner import distributed
from latentforge_runner.config import Component, ConfigError, Settings, component, setting, settings
from latentforge_runner.data import (
    IMAGE_SUFFIXES,
    UNREADABLE,
    DataError,
    ImageFolder,
    center_crop_arr,
    to_tensor,
)
from latentforge_runner.reports import write_report
from latentforge_runner.run_folder import RunSettings, open_run

log = logging.getLogger("latentforge")


@settings
class ReconstructSettings(Settings):
    run: RunSettings = RunSettings(output_dir="runs/reconstruct")  # where and on what it runs
    tokenizer: Component = component("tokenizers")  # the tokenizer that encodes and decodes
    input: str  # an image file or a folder (searched recursively)
    image_size: int = setting(256, ge=1)  # ADM center crop to this many pixels a side
    batch_size: int = setting(16, ge=1)  # images encoded at once
    rfid: Component | None = component("metrics", default=None)  # e.g. {name: rfid, params: {weights: …}}


class ReconstructRecipe:
    Settings = ReconstructSettings

    def __init__(self, config: ReconstructSettings):
        self.cfg = config

    def setup(self) -> None:
        cfg = self.cfg
        self.run_dir, self.dist, self.logger = open_run("reconstruct", cfg)
        source = Path(cfg.input)
        if source.is_file():
            if source.suffix.lower() not in {s.lower() for s in IMAGE_SUFFIXES}:
                raise DataError(
                    f"{source} is not an image file; expected one of {', '.join(IMAGE_SUFFIXES[:-1])}"
                )
            self.root, self.files = source.parent, [source]
        elif source.is_dir():
            self.root, self.files = source, [p for p, _ in ImageFolder(source, cfg.image_size).samples]
        else:
            raise DataError(f"input not found: {source} (expected an image file or a folder of images)")
        self.tokenizer = cfg.tokenizer.build("tokenizers").to(self.dist.device).eval()
        if not self.tokenizer.can_decode:
            raise ConfigError(
                f"tokenizer {cfg.tokenizer.name!r} has no decode; reconstruct needs one that maps back to "
                "pixels (RAE, VA-VAE, VQGAN)"
            )
        size = self.tokenizer.preprocessing.input_size
        if size != cfg.image_size:
            raise ConfigError(
                f"image_size is {cfg.image_size}, but tokenizer {cfg.tokenizer.name!r} reconstructs "
                f"{size}-pixel images: set image_size={size}"
            )
        encode_args = inspect.signature(self.tokenizer.encode).parameters
        self.encode_kwargs = {"sample": False} if "sample" in encode_args else {}
        self.out_dir = self.run_dir / "reconstructions"
        self.rfid = None if cfg.rfid is None else cfg.rfid.build("metrics", device=self.dist.device)
        self.per_image: dict[str, dict[str, float]] = {}
        self.skipped: list[str] = []

    def _load(self, path: Path) -> torch.Tensor | None:
        try:
            with Image.open(path) as img:
                return to_tensor(center_crop_arr(img.convert("RGB"), self.cfg.image_size))
        except UNREADABLE as err:
            self.skipped.append(f"{path}: {type(err).__name__}: {err}")
            return None

    @torch.no_grad()
    def run(self) -> dict[str, Any]:
        b = self.cfg.batch_size
        for start in range(0, len(self.files), b):
            loaded = [(p, self._load(p)) for p in self.files[start : start + b]]
            loaded = [(p, x) for p, x in loaded if x is not None]
            if not loaded:
                continue
            images = torch.stack([x for _, x in loaded]).to(self.dist.device)  # B 3 H W in [0, 1]
            latents = self.tokenizer.encode(images, **self.encode_kwargs)
            recon = self.tokenizer.decode(latents).clamp(0, 1)
            recon8 = (recon * 255).round().to(torch.uint8).cpu()  # what the PNGs hold
            target8 = (images * 255).round().to(torch.uint8).cpu()
            if self.rfid is not None:
                self.rfid.update(recon8.float() / 255, target8.float() / 255)
            for (path, _), p, s, r in zip(
                loaded, psnr(recon8, target8), ssim(recon8, target8), recon8, strict=True
            ):
                rel = path.relative_to(self.root).with_suffix(".png")
                self.per_image[str(rel)] = {"psnr": float(p), "ssim": float(s)}
                (self.out_dir / rel).parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(r.permute(1, 2, 0).numpy()).save(self.out_dir / rel)
        if not self.per_image:
            raise DataError(f"none of the {len(self.files)} image(s) under {self.cfg.input} could be read")
        if self.skipped:
            log.warning("skipped %d unreadable image(s), first: %s", len(self.skipped), self.skipped[0])
        values = list(self.per_image.values())
        self.report = {
            "tokenizer": self.cfg.tokenizer.name,
            "image_size": self.cfg.image_size,
            "count": len(values),
            "psnr": float(np.mean([v["psnr"] for v in values])),
            "ssim": float(np.mean([v["ssim"] for v in values])),
            **({} if self.rfid is None else {self.cfg.rfid.name: float(self.rfid.compute())}),
            "skipped": len(self.skipped),
            "skipped_files": self.skipped,
            "images": self.per_image,
        }
        return self.report

    def save(self) -> None:
        if self.dist.is_main:
            write_report(self.run_dir / "report.json", self.report)
            log.info(
                "PSNR %.2f dB, SSIM %.4f over %d image(s) → %s",
                self.report["psnr"],
                self.report["ssim"],
                self.report["count"],
                self.run_dir,
            )

    def cleanup(self) -> None:
        self.logger.close()
        distributed.cleanup()
