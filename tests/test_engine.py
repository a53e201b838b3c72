"""The engine through the pipelines' own ``__call__``: equivalence, lifecycle, robustness."""

import numpy as np
import pytest
import torch

from ditcache import FORAConfig, ToCaConfig, apply_cache, cache_config, cache_stats, remove_cache
from ditcache.eval.builders import dit_transformer
from ditcache.hooks import BLOCK_HOOK, STEP_HOOK


def run_dit(pipe, steps=8, labels=(0, 1), seed=0, **kwargs):
    generator = torch.Generator().manual_seed(seed)
    return pipe(class_labels=list(labels), num_inference_steps=steps, generator=generator, output_type="np", **kwargs).images


def run_pixart(pipe, steps=6, prompt="a red fox in snow", seed=0, **kwargs):
    generator = torch.Generator().manual_seed(seed)
    kwargs.setdefault("use_resolution_binning", False)
    return pipe(prompt, num_inference_steps=steps, generator=generator, output_type="np", clean_caption=False, **kwargs).images


def hooks_left(module):
    return [name for name, m in module.named_modules() if hasattr(m, "_diffusers_hook") or "forward" in m.__dict__]


def test_interval_one_equals_uncached_dit(dit_pipe):
    baseline = run_dit(dit_pipe)
    apply_cache(dit_pipe, ToCaConfig(cache_interval=1))
    np.testing.assert_array_equal(run_dit(dit_pipe), baseline)
    assert cache_stats(dit_pipe).partial_steps == 0


def test_interval_one_equals_uncached_pixart(pixart_pipe):
    baseline = run_pixart(pixart_pipe)
    apply_cache(pixart_pipe, ToCaConfig(cache_interval=1))
    np.testing.assert_array_equal(run_pixart(pixart_pipe), baseline)
    apply_cache(pixart_pipe, FORAConfig(cache_interval=1))
    np.testing.assert_array_equal(run_pixart(pixart_pipe), baseline)


@pytest.mark.parametrize("config", [ToCaConfig(cache_interval=3), FORAConfig(cache_interval=2)])
def test_remove_restores_bit_identical_output_and_leaves_no_hook(dit_pipe, config):
    baseline = run_dit(dit_pipe)
    assert hooks_left(dit_pipe.transformer) == []
    apply_cache(dit_pipe, config)
    cached = run_dit(dit_pipe)
    assert not np.array_equal(cached, baseline)
    remove_cache(dit_pipe)
    assert hooks_left(dit_pipe.transformer) == []
    np.testing.assert_array_equal(run_dit(dit_pipe), baseline)
    with pytest.raises(RuntimeError, match="not applied"):
        cache_stats(dit_pipe)


def test_applying_twice_replaces_instead_of_stacking(dit_pipe):
    apply_cache(dit_pipe, ToCaConfig(cache_interval=2))
    once = run_dit(dit_pipe)
    apply_cache(dit_pipe, FORAConfig(cache_interval=4))
    apply_cache(dit_pipe, ToCaConfig(cache_interval=2))
    assert dit_pipe.transformer._diffusers_hook._hook_order == [STEP_HOOK]
    for block in dit_pipe.transformer.transformer_blocks:
        assert block._diffusers_hook._hook_order == [BLOCK_HOOK]
    np.testing.assert_array_equal(run_dit(dit_pipe), once)
    assert cache_config(dit_pipe) == ToCaConfig(cache_interval=2)


@pytest.mark.parametrize("score", ["attention", "k_norm", "v_norm", "random"])
def test_consecutive_runs_are_identical_and_caching_changes_the_output(dit_pipe, score):
    baseline = run_dit(dit_pipe)
    apply_cache(dit_pipe, ToCaConfig(cache_interval=3, cache_ratio=0.5, schedule="constant", score=score))
    first, second = run_dit(dit_pipe), run_dit(dit_pipe)
    np.testing.assert_array_equal(first, second)
    assert not np.array_equal(first, baseline)
    stats = cache_stats(dit_pipe)
    assert (stats.steps, stats.full_steps, stats.full_step_indices) == (8, 3, (0, 3, 6))
    assert stats.recompute_fraction == pytest.approx(0.5)
    assert 0 < stats.flops < stats.flops_full and stats.cache_bytes > 0


def test_random_score_seed_changes_the_selection(dit_pipe):
    apply_cache(dit_pipe, ToCaConfig(cache_interval=3, cache_ratio=0.5, schedule="constant", score="random", seed=1))
    first = run_dit(dit_pipe)
    apply_cache(dit_pipe, ToCaConfig(cache_interval=3, cache_ratio=0.5, schedule="constant", score="random", seed=2))
    assert not np.array_equal(run_dit(dit_pipe), first)


@pytest.mark.parametrize("score", ["cross_attention_entropy", "attention"])
def test_pixart_toca_runs_with_guidance_and_preset(pixart_pipe, score):
    apply_cache(pixart_pipe, ToCaConfig(cache_interval=2, score=score))
    first = run_pixart(pixart_pipe)
    np.testing.assert_array_equal(run_pixart(pixart_pipe), first)
    stats = cache_stats(pixart_pipe)
    assert stats.partial_steps == 3 and stats.recompute_fraction > 0
    assert pixart_pipe.transformer._diffusers_hook.get_hook(STEP_HOOK).run.guidance_batch


def test_other_resolution_or_batch_after_a_cached_run(dit_pipe, pixart_pipe):
    apply_cache(dit_pipe, ToCaConfig(cache_interval=3))
    run_dit(dit_pipe)
    assert run_dit(dit_pipe, labels=(0, 1, 1)).shape[0] == 3
    apply_cache(pixart_pipe, ToCaConfig(cache_interval=3))
    run_pixart(pixart_pipe)
    assert run_pixart(pixart_pipe, height=24, width=16).shape[1:3] == (24, 16)
    assert cache_stats(pixart_pipe).steps == 6
    remove_cache(pixart_pipe)
    uncached = run_pixart(pixart_pipe, height=24, width=16)
    apply_cache(pixart_pipe, ToCaConfig(cache_interval=1))
    np.testing.assert_array_equal(run_pixart(pixart_pipe, height=24, width=16), uncached)


@pytest.mark.parametrize("failing_call", [1, 5])  # block 1 of the first step, or of a partial step
def test_a_run_that_raised_does_not_poison_the_next(dit_pipe, failing_call):
    apply_cache(dit_pipe, ToCaConfig(cache_interval=3))
    expected = run_dit(dit_pipe)
    calls = {"n": 0}

    def fail_in_block(module, args):
        calls["n"] += 1
        if calls["n"] == failing_call:
            raise RuntimeError("boom")

    handle = dit_pipe.transformer.transformer_blocks[1].register_forward_pre_hook(fail_in_block)
    with pytest.raises(RuntimeError, match="boom"):
        run_dit(dit_pipe)
    handle.remove()
    np.testing.assert_array_equal(run_dit(dit_pipe), expected)
    assert cache_stats(dit_pipe).steps == 8


def test_a_shape_change_in_the_middle_of_a_run_is_an_error():
    transformer = dit_transformer()
    apply_cache(transformer, ToCaConfig(cache_interval=2))
    labels = torch.tensor([1, 2])
    with torch.no_grad():
        transformer(torch.randn(2, 4, 8, 8), timestep=torch.tensor([900, 900]), class_labels=labels)
        with pytest.raises(ValueError, match="batch 2 -> 2, token grid \\(4, 4\\) -> \\(6, 4\\)"):
            transformer(torch.randn(2, 4, 12, 8), timestep=torch.tensor([800, 800]), class_labels=labels)
        transformer(torch.randn(1, 4, 8, 8), timestep=torch.tensor([900]), class_labels=labels[:1])  # a new run is fine


def test_a_second_call_at_the_same_timestep_keeps_its_own_cache():
    transformer = dit_transformer()
    apply_cache(transformer, FORAConfig(cache_interval=2))
    cond, uncond = torch.tensor([1]), torch.tensor([1000])
    latents = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        for t in (900, 800):
            cached_cond = transformer(latents, timestep=torch.tensor([t]), class_labels=cond).sample
            cached_uncond = transformer(latents, timestep=torch.tensor([t]), class_labels=uncond).sample
        state = transformer._diffusers_hook.get_hook(STEP_HOOK).run
        assert len(state.caches.blocks) == 2 * len(transformer.transformer_blocks) and cache_stats(transformer).steps == 2
        remove_cache(transformer)
        apply_cache(transformer, FORAConfig(cache_interval=2))
        for t in (900, 800):
            alone = transformer(latents, timestep=torch.tensor([t]), class_labels=uncond).sample
    torch.testing.assert_close(cached_uncond, alone)
    assert not torch.allclose(cached_cond, cached_uncond)


def test_cache_memory_is_released_after_a_pipeline_run(dit_pipe):
    apply_cache(dit_pipe, ToCaConfig(cache_interval=3))
    run_dit(dit_pipe)
    assert dit_pipe.transformer._diffusers_hook.get_hook(STEP_HOOK).run.caches.blocks == {}
    assert cache_stats(dit_pipe).cache_bytes > 0


def test_default_schedule_follows_the_detected_model(dit_pipe, pixart_pipe):
    apply_cache(dit_pipe, ToCaConfig())
    apply_cache(pixart_pipe, ToCaConfig())
    dit_settings = dit_pipe.transformer._diffusers_hook.get_hook(STEP_HOOK).run.settings
    pixart_settings = pixart_pipe.transformer._diffusers_hook.get_hook(STEP_HOOK).run.settings
    assert (dit_settings.score, dit_settings.schedule.cache_interval) == ("attention", 4)
    assert (pixart_settings.score, pixart_settings.schedule.cache_interval) == ("cross_attention_entropy", 3)


def test_record_selections_gives_the_recomputed_tokens_and_their_score_terms(dit_pipe):
    from ditcache import record_selections

    apply_cache(dit_pipe, ToCaConfig(cache_interval=3, cache_ratio=0.75, schedule="constant", score="k_norm"))
    plain = run_dit(dit_pipe)
    with record_selections(dit_pipe) as events:
        recorded = run_dit(dit_pipe)
    np.testing.assert_array_equal(recorded, plain)  # recording changes nothing
    stats = cache_stats(dit_pipe)
    blocks = len(dit_pipe.transformer.transformer_blocks)
    assert len(events) == stats.partial_steps * blocks  # the DiT blocks recompute their MLP branch only
    tokens = (dit_pipe.transformer.config.sample_size // dit_pipe.transformer.config.patch_size) ** 2
    for event in events:
        assert event.branch == "mlp" and event.tokens.shape == (2, round(0.25 * tokens))  # one row per guidance pair
        total = event.score + event.frequency + event.bonus
        chosen = total.gather(1, event.tokens)
        assert chosen.min() >= total.topk(event.tokens.shape[1]).values.min() - 1e-6  # the top of the total score
    assert {e.step for e in events} == set(range(stats.steps)) - set(stats.full_step_indices)
    run_dit(dit_pipe)
    assert len(events) == stats.partial_steps * blocks  # off after the block
