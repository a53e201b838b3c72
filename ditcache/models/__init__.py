"""Models that diffusers does not ship, written as diffusers models (``ModelMixin``, ``ConfigMixin``)."""

from .opensora_vae import OpenSoraVAE
from .stdit3 import STDiT3Block, STDiT3Model

__all__ = ["OpenSoraVAE", "STDiT3Block", "STDiT3Model"]
