"""torch.compile on cached transformers: same output as eager, and no recompilation once warm."""

import pytest
import torch
from torch._dynamo.utils import counters

from ditcache import FORAConfig, ToCaConfig, apply_cache
from ditcache.eval.builders import dit_transformer, flux_transformer
from ditcache.eval.speed import compile_blocks


def dit_run(transformer):
    latents, labels = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([1, 1000])
    return [transformer(latents, timestep=torch.tensor([t, t]), class_labels=labels).sample for t in range(981, 581, -50)]


def flux_run(transformer):
    generator = torch.Generator().manual_seed(0)
    ids = torch.zeros(20, 3)
    ids[4:, 1], ids[4:, 2] = torch.arange(4).repeat_interleave(4).float(), torch.arange(4).repeat(4).float()
    inputs = {
        "hidden_states": torch.randn(1, 16, 16, generator=generator),
        "encoder_hidden_states": torch.randn(1, 4, 32, generator=generator),
        "pooled_projections": torch.randn(1, 32, generator=generator),
        "guidance": torch.tensor([3.5]),
        "img_ids": ids[4:],
        "txt_ids": ids[:4],
    }
    return [transformer(timestep=torch.tensor([t / 10]), **inputs).sample for t in range(10, 2, -1)]


@pytest.mark.parametrize(
    "make, run, config",
    [
        (dit_transformer, dit_run, ToCaConfig(cache_interval=3, cache_ratio=0.75, schedule="constant", score="k_norm")),
        (dit_transformer, dit_run, FORAConfig(cache_interval=2)),
        (flux_transformer, flux_run, ToCaConfig(cache_interval=3, cache_ratio=0.75, schedule="constant")),
    ],
)
@pytest.mark.slow
def test_compiled_blocks_match_eager_and_stop_recompiling(make, run, config):
    torch._dynamo.reset()
    transformer = make()
    apply_cache(transformer, config)
    with torch.no_grad():
        eager = run(transformer)
        compile_blocks(transformer)
        run(transformer)  # warm-up: compiles the full and partial variants
        graphs, frames = counters["stats"]["unique_graphs"], counters["frames"]["total"]
        compiled = run(transformer)
    assert graphs > 0 and counters["stats"]["unique_graphs"] == graphs  # compiled, then nothing new
    assert counters["frames"]["total"] == frames  # and no frame recompiled
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "make, run, config",
    [
        (dit_transformer, dit_run, FORAConfig(cache_interval=2)),
        (flux_transformer, flux_run, ToCaConfig(cache_interval=3, cache_ratio=0.75, schedule="constant")),
    ],
)
@pytest.mark.slow
def test_a_whole_model_compiled_after_caching_matches_eager_and_stops_recompiling(make, run, config):
    """No guard on a per-call Python value: from the third run on, dynamo compiles no frame anew."""
    torch._dynamo.reset()
    counters.clear()
    transformer = apply_cache(make(), config)
    with torch.no_grad():
        eager = run(transformer)
        compiled_transformer = torch.compile(transformer)
        run(compiled_transformer)
        run(compiled_transformer)
        frames = counters["frames"]["total"]
        compiled = run(compiled_transformer)
        run(compiled_transformer)
    assert frames > 0 and counters["frames"]["total"] == frames
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_a_transformer_compiled_before_caching_is_refused_with_the_order_that_works():
    compiled = torch.compile(dit_transformer())
    with pytest.raises(TypeError, match=r"apply ditcache before compiling.*_orig_mod"):
        apply_cache(compiled, FORAConfig(cache_interval=2))
