"""Token scores: which tokens a partial step recomputes.

Pure tensor functions on ``(batch, heads, tokens, head_dim)`` projections and ``(batch, tokens)``
scores. Higher score, higher priority to recompute. Nothing here knows a model class.
"""

from __future__ import annotations

import math

import torch

from .kernels import attention_score, received_attention

SCORES: dict[str, tuple[str, ...]] = {
    "attention": ("query", "key"),
    "cross_attention_entropy": ("cross_query", "cross_key"),
    "k_norm": ("key",),
    "v_norm": ("value",),
    "random": (),
    "forecast_error": (),
}
"""Each score and the projections it reads: the taps an adapter must capture for it."""

MEASURED_SCORES = ("forecast_error",)
"""Scores the engine measures instead of reading projections: ``forecast_error``, each token's squared error of its
branches' forecast (or kept value) at the last full step, summed over channels and the branches of its group: a
partial step recomputes the tokens its cache served worst (block adapters)."""

SELF_ATTENTION_SCORES = tuple(name for name, reads in SCORES.items() if reads and not any(r.startswith("cross_") for r in reads))
"""The scores read from a block's own attention: with ``random``, all a block without cross-attention can give."""


def token_scores(
    score: str,
    projections: dict[str, torch.Tensor],
    *,
    scale: float | None = None,
    bias: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    shape: tuple[int, int] | None = None,
) -> tuple[torch.Tensor, int]:
    """Each token's ``score`` from the ``(batch, heads, tokens, head_dim)`` projections ``SCORES`` names for
    it, and the FLOPs it cost. ``scale`` is the attention's softmax scale (default ``head_dim ** -0.5``),
    ``bias`` the cross-attention mask; ``random`` draws ``shape = (batch, tokens)`` from ``generator``."""
    if score in MEASURED_SCORES:
        raise ValueError(f"score={score!r} is measured by the engine on full steps, not read from projections.")
    if score == "random":
        return random_scores(*shape, generator), 0
    if score in ("k_norm", "v_norm"):
        (name,) = SCORES[score]
        return projection_norm(projections[name]), 0
    query, key = (projections[name] for name in SCORES[score])
    scale = scale if scale is not None else query.shape[-1] ** -0.5
    flops = 2 * query.numel() * key.shape[-2]
    if score == "attention":
        return attention_received(query, key, scale), flops
    return cross_attention_entropy(query, key, scale, bias), flops


def attention_received(query: torch.Tensor, key: torch.Tensor, scale: float) -> torch.Tensor:
    """Column sums of the head-averaged softmax attention map, ``s_j = sum_i mean_h A[h, i, j]``,
    computed without the whole ``N x N`` map (see ``ditcache.kernels.received_attention``)."""
    return received_attention(query, key, scale)


def cross_attention_entropy(
    query: torch.Tensor, key: torch.Tensor, scale: float, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """Entropy of each image token's head-averaged attention over the text tokens, plus one.

    ``bias`` is the additive cross-attention mask, broadcastable to ``(batch, 1, 1, text_tokens)``.
    """
    batch, heads, tokens, _ = query.shape
    key_t = key.float().transpose(-1, -2)
    query = query.float() * scale
    entropy = torch.empty(batch, tokens, device=query.device, dtype=torch.float32)
    chunk = attention_score.query_block(batch, heads, key.shape[-2], tokens)
    for start in range(0, tokens, chunk):
        logits = torch.matmul(query[:, :, start : start + chunk], key_t)
        if bias is not None:
            logits = logits + bias.float()
        probs = logits.softmax(dim=-1).mean(dim=1)
        entropy[:, start : start + chunk] = -(probs * torch.log(probs + 1e-7)).sum(dim=-1)
    return 1.0 + entropy


def projection_norm(projection: torch.Tensor) -> torch.Tensor:
    """L2 norm of each token's key or value, averaged over heads."""
    return projection.float().norm(dim=-1).mean(dim=1)


def random_scores(batch: int, tokens: int, generator: torch.Generator) -> torch.Tensor:
    """Uniform scores from a seeded generator (on the generator's device)."""
    return torch.rand(batch, tokens, generator=generator, device=generator.device)


def l2_normalize(scores: torch.Tensor) -> torch.Tensor:
    """Scale each row to unit L2 norm so score terms of different origin are comparable."""
    return scores / scores.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def frequency_term(since_recompute: torch.Tensor, weight: float, interval: int) -> torch.Tensor:
    """ToCa's cache-frequency score: steps since each token was last computed, over the base interval N
    (as published, not the interval in force), times its weight."""
    return weight * since_recompute.float() / interval


def merge_guidance_halves(scores: torch.Tensor) -> torch.Tensor:
    """Average the two halves of a classifier-free-guidance batch so both select the same tokens."""
    first, second = scores.chunk(2, dim=0)
    return (first + second) / 2


def spatial_bonus(scores: torch.Tensor, grid: tuple[int, int], cell: int, bonus: float) -> torch.Tensor:
    """Raise the best token of each ``cell x cell`` patch of the token grid by ``bonus`` times that
    cell's maximum, i.e. multiply the cell winner's score by ``1 + bonus`` (the published rule), so
    that selections spread over the image.

    ``grid`` is ``(height, width)`` in tokens; any size works (edge cells are smaller).
    """
    if bonus == 0.0:
        return scores
    height, width = grid
    batch = scores.shape[0]
    cells_h, cells_w = math.ceil(height / cell), math.ceil(width / cell)
    padded = scores.new_full((batch, cells_h * cell, cells_w * cell), float("-inf"))
    padded[:, :height, :width] = scores.view(batch, height, width)
    blocks = padded.view(batch, cells_h, cell, cells_w, cell).permute(0, 1, 3, 2, 4).reshape(batch, -1, cell * cell)
    best_score, best = blocks.max(dim=-1)
    rows = torch.arange(cells_h, device=scores.device).repeat_interleave(cells_w) * cell + best // cell
    cols = torch.arange(cells_w, device=scores.device).repeat(cells_h) * cell + best % cell
    winners = rows * width + cols
    return scores.scatter_add(1, winners, (bonus * best_score).to(scores.dtype))


def top_tokens(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Indices of the ``count`` highest-scoring tokens of each row."""
    return scores.topk(count, dim=-1, sorted=False).indices


def random_count(count: int, share: float) -> int:
    """How many of ``count`` chosen tokens are drawn at random (at least one when ``share`` > 0)."""
    return min(count, max(1, round(share * count))) if share > 0 and count else 0


def top_and_random_tokens(scores: torch.Tensor, count: int, drawn: int, generator: torch.Generator) -> torch.Tensor:
    """``count - drawn`` highest-scoring tokens of each row, then ``drawn`` others drawn uniformly at random:
    the random ones last, so that an error measured on them is unbiased for the tokens left cached."""
    top = top_tokens(scores, count - drawn)
    if not drawn:
        return top
    noise = torch.rand(scores.shape, generator=generator, device=generator.device).to(scores.device)
    noise.scatter_(1, top, -1.0)  # below any draw: the top tokens are not drawn twice
    return torch.cat([top, top_tokens(noise, drawn)], dim=1)
