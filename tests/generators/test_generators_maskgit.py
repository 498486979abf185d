"""MaskGIT: the cosine unmasking schedule step by step (DiGIT's 8 steps over 256 tokens), the order
of unmasking under known logits, the training mask distribution, and bad input."""

import math

import pytest
import torch

from latentforge_core import generators
from latentforge_generators.maskgit import MaskGIT
from latentforge_generators.token_sampling import (
    cfg_logits,
    maskgit_decode,
    random_mask,
    training_mask_counts,
)

# reference/digit.md: still masked after each of the 8 steps over 256 tokens
DIGIT_REMAINING = [251, 236, 212, 181, 142, 97, 49, 0]


def test_schedule_reproduces_digit_mask_counts():
    V, N = 7, 256
    seen = []
    logits = torch.randn(2, N, V)

    def logits_fn(tokens):
        seen.append((tokens == V).sum(dim=1).tolist())
        return logits

    out = maskgit_decode(
        logits_fn,
        torch.zeros(2, N, dtype=torch.long),
        torch.ones(2, N, dtype=torch.bool),
        mask_id=V,
        steps=8,
        generator=torch.Generator().manual_seed(0),
    )
    assert seen == [[c, c] for c in [256, *DIGIT_REMAINING[:-1]]]
    assert int((out == V).sum()) == 0 and out.max() < V
    revealed = [a - b for a, b in zip([256, *DIGIT_REMAINING[:-1]], DIGIT_REMAINING, strict=True)]
    assert revealed == [5, 15, 24, 31, 39, 45, 48, 49]


def test_known_logits_unmask_the_most_confident_first():
    """Position i allows k_i equally likely tokens, so whatever is drawn there has log-prob -log k_i.
    With no Gumbel noise each step must keep exactly the positions of smallest k_i still masked."""
    N, steps = 256, 8
    g = torch.Generator().manual_seed(0)
    k = torch.randperm(N, generator=g) + 1  # distinct support sizes 1..256
    V = N
    logits = torch.where(torch.arange(V)[None, :] < k[:, None], 0.0, float("-inf"))[None]  # 1 N V
    masks = []

    def logits_fn(tokens):
        masks.append(tokens == V)
        return logits

    out = maskgit_decode(
        logits_fn,
        torch.zeros(1, N, dtype=torch.long),
        torch.ones(1, N, dtype=torch.bool),
        mask_id=V,
        steps=steps,
        choice_temperature=0.0,
        generator=g,
    )
    assert torch.all(out[0] < k)
    order = k.argsort()  # most confident (fewest choices) first
    for remaining, mask in zip(DIGIT_REMAINING[:-1], masks[1:], strict=True):
        expected = torch.zeros(N, dtype=torch.bool)
        expected[order[N - remaining :]] = True
        assert torch.equal(mask[0], expected)


def test_model_sampling_follows_the_schedule():
    model = MaskGIT(vocab_size=9, grid_size=16, num_classes=3, dim=32, depth=1, num_heads=2).eval()
    seen = []
    model.tok_embed.register_forward_pre_hook(lambda m, args: seen.append(int((args[0] == 9).sum())))
    out = model.sample(torch.tensor([2]), steps=8)
    assert seen == [256, *DIGIT_REMAINING[:-1]]
    assert out.shape == (1, 16, 16) and out.max() < 9


def test_training_mask_follows_the_cosine_schedule():
    n = 256
    counts = training_mask_counts(20000, n, generator=torch.Generator().manual_seed(0))
    assert counts.min() >= 1 and counts.max() <= n
    # E[cos(pi u / 2)] = 2 / pi for u ~ U[0, 1)
    assert abs((counts.float() - 0.5).mean().item() / n - 2 / math.pi) < 0.01
    mask = random_mask(counts[:100], n)
    assert torch.equal(mask.sum(1), counts[:100])


def test_loss_scores_only_masked_tokens():
    model = MaskGIT(
        vocab_size=11, grid_size=4, num_classes=2, dim=32, depth=2, num_heads=2, label_smoothing=0.0
    ).eval()
    tokens, y = torch.randint(0, 11, (6, 16)), torch.tensor([0, 1, 0, 1, 0, 1])
    torch.manual_seed(5)
    loss = model.loss(tokens, y)
    torch.manual_seed(5)
    masked = random_mask(training_mask_counts(6, 16), 16)
    logits = model(tokens.masked_fill(masked, 11), y)
    expected = torch.nn.functional.cross_entropy(logits[masked], tokens[masked])
    torch.testing.assert_close(loss, expected)


def test_attention_is_bidirectional():
    model = MaskGIT(vocab_size=11, grid_size=4, dim=32, depth=2, num_heads=2).eval()
    a = torch.full((1, 16), 11)
    b = a.clone()
    b[0, -1] = 3
    assert not torch.allclose(model(a)[0, 0], model(b)[0, 0])


def test_guided_and_unconditional_sampling():
    model = generators.build("test-maskgit").eval()
    assert model.sample(torch.tensor([1, 2]), cfg_scale=2.0).shape == (2, 4, 4)
    assert model.sample(3).shape == (3, 4, 4)


@pytest.mark.parametrize("cfg_scale", [1.0, 3.0])
def test_sampling_draws_the_tokens_of_separate_checked_forwards(cfg_scale):
    """``sample`` runs one unchecked forward of [conditional; unconditional] rows per step; the
    reference decodes with two public forwards (conditional, then null) per step."""
    torch.manual_seed(0)
    model = generators.build("test-maskgit").eval()
    y = torch.tensor([1, 2, 7])

    def reference(tokens):
        cond = model(tokens, y)
        return cond if cfg_scale == 1.0 else cfg_logits(torch.cat([cond, model(tokens, len(y))]), cfg_scale)

    with torch.no_grad():
        start = torch.full((3, model.seq_len), model.mask_id)
        ref = maskgit_decode(
            reference, start, start == model.mask_id, mask_id=model.mask_id,
            generator=torch.Generator().manual_seed(2),
        )  # fmt: skip
    ours = model.sample(y, cfg_scale=cfg_scale, generator=torch.Generator().manual_seed(2))
    assert torch.equal(ours.flatten(1), ref)


def test_registered_tiny_model_fulfils_the_protocol():
    model = generators.build("test-maskgit")
    loss = model.loss(torch.randint(0, 64, (2, 4, 4)), torch.tensor([0, 9]))
    loss.backward()
    assert loss.item() > 0 and model.input_shape == (4, 4)


def test_bad_input_is_explained():
    model = generators.build("test-maskgit")
    ok = torch.randint(0, 64, (2, 4, 4))
    with pytest.raises(ValueError, match=r"\[0, 64\)"):
        model.loss(ok.masked_fill(ok == ok[0, 0, 0], 64), torch.tensor([0, 1]))  # [MASK] is not a target
    with pytest.raises(ValueError, match="class ids must lie in"):
        model.loss(ok, torch.tensor([0, 10]))
    with pytest.raises(ValueError, match="expected token grids"):
        model.loss(torch.randint(0, 64, (2, 5, 5)))
    with pytest.raises(ValueError, match="steps must be >= 1"):
        model.sample(torch.tensor([0]), steps=0)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        model.sample(torch.tensor([0]), temperature=-1.0)
