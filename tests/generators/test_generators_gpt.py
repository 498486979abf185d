"""GPT: KV cache vs full forward, conformance with transformers' Llama and OPT (fairseq layout),
DiGIT stage-1 checkpoints, sampling filters vs transformers' warpers, and bad input."""

import math

import layouts
import pytest
import torch
import torch.nn.functional as F

from latentforge_core import generators
from latentforge_core.checkpoint import CheckpointError
from latentforge_generators.gpt import GPT, convert_digit_stage1, load_digit_stage1, load_llama
from latentforge_generators.token_sampling import filter_logits, sample_logits

V, C, GRID, DIM, DEPTH, HEADS = 40, 5, 4, 32, 3, 4


def tiny(style, **kw):
    torch.manual_seed(0)
    return GPT(
        vocab_size=V, grid_size=GRID, num_classes=C, dim=DIM, depth=DEPTH, num_heads=HEADS, style=style, **kw
    ).eval()


def random_fairseq_stage1(K=V, classes=C, dim=DIM, depth=DEPTH, positions=1024, seed=0):
    return layouts.random_fairseq_stage1(K, classes, dim, depth, positions, seed)


# ------------------------------------------------------------------------------------------------
# KV cache
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("style", ["digit", "modern", "prenorm"])
def test_kv_cache_matches_full_forward_at_every_step(style):
    model = tiny(style)
    tokens = torch.randint(0, V, (3, GRID, GRID))
    y = torch.tensor([0, 3, 4])
    full = model(tokens, y)  # B N V
    ids = torch.cat([model.start_ids(y)[:, None], tokens.flatten(1)], dim=1)
    cache = model.transformer.new_cache(3, GRID * GRID, model.head.weight)
    # a 3-token prefill, then one token per step
    steps = [model.forward_ids(ids[:, :3], cache)]
    steps += [model.forward_ids(ids[:, i : i + 1], cache) for i in range(3, GRID * GRID)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=0, atol=1e-5)
    assert cache.length == GRID * GRID


@pytest.mark.parametrize("style", ["digit", "modern", "prenorm"])
@pytest.mark.parametrize(
    "options",
    [dict(top_k=10), dict(), dict(top_p=0.7, temperature=0.8), dict(cfg_scale=2.5, top_k=5), dict(top_k=1)],
)
def test_sampling_with_and_without_cache_draws_the_same_tokens(style, options):
    """The cached decoding step (in-place cache, guidance mixed in place, reused noise buffer) draws
    exactly the tokens of the cache-less reference, which recomputes every prefix from scratch."""
    model = tiny(style)
    y = torch.tensor([1, 2, 4])
    a = model.sample(y, generator=torch.Generator().manual_seed(3), **options)
    b = model.sample(y, use_cache=False, generator=torch.Generator().manual_seed(3), **options)
    assert a.shape == (3, GRID, GRID) and a.dtype == torch.long
    assert torch.equal(a, b)
    if options.get("top_k") != 1:  # the seed matters: the draws are not a constant
        c = model.sample(y, generator=torch.Generator().manual_seed(4), **options)
        assert not torch.equal(a, c)


@pytest.mark.parametrize("style", ["digit", "modern"])
def test_static_shape_decoding_matches_the_full_forward(style):
    """The step that CUDA graphs replay: a tensor position, the whole cache read under a mask
    computed from it (stale slots past the position filled with garbage, as a reused cache has)."""
    model = tiny(style)
    tokens = torch.randint(0, V, (2, GRID, GRID))
    y = torch.tensor([0, 3])
    ids = torch.cat([model.start_ids(y)[:, None], tokens.flatten(1)], dim=1)
    with torch.no_grad():
        full = model(tokens, y)  # B N V
        cache = model.transformer.new_cache(2, GRID * GRID, model.head.weight)
        cache.k.normal_(), cache.v.normal_()
        position = torch.zeros((), dtype=torch.long)
        steps = [model.decode_step(ids[:, i : i + 1], cache, position.fill_(i)) for i in range(GRID * GRID)]
    torch.testing.assert_close(torch.stack(steps, dim=1), full, rtol=0, atol=1e-5)


def test_compiled_decoding_draws_the_eager_tokens(monkeypatch):
    """``compile=`` traces the static-shape step once (aot_eager here; reduce-overhead/CUDA graphs on
    GPU): no recompilation as the position moves, and the step is kept, with its cache, for the next
    call of the same shape."""
    monkeypatch.setattr(torch._dynamo.config, "error_on_recompile", True)
    torch._dynamo.reset()
    model = tiny("modern")
    y = torch.tensor([1, 2])
    seed = dict(top_k=10, cfg_scale=2.0)
    eager = model.sample(y, generator=torch.Generator().manual_seed(5), **seed)
    compiled = model.sample(y, compile="aot_eager", generator=torch.Generator().manual_seed(5), **seed)
    decoder = model.compiled_decoding
    again = model.sample(y, compile="aot_eager", generator=torch.Generator().manual_seed(5), **seed)
    assert torch.equal(compiled, eager) and torch.equal(again, eager)
    assert model.compiled_decoding is decoder  # reused, not rebuilt


# ------------------------------------------------------------------------------------------------
# Conformance: modern block vs transformers' Llama
# ------------------------------------------------------------------------------------------------
def tiny_llama(vocab):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=DIM,
        intermediate_size=88,
        num_hidden_layers=DEPTH,
        num_attention_heads=HEADS,
        num_key_value_heads=HEADS,
        rms_norm_eps=1e-5,
        max_position_embeddings=64,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=False,
        attention_bias=False,
        mlp_bias=False,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    torch.manual_seed(1)
    llama = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # non-trivial norm weights, so a swapped norm would show
        for name, p in llama.named_parameters():
            if "norm" in name:
                p.add_(0.3 * torch.randn_like(p))
    return llama


def test_modern_block_matches_llama():
    llama = tiny_llama(V + C + 1)
    model = load_llama(llama.state_dict(), vocab_size=V, grid_size=GRID, num_heads=HEADS).eval()
    tokens = torch.randint(0, V, (2, GRID, GRID))
    y = torch.tensor([4, 1])
    ids = torch.cat([(y + V)[:, None], tokens.flatten(1)[:, :-1]], dim=1)
    with torch.no_grad():
        ref = llama(input_ids=ids).logits[..., :V]
        ours = model(tokens, y)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)


def test_greedy_sampling_matches_llama_generate():
    llama = tiny_llama(V + C + 1)
    model = load_llama(llama.state_dict(), vocab_size=V, grid_size=GRID, num_heads=HEADS).eval()
    y = torch.tensor([0, 2, 3])
    # transformers picks from its whole vocabulary; the class/null rows are not grid tokens
    out = llama.generate(
        input_ids=(y + V)[:, None],
        max_new_tokens=GRID * GRID,
        do_sample=False,
        suppress_tokens=list(range(V, V + C + 1)),
    )
    ours = model.sample(y, top_k=1)
    assert torch.equal(ours.flatten(1), out[:, 1:])


# ------------------------------------------------------------------------------------------------
# DiGIT stage-1 checkpoints (fairseq layout) vs transformers' OPT, which keeps the fairseq layout
# ------------------------------------------------------------------------------------------------
def opt_from_fairseq(sd, dim=DIM, depth=DEPTH):
    from transformers import OPTConfig, OPTForCausalLM

    vocab, positions = (
        sd["decoder.embed_tokens.weight"].shape[0],
        sd["decoder.embed_positions.weight"].shape[0],
    )
    config = OPTConfig(
        vocab_size=vocab,
        hidden_size=dim,
        num_hidden_layers=depth,
        ffn_dim=4 * dim,
        num_attention_heads=HEADS,
        max_position_embeddings=positions - 2,
        do_layer_norm_before=False,
        activation_function="gelu",
        dropout=0.0,
        word_embed_proj_dim=dim,
        enable_bias=True,
        tie_word_embeddings=False,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
    )
    opt = OPTForCausalLM(config).eval()
    head = torch.zeros(vocab, dim)
    head[: sd["decoder.output_projection.weight"].shape[0]] = sd["decoder.output_projection.weight"]
    theirs = {"model." + k: v for k, v in sd.items() if k.startswith("decoder.layers.")}
    theirs["model.decoder.embed_tokens.weight"] = sd["decoder.embed_tokens.weight"] * math.sqrt(
        dim
    )  # fairseq's √d
    theirs["model.decoder.embed_positions.weight"] = sd["decoder.embed_positions.weight"]
    theirs["lm_head.weight"] = head
    opt.load_state_dict(theirs, strict=True)
    return opt


def test_digit_stage1_checkpoint_matches_opt_post_ln():
    sd = random_fairseq_stage1()
    model = load_digit_stage1(sd, num_heads=HEADS, grid_size=GRID).eval()
    assert model.vocab_size == V and model.num_classes == C and model.style == "digit"
    opt = opt_from_fairseq(sd)
    tokens = torch.randint(0, V, (2, GRID, GRID))
    y = torch.tensor([0, 4])
    fairseq_ids = torch.cat(
        [(y + V + 5)[:, None], tokens.flatten(1)[:, :-1] + 5], dim=1
    )  # class = len(dict)+c
    with torch.no_grad():
        ref = opt(input_ids=fairseq_ids).logits[..., 5 : V + 5]
        ours = model(tokens, y)
        # unconditional: fairseq starts with </s> (id 2)
        ref_u = opt(input_ids=torch.cat([torch.full((2, 1), 2), fairseq_ids[:, 1:]], 1)).logits[
            ..., 5 : V + 5
        ]
        ours_u = model(tokens)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(ours_u, ref_u, rtol=0, atol=1e-5)


def test_digit_stage1_converter_is_strict(tmp_path):
    sd = random_fairseq_stage1()
    ours, config = convert_digit_stage1(sd, num_heads=HEADS)
    assert config["max_positions"] == 1024 and config["ffn_dim"] == 4 * DIM
    broken = dict(sd)
    del broken["decoder.layers.1.fc2.bias"]
    with pytest.raises(CheckpointError, match="fc2.bias"):
        convert_digit_stage1(broken)
    extra = {**sd, "decoder.layers.0.adapter.weight": torch.zeros(1)}
    with pytest.raises(CheckpointError, match="adapter"):
        convert_digit_stage1(extra)
    # a checkpoint file wrapped as fairseq saves it ({"model": ...}) loads from disk too
    path = tmp_path / "checkpoint_last.pt"
    torch.save({"model": sd}, path)
    model = generators.build("gpt-digit-base", pretrained=str(path), num_heads=HEADS, grid_size=GRID)
    torch.testing.assert_close(model.head.weight, sd["decoder.output_projection.weight"][5:])


def test_digit_sizes_match_the_paper():
    with torch.device("meta"):
        base = generators.build("gpt-digit-base", num_classes=0)
        large = generators.build("gpt-digit-large", num_classes=0)
    count = lambda m: sum(p.numel() for p in m.parameters())
    assert abs(count(base) / 1e6 - 219.4) < 0.5  # "219M"
    assert abs(count(large) / 1e6 - 731.9) < 0.5  # "732M"


# ------------------------------------------------------------------------------------------------
# Loss, guidance, linear probe
# ------------------------------------------------------------------------------------------------
def test_loss_is_the_label_smoothed_nll():
    model = tiny("digit", label_smoothing=0.1)
    tokens = torch.randint(0, V, (2, GRID * GRID))
    logp = model(tokens).log_softmax(-1)
    nll = -logp.gather(-1, tokens[..., None]).mean()
    expected = 0.9 * nll - 0.1 * logp.mean()
    torch.testing.assert_close(model.loss(tokens), expected)


def test_class_dropout_and_guidance():
    model = tiny("modern", class_dropout=0.5).train()
    tokens = torch.randint(0, V, (64, GRID, GRID))
    y = torch.randint(0, C, (64,))
    torch.manual_seed(0)
    mixed = model(tokens, y)
    cond, uncond = model.eval()(tokens, y), model(tokens)
    is_cond = (mixed - cond).abs().amax(dim=(1, 2)) < 1e-6
    is_null = (mixed - uncond).abs().amax(dim=(1, 2)) < 1e-6
    assert torch.all(is_cond ^ is_null) and 10 < is_null.sum() < 54
    g = torch.Generator().manual_seed(0)
    guided = model.sample(torch.tensor([1, 2]), cfg_scale=3.0, generator=g)
    assert guided.shape == (2, GRID, GRID)


def test_linear_probe_features():
    model = tiny("digit")
    tokens = torch.randint(0, V, (2, GRID, GRID))
    emb, first, last = model.features(tokens, layers=(0, 1, -1))
    ids = torch.cat([torch.full((2, 1), model.null_id), tokens.flatten(1)], 1)
    torch.testing.assert_close(emb, model.embed(ids).mean(1))
    assert first.shape == last.shape == (2, DIM) and not torch.allclose(first, last)


# ------------------------------------------------------------------------------------------------
# Top-k / top-p against transformers' logits processors
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("top_k,top_p", [(5, None), (None, 0.7), (None, 0.05), (10, 0.9)])
def test_filters_match_transformers(top_k, top_p):
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    logits = torch.randn(8, 50) * 3
    ref = logits
    if top_k is not None:
        ref = TopKLogitsWarper(top_k)(None, ref)
    if top_p is not None:
        ref = TopPLogitsWarper(top_p)(None, ref)
    assert torch.equal(torch.isinf(filter_logits(logits, top_k, top_p)), torch.isinf(ref))


@pytest.mark.parametrize(
    "temperature,top_k,top_p",
    [(1.0, None, None), (1.0, 2, None), (0.7, None, None), (1.0, None, 0.8), (1.5, 4, 0.9)],
)
def test_sample_logits_follows_the_filtered_distribution(temperature, top_k, top_p):
    """Gumbel-max draws have the frequencies of softmax(filtered logits / T), zero outside the filter."""
    logits = torch.tensor([2.0, 1.2, 0.5, 0.0, -0.5, -1.5])
    draws = sample_logits(
        logits.expand(40000, 6), temperature, top_k, top_p, generator=torch.Generator().manual_seed(0)
    )
    freq = torch.bincount(draws, minlength=6).float() / len(draws)
    expected = F.softmax(filter_logits(logits / temperature, top_k, top_p), 0)
    assert torch.equal(freq == 0, expected == 0)
    torch.testing.assert_close(freq, expected, atol=0.01, rtol=0)


# ------------------------------------------------------------------------------------------------
# Registry and bad input
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["test-gpt", "test-gpt-modern"])
def test_registered_tiny_models_fulfil_the_protocol(name):
    model = generators.build(name)
    tokens = torch.randint(0, model.vocab_size, (2, *model.input_shape))
    loss = model.loss(tokens, torch.tensor([0, 1]))
    loss.backward()
    assert loss.item() > 0 and model.sample(torch.tensor([3])).shape == (1, *model.input_shape)
    assert model.sample(2).shape == (2, *model.input_shape)


def test_bad_input_is_explained():
    model = tiny("digit")
    ok = torch.randint(0, V, (2, GRID, GRID))
    with pytest.raises(ValueError, match=r"\[0, 40\)"):
        model.loss(ok + V, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"\[0, 40\)"):
        model.loss(ok - V, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="class ids must lie in"):
        model.loss(ok, torch.tensor([0, C]))
    with pytest.raises(ValueError, match="expected token grids"):
        model.loss(torch.randint(0, V, (2, GRID * GRID + 1)))
    with pytest.raises(ValueError, match="integer"):
        model.loss(ok.float())
    with pytest.raises(ValueError, match="longer than the model's 17 positions"):
        model.forward_ids(torch.zeros(1, 18, dtype=torch.long))
    with pytest.raises(ValueError, match="max_positions"):
        GPT(vocab_size=V, grid_size=GRID, max_positions=GRID * GRID)
    for top_p in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match=r"top_p must lie in \(0, 1\]"):
            model.sample(torch.tensor([0]), top_p=top_p)
    for top_k in (0, -3):
        with pytest.raises(ValueError, match="top_k must be an integer >= 1"):
            model.sample(torch.tensor([0]), top_k=top_k)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        model.sample(torch.tensor([0]), temperature=0)
    with pytest.raises(ValueError, match="compile must be a bool or a torch.compile backend"):
        model.sample(torch.tensor([0]), compile=1)
    with pytest.raises(ValueError, match=r"noise buffer \(2, 5\) must have the draws' shape \(2, 3\)"):
        sample_logits(torch.zeros(2, 8), top_k=3, noise=torch.empty(2, 5))
    with pytest.raises(ValueError, match="unconditional"):
        GPT(vocab_size=V, grid_size=GRID, dim=DIM, depth=1, num_heads=HEADS).loss(ok, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="unknown block style"):
        GPT(vocab_size=V, style="gpt2")
