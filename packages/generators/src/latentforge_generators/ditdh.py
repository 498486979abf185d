"""DiT-DH (RAE, Zheng et al., 2025): a LightningDiT backbone plus a wide, shallow DDT head.

Diffusing 768-channel representation latents needs a transformer at least as wide as the latent;
the head (2048 wide, 2 blocks) gives that width cheaply.  The backbone reads the noisy latent and
produces one condition per token; the head re-embeds the same noisy latent and is modulated token by
token by the backbone's output (DDT's decoupled "condition encoder / velocity decoder").

Key-compatible with the released RAE stage-2 checkpoints (``stage2_model.pt``: a raw EMA state dict of
``DiTwDDTHead``; backbone blocks are ``blocks.0 … depth-1``, head blocks follow).  Time convention:
t = 1 is noise and t = 0 data (RAE's), embedded with fixed Gaussian Fourier features stored in the
checkpoint as ``t_embedder.W``.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from latentforge_core.errors import (
    InputError,
    check_bool,
    check_divisible,
    check_int,
    check_ints,
    check_number,
)
from latentforge_core.linear import Linear
from latentforge_generators.layers import (
    AdaLNBlock,
    DiTBackbone,
    FinalLayer,
    FourierTimestepEmbedder,
    LabelEmbedder,
    PatchEmbed,
    RoPE2D,
    check_inputs,
    unpatchify,
)


#################################################################################
#                                 DiT-DH Model                                  #
#################################################################################
class DiTDH(DiTBackbone):
    """``forward(x [B,C,H,W], t [B], y [B]) -> velocity [B, C, H, W]`` with t = 1 noise (RAE's)."""

    time_convention = "noise_at_1"
    xavier_linears = False  # RAE keeps PyTorch's default init for the linears (its xavier pass is off)

    def __init__(
        self,
        *,
        input_size: int = 16,
        patch_size: int = 1,
        in_channels: int = 768,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        head_hidden_size: int = 2048,
        head_depth: int = 2,
        head_num_heads: int = 16,
        mlp_ratio: float = 4.0,
        class_dropout_prob: float = 0.1,
        num_classes: int = 1000,
        use_qknorm: bool = False,
    ):
        super().__init__()
        owner = type(self).__name__
        check_ints(owner, input_size=input_size, patch_size=patch_size, in_channels=in_channels)
        check_ints(owner, hidden_size=hidden_size, depth=depth, num_heads=num_heads)
        check_ints(
            owner, head_hidden_size=head_hidden_size, head_depth=head_depth, head_num_heads=head_num_heads
        )
        check_int(num_classes, "num_classes", minimum=0, owner=owner)
        check_number(mlp_ratio, "mlp_ratio", low=0, low_open=True, owner=owner)
        check_number(class_dropout_prob, "class_dropout_prob", low=0, high=1, owner=owner)
        check_bool(use_qknorm, "use_qknorm", owner=owner)
        check_divisible(hidden_size, "hidden_size", num_heads, "num_heads", owner=owner)
        check_divisible(head_hidden_size, "head_hidden_size", head_num_heads, "head_num_heads", owner=owner)
        if input_size % patch_size:
            raise InputError(
                f"{owner}: input_size {input_size} is not divisible by patch_size {patch_size} "
                "(the latent grid is cut into patch_size × patch_size patches)"
            )
        self.input_size = input_size
        self.patch_size = patch_size
        self.in_channels = self.out_channels = in_channels
        self.num_classes = num_classes
        self.learn_sigma = False
        self.hidden_size, self.head_hidden_size = hidden_size, head_hidden_size
        self.depth, self.head_depth = depth, head_depth
        grid = input_size // patch_size

        # Backbone ("condition encoder"): LightningDiT blocks over its own patch embedding + sin-cos table.
        self.s_embedder = PatchEmbed(patch_size, in_channels, hidden_size)
        self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid, hidden_size), requires_grad=False)
        self.t_embedder = FourierTimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        self.enc_feat_rope = RoPE2D(hidden_size // num_heads, grid)
        # Head ("velocity decoder"): a second embedding of the noisy input, RoPE only, per-token adaLN.
        self.x_embedder = PatchEmbed(patch_size, in_channels, head_hidden_size)
        self.s_projector = (
            Linear(hidden_size, head_hidden_size) if hidden_size != head_hidden_size else nn.Identity()
        )
        self.dec_feat_rope = RoPE2D(head_hidden_size // head_num_heads, grid)
        block = dict(mlp_ratio=mlp_ratio, rmsnorm=True, swiglu=True, qk_norm=use_qknorm)
        self.blocks = nn.ModuleList(
            [AdaLNBlock(hidden_size, num_heads, **block) for _ in range(depth)]
            + [AdaLNBlock(head_hidden_size, head_num_heads, **block) for _ in range(head_depth)]
        )
        self.final_layer = FinalLayer(head_hidden_size, patch_size**2 * in_channels, rmsnorm=True)
        self.initialize_weights()  # DiT's init and sin-cos table (DiTBackbone); compile_blocks() too

    @property
    def alignment_blocks(self) -> nn.ModuleList:
        """The condition encoder's blocks: their tokens (width ``hidden_size``) are what REPA aligns."""
        return self.blocks[: self.depth]

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        t, y = check_inputs(self, x, t, y)
        t_emb = self.t_embedder(t)  # B, D
        c = F.silu(t_emb + self.y_embedder(y))  # B, D
        s = self.s_embedder(x) + self.pos_embed  # B, T, D
        for block in self.blocks[: self.depth]:
            s = block(s, c, self.enc_feat_rope)  # B, T, D
        s = self.s_projector(F.silu(s + t_emb.unsqueeze(1)))  # B, T, D_head: one condition per token
        h = self.x_embedder(x)  # B, T, D_head
        for block in self.blocks[self.depth :]:
            h = block(h, s, self.dec_feat_rope)  # B, T, D_head
        h = self.final_layer(h, s)  # B, T, p²·C
        return unpatchify(h, self.patch_size, self.out_channels)  # B, C, H, W


#################################################################################
#                                  DiT-DH sizes                                 #
#################################################################################
# Registry name -> the DiTDH keyword arguments of that size; ``latentforge_generators.zoo`` registers
# one builder per row (``ditdh_xl`` for ``ditdh-xl``).  The data shape is the caller's (the class
# defaults are RAE's DINOv2-B latents, 768×16×16).
SIZES: dict[str, dict] = {
    # The RAE generator: backbone 1152×28 (16 heads) + head 2048×2 (16 heads), 839 M parameters.
    "ditdh-xl": dict(hidden_size=1152, depth=28, num_heads=16, head_hidden_size=2048, head_depth=2,
                     head_num_heads=16),
    # RAE's weak model for autoguidance: backbone 384×12 (6 heads) + the same 2048×2 head.
    "ditdh-s": dict(hidden_size=384, depth=12, num_heads=6, head_hidden_size=2048, head_depth=2,
                    head_num_heads=16),
    # Tiny size for tests and CPU demos (not a published size).
    "test-ditdh": dict(hidden_size=64, depth=2, num_heads=4, head_hidden_size=96, head_depth=1,
                       head_num_heads=4),
}  # fmt: skip
