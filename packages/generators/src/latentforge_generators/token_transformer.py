"""The transformer stack shared by GPT, MaskGIT and DiGIT's stage 2, and fairseq key mapping.

Three block styles: DiGIT's stage-1 fairseq decoder layer (post-LN, LayerNorm, GELU, biases), the
pre-LN fairseq layer of DiGIT's stage 2, and a modern Llama-like one (RMSNorm, rotary positions,
SwiGLU, no biases). Decoding continues a preallocated ``KVCache``.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial

import torch
import torch.nn as nn
from einops import rearrange

from latentforge_core.attention import attention
from latentforge_core.checkpoint import CheckpointError, load_state_file

STYLES = ("digit", "prenorm", "modern")  # post-LN fairseq | pre-LN fairseq | RMSNorm+RoPE+SwiGLU

#################################################################################
#                    Rotary positions and the key/value cache                   #
#################################################################################


class RotaryEmbedding(nn.Module):
    """cos/sin tables in the half-split layout that Llama's q/k weights in transformers use.

    Rotating ``[x1, x2]`` gives ``x·cos + [-x2, x1]·sin = x·cos + roll(x, d/2)·[-sin, sin]``: the
    sign lives in the table, so a rotation is a roll and two multiplies (q and k in one pass).
    """

    def __init__(self, head_dim: int, max_positions: int, theta: float = 10000.0):
        super().__init__()
        inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        angles = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq)  # P Dh/2
        self.register_buffer("cos", torch.cat((angles, angles), dim=-1).cos(), persistent=False)
        self.register_buffer("sin", torch.cat((-angles.sin(), angles.sin()), dim=-1), persistent=False)

    def forward(self, x: torch.Tensor, start: int) -> torch.Tensor:
        """``x [..., N, Dh]`` at positions ``start .. start + N``."""
        n, half = x.shape[-2], x.shape[-1] // 2
        cos, sin = self.cos[start : start + n].to(x.dtype), self.sin[start : start + n].to(x.dtype)
        return torch.addcmul(x * cos, x.roll(half, dims=-1), sin)  # ... N Dh


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
        if end > self.max_len:
            raise ValueError(f"the KV cache holds {self.max_len} positions; writing up to {end}")
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
        qkv = rearrange(self.qkv(x), "b n (three h d) -> three b h n d", three=3, h=self.num_heads)
        q, k, v = (*rope(qkv[:2], start), qkv[2]) if rope is not None else qkv  # q, k rotated at once
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

    def __init__(
        self,
        dim,
        depth,
        num_heads,
        ffn_dim,
        style,
        max_positions,
        dropout=0.0,
        norm_eps=1e-5,
        rope_theta=10000.0,
    ):
        super().__init__()
        if style not in STYLES:
            raise ValueError(f"unknown block style {style!r}; expected one of {STYLES}")
        self.style, self.num_heads, self.max_positions = style, num_heads, max_positions
        self.blocks = nn.ModuleList(
            Block(dim, num_heads, ffn_dim, style, dropout, norm_eps) for _ in range(depth)
        )
        if style == "digit":
            self.norm = nn.Identity()  # post-LN: every block already ends in a LayerNorm
        else:
            self.norm = (nn.RMSNorm if style == "modern" else nn.LayerNorm)(dim, eps=norm_eps)
        self.rope = (
            RotaryEmbedding(dim // num_heads, max_positions, rope_theta) if style == "modern" else None
        )

    def new_cache(self, batch: int, max_len: int, like: torch.Tensor) -> KVCache:
        dim = self.blocks[0].attn.proj.in_features
        return KVCache(
            len(self.blocks),
            batch,
            self.num_heads,
            dim // self.num_heads,
            max_len,
            device=like.device,
            dtype=like.dtype,
        )

    def check_length(self, end: int) -> None:
        if end > self.max_positions:
            raise ValueError(
                f"sequence of {end} positions is longer than the model's {self.max_positions} positions"
            )

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
    """fairseq's init for the DiGIT styles, 0.02-normal linears and tables for the modern one.

    fairseq draws q, k, v xavier-uniform with gain 1/√2 (d×d each): the same bound as plain
    xavier over our fused [q; k; v] matrix. The output projection of attention is xavier with a
    zero bias, the feed-forward keeps PyTorch's Linear init, and token/position tables and the
    vocabulary head are N(0, d^-½).
    """
    modern = style == "modern"
    table_std = 0.02 if modern else dim**-0.5
    for m in module.modules():
        if modern and isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.02)
        elif not modern and isinstance(m, Attention):
            nn.init.xavier_uniform_(m.qkv.weight)
            nn.init.xavier_uniform_(m.proj.weight)
            nn.init.zeros_(m.proj.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=table_std)
    for name, p in module.named_parameters():
        if name.startswith("pos_") or name == "head.weight":
            nn.init.normal_(p, std=table_std)


#################################################################################
#                        fairseq decoder checkpoints (DiGIT)                    #
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
                f"{err}. fairseq training checkpoints pickle their hydra config; in a trusted environment, "
                "unpickle the file once and torch.save its ['model'] entry, then load that file"
            ) from err
    return dict(state.get("model", state))


def fairseq_layer_map(depth: int, prefix: str = "decoder.") -> dict[str, tuple[str, ...]]:
    """Our block key → the fairseq decoder key(s) it is made of (q/k/v are fused)."""
    mapping = {}
    for i in range(depth):
        ours, theirs = f"transformer.blocks.{i}.", f"{prefix}layers.{i}."
        for p in ("weight", "bias"):
            mapping[ours + f"attn.qkv.{p}"] = tuple(theirs + f"self_attn.{x}_proj.{p}" for x in "qkv")
            for a, b in (
                ("attn.proj", "self_attn.out_proj"),
                ("norm1", "self_attn_layer_norm"),
                ("mlp.fc1", "fc1"),
                ("mlp.fc2", "fc2"),
                ("norm2", "final_layer_norm"),
            ):
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
