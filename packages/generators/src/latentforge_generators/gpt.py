"""GPT over token grids in raster order, with DiGIT's post-LN blocks or modern pre-norm ones.

DiGIT (arXiv 2410.12490) models K-Means tokens of DINOv2 features with a fairseq decoder: post-LN,
learned positions, embeddings scaled by √d, an untied head, a leading token that is ``</s>`` or the
class. The "modern" style swaps in RMSNorm, rotary positions and SwiGLU (Llama's block). The
transformer stack here (``Transformer``, ``KVCache``) is shared with MaskGIT and DiGIT's stage 2.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from functools import partial

import torch
import torch.nn as nn
from einops import rearrange

from latentforge_core.attention import attention
from latentforge_core.checkpoint import CheckpointError, load_into, load_state_file
from latentforge_generators.token_sampling import (
    as_sequence,
    cfg_logits,
    check_class_ids,
    check_sampling,
    sample_logits,
    smoothed_cross_entropy,
)

STYLES = ("digit", "prenorm", "modern")  # post-LN fairseq | pre-LN fairseq | RMSNorm+RoPE+SwiGLU

#################################################################################
#                    Rotary positions and the key/value cache                   #
#################################################################################


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class RotaryEmbedding(nn.Module):
    """cos/sin tables in the half-split layout that Llama's q/k weights in transformers use."""

    def __init__(self, head_dim: int, max_positions: int, theta: float = 10000.0):
        super().__init__()
        inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        angles = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq)
        angles = torch.cat((angles, angles), dim=-1)  # P Dh
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, x: torch.Tensor, start: int) -> torch.Tensor:
        n = x.shape[-2]
        cos, sin = self.cos[start : start + n].to(x.dtype), self.sin[start : start + n].to(x.dtype)
        return x * cos + rotate_half(x) * sin  # B H N Dh


class KVCache:
    """Keys and values of every layer, preallocated and filled left to right while decoding."""

    def __init__(self, depth, batch, heads, head_dim, max_len, device=None, dtype=torch.float32):
        shape = (depth, batch, heads, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.length = 0  # positions already written by every layer

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, start: int):
        end = start + k.shape[2]
        self.k[layer, :, :, start:end] = k
        self.v[layer, :, :, start:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]  # B H end Dh


#################################################################################
#                        Attention, feed-forward, blocks                        #
#################################################################################


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, bias: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} must be divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=bias)
        self.proj = nn.Linear(dim, dim, bias=bias)

    def forward(self, x, *, rope=None, start=0, cache=None, layer=0, causal=True):
        q, k, v = rearrange(self.qkv(x), "b n (three h d) -> three b h n d", three=3, h=self.num_heads)
        if rope is not None:
            q, k = rope(q, start), rope(k, start)
        if cache is not None:
            k, v = cache.update(layer, k, v, start)  # B H start+N Dh
        out = attention(q, k, v, is_causal=causal and q.shape[2] > 1)  # B H N Dh
        return self.proj(rearrange(out, "b h n d -> b n (h d)"))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class SwiGLU(nn.Module):
    """silu(gate) · up → down; ``fc1`` holds [gate; up] fused."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, 2 * hidden, bias=False)
        self.fc2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        gate, up = self.fc1(x).chunk(2, dim=-1)
        return self.fc2(nn.functional.silu(gate) * up)


class Block(nn.Module):
    """One transformer layer; ``style`` picks post-LN (DiGIT stage 1), pre-LN, or modern."""

    def __init__(self, dim, num_heads, ffn_dim, style="digit", dropout=0.0, norm_eps=1e-5):
        super().__init__()
        modern = style == "modern"
        norm = partial(nn.RMSNorm if modern else nn.LayerNorm, dim, eps=norm_eps)
        self.post_norm = style == "digit"
        self.norm1 = norm()
        self.attn = Attention(dim, num_heads, bias=not modern)
        self.norm2 = norm()
        self.mlp = SwiGLU(dim, ffn_dim) if modern else Mlp(dim, ffn_dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x, **attn_kw):
        if self.post_norm:
            x = self.norm1(x + self.drop(self.attn(x, **attn_kw)))
            return self.norm2(x + self.drop(self.mlp(x)))
        x = x + self.drop(self.attn(self.norm1(x), **attn_kw))
        return x + self.drop(self.mlp(self.norm2(x)))


class Transformer(nn.Module):
    """The block stack, a final norm for pre-norm styles, and rotary tables for the modern one."""

    def __init__(self, dim, depth, num_heads, ffn_dim, style, max_positions, dropout=0.0, norm_eps=1e-5,
                 rope_theta=10000.0):
        super().__init__()
        if style not in STYLES:
            raise ValueError(f"unknown block style {style!r}; expected one of {STYLES}")
        self.style, self.num_heads, self.max_positions = style, num_heads, max_positions
        self.blocks = nn.ModuleList(Block(dim, num_heads, ffn_dim, style, dropout, norm_eps) for _ in range(depth))
        if style == "digit":
            self.norm = nn.Identity()  # post-LN: every block already ends in a LayerNorm
        else:
            self.norm = (nn.RMSNorm if style == "modern" else nn.LayerNorm)(dim, eps=norm_eps)
        self.rope = RotaryEmbedding(dim // num_heads, max_positions, rope_theta) if style == "modern" else None

    def new_cache(self, batch: int, max_len: int, like: torch.Tensor) -> KVCache:
        dim = self.blocks[0].attn.proj.in_features
        return KVCache(len(self.blocks), batch, self.num_heads, dim // self.num_heads, max_len,
                       device=like.device, dtype=like.dtype)

    def check_length(self, end: int) -> None:
        if end > self.max_positions:
            raise ValueError(f"sequence of {end} positions is longer than the model's {self.max_positions} positions")

    def forward(self, x, *, cache: KVCache | None = None, causal: bool = True, hidden: list | None = None):
        """``x [B, N, D]`` → ``[B, N, D]``; appends each block's input and the last output to ``hidden``."""
        start = 0 if cache is None else cache.length
        self.check_length(start + x.shape[1])
        for i, block in enumerate(self.blocks):
            if hidden is not None:
                hidden.append(x)
            x = block(x, rope=self.rope, start=start, cache=cache, layer=i, causal=causal)
        if hidden is not None:
            hidden.append(x)
        if cache is not None:
            cache.length = start + x.shape[1]
        return self.norm(x)


def init_weights(module: nn.Module, style: str, dim: int) -> None:
    """fairseq's init for the DiGIT styles (xavier linears, N(0, d^-½) tables); 0.02-normal for modern.

    xavier-uniform over the fused [q; k; v] matrix gives the bound fairseq draws each of q, k, v
    with (gain 1/√2 on a d×d matrix), so the fused layout keeps fairseq's init exactly.
    """
    for m in module.modules():
        if isinstance(m, nn.Linear):
            if style == "modern":
                nn.init.normal_(m.weight, std=0.02)
            else:
                nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=0.02 if style == "modern" else dim**-0.5)
    for name, p in module.named_parameters():
        if name.startswith("pos_"):
            nn.init.normal_(p, std=dim**-0.5)


#################################################################################
#                                 The GPT model                                 #
#################################################################################


class GPT(nn.Module):
    """Autoregressive model over ``[B, h, w]`` token grids; the first input is the class or null token.

    Embedding rows: ``[0, V)`` tokens, ``[V, V + C)`` classes, ``V + C`` the null/start token
    (DiGIT's ``</s>``; the unconditional class for classifier-free guidance).
    """

    def __init__(self, *, vocab_size: int, grid_size: int | tuple[int, int] = 16, num_classes: int = 0,
                 dim: int = 1024, depth: int = 16, num_heads: int = 16, ffn_dim: int | None = None,
                 style: str = "digit", max_positions: int | None = None, dropout: float = 0.0,
                 class_dropout: float = 0.0, label_smoothing: float = 0.0, norm_eps: float = 1e-5,
                 rope_theta: float = 10000.0):
        super().__init__()
        self.grid = (grid_size, grid_size) if isinstance(grid_size, int) else tuple(grid_size)
        self.seq_len = self.grid[0] * self.grid[1]
        max_positions = self.seq_len + 1 if max_positions is None else max_positions
        if max_positions < self.seq_len + 1:
            raise ValueError(f"max_positions {max_positions} < 1 + {self.seq_len} tokens of a {self.grid} grid")
        if not 0 <= class_dropout < 1:
            raise ValueError(f"class_dropout must lie in [0, 1), got {class_dropout}")
        self.vocab_size, self.num_classes, self.dim, self.style = vocab_size, num_classes, dim, style
        self.class_dropout, self.label_smoothing = class_dropout, label_smoothing
        self.config = dict(vocab_size=vocab_size, grid_size=list(self.grid), num_classes=num_classes, dim=dim,
                           depth=depth, num_heads=num_heads, ffn_dim=ffn_dim, style=style,
                           max_positions=max_positions, dropout=dropout, class_dropout=class_dropout,
                           label_smoothing=label_smoothing, norm_eps=norm_eps, rope_theta=rope_theta)
        ffn_dim = ffn_dim or 4 * dim

        self.tok_embed = nn.Embedding(vocab_size + num_classes + 1, dim)
        learned = style != "modern"
        self.pos_embed = nn.Parameter(torch.zeros(max_positions, dim)) if learned else None
        self.embed_scale = math.sqrt(dim) if learned else 1.0  # fairseq scales token embeddings by √d
        self.drop = nn.Dropout(dropout)
        self.transformer = Transformer(dim, depth, num_heads, ffn_dim, style, max_positions, dropout, norm_eps,
                                       rope_theta)
        self.head = nn.Linear(dim, vocab_size, bias=False)
        self.initialize_weights()

    def initialize_weights(self):
        init_weights(self, self.style, self.dim)

    @property
    def input_shape(self) -> tuple[int, int]:
        return self.grid

    @property
    def null_id(self) -> int:
        return self.vocab_size + self.num_classes

    # ------------------------------------------------------------------ forward
    def embed(self, ids: torch.Tensor, start: int = 0) -> torch.Tensor:
        self.transformer.check_length(start + ids.shape[1])
        x = self.tok_embed(ids) * self.embed_scale  # B N D
        if self.pos_embed is not None:
            x = x + self.pos_embed[start : start + ids.shape[1]]
        return self.drop(x)

    def forward_ids(self, ids: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """Embedding-table ids ``[B, N]`` (continuing ``cache`` if given) → logits ``[B, N, V]``."""
        x = self.embed(ids, 0 if cache is None else cache.length)
        return self.head(self.transformer(x, cache=cache))  # B N V

    def start_ids(self, y: torch.Tensor | int | None, batch: int | None = None, device=None) -> torch.Tensor:
        """The first input of each sequence: class ``y`` (or the null token for ``y=None``/a count)."""
        if isinstance(y, torch.Tensor):
            check_class_ids(y, self.num_classes)
            return y.long().to(device) + self.vocab_size
        n = y if isinstance(y, int) else batch
        if n is None or n < 1:
            raise ValueError(f"pass class labels [B] or a positive sample count, got {y!r}")
        return torch.full((n,), self.null_id, dtype=torch.long, device=device)

    def forward(self, tokens: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Teacher forcing: logits ``[B, h*w, V]`` predicting each token from those before it."""
        tokens = as_sequence(tokens, self.grid, self.vocab_size)
        start = self.start_ids(y, tokens.shape[0], tokens.device)
        if y is not None and len(start) != len(tokens):
            raise ValueError(f"{len(start)} class labels for {len(tokens)} token sequences")
        if y is not None and self.training and self.class_dropout > 0:
            drop = torch.rand(start.shape, device=start.device) < self.class_dropout
            start = start.masked_fill(drop, self.null_id)
        return self.forward_ids(torch.cat([start[:, None], tokens[:, :-1]], dim=1))

    def loss(self, tokens: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Mean per-token cross-entropy with label smoothing; in training, labels drop to null at
        ``class_dropout`` (for classifier-free guidance)."""
        logits = self(tokens, y)
        return smoothed_cross_entropy(logits, as_sequence(tokens, self.grid, self.vocab_size), self.label_smoothing)

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
                raise ValueError(f"layer {layer} out of range for {depth} blocks (0 = embeddings)")
        return [hidden[layer].mean(dim=1) for layer in layers]  # each B D

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def sample(self, y: torch.Tensor | int, *, temperature: float = 1.0, top_k: int | None = None,
               top_p: float | None = None, cfg_scale: float = 1.0, use_cache: bool = True,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """Token grids ``[B, h, w]`` for class labels ``y [B]`` (or ``y`` unconditional samples)."""
        check_sampling(temperature, top_k, top_p)
        device = self.head.weight.device
        start = self.start_ids(y, device=device)
        batch = len(start)
        guided = cfg_scale != 1.0
        if guided:
            start = torch.cat([start, torch.full_like(start, self.null_id)])
        tokens = start.new_empty(len(start), 0)
        cache = self.transformer.new_cache(len(start), self.seq_len, self.head.weight) if use_cache else None
        inputs = start[:, None]
        for _ in range(self.seq_len):
            if cache is None:
                inputs = torch.cat([start[:, None], tokens], dim=1)
            logits = self.forward_ids(inputs, cache)[:, -1]  # B V
            if guided:
                logits = cfg_logits(logits, cfg_scale)
            nxt = sample_logits(logits, temperature, top_k, top_p, generator)  # B
            if guided:
                nxt = nxt.repeat(2)
            tokens = torch.cat([tokens, nxt[:, None]], dim=1)
            inputs = nxt[:, None]
        return tokens[:batch].view(batch, *self.grid)


#################################################################################
#                       DiGIT stage-1 (fairseq) checkpoints                     #
#################################################################################

FAIRSEQ_SPECIALS = 5  # <s> <pad> </s> <unk> <n>
FAIRSEQ_EOS = 2
FAIRSEQ_POS_OFFSET = 2  # learned positions start at padding_idx + 1
TOKENIZER_PREFIXES = ("centroids", "centroid_norm", "pretrained_encoder.", "vqgan.")  # belong to tokenizers


def fairseq_state(state: Mapping[str, torch.Tensor] | str) -> dict[str, torch.Tensor]:
    """A fairseq model state dict from a path or mapping; a full training checkpoint is unwrapped."""
    if not isinstance(state, Mapping):
        try:
            state = load_state_file(state)
        except CheckpointError as err:
            raise CheckpointError(
                f"{err}. fairseq training checkpoints pickle their hydra config; extract the weights once "
                "in a trusted environment: torch.save(torch.load(p, weights_only=False)['model'], out)"
            ) from err
    return dict(state.get("model", state))


def fairseq_layer_map(depth: int, prefix: str = "decoder.") -> dict[str, tuple[str, ...]]:
    """Our block key → the fairseq decoder key(s) it is made of (q/k/v are fused)."""
    mapping = {}
    for i in range(depth):
        ours, theirs = f"transformer.blocks.{i}.", f"{prefix}layers.{i}."
        for p in ("weight", "bias"):
            mapping[ours + f"attn.qkv.{p}"] = tuple(theirs + f"self_attn.{x}_proj.{p}" for x in "qkv")
            for a, b in (("attn.proj", "self_attn.out_proj"), ("norm1", "self_attn_layer_norm"),
                         ("mlp.fc1", "fc1"), ("mlp.fc2", "fc2"), ("norm2", "final_layer_norm")):
                mapping[ours + f"{a}.{p}"] = (theirs + f"{b}.{p}",)
    return mapping


def convert_fairseq_layers(sd: Mapping[str, torch.Tensor], depth: int, prefix: str = "decoder.") -> dict:
    return {ours: torch.cat([sd[k] for k in keys]) for ours, keys in fairseq_layer_map(depth, prefix).items()}


def check_fairseq_keys(sd: Mapping[str, torch.Tensor], expected: set[str], what: str) -> None:
    given = {k for k in sd if not k.startswith(TOKENIZER_PREFIXES) and not k.endswith(".version")}
    missing, unexpected = sorted(expected - given), sorted(given - expected)
    if missing or unexpected:
        raise CheckpointError(
            f"not a {what} state dict: missing {missing[:8]}{' …' if len(missing) > 8 else ''}, "
            f"unexpected {unexpected[:8]}{' …' if len(unexpected) > 8 else ''}"
        )


def fairseq_depth(sd: Mapping[str, torch.Tensor], prefix: str = "decoder.") -> int:
    layers = {int(k[len(prefix) + 7 :].split(".")[0]) for k in sd if k.startswith(prefix + "layers.")}
    if not layers:
        raise CheckpointError(f"no '{prefix}layers.N.*' keys: not a fairseq decoder state dict")
    return max(layers) + 1


def convert_digit_stage1(state, num_heads: int = 16) -> tuple[dict[str, torch.Tensor], dict]:
    """DiGIT's stage-1 (``stlm``) weights → (our GPT state dict, GPT kwargs).

    Special-symbol rows other than ``</s>`` (the start token) are dropped: sampling masks them,
    and a fixed-length grid never emits ``</s>``. The K-Means centroids and DINOv2 weights stored
    beside the decoder belong to the tokenizer and are skipped.
    """
    sd = fairseq_state(state)
    depth = fairseq_depth(sd)
    expected = {"decoder.embed_tokens.weight", "decoder.embed_positions.weight", "decoder.output_projection.weight"}
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
    config = dict(vocab_size=vocab, num_classes=num_classes, dim=dim, depth=depth, num_heads=num_heads,
                  ffn_dim=sd["decoder.layers.0.fc1.weight"].shape[0], style="digit",
                  max_positions=ours["pos_embed"].shape[0])
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
    ours = {"tok_embed.weight": state["model.embed_tokens.weight"],
            "head.weight": state["lm_head.weight"][:vocab_size],
            "transformer.norm.weight": state["model.norm.weight"]}
    for i in range(depth):
        a, b = f"transformer.blocks.{i}.", f"model.layers.{i}."
        ours[a + "attn.qkv.weight"] = torch.cat([state[b + f"self_attn.{x}_proj.weight"] for x in "qkv"])
        ours[a + "attn.proj.weight"] = state[b + "self_attn.o_proj.weight"]
        ours[a + "mlp.fc1.weight"] = torch.cat([state[b + "mlp.gate_proj.weight"], state[b + "mlp.up_proj.weight"]])
        ours[a + "mlp.fc2.weight"] = state[b + "mlp.down_proj.weight"]
        ours[a + "norm1.weight"] = state[b + "input_layernorm.weight"]
        ours[a + "norm2.weight"] = state[b + "post_attention_layernorm.weight"]
    num_classes = ours["tok_embed.weight"].shape[0] - vocab_size - 1
    model = GPT(vocab_size=vocab_size, num_classes=num_classes, style="modern", depth=depth,
                dim=ours["tok_embed.weight"].shape[1], ffn_dim=state["model.layers.0.mlp.up_proj.weight"].shape[0],
                **kwargs)
    load_into(model, ours, strict=True)
    return model


#################################################################################
#                                   GPT configs                                 #
#################################################################################


def _build(defaults: dict, pretrained=None, **kwargs) -> GPT:
    if pretrained is not None:
        return load_digit_stage1(pretrained, kwargs.pop("num_heads", defaults["num_heads"]), **kwargs)
    return GPT(**{**defaults, **kwargs})


GPT_configs = {
    # DiGIT base: 16 x 1024, 219M with the 8k vocabulary (8192 + 5 specials in fairseq).
    "gpt-digit-base": dict(vocab_size=8192, num_classes=1000, dim=1024, depth=16, num_heads=16, style="digit",
                           max_positions=1024, dropout=0.1, label_smoothing=0.1),
    # DiGIT large: 24 x 1536 over 16k tokens (732M); the head count is not published (16 assumed).
    "gpt-digit-large": dict(vocab_size=16384, num_classes=1000, dim=1536, depth=24, num_heads=16, style="digit",
                            max_positions=1024, dropout=0.1, label_smoothing=0.1),
    # The same budget as DiGIT base with Llama blocks (SwiGLU hidden ≈ 8/3·d rounded to 256).
    "gpt-modern-base": dict(vocab_size=8192, num_classes=1000, dim=1024, depth=16, num_heads=16, ffn_dim=2816,
                            style="modern", class_dropout=0.1),
    "test-gpt": dict(vocab_size=64, grid_size=4, num_classes=10, dim=64, depth=2, num_heads=4, style="digit"),
    "test-gpt-modern": dict(vocab_size=64, grid_size=4, num_classes=10, dim=64, depth=2, num_heads=4,
                            ffn_dim=128, style="modern", class_dropout=0.1),
}


def gpt_digit_base(pretrained=None, **kw) -> GPT:
    return _build(GPT_configs["gpt-digit-base"], pretrained, **kw)


def gpt_digit_large(pretrained=None, **kw) -> GPT:
    return _build(GPT_configs["gpt-digit-large"], pretrained, **kw)


def gpt_modern_base(**kw) -> GPT:
    return GPT(**{**GPT_configs["gpt-modern-base"], **kw})


def tiny_gpt(**kw) -> GPT:
    return GPT(**{**GPT_configs["test-gpt"], **kw})


def tiny_gpt_modern(**kw) -> GPT:
    return GPT(**{**GPT_configs["test-gpt-modern"], **kw})
