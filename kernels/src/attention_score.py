"""The attention each key receives, ``s_j = sum_i mean_h softmax(q_i . K * scale)_j``, without the map.

Reference: query blocks of the probability map (at most ``SCORE_BLOCK_BYTES`` at once). Triton: two
passes over key blocks, first each query's log-sum-exp, then the column sums of
``exp(q . k * scale - lse)``; nothing larger than a tile is ever stored.
"""

from __future__ import annotations

import torch

from .switch import triton_enabled

SCORE_BLOCK_BYTES = 64 * 2**20


def query_block(batch: int, heads: int, keys: int, queries: int) -> int:
    """Queries per block so that a block of float32 probabilities stays under ``SCORE_BLOCK_BYTES``."""
    return max(1, min(queries, SCORE_BLOCK_BYTES // (batch * heads * keys * 4)))


def received_attention_reference(query: torch.Tensor, key: torch.Tensor, scale: float) -> torch.Tensor:
    """``(batch, heads, queries, dim)`` and ``(batch, heads, keys, dim)`` to ``(batch, keys)``, float32."""
    batch, heads, queries, _ = query.shape
    keys = key.shape[-2]
    key_t = key.float().transpose(-1, -2)
    query = query.float() * scale  # scaling the queries costs N x d, scaling the logits N x N
    received = torch.zeros(batch, keys, device=query.device, dtype=torch.float32)
    chunk = query_block(batch, heads, keys, queries)
    for start in range(0, queries, chunk):
        logits = torch.matmul(query[:, :, start : start + chunk], key_t)
        received += logits.softmax(dim=-1).sum(dim=2).mean(dim=1)
    return received


def received_attention(query: torch.Tensor, key: torch.Tensor, scale: float) -> torch.Tensor:
    if triton_enabled(query, key):
        from ._triton import received_attention_triton

        return received_attention_triton(query, key, scale)
    return received_attention_reference(query, key, scale)
