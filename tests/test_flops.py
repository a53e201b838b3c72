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


def test_a_declared_branch_cost_is_what_the_branch_executes():
    """``BranchCost`` against ``FlopCounterMode``: a self-attention over its rows, a cross-attention whose keys
    are another sequence (projected or not), a feed-forward per token group."""
    from diffusers.models.attention import FeedForward
    from diffusers.models.attention_processor import Attention

    from ditcache.flops import BranchCost

    torch.manual_seed(0)
    attn, cross, ff = Attention(32, heads=4, dim_head=8), Attention(32, cross_attention_dim=16, heads=4, dim_head=8), FeedForward(32)
    x, text = torch.randn(2, 10, 32), torch.randn(2, 6, 16)
    self_cost = BranchCost({"image": (attn,)}, attention=(4, 8))
    assert self_cost.flops(2, {"image": 10}) == count_flops(lambda: attn(x))[1]
    cross_cost = BranchCost({"image": (cross.to_q, cross.to_out[0])}, keys=(cross.to_k, cross.to_v), attention=(4, 8))
    assert cross_cost.flops(2, {"image": 10}, keys=6) == count_flops(lambda: cross(x, encoder_hidden_states=text))[1]
    projected = sum(count_flops(lambda layer=layer: layer(text))[1] for layer in (cross.to_k, cross.to_v))
    assert cross_cost.flops(2, {"image": 10}, keys=6, project_keys=False) == count_flops(lambda: cross(x, encoder_hidden_states=text))[1] - projected
    ff_cost = BranchCost({"image": (ff,), "text": (ff,)})
    assert ff_cost.flops(2, {"image": 10, "text": 3}) == count_flops(lambda: ff(torch.randn(2, 13, 32)))[1]
    assert ff_cost.flops(2, {"text": 0}) == 0 and self_cost.flops(2, {}) == 0
