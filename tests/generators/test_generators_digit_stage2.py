"""DiGIT stage 2: fairseq checkpoints (strict, vs transformers' pre-LN OPT), KV cache, the 8-step
MaskGIT schedule over 256 codes, attention direction per variant, and bad input."""

import math

import layouts
import pytest
import torch

from latentforge_core import generators
from latentforge_core.checkpoint import CheckpointError
from latentforge_generators.digit_stage2 import DiGITStage2, convert_digit_stage2, load_digit_stage2

V, K, GRID, DIM, DEPTH, HEADS = 24, 12, 4, 32, 2, 4
N = GRID * GRID


def random_fairseq_stage2(seed=0, positions=1024):
    return layouts.random_fairseq_stage2(V, K, DIM, DEPTH, positions, seed)


def tiny(mode, grid=GRID):
    torch.manual_seed(0)
    return DiGITStage2(
        vocab_size=V, cond_vocab_size=K, grid_size=grid, dim=DIM, depth=DEPTH, num_heads=HEADS, mode=mode
    ).eval()


def test_stage2_checkpoint_matches_pre_ln_opt():
    """transformers' OPT keeps fairseq's layer layout; fed the fairseq embeddings (scaled by √d, with
    each segment's own position table) it is the reference for the whole causal AR decoder."""
    from transformers import OPTConfig, OPTForCausalLM

    sd = random_fairseq_stage2()
    model = load_digit_stage2(sd, mode="ar", num_heads=HEADS, grid_size=GRID).eval()
    config = OPTConfig(
        vocab_size=V + 5,
        hidden_size=DIM,
        num_hidden_layers=DEPTH,
        ffn_dim=4 * DIM,
        num_attention_heads=HEADS,
        max_position_embeddings=64,
        do_layer_norm_before=True,
        activation_function="gelu",
        dropout=0.0,
        word_embed_proj_dim=DIM,
        enable_bias=True,
        tie_word_embeddings=False,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
    )
    opt = OPTForCausalLM(config).eval()
    theirs = {"model." + k: v for k, v in sd.items() if k.startswith("decoder.layers.")}
    theirs["model.decoder.embed_tokens.weight"] = sd[
        "decoder.output_projection.weight"
    ]  # unused: embeds given
    theirs["model.decoder.embed_positions.weight"] = torch.zeros(66, DIM)  # positions added by hand below
    theirs["model.decoder.final_layer_norm.weight"] = sd["decoder.layer_norm.weight"]
    theirs["model.decoder.final_layer_norm.bias"] = sd["decoder.layer_norm.bias"]
    theirs["lm_head.weight"] = sd["decoder.output_projection.weight"]
    opt.load_state_dict(theirs, strict=True)

    cond, codes = torch.randint(0, K, (2, GRID, GRID)), torch.randint(0, V, (2, GRID, GRID))
    ids = torch.cat([cond.flatten(1) + V + 10, torch.full((2, 1), 2), codes.flatten(1)[:, :-1] + 5], 1)
    emb = sd["decoder.embed_tokens.weight"][ids] * math.sqrt(DIM)
    pos = torch.cat(
        [sd["decoder.embed_positions_1.weight"][2 : 2 + N], sd["decoder.embed_positions.weight"][2 : 2 + N]]
    )
    with torch.no_grad():
        ref = opt(inputs_embeds=emb + pos).logits[:, N:, 5:]
        ours = model(codes, cond)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)


def test_stage2_converter_is_strict_and_maps_the_specials():
    sd = random_fairseq_stage2()
    ours, config = convert_digit_stage2(sd, num_heads=HEADS)
    assert (config["vocab_size"], config["cond_vocab_size"]) == (V, K)
    emb = sd["decoder.embed_tokens.weight"]
    torch.testing.assert_close(ours["tok_embed.weight"][V + K], emb[2])  # </s> separates the segments
    torch.testing.assert_close(ours["tok_embed.weight"][V + K + 1], emb[3])  # <unk> is the NAR [MASK]
    torch.testing.assert_close(ours["tok_embed.weight"][V], emb[V + 5 + 5])  # first K-Means token
    nar = load_digit_stage2(sd, mode="maskgit", num_heads=HEADS, grid_size=GRID)
    assert nar.mode == "maskgit"
    with pytest.raises(CheckpointError, match="embed_positions_1"):
        convert_digit_stage2({k: v for k, v in sd.items() if "positions_1" not in k})
    with pytest.raises(CheckpointError, match="layer_norm"):  # a stage-1 (post-LN, no final LN) checkpoint
        convert_digit_stage2({k: v for k, v in sd.items() if not k.startswith("decoder.layer_norm")})


def test_ar_kv_cache_matches_full_forward_at_every_step():
    model = tiny("ar")
    cond, codes = torch.randint(0, K, (3, GRID, GRID)), torch.randint(0, V, (3, GRID, GRID))
    full = model(codes, cond)  # B N V
    ids = torch.cat([model.prefix(cond), codes.flatten(1)], 1)
    cache = model.transformer.new_cache(3, N + N + 1, model.head.weight)
    steps = [model.forward_ids(ids[:, : N + 1], cache)[:, -1:]]  # the prefix is computed once
    steps += [model.forward_ids(ids[:, i : i + 1], cache) for i in range(N + 1, 2 * N)]
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=0, atol=1e-5)
    g = lambda: torch.Generator().manual_seed(1)
    assert torch.equal(model.sample(cond, generator=g()), model.sample(cond, use_cache=False, generator=g()))


def test_attention_direction_per_variant():
    cond, codes = torch.randint(0, K, (1, GRID, GRID)), torch.randint(0, V, (1, GRID, GRID))
    later = codes.clone()
    later[0, -1, -1] = (later[0, -1, -1] + 1) % V
    ar, nar = tiny("ar"), tiny("maskgit")
    torch.testing.assert_close(ar(codes, cond), ar(later, cond))  # the last code predicts nothing in AR
    assert not torch.allclose(nar(codes, cond)[:, 0], nar(later, cond)[:, 0])
    # the conditioning prefix matters in both
    other = (cond + 1) % K
    assert not torch.allclose(ar(codes, cond), ar(codes, other))


def test_maskgit_variant_follows_digit_schedule_over_256_codes():
    model = tiny("maskgit", grid=16)
    seen = []
    forward_ids = model.forward_ids

    def spy(ids, *a, **kw):
        seen.append(int((ids[:, 16 * 16 + 1 :] == model.mask_id).sum()))
        return forward_ids(ids, *a, **kw)

    model.forward_ids = spy
    out = model.sample(torch.randint(0, K, (1, 16, 16)), steps=8)
    assert seen == [256, 251, 236, 212, 181, 142, 97, 49]
    assert out.shape == (1, 16, 16) and out.max() < V


@pytest.mark.parametrize("name", ["test-digit-stage2-ar", "test-digit-stage2-maskgit"])
def test_registered_tiny_models_fulfil_the_protocol(name):
    model = generators.build(name)
    codes, cond = torch.randint(0, 32, (2, 4, 4)), torch.randint(0, 16, (2, 4, 4))
    loss = model.loss(codes, cond)
    loss.backward()
    assert loss.item() > 0 and model.sample(cond).shape == (2, 4, 4)


def test_bad_input_is_explained():
    model = tiny("ar")
    codes, cond = torch.randint(0, V, (2, GRID, GRID)), torch.randint(0, K, (2, GRID, GRID))
    with pytest.raises(ValueError, match=rf"\[0, {K}\)"):
        model.loss(codes, cond + K)
    with pytest.raises(ValueError, match=rf"\[0, {V}\)"):
        model.loss(codes + V, cond)
    with pytest.raises(ValueError, match="conditioned on first-stage token grids"):
        model.sample(3)
    with pytest.raises(ValueError, match="3 conditioning grids for 2"):
        model.loss(codes, torch.randint(0, K, (3, GRID, GRID)))
    with pytest.raises(ValueError, match=r"top_p must lie in \(0, 1\]"):
        model.sample(cond, top_p=2.0)
    with pytest.raises(ValueError, match="unknown stage-2 mode"):
        DiGITStage2(mode="diffusion")


#################################################################################
#        AR top-p in fairseq's full-dictionary mass (converted checkpoints)     #
#################################################################################


def heavy_specials_stage2(seed=0):
    """A stage-2 checkpoint whose 5 special output rows hold a noticeable share of the softmax."""
    sd = random_fairseq_stage2(seed)
    sd["decoder.output_projection.weight"][:5] *= 2  # median share 15-55% over seeds 0-2
    return sd


def fairseq_nucleus(full_logits: torch.Tensor, p: float, temperature: float) -> list[int]:
    """Code ids fairseq may draw, written from its rule: log-softmax over the whole dictionary (at
    ``temperature``), the 5 specials set to -inf, no renormalisation; in descending order take
    tokens while the running mass stays below ``p``, plus the one that reaches it."""
    lprobs = (full_logits.double() / temperature).log_softmax(-1)
    lprobs[:5] = float("-inf")
    probs = lprobs.exp().tolist()
    kept, mass = [], 0.0
    for i in sorted(range(len(probs)), key=lambda i: -probs[i]):
        if probs[i] == 0.0:
            break
        kept.append(i - 5)
        mass += probs[i]
        if mass >= p:
            break
    return sorted(kept)


def record_top_p_steps(model, cond, monkeypatch, **sampler):
    """Sample, recording each step's final hidden states (the head's input) and the sampler's kept ids."""
    from latentforge_generators import token_sampling

    hidden, kept = [], []
    hook = model.head.register_forward_hook(lambda m, args, out: hidden.append(args[0]))
    candidates = token_sampling.top_candidates

    def spy(*args, **kw):
        values, ids = candidates(*args, **kw)
        kept.append([sorted(i[v > float("-inf")].tolist()) for v, i in zip(values, ids, strict=True)])
        return values, ids

    monkeypatch.setattr(token_sampling, "top_candidates", spy)
    try:
        codes = model.sample(cond, **sampler)
    finally:
        hook.remove()
    hidden = [h[:, -1] if h.ndim == 3 else h for h in hidden]  # B D per step
    return codes.flatten(1), hidden, kept


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_converted_ar_top_p_keeps_fairseq_full_dictionary_nucleus(seed, monkeypatch):
    """Every step's kept set and draw of a converted checkpoint follow fairseq's top-p rule (nucleus
    in the mass left after the 5 specials are set to -inf, not renormalised over the codes)."""
    sd = heavy_specials_stage2(seed)
    head = sd["decoder.output_projection.weight"]
    model = load_digit_stage2(sd, mode="ar", num_heads=HEADS, grid_size=GRID).eval()
    cond = torch.randint(0, K, (6, GRID, GRID), generator=torch.Generator().manual_seed(seed))
    differs_from_renormalised = partial = 0
    for p, temperature in [(0.8, 1.0), (0.5, 1.0), (0.95, 1.0), (0.8, 1.5)]:
        g = torch.Generator().manual_seed(seed)
        codes, hidden, kept = record_top_p_steps(
            model, cond, monkeypatch, top_p=p, temperature=temperature, generator=g
        )
        assert len(hidden) == len(kept) == N
        for step, (h, ours) in enumerate(zip(hidden, kept, strict=True)):
            full = h @ head.T  # B, 5 + V: fairseq's output projection over its whole dictionary
            specials_mass = full.softmax(-1)[:, :5].sum(-1)
            for row in range(len(cond)):
                ref = fairseq_nucleus(full[row], p, temperature)
                assert ours[row] == ref, (p, temperature, step, row)
                assert int(codes[row, step]) in ref
                partial += len(ref) < V
                old = fairseq_nucleus(torch.cat([full[row, :5] - 1e4, full[row, 5:]]), p, temperature)
                differs_from_renormalised += old != ref and bool(specials_mass[row] > 0.1)
    assert partial > 40  # the nucleus boundary is exercised, not only "keep every code"
    assert differs_from_renormalised > 50  # the specials' mass changes the nucleus in this checkpoint


@pytest.mark.parametrize("cond_seed, p", [(4, 0.5), (4, 0.8), (16, 0.8), (18, 0.8)])
def test_converted_ar_top_p_draws_follow_fairseq_probabilities(cond_seed, p):
    """Many first-step draws of one prefix: frequencies match fairseq's trimmed, unnormalised
    probabilities (multinomial renormalises them), not the nucleus renormalised over the codes."""
    from latentforge_generators.token_sampling import sample_logits

    sd = heavy_specials_stage2()
    head = sd["decoder.output_projection.weight"]
    model = load_digit_stage2(sd, mode="ar", num_heads=HEADS, grid_size=GRID).eval()
    cond = torch.randint(0, K, (1, GRID, GRID), generator=torch.Generator().manual_seed(cond_seed))
    with torch.no_grad():
        full = (model.hidden_ids(model.prefix(cond))[:, -1] @ head.T)[0]  # 5 + V
    assert full.softmax(-1)[:5].sum() > 0.15  # the specials hold noticeable mass
    ref = fairseq_nucleus(full, p, 1.0)
    assert ref != fairseq_nucleus(torch.cat([full[:5] - 1e4, full[5:]]), p, 1.0)
    probs = torch.zeros(V, dtype=torch.double)
    probs[ref] = full.double().softmax(-1)[5:][ref]
    probs /= probs.sum()
    n = 20000
    g = torch.Generator().manual_seed(0)
    codes, specials = full[5:].expand(n, V), full[:5].expand(n, 5)
    draws = sample_logits(codes, top_p=p, generator=g, excluded_logits=specials)
    freq = torch.bincount(draws, minlength=V).double() / n
    assert set(draws.unique().tolist()) <= set(ref)
    assert (freq - probs).abs().sum() / 2 < 0.02  # total variation
    old = sample_logits(codes, top_p=p, generator=g)  # the nucleus renormalised over the codes
    assert (torch.bincount(old, minlength=V).double() / n - probs).abs().sum() / 2 > 0.05


def test_special_rows_only_for_converted_checkpoints_and_loads_stay_strict():
    """Our own models carry no ``special_head`` key (old checkpoints load strictly, sampling is
    unchanged); a converted checkpoint keeps fairseq's 5 special output rows and reloads strictly."""
    own = tiny("ar")
    assert own.special_head is None and not any(k.startswith("special_head") for k in own.state_dict())
    again = DiGITStage2(
        vocab_size=V, cond_vocab_size=K, grid_size=GRID, dim=DIM, depth=DEPTH, num_heads=HEADS
    )
    again.load_state_dict(own.state_dict(), strict=True)
    sd = random_fairseq_stage2()
    ours, config = convert_digit_stage2(sd, num_heads=HEADS)
    torch.testing.assert_close(ours["special_head.weight"], sd["decoder.output_projection.weight"][:5])
    model = DiGITStage2(**{**config, "grid_size": GRID})
    model.load_state_dict(ours, strict=True)
    with pytest.raises(RuntimeError, match="special_head"):
        again.load_state_dict(ours, strict=True)
