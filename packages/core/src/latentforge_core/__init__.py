"""latentforge-core: registries, protocols, checkpoint I/O, attention, the transformer kit and device
helpers."""

from latentforge_core.attention import attention
from latentforge_core.checkpoint import CheckpointError, load_checkpoint, load_into, save_checkpoint
from latentforge_core.device import autocast, resolve_device, seed_everything
from latentforge_core.protocols import Encoder, Generator, Metric, Preprocessing, Recipe, Tokenizer
from latentforge_core.registry import (
    REGISTRIES,
    PluginLoadError,
    Registry,
    RegistryError,
    encoders,
    generators,
    metrics,
    recipes,
    tokenizers,
)
from latentforge_core.transformer import (
    Attention,
    KVCache,
    Mlp,
    RMSNorm,
    RoPE2D,
    RotaryEmbedding,
    SwiGLU,
    sincos_pos_embed_1d,
    sincos_pos_embed_2d,
)

__version__ = "0.1.0"

__all__ = [
    "REGISTRIES",
    "Attention",
    "CheckpointError",
    "Encoder",
    "Generator",
    "KVCache",
    "Metric",
    "Mlp",
    "PluginLoadError",
    "Preprocessing",
    "RMSNorm",
    "Recipe",
    "Registry",
    "RegistryError",
    "RoPE2D",
    "RotaryEmbedding",
    "SwiGLU",
    "Tokenizer",
    "attention",
    "autocast",
    "encoders",
    "generators",
    "load_checkpoint",
    "load_into",
    "metrics",
    "recipes",
    "resolve_device",
    "save_checkpoint",
    "seed_everything",
    "sincos_pos_embed_1d",
    "sincos_pos_embed_2d",
    "tokenizers",
]
