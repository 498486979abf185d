"""latentforge-encoders: frozen representation encoders (DINOv2 with and without registers, SigLIP2,
MAE) with their preprocessing and feature selection."""

from latentforge_encoders.convert import load_encoder, load_weights, read_source, save_encoder
from latentforge_encoders.encoder import PRESETS, FeatureSpec, FrozenEncoder, Preset
from latentforge_encoders.vit import VisionTransformer
from latentforge_encoders.zoo import SIZES, build_encoder

__version__ = "0.1.0"

__all__ = [
    "PRESETS",
    "SIZES",
    "FeatureSpec",
    "FrozenEncoder",
    "Preset",
    "VisionTransformer",
    "build_encoder",
    "load_encoder",
    "load_weights",
    "read_source",
    "save_encoder",
]
