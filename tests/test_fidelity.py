"""ToCa as published: the reference presets' full steps, the cache-frequency counter, pre-norm keys and
the frequency term's divisor, each checked against what the reference code does."""

import contextlib
import warnings

import numpy as np
import pytest
import torch

import ditcache
from ditcache import FORAConfig, ToCaConfig, apply_cache, cache_stats, record_selections
from ditcache.adapters.flux import _score_taps
from diffusers.hooks.hooks import CacheContext, _set_cache_context

from ditcache.hooks import STEP_HOOK
from ditcache.eval.builders import flux_transformer
from ditcache.schedule import REFERENCE_PRESETS
from test_opensora import call_inputs, sample, tiny_stdit3

# Full steps (0-based) of the reference code's blocks 1..27, worked out from its schedulers.
REFERENCE_FULL_STEPS = {
    ("dit", 50, 3): [0, 5, 9, 13, 19, 22, 25, 28, 31, 33, 35, 37, 39, 41, 43, 45, 47, 49],
    ("pixart", 20, 3): [0, 6, 9, 12, 15, 18],
    ("flux", 50, 4): [0, 1, 2, *range(6, 50, 4)],
    ("opensora", 30, 3): [0, 1, 2, *range(3, 30, 3)],
}
REFERENCE_FORA_FULL_STEPS = {("flux", 50, 3): list(range(0, 50, 3))}
OPENSORA_CROSS_ATTENTION_STEPS = [0, 1, 2, 6, 12, 18, 24]


def planned_full_steps(schedule, steps):
    """The steps a resolved schedule makes full in a run of ``steps`` whose step count is known."""
    if schedule.full_step_rule == "grid":
        return [step for step, full in enumerate(schedule.full_step_plan(steps)) if full]
    full, since = [], 0
    for step in range(steps):
        since += 1
        if schedule.is_full_step(step, since, schedule.progress(step, steps)):
            full.append(step)
            since = 0
    return full


@pytest.mark.parametrize(("family", "steps", "interval"), list(REFERENCE_FULL_STEPS))
def test_reference_preset_full_steps_equal_the_reference_code(family, steps, interval):
    config = ditcache.preset("toca-reference", cache_interval=interval)
    schedule = config.resolve(family).schedule
    assert planned_full_steps(schedule, steps) == REFERENCE_FULL_STEPS[family, steps, interval]


def test_reference_fora_on_flux_forces_only_the_first_step():
    schedule = ditcache.preset("fora-reference", cache_interval=3).resolve("flux").schedule
    assert planned_full_steps(schedule, 50) == REFERENCE_FORA_FULL_STEPS["flux", 50, 3]


def test_reference_opensora_cross_attention_runs_every_sixth_step():
    schedule = ditcache.preset("toca-reference").resolve("opensora").schedule
    full = planned_full_steps(schedule, 30)
    due = [step for n, step in enumerate(full) if schedule.branch_due("cross_attn", step, n + 1)]
    assert due == OPENSORA_CROSS_ATTENTION_STEPS


def test_reference_presets_carry_the_published_ratio_and_score():
    settings = {family: ditcache.preset("toca-reference").resolve(family) for family in REFERENCE_PRESETS}
    assert {family: (round(1 - s.schedule.recompute, 2), s.score) for family, s in settings.items()} == {
        "dit": (0.93, "attention"),
        "pixart": (0.7, "cross_attention_entropy"),
        "flux": (0.9, "attention"),  # the published ImageReward 0.98 at N=4 used the attention score
        "opensora": (0.9, "cross_attention_entropy"),
    }
    dit = settings["dit"].schedule
    # DiT DDIM-50: 0.07 x (3 - 4 i / n) x layer x 2.5 on the MLP, i counting down: nothing early, most late
    assert dit.recompute_fraction(dit.progress(0, 50), 1.0, "mlp") == 0.0
    assert dit.recompute_fraction(dit.progress(49, 50), 0.0, "mlp") == pytest.approx(0.07 * (3 - 4 * 0 / 50) * 0.8 * 2.5)


def test_dit_pipeline_runs_the_reference_full_steps(dit_pipe):
    """The reference DDIM-50 grid, end to end through the pipeline (the step count comes from it)."""
    apply_cache(dit_pipe, ditcache.preset("toca-reference"))
    dit_pipe(class_labels=[1], num_inference_steps=50, generator=torch.Generator().manual_seed(0), output_type="np")
    assert list(cache_stats(dit_pipe).full_step_indices) == REFERENCE_FULL_STEPS["dit", 50, 3]


def test_bare_transformer_with_the_grid_rule_warns_and_falls_back(dit_pipe):
    apply_cache(dit_pipe.transformer, ditcache.preset("toca-reference"))
    latents = torch.randn(2, 4, 8, 8)
    with pytest.warns(UserWarning, match="step count"):
        dit_pipe.transformer(latents, timestep=torch.tensor([999, 999]), class_labels=torch.tensor([1, 1000]))


@contextlib.contextmanager
def cache_context(transformer, name: str, **where):
    """What ``transformer.cache_context(name, **where)`` does on the models that have it (DiT's has not)."""
    _set_cache_context(transformer, CacheContext(name, **where))
    try:
        yield
    finally:
        _set_cache_context(transformer, None)


def custom_loop(transformer, scheduler, steps: int, names=("cfg",), context=True):
    """A hand-written DDIM loop over a bare DiT transformer; each name one call per step, in the loop's
    cache context with ``step_index`` and ``num_inference_steps`` (with ``context``)."""
    scheduler.set_timesteps(steps)
    latents, labels = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([1, 1000])
    for index, t in enumerate(scheduler.timesteps):
        for name in names:
            where = {"step_index": index, "num_inference_steps": steps} if context else {}
            with cache_context(transformer, name, **where):
                out = transformer(latents, timestep=t.expand(2), class_labels=labels).sample
        latents = scheduler.step(out[:, :4], t, latents).prev_sample
    return latents


def test_a_custom_loop_that_gives_its_step_in_the_cache_context_runs_the_grid(dit_pipe):
    """The step count comes from diffusers' CacheContext where a loop sets it: the reference grid on a bare
    transformer, as the pipeline runs it; two names at a step are two guidance streams; step 0 starts a run."""
    transformer = dit_pipe.transformer
    apply_cache(transformer, ditcache.preset("toca-reference"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "needs the run's step count" fallback
        custom_loop(transformer, dit_pipe.scheduler, 50)
    assert list(cache_stats(transformer).full_step_indices) == REFERENCE_FULL_STEPS["dit", 50, 3]
    custom_loop(transformer, dit_pipe.scheduler, 6, names=("cond", "uncond"))
    run = transformer._diffusers_hook.get_hook(STEP_HOOK).run
    assert cache_stats(transformer).steps == 6 and run.caches.blocks == {}  # a finished run keeps no cache
    custom_loop(transformer, dit_pipe.scheduler, 1, names=("cond", "uncond"))
    custom_loop(transformer, dit_pipe.scheduler, 1, names=("cond", "uncond"))  # the same first timestep: a new run
    assert cache_stats(transformer).steps == 1
    with pytest.warns(UserWarning, match="step count"):  # without the step in the context: the bare-transformer fallback
        custom_loop(transformer, dit_pipe.scheduler, 6, context=False)


# -- the cache-frequency counter ------------------------------------------------------------------
def test_counters_are_zeroed_on_every_full_step_that_recomputes_the_branch():
    """OpenSora: on a full step where cross-attention is not due (steps 3, 9, 15 of the reference grid) the
    MLP is still recomputed whole, so the next partial step's frequency term must be zero."""
    model = tiny_stdit3()
    config = ToCaConfig(cache_interval=3, full_steps_at_start=1, spatial_bonus=0.0)  # the entropy score refreshes only with cross-attention
    apply_cache(model, config)
    steps = tuple(1000.0 - 50.0 * i for i in range(14))
    with record_selections(model) as events:
        sample(model, call_inputs(), steps=steps)
    full = cache_stats(model).full_step_indices
    first_partial = {step + 1 for step in full if step + 1 < len(steps) and step + 1 not in full}
    mlp = [event for event in events if event.branch == "mlp" and event.step in first_partial]
    assert mlp and all(torch.count_nonzero(event.frequency) == 0 for event in mlp)
    later = [event for event in events if event.branch == "mlp" and event.step not in first_partial]
    assert later and all(torch.count_nonzero(event.frequency) > 0 for event in later)


def test_frequency_term_divides_by_the_base_interval(dit_pipe):
    """The DiT preset shortens the interval in force; the frequency term still counts in units of N."""
    interval = 4
    apply_cache(dit_pipe, ToCaConfig(cache_interval=interval, score="random"))
    with record_selections(dit_pipe) as events:
        dit_pipe(class_labels=[1], num_inference_steps=30, generator=torch.Generator().manual_seed(0), output_type="np")
    counts = torch.cat([event.frequency.flatten() for event in events]) * interval / 0.25
    assert torch.count_nonzero(counts) and torch.allclose(counts, counts.round(), atol=1e-5)
    schedule = ToCaConfig(cache_interval=interval).resolve("dit").schedule
    assert {schedule.interval_at(p) for p in np.linspace(0, 1, 30)} != {interval}  # the interval in force varies


# -- norm scores read keys before the QK norm -------------------------------------------------------
@pytest.mark.parametrize("joint", [True, False])
def test_flux_k_norm_reads_keys_before_the_qk_norm(joint):
    transformer = flux_transformer(num_layers=1, num_single_layers=1)
    attn = (transformer.transformer_blocks[0] if joint else transformer.single_transformer_blocks[0]).attn
    taps = _score_taps(attn, "k_norm", joint=joint)
    assert taps["key"] is attn.to_k and (not joint or taps["text_key"] is attn.add_k_proj)
    assert all(module not in (attn.norm_k, getattr(attn, "norm_added_k", None)) for module in taps.values())


def test_flux_k_norm_score_is_the_norm_of_the_projected_keys(flux_pipe):
    """The stored base score equals the head-averaged norm of ``to_k``'s output, which the RMS-normalised
    keys would flatten (their norms are nearly constant)."""
    block = flux_pipe.transformer.transformer_blocks[0]
    keys = []
    handle = block.attn.to_k.register_forward_hook(lambda _m, _i, out: keys.append(out))
    apply_cache(flux_pipe, ToCaConfig(cache_interval=2, cache_ratio=0.5, score="k_norm", schedule="constant", full_steps_at_start=1))
    with record_selections(flux_pipe) as events:
        flux_pipe("a digit", num_inference_steps=3, height=32, width=32, max_sequence_length=16,
                  generator=torch.Generator().manual_seed(0), output_type="np")
    handle.remove()
    event = next(e for e in events if e.block == "transformer_blocks.0" and e.branch == "mlp")
    key = keys[0].unflatten(-1, (block.attn.heads, -1))
    expected = key.norm(dim=-1).mean(dim=-1)
    expected = expected / expected.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(event.score, expected, rtol=1e-4, atol=1e-6)
    normalised = block.attn.norm_k(key).norm(dim=-1).mean(dim=-1)
    assert normalised.std() / normalised.mean() < 0.1 * key.norm(dim=-1).mean(dim=-1).std() / key.norm(dim=-1).mean()


def test_fora_reference_resolves_per_family():
    assert FORAConfig(schedule="reference").resolve("flux").schedule.full_steps_at_start == 1
    assert FORAConfig().resolve("flux").schedule.full_steps_at_start == 3
    with pytest.raises(ValueError, match="`schedule`"):
        FORAConfig(schedule="constant")
