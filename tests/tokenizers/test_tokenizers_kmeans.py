"""K-Means against faiss and scikit-learn, exact assignment, files, and a tokenizer fitted on digits."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from einops import rearrange

from latentforge_core.checkpoint import load_checkpoint
from latentforge_core.protocols import Tokenizer
from latentforge_tokenizers.codebook import nearest
from latentforge_tokenizers.kmeans import KMeans, Reservoir, kmeans, load_centroids

faiss = pytest.importorskip("faiss")
sklearn_cluster = pytest.importorskip("sklearn.cluster")


def blobs(n=4000, d=24, centers=40, seed=0):
    rng = np.random.default_rng(seed)
    means = rng.normal(scale=2.0, size=(centers, d))  # overlapping: no cluster empties
    return (means[rng.integers(0, centers, n)] + rng.normal(size=(n, d))).astype(np.float32)


def inertia(x, centroids):
    x, c = np.asarray(x, np.float64), np.asarray(centroids, np.float64)
    return float(((x[:, None] - c[None]) ** 2).sum(-1).min(1).sum())


# ------------------------------------------------------------------------------------------------
# K-Means against the peers
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["faiss", "torch"])
def test_inertia_matches_faiss_and_sklearn_from_same_init(backend):
    x = blobs()
    k, n_iter = 32, 15
    init = x[np.random.default_rng(1).choice(len(x), k, replace=False)]
    ours = KMeans(k, n_iter=n_iter, backend=backend).fit(torch.from_numpy(x), init=init)
    peer_faiss = faiss.Kmeans(x.shape[1], k, niter=n_iter, seed=1234)
    peer_faiss.train(x, init_centroids=init)
    peer_sk = sklearn_cluster.KMeans(k, init=init, n_init=1, max_iter=n_iter, tol=0.0, algorithm="lloyd").fit(
        x
    )
    ours_i, faiss_i, sk_i = (
        inertia(x, c) for c in (ours.centroids, peer_faiss.centroids, peer_sk.cluster_centers_)
    )
    assert abs(ours_i - faiss_i) / faiss_i < 0.01
    assert abs(ours_i - sk_i) / sk_i < 0.01
    assert ours.score(x) == pytest.approx(ours_i, rel=1e-5)
    assert ours.backend_used == ("torch" if backend == "torch" else "faiss-cpu")
    # the objective falls as Lloyd's iterations go (faiss' convention: one value per iteration)
    assert len(ours.objective) == n_iter and ours.objective[-1] < ours.objective[0]


def test_torch_and_faiss_backends_agree_with_own_init_and_are_seeded():
    x = torch.from_numpy(blobs(n=3000, seed=3))
    runs = [KMeans(24, n_iter=10, backend=b, seed=7).fit(x) for b in ("torch", "torch", "faiss")]
    assert torch.equal(runs[0].centroids, runs[1].centroids)  # same seed → same result
    other = KMeans(24, n_iter=10, backend="torch", seed=8).fit(x)
    assert not torch.equal(runs[0].centroids, other.centroids)
    scores = [r.score(x) for r in runs]
    # different random inits (faiss draws its own): both land within a few percent of each other
    assert abs(scores[0] - scores[2]) / scores[2] < 0.05


def test_torch_backend_reseeds_empty_clusters():
    x = torch.cat([torch.zeros(50, 4), torch.ones(50, 4)]) + 0.01 * torch.randn(100, 4)
    init = torch.cat(
        [torch.zeros(1, 4), torch.ones(1, 4), torch.full((2, 4), 100.0)]
    )  # two far-away centroids
    km = KMeans(4, n_iter=5, backend="torch").fit(x, init=init)
    counts = torch.bincount(km.assign(x), minlength=4)
    assert (counts > 0).all(), counts
    assert km.centroids.abs().max() < 2


# ------------------------------------------------------------------------------------------------
# Assignment
# ------------------------------------------------------------------------------------------------
def test_assignment_equals_brute_force_argmin():
    gen = torch.Generator().manual_seed(0)
    x, c = torch.randn(3000, 48, generator=gen), torch.randn(300, 48, generator=gen)
    ids, dist = nearest(x, c, chunk_rows=257)  # several uneven chunks
    brute = ((x.double()[:, None] - c.double()[None]) ** 2).sum(-1)
    top2 = brute.topk(2, dim=1, largest=False).values
    clear = (top2[:, 1] - top2[:, 0]) > 1e-3  # ties aside
    assert clear.float().mean() > 0.99
    assert torch.equal(ids[clear], brute.argmin(1)[clear])
    torch.testing.assert_close(dist.double(), top2[:, 0], rtol=1e-4, atol=1e-3)
    # and the same ids as a faiss exact index
    index = faiss.IndexFlatL2(48)
    index.add(c.numpy())
    assert torch.equal(ids[clear], torch.from_numpy(index.search(x.numpy(), 1)[1][:, 0])[clear])


def test_ids_only_assignment_matches_the_full_one():
    gen = torch.Generator().manual_seed(2)
    x, c = torch.randn(2000, 32, generator=gen), torch.randn(100, 32, generator=gen)
    ids, dist = nearest(x, c, chunk_rows=300)
    ids_only, none = nearest(x, c, chunk_rows=300, with_distances=False)
    assert none is None and torch.equal(ids_only, ids)
    km = KMeans(100, n_iter=2).fit(x)
    assert km.backend_used == "torch"  # the default on CPU: faster than faiss-cpu
    assert torch.equal(km.assign(x), nearest(x, km.centroids)[0])  # assign takes the ids-only path


def test_torch_lloyd_objective_is_the_inertia_of_each_assignment():
    """Each iteration's objective is the inertia of the centroids it started from (faiss' convention)."""
    x = torch.from_numpy(blobs(n=1500, d=16, centers=12, seed=5))
    init = x[:12].clone()
    runs = [KMeans(12, n_iter=it, backend="torch").fit(x, init=init) for it in (1, 2, 3)]
    before = [init, runs[0].centroids, runs[1].centroids]
    for it, centroids in enumerate(before):
        assert runs[2].objective[it] == pytest.approx(inertia(x, centroids), rel=1e-5)


def test_assignment_in_fp32_from_half_inputs():
    gen = torch.Generator().manual_seed(1)
    x, c = torch.randn(500, 16, generator=gen), torch.randn(20, 16, generator=gen)
    ids_half, dist = nearest(x.half(), c.half())
    assert dist.dtype == torch.float32 and ids_half.dtype == torch.int64
    assert torch.equal(ids_half, nearest(x.half().float(), c.half().float())[0])


# ------------------------------------------------------------------------------------------------
# Streaming and subsampling
# ------------------------------------------------------------------------------------------------
def test_streaming_fit_subsamples_uniformly_and_reports_it():
    k, per = 8, 50
    batches = (
        torch.full((1000, 2), float(i)) + torch.rand(1000, 2) for i in range(10)
    )  # a one-pass generator
    km = KMeans(k, n_iter=3, max_points_per_centroid=per, backend="torch").fit(batches)
    assert (km.n_points_seen, km.n_points_used) == (10_000, k * per)
    assert km.config()["n_points_used"] == k * per
    # the reservoir keeps a uniform sample of the whole stream, not its head
    res = Reservoir(2000, seed=0)
    for i in range(20):
        res.add(torch.full((1000, 1), float(i)))
    shares = torch.bincount(res.rows[:, 0].long(), minlength=20).float() / 2000
    assert res.rows.shape == (2000, 1) and res.seen == 20_000
    assert (shares - 0.05).abs().max() < 0.025, shares


def test_all_points_used_below_the_cap_in_stream_order():
    x = torch.from_numpy(blobs(n=500, d=8))
    km = KMeans(10, n_iter=2, backend="torch").fit([x[:200], x[200:], (x[:0], None)])
    assert (km.n_points_seen, km.n_points_used) == (500, 500)


# ------------------------------------------------------------------------------------------------
# Files
# ------------------------------------------------------------------------------------------------
def test_centroid_files_round_trip_and_digit_npy(tmp_path):
    tok = tiny_tokenizer(torch.randn(16, 64))
    path = tok.save(tmp_path / "km.safetensors")
    state, config = load_checkpoint(path)
    assert list(state) == ["centroids"] and config["n_clusters"] == 16 and config["dim"] == 64
    assert torch.equal(load_centroids(path)[0], tok.centroids)
    digit = np.random.default_rng(0).normal(size=(16, 64)).astype(np.float32)  # km_8k.npy's layout, [K, D]
    np.save(tmp_path / "km_8k.npy", digit)
    loaded, _ = load_centroids(tmp_path / "km_8k.npy")
    assert loaded.dtype == torch.float32 and np.array_equal(loaded.numpy(), digit)
    (tmp_path / "bad.npy").write_bytes(b"not an array")
    with pytest.raises(ValueError, match="npy"):
        load_centroids(tmp_path / "bad.npy")
    with pytest.raises(FileNotFoundError):
        load_centroids(tmp_path / "missing.npy")


# ------------------------------------------------------------------------------------------------
# The tokenizer
# ------------------------------------------------------------------------------------------------
def tiny_tokenizer(centroids=None, n_clusters=None):
    return kmeans(encoder="test-vit-tiny", image_size=32, centroids=centroids, n_clusters=n_clusters)


def digits_32():
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.from_numpy(digits.images).float().div(16).unsqueeze(1)  # B 1 8 8 in [0, 1]
    images = F.interpolate(images, size=32, mode="bilinear", align_corners=False).clamp(0, 1)
    return images.expand(-1, 3, -1, -1).contiguous(), torch.from_numpy(digits.target)


def test_tokenizer_protocol_shapes_and_lookup():
    tok = tiny_tokenizer(torch.randn(16, 64))
    assert isinstance(tok, Tokenizer)
    images = torch.rand(3, 3, 32, 32)
    tokens = tok.encode(images)
    assert tokens.shape == (3, 8, 8) and tokens.dtype == torch.int64
    assert tok.latent_shape == (8, 8) and tok.vocab_size == 16
    feats = tok.features(images)
    expected = nearest(rearrange(feats, "b d h w -> (b h w) d"), tok.centroids)[0].view(3, 8, 8)
    assert torch.equal(tokens, expected)
    looked_up = tok.lookup(tokens)
    assert looked_up.shape == feats.shape
    # each token's centroid is at least as close to its feature as any other centroid
    d_own = (looked_up - feats).square().sum(1)
    d_all = torch.cdist(rearrange(feats, "b d h w -> (b h w) d"), tok.centroids).square().min(1).values
    torch.testing.assert_close(d_own.flatten(), d_all, rtol=1e-4, atol=1e-4)


def test_tokenizer_fitted_on_digits_gives_informative_tokens(tmp_path):
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split

    images, labels = digits_32()
    train, test = train_test_split(np.arange(len(labels)), test_size=0.3, random_state=0, stratify=labels)
    k = 64
    tok = tiny_tokenizer(n_clusters=k).fit(
        (images[train[i : i + 256]] for i in range(0, len(train), 256)), n_iter=20, seed=0, backend="faiss"
    )
    assert tok.kmeans.n_points_used == min(len(train) * 64, k * 256)
    tokens = torch.cat([tok.encode(images[i : i + 512]) for i in range(0, len(images), 512)])
    hist = F.one_hot(tokens.flatten(1), k).sum(1).float().numpy() / tokens[0].numel()  # B K
    clf = LogisticRegression(max_iter=3000, C=10.0).fit(hist[train], labels[train].numpy())
    accuracy = clf.score(hist[test], labels[test].numpy())
    print(f"linear probe on {k}-bin token histograms: {accuracy:.3f} (chance 0.10)")
    assert accuracy > 0.6  # six times chance
    # the saved tokenizer rebuilds from its file alone and gives the same tokens
    again = kmeans(centroids=tok.save(tmp_path / "digits.safetensors"))
    assert torch.equal(again.encode(images[:64]), tokens[:64])


# ------------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------------
def test_bad_input_errors():
    with pytest.raises(ValueError, match="K=50 clusters to 20"):
        KMeans(50, backend="torch").fit(torch.randn(20, 4))
    with pytest.raises(ValueError, match="empty"):
        KMeans(4).fit(iter([]))
    with pytest.raises(ValueError, match="empty"):
        KMeans(4).fit(torch.randn(0, 4))
    with pytest.raises(ValueError, match="change width"):
        KMeans(2).fit([torch.randn(5, 4), torch.randn(5, 3)])
    with pytest.raises(ValueError, match="NaN"):
        KMeans(2).fit(torch.tensor([[0.0, float("nan")], [1.0, 1.0]]))
    with pytest.raises(ValueError, match="backend"):
        KMeans(2, backend="cuml")
    with pytest.raises(RuntimeError, match="not fitted"):
        KMeans(2).assign(torch.randn(3, 4))
    km = KMeans(4, n_iter=2, backend="torch").fit(torch.randn(40, 8))
    with pytest.raises(ValueError, match="width 5 .* width 8"):
        km.assign(torch.randn(3, 5))
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        km.lookup(torch.tensor([0, 4]))
    with pytest.raises(TypeError, match="integer"):
        km.lookup(torch.tensor([0.0]))

    tok = tiny_tokenizer(torch.randn(16, 64))
    with pytest.raises(ValueError, match=r"\[0, 16\)"):
        tok.lookup(torch.full((1, 8, 8), 16))
    with pytest.raises(ValueError, match=r"\[0, 16\)"):
        tok.lookup(torch.full((1, 8, 8), -1))
    with pytest.raises(ValueError, match="width 32 but the encoder gives 64"):
        tiny_tokenizer(torch.randn(16, 32))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        tok.encode(torch.rand(1, 3, 32, 32) * 255)
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        tok.encode(torch.rand(3, 32, 32))
    with pytest.raises(RuntimeError, match="no centroids"):
        tiny_tokenizer(n_clusters=8).encode(torch.rand(1, 3, 32, 32))
    with pytest.raises(ValueError, match="empty"):
        tiny_tokenizer(n_clusters=8).fit([])


def test_reservoir_never_writes_into_the_callers_features():
    from latentforge_tokenizers.kmeans import Reservoir

    x = torch.randn(500, 4)
    before = x.clone()
    reservoir = Reservoir(300, seed=0)
    reservoir.add(x[:320])  # fills from a view of x, then the overflow competes for its rows
    reservoir.add(x[320:])
    assert torch.equal(x, before) and reservoir.rows.shape == (300, 4) and reservoir.seen == 500
    rows = {tuple(r.tolist()) for r in reservoir.rows}
    assert len(rows) == 300 and rows <= {tuple(r.tolist()) for r in x}
