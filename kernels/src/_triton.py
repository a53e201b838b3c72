"""Triton implementations; imported only when ``triton_enabled`` says they may run."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_QUERIES = 32
BLOCK_KEYS = 32


@triton.jit
def _query_lse_kernel(Q, K, LSE, queries, keys, head_dim, scale,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    block, sequence = tl.program_id(0), tl.program_id(1)
    rows = block * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    q = tl.load(Q + sequence * queries * head_dim + rows[:, None] * head_dim + dims[None, :],
                mask=(rows[:, None] < queries) & (dims[None, :] < head_dim), other=0.0).to(tl.float32)
    running_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
    running_sum = tl.zeros([BLOCK_M], tl.float32)
    for start in range(0, keys, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        k = tl.load(K + sequence * keys * head_dim + cols[:, None] * head_dim + dims[None, :],
                    mask=(cols[:, None] < keys) & (dims[None, :] < head_dim), other=0.0).to(tl.float32)
        logits = tl.dot(q, tl.trans(k)) * scale
        logits = tl.where(cols[None, :] < keys, logits, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(logits, 1))
        running_sum = running_sum * tl.exp(running_max - new_max) + tl.sum(tl.exp(logits - new_max[:, None]), 1)
        running_max = new_max
    tl.store(LSE + sequence * queries + rows, running_max + tl.log(running_sum), mask=rows < queries)


@triton.jit
def _received_kernel(Q, K, LSE, OUT, queries, keys, head_dim, scale,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    block, sequence = tl.program_id(0), tl.program_id(1)
    cols = block * BLOCK_N + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    k = tl.load(K + sequence * keys * head_dim + cols[:, None] * head_dim + dims[None, :],
                mask=(cols[:, None] < keys) & (dims[None, :] < head_dim), other=0.0).to(tl.float32)
    total = tl.zeros([BLOCK_N], tl.float32)
    for start in range(0, queries, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        q = tl.load(Q + sequence * queries * head_dim + rows[:, None] * head_dim + dims[None, :],
                    mask=(rows[:, None] < queries) & (dims[None, :] < head_dim), other=0.0).to(tl.float32)
        lse = tl.load(LSE + sequence * queries + rows, mask=rows < queries, other=float("inf"))
        probs = tl.exp(tl.dot(q, tl.trans(k)) * scale - lse[:, None])
        total += tl.sum(tl.where(rows[:, None] < queries, probs, 0.0), 0)
    tl.store(OUT + sequence * keys + cols, total, mask=cols < keys)


def received_attention_triton(query: torch.Tensor, key: torch.Tensor, scale: float) -> torch.Tensor:
    batch, heads, queries, head_dim = query.shape
    keys = key.shape[-2]
    q = query.reshape(batch * heads, queries, head_dim).contiguous()
    k = key.reshape(batch * heads, keys, head_dim).contiguous()
    lse = torch.empty(batch * heads, queries, device=q.device, dtype=torch.float32)
    out = torch.empty(batch * heads, keys, device=q.device, dtype=torch.float32)
    block_d = max(16, triton.next_power_of_2(head_dim))
    _query_lse_kernel[(triton.cdiv(queries, BLOCK_QUERIES), batch * heads)](
        q, k, lse, queries, keys, head_dim, scale, BLOCK_M=BLOCK_QUERIES, BLOCK_N=BLOCK_KEYS, BLOCK_D=block_d
    )
    _received_kernel[(triton.cdiv(keys, BLOCK_KEYS), batch * heads)](
        q, k, lse, out, queries, keys, head_dim, scale, BLOCK_M=BLOCK_QUERIES, BLOCK_N=BLOCK_KEYS, BLOCK_D=block_d
    )
    return out.view(batch, heads, keys).mean(dim=1)


@triton.jit
def _gather_modulate_kernel(X, FLAT, SCALE, SHIFT, WEIGHT, BIAS, OUT, count, dim, eps,
                            HAS_AFFINE: tl.constexpr, BLOCK_D: tl.constexpr):
    row = tl.program_id(0)
    sequence = row // count
    source = tl.load(FLAT + row)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < dim
    x = tl.load(X + source * dim + cols, mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, 0) / dim
    centred = tl.where(mask, x - mean, 0.0)
    y = centred * tl.rsqrt(tl.sum(centred * centred, 0) / dim + eps)
    if HAS_AFFINE:
        y = y * tl.load(WEIGHT + cols, mask=mask, other=1.0).to(tl.float32) + tl.load(BIAS + cols, mask=mask, other=0.0).to(tl.float32)
    scale = tl.load(SCALE + sequence * dim + cols, mask=mask, other=0.0).to(tl.float32)
    shift = tl.load(SHIFT + sequence * dim + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(OUT + row * dim + cols, (y * (1.0 + scale) + shift).to(OUT.dtype.element_ty), mask=mask)


def gather_modulate_triton(hidden_states, flat, count, scale, shift, eps, weight=None, bias=None) -> torch.Tensor:
    batch, tokens, dim = hidden_states.shape
    x = hidden_states.contiguous()
    out = torch.empty(batch, count, dim, device=x.device, dtype=x.dtype)
    scale = scale.expand(batch, 1, dim).reshape(batch, dim).contiguous()
    shift = shift.expand(batch, 1, dim).reshape(batch, dim).contiguous()
    affine = weight is not None
    _gather_modulate_kernel[(batch * count,)](
        x, flat, scale, shift, weight if affine else scale, bias if affine else shift, out, count, dim, eps,
        HAS_AFFINE=affine, BLOCK_D=triton.next_power_of_2(dim),
    )
    return out


@triton.jit
def _scatter_gate_residual_kernel(RESIDUAL, GATE, CACHE, ROWS, SLOT, OUT, tokens, dim, BLOCK_D: tl.constexpr):
    row = tl.program_id(0)
    sequence = row // tokens
    slot = tl.load(SLOT + row)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < dim
    selected = slot >= 0
    cached = tl.load(CACHE + row * dim + cols, mask=mask, other=0.0)
    fresh = tl.load(ROWS + tl.maximum(slot, 0) * dim + cols, mask=mask & selected, other=0.0)
    value = tl.where(selected, fresh.to(cached.dtype), cached)
    tl.store(CACHE + row * dim + cols, value, mask=mask & selected)
    residual = tl.load(RESIDUAL + row * dim + cols, mask=mask, other=0.0).to(tl.float32)
    gate = tl.load(GATE + sequence * dim + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(OUT + row * dim + cols, (residual + gate * value.to(tl.float32)).to(OUT.dtype.element_ty), mask=mask)


def scatter_gate_residual_triton(residual, gate, cache, rows, flat) -> torch.Tensor:
    batch, tokens, dim = cache.shape
    slots = torch.full((batch * tokens,), -1, device=cache.device, dtype=torch.int64)
    slots[flat] = torch.arange(flat.numel(), device=cache.device)
    out = torch.empty_like(cache)
    gate = gate.expand(batch, 1, dim).reshape(batch, dim).contiguous()
    _scatter_gate_residual_kernel[(batch * tokens,)](
        residual.contiguous(), gate, cache, rows.contiguous(), slots, out, tokens, dim, BLOCK_D=triton.next_power_of_2(dim)
    )
    return out
