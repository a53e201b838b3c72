"""Token merging (ToMe for diffusion) on a DiT's token grid: bipartite soft matching, merge, unmerge.

The grid is cut into ``sx x sy`` cells; one token per cell (random within the cell, or its first) is a
destination, every other token a source. Each source is matched to its most similar destination (cosine
similarity); the ``ratio`` share of all tokens, taken from the sources with the most similar
destinations, are merged into them by averaging. A merged branch runs on the unmerged sources and the
destinations only; ``unmerge`` gives every merged source its destination's output. Rows that do not
fill a whole cell (odd grids) stay sources.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TokenMatch:
    """One matching for a ``(batch, tokens)`` sequence.

    Attributes:
        destinations: ``(batch, d)`` token indices of the destinations.
        kept: ``(batch, k)`` token indices of the sources that stay as they are.
        merged: ``(batch, m)`` token indices of the merged sources.
        targets: ``(batch, m)`` for each merged source, its destination's position in ``destinations``.
        tokens: the sequence length before merging.
    """

    destinations: torch.Tensor
    kept: torch.Tensor
    merged: torch.Tensor
    targets: torch.Tensor
    tokens: int

    @property
    def merged_tokens(self) -> int:
        """The sequence length after merging: kept sources, then destinations."""
        return self.kept.shape[1] + self.destinations.shape[1]


def destination_mask(
    grid: tuple[int, int], sx: int, sy: int, batch: int, random: bool, generator: torch.Generator | None, device
) -> torch.Tensor:
    """``(batch, h * w)`` booleans, True for one token per whole ``sy x sx`` cell: a random one (drawn from
    ``generator``, or torch's global generator when None) or the cell's first."""
    height, width = grid
    cells_y, cells_x = height // sy, width // sx
    if random:
        where = generator.device if generator is not None else device
        choice = torch.randint(sy * sx, (batch, cells_y, cells_x), generator=generator, device=where).to(device)
    else:
        choice = torch.zeros(batch, cells_y, cells_x, dtype=torch.long, device=device)
    mask = torch.zeros(batch, height, width, dtype=torch.bool, device=device)
    cells = torch.nn.functional.one_hot(choice, sy * sx).bool()  # (batch, cells_y, cells_x, sy * sx)
    cells = cells.view(batch, cells_y, cells_x, sy, sx).permute(0, 1, 3, 2, 4).reshape(batch, cells_y * sy, cells_x * sx)
    mask[:, : cells_y * sy, : cells_x * sx] = cells
    return mask.view(batch, height * width)


def bipartite_match(
    metric: torch.Tensor,
    grid: tuple[int, int],
    ratio: float,
    sx: int = 2,
    sy: int = 2,
    random: bool = True,
    generator: torch.Generator | None = None,
) -> TokenMatch:
    """Match the tokens of ``metric`` ``(batch, tokens, dim)`` laid out on ``grid`` (rows, columns), each
    sequence on its own. The grid is known only now, so a cell that does not fit it is refused here:
    it would leave no destination to match."""
    batch, tokens, _ = metric.shape
    if grid[0] * grid[1] != tokens:
        raise ValueError(f"token grid {grid} does not hold {tokens} tokens")
    height, width = grid
    if sx > width or sy > height:
        raise ValueError(
            f"ToMe cell `sx` x `sy` = {sx} x {sy} does not fit the token grid of {width} x {height} (columns x rows); "
            f"choose `sx` <= {width} and `sy` <= {height}."
        )
    is_destination = destination_mask(grid, sx, sy, batch, random, generator, metric.device)
    order = torch.argsort(is_destination.to(torch.int8), dim=1, descending=True, stable=True)
    count = int(is_destination[0].sum())
    destinations, sources = order[:, :count], order[:, count:]
    merge_count = min(int(tokens * ratio), sources.shape[1])

    metric = metric / metric.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    source_vectors = metric.gather(1, sources[..., None].expand(-1, -1, metric.shape[-1]))
    destination_vectors = metric.gather(1, destinations[..., None].expand(-1, -1, metric.shape[-1]))
    similarity = source_vectors @ destination_vectors.transpose(1, 2)
    best, best_destination = similarity.max(dim=-1)
    ranked = best.argsort(dim=-1, descending=True, stable=True)
    merged_rank, kept_rank = ranked[:, :merge_count], ranked[:, merge_count:]
    return TokenMatch(
        destinations=destinations,
        kept=sources.gather(1, kept_rank),
        merged=sources.gather(1, merged_rank),
        targets=best_destination.gather(1, merged_rank),
        tokens=tokens,
    )


def _rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return x.gather(1, index[..., None].expand(-1, -1, x.shape[-1]))


def merge(x: torch.Tensor, match: TokenMatch) -> torch.Tensor:
    """``(batch, tokens, dim)`` to ``(batch, kept + destinations, dim)``: each destination becomes the mean
    of itself and the sources merged into it."""
    destinations = _rows(x, match.destinations)
    index = match.targets[..., None].expand(-1, -1, x.shape[-1])
    destinations = destinations.scatter_reduce(1, index, _rows(x, match.merged), reduce="mean", include_self=True)
    return torch.cat([_rows(x, match.kept), destinations], dim=1)


def unmerge(x: torch.Tensor, match: TokenMatch) -> torch.Tensor:
    """The inverse layout of :func:`merge`: destinations and kept sources back in place, merged sources
    take their destination's row."""
    kept, destinations = x.split([match.kept.shape[1], match.destinations.shape[1]], dim=1)
    out = x.new_empty(x.shape[0], match.tokens, x.shape[-1])
    dim = x.shape[-1]
    out.scatter_(1, match.destinations[..., None].expand(-1, -1, dim), destinations)
    out.scatter_(1, match.kept[..., None].expand(-1, -1, dim), kept)
    out.scatter_(1, match.merged[..., None].expand(-1, -1, dim), _rows(destinations, match.targets))
    return out
