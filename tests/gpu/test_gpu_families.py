"""Every family on a real CUDA GPU: a bf16-autocast training step through ``torch.compile``, sampling,
encode/decode and metric updates (``make test-gpu``; skipped, with the reason, where CUDA is absent).

``LATENTFORGE_GPU_DRY_RUN=1`` runs the same code on the CPU (compile backend "eager") to check the
tests themselves on a machine without a GPU; it says nothing about CUDA.
"""

from __future__ import annotations

import functools
import os

import pytest
import torch

import latentforge_encoders  # noqa: F401  (registers the families)
import latentforge_generators  # noqa: F401
import latentforge_metrics
import latentforge_tokenizers  # noqa: F401
from latentforge_core import registry

pytestmark = pytest.mark.cuda

DRY_RUN = os.environ.get("LATENTFORGE_GPU_DRY_RUN", "") == "1"
DEVICE = torch.device("cpu" if DRY_RUN else "cuda")
BACKEND = "eager" if DRY_RUN else "inductor"
B = 4


def on_device(*tensors: torch.Tensor) -> None:
    for t in tensors:
        assert t.device.type == DEVICE.type, t.device


def finite(*tensors: torch.Tensor) -> None:
    for t in tensors:
        on_device(t)
        assert torch.isfinite(t.float()).all(), "non-finite values"


def images(size: int, requires_grad: bool = False) -> torch.Tensor:
    return torch.rand(B, 3, size, size, device=DEVICE, requires_grad=requires_grad)


def build(family: str, name: str, **kwargs):
    torch.manual_seed(0)
    return getattr(registry, family).build(name, **kwargs).to(DEVICE)


def train_steps(model: torch.nn.Module, loss_fn, steps: int = 2, params=None) -> list[float]:
    """``steps`` AdamW steps of ``loss_fn(model)`` compiled, under bf16 autocast; the parameters move."""
    model.train()
    params = [p for p in (params or model.parameters()) if p.requires_grad]
    before = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=1e-3)
    step = torch.compile(loss_fn, backend=BACKEND)
    losses = []
    for _ in range(steps):
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
            loss = step(model)
        assert loss.ndim == 0
        finite(loss)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grads = [p.grad for p in params if p.grad is not None]
        assert grads, "backward reached no parameter"
        finite(*grads)
        opt.step()
        losses.append(float(loss))
    assert any(not torch.equal(a, p.detach()) for a, p in zip(before, params, strict=True))
    return losses


@pytest.fixture(autouse=True)
def fresh_compile_cache():
    yield
    torch._dynamo.reset()


# ------------------------------------------------------------------------------------------------
# Generators
# ------------------------------------------------------------------------------------------------
FLOWS = ["test-dit", "test-sit", "test-lightningdit", "test-ditdh"]


@pytest.mark.parametrize("name", FLOWS)
def test_flow_training_step_bf16_compiled(name):
    gen = build("generators", name)
    x = torch.randn(B, *gen.input_shape, device=DEVICE)
    y = torch.randint(0, gen.num_classes, (B,), device=DEVICE)
    train_steps(gen, lambda m: m.loss(x, y))


@pytest.mark.parametrize("sampler", ["euler", "heun", "midpoint", "dpm++2m", "sde", "dopri5"])
@pytest.mark.parametrize("name", FLOWS)
def test_flow_sampling_with_cfg(name, sampler):
    gen = build("generators", name).eval()
    y = torch.randint(0, gen.num_classes, (B,), device=DEVICE)
    steps = {} if sampler == "dopri5" else {"steps": 4}
    out = gen.sample(y, sampler=sampler, cfg_scale=2.0, cfg_interval=(0.0, 0.7), **steps)
    finite(out)
    assert out.shape == (B, *gen.input_shape)


def test_flow_sampling_is_seeded_by_a_cpu_or_a_cuda_generator():
    gen = build("generators", "test-sit").eval()
    for device in ("cpu", DEVICE.type):
        runs = [
            gen.sample(n=B, sampler="sde", steps=4, generator=torch.Generator(device).manual_seed(3))
            for _ in range(2)
        ]
        finite(*runs)
        torch.testing.assert_close(runs[0], runs[1])


TOKENS = ["test-gpt", "test-gpt-modern", "test-maskgit"]


def token_batch(model):
    h, w = model.input_shape
    tokens = torch.randint(0, model.vocab_size, (B, h, w), device=DEVICE)
    return tokens, torch.randint(0, model.num_classes, (B,), device=DEVICE)


@pytest.mark.parametrize("name", TOKENS)
def test_token_model_training_step_bf16_compiled(name):
    model = build("generators", name)
    tokens, y = token_batch(model)
    train_steps(model, lambda m: m.loss(tokens, y))


@pytest.mark.parametrize(
    "options",
    [dict(top_k=8), dict(top_p=0.9, cfg_scale=2.0), dict(top_k=8, top_p=0.9, cfg_scale=2.0, use_cache=False)],
    ids=["top-k", "top-p-cfg", "top-k-top-p-cfg-no-cache"],
)
@pytest.mark.parametrize("name", ["test-gpt", "test-gpt-modern"])
def test_gpt_sampling(name, options):
    model = build("generators", name).eval()
    y = torch.randint(0, model.num_classes, (B,), device=DEVICE)
    out = model.sample(y, generator=torch.Generator(DEVICE.type).manual_seed(0), **options)
    on_device(out)
    assert out.shape == (B, *model.input_shape)
    assert int(out.min()) >= 0 and int(out.max()) < model.vocab_size
    cpu_seeded = model.sample(y, generator=torch.Generator().manual_seed(0), **options)
    on_device(cpu_seeded)


@pytest.mark.parametrize("cfg_scale", [1.0, 2.0])
def test_maskgit_sampling(cfg_scale):
    model = build("generators", "test-maskgit").eval()
    y = torch.randint(0, model.num_classes, (B,), device=DEVICE)
    for generator in (None, torch.Generator().manual_seed(0)):
        out = model.sample(y, steps=4, cfg_scale=cfg_scale, generator=generator)
        on_device(out)
        assert int(out.min()) >= 0 and int(out.max()) < model.vocab_size  # no [MASK] left


@pytest.mark.parametrize("name", ["test-digit-stage2-ar", "test-digit-stage2-maskgit"])
def test_digit_stage2_training_step_and_sampling(name):
    model = build("generators", name)
    h, w = model.grid
    hc, wc = model.cond_grid
    codes = torch.randint(0, model.vocab_size, (B, h, w), device=DEVICE)
    cond = torch.randint(0, model.cond_vocab_size, (B, hc, wc), device=DEVICE)
    train_steps(model, lambda m: m.loss(codes, cond))
    model.eval()
    options = dict(top_k=4, top_p=0.8) if model.mode == "ar" else dict(steps=4)
    out = model.sample(cond, generator=torch.Generator().manual_seed(0), **options)
    on_device(out)
    assert out.shape == codes.shape
    assert int(out.min()) >= 0 and int(out.max()) < model.vocab_size


# ------------------------------------------------------------------------------------------------
# Tokenizers
# ------------------------------------------------------------------------------------------------
def test_vavae_training_step_and_encode_decode():
    tok = build("tokenizers", "test-vavae-tiny")
    size = tok.preprocessing.input_size
    x = images(size)

    def loss(m):
        out = m(x * 2 - 1)
        return (out["recon"].float() - (x * 2 - 1)).abs().mean() + 1e-6 * out["posterior"].kl().mean()

    train_steps(tok, loss)
    tok.eval()
    with torch.no_grad():
        z = tok.encode(x, generator=torch.Generator().manual_seed(0))
        finite(z, tok.encode(x, sample=False))
        rec = tok.decode(z)
    finite(rec)
    assert rec.shape == x.shape and float(rec.min()) >= 0 and float(rec.max()) <= 1


def test_rae_training_step_and_encode_decode():
    tok = build("tokenizers", "test-rae-tiny")
    x = images(tok.preprocessing.input_size)
    train_steps(tok, lambda m: (m(x) - x).abs().mean(), params=list(tok.decoder.parameters()))
    tok.eval()
    with torch.no_grad():
        z = tok.encode(x)
        rec = tok.decode(z)
    finite(z, rec)
    assert rec.shape == x.shape


def test_vqgan_training_step_and_encode_decode():
    tok = build("tokenizers", "test-vqgan-tiny")
    x = images(tok.preprocessing.input_size)

    def loss(m):
        rec, qloss, _ = m(x)
        return (rec.float() - x).abs().mean() + qloss

    train_steps(tok, loss)
    tok.eval()
    ids = tok.encode(x)
    on_device(ids)
    assert int(ids.min()) >= 0 and int(ids.max()) < tok.vocab_size
    finite(tok.decode(ids))


def test_kmeans_tokenizer_encode_lookup():
    enc_dim = registry.encoders.build("test-vit-tiny").embed_dim
    tok = build("tokenizers", "test-kmeans-tiny", centroids=torch.randn(64, enc_dim))
    x = images(tok.encoder.preprocessing.input_size)
    ids = tok.encode(x)
    on_device(ids)
    assert ids.shape == (B, *tok.latent_shape) and int(ids.max()) < 64
    finite(tok.lookup(ids))


# ------------------------------------------------------------------------------------------------
# Encoders
# ------------------------------------------------------------------------------------------------
TINY_VIT = dict(depth=1, embed_dim=32, num_heads=2)


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [
        ("test-vit-tiny", {}),
        ("dinov2-vits14-reg", dict(TINY_VIT, image_size=28)),
        ("siglip2-vitb16-256", dict(TINY_VIT, image_size=32)),
        ("mae-vitb16", dict(TINY_VIT, image_size=32)),
    ],
    ids=["test-vit-tiny", "dinov2-tiny", "siglip2-tiny", "mae-tiny"],
)
def test_encoder_bf16_compiled_forward_and_input_gradient(name, kwargs):
    enc = build("encoders", name, **kwargs).eval()
    x = images(enc.preprocessing.input_size + 4, requires_grad=True)  # a resize on the way in
    forward = torch.compile(enc, backend=BACKEND)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        feats = forward(x)
    feats = feats if isinstance(feats, torch.Tensor) else feats[-1]
    finite(feats)
    feats.float().square().mean().backward()  # REPA's alignment loss reaches the images
    finite(x.grad)


# ------------------------------------------------------------------------------------------------
# Metrics
# ------------------------------------------------------------------------------------------------
def test_metric_updates():
    stats = latentforge_metrics.GaussianStats()
    stats.update(torch.randn(64, 8, device=DEVICE))
    stats.update(torch.randn(64, 8, device=DEVICE, dtype=torch.bfloat16))
    assert stats.n == 128
    x, y = images(32), images(32)
    metrics = latentforge_metrics
    for metric in (metrics.PSNR(), metrics.PSNR(per_image=False), metrics.SSIM()):
        metric.update(x, y)
        value = metric.compute()
        assert value == value  # not NaN


@functools.cache
def _tiny_probe_encoder():
    return registry.encoders.build("test-vit-tiny")


def test_linear_probe_trains_on_the_gpu():
    """LinearProbe.compute trains its head where the features are: CUDA here."""
    probe = latentforge_metrics.LinearProbe(
        3, _tiny_probe_encoder(), output="pooled", epochs=2, batch_size=8, device=DEVICE
    )
    size = _tiny_probe_encoder().preprocessing.input_size
    for train in (True, False):
        probe.update(images(size), torch.randint(0, 3, (B,), device=DEVICE), train=train)
    result = probe.compute()
    assert 0.0 <= result["top1"] <= 1.0
