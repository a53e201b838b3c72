"""Explicit state of a cached transformer: the current run, the per-block caches, the statistics.

One ``RunState`` per cached transformer is shared by its step hook (which advances it) and its block
hooks (which read the step's decision and keep their caches in it). Resetting it drops every cache.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .config import EngineSettings


@dataclass(frozen=True)
class CacheStats:
    """What the last run did.

    Attributes:
        steps: denoising steps (transformer calls at distinct timesteps).
        full_steps, partial_steps: how those steps split.
        recompute_fraction: mean fraction of tokens recomputed by the partially computed branches
            (cross-attention, MLP) over the partial steps; 0 for FORA.
        flops: FLOPs the transformer executed, scoring included, by the engine's own accounting.
        flops_full: what the same run costs without caching.
        cache_bytes: the most memory the cache held during the run.
        full_step_indices: which steps were full.
        merged_fraction: with token merging, the mean share of image tokens merged away in the merged
            branches; 0 without.
    """

    steps: int = 0
    full_steps: int = 0
    partial_steps: int = 0
    recompute_fraction: float = 0.0
    flops: int = 0
    flops_full: int = 0
    cache_bytes: int = 0
    full_step_indices: tuple[int, ...] = ()
    merged_fraction: float = 0.0

    @property
    def flops_speedup(self) -> float:
        """``flops_full / flops``: how many times fewer FLOPs the cached run executed."""
        return self.flops_full / self.flops if self.flops else 1.0


@dataclass
class BlockCache:
    """One block's cached branch outputs (before their gates) and token-selection state."""

    branches: dict[str, torch.Tensor] = field(default_factory=dict)
    base_scores: dict[str, torch.Tensor] = field(default_factory=dict)  # per token group
    since_recompute: dict[str, torch.Tensor] = field(default_factory=dict)  # per branch
    text_keys: torch.Tensor | None = None  # cross-attention keys, to refresh entropy rows

    def current(self, branch: str) -> torch.Tensor:
        """The value a partial step uses for a branch: the last computed output."""
        return self.branches[branch]

    def nbytes(self) -> int:
        tensors = [*self.branches.values(), *self.base_scores.values(), *self.since_recompute.values(), self.text_keys]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)


@dataclass(frozen=True)
class CallSignature:
    """What must stay fixed within a run."""

    batch: int
    grid: tuple[int, int]
    dtype: torch.dtype
    device: torch.device


class RunState:
    """The run in progress: step counting, the full/partial decision, caches and FLOPs."""

    def __init__(self, settings: EngineSettings):
        self.settings = settings
        self.completed_stats: CacheStats | None = None
        self.reset()

    def reset(self) -> None:
        """Forget the run: caches, counters and the random generator."""
        self.signature: CallSignature | None = None
        self.step = -1
        self.stream = 0
        self.last_timestep: float | None = None
        self.first_timestep: float | None = None
        self.schedule: tuple[float, ...] | None = None  # the run's timesteps as the model sees them, if known
        self.progress = 0.0
        self.is_full = True
        self.steps_since_full = 0
        self.guidance_batch = False
        self.in_call = False
        self.in_block = False
        self.caches: dict[tuple[str, int], BlockCache] = {}
        self.tables: dict[str, object] = {}  # per-run values precomputed for every step (modulation tables)
        self.generator: torch.Generator | None = None
        self.merge_generator: torch.Generator | None = None  # random destinations of token merging
        self.outside_flops: int | None = None
        self._full_step_indices: list[int] = []
        self._flops = 0
        self._flops_full = 0
        self._recompute_sum = 0.0
        self._recompute_count = 0
        self._merged_sum = 0.0
        self._merged_count = 0
        self._cache_bytes = 0

    # -- run lifecycle -------------------------------------------------------------------------
    def start(
        self, signature: CallSignature, timestep: float, schedule: tuple[float, ...] | None, guidance_batch: bool
    ) -> None:
        self.reset()
        self.signature = signature
        self.first_timestep = timestep
        self.schedule = schedule
        self.guidance_batch = guidance_batch
        self.generator = torch.Generator(device=signature.device).manual_seed(self.settings.seed)
        merging = self.settings.merging
        if merging is not None and merging.seed is not None:
            self.merge_generator = torch.Generator(device=signature.device).manual_seed(merging.seed)

    def begin_step(self, timestep: float) -> None:
        """Advance to the next denoising step and decide, once, whether it is full."""
        self.step += 1
        self.stream = 0
        self.last_timestep = timestep
        self.progress = self._progress(timestep)
        self.steps_since_full += 1
        self.is_full = self.settings.schedule.is_full_step(self.step, self.steps_since_full, self.progress)
        if self.is_full:
            self.steps_since_full = 0
            self._full_step_indices.append(self.step)

    def _progress(self, timestep: float) -> float:
        if self.schedule is not None and len(self.schedule) > 1:
            return min(self.step / (len(self.schedule) - 1), 1.0)
        if self.first_timestep:  # no step count known: progress of the timestep itself
            return min(max(1.0 - timestep / self.first_timestep, 0.0), 1.0)
        return 0.0

    @property
    def run_finished(self) -> bool:
        return self.schedule is not None and self.step + 1 >= len(self.schedule)

    @property
    def on_schedule(self) -> bool:
        """Whether this step's timestep is the scheduler's for this step, so per-step tables apply."""
        if self.schedule is None or self.step >= len(self.schedule):
            return False
        expected = self.schedule[self.step]
        return abs(expected - self.last_timestep) <= 1e-5 * max(1.0, abs(expected))

    def block_cache(self, block_name: str) -> BlockCache:
        key = (block_name, self.stream)
        if key not in self.caches:
            self.caches[key] = BlockCache()
        return self.caches[key]

    # -- accounting ----------------------------------------------------------------------------
    # Bookkeeping runs outside compiled graphs: its Python counters must not become guards.
    @torch.compiler.disable
    def add_flops(self, executed: int, uncached: int) -> None:
        self._flops += executed
        self._flops_full += uncached

    @torch.compiler.disable
    def add_recompute(self, fraction: float) -> None:
        self._recompute_sum += fraction
        self._recompute_count += 1

    @torch.compiler.disable
    def add_merged(self, fraction: float) -> None:
        self._merged_sum += fraction
        self._merged_count += 1

    def end_call(self) -> None:
        self._flops += self.outside_flops or 0
        self._flops_full += self.outside_flops or 0
        self._cache_bytes = max(self._cache_bytes, sum(cache.nbytes() for cache in self.caches.values()))
        self.completed_stats = self.stats()
        if self.run_finished:  # this call's stream is done: hold no memory until the next run
            for key in [key for key in self.caches if key[1] == self.stream]:
                del self.caches[key]
            self.tables.clear()

    def stats(self) -> CacheStats:
        steps = self.step + 1
        full = len(self._full_step_indices)
        return CacheStats(
            steps=steps,
            full_steps=full,
            partial_steps=steps - full,
            recompute_fraction=self._recompute_sum / self._recompute_count if self._recompute_count else 0.0,
            flops=self._flops,
            flops_full=self._flops_full,
            cache_bytes=self._cache_bytes,
            full_step_indices=tuple(self._full_step_indices),
            merged_fraction=self._merged_sum / self._merged_count if self._merged_count else 0.0,
        )
