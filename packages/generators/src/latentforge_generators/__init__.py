"""latentforge-generators: generators: DiT, LightningDiT, DiT-DH, GPT, MaskGIT; flow-matching transport, samplers and guidance"""

__version__ = "0.1.0"
