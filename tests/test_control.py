"""Error-controlled caching: the measured error of cached values, and the schedule that follows it."""

import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from ditcache import FORAConfig, ToCaConfig, apply_cache, cache_stats, preset, record_selections, remove_cache
from ditcache.control import DECISION_LAG, ErrorControl, ErrorMeter, Measurement, squared_error
from ditcache.state import CallSignature, RunState
from ditcache.store import BlockCache, CacheKey

from test_engine import run_dit, run_pixart
from test_generic import build, run

STEPS = 30


def polynomial(step: int, degree: int) -> torch.Tensor:
    """A (1, 64, 4) feature map whose entries are degree-``degree`` polynomials of the step."""
    coefficients = torch.linspace(0.5, 1.5, 256, dtype=torch.float64).view(1, 64, 4)
    return sum(coefficients ** (k + 1) * (step / STEPS) ** k for k in range(degree + 1))


def synthetic_run(features, config, steps: int = STEPS):
    """The engine's bookkeeping of one cached branch whose fresh value at each step is ``features(step)``:
    full steps measure the forecast against the fresh value and store it, partial steps measure a quarter of
    the rows, as the block adapters do."""
    return synthetic_state(features, config, steps).stats()


def synthetic_state(features, config, steps: int = STEPS) -> RunState:
    """``synthetic_run``'s run, ended, for its error meter."""
    run = RunState(config.resolve("generic"))
    run.start(CallSignature(1, (64,), torch.float64, torch.device("cpu")), steps - 1.0, tuple(range(steps - 1, -1, -1)), False)
    cache, rows, key = BlockCache(), torch.arange(0, 64, 4), CacheKey("branch")
    for step in range(steps):
        run.begin_step(steps - 1.0 - step)
        fresh = features(step)
        if run.plan.is_full:
            if key in cache:
                run.measure_kept(cache, key, fresh)
            cache.store(key, fresh, step, config.forecast_order)
        else:
            run.measure_rows(cache.current(key, step, run.forecaster)[:, rows], fresh[:, rows])
    run.end_call()
    return run


@pytest.mark.parametrize("order", [0, 1, 2])
def test_polynomial_features_need_no_full_step_beyond_the_first_and_the_longest_interval(order):
    config = FORAConfig(cache_interval=6, max_interval=6, forecast_order=order, full_steps_at_start=order + 1, tolerance=1e-6)
    steps = 42  # the first interval, 6, is a seventh of the run: not shortened
    stats = synthetic_run(lambda step: polynomial(step, order), config, steps=steps)
    start = tuple(range(order + 1))
    assert stats.full_step_indices == start + tuple(range(order + 6, steps, 6))
    # the first interval is the initial one: no full step has measured a whole interval before it
    assert stats.full_step_reasons == ("start",) * (order + 1) + ("interval",) + ("max_interval",) * (len(stats.full_step_indices) - order - 2)
    measured = [error for error in stats.forecast_errors[order + 1:]]
    assert max(measured) < 1e-12  # exact forecasts: nothing to correct


def test_a_jump_triggers_a_full_step_as_soon_as_its_measurement_is_read():
    jump = 17

    def features(step):
        return polynomial(step, 1) + (0.5 if step >= jump else 0.0)

    config = FORAConfig(cache_interval=4, max_interval=6, forecast_order=1, full_steps_at_start=2, tolerance=0.01)
    stats = synthetic_run(features, config)
    assert stats.full_step_indices[:4] == (0, 1, 5, 11)  # exact forecasts until the jump
    assert stats.forecast_errors[jump] > 0.1 and stats.forecast_errors[jump - 1] < 1e-12
    # measured at the jump, read DECISION_LAG steps later: the first step it can decide is full
    first_after = next(index for index in stats.full_step_indices if index > jump)
    assert first_after == jump + DECISION_LAG
    assert stats.full_step_reasons[stats.full_step_indices.index(first_after)] == "error"


def test_the_controller_follows_the_step_size_formula():
    control = ErrorControl(tolerance=0.1, max_interval=8, initial_interval=3, random_share=0.25)
    assert control.interval([]) == (3.0, "interval", None)
    at = lambda error, since, order, full=True: Measurement(0, since, order, full, torch.tensor([error**2, 1.0], dtype=torch.float64))  # noqa: E731
    assert control.interval([at(0.4, 2, 1)])[0] == pytest.approx(2 * (0.1 / 0.4) ** 0.5)
    assert control.interval([at(0.05, 2, 0)]) == (4.0, "error", None)
    assert control.interval([at(0.001, 2, 0)]) == (8.0, "max_interval", None)
    assert control.interval([at(0.0, 2, 0)]) == (8.0, "max_interval", None)
    assert control.interval([at(5.0, 1, 0)]) == (1.0, "error", None)  # never below one step
    # a partial step's measurement makes the next step full when past the tolerance, and else says nothing
    assert control.interval([at(0.001, 1, 0, full=False), at(0.05, 2, 0)]) == (4.0, "error", None)
    assert control.interval([at(0.09, 1, 0, full=False), at(0.05, 2, 0)]) == (4.0, "error", None)
    assert control.interval([at(0.11, 1, 0, full=False), at(0.05, 2, 0)]) == (1.0, "error", None)
    assert control.interval([at(0.001, 1, 0, full=False)]) == (3.0, "interval", None)  # before any full step's


def test_the_order_choice_forecasts_with_the_order_that_erred_least():
    """The interval is the one the highest order's error allows, as without the choice; the order is the one that
    erred least over the interval measured, the lower one on a tie."""
    control = ErrorControl(tolerance=0.1, max_interval=8, initial_interval=3, random_share=0.25, choose_order=True)

    def full_step(*errors, since=4):  # the error of the forecast in force first, then of orders 0, 1, 2
        sums = torch.tensor([errors[-1] ** 2, 1.0, *(error**2 for error in errors)], dtype=torch.float64)
        return Measurement(0, since, 2, True, sums, orders=len(errors))

    interval, reason, order = control.interval([full_step(0.05, 0.2, 0.3)])
    assert (order, reason) == (0, "error") and interval == pytest.approx(4 * (0.1 / 0.3) ** (1 / 3))
    interval, reason, order = control.interval([full_step(0.3, 0.1, 0.2, since=2)])
    assert order == 1 and interval == pytest.approx(2 * (0.1 / 0.2) ** (1 / 3))
    assert control.interval([full_step(0.2, 0.2, 0.01)]) == (8.0, "max_interval", 2)
    assert control.interval([full_step(0.0, 0.0, 0.0)]) == (8.0, "max_interval", 0)  # a tie: the lowest order
    assert control.interval([full_step(0.1, math.nan, 0.1)])[::2] == (1.0, None)
    with pytest.raises(ValueError, match="choose_order.*forecast_order"):
        FORAConfig(tolerance=0.1, choose_order=True)
    with pytest.raises(ValueError, match="choose_order.*tolerance"):
        FORAConfig(forecast_order=2, choose_order=True)


def test_the_order_choice_reuses_noisy_features_and_forecasts_those_on_a_curve():
    """Under ``choose_order`` partial steps forecast with the order that erred least at the last full step: plain
    reuse for a branch whose fresh values scatter about a constant (differences only amplify the scatter), the
    quadratic for one on a parabola; the full steps stay those the highest order's error allows."""
    def noisy(step):
        scatter = torch.randn(1, 64, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(step))
        return torch.ones(1, 64, 4, dtype=torch.float64) + 0.01 * scatter

    config = FORAConfig(cache_interval=3, max_interval=6, forecast_order=2, full_steps_at_start=3, tolerance=0.05)
    for features, chosen in ((noisy, 0), (lambda step: polynomial(step, 2), 2)):
        fixed = synthetic_run(features, config)
        choosing = synthetic_run(features, replace(config, choose_order=True))
        assert choosing.full_step_indices == fixed.full_step_indices
        # the first full step that measured every order (the fourth) decides from DECISION_LAG steps after it on
        decided = choosing.full_step_indices[3] + DECISION_LAG
        assert set(fixed.forecast_orders[decided:]) == {2}
        assert set(choosing.forecast_orders[decided:]) == {chosen}
        partial = [step for step in range(decided, STEPS) if step not in choosing.full_step_indices]
        errors = [(fixed.forecast_errors[step], choosing.forecast_errors[step]) for step in partial]
        if chosen == 0:  # reuse errs by the scatter (0.01 sqrt 2); the quadratic through scattered values more
            assert max(error for _, error in errors) < 0.02 < 0.03 < max(error for error, _ in errors)
        else:
            assert max(max(pair) for pair in errors) < 1e-12  # exact
        # measuring every order costs a forecast and an error norm more per order, on full steps only
        assert choosing.estimate_flops > fixed.estimate_flops


def test_under_the_order_choice_the_error_in_force_is_the_measured_error_of_its_order():
    """A full step under ``choose_order`` makes each order's forecast once: the error that sets the interval is the
    entry of the per-order errors at the order in force, not a forecast made again."""
    config = FORAConfig(cache_interval=3, max_interval=6, forecast_order=2, full_steps_at_start=3, tolerance=0.05, choose_order=True)
    meter = synthetic_state(lambda step: polynomial(step, 3), config).plan.meter
    chosen = [m for m in meter.measurements if m.full and m.orders]
    assert all(m._read()[0] == m._read()[2 + m.order] for m in chosen)
    # once three full steps are kept, the three orders err apart on a cubic
    assert sum(len({*m._read()[2:2 + m.orders]}) == 3 for m in chosen) >= 2


@pytest.mark.parametrize("steps, first", [(9, 1), (20, 3), (28, 4), (50, 6), (100, 6)])
def test_the_first_interval_is_derived_from_the_step_count(steps, first):
    """The interval before the first measurement is the tolerance's (6 steps at 1.6), at most a seventh of the run:
    a short run starts with shorter intervals, measured sooner."""
    config = preset("ditcache", tolerance=1.6, cache_memory=None)
    assert config.resolve("generic").control.first_interval(steps) == first
    stats = synthetic_run(lambda step: polynomial(step, 3), config, steps=steps)
    assert stats.full_step_indices[:4] == (0, first, 2 * first, 3 * first)
    assert stats.full_step_reasons[1:4] == ("interval",) * 3


def test_the_preset_chooses_the_forecast_order_from_tolerance_0_8():
    assert [preset("ditcache", tolerance=t).choose_order for t in (0.2, 0.79, 0.8, 3.2)] == [False, False, True, True]
    assert not preset("ditcache", tolerance=1.6, forecast_order=0, forecaster="newton").choose_order


def test_a_step_is_decided_from_measurements_the_device_finished_before():
    """The host reads a measurement only ``DECISION_LAG`` steps after its step, at most one per step: on a
    GPU the stream then holds the step in between, and never waits for the host."""
    meter = ErrorMeter(torch.device("cpu"))
    for step in range(8):
        meter.open_step(step, 1, 0, full=step % 3 == 0)
        meter.add(squared_error(torch.zeros(3), torch.ones(3) * (step + 1)), torch.ones(3) * (step + 1))
        # decided from step - 1 back to the latest full step's measurement (steps 0, 3, 6), partial steps'
        # only since the last full step
        last_full = 3 * (step // 3)
        readable = [m for m in meter.measurements if m.step <= step + 1 - DECISION_LAG]
        expected = [m for m in readable[3 * ((len(readable) - 1) // 3):][::-1] if m.full or m.step >= last_full]
        assert meter.deciding(step + 1, 0, last_full) == expected
    meter.close_step()
    # a partial step's measurement from before the last full step no longer counts
    assert [m.step for m in meter.deciding(9, 0, last_full=6)] == [7, 6]
    assert [m.step for m in meter.deciding(9, 0, last_full=8)] == [6]
    assert all(deciding - read >= DECISION_LAG for read, deciding in meter.host_reads)


def test_tolerance_zero_equals_uncached_bit_for_bit(dit_pipe, pixart_pipe, flux_pipe):
    from test_flux import run_flux

    for pipe, call in ((dit_pipe, run_dit), (pixart_pipe, run_pixart), (flux_pipe, run_flux)):
        baseline = call(pipe)
        for config in (ToCaConfig(tolerance=0), FORAConfig(tolerance=0, forecast_order=2)):
            apply_cache(pipe, config)
            np.testing.assert_array_equal(call(pipe), baseline)
            assert cache_stats(pipe).partial_steps == 0
        remove_cache(pipe)


def test_error_control_on_a_real_run_reports_why_each_step_was_full(flux_pipe, monkeypatch):
    from test_flux import run_flux

    meters = []
    monkeypatch.setattr("ditcache.state.ErrorMeter", lambda device, group: meters.append(ErrorMeter(device, group)) or meters[-1])
    apply_cache(flux_pipe, ToCaConfig(schedule="constant", cache_ratio=0.5, score="random", tolerance=0.3, max_interval=4))
    with record_selections(flux_pipe) as events:
        run_flux(flux_pipe, steps=12)
    stats = cache_stats(flux_pipe)
    assert stats.partial_steps > 0 and len(stats.full_step_reasons) == stats.full_steps
    assert set(stats.full_step_reasons) <= {"start", "interval", "error", "max_interval"}
    assert len(stats.forecast_errors) == stats.steps and math.isnan(stats.forecast_errors[0])
    assert all(math.isfinite(error) and error > 0 for error in stats.forecast_errors[1:])  # full and partial steps measure
    assert events and all(event.error is not None and event.error >= 0 for event in events)
    assert 0 < stats.estimate_flops < 0.02 * stats.flops  # the estimate's cost, counted (at width 32 here)
    (meter,) = meters
    reads = meter.host_reads
    assert reads and all(deciding - read >= DECISION_LAG for read, deciding in reads)
    assert len({deciding for _, deciding in reads}) == len(reads)


def test_the_random_share_of_the_recomputed_tokens_comes_last_and_is_measured(dit_pipe):
    apply_cache(dit_pipe, ToCaConfig(cache_interval=3, cache_ratio=0.5, schedule="constant", score="k_norm", tolerance=0.5, random_share=0.5))
    with record_selections(dit_pipe) as events:
        run_dit(dit_pipe)
    for event in events:
        count = event.tokens.shape[1]
        top = event.tokens[:, : count - count // 2]
        total = event.score + event.frequency + event.bonus
        assert total.gather(1, top).min() >= total.topk(top.shape[1]).values.min() - 1e-6
        assert event.error is not None
    remove_cache(dit_pipe)


def test_fora_measures_on_full_steps_and_on_its_probe():
    model = build("sd3")
    apply_cache(model, FORAConfig(tolerance=0.2, cache_interval=3))
    run(model, "sd3")
    plain = cache_stats(model)
    assert math.isfinite(plain.forecast_errors[1])
    partial = [step for step in range(plain.steps) if step not in plain.full_step_indices]
    assert partial and all(math.isnan(plain.forecast_errors[step]) for step in partial)

    apply_cache(model, FORAConfig(tolerance=0.2, cache_interval=3, probe_ratio=0.25))
    run(model, "sd3")
    probed = cache_stats(model)
    partial = [step for step in range(probed.steps) if step not in probed.full_step_indices]
    assert partial and all(math.isfinite(probed.forecast_errors[step]) for step in partial)


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(tolerance=-0.1), "`tolerance`"),
        (dict(tolerance=math.nan), "`tolerance`"),
        (dict(tolerance=0.1, max_interval=0), "`max_interval`"),
        (dict(tolerance=0.1, random_share=1.5), "`random_share`"),
        (dict(max_interval=8), "`max_interval` is a setting of error control"),
        (dict(random_share=0.5), "`random_share` is a setting of error control"),
    ],
)
def test_bad_control_settings_are_refused_when_the_config_is_made(change, message):
    with pytest.raises(ValueError, match=message):
        ToCaConfig(**change)


def test_the_preset_takes_any_tolerance_without_naming_settings_the_user_never_gave():
    config = preset("ditcache", tolerance=1e6)
    assert config.cache_interval <= config.max_interval == 10_000
    with pytest.raises(ValueError, match="`max_interval` is a setting of error control"):
        FORAConfig(max_interval=4)


def test_a_probe_without_a_tolerance_is_refused():
    with pytest.raises(ValueError, match="`probe_ratio`"):
        FORAConfig(probe_ratio=0.1)
    with pytest.raises(ValueError, match="`probe_ratio`"):
        FORAConfig(tolerance=0.1, probe_ratio=1.0)


ESTIMATE_FACTOR = 1.5  # measured at most 1.24 (FLUX), 1.10 (DiT), 1.18 (scenes) at 20 and 50 steps


@pytest.mark.parametrize("name", ["digits-dit", "digits-flux", "digits-scenes"])
def test_the_estimate_matches_the_true_error_of_the_stale_tokens(name, monkeypatch):
    """On the reference models, every token is recomputed on partial steps (score ``random``, cache ratio 0),
    so the error of every token's forecast is known. (1) The engine's own estimate, from the quarter of rows it
    draws at random, matches the error of all rows within 10%. (2) A default ToCa step (cache ratio 0.9,
    random share 0.25) measures ``random_count(round(0.1 T), 0.25)`` random rows per branch: drawn at random
    from these rows, their estimate matches the error of the 90% left stale within ``ESTIMATE_FACTOR``, at
    every partial step."""
    from ditcache.adapters.base import BlockAdapter, gather_rows
    from ditcache.scores import random_count

    rows = {}  # step: [(squared error, squared value) per row, (batch, tokens), per measured branch]
    measure = BlockAdapter.measure

    def recording_measure(self, run, cached, selection, fresh):
        if not run.plan.is_full:
            difference = (fresh - gather_rows(cached, selection)).float()
            rows.setdefault(run.plan.step, []).append((difference.square().sum(-1), fresh.float().square().sum(-1)))
        measure(self, run, cached, selection, fresh)

    monkeypatch.setattr(BlockAdapter, "measure", recording_measure)
    from ditcache.eval.control_check import reference_images

    pipe, call = reference_images(name, steps=20)
    apply_cache(pipe, ToCaConfig(schedule="constant", score="random", cache_ratio=0.0, forecast_order=1, cache_interval=4,
                                 tolerance=1e6, max_interval=4, frequency_weight=0.0, spatial_bonus=0.0))
    call()
    engine_estimates = cache_stats(pipe).forecast_errors
    generator = torch.Generator().manual_seed(0)
    relative = lambda sums: math.sqrt(sums[0] / sums[1])  # noqa: E731
    assert len(rows) >= 10
    for step, branches in rows.items():
        everything = relative([sum(float(part.sum()) for part in parts) for parts in zip(*branches)])
        assert everything > 1e-3 and engine_estimates[step] == pytest.approx(everything, rel=0.1), step
        estimate, stale = [0.0, 0.0], [0.0, 0.0]
        for error, value in branches:
            tokens = error.shape[1]
            recomputed = round(0.1 * tokens)
            drawn = random_count(recomputed, 0.25)
            order = torch.randperm(tokens, generator=generator)  # the engine's draw: uniform over the tokens not chosen by score
            error, value = error[:, order], value[:, order]
            estimate = [estimate[0] + float(error[:, :drawn].sum()), estimate[1] + float(value[:, :drawn].sum())]
            stale = [stale[0] + float(error[:, recomputed:].sum()), stale[1] + float(value[:, recomputed:].sum())]
        assert 1 / ESTIMATE_FACTOR < relative(estimate) / relative(stale) < ESTIMATE_FACTOR, step


def test_the_ditcache_preset_runs_on_block_adapters_and_the_generic_path(dit_pipe, flux_pipe):
    from ditcache import preset
    from test_flux import run_flux
    from test_generic import run as run_generic

    config = preset("ditcache")
    assert (config.forecaster, config.forecast_order, config.tolerance, config.full_steps_at_start) == ("bdf2_heun", 2, 0.2, None)
    assert preset("ditcache", tolerance=0.4).full_steps_at_start == 1
    # the interval before the first measurement grows like sqrt(tolerance); the longest one with it
    assert [preset("ditcache", tolerance=t).cache_interval for t in (0.03, 0.1, 0.2, 0.4, 0.8, 1.6, 3.2)] == [1, 1, 2, 3, 4, 6, 8]
    assert preset("ditcache", tolerance=3.2).max_interval == 24 and preset("ditcache", tolerance=0.4).max_interval == 12
    assert preset("ditcache", tolerance=0.8, cache_interval=2).cache_interval == 2
    with pytest.raises(ValueError, match="tolerance"):
        preset("ditcache", tolerance=-1)
    assert preset("ditcache", tolerance=0.4).tolerance == 0.4 and preset("ditcache", tolerance=0).resolve("flux").control is None
    for pipe, call in ((dit_pipe, lambda pipe: run_dit(pipe, steps=16)), (flux_pipe, lambda pipe: run_flux(pipe, steps=16))):
        apply_cache(pipe, preset("ditcache", tolerance=0.5))
        assert np.isfinite(call(pipe)).all()
        stats = cache_stats(pipe)
        assert stats.partial_steps > 0 and "start" in stats.full_step_reasons
        remove_cache(pipe)
    model = build("sd3")
    apply_cache(model, preset("ditcache", tolerance=0.5))
    outputs = run_generic(model, "sd3")
    assert all(torch.isfinite(output).all() for output in outputs) and cache_stats(model).partial_steps > 0


def test_the_preset_runs_a_short_run_uncached_bit_for_bit_and_says_so(dit_pipe, flux_pipe):
    """``min_steps``: a run of at most that many steps (the preset's 8) keeps nothing, not even the run's constants,
    and is the uncached model's, every step full for the reason "few_steps"; one step more caches."""
    from test_flux import run_flux

    for pipe, call in ((dit_pipe, run_dit), (flux_pipe, run_flux)):
        baseline = call(pipe, steps=8)
        apply_cache(pipe, preset("ditcache", tolerance=0.8))
        np.testing.assert_array_equal(call(pipe, steps=8), baseline)
        stats = cache_stats(pipe)
        assert stats.full_step_reasons == ("few_steps",) * 8 and stats.cache_bytes == 0
        assert stats.cache_budget == 0  # nothing to keep: the budget's layout is not even planned
        call(pipe, steps=9)
        assert cache_stats(pipe).partial_steps > 0 and "few_steps" not in cache_stats(pipe).full_step_reasons
        remove_cache(pipe)
    with pytest.raises(ValueError, match="`min_steps` must be an integer"):
        FORAConfig(min_steps=-1)


def test_the_token_wise_preset_recomputes_its_share_of_the_worst_forecast_tokens(flux_pipe):
    """``preset("ditcache", recompute=R)``: the preset's full steps and forecast, plus on each partial step the
    share R of the recomputed branches' tokens, those whose forecast erred most at the last full step (a quarter
    drawn at random, on which the error is measured); block adapters only."""
    from test_flux import run_flux

    config = preset("ditcache", tolerance=0.3, recompute=0.25, min_steps=0)
    assert isinstance(config, ToCaConfig) and (config.score, config.cache_ratio, config.forecaster) == ("forecast_error", 0.75, "bdf2_heun")
    apply_cache(flux_pipe, config)
    with record_selections(flux_pipe) as events:
        run_flux(flux_pipe, steps=12)
    stats = cache_stats(flux_pipe)
    remove_cache(flux_pipe)
    assert stats.partial_steps > 0 and stats.recompute_fraction == pytest.approx(0.25, abs=0.02)
    partial = [step for step in range(stats.steps) if step not in stats.full_step_indices]
    assert all(math.isfinite(stats.forecast_errors[step]) for step in partial)  # measured on the recomputed tokens
    scored = [event for event in events if event.score.abs().sum() > 0]
    assert scored and all(event.frequency.abs().sum() == 0 and event.bonus.abs().sum() == 0 for event in events)
    for event in scored:  # the tokens chosen by score are the top of the last full step's error
        count = event.tokens.shape[1]
        top = event.tokens[:, : count - round(count * 0.25)]
        assert event.score.gather(1, top).min() >= event.score.topk(top.shape[1]).values.min() - 1e-6
    for bad in (1.0, -0.1):
        with pytest.raises(ValueError, match="recompute"):
            preset("ditcache", recompute=bad)
    with pytest.raises(ValueError, match="forecast_error.*block adapters"):
        apply_cache(build("sd3"), preset("ditcache", recompute=0.1))
