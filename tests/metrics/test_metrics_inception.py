"""Our FID Inception against pytorch-fid's and torch-fidelity's, on one random state dict."""

from __future__ import annotations

import pytest
import torch
from pytorch_fid import inception as pfid_inception
from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x

from latentforge_core.checkpoint import CheckpointError
from latentforge_metrics.inception import FIDInceptionV3, fid_inception_v3, preprocess, resize_tf1_bilinear


@pytest.fixture(scope="module")
def pytorch_fid_model(inception_state, monkeypatch_module):
    """pytorch-fid's InceptionV3, its weight download replaced by our random state dict."""
    monkeypatch_module.setattr(pfid_inception, "load_state_dict_from_url", lambda *a, **k: inception_state)
    model = pfid_inception.InceptionV3([3], resize_input=True, normalize_input=True).eval()
    return model


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


@pytest.fixture(scope="module")
def images():
    gen = torch.Generator().manual_seed(1)
    return torch.randint(0, 256, (2, 3, 64, 48), generator=gen, dtype=torch.uint8)


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def test_pool3_equals_pytorch_fid(inception_file, pytorch_fid_model, images):
    ours = FIDInceptionV3("pytorch-fid").load_weights(inception_file)
    x = images.float() / 255
    with torch.no_grad():
        want = pytorch_fid_model(x)[0].flatten(1)
    got = ours(x)["pool3"]
    assert want.shape == got.shape == (2, 2048)
    assert want.std() > 0.05  # the features carry signal, so the tolerance means something
    assert _rel(got, want) < 1e-4
    assert torch.equal(
        preprocess(images, "pytorch-fid"), preprocess(x, "pytorch-fid")
    )  # uint8: ToTensor's /255


@pytest.fixture(scope="module")
def tf_features(inception, images):
    """Every feature of our network (torch-fidelity protocol) and the Mixed_6d.branch1x1 output."""
    captured = {}
    hook = inception.Mixed_6d.branch1x1.register_forward_hook(lambda m, i, o: captured.setdefault("x", o))
    try:
        features = inception(images, features=("pool3", "logits", "spatial"))
    finally:
        hook.remove()
    return features, captured["x"]


def test_features_equal_torch_fidelity(tf_features, inception_file, images):
    peer = FeatureExtractorInceptionV3(
        "inception-v3-compat", ["2048", "logits_unbiased"], feature_extractor_weights_path=str(inception_file)
    ).eval()
    with torch.no_grad():
        want_pool, want_logits = peer(images)
    got = tf_features[0]
    assert _rel(got["pool3"], want_pool) < 1e-4
    assert _rel(got["logits"], want_logits) < 1e-4
    assert got["spatial"].shape == (2, 2023)


def test_spatial_features_are_mixed_6d_branch1x1_in_nhwc_order(tf_features):
    spatial, branch = tf_features[0]["spatial"], tf_features[1]
    assert branch.shape == (2, 192, 17, 17)
    nhwc = branch[:, :7].permute(0, 2, 3, 1).reshape(2, -1)
    assert torch.equal(spatial, nhwc)
    h, w, c = 3, 5, 6  # index = (h * 17 + w) * 7 + c
    assert spatial[0, (h * 17 + w) * 7 + c] == branch[0, c, h, w]


def test_torchmetrics_protocol_equals_torchmetrics_antialiased_extractor(inception, inception_file):
    from torchmetrics.image.fid import NoTrainInceptionV3

    peer = NoTrainInceptionV3("inception-v3-compat", ["2048"], str(inception_file), antialias=True).eval()
    images = torch.rand(
        1, 3, 420, 400, generator=torch.Generator().manual_seed(2)
    )  # downsampled: antialias acts
    with torch.no_grad():
        (want,) = peer((images * 255).byte())  # what FrechetInceptionDistance(normalize=True) feeds it
        x = preprocess(images, "torchmetrics")
        got = inception.forward_features(x)["pool3"]
        other = inception.forward_features(preprocess(images, "torch-fidelity"))["pool3"]
    assert _rel(got, want) < 1e-4
    assert _rel(other, want) > 1e-3  # the TF1 resize without antialias is another protocol


@pytest.mark.parametrize("size", [(64, 64), (256, 200), (512, 512)])
def test_tf1_resize_equals_torch_fidelity(size):
    x = torch.rand(1, 3, *size) * 255
    want = interpolate_bilinear_2d_like_tensorflow1x(x, size=(299, 299), align_corners=False)
    assert (resize_tf1_bilinear(x, 299) - want).abs().max() < 1e-3  # on the 0..255 scale


def test_protocols_differ_and_are_identities_at_299():
    x = torch.randint(0, 256, (1, 3, 299, 299), dtype=torch.uint8)
    tf, pt = preprocess(x, "torch-fidelity"), preprocess(x, "pytorch-fid")
    assert torch.allclose(tf, (x.float() - 128) / 128) and torch.allclose(pt, 2 * x.float() / 255 - 1)
    small = x[..., :64, :64]
    a, b = preprocess(small, "torch-fidelity"), preprocess(small, "pytorch-fid")
    assert (a - b).abs().max() > 0.1  # the half-pixel shift of the two resizes
    assert torch.equal(preprocess(small.float() / 255, "adm"), a)  # floats are rounded back to the same uint8


@pytest.mark.parametrize(
    ("images", "match"),
    [
        (torch.rand(2, 3, 32, 32) * 2 - 1, r"\[-1, 1\]"),
        (torch.rand(2, 3, 32, 32) * 255, "0..255"),
        (torch.rand(2, 1, 32, 32), r"\[B, 3, H, W\]"),
        (torch.rand(2, 32, 32, 3), "channels-last"),
        (torch.full((2, 3, 32, 32), float("nan")), "NaN"),
    ],
)
def test_bad_images_are_rejected(images, match):
    with pytest.raises(ValueError, match=match):
        preprocess(images, "torch-fidelity")


def test_bad_dtype_and_protocol_are_rejected():
    with pytest.raises(TypeError, match="uint8 .* or float"):
        preprocess(torch.zeros(1, 3, 8, 8, dtype=torch.int32), "pytorch-fid")
    with pytest.raises(ValueError, match="unknown Inception protocol 'legacy_tensorflow'.*'clean'"):
        FIDInceptionV3("legacy_tensorflow")


def test_weights_missing_or_wrong(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not download"):
        fid_inception_v3(tmp_path / "nothing.pth")
    bad = tmp_path / "bad.pth"
    torch.save({"fc.weight": torch.zeros(10, 2048)}, bad)
    with pytest.raises(CheckpointError, match="fc.weight"):
        fid_inception_v3(bad)
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"not a torch file")
    with pytest.raises(CheckpointError, match="corrupted"):
        fid_inception_v3(corrupt)


def test_torch_fidelity_layout_without_bn_counters_loads(inception_state, tmp_path):
    path = tmp_path / "fidelity.pth"
    torch.save({k: v for k, v in inception_state.items() if "num_batches_tracked" not in k}, path)
    loaded = fid_inception_v3(path).state_dict()
    assert len(inception_state) == len(loaded) == 566
    assert all(torch.equal(loaded[k], v) for k, v in inception_state.items())


# ------------------------------------------------------------------------------------------------
# The inference path (BatchNorm folded into the convs, channels-last on CPU) against the stored layers
# ------------------------------------------------------------------------------------------------
def test_folded_inference_equals_layer_by_layer_autograd_path(inception, tf_features, images):
    x = preprocess(images, "torch-fidelity").requires_grad_()
    with torch.enable_grad():  # autograd on: conv → BatchNorm → ReLU exactly as stored
        layered = inception.forward_features(x)
        layered["pool3"].sum().backward()
    assert x.grad is not None and x.grad.abs().max() > 0
    for name in ("pool3", "logits", "spatial"):
        assert _rel(tf_features[0][name], layered[name].detach()) < 1e-5


def test_folding_follows_weights_changed_in_place(inception_file, images):
    ours = FIDInceptionV3("pytorch-fid").load_weights(inception_file)
    x = images.float() / 255
    before = ours(x, features=("spatial",))["spatial"]  # builds the folded weights
    bn = ours.Mixed_6d.branch1x1.bn
    with torch.no_grad():
        bn.running_var.mul_(4)  # an in-place change, as load_state_dict makes
    after = ours(x, features=("spatial",))["spatial"]
    with torch.enable_grad():
        layered = ours.forward_features(preprocess(x, "pytorch-fid"), ("spatial",))["spatial"]
    assert _rel(after, before) > 1e-2
    assert _rel(after, layered) < 1e-5
    ours.load_weights(inception_file)  # load_state_dict copies in place: the file's features again
    assert torch.equal(ours(x, features=("spatial",))["spatial"], before)


def test_features_stay_fp32_under_autocast(inception, tf_features, images):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        x = preprocess(images, "torch-fidelity")  # the TF1 resize is two matmuls
        got = inception(images, features=("spatial",))["spatial"]
    assert x.dtype == got.dtype == torch.float32
    assert torch.equal(x, preprocess(images, "torch-fidelity"))
    assert _rel(got, tf_features[0]["spatial"]) < 1e-6


def test_network_built_under_inference_mode_folds_without_version_counters(inception, tf_features, images):
    with torch.inference_mode():  # inference tensors have no version counter to key a cache on
        model = FIDInceptionV3("torch-fidelity")
        model.load_state_dict(inception.state_dict())
        got = model(images, features=("spatial",))["spatial"]
    assert torch.equal(got, tf_features[0]["spatial"])
