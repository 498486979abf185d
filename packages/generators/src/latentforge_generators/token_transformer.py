"""The transformer stack shared by GPT, MaskGIT and DiGIT's stage 2, what those models share around
it (start token, class dropout, named sizes), and fairseq key mapping.

Three block styles: DiGIT's stage-1 fairseq decoder layer (post-LN, LayerNorm, GELU, biases), the
pre-LN fairseq layer of DiGIT's stage 2, and a modern Llama-like one (RMSNorm, rotary positions,
SwiGLU, no biases). Decoding continues a preallocated ``KVCache``, one position per step through
``Transformer.decode`` (in-place cache writes; static shapes when the position is a tensor).
Attention, feed-forwards, RMSNorm, rotary positions and the cache are core's transformer kit
(``latentforge_core.transformer``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from latentforge_core.checkpoint import CheckpointError, load_state_file
from latentforge_core.errors import (
    InputError,
    check_divisible,
    check_int,
    check_ints,
    check_number,
)
from latentforge_core.transformer import Attention, KVCache, Mlp, RMSNorm, RotaryEmbedding, SwiGLU
from latentforge_generators.token_sampling import check_class_ids

STYLES = ("digit", "prenorm", "modern")  # post-LN fairseq | pre-LN fairseq | RMSNorm+RoPE+SwiGLU


#################################################################################
#                                     Blocks                                    #
#################################################################################


def check_grid(grid: object, name: str, owner: str) -> tuple[int, int]:
    """A token grid: an int ``n`` (``n × n``) or a pair ``(h, w)`` of positive ints."""
    if isinstance(grid, (tuple, list)) and len(grid) == 2:
        return (check_int(grid[0], f"{name}[0]", owner=owner), check_int(grid[1], f"{name}[1]", owner=owner))
    if isinstance(grid, (tuple, list)):
        raise InputError(f"{owner}: {name} must be an int n (an n × n grid) or a pair (h, w), got {grid!r}")
    n = check_int(grid, name, owner=owner)
    return (n, n)


def check_sizes(
    owner: str,
    *,
    dim: object,
    depth: object,
    num_heads: object,
    ffn_dim: object,
    dropout: object,
    label_smoothing: object,
    norm_eps: object,
) -> None:
    """The arguments every token transformer (GPT, MaskGIT, DiGIT's stage 2) shares (``style`` is
    checked by :class:`Transformer`)."""
    check_ints(owner, dim=dim, depth=depth, num_heads=num_heads)
    if ffn_dim is not None:
        check_int(ffn_dim, "ffn_dim", owner=owner)
    check_number(dropout, "dropout", low=0, high=1, high_open=True, owner=owner)
    check_number(label_smoothing, "label_smoothing", low=0, high=1, high_open=True, owner=owner)
    check_number(norm_eps, "norm_eps", low=0, low_open=True, owner=owner)
    check_divisible(dim, "dim", num_heads, "num_heads", owner=owner)  # type: ignore[arg-type]


def _norm(style: str, dim: int, eps: float) -> nn.Module:
    return RMSNorm(dim, eps=eps) if style == "modern" else nn.LayerNorm(dim, eps=eps)


class Block(nn.Module):
    """One transformer layer; ``style`` picks post-LN (DiGIT stage 1), pre-LN, or modern."""

    def __init__(self, dim, num_heads, ffn_dim, style="digit", dropout=0.0, norm_eps=1e-5):
        super().__init__()
        modern = style == "modern"
        self.post_norm = style == "digit"
        self.norm1 = _norm(style, dim, norm_eps)
        self.attn = Attention(dim, num_heads, qkv_bias=not modern, proj_bias=not modern)
        self.norm2 = _norm(style, dim, norm_eps)
        self.mlp = SwiGLU(dim, ffn_dim, bias=False) if modern else Mlp(dim, ffn_dim, act="gelu")
        self.drop = nn.Dropout(dropout)

    def forward(self, x, **attn_kw):
        if self.post_norm:
            x = self.norm1(x + self.drop(self.attn(x, **attn_kw)))
            return self.norm2(x + self.drop(self.mlp(x)))
        x = x + self.drop(self.attn(self.norm1(x), **attn_kw))
        return x + self.drop(self.mlp(self.norm2(x)))

    def decode(self, x, cache: KVCache, layer: int, position, rotation) -> torch.Tensor:
        """``forward`` for one new position per row (``Transformer.decode``), without dropout."""
        if self.post_norm:
            x = self.norm1(x + decode_attention(self.attn, x, cache, layer, position, rotation))
            return self.norm2(x + self.mlp(x))
        x = x + decode_attention(self.attn, self.norm1(x), cache, layer, position, rotation)
        return x + self.mlp(self.norm2(x))


def table_row(table: torch.Tensor, position: int | torch.Tensor) -> torch.Tensor:
    """Row ``position`` of a position table ``[P, C]`` → ``[C]``; a 0-d tensor position is gathered
    on the device (``table[t]`` would read it on the host, which a compiled graph cannot)."""
    if isinstance(position, int):
        return table[position]
    return table.index_select(0, position.view(1))[0]


def decode_attention(
    attn: Attention,
    x: torch.Tensor,
    cache: KVCache,
    layer: int,
    position: int | torch.Tensor,
    rotation: tuple[torch.Tensor, torch.Tensor] | None,
) -> torch.Tensor:
    """``attn`` on ``x [R, 1, D]`` at ``position``: its key and value go into slot ``position`` of
    ``cache`` in place, and the query attends to slots ``0 … position``.  ``rotation`` is the rotary
    table's (cos, sin) rows at ``position`` (``Transformer.decode`` reads them once per step).

    An int position reads the valid prefix, a slice, so no mask is built; a 0-d tensor position
    reads the whole cache under a mask computed from it, so that every shape is the same at every
    step (one captured CUDA graph replays them all).
    """
    qkv = attn.qkv(x).unflatten(-1, (3, attn.num_heads, -1)).permute(2, 0, 3, 1, 4)  # 3, R, H, 1, Dh
    if rotation is not None:  # RotaryEmbedding's rotation of q and k
        cos, sin = rotation  # Dh each
        qk = qkv[:2]  # 2, R, H, 1, Dh
        (q, k), v = torch.addcmul(qk * cos, qk.roll(qk.shape[-1] // 2, dims=-1), sin).unbind(0), qkv[2]
    else:
        q, k, v = qkv.unbind(0)  # R, H, 1, Dh each
    keys, values = cache.k[layer], cache.v[layer]  # R, H, L, Dh
    mask = None
    if isinstance(position, int):
        keys.narrow(2, position, 1).copy_(k)
        values.narrow(2, position, 1).copy_(v)
        keys, values = keys[:, :, : position + 1], values[:, :, : position + 1]  # R, H, position+1, Dh
    else:
        slot = position.view(1)
        keys.index_copy_(2, slot, k.to(keys.dtype))
        values.index_copy_(2, slot, v.to(values.dtype))
        mask = (torch.arange(keys.shape[2], device=keys.device) <= position)[None]  # 1, L
    out = F.scaled_dot_product_attention(q.to(keys.dtype), keys, values, attn_mask=mask)  # R, H, 1, Dh
    return attn.proj(out.transpose(1, 2).flatten(2))  # R, 1, D


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
            raise InputError(f"unknown block style {style!r}; expected one of {STYLES}")
        self.style, self.num_heads, self.max_positions = style, num_heads, max_positions
        self.blocks = nn.ModuleList(
            Block(dim, num_heads, ffn_dim, style, dropout, norm_eps) for _ in range(depth)
        )
        if style == "digit":
            self.norm = nn.Identity()  # post-LN: every block already ends in a LayerNorm
        else:
            self.norm = _norm(style, dim, norm_eps)
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
            raise InputError(
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

    def decode(self, x: torch.Tensor, cache: KVCache, position: int | torch.Tensor) -> torch.Tensor:
        """One new position per row: ``x [R, 1, D]`` at ``position`` (an int, or a 0-d long tensor
        for static shapes, see :func:`decode_attention`) → final hidden states ``[R, 1, D]``.

        The per-step twin of ``forward(x, cache=cache)`` (the same arithmetic, so the same tokens)
        without its bookkeeping: no length checks or ``cache.length`` updates inside the loop; the
        caller bounds the positions once.
        """
        rotation = None
        if self.rope is not None:
            rotation = table_row(self.rope.cos, position), table_row(self.rope.sin, position)  # Dh each
        for layer, block in enumerate(self.blocks):
            x = block.decode(x, cache, layer, position, rotation)
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
#                   Class-conditioned start token, named sizes                  #
#################################################################################


class ClassConditioned:
    """The leading token of GPT and MaskGIT: a class row of the embedding table, or the null row
    after the classes (no class: sampling unconditionally, and the other half of classifier-free
    guidance).  The model sets ``num_classes``, ``class_offset`` (its first class row) and
    ``class_dropout`` (:meth:`set_classes`)."""

    num_classes: int
    class_offset: int
    class_dropout: float
    training: bool

    def set_classes(self, num_classes: int, class_offset: int, class_dropout: float) -> None:
        if not 0 <= class_dropout < 1:
            raise InputError(f"class_dropout must lie in [0, 1), got {class_dropout}")
        self.num_classes, self.class_offset, self.class_dropout = num_classes, class_offset, class_dropout

    @property
    def null_id(self) -> int:
        return self.class_offset + self.num_classes

    def start_ids(self, y: torch.Tensor | int | None, batch: int | None = None, device=None) -> torch.Tensor:
        """The first input of each sequence: class ``y`` (or the null token for ``y=None``/a count)."""
        if isinstance(y, torch.Tensor):
            check_class_ids(y, self.num_classes)
            return y.long().to(device) + self.class_offset
        n = y if isinstance(y, int) else batch
        if n is None or n < 1:
            raise InputError(f"pass class labels [B] or a positive sample count, got {y!r}")
        return torch.full((n,), self.null_id, dtype=torch.long, device=device)

    def drop_classes(self, start: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        """In training, class start tokens turn null at rate ``class_dropout`` (so that the model
        also learns the unconditional distribution that classifier-free guidance needs)."""
        if y is not None and self.training and self.class_dropout > 0:
            drop = torch.rand(start.shape, device=start.device) < self.class_dropout
            start = start.masked_fill(drop, self.null_id)
        return start


def build_or_load(
    model_cls: Callable[..., nn.Module],
    load: Callable[..., nn.Module],
    defaults: Mapping,
    pretrained=None,
    *,
    load_defaults: tuple[str, ...] = (),
    **kwargs,
):
    """A named size: ``model_cls`` with random weights (``defaults`` updated by ``kwargs``), or, given
    ``pretrained`` (path or state dict), ``load(pretrained, **kwargs)``: a DiGIT checkpoint whose
    shapes come from the file; ``load_defaults`` names the loader arguments that the file cannot tell
    (the head count, stage 2's mode) and that default to the size's."""
    if pretrained is None:
        return model_cls(**{**defaults, **kwargs})
    return load(pretrained, **{**{k: defaults[k] for k in load_defaults}, **kwargs})


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
