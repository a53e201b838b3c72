"""Row operations of a partial step: gather + LayerNorm + modulation of the selected tokens, and
scatter of their new branch output + gate + residual add over all tokens.

``flat`` indexes rows of the ``(batch * tokens, dim)`` view; ``count`` rows are selected per sequence.
``scale``, ``shift`` and ``gate`` are ``(batch, 1, dim)`` (or broadcastable to it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .switch import triton_enabled


def gather_modulate_reference(
    hidden_states: torch.Tensor,
    flat: torch.Tensor,
    count: int,
    scale: torch.Tensor,
    shift: torch.Tensor,
    eps: float,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``LayerNorm(hidden_states[rows]) * (1 + scale) + shift`` as ``(batch, count, dim)``."""
    batch, tokens, dim = hidden_states.shape
    rows = hidden_states.reshape(batch * tokens, dim).index_select(0, flat).view(batch, count, dim)
    return F.layer_norm(rows, (dim,), weight, bias, eps) * (1 + scale) + shift


def scatter_gate_residual_reference(
    residual: torch.Tensor, gate: torch.Tensor, cache: torch.Tensor, rows: torch.Tensor, flat: torch.Tensor
) -> torch.Tensor:
    """Write ``rows`` into the selected rows of ``cache`` (in place) and return ``residual + gate * cache``."""
    cache.view(-1, cache.shape[-1]).index_copy_(0, flat, rows.reshape(-1, rows.shape[-1]).to(cache.dtype))
    return torch.addcmul(residual, gate, cache)


def gather_modulate(hidden_states, flat, count, scale, shift, eps, weight=None, bias=None) -> torch.Tensor:
    if triton_enabled(hidden_states):
        from ._triton import gather_modulate_triton

        return gather_modulate_triton(hidden_states, flat, count, scale, shift, eps, weight, bias)
    return gather_modulate_reference(hidden_states, flat, count, scale, shift, eps, weight, bias)


def scatter_gate_residual(residual, gate, cache, rows, flat) -> torch.Tensor:
    if triton_enabled(residual, cache):
        from ._triton import scatter_gate_residual_triton

        return scatter_gate_residual_triton(residual, gate, cache, rows, flat)
    return scatter_gate_residual_reference(residual, gate, cache, rows, flat)
