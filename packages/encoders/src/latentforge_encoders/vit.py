"""The one Vision Transformer behind every encoder here: DINOv2 (± registers), SigLIP2, MAE, DINO.

The variations those checkpoints need are constructor switches, not subclasses: a CLS token or none
(SigLIP), 0 or 4 register tokens, LayerScale, a GELU or SwiGLU feed-forward (DINOv2-g), the LayerNorm
epsilon, and how learned position embeddings are resized to another token grid (bicubic; DINOv2's
official code offsets the scale by 0.1 without antialiasing, Hugging Face's registers model and timm
antialias).  Parameter names follow the official DINOv2/timm layout (``patch_embed.proj``,
``blocks.i.attn.qkv``, ``blocks.i.ls1.gamma``, ``norm`` …), so those checkpoints load almost as-is.
Attention and the feed-forwards are core's transformer kit (``latentforge_core.transformer``).

Token order in every block: ``[CLS?, registers…, patches…]``; registers carry no position embedding.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from latentforge_core.attention import attention
from latentforge_core.errors import InputError, check_divisible, check_int, check_ints, check_number
from latentforge_core.transformer import ACTIVATIONS, Attention, Mlp, SwiGLU, no_grad_needed


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kwargs) -> torch.Tensor:
    """The ViT's attention: core's ``attention``, looked up in this module at call time, so that
    replacing ``latentforge_encoders.vit.attention`` (another backend) reaches every block."""
    return attention(q, k, v, **kwargs)


def swiglu_hidden_dim(dim: int, mlp_ratio: float) -> int:
    """DINOv2's SwiGLU width: two thirds of the MLP width, rounded up to a multiple of 8."""
    return (int(int(dim * mlp_ratio) * 2 / 3) + 7) // 8 * 8


#################################################################################
#                                 Core ViT Layers                               #
#################################################################################


class PatchEmbed(nn.Module):
    """Non-overlapping patches → tokens, by a strided convolution."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        # contiguous: a channels-first view would hand its layout to every residual sum after it
        return rearrange(self.proj(x), "b c h w -> b (h w) c").contiguous()  # B, N, C


class LayerScale(nn.Module):
    """Per-channel scale of a residual branch, fused into the residual sum (one pass, not two)."""

    def __init__(self, dim: int, init_value: float):
        super().__init__()
        self.init_value = init_value
        self.gamma = nn.Parameter(torch.full((dim,), init_value))

    def add(self, x, branch, out=None):
        return torch.addcmul(x, branch, self.gamma, out=out)


class Block(nn.Module):
    """Pre-norm transformer block of core's kit parts, with optional LayerScale on both residual
    branches; on CPU the attention computes q, k, v as three products (inference's fast path)."""

    def __init__(self, dim, num_heads, mlp_hidden_dim, *, ffn, act, qkv_bias, layerscale_init, norm_eps):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, split_qkv_on_cpu=True, attend=attend)
        self.ls1 = LayerScale(dim, layerscale_init) if layerscale_init is not None else None
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = SwiGLU(dim, mlp_hidden_dim) if ffn == "swiglu" else Mlp(dim, mlp_hidden_dim, act)
        self.ls2 = LayerScale(dim, layerscale_init) if layerscale_init is not None else None

    def forward(self, x):
        x = self.residual(x, self.attn(self.norm1(x)), self.ls1)  # B, T, C
        return self.residual(x, self.mlp(self.norm2(x)), self.ls2)  # B, T, C

    @staticmethod
    def residual(x, branch, scale: LayerScale | None):
        """``x + scale·branch``; written over ``branch`` (a temporary) when no gradient is recorded,
        never over ``x``, which a caller may hold as a block output."""
        if no_grad_needed(x, branch, *([] if scale is None else [scale.gamma])):
            return branch.add_(x) if scale is None else scale.add(x, branch, out=branch)
        return x + branch if scale is None else scale.add(x, branch)


#################################################################################
#                                Vision Transformer                             #
#################################################################################


class VisionTransformer(nn.Module):
    """A plain ViT trunk. ``image_size`` fixes the learned position grid (the checkpoint's native
    resolution, 518 for DINOv2); any multiple of ``patch_size`` runs, the grid being resized."""

    def __init__(
        self,
        *,
        image_size: int = 224,
        patch_size: int = 14,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        mlp_hidden_dim: int | None = None,
        num_registers: int = 0,
        class_token: bool = True,
        layerscale_init: float | None = None,
        ffn: str = "mlp",
        act: str = "gelu",
        qkv_bias: bool = True,
        norm_eps: float = 1e-6,
        pos_antialias: bool = False,
        pos_offset: float = 0.0,
    ):
        super().__init__()
        owner = "VisionTransformer"
        check_ints(owner, image_size=image_size, patch_size=patch_size, in_chans=in_chans, depth=depth)
        check_ints(owner, embed_dim=embed_dim, num_heads=num_heads)
        check_int(num_registers, "num_registers", minimum=0, owner=owner)
        if mlp_hidden_dim is not None:
            check_int(mlp_hidden_dim, "mlp_hidden_dim", owner=owner)
        check_number(mlp_ratio, "mlp_ratio", low=0, low_open=True, owner=owner)
        check_number(norm_eps, "norm_eps", low=0, low_open=True, owner=owner)
        check_divisible(embed_dim, "embed_dim", num_heads, "num_heads", owner=owner)
        if ffn not in ("mlp", "swiglu"):
            raise InputError(f"ffn must be 'mlp' or 'swiglu', got {ffn!r}")
        if act not in ACTIVATIONS:
            raise InputError(f"act must be one of {sorted(ACTIVATIONS)}, got {act!r}")
        if image_size % patch_size:
            raise InputError(f"image_size {image_size} is not a multiple of patch_size {patch_size}")
        if mlp_hidden_dim is None:
            mlp_hidden_dim = (
                swiglu_hidden_dim(embed_dim, mlp_ratio) if ffn == "swiglu" else int(embed_dim * mlp_ratio)
            )
        self.config = dict(
            image_size=image_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim,
            depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio, mlp_hidden_dim=mlp_hidden_dim,
            num_registers=num_registers, class_token=class_token, layerscale_init=layerscale_init, ffn=ffn,
            act=act, qkv_bias=qkv_bias, norm_eps=norm_eps, pos_antialias=pos_antialias, pos_offset=pos_offset,
        )  # fmt: skip
        self.patch_size, self.in_chans, self.embed_dim, self.depth = patch_size, in_chans, embed_dim, depth
        self.num_registers, self.norm_eps = num_registers, norm_eps
        self.pos_antialias, self.pos_offset = pos_antialias, pos_offset
        self.grid_size = image_size // patch_size
        self.num_prefix_tokens = int(class_token) + num_registers

        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if class_token else None
        self.register_tokens = (
            nn.Parameter(torch.zeros(1, num_registers, embed_dim)) if num_registers else None
        )
        self.pos_embed = nn.Parameter(torch.zeros(1, int(class_token) + self.grid_size**2, embed_dim))
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_hidden_dim, ffn=ffn, act=act, qkv_bias=qkv_bias,
                  layerscale_init=layerscale_init, norm_eps=norm_eps)
            for _ in range(depth)
        )  # fmt: skip
        self.norm = nn.LayerNorm(embed_dim, eps=norm_eps)
        self.initialize_weights()

    def initialize_weights(self, generator: torch.Generator | None = None):
        """Random weights in the DINOv2 recipe (pretrained weights replace them when loaded)."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                nn.init.trunc_normal_(module.weight, std=0.02, generator=generator)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, LayerScale):
                nn.init.constant_(module.gamma, module.init_value)
        nn.init.trunc_normal_(self.pos_embed, std=0.02, generator=generator)
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=1e-6, generator=generator)
        if self.register_tokens is not None:
            nn.init.normal_(self.register_tokens, std=1e-6, generator=generator)

    # --------------------------------------------------------------------------- embedding
    def token_grid(self, height: int, width: int) -> tuple[int, int]:
        return height // self.patch_size, width // self.patch_size

    def interpolate_pos_embed(self, h: int, w: int) -> torch.Tensor:
        """Position embeddings for an ``h × w`` token grid (bicubic resize of the learned grid)."""
        if (h, w) == (self.grid_size, self.grid_size):
            return self.pos_embed
        n_cls = self.pos_embed.shape[1] - self.grid_size**2
        prefix, grid = self.pos_embed[:, :n_cls], self.pos_embed[:, n_cls:]
        grid = rearrange(grid, "1 (h w) c -> 1 c h w", h=self.grid_size).float()
        if self.pos_offset:  # official DINOv2: a scale factor nudged by the offset, not a target size
            g = self.grid_size
            size = dict(scale_factor=((h + self.pos_offset) / g, (w + self.pos_offset) / g))
        else:
            size = dict(size=(h, w))
        grid = F.interpolate(grid, mode="bicubic", align_corners=False, antialias=self.pos_antialias, **size)
        grid = rearrange(grid, "1 c h w -> 1 (h w) c").to(self.pos_embed.dtype)
        return torch.cat([prefix, grid], dim=1)  # 1, cls + h*w, C

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Preprocessed images ``[B, C, H, W]`` → the tokens entering block 0, ``[B, 1+R+N, C]``."""
        self.check_input(x)
        h, w = self.token_grid(*x.shape[-2:])
        tokens = self.patch_embed(x)  # B, N, C
        if self.cls_token is not None:
            tokens = torch.cat([self.cls_token.expand(len(x), -1, -1), tokens], dim=1)  # B, 1+N, C
        tokens = tokens + self.interpolate_pos_embed(h, w)
        if self.register_tokens is not None:
            registers = self.register_tokens.expand(len(x), -1, -1)
            n_cls = int(self.cls_token is not None)
            tokens = torch.cat([tokens[:, :n_cls], registers, tokens[:, n_cls:]], dim=1)  # B, 1+R+N, C
        return tokens

    def check_input(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor) or x.ndim != 4:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise InputError(f"expected images as a 4-D tensor [B, {self.in_chans}, H, W], got {shape}")
        if x.shape[1] != self.in_chans:
            raise InputError(
                f"expected {self.in_chans} input channels ([B, {self.in_chans}, H, W]), got {x.shape[1]} "
                f"(input shape {tuple(x.shape)})"
            )
        height, width = x.shape[-2:]
        if height % self.patch_size or width % self.patch_size:
            raise InputError(
                f"input size {height}x{width} is not a multiple of the patch size {self.patch_size}; "
                f"resize it first (a FrozenEncoder resizes to its preprocessing input size)"
            )

    # --------------------------------------------------------------------------- forward
    def resolve_layers(self, layers: int | Sequence[int]) -> tuple[int, ...]:
        """Block indices as non-negative ints (``-1`` = last block), validated."""
        layers = (layers,) if isinstance(layers, int) else tuple(layers)
        if not layers:
            raise InputError("layers must name at least one block")
        bad = [i for i in layers if not isinstance(i, int) or not -self.depth <= i < self.depth]
        if bad:
            raise InputError(f"block indices {bad} out of range for a ViT of depth {self.depth} "
                             f"(expected integers in [-{self.depth}, {self.depth - 1}])")  # fmt: skip
        return tuple(i % self.depth for i in layers)

    def forward_blocks(self, x: torch.Tensor, layers: int | Sequence[int] = (-1,)) -> list[torch.Tensor]:
        """Outputs of the requested blocks (before the final norm), ``[B, 1+R+N, C]`` each, in the order
        asked; the forward pass stops after the deepest one."""
        wanted = self.resolve_layers(layers)
        tokens, outputs = self.embed(x), {}
        for i, block in enumerate(self.blocks[: max(wanted) + 1]):
            tokens = block(tokens)  # B, T, C
            if i in wanted:
                outputs[i] = tokens
        return [outputs[i] for i in wanted]

    def apply_norm(self, tokens: torch.Tensor, mode: str = "affine") -> torch.Tensor:
        """The final LayerNorm: ``"affine"`` as trained, ``"no_affine"`` (RAE: standardise each token,
        weight and bias ignored) or ``"none"``."""
        if mode == "affine":
            return self.norm(tokens)
        if mode == "no_affine":
            return F.layer_norm(tokens, (self.embed_dim,), eps=self.norm_eps)
        if mode == "none":
            return tokens
        raise InputError(f"norm must be 'affine', 'no_affine' or 'none', got {mode!r}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """All tokens of the last block after the final norm, ``[B, 1+R+N, C]``."""
        return self.norm(self.forward_blocks(x, -1)[0])

    def flops(self, height: int, width: int) -> int:
        """Forward FLOPs for one image (2 per multiply-add; matmuls only)."""
        h, w = self.token_grid(height, width)
        n, c, hidden = self.num_prefix_tokens + h * w, self.embed_dim, self.config["mlp_hidden_dim"]
        ffn_in = 2 * hidden if self.config["ffn"] == "swiglu" else hidden
        per_block = 2 * n * (3 * c * c + c * c + c * ffn_in + hidden * c) + 2 * 2 * n * n * c
        return self.depth * per_block + 2 * h * w * c * self.in_chans * self.patch_size**2

    def extra_repr(self) -> str:
        return (f"patch_size={self.patch_size}, grid={self.grid_size}x{self.grid_size}, "
                f"registers={self.num_registers}, prefix_tokens={self.num_prefix_tokens}")  # fmt: skip
