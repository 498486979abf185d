"""train-generator: a generator on the latents or tokens of a frozen tokenizer, encoded on the fly or cached.

    latentforge run train-generator --config rae-ditdh-xl data.root=/data/imagenet/train
    latentforge run train-generator --config tiny-rae data.name=latents data.root=runs/cache-latents
    torchrun --nproc-per-node 8 -m latentforge_runner.cli run train-generator --config vavae-lightningdit-xl

Continuous tokenizers (RAE, VA-VAE) give normalised latents ``[B, C, h, w]`` to a flow generator
(DiT, LightningDiT, DiT-DH), which receives ``in_channels``/``input_size``/``num_classes``; discrete
ones (K-Means, VQGAN) give token grids ``[B, h, w]`` to GPT/MaskGIT, which receive ``vocab_size``/
``grid_size``/``num_classes``.  With ``data.name: latents`` the run reads the shards ``cache-latents``
wrote (``data.root``, flipped copies included when cached) instead of encoding images.  Every
``eval.every`` steps a class-balanced grid of samples from the EMA goes to TensorBoard and ``samples/``,
and with ``eval.fid_samples`` an online FID (``eval/<metric>`` in TensorBoard and ``metrics.jsonl``).

DiGIT's stage 2 is a ``condition_tokenizer`` block: the generator (``digit-stage2-*``) learns the codes
of ``tokenizer`` (the VQGAN) conditioned on the K-Means tokens of the same image instead of a class
label, and receives ``cond_vocab_size``/``cond_grid_size`` too; ``sample`` chains it after stage 1.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Literal

import attrs
import torch
from einops import rearrange
from PIL import Image

from latentforge_core import registry
from latentforge_core.checkpoint import CheckpointError, load_checkpoint, load_into
from latentforge_runner import distributed
from latentforge_runner.config import Component, ConfigError, Settings, component, settings
from latentforge_runner.data import DataError, build_dataset, collate
from latentforge_runner.recipes import RunSettings, open_run
from latentforge_runner.training import Trainer, TrainingSettings
from latentforge_tokenizers.stats import LatentStats

log = logging.getLogger("latentforge")

STATS_FILE = "latent_stats.safetensors"  # in the run folder: the statistics the generator was trained on


@settings
class DataSettings(Settings):
    name: Literal["digits", "folder", "latents"] = "folder"
    root: str | None = None  # ImageNet layout root/<class>/*.JPEG; for latents, a cache-latents folder
    image_size: int = 256
    num_classes: int = 1000
    crop: Literal["center", "random"] = "center"  # ADM center crop, or short side → resize, random crop
    resize: int | None = None  # random crop: the short side first goes to this (None: image_size)
    flip: bool = False  # random horizontal flip (RAE stage 2, LightningDiT, DiGIT)


@settings
class EvalSettings(Settings):
    every: int = 0  # steps between sample grids (0: only at the end)
    num_samples: int = 16
    sampler: dict = attrs.field(factory=dict)  # keyword arguments of generator.sample
    stats_batches: int = 16  # batches for latent statistics when the tokenizer has none
    stats_reduce: Literal["channel", "element"] = "element"  # RAE: per element; VA-VAE: per channel
    guidance_model: Component | None = component(
        "generators", default=None, injected=("in_channels", "input_size", "num_classes")
    )
    guidance_weights: str | None = None  # the weak model's EMA weights (our safetensors) for autoguidance
    # Online FID every ``every`` steps (and at the end) on ``fid_samples`` class-balanced EMA samples
    # against ``fid_reference``: an ADM-style .npz (mu/sigma statistics, or arr_0 images) or an image
    # folder.  ``fid_metric`` is any registered Fréchet metric: fid (Inception), or fd-dinov2 whose
    # ``fid_params.encoder`` names the feature network.
    fid_samples: int = 0  # 0: no online FID
    fid_reference: str | None = None
    fid_metric: str = "fid"
    fid_params: dict = attrs.field(factory=dict)
    fid_batch_size: int = 64

    def __attrs_post_init__(self):
        if self.fid_samples < 0 or self.fid_batch_size < 1:
            raise ValueError(
                f"eval.fid_samples must be ≥ 0 and eval.fid_batch_size ≥ 1, got {self.fid_samples}, "
                f"{self.fid_batch_size}"
            )
        if self.fid_samples and not self.fid_reference:
            raise ValueError("eval.fid_samples > 0 needs eval.fid_reference: an .npz or an image folder")


@settings
class TrainGeneratorSettings(Settings):
    run: RunSettings = RunSettings(output_dir="runs/train-generator")
    data: DataSettings = DataSettings()
    tokenizer: Component = component("tokenizers")
    generator: Component = component(
        "generators",
        injected=(
            "in_channels",
            "input_size",
            "num_classes",
            "vocab_size",
            "grid_size",
            "cond_vocab_size",
            "cond_grid_size",
        ),
    )
    # DiGIT stage 2: the tokens that condition the generator (K-Means), in place of class labels.
    condition_tokenizer: Component | None = component("tokenizers", default=None)
    training: TrainingSettings = TrainingSettings()
    eval: EvalSettings = EvalSettings()


def generator_shapes(tokenizer, num_classes: int, condition=None) -> dict[str, Any]:
    """What the generator builder receives from the tokenizer(s): latent or token-grid shape, and
    the classes, or (stage 2) the conditioning tokens' vocabulary and grid."""
    if tokenizer.vocab_size is None:
        c, h, _ = tokenizer.latent_shape
        return dict(in_channels=c, input_size=h, num_classes=num_classes)
    shape = dict(vocab_size=tokenizer.vocab_size, grid_size=tuple(tokenizer.latent_shape[-2:]))
    if condition is None:
        return shape | dict(num_classes=num_classes)
    return shape | dict(
        cond_vocab_size=condition.vocab_size, cond_grid_size=tuple(condition.latent_shape[-2:])
    )


def build_training_data(d: DataSettings, tokenizer: str, seed: int):
    """Images (``digits``, ``folder``, augmented by ``seed``) or the latent shards of ``tokenizer``."""
    if d.name != "latents":
        return build_dataset(
            d.name, image_size=d.image_size, root=d.root, crop=d.crop, resize=d.resize, flip=d.flip, seed=seed
        )
    from latentforge_runner.recipes.cache_latents import LatentShards  # it imports DataSettings from here

    if not d.root:
        raise DataError("data.name 'latents' needs data.root: a folder written by cache-latents")
    shards = LatentShards(d.root, flip=None)
    if shards.tokenizer != tokenizer:
        raise DataError(
            f"the shards in {d.root} hold latents of tokenizer {shards.tokenizer!r}, but this run's "
            f"tokenizer is {tokenizer!r}; cache them with the same tokenizer"
        )
    return shards


def autoguidance(
    block: Component | None, weights: str | None, tokenizer, num_classes: int, device: torch.device
) -> dict[str, Any]:
    """``generator.sample`` keywords for autoguidance by the weak model ``block`` (its EMA ``weights``,
    our safetensors), or nothing without a block; ``sample`` uses this too."""
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


def fit_latent_stats(tokenizer, dataset, num_batches: int, reduce: str, device: torch.device) -> int:
    """Set ``tokenizer``'s latent statistics from the first ``num_batches`` × 64 images (or cached
    latents, flips excluded); returns the count.

    ``sample`` calls this too, so it recomputes exactly the statistics the generator was trained on.
    """
    from latentforge_tokenizers.stats import compute_latent_stats

    cached = getattr(dataset, "values", None)  # LatentShards: raw latents in data set order
    n = min(len(dataset) if cached is None else len(cached), num_batches * 64)
    if cached is not None:
        batches = (cached[s : s + 64].to(device) for s in range(0, n, 64))
        encode = lambda z: z  # noqa: E731
    else:
        batches = (
            torch.stack([dataset[i]["image"] for i in range(s, min(s + 64, n))]).to(device)
            for s in range(0, n, 64)
        )
        encode = tokenizer.encode
    tokenizer.set_stats(compute_latent_stats(encode, batches, reduce=reduce))
    return n


class TrainGeneratorRecipe:
    Settings = TrainGeneratorSettings

    def __init__(self, config: TrainGeneratorSettings):
        self.cfg = config

    def setup(self) -> None:
        cfg = self.cfg
        self.run_dir, self.dist, self.logger = open_run("train-generator", cfg)
        self.device = self.dist.device
        self.dataset = build_training_data(cfg.data, cfg.tokenizer.name, cfg.training.seed)
        self.cached = cfg.data.name == "latents"
        self.tokenizer = self._frozen(cfg.tokenizer)
        self.discrete = self.tokenizer.vocab_size is not None
        self.condition = None if cfg.condition_tokenizer is None else self._frozen(cfg.condition_tokenizer)
        if self.condition is not None and (
            not self.discrete or self.condition.vocab_size is None or self.cached
        ):
            raise ConfigError(
                "condition_tokenizer (DiGIT stage 2) pairs two discrete tokenizers over the same images: "
                f"got tokenizer {cfg.tokenizer.name!r} ({'discrete' if self.discrete else 'continuous'}), "
                f"condition_tokenizer {cfg.condition_tokenizer.name!r}, data.name {cfg.data.name!r} "
                "(expected images, not cached latents)"
            )
        if self.cached and tuple(self.dataset.values.shape[1:]) != tuple(self.tokenizer.latent_shape):
            raise DataError(
                f"the cached {self.dataset.key} have shape {tuple(self.dataset.values.shape[1:])}, "
                f"but tokenizer {cfg.tokenizer.name!r} gives {tuple(self.tokenizer.latent_shape)}"
            )
        if not self.discrete:
            self._latent_stats()
        torch.manual_seed(cfg.run.seed)  # every process builds the same initial weights
        shape = generator_shapes(self.tokenizer, cfg.data.num_classes, self.condition)
        self.generator = cfg.generator.build("generators", **shape)
        self.trainer = Trainer(
            self.generator,
            cfg.training,
            run_dir=self.run_dir,
            num_items=len(self.dataset),
            dist=self.dist,
            logger=self.logger,
            forward="loss",
            model_config={"name": cfg.generator.name, **cfg.generator.params, **shape},
        )
        if cfg.run.resume:
            self.trainer.resume()

    def _frozen(self, block: Component) -> torch.nn.Module:
        """A tokenizer in eval mode without gradients; one with random (test) weights is the same on
        every process and for ``sample``, which seeds alike before building it."""
        torch.manual_seed(self.cfg.run.seed)
        return block.build("tokenizers").to(self.device).eval().requires_grad_(False)

    def _latent_stats(self) -> None:
        """The run folder's statistics (a resumed run), else the tokenizer's own, else computed; then
        saved in the run folder, where ``sample`` reads them."""
        path = self.run_dir / STATS_FILE
        if path.is_file():
            self.tokenizer.set_stats(LatentStats.load(path))
            log.info("latent statistics read from %s", path)
        elif getattr(self.tokenizer, "stats", None) is None:
            e = self.cfg.eval
            n = fit_latent_stats(self.tokenizer, self.dataset, e.stats_batches, e.stats_reduce, self.device)
            log.info("latent statistics (per %s) computed on %d images", e.stats_reduce, n)
        if self.dist.is_main and not path.is_file():
            self.tokenizer.stats.save(path)

    @torch.no_grad()
    def inputs(self, batch: dict[str, Any]) -> torch.Tensor:
        """The generator's targets: normalised latents or token grids, encoded now or read from the cache.

        Contiguous, so that noise drawn ``randn_like`` them is the same on both paths."""
        if self.cached:
            z = batch[self.dataset.key]
            z = z if self.discrete else self.tokenizer.stats.normalize(z)
        elif self.discrete:
            z = self.tokenizer.encode(batch["image"])
        else:
            z = self.tokenizer.encode(batch["image"], normalize=True)
        return z.contiguous()

    @torch.no_grad()
    def conditions(self, batch: dict[str, Any]) -> torch.Tensor:
        """Class labels, or (stage 2) the condition tokenizer's tokens of the same images."""
        return batch["label"] if self.condition is None else self.condition.encode(batch["image"])

    def loss_fn(self, model, batch: dict[str, Any]) -> torch.Tensor:
        return model(self.inputs(batch), self.conditions(batch))

    def run(self) -> dict[str, Any]:
        def on_step(trainer: Trainer) -> None:
            if self.cfg.eval.every and trainer.step % self.cfg.eval.every == 0:
                self.sample_grid(trainer.step)
                self.online_fid(trainer.step)

        data = self.dataset.batch if self.cached else self.dataset  # the shards live in memory
        return self.trainer.fit(data, self.loss_fn, on_step=on_step, desc="generator")

    def _conditions_for(self, index: torch.Tensor) -> torch.Tensor:
        """Class-balanced labels, or (stage 2) the K-Means tokens of data set images ``index``."""
        if self.condition is None:
            return index % self.cfg.data.num_classes
        images = collate([self.dataset[int(i) % len(self.dataset)] for i in index])["image"]
        return self.conditions({"image": images.to(self.device)})

    @torch.no_grad()
    def generate(self, y: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] ``[B, 3, H, W]`` from the EMA for conditions ``y`` (the model goes back to
        training mode; callers keep the training RNG aside)."""
        model = self.trainer.eval_model()
        try:
            guide = {} if self.discrete else self._guidance()
            out = model.sample(y.to(self.device), **self.cfg.eval.sampler, **guide)
            decoded = (
                self.tokenizer.decode(out) if self.discrete else self.tokenizer.decode(out, normalize=True)
            )
        finally:
            self.trainer.model.train()
        return decoded.float().clamp(0, 1)

    def sample_grid(self, step: int) -> None:
        """Class-balanced samples from the EMA → TensorBoard and ``samples/<step>.png``."""
        if not self.dist.is_main or not hasattr(self.tokenizer, "decode"):
            return  # K-Means tokens decode through a second stage (digit-stage2), not here
        n, k = self.cfg.eval.num_samples, self.cfg.data.num_classes
        index = torch.arange(n) if self.condition is not None else torch.arange(n) * max(1, k // n)
        with _rng_kept():  # sampling must not move the training RNG
            images = self.generate(self._conditions_for(index)).cpu()
        cols = int(n**0.5)
        grid = rearrange(images[: cols * (n // cols)], "(r c) ch h w -> ch (r h) (c w)", c=cols)
        self.logger.images("samples", grid, step)
        (self.run_dir / "samples").mkdir(exist_ok=True)
        Image.fromarray((grid.permute(1, 2, 0) * 255).round().byte().numpy()).save(
            self.run_dir / "samples" / f"{step:08d}.png"
        )

    # -------------------------------------------------------------------------------- online FID
    def _setup_fid(self) -> None:
        """The metric and its reference, once: statistics from the .npz when it holds them (FID), else
        the reference images' features (kept as fixed statistics)."""
        from latentforge_metrics.generative import FID, FrechetMetric
        from latentforge_metrics.npz import ReferenceFileError, load_reference
        from latentforge_metrics.stats import GaussianStats
        from latentforge_runner.recipes.evaluate import ImageSource, _accepts

        e = self.cfg.eval
        if not hasattr(self.tokenizer, "decode"):
            raise ConfigError(
                f"eval.fid_samples: tokenizer {self.cfg.tokenizer.name!r} has no pixel decoder to make "
                "images from (K-Means tokens decode through stage 2; measure FID with sample + evaluate)"
            )
        try:
            factory = registry.metrics.get(e.fid_metric)
        except registry.RegistryError as err:
            raise ConfigError(f"eval.fid_metric: {err}") from err
        injected = {"device": self.device} if _accepts(factory, "device") else {}
        metric = registry.metrics.build(e.fid_metric, **injected, **e.fid_params)
        if not isinstance(metric, FrechetMetric):
            raise ConfigError(
                f"eval.fid_metric {e.fid_metric!r} is not a Fréchet distance (fid, fd-dinov2, …); "
                "other metrics run in evaluate"
            )
        source = ImageSource(e.fid_reference, self.cfg.data.image_size, "eval.fid_reference")
        stats = None
        if source.folder is None and isinstance(metric, FID):
            try:
                stats = getattr(load_reference(source.path), metric.reference_key)
            except ReferenceFileError:  # a sample-style batch: images only
                stats = None
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
        self._fid = metric

    @torch.no_grad()
    def online_fid(self, step: int) -> float | None:
        """``eval.fid_samples`` class-balanced samples (split over the processes, the same noise at
        every evaluation) → the metric against the reference; logged as ``eval/<metric>``."""
        e = self.cfg.eval
        if not e.fid_samples or getattr(self, "_fid_step", None) == step:
            return None
        mine = torch.arange(self.dist.rank, e.fid_samples, self.dist.world_size)
        with _rng_kept():  # building the metric (random test weights) and sampling draw from it too
            if not hasattr(self, "_fid"):
                self._setup_fid()
            self._fid.reset()
            torch.manual_seed(self.cfg.run.seed + 7919 * self.dist.rank)  # the same draws at every evaluation
            for index in mine.split(e.fid_batch_size):
                images = self.generate(self._conditions_for(index))
                self._fid.update((images * 255).round().to(torch.uint8))  # as the samples' .npz holds them
        value = float(self._fid.compute())
        self._fid_step = step
        self.logger.scalars({f"eval/{e.fid_metric}": value}, step)
        log.info("step %d: %s %.4f on %d samples", step, e.fid_metric, value, e.fid_samples)
        return value

    def _guidance(self) -> dict[str, Any]:
        """Autoguidance keywords, built once from ``eval.guidance_model``."""
        if not hasattr(self, "_guide"):
            e = self.cfg.eval
            self._guide = autoguidance(
                e.guidance_model, e.guidance_weights, self.tokenizer, self.cfg.data.num_classes, self.device
            )
        return self._guide

    def save(self) -> None:
        self.sample_grid(self.trainer.step)
        self.online_fid(self.trainer.step)

    def cleanup(self) -> None:
        self.logger.close()
        distributed.cleanup()


@contextlib.contextmanager
def _rng_kept():
    """Evaluation draws from the global RNGs without moving the training run's."""
    state = torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        yield
    finally:
        torch.set_rng_state(state)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)
