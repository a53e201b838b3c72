"""Residual layouts (``ditcache.residual``) and the ``cache_memory`` budget: each layout runs every family, a
budget is held and reported, a budget that nothing meets is refused with its minimum."""

import pytest
import torch
from test_generic import FAMILIES, build, run, timesteps

from ditcache import FORAConfig, ToCaConfig, ToMeConfig, apply_cache, cache_stats, estimate_cache_bytes, preset, remove_cache
from ditcache.budget import WHOLE_CHAIN, CacheLayout, MemoryBudget, layouts_to_try, parse_budget
from ditcache.specs import SPECS
from eval import builders


@pytest.mark.parametrize("value, budget", [
    (4096, MemoryBudget(bytes=4096)), ("4GiB", MemoryBudget(bytes=4 * 2**30)), ("1.5 MB", MemoryBudget(bytes=1_500_000)),
    ("16H", MemoryBudget(hidden_states=16.0)), ("0.25h", MemoryBudget(hidden_states=0.25)),
])
def test_budgets_parse_from_bytes_and_units(value, budget):
    assert parse_budget(value) == budget
    assert FORAConfig(cache_memory=value).resolve("wan").cache_memory == budget


@pytest.mark.parametrize("changes, message", [
    (dict(cache_memory="4 apples"), r"`cache_memory` must be bytes or a number with a unit"),
    (dict(cache_memory=0), r"`cache_memory` must be at least 1 byte"),
    (dict(cache_memory="0.2H"), r"`cache_memory` must be at least 0.25H"),
    (dict(cache_memory=True), r"`cache_memory` must be bytes"),
    (dict(cache_layout="span:1"), r"`cache_layout` must be 'branch', 'block', 'span:N' with N in \[2, 10000\] or 'chain'"),
    (dict(cache_layout="rows"), r"`cache_layout` must be"),
    (dict(cache_layout="block", probe_ratio=0.1, tolerance=0.1), r"`probe_ratio` recomputes tokens"),
])
def test_bad_storage_settings_are_refused_when_the_config_is_made(changes, message):
    with pytest.raises(ValueError, match=message):
        FORAConfig(**changes)


def test_toca_and_token_merging_refuse_residual_layouts():
    with pytest.raises(ValueError, match="ToCa recomputes tokens"):
        ToCaConfig(cache_layout="chain")
    with pytest.raises(ValueError, match="token merging runs inside the branches"):
        apply_cache(builders.dit_pipeline(), [FORAConfig(cache_layout="block"), ToMeConfig()])


def test_the_budget_gives_up_layout_and_precision_before_forecast_order():
    layouts = layouts_to_try(CacheLayout(0, "model", 2), residual=True)
    assert layouts[:5] == [CacheLayout(0, "model", 2), CacheLayout(1, "model", 2), CacheLayout(1, "float8_differences", 2),
                           CacheLayout(1, "float8", 2), CacheLayout(2, "model", 2)]
    assert layouts[layouts.index(CacheLayout(WHOLE_CHAIN, "float8", 2)) + 1] == CacheLayout(0, "model", 1)
    assert [layout.order for layout in layouts] == sorted((layout.order for layout in layouts), reverse=True)
    assert layouts_to_try(CacheLayout(0, "model", 1), residual=False) == [
        CacheLayout(0, "model", 1), CacheLayout(0, "float8_differences", 1), CacheLayout(0, "float8", 1),
        CacheLayout(0, "model", 0), CacheLayout(0, "float8_differences", 0), CacheLayout(0, "float8", 0)]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_residual_layouts_run_every_family_and_spans_add_up_to_the_blocks(family):
    """A span's residual is the sum of its blocks' residuals, and forecasts are linear in what they keep, so that
    reuse per block, per span and per chain give the same output up to rounding; a run whose steps are all full
    is the uncached model exactly."""
    model = build(family)
    plain = run(model, family)
    apply_cache(model, FORAConfig(cache_interval=1, cache_layout="chain"))
    assert all(torch.equal(a, b) for a, b in zip(run(model, family), plain))
    outputs = {}
    for layout in ("block", "span:2", "chain"):
        apply_cache(model, FORAConfig(cache_interval=2, forecast_order=1, cache_layout=layout))
        outputs[layout] = run(model, family)
        stats = cache_stats(model)
        assert stats.partial_steps > 0 and stats.flops < stats.flops_full and stats.cache_layout.startswith(layout)
    for layout in ("span:2", "chain"):
        for a, b in zip(outputs[layout], outputs["block"]):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert not all(torch.allclose(a, b) for a, b in zip(outputs["chain"], plain))  # partial steps did skip blocks
    remove_cache(model)
    assert all(torch.equal(a, b) for a, b in zip(run(model, family), plain))


def _call(family):
    return FAMILIES[family][1]() | {SPECS[FAMILIES[family][0]().__class__.__name__].timestep_argument: timesteps(family)[0]}


@pytest.mark.parametrize("family", ["flux2", "hunyuanvideo", "sd3", "wan"])
@pytest.mark.parametrize("budget", ["1H", "3H", "12H"])
def test_a_budget_is_held_and_the_estimate_tells_it(family, budget):
    model = build(family)
    argument = SPECS[type(model).__name__].timestep_argument
    call = FAMILIES[family][1]()
    config = preset("ditcache", cache_memory=budget, min_steps=0)  # a bare transformer's run does not know its step count
    unbounded = estimate_cache_bytes(model, preset("ditcache", cache_memory=None, min_steps=0), num_inference_steps=len(timesteps(family)), **call, **{argument: timesteps(family)[0]})
    estimate = estimate_cache_bytes(model, config, num_inference_steps=len(timesteps(family)), **call, **{argument: timesteps(family)[0]})
    apply_cache(model, config)
    with torch.no_grad():
        for t in timesteps(family):
            model(**call, **{argument: t})
    stats = cache_stats(model)
    assert stats.cache_bytes == pytest.approx(estimate, rel=0.05)
    assert 0 < stats.cache_bytes <= stats.cache_budget  # within the budget, memos included
    # the config's own layout where it fits, a smaller one where it does not
    assert (stats.cache_layout == "branch, model, order 2") == (unbounded <= stats.cache_budget)
    assert stats.cache_bytes <= unbounded


def test_a_budget_that_fits_keeps_the_configs_own_layout_bit_for_bit():
    pipe = builders.flux_pipeline()
    pipe.set_progress_bar_config(disable=True)
    arguments = dict(prompt="a red fox", height=32, width=32, max_sequence_length=16, num_inference_steps=10, output_type="pt")
    images = {}
    for name, config in {"own": preset("ditcache", cache_memory=None), "budget": preset("ditcache", cache_memory="1GiB")}.items():
        apply_cache(pipe, config)
        images[name] = pipe(**arguments, generator=torch.Generator().manual_seed(0)).images
        assert cache_stats(pipe).cache_layout == "branch, model, order 2"
    assert torch.equal(images["own"], images["budget"])


def test_a_budget_no_layout_meets_is_refused_with_its_minimum():
    model = build("wan")
    call = _call("wan")
    config = preset("ditcache", cache_memory=1000)
    with pytest.raises(ValueError, match=r"cache_memory=1000 bytes \(1000 bytes here, H = 4.00 KiB\) .* the smallest is 1.25 KiB \(0.31H, chain, float8, order 0\)"):
        estimate_cache_bytes(model, config, num_inference_steps=10, **call)
    apply_cache(model, config)
    with pytest.raises(ValueError, match=r"the smallest is"), torch.no_grad():
        model(**call)
    remove_cache(model)


def test_a_guidance_stream_more_than_planned_replans_and_holds_the_budget():
    """A bare Wan transformer called twice per step (guidance as two calls): the layout chosen for one stream is
    replaced at the first step's second call, the next step is full, and the budget holds for both streams."""
    model = build("wan")
    call = FAMILIES["wan"][1]()
    config = preset("ditcache", tolerance=0.6, cache_memory="3H")  # one first full step
    apply_cache(model, config)
    with torch.no_grad():
        for t in torch.linspace(999, 100, 8):
            for _ in range(2):
                model(**call, timestep=t.expand(2))
    stats = cache_stats(model)
    assert stats.full_step_reasons[1] == "memory" and stats.full_step_indices[:2] == (0, 1)
    assert 0 < stats.cache_bytes <= stats.cache_budget


def test_a_residual_layout_on_blocks_whose_streams_are_unknown_is_refused(monkeypatch):
    from ditcache import residual

    monkeypatch.setitem(residual.BLOCK_STREAMS, "STDiT3Block", None)
    pipe = builders.opensora_pipeline()
    with pytest.raises(ValueError, match=r"spatial_blocks.0 \(STDiT3Block\): which hidden states it takes and returns"):
        apply_cache(pipe, FORAConfig(cache_layout="chain"))
    apply_cache(pipe, preset("ditcache", cache_memory="8H"))  # a budget keeps to the branch layout there


def test_a_pipeline_running_true_guidance_is_planned_for_both_streams_from_the_start():
    """FLUX.1 with a negative prompt and true_cfg_scale > 1 calls the transformer twice per step: the layout is
    chosen for two streams at the run's start, so no step is spent on a change of layout."""
    pipe = builders.flux_pipeline()
    pipe.set_progress_bar_config(disable=True)
    arguments = dict(prompt="a red fox", negative_prompt="", true_cfg_scale=2.0, height=32, width=32, max_sequence_length=16,
                     num_inference_steps=10, output_type="latent")
    apply_cache(pipe, preset("ditcache", tolerance=0.6, cache_memory="12H"))
    pipe(**(arguments | dict(true_cfg_scale=1.0)), generator=torch.Generator().manual_seed(0))
    one_stream = cache_stats(pipe).cache_layout
    pipe(**arguments, generator=torch.Generator().manual_seed(0))
    stats = cache_stats(pipe)
    assert stats.cache_layout != one_stream  # two streams take a smaller layout, chosen before the first step
    assert "memory" not in stats.full_step_reasons
    assert 0 < stats.cache_bytes <= stats.cache_budget


@pytest.mark.parametrize("config", [preset("ditcache"), FORAConfig(cache_interval=3, forecast_order=1)])
def test_the_engines_count_is_what_the_process_holds_beyond_an_uncached_run(config):
    """Live tensors at each transformer call, weights left out, less an uncached run's at the same calls: what the
    cache holds, nothing more (no past step's latents kept by the engine), and no less than the engine counts
    before the last call."""
    from eval.held_memory import held_bytes, live_bytes_at_calls

    pipe = builders.dit_pipeline()
    pipe.set_progress_bar_config(disable=True)
    arguments = dict(class_labels=[1, 2], num_inference_steps=10, output_type="latent")
    with torch.no_grad():
        with live_bytes_at_calls(pipe, every=1) as uncached:
            pipe(**arguments, generator=torch.Generator().manual_seed(0))
        apply_cache(pipe, config)
        with live_bytes_at_calls(pipe, every=1) as cached:
            pipe(**arguments, generator=torch.Generator().manual_seed(0))
    counted, held = cache_stats(pipe).cache_bytes, held_bytes(cached, uncached)
    assert 0.5 * counted <= held <= counted + 256


def test_the_budgets_dry_runs_are_unseen_by_a_flop_counter_around_the_first_call():
    """The layout is chosen inside the first call, by dry runs on a fake copy: a FlopCounterMode around the call
    counts the model's own FLOPs, as the engine does, neither the dry runs' nor fewer (its module tracker must not
    take the copy for the model)."""
    from ditcache.flops import count_flops

    pipe = builders.flux_pipeline()
    pipe.set_progress_bar_config(disable=True)
    apply_cache(pipe, preset("ditcache", cache_memory="8H"))
    arguments = dict(prompt="a red fox", height=32, width=32, max_sequence_length=16, num_inference_steps=14, output_type="latent")
    with torch.no_grad():
        _, counted = count_flops(lambda: pipe(**arguments, generator=torch.Generator().manual_seed(0)), pipe.transformer)
    stats = cache_stats(pipe)
    assert stats.cache_budget > 0 and stats.partial_steps > 0
    assert counted == pytest.approx(stats.flops, rel=0.03)  # the engine also counts the forecasts' elementwise work


OFFLOADED = {
    "fora-forecast": FORAConfig(cache_interval=3, forecast_order=1),
    "preset": preset("ditcache", tolerance=0.4, cache_memory=None),
    "chain-float8": FORAConfig(cache_interval=3, forecast_order=2, cache_layout="chain", cache_precision="float8"),
    "toca-forecast": ToCaConfig(cache_interval=3, cache_ratio=0.7, forecast_order=1),
}


@pytest.mark.parametrize("name", sorted(OFFLOADED))
def test_an_offloaded_cache_gives_the_images_of_the_cache_on_the_device(name):
    """Values and differences kept in host memory, copied back block by block (the next one prefetched): the same
    images as the cache on the device, with the cache's bytes on the host and only the running blocks' copies on
    the device."""
    from dataclasses import replace

    pipe = builders.flux_pipeline()
    pipe.set_progress_bar_config(disable=True)
    arguments = dict(prompt="a red fox", height=32, width=32, max_sequence_length=16, num_inference_steps=10, output_type="latent")
    images, stats = {}, {}
    for offload in (False, True):
        apply_cache(pipe, replace(OFFLOADED[name], cache_offload=offload))
        images[offload] = pipe(**arguments, generator=torch.Generator().manual_seed(0)).images
        stats[offload] = cache_stats(pipe)
    assert torch.equal(images[True], images[False]) and stats[True].full_step_indices == stats[False].full_step_indices
    assert stats[False].cache_host_bytes == 0 and stats[True].partial_steps > 0
    # every kept value on the host; on the device the run's memos and the copies of the blocks running
    assert 0 < stats[True].cache_host_bytes <= stats[False].cache_bytes <= stats[True].cache_host_bytes + stats[True].cache_bytes
    assert stats[True].cache_bytes < stats[False].cache_bytes


def test_offloading_copies_each_block_back_when_it_runs_and_prefetches_the_next():
    from ditcache.budget import CacheLayout
    from ditcache.state import StreamCaches
    from ditcache.store import CacheKey

    caches = StreamCaches(CacheLayout(0, "model", 1), offload=True)
    for name in ("a", "b", "c"):
        caches.block(name, 0).store(CacheKey("x"), torch.full((2, 3), float(ord(name))), step=0, order=1)
    caches.end_call()
    assert all(not cache.device_copies for cache in caches.blocks.values())  # nothing on the device between calls
    a = caches.block("a", 0)
    assert torch.equal(a.kept(CacheKey("x")), torch.full((2, 3), 97.0)) and len(caches.blocks[("b", 0)].device_copies) == 1
    caches.block("b", 0)
    assert not a.device_copies and len(caches.blocks[("c", 0)].device_copies) == 1  # a released, c prefetched


def test_an_offloaded_cache_takes_no_device_budget():
    with pytest.raises(ValueError, match="`cache_memory` bounds the cache on the device"):
        FORAConfig(cache_offload=True, cache_memory="8H")
    assert preset("ditcache", cache_offload=True).cache_memory is None


def test_a_budget_that_cannot_be_planned_without_data_warns_and_keeps_the_smallest_layout():
    """Mochi's attention keeps the prompt tokens its mask's values select, which a dry run cannot: the run warns
    and keeps one residual per chain in float8 at the config's order."""
    model = build("mochi")
    argument = SPECS[type(model).__name__].timestep_argument
    apply_cache(model, preset("ditcache"))
    with pytest.warns(UserWarning, match=r"cache_memory=16H cannot be planned: .*reads its inputs' values"), torch.no_grad():
        for t in timesteps("mochi"):
            model(**FAMILIES["mochi"][1](), **{argument: t})
    assert cache_stats(model).cache_layout == "chain, float8, order 2"


def test_float8_rounding_is_taken_off_the_measured_error():
    """A branch that moves on a line is forecast exactly from its differences; in float8 the forecast is off by
    the rounding only, which more full steps would not remove: the error meter takes it off (independent
    roundings: their squares add, each times its forecast factor squared)."""
    from ditcache.control import ErrorMeter, squared_error
    from ditcache.forecast import NEWTON
    from ditcache.store import BlockCache, CacheKey

    torch.manual_seed(0)
    start, slope = torch.randn(4, 64, 32), torch.randn(4, 64, 32)
    cache = BlockCache(precision="float8", max_order=2)
    for step in (0, 2, 4):
        cache.store(CacheKey("x"), start + step * slope, step, order=2)
    fresh = start + 6 * slope
    plain, corrected = ErrorMeter(torch.device("cpu")), ErrorMeter(torch.device("cpu"))
    for meter, noise in ((plain, None), (corrected, cache.rounding_error(CacheKey("x"), 6, NEWTON))):
        meter.open_step(6, 2, 2, True)
        meter.add(squared_error(cache.current(CacheKey("x"), 6, NEWTON), fresh, noise), fresh)
        meter.close_step()
    error = {name: float(meter.measurements[0].sums[0] / meter.measurements[0].sums[1]) ** 0.5
             for name, meter in (("plain", plain), ("corrected", corrected))}
    assert error["plain"] > 0.01 and error["corrected"] < 0.3 * error["plain"]


def test_float8_differences_keep_the_value_as_computed_and_the_differences_in_float8():
    from ditcache.codecs import Float8Rows
    from ditcache.forecast import NEWTON
    from ditcache.store import BlockCache, CacheKey

    torch.manual_seed(0)
    values = [torch.randn(2, 16, 64, dtype=torch.bfloat16) for _ in range(3)]
    caches = {precision: BlockCache(precision=precision, max_order=2) for precision in ("model", "float8_differences")}
    for step, value in zip((0, 2, 4), values):
        for cache in caches.values():
            cache.store(CacheKey("x"), value, step, order=2)
    mixed = caches["float8_differences"]
    assert torch.equal(mixed.kept(CacheKey("x")), values[-1]) and all(isinstance(d, Float8Rows) for d in mixed.entries[CacheKey("x")].differences)
    assert mixed.nbytes() < 0.72 * caches["model"].nbytes()  # 1 + 2 x (1/2 + a scale per row) of 3 bf16 terms
    exact, rounded = caches["model"].current(CacheKey("x"), 6, NEWTON).float(), mixed.current(CacheKey("x"), 6, NEWTON).float()
    assert (rounded - exact).norm() < 0.05 * exact.norm()


def test_every_path_keeps_its_tensors_in_one_store_under_one_kind_of_key():
    """``CacheKey(branch, call, output)`` means the same on each path: a block adapter keeps one tensor per branch,
    the generic path every tensor each branch module returns (SD3's joint attention returns two), a residual layout
    one per stream of hidden states a block returns (SD3's blocks return the text's and the image's)."""
    from ditcache.hooks import STEP_HOOK
    from ditcache.store import RESIDUAL, CacheKey

    def keys(model, family=None):
        if family is None:
            with torch.no_grad():
                for t in (900, 800):
                    model(torch.randn(1, 4, 8, 8), timestep=torch.tensor([t]), class_labels=torch.tensor([1]))
        else:
            run(model, family)
        caches = model._diffusers_hook.get_hook(STEP_HOOK).run.caches.blocks
        return {key for cache in caches.values() for key in cache.entries}

    dit = builders.dit_transformer()
    apply_cache(dit, FORAConfig(cache_interval=2))
    assert keys(dit) == {CacheKey("attn"), CacheKey("mlp")}
    sd3 = build("sd3")
    apply_cache(sd3, FORAConfig(cache_interval=2))
    joint, image_only = {CacheKey("attn", 0, 0), CacheKey("attn", 0, 1)}, {CacheKey("attn2"), CacheKey("ff"), CacheKey("ff_context")}
    assert keys(sd3, "sd3") == joint | image_only
    remove_cache(sd3)
    apply_cache(sd3, FORAConfig(cache_interval=2, cache_layout="block"))
    assert keys(sd3, "sd3") == {CacheKey(RESIDUAL, 0, 0), CacheKey(RESIDUAL, 0, 1)}
