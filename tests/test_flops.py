"""FLOPs at DiT-XL/2 width: what the engine saves, and that its own accounting is right."""

import pytest
import torch

from ditcache import ToCaConfig, apply_cache, cache_stats, remove_cache
from ditcache.eval.builders import dit_transformer
from ditcache.flops import count_flops

TIMESTEPS = [981 - 20 * i for i in range(10)]


def denoise(transformer, latents, labels):
    """A DDIM-like loop over a guidance batch; the update rule does not matter for FLOPs."""
    for t in TIMESTEPS:
        out = transformer(torch.cat([latents, latents]), timestep=torch.tensor([t, t]), class_labels=labels).sample
        latents = latents - 0.01 * out[:1, :4]
    return latents


@pytest.fixture(scope="module")
def xl_transformer():
    # hidden 1152, 16 heads, 16x16 = 256 tokens, 2 blocks
    return dit_transformer(width="xl", num_layers=2, sample_size=32)


def test_toca_halves_the_flops_at_dit_xl_width_and_stats_agree(xl_transformer):
    latents, labels = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(0)), torch.tensor([207, 1000])
    with torch.no_grad():
        _, uncached = count_flops(lambda: denoise(xl_transformer, latents, labels))
        apply_cache(xl_transformer, ToCaConfig(cache_interval=3, cache_ratio=0.9, schedule="constant"))
        try:
            _, cached = count_flops(lambda: denoise(xl_transformer, latents, labels))
            stats = cache_stats(xl_transformer)
        finally:
            remove_cache(xl_transformer)
    assert cached <= 0.5 * uncached
    assert abs(stats.flops - cached) <= 0.05 * cached
    assert abs(stats.flops_full - uncached) <= 0.05 * uncached
    assert (stats.full_steps, stats.partial_steps) == (4, 6)
    assert stats.recompute_fraction == pytest.approx(0.1, abs=0.01)
