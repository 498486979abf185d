"""LightningDiT (Yao et al., 2025, VA-VAE paper): DiT with SwiGLU, RMSNorm and 2-D RoPE.

It keeps DiT's skeleton, names and initialisation (the frozen sin-cos table is still added even with
RoPE on), so it is the DiT class with LightningDiT's switches on by default.  Key-compatible with the
released ``hustvl/LightningDiT`` checkpoints (``{"model", "ema", ...}``; inference loads ``ema``), whose
default config is XL/1 on VA-VAE latents (32×16×16), no learned sigma, QK-norm off.  QK-norm
(RMSNorm over the head dim, ``attn.q_norm`` / ``attn.k_norm``) is the authors' advice against NaN
losses in long runs.
"""

from __future__ import annotations

from latentforge_generators.dit import DiT


#################################################################################
#                               LightningDiT Model                              #
#################################################################################
class LightningDiT(DiT):
    """DiT with LightningDiT's defaults; ``forward(x, t, y)`` is DiT's (t = 0 noise, t = 1 data)."""

    time_convention = "noise_at_0"

    def __init__(
        self,
        *,
        input_size: int = 16,
        in_channels: int = 32,
        learn_sigma: bool = False,
        use_rmsnorm: bool = True,
        use_swiglu: bool = True,
        use_rope: bool = True,
        use_qknorm: bool = False,
        **kwargs,
    ):
        super().__init__(
            input_size=input_size, in_channels=in_channels, learn_sigma=learn_sigma, use_rmsnorm=use_rmsnorm,
            use_swiglu=use_swiglu, use_rope=use_rope, use_qknorm=use_qknorm, **kwargs,
        )  # fmt: skip


class RAELightningDiT(LightningDiT):
    """RAE's own stage-2 LightningDiT (``stage2.models.lightningDiT.LightningDiT`` of the RAE code, the
    paper's plain "DiT-XL" on RAE latents): the same blocks, but time enters through RAE's Gaussian-
    Fourier features (``t_embedder.W`` in its state dicts, as in DiT-DH) in RAE's convention, t = 1
    noise, fed raw.  Defaults are RAE's: DINOv2-B latents, 768×16×16, patch 1; the sizes are
    LightningDiT's (``RAELightningDiT(**SIZES["lightningdit-xl-1"])`` is its 676 M-parameter XL).
    RAE released no weights of it, so it has no registry name; its files load with ``load_official``.
    """

    time_convention = "noise_at_1"

    def __init__(self, *, input_size: int = 16, in_channels: int = 768, **kwargs):
        super().__init__(input_size=input_size, in_channels=in_channels, time_embedding="fourier", **kwargs)


#################################################################################
#                               LightningDiT sizes                              #
#################################################################################
# Registry name -> the LightningDiT keyword arguments of that size; ``latentforge_generators.zoo``
# registers one builder per row (``lightningdit_xl_1`` for ``lightningdit-xl-1``).  The data shape
# is the caller's (the class defaults are VA-VAE's 32×16×16 latents); patch size 2 is a row with
# ``patch_size`` replaced.
SIZES: dict[str, dict] = {
    "lightningdit-b-1": dict(depth=12, hidden_size=768, patch_size=1, num_heads=12),
    "lightningdit-l-1": dict(depth=24, hidden_size=1024, patch_size=1, num_heads=16),
    "lightningdit-xl-1": dict(depth=28, hidden_size=1152, patch_size=1, num_heads=16),
    # Tiny size for tests and CPU demos (not a published size).
    "test-lightningdit": dict(depth=2, hidden_size=64, patch_size=1, num_heads=4),
}
