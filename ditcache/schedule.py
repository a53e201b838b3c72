"""When to run a full step and how many tokens to recompute on the others.

Everything here is plain arithmetic on step progress and layer position: no model classes. The named
presets carry the reference hyper-parameters of each model family; ``constant`` switches every
modulation off so that ``cache_ratio`` means exactly what it says.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Mapping


@dataclass(frozen=True)
class Ramp:
    """A factor that moves linearly from ``start`` (position 0) to ``end`` (position 1)."""

    start: float
    end: float

    def __call__(self, position: float) -> float:
        return self.start + (self.end - self.start) * position


FLAT = Ramp(1.0, 1.0)


@dataclass(frozen=True)
class CacheSchedule:
    """A resolved schedule: full-step decisions and per-branch recompute fractions.

    Args:
        cache_interval: the base interval N between full steps.
        recompute: the base fraction of tokens recomputed on a partial step, ``1 - cache_ratio``.
        full_steps_at_start: the first steps that are always full.
        interval_divisor: N is divided by this ramp over progress (the reference shortens the
            interval late in sampling for DiT and PixArt); ``FLAT`` keeps N constant.
        time, layer: ramps over step progress and block depth multiplying ``recompute``.
        module_factors: per-branch multipliers of ``recompute`` (missing branches use 1).
        full_step_periods: branches that a full step after the first ones recomputes only every k-th
            time (reused on the others, as on a partial step): OpenSora's cross-attention runs every
            6 steps while the other branches run every 3.
        full_step_rule: ``"interval"``: a full step comes ``N_t`` steps after the last one (FLUX's
            reference counter); ``"grid"``: a step is full when the reference's step counter is a
            multiple of the interval in force (the DiT, PixArt and OpenSora references), a rule that
            needs the run's step count (see :meth:`full_step_plan`).
        count_down: the grid's step counter runs from ``num_steps - 1`` down to 0 (DiT's diffusion
            loop) instead of up from 0.
        forced_interval: ``(start, end, interval)``: the interval in force while the grid's counter is
            in ``[int(start * num_steps), int(end * num_steps))`` (DiT's sensitive steps).
    """

    cache_interval: int
    recompute: float
    full_steps_at_start: int = 1
    interval_divisor: Ramp = FLAT
    time: Ramp = FLAT
    layer: Ramp = FLAT
    module_factors: Mapping[str, float] = field(default_factory=lambda: MappingProxyType({}))
    full_step_periods: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))
    full_step_rule: str = "interval"
    count_down: bool = False
    forced_interval: tuple[float, float, int] | None = None

    @property
    def needs_step_count(self) -> bool:
        return self.full_step_rule == "grid" and self.cache_interval > 1

    def branch_due(self, branch: str, step: int, full_steps_done: int) -> bool:
        """Whether a full step (``full_steps_done`` counting it) recomputes ``branch`` whole."""
        period = self.full_step_periods.get(branch, 1)
        if period == 1 or step < self.full_steps_at_start:
            return True
        return (full_steps_done - self.full_steps_at_start) % period == 0

    def interval_at(self, progress: float) -> int:
        """The interval in force at ``progress`` (0 at the first step, 1 at the last); N = 1 stays 1."""
        if self.cache_interval == 1:
            return 1
        return max(1, round(self.cache_interval / self.interval_divisor(progress)))

    def progress(self, step: int, num_steps: int) -> float:
        """Position of ``step`` in the run for the ramps. The grid rule takes the reference's own
        measure (its counter over the step count), so that its ramps give the reference's numbers."""
        if self.full_step_rule == "grid":
            counter = self._counter(step, num_steps)
            position = 1.0 - counter / num_steps if self.count_down else counter / num_steps
            return min(max(position, 0.0), 1.0)
        return min(step / (num_steps - 1), 1.0) if num_steps > 1 else 0.0

    def is_full_step(self, step: int, steps_since_full: int, progress: float) -> bool:
        """The interval rule's decision, once per denoising step, before the first block runs."""
        return step < self.full_steps_at_start or steps_since_full >= self.interval_at(progress)

    def full_step_plan(self, num_steps: int) -> tuple[bool, ...]:
        """The grid rule's decisions for a run of ``num_steps``: which steps are full.

        As in the reference code, the interval is re-evaluated (from that step's progress) only on
        steps that are full under the interval in force before it, so a shortened interval takes
        effect from the next multiple of the old one.
        """
        interval, plan = self.cache_interval, []
        for step in range(num_steps):
            counter = self._counter(step, num_steps)
            first = step < self.full_steps_at_start
            if first or counter % interval == 0:
                interval = self._grid_interval(step, num_steps)
            plan.append(first or counter % interval == 0)
        return tuple(plan)

    def _counter(self, step: int, num_steps: int) -> int:
        return num_steps - 1 - step if self.count_down else step

    def _grid_interval(self, step: int, num_steps: int) -> int:
        if self.forced_interval is not None:
            start, end, interval = self.forced_interval
            if int(start * num_steps) <= self._counter(step, num_steps) < int(end * num_steps):
                return interval
        return self.interval_at(self.progress(step, num_steps))

    def recompute_fraction(self, progress: float, layer_position: float, branch: str) -> float:
        """Fraction of tokens a partially computed branch recomputes, clamped to [0, 1]."""
        if self.recompute == 0.0:
            return 0.0
        fraction = (
            self.recompute
            * self.time(progress)
            * self.layer(layer_position)
            * self.module_factors.get(branch, 1.0)
        )
        return min(max(fraction, 0.0), 1.0)


@dataclass(frozen=True)
class Preset:
    """Defaults of one model family (see the design notes for their sources). ``fora_full_steps_at_start``:
    the first full steps of FORA where they differ from ToCa's (the FLUX reference forces only step 0)."""

    cache_interval: int
    cache_ratio: float
    full_steps_at_start: int
    interval_divisor: Ramp
    time: Ramp
    layer: Ramp
    module_factors: Mapping[str, float]
    score: str
    spatial_bonus: float
    spatial_grid: int
    full_step_periods: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))
    full_step_rule: str = "interval"
    count_down: bool = False
    forced_interval: tuple[float, float, int] | None = None
    fora_full_steps_at_start: int | None = None

    def schedule(self, cache_interval: int, cache_ratio: float, full_steps_at_start: int, constant: bool) -> CacheSchedule:
        rule = {"full_step_rule": self.full_step_rule, "count_down": self.count_down}
        if constant:
            return CacheSchedule(cache_interval, 1.0 - cache_ratio, full_steps_at_start, **rule)
        return CacheSchedule(
            cache_interval=cache_interval,
            recompute=1.0 - cache_ratio,
            full_steps_at_start=full_steps_at_start,
            interval_divisor=self.interval_divisor,
            time=self.time,
            layer=self.layer,
            module_factors=self.module_factors,
            full_step_periods=self.full_step_periods,
            forced_interval=self.forced_interval,
            **rule,
        )

    def fora_schedule(self, cache_interval: int, full_steps_at_start: int | None) -> CacheSchedule:
        """FORA: this family's full-step rule with a constant interval and nothing recomputed (the
        references shorten the interval and force the sensitive steps only for ToCa)."""
        if full_steps_at_start is None:
            full_steps_at_start = self.fora_full_steps_at_start or self.full_steps_at_start
        return CacheSchedule(
            cache_interval=cache_interval,
            recompute=0.0,
            full_steps_at_start=full_steps_at_start,
            full_step_periods=self.full_step_periods,
            full_step_rule=self.full_step_rule,
            count_down=self.count_down,
        )


PRESETS: Mapping[str, Preset] = MappingProxyType(
    {
        # DiT-XL/2, DDIM 50: N_t = N / (0.6 + 0.8 p); no recompute in the first quarter, up to 3x late.
        "dit": Preset(
            cache_interval=4,
            cache_ratio=0.93,
            full_steps_at_start=1,
            interval_divisor=Ramp(0.6, 1.4),
            time=Ramp(-1.0, 3.0),
            layer=Ramp(0.8, 1.2),
            module_factors=MappingProxyType({"mlp": 2.5}),
            score="attention",
            spatial_bonus=0.6,
            spatial_grid=2,
        ),
        # PixArt-alpha/Sigma, DPM-Solver 20: N_t = N / (0.8 + 0.4 p); more recompute early and shallow.
        "pixart": Preset(
            cache_interval=3,
            cache_ratio=0.70,
            full_steps_at_start=1,
            interval_divisor=Ramp(0.8, 1.2),
            time=Ramp(1.9, 0.1),
            layer=Ramp(1.6, 0.4),
            module_factors=MappingProxyType({"cross_attn": 0.6, "mlp": 1.6}),
            score="cross_attention_entropy",
            spatial_bonus=0.4,
            spatial_grid=4,
        ),
        # FLUX.1: first 3 steps full, constant N; layer factor 1.5 - i/27 over the 38 single-stream
        # blocks (FLUX.1-dev's depth; stretched over other depths); double-stream MLPs x0.4,
        # single-stream MLP x1.6; random scores; no spatial bonus.
        "flux": Preset(
            cache_interval=4,
            cache_ratio=0.90,
            full_steps_at_start=3,
            interval_divisor=FLAT,
            time=FLAT,
            layer=Ramp(1.5, 1.5 - 37 / 27),
            module_factors=MappingProxyType({"mlp": 0.4, "context_mlp": 0.4, "single_mlp": 1.6}),
            score="random",
            spatial_bonus=0.0,
            spatial_grid=1,
        ),
        # OpenSora 1.2 (STDiT3, rectified flow 30): first 3 steps full, then every 3; cross-attention
        # every 6 (every other full step) and never partially; MLP 1.5 x (1 - R) = 15% recomputed.
        "opensora": Preset(
            cache_interval=3,
            cache_ratio=0.90,
            full_steps_at_start=3,
            interval_divisor=FLAT,
            time=FLAT,
            layer=FLAT,
            module_factors=MappingProxyType({"cross_attn": 0.0, "mlp": 1.5}),
            score="cross_attention_entropy",
            spatial_bonus=0.0,
            spatial_grid=1,
            full_step_periods=MappingProxyType({"cross_attn": 2}),
        ),
        # Every other model (the generic path, layer caching only): the first 2 steps full, then every 3.
        "generic": Preset(
            cache_interval=3,
            cache_ratio=0.90,
            full_steps_at_start=2,
            interval_divisor=FLAT,
            time=FLAT,
            layer=FLAT,
            module_factors=MappingProxyType({}),
            score="random",
            spatial_bonus=0.0,
            spatial_grid=1,
        ),
    }
)


# The published settings, as the reference code runs them (its commands for DiT DDIM-50, PixArt-alpha
# DPM-Solver 20, FLUX.1-dev 50 and OpenSora 1.2 rectified flow 30; docs/reference-fidelity.md): each
# family's default with what the reference does differently.
REFERENCE_PRESETS: Mapping[str, Preset] = MappingProxyType(
    {
        # Counter i from n-1 down to 0; full when i % N_t == 0 with N_t = round(3 / (1.4 - 0.8 i / n)),
        # and N_t = 2 while i is in [0.2 n, 0.4 n).
        "dit": replace(PRESETS["dit"], cache_interval=3, full_step_rule="grid", count_down=True, forced_interval=(0.2, 0.4, 2)),
        # Counter from 0 up; full when step % N_t == 0 with N_t = round(3 / (0.8 + 0.4 step / n)).
        "pixart": replace(PRESETS["pixart"], full_step_rule="grid"),
        # The published ImageReward (0.98 at N = 4) used the attention score; FORA forces only step 0.
        "flux": replace(PRESETS["flux"], score="attention", fora_full_steps_at_start=1),
        # Full at steps 0-2 and every step % 3 == 0; cross-attention at steps 0-2 and step % 6 == 0.
        "opensora": replace(PRESETS["opensora"], full_step_rule="grid"),
    }
)
