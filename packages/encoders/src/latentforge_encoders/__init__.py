"""latentforge-encoders: frozen representation encoders (DINOv2 with and without registers, SigLIP2, MAE) with their preprocessing and feature selection"""

__version__ = "0.1.0"
