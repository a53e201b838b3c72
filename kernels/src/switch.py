"""When the Triton kernels run instead of the torch references."""

from __future__ import annotations

import importlib.util
import os

import torch


def triton_enabled(*tensors: torch.Tensor) -> bool:
    """True when ``DITCACHE_TRITON=1``, Triton is installed, and it can run on these tensors (CUDA, or
    the interpreter selected by ``TRITON_INTERPRET=1``)."""
    if os.environ.get("DITCACHE_TRITON") != "1" or importlib.util.find_spec("triton") is None:
        return False
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    return all(t.is_cuda or (interpreted and t.device.type == "cpu") for t in tensors)
