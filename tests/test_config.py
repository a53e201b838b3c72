import dataclasses
import json

import numpy as np
import pytest

from ditcache import FORAConfig, ToCaConfig, ToMeConfig, preset
from ditcache.config import config_from_dict, config_to_dict
from ditcache.schedule import PRESETS, CacheSchedule, Ramp


@pytest.mark.parametrize(
    "kwargs, field, allowed",
    [
        ({"cache_ratio": 1.5}, "cache_ratio", "[0.0, 1.0]"),
        ({"cache_ratio": -0.1}, "cache_ratio", "[0.0, 1.0]"),
        ({"cache_ratio": float("nan")}, "cache_ratio", "[0.0, 1.0]"),
        ({"cache_interval": 0}, "cache_interval", "[1, 10000]"),
        ({"cache_interval": 2.5}, "cache_interval", "[1, 10000]"),
        ({"cache_interval": True}, "cache_interval", "[1, 10000]"),
        ({"cache_interval": 10**30}, "cache_interval", "[1, 10000]"),
        ({"cache_interval": np.float64(3.0)}, "cache_interval", "[1, 10000]"),
        ({"score": "entropy"}, "score", "'attention'"),
        ({"schedule": "fast"}, "schedule", "'constant'"),
        ({"frequency_weight": -1}, "frequency_weight", ">= 0"),
        ({"frequency_weight": float("inf")}, "frequency_weight", ">= 0"),
        ({"spatial_bonus": float("inf")}, "spatial_bonus", ">= 0"),
        ({"spatial_grid": 0}, "spatial_grid", "[1, 10000]"),
        ({"spatial_grid": 10_001}, "spatial_grid", "[1, 10000]"),
        ({"full_steps_at_start": 0}, "full_steps_at_start", "[1, 10000]"),
        ({"full_steps_at_start": 10**6}, "full_steps_at_start", "[1, 10000]"),
        ({"seed": -1}, "seed", f"[0, {2**64 - 1}]"),
        ({"seed": 2**64}, "seed", f"[0, {2**64 - 1}]"),
        ({"seed": "0"}, "seed", f"[0, {2**64 - 1}]"),
    ],
)
def test_toca_config_rejects_out_of_range(kwargs, field, allowed):
    with pytest.raises(ValueError) as error:
        ToCaConfig(**kwargs)
    assert f"`{field}`" in str(error.value) and allowed in str(error.value)


def test_fora_config_rejects_bad_interval():
    for value in (0, 10**30):
        with pytest.raises(ValueError, match=r"`cache_interval` must be an integer in \[1, 10000\], got"):
            FORAConfig(cache_interval=value)
    with pytest.raises(ValueError, match=r"`full_steps_at_start` must be an integer in \[1, 10000\]"):
        FORAConfig(full_steps_at_start=10_001)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"sx": 10_001}, r"`sx` must be an integer in \[1, 10000\]"),
        ({"sy": 0}, r"`sy` must be an integer in \[1, 10000\]"),
        ({"seed": 2**64}, r"`seed` must be an integer in \[0, 18446744073709551615\]"),
        ({"use_rand": "no"}, "`use_rand` must be True or False, got 'no'"),
        ({"merge_mlp": 1}, "`merge_mlp` must be True or False, got 1"),
    ],
)
def test_tome_config_rejects_out_of_range(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ToMeConfig(**kwargs)


def test_bounds_are_inclusive():
    largest = ToCaConfig(seed=2**64 - 1, cache_interval=10_000, spatial_grid=10_000, full_steps_at_start=10_000)
    assert largest.seed == 2**64 - 1 and largest.cache_interval == 10_000
    assert ToMeConfig(sx=10_000, sy=10_000, seed=2**64 - 1).sx == 10_000


def test_numpy_scalars_become_python_values():
    toca = ToCaConfig(cache_interval=np.int64(3), cache_ratio=np.float32(0.5), schedule=np.str_("constant"),
                      frequency_weight=np.float16(1), spatial_grid=np.uint8(2), seed=np.uint64(2**64 - 1),
                      forecast_order=np.int8(1))
    fora = FORAConfig(cache_interval=np.int32(2), full_steps_at_start=np.int64(1))
    tome = ToMeConfig(ratio=np.float64(0.25), sx=np.int16(3), use_rand=np.bool_(False), seed=np.int64(5))
    for config in (toca, fora, tome):
        for field in dataclasses.fields(config):
            value = getattr(config, field.name)
            assert value is None or type(value) in (int, float, bool, str), (field.name, type(value))
    assert toca.seed == 2**64 - 1 and toca.cache_ratio == 0.5 and tome.use_rand is False
    assert config_from_dict(json.loads(json.dumps(config_to_dict([toca, tome])))) == [toca, tome]


def test_configs_are_frozen_and_replace_validates():
    for config in (ToCaConfig(), FORAConfig(), ToMeConfig()):
        with pytest.raises(dataclasses.FrozenInstanceError):
            config.cache_interval = 0
        hash(config)
    with pytest.raises(ValueError, match="`cache_interval`"):
        dataclasses.replace(ToCaConfig(), cache_interval=0)
    assert type(dataclasses.replace(FORAConfig(), cache_interval=np.int64(4)).cache_interval) is int


@pytest.mark.parametrize(
    "data, message",
    [
        ({"method": "tocaa"}, "`method` must be one of 'toca', 'fora', 'tome'; got 'tocaa'"),
        ({"cache_interval": 3}, "`method` must be one of"),
        ({"method": "toca", "interval": 3}, r"unknown field\(s\) \['interval'\] for 'toca'; known: cache_interval"),
        ({"method": "toca", "cache_interval": "3"}, "`cache_interval` must be an integer"),
        ({"method": "tome", "use_rand": "false"}, "`use_rand` must be True or False"),
        ("toca", "a config must be an object"),
        ([], "give one config, or one ToCaConfig/FORAConfig together with one ToMeConfig"),
        ([{"method": "toca"}, {"method": "fora"}], "one ToCaConfig/FORAConfig together with one ToMeConfig"),
        ([{"method": "tome"}, {"method": "tome"}], "one ToCaConfig/FORAConfig together with one ToMeConfig"),
    ],
)
def test_config_from_dict_rejects_malformed_data(data, message):
    with pytest.raises(ValueError, match=message):
        config_from_dict(data)


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


@pytest.mark.parametrize("make", [ToCaConfig, FORAConfig, lambda **kwargs: preset("ditcache", **kwargs)])
def test_an_unknown_cache_precision_is_named_with_the_allowed_ones(make):
    with pytest.raises(ValueError, match="`cache_precision` must be one of 'model', 'float8_differences', 'float8'; got 'fp4'"):
        make(cache_precision="fp4")
