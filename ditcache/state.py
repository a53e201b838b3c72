"""Explicit state of a cached transformer: the current run, the per-block caches, the statistics.

One ``RunState`` per cached transformer is shared by its step hook (which advances it) and its block
hooks (which read the step's decision and keep their caches in it). Resetting it drops every cache.
"""

from __future__ import annotations

import itertools
import warnings
from dataclasses import dataclass, field

import torch

from .config import EngineSettings
from .control import ErrorMeter
from .forecast import Forecaster

_RUN_STARTS = itertools.count()  # orders the runs of several transformers (Wan 2.2's experts)


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
        full_step_reasons: why each full step was full (``ditcache.control.FULL_STEP_REASONS``).
        forecast_errors: with a ``tolerance``, each step's measured relative error of the cached branch
            outputs (nan where nothing was measured: the first step, steps recomputing nothing).
        estimate_flops: with a ``tolerance``, what measuring the error cost (included in ``flops``).
        flops_uncounted: the branches whose FLOPs ``FlopCounterMode`` could not count (flex attention), so that
            only their linear layers are in ``flops`` and ``flops_full``, each as ``"name: why"``.
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
    full_step_reasons: tuple[str, ...] = ()
    forecast_errors: tuple[float, ...] = ()
    estimate_flops: int = 0
    flops_uncounted: tuple[str, ...] = ()

    @classmethod
    def joined(cls, parts: list["CacheStats"]) -> "CacheStats":
        """One run served by several transformers in turn (Wan 2.2's experts), each with its part's stats."""
        if len(parts) == 1:
            return parts[0]
        partial = sum(part.partial_steps for part in parts)
        indices, offset = [], 0
        for part in parts:
            indices += [offset + index for index in part.full_step_indices]
            offset += part.steps
        return cls(
            steps=offset, full_steps=sum(part.full_steps for part in parts), partial_steps=partial,
            recompute_fraction=sum(p.recompute_fraction * p.partial_steps for p in parts) / partial if partial else 0.0,
            flops=sum(part.flops for part in parts), flops_full=sum(part.flops_full for part in parts),
            cache_bytes=sum(part.cache_bytes for part in parts), full_step_indices=tuple(indices),
            merged_fraction=max(part.merged_fraction for part in parts),
            full_step_reasons=tuple(reason for part in parts for reason in part.full_step_reasons),
            forecast_errors=tuple(error for part in parts for error in part.forecast_errors),
            estimate_flops=sum(part.estimate_flops for part in parts),
            flops_uncounted=tuple(sorted({note for part in parts for note in part.flops_uncounted})),
        )

    @property
    def flops_speedup(self) -> float:
        """``flops_full / flops``: how many times fewer FLOPs the cached run executed."""
        return self.flops_full / self.flops if self.flops else 1.0


@dataclass
class BlockCache:
    """One block's cached branch outputs (before their gates) and token-selection state.

    With a forecast order ``K`` (1 to 4) each branch also keeps the Newton divided differences of its
    last ``K + 1`` full-step values, so that a partial step reuses the Taylor (Newton) extrapolation of
    the branch to that step instead of its last value; a polynomial of degree ``K`` in the step index is
    forecast exactly, whatever the spacing of the full steps. TaylorSeer forecasts
    ``F(k) = sum_i D^i k^i / i!`` instead, ``k`` the offset from the last full step and its differences
    divided by the last interval only. The two agree at order 1 (the line through the last two full
    steps); from order 2 on they differ even at an even spacing ``N``, where TaylorSeer's ``D^i / i!`` are
    the divided differences kept here but multiply ``k^i`` instead of ``k (k + N) ... (k + (i - 1) N)``,
    so that TaylorSeer is exact for degree 1 only (tests/test_forecast.py).

    The forecast state is anchored at full steps: rows a partial step recomputes are written into that
    step's forecast only (without a forecast, into the stored value, where they persist, as ToCa
    defines it). Re-anchoring recomputed rows in the stored value was measured too: within 0.2 dB on the
    reference DiT, 0.2-1.0 dB worse on the reference FLUX (eval/BENCHMARKS.md).
    """

    branches: dict[str, torch.Tensor] = field(default_factory=dict)  # value at the last full step
    differences: dict[str, list[torch.Tensor]] = field(default_factory=dict)  # f[s0, s1], f[s0, s1, s2], ...
    nodes: dict[str, list[int]] = field(default_factory=dict)  # full steps s0 > s1 > ... behind them
    base_scores: dict[str, torch.Tensor] = field(default_factory=dict)  # per token group
    normalized_scores: dict[str, torch.Tensor] = field(default_factory=dict)  # the same at unit L2 norm
    since_recompute: dict[str, torch.Tensor] = field(default_factory=dict)  # per branch
    text_keys: torch.Tensor | None = None  # cross-attention keys, to refresh entropy rows
    text_values: torch.Tensor | None = None  # cross-attention values, where partial steps recompute its rows
    layouts: dict[str, tuple] = field(default_factory=dict)  # generic path: each branch's output structure and FLOPs
    versions: dict[str, int | None] = field(default_factory=dict)  # generic path: kept tensors' version counters

    def store(self, branch: str, value: torch.Tensor, step: int, order: int) -> None:
        """Keep a full step's output and update its divided differences up to ``order``."""
        previous, nodes = self.branches.get(branch), self.nodes.get(branch, [])
        differences = []
        if order and previous is not None:
            old = self.differences.get(branch, [])
            difference = (value - previous) / (step - nodes[0])
            differences.append(difference)
            for k in range(1, min(order, len(old) + 1)):
                difference = (difference - old[k - 1]) / (step - nodes[k])
                differences.append(difference)
        self.branches[branch] = value
        self.differences[branch] = differences
        self.nodes[branch] = [step, *nodes][: order + 1]

    def current(self, branch: str, step: int, forecaster: Forecaster) -> torch.Tensor:
        """The value a partial step uses for a branch. Without differences: the stored tensor itself
        (recomputed rows written into it persist). With them: a new tensor, ``forecaster``'s forecast at
        ``step`` (recomputed rows written into it serve this step only)."""
        value, differences = self.branches[branch], self.differences.get(branch)
        if not differences:
            return value
        for difference, factor in zip(differences, forecaster.factors(step, self.nodes[branch], len(differences))):
            value = torch.add(value, difference, alpha=factor)
        return value

    def forecast_terms(self, branch: str, step: int, flat: torch.Tensor, forecaster: Forecaster) -> torch.Tensor | None:
        """The forecast's increment over the stored value, on the rows ``flat`` only (None without
        differences)."""
        differences = self.differences.get(branch)
        if not differences:
            return None
        terms = None
        for difference, factor in zip(differences, forecaster.factors(step, self.nodes[branch], len(differences))):
            rows = difference.view(-1, difference.shape[-1]).index_select(0, flat) * factor
            terms = rows if terms is None else terms + rows
        return terms

    def nbytes(self) -> int:
        differences = [t for values in self.differences.values() for t in values]
        tensors = [*self.branches.values(), *differences, *self.base_scores.values(), *self.normalized_scores.values(),
                   *self.since_recompute.values(), self.text_keys, self.text_values]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)


@dataclass(frozen=True)
class SelectionEvent:
    """One partial step's token choice for one branch of one block, as recorded by
    :func:`ditcache.record_selections`. Tensors are on the CPU, one row per sequence (one per guidance
    pair when classifier-free guidance is batched); token indices run over the branch's token group
    (the image grid row by row for image tokens).

    ``selection_score = score + frequency + bonus``: the L2-normalised base score of the last full step,
    the cache-frequency term and the spatial bonus; the ``tokens`` are its top entries (under error
    control with a random share, followed by the randomly drawn ones).
    """

    step: int
    block: str
    branch: str  # the branch (block adapters) or the token group its per-token branches share (generic path)
    tokens: torch.Tensor
    score: torch.Tensor
    frequency: torch.Tensor
    bonus: torch.Tensor
    error: float | None = None  # under error control: the relative error measured on the recomputed rows


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
        self.completed_marker: object | None = None  # the marker of the run completed_stats describes
        self.started = -1  # when the last run started, among all runs (see _RUN_STARTS); kept by reset()
        self.recorder: list[SelectionEvent] | None = None  # set by ditcache.record_selections
        self.call_serial = 0  # counts every transformer call, across runs: tells one call from the next
        self.flops_uncounted: dict[str, str] = {}  # branch -> why FlopCounterMode could not count it (kept across runs)
        self.reset()

    def reset(self) -> None:
        """Forget the run: caches, counters and the random generator."""
        self.signature: CallSignature | None = None
        self.marker: object | None = None  # what marks this run's start in the pipeline (its timesteps object)
        self.owner: int | None = None  # the thread that started the run
        self.step = -1
        self.stream = 0
        self.last_timestep: float | None = None
        self.first_timestep: float | None = None
        self.schedule: tuple[float, ...] | None = None  # the run's timesteps as the model sees them, if known
        self.full_step_plan: tuple[bool, ...] | None = None  # the grid rule's full steps, made at the start
        self.progress = 0.0
        self.is_full = True
        self.steps_since_full = 0
        self.guidance_batch = False
        self.in_call = False
        self.in_block = False
        self.caches: dict[tuple[str, int], BlockCache] = {}
        # this step's token choices, (block, group or branch) -> (tokens, transformer calls served): every
        # guidance stream of a step recomputes the same tokens
        self.step_selections: dict[tuple[str, str], tuple] = {}
        self.tables: dict[str, object] = {}  # per-run values: modulation tables, outputs constant within the run
        self.arguments: dict = {}  # the current transformer call's arguments, by name
        self.generator: torch.Generator | None = None
        self.merge_generator: torch.Generator | None = None  # random destinations of token merging
        self.meter: ErrorMeter | None = None  # with a tolerance: the measured errors
        self.outside_flops: int | None = None
        self._full_step_indices: list[int] = []
        self._full_step_reasons: list[str] = []
        self._flops = 0
        self._flops_full = 0
        self._estimate_flops = 0
        self._recompute_sum = 0.0
        self._recompute_count = 0
        self._merged_sum = 0.0
        self._merged_count = 0
        self._cache_bytes = 0

    # -- run lifecycle -------------------------------------------------------------------------
    def start(
        self,
        signature: CallSignature,
        timestep: float,
        schedule: tuple[float, ...] | None,
        guidance_batch: bool,
        marker: object | None = None,
        owner: int | None = None,
        sequence_group=None,
    ) -> None:
        """Start a run. ``sequence_group``: under context parallelism, the ranks the sequence is sharded over,
        whose measurements decide together (``ErrorMeter``)."""
        self.reset()
        self.signature = signature
        self.marker, self.owner = marker, owner
        self.started = next(_RUN_STARTS)
        self.first_timestep = timestep
        self.schedule = schedule
        self.guidance_batch = guidance_batch
        if self.settings.control is not None:
            self.meter = ErrorMeter(signature.device, sequence_group)
        elif self.settings.schedule.needs_step_count:
            if schedule is None:
                warnings.warn(
                    "the grid full-step rule needs the run's step count, which a bare transformer does not "
                    "know: full steps follow the interval rule. Apply the cache to the pipeline to get the grid.",
                    stacklevel=2,
                )
            else:
                self.full_step_plan = self.settings.schedule.full_step_plan(len(schedule))
        self.generator = torch.Generator(device=signature.device).manual_seed(self.settings.seed)
        merging = self.settings.merging
        if merging is not None and merging.seed is not None:
            self.merge_generator = torch.Generator(device=signature.device).manual_seed(merging.seed)

    def begin_step(self, timestep: float) -> None:
        """Advance to the next denoising step and decide, once, whether it is full."""
        self.step += 1
        self.stream = 0
        self.step_selections = {}
        self.last_timestep = timestep
        self.progress = self._progress(timestep)
        self.steps_since_full += 1
        schedule, reason = self.settings.schedule, "interval"
        if self.step < schedule.full_steps_at_start:
            self.is_full, reason = True, "start"
        elif self.meter is not None:
            measurements = self.meter.deciding(self.step, self._forecast_order(), self._full_step_indices[-1])
            interval, reason = self.settings.control.interval(measurements)
            self.is_full = self.steps_since_full >= interval
        elif self.full_step_plan is not None:
            self.is_full = self.step >= len(self.full_step_plan) or self.full_step_plan[self.step]
        else:
            self.is_full = schedule.is_full_step(self.step, self.steps_since_full, self.progress)
        if self.meter is not None:  # what this step measures: the forecast made from the full steps before it
            self.meter.open_step(self.step, self.steps_since_full, self._forecast_order(), self.is_full)
        if self.is_full:
            self.steps_since_full = 0
            self._full_step_indices.append(self.step)
            self._full_step_reasons.append(reason)

    def _forecast_order(self) -> int:
        """The order of the forecasts the caches hold now: lower until enough full steps were stored."""
        return max(min(self.settings.forecast_order, len(self._full_step_indices) - 1), 0)

    @property
    def full_steps_done(self) -> int:
        """Full steps so far in this run, the current one included."""
        return len(self._full_step_indices)

    def _progress(self, timestep: float) -> float:
        if self.schedule is not None and len(self.schedule) > 1:
            return self.settings.schedule.progress(self.step, len(self.schedule))
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

    @torch.compiler.disable
    def measure_kept(self, cache: BlockCache, key: str, fresh: torch.Tensor) -> None:
        """On a full step, before ``fresh`` is stored under ``key``: the error its kept value (or forecast)
        would have made on this step, added to the step's measurement with what it costs."""
        cached = cache.current(key, self.step, self.settings.forecaster)
        forecast_flops = 2 * len(cache.differences.get(key, ())) * cached.numel()
        self.add_estimate_flops(forecast_flops + self.meter.add(cached, fresh))

    @torch.compiler.disable
    def measure_rows(self, cached: torch.Tensor, fresh: torch.Tensor) -> None:
        """On a partial step, recomputed rows' cached value (or forecast) ``cached`` against their fresh
        values, added to the step's measurement with what it costs."""
        self.add_estimate_flops(self.meter.add(cached, fresh))

    # -- accounting ----------------------------------------------------------------------------
    # Bookkeeping runs outside compiled graphs: its Python counters must not become guards.
    @torch.compiler.disable
    def add_flops(self, executed: int, uncached: int) -> None:
        self._flops += executed
        self._flops_full += uncached

    @torch.compiler.disable
    def add_estimate_flops(self, executed: int) -> None:
        """FLOPs executed only to measure the error (error control)."""
        self._flops += executed
        self._estimate_flops += executed

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
        if self.is_full:  # only full steps store: partial steps leave the caches' size as it was
            self._cache_bytes = max(self._cache_bytes, sum(cache.nbytes() for cache in self.caches.values()))
        self.completed_stats, self.completed_marker = self.stats(), self.marker
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
            full_step_reasons=tuple(self._full_step_reasons),
            forecast_errors=self.meter.errors(steps, wait=self.run_finished) if self.meter is not None else (),
            estimate_flops=self._estimate_flops,
            flops_uncounted=tuple(f"{name}: {why}" for name, why in sorted(self.flops_uncounted.items())),
        )
