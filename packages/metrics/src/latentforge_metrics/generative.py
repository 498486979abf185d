"""Distribution metrics of generated images: FID, sFID, rFID, FD-DINOv2, KID, Inception Score and
precision/recall.

Every metric has ``update`` / ``compute`` / ``reset`` / ``merge`` and states its protocol: which
preprocessing feeds the Inception (``protocol=``, see ``inception.PROTOCOLS``), which reference
(an ``.npz``, statistics, or real images given with ``update(images, real=True)``), and for IS how
the splits are cut. ``compute`` sees every process's state when ``torch.distributed`` is initialised.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from latentforge_core import registry
from latentforge_core.device import resolve_device
from latentforge_core.distances import partial_sq_distances, row_blocks
from latentforge_core.errors import InputError, InputTypeError, StateError
from latentforge_metrics.inception import (
    FIDInceptionV3,
    InceptionProtocol,
    check_images,
    fid_inception_v3,
    get_protocol,
    preprocess,
)
from latentforge_metrics.npz import ReferenceStats, iter_npz_images, load_reference, verify_reference
from latentforge_metrics.stats import (
    FeatureBank,
    GaussianStats,
    distributed_world,
    frechet_distance,
    split_indices,
)


# ------------------------------------------------------------------------------------------------
# Functional forms
# ------------------------------------------------------------------------------------------------
def _split_score(p: torch.Tensor, log_p: torch.Tensor) -> float:
    """exp(E KL(p(y|x) || p(y))) of one split. log p(y) is a logsumexp of the log-probabilities, so a
    saturated softmax (probabilities that underflow) gives the exact score, never NaN or inf."""
    log_mean = torch.logsumexp(log_p, dim=0, keepdim=True) - math.log(p.shape[0])
    kl = p * (log_p - log_mean)
    return kl.sum(dim=1).mean().exp().item()


def inception_score(logits: torch.Tensor, splits: int = 10, shuffle: bool = True, seed: int = 2020):
    """(mean, std) as torch-fidelity: RandomState(seed) shuffle, splits [i·N//s, (i+1)·N//s), float64."""
    logits = torch.as_tensor(logits).double().cpu()
    n = logits.shape[0]
    if n < splits:
        raise InputError(f"the Inception Score needs at least splits={splits} samples, got {n}")
    if shuffle:
        logits = logits[torch.from_numpy(np.random.RandomState(seed).permutation(n))]
    p, log_p = logits.softmax(dim=1), logits.log_softmax(dim=1)
    scores = [_split_score(p[lo:hi], log_p[lo:hi]) for lo, hi in split_indices(n, splits)]
    return float(np.mean(scores)), float(np.std(scores))


def inception_score_adm(logits: torch.Tensor, split_size: int = 5000):
    """(mean, std) as the ADM evaluator: float32 softmax, consecutive blocks of ``split_size``."""
    logits = torch.as_tensor(logits).float().cpu()
    p, log_p = logits.softmax(dim=1), logits.log_softmax(dim=1)
    scores = [_split_score(a, b) for a, b in zip(p.split(split_size), log_p.split(split_size), strict=True)]
    return float(np.mean(scores)), float(np.std(scores))


@torch.no_grad()
def _kth_neighbour_sq_radii(x: torch.Tensor, k: int, tile: int) -> torch.Tensor:
    """Squared distance of every row of ``x [N, D]`` to its k-th nearest other row, ``[N]``.

    Distances are symmetric, so each row tile only meets itself and the rows after it (half the
    GEMM work of the full matrix): the strip's row-wise top-k serves the tile's rows and its
    column-wise top-k the later rows.  Self-distances stay in, as the 0th neighbour (as torch-fidelity).
    """
    n = x.shape[0]
    sqnorm = x.square().sum(1)  # N
    minus_two_x = x * -2.0  # N D
    best = torch.full((n, k + 1), math.inf, device=x.device)  # N k+1: the k+1 smallest so far
    for start in range(0, n, tile):
        stop = min(start + tile, n)
        strip = partial_sq_distances(x[start:stop], minus_two_x[start:], sqnorm[start:])  # t N−start
        strip += sqnorm[start:stop, None]  # ‖xᵢ − xⱼ‖²
        keep = min(k + 1, strip.shape[1])
        rows = strip.topk(keep, dim=1, largest=False).values  # t keep
        best[start:stop] = torch.cat([best[start:stop], rows], 1).topk(k + 1, dim=1, largest=False).values
        if stop < n:  # the later rows' distances to this tile: the strip's columns beyond it
            cols = strip[:, stop - start :].topk(min(k + 1, stop - start), dim=0, largest=False).values
            merged = torch.cat([best[stop:], cols.T], 1)  # N−stop k+1+keep
            best[stop:] = merged.topk(k + 1, dim=1, largest=False).values
    return best[:, k].clamp_min_(0.0)


@torch.no_grad()
def _inside_fractions(
    queries: torch.Tensor,
    centres: torch.Tensor,
    sq_radii_q: torch.Tensor,
    sq_radii_c: torch.Tensor,
    tile: int,
) -> tuple[float, float]:
    """(fraction of ``queries`` within some ball around a centre, fraction of ``centres`` within some
    ball around a query), both from one pass of query × centre distances."""
    q_sqnorm = queries.square().sum(1)  # Nq
    centre_hit = torch.zeros(centres.shape[0], dtype=torch.bool, device=centres.device)
    query_hits = 0
    for start, block, dist in row_blocks(queries, centres, rows=tile):
        dist += q_sqnorm[start : start + block.shape[0], None]  # t Nc: ‖q − c‖²
        query_hits += int((dist <= sq_radii_c[None]).any(dim=1).sum())
        centre_hit |= (dist <= sq_radii_q[start : start + block.shape[0], None]).any(dim=0)
    return query_hits / queries.shape[0], int(centre_hit.sum()) / centres.shape[0]


# Rows per tile of the k-NN searches: 1024 × N fp32 strips, and ~10 tiles per 10k set so that the
# symmetric radii search skips nearly half of the pairs.
_PRC_TILE_ROWS = 1024


def precision_recall(real, fake, k: int = 3, batch_size: int = 10000, device=None) -> dict[str, float]:
    """Improved precision/recall (k-NN manifolds): precision = generated inside the real manifold.

    float32 Euclidean distances as torch-fidelity (compared squared, from core's blocked GEMM); the ADM
    evaluator's fp16 squared distances move both numbers by up to about 1e-2.  ``batch_size`` caps the
    rows per tile: a tile holds ``rows × N`` fp32 distances.
    """
    device = resolve_device(device)
    real, fake = (torch.as_tensor(f).float().to(device) for f in (real, fake))
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise InputError(
            f"features must be [N, D] with one D, got {tuple(real.shape)} and {tuple(fake.shape)}"
        )
    if min(real.shape[0], fake.shape[0]) <= k:
        raise InputError(f"precision/recall with k={k} needs more than {k} samples per set")
    tile = min(batch_size, _PRC_TILE_ROWS)
    sq_radii_real = _kth_neighbour_sq_radii(real, k, tile)
    sq_radii_fake = _kth_neighbour_sq_radii(fake, k, tile)
    precision, recall = _inside_fractions(fake, real, sq_radii_fake, sq_radii_real, tile)
    return {"precision": precision, "recall": recall}


def _mmd2_cubic(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Unbiased MMD² of two sets of m rows under k(a, b) = (a·b / d + 1)³ (self-pairs left out)."""
    m, d = x.shape
    k_xx, k_yy, k_xy = ((a @ b.T / d + 1) ** 3 for a, b in ((x, x), (y, y), (x, y)))  # [m, m] each
    within = k_xx.sum() - k_xx.diagonal().sum() + k_yy.sum() - k_yy.diagonal().sum()
    return within / (m * (m - 1)) - 2 * k_xy.sum() / m**2


def kernel_inception_distance(
    fake, real, subsets: int = 100, subset_size: int = 1000, seed: int = 2020, device=None
) -> tuple[float, float]:
    """(mean, std) of the unbiased MMD² over ``subsets`` random subsets, as torch-fidelity draws them:
    ``RandomState(seed).choice(n, subset_size, replace=False)``, generated set first, then real;
    float64; std with ddof 0 (torch-fidelity, torchmetrics). clean-fid's ``kernel_distance`` is the same
    estimator on unseeded subsets and returns only the mean."""
    device = resolve_device(device)
    fake, real = (torch.as_tensor(f).to(device, torch.float64) for f in (fake, real))
    if fake.ndim != 2 or real.ndim != 2 or fake.shape[1] != real.shape[1]:
        raise InputError(
            f"features must be [N, D] with one D, got {tuple(fake.shape)} and {tuple(real.shape)}"
        )
    if subsets < 1 or subset_size < 2:
        raise InputError(f"KID needs subsets ≥ 1 and subset_size ≥ 2, got {subsets} and {subset_size}")
    if min(fake.shape[0], real.shape[0]) < subset_size:
        raise InputError(
            f"KID with subset_size={subset_size} needs at least that many generated and reference samples, "
            f"got {fake.shape[0]} and {real.shape[0]}: give more samples or a smaller subset_size"
        )
    rng = np.random.RandomState(seed)
    mmds = []
    for _ in range(subsets):
        f = fake[torch.from_numpy(rng.choice(fake.shape[0], subset_size, replace=False)).to(device)]
        r = real[torch.from_numpy(rng.choice(real.shape[0], subset_size, replace=False)).to(device)]
        mmds.append(_mmd2_cubic(f, r).item())
    return float(np.mean(mmds)), float(np.std(mmds))


# ------------------------------------------------------------------------------------------------
# Shared pieces
# ------------------------------------------------------------------------------------------------
class _UsesInception:
    """Builds the FID Inception lazily (weights from ``weights`` or the torch hub cache)."""

    def _setup_inception(self, protocol, weights, inception, device) -> None:
        self.device = resolve_device(device) if inception is None else next(inception.parameters()).device
        self.protocol: InceptionProtocol = get_protocol(protocol)
        self._weights, self._inception = weights, inception

    @property
    def inception(self) -> FIDInceptionV3:
        if self._inception is None:
            self._inception = fid_inception_v3(self._weights, self.protocol, self.device)
        return self._inception

    @torch.no_grad()
    def inception_features(self, images: torch.Tensor, features=("pool3",)) -> dict[str, torch.Tensor]:
        """The metric's protocol applies, whatever protocol the network was built with."""
        x = preprocess(images.to(self.device), self.protocol)
        return self.inception.forward_features(x, features)


def _check_same(metric, other) -> None:
    if type(other) is not type(metric):
        raise InputTypeError(f"cannot merge a {type(other).__name__} into a {type(metric).__name__}")


class FrechetMetric:
    """Fréchet distance between the Gaussians of generated and reference features."""

    dim: int | None = None
    reference_key = "fid"  # which statistics of a reference file this metric compares with

    def __init__(self, reference=None, check_reference: bool = True):
        self.fake, self.real = GaussianStats(self.dim), GaussianStats(self.dim)
        self.reference: GaussianStats | None = None
        if reference is not None:
            self.set_reference(reference, check_reference)

    def set_reference(self, reference, check: bool = True) -> None:
        """A path (ADM or pytorch-fid ``.npz``), ``ReferenceStats``, ``GaussianStats`` or ``(mu, sigma)``.
        A path named like a known ADM reference batch must match its SHA-256 unless ``check=False``."""
        if isinstance(reference, str | os.PathLike):
            if check:
                verify_reference(reference)
            reference = load_reference(reference)
        if isinstance(reference, ReferenceStats):
            stats = getattr(reference, self.reference_key)
            if stats is None:
                raise InputError(
                    f"{reference.path} has no {self.reference_key} statistics for {type(self).__name__}"
                )
            reference = stats
        if isinstance(reference, tuple):
            reference = GaussianStats.from_moments(*reference)
        if not isinstance(reference, GaussianStats):
            raise InputTypeError(
                f"unsupported reference {type(reference).__name__}; expected a path or statistics"
            )
        if self.dim is not None and reference.dim != self.dim:
            raise InputError(
                f"the reference statistics are {reference.dim}-d but {type(self).__name__} features are "
                f"{self.dim}-d (pool3 is 2048-d, sFID's spatial features 2023-d)"
            )
        self.reference = reference

    def features(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def update(self, images: torch.Tensor, real: bool = False) -> None:
        self.update_features(self.features(images), real=real)

    def update_features(self, features: torch.Tensor, real: bool = False) -> None:
        if real and self.reference is not None:
            raise InputError(f"{type(self).__name__} has a fixed reference; real images are not accumulated")
        (self.real if real else self.fake).update(features)

    def compute(self) -> float:
        fake = self.fake.gathered()
        real = self.reference if self.reference is not None else self.real.gathered()
        if fake.n == 0:
            raise StateError(f"{type(self).__name__}: no generated images were given to update()")
        if real.mean is None:
            raise InputError(
                f"{type(self).__name__} has no reference: pass reference=<.npz or statistics> or give real "
                "images with update(images, real=True)"
            )
        return frechet_distance(fake.mu, fake.sigma, real.mu, real.sigma)

    def reset(self) -> None:
        """Forget the accumulated images (a fixed reference is kept)."""
        self.fake.reset()
        self.real.reset()

    def merge(self, other: FrechetMetric) -> None:
        _check_same(self, other)
        self.fake.merge(other.fake)
        self.real.merge(other.real)


# ------------------------------------------------------------------------------------------------
# Inception metrics
# ------------------------------------------------------------------------------------------------
class FID(FrechetMetric, _UsesInception):
    """FID on 2048-d pool3 features. ``protocol``: "torch-fidelity" (= "adm", TF graph), "pytorch-fid",
    "torchmetrics", "clean" (clean-fid); references computed with one protocol only compare with images
    fed by it."""

    dim, feature = 2048, "pool3"

    def __init__(
        self,
        reference=None,
        *,
        protocol="torch-fidelity",
        weights=None,
        inception=None,
        device=None,
        check_reference: bool = True,
    ):
        self._setup_inception(protocol, weights, inception, device)
        super().__init__(reference, check_reference)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.inception_features(images, (self.feature,))[self.feature]


class SFID(FID):
    """sFID (Nash et al.; ADM): the Fréchet distance of Mixed_6d's 7-channel spatial features (2023-d)."""

    dim, feature, reference_key = 2023, "spatial", "spatial"


class RFID(FID):
    """Reconstruction FID: reconstructions against their originals, both accumulated by ``update``."""

    def update(self, images: torch.Tensor, target: torch.Tensor | None = None, real: bool = False) -> None:
        if target is not None:
            if target.shape != images.shape:
                raise InputError(
                    f"reconstructions {tuple(images.shape)} and originals {tuple(target.shape)} differ"
                )
            self.update_features(self.features(target), real=True)
        super().update(images, real=real)


class InceptionScore(_UsesInception):
    """IS on the unbiased 1008-way logits. ``protocol="adm"`` splits as the ADM evaluator (blocks of
    5000, no shuffle); any other protocol splits as torch-fidelity (10 splits after a seeded shuffle)."""

    def __init__(
        self, splits: int = 10, *, protocol="torch-fidelity", weights=None, inception=None, device=None
    ):
        self.split_mode = "adm" if protocol == "adm" else "torch-fidelity"
        self.splits = splits
        self._setup_inception(protocol, weights, inception, device)
        self.logits = FeatureBank(1008)

    def update(self, images: torch.Tensor) -> None:
        self.logits.update(self.inception_features(images, ("logits",))["logits"])

    def update_features(self, logits: torch.Tensor) -> None:
        self.logits.update(logits)

    def compute(self) -> dict[str, float]:
        logits = self.logits.gathered()
        if self.split_mode == "adm":
            mean, std = inception_score_adm(logits)
        else:
            mean, std = inception_score(logits, self.splits)
        return {"inception_score": mean, "inception_score_std": std}

    def reset(self) -> None:
        self.logits.reset()

    def merge(self, other: InceptionScore) -> None:
        _check_same(self, other)
        self.logits.merge(other.logits)


class _Pool3Sets(_UsesInception):
    """Generated and real pool3 rows kept whole (P/R and KID need the samples, not moments). The real
    set: an ADM ``.npz`` whose ``arr_0`` images are fed on first use, a feature tensor ``[N, 2048]``,
    or real images given with ``update(images, real=True)``."""

    def _setup_sets(self, reference, check_reference: bool) -> None:
        self.fake, self.real = FeatureBank(2048), FeatureBank(2048)
        self.reference_features: torch.Tensor | None = None
        self.reference_path = None
        if isinstance(reference, str | os.PathLike):
            if check_reference:
                verify_reference(reference)
            self.reference_path = Path(reference)
        elif reference is not None:
            self.reference_features = torch.as_tensor(reference).float()
            if self.reference_features.ndim != 2 or self.reference_features.shape[1] != 2048:
                raise InputError(
                    f"reference features must be [N, 2048], got {tuple(self.reference_features.shape)}"
                )

    def update(self, images: torch.Tensor, real: bool = False) -> None:
        self.update_features(self.inception_features(images)["pool3"], real=real)

    def update_features(self, features: torch.Tensor, real: bool = False) -> None:
        if real and (self.reference_path is not None or self.reference_features is not None):
            raise InputError(f"{type(self).__name__} has a fixed reference; real images are not accumulated")
        (self.real if real else self.fake).update(features)

    def _reference(self) -> torch.Tensor:
        if self.reference_path is not None and self.reference_features is None:
            bank = FeatureBank(2048)
            for batch in iter_npz_images(self.reference_path):
                bank.update(self.inception_features(batch)["pool3"].cpu())
            self.reference_features = torch.cat(bank.parts)
        if self.reference_features is not None:
            return self.reference_features
        if not self.real.parts and distributed_world() == 1:
            raise InputError(
                f"{type(self).__name__} has no reference: pass reference= or update(images, real=True)"
            )
        return self.real.gathered()

    def reset(self) -> None:
        self.fake.reset()
        self.real.reset()

    def merge(self, other: _Pool3Sets) -> None:
        _check_same(self, other)
        self.fake.merge(other.fake)
        self.real.merge(other.real)


class PrecisionRecall(_Pool3Sets):
    """Improved precision/recall on pool3 (k = 3). ``reference``: an ADM ``.npz`` with ``arr_0`` images,
    a real-feature tensor ``[N, 2048]``, or real images given with ``update(images, real=True)``."""

    def __init__(
        self,
        reference=None,
        *,
        k: int = 3,
        batch_size: int = 10000,
        protocol="torch-fidelity",
        weights=None,
        inception=None,
        device=None,
        check_reference: bool = True,
    ):
        self.k, self.batch_size = k, batch_size
        self._setup_inception(protocol, weights, inception, device)
        self._setup_sets(reference, check_reference)

    def compute(self) -> dict[str, float]:
        return precision_recall(self._reference(), self.fake.gathered(), self.k, self.batch_size, self.device)


class KID(_Pool3Sets):
    """Kernel Inception Distance (Bińkowski et al. 2018): unbiased MMD² under the cubic kernel
    (x·y / 2048 + 1)³ on pool3, averaged over ``subsets`` random subsets of ``subset_size`` per set
    (torch-fidelity, torchmetrics and clean-fid defaults: 100 × 1000), drawn as torch-fidelity draws
    them. ``reference`` as for ``PrecisionRecall``; ``protocol="clean"`` feeds images as clean-fid."""

    def __init__(
        self,
        reference=None,
        *,
        subsets: int = 100,
        subset_size: int = 1000,
        seed: int = 2020,
        protocol="torch-fidelity",
        weights=None,
        inception=None,
        device=None,
        check_reference: bool = True,
    ):
        self.subsets, self.subset_size, self.seed = subsets, subset_size, seed
        self._setup_inception(protocol, weights, inception, device)
        self._setup_sets(reference, check_reference)

    def compute(self) -> dict[str, float]:
        mean, std = kernel_inception_distance(
            self.fake.gathered(), self._reference(), self.subsets, self.subset_size, self.seed, self.device
        )
        return {"kid": mean, "kid_std": std}


# ------------------------------------------------------------------------------------------------
# FD-DINOv2 (or any registered encoder)
# ------------------------------------------------------------------------------------------------
def encoder_features(
    encoder: nn.Module | Callable, images: torch.Tensor, output: str = "cls"
) -> torch.Tensor:
    """``[B, C]`` features of a registered encoder (its ``features(output=...)``) or any callable.

    Maps ``[B, C, h, w]`` and token outputs ``[B, N, C]`` are averaged to ``[B, C]``.
    """
    images = check_images(images)
    x = images.float() / 255 if images.dtype == torch.uint8 else images.float()
    with torch.no_grad():
        feats = encoder.features(x, output=output) if hasattr(encoder, "features") else encoder(x)
    if feats.ndim == 4:
        feats = feats.mean(dim=(2, 3))
    elif feats.ndim == 3:
        feats = feats.mean(dim=1)
    return feats.float()


class FDDINOv2(FrechetMetric):
    """Fréchet distance in the feature space of a registered encoder (default DINOv2 ViT-L/14, CLS
    token, as dgm-eval's FD_DINOv2); images are resized by the encoder's own preprocessing."""

    def __init__(
        self,
        reference=None,
        *,
        encoder: str | nn.Module = "dinov2-vitl14",
        output: str = "cls",
        encoder_kwargs: dict | None = None,
        device=None,
    ):
        self.device = resolve_device(device)
        if isinstance(encoder, str):
            encoder = registry.encoders.build(encoder, **(encoder_kwargs or {}))
        self.encoder = encoder.to(self.device).eval()
        self.output = output
        self.dim = getattr(encoder, "embed_dim", None)
        super().__init__(reference)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        if not isinstance(images, torch.Tensor):
            raise InputTypeError(
                f"{type(self).__name__}: images must be a torch.Tensor [B, 3, H, W] (float in [0, 1] or "
                f"uint8), got {type(images).__name__}"
            )
        return encoder_features(self.encoder, images.to(self.device), self.output)


# ------------------------------------------------------------------------------------------------
# The ADM evaluator, in one pass over a sample batch
# ------------------------------------------------------------------------------------------------
def evaluate_npz(
    samples: str | os.PathLike,
    reference: str | os.PathLike,
    *,
    weights=None,
    inception=None,
    batch_size: int = 64,
    device=None,
    check_reference: bool = True,
) -> dict[str, float]:
    """IS, FID, sFID, precision and recall of an ADM sample batch against an ADM reference batch,
    with the evaluator's protocol (TF preprocessing, 5000-sample IS splits, k = 3). A reference named
    like a known ADM batch must match its SHA-256 unless ``check_reference=False``."""
    if check_reference:
        verify_reference(reference)
    stats = load_reference(reference)
    fid = FID(stats, protocol="adm", weights=weights, inception=inception, device=device)
    sfid = SFID(stats, protocol="adm", inception=fid.inception, device=device)
    isc = InceptionScore(protocol="adm", inception=fid.inception)
    prc = PrecisionRecall(reference, protocol="adm", inception=fid.inception, check_reference=False)
    for batch in iter_npz_images(samples, batch_size):
        out = fid.inception_features(batch, ("pool3", "logits", "spatial"))
        fid.update_features(out["pool3"])
        sfid.update_features(out["spatial"])
        isc.update_features(out["logits"])
        prc.update_features(out["pool3"])
    return {
        "inception_score": isc.compute()["inception_score"],
        "fid": fid.compute(),
        "sfid": sfid.compute(),
        **prc.compute(),
    }
