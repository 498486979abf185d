"""latentforge-runner: recipes that compose the registries into training, sampling and evaluation; data, DDP, CLI and configs"""

__version__ = "0.1.0"
