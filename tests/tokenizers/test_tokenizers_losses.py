"""GAN terms, adaptive weight, VF loss hinges, PatchGAN layout, DiffAug."""

import math

import pytest
import torch
import torch.nn.functional as F

from latentforge_tokenizers.losses import (
    DiffAug,
    PatchGANDiscriminator,
    adaptive_weight,
    gate,
    hinge_d_loss,
    hinge_g_loss,
    margin_cosine_loss,
    margin_distance_matrix_loss,
    quantize_8bit,
    vanilla_d_loss,
    vf_loss,
)

# taming-transformers NLayerDiscriminator(3, ndf=64, n_layers=3), as in VA-VAE/VQGAN checkpoints
# (their loss.discriminator.* keys)
TAMING_PATCHGAN = {
    "main.0.weight": (64, 3, 4, 4),
    "main.0.bias": (64,),
    "main.2.weight": (128, 64, 4, 4),
    "main.3.weight": (128,),
    "main.3.bias": (128,),
    "main.3.running_mean": (128,),
    "main.3.running_var": (128,),
    "main.3.num_batches_tracked": (),
    "main.5.weight": (256, 128, 4, 4),
    "main.6.weight": (256,),
    "main.6.bias": (256,),
    "main.6.running_mean": (256,),
    "main.6.running_var": (256,),
    "main.6.num_batches_tracked": (),
    "main.8.weight": (512, 256, 4, 4),
    "main.9.weight": (512,),
    "main.9.bias": (512,),
    "main.9.running_mean": (512,),
    "main.9.running_var": (512,),
    "main.9.num_batches_tracked": (),
    "main.11.weight": (1, 512, 4, 4),
    "main.11.bias": (1,),
}


def test_patchgan_key_layout_and_output():
    d = PatchGANDiscriminator()
    sd = {k: tuple(v.shape) for k, v in d.state_dict().items()}
    assert sd == TAMING_PATCHGAN
    d.load_state_dict(
        {k: torch.randn(s) if s else torch.tensor(0) for k, s in TAMING_PATCHGAN.items()}, strict=True
    )
    # 256 → 128 → 64 → 32 (stride-2 convs), then two stride-1 4x4 convs: 31 → 30.
    assert d(torch.randn(2, 3, 256, 256)).shape == (2, 1, 30, 30)
    assert abs(PatchGANDiscriminator().main[0].weight.std().item() - 0.02) < 0.005


def test_hinge_and_vanilla_values():
    real, fake = torch.tensor([2.0, 0.5]), torch.tensor([-3.0, 0.0])
    # relu(1-2)=0, relu(1-.5)=.5 → mean .25; relu(1-3)=0, relu(1+0)=1 → mean .5
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5 * (0.25 + 0.5))
    assert hinge_g_loss(fake).item() == pytest.approx(1.5)
    expected = 0.5 * (F.softplus(-real).mean() + F.softplus(fake).mean())
    assert vanilla_d_loss(real, fake).item() == pytest.approx(expected.item())
    assert gate(4, 5) == 0.0 and gate(5, 5, 0.5) == 0.5


def test_adaptive_weight_is_gradient_norm_ratio():
    torch.manual_seed(0)
    w = torch.randn(4, 3, requires_grad=True)
    x = torch.randn(5, 3)
    a = (x @ w.T).pow(2).mean()
    b = (x @ w.T).sum() * 3
    ga = torch.autograd.grad(a, w, retain_graph=True)[0]
    gb = torch.autograd.grad(b, w, retain_graph=True)[0]
    got = adaptive_weight(a, b, w, eps=1e-4)
    assert got.item() == pytest.approx((ga.norm() / (gb.norm() + 1e-4)).item(), rel=1e-6)
    assert not got.requires_grad
    assert adaptive_weight(a, b * 1e-12, w, max_weight=10.0).item() == 10.0
    with pytest.raises(ValueError, match="requires grad"):
        adaptive_weight(a, b, torch.zeros(4, 3))


def test_vf_loss_zero_when_projection_equals_features():
    f = torch.randn(2, 16, 4, 4)
    for m1, m2 in [(0.0, 0.0), (0.5, 0.25)]:
        assert vf_loss(f.clone(), f, m1=m1, m2=m2).item() == pytest.approx(0.0, abs=1e-6)
    # a positive rescaling changes no cosine: still zero
    assert vf_loss(3.0 * f, f, m1=0.0, m2=0.0).item() == pytest.approx(0.0, abs=1e-6)
    assert vf_loss(torch.randn(2, 16, 4, 4), f, m1=0.0, m2=0.0).item() > 0.1


def test_margin_cosine_is_a_hinge():
    # two 2-D vectors per position at a chosen angle: cos = cos(theta)
    f = torch.zeros(1, 2, 1, 1)
    f[0, 0] = 1.0
    for theta, margin in [(0.5, 0.5), (1.2, 0.5), (1.2, 0.0)]:
        z = torch.tensor([math.cos(theta), math.sin(theta)]).view(1, 2, 1, 1)
        expected = max(0.0, 1 - margin - math.cos(theta))
        assert margin_cosine_loss(z, f, margin).item() == pytest.approx(expected, abs=1e-6)
    # cos(0.5) = 0.878 > 1 - 0.5: inside the margin, no loss; cos(1.2) = 0.362 < 0.5: a loss of 0.138
    z = torch.tensor([math.cos(1.2), math.sin(1.2)]).view(1, 2, 1, 1).requires_grad_()
    margin_cosine_loss(z, f, 0.5).backward()
    assert z.grad.abs().sum() > 0


def test_margin_distance_matrix_is_a_hinge():
    torch.manual_seed(0)
    f = torch.randn(1, 8, 3, 3)
    z = f + 0.2 * torch.randn_like(f)
    a, b = F.normalize(z.flatten(2), dim=1), F.normalize(f.flatten(2), dim=1)
    diff = (a.transpose(1, 2) @ a - b.transpose(1, 2) @ b).abs()
    for m2 in [0.0, 0.05, 0.25]:
        expected = F.relu(diff - m2).mean().item()
        assert margin_distance_matrix_loss(z, f, m2).item() == pytest.approx(expected, rel=1e-5, abs=1e-7)
    assert margin_distance_matrix_loss(z, f, diff.max().item() + 1e-3).item() == 0.0
    assert margin_distance_matrix_loss(z, f, 0.0).item() > 0.0


def test_vf_loss_shape_error():
    with pytest.raises(ValueError, match="same shape"):
        vf_loss(torch.randn(1, 8, 4, 4), torch.randn(1, 16, 4, 4))


def test_diffaug_translation_is_a_zero_filled_shift():
    torch.manual_seed(0)
    x = torch.rand(4, 3, 16, 16) + 1.0  # strictly positive, so zeros mark the filled border
    aug = DiffAug(prob=1.0, translation=0.125, colour=False)
    y = aug(x)
    assert y.shape == x.shape
    for i in range(4):
        found = False
        for dy in range(-2, 3):
            for dx in range(-2, 3):
                shifted = torch.zeros_like(x[i])
                src = x[i][:, max(0, dy) : 16 + min(0, dy), max(0, dx) : 16 + min(0, dx)]
                shifted[:, max(0, -dy) : 16 - max(0, dy), max(0, -dx) : 16 - max(0, dx)] = src
                found |= torch.equal(shifted, y[i])
        assert found, f"sample {i} is not a shifted copy"
    xg = x.clone().requires_grad_()
    DiffAug()(xg).sum().backward()
    assert xg.grad.abs().sum() > 0
    assert torch.equal(DiffAug(prob=0.0)(x), x)
    with pytest.raises(ValueError, match="prob"):
        DiffAug(prob=2.0)


def test_quantize_8bit():
    x = torch.tensor([-2.0, -1.0, 0.0, 0.3, 1.0, 5.0])
    q = quantize_8bit(x)
    levels = (q + 1) * 127.5
    torch.testing.assert_close(levels, levels.round())
    assert q.min() == -1 and q.max() == 1
