"""latentforge-core: registries, protocols, checkpoint I/O, attention and device helpers."""

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

__version__ = "0.1.0"

__all__ = [
    "REGISTRIES",
    "CheckpointError",
    "Encoder",
    "Generator",
    "Metric",
    "PluginLoadError",
    "Preprocessing",
    "Recipe",
    "Registry",
    "RegistryError",
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
    "tokenizers",
]
