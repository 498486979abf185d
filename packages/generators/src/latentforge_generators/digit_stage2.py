"""DiGIT stage 2: VQGAN codes generated from the K-Means tokens that stage 1 produced.

One pre-LN decoder reads [cond tokens | separator | VQGAN codes] from a shared embedding table,
with a separate learned position table for the conditioning prefix. The autoregressive variant
is causal over the whole sequence and samples with top-p 0.8; the MaskGIT variant attends both
ways and decodes in 8 parallel steps. No class label: the class reaches stage 2 through stage 1.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from latentforge_core.checkpoint import load_into
from latentforge_core.errors import InputError, check_ints
from latentforge_generators.token_sampling import (
    as_sequence,
    check_sampling,
    maskgit_decode,
    random_mask,
    sample_logits,
    smoothed_cross_entropy,
    training_mask_counts,
)
from latentforge_generators.token_transformer import (
    FAIRSEQ_EOS,
    FAIRSEQ_POS_OFFSET,
    FAIRSEQ_SPECIALS,
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
)

MODES = ("ar", "maskgit")
FAIRSEQ_UNK = 3  # DiGIT's [MASK]

#################################################################################
#                                  The model                                    #
#################################################################################


class DiGITStage2(nn.Module):
    """Embedding rows: ``[0, V)`` codes, ``[V, V+K)`` cond tokens, ``V+K`` separator, ``V+K+1`` [MASK].

    ``special_tokens`` > 0 (set by the DiGIT converter: fairseq's 5) adds ``special_head``, the
    output rows of tokens that are never drawn; their logits only enter the normaliser that AR
    top-p measures its nucleus in, as fairseq's sampler does. Our own models have none (0).
    """

    def __init__(
        self,
        *,
        vocab_size: int = 1024,
        cond_vocab_size: int = 8192,
        grid_size: int | tuple = 16,
        cond_grid_size: int | tuple | None = None,
        dim: int = 1024,
        depth: int = 16,
        num_heads: int = 16,
        ffn_dim: int | None = None,
        mode: str = "ar",
        max_positions: int | None = None,
        dropout: float = 0.0,
        label_smoothing: float = 0.1,
        norm_eps: float = 1e-5,
        special_tokens: int = 0,
    ):
        super().__init__()
        if mode not in MODES:
            raise InputError(f"unknown stage-2 mode {mode!r}; expected one of {MODES}")
        owner = "DiGITStage2"
        check_ints(owner, vocab_size=vocab_size, cond_vocab_size=cond_vocab_size)
        check_ints(owner, minimum=0, special_tokens=special_tokens)
        check_sizes(
            owner, dim=dim, depth=depth, num_heads=num_heads, ffn_dim=ffn_dim, dropout=dropout,
            label_smoothing=label_smoothing, norm_eps=norm_eps,
        )  # fmt: skip
        self.grid = check_grid(grid_size, "grid_size", owner)
        self.cond_grid = check_grid(
            cond_grid_size if cond_grid_size is not None else grid_size, "cond_grid_size", owner
        )
        self.seq_len, self.cond_len = self.grid[0] * self.grid[1], self.cond_grid[0] * self.cond_grid[1]
        max_positions = max(self.seq_len + 1, self.cond_len) if max_positions is None else max_positions
        if max_positions < max(self.seq_len + 1, self.cond_len):
            raise InputError(
                f"max_positions {max_positions} cannot hold {self.cond_len} cond tokens "
                f"or 1 + {self.seq_len} codes"
            )
        self.vocab_size, self.cond_vocab_size, self.dim, self.mode = vocab_size, cond_vocab_size, dim, mode
        self.label_smoothing = label_smoothing
        self.sep_id, self.mask_id = vocab_size + cond_vocab_size, vocab_size + cond_vocab_size + 1

        self.tok_embed = nn.Embedding(vocab_size + cond_vocab_size + 2, dim)
        self.pos_cond = nn.Parameter(torch.zeros(max_positions, dim))
        self.pos_gen = nn.Parameter(torch.zeros(max_positions, dim))
        self.embed_scale = math.sqrt(dim)
        self.drop = nn.Dropout(dropout)
        self.transformer = Transformer(
            dim,
            depth,
            num_heads,
            ffn_dim or 4 * dim,
            "prenorm",
            self.cond_len + self.seq_len + 1,
            dropout,
            norm_eps,
        )
        self.head = nn.Linear(dim, vocab_size, bias=False)
        # no parameter (so no state-dict key) without specials: our own checkpoints load strictly
        self.special_head = nn.Linear(dim, special_tokens, bias=False) if special_tokens else None
        self.initialize_weights()

    def initialize_weights(self):
        init_weights(self, "prenorm", self.dim)

    @property
    def input_shape(self) -> tuple[int, int]:
        return self.grid

    def hidden_ids(
        self, ids: torch.Tensor, cache: KVCache | None = None, causal: bool = True
    ) -> torch.Tensor:
        """Ids of [cond | sep | codes] (continuing ``cache``) → final hidden states ``[B, N, D]``."""
        start = 0 if cache is None else cache.length
        self.transformer.check_length(start + ids.shape[1])
        pos = torch.cat([self.pos_cond[: self.cond_len], self.pos_gen[: self.seq_len + 1]])
        x = self.tok_embed(ids) * self.embed_scale + pos[start : start + ids.shape[1]]  # B N D
        return self.transformer(self.drop(x), cache=cache, causal=causal)

    def forward_ids(
        self, ids: torch.Tensor, cache: KVCache | None = None, causal: bool = True
    ) -> torch.Tensor:
        """Ids of [cond | sep | codes] (continuing ``cache``) → logits ``[B, N, V]``."""
        return self.head(self.hidden_ids(ids, cache, causal))

    def prefix(self, y: torch.Tensor) -> torch.Tensor:
        """K-Means tokens ``[B, hc, wc]`` → ids of [cond | sep] ``[B, hc*wc + 1]``."""
        if not isinstance(y, torch.Tensor):
            raise InputError(
                f"stage 2 is conditioned on first-stage token grids [B, {self.cond_grid[0]}, "
                f"{self.cond_grid[1]}], got {type(y).__name__}"
            )
        cond = as_sequence(y, self.cond_grid, self.cond_vocab_size) + self.vocab_size
        return torch.cat([cond, torch.full_like(cond[:, :1], self.sep_id)], dim=1)

    def forward(self, tokens: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Teacher forcing (AR) or masked prediction (MaskGIT, [MASK] = ``vocab_size``) → ``[B, N, V]``."""
        prefix = self.prefix(y)
        if self.mode == "ar":
            tokens = as_sequence(tokens, self.grid, self.vocab_size)
            ids = torch.cat([prefix, tokens[:, :-1]], dim=1)
            return self.forward_ids(ids)[:, self.cond_len :]
        tokens = as_sequence(tokens, self.grid, self.vocab_size + 1)
        ids = torch.cat([prefix, tokens.masked_fill(tokens == self.vocab_size, self.mask_id)], dim=1)
        return self.forward_ids(ids, causal=False)[:, self.cond_len + 1 :]

    def loss(self, tokens: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Smoothed cross-entropy on every code (AR) or on the masked codes (MaskGIT)."""
        tokens = as_sequence(tokens, self.grid, self.vocab_size)
        if len(self.prefix(y)) != len(tokens):
            raise InputError(f"{len(y)} conditioning grids for {len(tokens)} code grids")
        if self.mode == "ar":
            return smoothed_cross_entropy(self(tokens, y), tokens, self.label_smoothing)
        masked = random_mask(training_mask_counts(len(tokens), self.seq_len, tokens.device), self.seq_len)
        logits = self(tokens.masked_fill(masked, self.vocab_size), y)
        return smoothed_cross_entropy(logits[masked], tokens[masked], self.label_smoothing)

    @torch.no_grad()
    def sample(
        self,
        y: torch.Tensor,
        *,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = 0.8,
        steps: int = 8,
        choice_temperature: float = 4.5,
        use_cache: bool = True,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """VQGAN code grids ``[B, h, w]`` for first-stage tokens ``y``; AR uses top-k/top-p,
        MaskGIT uses ``steps`` and ``choice_temperature``."""
        prefix = self.prefix(y).to(self.head.weight.device)
        batch = len(prefix)
        if self.mode == "maskgit":

            def logits_fn(codes):
                ids = torch.cat([prefix, codes], dim=1)
                return self.forward_ids(ids, causal=False)[:, self.cond_len + 1 :]

            codes = torch.full((batch, self.seq_len), self.mask_id, dtype=torch.long, device=prefix.device)
            codes = maskgit_decode(
                logits_fn,
                codes,
                torch.ones_like(codes, dtype=torch.bool),
                mask_id=self.mask_id,
                steps=steps,
                temperature=temperature,
                choice_temperature=choice_temperature,
                generator=generator,
            )
            return codes.view(batch, *self.grid)
        check_sampling(temperature, top_k, top_p)
        codes = prefix.new_empty(batch, self.seq_len)
        cache = noise = None
        if use_cache:  # prefill [cond | sep], then one cached step per code
            cache = self.transformer.new_cache(batch, self.cond_len + self.seq_len, self.head.weight)
            pos = torch.cat([self.pos_cond[: self.cond_len], self.pos_gen[: self.seq_len]])  # P D
            noise = torch.empty(batch, min(top_k or self.vocab_size, self.vocab_size), device=prefix.device)
        h = self.hidden_ids(prefix, cache)[:, -1]  # B D
        for i in range(self.seq_len):
            if i and use_cache:
                position = self.cond_len + i
                x = self.tok_embed(codes[:, i - 1 : i]) * self.embed_scale + pos[position]  # B 1 D
                h = self.transformer.decode(x, cache, position)[:, 0]  # B D
            elif i:  # the reference: the whole sequence again at every step
                h = self.hidden_ids(torch.cat([prefix, codes[:, :i]], dim=1))[:, -1]  # B D
            specials = None if self.special_head is None else self.special_head(h)  # B S
            codes[:, i] = sample_logits(self.head(h), temperature, top_k, top_p, generator, specials, noise)
        return codes.view(batch, *self.grid)


#################################################################################
#                      DiGIT stage-2 (fairseq) checkpoints                      #
#################################################################################

FAIRSEQ_TGT = FAIRSEQ_SPECIALS + 1024  # the VQGAN dictionary: 5 specials + 1024 codes


def convert_digit_stage2(state, num_heads: int = 16) -> tuple[dict[str, torch.Tensor], dict]:
    """DiGIT's ``st2vtlm`` / ``st2vtlm_nar`` weights → (our state dict, kwargs without ``mode``).

    The shared table holds the VQGAN dictionary then the K-Means one, each led by 5 specials;
    ``</s>`` becomes the separator, ``<unk>`` the [MASK], other specials are dropped. The specials'
    output rows become ``special_head``: fairseq measures top-p in full-dictionary mass.
    """
    sd = fairseq_state(state)
    depth = fairseq_depth(sd)
    expected = {
        f"decoder.{k}.weight"
        for k in ("embed_tokens", "embed_positions", "embed_positions_1", "output_projection", "layer_norm")
    } | {"decoder.layer_norm.bias"}
    expected |= {k for keys in fairseq_layer_map(depth).values() for k in keys}
    check_fairseq_keys(sd, expected, "DiGIT stage-2")
    emb, head = sd["decoder.embed_tokens.weight"], sd["decoder.output_projection.weight"]
    tgt = head.shape[0]
    cond_vocab = emb.shape[0] - tgt - FAIRSEQ_SPECIALS
    ours = convert_fairseq_layers(sd, depth)
    ours["tok_embed.weight"] = torch.cat(
        [
            emb[FAIRSEQ_SPECIALS:tgt],
            emb[tgt + FAIRSEQ_SPECIALS :],
            emb[FAIRSEQ_EOS : FAIRSEQ_EOS + 1],
            emb[FAIRSEQ_UNK : FAIRSEQ_UNK + 1],
        ]
    )
    ours["pos_cond"] = sd["decoder.embed_positions_1.weight"][FAIRSEQ_POS_OFFSET:]
    ours["pos_gen"] = sd["decoder.embed_positions.weight"][FAIRSEQ_POS_OFFSET:]
    ours["transformer.norm.weight"] = sd["decoder.layer_norm.weight"]
    ours["transformer.norm.bias"] = sd["decoder.layer_norm.bias"]
    ours["head.weight"] = head[FAIRSEQ_SPECIALS:]
    ours["special_head.weight"] = head[:FAIRSEQ_SPECIALS]
    config = dict(
        vocab_size=tgt - FAIRSEQ_SPECIALS,
        special_tokens=FAIRSEQ_SPECIALS,
        cond_vocab_size=cond_vocab,
        dim=emb.shape[1],
        depth=depth,
        num_heads=num_heads,
        ffn_dim=sd["decoder.layers.0.fc1.weight"].shape[0],
        max_positions=ours["pos_gen"].shape[0],
    )
    return ours, config


def load_digit_stage2(state, mode: str = "ar", num_heads: int = 16, **overrides) -> DiGITStage2:
    """A stage-2 model carrying DiGIT weights (path or state dict), loaded strictly."""
    sd, config = convert_digit_stage2(state, num_heads)
    model = DiGITStage2(**{**config, "mode": mode, **overrides})
    load_into(model, sd, strict=True)
    return model


#################################################################################
#                                Stage-2 configs                                #
#################################################################################

# Registry name -> the DiGITStage2 keyword arguments of that model; one builder per row below.
SIZES: dict[str, dict] = {
    # DiGIT base stage 2: 16 x 1024 pre-LN over [256 K-Means tokens | </s> | 256 VQGAN codes].
    "digit-stage2-ar-base": dict(
        vocab_size=1024,
        cond_vocab_size=8192,
        dim=1024,
        depth=16,
        num_heads=16,
        mode="ar",
        max_positions=1024,
        dropout=0.1,
        label_smoothing=0.1,
    ),
    "digit-stage2-maskgit-base": dict(
        vocab_size=1024,
        cond_vocab_size=8192,
        dim=1024,
        depth=16,
        num_heads=16,
        mode="maskgit",
        max_positions=1024,
        dropout=0.1,
        label_smoothing=0.1,
    ),
    "test-digit-stage2-ar": dict(
        vocab_size=32, cond_vocab_size=16, grid_size=4, dim=64, depth=2, num_heads=4, mode="ar"
    ),
    "test-digit-stage2-maskgit": dict(
        vocab_size=32, cond_vocab_size=16, grid_size=4, dim=64, depth=2, num_heads=4, mode="maskgit"
    ),
}


def _build(name: str, pretrained=None, **kw) -> DiGITStage2:
    # the head count of a checkpoint is the loader's default (16, DiGIT's) unless given
    return build_or_load(
        DiGITStage2, load_digit_stage2, SIZES[name], pretrained, load_defaults=("mode",), **kw
    )


def digit_stage2_ar_base(pretrained=None, **kw) -> DiGITStage2:
    return _build("digit-stage2-ar-base", pretrained, **kw)


def digit_stage2_maskgit_base(pretrained=None, **kw) -> DiGITStage2:
    return _build("digit-stage2-maskgit-base", pretrained, **kw)


def tiny_digit_stage2_ar(**kw) -> DiGITStage2:
    return _build("test-digit-stage2-ar", **kw)


def tiny_digit_stage2_maskgit(**kw) -> DiGITStage2:
    return _build("test-digit-stage2-maskgit", **kw)
