"""FLUX.1 block adapters against diffusers' own blocks, and the engine on a FLUX pipeline."""

import numpy as np
import pytest
import torch
from torch import nn

from ditcache import FORAConfig, ToCaConfig, apply_cache, cache_stats
from ditcache.adapters.flux import FluxDoubleBlockAdapter, FluxSingleBlockAdapter
from ditcache.eval.builders import flux_transformer
from ditcache.flops import count_flops
from ditcache.hooks import STEP_HOOK
from ditcache.state import CallSignature, RunState
from ditcache.store import BlockCache, CacheKey

BATCH, GRID, TEXT = 2, (3, 4), 5
IMAGE = GRID[0] * GRID[1]
SCORES = ["attention", "k_norm", "v_norm", "random"]


@pytest.fixture(scope="module")
def transformer():
    return flux_transformer(num_layers=1, num_single_layers=1)


def block_inputs(transformer, seed):
    generator = torch.Generator().manual_seed(seed)
    dim = transformer.inner_dim
    ids = torch.zeros(TEXT + IMAGE, 3)
    ids[TEXT:, 1] = torch.arange(GRID[0]).repeat_interleave(GRID[1]).float()
    ids[TEXT:, 2] = torch.arange(GRID[1]).repeat(GRID[0]).float()
    return {
        "hidden_states": torch.randn(BATCH, IMAGE, dim, generator=generator),
        "encoder_hidden_states": torch.randn(BATCH, TEXT, dim, generator=generator),
        "temb": torch.randn(BATCH, dim, generator=generator),
        "image_rotary_emb": transformer.pos_embed(ids),
    }


def make_run(config):
    run = RunState(config.resolve("flux"))
    run.start(CallSignature(BATCH, GRID, torch.float32, torch.device("cpu")), 1.0, None, False)
    run.begin_step(1.0)
    return run


def adapters(transformer, config):
    settings = config.resolve("flux")
    return {
        "double": FluxDoubleBlockAdapter(transformer.transformer_blocks[0], "d", 0.0, settings),
        "single": FluxSingleBlockAdapter(transformer.single_transformer_blocks[0], "s", 0.0, settings),
    }


def replace_output(module: nn.Module, value):
    return module.register_forward_hook(lambda _m, _i, _o: value)


def partial_step(transformer, kind, config):
    """A full step, then a partial one; returns the adapter, cache, the full step's branches and the
    partial step's inputs and output."""
    adapter = adapters(transformer, config)[kind]
    run, cache = make_run(config), BlockCache()
    for _ in range(config.resolve("flux").schedule.full_steps_at_start):
        adapter.forward(run, cache, **block_inputs(transformer, seed=0))
        run.begin_step(0.9)
    assert not run.plan.is_full
    cached = {key.branch: cache.kept(key).clone() for key in cache.entries}
    inputs = block_inputs(transformer, seed=1)
    return adapter, cache, cached, inputs, adapter.forward(run, cache, **inputs)


@pytest.mark.parametrize("kind", ["double", "single"])
@pytest.mark.parametrize("score", SCORES)
def test_full_path_equals_diffusers_block(transformer, kind, score):
    config = ToCaConfig(cache_interval=3, score=score)
    adapter = adapters(transformer, config)[kind]
    inputs = block_inputs(transformer, seed=0)
    with torch.no_grad():
        expected = adapter.block(**inputs)
        cache = BlockCache()
        actual = adapter.forward(make_run(config), cache, **inputs)
    for a, e in zip(actual, expected):
        assert (a - e).abs().max().item() <= 1e-6
    groups = {"double": {"image": IMAGE, "text": TEXT}, "single": {"joint": TEXT + IMAGE}}[kind]
    assert {g: s.shape for g, s in cache.base_scores.items()} == {g: (BATCH, n) for g, n in groups.items()}


def test_double_block_fora_reuses_every_branch_with_current_gates(transformer):
    with torch.no_grad():
        adapter, cache, cached, inputs, actual = partial_step(transformer, "double", FORAConfig(cache_interval=4))
        block = adapter.block
        handles = [
            replace_output(block.attn, (cached["attn"], cached["context_attn"])),
            replace_output(block.ff, cached["mlp"]),
            replace_output(block.ff_context, cached["context_mlp"]),
        ]
        expected = block(**inputs)
        for handle in handles:
            handle.remove()
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, atol=1e-6, rtol=0)


def test_double_block_toca_recomputes_selected_rows_of_both_mlps(transformer):
    config = ToCaConfig(cache_interval=4, cache_ratio=0.5, schedule="constant", score="k_norm")
    with torch.no_grad():
        adapter, cache, cached, inputs, actual = partial_step(transformer, "double", config)
        block = adapter.block
        fresh = {}
        handles = [replace_output(block.attn, (cached["attn"], cached["context_attn"]))]
        for name, module in (("mlp", block.ff), ("context_mlp", block.ff_context)):
            handles.append(module.register_forward_hook(lambda _m, _i, out, name=name: fresh.__setitem__(name, out)))
        block(**inputs)
        for handle in handles:
            handle.remove()
        for name, tokens in (("mlp", IMAGE), ("context_mlp", TEXT)):
            selected = cache.since_recompute[name] == 0
            assert selected.sum(-1).eq(round(tokens / 2)).all()
            torch.testing.assert_close(
                cache.kept(CacheKey(name)), torch.where(selected[..., None], fresh[name], cached[name]), atol=1e-6, rtol=0
            )


@pytest.mark.parametrize("ratio", [1.0, 0.5])
def test_single_block_partial_step(transformer, ratio):
    config = ToCaConfig(cache_interval=4, cache_ratio=ratio, schedule="constant", score="attention")
    with torch.no_grad():
        adapter, cache, cached, inputs, actual = partial_step(transformer, "single", config)
        block = adapter.block
        fresh = {}
        handles = [
            replace_output(block.attn, cached["attn"]),
            block.proj_out.register_forward_hook(lambda _m, _i, out: fresh.__setitem__("output", out)),
        ]
        block(**inputs)
        for handle in handles:
            handle.remove()
        if ratio < 1:
            selected = cache.since_recompute["single_mlp"] == 0
            assert selected.sum(-1).eq(round((1 - ratio) * (TEXT + IMAGE))).all()
        else:  # nothing recomputed, no score kept
            assert "single_mlp" not in cache.since_recompute
            selected = torch.zeros(BATCH, TEXT + IMAGE, dtype=torch.bool)
        mixed = torch.where(selected[..., None], fresh["output"], cached["output"])
        torch.testing.assert_close(cache.kept(CacheKey("output")), mixed, atol=1e-6, rtol=0)
        handle = replace_output(block.proj_out, mixed)
        expected = block(**inputs)
        handle.remove()
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, atol=1e-6, rtol=0)


def run_flux(pipe, steps=8, **kwargs):
    kwargs = {"height": 16, "width": 16, "max_sequence_length": 16, "output_type": "np"} | kwargs
    return pipe("a red fox in snow", num_inference_steps=steps, generator=torch.Generator().manual_seed(0), **kwargs).images


def test_flux_preset_defaults_and_flops_agree_with_flop_counter(flux_pipe):
    apply_cache(flux_pipe, ToCaConfig())
    images, counted = count_flops(lambda: run_flux(flux_pipe, steps=10), flux_pipe.transformer)
    stats = cache_stats(flux_pipe)
    assert stats.full_step_indices == (0, 1, 2, 6)  # first 3 steps full, then every 4
    assert abs(stats.flops - counted) <= 0.05 * counted
    assert stats.flops < stats.flops_full and stats.recompute_fraction > 0
    assert flux_pipe.transformer._diffusers_hook.get_hook(STEP_HOOK).run.settings.score == "random"


def test_flux_true_guidance_keeps_a_cache_per_call(flux_pipe):
    kwargs = {"negative_prompt": "a dog", "true_cfg_scale": 2.0}
    uncached = run_flux(flux_pipe, **kwargs)
    apply_cache(flux_pipe, ToCaConfig(cache_interval=1))
    assert (run_flux(flux_pipe, **kwargs) == uncached).all()
    apply_cache(flux_pipe, FORAConfig(cache_interval=2))
    run_flux(flux_pipe, **kwargs)
    stats = cache_stats(flux_pipe)
    assert stats.steps == 8 and stats.partial_steps == 3
    # Per-run modulation tables (scheduler known) must give each stream its own conditioning.
    config = ToCaConfig(cache_interval=2, cache_ratio=0.5)
    apply_cache(flux_pipe, config)
    with_tables = run_flux(flux_pipe, **kwargs)
    apply_cache(flux_pipe.transformer, config)  # no pipeline, no schedule, no tables
    np.testing.assert_allclose(run_flux(flux_pipe, **kwargs), with_tables, atol=1e-5)


def test_flux_preset_50_steps_costs_at_most_40_percent(saved_pipelines):
    """The FLUX-width measurement (eval/BENCHMARKS.md) at test size: 512 image + 128 text tokens."""
    from ditcache import ToCaPipeline

    pipe = ToCaPipeline.from_pretrained(saved_pipelines / "flux", cache_interval=4, cache_ratio=0.9)
    pipe.set_progress_bar_config(disable=True)
    kwargs = {"height": 64, "width": 128, "max_sequence_length": 128, "num_inference_steps": 50, "output_type": "np"}
    _, uncached = count_flops(lambda: pipe("a red fox", cache=False, **kwargs), pipe.transformer)
    _, cached = count_flops(lambda: pipe("a red fox", **kwargs), pipe.transformer)
    assert cached <= 0.40 * uncached
    assert abs(pipe.cache_stats.flops - cached) <= 0.05 * cached


def test_flux_without_guidance_embedding():
    """FLUX.1-schnell-style transformers take no guidance input."""
    transformer = flux_transformer(guidance_embeds=False)
    generator = torch.Generator().manual_seed(0)
    ids = torch.zeros(4 + 16, 3)
    ids[4:, 1], ids[4:, 2] = torch.arange(4).repeat_interleave(4).float(), torch.arange(4).repeat(4).float()
    inputs = {
        "hidden_states": torch.randn(1, 16, 16, generator=generator),
        "encoder_hidden_states": torch.randn(1, 4, 32, generator=generator),
        "pooled_projections": torch.randn(1, 32, generator=generator),
        "img_ids": ids[4:],
        "txt_ids": ids[:4],
    }
    with torch.no_grad():
        expected = [transformer(timestep=torch.tensor([t]), **inputs).sample for t in (1.0, 0.75, 0.5, 0.25)]
        apply_cache(transformer, ToCaConfig(cache_interval=2, cache_ratio=0.5))
        cached = [transformer(timestep=torch.tensor([t]), **inputs).sample for t in (1.0, 0.75, 0.5, 0.25)]
    torch.testing.assert_close(cached[:3], expected[:3])  # the first 3 steps are full
    assert not torch.allclose(cached[3], expected[3])
    stats = cache_stats(transformer)
    assert stats.full_step_indices == (0, 1, 2) and transformer._diffusers_hook.get_hook(STEP_HOOK).run.signature.grid == (4, 4)


def test_rotary_embedding_and_text_projection_are_reused_within_a_run_until_their_sources_change(monkeypatch):
    import diffusers.models.transformers.transformer_flux as flux_module

    from ditcache import remove_cache

    transformer = flux_transformer(guidance_embeds=False)
    generator = torch.Generator().manual_seed(0)
    ids = torch.zeros(4 + 16, 3)
    ids[4:, 1], ids[4:, 2] = torch.arange(4).repeat_interleave(4).float(), torch.arange(4).repeat(4).float()
    text_ids, image_ids = ids[:4].clone(), ids[4:].clone()
    inputs = {
        "hidden_states": torch.randn(1, 16, 16, generator=generator),
        "encoder_hidden_states": torch.randn(1, 4, 32, generator=generator),
        "pooled_projections": torch.randn(1, 32, generator=generator),
        "img_ids": image_ids,
        "txt_ids": text_ids,
    }
    rotary_calls = []
    original = flux_module.get_1d_rotary_pos_embed
    monkeypatch.setattr(flux_module, "get_1d_rotary_pos_embed", lambda *a, **k: rotary_calls.append(1) or original(*a, **k))
    step = lambda t: transformer(timestep=torch.tensor([t]), **inputs).sample  # noqa: E731
    with torch.no_grad():
        apply_cache(transformer, FORAConfig(cache_interval=1))
        step(1.0)
        assert len(rotary_calls) == 3  # one per rotary axis
        step(0.75)
        assert len(rotary_calls) == 3  # the same ids: the run's rotary embedding is reused
        text_ids[:, 1] += 1  # moved in place: the stored embedding must not be reused
        moved = step(0.5)
        assert len(rotary_calls) == 6
        inputs["encoder_hidden_states"] = inputs["encoder_hidden_states"] * 2  # another prompt tensor
        changed_text = step(0.25)
        remove_cache(transformer)
        assert not hasattr(transformer.pos_embed, "_diffusers_hook") and not hasattr(transformer.context_embedder, "_diffusers_hook")
        expected = step(0.25)
        inputs["encoder_hidden_states"] = inputs["encoder_hidden_states"] / 2
        expected_moved = step(0.5)
    torch.testing.assert_close(moved, expected_moved, rtol=0, atol=0)
    torch.testing.assert_close(changed_text, expected, rtol=0, atol=0)


def test_run_constants_under_inference_mode_are_computed_every_call(flux_pipe):
    """Inference tensors keep no version counter: nothing is reused, and the images are the same."""
    apply_cache(flux_pipe, FORAConfig(cache_interval=2))
    expected = run_flux(flux_pipe)
    with torch.inference_mode():
        assert (run_flux(flux_pipe) == expected).all()


def test_a_kept_text_projection_changed_in_place_is_computed_anew():
    """Reuse also needs the kept output unchanged: something that edits it in place forces a new one."""
    transformer = flux_transformer(guidance_embeds=False)
    ids = torch.zeros(4 + 16, 3)
    ids[4:, 1], ids[4:, 2] = torch.arange(4).repeat_interleave(4).float(), torch.arange(4).repeat(4).float()
    inputs = {"hidden_states": torch.randn(1, 16, 16), "encoder_hidden_states": torch.randn(1, 4, 32),
              "pooled_projections": torch.randn(1, 32), "img_ids": ids[4:], "txt_ids": ids[:4]}
    with torch.no_grad():
        expected = [transformer(timestep=torch.tensor([t]), **inputs).sample for t in (1.0, 0.75)]
        apply_cache(transformer, FORAConfig(cache_interval=1))
        edit = transformer.context_embedder.register_forward_hook(lambda _m, _i, output: output.mul_(1.0))
        first = transformer(timestep=torch.tensor([1.0]), **inputs).sample  # the kept output's version moves
        edit.remove()
        second = transformer(timestep=torch.tensor([0.75]), **inputs).sample
    torch.testing.assert_close(first, expected[0], rtol=0, atol=0)
    torch.testing.assert_close(second, expected[1], rtol=0, atol=0)
    run = transformer._diffusers_hook.get_hook(STEP_HOOK).run
    assert run.memo.get("context_embedder", 0).versions[-1] == 0  # the second call computed and kept a fresh one


def test_the_forecast_error_score_is_each_tokens_error_at_the_last_full_step_and_chooses_the_worst(transformer):
    """``score="forecast_error"``: a full step keeps, per token of a branch's group, the squared error its kept value
    (or forecast) made there; a partial step recomputes the tokens with the largest."""
    config = ToCaConfig(cache_interval=4, cache_ratio=0.75, schedule="constant", score="forecast_error",
                        full_steps_at_start=1, frequency_weight=0.0, spatial_bonus=0.0)
    adapter = adapters(transformer, config)["double"]
    run, cache = make_run(config), BlockCache()
    first = torch.randn(BATCH, IMAGE, transformer.inner_dim, generator=torch.Generator().manual_seed(0))
    adapter.keep(run, cache, "mlp", first)
    assert cache.base_scores["image"].eq(0).all()  # nothing kept before: no error yet
    worst = torch.tensor([3, 7, 11, 13][: round(IMAGE / 4)])
    change = torch.zeros_like(first)
    change[:, worst] = torch.linspace(1.0, 2.0, len(worst))[:, None]
    adapter.keep(run, cache, "mlp", first + change)  # order 0: the kept value is the forecast
    torch.testing.assert_close(cache.base_scores["image"], change.square().sum(-1))
    assert "text" not in cache.base_scores  # the context MLP was not kept: its group has no score yet
    run.begin_step(0.9)
    assert not run.plan.is_full
    selection = adapter.select(run, cache, "mlp", IMAGE)
    assert sorted(selection.index[0].tolist()) == sorted(worst.tolist())
