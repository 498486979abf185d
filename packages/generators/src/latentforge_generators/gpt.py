"""GPT over token grids in raster order, with DiGIT's post-LN blocks or modern pre-norm ones.

DiGIT (arXiv 2410.12490) models K-Means tokens of DINOv2 features with a fairseq decoder: post-LN,
learned positions, embeddings scaled by √d, an untied head, a leading token that is ``</s>`` or the
class. The "modern" style swaps in RMSNorm, rotary positions and SwiGLU (Llama's block).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn as nn

from latentforge_core.checkpoint import load_into
from latentforge_core.errors import InputError, check_int, check_number
from latentforge_generators.samplers import check_sample_options
from latentforge_generators.token_sampling import (
    as_sequence,
    cfg_logits,
    cfg_logits_,
    check_sampling,
    sample_logits,
    smoothed_cross_entropy,
)
from latentforge_generators.token_transformer import (
    FAIRSEQ_EOS,
    FAIRSEQ_POS_OFFSET,
    FAIRSEQ_SPECIALS,
    ClassConditioned,
    KVCache,
    Transformer,
    build_or_load,
    check_fairseq_keys,
    check_grid,
    check_sizes,
    convert_fairseq_layers,
    fairseq_depth,
    fairseq_layer_map,
    fairseq_state,
    init_weights,
    table_row,
)

#################################################################################
#                                 The GPT model                                 #
#################################################################################


class GPT(ClassConditioned, nn.Module):
    """Autoregressive model over ``[B, h, w]`` token grids; the first input is the class or null token.

    Embedding rows: ``[0, V)`` tokens, ``[V, V + C)`` classes, ``V + C`` the null/start token
    (DiGIT's ``</s>``; the unconditional class for classifier-free guidance).
    """

    def __init__(
        self,
        *,
        vocab_size: int,
        grid_size: int | tuple[int, int] = 16,
        num_classes: int = 0,
        dim: int = 1024,
        depth: int = 16,
        num_heads: int = 16,
        ffn_dim: int | None = None,
        style: str = "digit",
        max_positions: int | None = None,
        dropout: float = 0.0,
        class_dropout: float = 0.0,
        label_smoothing: float = 0.0,
        norm_eps: float = 1e-5,
        rope_theta: float = 10000.0,
    ):
        super().__init__()
        check_int(vocab_size, "vocab_size", owner="GPT")
        check_int(num_classes, "num_classes", minimum=0, owner="GPT")
        check_number(class_dropout, "class_dropout", low=0, high=1, high_open=True, owner="GPT")
        check_sizes(
            "GPT", dim=dim, depth=depth, num_heads=num_heads, ffn_dim=ffn_dim, dropout=dropout,
            label_smoothing=label_smoothing, norm_eps=norm_eps,
        )  # fmt: skip
        self.grid = check_grid(grid_size, "grid_size", "GPT")
        self.seq_len = self.grid[0] * self.grid[1]
        max_positions = self.seq_len + 1 if max_positions is None else max_positions
        check_int(max_positions, "max_positions", owner="GPT")
        if max_positions < self.seq_len + 1:
            raise InputError(
                f"max_positions {max_positions} < 1 + {self.seq_len} tokens of a {self.grid} grid"
            )
        self.set_classes(num_classes, vocab_size, class_dropout)  # class rows follow the V tokens
        self.vocab_size, self.dim, self.style = vocab_size, dim, style
        self.label_smoothing = label_smoothing
        ffn_dim = ffn_dim or 4 * dim

        self.tok_embed = nn.Embedding(vocab_size + num_classes + 1, dim)
        learned = style != "modern"
        self.pos_embed = nn.Parameter(torch.zeros(max_positions, dim)) if learned else None
        self.embed_scale = math.sqrt(dim) if learned else 1.0  # fairseq scales token embeddings by √d
        self.drop = nn.Dropout(dropout)
        self.transformer = Transformer(
            dim, depth, num_heads, ffn_dim, style, max_positions, dropout, norm_eps, rope_theta
        )
        self.head = nn.Linear(dim, vocab_size, bias=False)
        self.compiled_decoding = None  # (key, compiled decode_step, its cache): see compiled_decoder
        self.initialize_weights()

    def initialize_weights(self):
        init_weights(self, self.style, self.dim)

    @property
    def input_shape(self) -> tuple[int, int]:
        return self.grid

    # ------------------------------------------------------------------ forward
    def embed(self, ids: torch.Tensor, start: int = 0) -> torch.Tensor:
        self.transformer.check_length(start + ids.shape[1])
        x = self.tok_embed(ids)  # B N D
        if self.embed_scale != 1.0:
            x = x * self.embed_scale
        if self.pos_embed is not None:
            x = x + self.pos_embed[start : start + ids.shape[1]]
        return self.drop(x)

    def forward_ids(self, ids: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """Embedding-table ids ``[B, N]`` (continuing ``cache`` if given) → logits ``[B, N, V]``."""
        x = self.embed(ids, 0 if cache is None else cache.length)
        return self.head(self.transformer(x, cache=cache))  # B N V

    def decode_step(self, ids: torch.Tensor, cache: KVCache, position: int | torch.Tensor) -> torch.Tensor:
        """Logits ``[R, V]`` of the token after ``ids [R, 1]`` at ``position`` (an int, or a 0-d
        tensor for static shapes), whose keys and values join ``cache``'s filled slots before it."""
        x = self.tok_embed(ids)  # R 1 D
        if self.embed_scale != 1.0:
            x = x * self.embed_scale
        if self.pos_embed is not None:
            x = x + table_row(self.pos_embed, position)
        return self.head(self.transformer.decode(x, cache, position))[:, 0]  # R V

    def forward(self, tokens: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Teacher forcing: logits ``[B, h*w, V]`` predicting each token from those before it."""
        tokens = as_sequence(tokens, self.grid, self.vocab_size)
        start = self.start_ids(y, tokens.shape[0], tokens.device)
        if y is not None and len(start) != len(tokens):
            raise InputError(f"{len(start)} class labels for {len(tokens)} token sequences")
        start = self.drop_classes(start, y)
        return self.forward_ids(torch.cat([start[:, None], tokens[:, :-1]], dim=1))

    def loss(self, tokens: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Mean per-token cross-entropy with label smoothing; in training, labels drop to null at
        ``class_dropout`` (for classifier-free guidance)."""
        logits = self(tokens, y)
        return smoothed_cross_entropy(
            logits, as_sequence(tokens, self.grid, self.vocab_size), self.label_smoothing
        )

    def features(self, tokens: torch.Tensor, layers: Sequence[int] = (-1,)) -> list[torch.Tensor]:
        """DiGIT's linear-probe features: outputs of ``layers`` mean-pooled over [null, t1..tN].

        Layer 0 is the embedding output, layer n the output of block n (negative counts from the end).
        """
        tokens = as_sequence(tokens, self.grid, self.vocab_size)
        ids = torch.cat([self.start_ids(None, tokens.shape[0], tokens.device)[:, None], tokens], dim=1)
        hidden: list[torch.Tensor] = []
        self.transformer(self.embed(ids), hidden=hidden)
        depth = len(self.transformer.blocks)
        for layer in layers:
            if not -depth - 1 <= layer <= depth:
                raise InputError(f"layer {layer} out of range for {depth} blocks (0 = embeddings)")
        return [hidden[layer].mean(dim=1) for layer in layers]  # each B D

    # ------------------------------------------------------------------ sampling
    def sample(
        self,
        y: torch.Tensor | int,
        *,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        cfg_scale: float = 1.0,
        use_cache: bool = True,
        compile: bool | str = False,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Token grids ``[B, h, w]`` for class labels ``y [B]`` (or ``y`` unconditional samples).

        With the cache (default) each step runs :meth:`decode_step` on the new token only, writes
        its keys and values in place and draws from the guided logits in place; ``use_cache=False``
        recomputes the whole prefix at every step (the reference: the same tokens for a seed).
        ``compile=True`` runs the step through ``torch.compile(mode="reduce-overhead")`` (CUDA
        graphs, for GPUs, where a small model's step is bound by kernel launches; off by default);
        a string names another ``torch.compile`` backend. The compiled step keeps its cache.
        """
        if not isinstance(compile, (bool, str)):
            raise InputError(f"compile must be a bool or a torch.compile backend name, got {compile!r}")
        check_sample_options(
            self,
            dict(cfg_scale=cfg_scale, use_cache=use_cache),  # check_sampling checks the rest
            owner="GPT.sample",
            from_config=False,
        )
        check_sampling(temperature, top_k, top_p)
        device = self.head.weight.device
        start = self.start_ids(y, device=device)
        batch = len(start)
        guided = cfg_scale != 1.0
        if guided:
            start = torch.cat([start, torch.full_like(start, self.null_id)])
        rows = len(start)
        with torch.inference_mode():
            seq = torch.cat([start[:, None], start.new_empty(rows, self.seq_len)], dim=1)
            if use_cache:
                self.decode(seq, batch, temperature, top_k, top_p, cfg_scale, compile, generator)
            else:  # the reference: the whole prefix again at every step
                for i in range(self.seq_len):
                    logits = self.forward_ids(seq[:, : i + 1])[:, -1]  # B V
                    if guided:
                        logits = cfg_logits(logits, cfg_scale)
                    nxt = sample_logits(logits, temperature, top_k, top_p, generator)  # B
                    seq[:, i + 1] = nxt.repeat(2) if guided else nxt
        return seq[:batch, 1:].clone().view(batch, *self.grid)  # clone: a normal tensor, not an inference one

    def decode(self, seq, batch, temperature, top_k, top_p, cfg_scale, compile, generator) -> None:
        """Fill ``seq [R, 1 + N]`` (start tokens in column 0; ``R = 2·batch`` with guidance) one
        cached step per token. Per step: one forward of all R rows, the guidance mix written over
        the conditional logits, uniform draws into one reused buffer, and the ids written into both
        guidance halves by one broadcast copy; no host sync."""
        rows, device = len(seq), seq.device
        if compile:
            step, cache = self.compiled_decoder(compile, rows)
            position = torch.zeros((), dtype=torch.long, device=device)
        else:
            step, cache = self.decode_step, self.transformer.new_cache(rows, self.seq_len, self.head.weight)
        tokens = seq.view(-1, batch, 1 + self.seq_len)  # guidance halves × B × (1 + N)
        noise = torch.empty(batch, min(top_k or self.vocab_size, self.vocab_size), device=device)
        for i in range(self.seq_len):
            logits = step(seq[:, i : i + 1], cache, position.fill_(i) if compile else i)  # R V
            if cfg_scale != 1.0:
                logits = cfg_logits_(logits.float(), cfg_scale)  # B V
            tokens[:, :, i + 1] = sample_logits(logits, temperature, top_k, top_p, generator, noise=noise)

    def compiled_decoder(self, compile: bool | str, rows: int):
        """``torch.compile``'d :meth:`decode_step` and its cache, built once per (backend, rows,
        device, dtype): a CUDA graph replays fixed buffers, so the cache stays (stale slots past the
        position are masked, and each is rewritten before it is read)."""
        like = self.head.weight
        key = (compile, rows, like.device, like.dtype)
        if self.compiled_decoding is None or self.compiled_decoding[0] != key:
            cache = self.transformer.new_cache(rows, self.seq_len, like)
            for buffer in (cache.k, cache.v):
                torch._dynamo.mark_static_address(buffer)
            options = dict(mode="reduce-overhead") if compile is True else dict(backend=compile)
            self.compiled_decoding = (key, torch.compile(self.decode_step, fullgraph=True, **options), cache)
        return self.compiled_decoding[1:]


#################################################################################
#                       DiGIT stage-1 (fairseq) checkpoints                     #
#################################################################################


def convert_digit_stage1(state, num_heads: int = 16) -> tuple[dict[str, torch.Tensor], dict]:
    """DiGIT's stage-1 (``stlm``) weights → (our GPT state dict, GPT kwargs).

    Special-symbol rows other than ``</s>`` (the start token) are dropped: sampling masks them,
    and a fixed-length grid never emits ``</s>``. The K-Means centroids and DINOv2 weights stored
    beside the decoder belong to the tokenizer and are skipped.
    """
    sd = fairseq_state(state)
    depth = fairseq_depth(sd)
    expected = {
        "decoder.embed_tokens.weight",
        "decoder.embed_positions.weight",
        "decoder.output_projection.weight",
    }
    expected |= {k for keys in fairseq_layer_map(depth).values() for k in keys}
    check_fairseq_keys(sd, expected, "DiGIT stage-1")
    emb, head = sd["decoder.embed_tokens.weight"], sd["decoder.output_projection.weight"]
    vocab = head.shape[0] - FAIRSEQ_SPECIALS
    num_classes = emb.shape[0] - head.shape[0]
    dim = emb.shape[1]
    ours = convert_fairseq_layers(sd, depth)
    ours["tok_embed.weight"] = torch.cat([emb[FAIRSEQ_SPECIALS:], emb[FAIRSEQ_EOS : FAIRSEQ_EOS + 1]])
    ours["pos_embed"] = sd["decoder.embed_positions.weight"][FAIRSEQ_POS_OFFSET:]
    ours["head.weight"] = head[FAIRSEQ_SPECIALS:]
    config = dict(
        vocab_size=vocab,
        num_classes=num_classes,
        dim=dim,
        depth=depth,
        num_heads=num_heads,
        ffn_dim=sd["decoder.layers.0.fc1.weight"].shape[0],
        style="digit",
        max_positions=ours["pos_embed"].shape[0],
    )
    return ours, config


def load_digit_stage1(state, num_heads: int = 16, **overrides) -> GPT:
    """A GPT carrying DiGIT stage-1 weights (path or state dict), loaded strictly."""
    sd, config = convert_digit_stage1(state, num_heads)
    model = GPT(**{**config, **overrides})
    load_into(model, sd, strict=True)
    return model


def load_llama(state: Mapping[str, torch.Tensor], vocab_size: int, **kwargs) -> GPT:
    """A modern-style GPT from a transformers ``LlamaForCausalLM`` state dict (no GQA, untied head)."""
    depth = fairseq_depth(state, "model.")
    ours = {
        "tok_embed.weight": state["model.embed_tokens.weight"],
        "head.weight": state["lm_head.weight"][:vocab_size],
        "transformer.norm.weight": state["model.norm.weight"],
    }
    for i in range(depth):
        a, b = f"transformer.blocks.{i}.", f"model.layers.{i}."
        ours[a + "attn.qkv.weight"] = torch.cat([state[b + f"self_attn.{x}_proj.weight"] for x in "qkv"])
        ours[a + "attn.proj.weight"] = state[b + "self_attn.o_proj.weight"]
        ours[a + "mlp.w12.weight"] = torch.cat(  # the kit's SwiGLU: gate rows, then up rows
            [state[b + "mlp.gate_proj.weight"], state[b + "mlp.up_proj.weight"]]
        )
        ours[a + "mlp.w3.weight"] = state[b + "mlp.down_proj.weight"]
        ours[a + "norm1.weight"] = state[b + "input_layernorm.weight"]
        ours[a + "norm2.weight"] = state[b + "post_attention_layernorm.weight"]
    num_classes = ours["tok_embed.weight"].shape[0] - vocab_size - 1
    model = GPT(
        vocab_size=vocab_size,
        num_classes=num_classes,
        style="modern",
        depth=depth,
        dim=ours["tok_embed.weight"].shape[1],
        ffn_dim=state["model.layers.0.mlp.up_proj.weight"].shape[0],
        **kwargs,
    )
    load_into(model, ours, strict=True)
    return model


#################################################################################
#                                   GPT configs                                 #
#################################################################################


def _build(defaults: dict, pretrained=None, **kwargs) -> GPT:
    return build_or_load(GPT, load_digit_stage1, defaults, pretrained, load_defaults=("num_heads",), **kwargs)


# Registry name -> the GPT keyword arguments of that model; one builder per row below.
SIZES: dict[str, dict] = {
    # DiGIT base: 16 x 1024, 219M with the 8k vocabulary (8192 + 5 specials in fairseq).
    "gpt-digit-base": dict(
        vocab_size=8192,
        num_classes=1000,
        dim=1024,
        depth=16,
        num_heads=16,
        style="digit",
        max_positions=1024,
        dropout=0.1,
        label_smoothing=0.1,
    ),
    # DiGIT large: 24 x 1536 over 16k tokens (732M); the head count is not published (16 assumed).
    "gpt-digit-large": dict(
        vocab_size=16384,
        num_classes=1000,
        dim=1536,
        depth=24,
        num_heads=16,
        style="digit",
        max_positions=1024,
        dropout=0.1,
        label_smoothing=0.1,
    ),
    # The same budget as DiGIT base with Llama blocks (SwiGLU hidden ≈ 8/3·d rounded to 256).
    "gpt-modern-base": dict(
        vocab_size=8192,
        num_classes=1000,
        dim=1024,
        depth=16,
        num_heads=16,
        ffn_dim=2816,
        style="modern",
        class_dropout=0.1,
    ),
    "test-gpt": dict(vocab_size=64, grid_size=4, num_classes=10, dim=64, depth=2, num_heads=4, style="digit"),
    "test-gpt-modern": dict(
        vocab_size=64,
        grid_size=4,
        num_classes=10,
        dim=64,
        depth=2,
        num_heads=4,
        ffn_dim=128,
        style="modern",
        class_dropout=0.1,
    ),
}


def gpt_digit_base(pretrained=None, **kw) -> GPT:
    return _build(SIZES["gpt-digit-base"], pretrained, **kw)


def gpt_digit_large(pretrained=None, **kw) -> GPT:
    return _build(SIZES["gpt-digit-large"], pretrained, **kw)


def gpt_modern_base(**kw) -> GPT:
    return GPT(**{**SIZES["gpt-modern-base"], **kw})


def tiny_gpt(**kw) -> GPT:
    return GPT(**{**SIZES["test-gpt"], **kw})


def tiny_gpt_modern(**kw) -> GPT:
    return GPT(**{**SIZES["test-gpt-modern"], **kw})
