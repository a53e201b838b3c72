"""Forecasting caches: Taylor (Newton) extrapolation of cached branch outputs between full steps."""

import math

import numpy as np
import pytest
import torch

from ditcache import FORAConfig, ToCaConfig, apply_cache, cache_stats
from ditcache.forecast import NEWTON, Forecaster, hermite
from ditcache.store import BlockCache, CacheKey

from test_engine import run_dit, run_pixart


def polynomial(step: float, degree: int) -> torch.Tensor:
    """A (1, 4, 3) feature map whose every entry is a degree-``degree`` polynomial of the step."""
    coefficients = torch.arange(1, 13, dtype=torch.float64).view(1, 4, 3) / 7
    return sum(coefficients ** (k + 1) * (step / 10) ** k * (-1) ** k for k in range(degree + 1))


@pytest.mark.parametrize("order", [0, 1, 2, 3, 4])
@pytest.mark.parametrize("full_steps", [(0, 3, 6, 9, 12), (1, 2, 7, 8, 12)])  # even and uneven spacing
def test_order_k_forecasts_a_degree_k_polynomial_exactly(order, full_steps):
    cache = BlockCache()
    for step in full_steps:
        cache.store(CacheKey("mlp"), polynomial(step, order), step, order)
    assert cache.entries[CacheKey("mlp")].nodes == list(reversed(full_steps))[: order + 1]
    for step in (full_steps[-1] + 1, full_steps[-1] + 2, 17):
        torch.testing.assert_close(cache.current(CacheKey("mlp"), step, NEWTON), polynomial(step, order), rtol=1e-12, atol=1e-12)
        flat = torch.tensor([0, 2, 3])
        terms = cache.forecast_terms(CacheKey("mlp"), step, flat, NEWTON)
        if order == 0:
            assert terms is None
        else:
            expected = (polynomial(step, order) - polynomial(full_steps[-1], order)).view(-1, 3)[flat]
            torch.testing.assert_close(terms, expected, rtol=1e-12, atol=1e-12)
    if order:  # one degree too many is not exact: the test can tell a forecast from a copy
        cache = BlockCache()
        for step in full_steps:
            cache.store(CacheKey("mlp"), polynomial(step, order + 1), step, order)
        assert not torch.allclose(cache.current(CacheKey("mlp"), 17, NEWTON), polynomial(17, order + 1))


def taylorseer(values, steps, order: int, step: int) -> torch.Tensor:
    """TaylorSeer's forecast as diffusers computes it (``TaylorSeerState``): differences divided by the
    last interval only, ``F(k) = sum_i D^i k^i / i!`` with ``k`` the offset from the last full step."""
    factors, last = None, None
    for value, node in zip(values, steps):
        new = [value]
        for j in range(min(order, len(factors or []))):
            new.append((new[j] - factors[j]) / (node - last))
        factors, last = new, node
    return sum(factor * (step - last) ** i / math.factorial(i) for i, factor in enumerate(factors))


def feature(step: int) -> torch.Tensor:
    """A feature that is no polynomial of the step."""
    return torch.tensor([math.sin(step / 3), math.sqrt(step + 1)], dtype=torch.float64)


@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_newton_and_taylorseer_forms(order):
    """What the BlockCache docstring says: the two forecasts agree at order 1 (a line through the last two
    full steps), from order 2 on not even at even spacing N, where TaylorSeer's ``D^i / i!`` are the
    Newton divided differences."""
    for full_steps, even in (((0, 3, 6, 9, 12), True), ((1, 2, 7, 8, 12), False)):
        cache, values = BlockCache(), [feature(step) for step in full_steps]
        for value, step in zip(values, full_steps):
            cache.store(CacheKey("attn"), value, step, order)
        assert torch.allclose(cache.current(CacheKey("attn"), 14, NEWTON), taylorseer(values, full_steps, order, 14)) == (order == 1)
        if even:
            backward = values
            for i, difference in enumerate(cache.entries[CacheKey("attn")].differences, 1):
                backward = [b - a for a, b in zip(backward, backward[1:])]  # the i-th backward differences
                torch.testing.assert_close(difference, backward[-1] / 3**i / math.factorial(i), rtol=1e-12, atol=1e-12)


def test_forecast_uses_the_full_steps_it_has():
    cache = BlockCache()
    cache.store(CacheKey("attn"), polynomial(0, 2), 0, 2)
    assert cache.current(CacheKey("attn"), 3, NEWTON) is cache.kept(CacheKey("attn"))  # one full step: plain reuse
    cache.store(CacheKey("attn"), polynomial(4, 1), 4, 2)
    assert len(cache.entries[CacheKey("attn")].differences) == 1 and cache.entries[CacheKey("attn")].nodes == [4, 0]


def test_order_zero_is_the_method_without_forecasting(dit_pipe):
    for make in (lambda **k: ToCaConfig(cache_interval=3, cache_ratio=0.7, schedule="constant", **k),
                 lambda **k: FORAConfig(cache_interval=3, **k)):
        apply_cache(dit_pipe, make())
        plain, plain_stats = run_dit(dit_pipe), cache_stats(dit_pipe)
        apply_cache(dit_pipe, make(forecast_order=0))
        np.testing.assert_array_equal(run_dit(dit_pipe), plain)
        assert cache_stats(dit_pipe) == plain_stats
        apply_cache(dit_pipe, make(forecast_order=1))
        forecast = run_dit(dit_pipe)
        stats = cache_stats(dit_pipe)
        assert not np.array_equal(forecast, plain)
        assert stats.flops > plain_stats.flops  # the forecast's arithmetic is counted
        assert stats.flops < plain_stats.flops * 1.01
        assert stats.cache_bytes > plain_stats.cache_bytes  # value and first difference per branch


@pytest.mark.parametrize("order", [1, 2, 4])
def test_forecasting_runs_on_pixart_and_flux(pixart_pipe, flux_pipe, order):
    apply_cache(pixart_pipe, ToCaConfig(cache_interval=3, cache_ratio=0.8, schedule="constant", forecast_order=order))
    assert np.isfinite(run_pixart(pixart_pipe, steps=8)).all()
    apply_cache(flux_pipe, ToCaConfig(cache_interval=3, cache_ratio=0.8, schedule="constant", forecast_order=order))
    image = flux_pipe("a fox", height=32, width=32, num_inference_steps=8, output_type="np",
                      generator=torch.Generator().manual_seed(0)).images
    assert np.isfinite(image).all() and cache_stats(flux_pipe).partial_steps > 0


def test_hermite_polynomials_and_hicache_factors():
    # H_0..H_4 at x: 1, 2x, 4x^2 - 2, 8x^3 - 12x, 16x^4 - 48x^2 + 12
    for x in (-1.3, 0.0, 0.4, 2.5):
        assert [hermite(n, x) for n in range(5)] == pytest.approx([1, 2 * x, 4 * x**2 - 2, 8 * x**3 - 12 * x, 16 * x**4 - 48 * x**2 + 12])
    scale = 0.5
    factors = Forecaster("hermite", scale).factors(9, [6, 3, 0], 3)
    assert factors == pytest.approx([scale * hermite(1, scale * 3), scale**2 * hermite(2, scale * 3), scale**3 * hermite(3, scale * 3)])
    # at sigma = 1 / sqrt(2) the first factor is the offset itself: order 1 is the line, as Newton's
    assert Forecaster("hermite", 2**-0.5).factors(9, [6, 3], 1) == pytest.approx([3.0])


@pytest.mark.parametrize("full_steps", [(0, 3, 6), (1, 2, 7)])
def test_bdf2_heun_is_the_predictor_corrector_it_names(full_steps):
    """FoCa's step from the last full step s0 to s, written out from its description: BDF2's slope g0 at s0
    (the derivative of the quadratic through the three full steps), the predictor P = F0 + k g0, BDF2's slope
    at (s, P) over s1, s0, s, and Heun's average of both slopes. The cache's factors give the same."""
    values = [feature(step) for step in full_steps]
    cache = BlockCache()
    for value, step in zip(values, full_steps):
        cache.store(CacheKey("mlp"), value, step, 2)
    (s2, s1, s0), (f2, f1, f0) = full_steps, values

    def quadratic_slope(nodes, points, at):  # derivative at `at` of the quadratic through (nodes, points)
        (a, b, c), (fa, fb, fc) = nodes, points
        return (fa * ((at - b) + (at - c)) / ((a - b) * (a - c)) + fb * ((at - a) + (at - c)) / ((b - a) * (b - c))
                + fc * ((at - a) + (at - b)) / ((c - a) * (c - b)))

    forecaster = Forecaster("bdf2_heun")
    for step in (s0 + 1, s0 + 3, s0 + 8):
        k = step - s0
        g0 = quadratic_slope((s0, s1, s2), (f0, f1, f2), s0)
        predicted = f0 + k * g0
        corrected = f0 + k / 2 * (g0 + quadratic_slope((step, s0, s1), (predicted, f0, f1), step))
        torch.testing.assert_close(cache.current(CacheKey("mlp"), step, forecaster), corrected, rtol=1e-12, atol=1e-12)
    # exact for a line, not for a quadratic (the corrector damps the curvature)
    cache = BlockCache()
    for step in full_steps:
        cache.store(CacheKey("mlp"), polynomial(step, 1), step, 2)
    torch.testing.assert_close(cache.current(CacheKey("mlp"), s0 + 4, forecaster), polynomial(s0 + 4, 1), rtol=1e-12, atol=1e-12)


def test_forecasters_run_and_differ(dit_pipe, flux_pipe):
    from test_flux import run_flux

    for pipe, call in ((dit_pipe, run_dit), (flux_pipe, run_flux)):
        images = []
        for forecaster in ("newton", "hermite", "bdf2_heun"):
            apply_cache(pipe, FORAConfig(cache_interval=3, forecast_order=2, forecaster=forecaster))
            images.append(call(pipe))
            assert np.isfinite(images[-1]).all() and cache_stats(pipe).partial_steps > 0
        assert not np.array_equal(images[0], images[1]) and not np.array_equal(images[0], images[2])


def test_forecaster_settings_are_validated():
    with pytest.raises(ValueError, match="`forecaster` must be one of"):
        FORAConfig(forecast_order=1, forecaster="adams")
    with pytest.raises(ValueError, match="`forecast_order` must be 2"):
        ToCaConfig(forecast_order=1, forecaster="bdf2_heun")
    with pytest.raises(ValueError, match="give a `forecast_order`"):
        FORAConfig(forecaster="hermite")
    for scale in (0, 1.5, -0.1):
        with pytest.raises(ValueError, match="`hermite_scale`"):
            ToCaConfig(forecast_order=1, forecaster="hermite", hermite_scale=scale)


@pytest.mark.parametrize("value", [-1, 5, 1.5, True])
def test_forecast_order_is_validated(value):
    with pytest.raises(ValueError, match=r"`forecast_order` must be an integer in \[0, 4\]"):
        ToCaConfig(forecast_order=value)
    with pytest.raises(ValueError, match="forecast_order"):
        FORAConfig(forecast_order=value)


def test_named_presets():
    from ditcache import preset

    toca = preset("toca-taylor", cache_interval=4)
    assert isinstance(toca, ToCaConfig) and toca.forecast_order == 1 and toca.cache_interval == 4
    assert preset("fora-taylor") == FORAConfig(forecast_order=1)
    assert preset("toca") == ToCaConfig()
    with pytest.raises(ValueError, match="`name` must be one of"):
        preset("taylor")
    with pytest.raises(ValueError, match="forecast_order"):
        preset("fora-taylor", forecast_order=5)
