"""User-facing cache configurations.

Each config validates itself on creation and resolves, for a detected model family, into the
``EngineSettings`` the engine runs with. Fields left as ``None`` take the family's default preset
(``ditcache.schedule.PRESETS``; the generic one for a family without its own), or its published setting
with ``schedule="reference"``. ``preset(name)`` gives the named settings (``NAMED_PRESETS``).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass, fields, replace
from functools import partial

import numpy as np

from .budget import WHOLE_CHAIN, CacheLayout, MemoryBudget, parse_budget
from .codecs import CACHE_PRECISIONS
from .control import ErrorControl
from .forecast import FORECASTERS, NEWTON, Forecaster
from .schedule import PRESETS, REFERENCE_PRESETS, CacheSchedule, Preset
from .scores import SCORES

SCHEDULES = ("auto", "constant", "reference", *PRESETS)
FORA_SCHEDULES = ("auto", "reference")

MAX_FORECAST_ORDER = 4  # TaylorSeer's DiT setting
# Steps (cache_interval, full_steps_at_start) and token sizes (spatial_grid, ToMe's sx and sy): far above
# any real setting, so that a typo fails when the config is made rather than at run time.
MAX_SIZE = 10_000
MAX_SEED = 2**64 - 1  # the largest seed torch.Generator.manual_seed takes
DEFAULT_MAX_INTERVAL = 10  # error control's longest interval between full steps
DEFAULT_RANDOM_SHARE = 0.25  # error control's share of ToCa's recomputed tokens drawn at random
DITCACHE_TOLERANCE = 0.2  # preset("ditcache")'s default: about 4.2-4.6x fewer FLOPs at 42-50 dB at 50 steps
DITCACHE_MAX_INTERVAL = 12  # preset("ditcache")'s longest interval, or 3 initial intervals where longer
# preset("ditcache") chooses the forecast order by measurement from this tolerance on: -0.1 to +5.7 dB at matched FLOPs
# in 16 cells (the three references at 20, 28 and 50 steps), mixed below it (-5.4 to +5.0)
DITCACHE_CHOOSE_ORDER_FROM = 0.8
# preset("ditcache")'s cache budget: 16 hidden states for all guidance streams, at most 2 GiB at FLUX.1-dev 1024x1024
# and 12 GiB at Wan 2.1 14B 1280x720x81 (eval/BENCHMARKS.md, "A cache memory budget").
DITCACHE_CACHE_MEMORY = "16H"
# preset("ditcache") runs uncached at this many steps or fewer: caching distilled 4-8 step runs was not measured to gain
DITCACHE_MIN_STEPS = 8


def family_preset(schedule: str, family: str) -> Preset:
    """The preset a ``schedule`` option names for a model family: ``"reference"`` the published
    setting, a family name that family's default, anything else the model's own default (the generic
    one for a family without its own)."""
    if schedule == "reference":
        if family not in REFERENCE_PRESETS:
            raise ValueError(f"schedule='reference': no published setting for the {family!r} family; known: {', '.join(REFERENCE_PRESETS)}.")
        return REFERENCE_PRESETS[family]
    if schedule in PRESETS:
        return PRESETS[schedule]
    return PRESETS.get(family, PRESETS["generic"])


def _check_forecast(config) -> None:
    _check_int("forecast_order", config.forecast_order, 0, MAX_FORECAST_ORDER)
    _check_choice("forecaster", config.forecaster, FORECASTERS)
    _check_float("hermite_scale", config.hermite_scale, 0.0, 1.0)
    if config.hermite_scale == 0:
        raise ValueError("`hermite_scale` must be a number in (0, 1], got 0.0.")
    if config.forecaster == "hermite" and config.forecast_order == 0:
        raise ValueError("`forecaster='hermite'` forecasts from differences: give a `forecast_order` in [1, 4].")
    if config.forecaster == "bdf2_heun" and config.forecast_order != 2:
        raise ValueError(f"`forecaster='bdf2_heun'` uses the last three full steps: `forecast_order` must be 2, got {config.forecast_order}.")


def cache_span(layout: str) -> int:
    """``cache_layout`` as a span size: 0 per branch, 1 per block, N per span of N blocks."""
    if layout == "branch":
        return 0
    if layout == "block":
        return 1
    if layout == "chain":
        return WHOLE_CHAIN
    name, _, size = layout.partition(":") if isinstance(layout, str) else ("", "", "")
    if name != "span" or not size.isdigit() or not 2 <= int(size) <= MAX_SIZE:
        raise ValueError(f"`cache_layout` must be 'branch', 'block', 'span:N' with N in [2, {MAX_SIZE}] or 'chain', got {layout!r}.")
    return int(size)


def _check_storage(config) -> None:
    """The cache's precision, layout and budget; a residual layout keeps no branch output, so no token of a
    branch can be recomputed from it (ToCa, FORA's probe)."""
    _check_choice("cache_precision", config.cache_precision, CACHE_PRECISIONS)
    _check_bool("cache_offload", config.cache_offload)
    span = cache_span(config.cache_layout)
    if config.cache_memory is not None:
        parse_budget(config.cache_memory)
        if config.cache_offload:
            raise ValueError("`cache_memory` bounds the cache on the device, where an offloaded cache (`cache_offload=True`) "
                             "keeps only the copies of the block running and the next: give one or the other.")
    recomputes = isinstance(config, ToCaConfig) or getattr(config, "probe_ratio", 0.0) > 0
    if span and recomputes:
        what = "ToCa recomputes tokens of branch outputs" if isinstance(config, ToCaConfig) else "`probe_ratio` recomputes tokens of branch outputs"
        raise ValueError(f"`cache_layout={config.cache_layout!r}` keeps block residuals, not branch outputs, and {what}: "
                         "use cache_layout='branch' (a `cache_memory` budget then gives up precision and forecast order only).")


def _budget(config) -> MemoryBudget | None:
    return None if config.cache_memory is None else parse_budget(config.cache_memory)


def _forecaster(config) -> Forecaster:
    return NEWTON if config.forecaster == "newton" else Forecaster(config.forecaster, config.hermite_scale)


def _check_control(config) -> None:
    if config.tolerance is not None:
        _check_float("tolerance", config.tolerance, 0.0)
    _check_int("max_interval", config.max_interval, 1, MAX_SIZE)
    _check_bool("choose_order", config.choose_order)
    if config.choose_order and config.forecast_order == 0:
        raise ValueError("`choose_order` chooses among the forecast orders up to `forecast_order`: give a `forecast_order` in [1, 4].")
    changed = [name for name, default in (("max_interval", DEFAULT_MAX_INTERVAL), ("random_share", DEFAULT_RANDOM_SHARE),
                                          ("choose_order", False)) if getattr(config, name, default) != default]
    if changed and config.tolerance is None:
        raise ValueError(f"`{changed[0]}` is a setting of error control, which only a `tolerance` turns on: give a "
                         "`tolerance` with it (or leave it out).")


def _control(config, interval: int, random_share: float) -> ErrorControl | None:
    """The controller of a config with a tolerance; None without one, and with ``tolerance=0``, which makes
    every step full: uncached, bit for bit."""
    if not config.tolerance:
        return None
    return ErrorControl(config.tolerance, config.max_interval, min(interval, config.max_interval), random_share, config.choose_order)


def _check_int(name: str, value, minimum: int, maximum: int | None = None) -> None:
    bad_type = isinstance(value, bool) or not isinstance(value, numbers.Integral)
    if bad_type or value < minimum or (maximum is not None and value > maximum):
        allowed = f"in [{minimum}, {maximum}]" if maximum is not None else f">= {minimum}"
        raise ValueError(f"`{name}` must be an integer {allowed}, got {value!r}.")


def _check_float(name: str, value, low: float, high: float | None = None) -> None:
    bad_type = isinstance(value, bool) or not isinstance(value, numbers.Real)
    if bad_type or value != value or abs(value) == math.inf or value < low or (high is not None and value > high):
        allowed = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"`{name}` must be a number {allowed}, got {value!r}.")


def _check_bool(name: str, value) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"`{name}` must be True or False, got {value!r}.")


def _check_choice(name: str, value, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"`{name}` must be one of {', '.join(map(repr, choices))}; got {value!r}.")


def _normalise(config) -> None:
    """Store numpy scalars and other numbers as plain ``bool``, ``int``, ``float`` or ``str`` before the
    checks, so that a config saves as JSON and equals its reloaded copy (``object.__setattr__``: the
    configs are frozen so that no change skips the checks)."""
    for field in fields(config):
        value = getattr(config, field.name)
        if isinstance(value, (bool, np.bool_)):
            value = bool(value)
        elif isinstance(value, numbers.Integral):
            value = int(value)
        elif isinstance(value, numbers.Real):
            value = float(value)
        elif isinstance(value, str):
            value = str(value)
        object.__setattr__(config, field.name, value)


@dataclass(frozen=True)
class MergeSettings:
    """Token merging as the engine runs it (from :class:`ToMeConfig`)."""

    ratio: float
    sx: int
    sy: int
    random: bool
    branches: frozenset[str]
    seed: int | None


@dataclass(frozen=True)
class EngineSettings:
    """Everything the engine needs, with no preset left to look up."""

    method: str
    schedule: CacheSchedule
    score: str | None
    frequency_weight: float
    spatial_bonus: float
    spatial_grid: int
    seed: int
    merging: MergeSettings | None = None
    forecast_order: int = 0
    forecaster: Forecaster = NEWTON
    control: ErrorControl | None = None
    cache_precision: str = "model"
    cache_span: int = 0  # 0: per branch; N: the residual of each span of N blocks (ditcache.residual)
    cache_offload: bool = False  # values and differences in host memory, copied to the device block by block
    cache_memory: MemoryBudget | None = None
    residual_allowed: bool = False  # whether a budget may choose a residual layout (nothing recomputes branch tokens)
    min_steps: int = 0  # runs of at most this many steps run uncached

    @property
    def layout(self) -> CacheLayout:
        """The layout the config asks for, before any budget."""
        return CacheLayout(self.cache_span, self.cache_precision, self.forecast_order)

    @property
    def caches(self) -> bool:
        """Whether any step may be partial, so that branch outputs are worth keeping."""
        return self.schedule.cache_interval > 1 or self.control is not None

    def too_short(self, steps: int | None) -> bool:
        """Whether a run of ``steps`` steps (None: not known) is too short to cache (``min_steps``)."""
        return steps is not None and steps <= self.min_steps

    @property
    def recomputes_tokens(self) -> bool:
        return self.schedule.recompute > 0.0 and self.caches


@dataclass(frozen=True)
class ToCaConfig:
    """Token-wise caching (ToCa): partial steps reuse cached branch outputs and recompute the
    highest-scoring tokens of the cross-attention and MLP branches.

    Args:
        cache_interval: N, a full step every N steps (>= 1; 1 disables caching).
        cache_ratio: R, the fraction of tokens whose cached value is reused on a partial step, in
            [0, 1]. 0.9 recomputes 10% of the tokens.
        schedule: ``"auto"`` (the detected model's default preset), ``"reference"`` (the published
            setting of the detected model: its full steps, ratios and score, as the reference code
            runs them), ``"constant"`` (every step, layer and branch recomputes exactly
            ``1 - cache_ratio``), or a family's default preset (``"dit"``, ``"pixart"``, ``"flux"``,
            ``"opensora"``).
        score: which tokens to recompute: ``"attention"`` (attention received), ``"cross_attention_entropy"``,
            ``"k_norm"``, ``"v_norm"``, ``"random"`` or ``"forecast_error"`` (each token's error of the forecast
            at the last full step, measured there: block adapters only); ``"auto"`` takes the preset's.
        frequency_weight: weight of the cache-frequency term (steps since a token was recomputed,
            divided by N) relative to the L2-normalised score, whose weight is 1.
        spatial_bonus: bonus, as a fraction of the maximum score, given to the best token of each
            grid cell so that selections spread over the image; ``None`` takes the preset's.
        spatial_grid: side, in tokens, of the cells of the spatial bonus; ``None`` takes the preset's.
        full_steps_at_start: how many first steps are always full; ``None`` takes the preset's.
        seed: seed of the ``random`` score, so that runs are reproducible (at most ``2**64 - 1``).
        forecast_order: 0 reuses a branch's last full-step output; K in 1..4 reuses its Taylor (Newton)
            forecast for the step, extrapolated from the divided differences of the last K + 1 full steps
            (see :class:`ditcache.state.BlockCache`); the tokens a partial step recomputes take their
            fresh values on that step.
        forecaster: how the differences forecast (``ditcache.forecast``): ``"newton"`` (the interpolating
            polynomial), ``"hermite"`` (HiCache's scaled Hermite basis) or ``"bdf2_heun"`` (FoCa's BDF2
            predictor and Heun corrector; ``forecast_order=2``).
        hermite_scale: HiCache's scale sigma of the Hermite basis, in (0, 1].
        tolerance: error control (``ditcache.control``): instead of a fixed interval, the next full step
            comes when the cached branch outputs' relative RMS error, measured on the recomputed tokens and
            extrapolated, would pass this tolerance (>= 0; 0 makes every step full). ``cache_interval``
            is then the interval before the first measurement, at most a seventh of the run's steps
            (``ditcache.control.STEPS_PER_FIRST_INTERVAL``). ``None``: the fixed interval.
        max_interval: with a tolerance, the most steps between two full steps.
        random_share: with a tolerance, the share of each partial step's recomputed tokens drawn at random
            rather than by score, on which the error is measured without bias (0: on all recomputed tokens).
        choose_order: with a tolerance and a ``forecast_order``: each full step also measures the forecast of every
            lower order (0: the kept value), and the steps after it forecast with the order that erred least there,
            the interval still the highest order's (``ditcache.control.ErrorControl``); ``forecast_order`` is then
            the highest it may choose.
        cache_precision: how the cache stores branch outputs and forecast differences: ``"model"`` (as
            computed), ``"float8"`` (e4m3 with one scale per token, ``ditcache.codecs``: about half of bf16's
            bytes; recomputed rows then serve their step only) or ``"float8_differences"`` (the value as
            computed, its forecast differences in float8).
        cache_layout: ``"branch"`` only: ToCa recomputes tokens of branch outputs (see :class:`FORAConfig`).
        cache_memory, cache_offload: the cache's budget and its offloading to host memory, as in
            :class:`FORAConfig`; ToCa keeps the branch layout, so a budget gives up storage precision, then forecast
            order. Rows a partial step recomputes serve that step only when offloaded.
        min_steps: runs of at most this many steps run uncached, as in :class:`FORAConfig`.
    """

    cache_interval: int | None = None
    cache_ratio: float | None = None
    schedule: str = "auto"
    score: str = "auto"
    frequency_weight: float = 0.25
    spatial_bonus: float | None = None
    spatial_grid: int | None = None
    full_steps_at_start: int | None = None
    seed: int = 0
    forecast_order: int = 0
    forecaster: str = "newton"
    hermite_scale: float = 0.5
    tolerance: float | None = None
    max_interval: int = DEFAULT_MAX_INTERVAL
    random_share: float = DEFAULT_RANDOM_SHARE
    choose_order: bool = False
    cache_precision: str = "model"
    cache_layout: str = "branch"
    cache_memory: int | str | None = None
    cache_offload: bool = False
    min_steps: int = 0

    def __post_init__(self) -> None:
        _normalise(self)
        _check_control(self)
        _check_int("min_steps", self.min_steps, 0, MAX_SIZE)
        _check_float("random_share", self.random_share, 0.0, 1.0)
        _check_storage(self)
        if self.cache_interval is not None:
            _check_int("cache_interval", self.cache_interval, 1, MAX_SIZE)
        if self.cache_ratio is not None:
            _check_float("cache_ratio", self.cache_ratio, 0.0, 1.0)
        _check_choice("schedule", self.schedule, SCHEDULES)
        _check_choice("score", self.score, ("auto", *SCORES))
        _check_float("frequency_weight", self.frequency_weight, 0.0)
        if self.spatial_bonus is not None:
            _check_float("spatial_bonus", self.spatial_bonus, 0.0)
        if self.spatial_grid is not None:
            _check_int("spatial_grid", self.spatial_grid, 1, MAX_SIZE)
        if self.full_steps_at_start is not None:
            _check_int("full_steps_at_start", self.full_steps_at_start, 1, MAX_SIZE)
        _check_int("seed", self.seed, 0, MAX_SEED)
        _check_forecast(self)

    def resolve(self, family: str) -> EngineSettings:
        preset = family_preset(self.schedule, family)
        schedule = preset.schedule(
            cache_interval=1 if self.tolerance == 0 else _default(self.cache_interval, preset.cache_interval),
            cache_ratio=_default(self.cache_ratio, preset.cache_ratio),
            full_steps_at_start=_default(self.full_steps_at_start, preset.full_steps_at_start),
            constant=self.schedule == "constant",
        )
        return EngineSettings(
            method="toca",
            schedule=schedule,
            score=preset.score if self.score == "auto" else self.score,
            frequency_weight=self.frequency_weight,
            spatial_bonus=_default(self.spatial_bonus, preset.spatial_bonus),
            spatial_grid=_default(self.spatial_grid, preset.spatial_grid),
            seed=self.seed,
            forecast_order=self.forecast_order,
            forecaster=_forecaster(self),
            control=_control(self, schedule.cache_interval, self.random_share),
            cache_precision=self.cache_precision,
            cache_memory=_budget(self), cache_offload=self.cache_offload, min_steps=self.min_steps,
        )


@dataclass(frozen=True)
class FORAConfig:
    """Layer caching (FORA): partial steps reuse every branch output whole; gates are recomputed.

    Args:
        cache_interval: N, a full step every N steps (>= 1; 1 disables caching).
        full_steps_at_start: how many first steps are always full; ``None`` takes the preset's.
        forecast_order: 0 reuses the last full-step outputs; 1 to 4 their Taylor forecast for the step
            (see :class:`ToCaConfig`).
        forecaster, hermite_scale: the forecast's form, as in :class:`ToCaConfig`.
        schedule: ``"auto"`` (the detected model's default full-step rule) or ``"reference"`` (the
            published FORA runs' rule: on FLUX only step 0 is forced full).
        tolerance, max_interval, choose_order: error control, as in :class:`ToCaConfig`; without a probe the error is
            measured on full steps only (the error a reuse would have made there).
        probe_ratio: with a tolerance, the share of tokens that partial steps compute afresh, drawn at
            random, to measure the error between full steps (their fresh values are kept; their FLOPs
            counted), in [0, 1).
        cache_precision: how the cache stores branch outputs and forecast differences: ``"model"`` (as
            computed), ``"float8"`` (e4m3 with one scale per token, ``ditcache.codecs``: about half of bf16's
            bytes; recomputed rows then serve their step only) or ``"float8_differences"`` (the value as
            computed, its forecast differences in float8).
        cache_layout: what the cache keeps: ``"branch"`` (each cached branch's output), ``"block"`` (each block's
            residual, its output minus its input: one tensor per block), ``"span:N"`` (the residual of each span
            of N consecutive blocks, which partial steps skip whole) or ``"chain"`` (one residual per unbroken run
            of blocks; ``ditcache.residual``). Only ``"branch"`` serves tokens recomputed on partial steps.
        cache_memory: a budget for the cache, for all guidance streams together: bytes, or a string such as
            ``"4GiB"`` or ``"16H"`` (H: one hidden-state tensor of a call). Within it the engine keeps the
            config's own layout where it fits, else gives up, in this order, storage precision (float8), then
            coarser residual layouts, then forecast order (``ditcache.budget.layouts_to_try``), choosing at the
            start of each run from the call's shapes; a budget that no layout meets raises ``ValueError`` there,
            before anything runs, stating the minimum (``ditcache.estimate_cache_bytes`` tells it beforehand).
            ``cache_stats(...).cache_layout`` says what was chosen. ``None``: no budget.
        cache_offload: keep the cache's values and forecast differences in host memory (pinned, where CUDA is)
            and copy each block's to the device when it runs, the next block's prefetched on a side stream; for
            caches no budget fits on the device. Rows a partial step recomputes then serve that step only.
        min_steps: runs of at most this many steps (as the pipeline's scheduler or the loop's ``cache_context``
            tells them) run uncached, bit for bit, keeping nothing: every step is full, with the reason
            ``"few_steps"`` in ``cache_stats(...).full_step_reasons``. 0: every run is cached.
    """

    cache_interval: int = 3
    full_steps_at_start: int | None = None
    forecast_order: int = 0
    forecaster: str = "newton"
    hermite_scale: float = 0.5
    schedule: str = "auto"
    tolerance: float | None = None
    max_interval: int = DEFAULT_MAX_INTERVAL
    choose_order: bool = False
    probe_ratio: float = 0.0
    cache_precision: str = "model"
    cache_layout: str = "branch"
    cache_memory: int | str | None = None
    cache_offload: bool = False
    min_steps: int = 0

    def __post_init__(self) -> None:
        _normalise(self)
        _check_control(self)
        _check_int("min_steps", self.min_steps, 0, MAX_SIZE)
        _check_float("probe_ratio", self.probe_ratio, 0.0, 1.0)
        if self.probe_ratio >= 1.0:
            raise ValueError(f"`probe_ratio` must be a number in [0, 1), got {self.probe_ratio!r}.")
        if self.probe_ratio > 0 and self.tolerance is None:
            raise ValueError("`probe_ratio` measures the error for error control: give a `tolerance` with it.")
        _check_int("cache_interval", self.cache_interval, 1, MAX_SIZE)
        if self.full_steps_at_start is not None:
            _check_int("full_steps_at_start", self.full_steps_at_start, 1, MAX_SIZE)
        _check_forecast(self)
        _check_choice("schedule", self.schedule, FORA_SCHEDULES)
        _check_storage(self)

    def resolve(self, family: str) -> EngineSettings:
        preset = family_preset(self.schedule, family)
        interval = 1 if self.tolerance == 0 else self.cache_interval
        schedule = replace(preset.fora_schedule(interval, self.full_steps_at_start), recompute=self.probe_ratio)
        return EngineSettings(
            method="fora", schedule=schedule, score="random" if self.probe_ratio else None, frequency_weight=0.0,
            spatial_bonus=0.0, spatial_grid=1, seed=0, forecast_order=self.forecast_order,
            forecaster=_forecaster(self), control=_control(self, schedule.cache_interval, 1.0),
            cache_precision=self.cache_precision, cache_span=cache_span(self.cache_layout), cache_memory=_budget(self),
            residual_allowed=self.probe_ratio == 0, cache_offload=self.cache_offload, min_steps=self.min_steps,
        )


@dataclass(frozen=True)
class ToMeConfig:
    """Token merging (ToMe for diffusion) on the image token grid, alone or with ToCa or FORA.

    Args:
        ratio: share of the image tokens merged away in each merged branch, in [0, 1) (0 merges
            nothing and gives the unmerged output exactly).
        sx, sy: cell size, in tokens, of the destination grid: one destination per ``sx x sy`` cell.
        use_rand: a random destination within each cell (else the cell's first token).
        merge_attn, merge_crossattn, merge_mlp: which branches run on merged tokens.
        seed: seed of the random destinations (``None``: torch's global generator, as tomesd does).
    """

    ratio: float = 0.5
    sx: int = 2
    sy: int = 2
    use_rand: bool = True
    merge_attn: bool = True
    merge_crossattn: bool = False
    merge_mlp: bool = False
    seed: int | None = None

    def __post_init__(self) -> None:
        _normalise(self)
        _check_float("ratio", self.ratio, 0.0, 1.0)
        if self.ratio >= 1.0:
            raise ValueError(f"`ratio` must be a number in [0, 1), got {self.ratio!r}.")
        _check_int("sx", self.sx, 1, MAX_SIZE)
        _check_int("sy", self.sy, 1, MAX_SIZE)
        for name in ("use_rand", "merge_attn", "merge_crossattn", "merge_mlp"):
            _check_bool(name, getattr(self, name))
        if self.seed is not None:
            _check_int("seed", self.seed, 0, MAX_SEED)

    def merge_settings(self) -> MergeSettings | None:
        """None when nothing would be merged, so that the model runs exactly as without merging."""
        branches = {"attn": self.merge_attn, "cross_attn": self.merge_crossattn, "mlp": self.merge_mlp}
        chosen = frozenset(name for name, on in branches.items() if on)
        if self.ratio == 0 or not chosen:
            return None
        return MergeSettings(self.ratio, self.sx, self.sy, self.use_rand, chosen, self.seed)

    def resolve(self, family: str) -> EngineSettings:
        """Merging alone: every step full."""
        schedule = CacheSchedule(cache_interval=1, recompute=0.0)
        return EngineSettings(
            method="tome", schedule=schedule, score=None, frequency_weight=0.0, spatial_bonus=0.0, spatial_grid=1, seed=0,
            merging=self.merge_settings(),
        )


CacheConfig = ToCaConfig | FORAConfig | ToMeConfig
CONFIG_CLASSES = {"toca": ToCaConfig, "fora": FORAConfig, "tome": ToMeConfig}


def _split(configs: CacheConfig | list[CacheConfig] | tuple[CacheConfig, ...]) -> tuple[list, list]:
    """The caching configs and the ToMeConfigs of ``configs``, checked to compose: one config, or one
    ToCaConfig/FORAConfig with one ToMeConfig."""
    items = list(configs) if isinstance(configs, (list, tuple)) else [configs]
    for item in items:
        if not isinstance(item, (ToCaConfig, FORAConfig, ToMeConfig)):
            raise TypeError(f"config must be a ToCaConfig, FORAConfig or ToMeConfig, got {type(item).__name__}.")
    caching = [c for c in items if not isinstance(c, ToMeConfig)]
    merging = [c for c in items if isinstance(c, ToMeConfig)]
    if len(caching) > 1 or len(merging) > 1 or not items:
        raise ValueError("give one config, or one ToCaConfig/FORAConfig together with one ToMeConfig.")
    return caching, merging


def resolve_configs(configs: CacheConfig | list[CacheConfig] | tuple[CacheConfig, ...], family: str) -> EngineSettings:
    """Settings of one config, or of a caching config (ToCa or FORA) composed with a ToMeConfig."""
    caching, merging = _split(configs)
    if not caching:
        return merging[0].resolve(family)
    settings = caching[0].resolve(family)
    if not merging:
        return settings
    if settings.cache_span:
        raise ValueError("token merging runs inside the branches, which a residual `cache_layout` skips on partial steps "
                         "and runs as diffusers wrote them on full steps: use cache_layout='branch' with ToMeConfig.")
    # a budget keeps the merged branches' layout: merging runs through the block adapters
    return replace(settings, merging=merging[0].merge_settings(), residual_allowed=False)


def ditcache_initial_interval(tolerance: float) -> int:
    """``preset("ditcache")``'s interval before the first measurement: ``2 sqrt(tolerance / 0.2)``, rounded,
    at least 1. The first full steps are not controlled (the forecast of the order in force is measured from
    the fourth full step on), so that with a fixed start a large tolerance only stretches the later
    intervals; spacing the start like the controller spaces an order-1 forecast (the order in force over the
    first steps) gained 3-11 dB at 5.6-6.4x on the 64-token references at 50 steps, and costs 2-3 dB beyond
    3x at 20 steps (eval/BENCHMARKS.md, "The first interval"); the engine caps the first interval at a seventh
    of the run's steps (``ErrorControl.first_interval``: 2-6 dB gained beyond 3x at 20 and 28 steps)."""
    return max(round(2 * math.sqrt(tolerance / 0.2)), 1)


def ditcache_config(tolerance: float = DITCACHE_TOLERANCE, recompute: float = 0.0, **changes) -> FORAConfig | ToCaConfig:
    """ditcache's own cache, for every family (block adapters and the generic path): whole branches
    reused between full steps as FoCa's BDF2/Heun forecast, and the next full step chosen by error control
    from the error each full step measures of the interval before it. ``tolerance`` is the one knob (speed
    against fidelity): it sets the controller's bound and the interval before its first measurement
    (``ditcache_initial_interval``, at most a seventh of the run's steps; from 3 on, one first full step on every family;
    a ``cache_interval`` given takes its place, and the first full steps and longest interval follow it). From tolerance 0.8 on, the forecast
    order is chosen by measurement (``choose_order``). Runs of 8 steps or fewer run
    uncached (``min_steps=8``: caching distilled few-step runs has no measured gain yet). Its cache holds at most 16
    hidden states (``cache_memory="16H"``; ``cache_memory=None`` lifts the budget). ``changes`` override any field. Chosen on the three reference models at 20 and 50 steps (eval/BENCHMARKS.md, "ditcache's own cache").

    ``recompute`` > 0 makes it token-wise (a :class:`ToCaConfig`, block adapters only): each partial step also
    computes afresh that share of the tokens of the branches ToCa recomputes, those whose forecast erred most at
    the last full step (``score="forecast_error"``), a quarter of them drawn at random, on which the error is
    measured between full steps too."""
    _check_float("tolerance", tolerance, 0.0)
    _check_float("recompute", recompute, 0.0, 1.0)
    if recompute >= 1.0:
        raise ValueError(f"`recompute` must be a number in [0, 1), got {recompute!r}.")
    initial = ditcache_initial_interval(tolerance)
    if "cache_interval" in changes:  # a first interval by hand: the first full steps and longest interval follow it
        _check_int("cache_interval", changes["cache_interval"], 1, MAX_SIZE)
        initial = changes["cache_interval"]
    # A long start replaces the family's first full steps (three on FLUX) by one: 3-11 dB at 5.6-6.4x on the
    # 64-token FLUX reference; a short one keeps them: one cost the 256-token reference 5 dB at 4.5x.
    start = 1 if initial >= 3 else None
    # the largest tolerances ask for intervals past any run: held at the longest a config takes
    settings = dict(cache_interval=min(initial, MAX_SIZE), full_steps_at_start=start, forecast_order=2, forecaster="bdf2_heun",
                    max_interval=min(max(DITCACHE_MAX_INTERVAL, 3 * initial), MAX_SIZE),
                    choose_order=tolerance >= DITCACHE_CHOOSE_ORDER_FROM and changes.get("forecast_order", 2) > 0,
                    # an offloaded cache is bounded by host memory, not by the device budget
                    cache_memory=None if changes.get("cache_offload") else DITCACHE_CACHE_MEMORY, min_steps=DITCACHE_MIN_STEPS)
    if recompute:
        token_wise = dict(cache_ratio=1.0 - recompute, schedule="constant", score="forecast_error", frequency_weight=0.0, spatial_bonus=0.0)
        return ToCaConfig(tolerance=tolerance, **settings | token_wise | changes)
    return FORAConfig(tolerance=tolerance, **settings | changes)


def config_to_dict(config: CacheConfig | list[CacheConfig]) -> dict | list[dict]:
    """A JSON-ready dict naming the method (a list of them for composed configs), for saving next to a pipeline."""
    if isinstance(config, (list, tuple)):
        return [config_to_dict(item) for item in config]
    method = next(name for name, cls in CONFIG_CLASSES.items() if isinstance(config, cls))
    return {"method": method, **asdict(config)}


def config_from_dict(data: dict | list[dict]) -> CacheConfig | list[CacheConfig]:
    """The inverse of ``config_to_dict``; validates like the constructors do. Anything malformed (read
    from a file: a wrong shape, an unknown field) raises ``ValueError``."""
    if isinstance(data, list):
        configs = [_config_from_object(item) for item in data]
        _split(configs)
        return configs
    return _config_from_object(data)


def _config_from_object(data: dict) -> CacheConfig:
    if not isinstance(data, dict):
        raise ValueError(f"a config must be an object with a `method`, got {data!r}.")
    values = dict(data)
    method = values.pop("method", None)
    _check_choice("method", method, tuple(CONFIG_CLASSES))
    known = [field.name for field in fields(CONFIG_CLASSES[method])]
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ValueError(f"unknown field(s) {unknown} for {method!r}; known: {', '.join(known)}.")
    return CONFIG_CLASSES[method](**values)


def _default(value, preset_value):
    return preset_value if value is None else value


# Named settings. The Taylor variants forecast with order 1: on the reference DiT (DDIM, 20 steps) it beat
# plain reuse by 4-9 dB PSNR at equal FLOPs and order 2 by 1-2 dB; on the reference FLUX (flow matching,
# 20 steps) it lost 1-5 dB from N=3 on (eval/BENCHMARKS.md, "Forecasting"). Hence no default change.
NAMED_PRESETS = {
    "toca": ToCaConfig,
    "fora": FORAConfig,
    "tome": ToMeConfig,
    "toca-taylor": partial(ToCaConfig, schedule="constant", score="v_norm", cache_ratio=0.9, forecast_order=1),
    "fora-taylor": partial(FORAConfig, forecast_order=1),
    # The published method of each family (full steps, ratios, score), resolved when applied.
    "toca-reference": partial(ToCaConfig, schedule="reference"),
    "fora-reference": partial(FORAConfig, schedule="reference"),
    "ditcache": ditcache_config,
}


def preset(name: str, **changes) -> CacheConfig:
    """A named setting (``"toca"``, ``"fora"``, ``"tome"``, ``"toca-taylor"``, ``"fora-taylor"``,
    ``"toca-reference"``, ``"fora-reference"``, ``"ditcache"``) with ``changes`` to its fields, e.g.
    ``preset("fora-taylor", cache_interval=4)`` or ``preset("ditcache", tolerance=0.4)`` (faster, less
    faithful; 0 is uncached)."""
    _check_choice("name", name, tuple(NAMED_PRESETS))
    return NAMED_PRESETS[name](**changes)
