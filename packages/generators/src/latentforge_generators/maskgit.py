"""MaskGIT: a bidirectional transformer over token grids, decoded in a few parallel steps.

Training masks floor(N·cos(π u / 2) + 1) random tokens per grid and scores only those; sampling
starts from an all-masked grid and keeps the most confident samples at each step (the cosine
unmasking schedule and annealed Gumbel confidence of ``token_sampling.maskgit_decode``, which
DiGIT's 8-step stage-2 decoder also uses).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from latentforge_core.errors import InputError, check_int, check_number
from latentforge_generators.samplers import check_sample_options
from latentforge_generators.token_sampling import (
    as_sequence,
    cfg_logits,
    maskgit_decode,
    random_mask,
    smoothed_cross_entropy,
    training_mask_counts,
)
from latentforge_generators.token_transformer import (
    ClassConditioned,
    Transformer,
    check_grid,
    check_sizes,
    init_weights,
)

#################################################################################
#                                 The MaskGIT model                             #
#################################################################################


class MaskGIT(ClassConditioned, nn.Module):
    """Embedding rows: ``[0, V)`` tokens, ``V`` [MASK], ``[V+1, V+1+C)`` classes, ``V+1+C`` null."""

    def __init__(
        self,
        *,
        vocab_size: int,
        grid_size: int | tuple[int, int] = 16,
        num_classes: int = 0,
        dim: int = 768,
        depth: int = 24,
        num_heads: int = 16,
        ffn_dim: int | None = None,
        style: str = "prenorm",
        dropout: float = 0.0,
        class_dropout: float = 0.0,
        label_smoothing: float = 0.1,
        norm_eps: float = 1e-5,
        rope_theta: float = 10000.0,
    ):
        super().__init__()
        check_int(vocab_size, "vocab_size", owner="MaskGIT")
        check_int(num_classes, "num_classes", minimum=0, owner="MaskGIT")
        check_number(class_dropout, "class_dropout", low=0, high=1, high_open=True, owner="MaskGIT")
        check_sizes(
            "MaskGIT", dim=dim, depth=depth, num_heads=num_heads, ffn_dim=ffn_dim, dropout=dropout,
            label_smoothing=label_smoothing, norm_eps=norm_eps,
        )  # fmt: skip
        self.grid = check_grid(grid_size, "grid_size", "MaskGIT")
        self.seq_len = self.grid[0] * self.grid[1]
        self.set_classes(num_classes, vocab_size + 1, class_dropout)  # class rows follow [MASK]
        self.vocab_size, self.dim, self.style = vocab_size, dim, style
        self.label_smoothing = label_smoothing
        self.mask_id = vocab_size

        self.tok_embed = nn.Embedding(vocab_size + num_classes + 2, dim)
        learned = style != "modern"
        self.pos_embed = nn.Parameter(torch.zeros(self.seq_len + 1, dim)) if learned else None
        self.embed_scale = math.sqrt(dim) if learned else 1.0
        self.drop = nn.Dropout(dropout)
        self.transformer = Transformer(
            dim, depth, num_heads, ffn_dim or 4 * dim, style, self.seq_len + 1, dropout, norm_eps, rope_theta
        )
        self.head = nn.Linear(dim, vocab_size, bias=False)
        self.initialize_weights()

    def initialize_weights(self):
        init_weights(self, self.style, self.dim)

    @property
    def input_shape(self) -> tuple[int, int]:
        return self.grid

    def forward(self, tokens: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Grids with [MASK] (= ``vocab_size``) at unknown positions → logits ``[B, h*w, V]``."""
        tokens = as_sequence(tokens, self.grid, self.vocab_size + 1)
        start = self.start_ids(y, tokens.shape[0], tokens.device)
        if len(start) != len(tokens):
            raise InputError(f"{len(start)} class labels for {len(tokens)} token grids")
        return self.logits(tokens, self.drop_classes(start, y))

    def logits(self, tokens: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
        """Checked sequences ``[B, N]`` after start ids ``[B]`` → logits ``[B, N, V]``."""
        ids = torch.cat([start[:, None], tokens], dim=1)
        x = self.tok_embed(ids) * self.embed_scale  # B 1+N D
        if self.pos_embed is not None:
            x = x + self.pos_embed
        x = self.transformer(self.drop(x), causal=False)
        return self.head(x[:, 1:])  # B N V

    def loss(self, tokens: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Cross-entropy on the masked positions of a cosine-scheduled random mask."""
        tokens = as_sequence(tokens, self.grid, self.vocab_size)
        masked = random_mask(training_mask_counts(len(tokens), self.seq_len, tokens.device), self.seq_len)
        logits = self(tokens.masked_fill(masked, self.mask_id), y)
        return smoothed_cross_entropy(logits[masked], tokens[masked], self.label_smoothing)

    @torch.no_grad()
    def sample(
        self,
        y: torch.Tensor | int,
        *,
        steps: int = 8,
        temperature: float = 1.0,
        choice_temperature: float = 4.5,
        cfg_scale: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Token grids ``[B, h, w]`` for class labels ``y [B]`` (or ``y`` unconditional samples)."""
        check_sample_options(
            self,
            dict(cfg_scale=cfg_scale),  # maskgit_decode checks the rest
            owner="MaskGIT.sample",
            from_config=False,
        )  # fmt: skip
        device = self.head.weight.device
        start = self.start_ids(y, device=device)
        if cfg_scale != 1.0:  # one forward of [conditional; unconditional] rows per step
            both = torch.cat([start, torch.full_like(start, self.null_id)])

            def logits_fn(tokens):
                return cfg_logits(self.logits(tokens.repeat(2, 1), both), cfg_scale)
        else:

            def logits_fn(tokens):
                return self.logits(tokens, start)

        tokens = torch.full((len(start), self.seq_len), self.mask_id, dtype=torch.long, device=device)
        tokens = maskgit_decode(
            logits_fn,
            tokens,
            torch.ones_like(tokens, dtype=torch.bool),
            mask_id=self.mask_id,
            steps=steps,
            temperature=temperature,
            choice_temperature=choice_temperature,
            generator=generator,
        )
        return tokens.view(len(start), *self.grid)


#################################################################################
#                                 MaskGIT configs                               #
#################################################################################

# Registry name -> the MaskGIT keyword arguments of that model; one builder per row below.
SIZES: dict[str, dict] = {
    # MaskGIT's ImageNet-256 transformer: 24 x 768, 16 heads, over 16x16 VQGAN codes (1024).
    "maskgit-base": dict(
        vocab_size=1024,
        num_classes=1000,
        dim=768,
        depth=24,
        num_heads=16,
        ffn_dim=3072,
        style="prenorm",
        dropout=0.1,
        class_dropout=0.1,
        label_smoothing=0.1,
    ),
    # DiGIT's base width over 8k K-Means tokens, with modern blocks.
    "maskgit-modern-base": dict(
        vocab_size=8192,
        num_classes=1000,
        dim=1024,
        depth=16,
        num_heads=16,
        ffn_dim=2816,
        style="modern",
        class_dropout=0.1,
        label_smoothing=0.1,
    ),
    "test-maskgit": dict(
        vocab_size=64,
        grid_size=4,
        num_classes=10,
        dim=64,
        depth=2,
        num_heads=4,
        style="prenorm",
        label_smoothing=0.0,
    ),
}


def maskgit_base(**kw) -> MaskGIT:
    return MaskGIT(**{**SIZES["maskgit-base"], **kw})


def maskgit_modern_base(**kw) -> MaskGIT:
    return MaskGIT(**{**SIZES["maskgit-modern-base"], **kw})


def tiny_maskgit(**kw) -> MaskGIT:
    return MaskGIT(**{**SIZES["test-maskgit"], **kw})
