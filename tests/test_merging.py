"""Token merging: bipartite matching against an independent reference, merge/unmerge, ToMe in the
DiT and PixArt adapters, composition with ToCa, FLOPs."""

import numpy as np
import pytest
import torch

import ditcache
from ditcache import ToCaConfig, ToMeConfig, apply_cache, cache_stats, remove_cache
from ditcache.config import resolve_configs
from ditcache.flops import count_flops
from ditcache.merging import bipartite_match, merge, unmerge


def reference_match(x: torch.Tensor, grid, ratio, sx, sy):
    """Bipartite soft matching written out token by token, destinations the first token of each cell."""
    height, width = grid
    destinations = [r * width + c for r in range(0, height - height % sy, sy) for c in range(0, width - width % sx, sx)]
    sources = [i for i in range(height * width) if i not in destinations]
    normalised = x / x.norm(dim=-1, keepdim=True)
    best = []
    for s in sources:
        similarities = [float(normalised[s] @ normalised[d]) for d in destinations]
        j = int(np.argmax(similarities))
        best.append((similarities[j], s, j))
    best.sort(key=lambda item: -item[0])  # stable: ties keep source order
    count = min(int(height * width * ratio), len(sources))
    merged = {s: j for _, s, j in best[:count]}
    kept = [s for _, s, _ in best[count:]]
    out = [x[s] for s in kept]
    for j, d in enumerate(destinations):
        group = [x[d]] + [x[s] for s, target in merged.items() if target == j]
        out.append(torch.stack(group).mean(0))
    return torch.stack(out), kept, merged, destinations


@pytest.mark.parametrize("grid", [(4, 4), (5, 7)])
def test_matching_and_merge_equal_the_reference(grid):
    x = torch.randn(2, grid[0] * grid[1], 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    match = bipartite_match(x, grid, ratio=0.4, random=False)
    merged = merge(x, match)
    for b in range(2):
        expected, kept, mapping, destinations = reference_match(x[b], grid, 0.4, 2, 2)
        assert match.destinations[b].tolist() == destinations and match.kept[b].tolist() == kept
        assert dict(zip(match.merged[b].tolist(), match.targets[b].tolist())) == mapping
        torch.testing.assert_close(merged[b], expected)


def test_unmerge_puts_rows_back_and_copies_destinations_onto_sources():
    grid, generator = (6, 6), torch.Generator().manual_seed(1)
    x = torch.randn(3, 36, 4, generator=generator)
    match = bipartite_match(x, grid, ratio=0.5, random=True, generator=generator)
    assert match.merged.shape[1] == 18 and match.merged_tokens == 18
    rows = torch.randn(3, match.merged_tokens, 4, generator=generator)
    out = unmerge(rows, match)
    kept, destinations = rows.split([match.kept.shape[1], match.destinations.shape[1]], dim=1)
    take = lambda t, i: t.gather(1, i[..., None].expand(-1, -1, 4))  # noqa: E731
    assert torch.equal(take(out, match.kept), kept) and torch.equal(take(out, match.destinations), destinations)
    assert torch.equal(take(out, match.merged), take(destinations, match.targets))
    # A tensor constant over each merge group survives merge then unmerge unchanged.
    constant = unmerge(merge(x, match), match)
    torch.testing.assert_close(unmerge(merge(constant, match), match), constant)


def test_random_destinations_are_one_per_cell_and_seeded():
    x = torch.randn(1, 16, 4)
    first = bipartite_match(x, (4, 4), 0.5, random=True, generator=torch.Generator().manual_seed(3))
    second = bipartite_match(x, (4, 4), 0.5, random=True, generator=torch.Generator().manual_seed(3))
    assert torch.equal(first.destinations, second.destinations)
    cells = {(d // 4 // 2, d % 4 // 2) for d in first.destinations[0].tolist()}
    assert cells == {(0, 0), (0, 1), (1, 0), (1, 1)}


@pytest.mark.parametrize("sx, sy", [(5, 2), (2, 4), (6, 6)])
def test_a_cell_larger_than_the_grid_is_refused(sx, sy):
    x = torch.randn(1, 12, 4)
    message = (rf"ToMe cell `sx` x `sy` = {sx} x {sy} does not fit the token grid of 4 x 3 \(columns x rows\); "
               r"choose `sx` <= 4 and `sy` <= 3\.")
    with pytest.raises(ValueError, match=message):
        bipartite_match(x, (3, 4), 0.5, sx=sx, sy=sy)
    assert bipartite_match(x, (3, 4), 0.5, sx=4, sy=3).destinations.shape == (1, 1)  # one cell: the whole grid


def test_a_cell_larger_than_the_model_grid_fails_clearly(dit_pipe):
    dit_pipe.set_progress_bar_config(disable=True)
    apply_cache(dit_pipe, ToMeConfig(sx=8, sy=2, seed=0))  # the tiny DiT has a 4 x 4 token grid
    with pytest.raises(ValueError, match=r"`sx` x `sy` = 8 x 2 does not fit the token grid of 4 x 4 \(columns x rows\)"):
        _dit(dit_pipe)


def test_tome_config_validation():
    with pytest.raises(ValueError, match="`ratio` must be a number in \\[0, 1\\)"):
        ToMeConfig(ratio=1.0)
    with pytest.raises(ValueError, match=r"`sx` must be an integer in \[1, 10000\]"):
        ToMeConfig(sx=0)
    with pytest.raises(ValueError, match="one ToCaConfig/FORAConfig together with one ToMeConfig"):
        resolve_configs([ToCaConfig(), ToCaConfig()], "dit")
    with pytest.raises(TypeError, match="ToCaConfig, FORAConfig or ToMeConfig"):
        resolve_configs([ToCaConfig(), "tome"], "dit")


def _dit(pipe, **kwargs):
    generator = torch.Generator().manual_seed(0)
    return pipe(class_labels=[0, 1], num_inference_steps=6, generator=generator, output_type="np", **kwargs).images


def _pixart(pipe, **kwargs):
    generator = torch.Generator().manual_seed(0)
    return pipe("a red fox in snow", num_inference_steps=6, height=16, width=16, generator=generator, output_type="np",
                use_resolution_binning=False, clean_caption=False, max_sequence_length=16, **kwargs).images


def test_ratio_zero_is_exactly_the_unmerged_model(dit_pipe, pixart_pipe):
    for pipe, run in ((dit_pipe, _dit), (pixart_pipe, _pixart)):
        pipe.set_progress_bar_config(disable=True)
        plain = run(pipe)
        apply_cache(pipe, ToMeConfig(ratio=0.0, merge_mlp=True, merge_crossattn=True))
        np.testing.assert_array_equal(run(pipe), plain)
        apply_cache(pipe, ToMeConfig(ratio=0.5, seed=0))
        merged = run(pipe)
        assert np.isfinite(merged).all() and not np.array_equal(merged, plain)
        assert cache_stats(pipe).merged_fraction == pytest.approx(0.5) and cache_stats(pipe).partial_steps == 0
        remove_cache(pipe)
        np.testing.assert_array_equal(run(pipe), plain)


def test_tome_with_toca_reports_both_and_counts_flops(pixart_pipe):
    pixart_pipe.set_progress_bar_config(disable=True)
    configs = [ToCaConfig(cache_interval=3, cache_ratio=0.7, schedule="constant", score="attention"),
               ToMeConfig(ratio=0.5, merge_crossattn=True, merge_mlp=True, seed=0)]
    apply_cache(pixart_pipe, configs)
    _, counted = count_flops(lambda: _pixart(pixart_pipe), pixart_pipe.transformer)
    stats = cache_stats(pixart_pipe)
    assert stats.partial_steps > 0 and stats.recompute_fraction == pytest.approx(0.3, abs=0.02)
    assert stats.merged_fraction == pytest.approx(0.5)
    assert stats.flops == pytest.approx(counted, rel=0.05)
    assert ditcache.cache_config(pixart_pipe) == configs


def test_tome_flops_drop_as_the_ratio_predicts_at_dit_xl_width():
    from ditcache.eval import builders

    pipe = builders.dit_pipeline(width="xl", num_layers=2, sample_size=16)
    pipe.set_progress_bar_config(disable=True)
    call = lambda: pipe(class_labels=[0], num_inference_steps=2, guidance_scale=1.0, output_type="np")  # noqa: E731
    _, uncached = count_flops(call, pipe.transformer)
    apply_cache(pipe, ToMeConfig(ratio=0.5, merge_mlp=True, seed=0))
    _, merged = count_flops(call, pipe.transformer)
    stats = cache_stats(pipe)
    assert stats.flops == pytest.approx(merged, rel=0.02)
    # Attention and MLP run on half the tokens: linear layers at half the FLOPs, the attention core at a
    # quarter, plus the matching's similarity products.
    assert 0.45 < merged / uncached < 0.6


def test_toca_pipeline_takes_tome_ratio_and_round_trips(saved_pipelines, tmp_path):
    from ditcache import ToCaPipeline

    pipe = ToCaPipeline.from_pretrained(saved_pipelines / "dit", cache_interval=2, tome_ratio=0.5)
    assert pipe.cache_config == [ToCaConfig(cache_interval=2), ToMeConfig(ratio=0.5)]
    pipe.set_progress_bar_config(disable=True)
    _dit(pipe)
    assert pipe.cache_stats.merged_fraction == pytest.approx(0.5) and pipe.cache_stats.partial_steps > 0
    pipe.save_pretrained(tmp_path / "saved")
    assert ToCaPipeline.from_pretrained(tmp_path / "saved").cache_config == pipe.cache_config
    with pytest.raises(ValueError, match="need a ToCaConfig or FORAConfig"):
        ToCaPipeline.from_pretrained(saved_pipelines / "dit", cache_config=ToMeConfig(), cache_interval=3)


def _flux(pipe, **kwargs):
    generator = torch.Generator().manual_seed(0)
    return pipe("a red fox in snow", num_inference_steps=6, height=32, width=32, generator=generator, output_type="np",
                max_sequence_length=16, **kwargs).images


def test_flux_merges_image_tokens_only(flux_pipe):
    plain = _flux(flux_pipe)
    apply_cache(flux_pipe, ToMeConfig(ratio=0.0))
    np.testing.assert_array_equal(_flux(flux_pipe), plain)
    apply_cache(flux_pipe, ToMeConfig(ratio=0.5, merge_mlp=True, seed=0))
    _, counted = count_flops(lambda: _flux(flux_pipe), flux_pipe.transformer)
    merged, stats = _flux(flux_pipe), cache_stats(flux_pipe)
    assert np.isfinite(merged).all() and not np.array_equal(merged, plain)
    assert stats.merged_fraction == pytest.approx(0.5) and stats.flops == pytest.approx(counted, rel=0.02)
    assert stats.flops < 0.8 * stats.flops_full

    apply_cache(flux_pipe, [ToCaConfig(cache_interval=3, cache_ratio=0.8, score="attention", schedule="constant"),
                            ToMeConfig(ratio=0.5, seed=0)])
    _, counted = count_flops(lambda: _flux(flux_pipe), flux_pipe.transformer)
    stats = cache_stats(flux_pipe)
    assert stats.partial_steps > 0 and stats.merged_fraction == pytest.approx(0.5)
    assert stats.flops == pytest.approx(counted, rel=0.05)
    remove_cache(flux_pipe)
    np.testing.assert_array_equal(_flux(flux_pipe), plain)


def test_tome_flops_drop_as_the_ratio_predicts_at_flux_width():
    from ditcache.eval import builders

    pipe = builders.flux_pipeline(width="flux", num_layers=1, num_single_layers=1)
    pipe.set_progress_bar_config(disable=True)
    call = lambda: pipe("a fox", num_inference_steps=1, height=64, width=64, max_sequence_length=8, output_type="np")  # noqa: E731
    _, uncached = count_flops(call, pipe.transformer)
    apply_cache(pipe, ToMeConfig(ratio=0.5, merge_mlp=True, seed=0))
    _, merged = count_flops(call, pipe.transformer)
    assert cache_stats(pipe).flops == pytest.approx(merged, rel=0.02)
    # 256 image + 8 text tokens: attention, its projections and the MLPs on 128 + 8 tokens; the single
    # block's fused output projection still runs on every token.
    assert 0.5 < merged / uncached < 0.7
