"""DiT (Peebles & Xie, 2023): a ViT over latent patches, conditioned by adaLN-Zero on time + class.

Key-compatible with the official ``facebookresearch/DiT`` checkpoints (``DiT-XL-2-256x256.pt`` is a
raw state dict in exactly this layout).  The same class carries LightningDiT's options (RMSNorm,
SwiGLU, 2-D RoPE, QK-norm), which is all LightningDiT changes; ``lightningdit.py`` sets them on.

Time convention: t = 0 is noise and t = 1 data, fed unscaled to the sinusoidal embedding, as SiT and
LightningDiT use this backbone.  The class label ``num_classes`` is the null class of CFG.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from latentforge_core.errors import (
    InputError,
    check_bool,
    check_divisible,
    check_int,
    check_ints,
    check_number,
)
from latentforge_generators.layers import (
    AdaLNBlock,
    DiTBackbone,
    FinalLayer,
    FourierTimestepEmbedder,
    LabelEmbedder,
    PatchEmbed,
    RoPE2D,
    TimestepEmbedder,
    check_inputs,
    unpatchify,
)


#################################################################################
#                                 Core DiT Model                                #
#################################################################################
class DiT(DiTBackbone):
    """Diffusion transformer ``forward(x [B,C,H,W], t [B], y [B]) -> [B, C_out, H, W]``.

    With ``learn_sigma`` the output has ``2·in_channels`` channels (prediction, then DiT's variance
    interpolation); flow matching uses the first ``in_channels`` and ignores the rest, as SiT does.
    ``norm_eps`` is the epsilon of each block's second norm (before the MLP): DiT's code uses 1e-6,
    diffusers' port its ``config.norm_eps`` (1e-5 by default), which ``from_diffusers`` passes here.
    ``time_embedding="fourier"`` swaps DiT's sinusoid for RAE's Gaussian-Fourier features (RAE's
    LightningDiT, ``lightningdit.RAELightningDiT``).
    """

    time_convention = "noise_at_0"

    def __init__(
        self,
        *,
        input_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        class_dropout_prob: float = 0.1,
        num_classes: int = 1000,
        learn_sigma: bool = True,
        use_rmsnorm: bool = False,
        use_swiglu: bool = False,
        use_rope: bool = False,
        use_qknorm: bool = False,
        time_freq_shift: int = 0,
        norm_eps: float = 1e-6,
        time_embedding: str = "sinusoidal",
    ):
        super().__init__()
        owner = type(self).__name__
        check_ints(owner, input_size=input_size, patch_size=patch_size, in_channels=in_channels)
        check_ints(owner, hidden_size=hidden_size, depth=depth, num_heads=num_heads)
        check_int(num_classes, "num_classes", minimum=0, owner=owner)
        check_int(time_freq_shift, "time_freq_shift", minimum=None, owner=owner)
        check_number(mlp_ratio, "mlp_ratio", low=0, low_open=True, owner=owner)
        check_number(class_dropout_prob, "class_dropout_prob", low=0, high=1, owner=owner)
        check_number(norm_eps, "norm_eps", low=0, low_open=True, owner=owner)
        if time_embedding not in ("sinusoidal", "fourier"):
            raise InputError(
                f"{owner}: time_embedding must be 'sinusoidal' (DiT's) or 'fourier' (RAE's "
                f"Gaussian-Fourier features, key t_embedder.W), got {time_embedding!r}"
            )
        for flag, value in dict(
            learn_sigma=learn_sigma, use_rmsnorm=use_rmsnorm, use_swiglu=use_swiglu, use_rope=use_rope,
            use_qknorm=use_qknorm,
        ).items():  # fmt: skip
            check_bool(value, flag, owner=owner)
        check_divisible(hidden_size, "hidden_size", num_heads, "num_heads", owner=owner)
        if input_size % patch_size:
            raise InputError(
                f"{owner}: input_size {input_size} is not divisible by patch_size {patch_size} "
                "(the latent grid is cut into patch_size × patch_size patches)"
            )
        self.input_size = input_size
        self.patch_size = patch_size
        self.in_channels = in_channels
        self.out_channels = 2 * in_channels if learn_sigma else in_channels
        self.num_classes = num_classes
        self.learn_sigma = learn_sigma
        self.hidden_size = hidden_size
        self.depth = depth
        self.num_heads = num_heads
        self.norm_eps = norm_eps
        grid = input_size // patch_size

        self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size)
        self.t_embedder = (
            FourierTimestepEmbedder(hidden_size)
            if time_embedding == "fourier"
            else TimestepEmbedder(hidden_size, freq_shift=time_freq_shift)
        )
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        # Frozen sin-cos table, kept as a parameter because the official checkpoints store it.
        self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid, hidden_size), requires_grad=False)
        self.feat_rope = RoPE2D(hidden_size // num_heads, grid) if use_rope else None
        block = dict(rmsnorm=use_rmsnorm, swiglu=use_swiglu, qk_norm=use_qknorm, norm_eps=norm_eps)
        self.blocks = nn.ModuleList(
            AdaLNBlock(hidden_size, num_heads, mlp_ratio, **block) for _ in range(depth)
        )
        self.final_layer = FinalLayer(hidden_size, patch_size**2 * self.out_channels, rmsnorm=use_rmsnorm)
        self.initialize_weights()  # DiT's init and sin-cos table (DiTBackbone); compile_blocks() too

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        t, y = check_inputs(self, x, t, y)
        h = self.x_embedder(x) + self.pos_embed  # B, T, D
        c = self.t_embedder(t) + self.y_embedder(y)  # B, D
        for block in self.blocks:
            h = block(h, c, self.feat_rope)  # B, T, D
        h = self.final_layer(h, c)  # B, T, p²·C_out
        return unpatchify(h, self.patch_size, self.out_channels)  # B, C_out, H, W


class SiT(DiT):
    """REPA's SiT (sihyun-yu/REPA ``models/sit.py``): DiT's blocks trained as a linear flow with raw
    t where t = 1 is the noise, and no σ head, so its released checkpoints load as they are (their
    ``projectors.*`` are REPA's training-only projector).  ``DiT`` here, whose t = 0 is the noise, is
    willisma/SiT's own convention: a ``dit-*`` flow generator is that SiT."""

    time_convention = "noise_at_1"


#################################################################################
#                                   DiT sizes                                   #
#################################################################################
# Registry name -> the DiT keyword arguments of that size; ``latentforge_generators.zoo`` registers
# one builder per row (``dit_xl_2`` for ``dit-xl-2``).  The data shape (``in_channels``,
# ``input_size``, ``num_classes``) is the caller's.  The paper's other patch sizes are a row with
# ``patch_size`` replaced: ``DiT(**{**SIZES["dit-xl-2"], "patch_size": 4})``.
SIZES: dict[str, dict] = {
    "dit-s-2": dict(depth=12, hidden_size=384, patch_size=2, num_heads=6),
    "dit-b-2": dict(depth=12, hidden_size=768, patch_size=2, num_heads=12),
    "dit-l-2": dict(depth=24, hidden_size=1024, patch_size=2, num_heads=16),
    "dit-xl-2": dict(depth=28, hidden_size=1152, patch_size=2, num_heads=16),
    # Tiny size for tests and CPU demos (not a published size).
    "test-dit": dict(depth=2, hidden_size=64, patch_size=2, num_heads=4),
    # REPA's SiT (class SiT): the same sizes; /1 for f16d32 latents as in REPA-E.
    "sit-s-2": dict(depth=12, hidden_size=384, patch_size=2, num_heads=6),
    "sit-b-2": dict(depth=12, hidden_size=768, patch_size=2, num_heads=12),
    "sit-l-2": dict(depth=24, hidden_size=1024, patch_size=2, num_heads=16),
    "sit-xl-2": dict(depth=28, hidden_size=1152, patch_size=2, num_heads=16),
    "sit-xl-1": dict(depth=28, hidden_size=1152, patch_size=1, num_heads=16),
    "test-sit": dict(depth=2, hidden_size=64, patch_size=2, num_heads=4),
}
