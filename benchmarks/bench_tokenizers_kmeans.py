"""K-Means fit time and nearest-centroid assignment throughput: ours vs raw faiss vs scikit-learn.

Full size (``make bench``): 100k × 768 points, K = 1024, 10 Lloyd iterations, as DiGIT's features
would be clustered.  Every fit row also records the inertia of its centroids on the same points,
so a faster peer that clusters worse is visible, and the ``kmeans-equal-inertia`` group times
ours with the fewest Lloyd iterations that cluster at least as well as scikit-learn's
``MiniBatchKMeans`` does: the comparison the tokenizer issue asks for.  The Lloyd fits and the
assignments run interleaved, round by round, so their ratios are same-run ratios.  Just those two
groups at full size:

    pytest benchmarks/bench_tokenizers_kmeans.py --benchmark-enable -k "kmeans_fit or kmeans_assign"
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

from latentforge_tokenizers.codebook import nearest
from latentforge_tokenizers.kmeans import KMeans

faiss = pytest.importorskip("faiss")
sklearn_cluster = pytest.importorskip("sklearn.cluster")


@functools.cache
def problem(full: bool) -> tuple[np.ndarray, int, int]:
    """(points [N, D] float32, K, iterations): a mixture of 4K Gaussians, so clusters exist."""
    n, d, k, n_iter = (100_000, 768, 1024, 10) if full else (2_000, 32, 16, 3)
    rng = np.random.default_rng(0)
    means = rng.normal(scale=0.5, size=(4 * k, d)).astype(np.float32)
    points = means[rng.integers(0, 4 * k, n)] + rng.normal(size=(n, d)).astype(np.float32)
    return np.ascontiguousarray(points), k, n_iter


def fit_ours(x, k, n_iter, backend):
    return KMeans(k, n_iter=n_iter, backend=backend, seed=1234).fit(torch.from_numpy(x)).centroids.numpy()


def fit_faiss(x, k, n_iter):
    km = faiss.Kmeans(x.shape[1], k, niter=n_iter, seed=1234)
    km.train(x)
    return km.centroids


def fit_sklearn(x, k, n_iter):
    km = sklearn_cluster.MiniBatchKMeans(
        k, init="random", n_init=1, max_iter=n_iter, batch_size=4096, random_state=0, compute_labels=False
    )
    return km.fit(x).cluster_centers_.astype(np.float32)


# Lloyd's iterations on all points: ours (the default backend, torch), ours on faiss, raw faiss.
LLOYD_FITS = {
    "ours": lambda x, k, it: fit_ours(x, k, it, "auto"),
    "ours-faiss": lambda x, k, it: fit_ours(x, k, it, "faiss"),
    "faiss": fit_faiss,
}
FITS = {**LLOYD_FITS, "sklearn-minibatch": fit_sklearn}


@pytest.mark.headline
def test_kmeans_fit(measure_interleaved, benchmark, full):
    """The Lloyd fits in turn, round by round (one fit varies by ±15% on a loaded 2-core machine)."""
    x, k, n_iter = problem(full)
    n, d = x.shape
    centroids = {}

    def fit(impl):
        return lambda: centroids.__setitem__(impl, LLOYD_FITS[impl](x, k, n_iter))

    measure_interleaved(
        {impl: fit(impl) for impl in LLOYD_FITS},
        group="kmeans-fit",
        items=n,
        unit="points/s",
        flops=2.0 * n * k * d * n_iter,
        rounds=3,
    )
    for impl, found in centroids.items():
        inertia = inertia_of(x, found)
        benchmark.extra_info[f"inertia_per_point[{impl}]"] = inertia / n
        print(f"kmeans-fit {impl}: inertia per point {inertia / n:.3f}")
        assert found.shape == (k, d) and np.isfinite(inertia)


def test_kmeans_fit_sklearn(measure, benchmark, full):
    """MiniBatchKMeans visits fewer points (and stops early): no Lloyd FLOPs, so no MFU."""
    x, k, n_iter = problem(full)
    centroids = measure(
        lambda: fit_sklearn(x, k, n_iter),
        group="kmeans-fit",
        impl="sklearn-minibatch",
        items=x.shape[0],
        unit="points/s",
    )
    inertia = inertia_of(x, centroids)
    benchmark.extra_info["inertia_per_point"] = inertia / len(x)
    print(f"kmeans-fit sklearn-minibatch: inertia per point {inertia / len(x):.3f}")


def inertia_of(x: np.ndarray, centroids: np.ndarray) -> float:
    return float(nearest(torch.from_numpy(x), torch.from_numpy(centroids))[1].sum(dtype=torch.float64))


@functools.cache
def sklearn_target(full: bool) -> float:
    """Inertia scikit-learn's MiniBatchKMeans reaches on the benchmark problem."""
    x, k, n_iter = problem(full)
    return inertia_of(x, fit_sklearn(x, k, n_iter))


@functools.cache
def iterations_to_reach(full: bool, target: float) -> int:
    """Fewest Lloyd iterations after which our centroids' inertia is at most ``target``."""
    x, k, n_iter = problem(full)
    for it in range(1, 4 * n_iter + 1):
        if inertia_of(x, fit_ours(x, k, it, "auto")) <= target:
            return it
    raise AssertionError(f"ours did not reach scikit-learn's inertia {target:.4g} in {4 * n_iter} iterations")


@pytest.mark.parametrize("impl", ["ours", "sklearn-minibatch"])
def test_kmeans_equal_inertia(measure, benchmark, full, impl):
    x, k, n_iter = problem(full)
    target = sklearn_target(full)
    iterations = iterations_to_reach(full, target) if impl == "ours" else n_iter
    fit = FITS[impl]
    centroids = measure(
        lambda: fit(x, k, iterations),
        group="kmeans-equal-inertia",
        impl=impl,
        items=x.shape[0],
        unit="points/s",
        rounds=1,
    )
    inertia = inertia_of(x, centroids)
    benchmark.extra_info.update(iterations=iterations, inertia_per_point=inertia / len(x))
    print(f"kmeans-equal-inertia {impl}: {iterations} iterations, inertia/point {inertia / len(x):.3f}")
    assert inertia <= target * (1 + 1e-6)


@pytest.mark.headline
def test_kmeans_assign(measure_interleaved, full):
    """Nearest-centroid ids: ours (ids only, as ``KMeans.assign`` and the tokenizer's ``encode``; and
    with the distances) against faiss' exact ``IndexFlatL2``, interleaved round by round."""
    x, k, _ = problem(full)
    n, d = x.shape
    centroids = x[np.random.default_rng(1).choice(n, k, replace=False)]
    xt, ct = torch.from_numpy(x), torch.from_numpy(centroids)
    index = faiss.IndexFlatL2(d)
    index.add(centroids)
    ids = {}
    measure_interleaved(
        {
            "ours": lambda: ids.__setitem__("ours", nearest(xt, ct, with_distances=False)[0]),
            "ours-distances": lambda: ids.__setitem__("ours-distances", nearest(xt, ct)[0]),
            "faiss": lambda: ids.__setitem__("faiss", torch.from_numpy(index.search(x, 1)[1][:, 0])),
        },
        group="kmeans-assign",
        items=n,
        unit="tokens/s",
        flops=2.0 * n * k * d,
    )
    assert torch.equal(ids["ours"], ids["ours-distances"])
    assert (ids["ours"] == ids["faiss"]).float().mean() > 0.999  # near-ties aside
