"""Reference and sample files: ADM evaluator batches and pytorch-fid statistics.

* ADM reference batch: ``arr_0`` uint8 ``[N, H, W, 3]`` (the images P/R and IS use), ``mu``/``sigma``
  (pool3, 2048-d) and ``mu_s``/``sigma_s`` (spatial, 2023-d, NHWC order) over the whole data set.
* ADM sample batch: ``arr_0`` uint8 ``[N, H, W, 3]`` and, when class-conditional, ``arr_1`` labels.
* pytorch-fid statistics: ``mu`` and ``sigma`` (``--save-stats``).

``SampleWriter`` streams samples into ``arr_0.npy`` inside the zip, as the evaluator streams them
out, so 50,000 samples at 512 px never sit in memory at once.

A reference whose file name is one of ``KNOWN_REFERENCES`` is checked against its published SHA-256
before use (``verify_reference``): a truncated download or another file saved under that name would
otherwise give a plausible but wrong FID.
"""

from __future__ import annotations

import hashlib
import os
import zipfile
from collections.abc import Iterator
from pathlib import Path

import attrs
import numpy as np
import torch

from latentforge_core.checkpoint import atomic_path
from latentforge_core.errors import InputError, LatentforgeError, MissingFileError
from latentforge_metrics.inception import check_images, to_uint8
from latentforge_metrics.stats import GaussianStats


class ReferenceFileError(LatentforgeError, ValueError):
    """An ``.npz`` that is missing, truncated, corrupted or lacks the arrays a metric needs."""


@attrs.frozen
class KnownReference:
    """A published reference file: what its bytes hash to, its size and where it is downloaded."""

    sha256: str
    size: int  # bytes
    url: str


ADM_REF_BATCHES = "https://openaipublic.blob.core.windows.net/diffusion/jul-2021/ref_batches"

# The ADM evaluator's reference batches (guided-diffusion evaluations/README.md), by file name. Only
# hashes found in public material are listed; VIRTUAL_imagenet{64,128}_labeled.npz, VIRTUAL_imagenet512.npz
# and the LSUN batches are not, so they are not checked.
KNOWN_REFERENCES: dict[str, KnownReference] = {
    # Git LFS pointer of github.com/ruizegao/efficient-dit @ 7431e920, VIRTUAL_imagenet256_labeled.npz;
    # the same hash and size are pinned by other public evaluation scripts that download the ADM URL.
    "VIRTUAL_imagenet256_labeled.npz": KnownReference(
        "b32732719497e42660a9affb4a966068cba0855ac449b82015e34ec376d20758",
        2_037_122_530,
        f"{ADM_REF_BATCHES}/imagenet/256/VIRTUAL_imagenet256_labeled.npz",
    ),
}


def file_sha256(path: str | os.PathLike, chunk_size: int = 16 << 20) -> str:
    """Hex SHA-256 of a file, read in chunks: reference batches hold gigabytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def verify_reference(path: str | os.PathLike) -> bool:
    """Check a file named like a known ADM reference batch against its SHA-256; False if not known."""
    path = Path(path)
    known = KNOWN_REFERENCES.get(path.name)
    if known is None:
        return False
    if not path.is_file():
        raise MissingFileError(f"reference file not found: {path}")
    found = file_sha256(path)
    if found != known.sha256:
        size = path.stat().st_size
        sizes = f" ({size} bytes, the known file has {known.size})" if size != known.size else ""
        raise ReferenceFileError(
            f"{path} is not the ADM reference batch {path.name}: SHA-256 {found}{sizes}, expected "
            f"{known.sha256}. Download it again from {known.url}; to use this file anyway, skip the "
            "check with check_reference=false (evaluate) or check_reference=False (metrics)"
        )
    return True


@attrs.frozen
class ReferenceStats:
    """What a reference file holds: pool3 statistics, spatial statistics (ADM only)."""

    fid: GaussianStats | None
    spatial: GaussianStats | None
    num_images: int  # rows of ``arr_0`` (0 if the file has no images)
    path: Path | None = None


def _open(path: str | os.PathLike) -> zipfile.ZipFile:
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"reference file not found: {path}")
    try:
        return zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, EOFError) as err:
        raise ReferenceFileError(
            f"{path} is not a readable .npz file (truncated or corrupted?): {err}"
        ) from err


def _read_array(zf: zipfile.ZipFile, name: str, path) -> np.ndarray:
    try:
        with zf.open(f"{name}.npy") as f:
            return np.lib.format.read_array(f, allow_pickle=False)
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as err:
        raise ReferenceFileError(
            f"{path}: array {name!r} is unreadable (truncated or corrupted?): {err}"
        ) from err


def _read_header(f, name: str, path):
    """(shape, fortran_order, dtype) from an open ``.npy`` stream, left at the start of the data."""
    try:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            return np.lib.format.read_array_header_1_0(f)
        if version == (2, 0):
            return np.lib.format.read_array_header_2_0(f)
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as err:
        raise ReferenceFileError(f"{path}: the header of {name!r} is unreadable: {err}") from err
    raise ReferenceFileError(f"{path}: {name!r} uses .npy format {version}, expected 1.0 or 2.0")


def _npy_header(zf: zipfile.ZipFile, name: str, path):
    with zf.open(f"{name}.npy") as f:
        return _read_header(f, name, path)


def load_reference(path: str | os.PathLike) -> ReferenceStats:
    """Read an ADM reference batch or a pytorch-fid statistics file."""
    with _open(path) as zf:
        names = {n[: -len(".npy")] for n in zf.namelist() if n.endswith(".npy")}
        pairs = {}
        for key, (mu_key, sigma_key) in {"fid": ("mu", "sigma"), "spatial": ("mu_s", "sigma_s")}.items():
            if mu_key in names and sigma_key in names:
                mu, sigma = _read_array(zf, mu_key, path), _read_array(zf, sigma_key, path)
                try:
                    pairs[key] = GaussianStats.from_moments(mu, sigma)
                except ValueError as err:
                    raise ReferenceFileError(f"{path}: {mu_key}/{sigma_key}: {err}") from err
        num_images = 0
        if "arr_0" in names:
            shape, _, _ = _npy_header(zf, "arr_0", path)
            num_images = shape[0] if shape else 0
    if not pairs:
        raise ReferenceFileError(
            f"{path} has no statistics (found arrays {sorted(names)}; expected 'mu' and 'sigma', and 'mu_s'/"
            "'sigma_s' for sFID). A sample batch holds only images: compute its statistics with the metric"
        )
    return ReferenceStats(pairs.get("fid"), pairs.get("spatial"), num_images, Path(path))


def iter_npz_images(path: str | os.PathLike, batch_size: int = 64) -> Iterator[torch.Tensor]:
    """Stream ``arr_0`` (uint8 ``[N, H, W, 3]``) as uint8 ``[B, 3, H, W]`` batches."""
    with _open(path) as zf:
        if "arr_0.npy" not in zf.namelist():
            raise ReferenceFileError(f"{path} has no 'arr_0' image array (found {zf.namelist()})")
        shape, fortran, dtype = _npy_header(zf, "arr_0", path)
        if len(shape) != 4 or shape[-1] != 3 or dtype != np.uint8:
            raise ReferenceFileError(f"{path}: arr_0 must be uint8 [N, H, W, 3], got {dtype} {list(shape)}")
        if fortran:  # rare: read whole, as the ADM evaluator falls back to
            array = _read_array(zf, "arr_0", path)
            for start in range(0, shape[0], batch_size):
                yield torch.from_numpy(np.ascontiguousarray(array[start : start + batch_size])).permute(
                    0, 3, 1, 2
                )
            return
        row = int(np.prod(shape[1:]))
        with zf.open("arr_0.npy") as f:
            _read_header(f, "arr_0", path)
            for start in range(0, shape[0], batch_size):
                count = min(batch_size, shape[0] - start)
                data = f.read(count * row)
                if len(data) != count * row:
                    raise ReferenceFileError(f"{path}: arr_0 is truncated at image {start}")
                batch = np.frombuffer(data, dtype=np.uint8).reshape(count, *shape[1:])
                yield torch.from_numpy(batch.copy()).permute(0, 3, 1, 2)  # [B, 3, H, W]


def save_reference(
    path: str | os.PathLike,
    fid: GaussianStats,
    spatial: GaussianStats | None = None,
    images: np.ndarray | None = None,
) -> Path:
    """Write an ADM-style reference batch (``mu``, ``sigma``, [``mu_s``, ``sigma_s``], [``arr_0``])."""
    arrays = {"mu": fid.mu, "sigma": fid.sigma}
    if spatial is not None:
        arrays.update(mu_s=spatial.mu, sigma_s=spatial.sigma)
    if images is not None:
        arrays["arr_0"] = np.asarray(images, dtype=np.uint8)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)
    return Path(path)


def save_fid_stats(path: str | os.PathLike, stats: GaussianStats) -> Path:
    """Write pytorch-fid's statistics file (compressed ``mu``, ``sigma``)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez_compressed(f, mu=stats.mu, sigma=stats.sigma)
    return Path(path)


class SampleWriter:
    """Streams images into an ADM sample batch (``arr_0`` uint8 NHWC, ``arr_1`` labels if given).

    ``with SampleWriter(path, num_samples=50_000, image_size=256) as w: w.write(images, labels)``;
    float images in [0, 1] are rounded to uint8 (DiT's ``sample_ddp.py`` convention).
    """

    def __init__(self, path: str | os.PathLike, num_samples: int, image_size: int | tuple[int, int]):
        h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
        self.path, self.shape, self.written = Path(path), (int(num_samples), h, w, 3), 0
        self.labels: list[np.ndarray] = []
        self._labelled: bool | None = None
        self._partial = self.path.with_name(f".{self.path.name}.partial")  # renamed when complete
        self._zip = zipfile.ZipFile(self._partial, "w", compression=zipfile.ZIP_STORED, allowZip64=True)
        self._file = self._zip.open("arr_0.npy", "w", force_zip64=True)
        header = {
            "descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)),
            "fortran_order": False,
            "shape": self.shape,
        }
        np.lib.format.write_array_header_1_0(self._file, header)

    def write(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> None:
        images = check_images(images)
        if tuple(images.shape[-2:]) != self.shape[1:3]:
            raise InputError(
                f"images are {tuple(images.shape[-2:])}, this file holds {self.shape[1:3]} images"
            )
        if self.written + images.shape[0] > self.shape[0]:
            raise InputError(f"more than the declared {self.shape[0]} samples were written")
        if self._labelled is not None and self._labelled != (labels is not None):
            raise InputError("give labels for every batch or for none")
        self._labelled = labels is not None
        nhwc = to_uint8(images).permute(0, 2, 3, 1).contiguous().cpu().numpy()
        self._file.write(nhwc.tobytes())
        if labels is not None:
            self.labels.append(torch.as_tensor(labels).cpu().numpy().astype(np.int64).reshape(-1))
        self.written += images.shape[0]

    def close(self) -> None:
        if self._file is None:
            return
        self._file.close()
        self._file = None
        if self.written != self.shape[0]:
            self._discard()
            raise InputError(
                f"{self.written} samples were written, {self.shape[0]} declared; nothing was saved"
            )
        if self.labels:
            with self._zip.open("arr_1.npy", "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.concatenate(self.labels), allow_pickle=False)
        self._zip.close()
        os.replace(self._partial, self.path)

    def _discard(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        self._zip.close()
        self._partial.unlink(missing_ok=True)

    def __enter__(self) -> SampleWriter:
        return self

    def __exit__(self, *exc) -> None:
        if exc[0] is not None:  # leave no half-written file behind
            self._discard()
            return
        self.close()


def save_samples(path: str | os.PathLike, images: torch.Tensor, labels: torch.Tensor | None = None) -> Path:
    """Write all ``images`` ``[N, 3, H, W]`` (uint8 or [0, 1]) at once as an ADM sample batch."""
    images = check_images(images)
    with SampleWriter(path, images.shape[0], tuple(images.shape[-2:])) as writer:
        writer.write(images, labels)
    return Path(path)
