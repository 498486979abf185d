"""REPA on real data, measured the demo's way: does alignment change what the generator learns?

The demo's setting (``latentforge run demo``): its evaluator CNN, its tiny ViT trained as a digit
classifier, the RAE decoder on that ViT's features; then the demo's generator (test-ditdh on the
normalised RAE latents, the demo's optimiser, schedule, EMA and class table) trained twice per seed
for the same steps on the same data order — plain, and with REPA aligning its block ``DEPTH``'s tokens
to the same trained ViT's patch features (λ ``WEIGHT``, projector ``PROJECTOR``).  The loop is
train-generator's for REPA: ``TrainState`` over the generator (its EMA is what samples), the
optimiser over generator + projector, the projector kept beside.  Each generator is scored by the
demo's own judge: the evaluator's accuracy on 360 class-balanced samples (asked class vs predicted)
and the Fréchet distance of the evaluator's features to the real training digits.

What the experiment behind this test measured (3 seeds; accuracy / FD to the real training digits;
held-out real digits give FD 2.9, uniform noise 1688; REPA depth 1 unless said, projector 64):

    steps  run             seed 0        seed 1        seed 2        mean accuracy   mean FD
    500    plain           38.9% / 159   40.0% / 149   39.7% / 163   39.5 ± 0.6%     157 ± 7
    500    REPA λ 0.5      40.3% / 164   40.6% / 152   40.6% / 165   40.5 ± 0.2%     160 ± 7
    1000   plain           91.9% /  66   98.6% /  54   93.3% /  58   94.6 ± 3.5%      59 ± 6
    1000   REPA λ 0.1      90.8% /  74   88.3% /  72   85.0% /  87   88.1 ± 2.9%      78 ± 8
    1000   REPA λ 0.5      83.9% /  80   86.7% /  84   82.5% /  95   84.4 ± 2.1%      86 ± 7
    1000   REPA d2 λ 1.0   88.9% /  71   84.2% /  94   82.2% /  83   85.1 ± 3.4%      82 ± 12
    3000   plain           98.6% /  38   99.7% /  41   98.9% /  38   99.1 ± 0.6%      39 ± 2
    3000   REPA λ 0.5      98.9% /  37   97.5% /  34   98.6% /  43   98.3 ± 0.7%      38 ± 4

The alignment is learned fast (cosine 0.01 at the start, 0.94 by step 500, 0.96 at 1000), but at
this scale REPA does not speed training up: at 1000 steps it is behind the plain run in every seed
and setting, and by the demo's 3000 steps the two are level. Controls at 1000 steps, seeds 0/1: λ 0
(projector and random stream only) 90.0% / 67, 95.3% / 61, near plain; without the demo's gradient
clipping the gap stays (plain 91.7% / 66, 97.8% / 54; REPA λ 0.5 83.9% / 80, 86.4% / 84): the
alignment term itself costs the early steps. A likely reason, not tested: the latents here *are* the
aligned ViT's features, so the alignment has little to teach (REPA's gains were measured on ImageNet
with SD-VAE latents).
So this test asserts only what held over the seeds with room: the alignment is learned, both runs
learn the digits, and REPA's cost at 1000 steps stays within stated margins.
"""

from __future__ import annotations

import statistics

import attrs
import pytest
import torch
from torch import nn

from latentforge_core.alignment import encoder_targets
from latentforge_core.device import autocast
from latentforge_generators.repa import REPA
from latentforge_runner import cli, distributed
from latentforge_runner.recipes.demo import DemoRecipe
from latentforge_runner.training import TrainState, micro_batches

SEEDS = (0, 1)
STEPS = 1000
DEPTH, WEIGHT, PROJECTOR = 1, 0.5, 64
# At 1000 steps the experiment measured REPA behind in every seed (accuracy −0.08 to −0.12, FD ×1.2 to
# ×1.6); the margins bound that cost with room, they do not claim parity.
ACCURACY_MARGIN = 0.20  # REPA's mean sample accuracy may trail the plain run's by at most this
FD_MARGIN = 2.0  # REPA's mean Fréchet distance may exceed the plain run's by at most this factor


def _generator(r: DemoRecipe, rae, encoder, *, repa: bool, seed: int) -> dict:
    """The demo's generator stage for ``STEPS`` steps (seed: init, data order, sampling noise), plain or
    with REPA; → its scores and, with REPA, the cosine similarity at the start and at the end."""
    cfg = r.cfg
    t = attrs.evolve(cfg.generator_training, steps=STEPS, seed=seed)
    with torch.no_grad():
        z = torch.cat([rae.encode(x, normalize=True) for x in r.train.images.split(256)])
        target = torch.cat([encoder_targets(encoder, x) for x in r.train.images.split(256)])
    labels = r.train.labels
    torch.manual_seed(seed)
    c, h, w = z.shape[1:]
    gen = cfg.generator.build("generators", in_channels=c, input_size=h, num_classes=10)
    nn.init.normal_(gen.backbone.y_embedder.embedding_table.weight, std=cfg.class_embedding_std)
    trained = REPA(gen, encoder.embed_dim, DEPTH, WEIGHT, PROJECTOR) if repa else gen
    entry = distributed.wrap(trained, r.dist, method="loss")
    state = TrainState(
        gen,
        t,
        data=lambda idx: {"x": z[idx], "y": labels[idx], "target": target[idx]},
        num_items=len(r.train),
        dist=r.dist,
        run_dir=r.run_dir / f"generator-{'repa' if repa else 'plain'}-{seed}",
        config={"name": "repa-learning"},
        params=trained.parameters(),
    )
    if repa:
        state.keep("projector", trained.projector)
    cosine: list[float] = []
    gen.train()
    for batch in state.steps():
        for part, sync in micro_batches(batch, t.grad_accum, entry, r.dist):
            with sync, autocast(r.device, t.dtype):
                if repa:
                    terms = entry(part["x"], part["y"], part["target"], return_terms=True)
                    cosine.append(-float(terms["alignment"].detach()))
                    loss = terms["loss"]
                else:
                    loss = entry(part["x"], part["y"])
            state.optim.backward(loss, t.grad_accum, state.step)
        state.update()
        state.step += 1
    r.cfg = attrs.evolve(cfg, run=attrs.evolve(cfg.run, seed=seed))  # the sampling noise's seed
    try:
        images, asked = r.sample(state.eval_model(), rae)
    finally:
        r.cfg = cfg
    r.report = {}
    r.score(r.judge, images, asked)
    out = {"accuracy": r.report["generated_accuracy"], "fd": r.report["fd_generated"]}
    if cosine:
        out |= {"cos_start": statistics.mean(cosine[:10]), "cos_end": statistics.mean(cosine[-50:])}
    return out


@pytest.mark.slow
def test_repa_on_the_digits_learns_the_alignment_and_samples_no_worse(tmp_path):
    torch.set_num_threads(1)  # as the demo: its small matrices lose on busy cores
    _, cfg = cli.load_settings("demo", None, [f"run.output_dir={tmp_path}"])
    r = DemoRecipe(cfg)
    r.setup()
    try:
        r.judge = r.train_evaluator()
        encoder = r.train_encoder()  # the tiny ViT, trained on the digits, frozen: REPA's encoder here
        rae = r.train_decoder(encoder)
        rae.compute_stats([x for x in r.train.images.split(256)])
        runs = {
            (variant, seed): _generator(r, rae, encoder, repa=variant == "repa", seed=seed)
            for seed in SEEDS
            for variant in ("plain", "repa")
        }
    finally:
        r.cleanup()
    for (variant, seed), s in runs.items():
        extra = f", cos {s['cos_start']:.3f} → {s['cos_end']:.3f}" if variant == "repa" else ""
        print(f"{variant:5s} seed {seed}: accuracy {s['accuracy']:.3f}, FD {s['fd']:.1f}{extra}")
    mean = {
        v: {k: statistics.mean(runs[v, s][k] for s in SEEDS) for k in ("accuracy", "fd")}
        for v in ("plain", "repa")
    }
    print(f"mean over seeds {SEEDS} at {STEPS} steps: {mean}")

    # The alignment is learned: the projected tokens go from unrelated to the encoder's features to
    # close to them, in every seed.
    for seed in SEEDS:
        s = runs["repa", seed]
        assert s["cos_start"] < 0.3 and s["cos_end"] > 0.8, (seed, s)
    # Both generators learn the digits (the plain run is a real baseline, not a broken one) …
    for key, s in runs.items():
        assert s["accuracy"] > (0.8 if key[0] == "plain" else 0.6), (key, s)
    # … and REPA's samples are not worse beyond the margins.  (Not "better": at this scale the
    # experiment found no reliable gain, see the module docstring.)
    assert mean["repa"]["accuracy"] >= mean["plain"]["accuracy"] - ACCURACY_MARGIN, mean
    assert mean["repa"]["fd"] <= FD_MARGIN * mean["plain"]["fd"], mean
