"""Fused kernels for the cache hot path, each with a pure-torch reference.

The Triton versions are used only when switched on (``DITCACHE_TRITON=1``) and Triton can run the
tensors at hand: on a CUDA device, or anywhere under ``TRITON_INTERPRET=1`` (how CI tests them). They
stay off by default until GPU timings show they beat the torch path. This package imports nothing
from the rest of ditcache.
"""

from .attention_score import received_attention, received_attention_reference
from .rows import gather_modulate, gather_modulate_reference, scatter_gate_residual, scatter_gate_residual_reference
from .switch import triton_enabled

__all__ = [
    "received_attention",
    "received_attention_reference",
    "gather_modulate",
    "gather_modulate_reference",
    "scatter_gate_residual",
    "scatter_gate_residual_reference",
    "triton_enabled",
]
