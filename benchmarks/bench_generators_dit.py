"""Training-step throughput and MFU of the DiT family, ours beside diffusers' DiT in one run.

One step = forward + backward + AdamW step with an MSE loss on the output, batch 32 at full size
(``dit-s-2`` and ``dit-b-2`` on 4×32×32 SD-VAE latents, ``lightningdit-b-1`` on 32×16×16 VA-VAE latents:
256 tokens each).  FLOPs are counted analytically, 2 per multiply-add, backward = 2× forward.
diffusers gets the very same weights through our converter.

Rows: ``ours`` compiles its blocks at full size (``compile_blocks()``, as LightningDiT's own code
decorates its blocks with ``torch.compile``; the warm-up round pays the compilation), ``ours-eager``
is the same model without compilation, ``diffusers`` runs eagerly as it ships.  The three alternate
step by step (``measure_interleaved``).  In the tiny default run nothing is compiled (compiling
costs minutes) and ``ours`` is the eager model.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from latentforge_generators.convert import to_diffusers
from latentforge_generators.dit import SIZES as DIT_SIZES
from latentforge_generators.dit import DiT
from latentforge_generators.lightningdit import SIZES as LIGHTNINGDIT_SIZES
from latentforge_generators.lightningdit import LightningDiT


def forward_macs(model) -> float:
    """Multiply-adds of one forward pass for one image of a DiT / LightningDiT."""
    d, p = model.hidden_size, model.patch_size
    tokens = (model.input_size // p) ** 2
    block = model.blocks[0]
    ffn_hidden = block.mlp.w3.in_features * 3 if hasattr(block.mlp, "w3") else block.mlp.fc1.out_features * 2
    per_block = 4 * tokens * d * d + 2 * tokens * tokens * d + tokens * d * ffn_hidden + 6 * d * d
    embed = tokens * model.in_channels * p * p * d + 256 * d + d * d
    final = 2 * d * d + tokens * d * p * p * model.out_channels
    return embed + model.depth * per_block + final


def training_step(model, forward, shape, batch: int, generator: torch.Generator):
    opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-4)
    c, s, c_out, num_classes = shape
    x = torch.randn(batch, c, s, s, generator=generator)
    t = torch.rand(batch, generator=generator)
    y = torch.randint(0, num_classes, (batch,), generator=generator)
    target = torch.randn(batch, c_out, s, s, generator=generator)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = F.mse_loss(forward(x, t, y), target)
        loss.backward()
        opt.step()
        return loss.detach()

    return step


SIZES = {**DIT_SIZES, **LIGHTNINGDIT_SIZES}
CASES = [  # registry name, class, latent (C, S), has a diffusers peer
    pytest.param("dit-s-2", DiT, (4, 32), True, id="dit-s-2"),
    pytest.param("dit-b-2", DiT, (4, 32), True, id="dit-b-2", marks=pytest.mark.headline),
    pytest.param("lightningdit-b-1", LightningDiT, (32, 16), False, id="lightningdit-b-1"),
]


@pytest.mark.parametrize("name,cls,latent,has_peer", CASES)
def test_train_step(measure_interleaved, full, name, cls, latent, has_peer):
    torch.manual_seed(0)
    channels, size = latent
    if full:
        model, batch = cls(**SIZES[name], in_channels=channels, input_size=size, learn_sigma=False), 32
    else:  # a tiny model of the same family, one call
        tiny = SIZES["test-dit" if cls is DiT else "test-lightningdit"]
        model, batch = cls(**tiny, in_channels=channels, input_size=8, learn_sigma=False, num_classes=10), 2
    flops = 3 * 2 * forward_macs(model) * batch  # forward + backward (2× forward)
    shape = (model.in_channels, model.input_size, model.out_channels, model.num_classes)

    def step_of(trained, forward):
        return training_step(trained, forward, shape, batch, torch.Generator().manual_seed(0))

    steps = {}
    if full:  # the compiled copy first: "ours" is the row the peer is compared against
        compiled = copy.deepcopy(model).train().compile_blocks()
        steps["ours"] = step_of(compiled, compiled)
    steps["ours-eager" if full else "ours"] = step_of(model.train(), model)
    if has_peer:
        peer = to_diffusers(model).train()
        steps["diffusers"] = step_of(peer, lambda x, t, y: peer(x, t, y).sample)
    measure_interleaved(steps, group=f"train step {name} b{batch}", items=batch, unit="images/s", flops=flops)
