"""latentforge-runner: recipes composing the registries into training, sampling and evaluation."""

__version__ = "0.1.0"
