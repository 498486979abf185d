"""GPU readiness without a GPU: every registered ``test-*`` model on *fake* accelerator tensors.

Each model is built on the meta device, moved with ``to_empty(device=...)`` inside ``FakeTensorMode`` and
run (training loss + backward, sampling, encode/decode) on fake inputs of that device.  Fake tensors
carry shapes, dtypes and devices but no data, and every op still checks that its inputs share a device:
a tensor that model code creates on the CPU (``torch.arange``/``zeros``/``randn`` or a
``torch.Generator`` without ``device=``) meets the accelerator's tensors and fails loudly
(``FakeTensorDeviceMismatchError``), as it would on a GPU.  The value-reading input checks (NaN, label
ranges) cannot read fake data and are turned off with ``value_checks(False)``; shape and dtype checks
stay on.

The fake device is ``cuda`` where this torch build can run fake CUDA tensors, else ``meta``.  A CPU
build makes fake CUDA tensors but cannot run their C++ device guards: Python indexing such as
``t[:, None]`` raises "PyTorch is not linked with support for cuda devices", and autograd, which
records each CUDA tensor's stream, *aborts the process* with that error (2.13.0+cpu here, although
``FakeTensorMode`` calls ``torch._C._ensureCUDADeviceGuardSet()``).  A probe in a child process decides;
on ``meta`` the CPU-vs-accelerator device check is the same one, only the ``device.type == "cuda"``
branches (bf16 autocast, ``F.linear`` instead of oneDNN) go untested, and ``test_fake_device_is_cuda``
is skipped with the probe's message, so the fallback shows in every report.
"""

from __future__ import annotations

import contextlib
import functools
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode, unset_fake_temporarily
from torch.fx.experimental.symbolic_shapes import ShapeEnv
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

import latentforge_encoders  # noqa: F401  (registers the families)
import latentforge_generators  # noqa: F401
import latentforge_metrics
import latentforge_tokenizers  # noqa: F401
from latentforge_core import registry
from latentforge_core.errors import checking_values, value_checks
from latentforge_generators import samplers
from latentforge_metrics.probe import train_linear_probe

B = 2

_PROBE = """
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
with FakeTensorMode():
    t = torch.rand(2, device="cuda", requires_grad=True)
    (t[:, None] * 2).sum().backward()
    assert t.grad.device.type == "cuda"
"""


@functools.cache
def fake_cuda_problem() -> str | None:
    """None when fake CUDA tensors index and backpropagate in this build, else what went wrong.  Indexing
    is tried here (it raises); autograd in a child process, since its failure is a C++ abort."""
    try:
        with FakeTensorMode():
            _ = torch.zeros(2, device="cuda")[:, None]
    except RuntimeError as err:
        return f"{type(err).__name__}: {str(err).splitlines()[0]}"
    run = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=120)
    if run.returncode == 0:
        return None
    lines = [line for line in run.stderr.splitlines() if "Error" in line or "what()" in line]
    return (lines[-1] if lines else f"exit code {run.returncode}").strip()


@functools.cache
def fake_device() -> torch.device:
    return torch.device("cuda" if fake_cuda_problem() is None else "meta")


def dev() -> torch.device:
    return fake_device()


class GeneratorDeviceCheck(TorchDispatchMode):
    """What fake tensors do not check: a random op given a ``torch.Generator`` of another device than
    the tensor it fills (``torch.rand(..., device="cuda", generator=torch.Generator())`` fails on a GPU:
    "Expected a 'cuda' device type for generator but found 'cpu'")."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        generator = kwargs.get("generator")
        if isinstance(generator, torch.Generator):
            inplace = args[0] if func._schema.name.endswith("_") else None  # normal_, uniform_, …
            for t in [inplace, *(out if isinstance(out, (tuple, list)) else [out])]:
                if isinstance(t, torch.Tensor) and t.device.type != generator.device.type:
                    raise RuntimeError(
                        f"{func}: a {generator.device.type} generator fills a {t.device.type} tensor "
                        "(on a GPU: Expected a 'cuda' device type for generator but found 'cpu')"
                    )
        return out


@contextlib.contextmanager
def fake_cuda():
    """Fake tensors on ``dev()``, value checks off, generator devices checked.  The shape environment
    lets data-dependent shapes (boolean masks such as MaskGIT's ``logits[masked]``) become symbolic
    sizes instead of failing."""
    dev()  # probe before entering the mode
    mode = FakeTensorMode(allow_non_fake_inputs=True, shape_env=ShapeEnv())
    with mode, value_checks(False), GeneratorDeviceCheck():
        yield


@pytest.fixture(autouse=True)
def real_time_grid(monkeypatch):
    """The flow samplers' time grid is host arithmetic: a CPU ``linspace`` read back as Python floats
    (``.tolist()``).  Under ``FakeTensorMode`` that CPU tensor is fake too and has no values, so the grid
    is computed on real tensors; no model tensor is involved."""
    original = samplers.time_grid

    def time_grid(*args, **kwargs):
        with unset_fake_temporarily():
            return original(*args, **kwargs)

    monkeypatch.setattr(samplers, "time_grid", time_grid)


def build(family: str, name: str, **kwargs):
    """``registry.<family>.build(name)`` with meta parameters, moved (``to_empty``) to the fake device;
    call inside ``fake_cuda``."""
    with _disable_current_modes(), torch.device("meta"):  # real meta tensors, built as on the CPU
        model = getattr(registry, family).build(name, **kwargs)
    return model.to_empty(device=dev())


def assert_on_device(*tensors: torch.Tensor) -> None:
    for t in tensors:
        assert isinstance(t, FakeTensor), type(t)
        assert t.device.type == dev().type, t.device


def assert_grads(model: torch.nn.Module) -> None:
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert any(g is not None for g in grads), "backward reached no parameter"
    assert_on_device(*(g for g in grads if g is not None))


def training_step(family: str, name: str, loss_fn, grads_of=lambda m: m, **kwargs) -> None:
    """``loss_fn(model) -> scalar`` in train mode, then backward; the gradients land on the fake device."""
    with fake_cuda():
        model = build(family, name, **kwargs).train()
        loss = loss_fn(model)
        assert_on_device(loss)
        assert loss.ndim == 0
        loss.backward()
        assert_grads(grads_of(model))


def images(size: int, requires_grad: bool = False) -> torch.Tensor:
    return torch.rand(B, 3, size, size, device=dev(), requires_grad=requires_grad)


# ------------------------------------------------------------------------------------------------
# The switch itself
# ------------------------------------------------------------------------------------------------
def test_value_checks_switch_nests_and_restores():
    assert checking_values()
    with value_checks(False):
        assert not checking_values()
        with value_checks(True):
            assert checking_values()
        assert not checking_values()
    assert checking_values()
    with pytest.raises(TypeError, match="true or false"), value_checks("no"):  # type: ignore[arg-type]
        pass


def test_fake_device_is_cuda():
    """Visible in the report: whether the cases below ran on fake CUDA or fell back to fake meta."""
    if fake_cuda_problem() is not None:
        pytest.skip(f"fake CUDA cannot run in torch {torch.__version__}; cases ran on fake meta: "
                    f"{fake_cuda_problem()}")  # fmt: skip
    assert dev().type == "cuda"


def test_fake_device_catches_a_cpu_tensor_in_model_code():
    """The premise: on the fake device, mixing in a tensor made without ``device=`` fails."""
    with fake_cuda():
        x = torch.randn(B, 4, device=dev(), requires_grad=True)
        with pytest.raises(RuntimeError, match="devices"):
            _ = x + torch.arange(4.0).expand(B, 4)
        with pytest.raises(RuntimeError, match="devices"):
            _ = torch.where(torch.rand(B, 4) < 0.5, x, 0.0)


def test_fake_device_catches_a_cpu_generator_filling_a_device_tensor():
    with fake_cuda():
        with pytest.raises(RuntimeError, match="generator"):
            torch.rand(B, device=dev(), generator=torch.Generator().manual_seed(0))
        with pytest.raises(RuntimeError, match="generator"):
            torch.empty(B, device=dev()).normal_(0, 1, generator=torch.Generator())
        assert_on_device(torch.rand(B, generator=torch.Generator()).to(dev()))  # drawn on the CPU, moved


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is here: `make test-gpu` runs tests/gpu for real")
def test_gpu_suite_is_skipped_here_with_the_reason():
    """``pytest -m cuda tests/gpu`` (``make test-gpu``) on a machine without CUDA: collected, all skipped,
    each with the reason; the explicit ``-m cuda`` overrides addopts' ``-m 'not slow'``."""
    root = Path(__file__).resolve().parents[2]
    env = {k: v for k, v in os.environ.items() if k != "LATENTFORGE_GPU_DRY_RUN"}
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "cuda", "tests/gpu", "-rs"],
        cwd=root, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    summary = run.stdout.strip().splitlines()[-1]
    assert "skipped" in summary and "passed" not in summary and "deselected" not in summary, summary
    assert "CUDA is not available" in run.stdout and "these tests need a GPU" in run.stdout


def test_value_checks_still_run_by_default():
    gen = registry.generators.build("test-dit")
    with pytest.raises(ValueError, match="NaN"):
        gen.loss(torch.full((B, 4, 8, 8), float("nan")), torch.zeros(B, dtype=torch.long))
    with value_checks(False), pytest.raises(ValueError, match="shape"):  # shape checks stay on
        gen.loss(torch.zeros(B, 3, 8, 8), torch.zeros(B, dtype=torch.long))


# ------------------------------------------------------------------------------------------------
# Generators
# ------------------------------------------------------------------------------------------------
FLOWS = ["test-dit", "test-sit", "test-lightningdit", "test-ditdh"]
FLOW_SAMPLERS = [
    ("euler", {}),
    ("heun", {}),
    ("midpoint", {}),
    ("dpm++2m", {}),
    ("unipc", {}),
    ("sde", {}),
    pytest.param(
        "dopri5",
        {},
        marks=pytest.mark.skip(
            reason="dopri5 picks its step sizes from the error norm (.item() on the state): "
            "data-dependent control flow that fake tensors cannot run"
        ),
        id="dopri5-skipped-adaptive-steps",
    ),
]


def flow_loss(gen):
    x = torch.randn(B, *gen.input_shape, device=dev())
    y = torch.randint(0, gen.num_classes, (B,), device=dev())
    return gen.loss(x, y) + gen.loss(x)  # with labels, and unconditional (the null labels)


@pytest.mark.parametrize("name", FLOWS)
def test_flow_training_step_on_fake_devices(name):
    training_step("generators", name, flow_loss)


@pytest.mark.parametrize(("sampler", "options"), FLOW_SAMPLERS)
@pytest.mark.parametrize("name", FLOWS)
def test_flow_sampling_with_cfg_on_fake_cuda(name, sampler, options):
    with fake_cuda():
        gen = build("generators", name)
        y = torch.randint(0, gen.num_classes, (B,), device=dev())
        out = gen.sample(y, sampler=sampler, steps=3, cfg_scale=2.0, cfg_interval=(0.0, 0.7), **options)
        assert_on_device(out)
        assert out.shape == (B, *gen.input_shape)


def test_flow_sampling_with_a_cpu_generator_seeds_cuda_noise():
    """A CPU ``torch.Generator`` may seed GPU sampling (noise drawn on its device, then moved)."""
    with fake_cuda():
        gen = build("generators", "test-sit")
        out = gen.sample(n=B, sampler="sde", steps=3, generator=torch.Generator().manual_seed(0))
        assert_on_device(out)


@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("test-gpt", dict(top_k=8, top_p=0.9, cfg_scale=2.0)),
        ("test-maskgit", dict(steps=3, cfg_scale=2.0)),
        ("test-digit-stage2-ar", dict(top_k=4, top_p=0.8)),
        ("test-digit-stage2-maskgit", dict(steps=3)),
    ],
)
def test_token_sampling_with_a_cpu_generator_on_fake_cuda(name, options):
    """As for the flow samplers, a CPU ``torch.Generator`` may seed sampling on the GPU."""
    with fake_cuda():
        model = build("generators", name)
        if name.startswith("test-digit"):
            y = stage2_inputs(model)[1]
        else:
            y = torch.randint(0, model.num_classes, (B,), device=dev())
        out = model.sample(y, generator=torch.Generator().manual_seed(0), **options)
        assert_on_device(out)


def token_loss(model):
    h, w = model.input_shape
    tokens = torch.randint(0, model.vocab_size, (B, h, w), device=dev())
    y = torch.randint(0, model.num_classes, (B,), device=dev())
    return model.loss(tokens, y)


@pytest.mark.parametrize("name", ["test-gpt", "test-gpt-modern", "test-maskgit"])
def test_token_model_training_step_on_fake_devices(name):
    training_step("generators", name, token_loss)


@pytest.mark.parametrize(
    "options",
    [
        dict(top_k=8),
        dict(top_p=0.9),
        dict(top_k=8, top_p=0.9, temperature=0.7, cfg_scale=2.0),
        dict(top_p=0.9, cfg_scale=2.0, use_cache=False),
    ],
    ids=["top-k", "top-p", "top-k-top-p-cfg", "top-p-cfg-no-cache"],
)
@pytest.mark.parametrize("name", ["test-gpt", "test-gpt-modern"])
def test_gpt_sampling_on_fake_cuda(name, options):
    with fake_cuda():
        model = build("generators", name)
        y = torch.randint(0, model.num_classes, (B,), device=dev())
        out = model.sample(y, **options)
        assert_on_device(out)
        assert out.shape == (B, *model.input_shape)


@pytest.mark.parametrize("cfg_scale", [1.0, 2.0], ids=["no-cfg", "cfg"])
def test_maskgit_sampling_on_fake_cuda(cfg_scale):
    with fake_cuda():
        model = build("generators", "test-maskgit")
        y = torch.randint(0, model.num_classes, (B,), device=dev())
        out = model.sample(y, steps=3, cfg_scale=cfg_scale)
        assert_on_device(out)
        assert out.shape == (B, *model.input_shape)
        assert_on_device(model.sample(B, steps=2))  # unconditional


def stage2_inputs(model):
    h, w = model.grid
    hc, wc = model.cond_grid
    codes = torch.randint(0, model.vocab_size, (B, h, w), device=dev())
    cond = torch.randint(0, model.cond_vocab_size, (B, hc, wc), device=dev())
    return codes, cond


@pytest.mark.parametrize("name", ["test-digit-stage2-ar", "test-digit-stage2-maskgit"])
def test_digit_stage2_training_step_on_fake_devices(name):
    training_step("generators", name, lambda m: m.loss(*stage2_inputs(m)))


@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("test-digit-stage2-ar", dict(top_k=4, top_p=0.8)),
        ("test-digit-stage2-ar", dict(top_p=0.8, use_cache=False)),
        ("test-digit-stage2-maskgit", dict(steps=3)),
    ],
    ids=["ar-top-k-top-p", "ar-top-p-no-cache", "maskgit"],
)
def test_digit_stage2_sampling_on_fake_cuda(name, options):
    with fake_cuda():
        model = build("generators", name)
        codes, cond = stage2_inputs(model)
        out = model.sample(cond, **options)
        assert_on_device(out)
        assert out.shape == codes.shape


# ------------------------------------------------------------------------------------------------
# Tokenizers
# ------------------------------------------------------------------------------------------------
def test_vavae_training_step_encode_decode_on_fake_devices():
    def loss(tok):
        out = tok(images(tok.preprocessing.input_size) * 2 - 1)
        assert_on_device(out["recon"], out["z"])
        return out["recon"].float().square().mean() + out["posterior"].kl().mean()

    training_step("tokenizers", "test-vavae-tiny", loss)
    with fake_cuda():
        tok = build("tokenizers", "test-vavae-tiny").eval()
        size = tok.preprocessing.input_size
        z = tok.encode(images(size))
        assert_on_device(z, tok.encode(images(size), sample=False), tok.decode(z))
        assert_on_device(
            tok.encode(images(size), generator=torch.Generator().manual_seed(0))
        )  # a CPU generator


def test_rae_training_step_encode_decode_on_fake_devices():
    # a training-mode forward noises the latents (``noise_tau``); the encoder is frozen
    training_step("tokenizers", "test-rae-tiny", lambda tok: tok(images(tok.preprocessing.input_size)).mean(),
                  grads_of=lambda tok: tok.decoder)  # fmt: skip
    with fake_cuda():
        tok = build("tokenizers", "test-rae-tiny").eval()
        z = tok.encode(images(tok.preprocessing.input_size))
        assert_on_device(z, tok.decode(z))


def test_vqgan_training_step_encode_decode_on_fake_devices():
    def loss(tok):
        rec, qloss, ids = tok(images(tok.preprocessing.input_size))
        assert_on_device(rec, qloss, ids)
        return rec.square().mean() + qloss

    training_step("tokenizers", "test-vqgan-tiny", loss)
    with fake_cuda():
        tok = build("tokenizers", "test-vqgan-tiny").eval()
        ids = tok.encode(images(tok.preprocessing.input_size))
        assert_on_device(ids, tok.decode(ids))


def test_kmeans_tokenizer_encode_lookup_on_fake_cuda():
    with fake_cuda():
        with _disable_current_modes(), torch.device("meta"):
            dim = registry.encoders.build("test-vit-tiny").embed_dim
            centroids = torch.randn(64, dim)  # a meta tensor, like the parameters
        tok = build("tokenizers", "test-kmeans-tiny", centroids=centroids)
        assert_on_device(tok.centroids, tok.centroid_sqnorm)
        ids = tok.encode(images(tok.encoder.preprocessing.input_size))
        assert_on_device(ids, tok.lookup(ids))
        assert ids.shape == (B, *tok.latent_shape)


# ------------------------------------------------------------------------------------------------
# Encoders
# ------------------------------------------------------------------------------------------------
TINY_VIT = dict(depth=1, embed_dim=32, num_heads=2)
ENCODERS = [
    pytest.param("test-vit-tiny", {}, id="test-vit-tiny"),
    pytest.param("dinov2-vits14-reg", dict(TINY_VIT, image_size=28), id="dinov2-tiny"),
    pytest.param("siglip2-vitb16-256", dict(TINY_VIT, image_size=32), id="siglip2-tiny"),
    pytest.param("mae-vitb16", dict(TINY_VIT, image_size=32), id="mae-tiny"),
]


def _last(feats):
    return feats if isinstance(feats, torch.Tensor) else feats[-1]


@pytest.mark.parametrize(("name", "kwargs"), ENCODERS)
def test_encoder_forward_and_input_gradient_on_fake_devices(name, kwargs):
    kwargs = dict(kwargs, check_finite=True)
    with fake_cuda():
        enc = build("encoders", name, **kwargs)
        size = enc.preprocessing.input_size
        assert_on_device(_last(enc(images(size))), _last(enc(images(size + 4))))  # + a resize on the way in
        # REPA's alignment loss reaches the (generated) images through the encoder
        x = images(enc.preprocessing.input_size + 4, requires_grad=True)
        _last(enc(x)).float().square().mean().backward()
        assert_on_device(x.grad)


# ------------------------------------------------------------------------------------------------
# Metrics: the tensor work of an update (the running sums are read back to the host by design)
# ------------------------------------------------------------------------------------------------
def test_metric_updates_on_fake_cuda():
    with fake_cuda():
        stats = latentforge_metrics.GaussianStats()
        stats.update(torch.randn(B + 3, 8, device=dev()))
        assert_on_device(stats.mean, stats.scatter)
        x, y = images(16), images(16)
        assert_on_device(latentforge_metrics.psnr(x, y), latentforge_metrics.ssim(x, y))
        # LinearProbe.compute trains its head where the features are (CUDA when present)
        features, labels = torch.randn(8, 8, device=dev()), torch.randint(0, 3, (8,), device=dev())
        logits_fn = train_linear_probe(features, labels, 3, epochs=2, batch_size=4)
        assert_on_device(logits_fn(features))


@pytest.mark.parametrize("protocol", sorted(latentforge_metrics.PROTOCOLS))
def test_inception_preprocess_on_fake_cuda(protocol):
    """Each protocol's resize (torch bilinear, PIL-like bicubic, TF1 bilinear matrices)."""
    if dev().type == "meta":
        pytest.skip("the resize runs inside torch.autocast(device_type=x.device.type, enabled=False), and "
                    "autocast has no 'meta' device type (fake-meta fallback only)")  # fmt: skip
    with fake_cuda():
        assert_on_device(latentforge_metrics.preprocess(images(40), protocol))
