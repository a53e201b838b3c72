"""ditcache inside the stack users run: LoRA scales, inference mode, bad samples, offloading, compile."""

import math

import pytest
import torch

from ditcache.eval import digits
from ditcache import FORAConfig, ToCaConfig, apply_cache, cache_stats, preset, remove_cache


def flux_images(pipe, **kwargs):
    generator = torch.Generator().manual_seed(0)
    return pipe("a red fox", num_inference_steps=6, height=32, width=32, max_sequence_length=16,
                generator=generator, output_type="latent", **kwargs).images


def test_a_lora_scale_reaches_the_tabulated_timestep_embedding(flux_pipe):
    """A call's LoRA scale equals the same scale set on the adapter, cached alike (partial steps use the run's
    table of timestep embeddings)."""
    from peft import LoraConfig

    transformer = flux_pipe.transformer
    targets = ["time_text_embed.timestep_embedder.linear_1", "time_text_embed.timestep_embedder.linear_2"]
    transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=targets, init_lora_weights=False))
    apply_cache(flux_pipe, FORAConfig(cache_interval=2))
    scaled_by_call = flux_images(flux_pipe, joint_attention_kwargs={"scale": 0.5})
    assert cache_stats(flux_pipe).partial_steps
    transformer.set_adapters(["default"], weights=[0.5])
    scaled_on_adapter = flux_images(flux_pipe)
    transformer.set_adapters(["default"], weights=[1.0])
    assert (flux_images(flux_pipe) - scaled_on_adapter).abs().max() > 1e-3  # the scale matters to this model
    torch.testing.assert_close(scaled_by_call, scaled_on_adapter, rtol=0, atol=0)


def test_a_lora_fused_and_unfused_under_the_cache_gives_what_the_adapter_gives(flux_pipe):
    """Fusing changes the weights the cached branches run with; each call starts a run, so no cache outlives it."""
    from peft import LoraConfig

    transformer = flux_pipe.transformer
    transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "proj_mlp"], init_lora_weights=False))
    apply_cache(flux_pipe, ToCaConfig(cache_interval=2, cache_ratio=0.7))
    with_adapter = flux_images(flux_pipe)
    assert cache_stats(flux_pipe).partial_steps
    transformer.fuse_lora()
    torch.testing.assert_close(flux_images(flux_pipe), with_adapter, rtol=1e-4, atol=1e-4)
    transformer.unfuse_lora()
    torch.testing.assert_close(flux_images(flux_pipe), with_adapter, rtol=1e-4, atol=1e-4)
    transformer.disable_adapters()
    without = flux_images(flux_pipe)
    remove_cache(flux_pipe)
    assert (with_adapter - without).abs().max() > 1e-3  # the adapter matters to this model
    apply_cache(flux_pipe, ToCaConfig(cache_interval=2, cache_ratio=0.7))
    torch.testing.assert_close(flux_images(flux_pipe), without, rtol=0, atol=0)


def test_a_bare_flux_transformer_runs_under_inference_mode(flux_pipe):
    transformer = flux_pipe.transformer
    generator = torch.Generator().manual_seed(0)
    call = {
        "hidden_states": torch.randn(1, 16, transformer.config.in_channels, generator=generator),
        "encoder_hidden_states": torch.randn(1, 8, transformer.config.joint_attention_dim, generator=generator),
        "pooled_projections": torch.randn(1, transformer.config.pooled_projection_dim, generator=generator),
        "txt_ids": torch.zeros(8, 3),
        "img_ids": torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(4.0), torch.arange(4.0), indexing="ij"), -1).reshape(16, 3),
        "guidance": torch.full((1,), 3.5) if transformer.config.guidance_embeds else None,
    }
    timesteps = torch.linspace(1.0, 0.2, 4)
    with torch.no_grad():
        expected = [transformer(timestep=t.reshape(1), **call).sample for t in timesteps]
    apply_cache(transformer, FORAConfig(cache_interval=1))
    with torch.inference_mode():
        outputs = [transformer(timestep=t.reshape(1), **call).sample for t in timesteps]
    for output, reference in zip(outputs, expected):
        torch.testing.assert_close(output, reference, rtol=0, atol=0)


def test_a_nan_sample_forces_full_steps_and_leaves_its_batch_mate_as_good_as_alone():
    """The bad sample's relative error cannot be measured: each step it poisons is full, never a longer interval.
    On the reference FLUX, where caching errs measurably."""
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(digits.reference_pipeline_path(digits.TEXT_MODEL))
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(0)
    tokens = (digits.IMAGE_SIZE // (pipe.vae_scale_factor * 2)) ** 2
    latents = torch.randn(1, tokens, pipe.transformer.config.in_channels, generator=generator)
    call = {**digits.TEXT_MODEL_CALL, "num_inference_steps": 20, "output_type": "pt"}

    def images(batch):
        return pipe([digits.prompt(3)] * len(batch), latents=torch.cat(batch), **{**call, "negative_prompt": [""] * len(batch)}).images

    uncached = images([latents])
    apply_cache(pipe, preset("ditcache", tolerance=0.4))
    alone = images([latents])
    mixed = images([latents, torch.full_like(latents, math.nan)])
    stats = cache_stats(pipe)
    assert torch.isnan(mixed[1]).all()
    assert "non_finite" in stats.full_step_reasons
    first = stats.full_step_indices[stats.full_step_reasons.index("non_finite")]
    assert stats.full_step_indices[-(stats.steps - first):] == tuple(range(first, stats.steps))  # all full from there

    def psnr(image):
        return -10 * math.log10(torch.mean((image - uncached[0]) ** 2).item())

    assert psnr(alone[0]) < 60  # caching errs here, so the comparison below means something
    assert psnr(mixed[0]) >= psnr(alone[0]) - 0.5


def test_flex_attention_on_the_generic_path_runs_and_says_which_flops_it_could_not_count():
    """FlopCounterMode cannot run flex attention's higher-order op: the run goes on, counting what it can."""
    from test_generic import build, run

    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    model = build("wan")
    active = _AttentionBackendRegistry._active_backend
    model.set_attention_backend("flex")  # also sets diffusers' process-wide active backend: restored below
    try:
        check_flex_attention(model, run)
    finally:
        _AttentionBackendRegistry.set_active_backend(active)


def check_flex_attention(model, run):
    expected = run(model, "wan")
    apply_cache(model, FORAConfig(cache_interval=1))
    with pytest.warns(UserWarning, match="FLOPs counted from their linear layers only"):
        outputs = run(model, "wan")
    for output, reference in zip(outputs, expected):
        torch.testing.assert_close(output, reference, rtol=0, atol=0)
    stats = cache_stats(model)
    assert stats.flops_uncounted and all(".attn" in note and "FlopCounterMode" not in note for note in stats.flops_uncounted)
    assert 0 < stats.flops <= stats.flops_full
    apply_cache(model, FORAConfig(cache_interval=2))
    run(model, "wan")
    assert cache_stats(model).flops_speedup > 1.2


# streams need CUDA: those cases run where a GPU is (eval/gpu_bench.sh runs this file's offloading tests there)
OFFLOAD_CASES = [(kind, to_disk, "cpu") for kind in ("block_level", "leaf_level") for to_disk in (False, True)]
if torch.cuda.is_available():
    OFFLOAD_CASES += [(kind, False, "cuda") for kind in ("block_level", "leaf_level")]


@pytest.mark.parametrize(("offload_type", "to_disk", "device"), OFFLOAD_CASES)
def test_group_offloading_composes_in_the_order_that_works_and_the_other_is_refused(saved_pipelines, tmp_path, offload_type, to_disk, device):
    """Block-level offloading under the cache is refused at apply time; on CUDA, with streams."""
    from diffusers import FluxPipeline
    from diffusers.hooks import apply_group_offloading

    def pipe():
        loaded = FluxPipeline.from_pretrained(saved_pipelines / "flux").to(device)
        loaded.set_progress_bar_config(disable=True)
        return loaded

    def offload(loaded, folder):
        apply_group_offloading(loaded.transformer, onload_device=torch.device(device), offload_device=torch.device("cpu"),
                               offload_type=offload_type, num_blocks_per_group=1 if offload_type == "block_level" else None,
                               offload_to_disk_path=str(tmp_path / folder) if to_disk else None, use_stream=device == "cuda")

    config = ToCaConfig(cache_interval=2, cache_ratio=0.7)
    plain = apply_cache(pipe(), config)
    expected = flux_images(plain)
    cache_then_offload = apply_cache(pipe(), config)
    offload(cache_then_offload, "after")
    torch.testing.assert_close(flux_images(cache_then_offload), expected, rtol=0, atol=1e-5)
    offload_then_cache = pipe()
    offload(offload_then_cache, "before")
    if offload_type == "block_level":
        with pytest.raises(RuntimeError, match="Apply the cache first, then the offloading"):
            apply_cache(offload_then_cache, config)
    else:
        apply_cache(offload_then_cache, config)
        torch.testing.assert_close(flux_images(offload_then_cache), expected, rtol=0, atol=1e-5)


def test_a_pipeline_sharing_the_cached_transformer_with_its_own_scheduler_counts_its_own_runs(saved_pipelines):
    """``from_pipe(A, scheduler=new)``: A's scheduler says nothing of the new pipeline's runs."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxImg2ImgPipeline, FluxPipeline

    def img2img_of(source):
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(source.scheduler.config, shift=2.0)
        pipe = FluxImg2ImgPipeline.from_pipe(source, scheduler=scheduler)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def images(pipe):
        image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
        return pipe("a red fox", image=image, strength=0.75, num_inference_steps=24, height=32, width=32,
                    max_sequence_length=16, generator=torch.Generator().manual_seed(0), output_type="latent").images

    config = ToCaConfig(cache_interval=3, cache_ratio=0.7)
    first = FluxPipeline.from_pretrained(saved_pipelines / "flux")
    first.set_progress_bar_config(disable=True)
    flux_images(apply_cache(first, config))  # the first pipeline's scheduler now holds a 6-step schedule
    shared = img2img_of(first)
    outputs = [images(shared), images(shared)]
    stats = cache_stats(shared)
    expected = images(apply_cache(img2img_of(FluxPipeline.from_pretrained(saved_pipelines / "flux")), config))
    assert stats.steps == 18 and stats == cache_stats(shared)
    for output in outputs:
        torch.testing.assert_close(output, expected, rtol=0, atol=0)
