"""Which tokens a partial step recomputes: one choice for the block adapters and the generic path.

A choice is made once per step for a block's token group (the generic path) or branch (the block adapters),
from the base score of the last full step plus the cache-frequency term, with the spatial bonus where the
group is the image token grid, the top entries taken (under error control the last ``drawn`` at random).
Every guidance stream of the step (the cond and uncond calls of two-call guidance) recomputes the same
tokens: other tokens per stream would decorrelate the streams' cache errors, which guidance amplifies. Each
stream keeps its own frequency counters, advanced once per call. ``record_selections`` sees every choice.
"""

from __future__ import annotations

from typing import Callable

import torch

from . import scores as S
from .config import EngineSettings
from .state import RunState, SelectionEvent


@torch.compiler.disable  # per-step Python state (counters, progress) stays out of compiled graphs
def choose_tokens(
    run: RunState,
    settings: EngineSettings,
    block: str,
    key: str,
    base: Callable[[], torch.Tensor],
    since: torch.Tensor,
    count: int,
    drawn: int,
    grid: tuple[int, tuple[int, int]] | None = None,
) -> torch.Tensor:
    """The ``(rows, count)`` tokens ``key`` (a branch or token group of ``block``) recomputes in this call;
    ``count`` is that of the step's first call for ``key``.

    ``base()`` gives the group's normalised base score (read only when this step has no choice yet),
    ``since`` the stream's steps since each token was recomputed (advanced here), ``grid`` the frames and
    per-frame token grid of the image tokens for the spatial bonus (None: no bonus)."""
    memo = (block, key)
    made = run.caches.step_selections.get(memo)
    # the first call of the step chooses, its count included (every branch of a token group takes the group's
    # choice); a stream of another batch size chooses for itself
    if made is None or made[0].shape[0] != since.shape[0]:
        made = run.caches.step_selections[memo] = (_choose(run, settings, block, key, base(), since, count, drawn, grid), set())
    index, served = made
    if run.call_serial not in served:  # once per call: the branches of one group share the call's choice
        served.add(run.call_serial)
        since.add_(1).scatter_(1, index, 0)
    return index


def _choose(run: RunState, settings: EngineSettings, block: str, key: str, base: torch.Tensor, since: torch.Tensor,
            count: int, drawn: int, grid: tuple[int, tuple[int, int]] | None) -> torch.Tensor:
    base = base.to(since.device)
    frequency = S.frequency_term(since, settings.frequency_weight, settings.schedule.cache_interval)
    score = base + frequency
    if grid is not None:
        frames, (rows, cols) = grid
        if frames * rows * cols == since.shape[1]:  # the bonus needs the group to be the image token grid
            per_frame = score.reshape(-1, rows * cols)
            score = S.spatial_bonus(per_frame, (rows, cols), settings.spatial_grid, settings.spatial_bonus).view_as(score)
    index = S.top_and_random_tokens(score, count, drawn, run.generator)
    if run.recorder is not None:
        bonus = score - (base + frequency)  # exactly zero off the boosted tokens
        run.recorder.append(SelectionEvent(run.plan.step, block, key, *(t.cpu() for t in (index, base, frequency, bonus))))
    return index
