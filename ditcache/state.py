"""Explicit state of a cached transformer: the current run, the per-block caches, the statistics.

One ``RunState`` per cached transformer is shared by its step hook (which advances it) and its block
hooks (which read the step's decision and keep their caches in it). Resetting it drops every cache.
"""

from __future__ import annotations

import itertools
import warnings
from dataclasses import dataclass, replace
from typing import Any

import torch

from .budget import CacheLayout
from .config import EngineSettings
from .control import ERROR_FLOPS, ErrorMeter, squared_error
from .forecast import Forecaster
from .residual import SpanTracker
from .store import BlockCache, CacheKey

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
        cache_bytes: the most memory the cache held during the run: the blocks' caches and the run's memos
            (modulation tables, outputs constant within the run). ``ditcache.estimate_cache_bytes`` gives it
            before the run.
        full_step_indices: which steps were full.
        merged_fraction: with token merging, the mean share of image tokens merged away in the merged
            branches; 0 without.
        full_step_reasons: why each full step was full (``ditcache.control.FULL_STEP_REASONS``).
        forecast_errors: with a ``tolerance``, each step's measured relative error of the cached branch
            outputs (nan where nothing was measured: the first step, steps recomputing nothing).
        estimate_flops: with a ``tolerance``, what measuring the error cost (included in ``flops``).
        forecast_orders: each step's forecast order: of the forecast a partial step used, or a full step measured
            (lower at the start, until enough full steps were stored; with ``choose_order``, what was chosen).
        cache_host_bytes: with ``cache_offload``, the most bytes the cache held in host memory (its device bytes,
            the blocks' copies while they run, are in ``cache_bytes``).
        cache_budget: with ``cache_memory``, the budget in bytes for this run's shapes and guidance streams (0: none).
        cache_layout: how the run kept its caches (``CacheLayout``: the config's, or what ``cache_memory`` chose).
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
    forecast_orders: tuple[int, ...] = ()
    estimate_flops: int = 0
    flops_uncounted: tuple[str, ...] = ()
    cache_layout: str = ""
    cache_budget: int = 0
    cache_host_bytes: int = 0

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
            forecast_orders=tuple(order for part in parts for order in part.forecast_orders),
            estimate_flops=sum(part.estimate_flops for part in parts),
            flops_uncounted=tuple(sorted({note for part in parts for note in part.flops_uncounted})),
            cache_layout=" / ".join(dict.fromkeys(part.cache_layout for part in parts)),
            cache_budget=sum(part.cache_budget for part in parts),
            cache_host_bytes=sum(part.cache_host_bytes for part in parts),
        )

    @property
    def flops_speedup(self) -> float:
        """``flops_full / flops``: how many times fewer FLOPs the cached run executed."""
        return self.flops_full / self.flops if self.flops else 1.0


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


@dataclass
class Memo:
    """A value made once per run (and guidance stream) and served to later calls: a modulation table over
    the run's steps, an output constant within the run (rotary embedding, text projection).

    ``sources`` are what it was made from; a user of the memo compares them (by identity and ``versions``,
    the sources' and the value's version counters when made, or by value) before serving ``value``."""

    value: Any
    flops: int = 0  # what making it cost (for a table: what one step's entry costs a call)
    sources: tuple = ()
    versions: tuple[int, ...] = ()


class RunMemo:
    """The run's memos, by name and guidance stream (each stream has its own conditioning)."""

    def __init__(self):
        self._entries: dict[tuple[str, int], Memo] = {}

    def get(self, name: str, stream: int) -> Memo | None:
        return self._entries.get((name, stream))

    def put(self, name: str, stream: int, memo: Memo) -> Memo:
        self._entries[(name, stream)] = memo
        return memo

    def clear(self) -> None:
        self._entries.clear()

    def nbytes(self) -> int:
        """Bytes of the tensors the memos hold, each stored tensor once (a table's per-step entries are views)."""
        stored = {}
        pending = [memo.value for memo in self._entries.values()]
        while pending:
            value = pending.pop()
            if isinstance(value, (tuple, list)):
                pending.extend(value)
            elif isinstance(value, torch.Tensor):
                base = value if value._base is None else value._base
                stored[id(base)] = base.numel() * base.element_size()
        return sum(stored.values())


class StepPlan:
    """Which steps of one run are full: the step counter, the full-step rule (fixed, grid or error control)
    and its decisions."""

    def __init__(self, settings: EngineSettings, schedule: tuple[float, ...] | None = None,
                 first_timestep: float | None = None, meter: ErrorMeter | None = None, steps: int | None = None,
                 order: int | None = None):
        self.settings = settings
        self.order = settings.forecast_order if order is None else order  # the run's layout's forecast order
        self.schedule = schedule  # the run's timesteps as the model sees them, if known
        self.steps = len(schedule) if schedule is not None else steps  # the run's step count, if known
        self.first_timestep = first_timestep
        self.meter = meter  # with a tolerance: the measured errors
        self.step = -1
        self.is_full = True
        self.steps_since_full = 0
        self.progress = 0.0
        self.last_timestep: float | None = None
        self.full_step_indices: list[int] = []
        self.full_step_reasons: list[str] = []
        self.full_step_plan: tuple[bool, ...] | None = None  # the grid rule's full steps, made at the start
        self.full_next_step = False  # the caches were dropped: the next step must be full (reason "memory")
        self.chosen_order: int | None = None  # error control's order choice, once made
        self.forecast_orders: list[int] = []  # each step's forecast order
        # a run too short to cache (min_steps): every step full, nothing kept, uncached bit for bit
        self.uncached = settings.too_short(self.steps)
        if meter is None and settings.schedule.needs_step_count and self.steps is not None:
            self.full_step_plan = settings.schedule.full_step_plan(self.steps)

    def begin_step(self, timestep: float) -> None:
        """Advance to the next denoising step and decide, once, whether it is full."""
        self.step += 1
        self.last_timestep = timestep
        self.progress = self._progress(timestep)
        self.steps_since_full += 1
        schedule, reason = self.settings.schedule, "interval"
        if self.uncached:
            self.is_full, reason = True, "few_steps"
        elif self.step < schedule.full_steps_at_start:
            self.is_full, reason = True, "start"
        elif self.full_next_step:
            self.is_full, reason, self.full_next_step = True, "memory", False
        elif self.meter is not None:
            measurements = self.meter.deciding(self.step, self.forecast_order, self.full_step_indices[-1], self.stored_order)
            interval, reason, order = self.settings.control.interval(measurements, self.steps)
            self.chosen_order = self.chosen_order if order is None else order
            self.is_full = self.steps_since_full >= interval
        elif self.full_step_plan is not None:
            self.is_full = self.step >= len(self.full_step_plan) or self.full_step_plan[self.step]
        else:
            self.is_full = schedule.is_full_step(self.step, self.steps_since_full, self.progress)
        if self.meter is not None:  # what this step measures: the forecast made from the full steps before it
            self.meter.open_step(self.step, self.steps_since_full, self.forecast_order, self.is_full, self.measured_orders)
        self.forecast_orders.append(self.forecast_order)
        if self.is_full:
            self.steps_since_full = 0
            self.full_step_indices.append(self.step)
            self.full_step_reasons.append(reason)

    @property
    def stored_order(self) -> int:
        """The highest order the caches can forecast with: lower until enough full steps were stored."""
        return max(min(self.order, len(self.full_step_indices) - 1), 0)

    @property
    def forecast_order(self) -> int:
        """The order of the forecasts made now: the stored order, at most the one error control chose."""
        return self.stored_order if self.chosen_order is None else min(self.stored_order, self.chosen_order)

    @property
    def measured_orders(self) -> int:
        """How many forecast orders (from 0) this step measures, before it is filed as full: under the order choice,
        on full steps, every order the caches can forecast with; else none besides the forecast in force."""
        control = self.settings.control
        return self.stored_order + 1 if self.is_full and control is not None and control.choose_order else 0

    def _progress(self, timestep: float) -> float:
        if self.steps is not None and self.steps > 1:
            return self.settings.schedule.progress(self.step, self.steps)
        if self.first_timestep:  # no step count known: progress of the timestep itself
            return min(max(1.0 - timestep / self.first_timestep, 0.0), 1.0)
        return 0.0

    @property
    def run_finished(self) -> bool:
        return self.steps is not None and self.step + 1 >= self.steps

    @property
    def on_schedule(self) -> bool:
        """Whether this step's timestep is the scheduler's for this step, so per-step tables apply."""
        if self.schedule is None or self.step >= len(self.schedule):
            return False
        expected = self.schedule[self.step]
        return abs(expected - self.last_timestep) <= 1e-5 * max(1.0, abs(expected))


class Ledger:
    """What one run executed, saved and kept, for ``CacheStats``. Bookkeeping runs outside compiled graphs:
    its Python counters must not become guards."""

    def __init__(self):
        self.flops = 0
        self.flops_full = 0
        self.estimate_flops = 0
        self.outside_flops: int | None = None  # one call's FLOPs outside the blocks, counted on the first call
        self.cache_bytes = 0
        self.cache_budget = 0  # a cache_memory budget's bytes for this run (0: none)
        self.cache_host_bytes = 0  # an offloaded cache's most bytes in host memory
        self._recompute = [0.0, 0]
        self._merged = [0.0, 0]

    @torch.compiler.disable
    def add_flops(self, executed: int, uncached: int) -> None:
        self.flops += executed
        self.flops_full += uncached

    @torch.compiler.disable
    def add_estimate_flops(self, executed: int) -> None:
        """FLOPs executed only to measure the error (error control)."""
        self.flops += executed
        self.estimate_flops += executed

    @torch.compiler.disable
    def add_recompute(self, fraction: float) -> None:
        self._recompute[0] += fraction
        self._recompute[1] += 1

    @torch.compiler.disable
    def add_merged(self, fraction: float) -> None:
        self._merged[0] += fraction
        self._merged[1] += 1

    @property
    def recompute_fraction(self) -> float:
        return self._recompute[0] / self._recompute[1] if self._recompute[1] else 0.0

    @property
    def merged_fraction(self) -> float:
        return self._merged[0] / self._merged[1] if self._merged[1] else 0.0


class StreamCaches:
    """The blocks' caches, one per block and guidance stream, and the step's token choices, which every
    stream of a step shares (``ditcache.selection``). Offloaded, a block's values are copied to the device when
    it is read, and the block read after it last time is prefetched then (on a CUDA side stream); a block's
    device copies are dropped when the next block is read."""

    def __init__(self, layout: CacheLayout = CacheLayout(), offload: bool = False):
        self.layout = layout
        self.offload = offload
        self.blocks: dict[tuple[str, int], BlockCache] = {}
        # (block, group or branch) -> (tokens, transformer calls served), for the current step
        self.step_selections: dict[tuple[str, str], tuple] = {}
        self._last: tuple[str, int] | None = None  # offloaded: the block read last
        self._following: dict[tuple[str, int], tuple[str, int]] = {}  # offloaded: the block read after each, last time
        self._stream = torch.cuda.Stream() if offload and torch.cuda.is_available() else None

    def block(self, name: str, stream: int) -> BlockCache:
        key = (name, stream)
        if key not in self.blocks:
            self.blocks[key] = BlockCache(precision=self.layout.precision, max_order=self.layout.order, offload=self.offload)
        if self.offload and key != self._last:
            if self._last is not None:
                self._following[self._last] = key
                self.blocks[self._last].release()
            following = self._following.get(key)
            if following is not None and following in self.blocks:
                self.blocks[following].prefetch(self._stream)
            self._last = key
        return self.blocks[key]

    def end_call(self) -> None:
        """Offloaded: hold no device copy between calls."""
        for cache in self.blocks.values():
            cache.release()
        self._last = None

    def nbytes(self) -> int:
        return sum(cache.nbytes() for cache in self.blocks.values())

    def host_nbytes(self) -> int:
        return sum(cache.host_nbytes() for cache in self.blocks.values())

    def drop_stream(self, stream: int) -> None:
        for key in [key for key in self.blocks if key[1] == stream]:
            del self.blocks[key]


class RunState:
    """The run in progress on one cached transformer: the call in progress (guidance stream, arguments,
    random generators), its ``StepPlan``, ``Ledger``, ``StreamCaches`` and ``RunMemo``, and what outlives a
    run (the last run's stats, the selection recorder)."""

    def __init__(self, settings: EngineSettings):
        self.settings = settings
        self.completed_stats: CacheStats | None = None
        self.completed_marker: object | None = None  # the marker of the run completed_stats describes
        self.started = -1  # when the last run started, among all runs (see _RUN_STARTS); kept by reset()
        self.recorder: list[SelectionEvent] | None = None  # set by ditcache.record_selections
        self.call_serial = 0  # counts every transformer call, across runs: tells one call from the next
        self.flops_uncounted: dict[str, str] = {}  # branch -> why FlopCounterMode could not count it (kept across runs)
        self.keep_after_run = False  # a dry run's caches outlive its last step, for ditcache.memory to read
        self.reset()

    def reset(self) -> None:
        """Forget the run: caches, counters and the random generators."""
        self.signature: CallSignature | None = None
        self.marker: object | None = None  # what marks this run's start in the pipeline (its timesteps object)
        self.owner: int | None = None  # the thread that started the run
        self.plan = StepPlan(self.settings)
        self.ledger = Ledger()
        self.layout = self.settings.layout
        self.caches = StreamCaches(self.layout, self.settings.cache_offload)
        self.spans: SpanTracker | None = None  # a residual layout's spans (ditcache.residual)
        self.memo = RunMemo()
        self.stream = 0  # the guidance stream of the call in progress
        self.planned_streams = 1  # the guidance streams the layout was chosen for (with a cache_memory budget)
        self.guidance_batch = False
        self.in_call = False
        self.in_block = False
        self.arguments: dict = {}  # the current transformer call's arguments, by name
        self.generator: torch.Generator | None = None
        self.merge_generator: torch.Generator | None = None  # random destinations of token merging

    def start(
        self,
        signature: CallSignature,
        timestep: float,
        schedule: tuple[float, ...] | None,
        guidance_batch: bool,
        marker: object | None = None,
        owner: int | None = None,
        sequence_group=None,
        steps: int | None = None,
        layout: CacheLayout | None = None,
    ) -> None:
        """Start a run. ``sequence_group``: under context parallelism, the ranks the sequence is sharded over,
        whose measurements decide together (``ErrorMeter``); ``steps``: the step count, where no schedule
        gives it (a loop's ``cache_context``); ``layout``: how the caches are kept (default: the settings')."""
        self.reset()
        self.signature = signature
        self.marker, self.owner = marker, owner
        self.started = next(_RUN_STARTS)
        self.guidance_batch = guidance_batch
        meter = ErrorMeter(signature.device, sequence_group) if self.settings.control is not None else None
        self.use_layout(layout or self.settings.layout)
        self.plan = StepPlan(self.settings, schedule, timestep, meter, steps, self.layout.order)
        if meter is None and self.settings.schedule.needs_step_count and self.plan.steps is None:
            warnings.warn(
                "the grid full-step rule needs the run's step count, which a bare transformer does not know: full "
                "steps follow the interval rule. Apply the cache to the pipeline to get the grid, or give the step in "
                "the loop's transformer.cache_context(name, step_index=i, num_inference_steps=n).",
                stacklevel=2,
            )
        self.generator = torch.Generator(device=signature.device).manual_seed(self.settings.seed)
        merging = self.settings.merging
        if merging is not None and merging.seed is not None:
            self.merge_generator = torch.Generator(device=signature.device).manual_seed(merging.seed)

    def use_layout(self, layout: CacheLayout) -> None:
        """Keep this run's caches in ``layout`` from now on (what was kept before is dropped)."""
        self.layout = layout
        self.caches = StreamCaches(layout, self.settings.cache_offload)
        self.spans = SpanTracker(layout.span) if layout.span else None
        self.plan.order = layout.order

    def begin_call(self) -> None:
        if self.spans is not None:
            self.spans.begin_call(self.plan.is_full)

    def begin_step(self, timestep: float) -> None:
        """Advance to the next denoising step (its first call, guidance stream 0)."""
        self.stream = 0
        self.caches.step_selections = {}
        self.plan.begin_step(timestep)

    @property
    def caching(self) -> bool:
        """Whether this run keeps anything for partial steps: the settings cache and the run is not too short."""
        return self.settings.caches and not self.plan.uncached

    @property
    def forecaster(self) -> Forecaster:
        """The forecast partial steps make now: the settings' one, with at most the order error control chose."""
        chosen = self.plan.chosen_order
        return self.settings.forecaster if chosen is None else replace(self.settings.forecaster, order=chosen)

    def block_cache(self, block_name: str) -> BlockCache:
        return self.caches.block(block_name, self.stream)

    @torch.compiler.disable
    def measure_kept(self, cache: BlockCache, key: CacheKey, fresh: torch.Tensor, cached: torch.Tensor | None = None) -> None:
        """On a full step, before ``fresh`` is stored under ``key``: the error its kept value (or forecast)
        would have made on this step, added to the step's measurement with what it costs (``cached``: that
        forecast, when the caller made it already). Under the order choice every order's forecast is measured, the
        one in force among them."""
        step, forecaster = self.plan.step, self.forecaster
        if self.plan.measured_orders:  # the highest order kept stands for those above it
            order_errors = [squared_error(forecast, fresh, cache.rounding_error(key, step, made_by))
                            for forecast, made_by in cache.forecasts(key, step, self.settings.forecaster)]
            error = order_errors[forecaster.terms(len(order_errors) - 1)]
            flops = cache.forecast_flops(key, fresh.numel(), self.settings.forecaster) + ERROR_FLOPS * len(order_errors) * fresh.numel()
            order_errors += order_errors[-1:] * (self.plan.measured_orders - len(order_errors))
        else:
            cached = cache.current(key, step, forecaster) if cached is None else cached
            error, order_errors = squared_error(cached, fresh, cache.rounding_error(key, step, forecaster)), []
            flops = cache.forecast_flops(key, fresh.numel(), forecaster) + ERROR_FLOPS * fresh.numel()
        self.ledger.add_estimate_flops(flops + self.plan.meter.add(error, fresh, order_errors))

    @torch.compiler.disable
    def measure_rows(self, cached: torch.Tensor, fresh: torch.Tensor) -> None:
        """On a partial step, recomputed rows' cached value (or forecast) ``cached`` against their fresh
        values, added to the step's measurement with what it costs."""
        error = squared_error(cached, fresh)
        self.ledger.add_estimate_flops(ERROR_FLOPS * fresh.numel() + self.plan.meter.add(error, fresh))

    def end_call(self) -> None:
        ledger, plan = self.ledger, self.plan
        ledger.add_flops(ledger.outside_flops or 0, ledger.outside_flops or 0)
        if self.spans is not None:
            self.spans.end_call(self, plan.is_full)
        if plan.is_full:  # only full steps store: partial steps leave the caches' size as it was
            ledger.cache_bytes = max(ledger.cache_bytes, self.caches.nbytes() + self.memo.nbytes())
            ledger.cache_host_bytes = max(ledger.cache_host_bytes, self.caches.host_nbytes())
        self.caches.end_call()
        self.completed_stats, self.completed_marker = self.stats(), self.marker
        if plan.run_finished and not self.keep_after_run:  # this call's stream is done: hold no memory until the next run
            self.caches.drop_stream(self.stream)
            self.memo.clear()

    def stats(self) -> CacheStats:
        plan, ledger = self.plan, self.ledger
        steps, full = plan.step + 1, len(plan.full_step_indices)
        return CacheStats(
            steps=steps,
            full_steps=full,
            partial_steps=steps - full,
            recompute_fraction=ledger.recompute_fraction,
            flops=ledger.flops,
            flops_full=ledger.flops_full,
            cache_bytes=ledger.cache_bytes,
            cache_layout=str(self.layout),
            cache_budget=ledger.cache_budget,
            cache_host_bytes=ledger.cache_host_bytes,
            full_step_indices=tuple(plan.full_step_indices),
            merged_fraction=ledger.merged_fraction,
            full_step_reasons=tuple(plan.full_step_reasons),
            forecast_errors=plan.meter.errors(steps, wait=plan.run_finished) if plan.meter is not None else (),
            forecast_orders=tuple(plan.forecast_orders),
            estimate_flops=ledger.estimate_flops,
            flops_uncounted=tuple(f"{name}: {why}" for name, why in sorted(self.flops_uncounted.items())),
        )
