"""A mass-sampling run's samples as shards, so a killed run loses at most the shards in progress.

``<run>/shards/<first index>.npz`` holds samples ``first … first + shard_size − 1`` (``arr_0`` uint8
images, ``arr_1`` labels), each written whole or not at all; ``<run>/manifest.json`` holds the plan they
were made under (every setting a sample depends on).  A rerun under the same plan samples only the
missing shards; under another plan it is refused, since samples of two plans cannot share one
``samples.npz``.  When every shard is there, the main process streams them, in order, into the one
``samples.npz`` the evaluators read.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from latentforge_core.checkpoint import atomic_path
from latentforge_metrics.npz import ReferenceFileError, SampleWriter, iter_npz_images
from latentforge_runner.config import ConfigError
from latentforge_runner.run_folder import differences

log = logging.getLogger("latentforge")

MANIFEST = "manifest.json"
SHARDS = "shards"

State = Literal["new", "resumed", "complete"]


class SampleShards:
    """The shards of ``num_samples`` samples in ``run_dir``, ``shard_size`` each, made under ``plan``."""

    def __init__(self, run_dir: Path, num_samples: int, shard_size: int, plan: dict[str, Any]):
        self.run_dir, self.plan = run_dir, plan
        self.folder, self.manifest = run_dir / SHARDS, run_dir / MANIFEST
        self.ranges = [range(s, min(s + shard_size, num_samples)) for s in range(0, num_samples, shard_size)]

    def check(self, resume: str) -> State:
        """What this folder holds for ``plan``, decided before anything in it is written: nothing yet
        (``new``; also ``run.resume=force``, which starts over), shards to go on from (``resumed``), or
        the whole ``samples.npz`` (``complete``).  ``never`` refuses a folder that holds samples."""
        if not self.manifest.is_file() or resume == "force":
            return "new"
        try:
            old = json.loads(self.manifest.read_text())
            old_plan, complete = old["plan"], bool(old["complete"])
        except (ValueError, KeyError, TypeError) as err:
            raise ConfigError(
                f"{self.manifest} is not the manifest sample writes ({err!r}): move it away, or set "
                "run.resume=force to start the samples over"
            ) from err
        if resume == "never":
            raise ConfigError(
                f"run.resume is never, but {self.run_dir} already holds samples ({self.manifest}): choose "
                "another run.output_dir, or set run.resume=auto to go on with them"
            )
        changed = differences(old_plan, self.plan)
        if changed:
            raise ConfigError(
                f"{self.run_dir} holds samples made under another plan ({self.manifest}): "
                + "; ".join(changed)
                + ". Samples of two plans cannot share one samples.npz: set run.resume=force to start "
                "over (its shards are removed), or choose another run.output_dir"
            )
        return "complete" if complete and (self.run_dir / "samples.npz").is_file() else "resumed"

    def start(self, state: State) -> None:
        """On the main process, before any shard is listed or written: a new plan's manifest, and no
        shards of an earlier one."""
        if state == "new" and self.folder.exists():
            shutil.rmtree(self.folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        if state == "new":
            self._write_manifest(complete=False)

    def path(self, index: int) -> Path:
        return self.folder / f"{self.ranges[index].start:08d}.npz"

    def todo(self) -> list[int]:
        """The shards not yet on disk (a shard file exists only whole)."""
        return [i for i in range(len(self.ranges)) if not self.path(i).is_file()]

    def writer(self, index: int, image_size: int | tuple[int, int]) -> SampleWriter:
        return SampleWriter(self.path(index), len(self.ranges[index]), image_size)

    def assemble(self, out: Path, labels: torch.Tensor | None, image_size: int, keep: bool) -> None:
        """Every shard, in order, into ``out``; each shard's labels must be the plan's (None: none)."""
        with SampleWriter(out, self.ranges[-1].stop, image_size) as writer:
            for index, span in enumerate(self.ranges):
                path = self.path(index)
                with np.load(path) as f:
                    found = f["arr_1"] if "arr_1" in f.files else None
                expected = None if labels is None else labels[span.start : span.stop].numpy()
                if (found is None) != (expected is None) or not np.array_equal(found, expected):
                    raise ReferenceFileError(
                        f"{path} holds the labels of other samples than {span.start}…{span.stop - 1} of "
                        f"this plan: remove it and run sample again to remake it"
                    )
                for images in iter_npz_images(path, batch_size=256):
                    writer.write(images, None if found is None else torch.from_numpy(found[: len(images)]))
                    found = None if found is None else found[len(images) :]
        self._write_manifest(complete=True)
        if not keep:
            shutil.rmtree(self.folder)
        log.info("%d shards assembled into %s", len(self.ranges), out)

    def _write_manifest(self, complete: bool) -> None:
        shards = {"count": len(self.ranges), "size": len(self.ranges[0]), "folder": SHARDS}
        content = {"plan": self.plan, "shards": shards, "complete": complete}
        with atomic_path(self.manifest) as tmp:
            Path(tmp).write_text(json.dumps(content, indent=2, default=str) + "\n")
