"""What the generator recipes share: the shapes a generator is built with, its run's evaluation
settings (sample grids, online FID, autoguidance), loading it back from a run folder, image grids.

``train-generator``, ``train-tokens`` and ``train-stage2`` write run folders that ``sample`` reads;
the pieces below are the parts of that contract they have in common.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

import attrs
import numpy as np
import torch
from einops import rearrange
from PIL import Image

from latentforge_core import registry
from latentforge_core.checkpoint import CheckpointError, load_checkpoint, load_into
from latentforge_core.device import seed_everything
from latentforge_runner import distributed
from latentforge_runner.config import (
    Component,
    ConfigError,
    SettingError,
    Settings,
    accepts,
    component,
    sampler_block,
    setting,
    settings,
    to_plain,
)
from latentforge_runner.data import ImageSource, reference_statistics
from latentforge_runner.training import list_checkpoints, load_weights

log = logging.getLogger("latentforge")

# The run-folder recipes whose generators ``sample`` reads.
GENERATOR_RECIPES = ("train-generator", "train-tokens", "train-stage2")
NOISE_STREAM = 1  # keeps a sample's starting noise apart from the draws seeded by its batch's first index


# ------------------------------------------------------------------------------------------------
# Settings
# ------------------------------------------------------------------------------------------------
@settings
class EvalSettings(Settings):
    """The ``eval`` block of a generator run: sample grids, the sampler ``sample`` uses by default,
    autoguidance, latent statistics and online FID."""

    every: int = setting(0, ge=0)  # steps between sample grids (0: only at the end)
    num_samples: int = setting(16, ge=1)  # images in each sample grid
    sampler: dict = sampler_block("generator")  # keyword arguments of generator.sample
    stats_batches: int = setting(16, ge=1)  # batches for latent statistics when the tokenizer has none
    stats_reduce: Literal["channel", "element"] = "element"  # RAE: per element; VA-VAE: per channel
    guidance_model: Component | None = component(
        "generators", default=None, injected=("in_channels", "input_size", "num_classes")
    )
    guidance_weights: str | None = None  # the weak model's EMA weights (our safetensors) for autoguidance
    # Online FID every ``every`` steps (and at the end) on ``fid_samples`` class-balanced EMA samples
    # against ``fid_reference``: an ADM-style .npz (mu/sigma statistics, or arr_0 images) or an image
    # folder.  ``fid_metric`` is any registered Fréchet metric: fid (Inception), or fd-dinov2 whose
    # ``fid_params.encoder`` names the feature network.
    fid_samples: int = setting(0, ge=0)  # 0: no online FID
    fid_reference: str | None = None  # an ADM-style .npz or an image folder (needed when fid_samples > 0)
    fid_metric: str = "fid"  # a registered Fréchet metric: fid or fd-dinov2
    fid_params: dict = attrs.field(factory=dict)  # keyword arguments of the metric (e.g. encoder)
    fid_batch_size: int = setting(64, ge=1)  # images per batch when sampling and measuring

    def __attrs_post_init__(self):
        if self.fid_samples and not self.fid_reference:
            raise SettingError(
                "fid_samples",
                f"{self.fid_samples} samples for online FID needs eval.fid_reference: expected an .npz "
                "or an image folder",
            )

    def due(self, step: int) -> bool:
        return bool(self.every) and step % self.every == 0


@settings
class AlignmentSettings(Settings):
    """REPA: block ``depth``'s tokens aligned to a frozen encoder's patch features of the same images."""

    encoder: Component = component("encoders")  # the frozen encoder (REPA: DINOv2-B/14, 224 px input)
    depth: int = setting(8, ge=1)  # the block (counted from 1) whose output tokens are aligned
    weight: float = setting(0.5, ge=0)  # λ: total loss = flow loss + λ · (−cosine similarity)
    projector_dim: int = setting(2048, ge=1)  # the width of REPA's 3-layer MLP projector


# ------------------------------------------------------------------------------------------------
# Building generators
# ------------------------------------------------------------------------------------------------
def generator_shapes(tokenizer, num_classes: int, condition=None) -> dict[str, Any]:
    """What the generator builder receives from the tokenizer(s): latent or token-grid shape, and
    the classes, or (DiGIT stage 2) the conditioning tokens' vocabulary and grid."""
    if tokenizer.vocab_size is None:
        c, h, _ = tokenizer.latent_shape
        return dict(in_channels=c, input_size=h, num_classes=num_classes)
    shape = dict(vocab_size=tokenizer.vocab_size, grid_size=tuple(tokenizer.latent_shape[-2:]))
    if condition is None:
        return shape | dict(num_classes=num_classes)
    return shape | dict(
        cond_vocab_size=condition.vocab_size, cond_grid_size=tuple(condition.latent_shape[-2:])
    )


def initial_noise(seed: int, indices: range, shape: tuple[int, ...]) -> torch.Tensor:
    """A flow sampler's starting noise ``[len(indices), *shape]``: sample i's from (``seed``, i) alone,
    drawn on the CPU, so it is the same in any batch, on any process and on any device."""
    out = torch.empty(len(indices), *shape)
    for row, i in zip(out, indices, strict=True):
        state = np.random.SeedSequence([seed, i, NOISE_STREAM]).generate_state(1)[0]
        torch.randn(shape, generator=torch.Generator().manual_seed(int(state)), out=row)
    return out


def build_alignment(a: AlignmentSettings, generator: torch.nn.Module, device: torch.device):
    """(the frozen encoder, REPA around ``generator``) of an ``alignment`` block, with a warning when
    the encoder's feature grid is not the generator's token grid (it is then resampled)."""
    from latentforge_generators.repa import REPA

    encoder = a.encoder.build("encoders").to(device).eval().requires_grad_(False)
    repa = REPA(generator, encoder.embed_dim, a.depth, a.weight, a.projector_dim)
    _, h, w = generator.input_shape
    patch = getattr(generator.backbone, "patch_size", None)
    grid = tuple(encoder.feature_shape()[-2:]) if hasattr(encoder, "feature_shape") else None
    if patch and grid and grid != (h // patch, w // patch):
        log.warning(
            "alignment: the encoder's %s feature grid is resampled to the generator's %s token grid; "
            "REPA gives the encoder the image size whose grid matches (DINOv2: 448 px at 512): set "
            "alignment.encoder.params.image_size",
            "×".join(map(str, grid)), f"{h // patch}×{w // patch}",
        )  # fmt: skip
    return encoder, repa.to(device)


def check_image_size(tokenizer, image_size: int, name: str) -> None:
    """A tokenizer decodes to its own image size; training at another ``data.image_size`` would make
    samples of another size than the data (the encoder resizes its input silently)."""
    size = tokenizer.preprocessing.input_size
    if tokenizer.can_decode and size != image_size:
        raise ConfigError(
            f"data.image_size is {image_size}, but tokenizer {name!r} encodes and decodes {size}-pixel "
            f"images (its samples would come out at {size} px): set data.image_size={size}"
        )


def frozen_tokenizer(block: Component, seed: int, device: torch.device) -> torch.nn.Module:
    """A tokenizer in eval mode without gradients.  Seeded before building, so one with random (test)
    weights is the same on every process and in ``sample``, which seeds alike."""
    seed_everything(seed)
    return block.build("tokenizers").to(device).eval().requires_grad_(False)


def autoguidance(
    block: Component | None, weights: str | None, tokenizer, num_classes: int, device: torch.device
) -> dict[str, Any]:
    """``generator.sample`` keywords for autoguidance by the weak model ``block`` (its EMA ``weights``,
    our safetensors), or nothing without a block."""
    if block is None:
        return {}
    guide = block.build("generators", **generator_shapes(tokenizer, num_classes))
    if weights:
        try:
            load_into(guide, load_checkpoint(weights)[0])
        except CheckpointError as err:
            raise CheckpointError(f"guidance_weights {weights} for {block.name!r}: {err}") from err
    else:
        log.warning(
            "autoguidance by %s with random weights: set guidance_weights to its trained EMA", block.name
        )
    return {"guidance": "autoguidance", "guidance_model": guide.to(device).eval()}


def load_generator(
    run: Path, train: Any, checkpoint: str | None, weights: str, shape: dict[str, Any]
) -> torch.nn.Module:
    """The generator of a run folder (settings ``train``) with its ``weights`` (``ema`` or ``model``)
    from ``checkpoint`` or the run's newest whole checkpoint; its saved shapes must equal ``shape``."""
    if checkpoint is not None:
        folder = Path(checkpoint)
    else:
        found = list_checkpoints(run / "checkpoints")
        if not found:
            raise CheckpointError(f"{run / 'checkpoints'} holds no whole checkpoint to sample from")
        folder = found[-1]
    if weights == "ema" and train.training.ema_decay is None:
        weights = "model"  # a run without EMA (DiGIT's recipe)
    try:
        sd, config = load_weights(folder, weights)  # a full checkpoint's file, or a sharded one's DCP folder
    except FileNotFoundError as err:
        raise CheckpointError(f"{err}: expected a checkpoint folder of a generator run") from err
    name = train.generator.name
    if config.get("name") not in (None, name):
        raise CheckpointError(f"{folder} is a checkpoint of {config.get('name')!r}, the run trains {name!r}")
    for key, value in shape.items():  # e.g. stage 1's tokens against what stage 2 was trained on
        saved = config.get(key)
        if saved is not None and to_plain(saved) != to_plain(value):
            raise CheckpointError(
                f"{folder} was trained with {key}={saved!r}, but the tokenizers here give {key}={value!r}"
            )
    generator = train.generator.build("generators", **shape)
    try:
        load_into(generator, sd)
    except CheckpointError as err:
        raise CheckpointError(f"{folder / f'{weights}.safetensors'}: {err}") from err
    log.info("sampling %s from %s (%s weights, step %s)", name, folder, weights, config.get("step"))
    return generator


# ------------------------------------------------------------------------------------------------
# Evaluation during training
# ------------------------------------------------------------------------------------------------
def balanced_labels(n: int, num_classes: int) -> torch.Tensor:
    """``n`` labels spread over the classes (every ``K // n``-th class when ``n < K``)."""
    return torch.arange(n) * max(1, num_classes // n) % num_classes


def save_grid(images: torch.Tensor, logger: Any, run_dir: Path, step: int) -> None:
    """A square grid of ``images`` ([0, 1] ``[N, 3, H, W]``) → TensorBoard and ``samples/<step>.png``."""
    n = images.shape[0]
    cols = int(n**0.5)
    grid = rearrange(images[: cols * (n // cols)], "(r c) ch h w -> ch (r h) (c w)", c=cols)
    logger.images("samples", grid, step)
    (run_dir / "samples").mkdir(exist_ok=True)
    Image.fromarray((grid.permute(1, 2, 0) * 255).round().byte().numpy()).save(
        run_dir / "samples" / f"{step:08d}.png"
    )


def image_grid(images: torch.Tensor, columns: int) -> Image.Image:
    """``[N, 3, H, W]`` in [0, 1] → one PIL image, ``columns`` wide (the last row padded with black)."""
    rows = math.ceil(images.shape[0] / columns)
    pad = rows * columns - images.shape[0]
    images = torch.cat([images, images.new_zeros(pad, *images.shape[1:])])
    grid = rearrange(images.clamp(0, 1), "(r c) ch h w -> (r h) (c w) ch", c=columns)
    return Image.fromarray((grid * 255).round().byte().numpy())


class OnlineFID:
    """A registered Fréchet metric (``eval.fid_metric``) of a training run's samples, logged as
    ``eval/<metric>``.  Its reference is fixed at the first measurement: statistics from the .npz when
    it holds them (FID), else the reference images' features."""

    def __init__(self, e: EvalSettings, image_size: int, dist: distributed.DistInfo, seed: int, logger: Any):
        self.e, self.image_size, self.dist, self.seed, self.logger = e, image_size, dist, seed, logger
        self.metric: Any = None
        self.measured_at: int | None = None

    def _build(self) -> Any:
        from latentforge_metrics.generative import FID, FrechetMetric
        from latentforge_metrics.stats import GaussianStats

        e = self.e
        try:
            factory = registry.metrics.get(e.fid_metric)
        except registry.RegistryError as err:
            raise ConfigError(f"eval.fid_metric: {err}") from err
        injected = {"device": self.dist.device} if accepts(factory, "device") else {}
        metric = registry.metrics.build(e.fid_metric, **injected, **e.fid_params)
        if not isinstance(metric, FrechetMetric):
            raise ConfigError(
                f"eval.fid_metric {e.fid_metric!r} is not a Fréchet distance (fid, fd-dinov2, …); "
                "other metrics run in evaluate"
            )
        source = ImageSource(e.fid_reference, self.image_size, "eval.fid_reference")
        stats = None
        if source.folder is None and isinstance(metric, FID):
            reference = reference_statistics(source.path)  # None: a sample-style file of images only
            stats = None if reference is None else getattr(reference, metric.reference_key)
        if stats is None:
            n = 0
            for real in source.batches(e.fid_batch_size):
                metric.update(real, real=True)
                n += len(real)
            real = metric.real  # this process's own pass over every reference image, not gathered
            stats = GaussianStats.from_moments(real.mu, real.sigma, n=real.n)
            metric.reset()
            log.info("online %s: reference features of %d images from %s", e.fid_metric, n, source.path)
        metric.set_reference(stats)
        return metric

    @torch.no_grad()
    def __call__(self, step: int, generate: Callable[[torch.Tensor], torch.Tensor]) -> float | None:
        """Measure at ``step`` (once): ``eval.fid_samples`` samples ``generate(indices)`` (images in
        [0, 1]), split over the processes with the same noise at every evaluation.  Callers keep the
        training RNG aside (:func:`rng_kept`): building the metric and sampling draw from it."""
        e = self.e
        if not e.fid_samples or self.measured_at == step:
            return None
        self.metric = self.metric or self._build()
        self.metric.reset()
        torch.manual_seed(self.seed + 7919 * self.dist.rank)
        for index in torch.arange(self.dist.rank, e.fid_samples, self.dist.world_size).split(
            e.fid_batch_size
        ):
            images = generate(index)
            self.metric.update((images * 255).round().to(torch.uint8))  # as the samples' .npz holds them
        value = float(self.metric.compute())
        self.measured_at = step
        self.logger.scalars({f"eval/{e.fid_metric}": value}, step)
        log.info("step %d: %s %.4f on %d samples", step, e.fid_metric, value, e.fid_samples)
        return value


@contextlib.contextmanager
def rng_kept() -> Iterator[None]:
    """Evaluation draws from the global RNGs without moving the training run's."""
    state = torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        yield
    finally:
        torch.set_rng_state(state)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)
