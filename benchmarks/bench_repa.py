"""What REPA costs a training step: a flow generator's step with and without alignment, in one run.

One step = the flow loss (``FlowGenerator.loss``: its own noise and times) + backward + AdamW step on
latents that are given (as from ``cache-latents``); the REPA step adds what ``train-generator`` adds
with an ``alignment:`` block: the frozen encoder's patch features of the batch's images
(``encoder_targets``, no gradients), the projector on block ``depth``'s tokens and the cosine term,
the projector trained with the generator.  Full size: ``dit-b-2`` on 4×32×32 latents (256 px
equivalent), batch 8, with REPA's settings (DINOv2-B/14 at 224 px, random weights — the cost does not
depend on them; its 16×16 grid is the token grid; depth 8, projector 2048, λ 0.5) on 256 px images.
The tiny default run uses ``test-dit`` on 4×8×8 latents and ``test-vit-tiny`` at 16 px, batch 2.

Rows: ``ours`` is the step with REPA, ``without-repa`` the same generator's plain step; they alternate
step by step (``measure_interleaved``), so the ratio column is REPA's throughput over the plain one's.
"""

from __future__ import annotations

import copy

import torch

from latentforge_core.alignment import encoder_targets
from latentforge_encoders.zoo import build_encoder
from latentforge_generators.repa import REPA
from latentforge_generators.zoo import dit_b_2, tiny_dit

FULL = dict(batch=8, latent=(4, 32), image=256, encoder="dinov2-vitb14", depth=8, projector=2048)
TINY = dict(batch=2, latent=(4, 8), image=16, encoder="test-vit-tiny", depth=1, projector=64)


def test_train_step_with_and_without_repa(measure_interleaved, full, device):
    s = FULL if full else TINY
    torch.manual_seed(0)
    channels, size = s["latent"]
    build = dit_b_2 if full else tiny_dit
    generator = build(in_channels=channels, input_size=size, num_classes=1000 if full else 10).to(device)
    # the encoder's grid is the token grid (16×16 at full size: 224 px / 14 = 256 / 2 / 8)
    encoder = build_encoder(s["encoder"], **({} if full else {"image_size": 16})).to(device).eval()
    plain = copy.deepcopy(generator).train()
    repa = REPA(generator.train(), encoder.embed_dim, s["depth"], 0.5, s["projector"]).to(device)

    g = torch.Generator().manual_seed(0)
    b = s["batch"]
    x = torch.randn(b, channels, size, size, generator=g).to(device)
    y = torch.randint(0, generator.backbone.num_classes, (b,), generator=g).to(device)
    images = torch.rand(b, 3, s["image"], s["image"], generator=g).to(device)

    def step_of(trained, loss):
        opt = torch.optim.AdamW(trained.parameters(), lr=1e-4)

        def step():
            opt.zero_grad(set_to_none=True)
            out = loss()
            out.backward()
            opt.step()
            return out.detach()

        return step

    steps = {
        "ours": step_of(repa, lambda: repa.loss(x, y, encoder_targets(encoder, images))),
        "without-repa": step_of(plain, lambda: plain.loss(x, y)),
    }
    if not full:  # the tiny run has timing off: check that both steps run and REPA's term is in [-1, 1]
        terms = repa.loss(x, y, encoder_targets(encoder, images), return_terms=True)
        assert -1 <= float(terms["alignment"].detach()) <= 1
    group = f"train step {'dit-b-2' if full else 'test-dit'} b{b} REPA ({s['encoder']}, depth {s['depth']})"
    measure_interleaved(steps, group=group, items=b, unit="images/s", rounds=5 if full else 1)
