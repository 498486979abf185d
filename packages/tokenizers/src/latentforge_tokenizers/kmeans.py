"""K-Means over frozen SSL features, and the tokenizer DiGIT builds from it.

DiGIT clusters DINOv2 patch features (block L−3 + final LayerNorm) with ``faiss.Kmeans`` (K = 8192
for ViT-B, 16384 for ViT-L, 20 iterations, seed 1234, at most 256 points per centroid) and then
turns every image into a 16×16 grid of nearest-centroid ids.  ``KMeans`` fits the same way from a
stream of feature batches (reservoir-sampled, so the features never sit in memory at once) on a
torch Lloyd loop (blocked GEMM + argmin, faster than faiss on CPU) or on faiss — faiss-gpu on CUDA,
the default there when installed.  ``KMeansTokenizer``
composes any registered encoder with the centroids.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from einops import rearrange
from torch import nn

from latentforge_core import registry
from latentforge_core.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from latentforge_core.device import resolve_device
from latentforge_core.distances import block_rows, row_blocks
from latentforge_core.errors import (
    InputError,
    InputTypeError,
    MissingDependencyError,
    MissingFileError,
    StateError,
    UnsupportedError,
    check_int,
    checking_values,
)
from latentforge_core.hub import is_hub_id, resolve
from latentforge_tokenizers.codebook import check_codebook, check_token_ids, nearest

log = logging.getLogger(__name__)

Backend = Literal["auto", "faiss", "torch"]
BACKENDS = ("auto", "faiss", "torch")


def faiss_available() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def _faiss_gpus() -> bool:
    """Whether faiss is installed with GPU support and sees a GPU."""
    if not faiss_available():
        return False
    import faiss

    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


# ------------------------------------------------------------------------------------------------
# Streaming a data set of feature batches
# ------------------------------------------------------------------------------------------------
def _as_rows(batch: Any) -> torch.Tensor:
    if isinstance(batch, (tuple, list)) and batch and not isinstance(batch[0], (int, float)):
        batch = batch[0]  # (features, labels) pairs from a DataLoader
    rows = torch.as_tensor(batch) if isinstance(batch, np.ndarray) else batch
    if not isinstance(rows, torch.Tensor):
        raise InputTypeError(
            f"expected feature batches as [N, D] tensors or arrays, got {type(batch).__name__}"
        )
    if rows.ndim != 2 or not rows.is_floating_point():
        raise InputError(
            f"each feature batch must be a floating [N, D] matrix, got {rows.dtype} {tuple(rows.shape)}"
        )
    return rows


def iter_feature_batches(data: Any, batch_rows: int = 65536) -> Iterator[torch.Tensor]:
    """[N, D] float batches from one [N, D] array/tensor or from an iterable of batches."""
    if isinstance(data, (torch.Tensor, np.ndarray)):
        rows = _as_rows(data)
        for start in range(0, rows.shape[0], batch_rows):
            yield rows[start : start + batch_rows]
        return
    if not isinstance(data, Iterable):
        raise InputTypeError(
            f"expected an [N, D] array or an iterable of feature batches, got {type(data).__name__}"
        )
    for batch in data:
        yield _as_rows(batch)


class Reservoir:
    """A uniform sample without replacement of at most ``capacity`` rows of a stream of unknown length.

    Every row gets a random key and the rows with the ``capacity`` largest keys are kept; a new batch
    only touches the rows whose key beats the current smallest kept key.
    """

    def __init__(self, capacity: int, seed: int):
        self.capacity = capacity
        self.generator = torch.Generator().manual_seed(seed)
        self._rows: list[torch.Tensor] = []  # while filling, batches are kept as given: one copy at the end
        self._keys: list[torch.Tensor] = []
        self.kept = 0
        self.owned = False  # whether rows are our copy (a lone batch may be the caller's tensor)
        self.seen = 0
        self.width: int | None = None

    @property
    def rows(self) -> torch.Tensor:
        """The sample ``[n, D]`` (n ≤ capacity)."""
        self._merge()
        return self._rows[0]

    @property
    def keys(self) -> torch.Tensor:
        self._merge()
        return self._keys[0]

    def _merge(self) -> None:
        if len(self._rows) != 1:
            self._rows = [torch.cat(self._rows) if self._rows else torch.empty(0, self.width or 0)]
            self._keys = [torch.cat(self._keys) if self._keys else torch.empty(0)]
            self.owned = True

    def add(self, batch: torch.Tensor) -> None:
        batch = batch.detach().to("cpu", torch.float32)
        if self.width is None:
            self.width = batch.shape[1]
        elif batch.shape[1] != self.width:
            raise InputError(f"feature batches change width: {self.width} before, {batch.shape[1]} now")
        if not torch.isfinite(batch).all():
            raise InputError("feature batch holds NaN or infinite values; K-Means needs finite features")
        keys = torch.rand(batch.shape[0], generator=self.generator)
        self.seen += batch.shape[0]
        room = self.capacity - self.kept
        if room > 0:  # still filling: take what fits, the rest competes below
            self._rows.append(batch[:room])
            self._keys.append(keys[:room])
            self.kept += min(room, batch.shape[0])
            batch, keys = batch[room:], keys[room:]
        if batch.shape[0] == 0:
            return
        better = keys > self.keys.min()
        batch, keys = batch[better], keys[better]
        if batch.shape[0] == 0:
            return
        if not self.owned:  # replacing rows below must never write into the caller's features
            self._rows, self.owned = [self.rows.clone()], True
        kept = torch.zeros(self.capacity + keys.shape[0], dtype=torch.bool)
        kept[torch.cat([self.keys, keys]).topk(self.capacity).indices] = True
        freed = (~kept[: self.capacity]).nonzero().squeeze(1)
        incoming = kept[self.capacity :].nonzero().squeeze(1)
        self.rows[freed] = batch[incoming]
        self.keys[freed] = keys[incoming]


# ------------------------------------------------------------------------------------------------
# Lloyd iterations: faiss or torch
# ------------------------------------------------------------------------------------------------
def _lloyd_faiss(
    x: torch.Tensor, init: torch.Tensor | None, k: int, n_iter: int, seed: int, gpu: bool, verbose: bool
):
    import faiss

    km = faiss.Kmeans(
        x.shape[1],
        k,
        niter=n_iter,
        seed=seed,
        gpu=gpu,
        verbose=verbose,
        max_points_per_centroid=x.shape[0],  # we subsampled already; faiss must not do it again
        min_points_per_centroid=1,
    )
    km.train(x.numpy(), init_centroids=None if init is None else init.numpy())
    return torch.from_numpy(km.centroids.copy()), [float(v) for v in km.obj]


def _split_empty(centroids: torch.Tensor, counts: torch.Tensor, generator: torch.Generator) -> None:
    """Give each empty cluster half of the largest one: two copies nudged apart by ±1/1024."""
    for empty in (counts == 0).nonzero().squeeze(1).tolist():
        donor = int(counts.argmax())
        sign = torch.randint(0, 2, (centroids.shape[1],), generator=generator).to(centroids) * 2 - 1
        base = centroids[donor].clone()
        centroids[empty] = base * (1 + sign / 1024)
        centroids[donor] = base * (1 - sign / 1024)
        counts[empty] = counts[donor] // 2
        counts[donor] -= counts[empty]


def _members(ids: torch.Tensor, counts: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The ``[K, N]`` one-hot membership matrix of assignments ``ids [N]`` as a sparse CSR matrix."""
    crow = torch.zeros(counts.shape[0] + 1, dtype=torch.int64, device=ids.device)
    torch.cumsum(counts, 0, out=crow[1:])
    members = torch.sort(ids, stable=True).indices  # N: point ids, cluster by cluster, in order
    values = torch.ones(ids.shape[0], dtype=dtype, device=ids.device)
    with warnings.catch_warnings():  # "sparse CSR support is in beta": the product is all we use
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow, members, values, size=(counts.shape[0], ids.shape[0]))


def _lloyd_torch(x: torch.Tensor, init: torch.Tensor, n_iter: int, generator: torch.Generator):
    """Lloyd's iterations, each one pass of blocked GEMM + argmin over ``x`` and one segment sum.

    ‖x‖² is computed once; the new centroids' sums are one sparse one-hot × ``x`` product per
    iteration (16 ms at 100k × 768 where index_add_ took 24 ms and a sort + segment sum 200 ms).
    """
    centroids = init.clone()
    k = centroids.shape[0]
    x_sqnorm = x.square().sum(1)  # N
    ids = torch.empty(x.shape[0], dtype=torch.int64, device=x.device)
    best = torch.empty(x.shape[0], dtype=torch.float32, device=x.device)
    rows = block_rows(k)
    objective = []
    for _ in range(n_iter):
        for start, block, partial in row_blocks(x, centroids, rows=rows):
            stop = start + block.shape[0]
            torch.min(partial, dim=1, out=(best[start:stop], ids[start:stop]))  # ‖x − c‖² − ‖x‖²
        objective.append(float((best + x_sqnorm).clamp_min_(0.0).sum(dtype=torch.float64)))
        counts = torch.bincount(ids, minlength=k)  # K
        sums = _members(ids, counts, x.dtype) @ x  # K D
        nonempty = counts > 0
        centroids[nonempty] = sums[nonempty] / counts[nonempty, None].to(sums)
        if not nonempty.all():
            cpu = centroids.cpu()
            _split_empty(cpu, counts.cpu(), generator)
            centroids.copy_(cpu)
    return centroids, objective


# ------------------------------------------------------------------------------------------------
# K-Means
# ------------------------------------------------------------------------------------------------
class KMeans:
    """Euclidean K-Means fitted from a stream of ``[N, D]`` feature batches, faiss defaults.

    After ``fit``: ``centroids [K, D]`` (fp32), ``objective`` (sum of squared distances at each
    iteration's assignment, faiss' convention), ``n_points_seen`` and ``n_points_used`` (the sample
    size, at most ``max_points_per_centroid × K``), ``backend_used``.
    """

    def __init__(
        self,
        n_clusters: int,
        *,
        n_iter: int = 20,
        max_points_per_centroid: int = 256,
        seed: int = 1234,
        backend: Backend = "auto",
        device: str | torch.device | None = None,
        verbose: bool = False,
    ):
        check_int(n_clusters, "n_clusters", owner="KMeans")
        check_int(n_iter, "n_iter", minimum=0, owner="KMeans")
        check_int(max_points_per_centroid, "max_points_per_centroid", owner="KMeans")
        check_int(seed, "seed", minimum=0, owner="KMeans")
        if backend not in BACKENDS:
            raise InputError(f"unknown K-Means backend {backend!r}; expected one of {BACKENDS}")
        if backend == "faiss" and not faiss_available():
            raise MissingDependencyError(
                "backend='faiss' needs faiss: pip install 'latentforge-tokenizers[faiss]'"
            )
        self.n_clusters = n_clusters
        self.n_iter = n_iter
        self.max_points_per_centroid = max_points_per_centroid
        self.seed = seed
        self.backend = backend
        self.device = resolve_device(device)
        self.verbose = verbose
        self.centroids: torch.Tensor | None = None
        self.objective: list[float] = []
        self.n_points_seen = 0
        self.n_points_used = 0
        self.backend_used: str | None = None

    def fit(self, data: Any, *, init: torch.Tensor | np.ndarray | None = None) -> KMeans:
        """Sample at most ``max_points_per_centroid × K`` rows in one pass, then run Lloyd's on them."""
        k = self.n_clusters
        reservoir = Reservoir(k * self.max_points_per_centroid, self.seed)
        for batch in iter_feature_batches(data):
            reservoir.add(batch)
        if reservoir.seen == 0:
            raise InputError("the feature data set is empty: K-Means needs at least K feature vectors")
        if reservoir.seen < k:
            raise InputError(
                f"cannot fit K={k} clusters to {reservoir.seen} feature vectors; need at least {k}"
            )
        x = reservoir.rows
        self.n_points_seen, self.n_points_used = reservoir.seen, x.shape[0]
        log.info(
            "K-Means: %d of %d points used (max %d per centroid), K=%d, D=%d",
            x.shape[0],
            reservoir.seen,
            self.max_points_per_centroid,
            k,
            x.shape[1],
        )
        generator = torch.Generator().manual_seed(self.seed)
        if init is not None:
            init = torch.as_tensor(init, dtype=torch.float32).cpu()
            if tuple(init.shape) != (k, x.shape[1]):
                raise InputError(
                    f"init centroids must have shape ({k}, {x.shape[1]}), got {tuple(init.shape)}"
                )
        gpu = self.device.type == "cuda" and _faiss_gpus()
        # auto: faiss-gpu on CUDA, else torch (1.59× raw faiss.Kmeans on CPU, 100k × 768, K = 1024).
        if self.backend == "faiss" or (self.backend == "auto" and gpu):
            self.centroids, self.objective = _lloyd_faiss(
                x, init, k, self.n_iter, self.seed, gpu, self.verbose
            )
            self.backend_used = "faiss-gpu" if gpu else "faiss-cpu"
        else:
            if init is None:
                init = x[torch.randperm(x.shape[0], generator=generator)[:k]]
            x, init = x.to(self.device), init.to(self.device)
            centroids, self.objective = _lloyd_torch(x, init, self.n_iter, generator)
            self.centroids = centroids.cpu()
            self.backend_used = "torch"
        return self

    # ---------------------------------------------------------------------------- using centroids
    def _fitted(self) -> torch.Tensor:
        if self.centroids is None:
            raise StateError("this KMeans is not fitted yet: call fit(data) or load centroids first")
        return self.centroids

    def assign(self, x: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Nearest-centroid ids (int64) of the rows of ``x [N, D]``."""
        return nearest(torch.as_tensor(x), self._fitted().to(self.device), with_distances=False)[0]

    def score(self, data: Any) -> float:
        """Inertia: the summed squared distance of every row of ``data`` to its nearest centroid."""
        centroids = self._fitted().to(self.device)
        sqnorm = centroids.square().sum(1)
        return sum(
            float(nearest(b, centroids, sqnorm)[1].sum(dtype=torch.float64))
            for b in iter_feature_batches(data)
        )

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        """Centroid vectors ``[..., D]`` of ids ``[...]``."""
        centroids = self._fitted()
        check_token_ids(ids, centroids.shape[0])
        return centroids.to(ids.device)[ids]

    def config(self) -> dict[str, Any]:
        return {
            "kind": "kmeans",
            "n_clusters": self.n_clusters,
            "n_iter": self.n_iter,
            "seed": self.seed,
            "max_points_per_centroid": self.max_points_per_centroid,
            "n_points_seen": self.n_points_seen,
            "n_points_used": self.n_points_used,
            "backend": self.backend_used,
        }


# ------------------------------------------------------------------------------------------------
# Centroid files: ours (safetensors) and DiGIT's km_{8,16}k.npy
# ------------------------------------------------------------------------------------------------
def save_centroids(
    centroids: torch.Tensor, path: str | os.PathLike, config: Mapping[str, Any] | None = None
) -> Path:
    check_codebook(centroids, "centroids")
    config = {**(config or {}), "n_clusters": centroids.shape[0], "dim": centroids.shape[1]}
    return save_checkpoint({"centroids": centroids.float()}, path, config)


def load_centroids(path: str | os.PathLike) -> tuple[torch.Tensor, dict[str, Any]]:
    """``(centroids [K, D] fp32, config)`` from our ``.safetensors`` or DiGIT's ``km_*.npy`` (a path or
    an ``hf:<org>/<repo>/<file>`` id)."""
    if is_hub_id(path):
        path = resolve(path)
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"centroid file not found: {path}")
    if path.suffix.lower() == ".npy":
        try:
            array = np.load(path, allow_pickle=False)
        except ValueError as err:
            raise CheckpointError(f"{path} is not a readable .npy array: {err}") from err
        centroids, config = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32)), {}
    elif path.suffix.lower() == ".safetensors":
        state, config = load_checkpoint(path)
        if set(state) != {"centroids"}:
            raise CheckpointError(f"{path} holds {sorted(state)}; a centroid file holds exactly 'centroids'")
        centroids = state["centroids"].float()
    else:
        raise CheckpointError(f"{path}: expected a .safetensors centroid file or DiGIT's km_*.npy")
    if centroids.ndim != 2 or 0 in centroids.shape:
        raise CheckpointError(
            f"{path}: centroids must be a [K, D] matrix, got shape {tuple(centroids.shape)}"
        )
    return centroids, config


# ------------------------------------------------------------------------------------------------
# Tokenizer
# ------------------------------------------------------------------------------------------------
class KMeansTokenizer(nn.Module):
    """Images in [0, 1] → encoder feature map → nearest-centroid ids ``[B, h, w]`` (int64)."""

    def __init__(
        self,
        encoder: nn.Module,
        centroids: torch.Tensor | None = None,
        *,
        n_clusters: int | None = None,
        config: Mapping[str, Any] | None = None,
    ):
        super().__init__()
        if centroids is None and n_clusters is None:
            raise InputError("give either fitted centroids [K, D] or n_clusters to fit later")
        if n_clusters is not None:
            check_int(n_clusters, "n_clusters", owner="KMeansTokenizer")
        self.encoder = encoder
        self.preprocessing = encoder.preprocessing
        self.config = dict(config or {})
        self.n_clusters = n_clusters if centroids is None else centroids.shape[0]
        self.kmeans: KMeans | None = None
        self.register_buffer("centroids", None)
        self.register_buffer("centroid_sqnorm", None)
        if centroids is not None:
            self.set_centroids(centroids)

    def set_centroids(self, centroids: torch.Tensor) -> None:
        check_codebook(centroids, "centroids")
        if centroids.shape[1] != self.encoder.embed_dim:
            raise InputError(
                f"centroids have width {centroids.shape[1]} but the encoder gives "
                f"{self.encoder.embed_dim}-dim features; they were fitted on another encoder"
            )
        device = next(self.encoder.parameters(), torch.empty(0)).device
        self.centroids = centroids.detach().to(device, torch.float32)
        self.centroid_sqnorm = self.centroids.square().sum(1)
        self.n_clusters = centroids.shape[0]

    # ---------------------------------------------------------------------------- protocol
    can_decode = False  # K-Means tokens reach pixels through a second stage (DiGIT's), not here
    stats = None  # discrete tokens are not normalised

    @property
    def vocab_size(self) -> int:
        return self.n_clusters

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        raise UnsupportedError(
            "K-Means tokens have no pixel decoder: DiGIT decodes them through its stage 2 (train-stage2, "
            "then sample with stage2_run=...)"
        )

    @property
    def latent_shape(self) -> tuple[int, int]:
        return tuple(self.encoder.feature_shape()[-2:])

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        """The encoder's feature map ``[B, D, h, w]`` for images in [0, 1]."""
        if images.ndim != 4 or images.shape[1] != 3 or not images.is_floating_point():
            raise InputError(
                f"expected float RGB images [B, 3, H, W] in [0, 1], got {images.dtype} {tuple(images.shape)}"
            )
        if checking_values() and images.numel() and (images.min() < -1e-3 or images.max() > 1 + 1e-3):
            raise InputError(
                f"images must lie in [0, 1] (got [{float(images.min()):.3g}, {float(images.max()):.3g}]); "
                "the encoder applies its own normalisation"
            )
        feats = self.encoder(images)
        if feats.ndim != 4:
            raise InputError(f"the encoder must return a [B, D, h, w] feature map, got {tuple(feats.shape)}")
        return feats

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        if self.centroids is None:
            raise StateError(
                "this K-Means tokenizer has no centroids yet: call fit(...) or load a centroid file"
            )
        feats = self.features(images)  # B D h w
        rows = rearrange(feats, "b d h w -> (b h w) d")
        ids, _ = nearest(rows, self.centroids, self.centroid_sqnorm, with_distances=False)
        return rearrange(ids, "(b h w) -> b h w", b=feats.shape[0], h=feats.shape[2])  # B h w

    def lookup(self, tokens: torch.Tensor) -> torch.Tensor:
        """Centroid features ``[B, D, h, w]`` of a token grid ``[B, h, w]``, comparable with ``features``."""
        if self.centroids is None:
            raise StateError("this K-Means tokenizer has no centroids yet")
        if tokens.ndim != 3:
            raise InputError(f"expected a token grid [B, h, w], got shape {tuple(tokens.shape)}")
        check_token_ids(tokens, self.n_clusters)
        return rearrange(self.centroids[tokens.to(self.centroids.device)], "b h w d -> b d h w")

    # ---------------------------------------------------------------------------- fitting and files
    def fit(self, images: Iterable[Any], **kmeans_kwargs: Any) -> KMeansTokenizer:
        """Fit the centroids on the features of a stream of image batches (or ``(images, labels)``)."""

        def feature_rows():
            for batch in images:
                if isinstance(batch, (tuple, list)):
                    batch = batch[0]
                yield rearrange(self.features(batch), "b d h w -> (b h w) d")

        device = next(self.encoder.parameters(), torch.empty(0)).device
        self.kmeans = KMeans(self.n_clusters, device=kmeans_kwargs.pop("device", device), **kmeans_kwargs)
        self.kmeans.fit(feature_rows())
        self.set_centroids(self.kmeans.centroids)
        self.config.update({k: v for k, v in self.kmeans.config().items() if k != "kind"})
        return self

    def save(self, path: str | os.PathLike) -> Path:
        if self.centroids is None:
            raise StateError("nothing to save: the tokenizer has no centroids yet")
        return save_centroids(self.centroids, path, {"kind": "kmeans", **self.config})


# ------------------------------------------------------------------------------------------------
# Registered builders
# ------------------------------------------------------------------------------------------------
def build_kmeans(
    *,
    encoder: str | None = None,
    centroids: str | os.PathLike | torch.Tensor | None = None,
    n_clusters: int | None = None,
    features: str | None = None,
    **encoder_kwargs: Any,
) -> KMeansTokenizer:
    """A K-Means tokenizer over a registered encoder; ``centroids`` is a tensor, our file or DiGIT's npy.

    What is not given comes from our centroid file's config (encoder name, feature preset and
    builder arguments such as ``image_size``/``pretrained``), else DiGIT's DINOv2-B/14-reg with the
    ``digit`` features (block L−3 + final norm, 16×16 grid).  ``encoder_kwargs`` go to the encoder
    builder.
    """
    saved: dict[str, Any] = {}
    if centroids is not None and not isinstance(centroids, torch.Tensor):
        centroids, saved = load_centroids(centroids)
    encoder = encoder or saved.get("encoder") or "dinov2-vitb14-reg"
    features = features or saved.get("features") or "digit"
    encoder_kwargs = {**saved.get("encoder_kwargs", {}), **encoder_kwargs}
    module = registry.encoders.build(encoder, features=features, **encoder_kwargs)
    config = {"encoder": encoder, "features": features, "encoder_kwargs": encoder_kwargs}
    if centroids is None and n_clusters is None:
        n_clusters = 8192
    return KMeansTokenizer(module, centroids, n_clusters=n_clusters, config=config)


# Registry name -> the ``build_kmeans`` keyword arguments of that tokenizer; one builder per row below.
SIZES: dict[str, dict] = {
    # Everything from the centroid file, else DiGIT's K-Means 8k over DINOv2-B/14-reg (build_kmeans).
    "kmeans": dict(),
    # Random ``test-vit-tiny`` features (32 px, 8×8 grid) and 64 clusters: for tests and demos.
    "test-kmeans-tiny": dict(encoder="test-vit-tiny", image_size=32, n_clusters=64),
}


def kmeans(**kwargs: Any) -> KMeansTokenizer:
    return build_kmeans(**{**SIZES["kmeans"], **kwargs})


def tiny_kmeans(**kwargs: Any) -> KMeansTokenizer:
    return build_kmeans(**{**SIZES["test-kmeans-tiny"], **kwargs})
