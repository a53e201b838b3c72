import pytest

from ditcache import FORAConfig, ToCaConfig
from ditcache.schedule import PRESETS, CacheSchedule, Ramp


@pytest.mark.parametrize(
    "kwargs, field, allowed",
    [
        ({"cache_ratio": 1.5}, "cache_ratio", "[0.0, 1.0]"),
        ({"cache_ratio": -0.1}, "cache_ratio", "[0.0, 1.0]"),
        ({"cache_ratio": float("nan")}, "cache_ratio", "[0.0, 1.0]"),
        ({"cache_interval": 0}, "cache_interval", ">= 1"),
        ({"cache_interval": 2.5}, "cache_interval", ">= 1"),
        ({"cache_interval": True}, "cache_interval", ">= 1"),
        ({"score": "entropy"}, "score", "'attention'"),
        ({"schedule": "fast"}, "schedule", "'constant'"),
        ({"frequency_weight": -1}, "frequency_weight", ">= 0"),
        ({"spatial_grid": 0}, "spatial_grid", ">= 1"),
        ({"full_steps_at_start": 0}, "full_steps_at_start", ">= 1"),
    ],
)
def test_toca_config_rejects_out_of_range(kwargs, field, allowed):
    with pytest.raises(ValueError) as error:
        ToCaConfig(**kwargs)
    assert f"`{field}`" in str(error.value) and allowed in str(error.value)


def test_fora_config_rejects_bad_interval():
    with pytest.raises(ValueError, match="`cache_interval` must be an integer >= 1"):
        FORAConfig(cache_interval=0)


def test_auto_resolves_to_the_family_preset_and_user_values_win():
    dit = ToCaConfig().resolve("dit")
    assert dit.score == "attention" and dit.schedule.cache_interval == 4
    assert dit.schedule.recompute == pytest.approx(0.07) and dit.spatial_grid == 2
    pixart = ToCaConfig(cache_ratio=0.9, score="random").resolve("pixart")
    assert pixart.score == "random" and pixart.schedule.recompute == pytest.approx(0.1)
    assert pixart.schedule.module_factors["cross_attn"] == 0.6
    forced = ToCaConfig(schedule="pixart").resolve("dit")
    assert forced.schedule.time == PRESETS["pixart"].time


def test_constant_schedule_recomputes_exactly_one_minus_ratio():
    schedule = ToCaConfig(cache_interval=3, cache_ratio=0.9, schedule="constant").resolve("dit").schedule
    for progress in (0.0, 0.3, 1.0):
        for layer in (0.0, 0.5, 1.0):
            assert schedule.recompute_fraction(progress, layer, "mlp") == pytest.approx(0.1)
        assert schedule.interval_at(progress) == 3


def test_dit_preset_ramps():
    schedule = ToCaConfig(cache_ratio=0.9).resolve("dit").schedule
    # time factor -1 -> 3: nothing recomputed in the first quarter, 3x at the end (clamped to 1 overall)
    assert schedule.recompute_fraction(0.2, 0.5, "mlp") == 0.0
    assert schedule.recompute_fraction(1.0, 1.0, "mlp") == pytest.approx(min(0.1 * 3 * 1.2 * 2.5, 1.0))
    assert schedule.recompute_fraction(0.5, 0.0, "mlp") == pytest.approx(0.1 * 1.0 * 0.8 * 2.5)
    # N_t = round(N / (0.6 + 0.8 p))
    assert schedule.interval_at(0.0) == round(4 / 0.6) and schedule.interval_at(1.0) == round(4 / 1.4)


def test_full_step_decisions():
    schedule = CacheSchedule(cache_interval=3, recompute=0.1, full_steps_at_start=2)
    assert [schedule.is_full_step(step, since, 0.0) for step, since in [(0, 1), (1, 1), (2, 1), (3, 2), (4, 3)]] == [
        True,
        True,
        False,
        False,
        True,
    ]
    assert CacheSchedule(cache_interval=1, recompute=0.1, interval_divisor=Ramp(0.5, 0.5)).interval_at(0.0) == 1


def test_fora_resolves_to_no_recompute():
    settings = FORAConfig(cache_interval=2).resolve("pixart")
    assert not settings.recomputes_tokens and settings.score is None
    assert settings.schedule.recompute_fraction(0.5, 0.5, "mlp") == 0.0
