"""REPA (Yu et al., 2024): a flow generator's hidden tokens aligned to a frozen encoder's patch features.

    repa = REPA(generator, encoder_dim=768, depth=8, weight=0.5)      # SiT-XL/2 + DINOv2-B, the paper's
    terms = repa.loss(latents, labels, encoder_targets(dinov2, images), return_terms=True)
    terms["loss"]  # flow loss + λ · (−cos(projector(h_depth), target)), averaged over tokens and batch

The hidden state is the output of block ``depth`` (counted from 1) of the backbone's
``alignment_blocks`` (the DiT family: its blocks; DiT-DH: its encoder blocks), caught by a forward
hook, so the backbone needs no change and a plugin's backbone aligns by exposing ``alignment_blocks``
and ``hidden_size``.  The encoder's grid is brought to the backbone's token grid (``match_grid``); the
projector is REPA's MLP.  The projector trains with the generator and is unused at sampling.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from latentforge_core.alignment import Projector, match_grid, negative_cosine
from latentforge_core.errors import InputError, InputTypeError, check_int, check_number


def alignment_blocks(backbone: nn.Module) -> Sequence[nn.Module]:
    """The blocks whose outputs are the backbone's hidden tokens ``[B, N, hidden_size]``, in order."""
    blocks = getattr(backbone, "alignment_blocks", None)
    blocks = blocks if blocks is not None else getattr(backbone, "blocks", None)
    if blocks is None or not hasattr(backbone, "hidden_size"):
        raise InputTypeError(
            f"{type(backbone).__name__} exposes no hidden tokens to align: expected `alignment_blocks` "
            "(or `blocks`), the blocks whose outputs are [B, N, D] tokens, and `hidden_size` (D)"
        )
    return blocks


@contextlib.contextmanager
def block_output(block: nn.Module) -> Iterator[dict[str, torch.Tensor]]:
    """``{"tokens": …}`` holds ``block``'s output of the forward run inside the ``with``."""
    caught: dict[str, torch.Tensor] = {}
    handle = block.register_forward_hook(lambda _module, _args, out: caught.__setitem__("tokens", out))
    try:
        yield caught
    finally:
        handle.remove()


class REPA(nn.Module):
    """``generator`` (a FlowGenerator) trained with REPA's alignment of block ``depth``'s tokens to an
    encoder of width ``encoder_dim``, weighted by ``weight`` (λ)."""

    def __init__(
        self,
        generator: nn.Module,
        encoder_dim: int,
        depth: int = 8,
        weight: float = 0.5,
        projector_dim: int = 2048,
    ):
        super().__init__()
        check_int(encoder_dim, "encoder_dim", minimum=1, owner="REPA")
        check_int(projector_dim, "projector_dim", minimum=1, owner="REPA")
        check_number(weight, "weight", low=0, owner="REPA")
        backbone = generator.backbone
        blocks = alignment_blocks(backbone)
        check_int(depth, "depth", minimum=1, owner="REPA")
        if depth > len(blocks):
            raise InputError(
                f"REPA depth {depth} is beyond the {len(blocks)} blocks of {type(backbone).__name__} whose "
                f"tokens can be aligned: expected a depth in 1…{len(blocks)}"
            )
        self.generator, self.depth, self.weight = generator, depth, float(weight)
        self.projector = Projector(backbone.hidden_size, encoder_dim, projector_dim)

    def token_grid(self, num_tokens: int) -> tuple[int, int]:
        """The backbone's token grid: its latent grid divided by the patch size."""
        _, h, w = self.generator.input_shape
        patch = round((h * w / num_tokens) ** 0.5)
        if patch < 1 or (h // patch) * (w // patch) != num_tokens:
            raise InputError(f"{num_tokens} hidden tokens do not tile the {h}×{w} latent grid")
        return h // patch, w // patch

    def loss(
        self,
        x: torch.Tensor,
        y: torch.Tensor | None,
        target: torch.Tensor,
        return_terms: bool = False,
        **draws: torch.Tensor,
    ) -> torch.Tensor | dict[str, Any]:
        """Flow loss on latents ``x`` plus λ · alignment to ``target``, the encoder's ``[B, D, h, w]``
        features of the images ``x`` encodes (``encoder_targets``); one backbone forward.  ``draws``
        (``noise``, ``t``) go to the flow loss."""
        block = alignment_blocks(self.generator.backbone)[self.depth - 1]  # not a second submodule
        with block_output(block) as hidden:
            terms = self.generator.loss(x, y, return_terms=True, **draws)
        tokens = hidden["tokens"]  # B, N, hidden
        if target.shape[0] != tokens.shape[0]:
            raise InputError(f"{target.shape[0]} encoder targets for a batch of {tokens.shape[0]} latents")
        grid = self.token_grid(tokens.shape[1])
        target = match_grid(target, grid, f"block {self.depth}").flatten(2).transpose(1, 2)  # B, N, D
        align = negative_cosine(self.projector(tokens), target)
        terms = {**terms, "diffusion": terms["loss"], "alignment": align}
        terms["loss"] = terms["loss"] + self.weight * align
        return terms if return_terms else terms["loss"]
