"""REPA: the alignment loss pinned against its definition, every registered flow generator aligned to
every encoder family (and a plugin's encoder), and the bad inputs a user would give."""

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from latentforge_core import registry
from latentforge_core.alignment import Projector, encoder_targets, match_grid, negative_cosine
from latentforge_core.errors import InputError, InputTypeError
from latentforge_generators.repa import REPA, alignment_blocks

FLOW = ["test-dit", "test-sit", "test-lightningdit", "test-ditdh"]
SHAPE = dict(in_channels=4, input_size=8, num_classes=10)
PLUGIN = Path(__file__).parents[2] / "examples" / "plugin-example" / "src"


def _encoder(family):
    """A tiny random encoder of each registered family (DINOv2 with and without registers, SigLIP2,
    MAE, the test ViT), or the plugin example's patch-mean encoder."""
    if family == "plugin":
        sys.path.insert(0, str(PLUGIN))
        try:
            from acme_latentforge_encoder import patch_mean_encoder
        finally:
            sys.path.remove(str(PLUGIN))
        return patch_mean_encoder(patch_size=8, image_size=32)
    torch.manual_seed(0)
    if family == "test-vit-tiny":
        return registry.encoders.build(family)
    size = 56 if "dinov2" in family else 64  # a 4×4 grid at patch 14 / 16
    return registry.encoders.build(family, depth=1, embed_dim=32, num_heads=2, image_size=size)


def _randomised(generator):
    """Weights off the zero init (adaLN-zero makes every block an identity at step 0)."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in generator.parameters():
            if p.requires_grad:
                p.copy_(torch.randn_like(p) * 0.1)
    return generator


def test_loss_equals_its_definition(monkeypatch):
    """flow loss + λ · −mean cos(projector(h_depth), target), h_depth the tokens after block ``depth``
    computed here from DiT's forward, with the same noise and t as the loss draws."""
    torch.manual_seed(0)
    generator = _randomised(registry.generators.build("test-dit", **SHAPE))
    repa = REPA(generator, encoder_dim=24, depth=1, weight=0.5, projector_dim=16)
    x, y = torch.randn(3, 4, 8, 8), torch.tensor([0, 4, 9])
    noise, t = torch.randn(3, 4, 8, 8), torch.tensor([0.2, 0.5, 0.9])
    monkeypatch.setattr(torch, "randn_like", lambda like: noise)
    monkeypatch.setattr(type(generator.transport), "sample_time", lambda self, n, device=None: t)
    target = torch.randn(3, 24, 4, 4)
    terms = repa.eval().loss(x, y, target, return_terms=True)  # eval: no label dropout

    b = generator.backbone
    xt = (1 - t.view(-1, 1, 1, 1)) * x + t.view(-1, 1, 1, 1) * noise  # internal time: t = 1 noise
    model_t = 1 - t  # DiT's t = 0 is the noise
    c = b.t_embedder(model_t) + b.y_embedder(y)  # B, D
    h = b.x_embedder(xt) + b.pos_embed  # B, N, D
    h = b.blocks[0](h, c, b.feat_rope)  # B, N, D: the tokens after block 1
    projected = repa.projector(h)
    expected_align = (
        -(F.normalize(projected, dim=-1) * F.normalize(target.flatten(2).mT, dim=-1)).sum(-1).mean()
    )
    velocity = -b(xt, model_t, y)[:, :4]  # DiT predicts data − noise in its time; ours is noise − data
    expected_diffusion = ((velocity - (noise - x)) ** 2).mean()
    assert terms["alignment"].item() == pytest.approx(expected_align.item(), abs=1e-6)
    assert terms["diffusion"].item() == pytest.approx(expected_diffusion.item(), abs=1e-5)
    assert terms["loss"].item() == pytest.approx((expected_diffusion + 0.5 * expected_align).item(), abs=1e-5)


def test_projector_is_repas_mlp():
    p = Projector(64, 32, hidden_dim=48)
    linears = [m for m in p.net if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(64, 48), (48, 48), (48, 32)]
    assert all(isinstance(p.net[i], torch.nn.SiLU) for i in (1, 3)) and len(p.net) == 5
    assert all(torch.equal(m.bias, torch.zeros_like(m.bias)) for m in linears)
    bound = (6 / (64 + 48)) ** 0.5  # xavier-uniform
    assert linears[0].weight.abs().max() <= bound and linears[0].weight.std() > bound / 3


@pytest.mark.parametrize(
    "family",
    ["dinov2-vits14", "dinov2-vits14-reg", "siglip2-vitb16-256", "mae-vitb16", "test-vit-tiny", "plugin"],
)
@pytest.mark.parametrize("name", FLOW)
def test_any_generator_aligns_to_any_encoder(name, family):
    """One training step: finite loss, gradients in the projector and in every block up to ``depth``
    (none in blocks after it from the alignment term alone), and the weights move."""
    encoder = _encoder(family)
    torch.manual_seed(0)
    generator = _randomised(registry.generators.build(name, **SHAPE))
    images = torch.rand(4, 3, 32, 32)
    target = encoder_targets(encoder, images)
    repa = REPA(generator, encoder_dim=target.shape[1], depth=1, weight=0.5, projector_dim=32)
    opt = torch.optim.AdamW(repa.parameters(), lr=1e-3)
    before = [p.detach().clone() for p in repa.parameters()]
    terms = repa.loss(torch.randn(4, 4, 8, 8), torch.arange(4), target, return_terms=True)
    assert torch.isfinite(terms["loss"]) and -1 <= terms["alignment"].item() <= 1
    terms["alignment"].backward(retain_graph=True)
    blocks = alignment_blocks(generator.backbone)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in repa.projector.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in blocks[0].parameters())
    assert all(
        p.grad is None or p.grad.abs().sum() == 0 for blk in list(blocks)[1:] for p in blk.parameters()
    )
    terms["loss"].backward()
    opt.step()
    assert any(not torch.equal(a, p) for a, p in zip(before, repa.parameters(), strict=True))


def test_match_grid_resizes_same_shape_grids_and_refuses_others():
    feats = torch.randn(2, 8, 16, 16)
    assert match_grid(feats, (16, 16)) is feats
    down = match_grid(feats, (8, 8))
    assert down.shape == (2, 8, 8, 8)
    # a constant map stays constant through the antialiased resize
    assert torch.allclose(match_grid(torch.ones(1, 1, 16, 16), (4, 4)), torch.ones(1, 1, 4, 4))
    assert match_grid(feats[:, :, :4, :4], (8, 8)).shape == (2, 8, 8, 8)
    with pytest.raises(InputError, match="16×16 feature grid cannot be matched to the 8×4 token grid"):
        match_grid(feats, (8, 4))


def test_bad_inputs_are_named():
    generator = registry.generators.build("test-lightningdit", **SHAPE)  # 2 blocks
    with pytest.raises(InputError, match="REPA depth 3 is beyond the 2 blocks .* expected a depth in 1…2"):
        REPA(generator, encoder_dim=8, depth=3)
    with pytest.raises(InputError, match="depth"):
        REPA(generator, encoder_dim=8, depth=0)
    ditdh = registry.generators.build("test-ditdh", **SHAPE)  # its head's blocks are not aligned
    depth = ditdh.backbone.depth
    with pytest.raises(InputError, match=f"beyond the {depth} blocks of DiTDH"):
        REPA(ditdh, encoder_dim=8, depth=depth + 1)
    repa = REPA(generator, encoder_dim=8, depth=1, projector_dim=8)
    x, y = torch.randn(2, 4, 8, 8), torch.arange(2)
    with pytest.raises(InputError, match="cannot be matched to the 8×8 token grid"):
        repa.loss(x, y, torch.randn(2, 8, 6, 3))  # an encoder grid of another aspect ratio
    with pytest.raises(InputError, match="3 encoder targets for a batch of 2 latents"):
        repa.loss(x, y, torch.randn(3, 8, 8, 8))
    with pytest.raises(InputError, match=r"projected features \(2, 64, 8\) and targets \(2, 64, 5\)"):
        repa.loss(x, y, torch.randn(2, 5, 8, 8))  # an encoder of another width than the projector's
    with pytest.raises(InputTypeError, match=r"alignment needs a patch feature map \[B, D, h, w\]"):
        encoder_targets(lambda images: images.mean(dim=(2, 3)), torch.rand(2, 3, 32, 32))
    with pytest.raises(InputTypeError, match="exposes no hidden tokens to align"):
        alignment_blocks(torch.nn.Linear(2, 2))


def test_negative_cosine_is_minus_one_when_aligned():
    a = torch.randn(2, 5, 7)
    assert negative_cosine(a, 3 * a).item() == pytest.approx(-1.0, abs=1e-6)
    assert negative_cosine(a, -a).item() == pytest.approx(1.0, abs=1e-6)


def test_repa_and_repa_e_sit_checkpoints_load_without_their_training_only_parts(tmp_path):
    """REPA's SiT checkpoints carry the projector (``projectors.*``), REPA-E's also the latent BatchNorm
    (``bn.*``, the tokenizer's statistics): both load into ``sit-*`` with those left out."""
    torch.manual_seed(0)
    source = _randomised(registry.generators.build("test-sit", **SHAPE)).backbone.state_dict()
    extra = {
        "projectors.0.0.weight": torch.randn(16, 64),
        "bn.running_mean": torch.zeros(4),
        "bn.running_var": torch.ones(4),
        "bn.num_batches_tracked": torch.tensor(3),
    }
    torch.save({"ema": {**source, **extra}}, tmp_path / "0400000.pt")
    loaded = registry.generators.build("test-sit", **SHAPE, pretrained=tmp_path / "0400000.pt").backbone
    assert all(torch.equal(v, source[k]) for k, v in loaded.state_dict().items())


def test_repa_state_dict_holds_each_tensor_once(tmp_path):
    """The generator and the projector only (the aligned block is not a second submodule): the whole
    module saves as safetensors."""
    from latentforge_core.checkpoint import save_checkpoint

    repa = REPA(registry.generators.build("test-dit", **SHAPE), encoder_dim=8, depth=1, projector_dim=8)
    keys = list(repa.state_dict())
    assert all(k.startswith(("generator.", "projector.")) for k in keys)
    save_checkpoint(repa.state_dict(), tmp_path / "repa.safetensors", {})
