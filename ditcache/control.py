"""Error-controlled caching: the error of a cached value, measured where fresh values exist, chooses the
next full step.

On a partial step the recomputed tokens are computed exactly while their cached value (or its forecast)
is known too: their difference estimates the cache's error for the whole branch at no extra compute,
without bias for the part of them drawn at random. On a full step every token is fresh, and the
difference to the forecast is the error that skipping the step would have made. ``ErrorMeter`` sums
both on the device, one step at a time; ``ErrorControl`` turns the latest measurement into the next
interval as an adaptive ODE solver chooses its step size: a forecast of order ``q`` errs like
``k ** (q + 1)`` at ``k`` steps from its last full step, so a relative error ``e`` measured at ``k``
reaches the tolerance at ``N = k * (tolerance / e) ** (1 / (q + 1))``.

The interval comes from the latest full step's measurement: the error of a whole interval, the quantity the
tolerance bounds. A partial step's measurement (ToCa's recomputed tokens, FORA's probe) makes the next step
full when it passes the tolerance itself, and is not extrapolated: the errors measured a few steps after a
full step do not grow like ``k ** (q + 1)``, so that, extrapolated, they chose intervals too long (9 dB lost
at equal FLOPs on the 64-token FLUX reference) or, taken as bounds, too short (eval/BENCHMARKS.md).

Decisions use measurements made ``DECISION_LAG`` steps earlier or more: when step ``s`` is decided, step
``s - 1`` may still be running on the GPU, and waiting for it would leave the GPU idle while the host
prepares step ``s``. Step ``s - 2`` is done by then (step ``s - 1`` was queued after it), so reading its
measurement costs no stall.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

DECISION_LAG = 2
# The interval before the first measurement is at most the run's steps over this: a long first interval, set by the
# tolerance alone, skipped most of a short run unmeasured (eval/BENCHMARKS.md, "A first interval from the step count").
STEPS_PER_FIRST_INTERVAL = 7

FULL_STEP_REASONS = {
    "start": "one of the first steps, always full",
    "few_steps": "the run has no more steps than the config's min_steps: it runs uncached, keeping nothing",
    "interval": "the fixed interval (or the interval before any measurement) came round",
    "error": "the measured error, extrapolated to this step, passed the tolerance",
    "max_interval": "the error was under the tolerance, but max_interval steps had passed",
    "non_finite": "the measured error was not finite (a NaN or infinite sample): nothing bounds it, so no step is skipped",
    "memory": "a guidance stream more than the cache_memory budget was planned for appeared at the first step: the caches "
              "were dropped for a layout that fits them all, and this step keeps them anew",
}


@dataclass(frozen=True)
class ErrorControl:
    """The controller's settings (from a config's ``tolerance``).

    Args:
        tolerance: the relative RMS error of the cached branch outputs that a partial step may reach.
        max_interval: the most steps between two full steps.
        initial_interval: the interval used before the first measurement is known (at most
            ``max_interval``, and in a run of known length at most a seventh of its steps: ``first_interval``).
        random_share: share of each partial step's recomputed tokens drawn at random instead of by
            score; the estimate reads those rows only, when there are any.
        choose_order: each full step measures the forecast of every order up to the run's (order 0: the
            kept value) besides the one in force, and the steps after it forecast with the order that erred least
            there; the interval stays the one the highest order's error allows (taken from the chosen order's error,
            plain reuse's, it stretched the intervals: up to 15 dB lost on the reference DiT at 20 steps).
    """

    tolerance: float
    max_interval: int
    initial_interval: int
    random_share: float
    choose_order: bool = False

    def first_interval(self, steps: int | None) -> int:
        """The interval before the first measurement in a run of ``steps`` (None: unknown): ``initial_interval``, at
        most ``steps / STEPS_PER_FIRST_INTERVAL`` (rounded; at least one step)."""
        if steps is None:
            return self.initial_interval
        return min(self.initial_interval, max(round(steps / STEPS_PER_FIRST_INTERVAL), 1))

    def interval(self, measurements: "list[Measurement]", steps: int | None = None) -> tuple[float, str, int | None]:
        """The interval the measurements allow in a run of ``steps``, the reason a full step at that interval has (the
        full step's, or, before any, the first interval; one step when a partial step measured an error past the
        tolerance), and the forecast order chosen with it (None: no choice made)."""
        if any(not math.isfinite(measurement.error) for measurement in measurements):
            return 1.0, "non_finite", None
        if any(not measurement.full and measurement.error > self.tolerance for measurement in measurements):
            return 1.0, "error", None
        full = next((measurement for measurement in measurements if measurement.full), None)
        if full is None:
            return float(self.first_interval(steps)), "interval", None
        if not full.order_errors:
            return (*self._interval(full.since_full, full.error, full.order), None)
        if any(not math.isfinite(error) for error in full.order_errors):
            return 1.0, "non_finite", None
        # every order measured: the interval the highest order's error allows (as without the choice), forecast
        # with the order that erred least over the interval measured, the lower order where two erred alike
        errors = full.order_errors
        order = min(range(len(errors)), key=lambda order: (errors[order], order))
        return (*self._interval(full.since_full, errors[-1], len(errors) - 1), order)

    def _interval(self, since_full: int, error: float, order: int) -> tuple[float, str]:
        """The interval at which a forecast of ``order`` that erred by ``error`` at ``since_full`` steps reaches the
        tolerance."""
        if error == 0:
            return float(self.max_interval), "max_interval"
        interval = since_full * (self.tolerance / error) ** (1 / (order + 1))
        if interval >= self.max_interval:
            return float(self.max_interval), "max_interval"
        return max(interval, 1.0), "error"


@dataclass
class Measurement:
    """One step's measurement: ``sums`` = (squared error, squared fresh value) on the device, summed over
    the measured rows of every block and branch (and guidance stream) of the step, then (``orders`` > 0, a full
    step under the order choice) the squared error of the forecast of each order from 0; under context
    parallelism, summed over every rank too, with a last entry counting the ranks that measured (none: the
    step was not measured, and decides nothing)."""

    step: int
    since_full: int  # steps from the last full step before it (to the one before, for a full step)
    order: int  # the forecast order its cached values had
    full: bool  # made on a full step: the error of the whole interval before it
    sums: torch.Tensor
    orders: int = 0  # how many orders' errors follow the first two sums
    copied: torch.Tensor | None = None  # a host copy in flight (CUDA)
    event: object | None = None
    _values: list[float] | None = None

    @property
    def read(self) -> bool:
        """Whether the device value was read already."""
        return self._values is not None

    @property
    def measured(self) -> bool:
        return self._read()[2 + self.orders:] != [0.0]

    @property
    def error(self) -> float:
        """The relative RMS error (nan when a sum is not finite); reads the device value (waits for it) the
        first time."""
        return _relative(*self._read()[:2])

    @property
    def order_errors(self) -> tuple[float, ...]:
        """The relative RMS error of the forecast of each order from 0 (empty: not measured)."""
        values = self._read()
        return tuple(_relative(error, values[1]) for error in values[2:2 + self.orders])

    def _read(self) -> list[float]:
        if self._values is None:
            if self.event is not None:
                self.event.synchronize()
            self._values = (self.copied if self.copied is not None else self.sums).tolist()
        return self._values


def _relative(squared_error: float, squared_value: float) -> float:
    if not (math.isfinite(squared_error) and math.isfinite(squared_value)):
        return math.nan
    return math.sqrt(squared_error / squared_value) if squared_value > 0 else 0.0


ERROR_FLOPS = 3  # per element of a squared error: a difference, a square, a sum


def squared_error(cached: torch.Tensor, fresh: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
    """``|fresh - cached|^2`` on the device, in float32 at least; ``noise``: the squared error the cache's storage
    alone adds (float8 rounding), which no full step removes, taken off (not below 0) so that it does not
    shorten the intervals."""
    error = torch.linalg.vector_norm(fresh - cached, dtype=torch.promote_types(fresh.dtype, torch.float32)).square()
    return error if noise is None else (error - noise).clamp_min(0.0)


class ErrorMeter:
    """Per-step error sums on the device; host reads only of finished steps (``host_reads`` counts them).

    Under context parallelism (``group``: the ranks the sequence is sharded over) each rank measures its own
    tokens, and each step's sums are all-reduced over the group when the step closes: every rank then reads
    the same measurement of the whole sequence and makes the same decisions (full or partial step, interval,
    forced full step), so that all of them run the same collectives. One all-reduce per step, never per block.
    """

    def __init__(self, device: torch.device, group=None):
        self.device = device
        self.group = group
        self.measurements: list[Measurement] = []
        self.host_reads: list[tuple[int, int]] = []  # (step read, step deciding), for tests
        self._open: tuple[int, int, int, bool] | None = None  # step, since_full, order, full
        self._orders = 0  # how many orders' errors the open step measures
        self._sums: torch.Tensor | None = None

    def open_step(self, step: int, since_full: int, order: int, full: bool, orders: int = 0) -> None:
        """Start measuring ``step``; ``orders``: how many orders' errors a full step measures besides the forecast in
        force (the order choice)."""
        self.close_step()
        self._open = (step, since_full, order, full)
        self._orders = orders

    def close_step(self) -> None:
        """File the open step's sums, if anything was measured, and start their copy to the host."""
        if self.group is not None and self._open is not None:
            self._reduce()
        if self._sums is not None:
            measurement = Measurement(*self._open, sums=self._sums, orders=self._orders)
            if self._sums.device.type == "cuda":
                measurement.copied = self._sums.to("cpu", non_blocking=True)
                measurement.event = torch.cuda.Event()
                measurement.event.record()
            self.measurements.append(measurement)
        self._sums = None

    def _reduce(self) -> None:
        """Sum the step's sums over the group, with a third entry counting the ranks that measured (a rank
        that measured nothing adds zeros). Every rank files the result, read no sooner than a measurement
        without the group: no host wait here."""
        measured = self._sums is not None
        sums = self._sums.float() if measured else torch.zeros(2 + self._orders, device=self.device)
        total = torch.cat([sums, torch.full((1,), float(measured), device=sums.device)])
        torch.distributed.all_reduce(total, group=self.group)
        self._sums = total

    def add(self, error: torch.Tensor, fresh: torch.Tensor, order_errors: list[torch.Tensor] = ()) -> int:
        """Add the rows' squared error ``error`` (``squared_error``) and squared fresh values to this step's sums, on
        the device, with ``order_errors`` (the squared error of each order's forecast, as many as ``open_step`` was
        told); the FLOPs the squared values cost (the errors' are the caller's: ``ERROR_FLOPS`` per element)."""
        value = torch.linalg.vector_norm(fresh, dtype=torch.promote_types(fresh.dtype, torch.float32)).square()
        sums = torch.stack([error, value, *order_errors])
        self._sums = sums if self._sums is None else self._sums + sums
        return 2 * fresh.numel()

    def deciding(self, deciding: int, order: int, last_full: int, stored_order: int | None = None) -> list[Measurement]:
        """The measurements that decide step ``deciding``: of steps at least ``DECISION_LAG`` before it, of a
        forecast of ``order`` (one of a lower order, made before enough full steps were stored, says little
        about the forecast now in force; under the order choice a full step's must have measured every order up to
        ``stored_order``, the highest the caches hold), the latest full step's and those of the partial steps since
        the last full step ``last_full`` (earlier ones measured a cache that step has replaced)."""
        chosen = []
        for measurement in reversed(self.measurements):
            if measurement.orders:
                too_low = stored_order is not None and measurement.orders - 1 < stored_order
            else:
                too_low = measurement.order < order
            if measurement.step > deciding - DECISION_LAG or too_low:
                continue
            if not measurement.full and measurement.step < last_full:
                continue
            if not measurement.read:
                self.host_reads.append((measurement.step, deciding))
            if not measurement.measured:  # a step no rank measured
                continue
            chosen.append(measurement)
            if measurement.full:
                break
        return chosen

    def errors(self, steps: int, wait: bool) -> tuple[float, ...]:
        """Each step's relative error (nan where nothing was measured); ``wait`` reads every step's value
        (the run's end), else only those already read."""
        values = [math.nan] * steps
        pending = [Measurement(*self._open, sums=self._sums, orders=self._orders)] if self._sums is not None and wait else []
        for measurement in [*self.measurements, *pending]:
            if measurement.step < steps and (wait or measurement.read) and measurement.measured:
                values[measurement.step] = measurement.error
        return tuple(values)
