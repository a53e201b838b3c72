"""The generic path: layer caching (FORA) and forecasts on every transformer with a ``ModelSpec``, through
hooks on its blocks' branch submodules, checked against diffusers' own forward on tiny models."""

import pytest
import torch
from diffusers import (
    BriaTransformer2DModel,
    CogVideoXTransformer3DModel,
    CogView4Transformer2DModel,
    Flux2Transformer2DModel,
    HunyuanImageTransformer2DModel,
    HunyuanVideoTransformer3DModel,
    Kandinsky5Transformer3DModel,
    LTXVideoTransformer3DModel,
    MochiTransformer3DModel,
    MotifVideoTransformer3DModel,
    QwenImageTransformer2DModel,
    SD3Transformer2DModel,
    WanTransformer3DModel,
    ZImageTransformer2DModel,
)

from ditcache import FORAConfig, ToCaConfig, ToMeConfig, apply_cache, cache_stats, remove_cache
from ditcache.flops import count_flops
from ditcache.hooks import _step_hook
from ditcache.specs import SPECS

BATCH, TEXT = 2, 5


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _ids(tokens: int, axes: int, offset: float = 0.0):
    ids = torch.zeros(tokens, axes)
    ids[:, -1] = torch.arange(tokens) + offset
    return ids


def _without_zero_weights(model):
    """Random values in the weights a model initialises to zero (its gates), so that every branch counts."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in model.parameters():
            if not parameter.any():
                parameter.copy_(0.1 * torch.randn(parameter.shape, generator=generator))
    return model


# Each family: a tiny transformer built from config, and the inputs of one call but the timestep.
FAMILIES = {
    "sd3": (
        lambda: SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
                                      num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
                                      pooled_projection_dim=16, out_channels=4, pos_embed_max_size=16, dual_attention_layers=(0,)),
        lambda: {"hidden_states": _randn(BATCH, 4, 8, 8), "encoder_hidden_states": _randn(BATCH, TEXT, 16, seed=1),
                 "pooled_projections": _randn(BATCH, 16, seed=2)},
    ),
    "wan": (
        lambda: WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4,
                                      out_channels=4, text_dim=16, freq_dim=16, ffn_dim=32, num_layers=2, rope_max_seq_len=32),
        lambda: {"hidden_states": _randn(BATCH, 4, 2, 8, 8), "encoder_hidden_states": _randn(BATCH, TEXT, 16, seed=1)},
    ),
    "qwenimage": (
        lambda: QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16,
                                            num_attention_heads=2, joint_attention_dim=16, axes_dims_rope=(4, 6, 6)),
        lambda: {"hidden_states": _randn(BATCH, 16, 16), "encoder_hidden_states": _randn(BATCH, TEXT, 16, seed=1),
                 "encoder_hidden_states_mask": torch.ones(BATCH, TEXT, dtype=torch.long), "img_shapes": [[(1, 4, 4)]] * BATCH},
    ),
    "hunyuanvideo": (
        lambda: HunyuanVideoTransformer3DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8,
                                               num_layers=1, num_single_layers=1, num_refiner_layers=1, patch_size=1,
                                               patch_size_t=1, text_embed_dim=16, pooled_projection_dim=8, rope_axes_dim=(2, 2, 4)),
        lambda: {"hidden_states": _randn(BATCH, 4, 1, 4, 4), "encoder_hidden_states": _randn(BATCH, TEXT, 16, seed=1),
                 "encoder_attention_mask": torch.ones(BATCH, TEXT), "pooled_projections": _randn(BATCH, 8, seed=2),
                 "guidance": torch.full((BATCH,), 6000.0)},
    ),
    "hunyuanvideo-i2v": (  # image_condition_type="token_replace": the token-replace block classes
        lambda: HunyuanVideoTransformer3DModel(in_channels=8, out_channels=4, num_attention_heads=2, attention_head_dim=8,
                                               num_layers=1, num_single_layers=1, num_refiner_layers=1, patch_size=1,
                                               patch_size_t=1, text_embed_dim=16, pooled_projection_dim=8,
                                               rope_axes_dim=(2, 2, 4), image_condition_type="token_replace"),
        lambda: {"hidden_states": _randn(BATCH, 8, 2, 4, 4), "encoder_hidden_states": _randn(BATCH, TEXT, 16, seed=1),
                 "encoder_attention_mask": torch.ones(BATCH, TEXT), "pooled_projections": _randn(BATCH, 8, seed=2),
                 "guidance": torch.full((BATCH,), 6000.0)},
    ),
    "flux2": (
        lambda: Flux2Transformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
                                        num_attention_heads=2, joint_attention_dim=16, timestep_guidance_channels=16,
                                        axes_dims_rope=(4, 4, 4, 4)),
        lambda: {"hidden_states": _randn(BATCH, 16, 16), "encoder_hidden_states": _randn(BATCH, TEXT, 16, seed=1),
                 "img_ids": _ids(16, 4, TEXT).expand(BATCH, -1, -1), "txt_ids": _ids(TEXT, 4).expand(BATCH, -1, -1),
                 "guidance": torch.full((BATCH,), 4.0)},
    ),
    "cogvideox": (
        lambda: CogVideoXTransformer3DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
                                            time_embed_dim=8, text_embed_dim=16, num_layers=2, sample_width=8, sample_height=8,
                                            sample_frames=9, patch_size=2, temporal_compression_ratio=4, max_text_seq_length=TEXT),
        lambda: {"hidden_states": _randn(BATCH, 3, 4, 8, 8), "encoder_hidden_states": _randn(BATCH, TEXT, 16, seed=1)},
    ),
    "ltx": (
        lambda: LTXVideoTransformer3DModel(in_channels=8, out_channels=8, patch_size=1, patch_size_t=1, num_attention_heads=2,
                                           attention_head_dim=8, cross_attention_dim=16, num_layers=2, caption_channels=16),
        lambda: {"hidden_states": _randn(BATCH, 2 * 4 * 4, 8), "encoder_hidden_states": _randn(BATCH, TEXT, 16, seed=1),
                 "encoder_attention_mask": torch.ones(BATCH, TEXT), "num_frames": 2, "height": 4, "width": 4},
    ),
    "mochi": (
        lambda: MochiTransformer3DModel(patch_size=2, num_attention_heads=2, attention_head_dim=8, num_layers=2,
                                        pooled_projection_dim=16, in_channels=4, text_embed_dim=16, time_embed_dim=4,
                                        max_sequence_length=TEXT),
        lambda: {"hidden_states": _randn(BATCH, 4, 2, 8, 8), "encoder_hidden_states": _randn(BATCH, TEXT, 16, seed=1),
                 "encoder_attention_mask": torch.ones(BATCH, TEXT)},
    ),
    "cogview4": (
        lambda: CogView4Transformer2DModel(patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8,
                                           num_attention_heads=2, text_embed_dim=16, time_embed_dim=8, condition_dim=4,
                                           pos_embed_max_size=16, sample_size=8, rope_axes_dim=(4, 4)),
        lambda: {"hidden_states": _randn(BATCH, 4, 8, 8), "encoder_hidden_states": _randn(BATCH, TEXT, 16, seed=1),
                 "original_size": torch.tensor([[64.0, 64.0]] * BATCH), "target_size": torch.tensor([[64.0, 64.0]] * BATCH),
                 "crop_coords": torch.zeros(BATCH, 2)},
    ),
    "bria": (
        lambda: BriaTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
                                       num_attention_heads=2, joint_attention_dim=16, axes_dims_rope=[4, 6, 6]),
        lambda: {"hidden_states": _randn(BATCH, 16, 16), "encoder_hidden_states": _randn(BATCH, TEXT, 16, seed=1),
                 "img_ids": _ids(16, 3, TEXT), "txt_ids": _ids(TEXT, 3)},
    ),
    "hunyuanimage": (
        lambda: HunyuanImageTransformer2DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8,
                                               num_layers=1, num_single_layers=1, num_refiner_layers=1, patch_size=(1, 1),
                                               text_embed_dim=16, rope_axes_dim=(4, 4)),
        lambda: {"hidden_states": _randn(BATCH, 4, 4, 4), "encoder_hidden_states": _randn(BATCH, TEXT, 16, seed=1),
                 "encoder_attention_mask": torch.ones(BATCH, TEXT)},
    ),
    "motifvideo": (
        lambda: MotifVideoTransformer3DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8,
                                             num_layers=1, num_single_layers=1, patch_size=2, patch_size_t=1, text_embed_dim=16,
                                             rope_axes_dim=(2, 2, 4)),
        lambda: {"hidden_states": _randn(BATCH, 4, 1, 8, 8), "encoder_hidden_states": _randn(BATCH, TEXT, 16, seed=1),
                 "encoder_attention_mask": torch.ones(BATCH, TEXT)},
    ),
    "zimage": (  # latents and captions as lists of per-sample tensors; the timestep (1000 - t) / 1000 rises
        lambda: ZImageTransformer2DModel(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=4, dim=32, n_layers=2,
                                         n_refiner_layers=1, n_heads=2, n_kv_heads=2, cap_feat_dim=16, axes_dims=[4, 6, 6],
                                         axes_lens=[64, 32, 32]),
        lambda: {"x": [_randn(4, 1, 8, 8, seed=i) for i in range(BATCH)], "cap_feats": [_randn(TEXT, 16, seed=9 + i) for i in range(BATCH)]},
    ),
    "kandinsky5": (  # latents (batch, frames, height, width, channels); rotary positions given by the pipeline
        lambda: _without_zero_weights(Kandinsky5Transformer3DModel(
            in_visual_dim=4, in_text_dim=16, in_text_dim2=8, time_dim=16, out_visual_dim=4, patch_size=(1, 2, 2),
            model_dim=32, ff_dim=64, num_text_blocks=1, num_visual_blocks=2, axes_dims=(4, 6, 6))),
        lambda: {"hidden_states": _randn(BATCH, 2, 8, 8, 4), "encoder_hidden_states": _randn(BATCH, TEXT, 16, seed=1),
                 "pooled_projections": _randn(BATCH, 8, seed=2), "text_rope_pos": torch.arange(TEXT),
                 "visual_rope_pos": [torch.arange(2), torch.arange(4), torch.arange(4)]},
    ),
}
STEPS = 7


def timesteps(family: str) -> list[torch.Tensor]:
    """A run's timesteps in the family's units and direction (Mochi's rise, FLUX.2's and Qwen-Image's are t / 1000)."""
    spec = SPECS[type(build(family)).__name__]
    values = torch.linspace(999, 100, STEPS) * spec.timestep_scale + spec.timestep_offset
    if spec.timestep_rises and spec.timestep_scale > 0:  # Mochi's scheduler itself runs upwards
        values = values.flip(0)
    return [torch.full((BATCH,), float(v)) for v in values]


def build(family: str):
    torch.manual_seed(0)
    return FAMILIES[family][0]().eval()


def run(model, family: str) -> list[torch.Tensor]:
    inputs, argument = FAMILIES[family][1](), SPECS[type(model).__name__].timestep_argument
    with torch.no_grad():
        outputs = [model(**inputs, **{argument: t}, return_dict=False)[0] for t in timesteps(family)]
    return [torch.stack(out) if isinstance(out, list) else out for out in outputs]  # Z-Image: one tensor per sample


def hooked_modules(model) -> list[str]:
    return [name for name, module in model.named_modules() if hasattr(module, "_diffusers_hook")]


def test_every_family_of_the_issue_has_a_spec():
    families = {spec.family for spec in SPECS.values() if spec.adapter is None}
    assert {"sd3", "wan", "qwenimage", "hunyuanvideo", "flux2", "cogvideox", "ltx", "mochi"} <= families
    assert set(FAMILIES) - {"hunyuanvideo-i2v"} == families


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_fora_and_forecasts_on_every_spec(family):
    model = build(family)
    plain = run(model, family)

    apply_cache(model, FORAConfig(cache_interval=1))
    for got, expected in zip(run(model, family), plain, strict=True):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)  # the hooked path computes what diffusers does

    apply_cache(model, FORAConfig(cache_interval=3))
    fora, counted = count_flops(lambda: run(model, family), model)
    stats = cache_stats(model)
    # The engine's count against FlopCounterMode's: branches are measured by it, the rest by its linear and
    # convolution layers (attention outside the blocks, HunyuanVideo's token refiner, is not seen).
    assert stats.flops == pytest.approx(counted, rel=0.01)
    assert stats.full_step_indices == (0, 1, 4) and stats.partial_steps == 4  # the generic preset: 2 full, then every 3
    assert stats.flops < 0.75 * stats.flops_full
    for step in (0, 1, 4):
        torch.testing.assert_close(fora[step], plain[step], rtol=0, atol=0)
    assert all(torch.isfinite(out).all() for out in fora) and not torch.equal(fora[2], plain[2])

    apply_cache(model, FORAConfig(cache_interval=3, forecast_order=1))
    forecast = run(model, family)
    assert all(torch.isfinite(out).all() for out in forecast)
    assert not torch.equal(forecast[5], fora[5])  # steps 5 and 6 extrapolate from full steps 1 and 4

    remove_cache(model)
    assert hooked_modules(model) == []
    for got, expected in zip(run(model, family), plain, strict=True):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_generic_family_refuses_token_merging():
    model = build("wan")
    for config in (ToMeConfig(), [FORAConfig(), ToMeConfig()], [ToCaConfig(), ToMeConfig()]):
        with pytest.raises(ValueError, match="no token merging yet"):
            apply_cache(model, config)
    assert hooked_modules(model) == []
    with pytest.raises(ValueError, match="no published setting"):
        apply_cache(model, FORAConfig(schedule="reference"))


def test_a_new_run_of_a_rising_timestep_model_is_seen_on_a_bare_transformer():
    model = build("mochi")
    apply_cache(model, FORAConfig(cache_interval=3))
    first = run(model, "mochi")
    second = run(model, "mochi")  # the timestep falls back: a new run, not step 8 of the first
    assert cache_stats(model).steps == STEPS
    for a, b in zip(first, second, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_a_branch_changed_in_place_by_its_block_is_refused():
    model = build("wan")
    apply_cache(model, FORAConfig(cache_interval=3))
    block = model.blocks[0]
    block.ffn.register_forward_hook(lambda _m, _i, output: output.mul_(1.0))  # a block that edits the output in place
    with pytest.raises(RuntimeError, match="changed this branch's output in place"):
        run(model, "wan")


def test_a_generic_pipeline_loads_cached_with_fora_and_round_trips(tmp_path):
    from ditcache import ToCaPipeline
    from ditcache.eval.builders import wan_pipeline

    wan_pipeline(tmp_path / "wan")
    plain_pipe = ToCaPipeline.from_pretrained(tmp_path / "wan")
    assert isinstance(plain_pipe.cache_config, FORAConfig)  # no token-wise path: layer caching by default
    call = {"prompt": "a red fox in snow", "height": 16, "width": 16, "num_frames": 5, "num_inference_steps": 7,
            "output_type": "pt", "max_sequence_length": 8}
    frames = lambda pipe, **extra: pipe(**call, generator=torch.Generator().manual_seed(0), **extra).frames  # noqa: E731
    uncached = frames(plain_pipe, cache=False)
    torch.testing.assert_close(frames(plain_pipe, cache_interval=1), uncached, rtol=0, atol=0)
    cached = frames(plain_pipe)
    stats = plain_pipe.cache_stats
    assert stats.steps == 7 and stats.full_step_indices == (0, 1, 4) and stats.flops < stats.flops_full
    assert not torch.equal(cached, uncached) and torch.isfinite(cached).all()
    torch.testing.assert_close(frames(plain_pipe), cached, rtol=0, atol=0)  # each call is its own run
    plain_pipe.save_pretrained(tmp_path / "saved")
    reloaded = ToCaPipeline.from_pretrained(tmp_path / "saved")
    assert reloaded.cache_config == plain_pipe.cache_config
    torch.testing.assert_close(frames(reloaded), cached, rtol=0, atol=0)
    with pytest.raises(ValueError, match="cache_ratio"):
        ToCaPipeline.from_pretrained(tmp_path / "wan", cache_ratio=0.9)


def test_wan_2_2_caches_both_experts():
    """Wan 2.2's pipeline runs a second transformer for the low-noise steps: both are cached, each its
    own run from its first step, and the stats cover the whole run."""
    from ditcache.eval.builders import wan_pipeline

    pipe = wan_pipeline(two_experts=True)
    pipe.set_progress_bar_config(disable=True)
    call = {"prompt": "a red fox in snow", "height": 16, "width": 16, "num_frames": 5, "num_inference_steps": 10,
            "output_type": "pt", "max_sequence_length": 8}
    frames = lambda: pipe(**call, generator=torch.Generator().manual_seed(0)).frames  # noqa: E731
    uncached = frames()
    apply_cache(pipe, FORAConfig(cache_interval=1))
    torch.testing.assert_close(frames(), uncached, rtol=0, atol=0)
    apply_cache(pipe, FORAConfig(cache_interval=3))
    cached = frames()
    stats = cache_stats(pipe)
    first, second = (_step_hook(model).run.completed_stats for model in (pipe.transformer, pipe.transformer_2))
    assert first.steps > 0 and second.steps > 0 and stats.steps == first.steps + second.steps == 10
    assert stats.full_step_indices == first.full_step_indices + tuple(first.steps + i for i in second.full_step_indices)
    assert second.full_step_indices[:2] == (0, 1)  # the second expert starts its own run: its first steps are full
    assert stats.flops == first.flops + second.flops and stats.flops < 0.75 * stats.flops_full
    assert not torch.equal(cached, uncached) and torch.isfinite(cached).all()
    boundary = pipe.config.boundary_ratio
    pipe.register_to_config(boundary_ratio=None)  # the next call runs the first expert only
    frames()
    assert cache_stats(pipe) == _step_hook(pipe.transformer).run.completed_stats and cache_stats(pipe).steps == 10
    pipe.register_to_config(boundary_ratio=boundary)
    remove_cache(pipe)
    assert hooked_modules(pipe.transformer) == [] and hooked_modules(pipe.transformer_2) == []
    torch.testing.assert_close(frames(), uncached, rtol=0, atol=0)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_toca_recomputes_tokens_of_per_token_branches(family):
    model = build(family)
    plain = run(model, family)
    apply_cache(model, FORAConfig(cache_interval=3))
    fora, fora_flops = run(model, family), cache_stats(model).flops

    # Every token recomputed: each per-token branch gives exactly what it gives on its whole input.
    spec = SPECS[type(model).__name__]
    checked = []

    def check(module, args, kwargs, output):
        expected = type(module).forward(module, *args, **kwargs)
        torch.testing.assert_close(output, expected, rtol=1e-5, atol=1e-6)
        checked.append(module)

    apply_cache(model, ToCaConfig(cache_interval=3, cache_ratio=0.0))
    handles = [getattr(block, branch).register_forward_hook(check, with_kwargs=True)
               for list_name in spec.block_lists for block in getattr(model, list_name)
               for branch in spec.partial_branches.get(type(block).__name__, ()) if getattr(block, branch, None) is not None]
    run(model, family)
    for handle in handles:
        handle.remove()
    assert checked and cache_stats(model).recompute_fraction == 1.0

    apply_cache(model, ToCaConfig(cache_interval=3, cache_ratio=0.5))
    toca, counted = count_flops(lambda: run(model, family), model)
    stats = cache_stats(model)
    assert stats.full_step_indices == (0, 1, 4) and 0.4 <= stats.recompute_fraction <= 0.6
    assert stats.flops == pytest.approx(counted, rel=0.01) and fora_flops < stats.flops < stats.flops_full
    for step in (0, 1, 4):
        torch.testing.assert_close(toca[step], plain[step], rtol=0, atol=0)
    assert all(torch.isfinite(out).all() for out in toca) and not torch.equal(toca[2], fora[2])
    assert run(model, family)[5].equal(toca[5])  # seeded: the same tokens on the next run


SCORED = sorted(family for family in FAMILIES if SPECS[type(build(family)).__name__].attention_sequences)


def test_the_four_new_families_score_tokens_by_attention():
    assert {"sd3", "wan", "qwenimage", "hunyuanvideo", "hunyuanvideo-i2v"} <= set(SCORED)


@pytest.mark.parametrize("score", ["attention", "k_norm", "v_norm"])
@pytest.mark.parametrize("family", SCORED)
def test_toca_with_scores_read_from_the_attention(family, score):
    model = build(family)
    plain = run(model, family)
    apply_cache(model, ToCaConfig(cache_interval=1, score=score))
    for got, expected in zip(run(model, family), plain, strict=True):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)  # every step full: diffusers' forward, bit for bit

    apply_cache(model, ToCaConfig(cache_interval=3, cache_ratio=0.5, score="random"))
    randomly = run(model, family)
    apply_cache(model, ToCaConfig(cache_interval=3, cache_ratio=0.5, score=score))
    toca, counted = count_flops(lambda: run(model, family), model)
    stats = cache_stats(model)
    # The scores' products are FLOPs too, on both sides of the comparison.
    assert stats.flops == pytest.approx(counted, rel=0.01) and stats.flops < stats.flops_full
    assert stats.full_step_indices == (0, 1, 4) and 0.4 <= stats.recompute_fraction <= 0.6
    for step in (0, 1, 4):
        torch.testing.assert_close(toca[step], plain[step], rtol=0, atol=0)
    assert all(torch.isfinite(out).all() for out in toca) and not torch.equal(toca[2], randomly[2])
    assert run(model, family)[5].equal(toca[5])


class _FirstAttention(torch.overrides.TorchFunctionMode):
    """The test's own record of the first attention call: its explicit softmax map."""

    def __init__(self):
        super().__init__()
        self.received = None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.nn.functional.scaled_dot_product_attention and self.received is None:
            named = dict(zip(("query", "key"), args)) | kwargs
            query, key = named["query"], named["key"]
            weights = (query @ key.transpose(-1, -2) / query.shape[-1] ** 0.5).softmax(dim=-1)
            self.received = weights.mean(dim=1).sum(dim=1)  # (batch, keys): the attention each token receives
        return func(*args, **kwargs)


@pytest.mark.parametrize(("family", "image_first"), [("sd3", True), ("qwenimage", False), ("wan", True)])
def test_attention_scores_are_the_attention_each_token_receives(family, image_first):
    """The first block's kept scores of its image and text tokens against the softmax map of diffusers'
    own attention call, sliced in the order its processor joins the two (SD3: image first; Qwen-Image:
    text first; Wan: image tokens only)."""
    from ditcache.scores import l2_normalize

    model = build(family)
    inputs, argument = FAMILIES[family][1](), SPECS[type(model).__name__].timestep_argument
    apply_cache(model, ToCaConfig(cache_interval=3, cache_ratio=0.5, score="attention"))
    run(model, family)
    cache = _step_hook(model).run.block_cache(f"{SPECS[type(model).__name__].block_lists[0]}.0")
    remove_cache(model)
    # Kept at full step 4 (the last) and sliced at step 5: the block saw what an uncached call at step 4 gives it.
    with torch.no_grad(), _FirstAttention() as reference:
        model(**inputs, **{argument: timesteps(family)[4]}, return_dict=False)
    received = reference.received
    image = 16
    text = received.shape[1] - image
    if family == "wan":
        image, text = received.shape[1], 0
    image_part = received[:, :image] if image_first else received[:, text:]
    torch.testing.assert_close(cache.normalized_scores["image"], l2_normalize(image_part), rtol=1e-4, atol=1e-6)
    if text:
        text_part = received[:, image:] if image_first else received[:, :text]
        torch.testing.assert_close(cache.normalized_scores["text"], l2_normalize(text_part), rtol=1e-4, atol=1e-6)


def test_generic_path_refuses_scores_it_cannot_read():
    with pytest.raises(ValueError, match="not available on the generic path"):
        apply_cache(build("wan"), ToCaConfig(score="cross_attention_entropy"))
    with pytest.raises(ValueError, match="declares no attention sequence"):
        apply_cache(build("mochi"), ToCaConfig(score="attention"))


def test_generate_and_sweep_take_a_generic_pipeline_folder(tmp_path, capsys, monkeypatch):
    """`ditcache generate` and `ditcache sweep` accept such a pipeline by its folder (a tiny Wan here)."""
    import json

    import yaml
    from PIL import Image

    from ditcache import cli
    from ditcache.eval.builders import wan_pipeline

    monkeypatch.chdir(tmp_path)
    wan_pipeline(tmp_path / "wan")
    argv = ["generate", "--model", str(tmp_path / "wan"), "--prompt", "a red fox in snow", "--frames", "5", "--height", "16",
            "--width", "16", "--steps", "7", "--compare", "--repeats", "1", "--quiet", "--out", "fox.gif"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "3 full + 4 partial steps" in out and "in transformer FLOPs" in out
    assert Image.open(tmp_path / "fox.gif").n_frames == 5

    config = {"pipeline": str(tmp_path / "wan"), "steps": 7, "height": 16, "width": 16, "seeds": [0], "prompts": ["a red fox in snow"],
              "call": {"num_frames": 5, "max_sequence_length": 8}, "methods": ["fora:3", "toca:3:0.5"], "metrics": ["psnr"]}
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(config))
    assert cli.main(["sweep", str(tmp_path / "sweep.yaml"), "--output", str(tmp_path / "runs"), "--quiet"]) == 0
    rows = {row["method"]: row for row in json.loads((tmp_path / "runs" / "results.json").read_text())}
    assert set(rows) == {"uncached", "fora:3", "toca:3:0.5"}
    assert rows["fora:3"]["flops_speedup"] > rows["toca:3:0.5"]["flops_speedup"] > 1.0
    assert 10 < rows["fora:3"]["psnr"] < 100 and 10 < rows["toca:3:0.5"]["psnr"] < 100


class _ToyBlock(torch.nn.Module):
    """A block of a model diffusers does not ship: gated residual branches, as DiT-like blocks have."""

    def __init__(self, width: int):
        super().__init__()
        self.norm = torch.nn.LayerNorm(width)
        self.mixer = torch.nn.MultiheadAttention(width, 2, batch_first=True)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(width, 4 * width), torch.nn.GELU(), torch.nn.Linear(4 * width, width))
        self.gate = torch.nn.Linear(width, 2 * width)

    def forward(self, hidden_states, conditioning):
        first, second = self.gate(conditioning).chunk(2, dim=-1)
        normed = self.norm(hidden_states)
        hidden_states = hidden_states + first[:, None] * self.mixer(normed, normed, normed, need_weights=False)[0]
        return hidden_states + second[:, None] * self.mlp(self.norm(hidden_states))


class ToyTransformer(torch.nn.Module):
    def __init__(self, width: int = 16, depth: int = 3):
        super().__init__()
        self.embed = torch.nn.Linear(1, width)
        self.layers = torch.nn.ModuleList(_ToyBlock(width) for _ in range(depth))

    def forward(self, hidden_states, timestep, return_dict=False):
        conditioning = self.embed(timestep.reshape(-1, 1))
        for layer in self.layers:
            hidden_states = layer(hidden_states, conditioning)
        return (hidden_states,)


def test_any_model_is_cached_once_its_spec_names_its_branches():
    """A model outside diffusers: one ``register`` call naming its block list and branch modules."""
    from ditcache.specs import ModelSpec, register

    register(ModelSpec(family="toy", transformer="ToyTransformer", block_lists=("layers",),
                       branches={"_ToyBlock": ("mixer", "mlp")}, partial_branches={"_ToyBlock": {"mlp": "image"}}))
    try:
        torch.manual_seed(0)
        model = ToyTransformer().eval()
        latents = _randn(BATCH, 12, 16)
        steps = [torch.full((BATCH,), float(t)) for t in torch.linspace(999, 100, STEPS)]
        call = lambda: [model(latents, t)[0] for t in steps]  # noqa: E731
        with torch.no_grad():
            plain = call()
            apply_cache(model, FORAConfig(cache_interval=1))
            assert all(torch.equal(a, b) for a, b in zip(call(), plain))
            apply_cache(model, FORAConfig(cache_interval=3))
            fora = call()
            stats = cache_stats(model)
            assert stats.full_step_indices == (0, 1, 4) and stats.flops < 0.75 * stats.flops_full
            assert torch.equal(fora[4], plain[4]) and not torch.equal(fora[5], plain[5])
            apply_cache(model, ToCaConfig(cache_interval=3, cache_ratio=0.5))
            call()
            assert 0.4 <= cache_stats(model).recompute_fraction <= 0.6
            remove_cache(model)
            assert hooked_modules(model) == [] and all(torch.equal(a, b) for a, b in zip(call(), plain))
    finally:
        SPECS.pop("ToyTransformer")


def test_a_spec_naming_an_argument_the_forward_does_not_take_is_refused_at_apply_time():
    from ditcache.specs import ModelSpec, register

    register(ModelSpec(family="toy", transformer="ToyTransformer", block_lists=("layers",), latents_argument="sample",
                       branches={"_ToyBlock": ("mixer", "mlp")}))
    try:
        with pytest.raises(ValueError, match=r"latents_argument='sample'.*hidden_states, timestep, return_dict"):
            apply_cache(ToyTransformer(), FORAConfig(cache_interval=2))
    finally:
        SPECS.pop("ToyTransformer")


def test_k_norm_reads_the_keys_before_the_qk_norm():
    """SD3.5's attention normalises its keys (``qk_norm``): the ``k_norm`` score reads ``to_k`` (image) and
    ``add_k_proj`` (text), as the published score does on FLUX."""
    from ditcache.scores import l2_normalize

    torch.manual_seed(0)
    model = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
                                  num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
                                  pooled_projection_dim=16, out_channels=4, pos_embed_max_size=16, qk_norm="rms_norm").eval()
    FAMILIES["sd3-qk-norm"] = (lambda: model, FAMILIES["sd3"][1])
    try:
        apply_cache(model, ToCaConfig(cache_interval=3, cache_ratio=0.5, score="k_norm"))
        run(model, "sd3-qk-norm")
        cache = _step_hook(model).run.block_cache("transformer_blocks.0")
        remove_cache(model)
        attention, keys = model.transformer_blocks[0].attn, {}
        handles = [module.register_forward_hook(lambda _m, _i, out, name=name: keys.setdefault(name, out))
                   for name, module in (("image", attention.to_k), ("text", attention.add_k_proj))]
        inputs = FAMILIES["sd3"][1]()
        with torch.no_grad():
            model(**inputs, timestep=timesteps("sd3")[4], return_dict=False)  # the last full step's call
        for handle in handles:
            handle.remove()
        assert attention.norm_k is not None
        for group, projected in keys.items():
            norms = projected.unflatten(-1, (attention.heads, -1)).norm(dim=-1).mean(dim=-1)
            torch.testing.assert_close(cache.normalized_scores[group], l2_normalize(norms), rtol=1e-4, atol=1e-6)
    finally:
        FAMILIES.pop("sd3-qk-norm")


TWO_CALL = sorted(family for family in FAMILIES if isinstance(FAMILIES[family][1]().get("encoder_hidden_states"), torch.Tensor))


@pytest.mark.parametrize("family", TWO_CALL)
def test_recomputing_more_tokens_never_hurts_under_two_call_guidance(family):
    """Cond and uncond as separate calls (streams) of each step, combined with guidance 5: both streams must
    recompute the same tokens, or their cache errors decorrelate and guidance amplifies them."""
    model = build(family)
    argument = SPECS[type(model).__name__].timestep_argument
    cond = FAMILIES[family][1]()
    uncond = {**cond, "encoder_hidden_states": torch.zeros_like(cond["encoder_hidden_states"])}

    def guided():
        outputs = []
        with torch.no_grad():
            for t in timesteps(family):
                low, high = (model(**inputs, **{argument: t}, return_dict=False)[0] for inputs in (uncond, cond))
                outputs.append(low + 5.0 * (high - low))
        return outputs

    exact = guided()

    def error(config):
        apply_cache(model, config)
        return sum((out - ref).square().mean().item() for out, ref in zip(guided(), exact)) ** 0.5

    fora = error(FORAConfig(cache_interval=3))
    assert fora > 0
    for ratio in (0.7, 0.3):
        assert error(ToCaConfig(cache_interval=3, cache_ratio=ratio, score="random")) <= 1.05 * fora, ratio
