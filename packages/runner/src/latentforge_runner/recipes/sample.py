"""sample: class-conditional samples of a trained generator → PNG files, an image grid and an ADM ``.npz``.

    latentforge run sample generator_run=runs/tiny-rae num_samples=100 labels=equal
    latentforge run sample generator_run=runs/rae-ditdh-xl num_samples=50000 \\
        guidance_weights=/weights/ditdh-s-ema.safetensors

The generator, its shapes and the tokenizer come from the ``train-generator`` run folder (its
``config.yaml`` and newest whole checkpoint, EMA weights by default), or from released files: a
registered generator with ``generator.params.pretrained`` (a path or ``hf:<org>/<repo>/<file>`` id of
the official checkpoint) over the tokenizer it was trained on, whose statistics come with it::

    latentforge run sample generator.name=ditdh-xl generator.params.pretrained=/w/stage2_model.pt \
        tokenizer.name=rae tokenizer.params.stats=/w/stat.pt num_classes=1000 sampler='{steps: 49}'

A run whose ``eval.guidance_model`` names a weak generator (RAE: DiT-DH-S) samples with autoguidance at
``sampler.cfg_scale`` (1.42 in rae-ditdh-xl); ``guidance_model``/``guidance_weights`` override it.
Labels are ``equal`` (the same count per class, cycling 0, 1, …, K−1 so a grid of K columns shows one
class per column) or ``random``.  Writes ``images/<index>.png``, ``grid.png`` and ``samples.npz``
(``arr_0`` uint8 ``[N, H, W, 3]``, ``arr_1`` labels), the file ``evaluate`` and the ADM evaluator read.

Samples are made in shards of ``shard_size`` (``shards/<first index>.npz``, each written whole or not
at all, under the plan in ``manifest.json``); under ``torchrun`` each process takes its share of the
shards.  A killed run, rerun with the same settings, samples only the missing shards.  A flow
generator's starting noise is drawn per sample index from (``run.seed``, index), and every other draw
(SDE noise, token sampling) per batch from (``run.seed``, its first index), batches never crossing a
shard: ``samples.npz`` is byte for byte the same for any number of processes and interruptions (and,
for the ODE samplers, the same noise for any ``batch_size``)::

    torchrun --nproc-per-node 8 -m latentforge_runner.cli run sample generator_run=runs/rae-ditdh-xl

A ``paper`` block (the ``repro-*`` configs: one per published figure, the official protocol of the
released files) is copied into ``protocol.json`` beside ``samples.npz``, where ``evaluate`` finds it
and reports ours beside the paper's figure:

    latentforge run sample --config repro-rae-ditdh-xl-256-ag generator.params.pretrained=... \\
        tokenizer.params.pretrained_decoder=... tokenizer.params.stats=... \\
        guidance_model.params.pretrained=...

DiGIT samples in two stages: ``generator_run`` (the GPT over K-Means tokens) gives token grids,
``stage2_run`` (a run with a ``condition_tokenizer``) turns them into VQGAN codes, its VQGAN decodes:

    latentforge run sample generator_run=runs/digit-base-gpt stage2_run=runs/digit-base-stage2
"""

from __future__ import annotations

import inspect
import logging
from pathlib import Path
from typing import Any, Literal

import attrs
import torch
from PIL import Image

from latentforge_core.device import seed_everything
from latentforge_metrics.inception import to_uint8
from latentforge_metrics.npz import iter_npz_images
from latentforge_runner import distributed
from latentforge_runner.config import (
    Component,
    ConfigError,
    Settings,
    component,
    sampler_block,
    setting,
    settings,
    to_plain,
)
from latentforge_runner.ema import check_weights, weights_name
from latentforge_runner.generation import (
    GENERATOR_RECIPES,
    autoguidance,
    frozen_tokenizer,
    generator_shapes,
    image_grid,
    initial_noise,
    load_generator,
)
from latentforge_runner.latents import restore_run_stats
from latentforge_runner.reports import PROTOCOL_FILE, write_report
from latentforge_runner.run_folder import RUN_ONLY_KEYS, RunSettings, open_run, read_run
from latentforge_runner.shards import SampleShards
from latentforge_runner.training import list_checkpoints, progress_bar

log = logging.getLogger("latentforge")

LABEL_MODES = ("equal", "random")
# Keys that change how samples are shown or kept, not what they are: not part of a shard plan.
PRESENTATION_KEYS = ("write_png", "grid_images", "keep_shards", "paper")


@settings
class SampleSettings(Settings):
    run: RunSettings = RunSettings(output_dir="runs/sample")  # where and on what it runs
    generator_run: str | None = None  # a train-generator/train-tokens run folder; or give generator
    checkpoint: str | None = None  # a checkpoint folder; default: the run's newest whole one
    # ema, model (a run trained without EMA has only these), a tracked ema_<decay> or ema_sigma_<σ_rel>,
    # or with checkpoint=<run>/posthoc a reconstruction the posthoc-ema recipe wrote
    weights: str = setting("ema", validator=weights_name)
    # A released generator instead of a run: its registry name and params.pretrained (a path or an
    # hf: id of the official file), with the tokenizer (and its latent statistics) it was trained on.
    generator: Component | None = component(
        "generators",
        default=None,
        injected=("in_channels", "input_size", "num_classes", "vocab_size", "grid_size"),
    )
    num_classes: int | None = setting(None, ge=0)  # with generator: its classes (0: unconditional)
    tokenizer: Component | None = component("tokenizers", default=None)  # default: the run's own
    num_samples: int = setting(50_000, ge=1)  # images to generate (a multiple of the classes for equal)
    labels: Literal["equal", "random"] = "equal"  # equal: each class as often; random: uniform, seeded
    batch_size: int = setting(64, ge=1)  # samples generated at once
    shard_size: int = setting(1000, ge=1)  # samples per shard file: the unit a killed run loses
    keep_shards: bool = False  # keep shards/ once samples.npz is assembled from it
    # keyword arguments of generator.sample; default: the run's eval.sampler
    sampler: dict | None = sampler_block("generator", run="generator_run", default=None)
    # Autoguidance by a weak generator (default: the run's eval.guidance_model / guidance_weights).
    guidance_model: Component | None = component(
        "generators", default=None, injected=("in_channels", "input_size", "num_classes")
    )
    guidance_weights: str | None = None  # the weak model's EMA (our safetensors)
    # DiGIT: a train-generator run of stage 2 (condition_tokenizer set) that turns generator_run's
    # K-Means tokens into VQGAN codes, and its sampler settings (default: its eval.sampler).
    stage2_run: str | None = None  # the stage-2 run folder (DiGIT only)
    stage2_sampler: dict | None = sampler_block("stage2", run="stage2_run", default=None)  # its options
    # DiGIT's released stage 2 instead of a run: its registry name and params.pretrained (the fairseq
    # checkpoint), over stage2_tokenizer, the VQGAN whose codes it generates.
    stage2: Component | None = component(
        "generators", default=None, injected=("vocab_size", "grid_size", "cond_vocab_size", "cond_grid_size")
    )
    stage2_tokenizer: Component | None = component("tokenizers", default=None)
    grid_images: int = setting(100, ge=1)  # how many of the first samples go into grid.png
    write_png: bool = True  # also write each sample as a PNG file
    # The published figure this run reproduces ({fid: 1.35, inception_score: …, source: …, reference: …}):
    # copied into protocol.json beside samples.npz, where evaluate prints ours beside it.
    paper: dict = attrs.field(factory=dict)

    def __attrs_post_init__(self):
        if self.labels not in LABEL_MODES:
            raise ConfigError(
                f"labels must be one of {', '.join(map(repr, LABEL_MODES))}, got {self.labels!r}"
            )


def class_labels(mode: str, n: int, num_classes: int, seed: int = 0) -> torch.Tensor:
    """``equal``: 0, 1, …, K−1, 0, 1, … (n must be a multiple of K); ``random``: uniform, seeded."""
    if mode == "equal":
        if n % num_classes:
            raise ConfigError(
                f"labels=equal needs num_samples to be a multiple of the {num_classes} classes, got {n} "
                f"(e.g. {max(1, n // num_classes) * num_classes})"
            )
        return torch.arange(n) % num_classes
    if mode == "random":
        return torch.randint(num_classes, (n,), generator=torch.Generator().manual_seed(seed))
    raise ConfigError(f"labels must be one of {', '.join(map(repr, LABEL_MODES))}, got {mode!r}")


class SampleRecipe:
    Settings = SampleSettings

    def __init__(self, config: SampleSettings):
        self.cfg = config

    def setup(self) -> None:
        cfg = self.cfg
        if cfg.stage2 is not None and cfg.generator is None:
            raise ConfigError(
                "stage2 (a released stage-2 decoder) continues a released stage 1 (generator=...); a run "
                "folder's stage 1 continues with stage2_run"
            )
        if (cfg.generator_run is None) == (cfg.generator is None):
            raise ConfigError(
                "sample needs one generator (generator_run or generator is required, not both): "
                "generator_run=<a training run folder>, or generator.name=<a registered generator> with "
                "generator.params.pretrained=<its released weights>"
            )
        self.shards = SampleShards(Path(cfg.run.output_dir), cfg.num_samples, cfg.shard_size, self._plan())
        self.state = self.shards.check(cfg.run.resume)  # before open_run writes into the folder
        self.run_dir, self.dist, self.logger = open_run("sample", cfg)
        self.device = self.dist.device
        if cfg.generator is not None:
            self._setup_release()
        else:
            self._setup_run(Path(cfg.generator_run))
        seed_everything(cfg.run.seed + self.dist.rank)
        self._todo: list[int] = []
        if self.state != "complete":
            if self.dist.is_main:
                self.shards.start(self.state)
            distributed.barrier()
            todo = self.shards.todo()
            self._todo = distributed.shard(todo)
            distributed.barrier()  # every process has listed the shards before any is written
            if self.state == "resumed":
                done, total = len(self.shards.ranges) - len(todo), len(self.shards.ranges)
                log.info("%d of %d shards are on disk: sampling the other %d", done, total, total - done)

    def _plan(self) -> dict[str, Any]:
        """Every setting the samples depend on, with the checkpoint a run folder resolves to."""
        cfg = self.cfg
        plan = {"recipe": "sample", **cfg.to_dict()}
        for key in PRESENTATION_KEYS:
            plan.pop(key)
        plan["run"] = {k: v for k, v in plan["run"].items() if f"run.{k}" not in RUN_ONLY_KEYS}
        if cfg.generator_run is not None and cfg.checkpoint is None:
            found = list_checkpoints(Path(cfg.generator_run) / "checkpoints")
            plan["checkpoint"] = str(found[-1]) if found else None
        return plan

    def _setup_run(self, run: Path) -> None:
        """A generator from its training run folder, with the run's tokenizer and statistics."""
        cfg = self.cfg
        _, self.train = read_run(run, "generator_run", ("train-generator", "train-tokens"))
        k = self.num_classes = self.train.data.num_classes
        self.sampler, self.image_size = self.train.eval.sampler, self.train.data.image_size
        # A tokenizer with random weights (the tiny test ones) comes out as the training run built it.
        block = cfg.tokenizer or self.train.tokenizer
        self.tokenizer = frozen_tokenizer(block, self.train.run.seed, self.device)
        self.discrete = self.tokenizer.vocab_size is not None
        self.stage2 = None
        if cfg.stage2_run is not None:
            self._setup_stage2(Path(cfg.stage2_run))
        elif not self.tokenizer.can_decode:
            raise ConfigError(
                f"tokenizer {block.name!r} has no pixel decoder; sample a generator whose tokens decode "
                "to images, or name a DiGIT stage-2 run (stage2_run=...) that turns them into VQGAN codes"
            )
        if not self.discrete:
            name = (cfg.tokenizer or self.train.tokenizer).name
            log.info(
                "latent statistics: %s", restore_run_stats(self.tokenizer, run, self.train, name, self.device)
            )
        shape = generator_shapes(self.tokenizer, k)
        self.generator = self._load_generator(run, self.train, cfg.checkpoint, shape)
        e = self.train.eval
        self.guidance = autoguidance(
            cfg.guidance_model or e.guidance_model,
            cfg.guidance_weights or (None if cfg.guidance_model else e.guidance_weights),
            self.tokenizer,
            k,
            self.device,
        )

    def _setup_release(self) -> None:
        """A released generator (``generator.params.pretrained``) over the tokenizer it was trained on,
        whose latent statistics come with the tokenizer (e.g. ``tokenizer.params.stats``)."""
        cfg = self.cfg
        if cfg.tokenizer is None or cfg.num_classes is None:
            raise ConfigError(
                "generator (a released model) needs tokenizer (the one whose latents it generates, with "
                "its statistics) and num_classes (the classes it was trained on)"
            )
        if cfg.stage2_run is not None:
            raise ConfigError("stage2_run continues a token generator run: use it with generator_run")
        self.tokenizer = frozen_tokenizer(cfg.tokenizer, cfg.run.seed, self.device)
        self.discrete, self.stage2 = self.tokenizer.vocab_size is not None, None
        self.sampler, self.image_size = {}, self.tokenizer.preprocessing.input_size
        if cfg.stage2 is not None:
            self._setup_released_stage2()
        elif not self.tokenizer.can_decode:
            raise ConfigError(
                f"tokenizer {cfg.tokenizer.name!r} has no pixel decoder to make images from (DiGIT: give "
                "stage2 and stage2_tokenizer, its released stage-2 decoder and VQGAN)"
            )
        if not self.discrete and self.tokenizer.stats is None:
            raise ConfigError(
                f"tokenizer {cfg.tokenizer.name!r} has no latent statistics: give the release's file "
                "(RAE: tokenizer.params.stats=<stat.pt>; VA-VAE: its latents_stats.pt)"
            )
        k = self.num_classes = cfg.num_classes
        shape = generator_shapes(self.tokenizer, k)
        self.generator = cfg.generator.build("generators", **shape).to(self.device).eval()
        self.guidance = autoguidance(cfg.guidance_model, cfg.guidance_weights, self.tokenizer, k, self.device)
        log.info("sampling the released %s (%s)", cfg.generator.name, cfg.generator.params.get("pretrained"))

    def _setup_stage2(self, run: Path) -> None:
        """DiGIT: stage 1's tokens condition the stage-2 generator, whose tokenizer (the VQGAN) decodes."""
        recipe, self.train2 = read_run(run, "stage2_run", GENERATOR_RECIPES)
        if recipe != "train-stage2":
            raise ConfigError(f"stage2_run {run} is not a stage-2 run: {recipe} wrote it, not train-stage2")
        if not self.discrete:
            raise ConfigError(
                f"stage2_run continues a token generator; generator_run {self.cfg.generator_run} makes "
                "continuous latents"
            )
        self.decoder = frozen_tokenizer(self.train2.tokenizer, self.train2.run.seed, self.device)
        shape = generator_shapes(self.decoder, self.train2.data.num_classes, condition=self.tokenizer)
        self.stage2 = self._load_generator(run, self.train2, None, shape)
        self.sampler2, self.image_size = self.train2.eval.sampler, self.train2.data.image_size

    def _setup_released_stage2(self) -> None:
        """DiGIT's released stage 2 over its VQGAN, conditioned on the released stage 1's tokens."""
        cfg = self.cfg
        if cfg.stage2_tokenizer is None or not self.discrete:
            raise ConfigError(
                "stage2 (DiGIT's released stage-2 decoder) continues a token generator over K-Means tokens "
                "and needs stage2_tokenizer, the VQGAN whose codes it generates (e.g. vqgan-f16-1024 with "
                "params.pretrained=<vqgan_jax_strongaug.ckpt>)"
            )
        self.decoder = frozen_tokenizer(cfg.stage2_tokenizer, cfg.run.seed, self.device)
        shape = generator_shapes(self.decoder, 0, condition=self.tokenizer)
        self.stage2 = cfg.stage2.build("generators", **shape).to(self.device).eval()
        self.sampler2, self.image_size = {}, self.decoder.preprocessing.input_size

    def _load_generator(self, run: Path, train: Any, checkpoint: str | None, shape: dict[str, Any]):
        found = [Path(checkpoint)] if checkpoint is not None else list_checkpoints(run / "checkpoints")
        if found:  # none: load_generator says so
            check_weights(found[-1], self.cfg.weights)
        generator = load_generator(run, train, checkpoint, self.cfg.weights, shape)
        return generator.to(self.device).eval()

    def _images(
        self, indices: range, y: torch.Tensor, sampler: dict[str, Any], sampler2: dict[str, Any]
    ) -> torch.Tensor:
        """Labels → images in [0, 1] ``[B, 3, H, W]``, through stage 2 when there is one."""
        if self.noise_shape is not None:
            noise = initial_noise(self.cfg.run.seed, indices, self.noise_shape).to(self.device)
            sampler = {**sampler, "noise": noise}
        labels = len(indices) if y is None else y.to(self.device)  # a count: unconditional
        out = self.generator.sample(labels, **sampler, **self.guidance)
        if self.stage2 is not None:
            return self.decoder.decode(self.stage2.sample(out, **sampler2))
        return self.tokenizer.decode(out) if self.discrete else self.tokenizer.decode(out, normalize=True)

    def _batch(
        self, indices: range, sampler: dict[str, Any], sampler2: dict[str, Any]
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The samples ``indices`` (PNGs written here), whose randomness is seeded by (run seed, index):
        a sample does not depend on which process makes it, or when."""
        cfg = self.cfg
        y = None if self.labels is None else self.labels[indices.start : indices.stop]
        distributed.seed_batch(cfg.run.seed, indices.start)
        images = self._images(indices, y, sampler, sampler2).float().clamp(0, 1).cpu()  # [B, 3, H, W]
        if cfg.write_png:
            pixels = to_uint8(images).permute(0, 2, 3, 1).numpy()  # the npz's pixels
            for i, img in zip(indices, pixels, strict=True):
                Image.fromarray(img).save(self.run_dir / "images" / f"{i:06d}.png")
        return images, y

    @torch.no_grad()
    def run(self) -> dict[str, Any]:
        """Each process samples its share of the missing shards; the main process then assembles them."""
        cfg, k = self.cfg, self.num_classes
        self.labels = class_labels(cfg.labels, cfg.num_samples, k, cfg.run.seed) if k else None
        sampler = self.sampler if cfg.sampler is None else cfg.sampler
        sampler2, size = {}, self.image_size
        if self.stage2 is not None:
            sampler2 = self.sampler2 if cfg.stage2_sampler is None else cfg.stage2_sampler
        self.used_sampler = sampler
        self.noise_shape = None  # a flow generator's latents, whose starting noise is drawn per sample
        if not self.discrete and "noise" in inspect.signature(self.generator.sample).parameters:
            self.noise_shape = tuple(self.tokenizer.latent_shape)
        samples = self.run_dir / "samples.npz"
        if self.state == "complete":
            log.info("%s is complete (%s): nothing to sample", samples, self.shards.manifest)
        else:
            (self.run_dir / "images").mkdir(parents=True, exist_ok=True)
            main = self.dist.is_main
            total = sum(len(self.shards.ranges[i]) for i in self._todo)
            bar = progress_bar(total=total, desc="sample", unit="img", disable=not main)
            for index in self._todo:
                span = self.shards.ranges[index]
                with self.shards.writer(index, size) as shard:
                    for start in range(span.start, span.stop, cfg.batch_size):
                        batch = range(start, min(start + cfg.batch_size, span.stop))
                        images, y = self._batch(batch, sampler, sampler2)
                        shard.write(images, y)
                        bar.update(len(batch))
            bar.close()
            distributed.barrier()  # every shard is on disk
            if main:
                self.shards.assemble(samples, self.labels, size, keep=cfg.keep_shards)
        if self.labels is None:
            return {"num_samples": cfg.num_samples}
        counts = torch.bincount(self.labels, minlength=k)
        return {
            "num_samples": cfg.num_samples,
            "per_class_min": int(counts.min()),
            "per_class_max": int(counts.max()),
        }

    def save(self) -> None:
        if not self.dist.is_main:
            return
        first = next(iter_npz_images(self.run_dir / "samples.npz", batch_size=self.cfg.grid_images))
        columns = min(self.num_classes, 10) if self.cfg.labels == "equal" and self.num_classes else 10
        image_grid(first / 255.0, min(columns, first.shape[0])).save(self.run_dir / "grid.png")
        if self.cfg.paper:
            self._write_protocol()
        log.info("%d samples written to %s", self.cfg.num_samples, self.run_dir / "samples.npz")

    def _write_protocol(self) -> None:
        """``protocol.json`` beside ``samples.npz``: the paper's figure and how these samples were made,
        for ``evaluate`` to print ours beside it."""
        cfg = self.cfg
        protocol = {
            "paper": cfg.paper,
            "generator": to_plain(cfg.generator) if cfg.generator is not None else cfg.generator_run,
            "tokenizer": to_plain(cfg.tokenizer),
            "guidance_model": to_plain(cfg.guidance_model),
            "sampler": self.used_sampler,
            "num_samples": cfg.num_samples,
            "labels": cfg.labels,
            "seed": cfg.run.seed,
        }
        write_report(self.run_dir / PROTOCOL_FILE, protocol)
        log.info("paper's figure and sampling protocol written to %s", self.run_dir / PROTOCOL_FILE)

    def cleanup(self) -> None:
        self.logger.close()
        distributed.cleanup()
