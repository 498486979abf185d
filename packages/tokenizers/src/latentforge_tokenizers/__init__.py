"""latentforge-tokenizers: tokenizers: K-Means over SSL features (DiGIT), VQGAN, VA-VAE, RAE, with LPIPS, discriminators and losses"""

__version__ = "0.1.0"
