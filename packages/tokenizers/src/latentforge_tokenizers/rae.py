"""RAE (Zheng et al. 2025): a frozen representation encoder + a trained MAE-style ViT decoder.

The latent is the encoder's last-layer patch-token map after a LayerNorm without affine (the
registry's ``features="rae"``).  The decoder keeps the released ``GeneralDecoder`` key layout
(HF ViT-MAE layer names) so released ``model.pt`` decoders load strictly.  During decoder
training the latent is noised (``noise_tau``; the code's σ ~ τ·U(0, 1) or the paper's σ ~ |N(0, τ²)|);
latent statistics are per element ``[C, H, W]`` and loadable from the released ``stat.pt``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from latentforge_core import attention, registry
from latentforge_core.checkpoint import (
    CheckpointError,
    load_checkpoint,
    load_into,
    load_state_file,
    save_checkpoint,
)
from latentforge_core.errors import InputError, StateError, check_divisible, check_ints, check_number
from latentforge_core.protocols import Preprocessing
from latentforge_core.transformer import sincos_pos_embed_2d
from latentforge_encoders.encoder import FeatureSpec
from latentforge_tokenizers.stats import LatentStats, compute_latent_stats, stats_path
from latentforge_tokenizers.vavae import check_images

NOISE_LAWS = ("code", "paper")  # σ ~ τ·U(0, 1) (released code) | σ ~ |N(0, τ²)| (paper text)


#################################################################################
#                                   Decoder                                     #
#################################################################################


class _SelfAttention(nn.Module):
    """Holds HF ViT-MAE's separate ``query``/``key``/``value`` (no forward): the released decoders'
    key layout, which the kit's fused-``qkv`` Attention would change; ``DecoderLayer`` attends."""

    def __init__(self, dim: int):
        super().__init__()
        self.query, self.key, self.value = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)


class _Dense(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.dense = nn.Linear(cin, cout)


class DecoderLayer(nn.Module):
    """Pre-LN ViT layer with HF ViT-MAE names (``attention.attention.query`` …, exact GELU)."""

    def __init__(self, dim: int, num_heads: int, mlp_dim: int, eps: float):
        super().__init__()
        self.num_heads = num_heads
        self.attention = nn.Module()
        self.attention.attention = _SelfAttention(dim)
        self.attention.output = _Dense(dim, dim)
        self.intermediate = _Dense(dim, mlp_dim)
        self.output = _Dense(mlp_dim, dim)
        self.layernorm_before = nn.LayerNorm(dim, eps=eps)
        self.layernorm_after = nn.LayerNorm(dim, eps=eps)

    def forward(self, x):
        h = self.layernorm_before(x)
        att = self.attention.attention
        q, k, v = (
            rearrange(f(h), "b n (h d) -> b h n d", h=self.num_heads) for f in (att.query, att.key, att.value)
        )
        h = rearrange(attention(q, k, v), "b h n d -> b n (h d)")  # B N D
        x = x + self.attention.output.dense(h)
        h = F.gelu(self.intermediate.dense(self.layernorm_after(x)))  # B N mlp
        return x + self.output.dense(h)  # B N D


class RAEDecoder(nn.Module):
    """Encoder tokens ``[B, N, C]`` → pixel patches ``[B, N, p·p·3]`` (``unpatchify`` → image)."""

    def __init__(
        self,
        *,
        latent_dim: int = 768,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_dim: int = 4096,
        patch_size: int = 16,
        num_patches: int = 256,
        eps: float = 1e-12,
    ):
        super().__init__()
        check_ints(
            "RAEDecoder", latent_dim=latent_dim, hidden_size=hidden_size, depth=depth, num_heads=num_heads,
            mlp_dim=mlp_dim, patch_size=patch_size, num_patches=num_patches,
        )  # fmt: skip
        check_number(eps, "eps", low=0, low_open=True, owner="RAEDecoder")
        check_divisible(hidden_size, "hidden_size", num_heads, "num_heads", owner="RAEDecoder")
        self.grid = math.isqrt(num_patches)
        if self.grid**2 != num_patches:
            raise InputError(f"num_patches must be a square, got {num_patches}")
        self.patch_size, self.num_patches, self.latent_dim = patch_size, num_patches, latent_dim
        self.decoder_embed = nn.Linear(latent_dim, hidden_size)
        self.trainable_cls_token = nn.Parameter(torch.zeros(1, 1, hidden_size))
        table = sincos_pos_embed_2d(hidden_size, self.grid, extra_tokens=1)  # MAE's; zero row for CLS
        self.register_buffer("decoder_pos_embed", table[None])  # 1, 1+N, D
        self.decoder_layers = nn.ModuleList(
            DecoderLayer(hidden_size, num_heads, mlp_dim, eps) for _ in range(depth)
        )
        self.decoder_norm = nn.LayerNorm(hidden_size, eps=eps)
        self.decoder_pred = nn.Linear(hidden_size, patch_size**2 * 3)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.zeros_(self.trainable_cls_token)

    @property
    def image_size(self) -> int:
        return self.grid * self.patch_size

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.decoder_embed(tokens)  # B N D
        x = (
            torch.cat([self.trainable_cls_token.expand(len(x), -1, -1), x], dim=1) + self.decoder_pos_embed
        )  # B 1+N D
        for layer in self.decoder_layers:
            x = layer(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:]  # B N p*p*3

    def unpatchify(self, patches: torch.Tensor) -> torch.Tensor:
        return rearrange(
            patches, "b (h w) (p q c) -> b c (h p) (w q)", h=self.grid, p=self.patch_size, q=self.patch_size
        )

    def flops(self) -> int:
        """Forward FLOPs per image (2 per multiply-add, matmuls only)."""
        n, d = self.num_patches + 1, self.decoder_embed.out_features
        mlp = self.decoder_layers[0].intermediate.dense.out_features
        per_layer = 2 * n * (4 * d * d + 2 * d * mlp) + 2 * 2 * n * n * d
        return len(self.decoder_layers) * per_layer + 2 * n * d * (
            self.latent_dim + self.decoder_pred.out_features
        )


#################################################################################
#                                 The tokenizer                                 #
#################################################################################


class RAE(nn.Module):
    """Frozen ``encoder`` (images in [0, 1] → ``[B, C, h, w]``) + trainable ``decoder``."""

    def __init__(
        self,
        encoder: nn.Module,
        decoder: RAEDecoder,
        *,
        noise_tau: float = 0.0,
        noise_law: str = "code",
        stats: LatentStats | None = None,
        config: Mapping[str, Any] | None = None,
    ):
        super().__init__()
        if noise_law not in NOISE_LAWS:
            raise InputError(f"noise_law must be one of {NOISE_LAWS}, got {noise_law!r}")
        check_number(noise_tau, "noise_tau", low=0, owner="RAE")
        c, h, w = encoder.feature_shape()
        if (c, h * w) != (decoder.latent_dim, decoder.num_patches):
            raise InputError(
                f"encoder latent {(c, h, w)} does not fit a decoder for {decoder.num_patches} tokens "
                f"of width {decoder.latent_dim}"
            )
        self.encoder = encoder.requires_grad_(False).eval()
        self.decoder = decoder
        self.noise_tau, self.noise_law = noise_tau, noise_law
        self.config = dict(config or {})
        self.preprocessing = Preprocessing(decoder.image_size, resize=encoder.preprocessing.resize)
        self.register_buffer(
            "pixel_mean", torch.tensor(encoder.preprocessing.mean).view(1, 3, 1, 1), persistent=False
        )
        self.register_buffer(
            "pixel_std", torch.tensor(encoder.preprocessing.std).view(1, 3, 1, 1), persistent=False
        )
        self.stats: LatentStats | None = None
        self.set_stats(stats)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return (self.decoder.latent_dim, self.decoder.grid, self.decoder.grid)

    can_decode = True

    @property
    def vocab_size(self) -> None:
        return None

    def set_stats(self, stats: LatentStats | None) -> None:
        if stats is not None and stats.shape not in (self.latent_shape, (self.latent_shape[0], 1, 1)):
            raise InputError(
                f"latent statistics of shape {stats.shape} do not fit latents of shape {self.latent_shape} "
                "of this RAE tokenizer (statistics of another tokenizer?)"
            )
        self.stats = stats

    def _stats_or_raise(self) -> LatentStats:
        if self.stats is None:
            raise StateError("no latent statistics: compute them (RAE.compute_stats) or load stat.pt first")
        return self.stats

    # ----------------------------------------------------------------------------- encode / decode
    def noise(self, z: torch.Tensor) -> torch.Tensor:
        """z + σ·ε with a per-sample σ from the chosen law (decoder training only)."""
        shape = (len(z),) + (1,) * (z.ndim - 1)
        u = (
            torch.rand(shape, device=z.device, dtype=z.dtype)
            if self.noise_law == "code"
            else torch.randn(shape, device=z.device, dtype=z.dtype).abs()
        )
        return z + self.noise_tau * u * torch.randn_like(z)

    def encode(self, images: torch.Tensor, *, normalize: bool = False) -> torch.Tensor:
        """[0, 1] images → latents ``[B, C, h, w]``; noised in training mode when ``noise_tau > 0``."""
        check_images(images, 1, "RAE.encode")
        with torch.no_grad():
            z = self.encoder(images)  # B C h w
        if self.training and self.noise_tau > 0:
            z = self.noise(z)
        return self._stats_or_raise().normalize(z) if normalize else z

    def reconstruct(self, latents: torch.Tensor) -> torch.Tensor:
        """Raw latents → images in [0, 1] space, unclamped (training uses this)."""
        if latents.ndim != 4 or tuple(latents.shape[1:]) != self.latent_shape:
            raise InputError(
                f"RAE expects latents [B, {', '.join(map(str, self.latent_shape))}], "
                f"got {tuple(latents.shape)}"
            )
        patches = self.decoder(rearrange(latents, "b c h w -> b (h w) c"))  # B N p*p*3
        return self.decoder.unpatchify(patches) * self.pixel_std + self.pixel_mean  # B 3 H W

    def decode(self, latents: torch.Tensor, *, normalize: bool = False) -> torch.Tensor:
        """Latents → [0, 1] images; ``normalize=True`` says the latents are normalised (undo it first)."""
        if normalize:
            self._stats_or_raise().check(latents)
            latents = self.stats.denormalize(latents)
        return self.reconstruct(latents).clamp(0, 1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Training pass: images → (noised) latents → reconstruction, unclamped."""
        return self.reconstruct(self.encode(images))

    def compute_stats(self, batches, *, with_mean: bool = True, eps: float = 1e-5) -> LatentStats:
        """Exact per-element statistics over ``batches`` of [0, 1] images (no noise), set and returned."""
        was = self.training
        self.eval()
        stats = compute_latent_stats(self.encode, batches, reduce="element", with_mean=with_mean, eps=eps)
        self.train(was)
        self.set_stats(stats)
        return stats

    # ----------------------------------------------------------------------------- checkpoints
    def load_decoder(self, source: str | os.PathLike | Mapping[str, torch.Tensor]) -> None:
        """A decoder-only state dict (the released ``model.pt``), strictly."""
        sd = _read(source)
        if not any(k.startswith("decoder_") for k in sd):
            raise CheckpointError(
                f"{_name(source)} is not a decoder-only checkpoint (keys like {sorted(sd)[:3]}); a full "
                "RAE or training checkpoint ({model, ema, …} or 'decoder.*' keys) goes to RAE.load_full, "
                "or extract its "
                "decoder with extract_decoder_state"
            )
        load_into(self.decoder, sd)

    def load_full(self, source: str | os.PathLike | Mapping[str, torch.Tensor], use_ema: bool = True) -> None:
        """A whole-RAE state dict or training checkpoint; its decoder part is loaded strictly."""
        sd = _read(source)
        if any(k.startswith("decoder_") for k in sd):
            raise CheckpointError(
                f"{_name(source)} is a decoder-only checkpoint (keys 'decoder_embed…' without a "
                "'decoder.' prefix), "
                "but a full RAE checkpoint was expected; load it with RAE.load_decoder (pretrained_decoder=…)"
            )
        load_into(self.decoder, extract_decoder_state(sd, use_ema=use_ema))

    def save(self, path: str | os.PathLike) -> Path:
        """Our checkpoint: decoder weights + config (encoder by registry name); stats beside it."""
        path = save_checkpoint(self.decoder.state_dict(), path, {"kind": "rae-decoder", **self.config})
        if self.stats is not None:
            self.stats.save(stats_path(path))
        return path


def extract_decoder_state(sd: Mapping[str, Any], use_ema: bool = True) -> dict[str, torch.Tensor]:
    """The decoder's state dict out of a training checkpoint (``ema``/``model``) or a full RAE state
    dict (``decoder.*`` keys, ``module.``/``_orig_mod.`` prefixes stripped)."""
    if "ema" in sd or "model" in sd:
        sd = sd["ema"] if use_ema and "ema" in sd else sd["model"]
    out = {}
    for key, value in sd.items():
        key = key.replace("module.", "").replace("_orig_mod.", "")
        if key.startswith("decoder."):
            out[key[len("decoder.") :]] = value
    if not out:
        raise CheckpointError(
            f"no 'decoder.*' keys found (got e.g. {sorted(sd)[:4]}); is this an RAE checkpoint?"
        )
    return out


def _read(source) -> dict[str, Any]:
    return dict(source) if isinstance(source, Mapping) else _read_file(source)


def _read_file(path) -> dict[str, Any]:
    path = Path(path)
    return load_checkpoint(path)[0] if path.suffix == ".safetensors" else load_state_file(path)


def _name(source) -> str:
    return "the given state dict" if isinstance(source, Mapping) else str(source)


#################################################################################
#                                 Named sizes                                   #
#################################################################################

RAE_DECODERS = {
    "ViT-B": dict(hidden_size=768, depth=12, num_heads=12, mlp_dim=3072),
    "ViT-L": dict(hidden_size=1024, depth=24, num_heads=16, mlp_dim=4096),
    "ViT-XL": dict(hidden_size=1152, depth=28, num_heads=16, mlp_dim=4096),
    "test-tiny": dict(hidden_size=64, depth=2, num_heads=4, mlp_dim=128),
}


def build_rae(
    encoder: str = "dinov2-vitb14-reg",
    decoder: str = "ViT-XL",
    *,
    image_size: int = 256,
    features: Any = "rae",
    encoder_kwargs: Mapping[str, Any] | None = None,
    pretrained_decoder: str | os.PathLike | None = None,
    checkpoint: str | os.PathLike | None = None,
    stats: str | os.PathLike | None = None,
    noise_tau: float = 0.0,
    noise_law: str = "code",
) -> RAE:
    """Encoder from the registry + a named decoder.  ``pretrained_decoder``: a decoder-only file (the
    released ``model.pt`` or ours); ``checkpoint``: a full RAE/training checkpoint; ``stats``: ``stat.pt``
    or our artifact (default: the one beside the weights file)."""
    if decoder not in RAE_DECODERS:
        raise InputError(f"unknown RAE decoder {decoder!r}; expected one of {sorted(RAE_DECODERS)}")
    enc = registry.encoders.build(encoder, features=features, **dict(encoder_kwargs or {}))
    c, h, w = enc.feature_shape()
    if image_size % h:
        raise InputError(f"image_size {image_size} is not a multiple of the latent grid {h}")
    dec = RAEDecoder(latent_dim=c, patch_size=image_size // h, num_patches=h * w, **RAE_DECODERS[decoder])
    config = dict(
        encoder=encoder, decoder=decoder, image_size=image_size, noise_tau=noise_tau, noise_law=noise_law
    )
    model = RAE(enc, dec, noise_tau=noise_tau, noise_law=noise_law, config=config)
    if pretrained_decoder is not None:
        model.load_decoder(pretrained_decoder)
    if checkpoint is not None:
        model.load_full(checkpoint)
    weights = pretrained_decoder or checkpoint
    if stats is None and weights is not None and stats_path(weights).is_file():
        stats = stats_path(weights)
    if stats is not None:
        model.set_stats(LatentStats.load(stats))
    return model.eval()


# Registry name -> the ``build_rae`` keyword arguments of that model (its decoder a key of
# ``RAE_DECODERS``); one builder per row below.
SIZES: dict[str, dict] = {
    # DINOv2-B with registers (224 px) → 768×16×16 → ViT-XL decoder → 256 px, as released.
    "rae": dict(encoder="dinov2-vitb14-reg", decoder="ViT-XL", image_size=256, features="rae"),
    # test-vit-tiny at 32 px (8×8 tokens of width 64, LayerNorm without affine) + a 2-layer decoder.
    "test-rae-tiny": dict(
        encoder="test-vit-tiny",
        decoder="test-tiny",
        image_size=32,
        features=FeatureSpec((-1,), "no_affine", "map"),
    ),
}


def rae(**kw) -> RAE:
    return build_rae(**{**SIZES["rae"], **kw})


def tiny_rae(**kw) -> RAE:
    return build_rae(**{**SIZES["test-rae-tiny"], **kw})
