"""evaluate: registered metrics of a sample set against a reference → ``evaluation.json``.

    latentforge run evaluate samples=runs/sample/samples.npz reference=VIRTUAL_imagenet256_labeled.npz \\
        metrics=[fid,sfid,inception-score,precision-recall] protocol=adm weights=pt_inception-2015-12-05.pth
    latentforge run evaluate samples=runs/sample/images reference=/data/imagenet-val-256 image_size=256 \\
        metrics=[fid,inception-score] protocol=torch-fidelity

``samples`` and ``reference`` are ADM-style ``.npz`` files (``arr_0`` uint8 ``[N, H, W, 3]``) or image
folders (ADM center crop to ``image_size``).  A reference ``.npz`` with ``mu``/``sigma`` serves FID and
sFID through its statistics, as the ADM evaluator does; otherwise its images are fed as real ones.
A reference named like a known ADM batch (``VIRTUAL_imagenet256_labeled.npz``) must match its published
SHA-256 (``check_reference=false`` skips the check).

Metrics compare in one of three ways, read from their ``update`` signature: against real images
(``real=``: FID, KID, precision/recall, FD-DINOv2), pairwise with the reference image of the same index
(``target``: rFID, PSNR, SSIM), or on the samples alone (Inception Score).  The Inception metrics
share one network and one forward pass per batch.

Which protocol each paper used (``protocol`` picks the Inception preprocessing; ``kid`` and every
Inception metric follow it):

* RAE, LightningDiT (the ADM suite): ``protocol=adm`` (TF preprocessing; the Inception Score then
  splits as the evaluator, 5000 per split, no shuffle) against ``VIRTUAL_imagenet256_labeled.npz``,
  ``metrics=[fid,sfid,inception-score,precision-recall]``; 50,000 samples.
* DiGIT (torch-fidelity, MAGE's protocol): ``protocol=torch-fidelity``, ``metrics=[fid,inception-score]``
  against the 50,000 ImageNet validation images resized to 256 (torchvision ``Resize(256)``, bilinear)
  and center-cropped (DiGIT's ``prepare_imgnet_val.py``): ``reference=<val folder> image_size=256
  crop=resize`` prepares them so from the raw JPEGs (a folder already prepared at 256 px reads
  unchanged either way). Its numbers do not compare with the ADM suite's (another reference set).
* clean-fid: ``protocol=clean`` (PIL bicubic resize of float pixels), with ``kid`` for its KID.

When the samples come from a ``sample`` run with a ``paper`` block (the ``repro-*`` configs), the
``protocol.json`` beside them holds the published figure: ``evaluation.json`` then gains ``paper`` (that
block) and ``ours`` (our value of each of its numeric keys that names a metric or one of a metric's
results, e.g. ``fid``, ``inception_score``), and the log one line comparing them.
"""

from __future__ import annotations

import inspect
import itertools
import json
import logging
from pathlib import Path
from typing import Any, Literal

import attrs
import torch

from latentforge_core import registry
from latentforge_metrics.generative import FID, KID, InceptionScore, PrecisionRecall
from latentforge_metrics.inception import fid_inception_v3
from latentforge_metrics.npz import verify_reference
from latentforge_runner import distributed
from latentforge_runner.config import ConfigError, Settings, accepts, setting, settings
from latentforge_runner.data import DataError, ImageSource, reference_statistics
from latentforge_runner.reports import PROTOCOL_FILE, write_report
from latentforge_runner.run_folder import RunSettings, open_run
from latentforge_runner.training import progress_bar

log = logging.getLogger("latentforge")


@settings
class EvaluateSettings(Settings):
    run: RunSettings = RunSettings(output_dir="runs/evaluate")  # where and on what it runs
    samples: str  # an .npz with arr_0, or an image folder
    reference: str | None = None  # an .npz (statistics and/or arr_0) or an image folder
    metrics: list[str] = attrs.field(factory=lambda: ["fid"])  # names in the metrics registry
    params: dict = attrs.field(factory=dict)  # per metric: {fid: {protocol: adm}, …}
    protocol: str = "torch-fidelity"  # Inception preprocessing: torch-fidelity (= adm), pytorch-fid, clean, …
    weights: str | None = None  # FID Inception weights file (default: the torch hub cache); never downloaded
    image_size: int | None = setting(None, ge=1)  # the crop size for image folders
    # image folders: ADM's center crop, or torchvision's Resize (bilinear) + CenterCrop (DiGIT's val)
    crop: Literal["center", "resize"] = "center"
    batch_size: int = setting(64, ge=1)  # images per forward pass
    report: str | None = None  # default: <output_dir>/evaluation.json
    check_reference: bool = True  # a known ADM reference batch must match its SHA-256

    def __attrs_post_init__(self):
        if not self.metrics:
            raise ConfigError("metrics: name at least one metric (`latentforge ls metrics`)")
        for i, name in enumerate(self.metrics):
            try:
                registry.metrics.info(name)
            except registry.RegistryError as err:
                raise ConfigError(f"metrics[{i}]: {err}") from err
        unknown = sorted(set(self.params) - set(self.metrics))
        if unknown:
            raise ConfigError(f"params names {unknown}, which are not in metrics {self.metrics}")


# ------------------------------------------------------------------------------------------------
# Image sources: an .npz or a folder, as uint8 [B, 3, H, W] batches
# ------------------------------------------------------------------------------------------------
def _inception_output(metric: Any) -> str | None:
    """The Inception output a metric's ``update_features`` takes, when it can share the forward pass."""
    if isinstance(metric, FID):
        return metric.feature  # pool3 (FID, rFID) or spatial (sFID)
    if isinstance(metric, InceptionScore):
        return "logits"
    if isinstance(metric, PrecisionRecall | KID):
        return "pool3"
    return None


class EvaluateRecipe:
    Settings = EvaluateSettings

    def __init__(self, config: EvaluateSettings):
        self.cfg = config

    def setup(self) -> None:
        cfg = self.cfg
        self.run_dir, self.dist, self.logger = open_run("evaluate", cfg)
        self.samples = ImageSource(cfg.samples, cfg.image_size, "samples", cfg.crop)
        self.paper = _paper(Path(cfg.samples))
        if self.paper.get("protocol") not in (None, cfg.protocol):
            log.warning(
                "the paper's figure was measured with protocol %r, this evaluation uses %r: set protocol=%s",
                self.paper["protocol"],
                cfg.protocol,
                self.paper["protocol"],
            )
        self.reference = (
            ImageSource(cfg.reference, cfg.image_size, "reference", cfg.crop) if cfg.reference else None
        )
        self.ref_stats = None
        if self.reference is not None and self.reference.folder is None:
            if cfg.check_reference and verify_reference(self.reference.path):
                log.info("%s matches the SHA-256 of the published file", self.reference.path)
            self.ref_stats = reference_statistics(self.reference.path)  # None: a file of images only
        factories = {name: registry.metrics.get(name) for name in cfg.metrics}
        shared = None
        if any(accepts(f, "inception") for f in factories.values()):
            try:
                shared = fid_inception_v3(cfg.weights, cfg.protocol, self.dist.device)
            except FileNotFoundError as err:
                raise ConfigError(f"weights: {err}") from err
        self.metrics, self.mode = {}, {}
        for name, factory in factories.items():
            injected = {"protocol": cfg.protocol, "inception": shared, "device": self.dist.device}
            kwargs = {k: v for k, v in injected.items() if accepts(factory, k)} | cfg.params.get(name, {})
            try:
                metric = registry.metrics.build(name, **kwargs)
            except TypeError as err:  # a builder argument missing or unknown
                raise ConfigError(
                    f"metric {name!r} cannot be built with {sorted(kwargs)}: {err}; give its arguments as "
                    f"params.{name}.<argument>=… (or use its own recipe, e.g. linear-probe)"
                ) from err
            params = inspect.signature(metric.update).parameters
            if "target" in params:
                self.mode[name] = "paired"
            elif "real" in params:
                stats = self.ref_stats and getattr(self.ref_stats, getattr(metric, "reference_key", ""), None)
                if isinstance(metric, FID) and stats is not None:
                    metric.set_reference(stats)
                    self.mode[name] = "statistics"
                else:
                    self.mode[name] = "real"
            elif list(params) == ["images"]:
                self.mode[name] = "samples"
            else:
                raise ConfigError(
                    f"metric {name!r} updates with ({', '.join(params)}), not images against a reference; "
                    "it has its own recipe (e.g. linear-probe)"
                )
            if self.mode[name] in ("paired", "real") and self.reference is None:
                raise ConfigError(f"metric {name!r} compares with real images: set reference")
            self.metrics[name] = metric

    def _update(self, names: list[str], images: torch.Tensor, **kw: Any) -> None:
        """One Inception pass per protocol for the metrics that share it; the others update on their own."""
        groups: dict[str, list[str]] = {}
        for name in names:
            metric = self.metrics[name]
            if _inception_output(metric) is None:
                metric.update(images, **kw)
            else:
                groups.setdefault(repr(metric.protocol), []).append(name)
        for members in groups.values():
            outputs = sorted({_inception_output(self.metrics[n]) for n in members})
            feats = self.metrics[members[0]].inception_features(images, outputs)
            for name in members:
                self.metrics[name].update_features(feats[_inception_output(self.metrics[name])], **kw)

    @torch.no_grad()
    def run(self) -> dict[str, Any]:
        cfg, b = self.cfg, self.cfg.batch_size
        by = {
            m: [n for n, mode in self.mode.items() if mode == m]
            for m in ("statistics", "real", "samples", "paired")
        }
        unpaired = by["statistics"] + by["real"] + by["samples"]
        n_samples = n_reference = 0
        if by["paired"]:
            pairs = itertools.zip_longest(self.samples.batches(b), self.reference.batches(b))
            for fake, real in progress_bar(pairs, desc="paired", unit="batch"):
                if fake is None or real is None or fake.shape != real.shape:
                    counted = n_samples + (0 if fake is None else len(fake))
                    raise DataError(
                        f"paired metrics {by['paired']} need samples ({cfg.samples}) and reference "
                        f"({cfg.reference}) of one size and order; they differ after {counted} sample(s): "
                        f"batch {_shape(fake)} against {_shape(real)}"
                    )
                for name in by["paired"]:
                    self.metrics[name].update(fake, real)
                n_samples += fake.shape[0]
                n_reference += real.shape[0]
        if unpaired:
            n_samples = 0  # the paired pass counted the same images
            for fake in progress_bar(self.samples.batches(b), desc="samples", unit="batch"):
                self._update(unpaired, fake)
                n_samples += fake.shape[0]
        if by["real"]:
            n_reference = 0
            for real in progress_bar(self.reference.batches(b), desc="reference", unit="batch"):
                self._update(by["real"], real, real=True)
                n_reference += real.shape[0]
        results: dict[str, Any] = {}
        for name, metric in self.metrics.items():
            value = metric.compute()
            results[name] = value if isinstance(value, dict) else float(value)
        self.report = {
            "samples": str(cfg.samples),
            "reference": cfg.reference,
            "num_samples": n_samples,
            "num_reference": n_reference,
            "protocol": cfg.protocol,
            "modes": self.mode,
            "metrics": results,
            "skipped": {
                "samples": self.samples.skipped,
                "reference": self.reference.skipped if self.reference else [],
            },
        }
        if self.paper:
            ours = _flat(results)
            self.report["paper"] = self.paper
            self.report["ours"] = {k: ours[k] for k in self.paper if k in ours}
        return self.report

    def save(self) -> None:
        path = Path(self.cfg.report) if self.cfg.report else self.run_dir / "evaluation.json"
        write_report(path, self.report)
        for name, value in self.report["metrics"].items():
            log.info("%s: %s", name, value)
        if self.paper:
            log.info("%s", _comparison(self.report["paper"], self.report["ours"]))
        log.info("report written to %s", path)

    def cleanup(self) -> None:
        self.logger.close()
        distributed.cleanup()


def _paper(samples: Path) -> dict[str, Any]:
    """The ``paper`` block of the ``protocol.json`` that ``sample`` wrote beside ``samples`` (the
    ``.npz``, or the ``images`` folder inside its run folder); empty when there is none."""
    places = [samples.parent] if samples.is_file() else [samples, samples.parent]
    for folder in places:
        path = folder / PROTOCOL_FILE
        if path.is_file():
            try:
                paper = json.loads(path.read_text()).get("paper") or {}
            except (json.JSONDecodeError, AttributeError) as err:
                raise ConfigError(f"{path} is not the protocol.json that sample writes: {err}") from err
            log.info("comparing with the paper's figure in %s", path)
            return dict(paper)
    return {}


def _flat(results: dict[str, Any]) -> dict[str, float]:
    """Each metric's value by its name, and each entry of a metric's dict by its key."""
    flat: dict[str, float] = {}
    for name, value in results.items():
        if isinstance(value, dict):
            flat.update(value)
        else:
            flat[name] = value
    return flat


def _comparison(paper: dict[str, Any], ours: dict[str, float]) -> str:
    """One line: ours against the paper's figure, key by key, with the paper's source."""
    source = f" ({paper['source']})" if paper.get("source") else ""
    if not ours:
        numbers = [k for k, v in paper.items() if isinstance(v, (int, float))]
        return f"the paper's figure{source} names {numbers}, none of them among the metrics computed"
    parts = [f"{k} ours {float(v):.4g} vs paper {paper[k]}" for k, v in ours.items()]
    return f"{'; '.join(parts)}{source}"


def _shape(batch: torch.Tensor | None) -> str:
    return "(none left)" if batch is None else str(tuple(batch.shape))
