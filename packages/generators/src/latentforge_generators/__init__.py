"""latentforge-generators: DiT, LightningDiT, DiT-DH, GPT, MaskGIT; flow-matching transport, samplers,
guidance."""

from latentforge_generators.digit_stage2 import DiGITStage2
from latentforge_generators.dit import DiT
from latentforge_generators.ditdh import DiTDH
from latentforge_generators.flow import FlowGenerator
from latentforge_generators.gpt import GPT
from latentforge_generators.guidance import CFG, AutoGuidance
from latentforge_generators.lightningdit import LightningDiT
from latentforge_generators.maskgit import MaskGIT
from latentforge_generators.transport import Transport

__version__ = "0.1.0"

__all__ = [
    "CFG",
    "GPT",
    "AutoGuidance",
    "DiGITStage2",
    "DiT",
    "DiTDH",
    "FlowGenerator",
    "LightningDiT",
    "MaskGIT",
    "Transport",
]
